"""The position form of the ops (``positions=``, ``key_positions=``): every kernel against a float64 NumPy
implementation of the definition written here, independently of the package; grid form == position form;
strides, broadcasting, windows, autograd, opcheck, torch.compile and the errors."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from torch.library import opcheck

import vitmad
from conftest import DEVICES, DTYPES, make_qk, random_attention, tolerance
from vitmad.ops import fallback as _fallback
from vitmad.ops.reference import (
    mad_positions_backward_reference,
    mad_positions_reference,
    mad_qk_positions_reference,
)

NAN = float("nan")


def numpy_mad(attn, positions, key_positions, *, renormalize=False, reduction="mean") -> np.ndarray:
    """The definition, matrix by matrix, in float64 NumPy (docs/definition.md, "Positions form of the ops")."""
    a = np.asarray(attn.detach().cpu().double())
    lead = a.shape[:-2]
    pq = np.broadcast_to(np.asarray(positions.detach().cpu().double()), (*lead, *positions.shape[-2:]))
    keys = positions if key_positions is None else key_positions
    pk = np.broadcast_to(np.asarray(keys.detach().cpu().double()), (*lead, *keys.shape[-2:]))
    out = np.empty((*lead, a.shape[-2]) if reduction == "none" else lead)
    for index in np.ndindex(*lead):
        matrix, queries, keys_ = a[index], pq[index], pk[index]
        has_q = ~np.isnan(queries).any(-1)
        has_k = ~np.isnan(keys_).any(-1)
        per_query = np.full(matrix.shape[0], np.nan)
        for t in np.flatnonzero(has_q):
            d = np.sqrt(((queries[t] - keys_[has_k]) ** 2).sum(-1))
            w = matrix[t, has_k]
            per_query[t] = (w * d).sum() / (w.sum() if renormalize else 1.0)
        out[index] = per_query if reduction == "none" else (per_query[has_q].mean() if has_q.any() else np.nan)
    return out


def random_positions(shape, *, seed, nan_rows=(), scale=50.0, dtype=torch.float64, device="cpu"):
    """Random positions of ``shape`` ``[..., N, K]`` with the given rows (indices along N) NaN."""
    gen = torch.Generator().manual_seed(seed)
    pos = scale * torch.rand(shape, generator=gen, dtype=torch.float64)
    for row in nan_rows:
        pos[..., row, :] = NAN
    return pos.to(device=device, dtype=dtype)


def assert_close(out, expected, dtype):
    expected = torch.as_tensor(expected, dtype=torch.float64).cpu()  # a reference may run on the GPU too
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert tuple(out.shape) == tuple(expected.shape)
    torch.testing.assert_close(out.double().cpu(), expected, equal_nan=True, **tolerance(dtype))


# (attention shape [..., Nq, Nk], positions shape [..., Nq, K] or None for Nq == Nk square, key positions shape)
CASES = [
    ((2, 3, 17, 17), (17, 2), None),  # square, one set of positions for every matrix
    ((2, 3, 12, 31), (12, 2), (31, 2)),  # rectangular: pooled keys
    ((4, 2, 9, 40), (4, 1, 9, 3), (4, 1, 40, 3)),  # per image, 3-D positions (video)
    ((3, 5, 7), (3, 5, 1), (3, 7, 1)),  # per matrix, 1-D positions
    ((1, 2, 5, 1600), (5, 2), (1600, 2)),  # keys beyond several 512-key blocks
    ((2, 1, 601, 601), (1, 1, 601, 2), None),  # over one vector block, an odd N
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, qshape, kshape", CASES)
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("renormalize", [False, True])
def test_mad_matches_numpy_definition(device, dtype, shape, qshape, kshape, reduction, renormalize):
    attn = random_attention(shape, dtype, device, seed=sum(shape))
    nq, nk = shape[-2], shape[-1]
    positions = random_positions(qshape, seed=1, nan_rows=[0, nq // 2], dtype=torch.float32, device=device)
    key_positions = None if kshape is None else random_positions(kshape, seed=2, nan_rows=[1, nk - 1],
                                                                 dtype=torch.float32, device=device)
    out = vitmad.mad(attn, positions=positions, key_positions=key_positions, renormalize=renormalize,
                     reduction=reduction)
    expected = numpy_mad(attn, positions, key_positions, renormalize=renormalize, reduction=reduction)
    assert_close(out, expected, dtype)


@pytest.mark.parametrize("shape, qshape, kshape", CASES[:4])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("renormalize", [False, True])
def test_reference_and_fallback_match_numpy_definition(shape, qshape, kshape, reduction, renormalize):
    attn = random_attention(shape, torch.float64, seed=3)
    positions = random_positions(qshape, seed=4, nan_rows=[2])
    key_positions = None if kshape is None else random_positions(kshape, seed=5, nan_rows=[0])
    expected = numpy_mad(attn, positions, key_positions, renormalize=renormalize, reduction=reduction)
    options = {"renormalize": renormalize, "reduction": reduction}
    assert_close(mad_positions_reference(attn, positions, key_positions, **options), expected, torch.float64)
    assert_close(_fallback.mad_pos(attn, positions, key_positions, **options), expected, torch.float64)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("grid, prefix, patch", [((14, 14), 1, 16), ((3, 7), 0, 5), ((5, 4), 5, 14), ((1, 9), 2, 8)])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("renormalize", [False, True])
def test_grid_positions_give_the_grid_form(device, grid, prefix, patch, reduction, renormalize):
    n = prefix + grid[0] * grid[1]
    attn = random_attention((2, 3, n, n), device=device, seed=n)
    positions = vitmad.grid_positions(*grid, patch, num_prefix_tokens=prefix, device=device)
    options = {"renormalize": renormalize, "reduction": reduction}
    by_grid = vitmad.mad(attn, patch, num_prefix_tokens=prefix, grid=grid, **options)
    by_positions = vitmad.mad(attn, positions=positions, **options)
    if reduction == "none":  # the position form keeps a (NaN) value for every query, prefix included
        assert by_positions[..., :prefix].isnan().all()
        by_positions = by_positions[..., prefix:]
    torch.testing.assert_close(by_positions, by_grid, rtol=2e-5, atol=2e-4)

    grad = torch.randn(by_grid.shape, generator=torch.Generator().manual_seed(0)).to(device)
    a = attn.clone().requires_grad_(True)
    vitmad.mad(a, patch, num_prefix_tokens=prefix, grid=grid, **options).backward(grad)
    b = attn.clone().requires_grad_(True)
    full_grad = grad if reduction == "mean" else torch.cat([torch.zeros(*grad.shape[:-1], prefix).to(grad), grad], -1)
    vitmad.mad(b, positions=positions, **options).backward(full_grad)
    # float32 rounding of distances of hundreds of pixels: an absolute error relative to the largest entry.
    torch.testing.assert_close(b.grad, a.grad, rtol=2e-5, atol=2e-5 * float(a.grad.abs().max()))

    q, k = make_qk(2, 3, n, 8, torch.float32, device, seed=n)
    torch.testing.assert_close(
        vitmad.mad_qk(q, k, positions=positions, **options)[..., prefix if reduction == "none" else 0:],
        vitmad.mad_qk(q, k, patch, num_prefix_tokens=prefix, grid=grid, **options), rtol=2e-5, atol=2e-4)


def _strided_views(attn):
    """Views of the same values with other strides: transposed storage, a slice, a non-contiguous batch."""
    transposed = attn.transpose(-1, -2).contiguous().transpose(-1, -2)
    padded = torch.zeros(*attn.shape[:-1], attn.shape[-1] + 3, dtype=attn.dtype, device=attn.device)
    padded[..., 1:-2] = attn
    batch_strided = torch.stack([attn, attn], 1)[:, 0]
    return {"transposed": transposed, "sliced": padded[..., 1:-2], "batch_strided": batch_strided}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("view", ["transposed", "sliced", "batch_strided"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_any_strides_of_attn_and_positions(device, view, reduction):
    attn = random_attention((3, 2, 21, 34), device=device, seed=7)
    positions = random_positions((3, 1, 21, 2), seed=8, nan_rows=[4], dtype=torch.float32, device=device)
    key_positions = random_positions((34, 2), seed=9, nan_rows=[0, 33], dtype=torch.float32, device=device)
    # Broadcast (stride-0) and non-contiguous positions are read in place.
    positions_view = positions[:1].expand(3, 2, 21, 2)
    key_view = torch.cat([key_positions, key_positions], -1)[..., ::2]
    out = vitmad.mad(_strided_views(attn)[view], positions=positions_view, key_positions=key_view,
                     reduction=reduction)
    assert_close(out, numpy_mad(attn, positions_view, key_view, reduction=reduction), torch.float32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_windows_with_per_window_positions(device, dtype, reduction):
    """Swin-shaped attention [B, nW, H, 49, 49] with positions per window [nW, 1, 49, 2], broadcast over B, H.
    ("mean" without renormalisation reads each matrix as one stream on CPU, every token having a position.)"""
    batch, windows, heads, side = 2, 4, 3, 7
    attn = random_attention((batch, windows, heads, side * side, side * side), dtype, device, seed=11)
    cells = torch.stack(torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij"), -1).reshape(-1, 2)
    origins = torch.tensor([[0, 0], [0, side], [side, 0], [side, side]])
    positions = ((origins[:, None, None, :] + cells) * 4.0 + 2.0).to(device)  # [nW, 1, 49, 2], 4-pixel cells
    out = vitmad.mad(attn, positions=positions, reduction=reduction)
    assert out.shape == (batch, windows, heads) + ((side * side,) if reduction == "none" else ())
    assert_close(out, numpy_mad(attn, positions, None, reduction=reduction), dtype)
    # Each window is a 7 x 7 grid: the same MAD as the grid form with 4-pixel patches.
    grid_form = vitmad.mad(attn, 4, num_prefix_tokens=0, grid=[side, side], reduction=reduction)
    torch.testing.assert_close(out, grid_form, rtol=2e-5, atol=2e-4)
    # A NaN anywhere in a matrix makes that matrix's MAD NaN, and no other.
    poisoned = attn.clone()
    poisoned[1, 2, 0, 48, 48] = NAN
    nan = vitmad.mad(poisoned, positions=positions, reduction=reduction).isnan()
    assert nan[1, 2, 0].all() if reduction == "mean" else nan[1, 2, 0, 48]
    assert int(nan.sum()) == 1


@pytest.mark.parametrize("device", DEVICES)
def test_tokens_without_position_anywhere_and_in_every_role(device):
    """NaN rows in the middle and at the end (YOLOS detection tokens, padding); NaN attention in the columns of
    keys without a position is never read; a matrix with no positioned query gives NaN."""
    attn = random_attention((2, 10, 10), device=device, seed=12)
    positions = random_positions((2, 10, 2), seed=13, nan_rows=[3, 8, 9], dtype=torch.float32, device=device)
    positions[1] = NAN
    poisoned = attn.clone()
    poisoned[..., [3, 8, 9]] = NAN
    out = vitmad.mad(poisoned, positions=positions)
    assert out[1].isnan() and not out[0].isnan()
    assert_close(out, numpy_mad(attn, positions, None), torch.float32)
    none = vitmad.mad(poisoned, positions=positions, reduction="none")
    assert none[0, [3, 8, 9]].isnan().all() and not none[0, [0, 1, 2, 4]].isnan().any()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(0, 3, 5, 7), (2, 0, 5, 7), (4, 0, 7), (3, 5, 0)])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_empty_inputs(device, shape, reduction):
    attn = torch.rand(shape, device=device)
    positions = torch.rand(shape[-2], 2, device=device)
    key_positions = torch.rand(shape[-1], 2, device=device)
    out = vitmad.mad(attn, positions=positions, key_positions=key_positions, reduction=reduction)
    assert out.shape == (shape[:-2] if reduction == "mean" else shape[:-1])
    assert_close(out, numpy_mad(attn, positions, key_positions, reduction=reduction), torch.float32)


# Autograd, opcheck, compile ------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("renormalize", [False, True])
def test_backward_matches_reference(device, dtype, reduction, renormalize):
    attn = random_attention((2, 3, 11, 26), dtype, device, seed=14).requires_grad_(True)
    positions = random_positions((2, 1, 11, 2), seed=15, nan_rows=[0], dtype=torch.float32, device=device)
    key_positions = random_positions((26, 2), seed=16, nan_rows=[5], dtype=torch.float32, device=device)
    out = vitmad.mad(attn, positions=positions, key_positions=key_positions, renormalize=renormalize,
                     reduction=reduction)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(device)
    out.backward(grad)
    expected = mad_positions_backward_reference(grad, attn, positions, key_positions, renormalize=renormalize,
                                                reduction=reduction)
    assert attn.grad.dtype == dtype
    tol = {"rtol": 1e-2, "atol": 1e-2} if dtype == torch.bfloat16 else tolerance(dtype)
    torch.testing.assert_close(attn.grad.double(), expected, **tol)
    assert (attn.grad[:, :, 0] == 0).all() and (attn.grad[..., 5] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("renormalize", [False, True])
def test_gradcheck(device, reduction, renormalize):
    attn = random_attention((2, 5, 6), torch.float64, device, seed=17).requires_grad_(True)
    positions = random_positions((2, 5, 2), seed=18, nan_rows=[1], device=device)
    key_positions = random_positions((6, 2), seed=19, nan_rows=[2], device=device)

    def fn(a):
        out = vitmad.mad(a, positions=positions, key_positions=key_positions, renormalize=renormalize,
                         reduction=reduction)
        return out.nan_to_num() if reduction == "none" else out

    assert torch.autograd.gradcheck(fn, (attn,))


def test_positions_that_require_grad_are_refused():
    attn = random_attention((2, 5, 5), seed=20).requires_grad_(True)
    positions = torch.rand(5, 2, requires_grad=True)
    with pytest.raises(ValueError, match="^vitmad.mad: positions requires grad, but vitmad.mad is differentiable "
                                         "with respect to attn only; pass positions.detach()"):
        vitmad.mad(attn, positions=positions)
    q, k = make_qk(1, 2, 5, 4, torch.float32, "cpu")
    with pytest.raises(RuntimeError, match="vitmad.mad_qk is not differentiable, but positions requires grad"):
        vitmad.mad_qk(q, k, positions=positions)
    with torch.no_grad():
        vitmad.mad_qk(q, k, positions=positions)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    attn = random_attention((2, 3, 7, 9), device=device, seed=21).requires_grad_(True)
    positions = random_positions((2, 1, 7, 2), seed=22, nan_rows=[0], dtype=torch.float32, device=device)
    key_positions = random_positions((9, 2), seed=23, dtype=torch.float32, device=device)
    # opcheck compares outputs without equal_nan: "none" gets positions without NaN rows (NaN outputs).
    for rows, options in ((positions, {}), (positions.nan_to_num(3.0), {"reduction": "none", "renormalize": True})):
        opcheck(torch.ops.vitmad.mad_pos.default, (attn, rows, key_positions), options)
        out = torch.ops.vitmad.mad_pos.default(attn.detach(), rows, key_positions, **options)
        opcheck(torch.ops.vitmad.mad_pos_backward.default,
                (torch.ones_like(out), attn.detach(), rows, key_positions), options)
    q, k = make_qk(2, 3, 7, 8, torch.float32, device)
    _, k9 = make_qk(2, 3, 9, 8, torch.float32, device, seed=1)
    opcheck(torch.ops.vitmad.mad_qk_pos.default, (q, k9, positions, key_positions), {"scale": 0.3})
    opcheck(torch.ops.vitmad.mad_qk_pos.default, (q, k, positions.nan_to_num(3.0)), {"reduction": "none"})


def test_torch_compile_fullgraph():
    attn = random_attention((2, 3, 7, 9), seed=24)
    positions = random_positions((7, 2), seed=25, nan_rows=[0], dtype=torch.float32)
    key_positions = random_positions((9, 2), seed=26, dtype=torch.float32)
    q, k = make_qk(2, 3, 7, 8, torch.float32, "cpu")
    _, k9 = make_qk(2, 3, 9, 8, torch.float32, "cpu", seed=1)

    def both(attn, q, k, positions, key_positions):
        return (vitmad.mad(attn, positions=positions, key_positions=key_positions),
                vitmad.mad_qk(q, k, positions=positions, key_positions=key_positions))

    compiled = torch.compile(both, fullgraph=True, backend="aot_eager")
    for got, want in zip(compiled(attn, q, k9, positions, key_positions), both(attn, q, k9, positions, key_positions)):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_bit_identical_across_runs_and_thread_counts(restore_threads, threads):
    attn = random_attention((4, 6, 97, 330), seed=27)
    positions = random_positions((4, 1, 97, 2), seed=28, nan_rows=[0], dtype=torch.float32)
    key_positions = random_positions((330, 2), seed=29, dtype=torch.float32)
    q, k = make_qk(4, 6, 97, 16, torch.float32, "cpu")
    _, k330 = make_qk(4, 6, 330, 16, torch.float32, "cpu", seed=1)
    torch.set_num_threads(1)
    expected = [vitmad.mad(attn, positions=positions, key_positions=key_positions, reduction="none"),
                vitmad.mad_qk(q, k330, positions=positions, key_positions=key_positions)]
    torch.set_num_threads(threads)
    for _ in range(2):
        got = [vitmad.mad(attn, positions=positions, key_positions=key_positions, reduction="none"),
               vitmad.mad_qk(q, k330, positions=positions, key_positions=key_positions)]
        for g, e in zip(got, expected):
            assert torch.equal(g.nan_to_num(-1.0), e.nan_to_num(-1.0))


# mad_qk -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("nq, nk, d", [(13, 13, 8), (50, 7, 16), (9, 1537, 32), (130, 600, 64)])
@pytest.mark.parametrize("bias", [None, "float", "bool"])
@pytest.mark.parametrize("renormalize", [False, True])
def test_mad_qk_matches_the_materialised_route(device, dtype, nq, nk, d, bias, renormalize):
    gen = torch.Generator().manual_seed(nq * nk)
    q = torch.randn(2, 3, nq, d, generator=gen).mul(d**-0.25).to(device=device, dtype=dtype)
    k = torch.randn(2, 3, nk, d, generator=gen).mul(d**0.25).to(device=device, dtype=dtype)
    attn_bias = None
    if bias == "float":
        attn_bias = torch.randn(3, nq, nk, generator=gen).to(device=device, dtype=dtype)
    elif bias == "bool":
        attn_bias = (torch.rand(2, 1, 1, nk, generator=gen) > 0.3).to(device)
        attn_bias[..., 0] = True
    positions = random_positions((2, 1, nq, 2), seed=nq, nan_rows=[0], dtype=torch.float32, device=device)
    key_positions = random_positions((nk, 2), seed=nk, nan_rows=[nk - 1], dtype=torch.float32, device=device)
    options = {"attn_bias": attn_bias, "renormalize": renormalize}
    for reduction in ("mean", "none"):
        out = vitmad.mad_qk(q, k, positions=positions, key_positions=key_positions, reduction=reduction, **options)
        expected = mad_qk_positions_reference(q, k, positions, key_positions, reduction=reduction, **options)
        assert_close(out, expected, dtype)
        fallback = _fallback.mad_qk_pos(q, k, positions, key_positions, reduction=reduction, **options)
        assert_close(fallback, expected, dtype)


def test_mad_qk_reference_is_the_softmax_then_the_numpy_definition():
    q, k = make_qk(2, 2, 9, 8, torch.float64, "cpu")
    _, k5 = make_qk(2, 2, 5, 8, torch.float64, "cpu", seed=3)
    positions = random_positions((9, 3), seed=30, nan_rows=[0])
    key_positions = random_positions((5, 3), seed=31, nan_rows=[4])
    attn = ((q @ k5.transpose(-1, -2)) / math.sqrt(8)).softmax(-1)
    expected = numpy_mad(attn, positions, key_positions, renormalize=True)
    assert_close(mad_qk_positions_reference(q, k5, positions, key_positions, renormalize=True), expected,
                 torch.float64)


# Errors -------------------------------------------------------------------------------------------------------

A = (2, 3, 6, 8)  # attention [..., Nq, Nk]


def _bad_calls():
    pos, keys = torch.rand(6, 2), torch.rand(8, 2)
    inf = pos.clone()
    inf[4, 1] = float("inf")
    half_nan = keys.clone()
    half_nan[2, 0] = NAN
    far, beyond = pos.clone(), pos.double()
    far[4, 0] = 1e20  # its square is beyond float32 (QA 329: the MAD was inf silently)
    beyond[4, 0] = 1e300  # finite as given, inf in float32
    return [
        ({"positions": far, "key_positions": keys}, ValueError,
         r"vitmad.mad: positions must lie within \+-6.5e\+18 \(distances are squared in float32, the accumulation "
         r"dtype, which holds no larger square\), got 1e\+20 at row 4; measure in a larger unit, or give float64 "
         r"attention$"),
        ({"positions": beyond, "key_positions": keys}, ValueError,
         r"vitmad.mad: positions must not be infinite .*, got inf at row 4 \(or a finite value beyond float32's "
         r"range, the accumulation dtype it is converted to\)$"),
        ({"positions": torch.rand(6, 4), "key_positions": keys}, ValueError,
         r"vitmad.mad: positions must be \[..., Nq, K\] with K in \{1, 2, 3\}, got shape \[6, 4\]"),
        ({"positions": torch.arange(12).reshape(6, 2), "key_positions": keys}, TypeError,
         r"vitmad.mad: positions must be a floating-point tensor \(NaN marks a token without a position\), got "
         r"torch\.int64$"),  # the dtype as Python spells it, from the kernels too
        ({"positions": torch.rand(5, 2), "key_positions": keys}, ValueError,
         r"vitmad.mad: positions has Nq = 5 rows but attn has 6 queries \(shape \[2, 3, 6, 8\]\)"),
        ({"positions": pos}, ValueError,
         r"vitmad.mad: attn is rectangular \[..., 6, 8\]; pass key_positions \[..., 8, K\] for its keys"),
        ({"positions": pos, "key_positions": torch.rand(7, 2)}, ValueError,
         "vitmad.mad: key_positions has Nk = 7 rows but attn has 8 keys"),
        ({"positions": pos, "key_positions": torch.rand(8, 3)}, ValueError,
         r"vitmad.mad: key_positions must have as many coordinates K per token as positions \(K = 2\)"),
        ({"positions": torch.rand(3, 1, 6, 2), "key_positions": keys}, ValueError,
         r"vitmad.mad: positions leading dims \[3, 1\] do not broadcast against attn's \[2, 3\]"),
        ({"positions": inf, "key_positions": keys}, ValueError,
         "vitmad.mad: positions must not be infinite .*, got inf at row 4"),
        ({"positions": pos, "key_positions": half_nan}, ValueError,
         "vitmad.mad: key_positions row 2 has 1 of its 2 coordinates NaN"),
        ({"positions": pos, "key_positions": keys, "reduction": "sum"}, ValueError,
         "vitmad.mad: reduction must be 'mean' or 'none', got 'sum'"),
    ]


@pytest.mark.parametrize("index", range(len(_bad_calls())))
def test_errors_name_the_argument_in_every_implementation(index):
    kwargs, error, pattern = _bad_calls()[index]
    attn = random_attention(A)
    with pytest.raises(error, match=pattern):
        vitmad.mad(attn, **kwargs)
    positional = (kwargs.pop("positions"), kwargs.pop("key_positions", None))
    with pytest.raises(error, match=pattern):
        _fallback.mad_pos(attn, *positional, **kwargs)
    with pytest.raises(error, match=pattern):
        mad_positions_reference(attn, *positional, **kwargs)
    with pytest.raises(error, match=pattern.replace("vitmad.mad:", "vitmad.mad_backward:")):
        torch.ops.vitmad.mad_pos_backward(torch.ones(2, 3), attn, *positional, **kwargs)


@pytest.mark.parametrize("backend", ["compiled", "python"])
def test_coordinates_whose_squares_overflow_are_refused_and_those_within_give_a_finite_mad(backend):
    """The bound is the accumulation dtype's: sqrt(max / K) / 2, so that K squared differences of two tokens at
    opposite ends sum without overflow (QA 329: 1e300 with float64 attention gave inf silently)."""
    if backend == "compiled" and vitmad.backend() != "compiled":
        pytest.skip("the compiled library is not loaded in this run")
    op = torch.ops.vitmad.mad_pos if backend == "compiled" else _fallback.mad_pos
    attn = torch.tensor([[[0.0, 1.0], [1.0, 0.0]]])
    for dtype, k in ((torch.float32, 1), (torch.float32, 3), (torch.float64, 2)):
        limit = math.sqrt(torch.finfo(dtype).max / k) / 2
        inside = torch.tensor([[0.999 * limit] * k, [-0.999 * limit] * k], dtype=dtype)
        expected = 2 * 0.999 * limit * math.sqrt(k)
        value = op(attn.to(dtype), inside, None).item()
        assert math.isfinite(value) and value == pytest.approx(expected, rel=1e-5)
        outside = inside.double() * 1.01 if dtype == torch.float32 else inside * 1.01
        with pytest.raises(ValueError, match=re.escape(f"positions must lie within +-{limit:.2g} (")):
            op(attn.to(dtype), outside, None)


def test_half_precision_positions_are_bounded_as_the_float32_they_accumulate_in():
    """vitmad.record checks positions= on the host in their own dtype before their device copy: float16 ones
    were bounded by float16's squares (+-90 px, QA 335), though every op accumulates in float32 at least."""
    from vitmad.ops.arguments import check_position_values

    for dtype in (torch.float16, torch.bfloat16):
        check_position_values(torch.tensor([[112.0, 3.0], [4000.0, 5.0]], dtype=dtype), "positions", "vitmad.record")


