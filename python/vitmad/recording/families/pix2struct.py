"""Towers fed ``flattened_patches``: Pix2Struct's vision encoder (transformers ``Pix2StructVisionModel``, the
``encoder`` of ``Pix2StructForConditionalGeneration``) and Kosmos-2.5's (``Kosmos2_5VisionModel``, the
``vision_model`` of ``Kosmos2_5Model`` and ``Kosmos2_5ForConditionalGeneration``), the only transformers models with
that input.

Their image processors (``Pix2StructImageProcessor``, ``Kosmos2_5ImageProcessor``) resize each image, keeping its
aspect ratio, to ``rows x cols`` whole patches of ``ph x pw`` pixels within ``max_patches``, cut it into patches
row-major and give each patch a row of ``flattened_patches`` ``[B, max_patches, 2 + ph * pw * C]``: column 0 its row
id, column 1 its column id, both 1-based ("so IDs don't contain zeros, which represent padding"), then its pixels;
the slots past ``rows * cols`` are zeros, ids included, and ``attention_mask`` (``[B, max_patches]``, 1 on a patch)
is 0 there. The embeddings add a learned row and column embedding looked up by those ids (``.long()`` of column 0
and 1), so the ids alone place a token: slot order and grid size come from nowhere else. Each layer attends over
all ``max_patches`` slots with the padding keys masked out (Pix2Struct through ``create_bidirectional_mask``,
Kosmos-2.5 through ``_expand_mask``); without an ``attention_mask`` the towers take ``flattened_patches.sum(-1) !=
0``, as vitmad does then.

A pre-hook on the tower reads ``flattened_patches`` and ``attention_mask`` in every call. Token ``t`` of image ``b``
with row id ``r`` and column id ``c`` sits at the centre of its cell, ``((r - 1 + 0.5) ph, (c - 1 + 0.5) pw)`` pixels
of the image as the processor resized it (``docs/definition.md``, native resolution). A slot the mask hides, or
whose ids are ``(0, 0)`` (the processor's padding, also where a mask of the user's leaves it visible), has no
position: neither query nor key, the attention on it drops out like a prefix token's. Image ``b``'s grid is its
largest row id by its largest column id; every layer folds onto ``[B, H, T]``, ``T`` the largest ``rows * cols`` of
the call, image ``b``'s cells row-major on its own grid first, NaN after (and at a cell no token has: ids need not
be in row-major order nor fill the grid).

The patch size is not in the model: ``patch_projection`` takes ``ph * pw * C`` values. The processors' default
``patch_size`` is 16 x 16 on RGB images, 768 values, which every released checkpoint uses: a projection of 768
inputs is taken for 16 x 16 patches unless ``patch=`` says otherwise (a processor with another ``patch_size`` for a
768-input model, 8 x 32 say, cannot be told apart: pass ``patch=``). Any other input size needs ``patch=`` (square
patches of ``patch`` pixels whose ``patch * patch`` divides it), else the recording is refused when it starts.

Refused per call (a ``ValueError`` naming the layer): ids of a patch (mask 1) that are not whole numbers, below 1
(one of them 0: not the padding's ``(0, 0)``, which 0-based ids give), or repeated within an image; an
``attention_mask`` with values other than 0 and 1 (the towers disagree on them) or not ``[B, max_patches]``; an
image without any patch; an attention that is not ``[B, H, max_patches, max_patches]``; a layer run outside its
tower's forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..placement import CallContext, LayerGeometry, LayerPlacer, NotPlaceable, Placement
from .stages import defined_in, forward_arguments, innermost_on_path

__all__ = ["placer", "is_tower", "FlattenedPatchesPlacer", "DEFAULT_PATCH"]

# The image processors' default patch_size (16 x 16) on RGB images: the input size of every released projection.
DEFAULT_PATCH = 16
_DEFAULT_VALUES = 3 * DEFAULT_PATCH * DEFAULT_PATCH
_SEEN = "pix2struct.inputs."  # + the tower's name: (flattened_patches, attention_mask) of the current call
_TOWERS = (("Pix2StructVisionModel", "modeling_pix2struct"), ("Kosmos2_5VisionModel", "modeling_kosmos2_5"))


def is_tower(module: nn.Module) -> bool:
    """Whether ``module`` is a tower fed ``flattened_patches`` (Pix2Struct's or Kosmos-2.5's vision model): for the
    recorder, the tower that embeds the image, which it finds by a patch-embedding convolution in other models."""
    return any(defined_in(module, name, suffix) for name, suffix in _TOWERS)


def placer(model: nn.Module, name: str, module: nn.Module) -> FlattenedPatchesPlacer | None:
    """A :class:`FlattenedPatchesPlacer` for the self-attention layers of such a tower (``encoder.layer.<i>
    .attention``), else None."""
    found = innermost_on_path(model, name, is_tower)
    if found is None:
        return None
    tower_name, tower = found
    relative = name[len(tower_name) + 1:] if tower_name else name
    return FlattenedPatchesPlacer(model, tower_name, tower) if relative.startswith("encoder.layer.") else None


@dataclass(frozen=True)
class _Tokens:
    """Where the tokens of one tower call are.

    Attributes:
        positions: ``[B, 1, N, 2]`` pixel centres, NaN rows for the slots without a position.
        grids: per image, ``(rows, cols)``: its largest row id and column id.
        index: ``[B, T]`` the slot of each cell of image ``b``'s grid (row-major, ``T`` the largest ``rows * cols``),
            ``N`` where no slot has that cell.
        present: ``[B, T]`` bool, the cells a slot has, or None when every image has all ``T``.
    """

    positions: torch.Tensor
    grids: tuple[tuple[int, int], ...]
    index: torch.Tensor
    present: torch.Tensor | None


class FlattenedPatchesPlacer(LayerPlacer):
    """Places the tokens of one self-attention layer of a Pix2Struct or Kosmos-2.5 vision tower (attention
    ``[B, H, max_patches, max_patches]``) from the row and column ids of ``flattened_patches``.

    Args:
        model: the recorded model (for messages).
        tower_name: qualified name of the tower.
        tower: the ``Pix2StructVisionModel`` or ``Kosmos2_5VisionModel``.

    Attributes:
        takes_given_patch: the recorder hands it ``patch=`` (:meth:`use_patch`) when the recording starts.
    """

    takes_given_patch = True

    def __init__(self, model: nn.Module, tower_name: str, tower: nn.Module):
        self.model, self.tower_name, self.tower = model, tower_name, tower
        self.key = _SEEN + tower_name
        self.patch: int | None = None

    def use_patch(self, given: int | None) -> None:
        """Sets the pixel size of the patches: ``given`` (``record``'s ``patch=``) or the processors' default.

        Raises:
            ValueError: ``given`` is None and the projection's input is not the default's 768 values, or ``given``
                is not the side of an RGB patch of its values.
        """
        tower = type(self.tower).__name__
        values = int(self.tower.embeddings.patch_projection.in_features)
        if given is None and values != _DEFAULT_VALUES:
            raise ValueError(
                f"vitmad.record: {tower} embeds patches of {values} values (embeddings.patch_projection), not the "
                f"{_DEFAULT_VALUES} = 3 x {DEFAULT_PATCH} x {DEFAULT_PATCH} of its image processor's default "
                f"patch_size on RGB images, and the pixel size of its patches is in the processor, not in the model; "
                "pass patch=<pixels per side of the processor's square patch_size>, or positions=<[N, 2] pixel "
                "position of each token> for patches that are not square"
            )
        if given is not None and values != 3 * given * given:
            # Its image processors convert every image to RGB: any other count is no patch of that side (8 passed
            # for a 768-value projection, 12 channels of 8 x 8, halved the MAD silently, QA 324).
            raise ValueError(
                f"vitmad.record: patch={given} does not fit {tower}: its image processor cuts RGB patches, of 3 x "
                f"{given} x {given} = {3 * given * given} values at that side, but embeddings.patch_projection takes "
                f"{values}; pass the side of the processor's square patch_size, or positions=<[N, 2] pixel position "
                "of each token> for patches that are not square"
            )
        self.patch = DEFAULT_PATCH if given is None else given

    def install(self, context: CallContext) -> list[torch.utils.hooks.RemovableHandle]:
        def see(module, args, kwargs) -> None:
            arguments = forward_arguments(module, args, kwargs)
            context.values[self.key] = (arguments.get("flattened_patches"), arguments.get("attention_mask"))

        return [self.tower.register_forward_pre_hook(see, with_kwargs=True)]

    def _call_tokens(self, context: CallContext) -> _Tokens:
        seen = context.values.get(self.key)
        where = self.tower_name or type(self.tower).__name__
        if seen is None:
            raise NotPlaceable(f"it ran outside a forward of its {type(self.tower).__name__} ({where}), whose "
                               "flattened_patches place its tokens")
        built = context.values.get(self.key + ".tokens")
        if built is not None and built[0] is seen:
            return built[1]  # every layer of the call shares the tokens
        tokens = self._tokens(*seen)
        context.values[self.key + ".tokens"] = (seen, tokens)
        return tokens

    def _tokens(self, patches: torch.Tensor | None, mask: torch.Tensor | None) -> _Tokens:
        tower = type(self.tower).__name__
        if not isinstance(patches, torch.Tensor) or patches.dim() != 3 or patches.shape[-1] < 3:
            shape = list(patches.shape) if isinstance(patches, torch.Tensor) else type(patches).__name__
            raise NotPlaceable(f"{tower} got flattened_patches {shape}; expected [B, max_patches, 2 + ph * pw * C], "
                               "row and column ids first")
        batch, slots = patches.shape[:2]
        if mask is None:
            mask = patches.sum(dim=-1) != 0  # the towers' own default
        elif tuple(mask.shape) != (batch, slots):
            raise NotPlaceable(f"{tower} got attention_mask {list(mask.shape)} beside flattened_patches "
                               f"{list(patches.shape)}; vitmad reads a [B, max_patches] mask (1: a patch, 0: padding)")
        elif bool(((mask != 0) & (mask != 1)).any()):
            raise NotPlaceable(f"{tower} got an attention_mask with values other than 0 and 1 (Pix2Struct keeps every "
                               "nonzero slot, Kosmos-2.5 only those at 1); pass 1 for a patch, 0 for padding")
        ids = patches[..., :2].detach()
        padding = (ids == 0).all(-1)  # the processors' padding slots, whatever the mask says
        kept = (mask != 0).to(ids.device) & ~padding
        wrong = kept & (~ids.isfinite() | (ids != ids.floor()) | (ids < 1)).any(-1)
        if bool(wrong.any()):
            image, slot = (int(i) for i in wrong.nonzero()[0])
            row, col = (float(v) for v in ids[image, slot])
            raise NotPlaceable(
                f"slot {slot} of image {image} is a patch (attention_mask 1) with row id {row:g} and column id "
                f"{col:g}; the image processor numbers rows and columns from 1 and gives padding slots (0, 0), and "
                "the tower embeds whole ids, so vitmad places whole ids >= 1 only (0-based ids?)"
            )
        ids = torch.where(kept[..., None], ids, 1).long() - 1  # 0-based cells; the unplaced slots at (0, 0)
        counts = kept.sum(-1)
        if bool((counts == 0).any()):
            image = int((counts == 0).nonzero()[0, 0])
            raise NotPlaceable(f"image {image} of the batch has no patch: every slot of its flattened_patches is "
                               "padding (attention_mask 0, or ids (0, 0)), so it has no token to measure")
        rows = torch.where(kept, ids[..., 0], -1).amax(-1) + 1  # [B]
        cols = torch.where(kept, ids[..., 1], -1).amax(-1) + 1
        cell = ids[..., 0] * cols[:, None] + ids[..., 1]  # [B, N], row-major on each image's own grid
        longest = int((rows * cols).max())
        # Slot of each cell; a cell two slots claim keeps one of them, which the count below finds.
        index = torch.full((batch, longest + 1), slots, dtype=torch.long, device=ids.device)
        slot = torch.arange(slots, device=ids.device).expand(batch, slots)
        index.scatter_(1, torch.where(kept, cell, longest), torch.where(kept, slot, slots))
        index = index[:, :longest]
        present = index != slots
        repeated = counts != present.sum(-1)
        if bool(repeated.any()):
            image = int(repeated.nonzero()[0, 0])
            raise NotPlaceable(
                f"image {image} of the batch has two patches with the same row and column ids in flattened_patches "
                f"({int(counts[image])} patches on {int(present[image].sum())} cells); the tower would embed them at "
                "one place, which is no image the processor cut"
            )
        patch = float(self.patch)
        centres = (ids.to(torch.float32) + 0.5) * patch
        positions = torch.where(kept[..., None], centres, float("nan")).unsqueeze(1)
        grids = tuple((int(h), int(w)) for h, w in zip(rows.tolist(), cols.tolist()))
        return _Tokens(positions, grids, index, None if bool(present.all()) else present)

    def place(self, context: CallContext, lead: torch.Size, num_queries: int, num_keys: int) -> Placement:
        tokens = self._call_tokens(context)
        batch, slots = tokens.positions.shape[0], tokens.positions.shape[2]
        if len(lead) != 2 or int(lead[0]) != batch or num_queries != slots or num_keys != slots:
            raise NotPlaceable(
                f"its attention has shape [{', '.join(map(str, lead))}, {num_queries}, {num_keys}]; expected "
                f"[{batch}, heads, {slots}, {slots}]: the {slots} slots of the flattened_patches its "
                f"{type(self.tower).__name__} got"
            )
        same = len(set(tokens.grids)) == 1
        patch = float(self.patch)
        geometry = LayerGeometry(tokens.grids[0] if same else None, (patch, patch), "global", int(lead[-1]), 0,
                                 None if same else tokens.grids)
        index = tokens.index

        def fold(values: torch.Tensor) -> torch.Tensor:
            # Slot N, past the last one, reads NaN: the cells no slot has.
            padded = torch.cat([values, values.new_full((*values.shape[:-1], 1), float("nan"))], -1)
            return padded.gather(-1, index.to(values.device)[:, None, :].expand(*values.shape[:-1], -1))

        return Placement(tokens.positions, None, fold, geometry, present=tokens.present)
