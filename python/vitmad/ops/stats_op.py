"""Typed Python entry points of the statistics ops (``vitmad::stats``, ``stats_pos``, ``stats_qk``,
``stats_qk_pos``), their fake (shape) kernels and the autograd kernels that refuse gradients; and the maps of
the tokens without a position (CLS, registers) over the positioned tokens, which need no kernel.

The statistics (``docs/definition.md``, "Beside the distance"), per query with a position:

- ``"mad"``: the mean attention distance, as :func:`vitmad.mad` / :func:`vitmad.mad_qk` give it;
- ``"entropy"``: ``-sum_s A[t, s] ln A[t, s]`` over every key, in nats;
- ``"prefix_mass"``: the attention on the keys without a position (CLS, registers: the "attention sink");
- ``"self_mass"``: the attention on the query's own token;
- ``"temporal_mad"`` (video, position form, with ``times``): the MAD with the distance between the tokens'
  frames, ``|time_t - time_s|``, beside the spatial MAD of ``positions`` (one pass from ``q``/``k``);

and, on request, ``"prefix_maps"``: the attention rows of the tokens without a position over the tokens with
one, ``[..., P, N - P]`` (the DINO-style CLS and register maps).
"""

from __future__ import annotations

import math
import numbers
import weakref
from collections.abc import Sequence

import torch

from . import library  # noqa: F401  (defines torch.ops.vitmad before anything is registered on it)
from .arguments import (
    STAT_NAMES,
    TEMPORAL_MAD,
    call_op,
    check_attn_tensor,
    check_int_args,
    check_key_times_need_times,
    check_mad_args,
    check_mad_qk_args,
    check_no_times,
    check_one_form,
    check_position_args,
    check_qk_tensors,
    check_renormalize,
    check_stats,
    check_stats_and_times,
    check_times_named,
    grid_ints,
    index_int,
    is_trusted_positions,
    mad_output_dtype,
    scale_float,
    tensor_version,
    without_autocast,
)
from .mad_op import mad
from .reference import biased_logits

__all__ = ["attention_stats", "attention_stats_qk", "DEFAULT_STATS", "MAP_NAME", "STAT_NAMES"]

DEFAULT_STATS = ("mad", "entropy", "prefix_mass", "self_mass")
# Not a per-query value but rows of attention: computed beside the kernel's pass, only when asked for.
MAP_NAME = "prefix_maps"

_OP = "vitmad.attention_stats"
_OP_QK = "vitmad.attention_stats_qk"


def _split(stats: Sequence[str] | str, op_name: str) -> tuple[tuple[str, ...], bool, tuple[str, ...]]:
    """The per-query statistics the kernels compute, whether the prefix maps are asked for, and every name asked
    for in order (the order of the returned dict)."""
    if isinstance(stats, str):  # one name or a comma list of names (not record's "all": the ops have defaults)
        stats = tuple(name for name in (part.strip() for part in stats.split(",")) if name)
    if not isinstance(stats, Sequence) or not all(isinstance(name, str) for name in stats):
        raise TypeError(f"{op_name}: stats must be a sequence of names such as ('mad', 'entropy'), got {stats!r}")
    names = tuple(stats)
    maps = MAP_NAME in names
    if names.count(MAP_NAME) > 1:
        raise ValueError(f"{op_name}: stats names '{MAP_NAME}' twice")
    rest = tuple(n for n in names if n != MAP_NAME)
    known = ", ".join(repr(n) for n in (*STAT_NAMES, TEMPORAL_MAD, MAP_NAME))
    if not rest and not maps:
        raise ValueError(f"{op_name}: stats must name at least one of {known}, got none")
    unknown = next((n for n in rest if n not in (*STAT_NAMES, TEMPORAL_MAD)), None)
    if unknown is not None:  # named here, where the maps are a valid name too (check_stats knows the kernels')
        raise ValueError(f"{op_name}: stats must be among {known}, got '{unknown}'")
    return rest, maps, names


