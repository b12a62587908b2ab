"""The CUDA kernels of vitmad::mad and vitmad::mad_backward against the float64 reference.

Skipped, with the reason, unless a GPU is present and the compiled library has CUDA kernels (asked from the
dispatcher, not guessed).
"""

from __future__ import annotations

import pytest
import torch

import vitmad
from conftest import DTYPES, random_attention, tolerance
from vitmad.ops.arguments import mad_output_dtype
from vitmad.ops.reference import mad_backward_reference, mad_reference

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and vitmad.has_compiled_kernel("mad", "CUDA")),
    reason="needs a GPU and the compiled CUDA kernels of vitmad::mad",
)

DEVICE = "cuda"
PATCH = 16

# (N, num_prefix_tokens, grid): square default grids, explicit non-square ones, no prefix, CLS, DeiT's two and
# CLS + 4 registers, with token counts that leave rows unaligned to 16 bytes.
CASES = [
    (5, 1, None),
    (5, 0, [1, 5]),
    (17, 1, None),
    (17, 2, [3, 5]),
    (50, 1, [7, 7]),
    (197, 1, None),
    (197, 2, [13, 15]),
    (197, 5, [12, 16]),
    (257, 1, None),
    (257, 0, [1, 257]),
    (577, 1, None),
    (577, 5, [22, 26]),
]
CASE_IDS = [f"N{n}-P{p}-{'sq' if g is None else 'x'.join(map(str, g))}" for n, p, g in CASES]

LAYOUTS = ["contiguous", "sliced", "transposed", "strided", "leading-permuted"]


