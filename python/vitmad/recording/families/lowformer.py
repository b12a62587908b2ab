"""timm's LowFormer (``timm.models.lowformer``): ``ConvAttention`` attends over its stage's map pooled by a
strided depthwise convolution, then upsamples the result back to the map.

The module takes the ``[B, C, H, W]`` map, makes ``h x w`` tokens with its ``conv_proj`` (kernel ``att_kernel``,
stride ``att_stride``), attends among them (queries and keys both, ``[B, heads, h * w, h * w]``) and upsamples
with a transposed convolution. Each token is an output of a strided convolution, so it sits at the centre of its
stride cell (docs/definition.md, "Beyond one grid"); the layer's grid is the pooled one, at ``att_stride`` times
the stage's stride (``feature_info``).
"""

from __future__ import annotations

import torch
from torch import nn

from ..placement import CallContext, Placement
from .stages import defined_in, grid_placement, pair, strided_module_centres
from .windows import InputMapPlacer

__all__ = ["placer"]


class PooledMapPlacer(InputMapPlacer):
    """Attention among the tokens ``pool`` (a strided convolution) makes from the module's input map."""

    def __init__(self, model: nn.Module, name: str, module: nn.Module, pool: nn.Conv2d):
        super().__init__(model, name, module)
        self.pool = pool

    def place(self, context: CallContext, lead: torch.Size, num_queries: int, num_keys: int) -> Placement:
        grid, stride = self.stage(context)
        pooled, centres = strided_module_centres(grid, stride, self.pool)
        sy, sx = pair(self.pool.stride)
        kh, kw = pair(self.pool.kernel_size)
        words = "global" if (sy, sx) == (1, 1) else f"global over the map pooled {kh}x{kw}, stride {sy}x{sx}"
        return grid_placement(lead, num_queries, num_keys, grid=pooled, stride=(stride[0] * sy, stride[1] * sx),
                              attention=words, queries=centres)


def placer(model: nn.Module, name: str, module: nn.Module):
    if not defined_in(module, "ConvAttention", "lowformer"):
        return None
    return PooledMapPlacer(model, name, module, module.conv_proj.conv)
