"""vitmad profile on packed native-resolution vision towers: Qwen2-VL (a whole vision-language checkpoint), Qwen2.5-VL
(windows) and Qwen3-VL (towers saved alone), Qwen3-VL's tower inside whole Qwen3-VL-MoE, Qwen3.5 and Qwen3.5-MoE
checkpoints, Pixtral (inside a LLaVA checkpoint, and saved alone without an image processor), and the MiniMax-M3-VL,
Cosmos3-Edge, LFM3-VL, PaddleOCR-VL, Ovis2.5, Muse Glimmer, Muse Spark, VideoLLaMA3, HunYuanVL and HY-V4-VL towers, in
whole checkpoints (MiniMax-M3-VL's, Ovis2.5's, HunYuanVL's and HY-V4-VL's in their original layouts) and saved alone,
each fed by its own image processor (Cosmos3-Edge's lays each patch out channels last, without a temporal patch;
PaddleOCR-VL's, Muse Glimmer's, VideoLLaMA3's (merge_size 1), HunYuanVL's and HY-V4-VL's cut the patches row-major, Muse
Glimmer's each (t, C, p, p); Ovis2.5 and the Muse towers attend in windows as layer_types says), of the class its
checkpoint names (a ``...Pil`` twin followed, another class refused).

Tiny random-weight towers, their weights scaled so that attention is far from uniform, are saved to folders with
their image processors. The reference is written here, independently of vitmad: each image through the model's
own processor, then alone through the tower loaded by transformers with eager attention, its softmax
probabilities captured from the modeling file's ``eager_attention_forward``; tokens placed by geometry written
here with explicit loops (Qwen and the towers packed like it: spatial-merge blocks row-major, the patches of a
block row-major, one call per image and attention layer; Qwen2.5-VL: the same blocks reordered by windows, each
window's blocks row-major, one call per window in window blocks and one per image in its full-attention blocks;
Ovis2.5 and the Muse towers: the same windows, chosen per layer by layer_types, the Muse towers' over single patches
(windows of pos_emb_height patches); PaddleOCR-VL: row-major, one call per image; Pixtral: row-major), each patch
at ``(row + 0.5, col + 0.5) * patch`` pixels; a query's MAD over the keys of its call, the image's MAD the mean over
its tokens, in float64.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import vitmad
from conftest import (
    eager_attention_calls,
    profile_one_process_and_two_ranks,
    qwen_token_chunks,
    self_similar_attention,
    subprocess_env,
    write_images,
)
from vitmad.cli import main
from vitmad.profiling.images import find_images, load_image
from vitmad.profiling.maps import mad_maps
from vitmad.profiling.models import load_model
from vitmad.profiling.options import OptionError

transformers = pytest.importorskip("transformers")
pytest.importorskip("torchvision")  # transformers' Qwen2-VL and Pixtral image processors
from transformers.models.cosmos3_edge import modeling_cosmos3_edge  # noqa: E402
from transformers.models.hunyuan_vl import modeling_hunyuan_vl  # noqa: E402
from transformers.models.hy_v4_vl import modeling_hy_v4_vl  # noqa: E402
from transformers.models.lfm3_vl import modeling_lfm3_vl  # noqa: E402
from transformers.models.minimax_m3_vl import modeling_minimax_m3_vl  # noqa: E402
from transformers.models.muse_glimmer import modeling_muse_glimmer  # noqa: E402
from transformers.models.muse_spark import modeling_muse_spark  # noqa: E402
from transformers.models.ovis2_5 import modeling_ovis2_5  # noqa: E402
from transformers.models.paddleocr_vl import modeling_paddleocr_vl  # noqa: E402
from transformers.models.pixtral import modeling_pixtral  # noqa: E402
from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl  # noqa: E402
from transformers.models.qwen2_vl import modeling_qwen2_vl  # noqa: E402
from transformers.models.qwen3_5 import modeling_qwen3_5  # noqa: E402
from transformers.models.qwen3_5_moe import modeling_qwen3_5_moe  # noqa: E402
from transformers.models.qwen3_vl import modeling_qwen3_vl  # noqa: E402
from transformers.models.qwen3_vl_moe import modeling_qwen3_vl_moe  # noqa: E402
from transformers.models.video_llama_3 import modeling_video_llama_3  # noqa: E402

PATCH, MERGE, WINDOW_PX = 4, 2, 16  # Qwen: 4 px patches, 2 x 2 merge blocks, windows of 2 x 2 merge blocks
PIXTRAL_PATCH = 8
# Qwen: at most 24 x 24 px per image (36 patches), at least 8 x 8; Pixtral: the longest edge at most 48 px.
QWEN_PROCESSOR = dict(patch_size=PATCH, merge_size=MERGE, temporal_patch_size=2, min_pixels=64, max_pixels=576)
PIXTRAL_PROCESSOR = dict(patch_size={"height": PIXTRAL_PATCH, "width": PIXTRAL_PATCH}, size={"longest_edge": 48})
TOL = {"rtol": 1e-5, "atol": 1e-4}
_MODELING = {"qwen2_vl": modeling_qwen2_vl, "qwen2_5_vl": modeling_qwen2_5_vl, "qwen3_vl": modeling_qwen3_vl,
             "pixtral": modeling_pixtral, "qwen3_vl_moe": modeling_qwen3_vl_moe, "qwen3_5": modeling_qwen3_5,
             "qwen3_5_moe": modeling_qwen3_5_moe, "minimax_m3_vl": modeling_minimax_m3_vl,
             "cosmos3_edge": modeling_cosmos3_edge, "lfm3_vl": modeling_lfm3_vl,
             "paddleocr_vl": modeling_paddleocr_vl, "ovis2_5": modeling_ovis2_5,
             "muse_glimmer": modeling_muse_glimmer, "muse_spark": modeling_muse_spark,
             "video_llama_3": modeling_video_llama_3, "hunyuan_vl": modeling_hunyuan_vl,
             "hy_v4_vl": modeling_hy_v4_vl}
# Qwen3-VL's tower under other names, in whole checkpoints (under model.visual, fed by Qwen2VLImageProcessor):
# name -> (config class, model class, tower class, extra text settings)
QWEN3_KIN = {
    "qwen3_vl_moe": ("Qwen3VLMoeConfig", "Qwen3VLMoeForConditionalGeneration", "Qwen3VLMoeVisionModel",
                     dict(moe_intermediate_size=32, num_experts=2, num_experts_per_tok=1)),
    "qwen3_5": ("Qwen3_5Config", "Qwen3_5ForConditionalGeneration", "Qwen3_5VisionModel",
                dict(layer_types=["full_attention"])),
    "qwen3_5_moe": ("Qwen3_5MoeConfig", "Qwen3_5MoeForConditionalGeneration", "Qwen3_5MoeVisionModel",
                    dict(layer_types=["full_attention"], moe_intermediate_size=32, shared_expert_intermediate_size=32,
                         num_experts=2, num_experts_per_tok=1)),
}


# Towers packed in Qwen2-VL's merge-block order (PaddleOCR-VL's row-major, ROW_MAJOR), one chunk per image, in whole
# checkpoints with their own image processors: name -> (model class, the tower in it, tower class, attention class,
# image processor class, temporal patch of the tower)
KIN = {
    "minimax_m3_vl": ("MiniMaxM3SparseForConditionalGeneration", "model.vision_tower", "MiniMaxM3VLVisionModel",
                      "MiniMaxM3VLVisionAttention", "MiniMaxM3VLImageProcessor", 2),
    "cosmos3_edge": ("Cosmos3EdgeForConditionalGeneration", "model.visual", "Cosmos3EdgeVisionModel",
                     "Cosmos3EdgeVisionAttention", "Cosmos3EdgeImageProcessor", 1),
    "lfm3_vl": ("Lfm3VlForConditionalGeneration", "model.vision_tower", "Lfm3VlVisionModel", "Lfm3VlVisionAttention",
                "Qwen2VLImageProcessor", 2),
    "paddleocr_vl": ("PaddleOCRVLForConditionalGeneration", "model.visual", "PaddleOCRVisionModel",
                     "PaddleOCRVisionAttention", "PaddleOCRVLImageProcessor", 1),
    "ovis2_5": ("Ovis2_5ForConditionalGeneration", "model.vision_tower", "Ovis2_5VisionModel",
                "Ovis2_5VisionAttention", "Ovis2_5ImageProcessor", 1),
    "muse_glimmer": ("MuseGlimmerForConditionalGeneration", "model.vision_tower", "MuseGlimmerVisionModel",
                     "MuseGlimmerVisionAttention", "MuseGlimmerImageProcessor", 2),
    "muse_spark": ("MuseSparkForConditionalGeneration", "model.vision_tower", "MuseSparkVisionModel",
                   "MuseSparkVisionAttention", "MuseGlimmerImageProcessor", 2),
    "video_llama_3": ("VideoLlama3ForConditionalGeneration", "model.vision_model", "VideoLlama3VisionModel",
                      "VideoLlama3VisionAttention", "VideoLlama3ImageProcessor", 1),
    "hunyuan_vl": ("HunYuanVLForConditionalGeneration", "model.vision_tower", "HunYuanVLVisionTransformer",
                   "HunYuanVLVisionAttention", "HunYuanVLImageProcessor", 1),
    "hy_v4_vl": ("HYV4VLForConditionalGeneration", "model.vision_tower", "HYV4VLVisionModel", "HYV4VLVisionAttention",
                 "HYV4VLImageProcessor", 1),
}
# PaddleOCR-VL's processor cuts each image's patches row-major (patchify: grid_h, grid_w, then the pixels of a
# patch), each patch (C, p, p); its model passes them to the tower as [1, N, C, p, p]. Muse Glimmer's cuts them
# row-major too, each (t, C, p, p).
ROW_MAJOR = ("paddleocr_vl", "muse_glimmer", "muse_spark", "video_llama_3", "hunyuan_vl", "hy_v4_vl")
PATCHES_5D = ("paddleocr_vl",)
# Towers that reorder the sequence by Qwen2.5-VL's windows before their first layer, each layer attending per window
# or per image as layer_types says (LAYER_TYPES: a window layer, then a full one): name -> (the blocks the windows
# are cut in, patches a side; blocks a window side). Ovis2.5: merge blocks, windows of WINDOW_PX; Muse Glimmer: single
# patches (its tower's spatial_merge_size is 1), windows of pos_emb_height (4) patches.
LAYER_TYPES = ("window_attention", "full_attention")
MUSE_POSITIONS = 4
WINDOWED = {"ovis2_5": (MERGE, WINDOW_PX // MERGE // PATCH), "muse_glimmer": (1, MUSE_POSITIONS),
            "muse_spark": (1, MUSE_POSITIONS)}
# VideoLLaMA3's tower takes a merge size per image (merge_sizes): its image processor's default 1, blocks of one
# patch, so its patches come row-major (ROW_MAJOR), each (C, t, p, p) flat.
MERGE_SIZES = {"video_llama_3": 1}
# The processor's budget: Qwen's 64 to 576 pixels; Muse Glimmer's at most 9 tokens of 2 x 2 patches (576 pixels).
BUDGET = {"muse_glimmer": {"max_image_tokens": 9}, "muse_spark": {"max_image_tokens": 9}}


def _sharpen(tower: torch.nn.Module, seed: int) -> None:
    """Large weights, and the query / key projections larger still: attention far from uniform, so that a token
    at a wrong position changes the MAD."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, module in tower.named_modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.normal_(std=0.25)
                if name.endswith(("attn.qkv", "q_proj", "k_proj")):
                    rows = module.weight.shape[0] * 2 // 3 if name.endswith("qkv") else module.weight.shape[0]
                    module.weight[:rows] *= 3.0


