"""Packed native-resolution vision towers in ``vitmad profile``: the Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3-VL-MoE,
Qwen3.5 and Qwen3.5-MoE vision towers, MiniMax-M3-VL's, Cosmos3-Edge's, LFM3-VL's, PaddleOCR-VL's, Ovis2.5's,
Muse Glimmer's, Muse Spark's, VideoLLaMA3's, HunYuanVL's, HY-V4-VL's and Pixtral's (``recording/families/packed.py``
records them, and more towers that ``vitmad profile`` does not load: GLM, ERNIE-4.5-VL, dots3, the Omni models,
EXAONE 4.5, Cohere Compass, Qwen4-Exp and Kimi-K2.5, whose checkpoint layouts or image processors are not checked
here; a Kimi-K2.5 checkpoint is refused from its config, :data:`_NOT_LOADED` says why).

Loading (``hf:<id or folder>``):

- a whole vision-language checkpoint (``Qwen2VLForConditionalGeneration``, ``Qwen2_5_VLForConditionalGeneration``,
  ``Qwen3VLForConditionalGeneration``, ``Qwen3VLMoeForConditionalGeneration``, ``Qwen3_5ForConditionalGeneration``,
  ``Qwen3_5MoeForConditionalGeneration``, ``MiniMaxM3SparseForConditionalGeneration``,
  ``Cosmos3EdgeForConditionalGeneration``, ``Lfm3VlForConditionalGeneration``, ``PaddleOCRVLForConditionalGeneration``,
  ``Ovis2_5ForConditionalGeneration``, ``MuseGlimmerForConditionalGeneration``, ``MuseSparkForConditionalGeneration``,
  ``VideoLlama3ForConditionalGeneration``, ``HunYuanVLForConditionalGeneration``, ``HYV4VLForConditionalGeneration``,
  their ``*Model``, and ``LlavaForConditionalGeneration`` / ``Mistral3ForConditionalGeneration`` whose ``vision_config``
  is Pixtral's): only its vision tower is built and loaded, from the checkpoint's ``visual.*`` / ``model.visual.*``
  (Qwen, Cosmos3-Edge, PaddleOCR-VL) or ``vision_tower.*`` / ``model.vision_tower.*`` (MiniMax-M3-VL, LFM3-VL, Ovis2.5,
  the Muse models, LLaVA, Mistral 3) or ``vision_model.*`` / ``model.vision_model.*`` (VideoLLaMA3) weights, the module
  names of the layouts transformers converts renamed as it renames them (:attr:`PackedTower.renames`: MiniMax-M3-VL's
  original ``vision_tower.vision_model.*``, Ovis2.5's ``visual_tokenizer.vit.vision_model.*``, HunYuanVL's and
  HY-V4-VL's ``vit.*`` with Megatron's names and ``perceive``, Cosmos3-Edge's ``to_q`` / ``up_proj``; LFM3-VL's tower
  renames its own); the language model (and Muse Spark's audio tower) is never loaded (HunYuanVL's and HY-V4-VL's
  ``model.layers.*`` moved aside, since ``from_pretrained`` strips ``model.``). A tower weight the checkpoint lacks is
  an error, never a random weight.
- a vision tower saved alone (``save_pretrained`` of a ``Qwen2VisionTransformerPretrainedModel``,
  ``Qwen2_5_VisionTransformerPretrainedModel``, ``Qwen3VLVisionModel``, ``Qwen3VLMoeVisionModel``,
  ``Qwen3_5VisionModel``, ``Qwen3_5MoeVisionModel``, ``MiniMaxM3VLVisionModel``, ``Cosmos3EdgeVisionModel``,
  ``Lfm3VlVisionModel``, ``PaddleOCRVisionModel``, ``Ovis2_5VisionModel``, ``MuseGlimmerVisionModel``,
  ``MuseSparkVisionModel``, ``VideoLlama3VisionModel``, ``HunYuanVLVisionTransformer``, ``HYV4VLVisionModel`` or
  ``PixtralVisionModel``), under its own module names.

``LoadedModel.description`` (``mad.json``'s ``settings.profiled``) says which tower was profiled.

Feeding: the image processor of the checkpoint (its ``preprocessor_config.json``; without one, the defaults of the
model's processor class, with the tower's patch, merge and temporal patch sizes, and for Pixtral the tower's largest
image side as ``longest_edge``) resizes each image, of the class its ``image_processor_type`` names. The Qwen towers are
fed by ``Qwen2VLImageProcessor`` (or its ``...Pil`` twin), Pixtral by ``PixtralImageProcessor`` (or ``...Pil``),
MiniMax-M3-VL by ``MiniMaxM3VLImageProcessor``, Cosmos3-Edge by ``Cosmos3EdgeImageProcessor`` (or ``...Pil``; each patch
``(p, p, C)``, no temporal patch), LFM3-VL by ``Qwen2VLImageProcessor`` (or ``...Pil``), PaddleOCR-VL by
``PaddleOCRVLImageProcessor`` (or ``...Pil``: its own ``smart_resize``, the patches row-major, each ``(C, p, p)``,
passed to the tower as ``[1, N, C, p, p]``), Ovis2.5 by ``Ovis2_5ImageProcessor`` (or ``...Pil``: its own
``smart_resize``, Qwen2-VL's merge-block patches), Muse Glimmer and Muse Spark by ``MuseGlimmerImageProcessor`` (the
grid of ``patch * merge_size`` blocks nearest the image's ratio within ``max_image_tokens`` merged tokens, the patches
row-major, each ``(t, C, p, p)``; their towers merge nothing before their last layer), VideoLLaMA3 by
``VideoLlama3ImageProcessor`` (or ``...Pil``) with its default ``merge_size`` 1 only (row-major patches; the tower told
``merge_sizes`` 1 per image; an image processor of another ``merge_size`` is refused; clips go through its video
processor, merge size 2 by default, told to the tower), HunYuanVL by
``HunYuanVLImageProcessor`` and HY-V4-VL by ``HYV4VLImageProcessor`` (or ``...Pil``: Qwen2-VL's ``smart_resize``, the
patches row-major, each ``(C, p, p)``); transformers 4's ``...Fast`` name is read as transformers 5 reads it, the base
class. A checkpoint whose processor is of another class is refused (another class resizes by other rules:
``Glm4vImageProcessor`` counts both temporal patches against ``max_pixels``, and cuts a 1200 x 900 image into 58 x 42
patches at Qwen2-VL's settings where ``Qwen2VLImageProcessor`` cuts 82 x 60), and so is one whose patch, merge or
temporal patch size is not the tower's config's (the processor orders the patches by its ``merge_size``, the tower
places them by its ``spatial_merge_size``; PaddleOCR-VL's, HunYuanVL's, HY-V4-VL's and the Muse towers' processors round
the resize to it, and what follows the tower merges by it: ``merge_size`` there); several images of different sizes go
into one packed forward (:class:`~.native.NativeFeed`). A fixed ``image_size`` resizes every image to exactly that size
(cover and centre crop, as for any model), which must be whole patches: multiples of ``patch * spatial_merge_size`` for
Qwen, of ``patch`` (and at most the tower's ``image_size``) for Pixtral; no ``image_size`` is refused, since these
towers have no input size of their own. Clips go to the Qwen, VideoLLaMA3, Ovis2.5, LFM3-VL, Cosmos3-Edge, HY-V4-VL,
Muse and MiniMax-M3-VL towers through their models' video processors instead (``packed_videos.py``; VideoLLaMA3's
merge blocks of its video processor's ``merge_size``, told to the tower per clip; MiniMax-M3-VL's segments attended
over space and time, with a temporal MAD).
"""

