"""LW-DETR's ViT backbone (transformers ``LwDetrViTBackbone``, the backbone of ``LwDetrForObjectDetection``).

The backbone cuts its patch map into ``num_windows_side x num_windows_side`` windows before its first block and keeps
the tokens in that order throughout: windows row-major, each window's tokens row-major. Its window blocks
(``window_block_indices``) attend within each window, ``[B * num_windows, heads, n, n]``; its global blocks only
join an image's windows into one sequence, ``[B, heads, num_windows * n, ...]``, so they attend over the whole map
in window-major order, not in the row-major order a plain ViT has (placed as a plain ViT, a global block's MAD
was 2 to 4 % off, silently). Both are placed on that partition of the map the embeddings return, at the patch
stride; a map that does not divide into the windows is refused (the model's own reshape fails on it too).
"""

from __future__ import annotations

from torch import nn

from ..placement import NotPlaceable
from .stages import backbone_layer, defined_in
from .windows import PartitionPlacer, block_partition, nchw

__all__ = ["placer"]


def placer(model: nn.Module, name: str, module: nn.Module):
    if not defined_in(module, "LwDetrViTAttention", "modeling_lw_detr"):
        return None
    backbone, layer = backbone_layer(model, name, "LwDetrViTBackbone", "modeling_lw_detr")
    if backbone is None or layer is None or not hasattr(layer, "window"):
        return None
    side, windowed = int(backbone.config.num_windows_side), bool(layer.window)

    def partition(grid: tuple[int, int]):
        if grid[0] % side or grid[1] % side:
            raise NotPlaceable(f"its {grid[0]}x{grid[1]} patch map does not divide into {side}x{side} windows")
        window = (grid[0] // side, grid[1] // side)
        cells = block_partition(grid, window)
        if windowed:
            return cells, f"window {window[0]}x{window[1]}"
        return cells.reshape(1, -1, 2), f"global, in the order of {side}x{side} windows of {window[0]}x{window[1]}"

    return PartitionPlacer(model, name, backbone.embeddings, nchw, partition, "windows in batch", output=True,
                           reduction=int(backbone.config.patch_size))
