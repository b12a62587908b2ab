"""Molmo2's vision tower (transformers ``Molmo2VisionModel``, the ``vision_tower`` of ``Molmo2Model`` and
``Molmo2ForConditionalGeneration``): crops fed as pre-cut patches, embedded by a ``Linear``, on the one grid its
config and position table fix.

``Molmo2ImageProcessor`` resizes each image twice: once to ``size x size`` pixels (the global view, the whole image
squashed) and once onto a canvas that overlapping ``size x size`` crops tile (``overlap_margins`` patches shared
between neighbours, at most ``max_crops`` of them); it cuts every view into ``p x p`` patches row-major
(``batch_pixels_to_patches``: each patch's ``p * p * C`` values in ``(row, column, channel)`` order) and gives
``pixel_values`` ``[sum_i (1 + crops_i), (size // p) ** 2, p * p * C]``: each image's global view, then its crops
in row-major tiling order, the images one after another (``Molmo2VideoProcessor``: each frame of a video as one
global view). ``Molmo2Model.get_image_features`` flattens a 4-D ``[images, views, N, p * p * C]`` to that form,
and the tower (``Molmo2VisionModel.forward``) embeds the patches with ``patch_embedding`` (a ``Linear``), adds its
``positional_embedding`` (``num_position_embeddings`` rows, broadcast over the views: no class token, no
interpolation; the patch count is the table's, fixed by the config) and runs every layer over ``[views, H, N, N]``.

So each view is an image of its own, as LLaVA-NeXT's anyres crops are: ``rec.mad``'s image axis is the tower's
batch of views, in that order, each in its own view's pixels (the global view and the crops are at different scales
of the image). The grid is the config's, ``(image_size[0] // p, image_size[1] // p)`` cells of ``p =
patch_size`` pixels (``image_default_input_size`` / ``image_patch_size`` in the released configs: 378 px, 14 px,
27 x 27), patch ``(r, c)`` at ``((r + 0.5) p, (c + 0.5) p)`` of its view. Every token has a position: the prefix
mass is 0 and there are no prefix maps.

A pre-hook on the tower reads the shape of ``pixel_values`` in each call. Refused per call (a ``ValueError`` naming
the layer): pixel values that are not ``[views, N, p * p * C]`` with ``N`` the grid's cells (the model itself
broadcasts a single patch over the whole table), a config whose position table is not that grid
(``num_position_embeddings`` set apart from ``image_size``) or whose ``patch_embedding`` takes other than
``p * p * C`` values, a layer that attends over another shape, and a layer run outside a forward of the tower. A
layout given by hand (both ``patch=`` and ``grid=``) places the tower instead, as for any plain ViT (a grid other
than the config's is refused); a partial one is refused with the layout vitmad places
(:func:`.unplaced.molmo2_layout_unknown`).

The adapter's pooling attention (``Molmo2Adapter.image_pooling_2d``, outside the tower, not recorded by default) is
skipped with its reason when named in ``layers=``: each of its queries is the mean of one ``pool_h x pool_w``
window of patches (``image_token_pooling``, the processor's ``pooling_size``, 2 x 2 for images, 3 x 3 for video)
and attends over that window's patches alone, so it has no position of its own to measure a distance from and no
map over a view's grid (each query's keys are its own few patches, from the canvas or the global view).
"""

from __future__ import annotations

import torch
from torch import nn

from ..placement import CallContext, LayerGeometry, LayerPlacer, NotPlaceable, Placement, select_tokens
from .plain import _GRID as _PLAIN_GRID
from .plain import _plain_positions
from .stages import defined_in, innermost_on_path

__all__ = ["placer", "is_tower", "Molmo2Placer"]

_SEEN = "molmo2.pixel_values."  # + the tower's name: the shape of the pixel_values of its current call


def is_tower(module: nn.Module) -> bool:
    """Whether ``module`` is Molmo2's vision tower: for the recorder, the tower that embeds the image, which it finds
    by a patch-embedding convolution in other models."""
    return defined_in(module, "Molmo2VisionModel", "modeling_molmo2")


def placer(model: nn.Module, name: str, module: nn.Module):
    """A :class:`Molmo2Placer` for the self-attention of a ``Molmo2VisionModel``'s layers, a :class:`~.Skip` for the
    adapter's pooling attention, else None."""
    if not defined_in(module, "Molmo2VisionAttention", "modeling_molmo2"):
        return None
    found = innermost_on_path(model, name, is_tower)
    if found is not None:
        return Molmo2Placer(model, *found)
    from . import Skip

    return Skip(
        "Molmo2's adapter pooling (cross-attention of one query per pooled token over its window of patches, "
        "image_token_pooling): each query is the mean of one pool_h x pool_w window of the tower's patches (the "
        "processor's pooling_size) and attends over that window's patches alone, so it has no position to measure "
        "a distance from and no map over a view's grid; the tower's layers (vision_tower.layers.*.self_attn) are "
        "the attention over the image"
    )


