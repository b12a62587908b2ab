"""The pure-PyTorch kernels that stand in when the compiled library is missing."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import vitmad
from conftest import DTYPES, random_attention, tolerance
from vitmad.ops import fallback as _fallback
from vitmad.ops.reference import mad_backward_reference, mad_qk_positions_reference, mad_reference


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,prefix,grid", [(17, 1, None), (197, 1, None), (390, 6, [16, 24]), (26, 0, [2, 13])])
@pytest.mark.parametrize("reduction,renormalize", [("mean", False), ("none", False), ("mean", True), ("none", True)])
def test_fallback_matches_reference(dtype, n, prefix, grid, reduction, renormalize):
    attn = random_attention((2, 3, n, n), dtype, seed=n).transpose(-1, -2)
    kwargs = dict(num_prefix_tokens=prefix, grid=grid, renormalize=renormalize, reduction=reduction)
    out = _fallback.mad(attn, 14, **kwargs)
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(out.double(), mad_reference(attn, 14, **kwargs), **tolerance(dtype))
    grad = torch.randn(out.shape, dtype=out.dtype)
    grad_attn = _fallback.mad_backward(grad, attn, 14, **kwargs)
    expected = mad_backward_reference(grad, attn, 14, **kwargs)
    scale = expected.abs().max().item()
    rounding = {torch.float16: 1e-3, torch.bfloat16: 8e-3}.get(dtype, 2e-5)
    torch.testing.assert_close(grad_attn.double(), expected, rtol=rounding, atol=rounding * scale)


@pytest.mark.parametrize("call", [lambda: _fallback.mad(None, 16), lambda: _fallback.stats(None, 16, ["mad"])])
def test_fallback_grid_form_names_attn_given_none(call):
    """QA 329: the dispatcher hands None on to a Python kernel, which read its shape: an AttributeError."""
    with pytest.raises(TypeError, match=r"vitmad\.(mad|attention_stats): attn must be a torch\.Tensor"):
        call()


def test_fallback_chunks_bound_the_distance_slice(monkeypatch):
    # A tiny chunk budget forces many query chunks; the result must not change.
    monkeypatch.setattr(_fallback, "_DISTANCE_CHUNK_ELEMENTS", 500)
    attn = random_attention((2, 197, 197), seed=2)
    torch.testing.assert_close(_fallback.mad(attn, 16, reduction="none").double(),
                               mad_reference(attn, 16, reduction="none"),
                               **tolerance(torch.float32))


@pytest.mark.skipif(vitmad.backend() != "compiled", reason="the compiled library is not loaded in this run")
def test_compiled_schemas_equal_fallback_schemas():
    for name, schema in _fallback.SCHEMAS.items():
        assert str(getattr(torch.ops.vitmad, name).default._schema) == "vitmad::" + schema


def test_ci_uses_compiled_kernels():
    # .ci/run sets VITMAD_REQUIRE_COMPILED=1, so a build that silently fell back fails CI.
    if os.environ.get("VITMAD_REQUIRE_COMPILED") == "1":
        assert vitmad.backend() == "compiled"
        assert vitmad.has_compiled_kernel("mad", "CPU") and vitmad.has_compiled_kernel("mad_backward", "CPU")
    else:
        assert vitmad.backend() in ("compiled", "python")


def test_import_without_compiled_library_falls_back_with_one_warning():
    script = textwrap.dedent(
        """
        import logging, torch
        logging.basicConfig(level=logging.WARNING, format="%(name)s:%(levelname)s:%(message)s")
        import vitmad
        from vitmad.ops.reference import mad_reference
        assert vitmad.backend() == "python", vitmad.backend()
        a = torch.rand(2, 3, 197, 197).softmax(-1).requires_grad_(True)
        out = torch.ops.vitmad.mad(a, 16, renormalize=True)
        torch.testing.assert_close(out.double(), mad_reference(a, 16, renormalize=True), rtol=2e-5, atol=2e-5)
        out.sum().backward()
        assert a.grad.shape == a.shape
        # Differentiable once, as the compiled autograd: a second order is refused, never silently cut.
        g, = torch.autograd.grad(torch.ops.vitmad.mad(a, 16, renormalize=True).sum(), a, create_graph=True)
        try:
            g.square().sum().backward()
            raise AssertionError("a second-order gradient through vitmad.mad was not refused")
        except RuntimeError as error:
            assert "vitmad.mad is differentiable once" in str(error), error
        torch.library.opcheck(torch.ops.vitmad.mad.default, (a.detach(), 16), {"reduction": "none"})
        compiled = torch.compile(lambda x: vitmad.mad(x, 16), fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(compiled(a.detach()), vitmad.mad(a.detach(), 16))
        print("FALLBACK-OK")
        """
    )
    env = dict(os.environ, VITMAD_DISABLE_COMPILED="1")
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "FALLBACK-OK" in result.stdout
    warnings = [line for line in result.stderr.splitlines() if line.startswith("vitmad:WARNING")]
    assert len(warnings) == 1 and "pure-PyTorch kernels" in warnings[0], result.stderr
    # Chosen by the variable, not missing: no advice to reinstall (QA 416).
    assert "disabled by VITMAD_DISABLE_COMPILED" in warnings[0] and "Reinstall" not in warnings[0]


def test_has_compiled_kernel_takes_torch_device_names_and_refuses_unknown_ones():
    """It took the dispatch keys "CPU" / "CUDA" alone: "cpu" raised torch's "could not parse dispatch key" and an
    unknown op torch's "does not exist" (QA helper-182)."""
    on_cpu = vitmad.has_compiled_kernel("mad", "CPU")
    assert on_cpu == (vitmad.backend() == "compiled")
    assert vitmad.has_compiled_kernel("mad", "cpu") == on_cpu
    assert vitmad.has_compiled_kernel("mad", torch.device("cpu")) == on_cpu
    assert vitmad.has_compiled_kernel("mad", "cuda:1") == vitmad.has_compiled_kernel("mad", "CUDA")
    assert vitmad.has_compiled_kernel("mad", "meta") is False  # no kernels of csrc/ there
    with pytest.raises(ValueError, match=r"op='nosuch' is no vitmad op"):
        vitmad.has_compiled_kernel("nosuch", "cpu")
    with pytest.raises(ValueError, match=r"device='gpu' is no device torch knows"):
        vitmad.has_compiled_kernel("mad", "gpu")


@pytest.mark.parametrize("renormalize", [False, True])
def test_fallback_and_reference_mad_qk_positions_give_nan_for_a_nan_row_whose_keys_have_no_position(renormalize):
    """A NaN or +inf logit, or every key masked, makes a query's row NaN: NaN for that query, also where no key has
    a position and none of the row is summed (QA 314: the fallback gave 0, the compiled kernel NaN)."""
    nan, inf = float("nan"), float("inf")
    q, k = torch.tensor([[[1.0, 0.0], [0.5, 0.5]]]), torch.tensor([[[1.0, 1.0], [0.0, 1.0], [0.3, 0.2]]])
    positions = torch.tensor([[0.0, 0.0], [16.0, 0.0]])
    for key_positions in (torch.full((3, 2), nan), torch.tensor([[nan, nan], [nan, nan], [3.0, 4.0]])):
        for bias in (torch.tensor([[nan, 0.0, 0.0], [0.0, 0.0, 0.0]]), torch.tensor([[inf, 0.0, 0.0], [0.0] * 3]),
                     torch.tensor([[False] * 3, [True] * 3])):
            got = _fallback.mad_qk_pos(q, k, positions, key_positions, attn_bias=bias, renormalize=renormalize,
                                       reduction="none")
            assert got[0, 0].isnan()
            if key_positions[2, 0].isnan():  # query 1 attends to no key with a position: 0 px, or NaN renormalised
                assert got[0, 1].isnan() if renormalize else got[0, 1] == 0
            else:
                assert got[0, 1] > 0
            stats = _fallback.stats_qk_pos(q, k, positions, key_positions, stats=["mad", "entropy"],
                                           attn_bias=bias, renormalize=renormalize, reduction="none")
            torch.testing.assert_close(stats[0], got, equal_nan=True)  # [statistic, ...]: "mad" first
            # The float64 reference too (QA 319: 0 there).
            reference = mad_qk_positions_reference(q, k, positions, key_positions, attn_bias=bias,
                                                   renormalize=renormalize, reduction="none")
            torch.testing.assert_close(reference.float(), got, equal_nan=True)
            if vitmad.backend() == "compiled":
                compiled = torch.ops.vitmad.mad_qk_pos(q, k, positions, key_positions, attn_bias=bias,
                                                       renormalize=renormalize, reduction="none")
                torch.testing.assert_close(compiled, got, equal_nan=True)
