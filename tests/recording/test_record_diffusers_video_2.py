"""vitmad.record on more of diffusers' video diffusion transformers: SkyReels-V2, ChronoEdit, Wan-Animate, Wan-VACE,
Cosmos, Kandinsky 5, ConsisID, EasyAnimate, HunyuanVideo 1.5 and Mochi.

Tiny random-weight models, their query / key projections drawn anew and their q / k norm gains raised so that
attention is far from uniform. The reference is each model's own attention: the probabilities of every
F.scaled_dot_product_attention call its processor makes, from the q, k (RoPE applied), scale and mask it handed SDPA
(``_own_attention`` of test_record_diffusers_video). Placed by geometry written here from reading the models' source:

- SkyReels-V2, ChronoEdit, Wan-Animate, Wan-VACE: Wan's ``Conv3d`` ``patch_embedding`` and ``flatten(2)``: the
  tubelets in (frame, row, column) order; Wan-VACE's control blocks attend over the control video's tubelets, cut
  alike by ``vace_patch_embedding``, on the same cells.
- Cosmos: ``CosmosPatchEmbed`` reshapes ``[B, C, F, H, W]`` into ``[B, F/p_t, H/p, W/p, C p_t p p]`` and the model
  flattens dims 1-3: (frame, row, column). Kandinsky 5 takes channels-last ``[B, F, H, W, C]`` and does the same.
- ConsisID: CogVideoX's ``patch_embed``: the text first, then the tubelets. EasyAnimate: the text, then its T5 text,
  then the tubelets a per-frame ``Conv2d`` cuts (``[B, C, F, H, W]`` flattened frames outermost).
- HunyuanVideo 1.5: its ``x_embedder``'s ``Conv3d`` tubelets, then the image, ByT5 and text tokens (each video's valid
  ones first, its padding after them, masked).
- Mochi: one SDPA call per video: its tubelets (per-frame ``Conv2d``, frames outermost), then the text tokens its
  mask keeps.
"""

from __future__ import annotations

import pytest
import torch

import vitmad

diffusers = pytest.importorskip("diffusers")

from test_record_diffusers_video import (  # noqa: E402
    BATCH,
    STAT_TOL,
    STATS,
    TEXT,
    TEXT_DIM,
    _check,
    _own_attention,
    _token_positions,
)

from conftest import statistics_reference  # noqa: E402


