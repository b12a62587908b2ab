"""Every invalid call raises an exception that names the argument, what was expected and what was given,
identically from the compiled kernels and from the pure-PyTorch fallback."""

from __future__ import annotations

import re
import warnings
from decimal import Decimal
from fractions import Fraction

import numpy as np
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import vitmad
from vitmad.ops import fallback as _fallback

A197 = torch.rand(2, 197, 197)

# (args, kwargs, exception type, pattern the message must match)
BAD_CALLS = [
    ((torch.rand(197), 16), {}, ValueError, r"attn must have at least 2 dimensions.*got shape \[197\]"),
    ((torch.rand(2, 197, 196), 16), {}, ValueError, r"attn must be square.*got shape \[2, 197, 196\]"),
    ((torch.rand(2, 200, 200), 16), {}, ValueError, r"199 patch tokens do not form a square grid; pass grid"),
    ((A197, 16), {"grid": [14]}, ValueError, r"grid must be \[grid_h, grid_w\] \(2 values\), got 1"),
    ((A197, 16), {"grid": [14, 14, 1]}, ValueError, r"grid must be \[grid_h, grid_w\] \(2 values\), got 3"),
    ((A197, 16), {"grid": [0, 14]}, ValueError, r"grid must hold positive sizes, got \[0, 14\]"),
    ((A197, 16), {"grid": [-14, -14]}, ValueError, r"grid must hold positive sizes"),
    ((A197, 16), {"grid": [14, 15]}, ValueError, r"grid \[14, 15\] has 210 patches.*197 - 1 = 196 patch tokens"),
    ((A197, 0), {}, ValueError, r"patch must be a positive patch size in pixels, got 0"),
    ((A197, -16), {}, ValueError, r"patch must be a positive patch size in pixels, got -16"),
    ((A197, 16), {"num_prefix_tokens": -1}, ValueError, r"num_prefix_tokens must be in \[0, N\).*got -1"),
    ((A197, 16), {"num_prefix_tokens": 197}, ValueError, r"num_prefix_tokens must be in \[0, N\) with N = 197"),
    ((A197, 16), {"reduction": "sum"}, ValueError, r"reduction must be 'mean' or 'none', got 'sum'"),
    ((torch.ones(2, 197, 197, dtype=torch.int64), 16), {}, TypeError,
     r"attn must be float16, bfloat16.*got torch\.int64$"),
    ((torch.ones(2, 197, 197, dtype=torch.bool), 16), {}, TypeError,
     r"attn must be float16, bfloat16.*got torch\.bool$"),
    ((torch.ones(2, 197, 197, dtype=torch.complex64), 16), {}, TypeError,
     r"attn must be float16, bfloat16.*got torch\.complex64$"),
    ((torch.rand(1, 1), 16), {}, ValueError, r"num_prefix_tokens must be in \[0, N\) with N = 1 tokens, got 1"),
    ((torch.rand(0, 0), 16), {"num_prefix_tokens": 0}, ValueError, r"num_prefix_tokens must be in \[0, N\)"),
]


@pytest.mark.parametrize("args,kwargs,error,pattern", BAD_CALLS, ids=[c[3][:40] for c in BAD_CALLS])
def test_op_errors(args, kwargs, error, pattern):
    with pytest.raises(error, match="vitmad.mad: .*" + pattern):
        vitmad.mad(*args, **kwargs)


@pytest.mark.parametrize("args,kwargs,error,pattern", BAD_CALLS, ids=[c[3][:40] for c in BAD_CALLS])
def test_fallback_errors_match(args, kwargs, error, pattern):
    with pytest.raises(error, match="vitmad.mad: .*" + pattern):
        _fallback.mad(*args, **kwargs)


@pytest.mark.parametrize("args,kwargs,error,pattern", BAD_CALLS, ids=[c[3][:40] for c in BAD_CALLS])
def test_backward_op_errors(args, kwargs, error, pattern):
    grad = torch.ones(2)
    with pytest.raises(error, match="vitmad.mad_backward: .*" + pattern):
        torch.ops.vitmad.mad_backward(grad, *args, **kwargs)


@pytest.mark.parametrize("grad_shape", [(3,), (2, 196, 1), ()])
def test_backward_grad_shape(grad_shape):
    pattern = r"vitmad.mad_backward: grad must have the shape of mad's output \[2\], got"
    with pytest.raises(ValueError, match=pattern):
        torch.ops.vitmad.mad_backward(torch.ones(grad_shape), A197, 16)
    with pytest.raises(ValueError, match=pattern):
        _fallback.mad_backward(torch.ones(grad_shape), A197, 16)


