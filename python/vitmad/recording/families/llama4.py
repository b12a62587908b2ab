"""Llama 4's vision tower (transformers ``Llama4VisionModel``, the image encoder of ``Llama4ForConditionalGeneration``):
a row-major patch grid cut without a convolution, then its class token LAST.

``Llama4UnfoldConvolution`` cuts the image with ``nn.Unfold`` (kernel = stride = the patch) and projects the
patches with a ``Linear``, so the plain layout finds no patch-embedding convolution. ``Llama4VisionModel.forward``
then appends ``class_embedding`` after the patches (``torch.cat([patches, class], dim=1)``), adds
``positional_embedding_vlm`` (``grid^2 + 1`` rows: the input must be ``image_size`` square) and runs every layer over
``[B, H, gh * gw + 1, gh * gw + 1]``; its 2D rotary embedding numbers the cells row-major and gives the last token,
the class token, no frequency (``ID_CLS_TOKEN``). Placed as a plain ViT with the extra tokens first, the class token
took the first cell and every patch the next one (MAD 23 % off, found by QA); the recorder refused the tower by
default, for want of a convolution.

A pre-hook on the patch embedding reads, in each call, the shape of the pixels it cuts: the grid is what its
``Unfold`` makes of them, ``((H - p) // p + 1, (W - p) // p + 1)``, cells of ``p x p`` pixels at their centres in
pixels of the model input (pixels past the last whole patch are dropped by the unfold, as the plain layout takes
them). The class token has no position: it is a suffix token, so ``prefix_mass`` is the attention on it and
``stats=[..., "prefix_maps"]`` gives its row over the grid. Each tile of ``Llama4ForConditionalGeneration`` is a
batch entry of the tower: one row per tile, in the tile's own pixels.

Refused (a ``ValueError`` naming the layer): a call in which the patch embedding did not run or cut pixels of
another size than the model's input, an unfold that pads, dilates or overlaps, and an attention whose shape is not
that sequence.
"""

from __future__ import annotations

import torch
from torch import nn

from ..placement import CallContext, LayerGeometry, LayerPlacer, NotPlaceable, Placement, select_tokens
from .embeddings import check_cut_from_input
from .plain import _plain_positions
from .stages import defined_in, innermost_on_path, pair

__all__ = ["placer", "is_tower", "Llama4Placer"]

_CUT = "llama4.cut."  # + the tower's name: (batch, height, width) of the pixels its patch embedding cut


def is_tower(module: nn.Module) -> bool:
    """Whether ``module`` is a Llama 4 vision tower: for the recorder, the tower that embeds the image, which it
    finds by a patch-embedding convolution in other models."""
    return defined_in(module, "Llama4VisionModel", "modeling_llama4")


def placer(model: nn.Module, name: str, module: nn.Module) -> Llama4Placer | None:
    """A :class:`Llama4Placer` for the ``Llama4VisionAttention`` modules of a ``Llama4VisionModel``, else None."""
    if not defined_in(module, "Llama4VisionAttention", "modeling_llama4"):
        return None
    found = innermost_on_path(model, name, is_tower)
    return None if found is None else Llama4Placer(model, *found)


class Llama4Placer(LayerPlacer):
    """Places the tokens of one Llama 4 vision layer: the row-major grid the patch embedding cut in this call, then
    one class token without a position.

    Args:
        model: the recorded model (for messages).
        tower_name: qualified name of the ``Llama4VisionModel``.
        tower: that module.
    """

    def __init__(self, model: nn.Module, tower_name: str, tower: nn.Module):
        self.model, self.tower_name, self.tower = model, tower_name, tower
        self.unfold = tower.patch_embedding.unfold

    def install(self, context: CallContext) -> list:
        key = _CUT + self.tower_name

        def see(module, args, kwargs) -> None:
            pixels = args[0] if args else kwargs.get("hidden_states")
            if isinstance(pixels, torch.Tensor) and pixels.dim() == 4:
                context.values[key] = tuple(int(s) for s in (pixels.shape[0], *pixels.shape[-2:]))
            else:
                context.values.pop(key, None)  # a call the module itself refuses: nothing of it to place

        return [self.tower.patch_embedding.register_forward_pre_hook(see, with_kwargs=True)]

    def place(self, context: CallContext, lead: torch.Size, num_queries: int, num_keys: int) -> Placement:
        cut = context.values.get(_CUT + self.tower_name)
        where = f"{self.tower_name or type(self.tower).__name__}.patch_embedding"
        if cut is None:
            raise NotPlaceable(
                f"Llama 4's patch embedding ({where}) did not run in this call before it attended (its encoder "
                "called on hidden states?), so the grid of its tokens is unknown; run the tower on pixel_values, or "
                "pass positions=<[N, 2] pixel position of each token, a NaN row for the class token, which comes last>"
            )
        kernel, stride = pair(self.unfold.kernel_size), pair(self.unfold.stride)
        if kernel != stride or pair(self.unfold.padding) != (0, 0) or pair(self.unfold.dilation) != (1, 1):
            raise NotPlaceable(
                f"Llama 4's patch embedding ({where}) unfolds kernel {kernel} with stride {stride}, padding "
                f"{pair(self.unfold.padding)} and dilation {pair(self.unfold.dilation)}; vitmad places whole patches "
                "(kernel == stride, no padding, no dilation) only"
            )
        batch, height, width = cut
        check_cut_from_input(context, f"Llama 4's patch embedding ({where})", height, width, "tower",
                             "the class token, which comes last")
        grid = ((height - kernel[0]) // stride[0] + 1, (width - kernel[1]) // stride[1] + 1)
        tokens = grid[0] * grid[1] + 1
        if len(lead) != 2 or int(lead[0]) != batch or num_queries != tokens or num_keys != tokens:
            raise NotPlaceable(
                f"its attention has shape [{', '.join(map(str, lead))}, {num_queries}, {num_keys}]; after {where} "
                f"cut {batch} images of {height}x{width} pixels into {grid[0]}x{grid[1]} patches, a Llama 4 vision "
                f"layer attends [{batch}, H, {tokens}, {tokens}] (the patches, then the class token)"
            )
        strides = (float(stride[0]), float(stride[1]))
        positions, index = _plain_positions(grid, strides, 0, 1)
        geometry = LayerGeometry(grid, strides, "global, class token last", int(lead[-1]), 0, num_suffix_tokens=1)
        return Placement(positions, None, select_tokens(index), geometry)
