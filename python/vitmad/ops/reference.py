"""The definition of mean attention distance in float64, readable next to ``docs/definition.md``.

Every kernel is judged against these functions (:func:`mad_reference`, :func:`mad_backward_reference`,
:func:`mad_qk_reference`). It builds the full pixel-distance matrix, so it is
meant for correctness checks on moderate sizes, not for speed.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .arguments import (
    check_attn_tensor,
    check_mad_args,
    check_no_times,
    check_position_args,
    check_qk_tensors,
    check_stats,
    check_stats_and_times,
    grid_sides,
    pixel_size,
)

__all__ = [
    "pixel_distances",
    "mad_reference",
    "mad_backward_reference",
    "mad_qk_reference",
    "biased_logits",
    "position_distances",
    "mad_positions_reference",
    "mad_positions_backward_reference",
    "mad_qk_positions_reference",
    "uniform_attention_mad",
    "tutorial_mean_attention_distance",
    "attention_stats_reference",
    "attention_stats_qk_reference",
]


def pixel_distances(
    grid_h: int,
    grid_w: int,
    patch: float,
    queries: slice = slice(None),
    *,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Pixel distances between patch tokens on a ``grid_h x grid_w`` grid (row-major token order).

    Args:
        grid_h, grid_w: the patch grid.
        patch: pixel size of one patch.
        queries: which query patches (rows) to return: a slice, or a list or tensor of token indices; all by
            default.

    Returns:
        ``[num_queries, grid_h * grid_w]``: ``patch * sqrt((row_t - row_s)^2 + (col_t - col_s)^2)``.

    Raises:
        TypeError: a side that is not an int, a patch that is not a number, ``queries`` that index no rows, a
            dtype that is not floating.
        ValueError: a side that is not positive, a patch that is not finite and positive.
    """
    op = "vitmad.pixel_distances"
    grid_h, grid_w = grid_sides(op, grid_h, grid_w)
    patch = pixel_size(op, patch)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"{op}: dtype must be a floating torch.dtype, got {dtype!r}")
    tokens = torch.arange(grid_h * grid_w, device=device)
    coords = torch.stack([tokens // grid_w, tokens % grid_w], dim=-1).to(dtype)
    def refused(why: str = "") -> TypeError:  # written only when raised (a tensor of indices is long to print)
        return TypeError(f"{op}: queries must index the {grid_h * grid_w} patch tokens (a slice, or a list or tensor "
                         f"of token indices), got {queries!r}{why}")

    try:
        rows = coords[queries]
    except (IndexError, TypeError, ValueError, RuntimeError) as err:
        raise refused(f" ({err})") from None
    if rows.dim() != 2:  # an int index takes one row without its dimension
        raise refused()
    return patch * torch.cdist(rows, coords, compute_mode="donot_use_mm_for_euclid_dist")


def mad_reference(
    attn: torch.Tensor,
    patch: int,
    *,
    num_prefix_tokens: int = 1,
    grid: Sequence[int] | None = None,
    renormalize: bool = False,
    reduction: str = "mean",
) -> torch.Tensor:
    """Mean attention distance computed in float64 exactly as ``docs/definition.md`` defines it.

    Args:
        attn: ``[..., N, N]`` attention probabilities, rows are queries.
        patch: pixel size of a patch.
        num_prefix_tokens: ``P``, tokens before the patches (CLS, distillation, registers).
        grid: ``[grid_h, grid_w]``; square by default.
        renormalize: divide each query's sum by its attention mass on patch keys.
        reduction: ``"mean"`` gives ``[...]``, ``"none"`` gives the per-query ``[..., N - P]``.

    Returns:
        A float64 tensor.
    """
    check_attn_tensor(attn, "[..., N, N]", "vitmad.mad_reference")  # a list or array named as vitmad.mad names it
    layout = check_mad_args(attn.shape, attn.dtype, patch, num_prefix_tokens, grid, renormalize, reduction,
                            "vitmad.mad_reference")
    p = layout.num_prefix
    a = attn[..., p:, p:].to(torch.float64)
    dist = pixel_distances(layout.grid_h, layout.grid_w, patch, device=attn.device)
    per_query = (a * dist).sum(-1)
    if renormalize:
        per_query = per_query / a.sum(-1)
    return per_query.mean(-1) if layout.reduce_mean else per_query


def mad_backward_reference(
    grad: torch.Tensor,
    attn: torch.Tensor,
    patch: int,
    *,
    num_prefix_tokens: int = 1,
    grid: Sequence[int] | None = None,
    renormalize: bool = False,
    reduction: str = "mean",
) -> torch.Tensor:
    """Gradient of :func:`mad_reference` with respect to ``attn``, in float64, by autograd."""
    a = attn.detach().to(torch.float64).requires_grad_(True)
    out = mad_reference(
        a, patch, num_prefix_tokens=num_prefix_tokens, grid=grid, renormalize=renormalize, reduction=reduction
    )
    (grad_attn,) = torch.autograd.grad(out, a, grad.to(torch.float64))
    return grad_attn


def biased_logits(logits: torch.Tensor, attn_bias: torch.Tensor | None) -> torch.Tensor:
    """``logits`` with ``attn_bias`` applied as ``F.scaled_dot_product_attention`` applies its ``attn_mask``:
    a bool bias keeps the keys where it is True (the others' logits become -inf, where SDPA adds -inf and keeps
    a NaN logit there: docs/definition.md), any other is added."""
    if attn_bias is None:
        return logits
    if attn_bias.dtype == torch.bool:
        return logits.masked_fill(~attn_bias, float("-inf"))
    return logits + attn_bias.to(logits.dtype)


def mad_qk_reference(
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
    """``mad_qk`` by the materialised route in float64: softmax over every key, then :func:`mad_reference`.

    Args:
        q, k: ``[..., N, D]`` queries and keys.
        scale: multiplies ``q @ k^T``; ``D ** -0.5`` by default.
        attn_bias: added to the logits, or bool (True keeps a key); broadcastable to ``[..., N, N]``.
        The other arguments: as for :func:`mad_reference`.

    Returns:
        A float64 tensor.
    """
    check_qk_tensors(q, k, scale, attn_bias, True, "vitmad.mad_qk_reference")  # a list or None named (QA 308)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    attn = biased_logits(q.double() @ k.double().transpose(-1, -2) * scale, attn_bias).softmax(-1)
    return mad_reference(
        attn, patch, num_prefix_tokens=num_prefix_tokens, grid=grid, renormalize=renormalize, reduction=reduction
    )


def position_distances(query_positions: torch.Tensor, key_positions: torch.Tensor) -> torch.Tensor:
    """Euclidean distances ``[..., Nq, Nk]`` between ``[..., Nq, K]`` and ``[..., Nk, K]`` positions, in float64.

    NaN where either token has no position (a NaN row).
    """
    diff = query_positions.double()[..., :, None, :] - key_positions.double()[..., None, :, :]
    return diff.square().sum(-1).sqrt()


def _positions_mad(
    attn: torch.Tensor, positions: torch.Tensor, key_positions: torch.Tensor | None, renormalize: bool,
    reduce_mean: bool, nan_rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """The position form's definition on float64 attention whose arguments were checked; ``nan_rows``
    (``[..., Nq]``): queries whose value is NaN whatever their keys (softmax rows of NaN)."""
    keys = positions if key_positions is None else key_positions
    has_query = ~positions.double()[..., 0].isnan()
    has_key = ~keys.double()[..., 0].isnan()
    # Keys without a position are not keys: their columns are never read (NaN there does not propagate).
    # Distances are 0 (not NaN) wherever either token has no position, so no NaN reaches autograd either.
    a = torch.where(has_key[..., None, :], attn, 0.0)
    both = has_query[..., :, None] & has_key[..., None, :]
    dist = torch.where(both, position_distances(positions, keys), 0.0)
    per_query = (a * dist).sum(-1)
    if renormalize:
        # Queries without a position divide by 1, not by their (maybe zero) mass: no 0 / 0 reaches autograd.
        per_query = per_query / torch.where(has_query, a.sum(-1), 1.0)
    if nan_rows is not None:
        per_query = torch.where(nan_rows, float("nan"), per_query)
    per_query = torch.where(has_query, per_query, float("nan"))
    if not reduce_mean:
        return per_query
    return torch.where(has_query, per_query, 0.0).sum(-1) / has_query.sum(-1)


def mad_positions_reference(
    attn: torch.Tensor,
    positions: torch.Tensor,
    key_positions: torch.Tensor | None = None,
    *,
    renormalize: bool = False,
    reduction: str = "mean",
) -> torch.Tensor:
    """The position form of MAD in float64, exactly as ``docs/definition.md`` defines it.

    Args:
        attn: ``[..., Nq, Nk]`` attention probabilities, rows are queries.
        positions: ``[..., Nq, K]`` (K in 1..3) positions of the queries, broadcast over attn's leading dims;
            a NaN row is a token without a position.
        key_positions: ``[..., Nk, K]`` positions of the keys; ``positions`` by default.
        renormalize: divide each query's sum by its attention mass on keys with a position.
        reduction: ``"mean"`` (over the queries with a position) gives ``[...]``, ``"none"`` ``[..., Nq]``
            with NaN at queries without a position.

    Returns:
        A float64 tensor.
    """
    check_attn_tensor(attn, "[..., Nq, Nk]", "vitmad.mad")
    layout = check_position_args(attn, attn.shape[-2], attn.shape[-1], positions, key_positions, renormalize,
                                 reduction, "vitmad.mad")
    return _positions_mad(attn.double(), positions, key_positions, renormalize, layout.reduce_mean)


def mad_positions_backward_reference(
    grad: torch.Tensor,
    attn: torch.Tensor,
    positions: torch.Tensor,
    key_positions: torch.Tensor | None = None,
    *,
    renormalize: bool = False,
    reduction: str = "mean",
) -> torch.Tensor:
    """Gradient of :func:`mad_positions_reference` with respect to ``attn``, in float64, by autograd."""
    a = attn.detach().to(torch.float64).requires_grad_(True)
    out = mad_positions_reference(a, positions, key_positions, renormalize=renormalize, reduction=reduction)
    # NaN outputs (queries without a position) get no gradient, as in the kernels.
    (grad_attn,) = torch.autograd.grad(out, a, torch.where(out.isnan(), 0.0, grad.to(torch.float64)))
    return grad_attn


def mad_qk_positions_reference(
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
    """The position form of ``mad_qk`` by the materialised route in float64: softmax over every key (those
    without a position included, as the model computes it), then :func:`mad_positions_reference`.

    A query with no key to attend to (all masked, or ``Nk = 0``) has no attention distribution: NaN.
    """
    shape = check_qk_tensors(q, k, scale, attn_bias, False, "vitmad.mad_qk")
    layout = check_position_args(q, shape.num_queries, shape.num_keys, positions, key_positions, renormalize,
                                 reduction, "vitmad.mad_qk")
    if shape.num_keys == 0:  # softmax over no key: every query's value, hence every mean, is NaN
        out = q.shape[:-2] if layout.reduce_mean else q.shape[:-1]
        return torch.full(out, float("nan"), dtype=torch.float64, device=q.device)
    logits = biased_logits(q.double() @ k.double().transpose(-1, -2) * shape.scale, attn_bias)
    probabilities = logits.softmax(-1)
    # A NaN row (a NaN or +inf logit, every key masked) is NaN for its query, also where no key has a position and
    # none of the row is read (QA 319: 0, where the kernels and the docs give NaN).
    return _positions_mad(probabilities, positions, key_positions, renormalize, layout.reduce_mean,
                          nan_rows=probabilities.isnan().any(-1))


def uniform_attention_mad(grid_h: int, grid_w: int, patch: float | tuple[float, float]) -> float:
    """MAD of uniform attention over the patches: the mean pixel distance between two patches.

    This is the value a fully global head reaches; ``vitmad profile`` draws it as a reference line. Summed
    over the ``(2 gh - 1) (2 gw - 1)`` offsets, each weighted by how many patch pairs have it, in float64.

    Args:
        grid_h, grid_w: the patch grid.
        patch: pixel size of a patch, or ``(stride_y, stride_x)`` for rectangular cells.

    Raises:
        TypeError: a grid side that is not an int, a patch size that is not a number (nor a pair of them).
        ValueError: a grid side that is not positive, a patch size that is not finite and positive, a pair of
            another length.
    """
    op = "vitmad.uniform_attention_mad"
    grid_h, grid_w = grid_sides(op, grid_h, grid_w)
    if isinstance(patch, (tuple, list)):
        if len(patch) != 2:
            raise ValueError(f"{op}: patch must be a size in pixels, or (stride_y, stride_x), got {patch!r}")
        stride_y, stride_x = (pixel_size(op, side, "patch's stride") for side in patch)
    else:
        stride_y = stride_x = pixel_size(op, patch)
    dy = torch.arange(1 - grid_h, grid_h, dtype=torch.float64)
    dx = torch.arange(1 - grid_w, grid_w, dtype=torch.float64)
    pairs = (grid_h - dy.abs())[:, None] * (grid_w - dx.abs())[None, :]
    distance = torch.hypot(dy[:, None] * stride_y, dx[None, :] * stride_x)
    return ((pairs * distance).sum() / (grid_h * grid_w) ** 2).item()


def tutorial_mean_attention_distance(patch_size: int, attention_weights: np.ndarray) -> np.ndarray:
    """The CVPR 2023 "All Things ViTs" tutorial's ``compute_mean_attention_dist``, transcribed as
    ``docs/definition.md`` describes it: one CLS token, a square grid, the full distance matrix from a double
    Python loop.

    It is what users run today; vitmad keeps it as an independent check of :func:`mad_reference` and as the
    baseline of ``benchmarks/bench_op.py``.

    Args:
        patch_size: pixel size of a patch.
        attention_weights: ``[..., N, N]`` with one CLS token.

    Returns:
        ``[...]`` float64 array.
    """
    attention_weights = attention_weights[..., 1:, 1:]
    num_patches = attention_weights.shape[-1]
    length = int(np.sqrt(num_patches))
    distance_matrix = np.zeros((num_patches, num_patches))
    for i in range(num_patches):
        for j in range(num_patches):
            xi, yi = i // length, i % length
            xj, yj = j // length, j % length
            distance_matrix[i, j] = patch_size * np.linalg.norm([xi - xj, yi - yj])
    weighted = (attention_weights * distance_matrix).sum(-1)
    return weighted.mean(-1)


# The statistics beside the distance (docs/definition.md, "Beside the distance") ---------------------------------


def _row_statistic(name: str, a: torch.Tensor, has_key: torch.Tensor, first_query: int) -> torch.Tensor:
    """One statistic other than MAD of every query row of float64 attention ``a`` ``[..., Nq, Nk]``;
    ``has_key`` ``[..., Nk]`` says which keys have a position; query row ``i`` is token ``first_query + i``."""
    if name == "entropy":
        return -torch.special.xlogy(a, a).sum(-1)  # xlogy(0, 0) = 0: a key with no attention adds nothing
    if name == "prefix_mass":
        return torch.where(has_key[..., None, :], 0.0, a).sum(-1)
    # self_mass: the attention on the query's own token, the key of the same token index.
    rows = torch.arange(a.shape[-2], device=a.device)
    return a[..., rows, rows + first_query]


def _stats_from_attention(a, stats, mad_value, has_query, has_key, first_query, reduce_mean, temporal_value=None,
                          no_distribution=None):
    """``[S, ...]`` float64: each statistic per query (NaN at queries without a position), or its mean over the
    queries with a position. ``mad_value`` gives MAD in the same reduction, computed by the MAD reference, and
    ``temporal_value`` the temporal MAD (MAD over the frames). ``no_distribution`` ``[..., Nq]``: the rows the
    softmax gave no distribution (every key masked, a NaN logit), NaN for every statistic; a prefix mass summed
    over no prefix key was 0 there (QA 422)."""
    rows = []
    for name in stats:
        if name == "mad":
            rows.append(mad_value())
            continue
        if name == "temporal_mad":
            rows.append(temporal_value())
            continue
        per_query = torch.where(has_query, _row_statistic(name, a, has_key, first_query), float("nan"))
        if no_distribution is not None:
            per_query = per_query.masked_fill(no_distribution, float("nan"))
        if reduce_mean:
            per_query = torch.where(has_query, per_query, 0.0).sum(-1) / has_query.sum(-1)
        rows.append(per_query)
    return torch.stack(rows)


def attention_stats_reference(
    attn: torch.Tensor,
    stats: Sequence[str],
    *,
    patch: int | None = None,
    num_prefix_tokens: int = 1,
    grid: Sequence[int] | None = None,
    positions: torch.Tensor | None = None,
    key_positions: torch.Tensor | None = None,
    renormalize: bool = False,
    reduction: str = "mean",
    times: torch.Tensor | None = None,
    key_times: torch.Tensor | None = None,
) -> torch.Tensor:
    """The statistics of attention probabilities in float64, as ``docs/definition.md`` defines them: MAD, the
    entropy of each query's row (nats), its mass on the keys without a position and on its own token, and (video,
    ``times``) the temporal MAD: MAD with the distance between the tokens' frames.

    The grid form (``patch``, ``num_prefix_tokens``, ``grid``: the queries are the patch tokens, the prefix tokens
    the keys without a position) or the position form (``positions``, ``key_positions``, ``times``,
    ``key_times``).

    Returns:
        ``[len(stats), ...]`` float64, row ``i`` the statistic ``stats[i]`` shaped as :func:`mad_reference`'s
        (grid form) or :func:`mad_positions_reference`'s output.
    """
    check_attn_tensor(attn, "[..., N, N]" if positions is None else "[..., Nq, Nk]", "vitmad.attention_stats")
    if positions is None:
        check_no_times(times, key_times, "vitmad.attention_stats")
        layout = check_mad_args(attn.shape, attn.dtype, patch, num_prefix_tokens, grid, renormalize, reduction,
                                "vitmad.attention_stats")
        stats = check_stats(stats, attn.shape[-1], attn.shape[-1], "vitmad.attention_stats")
        p = layout.num_prefix
        a = attn.double()[..., p:, :]
        has_key = torch.arange(attn.shape[-1], device=attn.device) >= p
        has_query = torch.ones(layout.num_patches, dtype=torch.bool, device=attn.device)
        return _stats_from_attention(
            a, stats, lambda: mad_reference(attn, patch, num_prefix_tokens=num_prefix_tokens, grid=grid,
                                            renormalize=renormalize, reduction=reduction),
            has_query, has_key, p, layout.reduce_mean)
    layout = check_position_args(attn, attn.shape[-2], attn.shape[-1], positions, key_positions, renormalize,
                                 reduction, "vitmad.attention_stats")
    stats = check_stats_and_times(stats, attn, layout, positions, key_positions, times, key_times,
                                  "vitmad.attention_stats")
    keys = positions if key_positions is None else key_positions
    return _stats_from_attention(
        attn.double(), stats, lambda: _positions_mad(attn.double(), positions, key_positions, renormalize,
                                                     layout.reduce_mean),
        ~positions.double()[..., 0].isnan(), ~keys.double()[..., 0].isnan(), 0, layout.reduce_mean,
        lambda: _positions_mad(attn.double(), times, key_times, renormalize, layout.reduce_mean))


def attention_stats_qk_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    stats: Sequence[str],
    *,
    patch: int | None = None,
    num_prefix_tokens: int = 1,
    grid: Sequence[int] | None = None,
    positions: torch.Tensor | None = None,
    key_positions: torch.Tensor | None = None,
    scale: float | None = None,
    attn_bias: torch.Tensor | None = None,
    renormalize: bool = False,
    reduction: str = "mean",
    times: torch.Tensor | None = None,
    key_times: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`attention_stats_reference` of ``softmax(q @ k^T * scale + attn_bias)`` over every key, by the
    materialised route in float64; MAD as :func:`mad_qk_reference` / :func:`mad_qk_positions_reference` give it.

    A query with no key to attend to (all masked) has no attention distribution: NaN for every statistic.
    """
    op = "vitmad.attention_stats_qk"
    shape = check_qk_tensors(q, k, scale, attn_bias, positions is None, op)
    if positions is None:
        check_no_times(times, key_times, op)
        stats = check_stats(stats, shape.num_queries, shape.num_keys, op)
    logits = biased_logits(q.double() @ k.double().transpose(-1, -2) * shape.scale, attn_bias)
    attn = logits.softmax(-1) if shape.num_keys else logits
    if positions is None:
        layout = check_mad_args(attn.shape, attn.dtype, patch, num_prefix_tokens, grid, renormalize, reduction, op)
        p = layout.num_prefix
        has_key = torch.arange(shape.num_keys, device=q.device) >= p
        has_query = torch.ones(layout.num_patches, dtype=torch.bool, device=q.device)
        return _stats_from_attention(
            attn[..., p:, :], stats,
            lambda: mad_qk_reference(q, k, patch, num_prefix_tokens=num_prefix_tokens, grid=grid, scale=scale,
                                     attn_bias=attn_bias, renormalize=renormalize, reduction=reduction),
            has_query, has_key, p, layout.reduce_mean, no_distribution=attn[..., p:, :].isnan().any(-1))
    layout = check_position_args(q, shape.num_queries, shape.num_keys, positions, key_positions, renormalize,
                                 reduction, op)
    stats = check_stats_and_times(stats, q, layout, positions, key_positions, times, key_times, op)
    keys = positions if key_positions is None else key_positions
    has_query = ~positions.double()[..., 0].isnan()
    if shape.num_keys == 0:  # softmax over no key: every statistic of every query is NaN
        out = q.shape[:-2] if layout.reduce_mean else q.shape[:-1]
        return torch.full((len(stats), *out), float("nan"), dtype=torch.float64, device=q.device)
    return _stats_from_attention(
        attn, stats,
        lambda: mad_qk_positions_reference(q, k, positions, key_positions, scale=scale, attn_bias=attn_bias,
                                           renormalize=renormalize, reduction=reduction),
        has_query, ~keys.double()[..., 0].isnan(), 0, layout.reduce_mean,
        lambda: mad_qk_positions_reference(q, k, times, key_times, scale=scale, attn_bias=attn_bias,
                                           renormalize=renormalize, reduction=reduction),
        no_distribution=attn.isnan().any(-1))