def _sharpened(model: torch.nn.Module) -> torch.nn.Module:
    """Query and key projections drawn anew (std 0.5), q / k norm gains x4 (most of these models normalise q and k,
    which undoes a larger projection): attention far from the uniform a tiny init gives."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            leaf = name.split(".")[-2] if "." in name else ""
            if leaf in ("to_q", "to_k", "add_q_proj", "add_k_proj", "to_query", "to_key") and parameter.dim() == 2:
                parameter.normal_(0.0, 0.5)
            elif (leaf.startswith("norm_") and leaf.endswith(("_q", "_k"))) or leaf in ("query_norm", "key_norm"):
                parameter.mul_(4.0)
    return model.eval()


def _wan_config(**changed) -> dict:
    return dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
                text_dim=TEXT_DIM, freq_dim=16, ffn_dim=32, num_layers=2, rope_max_seq_len=32) | changed


def _recorded_and_reference(model, layers, run, stats=STATS):
    """The model's own attention maps of ``layers`` and the recording of the same forward; asserts the output is
    bit-identical with and without recording and the layers recorded are ``layers``."""
    plain = []
    maps = _own_attention(model, layers, lambda: plain.append(run()))
    with torch.no_grad(), vitmad.record(model, reduction="none", stats=stats) as rec:
        recorded = run()
    assert torch.equal(recorded, plain[0]) and rec.layers == layers
    return rec, maps


def test_skyreels_v2_diffusion_forcing_blocks_attend_causally_over_the_tubelets():
    """SkyReels-V2 with diffusion forcing (num_frame_per_block 2, per-frame timesteps): attn1 over 4 latent frames
    of a 3x5 grid (6x10 latents), each block of 2 frames blind to the later block (its boolean mask), placed as Wan's;
    attn2 (text) skipped."""
    torch.manual_seed(0)
    model = _sharpened(diffusers.SkyReelsV2Transformer3DModel(**_wan_config(num_frame_per_block=2)))
    torch.manual_seed(2)
    latents, text = torch.randn(BATCH, 4, 4, 6, 10), torch.randn(BATCH, TEXT, TEXT_DIM)
    timestep = torch.tensor([[900, 900, 500, 500], [800, 800, 300, 300]])  # one per latent frame
    layers = ["blocks.0.attn1", "blocks.1.attn1"]
    rec, maps = _recorded_and_reference(
        model, layers, lambda: model(latents, timestep, text, enable_diffusion_forcing=True).sample)
    assert float(maps[0][:, :, :30, 30:].abs().max()) == 0.0  # the first block's frames do not see the second's
    assert set(rec.skipped) == {"blocks.0.attn2", "blocks.1.attn2"}
    _check(rec, 0, maps, frames=4, grid=(3, 5), patch=2, frame_size=1)


def test_chronoedit_input_and_output_frames_are_placed_where_its_latents_hold_them():
    """ChronoEdit's two latent frames (the input image, the edited one): its rotary embedding puts the second at
    temporal index temporal_skip_len - 1, which changes the logits only; vitmad places the frames where the latent
    video holds them (latent frames 0 and 1), a 3x5 grid each."""
    torch.manual_seed(0)
    model = _sharpened(diffusers.ChronoEditTransformer3DModel(**_wan_config()))
    torch.manual_seed(2)
    latents, text = torch.randn(BATCH, 4, 2, 6, 10), torch.randn(BATCH, TEXT, TEXT_DIM)
    layers = ["blocks.0.attn1", "blocks.1.attn1"]
    rec, maps = _recorded_and_reference(model, layers, lambda: model(latents, torch.tensor([500, 500]), text).sample)
    assert set(rec.skipped) == {"blocks.0.attn2", "blocks.1.attn2"}
    _check(rec, 0, maps, frames=2, grid=(3, 5), patch=2, frame_size=1)


def test_wan_animate_blocks_placed_as_wan_its_face_adapter_skipped():
    """Wan-Animate: the pose latents' tubelets are added to those of latent frames 1..F-1 (same cells), attn1 over
    3 latent frames of a 3x5 grid as Wan's; attn2 (text and CLIP image) and the face adapter's cross-attention to
    each frame's face motion tokens skipped."""
    torch.manual_seed(0)
    model = _sharpened(diffusers.WanAnimateTransformer3DModel(**_wan_config(
        in_channels=12, latent_channels=4, image_dim=8, motion_encoder_channel_sizes={"8": 8, "4": 8},
        motion_encoder_size=8, motion_style_dim=8, motion_dim=4, motion_encoder_dim=8, face_encoder_hidden_dim=8,
        face_encoder_num_heads=2, inject_face_latents_blocks=1, motion_encoder_batch_size=4)))
    torch.manual_seed(2)
    inputs = (torch.randn(BATCH, 12, 3, 6, 10), torch.tensor([500, 500]), torch.randn(BATCH, TEXT, TEXT_DIM))
    conditions = dict(encoder_hidden_states_image=torch.randn(BATCH, 3, 8),
                      pose_hidden_states=torch.randn(BATCH, 4, 2, 6, 10),
                      face_pixel_values=torch.randn(BATCH, 3, 8, 8, 8))
    layers = ["blocks.0.attn1", "blocks.1.attn1"]
    rec, maps = _recorded_and_reference(model, layers, lambda: model(*inputs, **conditions).sample)
    assert set(rec.skipped) == {"blocks.0.attn2", "blocks.1.attn2", "face_adapter.0", "face_adapter.1"}
    assert "face motion tokens" in rec.skipped["face_adapter.0"]
    _check(rec, 0, maps, frames=3, grid=(3, 5), patch=2, frame_size=1)