def _by_name(names: Sequence[str], values: torch.Tensor) -> dict[str, torch.Tensor]:
    """The kernels' stacked statistics ``[S, ...]`` by name. The entropy of a one-hot row, ``-(1 ln 1)``, comes out
    of the kernels as -0.0: plus 0.0 makes it the 0 the definition says (and a CSV shows)."""
    out = dict(zip(names, values.unbind(0)))
    if "entropy" in out:
        out["entropy"] = out["entropy"] + 0.0
    return out


def _check_times(names, times, key_times, positions, op_name: str) -> None:
    """What can be said of ``times`` before the op runs: the position form only, with ``"temporal_mad"``."""
    if times is None and key_times is None:
        return
    if positions is None:
        check_no_times(times, key_times, op_name)
    check_key_times_need_times(times, key_times, op_name)
    check_times_named(names, True, op_name)


def common_tokens(has: torch.Tensor) -> torch.Tensor | None:
    """The token indices where ``has`` (``[..., N]``) is True when those are the same in every matrix, else None."""
    flat = has.flatten(0, -2) if has.dim() > 1 else has.unsqueeze(0)  # [M, N], also for N = 0 or M = 0
    if flat.shape[0] > 1 and not bool((flat == flat[:1]).all()):
        return None
    return flat[0].nonzero().flatten() if flat.shape[0] else has.new_zeros(0, dtype=torch.long)


