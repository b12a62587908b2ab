"""Towers whose tokens pass the plain layout's count test without being extra tokens and a patch grid: skipped with
the reason (DepthPro's crops, SAM3's windows) or refused, never measured as a grid.

Each case here was measured wrongly, silently, before (against the model's eager attention placed by its own
geometry): DepthPro's crops (one value per crop, in crop pixels). DeepSeek-OCR-2's and Unlimited-OCR's SAM encoders,
refused here before (one padded window measured as 96 "extra tokens" and a 10 x 10 grid), are placed as SAM's now:
tests/recording/test_record_deepseek_ocr_sam.py; so are MiniCPM-V's slices packed in one row (a 4 x 6 image was
measured as 1 x 24): tests/recording/test_record_minicpmv.py, Mllama's concatenated tiles (2.7 px for 22 px):
tests/recording/test_record_mllama.py, and SAM3's windowed blocks, skipped here before (one padded window was read as
7 extra tokens and a 3 x 3 grid): tests/recording/test_record_sam3.py.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

import vitmad  # noqa: E402
from vitmad.recording.recorder import NoLayerError  # noqa: E402


def test_depth_pro_crops_are_skipped_and_its_image_encoder_records():
    dinov2 = dict(model_type="dinov2", hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                  intermediate_size=64, image_size=48, patch_size=16)
    config = transformers.DepthProConfig(
        image_model_config=dinov2, patch_model_config=dinov2, fov_model_config=dinov2, patch_size=48,
        scaled_images_ratios=[0.5, 1.0], scaled_images_overlap_ratios=[0.0, 0.25], scaled_images_feature_dims=[16, 16],
        intermediate_hook_ids=[0], intermediate_feature_dims=[16], merge_padding_value=1, fusion_hidden_size=16,
        num_fov_head_layers=1, use_fov_model=False)
    torch.manual_seed(0)
    model = transformers.DepthProForDepthEstimation(config).eval()
    # Its image encoder has a MAD, recorded on its own: the refusal of the whole model must not say MAD is undefined.
    with pytest.raises(ValueError, match=r"DepthProForDepthEstimation: this recording places none of its layers, and "
                                         r"a tower among them is recorded on its own \(.*patch_encoder.*overlapping "
                                         "crops of a multi-scale pyramid") as refused:
        vitmad.record(model)
    assert "image_encoder.model'))" in str(refused.value) and "not defined" not in str(refused.value)
    encoder = model.depth_pro.encoder.image_encoder.model
    with torch.no_grad(), vitmad.record(encoder) as rec:
        model(pixel_values=torch.randn(1, 3, 96, 96))
    assert rec.mad.shape == (1, 1, 2) and rec.geometry[0].grid == (3, 3)


class _TokenAttention(torch.nn.Module):
    def __init__(self, dim: int = 16, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(dim, 3 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, n, dim = x.shape
        q, k, v = self.qkv(x).reshape(batch, n, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, n, dim)


class _TiledModel(torch.nn.Module):
    """Embeds each tile of an image (the batch holds tiles) and attends over an image's tiles in one sequence, as
    Mllama's tower does: 2 tiles of 4 x 4 patches give 32 tokens, which would pass for 16 extra tokens and a grid."""

    def __init__(self):
        super().__init__()
        self.patch_embed = torch.nn.Module()
        self.patch_embed.proj = torch.nn.Conv2d(3, 16, 8, 8)
        self.attn = _TokenAttention()

    def forward(self, tiles: torch.Tensor) -> torch.Tensor:  # [images * 2, 3, 32, 32]
        tokens = self.patch_embed.proj(tiles).flatten(2).transpose(1, 2)  # [images * 2, 16, 16]
        return self.attn(tokens.reshape(tiles.shape[0] // 2, 32, 16))


def test_udop_text_covered_patches_are_skipped_with_the_reason():
    """UDOP's encoder follows its 5 text tokens with the patches no box covers and zero tokens up to the 4 x 4
    grid's 16: recorded through a wildcard as 5 extra tokens and the full grid, it was 7.7 px off the model's own
    cells (QA helper-239). Named or matched, its attention is not measured; named, the reason says why."""
    config = transformers.UdopConfig(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=1, num_heads=4,
                                     vocab_size=99, image_size=32, patch_size=8)
    torch.manual_seed(0)
    model = transformers.UdopEncoderModel(config).eval()
    centres = torch.tensor([[[0.1, 0.1], [0.6, 0.1], [0.35, 0.6], [0.9, 0.9], [0.1, 0.9]]])
    inputs = dict(input_ids=torch.randint(0, 99, (1, 5)), bbox=torch.cat([centres - 0.05, centres + 0.05], -1),
                  pixel_values=torch.randn(1, 3, 32, 32))
    for recorded, layers in ((model, ["encoder.block.*.layer.0.SelfAttention"]),
                             (model.encoder, ["block.*.layer.0.SelfAttention"])):
        with pytest.raises(NoLayerError):
            with torch.no_grad(), vitmad.record(recorded, layers=layers):
                model(**inputs)
    with pytest.raises(NoLayerError, match=r"block.0.layer.0.SelfAttention: UDOP's encoder follows its text tokens "
                                           r"with the patches whose cells hold no text box's centre"):
        vitmad.record(model.encoder, layers=["block.0.layer.0.SelfAttention"])
    with pytest.raises(NoLayerError):
        vitmad.record(model)


def test_groupvit_is_refused_with_the_reason_at_entry():
    """GroupViT's stages attend, batch and heads merged, over the patches and appended group tokens, then over
    groups; its grouping blocks assign by a hard softmax. It was refused at the first forward as an unknown
    [B * H, N, N] shape, advising layers= of other attention modules it does not have (QA helper-239): now at
    entry, with the reason; its text tower is not concerned."""
    vision = dict(hidden_size=32, intermediate_size=64, depths=[1, 1, 1], num_group_tokens=[4, 2, 0],
                  num_output_groups=[4, 2, 2], num_attention_heads=4, image_size=32, patch_size=8)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=99,
                bos_token_id=0, eos_token_id=1, pad_token_id=1)
    model = transformers.GroupViTModel(transformers.GroupViTConfig(
        text_config=text, vision_config=vision, projection_dim=16, projection_intermediate_dim=16)).eval()
    for recorded in (model, model.vision_model):
        with pytest.raises(NoLayerError, match=r"self_attn: GroupViT's encoder attends, batch and heads merged in one "
                                               r"dim, over the patches and learned group tokens appended after them"):
            vitmad.record(recorded)


def test_an_attention_of_unknown_shape_is_refused_without_sending_the_user_to_layers_it_lacks():
    """SegGPT's attention merges batch and heads ([B * H, N, N] over its prompt and input canvases): refused, saying
    vitmad cannot record it; the advice of layers= was addressed to "SegGptModel's other attention", which it lacks
    (QA 366)."""
    torch.manual_seed(0)
    config = transformers.SegGptConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_dim=64,
                                       image_size=[32, 16], patch_size=8, merge_index=0,
                                       intermediate_hidden_state_indices=[0, 1], decoder_hidden_size=8)
    model = transformers.SegGptModel(config).eval()
    pixels = torch.randn(1, 3, 16, 16)
    with torch.no_grad(), vitmad.record(model), pytest.raises(ValueError, match=(
            r"encoder\.layers\.0\.attention \(SegGptAttention\) of SegGptModel: its attention has shape \[4, 8, 8\] "
            r"\(batch and heads merged in one dim, or no head dim\); .* vitmad does not know the token layout of this "
            r"attention of SegGptModel, so it cannot record it; .* where the model holds other attention that vitmad "
            r"places, leave this module out")):
        model(pixel_values=pixels, prompt_pixel_values=pixels, prompt_masks=pixels)


