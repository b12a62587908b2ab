"""vitmad.record on transformers 5.25.0 ViT-like towers that no other test names (QA helper-111 checked them by hand):
AltCLIP, Chinese-CLIP, MetaCLIP 2, MLCD (2-D RoPE), OWL-ViT, OWLv2, CLIPSeg, GIT, BLIP-2, InstructBLIP, TIPSv2 (class
token, then registers), Pixio (8 class tokens), Sapiens2 (class token and registers, grouped key heads), Janus and
VitPose (no prefix token; VitPose's patch convolution pads 2 px), and Gemma 3's SigLIP tower inside the whole model.
X-CLIP's tower is tested in test_record_plain_layouts.py.

Tiny random-weight towers (32 wide, 2 layers, 2 heads), sharpened so that attention is far from uniform. The reference
is each model's own eager attention probabilities (its modeling file's ``eager_attention_forward``), placed by the
layout written here from each embeddings' source: ``prefix`` tokens without a position first (the class token, then
the registers, ``torch.cat([cls, registers, patches])``), then the patches row-major, patch ``(r, c)`` at
``((r + 0.5) * p, (c + 0.5) * p)`` pixels; reduced in float64 by conftest's ``check_prefix_and_grid``.
"""

from __future__ import annotations

import importlib

import pytest
import torch

from conftest import check_prefix_and_grid, eager_attention_calls, record_both_reductions, sharpened

transformers = pytest.importorskip("transformers")

STATS = ["entropy", "prefix_mass", "prefix_maps"]
SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2)
# Built for 48 x 48, run at 43 x 61 px: a 5 x 7 grid of 8 px patches, the bottom and right edges cut off (not whole
# patches).
PIXELS = (43, 61)

# name -> (modeling module, config class, model class, config, tokens before the grid, patch, input size, forward
# kwargs)
TOWERS = {
    "altclip": ("altclip", "AltCLIPVisionConfig", "AltCLIPVisionModel", dict(intermediate_size=64), 1, 8, PIXELS,
                {"interpolate_pos_encoding": True}),
    "chinese_clip": ("chinese_clip", "ChineseCLIPVisionConfig", "ChineseCLIPVisionModel", dict(intermediate_size=64),
                     1, 8, PIXELS, {"interpolate_pos_encoding": True}),
    "metaclip_2": ("metaclip_2", "MetaClip2VisionConfig", "MetaClip2VisionModel", dict(intermediate_size=64), 1, 8,
                   PIXELS, {"interpolate_pos_encoding": True}),
    "mlcd": ("mlcd", "MLCDVisionConfig", "MLCDVisionModel", dict(intermediate_size=64), 1, 8, PIXELS, {}),
    "owlvit": ("owlvit", "OwlViTVisionConfig", "OwlViTVisionModel", dict(intermediate_size=64), 1, 8, PIXELS,
               {"interpolate_pos_encoding": True}),
    "owlv2": ("owlv2", "Owlv2VisionConfig", "Owlv2VisionModel", dict(intermediate_size=64), 1, 8, PIXELS,
              {"interpolate_pos_encoding": True}),
    "clipseg": ("clipseg", "CLIPSegVisionConfig", "CLIPSegVisionModel", dict(intermediate_size=64), 1, 8, PIXELS,
                {"interpolate_pos_encoding": True}),
    # GIT's image encoder (GitVisionModel, CLIP's design: the class token, then the patches; eager only).
    "git": ("git", "GitVisionConfig", "GitVisionModel", dict(intermediate_size=64), 1, 8, PIXELS,
            {"interpolate_pos_encoding": True}),
    "blip_2": ("blip_2", "Blip2VisionConfig", "Blip2VisionModel", dict(intermediate_size=64), 1, 8, PIXELS,
               {"interpolate_pos_encoding": True}),
    "instructblip": ("instructblip", "InstructBlipVisionConfig", "InstructBlipVisionModel", dict(intermediate_size=64),
                     1, 8, PIXELS, {"interpolate_pos_encoding": True}),
    # The class token, then 2 registers inserted after it (Tipsv2Embeddings.forward).
    "tipsv2": ("tipsv2", "Tipsv2VisionConfig", "Tipsv2VisionModel", dict(mlp_ratio=2, num_register_tokens=2), 3, 8,
               PIXELS, {}),
    "pixio": ("pixio", "PixioConfig", "PixioModel", dict(mlp_ratio=2, n_cls_tokens=8), 8, 8, PIXELS, {}),
    # The class token, 4 registers, then the patches; one key head for the two query heads after the first layer.
    "sapiens2": ("sapiens2", "Sapiens2Config", "Sapiens2Model",
                 dict(intermediate_size=64, num_register_tokens=4, num_key_value_attention_heads=1,
                      num_first_full_attention_layers=1, num_last_full_attention_layers=0), 5, 8, PIXELS, {}),
    "janus": ("janus", "JanusVisionConfig", "JanusVisionModel", dict(mlp_ratio=2.0), 0, 8, PIXELS,
              {"interpolate_pos_encoding": True}),
    # Its patch convolution (16 px, stride 16, padding 2) makes (112 + 4 - 16) // 16 + 1 = 7 rows and 5 columns; the
    # configured size is the only one it takes. Every cell is 2 px up and left of (r + 0.5) * 16: distances alike.
    "vitpose": ("vitpose_backbone", "VitPoseBackboneConfig", "VitPoseBackbone",
                dict(mlp_ratio=2, image_size=(112, 80)), 0, 16, (112, 80), {}),
}


