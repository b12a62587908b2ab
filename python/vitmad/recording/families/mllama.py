"""Mllama's vision tower (Llama 3.2 Vision: transformers ``MllamaVisionModel``, also inside ``MllamaModel`` and
``MllamaForConditionalGeneration``): the tiles of an image in one sequence.

``MllamaImageProcessor`` resizes an image (aspect ratio kept) onto a canvas of ``R x C`` tiles of ``tile x tile``
pixels (``size``), pads it with zeros at the bottom and right to the whole canvas and cuts it into its tiles in
row-major order (``split_to_tiles``: tile ``t`` is tile row ``t // C``, column ``t % C``); ``aspect_ratio_ids`` gives
each image's layout as ``1 +`` its index in the supported ``(R, C)`` list (``get_all_supported_aspect_ratios``; the
config's ``supported_aspect_ratios`` for ``max_num_tiles``), 0 for a media slot without an image, and
``aspect_ratio_mask`` marks its first ``R * C`` tiles (the processor marks tile 0 of an empty slot too). The tiles
are padded (with zeros) to ``max_num_tiles``.

``MllamaVisionModel.forward`` embeds each tile with the patch convolution, puts a class token before each tile's
``g x g`` patches (row-major, ``g = tile // p``), pads each tile's ``1 + g * g`` tokens with zeros to a multiple of
8 (``L`` tokens) and attends, in its local ``transformer`` and its ``global_transformer`` alike, over all the
``max_num_tiles * L`` tokens of one media slot: ``[batch * num_media, heads, T * L, T * L]``. Its mask
(``_prepare_aspect_ratio_attention_mask``) is the product of two "is padding" vectors (padding tokens and the tokens
of tiles the mask leaves out): it hides a padding key from a padding query only, so every image query attends
to every token, padding included.

Placed here: patch ``(r, c)`` of tile ``t`` at the centre of its cell on the canvas, ``((t // C) * tile_h + (r +
0.5) p, (t % C) * tile_w + (c + 0.5) p)`` pixels of the canvas (the resized image the tiles were cut from, its
zero padding included: its patches are tokens like the others); the class tokens, the padding tokens and every token
of a padding tile have no position (a padding tile is no place on the canvas). Each image's values fold onto its
canvas grid ``R g x C g``, row-major; images of one call with different layouts fold onto ``[B, H, T]`` with ``T``
the largest canvas, each image's first, NaN after (``Placement.present``, ``LayerGeometry.image_grids``), an empty
media slot (id 0) with no token at all. The prefix mass is the attention on every token without a position (class
tokens, padding tokens and padding tiles: the model's mask leaves them all visible to an image query). The prefix
maps are the class tokens' rows over the canvas grid (``Placement.map_tokens``): one row per tile slot, NaN for the
tile slots an image does not have; each class token attends over every tile.

Read per call by a pre-hook on the tower: ``pixel_values`` (tile count and size), ``aspect_ratio_ids`` and
``aspect_ratio_mask`` (one host read of each per forward). Refused, naming the layer and what was seen: a supported
list that is not the processor's, a mask that is not the first ``R * C`` tiles of the id's layout (a layout of more
tiles than the call has), tiles that the patch does not divide, and an attention that is not that sequence. An id
outside the supported list fails in the tower's own tile embeddings, before any attention.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..placement import (
    CallContext,
    LayerGeometry,
    LayerPlacer,
    NotPlaceable,
    Placement,
    RefusingPlacer,
    on_device,
    read_only,
)
from .stages import defined_in, innermost_on_path

__all__ = ["placer", "is_tower", "MllamaPlacer", "supported_layouts"]

_SEEN = "mllama.inputs."  # + the tower's name: (pixel_values shape, aspect_ratio_ids, aspect_ratio_mask)
_POSITIONS = ("pass positions=<[N, 2] canvas pixel position of each token of a media slot's sequence, NaN rows for "
              "the class tokens, the padding tokens and the padding tiles>")


def is_tower(module: nn.Module) -> bool:
    """Whether ``module`` is Mllama's vision tower."""
    return defined_in(module, "MllamaVisionModel", "modeling_mllama")


def supported_layouts(max_num_tiles: int) -> list[tuple[int, int]]:
    """The ``(tile rows, tile columns)`` layouts ``MllamaImageProcessor`` numbers its ``aspect_ratio_ids`` by (id
    ``i + 1`` is entry ``i``): its ``get_all_supported_aspect_ratios``, whose pairs its ``resize`` returns as
    ``(num_tiles_height, num_tiles_width)``."""
    return [(rows, cols) for rows in range(1, max_num_tiles + 1) for cols in range(1, max_num_tiles + 1)
            if rows * cols <= max_num_tiles]