def test_tiles_regrouped_after_the_patch_embedding_are_refused():
    torch.manual_seed(0)
    model = _TiledModel().eval()
    with torch.no_grad(), vitmad.record(model):
        with pytest.raises(ValueError, match=r"attends over 2 sequences, but the patch embedding patch_embed\.proj "
                                             r"embedded 4 images.*pass positions="):
            model(torch.randn(4, 3, 32, 32))


def test_deformable_attention_is_skipped_with_its_reason():
    """Deformable DETR's attention weighs a few sampled points per query, not the tokens: named, it is skipped."""
    backbone = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 16, 32], depths=[1, 1, 1, 1],
                                         out_features=["stage2", "stage3", "stage4"])
    config = transformers.DeformableDetrConfig(
        backbone_config=backbone, num_feature_levels=3, d_model=32, encoder_layers=1, decoder_layers=2,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, num_queries=5)
    torch.manual_seed(0)
    model = transformers.DeformableDetrForObjectDetection(config).eval()
    with pytest.raises(ValueError, match=r"model\.encoder\.layers\.0\.self_attn: deformable attention: each query's "
                                         r"softmax runs over a few points sampled"):
        vitmad.record(model, layers=["model.encoder.layers.0.self_attn"])


_RESNET = dict(embedding_size=8, hidden_sizes=[8, 16, 16, 32], depths=[1, 1, 1, 1],
               out_features=["stage2", "stage3", "stage4"])
