"""vitmad.record on timm's ConViT (gated positional self-attention, then plain MHSA with a CLS token) and SHViT
(single-head attention over a stage's map, ``[B, N, N]`` without a head dimension).

References: each model's own eager attention (ConViT: the input of each block's ``attn_drop``, the attention it
applies; SHViT: its softmax output), placed by the geometry written here: ConViT's 8-pixel patch grid with no
token before it in the gated blocks and a CLS token after them; SHViT's stage maps of stride 32 and 64 (a 16-pixel
stem, then 2x downsampling per stage), each token at the centre of its cell."""

from __future__ import annotations

import copy

import pytest
import torch

import vitmad
from vitmad.ops.reference import mad_positions_reference, mad_reference

timm = pytest.importorskip("timm")

TOL = {"rtol": 1e-5, "atol": 1e-4}  # pixels: float32 attention against the float64 reference
STAT_TOL = {"rtol": 2e-5, "atol": 2e-6}


def _unit_gain(model: torch.nn.Module, qk_factor: float) -> None:
    """Weights of unit gain and scaled query/key projections: attention far from uniform, so a misplaced token
    changes the MAD (timm draws weights with std 0.02, which leaves it near uniform)."""
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
                module.weight.normal_(0.0, module.weight[0].numel() ** -0.5)
                if name.endswith(("qk", "qkv", "qkv.c")):
                    module.weight.mul_(qk_factor)


def test_convit_gated_and_plain_blocks_equal_the_applied_attention():
    torch.manual_seed(0)
    model = timm.create_model("convit_tiny", pretrained=False, img_size=32, patch_size=8, embed_dim=32, depth=3,
                              num_heads=2, local_up_to_layer=2).eval()
    _unit_gain(model, 3.0)
    with torch.no_grad():
        for block in model.blocks[:2]:
            block.attn.gating_param.fill_(0.0)  # half content, half positional attention: both parts matter
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = model(pixels)
        with vitmad.record(model, stats=["entropy", "prefix_mass"], reduction="none") as rec:
            recorded = model(pixels)
    torch.testing.assert_close(recorded, plain, rtol=0, atol=0)
    assert rec.layers == ["blocks.0.attn", "blocks.1.attn", "blocks.2.attn"]

    eager = copy.deepcopy(model)
    maps = []
    for block in eager.blocks:
        block.attn.attn_drop.register_forward_pre_hook(lambda _, args: maps.append(args[0].double()))
    with torch.no_grad():
        eager(pixels)
    # The gated blocks mix two softmax maps: their rows are still distributions, not either softmax alone.
    assert all(torch.allclose(a.sum(-1), torch.ones(()).double()) for a in maps)
    for layer, (a, prefix) in enumerate(zip(maps, (0, 0, 1))):  # the CLS token joins after local_up_to_layer
        expected = mad_reference(a, 8, num_prefix_tokens=prefix, grid=(4, 4), reduction="none")
        torch.testing.assert_close(rec.per_layer[layer].double(), expected, **TOL)
        rows = a[..., prefix:, :]
        torch.testing.assert_close(rec.stats["entropy"][layer].double(),
                                   -torch.special.xlogy(rows, rows).sum(-1), **STAT_TOL)
        torch.testing.assert_close(rec.stats["prefix_mass"][layer].double(), rows[..., :prefix].sum(-1),
                                   **STAT_TOL)


def _softmax_outputs(model, pixels) -> list[torch.Tensor]:
    """Every softmax output of rank 3 of one eager forward, in call order."""
    maps = []
    original = torch.Tensor.softmax

    def softmax(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        if result.dim() == 3:
            maps.append(result.double())
        return result

    torch.Tensor.softmax = softmax
    try:
        with torch.no_grad():
            model(pixels)
    finally:
        torch.Tensor.softmax = original
    return maps


def _cells(grid_h: int, grid_w: int, stride: float) -> torch.Tensor:
    rows = (torch.arange(grid_h, dtype=torch.float64) + 0.5) * stride
    cols = (torch.arange(grid_w, dtype=torch.float64) + 0.5) * stride
    return torch.cartesian_prod(rows, cols)


def test_shvit_single_head_stage_maps_in_pixels():
    torch.manual_seed(0)
    model = timm.create_model("shvit_s1", pretrained=False, embed_dim=(16, 24, 32), partial_dim=(8, 8, 8),
                              qk_dim=(8, 8, 8), depth=(1, 1, 1), types=("i", "s", "s")).eval()
    _unit_gain(model, 2.0)
    pixels = torch.randn(2, 3, 128, 96, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = model(pixels)
        with vitmad.record(model, reduction="none") as rec:
            recorded = model(pixels)
    torch.testing.assert_close(recorded, plain, rtol=0, atol=0)
    assert rec.layers == ["stages.1.blocks.0.mixer.m", "stages.2.blocks.0.mixer.m"]
    maps = _softmax_outputs(copy.deepcopy(model), pixels)
    # Stage 1: 128 x 96 px / 32 = 4 x 3 tokens; stage 2: / 64 = 2 x 2 (rounded up by the padded convolutions).
    for layer, (a, grid, stride) in enumerate(zip(maps, ((4, 3), (2, 2)), (32.0, 64.0))):
        assert a.shape == (2, grid[0] * grid[1], grid[0] * grid[1])
        expected = mad_positions_reference(a, _cells(*grid, stride), reduction="none")
        torch.testing.assert_close(rec.per_layer[layer][:, 0].double(), expected, **TOL)
        assert rec.geometry[layer].grid == grid and rec.geometry[layer].stride == (stride, stride)
        assert rec.geometry[layer].heads == 1
