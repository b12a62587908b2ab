"""vitmad.record on SAM's windowed ViT encoder where other transformers models carry a copy of it: GOT-OCR2's vision
tower (``GotOcr2VisionEncoder``, also PP-Chart2Table's: its config builds ``GotOcr2ForConditionalGeneration``),
PP-FormulaNet's (``PPFormulaNetVisionModel``) and SLANeXt's (``SLANeXtVisionEncoder``).

Their attention and block classes are SAM's ``SamVisionAttention`` and ``SamVisionLayer`` copied by transformers'
modular converter (renamed, same code): each block pads its ``H x W`` token map at the bottom and right to a
multiple of its window, partitions it into windows in row-major window order, tokens row-major within a window,
and attends within each window, or, in a global block (``global_attn_indexes``), over the whole map; the padding
is not masked. The attention computes its own softmax (eager only: none of them has an SDPA class) over
``[B * windows * heads, N, N]``, batch, then window, then head, and returns those probabilities as its second
output, which is the reference here. A padding slot is a key at its cell of the padded grid, past the image edge,
and no query (docs/definition.md, windows). Tokens are ``patch_size`` pixels apart; the neck and the projectors
after the blocks are convolutions, no attention.

The patch embedding takes only the configured square image size, so padding comes from a map that the window does
not divide (80 px / 8 = 10 tokens, windows of 4: padded to 12; 56 px: 7 tokens, windows of 3: padded to 9).
"""

from __future__ import annotations

import pytest
import torch

import vitmad
from conftest import attention_outputs, check_sam_windows, record_both_reductions, sam_random_tables

transformers = pytest.importorskip("transformers")

STATS = ["entropy", "self_mass", "prefix_mass"]
HEADS, BATCH = 2, 2


def _tower(image: int, window: int) -> dict:
    # Blocks 0 and 2 windowed, block 1 global.
    return dict(hidden_size=32, output_channels=16, num_hidden_layers=3, num_attention_heads=HEADS, image_size=image,
                patch_size=8, window_size=window, global_attn_indexes=[1], mlp_dim=64)


def _formula_tower(image: int, window: int) -> dict:
    return dict(_tower(image, window), post_conv_in_channels=16, post_conv_out_channels=32, post_conv_mid_channels=16,
                decoder_hidden_size=32)


def _modeling(name: str):
    return pytest.importorskip(f"transformers.models.{name}.modeling_{name}")


# name -> (build(image, window, implementation) -> the tower, its attention class name)
TOWERS = {
    "got_ocr2": (lambda i, w, impl: _modeling("got_ocr2").GotOcr2VisionEncoder._from_config(
        transformers.GotOcr2VisionConfig(**_tower(i, w)), attn_implementation=impl), "GotOcr2VisionAttention"),
    "pp_chart2table": (lambda i, w, impl: _modeling("got_ocr2").GotOcr2VisionEncoder._from_config(
        transformers.PPChart2TableVisionConfig(**_tower(i, w)), attn_implementation=impl), "GotOcr2VisionAttention"),
    "pp_formulanet": (lambda i, w, impl: _modeling("pp_formulanet").PPFormulaNetVisionModel._from_config(
        transformers.PPFormulaNetVisionConfig(**_formula_tower(i, w)), attn_implementation=impl),
        "PPFormulaNetVisionAttention"),
    "slanext": (lambda i, w, impl: _modeling("slanext").SLANeXtVisionEncoder._from_config(
        transformers.SLANeXtVisionConfig(**_tower(i, w)), attn_implementation=impl), "SLANeXtVisionAttention"),
}
# The attention implementations each tower accepts: PP-FormulaNet's model class takes "sdpa" (for its text
# decoder), and its vision blocks still build the eager attention; the others refuse "sdpa".
IMPLEMENTATIONS = {"got_ocr2": ["eager"], "pp_chart2table": ["eager"], "pp_formulanet": ["eager", "sdpa"],
                   "slanext": ["eager"]}
SIZES = {"padded-10-in-4": (80, 4), "padded-7-in-3": (56, 3), "whole-8-in-4": (64, 4)}


def _check(model, attention_class: str, run, output, size: int, window: int, *, layers: list[str]) -> None:
    """The recording of ``model`` (every statistic, both reductions) against its attention's own probabilities
    placed by conftest's :func:`padded_window_reference`; the output unchanged, bit for bit."""
    rec, rec_tokens = record_both_reductions(model, run, output, STATS)
    maps = attention_outputs(model, lambda m: type(m).__name__ == attention_class, run)
    assert rec.layers == layers
    check_sam_windows(rec, rec_tokens, maps, size, size, window, 8.0, BATCH, HEADS)


@pytest.mark.parametrize("size_window", list(SIZES.values()), ids=list(SIZES))
@pytest.mark.parametrize("name,implementation",
                         [(n, impl) for n, impls in IMPLEMENTATIONS.items() for impl in impls])
