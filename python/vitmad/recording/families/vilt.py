"""ViLT: text tokens and a random selection of image patches in one sequence.

transformers' ``ViltEmbeddings`` puts the text first and the image after it: the layers of ``ViltModel`` (and of
the task models around it, ``vilt``) attend over ``[T text tokens][image CLS][L patches]``. The patches are not in
row-major order: ``visual_embed`` draws them with ``torch.multinomial``, a fresh permutation of the image's valid
patches in every forward (a subset when ``config.max_image_length`` is below their count), then, where an image
has fewer valid patches than the longest one of the batch, patches of its padding (``pixel_mask`` 0), drawn with
replacement and masked out of the attention. ``visual_embed`` returns the grid cell of each selected patch
(``patch_index``, ``[B, L, 2]`` as (row, column)) and the mask of the image tokens (CLS first): a wrapper of
``ViltEmbeddings.visual_embed``, for the recording only, reads them in each call of the recorded embeddings, so that
each valid patch is placed at the centre of its own cell, in pixels of ``pixel_values`` (the stride of the patch
projection). The text tokens, the image CLS and the padding patches have no position. The per-query values fold
onto the padded image's full grid, ``[B, H, gh * gw]`` row-major, with the cells not attended absent
(``Placement.present``): an image's MAD is the mean over its valid patches in this call.

Refused (a ``ValueError`` naming the layer): a forward given ``image_embeds`` instead of ``pixel_values``
(``visual_embed`` does not run: vitmad does not know where those tokens are on the image), and attention shapes
that are not the sequence ``visual_embed`` built.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..placement import CallContext, LayerGeometry, NotPlaceable, Placement, cell_centres
from .embeddings import EmbeddingsPlacer, embeddings_above
from .method_watch import MethodWatch

__all__ = ["placer", "ViltPlacer"]

_SELECTED = "vilt.selected."  # + the embeddings' name: the _Selected of the current call


def placer(model: nn.Module, name: str, module: nn.Module) -> EmbeddingsPlacer | None:
    """A :class:`ViltPlacer` for the attention modules after a ``ViltEmbeddings`` (``ViltModel`` itself, ``vilt``
    in the task models), else None."""
    found = embeddings_above(model, name, (("ViltEmbeddings", "modeling_vilt"),))
    return None if found is None else ViltPlacer(model, *found)


@dataclass(frozen=True)
class _Selected:
    """What ``visual_embed`` selected in one call.

    Attributes:
        grid: ``(gh, gw)`` of the patch grid of the (padded) input image.
        stride: pixels per patch ``(stride_y, stride_x)``.
        patch_index: ``[B, L]`` the row-major cell of each selected patch, in the sequence's order.
        valid: ``[B, L]`` bool, the selected patches that are not padding (attended, positioned).
    """

    grid: tuple[int, int]
    stride: tuple[float, float]
    patch_index: torch.Tensor
    valid: torch.Tensor


def _selected(embeddings: nn.Module, output) -> _Selected:
    """What one call of ``embeddings.visual_embed`` selected, from what it returned."""
    _, masks, (patch_index, (height, width)) = output
    projection = embeddings.patch_embeddings.projection
    stride = (float(projection.stride[0]), float(projection.stride[1]))
    return _Selected((int(height), int(width)), stride, patch_index[..., 0] * int(width) + patch_index[..., 1],
                     masks[:, 1:] != 0)


class ViltPlacer(EmbeddingsPlacer):
    """Places the tokens of one ViLT layer (attention ``[B, H, T + 1 + L, T + 1 + L]``).

    Args:
        model: the model (for messages).
        embeddings_name: qualified name of the ``ViltEmbeddings`` that built this layer's sequence.
        embeddings: that module.
    """

    def install(self, context: CallContext) -> list:
        key = _SELECTED + self.embeddings_name
        # A call that gives image_embeds runs no visual_embed: what an earlier call selected must not stay.
        def clear(module, args) -> None:
            context.values.pop(key, None)

        def report(embeddings, output) -> None:
            context.values[key] = _selected(embeddings, output)

        return [self.embeddings.register_forward_pre_hook(clear), MethodWatch(self.embeddings, "visual_embed", report)]

    def place(self, context: CallContext, lead: torch.Size, num_queries: int, num_keys: int) -> Placement:
        selected: _Selected | None = context.values.get(_SELECTED + self.embeddings_name)
        if selected is None:
            raise NotPlaceable(
                f"{self.embeddings_name} did not embed pixel_values in this call (ViLT given image_embeds), so "
                "vitmad does not know where its image tokens are on the image; pass pixel_values"
            )
        batch, patches = (int(s) for s in selected.patch_index.shape)
        text = num_queries - 1 - patches
        if len(lead) != 2 or lead[0] != batch or num_queries != num_keys or text < 0:
            raise NotPlaceable(
                f"its attention has shape [{', '.join(map(str, lead))}, {num_queries}, {num_keys}]; after "
                f"{self.embeddings_name} selected {patches} patches (and the image CLS) of {batch} images, a ViLT "
                f"layer attends [{batch}, H, T + {1 + patches}, T + {1 + patches}] with T text tokens"
            )
        heads = int(lead[-1])
        return self.shared(context, f"{heads}.{text}", lambda: _selected_placement(selected, text, heads))


def _selected_placement(selected: _Selected, text: int, heads: int) -> Placement:
    """The placement of ``[T text tokens][CLS][L patches]`` (only the valid patches positioned) and its fold
    onto the full grid with the cells not attended absent."""
    index, valid = selected.patch_index, selected.valid
    batch, patches = index.shape
    num_cells = selected.grid[0] * selected.grid[1]
    cells = cell_centres(*selected.grid, selected.stride, device=index.device).reshape(num_cells, 2)
    image = torch.where(valid.unsqueeze(-1), cells[index], float("nan"))
    unplaced = image.new_full((batch, text + 1, 2), float("nan"))
    positions = torch.cat([unplaced, image], dim=1).unsqueeze(1)  # [B, 1, T + 1 + L, 2], shared by the heads
    # A padding patch sits in a padding cell (drawn from them, with replacement), never in a valid one: its NaN
    # lands only on cells that stay absent.
    present = torch.zeros(batch, num_cells, dtype=torch.bool, device=index.device)
    rows = torch.arange(batch, device=index.device).unsqueeze(1).expand(batch, patches)
    present[rows[valid], index[valid]] = True
    if bool((present.sum(-1) != valid.sum(-1)).any()):
        raise NotPlaceable("ViLT's visual_embed selected a valid patch twice; vitmad places each cell once")

    def fold(values: torch.Tensor) -> torch.Tensor:
        # values [B, H, T + 1 + L] -> [B, H, gh * gw]: patch j of image b goes to its cell.
        cell = index.to(values.device).unsqueeze(1).expand(values.shape[0], values.shape[1], patches)
        folded = values.new_full((*values.shape[:2], num_cells), float("nan"))
        return folded.scatter(-1, cell, values[..., text + 1:])

    geometry = LayerGeometry(selected.grid, selected.stride,
                             f"global over the image's patches and {text} text tokens (ViLT)", heads)
    return Placement(positions, None, fold, geometry, present=None if bool(present.all()) else present)
