"""The transformer encoders of DETR-style detectors over a CNN backbone's feature map (transformers).

These designs flatten a ``[B, C, h, w]`` map row-major (``flatten(2).transpose(1, 2)``) into ``h * w`` tokens, no
other token, and run self-attention over them:

- The AIFI layers of the hybrid encoders of RT-DETR, RT-DETRv2, D-FINE, DEIMv2 and PP-DocLayoutV2 / V3 / V4
  (``<X>AIFILayer``, one per entry of ``config.encode_proj_layers``; PP-DocLayout's AIFI layer, hybrid encoder,
  encoder layer and self-attention are RT-DETR's line for line in transformers 5.25): layer ``i`` of
  ``encoder.aifi`` takes the map of level ``encode_proj_layers[i]`` (the backbone's map of that level, through a
  1x1 projection), whose stride is ``config.feat_strides`` of that level (PP-DocLayoutV3 takes the backbone's first
  map, stride 4, off to its mask head before the levels). They attend without a mask (``attention_mask=None``):
  every token is a query and a key, also where the image was padded (these models do not pass ``pixel_mask`` to
  their encoder).
- OmDet-Turbo's encoder (``OmDetTurboHybridEncoder``, RT-DETR's design under other names): encoder ``i`` takes the
  channel projection of the backbone's map ``encoder_projection_indices[i]``, without a mask; the stride is the
  reduction its timm backbone (a Swin) reports for that map.
- SAM3's DETR encoder (``Sam3DetrEncoder``): ``Sam3Model`` drops the vision neck's last FPN level and hands the
  last of the others to it, one level, without a mask; that level resamples the ViT's patch grid by its scale factor,
  so its stride is ``patch_size / scale_factor``. Its cross-attention to the prompt's tokens, the geometry
  encoder, the DETR decoder and the mask decoder's cross-attention are skipped with their reasons.
- The encoders of DETR, Conditional DETR, DAB-DETR and Table Transformer: their ``<X>ConvEncoder`` returns the
  backbone's maps, each with ``pixel_mask`` downsampled to it (nearest), and the encoder takes the last one, its mask
  flattened as the attention mask of the keys. A token the mask drops stands for padding, no image content: it
  has no position, neither query nor key, and an image's MAD is the mean over its own tokens (``Placement.present``).
  The stride is the backbone's last reduction as its timm ``feature_info`` reports it (timm backbones, also with
  ``dilation=True``: ``output_stride=16``); a backbone that reports none is refused.

Token ``(r, c)`` of a map of stride ``s`` sits at ``((r + 0.5) s, (c + 0.5) s)`` pixels of the model input, the
centre of its stride cell (``docs/definition.md``, "Pooled or strided keys"). The stride is checked in every call
against the image and the map the layer receives: each side of the map must be the floor or the ceiling of the
image's side over ``s``, else the call is refused (a backbone whose maps vitmad cannot follow). (DEIMv2's DINOv3
encoder resamples the ViT's 16 px patch grid bilinearly to each level, 2x up to stride 8, 2x down to stride 32, which
samples at the same cell centres, and concatenates it with a strided-convolution branch: the model runs only on
sides that are multiples of 32, where the two agree.)

The decoders' attention (self-attention among the object queries, cross-attention from them to the map; the
queries are learned slots, no place on the image) is skipped with that reason; their deformable attention is
skipped by :mod:`.non_spatial`. The cross-attention of DETR, Conditional DETR, DAB-DETR and Table Transformer
(``encoder_attn``; DAB-DETR's ``cross_attn.cross_attn``) attends over the encoder's output, the map's tokens in the
encoder's order, with the encoder's mask: with ``stats=[..., "prefix_maps"]`` its object queries' rows are recorded
as class-attention maps (``rec.class_attention_maps``, ``[B, heads, num_queries, h * w]``, the maps the DETR paper
draws), the keys placed as the encoder's tokens are, a padded key NaN. Conditional DETR and DAB-DETR concatenate
content and positional parts of each head's q and k, which changes the dot product, not the softmax over the map's
tokens. The segmentation head's ``MHAttentionMap`` stays skipped: its softmax runs over heads and tokens jointly
(``softmax(weights.flatten(2))``), so no head's row is a distribution over the tokens.

PP-DocLayoutV2's reading-order encoder (a LayoutLMv3-style encoder over the detected boxes' tokens) and
PP-DocLayout's GlobalPointer reading-order scores are skipped too: their tokens are boxes or object queries, no cells
of the image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..module_index import module_list, named_module_list
from ..placement import (
    CallContext,
    LayerGeometry,
    LayerPlacer,
    NotPlaceable,
    Placement,
    RefusingPlacer,
    cell_centres,
    read_only,
)
from .stages import defined_in, innermost_on_path
from .windows import stride_mismatch

__all__ = ["placer"]

# modeling module suffix -> the class name prefix of its models.
_AIFI_MODELS = {"modeling_rt_detr": "RTDetr", "modeling_rt_detr_v2": "RTDetrV2", "modeling_d_fine": "DFine",
                "modeling_deimv2": "Deimv2", "modeling_pp_doclayout_v2": "PPDocLayoutV2",
                "modeling_pp_doclayout_v3": "PPDocLayoutV3", "modeling_pp_doclayout_v4": "PPDocLayoutV4"}
# Backbone maps a model takes off before its encoder's levels: PP-DocLayoutV3's first (stride 4) feeds its mask head.
_MAPS_BEFORE_LEVELS = {"modeling_pp_doclayout_v3": 1}
_OMDET_MODELS = {"modeling_omdet_turbo": "OmDetTurbo"}
_DETR_MODELS = {"modeling_detr": "Detr", "modeling_conditional_detr": "ConditionalDetr",
                "modeling_dab_detr": "DabDetr", "modeling_table_transformer": "TableTransformer"}
# Deformable encoders (non_spatial.py skips their attention), whose decoders' object queries attend among
# themselves (and, in Grounding DINO's, to the text): with a convolutional backbone, their decoder self-attention was
# the first layer found, and was refused for want of a patch embedding, advising positions= for object queries.
_DEFORMABLE_DETR_MODELS = {"modeling_deformable_detr": "DeformableDetr", "modeling_grounding_dino": "GroundingDino",
                           "modeling_mm_grounding_dino": "MMGroundingDino"}
_GROUNDING_FUSION = ("Grounding DINO's image-text fusion: bidirectional cross-attention between the image's tokens and "
                     "the prompt's text tokens (each side's keys are the other's), so no distance on the image is "
                     "defined for it")
_GROUNDING_TEXT = ("Grounding DINO's text side (its text backbone, its encoder's text enhancer): attention among the "
                   "prompt's text tokens, none with a place on the image, so it has no MAD")

# Universal segmenters: a pixel decoder (deformable in Mask2Former's and OneFormer's) and a transformer decoder of
# mask queries, OneFormer's task and text tokens beside; their backbone (Swin) is the tower recorded.
_MASK_QUERY_MODELS = {"modeling_mask2former": "Mask2Former", "modeling_oneformer": "OneFormer",
                      "modeling_maskformer": "MaskFormer"}
_MASK_QUERIES = ("{model}'s transformer decoder: its queries are the mask queries{task}, learned slots without a "
                 "position on the image (self-attention among them, or {masked}cross-attention from them to the "
                 "pixel decoder's maps), so it has no MAD")
_ONEFORMER_TEXT = ("OneFormer's text side (its text encoder, text mapper and context decoder): attention among the "
                   "task's and the classes' text tokens, none with a place on the image, so it has no MAD")

_DECODER = ("DETR decoder attention: its queries are the object queries, learned slots without a position on the "
            "image (self-attention among them, or cross-attention from them to the encoder's map), so it has no MAD")
_CROSS = ("DETR decoder cross-attention: its queries are the object queries, learned slots without a position on the "
          "image, so it has no MAD; their attention over the encoder's map is recorded with stats=[..., "
          "'prefix_maps'] (rec.class_attention_maps)")
# The decoder attention modules of these models that the generic discovery does not find (attention_modules).
_UNDISCOVERED = {"modeling_conditional_detr": ("ConditionalDetrDecoderSelfAttention",
                                               "ConditionalDetrDecoderCrossAttention"),
                 "modeling_dab_detr": ("DabDetrAttention",)}
_READING_ORDER = ("PP-DocLayoutV2's reading-order encoder: it attends among the tokens of the boxes the detector "
                  "found (and a start and an end token), embedded from their coordinates, no token of a place on "
                  "the image's grid, so it has no MAD")
_ORDER_SCORES = ("PP-DocLayout's reading-order scores (GlobalPointer): pairwise logits between the decoder's object "
                 "queries, learned slots without a position on the image, and no softmax attention, so it has no MAD")
_MASK_HEAD = ("the segmentation head's attention map (MHAttentionMap): each object query's attention over the "
              "encoder's map; its queries are the decoder's object queries, without a position, so it has no MAD, "
              "and its softmax runs over the heads and the map's tokens jointly (softmax(weights.flatten(2))), so "
              "no head's row is a distribution over the tokens: no class-attention map either")


_SAM3 = "modeling_sam3"
# The modeling files of SAM3's detector -> the prefix of their classes: SAM3 LiteText's Sam3LiteTextModel (a MobileCLIP
# text encoder instead of CLIP's) copies Sam3Model's DETR encoder, decoders and geometry encoder under its own names,
# around the same Sam3VisionModel (of modeling_sam3), and hands its DETR encoder the same FPN level.
_SAM3_DETECTORS = {_SAM3: "Sam3", "modeling_sam3_lite_text": "Sam3LiteText"}
_SAM3_PARTS = {  # a module of Sam3Model on the path (its class name without the prefix) -> why its attention is no
    # layer to record
    "DetrDecoder": _DECODER,
    "GeometryEncoder": (
        "SAM3's geometry encoder: its queries are the tokens of the box and point prompts, no cells of the image's "
        "grid (self-attention among them, cross-attention from them to the image), so it has no MAD"),
    "MaskDecoder": (
        "SAM3's mask decoder cross-attention: the image's tokens attend to the prompt's text and geometry tokens, "
        "keys without a position on the image, so it has no MAD"),
}
_SAM3_PROMPT = ("SAM3's DETR encoder cross-attention: the image's tokens attend to the prompt's text and geometry "
                "tokens, keys without a position on the image, so it has no MAD")


def modeling_suffix(module: nn.Module) -> str:
    """The last part of the transformers module defining ``module``'s class (``"modeling_detr"``), else ""."""
    cls = type(module)
    return cls.__module__.rpartition(".")[2] if cls.__module__.startswith("transformers.") else ""