from __future__ import annotations

import functools
import importlib
import json
import math
import re
from dataclasses import dataclass

import torch
from torch import nn

from .options import OptionError

__all__ = ["tower_kind", "tower_sizes", "find_packed_tower", "load_packed_tower", "packed_forward", "packed_processor",
           "processor_settings", "check_packed_size", "channels_last", "row_major", "temporal_first", "call_packed",
           "PackedTower",
           "PACKED_TOWERS"]

@dataclass(frozen=True)
class PackedTower:
    """One packed tower ``vitmad profile`` loads.

    Attributes:
        kind: ``"qwen"`` (merge-block patches and ``grid_thw``) or ``"pixtral"`` (pixels and ``image_sizes``).
        module: the modeling module that defines the tower class.
        config: class name of the tower's config.
        where: the tower's attribute in the whole model (named in the description).
        prefixes: where a whole vision-language checkpoint keeps the tower's weights (transformers 5's layout, and
            the one ``save_pretrained`` writes or the original checkpoints use).
        renames: ``(pattern, replacement)`` of the tower's keys in the layouts whose module names differ from
            transformers' (the original checkpoint's, or what ``save_pretrained`` writes), applied before ``prefixes``.
        patch: where the tower keeps its patch size, a dotted attribute path from the tower.
        temporal: where it keeps its temporal patch size; None: it has none (1).
        merge: where it keeps its spatial merge size (the processor's ``merge_size`` must be it: the tower, or
            the projector after it, merges blocks of that many patches a side); None: the tower takes a merge size
            per image as an argument (``merge_argument``), fed here as 1 only.
        merge_argument: the tower's argument of per-image merge sizes (VideoLLaMA3's ``merge_sizes``), else None.
        layout: how the tower takes the packed patches: ``"flat"`` ``[N, C * t * p * p]``, ``"patches"``
            ``[1, N, C * t, p, p]`` (PaddleOCR-VL's, as its model passes its processor's output).
        processors: the image processor classes of the model (transformers' auto map), the first its default,
            always named in the processor settings (and so in ``mad.json`` and the run's fingerprint). Empty: the
            kind's (:data:`_KIND_PROCESSORS`), its default left out of the settings. Either way a checkpoint's
            processor of another class is refused.
    """

    kind: str
    module: str
    config: str
    where: str
    prefixes: tuple[str, ...]
    renames: tuple[tuple[str, str], ...] = ()
    patch: str = "patch_embed.patch_size"
    temporal: str | None = "patch_embed.temporal_patch_size"
    processors: tuple[str, ...] = ()
    merge: str | None = "spatial_merge_size"
    layout: str = "flat"
    merge_argument: str | None = None


_QWEN_PREFIXES = ("model.visual.", "visual.")
_TOWER_PREFIXES = ("model.vision_tower.", "vision_tower.")

