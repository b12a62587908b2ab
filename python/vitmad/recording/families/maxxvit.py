"""timm's MaxViT, MaxxViT (v1, v2) and CoAtNet (``timm.models.maxxvit``).

- Block attention (``PartitionAttention2d`` / ``PartitionAttentionCl`` with ``partition_block``, and
  ``ParallelPartitionAttention.attn_block``): non-overlapping ``window_size`` windows of the stage's map.
- Grid attention (the same classes with ``partition_type='grid'``, ``ParallelPartitionAttention.attn_grid``): a
  ``grid_size`` (gh, gw) grid of tokens spread over the whole map: window ``(a, b)`` holds the token ``(i, j)`` at
  map row ``i * (H / gh) + a``, column ``j * (W / gw) + b`` (``grid_partition`` / ``grid_partition_nchw``).
- CoAtNet's transformer stages (``TransformerBlock2d``): ``Attention2d`` over the whole map of the stage (after
  the block's own 2x downsampling), with a relative position bias.

The attention (``Attention2d`` on NCHW windows, ``AttentionCl`` on channels-last ones) is ``[B * windows, heads,
N, N]``, windows image-major; each stage's map is read from the input of the partition block (or of the
attention itself for CoAtNet), and its pixel stride from ``feature_info`` (4, 8, 16, 32 for MaxViT; 16, 32 for
CoAtNet's transformer stages).
"""

from __future__ import annotations

from torch import nn

from .windows import PartitionPlacer, block_partition, grid_partition, nchw, nhwc, parent_module, whole_map

_ATTENTION = ("Attention2d", "AttentionCl")
_LAYOUTS = {"PartitionAttention2d": nchw, "PartitionAttentionCl": nhwc, "ParallelPartitionAttention": nhwc}


def _partition(holder: nn.Module, kind: str):
    """The partition of a block (``kind`` "block", "grid" or None: read ``holder.partition_block``)."""

    def partition(grid):
        size = tuple(int(s) for s in holder.partition_size)
        block = holder.partition_block if kind is None else kind == "block"
        if block:
            return block_partition(grid, size), f"window {size[0]}x{size[1]}"
        index = grid_partition(grid, size)
        step = (grid[0] // size[0], grid[1] // size[1])
        return index, f"grid {size[0]}x{size[1]}, dilated every {step[0]}x{step[1]}"

    return partition


def placer(model: nn.Module, name: str, module: nn.Module):
    cls = type(module)
    if cls.__name__ not in _ATTENTION or not cls.__module__.endswith(".maxxvit"):
        return None
    holder = parent_module(model, name)
    holder_name = type(holder).__name__
    if holder_name in ("PartitionAttention2d", "PartitionAttentionCl"):
        return PartitionPlacer(model, name, holder, _LAYOUTS[holder_name], _partition(holder, None),
                               "windows in batch")
    if holder_name == "ParallelPartitionAttention":
        kind = {"attn_block": "block", "attn_grid": "grid"}.get(name.rpartition(".")[2])
        if kind is not None:
            return PartitionPlacer(model, name, holder, nhwc, _partition(holder, kind), "windows in batch")
    if holder_name == "TransformerBlock2d" and cls.__name__ == "Attention2d":
        return PartitionPlacer(model, name, module, nchw, whole_map, "windows in batch")
    return None