def _mask_query_model(model: nn.Module, name: str) -> str | None:
    """Why an attention module on ``name``'s path lies in a universal segmenter's transformer decoder or OneFormer's
    text side (Mask2Former, OneFormer, MaskFormer), else None. Named in layers=, they were skipped as lying outside
    the tower that embeds the image, with the advice meant for a language model's text (QA helper-246)."""
    for suffix, prefix in _MASK_QUERY_MODELS.items():
        if innermost_on_path(model, name, lambda m: defined_in(m, f"{prefix}TransformerModule", suffix)):
            return _MASK_QUERIES.format(model=prefix, task=" and its task token" * (prefix == "OneFormer"),
                                        masked="masked " * (prefix != "MaskFormer"))
        if suffix == "modeling_oneformer" and innermost_on_path(model, name, lambda m: type(m).__name__ in (
                "OneFormerTextEncoder", "OneFormerTextMapper", "OneFormerTextContextDecoder")
                and type(m).__module__.endswith(suffix)):
            return _ONEFORMER_TEXT
    return None


def placer(model: nn.Module, name: str, module: nn.Module):
    from . import Skip

    suffix = modeling_suffix(module)
    if suffix in _SAM3_DETECTORS:
        detector = _SAM3_DETECTORS[suffix]
        return _sam3(model, name, module, detector, suffix) if defined_in(module, f"{detector}Attention", suffix) \
            else None
    if "Attention" in type(module).__name__ and _on_grounding_text_side(model, name):
        return Skip(_GROUNDING_TEXT)
    segmenter = _mask_query_model(model, name)
    if segmenter is not None and "Attention" in type(module).__name__:
        return Skip(segmenter)
    deformable = _DEFORMABLE_DETR_MODELS.get(suffix)
    if deformable is not None and type(module).__name__.endswith(("BiMultiHeadAttention", "FusionLayer")):
        return Skip(_GROUNDING_FUSION)
    if deformable is not None:
        # Their deformable attention is left to non_spatial's reason.
        in_decoder = "MultiscaleDeformable" not in type(module).__name__ and "Attention" in type(module).__name__ and \
            innermost_on_path(model, name, lambda m: defined_in(m, f"{deformable}Decoder", suffix)) is not None
        return Skip(_DECODER) if in_decoder else None
    prefix = _AIFI_MODELS.get(suffix) or _OMDET_MODELS.get(suffix) or _DETR_MODELS.get(suffix)
    if prefix is not None and defined_in(module, f"{prefix}GlobalPointer", suffix):  # its q_proj and k_proj
        return Skip(_ORDER_SCORES)
    if prefix is None or "Attention" not in type(module).__name__:  # a layer named among others (layers=["*"])
        return None
    decoder = innermost_on_path(model, name, lambda m: defined_in(m, f"{prefix}Decoder", suffix))
    if decoder is not None:
        if suffix in _DETR_MODELS and _is_cross_attention(model, name, module, prefix, suffix):
            return _object_queries(model, decoder[0], module, prefix, suffix)
        return Skip(_DECODER)
    if defined_in(module, f"{prefix}MHAttentionMap", suffix):
        return Skip(_MASK_HEAD)
    if innermost_on_path(model, name, lambda m: defined_in(m, f"{prefix}ReadingOrder", suffix)) is not None:
        return Skip(_READING_ORDER)
    if suffix in _AIFI_MODELS:
        found = innermost_on_path(model, name, lambda m: defined_in(m, f"{prefix}AIFILayer", suffix))
        return None if found is None else _aifi_placer(model, found, prefix, suffix)
    found = innermost_on_path(model, name, lambda m: defined_in(m, f"{prefix}Encoder", suffix))
    if found is not None and suffix in _OMDET_MODELS:
        return _omdet_placer(model, found, prefix, suffix)
    if found is None:
        return None
    # Table Transformer's attention computes its own softmax over [B * heads, N, N].
    return _detr_placer(model, found[0], prefix, suffix,
                        int(module.num_heads) if prefix == "TableTransformer" else None)


