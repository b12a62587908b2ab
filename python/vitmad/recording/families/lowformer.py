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

from ..placement import CallContext, LayerPlacer, NotPlaceable, Placement
from .stages import defined_in, grid_placement, pair, strided_module_centres
from .windows import stage_stride

__all__ = ["placer"]


class PooledMapPlacer(LayerPlacer):
    """Attention among the tokens ``pool`` (a strided convolution) makes from the module's input map."""

    def __init__(self, model: nn.Module, name: str, module: nn.Module, pool: nn.Conv2d):
        self.model, self.name, self.module, self.pool = model, name, module, pool
        self.key = f"lowformer.map.{name}"

    def install(self, context: CallContext) -> list[torch.utils.hooks.RemovableHandle]:
        def see(module, args) -> None:
            x = args[0] if args else None
            context.values[self.key] = tuple(x.shape[-2:]) if isinstance(x, torch.Tensor) and x.dim() == 4 else None

        return [self.module.register_forward_pre_hook(see)]

    def place(self, context: CallContext, lead: torch.Size, num_queries: int, num_keys: int) -> Placement:
        grid = context.values.get(self.key)
        if grid is None:
            raise NotPlaceable("its input was not a [B, C, H, W] feature map")
        grid = (int(grid[0]), int(grid[1]))
        stride = stage_stride(self.model, self.name, context.image_size, grid)
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