def test_backward_grad_checked_without_running_a_kernel():
    """The shape-only kernel of mad_backward checks grad as the kernels do: a grad on the meta device beside attn
    on the CPU got an uninitialised CPU tensor, and under FakeTensorMode a grad of the wrong shape or dtype was
    accepted (QA helper-234); the positions form always checked it."""
    with pytest.raises(ValueError, match=r"^vitmad.mad_backward: grad must be on attn's device cpu, got meta"):
        torch.ops.vitmad.mad_backward(torch.ones(2, device="meta"), A197, 16)
    with FakeTensorMode() as mode:
        attn = mode.from_tensor(A197)
        with pytest.raises(ValueError, match=r"grad must have the shape of mad's output \[2\], got \[5, 7\]"):
            torch.ops.vitmad.mad_backward(torch.empty(5, 7), attn, 16)
        with pytest.raises(TypeError, match="grad must be a floating-point tensor, got torch.int64"):
            torch.ops.vitmad.mad_backward(torch.empty(2, dtype=torch.int64), attn, 16)
        assert torch.ops.vitmad.mad_backward(torch.empty(2), attn, 16).shape == A197.shape


def test_sparse_input():
    with pytest.raises((ValueError, RuntimeError, NotImplementedError), match="(?i)sparse|layout|strided"):
        vitmad.mad(A197[0].to_sparse(), 16)


def test_schema_level_type_errors_are_clear():
    # A float patch size is rejected by the schema before any kernel runs; the message names the argument.
    with pytest.raises((TypeError, RuntimeError), match="patch"):
        torch.ops.vitmad.mad(A197, 16.5)