# HunYuanVL's original layout (what save_pretrained of the whole model writes), as transformers' conversion mapping
# renames it: the tower under vit.*; save_pretrained of HunYuanVLModel (no head) writes it under vision_tower.*, its
# module names still the original ones (mlp.dense_h_to_4h, perceive), so the same renames take either prefix (the
# model\.vision_tower\. and vision_tower\. prefixes are PackedTower.prefixes, dropped after). Its language model
# is saved as model.layers.*: moved out of the way first, since from_pretrained strips the base model prefix
# "model." and would read its layers as the tower's.
_HUNYUAN_TOWER = r"^(?:vit|vision_tower|model\.vision_tower)\."
_HUNYUAN_RENAMES = (
    (r"^model\.(?!vision_tower\.)", "language_model."),
    (_HUNYUAN_TOWER + r"layers\.(\d+)\.input_layernorm\.", r"layers.\1.layer_norm1."),
    (_HUNYUAN_TOWER + r"layers\.(\d+)\.post_attention_layernorm\.", r"layers.\1.layer_norm2."),
    (_HUNYUAN_TOWER + r"layers\.(\d+)\.mlp\.dense_h_to_4h\.", r"layers.\1.mlp.fc1."),
    (_HUNYUAN_TOWER + r"layers\.(\d+)\.mlp\.dense_4h_to_h\.", r"layers.\1.mlp.fc2."),
    (_HUNYUAN_TOWER + r"perceive\.proj\.0\.", "patch_merger.proj_conv."),
    (_HUNYUAN_TOWER + r"perceive\.proj\.2\.", "patch_merger.proj_out."),
    (_HUNYUAN_TOWER + r"perceive\.", "patch_merger."))
# HY-V4-VL's: HunYuanVL's, its patch merger's first norm saved as norm (before_rms in transformers).
_HY_V4_RENAMES = (*_HUNYUAN_RENAMES[:-1], (_HUNYUAN_TOWER + r"perceive\.norm\.", "patch_merger.before_rms."),
                  _HUNYUAN_RENAMES[-1])

