"""The statistics of attention probabilities on CUDA (``stats``, ``stats_pos``) against the CPU kernels.

The CPU kernels are held to the float64 references elsewhere (test_stats_attn.py); here the CUDA result must be
theirs: every statistic, grid and position form, each dtype, renormalised or not, strided and transposed rows,
keys without a position anywhere, rectangular keys, zeros, NaN and negative values. The CUDA kernels of the
statistics are registered with ``VITMAD_CUDA_STATS_KERNELS=1`` (benchmarks/gpu_check.py sets it); without it CUDA
runs the pure-PyTorch kernels, which must agree just the same. Skipped without a CUDA device.
"""

from __future__ import annotations

import math

import pytest
import torch
from test_stats_qk_cuda import _positions  # keys without a position at the given indices

import vitmad

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

ALL = ("mad", "entropy", "prefix_mass", "self_mass")
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# The same values summed in another order (a warp's lanes here, vectors of 8 there).
TOL = {torch.float64: {"rtol": 1e-10, "atol": 1e-12}}
TOL_32 = {"rtol": 2e-5, "atol": 2e-6}


def _check(attn: torch.Tensor, dtype, **kwargs):
    cpu = vitmad.attention_stats(attn, **kwargs)
    moved = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    cuda = vitmad.attention_stats(attn.cuda(), **moved)
    assert list(cpu) == list(cuda)
    for name in cpu:
        torch.testing.assert_close(cuda[name].cpu(), cpu[name], equal_nan=True, msg=name,
                                   **TOL.get(dtype, TOL_32))
    return cuda


def _attention(lead, nq, nk, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(*lead, nq, nk, generator=gen) * 2).softmax(-1).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("grid, prefix", [((1, 1), 0), ((7, 9), 1), ((8, 8), 5), ((14, 14), 1)])
@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_grid_form_equals_the_cpu(dtype, grid, prefix, renormalize, reduction):
    n = prefix + grid[0] * grid[1]
    attn = _attention((2, 3), n, n, dtype, seed=n)
    _check(attn, dtype, patch=16, grid=grid, num_prefix_tokens=prefix, stats=ALL, renormalize=renormalize,
           reduction=reduction)


@pytest.mark.parametrize("dtype", DTYPES)
def test_strided_and_transposed_rows_equal_the_cpu(dtype):
    n = 1 + 6 * 5
    attn = _attention((2, 2), 2 * n, 2 * n, dtype, seed=3)[..., ::2, ::2]  # strided keys and queries
    _check(attn, dtype, patch=14, grid=(6, 5), stats=ALL, reduction="none")
    columns = _attention((2, 2), n, n, dtype, seed=4).transpose(-1, -2).contiguous().transpose(-1, -2)
    _check(columns, dtype, patch=14, grid=(6, 5), stats=ALL, renormalize=True, reduction="none")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n, dims", [(1, 2), (33, 2), (130, 3), (200, 1)])
@pytest.mark.parametrize("renormalize", [False, True])
def test_position_form_equals_the_cpu(dtype, n, dims, renormalize):
    attn = _attention((2, 2), n, n, dtype, seed=n)
    positions = _positions(n, dims, seed=n, missing=(0, 5, 32, n - 1))
    for reduction in ("none", "mean"):
        _check(attn, dtype, positions=positions, stats=ALL, renormalize=renormalize, reduction=reduction)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rectangular_keys_and_per_image_positions_equal_the_cpu(dtype):
    attn = _attention((2, 3), 40, 29, dtype, seed=9)
    positions = torch.stack([_positions(40, 2, seed=10), _positions(40, 2, seed=11, missing=(3,))])[:, None]
    key_positions = _positions(29, 2, seed=12, missing=(0, 28))
    for renormalize in (False, True):
        _check(attn, dtype, positions=positions, key_positions=key_positions,
               stats=("mad", "entropy", "prefix_mass"), renormalize=renormalize, reduction="none")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_zeros_nan_and_negative_values_equal_the_cpu(dtype):
    n = 1 + 7 * 7
    attn = _attention((1, 2), n, n, dtype, seed=13)
    attn[0, 0, 3, 10:] = 0  # 0 ln 0 = 0
    attn[0, 0, 4, 20] = math.nan
    attn[0, 1, 5, 40] = -1e-3  # a negative value: NaN entropy
    cuda = _check(attn, dtype, patch=16, grid=(7, 7), stats=ALL, reduction="none")
    entropy = cuda["entropy"][0]  # [H, patches]; patch i is token 1 + i
    assert entropy[0, 2].isfinite() and entropy[0, 3].isnan() and entropy[1, 4].isnan()


def test_no_query_and_no_matrix():
    attn = _attention((2, 2), 0, 6, torch.float32, seed=16)
    _check(attn, torch.float32, positions=torch.zeros(0, 2), key_positions=_positions(6, 2, seed=17),
           stats=("mad", "entropy"))
    attn = _attention((0, 2), 6, 6, torch.float32, seed=18)
    _check(attn, torch.float32, positions=_positions(6, 2, seed=19), stats=ALL)
