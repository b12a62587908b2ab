"""Property-based fuzzing of the position form (vitmad::mad_pos, mad_pos_backward, mad_qk_pos) against the float64
references: random positions with NaN rows, rectangular attention, broadcast and per-sample positions, K = 1..3,
memory layouts, NaN/Inf in the attention, and key counts beyond several of the kernels' key blocks."""

from __future__ import annotations

import math
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import vitmad
from conftest import CUDA_PARAM, DTYPES, draw_block_edge_bias
from vitmad.ops.reference import (
    mad_positions_backward_reference,
    mad_positions_reference,
    mad_qk_positions_reference,
    position_distances,
)

EXAMPLES = int(os.environ.get("VITMAD_FUZZ_EXAMPLES", "400"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# A few examples of a size that crosses several 512-key blocks, as many as the time allows.
LARGE = settings(max_examples=max(EXAMPLES // 20, 5), deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _positions(draw, gen, leading, n, k, dtype):
    """[*broadcast_lead, n, k] positions: shared, per leading index or partly broadcast; some rows NaN."""
    lead = [size if draw(st.booleans()) else 1 for size in leading]
    lead = lead[len(lead) - draw(st.integers(0, len(lead))):]  # drop some leading dims (right-aligned)
    pos = draw(st.sampled_from([1.0, 16.0, 300.0])) * torch.rand(*lead, n, k, generator=gen, dtype=torch.float64)
    if n and draw(st.booleans()):
        rows = draw(st.lists(st.integers(0, n - 1), max_size=max(1, n // 3)))
        pos[..., rows, :] = math.nan
    return pos.to(dtype)


@st.composite
def position_cases(draw, max_tokens=40, min_keys=0):
    leading = draw(st.lists(st.integers(0, 3), min_size=0, max_size=3))
    nq = draw(st.integers(0, max_tokens))
    nk = nq if draw(st.booleans()) and min_keys == 0 else draw(st.integers(max(min_keys, 0), max_tokens + min_keys))
    k = draw(st.integers(1, 3))
    dtype = draw(st.sampled_from(DTYPES))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    logits = torch.randn(*leading, nq, nk, generator=gen, dtype=torch.float64) * draw(st.sampled_from([0.1, 1, 5]))
    attn = logits.softmax(-1).to(dtype)
    layout = draw(st.sampled_from(["contiguous", "transposed", "sliced"]))
    if layout == "transposed":
        attn = attn.transpose(-1, -2).contiguous().transpose(-1, -2)
    elif layout == "sliced":
        padded = torch.zeros(*leading, nq + 1, nk + 3, dtype=dtype)
        padded[..., 1:, 2 : nk + 2] = attn
        attn = padded[..., 1:, 2 : nk + 2]
    if attn.numel() and draw(st.booleans()):
        attn = attn.clone()
        attn[tuple(draw(st.integers(0, s - 1)) for s in attn.shape)] = draw(st.sampled_from([math.nan, math.inf]))
    positions = _positions(draw, gen, leading, nq, k, draw(st.sampled_from([torch.float32, torch.float64])))
    key_positions = None
    if nk != nq or draw(st.booleans()):
        key_positions = _positions(draw, gen, leading, nk, k, positions.dtype)
    options = {"renormalize": draw(st.booleans()), "reduction": draw(st.sampled_from(["mean", "none"]))}
    return attn, positions, key_positions, options


def _tol(dtype):
    return {"rtol": 1e-10, "atol": 1e-10} if dtype == torch.float64 else {"rtol": 5e-5, "atol": 5e-5}


def _check_mad(case):
    attn, positions, key_positions, options = case
    out = vitmad.mad(attn, positions=positions, key_positions=key_positions, **options)
    ref = mad_positions_reference(attn, positions, key_positions, **options)
    assert out.shape == ref.shape
    # Distances are up to ~500 (positions up to 300 in 3-D): the tolerance scales with them.
    scale = max(1.0, float(ref[ref.isfinite()].abs().max()) if ref.isfinite().any() else 1.0)
    tol = _tol(attn.dtype)
    torch.testing.assert_close(out.double(), ref, equal_nan=True, rtol=tol["rtol"], atol=tol["atol"] * scale)


@FUZZ
@given(position_cases())
def test_fuzz_mad_positions(case):
    _check_mad(case)


@LARGE
@given(position_cases(max_tokens=8, min_keys=1500))
def test_fuzz_mad_positions_beyond_several_key_blocks(case):
    _check_mad(case)


@FUZZ
@given(position_cases())
def test_fuzz_mad_positions_backward(case):
    attn, positions, key_positions, options = case
    attn = attn.nan_to_num(0.0, 0.0, 0.0)
    out = vitmad.mad(attn, positions=positions, key_positions=key_positions, **options)
    grad = torch.randn(out.shape, dtype=out.dtype)
    grad_attn = torch.ops.vitmad.mad_pos_backward(grad, attn, positions, key_positions, **options)
    expected = mad_positions_backward_reference(grad, attn, positions, key_positions, **options)
    expected = expected.to(attn.dtype).double()
    finite = expected[expected.isfinite()]
    scale = finite.abs().max().item() if finite.numel() else 1.0
    rounding = {torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float64: 1e-10}.get(attn.dtype, 5e-5)
    # Renormalised, each entry is g / mass * (d - m): a difference of two distances of up to d_max, each
    # rounded in the accumulation dtype. Its error is a few ulps of d_max times g / mass, however small the
    # difference itself is (positions far from all keys make every d - m tiny).
    cancellation = 0.0
    if options["renormalize"]:
        keys = positions if key_positions is None else key_positions
        has_key = ~keys.double()[..., 0].isnan()
        distances = position_distances(positions, keys)
        d_max = distances[distances.isfinite()].abs().max().item() if distances.isfinite().any() else 0.0
        mass = torch.where(has_key[..., None, :], attn.double(), 0.0).sum(-1)
        mass_min = mass[mass > 0].min().item() if (mass > 0).any() else 1.0
        eps = torch.finfo(torch.float64 if attn.dtype == torch.float64 else torch.float32).eps
        cancellation = 64 * eps * d_max * grad.abs().max().item() / mass_min if grad.numel() else 0.0
    torch.testing.assert_close(grad_attn.double(), expected, rtol=rounding,
                               atol=rounding * max(scale, 1.0) + cancellation, equal_nan=True)


@st.composite
def qk_cases(draw, max_tokens=40, min_keys=0, block_edges=False):
    """A random call of the position form of mad_qk. With ``block_edges``, the bias masks leading keys up to a
    key-block edge for some queries and puts NaN, +inf or -inf next to block edges (float), or is that mask
    (bool), and q or k may hold a NaN or Inf."""
    attn, positions, key_positions, options = draw(position_cases(max_tokens, min_keys))
    leading, (nq, nk) = attn.shape[:-2], attn.shape[-2:]
    d = draw(st.sampled_from([1, 3, 8, 16, 33]))
    dtype = attn.dtype
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    logit_size = draw(st.sampled_from([0.3, 1.0, 4.0]))
    q = (torch.randn(*leading, nq, d, generator=gen) * logit_size * d**-0.25).to(dtype)
    k = (torch.randn(*leading, nk, d, generator=gen) * d**-0.25).to(dtype)
    bias = None
    if block_edges and nk:
        bias = draw_block_edge_bias(draw, nq, nk, gen)
        bias = bias != -math.inf if draw(st.integers(0, 3)) == 0 else bias.to(dtype)
        if q.numel() and draw(st.booleans()):
            poisoned = draw(st.sampled_from([q, k])).view(-1)
            poisoned[draw(st.integers(0, poisoned.numel() - 1))] = draw(st.sampled_from([math.nan, math.inf]))
    elif draw(st.booleans()) and nk:
        if draw(st.booleans()):
            bias = torch.rand(nq, nk, generator=gen) > 0.3
            bias[:, 0] = True
        else:
            bias = torch.randn(nq, nk, generator=gen).to(dtype)
    scale = draw(st.sampled_from([None, 0.2, 1.0]))
    return q, k, positions, key_positions, {"attn_bias": bias, "scale": scale, **options}


def _check_mad_qk(case, device="cpu"):
    q, k, positions, key_positions, options = case
    moved = {name: value.to(device) if isinstance(value, torch.Tensor) else value for name, value in options.items()}
    out = vitmad.mad_qk(q.to(device), k.to(device), positions=positions.to(device),
                        key_positions=None if key_positions is None else key_positions.to(device), **moved).cpu()
    ref = mad_qk_positions_reference(q, k, positions, key_positions, **options)
    assert out.shape == ref.shape
    scale = max(1.0, float(ref[ref.isfinite()].abs().max()) if ref.isfinite().any() else 1.0)
    # Logits are rounded to float32 before the softmax: a looser bound than for mad, scaled by the distances.
    tol = 1e-10 if q.dtype == torch.float64 else 2e-4
    torch.testing.assert_close(out.double(), ref, equal_nan=True, rtol=tol, atol=tol * scale)


@FUZZ
@given(qk_cases())
def test_fuzz_mad_qk_positions(case):
    _check_mad_qk(case)


@pytest.mark.parametrize("device", ["cpu", CUDA_PARAM])
@LARGE
@given(qk_cases(max_tokens=8, min_keys=1500, block_edges=True))
def test_fuzz_mad_qk_positions_beyond_several_key_blocks(device, case):
    _check_mad_qk(case, device)
