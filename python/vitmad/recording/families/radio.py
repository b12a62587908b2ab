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

The packed forward (``image_grid_hw`` ``[n_images, 2]``, ``pixel_values`` the flattened patches of every image,
``[sum_i h_i * w_i, C * p * p]``; Nemotron-H-Omni's image path, its ``vision_model`` a ``RadioModel``) builds one
sequence ``[1, sum_i (S + h_i * w_i), C]``: for each image its ``S`` summary tokens, then its ``h_i x w_i`` patches
row-major (``_embed_packed_patches``; the position embedding interpolated to each image's grid, flattened
row-major). Without flash attention each layer attends once per image over its chunk ``[S + h_i * w_i]`` (the
``cu_seqlens`` it receives), or once over the whole sequence when there is one image (no ``cu_seqlens``). Each
chunk is placed as the dense forward's image: its summary tokens without a position, patch ``(r, c)`` at
``((r + 0.5) p, (c + 0.5) p)`` pixels of the image as the processor resized it; the values fold per image onto
``[n_images, H, T_max]`` (``families/packed.py``, ``PackedSequence``). A query's prefix mass is its attention on
its own image's summary tokens (the only ones its call holds), and the prefix maps are each image's summary tokens'
rows over that image's own grid, NaN past it.

The temporally-packed video forward (Nemotron-H-Omni's video path: ``video_temporal_patch_size`` frames stacked on
the channels, ``[B, C * T, H, W]``) cuts each batch entry, a tubelet of ``T`` frames, into the same row-major grid
of ``p x p`` cells after the same summary tokens (``_embed_dense_patches`` with the video projection), and each
entry attends within itself: it is placed as a dense image of ``H x W`` pixels. Every token of a tubelet spans
the same ``T`` frames, so tokens are apart in space alone (no time distance, unlike the video family's tubelets
in a sequence of them).

Refused (a ``ValueError`` naming the layer): flash attention over several packed images (one variable-length call
whose chunks the capture does not receive), a call in which the patch
embeddings did not run or cut pixels of another size than the model's input (resized by a wrapper), and an
attention whose shape or ``cu_seqlens`` is not that sequence's. A layout given by hand (``patch=`` and ``grid=``,
``num_prefix_tokens=``) places the dense forward, and the packed forward of one image, instead of the family, as
for any plain ViT; the packed forward of several images, which no one grid describes, is then refused.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import nn

from ..placement import CallContext, LayerGeometry, NotPlaceable, Placement, select_tokens
from .embeddings import EmbeddingsPlacer, check_cut_from_input, embeddings_above
from .packed import PackedSequence, packed_sequence
from .plain import _GRID as _PLAIN_GRID
from .plain import _plain_positions
from .stages import defined_in

__all__ = ["placer", "is_tower", "RadioPlacer", "EMBEDDINGS"]

EMBEDDINGS = (("RadioPatchEmbeddings", "modeling_radio"),)
_SEEN = "radio.seen."  # + the embeddings' name: the _Seen of the current call
_CHUNKS = "radio.chunks."  # + the attention module's id: its cu_seqlens and the calls it made in this forward


@dataclass(frozen=True)
class _Seen:
    """What the patch embeddings were given in one call.

    Attributes:
        kind: "dense" (``[B, C, H, W]`` images), "video" (temporally-packed frames on the channels) or "packed"
            (``image_grid_hw`` given).
        shape: the shape of the pixels (or flattened patches) they were given.
        grids: "packed": ``(h, w)`` patches of each image of ``image_grid_hw``.
    """

    kind: str
    shape: tuple[int, ...]
    grids: tuple[tuple[int, int], ...] = ()


def is_tower(module: nn.Module) -> bool:
    """Whether ``module`` is a RADIO tower (``RadioModel``, also Nemotron-H-Omni's ``vision_model``): for the
    recorder, the tower that embeds the image, which it finds by a patch-embedding convolution in other models."""
    return defined_in(module, "RadioModel", "modeling_radio")


