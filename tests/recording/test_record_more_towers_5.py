"""vitmad.record on transformers 5.25.0 model types that no other test named (QA helper h144 checked them by hand):
DiffusionGemma, Gemma 4 Unified, EmbeddingGemma 2, T5Gemma 2, Granite 4 Vision, Inkling2-Loop, TIPSv2-DPT and SAM3
LiteText.

Their towers are covered elsewhere (Gemma 4's vision model in test_record_naflex.py, SigLIP and CLIP towers in
test_record_more_towers.py, Inkling2's in test_record_packed_prefix.py, TIPSv2's in test_record_more_towers.py,
SAM3's ViT in test_record_sam3.py); what is new is the model around them: a language model that runs bidirectionally
over the image's soft tokens (DiffusionGemma's encoder and diffusion decoder, EmbeddingGemma 2, T5Gemma 2's
encoder), one that takes raw patches with no tower at all (Gemma 4 Unified), a Window Q-Former projector (Granite 4
Vision), attention residuals over layers (Inkling2-Loop), a DPT head (TIPSv2-DPT) and a MobileCLIP text encoder
whose pointwise 1 x 1 convolutions have kernel == stride (SAM3 LiteText). Each whole model records its tower alone,
against the tower's own eager attention probabilities (its modeling file's ``eager_attention_forward``), placed by
the layout written here from the modeling sources, and never its language model, text encoder or projector.
"""

from __future__ import annotations

import pytest
import torch

import vitmad
from conftest import check_prefix_and_grid, eager_attention_calls, record_both_reductions, sharpened
from vitmad.ops.reference import mad_positions_reference
from vitmad.recording.recorder import NoLayerError

transformers = pytest.importorskip("transformers")
from test_record_more_towers import peaked  # noqa: E402
from test_record_packed_prefix import MERGE, MERGE_PATCH, _check, _far_from_uniform, _merge_blocks, _references  # noqa: E402
from test_record_sam3 import FPN, IMAGE, PATCH, VISION, WINDOW, _random_tables, _vit_maps  # noqa: E402
from test_record_sam3 import _check as _check_sam3  # noqa: E402

STATS = ["entropy", "prefix_mass", "prefix_maps"]
TOL = {"rtol": 1e-5, "atol": 1e-4}  # pixels: float32 attention against a float64 reference
OUTSIDE = r"outside {tower}, the tower that embeds the image"


def _modeling(name: str):
    return getattr(transformers.models, name).__dict__[f"modeling_{name}"]


def _tower_calls(model: torch.nn.Module, tower: str, modeling, **inputs) -> list:
    """The eager calls of ``modeling``'s attention function made by the modules of ``model.<tower>``."""
    modules = set(model.get_submodule(tower).modules())
    return [(m, p) for m, p in eager_attention_calls(modeling, model, **inputs) if m in modules]


def _refused_outside(model: torch.nn.Module, layers: list[str], tower: str, run) -> None:
    """Naming ``layers`` (a language model's, a projector's) is refused as outside ``tower``, never placed."""
    with pytest.raises(NoLayerError, match=OUTSIDE.format(tower=tower)):
        with torch.no_grad(), vitmad.record(model, layers=layers):
            run()


# Gemma 4's vision tower in DiffusionGemma and EmbeddingGemma 2 -----------------------------------------------------
# Gemma4VisionModel (modeling_gemma4.py) takes pre-cut patches [B, slots, 3 p^2] and pixel_position_ids (x, y) per
# slot, (-1, -1) for padding, masked as keys; each image of the batch on its own grid: slot i of an h x w image is
# patch (i // w, i % w) at ((r + 0.5) p, (c + 0.5) p) px, the padding slots without a position. Its pooler merges
# 2 x 2 patches into one soft token per block and drops the padding: (h / 2) (w / 2) image tokens per image.

GEMMA4_PATCH = 8
GEMMA4_VISION = dict(model_type="gemma4_vision", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=2, num_key_value_heads=2, head_dim=16, pooling_kernel_size=2,
                     patch_size=GEMMA4_PATCH, position_embedding_size=64)
