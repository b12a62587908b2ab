"""EfficientFormer (timm ``efficientformer_l*``) and EfficientFormerV2 (``efficientformerv2_*``).

- V1 ``Attention``: global attention over the last stage's grid, flattened (``[B, N, C]``), with a learned bias
  of its fixed ``resolution``.
- V2 ``Attention2d``: attention over a ``[B, C, H, W]`` map; in stage 3 it first subsamples the map with a
  depthwise convolution of stride 2 (``stride_conv``): queries and keys are then the tokens of that
  convolution, each at the centre of its 2x2 stride cell (a strided operation, docs/definition.md: not at the
  centre of its 3x3 window). Its talking heads mix the heads before and after the
  softmax: the MAD is that of each head's softmax.
- V2 ``Attention2dDownsample`` (the last stage's downsampling): queries from a stride-2 convolution plus a
  stride-2 pool of the grid (both read around cells ``0, 2, 4, ...``); as the output of a strided operation,
  query ``i`` sits at the centre of its stride cell, cells ``2 i`` and ``2 i + 1``, where the next stage's token
  ``i`` sits; keys the whole grid.

The grid's pixel stride is the product of the strides of the stem's and the downsampling layers' convolutions
before the module (a downsampling attention reads the grid its sibling convolution downsamples). These modules
have no ``fused_attn`` switch, so :func:`attention_modules` finds them.
"""

from __future__ import annotations

import torch
from torch import nn

from ..module_index import module_list, named_module_list
from ..placement import CallContext, LayerPlacer, NotPlaceable, Placement, cell_centres, without_owner
from .stages import defined_in, features_wrapper, grid_placement, pair, strided_module_centres

__all__ = ["placer", "attention_modules"]

_CLASSES = (("Attention", "efficientformer"), ("Attention2d", "efficientformer_v2"),
            ("Attention2dDownsample", "efficientformer_v2"))
_MODELS = (("EfficientFormer", "efficientformer"), ("EfficientFormerV2", "efficientformer_v2"))


def _is_attention(module: nn.Module) -> bool:
    return any(defined_in(module, *c) for c in _CLASSES)


def attention_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in named_module_list(model) if _is_attention(m)}


def _owner(model: nn.Module) -> nn.Module | None:
    """The EfficientFormer (v1 or v2) in ``model``, or timm's features_only wrapper of it, or None."""
    return next((m for m in module_list(model) if any(defined_in(m, *c) for c in _MODELS)), None) \
        or features_wrapper(model)


def _input_strides(owner: nn.Module) -> dict[int, tuple[float, float]]:
    """Per attention module (by id) of ``owner`` (:func:`_owner`), the pixel stride of the grid it reads."""
    stride, before, strides, inside = (1.0, 1.0), {}, {}, []
    for name, module in named_module_list(owner):
        if any(name.startswith(outer + ".") for outer in inside):
            continue  # an attention's own convolutions subsample its tokens, not the model's grid
        if _is_attention(module):
            inside.append(name)
            parent = name.rpartition(".")[0] + "."
            # A downsampling attention reads the input of its sibling convolution, which runs before it.
            sibling = [s for n, s in before.items() if n.startswith(parent)]
            strides[id(module)] = sibling[-1] if defined_in(module, *_CLASSES[2]) and sibling else stride
        elif isinstance(module, nn.Conv2d) and pair(module.stride) != (1, 1):
            before[name] = stride
            step = pair(module.stride)
            stride = (stride[0] * step[0], stride[1] * step[1])
    return strides


class EfficientFormerPlacer(LayerPlacer):
    """Args: the attention module, the stride of its grid, and the module whose ``[B, C, H, W]`` input is that
    grid (the attention itself, or V1's ``Flat`` before the flattened stage)."""

    def __init__(self, module: nn.Module, stride: tuple[float, float], grid_input: nn.Module):
        self.module, self.stride, self.grid_input = module, stride, grid_input
        self.key = ("efficientformer.grid", id(module))

    def install(self, context: CallContext) -> list[torch.utils.hooks.RemovableHandle]:
        def see(module, args) -> None:
            if args[0].dim() == 4:
                context.values[self.key] = (int(args[0].shape[-2]), int(args[0].shape[-1]))

        return [self.grid_input.register_forward_pre_hook(see)]

    def place(self, context: CallContext, lead: torch.Size, num_queries: int, num_keys: int) -> Placement:
        module, stride = self.module, self.stride
        grid = context.values.get(self.key)
        if grid is None:
            raise NotPlaceable(f"{type(self.grid_input).__name__} did not get a [B, C, H, W] map before it ran, so "
                               "its grid is unknown")
        if defined_in(module, *_CLASSES[0]):  # tokens of the flattened last stage
            return grid_placement(lead, num_queries, num_keys, grid=grid, stride=stride, attention="global")
        if defined_in(module, *_CLASSES[1]):
            if module.stride_conv is None:
                return grid_placement(lead, num_queries, num_keys, grid=grid, stride=stride, attention="global")
            conv = module.stride_conv.conv
            out, centres = strided_module_centres(grid, stride, conv)
            step = pair(conv.stride)
            return grid_placement(lead, num_queries, num_keys, grid=out, stride=(stride[0] * step[0],
                                  stride[1] * step[1]), attention=f"global over the grid subsampled by {step[0]}",
                                  queries=centres, keys=centres)
        conv = module.q.local
        out, queries = strided_module_centres(grid, stride, conv)
        step = pair(conv.stride)
        return grid_placement(lead, num_queries, num_keys, grid=out, stride=(stride[0] * step[0], stride[1] * step[1]),
                              attention=f"global; queries subsampled, stride {step[0]}", queries=queries,
                              keys=cell_centres(*grid, stride).reshape(-1, 2))


def placer(model: nn.Module, name: str, module: nn.Module):
    if not _is_attention(module):
        return None
    grid_input = module
    if defined_in(module, *_CLASSES[0]):
        flat = [m for m in module_list(model) if defined_in(m, "Flat", "efficientformer")]
        if len(flat) != 1:
            return None  # not the EfficientFormer layout: left to the plain placer, which says what it sees
        grid_input = flat[0]
    owner = _owner(model)
    if owner is None:
        return without_owner("EfficientFormer" if defined_in(module, *_CLASSES[0]) else "EfficientFormerV2")
    return EfficientFormerPlacer(module, _input_strides(owner)[id(module)], grid_input)
