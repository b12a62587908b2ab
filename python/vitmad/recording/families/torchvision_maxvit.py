"""torchvision's MaxViT (``torchvision.models.maxvit_t`` and ``MaxVit``): block and grid attention.

Each ``MaxVitLayer`` runs an MBConv, then two ``PartitionAttentionLayer``s on the stage's ``[B, C, H, W]`` map,
whose ``RelativePositionalMultiHeadAttention`` computes softmax attention ``[B, G, heads, P, P]``: the windows
sit between the batch and the heads, not folded into the batch as in timm.

- ``partition_type="window"``: ``WindowPartition`` cuts the map into ``p x p`` blocks (``p`` the partition size),
  blocks row-major over the map, tokens row-major within a block: timm's block partition.
- ``partition_type="grid"``: the same cut into ``P x P`` blocks with ``P = grid_h / partition size`` (the layer's
  ``p``), then the block and token axes swapped: window ``(a, b)`` (an offset inside a block, row-major) holds
  token ``(i, j)`` (a block, row-major) at map row ``i * P + a``, column ``j * P + b``: timm's dilated grid.

The map's pixel stride is the product of the strides of the convolutions before the layer (the stem's, and each
stage's first depthwise convolution), checked against the image in each call.
"""

from __future__ import annotations

from torch import nn

from .stages import innermost_on_path, reduction_before
from .windows import PartitionPlacer, block_partition, grid_partition, nchw, parent_module

_MODULE = "torchvision.models.maxvit"


def _is(module: nn.Module | None, name: str) -> bool:
    return module is not None and type(module).__module__ == _MODULE and type(module).__name__ == name


def _partition(layer: nn.Module):
    def partition(grid):
        step = int(layer.p)
        if layer.partition_type == "window":
            return block_partition(grid, (step, step)), f"window {step}x{step}"
        cells = (grid[0] // step, grid[1] // step)
        return grid_partition(grid, cells), f"grid {cells[0]}x{cells[1]}, dilated every {step}x{step}"

    return partition


def placer(model: nn.Module, name: str, module: nn.Module):
    if not _is(module, "RelativePositionalMultiHeadAttention"):
        return None
    holder = parent_module(model, name)  # the attn_layer Sequential
    layer = None if holder is None else parent_module(model, name.rpartition(".")[0])
    if not _is(layer, "PartitionAttentionLayer"):
        return None
    # The convolutions before the layer in the MaxVit holding it, not in a user's module around it (a head declared
    # before it, a CNN beside it: their strides were counted, QA 334).
    found = innermost_on_path(model, name, lambda m: _is(m, "MaxVit"))
    return PartitionPlacer(model, name, layer, nchw, _partition(layer), "windows before heads",
                           reduction=reduction_before(model if found is None else found[1], layer))
