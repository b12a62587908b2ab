"""vitmad.record on EoMT (``EomtForUniversalSegmentation``), EoMT-DINOv3 (``EomtDinov3ForUniversalSegmentation``)
and VidEoMT (``VideomtForUniversalSegmentation``), eager and SDPA, against each model's own eager probabilities.

The geometry, from the modeling files: the embeddings make ``[CLS, R registers, patches]``
(``torch.cat([cls_tokens, register_tokens, embeddings])``), the patches row-major on the grid the ``p``-pixel patch
projection cuts (``floor(H / p) x floor(W / p)``); before block ``num_hidden_layers - num_blocks`` the forward puts the
``Q`` learned queries first (``torch.cat((query, hidden_states), dim=1)``), so from that block on a block attends over
``[Q queries, CLS, R registers, patches]``. Patch ``(r, c)`` sits at ``((r + 0.5) p, (c + 0.5) p)``; the queries, the
CLS and the registers have no position (their rows, in token order, are the prefix maps).

The query blocks' mask (written by the forward, read by vitmad where the attention interface receives it): in
training mode, or in eval mode where the block's ``attn_mask_probs`` is above 0, each query attends to the patches
under its predicted mask, some queries drawn at random to see every patch where the probability is below 1; a query
block whose probability is 0 in eval mode reuses the mask of the block before it. The cases below run without a mask
(annealed), with a fresh mask at each query block (the second with random queries unmasked), with a stale mask, and
in training mode (a mask at every query block; EoMT-DINOv3 also draws random shifts and scales of its RoPE
coordinates). The seed is set before every forward, so the random draws are the same in each.

Sizes: 100 x 100 px (a 6 x 6 grid of 16 px patches; 4 px past the last patch dropped) and 72 x 150 px (a 4 x 9 grid,
which has the 36 patches of the models' 96 px config: EoMT's position table and the mask head's reshape take it).

VidEoMT runs the ``F`` frames of ``B`` videos as ``B * F`` images (frame ``f`` of video ``b`` is image ``b * F + f``)
through the blocks before the queries, then each query block once per frame over that frame of every video, without
a mask: every layer's values are ``[B * F, H, T]`` in that order, each frame on its own grid.
"""

from __future__ import annotations

import pytest
import torch

import vitmad
from conftest import eager_attention_calls, record_both_reductions, sharpened

transformers = pytest.importorskip("transformers")

TOL = {"rtol": 1e-5, "atol": 1e-4}  # float32 probabilities, float32 accumulation in the ops
STATS = ["entropy", "prefix_mass", "self_mass", "prefix_maps"]
HEADS, BATCH, PATCH, QUERIES, REGISTERS, LAYERS, QUERY_BLOCKS = 2, 2, 16, 5, 2, 5, 2
FIRST_QUERY_BLOCK = LAYERS - QUERY_BLOCKS
CONFIG = dict(hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=HEADS, image_size=96, patch_size=PATCH,
              num_blocks=QUERY_BLOCKS, num_queries=QUERIES, num_register_tokens=REGISTERS, num_labels=3)
# name -> (modeling module, model class, config class, extra config)
FAMILIES = {
    "eomt": ("eomt", "EomtForUniversalSegmentation", "EomtConfig", {}),
    "eomt_dinov3": ("eomt_dinov3", "EomtDinov3ForUniversalSegmentation", "EomtDinov3Config",
                    {"intermediate_size": 64}),
}
VIDEO = ("videomt", "VideomtForUniversalSegmentation", "VideomtConfig", {})
# name -> (image height, image width, grid)
SIZES = {"square-100": (100, 100, (6, 6)), "non-square-72x150": (72, 150, (4, 9))}
# name -> (training mode, attn_mask_probs of the two query blocks)
MASKS = {"annealed": (False, [0.0, 0.0]), "masked": (False, [1.0, 0.5]), "stale": (False, [1.0, 0.0]),
         "training": (True, [0.5, 1.0])}


def _modeling(name: str):
    return pytest.importorskip(f"transformers.models.{name}.modeling_{name}")