_DETECTOR = dict(num_feature_levels=3, d_model=32, encoder_layers=1, decoder_layers=2, encoder_attention_heads=2,
                 decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, num_queries=5)


def test_a_deformable_detector_on_a_convolutional_backbone_says_why_it_has_no_mad():
    """With a ResNet backbone, Deformable DETR and Grounding DINO have no attention over image tokens: the default
    refused their decoder's object-query self-attention (or Grounding DINO's BERT) for want of a patch embedding,
    advising positions= for them; each attention module is now skipped with its reason, and the refusal names the
    distinct reasons."""
    torch.manual_seed(0)
    deformable = transformers.DeformableDetrModel(transformers.DeformableDetrConfig(
        backbone_config=transformers.ResNetConfig(**_RESNET), **_DETECTOR)).eval()
    with pytest.raises(NoLayerError, match=(
            r"^vitmad\.record: DeformableDetrModel has no layer with spatial softmax attention over positioned "
            r"tokens, so MAD is not defined for it \(encoder\.layers\.0\.self_attn: deformable attention: .* "
            r"\(and 2 more layers\); decoder\.layers\.0\.self_attn: DETR decoder attention: its queries are the "
            r"object queries.*\(and 1 more layer\)\)")):
        vitmad.record(deformable)
    text = transformers.BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                                   vocab_size=100, max_position_embeddings=64)
    grounding = transformers.GroundingDinoModel(transformers.GroundingDinoConfig(
        backbone_config=transformers.ResNetConfig(**_RESNET), text_config=text, max_text_len=16, **_DETECTOR)).eval()
    with pytest.raises(NoLayerError, match=(
            r"GroundingDinoModel has no layer .* \(text_backbone\.encoder\.layer\.0\.attention\.self: Grounding "
            r"DINO's text side .* \(and 1 more layer\); encoder\.layers\.0\.fusion_layer\.attn: Grounding DINO's "
            r"image-text fusion: .*; encoder\.layers\.0\.deformable_layer\.self_attn: deformable attention")):
        vitmad.record(grounding)
    # Every module named by a wildcard: the attention ones skipped, each with its reason, and the norms,
    # projections and convolutions it matched no layers: refused at once, as by default (they were recorded as
    # layers, and the recording refused only when read; QA 258).
    with pytest.raises(NoLayerError, match=(
            r"^vitmad\.record: GroundingDinoModel has no layer .* \(text_backbone\.encoder\.layer\.0\.attention\."
            r"self: Grounding DINO's text side .*; encoder\.layers\.0\.fusion_layer\.attn: .*; encoder\.layers\.0\."
            r"deformable_layer\.self_attn: deformable attention")):
        vitmad.record(grounding, layers=["*"])


