"""Argument checking for ``vitmad::mad`` in Python, for the fake kernel, the pure-PyTorch fallback and the
reference. It mirrors ``csrc/mad_args.cpp`` message for message (``tests/ops/test_errors.py`` holds them
to it)."""

from __future__ import annotations

import contextlib
import functools
import math
import numbers
import operator
import re
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "without_autocast",
    "MadLayout",
    "MadQkLayout",
    "QkShape",
    "PositionLayout",
    "check_mad_args",
    "check_mad_options",
    "check_mad_qk_args",
    "check_qk_tensors",
    "check_attn_tensor",
    "not_dense_error",
    "check_one_form",
    "check_position_args",
    "check_position_values",
    "position_limit",
    "trust_position_values",
    "is_trusted_positions",
    "same_tokens",
    "trust_same_tokens",
    "is_trusted_same_tokens",
    "check_mad_grad",
    "check_stats",
    "STAT_NAMES",
    "TEMPORAL_MAD",
    "check_time_args",
    "mad_output_dtype",
    "SUPPORTED_DTYPES",
    "check_int_args",
    "check_renormalize",
    "grid_sides",
    "pixel_size",
    "index_int",
    "call_op",
    "scale_float",
    "schema_type_error",
]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class MadLayout:
    """Where the patch tokens are inside an ``[..., N, N]`` attention tensor."""

    num_tokens: int  # N
    num_prefix: int  # P: CLS, distillation and register tokens, without a position
    grid_h: int
    grid_w: int
    renormalize: bool
    reduce_mean: bool

    @property
    def num_patches(self) -> int:
        return self.num_tokens - self.num_prefix


def mad_output_dtype(attn_dtype: torch.dtype) -> torch.dtype:
    """float32 for 16- and 32-bit attention, float64 for float64 (``docs/definition.md``, "Output dtype")."""
    return torch.float64 if attn_dtype == torch.float64 else torch.float32


def _shape_str(shape: Sequence[int]) -> str:
    return "[" + ", ".join(int_text(int(s)) for s in shape) + "]"


def _broadcasts(shape: Sequence[int], target: Sequence[int]) -> bool:
    """Whether ``shape`` broadcasts to ``target`` without expanding it: right-aligned, each size 1 or equal,
    at most as many dims."""
    return len(shape) <= len(target) and all(
        size in (1, want) for size, want in zip(reversed(shape), reversed(target))
    )


def is_int(value) -> bool:
    """Whether ``value`` is a Python int and not a bool: ``True`` is an int to Python, but no size or count."""
    return isinstance(value, int) and not isinstance(value, bool)


# The dispatcher's answer to an argument of the wrong Python type: a RuntimeError that names the argument and both
# types. Catching it after the call (schema_type_error) costs nothing on a good call, where checking every
# argument's type before it would cost each call a few hundred nanoseconds.
_SCHEMA_TYPE_ERROR = re.compile(
    r"Expected a value of type '(?P<expected>[^']+)' for argument '(?P<arg>\w+)' but instead found type "
    r"'(?P<given>[^']+)'"
)
_SCHEMA_TYPE_WORDS = {
    "Tensor": "a torch.Tensor",
    "int": "an int",
    "bool": "True or False",
    "str": "a string",
    "float": "a float",
    "Optional[float]": "a float or None",
    "Optional[Tensor]": "a torch.Tensor or None",
    "List[int]": "a list of ints",
    "Optional[List[int]]": "a list of ints or None",
    "List[str]": "a list of names (strings)",
}


def schema_type_error(error: RuntimeError, op_name: str, values: dict | None = None) -> BaseException:
    """The ``TypeError`` for the dispatcher's ``RuntimeError`` about an argument of the wrong type, naming the
    argument, what was expected and what was given (its value too where ``values``, the call's arguments by name,
    hold it and it is no tensor: "got float 3.5", QA 266); any other error unchanged. Used as
    ``except RuntimeError as e: raise schema_type_error(e, op_name) from None`` around an op call (the kernels'
    own errors carry no cause or context to lose)."""
    found = _SCHEMA_TYPE_ERROR.search(str(error))
    if found is None:
        return error
    expected = _SCHEMA_TYPE_WORDS.get(found["expected"], found["expected"])
    given = found["given"]
    value = (values or {}).get(found["arg"], error)
    if value is not error and not isinstance(value, torch.Tensor):
        shown = repr(value)
        given = f"{given} {shown if len(shown) <= 80 else shown[:77] + '...'}"
    return TypeError(f"{op_name}: {found['arg']} must be {expected}, got {given}")


_FLOAT32_MAX = torch.finfo(torch.float32).max


def not_dense_error(op, op_name: str, args: tuple, kwargs: dict) -> ValueError | TypeError | None:
    """The ValueError for a sparse or nested tensor among an op call's arguments, naming it (the dispatcher finds
    no kernel of that backend, or the kernel cannot read its sizes), the TypeError for a quantized one (strided, but
    of the QuantizedCPU backend: the dispatcher's NotImplementedError named no argument, QA 341); None when there
    is none. Checked only once a call has failed, so that a good call pays nothing."""
    names = [argument.name for argument in op._schema.arguments]
    for name, value in [*zip(names, args), *kwargs.items()]:
        if isinstance(value, torch.Tensor) and value.is_quantized:
            return TypeError(f"{op_name}: {name} must be a floating-point tensor, got a quantized tensor "
                             f"({value.dtype}): pass {name}.dequantize()")
        refusal = _not_dense(value, name, op_name) if isinstance(value, torch.Tensor) else None
        if refusal is not None:
            return refusal
    return None


def none_for_a_tensor(op, op_name: str, values: dict) -> TypeError | None:
    """The TypeError for None given where the op takes a tensor: the dispatcher passes it on as an undefined tensor,
    and the kernel then fails with words that name nothing ("tensor does not have a device", QA 308)."""
    if torch.compiler.is_compiling():  # dynamo traces no str() of a schema type (QA 310); it refuses None itself
        return None
    for argument in op._schema.arguments:
        if str(argument.type) == "Tensor" and argument.name in values and values[argument.name] is None:
            return TypeError(f"{op_name}: {argument.name} must be a torch.Tensor, got None")
    return None