def test_sam_like_tower_matches_its_own_attention(name, implementation, size_window):
    image, window = size_window
    build, attention_class = TOWERS[name]
    torch.manual_seed(0)
    model = sam_random_tables(build(image, window, implementation))
    assert all(type(m).__name__ == attention_class for n, m in model.named_modules() if n.endswith(".attn"))
    pixels = torch.randn(BATCH, 3, image, image)
    _check(model, attention_class, lambda m: m(pixels), lambda out: out.last_hidden_state, image // 8, window,
           layers=[f"layers.{i}.attn" for i in range(3)])


def _text() -> dict:
    return dict(model_type="qwen2", hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1, vocab_size=64)


def _got_ocr2(config_class):
    # 80 px: a 10 x 10 map, the neck keeps it, the projector's two stride-2 convolutions make 3 x 3 image tokens.
    config = config_class(vision_config=_tower(80, 4), text_config=_text(), image_token_index=5, image_seq_length=9)
    model = transformers.GotOcr2ForConditionalGeneration(config)
    ids = torch.tensor([[1, 2] + [5] * 9 + [3, 4]] * BATCH)
    return model, lambda pixels: (lambda m: m(input_ids=ids, pixel_values=pixels)), "model.vision_tower"


def _pp_formulanet():
    text = dict(vocab_size=64, d_model=32, decoder_layers=1, decoder_ffn_dim=64, decoder_attention_heads=2,
                max_position_embeddings=64)
    config = transformers.PPFormulaNetConfig(vision_config=_formula_tower(80, 4), text_config=text)
    model = transformers.PPFormulaNetForConditionalGeneration(config)
    ids = torch.tensor([[2, 7, 8]] * BATCH)
    return model, lambda pixels: (lambda m: m(pixel_values=pixels, decoder_input_ids=ids)), "model.encoder"


def _slanext():
    config = transformers.SLANeXtConfig(vision_config=_tower(80, 4), post_conv_in_channels=16,
                                        post_conv_out_channels=32, hidden_size=32, out_channels=10, max_text_length=5)
    model = transformers.SLANeXtForTableRecognition(config)
    return model, lambda pixels: (lambda m: m(pixel_values=pixels)), "backbone.vision_tower"


FULL_MODELS = {
    "got_ocr2": (lambda: _got_ocr2(transformers.GotOcr2Config), "GotOcr2VisionAttention", "logits"),
    "pp_chart2table": (lambda: _got_ocr2(transformers.PPChart2TableConfig), "GotOcr2VisionAttention", "logits"),
    "pp_formulanet": (_pp_formulanet, "PPFormulaNetVisionAttention", "logits"),
    "slanext": (_slanext, "SLANeXtVisionAttention", "last_hidden_state"),
}


@pytest.mark.parametrize("name", list(FULL_MODELS))
def test_full_model_records_its_image_tower_alone(name):
    """The whole model (a language model, a formula decoder, a table head beside the tower): its image tower's
    blocks are recorded, placed as the tower alone is, and nothing else (no other layer is skipped either: the
    decoders' attention is not the tower's, and is not taken for it)."""
    build, attention_class, field = FULL_MODELS[name]
    torch.manual_seed(0)
    model, call, tower = build()
    sam_random_tables(model)
    _check(model, attention_class, call(torch.randn(BATCH, 3, 80, 80)), lambda out: getattr(out, field), 10, 4,
           layers=[f"{tower}.layers.{i}.attn" for i in range(3)])
    with torch.no_grad(), vitmad.record(model) as rec:
        call(torch.randn(BATCH, 3, 80, 80))(model)
    assert rec.skipped == {}


# --- SAM-style models whose mask convolutions are no patch embedding ---------------------------------------------

def _edgetam():
    """EdgeTAM: a RepViT image encoder (timm, convolutions only) and SAM2's prompt encoder and mask decoder."""
    backbone = transformers.TimmWrapperConfig(architecture="repvit_m0_9", model_args={
        "in_chans": 3, "features_only": True, "out_indices": [0, 1, 2, 3]})
    config = transformers.EdgeTamConfig(
        vision_config=dict(model_type="edgetam_vision_model", backbone_config=backbone,
                           backbone_channel_list=[384, 192, 96, 48], backbone_feature_sizes=[[16, 16], [8, 8], [4, 4]],
                           fpn_hidden_size=32),
        prompt_encoder_config=dict(hidden_size=32, image_size=64, patch_size=16, mask_input_channels=4),
        mask_decoder_config=dict(hidden_size=32, mlp_dim=64, num_hidden_layers=1, num_attention_heads=2,
                                 iou_head_hidden_dim=32))
    torch.manual_seed(0)
    return transformers.EdgeTamModel(config).eval()