def _on_grounding_text_side(model: nn.Module, name: str) -> bool:
    """Whether module ``name`` is in a Grounding DINO's text backbone (a BERT, of its own modeling file) or in its
    encoder's text enhancer layers."""
    parts = name.split(".")
    for depth, part in enumerate(parts[:-1]):
        if part in ("text_backbone", "text_enhancer_layer"):
            owner = model.get_submodule(".".join(parts[:depth])) if depth else model
            if modeling_suffix(owner) in ("modeling_grounding_dino", "modeling_mm_grounding_dino"):
                return True
    return False


def attention_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The decoder attention of Conditional DETR and DAB-DETR, which the generic discovery does not find (their
    query and key projections are content and positional pairs), by qualified name: listed as skipped, and the
    cross-attention's maps recorded with 'prefix_maps'; Grounding DINO's image-text fusion, listed as skipped."""
    found = {}
    for name, module in named_module_list(model):
        suffix = modeling_suffix(module)
        if suffix in _DEFORMABLE_DETR_MODELS and type(module).__name__.endswith("BiMultiHeadAttention"):
            found[name] = module  # Grounding DINO's image-text fusion: projections the generic discovery misses
        elif type(module).__name__ in _UNDISCOVERED.get(suffix, ()) and innermost_on_path(
                model, name, lambda m, s=suffix: defined_in(m, f"{_DETR_MODELS[s]}Decoder", s)) is not None:
            found[name] = module
    return found


def _is_cross_attention(model: nn.Module, name: str, module: nn.Module, prefix: str, suffix: str) -> bool:
    """Whether ``module`` computes a DETR decoder layer's cross-attention from its object queries to the encoder's
    map: the layer's ``encoder_attn`` (DETR, Conditional DETR, Table Transformer), or the attention inside its
    ``cross_attn`` (DAB-DETR)."""
    found = innermost_on_path(model, name, lambda m: defined_in(m, f"{prefix}DecoderLayer", suffix))
    if found is None:
        return False
    layer = found[1]
    if suffix == "modeling_dab_detr":
        return getattr(getattr(layer, "cross_attn", None), "cross_attn", None) is module
    return getattr(layer, "encoder_attn", None) is module


def _object_queries(model: nn.Module, decoder_name: str, module: nn.Module, prefix: str, suffix: str):
    """A DETR decoder layer's cross-attention: its object queries have no MAD, their attention over the encoder's
    map is recorded with 'prefix_maps', its keys placed as the encoder's tokens are."""
    from . import ClassQueries

    heads = int(module.num_heads) if prefix == "TableTransformer" else None
    keys = _detr_placer(model, decoder_name, prefix, suffix, heads)
    return ClassQueries(_CROSS, keys, "the encoder's map tokens", queries_in_keys=False,
                        queries="cross-attention of the object queries")


