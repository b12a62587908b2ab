"""NaN across key blocks: a NaN logit whose key block is otherwise masked must make its row NaN, as softmax
does, in every kernel (the CPU's 512-key blocks, CUDA's 64- and 32-key tiles), both forms and every dtype.

The running max of the online softmax once dropped such a NaN (``max(-inf, NaN)`` returned ``-inf``) and the
block was skipped as fully masked, so ``N = 600``, ``attn_bias[:512] = -inf`` except ``attn_bias[5] = NaN``
gave a finite MAD.
"""

from __future__ import annotations

import math

import pytest
import torch

import vitmad
from conftest import DTYPES, tolerance
from vitmad.ops.reference import mad_qk_positions_reference, mad_qk_reference

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                reason="no CUDA device"))]
N = 600
GRID = [23, 26]  # N = 2 prefix tokens + 23 x 26 patches


def _qk(dtype, device, heads=2):
    gen = torch.Generator().manual_seed(0)
    q, k = (torch.randn(heads, N, 16, generator=gen, dtype=torch.float64) for _ in range(2))
    return q.to(device=device, dtype=dtype), k.to(device=device, dtype=dtype)


def _key_bias(dtype, device, masked, poisoned, value=math.nan):
    """A key bias [N]: -inf on keys [0, masked), `value` on key `poisoned`, 0 elsewhere."""
    bias = torch.zeros(N, dtype=torch.float64)
    bias[:masked] = -math.inf
    bias[poisoned] = value
    return bias.to(device=device, dtype=dtype)


# (masked keys, poisoned key): the case, and the poisoned key at the first and last key of a CPU block,
# of a 64-key tile, and of a 32-key float64 tile, each with every key before it masked.
CASES = [(512, 5), (512, 511), (512, 0), (513, 512), (64, 63), (65, 64), (32, 31), (33, 32), (599, 598)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize(("masked", "poisoned"), CASES)
def test_nan_logit_among_masked_keys_gives_nan(device, dtype, renormalize, masked, poisoned):
    q, k = _qk(dtype, device)
    bias = _key_bias(dtype, device, masked, poisoned)
    out = vitmad.mad_qk(q, k, 16, num_prefix_tokens=2, grid=GRID, attn_bias=bias, renormalize=renormalize,
                        reduction="none")
    ref = mad_qk_reference(q.cpu(), k.cpu(), 16, num_prefix_tokens=2, grid=GRID, attn_bias=bias.cpu(),
                           renormalize=renormalize, reduction="none")
    assert ref.isnan().all()
    assert out.isnan().all(), f"{int((~out.isnan()).sum())} of {out.numel()} rows lost the NaN"

    positions = vitmad.grid_positions(*GRID, 16, num_prefix_tokens=2, dtype=torch.float64, device=device)
    out = vitmad.mad_qk(q, k, positions=positions, attn_bias=bias, renormalize=renormalize, reduction="none")
    has_query = ~positions[:, 0].isnan()
    assert out[..., has_query].isnan().all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_undefined_logit_of_a_key_without_position_gives_nan_when_renormalised(device, dtype, value):
    # Renormalised, keys without a position (grid form: prefix tokens) are masked out of the softmax; a NaN or
    # +inf logit there still makes softmax over every key, hence the row, NaN.
    q, k = _qk(dtype, device)
    bias = _key_bias(dtype, device, 0, 1, value)
    out = vitmad.mad_qk(q, k, 16, num_prefix_tokens=2, grid=GRID, attn_bias=bias, renormalize=True,
                        reduction="none")
    assert out.isnan().all()
    positions = vitmad.grid_positions(*GRID, 16, num_prefix_tokens=2, dtype=torch.float64, device=device)
    out = vitmad.mad_qk(q, k, positions=positions, attn_bias=bias, renormalize=True, reduction="none")
    ref = mad_qk_positions_reference(q.cpu(), k.cpu(), positions.cpu(), attn_bias=bias.cpu(), renormalize=True,
                                     reduction="none")
    assert torch.equal(out.isnan().cpu(), ref.isnan())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_masked_leading_blocks_leave_the_rest_exact(device, dtype):
    # Every key of the first CPU block masked, no NaN: the rows are finite and equal the reference.
    q, k = _qk(dtype, device)
    bias = _key_bias(dtype, device, 512, 0, -math.inf)
    out = vitmad.mad_qk(q, k, 16, num_prefix_tokens=2, grid=GRID, attn_bias=bias, reduction="none")
    ref = mad_qk_reference(q.cpu(), k.cpu(), 16, num_prefix_tokens=2, grid=GRID, attn_bias=bias.cpu(),
                           reduction="none")
    assert ref.isfinite().all()
    torch.testing.assert_close(out.double().cpu(), ref, **tolerance(dtype))
