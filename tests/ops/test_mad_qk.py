"""vitmad.mad_qk against the materialised route in float64: softmax(q @ k^T * scale + bias), then the MAD
reference. Inputs are rounded to the tested dtype first and the reference is computed from the rounded values,
so only the kernels' accumulation error (float32, or float64 for float64) remains."""

from __future__ import annotations

import pytest
import torch
from torch.library import opcheck

import vitmad
from conftest import DTYPES, compiled_kernel_available, make_bias, make_qk, tolerance
from vitmad.ops import fallback as _fallback
from vitmad.ops.reference import mad_qk_reference, mad_reference

CUDA_AVAILABLE = torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not CUDA_AVAILABLE, reason="no CUDA device"))]

# (N, num_prefix_tokens, grid, D): the sizes of the issue, odd head dims, non-square grids.
SHAPES = [
    (5, 1, [2, 2], 40),
    (197, 1, None, 72),
    (257, 1, None, 40),
    (577, 1, None, 64),
    (197, 5, [16, 12], 33),
    (200, 0, [10, 20], 40),
    (581, 5, [24, 24], 72),
]
# Bias shapes relative to logits [B, H, N, N]: full, per head (relative position bias), one [N, N] matrix,
# and a bool key-padding mask [B, 1, 1, N].
BIAS_KINDS = [None, "full", "heads", "matrix", "key_mask"]


def assert_matches_reference(out, ref, dtype):
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert out.shape == ref.shape
    torch.testing.assert_close(out.double(), ref, **tolerance(dtype))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n, prefix, grid, d", SHAPES)
@pytest.mark.parametrize("bias_kind", BIAS_KINDS)
@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_matches_materialised_route(device, n, prefix, grid, d, bias_kind, renormalize, reduction):
    q, k = make_qk(2, 2, n, d, torch.float32, device, seed=n + d)
    bias = make_bias(bias_kind, 2, 2, n, torch.float32, device, torch.Generator().manual_seed(n))
    options = dict(num_prefix_tokens=prefix, grid=grid, attn_bias=bias, renormalize=renormalize, reduction=reduction)
    out = vitmad.mad_qk(q, k, 16, **options)
    assert_matches_reference(out, mad_qk_reference(q, k, 16, **options), torch.float32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n, prefix, grid, d", [SHAPES[1], SHAPES[4], SHAPES[6]])
@pytest.mark.parametrize("bias_kind", [None, "heads"])
def test_dtypes(device, dtype, n, prefix, grid, d, bias_kind):
    q, k = make_qk(2, 3, n, d, dtype, device, seed=7)
    bias = make_bias(bias_kind, 2, 3, n, dtype, device, torch.Generator().manual_seed(1))
    options = dict(num_prefix_tokens=prefix, grid=grid, attn_bias=bias, reduction="none")
    out = vitmad.mad_qk(q, k, 14, **options)
    assert_matches_reference(out, mad_qk_reference(q, k, 14, **options), dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "tokens_outer", "odd_head_dim"])
@pytest.mark.parametrize("bias_kind", BIAS_KINDS)
@pytest.mark.parametrize("renormalize", [False, True])
def test_16_bit_layouts_and_biases(device, dtype, layout, bias_kind, renormalize):
    # 16-bit q and k on CUDA from sm_80 on take the tensor-core kernel, whose tiles are copied in 16-byte chunks
    # when every row allows it ("contiguous"; "tokens_outer" is the [B, N, H, D] view models make) and element by
    # element otherwise (D = 36 is no multiple of 8). 581 keys: nine 64-key tiles, the last one partial; 10 query
    # tiles of 64.
    n, prefix, grid = 581, 5, [24, 24]
    d = 36 if layout == "odd_head_dim" else 64
    q, k = make_qk(2, 3, n, d, dtype, "cpu", seed=11)
    if layout == "tokens_outer":
        q, k = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k))
    q, k = q.to(device), k.to(device)
    bias = make_bias(bias_kind, 2, 3, n, dtype, device, torch.Generator().manual_seed(2))
    options = dict(num_prefix_tokens=prefix, grid=grid, attn_bias=bias, renormalize=renormalize, reduction="none")
    out = vitmad.mad_qk(q, k, 14, **options)
    assert_matches_reference(out, mad_qk_reference(q, k, 14, **options), dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_logits_that_overflow_a_naive_exp(device, dtype):
    q, k = make_qk(1, 4, 197, 64, dtype, device, seed=3, logit_scale=1e4)
    logits = (q.double() @ k.double().transpose(-1, -2)) / 8
    assert logits.abs().max() > 1e3 and torch.exp(logits.float()).isinf().any()  # the naive route overflows
    # Logits near 1e4 carry an absolute float32 rounding error near 1e-3, which moves near-tied keys'
    # probabilities by as much: as flash-attention's tests do, the bound is twice the error of the same-precision
    # PyTorch route (float32 logits and softmax), plus the usual accumulation tolerance.
    # Renormalised, that route leaves the prefix keys out of the softmax (the same value), or the patch mass
    # of queries attending almost only to CLS would underflow to 0 / 0 in float32.
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    same_precision_logits = (q.to(acc) @ k.to(acc).transpose(-1, -2)) / 8
    for renormalize in (False, True):
        options = dict(renormalize=renormalize, reduction="none")
        ref = mad_qk_reference(q, k, 16, **options)
        if renormalize:
            same_precision_logits[..., :1] = float("-inf")
        same_precision_route = mad_reference(same_precision_logits.softmax(-1), 16, **options)
        route_error = (same_precision_route - ref).abs()
        out = vitmad.mad_qk(q, k, 16, **options)
        bound = 2 * route_error + tolerance(dtype)["atol"] + tolerance(dtype)["rtol"] * ref.abs()
        assert ((out.double() - ref).abs() <= bound).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["heads_inner", "dims_outer"])