def _reported_reductions(root: nn.Module) -> list[int] | None:
    """The reductions of the maps a timm backbone in ``root`` returns, as its ``feature_info`` reports them (one per
    output, in order), or None where ``root`` holds no timm backbone."""
    for module in module_list(root):
        info = getattr(module, "feature_info", None)
        if callable(getattr(info, "reduction", None)):
            return [int(r) for r in info.reduction()]
    return None


def _parent(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name.rpartition(".")[0]) if "." in name else model


def _aifi_placer(model: nn.Module, found: tuple[str, nn.Module], prefix: str, suffix: str):
    aifi_name, aifi = found
    layers = _parent(model, aifi_name)  # encoder.aifi, a ModuleList
    encoder_name = aifi_name.rpartition(".")[0].rpartition(".")[0]
    encoder = model.get_submodule(encoder_name) if encoder_name else model
    if not defined_in(encoder, f"{prefix}HybridEncoder", suffix) or getattr(encoder, "aifi", None) is not layers:
        return RefusingPlacer(f"it is an AIFI layer recorded without the {prefix}HybridEncoder that gives it its "
                              "feature map, so the map's stride is unknown; record the detector that holds it")
    index = next(i for i, layer in enumerate(layers) if layer is aifi)
    level = int(encoder.encode_proj_layers[index])
    stride = int(encoder.feat_strides[level])
    source = f"config.feat_strides[{level}] (the level of encode_proj_layers[{index}])"
    detector = _parent(model, encoder_name) if encoder_name else None
    reported = None if detector is None else _reported_reductions(detector)
    reported = None if reported is None else reported[_MAPS_BEFORE_LEVELS.get(suffix, 0):]
    if reported is not None and (len(reported) != len(encoder.feat_strides) or reported[level] != stride):
        return RefusingPlacer(
            f"its map is level {level}, of stride {stride} by {source}, but the model's timm backbone reports "
            f"the reductions {reported} for its maps, so the map's stride is unknown"
        )
    return _MapPlacer(aifi, "input", stride, source)


