"""Native-resolution ViTs (NaFlex): each image its own patch grid, padded into one batch.

timm ``NaFlexVit`` (``naflexvit_*``), timm's Gemma 4 vision encoder (``gemma4_vit_*``: a linear patch
embedding, the same ``patch_coord`` / ``patch_valid`` inputs, 2-D RoPE, no prefix tokens), transformers
``Siglip2VisionModel`` (also the vision tower of ``Siglip2Model``) and transformers ``Gemma4VisionModel`` (the tower
of Gemma 4: ``pixel_position_ids`` gives each slot's ``(x, y)``, ``(-1, -1)`` for padding). Each image is resized
by its processor to its own ``h x w`` grid of ``p x p`` patches (aspect ratio kept, at most a token budget),
flattened row-major and padded at the end to the batch's sequence length:

- timm, NaFlex mode (``patch_coord`` given): token ``t`` of image ``i`` carries its ``(row, col)`` in
  ``patch_coord[i, t]`` and ``patch_valid[i, t]`` says whether it is an image patch. The model takes image ``i``'s
  grid as the largest coordinate + 1 over all its tokens and lays its position embedding (learned, factorised or
  RoPE) row-major over the first ``h * w`` tokens; its mask keeps padding out of every valid query's keys.
  Class and register tokens come first. Standard mode (an image batch ``[B, C, H, W]``): one grid for the batch.
- transformers SigLIP2: ``spatial_shapes[i] = (h, w)``, the first ``h * w`` tokens row-major;
  ``pixel_attention_mask`` marks them, and the model masks the other keys out. No prefix tokens.

A token's position is its patch centre ``((row + 0.5) * p, (col + 0.5) * p)`` in pixels of the image as the
processor resized it (``docs/definition.md``, native resolution). Prefix and padding tokens have no position:
neither query nor key. Every layer folds onto ``[B, H, T]`` with ``T`` the largest ``h * w`` of the call, image
``i``'s tokens first, NaN after (``Placement.present``); ``LayerGeometry.image_grids`` gives each image's grid when
they differ. A layout vitmad cannot read (image tokens out of row-major order, padding inside an image, a
``pixel_attention_mask`` that disagrees with ``spatial_shapes``, patch dropout) is refused.

Attention pooling heads (timm ``AttentionPoolLatent`` as a ``NaFlexVit``'s ``attn_pool``, the
``nn.MultiheadAttention`` of SigLIP2's ``Siglip2MultiheadAttentionPoolingHead``) have no MAD: their query is a
learned latent with no place on the image. They are skipped with the reason, and with ``stats=[...,
"prefix_maps"]`` their query's attention over the tokens it pools is recorded (:mod:`.class_attention`), folded as
the blocks' values are: image ``i``'s grid first, NaN after. Its keys are the tower's tokens after the blocks, the
padding slots masked out by the model: timm's without the prefix tokens unless ``pool_include_prefix``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..module_index import named_module_list
from ..placement import CallContext, LayerGeometry, LayerPlacer, NotPlaceable, Placement
from .plain import dropping_patches, patch_dropout_modules
from .stages import defined_in, forward_arguments, innermost_on_path

__all__ = ["placer", "pooling_head", "is_tower", "towers", "call_start", "NaFlexPlacer"]


def _resampled_patch(embeds: nn.Module, patches) -> tuple[int, int] | None:
    """The ``(height, width)`` of the patches timm's ``NaFlexEmbeds`` resamples its projection to in this call (its
    ``enable_patch_interpolator`` and patches given ``[B, N, Ph, Pw, C]``, or ``[B, N, C, Ph, Pw]`` where its layout
    is channels first, as its forward reads them); None where it projects them at its own patch size."""
    if not (getattr(embeds, "enable_patch_interpolator", False) and isinstance(patches, torch.Tensor)
            and patches.dim() == 5):
        return None
    sides = patches.shape[2:4] if getattr(embeds, "channels_last", True) else patches.shape[3:5]
    return int(sides[0]), int(sides[1])


@dataclass(frozen=True)
class _Design:
    """One NaFlex model: the class that owns the image embedding and the attention blocks.

    Attributes:
        module_suffix: the defining module's last name part.
        tower: class name of the tower.
        embedding: attribute of the tower holding the patch embedding module.
        blocks: qualified-name prefix, relative to the tower, of its self-attention layers.
    """

    module_suffix: str
    tower: str
    embedding: str
    blocks: str


_TIMM = _Design("naflexvit", "NaFlexVit", "embeds", "blocks.")
_GEMMA4 = _Design("gemma4_vit", "Gemma4VitEncoder", "patch_embed", "blocks.")
_SIGLIP2 = _Design("modeling_siglip2", "Siglip2VisionModel", "embeddings", "encoder.layers.")
_GEMMA4_HF = _Design("modeling_gemma4", "Gemma4VisionModel", "patch_embedder", "encoder.layers.")
_DESIGNS = (_TIMM, _GEMMA4, _SIGLIP2, _GEMMA4_HF)


def _design_of(module: nn.Module) -> _Design | None:
    return next((d for d in _DESIGNS if defined_in(module, d.tower, d.module_suffix)), None)


def is_tower(module: nn.Module) -> bool:
    """Whether ``module`` is a NaFlex tower (timm ``NaFlexVit``, Gemma 4's ViTs, SigLIP2's vision model)."""
    return _design_of(module) is not None


def towers(model: nn.Module) -> dict[str, nn.Module]:
    """The NaFlex towers of ``model`` by qualified name ("" for the model itself), in module order."""
    return {name: module for name, module in named_module_list(model) if is_tower(module)}


def call_start(model: nn.Module) -> nn.Module | None:
    """The module whose forward starts a call of the first NaFlex tower (the recorder's call boundary): timm's
    patch embedding, which every entry point runs (``forward``, ``forward_features``,
    ``forward_intermediates``); SigLIP2's tower itself, the only forward that receives ``pixel_attention_mask``."""
    tower = next(iter(towers(model).values()), None)
    if tower is None:
        return None
    design = _design_of(tower)
    return tower if design in (_SIGLIP2, _GEMMA4_HF) else getattr(tower, design.embedding)


def _tower_of(model: nn.Module, name: str) -> tuple[str, nn.Module] | None:
    """The innermost NaFlex tower on the path to module ``name``, with its qualified name."""
    return innermost_on_path(model, name, is_tower)


def pooling_head(model: nn.Module, name: str, reason: str):
    """The :class:`~.ClassQueries` of the attention-pooling head ``name``, which :mod:`.class_attention` found
    (timm's ``attn_pool``, the ``MultiheadAttention`` of SigLIP2's head; ``reason`` is its skip's), when a NaFlex
    tower holds it; else None (the head pools a plain layout)."""
    from . import ClassQueries

    _, tower = _tower_of(model, name) or (None, None)
    design = None if tower is None else _design_of(tower)
    if design is _TIMM:
        keys = NaFlexPlacer(model, tower, design, with_prefix=bool(tower.pool_include_prefix))
        return ClassQueries(reason, keys, "the NaFlexViT tokens it pools", queries_in_keys=False)
    if design is _SIGLIP2:
        return ClassQueries(reason, NaFlexPlacer(model, tower, design), "the SigLIP2 tokens it pools",
                            queries_in_keys=False)
    return None


def placer(model: nn.Module, name: str, module: nn.Module):
    tower = _tower_of(model, name)
    if tower is None:
        return None
    tower_name, tower_module = tower
    relative = name[len(tower_name) + 1:] if tower_name else name
    design = _design_of(tower_module)
    if not relative.startswith(design.blocks):
        return None  # the pooling head (timm's AttentionPoolLatent is skipped by non_spatial)
    return NaFlexPlacer(model, tower_module, design)


@dataclass(frozen=True)
class _Tokens:
    """Where the tokens of one tower call are.

    Attributes:
        positions: ``[B, 1, N, 2]`` pixel centres (NaN for prefix and padding tokens), broadcast over heads.
        grids: per image, its ``(grid_h, grid_w)``.
        prefix: tokens before the patches.
        present: ``[B, T]`` bool with ``T`` the largest ``h * w``, or None when every image fills ``T``.
        stride: ``(patch_h, patch_w)`` pixels.
    """

    positions: torch.Tensor
    grids: tuple[tuple[int, int], ...]
    prefix: int
    present: torch.Tensor | None
    stride: tuple[float, float]


def _tokens(sizes: torch.Tensor, valid: torch.Tensor, coord: torch.Tensor | None, prefix: int,
            patch: tuple[int, int], what: str) -> _Tokens:
    """Checks that each image's tokens are its ``h x w`` grid, row-major, before any padding, and places them.

    Args:
        sizes: ``[B, 2]`` integer ``(grid_h, grid_w)`` of each image, as the model reads it.
        valid: ``[B, N]`` bool, the image tokens (not padding) among the ``N`` patch slots.
        coord: ``[B, N, 2]`` integer ``(row, col)`` of every slot (timm's ``patch_coord``), or None.
        prefix: tokens before the patch slots.
        patch: ``(patch_h, patch_w)`` pixels.
        what: the inputs named in messages.
    """
    batch, slots = valid.shape
    sizes = sizes.to(device=valid.device, dtype=torch.long)
    counts = sizes[:, 0] * sizes[:, 1]
    index = torch.arange(slots, device=valid.device)
    image = index < counts[:, None]  # [B, N]
    wrong = (counts > slots) | (valid != image).any(-1)
    if bool(wrong.any()):
        bad = int(wrong.nonzero()[0, 0])
        count, marked = int(counts[bad]), int(valid[bad].sum())
        grid = f"image {bad} of the batch has a {int(sizes[bad, 0])}x{int(sizes[bad, 1])} grid by {what}"
        if count > slots:
            raise NotPlaceable(f"{grid}: {count} cells, more than its {slots} slots ({marked} marked valid)")
        raise NotPlaceable(
            f"{grid}, so its {count} patches must be the first {count} of {slots} slots and the rest padding, but "
            f"{marked} slots are marked valid" + (", not the first ones" if marked == count else "")
        )
    rows = torch.div(index[None], sizes[:, 1:], rounding_mode="floor")  # [B, N]
    cols = index[None] - rows * sizes[:, 1:]
    if coord is not None:
        row_major = torch.stack([rows, cols], -1)
        wrong = ((coord.to(row_major.device) != row_major).any(-1) & image).any(-1)
        if bool(wrong.any()):
            bad = int(wrong.nonzero()[0, 0])
            raise NotPlaceable(
                f"the patches of image {bad} are not in row-major order in patch_coord; vitmad places a NaFlex "
                "image's tokens row-major over its grid, the order timm's patchifier gives them, and no other order "
                "(timm's default learned and factorised position embeddings are laid row-major by slot whatever "
                "patch_coord says; where the model reads patch_coord itself, its grid-sample embedding or RoPE, "
                "another order is valid for the model but not placed by vitmad): pass each image's patches row-major"
            )
    centres = torch.stack([(rows + 0.5) * patch[0], (cols + 0.5) * patch[1]], -1).to(torch.float32)
    centres = torch.where(image[..., None], centres, float("nan"))
    positions = torch.cat([centres.new_full((batch, prefix, 2), float("nan")), centres], 1).unsqueeze(1)
    longest = int(counts.max()) if batch else 0
    present = image[:, :longest]
    grids = tuple((int(h), int(w)) for h, w in sizes.tolist())
    return _Tokens(positions, grids, prefix, None if bool(present.all()) else present,
                   (float(patch[0]), float(patch[1])))


class NaFlexPlacer(LayerPlacer):
    """Places the tokens of one self-attention layer of a NaFlex tower (attention ``[B, H, N, N]``).

    Args:
        model: the recorded model (named in messages).
        tower: the ``NaFlexVit`` or ``Siglip2VisionModel`` that holds the layer.
        design: the tower's design.
        with_prefix: whether the attention's tokens begin with the tower's prefix tokens; False for the keys of
            timm's pooling head without ``pool_include_prefix``, which pools the tokens after them.
    """

    def __init__(self, model: nn.Module, tower: nn.Module, design: _Design, with_prefix: bool = True):
        self.model, self.tower, self.design, self.with_prefix = model, tower, design, with_prefix
        self.patch_dropouts = patch_dropout_modules(tower)  # found once, as PlainLayout's
        self.key = ("naflex.inputs", id(tower))

    def install(self, context: CallContext) -> list[torch.utils.hooks.RemovableHandle]:
        # Each placer of the tower stores the same inputs; the tokens are built once per call, in place().
        if self.design is _TIMM:
            def see_timm(module, args, kwargs, output) -> None:
                arguments = forward_arguments(module, args, kwargs)
                context.values[self.key] = (arguments.get("patch_coord"), arguments.get("patch_valid"), output[1],
                                            _resampled_patch(module, arguments.get("x")))

            embedding = getattr(self.tower, self.design.embedding)
            return [embedding.register_forward_hook(see_timm, with_kwargs=True)]
        if self.design is _GEMMA4:
            # Gemma4PatchEmbed returns the coordinates of every slot, (x, y), and the padding slots (None: none),
            # whatever form its input had (images, patches with patch_coord, a NaFlex dict).
            def see_gemma4(module, args, output) -> None:
                context.values[self.key] = (output[1].flip(-1), None if output[2] is None else ~output[2])

            return [getattr(self.tower, self.design.embedding).register_forward_hook(see_gemma4)]

        if self.design is _GEMMA4_HF:
            # Gemma4VisionModel's pixel_position_ids: (x, y) of every slot, (-1, -1) for padding.
            def see_gemma4_hf(module, args, kwargs) -> None:
                ids = forward_arguments(module, args, kwargs).get("pixel_position_ids")
                context.values[self.key] = (None, None) if ids is None else (ids.flip(-1), ~(ids == -1).all(-1))

            return [self.tower.register_forward_pre_hook(see_gemma4_hf, with_kwargs=True)]

        def see_siglip2(module, args, kwargs) -> None:
            arguments = forward_arguments(module, args, kwargs)
            context.values[self.key] = (arguments.get("spatial_shapes"), arguments.get("pixel_attention_mask"),
                                        arguments.get("pixel_values"))

        return [self.tower.register_forward_pre_hook(see_siglip2, with_kwargs=True)]

    def _call_tokens(self, context: CallContext) -> _Tokens:
        inputs = context.values.get(self.key)
        if inputs is None:
            raise NotPlaceable(f"it ran outside a forward of its {self.design.tower}, whose inputs place its tokens")
        built = context.values.get(self.key + ("tokens",))
        if built is not None and built[0] is inputs:
            return built[1]
        read = {_TIMM: self._timm_tokens, _GEMMA4: self._gemma4_tokens, _SIGLIP2: self._siglip2_tokens,
                _GEMMA4_HF: self._gemma4_tokens}
        tokens = read[self.design](*inputs)
        context.values[self.key + ("tokens",)] = (inputs, tokens)
        return tokens

    def _timm_tokens(self, coord, valid, grid, resampled) -> _Tokens:
        embeds = getattr(self.tower, self.design.embedding)
        # Patches of another size than its own, its projection resampled to them (enable_patch_interpolator, as
        # timm's NaFlex loader trains with patch_size_choices): each token covers the patch it was given. Read from
        # the model's patch_size, every distance was scaled by the ratio of the sizes, silently (QA 339).
        patch = resampled or tuple(int(p) for p in embeds.patch_size)
        prefix = int(embeds.num_prefix_tokens)
        if coord is None:  # standard mode: one grid for the whole batch, every slot an image patch
            gh, gw = int(grid[0]), int(grid[1])
            valid = torch.ones(1, gh * gw, dtype=torch.bool)
            return _tokens(torch.tensor([[gh, gw]]), valid, None, prefix, patch, "its patch embedding")
        if valid is None:
            valid = torch.ones(coord.shape[:2], dtype=torch.bool, device=coord.device)
        # The grid the model reads (timm.models.naflexvit.calculate_naflex_grid_sizes): largest coordinate + 1
        # over every slot, padding included.
        sizes = coord.amax(dim=1) + 1
        return _tokens(sizes, valid.bool(), coord, prefix, patch,
                       "patch_coord (its largest row and column + 1 over every slot, padding slots' coordinates "
                       "included, as the model reads it)")

    def _gemma4_tokens(self, coord, valid) -> _Tokens:
        if coord is None:
            raise NotPlaceable(f"{self.design.tower} got no pixel_position_ids, which place its patches")
        if self.design is _GEMMA4_HF:
            patch = (int(self.tower.config.patch_size),) * 2
        else:
            patch = tuple(int(p) for p in getattr(self.tower, self.design.embedding).patch_size)
        if valid is None:
            valid = torch.ones(coord.shape[:2], dtype=torch.bool, device=coord.device)
        # Padding slots carry the coordinate -1: the grid is the largest coordinate + 1 of the image's tokens.
        sizes = torch.where(valid[..., None], coord, -1).amax(dim=1) + 1
        return _tokens(sizes, valid.bool(), coord, 0, patch, "patch_coord")

    def _siglip2_tokens(self, spatial_shapes, mask, pixel_values) -> _Tokens:
        patch = int(self.tower.config.patch_size)
        if spatial_shapes is None or pixel_values is None or pixel_values.dim() != 3:
            shape = None if pixel_values is None else list(pixel_values.shape)
            missing = "" if spatial_shapes is not None else " without spatial_shapes"
            raise NotPlaceable(f"{self.design.tower} got pixel_values {shape}{missing}; expected patches "
                               "[B, max_num_patches, C * p * p] and spatial_shapes [B, 2]")
        slots = pixel_values.shape[1]
        # Without a pixel_attention_mask, the slots past each image's grid are padding the model attends: they
        # still stand for no place on the image (docs/definition.md, native resolution).
        sizes = spatial_shapes.to(torch.long)
        valid = (torch.arange(slots, device=sizes.device) < (sizes[:, 0] * sizes[:, 1])[:, None]) if mask is None \
            else mask.bool()
        return _tokens(sizes, valid, None, 0, (patch, patch), "spatial_shapes and pixel_attention_mask")

    def place(self, context: CallContext, lead: torch.Size, num_queries: int, num_keys: int) -> Placement:
        tokens = self._call_tokens(context)
        prefix = tokens.prefix if self.with_prefix else 0
        positions = tokens.positions[..., tokens.prefix - prefix:, :]
        batch, total = positions.shape[0], positions.shape[2]
        # Standard-mode positions are built for one image and broadcast over the batch.
        # timm's NaFlexVit calls its patch dropout only while it trains itself (QA 308: one left training in an
        # eval model drops nothing).
        dropping = dropping_patches(self.patch_dropouts) if self.tower.training else None
        if dropping is not None:  # said as for a plain ViT, not as a shape (QA 305); also where it keeps every
            # patch, which it shuffles (QA 306: a rate so small that none went was placed as if in order)
            raise NotPlaceable(f"{dropping} drops patches at random in training mode, and which it kept is not "
                               "known: call model.eval() (it then keeps every patch)")
        if num_queries != num_keys or len(lead) != 2 or num_queries != total or batch not in (1, lead[0]):
            images = lead[0] if lead and batch == 1 else batch  # one image's positions serve a whole batch
            raise NotPlaceable(
                f"its attention has shape [{', '.join(map(str, lead))}, {num_queries}, {num_keys}]; expected "
                f"[{images}, heads, {total}, {total}]: {prefix} prefix tokens and the patch slots of its "
                f"{self.design.tower}'s input"
            )
        longest = max(h * w for h, w in tokens.grids)
        same = len(set(tokens.grids)) == 1
        geometry = LayerGeometry(tokens.grids[0] if same else None, tokens.stride, "global", int(lead[-1]), prefix,
                                 None if same else tokens.grids)

        def fold(values: torch.Tensor) -> torch.Tensor:
            return values[..., prefix:prefix + longest]

        return Placement(positions, None, fold, geometry, present=tokens.present)
