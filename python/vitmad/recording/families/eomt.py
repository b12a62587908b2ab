"""EoMT, the Encoder-only Mask Transformer (transformers' ``EomtForUniversalSegmentation``,
``EomtDinov3ForUniversalSegmentation``), and its video form VidEoMT (``VideomtForUniversalSegmentation``).

A plain ViT whose last ``config.num_blocks`` blocks also carry learned queries. The embeddings make
``[CLS, R registers, gh x gw patches row-major]`` (a patch projection of kernel = stride = ``p``); the model's forward
puts the ``Q`` queries in front of that sequence before block ``num_hidden_layers - num_blocks``
(``torch.cat((query, hidden_states), dim=1)``), so from that block on every block attends over
``[Q queries, CLS, R registers, patches]``. The queries, the CLS and the registers have no position (their rows are
the prefix maps, queries first); patch ``(r, c)`` sits at ``((r + 0.5) p, (c + 0.5) p)``.

The mask: in a query block of a model in training mode, or in eval mode where ``attn_mask_probs`` of the block is
above 0, the forward predicts masks from the queries and hands the block a ``[B, H, N, N]`` additive mask that keeps
each query's attention on the patches under its predicted mask (some queries, drawn at random where the probability
is below 1, keep every patch); patches, CLS and registers attend to every token. A query block whose probability is 0
in eval mode reuses the mask of the block before it, if any. Whatever the mask, it reaches the attention interface,
which vitmad reads as the implementation reads it (``interface_call.py``): the statistics are of the attention under
it. EoMT-DINOv3's 2-D RoPE (random shifts and scales of its coordinates in training) rotates q and k of the patches
and moves no token.

VidEoMT runs the frames of ``pixel_values_videos [B, F, C, H, W]`` as ``B * F`` images (video-major: frame ``f`` of
video ``b`` is image ``b * F + f``) through the blocks before the queries, then runs the query blocks once per frame,
over frame ``f`` of every video (``[B, H, N, N]``), with queries carried from the frame before: no attention crosses
frames, so each frame is an image of its own, placed in space alone, and every layer's values are ``[B * F, H, T]``
in that order. A query block's ``F`` forwards are one layer (``Placement.batch_parts``), recorded when the last ends.

Hooks read, in each forward of the segmentation model, the grid and batch its patch projection made and the video's
``B, F``; a block run outside that forward, or a sequence not of the layout above (a hook that adds tokens, a batch
regrouped), is refused with what was seen.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from ..placement import CallContext, LayerGeometry, LayerPlacer, NotPlaceable, Placement, RefusingPlacer, on_device
from .embeddings import check_cut_from_input, check_sequence
from .plain import _plain_positions
from .stages import defined_in, innermost_on_path, pair

__all__ = ["placer", "EomtPlacer"]


@dataclass(frozen=True)
class _Design:
    """One EoMT model.

    Attributes:
        attention: class name of its attention modules.
        model: class name of the segmentation model whose forward inserts the queries.
        modeling: the modeling module both are defined in (its name's last part).
        projection: qualified name, in the model, of the patch projection (a ``Conv2d``).
        video: the model takes ``pixel_values_videos`` and runs its query blocks once per frame.
    """

    attention: str
    model: str
    modeling: str
    projection: str
    video: bool


_DESIGNS = (
    _Design("EomtAttention", "EomtForUniversalSegmentation", "modeling_eomt",
            "embeddings.patch_embeddings.projection", False),
    _Design("EomtDinov3Attention", "EomtDinov3ForUniversalSegmentation", "modeling_eomt_dinov3",
            "embeddings.patch_embeddings", False),
    _Design("VideomtAttention", "VideomtForUniversalSegmentation", "modeling_videomt",
            "embeddings.patch_embeddings.projection", True),
)
_SEEN = "eomt."  # + the model's qualified name: the facts of its forward in progress


class _Seen(NamedTuple):
    """What a forward of the model showed before its blocks ran.

    Attributes:
        batch: images the patch projection embedded (VidEoMT: videos x frames).
        grid: ``(gh, gw)`` of the patches it cut.
        pixels: ``(height, width)`` of the pixels it cut.
        video: VidEoMT: ``(videos, frames)`` of ``pixel_values_videos``; None for images.
    """

    batch: int
    grid: tuple[int, int]
    pixels: tuple[int, int]
    video: tuple[int, int] | None


def placer(model: nn.Module, name: str, module: nn.Module) -> LayerPlacer | None:
    """An :class:`EomtPlacer` for the attention of a block of an EoMT model, else None."""
    for design in _DESIGNS:
        if not defined_in(module, design.attention, design.modeling):
            continue
        found = innermost_on_path(model, name, lambda m, d=design: defined_in(m, d.model, d.modeling))
        if found is None:
            return None  # an EoMT block outside its segmentation model: the plain layout, which checks each call
        owner_name, owner = found
        where = owner_name or type(owner).__name__
        block = next((i for i, layer in enumerate(owner.layers) if layer.attention is module), None)
        if block is None:
            return RefusingPlacer(f"it is not the attention of one of {where}.layers, whose sequence vitmad knows; "
                                  "leave it out with layers=[the other attention modules]")
        conv = owner.get_submodule(design.projection)
        if (not isinstance(conv, nn.Conv2d) or pair(conv.kernel_size) != pair(conv.stride)
                or pair(conv.padding) != (0, 0) or pair(conv.dilation) != (1, 1)):
            return RefusingPlacer(f"{where}.{design.projection} is not a Conv2d of kernel == stride without padding "
                                  "or dilation; vitmad places whole patches cut that way only")
        return EomtPlacer(design, owner_name, owner, block)
    return None


class EomtPlacer(LayerPlacer):
    """Places one block of an EoMT model: ``[CLS, registers, patches]`` before the queries join,
    ``[queries, CLS, registers, patches]`` from then on, the patches on the grid the projection cut in this call.

    Args:
        design: the model's design.
        owner_name: qualified name of the segmentation model.
        owner: that module.
        block: the block's index in ``owner.layers``.
    """

    def __init__(self, design: _Design, owner_name: str, owner: nn.Module, block: int):
        self.design, self.owner, self.block = design, owner, block
        self._key = _SEEN + owner_name
        self._where = owner_name or type(owner).__name__
        self._video: tuple[int, int] | None = None  # (videos, frames) of the forward in progress

    def install(self, context: CallContext) -> list:
        key, conv = self._key, self.owner.get_submodule(self.design.projection)

        def begin(module, args, kwargs) -> None:
            # Kept on the placer until the projection runs: the recorder starts the call (and clears its values) when
            # the model's first convolution begins.
            given = args[0] if args else kwargs.get("pixel_values_videos")
            self._video = tuple(int(s) for s in given.shape[:2]) \
                if isinstance(given, torch.Tensor) and given.dim() == 5 else None
            context.values.pop(key, None)

        def end(module, *_) -> None:
            # The facts hold within one forward of the model: a block run on its own after it must not be placed on
            # the last image's grid.
            self._video = None
            context.values.pop(key, None)

        def see_patches(module, args, output) -> None:
            context.values[key] = _Seen(int(output.shape[0]), (int(output.shape[-2]), int(output.shape[-1])),
                                        (int(args[0].shape[-2]), int(args[0].shape[-1])), self._video)

        return [self.owner.register_forward_pre_hook(begin, with_kwargs=True),
                self.owner.register_forward_hook(end, always_call=True),
                conv.register_forward_hook(see_patches)]

    def place(self, context: CallContext, lead: torch.Size, num_queries: int, num_keys: int) -> Placement:
        owner, where, design = self.owner, self._where, self.design
        seen = context.values.get(self._key)
        if seen is None:
            raise NotPlaceable(
                f"it ran outside a forward of {where} ({design.model}), or before its patch projection "
                f"{design.projection} ran in it, so the sequence it attends over (the queries join it in that "
                f"forward) is unknown; run {where} on its pixels, or pass positions=<[N, 2] pixel position of each "
                "token, NaN rows for tokens off the image>"
            )
        embedded, grid, cut, video = seen
        check_cut_from_input(context, f"{where}.{design.projection}", *cut, "model", "the queries, CLS and registers")
        # The sequence as the model's forward concatenates it: its own parameters, not the config, say the counts.
        extra = 1 + int(owner.embeddings.register_tokens.shape[1])
        start = owner.num_hidden_layers - owner.config.num_blocks
        joined = self.block >= start
        queries = int(owner.query.weight.shape[0]) if joined else 0
        extra += queries
        cells = grid[0] * grid[1]
        parts = 1
        if design.video:
            if video is None or video[0] * video[1] != embedded:
                given = "no 5-D pixel_values_videos" if video is None else \
                    f"pixel_values_videos of {video[0]} videos x {video[1]} frames"
                raise NotPlaceable(f"its patch projection embedded {embedded} frames in a forward of {where} given "
                                   f"{given}, so vitmad does not know which frame each sequence is")
            batch, parts = (video[0], video[1]) if joined else (embedded, 1)
            what = f"frame by frame ({video[1]} frames of {video[0]} videos)" if joined else \
                f"{video[0]} videos x {video[1]} frames as {embedded} images"
        else:
            batch, what = embedded, f"{embedded} images"
        built = (f"{queries} learned queries (from block {start}), " if joined else "") + \
            f"the CLS, {extra - queries - 1} registers and the {grid[0]}x{grid[1]} patches of {what}"
        check_sequence(lead, num_queries, num_keys, batch, extra + cells, built)
        stride = tuple(float(s) for s in pair(owner.get_submodule(design.projection).stride))
        positions, index = _plain_positions(grid, stride, extra, 0)
        attention = f"global, after {queries} learned queries, CLS and registers" if joined else "global"
        geometry = LayerGeometry(grid, stride, attention, int(lead[-1]), extra)
        return Placement(positions, None, _frames_fold(index, parts), geometry, batch_parts=parts)


def _frames_fold(index: torch.Tensor, frames: int):
    """The fold of ``[frames * B, H, N]`` (the per-query values of a query block's forwards, frame after frame, each
    over frame ``f`` of the ``B`` videos) onto ``[B * frames, H, T]``, video-major as the blocks before the queries
    hold the frames; with one frame, ``values[..., index]``."""

    def fold(values: torch.Tensor) -> torch.Tensor:
        picked = values.index_select(-1, on_device(index, values.device))
        if frames == 1:
            return picked
        per_frame = picked.unflatten(0, (frames, -1))
        return per_frame.transpose(0, 1).flatten(0, 1)

    return fold