def placer(model: nn.Module, name: str, module: nn.Module) -> RadioPlacer | None:
    """A :class:`RadioPlacer` for the ``RadioAttention`` modules of a ``RadioModel``, else None."""
    if not defined_in(module, "RadioAttention", "modeling_radio"):
        return None
    found = embeddings_above(model, name, EMBEDDINGS)
    return None if found is None else RadioPlacer(model, *found, module)


class RadioPlacer(EmbeddingsPlacer):
    """Places the tokens of one RADIO layer: the summary tokens without a position, then the row-major grid the
    patch embeddings cut in this call.

    Attributes:
        given_layout: the plain placer of a layout the user gave by hand (``patch=``, ``grid=``,
            ``num_prefix_tokens=``), set by the recorder: it places the call instead (the user's layout wins); the
            packed forward of several images stays refused.
    """

    defers_to_given_layout = True

    def __init__(self, model: nn.Module, embeddings_name: str, embeddings: nn.Module, attention: nn.Module):
        super().__init__(model, embeddings_name, embeddings)
        self.attention = attention
        self.given_layout = None
        tower_name = embeddings_name.rpartition(".")[0]
        # Named as the tower: inside a vision-language model (Nemotron-H-Omni's vision_model) the model is not RADIO.
        self.tower = (f"RADIO ({type(model).__name__})" if not tower_name else
                      f"RADIO ({tower_name}, a {type(model.get_submodule(tower_name)).__name__})")

    def install(self, context: CallContext) -> list:
        key = _SEEN + self.embeddings_name
        chunks = _CHUNKS + str(id(self.attention))
        num_channels, patch = int(self.embeddings.num_channels), int(self.embeddings.patch_size)

        def see(module, args, kwargs) -> None:
            pixels = args[0] if args else kwargs.get("pixel_values")
            grids = args[1] if len(args) > 1 else kwargs.get("image_grid_hw")
            if not isinstance(pixels, torch.Tensor) or pixels.dim() < 2:
                context.values.pop(key, None)  # a call the module itself refuses: nothing of it to place
                return
            shape = tuple(int(s) for s in pixels.shape)
            if grids is not None:
                seen = _Seen("packed", shape, tuple((int(h), int(w)) for h, w in grids.tolist()))
            else:
                # The module's own test (forward): other channel counts are temporally-packed video frames.
                seen = _Seen("dense" if shape[1] == num_channels else "video", shape)
                if len(shape) == 4:
                    # The grid the model cuts (_image_to_patches, also of a tubelet), for the plain layout's check
                    # of a grid given by hand, as its patch-embedding hook reports a convolution's.
                    context.values[_PLAIN_GRID] = (shape[-2] // patch, shape[-1] // patch)
            context.values[key] = seen

        def see_attention(module, args, kwargs) -> None:
            cu_seqlens = args[2] if len(args) > 2 else kwargs.get("cu_seqlens")
            context.values[chunks] = {"cu_seqlens": cu_seqlens, "calls": 0}

        return [self.embeddings.register_forward_pre_hook(see, with_kwargs=True),
                self.attention.register_forward_pre_hook(see_attention, with_kwargs=True)]

    def place(self, context: CallContext, lead: torch.Size, num_queries: int, num_keys: int) -> Placement:
        seen: _Seen | None = context.values.get(_SEEN + self.embeddings_name)
        if seen is not None and seen.kind == "packed" and self.given_layout is not None and len(seen.grids) > 1:
            raise NotPlaceable(
                f"{self.tower} was given image_grid_hw with {len(seen.grids)} images of their own grids "
                f"{[list(g) for g in seen.grids]} (its packed forward), which the one grid given by hand (patch=, "
                "grid=, num_prefix_tokens=) does not describe; leave them unset: vitmad places each image on its own "
                "grid"
            )
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
        if seen.kind == "packed":
            return self._place_packed(context, seen, lead, num_queries, num_keys)
        if len(seen.shape) != 4:
            raise NotPlaceable(f"{self.tower}'s patch embeddings were given pixels of shape {list(seen.shape)} "
                               "without image_grid_hw, where they take [B, C, H, W] images (or tubelets)")
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
                            f"{self.embeddings_name} cut {batch} {'tubelets' if seen.kind == 'video' else 'images'} of "
                            f"{height}x{width} pixels into "
                            f"{grid[0]}x{grid[1]} patches of {p} px after {summary} summary tokens")
        heads = int(lead[-1])
        return self.shared(context, f"{heads}.{grid}.{p}.{summary}",
                           lambda: _radio_placement(grid, float(p), summary, heads))

    def _place_packed(self, context: CallContext, seen: _Seen, lead: torch.Size, num_queries: int,
                      num_keys: int) -> Placement:
        """One call of the packed forward: the chunk of the image it attends over (one call per image, or one over
        the whole sequence for one image)."""
        summary = int(self.embeddings.cls_register_token.shape[0])
        grids = seen.grids
        patches = sum(h * w for h, w in grids)
        if len(seen.shape) != 2 or seen.shape[0] != patches:
            raise NotPlaceable(
                f"{self.tower}'s patch embeddings were given flattened patches of shape {list(seen.shape)} with "
                f"image_grid_hw {[list(g) for g in grids]}, where its packed forward takes [{patches}, C * p * p]"
            )
        boundaries = [0]
        for h, w in grids:
            boundaries.append(boundaries[-1] + summary + h * w)
        chunks = context.values.get(_CHUNKS + str(id(self.attention)))
        if chunks is None:
            raise NotPlaceable(f"it attended outside a forward of its attention module, whose cu_seqlens say which "
                               f"image of the {len(grids)} packed ones a call holds")
        received = chunks["cu_seqlens"]
        expected = boundaries if len(grids) > 1 else None  # one image: one plain sequence, no cu_seqlens
        if (None if received is None else [int(v) for v in received.tolist()]) != expected:
            raise NotPlaceable(
                f"it received cu_seqlens {None if received is None else received.tolist()}, but the images of "
                f"image_grid_hw {[list(g) for g in grids]}, each after {summary} summary tokens, make the chunks "
                f"{expected}; vitmad does not know this tower's token order"
            )
        chunk = chunks["calls"]
        chunks["calls"] += 1
        if chunk >= len(grids):
            raise NotPlaceable(f"it made more attention calls than the {len(grids)} packed images")
        length = boundaries[chunk + 1] - boundaries[chunk]
        if len(lead) != 2 or lead[0] != 1 or num_queries != length or num_keys != length:
            shape = f"[{', '.join(map(str, lead))}, {num_queries}, {num_keys}]"
            if num_queries == boundaries[-1] and len(grids) > 1:
                raise NotPlaceable(
                    f"its attention is one call {shape} over the whole packed sequence of {len(grids)} images "
                    "(flash attention's variable-length call, whose chunks vitmad's capture does not receive); load "
                    "the model with attn_implementation='sdpa' or 'eager'"
                )
            raise NotPlaceable(f"its attention call {chunk} has shape {shape}, but image {chunk} of image_grid_hw "
                               f"{[list(g) for g in grids]} is [1, heads, {length}, {length}] with its {summary} "
                               "summary tokens")
        heads, p = int(lead[1]), float(self.embeddings.patch_size)
        sequence, positions = _packed_layout(grids, summary, p)
        return Placement(positions[boundaries[chunk]:boundaries[chunk + 1]], None, sequence.fold(heads),
                         sequence.geometry((p, p), "global per image", heads), present=sequence.present(),
                         consecutive_chunks=True)


@functools.lru_cache(maxsize=64)
def _packed_layout(grids: tuple[tuple[int, int], ...], summary: int,
                   patch: float) -> tuple[PackedSequence, torch.Tensor]:
    """The packed sequence (each image's summary tokens, then its patches row-major) and its positions; the layers
    and calls of a model share it (read-only tensors)."""
    cells = []
    for h, w in grids:
        rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        cells.append(torch.stack([rows, cols], dim=-1).reshape(-1, 2))
    sequence = packed_sequence(grids, cells, summary)
    return sequence, sequence.positions((patch, patch))


def _radio_placement(grid: tuple[int, int], patch: float, summary: int, heads: int) -> Placement:
    positions, index = _plain_positions(grid, (patch, patch), summary, 0)
    geometry = LayerGeometry(grid, (patch, patch), "global", heads, summary)
    return Placement(positions, None, select_tokens(index), geometry)