def not_a_tensor(op_name: str, name: str, value, shape_text: str) -> TypeError:
    """The TypeError for a value that is no tensor where one of ``shape_text`` is taken. None is named as
    :func:`none_for_a_tensor` names it, so that the Python fallback refuses it in the compiled ops' words."""
    if value is None:
        return TypeError(f"{op_name}: {name} must be a torch.Tensor, got None")
    return TypeError(f"{op_name}: {name} must be a torch.Tensor {shape_text}, got {type(value).__name__}")


def check_reduction(reduction, op_name: str) -> None:
    """A ``reduction`` other than the strings 'mean' and 'none': the TypeError the op's schema gives one not a string
    (the paths that call no op, the prefix maps alone, gave a ValueError quoting None as 'None'), else the
    ValueError naming the two."""
    if not isinstance(reduction, str):
        raise TypeError(f"{op_name}: reduction must be a string, got {type(reduction).__name__} {reduction!r}")
    if reduction not in ("mean", "none"):
        raise ValueError(f"{op_name}: reduction must be 'mean' or 'none', got '{reduction}'")


def call_op(op, op_name: str, *args, **kwargs):
    """``op(*args, **kwargs)``, with the dispatcher's RuntimeError about an argument of the wrong type raised as
    :func:`schema_type_error`'s TypeError, about a sparse or nested tensor as :func:`not_dense_error`'s, and about
    None for a tensor as :func:`none_for_a_tensor`'s."""
    try:
        return op(*args, **kwargs)
    except RuntimeError as error:  # NotImplementedError too: the dispatcher's, where no argument is a tensor
        values = {**dict(zip((a.name for a in op._schema.arguments), args)), **kwargs}
        raise (none_for_a_tensor(op, op_name, values) or not_dense_error(op, op_name, args, kwargs)
               or schema_type_error(error, op_name, values)) from None


def check_int_args(op_name: str, **values) -> None:
    """TypeError for a value the dispatcher would take as an int that is none: a bool (``True`` as 1, NumPy's and
    a bool tensor's too) or a floating tensor (``torch.tensor(16.5)`` as 16, rounded toward zero; QA 288); and
    check_int64's ValueError for an int beyond the ops' 64-bit ints."""
    for name, value in values.items():
        if is_bool(value):
            raise TypeError(f"{op_name}: {name} must be an int, got the bool {value}")
        if isinstance(value, torch.Tensor) and (value.is_floating_point() or value.is_complex()
                                                or value.dtype == torch.bool):
            raise TypeError(f"{op_name}: {name} must be an int, got a {value.dtype} tensor {value!r}")
        if value is not None and not isinstance(value, torch.Tensor) and index_int(value) is None \
                and (hasattr(value, "__int__") or hasattr(value, "__float__")):
            # A number that is no integer but converts to one: the dispatcher took NumPy's float32, a Fraction or a
            # Decimal through __int__, rounded toward zero (QA 360: patch=np.float32(14.5) measured at 14 px).
            raise TypeError(f"{op_name}: {name} must be an int, got {type(value).__name__} {value}")
        check_int64(op_name, name, value)


INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_SIZE = 2**58  # tokens: their [N, 2] float64 positions stay below torch's 2**63 bytes of storage


def check_int64(op_name: str, name: str, value) -> None:
    """ValueError for a Python int that the ops' ``int`` (int64) cannot hold: the dispatcher refuses it with the
    same words as a value of the wrong type ("expected int but got int"), which says nothing of the range."""
    if isinstance(value, int) and not INT64_MIN <= value <= INT64_MAX:
        raise ValueError(f"{op_name}: {name} must fit in a 64-bit integer, got {int_text(value)}")


def int_text(value: int) -> str:
    """``value`` in decimal, or its size where Python refuses to write it (over 4,300 digits, QA 308)."""
    return str(value) if value.bit_length() < 4096 else f"an integer of {value.bit_length()} bits"


def is_bool(value) -> bool:
    """True for Python's and NumPy's bools alone: a flag given 3 or "no" would read as true."""
    return value.__class__ is bool or (value.__class__.__name__ in ("bool_", "bool")
                                       and value.__class__.__module__ == "numpy")


def check_renormalize(value, op_name: str) -> None:
    """TypeError unless ``renormalize`` is True or False (NumPy's bool too): the dispatcher would take 3 or "no"
    for True."""
    if not is_bool(value):
        raise TypeError(f"{op_name}: renormalize must be True or False, got {value!r}")


def grid_sides(op_name: str, grid_h, grid_w) -> tuple[int, int]:
    """``grid_h`` and ``grid_w`` as positive ints (Python, NumPy or 0-d integer tensors; never a float or bool).

    Raises:
        TypeError: a side that is not an integer. ValueError: a side that is not positive.
    """
    sides = []
    for name, value in (("grid_h", grid_h), ("grid_w", grid_w)):
        side = index_int(value)
        if side is None:
            raise TypeError(f"{op_name}: {name} must be an int, got {value!r}")
        check_int64(op_name, name, side)
        sides.append(side)
    if sides[0] <= 0 or sides[1] <= 0:
        raise ValueError(f"{op_name}: grid_h and grid_w must be positive, got {sides[0]} x {sides[1]}")
    # Near torch's largest sizes its own errors name nothing ("cannot be represented as a SymInt", "Storage size
    # calculation overflowed"; QA 307, QA 308, QA 310): a grid whose positions alone could not be stored is refused by
    # name. Below that, a tensor too large fails as torch's allocation does (out of memory, or a distance matrix's
    # storage size overflowing).
    if sides[0] * sides[1] >= MAX_SIZE:
        raise ValueError(f"{op_name}: grid_h * grid_w must be below 2**58 (the positions of more patches exceed "
                         f"torch's largest storage), got {sides[0]} x {sides[1]}")
    return sides[0], sides[1]


