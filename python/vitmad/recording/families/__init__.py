"""Per model family: which modules attend and where their tokens are.

Each family module offers ``placer(model, name, module)``, returning a :class:`~..placement.LayerPlacer` for an
attention module of its family, a :class:`Skip` for a layer whose attention is not spatial softmax attention
over positioned tokens, or None for a module it does not know; and, where its attention modules are not found
by the generic discovery (transformers' query/key projections, timm's ``fused_attn`` modules),
``attention_modules(model)``. The plain ViT layout (:mod:`.plain`) is the fallback for every module no family
claims.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..placement import LayerPlacer
from . import (
    attention_pool2d,
    byoanet,
    class_attention,
    conv_stages,
    convit,
    csatv2,
    davit,
    detr_encoder,
    diffusers_autoencoders,
    diffusers_captioned,
    diffusers_images,
    diffusers_unets,
    diffusers_unets_more,
    diffusers_video,
    diffusers_zimage,
    efficientformer,
    efficientvit_msra,
    eomt,
    fastvit,
    gcvit,
    hiera,
    iformer,
    kornia,
    levit,
    llama4,
    lowformer,
    lw_detr,
    map_attention,
    masked,
    maxxvit,
    memory_attention,
    minicpmv,
    mllama,
    mobilevit,
    molmo2,
    monai,
    monai_spatial,
    multi_query,
    mvit,
    naflex,
    nest,
    non_spatial,
    packed,
    padded_patches,
    pix2struct,
    pooled,
    radio,
    rf_detr,
    sam_map_encoder,
    segment_anything,
    shvit,
    svtr,
    swin,
    tiny_vit,
    tnt,
    torchvision_maxvit,
    ultralytics,
    ultralytics_sam,
    unplaced,
    video,
    video_mvit,
    video_swin,
    vilt,
    vit_pytorch,
    vit_pytorch_nd,
    vit_pytorch_stages,
    vit_stages,
    vitamin,
    vq_tokenizer,
    windowed_vit,
)

__all__ = ["Skip", "ClassQueries", "family_placer", "family_modules", "probabilities_source", "probabilities_view",
           "is_timm_model"]


@dataclass(frozen=True)
class Skip:
    """A layer left out of the recording, and why (listed in ``rec.skipped`` and ``mad.json``)."""

    reason: str


@dataclass(frozen=True)
class ClassQueries(Skip):
    """A layer whose queries are tokens without a position (class attention): skipped, as it has no MAD, but
    with ``stats=[..., "prefix_maps"]`` the attention of those queries over the positioned keys is recorded
    (``rec.class_attention_maps``, :mod:`.class_attention`).

    Attributes:
        keys: places the layer's keys as a self-attention layer over them would be placed; None for the model's
            plain ViT layout.
        what: the keys, in words (for errors).
        queries_in_keys: the queries are the first keys (a class token); False for learned queries (pooling).
        self_attention: every key queries too (timm's ``AttentionPool2d``, whose output keeps the pooled token's row
            alone): the queries are placed as the keys are, and only the rows of those without a position are
            recorded.
        queries: the kind of attention, in words, for the maps' geometry (a DETR decoder's "cross-attention of the
            object queries"); empty for "class attention" or "attention pooling", as ``queries_in_keys`` says.
    """

    keys: LayerPlacer | None = None
    what: str = ""
    queries_in_keys: bool = True
    self_attention: bool = False
    queries: str = ""


# Tried in order; the first family that claims a module places it.
_FAMILIES = (
    vit_pytorch_nd,  # before vit_pytorch (and the plain layout), whose attention classes its designs share
    packed, kornia, vit_pytorch_stages, class_attention, attention_pool2d, non_spatial, unplaced, radio, llama4, molmo2,
    minicpmv, mllama, pix2struct, eomt, masked, vilt, padded_patches, swin, video_swin, windowed_vit, segment_anything,
    sam_map_encoder, hiera, pooled, mvit, video_mvit, levit, lw_detr, rf_detr, detr_encoder, memory_attention,
    efficientformer, conv_stages, csatv2, vit_stages, maxxvit, nest, gcvit, davit, tiny_vit, fastvit, vitamin,
    mobilevit, efficientvit_msra, map_attention, tnt, byoanet, multi_query, iformer, lowformer, video, naflex, shvit,
    convit, torchvision_maxvit, vq_tokenizer, svtr, vit_pytorch, monai_spatial, monai, ultralytics, ultralytics_sam,
    diffusers_captioned, diffusers_zimage, diffusers_images, diffusers_unets_more, diffusers_unets, diffusers_video,
    diffusers_autoencoders,
)


def family_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Attention modules that only their family's code knows how to find, by qualified name."""
    found = {}
    for family in _FAMILIES:
        finder = getattr(family, "attention_modules", None)
        if finder is not None:
            found.update(finder(model))
    return found


def family_placer(model: nn.Module, name: str, module: nn.Module):
    """The family placer or :class:`Skip` of one attention module, or None when no family claims it."""
    model, name = _timm_model_holding(model, name)
    for family in _FAMILIES:
        placer = family.placer(model, name, module)
        if placer is not None:
            return placer
    return None


def _timm_model_holding(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """The outermost timm model on the path to module ``name`` and the name relative to it, where ``model`` is not
    one itself (transformers' ``TimmWrapperModel`` holds it as ``timm_model``, FastVLM's tower, Gemma 3n's); else
    ``(model, name)``. The timm families read the model's ``feature_info`` and its module names (``stages.3``),
    which the timm model keeps, named from itself, wherever it is held."""
    if is_timm_model(model):
        return model, name
    parts = name.split(".")
    for depth in range(1, len(parts)):
        owner = model.get_submodule(".".join(parts[:depth]))
        if is_timm_model(owner):
            return owner, ".".join(parts[depth:])
    return model, name


def is_timm_model(module: nn.Module) -> bool:
    """Whether ``module`` is a timm model, not one of its layers: the models carry their pretrained config."""
    return type(module).__module__.startswith("timm.models.") and hasattr(module, "pretrained_cfg")


def probabilities_source(module: nn.Module) -> nn.Module | None:
    """The submodule whose input is the attention ``module`` applies, for designs that build it from several
    softmax calls (ConViT's gated positional attention); None where the module's own softmax gives it."""
    for family in _FAMILIES:
        source = getattr(family, "probabilities_from", None)
        found = None if source is None else source(module)
        if found is not None:
            return found
    return None


def probabilities_view(module: nn.Module):
    """The view of ``module``'s softmax calls that is its attention ``[..., Nq, Nk]``, for designs whose softmax runs
    over another dim than the last (kornia's LoFTR ``FullAttention``); None where the softmax over the last dim is."""
    for family in _FAMILIES:
        view = getattr(family, "probabilities_view", None)
        found = None if view is None else view(module)
        if found is not None:
            return found
    return None
