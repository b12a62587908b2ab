"""mad's backward (its own op, vitmad::mad_backward), opcheck and torch.compile."""

from __future__ import annotations

import pytest
import torch

import vitmad
from conftest import DEVICES, DTYPES, random_attention, tolerance
from vitmad.ops.reference import mad_backward_reference


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n,prefix,grid", [(17, 1, None), (50, 2, [6, 8]), (197, 1, None), (26, 0, [2, 13])])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_backward_matches_reference(device, n, prefix, grid, reduction, renormalize, layout):
    attn = random_attention((2, 3, n, n), torch.float32, device, seed=n)
    if layout == "transposed":
        attn = attn.transpose(-1, -2).contiguous().transpose(-1, -2)
    attn.requires_grad_(True)
    kwargs = dict(num_prefix_tokens=prefix, grid=grid, renormalize=renormalize, reduction=reduction)
    out = vitmad.mad(attn, 16, **kwargs)
    grad = torch.randn_like(out)
    (grad_attn,) = torch.autograd.grad(out, attn, grad)
    expected = mad_backward_reference(grad, attn, 16, **kwargs)
    assert grad_attn.dtype == attn.dtype and grad_attn.shape == attn.shape
    # g * (d - m) / Z cancels where d is close to m: float32 error is relative to the largest term.
    scale = expected.abs().max().item()
    torch.testing.assert_close(grad_attn.double(), expected, rtol=2e-5, atol=2e-5 * scale)
    # Prefix rows and columns get exactly zero.
    assert not grad_attn[..., :prefix, :].any() and not grad_attn[..., :, :prefix].any()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_dtypes(device, dtype):
    attn = random_attention((2, 2, 65, 65), dtype, device, seed=5).requires_grad_(True)
    out = vitmad.mad(attn, 16, renormalize=True)
    (grad_attn,) = torch.autograd.grad(out.sum(), attn)
    assert grad_attn.dtype == dtype
    expected = mad_backward_reference(torch.ones_like(out), attn, 16, renormalize=True)
    # The gradient is rounded to attn's dtype on output.
    rounding = {torch.float16: 1e-3, torch.bfloat16: 8e-3}.get(dtype)
    tol = tolerance(dtype) if rounding is None else {"rtol": rounding, "atol": rounding * expected.abs().max()}
    torch.testing.assert_close(grad_attn.double(), expected, **tol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gradcheck(device, renormalize, reduction):
    attn = random_attention((2, 10, 10), torch.float64, device, seed=1).requires_grad_(True)

    def fn(a):
        return vitmad.mad(a, 3, grid=[3, 3], renormalize=renormalize, reduction=reduction)

    assert torch.autograd.gradcheck(fn, (attn,))


SAMPLE_INPUTS = [
    ((random_attention((2, 3, 17, 17)), 16), {}),
    ((random_attention((2, 26, 26), torch.float64), 14), {"num_prefix_tokens": 2, "grid": [4, 6]}),
    ((random_attention((3, 10, 10), torch.float32), 1), {"reduction": "none", "renormalize": True, "grid": [3, 3]}),
    ((random_attention((2, 5, 5), torch.bfloat16), 8), {"num_prefix_tokens": 0, "grid": [1, 5]}),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", range(len(SAMPLE_INPUTS)))
def test_opcheck(device, case):
    (attn, patch), kwargs = SAMPLE_INPUTS[case]
    attn = attn.to(device).requires_grad_(attn.dtype != torch.bfloat16)
    torch.library.opcheck(torch.ops.vitmad.mad.default, (attn, patch), kwargs)
    out = vitmad.mad(attn.detach(), patch, **kwargs)
    torch.library.opcheck(torch.ops.vitmad.mad_backward.default, (torch.ones_like(out), attn.detach(), patch), kwargs)


def test_torch_compile_fullgraph():
    def layer_mads(attn):
        return vitmad.mad(attn.softmax(-1), 16, reduction="none").mean(-1)

    logits = torch.randn(2, 4, 197, 197)
    compiled = torch.compile(layer_mads, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(logits), layer_mads(logits))


@pytest.mark.parametrize("form", ["grid", "positions"])
@pytest.mark.parametrize("renormalize", [False, True])
def test_second_order_gradients_are_refused_not_silently_cut(form, renormalize):
    """The gradient is not differentiable (vitmad::mad_backward has no derivative): with create_graph=True it
    still comes, and differentiating it raises, as torch's once_differentiable does, instead of giving no
    second-order term (with renormalize=True MAD is not linear in attn, so that term is not zero)."""
    attn = random_attention((2, 10, 10), torch.float64, "cpu", seed=3).requires_grad_(True)
    options = {"grid": [3, 3], "renormalize": renormalize}
    if form == "grid":
        out = vitmad.mad(attn, 3, **options)
    else:
        positions = torch.rand(10, 2, dtype=torch.float64)
        positions[0] = float("nan")
        out = vitmad.mad(attn, positions=positions, renormalize=renormalize)
    (grad,) = torch.autograd.grad(out.sum(), attn, create_graph=True)
    expected = mad_backward_reference(torch.ones_like(out), attn.detach(), 3, num_prefix_tokens=1, **options)
    if form == "grid":
        torch.testing.assert_close(grad, expected)  # the first order is unchanged
    assert grad.requires_grad
    with pytest.raises(RuntimeError, match="vitmad.mad is differentiable once"):
        grad.square().sum().backward()
    # Without create_graph nothing is recorded: backward as before.
    out = vitmad.mad(attn, 3, **options) if form == "grid" else vitmad.mad(attn, positions=positions,
                                                                              renormalize=renormalize)
    out.sum().backward()
    assert attn.grad is not None and not attn.grad.requires_grad
