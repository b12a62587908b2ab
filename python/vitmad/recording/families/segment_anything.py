"""Meta's Segment Anything packages: the original ``segment_anything`` (``ImageEncoderViT`` alone or inside ``Sam``)
and ``sam2`` (its ``Hiera`` image encoder alone or inside ``SAM2Base``).

``ImageEncoderViT`` is ViTDet's plain ViT on a ``[B, H, W, C]`` token map: ``PatchEmbed`` is a convolution with
kernel = stride = ``patch_size`` and no padding (a remainder of the image past the last whole patch is dropped),
then the map is permuted channels-last; the absolute position embedding and the decomposed relative position bias
(``add_decomposed_rel_pos``, added to the scores before the softmax) change the scores, not where a token is. Each
``Block`` with ``window_size > 0`` runs ``window_partition``: the map zero-padded at the bottom and right to a multiple
of the window, windows row-major, tokens row-major within a window; the padding is not masked, so a padding slot is
a key at its cell of the padded grid past the image edge and no query (docs/definition.md, windows). A block in
``global_attn_indexes`` (``window_size`` 0) attends over the whole map. ``Attention`` splits heads with
``reshape(3, B * heads, H * W, -1)``, so its softmax (``Tensor.softmax``, captured by vitmad's softmax capture)
runs over ``[B * windows * heads, N, N]``: image, then window, then head; transformers' SAM and timm's
``vision_transformer_sam`` merge them in the same order, so :class:`.windowed_vit.WindowedGridPlacer` places it,
the patch stride read from ``PatchEmbed``'s convolution. Token centres are in the pixels of the image the encoder
receives (``Sam.preprocess`` and ``SamPredictor`` resize the long side to ``img_size`` and pad the bottom and right
with zeros, which the encoder embeds as image content).

``Sam`` (and ``SamPredictor.set_image``, ``SamAutomaticMaskGenerator.generate``, which call
``model.image_encoder`` as a module, once per image or crop) holds the encoder beside ``PromptEncoder`` (no
attention) and ``MaskDecoder``, whose ``TwoWayTransformer`` runs ``transformer.Attention`` between the prompt
tokens and the image embedding. That is no image self-attention: the prompt (point, box and output) tokens have no
cell on the image. It lies outside the encoder that embeds the image, so it is not recorded by default, and is
skipped with its reason when named in ``layers``.

``sam2``'s ``Hiera`` (``modeling/backbones/hieradet.py``) is the code timm ports as ``hieradet_sam2``, which
:mod:`.windowed_vit` places: ``PatchEmbed`` a 7 x 7 convolution of stride 4 (padding 3), ``MultiScaleBlock``s on a
``[B, H, W, C]`` map with SAM's ``window_partition`` (``modeling/backbones/utils.py``: bottom/right zero padding,
windows and tokens row-major, unmasked), global blocks (``global_att_blocks``, window 0), and at each stage change a
``q_stride`` max-pool of the queries per window; ``MultiScaleAttention`` calls SDPA on ``[B * windows, heads, Nq,
Nk]``. ``ImageEncoder`` (trunk and FPN neck of convolutions), ``SAM2Base.forward_image``, ``SAM2ImagePredictor`` and
the automatic mask generator call the trunk as a module. SAM2's mask decoder runs the same two-way transformer
(``sam/transformer.py``): skipped as SAM's. Its memory attention (``MemoryAttentionLayer``, video tracking) runs
``cross_attn_image`` from the current frame's tokens to the memory bank (other frames' memories and object-pointer
tokens: no cells of this frame), skipped with that reason. Its ``self_attn`` (``RoPEAttention``: its RoPE rotates q
and k, it moves no token) attends over the current frame's map, placed as transformers' ``Sam2VideoModel``'s is
(:mod:`.memory_attention`'s ``FpnMapPlacer``): ``SAM2Base._prepare_memory_conditioned_features`` hands it
``current_vision_feats[-1]``, the ``ImageEncoder``'s last ``backbone_fpn`` map (``feat_sizes[-1]``) flattened
row-major, one object at a time in ``SAM2VideoPredictor``. ``ImageEncoder`` drops the last ``scalp`` of the trunk's
maps (one per stage, or the last alone without ``return_interm_layers``), so the map is that of the Hiera stage
left last: its stride the patch convolution's times ``q_stride`` for each pooling stage up to it (16 px for the
released configs: stage 2 of 4, ``scalp`` 1), the FpnNeck's lateral convolutions checked to keep the trunk's grid,
the map and stride checked in every call against the image the encoder ran on; a call whose frame features came
from the predictor's cache (the encoder did not run) is refused, as is the layer outside a ``SAM2Base`` that holds
it and a package ``ImageEncoder``, ``Hiera`` and ``FpnNeck``. The default records the trunk alone; the memory
attention is recorded alone or with the trunk: the trunk's patch embedding starts each frame's call, which the memory
attention joins after ``forward_image`` has returned (the recorder keeps that call for it).
"""

