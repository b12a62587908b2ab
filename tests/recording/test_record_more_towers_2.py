"""vitmad.record on transformers 5.25.0 vision towers that no other test named (helper h131 read each one's source):
InternVL and Qianfan-OCR (InternVL's tower, copied: layer scale, qk-norm, mean pooling, optional absolute positions),
alone and inside their vision-language models; Granite Docling's tower (fixed-size tiles) alone and in its model with
a padded batch of tiles; MGP-STR's ViT on a 32 x 128 image (its A^3 token learners are not self-attention);
InstructBLIP-Video's tower alone and in its model (frames folded into the batch); timm ViT and Swin inside
transformers' ``TimmWrapperModel``; TrOCR's ``VisionEncoderDecoderModel`` (a ViT or DeiT encoder, a text decoder).

Tiny random-weight models, sharpened so that attention is far from uniform. The reference is each model's own eager
attention probabilities, placed by the layout written here from each embeddings' source: ``prefix`` tokens without a
position first, then the patches row-major, patch ``(r, c)`` at ``((r + 0.5) * p, (c + 0.5) * p)`` pixels; reduced
in float64 by conftest's ``check_prefix_and_grid``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from test_record_more_towers import modeling, peaked
from test_record_swin import TIMM_CASES, TINY, _check, _timm_probabilities

import vitmad
from conftest import (
    attention_outputs,
    check_prefix_and_grid,
    eager_attention_calls,
    record_both_reductions,
    sharpened,
    unfused_maps,
)
from vitmad.recording.recorder import NoLayerError

transformers = pytest.importorskip("transformers")
timm = pytest.importorskip("timm")

STATS = ["entropy", "prefix_mass", "prefix_maps"]
SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
TEXT = dict(vocab_size=200, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1, head_dim=16, pad_token_id=0, bos_token_id=1, eos_token_id=1)
# Built for 48 x 48, run at 43 x 61 px: a 5 x 7 grid of 8 px patches, the bottom and right edges cut off (not whole
# patches); InternVL's embeddings interpolate their positions to it (bicubic, from the configured 6 x 6) unasked.
PIXELS = (43, 61)

# InternVL's options that change the layer but not where its tokens are: layer scale (lambda_1, lambda_2), qk-norm
# (one RMSNorm over all heads' queries, another over the keys), RMSNorm layers, mean pooling (no final LayerNorm), no
# absolute position embedding (the class token and the patches then differ by content alone).
INTERNVL_OPTIONS = {
    "default": dict(layer_scale_init_value=0.5),
    "qk_norm": dict(layer_scale_init_value=0.5, use_qk_norm=True, norm_type="rms_norm", use_mean_pooling=True,
                    use_absolute_position_embeddings=False),
}
# name -> (modeling module, config class, model class, config, tokens before the grid, forward kwargs)
TOWERS = {
    # The class token, then the patches (InternVLVisionEmbeddings.forward: torch.cat((cls_tokens, embeddings))).
    **{f"internvl_{option}": ("internvl", "InternVLVisionConfig", "InternVLVisionModel", extra, 1, {})
       for option, extra in INTERNVL_OPTIONS.items()},
    # InternVL's tower under other names (a drop path, layers directly under the model): the same layout.
    **{f"qianfan_ocr_{option}": ("qianfan_ocr", "QianfanOCRVisionConfig", "QianfanOCRVisionModel", extra, 1, {})
       for option, extra in INTERNVL_OPTIONS.items()},
    # BLIP's embeddings: the class token, then the patches, positions interpolated when asked.
    "instructblipvideo": ("instructblipvideo", "InstructBlipVideoVisionConfig", "InstructBlipVideoVisionModel", {},
                          1, {"interpolate_pos_encoding": True}),
}


def _tower(name: str) -> torch.nn.Module:
    _, config_name, model_name, extra, _, _ = TOWERS[name]
    config = getattr(transformers, config_name)(**{**SMALL, "image_size": 48, "patch_size": 8, **extra})
    torch.manual_seed(0)
    return peaked(sharpened(getattr(transformers, model_name)(config)))


@pytest.mark.parametrize("name", list(TOWERS))
def test_tower_tokens_after_the_class_token_match_eager_attention(name):
    module, _, _, _, prefix, kwargs = TOWERS[name]
    model = _tower(name)
    images = torch.randn(2, 3, *PIXELS, generator=torch.Generator().manual_seed(1))
    calls = eager_attention_calls(modeling(module), model, images, **kwargs)
    model.set_attn_implementation("sdpa")
    rec, rec_tokens = record_both_reductions(model, lambda m: m(images, **kwargs), lambda out: out.last_hidden_state,
                                             STATS)
    assert [model.get_submodule(layer) for layer in rec.layers] == [m for m, _ in calls]
    check_prefix_and_grid(rec, rec_tokens, [p for _, p in calls], (PIXELS[0] // 8, PIXELS[1] // 8), 8, prefix)


# Whole models: the tower that embeds the image is recorded, nothing else (Q-Former, projector, language model).


def _internvl_like(family: str, feature_layer: int):
    """InternVL or Qianfan-OCR with a tiny Qwen text model, two 48 x 48 images: 36 patches each, pixel-shuffled
    (downsample_ratio 0.5) after the tower to 9 image tokens. The tower runs all its layers whatever
    ``vision_feature_layer`` takes (the others' hidden states are captured, not skipped)."""
    config_class, model_class, text = {
        "internvl": ("InternVLConfig", "InternVLForConditionalGeneration", "qwen2"),
        "qianfan_ocr": ("QianfanOCRConfig", "QianfanOCRForConditionalGeneration", "qwen3"),
    }[family]
    config = getattr(transformers, config_class)(
        vision_config=dict(**SMALL, image_size=48, patch_size=8, use_qk_norm=True), image_token_id=150,
        text_config=dict(TEXT, model_type=text), downsample_ratio=0.5)
    ids = torch.tensor([[1, 2] + [150] * 9 + [3]] * 2)
    inputs = dict(input_ids=ids, pixel_values=torch.randn(2, 3, 48, 48), attention_mask=torch.ones_like(ids),
                  vision_feature_layer=feature_layer)
    return getattr(transformers, model_class)(config), inputs, family, "model.vision_tower", 1, 2, (6, 6)


def _granite_docling():
    """Granite Docling: each sample's tiles (64 x 64, the configured size: its embeddings add a fixed table of
    positions, without a patch mask) padded to the batch's most; ``pixel_attention_mask`` drops the padding tile
    before the tower, which gets the 3 real tiles. 4 image tokens per tile after the pixel shuffle."""
    config = transformers.GraniteDoclingConfig(
        vision_config=dict(**SMALL, image_size=64, patch_size=8, out_hidden_size=32, deepstack_visual_indexes=[0]),
        text_config=TEXT, image_token_id=150)
    ids = torch.tensor([[1] + [150] * 8 + [2], [1] + [150] * 4 + [3, 4, 5, 6, 2]])
    pixels = torch.randn(2, 2, 3, 64, 64)
    pixels[1, 1] = 1e4  # the padding tile: a tower fed it would show
    inputs = dict(input_ids=ids, pixel_values=pixels, pixel_attention_mask=torch.tensor([[True, True], [True, False]]),
                  attention_mask=torch.ones_like(ids))
    return (transformers.GraniteDoclingForConditionalGeneration(config), inputs, "granite_docling",
            "model.vision_model", 0, 3, (8, 8))


def _instructblipvideo():
    """InstructBLIP-Video: 2 clips of 4 frames, folded into a batch of 8 images (clip-major) for the tower."""
    config = transformers.InstructBlipVideoConfig(
        vision_config=dict(**SMALL, image_size=48, patch_size=8),
        qformer_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                            encoder_hidden_size=32, vocab_size=100),
        text_config=dict(model_type="opt", vocab_size=200, hidden_size=32, ffn_dim=64, num_hidden_layers=1,
                         num_attention_heads=2, word_embed_proj_dim=32),
        num_query_tokens=4, video_token_index=150)
    ids = torch.tensor([[150] * 16 + [1, 2, 3]] * 2)
    inputs = dict(input_ids=ids, pixel_values=torch.randn(2, 4, 3, 48, 48), attention_mask=torch.ones_like(ids),
                  qformer_input_ids=torch.randint(1, 100, (2, 5)),
                  qformer_attention_mask=torch.ones(2, 5, dtype=torch.long))
    return (transformers.InstructBlipVideoForConditionalGeneration(config), inputs, "instructblipvideo",
            "vision_model", 1, 8, (6, 6))