def _vace():
    torch.manual_seed(0)
    return _sharpened(diffusers.WanVACETransformer3DModel(**_wan_config(vace_layers=[0, 1], vace_in_channels=8)))


def test_wan_vace_control_blocks_attend_over_the_control_tubelets_on_the_video_grid():
    """Wan-VACE: its VACE blocks run first, each attn1 over the control video's tubelets (cut by
    vace_patch_embedding like the video's, rotary positions the video's), then the Wan blocks over the video's: all
    on the 3 latent frames of a 3x5 grid; every attn2 (text) skipped."""
    model = _vace()
    torch.manual_seed(2)
    latents, text, control = torch.randn(BATCH, 4, 3, 6, 10), torch.randn(BATCH, TEXT, TEXT_DIM), torch.randn(
        BATCH, 8, 3, 6, 10)
    layers = ["vace_blocks.0.attn1", "vace_blocks.1.attn1", "blocks.0.attn1", "blocks.1.attn1"]
    rec, maps = _recorded_and_reference(
        model, layers, lambda: model(latents, torch.tensor([500, 500]), text, control_hidden_states=control).sample)
    assert set(rec.skipped) == {f"{blocks}.{i}.attn2" for blocks in ("blocks", "vace_blocks") for i in (0, 1)}
    _check(rec, 0, maps, frames=3, grid=(3, 5), patch=2, frame_size=1)


def test_wan_vace_control_video_of_another_grid_is_refused():
    """A control video with fewer latent frames is padded with zero tokens to the video's count: its tubelets no
    longer at the cells their rotary positions give. Refused, not placed on the video's grid."""
    model = _vace()
    with vitmad.record(model), torch.no_grad(), pytest.raises(ValueError, match=(
            r"vace_blocks\.0\.attn1 .*its control tubelets \(vace_patch_embedding: \[B, F', H', W'\] = "
            r"\[1, 2, 2, 3\]\) are not the video's \[1, 3, 2, 3\]")):
        model(torch.randn(1, 4, 3, 4, 6), torch.tensor([500]), torch.randn(1, TEXT, TEXT_DIM),
              control_hidden_states=torch.randn(1, 8, 2, 4, 6))


def test_cosmos_attends_over_the_tubelets_its_patch_embed_reshapes():
    """Cosmos (patch 2x2x2): 4 latent frames of 6x10 latents -> 2x3x5 tubelets, each at the centre of its 2
    latent frames; attn2 (text) skipped."""
    torch.manual_seed(0)
    model = _sharpened(diffusers.CosmosTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2,
        text_embed_dim=TEXT_DIM, adaln_lora_dim=4, max_size=(8, 16, 16), patch_size=(2, 2, 2),
        concat_padding_mask=False, extra_pos_embed_type=None))
    torch.manual_seed(2)
    latents, text = torch.randn(BATCH, 4, 4, 6, 10), torch.randn(BATCH, TEXT, TEXT_DIM)
    layers = ["transformer_blocks.0.attn1", "transformer_blocks.1.attn1"]
    rec, maps = _recorded_and_reference(model, layers, lambda: model(latents, torch.tensor([500, 500]), text).sample)
    assert set(rec.skipped) == {"transformer_blocks.0.attn2", "transformer_blocks.1.attn2"}
    _check(rec, 0, maps, frames=2, grid=(3, 5), patch=2, frame_size=2)


def _kandinsky5():
    torch.manual_seed(0)
    return _sharpened(diffusers.Kandinsky5Transformer3DModel(
        in_visual_dim=4, in_text_dim=TEXT_DIM, in_text_dim2=8, time_dim=16, out_visual_dim=4, patch_size=(1, 2, 2),
        model_dim=32, ff_dim=64, num_text_blocks=1, num_visual_blocks=2, axes_dims=(4, 6, 6), visual_cond=False))