GEMMA4_GRIDS = [(4, 6), (2, 4)]
GEMMA4_SLOTS = 24
GEMMA4_SOFT_TOKENS = sum(h * w // 4 for h, w in GEMMA4_GRIDS)
GEMMA4_LAYERS = [f"vision_tower.encoder.layers.{i}.self_attn" for i in range(2)]
GEMMA_TEXT = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, head_dim=16, sliding_window=8,
                  layer_types=["sliding_attention", "full_attention"])
IMAGE_TOKEN, BOI, EOI = 100, 101, 102


def _gemma4_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    """(pixel_values, pixel_position_ids) of GEMMA4_GRIDS padded to GEMMA4_SLOTS slots, as its processor packs."""
    ids = []
    for h, w in GEMMA4_GRIDS:
        rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        xy = torch.stack([cols, rows], -1).reshape(-1, 2)
        ids.append(torch.cat([xy, torch.full((GEMMA4_SLOTS - h * w, 2), -1)]))
    pixels = torch.rand(len(GEMMA4_GRIDS), GEMMA4_SLOTS, 3 * GEMMA4_PATCH ** 2,
                        generator=torch.Generator().manual_seed(1))
    return pixels, torch.stack(ids)


def _gemma4_positions() -> torch.Tensor:
    """``[B, 1, slots, 2]`` pixel centres, row-major per image, NaN at its padding slots."""
    out = torch.full((len(GEMMA4_GRIDS), 1, GEMMA4_SLOTS, 2), float("nan"), dtype=torch.float64)
    for i, (h, w) in enumerate(GEMMA4_GRIDS):
        rows = (torch.arange(h, dtype=torch.float64) + 0.5) * GEMMA4_PATCH
        cols = (torch.arange(w, dtype=torch.float64) + 0.5) * GEMMA4_PATCH
        out[i, 0, :h * w] = torch.cartesian_prod(rows, cols)
    return out


def _peaked_gemma4(model: torch.nn.Module, tower: str) -> torch.nn.Module:
    """The tower's matrices drawn with std 0.3 (its initial ones give near-uniform attention)."""
    with torch.no_grad():
        for parameter in model.get_submodule(tower).parameters():
            if parameter.dim() > 1:
                parameter.normal_(0, 0.3)
    return model.eval()


def _check_gemma4(model, inputs: dict, tower: str, output) -> None:
    """The whole model's recording holds the Gemma 4 tower's layers alone, each image on its own grid, against the
    tower's eager probabilities; the model's output is unchanged, bit for bit."""
    calls = _tower_calls(model, tower, _modeling("gemma4"), **inputs)
    assert len(calls) == 2
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        plain = output(model(**inputs))
        with vitmad.record(model) as rec:
            recorded = output(model(**inputs))
    assert torch.equal(plain, recorded)
    assert rec.layers == [f"{tower}.{layer.partition('.')[2]}" for layer in GEMMA4_LAYERS] and rec.skipped == {}
    placed = _gemma4_positions()
    for recorded_mad, geometry, (_, probabilities) in zip(rec.per_layer, rec.geometry, calls, strict=True):
        assert geometry.image_grids == tuple(GEMMA4_GRIDS) and geometry.stride == (8.0, 8.0)
        assert probabilities.amax(-1)[:, :, :GEMMA4_GRIDS[1][0] * GEMMA4_GRIDS[1][1]].mean() > 0.3  # far from uniform
        torch.testing.assert_close(recorded_mad.double(), mad_positions_reference(probabilities, placed), **TOL)


