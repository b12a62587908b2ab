"""Swin: window attention over shifted, padded windows on a hierarchy of patch grids.

timm ``swin_transformer`` (Swin, S3), ``swin_transformer_v2`` (cosine attention, log-spaced continuous position
bias) and ``swin_transformer_v2_cr``; transformers ``SwinModel``, ``Swinv2Model``, ``DonutSwinModel`` and
``MaskFormerSwinModel``; torchvision ``swin_t`` ... ``swin_v2_b``; transformers ``Swin2SRModel`` (Swin2SR's residual
groups of Swinv2 blocks on the full-resolution map, one token per pixel, no merging). Each block attends within
windows of its stage's token map ``H x W``:

1. the map is cyclically shifted up and left by ``shift`` (``torch.roll(x, -shift)``) and padded at the bottom
   and right to a multiple of the window. timm rolls the ``H x W`` map and pads after; transformers and torchvision
   pad first and roll the padded map, so there the tokens that wrap around are padding too (torchvision drops the
   shift along an axis one window covers);
2. the shifted, padded map is cut into windows, row-major, each window's tokens row-major; the attention is
   ``[B * nW, heads, N, N]``, images outermost. The tokens that wrapped around sit in windows with tokens far
   from them on the image; the model's shift mask keeps them apart (a logit of -100), and each still stands at
   its true place on the image.

The window and shift are read from the block while its attention runs, and the map size from the block's
input, because neither is fixed by the configuration: timm clamps windows to the feature size it was built for
and keeps them for other input sizes (``strict_img_size=False``); transformers clamps the window to the map and
drops the shift in every call whose map is not larger than the window. Padding slots, which the model attends,
are keys at their cell of the padded grid (past the image edge) and no query.

Pixel scale: a token of stage ``s`` covers ``patch * 2 ** m`` pixels, with ``m`` the 2 x 2 patch mergings that
ran before its block; each call checks that the block's map size is what the input image gives through the
patch embedding and those mergings (odd sizes are padded before a merging), so that a layout vitmad does not
know is refused, not measured at a wrong scale.

Swin2SR pads the image itself: ``Swin2SRModel.pad_and_normalize`` reflects it at the bottom and right to a multiple
of ``config.window_size`` before its first convolution, so its blocks run on the padded image's map. The image is
what ``Swin2SRModel`` receives (read by a hook in each call): the tokens of its own pixels are queries and keys; the
tokens of the reflected rows and columns are keys at their cells past the image edge and no query, as the padding
slots of a window are (docs/definition.md, windows).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import nn

from ..module_index import named_module_list
from ..placement import CallContext, LayerGeometry, LayerPlacer, NotPlaceable, Placement, RefusingPlacer, on_device
from .plain import find_patch_embedding
from .stages import matching_design, pair

__all__ = ["placer", "attention_modules", "SwinPlacer", "merged_length"]


@dataclass(frozen=True)
class _Design:
    """One implementation of the Swin block.

    Attributes:
        module: the module that defines the classes.
        block: class name of the block that shifts, pads and partitions.
        attention: class name of the module that computes the window attention (the one recorded).
        merging: class name of the 2 x 2 patch merging between stages.
        roll_first: the map is rolled before it is padded (timm), else padded, then rolled (transformers).
        dims_argument: the block receives ``(hidden_states [B, H * W, C], (H, W))`` (transformers), else
            ``x [B, H, W, C]`` (timm, torchvision).
        window_in_attention: the window and shift are attributes of the attention module (torchvision), else of
            the block.
        covering_window_unshifted: no shift along an axis whose padded map one window covers, decided in each
            call without changing the attribute (torchvision's ``shifted_window_attention``).
        image_model: class name of the model that pads its input image to a multiple of its
            ``config.window_size`` before embedding it (Swin2SR's ``pad_and_normalize``), defined in ``module``;
            empty where the image reaches the patch embedding as it is.
    """

    module: str
    block: str
    attention: str
    merging: str
    roll_first: bool
    dims_argument: bool
    window_in_attention: bool = False
    covering_window_unshifted: bool = False
    image_model: str = ""


_DESIGNS = (
    _Design("timm.models.swin_transformer", "SwinTransformerBlock", "WindowAttention", "PatchMerging", True, False),
    _Design("timm.models.swin_transformer_v2", "SwinTransformerV2Block", "WindowAttention", "PatchMerging", True,
            False),
    _Design("timm.models.swin_transformer_v2_cr", "SwinTransformerV2CrBlock", "WindowMultiHeadAttention",
            "PatchMerging", True, False),
    _Design("transformers.models.swin.modeling_swin", "SwinLayer", "SwinAttention", "SwinPatchMerging", False, True),
    _Design("transformers.models.swinv2.modeling_swinv2", "Swinv2Layer", "Swinv2SelfAttention",
            "Swinv2PatchMerging", False, True),
    _Design("transformers.models.donut.modeling_donut_swin", "DonutSwinLayer", "DonutSwinSelfAttention",
            "DonutSwinPatchMerging", False, True),
    _Design("transformers.models.maskformer.modeling_maskformer_swin", "MaskFormerSwinLayer",
            "MaskFormerSwinSelfAttention", "MaskFormerSwinPatchMerging", False, True),
    # torchvision pads, then rolls (as transformers), with the map as [B, H, W, C] (as timm).
    _Design("torchvision.models.swin_transformer", "SwinTransformerBlock", "ShiftedWindowAttention", "PatchMerging",
            False, False, True, True),
    _Design("torchvision.models.swin_transformer", "SwinTransformerBlockV2", "ShiftedWindowAttentionV2",
            "PatchMergingV2", False, False, True, True),
    # Swinv2's block; its patch merging is defined but never built (every group keeps the full-resolution map).
    _Design("transformers.models.swin2sr.modeling_swin2sr", "Swin2SRLayer", "Swin2SRSelfAttention",
            "Swin2SRPatchMerging", False, True, image_model="Swin2SRModel"),
)


def _design_of(module: nn.Module, attribute: str) -> _Design | None:
    return matching_design(module, _DESIGNS, attribute)


def attention_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The window attention modules of every Swin block, by qualified name.

    The generic discovery misses timm's Swin V2 and V2-CR attention (no ``fused_attn`` switch); the others are
    listed too, so that each block's attention is found by its design, not by its projections' names.
    """
    return {name: module for name, module in named_module_list(model) if _design_of(module, "attention") is not None}


@dataclass(frozen=True)
class _Windows:
    """Where the tokens of one window partition are: positions per slot and the fold's token order."""

    positions: torch.Tensor  # [nW * N, 2] pixel centres of the slots as queries, window-major; NaN for padding
    key_positions: torch.Tensor  # [nW * N, 2] as keys: padding at its cell of the padded grid, past the image
    index: torch.Tensor  # [h * w] the slot of each image token of the unshifted map, row-major
    padded: tuple[int, int]


# Blocks of one stage share their partitions, and a model sees few input sizes: keep them (read-only tensors).
@functools.lru_cache(maxsize=64)
def _windows(size: tuple[int, int], window: tuple[int, int], shift: tuple[int, int], roll_first: bool,
             stride: tuple[float, float], content: tuple[int, int]) -> _Windows:
    """The slot of every token when an ``H x W`` map is shifted by ``-shift``, padded and cut into windows; the
    image's tokens are its first ``content`` rows and columns (the others, padding the model added to its image)."""
    (height, width), (win_h, win_w) = size, window
    padded_h, padded_w = math.ceil(height / win_h) * win_h, math.ceil(width / win_w) * win_w

    def source(length: int, padded: int, step: int) -> torch.Tensor:
        # The row (column) of the unshifted, padded map at each row (column) of the shifted, padded map; rows
        # >= length are padding. timm pads after rolling, so its padding stays where it was added.
        at = torch.arange(padded)
        if roll_first:
            return torch.where(at < length, (at + step) % length, at)
        return (at + step) % padded

    rows = source(height, padded_h, shift[0]).view(padded_h // win_h, 1, win_h, 1)
    cols = source(width, padded_w, shift[1]).view(1, padded_w // win_w, 1, win_w)
    rows, cols = torch.broadcast_tensors(rows, cols)  # [nW_h, nW_w, win_h, win_w]: window-major slot order
    rows, cols = rows.reshape(-1), cols.reshape(-1)
    real = (rows < content[0]) & (cols < content[1])
    # docs/definition.md, windows: padding the model attends is a key at its cell of the padded grid (past the
    # image edge), and no query: it stands for no image content.
    key_positions = torch.stack([(rows + 0.5) * stride[0], (cols + 0.5) * stride[1]], dim=-1).to(torch.float32)
    positions = key_positions.clone()
    positions[~real] = float("nan")
    index = torch.empty(content[0] * content[1], dtype=torch.long)
    index[rows[real] * content[1] + cols[real]] = torch.arange(rows.numel())[real]
    return _Windows(positions, key_positions, index, (padded_h, padded_w))


def merged_length(length: int, merges: int) -> int:
    """The map size after ``merges`` 2 x 2 mergings; each pads an odd size by one first."""
    for _ in range(merges):
        length = (length + 1) // 2
    return length


class SwinPlacer(LayerPlacer):
    """Places the tokens of one Swin block's window attention (``[B * nW, heads, N, N]``).

    Args:
        model: the model, named in messages.
        design: the implementation of the block.
        block_name: qualified name of the block.
        block: the block; its ``window_size`` and ``shift_size`` are read during each attention call.
        patch: ``(height, width)`` pixels of the patch embedding, or None when the model has none found.
        merges: 2 x 2 patch mergings before the block.
        attention: the block's window attention (holds the window and shift where the design says so).
        image_model: ``(qualified name, module, patch embedding)`` of the model that pads its input image before
            embedding it (the design's ``image_model``), or None.
    """

    def __init__(self, model: nn.Module, design: _Design, block_name: str, block: nn.Module,
                 patch: tuple[int, int] | None, merges: int, attention: nn.Module | None = None,
                 image_model: tuple[str, nn.Module, nn.Module | None] | None = None):
        self.model, self.design, self.block_name, self.block = model, design, block_name, block
        self.window_holder = attention if design.window_in_attention else block
        self.patch, self.merges = patch, merges
        self.image_model = image_model
        self._key = f"swin.{block_name}"
        self._image_key = None if image_model is None else f"swin.image.{image_model[0]}"

    def install(self, context: CallContext) -> list[torch.utils.hooks.RemovableHandle]:
        def see(module, args, kwargs) -> None:
            hidden = args[0] if args else kwargs.get("hidden_states", kwargs.get("x"))
            if self.design.dims_argument:
                dims = args[1] if len(args) > 1 else kwargs.get("input_dimensions")
                size = None if dims is None else (int(dims[0]), int(dims[1]))
            else:
                size = (int(hidden.shape[1]), int(hidden.shape[2])) if hidden.dim() == 4 else None
            context.values[self._key] = (int(hidden.shape[0]), size)

        def forget(module, args, output) -> None:
            # The block's map is known only while it runs: its attention called on its own is refused.
            context.values.pop(self._key, None)

        handles = [self.block.register_forward_pre_hook(see, with_kwargs=True),
                   self.block.register_forward_hook(forget, always_call=True)]
        if self.image_model is not None and self.image_model[2] is not None:
            # The image is read before the model pads it, and kept here until its patch embedding runs: the call
            # starts (and its values are cleared) at the first convolution, on the padded image.
            waiting = {}

            def see_image(module, args, kwargs) -> None:
                pixels = args[0] if args else kwargs.get("pixel_values")
                waiting["image"] = (int(pixels.shape[-2]), int(pixels.shape[-1])) \
                    if isinstance(pixels, torch.Tensor) and pixels.dim() == 4 else None

            def embed(module, args) -> None:
                context.values[self._image_key] = waiting.pop("image", None)

            def forget_image(module, args, output) -> None:
                waiting.pop("image", None)
                context.values.pop(self._image_key, None)

            handles += [self.image_model[1].register_forward_pre_hook(see_image, with_kwargs=True),
                        self.image_model[2].register_forward_pre_hook(embed),
                        self.image_model[1].register_forward_hook(forget_image, always_call=True)]
        return handles

    def _stride(self, context: CallContext, size: tuple[int, int]) -> tuple[float, float]:
        if self.patch is None:
            raise NotPlaceable(
                f"found no patch-embedding Conv2d (kernel == stride) in {type(self.model).__name__}, so the pixel "
                "size of its tokens is unknown"
            )
        if context.image_size is None:
            raise NotPlaceable("the size of the model input is unknown (its first convolution did not run)")
        scale = 2 ** self.merges
        for image, patch, length, axis in zip(context.image_size, self.patch, size, ("height", "width")):
            # The patch embedding floors (timm) or pads the image to whole patches (transformers).
            expected = {merged_length(image // patch, self.merges), merged_length(-(-image // patch), self.merges)}
            if length not in expected:
                raise NotPlaceable(
                    f"its block {self.block_name} sees a map {axis} of {length} tokens, but an image {axis} of "
                    f"{image} px through {patch} px patches and {self.merges} 2x2 patch mergings gives "
                    f"{' or '.join(map(str, sorted(expected)))}; vitmad does not know what ran in between"
                )
        return float(self.patch[0] * scale), float(self.patch[1] * scale)

    def _padded_image(self, context: CallContext, size: tuple[int, int]) -> tuple[tuple[float, float],
                                                                                  tuple[int, int], tuple[int, int]]:
        """``(stride, image tokens, padded image)`` of a block of a model that pads its image itself: the pixels
        per token, the rows and columns of the map that hold the image, and the padded image's size in pixels."""
        name, image_model, _ = self.image_model
        image = context.values.get(self._image_key)
        if image is None:
            raise NotPlaceable(
                f"its block {self.block_name} ran outside a forward of {name or 'the model'} "
                f"({self.design.image_model}) given a [B, C, H, W] image, whose size says where its tokens are"
            )
        if self.patch is None:
            raise NotPlaceable(f"found no patch-embedding Conv2d (kernel == stride) in {self.design.image_model}, "
                               "so the pixel size of its tokens is unknown")
        # Swin2SRModel.pad_and_normalize reads the multiple from its config in every call.
        multiple = int(image_model.config.window_size)
        padded = tuple(-(-n // multiple) * multiple for n in image)
        for length, pixels, full, patch, axis in zip(size, image, padded, self.patch, ("height", "width")):
            if length != full // patch:
                raise NotPlaceable(
                    f"its block {self.block_name} sees a map {axis} of {length} tokens, but "
                    f"{self.design.image_model} pads an image {axis} of {pixels} px to {full} px (a multiple of its "
                    f"config.window_size, {multiple}), which its {patch} px patches make {full // patch} tokens; "
                    "vitmad does not know what ran in between"
                )
        # A token whose cell holds a pixel of the image carries image content: a query (docs/definition.md).
        content = tuple(-(-n // patch) for n, patch in zip(image, self.patch))
        return (float(self.patch[0]), float(self.patch[1])), content, padded

    def place(self, context: CallContext, lead: torch.Size, num_queries: int, num_keys: int) -> Placement:
        seen = context.values.get(self._key)
        if seen is None or seen[1] is None:
            raise NotPlaceable(
                f"it ran outside a forward of its block {self.block_name} ({self.design.block}) with a "
                "[B, H, W, C] map or (H, W) dimensions, so its windows cannot be placed"
            )
        batch, size = seen
        window = pair(self.window_holder.window_size)
        shift = pair(self.window_holder.shift_size)
        if self.design.covering_window_unshifted:
            shift = tuple(0 if w >= math.ceil(n / w) * w else s for n, w, s in zip(size, window, shift))
        num_windows = math.ceil(size[0] / window[0]) * math.ceil(size[1] / window[1])
        if (len(lead) != 2 or num_queries != num_keys or num_queries != window[0] * window[1]
                or lead[0] != batch * num_windows):
            raise NotPlaceable(
                f"its attention has shape [{', '.join(map(str, lead))}, {num_queries}, {num_keys}]; its block "
                f"{self.block_name} partitions {batch} maps of {size[0]}x{size[1]} tokens into {num_windows} "
                f"windows of {window[0]}x{window[1]}, which gives [{batch * num_windows}, heads, "
                f"{window[0] * window[1]}, {window[0] * window[1]}]"
            )
        if self.image_model is None:
            stride, content, padded_image = self._stride(context, size), size, None
        else:
            stride, content, padded_image = self._padded_image(context, size)
        windows = _windows(size, window, shift, self.design.roll_first, stride, content)
        heads, tokens = int(lead[1]), num_queries
        positions = windows.positions.view(num_windows, tokens, 2).repeat(batch, 1, 1).unsqueeze(1)
        key_positions = None
        if windows.padded != content:
            key_positions = windows.key_positions.view(num_windows, tokens, 2).repeat(batch, 1, 1).unsqueeze(1)
        index = windows.index

        def fold(values: torch.Tensor) -> torch.Tensor:
            values = values.reshape(batch, num_windows, heads, tokens).transpose(1, 2)
            return values.reshape(batch, heads, num_windows * tokens).index_select(-1, on_device(index, values.device))

        attention = f"window {window[0]}x{window[1]}"
        if any(shift):
            attention += f", shift {shift[0]}x{shift[1]}"
        if windows.padded != size:
            attention += f", padded to {windows.padded[0]}x{windows.padded[1]}"
        if content != size:
            attention += f", image padded to {padded_image[0]}x{padded_image[1]} px by reflection"
        geometry = LayerGeometry(content, stride, attention, heads)
        return Placement(positions, key_positions, fold, geometry, padded_keys=key_positions is not None)


def placer(model: nn.Module, name: str, module: nn.Module):
    """The placer of a Swin window attention module, or None for any other module."""
    design = _design_of(module, "attention")
    if design is None:
        return None
    modules = dict(named_module_list(model))
    block_name = name
    while block_name and _design_of(modules[block_name], "block") is not design:
        block_name = block_name.rpartition(".")[0]
    if not block_name:
        return RefusingPlacer(f"it is not inside a {design.block}, which says where its windows are")
    merges = 0
    for other_name, other in modules.items():
        if other_name == block_name:
            break
        if type(other).__module__ == design.module and type(other).__name__ == design.merging:
            merges += 1
    if not design.image_model:
        # The embedding before the block in the nearest module holding one, not a user's head declared before the
        # backbone (QA 334: torchvision's Swin so held took a 2x2 head for its patches).
        embedding = find_patch_embedding(model, before=block_name)
        patch = None if embedding is None else pair(embedding[1].kernel_size)
        return SwinPlacer(model, design, block_name, modules[block_name], patch, merges, module)
    parts = block_name.split(".")
    owners = (".".join(parts[:depth]) for depth in range(len(parts) - 1, -1, -1))  # "" is the model itself
    image_name = next((owner for owner in owners if type(modules[owner]).__module__ == design.module
                       and type(modules[owner]).__name__ == design.image_model), None)
    if image_name is None:
        return RefusingPlacer(f"it is not inside a {design.image_model}, whose input image says where its tokens are")
    embedding = find_patch_embedding(modules[image_name])
    patch = None if embedding is None else pair(embedding[1].kernel_size)
    image_model = image_name, modules[image_name], None if embedding is None else embedding[1]
    return SwinPlacer(model, design, block_name, modules[block_name], patch, merges, module, image_model)
