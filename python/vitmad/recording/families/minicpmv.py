"""MiniCPM-V 4.6 and 4.7 and MiniCPM OCR vision towers (transformers ``MiniCPMV4_6VisionModel``,
``MiniCPMV4_7VisionModel``, ``MiniCPMOcrVisionModel``, alone or as the ``vision_tower`` of their models): the slices
of the images packed side by side in one row of pixels, one token sequence.

The image processor resizes each image (its "source" view) and, for a large image, cuts a resized copy into a grid of
slices; each view is ``h x w`` patches of ``p`` pixels (``target_sizes[i] = (h, w)``). ``reshape_by_patch`` unfolds a
view into its patches, row-major, and lays them one after the other along a strip of pixels ``p`` high; the strips of
all the views of all the images are concatenated: ``pixel_values [1, C, p, p * sum(h_i * w_i)]``. The tower's
patch-embedding convolution (kernel = stride = ``p``) cuts the strip back into those patches, so token ``t`` of the
sequence is patch ``t`` of the strip: the views one after the other, each row-major on its own grid (its learned
position embedding is bucketed row-major from ``target_sizes``, ``get_vision_nearest_position_ids``).

Every attention layer receives ``cu_seqlens`` and, without flash attention, calls the attention once per chunk
(``Placement.consecutive_chunks``):

- encoder layers up to ``insert_layer_id``: one chunk per view, its ``h * w`` tokens row-major.
- ``vit_merger.self_attn``, after layer ``insert_layer_id`` (unless ``use_vit_merger=False``): the sequence
  reordered by windows of ``k x k`` patches (``window_kernel_size``; ``get_vision_window_index``: windows row-major
  over each view, patches row-major in a window), one chunk per window. The merger then makes one token of each
  window.
- encoder layers after the merger: one chunk per view of ``h/k x w/k`` merged tokens, row-major (the windows' order),
  each at the centre of its window: cells of ``k * p`` pixels.

A token's position is the centre of its cell, ``((row + 0.5) * s, (col + 0.5) * s)`` with ``s`` the patch (``p``) or
the window (``k * p``), in pixels of its view as the processor resized it (``docs/definition.md``, "Beyond one
grid"): each view (the source image or one slice) is an image of its own, as LLaVA-NeXT's crops are. The values fold
onto ``[n_views, H, T]``, view ``i``'s tokens row-major on its own grid first, NaN after them
(``Placement.present``, ``LayerGeometry.image_grids``).

Refused (a ``ValueError`` naming the layer): pixels that are not one strip ``[1, C, p, p * sum(h * w)]`` with the
``target_sizes`` of its views, a window merger given precomputed ``window_index`` and ``cu_window_seqlens``,
``cu_seqlens`` or attention shapes that are not the chunks rebuilt here, and flash attention over more than one
chunk (one variable-length call whose chunks the capture does not receive). The models' video path
(``get_video_features``) hands the tower a strip too, placed as the image processors lay one out; the 4.6 video
processor (transformers 5.25) interleaves a clip's frames column by column of pixels, so a patch of its strip holds
columns of several frames: those tokens are placed as the tower numbers them, which vitmad cannot check.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import torch
from torch import nn

from ..placement import CallContext, LayerPlacer, NotPlaceable, Placement, RefusingPlacer
from .packed import ChunkLayout, chunk_placement, packed_sequence, qwen_token_cells
from .stages import innermost_on_path

__all__ = ["placer", "is_tower", "MiniCPMPlacer"]

# (defining module's suffix, vision tower class, attention class)
_DESIGNS = (
    ("modeling_minicpmv4_6", "MiniCPMV4_6VisionModel", "MiniCPMV4_6VisionAttention"),
    ("modeling_minicpmv4_7", "MiniCPMV4_7VisionModel", "MiniCPMV4_7VisionAttention"),
    ("modeling_minicpm_ocr", "MiniCPMOcrVisionModel", "MiniCPMOcrVisionAttention"),
)
_STRIP = "minicpmv.strip."  # + tower name: the _Strip of the current call
_MERGED = "minicpmv.merged."  # + tower name: the window merger ran in this call
_MERGER_GIVEN = "minicpmv.merger_given."  # + tower name: precomputed window inputs the merger received


def _design(module: nn.Module, index: int) -> bool:
    cls = type(module)
    suffix = cls.__module__.rpartition(".")[2]
    return any(suffix == design[0] and cls.__name__ == design[index] for design in _DESIGNS)


def is_tower(module: nn.Module) -> bool:
    """Whether ``module`` is a MiniCPM-V / MiniCPM OCR vision tower."""
    return _design(module, 1)


def placer(model: nn.Module, name: str, module: nn.Module):
    """A :class:`MiniCPMPlacer` for the attention modules of a MiniCPM vision tower (its encoder layers' and its
    window merger's), a refusing placer for one elsewhere, else None."""
    if not _design(module, 2):
        return None
    found = innermost_on_path(model, name, is_tower)
    if found is None:
        return RefusingPlacer("it is not inside a MiniCPM vision tower, whose target_sizes give the grids of the "
                              "packed views; record the model that holds the tower")
    tower_name, tower = found
    relative = name[len(tower_name) + 1:] if tower_name else name
    if relative == "vit_merger.self_attn":
        return MiniCPMPlacer(model, tower_name, tower, module, in_merger=True)
    if re.fullmatch(r"encoder\.layers\.\d+\.self_attn", relative):
        return MiniCPMPlacer(model, tower_name, tower, module, in_merger=False)
    return RefusingPlacer(f"it is neither an encoder layer's nor the window merger's attention of its MiniCPM vision "
                          f"tower ({relative}), the two whose token order vitmad knows")


@dataclass(frozen=True)
class _Strip:
    """What the tower's embeddings were given in one call.

    Attributes:
        shape: the shape of ``pixel_values``.
        grids: ``target_sizes``, per view ``(h, w)`` patches.
        tokens: the tokens the embeddings returned.
    """

    shape: tuple[int, ...]
    grids: tuple[tuple[int, int], ...]
    tokens: int


# A model sees few slice-size combinations; the layers of one kind share them (read-only tensors).
@functools.lru_cache(maxsize=64)
def _layout(grids: tuple[tuple[int, int], ...], window: int | None, stride: float) -> ChunkLayout:
    """The tokens of the views of ``grids`` in sequence order: row-major per view, one chunk per view; or, with
    ``window``, in windows of ``window x window`` tokens, one chunk per window (edge windows smaller)."""
    cells, boundaries = [], [0]
    for grid in grids:
        view_cells, chunks = qwen_token_cells(grid, 1, window)
        cells.append(view_cells)
        for length in chunks:
            boundaries.append(boundaries[-1] + length)
    sequence = packed_sequence(grids, cells)
    return ChunkLayout(sequence, sequence.positions((stride, stride)), tuple(boundaries))


def _argument(args: tuple, kwargs: dict, name: str, index: int):
    return kwargs.get(name, args[index] if len(args) > index else None)


class MiniCPMPlacer(LayerPlacer):
    """Places one attention layer of a MiniCPM vision tower: one call ``[1, heads, n, n]`` per chunk of
    ``cu_seqlens`` (a view, or a window of the merger), or one call when the sequence is one chunk.

    Args:
        model: the recorded model (named in messages).
        tower_name: qualified name of the vision tower.
        tower: the tower.
        module: the recorded attention module.
        in_merger: the module is the window merger's attention (else an encoder layer's).
    """

    def __init__(self, model: nn.Module, tower_name: str, tower: nn.Module, module: nn.Module, in_merger: bool):
        self.model, self.tower_name, self.tower, self.module = model, tower_name, tower, module
        self.in_merger = in_merger
        self.patch = int(tower.embeddings.patch_size)
        kernel = tuple(int(k) for k in tower.vit_merger.window_kernel_size)
        self.window = kernel[0] if kernel[0] == kernel[1] else None  # the model refuses other kernels itself
        self._key = f"minicpmv.attention.{id(module)}"

    def install(self, context: CallContext) -> list[torch.utils.hooks.RemovableHandle]:
        # Every placer of the tower stores the same facts: the strip and the sizes, read after the embeddings ran
        # (their convolution starts the recorder's call, which clears the facts of the last one), and whether the
        # window merger has run.
        name = self.tower_name

        def see_strip(module, args, kwargs, output) -> None:
            pixels = _argument(args, kwargs, "pixel_values", 0)
            sizes = _argument(args, kwargs, "target_sizes", 1)
            if not isinstance(pixels, torch.Tensor) or not isinstance(sizes, torch.Tensor) or sizes.dim() != 2:
                context.values.pop(_STRIP + name, None)  # a call the model itself cannot run: nothing of it to place
                return
            grids = tuple((int(h), int(w)) for h, w in sizes.tolist())
            context.values[_STRIP + name] = _Strip(tuple(int(s) for s in pixels.shape), grids, int(output.shape[1]))

        def see_merger(module, args, kwargs) -> None:
            context.values[_MERGER_GIVEN + name] = [k for k in ("window_index", "cu_window_seqlens")
                                                    if kwargs.get(k) is not None]

        def merged(module, args, output) -> None:
            context.values[_MERGED + name] = True

        def see_attention(module, args, kwargs) -> None:
            context.values[self._key] = {"cu_seqlens": _argument(args, kwargs, "cu_seqlens", 1), "calls": 0}

        return [self.tower.embeddings.register_forward_hook(see_strip, with_kwargs=True),
                self.tower.vit_merger.register_forward_pre_hook(see_merger, with_kwargs=True),
                self.tower.vit_merger.register_forward_hook(merged),
                self.module.register_forward_pre_hook(see_attention, with_kwargs=True)]

    def _strip_grids(self, context: CallContext) -> tuple[tuple[int, int], ...]:
        """The views' grids, checked against the strip the embeddings cut."""
        tower = self.tower_name or type(self.tower).__name__
        strip: _Strip | None = context.values.get(_STRIP + self.tower_name)
        if strip is None:
            raise NotPlaceable(f"the embeddings of its tower {tower} did not run in this call before it attended, so "
                               "the grids of its tokens are unknown; run the tower on pixel_values and target_sizes")
        p = self.patch
        count = sum(h * w for h, w in strip.grids)
        if (len(strip.shape) != 4 or strip.shape[0] != 1 or strip.shape[2] != p
                or strip.shape[3] != p * count or strip.tokens != count or any(h < 1 or w < 1 for h, w in strip.grids)):
            raise NotPlaceable(
                f"its tower {tower} was given pixel_values {list(strip.shape)} and target_sizes "
                f"{[list(g) for g in strip.grids]}; vitmad "
                f"places the strip its image processor packs, [1, C, {p}, {p} * sum(h * w)]: the {p} px patches of "
                "each view (h x w of target_sizes) row-major, one view after the other"
            )
        return strip.grids

    def _chunks(self, context: CallContext, cu_seqlens: torch.Tensor | None) -> tuple[ChunkLayout, str, float]:
        grids = self._strip_grids(context)
        merged = bool(context.values.get(_MERGED + self.tower_name))
        if (self.in_merger or merged) and self.window is None:
            kernel = list(self.tower.vit_merger.window_kernel_size)
            raise NotPlaceable(f"its window merger has a window_kernel_size of {kernel}, not a square one")
        if self.in_merger:
            given = context.values.get(_MERGER_GIVEN + self.tower_name)
            if given:
                raise NotPlaceable(f"its window merger was given precomputed {', '.join(given)}; vitmad places its "
                                   "windows by the order the merger derives from target_sizes: leave them unset")
            stride, window = float(self.patch), self.window
            kind = f"window {window}x{window} patches"
        elif merged:
            k = self.window
            stride, window = float(k * self.patch), None
            grids = tuple((h // k, w // k) for h, w in grids)
            kind = f"global per view, {k}x{k}-patch windows merged into tokens"
        else:
            stride, window, kind = float(self.patch), None, "global per view"
        layout = _layout(grids, window, stride)
        received = None if cu_seqlens is None else tuple(int(v) for v in cu_seqlens.tolist())
        if received != layout.boundaries:
            raise NotPlaceable(
                f"it received cu_seqlens {None if received is None else list(received)}, but the {kind} chunks of "
                f"views of {[list(g) for g in grids]} tokens are {list(layout.boundaries)}; vitmad does not know "
                "this tower's token order"
            )
        return layout, kind, stride

    def place(self, context: CallContext, lead: torch.Size, num_queries: int, num_keys: int) -> Placement:
        seen = context.values.get(self._key)
        if seen is None:
            raise NotPlaceable("it attended outside its own forward, which receives the cu_seqlens of its chunks")
        if "layout" not in seen:  # once per forward of the module, not per chunk
            seen["layout"] = self._chunks(context, seen["cu_seqlens"])
        layout, kind, stride = seen["layout"]
        return chunk_placement(seen, layout, (stride, stride), kind, lead, num_queries, num_keys)
