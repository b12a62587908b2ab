"""vitmad.record on timm's Gemma 4 vision encoder (``gemma4_vit_*``): a linear patch embedding and NaFlex inputs
(``patch_coord`` / ``patch_valid``), several images of different grids padded into one batch.

The reference is each layer's own eager softmax probabilities (``fused_attn`` off, seen by patching
``Tensor.softmax``), placed by the geometry written here: image ``i``'s patch ``(r, c)`` at
``((r + 0.5) * 16, (c + 0.5) * 16)`` px, its tokens row-major first, padding slots without a position.
"""

from __future__ import annotations

import copy
from unittest import mock

import pytest
import torch

import vitmad
from vitmad.ops.reference import mad_positions_reference

timm = pytest.importorskip("timm")

TOL = {"rtol": 1e-5, "atol": 1e-4}  # pixels; float32 attention against a float64 reference
PATCH = 16


def tiny_gemma4():
    torch.manual_seed(0)
    model = timm.create_model("gemma4_vit_167m_enc", pretrained=False, embed_dim=64, depth=2, num_heads=2,
                              global_pool="none").eval()
    return model


def packed_inputs(grids: list[tuple[int, int]]):
    """Patches [B, N, P*P*3], patch_coord [B, N, 2] (row, col; -1 at padding) and patch_valid [B, N]."""
    slots = max(h * w for h, w in grids)
    patches = torch.rand(len(grids), slots, PATCH * PATCH * 3)
    coord = torch.full((len(grids), slots, 2), -1, dtype=torch.long)
    valid = torch.zeros(len(grids), slots, dtype=torch.bool)
    for i, (h, w) in enumerate(grids):
        coord[i, :h * w] = torch.cartesian_prod(torch.arange(h), torch.arange(w))
        valid[i, :h * w] = True
    return patches, coord, valid


def positions(grids: list[tuple[int, int]], slots: int) -> torch.Tensor:
    """[B, 1, N, 2] pixel centres, NaN at padding slots."""
    out = torch.full((len(grids), 1, slots, 2), float("nan"), dtype=torch.float64)
    for i, (h, w) in enumerate(grids):
        rows = (torch.arange(h, dtype=torch.float64) + 0.5) * PATCH
        cols = (torch.arange(w, dtype=torch.float64) + 0.5) * PATCH
        out[i, 0, :h * w] = torch.cartesian_prod(rows, cols)
    return out


def eager_maps(model, *args, **kwargs) -> list[torch.Tensor]:
    model = copy.deepcopy(model)
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = False
    maps, original = [], torch.Tensor.softmax

    def spy(self, *a, **k):
        maps.append(original(self, *a, **k))
        return maps[-1]

    with torch.no_grad(), mock.patch.object(torch.Tensor, "softmax", spy):
        model(*args, **kwargs)
    return maps


def record(model, *args, **kwargs):
    with torch.no_grad():
        plain = model(*args, **kwargs)
    with torch.no_grad(), vitmad.record(model) as rec:
        assert torch.equal(model(*args, **kwargs), plain)
    return rec


def test_gemma4_packed_images_each_on_its_own_grid():
    model = tiny_gemma4()
    grids = [(3, 6), (4, 3), (2, 2)]
    patches, coord, valid = packed_inputs(grids)
    rec = record(model, patches, patch_coord=coord, patch_valid=valid)
    maps = eager_maps(model, patches, patch_coord=coord, patch_valid=valid)
    assert len(maps) == len(rec.per_layer) == 2
    placed = positions(grids, patches.shape[1])
    for recorded, attn in zip(rec.per_layer, maps, strict=True):
        # Normalised queries and keys give attention far from uniform (a misplaced token would show).
        assert attn.amax(-1).transpose(0, 1)[:, valid].mean() > 0.3
        torch.testing.assert_close(recorded.double(), mad_positions_reference(attn, placed), **TOL)
    assert rec.geometry[0].grid is None and rec.geometry[0].image_grids == tuple(grids)
    # Each image alone gives what it gives packed with the others.
    for i, grid in enumerate(grids):
        alone = record(model, *(t[i:i + 1, :grid[0] * grid[1]] for t in (patches,)),
                       patch_coord=coord[i:i + 1, :grid[0] * grid[1]], patch_valid=valid[i:i + 1, :grid[0] * grid[1]])
        torch.testing.assert_close(torch.stack(alone.per_layer)[:, 0], torch.stack(rec.per_layer)[:, i],
                                   rtol=1e-5, atol=1e-4)


def test_gemma4_image_batch():
    model = tiny_gemma4()
    pixels = torch.rand(2, 3, 96, 144)
    rec = record(model, pixels)
    maps = eager_maps(model, pixels)
    placed = positions([(6, 9)], 54)[0]
    for recorded, attn in zip(rec.per_layer, maps, strict=True):
        torch.testing.assert_close(recorded.double(), mad_positions_reference(attn, placed), **TOL)
    assert [g.grid for g in rec.geometry] == [(6, 9)] * 2