def test_kandinsky5_visual_blocks_are_placed_text_blocks_and_cross_attention_skipped():
    """Kandinsky 5 takes channels-last latents [B, F, H, W, C]: 3 latent frames of 6x10 latent pixels, patch 1x2x2;
    its visual blocks' self_attention over the tubelets; its text blocks (text alone) and cross_attention skipped."""
    model = _kandinsky5()
    torch.manual_seed(2)
    inputs = (torch.randn(BATCH, 3, 6, 10, 4), torch.randn(BATCH, TEXT, TEXT_DIM), torch.tensor([500.0, 500.0]),
              torch.randn(BATCH, 8), [torch.arange(3), torch.arange(3), torch.arange(5)], torch.arange(TEXT))
    layers = ["visual_transformer_blocks.0.self_attention", "visual_transformer_blocks.1.self_attention"]
    rec, maps = _recorded_and_reference(model, layers, lambda: model(*inputs).sample)
    assert set(rec.skipped) == {"text_transformer_blocks.0.self_attention",
                                "visual_transformer_blocks.0.cross_attention",
                                "visual_transformer_blocks.1.cross_attention"}
    assert "text tokens" in rec.skipped["text_transformer_blocks.0.self_attention"]
    _check(rec, 0, maps, frames=3, grid=(3, 5), patch=2, frame_size=1)


def test_kandinsky5_sparse_attention_is_refused():
    """With sparse_params its visual tokens attend through NABLA's block mask (its map estimate a softmax of its
    own): refused at the first visual block, with what to pass."""
    model = _kandinsky5()
    sparse = dict(to_fractal=False, sta_mask=torch.ones(1, 2, 1, 1, dtype=torch.bool), P=0.9)
    with vitmad.record(model), torch.no_grad(), pytest.raises(ValueError, match=(
            r"visual_transformer_blocks\.0\.self_attention .*sparse_params \(NABLA sparse attention\).*record it "
            "without sparse_params")):
        model(torch.randn(1, 1, 16, 16, 4), torch.randn(1, TEXT, TEXT_DIM), torch.tensor([500.0]), torch.randn(1, 8),
              [torch.arange(1), torch.arange(8), torch.arange(8)], torch.arange(TEXT), sparse_params=sparse)


def test_consisid_text_first_its_face_identity_attention_skipped():
    """ConsisID (CogVideoX's blocks, with its face modules): the text first, then 3 latent frames of a 3x5 grid;
    the identity extractor's and the tubelets' cross-attention to the identity tokens (their own softmax) skipped."""
    torch.manual_seed(0)
    model = _sharpened(diffusers.ConsisIDTransformer3DModel(
        num_attention_heads=2, attention_head_dim=24, in_channels=4, out_channels=4, time_embed_dim=8,
        text_embed_dim=TEXT_DIM, num_layers=2, sample_width=12, sample_height=8, sample_frames=9, patch_size=2,
        temporal_compression_ratio=4, max_text_seq_length=TEXT, is_train_face=True, cross_attn_interval=1,
        cross_attn_dim_head=8, cross_attn_num_heads=2, LFE_id_dim=8, LFE_vit_dim=16, LFE_depth=2, LFE_dim_head=8,
        LFE_num_heads=2, LFE_num_id_token=2, LFE_num_querie=4, LFE_output_dim=32, LFE_ff_mult=1, LFE_num_scale=2))
    torch.manual_seed(2)
    latents, text = torch.randn(BATCH, 3, 4, 6, 10), torch.randn(BATCH, TEXT, TEXT_DIM)
    face = dict(id_vit_hidden=[torch.randn(BATCH, 3, 16) for _ in range(2)], id_cond=torch.randn(BATCH, 8))
    layers = ["transformer_blocks.0.attn1", "transformer_blocks.1.attn1"]
    rec, maps = _recorded_and_reference(
        model, layers, lambda: model(latents, text, torch.tensor([500, 500]), **face).sample)
    assert set(rec.skipped) == {"local_facial_extractor.layers.0.0", "local_facial_extractor.layers.1.0",
                                "perceiver_cross_attention.0", "perceiver_cross_attention.1"}
    assert "identity" in rec.skipped["perceiver_cross_attention.0"]
    _check(rec, 0, maps, frames=3, grid=(3, 5), patch=2, frame_size=1, prefix=TEXT)


