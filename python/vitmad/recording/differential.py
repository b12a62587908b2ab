"""Differential attention (timm ``DiffAttention``: ``vit_dwee_*``, ``vit_dpwee_*``): one layer, two softmax maps.

The layer attends with ``A = A1 - lambda * A2`` (Ye et al. 2024, "Differential Transformer"), computing ``A1``
and ``A2`` in two ``F.scaled_dot_product_attention`` calls. MAD is linear in the attention, so the MAD of the
attention the layer applies combines the two calls exactly (``docs/definition.md``, "Differential attention"):

    m_t(A) = m_t(A1) - lambda * m_t(A2)                                  (per query, before any division)
    renormalised: (w_t(A1) - lambda * w_t(A2)) / (z_t(A1) - lambda * z_t(A2))

with ``w_t`` the distance-weighted sum and ``z_t`` the mass on keys with a position. Each call is reduced to
its per-query sums at once, so nothing of size ``N x N`` is kept between the two calls.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["is_differential", "differential_lambda", "CallSums", "combine"]


def is_differential(module: nn.Module) -> bool:
    """Whether ``module`` is timm's differential attention (two maps combined with a learned lambda)."""
    return callable(getattr(module, "_compute_lambda", None)) and hasattr(module, "lambda_init")


def differential_lambda(module: nn.Module) -> float:
    """The lambda the module applies in this forward (a function of its parameters only)."""
    with torch.no_grad():
        return float(module._compute_lambda())


@dataclass
class CallSums:
    """One softmax map's per-query sums ``[..., Nq]``: distance-weighted (``weighted``) and, when MAD is
    renormalised, the mass on keys with a position (``mass``)."""

    weighted: torch.Tensor
    mass: torch.Tensor | None = None


def _reduce(per_query: torch.Tensor, reduce_mean: bool) -> torch.Tensor:
    return per_query.mean(-1) if reduce_mean else per_query


def combine(first: CallSums, second: CallSums, lam: float, *, renormalize: bool, reduce_mean: bool):
    """MAD of ``A1 - lam * A2`` and of each map alone, from the two maps' per-query sums.

    Returns:
        ``(mad, (mad_a1, mad_a2))``, each ``[...]`` (mean over queries) or ``[..., Nq]``.
    """
    weighted = first.weighted - lam * second.weighted
    if renormalize:
        per_query = weighted / (first.mass - lam * second.mass)
        parts = (first.weighted / first.mass, second.weighted / second.mass)
    else:
        per_query = weighted
        parts = (first.weighted, second.weighted)
    return _reduce(per_query, reduce_mean), tuple(_reduce(p, reduce_mean) for p in parts)
