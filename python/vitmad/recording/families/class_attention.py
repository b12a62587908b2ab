"""Class attention: only a class token or learned queries attend, over the positioned tokens (CaiT, XCiT, VOLO;
the attention-pooling heads of timm's ViT and EVA, SigLIP and AIMv2).

The query has no place on the image, so the layer has no MAD (``docs/definition.md``), and it is listed in
``rec.skipped``; but where the class token looks over the image is exactly what these layers are read for (the
CaiT and XCiT papers draw their class-attention maps; a pooling head's map shows what the embedding is pooled
from). With ``stats=[..., "prefix_maps"]``, vitmad records that row, ``rec.class_attention_maps``, folded onto
the grid of the keys, which are the class token followed by the positioned tokens of the model's layout:

- CaiT (timm ``cait_*``, ``ClassAttn``): the class token, then the patch grid of the self-attention blocks, which
  run without it (the plain layout: the patch embedding's grid).
- XCiT (timm ``xcit_*``, the same ``ClassAttn``): the class token, then the ``Hp x Wp`` grid that the
  convolutional patch embedding returns, ``patch_size`` pixels per token.
- VOLO (timm ``volo_*``, ``ClassAttention``): the class token, then the row-major ``[B, H, W, C]`` map of the
  last stage of ``network``, at that stage's ``feature_info`` reduction.

and, for attention pooling, whose learned queries are not among the keys, the tokens the head pools, placed
by the model's plain layout (the patch grid, after the extra tokens when the head takes them too):

- timm ``AttentionPoolLatent`` as the ``attn_pool`` of a ``VisionTransformer`` (``global_pool="map"``: the
  patches, or every token with ``pool_include_prefix``) or of an ``Eva`` (every token);
- transformers SigLIP's ``SiglipMultiheadAttentionPoolingHead`` (its ``nn.MultiheadAttention`` with the learned
  probe as the query) and AIMv2's ``Aimv2AttentionPoolingHead`` (its learned query), over the patch grid;
- OpenCLIP's ``AttentionalPooler`` (CoCa's ``attentional_pool``: an ``nn.MultiheadAttention`` with learned
  queries) over every token of its ``VisionTransformer``, the class token, then the grid; in the
  ``attentional_pool="cascade"`` setup its second pooler, over the first one's outputs, is skipped without maps;
- the heads of the NaFlex towers (timm ``NaFlexVit``'s ``attn_pool``, SigLIP2's pooling head), whose keys are
  each image's own grid padded into one batch, placed by :mod:`.naflex`.

timm's parameter-free ``AttentionPoolPrr`` (``global_pool="prr"``) is self-attention over every token of its
``VisionTransformer``; with a class token (``pool_type="token"``) its output is the class token's row alone, the
patch rows computed and thrown away, so it has no MAD and is class attention here, placed by the plain layout with
``ClassQueryPlacer``'s ``self_attention`` (its maps are the rows of every token without a position: the class
token's, which is the output, then the registers', which are not). Without a class token (``pool_type="avg"``) it
averages every row, and is a self-attention layer of the plain layout with a MAD like the blocks before it.

timm's CLIP-style ``AttentionPool2d`` over a CNN's map, whose queries are its keys, is placed by
:mod:`.attention_pool2d` (with ``ClassQueryPlacer``'s ``self_attention``).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..placement import PLACING_KEYS_ONLY, CallContext, LayerPlacer, NotPlaceable, Placement
from .stages import defined_in, grid_placement, innermost_on_path, owner_of
from .windows import stage_stride

__all__ = ["placer", "ClassQueryPlacer"]

_REASON = "class attention: only the class token queries the patches ({}); its attention over the patches is " \
          "recorded with stats=[..., 'prefix_maps'] (rec.class_attention_maps)"


class ClassQueryPlacer(LayerPlacer):
    """The queries of class attention: ``[B, H, Q, N]`` attention of ``Q`` tokens without a position over the ``N``
    tokens that ``keys`` places as a self-attention layer over them would be placed.

    The placement's positions are the queries' (all NaN), its key positions the keys', and its ``fold`` the keys'
    fold, which folds a row over the keys onto their grid: the maps are folded with it, and no per-query value
    exists to fold. With ``queries_in_keys`` the queries are the first keys (the class token attends to itself
    too); without, they are learned queries apart from the keys (attention pooling). With ``self_attention`` every
    key is a query too, placed as a key (timm's ``AttentionPool2d``: the pooled token and the map's tokens), and
    the maps are the rows of the queries without a position alone. ``kind`` names the attention in the maps'
    geometry (default: class attention, or attention pooling without ``queries_in_keys``)."""

    def __init__(self, keys: LayerPlacer, what: str, queries_in_keys: bool = True, self_attention: bool = False,
                 kind: str = ""):
        self.keys, self.what, self.queries_in_keys, self.self_attention = keys, what, queries_in_keys, self_attention
        self.kind = kind or ("class attention" if queries_in_keys else "attention pooling")

    def install(self, context: CallContext) -> list[torch.utils.hooks.RemovableHandle]:
        return self.keys.install(context)

    def place(self, context: CallContext, lead: torch.Size, num_queries: int, num_keys: int) -> Placement:
        context.values[PLACING_KEYS_ONLY] = True
        try:
            keys = self.keys.place(context, lead, num_keys, num_keys)
        finally:
            context.values.pop(PLACING_KEYS_ONLY, None)
        if keys.key_positions is not None or keys.time_positions is not None:
            raise NotPlaceable(f"the keys of its class attention ({self.what}) are not one image's token grid")
        # [Nk, 2] (one sequence for every matrix), [B, 1, Nk, 2] (per image: a NaFlex batch's own grids), or
        # [B * H, Nk, 2] (per image, its heads merged with the batch: Table Transformer's DETR decoder).
        positions = keys.positions
        if positions.dim() != 2 and not (positions.dim() == 4 and positions.shape[1] == 1) \
                and not (len(lead) == 1 and tuple(positions.shape[:-2]) == tuple(lead)):
            raise NotPlaceable(f"the keys of its class attention ({self.what}) are not one token sequence")
        if self.self_attention:
            if num_queries != num_keys or not bool(positions[..., :1, :].isnan().all()):
                raise NotPlaceable(
                    f"its attention has {num_queries} queries over {num_keys} keys, where every key queries too "
                    f"({self.what}, the first without a position)"
                )
            geometry = dataclasses.replace(keys.geometry, attention=f"attention pooling over {keys.geometry.attention}")
            return Placement(positions, positions, keys.fold, geometry, present=keys.present)
        if self.queries_in_keys and (num_queries > positions.shape[-2]
                                     or not bool(positions[..., :num_queries, :].isnan().all())):
            raise NotPlaceable(
                f"its {num_queries} queries are not the tokens without a position that its {num_keys} keys begin "
                f"with ({self.what}), so vitmad does not know which tokens query"
            )
        queries = positions.new_full((*positions.shape[:-2], num_queries, positions.shape[-1]), float("nan"))
        geometry = dataclasses.replace(keys.geometry, attention=f"{self.kind} over {keys.geometry.attention}")
        return Placement(queries, positions, keys.fold, geometry, present=keys.present)


class _GridKeys(LayerPlacer):
    """Class-attention keys: the class token, then the grid a module of the model outputs in each call.

    Args:
        model, name: the model and the class-attention module's name (for the stride's checks and errors).
        source: the module whose output gives the grid; ``grid_of`` reads ``(grid_h, grid_w)`` from that output.
        reduction: pixels of the input image per cell of that grid (checked against the call's image).
        what: the source, in words (for the error of a call in which it did not run).
    """

    def __init__(self, model: nn.Module, name: str, source: nn.Module, grid_of, reduction: int, what: str):
        self.model, self.name, self.source, self.grid_of = model, name, source, grid_of
        self.reduction, self.what = reduction, what
        self.key = f"class_attention.grid.{id(source)}"

    def install(self, context: CallContext) -> list[torch.utils.hooks.RemovableHandle]:
        def see(module, args, output) -> None:
            context.values[self.key] = tuple(int(side) for side in self.grid_of(output))

        return [self.source.register_forward_hook(see)]

    def place(self, context: CallContext, lead: torch.Size, num_queries: int, num_keys: int) -> Placement:
        grid = context.values.get(self.key)
        if grid is None:
            raise NotPlaceable(f"{self.what} had not run in this call, so the grid of its keys is unknown")
        stride = stage_stride(self.model, self.name, context.image_size, grid, reduction=self.reduction)
        return grid_placement(lead, num_queries, num_keys, grid=grid, stride=stride, attention="global", prefix=1)


def _xcit_keys(model: nn.Module, xcit: nn.Module, name: str) -> _GridKeys:
    """XCiT's: its patch embedding returns ``(tokens, (Hp, Wp))``, ``patch_size`` pixels per token."""
    return _GridKeys(model, name, xcit.patch_embed, lambda output: output[1], int(xcit.patch_embed.patch_size),
                     "its patch embedding")


def _volo_keys(model: nn.Module, volo: nn.Module, name: str) -> _GridKeys:
    """VOLO's: the last ``network`` stage's ``[B, H, W, C]`` map, at its ``feature_info`` reduction."""
    return _GridKeys(model, name, volo.network[-1], lambda output: output.shape[1:3],
                     int(volo.feature_info[-1]["reduction"]), "the last stage of its network")


_PRR = ("attention pooling: timm's AttentionPoolPrr (global_pool='prr') with pool_type='token' outputs the class "
        "token's row alone, which has no position on the image (the patch rows, computed too, are discarded); its "
        "attention over the tokens is recorded with stats=[..., 'prefix_maps'] (rec.class_attention_maps)")
_POOLING = "attention pooling: {} without a position on the image; {} attention over the tokens is recorded with " \
           "stats=[..., 'prefix_maps'] (rec.class_attention_maps)"


def _pooling(model: nn.Module, name: str, module: nn.Module) -> str | None:
    """The reason of an attention-pooling head whose keys are the model's plain layout, or None."""
    if defined_in(module, "AttentionPoolLatent", "attention_pool"):
        owner = (owner_of(model, "VisionTransformer", "vision_transformer") or owner_of(model, "Eva", "eva")
                 or owner_of(model, "NaFlexVit", "naflexvit"))
        if owner is not None and getattr(owner, "attn_pool", None) is module:
            return _POOLING.format("learned latent queries", "their")
        return None
    if isinstance(module, nn.MultiheadAttention) and "." in name:
        head = model.get_submodule(name.rpartition(".")[0])
        for head_class, defined, what in (("SiglipMultiheadAttentionPoolingHead", "modeling_siglip", "SigLIP's"),
                                          ("Siglip2MultiheadAttentionPoolingHead", "modeling_siglip2", "SigLIP2's")):
            if defined_in(head, head_class, defined) and head.attention is module:
                return _POOLING.format(f"a learned query ({what} probe)", "its")
        if defined_in(head, "AttentionalPooler", "transformer") and type(head).__module__.startswith("open_clip.") \
                and head.attn is module:
            count = int(head.query.shape[0])
            return _POOLING.format(f"{count} learned {'query' if count == 1 else 'queries'} (OpenCLIP's "
                                   "AttentionalPooler, CoCa's)", "its" if count == 1 else "their")
        return None
    if defined_in(module, "Aimv2AttentionPoolingHead", "modeling_aimv2"):
        return _POOLING.format("a learned query (AIMv2's)", "its")
    return None


def _cascaded_pooler(model: nn.Module, name: str) -> str | None:
    """The reason of OpenCLIP's second pooler in its ``attentional_pool="cascade"`` setup, which pools the first
    pooler's outputs (learned queries, none with a position), or None for any other module."""
    parts = name.split(".")
    if len(parts) < 2 or parts[-2:] != ["attn_pool_contrastive", "attn"]:
        return None
    owner = model.get_submodule(".".join(parts[:-2]))
    if not (defined_in(owner, "VisionTransformer", "transformer") and type(owner).__module__.startswith("open_clip.")
            and getattr(owner, "attn_pool_type", "") == "cascade"):
        return None
    return ("attention pooling over pooled tokens: OpenCLIP's attentional_pool='cascade' pools the outputs of "
            "attn_pool, learned queries none of which has a position on the image, so neither its queries nor its "
            "keys can be placed")


def placer(model: nn.Module, name: str, module: nn.Module):
    from . import ClassQueries, Skip, naflex

    cascaded = _cascaded_pooler(model, name)
    if cascaded is not None:
        return Skip(cascaded)
    pooling = _pooling(model, name, module)
    if pooling is not None:
        # A NaFlex tower's head pools each image's own grid, padded: its keys are placed by that tower's inputs.
        return naflex.pooling_head(model, name, pooling) or ClassQueries(
            pooling, None, "the tokens it pools", queries_in_keys=False)

    if defined_in(module, "AttentionPoolPrr", "attention_pool") and getattr(module, "pool", None) == "token":
        holder = innermost_on_path(model, name, lambda m: defined_in(m, "VisionTransformer", "vision_transformer"))
        # Its rows begin with the class token only where the ViT gives it every token (timm sets
        # pool_include_prefix for "prr"; set False by hand, the pool's first row is a patch's).
        vit = None if holder is None else holder[1]
        if vit is not None and getattr(vit, "attn_pool", None) is module \
                and getattr(vit, "cls_token", None) is not None and getattr(vit, "pool_include_prefix", False):
            return ClassQueries(_PRR, None, "every token of the model, the class token first", self_attention=True)
        return None

    if defined_in(module, "ClassAttn", "cait"):
        xcit = owner_of(model, "Xcit", "xcit")
        if xcit is not None:
            return ClassQueries(_REASON.format("XCiT"), _xcit_keys(model, xcit, name), "the class token and XCiT's "
                                "patch grid")
        return ClassQueries(_REASON.format("CaiT"), None, "the class token and the patch grid")
    if defined_in(module, "ClassAttention", "volo"):
        volo = owner_of(model, "VOLO", "volo")
        if volo is None:
            return None
        return ClassQueries(_REASON.format("VOLO"), _volo_keys(model, volo, name), "the class token and the last "
                            "stage's map")
    return None
