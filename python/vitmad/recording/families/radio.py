"""RADIO (transformers ``RadioModel``, NVIDIA C-RADIO): summary tokens, then a row-major patch grid cut without a
convolution.

``RadioPatchEmbeddings`` cuts the image with a reshape and projects the patches with a ``Linear``, so the plain
layout finds no patch-embedding convolution to read the grid from. Its dense forward (``pixel_values``
``[B, C, H, W]``, no ``image_grid_hw``) reshapes the image into ``H // p x W // p`` patches of ``p x p`` pixels,
row-major (``_image_to_patches``; an ``H`` or ``W`` that ``p`` does not divide fails in that reshape, nothing is
cropped, padded or resized), adds a position embedding interpolated to that grid (the "cropped position
embedding": it changes the tokens' values, not their order) and prepends ``cls_register_token``, the
``num_cls_tokens + num_registers`` summary tokens. Every layer then attends ``[B, H, S + gh * gw, S + gh * gw]``
over that sequence.

A pre-hook on the patch embeddings reads, in each call, the shape of the pixels they cut: the grid is
``(H // p, W // p)`` as the model computes it, the summary-token count is the embeddings' ``cls_register_token``
rows. The summary tokens have no position (NaN rows); patch ``(i, j)`` is at the centre ``((i + 0.5) p,
(j + 0.5) p)`` of its cell, in pixels of the model input (``docs/definition.md``). With
``stats=[..., "prefix_maps"]`` the summary tokens' rows over the grid are the prefix maps.

Refused (a ``ValueError`` naming the layer): the packed forward (``image_grid_hw``: flattened patches of several
images, each image's summary tokens inside its own ``cu_seqlens`` chunk), the temporally-packed video forward
(``video_temporal_patch_size`` frames stacked on the channels: each batch entry a tubelet of frames, not an image),
a call in which the patch embeddings did not run or cut pixels of another size than the model's input (resized by
a wrapper), and an attention whose shape is not that sequence. A layout given by hand (``patch=`` and ``grid=``,
``num_prefix_tokens=``) places the dense forward instead of the family, as for any plain ViT; the packed forward of
several images stays refused.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..placement import CallContext, LayerGeometry, NotPlaceable, Placement, select_tokens
from .embeddings import EmbeddingsPlacer, check_cut_from_input, embeddings_above
from .plain import _GRID as _PLAIN_GRID
from .plain import _plain_positions
from .stages import defined_in

__all__ = ["placer", "RadioPlacer", "EMBEDDINGS"]

EMBEDDINGS = (("RadioPatchEmbeddings", "modeling_radio"),)
_SEEN = "radio.seen."  # + the embeddings' name: the _Seen of the current call


@dataclass(frozen=True)
class _Seen:
    """What the patch embeddings were given in one call.

    Attributes:
        kind: "dense" (``[B, C, H, W]`` images), "video" (temporally-packed frames on the channels) or "packed"
            (``image_grid_hw`` given).
        shape: the shape of the pixels (or flattened patches) they were given.
        images: "packed": the number of images in ``image_grid_hw``.
    """

    kind: str
    shape: tuple[int, ...]
    images: int = 0


def placer(model: nn.Module, name: str, module: nn.Module) -> RadioPlacer | None:
    """A :class:`RadioPlacer` for the ``RadioAttention`` modules of a ``RadioModel``, else None."""
    if not defined_in(module, "RadioAttention", "modeling_radio"):
        return None
    found = embeddings_above(model, name, EMBEDDINGS)
    return None if found is None else RadioPlacer(model, *found)


def packed_refusal(model: nn.Module, images: int) -> str:
    return (f"RADIO ({type(model).__name__}) was given image_grid_hw ({images} image(s)): its packed forward takes "
            "the flattened patches of several images, each image's summary tokens inside its own cu_seqlens chunk, "
            "which vitmad does not place; record the images through its dense forward (pixel_values [B, C, H, W], "
            "one size per batch)")


class RadioPlacer(EmbeddingsPlacer):
    """Places the tokens of one RADIO layer: the summary tokens without a position, then the row-major grid the
    patch embeddings cut in this call.

    Attributes:
        given_layout: the plain placer of a layout the user gave by hand (``patch=``, ``grid=``,
            ``num_prefix_tokens=``), set by the recorder: it places the call instead (the user's layout wins); the
            packed forward of several images stays refused.
    """

    defers_to_given_layout = True

    def __init__(self, model: nn.Module, embeddings_name: str, embeddings: nn.Module):
        super().__init__(model, embeddings_name, embeddings)
        self.given_layout = None

    def install(self, context: CallContext) -> list:
        key = _SEEN + self.embeddings_name
        num_channels, patch = int(self.embeddings.num_channels), int(self.embeddings.patch_size)

        def see(module, args, kwargs) -> None:
            pixels = args[0] if args else kwargs.get("pixel_values")
            grids = args[1] if len(args) > 1 else kwargs.get("image_grid_hw")
            if not isinstance(pixels, torch.Tensor) or pixels.dim() < 2:
                context.values.pop(key, None)  # a call the module itself refuses: nothing of it to place
                return
            shape = tuple(int(s) for s in pixels.shape)
            if grids is not None:
                seen = _Seen("packed", shape, int(grids.shape[0]))
            else:
                # The module's own test (forward): other channel counts are temporally-packed video frames.
                seen = _Seen("dense" if shape[1] == num_channels else "video", shape)
                if seen.kind == "dense":
                    # The grid the model cuts (_image_to_patches), for the plain layout's check of a grid given by
                    # hand, as its patch-embedding hook reports a convolution's.
                    context.values[_PLAIN_GRID] = (shape[-2] // patch, shape[-1] // patch)
            context.values[key] = seen

        return [self.embeddings.register_forward_pre_hook(see, with_kwargs=True)]

    def place(self, context: CallContext, lead: torch.Size, num_queries: int, num_keys: int) -> Placement:
        seen: _Seen | None = context.values.get(_SEEN + self.embeddings_name)
        if seen is not None and seen.kind == "packed" and (self.given_layout is None or seen.images > 1):
            raise NotPlaceable(packed_refusal(self.model, seen.images))
        if self.given_layout is not None:
            return self.given_layout.place(context, lead, num_queries, num_keys)
        name = type(self.model).__name__
        if seen is None:
            raise NotPlaceable(
                f"RADIO's patch embeddings ({self.embeddings_name}) did not run in this call of {name} before it "
                "attended (its encoder called on hidden states?), so the grid of its tokens is unknown; run the "
                "model on pixel_values, or pass positions=<[N, 2] pixel position of each token, NaN rows for the "
                "summary tokens>"
            )
        if seen.kind == "video":
            raise NotPlaceable(
                f"RADIO ({name}) was given {seen.shape[1]} channels where its images have "
                f"{int(self.embeddings.num_channels)}: temporally-packed video frames (video_temporal_patch_size "
                "frames on the channels), each batch entry a tubelet of frames rather than an image, which vitmad "
                "does not place for this model; pass positions=<[N, 2] pixel position of each token, NaN rows for "
                "the summary tokens> if you mean one spatial grid per tubelet"
            )
        batch, height, width = seen.shape[0], seen.shape[-2], seen.shape[-1]
        p = int(self.embeddings.patch_size)
        if height % p or width % p:  # the model's reshape fails first; never placed on a guessed grid
            raise NotPlaceable(f"RADIO's patch embeddings cut {height}x{width} pixels, which its {p} px patches do "
                               "not divide")
        check_cut_from_input(context, f"RADIO's patch embeddings ({self.embeddings_name})", height, width,
                             "RadioModel", "the summary tokens")
        grid = (height // p, width // p)
        summary = int(self.embeddings.cls_register_token.shape[0])
        self.check_sequence(lead, num_queries, num_keys, batch, summary + grid[0] * grid[1],
                            f"{self.embeddings_name} cut {batch} images of {height}x{width} pixels into "
                            f"{grid[0]}x{grid[1]} patches of {p} px after {summary} summary tokens")
        heads = int(lead[-1])
        return self.shared(context, f"{heads}.{grid}.{p}.{summary}",
                           lambda: _radio_placement(grid, float(p), summary, heads))


def _radio_placement(grid: tuple[int, int], patch: float, summary: int, heads: int) -> Placement:
    positions, index = _plain_positions(grid, (patch, patch), summary, 0)
    geometry = LayerGeometry(grid, (patch, patch), "global", heads, summary)
    return Placement(positions, None, select_tokens(index), geometry)