def test_forms_cannot_be_mixed_and_one_is_needed():
    attn = random_attention((2, 5, 5))
    positions = torch.rand(5, 2)
    with pytest.raises(ValueError, match="vitmad.mad: pass either positions .* not both; got positions and patch, "
                                         "grid"):
        vitmad.mad(attn, 16, grid=[2, 2], positions=positions)
    with pytest.raises(ValueError, match="vitmad.mad: key_positions needs positions"):
        vitmad.mad(attn, 16, key_positions=positions)
    with pytest.raises(TypeError, match=r"vitmad.mad: pass patch \(pixels per patch, the grid form\) or positions"):
        vitmad.mad(attn)
    q, k = make_qk(1, 2, 5, 4, torch.float32, "cpu")
    with pytest.raises(ValueError, match="vitmad.mad_qk: pass either positions .* got positions and "
                                         "num_prefix_tokens"):
        vitmad.mad_qk(q, k, positions=positions, num_prefix_tokens=0)


def test_mad_qk_errors():
    q, k = make_qk(1, 2, 5, 4, torch.float32, "cpu")
    _, k7 = make_qk(1, 2, 7, 4, torch.float32, "cpu")
    with pytest.raises(ValueError, match=r"vitmad.mad_qk: the attention is rectangular \[..., 5, 7\] \(q and k have "
                                         r"different token counts\); pass key_positions \[..., 7, K\]"):
        vitmad.mad_qk(q, k7, positions=torch.rand(5, 2))
    with pytest.raises(ValueError, match="vitmad.mad_qk: key_positions has Nk = 5 rows but k has 7 keys"):
        vitmad.mad_qk(q, k7, positions=torch.rand(5, 2), key_positions=torch.rand(5, 2))
    with pytest.raises(ValueError, match=r"vitmad.mad_qk: attn_bias must be broadcastable to the logits' shape "
                                         r"\[..., Nq, Nk\] = \[1, 2, 5, 7\], got shape \[5, 5\]"):
        vitmad.mad_qk(q, k7, positions=torch.rand(5, 2), key_positions=torch.rand(7, 2), attn_bias=torch.rand(5, 5))
    with pytest.raises(ValueError, match=r"vitmad.mad_qk: k must have q's leading dimensions"):
        vitmad.mad_qk(q, k7[0], positions=torch.rand(5, 2), key_positions=torch.rand(7, 2))