def _omdet_placer(model: nn.Module, found: tuple[str, nn.Module], prefix: str, suffix: str):
    encoder_name, encoder = found
    hybrid_name = encoder_name.rpartition(".")[0].rpartition(".")[0]
    hybrid = model.get_submodule(hybrid_name) if hybrid_name else model
    if not defined_in(hybrid, f"{prefix}HybridEncoder", suffix) \
            or not any(layer is encoder for layer in getattr(hybrid, "encoder", ())):
        return RefusingPlacer(f"it is an encoder layer recorded without the {prefix}HybridEncoder that gives it its "
                              "feature map, so the map's stride is unknown; record the detector that holds it")
    index = next(i for i, layer in enumerate(hybrid.encoder) if layer is encoder)
    level = int(hybrid.encoder_projection_indices[index])
    detector = _parent(model, hybrid_name) if hybrid_name else None
    backbone = getattr(detector, "vision_backbone", None)
    reported = None if not isinstance(backbone, nn.Module) else _reported_reductions(backbone)
    if not reported or len(reported) != len(hybrid.channel_projection_layers):
        return RefusingPlacer(
            f"its map is the backbone's map {level} (encoder_projection_indices[{index}]), but the model's backbone "
            f"reports {'no reductions' if not reported else f'the reductions {reported}'} for its "
            f"{len(hybrid.channel_projection_layers)} maps (vitmad reads them from a timm backbone's feature_info), "
            "so the map's stride is unknown; pass positions=<[B, N, 2] pixel position of each token> with "
            "layers=[its encoder's self-attention modules]"
        )
    source = f"the reduction its timm backbone's feature_info reports for map {level} (encoder_projection_indices)"
    return _MapPlacer(hybrid.channel_projection_layers[level], "output", reported[level], source)


