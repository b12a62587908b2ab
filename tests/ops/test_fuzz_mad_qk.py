"""Property-based fuzzing of vitmad::mad_qk against the float64 materialised route, and of its argument checks.

The reference is softmax(q @ k^T * scale + bias) in float64 from the very values the kernel reads (inputs are
rounded to the tested dtype first), then the MAD reference. What remains is the kernel's own rounding, bounded
from first principles below rather than by a tuned tolerance, so large logits are fuzzed as hard as small ones.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import vitmad
from conftest import CUDA_PARAM, draw_block_edge_bias, subprocess_env
from vitmad.ops.reference import mad_reference

# Four times the mad fuzzers' count for the valid calls (mad_qk has many more knobs); VITMAD_FUZZ_EXAMPLES
# scales both.
EXAMPLES = int(os.environ.get("VITMAD_FUZZ_EXAMPLES", "400"))
FUZZ_VALID = settings(max_examples=4 * EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# A few examples of a size that crosses several key blocks, as many as the time allows.
LARGE = settings(max_examples=max(EXAMPLES // 20, 5), deadline=None, suppress_health_check=[HealthCheck.too_slow])
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def _stored(draw, shape, dtype, gen, std):
    """A random ``shape`` tensor of ``dtype`` in a random memory layout (the values do not depend on it)."""
    values = (std * torch.randn(shape, generator=gen, dtype=torch.float64)).to(dtype)
    layout = draw(st.sampled_from(["contiguous", "transposed", "sliced", "tokens_first", "expanded"]))
    if layout == "transposed":  # stored [..., D, N]
        return values.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout == "sliced":  # a window of a larger buffer: row stride > D, storage offset > 0
        padded = torch.zeros(*shape[:-2], shape[-2] + 3, shape[-1] + 2, dtype=dtype)
        padded[..., 2 : shape[-2] + 2, 1 : shape[-1] + 1] = values
        return padded[..., 2 : shape[-2] + 2, 1 : shape[-1] + 1]
    if layout == "tokens_first" and len(shape) >= 3:  # [B, N, H, D] viewed as [B, H, N, D], as models do
        return values.transpose(-3, -2).contiguous().transpose(-3, -2)
    if layout == "expanded" and len(shape) >= 3 and shape[0] > 0:  # stride 0 on the first dimension
        return values[:1].expand(*shape)
    return values


@st.composite
def mad_qk_cases(draw):
    """A random valid call: leading dims (zero-size included), N, D, prefix, grid, patch, dtype, layouts,
    logit size, bias shape (broadcast, expanded, bool mask) and NaN/Inf placement."""
    prefix = draw(st.integers(0, 4))
    grid_h, grid_w = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    n, d = prefix + grid_h * grid_w, draw(st.integers(1, 40))
    leading = draw(st.lists(st.integers(0, 3), min_size=0, max_size=3))
    dtype = draw(st.sampled_from(DTYPES))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    # Logits of size ~logit_size: 1e3 overflows a naive exp(logit) in any precision.
    logit_size = draw(st.sampled_from([0.01, 1.0, 30.0, 1e3]))
    std = math.sqrt(logit_size) * d**0.25
    q = _stored(draw, (*leading, n, d), dtype, gen, std)
    k = _stored(draw, (*leading, n, d), dtype, gen, std)
    q, k = _poison(draw, q, k)
    kwargs = dict(
        num_prefix_tokens=prefix,
        grid=None if grid_h == grid_w and draw(st.booleans()) else [grid_h, grid_w],
        scale=draw(st.sampled_from([None, 0.5, -1.0, 1e-3])),
        attn_bias=_bias(draw, (*leading, n, n), dtype, gen, logit_size),
        renormalize=draw(st.booleans()),
        reduction=draw(st.sampled_from(["mean", "none"])),
    )
    return q, k, draw(st.integers(1, 32)), kwargs


def _poison(draw, q, k):
    """q and k, or one of them with one element NaN, +inf or -inf."""
    if q.numel() and draw(st.booleans()):
        index = tuple(draw(st.integers(0, s - 1)) for s in q.shape)
        target = draw(st.sampled_from(["q", "k"]))
        poisoned = (q if target == "q" else k).clone()
        poisoned[index] = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
        q, k = (poisoned, k) if target == "q" else (q, poisoned)
    return q, k


@st.composite
def mad_qk_cases_beyond_several_key_blocks(draw):
    """A random valid call with more than 1,500 keys: several of the CPU's 512-key blocks and many CUDA tiles,
    with leading keys masked up to a block edge for some queries, and NaN, +inf or -inf on keys next to block
    edges (float bias), the same masks as a bool bias, or a NaN/Inf in q or k."""
    prefix = draw(st.integers(0, 4))
    grid_h = draw(st.integers(24, 40))
    grid_w = -(-1501 // grid_h) + draw(st.integers(0, 4))
    n, d = prefix + grid_h * grid_w, draw(st.integers(1, 16))
    leading = draw(st.sampled_from([[], [1], [2], [1, 2]]))
    dtype = draw(st.sampled_from(DTYPES))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    logit_size = draw(st.sampled_from([0.01, 1.0, 30.0]))
    std = math.sqrt(logit_size) * d**0.25
    q = _stored(draw, (*leading, n, d), dtype, gen, std)
    q, k = _poison(draw, q, _stored(draw, (*leading, n, d), dtype, gen, std))
    kind = draw(st.sampled_from(["float", "float", "bool", None]))
    bias = None
    if kind is not None:
        bias = draw_block_edge_bias(draw, n, n, gen)
        bias = bias != -math.inf if kind == "bool" else (bias * math.sqrt(logit_size)).to(dtype)
    kwargs = dict(num_prefix_tokens=prefix, grid=[grid_h, grid_w], scale=None, attn_bias=bias,
                  renormalize=draw(st.booleans()), reduction=draw(st.sampled_from(["mean", "none"])))
    return q, k, draw(st.integers(1, 32)), kwargs


def _bias(draw, logits_shape, dtype, gen, logit_size):
    """None, or a float / bool bias of a shape broadcastable to ``logits_shape``, possibly an expanded view."""
    kind = draw(st.sampled_from([None, "float", "bool"]))
    if kind is None:
        return None
    kept = draw(st.integers(2, len(logits_shape)))  # trailing dims kept; the rest broadcast implicitly
    shape = [1 if draw(st.booleans()) else s for s in logits_shape[-kept:]]
    if kind == "bool":
        bias = torch.rand(shape, generator=gen) > draw(st.sampled_from([0.0, 0.3, 0.9]))
    else:
        bias = (2 * math.sqrt(logit_size) * torch.randn(shape, generator=gen, dtype=torch.float64)).to(dtype)
    if draw(st.booleans()):
        bias = bias.expand(logits_shape[-kept:])  # broadcast strides, read in place
    return bias


def _reference_logits(q, k, scale, bias, num_prefix_tokens, renormalize):
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = (q.double() @ k.double().transpose(-1, -2)) * scale
    if bias is not None:
        logits = logits.masked_fill(~bias, -math.inf) if bias.dtype == torch.bool else logits + bias.double()
    if renormalize:
        # Renormalised MAD is the mean distance under the softmax over patch keys alone (finite prefix logits
        # cancel out; a NaN or +inf one makes softmax NaN); leaving them out keeps float64 from underflowing to
        # 0 / 0 where the kernel rightly does not.
        prefix = logits[..., :num_prefix_tokens]
        logits[..., :num_prefix_tokens] = prefix.masked_fill(prefix < math.inf, -math.inf)
    return logits


def _rounding_bound(q, k, scale, bias, logits, acc_dtype):
    """Largest change of each query's logits that the kernel's rounding can cause, ``[..., N]``.

    A dot product of D terms accumulated in precision u is off by at most (D + 2) u sum |q_i k_i| |scale| (the
    +2 covers scaling q and adding the bias). Multiplying every softmax weight by a factor in [e^-x, e^x]
    moves a ratio of weighted sums (MAD) by a factor in [e^-2x, e^2x], whatever the logits' size.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    u = torch.finfo(acc_dtype).eps / 2
    size = (q.double().abs() @ k.double().abs().transpose(-1, -2)) * abs(scale)
    if bias is not None and bias.dtype != torch.bool:
        size = size + bias.double().abs()
    size = torch.where(logits.isfinite(), size, 0.0)  # keys masked out (-inf) carry no weight
    return (q.shape[-1] + 2) * u * size.amax(-1)