_Q = torch.randn(2, 197, 8)
_POSITIONS = vitmad.grid_positions(14, 14, 16, num_prefix_tokens=1)
WRONG_TYPES = [
    # call, the message: the function users call, the argument, what it takes and what was given
    (lambda: vitmad.mad("attn", 16), "vitmad.mad: attn must be a torch.Tensor, got str"),
    (lambda: vitmad.mad(A197.numpy(), 16), "vitmad.mad: attn must be a torch.Tensor, got ndarray"),
    (lambda: vitmad.mad(A197, "16"), "vitmad.mad: patch must be an int, got str"),
    (lambda: vitmad.mad(A197, 16.5), "vitmad.mad: patch must be an int, got float 16.5"),  # the value: QA 266
    (lambda: vitmad.mad(A197, 16, num_prefix_tokens=1.0), "vitmad.mad: num_prefix_tokens must be an int, got float "
                                                          "1.0"),
    (lambda: vitmad.mad_qk(_Q, _Q, 2.5), "vitmad.mad_qk: patch must be an int, got float 2.5"),
    (lambda: vitmad.mad(A197, True), "vitmad.mad: patch must be an int, got the bool True"),
    (lambda: vitmad.mad(A197, 16, num_prefix_tokens=True), "vitmad.mad: num_prefix_tokens must be an int, got the "
                                                           "bool True"),
    # The dispatcher takes a 0-d float tensor as an int rounded toward zero, a NumPy or tensor bool as 1 (QA 288:
    # patch=torch.tensor(16.5) gave patch 16's MAD).
    (lambda: vitmad.mad(A197, torch.tensor(16.5)), "vitmad.mad: patch must be an int, got a torch.float32 tensor "
                                                   "tensor(16.5000)"),
    (lambda: vitmad.mad(A197, 16, num_prefix_tokens=torch.tensor(1.9)), "vitmad.mad: num_prefix_tokens must be an "
                                                                        "int, got a torch.float32 tensor"),
    (lambda: vitmad.mad(A197, torch.tensor(True)), "vitmad.mad: patch must be an int, got a torch.bool tensor "
                                                   "tensor(True)"),
    (lambda: vitmad.mad(A197, np.bool_(True)), "vitmad.mad: patch must be an int, got the bool True"),
    # Numbers that are no integers but convert to one were rounded toward zero (QA 360: np.float32(14.5) as 14).
    (lambda: vitmad.mad(A197, np.float32(14.5)), "vitmad.mad: patch must be an int, got float32 14.5"),
    (lambda: vitmad.mad(A197, Fraction(29, 2)), "vitmad.mad: patch must be an int, got Fraction 29/2"),
    (lambda: vitmad.mad_qk(_Q, _Q, Decimal("14.5")), "vitmad.mad_qk: patch must be an int, got Decimal 14.5"),
    (lambda: vitmad.attention_stats(A197, 16, num_prefix_tokens=np.float16(1.9)), "vitmad.attention_stats: "
                                                                                   "num_prefix_tokens must be an int"),
    (lambda: vitmad.attention_stats_qk(_Q, _Q, np.longdouble(2.5)), "vitmad.attention_stats_qk: patch must be an int"),
    (lambda: vitmad.mad(A197, 16, grid=[torch.tensor(True), 196]), "vitmad.mad: grid must hold integers, got "
                                                                   "[tensor(True), 196]"),  # QA 294: a 1 x 196 grid
    (lambda: vitmad.grid_positions(torch.tensor(True), 4, 16), "vitmad.grid_positions: grid_h must be an int, got "
                                                               "tensor(True)"),
    (lambda: vitmad.mad_qk(_Q, _Q, torch.tensor(16.9)), "vitmad.mad_qk: patch must be an int, got a torch.float32 "
                                                        "tensor"),
    (lambda: vitmad.attention_stats(A197, torch.tensor(16.5)), "vitmad.attention_stats: patch must be an int, got a "
                                                               "torch.float32 tensor"),
    (lambda: vitmad.attention_stats_qk(_Q, _Q, torch.tensor(16.5, dtype=torch.float64)),
     "vitmad.attention_stats_qk: patch must be an int, got a torch.float64 tensor"),
    (lambda: vitmad.mad(A197, 16, renormalize="no"), "vitmad.mad: renormalize must be True or False, got 'no'"),
    (lambda: vitmad.mad(A197, positions=_POSITIONS, renormalize=3), "vitmad.mad: renormalize must be True or False, "
                                                                    "got 3"),
    (lambda: vitmad.mad(A197, 16, reduction=1), "vitmad.mad: reduction must be a string, got int"),
    (lambda: vitmad.mad(A197, positions=[[0.0, 0.0]]), "vitmad.mad: positions must be a torch.Tensor, got list"),
    (lambda: vitmad.mad_qk(_Q, "k", 16), "vitmad.mad_qk: k must be a torch.Tensor"),
    (lambda: vitmad.mad_qk(_Q, _Q, True), "vitmad.mad_qk: patch must be an int, got the bool True"),
    (lambda: vitmad.mad_qk(_Q, _Q, 16, scale="0.1"), "vitmad.mad_qk: scale must be a number"),
    (lambda: vitmad.mad_qk(_Q, _Q, 16, scale=True), "vitmad.mad_qk: scale must be a number"),
    (lambda: vitmad.mad_qk(_Q, _Q, 16, attn_bias=0.5), "vitmad.mad_qk: attn_bias must be a torch.Tensor or None, got "
                                                       "float"),
    (lambda: vitmad.attention_stats(A197, "16"), "vitmad.attention_stats: patch must be an int, got str"),
    (lambda: vitmad.attention_stats(A197, 16, renormalize=None), "vitmad.attention_stats: renormalize must be True "
                                                                 "or False, got None"),
    (lambda: vitmad.attention_stats("attn", 16, stats=["prefix_maps"]), "vitmad.attention_stats: attn must be a "
                                                                        "torch.Tensor"),
    (lambda: vitmad.attention_stats(A197, "16", stats=["prefix_maps"]), "vitmad.attention_stats: patch must be an "
                                                                        "int, got '16'"),
    (lambda: vitmad.attention_stats(A197, positions=_POSITIONS, reduction=None), "vitmad.attention_stats: reduction "
                                                                                 "must be a string, got NoneType"),
    (lambda: vitmad.attention_stats_qk("q", _Q, 16, stats=["prefix_maps"]), "vitmad.attention_stats_qk: q must be a "
                                                                            "torch.Tensor"),
    (lambda: vitmad.attention_stats_qk(_Q, _Q, 16, scale=[0.1]), "vitmad.attention_stats_qk: scale must be a number"),
    (lambda: vitmad.attention_stats_qk(_Q, _Q, True), "vitmad.attention_stats_qk: patch must be an int, got the bool"),
    # The prefix maps alone call no op: reduction was a ValueError there, None quoted as 'None' (QA 367).
    (lambda: vitmad.attention_stats(A197, 16, stats="prefix_maps", reduction=None),
     "vitmad.attention_stats: reduction must be a string, got NoneType None"),
    (lambda: vitmad.attention_stats(A197, positions=_POSITIONS, stats="prefix_maps", reduction=5),
     "vitmad.attention_stats: reduction must be a string, got int 5"),
    (lambda: vitmad.attention_stats_qk(_Q, _Q, 16, stats="prefix_maps", reduction=None),
     "vitmad.attention_stats_qk: reduction must be a string, got NoneType None"),
]


@pytest.mark.parametrize("call,message", WRONG_TYPES, ids=[m[:60] for _, m in WRONG_TYPES])
def test_arguments_of_the_wrong_type_are_type_errors_naming_them(call, message):
    """Not the dispatcher's RuntimeError with its schema dump, nor True taken for the int 1 or 3 for True: a
    TypeError from the function called, naming the argument, what it takes and what it got."""
    with pytest.raises(TypeError, match=re.escape(message)):
        call()