def _model(name: str, implementation: str) -> torch.nn.Module:
    """A tiny model, sharpened (conftest), with random register tokens (zeros at init: a register misplaced among
    them would not show)."""
    module, model_class, config_class, extra = FAMILIES[name] if name in FAMILIES else VIDEO
    config = getattr(transformers, config_class)(**CONFIG, **extra)
    torch.manual_seed(0)
    model = getattr(_modeling(module), model_class)._from_config(config, attn_implementation=implementation)
    sharpened(model)
    with torch.no_grad():
        model.embeddings.register_tokens.normal_()
    return model


def _outputs(out) -> torch.Tensor:
    return torch.cat([out.masks_queries_logits.flatten(), out.class_queries_logits.flatten()])


def _seeded(inputs: dict):
    """A forward with the seed set first: the masks' random queries and the RoPE's random coordinates drawn alike in
    every run."""

    def run(model):
        torch.manual_seed(1)
        return model(**inputs)

    return run


def _reference(probabilities: torch.Tensor, extra: int, grid: tuple[int, int]) -> dict[str, torch.Tensor]:
    """Per statistic, ``[B, H, T]`` per patch, and the prefix maps ``[B, H, extra, T]``, from probabilities
    ``[B, H, N, N]`` over ``[extra tokens, patches row-major]``."""
    cells = grid[0] * grid[1]
    assert probabilities.shape[-1] == extra + cells
    index, others = torch.arange(extra, extra + cells), torch.arange(extra)
    rows, cols = torch.meshgrid(torch.arange(grid[0], dtype=torch.float64),
                                torch.arange(grid[1], dtype=torch.float64), indexing="ij")
    centres = torch.stack([(rows.flatten() + 0.5) * PATCH, (cols.flatten() + 0.5) * PATCH], -1)
    patch_rows = probabilities[:, :, index]
    on_grid = patch_rows[..., index]
    return {
        "mad": (on_grid * torch.cdist(centres, centres)).sum(-1),  # the mass off the grid drops out
        "entropy": -torch.special.xlogy(patch_rows, patch_rows).sum(-1),
        "prefix_mass": patch_rows[..., others].sum(-1),
        "self_mass": on_grid.diagonal(dim1=-2, dim2=-1),
        "prefix_maps": probabilities[:, :, others][..., index],
    }


def _check(rec, rec_tokens, per_layer: list[torch.Tensor], grid: tuple[int, int], images: int) -> None:
    """Every layer of both recordings against its probabilities ``[images, H, N, N]``: the blocks before the queries
    over ``1 + R`` extra tokens, the query blocks over ``Q + 1 + R``."""
    assert rec.layers == rec_tokens.layers == [f"layers.{i}.attention" for i in range(LAYERS)]
    assert rec.skipped == {} and len(per_layer) == LAYERS
    for layer, probabilities in enumerate(per_layer):
        extra = 1 + REGISTERS + (QUERIES if layer >= FIRST_QUERY_BLOCK else 0)
        expected = _reference(probabilities, extra, grid)
        geometry = rec.geometry[layer]
        assert (geometry.grid, geometry.stride, geometry.heads, geometry.num_prefix_tokens) == (
            grid, (float(PATCH), float(PATCH)), HEADS, extra)
        assert rec.per_layer[layer].shape == (images, HEADS)
        for stat, values in expected.items():
            if stat == "prefix_maps":
                torch.testing.assert_close(rec.prefix_maps[layer].double(), values, **TOL)
                torch.testing.assert_close(rec_tokens.prefix_maps[layer].double(), values, **TOL)
                continue
            mean = rec.per_layer[layer] if stat == "mad" else rec.stats[stat][layer]
            tokens = rec_tokens.per_layer[layer] if stat == "mad" else rec_tokens.stats[stat][layer]
            torch.testing.assert_close(mean.double(), values.mean(-1), **TOL)
            torch.testing.assert_close(tokens.double(), values, **TOL)


