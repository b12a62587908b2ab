"""vitmad.record on Project MONAI (``monai.networks``): ViT with either patch embedding, with and without its class
token, UNETR's ViT encoder, and SwinUNETR's Swin transformer, on images (``spatial_dims=2``) and volumes (3)
(MaskedAutoEncoderViT: test_record_monai_mae.py).

Tiny random-weight models, sharpened so that attention is far from uniform. The reference is each model's own
attention probabilities: ``SABlock`` computes ``att_mat.softmax(dim=-1)`` (every ``Tensor.softmax`` of a forward),
``WindowAttention`` its ``nn.Softmax`` (every ``F.softmax`` of rank 4). They are placed by geometry written here from
MONAI's source:

- ``PatchEmbeddingBlock``: ``"conv"`` is a convolution of kernel = stride = the patch, flattened (``flatten(2)``), so
  a side the patch does not divide is floored; ``"perceptron"`` is ``Rearrange("b c (h p1) (w p2) -> b (h w) ...")``,
  whole patches only. Either way patch ``t`` of a ``g_1 x ... x g_K`` grid is ``t`` unravelled row-major, centred at
  ``(i + 0.5) * p`` on each axis. ``ViT.forward`` puts ``cls_token`` first when built with ``classification=True``.
- ``SwinTransformerBlock.forward_part1``: ``get_window_size`` makes the window the map along an axis the map does
  not exceed, with no shift there; the map is padded at the end of each axis to whole windows, rolled by
  ``-shift`` and cut by ``window_partition`` (windows row-major, slots row-major): slot ``j`` of window ``w`` holds
  the padded cell ``(w_a * win_a + j_a + shift_a) mod padded_a`` on each axis ``a``. A padding cell is a key at its
  cell and no query. ``PatchEmbed`` pads the input to whole patches, each merging pads an odd side by one: stage
  ``m`` maps are ``ceil``-halved ``m`` times, cells ``patch * 2 ** m`` apart.

A volume's tokens are placed in all three axes (``docs/definition.md``, volumes): the distances here are Euclidean
over (slice, row, column) voxel centres, computed in float64.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import vitmad
from conftest import SoftmaxOutputs, sharpened, tensor_softmax_maps

nets = pytest.importorskip("monai.networks.nets")
swin_unetr = pytest.importorskip("monai.networks.nets.swin_unetr")
spatialattention = pytest.importorskip("monai.networks.blocks.spatialattention")

TOL = {"rtol": 1e-5, "atol": 1e-4}  # float32 accumulation against float64; atol in pixels (voxels)
STAT_TOL = {"rtol": 1e-5, "atol": 1e-5}
STATS = ["entropy", "prefix_mass", "prefix_maps"]


def _sharpen(model: torch.nn.Module, scale: float) -> torch.nn.Module:
    """Every Linear redrawn (``sharpened``), the q / k projections ``scale`` times larger: far from uniform."""
    model = sharpened(model)
    with torch.no_grad():
        for module in model.modules():
            if type(module).__name__ in ("SABlock", "WindowAttention"):
                module.qkv.weight.mul_(scale)
    return model


def _centres(grid, stride) -> torch.Tensor:
    """``[prod(grid), K]`` float64 centres of a row-major grid: flat index ``t`` unravelled, last axis fastest."""
    cells = []
    for t in range(math.prod(grid)):
        index = []
        for side in reversed(grid):
            t, i = divmod(t, side)
            index.append(i)
        cells.append(index[::-1])
    return (torch.tensor(cells, dtype=torch.float64) + 0.5) * torch.tensor(stride, dtype=torch.float64)


def _global_reference(probs: torch.Tensor, grid, stride, prefix: int) -> dict[str, torch.Tensor]:
    """Per statistic ``[B, H, T]`` (maps: ``[B, H, prefix, T]``) of a ViT block's ``[B, H, N, N]`` probabilities."""
    attn = probs.double()
    centres = _centres(grid, stride)
    return {"mad": (attn[..., prefix:, prefix:] * torch.cdist(centres, centres)).sum(-1),
            "entropy": -torch.special.xlogy(attn, attn).sum(-1)[..., prefix:],
            "prefix_mass": attn[..., prefix:, :prefix].sum(-1),
            "maps": attn[..., :prefix, prefix:]}