def placer(model: nn.Module, name: str, module: nn.Module):
    """A :class:`MllamaPlacer` for the ``MllamaVisionAttention`` modules of a ``MllamaVisionModel``; a refusing
    placer for one recorded without its tower; else None."""
    if not defined_in(module, "MllamaVisionAttention", "modeling_mllama"):
        return None
    found = innermost_on_path(model, name, is_tower)
    if found is None:
        return RefusingPlacer(
            "it is an Mllama vision attention recorded without the MllamaVisionModel that tiles the image (a class "
            "token and padding per tile, tiles laid out by aspect_ratio_ids), so its tokens' places are unknown; "
            "record the vision model or the model that holds it, or " + _POSITIONS)
    return MllamaPlacer(model, *found)


@dataclass(frozen=True)
class _Call:
    """What the tower was given in one call: ``tiles`` tile slots of ``size`` pixels per media slot, and each media
    slot's layout ``(R, C)`` (``(0, 0)`` for an empty slot, id 0)."""

    layouts: tuple[tuple[int, int], ...]
    tiles: int
    size: tuple[int, int]


class MllamaPlacer(LayerPlacer):
    """Places the tokens of one layer of Mllama's vision tower (local or global: both attend over a media slot's
    tiles) on each image's canvas.

    Args:
        model: the recorded model (for messages).
        tower_name: qualified name of the ``MllamaVisionModel``.
        tower: that module.
    """

    def __init__(self, model: nn.Module, tower_name: str, tower: nn.Module):
        self.model, self.tower_name, self.tower = model, tower_name, tower
        self.where = tower_name or type(tower).__name__
        # The latest placement, reused while the layouts, the tiles and the attention's shape stay the same.
        self._cached: tuple[tuple, Placement] | None = None

    def install(self, context: CallContext) -> list:
        key = _SEEN + self.tower_name
        # The recorder starts a call (and empties context.values) at the first convolution, the tower's patch
        # embedding, after the tower's own pre-hook: what that read waits here until the patch embedding runs.
        waiting = {}

        def see(module, args, kwargs) -> None:
            named = dict(zip(("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask"), args))
            inputs = [named.get(n, kwargs.get(n)) for n in ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask")]
            if all(isinstance(t, torch.Tensor) for t in inputs) and inputs[0].dim() == 6:
                waiting[key] = (tuple(int(s) for s in inputs[0].shape), inputs[1], inputs[2])
            else:
                waiting.pop(key, None)  # a call the tower itself refuses: nothing of it to place

        def embed(module, args) -> None:
            seen = waiting.pop(key, None)
            if seen is None:
                context.values.pop(key, None)
            else:
                context.values[key] = seen

        return [self.tower.register_forward_pre_hook(see, with_kwargs=True),
                self.tower.patch_embedding.register_forward_pre_hook(embed)]

    def _call(self, context: CallContext) -> _Call:
        """The layouts of this call, read and checked once per call (the first layer's placement)."""
        key = _SEEN + self.tower_name
        seen = context.values.get(key)
        if seen is None:
            raise NotPlaceable(
                f"Mllama's vision model ({self.where}) did not run in this call before it attended (its encoder "
                "called on hidden states?), so the tiles of its tokens are unknown; run the vision model on "
                "pixel_values, aspect_ratio_ids and aspect_ratio_mask, or " + _POSITIONS)
        built = context.values.get(key + ".call")
        if built is not None and built[0] is seen:
            return built[1]
        shape, ids, mask = seen
        batch, media, tiles, _, height, width = shape
        slots = batch * media
        if ids.numel() != slots or mask.numel() != slots * tiles:
            raise NotPlaceable(
                f"Mllama's vision model ({self.where}) got pixel_values {list(shape)} with aspect_ratio_ids "
                f"{list(ids.shape)} and aspect_ratio_mask {list(mask.shape)}; vitmad places one aspect ratio id per "
                f"media slot ([{batch}, {media}]) and a mask per tile slot ([{batch}, {media}, {tiles}])")
        config = self.tower.config
        listed = [tuple(int(v) for v in pair) for pair in config.supported_aspect_ratios]
        processor = supported_layouts(int(config.max_num_tiles))
        if listed != processor:
            raise NotPlaceable(
                f"the config's supported_aspect_ratios {[list(p) for p in listed]} are not the list "
                f"MllamaImageProcessor numbers aspect_ratio_ids by for max_image_tiles={config.max_num_tiles} "
                f"({[list(p) for p in processor]}), so vitmad cannot tell which tile layout an id stands for; "
                + _POSITIONS)
        patch = int(self.tower.patch_size)
        if height % patch or width % patch:
            raise NotPlaceable(
                f"Mllama's vision model ({self.where}) got tiles of {height}x{width} pixels, which its {patch} px "
                "patches do not divide: the patches of one tile would not continue the grid of the next; " + _POSITIONS)
        layouts = []
        for slot, (id_, marks) in enumerate(zip(ids.reshape(-1).tolist(), mask.reshape(slots, tiles).tolist())):
            image = f"media slot {slot} (image {slot // media}, media {slot % media})"
            if id_ == 0:  # no image in this slot (a sample with fewer images than the batch's most)
                layouts.append((0, 0))
                continue
            # An id outside 0 .. len(listed) fails in the tower's own tile embeddings before any attention.
            rows, cols = listed[id_ - 1]
            expected = [1] * (rows * cols) + [0] * (tiles - rows * cols)
            if rows * cols > tiles or [int(m != 0) for m in marks] != expected:
                raise NotPlaceable(
                    f"{image} has aspect_ratio_id {id_}, a {rows}x{cols} tile layout, so vitmad expects its first "
                    f"{rows * cols} of {tiles} tile slots marked in aspect_ratio_mask, but the mask is {marks}; "
                    "the tiles the mask leaves out are padding to the model, so their places are unknown; "
                    + _POSITIONS)
            layouts.append((rows, cols))
        if all(layout == (0, 0) for layout in layouts):
            raise NotPlaceable(f"every media slot of this call has aspect_ratio_id 0 (no image): no token of "
                               f"{self.where} stands for a place on an image")
        call = _Call(tuple(layouts), tiles, (height, width))
        context.values[key + ".call"] = (seen, call)
        return call

    def place(self, context: CallContext, lead: torch.Size, num_queries: int, num_keys: int) -> Placement:
        call = self._call(context)
        patch = int(self.tower.patch_size)
        side = (call.size[0] // patch, call.size[1] // patch)
        tile_tokens = 1 + side[0] * side[1]
        length = tile_tokens + (8 - tile_tokens % 8) % 8  # the class token, the patches, then zeros up to 8k
        tokens = call.tiles * length
        slots = len(call.layouts)
        if len(lead) != 2 or int(lead[0]) != slots or num_queries != tokens or num_keys != tokens:
            raise NotPlaceable(
                f"its attention has shape [{', '.join(map(str, lead))}, {num_queries}, {num_keys}]; after "
                f"{self.where} got {slots} media slots of {call.tiles} tiles of {call.size[0]}x{call.size[1]} pixels, "
                f"a layer of the tower attends [{slots}, H, {tokens}, {tokens}] ({call.tiles} tiles of a class token, "
                f"{side[0]}x{side[1]} patches and padding to {length} tokens)"
            )
        key = (call, int(lead[1]))
        if self._cached is None or self._cached[0] != key:
            self._cached = key, _placement(call, patch, side, length, int(lead[1]))
        return self._cached[1]


def _placement(call: _Call, patch: int, side: tuple[int, int], length: int, heads: int) -> Placement:
    gh, gw = side
    slots, tokens = len(call.layouts), call.tiles * length
    grids = tuple((rows * gh, cols * gw) for rows, cols in call.layouts)
    longest = max(h * w for h, w in grids)
    positions = torch.full((slots, tokens, 2), float("nan"), dtype=torch.float64)
    index = torch.zeros(slots, longest, dtype=torch.long)  # canvas cell -> token, row-major per image
    present = torch.zeros(slots, longest, dtype=torch.bool)
    for slot, (rows, cols) in enumerate(call.layouts):
        if rows == 0:
            continue
        canvas_r, canvas_c = torch.meshgrid(torch.arange(rows * gh), torch.arange(cols * gw), indexing="ij")
        canvas_r, canvas_c = canvas_r.reshape(-1), canvas_c.reshape(-1)
        tile = (canvas_r // gh) * cols + canvas_c // gw  # split_to_tiles: row-major over the tile layout
        token = tile * length + 1 + (canvas_r % gh) * gw + canvas_c % gw  # after the tile's class token
        # (tile row * tile_h + (r + 0.5) p, ...): the patch divides the tile, so tiles continue one patch grid.
        positions[slot, token, 0] = (canvas_r.double() + 0.5) * patch
        positions[slot, token, 1] = (canvas_c.double() + 0.5) * patch
        index[slot, :token.numel()] = token
        present[slot, :token.numel()] = True
    same = len(set(call.layouts)) == 1
    positions = positions.float()
    map_tokens = torch.arange(call.tiles) * length  # each tile slot's class token
    has_tile = torch.arange(call.tiles)[None] < torch.tensor([r * c for r, c in call.layouts])[:, None]
    if same:
        positions, index = read_only(positions[0], index[0], positions=1)
    else:
        positions, index, present = read_only(positions.unsqueeze(1), index, present, positions=1)
    shown = ", ".join(sorted({f"{r}x{c}" for r, c in call.layouts if r}))
    attention = (f"global over each image's tiles ({shown} tiles of {gh}x{gw} patches; a class token and padding "
                 f"to {length} tokens per tile, without a position)")
    geometry = LayerGeometry(grids[0] if same else None, (float(patch), float(patch)), attention, heads, None,
                             None if same else grids)

    def fold(values: torch.Tensor) -> torch.Tensor:
        if same:
            return values.index_select(-1, on_device(index, values.device))
        gathered = values.gather(-1, on_device(index, values.device)[:, None].expand(*values.shape[:-1], longest))
        return gathered.masked_fill(~on_device(present, values.device)[:, None], float("nan"))

    return Placement(positions, None, fold, geometry, present=None if same else present,
                     map_tokens=map_tokens, map_present=None if bool(has_tile.all()) else has_tile)
