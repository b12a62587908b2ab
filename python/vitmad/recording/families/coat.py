"""timm's CoaT (``timm.models.coat``): factorized attention, skipped.

``FactorAttnConvRelPosEnc`` takes the softmax of the keys over the tokens, multiplies it with the values and
then with the queries (``q @ (softmax(k)^T v)``): no token has a distribution over the others, so MAD is not
defined for it.
"""

from __future__ import annotations

from torch import nn

from ..module_index import named_module_list
from .stages import defined_in

_REASON = ("factorized attention (CoaT): softmax(k)^T v is applied to the queries, so no query has attention "
           "weights over the tokens")


def _factorized(module: nn.Module) -> bool:
    return defined_in(module, "FactorAttnConvRelPosEnc", "coat")


def attention_modules(model: nn.Module) -> dict[str, nn.Module]:
    """CoaT's factorized attention (no ``fused_attn`` switch), to list it as skipped."""
    return {name: m for name, m in named_module_list(model) if _factorized(m)}


def placer(model: nn.Module, name: str, module: nn.Module):
    from . import Skip

    return Skip(_REASON) if _factorized(module) else None
