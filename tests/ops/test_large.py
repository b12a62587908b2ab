"""64-bit indexing: an attention map or an attention bias of more than 2^31 elements gives the exact per-query
distances."""

from __future__ import annotations

import pytest
import torch

import vitmad
from conftest import tolerance
from vitmad.ops.reference import mad_qk_reference, mad_reference


@pytest.mark.slow
def test_more_than_2_pow_31_elements():
    b, n, grid = 4, 26000, [130, 200]
    attn = torch.zeros(b, 1, n, n, dtype=torch.float16)  # 2.7e9 elements, 5.4 GB; the last matrix lies past 2^31
    assert attn.numel() > 2**31
    rows = torch.arange(n)
    # One key per query, at a scattered position, so every row's offset is exercised.
    keys = torch.stack([(rows * 7919 + 13 * i) % n for i in range(b)])
    for i in range(b):
        attn[i, 0, rows, keys[i]] = 1.0
    per_query = vitmad.mad(attn, 16, num_prefix_tokens=0, grid=grid, reduction="none")
    expected = torch.stack([_distances(grid, rows, keys[i]) for i in range(b)])
    torch.testing.assert_close(per_query[:, 0].double(), expected, rtol=1e-6, atol=1e-4)
    means = vitmad.mad(attn, 16, num_prefix_tokens=0, grid=grid)
    torch.testing.assert_close(means[:, 0].double(), expected.mean(-1), rtol=1e-6, atol=1e-4)


def _distances(grid, queries, keys):
    """Pixel distance between each query patch and its one key, from the MAD_SPEC formula."""
    gw = grid[1]
    dr = (queries // gw - keys // gw).double()
    dc = (queries % gw - keys % gw).double()
    return 16 * torch.sqrt(dr * dr + dc * dc)


@pytest.mark.slow
def test_mad_qk_bias_of_more_than_2_pow_31_elements():
    # A bool [N, N] mask of 2.15e9 elements letting each query see exactly one key: whatever q and k are, the
    # softmax puts all weight on that key, so each query's MAD is its distance to it, exactly.
    n, grid = 46400, [200, 232]
    mask = torch.zeros(n, n, dtype=torch.bool)
    assert mask.numel() > 2**31
    rows = torch.arange(n)
    keys = (rows * 7919 + 13) % n  # scattered, so the last rows' offsets lie past 2^31
    mask[rows, keys] = True
    gen = torch.Generator().manual_seed(0)
    q, k = (torch.randn(1, 1, n, 4, generator=gen) for _ in range(2))
    per_query = vitmad.mad_qk(q, k, 16, num_prefix_tokens=0, grid=grid, attn_bias=mask, reduction="none")
    expected = _distances(grid, rows, keys)
    torch.testing.assert_close(per_query[0, 0].double(), expected, rtol=1e-6, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_grid_too_wide_for_the_column_tables(dtype):
    # A 1 x 4200 grid: its column tables (4200^2 distances, 71 MB in float32) exceed the 64 MB the CPU kernels
    # build, so each row's distances are written into a buffer from the distance table instead. Three prefix
    # tokens and 4203 keys: mad_qk's key blocks (512 keys) do not start on a grid row.
    n, prefix, grid = 4203, 3, [1, 4200]
    gen = torch.Generator().manual_seed(5)
    q, k = (torch.randn(1, 2, n, 8, generator=gen, dtype=dtype) for _ in range(2))
    options = dict(num_prefix_tokens=prefix, grid=grid, reduction="none")
    per_query = vitmad.mad_qk(q, k, 16, **options)
    expected = mad_qk_reference(q, k, 16, **options)
    torch.testing.assert_close(per_query.double(), expected, **tolerance(dtype))
    attn = torch.softmax((q @ k.transpose(-1, -2)) * 8**-0.5, dim=-1)
    torch.testing.assert_close(vitmad.mad(attn, 16, **options).double(), mad_reference(attn, 16, **options),
                               **tolerance(dtype))