def _same_everywhere(has: torch.Tensor, arg: str, op_name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The token indices where ``has`` (``[..., N]``) is True, which must be the same in every matrix, and None;
    while torch.compile traces, the first matrix's indices and ``[...]`` bool, the matrices whose tokens differ."""
    flat = has.flatten(0, -2) if has.dim() > 1 else has.unsqueeze(0)
    if torch.compiler.is_compiling() and flat.shape[0] > 1:
        # A Python bool of the values cannot be traced (inductor: "could not guard on data-dependent expression",
        # QA); an assertion in the graph would be a device-side assert on CUDA, which leaves the process unusable
        # for input that is valid per matrix: the maps of the matrices whose tokens differ from the first's are
        # NaN instead (masked by the caller). (Invalid position values do get an assert: check_position_values.)
        return flat[0].nonzero().flatten(), (flat != flat[:1]).any(-1).reshape(has.shape[:-1])
    tokens = common_tokens(has)
    if tokens is None:
        raise ValueError(f"{op_name}: prefix maps need the same tokens without a position in every matrix, but "
                         f"{arg} marks different tokens in different matrices; ask for them per image")
    return tokens, None


def _masked_maps(maps: torch.Tensor, differ: list) -> torch.Tensor:
    """``maps`` ``[..., P, T]`` with NaN in the matrices ``differ`` flags (each ``[...]`` bool, broadcast to the
    maps' leading dims, or None)."""
    for flags in differ:
        if flags is not None:
            maps = maps.masked_fill(flags[..., None, None], float("nan"))
    return maps


# The attribute of trusted positions that keeps what the maps derive from them (token indices), with the versions
# and the partner they were derived for.
_DERIVED = "_vitmad_map_tokens"


def derived_once(positions: torch.Tensor, key_positions: torch.Tensor | None, what: str, compute):
    """``compute()``, kept with ``positions`` when it and ``key_positions`` are trusted (vitmad's own layouts and
    their device copies: ``trust_position_values``), so that the layers sharing them derive it once: on a GPU,
    finding which tokens have a position reads the positions on the host, a wait for all the work queued before
    it. Anything else is derived at every call; an in-place change of either tensor, or another partner,
    derives it anew."""
    if not is_trusted_positions(positions) or (key_positions is not None and not is_trusted_positions(key_positions)):
        return compute()
    versions = (tensor_version(positions), None if key_positions is None else tensor_version(key_positions))
    store = getattr(positions, _DERIVED, None)
    if store is None:
        store = {}
        setattr(positions, _DERIVED, store)
    kept = store.get(what)
    if kept is not None:
        partner, kept_versions, value = kept
        if kept_versions == versions and (partner() if partner is not None else None) is key_positions:
            return value
    value = compute()
    store[what] = (None if key_positions is None else weakref.ref(key_positions), versions, value)
    return value


def _map_tokens(positions, key_positions, op_name):
    """(query rows without a position, key columns with one) for the position form."""

    def compute():
        keys = positions if key_positions is None else key_positions
        rows, rows_differ = _same_everywhere(positions[..., 0].isnan(), "positions", op_name)
        cols, cols_differ = _same_everywhere(~keys[..., 0].isnan(),
                                             "key_positions" if key_positions is not None else "positions", op_name)
        return rows, cols, [rows_differ, cols_differ]

    return derived_once(positions, key_positions, "map_tokens", compute)


def attention_stats(
    attn: torch.Tensor,
    patch: int | None = None,
    *,
    stats: Sequence[str] | str = DEFAULT_STATS,
    num_prefix_tokens: int | None = None,
    grid: Sequence[int] | None = None,
    positions: torch.Tensor | None = None,
    key_positions: torch.Tensor | None = None,
    renormalize: bool = False,
    reduction: str = "mean",
    times: torch.Tensor | None = None,
    key_times: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """MAD and the statistics researchers put beside it, from attention probabilities, in one read.

    The grid and position forms and every argument but ``stats``, ``times`` and ``key_times`` are those of
    :func:`vitmad.mad`; the fused kernels read ``attn`` once, in place, for all the statistics asked for (the
    temporal MAD takes a second read: a distance call over the frames).

    Args:
        attn: ``[..., N, N]`` (grid form) or ``[..., Nq, Nk]`` (position form) attention probabilities.
        stats: any of ``"mad"``, ``"entropy"`` (of each query's row over every key, in nats), ``"prefix_mass"``
            (the attention on the keys without a position: CLS, registers), ``"self_mass"`` (on the query's own
            token; needs ``Nq == Nk``), ``"temporal_mad"`` (video: MAD with the distance between the tokens'
            frames; needs ``times``), each at most once; and ``"prefix_maps"``: the rows of the tokens without
            a position over the keys with one. A string is one name or a comma list (``"mad,entropy"``).
        times: position form, video: ``[..., Nq, 1]`` the frame of each query token (any unit: frames, seconds),
            NaN exactly where ``positions`` is NaN, broadcast like ``positions``; only with ``"temporal_mad"``.
        key_times: ``[..., Nk, 1]`` the keys' frames, given exactly when ``key_positions`` is.
        renormalize: applies to ``"mad"`` and ``"temporal_mad"`` only (the other statistics are of the whole row).
        reduction: ``"mean"`` averages each statistic over the queries with a position; ``"none"`` keeps one
            value per query (NaN at queries without a position in the position form).

    Returns:
        ``{name: tensor}`` in the order of ``stats``: each statistic shaped as :func:`vitmad.mad`'s output
        (float32, float64 for float64 input); ``"prefix_maps"`` ``[..., P, N - P]`` (grid form) or
        ``[..., Nq0, Nk1]`` with the ``Nq0`` queries without a position (in token order) over the ``Nk1`` keys
        with one; those tokens must be the same in every matrix.

    Raises:
        TypeError, ValueError: as :func:`vitmad.mad`, and for an unknown or repeated statistic.
        RuntimeError: ``attn`` requires grad while grad mode is on (the statistics are measurements).
    """
    names, maps, stats = _split(stats, _OP)
    check_renormalize(renormalize, _OP)
    check_one_form(_OP, positions, key_positions,
                   {"patch": patch, "num_prefix_tokens": num_prefix_tokens, "grid": grid})
    _check_times(names, times, key_times, positions, _OP)
    temporal = TEMPORAL_MAD in names
    out: dict[str, torch.Tensor] = {}
    if positions is None:
        prefix = 1 if num_prefix_tokens is None else num_prefix_tokens
        grid_list = grid_ints(grid, _OP)
        check_int_args(_OP, patch=patch, num_prefix_tokens=prefix)
        if names:
            values = call_op(torch.ops.vitmad.stats.default, _OP, attn, patch, list(names), num_prefix_tokens=prefix,
                             grid=grid_list, renormalize=renormalize, reduction=reduction)
            out.update(_by_name(names, values))
        else:
            # The maps alone take the integers the op takes (QA 329: torch.tensor(16), NumPy's were refused).
            patch, prefix = _as_int(patch), _as_int(prefix)
            check_attn_tensor(attn, "[..., N, N]", _OP)
            check_mad_args(attn.shape, attn.dtype, patch, prefix, grid_list, renormalize, reduction, _OP)
        rows, cols, differ = slice(0, prefix), slice(prefix, None), []
    else:
        kernel_names = [n for n in names if n != TEMPORAL_MAD]
        if temporal or not kernel_names:
            check_attn_tensor(attn, "[..., Nq, Nk]", _OP)
            # The positions' values are scanned once: by the stats_pos op below when it runs, here otherwise.
            layout = check_position_args(attn, attn.shape[-2], attn.shape[-1], positions, key_positions,
                                         renormalize, reduction, _OP, check_values=not kernel_names)
        if temporal:
            check_stats_and_times(names, attn, layout, positions, key_positions, times, key_times, _OP)
        if kernel_names:
            values = call_op(torch.ops.vitmad.stats_pos.default, _OP, attn, positions, key_positions, kernel_names,
                             renormalize=renormalize, reduction=reduction)
            out.update(_by_name(kernel_names, values))
        if temporal:  # the frames as one-coordinate positions: a second read of attn
            _refuse_grad(_OP, {"attn": attn, "times": times, "key_times": key_times})
            with torch.no_grad():
                out[TEMPORAL_MAD] = mad(attn.detach(), positions=times, key_positions=key_times,
                                        renormalize=renormalize, reduction=reduction)
        if maps:
            rows, cols, differ = _map_tokens(positions, key_positions, _OP)
    if maps:
        # As the kernels do, for every tensor they would have taken: the maps are measurements too.
        _refuse_grad(_OP, {"attn": attn, "positions": positions, "key_positions": key_positions})
        out = _in_order(stats, out, _masked_maps(attn.detach()[..., rows, :][..., cols].to(
            mad_output_dtype(attn.dtype), copy=True), differ))
    elif temporal:
        out = {name: out[name] for name in names}
    return out


def attention_stats_qk(
    q: torch.Tensor,
    k: torch.Tensor,
    patch: int | None = None,
    *,
    stats: Sequence[str] | str = DEFAULT_STATS,
    num_prefix_tokens: int | None = None,
    grid: Sequence[int] | None = None,
    positions: torch.Tensor | None = None,
    key_positions: torch.Tensor | None = None,
    scale: float | None = None,
    attn_bias: torch.Tensor | None = None,
    renormalize: bool = False,
    reduction: str = "mean",
    times: torch.Tensor | None = None,
    key_times: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """:func:`attention_stats` of ``softmax(q @ k^T * scale + attn_bias)`` without the attention: every
    statistic in one online-softmax pass over the keys (the arguments of :func:`vitmad.mad_qk`), the temporal
    MAD of a video's tokens (``times``) included.

    ``"prefix_maps"`` computes only the rows of the queries without a position (``P x N`` logits), in the
    accumulation dtype. A query whose keys are all masked gets NaN for every statistic, as softmax gives.

    Returns:
        As :func:`attention_stats`.
    """
    names, maps, stats = _split(stats, _OP_QK)
    check_renormalize(renormalize, _OP_QK)
    check_one_form(_OP_QK, positions, key_positions,
                   {"patch": patch, "num_prefix_tokens": num_prefix_tokens, "grid": grid})
    _check_times(names, times, key_times, positions, _OP_QK)
    options = {"scale": scale_float(scale, _OP_QK), "attn_bias": attn_bias, "renormalize": renormalize,
               "reduction": reduction}
    out: dict[str, torch.Tensor] = {}
    if positions is None:
        prefix = 1 if num_prefix_tokens is None else num_prefix_tokens
        grid_list = grid_ints(grid, _OP_QK)
        check_int_args(_OP_QK, patch=patch, num_prefix_tokens=prefix)
        if names:
            values = call_op(torch.ops.vitmad.stats_qk.default, _OP_QK, q, k, patch, list(names),
                             num_prefix_tokens=prefix, grid=grid_list, **options)
            out.update(_by_name(names, values))
        if not names:  # else the op checked its arguments
            patch, prefix = _as_int(patch), _as_int(prefix)  # as above
            check_mad_qk_args(q, k, patch, prefix, grid_list, scale, attn_bias, renormalize, reduction, _OP_QK)
        if maps:
            # The op's scale: given, or D ** -0.5 (not from the checks, which torch.compile cannot trace with
            # symbolic sizes).
            scale_value = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
            rows, cols, differ = torch.arange(prefix, device=q.device), slice(prefix, None), []
    else:
        if names:
            if times is not None:
                options.update(times=times, key_times=key_times)
            values = call_op(torch.ops.vitmad.stats_qk_pos.default, _OP_QK, q, k, positions, key_positions,
                             list(names), **options)
            out.update(_by_name(names, values))
        if maps or not names:
            shape = check_qk_tensors(q, k, scale, attn_bias, False, _OP_QK)
            check_position_args(q, shape.num_queries, shape.num_keys, positions, key_positions, renormalize,
                                reduction, _OP_QK, check_values=not names)
            scale_value = shape.scale
        if maps:
            rows, cols, differ = _map_tokens(positions, key_positions, _OP_QK)
    if maps:
        _refuse_grad(_OP_QK, {"q": q, "k": k, "attn_bias": attn_bias, "positions": positions,
                              "key_positions": key_positions})
        acc = mad_output_dtype(q.dtype)
        with torch.no_grad(), without_autocast():
            rows_q = q[..., rows, :].to(acc) * scale_value
            if torch.compiler.is_compiling():
                # The map rows' count is data-dependent (the tokens without a position), and inductor's matmul
                # lowering cannot decide whether it is 1 ("could not guard on data-dependent expression"): a
                # multiply and a sum, which it fuses into one reduction, give the same logits.
                logits = (rows_q.unsqueeze(-2) * k.to(acc).unsqueeze(-3)).sum(-1)
            else:
                logits = rows_q @ k.to(acc).transpose(-1, -2)
            bias = None
            if attn_bias is not None:
                bias = attn_bias.expand(*q.shape[:-1], k.shape[-2])[..., rows, :]
            out = _in_order(stats, out, _masked_maps(biased_logits(logits, bias).softmax(-1)[..., cols], differ))
    return out


def _as_int(value):
    """An integer the op's dispatcher takes as an int (a NumPy integer, a 0-d integer tensor) as a Python int;
    anything else as it is, for the checks to name (a SymInt under torch.compile is left unspecialised)."""
    if isinstance(value, (torch.Tensor, numbers.Integral)) and not isinstance(value, (int, torch.SymInt)):
        converted = index_int(value)
        return value if converted is None else converted
    return value


def _in_order(stats: Sequence[str], out: dict, maps: torch.Tensor) -> dict[str, torch.Tensor]:
    out[MAP_NAME] = maps
    return {name: out[name] for name in stats}


# Fake kernels ----------------------------------------------------------------------------------------------------


def _stacked(tokens: torch.Tensor, names, reduce_mean: bool, num_queries: int) -> torch.Tensor:
    shape = tokens.shape[:-2] if reduce_mean else (*tokens.shape[:-2], num_queries)
    return tokens.new_empty((len(names), *shape), dtype=mad_output_dtype(tokens.dtype))


@torch.library.register_fake("vitmad::stats")
def _stats_fake(attn, patch, stats, *, num_prefix_tokens=1, grid=None, renormalize=False, reduction="mean"):
    layout = check_mad_args(attn.shape, attn.dtype, patch, num_prefix_tokens, grid, renormalize, reduction, _OP)
    names = check_stats(stats, attn.shape[-1], attn.shape[-1], _OP)
    return _stacked(attn, names, layout.reduce_mean, layout.num_patches)


@torch.library.register_fake("vitmad::stats_pos")
def _stats_pos_fake(attn, positions, key_positions, stats, *, renormalize=False, reduction="mean"):
    check_attn_tensor(attn, "[..., Nq, Nk]", _OP)
    layout = check_position_args(attn, attn.shape[-2], attn.shape[-1], positions, key_positions, renormalize,
                                 reduction, _OP, check_values=False)
    names = check_stats(stats, attn.shape[-2], attn.shape[-1], _OP)
    return _stacked(attn, names, layout.reduce_mean, layout.num_queries)


@torch.library.register_fake("vitmad::stats_qk")
def _stats_qk_fake(q, k, patch, stats, *, num_prefix_tokens=1, grid=None, scale=None, attn_bias=None,
                   renormalize=False, reduction="mean"):
    qk = check_mad_qk_args(q, k, patch, num_prefix_tokens, grid, scale, attn_bias, renormalize, reduction, _OP_QK)
    names = check_stats(stats, qk.mad.num_tokens, qk.mad.num_tokens, _OP_QK)
    return _stacked(q, names, qk.mad.reduce_mean, qk.mad.num_patches)


@torch.library.register_fake("vitmad::stats_qk_pos")
def _stats_qk_pos_fake(q, k, positions, key_positions, stats, *, scale=None, attn_bias=None, renormalize=False,
                       reduction="mean", times=None, key_times=None):
    shape = check_qk_tensors(q, k, scale, attn_bias, False, _OP_QK)
    layout = check_position_args(q, shape.num_queries, shape.num_keys, positions, key_positions, renormalize,
                                 reduction, _OP_QK, check_values=False)
    names = check_stats_and_times(stats, q, layout, positions, key_positions, times, key_times, _OP_QK,
                                  check_values=False)
    return _stacked(q, names, layout.reduce_mean, layout.num_queries)


# Autograd kernels: the statistics are measurements, not differentiable ---------------------------------------------


def _refuse_grad(op_name: str, tensors: dict) -> None:
    if torch.is_grad_enabled():
        for name, t in tensors.items():
            if t is not None and t.requires_grad:
                raise RuntimeError(
                    f"{op_name} is not differentiable, but {name} requires grad; call it under torch.no_grad() or "
                    f"pass detached tensors (vitmad.mad is differentiable with respect to attn)"
                )


def _below_autograd(op, op_name: str, arg_names: tuple[str, ...]):
    def kernel(*args, **options):
        tensors = {name: value for name, value in zip(arg_names, args)}
        # The keyword tensors too: a frame tensor that requires grad is refused like a position tensor.
        tensors.update({name: options.get(name) for name in ("attn_bias", "times", "key_times")})
        _refuse_grad(op_name, tensors)
        with torch._C._AutoDispatchBelowAutograd():
            return op(*args, **options)

    return kernel


_autograd_lib = torch.library.Library("vitmad", "IMPL")
_autograd_lib.impl("stats", _below_autograd(torch.ops.vitmad.stats.default, _OP, ("attn",)), "Autograd")
_autograd_lib.impl("stats_pos", _below_autograd(torch.ops.vitmad.stats_pos.default, _OP,
                                                ("attn", "positions", "key_positions")), "Autograd")
_autograd_lib.impl("stats_qk", _below_autograd(torch.ops.vitmad.stats_qk.default, _OP_QK, ("q", "k")), "Autograd")
_autograd_lib.impl("stats_qk_pos", _below_autograd(torch.ops.vitmad.stats_qk_pos.default, _OP_QK,
                                                   ("q", "k", "positions", "key_positions")), "Autograd")