def _qwen_vision(name: str) -> dict:
    common = dict(depth=2, num_heads=2, patch_size=PATCH, spatial_merge_size=MERGE, temporal_patch_size=2)
    if name == "qwen2_vl":
        return dict(embed_dim=32, hidden_size=32, mlp_ratio=2, **common)
    if name == "qwen2_5_vl":
        return dict(hidden_size=32, out_hidden_size=32, intermediate_size=64, window_size=WINDOW_PX,
                    fullatt_block_indexes=[1], **common)
    return dict(hidden_size=32, intermediate_size=64, out_hidden_size=32, num_position_embeddings=16,
                deepstack_visual_indexes=[], **common)


def _save_qwen2_vl_checkpoint(folder):
    """A whole Qwen2VLForConditionalGeneration: a one-layer language model beside the tower."""
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1, vocab_size=100, bos_token_id=0, eos_token_id=1,
                rope_parameters={"rope_type": "default", "mrope_section": [2, 2, 4], "rope_theta": 1e4})
    config = transformers.Qwen2VLConfig(text_config=text, vision_config=_qwen_vision("qwen2_vl"))
    torch.manual_seed(0)
    model = transformers.Qwen2VLForConditionalGeneration(config)
    _sharpen(model.model.visual, 1)
    model.save_pretrained(folder)
    transformers.Qwen2VLImageProcessor(**QWEN_PROCESSOR).save_pretrained(folder)


def _save_qwen_tower(folder, name: str):
    configs = {"qwen2_5_vl": transformers.Qwen2_5_VLConfig, "qwen3_vl": transformers.Qwen3VLConfig}
    classes = {"qwen2_5_vl": modeling_qwen2_5_vl.Qwen2_5_VisionTransformerPretrainedModel,
               "qwen3_vl": modeling_qwen3_vl.Qwen3VLVisionModel}
    config = configs[name](vision_config=_qwen_vision(name)).vision_config
    torch.manual_seed(0)
    tower = classes[name](config)
    _sharpen(tower, 2)
    tower.save_pretrained(folder)
    transformers.Qwen2VLImageProcessor(**QWEN_PROCESSOR).save_pretrained(folder)


def _save_qwen3_kin_checkpoint(folder, name: str):
    """A whole vision-language checkpoint of ``QWEN3_KIN``: a one-layer language model beside the tower."""
    config_name, model_name, _, text = QWEN3_KIN[name]
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1, vocab_size=100, head_dim=16,
                rope_parameters={"rope_type": "default", "mrope_section": [2, 2, 4], "rope_theta": 1e4}, **text)
    vision = _qwen_vision("qwen3_vl")
    if name != "qwen3_vl_moe":  # Qwen3.5's towers have no deepstack mergers
        del vision["deepstack_visual_indexes"]
    config = getattr(transformers, config_name)(text_config=text, vision_config=vision)
    torch.manual_seed(0)
    model = getattr(transformers, model_name)(config)
    _sharpen(model.model.visual, 1)
    model.save_pretrained(folder)
    transformers.Qwen2VLImageProcessor(**QWEN_PROCESSOR).save_pretrained(folder)


def _kin_config(name: str):
    """A whole model of ``KIN`` with a one-layer language model beside its two-attention-layer tower."""
    vision = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, patch_size=PATCH,
                  spatial_merge_size=MERGE)
    if name == "minimax_m3_vl":  # head_dim 24: its 3D rotary embedding rotates 8 dims per axis
        text = dict(hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                    num_key_value_heads=1, head_dim=16, vocab_size=100, dense_intermediate_size=64,
                    shared_intermediate_size=32, num_local_experts=2, num_experts_per_tok=1, rotary_dim=8,
                    index_head_dim=16, index_n_heads=1, bos_token_id=0, eos_token_id=1)
        return transformers.MiniMaxM3VLConfig(vision_config=dict(vision, hidden_size=48, num_hidden_layers=2,
                                                                 temporal_patch_size=2),
                                              text_config=text, projector_hidden_size=32)
    if name == "ovis2_5":  # a learned 4 x 4 position grid, interpolated to each image's grid in merge-block order
        text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                    num_key_value_heads=1, head_dim=16, vocab_size=100)
        return transformers.Ovis2_5Config(
            vision_config=dict(vision, num_hidden_layers=2, image_size=16, window_size=WINDOW_PX,
                               layer_types=list(LAYER_TYPES), vocab_size=64, num_visual_indicator_tokens=4),
            text_config=text)
    if name in ("muse_glimmer", "muse_spark"):  # a learned 4 x 4 position grid; the tower merges nothing (its
        # pixel_shuffle does). Muse Spark: a mixture-of-experts language model and an audio tower beside it.
        text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                    num_key_value_heads=1, head_dim=16, vocab_size=100, bos_token_id=0, eos_token_id=1)
        vision = {k: v for k, v in vision.items() if k != "spatial_merge_size"}
        vision = dict(vision, num_hidden_layers=2, pos_emb_height=MUSE_POSITIONS, pos_emb_width=MUSE_POSITIONS,
                      max_position_embeddings=MUSE_POSITIONS ** 2, merge_size=MERGE, patch_temporal=2,
                      layer_types=list(LAYER_TYPES))
        if name == "muse_glimmer":
            return transformers.MuseGlimmerConfig(vision_config=vision, text_config=text)
        return transformers.MuseSparkConfig(
            vision_config=vision, text_config=dict(text, moe_intermediate_size=32, num_local_experts=2,
                                                   num_experts_per_tok=1, moe_hidden_size=32),
            audio_config=dict(out_hidden_size=32, num_hidden_layers=1, patch_sizes=[2], hidden_sizes=[16],
                              depths=[1]))
    if name == "hunyuan_vl":  # a learned 4 x 4 position grid (max_image_size 16 px), no rotary positions
        text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                    num_key_value_heads=1, vocab_size=100, head_dim=16, eod_token_id=3, sep_token_id=4)
        return transformers.HunYuanVLConfig(
            vision_config=dict(vision, num_hidden_layers=2, num_key_value_heads=2, out_hidden_size=32,
                               text_hidden_size=32, max_image_size=16, min_image_size=8),
            text_config=text, image_token_id=10, im_start_id=11, im_end_id=12, im_newline_id=13)
    if name == "hy_v4_vl":  # HunYuanVL's tower; a one-layer mixture-of-experts language model with mHC
        text = dict(hidden_size=32, intermediate_size=64, moe_intermediate_size=32, num_hidden_layers=1,
                    num_attention_heads=2, num_key_value_heads=1, head_dim=16, vocab_size=100, pad_token_id=0,
                    bos_token_id=1, eos_token_id=2, n_routed_experts=2, n_shared_experts=1, num_experts_per_tok=1,
                    q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=16,
                    index_topk=4, index_head_dim=8, index_n_heads=1,
                    rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 1, 1]})
        return transformers.HYV4VLConfig(
            vision_config=dict(vision, num_hidden_layers=2, num_key_value_heads=2, out_hidden_size=32,
                               max_image_size=16),
            text_config=text, image_token_id=10, video_token_id=11)
    if name == "video_llama_3":  # rotary positions only; a Qwen2 language model
        text = dict(model_type="qwen2", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                    num_attention_heads=2, num_key_value_heads=1, vocab_size=100)
        vision = {k: v for k, v in vision.items() if k != "spatial_merge_size"}
        return transformers.VideoLlama3Config(vision_config=dict(vision, num_hidden_layers=2), text_config=text)
    if name == "paddleocr_vl":  # a learned 4 x 4 position grid, interpolated to each image's grid
        text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                    num_key_value_heads=1, head_dim=16, vocab_size=100)
        return transformers.PaddleOCRVLConfig(vision_config=dict(vision, num_hidden_layers=2, image_size=16),
                                              text_config=text)
    if name == "cosmos3_edge":
        text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                    num_key_value_heads=1, head_dim=16, vocab_size=100,
                    rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 3, 3]})
        return transformers.Cosmos3EdgeConfig(vision_config=dict(vision, num_hidden_layers=2, num_patches=16),
                                              text_config=text, projector_hidden_size=32)
    # An attention layer, a gated convolution layer, an attention layer; grouped-query attention.
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, vocab_size=100, layer_types=["conv", "full_attention"], pad_token_id=0,
                bos_token_id=1, eos_token_id=2)
    return transformers.Lfm3VlConfig(vision_config=dict(vision, num_hidden_layers=3, num_key_value_heads=1,
                                                        temporal_patch_size=2,
                                                        layer_types=["full_attention", "conv", "full_attention"]),
                                     text_config=text, projector_hidden_size=32)