# Tower class -> how it is loaded and fed.
PACKED_TOWERS = {
    "Qwen2VisionTransformerPretrainedModel": PackedTower(
        "qwen", "transformers.models.qwen2_vl.modeling_qwen2_vl", "Qwen2VLVisionConfig", "visual", _QWEN_PREFIXES),
    "Qwen2_5_VisionTransformerPretrainedModel": PackedTower(
        "qwen", "transformers.models.qwen2_5_vl.modeling_qwen2_5_vl", "Qwen2_5_VLVisionConfig", "visual",
        _QWEN_PREFIXES),
    "Qwen3VLVisionModel": PackedTower("qwen", "transformers.models.qwen3_vl.modeling_qwen3_vl", "Qwen3VLVisionConfig",
                                      "visual", _QWEN_PREFIXES),
    # Qwen3-VL's tower under other names; their checkpoints keep it under model.visual, their processor is
    # Qwen2VLImageProcessor (transformers' image processor auto map).
    "Qwen3VLMoeVisionModel": PackedTower("qwen", "transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe",
                                         "Qwen3VLMoeVisionConfig", "visual", _QWEN_PREFIXES),
    "Qwen3_5VisionModel": PackedTower("qwen", "transformers.models.qwen3_5.modeling_qwen3_5", "Qwen3_5VisionConfig",
                                      "visual", _QWEN_PREFIXES),
    "Qwen3_5MoeVisionModel": PackedTower("qwen", "transformers.models.qwen3_5_moe.modeling_qwen3_5_moe",
                                         "Qwen3_5MoeVisionConfig", "visual", _QWEN_PREFIXES),
    "PixtralVisionModel": PackedTower("pixtral", "transformers.models.pixtral.modeling_pixtral", "PixtralVisionConfig",
                                      "vision_tower", _TOWER_PREFIXES),
    # MiniMax-M3-VL: MiniMaxM3SparseForConditionalGeneration keeps the tower under model.vision_tower; the original
    # checkpoint (and save_pretrained, which reverses transformers' conversion mapping) under
    # vision_tower.vision_model with the patch embedding named patch_embedding and the layers under encoder. Its
    # processor is Qwen2VLImageProcessor line for line (smart_resize, the patches (C, t, p, p) in merge blocks) with
    # other defaults (3136 to 451584 pixels).
    "MiniMaxM3VLVisionModel": PackedTower(
        "qwen", "transformers.models.minimax_m3_vl.modeling_minimax_m3_vl", "MiniMaxM3VLVisionConfig", "vision_tower",
        _TOWER_PREFIXES, renames=(
            (r"^vision_tower\.vision_model\.embeddings\.patch_embedding\.", "embeddings.proj."),
            (r"^vision_tower\.vision_model\.encoder\.layers\.", "layers."),
            (r"^vision_tower\.vision_model\.pre_layrnorm\.", "pre_layrnorm.")),
        patch="embeddings.patch_size", temporal="embeddings.temporal_patch_size",
        processors=("MiniMaxM3VLImageProcessor",)),
    # Cosmos3-Edge: Cosmos3EdgeModel keeps the tower under model.visual. transformers' conversion mapping of the
    # model renames the text layers' to_q / to_k / to_v and up_proj / down_proj anywhere in a key, so
    # save_pretrained writes the tower's q_proj ... as to_q ... too: both are read. Its processor cuts each patch
    # (p, p, C) with no temporal patch, in merge blocks; its smart_resize first scales an image with a side under
    # patch * merge up.
    "Cosmos3EdgeVisionModel": PackedTower(
        "qwen", "transformers.models.cosmos3_edge.modeling_cosmos3_edge", "Cosmos3EdgeVisionConfig", "visual",
        _QWEN_PREFIXES, renames=((r"\.self_attn\.to_q\.", ".self_attn.q_proj."),
                                 (r"\.self_attn\.to_k\.", ".self_attn.k_proj."),
                                 (r"\.self_attn\.to_v\.", ".self_attn.v_proj."),
                                 (r"\.mlp\.up_proj\.", ".mlp.fc1."), (r"\.mlp\.down_proj\.", ".mlp.fc2.")),
        patch="embeddings.patch_size", temporal=None,
        processors=("Cosmos3EdgeImageProcessor", "Cosmos3EdgeImageProcessorPil")),
    # LFM3-VL: Lfm3VlModel keeps the tower under model.vision_tower (the tower's own conversion mapping renames
    # patchifier, q_layernorm and k_layernorm); its processor is Qwen2VLImageProcessor (transformers' auto map).
    "Lfm3VlVisionModel": PackedTower(
        "qwen", "transformers.models.lfm3_vl.modeling_lfm3_vl", "Lfm3VlVisionConfig", "vision_tower", _TOWER_PREFIXES,
        patch="config.patch_size", temporal="config.temporal_patch_size",
        processors=("Qwen2VLImageProcessor", "Qwen2VLImageProcessorPil")),
    # PaddleOCR-VL: PaddleOCRVLForConditionalGeneration keeps the tower under model.visual (save_pretrained writes
    # visual.*, as the original checkpoint). Its processor resizes by its own smart_resize (sides multiples of
    # patch * merge_size, as Qwen2-VL's, but an image with a side under that factor first scaled up to it) and cuts
    # the patches row-major, each (C, p, p) with no temporal patch (merge_size only rounds the resize: the
    # projector merges after the encoder, by the vision config's spatial_merge_size). Its model passes the
    # processor's [N, C, p, p] as [1, N, C, p, p].
    "PaddleOCRVisionModel": PackedTower(
        "qwen", "transformers.models.paddleocr_vl.modeling_paddleocr_vl", "PaddleOCRVisionConfig", "visual",
        _QWEN_PREFIXES, patch="config.patch_size", temporal=None, merge="config.spatial_merge_size",
        layout="patches", processors=("PaddleOCRVLImageProcessor", "PaddleOCRVLImageProcessorPil")),
    # Ovis2.5: Ovis2_5ForConditionalGeneration keeps the tower under model.vision_tower; the original checkpoint (and
    # save_pretrained, which reverses transformers' conversion mapping) under visual_tokenizer.vit.vision_model with
    # the layers under encoder. Its processor resizes by its own smart_resize (Qwen2-VL's rounding to patch *
    # merge_size within size's shortest_edge / longest_edge pixels, a side under that factor first scaled up, ratios
    # clamped at 200) and patchifies as Qwen2VLImageProcessor does: merge blocks, each patch (C, t, p, p), t 1 by
    # default. Its windows (layer_types) are the recorder's: they follow from grid_thw.
    "Ovis2_5VisionModel": PackedTower(
        "qwen", "transformers.models.ovis2_5.modeling_ovis2_5", "Ovis2_5VisionConfig", "vision_tower",
        _TOWER_PREFIXES, renames=(
            (r"^visual_tokenizer\.vit\.vision_model\.embeddings\.", "embeddings."),
            (r"^visual_tokenizer\.vit\.vision_model\.encoder\.layers\.", "layers."),
            (r"^visual_tokenizer\.vit\.vision_model\.post_layernorm\.", "post_layernorm.")),
        patch="patch_size", temporal="config.temporal_patch_size",
        processors=("Ovis2_5ImageProcessor", "Ovis2_5ImageProcessorPil")),
    # Muse Glimmer and Muse Spark: their models keep the tower under model.vision_tower (no conversion mapping). The
    # tower runs unmerged (spatial_merge_size 1: windows of pos_emb_height patches, positions per patch; its
    # pixel_shuffle merges merge_size blocks at the end), so the processor (MuseGlimmerImageProcessor for both,
    # transformers' auto map) cuts the patches row-major, each (t, C, p, p); its smart_resize picks the grid of
    # patch * merge_size blocks closest to the image's ratio within max_image_tokens merged tokens.
    **{f"{prefix}VisionModel": PackedTower(
        "qwen", f"transformers.models.{module}.modeling_{module}", f"{prefix}VisionConfig", "vision_tower",
        _TOWER_PREFIXES, patch="patch_size", temporal="config.patch_temporal", merge="merge_size",
        processors=("MuseGlimmerImageProcessor",))
       for module, prefix in (("muse_glimmer", "MuseGlimmer"), ("muse_spark", "MuseSpark"))},
    # VideoLLaMA3: VideoLlama3Model keeps the tower under model.vision_model (no conversion mapping). The tower takes
    # a merge size per grid_thw row (merge_sizes), its patches in merge blocks of that size; its image processor's
    # default merge_size is 1 (row-major patches, (C, t, p, p), t 1; its video processor's is 2), and it says so in
    # image_merge_sizes. Its images are fed here with merge_size 1 only (merge_sizes all 1): an image processor saved
    # with another is refused, never fed other blocks than the tower is told. Its clips are fed with their video
    # processor's merge_size, told to the tower as merge_sizes (packed_videos.py, call_packed).
    "VideoLlama3VisionModel": PackedTower(
        "qwen", "transformers.models.video_llama_3.modeling_video_llama_3", "VideoLlama3VisionConfig",
        "vision_model", ("model.vision_model.", "vision_model."), patch="embeddings.patch_size", temporal=None,
        merge=None, merge_argument="merge_sizes",
        processors=("VideoLlama3ImageProcessor", "VideoLlama3ImageProcessorPil")),
    # HunYuanVL: HunYuanVLForConditionalGeneration keeps the tower under model.vision_tower; the original checkpoint
    # (and save_pretrained, which reverses transformers' conversion mapping) under vit, with Megatron's MLP and norm
    # names and the patch merger as perceive. Its processor cuts the patches row-major ("in comparison to Qwen"),
    # each (C, t, p, p), t 1; merge_size only rounds the resize (the patch merger merges after the last layer).
    "HunYuanVLVisionTransformer": PackedTower(
        "qwen", "transformers.models.hunyuan_vl.modeling_hunyuan_vl", "HunYuanVLVisionConfig", "vision_tower",
        (*_TOWER_PREFIXES, "vit."), renames=_HUNYUAN_RENAMES, patch="embeddings.patch_size",
        temporal="config.temporal_patch_size", merge="config.spatial_merge_size",
        processors=("HunYuanVLImageProcessor", "HunYuanVLImageProcessorPil")),
    # HY-V4-VL: HunYuanVL's tower and layout (its patch merger's norm renamed too), its processor HunYuanVL's line
    # for line (row-major, t 1; its tower has no temporal patch).
    "HYV4VLVisionModel": PackedTower(
        "qwen", "transformers.models.hy_v4_vl.modeling_hy_v4_vl", "HYV4VLVisionConfig", "vision_tower",
        (*_TOWER_PREFIXES, "vit."), renames=_HY_V4_RENAMES, patch="embeddings.patch_size", temporal=None,
        merge="config.spatial_merge_size", processors=("HYV4VLImageProcessor", "HYV4VLImageProcessorPil")),
}
_BY_CONFIG = {spec.config: tower for tower, spec in PACKED_TOWERS.items()}
# Packed towers vitmad.record records that vitmad profile does not load, by their config class: why, said before any
# weight is read (else the whole model, language model included, would be loaded only to be refused).
_NOT_LOADED = {
    "Kimi_K25VisionConfig": (
        "Kimi-K2.5's vision tower (Kimi_K25VisionModel) is recorded by vitmad.record but not loaded by vitmad profile: "
        "its checkpoint keeps each layer's q, k and v fused as wqkv, permuted for its rotary embedding, which "
        "transformers unfuses on loading the whole model, and its image processor pads each image to whole merge "
        "blocks, which vitmad has not checked; record the tower in Python (vitmad.record(model.model.vision_tower) "
        "around the model's forward)"),
}
# Image processors whose patch vectors are (p, p, C, t) (channels last), not Qwen2-VL's (C, t, p, p).
_CHANNELS_LAST = ("Cosmos3EdgeImageProcessor", "Cosmos3EdgeImageProcessorPil")
# Image processors that cut each image's patches row-major, not in Qwen2-VL's merge blocks.
_ROW_MAJOR = ("PaddleOCRVLImageProcessor", "PaddleOCRVLImageProcessorPil", "MuseGlimmerImageProcessor",
              "HunYuanVLImageProcessor", "HunYuanVLImageProcessorPil", "HYV4VLImageProcessor",
              "HYV4VLImageProcessorPil")