class Molmo2Placer(LayerPlacer):
    """Places the tokens of one Molmo2 vision layer: each view of the call (global view or crop) an image of its
    own, its patches on the config's row-major grid.

    Args:
        model: the recorded model (for messages).
        tower_name: qualified name of the ``Molmo2VisionModel``.
        tower: that module.

    Attributes:
        given_layout: the plain placer of a layout the user gave by hand (``patch=``, ``grid=``), set by the
            recorder: it places the call instead (the user's layout wins).
    """

    defers_to_given_layout = True

    def __init__(self, model: nn.Module, tower_name: str, tower: nn.Module):
        self.model, self.tower_name, self.tower = model, tower_name, tower
        self.given_layout = None
        self.where = f"{tower_name or type(tower).__name__} (a Molmo2VisionModel)"

    def _layout(self) -> tuple[tuple[int, int], int]:
        """``(grid, patch)`` from the tower's config, read when a call is placed (a config edited between
        forwards is followed)."""
        config = self.tower.config
        patch, size = int(config.patch_size), tuple(int(s) for s in config.image_size)
        return (size[0] // patch, size[1] // patch), patch

    def install(self, context: CallContext) -> list:
        key = _SEEN + self.tower_name

        def see(module, args, kwargs) -> None:
            pixels = args[0] if args else kwargs.get("pixel_values")
            if not isinstance(pixels, torch.Tensor):
                context.values.pop(key, None)  # a call the module itself refuses: nothing of it to place
                return
            context.values[key] = tuple(int(s) for s in pixels.shape)
            if pixels.dim() == 3:
                # The grid these patches are cut on, for the plain layout's check of a grid given by hand, as a
                # convolution's patch-embedding hook reports it.
                context.values[_PLAIN_GRID] = self._layout()[0]

        return [self.tower.register_forward_pre_hook(see, with_kwargs=True)]

    def place(self, context: CallContext, lead: torch.Size, num_queries: int, num_keys: int) -> Placement:
        seen = context.values.get(_SEEN + self.tower_name)
        if seen is None:
            raise NotPlaceable(
                f"it ran outside a forward of {self.where}, whose pixel_values say how many views it attends over; "
                "run the tower (or the model) on pixel_values, or pass positions=<[N, 2] pixel position of each "
                "token>"
            )
        if self.given_layout is not None:
            return self.given_layout.place(context, lead, num_queries, num_keys)
        grid, patch = self._layout()
        config = self.tower.config
        cells = grid[0] * grid[1]
        size = [int(s) for s in config.image_size]
        values = int(config.num_channels) * patch * patch
        if int(config.num_position_embeddings) != cells:
            raise NotPlaceable(
                f"the config of {self.where} has num_position_embeddings={int(config.num_position_embeddings)}, not "
                f"the {grid[0]}x{grid[1]} = {cells} patches of {patch} px its image_size {size} holds, so the "
                "grid its position table stands for is unknown; pass positions=<[N, 2] pixel position of each token>"
            )
        embedding = self.tower.patch_embedding
        if int(getattr(embedding, "in_features", -1)) != values:
            raise NotPlaceable(
                f"the patch_embedding of {self.where} takes {getattr(embedding, 'in_features', '?')} values per "
                f"patch, not the {values} = {int(config.num_channels)} x {patch} x {patch} of its config's "
                "patch_size, so the pixel size of its patches is unknown; pass positions=<[N, 2] pixel position of "
                "each token>"
            )
        if len(seen) != 3 or seen[1] != cells or seen[2] != values:
            raise NotPlaceable(
                f"{self.where} was given pixel_values {list(seen)}; vitmad places [views, {cells}, {values}]: each "
                f"view (a global view or a crop) cut into its {grid[0]}x{grid[1]} patches of {patch} x {patch} px "
                "row-major, as Molmo2's processors cut image_size crops (Molmo2Model.get_image_features flattens "
                "[images, views, ...] to that)"
            )
        views = seen[0]
        if len(lead) != 2 or int(lead[0]) != views or num_queries != cells or num_keys != cells:
            raise NotPlaceable(
                f"its attention has shape [{', '.join(map(str, lead))}, {num_queries}, {num_keys}]; after "
                f"{self.where} embedded {views} views of {grid[0]}x{grid[1]} patches, its layers attend "
                f"[{views}, H, {cells}, {cells}]"
            )
        stride = (float(patch), float(patch))
        positions, index = _plain_positions(grid, stride, 0, 0)
        geometry = LayerGeometry(grid, stride, "global per view", int(lead[-1]), 0)
        return Placement(positions, None, select_tokens(index), geometry)