def _kin_processor(name: str, **changes):
    """The model's own image processor with the tiny towers' sizes (Qwen's: 64 to 576 pixels an image; Cosmos3-Edge's
    and Ovis2.5's take them as size only: min_pixels and max_pixels are no settings of the first, and the second
    keeps them without resizing by them)."""
    settings = {**QWEN_PROCESSOR, "temporal_patch_size": KIN[name][5]}
    if name in ("cosmos3_edge", "ovis2_5"):
        settings["size"] = {"shortest_edge": settings.pop("min_pixels"), "longest_edge": settings.pop("max_pixels")}
    if name in BUDGET:
        del settings["min_pixels"], settings["max_pixels"]
        settings.update(BUDGET[name])
    if name in MERGE_SIZES:
        settings["merge_size"] = MERGE_SIZES[name]
    return getattr(transformers, KIN[name][4])(**{**settings, **changes})


def _sharpen_kin(tower: torch.nn.Module, seed: int) -> None:
    """:func:`_sharpen` for a tower of ``KIN``; PaddleOCR-VL's, HunYuanVL's and HY-V4-VL's attention given its key
    projection as query projection too (a token attends most to itself and tokens like it: PaddleOCR-VL's rotary
    embedding alone left attention within 1 px of uniform, and the other two have none)."""
    _sharpen(tower, seed)
    self_similar_attention(tower)
    with torch.no_grad():
        for module in tower.modules():
            if type(module).__name__ in ("PaddleOCRVisionAttention", "HunYuanVLVisionAttention",
                                         "HYV4VLVisionAttention"):
                module.q_proj.weight.copy_(module.k_proj.weight)
                module.q_proj.bias.copy_(module.k_proj.bias)


def _save_kin_checkpoint(folder, name: str):
    model_name, where, tower_name = KIN[name][:3]
    torch.manual_seed(0)
    model = getattr(transformers, model_name)(_kin_config(name))
    tower = model.get_submodule(where)
    assert type(tower).__name__ == tower_name
    _sharpen_kin(tower, 5)
    model.save_pretrained(folder)
    _kin_processor(name).save_pretrained(folder)


def _save_kin_tower(folder, name: str):
    """A tower of ``KIN`` saved alone (its own config.json, its weights under its own module names), with its
    model's image processor."""
    tower_name = KIN[name][2]
    torch.manual_seed(0)
    tower = getattr(_MODELING[name], tower_name)(_kin_config(name).vision_config)
    _sharpen_kin(tower, 6)
    tower.save_pretrained(folder)
    _kin_processor(name).save_pretrained(folder)


def _pixtral_config():
    return transformers.PixtralVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=2, image_size=64, patch_size=PIXTRAL_PATCH)


def _save_llava_pixtral(folder, processor=PIXTRAL_PROCESSOR):
    config = transformers.LlavaConfig(
        vision_config=_pixtral_config().to_dict(), image_token_index=10,
        text_config=dict(model_type="mistral", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, vocab_size=100, head_dim=16))
    torch.manual_seed(0)
    model = transformers.LlavaForConditionalGeneration(config)
    _sharpen(model.model.vision_tower, 3)
    model.save_pretrained(folder)
    transformers.PixtralImageProcessor(**processor).save_pretrained(folder)


def _save_pixtral_tower(folder):
    torch.manual_seed(0)
    tower = modeling_pixtral.PixtralVisionModel(_pixtral_config())
    _sharpen(tower, 4)
    tower.save_pretrained(folder)  # no image processor: vitmad takes transformers' defaults for the tower


