"""timm's EfficientViT (MIT, ``timm.models.efficientvit_mit``): ReLU linear attention, skipped.

``LiteMLA`` passes queries and keys through a ReLU kernel and multiplies ``relu(k)^T v`` first, then the queries
(the kernel trick): the weights ``relu(q_i) . relu(k_j)`` are never formed, and they are no softmax over the
tokens, which is the attention MAD is defined on (``docs/definition.md``). Without this family the model was
refused as having no attention layer at all.
"""

from __future__ import annotations

from torch import nn

from ..module_index import named_module_list
from .stages import defined_in

_REASON = ("ReLU linear attention (EfficientViT-MIT's LiteMLA): relu(k)^T v is applied to relu(q), so no softmax "
           "over the tokens is formed")


def _linear(module: nn.Module) -> bool:
    return defined_in(module, "LiteMLA", "efficientvit_mit")


def attention_modules(model: nn.Module) -> dict[str, nn.Module]:
    """EfficientViT-MIT's linear attention (no ``fused_attn`` switch), to list it as skipped."""
    return {name: m for name, m in named_module_list(model) if _linear(m)}


def placer(model: nn.Module, name: str, module: nn.Module):
    from . import Skip

    return Skip(_REASON) if _linear(module) else None
