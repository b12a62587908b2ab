"""timm's NesT (``timm.models.nest``): attention within square blocks of each level's map.

Each ``NestLevel`` pools the previous map (``ConvPool``, 2x), cuts it into ``block_size`` blocks (``blockify``:
blocks row-major, tokens row-major in each block) and runs its transformer layers on ``[B, T blocks, N, C]``, so
the attention is ``[B, heads, T, N, N]``. The level's map is the output of its ``pool``; its pixel stride is the
patch size times 2 per level.
"""

from __future__ import annotations

from torch import nn

from ..module_index import enclosing_modules
from .windows import PartitionPlacer, block_partition, nchw


def placer(model: nn.Module, name: str, module: nn.Module):
    cls = type(module)
    if cls.__name__ != "Attention" or not cls.__module__.endswith(".nest"):
        return None
    # The level holding the layer: the nearest NestLevel above it. The Nest may sit inside a user's module (QA 331:
    # a wrapped NesT fell through to the plain layout's refusal), and timm's features_only wrapper renames its levels
    # levels_<i> (QA 334).
    level = next((owner for _, owner in enclosing_modules(model, name) if type(owner).__name__ == "NestLevel"
                  and type(owner).__module__ == cls.__module__), None)
    if level is None:
        return None

    def partition(grid):
        size = int(level.block_size)
        return block_partition(grid, (size, size)), f"block {size}x{size}"

    return PartitionPlacer(model, name, level.pool, nchw, partition, "windows after heads", output=True)