# Image processors whose patch vectors are (t, C, p, p), not Qwen2-VL's (C, t, p, p).
_TEMPORAL_FIRST = ("MuseGlimmerImageProcessor",)
# The processor classes of the Qwen and Pixtral towers (transformers' auto map of their models), the default
# (torchvision backend) first. The ...Pil twin resizes through PIL: the same grid, pixels that round otherwise (up
# to one level in 255). transformers 5 saves either as the base name, so a file naming the twin asks for it, and
# it feeds the tower, as it does Cosmos3-Edge's and LFM3-VL's.
_KIND_PROCESSORS = {"qwen": ("Qwen2VLImageProcessor", "Qwen2VLImageProcessorPil"),
                    "pixtral": ("PixtralImageProcessor", "PixtralImageProcessorPil")}


def tower_kind(module: nn.Module) -> str | None:
    """``"qwen"`` or ``"pixtral"`` for a packed tower of transformers, else None."""
    found = PACKED_TOWERS.get(type(module).__name__)
    return found.kind if found and type(module).__module__ == found.module else None


def find_packed_tower(module: nn.Module) -> tuple[str, nn.Module] | None:
    """``(qualified name, tower)`` of the packed tower ``module`` is or holds (the shallowest), or None."""
    for name, found in module.named_modules():
        if tower_kind(found) is not None:
            return name, found
    return None