# name -> builder: (model, inputs, modeling module of the tower, the tower's name, tokens before the grid, images the
# tower sees, grid of 8 px patches)
WHOLE_MODELS = {
    "internvl_last_layer": lambda: _internvl_like("internvl", -1),
    "internvl_layer_before_last": lambda: _internvl_like("internvl", -2),
    "qianfan_ocr": lambda: _internvl_like("qianfan_ocr", -1),
    "granite_docling_padded_tiles": _granite_docling,
    "instructblipvideo": _instructblipvideo,
}


@pytest.mark.parametrize("name", list(WHOLE_MODELS))
def test_whole_model_records_its_image_tower_against_eager_attention(name):
    torch.manual_seed(0)
    model, inputs, module, tower, prefix, images, grid = WHOLE_MODELS[name]()
    model = peaked(sharpened(model))
    torch.manual_seed(1)
    if name != "granite_docling_padded_tiles":  # its padding tile is kept as set
        inputs["pixel_values"] = torch.randn_like(inputs["pixel_values"])
    tower_modules = set(model.get_submodule(tower).modules())
    calls = [c for c in eager_attention_calls(modeling(module), model, **inputs) if c[0] in tower_modules]
    assert all(p.shape[0] == images for _, p in calls)
    model.set_attn_implementation("sdpa")
    rec, rec_tokens = record_both_reductions(model, lambda m: m(**inputs), lambda o: o.logits, STATS)
    assert all(layer.startswith(tower + ".") for layer in rec.layers)
    assert [model.get_submodule(layer) for layer in rec.layers] == [m for m, _ in calls]
    check_prefix_and_grid(rec, rec_tokens, [p for _, p in calls], grid, 8, prefix)