def pixel_size(op_name: str, patch, name: str = "patch"):
    """``patch`` checked to be a finite, positive real number (Python, NumPy or a 0-d real tensor; not a bool), as
    the value to compute with: a tensor as it is (it keeps its autograd), a symbolic size (``torch.compile``'s, read
    from a shape) unchecked, another real (``fractions.Fraction``, NumPy's) as a float.

    Raises:
        TypeError: not a real number. ValueError: zero, negative, NaN or infinite (distances would be of that sign,
            or NaN, with no error).
    """
    if isinstance(patch, (torch.SymInt, torch.SymFloat)):
        return patch
    real = isinstance(patch, numbers.Real) or (isinstance(patch, torch.Tensor) and patch.dim() == 0
                                               and not patch.dtype.is_complex)
    if isinstance(patch, bool) or (isinstance(patch, torch.Tensor) and patch.dtype == torch.bool) or not real:
        raise TypeError(f"{op_name}: {name} must be a number (pixels per patch), got {patch!r}")
    try:
        value = float(patch.detach() if isinstance(patch, torch.Tensor) else patch)
    except OverflowError:  # an int past any float (QA 307)
        raise ValueError(f"{op_name}: {name} must be a finite positive size in pixels, got "
                         f"{int_text(patch) if isinstance(patch, int) else patch}") from None
    if not 0 < value < math.inf:  # NaN fails both; comparisons trace under torch.compile, math.isfinite does not
        raise ValueError(f"{op_name}: {name} must be a finite positive size in pixels, got {value}")
    return patch if isinstance(patch, (torch.Tensor, int, float)) else value


def scale_float(scale, op_name: str) -> float | None:
    """``scale`` as the op's ``float?``: a real number (Python, NumPy or a 0-d tensor), not a bool; None stays
    None. Its finiteness is checked by the op."""
    if scale is None:
        return None
    if isinstance(scale, (bool, str, bytes)):
        raise TypeError(f"{op_name}: scale must be a number (the logits' factor), got {scale!r}")
    try:
        return float(scale)
    except OverflowError:  # an int past any float (QA 310)
        raise ValueError(f"{op_name}: scale must be a finite number (the logits' factor), got "
                         f"{int_text(scale) if isinstance(scale, int) else scale}") from None
    except (TypeError, ValueError, RuntimeError):  # RuntimeError: a tensor of more than one value
        raise TypeError(f"{op_name}: scale must be a number (the logits' factor), got {type(scale).__name__}") \
            from None


def grid_ints(grid, op_name: str) -> list[int] | None:
    """``grid`` as the op's ``int[]``: each entry an integer (Python, NumPy or 0-d integer tensor), never a float
    rounded toward zero (``grid=(2.9, 2.1)`` is an error, not ``[2, 2]``); None stays None. Sizes are checked by
    the op."""
    if grid is None:
        return None
    if isinstance(grid, (str, bytes)) or not hasattr(grid, "__iter__"):
        raise TypeError(f"{op_name}: grid must be [grid_h, grid_w] integers, got {grid!r}")
    values = [index_int(g) for g in grid]
    if None in values:
        raise TypeError(f"{op_name}: grid must hold integers, got {list(grid)!r}")
    for value in values:
        check_int64(op_name, "grid", value)
    return values


def index_int(value) -> int | None:
    """``value`` as an int where it is an integer of any kind (Python, NumPy, a 0-d integer tensor), never a bool
    nor a float rounded toward zero; None otherwise."""
    if is_bool(value) or (isinstance(value, torch.Tensor) and value.dtype == torch.bool):  # tensor(True) is 1 too
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def check_mad_args(
    shape: Sequence[int],
    dtype: torch.dtype,
    patch: int,
    num_prefix_tokens: int,
    grid: Sequence[int] | None,
    renormalize: bool,
    reduction: str,
    op_name: str = "vitmad.mad",
) -> MadLayout:
    """Validate the arguments of ``mad`` for an attention tensor of ``shape`` and ``dtype``.

    Raises:
        TypeError: ``dtype`` is not float16, bfloat16, float32 or float64.
        ValueError: any other argument is out of range; the message names it, says what was expected and
            what was given.
    """
    if dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{op_name}: attn must be float16, bfloat16, float32 or float64, got {dtype}")
    if len(shape) < 2:
        raise ValueError(f"{op_name}: attn must have at least 2 dimensions [..., N, N], got shape {_shape_str(shape)}")
    n = shape[-1]
    if shape[-2] != n:
        raise ValueError(
            f"{op_name}: attn must be square in its last two dimensions [..., N, N] (queries x keys), "
            f"got shape {_shape_str(shape)}"
        )
    return check_mad_options(n, patch, num_prefix_tokens, grid, renormalize, reduction, op_name)


def check_mad_options(
    n: int,
    patch: int,
    num_prefix_tokens: int,
    grid: Sequence[int] | None,
    renormalize: bool,
    reduction: str,
    op_name: str,
    tokens_arg: str = "attn",
) -> MadLayout:
    """Validate patch, num_prefix_tokens, grid and reduction for ``n`` tokens held by ``tokens_arg``.

    Raises:
        ValueError: an argument is out of range; the message names it, says what was expected and what was
            given.
    """
    check_renormalize(renormalize, op_name)
    for name, value in (("patch", patch), ("num_prefix_tokens", num_prefix_tokens)):
        if not is_int(value) and not (isinstance(value, torch.SymInt)):
            raise TypeError(f"{op_name}: {name} must be an int, got {value!r}")
        check_int64(op_name, name, value)
    if patch <= 0:
        raise ValueError(f"{op_name}: patch must be a positive patch size in pixels, got {patch}")
    if not 0 <= num_prefix_tokens < n:
        raise ValueError(
            f"{op_name}: num_prefix_tokens must be in [0, N) with N = {n} tokens, got {num_prefix_tokens}"
        )
    check_reduction(reduction, op_name)
    num_patches = n - num_prefix_tokens
    if grid is not None:
        grid = list(grid)
        if len(grid) != 2:
            raise ValueError(
                f"{op_name}: grid must be [grid_h, grid_w] (2 values), got {len(grid)} values {_shape_str(grid)}"
            )
        if grid[0] <= 0 or grid[1] <= 0:
            raise ValueError(f"{op_name}: grid must hold positive sizes, got {_shape_str(grid)}")
        if grid[0] * grid[1] != num_patches:
            raise ValueError(
                f"{op_name}: grid {_shape_str(grid)} has {grid[0] * grid[1]} patches but {tokens_arg} has "
                f"N - num_prefix_tokens = {n} - {num_prefix_tokens} = {num_patches} patch tokens"
            )
        grid_h, grid_w = int(grid[0]), int(grid[1])
    else:
        side = math.isqrt(int(num_patches))
        if side * side != num_patches:
            raise ValueError(
                f"{op_name}: N - num_prefix_tokens = {n} - {num_prefix_tokens} = {num_patches} patch tokens "
                "do not form a square grid; pass grid=[grid_h, grid_w]"
            )
        grid_h = grid_w = side
    return MadLayout(int(n), int(num_prefix_tokens), grid_h, grid_w, bool(renormalize), reduction == "mean")


