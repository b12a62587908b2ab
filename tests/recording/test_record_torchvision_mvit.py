"""vitmad.record on torchvision's video MViT (recording/families/video_mvit.py), against each attention layer's own
softmax probabilities, placed by geometry written here from torchvision's ``models/video/mvit.py``.

The geometry: ``conv_proj`` (a Conv3d) makes a ``T' x H' x W'`` grid, flattened in (frame, row, column) order after
a CLS token; each ``MultiscaleAttention`` pools its queries and its keys with a Conv3d of padding ``kernel // 2``
(none where it has no ``pool_q`` / ``pool_k``), the CLS token passed through first. Every output of a stride-``s``
operation sits at the centre of its stride cell, ``(i + 0.5) * s`` cells of its input, in pixels for rows and
columns and in input frames for time (docs/definition.md, "Video"): the embedding's tokens at ``(i + 0.5) * 4``
pixels and ``(f + 0.5) * 2`` frames, a query pooled by 2 at the centre of the 2 x 2 x 2 cells it stands for.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from unittest import mock

import pytest
import torch

import vitmad
from conftest import tensor_softmax_maps

mvit = pytest.importorskip("torchvision.models.video.mvit")

TOL = {"rtol": 1e-5, "atol": 1e-4}  # pixels or frames; float32 probabilities against float64 sums
STAT_TOL = {"rtol": 1e-5, "atol": 1e-6}  # nats, masses and maps
STATS = ["mad", "entropy", "self_mass", "prefix_mass", "prefix_maps"]
BATCH = 2
NAN = float("nan")


def blocks(version: str) -> list:
    """Four blocks: keys pooled by 4 in space (as mvit_v1_b's first block pools them by 8); queries pooled by 2 in
    time and space (keys convolved at stride 1); queries and keys both convolved at stride 1 (one grid: self mass and
    prefix maps); no query pooling, keys pooled by 2 in time and space."""
    config = mvit.MSBlockConfig
    return [
        config(1, 8, 8, [3, 3, 3], [3, 3, 3], [1, 1, 1], [1, 4, 4]),
        config(2, 8, 16, [3, 3, 3], [3, 3, 3], [2, 2, 2], [1, 1, 1]),
        config(2, 16, 16, [3, 3, 3], [3, 3, 3], [1, 1, 1], [1, 1, 1]),
        config(2, 16, 16, [], [3, 3, 3], [], [2, 2, 2]),
    ]


# MViT v1 (absolute position embeddings) and v2 (decomposed relative position bias, residual pooling), as
# torchvision's mvit_v1_b and mvit_v2_s set them.
STYLES = {
    "v1": dict(residual_pool=False, residual_with_cls_embed=False, rel_pos_embed=False, proj_after_attn=False),
    "v2": dict(residual_pool=True, residual_with_cls_embed=False, rel_pos_embed=True, proj_after_attn=True),
}

# (frames, height, width, patch embedding): the default embedding (kernel 3x7x7, stride 2x4x4, padding 1x3x3)
# needs an even frame count and sides that are multiples of 4, which MViT's floor division of the configured size
# by the stride assumes; a 1x3x3 stride embedding takes 5 frames of 39 x 57.
SIZES = {
    "6x40x56": (6, 40, 56, {}),
    "5x39x57": (5, 39, 57, dict(patch_embed_kernel=(3, 5, 5), patch_embed_stride=(1, 3, 3),
                                patch_embed_padding=(1, 2, 2))),
}


def build(version: str, frames: int, height: int, width: int, embedding: dict, seed: int = 0):
    torch.manual_seed(seed)
    model = mvit.MViT(spatial_size=(height, width), temporal_size=frames, block_setting=blocks(version),
                      num_classes=5, **STYLES[version], **embedding)
    return sharpen(model)


def sharpen(model):
    """Random weights that make attention far from uniform: the pooled queries and keys are layer-normed per head,
    so their norms' weights are scaled up too (a token at a wrong place then changes the MAD)."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.normal_(std=0.5)
            elif type(module).__name__ == "Pool" and module.norm_act is not None:
                module.norm_act[0].weight.fill_(2.5)
    return model.eval()


def video(frames: int, height: int, width: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(BATCH, 3, frames, height, width, generator=torch.Generator().manual_seed(seed))



# Geometry, written here --------------------------------------------------------------------------------------------


def out_size(n: int, kernel: int, stride: int, padding: int) -> int:
    return (n + 2 * padding - kernel) // stride + 1


@dataclass
class Tokens:
    """One side (queries or keys) of a layer: its (frames, rows, columns) grid and the (frames, pixels, pixels)
    of a cell."""

    grid: tuple[int, int, int]
    stride: tuple[float, float, float]

    def positions(self) -> tuple[torch.Tensor, torch.Tensor]:
        """[1 + n, 2] pixels and [1 + n, 1] frames, CLS first (NaN), then (frame, row, column) order."""
        f, r, c = torch.meshgrid(*(torch.arange(n, dtype=torch.float64) for n in self.grid), indexing="ij")
        centre = [(axis.reshape(-1) + 0.5) * s for axis, s in zip((f, r, c), self.stride)]
        nan = torch.full((1,), NAN, dtype=torch.float64)
        pixels = torch.stack([torch.cat([nan, centre[1]]), torch.cat([nan, centre[2]])], dim=-1)
        return pixels, torch.cat([nan, centre[0]])[:, None]


def pooled(tokens: Tokens, kernel, stride) -> Tokens:
    """torchvision's Pool: a Conv3d of padding kernel // 2; no pooling where its kernel and stride are all 1."""
    if not kernel:
        return tokens
    grid = tuple(out_size(n, k, s, k // 2) for n, k, s in zip(tokens.grid, kernel, stride))
    return Tokens(grid, tuple(c * s for c, s in zip(tokens.stride, stride)))


def layer_tokens(frames, height, width, embedding: dict, settings) -> list[tuple[Tokens, Tokens]]:
    """Per block, (queries, keys) as torchvision's MViT makes them from the block settings."""
    kernel = embedding.get("patch_embed_kernel", (3, 7, 7))
    stride = embedding.get("patch_embed_stride", (2, 4, 4))
    padding = embedding.get("patch_embed_padding", (1, 3, 3))
    grid = tuple(out_size(n, k, s, p) for n, k, s, p in zip((frames, height, width), kernel, stride, padding))
    tokens = Tokens(grid, tuple(float(s) for s in stride))
    layers = []
    for setting in settings:
        queries = pooled(tokens, setting.kernel_q, setting.stride_q)
        keys = pooled(tokens, setting.kernel_kv, setting.stride_kv)
        layers.append((queries, keys))
        tokens = queries  # the next block runs on the pooled queries' grid
    return layers


def reference(probabilities: torch.Tensor, queries: Tokens, keys: Tokens) -> dict[str, torch.Tensor]:
    """Per query with a position ``[B, H, n]`` (``"prefix_maps"``: ``[B, H, 1, n]``), float64: spatial and temporal
    MAD over the keys with a position, entropy of the row, mass on CLS, mass on the query's own cell (NaN where the
    keys are other cells) and CLS's row over the grid."""
    p = probabilities.double()
    q_pixels, q_frames = queries.positions()
    k_pixels, k_frames = keys.positions()
    rows = p[:, :, 1:]
    space = torch.cdist(q_pixels[1:], k_pixels[1:])
    time = (q_frames[1:] - k_frames[1:].T).abs()
    own_cells = queries == keys
    return {
        "mad": (rows[..., 1:] * space).sum(-1),
        "temporal": (rows[..., 1:] * time).sum(-1),
        "entropy": -torch.special.xlogy(rows, rows).sum(-1),
        "prefix_mass": rows[..., 0],
        "self_mass": rows[..., 1:].diagonal(dim1=-2, dim2=-1) if own_cells else torch.full_like(rows[..., 0], NAN),
        "prefix_maps": p[:, :, :1, 1:] if own_cells else None,
    }


# The layers of the 6 x 40 x 56 video: (queries, keys) as (frames, rows, columns) and the queries' cell size.
DEFAULT_LAYERS = [
    ((3, 10, 14), (3, 3, 4), (2.0, 4.0, 4.0)),
    ((2, 5, 7), (3, 10, 14), (4.0, 8.0, 8.0)),
    ((2, 5, 7), (2, 5, 7), (4.0, 8.0, 8.0)),
    ((2, 5, 7), (1, 3, 4), (4.0, 8.0, 8.0)),
]


def test_the_geometry_written_here_is_torchvisions():
    """The grids above against the shapes of the model's own attention."""
    layers = layer_tokens(6, 40, 56, {}, blocks("v1"))
    assert [(q.grid, k.grid, q.stride) for q, k in layers] == DEFAULT_LAYERS
    model = build("v1", *SIZES["6x40x56"])
    maps = tensor_softmax_maps(model, video(6, 40, 56))
    assert [tuple(m.shape[-2:]) for m in maps] == [(1 + math.prod(q), 1 + math.prod(k)) for q, k, _ in DEFAULT_LAYERS]


# Recording against the reference -------------------------------------------------------------------------------------


def check(rec, tokens_rec, maps, layers, video: bool = True) -> None:
    """A mean and a per-token recording with every statistic against :func:`reference` of each layer (``video``:
    False for image layers, without frames)."""
    assert len(maps) == len(layers) == len(tokens_rec.layers) and tokens_rec.skipped == {}
    for index, (probabilities, (queries, keys)) in enumerate(zip(maps, layers)):
        expected = reference(probabilities, queries, keys)
        # Far from uniform: a query or key one cell off would change the MAD far past the tolerance.
        assert float(expected["entropy"].mean()) < 0.8 * math.log(probabilities.shape[-1])
        geometry = tokens_rec.geometry[index]
        assert geometry.grid == queries.grid[1:] and geometry.stride == queries.stride[1:]
        assert geometry.num_prefix_tokens == (1 if queries == keys else None)
        torch.testing.assert_close(tokens_rec.per_layer[index].double(), expected["mad"], **TOL)
        torch.testing.assert_close(rec.per_layer[index].double(), expected["mad"].mean(-1), **TOL)
        if video:
            assert (geometry.frames, geometry.frame_stride) == (queries.grid[0], queries.stride[0])
            torch.testing.assert_close(tokens_rec.calls[-1].temporal[index].double(), expected["temporal"], **TOL)
            torch.testing.assert_close(rec.calls[-1].temporal[index].double(), expected["temporal"].mean(-1), **TOL)
        else:
            assert geometry.frames is None and tokens_rec.calls[-1].temporal[index] is None
        for stat in ("entropy", "prefix_mass", "self_mass"):  # self mass: NaN where the keys are other cells
            per_token, mean = (r.calls[-1].statistics[stat][index].double() for r in (tokens_rec, rec))
            torch.testing.assert_close(per_token, expected[stat], **STAT_TOL, equal_nan=True)
            torch.testing.assert_close(mean, expected[stat].mean(-1), **STAT_TOL, equal_nan=True)
        if expected["prefix_maps"] is None:
            assert tokens_rec.prefix_maps[index] is None
        else:
            torch.testing.assert_close(tokens_rec.prefix_maps[index].double(), expected["prefix_maps"], **STAT_TOL)


def recorded(model, pixels):
    """(mean recording, per-token recording) of one forward each, with every statistic; both outputs are the
    output without recording, bit for bit."""
    with torch.no_grad():
        plain = model(pixels)
        with vitmad.record(model, stats=STATS) as rec:
            assert torch.equal(model(pixels), plain)
        with vitmad.record(model, stats=STATS, reduction="none") as tokens_rec:
            assert torch.equal(model(pixels), plain)
    return rec, tokens_rec


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("version", STYLES)
def test_pooled_queries_and_keys_in_space_and_time_equal_the_mad_of_its_own_softmax(version, size):
    frames, height, width, embedding = SIZES[size]
    model = build(version, frames, height, width, embedding)
    pixels = video(frames, height, width)
    rec, tokens_rec = recorded(model, pixels)
    maps = tensor_softmax_maps(model, pixels)
    layers = layer_tokens(frames, height, width, embedding, blocks(version))
    check(rec, tokens_rec, maps, layers)
    assert tokens_rec.layers == [f"blocks.{i}.attn" for i in range(4)]
    keys = ["x".join(map(str, k.grid)) for _, k in layers]
    assert [g.attention for g in rec.geometry] == [
        f"keys pooled 3x3x3, stride 1x4x4 to {keys[0]}",
        f"keys pooled 3x3x3, stride 1x1x1 to {keys[1]}; queries pooled, stride 2x2x2",
        f"keys pooled 3x3x3, stride 1x1x1 to {keys[2]}",
        f"keys pooled 3x3x3, stride 2x2x2 to {keys[3]}",
    ]


@pytest.mark.parametrize("builder", ["mvit_v1_b", "mvit_v2_s"])
def test_torchvisions_models_at_a_small_size(builder):
    """mvit_v1_b and mvit_v2_s (16 blocks each; keys pooled by 8, 4, 2 in space, queries by 2 at each stage) built
    for 4 frames of 64 x 64: their geometry read from each attention's poolings, placed as above."""
    arguments = {}

    def capture(**kwargs):  # the builders fix the size (224 x 224, 16 frames): their settings, at a small one
        arguments.update(kwargs, spatial_size=(64, 64), temporal_size=4, num_classes=5)
        return None

    with mock.patch.object(mvit, "MViT", capture):
        getattr(mvit, builder)()
    torch.manual_seed(0)
    model = sharpen(mvit.MViT(**arguments))
    pixels = video(4, 64, 64)
    rec, tokens_rec = recorded(model, pixels)
    maps = tensor_softmax_maps(model, pixels)
    tokens = Tokens((2, 16, 16), (2.0, 4.0, 4.0))
    layers = []
    for block in model.blocks:
        attention = block.attn
        settings = [(list(p.pool.kernel_size), list(p.pool.stride)) if p is not None else ([], [])
                    for p in (attention.pool_q, attention.pool_k)]
        assert all(p is None or tuple(p.pool.padding) == tuple(k // 2 for k in p.pool.kernel_size)
                   for p in (attention.pool_q, attention.pool_k))
        queries, keys = pooled(tokens, *settings[0]), pooled(tokens, *settings[1])
        layers.append((queries, keys))
        tokens = queries
    assert [q.grid for q, _ in layers][-1] == (2, 2, 2)
    check(rec, tokens_rec, maps, layers)


@pytest.mark.parametrize("shape", ["image", "one-frame clip"])
def test_an_image_is_placed_as_an_image(shape):
    """MViT takes [B, 3, H, W] as a clip of one frame: every token is of that frame, so its layers are image layers,
    without a temporal MAD (the stride cells of pooled grids in time, past the one frame, would differ)."""
    model = build("v1", 2, 40, 56, {})  # v2's relative position bias in time needs 2 frames after the embedding
    pixels = video(1, 40, 56)
    if shape == "image":
        pixels = pixels[:, :, 0]
    rec, tokens_rec = recorded(model, pixels)
    maps = tensor_softmax_maps(model, pixels)
    check(rec, tokens_rec, maps, layer_tokens(1, 40, 56, {}, blocks("v1")), video=False)
    with pytest.raises(ValueError, match="temporal_mad is defined for video layers only"):
        _ = rec.temporal_mad


# Refused --------------------------------------------------------------------------------------------------------------


def test_a_video_whose_embedding_grid_is_not_the_configured_one_is_refused():
    """Built for 40 x 56, given 56 x 40: the same token count, so the model runs, its blocks reshaping a 14 x 10 grid
    as 10 x 14 and pooling tokens that are not neighbours."""
    model = build("v1", *SIZES["6x40x56"])
    pixels = video(6, 56, 40)
    with torch.no_grad():
        model(pixels)  # no error from the model
        with vitmad.record(model), pytest.raises(
                ValueError, match=r"blocks\.0\.attn .*conv_proj\) made a 3x14x10 grid .* as the 3x10x14 grid"):
            model(pixels)


def test_a_pooling_other_than_a_strided_3d_convolution_or_pool_is_refused():
    model = build("v1", *SIZES["6x40x56"])
    for pool in (model.blocks[0].attn.pool_k, model.blocks[0].attn.pool_v):
        pool.pool = torch.nn.AdaptiveAvgPool3d((2, 3, 3))
    pixels = video(6, 40, 56)
    with torch.no_grad():
        model(pixels)
        with vitmad.record(model), pytest.raises(
                ValueError, match=r"blocks\.0\.attn .*keys are pooled by a Pool over a AdaptiveAvgPool3d"):
            model(pixels)


def test_layers_after_a_query_pooling_not_placed_are_refused():
    model = build("v1", *SIZES["6x40x56"])
    model.blocks[1].attn.pool_q.pool = torch.nn.AdaptiveMaxPool3d((2, 5, 7))
    pixels = video(6, 40, 56)
    with torch.no_grad():
        with vitmad.record(model, layers=["blocks.0.attn"]) as rec:
            model(pixels)
        assert rec.layers == ["blocks.0.attn"]
        for name, message in (("blocks.1.attn", "queries are pooled by a Pool over a AdaptiveMaxPool3d"),
                              ("blocks.3.attn", "an attention module before it pools its queries")):
            with vitmad.record(model, layers=[name]), pytest.raises(ValueError, match=message):
                model(pixels)


def test_a_one_frame_clip_padded_to_several_frames_is_refused():
    """A 1-frame kernel padded by 1 in time makes 3 frames of one: two of them padding, no frame of the clip."""
    embedding = dict(patch_embed_kernel=(1, 7, 7), patch_embed_stride=(1, 4, 4), patch_embed_padding=(1, 3, 3))
    model = build("v1", 3, 40, 56, embedding)
    pixels = video(1, 40, 56)
    with torch.no_grad():
        model(pixels)
        with vitmad.record(model), pytest.raises(
                ValueError, match=r"blocks\.0\.attn .*clip of one frame makes 3 frames of queries and 3 of keys"):
            model(pixels)