def _diffusion_gemma():
    text = dict(GEMMA_TEXT, use_bidirectional_attention="vision", num_experts=2, top_k_experts=1,
                moe_intermediate_size=16)
    config = transformers.DiffusionGemmaConfig(text_config=text, vision_config=GEMMA4_VISION,
                                               image_token_id=IMAGE_TOKEN, boi_token_id=BOI, eoi_token_id=EOI,
                                               canvas_length=4)
    torch.manual_seed(0)
    model = _peaked_gemma4(transformers.DiffusionGemmaModel(config), "encoder.vision_tower")
    pixels, ids = _gemma4_inputs()
    tokens = [2, BOI] + [IMAGE_TOKEN] * GEMMA4_SOFT_TOKENS + [EOI, 10, 11]
    inputs = dict(input_ids=torch.tensor([tokens]), pixel_values=pixels, image_position_ids=ids,
                  mm_token_type_ids=torch.tensor([[int(t == IMAGE_TOKEN) for t in tokens]]),
                  decoder_input_ids=torch.tensor([[5, 6, 7, 8]]))
    return model, inputs


def test_diffusion_gemma_records_its_gemma4_tower_never_its_bidirectional_encoder_or_decoder():
    """DiffusionGemmaModel: the encoder's language model attends bidirectionally over the image's soft tokens
    (use_bidirectional_attention="vision") and the diffusion decoder bidirectionally over the canvas and the
    encoder's cache: neither is the tower, neither is recorded, and named they are refused as outside it."""
    model, inputs = _diffusion_gemma()
    _check_gemma4(model, inputs, "encoder.vision_tower", lambda out: out.last_hidden_state)
    _refused_outside(model, ["encoder.language_model.*", "decoder.layers.*"], "encoder.vision_tower",
                     lambda: model(**inputs))


def test_embedding_gemma2_records_its_gemma4_tower_and_refuses_its_text_encoder():
    """EmbeddingGemma2Model: its text encoder is bidirectional (is_causal False) over text and soft tokens; the
    whole model records the Gemma 4 tower alone; the text model recorded alone is refused as text, no image."""
    config = transformers.EmbeddingGemma2Config(
        text_config=dict(GEMMA_TEXT, hidden_size_per_layer_input=8, embedding_dim=16), vision_config=GEMMA4_VISION,
        image_token_id=IMAGE_TOKEN, boi_token_id=BOI, eoi_token_id=EOI, video_token_id=103, audio_token_id=104,
        boa_token_id=105)
    torch.manual_seed(0)
    model = _peaked_gemma4(transformers.EmbeddingGemma2Model(config), "vision_tower")
    pixels, ids = _gemma4_inputs()
    inputs = dict(input_ids=torch.tensor([[2, BOI] + [IMAGE_TOKEN] * GEMMA4_SOFT_TOKENS + [EOI, 10, 11]]),
                  pixel_values=pixels, image_position_ids=ids)
    _check_gemma4(model, inputs, "vision_tower", lambda out: out.last_hidden_state)
    _refused_outside(model, ["language_model.*"], "vision_tower", lambda: model(**inputs))
    with pytest.raises(ValueError, match=r"layers\.0\.self_attn \(EmbeddingGemma2Attention\) of "
                                         r"EmbeddingGemma2TextModel: .*embeds text tokens"):
        with torch.no_grad(), vitmad.record(model.language_model):
            model(**inputs)


# Gemma 4 Unified: no tower -----------------------------------------------------------------------------------------
# Gemma4UnifiedModel (modeling_gemma4_unified.py) has no vision tower: Gemma4UnifiedVisionEmbedder projects each
# merged patch's raw pixels with a Linear into the language model, where image and text tokens are attended together
# (causal, blockwise-bidirectional over the image in sliding layers). Nothing is a vision transformer's attention.

