"""The statistics from q and k on CUDA (``stats_qk``, ``stats_qk_pos``) against the CPU kernels on the same inputs.

The CPU kernels are held to the float64 references elsewhere (test_stats_qk.py, test_stats_temporal.py); here the
CUDA result must be theirs: every statistic, grid and position form, each dtype, renormalised or not, float and
bool biases, keys without a position anywhere in the sequence, rectangular keys, frames, NaN and -inf logits, and
sizes across the CUDA kernel's 64-key (float64: 32-key) tiles. The CUDA kernels of the statistics are registered
with ``VITMAD_CUDA_STATS_KERNELS=1`` (benchmarks/gpu_check.py sets it); without it CUDA runs the pure-PyTorch
kernels, which must agree just the same. Skipped without a CUDA device.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

import vitmad

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

ALL = ("mad", "entropy", "prefix_mass", "self_mass")
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# Both sides compute from the same q and k with float32 (float64) accumulation; only the order of the sums
# differs (tiles of 64 keys here, blocks of 512 there; tensor-core products for 16-bit).
TOL = {torch.float64: {"rtol": 1e-10, "atol": 1e-10}}
TOL_32 = {"rtol": 2e-5, "atol": 2e-5}


def _tolerance(dtype):
    return TOL.get(dtype, TOL_32)


def _both(fn, *tensors, **kwargs):
    """fn on the CPU and on CUDA (every tensor argument moved there), keyword tensors too."""
    cpu = fn(*tensors, **kwargs)
    moved = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    cuda = fn(*(t.cuda() if isinstance(t, torch.Tensor) else t for t in tensors), **moved)
    return cpu, cuda


def _check(cpu: dict, cuda: dict, dtype):
    assert list(cpu) == list(cuda)
    for name in cpu:
        torch.testing.assert_close(cuda[name].cpu(), cpu[name], equal_nan=True, **_tolerance(dtype), msg=name)


def _qk(b, h, nq, nk, d, dtype, seed, spread=3.0):
    gen = torch.Generator().manual_seed(seed)
    q = (torch.randn(b, h, nq, d, generator=gen) * spread / math.sqrt(d) ** 0.5).to(dtype)
    k = (torch.randn(b, h, nk, d, generator=gen) * spread / math.sqrt(d) ** 0.5).to(dtype)
    return q, k


@CUDA
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("grid, prefix, d", [((1, 1), 0, 16), ((7, 9), 1, 40), ((8, 8), 5, 64), ((13, 11), 1, 36)])
@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_grid_form_equals_the_cpu(dtype, grid, prefix, d, renormalize, reduction):
    n = prefix + grid[0] * grid[1]
    q, k = _qk(2, 3, n, n, d, dtype, seed=n + d)
    cpu, cuda = _both(vitmad.attention_stats_qk, q, k, 16, grid=grid, num_prefix_tokens=prefix, stats=ALL,
                      renormalize=renormalize, reduction=reduction)
    _check(cpu, cuda, dtype)


@CUDA
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias_kind", ["float", "bool"])
def test_grid_form_with_a_bias_and_masked_rows_equals_the_cpu(dtype, bias_kind):
    grid, prefix = (9, 10), 1
    n = prefix + 90
    q, k = _qk(2, 2, n, n, 32, dtype, seed=5)
    gen = torch.Generator().manual_seed(6)
    if bias_kind == "float":
        bias = torch.randn(2, n, n, generator=gen).to(dtype)
        bias[0, 3, :] = -math.inf  # a row with every key masked: NaN
        bias[1, 7, 70:] = -math.inf  # the second key tile masked for one row
    else:
        bias = torch.rand(2, 1, n, n, generator=gen) > 0.4
        bias[1, 0, 11, :] = False
    for renormalize in (False, True):
        cpu, cuda = _both(vitmad.attention_stats_qk, q, k, 16, grid=grid, stats=ALL, attn_bias=bias,
                          renormalize=renormalize, reduction="none")
        _check(cpu, cuda, dtype)


def _positions(n: int, dims: int, seed: int, missing=(0, 5)) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    positions = torch.rand(n, dims, generator=gen) * 200
    for index in missing:
        if index < n:
            positions[index] = math.nan
    return positions


@CUDA
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n, dims", [(1, 2), (65, 2), (130, 3), (200, 1)])
@pytest.mark.parametrize("renormalize", [False, True])
def test_position_form_with_keys_without_a_position_anywhere_equals_the_cpu(dtype, n, dims, renormalize):
    q, k = _qk(2, 2, n, n, 24, dtype, seed=n)
    positions = _positions(n, dims, seed=n, missing=(0, 5, 64, n - 1))
    for reduction in ("none", "mean"):
        cpu, cuda = _both(vitmad.attention_stats_qk, q, k, positions=positions, stats=ALL, renormalize=renormalize,
                          reduction=reduction)
        _check(cpu, cuda, dtype)


@CUDA
@pytest.mark.parametrize("dtype", DTYPES)
def test_rectangular_keys_and_per_image_positions_equal_the_cpu(dtype):
    q, k = _qk(2, 3, 70, 29, 16, dtype, seed=9)
    positions = torch.stack([_positions(70, 2, seed=10), _positions(70, 2, seed=11, missing=(3,))])[:, None]
    key_positions = _positions(29, 2, seed=12, missing=(0, 28))
    for renormalize in (False, True):
        cpu, cuda = _both(vitmad.attention_stats_qk, q, k, positions=positions, key_positions=key_positions,
                          stats=("mad", "entropy", "prefix_mass"), renormalize=renormalize, reduction="none")
        _check(cpu, cuda, dtype)


@CUDA
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("renormalize", [False, True])
def test_temporal_mad_equals_the_cpu(dtype, renormalize):
    frames, rows, cols = 4, 5, 7
    n = 1 + frames * rows * cols  # a CLS token, then the tubelets
    f, r, c = torch.meshgrid(torch.arange(frames), torch.arange(rows), torch.arange(cols), indexing="ij")
    positions = torch.cat([torch.full((1, 2), math.nan),
                           torch.stack([(r + 0.5) * 16, (c + 0.5) * 16], -1).reshape(-1, 2).float()])
    times = torch.cat([torch.full((1, 1), math.nan), ((f + 0.5) * 2).reshape(-1, 1).float()])
    q, k = _qk(2, 2, n, n, 32, dtype, seed=13)
    cpu, cuda = _both(vitmad.attention_stats_qk, q, k, positions=positions, times=times,
                      stats=("mad", "temporal_mad", "entropy", "prefix_mass", "self_mass"), renormalize=renormalize,
                      reduction="none")
    _check(cpu, cuda, dtype)


@CUDA
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_nan_and_infinite_logits_across_key_tiles_match_the_cpu(dtype):
    """A NaN logit makes its row NaN, wherever its tile; -inf logits (masked keys) add nothing, also when a
    whole tile of them precedes the NaN."""
    n = 1 + 150
    q, k = _qk(1, 2, n, n, 16, dtype, seed=14)
    bias = torch.zeros(n, n, dtype=dtype)
    bias[10, :] = -math.inf
    bias[10, 100] = math.nan  # NaN after a fully masked first tile
    bias[20, 1:70] = -math.inf
    bias[30, 0] = math.inf  # +inf on the CLS key: softmax is NaN
    for renormalize in (False, True):
        cpu, cuda = _both(vitmad.attention_stats_qk, q, k, 16, grid=(10, 15), stats=ALL, attn_bias=bias,
                          renormalize=renormalize, reduction="none")
        _check(cpu, cuda, dtype)
        assert cuda["entropy"][0, :, 9].isnan().all()


@CUDA
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_many_key_tiles_equal_the_cpu(dtype):
    grid = (40, 40)
    n = 1 + 1600
    q, k = _qk(1, 2, n, n, 64, dtype, seed=15)
    cpu, cuda = _both(vitmad.attention_stats_qk, q, k, 14, grid=grid, stats=ALL, reduction="none")
    _check(cpu, cuda, dtype)


@CUDA
def test_no_query_and_no_matrix():
    q, k = _qk(2, 2, 0, 6, 8, torch.float32, seed=16)
    positions, key_positions = torch.zeros(0, 2), _positions(6, 2, seed=17)
    cpu, cuda = _both(vitmad.attention_stats_qk, q, k, positions=positions, key_positions=key_positions,
                      stats=("mad", "entropy"))
    _check(cpu, cuda, torch.float32)
    q, k = _qk(0, 2, 6, 6, 8, torch.float32, seed=18)
    cpu, cuda = _both(vitmad.attention_stats_qk, q, k, positions=_positions(6, 2, seed=19), stats=ALL)
    _check(cpu, cuda, torch.float32)


@pytest.mark.skipif(not vitmad.has_compiled_kernel("mad_qk", "CUDA"), reason="a library built without CUDA kernels")
def test_the_statistics_kernels_are_registered_only_when_asked_for():
    """Until a GPU has run them, the CUDA kernels of the statistics (from q and k, and from attention probabilities:
    csrc/cuda/stats_cuda.cu) serve only with VITMAD_CUDA_STATS_KERNELS=1; the
    pure-PyTorch kernels otherwise. Checked in fresh processes (the registration happens when the library loads),
    with or without a GPU."""
    probe = ("import vitmad; print(*(vitmad.has_compiled_kernel(op, 'CUDA') "
             "for op in ('stats_qk', 'stats_qk_pos', 'stats', 'stats_pos', 'mad_qk')))")
    for value, expected in (("1", "True True True True True"), ("0", "False False False False True"),
                            (None, "False False False False True")):
        env = {k: v for k, v in os.environ.items() if k != "VITMAD_CUDA_STATS_KERNELS"}
        if value is not None:
            env["VITMAD_CUDA_STATS_KERNELS"] = value
        done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == expected, (value, done.stdout)