def _eager_per_layer(name: str, model: torch.nn.Module, run_inputs: dict) -> list[torch.Tensor]:
    """The eager probabilities of each call, float64, in call order (the model switched to eager attention, the
    seed set first as in the recorded forwards)."""
    torch.manual_seed(1)
    return [p for _, p in eager_attention_calls(_modeling(name), model, **run_inputs)]


def _check_query_mask(probabilities: torch.Tensor, masked: bool, cells: int) -> None:
    """The query rows over the patches hold exact zeros where the model's mask hides a patch (and only then: the
    sharpened softmax leaves no other probability at 0)."""
    over_patches = probabilities[:, :, :QUERIES, -cells:]
    hidden = over_patches == 0
    assert bool(hidden.any()) == masked and bool((~hidden).any())
    if masked:  # patches, CLS and registers see every token
        assert bool((probabilities[:, :, QUERIES:] > 0).all())


@pytest.mark.parametrize("mask", list(MASKS), ids=list(MASKS))
@pytest.mark.parametrize("size", list(SIZES.values()), ids=list(SIZES))
@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("name", list(FAMILIES))
def test_image_models_match_their_own_attention(name, implementation, size, mask):
    """Every block, before and after the queries join, under the mask the model applies: MAD, entropy, prefix and
    self mass per patch and the prefix maps (queries, CLS, registers) against the model's own eager probabilities
    placed by the geometry above; the outputs bit-identical with and without recording."""
    image_h, image_w, grid = size
    training, probabilities = MASKS[mask]
    model = _model(name, implementation)
    model.attn_mask_probs.copy_(torch.tensor(probabilities))
    model.train(training)
    inputs = {"pixel_values": torch.randn(BATCH, 3, image_h, image_w)}
    rec, rec_tokens = record_both_reductions(model, _seeded(inputs), _outputs, STATS)
    per_layer = _eager_per_layer(name, model, inputs)
    masked = training or mask != "annealed"
    for probabilities in per_layer[FIRST_QUERY_BLOCK:]:
        _check_query_mask(probabilities, masked, grid[0] * grid[1])
    _check(rec, rec_tokens, per_layer, grid, BATCH)


FRAMES = 3


@pytest.mark.parametrize("size", list(SIZES.values()), ids=list(SIZES))
@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_video_model_places_each_frame_as_an_image(implementation, size):
    """VidEoMT: the blocks before the queries over the ``B * F`` frames at once, each query block once per frame (its
    forwards one layer, recorded when the last ends): every layer ``[B * F, H]``, frame ``f`` of video ``b`` at image
    ``b * F + f``, against the eager probabilities of each call put in that order."""
    image_h, image_w, grid = size
    model = _model("videomt", implementation)
    inputs = {"pixel_values_videos": torch.randn(BATCH, FRAMES, 3, image_h, image_w)}
    rec, rec_tokens = record_both_reductions(model, _seeded(inputs), lambda out: out.masks_queries_logits, STATS)
    calls = _eager_per_layer("videomt", model, inputs)
    # Blocks 0..2 once over the B * F frames, then blocks 3, 4 for frame 0, for frame 1, ...
    assert len(calls) == FIRST_QUERY_BLOCK + FRAMES * QUERY_BLOCKS
    per_layer = calls[:FIRST_QUERY_BLOCK]
    assert all(p.shape[0] == BATCH * FRAMES for p in per_layer)
    for block in range(QUERY_BLOCKS):
        frames = calls[FIRST_QUERY_BLOCK + block::QUERY_BLOCKS]
        assert all(p.shape[0] == BATCH for p in frames)
        per_layer.append(torch.stack(frames, dim=1).flatten(0, 1))  # [B, F, ...] -> image b * F + f
    for probabilities in per_layer[FIRST_QUERY_BLOCK:]:
        _check_query_mask(probabilities, False, grid[0] * grid[1])
    _check(rec, rec_tokens, per_layer, grid, BATCH * FRAMES)