@FUZZ_VALID
@given(mad_qk_cases())
def test_fuzz_mad_qk_matches_materialised_route(case):
    _check_against_materialised_route(case, "cpu")


@pytest.mark.parametrize("device", ["cpu", CUDA_PARAM])
@LARGE
@given(mad_qk_cases_beyond_several_key_blocks())
def test_fuzz_mad_qk_beyond_several_key_blocks(device, case):
    _check_against_materialised_route(case, device)


def _check_against_materialised_route(case, device):
    q, k, patch, kwargs = case
    bias = kwargs["attn_bias"]
    out = vitmad.mad_qk(q.to(device), k.to(device), patch,
                        **{**kwargs, "attn_bias": None if bias is None else bias.to(device)}).cpu()
    prefix, renormalize = kwargs["num_prefix_tokens"], kwargs["renormalize"]
    logits = _reference_logits(q, k, kwargs["scale"], kwargs["attn_bias"], prefix, renormalize)
    ref = mad_reference(logits.softmax(-1), patch, num_prefix_tokens=prefix, grid=kwargs["grid"],
                        renormalize=renormalize, reduction=kwargs["reduction"])
    assert out.shape == ref.shape
    assert out.dtype == (torch.float64 if q.dtype == torch.float64 else torch.float32)
    assert torch.equal(out.isnan(), ref.isnan()), "NaN exactly where softmax gives NaN"

    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    shift = _rounding_bound(q, k, kwargs["scale"], kwargs["attn_bias"], logits, acc)[..., prefix:]
    if kwargs["reduction"] == "mean":
        shift = shift.amax(-1)
    grid = kwargs["grid"] or [math.isqrt(q.shape[-2] - prefix)] * 2
    farthest = patch * math.hypot(grid[0] - 1, grid[1] - 1)
    # Accumulation tolerance of the other tests (tests/helpers.tolerance), plus the logits' rounding effect.
    base = 1e-10 if acc == torch.float64 else 2e-5
    bound = base + base * ref.abs() + torch.expm1(2 * shift) * farthest
    finite = ~ref.isnan()
    assert ((out.double() - ref).abs()[finite] <= bound[finite]).all()