def _tower_class(name: str) -> type:
    return getattr(importlib.import_module(PACKED_TOWERS[name].module), name)


def _attribute(tower: nn.Module, path: str | None) -> int:
    return 1 if path is None else int(functools.reduce(getattr, path.split("."), tower))


def tower_sizes(tower: nn.Module) -> tuple[int, int, int]:
    """``(patch, spatial merge, temporal patch)`` of a packed tower (Pixtral: merge and temporal patch 1)."""
    spec = PACKED_TOWERS[type(tower).__name__]
    if spec.kind == "pixtral":
        return int(tower.patch_size), 1, 1
    return _attribute(tower, spec.patch), _attribute(tower, spec.merge), _attribute(tower, spec.temporal)


def load_packed_tower(spec: str, name: str, config, options: dict) -> tuple[nn.Module, str] | None:
    """``(tower, description)`` when the checkpoint ``name`` is a packed tower or a vision-language model holding
    one (its vision tower alone is loaded), else None.

    Raises:
        OptionError: (``model``) the checkpoint lacks some of the tower's weights, or its tower is one vitmad profile
            does not load (Kimi-K2.5's).
    """
    for found in (config, getattr(config, "vision_config", None)):
        reason = _NOT_LOADED.get(type(found).__name__)
        if reason is not None:
            raise OptionError("model", f"{spec}: {reason}")
    tower_name = _BY_CONFIG.get(type(config).__name__)
    if tower_name is not None:
        tower, info = _tower_class(tower_name).from_pretrained(name, output_loading_info=True, **options)
        # A weight the file lacks would be drawn at random, a MAD of random weights (it ran without a word: QA
        # helper-140).
        missing = sorted(info.get("missing_keys", ()))
        if missing:
            raise OptionError("model", f"{spec}: the saved vision tower {tower_name} has no weights for "
                                       f"{len(missing)} of its parameters (e.g. {missing[0]})")
        return tower.eval(), f"{tower_name} (a vision tower saved alone)"
    vision = getattr(config, "vision_config", None)
    tower_name = _BY_CONFIG.get(type(vision).__name__)
    if tower_name is None:
        return None
    packed = PACKED_TOWERS[tower_name]
    # The original layout's renames first: once renamed, a key no longer starts with a prefix.
    mapping = dict(packed.renames) | {"^" + re.escape(prefix): "" for prefix in packed.prefixes}
    tower, info = _tower_class(tower_name).from_pretrained(name, config=vision, key_mapping=mapping,
                                                           output_loading_info=True, **options)
    missing = sorted(info.get("missing_keys", ()))
    if missing:
        raise OptionError(
            "model",
            f"{spec}: the checkpoint has no weights for {len(missing)} parameters of its vision tower {tower_name} "
            f"(e.g. {missing[0]}; looked for them under {' or '.join(packed.prefixes)}"
            f"{', their modules renamed as transformers renames them' if packed.renames else ''})",
        )
    architecture = (getattr(config, "architectures", None) or [type(config).__name__])[0]
    return tower.eval(), (f"{packed.where} ({tower_name}) of {architecture}, its vision tower alone (the language "
                          "model is not loaded)")


def _sizes(kind: str, tower: nn.Module) -> tuple[int, int]:
    """``(patch, factor)``: pixels per patch, and the multiple every side must be (Qwen: patch * merge)."""
    patch, merge, _ = tower_sizes(tower)
    return patch, patch * merge


def check_packed_size(kind: str, tower: nn.Module, height: int, width: int, parameter: str) -> None:
    """Refuse an input size the tower cannot take as one grid of whole patches.

    Raises:
        OptionError: (``parameter``) a side is not a multiple of the patch (Qwen: patch * merge) or, for Pixtral,
            longer than the tower's ``image_size``.
    """
    patch, factor = _sizes(kind, tower)
    what = (f"multiples of {factor} px (patch {patch} x spatial merge {factor // patch})" if kind == "qwen"
            else f"multiples of the {factor} px patch")
    if height % factor or width % factor:
        raise OptionError(parameter, f"{type(tower).__name__} takes whole patches: height and width must be {what}, "
                                     f"got {height}x{width}")
    if kind == "pixtral" and max(height, width) > int(tower.config.image_size):
        raise OptionError(parameter, f"{type(tower).__name__} takes sides of at most {int(tower.config.image_size)} px "
                                     f"(its config's image_size), got {height}x{width}")


