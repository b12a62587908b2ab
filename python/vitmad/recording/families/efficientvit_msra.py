"""timm's EfficientViT (MSRA) (``timm.models.efficientvit_msra``): cascaded group attention in local windows.

``LocalWindowAttention`` pads its ``[B, C, H, W]`` map with zeros at the bottom and right to whole windows of
``attn.resolution`` (a map of exactly one window is not padded), cuts it into windows (row-major, image-major in
the batch) and runs ``CascadedGroupAttention`` on ``[B * windows, C, ws, ws]``. That module computes its heads one
after the other, each from its own channel group plus the previous head's output, each with its own softmax
``[B * windows, N, N]`` plus an attention bias: one call per head, stacked as the layer's heads
(:attr:`~..placement.Placement.heads_per_call`). Padding tokens are attended as keys at their cells of the
padded grid, beyond the image edge, and are no queries (``docs/definition.md``, windows).

``CascadedGroupAttention`` has no ``fused_attn`` switch (it always computes its softmax), so this family finds its
modules itself.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from ..module_index import named_module_list
from ..placement import CallContext, NotPlaceable, Placement
from .windows import PartitionPlacer, block_partition, nchw, parent_module


def _cascaded(module: nn.Module) -> bool:
    cls = type(module)
    return cls.__name__ == "CascadedGroupAttention" and cls.__module__.endswith(".efficientvit_msra")


def attention_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in named_module_list(model) if _cascaded(m)}


class _HeadPerCallPlacer(PartitionPlacer):
    """A window placement for calls ``[B * windows, N, N]`` of one head each."""

    def __init__(self, *args, heads: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.heads = heads

    def place(self, context: CallContext, lead: torch.Size, num_queries: int, num_keys: int) -> Placement:
        if len(lead) != 1:
            raise NotPlaceable(
                f"its softmax is [{', '.join(map(str, lead))}, {num_queries}, {num_keys}], expected one head per "
                "call: [B * windows, N, N]"
            )
        placement = super().place(context, torch.Size([*lead, self.heads]), num_queries, num_keys)
        # [B * windows, N, 2]: the call has no head dim.
        keys = placement.key_positions
        keys = None if keys is None else keys[:, 0]
        return replace(placement, positions=placement.positions[:, 0], key_positions=keys, heads_per_call=True)


def placer(model: nn.Module, name: str, module: nn.Module):
    if not _cascaded(module):
        return None
    window = parent_module(model, name)
    if type(window).__name__ != "LocalWindowAttention":
        return None

    def partition(grid):
        size = int(module.resolution)
        return block_partition(grid, (size, size)), f"window {size}x{size}, cascaded heads"

    return _HeadPerCallPlacer(model, name, window, nchw, partition, "windows in batch", heads=int(module.num_heads))