from __future__ import annotations

from torch import nn

from ..placement import RefusingPlacer
from .memory_attention import FpnMapPlacer, hiera_stride
from .stages import innermost_on_path
from .windowed_vit import WindowedDesign, WindowedGridPlacer

__all__ = ["placer", "windowed_encoder_placer"]

_ENCODER_MODULE = "segment_anything.modeling.image_encoder"
_DECODER_MODULE = "segment_anything.modeling.transformer"
_BLOCK = WindowedDesign("Block", "num_heads")
_SAM2_HIERA_MODULE = "sam2.modeling.backbones.hieradet"
_SAM2_TRANSFORMER_MODULE = "sam2.modeling.sam.transformer"
_SAM2_MEMORY_MODULE = "sam2.modeling.memory_attention"
_SAM2_IMAGE_ENCODER_MODULE = "sam2.modeling.backbones.image_encoder"
_SAM2_BASE_MODULE = "sam2.modeling.sam2_base"
_SAM2_BLOCK = WindowedDesign("MultiScaleBlock", "num_heads", "q_stride")

_TWO_WAY = "two-way transformer of the mask decoder ({} TwoWayTransformer): "
# Attention attribute in its owner (TwoWayAttentionBlock, or the TwoWayTransformer itself) -> why it has no MAD.
_TWO_WAY_REASONS = {
    "self_attn": "self-attention of the prompt (point/box) and output tokens, none of which has a cell on the image",
    "cross_attn_token_to_image": "cross-attention from the prompt tokens to the image embedding: its queries have "
                                 "no cell on the image",
    "final_attn_token_to_image": "cross-attention from the prompt tokens to the image embedding: its queries have "
                                 "no cell on the image",
    "cross_attn_image_to_token": "cross-attention from the image embedding to the prompt tokens: its keys have no "
                                 "cell on the image",
}
_MEMORY_CROSS = ("memory attention cross-attention (sam2 MemoryAttentionLayer.cross_attn_image): the current frame's "
                 "tokens attend to the memory bank, other frames' memories and object-pointer tokens, keys that are no "
                 "cells of the current frame, so it has no MAD")


def _is(module: nn.Module, class_name: str, defining_module: str) -> bool:
    cls = type(module)
    return cls.__name__ == class_name and cls.__module__ == defining_module


def _two_way_skip(name: str, package: str):
    from . import Skip

    what = _TWO_WAY_REASONS.get(name.rpartition(".")[2], "attention between the prompt tokens and the image "
                                                           "embedding, no image self-attention")
    return Skip(_TWO_WAY.format(package) + what)


def placer(model: nn.Module, name: str, module: nn.Module):
    cls_module = type(module).__module__
    if cls_module == _DECODER_MODULE and type(module).__name__ == "Attention":
        return _two_way_skip(name, "segment_anything")
    if cls_module == _SAM2_TRANSFORMER_MODULE and type(module).__name__ in ("Attention", "RoPEAttention"):
        return _sam2_transformer_attention(model, name, module)
    if _is(module, "Attention", _ENCODER_MODULE):
        return windowed_encoder_placer(model, name, module, "Block", "ImageEncoderViT", _ENCODER_MODULE, _BLOCK,
                         "segment_anything's image-encoder Attention", "the ImageEncoderViT or the Sam model")
    if _is(module, "MultiScaleAttention", _SAM2_HIERA_MODULE):
        return windowed_encoder_placer(model, name, module, "MultiScaleBlock", "Hiera", _SAM2_HIERA_MODULE, _SAM2_BLOCK,
                         "sam2's MultiScaleAttention", "the Hiera trunk, its ImageEncoder or the SAM2Base model")
    return None


def windowed_encoder_placer(model: nn.Module, name: str, module: nn.Module, block_class: str, encoder_class: str,
                            defining_module: str, design: WindowedDesign, what: str, record: str, *,
                            encoder_module: str | None = None):
    """The :class:`.windowed_vit.WindowedGridPlacer` of the attention ``name`` of a SAM-style windowed block
    (``block_class``, defined in ``defining_module``) inside its image encoder (``encoder_class``, defined in
    ``encoder_module``, by default the block's module), whose patch embedding gives the pixel scale; else a refusal
    naming ``what`` was found and ``record``, what to record instead. Ultralytics' copies of these encoders
    (:mod:`.ultralytics_sam`) define the block and the encoder in different files."""
    block = model.get_submodule(name.rpartition(".")[0])
    encoder_module = defining_module if encoder_module is None else encoder_module
    found = innermost_on_path(model, name, lambda m: _is(m, encoder_class, encoder_module))
    if not _is(block, block_class, defining_module) or found is None:
        held = f"{name} is held by {type(block).__name__}" if name else "it was recorded alone"  # name "": the model
        return RefusingPlacer(
            f"{what} is placed only as the attention of a {block_class} within {encoder_class} (whose PatchEmbed "
            f"gives the patch stride); {held}{'' if found is not None else f', outside any {encoder_class}'}: "
            f"record {record} that holds it"
        )
    # The encoder, not the whole model, is searched for the patch embedding (its first convolution).
    return WindowedGridPlacer(found[1], name, block, module, design)


