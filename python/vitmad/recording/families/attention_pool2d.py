"""CLIP-style attention pooling over a CNN's final map: timm's ``AttentionPool2d`` and ``RotAttentionPool2d``, the
heads of its ``ByobNet`` CLIP ResNets (``resnet50_clip``, ``resnet101_clip``, ``resnet50x4_clip``, ...,
``head_type="attn_abs"``; ``"attn_rot"`` for the rotary one).

The head flattens the ``[B, C, H, W]`` map it receives to its ``H * W`` tokens, row-major, and puts one pooled token
before them: the mean of the map's tokens (or a learned class token, ``class_token=True``), which stands for no
place on the image. Its attention is self-attention over those ``1 + H * W`` tokens, ``[B, heads, 1 + H * W,
1 + H * W]`` (an absolute position embedding resampled to ``H x W``, or rotary embeddings of the ``H x W`` grid, on
the map tokens only), and which rows count depends on ``pool_type``:

- ``"token"`` (the CLIP ResNets): the output is the pooled token's row alone. timm computes the map tokens' rows
  too, and throws them away; OpenAI's CLIP, whose weights these are, keeps only that row as well (its later code
  computes only the pooled query, ``query=x[:1]``). So the layer has no MAD: its one query that counts has no
  position. It is listed in ``rec.skipped``, and with ``stats=[..., "prefix_maps"]`` the pooled token's row over
  the map is recorded in ``rec.class_attention_maps`` (``[B, heads, 1, H * W]``), the CLIP attention-pool map; its
  mass on its own key, which has no position, is what the map's sum leaves to 1. The same weights give the same
  record whichever implementation computes them.
- any other ``pool_type`` (timm's ``global_pool=""``: the output is the map tokens' rows, reshaped to
  ``[B, C, H, W]``): those rows are the output, each query at its cell, so the layer is self-attention over the map
  with one token without a position before it, like a ViT layer with a CLS: it has a MAD over the ``H * W`` map
  queries, and the pooled token's row is its prefix map (``rec.prefix_maps``).

The map tokens sit at the centres of the map's cells, ``((row + 0.5) * s, (col + 0.5) * s)`` pixels, ``s`` being
the map's reduction: the head of a ``ByobNet`` pools the map of ``final_conv``, whose reduction is the last entry
of its ``feature_info`` (its ``output_stride`` included), checked in each call against the image and the map the
head receives (:func:`.windows.stage_stride`). Elsewhere the map's stride is not known, and the head is skipped
with that reason, never placed by a guess. A ``pool_type`` changed (``reset``) after the recording began is
refused at the next call.
"""

from __future__ import annotations

import torch
from torch import nn

from ..module_index import module_list
from ..placement import CallContext, NotPlaceable, Placement
from .stages import defined_in, grid_placement
from .windows import InputMapPlacer

__all__ = ["placer"]

_CLASSES = ("AttentionPool2d", "RotAttentionPool2d")
_POOLING = ("attention pooling: one pooled query without a position on the image ({}); its attention over the map is "
            "recorded with stats=[..., 'prefix_maps'] (rec.class_attention_maps); the map tokens' rows, which timm "
            "computes too, are discarded by pool_type='token' and have no MAD")
_UNPLACED = ("attention pooling over a CNN's feature map whose pixel stride vitmad does not know: it knows it for the "
             "head of timm's ByobNet (the reduction of its feature_info's final_conv), and this {} is {}; neither "
             "its map nor a MAD is recorded")


class _PooledMap(InputMapPlacer):
    """The tokens of a timm ``AttentionPool2d`` / ``RotAttentionPool2d``: the pooled token, then the ``H x W`` map the
    head receives in this call, row-major, at the map's reduction.

    Args:
        model, name, module: the model, the head's qualified name, the head.
        reduction: pixels of the input image per cell of the map (checked against each call's image).
        pool_type: the head's ``pool_type`` when the recording began.
    """

    def __init__(self, model: nn.Module, name: str, module: nn.Module, reduction: int, pool_type: str):
        super().__init__(model, name, module, reduction)
        self.pool_type = pool_type

    def place(self, context: CallContext, lead: torch.Size, num_queries: int, num_keys: int) -> Placement:
        if (self.module.pool_type == "token") != (self.pool_type == "token"):
            raise NotPlaceable(
                f"its pool_type changed from {self.pool_type!r} to {self.module.pool_type!r} after the recording "
                "began, and with it which of its rows are its output (the pooled token's for 'token', the map "
                "tokens' otherwise); start a new recording"
            )
        grid, stride = self.stage(context)
        return grid_placement(lead, num_queries, num_keys, grid=grid, stride=stride, attention="global", prefix=1)


def _reduction(model: nn.Module, module: nn.Module) -> tuple[int | None, str]:
    """The pixel stride of the map ``module`` pools, or None with the reason it is not known."""
    byobnet = next((m for m in module_list(model) if defined_in(m, "ByobNet", "byobnet")
                    and getattr(m, "head", None) is module), None)
    if byobnet is None:
        return None, f"not the head of a ByobNet (in {type(model).__name__})"
    infos = getattr(byobnet, "feature_info", None)
    last = infos[-1] if isinstance(infos, (list, tuple)) and infos else None
    if not isinstance(last, dict) or last.get("module") != "final_conv" or not last.get("reduction"):
        return None, "the head of a ByobNet whose feature_info does not end with final_conv's reduction"
    return int(last["reduction"]), ""


def placer(model: nn.Module, name: str, module: nn.Module):
    from . import ClassQueries, Skip

    if not any(defined_in(module, cls, "attention_pool2d") for cls in _CLASSES):
        return None
    reduction, why = _reduction(model, module)
    if reduction is None:
        return Skip(_UNPLACED.format(type(module).__name__, why))
    tokens = _PooledMap(model, name, module, reduction, module.pool_type)
    if module.pool_type != "token":  # its _pool: the map tokens' rows are the output
        return tokens
    pooled = "the mean of the map's tokens" if getattr(module, "cls_token", None) is None else "its class token"
    return ClassQueries(_POOLING.format(pooled), tokens, "the pooled token and the map it pools",
                        self_attention=True)