def _same_output(plain, recorded) -> None:
    plain = plain if isinstance(plain, tuple) else (plain,)
    recorded = recorded if isinstance(recorded, tuple) else (recorded,)
    flat = [t for x in plain for t in (x if isinstance(x, list) else [x])]
    again = [t for x in recorded for t in (x if isinstance(x, list) else [x])]
    assert len(flat) == len(again) and all(torch.equal(a, b) for a, b in zip(flat, again))


def _record(model, x):
    """(mean recording, per-token recording); the output bit-identical with and without recording."""
    with torch.no_grad():
        plain = model(x)
        with vitmad.record(model, stats=STATS) as rec:
            recorded = model(x)
        with vitmad.record(model, stats=STATS, reduction="none") as tokens:
            model(x)
    _same_output(plain, recorded)
    return rec, tokens


def _check_global(rec, tokens, maps, grid, stride, prefix) -> None:
    assert len(maps) == len(rec.layers)
    for layer, probs in enumerate(maps):
        geometry = rec.geometry[layer]
        expected = _global_reference(probs, grid, stride, prefix)
        n = probs.shape[-1]
        assert float(expected["entropy"].mean()) < 0.6 * math.log(n)  # far from uniform
        if len(grid) == 3:
            assert (geometry.depth, *geometry.grid) == tuple(grid)
            assert (geometry.depth_stride, *geometry.stride) == tuple(stride)
        else:
            assert geometry.grid == tuple(grid) and geometry.stride == tuple(stride) and geometry.depth is None
        assert geometry.num_prefix_tokens == prefix
        torch.testing.assert_close(tokens.per_layer[layer].double(), expected["mad"], **TOL)
        torch.testing.assert_close(rec.per_layer[layer].double(), expected["mad"].mean(-1), **TOL)
        for stat in ("entropy", "prefix_mass"):
            torch.testing.assert_close(tokens.calls[-1].statistics[stat][layer].double(), expected[stat], **STAT_TOL)
        if prefix:
            torch.testing.assert_close(tokens.prefix_maps[layer].double(), expected["maps"], **STAT_TOL)
        else:
            assert tokens.prefix_maps[layer] is None


# (spatial dims, proj_type, pos_embed_type, img_size the model is built for, patch, input sides): the conv cases
# floor a side the patch does not divide; the perceptron needs whole patches; one input has the sides swapped (the
# position table fixes only the patch count, so the model runs and cuts a 6 x 4 grid). Position embeddings are added
# to the tokens and move none.
VIT_CASES = {
    "2d_conv": (2, "conv", "sincos", (36, 45), (8, 6), (36, 45)),
    "2d_conv_sides_swapped": (2, "conv", "learnable", (32, 48), (8, 8), (48, 32)),
    "2d_perceptron": (2, "perceptron", "fourier", (32, 42), (8, 6), (32, 42)),
    "3d_conv": (3, "conv", "sincos", (20, 24, 30), (8, 6, 8), (20, 24, 30)),
    "3d_perceptron": (3, "perceptron", "none", (16, 24, 30), (8, 6, 10), (16, 24, 30)),
}