def packed_forward(kind: str, tower: nn.Module, settings: dict | None = None):
    """Calls ``tower`` on ``[B, 3, H, W]`` normalised pixels of one size: Qwen's patches and ``grid_thw`` (the
    image repeated over the temporal patch, as its processor does for an image; each patch laid out as the
    processor of ``settings`` lays it out), Pixtral's ``image_sizes``."""
    last, merge_order, first = channels_last(settings), not row_major(settings), temporal_first(settings)

    def forward(pixels: torch.Tensor):
        if pixels.dim() != 4:
            raise OptionError("images", f"{type(tower).__name__} takes images [B, 3, H, W], got shape "
                                        f"{list(pixels.shape)}")
        batch, _, height, width = pixels.shape
        check_packed_size(kind, tower, height, width, "images")
        if kind == "pixtral":
            return tower(pixels, image_sizes=torch.tensor([[height, width]] * batch, device=pixels.device))
        patch, merge, temporal = tower_sizes(tower)
        patches, grid = qwen_patches(pixels, patch, merge if merge_order else 1, temporal, channels_last=last,
                                     temporal_first=first)
        grid_thw = torch.tensor([[1, *grid]] * batch, device=pixels.device)
        return call_packed(tower, patches.reshape(-1, patches.shape[-1]), grid_thw)

    return forward


def channels_last(settings: dict | None) -> bool:
    """Whether the image processor of ``settings`` lays each patch out ``(p, p, C, t)`` (Cosmos3-Edge's), not
    Qwen2-VL's ``(C, t, p, p)``."""
    return (settings or {}).get("image_processor_type") in _CHANNELS_LAST


def row_major(settings: dict | None) -> bool:
    """Whether the image processor of ``settings`` cuts the patches row-major (PaddleOCR-VL's), not in Qwen2-VL's
    merge blocks."""
    return (settings or {}).get("image_processor_type") in _ROW_MAJOR


def temporal_first(settings: dict | None) -> bool:
    """Whether the image processor of ``settings`` lays each patch out ``(t, C, p, p)`` (Muse Glimmer's)."""
    return (settings or {}).get("image_processor_type") in _TEMPORAL_FIRST


def call_packed(tower: nn.Module, patches: torch.Tensor, grid_thw: torch.Tensor, merge_size: int = 1):
    """Calls a Qwen-kind ``tower`` on the packed patches of its images (``[N, ...]``, one row per patch, as the
    processor gives them) in the layout the tower takes (:attr:`PackedTower.layout`); a tower that takes a merge
    size per row (:attr:`PackedTower.merge_argument`) is told ``merge_size`` for each: the processor's, 1 for
    images (:func:`processor_settings`), its video processor's for clips."""
    spec = PACKED_TOWERS[type(tower).__name__]
    extra = {}
    if spec.merge_argument is not None:  # VideoLLaMA3: its processor's image_merge_sizes / video_merge_sizes
        extra[spec.merge_argument] = torch.full((len(grid_thw),), merge_size, dtype=torch.long,
                                                device=grid_thw.device)
    if spec.layout == "patches":
        patch = tower_sizes(tower)[0]
        return tower(patches.reshape(1, patches.shape[0], -1, patch, patch), grid_thw=grid_thw, **extra)
    return tower(patches.reshape(patches.shape[0], -1), grid_thw=grid_thw, **extra)