def modeling(module: str):
    return importlib.import_module(f"transformers.models.{module}.modeling_{module}")


def _tower(name: str) -> torch.nn.Module:
    module, config_name, model_name, extra, _, patch, _, _ = TOWERS[name]
    config = getattr(transformers, config_name)(**{**SMALL, "image_size": 48, "patch_size": patch, **extra})
    torch.manual_seed(0)
    return peaked(sharpened(getattr(transformers, model_name)(config)))


def peaked(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` (sharpened) with its patch convolution and its position, class and register embeddings drawn anew
    (BLIP-2's and InstructBLIP's initial ones make every token alike: uniform attention), its query and key
    projections 1.5 times larger (VitPose's second layer stays near uniform otherwise) and Sapiens2's query and key
    norms (unit queries and keys) scaled up."""
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Conv2d):
                module.weight.normal_(std=module.weight[0].numel() ** -0.5)
            elif isinstance(module, torch.nn.Linear) and name.endswith(("q_proj", "k_proj", "query", "key", "qkv")):
                module.weight.mul_(1.5)
        for name, parameter in model.named_parameters():
            if any(part in name for part in ("position", "class", "cls", "register")):
                parameter.normal_()
            elif name.endswith(("q_norm.weight", "k_norm.weight")):
                parameter.fill_(2.0)
    return model


@pytest.mark.parametrize("name", list(TOWERS))
def test_tower_tokens_after_their_prefix_match_eager_attention(name):
    module, _, _, _, prefix, patch, pixels, kwargs = TOWERS[name]
    model = _tower(name)
    images = torch.randn(2, 3, *pixels, generator=torch.Generator().manual_seed(1))
    calls = eager_attention_calls(modeling(module), model, images, **kwargs)
    model.set_attn_implementation("eager" if name in ("vitpose", "git") else "sdpa")  # they have no SDPA path
    rec, rec_tokens = record_both_reductions(
        model, lambda m: m(images, **kwargs),
        lambda out: out.feature_maps[-1] if name == "vitpose" else out.last_hidden_state, STATS)
    assert [model.get_submodule(layer) for layer in rec.layers] == [m for m, _ in calls]
    grid = ((pixels[0] + 4 - 16) // 16 + 1, (pixels[1] + 4 - 16) // 16 + 1) if name == "vitpose" else (
        pixels[0] // patch, pixels[1] // patch)
    check_prefix_and_grid(rec, rec_tokens, [p for _, p in calls], grid, patch, prefix)


# Whole models: the tower that embeds the image is recorded, nothing else (text towers, decoders, language model).
TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=100,
            max_position_embeddings=16)


def _owlv2():
    config = transformers.Owlv2Config(text_config=TEXT, vision_config=dict(**SMALL, intermediate_size=64,
                                                                           image_size=48, patch_size=8),
                                      projection_dim=32)
    inputs = dict(pixel_values=torch.randn(1, 3, 48, 48), input_ids=torch.randint(1, 100, (2, 5)),
                  attention_mask=torch.ones(2, 5, dtype=torch.long))
    return transformers.Owlv2ForObjectDetection(config), inputs, "owlv2", "owlv2.vision_model", lambda o: o.logits


def _clipseg():
    config = transformers.CLIPSegConfig(text_config=TEXT, vision_config=dict(**SMALL, intermediate_size=64,
                                                                             image_size=48, patch_size=8),
                                        projection_dim=32, extract_layers=[0, 1], reduce_dim=16,
                                        decoder_num_attention_heads=2, decoder_intermediate_size=32)
    inputs = dict(pixel_values=torch.randn(2, 3, 48, 48), input_ids=torch.randint(1, 100, (2, 5)),
                  attention_mask=torch.ones(2, 5, dtype=torch.long))
    return (transformers.CLIPSegForImageSegmentation(config), inputs, "clipseg", "clip.vision_model",
            lambda o: o.logits)


def _gemma3():
    text = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1, head_dim=16, sliding_window=16, query_pre_attn_scalar=16, pad_token_id=0,
                bos_token_id=2, eos_token_id=1)
    vision = dict(**SMALL, intermediate_size=64, image_size=48, patch_size=8, vision_use_head=False)  # as Gemma 3's
    config = transformers.Gemma3Config(text_config=text, vision_config=vision,
                                       mm_tokens_per_image=9, boi_token_index=91, eoi_token_index=92,
                                       image_token_index=90)
    ids = torch.tensor([[2, 91] + [90] * 9 + [92, 10, 11]] * 2)
    inputs = dict(input_ids=ids, pixel_values=torch.randn(2, 3, 48, 48), token_type_ids=(ids == 90).long(),
                  attention_mask=torch.ones_like(ids))
    return (transformers.Gemma3ForConditionalGeneration(config), inputs, "siglip", "model.vision_tower",
            lambda o: o.logits)


# name -> (builder: (model, inputs, modeling module of the tower, the tower's name, the output to compare), prefix)
WHOLE_MODELS = {"owlv2_detector": (_owlv2, 1), "clipseg_segmentation": (_clipseg, 1), "gemma3": (_gemma3, 0)}


@pytest.mark.parametrize("name", list(WHOLE_MODELS))
def test_whole_model_records_its_image_tower_against_eager_attention(name):
    build, prefix = WHOLE_MODELS[name]
    torch.manual_seed(0)
    model, inputs, module, tower, output = build()
    model = peaked(sharpened(model))
    torch.manual_seed(1)
    inputs = {k: torch.randn_like(v) if k == "pixel_values" else v for k, v in inputs.items()}
    tower_modules = set(model.get_submodule(tower).modules())
    calls = [c for c in eager_attention_calls(modeling(module), model, **inputs) if c[0] in tower_modules]
    model.set_attn_implementation("sdpa")
    rec, rec_tokens = record_both_reductions(model, lambda m: m(**inputs), output, STATS)
    assert all(layer.startswith(tower + ".") for layer in rec.layers)
    assert [model.get_submodule(layer) for layer in rec.layers] == [m for m, _ in calls]
    check_prefix_and_grid(rec, rec_tokens, [p for _, p in calls], (6, 6), 8, prefix)
