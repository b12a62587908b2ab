"""Attention named in ``layers=`` outside the tower that embeds the image.

A language model or a multimodal encoder attends over image tokens mixed with text: PaliGemma's language model
over ``[image tokens][text]``, GIT's text encoder over ``[CLS + patches][text]``. The plain layout would count
whatever comes before the last ``gh * gw`` tokens as extra tokens and measure text as patches; such a layer is
skipped with the reason unless the user states its layout. The layers that do keep the image tower's tokens in
order are still recorded: BridgeTower's cross-modal image self-attention (checked here against its eager
attention, CLS without a position, then the 4 x 4 grid of 16 px patches), ViTMAE's decoder
(``test_record_masked.py``) and Hiera's (``test_record_hiera.py``).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

import vitmad  # noqa: E402
from conftest import unfused_maps  # noqa: E402

PATCH = 16


def _paligemma():
    config = transformers.PaliGemmaConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=64, patch_size=PATCH, projection_dim=32),
        text_config=dict(model_type="gemma", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16, vocab_size=300),
        image_token_index=257, projection_dim=32)
    torch.manual_seed(0)
    model = transformers.PaliGemmaForConditionalGeneration(config).eval()
    ids = torch.cat([torch.full((2, 16), 257), torch.randint(3, 90, (2, 6))], 1)  # [16 image tokens][6 text]
    inputs = {"input_ids": ids, "pixel_values": torch.randn(2, 3, 64, 64), "attention_mask": torch.ones_like(ids),
              "token_type_ids": torch.zeros_like(ids)}
    return model, inputs


def test_language_model_layer_is_not_placed_as_the_patch_grid():
    model, inputs = _paligemma()
    with pytest.raises(ValueError, match=r"no layer with spatial.*outside model\.vision_tower.*num_prefix_tokens"):
        vitmad.record(model, layers=["model.language_model.layers.0.self_attn"])
    # A wildcard over the whole model records the vision tower and names the language model's layer as skipped.
    with torch.no_grad(), vitmad.record(model, layers=["*self_attn"]) as rec:
        model(**inputs)
    assert rec.layers == [f"model.vision_tower.encoder.layers.{i}.self_attn" for i in range(2)]
    assert list(rec.skipped) == ["model.language_model.layers.0.self_attn"]
    assert "outside model.vision_tower" in rec.skipped["model.language_model.layers.0.self_attn"]
    with torch.no_grad(), vitmad.record(model) as default:
        model(**inputs)
    torch.testing.assert_close(rec.mad, default.mad, rtol=0, atol=0)
    # A wildcard over a whole language model skips its attention modules alone, not its norms and projections (were
    # listed too, each "outside the tower"); a module named whole is the user's choice, attention found in it or not.
    with vitmad.record(model, layers=["model.vision_tower.*", "model.language_model.layers.0.*"]) as wide:
        pass
    assert list(wide.skipped) == ["model.vision_tower.head.attention", "model.language_model.layers.0.self_attn"]
    with vitmad.record(model, layers=["model.vision_tower.*", "model.language_model.layers.0.mlp"]) as whole:
        pass
    assert list(whole.skipped) == ["model.vision_tower.head.attention", "model.language_model.layers.0.mlp"]


def test_text_encoder_of_git_is_skipped_unless_its_layout_is_given():
    config = transformers.GitConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=64, patch_size=PATCH),
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=100,
        max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.GitModel(config).eval()
    with pytest.raises(ValueError, match="outside image_encoder.vision_model, the tower that embeds the image"):
        vitmad.record(model, layers=["encoder.layer.*.attention.self"])


def test_bridgetower_cross_modal_image_layers_keep_the_tower_layout():
    config = transformers.BridgeTowerConfig(
        hidden_size=32, num_attention_heads=2, num_hidden_layers=1,
        vision_config=dict(hidden_size=128, num_hidden_layers=1, image_size=64, patch_size=PATCH),
        text_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                         vocab_size=100, max_position_embeddings=64),
        initializer_factor=8.0)
    torch.manual_seed(0)
    model = transformers.BridgeTowerModel(config).eval()
    model.set_attn_implementation("eager")
    ids = torch.randint(3, 90, (2, 5))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": torch.randn(2, 3, 64, 64)}
    name = "cross_modal_image_layers.0.attention.self"
    with torch.no_grad(), vitmad.record(model, layers=[name]) as rec:
        out = model(**inputs, output_attentions=True)
    assert rec.layers == [name] and rec.skipped == {}
    # out.attentions: per cross-modal layer, the self-attention of its text side and of its image side.
    probabilities = out.attentions[0][1].double().numpy()  # [B, H, 17, 17]: CLS, then the 4 x 4 grid
    rows, cols = np.divmod(np.arange(16), 4)
    centres = (np.stack([rows, cols], -1) + 0.5) * PATCH
    d = np.sqrt(((centres[:, None] - centres[None]) ** 2).sum(-1))
    expected = (probabilities[:, :, 1:, 1:] * d).sum(-1).mean(-1)
    np.testing.assert_allclose(rec.mad[0].double().numpy(), expected, rtol=1e-5, atol=1e-4)


def test_a_forward_through_the_other_tower_is_named_as_such():
    """VideoLlava records its first tower (video_tower); a forward given an image only runs image_tower: the
    error says the model ran without the recorded modules, not that it did not run."""
    vision = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2, image_size=32, patch_size=8)
    text = dict(model_type="llama", vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=2, num_key_value_heads=2, pad_token_id=0)
    config = transformers.VideoLlavaConfig(vision_config=vision, text_config=text, image_token_index=5,
                                           video_token_index=6, vision_feature_layer=-1)
    torch.manual_seed(0)
    model = transformers.VideoLlavaForConditionalGeneration(config).eval()
    ids = torch.full((1, 20), 7)
    ids[0, 1:17] = 5  # 16 image tokens: 4 x 4 patches
    with torch.no_grad(), vitmad.record(model) as rec:
        model(input_ids=ids, pixel_values_images=torch.randn(1, 3, 32, 32))
    # The tower that ran is named, with the recording that takes it (QA 271).
    with pytest.raises(RuntimeError, match=r"ran 1 time\(s\) in this recording, but not through the modules being "
                                           r"recorded \(model\.video_tower\..*\): another image tower of it ran, "
                                           r"model\.image_tower, whose layers this recording skips .*: record it on "
                                           r"its own: vitmad\.record\(model\.get_submodule\('model\.image_tower'\)\)"):
        _ = rec.mad
    # Named in layers=, the other tower is outside the one whose patch embedding places the tokens: skipped.
    with pytest.raises(ValueError, match="outside model.video_tower"):
        vitmad.record(model, layers=["model.image_tower.*self_attn"])
    with torch.no_grad(), vitmad.record(model.model.image_tower) as rec:
        model(input_ids=ids, pixel_values_images=torch.randn(1, 3, 32, 32))
    assert rec.mad.shape == (1, 1, 2)
    # Text alone runs neither tower: the message names that case first (QA helper-114, on Gemma 3).
    with torch.no_grad(), vitmad.record(model) as rec:
        model(input_ids=torch.full((1, 5), 7))
    with pytest.raises(RuntimeError, match=r"took a path without them \(a vision-language model given text alone"):
        _ = rec.mad


def test_a_second_image_tower_is_named_in_skipped_and_records_on_its_own():
    """DeepSeek-VL-Hybrid embeds the image in a high-resolution SAM encoder and a low-resolution SigLIP tower. A
    recording places one tower's tokens (the first): the other's layers were left out silently; they are now in
    rec.skipped with the reason, and a second recording on that tower, at the same time, records them."""
    vision = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, image_size=32, patch_size=8)
    high = dict(model_type="sam_vision_model", hidden_size=32, output_channels=16, num_hidden_layers=2,
                num_attention_heads=4, image_size=64, patch_size=8, window_size=4, global_attn_indexes=[1], mlp_dim=64)
    text = dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=64)
    config = transformers.DeepseekVLHybridConfig(vision_config=vision, high_res_vision_config=high, text_config=text,
                                                 image_token_id=63)
    torch.manual_seed(0)
    model = transformers.DeepseekVLHybridForConditionalGeneration(config).eval()
    ids = torch.cat([torch.tensor([[1, 2]]), torch.full((1, 16), 63), torch.tensor([[3, 4]])], 1)
    inputs = dict(input_ids=ids, pixel_values=torch.randn(1, 3, 32, 32),
                  high_res_pixel_values=torch.randn(1, 3, 64, 64))
    low = model.get_submodule("model.vision_model")
    with torch.no_grad(), vitmad.record(model) as rec, vitmad.record(low) as second:
        model(**inputs)
    assert rec.layers == [f"model.high_res_vision_model.vision_encoder.layers.{i}.attn" for i in range(2)]
    assert list(rec.skipped) == ["model.vision_model.encoder.layers.0.self_attn",
                                 "model.vision_model.encoder.layers.1.self_attn", "model.vision_model.head.attention"]
    assert all("second tower that embeds the image" in r and "model.get_submodule('model.vision_model')" in r
               for r in rec.skipped.values())
    assert second.layers == ["encoder.layers.0.self_attn", "encoder.layers.1.self_attn"]
    with torch.no_grad(), vitmad.record(low) as alone:
        low(pixel_values=inputs["pixel_values"])
    torch.testing.assert_close(second.mad, alone.mad, rtol=0, atol=0)


def test_a_tower_held_by_a_module_named_embedder_is_the_tower():
    """PE-Video (``PeVideoEncoder``) holds its per-frame vision tower in ``embedder.vision_model``, then runs a
    temporal encoder over the frames' embeddings and a CLS. The tower was found from the first path part with
    "embed" in its name: "embedder", which made the whole model the tower, and the temporal encoder was placed as
    the image's patches (refused at best: 2 tokens "fewer than the 2 x 2 patches"). Now the frames are recorded, one
    row per frame, each against its own eager attention: CLS without a position, then 2 x 2 patches of 14 px."""
    vision = dict(architecture="vit_pe_core_large_patch14_336", do_pooling=True, num_classes=16, num_labels=16,
                  global_pool="map", model_args=dict(embed_dim=32, depth=2, num_heads=2, img_size=28, mlp_ratio=2.0))
    config = transformers.PeVideoEncoderConfig(vision_config=vision, hidden_size=32, intermediate_size=64,
                                               num_hidden_layers=1, num_attention_heads=2, head_dim=16)
    from transformers.models.pe_video.modeling_pe_video import PeVideoEncoder

    torch.manual_seed(6)
    model = PeVideoEncoder(config).eval()
    with torch.no_grad():
        for parameter in model.embedder.vision_model.parameters():
            parameter.normal_(std=0.3)
    video = torch.randn(2, 3, 3, 28, 28)  # 2 videos of 3 frames
    tower = model.embedder.vision_model.timm_model
    maps = unfused_maps(tower, "AttentionRope")
    with torch.no_grad():
        plain = model(pixel_values_videos=video).last_hidden_state
    for module in tower.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = True
    with torch.no_grad(), vitmad.record(model) as rec:
        recorded = model(pixel_values_videos=video).last_hidden_state
    torch.testing.assert_close(plain, recorded, rtol=1e-5, atol=1e-6)  # eager against fused: float32 rounding
    assert rec.layers == [f"embedder.vision_model.timm_model.blocks.{i}.attn" for i in (0, 1)]
    assert not any(name.startswith("layers.") for name in rec.skipped) and len(maps) == 2  # the unfused forward
    centres = (torch.tensor([[0, 0], [0, 1], [1, 0], [1, 1]], dtype=torch.float64) + 0.5) * 14
    distance = torch.cdist(centres, centres)
    expected = torch.stack([(m.double()[:, :, 1:, 1:] * distance).sum(-1).mean(-1) for _, m in maps[:2]])
    assert rec.mad.shape == (2, 6, 2)  # a row per frame
    torch.testing.assert_close(rec.mad.double(), expected, rtol=1e-5, atol=1e-4)
