"""vitmad.record on transformers 5.25.0 ViT-like towers that no other test names (QA helper-111 checked them by hand):
AltCLIP, Chinese-CLIP, MetaCLIP 2, MLCD (2-D RoPE), OWL-ViT, OWLv2, CLIPSeg, BLIP-2, InstructBLIP, TIPSv2 (class token,
then registers), Pixio (8 class tokens), Sapiens2 (class token and registers, grouped key heads), Janus and VitPose
(no prefix token; VitPose's patch convolution pads 2 px), and Gemma 3's SigLIP tower inside the whole model. X-CLIP's
tower is tested in test_record_plain_layouts.py.

Tiny random-weight towers (32 wide, 2 layers, 2 heads), sharpened so that attention is far from uniform. The reference
is each model's own eager attention probabilities (its modeling file's ``eager_attention_forward``), placed by the
layout written here from each embeddings' source: ``prefix`` tokens without a position first (the class token, then
the registers, ``torch.cat([cls, registers, patches])``), then the patches row-major, patch ``(r, c)`` at
``((r + 0.5) * p, (c + 0.5) * p)`` pixels; reduced in float64 by conftest's ``statistics_reference``.
"""

from __future__ import annotations

import importlib
import math

import pytest
import torch

import vitmad
from conftest import eager_attention_calls, grid_centres, sharpened, statistics_reference

transformers = pytest.importorskip("transformers")

# Recorded float32 (flash-MAD on the fused path's q / k) against float64 on the eager float32 probabilities: the two
# softmaxes differ by float32 rounding. MADs here are 5 to 40 px; entropies 0.5 to 3.5 nats; masses and maps <= 1.
TOL = {"rtol": 1e-5, "atol": 1e-4}  # atol in pixels
STAT_TOL = {"rtol": 1e-5, "atol": 1e-6}
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


def _modeling(module: str):
    return importlib.import_module(f"transformers.models.{module}.modeling_{module}")


def _tower(name: str) -> torch.nn.Module:
    module, config_name, model_name, extra, _, patch, _, _ = TOWERS[name]
    config = getattr(transformers, config_name)(**{**SMALL, "image_size": 48, "patch_size": patch, **extra})
    torch.manual_seed(0)
    return _peaked(sharpened(getattr(transformers, model_name)(config)))


def _peaked(model: torch.nn.Module) -> torch.nn.Module:
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


def _check(rec, rec_tokens, calls, grid, patch, prefix) -> None:
    """Both recordings against the eager ``calls`` ``[(module, [B, H, N, N])]``, one per recorded layer, placed as
    ``prefix`` tokens without a position, then the row-major ``grid`` of ``patch`` px patches."""
    positions = torch.cat([torch.full((prefix, 2), math.nan, dtype=torch.float64), grid_centres(grid, patch)])
    assert len(rec.layers) == len(calls) == 2 and rec.skipped == {}
    for layer, (_, probabilities) in enumerate(calls):
        geometry = rec.geometry[layer]
        assert geometry.grid == grid and geometry.stride == (patch, patch) and geometry.num_prefix_tokens == prefix
        expected = statistics_reference(probabilities, positions)
        # Far from uniform attention: a token placed at a wrong cell would change the MAD.
        assert float(expected["entropy"].mean()) < 0.75 * math.log(probabilities.shape[-1])
        torch.testing.assert_close(rec_tokens.per_layer[layer].double(), expected["mad"], **TOL)
        torch.testing.assert_close(rec.per_layer[layer].double(), expected["mad"].mean(-1), **TOL)
        for stat in ("entropy", "prefix_mass"):
            torch.testing.assert_close(rec_tokens.stats[stat][layer].double(), expected[stat], **STAT_TOL)
            torch.testing.assert_close(rec.stats[stat][layer].double(), expected[stat].mean(-1), **STAT_TOL)
        if prefix:
            torch.testing.assert_close(rec.prefix_maps[layer].double(), expected["prefix_maps"], **STAT_TOL)
        else:
            assert rec.prefix_maps[layer] is None


def _record(model, run, output):
    """``(mean recording, per-token recording)`` of ``run(model)`` with STATS; the output (``output`` of what ``run``
    returns) the plain forward's, bit for bit."""
    with torch.no_grad():
        plain = output(run(model))
        with vitmad.record(model, stats=STATS) as rec:
            recorded = output(run(model))
        with vitmad.record(model, stats=STATS, reduction="none") as rec_tokens:
            run(model)
    assert torch.equal(plain, recorded)
    assert rec.layers == rec_tokens.layers
    return rec, rec_tokens


@pytest.mark.parametrize("name", list(TOWERS))
def test_tower_tokens_after_their_prefix_match_eager_attention(name):
    module, _, _, _, prefix, patch, pixels, kwargs = TOWERS[name]
    model = _tower(name)
    images = torch.randn(2, 3, *pixels, generator=torch.Generator().manual_seed(1))
    calls = eager_attention_calls(_modeling(module), model, images, **kwargs)
    model.set_attn_implementation("eager" if name == "vitpose" else "sdpa")  # VitPose has no SDPA path
    rec, rec_tokens = _record(model, lambda m: m(images, **kwargs),
                              lambda out: out.feature_maps[-1] if name == "vitpose" else out.last_hidden_state)
    assert [model.get_submodule(layer) for layer in rec.layers] == [m for m, _ in calls]
    grid = ((pixels[0] + 4 - 16) // 16 + 1, (pixels[1] + 4 - 16) // 16 + 1) if name == "vitpose" else (
        pixels[0] // patch, pixels[1] // patch)
    _check(rec, rec_tokens, calls, grid, patch, prefix)


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
    model = _peaked(sharpened(model))
    torch.manual_seed(1)
    inputs = {k: torch.randn_like(v) if k == "pixel_values" else v for k, v in inputs.items()}
    tower_modules = set(model.get_submodule(tower).modules())
    calls = [c for c in eager_attention_calls(_modeling(module), model, **inputs) if c[0] in tower_modules]
    model.set_attn_implementation("sdpa")
    rec, rec_tokens = _record(model, lambda m: m(**inputs), output)
    assert all(layer.startswith(tower + ".") for layer in rec.layers)
    assert [model.get_submodule(layer) for layer in rec.layers] == [m for m, _ in calls]
    _check(rec, rec_tokens, calls, (6, 6), 8, prefix)