class _MergedHeadsAttention(nn.Module):
    """Softmax over [B * H, N, N], batch and heads merged in one dim, as GroupViT's and old CLIP-style eager code."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, x):
        b, n, _ = x.shape
        q, k = (proj(x).view(b, n, self.heads, -1).transpose(1, 2).reshape(b * self.heads, n, -1)
                for proj in (self.q_proj, self.k_proj))
        return torch.softmax(q @ k.transpose(1, 2) * q.shape[-1] ** -0.5, dim=-1)


class _MergedHeads(nn.Module):
    """That attention over a 4 x 4 grid of 8 px patches followed by 4 learned tokens."""

    def __init__(self, dim: int = 32, heads: int = 2):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, 8, 8)
        self.tokens = nn.Parameter(torch.randn(1, 4, dim))
        self.attn = _MergedHeadsAttention(dim, heads)

    def forward(self, pixels):
        x = self.patch_embed(pixels).flatten(2).transpose(1, 2)
        return self.attn(torch.cat([x, self.tokens.expand(x.shape[0], -1, -1)], 1))


def test_attention_with_batch_and_heads_merged_is_refused_saying_so():
    """Attention softmaxed as [B * H, N, N] (GroupViT's, before it was skipped by name): refused, and the message
    says how the shape differs from a plain ViT's (was only that the layout is unknown), and that positions= cannot
    place it either, which is what positions= then says (it advised positions=, which refused the layer in turn)."""
    torch.manual_seed(0)
    model = _MergedHeads().eval()
    pixels = torch.randn(1, 3, 32, 32)
    with pytest.raises(ValueError, match=r"attn .*shape \[2, 20, 20\] \(batch and heads merged in one dim, or no head "
                                         r"dim\).*positions= cannot place it either .*leave this module out with "
                                         r"layers=") as refused:
        with torch.no_grad(), vitmad.record(model, layers=["attn"]):
            model(pixels)
    assert "pass positions=" not in str(refused.value)
    positions = torch.rand(20, 2)
    with pytest.raises(ValueError, match=r"attn .*shape \[2, 20, 20\]; positions= places the tokens of "
                                         r"self-attention \[B, H, N, N\]"):
        with torch.no_grad(), vitmad.record(model, layers=["attn"], positions=positions):
            model(pixels)


def test_fuyu_is_refused_as_a_model_without_a_vision_encoder():
    """Fuyu projects its patches with one Linear straight into its language model: the refusal says so (it said
    "found no attention layer", which its language model does have)."""
    config = transformers.FuyuConfig(
        text_config=dict(model_type="persimmon", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, vocab_size=64), hidden_size=32, patch_size=4, vocab_size=64)
    model = transformers.FuyuForCausalLM(config).eval()
    with pytest.raises(ValueError, match=r"FuyuForCausalLM has no vision encoder: its image patches go through one "
                                         r"Linear \(vision_embed_tokens\) straight into its language model"):
        vitmad.record(model)


def test_an_encoder_free_model_is_refused_with_what_it_may_be():
    """NeoMME embeds image patches with a Linear into its language model: the layers found are the language
    model's, over text and patches mixed. The refusal said only "pass positions=" (QA helper-120); it now names
    the text vocabulary the model embeds and what an encoder-free model is."""
    config = transformers.AutoConfig.for_model(
        "neomme", vocab_size=300, embedding_rank=16, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, patch_size=8, embedding_dim=16, sliding_window=8)
    model = transformers.NeoMMEForMaskedLM(config).eval()
    ids = torch.tensor([[1, 2] + [6] * 4 + [3]])  # four image placeholders, one per 8 x 8 patch given
    with torch.no_grad(), vitmad.record(model), pytest.raises(
            ValueError, match=r"NeoMMEForMaskedLM embeds text tokens, model.embed_tokens.word_embeddings: 300 of "
                              r"them; if it is an encoder-free multimodal model"):
        model(input_ids=ids, pixel_values=torch.randn(4, 3 * 8 * 8))