def test_gemma4_unified_encoder_free_model_is_refused_never_its_language_model_recorded():
    text = dict(GEMMA_TEXT)
    vision = dict(patch_size=4, pooling_kernel_size=2, mm_embed_dim=32, mm_posemb_size=16, output_proj_dims=32)
    config = transformers.Gemma4UnifiedConfig(text_config=text, vision_config=vision, audio_config=None,
                                              image_token_id=IMAGE_TOKEN, boi_token_id=BOI, eoi_token_id=EOI,
                                              video_token_id=103, audio_token_id=104, boa_token_id=105)
    torch.manual_seed(0)
    model = transformers.Gemma4UnifiedForConditionalGeneration(config).eval()
    ids = torch.tensor([[0, 0], [1, 0], [2, 0], [0, 1], [1, 1], [2, 1]])  # (x, y) of a 2 x 3 grid of merged patches
    tokens = [2, BOI] + [IMAGE_TOKEN] * 6 + [EOI, 10, 11]
    inputs = dict(input_ids=torch.tensor([tokens]), pixel_values=torch.rand(1, 6, 8 * 8 * 3),
                  image_position_ids=ids[None],
                  mm_token_type_ids=torch.tensor([[int(t == IMAGE_TOKEN) for t in tokens]]))
    with torch.no_grad():
        model(**inputs)
    refusal = (r"model\.language_model\.layers\.0\.self_attn \(Gemma4UnifiedTextAttention\) of "
               r"Gemma4UnifiedForConditionalGeneration: .*encoder-free multimodal model")
    for given in ({}, {"layers": ["model.language_model.*"]}, {"layers": ["model.language_model.*"],
                                                               "num_prefix_tokens": 2}):
        with pytest.raises(ValueError, match=refusal):
            with torch.no_grad(), vitmad.record(model, **given):
                model(**inputs)


# T5Gemma 2: a SigLIP tower in the encoder --------------------------------------------------------------------------
# T5Gemma2Encoder (modeling_t5gemma2.py) runs its SigLIP vision_tower (no class token: the row-major grid of the
# patch convolution), average-pools the map to mm_tokens_per_image soft tokens and scatters them among the text
# tokens of its bidirectional text encoder; the decoder's merged self- and cross-attention reads the encoder's output.

def test_t5gemma2_records_its_siglip_tower_never_its_text_encoder_or_decoder():
    text = dict(GEMMA_TEXT, query_pre_attn_scalar=16)
    vision = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, image_size=48, patch_size=8)
    encoder = dict(text_config=text, vision_config=vision, mm_tokens_per_image=9, image_token_index=IMAGE_TOKEN,
                   boi_token_index=BOI, eoi_token_index=EOI)
    config = transformers.T5Gemma2Config(encoder=encoder, decoder=dict(text), image_token_index=IMAGE_TOKEN,
                                         eoi_token_index=EOI)
    torch.manual_seed(0)
    model = peaked(sharpened(transformers.T5Gemma2ForConditionalGeneration(config)))
    inputs = dict(input_ids=torch.tensor([[2, BOI] + [IMAGE_TOKEN] * 9 + [EOI, 10, 11]] * 2),
                  pixel_values=torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(1)),
                  decoder_input_ids=torch.tensor([[2, 5, 6]] * 2))
    tower = "model.encoder.vision_tower"
    calls = _tower_calls(model, tower, _modeling("siglip"), **inputs)
    model.set_attn_implementation("sdpa")
    rec, rec_tokens = record_both_reductions(model, lambda m: m(**inputs), lambda out: out.logits, STATS)
    head = f"{tower}.head.attention"
    assert list(rec.skipped) == [head] and rec.skipped[head].startswith("attention pooling")
    rec.skipped.clear()
    rec_tokens.skipped.clear()
    assert rec.layers == [f"{tower}.encoder.layers.{i}.self_attn" for i in range(2)]
    check_prefix_and_grid(rec, rec_tokens, [p for _, p in calls], (6, 6), 8, 0)
    _refused_outside(model, ["model.encoder.text_model.*", "model.decoder.*"], tower, lambda: model(**inputs))


# Granite 4 Vision: a CLIP tower over LLaVA-NeXT tiles, a Window Q-Former -------------------------------------------
# Granite4VisionModel.get_image_features (modeling_granite4_vision.py) runs its CLIP vision_tower once over every
# tile of every image ([tiles, 3, 32, 32]: the base image then the grid tiles of its best pinpoint, each an image of
# the batch): the class token, then the 4 x 4 row-major grid of 8 px patches. Its projectors (BLIP-2 Q-Formers over
# windows of the tower's map, learned queries plus the downsampled map) and the language model come after it.