def make_attention(shape, layout: str, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Random attention of ``shape`` on the GPU, laid out as named (always a view read in place by the op).

    contiguous; sliced: keys and queries cut out of a larger matrix (unaligned rows, key stride 1);
    transposed: the query axis is the contiguous one; strided: every other key and query (key stride 2);
    leading-permuted: the leading dims are a permutation of a contiguous tensor's.
    """
    *lead, n, _ = shape
    if layout == "contiguous":
        return random_attention(shape, dtype, DEVICE, seed=seed)
    if layout == "sliced":
        return random_attention((*lead, n + 3, n + 5), dtype, DEVICE, seed=seed)[..., 1 : n + 1, 3 : n + 3]
    if layout == "transposed":
        return random_attention(shape, dtype, DEVICE, seed=seed).transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout == "strided":
        return random_attention((*lead, 2 * n, 2 * n), dtype, DEVICE, seed=seed)[..., ::2, ::2]
    if layout == "leading-permuted":
        order = list(reversed(range(len(lead))))
        base = random_attention((*reversed(lead), n, n), dtype, DEVICE, seed=seed)
        return base.permute(*order, len(lead), len(lead) + 1)
    raise ValueError(f"unknown layout {layout}")


def options(case, renormalize: bool = False, reduction: str = "mean") -> dict:
    _, prefix, grid = case
    return {"num_prefix_tokens": prefix, "grid": grid, "renormalize": renormalize, "reduction": reduction}


def assert_grad_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    """The gradient is stored in attn's dtype, so 16-bit results carry one rounding of that dtype. With
    renormalisation it is g * (d - m) / Z, a difference of two float32 values as large as the largest
    distance, so the absolute error scales with the largest gradient entry rather than with each entry."""
    rtol = tolerance(dtype)["rtol"] if dtype in (torch.float32, torch.float64) else torch.finfo(dtype).eps
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual.double(), expected, rtol=rtol, atol=rtol * scale + tolerance(dtype)["atol"])


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("renormalize", [False, True], ids=["raw", "renorm"])
def test_forward_matches_reference(case, dtype, reduction, renormalize):
    attn = make_attention((2, 3, case[0], case[0]), "contiguous", dtype, seed=case[0])
    kwargs = options(case, renormalize, reduction)
    out = vitmad.mad(attn, PATCH, **kwargs)
    expected = mad_reference(attn, PATCH, **kwargs)
    assert out.device == attn.device and out.dtype == mad_output_dtype(dtype)
    torch.testing.assert_close(out.double(), expected, **tolerance(dtype))


@pytest.mark.parametrize("case", [CASES[3], CASES[5], CASES[11]], ids=[CASE_IDS[3], CASE_IDS[5], CASE_IDS[11]])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("lead", [(), (3,), (2, 3), (2, 2, 3)], ids=["2d", "3d", "4d", "5d"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_forward_reads_any_layout_in_place(case, layout, lead, dtype, reduction):
    n = case[0]
    attn = make_attention((*lead, n, n), layout, dtype, seed=len(lead))
    kwargs = options(case, renormalize=True, reduction=reduction)
    out = vitmad.mad(attn, PATCH, **kwargs)
    torch.testing.assert_close(out.double(), mad_reference(attn, PATCH, **kwargs), **tolerance(dtype))


@pytest.mark.parametrize("case", [CASES[0], CASES[3], CASES[6], CASES[8], CASES[11]],
                         ids=[CASE_IDS[0], CASE_IDS[3], CASE_IDS[6], CASE_IDS[8], CASE_IDS[11]])
@pytest.mark.parametrize("layout", ["contiguous", "sliced", "transposed"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("renormalize", [False, True], ids=["raw", "renorm"])
def test_backward_matches_reference(case, layout, dtype, reduction, renormalize):
    n = case[0]
    attn = make_attention((2, 3, n, n), layout, dtype, seed=n + 1)
    kwargs = options(case, renormalize, reduction)
    out_shape = mad_reference(attn, PATCH, **kwargs).shape
    grad = torch.randn(out_shape, generator=torch.Generator().manual_seed(n), dtype=torch.float64).to(DEVICE)
    grad_attn = torch.ops.vitmad.mad_backward(grad.to(mad_output_dtype(dtype)), attn, PATCH, **kwargs)
    assert grad_attn.shape == attn.shape and grad_attn.dtype == dtype and grad_attn.is_contiguous()
    assert_grad_close(grad_attn, mad_backward_reference(grad, attn, PATCH, **kwargs), dtype)


@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_more_rows_than_one_grid_covers(layout):
    """2^21 + 3 tiny matrices: more rows (and column tiles) than the kernels launch blocks for, so each
    warp loops over several rows."""
    attn = make_attention((2**21 + 3, 5, 5), layout, torch.float32, seed=7)
    for reduction in ("mean", "none"):
        out = vitmad.mad(attn, PATCH, reduction=reduction)
        torch.testing.assert_close(out.double(), mad_reference(attn, PATCH, reduction=reduction),
                                   **tolerance(torch.float32))
    grad = torch.randn(attn.shape[:-2], device=DEVICE)
    grad_attn = torch.ops.vitmad.mad_backward(grad, attn, PATCH)
    assert_grad_close(grad_attn, mad_backward_reference(grad, attn, PATCH), torch.float32)


# Rows too long for the per-block distance table (more than about 3,000 patches: mad_cuda.cu's kMaxTableBytes):
# mad_rows_direct_kernel computes each distance itself, stepping along the grid; a 64 x 64 grid, and grids narrower
# than a vector of keys (4 columns: narrower than 8 bfloat16 keys; 2: narrower than 4 float32 ones), whose steps
# wrap to the next grid row within one vector.
LONG_ROW_CASES = [(4097, 1, [64, 64]), (4097, 1, [1024, 4]), (4098, 2, [2048, 2])]
LONG_ROW_IDS = [f"N{n}-P{p}-{g[0]}x{g[1]}" for n, p, g in LONG_ROW_CASES]


@pytest.mark.parametrize("case", LONG_ROW_CASES, ids=LONG_ROW_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("renormalize", [False, True], ids=["raw", "renorm"])
def test_rows_longer_than_the_distance_table(case, dtype, renormalize):
    n = case[0]
    attn = make_attention((1, 2, n, n), "contiguous", dtype, seed=n)
    kwargs = options(case, renormalize, reduction="none")
    out = vitmad.mad(attn, PATCH, **kwargs)
    torch.testing.assert_close(out.double(), mad_reference(attn, PATCH, **kwargs), **tolerance(dtype))
    # Small upstream gradients: g * d reaches 32,768 px times g here, beyond float16's range for g of order 1.
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(n), dtype=torch.float64).to(DEVICE) / 64
    grad_attn = torch.ops.vitmad.mad_backward(grad.to(mad_output_dtype(dtype)), attn, PATCH, **kwargs)
    assert_grad_close(grad_attn, mad_backward_reference(grad, attn, PATCH, **kwargs), dtype)


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_more_than_2_to_the_31_elements(layout):
    """Offsets past 2^31 elements: the last matrices of a 4.3 GB float16 tensor are checked."""
    n = 197
    matrices = 2**31 // (n * n) + 2
    attn = torch.empty((matrices, n, n), dtype=torch.float16, device=DEVICE).uniform_()
    if layout == "transposed":
        attn = attn.transpose(-1, -2)
    out = vitmad.mad(attn, PATCH, reduction="none")
    tail = attn[-3:]
    torch.testing.assert_close(out[-3:].double(), mad_reference(tail, PATCH, reduction="none"),
                               **tolerance(torch.float16))
    grad = torch.ones(matrices, device=DEVICE)
    grad_attn = torch.ops.vitmad.mad_backward(grad, attn, PATCH, renormalize=True)
    assert_grad_close(grad_attn[-3:], mad_backward_reference(grad[-3:], tail, PATCH, renormalize=True),
                      torch.float16)


@pytest.mark.parametrize("renormalize", [False, True], ids=["raw", "renorm"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_opcheck(renormalize, reduction):
    attn = make_attention((2, 3, 17, 17), "contiguous", torch.float32).requires_grad_(True)
    kwargs = {"num_prefix_tokens": 2, "grid": [3, 5], "renormalize": renormalize, "reduction": reduction}
    torch.library.opcheck(torch.ops.vitmad.mad.default, (attn, PATCH), kwargs)
    grad = torch.randn(vitmad.mad(attn, PATCH, **kwargs).shape, device=DEVICE)
    torch.library.opcheck(torch.ops.vitmad.mad_backward.default, (grad, attn.detach(), PATCH), kwargs)


@pytest.mark.parametrize("renormalize", [False, True], ids=["raw", "renorm"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_gradcheck(renormalize, reduction, layout):
    attn = make_attention((2, 10, 10), layout, torch.float64).requires_grad_(True)
    kwargs = {"num_prefix_tokens": 1, "grid": [3, 3], "renormalize": renormalize, "reduction": reduction}
    assert torch.autograd.gradcheck(lambda a: vitmad.mad(a, PATCH, **kwargs), (attn,))


def test_cuda_graph_capture_and_replay():
    static = make_attention((2, 12, 197, 197), "contiguous", torch.float32, seed=1)
    grad = torch.randn(2, 12, device=DEVICE)
    # Warm up on a side stream, as torch.cuda.graphs asks, so lazy initialisation is not captured.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        vitmad.mad(static, PATCH)
        torch.ops.vitmad.mad_backward(grad, static, PATCH, renormalize=True)
    torch.cuda.current_stream().wait_stream(side)

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = vitmad.mad(static, PATCH)
        per_query = vitmad.mad(static, PATCH, reduction="none")
        grad_attn = torch.ops.vitmad.mad_backward(grad, static, PATCH, renormalize=True)

    fresh = make_attention((2, 12, 197, 197), "contiguous", torch.float32, seed=2)
    static.copy_(fresh)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out.double(), mad_reference(fresh, PATCH), **tolerance(torch.float32))
    torch.testing.assert_close(per_query.double(), mad_reference(fresh, PATCH, reduction="none"),
                               **tolerance(torch.float32))
    assert_grad_close(grad_attn, mad_backward_reference(grad, fresh, PATCH, renormalize=True), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "sliced"])
def test_repeated_runs_are_bit_identical(dtype, layout):
    attn = make_attention((4, 12, 577, 577), layout, dtype, seed=3)
    grad = torch.randn(4, 12, device=DEVICE)
    first = vitmad.mad(attn, PATCH, renormalize=True)
    first_rows = vitmad.mad(attn, PATCH, reduction="none")
    first_grad = torch.ops.vitmad.mad_backward(grad, attn, PATCH, renormalize=True)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    for run in range(5):
        with torch.cuda.stream(side if run % 2 else torch.cuda.current_stream()):
            again = vitmad.mad(attn, PATCH, renormalize=True)
            again_rows = vitmad.mad(attn, PATCH, reduction="none")
            again_grad = torch.ops.vitmad.mad_backward(grad, attn, PATCH, renormalize=True)
        torch.cuda.synchronize()
        assert torch.equal(again, first) and torch.equal(again_rows, first_rows)
        assert torch.equal(again_grad, first_grad)


@pytest.mark.parametrize("shape", [(0, 12, 197, 197), (2, 0, 17, 17), (0, 5, 5)])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_empty_batch(shape, reduction):
    attn = torch.empty(shape, device=DEVICE)
    out = vitmad.mad(attn, PATCH, reduction=reduction)
    n = shape[-1]
    expected_shape = shape[:-2] if reduction == "mean" else (*shape[:-2], n - 1)
    assert out.shape == expected_shape and out.device == attn.device
    grad_attn = torch.ops.vitmad.mad_backward(torch.empty(expected_shape, device=DEVICE), attn, PATCH,
                                              reduction=reduction)
    assert grad_attn.shape == attn.shape


def test_nan_only_where_it_belongs():
    """A NaN in prefix rows or columns is never read; a NaN among one query's patch keys makes that query
    (and its matrix's mean) NaN and nothing else, forward and backward."""
    attn = make_attention((2, 3, 197, 197), "contiguous", torch.float32, seed=4)
    attn[0, 0, 0, :] = float("nan")  # the CLS query row
    attn[0, 0, :, 0] = float("nan")  # the CLS key column
    attn[1, 2, 1 + 50, 1 + 7] = float("nan")  # patch query 50, patch key 7 of matrix (1, 2)

    per_query = vitmad.mad(attn, PATCH, reduction="none")
    expected_rows = torch.zeros_like(per_query, dtype=torch.bool)
    expected_rows[1, 2, 50] = True
    assert torch.equal(per_query.isnan(), expected_rows)
    mean = vitmad.mad(attn, PATCH)
    expected_mean = torch.zeros_like(mean, dtype=torch.bool)
    expected_mean[1, 2] = True
    assert torch.equal(mean.isnan(), expected_mean)

    grad = torch.ones(2, 3, device=DEVICE)
    assert not torch.ops.vitmad.mad_backward(grad, attn, PATCH).isnan().any()
    grad_attn = torch.ops.vitmad.mad_backward(grad, attn, PATCH, renormalize=True)
    expected_grad = torch.zeros_like(grad_attn, dtype=torch.bool)
    expected_grad[1, 2, 1 + 50, 1:] = True
    assert torch.equal(grad_attn.isnan(), expected_grad)


def test_prefix_rows_and_columns_of_the_gradient_are_zero():
    attn = make_attention((2, 3, 197, 197), "contiguous", torch.float16, seed=5)
    grad_attn = torch.ops.vitmad.mad_backward(torch.randn(2, 3, device=DEVICE), attn, PATCH, num_prefix_tokens=5,
                                              grid=[12, 16], renormalize=True)
    assert not grad_attn[..., :5, :].any() and not grad_attn[..., :, :5].any()


def test_backward_rejects_grad_on_another_device():
    attn = make_attention((2, 17, 17), "contiguous", torch.float32)
    with pytest.raises(ValueError, match="grad must be on attn's device"):
        torch.ops.vitmad.mad_backward(torch.ones(2), attn, PATCH)
    with pytest.raises(ValueError, match="grad must be on attn's device"):
        torch.ops.vitmad.mad_backward(torch.ones(2, device=DEVICE), attn.cpu(), PATCH)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs a second GPU")
def test_runs_on_the_tensor_s_gpu_not_the_current_one():
    attn = make_attention((2, 3, 197, 197), "contiguous", torch.float32, seed=6).to("cuda:1")
    grad = torch.randn(2, 3, device="cuda:1")
    with torch.cuda.device(0):
        out = vitmad.mad(attn, PATCH)
        grad_attn = torch.ops.vitmad.mad_backward(grad, attn, PATCH, renormalize=True)
    assert out.device == attn.device and grad_attn.device == attn.device
    torch.testing.assert_close(out.double(), mad_reference(attn, PATCH), **tolerance(torch.float32))
    assert_grad_close(grad_attn, mad_backward_reference(grad, attn, PATCH, renormalize=True), torch.float32)