def test_granite_docling_tower_alone_places_each_tile_on_its_grid():
    """GraniteDoclingVisionModel on 3 tiles: no class token, the 8 x 8 grid of 8 px patches of each tile."""
    config = transformers.GraniteDoclingVisionConfig(**SMALL, image_size=64, patch_size=8, out_hidden_size=32,
                                                     deepstack_visual_indexes=[0])
    torch.manual_seed(0)
    model = peaked(sharpened(transformers.GraniteDoclingVisionModel(config)))
    tiles = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    calls = eager_attention_calls(modeling("granite_docling"), model, tiles)
    model.set_attn_implementation("sdpa")
    rec, rec_tokens = record_both_reductions(model, lambda m: m(tiles), lambda out: out.pooler_output, STATS)
    assert [model.get_submodule(layer) for layer in rec.layers] == [m for m, _ in calls]
    check_prefix_and_grid(rec, rec_tokens, [p for _, p in calls], (8, 8), 8, 0)


def test_instructblipvideo_qformer_attention_is_never_recorded_as_mad():
    """Named, the Q-Former's self-attention over its queries and text and its cross-attention from the queries to
    the tower's output are skipped with the reason: outside the tower, their tokens have no positions vitmad knows."""
    model, inputs, _, _, _, _, _ = _instructblipvideo()
    model.eval()
    with torch.no_grad(), vitmad.record(model, layers=["vision_model.*", "qformer.*"]) as rec:
        model(**inputs)
    assert all(layer.startswith("vision_model.") for layer in rec.layers) and len(rec.layers) == 2
    assert set(rec.skipped) == {"qformer.encoder.layer.0.attention.attention",
                                "qformer.encoder.layer.0.crossattention.attention"}
    assert all(reason.startswith("outside vision_model, the tower that embeds the image")
               for reason in rec.skipped.values())


# MGP-STR: a ViT on 32 x 128 px text lines (the configured size only: its embeddings raise otherwise), 4 px patches,
# the class token first (MgpstrEmbeddings.forward: torch.cat((cls_tokens, patch_embeddings))): an 8 x 32 grid.


def _mgp_str():
    config = transformers.MgpstrConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2.0)
    torch.manual_seed(0)
    model = peaked(sharpened(transformers.MgpstrForSceneTextRecognition(config)))
    with torch.no_grad():
        model.mgp_str.embeddings.pos_embed.normal_()
    return model, torch.randn(2, 3, 32, 128, generator=torch.Generator().manual_seed(1))


