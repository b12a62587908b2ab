"""vitmad.record on timm layouts that no other test ran (QA helper h386 checked them by hand on timm 1.0.31): CrossViT
with ``crop_scale=True``, NaFlexViT with its factorised position embedding (``parfac``), EVA with mixed RoPE and with
``rope_grid_indexing="xy"`` at non-square sizes, ViT with a shared relative position MLP (``vit_srelpos``) and BEiTv2.

The geometry is written here from timm's source:

- CrossViT's ``scale_image``: a branch of ``s_h x s_w`` px takes a centre crop of the input where both its sides fit
  (its cells keep the patch's pixels: a crop only shifts them, which no distance sees), else the input interpolated
  to its size (per axis, a cell covers ``patch * input / branch`` px of the input). Each branch: its class token,
  then its grid row-major.
- NaFlexViT: ``patchify_image`` cuts each image into its row-major grid; ``parfac`` puts 4 registers (no class token)
  first; the padding slots are masked keys and no query.
- EVA and the relative-position ViTs: the class token (none for ``vit_srelpos``), then the grid row-major; RoPE and
  relative position biases change the attention, never the token order.

Tiny random-weight models, sharpened so that attention is far from uniform. The reference is each module's own
attention: the softmax of its SDPA's q and k in float64 (conftest ``sdpa_probabilities``), or its unfused path's
softmax, placed by that geometry and reduced by conftest's ``statistics_reference``.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from conftest import (
    FLOAT32_STAT_ATOL,
    check_prefix_and_grid,
    grid_centres,
    record_both_reductions,
    sdpa_probabilities,
    sharpened,
    statistics_reference,
    unfused_maps,
)

timm = pytest.importorskip("timm")
# timm's patchify_image per image, padded as NaFlexCollator pads (random images of seed 1).
from test_record_naflex import PATCH as NAFLEX_PATCH  # noqa: E402
from test_record_naflex import _images, _naflex_batch  # noqa: E402

STATS = ["entropy", "prefix_mass", "prefix_maps"]
SMALL = dict(depth=2, embed_dim=32, num_heads=2)
# MADs (pixels) from float32 attention against float64 on the same model's float32 q / k or probabilities.
TOL = {"rtol": 1e-5, "atol": 1e-4}
STAT_TOL = {"rtol": 1e-5, "atol": FLOAT32_STAT_ATOL}


def _placed(prefix: int, grid: tuple[int, int], stride: tuple[float, float]) -> torch.Tensor:
    """``[prefix + h * w, 2]`` px: ``prefix`` tokens without a position (NaN), then the row-major grid's cell centres
    ``((r + 0.5) * stride_y, (c + 0.5) * stride_x)``."""
    return torch.cat([torch.full((prefix, 2), math.nan, dtype=torch.float64),
                      grid_centres(grid, 1.0) * torch.tensor(stride, dtype=torch.float64)])


def _check_values(mean: dict, tokens: dict, probabilities: torch.Tensor, positions: torch.Tensor) -> None:
    """One layer's (or one image's) recorded means and per-query values, by statistic (``"mad"``, ``"entropy"``,
    ``"prefix_mass"``), against :func:`statistics_reference` of ``probabilities`` ``[B, H, N, N]`` at
    ``positions``."""
    expected = statistics_reference(probabilities, positions)
    # Far from uniform attention: a token placed at a wrong cell would change the MAD.
    assert float(expected["entropy"].mean()) < 0.75 * math.log(probabilities.shape[-1])
    for stat, close in (("mad", TOL), ("entropy", STAT_TOL), ("prefix_mass", STAT_TOL)):
        torch.testing.assert_close(tokens[stat].double(), expected[stat], **close)
        torch.testing.assert_close(mean[stat].double(), expected[stat].mean(-1), **close)


def _layer_values(rec, layer: int) -> dict:
    """Layer ``layer``'s values of the latest call by statistic, read per layer: CrossViT's branches have grids and
    head counts of their own, NaFlex images grids of their own."""
    call = rec.calls[-1]
    return {"mad": call.per_layer[layer], **{stat: call.statistics[stat][layer] for stat in ("entropy", "prefix_mass")}}


# CrossViT with crop_scale ----------------------------------------------------------------------------------------

# Branches of 96 and 64 px (img_size 96, img_scale (1, 2/3)), patches of 8 and 16 px: grids 12 x 12 and 4 x 4.
CROSSVIT_GRIDS = [(12, 12), (4, 4)]
# Input size -> each branch's cell in pixels of the input.
CROSSVIT_STRIDES = {
    (128, 128): [(8.0, 8.0), (16.0, 16.0)],  # both fit: both cropped
    (80, 80): [(8 * 80 / 96, 8 * 80 / 96), (16.0, 16.0)],  # branch 0 does not fit: upsampled; branch 1 cropped
    (112, 72): [(8 * 112 / 96, 8 * 72 / 96), (16.0, 16.0)],  # 72 px wide < 96: branch 0 resized per axis
}


@pytest.mark.parametrize("size", list(CROSSVIT_STRIDES), ids=lambda s: f"{s[0]}x{s[1]}")
def test_crossvit_crop_scale_places_a_cropped_branch_at_its_patch_and_a_resized_one_per_axis(size):
    torch.manual_seed(0)
    model = sharpened(timm.create_model(
        "crossvit_tiny_240", pretrained=False, img_size=96, img_scale=(1.0, 64 / 96), patch_size=[8, 16],
        depth=((1, 1, 0),), embed_dim=(16, 32), num_heads=(1, 2), crop_scale=True))
    with torch.no_grad():  # branch 0 is 16 wide, one head: std 0.25 leaves it near uniform (entropy 0.92 ln N)
        for block in (model.blocks[0].blocks[0][0], model.blocks[0].blocks[1][0]):
            block.attn.qkv.weight.normal_(std=0.5)
    pixels = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1))
    rec, rec_tokens = record_both_reductions(model, lambda m: m(pixels), lambda out: out, STATS)
    # The branches' blocks call SDPA, in branch order; the fusion's cross-attention takes its own softmax.
    maps = sdpa_probabilities(lambda: model(pixels))
    assert rec.layers == ["blocks.0.blocks.0.0.attn", "blocks.0.blocks.1.0.attn"] and len(maps) == 2
    assert set(rec.skipped) == {"blocks.0.fusion.0.attn", "blocks.0.fusion.1.attn"}
    for layer, (probabilities, grid, stride) in enumerate(zip(maps, CROSSVIT_GRIDS, CROSSVIT_STRIDES[size])):
        geometry = rec.geometry[layer]
        assert geometry.grid == grid and geometry.stride == pytest.approx(stride)
        assert geometry.num_prefix_tokens == 1
        positions = _placed(1, grid, stride)
        _check_values(_layer_values(rec, layer), _layer_values(rec_tokens, layer), probabilities, positions)
        torch.testing.assert_close(rec.prefix_maps[layer].double(), probabilities[:, :, :1, 1:], **STAT_TOL)


# NaFlexViT with a factorised position embedding -----------------------------------------------------------------

# Images as the processor resized them, (height, width) px: grids 2 x 3, 3 x 2 and 1 x 7, in 8 slots each.
NAFLEX_SIZES = [(16, 24), (24, 16), (8, 56)]
NAFLEX_SLOTS = 8
NAFLEX_PREFIX = 4  # parfac: 4 registers, no class token


def test_naflex_factorised_position_embedding_places_each_image_on_its_own_grid():
    torch.manual_seed(0)
    model = sharpened(timm.create_model("naflexvit_base_patch16_parfac_gap", pretrained=False, **SMALL,
                                        patch_size=NAFLEX_PATCH))
    assert model.embeds.pos_embed_y is not None and model.embeds.pos_embed_x is not None  # the factorised form
    inputs = _naflex_batch(_images(NAFLEX_SIZES), NAFLEX_SLOTS)
    grids = [(h // NAFLEX_PATCH, w // NAFLEX_PATCH) for h, w in NAFLEX_SIZES]
    rec, rec_tokens = record_both_reductions(model, lambda m: m(inputs), lambda out: out, STATS)
    maps = sdpa_probabilities(lambda: model(inputs))
    assert rec.layers == ["blocks.0.attn", "blocks.1.attn"] and len(maps) == 2 and rec.skipped == {}
    longest = max(h * w for h, w in grids)
    for layer, probabilities in enumerate(maps):
        geometry = rec.geometry[layer]
        assert geometry.grid is None and geometry.image_grids == tuple(grids)
        assert geometry.stride == (NAFLEX_PATCH, NAFLEX_PATCH) and geometry.num_prefix_tokens == NAFLEX_PREFIX
        mean, tokens = _layer_values(rec, layer), _layer_values(rec_tokens, layer)
        for image, (h, w) in enumerate(grids):
            n = NAFLEX_PREFIX + h * w
            # The padding slots after an image's tokens are masked keys: its rows end at its own tokens.
            assert float(probabilities[image, :, :n, n:].sum()) == 0
            own = probabilities[image:image + 1, :, :n, :n]
            assert tokens["mad"].shape[-1] == longest and tokens["mad"][image, :, h * w:].isnan().all()
            _check_values({stat: values[image:image + 1] for stat, values in mean.items()},
                          {stat: values[image:image + 1, :, :h * w] for stat, values in tokens.items()},
                          own, _placed(NAFLEX_PREFIX, (h, w), (NAFLEX_PATCH, NAFLEX_PATCH)))
            torch.testing.assert_close(rec.prefix_maps[layer][image, :, :, :h * w].double(),
                                       own[0, :, :NAFLEX_PREFIX, NAFLEX_PREFIX:], **STAT_TOL)


# EVA RoPE at non-square sizes, relative position ViTs ------------------------------------------------------------

# name -> (model name, create kwargs, input (height, width), grid, patch, prefix tokens)
GLOBAL_LAYOUTS = {
    # RoPE-Mixed: learned frequencies mixing both axes; built non-square, 6 x 4.
    "eva_rope_mixed": ("vit_small_patch16_rope_mixed_224", dict(img_size=(48, 32), patch_size=8), (48, 32), (6, 4),
                       8, 1),
    # RoPE indexed x then y, built 4 x 4 and run at 5 x 9 (dynamic size).
    "eva_rope_xy": ("eva02_tiny_patch14_224", dict(img_size=28, patch_size=7, dynamic_img_size=True,
                                                   rope_grid_indexing="xy"), (35, 63), (5, 9), 7, 1),
    # A relative position MLP shared by every block, no class token.
    "vit_srelpos": ("vit_srelpos_small_patch16_224", dict(img_size=(24, 40), patch_size=8), (24, 40), (3, 5), 8, 0),
    # BEiTv2: a relative position bias table per block, with an absolute embedding too.
    "beitv2": ("beitv2_base_patch16_224", dict(img_size=(32, 24), patch_size=8, use_abs_pos_emb=True), (32, 24),
               (4, 3), 8, 1),
}
# The attention class of each, for its unfused path.
ATTENTION_CLASS = {"eva_rope_mixed": "AttentionRope", "eva_rope_xy": "EvaAttention",
                   "vit_srelpos": "RelPosAttention", "beitv2": "Attention"}


@pytest.mark.parametrize("fused", [True, False], ids=["sdpa", "eager"])
@pytest.mark.parametrize("family", list(GLOBAL_LAYOUTS))
def test_global_attention_with_rope_or_relative_positions_on_a_non_square_grid(family, fused):
    name, kwargs, size, grid, patch, prefix = GLOBAL_LAYOUTS[family]
    torch.manual_seed(0)
    model = sharpened(timm.create_model(name, pretrained=False, **SMALL, **kwargs))
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = fused
    pixels = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1))
    rec, rec_tokens = record_both_reductions(model, lambda m: m(pixels), lambda out: out, STATS)
    if fused:
        maps = sdpa_probabilities(lambda: model(pixels))
    else:
        eager = copy.deepcopy(model)
        calls = unfused_maps(eager, ATTENTION_CLASS[family])
        with torch.no_grad():
            eager(pixels)
        maps = [probabilities for _, probabilities in calls]
    assert rec.layers == ["blocks.0.attn", "blocks.1.attn"]
    check_prefix_and_grid(rec, rec_tokens, maps, grid, float(patch), prefix)