def _sam3(model: nn.Module, name: str, module: nn.Module, detector: str, suffix: str):
    """A ``Sam3Attention`` (``detector`` "Sam3") or ``Sam3LiteTextAttention`` of SAM3's detector."""
    from . import Skip

    for part, reason in _SAM3_PARTS.items():
        if innermost_on_path(model, name, lambda m, part=part: defined_in(m, detector + part, suffix)) is not None:
            return Skip(reason)
    found = innermost_on_path(model, name, lambda m: defined_in(m, f"{detector}DetrEncoderLayer", suffix))
    if found is None:
        return None  # the ViT's attention (windowed_vit.py)
    if module is found[1].cross_attn:
        return Skip(_SAM3_PROMPT)
    if module is not found[1].self_attn:
        return None
    encoder_name = found[0].rpartition(".")[0].rpartition(".")[0]  # detr_encoder.layers.<i>
    holder = _parent(model, encoder_name) if encoder_name else None
    vision = getattr(holder, "vision_encoder", None)
    if encoder_name == "" or not isinstance(vision, nn.Module) or not defined_in(vision, "Sam3VisionModel", _SAM3) \
            or not defined_in(model.get_submodule(encoder_name), f"{detector}DetrEncoder", suffix) \
            or len(vision.neck.fpn_layers) < 2:
        return RefusingPlacer("it is a DETR encoder layer recorded without the Sam3VisionModel whose FPN level it "
                              "attends over, so the level's stride is unknown; record the "
                              f"{detector}Model that holds it")
    # Sam3Model drops the neck's last level (fpn_hidden_states[:-1]) and hands the last of the rest to its DETR
    # encoder. That level resamples the ViT's patch grid by its scale factor (2x2 transposed convolutions up, a 2x2
    # max pool down): its cells are patch_size / scale pixels.
    level = len(vision.neck.fpn_layers) - 2
    fpn = vision.neck.fpn_layers[level]
    patch = int(vision.config.backbone_config.patch_size)
    stride = patch / float(fpn.scale_factor)
    source = (f"the ViT's patch_size ({patch}) over the scale factor ({fpn.scale_factor}) of "
              f"neck.fpn_layers.{level}, the level {detector}Model hands its DETR encoder")
    return _MapPlacer(fpn, "output", stride, source, resampled=(patch, float(fpn.scale_factor)))