@dataclass(frozen=True)
class MadQkLayout:
    """The attention layout of ``mad_qk``'s logits, with the head dimension and the logits' scale."""

    mad: MadLayout
    head_dim: int  # D
    scale: float  # the given scale, or D ** -0.5


@dataclass(frozen=True)
class QkShape:
    """The shapes of ``mad_qk``'s queries and keys (mirrors ``QkShape`` in ``csrc/mad_args.h``)."""

    num_queries: int  # Nq
    num_keys: int  # Nk
    head_dim: int  # D
    scale: float  # the given scale, or D ** -0.5


def check_qk_tensors(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: float | None,
    attn_bias: torch.Tensor | None,
    same_tokens: bool,
    op_name: str = "vitmad.mad_qk",
) -> QkShape:
    """Validate q, k, scale and attn_bias of ``mad_qk`` (mirrors ``check_qk_tensors`` in ``csrc/mad_args.cpp``).

    Args:
        q, k: ``[..., Nq, D]`` and ``[..., Nk, D]``: the same dtype, leading dims, D and device.
        attn_bias: q's dtype (added to the logits) or bool (True keeps a key, as in
            ``F.scaled_dot_product_attention``), broadcastable to ``[..., Nq, Nk]``, on q's device; or None.
        same_tokens: the grid form, where ``Nq == Nk``.

    Raises:
        TypeError: a dtype is unsupported or differs from q's.
        ValueError: a shape, device or option is invalid; the message names the argument, says what was
            expected and what was given.
    """
    for name, t in (("q", q), ("k", k)):
        if not isinstance(t, torch.Tensor):
            raise not_a_tensor(op_name, name, t, "[..., N, D]")
        _check_dense(t, name, op_name)
    if q.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{op_name}: q must be float16, bfloat16, float32 or float64, got {q.dtype}")
    if k.dtype != q.dtype:
        raise TypeError(f"{op_name}: k must have q's dtype {q.dtype}, got {k.dtype}")
    if q.dim() < 2:
        raise ValueError(f"{op_name}: q must have at least 2 dimensions [..., N, D], got shape {_shape_str(q.shape)}")
    if k.dim() != q.dim() or k.shape[:-2] != q.shape[:-2]:
        raise ValueError(
            f"{op_name}: k must have q's leading dimensions, shape [..., N, D] = {_shape_str(q.shape[:-2])} + "
            f"[N, D], got k of shape {_shape_str(k.shape)} and q of shape {_shape_str(q.shape)}"
        )
    nq, nk, d = q.shape[-2], k.shape[-2], q.shape[-1]
    if d <= 0:
        raise ValueError(f"{op_name}: q must have a head dimension D > 0, got shape {_shape_str(q.shape)}")
    if k.shape[-1] != d:
        raise ValueError(f"{op_name}: k must have q's head dimension D = {d}, got shape {_shape_str(k.shape)}")
    if same_tokens and nk != nq:
        raise ValueError(f"{op_name}: k must have q's number of tokens N = {nq}, got shape {_shape_str(k.shape)}")
    if k.device != q.device:
        raise ValueError(f"{op_name}: k must be on q's device {q.device}, got {k.device}")
    if scale is not None and not math.isfinite(scale):
        raise ValueError(f"{op_name}: scale must be finite, got {scale}")
    if scale is not None and q.dtype != torch.float64 and abs(scale) > _FLOAT32_MAX:
        # The logits of 16-bit and float32 q are computed in float32, where such a scale is infinite.
        raise ValueError(f"{op_name}: scale must be finite in float32, the precision of the logits of {q.dtype} q "
                         f"(|scale| <= {_FLOAT32_MAX:.8g}), got {scale}")
    if attn_bias is not None:
        if not isinstance(attn_bias, torch.Tensor):
            raise TypeError(f"{op_name}: attn_bias must be a torch.Tensor or None, got {type(attn_bias).__name__}")
        _check_dense(attn_bias, "attn_bias", op_name)
        if attn_bias.dtype not in (q.dtype, torch.bool):
            raise TypeError(
                f"{op_name}: attn_bias must have q's dtype {q.dtype} (added to the logits) or be bool "
                f"(True keeps a key), got {attn_bias.dtype}"
            )
        if attn_bias.device != q.device:
            raise ValueError(f"{op_name}: attn_bias must be on q's device {q.device}, got {attn_bias.device}")
        target = (*q.shape[:-1], nk)
        if not _broadcasts(attn_bias.shape, target):
            raise ValueError(
                f"{op_name}: attn_bias must be broadcastable to the logits' shape "
                f"{'[..., N, N]' if same_tokens else '[..., Nq, Nk]'} = {_shape_str(target)}, got shape "
                f"{_shape_str(attn_bias.shape)}"
            )
    return QkShape(int(nq), int(nk), int(d), float(scale) if scale is not None else 1.0 / math.sqrt(d))


def check_mad_qk_args(
    q: torch.Tensor,
    k: torch.Tensor,
    patch: int,
    num_prefix_tokens: int,
    grid: Sequence[int] | None,
    scale: float | None,
    attn_bias: torch.Tensor | None,
    renormalize: bool,
    reduction: str,
    op_name: str = "vitmad.mad_qk",
) -> MadQkLayout:
    """Validate the arguments of the grid form of ``mad_qk`` (mirrors ``check_mad_qk_args`` in
    ``csrc/mad_args.cpp``): :func:`check_qk_tensors` with ``Nq == Nk``, then the grid options.

    Raises:
        TypeError, ValueError: as :func:`check_qk_tensors` and :func:`check_mad_options`.
    """
    shape = check_qk_tensors(q, k, scale, attn_bias, True, op_name)
    layout = check_mad_options(
        shape.num_queries, patch, num_prefix_tokens, grid, renormalize, reduction, op_name, tokens_arg="q"
    )
    return MadQkLayout(layout, shape.head_dim, shape.scale)


