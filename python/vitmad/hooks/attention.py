"""MAD of one attention layer from its queries and keys, without ever holding the whole attention tensor.

:func:`mad_from_qk` is what the model hooks call. It uses the fused ``torch.ops.vitmad.mad_qk`` when the loaded
library registers it, and otherwise :func:`mad_qk_chunked`, which has the same signature: it forms the softmax
a bounded block at a time and reduces each block at once, so at most ``CHUNK_ELEMENTS`` probabilities exist.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .. import ops  # noqa: F401  (registers torch.ops.vitmad.mad and its fake kernel)
from .._layout import MadLayout, check_mad_args, mad_output_dtype
from ..reference import pixel_distances

__all__ = ["CHUNK_ELEMENTS", "mad_qk_chunked", "mad_from_qk", "additive_bias"]

# Attention-sized elements per block of mad_qk_chunked: a block's logits and probabilities (2 x 16 MiB in
# float32) are the only attention-sized memory alive. Blocks hold whole [N, N]
# matrices, reduced by vitmad::mad, while one matrix fits; beyond that (N > 2048) they hold query rows, reduced
# against their rows of pixel distances: vitmad::mad only takes square [N, N] matrices, and no strided view
# of a block of rows is one without addressing memory for all N rows.
CHUNK_ELEMENTS = 1 << 22
# Preferred block of whole matrices (2 MiB in float32): the logits, probabilities and MAD passes then run in
# the L2 cache; measured on ViT-B/16 at 224 px, blocks of 16 MiB took about 1.6x as long.
CACHE_BLOCK_ELEMENTS = 1 << 19


def additive_bias(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """An SDPA ``attn_mask`` as an additive bias: boolean masks keep ``True`` (0) and drop ``False`` (-inf)."""
    if mask is None or mask.dtype != torch.bool:
        return mask
    return torch.zeros((), dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))


def _check_qk(q: torch.Tensor, k: torch.Tensor) -> tuple[int, ...]:
    if q.dim() < 2 or k.dim() < 2:
        raise ValueError(f"vitmad.mad_qk: q and k must be [..., N, D], got shapes {list(q.shape)} and {list(k.shape)}")
    if q.shape[-2:] != k.shape[-2:]:
        raise ValueError(
            "vitmad.mad_qk: q and k must have the same number of tokens N and head size D (self-attention), "
            f"got q {list(q.shape)} and k {list(k.shape)}"
        )
    try:
        return tuple(torch.broadcast_shapes(q.shape[:-2], k.shape[:-2]))
    except RuntimeError:
        raise ValueError(
            f"vitmad.mad_qk: the leading dims of q {list(q.shape)} and k {list(k.shape)} do not broadcast"
        ) from None


def _probabilities(
    q: torch.Tensor, k: torch.Tensor, scale: float, bias: torch.Tensor | None, dtype: torch.dtype
) -> torch.Tensor:
    """softmax(q @ k^T * scale + bias) over the last dim (the fused softmax kernel: one pass fewer than in place).

    Args:
        q: ``[M, C, D]`` queries (C rows of each of M matrices).
        k: ``[M, N, D]`` keys.
        bias: ``[M, C, N]`` additive bias, or None.

    Returns:
        ``[M, C, N]`` probabilities in ``dtype``.
    """
    q = q.to(dtype) * scale
    keys = k.to(dtype).transpose(-1, -2)
    logits = torch.matmul(q, keys) if bias is None else torch.baddbmm(bias.to(dtype), q, keys)
    return torch.softmax(logits, -1)


def _distance_weighted_sums(probs: torch.Tensor, dist: torch.Tensor, layout: MadLayout) -> torch.Tensor:
    """``m_t`` (MAD_SPEC.md) of C query patches from their probability rows.

    Args:
        probs: ``[M, C, N]`` probability rows of the C queries (all keys, prefix included).
        dist: ``[C, N - P]`` pixel distances from the C queries to the patch keys.

    Returns:
        ``[M, C]``.
    """
    a = probs[..., layout.num_prefix :]
    weighted = torch.einsum("mts,ts->mt", a, dist)
    return weighted / a.sum(-1) if layout.renormalize else weighted


def mad_qk_chunked(
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
    """``vitmad.mad(softmax(q @ k^T * scale + attn_bias), ...)``, a block of ``CHUNK_ELEMENTS`` logits at a time.

    Args:
        q: ``[..., N, D]`` queries, as the attention uses them (after any q-norm and rotary embedding).
        k: ``[..., N, D]`` keys; its leading dims broadcast with those of ``q``.
        patch, num_prefix_tokens, grid, renormalize, reduction: as for :func:`vitmad.mad`.
        scale: logit scale; ``D ** -0.5`` by default, like ``F.scaled_dot_product_attention``.
        attn_bias: additive logit bias broadcastable to ``[..., N, N]`` (relative position bias, masks).

    Returns:
        ``[...]`` for ``"mean"``, ``[..., N - P]`` for ``"none"``; float32, or float64 for float64 ``q``.
    """
    lead = _check_qk(q, k)
    n, d = q.shape[-2:]
    layout = check_mad_args((*lead, n, n), q.dtype, patch, num_prefix_tokens, grid, renormalize, reduction,
                            "vitmad.mad_qk")
    acc = mad_output_dtype(q.dtype)
    scale = d**-0.5 if scale is None else float(scale)
    qf = q.expand(*lead, n, d).reshape(-1, n, d)
    kf = k.expand(*lead, n, d).reshape(-1, n, d)
    bias = None if attn_bias is None else additive_bias(attn_bias, acc).expand(*lead, n, n)
    num_matrices = qf.shape[0]
    p = layout.num_prefix

    def bias_block(first: int, last: int, rows: slice) -> torch.Tensor | None:
        # Gathers only these matrices and rows of the broadcast bias; flattening the expanded view would copy
        # all of it.
        if bias is None:
            return None
        index = torch.unravel_index(torch.arange(first, last, device=bias.device), lead) if lead else ()
        return bias[(*index, rows)].reshape(last - first, -1, n)

    per_query = torch.empty(num_matrices, layout.num_patches, dtype=acc, device=q.device)
    if n * n <= CHUNK_ELEMENTS:
        matrices_per_block = min(CHUNK_ELEMENTS, max(CACHE_BLOCK_ELEMENTS, n * n)) // (n * n)
        for first in range(0, num_matrices, matrices_per_block):
            last = min(first + matrices_per_block, num_matrices)
            probs = _probabilities(qf[first:last], kf[first:last], scale, bias_block(first, last, slice(None)), acc)
            per_query[first:last] = torch.ops.vitmad.mad(
                probs, patch, num_prefix_tokens=p, grid=[layout.grid_h, layout.grid_w],
                renormalize=renormalize, reduction="none",
            )
    else:
        # Query rows outside, matrices inside: each block of distance rows is built once for all matrices.
        rows_per_block = max(1, CHUNK_ELEMENTS // n)
        for start in range(0, layout.num_patches, rows_per_block):
            rows = slice(start, min(start + rows_per_block, layout.num_patches))
            tokens = slice(p + rows.start, p + rows.stop)
            dist = pixel_distances(layout.grid_h, layout.grid_w, patch, rows, dtype=acc, device=q.device)
            for m in range(num_matrices):
                probs = _probabilities(qf[m : m + 1, tokens], kf[m : m + 1], scale, bias_block(m, m + 1, tokens), acc)
                per_query[m : m + 1, rows] = _distance_weighted_sums(probs, dist, layout)
    if layout.reduce_mean:
        return per_query.to(torch.float64).mean(-1).to(acc).reshape(lead)
    return per_query.reshape(*lead, layout.num_patches)


def mad_from_qk(q: torch.Tensor, k: torch.Tensor, patch: int, **options) -> torch.Tensor:
    """:func:`mad_qk_chunked`'s contract, computed by the fused ``vitmad::mad_qk`` when the library has it."""
    if hasattr(torch.ops.vitmad, "mad_qk"):
        return torch.ops.vitmad.mad_qk(q, k, patch, **options)
    return mad_qk_chunked(q, k, patch, **options)