def _detr_placer(model: nn.Module, holder_name: str, prefix: str, suffix: str, merged_heads: int | None):
    """The tokens of the last map of the ``ConvEncoder`` beside ``holder_name`` (the encoder, or the decoder whose
    cross-attention attends over the encoder's output, with the same mask): ``merged_heads`` where the attention
    is ``[B * heads, N, N]``."""
    detector = _parent(model, holder_name) if holder_name else None
    conv = None if detector is None else next(
        (m for m in module_list(detector) if defined_in(m, f"{prefix}ConvEncoder", suffix)), None)
    if conv is None:
        return RefusingPlacer(f"it attends over the encoder's map, recorded without the {prefix}ConvEncoder that "
                              "makes that map and its mask, so its tokens are unknown; record the detector that "
                              "holds it")
    reported = _reported_reductions(conv)
    if not reported:
        return RefusingPlacer(
            f"its backbone ({type(conv.model).__name__}) does not report the stride of its feature maps (vitmad "
            "reads it from a timm backbone's feature_info: use_timm_backbone=True), so the pixel stride of the map "
            "its encoder attends over is unknown; pass positions=<[B, N, 2] pixel position of each token, NaN rows "
            "for the padding> with layers=[its encoder's self-attention modules] (the maps of its decoder's "
            "cross-attention are not recorded with positions given by hand)"
        )
    source = f"the last reduction its timm backbone's feature_info reports ({type(conv.model).__name__})"
    return _MapPlacer(conv, "last output", reported[-1], source, merged_heads=merged_heads)


@dataclass(frozen=True)
class _Map:
    """The map a layer attends over in this call: ``batch``, ``grid`` ``(h, w)``, ``mask`` ``[B, h * w]`` (True: a
    token of the image) or None where every token is."""

    batch: int
    grid: tuple[int, int]
    mask: torch.Tensor | None


