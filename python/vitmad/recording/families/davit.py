"""timm's DaViT (``timm.models.davit``): spatial window attention; its channel attention is skipped
(:mod:`.non_spatial`).

Each ``SpatialBlock`` pads its ``[B, C, H, W]`` map with zeros at the bottom and right to whole ``window_size``
windows (no shift), cuts it into windows (row-major, image-major in the batch) and runs ``WindowAttention``:
``[B * windows, heads, N, N]``. Padding tokens are attended as keys at their cells of the padded grid, beyond the
image edge, and are no queries (``docs/definition.md``, windows).
"""

from __future__ import annotations

from torch import nn

from ..module_index import named_module_list
from .windows import PartitionPlacer, block_partition, nchw, parent_module


def attention_modules(model: nn.Module) -> dict[str, nn.Module]:
    """DaViT's channel attention (no ``fused_attn`` switch, so the generic discovery misses it), to list it as
    skipped."""
    return {name: m for name, m in named_module_list(model)
            if type(m).__name__ in ("ChannelAttention", "ChannelAttentionV2") and type(m).__module__.endswith(".davit")}


def placer(model: nn.Module, name: str, module: nn.Module):
    cls = type(module)
    if cls.__name__ != "WindowAttention" or not cls.__module__.endswith(".davit"):
        return None
    block = parent_module(model, name)
    if type(block).__name__ != "SpatialBlock":
        return None

    def partition(grid):
        size = tuple(int(s) for s in block.window_size)
        return block_partition(grid, size), f"window {size[0]}x{size[1]}"

    return PartitionPlacer(model, name, block, nchw, partition, "windows in batch")