def test_a_video_forward_that_raises_between_frames_leaves_no_half_layer():
    """A VidEoMT forward that raises after some frames' query blocks (the forwards of a layer waiting for the rest)
    leaves no call, and the next forward is recorded as in a recording of its own, bit for bit."""
    model = _model("videomt", "sdpa")
    videos = torch.randn(BATCH, FRAMES, 3, 96, 96)
    with torch.no_grad(), vitmad.record(model, stats=STATS) as alone:
        model(pixel_values_videos=videos)
    seen = []

    def fail_at_last_frame(module, args):
        seen.append(1)
        if len(seen) == FRAMES - 1:  # the query updater runs before frames 1, 2, ...
            raise RuntimeError("stopped at the last frame")

    handle = model.query_updater.register_forward_pre_hook(fail_at_last_frame)
    with torch.no_grad(), vitmad.record(model, stats=STATS) as rec:
        with pytest.raises(RuntimeError, match="stopped at the last frame"):
            model(pixel_values_videos=videos)
        assert rec.calls == []
        handle.remove()
        model(pixel_values_videos=videos)
    assert len(rec.calls) == 1 and rec.layers == alone.layers
    assert torch.equal(rec.mad, alone.mad) and torch.equal(rec.stats["entropy"], alone.stats["entropy"])
    assert all(torch.equal(a, b) for a, b in zip(rec.prefix_maps, alone.prefix_maps, strict=True))


def test_each_call_is_placed_on_its_own_grid():
    """Two sizes in one recording: each call on the grid its patch projection cut, against its own probabilities."""
    model = _model("eomt_dinov3", "sdpa")
    sizes = list(SIZES.values())
    images = [torch.randn(1, 3, h, w) for h, w, _ in sizes]
    with torch.no_grad(), vitmad.record(model, stats=STATS) as rec:
        for pixels in images:
            model(pixel_values=pixels)
    assert len(rec.calls) == 2
    for call, pixels, (_, _, grid) in zip(rec.calls, images, sizes, strict=True):
        per_layer = _eager_per_layer("eomt_dinov3", model, {"pixel_values": pixels})
        for layer, probabilities in enumerate(per_layer):
            extra = 1 + REGISTERS + (QUERIES if layer >= FIRST_QUERY_BLOCK else 0)
            expected = _reference(probabilities, extra, grid)
            assert call.geometry[layer].grid == grid
            torch.testing.assert_close(call.per_layer[layer].double(), expected["mad"].mean(-1), **TOL)
            torch.testing.assert_close(call.prefix_maps[layer].double(), expected["prefix_maps"], **TOL)
        model.set_attn_implementation("sdpa")


@pytest.mark.parametrize("block", [1, FIRST_QUERY_BLOCK], ids=["before-queries", "query-block"])
def test_a_sequence_of_another_layout_is_refused(block):
    """A token appended to a block's sequence (a user's hook) is refused with the sequence the forward built, never
    placed as if it were one of the extra tokens; a block run on its own, outside a forward of the model, is refused
    too (the queries join the sequence there)."""
    model = _model("eomt", "sdpa")
    model.attn_mask_probs.zero_()  # no mask, whose shape the longer sequence would not fit
    pixels = torch.randn(1, 3, 96, 96)
    handle = model.layers[block].register_forward_pre_hook(
        lambda module, args: (torch.cat([args[0], args[0][:, :1]], dim=1), *args[1:]))
    expected = r"the CLS, 2 registers and the 6x6 patches of 1 images"
    expected = rf"after 5 learned queries \(from block 3\), {expected}" if block >= FIRST_QUERY_BLOCK else \
        f"after {expected}"
    with torch.no_grad(), vitmad.record(model):
        with pytest.raises(ValueError, match=rf"layers\.{block}\.attention \(EomtAttention\).*{expected}"):
            model(pixel_values=pixels)
    handle.remove()
    hidden = torch.randn(1, QUERIES + 1 + REGISTERS + 36, 32)
    with torch.no_grad(), vitmad.record(model):
        model(pixel_values=pixels)
        with pytest.raises(ValueError, match=r"ran outside a forward of EomtForUniversalSegmentation"):
            model.layers[block](hidden)