# The position form (docs/definition.md, "Positions form of the ops") -----------------------------------------

MAX_POSITION_DIMS = 3


@dataclass(frozen=True)
class PositionLayout:
    """The attention and positions of a position-form op (mirrors ``PositionLayout`` in
    ``csrc/position_args.h``)."""

    num_queries: int  # Nq: attention rows
    num_keys: int  # Nk: attention columns
    dims: int  # K: coordinates per position, 1 to 3
    renormalize: bool
    reduce_mean: bool


def check_one_form(op_name: str, positions, key_positions, grid_form: dict) -> None:
    """Exactly one of the two forms: positions (and key_positions), or the grid form's arguments."""
    if positions is None:
        if key_positions is not None:
            raise ValueError(f"{op_name}: key_positions needs positions, the positions of the queries")
        if grid_form["patch"] is None:
            raise TypeError(f"{op_name}: pass patch (pixels per patch, the grid form) or positions=[..., N, K]")
        return
    given = [name for name, value in grid_form.items() if value is not None]
    if given:
        raise ValueError(
            f"{op_name}: pass either positions (and key_positions) or the grid form's patch, num_prefix_tokens and "
            f"grid, not both; got positions and {', '.join(given)}"
        )


def _not_dense(value: torch.Tensor, arg: str, op_name: str) -> ValueError | None:
    """The ValueError for a nested or non-strided tensor ``value`` given as ``arg``; None for a dense one."""
    if value.is_nested or value.layout != torch.strided:
        kind = "a nested tensor" if value.is_nested else f"layout {value.layout}"
        return ValueError(f"{op_name}: {arg} must be a dense (strided) tensor, got {kind}")
    return None


def _check_dense(value: torch.Tensor, arg: str, op_name: str) -> None:
    """Raises :func:`_not_dense`'s error, before any check reads the sizes (QA 360: the prefix maps alone and the
    stored-attention temporal MAD, checked here without an op call, raised torch's 'NestedTensorImpl doesn't support
    sizes')."""
    refusal = _not_dense(value, arg, op_name)
    if refusal is not None:
        raise refusal


def check_attn_tensor(attn: torch.Tensor, shape_text: str, op_name: str) -> None:
    """The checks of ``attn`` itself shared by both forms (mirrors ``check_attn_tensor``)."""
    if not isinstance(attn, torch.Tensor):
        raise not_a_tensor(op_name, "attn", attn, shape_text)
    _check_dense(attn, "attn", op_name)
    if attn.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{op_name}: attn must be float16, bfloat16, float32 or float64, got {attn.dtype}")
    if attn.dim() < 2:
        raise ValueError(f"{op_name}: attn must have at least 2 dimensions {shape_text}, got shape "
                         f"{_shape_str(attn.shape)}")


def _check_position_side(pos, arg, lead, tokens, tokens_arg, n, what, n_name, op_name) -> None:
    if not isinstance(pos, torch.Tensor):
        raise TypeError(f"{op_name}: {arg} must be a tensor [..., {n_name}, K], got {type(pos).__name__}")
    _check_dense(pos, arg, op_name)
    if not pos.dtype.is_floating_point:
        raise TypeError(f"{op_name}: {arg} must be a floating-point tensor (NaN marks a token without a position), "
                        f"got {pos.dtype}")
    if pos.dim() < 2 or not 1 <= pos.shape[-1] <= MAX_POSITION_DIMS:
        raise ValueError(f"{op_name}: {arg} must be [..., {n_name}, K] with K in {{1, 2, 3}}, got shape "
                         f"{_shape_str(pos.shape)}")
    if pos.shape[-2] != n:
        raise ValueError(f"{op_name}: {arg} has {n_name} = {pos.shape[-2]} rows but {tokens_arg} has {n} {what} "
                         f"(shape {_shape_str(tokens.shape)})")
    if pos.device != tokens.device:
        raise ValueError(f"{op_name}: {arg} must be on {tokens_arg}'s device {tokens.device}, got {pos.device}")
    pos_lead = tuple(pos.shape[:-2])
    if not _broadcasts(pos_lead, lead):
        raise ValueError(f"{op_name}: {arg} leading dims {_shape_str(pos_lead)} do not broadcast against "
                         f"{tokens_arg}'s {_shape_str(lead)} (right-aligned, each 1 or equal, at most as many)")


def capturing_graph(tokens: torch.Tensor) -> bool:
    """Whether ``tokens`` lives on a GPU whose current stream is capturing a CUDA graph: the values of positions and
    frames are then not checked, since reading them on the host would end the capture (as the C++ checks do:
    ``can_check_position_values`` in csrc/cuda/cuda_common.cuh). Shapes, dtypes and devices are checked always."""
    return tokens.is_cuda and torch.cuda.is_current_stream_capturing()


# The attribute of positions whose values were checked where they were built: the version they had then.
_TRUSTED = "_vitmad_trusted_version"


def tensor_version(tensor: torch.Tensor) -> int:
    return -1 if tensor.is_inference() else tensor._version  # inference tensors have no version counter


def trust_position_values(positions: torch.Tensor) -> None:
    """Marks positions whose values were checked where they were built (``vitmad.record``'s own layouts, and
    their device copies: python/vitmad/recording/placement.py, ``read_only``): the ops skip their value check
    (here, and in C++ through ``vitmad::_trust_positions``), which on a GPU copies them to the host and so waits
    for all the work queued before it. An in-place change of the tensor (a new version) ends the trust."""
    setattr(positions, _TRUSTED, tensor_version(positions))
    compiled = _compiled_op("_trust_positions")
    if compiled is not None:
        compiled(positions)


def is_trusted_positions(positions: torch.Tensor) -> bool:
    """Whether :func:`trust_position_values` marked ``positions`` and it has not changed since."""
    version = getattr(positions, _TRUSTED, None)
    return version is not None and version == tensor_version(positions)