def test_grid_positions():
    pos = vitmad.grid_positions(2, 3, 10, num_prefix_tokens=1)
    assert pos.shape == (7, 2) and pos[0].isnan().all()
    assert pos[1:].tolist() == [[5, 5], [5, 15], [5, 25], [15, 5], [15, 15], [15, 25]]
    with pytest.raises(ValueError, match="vitmad.grid_positions: grid_h and grid_w must be positive, got 0 x 3"):
        vitmad.grid_positions(0, 3, 10)


@pytest.mark.parametrize("tokens", [1024, 1100, 1448])
def test_whole_matrices_read_as_one_stream_keep_float_precision(tokens):
    """Where every query and key has a position, the float32 "mean" reads each matrix as one stream of Nq * Nk
    values (while the distances fit in the kernels' precomputed 8 MiB: up to 1448 tokens). Summed by two vector
    accumulators over the whole stream, it lost up to 3.8e-5 of the mean at these sizes (MAD, entropy, temporal
    MAD; found by QA), where a query's row alone keeps float's precision; the float64 definition is the judge."""
    gen = torch.Generator().manual_seed(tokens)
    logits = torch.randn(2, 3, tokens, tokens, generator=gen, dtype=torch.float64) * 2
    attn = torch.softmax(logits, -1).float()
    positions = torch.rand(tokens, 2, generator=gen, dtype=torch.float64).mul(500).float()
    times = torch.randint(0, 8, (tokens, 1), generator=gen).float()
    a = attn.double()
    distance = torch.cdist(positions.double(), positions.double())
    expected_mad = (a * distance).sum(-1).mean(-1)
    expected_time = (a * torch.cdist(times.double(), times.double())).sum(-1).mean(-1)
    expected_entropy = -(a * torch.where(a > 0, a.log(), 0)).sum(-1).mean(-1)
    tight = {"rtol": 2e-6, "atol": 0}  # float32 inputs; the row-by-row route stays within 3e-7 here
    torch.testing.assert_close(vitmad.mad(attn, positions=positions).double(), expected_mad, **tight)
    stats = vitmad.attention_stats(attn, positions=positions, times=times, stats=("mad", "entropy", "temporal_mad"))
    torch.testing.assert_close(stats["mad"].double(), expected_mad, **tight)
    torch.testing.assert_close(stats["entropy"].double(), expected_entropy, **tight)
    torch.testing.assert_close(stats["temporal_mad"].double(), expected_time, **tight)