def test_granite4_vision_records_its_clip_tower_per_tile_never_its_qformers():
    text = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, pad_token_id=0)
    vision = dict(model_type="clip_vision_model", hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, image_size=32, patch_size=8)
    config = transformers.Granite4VisionConfig(
        text_config=text, vision_config=vision, image_token_index=IMAGE_TOKEN, downsample_rate="1/2",
        deepstack_layer_map=[[-2, 0]], spatial_target_layers=[0, 1, 0, 1], image_grid_pinpoints=[[32, 64], [64, 32]],
        qformer_config=dict(num_hidden_layers=1, intermediate_size=32))
    torch.manual_seed(0)
    model = peaked(sharpened(transformers.Granite4VisionForConditionalGeneration(config)))
    # A 32 x 64 image: its base view and two 32 x 32 tiles, 2 + 2 * 2 tokens after the 1/2 downsampling, a newline
    # per row of the tiles' 2 x 4 map: 2 * 2 + 2 * 4 + 2 = 14 image tokens.
    inputs = dict(input_ids=torch.tensor([[2] + [IMAGE_TOKEN] * 14 + [10, 11]]),
                  pixel_values=torch.randn(1, 3, 3, 32, 32, generator=torch.Generator().manual_seed(1)),
                  image_sizes=torch.tensor([[32, 64]]))
    tower = "model.vision_tower"
    calls = _tower_calls(model, tower, _modeling("clip"), **inputs)
    assert [p.shape[0] for _, p in calls] == [3, 3]  # the three tiles, one batch
    model.set_attn_implementation("sdpa")
    rec, rec_tokens = record_both_reductions(model, lambda m: m(**inputs), lambda out: out.logits, STATS)
    assert rec.layers == [f"{tower}.encoder.layers.{i}.self_attn" for i in range(2)]
    check_prefix_and_grid(rec, rec_tokens, [p for _, p in calls], (4, 4), 8, 1)
    _refused_outside(model, ["model.layerwise_projectors.*", "model.spatial_projectors.*", "model.language_model.*"],
                     tower, lambda: model(**inputs))


# Inkling2-Loop: Inkling2's tower before a looped language model with attention residuals ---------------------------
# Inkling2LoopModel (modeling_inkling2_loop.py) runs Inkling2VisionModel (modeling_inkling2.py) on the packed merge
# blocks (one class token per image, then its patches in 2 x 2 merge blocks), then its language model: sliding and
# full causal attention, and attention residuals (Inkling2LoopBlockAttentionResidual, a softmax over the outputs of
# earlier layers) over text and image tokens alike, none of them the image's tokens.

INKLING_GRIDS = [(4, 6), (2, 4)]