class _MapPlacer(LayerPlacer):
    """Places the ``h * w`` row-major tokens of the map ``watch`` hands over in this call: its input ``[B, C, h, w]``
    (an AIFI layer's), its output (OmDet-Turbo's channel projection of the level), or the last ``(map, mask)`` pair
    of its output (a DETR ``ConvEncoder``'s).

    Args:
        watch: the module whose input or output is the map.
        read: ``"input"``, ``"output"`` or ``"last output"``.
        stride: the map's nominal pixel stride (a fraction of a pixel where a map is upsampled: SAM3), checked in
            each call.
        source: where ``stride`` comes from, in words (for errors).
        merged_heads: the module's head count where its attention is ``[B * heads, N, N]``, batch-major (Table
            Transformer's); None for ``[B, heads, N, N]``.
    """

    def __init__(self, watch: nn.Module, read: str, stride: float, source: str, *, merged_heads: int | None = None,
                 resampled: tuple[int, float] | None = None):
        self.watch, self.read, self.stride, self.source = watch, read, stride, source
        self.merged_heads = merged_heads
        self.resampled = resampled
        self.key = f"detr_encoder.map.{id(watch)}"
        # The latest placement of a map without padding, by (grid, heads, batch): reused while they stay the same,
        # its positions copied to a device once.
        self._unmasked: tuple[tuple, Placement] | None = None

    def install(self, context: CallContext) -> list[torch.utils.hooks.RemovableHandle]:
        def see_input(module, args) -> None:
            x = args[0] if args else None
            context.values[self.key] = _Map(int(x.shape[0]), (int(x.shape[2]), int(x.shape[3])), None) \
                if isinstance(x, torch.Tensor) and x.dim() == 4 else None

        def see_output(module, args, output) -> None:
            last = output[-1] if isinstance(output, (list, tuple)) and output else None
            if not (isinstance(last, (list, tuple)) and len(last) == 2 and isinstance(last[0], torch.Tensor)
                    and last[0].dim() == 4 and isinstance(last[1], torch.Tensor)):
                context.values[self.key] = None
                return
            feature_map, mask = last
            batch, grid = int(feature_map.shape[0]), (int(feature_map.shape[2]), int(feature_map.shape[3]))
            mask = mask.reshape(mask.shape[0], -1).bool() if tuple(mask.shape) == (batch, *grid) else None
            context.values[self.key] = _Map(batch, grid, mask) if mask is not None else None

        def see_map(module, args, output) -> None:
            see_input(module, (output,))

        if self.read == "input":
            return [self.watch.register_forward_pre_hook(see_input)]
        return [self.watch.register_forward_hook(see_map if self.read == "output" else see_output)]

    def place(self, context: CallContext, lead: torch.Size, num_queries: int, num_keys: int) -> Placement:
        seen: _Map | None = context.values.get(self.key)
        if seen is None:
            what = "last (feature map, mask) output" if self.read == "last output" else self.read
            raise NotPlaceable(f"{type(self.watch).__name__} gave no [B, C, h, w] map as its {what} before it ran "
                               "(a forward from inputs_embeds?), so its tokens are unknown")
        self._check_stride(context.image_size, seen.grid)
        tokens, merged = seen.grid[0] * seen.grid[1], self.merged_heads
        expected = [seen.batch, "H"] if merged is None else [seen.batch * merged]
        shape = [int(d) for d in lead]
        fits = len(shape) == 2 and shape[0] == seen.batch if merged is None else shape == expected
        if not fits or num_queries != tokens or num_keys != tokens:
            raise NotPlaceable(
                f"its attention has shape [{', '.join(map(str, lead))}, {num_queries}, {num_keys}]; expected "
                f"[{', '.join(map(str, expected))}, {tokens}, {tokens}]: self-attention over the "
                f"{seen.grid[0]}x{seen.grid[1]} map {type(self.watch).__name__} handed over"
                + ("" if merged is None else f" ({merged} heads merged with the batch)")
            )
        heads = int(lead[1]) if merged is None else merged
        key = f"{self.key}.placement.{heads}"
        placement = context.values.get(key)  # the layers of one call share it
        if placement is None:
            placement = context.values[key] = self._placement(seen, heads)
        return placement

    def _check_stride(self, image: tuple[int, int] | None, grid: tuple[int, int]) -> None:
        if image is None:
            raise NotPlaceable("it ran before any convolution saw the image, so its pixel scale is unknown")
        if self.resampled is not None:
            # A level resampled from the patch grid, which floors the image (a 44 px high image in 8 px patches is
            # 5 rows, 10 on a level of scale 2, where 44 / 4 px would have allowed 11 only).
            patch, scale = self.resampled
            patches = [size // patch for size in image]
            expected = tuple(math.floor(side * scale) for side in patches)
            if tuple(grid) != expected:
                raise NotPlaceable(
                    f"its feature map is {grid[0]}x{grid[1]} for an image of {image[0]}x{image[1]} px, but "
                    f"{self.source} gives {expected[0]}x{expected[1]} (the {patches[0]}x{patches[1]} patch grid "
                    f"resampled by {scale:g}): a backbone whose maps vitmad cannot follow; pass positions=<[N, 2] "
                    "pixel position of each token>")
            return
        mismatch = stride_mismatch(image, grid, self.stride)
        if mismatch is not None:
            raise NotPlaceable(mismatch.format(f"a stride of {self.stride:g} px, {self.source},")
                               + ": a backbone whose maps vitmad cannot follow; pass positions=<[N, 2] pixel position "
                               "of each token>")

    def _placement(self, seen: _Map, heads: int) -> Placement:
        stride = (float(self.stride), float(self.stride))
        tokens, batch, merged = seen.grid[0] * seen.grid[1], seen.batch, self.merged_heads is not None

        def fold(values: torch.Tensor) -> torch.Tensor:  # [B, heads, N], or [B * heads, N] batch-major
            return values.reshape(batch, heads, tokens) if merged else values

        mask = seen.mask
        if mask is None or bool(mask.all()):
            key = (seen.grid, heads, batch)
            if self._unmasked is None or self._unmasked[0] != key:
                positions, = read_only(cell_centres(*seen.grid, stride).reshape(-1, 2), positions=1)
                geometry = LayerGeometry(seen.grid, stride, "global", heads, 0)
                self._unmasked = key, Placement(positions, None, fold, geometry)
            return self._unmasked[1]
        cells = cell_centres(*seen.grid, stride, device=mask.device).reshape(-1, 2)
        positions = torch.where(mask.unsqueeze(-1), cells, float("nan")).unsqueeze(1)  # [B, 1, N, 2]
        if merged:
            positions = positions.expand(-1, heads, -1, -1).reshape(batch * heads, tokens, 2)
        geometry = LayerGeometry(seen.grid, stride, "global, padding tokens (pixel_mask) without a position", heads, 0)
        return Placement(positions, None, fold, geometry, present=mask)
