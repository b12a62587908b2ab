"""vitmad.record on torchvision's MaxViT (recording/families/torchvision_maxvit.py), against each attention
layer's own softmax placed by geometry written here: the stage maps (the stem and each stage's first MBConv
halve the map) and the two partitions as torchvision's ``WindowPartition`` and axis swap make them."""

from __future__ import annotations

import pytest
import torch

import vitmad
from conftest import SoftmaxOutputs
from vitmad.ops.reference import mad_positions_reference

maxvit = pytest.importorskip("torchvision.models.maxvit")

TOL = {"rtol": 1e-5, "atol": 1e-4}  # pixels


def _cells(kind: str, grid: tuple[int, int], partition: int) -> torch.Tensor:
    """[G, P, 2] (row, column) on the map of token p of window g, as torchvision orders them."""
    height, width = grid
    if kind == "window":  # p x p blocks, row-major; tokens row-major inside
        blocks_w = width // partition
        g, t = torch.meshgrid(torch.arange((height // partition) * blocks_w), torch.arange(partition ** 2),
                              indexing="ij")
        rows = (g // blocks_w) * partition + t // partition
        cols = (g % blocks_w) * partition + t % partition
    else:  # blocks of P x P, P = height / partition; window = offset (a, b) in a block, token = block (i, j)
        step = height // partition
        blocks_w = width // step
        g, t = torch.meshgrid(torch.arange(step * step), torch.arange((height // step) * blocks_w), indexing="ij")
        rows = (t // blocks_w) * step + g // step
        cols = (t % blocks_w) * step + g % step
    return torch.stack([rows, cols], dim=-1)


def _expected(probs: torch.Tensor, kind: str, grid, partition: int, stride: float) -> torch.Tensor:
    """[B, heads, H * W] per-token MAD, row-major on the map, from attention [B, G, heads, P, P]."""
    cells = _cells(kind, grid, partition)
    positions = ((cells.double() + 0.5) * stride)[:, None]  # [G, 1, P, 2]
    per_query = mad_positions_reference(probs, positions, positions, reduction="none")  # [B, G, heads, P]
    batch, heads = probs.shape[0], probs.shape[2]
    out = torch.full((batch, heads, grid[0] * grid[1]), float("nan"), dtype=torch.float64)
    index = (cells[..., 0] * grid[1] + cells[..., 1]).reshape(-1)
    out[:, :, index] = per_query.permute(0, 2, 1, 3).reshape(batch, heads, -1)
    assert not out.isnan().any(), "the reference partition does not cover the map"
    return out


@pytest.mark.parametrize("size", [(64, 64), (96, 96)], ids=["64", "96"])  # torchvision runs square maps only
def test_torchvision_maxvit_equals_the_mad_of_its_own_windows_and_grids(size):
    torch.manual_seed(0)
    model = maxvit.MaxVit(input_size=size, stem_channels=8, partition_size=4, block_channels=[16, 32],
                          block_layers=[1, 1], head_dim=8, stochastic_depth_prob=0.0, num_classes=10).eval()
    pixels = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        with SoftmaxOutputs(rank=5) as seen:
            plain = model(pixels)
        with vitmad.record(model, reduction="none") as rec:
            recorded = model(pixels)
    assert torch.equal(plain, recorded)
    # Stage 1 at 4 px per token (stem and first MBConv each halve), stage 2 at 8 px; window, then grid.
    table = [("window", 4.0), ("grid", 4.0), ("window", 8.0), ("grid", 8.0)]
    assert len(rec.layers) == len(seen.maps) == len(table)
    for index, (kind, stride) in enumerate(table):
        grid = (int(size[0] // stride), int(size[1] // stride))
        geometry = rec.geometry[index]
        assert geometry.grid == grid and geometry.stride == (stride, stride)
        assert geometry.attention.startswith(kind)
        expected = _expected(seen.maps[index], kind, grid, 4, stride)
        torch.testing.assert_close(rec.per_layer[index].double(), expected, **TOL)


def test_torchvision_maxvit_t_is_recorded_at_its_size():
    model = maxvit.maxvit_t().eval()
    with torch.no_grad(), vitmad.record(model) as rec:
        model(torch.randn(1, 3, 224, 224))
    assert len(rec.layers) == 22
    assert [g.stride[0] for g in rec.geometry[::2]] == [4.0] * 2 + [8.0] * 2 + [16.0] * 5 + [32.0] * 2
    assert all(layer.isfinite().all() for layer in rec.per_layer)
