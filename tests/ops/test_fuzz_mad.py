"""Property-based fuzzing of vitmad::mad and vitmad::mad_backward against the float64 reference."""

from __future__ import annotations

import math
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import vitmad
from vitmad.ops.reference import mad_backward_reference, mad_reference

# Enough examples to matter in CI; VITMAD_FUZZ_EXAMPLES scales it up for a long local run.
EXAMPLES = int(os.environ.get("VITMAD_FUZZ_EXAMPLES", "400"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


@st.composite
def mad_cases(draw):
    """A random valid call: leading dims, prefix count, grid, patch, dtype, memory layout, NaN/Inf."""
    prefix = draw(st.integers(0, 5))
    grid_h, grid_w = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    n = prefix + grid_h * grid_w
    square = grid_h == grid_w and draw(st.booleans())
    leading = draw(st.lists(st.integers(0, 3), min_size=0, max_size=3))
    dtype = draw(st.sampled_from(DTYPES))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    attn = (torch.randn(*leading, n, n, generator=gen, dtype=torch.float64) * draw(st.sampled_from([0.1, 1, 5])))
    attn = attn.softmax(-1).to(dtype)
    layout = draw(st.sampled_from(["contiguous", "transposed", "sliced", "expanded"]))
    if layout == "transposed":
        attn = attn.transpose(-1, -2).contiguous().transpose(-1, -2)
    elif layout == "sliced":
        padded = torch.zeros(*leading, n + 2, n + 3, dtype=dtype)
        padded[..., 1 : n + 1, 2 : n + 2] = attn
        attn = padded[..., 1 : n + 1, 2 : n + 2]
    elif layout == "expanded" and attn.dim() >= 3 and attn.shape[0] > 0:
        attn = attn[:1].expand(*attn.shape)  # stride 0 on the first dim
    if attn.numel() and draw(st.booleans()):
        index = tuple(draw(st.integers(0, s - 1)) for s in attn.shape)
        attn = attn.clone()
        attn[index] = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
    kwargs = dict(
        num_prefix_tokens=prefix,
        grid=None if square else [grid_h, grid_w],
        renormalize=draw(st.booleans()),
        reduction=draw(st.sampled_from(["mean", "none"])),
    )
    return attn, draw(st.integers(1, 32)), kwargs


def _tol(dtype):
    return {"rtol": 1e-10, "atol": 1e-10} if dtype == torch.float64 else {"rtol": 3e-5, "atol": 3e-5}


@FUZZ
@given(mad_cases())
def test_fuzz_mad(case):
    attn, patch, kwargs = case
    out = vitmad.mad(attn, patch, **kwargs)
    ref = mad_reference(attn, patch, **kwargs)
    assert out.shape == ref.shape
    # NaN exactly where the reference has NaN; values agree elsewhere (infinities included).
    torch.testing.assert_close(out.double(), ref, equal_nan=True, **_tol(attn.dtype))


@FUZZ
@given(mad_cases())
def test_fuzz_mad_backward(case):
    attn, patch, kwargs = case
    attn = attn.nan_to_num(0.0, 0.0, 0.0)
    out = vitmad.mad(attn, patch, **kwargs)
    grad = torch.randn(out.shape, dtype=out.dtype)
    grad_attn = torch.ops.vitmad.mad_backward(grad, attn, patch, **kwargs)
    # The gradient is returned in attn's dtype: compare with the reference rounded the same way (a float16
    # gradient of 1e5 is inf in both).
    expected = mad_backward_reference(grad, attn, patch, **kwargs).to(attn.dtype).double()
    finite = expected[expected.isfinite()]
    scale = finite.abs().max().item() if finite.numel() else 1.0
    rounding = {torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float64: 1e-10}.get(attn.dtype, 3e-5)
    torch.testing.assert_close(grad_attn.double(), expected, rtol=rounding, atol=rounding * scale, equal_nan=True)


@st.composite
def bad_calls(draw):
    """Arguments of which exactly one is invalid."""
    n = draw(st.integers(1, 40))
    fault = draw(st.sampled_from(["rank", "square", "patch", "prefix", "grid_len", "grid_value", "grid_size",
                                  "reduction", "dtype"]))
    shape, patch, kwargs, dtype = [2, n, n], 16, {"num_prefix_tokens": 0, "grid": [1, n]}, torch.float32
    if fault == "rank":
        shape = [n] if draw(st.booleans()) else []
    elif fault == "square":
        shape = [2, n, n + draw(st.integers(1, 5))]
    elif fault == "patch":
        patch = draw(st.integers(-100, 0))
    elif fault == "prefix":
        kwargs["num_prefix_tokens"] = draw(st.one_of(st.integers(-50, -1), st.integers(n, n + 50)))
    elif fault == "grid_len":
        kwargs["grid"] = [1] * draw(st.sampled_from([0, 1, 3, 4]))
    elif fault == "grid_value":
        kwargs["grid"] = [draw(st.integers(-5, 0)), n]
    elif fault == "grid_size":
        kwargs["grid"] = [1, n + draw(st.integers(1, 5))]
    elif fault == "reduction":
        kwargs["reduction"] = draw(st.sampled_from(["sum", "", "MEAN", "max"]))
    else:
        dtype = draw(st.sampled_from([torch.int32, torch.int64, torch.uint8, torch.bool, torch.complex64]))
    return torch.zeros(shape, dtype=dtype), patch, kwargs


@FUZZ
@given(bad_calls())
def test_fuzz_invalid_arguments_raise_documented_errors(call):
    attn, patch, kwargs = call
    with pytest.raises((ValueError, TypeError), match=r"^vitmad\.mad: "):
        vitmad.mad(attn, patch, **kwargs)
