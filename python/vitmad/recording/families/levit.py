"""LeViT (timm ``levit_*`` and ``levit_conv_*``): attention on a fixed 2-D token grid, queries subsampled by 2.

``Attention`` attends over its ``resolution`` grid (tokens ``[B, N, C]``, or a ``[B, C, H, W]`` map in the conv
variants) with a learned attention bias, so the grid is fixed by the image size the model was built for.
``AttentionDownsample`` takes its queries at every ``stride``-th row and column of the grid (``x[:, ::2, ::2]``,
or a 1x1 / 3x3 average pool of stride 2 in the conv variants: ``ceil(n / 2)`` of them either way) and its keys
from the whole grid. The subsampling is a strided operation: query ``i`` sits at the centre of its stride cell,
``(i + 0.5) * 2`` cells of the grid (docs/definition.md, "Beyond one grid"), where the next stage's token ``i``
sits, not on the cell ``2 i`` it reads. The grid's stride is the stem's (16 px, or 8 in ``*_s8``) times 2 per
downsampling before it.

transformers' ``LevitModel`` has the same layers: ``LevitAttention`` over a square grid of ``len_points`` tokens
and ``LevitAttentionSubsample``, whose ``LevitSubsample`` takes every ``stride``-th row and column of its
``resolution`` grid; its stem is four convolutions of stride 2.

These modules have no ``fused_attn`` switch, so :func:`attention_modules` finds them.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..module_index import module_list, named_module_list
from ..placement import CallContext, LayerPlacer, Placement, cell_centres
from .stages import defined_in, grid_placement, pair, strided_centres

__all__ = ["placer", "attention_modules"]

_CLASSES = (("Attention", "levit"), ("AttentionDownsample", "levit"),
            ("LevitAttention", "modeling_levit"), ("LevitAttentionSubsample", "modeling_levit"))


def _is_levit_attention(module: nn.Module) -> bool:
    return any(defined_in(module, name, suffix) for name, suffix in _CLASSES)


def _grid_and_step(module: nn.Module) -> tuple[tuple[int, int], int | None]:
    """The grid a LeViT attention attends over and the step of its query subsampling (None: none)."""
    if defined_in(module, "LevitAttention", "modeling_levit"):
        side = math.isqrt(module.len_points)
        return (side, side), None
    if defined_in(module, "LevitAttentionSubsample", "modeling_levit"):
        subsample = module.queries_subsample
        return pair(subsample.resolution), int(subsample.stride)
    return pair(module.resolution), getattr(module, "stride", None)


def attention_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in named_module_list(model) if _is_levit_attention(m)}


def _input_strides(model: nn.Module) -> dict[int, tuple[float, float]]:
    """Per attention module (by id), the pixel stride of its grid: the stem's convolutions' strides times the
    strides of the downsampling attention layers before it (they run in module order)."""
    levit = next((m for m in module_list(model) if any(defined_in(m, name, suffix) for name, suffix in (
        ("Levit", "levit"), ("LevitDistilled", "levit"), ("LevitModel", "modeling_levit")))), model)
    stride = (1.0, 1.0)
    stem = levit.stem if hasattr(levit, "stem") else levit.patch_embeddings
    for conv in module_list(stem):
        if isinstance(conv, nn.Conv2d):
            step = pair(conv.stride)
            stride = (stride[0] * step[0], stride[1] * step[1])
    strides = {}
    for module in module_list(levit):
        if _is_levit_attention(module):
            strides[id(module)] = stride
            step = _grid_and_step(module)[1]
            if step is not None:
                stride = (stride[0] * step, stride[1] * step)
    return strides


class LevitPlacer(LayerPlacer):
    def __init__(self, module: nn.Module, stride: tuple[float, float]):
        self.module, self.stride = module, stride

    def place(self, context: CallContext, lead: torch.Size, num_queries: int, num_keys: int) -> Placement:
        stride = self.stride
        grid, step = _grid_and_step(self.module)
        if step is None:
            return grid_placement(lead, num_queries, num_keys, grid=grid, stride=stride, attention="global")
        keys = cell_centres(*grid, stride).reshape(-1, 2)
        # x[:, ::step, ::step] (or a pool of stride `step`): a strided operation, placed by its stride cells.
        query_grid, queries = strided_centres(grid, stride, 1, step, 0)
        return grid_placement(lead, num_queries, num_keys, grid=query_grid,
                              stride=(stride[0] * step, stride[1] * step),
                              attention=f"global; queries subsampled, stride {step}", queries=queries, keys=keys)


def placer(model: nn.Module, name: str, module: nn.Module):
    if not _is_levit_attention(module):
        return None
    return LevitPlacer(module, _input_strides(model)[id(module)])