def _qk(lead, n, d, dtype=torch.float32):
    return torch.randn(*lead, n, d, dtype=dtype)


@st.composite
def bad_mad_qk_calls(draw):
    """Arguments of which exactly one is invalid, with the exception and message start it must raise."""
    lead = draw(st.lists(st.integers(1, 3), min_size=0, max_size=2))
    n, d = 1 + draw(st.integers(1, 6)) ** 2, draw(st.integers(1, 9))  # CLS + a square grid: valid by default
    q, k, patch = _qk(lead, n, d), _qk(lead, n, d), 16
    kwargs: dict = {}
    fault = draw(st.sampled_from(["q_dtype", "k_dtype", "rank", "lead", "head_dim", "tokens", "zero_d", "scale",
                                  "bias_dtype", "bias_shape", "bias_rank", "prefix", "grid", "grid_overflow",
                                  "patch", "reduction"]))
    error, message = ValueError, fault
    if fault == "q_dtype":
        dtype = draw(st.sampled_from([torch.int32, torch.int64, torch.uint8, torch.bool, torch.complex64]))
        q, k, error, message = q.to(dtype), k.to(dtype), TypeError, "q must be float16"
    elif fault == "k_dtype":
        k = k.to(draw(st.sampled_from([torch.float64, torch.float16])))
        error, message = TypeError, "k must have q's dtype"
    elif fault == "rank":
        q, k, message = torch.randn(d), torch.randn(d), "q must have at least 2 dimensions"
    elif fault == "lead":
        k, message = _qk([*lead, 2], n, d), "k must have q's leading dimensions"
    elif fault == "head_dim":
        k, message = _qk(lead, n, d + draw(st.integers(1, 5))), "k must have q's head dimension"
    elif fault == "tokens":
        k, message = _qk(lead, n + draw(st.integers(1, 5)), d), "k must have q's number of tokens"
    elif fault == "zero_d":
        q, k, message = _qk(lead, n, 0), _qk(lead, n, 0), "q must have a head dimension D > 0"
    elif fault == "scale":
        kwargs["scale"], message = draw(st.sampled_from([math.nan, math.inf, -math.inf])), "scale must be finite"
    elif fault == "bias_dtype":
        kwargs["attn_bias"] = torch.zeros(n, n, dtype=draw(st.sampled_from([torch.float64, torch.int64])))
        error, message = TypeError, "attn_bias must"
    elif fault == "bias_shape":
        kwargs["attn_bias"], message = torch.zeros(n, n + draw(st.integers(1, 4))), "attn_bias must be broadcastable"
    elif fault == "bias_rank":
        kwargs["attn_bias"], message = torch.zeros(2, *[1] * len(lead), n, n), "attn_bias must be broadcastable"
    elif fault == "prefix":
        kwargs["num_prefix_tokens"] = draw(st.one_of(st.integers(-50, -1), st.integers(n, n + 50)))
        message = "num_prefix_tokens must be in"
    elif fault == "grid":
        kwargs["grid"], message = [1, n - 1 + draw(st.integers(1, 5))], "but q has N - num_prefix_tokens"
    elif fault == "grid_overflow":
        # A product past int64 (one that wrapped onto the patch count used to pass the check and segfault).
        a = draw(st.sampled_from([2**32, 2**33, 3 * 2**40]))
        kwargs["grid"], message = [a, 2**64 // a + draw(st.integers(0, 5))], "but q has N - num_prefix_tokens"
    elif fault == "patch":
        patch, message = draw(st.integers(-100, 0)), "patch must be a positive"
    else:
        kwargs["reduction"], message = draw(st.sampled_from(["sum", "", "MEAN", "max"])), "reduction must be"
    return q, k, patch, kwargs, error, message


@FUZZ
@given(bad_mad_qk_calls())
def test_fuzz_mad_qk_invalid_arguments_raise_documented_errors(call):
    q, k, patch, kwargs, error, message = call
    with pytest.raises(error, match=rf"^vitmad\.mad_qk: .*{message}"):
        vitmad.mad_qk(q, k, patch, **kwargs)


# Argument combinations that used to crash the process (int64 overflow of the grid product wrapped onto the
# patch count, then the kernels indexed far out of bounds): run in a child, so a regression is a failed test
# rather than a dead test run.
CRASH_PRONE = textwrap.dedent("""
    import torch, vitmad
    wrapping = [3, 6148914691236517206]  # 3 * that = 2^64 + 2: wraps to the 2 patches of N = 3, P = 1
    calls = {
        "mad": lambda: vitmad.mad(torch.full((1, 3, 3), 1 / 3), 16, grid=wrapping),
        "mad_backward": lambda: torch.ops.vitmad.mad_backward(torch.ones(1), torch.full((1, 3, 3), 1 / 3), 16,
                                                               grid=wrapping),
        "mad_qk": lambda: vitmad.mad_qk(torch.randn(1, 3, 4), torch.randn(1, 3, 4), 16, grid=wrapping),
        "mad_huge_grid": lambda: vitmad.mad(torch.full((1, 3, 3), 1 / 3), 16, grid=[2**62, 2**62]),
    }
    for name, call in calls.items():
        try:
            call()
            print(name, "no error")
        except ValueError as err:
            print(name, "ValueError", str(err).split(":")[0])
""")


def test_crash_prone_arguments_raise_in_a_subprocess():
    env = subprocess_env()
    done = subprocess.run([sys.executable, "-c", CRASH_PRONE], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, f"child died with status {done.returncode}: {done.stderr[-2000:]}"
    assert done.stdout.split("\n")[:4] == [
        "mad ValueError vitmad.mad", "mad_backward ValueError vitmad.mad_backward",
        "mad_qk ValueError vitmad.mad_qk", "mad_huge_grid ValueError vitmad.mad",
    ]