def qwen_patches(pixels: torch.Tensor, patch: int, merge: int, temporal: int, channels_last: bool = False,
                 temporal_first: bool = False) -> tuple[torch.Tensor, tuple]:
    """``([B, h * w, C * temporal * patch * patch], (h, w))``: Qwen2VLImageProcessor's ``patchify`` of images
    ``[B, C, H, W]`` (tokens in merge-block order, each image repeated over the temporal patch); with
    ``channels_last``, Cosmos3EdgeImageProcessor's (each patch ``(p, p, C, t)``); with ``temporal_first``, each
    patch ``(t, C, p, p)`` (MuseGlimmerImageProcessor's, with ``merge`` 1: row-major)."""
    batch, channels, height, width = pixels.shape
    grid_h, grid_w = height // patch, width // patch
    blocks = pixels.reshape(batch, channels, grid_h // merge, merge, patch, grid_w // merge, merge, patch)
    if channels_last:
        blocks = blocks.permute(0, 2, 5, 3, 6, 4, 7, 1)  # [B, h/m, w/m, m, m, p, p, C]
        flat = blocks.unsqueeze(-1).expand(*blocks.shape, temporal)
    else:
        blocks = blocks.permute(0, 2, 5, 3, 6, 1, 4, 7)  # [B, h/m, w/m, m, m, C, p, p]
        at = 5 if temporal_first else 6
        flat = blocks.unsqueeze(at).expand(*blocks.shape[:at], temporal, *blocks.shape[at:])
    return flat.reshape(batch, grid_h * grid_w, channels * temporal * patch * patch), (grid_h, grid_w)


def qwen_unpatch(patches: torch.Tensor, grid: tuple[int, int], patch: int, merge: int, temporal: int,
                 channels_last: bool = False, temporal_first: bool = False) -> torch.Tensor:
    """``[C, H, W]``: the image behind one image's Qwen patches (the inverse of :func:`qwen_patches`)."""
    grid_h, grid_w = grid
    if channels_last:
        blocks = patches.reshape(grid_h // merge, grid_w // merge, merge, merge, patch, patch, -1, temporal)[..., 0]
        return blocks.permute(6, 0, 2, 4, 1, 3, 5).reshape(-1, grid_h * patch, grid_w * patch)
    if temporal_first:
        blocks = patches.reshape(grid_h // merge, grid_w // merge, merge, merge, temporal, -1, patch, patch)[:, :, :, :,
                                                                                                            0]
        return blocks.permute(4, 0, 2, 5, 1, 3, 6).reshape(-1, grid_h * patch, grid_w * patch)
    blocks = patches.reshape(grid_h // merge, grid_w // merge, merge, merge, -1, temporal, patch, patch)[:, :, :, :,
                                                                                                        :, 0]
    return blocks.permute(4, 0, 2, 5, 1, 3, 6).reshape(-1, grid_h * patch, grid_w * patch)


_DROPPED = ("image_processor_type", "processor_class", "auto_map", "_processor_class")


def processor_settings(kind: str, tower: nn.Module, saved: dict | None) -> dict:
    """The image processor's settings: the checkpoint's (``saved``), else transformers' defaults with the tower's
    sizes; checked against the tower. ``image_processor_type`` names the class that feeds it, where the tower has
    processor classes of its own (``PackedTower.processors``) or the checkpoint names the ``...Pil`` twin of the
    Qwen or Pixtral default.

    Raises:
        OptionError: (``model``) the checkpoint's processor is of a class the tower is not fed by, cuts patches of
            another size than the tower's (or of another spatial merge or temporal patch: tokens would lie
            elsewhere than the tower places them), or (Pixtral) resizes beyond the tower's largest image.
    """
    settings = {k: v for k, v in (saved or {}).items() if k not in _DROPPED}
    patch, factor = _sizes(kind, tower)
    name = type(tower).__name__
    spec = PACKED_TOWERS[name]
    own = spec.processors or _KIND_PROCESSORS[kind]
    given = (saved or {}).get("image_processor_type") or own[0]
    # transformers 4 saved its torchvision processors as ...Fast; transformers 5 loads them as the base class.
    named = given.removesuffix("Fast")
    if named not in own:
        raise OptionError("model", f"the checkpoint's image processor is {given}, but the vision tower {name} is "
                                   f"fed by {' or '.join(own)} (its model's processor in transformers), whose "
                                   f"resizing and patch order vitmad checked; {given}'s it did not")
    # Until the class was read, the Qwen and Pixtral towers were fed by the default whatever the checkpoint named:
    # their settings (mad.json, the run's fingerprint) leave the default out, so a run fed as before keeps its
    # fingerprint and resumes its checkpoints, and one now fed by the ...Pil twin gets another and resumes none
    # written while it was fed by the default.
    if spec.processors or named != own[0]:
        settings["image_processor_type"] = named
    if kind == "qwen":
        expected = {"patch_size": patch, "merge_size": factor // patch, "temporal_patch_size": tower_sizes(tower)[2]}
        for key, value in expected.items():
            settings.setdefault(key, value)
            if key == "merge_size" and spec.merge is None and int(settings[key]) != value:
                raise OptionError("model", f"the image processor has merge_size={settings[key]}, but the vision "
                                           f"tower {name} is fed here with merge_size 1 only (its image processor's "
                                           f"default: row-major patches, {spec.merge_argument} 1)")
            if int(settings[key]) != value:
                raise OptionError("model", f"the image processor has {key}={settings[key]}, but the vision tower "
                                           f"{name} takes {value}")
        return settings
    settings.setdefault("patch_size", {"height": patch, "width": patch})
    settings.setdefault("size", {"longest_edge": int(tower.config.image_size)})
    given = settings["patch_size"]
    given = (int(given["height"]), int(given["width"])) if isinstance(given, dict) else (int(given),) * 2
    if given != (patch, patch):
        raise OptionError("model", f"the image processor has patch_size {list(given)}, but the vision tower {name} "
                                   f"takes {patch}")
    longest = (settings["size"] or {}).get("longest_edge")
    if longest is None or int(longest) > int(tower.config.image_size):
        raise OptionError("model", f"the image processor resizes to size {settings['size']}, but the vision tower "
                                   f"{name} takes sides of at most {int(tower.config.image_size)} px (its "
                                   "config's image_size)")
    return settings


@functools.lru_cache(maxsize=8)
def _processor(kind: str, settings_json: str):
    import transformers

    settings = json.loads(settings_json)
    name = settings.pop("image_processor_type", None) or _KIND_PROCESSORS[kind][0]
    return getattr(transformers, name)(**settings)


def packed_processor(kind: str, settings: dict):
    """The transformers image processor of ``settings`` (one per settings: they are shared, read-only)."""
    return _processor(kind, json.dumps(settings, sort_keys=True, default=_plain))


def _plain(value):
    """JSON of the odd values in processor settings (PIL resampling enums)."""
    return int(value) if isinstance(value, int) or hasattr(value, "__index__") else str(value)


def nominal_size(kind: str, settings: dict, factor: int) -> tuple[int, int]:
    """A square of whole patches within the processor's budget: the ``size`` of :class:`~.images.Preprocessing`
    for towers that take no input size of their own (never used to resize: ``image_size`` is required)."""
    processor = packed_processor(kind, settings)
    if kind == "qwen" and getattr(processor, "max_image_tokens", None) is not None:  # Muse: merged tokens
        side = max(1, math.isqrt(int(processor.max_image_tokens))) * factor
    elif kind == "qwen":
        side = max(factor, math.isqrt(int(processor.size["longest_edge"])) // factor * factor)
    else:
        side = int(processor.size["longest_edge"]) // factor * factor
    return side, side