# The attribute of times whose tokens without a time were found to be those without a position in a positions
# tensor: (a weak reference to that tensor, the times' version, the positions' version).
_SAME_TOKENS = "_vitmad_same_tokens_as"


def same_tokens(times: torch.Tensor, positions: torch.Tensor) -> bool:
    """Whether ``times`` (``[..., N, 1]``) is NaN exactly at the tokens where ``positions`` (``[..., N, K]``) is, their
    leading dims broadcast against each other (equal there, they are equal under any broadcast an op makes). Reads
    both on the host: call it on host tensors."""
    try:
        no_time, no_position = torch.broadcast_tensors(times[..., 0].isnan(), positions[..., 0].isnan())
    except RuntimeError:
        return False
    return bool(torch.equal(no_time, no_position))


def trust_same_tokens(times: torch.Tensor, positions: torch.Tensor) -> None:
    """Marks a pair whose tokens without a time and without a position were compared where they were built
    (:func:`same_tokens` on the host originals of a video layout's device copies): the ops skip that comparison
    for this very pair (here, and in C++ through ``vitmad::_trust_same_tokens``), which on a GPU copies both to
    the host and so waits for all the work queued before it. An in-place change of either ends the trust."""
    setattr(times, _SAME_TOKENS, (weakref.ref(positions), tensor_version(times), tensor_version(positions)))
    compiled = _compiled_op("_trust_same_tokens")
    if compiled is not None:
        compiled(times, positions)


def is_trusted_same_tokens(times: torch.Tensor, positions: torch.Tensor) -> bool:
    """Whether :func:`trust_same_tokens` marked this pair and neither tensor has changed since."""
    mark = getattr(times, _SAME_TOKENS, None)
    return (mark is not None and mark[0]() is positions and mark[1] == tensor_version(times)
            and mark[2] == tensor_version(positions))


@functools.cache
def _compiled_op(name: str):
    """``torch.ops.vitmad.<name>`` (the trust registries' ops) where the compiled library defines it, else None."""
    try:
        return getattr(torch.ops.vitmad, name).default
    except (AttributeError, RuntimeError):
        return None


