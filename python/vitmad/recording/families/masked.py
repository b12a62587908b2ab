"""Masked encoders and positions given by the user: each image's tokens are a subset of its grid, in any order.

**transformers ViTMAE** (``ViTMAEModel``, the encoder of ``ViTMAEForPreTraining``). ``ViTMAEEmbeddings`` adds the
position embeddings to the ``gh x gw`` patch grid, then ``random_masking`` draws per image a permutation of the
grid (``ids_shuffle = argsort(noise)``) and keeps its first ``K = int(gh * gw * (1 - mask_ratio))`` entries, in
that shuffled order, with CLS prepended: the encoder attends over ``1 + K`` tokens, token ``1 + j`` of image ``b``
being patch ``ids_shuffle[b, j]`` (the shuffle happens at ``mask_ratio=0`` too). The embeddings return
``ids_restore``, the inverse permutation; a hook on them reads what each image really kept in that call, so that
each kept token is placed at the centre of its own cell and CLS has no position. The per-query values are folded
onto the full grid, ``[B, H, gh * gw]`` row-major, with the dropped tokens absent (NaN, ``Placement.present``
False): an image's MAD is the mean over its kept tokens.

ViTMAEForPreTraining's decoder is not the image tower and is not recorded by default. Asked for by
``layers=["decoder.decoder_layers.*"]``, it is placed by the plain layout: the decoder unshuffles its tokens and
attends over CLS and the full grid in row-major order, the mask tokens included. A mask token stands for its
cell (it carries the cell's position embedding and its output is the prediction of that cell's pixels), so it is
a query and a key at its cell's centre, like a kept token; the decoder's MAD is the mean over every cell.

**Positions given by the user** (``vitmad.record(model, positions=...)``): for a model whose token layout vitmad
does not know, the pixel position of every token of the sequence, in the model's token order, replaces the
detected layout of every recorded layer (:class:`GivenPositionsPlacer`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..placement import CallContext, LayerGeometry, LayerPlacer, NotPlaceable, Placement, cell_centres
from .embeddings import EmbeddingsPlacer, conv_grid, embeddings_above

__all__ = ["placer", "ViTMAEPlacer", "GivenPositionsPlacer", "check_positions"]

_KEPT = "masked.kept."  # + the embeddings' name: the _Kept of the current call
_GIVEN = "masked.given"  # the positions a callable returned for the current call


def placer(model: nn.Module, name: str, module: nn.Module) -> LayerPlacer | None:
    """A :class:`ViTMAEPlacer` for the attention modules of a ViTMAE encoder (the tower whose ``embeddings``
    mask: ``ViTMAEModel`` itself, ``vit`` in ``ViTMAEForPreTraining``), else None."""
    found = embeddings_above(model, name, (("ViTMAEEmbeddings", "modeling_vit_mae"),))
    return None if found is None else ViTMAEPlacer(model, *found)


@dataclass(frozen=True)
class _Kept:
    """What ViTMAE's embeddings kept in one call.

    Attributes:
        grid: ``(gh, gw)`` of the patch grid of the input image.
        stride: pixels per patch ``(stride_y, stride_x)``.
        ids_keep: ``[B, K]`` the grid index (row-major) of each kept token, in the encoder's token order.
        num_tokens: ``1 + K``, the encoder's sequence length (CLS first).
        ids_restore_length: the length of ``ids_restore``, which must be ``gh * gw``.
    """

    grid: tuple[int, int]
    stride: tuple[float, float]
    ids_keep: torch.Tensor
    num_tokens: int
    ids_restore_length: int


class ViTMAEPlacer(EmbeddingsPlacer):
    """Places the kept tokens of one ViTMAE encoder layer at their cells (attention ``[B, H, 1 + K, 1 + K]``).

    Args:
        model: the model (for messages).
        embeddings_name: qualified name of the ``ViTMAEEmbeddings`` whose masking this layer's tokens went through.
        embeddings: that module.
    """

    def install(self, context: CallContext) -> list[torch.utils.hooks.RemovableHandle]:
        key = _KEPT + self.embeddings_name
        projection = self.embeddings.patch_embeddings.projection

        def keep(module, args, kwargs, output) -> None:
            # Every layer's placer installs this hook on the same embeddings: the first one of the call reads it.
            if key in context.values:
                return
            pixels = args[0] if args else kwargs["pixel_values"]
            sequence, _, ids_restore = output
            grid = conv_grid(pixels, projection)
            # ViTMAEEmbeddings.forward prepends one CLS token to the kept patches.
            kept = int(sequence.shape[1]) - 1
            # argsort inverts the permutation ids_restore, giving random_masking's ids_shuffle.
            ids_keep = torch.argsort(ids_restore, dim=1)[:, :kept]
            stride = (float(projection.stride[0]), float(projection.stride[1]))
            context.values[key] = _Kept(grid, stride, ids_keep, kept + 1, int(ids_restore.shape[1]))

        return [self.embeddings.register_forward_hook(keep, with_kwargs=True)]

    def place(self, context: CallContext, lead: torch.Size, num_queries: int, num_keys: int) -> Placement:
        kept: _Kept | None = context.values.get(_KEPT + self.embeddings_name)
        if kept is None:
            raise NotPlaceable(f"it ran before {self.embeddings_name or 'the embeddings'} masked the patches of "
                               "this call, so vitmad does not know which patches it attends over")
        grid_h, grid_w = kept.grid
        if kept.ids_restore_length != grid_h * grid_w:
            raise NotPlaceable(
                f"{self.embeddings_name} returned ids_restore over {kept.ids_restore_length} patches, not the "
                f"{grid_h}x{grid_w} = {grid_h * grid_w} of the patch grid of the input image"
            )
        batch, tokens = int(kept.ids_keep.shape[0]), kept.num_tokens
        self.check_sequence(lead, num_queries, num_keys, batch, tokens,
                       f"{self.embeddings_name} kept {tokens - 1} of the {grid_h * grid_w} patches (and CLS)")
        heads = int(lead[-1])
        return self.shared(context, str(heads), lambda: _kept_placement(kept, heads))


def _kept_placement(kept: _Kept, heads: int) -> Placement:
    """The placement of the encoder's ``1 + K`` tokens (CLS without a position, then the kept patches) and its
    fold onto the full grid with the dropped patches absent."""
    ids_keep = kept.ids_keep
    batch, num_kept = ids_keep.shape
    num_cells = kept.grid[0] * kept.grid[1]
    cells = cell_centres(*kept.grid, kept.stride, device=ids_keep.device).reshape(num_cells, 2)
    cls = cells.new_full((batch, 1, 2), float("nan"))
    positions = torch.cat([cls, cells[ids_keep]], dim=1).unsqueeze(1)  # [B, 1, 1 + K, 2], shared by the heads

    def fold(values: torch.Tensor) -> torch.Tensor:
        # values [B, H, 1 + K] -> [B, H, gh * gw]: kept token j of image b goes to cell ids_keep[b, j].
        index = ids_keep.to(values.device).unsqueeze(1).expand(values.shape[0], values.shape[1], num_kept)
        folded = values.new_full((*values.shape[:2], num_cells), float("nan"))
        return folded.scatter(-1, index, values[..., 1:])

    present = None
    if num_kept < num_cells:
        present = torch.zeros(batch, num_cells, dtype=torch.bool, device=ids_keep.device)
        present.scatter_(1, ids_keep, True)
    geometry = LayerGeometry(kept.grid, kept.stride, f"global over the {num_kept} of {num_cells} patches kept",
                             heads, 1)
    return Placement(positions, None, fold, geometry, present=present)


# Positions given by the user ---------------------------------------------------------------------------------

_EXPECTED = ("a floating tensor [N, 2] (every image) or [B, N, 2] (per image) of token positions (row, column) "
             "in pixels, or [N, 3] / [B, N, 3] (slice, row, column) in voxels of a volume, in the model's token "
             "order, a NaN row for a token without a position, or a callable returning one per forward call")


def check_positions(positions, source: str = "positions") -> torch.Tensor:
    """``positions`` checked and detached: ``[N, K]`` or ``[B, N, K]`` floating, ``K`` 2 (row, column) or 3 (slice,
    row, column), each row finite or all NaN.

    Args:
        positions: what the user gave (or what their callable returned).
        source: how the message names it.

    Raises:
        TypeError: not a floating tensor.
        ValueError: wrong shape, infinite coordinates or a row only partly NaN.
    """
    if not isinstance(positions, torch.Tensor) or not positions.is_floating_point():
        given = (f"a {positions.dtype} tensor" if isinstance(positions, torch.Tensor) else type(positions).__name__)
        raise TypeError(f"vitmad.record: {source} must be {_EXPECTED}; got {given}")
    if positions.dim() not in (2, 3) or positions.shape[-1] not in (2, 3):
        raise ValueError(f"vitmad.record: {source} must be {_EXPECTED}; got shape {list(positions.shape)}")
    if positions.device.type == "meta":  # its values, read below, do not exist
        raise ValueError(f"vitmad.record: {source} must be {_EXPECTED}; got a tensor on the meta device, which holds "
                         "no values")
    positions = positions.detach()
    nan = positions.isnan()
    if bool((nan.any(-1) & ~nan.all(-1)).any()):
        raise ValueError(f"vitmad.record: {source} has a row with some coordinates NaN and others not; a token "
                         "without a position is a row of NaN")
    if bool(positions.isinf().any()):
        raise ValueError(f"vitmad.record: {source} has infinite coordinates; positions must be finite or NaN rows")
    unplaced = nan.all(-1).all(-1).reshape(-1)  # per image: no token with a position
    if bool(unplaced.any()):
        image = "" if positions.dim() == 2 else f" of image {int(unplaced.nonzero()[0])}"
        raise ValueError(f"vitmad.record: {source} gives no token{image} a position (every row NaN), so no query "
                         "has a distance to measure: every value would be NaN")
    return positions


def _check_no_arguments(given: Callable) -> None:
    """Refuse, naming ``positions``, a callable that needs arguments: it is called with none, once per forward (it
    failed at the first attention call with Python's own "missing 1 required positional argument", QA 247)."""
    try:
        required = [p.name for p in inspect.signature(given).parameters.values()
                    if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    except (TypeError, ValueError):  # no signature to read (some builtins): called as given
        return
    if required:
        raise TypeError(f"vitmad.record: positions must be a tensor or a callable of no arguments returning one "
                        f"(called once per forward call), got a callable that requires {', '.join(required)}")


class GivenPositionsPlacer(LayerPlacer):
    """Places the tokens of every recorded layer at positions the user gave (attention ``[B, H, N, N]``).

    The per-query values stay in the model's token order: ``[B, H, N]``, NaN at the tokens without a position,
    which are absent from the mean (``Placement.present``). ``LayerGeometry.grid`` is None (the tokens need not
    form a grid) and its stride is 1: distances are in the unit of the given positions.

    Args:
        positions: ``[N, K]``, ``[B, N, K]`` (``K`` 2 or 3), or a callable of no arguments returning one, called
            once per forward call (at its first attention call) and used for every layer of that call.
    """

    def __init__(self, positions: torch.Tensor | Callable[[], torch.Tensor]):
        if callable(positions):
            _check_no_arguments(positions)
            self.positions, self.given = None, positions
        else:
            self.positions, self.given = check_positions(positions), None

    def _call_positions(self, context: CallContext) -> torch.Tensor:
        if self.positions is not None:
            return self.positions
        if _GIVEN not in context.values:
            context.values[_GIVEN] = check_positions(self.given(), "positions() (the callable given to record)")
        return context.values[_GIVEN]

    def place(self, context: CallContext, lead: torch.Size, num_queries: int, num_keys: int) -> Placement:
        positions = self._call_positions(context)
        num_tokens = positions.shape[-2]
        if len(lead) != 2 or num_queries != num_keys:
            raise NotPlaceable(
                f"its attention has shape [{', '.join(map(str, lead))}, {num_queries}, {num_keys}]; positions= "
                "places the tokens of self-attention [B, H, N, N] over the whole sequence"
            )
        if num_tokens != num_queries or (positions.dim() == 3 and positions.shape[0] != lead[0]):
            axes = positions.shape[-1]
            expected = f"[{num_queries}, {axes}] or [{lead[0]}, {num_queries}, {axes}]"
            # A tower that packs several images into one sequence and attends image by image (Qwen2-VL's) calls its
            # attention once per image: no one shape of positions fits all its calls.
            chunks = (" (if this module attends over parts of a packed sequence one call at a time, as Qwen2-VL's "
                      "vision tower does per image, positions= cannot place those calls: record it without "
                      "positions=, and vitmad places the images itself where it knows the tower)")
            # Rows of the batch, not always images: a windowed model's windows are its attention's batch too.
            sequences = "1 sequence" if lead[0] == 1 else f"{lead[0]} sequences"
            raise NotPlaceable(f"its attention runs over {sequences} of {num_queries} tokens (images, or "
                               f"windows of them), so positions must be "
                               f"{expected}; got shape {list(positions.shape)}{chunks if lead[0] == 1 else ''}")
        present = ~positions[..., 0].isnan()
        placed = positions if positions.dim() == 2 else positions.unsqueeze(1)  # [B, 1, N, K]: shared by the heads
        geometry = LayerGeometry(None, (1.0, 1.0), "global, positions given", int(lead[-1]))
        return Placement(placed, None, _identity, geometry, present=None if bool(present.all()) else present)


def _identity(values: torch.Tensor) -> torch.Tensor:
    return values