def test_mgp_str_vit_on_a_text_line_matches_its_attention_probabilities():
    """Its blocks' attention (its own softmax, returned) placed on the 8 x 32 grid after the class token; the A^3
    modules after the encoder (a softmax over the tokens per character slot, its weights a 1 x 1 convolution: no
    queries among the patches) are not recorded."""
    model, images = _mgp_str()
    maps = attention_outputs(model, lambda m: type(m).__name__ == "MgpstrAttention", lambda m: m(images))
    rec, rec_tokens = record_both_reductions(model, lambda m: m(images), lambda out: torch.cat(out.logits, -1), STATS)
    assert rec.layers == ["mgp_str.encoder.blocks.0.attn", "mgp_str.encoder.blocks.1.attn"]
    check_prefix_and_grid(rec, rec_tokens, maps, (8, 32), 4, 1)


def test_mgp_str_a3_modules_named_alone_are_refused():
    model, images = _mgp_str()
    with pytest.raises(NoLayerError, match=r"layers=\['\*a3_module'\] names \(char_a3_module, bpe_a3_module, "
                                           r"wp_a3_module\): none has"):
        with torch.no_grad(), vitmad.record(model, layers=["*a3_module"]):
            model(images)


# transformers' TimmWrapperModel / TimmWrapperForImageClassification (how hub "timm/..." checkpoints load): the timm
# model is its `timm_model`, placed as it would be alone.


def _timm_wrapper(model_class: str, architecture: str, **model_args) -> torch.nn.Module:
    config = transformers.TimmWrapperConfig(architecture=architecture, model_args=model_args, num_labels=3)
    torch.manual_seed(0)
    return getattr(transformers, model_class)(config).eval()


