"""vitmad.record on timm's iFormer: single-head modulation attention (SHMA) over the stride-16 and stride-32
maps, global or inside padded windows.

The reference is each layer's own eager softmax probabilities (``fused_attn`` off: the input of its attention
dropout, ``[B, N, N]`` without a head dimension), placed by the geometry written here: the map's cells in
row-major order at the centre of their 16 or 32 px cells; with windows of 4 x 4, the map zero-padded at the
bottom and right to whole windows, windows row-major and image-major in the batch, a padding cell a key at its
cell of the padded grid (past the image edge) and no query.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

import vitmad
from conftest import batch_norms_on, output_spreads
from vitmad.ops.reference import mad_positions_reference

timm = pytest.importorskip("timm")

TOL = {"rtol": 1e-5, "atol": 1e-4}  # pixels; float32 attention against a float64 reference


def cells(gh: int, gw: int, stride: float) -> torch.Tensor:
    rows = (torch.arange(gh, dtype=torch.float64) + 0.5) * stride
    cols = (torch.arange(gw, dtype=torch.float64) + 0.5) * stride
    return torch.cartesian_prod(rows, cols)


def windows(gh: int, gw: int, stride: float, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[nW, size * size, 2] (queries: NaN at padding cells; keys: every cell of the padded grid)."""
    nh, nw = math.ceil(gh / size), math.ceil(gw / size)
    queries, keys = [], []
    for a in range(nh):
        for b in range(nw):
            window_q, window_k = [], []
            for i in range(size):
                for j in range(size):
                    row, col = a * size + i, b * size + j
                    centre = [(row + 0.5) * stride, (col + 0.5) * stride]
                    window_k.append(centre)
                    window_q.append(centre if row < gh and col < gw else [math.nan, math.nan])
            queries.append(window_q)
            keys.append(window_k)
    return torch.tensor(queries, dtype=torch.float64), torch.tensor(keys, dtype=torch.float64)


def tiny_iformer(pixels: torch.Tensor, window: int):
    """iformer_t with peaked attention: batch norms on this batch's statistics, queries and keys scaled to a
    standard deviation of 3 (random weights leave them tiny, and uniform attention hides a misplaced token)."""
    torch.manual_seed(0)
    model = timm.create_model("iformer_t", pretrained=False)
    attention = [m for m in model.modules() if type(m).__name__ == "SHMA"]
    for module in attention:
        module.window_size = window
    batch_norms_on(model, pixels)
    projections = [p for m in attention for p in (m.q, m.k)]
    spreads = output_spreads(model, pixels, projections)
    with torch.no_grad():
        for projection in projections:
            projection.bn.weight.mul_(3.0 / spreads[projection])
            projection.bn.bias.mul_(3.0 / spreads[projection])
    return model


def eager_maps(model, pixels) -> list[torch.Tensor]:
    model, maps = copy.deepcopy(model), []
    for module in model.modules():
        if type(module).__name__ == "SHMA":
            module.fused_attn = False
            module.attn_drop.register_forward_pre_hook(lambda m, args: maps.append(args[0]))
    with torch.no_grad():
        model(pixels)
    return maps


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("window", [0, 4])
def test_iformer_single_head_attention_global_and_in_padded_windows(fused, window):
    size, batch = (96, 112), 2
    pixels = torch.randn(batch, 3, *size)
    model = tiny_iformer(pixels, window)
    for module in model.modules():
        if type(module).__name__ == "SHMA":
            module.fused_attn = fused
    with torch.no_grad():
        plain = model(pixels)
    with torch.no_grad(), vitmad.record(model) as rec:
        assert torch.equal(model(pixels), plain)
    maps = eager_maps(model, pixels)
    strides = [16] * 3 + [32] * 2  # three SHMA blocks in the stride-16 stage, two in the stride-32 stage
    assert len(maps) == len(rec.per_layer) == len(strides)
    assert all(attn.amax(-1).mean() > 3.0 / attn.shape[-1] for attn in maps)  # far from uniform
    for recorded, attn, stride in zip(rec.per_layer, maps, strides, strict=True):
        gh, gw = math.ceil(size[0] / stride), math.ceil(size[1] / stride)
        if window:
            queries, keys = windows(gh, gw, stride, window)
            per_query = mad_positions_reference(attn.view(batch, -1, *attn.shape[-2:]), queries, keys,
                                                reduction="none")  # [B, nW, N]
            expected = per_query.nanmean((-1, -2))[:, None]  # every query of the image; NaN only at padding
        else:
            expected = mad_positions_reference(attn, cells(gh, gw, stride))[:, None]
        torch.testing.assert_close(recorded.double(), expected, **TOL)
    assert [g.grid for g in rec.geometry] == [(6, 7)] * 3 + [(3, 4)] * 2
    assert all(g.heads == 1 for g in rec.geometry)