def _sam2_transformer_attention(model: nn.Module, name: str, module: nn.Module):
    from . import Skip

    if innermost_on_path(model, name, lambda m: _is(m, "TwoWayTransformer", _SAM2_TRANSFORMER_MODULE)):
        return _two_way_skip(name, "sam2")
    found = innermost_on_path(model, name, lambda m: _is(m, "MemoryAttentionLayer", _SAM2_MEMORY_MODULE))
    if found is None:
        return None
    layer = found[1]
    if module is getattr(layer, "cross_attn_image", None):
        return Skip(_MEMORY_CROSS)
    if module is not getattr(layer, "self_attn", None):
        return None
    return _memory_self_attention(model, name, layer)


def _memory_self_attention(model: nn.Module, name: str, layer: nn.Module):
    """The placer of ``layer.self_attn``: the current frame's map, ``backbone_fpn[-1]`` of the ``ImageEncoder`` of
    the ``SAM2Base`` that holds the layer, at the stride of the Hiera stage it comes from."""
    found = innermost_on_path(model, name, _is_sam2_base)
    memory = getattr(found[1], "memory_attention", None) if found is not None else None
    encoder = getattr(found[1], "image_encoder", None) if found is not None else None
    if not isinstance(memory, nn.Module) or not any(other is layer for other in getattr(memory, "layers", ())):
        return RefusingPlacer(
            f"{name or 'it'} is sam2's memory-attention self-attention recorded without the SAM2Base (or "
            "SAM2VideoPredictor) whose memory_attention holds it and whose image encoder gives it the current "
            "frame's map, so the map's stride is unknown; record the SAM2Base that holds it")
    trunk, neck = getattr(encoder, "trunk", None), getattr(encoder, "neck", None)
    if not _is(encoder, "ImageEncoder", _SAM2_IMAGE_ENCODER_MODULE) or not _is(trunk, "Hiera", _SAM2_HIERA_MODULE) \
            or not _is(neck, "FpnNeck", _SAM2_IMAGE_ENCODER_MODULE):
        return RefusingPlacer(
            f"{name or 'it'} is sam2's memory-attention self-attention over the map of the SAM2Base's image encoder, "
            f"which is a {type(encoder).__name__} (trunk {type(trunk).__name__}, neck {type(neck).__name__}), not the "
            "package's ImageEncoder of a Hiera trunk and an FpnNeck whose stages vitmad reads; pass "
            "positions=<[N, 2] pixel position of each token> for that layer")
    lateral = [branch.conv for branch in neck.convs]
    if not all(_keeps_grid(conv) for conv in lateral):
        return RefusingPlacer(
            f"{name} attends over the map of the image encoder's FpnNeck, whose lateral convolutions (kernel, "
            f"stride, padding {[(tuple(c.kernel_size), tuple(c.stride), tuple(c.padding)) for c in lateral]}) do "
            "not all keep the trunk's grid, so vitmad does not know where its cells lie")
    # Hiera returns one map per stage (only the last where return_interm_layers is off); the encoder drops the
    # last `scalp` of them and SAM2Base hands the last of the rest (feat_sizes[-1]) to its memory attention.
    stages, outputs = len(trunk.stage_ends), len(trunk.stage_ends) if trunk.return_interm_layers else 1
    kept = outputs - int(encoder.scalp)
    if kept < 1:
        return RefusingPlacer(f"{name}: the image encoder drops {encoder.scalp} (scalp) of its trunk's {outputs} "
                              "maps, leaving none for the memory attention")
    stage = kept - 1 + stages - outputs
    stride, source = hiera_stride(tuple(trunk.patch_embed.proj.stride), tuple(trunk.q_stride),
                                  len(trunk.q_pool_blocks), stage)
    if stride is None:
        return RefusingPlacer(f"{name}: {source}")
    return FpnMapPlacer(encoder, -1, stride, source, field="backbone_fpn")


def _keeps_grid(conv: nn.Conv2d) -> bool:
    """Whether ``conv`` maps each cell of its input to the same cell of its output (stride 1, centred kernel)."""
    if tuple(conv.stride) != (1, 1) or tuple(conv.dilation) != (1, 1):
        return False
    return conv.padding == "same" or all(2 * p == k - 1 for p, k in zip(conv.padding, conv.kernel_size, strict=True))


def _is_sam2_base(module: nn.Module) -> bool:
    # SAM2VideoPredictor (sam2_video_predictor) and the training model subclass SAM2Base.
    return any(cls.__name__ == "SAM2Base" and cls.__module__ == _SAM2_BASE_MODULE for cls in type(module).__mro__)
