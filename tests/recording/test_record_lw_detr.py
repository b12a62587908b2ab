"""vitmad.record on LW-DETR's ViT backbone (transformers ``LwDetrViTBackbone``), against its own eager attention.

The reference places the tokens by the geometry written here: the backbone cuts its patch map into ``S x S``
windows, windows row-major and each window's tokens row-major, and keeps that order in every block. A window block
attends within each window (``[B * S * S, H, n, n]``, image-major); a global block over all of an image's tokens in
that window-major order (``[B, H, S * S * n, ...]``). Token (window ``(a, b)``, ``(i, j)`` in it) is the cell
``(a * wh + i, b * ww + j)``, centred at ``((row + 0.5) * p, (col + 0.5) * p)`` pixels. MAD in float64 per query,
averaged over the image's tokens.
"""

from __future__ import annotations

import importlib

import pytest
import torch

transformers = pytest.importorskip("transformers")

import vitmad  # noqa: E402
from conftest import eager_attention_calls, sharpened  # noqa: E402

TOL = {"rtol": 1e-5, "atol": 1e-4}  # atol in pixels; MADs here are 20 to 40 px
PATCH, SIDE = 8, 2  # 8 px patches, 2 x 2 windows


def _backbone(window_blocks=(0,)):
    config = transformers.LwDetrViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=64,
                                          pretrain_image_size=64, patch_size=PATCH, num_windows=SIDE * SIDE,
                                          window_block_indices=list(window_blocks), out_indices=[2])
    torch.manual_seed(0)
    return sharpened(transformers.LwDetrViTBackbone(config))


def _window_major_centres(grid: tuple[int, int]) -> torch.Tensor:
    """``[S * S, n, 2]`` pixel centres of each window's tokens, windows and tokens row-major."""
    wh, ww = grid[0] // SIDE, grid[1] // SIDE
    cells = [[((a * wh + i + 0.5) * PATCH, (b * ww + j + 0.5) * PATCH) for i in range(wh) for j in range(ww)]
             for a in range(SIDE) for b in range(SIDE)]
    return torch.tensor(cells, dtype=torch.float64)


def _expected(probabilities: torch.Tensor, grid: tuple[int, int], batch: int) -> torch.Tensor:
    """``[B, H]``: the mean over an image's tokens of each query's MAD, for a window block's or a global block's
    probabilities."""
    centres = _window_major_centres(grid)
    if probabilities.shape[0] == batch:  # global: one sequence per image, windows one after another
        centres = centres.reshape(1, -1, 2)
    distance = torch.cdist(centres, centres).repeat(batch, 1, 1)  # image-major, as the call's rows
    per_query = (probabilities * distance[:, None]).sum(-1)  # [B * windows, H, n]
    heads = probabilities.shape[1]
    return per_query.reshape(batch, -1, heads, per_query.shape[-1]).transpose(1, 2).reshape(batch, heads, -1).mean(-1)


@pytest.mark.parametrize("window_blocks", [(0,), ()], ids=["window-then-global", "global-only"])
@pytest.mark.parametrize("size", [(64, 64), (64, 96)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_lw_detr_backbone_equals_the_mad_of_its_eager_attention_in_window_order(window_blocks, size):
    """Its global blocks attend in window-major order (were placed row-major as a plain ViT: 2 to 4 % off)."""
    model = _backbone(window_blocks)
    pixels = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1))
    grid = (size[0] // PATCH, size[1] // PATCH)
    modeling = importlib.import_module("transformers.models.lw_detr.modeling_lw_detr")
    calls = eager_attention_calls(modeling, model, pixels)
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        plain = model(pixels).feature_maps
        with vitmad.record(model) as rec:
            assert all(torch.equal(a, b) for a, b in zip(model(pixels).feature_maps, plain, strict=True))
    assert rec.layers == ["encoder.layer.0.attention", "encoder.layer.1.attention"] and not rec.skipped
    attention = [g.attention for g in rec.geometry]
    window = f"{grid[0] // SIDE}x{grid[1] // SIDE}"
    assert attention[1] == f"global, in the order of {SIDE}x{SIDE} windows of {window}"
    assert attention[0] == (f"window {window}" if window_blocks else attention[1])
    assert all(g.grid == grid and g.stride == (PATCH, PATCH) for g in rec.geometry)
    expected = torch.stack([_expected(p, grid, 2) for _, p in calls])
    torch.testing.assert_close(rec.mad.double(), expected, **TOL)
