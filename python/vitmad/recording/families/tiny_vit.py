"""timm's TinyViT (``timm.models.tiny_vit``): window attention with an attention bias, padded windows.

Each ``TinyVitBlock`` pads its ``[B, H, W, C]`` map with zeros at the bottom and right to whole ``window_size``
windows, cuts it into windows (row-major, image-major in the batch; a map of exactly one window is not padded)
and runs ``Attention`` on ``[B * windows, N, C]``: ``[B * windows, heads, N, N]``. Padding tokens are attended
as keys at their cells of the padded grid, beyond the image edge, and are no queries (``docs/definition.md``,
windows). Stage 0 is convolutional; the attention stages have strides 8, 16, 32.
"""

from __future__ import annotations

from torch import nn

from .windows import PartitionPlacer, block_partition, nhwc, parent_module


def placer(model: nn.Module, name: str, module: nn.Module):
    cls = type(module)
    if cls.__name__ != "Attention" or not cls.__module__.endswith(".tiny_vit"):
        return None
    block = parent_module(model, name)
    if type(block).__name__ != "TinyVitBlock":
        return None

    def partition(grid):
        size = int(block.window_size)
        return block_partition(grid, (size, size)), f"window {size}x{size}"

    return PartitionPlacer(model, name, block, nhwc, partition, "windows in batch")