def test_explicit_scale_and_strided_inputs(device, layout):
    # [B, N, H, D] viewed as [B, H, N, D], as models produce them, or [B, H, D, N] transposed (the head dimension
    # strided, which the CPU packs read value by value); a bias given as an expanded view.
    gen = torch.Generator().manual_seed(5)
    if layout == "heads_inner":
        q = torch.randn(2, 197, 3, 40, generator=gen).to(device).transpose(1, 2)
        k = torch.randn(2, 197, 3, 40, generator=gen).to(device).transpose(1, 2)
    else:
        q = torch.randn(2, 3, 43, 197, generator=gen).to(device).transpose(-1, -2)
        k = torch.randn(2, 3, 43, 197, generator=gen).to(device).transpose(-1, -2)
    bias = torch.randn(3, 1, 197, generator=gen).to(device).expand(2, 3, 197, 197)
    out = vitmad.mad_qk(q, k, 16, scale=0.3, attn_bias=bias)
    assert_matches_reference(out, mad_qk_reference(q, k, 16, scale=0.3, attn_bias=bias), torch.float32)


@pytest.mark.parametrize("device", DEVICES)
def test_fully_masked_query_gives_nan_like_softmax(device):
    q, k = make_qk(1, 1, 17, 8, torch.float32, device)
    mask = torch.ones(17, 17, dtype=torch.bool, device=device)
    mask[3] = False  # query token 3 (patch 2) may attend to nothing
    out = vitmad.mad_qk(q, k, 1, attn_bias=mask, reduction="none")
    ref = mad_qk_reference(q, k, 1, attn_bias=mask, reduction="none")
    assert out[0, 0, 2].isnan() and ref[0, 0, 2].isnan()
    keep = torch.ones_like(ref, dtype=torch.bool)
    keep[0, 0, 2] = False
    torch.testing.assert_close(out.double()[keep], ref[keep], **tolerance(torch.float32))


@pytest.mark.parametrize("device", DEVICES)
def test_leading_dims_and_empty_batch(device):
    q, k = make_qk(1, 6, 50, 16, torch.float64, device)
    q, k = q.view(2, 3, 50, 16), k.view(2, 3, 50, 16)  # any leading dims, here [L, H]
    out = vitmad.mad_qk(q, k, 16, grid=[7, 7])
    assert_matches_reference(out, mad_qk_reference(q, k, 16, grid=[7, 7]), torch.float64)
    empty = torch.empty(0, 4, 50, 16, device=device)
    assert vitmad.mad_qk(empty, empty, 16, grid=[7, 7]).shape == (0, 4)
    assert vitmad.mad_qk(q[0, 0], k[0, 0], 16, grid=[7, 7], reduction="none").shape == (49,)


@pytest.mark.parametrize("device", DEVICES)
def test_fallback_matches_compiled(device):
    if not compiled_kernel_available("mad_qk", device):
        pytest.skip(f"no compiled mad_qk kernel for {device}")
    q, k = make_qk(2, 3, 257, 40, torch.bfloat16, device)
    bias = make_bias("heads", 2, 3, 257, torch.bfloat16, device, torch.Generator().manual_seed(2))
    for renormalize in (False, True):
        options = dict(attn_bias=bias, renormalize=renormalize, reduction="none")
        torch.testing.assert_close(vitmad.mad_qk(q, k, 16, **options), _fallback.mad_qk(q, k, 16, **options),
                                   **tolerance(torch.float32))


@pytest.mark.skipif(
    not (CUDA_AVAILABLE and vitmad.backend() == "compiled"), reason="needs a GPU and the compiled library"
)
def test_cuda_kernel_is_compiled():
    """A CUDA build must carry the flash kernel rather than the pure-PyTorch stand-in."""
    assert vitmad.has_compiled_kernel("mad_qk", "CUDA")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bias_kind", [None, "heads", "key_mask"])
