"""timm's ``MultiQueryAttention2d`` (MobileNetV4 hybrids, MobileNetV5): attention on a stage's feature map with
one key and value head shared by every query head, keys and values pooled by a strided depthwise convolution
(``kv_stride``), queries optionally pooled by an average pool (``query_strides``).

The module attends over its input map ``[B, C, H, W]``: each query is a cell of that map (or of its
``query_strides`` average pool, kernel = stride: the centre of the cells it pools), each key a cell of the
``kv_stride`` convolution's output, at the centre of its stride cell (docs/definition.md, "Beyond one grid"),
whatever the kernel and padding; a TensorFlow-style "same" padding (``Conv2dSame``, a ``padding='same'`` pool)
gives ``ceil(n / stride)`` outputs. The map's pixel stride is the product of the strides of the convolutions
before the module (timm's ``feature_info`` lists only some of these models' stages), checked against each call.
"""

from __future__ import annotations

import torch
from torch import nn

from ..placement import CallContext, Placement, cell_centres
from .stages import defined_in, grid_placement, pair, reduction_before, strided_centres
from .windows import InputMapPlacer

__all__ = ["placer"]


def _pooled(grid: tuple[int, int], stride: tuple[float, float], pool: nn.Module | None):
    """(grid, [n, 2] centres, step) of the tokens ``pool`` (a strided convolution or average pool, or None: the
    map itself) makes from a ``grid`` of ``stride``-pixel cells."""
    if pool is None:
        return grid, cell_centres(*grid, stride).reshape(-1, 2), (1, 1)
    step = pair(pool.stride)
    if type(pool).__name__ in ("Conv2dSame", "AvgPool2dSame") or isinstance(getattr(pool, "padding", 0), str):
        # TensorFlow "same" padding: ceil(n / step) outputs, whatever the kernel.
        out, centres = strided_centres(grid, stride, 1, step, 0, ceil_mode=True)
    else:
        out, centres = strided_centres(grid, stride, pool.kernel_size, step, pool.padding,
                                       getattr(pool, "dilation", 1), bool(getattr(pool, "ceil_mode", False)))
    return out, centres, step


class MultiQueryPlacer(InputMapPlacer):
    def place(self, context: CallContext, lead: torch.Size, num_queries: int, num_keys: int) -> Placement:
        grid, stride = self.stage(context)
        module = self.module
        query_grid, queries, q_step = _pooled(grid, stride, getattr(module.query, "down_pool", None))
        _, keys, kv_step = _pooled(grid, stride, getattr(module.key, "down_conv", None))
        words = "global, one shared key head"
        if kv_step != (1, 1):
            words += f"; keys pooled by a stride-{kv_step[0]}x{kv_step[1]} convolution"
        if q_step != (1, 1):
            words += f"; queries pooled {q_step[0]}x{q_step[1]}"
        # Neither side pooled (kv_stride 1, no query stride): the keys are the queries' own cells, and
        # grid_placement measures the self mass.
        return grid_placement(lead, num_queries, num_keys, grid=query_grid,
                              stride=(stride[0] * q_step[0], stride[1] * q_step[1]), attention=words,
                              queries=queries, keys=keys)


def placer(model: nn.Module, name: str, module: nn.Module):
    if not defined_in(module, "MultiQueryAttention2d", "attention2d"):
        return None
    return MultiQueryPlacer(model, name, module, reduction_before(model, module, inside=(type(module),)))
