"""Pure-PyTorch kernels of the vitmad ops, used where the compiled library is missing or lacks a device.

They follow the compiled kernels' contract (float32 accumulation, float64 for float64 input) and never hold
more than a bounded slice of the distance matrix: queries are processed in chunks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .arguments import (
    TEMPORAL_MAD,
    check_attn_tensor,
    check_mad_args,
    check_mad_grad,
    check_mad_qk_args,
    check_position_args,
    check_qk_tensors,
    check_stats,
    check_stats_and_times,
    mad_output_dtype,
    without_autocast,
)
from .reference import biased_logits, pixel_distances

__all__ = ["SCHEMAS", "mad", "mad_backward", "mad_qk", "mad_pos", "mad_pos_backward", "mad_qk_pos", "stats",
           "stats_pos", "stats_qk", "stats_qk_pos"]

# The schemas of csrc/vitmad.cpp, used to define the ops when the compiled library is absent
# (tests/ops/test_fallback.py checks that both say the same).
SCHEMAS = {
    "mad": "mad(Tensor attn, int patch, *, int num_prefix_tokens=1, int[]? grid=None, bool renormalize=False, "
    'str reduction="mean") -> Tensor',
    "mad_backward": "mad_backward(Tensor grad, Tensor attn, int patch, *, int num_prefix_tokens=1, "
    'int[]? grid=None, bool renormalize=False, str reduction="mean") -> Tensor',
    "mad_qk": "mad_qk(Tensor q, Tensor k, int patch, *, int num_prefix_tokens=1, int[]? grid=None, "
    'float? scale=None, Tensor? attn_bias=None, bool renormalize=False, str reduction="mean") -> Tensor',
    "mad_pos": "mad_pos(Tensor attn, Tensor positions, Tensor? key_positions=None, *, bool renormalize=False, "
    'str reduction="mean") -> Tensor',
    "mad_pos_backward": "mad_pos_backward(Tensor grad, Tensor attn, Tensor positions, Tensor? key_positions=None, "
    '*, bool renormalize=False, str reduction="mean") -> Tensor',
    "mad_qk_pos": "mad_qk_pos(Tensor q, Tensor k, Tensor positions, Tensor? key_positions=None, *, "
    'float? scale=None, Tensor? attn_bias=None, bool renormalize=False, str reduction="mean") -> Tensor',
    "stats": "stats(Tensor attn, int patch, str[] stats, *, int num_prefix_tokens=1, int[]? grid=None, "
    'bool renormalize=False, str reduction="mean") -> Tensor',
    "stats_pos": "stats_pos(Tensor attn, Tensor positions, Tensor? key_positions, str[] stats, *, "
    'bool renormalize=False, str reduction="mean") -> Tensor',
    "stats_qk": "stats_qk(Tensor q, Tensor k, int patch, str[] stats, *, int num_prefix_tokens=1, "
    'int[]? grid=None, float? scale=None, Tensor? attn_bias=None, bool renormalize=False, str reduction="mean") '
    "-> Tensor",
    "stats_qk_pos": "stats_qk_pos(Tensor q, Tensor k, Tensor positions, Tensor? key_positions, str[] stats, *, "
    'float? scale=None, Tensor? attn_bias=None, bool renormalize=False, str reduction="mean", '
    "Tensor? times=None, Tensor? key_times=None) -> Tensor",
}

# At most about this many distance values or logits (4 MiB in float32) exist at once.
_DISTANCE_CHUNK_ELEMENTS = 1 << 20


def _query_chunks(num_patches: int, row_elements: int | None = None):
    """Slices of the query patches holding at most about _DISTANCE_CHUNK_ELEMENTS values of row_elements each."""
    rows = max(1, _DISTANCE_CHUNK_ELEMENTS // max(1, row_elements or num_patches))
    for start in range(0, num_patches, rows):
        yield slice(start, min(start + rows, num_patches))


@without_autocast()
def mad(
    attn: torch.Tensor,
    patch: int,
    *,
    num_prefix_tokens: int = 1,
    grid: Sequence[int] | None = None,
    renormalize: bool = False,
    reduction: str = "mean",
) -> torch.Tensor:
    check_attn_tensor(attn, "[..., N, N]", "vitmad.mad")  # None read as attn.shape was an AttributeError (QA 329)
    layout = check_mad_args(attn.shape, attn.dtype, patch, num_prefix_tokens, grid, renormalize, reduction)
    acc = mad_output_dtype(attn.dtype)
    p = layout.num_prefix
    patches = attn[..., p:, p:]
    per_query = torch.empty(patches.shape[:-1], dtype=acc, device=attn.device)
    for rows in _query_chunks(layout.num_patches):
        dist = pixel_distances(layout.grid_h, layout.grid_w, patch, rows, dtype=acc, device=attn.device)
        a = patches[..., rows, :].to(acc)
        weighted = torch.einsum("...ts,ts->...t", a, dist)
        per_query[..., rows] = weighted / a.sum(-1) if renormalize else weighted
    if layout.reduce_mean:
        return (per_query.sum(-1, dtype=torch.float64) / layout.num_patches).to(acc)
    return per_query


@without_autocast()
def mad_backward(
    grad: torch.Tensor,
    attn: torch.Tensor,
    patch: int,
    *,
    num_prefix_tokens: int = 1,
    grid: Sequence[int] | None = None,
    renormalize: bool = False,
    reduction: str = "mean",
) -> torch.Tensor:
    layout = check_mad_args(
        attn.shape, attn.dtype, patch, num_prefix_tokens, grid, renormalize, reduction, "vitmad.mad_backward"
    )
    check_mad_grad(grad, attn, layout.reduce_mean, layout.num_patches)
    acc = mad_output_dtype(attn.dtype)
    g = grad.to(acc)
    per_query = (g / layout.num_patches).unsqueeze(-1) if layout.reduce_mean else g
    p = layout.num_prefix
    grad_attn = torch.zeros(attn.shape, dtype=attn.dtype, device=attn.device)
    patches = attn[..., p:, p:]
    for rows in _query_chunks(layout.num_patches):
        dist = pixel_distances(layout.grid_h, layout.grid_w, patch, rows, dtype=acc, device=attn.device)
        g_rows = per_query[..., rows].unsqueeze(-1) if not layout.reduce_mean else per_query.unsqueeze(-1)
        if renormalize:
            a = patches[..., rows, :].to(acc)
            mass = a.sum(-1, keepdim=True)
            mean = torch.einsum("...ts,ts->...t", a, dist).unsqueeze(-1) / mass
            block = g_rows / mass * (dist - mean)
        else:
            block = g_rows * dist
        grad_attn[..., p + rows.start : p + rows.stop, p:] = block.to(attn.dtype)
    return grad_attn


@without_autocast()
def mad_qk(
    q: torch.Tensor,
    k: torch.Tensor,
    patch: int,
    *,
    num_prefix_tokens: int = 1,
    grid: Sequence[int] | None = None,
    scale: float | None = None,
    attn_bias: torch.Tensor | None = None,
    renormalize: bool = False,
    reduction: str = "mean",
) -> torch.Tensor:
    qk = check_mad_qk_args(q, k, patch, num_prefix_tokens, grid, scale, attn_bias, renormalize, reduction)
    layout = qk.mad
    acc = mad_output_dtype(q.dtype)
    p, n = layout.num_prefix, layout.num_tokens
    keys_t = k.to(acc).transpose(-1, -2)
    # A broadcast view of the bias: slicing it never copies more than the chunk's rows.
    bias = None if attn_bias is None else attn_bias.expand(*q.shape[:-1], n)
    per_query = torch.empty((*q.shape[:-2], layout.num_patches), dtype=acc, device=q.device)
    # Each chunk holds [..., rows, N] logits for every matrix at once, so the bound counts all matrices.
    for rows in _query_chunks(layout.num_patches, math.prod(q.shape[:-2]) * n):
        tokens = slice(p + rows.start, p + rows.stop)
        logits = (q[..., tokens, :].to(acc) * qk.scale) @ keys_t
        logits = biased_logits(logits, None if bias is None else bias[..., tokens, :])
        # Renormalised, the softmax runs over the patch keys alone (the same value, without the patch mass
        # underflowing when a query attends almost only to prefix tokens).
        if renormalize:
            logits = _mask_keys(logits, torch.arange(n, device=q.device) < p)
        attn = logits.softmax(-1)[..., p:]
        dist = pixel_distances(layout.grid_h, layout.grid_w, patch, rows, dtype=acc, device=q.device)
        per_query[..., rows] = torch.einsum("...ts,ts->...t", attn, dist)
    if layout.reduce_mean:
        return (per_query.sum(-1, dtype=torch.float64) / layout.num_patches).to(acc)
    return per_query


def _mask_keys(logits: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
    """``logits`` with the keys where ``drop`` is True set to -inf, except NaN and +inf logits: softmax over every
    key gives NaN there, and so must the renormalised softmax that leaves those keys out."""
    return logits.masked_fill(drop & (logits < math.inf), -math.inf)


# The position form ------------------------------------------------------------------------------------------


class _Sides:
    """Query and key positions in the accumulation dtype, with which tokens have one."""

    def __init__(self, positions: torch.Tensor, key_positions: torch.Tensor | None, acc: torch.dtype):
        self.queries = positions.to(acc)
        self.keys = self.queries if key_positions is None else key_positions.to(acc)
        self.has_query = ~self.queries[..., 0].isnan()  # [...pos lead, Nq]
        self.has_key = ~self.keys[..., 0].isnan()  # [...key lead, Nk]

    def distances(self, rows: slice) -> torch.Tensor:
        """``[..., rows, Nk]``, 0 at keys without a position (so that they add nothing)."""
        diff = self.queries[..., rows, None, :] - self.keys[..., None, :, :]
        return torch.where(self.has_key[..., None, :], diff.square().sum(-1).sqrt(), 0)

    def key_weights(self, a: torch.Tensor) -> torch.Tensor:
        """``a`` with the columns of keys without a position set to 0 (never read, as in the kernels)."""
        return torch.where(self.has_key[..., None, :], a, 0)

    def reduce(self, per_query: torch.Tensor, reduce_mean: bool) -> torch.Tensor:
        """NaN at queries without a position; or their mean over the queries with one (NaN if none)."""
        per_query = torch.where(self.has_query, per_query, float("nan"))
        if not reduce_mean:
            return per_query
        total = torch.where(self.has_query, per_query, 0).sum(-1, dtype=torch.float64)
        return (total / self.has_query.sum(-1)).to(per_query.dtype)


@without_autocast()
def mad_pos(
    attn: torch.Tensor,
    positions: torch.Tensor,
    key_positions: torch.Tensor | None = None,
    *,
    renormalize: bool = False,
    reduction: str = "mean",
) -> torch.Tensor:
    check_attn_tensor(attn, "[..., Nq, Nk]", "vitmad.mad")
    nq, nk = attn.shape[-2], attn.shape[-1]
    layout = check_position_args(attn, nq, nk, positions, key_positions, renormalize, reduction, "vitmad.mad")
    acc = mad_output_dtype(attn.dtype)
    sides = _Sides(positions, key_positions, acc)
    per_query = torch.empty((*attn.shape[:-2], nq), dtype=acc, device=attn.device)
    # Each chunk converts [..., rows, Nk] of every matrix at once, so the bound counts all matrices.
    for rows in _query_chunks(nq, math.prod(attn.shape[:-2]) * nk):
        a = sides.key_weights(attn[..., rows, :].to(acc))
        weighted = (a * sides.distances(rows)).sum(-1)
        per_query[..., rows] = weighted / a.sum(-1) if renormalize else weighted
    return sides.reduce(per_query, layout.reduce_mean)


@without_autocast()
def mad_pos_backward(
    grad: torch.Tensor,
    attn: torch.Tensor,
    positions: torch.Tensor,
    key_positions: torch.Tensor | None = None,
    *,
    renormalize: bool = False,
    reduction: str = "mean",
) -> torch.Tensor:
    check_attn_tensor(attn, "[..., Nq, Nk]", "vitmad.mad_backward")
    nq, nk = attn.shape[-2], attn.shape[-1]
    layout = check_position_args(attn, nq, nk, positions, key_positions, renormalize, reduction,
                                 "vitmad.mad_backward")
    check_mad_grad(grad, attn, layout.reduce_mean, layout.num_queries)
    acc = mad_output_dtype(attn.dtype)
    sides = _Sides(positions, key_positions, acc)
    g = grad.to(acc)
    per_query = (g / sides.has_query.sum(-1)).unsqueeze(-1) if layout.reduce_mean else g
    per_query = torch.where(sides.has_query, per_query, 0)  # [..., Nq]
    grad_attn = torch.empty(attn.shape, dtype=attn.dtype, device=attn.device)
    for rows in _query_chunks(nq, math.prod(attn.shape[:-2]) * nk):
        dist = sides.distances(rows)
        g_rows = per_query[..., rows].unsqueeze(-1)
        if renormalize:
            a = sides.key_weights(attn[..., rows, :].to(acc))
            mass = a.sum(-1, keepdim=True)
            mean = (a * dist).sum(-1, keepdim=True) / mass
            block = g_rows / mass * (dist - mean)
        else:
            block = g_rows * dist
        # Zero (not NaN) wherever the query or the key has no position.
        keep = sides.has_query[..., rows, None] & sides.has_key[..., None, :]
        grad_attn[..., rows, :] = torch.where(keep, block, 0).to(attn.dtype)
    return grad_attn


@without_autocast()
def mad_qk_pos(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    key_positions: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    attn_bias: torch.Tensor | None = None,
    renormalize: bool = False,
    reduction: str = "mean",
) -> torch.Tensor:
    shape = check_qk_tensors(q, k, scale, attn_bias, False, "vitmad.mad_qk")
    nq, nk = shape.num_queries, shape.num_keys
    layout = check_position_args(q, nq, nk, positions, key_positions, renormalize, reduction, "vitmad.mad_qk")
    acc = mad_output_dtype(q.dtype)
    sides = _Sides(positions, key_positions, acc)
    keys_t = k.to(acc).transpose(-1, -2)
    bias = None if attn_bias is None else attn_bias.expand(*q.shape[:-1], nk)
    per_query = torch.empty((*q.shape[:-2], nq), dtype=acc, device=q.device)
    for rows in _query_chunks(nq, math.prod(q.shape[:-2]) * nk):
        logits = (q[..., rows, :].to(acc) * shape.scale) @ keys_t
        logits = biased_logits(logits, None if bias is None else bias[..., rows, :])
        if renormalize:
            # The softmax over the keys with a position: the renormalised value, without their mass
            # underflowing when a query attends almost only to tokens without a position.
            a = _mask_keys(logits, ~sides.has_key[..., None, :]).softmax(-1)
        else:
            probabilities = logits.softmax(-1)
            a = sides.key_weights(probabilities)
        summed = (a * sides.distances(rows)).sum(-1)
        if not renormalize:
            # A NaN row (a NaN or +inf logit, every key masked) gives NaN, as in the kernels, also where no key has a
            # position and key_weights left nothing of it to sum (QA 314: 0).
            summed = torch.where(probabilities.isnan().any(-1), float("nan"), summed)
        per_query[..., rows] = summed
    if nk == 0:  # softmax over no key: NaN, as over keys that are all masked
        per_query.fill_(float("nan"))
    return sides.reduce(per_query, layout.reduce_mean)


# The statistics ops ---------------------------------------------------------------------------------------------
# MAD comes from the distance kernels above (a second read of the attention or logits: these kernels trade speed
# for plainness); the other statistics from chunks of query rows in the accumulation dtype.


def _other_statistics(names, a: torch.Tensor, has_key: torch.Tensor, first_token: int, *,
                      from_logits: bool = False) -> dict:
    """Entropy, prefix mass and self mass of the attention rows ``a`` ``[..., rows, Nk]`` whose first row is
    token ``first_token``; ``has_key`` ``[..., Nk]`` says which keys have a position; ``from_logits``: ``a`` is
    the softmax of logits (the qk ops)."""
    out = {}
    if "entropy" in names:
        out["entropy"] = -torch.special.xlogy(a, a).sum(-1)
    if "prefix_mass" in names:
        mass = torch.where(has_key[..., None, :], 0, a).sum(-1)
        if from_logits:
            # A softmax row without a distribution (its keys all masked, a NaN logit: NaN everywhere) has no mass
            # anywhere, as the kernels say, even where no key lacks a position (a sum over none would give 0).
            # Stored attention keeps the definition's sum over those keys alone.
            mass = torch.where(a.isnan().any(-1), float("nan"), mass)
        out["prefix_mass"] = mass
    if "self_mass" in names:
        rows = torch.arange(a.shape[-2], device=a.device)
        out["self_mass"] = a[..., rows, rows + first_token]
    return out


def _reduce_stats(names, mad_value, per_query: dict, has_query: torch.Tensor, reduce_mean: bool) -> torch.Tensor:
    """``[S, ...]``: MAD (already reduced) and the other statistics, NaN at queries without a position or
    averaged over the queries with one."""
    rows = []
    for name in names:
        if name == "mad":
            rows.append(mad_value)
            continue
        value = torch.where(has_query, per_query[name], float("nan"))
        if reduce_mean:
            total = torch.where(has_query, value, 0).sum(-1, dtype=torch.float64)
            value = (total / has_query.sum(-1)).to(value.dtype)
        rows.append(value)
    return torch.stack(rows)


def _collect(names, num_queries: int, chunk_rows, row_stats) -> dict:
    """Per-query statistics ``[..., num_queries]`` gathered from ``row_stats(rows)`` over query chunks."""
    parts = {name: [] for name in names if name not in ("mad", TEMPORAL_MAD)}
    if not parts:
        return {}
    # Without a query, one empty chunk: each statistic [..., 0] (and its mean NaN), as the compiled kernels give.
    for rows in list(_query_chunks(num_queries, chunk_rows)) or [slice(0, 0)]:
        for name, value in row_stats(rows).items():
            parts[name].append(value)
    return {name: torch.cat(values, -1) for name, values in parts.items()}


@without_autocast()
def stats(
    attn: torch.Tensor,
    patch: int,
    stats: Sequence[str],
    *,
    num_prefix_tokens: int = 1,
    grid: Sequence[int] | None = None,
    renormalize: bool = False,
    reduction: str = "mean",
) -> torch.Tensor:
    op = "vitmad.attention_stats"
    check_attn_tensor(attn, "[..., N, N]", op)  # as in mad
    layout = check_mad_args(attn.shape, attn.dtype, patch, num_prefix_tokens, grid, renormalize, reduction, op)
    names = check_stats(stats, attn.shape[-1], attn.shape[-1], op)
    acc = mad_output_dtype(attn.dtype)
    p, n = layout.num_prefix, layout.num_tokens
    has_key = torch.arange(n, device=attn.device) >= p
    per_query = _collect(
        names, layout.num_patches, math.prod(attn.shape[:-2]) * n,
        lambda rows: _other_statistics(names, attn[..., p + rows.start : p + rows.stop, :].to(acc), has_key,
                                       p + rows.start))
    mad_value = mad(attn, patch, num_prefix_tokens=num_prefix_tokens, grid=grid, renormalize=renormalize,
                    reduction=reduction) if "mad" in names else None
    has_query = torch.ones(layout.num_patches, dtype=torch.bool, device=attn.device)
    return _reduce_stats(names, mad_value, per_query, has_query, layout.reduce_mean)


@without_autocast()
def stats_pos(
    attn: torch.Tensor,
    positions: torch.Tensor,
    key_positions: torch.Tensor | None,
    stats: Sequence[str],
    *,
    renormalize: bool = False,
    reduction: str = "mean",
) -> torch.Tensor:
    op = "vitmad.attention_stats"
    check_attn_tensor(attn, "[..., Nq, Nk]", op)
    nq, nk = attn.shape[-2], attn.shape[-1]
    layout = check_position_args(attn, nq, nk, positions, key_positions, renormalize, reduction, op)
    names = check_stats(stats, nq, nk, op)
    acc = mad_output_dtype(attn.dtype)
    sides = _Sides(positions, key_positions, acc)
    per_query = _collect(
        names, nq, math.prod(attn.shape[:-2]) * nk,
        lambda rows: _other_statistics(names, attn[..., rows, :].to(acc), sides.has_key, rows.start))
    mad_value = mad_pos(attn, positions, key_positions, renormalize=renormalize,
                        reduction=reduction) if "mad" in names else None
    return _reduce_stats(names, mad_value, per_query, sides.has_query, layout.reduce_mean)


def _softmax_rows(q, keys_t, scale, bias, rows: slice) -> torch.Tensor:
    """``softmax(q[..., rows, :] @ k^T * scale + bias[..., rows, :])`` over every key, in the accumulation dtype."""
    logits = (q[..., rows, :].to(keys_t.dtype) * scale) @ keys_t
    return biased_logits(logits, None if bias is None else bias[..., rows, :]).softmax(-1)


@without_autocast()
def stats_qk(
    q: torch.Tensor,
    k: torch.Tensor,
    patch: int,
    stats: Sequence[str],
    *,
    num_prefix_tokens: int = 1,
    grid: Sequence[int] | None = None,
    scale: float | None = None,
    attn_bias: torch.Tensor | None = None,
    renormalize: bool = False,
    reduction: str = "mean",
) -> torch.Tensor:
    op = "vitmad.attention_stats_qk"
    qk = check_mad_qk_args(q, k, patch, num_prefix_tokens, grid, scale, attn_bias, renormalize, reduction, op)
    layout = qk.mad
    names = check_stats(stats, layout.num_tokens, layout.num_tokens, op)
    acc = mad_output_dtype(q.dtype)
    p, n = layout.num_prefix, layout.num_tokens
    keys_t = k.to(acc).transpose(-1, -2)
    bias = None if attn_bias is None else attn_bias.expand(*q.shape[:-1], n)
    has_key = torch.arange(n, device=q.device) >= p
    per_query = _collect(
        names, layout.num_patches, math.prod(q.shape[:-2]) * n,
        lambda rows: _other_statistics(
            names, _softmax_rows(q, keys_t, qk.scale, bias, slice(p + rows.start, p + rows.stop)), has_key,
            p + rows.start, from_logits=True))
    mad_value = mad_qk(q, k, patch, num_prefix_tokens=num_prefix_tokens, grid=grid, scale=scale,
                       attn_bias=attn_bias, renormalize=renormalize, reduction=reduction) if "mad" in names else None
    has_query = torch.ones(layout.num_patches, dtype=torch.bool, device=q.device)
    return _reduce_stats(names, mad_value, per_query, has_query, layout.reduce_mean)


@without_autocast()
def stats_qk_pos(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    key_positions: torch.Tensor | None,
    stats: Sequence[str],
    *,
    scale: float | None = None,
    attn_bias: torch.Tensor | None = None,
    renormalize: bool = False,
    reduction: str = "mean",
    times: torch.Tensor | None = None,
    key_times: torch.Tensor | None = None,
) -> torch.Tensor:
    op = "vitmad.attention_stats_qk"
    shape = check_qk_tensors(q, k, scale, attn_bias, False, op)
    nq, nk = shape.num_queries, shape.num_keys
    layout = check_position_args(q, nq, nk, positions, key_positions, renormalize, reduction, op)
    names = check_stats_and_times(stats, q, layout, positions, key_positions, times, key_times, op)
    acc = mad_output_dtype(q.dtype)
    sides = _Sides(positions, key_positions, acc)
    keys_t = k.to(acc).transpose(-1, -2)
    bias = None if attn_bias is None else attn_bias.expand(*q.shape[:-1], nk)
    per_query = _collect(
        names, nq, math.prod(q.shape[:-2]) * max(nk, 1),
        lambda rows: _other_statistics(names, _softmax_rows(q, keys_t, shape.scale, bias, rows), sides.has_key,
                                       rows.start, from_logits=True))
    if nk == 0:  # softmax over no key: NaN, as over keys that are all masked (the sums above gave 0)
        per_query = {name: value.fill_(float("nan")) for name, value in per_query.items()}
    mad_value = mad_qk_pos(q, k, positions, key_positions, scale=scale, attn_bias=attn_bias,
                           renormalize=renormalize, reduction=reduction) if "mad" in names else None
    if TEMPORAL_MAD in names:  # MAD with the frames as one-coordinate positions: the same tokens have them
        per_query[TEMPORAL_MAD] = mad_qk_pos(q, k, times, key_times, scale=scale, attn_bias=attn_bias,
                                             renormalize=renormalize, reduction="none")
    return _reduce_stats(names, mad_value, per_query, sides.has_query, layout.reduce_mean)