def position_limit(dtype: torch.dtype, coordinates: int) -> float:
    """The largest coordinate magnitude whose distances the ops can square and sum in ``dtype`` (the accumulation
    dtype) without overflow: two tokens at most ``2 * limit`` apart on each of ``coordinates`` axes. Beyond it the
    distance was inf, and the MAD with it, silently (QA 329); mirrors ``position_limit`` in csrc/position_args.cpp."""
    return math.sqrt(torch.finfo(dtype).max / max(coordinates, 1)) / 2


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def check_position_values(positions: torch.Tensor, arg: str, op_name: str) -> None:
    """Every row all NaN (a token without a position) or all finite (mirrors ``check_position_values``);
    nothing to do for positions :func:`trust_position_values` marked.

    Call it on the positions converted to the accumulation dtype: a float64 value beyond float32's range
    becomes infinite there, and the bound on the coordinates (:func:`position_limit`) is that dtype's.
    """
    if positions.numel() == 0 or is_trusted_positions(positions):
        return
    # (Half-precision positions, which vitmad.record checks on the host before their device copy, are accumulated
    # in float32 at least, as every op does: QA 335.)
    accumulated = positions.dtype if positions.dtype == torch.float64 else torch.float32
    limit = position_limit(accumulated, positions.shape[-1])
    if torch.compiler.is_compiling():
        # A check of the values cannot steer a traced graph (QA 288: the maps alone, whose positions no kernel
        # checks, failed to compile): an assert the compiler keeps raises when the graph runs, with the reason.
        rows = positions.detach().reshape(-1, positions.shape[-1])
        nan_count = rows.isnan().sum(-1)
        bad = (rows.isinf() | (rows.abs() > limit)).any(-1) | ((nan_count != 0) & (nan_count != rows.shape[-1]))
        torch._assert_async(~bad.any(), f"{op_name}: {arg} must have each row all finite, or all NaN for a token "
                                        f"without a position (and its coordinates within +-{limit:.2g})")
        return
    values = positions.detach().to("cpu", torch.float64)
    k, n = values.shape[-1], values.shape[-2]
    rows = values.reshape(-1, k)
    infinite = rows.isinf()
    too_far = rows.abs() > limit  # (inf included; NaN compares False)
    nan_count = rows.isnan().sum(-1)
    bad_far = too_far.any(-1)
    bad = bad_far | ((nan_count != 0) & (nan_count != k))
    if not bool(bad.any()):
        return
    first = int(bad.nonzero()[0, 0])
    where = ""
    if values.dim() > 2:
        index = list(torch.unravel_index(torch.tensor(first // n), tuple(values.shape[:-2])))
        where = f" of {arg}{_shape_str([int(i) for i in index])}"
    if bool(infinite[first].any()):
        value = float(rows[first][infinite[first]][0])
        beyond = "" if positions.dtype == torch.float64 else (
            f" (or a finite value beyond {_dtype_name(positions.dtype)}'s range, the accumulation dtype it is "
            "converted to)")
        raise ValueError(f"{op_name}: {arg} must not be infinite (NaN marks a token without a position), got "
                         f"{value} at row {first % n}{where}{beyond}")
    if bool(bad_far[first]):
        value = float(rows[first][too_far[first]][0])
        raise ValueError(
            f"{op_name}: {arg} must lie within +-{limit:.2g} (distances are squared in "
            f"{_dtype_name(accumulated)}, the accumulation dtype, which holds no larger square), got {value:g} "
            f"at row {first % n}{where}; measure in a larger unit"
            f"{'' if accumulated == torch.float64 else ', or give float64 attention'}")
    raise ValueError(f"{op_name}: {arg} row {first % n}{where} has {int(nan_count[first])} of its {k} coordinates "
                     "NaN; a token without a position has all of them NaN")


def check_position_args(
    tokens: torch.Tensor,
    num_queries: int,
    num_keys: int,
    positions: torch.Tensor,
    key_positions: torch.Tensor | None,
    renormalize: bool,
    reduction: str,
    op_name: str,
    *,
    check_values: bool = True,
) -> PositionLayout:
    """Validate ``positions [..., Nq, K]`` and ``key_positions [..., Nk, K]`` against ``tokens`` (attn or q),
    and the reduction (mirrors ``check_position_args`` in ``csrc/position_args.cpp``).

    Args:
        check_values: also check the values (NaN rows, infinities); False for fake tensors.

    Raises:
        TypeError: positions of a non-floating dtype.
        ValueError: anything else; the message names the argument, what was expected and what was given.
    """
    check_renormalize(renormalize, op_name)
    check_reduction(reduction, op_name)
    qk = op_name.endswith("_qk")  # vitmad.mad_qk, vitmad.attention_stats_qk: messages name q and k
    tokens_arg = "q" if qk else "attn"
    lead = tuple(tokens.shape[:-2])
    _check_position_side(positions, "positions", lead, tokens, tokens_arg, num_queries, "queries", "Nq", op_name)
    if key_positions is not None:
        _check_position_side(key_positions, "key_positions", lead, tokens, "k" if qk else "attn", num_keys, "keys",
                             "Nk", op_name)
        if key_positions.shape[-1] != positions.shape[-1]:
            raise ValueError(
                f"{op_name}: key_positions must have as many coordinates K per token as positions "
                f"(K = {positions.shape[-1]}), got shape {_shape_str(key_positions.shape)} and positions of shape "
                f"{_shape_str(positions.shape)}"
            )
    elif num_keys != num_queries:
        raise ValueError(
            f"{op_name}: {'the attention' if qk else 'attn'} is rectangular [..., {num_queries}, {num_keys}]"
            f"{' (q and k have different token counts)' if qk else ''}; pass key_positions [..., {num_keys}, K] "
            "for its keys"
        )
    if check_values and not capturing_graph(tokens):
        acc = mad_output_dtype(tokens.dtype)
        check_position_values(positions.to(acc), "positions", op_name)
        if key_positions is not None:
            check_position_values(key_positions.to(acc), "key_positions", op_name)
    return PositionLayout(int(num_queries), int(num_keys), int(positions.shape[-1]), bool(renormalize),
                          reduction == "mean")


def check_mad_grad(grad: torch.Tensor, attn: torch.Tensor, reduce_mean: bool, num_queries: int) -> None:
    """The gradient of ``mad``'s output, either form: its shape (``num_queries`` values per matrix for
    ``"none"``: ``N - P`` or ``Nq``), attn's device, a floating dtype (mirrors ``check_mad_grad``)."""
    expected = tuple(attn.shape[:-2]) + (() if reduce_mean else (num_queries,))
    if tuple(grad.shape) != expected:
        raise ValueError(f"vitmad.mad_backward: grad must have the shape of mad's output {_shape_str(expected)}, "
                         f"got {_shape_str(grad.shape)}")
    if grad.device != attn.device:
        raise ValueError(f"vitmad.mad_backward: grad must be on attn's device {attn.device}, got {grad.device}")
    if not grad.dtype.is_floating_point:
        raise TypeError(f"vitmad.mad_backward: grad must be a floating-point tensor, got {grad.dtype}")


# The statistics of the stats ops, in the order of csrc/stats_args.h: those of any attention, and the temporal
# MAD of a video's tokens, which needs their frames (``times``).
STAT_NAMES = ("mad", "entropy", "prefix_mass", "self_mass")
TEMPORAL_MAD = "temporal_mad"
_ALL_STATS = (*STAT_NAMES, TEMPORAL_MAD)
_ALL_STATS_TEXT = ", ".join(f"'{n}'" for n in _ALL_STATS)


def check_stats(stats: Sequence[str], num_queries: int, num_keys: int, op_name: str, *,
                has_times: bool = False) -> tuple[str, ...]:
    """The ``stats`` argument of the statistics ops (mirrors ``check_stats`` in ``csrc/stats_args.cpp``): at least
    one name of :data:`STAT_NAMES` or ``"temporal_mad"``, each at most once; ``"self_mass"`` needs ``Nq == Nk``;
    ``"temporal_mad"`` needs ``times`` (``has_times``), and ``times`` needs ``"temporal_mad"``.

    Raises:
        TypeError: ``stats`` is a single string, not a sequence of names.
        ValueError: an unknown, missing or repeated name, ``"self_mass"`` on rectangular attention, or
            ``"temporal_mad"`` and ``times`` without each other.
    """
    names = tuple(stats)
    if isinstance(stats, str) or len(names) > 1 and all(isinstance(n, str) and len(n) == 1 for n in names):
        # (The dispatcher hands a raw op's str[] one string as its letters: QA 360.)
        raise TypeError(f"{op_name}: stats must be a sequence of names such as ('mad', 'entropy'), got the string "
                        f"'{''.join(names)}'")
    if not names:
        raise ValueError(f"{op_name}: stats must name at least one of {_ALL_STATS_TEXT}, got none")
    seen = set()
    for name in names:
        if name not in _ALL_STATS:
            raise ValueError(f"{op_name}: stats must be among {_ALL_STATS_TEXT}, got '{name}'")
        if name in seen:
            raise ValueError(f"{op_name}: stats names '{name}' twice")
        seen.add(name)
    if "self_mass" in seen and num_queries != num_keys:
        raise ValueError(f"{op_name}: the statistic 'self_mass' needs the queries and the keys to be the same tokens "
                         f"(Nq == Nk), got Nq = {num_queries} queries and Nk = {num_keys} keys")
    check_times_named(names, has_times, op_name)
    return names


def check_times_named(names: Sequence[str], has_times: bool, op_name: str) -> None:
    """``"temporal_mad"`` among ``names`` exactly when ``times`` is given (``has_times``)."""
    if TEMPORAL_MAD in names and not has_times:
        raise ValueError(f"{op_name}: the statistic 'temporal_mad' needs times, the frame of each token "
                         "([..., Nq, 1]), given beside positions (the position form: not with patch / grid)")
    if has_times and TEMPORAL_MAD not in names:
        raise ValueError(f"{op_name}: times is read only by the statistic 'temporal_mad', which stats does not name; "
                         "add it or leave times out")


def check_no_times(times: torch.Tensor | None, key_times: torch.Tensor | None, op_name: str) -> None:
    """The grid form takes no frames: ``times`` and ``key_times`` come with ``positions`` only."""
    if times is not None or key_times is not None:
        raise ValueError(f"{op_name}: times (the frames of a video's tokens) come with the position form: pass "
                         "positions as well, not patch / grid")


def check_key_times_need_times(times: torch.Tensor | None, key_times: torch.Tensor | None, op_name: str) -> None:
    """``key_times`` (the keys' frames) only beside ``times`` (the queries')."""
    if times is None and key_times is not None:
        raise ValueError(f"{op_name}: key_times is given without times; pass times [..., Nq, 1] for the queries' "
                         "frames")


def check_stats_and_times(stats: Sequence[str], tokens: torch.Tensor, layout: PositionLayout,
                          positions: torch.Tensor, key_positions: torch.Tensor | None, times: torch.Tensor | None,
                          key_times: torch.Tensor | None, op_name: str, *,
                          check_values: bool = True) -> tuple[str, ...]:
    """``stats`` of the position form with the frames that may come with it, checked in the order of the C++
    ``stats_qk_pos`` (key_times without times, the names, then the frames; their values only with
    ``check_values``): the names."""
    check_key_times_need_times(times, key_times, op_name)
    names = check_stats(stats, layout.num_queries, layout.num_keys, op_name, has_times=times is not None)
    if times is not None:
        check_time_args(tokens, layout, positions, key_positions, times, key_times, op_name,
                        check_values=check_values)
    return names


def check_time_args(tokens: torch.Tensor, layout: PositionLayout, positions: torch.Tensor,
                    key_positions: torch.Tensor | None, times: torch.Tensor, key_times: torch.Tensor | None,
                    op_name: str, *, check_values: bool = True) -> None:
    """The frames of a video's tokens, ``times [..., Nq, 1]`` and ``key_times [..., Nk, 1]`` (given exactly when
    ``key_positions`` is), beside positions already checked (mirrors ``check_time_args`` in
    ``csrc/position_args.cpp``): a token has a time exactly when it has a position.

    Raises:
        TypeError: times of a non-floating dtype.
        ValueError: anything else, naming the argument.
    """
    qk = op_name.endswith("_qk")
    lead = tuple(tokens.shape[:-2])
    # The frame's column first: the positions' own message ("K in {1, 2, 3}") would ask times [N] for K = 2 (QA 301).
    if not isinstance(times, torch.Tensor):
        raise TypeError(f"{op_name}: times must be a tensor [..., Nq, 1], got {type(times).__name__}")
    _check_dense(times, "times", op_name)
    if times.dim() < 2 or times.shape[-1] != 1:
        raise ValueError(f"{op_name}: times must be [..., Nq, 1], the frame of each token, got shape "
                         f"{_shape_str(times.shape)}")
    _check_position_side(times, "times", lead, tokens, "q" if qk else "attn", layout.num_queries, "queries", "Nq",
                         op_name)
    if (key_times is None) != (key_positions is None):
        raise ValueError(
            f"{op_name}: key_positions is given, so the keys' frames are needed too: pass key_times [..., Nk, 1]"
            if key_positions is not None else
            f"{op_name}: key_times is given without key_positions; the keys are the queries, whose times are times")
    if key_times is not None:
        if not isinstance(key_times, torch.Tensor):
            raise TypeError(f"{op_name}: key_times must be a tensor [..., Nk, 1], got {type(key_times).__name__}")
        _check_dense(key_times, "key_times", op_name)
        if key_times.dim() < 2 or key_times.shape[-1] != 1:
            raise ValueError(f"{op_name}: key_times must be [..., Nk, 1], the frame of each key, got shape "
                             f"{_shape_str(key_times.shape)}")
        _check_position_side(key_times, "key_times", lead, tokens, "k" if qk else "attn", layout.num_keys, "keys",
                             "Nk", op_name)
    if not check_values or capturing_graph(tokens):
        return
    acc = mad_output_dtype(tokens.dtype)
    check_position_values(times.to(acc), "times", op_name)
    if key_times is not None:
        check_position_values(key_times.to(acc), "key_times", op_name)
    sides = [("times", times, "positions", positions)]
    if key_times is not None:
        sides.append(("key_times", key_times, "key_positions", key_positions))
    for times_arg, side_times, pos_arg, pos in sides:
        if is_trusted_same_tokens(side_times, pos):
            continue
        shape = (*lead, pos.shape[-2])
        if torch.compiler.is_compiling():  # as in check_position_values: checked when the graph runs
            differs = side_times[..., 0].isnan().expand(shape) != pos[..., 0].isnan().expand(shape)
            torch._assert_async(~differs.any(), f"{op_name}: {times_arg} must be NaN exactly at the tokens without "
                                                f"a position in {pos_arg}")
            continue
        no_time = side_times[..., 0].isnan().cpu().expand(shape).reshape(-1)
        no_position = pos[..., 0].isnan().cpu().expand(shape).reshape(-1)
        differ = (no_time != no_position).nonzero().flatten()
        if differ.numel():
            row, n = int(differ[0]), pos.shape[-2]
            has = "a time and no position" if bool(no_position[row]) else "a position and no time (NaN)"
            raise ValueError(f"{op_name}: {times_arg} must be NaN exactly at the tokens without a position in "
                             f"{pos_arg}, but token {row % n} of matrix {row // n} has {has}")


@contextlib.contextmanager
def without_autocast() -> Iterator[None]:
    """The caller's autocast off (CPU and CUDA) for vitmad's own products: they run in the accumulation dtype the
    ops' contract states (float32, float64 for float64 input), not in bfloat16 or float16. Under a user's CPU
    bfloat16 autocast the pure-PyTorch kernels and the prefix maps were 1e-3 relative off (found by QA)."""
    # Two plain with-statements, not an ExitStack: dynamo traces these, and an ExitStack failed
    # torch.compile(fullgraph=True) of the prefix maps under a user's autocast (QA 329).
    cpu, cuda = torch.is_autocast_enabled("cpu"), torch.is_autocast_enabled("cuda")
    with torch.autocast("cpu", enabled=False) if cpu else contextlib.nullcontext(), \
            torch.autocast("cuda", enabled=False) if cuda else contextlib.nullcontext():
        yield
