"""timm's ConViT (``timm.models.convit``): gated positional self-attention (``GPSA``), then plain ``MHSA``.

The first ``local_up_to_layer`` blocks attend with ``GPSA`` over the patch grid alone: the attention they apply
is ``(1 - sigmoid(g)) * softmax(q k^T) + sigmoid(g) * softmax(positional scores)``, renormalised per row, a
probability distribution over the patches per head. Two softmax calls make it, so neither is the layer's
attention: vitmad reads the applied attention where the module passes it to ``attn_drop``. The CLS token joins
before the remaining blocks, whose ``MHSA`` computes one softmax over CLS and patches. Both lay their tokens out
as a plain ViT (the patch embedding's grid, 0 or 1 token before it).
"""

from __future__ import annotations

from torch import nn

from ..module_index import named_module_list
from .stages import defined_in

__all__ = ["attention_modules", "placer", "probabilities_from"]


def _design(module: nn.Module) -> str | None:
    for class_name in ("GPSA", "MHSA"):
        if defined_in(module, class_name, "convit"):
            return class_name
    return None


def attention_modules(model: nn.Module) -> dict[str, nn.Module]:
    """``GPSA`` and ``MHSA`` modules, which the generic discovery misses (no "attention" in their class names)."""
    return {name: m for name, m in named_module_list(model) if _design(m) is not None}


def placer(model: nn.Module, name: str, module: nn.Module):
    """None: the plain ViT layout places both designs."""
    return None


def probabilities_from(module: nn.Module) -> nn.Module | None:
    """``GPSA``'s ``attn_drop``, whose input is the attention the layer applies; None for other modules."""
    return module.attn_drop if _design(module) == "GPSA" else None