def test_errors_of_the_kernels_are_not_turned_into_type_errors():
    with pytest.raises(ValueError, match="patch must be a positive patch size in pixels, got 0"):
        vitmad.mad(A197, 0)
    with pytest.raises(ValueError, match="vitmad.mad_qk: scale must be finite, got inf"):
        vitmad.mad_qk(_Q, _Q, 16, scale=float("inf"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("scale", [1e39, -1e300])
def test_a_scale_beyond_float32_is_refused_for_logits_computed_in_float32(dtype, scale):
    """Finite as a Python float, infinite in float32, where the logits of 16-bit and float32 q are computed:
    MAD and every statistic came out NaN where the float64 reference is finite."""
    q = _Q.to(dtype)
    # The C++ check names the dtype as c10 spells it (Float, Half), the Python fallback as torch does.
    message = (r"scale must be finite in float32, the precision of the logits of \S+ q "
               r"\(\|scale\| <= 3\.40282\d*e\+38\), got ")
    for call in (lambda: vitmad.mad_qk(q, q, 16, scale=scale),
                 lambda: vitmad.attention_stats_qk(q, q, 16, scale=scale, stats=["mad", "entropy"]),
                 lambda: vitmad.mad_qk(q, q, positions=vitmad.grid_positions(14, 14, 16, num_prefix_tokens=1),
                                       scale=scale),
                 lambda: _fallback.mad_qk(q, q, 16, scale=scale)):
        with pytest.raises(ValueError, match=message):
            call()


def test_a_scale_beyond_float32_is_taken_for_float64_logits():
    q = _Q.double()
    value = vitmad.mad_qk(q, q, 16, scale=1e39)
    expected = vitmad.mad(torch.softmax(q @ q.transpose(-1, -2) * 1e39, -1), 16)
    torch.testing.assert_close(value, expected, rtol=1e-12, atol=0)
    assert value.isfinite().all()


_DENSE = torch.rand(2, 17, 17).softmax(-1)


@pytest.mark.parametrize("kind", ["sparse_coo", "sparse_csr", "nested"])
def test_sparse_and_nested_tensors_are_refused_naming_the_argument(kind):
    """They reached the dispatcher, which answered with its own NotImplementedError ("Could not run 'vitmad::mad'
    with arguments from the 'SparseCPU' backend ...") or, for a nested tensor, "Internal error: NestedTensorImpl
    doesn't support sizes. Please file an issue"."""
    with warnings.catch_warnings():  # torch warns once that CSR and nested tensors are beta/prototype
        warnings.simplefilter("ignore", UserWarning)
        attn = {"sparse_coo": lambda: _DENSE.to_sparse(), "sparse_csr": lambda: _DENSE.to_sparse_csr(),
                "nested": lambda: torch.nested.nested_tensor(list(_DENSE))}[kind]()
    got = "a nested tensor" if kind == "nested" else f"layout torch.{kind}"
    positions = vitmad.grid_positions(4, 4, 1, num_prefix_tokens=1)
    for name, call in (("vitmad.mad", lambda: vitmad.mad(attn, 1)),
                       ("vitmad.attention_stats", lambda: vitmad.attention_stats(attn, 1, stats=["entropy"])),
                       ("vitmad.mad", lambda: vitmad.mad(attn, positions=positions))):
        with pytest.raises(ValueError, match=re.escape(f"{name}: attn must be a dense (strided) tensor, got {got}")):
            call()


def test_nested_arguments_of_the_maps_alone_and_of_temporal_mad_are_refused_naming_them():
    """The prefix maps alone, and the stored-attention temporal MAD, are checked without an op call: a nested
    positions, key_positions, q, k or times raised torch's "NestedTensorImpl doesn't support sizes", a NumPy
    attn_bias an AttributeError (QA 360); every other stats list gave vitmad's error."""
    with warnings.catch_warnings():  # torch warns once that nested tensors are a prototype
        warnings.simplefilter("ignore", UserWarning)
        nest = lambda t: torch.nested.nested_tensor(list(t))  # noqa: E731
        positions = vitmad.grid_positions(4, 4, 1, num_prefix_tokens=1).expand(2, 17, 2)
        q = torch.randn(2, 17, 4)
        nested_positions, nested_q, nested_times = nest(positions), nest(q), nest(torch.rand(2, 17, 1))
    maps = ["prefix_maps"]
    for name, argument, error, call in (
            ("attention_stats", "positions", ValueError,
             lambda: vitmad.attention_stats(_DENSE, positions=nested_positions, stats=maps)),
            ("attention_stats", "key_positions", ValueError,
             lambda: vitmad.attention_stats(_DENSE, positions=positions, key_positions=nested_positions, stats=maps)),
            ("attention_stats_qk", "positions", ValueError,
             lambda: vitmad.attention_stats_qk(q, q, positions=nested_positions, stats=maps)),
            ("attention_stats_qk", "q", ValueError,
             lambda: vitmad.attention_stats_qk(nested_q, nested_q, 1, grid=[4, 4], num_prefix_tokens=1, stats=maps)),
            ("attention_stats", "times", ValueError,
             lambda: vitmad.attention_stats(_DENSE, positions=positions, times=nested_times, stats=["temporal_mad"])),
            ("attention_stats_qk", "attn_bias", TypeError,
             lambda: vitmad.attention_stats_qk(q, q, 1, grid=[4, 4], num_prefix_tokens=1, stats=maps,
                                               attn_bias=np.zeros((17, 17), dtype=np.float32)))):
        expected = ("must be a torch.Tensor or None, got ndarray" if error is TypeError else
                    "must be a dense (strided) tensor, got a nested tensor")
        with pytest.raises(error, match=re.escape(f"vitmad.{name}: {argument} {expected}")):
            call()


@pytest.mark.parametrize("op", ["stats", "stats_pos", "stats_qk", "stats_qk_pos"])
def test_the_raw_statistics_ops_given_one_string_name_it(op):
    """The dispatcher hands a str[] one string as its letters: torch.ops.vitmad.stats(attn, 16, 'mad') said the
    unknown statistic was 'm' (QA 360)."""
    positions = vitmad.grid_positions(4, 4, 1, num_prefix_tokens=1)
    q = torch.randn(2, 17, 4)
    args = {"stats": (_DENSE, 1, "entropy"), "stats_pos": (_DENSE, positions, None, "entropy"),
            "stats_qk": (q, q, 1, "entropy"), "stats_qk_pos": (q, q, positions, None, "entropy")}[op]
    with pytest.raises(TypeError, match=r"stats must be a sequence of names such as \('mad', 'entropy'\), got the "
                                        r"string 'entropy'"):
        getattr(torch.ops.vitmad, op)(*args)


def test_quantized_tensors_are_refused_naming_the_argument():
    """A quantized tensor is strided, so it passed the dense check and reached the dispatcher, whose
    NotImplementedError ("Could not run 'vitmad::mad' with arguments from the 'QuantizedCPU' backend") named no
    argument (QA 341)."""
    with warnings.catch_warnings():  # torch warns that quantized tensors are deprecated
        warnings.simplefilter("ignore", UserWarning)
        quantized = lambda t: torch.quantize_per_tensor(t, 0.1, 0, torch.quint8)  # noqa: E731
        attn, positions = quantized(_DENSE), quantized(torch.rand(17, 2))
        q = torch.randn(2, 17, 4)
        bias, keys = quantized(torch.rand(17, 17)), quantized(q.abs())
    for name, argument, call in (
            ("vitmad.mad", "attn", lambda: vitmad.mad(attn, 1)),
            ("vitmad.mad", "positions", lambda: vitmad.mad(_DENSE, positions=positions)),
            ("vitmad.attention_stats", "attn", lambda: vitmad.attention_stats(attn, 1, stats=["entropy"])),
            ("vitmad.mad_qk", "attn_bias", lambda: vitmad.mad_qk(q, q, 1, grid=[4, 4], num_prefix_tokens=1,
                                                                 attn_bias=bias)),
            ("vitmad.attention_stats_qk", "q", lambda: vitmad.attention_stats_qk(keys, keys, 1, grid=[4, 4],
                                                                                   num_prefix_tokens=1))):
        # The compiled ops' words; the pure-PyTorch kernels name the dtypes the argument takes.
        with pytest.raises(TypeError, match=rf"{re.escape(name)}: {argument} must .*, got (a quantized tensor "
                                            r"\()?torch\.quint8"):
            call()


@pytest.mark.parametrize("stats", [["mad"], ["prefix_maps"]])
@pytest.mark.parametrize("kwargs,name,value", [
    ({"patch": 2**63}, "patch", 2**63),
    ({"patch": 16, "num_prefix_tokens": 2**64}, "num_prefix_tokens", 2**64),
    ({"patch": 16, "num_prefix_tokens": -(2**63) - 1}, "num_prefix_tokens", -(2**63) - 1),
    ({"patch": 16, "grid": [2**63, 1]}, "grid", 2**63),
])
def test_integers_beyond_64_bits_are_out_of_range_not_of_the_wrong_type(stats, kwargs, name, value):
    """The dispatcher answers an int it cannot hold as it answers a str ("expected int but got int"): the entry
    points say it is out of range, with the value, whatever is asked for."""
    q = torch.randn(2, 197, 8)
    calls = {
        "vitmad.attention_stats": lambda: vitmad.attention_stats(A197, stats=stats, **kwargs),
        "vitmad.attention_stats_qk": lambda: vitmad.attention_stats_qk(q, q, stats=stats, **kwargs),
    }
    if stats == ["mad"]:
        calls["vitmad.mad"] = lambda: vitmad.mad(A197, **kwargs)
        calls["vitmad.mad_qk"] = lambda: vitmad.mad_qk(q, q, **kwargs)
    for op_name, call in calls.items():
        with pytest.raises(ValueError, match=re.escape(f"{op_name}: {name} must fit in a 64-bit integer, got {value}")):
            call()


@pytest.mark.parametrize("args,kwargs,message", [
    ((4.5, 3, 16), {}, "grid_h must be an int, got 4.5"),
    ((4, True, 16), {}, "grid_w must be an int, got True"),
    ((4, 3, "16"), {}, "patch must be a number (pixels per patch), got '16'"),
    ((4, 3, 16), {"num_prefix_tokens": 1.0}, "num_prefix_tokens must be an int, got 1.0"),
    ((4, 3, 16), {"dtype": torch.int64}, "dtype must be a floating torch.dtype"),
])
def test_grid_positions_refuses_arguments_of_the_wrong_type(args, kwargs, message):
    with pytest.raises(TypeError, match="vitmad.grid_positions: " + re.escape(message)):
        vitmad.grid_positions(*args, **kwargs)


def test_has_compiled_kernel_errors_start_with_the_function_as_the_others_do():
    with pytest.raises(ValueError, match=r"^vitmad\.has_compiled_kernel: op='nope' is no vitmad op"):
        vitmad.has_compiled_kernel("nope", "cpu")
    with pytest.raises(ValueError, match=r"^vitmad\.has_compiled_kernel: device='gpu' is no device torch knows"):
        vitmad.has_compiled_kernel("mad", "gpu")


def test_integers_of_any_kind_are_sizes_and_counts():
    """NumPy's and 0-d integer tensors' ints are taken as the ints they are, by every op."""
    for patch, prefix in ((np.int64(16), np.int32(1)), (torch.tensor(16), torch.tensor(1, dtype=torch.int32))):
        assert torch.equal(vitmad.mad(A197, patch, num_prefix_tokens=prefix), vitmad.mad(A197, 16))
        assert torch.equal(vitmad.mad_qk(_Q, _Q, patch, num_prefix_tokens=prefix), vitmad.mad_qk(_Q, _Q, 16))
        assert torch.equal(vitmad.attention_stats(A197, patch, num_prefix_tokens=prefix)["entropy"],
                           vitmad.attention_stats(A197, 16)["entropy"])


def test_grid_positions_takes_numpy_numbers():
    import numpy as np

    torch.testing.assert_close(vitmad.grid_positions(np.int64(4), np.int32(3), np.float32(16)),
                               vitmad.grid_positions(4, 3, 16.0), rtol=0, atol=0)


@pytest.mark.parametrize("grid", [(2.9, 2.1), (14.0, 14.0), (True, 1), "14x14", 14])
def test_a_grid_of_non_integers_is_refused_not_truncated(grid):
    """grid=(2.9, 2.1) once became [2, 2]: the Python entry points pass grid on as integers only."""
    q = torch.randn(2, 197, 8)
    calls = {
        "vitmad.mad": lambda: vitmad.mad(A197, 16, grid=grid),
        "vitmad.mad_qk": lambda: vitmad.mad_qk(q, q, 16, grid=grid),
        "vitmad.attention_stats": lambda: vitmad.attention_stats(A197, 16, grid=grid),
        "vitmad.attention_stats_qk": lambda: vitmad.attention_stats_qk(q, q, 16, grid=grid),
    }
    for name, call in calls.items():
        with pytest.raises(TypeError, match=f"{name}: grid must (hold|be \\[grid_h, grid_w\\]) integers"):
            call()


def test_integer_grids_of_any_integer_type_are_taken():
    import numpy as np

    expected = vitmad.mad(A197, 16, grid=[14, 14])
    for grid in ((np.int64(14), np.int32(14)), torch.tensor([14, 14]), [torch.tensor(14), 14]):
        torch.testing.assert_close(vitmad.mad(A197, 16, grid=grid), expected, rtol=0, atol=0)


@pytest.mark.parametrize("args, kwargs, error, message", [
    ((4, 4, -8), {}, ValueError, "patch must be a finite positive size in pixels, got -8.0"),
    ((4, 4, 0), {}, ValueError, "patch must be a finite positive size in pixels, got 0.0"),
    ((4, 4, float("nan")), {}, ValueError, "patch must be a finite positive size in pixels, got nan"),
    ((2.5, 4, 8), {}, TypeError, "grid_h must be an int, got 2.5"),
    ((-1, 4, 8), {}, ValueError, "grid_h and grid_w must be positive, got -1 x 4"),
    ((4, 4, (8, 4)), {}, TypeError, "patch must be a number (pixels per patch), got (8, 4)"),
    ((4, 4, 8, 3), {}, TypeError, "queries must index the 16 patch tokens (a slice, or a list or tensor of token "
                                  "indices), got 3"),
    ((4, 4, 8, "rows"), {}, TypeError, "queries must index the 16 patch tokens"),
    ((4, 4, 8), {"dtype": torch.int32}, TypeError, "dtype must be a floating torch.dtype, got torch.int32"),
])
def test_pixel_distances_refuses_what_would_give_a_wrong_matrix(args, kwargs, error, message):
    # Unchecked, a negative patch gave negative distances and 2.5 x 4 a 10 x 10 matrix (QA 280).
    with pytest.raises(error, match="vitmad.pixel_distances: " + re.escape(message)):
        vitmad.pixel_distances(*args, **kwargs)


def test_pixel_distances_takes_numpy_numbers_index_lists_and_a_patch_to_differentiate():
    import numpy as np

    torch.testing.assert_close(vitmad.pixel_distances(np.int64(3), np.int32(2), np.float32(8)),
                               vitmad.pixel_distances(3, 2, 8.0), rtol=0, atol=0)
    whole = vitmad.pixel_distances(3, 2, 8.0)
    for rows in ([0, 2], torch.tensor([0, 2]), slice(0, 3, 2)):
        assert torch.equal(vitmad.pixel_distances(3, 2, 8.0, rows), whole[[0, 2]])
    from fractions import Fraction

    assert torch.equal(vitmad.pixel_distances(3, 2, Fraction(8)), whole)  # any real: Fraction's * failed (QA 286)
    assert torch.equal(vitmad.grid_positions(3, 2, Fraction(17, 2)), vitmad.grid_positions(3, 2, 8.5))
    expected = vitmad.uniform_attention_mad(3, 2, (8, 4))
    assert vitmad.uniform_attention_mad(3, 2, (Fraction(8), np.float32(4))) == expected
    patch = torch.tensor(8.0, dtype=torch.float64, requires_grad=True)  # a learnt scale keeps its gradient
    vitmad.pixel_distances(3, 2, patch).sum().backward()
    assert patch.grad == whole.sum() / 8


def test_the_sizes_checks_take_a_size_torch_compile_reads_from_a_shape():
    # math.isfinite of a symbolic size failed under fullgraph compilation (QA 285).
    compiled = torch.compile(lambda x: vitmad.grid_positions(2, 3, x.shape[-1] / 4), fullgraph=True, dynamic=True,
                             backend="eager")
    torch.testing.assert_close(compiled(torch.zeros(40)), vitmad.grid_positions(2, 3, 10.0))


@pytest.mark.parametrize("renormalize", ["no", 1, None])
def test_mad_reference_refuses_a_renormalize_that_is_not_a_bool(renormalize):
    # "no" was taken for True (QA 280); vitmad.mad refuses it, and so does the reference, by its own name.
    with pytest.raises(TypeError, match=re.escape(f"vitmad.mad_reference: renormalize must be True or False, got "
                                                  f"{renormalize!r}")):
        vitmad.mad_reference(A197, 16, renormalize=renormalize)
    with pytest.raises(ValueError, match="vitmad.mad_reference: patch must be a positive patch size"):
        vitmad.mad_reference(A197, 0)


@pytest.mark.parametrize("call, error, message", [
    # QA 307: past int64 (or any float), torch's own overflow errors named no argument.
    (lambda: vitmad.uniform_attention_mad(2**70, 4, 1), ValueError,
     "vitmad.uniform_attention_mad: grid_h must fit in a 64-bit integer, got 1180591620717411303424"),
    (lambda: vitmad.pixel_distances(2**62 + 4, 4, 1), ValueError,
     "vitmad.pixel_distances: grid_h * grid_w must be below 2**58 (the positions of more patches exceed torch's "
     "largest storage), got 4611686018427387908 x 4"),
    (lambda: vitmad.grid_positions(2**62 + 4, 4, 1), ValueError,
     "vitmad.grid_positions: grid_h * grid_w must be below 2**58 (the positions of more patches exceed torch's "
     "largest storage), got 4611686018427387908 x 4"),
    (lambda: vitmad.grid_positions(2, 2, 1, num_prefix_tokens=2**70), ValueError,
     "vitmad.grid_positions: num_prefix_tokens + grid_h * grid_w must be below 2**58 (the positions of more tokens "
     "exceed torch's largest storage), got 1180591620717411303424 + 2 * 2"),
    (lambda: vitmad.uniform_attention_mad(4, 4, 10**400), ValueError,
     "vitmad.uniform_attention_mad: patch must be a finite positive size in pixels, got 1000"),
    # QA 308: torch's sizes stop below int64; Python writes no int of over 4,300 digits into a message.
    (lambda: vitmad.grid_positions(2**60, 1, 1), ValueError,  # its [N, 2] float64 positions overflow storage
     "vitmad.grid_positions: grid_h * grid_w must be below 2**58 (the positions of more patches exceed torch's "
     "largest storage), got 1152921504606846976 x 1"),
    (lambda: vitmad.grid_positions(2, 2, 1, num_prefix_tokens=2**58), ValueError,
     "vitmad.grid_positions: num_prefix_tokens + grid_h * grid_w must be below 2**58 (the positions of more tokens "
     "exceed torch's largest storage), got 288230376151711744 + 2 * 2"),
    (lambda: vitmad.mad_qk(torch.rand(1, 5, 4), torch.rand(1, 5, 4), 16, grid=(2, 2), scale=10**5000), ValueError,
     "vitmad.mad_qk: scale must be a finite number (the logits' factor), got an integer of 16610 bits"),
    (lambda: vitmad.pixel_distances(2, 10**5000, 16), ValueError,
     "vitmad.pixel_distances: grid_w must fit in a 64-bit integer, got an integer of 16610 bits"),
    (lambda: vitmad.mad(torch.rand(5, 5), 10**5000, grid=(2, 2)), ValueError,
     "vitmad.mad: patch must fit in a 64-bit integer, got an integer of 16610 bits"),
    # None where a tensor is taken reached the kernels ("tensor does not have a device").
    (lambda: vitmad.mad(None, 16), TypeError, "vitmad.mad: attn must be a torch.Tensor, got None"),
    (lambda: vitmad.mad(None, positions=torch.rand(4, 2)), TypeError,
     "vitmad.mad: attn must be a torch.Tensor, got None"),
    (lambda: vitmad.mad_qk(torch.rand(1, 5, 4), None, 16), TypeError,
     "vitmad.mad_qk: k must be a torch.Tensor, got None"),
    (lambda: vitmad.attention_stats(None, 16), TypeError,
     "vitmad.attention_stats: attn must be a torch.Tensor, got None"),
    (lambda: vitmad.ops.mad_qk_reference(torch.rand(1, 5, 4).tolist(), torch.rand(1, 5, 4), 16), TypeError,
     "vitmad.mad_qk_reference: q must be a torch.Tensor [..., N, D], got list"),
    (lambda: vitmad.ops.attention_stats_reference(np.ones((5, 5), np.float32), ["mad"], patch=16), TypeError,
     "vitmad.attention_stats: attn must be a torch.Tensor [..., N, N], got ndarray"),
    # key_times without key_positions is said so whatever it is (a list was asked to be a tensor first).
    (lambda: vitmad.attention_stats(torch.eye(3), positions=torch.rand(3, 2), times=torch.rand(3, 1),
                                    key_times=[[0.0]] * 3, stats="temporal_mad"), ValueError,
     "vitmad.attention_stats: key_times is given without key_positions"),
    # The reference names a list or an array as vitmad.mad does (it read .shape first).
    (lambda: vitmad.mad_reference([[1.0]], 16), TypeError,
     "vitmad.mad_reference: attn must be a torch.Tensor [..., N, N], got list"),
    (lambda: vitmad.mad_reference(np.ones((5, 5), np.float32), 16, grid=(2, 2)), TypeError,
     "vitmad.mad_reference: attn must be a torch.Tensor [..., N, N], got ndarray"),
    (lambda: vitmad.mad_reference(torch.eye(5).to_sparse(), 16, grid=(2, 2)), ValueError,
     "vitmad.mad_reference: attn must be a dense (strided) tensor, got layout torch.sparse_coo"),
    (lambda: vitmad.attention_stats(torch.eye(3), positions=torch.rand(3, 2), times=[[0.0]] * 3,
                                    stats="temporal_mad"), TypeError,
     "vitmad.attention_stats: times must be a tensor [..., Nq, 1], got list"),
])
def test_helpers_and_the_reference_name_what_no_int64_or_tensor_holds(call, error, message):
    with pytest.raises(error, match="^" + re.escape(message)):
        call()


def test_an_invalid_argument_under_fullgraph_compile_still_says_the_ops_message():
    # QA 310: the None check's str() of a schema type, which dynamo cannot trace, hid the op's own message.
    compiled = torch.compile(lambda a: vitmad.mad(a, 0), fullgraph=True, backend="eager")
    with pytest.raises(Exception, match="vitmad.mad: patch must be a positive patch size in pixels, got 0"):
        compiled(torch.rand(5, 5))