def test_easyanimate_its_text_and_t5_text_come_first():
    """EasyAnimate: its text (5 tokens), then its T5 text (3), then the tubelets of 3 latent frames of a 3x5 grid
    its per-frame Conv2d cuts; two denoising steps kept apart."""
    torch.manual_seed(0)
    model = _sharpened(diffusers.EasyAnimateTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, patch_size=2, num_layers=2,
        mmdit_layers=2, time_embed_dim=8, text_embed_dim=TEXT_DIM, text_embed_dim_t5=12, sample_width=12,
        sample_height=8))
    torch.manual_seed(2)
    latents = torch.randn(BATCH, 4, 3, 6, 10)
    text = dict(encoder_hidden_states=torch.randn(BATCH, TEXT, TEXT_DIM),
                encoder_hidden_states_t5=torch.randn(BATCH, 3, 12))
    layers = ["transformer_blocks.0.attn1", "transformer_blocks.1.attn1"]
    steps = [torch.tensor([900, 900]), torch.tensor([100, 100])]
    maps, plain = [], []
    for timestep in steps:
        maps.append(_own_attention(model, layers, lambda t=timestep: plain.append(model(latents, t, **text).sample)))
    with torch.no_grad(), vitmad.record(model, reduction="none", stats=STATS) as rec:
        recorded = [model(latents, t, **text).sample for t in steps]
    assert all(torch.equal(a, b) for a, b in zip(recorded, plain)) and rec.layers == layers and len(rec.calls) == 2
    for call in range(2):
        _check(rec, call, maps[call], frames=3, grid=(3, 5), patch=2, frame_size=1, prefix=TEXT + 3)


def test_hunyuan_video15_image_byt5_and_text_tokens_come_last_refiner_skipped():
    """HunyuanVideo 1.5: the tubelets of 3 latent frames of a 3x5 grid, then 4 image, 3 ByT5 and 5 text tokens
    (12 without a position; the second video's last 2 text tokens padding, masked); its token refiner skipped."""
    torch.manual_seed(0)
    model = _sharpened(diffusers.HunyuanVideo15Transformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=2,
        num_refiner_layers=1, patch_size=2, patch_size_t=1, text_embed_dim=TEXT_DIM, text_embed_2_dim=12,
        image_embed_dim=8, rope_axes_dim=(2, 2, 4)))
    torch.manual_seed(2)
    mask = torch.ones(BATCH, TEXT, dtype=torch.long)
    mask[1, -2:] = 0
    inputs = (torch.randn(BATCH, 4, 3, 6, 10), torch.tensor([500.0, 500.0]), torch.randn(BATCH, TEXT, TEXT_DIM), mask)
    extra = dict(encoder_hidden_states_2=torch.randn(BATCH, 3, 12), encoder_attention_mask_2=torch.ones(BATCH, 3),
                 image_embeds=torch.randn(BATCH, 4, 8))
    layers = ["transformer_blocks.0.attn", "transformer_blocks.1.attn"]
    rec, maps = _recorded_and_reference(model, layers, lambda: model(*inputs, **extra).sample)
    assert float(maps[0][1, :, :45, -2:].abs().max()) == 0.0  # the padding keys really are masked
    assert list(rec.skipped) == ["context_embedder.token_refiner.refiner_blocks.0.attn"]
    _check(rec, 0, maps, frames=3, grid=(3, 5), patch=2, frame_size=1, suffix=4 + 3 + TEXT, stats=False)
    # Its mask hides the padding tokens as queries too: their rows have no key to attend to, NaN in the softmax
    # written out and in the recording (SDPA's output there is zero). Every other row is compared as _check does.
    space, _ = _token_positions(3, (3, 5), 2, 1, 0, 4 + 3 + TEXT)
    for layer, probabilities in enumerate(maps):
        assert bool(probabilities[1, :, -2:].isnan().all()) and not bool(probabilities[:, :, :-2].isnan().any())
        expected = statistics_reference(probabilities, space)
        for stat in ("entropy", "prefix_mass"):
            torch.testing.assert_close(rec.calls[0].statistics[stat][layer].double(), expected[stat], **STAT_TOL)
        torch.testing.assert_close(rec.calls[0].prefix_maps[layer].double(), expected["prefix_maps"], equal_nan=True,
                                   **STAT_TOL)


