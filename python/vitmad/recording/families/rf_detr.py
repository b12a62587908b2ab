"""RF-DETR's DINOv2 backbone (transformers ``RfDetrDinov2Backbone``, the backbone of ``RfDetrForObjectDetection``).

With ``num_windows = S > 1`` the embeddings cut the image's patches into ``S x S`` windows and give each window a
copy of the class token (``window_partition``): ``[B * S * S, 1 + n, C]``, each window's sequence its class token
copy, then its ``n`` patches. A window block attends within each of those sequences, ``[B * S * S, heads, 1 + n,
1 + n]``; a global block (``window_unpartition_before_attention``) joins an image's windows into one sequence,
``[B, heads, S * S * (1 + n), ...]``: class token copy, window (0, 0)'s patches, class token copy, window (0, 1)'s
patches, ... . Placed as a plain ViT, a global block's MAD was up to 29 % off, silently (its ``S * S`` class token
copies taken for prefix tokens before a row-major grid). The copies diverge after the first block (each attends
to its own window), so each is a token of its own, without a position.

The partition is rebuilt here from ``num_windows`` and the grid the patch projection returns in each call (the
model's own code is not called). The model reads its ``gh x gw`` row-major patches as if the map were ``gw x gh``
(its ``view`` takes the width's window side for the rows) and cuts that into ``S x S`` blocks: on a square map the
windows are the map's ``S x S`` blocks; on a non-square map each "window" is a set of patch runs scattered over the
image, and each token is placed at the cell its patch (and its position embedding) came from, which is what the
attention saw. (The backbone's output reassembles the map as blocks, which disagrees with that partition on a
non-square map; vitmad measures the attention, not the output.) A map that does not divide into the windows is
refused, as the model's own ``view`` fails on it.

Statistics beside the distance, with class token copies:

- prefix mass: the attention on the tokens without a position, i.e. on the class token copies the query sees:
  its window's copy in a window block, all ``S * S`` copies in a global block.
- prefix maps: the rows of the class token copies over the patches, folded onto the row-major grid. A window
  block has one row per image: at each patch, the attention the copy of that patch's window puts on it (the copies
  tile the map, so the row sums to up to ``S * S``, one per window). A global block has ``S * S`` rows, one per
  copy in window order (row-major over windows), each over the whole map. The layers' geometry counts no prefix
  tokens (``num_prefix_tokens=None``), so the recorder keeps every row without a position: counting one would
  keep the first copy alone and drop the others as padding slots. With ``S = 1`` the sequence is the plain
  layout (the class token, then the row-major grid) and the geometry says so (``num_prefix_tokens=1``).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..placement import CallContext, LayerGeometry, LayerPlacer, NotPlaceable, Placement, RefusingPlacer, on_device
from .stages import backbone_layer, defined_in
from .windows import block_partition, nchw, stage_stride

__all__ = ["placer", "window_cells"]


def placer(model: nn.Module, name: str, module: nn.Module):
    if not defined_in(module, "RfDetrDinov2Attention", "modeling_rf_detr"):
        return None
    backbone, layer = backbone_layer(model, name, "RfDetrDinov2Backbone", "modeling_rf_detr")
    if backbone is None or layer is None or not hasattr(layer, "global_attention"):
        # Its embeddings (which cut the windows and copy the class token) are outside the recorded model.
        return RefusingPlacer(
            "it is an RF-DETR DINOv2 attention recorded without the RfDetrDinov2Backbone that embeds its tokens "
            "(windows, each with its own class token copy), so their layout is unknown; record the backbone or "
            "the detector that holds it"
        )
    return _BackbonePlacer(model, name, backbone, layer)


def window_cells(grid: tuple[int, int], side: int) -> torch.Tensor:
    """``[side * side, n, 2]`` (row, column) cells of each window's patches in the model's order.

    The model views the row-major ``gh x gw`` patches as ``[side, gw / side, side, gh / side]`` and swaps the
    middle dims: the row-major ``gw x gh`` reading of the sequence cut into ``side x side`` blocks. Token ``(R,
    C)`` of that reading is patch ``R * gh + C`` of the sequence, at cell ``(that // gw, that % gw)``.
    """
    gh, gw = grid
    if gh % side or gw % side:
        raise NotPlaceable(f"its {gh}x{gw} patch map does not divide into {side}x{side} windows")
    read = block_partition((gw, gh), (gw // side, gh // side))
    patch = read[..., 0] * gh + read[..., 1]
    return torch.stack([patch // gw, patch % gw], dim=-1)


class _BackbonePlacer(LayerPlacer):
    """Places a window or global block of the backbone on the partition of the grid its patch projection returned
    in this call (read by a hook on ``embeddings.patch_embeddings.projection``)."""

    def __init__(self, model: nn.Module, name: str, backbone: nn.Module, layer: nn.Module):
        self.model, self.name, self.backbone, self.layer = model, name, backbone, layer
        self.key = f"rf_detr.grid.{name}"
        # The latest placement, reused while the call's shape, grid and windows stay the same.
        self._cached: tuple[tuple, Placement] | None = None

    def install(self, context: CallContext) -> list[torch.utils.hooks.RemovableHandle]:
        def see(module, args, output) -> None:
            context.values[self.key] = nchw(output) if isinstance(output, torch.Tensor) else None

        return [self.backbone.embeddings.patch_embeddings.projection.register_forward_hook(see)]

    def place(self, context: CallContext, lead: torch.Size, num_queries: int, num_keys: int) -> Placement:
        seen = context.values.get(self.key)
        if seen is None:
            raise NotPlaceable("its backbone's patch projection did not return a [B, C, H, W] map before it ran")
        batch, *grid = seen
        grid = (int(grid[0]), int(grid[1]))
        config = self.backbone.embeddings.config
        side, windowed = int(config.num_windows), not bool(self.layer.global_attention)
        if not windowed and int(self.layer.num_windows) != side:
            raise NotPlaceable(
                f"its block joins {self.layer.num_windows}x{self.layer.num_windows} windows, but the embeddings cut "
                f"{side}x{side} (num_windows changed after the model was built?)"
            )
        stride = stage_stride(self.model, self.name, context.image_size, grid, int(config.patch_size))
        key = (grid, stride, side, windowed, batch, tuple(lead), num_queries, num_keys)
        if self._cached is None or self._cached[0] != key:
            self._cached = key, _placement(grid, stride, side, windowed, batch, lead, num_queries, num_keys)
        return self._cached[1]


def _placement(grid: tuple[int, int], stride: tuple[float, float], side: int, windowed: bool, batch: int,
               lead: torch.Size, num_queries: int, num_keys: int) -> Placement:
    cells = window_cells(grid, side)
    windows, size = side * side, cells.shape[1]
    if side == 1:  # one window, the whole map: the plain layout, whichever kind the block is
        attention = "global"
    elif windowed:
        attention = f"window {'' if grid[0] == grid[1] else 'of '}{_describe(grid, side)}, each with its own class " \
                    "token copy"
    else:
        attention = f"global, over {side}x{side} windows of {_describe(grid, side)}, each with its own class token copy"
    rows, length = (batch * windows, 1 + size) if windowed else (batch, windows * (1 + size))
    shape = [int(d) for d in lead]
    if len(shape) != 2 or shape[0] != rows or num_queries != length or num_keys != length:
        raise NotPlaceable(
            f"its attention is [{', '.join(map(str, shape))}, {num_queries}, {num_keys}], expected [{rows}, heads, "
            f"{length}, {length}] ({attention}, over a {grid[0]}x{grid[1]} patch map, batch of {batch})"
        )
    heads = shape[1]
    centres = ((cells.double() + 0.5) * torch.tensor(stride, dtype=torch.float64)).float()
    copy = torch.full((windows, 1, 2), float("nan"))
    per_window = torch.cat([copy, centres], dim=1)  # [windows, 1 + n, 2]: each window's class token copy first
    positions = per_window.view(windows, 1, length, 2).repeat(batch, 1, 1, 1) if windowed \
        else per_window.reshape(length, 2)
    # Where each cell of the row-major grid is among an image's window-major patches.
    flat = cells.reshape(-1, 2)
    inverse = torch.empty(grid[0] * grid[1], dtype=torch.long)
    inverse[flat[:, 0] * grid[1] + flat[:, 1]] = torch.arange(flat.shape[0])

    def fold(values: torch.Tensor) -> torch.Tensor:
        if windowed:
            values = values.reshape(batch, windows, heads, 1 + size).transpose(1, 2)
        values = values.reshape(batch, heads, windows, 1 + size)[..., 1:].reshape(batch, heads, windows * size)
        return values.index_select(-1, on_device(inverse, values.device))

    # Counting no prefix tokens keeps every copy's row in the prefix maps (one counted would keep the first copy's
    # alone, the others taken for padding slots); one window is the plain layout, its class token first.
    geometry = LayerGeometry(grid, stride, attention, heads, num_prefix_tokens=1 if side == 1 else None)
    return Placement(positions, None, fold, geometry)


def _describe(grid: tuple[int, int], side: int) -> str:
    gh, gw = grid
    if gh == gw:
        return f"{gh // side}x{gw // side}"
    # Not blocks of the image: the model cuts the gw x gh reading of its row-major patches.
    return (f"{math.prod(grid) // (side * side)} patches (blocks of the {gh}x{gw} map's patches read row-major as "
            f"{gw}x{gh}: scattered over the image)")