def test_opcheck(device, bias_kind):
    q, k = make_qk(2, 2, 50, 24, torch.float32, device)
    bias = make_bias(bias_kind, 2, 2, 50, torch.float32, device, torch.Generator().manual_seed(0))
    opcheck(torch.ops.vitmad.mad_qk.default, (q, k, 16), {"grid": [7, 7], "attn_bias": bias})
    opcheck(torch.ops.vitmad.mad_qk.default, (q, k, 16), {"grid": [7, 7], "scale": 0.5, "reduction": "none"})


def test_torch_compile_fullgraph():
    q, k = make_qk(2, 2, 197, 32, torch.float32, "cpu")
    compiled = torch.compile(lambda q, k: vitmad.mad_qk(q, k, 16, reduction="none"), fullgraph=True)
    torch.testing.assert_close(compiled(q, k), vitmad.mad_qk(q, k, 16, reduction="none"))


@pytest.mark.parametrize("device", DEVICES)
def test_gradients_are_refused_up_front(device):
    q, k = make_qk(1, 1, 17, 8, torch.float32, device)
    with pytest.raises(RuntimeError, match="mad_qk is not differentiable, but k requires grad"):
        vitmad.mad_qk(q, k.requires_grad_(), 1)
    with torch.no_grad():
        assert vitmad.mad_qk(q, k, 1).shape == (1, 1)


def _qk(n=17, d=8, dtype=torch.float32, lead=(2, 3)):
    return torch.randn(*lead, n, d, dtype=dtype)


BAD_INPUTS = [
    (dict(q=_qk().int(), k=_qk().int()), TypeError,
     r"q must be float16, bfloat16, float32 or float64, got torch\.int32$"),  # torch's spelling, as the fallback
    (dict(k=_qk(dtype=torch.float64)), TypeError, "k must have q's dtype torch.float32, got torch.float64"),
    (dict(q=torch.randn(8)), ValueError, "q must have at least 2 dimensions"),
    (dict(k=_qk(lead=(3, 2))), ValueError, "k must have q's leading dimensions"),
    (dict(k=_qk(d=9)), ValueError, "k must have q's head dimension D = 8"),
    (dict(k=_qk(n=18)), ValueError, "k must have q's number of tokens N = 17"),
    (dict(q=_qk(d=0), k=_qk(d=0)), ValueError, "q must have a head dimension D > 0"),
    (dict(scale=float("nan")), ValueError, "scale must be finite"),
    (dict(attn_bias=torch.zeros(17, 17, dtype=torch.float64)), TypeError,
     r"attn_bias must have q's dtype torch\.float32 \(added to the logits\) or be bool \(True keeps a key\), got "
     r"torch\.float64$"),
    (dict(attn_bias=torch.zeros(3, 3, 17, 17)), ValueError, r"attn_bias must be broadcastable .* \[2, 3, 17, 17\]"),
    (dict(attn_bias=torch.zeros(17, 16)), ValueError, "attn_bias must be broadcastable"),
    (dict(attn_bias=torch.zeros(1, 2, 3, 17, 17)), ValueError, "attn_bias must be broadcastable"),
    (dict(num_prefix_tokens=17), ValueError, "num_prefix_tokens must be in"),
    (dict(num_prefix_tokens=2), ValueError, "do not form a square grid"),
    (dict(grid=[3, 5]), ValueError, "but q has N - num_prefix_tokens"),
    (dict(patch=0), ValueError, "patch must be a positive"),
    (dict(reduction="max"), ValueError, "reduction must be 'mean' or 'none'"),
]


@pytest.mark.parametrize("implementation", ["op", "fallback", "fake"])
@pytest.mark.parametrize("changes, error, message", BAD_INPUTS)
def test_bad_inputs(implementation, changes, error, message):
    args = dict(q=_qk(), k=_qk(), patch=16)
    args.update(changes)
    q, k, patch = args.pop("q"), args.pop("k"), args.pop("patch")
    if implementation == "op":
        call = torch.ops.vitmad.mad_qk.default
    elif implementation == "fallback":
        call = _fallback.mad_qk
    else:
        mode = torch._subclasses.fake_tensor.FakeTensorMode()
        q, k = mode.from_tensor(q), mode.from_tensor(k)
        if args.get("attn_bias") is not None:
            args["attn_bias"] = mode.from_tensor(args["attn_bias"])
        call = torch.ops.vitmad.mad_qk.default
        with mode, pytest.raises(error, match=message):
            call(q, k, patch, **args)
        return
    with pytest.raises(error, match=message):
        call(q, k, patch, **args)


@pytest.mark.skipif(not CUDA_AVAILABLE, reason="no CUDA device")
def test_device_mismatch():
    with pytest.raises(ValueError, match="k must be on q's device"):
        vitmad.mad_qk(_qk().cuda(), _qk(), 16)
    with pytest.raises(ValueError, match="attn_bias must be on q's device"):
        vitmad.mad_qk(_qk().cuda(), _qk().cuda(), 16, attn_bias=torch.zeros(17, 17))