def test_inkling2_loop_records_its_inkling2_tower_never_its_language_model():
    text = dict(vocab_size=128, unpadded_vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, head_dim=16, swa_num_attention_heads=2, swa_num_key_value_heads=1,
                swa_head_dim=16, sliding_window_size=8, d_rel=4, rel_extent=16, moe_intermediate_size=16,
                n_routed_experts=2, num_experts_per_tok=1, n_layers_per_attn_res_block=1, loop_layer_index_start=1,
                loop_layer_index_end=2, loop_num_passes=2, loop_gate_rank=4,
                layer_types=["hybrid_sliding", "hybrid"], eos_token_id=1)
    vision = dict(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                  patch_size=MERGE_PATCH, spatial_merge_size=MERGE, posemb_grid_size=8, projection_hidden_dim=32,
                  text_hidden_size=32)
    config = transformers.Inkling2LoopConfig(text_config=text, vision_config=vision, image_token_id=IMAGE_TOKEN)
    torch.manual_seed(0)
    model = sharpened(transformers.Inkling2LoopForConditionalGeneration(config))
    blocks = sum(h * w for h, w in INKLING_GRIDS) // MERGE ** 2
    side = MERGE * MERGE_PATCH
    inputs = dict(input_ids=torch.tensor([[2] + [IMAGE_TOKEN] * blocks + [10, 11]]),
                  pixel_values=torch.rand(blocks, side, side, 3, generator=torch.Generator().manual_seed(1)) * 2 - 1,
                  image_grid_thw=torch.tensor([[1, h // MERGE, w // MERGE] for h, w in INKLING_GRIDS]))
    tower = "model.vision_tower"
    # The whole model claims no SDPA (its language model is eager); its tower runs SDPA by default.
    calls = eager_attention_calls(_modeling("inkling2"), model, switched=model.model.vision_tower, **inputs)
    references = _references(calls, [layer.self_attn for layer in model.model.vision_tower.layers], 1,
                             INKLING_GRIDS, _merge_blocks, MERGE_PATCH)
    _far_from_uniform(references, 1, INKLING_GRIDS)
    model.model.vision_tower.set_attn_implementation("sdpa")
    with torch.no_grad():
        plain = model(**inputs).logits
        with vitmad.record(model, stats=["mad", *STATS]) as rec:
            recorded = model(**inputs).logits
    assert torch.equal(plain, recorded)
    assert rec.layers == [f"{tower}.layers.{i}.self_attn" for i in range(2)] and rec.skipped == {}
    _check(rec, references, INKLING_GRIDS, 1)
    language = ["model.language_model.layers.*.self_attn", "*attention_input", "*mlp_input"]
    with pytest.raises(NoLayerError, match=r"model\.language_model\.layers\.0\.self_attn: outside the vision tower "
                                           r"model\.vision_tower: a language model's attention"):
        with torch.no_grad(), vitmad.record(model, layers=language, num_prefix_tokens=1):
            model(**inputs)
    # A wildcard over the whole model: the tower recorded, the language model's attention layers skipped, and its
    # other modules (embeddings, norms, projections, gates) no layers at all (until 2026-12-05 each was listed among
    # rec.skipped as "a language model's attention").
    with torch.no_grad(), vitmad.record(model, layers=[f"{tower}.*", "model.language_model.*"]) as rec:
        model(**inputs)
    assert rec.layers == [f"{tower}.layers.{i}.self_attn" for i in range(2)]
    assert list(rec.skipped) == [f"model.language_model.layers.{i}.self_attn" for i in range(2)]


# TIPSv2-DPT: TIPSv2's tower under a DPT head -----------------------------------------------------------------------
# Tipsv2DptFor* (modeling_tipsv2_dpt.py) run the Tipsv2Backbone (the class token, then 2 registers, then the
# row-major grid of 8 px patches, Tipsv2Embeddings.forward), then DPT necks whose reassemble stages upsample with a
# 2 x 2 transposed convolution of stride 2 (kernel == stride, on the tower's map, not the image) and decoders.

TIPS_BACKBONE = dict(model_type="tipsv2_vision_model", hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     mlp_ratio=2, num_register_tokens=2, image_size=48, patch_size=8, out_indices=[1, 2],
                     reshape_hidden_states=False, apply_layernorm=True)
TIPS_OUTPUTS = {"Tipsv2DptForDensePrediction": "predicted_depth", "Tipsv2DptForDepthEstimation": "predicted_depth",
                "Tipsv2DptForNormalEstimation": "normals", "Tipsv2DptForSemanticSegmentation": "logits"}


@pytest.mark.parametrize("name", list(TIPS_OUTPUTS))
def test_tipsv2_dpt_records_its_backbone_under_the_dpt_head(name):
    config = transformers.Tipsv2DptConfig(backbone_config=TIPS_BACKBONE, neck_hidden_sizes=[16, 16],
                                          fusion_hidden_size=16, reassemble_factors=[2, 1], num_depth_bins=8,
                                          num_labels=3)
    torch.manual_seed(0)
    model = peaked(sharpened(getattr(transformers, name)(config)))
    pixels = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(1))
    # The DPT wrapper takes no attention implementation (it does not claim SDPA); its backbone does.
    calls = eager_attention_calls(_modeling("tipsv2"), model, pixels, switched=model.backbone)
    model.backbone.set_attn_implementation("sdpa")
    rec, rec_tokens = record_both_reductions(model, lambda m: m(pixels),
                                             lambda out: getattr(out, TIPS_OUTPUTS[name]), STATS)
    assert rec.layers == [f"backbone.encoder.layer.{i}.attention" for i in range(2)]
    check_prefix_and_grid(rec, rec_tokens, [p for _, p in calls], (6, 6), 8, 3)


# SAM3 LiteText: SAM3's ViT beside a MobileCLIP text encoder --------------------------------------------------------
# Sam3LiteTextModel (modeling_sam3_lite_text.py) holds SAM3's vision encoder (Sam3VisionModel of modeling_sam3.py:
# the ViT's windowed and global blocks, test_record_sam3.py's layout) and a text encoder of RepMixer blocks (1 x k
# depthwise convolutions and 1 x 1 pointwise ones over the text tokens laid out as a [B, C, 1, T] map) around
# bidirectional self-attention; its DETR encoder, decoder, geometry encoder and mask decoder come after the tower.

def _sam3_lite_text():
    small = dict(hidden_size=FPN, num_layers=1, num_attention_heads=2, intermediate_size=32)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, vocab_size=64,
                projection_dim=FPN, max_position_embeddings=16, repmixer_kernel_size=3)
    config = transformers.Sam3LiteTextConfig(
        vision_config=VISION, text_config=text, geometry_encoder_config=dict(small, roi_size=2),
        detr_encoder_config=small, detr_decoder_config=dict(small, num_queries=5),
        mask_decoder_config=dict(hidden_size=FPN, num_attention_heads=2, num_upsampling_stages=3))
    torch.manual_seed(0)
    return _random_tables(transformers.Sam3LiteTextModel(config))


def test_sam3_lite_text_records_its_vit_never_its_text_encoder():
    model = _sam3_lite_text()
    ids = torch.tensor([[1, 5, 6, 2]] * 2)
    pixels = torch.randn(2, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(1))
    maps = _vit_maps(eager_attention_calls(_modeling("sam3"), model, pixel_values=pixels, input_ids=ids))
    model.set_attn_implementation("sdpa")
    rec, rec_tokens = record_both_reductions(model, lambda m: m(pixel_values=pixels, input_ids=ids),
                                             lambda out: out.pred_masks, ["entropy", "self_mass", "prefix_mass"])
    layers = [f"vision_encoder.backbone.layers.{i}.attention" for i in range(3)]
    assert rec.layers == layers and rec.skipped == {}
    _check_sam3(rec, rec_tokens, maps, IMAGE // PATCH, IMAGE // PATCH, WINDOW, layers)
    _refused_outside(model, ["text_encoder.*"], "vision_encoder.backbone",
                     lambda: model(pixel_values=pixels, input_ids=ids))


def test_sam3_lite_text_text_encoder_alone_is_refused_its_pointwise_convolutions_no_patch_embedding():
    """The text encoder's 1 x 1 convolutions (kernel == stride == 1) run on text tokens, not on an image: recorded
    alone, its attention is refused, never placed on a grid of them."""
    model = _sam3_lite_text()
    with pytest.raises(ValueError, match=r"layers\.1\.self_attn \(Sam3LiteTextTextAttention\) of "
                                         r"Sam3LiteTextTextModel: found no patch-embedding .*embeds text tokens, "
                                         r"embeddings\.token_embedding: 64 of them"):
        with torch.no_grad(), vitmad.record(model.text_encoder):
            model.text_encoder(input_ids=torch.tensor([[1, 5, 6, 2]]))