# name -> (modeling, how the test loads the tower with transformers, its processor)
CASES = {
    "qwen2_vl": ("qwen2_vl", lambda f: transformers.Qwen2VLForConditionalGeneration.from_pretrained(
        f, attn_implementation="eager").model.visual, lambda f: transformers.Qwen2VLImageProcessor.from_pretrained(f)),
    "qwen2_5_vl": ("qwen2_5_vl", lambda f: modeling_qwen2_5_vl.Qwen2_5_VisionTransformerPretrainedModel.from_pretrained(
        f, attn_implementation="eager"), lambda f: transformers.Qwen2VLImageProcessor.from_pretrained(f)),
    "qwen3_vl": ("qwen3_vl", lambda f: modeling_qwen3_vl.Qwen3VLVisionModel.from_pretrained(
        f, attn_implementation="eager"), lambda f: transformers.Qwen2VLImageProcessor.from_pretrained(f)),
    "llava_pixtral": ("pixtral", lambda f: transformers.LlavaForConditionalGeneration.from_pretrained(
        f, attn_implementation="eager").model.vision_tower,
        lambda f: transformers.PixtralImageProcessor.from_pretrained(f)),
    # Its processor saved with patch_size as one int, which transformers takes as well as a dict (crashed the
    # native feed, QA helper-124).
    "llava_pixtral_int_patch": ("pixtral", lambda f: transformers.LlavaForConditionalGeneration.from_pretrained(
        f, attn_implementation="eager").model.vision_tower,
        lambda f: transformers.PixtralImageProcessor.from_pretrained(f)),
    # Saved without a processor: transformers' PixtralImageProcessor defaults, the patch and the longest edge
    # (64 px, the tower's image_size) of the tower.
    "pixtral": ("pixtral", lambda f: modeling_pixtral.PixtralVisionModel.from_pretrained(
        f, attn_implementation="eager"), lambda f: transformers.PixtralImageProcessor(
        patch_size={"height": PIXTRAL_PATCH, "width": PIXTRAL_PATCH}, size={"longest_edge": 64})),
    **{name: (name, lambda f, model=model: getattr(transformers, model).from_pretrained(
        f, attn_implementation="eager").model.visual, lambda f: transformers.Qwen2VLImageProcessor.from_pretrained(f))
       for name, (_, model, _, _) in QWEN3_KIN.items()},
    **{name: (name, lambda f, model=model, where=where: getattr(transformers, model).from_pretrained(
        f, attn_implementation="eager").get_submodule(where),
        lambda f, processor=processor: getattr(transformers, processor).from_pretrained(f))
       for name, (model, where, _, _, processor, _) in KIN.items()},
    # The towers of KIN saved alone: transformers loads them by their own class.
    **{f"{name}_alone": (name, lambda f, name=name, tower=tower: getattr(_MODELING[name], tower).from_pretrained(
        f, attn_implementation="eager"),
        lambda f, processor=processor: getattr(transformers, processor).from_pretrained(f))
       for name, (_, _, tower, _, processor, _) in KIN.items()},
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("packed_towers")
    _save_qwen2_vl_checkpoint(root / "qwen2_vl")
    _save_qwen_tower(root / "qwen2_5_vl", "qwen2_5_vl")
    _save_qwen_tower(root / "qwen3_vl", "qwen3_vl")
    _save_llava_pixtral(root / "llava_pixtral")
    _save_llava_pixtral(root / "llava_pixtral_int_patch", PIXTRAL_PROCESSOR | {"patch_size": PIXTRAL_PATCH})
    _save_pixtral_tower(root / "pixtral")
    for name in QWEN3_KIN:
        _save_qwen3_kin_checkpoint(root / name, name)
    for name in KIN:
        _save_kin_checkpoint(root / name, name)
        _save_kin_tower(root / f"{name}_alone", name)
    return root


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("packed_images")
    write_images(folder, 4, seed=7)  # 20 to 70 px sides, several aspect ratios
    return folder


# The reference, written here -------------------------------------------------------------------------------------

def _call_mad(probabilities: torch.Tensor, cells: list[tuple[int, int]], patch: int) -> torch.Tensor:
    """``[H, n]`` per-query MAD of one attention call ``[1, H, n, n]`` over tokens at ``cells``."""
    centres = torch.tensor([[(r + 0.5) * patch, (c + 0.5) * patch] for r, c in cells], dtype=torch.float64)
    return (probabilities[0].double() * torch.cdist(centres, centres)).sum(-1)


def _eager_calls(modeling, tower, *args, **kwargs) -> list[torch.Tensor]:
    """The probabilities of every eager attention call of one forward of ``tower``."""
    return [probabilities for _, probabilities in eager_attention_calls(modeling, tower, *args, **kwargs)]


def _image_mad(case: str, tower, inputs) -> np.ndarray:
    """``[L, H]`` MAD of one image alone through the eager tower: Qwen ``(patches, (h, w))``, Pixtral ``[3, H, W]``."""
    modeling = CASES[case][0]
    if modeling == "pixtral":
        height, width = inputs.shape[1:]
        calls = _eager_calls(_MODELING[modeling], tower, inputs[None], image_sizes=torch.tensor([[height, width]]))
        grid = (height // PIXTRAL_PATCH, width // PIXTRAL_PATCH)
        cells = [(r, c) for r in range(grid[0]) for c in range(grid[1])]
        assert len(calls) == len(tower.transformer.layers)
        return np.array([_call_mad(p, cells, PIXTRAL_PATCH).mean(-1).numpy() for p in calls])
    patches, grid = inputs
    if modeling in PATCHES_5D:  # as its model passes the processor's [N, C, p, p]
        patches = patches[None]
    extra = {"merge_sizes": torch.tensor([MERGE_SIZES[modeling]])} if modeling in MERGE_SIZES else {}
    calls = _eager_calls(_MODELING[modeling], tower, patches, grid_thw=torch.tensor([[1, *grid]]), **extra)
    layers, used = [], 0
    if modeling in KIN:  # its attention layers (LFM3-VL's convolution layers between them make no call)
        blocks = sum(type(m).__name__ == KIN[modeling][3] for m in tower.modules())
        assert blocks == 2
    else:
        blocks = len(tower.blocks)
    for index in range(blocks):
        if modeling == "qwen2_5_vl":
            windows = qwen_token_chunks(grid, MERGE, WINDOW_PX // MERGE // PATCH)
            # Window blocks: one call per window; full-attention blocks: the image in the same window order.
            chunks = [sum(windows, [])] if index in tower.fullatt_block_indexes else windows
        elif modeling in WINDOWED:  # the sequence in window order from the first layer on
            windows = qwen_token_chunks(grid, *WINDOWED[modeling])
            chunks = windows if LAYER_TYPES[index] == "window_attention" else [sum(windows, [])]
        elif modeling in ROW_MAJOR:  # one chunk per image, its patches row-major
            chunks = [[(r, c) for r in range(grid[0]) for c in range(grid[1])]]
        else:
            chunks = qwen_token_chunks(grid, MERGE, None)
        per_query = []
        for cells in chunks:
            probabilities = calls[used]
            assert probabilities.shape[-1] == len(cells)
            per_query.append(_call_mad(probabilities, cells, PATCH))
            used += 1
        layers.append(torch.cat(per_query, dim=-1).mean(-1).numpy())  # the image's mean over its tokens
    assert used == len(calls)
    return np.array(layers)


def _processed(case: str, processor, image):
    """One image through the model's own processor: Qwen ``(patches, (h, w))``, Pixtral ``[3, H, W]``."""
    found = processor([image], return_tensors="pt")
    if CASES[case][0] == "pixtral":
        return found["pixel_values"][0]
    return found["pixel_values"], tuple(found["image_grid_thw"][0, 1:].tolist())


def _grid(case: str, inputs) -> tuple[int, int]:
    if CASES[case][0] == "pixtral":
        return inputs.shape[1] // PIXTRAL_PATCH, inputs.shape[2] // PIXTRAL_PATCH
    return inputs[1]


def _references(case: str, folder, files) -> tuple[list, list]:
    """Per file: its own grid, and its ``[L, H]`` MAD alone through the eager tower."""
    _, load_tower, load_processor = CASES[case]
    tower, processor = load_tower(folder).eval(), load_processor(folder)
    grids, mads = [], []
    for path in files:
        inputs = _processed(case, processor, load_image(path)[0])
        grids.append(_grid(case, inputs))
        mads.append(_image_mad(case, tower, inputs))
    return grids, mads


# Tests -----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", list(CASES))
def test_packed_profile_is_each_images_mad_on_its_own_grid(case, folders, images):
    folder = folders / case
    files = find_images(images)
    grids, reference = _references(case, folder, files)
    assert len(set(grids)) > 1  # several grids packed into one forward
    stacked = torch.tensor(np.array(reference))  # [images, L, H]

    loaded = load_model(f"hf:{folder}")
    calls = []
    handle = loaded.module.register_forward_pre_hook(lambda _, args, kwargs: calls.append((args, kwargs)),
                                                     with_kwargs=True)
    result = vitmad.profile(loaded, images, image_size="native", batch_size=4, device="cpu")
    handle.remove()
    assert len(calls) == 1  # one packed forward for the four images
    assert result.count == 4 and result.settings["image_size"] == "native"
    assert [tuple(result.image_grids[str(f)]["grid"]) for f in files] == grids
    patch = PIXTRAL_PATCH if CASES[case][0] == "pixtral" else PATCH
    assert [result.image_grids[str(f)]["size"] for f in files] == [[h * patch, w * patch] for h, w in grids]
    torch.testing.assert_close(result.mad, stacked.mean(0), **TOL)
    torch.testing.assert_close(result.min, stacked.min(0).values, **TOL)
    torch.testing.assert_close(result.max, stacked.max(0).values, **TOL)
    assert (result.max - result.min).max() > 1.0  # the images differ: a misplaced image would be noticed
    assert (result.mad - result.uniform_mad).abs().max() > 1.0  # attention far from uniform

    # Each image alone gives its own reference: the same values as inside the packed batch.
    for path, expected in zip(files, reference):
        alone = vitmad.profile(loaded, [path], image_size="native", device="cpu")
        torch.testing.assert_close(alone.mad, torch.tensor(expected), **TOL)

    # The per-token map of one image (mean over heads) averages to that image's MAD, on the image's own grid.
    maps, pixels, names, _ = mad_maps(loaded, files[0], image_size="native", device="cpu")
    assert names == result.layers
    for layer, found in zip(range(len(maps)), maps):
        assert tuple(found.shape) == grids[0]
        assert math.isclose(found.double().mean().item(), reference[0][layer].mean(), rel_tol=1e-5, abs_tol=1e-4)
    assert tuple(pixels.shape[1:]) == (grids[0][0] * patch, grids[0][1] * patch)


def test_loading_profiles_the_vision_tower_and_says_so(folders):
    qwen = load_model(f"hf:{folders / 'qwen2_vl'}")
    assert type(qwen.module).__name__ == "Qwen2VisionTransformerPretrainedModel"
    assert qwen.description.startswith("visual (Qwen2VisionTransformerPretrainedModel) of "
                                       "Qwen2VLForConditionalGeneration")
    llava = load_model(f"hf:{folders / 'llava_pixtral'}")
    assert type(llava.module).__name__ == "PixtralVisionModel"
    assert llava.description.startswith("vision_tower (PixtralVisionModel) of LlavaForConditionalGeneration")
    # The weights are the checkpoint's, not a fresh initialisation.
    own = transformers.LlavaForConditionalGeneration.from_pretrained(folders / "llava_pixtral").model.vision_tower
    for (name, found), expected in zip(llava.module.state_dict().items(), own.state_dict().values()):
        assert torch.equal(found, expected), name
    bare = load_model(f"hf:{folders / 'qwen3_vl'}")
    assert type(bare.module).__name__ == "Qwen3VLVisionModel" and "saved alone" in bare.description
    # A model built in Python: its tower is found inside it.
    model = transformers.Qwen2VLForConditionalGeneration.from_pretrained(folders / "qwen2_vl")
    wrapped = vitmad.profiling.models.wrap_module(model)
    assert wrapped.module is model.model.visual and wrapped.description.startswith("model.visual ")


@pytest.mark.parametrize("name", list(QWEN3_KIN))
def test_a_whole_qwen3_kin_checkpoint_loads_its_tower_alone(folders, name):
    _, model_name, tower_name, _ = QWEN3_KIN[name]
    loaded = load_model(f"hf:{folders / name}")
    assert type(loaded.module).__name__ == tower_name
    assert loaded.description.startswith(f"visual ({tower_name}) of {model_name}")
    own = CASES[name][1](folders / name)
    assert type(own).__name__ == tower_name
    for (key, value), expected in zip(loaded.module.state_dict().items(), own.state_dict().values()):
        assert torch.equal(value, expected), key  # the checkpoint's weights, not a fresh initialisation


@pytest.mark.parametrize("name", list(KIN))
def test_a_whole_checkpoint_of_a_kin_tower_loads_its_tower_alone_fed_by_its_own_processor(folders, images, name):
    model_name, where, tower_name, _, processor, _ = KIN[name]
    loaded = load_model(f"hf:{folders / name}")
    assert type(loaded.module).__name__ == tower_name
    assert loaded.description == (f"{where.split('.')[-1]} ({tower_name}) of {model_name}, its vision tower alone "
                                  "(the language model is not loaded)")
    own = CASES[name][1](folders / name)  # transformers' own loading of the whole model (its conversion mapping)
    assert type(own).__name__ == tower_name
    expected = own.state_dict()
    assert loaded.module.state_dict().keys() == expected.keys()
    for key, value in loaded.module.state_dict().items():
        assert torch.equal(value, expected[key]), key  # the checkpoint's weights, not a fresh initialisation
    result = vitmad.profile(loaded, find_images(images)[:1], image_size="native", device="cpu")
    assert result.settings["profiled"] == loaded.description
    fed = result.settings["preprocessing"]
    assert fed["native"] == "qwen" and fed["processor"]["image_processor_type"] == processor
    if name in BUDGET:
        assert {k: fed["processor"][k] for k in BUDGET[name]} == BUDGET[name] and "size" not in fed["processor"]
    else:
        assert fed["processor"]["size"] == {"shortest_edge": 64, "longest_edge": 576}


@pytest.mark.parametrize("name", list(KIN))
def test_cli_profiles_a_kin_tower_saved_alone(folders, images, tmp_path, capsys, name):
    """``vitmad profile --model hf:<folder> --image-size native`` on the tower saved by itself, no vision-language
    model around it: the tower of its config.json with its weights as saved, fed by its model's own processor; each
    image's MAD is its MAD alone through the eager tower."""
    tower_name, processor = KIN[name][2], KIN[name][4]
    folder = folders / f"{name}_alone"
    loaded = load_model(f"hf:{folder}")
    assert type(loaded.module).__name__ == tower_name
    assert loaded.description == f"{tower_name} (a vision tower saved alone)"
    expected = CASES[f"{name}_alone"][1](folder).state_dict()
    assert loaded.module.state_dict().keys() == expected.keys()
    for key, value in loaded.module.state_dict().items():
        assert torch.equal(value, expected[key]), key  # the saved weights, not a fresh initialisation
    out = tmp_path / "out"
    code = main(["profile", "--model", f"hf:{folder}", "--images", str(images), "--image-size", "native",
                 "--batch-size", "4", "--device", "cpu", "--out", str(out), "--workers", "0", "--no-figures"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert f"profiled: {tower_name} (a vision tower saved alone)" in captured.out
    document = json.loads((out / "mad.json").read_text())
    fed = document["settings"]["preprocessing"]
    assert fed["native"] == "qwen" and fed["processor"]["image_processor_type"] == processor
    files = find_images(images)
    grids, reference = _references(f"{name}_alone", folder, files)
    assert [tuple(document["image_grids"][str(f)]["grid"]) for f in files] == grids and len(set(grids)) > 1
    profile = vitmad.Profile.from_json(out / "mad.json")
    torch.testing.assert_close(profile.mad, torch.tensor(np.array(reference)).mean(0), **TOL)


def _with_processor_class(folders, tmp_path, case: str, cls: str):
    """``case``'s checkpoint copied, its preprocessor_config.json naming ``cls``, its settings as saved. Written by
    hand: transformers 5 saves a ``...Pil`` processor under its base name, transformers 4 saved ``...Fast``."""
    folder = tmp_path / f"{case}_{cls}"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        (folder / name).write_bytes((folders / case / name).read_bytes())
    settings = json.loads((folders / case / "preprocessor_config.json").read_text())
    (folder / "preprocessor_config.json").write_text(json.dumps({**settings, "image_processor_type": cls}))
    return folder


def _fed(case: str, args, kwargs) -> list:
    """Each image's input in one packed forward of the tower: Qwen ``(patches, (h, w))``, Pixtral ``[3, H, W]``."""
    if CASES[case][0] == "pixtral":
        return [args[0][i, :, :h, :w] for i, (h, w) in enumerate(kwargs["image_sizes"].tolist())]
    grids = [tuple(g) for g in kwargs["grid_thw"][:, 1:].tolist()]
    patches = args[0][0] if CASES[case][0] in PATCHES_5D else args[0]  # PaddleOCR-VL's [1, N, C, p, p]
    return list(zip(patches.split([h * w for h, w in grids]), grids))


def _pixels(case: str, inputs) -> torch.Tensor:
    """The pixel values of one image's input (Qwen: its patches)."""
    return inputs if CASES[case][0] == "pixtral" else inputs[0]


@pytest.mark.parametrize(("case", "cls"), [("qwen3_vl", "Qwen2VLImageProcessorPil"),
                                           ("llava_pixtral", "PixtralImageProcessorPil"),
                                           ("paddleocr_vl", "PaddleOCRVLImageProcessorPil"),
                                           ("ovis2_5", "Ovis2_5ImageProcessorPil"),
                                           ("video_llama_3", "VideoLlama3ImageProcessorPil"),
                                           ("hunyuan_vl", "HunYuanVLImageProcessorPil"),
                                           ("hy_v4_vl", "HYV4VLImageProcessorPil")])
def test_a_checkpoint_naming_the_pil_processor_is_fed_by_it(folders, images, tmp_path, case, cls):
    """The ``...Pil`` twin of the Qwen and Pixtral processors resizes through PIL: the default's grid, pixels one
    level in 255 apart in places. The tower gets the pixels of the class the checkpoint names (until the class
    was read, the default's), mad.json says which, and the MAD is theirs."""
    folder = _with_processor_class(folders, tmp_path, case, cls)
    loaded = load_model(f"hf:{folder}")
    result, (args, kwargs) = _profile_one_forward(loaded, images, image_size="native", batch_size=4)
    assert result.settings["preprocessing"]["processor"]["image_processor_type"] == cls
    named, default = getattr(transformers, cls).from_pretrained(folder), CASES[case][2](folder)
    assert type(default).__name__ == cls.removesuffix("Pil")
    pictures = [load_image(f)[0] for f in find_images(images)]
    own = [_processed(case, named, picture) for picture in pictures]
    others = [_processed(case, default, picture) for picture in pictures]
    fed = _fed(case, args, kwargs)
    assert [_grid(case, x) for x in fed] == [_grid(case, x) for x in own] == [_grid(case, x) for x in others]
    assert all(torch.equal(_pixels(case, x), _pixels(case, y)) for x, y in zip(fed, own))
    # The default's pixels are not those: a tower fed by it would be seen here.
    assert not all(torch.equal(_pixels(case, x), _pixels(case, y)) for x, y in zip(own, others))
    tower = CASES[case][1](folder).eval()
    reference = torch.tensor(np.array([_image_mad(case, tower, x) for x in own]))
    torch.testing.assert_close(result.mad, reference.mean(0), **TOL)


@pytest.mark.parametrize(("case", "cls", "tower", "fed_by"), [
    ("qwen3_vl", "Glm4vImageProcessor", "Qwen3VLVisionModel", "Qwen2VLImageProcessor or Qwen2VLImageProcessorPil"),
    ("qwen2_vl", "SiglipImageProcessor", "Qwen2VisionTransformerPretrainedModel",
     "Qwen2VLImageProcessor or Qwen2VLImageProcessorPil"),
    ("llava_pixtral", "Qwen2VLImageProcessor", "PixtralVisionModel",
     "PixtralImageProcessor or PixtralImageProcessorPil"),
])
def test_a_checkpoint_naming_another_processor_class_is_refused(folders, images, tmp_path, case, cls, tower, fed_by):
    """The class a checkpoint names is its processor (transformers' AutoImageProcessor builds it): fed by Qwen2-VL's
    instead, a tower saved with GLM-4.1V's would see other grids than its own processor cuts (GLM's budget counts
    both temporal patches: fewer tokens here). Refused by name, never fed otherwise."""
    folder = _with_processor_class(folders, tmp_path, case, cls)
    if cls == "Glm4vImageProcessor":
        own = transformers.AutoImageProcessor.from_pretrained(folder)
        assert type(own).__name__ == cls
        grids = [[_processed(case, p, load_image(f)[0])[1] for f in find_images(images)]
                 for p in (own, CASES[case][2](folder))]
        assert grids[0] != grids[1]
    with pytest.raises(OptionError, match=rf"model: the checkpoint's image processor is {cls}, but the vision tower "
                                          rf"{tower} is fed by {fed_by} \(its model's processor in transformers\)"):
        load_model(f"hf:{folder}")


@pytest.mark.parametrize(("case", "cls"), [("qwen3_vl", "Qwen2VLImageProcessorFast"),
                                           ("llava_pixtral", "PixtralImageProcessorFast"),
                                           ("lfm3_vl", "Qwen2VLImageProcessorFast"),
                                           ("cosmos3_edge", "Cosmos3EdgeImageProcessorFast")])
def test_a_transformers_4_fast_processor_is_its_transformers_5_class(folders, tmp_path, case, cls):
    """transformers 4 saved its torchvision processors as ``...Fast`` (Qwen3-VL's checkpoints name
    Qwen2VLImageProcessorFast); transformers 5 loads them as the base class: fed as the checkpoint saved with the
    base name is, with the same settings (mad.json, the run's fingerprint)."""
    folder = _with_processor_class(folders, tmp_path, case, cls)
    assert type(transformers.AutoImageProcessor.from_pretrained(folder)).__name__ == cls.removesuffix("Fast")
    assert load_model(f"hf:{folder}").processor == load_model(f"hf:{folders / case}").processor


def test_the_processor_class_keeps_or_changes_the_runs_fingerprint(folders, images, tmp_path):
    """A Qwen tower fed by the default class has the preprocessing settings it had before the class was read (no
    image_processor_type): its runs keep their fingerprints and resume their checkpoints, also once the file names
    transformers 4's Qwen2VLImageProcessorFast, the same class. Named ...Pil, it is fed other pixels: another run,
    whose resume of that checkpoint is refused, naming the preprocessing."""
    folder = _with_processor_class(folders, tmp_path, "qwen3_vl", "Qwen2VLImageProcessor")
    spec, checkpoint = f"hf:{folder}", tmp_path / "run.pt"
    full = vitmad.profile(spec, images, image_size="native", batch_size=1, device="cpu")
    assert full.settings["preprocessing"]["processor"] == {"size": {"shortest_edge": 64, "longest_edge": 576},
                                                           "merge_size": 2}
    _interrupted_native_run(load_model(spec), images, checkpoint)
    config = folder / "preprocessor_config.json"
    saved = json.loads(config.read_text())
    config.write_text(json.dumps({**saved, "image_processor_type": "Qwen2VLImageProcessorPil"}))
    with pytest.raises(OptionError, match=r"resume: .*other settings.*\(changed since: the model's preprocessing\)"):
        vitmad.profile(spec, images, image_size="native", batch_size=1, device="cpu", checkpoint=checkpoint,
                       resume=True)
    config.write_text(json.dumps({**saved, "image_processor_type": "Qwen2VLImageProcessorFast"}))
    resumed = vitmad.profile(spec, images, image_size="native", batch_size=1, device="cpu", checkpoint=checkpoint,
                             resume=True)
    assert resumed.settings == full.settings and resumed.images == full.images
    assert torch.equal(resumed.stats.total, full.stats.total)


def _kin_folder(folders, tmp_path, name: str, weights: dict | None = None, **processor) -> str:
    """``name``'s checkpoint copied with another processor (``processor``: its changes, or ``cls``: another
    class) and, given ``weights``, other weights."""
    from safetensors.torch import save_file

    folder = tmp_path / name
    folder.mkdir()
    (folder / "config.json").write_text((folders / name / "config.json").read_text())
    if weights is None:
        (folder / "model.safetensors").write_bytes((folders / name / "model.safetensors").read_bytes())
    else:
        save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    cls = processor.pop("cls", None)
    if cls is None:
        _kin_processor(name, **processor).save_pretrained(folder)
    else:
        cls(**{**QWEN_PROCESSOR, "temporal_patch_size": KIN[name][5]}).save_pretrained(folder)
        assert json.loads((folder / "preprocessor_config.json").read_text())["image_processor_type"] == cls.__name__
    return f"hf:{folder}"


@pytest.mark.parametrize("name", [name for name in KIN if name not in MERGE_SIZES])
def test_a_kin_processor_merging_otherwise_than_its_tower_is_refused(folders, tmp_path, name):
    """The processor orders the patches in its merge_size blocks, the tower places them (rotary positions, position
    grid, convolutions) by its config's spatial_merge_size: where they disagree, no token's place is known."""
    spec = _kin_folder(folders, tmp_path, name, merge_size=1)
    with pytest.raises(OptionError, match=rf"model: the image processor has merge_size=1, but the vision tower "
                                          rf"{KIN[name][2]} takes 2"):
        load_model(spec)


@pytest.mark.parametrize(("name", "cls", "message"), [
    ("minimax_m3_vl", "Qwen2VLImageProcessor", r"model: the checkpoint's image processor is Qwen2VLImageProcessor, but "
                                               r"the vision tower MiniMaxM3VLVisionModel is fed by "
                                               r"MiniMaxM3VLImageProcessor \(its model's processor"),
    ("cosmos3_edge", "Qwen2VLImageProcessor", r"model: the checkpoint's image processor is Qwen2VLImageProcessor, but "
                                              r"the vision tower Cosmos3EdgeVisionModel is fed by "
                                              r"Cosmos3EdgeImageProcessor or Cosmos3EdgeImageProcessorPil"),
    ("lfm3_vl", "MiniMaxM3VLImageProcessor", r"model: the checkpoint's image processor is MiniMaxM3VLImageProcessor, "
                                             r"but the vision tower Lfm3VlVisionModel is fed by Qwen2VLImageProcessor "
                                             r"or Qwen2VLImageProcessorPil"),
    # Qwen2-VL's processor resizes alike but cuts merge blocks, and another smart_resize: refused by class.
    ("ovis2_5", "Qwen2VLImageProcessor", r"model: the checkpoint's image processor is Qwen2VLImageProcessor, but "
                                         r"the vision tower Ovis2_5VisionModel is fed by Ovis2_5ImageProcessor or "
                                         r"Ovis2_5ImageProcessorPil"),
    # Qwen2-VL's processor would cut merge blocks (C, t, p, p) where Muse Spark's tower takes row-major (t, C, p, p).
    ("muse_spark", "Qwen2VLImageProcessor", r"model: the checkpoint's image processor is Qwen2VLImageProcessor, but "
                                            r"the vision tower MuseSparkVisionModel is fed by "
                                            r"MuseGlimmerImageProcessor \(its model's processor"),
    ("video_llama_3", "Qwen2VLImageProcessor", r"model: the checkpoint's image processor is Qwen2VLImageProcessor, "
                                               r"but the vision tower VideoLlama3VisionModel is fed by "
                                               r"VideoLlama3ImageProcessor or VideoLlama3ImageProcessorPil"),
    ("hunyuan_vl", "Qwen2VLImageProcessor", r"model: the checkpoint's image processor is Qwen2VLImageProcessor, but "
                                            r"the vision tower HunYuanVLVisionTransformer is fed by "
                                            r"HunYuanVLImageProcessor or HunYuanVLImageProcessorPil"),
    # HunYuanVL's processor line for line, but another model's class: refused by class, as every other.
    ("hy_v4_vl", "HunYuanVLImageProcessor", r"model: the checkpoint's image processor is HunYuanVLImageProcessor, "
                                            r"but the vision tower HYV4VLVisionModel is fed by HYV4VLImageProcessor "
                                            r"or HYV4VLImageProcessorPil"),
    ("paddleocr_vl", "Qwen2VLImageProcessor", r"model: the checkpoint's image processor is Qwen2VLImageProcessor, but "
                                              r"the vision tower PaddleOCRVisionModel is fed by "
                                              r"PaddleOCRVLImageProcessor or PaddleOCRVLImageProcessorPil"),
])
def test_a_kin_checkpoint_with_another_models_processor_is_refused(folders, tmp_path, name, cls, message):
    with pytest.raises(OptionError, match=message):
        load_model(_kin_folder(folders, tmp_path, name, cls=getattr(transformers, cls)))


def test_a_video_llama_3_processor_merging_blocks_is_refused(folders, tmp_path):
    """Its tower would take merge_sizes 2 and merge-block patches (its video processor's); fed with its image
    processor's default only (merge_sizes 1, row-major), another merge size is refused by name."""
    spec = _kin_folder(folders, tmp_path, "video_llama_3", merge_size=2)
    with pytest.raises(OptionError, match=r"model: the image processor has merge_size=2, but the vision tower "
                                          r"VideoLlama3VisionModel is fed here with merge_size 1 only"):
        load_model(spec)


@pytest.mark.parametrize("alone", [False, True])
def test_a_kimi_k25_checkpoint_is_refused_before_any_weight_is_read(tmp_path, alone):
    """Kimi-K2.5's tower is recorded, not loaded (its checkpoint fuses q, k, v as rope-permuted wqkv; its processor
    pads): the whole checkpoint, or the tower's config alone, is refused from config.json, no weights present."""
    config = transformers.Kimi_K25Config()
    (config.vision_config if alone else config).save_pretrained(tmp_path)
    with pytest.raises(OptionError, match=r"model: .*Kimi-K2\.5's vision tower \(Kimi_K25VisionModel\) is recorded "
                                          r"by vitmad\.record but not loaded by vitmad profile: .*wqkv"):
        load_model(f"hf:{tmp_path}")


def test_a_cosmos3_edge_processor_with_a_temporal_patch_is_refused(folders, tmp_path):
    """Its tower embeds C * p * p values per patch: a processor repeating each image over two frames does not fit."""
    with pytest.raises(OptionError, match="model: the image processor has temporal_patch_size=2, but the vision tower "
                                          "Cosmos3EdgeVisionModel takes 1"):
        load_model(_kin_folder(folders, tmp_path, "cosmos3_edge", temporal_patch_size=2))


def test_a_minimax_checkpoint_missing_tower_weights_is_refused(folders, tmp_path):
    """Its tower saved in the original layout (vision_tower.vision_model.encoder.layers...), one layer missing."""
    from safetensors.torch import load_file

    weights = load_file(folders / "minimax_m3_vl" / "model.safetensors")
    assert any(k.startswith("vision_tower.vision_model.encoder.layers.1.") for k in weights)
    kept = {k: v for k, v in weights.items() if not k.startswith("vision_tower.vision_model.encoder.layers.1.")}
    with pytest.raises(OptionError, match=r"model: .*no weights for \d+ parameters of its vision tower "
                                          r"MiniMaxM3VLVisionModel \(e\.g\. layers\.1\..*model\.vision_tower\. or "
                                          r"vision_tower\., their modules renamed"):
        load_model(_kin_folder(folders, tmp_path, "minimax_m3_vl", weights=kept))


def _profile_one_forward(loaded, images, **options):
    """``vitmad.profile`` of ``loaded`` on the CPU, and the ``(args, kwargs)`` of the one forward of its tower."""
    calls = []
    handle = loaded.module.register_forward_pre_hook(lambda _, args, kwargs: calls.append((args, kwargs)),
                                                     with_kwargs=True)
    try:
        result = vitmad.profile(loaded, images, device="cpu", **options)
    finally:
        handle.remove()
    (call,) = calls
    return result, call


def test_fixed_size_cosmos3_edge_patches_are_its_processors_channels_last(folders, images):
    """A fixed size: the tower gets the resized images patched as Cosmos3EdgeImageProcessor patches them, each patch
    (p, p, C); the map's image is the image behind those patches."""
    from vitmad.profiling.packed_towers import qwen_patches, qwen_unpatch

    folder = folders / "cosmos3_edge"
    loaded = load_model(f"hf:{folder}")
    result, (args, kwargs) = _profile_one_forward(loaded, images, image_size="16x24", batch_size=4)
    assert kwargs["grid_thw"].tolist() == [[1, 4, 6]] * 4
    prep = loaded.preprocessing.with_size((16, 24))
    pixels = [prep(load_image(f)[0]) for f in find_images(images)]
    processor = _kin_processor("cosmos3_edge", do_resize=False, do_rescale=False, do_normalize=False)
    expected = torch.cat([processor([p], return_tensors="pt")["pixel_values"] for p in pixels])
    torch.testing.assert_close(args[0], expected)
    patches, grid = qwen_patches(pixels[0][None], PATCH, MERGE, 1, channels_last=True)
    assert torch.equal(patches[0], expected[:24]) and grid == (4, 6)
    assert torch.equal(qwen_unpatch(patches[0], grid, PATCH, MERGE, 1, channels_last=True), pixels[0])
    tower = CASES["cosmos3_edge"][1](folder).eval()
    reference = [_image_mad("cosmos3_edge", tower, (expected[i * 24:(i + 1) * 24], (4, 6))) for i in range(4)]
    torch.testing.assert_close(result.mad, torch.tensor(np.array(reference)).mean(0), **TOL)
    # Native: the map's image is what the processor resized, its patches put back in place.
    maps, shown, _, _ = mad_maps(loaded, find_images(images)[0], image_size="native", device="cpu")
    own = _kin_processor("cosmos3_edge")
    fed, grid = _processed("cosmos3_edge", own, load_image(find_images(images)[0])[0])
    assert torch.equal(qwen_patches(shown[None], PATCH, MERGE, 1, channels_last=True)[0][0], fed)


@pytest.mark.parametrize("name", list(KIN))
def test_a_kin_tower_is_fed_exactly_its_own_processors_pixels(folders, images, name):
    """Native: each image's patches in the packed forward are, bit for bit, what the model's own processor (loaded
    by transformers from the checkpoint) gives for that image, with its grid."""
    folder = folders / name
    loaded = load_model(f"hf:{folder}")
    _, (args, kwargs) = _profile_one_forward(loaded, images, image_size="native", batch_size=4)
    own = CASES[name][2](folder)
    assert type(own).__name__ == KIN[name][4]
    expected = [_processed(name, own, load_image(f)[0]) for f in find_images(images)]
    fed = _fed(name, args, kwargs)
    assert [g for _, g in fed] == [g for _, g in expected] and len({g for _, g in expected}) > 1
    for (found, _), (pixels, _) in zip(fed, expected):
        assert torch.equal(found, pixels)


def _row_major_patches(pixels: torch.Tensor, patch: int, name: str) -> torch.Tensor:
    """The patches of one image ``[C, H, W]`` row-major, written out patch by patch, as ``name``'s processor lays
    each out: PaddleOCR-VL ``[h * w, C, p, p]``, Muse Glimmer ``[h * w, t * C * p * p]`` (the patch repeated over
    the temporal patch, time first)."""
    channels, height, width = pixels.shape
    patches = torch.stack([pixels[:, r * patch:(r + 1) * patch, c * patch:(c + 1) * patch]
                           for r in range(height // patch) for c in range(width // patch)])
    if name in ("video_llama_3", "hunyuan_vl", "hy_v4_vl"):
        return patches.reshape(len(patches), -1)
    if name in ("muse_glimmer", "muse_spark"):
        return torch.stack([patches] * KIN[name][5], dim=1).reshape(len(patches), -1)
    return patches


@pytest.mark.parametrize("name", ROW_MAJOR)
def test_a_row_major_tower_is_fed_its_processors_row_major_patches(folders, images, name):
    """Native: the tower gets exactly the pixels its model's processor gives for each image (its own resize rule,
    its row-major patches; PaddleOCR-VL's as [1, N, C, p, p]), and the map's image is the image behind them. A fixed
    size: the resized images cut row-major as that processor cuts them (not in merge blocks)."""
    folder = folders / name
    loaded = load_model(f"hf:{folder}")
    assert type(loaded.module).__name__ == KIN[name][2]
    assert not any("language_model" in key or "embed_tokens" in key for key in loaded.module.state_dict())
    files = find_images(images)
    result, (args, kwargs) = _profile_one_forward(loaded, images, image_size="native", batch_size=4)
    if name in PATCHES_5D:
        assert args[0].dim() == 5 and args[0].shape[0] == 1 and tuple(args[0].shape[2:]) == (3, PATCH, PATCH)
    own = CASES[name][2](folder)
    expected = [_processed(name, own, load_image(f)[0]) for f in files]
    fed = _fed(name, args, kwargs)
    assert [g for _, g in fed] == [g for _, g in expected] and len({g for _, g in expected}) > 1
    assert all(torch.equal(x, y) for (x, _), (y, _) in zip(fed, expected))  # 0 difference
    maps, shown, _, _ = mad_maps(loaded, files[0], image_size="native", device="cpu")
    assert torch.equal(_row_major_patches(shown, PATCH, name), expected[0][0])

    result, (args, kwargs) = _profile_one_forward(loaded, images, image_size="16x24", batch_size=4)
    assert kwargs["grid_thw"].tolist() == [[1, 4, 6]] * 4
    prep = loaded.preprocessing.with_size((16, 24))
    pixels = [prep(load_image(f)[0]) for f in files]
    processor = _kin_processor(name, do_resize=False, do_rescale=False, do_normalize=False)
    cut = torch.cat([processor([p], return_tensors="pt")["pixel_values"] for p in pixels])
    assert torch.equal(cut, torch.cat([_row_major_patches(p, PATCH, name) for p in pixels]))
    torch.testing.assert_close(args[0][0] if name in PATCHES_5D else args[0], cut)
    tower = CASES[name][1](folder).eval()
    reference = [_image_mad(name, tower, (cut[i * 24:(i + 1) * 24], (4, 6))) for i in range(4)]
    torch.testing.assert_close(result.mad, torch.tensor(np.array(reference)).mean(0), **TOL)


def test_a_checkpoint_missing_tower_weights_is_refused(folders, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "broken"
    folder.mkdir()
    for name in ("config.json", "preprocessor_config.json"):
        (folder / name).write_text((folders / "qwen2_vl" / name).read_text())
    weights = load_file(folders / "qwen2_vl" / "model.safetensors")
    save_file({k: v for k, v in weights.items() if "visual.blocks.1." not in k}, folder / "model.safetensors",
              metadata={"format": "pt"})
    with pytest.raises(OptionError, match=r"model: .*no weights for \d+ parameters of its vision tower "
                                          r"Qwen2VisionTransformerPretrainedModel \(e\.g\. blocks\.1\."):
        load_model(f"hf:{folder}")


@pytest.mark.parametrize("name", ["hunyuan_vl", "hy_v4_vl"])
def test_a_hunyuan_base_model_checkpoint_loads_its_tower(tmp_path, name):
    """save_pretrained of HunYuanVLModel / HYV4VLModel (no head) writes the tower under vision_tower.* with its
    original module names (mlp.dense_h_to_4h, perceive): read as transformers reads it. It was refused as lacking
    those weights (QA helper-140)."""
    model_name = KIN[name][0].replace("ForConditionalGeneration", "Model")
    torch.manual_seed(0)
    model = getattr(transformers, model_name)(_kin_config(name))
    _sharpen_kin(model.vision_tower, 5)
    model.save_pretrained(tmp_path)
    _kin_processor(name).save_pretrained(tmp_path)
    loaded = load_model(f"hf:{tmp_path}")
    expected = getattr(transformers, model_name).from_pretrained(tmp_path).vision_tower.state_dict()
    assert loaded.module.state_dict().keys() == expected.keys()
    for key, value in loaded.module.state_dict().items():
        assert torch.equal(value, expected[key]), key


def test_a_tower_saved_alone_missing_a_weight_is_refused(folders, tmp_path):
    """A weight the saved tower lacks would be drawn at random: it ran without a word, its MAD off by up to 11 px
    and different at every load (QA helper-140)."""
    from safetensors.torch import load_file, save_file

    for name in ("config.json", "preprocessor_config.json"):
        (tmp_path / name).write_text((folders / "paddleocr_vl_alone" / name).read_text())
    weights = load_file(folders / "paddleocr_vl_alone" / "model.safetensors")
    dropped = next(k for k in weights if k.endswith("layers.1.self_attn.k_proj.weight"))
    save_file({k: v for k, v in weights.items() if k != dropped}, tmp_path / "model.safetensors",
              metadata={"format": "pt"})
    with pytest.raises(OptionError, match=r"model: .*the saved vision tower PaddleOCRVisionModel has no weights for 1 "
                                          r"of its parameters \(e\.g\. .*layers\.1\.self_attn\.k_proj\.weight\)"):
        load_model(f"hf:{tmp_path}")


def test_an_image_the_processor_refuses_is_skipped_with_its_reason(folders, tmp_path):
    """Ovis2.5's own processor cannot take a 10 x 200 px image (its smart_resize makes it 0 px wide, then refuses
    it): that image is set aside with the processor's reason, the others profiled; the run stopped there (QA
    helper-140)."""
    from PIL import Image

    Image.new("RGB", (200, 10), (40, 90, 200)).save(tmp_path / "a_thin.png")
    Image.new("RGB", (48, 40), (200, 90, 40)).save(tmp_path / "b_plain.png")
    with pytest.warns(UserWarning, match=r"skipping image .*a_thin\.png: the model's image processor refuses it"):
        result = vitmad.profile(f"hf:{folders / 'ovis2_5'}", tmp_path, image_size="native", device="cpu")
    assert [Path(path).name for path in result.images] == ["b_plain.png"]
    (skipped,) = result.skipped
    assert Path(skipped["path"]).name == "a_thin.png"
    assert skipped["reason"].startswith("the model's image processor refuses it (ValueError: ")


def _interrupted_native_run(loaded, images, checkpoint) -> None:
    """A native profile of ``loaded``, one image per batch, checkpointed, stopped by a KeyboardInterrupt as the
    third batch's packed forward begins: two batches are in the checkpoint."""
    calls = []

    def interrupt(module, args, kwargs):
        calls.append(kwargs["grid_thw"])
        if len(calls) == 3:
            raise KeyboardInterrupt

    handle = loaded.module.register_forward_pre_hook(interrupt, with_kwargs=True)
    try:
        with pytest.raises(KeyboardInterrupt):
            vitmad.profile(loaded, images, image_size="native", batch_size=1, device="cpu", checkpoint=checkpoint,
                           checkpoint_every=5)
    finally:
        handle.remove()


def test_resume_after_interrupt_equals_uninterrupted_run(folders, images, tmp_path):
    spec = f"hf:{folders / 'qwen2_5_vl'}"
    full = vitmad.profile(spec, images, image_size="native", batch_size=1, device="cpu")
    loaded, checkpoint = load_model(spec), tmp_path / "run.pt"
    _interrupted_native_run(loaded, images, checkpoint)
    state = torch.load(checkpoint, weights_only=True)
    assert state["batches_done"] == 2 and len(state["images"]) == 2
    assert len(state["meta"]["image_grids"]) == 2
    resumed = vitmad.profile(loaded, images, image_size="native", batch_size=1, device="cpu", checkpoint=checkpoint,
                             resume=True)
    assert resumed.images == full.images and resumed.image_grids == full.image_grids
    assert torch.equal(resumed.stats.total, full.stats.total)
    assert torch.equal(resumed.stats.total_sq, full.stats.total_sq)
    assert torch.equal(resumed.min, full.min) and torch.equal(resumed.max, full.max)


def test_fixed_size_resizes_every_image_to_that_grid(folders, images):
    folder = folders / "qwen2_5_vl"
    loaded = load_model(f"hf:{folder}")
    result, (args, kwargs) = _profile_one_forward(loaded, images, image_size="16x24", batch_size=4)
    assert result.image_grids is None and result.geometry[0]["grid"] == [4, 6]
    assert kwargs["grid_thw"].tolist() == [[1, 4, 6]] * 4
    # The tower got the image files cover-resized and centre-cropped to 16 x 24, in the processor's patch order.
    prep = loaded.preprocessing.with_size((16, 24))
    processor = transformers.Qwen2VLImageProcessor(**QWEN_PROCESSOR, do_resize=False, do_rescale=False,
                                                   do_normalize=False)
    expected = torch.cat([processor([prep(load_image(f)[0])], return_tensors="pt")["pixel_values"]
                          for f in find_images(images)])
    torch.testing.assert_close(args[0], expected)
    tower = CASES["qwen2_5_vl"][1](folder).eval()
    reference = [_image_mad("qwen2_5_vl", tower, (expected[i * 24:(i + 1) * 24], (4, 6))) for i in range(4)]
    torch.testing.assert_close(result.mad, torch.tensor(np.array(reference)).mean(0), **TOL)


@pytest.mark.parametrize(("case", "size", "message"), [
    ("qwen2_vl", None, r"image_size: Qwen2VisionTransformerPretrainedModel has no input size of its own: use "
                       r"image_size='native' \(--image-size native\).*multiples of 8 px"),
    ("qwen2_vl", "12x16", r"image_size: .* must be multiples of 8 px \(patch 4 x spatial merge 2\), got 12x16"),
    ("llava_pixtral", "20", r"image_size: PixtralVisionModel .* multiples of the 8 px patch, got 20x20"),
    ("pixtral", "72", r"image_size: PixtralVisionModel takes sides of at most 64 px .*got 72x72"),
])
def test_sizes_a_tower_cannot_take_are_refused(folders, images, case, size, message):
    with pytest.raises(OptionError, match=message):
        vitmad.profile(f"hf:{folders / case}", images, image_size=size, device="cpu")


def test_a_processor_that_does_not_fit_the_tower_is_refused(folders, images, tmp_path):
    folder = tmp_path / "mismatch"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        (folder / name).write_bytes((folders / "qwen3_vl" / name).read_bytes())
    transformers.Qwen2VLImageProcessor(**{**QWEN_PROCESSOR, "patch_size": 14}).save_pretrained(folder)
    with pytest.raises(OptionError, match="model: the image processor has patch_size=14, but the vision tower "
                                          "Qwen3VLVisionModel takes 4"):
        vitmad.profile(f"hf:{folder}", images, image_size="native", device="cpu")
    tensor = torch.zeros(2, 3, 12, 16)  # preprocessed pixels are checked when the tower runs
    with pytest.raises(OptionError, match=r"images: .* must be multiples of 8 px .*got 12x16"):
        vitmad.profile(f"hf:{folders / 'qwen3_vl'}", tensor, device="cpu")


def test_cli_writes_grids_the_profiled_tower_and_figures(folders, images, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["profile", "--model", f"hf:{folders / 'qwen2_vl'}", "--images", str(images), "--image-size",
                 "native", "--batch-size", "3", "--device", "cpu", "--out", str(out), "--workers", "0"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "4 images (0 skipped)" in captured.out
    assert "profiled: visual (Qwen2VisionTransformerPretrainedModel) of Qwen2VLForConditionalGeneration" in captured.out
    document = json.loads((out / "mad.json").read_text())
    assert document["settings"]["profiled"].startswith("visual (Qwen2VisionTransformerPretrainedModel)")
    assert document["settings"]["preprocessing"]["native"] == "qwen"
    assert document["settings"]["preprocessing"]["processor"]["size"] == {"shortest_edge": 64, "longest_edge": 576}
    assert len(document["image_grids"]) == 4 and document["layers"][0]["name"] == "blocks.0.attn"
    assert (out / "mad.csv").stat().st_size > 0
    assert (out / "mad.png").stat().st_size > 0 and (out / "mad_map.png").stat().st_size > 0

    again = vitmad.Profile.from_json(out / "mad.json")
    direct = vitmad.profile(f"hf:{folders / 'qwen2_vl'}", images, image_size="native", device="cpu")
    torch.testing.assert_close(again.mad, direct.mad, rtol=1e-6, atol=1e-6)


def test_python_m_vitmad_profile_on_a_llava_pixtral_checkpoint(folders, images, tmp_path):
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-m", "vitmad", "profile", "--model", f"hf:{folders / 'llava_pixtral'}", "--images",
         str(images), "--image-size", "native", "--device", "cpu", "--out", str(out), "--no-figures"],
        env=subprocess_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    document = json.loads((out / "mad.json").read_text())
    assert document["count"] == 4 and document["settings"]["preprocessing"]["native"] == "pixtral"
    grids = {tuple(entry["grid"]) for entry in document["image_grids"].values()}
    assert len(grids) > 1 and max(max(g) for g in grids) <= 48 // PIXTRAL_PATCH
    done = subprocess.run(
        [sys.executable, "-m", "vitmad", "profile", "--model", f"hf:{folders / 'llava_pixtral'}", "--images",
         str(images), "--device", "cpu", "--out", str(out), "--no-figures"],
        env=subprocess_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "--image-size native" in done.stderr


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_torchrun_two_ranks_equal_one_process(folders, images, tmp_path):
    args = ["--model", f"hf:{folders / 'qwen2_5_vl'}", "--images", str(images), "--image-size", "native",
            "--batch-size", "1", "--device", "cpu", "--no-figures"]
    profile_one_process_and_two_ranks(args, tmp_path)
    single, two = (json.loads((tmp_path / name / "mad.json").read_text()) for name in ("one", "two"))
    assert two["processes"] == 2 and two["images"] == single["images"]
    assert two["image_grids"] == single["image_grids"] and two["settings"] == single["settings"]
    np.testing.assert_allclose(np.array(two["sums"]["total"]), np.array(single["sums"]["total"]), rtol=1e-12)
