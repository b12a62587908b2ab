"""timm's iFormer (``timm.models.iformer``): single-head modulation attention (``SHMA``) over a stage's map.

``SHMA`` takes the ``[B, C, H, W]`` map itself and attends with one head over all of it, flattened row-major,
or, with ``window_size > 0``, inside ``window_size`` blocks of the map zero-padded at the bottom and right
(windows image-major in the batch, row-major; the padding, unmasked, is a key at its cell of the padded grid and
no query: docs/definition.md, windows). On the fused path the attention is ``[B, 1, N, N]``; with
``fused_attn=False`` it is ``[B, N, N]``, without a head dimension. The map's stride is its stage's reduction
in ``feature_info``.
"""

from __future__ import annotations

import torch
from torch import nn

from ..placement import CallContext, LayerPlacer, Placement
from .stages import defined_in
from .windows import PartitionPlacer, block_partition, nchw, whole_map

__all__ = ["placer"]


class SingleHeadPlacer(LayerPlacer):
    """A single-head layer whose explicit attention has no head dimension (``[B, N, N]``): placed as
    ``[B, 1, N, N]`` by ``inner``."""

    def __init__(self, inner: LayerPlacer):
        self.inner = inner

    def install(self, context: CallContext) -> list[torch.utils.hooks.RemovableHandle]:
        return self.inner.install(context)

    def place(self, context: CallContext, lead: torch.Size, num_queries: int, num_keys: int) -> Placement:
        if len(lead) != 1:
            return self.inner.place(context, lead, num_queries, num_keys)
        placement = self.inner.place(context, torch.Size([*lead, 1]), num_queries, num_keys)
        fold = placement.fold
        key_positions = placement.key_positions
        return Placement(placement.positions.squeeze(-3),
                         None if key_positions is None else key_positions.squeeze(-3),
                         lambda values: fold(values.unsqueeze(-2)), placement.geometry,
                         padded_keys=placement.padded_keys)


def placer(model: nn.Module, name: str, module: nn.Module):
    if not defined_in(module, "SHMA", "iformer"):
        return None

    def partition(grid):
        size = int(module.window_size or 0)
        if size <= 0:
            return whole_map(grid)
        return block_partition(grid, (size, size)), f"window {size}x{size}"

    return SingleHeadPlacer(PartitionPlacer(model, name, module, nchw, partition, "windows in batch"))
