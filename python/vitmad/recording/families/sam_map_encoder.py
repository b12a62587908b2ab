"""The second encoder of DeepSeek-OCR-2's and Unlimited-OCR's vision models: a transformer over the map that their
SAM encoder (:mod:`.windowed_vit`) projects.

``DeepseekOcr2VisionModel`` and ``UnlimitedOcrVisionModel`` run ``sam_encoder`` on the pixels: a patch embedding
(kernel = stride = ``p``) makes an ``h x w`` map, the SAM blocks and the neck keep its size, and ``sam_encoder.proj``
(two convolutions of kernel 3, stride 2, padding 1: each makes ``ceil(n / 2)`` of ``n``) makes the
``ceil(ceil(h / 2) / 2) x ceil(ceil(w / 2) / 2)`` map the second encoder takes, one token per stride cell of
``4 x 4`` patches (``4p`` pixels a side), placed at the cell's centre in pixels of the model input, as vitmad places
every strided map (a map rounded up has its last cell reach past the image edge). Then:

- Unlimited-OCR (``UnlimitedOcrVisionEncoder``, CLIP): its embeddings put a class token first, then the map
  flattened row-major (``torch.cat([class_embeds, patch_embeds])``); every layer attends both ways over
  ``[B, H, 1 + gh * gw, 1 + gh * gw]``. The class token has no position: a prefix token.
- DeepSeek-OCR-2 (``DeepseekOcr2VisionEncoder``, a Qwen2 decoder): the vision model appends learned queries after
  the map flattened row-major (``torch.cat([hidden_states, queries])``: 144 of them up to 144 map tokens, else 256)
  and passes ``num_patches`` (the map tokens) to the encoder, whose mask is bidirectional among the map tokens and
  causal elsewhere (``block_sequence_ids``: map tokens 0, queries -1): a map token attends to every map token and to
  no query, a query to the map and to the queries up to itself. The queries have no position (learned slots): suffix
  tokens, whose rows are the prefix maps. The statistics are of the attention under the mask the model applies
  (the interface call's mask, as for every masked layer), so a map token's row is its softmax over the map.
  The 1-D rotary embedding over the sequence changes the scores, not where a token is on the image.

Hooks read, in each forward of the vision model, the map the patch embedding made, the map ``proj`` received and
made, and the sequence the second encoder received (forgotten when that forward ends); each must be the one above
(the neck keeps the map's size, ``proj`` rounds up, the second encoder takes ``proj``'s map, DeepSeek-OCR-2's
``num_patches`` is its cell count), else the layer is refused with what was seen; so is the second encoder run on
its own, outside a forward of its vision model (on a map whose image vitmad did not see). Recorded alone
(``vitmad.record(vision_model.vision_encoder)``), with no SAM encoder around it, it is not claimed here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..placement import CallContext, LayerGeometry, LayerPlacer, NotPlaceable, Placement, select_tokens
from .embeddings import check_cut_from_input, check_sequence
from .plain import _plain_positions
from .stages import defined_in, innermost_on_path, pair

__all__ = ["placer", "is_second_encoder_of", "SamMapEncoderPlacer"]


@dataclass(frozen=True)
class _Design:
    """One vision model's second encoder.

    Attributes:
        attention: class name of the second encoder's attention module.
        vision_model: class name of the vision model holding ``sam_encoder`` and ``vision_encoder``.
        modeling: the modeling module both are defined in (its name's last part).
        class_token: the sequence is a class token, then the map (Unlimited-OCR); else the map, then learned
            queries (DeepSeek-OCR-2).
    """

    attention: str
    vision_model: str
    modeling: str
    class_token: bool


_DESIGNS = (
    _Design("UnlimitedOcrAttention", "UnlimitedOcrVisionModel", "modeling_unlimited_ocr", True),
    _Design("DeepseekOcr2VisionAttention", "DeepseekOcr2VisionModel", "modeling_deepseek_ocr2", False),
)
_SEEN = "sam_map_encoder."  # + the vision model's name + what: facts of its forward in progress


def _vision_model(model: nn.Module, name: str, module: nn.Module) -> tuple[_Design, str, nn.Module] | None:
    for design in _DESIGNS:
        if defined_in(module, design.attention, design.modeling):
            found = innermost_on_path(model, name, lambda m, d=design: defined_in(m, d.vision_model, d.modeling))
            if found is not None and name.startswith(f"{found[0]}.vision_encoder." if found[0] else "vision_encoder."):
                return design, *found
    return None


def is_second_encoder_of(model: nn.Module, name: str, module: nn.Module, tower: str) -> bool:
    """Whether attention module ``name`` is the second encoder of the vision model whose ``sam_encoder`` is the tower
    that embeds the image (qualified-name prefix ``tower``): recorded with it by default, as part of the vision
    model that makes the image's features."""
    found = _vision_model(model, name, module)
    return found is not None and tower == (f"{found[1]}.sam_encoder." if found[1] else "sam_encoder.")


def placer(model: nn.Module, name: str, module: nn.Module) -> SamMapEncoderPlacer | None:
    """A :class:`SamMapEncoderPlacer` for the second encoder's attention modules inside their vision model, else
    None."""
    found = _vision_model(model, name, module)
    return None if found is None else SamMapEncoderPlacer(*found)


def _proj_convolutions(proj: nn.Module) -> list[nn.Conv2d] | str:
    """The convolutions of ``proj`` in the order they run, or what is not the layout vitmad verified: each one
    "same"-padded (odd kernel, padding half of it, no dilation), so that it makes ``ceil(n / stride)`` of ``n``."""
    convolutions = [m for m in proj.modules() if isinstance(m, nn.Conv2d)]
    if not convolutions:
        return "holds no convolution"
    for conv in convolutions:
        kernel, padding = pair(conv.kernel_size), pair(conv.padding) if not isinstance(conv.padding, str) else None
        if (padding is None or any(k % 2 == 0 or 2 * q != k - 1 for k, q in zip(kernel, padding))
                or pair(conv.dilation) != (1, 1)):
            return (f"has a convolution of kernel {kernel}, padding {conv.padding} and dilation "
                    f"{pair(conv.dilation)}; vitmad places the cells of convolutions of odd kernel, padding half "
                    "of it and no dilation only")
    return convolutions


class SamMapEncoderPlacer(LayerPlacer):
    """Places one layer of the second encoder: the cells of SAM's projected map in this call, row-major, after a
    class token (Unlimited-OCR) or before learned queries (DeepSeek-OCR-2), these without a position.

    Args:
        design: the vision model's design.
        vision_name: qualified name of the vision model.
        vision: that module.
    """

    def __init__(self, design: _Design, vision_name: str, vision: nn.Module):
        self.design, self.vision_name, self.vision = design, vision_name, vision
        self._key = _SEEN + vision_name
        self._where = vision_name or type(vision).__name__

    def install(self, context: CallContext) -> list:
        key, sam = self._key, self.vision.sam_encoder

        def see_patches(module, args, output) -> None:
            pixels = args[0] if args else None
            context.values[key + ".pixels"] = None if not isinstance(pixels, torch.Tensor) else \
                tuple(int(s) for s in pixels.shape[-2:])
            context.values[key + ".patches"] = tuple(int(s) for s in output.shape[:3])  # [B, h, w, C]

        def see_proj(module, args, output) -> None:
            context.values[key + ".proj"] = (tuple(int(s) for s in args[0].shape[-2:]),
                                             tuple(int(s) for s in output.shape[-2:]))

        def see_encoder(module, args, kwargs) -> None:
            given = args[0] if args else kwargs.get("patch_embeds", kwargs.get("inputs_embeds"))
            shape = tuple(given.shape) if isinstance(given, torch.Tensor) else None
            num_patches = kwargs.get("num_patches", args[1] if len(args) > 1 else None)
            context.values[key + ".encoder"] = (shape, None if num_patches is None else int(num_patches))

        def forget(module, *_) -> None:
            # The facts hold within one forward of the vision model: a second encoder run on its own after it (on
            # a map of another image) must not be placed on the last image's map.
            for what in (".pixels", ".patches", ".proj", ".encoder"):
                context.values.pop(key + what, None)

        return [self.vision.register_forward_pre_hook(forget), self.vision.register_forward_hook(forget),
                sam.patch_embed.register_forward_hook(see_patches), sam.proj.register_forward_hook(see_proj),
                self.vision.vision_encoder.register_forward_pre_hook(see_encoder, with_kwargs=True)]

    def _map(self, context: CallContext) -> tuple[int, tuple[int, int], float]:
        """``(batch, map grid, pixels per cell)`` of the map the second encoder received in this call, each step
        from the pixels to it checked."""
        sam, values, where = self.vision.sam_encoder, context.values, self._where
        patches, proj = values.get(self._key + ".patches"), values.get(self._key + ".proj")
        if patches is None or proj is None:
            raise NotPlaceable(
                f"{where}.sam_encoder did not run its patch embedding and projector before this layer attended, in "
                f"the same forward of {where} (the second encoder run on a map of its own?), so the cells of its "
                f"tokens are unknown; run {where} on pixel_values, or pass positions=<[N, 2] pixel position of each "
                "token>"
            )
        conv = sam.patch_embed.projection
        kernel, stride = pair(conv.kernel_size), pair(conv.stride)
        if kernel != stride or pair(conv.padding) != (0, 0) or pair(conv.dilation) != (1, 1) or stride[0] != stride[1]:
            raise NotPlaceable(
                f"{where}.sam_encoder.patch_embed.projection has kernel {kernel}, stride {stride}, padding "
                f"{pair(conv.padding)}; vitmad places square whole patches (kernel == stride, no padding) only"
            )
        pixels = values.get(self._key + ".pixels")
        if pixels is not None:
            check_cut_from_input(context, f"{where}.sam_encoder.patch_embed", *pixels, "vision model",
                                 "the tokens without a position")
        batch, height, width = patches
        convolutions = _proj_convolutions(sam.proj)
        if isinstance(convolutions, str):
            raise NotPlaceable(f"{where}.sam_encoder.proj {convolutions}")
        expected, cell = (height, width), float(stride[0])
        for c in convolutions:
            s = pair(c.stride)
            if s[0] != s[1]:
                raise NotPlaceable(f"{where}.sam_encoder.proj has a convolution of stride {s}; vitmad places square "
                                   "cells only")
            expected, cell = (-(-expected[0] // s[0]), -(-expected[1] // s[1])), cell * s[0]
        if proj != ((height, width), expected):
            raise NotPlaceable(
                f"{where}.sam_encoder.proj took a {proj[0][0]}x{proj[0][1]} map to {proj[1][0]}x{proj[1][1]}; from "
                f"the {height}x{width} map of its patch embedding vitmad expects {height}x{width} to "
                f"{expected[0]}x{expected[1]} (the neck keeps the size, each convolution rounds up)"
            )
        return batch, expected, cell

    def place(self, context: CallContext, lead: torch.Size, num_queries: int, num_keys: int) -> Placement:
        batch, grid, cell = self._map(context)
        cells = grid[0] * grid[1]
        shape, num_patches = context.values.get(self._key + ".encoder") or (None, None)
        encoder = f"{self._where}.vision_encoder"
        if self.design.class_token:
            if shape != (batch, shape[1] if shape else 0, *grid):
                raise NotPlaceable(f"{encoder} received {'no map' if shape is None else f'shape {list(shape)}'}; "
                                   f"expected SAM's projected map [{batch}, C, {grid[0]}, {grid[1]}]")
            prefix, suffix, attention = 1, 0, "global, class token first"
        else:
            if shape is None or len(shape) != 3 or shape[0] != batch or num_patches != cells or shape[1] <= cells:
                raise NotPlaceable(
                    f"{encoder} received {'no sequence' if shape is None else f'shape {list(shape)}'} with "
                    f"num_patches={num_patches}; expected [{batch}, {cells} + learned queries, C] with "
                    f"num_patches={cells}, the cells of SAM's {grid[0]}x{grid[1]} projected map"
                )
            prefix, suffix = 0, shape[1] - cells
            attention = f"map tokens both ways, then {suffix} learned queries (causal)"
        tokens = prefix + cells + suffix
        check_sequence(lead, num_queries, num_keys, batch, tokens,
                       f"{prefix} class token, the {cells} tokens of SAM's {grid[0]}x{grid[1]} projected map of "
                       f"{batch} images and {suffix} learned queries")
        strides = (cell, cell)
        positions, index = _plain_positions(grid, strides, prefix, suffix)
        geometry = LayerGeometry(grid, strides, attention, int(lead[-1]), prefix, num_suffix_tokens=suffix or None)
        return Placement(positions, None, select_tokens(index), geometry)