@pytest.mark.parametrize("classification", [True, False], ids=["class_token", "no_class_token"])
@pytest.mark.parametrize("case", list(VIT_CASES))
def test_vit_equals_its_own_attention(case, classification):
    dims, proj, position, img_size, patch, sides = VIT_CASES[case]
    model = _sharpen(nets.ViT(in_channels=2, img_size=img_size, patch_size=patch, hidden_size=48, mlp_dim=32,
                              num_layers=2, num_heads=2, proj_type=proj, pos_embed_type=position,
                              classification=classification, spatial_dims=dims), 3.0)
    x = torch.randn(2, 2, *sides, generator=torch.Generator().manual_seed(1))
    maps = tensor_softmax_maps(model, x)
    rec, tokens = _record(model, x)
    assert rec.layers == ["blocks.0.attn", "blocks.1.attn"] and rec.skipped == {}
    grid = tuple(n // p for n, p in zip(sides, patch))
    _check_global(rec, tokens, maps, grid, tuple(float(p) for p in patch), int(classification))
    if dims == 3:
        assert rec.layout is None  # no plain ViT layout of two axes states a volume


@pytest.mark.parametrize("proj", ["conv", "perceptron"])
@pytest.mark.parametrize("dims", [2, 3])
def test_unetr_places_its_vit_on_the_grid_it_reads(dims, proj):
    sides = (48, 80) if dims == 2 else (32, 48, 16)
    model = _sharpen(nets.UNETR(in_channels=1, out_channels=2, img_size=sides, feature_size=12, hidden_size=32,
                                mlp_dim=32, num_heads=2, proj_type=proj, spatial_dims=dims), 3.0)
    x = torch.randn(1, 1, *sides, generator=torch.Generator().manual_seed(2))
    maps = tensor_softmax_maps(model, x)
    rec, tokens = _record(model, x)
    assert rec.layers == [f"vit.blocks.{i}.attn" for i in range(12)]
    # UNETR reads hidden states 3, 6, 9 and the last through proj_feat: viewed as [B, *feat_size, hidden], the
    # tokens row-major on the grid placed here.
    grid = tuple(model.feat_size)
    _check_global(rec, tokens, maps, grid, (16.0,) * dims, 0)
    hidden = torch.randn(1, math.prod(grid), 32)
    projected = model.proj_feat(hidden)
    for t, cell in enumerate(itertools.product(*(range(g) for g in grid))):
        assert torch.equal(projected[(0, slice(None), *cell)], hidden[0, t])


@pytest.mark.parametrize("dims", [2, 3])
def test_vitautoenc_places_its_grid_without_class_token(dims):
    # ViTAutoEnc: the ViT's patch embedding and blocks, no class token, then transposed convolutions of the grid.
    # Its patch must be a square number (the transposed convolutions undo it in two steps of its root). Sides
    # unequal, so that a transposed grid would show.
    sides = (36, 27, 18)[:dims]
    model = _sharpen(nets.ViTAutoEnc(in_channels=1, img_size=sides, patch_size=9, hidden_size=48, mlp_dim=32,
                                     num_layers=2, num_heads=2, spatial_dims=dims), 3.0)
    x = torch.randn(2, 1, *sides, generator=torch.Generator().manual_seed(5))
    maps = tensor_softmax_maps(model, x)
    rec, tokens = _record(model, x)
    assert rec.layers == ["blocks.0.attn", "blocks.1.attn"]
    _check_global(rec, tokens, maps, (4, 3, 2)[:dims], (9.0,) * dims, 0)


def _stage_table(sides, patch, window, depths):
    """Per block, (map sides, window, shift, stride): the rules of MONAI's PatchEmbed, get_window_size and
    PatchMerging as written in the module docstring."""
    table = []
    size = [math.ceil(n / patch) for n in sides]
    for stage, depth in enumerate(depths):
        win = [n if n <= w else w for n, w in zip(size, window)]
        half = [0 if n <= w else w // 2 for n, w in zip(size, window)]
        for block in range(depth):
            shift = half if block % 2 else [0] * len(size)
            table.append((tuple(size), tuple(win), tuple(shift), float(patch * 2 ** stage)))
        size = [math.ceil(n / 2) for n in size]
    return table


def _window_reference(probs: torch.Tensor, batch: int, size, window, shift, stride) -> dict[str, torch.Tensor]:
    """Per statistic ``[B, heads, prod(size)]`` per token row-major on the map, from ``[B * nW, heads, N, N]``."""
    padded = [math.ceil(n / w) * w for n, w in zip(size, window)]
    counts = [p // w for p, w in zip(padded, window)]
    cells = torch.tensor([[[(wa * w + j + s) % p for wa, j, w, s, p in zip(win_at, slot, window, shift, padded)]
                           for slot in itertools.product(*(range(w) for w in window))]
                          for win_at in itertools.product(*(range(c) for c in counts))])  # [nW, N, K]
    real = (cells < torch.tensor(size)).all(-1)
    centres = (cells.double() + 0.5) * stride
    heads, windows, slots = probs.shape[1], cells.shape[0], cells.shape[1]
    attn = probs.double().view(batch, windows, heads, slots, slots)
    per_slot = {"mad": (attn * torch.cdist(centres, centres)[None, :, None]).sum(-1),
                "entropy": -torch.special.xlogy(attn, attn).sum(-1),
                "prefix_mass": torch.zeros(attn.shape[:-1], dtype=torch.float64)}  # a padding key has a cell
    token = torch.zeros(cells.shape[:2], dtype=torch.long)
    for axis, side in enumerate(size):
        token = token * side + cells[..., axis]
    out = {}
    for name, values in per_slot.items():
        placed = torch.full((batch, heads, math.prod(size)), float("nan"), dtype=torch.float64)
        placed[:, :, token[real]] = values.permute(0, 2, 1, 3)[:, :, real]
        out[name] = placed
    assert not out["mad"].isnan().any()  # every token is the query of exactly one slot
    return out


def _check_windows(rec, tokens, maps, table, batch) -> None:
    assert len(maps) == len(table) == len(rec.layers)
    for layer, (probs, (size, window, shift, stride)) in enumerate(zip(maps, table, strict=True)):
        geometry = rec.geometry[layer]
        dims = len(size)
        if dims == 3:
            assert (geometry.depth, *geometry.grid) == size and geometry.depth_stride == stride
        else:
            assert geometry.grid == size and geometry.depth is None
        assert geometry.stride == (stride, stride)
        assert geometry.attention.startswith(f"window {'x'.join(map(str, window))}")
        assert ("shift" in geometry.attention) == any(shift)
        expected = _window_reference(probs, batch, size, window, shift, stride)
        assert float(expected["entropy"].mean()) < 0.75 * math.log(probs.shape[-1])
        torch.testing.assert_close(tokens.per_layer[layer].double(), expected["mad"], **TOL)
        torch.testing.assert_close(rec.per_layer[layer].double(), expected["mad"].mean(-1), **TOL)
        for stat in ("entropy", "prefix_mass"):
            torch.testing.assert_close(tokens.calls[-1].statistics[stat][layer].double(), expected[stat], **STAT_TOL)
        assert tokens.prefix_maps[layer] is None


def _swin_unetr(dims: int, window, **kwargs):
    torch.manual_seed(0)
    model = nets.SwinUNETR(in_channels=1, out_channels=2, feature_size=12, depths=(2, 2, 2, 2),
                           num_heads=(1, 2, 2, 2), window_size=window, spatial_dims=dims, **kwargs)
    return _sharpen(model, 3.0)


def _swin_maps(model, x) -> list[torch.Tensor]:
    with torch.no_grad(), SoftmaxOutputs(rank=4) as seen:
        model(x)
    return seen.maps


# (dims, window, input sides): SwinUNETR takes sides divisible by 32. 2-D windows of 7 pad 32 x 48 to 35 x 49 and
# shift by 3; the last stage's 4 x 6 map is one window, unshifted. 3-D windows of 3 x 4 x 5 on 16 x 16 x 32 maps.
SWIN_CASES = {
    "2d_window_7": (2, 7, (64, 96)),
    "2d_window_4x5": (2, (4, 5), (32, 96)),
    "3d_window_3x4x5": (3, (3, 4, 5), (32, 32, 64)),
}


@pytest.mark.parametrize("case", list(SWIN_CASES))
def test_swin_unetr_equals_its_own_windows(case):
    dims, window, sides = SWIN_CASES[case]
    model = _swin_unetr(dims, window)
    x = torch.randn(2, 1, *sides, generator=torch.Generator().manual_seed(3))
    maps = _swin_maps(model, x)
    rec, tokens = _record(model, x)
    assert rec.layers == [f"swinViT.layers{s}.0.blocks.{b}.attn" for s in range(1, 5) for b in range(2)]
    window = (window,) * dims if isinstance(window, int) else window
    table = _stage_table(sides, 2, window, (2, 2, 2, 2))
    if case == "2d_window_7":  # the table, by hand
        assert [row[:3] for row in table] == [
            ((32, 48), (7, 7), (0, 0)), ((32, 48), (7, 7), (3, 3)), ((16, 24), (7, 7), (0, 0)),
            ((16, 24), (7, 7), (3, 3)), ((8, 12), (7, 7), (0, 0)), ((8, 12), (7, 7), (3, 3)),
            ((4, 6), (4, 6), (0, 0)), ((4, 6), (4, 6), (0, 0))]
    _check_windows(rec, tokens, maps, table, 2)


def test_swin_transformer_alone_at_odd_sizes():
    # The bare Swin transformer (SwinUNETR's swinViT) takes any size: 51 x 69 pads to 52 x 70 (26 x 35 patches),
    # then mergings give 13 x 18, 7 x 9 and 4 x 5 (odd sides padded by one).
    model = _swin_unetr(2, (4, 6)).swinViT
    x = torch.randn(2, 1, 51, 69, generator=torch.Generator().manual_seed(4))
    maps = _swin_maps(model, x)
    rec, tokens = _record(model, x)
    table = _stage_table((51, 69), 2, (4, 6), (2, 2, 2, 2))
    assert [row[0] for row in table[::2]] == [(26, 35), (13, 18), (7, 9), (4, 5)]
    _check_windows(rec, tokens, maps, table, 2)


def _sdpa_maps(model, x) -> list[torch.Tensor]:
    """The float64 softmax of every ``scaled_dot_product_attention`` call's logits (``q k^T * scale + attn_mask``)
    in one forward: the attention the fused path applies."""
    maps, original = [], torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, dropout_p=0.0, scale=None, **kwargs):
        logits = q.double() @ k.double().transpose(-2, -1) * scale + attn_mask.double()
        maps.append(logits.softmax(-1))
        return original(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, scale=scale, **kwargs)

    with torch.no_grad(), pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
        model(x)
    return maps


def test_swin_sdpa_path_equals_its_own_attention():
    # use_flash_attention: scaled_dot_product_attention with the bias and the shift mask added, under no_grad.
    model = _swin_unetr(2, 7, use_flash_attention=True)
    x = torch.randn(2, 1, 64, 96, generator=torch.Generator().manual_seed(3))
    assert _swin_maps(model, x) == []  # no softmax of its own
    maps = _sdpa_maps(model, x)
    rec, tokens = _record(model, x)
    _check_windows(rec, tokens, maps, _stage_table((64, 96), 2, (7, 7), (2, 2, 2, 2)), 2)


def test_refuses_other_monai_attention():
    # (MaskedAutoEncoderViT is placed: test_record_monai_mae.py.)
    class Features(torch.nn.Module):  # a convolution, then MONAI's spatial attention over its map
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 32, 4, stride=4)
            self.attention = spatialattention.SpatialAttentionBlock(spatial_dims=2, num_channels=32,
                                                                    num_head_channels=16)

        def forward(self, x):
            return self.attention(self.conv(x))

    model = Features().eval()
    with torch.no_grad(), vitmad.record(model):
        with pytest.raises(ValueError, match=r"MONAI's SABlock in a SpatialAttentionBlock: vitmad places MONAI's "
                                             r"attention in ViT, UNETR, ViTAutoEnc, MaskedAutoEncoderViT, "
                                             r"SwinUNETR's SwinTransformer, and the feature maps of "
                                             r"DiffusionModelUNet"):
            model(torch.randn(1, 3, 16, 16))


class _OtherDownsample(torch.nn.Module):
    """A downsampling vitmad does not know (not MONAI's PatchMerging)."""

    def __init__(self, dim, norm_layer, spatial_dims):
        super().__init__()
        self.merge = swin_unetr.PatchMergingV2(dim, norm_layer, spatial_dims)

    def forward(self, x):
        return self.merge(x)


def test_swin_refuses_a_downsampling_it_does_not_know():
    model = _swin_unetr(2, 7, downsample=_OtherDownsample)
    with torch.no_grad(), vitmad.record(model):
        with pytest.raises(ValueError, match=r"layers2\.0\.blocks\.0\.attn .*stage 1 of MONAI's SwinTransformer "
                                             r"\(swinViT\) downsamples with _OtherDownsample"):
            model(torch.randn(1, 1, 64, 64))


def test_vit_blocks_called_on_hidden_states_are_refused():
    model = _sharpen(nets.ViT(in_channels=1, img_size=(32, 32), patch_size=8, hidden_size=32, mlp_dim=32,
                              num_layers=1, num_heads=2, spatial_dims=2), 1.0)
    with torch.no_grad(), vitmad.record(model):
        model(torch.randn(1, 1, 32, 32))
        with pytest.raises(ValueError, match=r"blocks\.0\.attn .*did not run .*before it attended"):
            model.blocks[0](torch.randn(1, 16, 32))


class _TwoTowers(torch.nn.Module):
    """A user's wrapper declaring a ViT before a Swin transformer and running them in ``order``."""

    def __init__(self, order: str):
        super().__init__()
        self.order = order
        self.vit = nets.ViT(in_channels=1, img_size=(16, 16), patch_size=4, hidden_size=32, mlp_dim=32, num_layers=1,
                       num_heads=4, spatial_dims=2)
        self.swin = swin_unetr.SwinTransformer(in_chans=1, embed_dim=8, window_size=(3, 3), patch_size=(2, 2),
                                    depths=(1, 1, 1, 1), num_heads=(2, 2, 2, 2), spatial_dims=2)

    def forward(self, x):
        return [self.vit(x)[0] if tower == "vit" else self.swin(x)[-1] for tower in self.order.split(",")]


@pytest.mark.parametrize("order", ["vit,swin", "swin,vit"])
def test_a_wrapper_of_two_towers_starts_each_call_at_the_recorded_towers_embedding(order):
    """Each forward call starts at the patch embedding of the tower recorded (the wrapper's first in module order
    recorded its calls split where the other tower's embedding ran: with the Swin run first, three calls of 4, 4 and
    0 layers for two forwards, QA helper-153); layers named in both towers are refused (which runs first is not
    known); one recording per tower gives each its values."""
    torch.manual_seed(0)
    model = _sharpen(_TwoTowers(order).eval(), 4.0)
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), vitmad.record(model.swin) as alone:
        model.swin(x)
    with torch.no_grad(), vitmad.record(model) as rec:
        model(x)
        model(x)
    assert [len(call.layers) for call in rec.calls] == [4, 4] and all(name.startswith("swin.") for name in rec.layers)
    for call in rec.calls:
        torch.testing.assert_close(call.mad, alone.mad, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"the layers recorded lie in 2 MONAI towers of _TwoTowers \(vit, swin\)"):
        with vitmad.record(model, layers=["vit.blocks.*.attn", "swin.*.attn"]):
            model(x)
    with torch.no_grad(), vitmad.record(model.vit) as vit, vitmad.record(model.swin) as swin:
        model(x)
    torch.testing.assert_close(swin.mad, alone.mad, rtol=0, atol=0)
    with torch.no_grad(), vitmad.record(model.vit) as vit_alone:
        model.vit(x)
    torch.testing.assert_close(vit.mad, vit_alone.mad, rtol=0, atol=0)


def test_temporal_mad_of_a_volume_says_its_slices_are_space_not_frames():
    """QA 392: asking a volume's recording for temporal_mad said its layers "attend over images without frames";
    a volume's first axis is space (docs/definition.md, volumes), and the refusal says so."""
    model = nets.ViT(in_channels=1, img_size=(8, 16, 16), patch_size=(4, 8, 8), hidden_size=32, mlp_dim=16,
                     num_layers=2, num_heads=2, spatial_dims=3).eval()
    with torch.no_grad(), vitmad.record(model) as rec:
        model(torch.randn(1, 1, 8, 16, 16))
    assert [g.depth for g in rec.geometry] == [2, 2]
    with pytest.raises(ValueError, match=r"temporal_mad is defined for video layers only; of the recorded layers, 2 "
                                         r"attend over a volume's slices, an axis of space, not frames "
                                         r"\(blocks\.0\.attn, blocks\.1\.attn\)$"):
        _ = rec.temporal_mad