@pytest.mark.parametrize("model_class", ["TimmWrapperModel", "TimmWrapperForImageClassification"])
@pytest.mark.parametrize("hidden_states", [False, True], ids=["forward", "forward_intermediates"])
def test_timm_wrapper_vit_is_recorded_as_the_bare_timm_vit(model_class, hidden_states):
    """A timm ViT with 2 registers: its class token, then the registers (timm's _pos_embed), then a 5 x 7 grid of
    8 px patches; through the wrapper's forward_features / forward, or forward_intermediates when it is asked for
    hidden states. The same numbers as the bare timm model, and as its unfused softmax placed so."""
    model = sharpened(_timm_wrapper(model_class, "vit_tiny_patch16_224", img_size=(40, 56), patch_size=8,
                                    embed_dim=32, depth=2, num_heads=2, reg_tokens=2))
    with torch.no_grad():
        for name in ("pos_embed", "cls_token", "reg_token"):
            getattr(model.timm_model, name).normal_()
    images = torch.randn(2, 3, 40, 56, generator=torch.Generator().manual_seed(1))
    kwargs = {"output_hidden_states": True} if hidden_states else {}
    output = (lambda out: out.logits) if model_class.endswith("Classification") else (
        lambda out: out.last_hidden_state)
    rec, rec_tokens = record_both_reductions(model, lambda m: m(images, **kwargs), output, STATS)
    bare = copy.deepcopy(model.timm_model)  # fused, as the wrapper's
    bare_rec, _ = record_both_reductions(bare, lambda m: m(images), lambda out: out, STATS)
    assert rec.layers == [f"timm_model.{layer}" for layer in bare_rec.layers] == [
        "timm_model.blocks.0.attn", "timm_model.blocks.1.attn"]
    assert rec.geometry == bare_rec.geometry
    for ours, theirs in zip(rec.per_layer, bare_rec.per_layer, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    eager = copy.deepcopy(model.timm_model)
    maps = unfused_maps(eager, "Attention")
    with torch.no_grad():
        eager(images)
    check_prefix_and_grid(rec, rec_tokens, [p.double() for _, p in maps], (5, 7), 8, 3)


@pytest.mark.parametrize("case", ["padded", "clamped"])
def test_timm_wrapper_swin_is_recorded_as_the_bare_timm_swin(case):
    """A timm Swin inside TimmWrapperForImageClassification: its shifted, padded windows per stage, at the strides
    of its own feature_info, as test_record_swin.py's reference places them for the bare model."""
    kwargs, image, table = TIMM_CASES[case]
    model = _timm_wrapper("TimmWrapperForImageClassification", "swin_tiny_patch4_window7_224", **TINY, **kwargs)
    bare = copy.deepcopy(model.timm_model)  # fused, as the wrapper's
    eager = copy.deepcopy(model.timm_model)
    probabilities = _timm_probabilities(eager)
    pixels = torch.randn(2, 3, *image, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = model(pixels).logits
        with vitmad.record(model, reduction="none") as rec:
            recorded = model(pixels).logits
        with vitmad.record(bare, reduction="none") as bare_rec:
            bare(pixels)
        eager(pixels)
    assert torch.equal(recorded, plain)
    assert rec.layers == [f"timm_model.{layer}" for layer in bare_rec.layers]
    assert rec.geometry == bare_rec.geometry
    for ours, theirs in zip(rec.per_layer, bare_rec.per_layer, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    _check(rec, probabilities, pixels.shape[0], table, roll_first=True)


# TrOCR: VisionEncoderDecoderModel with a ViT or DeiT encoder and TrOCR's causal text decoder, which attends to
# itself and to the encoder's output.

ENCODERS = {
    # ViT: the class token first (ViTEmbeddings.forward); DeiT: the class, then the distillation token.
    "vit": ("ViTConfig", "vit", 1),
    "deit": ("DeiTConfig", "deit", 2),
}


def _trocr(encoder: str) -> tuple[torch.nn.Module, dict]:
    config_name, _, _ = ENCODERS[encoder]
    decoder = transformers.TrOCRConfig(vocab_size=100, d_model=32, decoder_layers=1, decoder_attention_heads=2,
                                       decoder_ffn_dim=64, max_position_embeddings=32)
    config = transformers.VisionEncoderDecoderConfig.from_encoder_decoder_configs(
        getattr(transformers, config_name)(**SMALL, image_size=48, patch_size=8), decoder)
    torch.manual_seed(0)
    model = peaked(sharpened(transformers.VisionEncoderDecoderModel(config)))
    inputs = dict(pixel_values=torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(1)),
                  decoder_input_ids=torch.randint(1, 100, (2, 5), generator=torch.Generator().manual_seed(2)))
    return model, inputs


@pytest.mark.parametrize("encoder", list(ENCODERS))
def test_trocr_records_its_image_encoder_alone(encoder):
    _, module, prefix = ENCODERS[encoder]
    model, inputs = _trocr(encoder)
    calls = eager_attention_calls(modeling(module), model, switched=model.encoder, **inputs)
    model.encoder.set_attn_implementation("sdpa")
    rec, rec_tokens = record_both_reductions(model, lambda m: m(**inputs), lambda out: out.logits, STATS)
    assert rec.layers == ["encoder.layers.0.attention", "encoder.layers.1.attention"]
    assert [model.get_submodule(layer) for layer in rec.layers] == [m for m, _ in calls]
    check_prefix_and_grid(rec, rec_tokens, [p for _, p in calls], (6, 6), 8, prefix)


def test_trocr_decoder_attention_is_skipped_when_named_and_refused_when_forced():
    """The decoder's causal self-attention over text and its cross-attention from text to the image: named, skipped
    with the reason (outside the encoder); given a layout anyway, refused (not self-attention [B, H, N, N] over
    positioned tokens), never a MAD."""
    model, inputs = _trocr("vit")
    with torch.no_grad(), vitmad.record(model, layers=["*attn", "encoder.*.attention"]) as rec:
        model(**inputs)
    assert rec.layers == ["encoder.layers.0.attention", "encoder.layers.1.attention"]
    decoder = "decoder.model.decoder.layers.0."
    assert set(rec.skipped) == {decoder + "self_attn", decoder + "encoder_attn"}
    assert all(reason.startswith("outside encoder, the tower that embeds the image") for reason in rec.skipped.values())
    # Batch and heads merged ([B * H, queries, keys]: TrOCRAttention's own softmax); 5 text queries, 37 image keys.
    for layer, seen in (("self_attn", r"\[4, 5, 5\]"),
                        ("encoder_attn", r"\[4, 5, 37\] \(its queries are not its keys\)")):
        with pytest.raises(ValueError, match=rf"decoder\.model\.decoder\.layers\.0\.{layer} \(TrOCRAttention\) of "
                                             rf"VisionEncoderDecoderModel: its attention has shape {seen}"):
            with torch.no_grad(), vitmad.record(model, layers=[f"decoder.*{layer}"], num_prefix_tokens=1):
                model(**inputs)
