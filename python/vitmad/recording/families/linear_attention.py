"""timm's attention that forms no softmax row per query over the tokens, skipped with the reason: MAD is defined
on softmax attention over positioned tokens (``docs/definition.md``). These modules have no ``fused_attn``
switch and no query/key projections that the generic discovery knows, so this family finds them, to list them
as skipped rather than refuse the model as having no attention at all.

- CoaT's ``FactorAttnConvRelPosEnc`` takes the softmax of the keys over the tokens, multiplies it with the values
  and then with the queries (``q @ (softmax(k)^T v)``): no token has a distribution over the others.
- EfficientViT-MIT's ``LiteMLA`` passes queries and keys through a ReLU kernel and multiplies ``relu(k)^T v``
  first (the kernel trick): the weights ``relu(q_i) . relu(k_j)`` are never formed, and are no softmax.
"""

from __future__ import annotations

from torch import nn

from ..module_index import named_module_list

# (class name, defining module's suffix) -> why it has no MAD.
_REASONS = {
    ("FactorAttnConvRelPosEnc", "coat"): "factorized attention (CoaT): softmax(k)^T v is applied to the queries, so "
                                         "no query has attention weights over the tokens",
    ("LiteMLA", "efficientvit_mit"): "ReLU linear attention (EfficientViT-MIT's LiteMLA): relu(k)^T v is applied to "
                                     "relu(q), so no softmax over the tokens is formed",
}


def _reason(module: nn.Module) -> str | None:
    cls = type(module)
    return _REASONS.get((cls.__name__, cls.__module__.rpartition(".")[2]))


def attention_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The modules above, by qualified name."""
    return {name: m for name, m in named_module_list(model) if _reason(m) is not None}


def placer(model: nn.Module, name: str, module: nn.Module):
    from . import Skip

    reason = _reason(module)
    return None if reason is None else Skip(reason)
