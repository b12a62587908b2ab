"""vitmad.record on transformers 5.25.0 vision-language, retrieval and robot-policy models that no other test named
(QA helper h143): each wraps a tower covered elsewhere, so what is tested here is that the whole model records that
tower, on the images it is given, and nothing else (never a language model, an action expert or a text encoder).

SigLIP towers: Aya Vision, ShieldGemma 2 (a Gemma 3 inside a classifier), ColPali (PaliGemma), ModernVBERT,
ColModernVBERT and UltraVBERT (ModernVBERT also with an Idefics3 tower, which masks padding patches), PI0 and PI0.5
(PaliGemma and a Gemma action expert). CLIP towers: VipLLaVA (which reads several of its tower's layers),
LLaVA-NeXT-Video (frames of the videos folded into the tower's batch), VisionTextDualEncoder (also with a ViT).
Packed towers: ColQwen2 (Qwen2-VL's), HyperCLOVA X Vision V2 (Qwen2.5-VL's windows), LightOnOCR and Mistral Large 4
(Pixtral's).

Tiny random-weight models, sharpened so that attention is far from uniform. The reference is the tower's own eager
attention probabilities (its modeling file's ``eager_attention_forward``), the calls of the tower's modules alone,
placed by the layout written here from each modeling file: how the model builds the tower's batch of images (which
images, in which order) and where each token of an image lies.
"""

from __future__ import annotations

import importlib
import math

import pytest
import torch

import vitmad
from conftest import (
    PACKED_STATS,
    check_packed_statistics,
    check_prefix_and_grid,
    eager_attention_calls,
    grid_centres,
    packed_chunk_references,
    qwen_token_chunks,
    record_both_reductions,
    sharpened,
    statistics_reference,
)
from vitmad.recording.recorder import NoLayerError

transformers = pytest.importorskip("transformers")

STATS = ["entropy", "prefix_mass", "prefix_maps"]
# Every tower: 2 layers, 2 heads, 48 x 48 px images of 8 px patches (a 6 x 6 grid). SigLIP's pooling head is off, as
# in these models' checkpoints (ModernVBERT's is on and is skipped: see its test).
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=48,
              patch_size=8)
SIGLIP = dict(VISION, model_type="siglip_vision_model", vision_use_head=False)
CLIP = dict(VISION, model_type="clip_vision_model", projection_dim=16)
LLAMA = dict(model_type="llama", vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
             num_attention_heads=2, num_key_value_heads=1, pad_token_id=0)
GEMMA = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
             num_key_value_heads=1, head_dim=16, pad_token_id=0, bos_token_id=2, eos_token_id=1)
MODERNBERT = dict(model_type="modernbert", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, vocab_size=100, pad_token_id=0, eos_token_id=1, bos_token_id=2,
                  cls_token_id=2, sep_token_id=1)
IMAGE = 90  # the image token of every model here


def _modeling(name: str):
    return importlib.import_module(f"transformers.models.{name}.modeling_{name}")