def test_edgetam_says_its_attention_all_lies_outside_its_image_tower():
    """The prompt encoder's mask convolution (2 x 2, stride 2) was taken for the patch embedding, its prompt encoder
    for the image tower, and the model said it had no attention layer at all (found by QA). Its image tower is the
    RepViT, without attention; its mask decoder's two-way transformer is skipped with the reason when named."""
    model = _edgetam()
    with pytest.raises(ValueError, match=r"found no attention layer in vision_encoder, the tower of EdgeTamModel that "
                                         r"embeds the image; its attention layers \(mask_decoder\.transformer\.layers"
                                         r"\.0\.self_attn, .*\) all lie outside it"):
        vitmad.record(model)
    with pytest.raises(ValueError, match=r"EdgeTamModel has no layer with spatial softmax attention .*"
                                         r"mask_decoder\.transformer\.layers\.0\.self_attn: two-way transformer of the "
                                         r"mask decoder"):
        vitmad.record(model, layers=["mask_decoder.*"])


def test_sam2_video_plain_layout_never_takes_a_mask_convolution_for_the_patch_embedding():
    """SAM2-video embeds the image with HieraDet's overlapping 7 x 7 convolution of stride 4; its prompt encoder's
    mask_embed.conv1 (2 x 2, stride 2) and its mask_downsample (4 x 4, stride 4) embed masks. A layout given by hand
    (num_prefix_tokens=) named the prompt encoder's convolution as the patch embedding in its refusal (found by QA)."""
    from vitmad.recording.families.plain import PlainLayout

    hiera = dict(model_type="sam2_hiera_det_model", hidden_size=16, num_attention_heads=1, image_size=[64, 64],
                 blocks_per_stage=[1, 1, 1, 1], embed_dim_per_stage=[16, 32, 64, 128],
                 num_attention_heads_per_stage=[1, 1, 2, 2], window_size_per_stage=[4, 4, 4, 4],
                 global_attention_blocks=[2], window_positional_embedding_background_size=[4, 4])
    config = transformers.Sam2VideoConfig(
        vision_config=dict(model_type="sam2_vision_model", backbone_config=hiera,
                           backbone_channel_list=[128, 64, 32, 16], backbone_feature_sizes=[[16, 16], [8, 8], [4, 4]],
                           fpn_hidden_size=32),
        prompt_encoder_config=dict(hidden_size=32, image_size=64, patch_size=16, mask_input_channels=4),
        mask_decoder_config=dict(hidden_size=32, mlp_dim=64, num_hidden_layers=1, num_attention_heads=2,
                                 iou_head_hidden_dim=32),
        image_size=64, memory_attention_hidden_size=32, memory_attention_num_layers=1,
        memory_attention_rope_feat_sizes=[4, 4], memory_encoder_hidden_size=32, mask_downsampler_embed_dim=32,
        memory_fuser_embed_dim=32, memory_fuser_intermediate_dim=64)
    model = transformers.Sam2VideoModel(config).eval()
    embedding = PlainLayout(model, None, None, 0).embedding
    assert embedding is not None and embedding[0] == "vision_encoder.backbone.patch_embed.projection"


def test_mask_decoder_named_by_a_wildcard_skips_its_attention_modules_alone():
    """SAM's two-way transformer is skipped with the reason; a wildcard over the mask decoder also names its norms,
    projections and MLPs, which were listed as skipped too (every module under the two-way transformer)."""
    config = transformers.SamConfig(
        vision_config=dict(hidden_size=32, output_channels=16, num_hidden_layers=2, num_attention_heads=2,
                           image_size=64, patch_size=8, window_size=4, global_attn_indexes=[1], mlp_dim=64,
                           num_pos_feats=8),
        prompt_encoder_config=dict(hidden_size=16, image_size=64, patch_size=8, mask_input_channels=4),
        mask_decoder_config=dict(hidden_size=16, num_attention_heads=2, mlp_dim=32, iou_head_hidden_dim=16))
    torch.manual_seed(0)
    model = transformers.SamModel(config).eval()
    with torch.no_grad(), vitmad.record(model, layers=["vision_encoder.*", "mask_decoder.*"]) as rec:
        model(pixel_values=torch.randn(1, 3, 64, 64), input_points=torch.rand(1, 1, 1, 2) * 64)
    assert rec.layers == ["vision_encoder.layers.0.attn", "vision_encoder.layers.1.attn"]
    two_way = "mask_decoder.transformer"
    assert list(rec.skipped) == [f"{two_way}.layers.{i}.{attention}" for i in range(2) for attention in
                                 ("self_attn", "cross_attn_token_to_image", "cross_attn_image_to_token")] + [
        f"{two_way}.final_attn_token_to_image"]
    assert all(reason.startswith("two-way transformer of the mask decoder") for reason in rec.skipped.values())
