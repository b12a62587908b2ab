"""timm's NesT (``timm.models.nest``): attention within square blocks of each level's map.

Each ``NestLevel`` pools the previous map (``ConvPool``, 2x), cuts it into ``block_size`` blocks (``blockify``:
blocks row-major, tokens row-major in each block) and runs its transformer layers on ``[B, T blocks, N, C]``, so
the attention is ``[B, heads, T, N, N]``. The level's map is the output of its ``pool``; its pixel stride is the
patch size times 2 per level.
"""

from __future__ import annotations

from torch import nn

from .windows import PartitionPlacer, block_partition, nchw


def placer(model: nn.Module, name: str, module: nn.Module):
    cls = type(module)
    if cls.__name__ != "Attention" or not cls.__module__.endswith(".nest"):
        return None
    parts = name.split(".")
    if len(parts) < 2 or parts[0] != "levels":
        return None
    level = model.get_submodule(".".join(parts[:2]))
    if type(level).__name__ != "NestLevel":
        return None

    def partition(grid):
        size = int(level.block_size)
        return block_partition(grid, (size, size)), f"block {size}x{size}"

    return PartitionPlacer(model, name, level.pool, nchw, partition, "windows after heads", output=True)