def _peaked(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` (sharpened) with its patch convolutions and its position and class embeddings drawn anew (the
    initial ones make the tokens of a tiny tower alike, its attention near uniform) and its tower's query and key
    projections 1.5 times larger (a tiny CLIP's deeper layers stay near uniform otherwise)."""
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Conv2d):
                module.weight.normal_(std=module.weight[0].numel() ** -0.5)
            elif "vision" in name and name.endswith(("q_proj", "k_proj", "query", "key")):
                module.weight.mul_(1.5)
        for name, parameter in model.named_parameters():
            if "vision" in name and ("position_embedding" in name or "class_embedding" in name):
                parameter.normal_()
    return model


def _images(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(1))


def _ids(*rows: list[int]) -> torch.Tensor:
    return torch.tensor(list(rows))


# Plain towers in whole models ----------------------------------------------------------------------------------------
# Each builder returns (model, forward inputs, the tower's number of images). How each model feeds its tower, read from
# its modeling file:
# - AyaVisionModel.get_image_features: pixel_values [B, 3, H, W] whole; the pixel shuffle (downsample_factor 2) after
#   the tower: 9 tokens an image.
# - ShieldGemma2ForImageClassification holds a Gemma3ForConditionalGeneration (AutoModelForImageTextToText): its
#   SigLIP tower on pixel_values whole, 3 x 3 pooled tokens an image.
# - ColPaliForRetrieval.vlm is a PaliGemmaModel: pixel_values whole, 36 tokens an image.
# - PI0Model.embed_prefix / PI05Model.embed_prefix: pixel_values [B, cameras, 3, H, W] flattened (camera c of sample b
#   is image b * cameras + c), every camera through the tower, those pixel_attention_mask marks absent too (their
#   features dropped after it); 36 tokens a camera.
# - ModernVBertModel.get_image_features (UltraVBertModel's is the same): pixel_values [B, images, 3, H, W]
#   flattened, the all-zero padding images dropped before the tower (sample-major order of the rest); a pixel shuffle
#   of 2 after it: 9 tokens an image.
# - VipLlavaModel.get_image_features: the tower whole (every layer runs), the hidden states of vision_feature_layers
#   concatenated after it.
# - LlavaNextVideoModel.get_video_features: pixel_values_videos [B, F, 3, H, W] reshaped to [B * F, 3, H, W] (frame f
#   of video b is image b * F + f), then pooled 2 x 2 after the tower without its class token: 9 tokens a frame.
# - VisionTextDualEncoderModel: its vision_model (a ViT, CLIP or SigLIP tower) on pixel_values whole.

def _aya_vision():
    config = transformers.AyaVisionConfig(vision_config=SIGLIP, text_config=dict(LLAMA, model_type="cohere2"),
                                          downsample_factor=2, image_token_index=IMAGE)
    ids = _ids(*[[1] + [IMAGE] * 9 + [5, 6]] * 2)
    return transformers.AyaVisionForConditionalGeneration(config), dict(input_ids=ids, pixel_values=_images(2, 3, 48,
                                                                                                            48)), 2


def _shieldgemma2():
    text = dict(GEMMA, sliding_window=16, query_pre_attn_scalar=16)
    config = transformers.ShieldGemma2Config(text_config=text, vision_config=SIGLIP, mm_tokens_per_image=9,
                                             boi_token_index=91, eoi_token_index=92, image_token_index=IMAGE)
    config.yes_token_index, config.no_token_index = 3, 4  # within the tiny vocabulary
    ids = _ids(*[[2, 91] + [IMAGE] * 9 + [92, 10, 11]] * 2)
    inputs = dict(input_ids=ids, pixel_values=_images(2, 3, 48, 48), token_type_ids=(ids == IMAGE).long(),
                  attention_mask=torch.ones_like(ids))
    return transformers.ShieldGemma2ForImageClassification(config), inputs, 2


PALIGEMMA = dict(model_type="paligemma", text_config=dict(GEMMA, model_type="gemma"), vision_config=SIGLIP,
                 projection_dim=32, image_token_id=IMAGE)


def _colpali():
    config = transformers.ColPaliConfig(vlm_config=PALIGEMMA, embedding_dim=16)
    ids = _ids(*[[IMAGE] * 36 + [2, 10, 11, 1]] * 2)
    inputs = dict(input_ids=ids, pixel_values=_images(2, 3, 48, 48), attention_mask=torch.ones_like(ids))
    return transformers.ColPaliForRetrieval(config), inputs, 2


def _robot_policy(version: str):
    config = getattr(transformers, f"{version}Config")(vlm_config=PALIGEMMA, dit_config=dict(GEMMA, model_type="gemma"),
                                                       chunk_size=4, max_state_dim=6, max_action_dim=6,
                                                       num_inference_steps=2)
    ids = _ids(*[[IMAGE] * 72 + [2, 10, 11]] * 2)  # two cameras present in each sample
    gen = torch.Generator().manual_seed(2)
    inputs = dict(state=torch.randn(2, 6, generator=gen), noise=torch.randn(2, 4, 6, generator=gen),
                  timestep=torch.tensor([0.5, 0.3]), input_ids=ids, pixel_values=_images(2, 3, 3, 48, 48),
                  pixel_attention_mask=torch.tensor([[True, True, False], [True, False, True]]),
                  attention_mask=torch.ones_like(ids))
    return getattr(transformers, f"{version}ForConditionalGeneration")(config), inputs, 6


def _modernvbert_config(**vision) -> transformers.ModernVBertConfig:
    return transformers.ModernVBertConfig(text_config=MODERNBERT, vision_config={**SIGLIP, **vision},
                                          image_token_id=IMAGE, pixel_shuffle_factor=2)


def _modernvbert_inputs() -> dict:
    """Two samples of up to two images, the second sample's second image padding (all zeros): 3 images reach the
    tower, sample 0's two, then sample 1's first."""
    pixels = _images(2, 2, 3, 48, 48)
    pixels[1, 1] = 0.0
    ids = _ids([2] + [IMAGE] * 18 + [5, 1], [2] + [IMAGE] * 9 + [5] * 9 + [5, 1])
    return dict(input_ids=ids, pixel_values=pixels, attention_mask=torch.ones_like(ids))


def _modernvbert():
    return transformers.ModernVBertForMaskedLM(_modernvbert_config()), _modernvbert_inputs(), 3


def _colmodernvbert():
    vlm = dict(_modernvbert_config().to_dict(), model_type="modernvbert")
    config = transformers.ColModernVBertConfig(vlm_config=vlm, embedding_dim=16)
    return transformers.ColModernVBertForRetrieval(config), _modernvbert_inputs(), 3


def _ultravbert():
    """UltraVBERT: ModernVBERT's design (the same get_image_features) around an UltraBERT text encoder."""
    config = transformers.UltraVBertConfig(text_config=dict(MODERNBERT, model_type="ultrabert"), vision_config=SIGLIP,
                                           image_token_id=IMAGE, pixel_shuffle_factor=2)
    return transformers.UltraVBertForMaskedLM(config), _modernvbert_inputs(), 3


def _vipllava():
    """Four layers, two of whose hidden states (the third's output and the first's) the projector reads."""
    config = transformers.VipLlavaConfig(vision_config=dict(CLIP, num_hidden_layers=4), text_config=LLAMA,
                                         vision_feature_layers=[-2, 1], image_token_index=IMAGE,
                                         projector_hidden_act="gelu")
    ids = _ids(*[[1] + [IMAGE] * 36 + [5, 6]] * 2)
    return transformers.VipLlavaForConditionalGeneration(config), dict(input_ids=ids, pixel_values=_images(2, 3, 48,
                                                                                                           48)), 2


def _llava_next_video_config() -> transformers.LlavaNextVideoConfig:
    return transformers.LlavaNextVideoConfig(vision_config=CLIP, text_config=LLAMA, image_token_index=IMAGE,
                                             video_token_index=91, image_grid_pinpoints=[[48, 48]],
                                             spatial_pool_stride=2)


def _llava_next_video():
    ids = _ids(*[[1] + [91] * 27 + [5, 6]] * 2)  # 3 frames of 9 tokens a video
    inputs = dict(input_ids=ids, pixel_values_videos=_images(2, 3, 3, 48, 48))
    return transformers.LlavaNextVideoForConditionalGeneration(_llava_next_video_config()), inputs, 6


def _dual_encoder(vision: dict):
    def build():
        config = transformers.VisionTextDualEncoderConfig(
            vision_config=vision, projection_dim=16,
            text_config=dict(model_type="bert", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                             num_attention_heads=2, vocab_size=100))
        ids = _ids(*[[2, 5, 6, 1]] * 3)
        inputs = dict(input_ids=ids, pixel_values=_images(2, 3, 48, 48), attention_mask=torch.ones_like(ids))
        return transformers.VisionTextDualEncoderModel(config), inputs, 2
    return build


# name -> (builder, the tower's modeling module, the tower's name, tokens before its grid (CLIP's and ViT's class
# token), its layer count)
WHOLE_MODELS = {
    "aya_vision": (_aya_vision, "siglip", "model.vision_tower", 0, 2),
    "shieldgemma2": (_shieldgemma2, "siglip", "model.model.vision_tower", 0, 2),
    "colpali": (_colpali, "siglip", "vlm.vision_tower", 0, 2),
    "pi0": (lambda: _robot_policy("PI0"), "siglip", "model.vlm.vision_tower", 0, 2),
    "pi05": (lambda: _robot_policy("PI05"), "siglip", "model.vlm.vision_tower", 0, 2),
    "modernvbert": (_modernvbert, "siglip", "model.vision_model", 0, 2),
    "colmodernvbert": (_colmodernvbert, "siglip", "vlm.vision_model", 0, 2),
    "ultravbert": (_ultravbert, "siglip", "model.vision_model", 0, 2),
    "vipllava": (_vipllava, "clip", "model.vision_tower", 1, 4),
    "llava_next_video": (_llava_next_video, "clip", "model.vision_tower", 1, 2),
    "dual_encoder_vit": (_dual_encoder(dict(VISION, model_type="vit")), "vit", "vision_model", 1, 2),
    "dual_encoder_clip": (_dual_encoder(CLIP), "clip", "vision_model", 1, 2),
}


@pytest.mark.parametrize("name", list(WHOLE_MODELS))
def test_whole_model_records_its_tower_on_the_images_it_runs(name):
    """Every layer of the tower, none elsewhere, each image of the tower's batch (cameras, frames, real images) a row
    in the order the model builds that batch, against the tower's eager attention: MAD, entropy, prefix mass and
    the class token's maps; the model's output bit-identical."""
    build, module, tower, prefix, depth = WHOLE_MODELS[name]
    torch.manual_seed(0)
    model, inputs, images = build()
    model = _peaked(sharpened(model))
    tower_modules = set(model.get_submodule(tower).modules())
    calls = [c for c in eager_attention_calls(_modeling(module), model, **inputs) if c[0] in tower_modules]
    assert len(calls) == depth and all(p.shape[0] == images for _, p in calls)
    model.set_attn_implementation("sdpa")
    rec, rec_tokens = record_both_reductions(model, lambda m: m(**inputs), lambda out: out[0], STATS)
    assert all(layer.startswith(tower + ".") for layer in rec.layers) and len(rec.calls) == 1
    assert [model.get_submodule(layer) for layer in rec.layers] == [m for m, _ in calls]
    check_prefix_and_grid(rec, rec_tokens, [p for _, p in calls], (6, 6), 8, prefix)


def test_modernvbert_skips_its_siglip_pooling_head_and_ignores_the_patch_mask_siglip_ignores():
    """ModernVBERT's default SigLIP keeps its pooling head (skipped, its query has no position) and receives the
    patch_attention_mask built from pixel_attention_mask, which SiglipVisionModel takes in its kwargs and never
    applies: every patch of a padded image is a query and a key, as the eager attention shows."""
    torch.manual_seed(0)
    model = _peaked(sharpened(transformers.ModernVBertModel(_modernvbert_config(vision_use_head=True))))
    inputs = _modernvbert_inputs()
    mask = torch.ones(2, 2, 48, 48, dtype=torch.bool)
    mask[0, 0, :, 32:] = False  # the first image padded on its right third
    inputs["pixel_attention_mask"] = mask
    calls = eager_attention_calls(_modeling("siglip"), model, **inputs)
    assert len(calls) == 2 and all(p.shape[-1] == 36 for _, p in calls)
    model.set_attn_implementation("sdpa")
    rec, rec_tokens = record_both_reductions(model, lambda m: m(**inputs), lambda out: out.last_hidden_state,
                                             STATS, layers=["vision_model.encoder.*", "vision_model.head.*"])
    assert rec.skipped["vision_model.head.attention"].startswith("attention pooling")
    rec.skipped.clear()
    check_prefix_and_grid(rec, rec_tokens, [p for _, p in calls], (6, 6), 8, 0)


def test_modernvbert_with_an_idefics3_tower_leaves_the_patches_its_mask_hides_unplaced():
    """ModernVBERT's forward is written for Idefics3's tower too (vision_config model_type "idefics3_vision"), which
    applies the patch_attention_mask: the first image's right third is padding, no query and a key no query
    attends; the MAD of that image is over its 6 x 4 real patches."""
    config = transformers.ModernVBertConfig(text_config=MODERNBERT, vision_config=dict(VISION,
                                                                                     model_type="idefics3_vision"),
                                            image_token_id=IMAGE, pixel_shuffle_factor=2)
    torch.manual_seed(0)
    model = _peaked(sharpened(transformers.ModernVBertModel(config)))
    inputs = _modernvbert_inputs()
    mask = torch.ones(2, 2, 48, 48, dtype=torch.bool)
    mask[0, 0, :, 32:] = False
    inputs["pixel_attention_mask"] = mask
    calls = eager_attention_calls(_modeling("idefics3"), model, **inputs)
    model.set_attn_implementation("sdpa")
    rec, rec_tokens = record_both_reductions(model, lambda m: m(**inputs), lambda out: out.last_hidden_state, STATS)
    assert [model.get_submodule(layer) for layer in rec.layers] == [m for m, _ in calls]
    real = torch.ones(3, 36, dtype=torch.bool)
    real[0] = (torch.arange(36) % 6 < 4)  # row-major 6 x 6: columns 4 and 5 padding
    for layer, (_, probabilities) in enumerate(calls):
        assert probabilities[0][..., ~real[0]].abs().max() == 0  # no query attends to the padding
        for image in range(3):
            expected = statistics_reference(probabilities[image:image + 1], grid_centres((6, 6), 8), real[image])
            assert float(expected["entropy"].mean()) < 0.75 * math.log(int(real[image].sum()))  # far from uniform
            tokens = rec_tokens.per_layer[layer][image:image + 1]
            assert tokens[..., ~real[image]].isnan().all()
            torch.testing.assert_close(tokens[..., real[image]].double(), expected["mad"], rtol=1e-5, atol=1e-4)
            torch.testing.assert_close(rec.per_layer[layer][image].double(), expected["mad"][0].mean(-1),
                                       rtol=1e-5, atol=1e-4)
            torch.testing.assert_close(rec.stats["entropy"][layer][image].double(), expected["entropy"][0].mean(-1),
                                       rtol=1e-5, atol=1e-6)


def test_pi0_sample_actions_records_the_tower_once_and_refuses_its_action_expert():
    """sample_actions runs the tower once (embed_prefix, outside any forward of the model) and the action expert at
    every denoising step: one call, the forward's; the expert's attention (over the prefix cache and the action
    tokens) named in layers= is refused as lying outside the tower."""
    torch.manual_seed(0)
    model, inputs, _ = _robot_policy("PI0")
    model = _peaked(sharpened(model))
    with torch.no_grad(), vitmad.record(model) as forward:
        model(**inputs)
    del inputs["timestep"]
    with torch.no_grad():
        plain = model.sample_actions(**inputs)
        with vitmad.record(model) as rec:
            recorded = model.sample_actions(**inputs)
    assert torch.equal(plain, recorded) and len(rec.calls) == 1 and rec.layers == forward.layers
    torch.testing.assert_close(rec.mad, forward.mad, rtol=0, atol=0)
    with pytest.raises(NoLayerError, match=r"model\.dit\.layers\.0\.self_attn: outside model\.vlm\.vision_tower, "
                                           r"the tower that embeds the image"):
        with torch.no_grad(), vitmad.record(model, layers=["model.dit.*"]):
            model.sample_actions(**inputs)


# name -> (builder, the module recorded alone: a language model or an action expert, what the refusal says)
NOT_TOWERS = {
    "pi0_action_expert": (lambda: _robot_policy("PI0"), "model.dit",
                          r"layers\.0\.self_attn \(GemmaAttention\) of GemmaModel: found no patch-embedding Conv2d"),
    "modernvbert_text_encoder": (_modernvbert, "model.text_model",
                                 r"found no attention layer vitmad knows in ModernBertModel"),
    "ultravbert_text_encoder": (_ultravbert, "model.text_model",
                               r"UltrabertModel embeds text tokens"),
    "mistral_large4_language_model": (lambda: _mistral_large4(), "model.language_model",
                                      r"found no attention layer vitmad knows in MistralLarge4TextModel"),
}


@pytest.mark.parametrize("name", list(NOT_TOWERS))
def test_language_model_recorded_alone_is_refused_never_placed_as_an_image(name):
    """The modules that attend over text and image tokens mixed (a bidirectional text encoder, a causal language
    model, PI0's action expert over the prefix cache), given to vitmad.record by themselves: refused by name."""
    build, module, message = NOT_TOWERS[name]
    torch.manual_seed(0)
    model, inputs = build()[:2]
    with pytest.raises((NoLayerError, ValueError), match=message):
        with torch.no_grad(), vitmad.record(model.eval().get_submodule(module)):
            model(**inputs)


def test_colpali_text_query_ran_without_its_tower_says_so_at_read():
    """A retrieval query is text alone: the tower does not run, and reading the MAD says why there is none."""
    torch.manual_seed(0)
    model, inputs, _ = _colpali()
    ids = inputs["input_ids"][:, 36:]
    with torch.no_grad(), vitmad.record(model.eval()) as rec:
        model(input_ids=ids, attention_mask=torch.ones_like(ids))
    assert rec.calls == []
    with pytest.raises(RuntimeError, match=r"ColPaliForRetrieval ran 1 time\(s\) in this recording, but not through "
                                           r"the modules being recorded .*given text alone"):
        _ = rec.mad


def test_llava_next_video_images_then_a_video_are_two_calls_each_on_its_own_batch():
    """Images and a video in one forward: get_image_features runs the tower on each image's anyres crops (the image
    resized, then its tiles of the 48 x 48 pinpoint: 2 crops an image), then get_video_features on the frames: two
    calls (a warning says rec.mad reads the last), the first of 2 crops, the second of 3 frames, each against its
    eager attention."""
    torch.manual_seed(0)
    model = _peaked(sharpened(transformers.LlavaNextVideoForConditionalGeneration(_llava_next_video_config())))
    # The image's tokens: the resized image's 36 (vision_feature_select_strategy "default": no class token), then the
    # tile's 6 x 6 with an image_newline after each row (42); the video's 3 frames of 9.
    ids = _ids([1] + [IMAGE] * (36 + 42) + [91] * 27 + [5, 6])
    inputs = dict(input_ids=ids, pixel_values=_images(1, 2, 3, 48, 48), image_sizes=torch.tensor([[48, 48]]),
                  pixel_values_videos=_images(1, 3, 3, 48, 48) + 1.0)
    tower = set(model.model.vision_tower.modules())
    calls = [p for m, p in eager_attention_calls(_modeling("clip"), model, **inputs) if m in tower]
    assert [p.shape[0] for p in calls] == [2, 2, 3, 3]
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        plain = model(**inputs).logits
        with vitmad.record(model, stats=STATS) as rec:
            with pytest.warns(UserWarning, match=r"ran its recorded layers 2 times"):
                recorded = model(**inputs).logits
    assert torch.equal(plain, recorded) and len(rec.calls) == 2
    positions = torch.cat([torch.full((1, 2), float("nan"), dtype=torch.float64), grid_centres((6, 6), 8)])
    for call, maps in zip(rec.calls, [calls[:2], calls[2:]], strict=True):
        for layer, probabilities in enumerate(maps):
            expected = statistics_reference(probabilities, positions)
            torch.testing.assert_close(call.per_layer[layer].double(), expected["mad"].mean(-1), rtol=1e-5,
                                       atol=1e-4)
            torch.testing.assert_close(call.statistics["prefix_mass"][layer].double(),
                                       expected["prefix_mass"].mean(-1), rtol=1e-5, atol=1e-6)


# Packed towers in whole models ---------------------------------------------------------------------------------------
# ColQwen2ForRetrieval.forward: pixel_values [B, longest, C * T * p * p], each sample's image_grid_thw[b] = (1, h, w)
# patches padded to the longest; it keeps the first h * w rows of each sample (image b's patches, merge block by merge
# block: conftest.qwen_token_chunks) and runs vlm.visual itself, one chunk per image. HyperCLOVAXVisionV2Model runs its
# Qwen2.5-VL tower on pixel_values whole: the sequence reordered into windows of window_size // (merge * p) merge
# blocks, block 0 attending per window, block 1 (fullatt_block_indexes) per image over the same order.
# LightOnOcrModel and MistralLarge4Model run their Pixtral tower on pixel_values [n, 3, H, W] with image_sizes: each
# image's patches row-major, one call over the images side by side under a block-diagonal mask.

QWEN_PATCH, MERGE = 4, 2
QWEN_VISION = dict(depth=2, num_heads=2, patch_size=QWEN_PATCH, spatial_merge_size=MERGE, temporal_patch_size=2)
QWEN_GRIDS = [(6, 4), (4, 8)]  # patches: merge blocks cut by the windows' edges in both
PIXTRAL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=64,
               patch_size=8, head_dim=16, model_type="pixtral")
PIXTRAL_SIZES = [(32, 48), (56, 24)]  # pixels: 4 x 6 and 7 x 3 patches


def _record_packed(model, inputs):
    with torch.no_grad():
        plain = model(**inputs)[0]
        with vitmad.record(model, stats=PACKED_STATS) as rec:
            recorded = model(**inputs)[0]
        with vitmad.record(model, stats=PACKED_STATS, reduction="none") as per_query:
            model(**inputs)
    assert torch.equal(plain, recorded)
    return rec, per_query


def _colqwen2():
    text = dict(LLAMA, model_type="qwen2_vl_text", bos_token_id=0, eos_token_id=1,
                rope_parameters={"rope_type": "default", "mrope_section": [2, 2, 4], "rope_theta": 1e4})
    config = transformers.ColQwen2Config(vlm_config=dict(model_type="qwen2_vl", text_config=text, image_token_id=IMAGE,
                                                         vision_config=dict(embed_dim=32, hidden_size=32, mlp_ratio=2,
                                                                            **QWEN_VISION)), embedding_dim=16)
    # Sample 0's 24 patches, then 8 rows of padding the model drops; sample 1's 32.
    patches = _images(2, 32, 3 * 2 * QWEN_PATCH ** 2)
    ids = _ids([IMAGE] * 6 + [2] * 2 + [10] * 2, [IMAGE] * 8 + [2, 10])
    inputs = dict(input_ids=ids, pixel_values=patches, image_grid_thw=torch.tensor([[1, *g] for g in QWEN_GRIDS]),
                  attention_mask=torch.ones_like(ids))
    return transformers.ColQwen2ForRetrieval(config), inputs, "qwen2_vl", "vlm.visual", None


def _hyperclovax():
    vision = dict(hidden_size=32, out_hidden_size=32, intermediate_size=64, window_size=2 * MERGE * QWEN_PATCH,
                  fullatt_block_indexes=[1], **QWEN_VISION)
    config = transformers.HyperCLOVAXVisionV2Config(vision_config=vision, image_token_id=IMAGE,
                                                    text_config=dict(LLAMA, model_type="hyperclovax"))
    ids = _ids([1] + [IMAGE] * 14 + [5, 6])
    inputs = dict(input_ids=ids, pixel_values=_images(56, 3 * 2 * QWEN_PATCH ** 2),
                  image_grid_thw=torch.tensor([[1, *g] for g in QWEN_GRIDS]))
    return (transformers.HyperCLOVAXVisionV2ForConditionalGeneration(config), inputs, "qwen2_5_vl",
            "model.vision_model", 2)


def _pixtral_inputs(tokens: int) -> dict:
    pixels = torch.zeros(2, 3, 56, 48)
    for image, (h, w) in enumerate(PIXTRAL_SIZES):
        pixels[image, :, :h, :w] = _images(3, h, w) + image
    return dict(input_ids=_ids([1] + [IMAGE] * tokens + [5, 6]), pixel_values=pixels,
                image_sizes=torch.tensor(PIXTRAL_SIZES))


def _lighton_ocr():
    config = transformers.LightOnOcrConfig(vision_config=PIXTRAL, image_token_id=IMAGE,
                                           text_config=dict(LLAMA, model_type="qwen3", head_dim=16))
    # 2 x 2 merged patches: 2 x 3 and 3 x 1 tokens.
    return (transformers.LightOnOcrForConditionalGeneration(config), _pixtral_inputs(9), "pixtral",
            "model.vision_encoder", None)


def _mistral_large4():
    text = dict(vocab_size=100, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=1,
                num_attention_heads=2, num_key_value_heads=2, n_routed_experts=4, num_experts_per_tok=2,
                kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8, v_head_dim=16, qk_nope_head_dim=8,
                head_dim=16, index_topk=8, index_head_dim=16, index_n_heads=2, pad_token_id=0)
    config = transformers.MistralLarge4Config(vision_config=PIXTRAL, text_config=text, image_token_index=IMAGE)
    return (transformers.MistralLarge4ForConditionalGeneration(config), _pixtral_inputs(9), "pixtral",
            "model.vision_tower", None)


# name -> builder of (model, inputs, the tower's modeling module, the tower's name, window side in merge blocks of
# its windowed block 0, or None: no windows)
PACKED_MODELS = {"colqwen2": _colqwen2, "hyperclovax_vision_v2": _hyperclovax, "lighton_ocr": _lighton_ocr,
                 "mistral_large4": _mistral_large4}


def _packed_chunks(module: str, grids, window: int | None, layer: int) -> list[tuple[int, list[tuple[int, int]]]]:
    """(image, cells in sequence order) of each attention chunk of ``layer``."""
    if module == "pixtral":
        return [(image, [(r, c) for r in range(h) for c in range(w)]) for image, (h, w) in enumerate(grids)]
    chunks = []
    for image, grid in enumerate(grids):
        windows = qwen_token_chunks(grid, MERGE, window if layer == 0 else None)
        if window and layer == 1:  # the full block keeps the window order
            windows = [[cell for chunk in qwen_token_chunks(grid, MERGE, window) for cell in chunk]]
        chunks += [(image, cells) for cells in windows]
    return chunks


@pytest.mark.parametrize("name", list(PACKED_MODELS))
def test_whole_model_records_its_packed_tower_per_image(name):
    torch.manual_seed(0)
    model, inputs, module, tower, window = PACKED_MODELS[name]()
    model = sharpened(model)
    layers = list(model.get_submodule(tower).modules())
    calls = [c for c in eager_attention_calls(_modeling(module), model, **inputs) if c[0] in layers]
    if module == "pixtral":
        grids, patch = [(h // 8, w // 8) for h, w in PIXTRAL_SIZES], 8
        # One call per layer over the images side by side: each image's block of it is its chunk.
        sliced = []
        for attention, probabilities in calls:
            offset = 0
            for h, w in grids:
                block = probabilities[..., offset:offset + h * w, offset:offset + h * w]
                assert block.sum(-1).sub(1).abs().max() < 1e-6  # nothing of it reaches the other image
                sliced.append((attention, block))
                offset += h * w
        calls = sliced
    else:
        grids, patch = QWEN_GRIDS, QWEN_PATCH
    attention_modules = list(dict.fromkeys(m for m, _ in calls))
    references = packed_chunk_references(
        calls, [(m, _packed_chunks(module, grids, window, i)) for i, m in enumerate(attention_modules)], grids, patch)
    model.set_attn_implementation("sdpa")
    rec, per_query = _record_packed(model, inputs)
    assert [model.get_submodule(layer) for layer in rec.layers] == attention_modules
    kinds = ["global per image (block-diagonal mask)" if module == "pixtral" else "global per image"] * 2
    if window:
        kinds[0] = f"window {window * MERGE}x{window * MERGE} patches ({window}x{window} merge blocks)"
    check_packed_statistics(rec, per_query, references, grids, kinds, patch)


@pytest.mark.parametrize("name", ["PerceiverForImageClassificationLearned", "PerceiverForImageClassificationFourier",
                                  "PerceiverForImageClassificationConvProcessing"])
def test_perceiver_is_refused_as_its_latents_have_no_position(name):
    """QA 271: refused as having no patch embedding, with advice (positions=, patch= and grid=) that fails again:
    its learned latents, the queries of its cross-attention and the tokens of its self-attention, have no position
    on the image, so MAD is not defined for any of its layers."""
    config = transformers.PerceiverConfig(d_latents=32, num_latents=8, num_blocks=1, num_self_attends_per_block=1,
                                          num_self_attention_heads=2, num_cross_attention_heads=1, image_size=32,
                                          d_model=32)
    model = getattr(transformers, name)(config).eval()
    with pytest.raises(ValueError, match=rf"^vitmad\.record: {name} has no layer with spatial softmax attention over "
                                         r"positioned tokens, so MAD is not defined for it \(perceiver\.encoder\."
                                         r"cross_attention\.attention\.self: Perceiver's attention: its learned "
                                         r"latents"):
        with torch.no_grad(), vitmad.record(model):
            model(inputs=torch.randn(1, 3, 32, 32))