def _mochi():
    torch.manual_seed(0)
    return _sharpened(diffusers.MochiTransformer3DModel(
        patch_size=2, num_attention_heads=2, attention_head_dim=8, num_layers=2, pooled_projection_dim=8,
        in_channels=4, text_embed_dim=TEXT_DIM, time_embed_dim=8))


@pytest.mark.filterwarnings("ignore:In CPU autocast, but the target dtype is not supported")  # Mochi's RoPE, on CPU
def test_mochi_one_attention_call_per_video_over_its_tubelets_then_its_valid_text():
    """Mochi's processor calls SDPA once per video, over its tubelets (per-frame Conv2d, frames outermost: 3 latent
    frames of a 3x5 grid) then the text tokens its mask keeps (4 of 5: the padding dropped, not masked); the
    calls joined, each video's tubelets folded onto its own grid. Its caption attention pooling skipped."""
    model = _mochi()
    torch.manual_seed(2)
    mask = torch.ones(BATCH, TEXT, dtype=torch.long)
    mask[:, -1] = 0
    inputs = (torch.randn(BATCH, 4, 3, 6, 10), torch.randn(BATCH, TEXT, TEXT_DIM), torch.tensor([500, 500]), mask)
    layers = ["transformer_blocks.0.attn1", "transformer_blocks.1.attn1"]
    rec, calls = _recorded_and_reference(model, layers, lambda: model(*inputs).sample)
    assert len(calls) == 2 * BATCH and all(c.shape == (1, 2, 45 + TEXT - 1, 45 + TEXT - 1) for c in calls)
    maps = [torch.cat(calls[layer * BATCH:(layer + 1) * BATCH]) for layer in range(2)]  # [B, H, n, n] per layer
    assert list(rec.skipped) == ["time_embed.pooler"]
    _check(rec, 0, maps, frames=3, grid=(3, 5), patch=2, frame_size=1, suffix=TEXT - 1)


@pytest.mark.filterwarnings("ignore:In CPU autocast, but the target dtype is not supported")
def test_mochi_videos_keeping_text_of_different_lengths_are_refused():
    """Each video's call ends with its own text count: no one layout of the layer's text rows. Refused, with what
    to pass."""
    model = _mochi()
    mask = torch.ones(BATCH, TEXT, dtype=torch.long)
    mask[1, -2:] = 0
    with vitmad.record(model), torch.no_grad(), pytest.raises(ValueError, match=(
            r"transformer_blocks\.0\.attn1 \(MochiAttention\).*its videos keep \[5, 3\] text tokens")):
        model(torch.randn(BATCH, 4, 2, 4, 6), torch.randn(BATCH, TEXT, TEXT_DIM), torch.tensor([1, 1]), mask)


class _MochiAttentionOutOfSight:
    """A processor that attends where vitmad does not look (a custom kernel): no attention call reaches vitmad."""

    def __call__(self, attn, hidden_states, encoder_hidden_states, *args, **kwargs):
        return hidden_states, encoder_hidden_states


@pytest.mark.filterwarnings("ignore:In CPU autocast, but the target dtype is not supported")
def test_mochi_processor_that_attends_out_of_sight_is_refused():
    model = _mochi()
    model.transformer_blocks[1].attn1.processor = _MochiAttentionOutOfSight()
    with vitmad.record(model), torch.no_grad(), pytest.raises(ValueError, match=(
            r"transformer_blocks\.1\.attn1 \(MochiAttention\).*it runs the attention processor "
            "_MochiAttentionOutOfSight .*not MochiAttnProcessor2_0")):
        model(torch.randn(1, 4, 2, 4, 6), torch.randn(1, TEXT, TEXT_DIM), torch.tensor([1]),
              torch.ones(1, TEXT, dtype=torch.long))
