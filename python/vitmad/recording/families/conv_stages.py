"""Attention inside convolutional hierarchies: NextViT's E-MHSA and Visformer's attention stages.

- NextViT (timm ``nextvit_*``): ``EfficientAttention`` runs on the flattened ``[B, C, H, W]`` map of its block;
  with ``sr_ratio > 1`` its keys are ``AvgPool1d(sr_ratio ** 2)`` over that sequence: each key averages
  ``sr_ratio ** 2`` consecutive tokens in row-major order (along a row, or running on into the next one), and
  sits at the centroid of their cells. This pooling runs over the flattened sequence, not over the 2-D grid,
  so its output has no 2-D stride cell to sit in (the rule for strided 2-D operations, docs/definition.md):
  where a window runs on into the next row, the centroid is the one point that stands for the cells it
  averages; where it lies within a row, it is the centre of its 1-D stride cell anyway.
- Visformer (timm ``visformer_*``): ``Attention`` over the whole ``[B, C, H, W]`` map of its stage.

The grid is the output of the latest strided convolution or pool that ran (stem, patch embeddings, the
blocks' downsampling poolings) and its stride the product of theirs (:class:`.stages.StageGrid`).
"""

from __future__ import annotations

import torch
from torch import nn

from ..module_index import module_list
from ..placement import NotPlaceable, cell_centres, without_owner
from .stages import KeyLayout, StageGrid, StagePlacer, defined_in, global_keys, owner_or_features, strided_modules

__all__ = ["placer"]


def _sequence_pooled_keys(pool: nn.AvgPool1d) -> KeyLayout:
    kernel, step, padding = int(pool.kernel_size[0]), int(pool.stride[0]), int(pool.padding[0])

    def keys(grid, stride):
        if padding != 0 or pool.ceil_mode:
            raise NotPlaceable(f"its keys are an AvgPool1d with padding {padding} and ceil_mode={pool.ceil_mode}; "
                               "vitmad places only unpadded, floor-mode sequence pooling")
        cells = cell_centres(*grid, stride, dtype=torch.float64).reshape(-1, 2)
        windows = cells.unfold(0, kernel, step)  # [Nk, 2, kernel]: the cells each key averages
        return windows.mean(-1).float(), f"keys: means of {kernel} consecutive tokens (row-major)"

    return keys


def placer(model: nn.Module, name: str, module: nn.Module):
    if defined_in(module, "EfficientAttention", "nextvit"):
        owner = owner_or_features(model, "NextViT", "nextvit")
        if owner is None:
            return without_owner("NextViT")
        attention = tuple(m for m in module_list(owner) if defined_in(m, "EfficientAttention", "nextvit"))
        keys = global_keys if module.sr is None else _sequence_pooled_keys(module.sr)
        return StagePlacer(StageGrid(model, strided_modules(owner, attention)), keys)
    if defined_in(module, "Attention", "visformer"):
        owner = owner_or_features(model, "Visformer", "visformer")
        if owner is None:
            return without_owner("Visformer")
        return StagePlacer(StageGrid(model, strided_modules(owner)))
    return None
