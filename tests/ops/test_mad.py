"""vitmad.mad against the float64 reference: shapes, prefixes, grids, layouts, dtypes, reductions."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

import vitmad
from conftest import DEVICES, DTYPES, random_attention, tolerance
from vitmad.ops.reference import mad_reference, tutorial_mean_attention_distance

# (N, num_prefix_tokens, grid): odd sizes, the real ViT sizes, several prefix counts, non-square grids.
GEOMETRIES = [
    (5, 1, [2, 2]),
    (5, 0, [1, 5]),
    (17, 1, None),
    (17, 2, [3, 5]),
    (197, 1, None),
    (198, 2, None),
    (201, 5, None),
    (257, 1, None),
    (257, 0, [1, 257]),
    (390, 6, [16, 24]),
    (577, 1, None),
]


def _layout_view(attn: torch.Tensor, layout: str) -> torch.Tensor:
    """The same attention values behind a contiguous, sliced or transposed memory layout."""
    if layout == "contiguous":
        return attn
    if layout == "sliced":
        # Embedded in a bigger tensor: rows and columns offset by 3, every other matrix.
        big = torch.zeros(attn.shape[0] * 2, *attn.shape[1:-2], attn.shape[-2] + 5, attn.shape[-1] + 7,
                          dtype=attn.dtype, device=attn.device)
        big[::2, ..., 3 : 3 + attn.shape[-2], 3 : 3 + attn.shape[-1]] = attn
        return big[::2, ..., 3 : 3 + attn.shape[-2], 3 : 3 + attn.shape[-1]]
    assert layout == "transposed"
    return attn.transpose(-1, -2).contiguous().transpose(-1, -2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n,prefix,grid", GEOMETRIES)
@pytest.mark.parametrize("layout", ["contiguous", "sliced", "transposed"])
@pytest.mark.parametrize("reduction,renormalize", [("mean", False), ("none", False), ("mean", True)])
def test_matches_reference(device, n, prefix, grid, layout, reduction, renormalize):
    attn = _layout_view(random_attention((2, 3, n, n), torch.float32, device, seed=n + prefix), layout)
    kwargs = dict(num_prefix_tokens=prefix, grid=grid, renormalize=renormalize, reduction=reduction)
    out = vitmad.mad(attn, 14, **kwargs)
    ref = mad_reference(attn, 14, **kwargs)
    assert out.dtype == torch.float32
    assert out.shape == ref.shape
    torch.testing.assert_close(out.double(), ref, **tolerance(torch.float32))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,prefix,grid", [(197, 1, None), (50, 2, [6, 8]), (37, 0, [37, 1])])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("renormalize", [False, True])
def test_dtypes(device, dtype, n, prefix, grid, reduction, renormalize):
    attn = random_attention((3, 2, n, n), dtype, device, seed=7, temperature=0.3)
    kwargs = dict(num_prefix_tokens=prefix, grid=grid, renormalize=renormalize, reduction=reduction)
    out = vitmad.mad(attn, 16, **kwargs)
    # The reference sees exactly the values the kernel saw (already rounded to dtype).
    ref = mad_reference(attn, 16, **kwargs)
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(out.double(), ref, **tolerance(dtype))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(197, 197), (4, 197, 197), (2, 2, 3, 197, 197), (1, 1, 1, 1, 17, 17)])
def test_leading_dims(device, shape):
    attn = random_attention(shape, torch.float32, device, seed=len(shape))
    for reduction in ("mean", "none"):
        out = vitmad.mad(attn, 16, reduction=reduction, num_prefix_tokens=1)
        ref = mad_reference(attn, 16, reduction=reduction, num_prefix_tokens=1)
        expected_shape = shape[:-2] if reduction == "mean" else (*shape[:-2], shape[-1] - 1)
        assert out.shape == expected_shape
        torch.testing.assert_close(out.double(), ref, **tolerance(torch.float32))


def test_stack_of_layers_equals_per_layer_calls():
    layers = random_attention((3, 2, 4, 65, 65), seed=3)
    stacked = vitmad.mad(layers, 16)
    for i in range(3):
        torch.testing.assert_close(stacked[i], vitmad.mad(layers[i], 16), rtol=0, atol=0)


@pytest.mark.parametrize("n", [5, 50, 197])
def test_reference_equals_tutorial(n):
    attn = random_attention((2, 3, n, n), torch.float64, seed=n)
    expected = tutorial_mean_attention_distance(16, attn.numpy())
    np.testing.assert_allclose(mad_reference(attn, 16).numpy(), expected, rtol=1e-12)
    np.testing.assert_allclose(vitmad.mad(attn, 16).numpy(), expected, rtol=1e-10)


@pytest.mark.parametrize(
    "grid,patch,expected",
    [(14, 16, 116.49), (16, 14, 116.57), (37, 14, 269.99)],
)
def test_uniform_attention_analytic_values(grid, patch, expected):
    n = grid * grid
    uniform = torch.full((1, 1, n, n), 1.0 / n)
    assert vitmad.mad(uniform, patch, num_prefix_tokens=0).item() == pytest.approx(expected, abs=0.005)
    assert vitmad.uniform_attention_mad(grid, grid, patch) == pytest.approx(expected, abs=0.005)


def test_uniform_attention_in_patch_units():
    uniform = torch.full((1, 1, 197, 197), 1.0 / 196)
    # 116.49 px at patch 16 is 7.281 patches (MAD_SPEC.md).
    assert vitmad.mad(uniform, 1).item() == pytest.approx(7.281, abs=5e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_attention_on_self_gives_zero(device):
    n = 26
    attn = torch.zeros(2, n, n, device=device)
    attn[:, torch.arange(n), torch.arange(n)] = 1.0
    assert torch.equal(vitmad.mad(attn, 16, grid=[5, 5]), torch.zeros(2, device=device))


@pytest.mark.parametrize("device", DEVICES)
def test_known_distances(device):
    # Grid 2 x 3, no prefix: query 0 at (0, 0) attends fully to patch 5 at (1, 2): distance sqrt(5) patches.
    attn = torch.zeros(6, 6, dtype=torch.float64, device=device)
    attn[:, 5] = 1.0
    per_query = vitmad.mad(attn, 10, num_prefix_tokens=0, grid=[2, 3], reduction="none")
    expected = [10 * math.hypot(1 - r, 2 - c) for r, c in itertools.product(range(2), range(3))]
    torch.testing.assert_close(per_query, torch.tensor(expected, dtype=torch.float64, device=device))


@pytest.mark.parametrize("device", DEVICES)
def test_prefix_mass_drops_out_unless_renormalized(device):
    attn = torch.zeros(1, 5, 5, dtype=torch.float64, device=device)
    attn[0, :, 0] = 0.5  # half the mass on CLS
    attn[0, 1:, 4] = 0.5  # the other half on patch 3 at (1, 1)
    plain = vitmad.mad(attn, 1, reduction="none")
    renormalized = vitmad.mad(attn, 1, reduction="none", renormalize=True)
    distances = torch.tensor([math.sqrt(2), 1, 1, 0], dtype=torch.float64, device=device)
    torch.testing.assert_close(plain[0], 0.5 * distances)
    torch.testing.assert_close(renormalized[0], distances)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_empty_batch(device, reduction):
    attn = torch.empty(0, 12, 197, 197, device=device)
    out = vitmad.mad(attn, 16, reduction=reduction)
    assert out.shape == ((0, 12) if reduction == "mean" else (0, 12, 196))


@pytest.mark.parametrize("device", DEVICES)
def test_nan_stays_in_its_head(device):
    attn = random_attention((2, 4, 197, 197), device=device, seed=11)
    attn[1, 2, 50, 60] = float("nan")
    attn[0, 1, 0, 5] = float("nan")  # in the CLS row: not part of MAD
    attn[0, 3, 9, 0] = float("nan")  # in the CLS column: not part of MAD
    out = vitmad.mad(attn, 16)
    nan = torch.zeros(2, 4, dtype=torch.bool, device=device)
    nan[1, 2] = True
    assert torch.equal(out.isnan(), nan)
    ref = mad_reference(attn, 16)
    torch.testing.assert_close(out.double(), ref, **tolerance(torch.float32), equal_nan=True)
