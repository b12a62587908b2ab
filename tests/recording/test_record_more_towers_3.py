"""vitmad.record on transformers 5.25.0 towers that no other test named (QA helper h132 checked them by hand):
Step3p7's vision tower (alone and inside the whole model, its global view and local crops), Gemma 3n's MobileNetV5
tower (through transformers' TimmWrapperModel and inside Gemma3nForConditionalGeneration, its audio conformer never
taken for the image), Apertus 1.5's VQGAN vision tokenizer, TVP's text-visual encoder and the PE-Video / PE-Audio-Video
models.

Tiny random-weight models, sharpened so that attention is far from uniform. The reference is each model's own eager
attention probabilities (its modeling file's eager attention function, timm's unfused path, or the probabilities the
model returns), placed by the layout written here from each model's source, reduced in float64.
"""

from __future__ import annotations

import math

import pytest
import torch

import vitmad
from conftest import (
    check_prefix_and_grid,
    eager_attention_calls,
    record_both_reductions,
    sharpened,
    statistics_reference,
    unfused_maps,
)
from vitmad.ops.reference import mad_positions_reference
from vitmad.recording.recorder import NoLayerError

transformers = pytest.importorskip("transformers")
timm = pytest.importorskip("timm")

STATS = ["entropy", "prefix_mass", "prefix_maps"]
TOL = {"rtol": 1e-5, "atol": 1e-4}  # pixels: float32 attention against a float64 reference


def _centres(rows: int, cols: int, stride: float) -> torch.Tensor:
    """``[rows * cols, 2]`` float64: the centre ``((r + 0.5) * stride, (c + 0.5) * stride)`` of each cell, row-major."""
    r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    return (torch.stack([r, c], -1).reshape(-1, 2).double() + 0.5) * stride


# Step3p7 -------------------------------------------------------------------------------------------------------------
# Step3p7VisionModel (modeling_step3p7.py): a bias-free patch convolution, a learned position table interpolated to the
# grid (no class token), pre-norm layers with an axial 2-D RoPE over the row-major grid (it rotates q and k, it moves
# no token), then two stride-2 convolutions after the last layer that the attention never sees. Every token is patch
# (r, c) of the row-major H // p x W // p grid, at ((r + 0.5) p, (c + 0.5) p) px.

STEP3_VISION = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=48, patch_size=8,
                    mlp_ratio=2.0, max_position_embeddings=36)


def _step3p7_modeling():
    from transformers.models.step3p7 import modeling_step3p7

    return modeling_step3p7


def _peaked_positions(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with its patch convolution and position table drawn anew (the initial ones make tokens alike)."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "patch_embedding" in name:
                parameter.normal_(std=parameter[0].numel() ** -0.5)
            elif "position_embedding" in name:
                parameter.normal_()
    return model


def test_step3p7_vision_tower_alone_matches_its_eager_attention():
    torch.manual_seed(0)
    model = _peaked_positions(sharpened(transformers.Step3p7VisionModel(
        transformers.Step3p7VisionConfig(**STEP3_VISION))))
    images = torch.randn(2, 3, 43, 61, generator=torch.Generator().manual_seed(1))  # 5 x 7 patches, edges cut off
    calls = eager_attention_calls(_step3p7_modeling(), model, images)
    model.set_attn_implementation("sdpa")
    rec, rec_tokens = record_both_reductions(model, lambda m: m(images), lambda out: out.last_hidden_state, STATS)
    assert [model.get_submodule(layer) for layer in rec.layers] == [m for m, _ in calls]
    check_prefix_and_grid(rec, rec_tokens, [p for _, p in calls], (5, 7), 8, 0)


def _step3p7_model():
    text = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1, head_dim=16, moe_intermediate_size=16, n_routed_experts=4,
                num_experts_per_tok=2, share_expert_dim=16, mlp_layer_types=["dense"], pad_token_id=0,
                sliding_window=8)
    config = transformers.Step3p7Config(vision_config=STEP3_VISION, text_config=text, image_token_id=90)
    torch.manual_seed(0)
    return _peaked_positions(sharpened(transformers.Step3p7ForConditionalGeneration(config)))


def test_step3p7_whole_model_records_its_global_view_and_its_crops_each_on_its_own_grid():
    """Step3p7Model.get_image_features runs the tower on the global view (48 x 48: 6 x 6 patches, 2 x 2 tokens after
    the downsamplers), then on the local crops (32 x 32: 4 x 4 patches, one token each): two runs in one forward, each
    its own entry of rec.calls on its own grid; the language model is not recorded."""
    model = _step3p7_model()
    gen = torch.Generator().manual_seed(1)
    inputs = dict(input_ids=torch.tensor([[2] + [90] * 6 + [10, 11]]), pixel_values=torch.randn(1, 3, 48, 48,
                                                                                               generator=gen),
                  pixel_values_local=torch.randn(2, 3, 32, 32, generator=gen), num_local_patches=[2])
    calls = eager_attention_calls(_step3p7_modeling(), model, **inputs)
    tower = set(model.model.vision_model.modules())
    calls = [(m, p) for m, p in calls if m in tower]
    assert len(calls) == 4  # two layers on the global view, then two on the crops
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        plain = model(**inputs).logits
        for reduction in ("mean", "none"):
            with vitmad.record(model, stats=["entropy"], reduction=reduction) as rec:
                with pytest.warns(UserWarning, match=r"ran its recorded layers 2 times"):
                    recorded = model(**inputs).logits
            assert torch.equal(plain, recorded)
            assert rec.layers == [f"model.vision_model.layers.{i}.self_attn" for i in (0, 1)] and rec.skipped == {}
            assert len(rec.calls) == 2
            for call, grid, maps in zip(rec.calls, [(6, 6), (4, 4)], [calls[:2], calls[2:]], strict=True):
                for layer, (_, probabilities) in enumerate(maps):
                    assert call.geometry[layer].grid == grid and call.geometry[layer].stride == (8.0, 8.0)
                    expected = statistics_reference(probabilities, _centres(*grid, 8))
                    assert float(expected["entropy"].mean()) < 0.75 * math.log(probabilities.shape[-1])
                    values = {"mad": call.per_layer[layer], "entropy": call.statistics["entropy"][layer]}
                    for stat, value in values.items():
                        want = expected[stat] if reduction == "none" else expected[stat].mean(-1)
                        torch.testing.assert_close(value.double(), want, **TOL)


# Gemma 3n ------------------------------------------------------------------------------------------------------------
# Gemma3nVisionConfig builds transformers' TimmWrapperModel around timm's mobilenetv5_300m_enc (padding "same"), here
# with a small block list of the same kinds. Every strided convolution pads "same": ceil(n / 2) outputs. The stem and
# the first three stages halve the map four times (stride 16): stage 2's MultiQueryAttention2d blocks attend from every
# cell of that map to the keys of a stride-2 depthwise convolution (kv_stride 2, "v2"): ceil(n / 2) per axis, each at
# the centre of its 32 px cell; stage 3 (stride 32) attends from every cell to every cell. The attention is taken from
# timm's unfused path (the input of its attn_drop).

GEMMA3N_BLOCKS = [["er_r1_k3_s2_e4_c16"], ["uir_r1_a3_k5_s2_e6_c16"],
                  ["uir_r1_a5_k5_s2_e6_c32", "mqa_r1_k3_h2_v2_s1_d8_c32", "uir_r1_a0_k0_s1_e2_c32"],
                  ["uir_r1_a5_k5_s2_e6_c32", "mqa_r1_k3_h2_s1_d8_c32", "uir_r1_a0_k0_s1_e2_c32"]]
GEMMA3N_PIXELS = (72, 104)  # 36 x 52, 18 x 26, 9 x 13, then 5 x 7 (stride 16) and 3 x 4 (stride 32)


def _gemma3n_vision() -> dict:
    from timm.models._efficientnet_builder import decode_arch_def

    return dict(model_args=dict(block_args=decode_arch_def(GEMMA3N_BLOCKS), stem_size=16, msfa_output_resolution=2))


def _gemma3n_layers() -> list[tuple[torch.Tensor, torch.Tensor, tuple[int, int], float]]:
    """(query centres, key centres, query grid, stride) of the two attention blocks, written from the block list."""
    h16, w16 = [math.ceil(n / 16) for n in GEMMA3N_PIXELS]
    h32, w32 = math.ceil(h16 / 2), math.ceil(w16 / 2)
    return [(_centres(h16, w16, 16), _centres(h32, w32, 32), (h16, w16), 16.0),
            (_centres(h32, w32, 32), _centres(h32, w32, 32), (h32, w32), 32.0)]


def _sharpen_multi_query(model: torch.nn.Module, run) -> list:
    """Each MultiQueryAttention2d's query and key projections scaled to outputs of standard deviation 3 (peaked
    attention; a tiny MobileNetV5's are far smaller), then switched to the unfused path: its probabilities in call
    order, filled as ``run()`` runs."""
    attention = [m for m in model.modules() if type(m).__name__ == "MultiQueryAttention2d"]
    spreads = {}
    handles = [p.register_forward_hook(lambda m, a, out: spreads.__setitem__(m, out.std()))
               for m in attention for p in (m.query.proj, m.key.proj)]
    with torch.no_grad():
        run()
    for handle in handles:
        handle.remove()
    with torch.no_grad():
        for module in attention:
            module.query.proj.weight.mul_(3.0 / spreads[module.query.proj])
            module.key.proj.weight.mul_(3.0 / spreads[module.key.proj])
    maps = unfused_maps(model, "MultiQueryAttention2d")
    with torch.no_grad():
        run()
    for module in attention:
        module.fused_attn = True
    return [p.double() for _, p in maps]


def _check_gemma3n(rec, maps) -> None:
    assert len(rec.per_layer) == len(maps) == 2 and rec.skipped == {}
    for recorded, geometry, probabilities, (queries, keys, grid, stride) in zip(
            rec.per_layer, rec.geometry, maps, _gemma3n_layers(), strict=True):
        assert probabilities.shape[-2:] == (len(queries), len(keys))
        assert float(probabilities.amax(-1).mean()) > 3.0 / probabilities.shape[-1]  # far from uniform
        assert geometry.grid == grid and geometry.stride == (stride, stride)
        torch.testing.assert_close(recorded.double(), mad_positions_reference(probabilities, queries, keys), **TOL)


def test_gemma3n_vision_tower_through_timm_wrapper_matches_its_unfused_attention():
    torch.manual_seed(0)
    model = transformers.AutoModel.from_config(transformers.Gemma3nVisionConfig(**_gemma3n_vision())).eval()
    pixels = torch.randn(2, 3, *GEMMA3N_PIXELS, generator=torch.Generator().manual_seed(1))
    maps = _sharpen_multi_query(model, lambda: model(pixel_values=pixels, do_pooling=False))
    with torch.no_grad():
        plain = model(pixel_values=pixels, do_pooling=False).last_hidden_state
        with vitmad.record(model) as rec:
            recorded = model(pixel_values=pixels, do_pooling=False).last_hidden_state
    assert torch.equal(plain, recorded)
    assert rec.layers == ["timm_model.blocks.2.1.attn", "timm_model.blocks.3.1.attn"]
    _check_gemma3n(rec, maps)


def _gemma3n_model():
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                head_dim=16, hidden_size_per_layer_input=8, laurel_rank=4, num_kv_shared_layers=0, altup_num_inputs=2,
                sliding_window=8, layer_types=["sliding_attention", "full_attention"],
                activation_sparsity_pattern=[0.0, 0.0])
    audio = dict(hidden_size=32, conf_num_attention_heads=2, conf_num_hidden_layers=1, input_feat_size=16,
                 sscp_conv_channel_size=[8, 8], conf_attention_chunk_size=4, conf_attention_context_left=5)
    config = transformers.Gemma3nConfig(text_config=text, vision_config=_gemma3n_vision(), audio_config=audio,
                                        vision_soft_tokens_per_image=4, audio_soft_tokens_per_image=8)
    torch.manual_seed(0)
    model = transformers.Gemma3nForConditionalGeneration(config).eval()
    ids = torch.tensor([[2, config.boi_token_id] + [config.image_token_id] * 4 + [config.eoi_token_id,
                         config.boa_token_id] + [config.audio_token_id] * 8 + [config.eoa_token_id, 10, 11]])
    gen = torch.Generator().manual_seed(1)
    inputs = dict(input_ids=ids, pixel_values=torch.randn(1, 3, *GEMMA3N_PIXELS, generator=gen),
                  input_features=torch.randn(1, 40, 16, generator=gen),
                  input_features_mask=torch.ones(1, 40, dtype=torch.bool))
    return model, inputs


def test_gemma3n_whole_model_records_its_vision_tower_and_never_its_audio_attention():
    """Gemma3nForConditionalGeneration given an image and audio: the MobileNetV5 tower is recorded as alone; the
    audio conformer's attention (chunked local attention over time frames, logits soft-capped) is not recorded by
    default and, named in layers= (with positions= or num_prefix_tokens= too), is skipped as audio, never placed as
    image tokens; the audio encoder recorded alone is refused with that reason."""
    model, inputs = _gemma3n_model()
    maps = _sharpen_multi_query(model, lambda: model(**inputs))
    with torch.no_grad():
        plain = model(**inputs).logits
        with vitmad.record(model) as rec:
            recorded = model(**inputs).logits
    assert torch.equal(plain, recorded)
    assert rec.layers == [f"model.vision_tower.timm_model.blocks.{i}.1.attn" for i in (2, 3)]
    _check_gemma3n(rec, maps)
    audio = "model.audio_tower.conformer.0.attention.attn"
    with torch.no_grad(), vitmad.record(model, layers=["model.vision_tower.*", audio]) as named:
        model(**inputs)
    assert named.layers == rec.layers and list(named.skipped) == [audio]
    assert named.skipped[audio].startswith("attention over audio frames (Gemma 3n's audio conformer")
    for given in ({"num_prefix_tokens": 0}, {"positions": torch.zeros(4, 2)}, {"patch": 16, "grid": (2, 5)}):
        with pytest.raises(NoLayerError, match=r"conformer\.0\.attention\.attn: attention over audio frames"):
            with vitmad.record(model, layers=[audio], **given):
                model(**inputs)
    with pytest.raises(NoLayerError, match=r"conformer\.0\.attention\.attn: attention over audio frames"):
        with vitmad.record(model.model.audio_tower):
            model(**inputs)


# Apertus 1.5 ---------------------------------------------------------------------------------------------------------
# Apertus1p5VisionTokenizerModel (modeling_apertus1p5.py) is a VQGAN encoder: conv_in (3 x 3, stride 1, padding 1),
# stages of ResNet blocks (3 x 3, padding 1; 1 x 1 shortcuts), each stage but the last ending in a downsampling that
# pads the bottom and right by one and convolves 3 x 3 with stride 2 (floor(n / 2) outputs), then a middle block. The
# stages at a resolution in attn_resolutions and the middle block hold Apertus1p5VisionTokenizerAttnBlock: one head
# over every cell of its [B, C, H, W] map, row-major, its own F.softmax [B, N, N] (the reference, caught as it runs).
# Here the third stage (two downsamplings: stride 4) and the middle block attend.

APERTUS_VISION = dict(codebook_size=64, embed_dim=32, latent_channels=32, base_channels=32,
                      channel_multiplier=(1, 1, 2), num_res_blocks=1, attn_resolutions=(16,), resolution=64)


def _apertus_maps(model: torch.nn.Module, run,
                  block: str = "Apertus1p5VisionTokenizerAttnBlock") -> list[torch.Tensor]:
    """Each attention block's (class ``block``) query and key convolutions scaled 4 times (peaked attention), then
    the [B, N, N] softmax of every block in one ``run()``, float64, in call order."""
    with torch.no_grad():
        for module in model.modules():
            if type(module).__name__ == block:
                module.q.weight.mul_(4.0)
                module.k.weight.mul_(4.0)
    from conftest import SoftmaxOutputs

    with torch.no_grad(), SoftmaxOutputs(rank=3) as spy:
        run()
    return [p.double() for p in spy.maps]


def _check_single_head(call, maps, grid: tuple[int, int], stride: float) -> None:
    centres = _centres(*grid, stride)
    assert len(call.per_layer) == len(maps) == 2
    for recorded, geometry, probabilities in zip(call.per_layer, call.geometry, maps, strict=True):
        assert probabilities.shape[-1] == grid[0] * grid[1]
        expected = statistics_reference(probabilities[:, None], centres)
        assert float(expected["entropy"].mean()) < 0.75 * math.log(probabilities.shape[-1])
        assert geometry.grid == grid and geometry.stride == (stride, stride) and geometry.heads == 1
        torch.testing.assert_close(recorded.double(), expected["mad"].mean(-1), **TOL)


def test_apertus1p5_vision_tokenizer_attention_blocks_on_their_stage_map():
    """74 x 90 px: 37 x 45 after the first downsampling, 18 x 22 after the second (stride 4), where both blocks
    attend; the tokenizer has no forward, its encode runs the encoder."""
    torch.manual_seed(0)
    model = transformers.Apertus1p5VisionTokenizerModel(
        transformers.Apertus1p5VisionTokenizerConfig(**APERTUS_VISION)).eval()
    pixels = torch.randn(2, 3, 74, 90, generator=torch.Generator().manual_seed(1))
    maps = _apertus_maps(model, lambda: model.encode(pixels))
    with torch.no_grad():
        plain = model.encode(pixels).image_tokens
        with vitmad.record(model) as rec:
            recorded = model.encode(pixels).image_tokens
    assert torch.equal(plain, recorded)
    assert rec.layers == ["encoder.stages.2.layers.0.attention", "encoder.mid.attn_1"] and rec.skipped == {}
    _check_single_head(rec.calls[0], maps, (18, 22), 4.0)


def test_apertus1p5_whole_model_records_its_vision_tokenizer_per_image_not_its_language_model():
    """Apertus1p5ForConditionalGeneration tokenizes each image alone, cropped to its image_sizes (32 x 48: 8 x 12
    cells; 24 x 40: 6 x 10): one run of the tokenizer per image, each its own entry of rec.calls; the language model
    (causal) is not the tower and is not recorded."""
    text = dict(vocab_size=200, pad_token_id=3, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=2, num_key_value_heads=1)
    audio = dict(model_type="wavtokenizer_encoder", num_filters=4, upsampling_ratios=[2, 2], hidden_size=16,
                 codebook_size=8, codebook_dim=16, num_lstm_layers=1)
    config = transformers.Apertus1p5Config(text_config=text, vision_config=APERTUS_VISION, audio_config=audio,
                                           image_token_id=5, audio_token_id=6, image_token_offset=100,
                                           audio_token_offset=164)
    torch.manual_seed(0)
    model = transformers.Apertus1p5ForConditionalGeneration(config).eval()
    inputs = dict(input_ids=torch.tensor([[1] + [5] * (8 * 12 + 6 * 10) + [10, 11]]),
                  pixel_values=torch.randn(2, 3, 32, 48, generator=torch.Generator().manual_seed(1)),
                  image_sizes=torch.tensor([[32, 48], [24, 40]]))
    maps = _apertus_maps(model, lambda: model(**inputs))
    with torch.no_grad():
        plain = model(**inputs).logits
        with vitmad.record(model) as rec:
            with pytest.warns(UserWarning, match=r"ran its recorded layers 2 times"):
                recorded = model(**inputs).logits
    assert torch.equal(plain, recorded)
    assert rec.layers == ["model.vision_tokenizer.encoder.stages.2.layers.0.attention",
                          "model.vision_tokenizer.encoder.mid.attn_1"] and rec.skipped == {}
    assert len(rec.calls) == 2
    _check_single_head(rec.calls[0], maps[:2], (8, 12), 4.0)
    _check_single_head(rec.calls[1], maps[2:], (6, 10), 4.0)


# Chameleon -----------------------------------------------------------------------------------------------------------
# ChameleonVQVAE's encoder (modeling_chameleon.py) is the same VQGAN design, line for line: conv_in (3 x 3, stride 1,
# padding 1), down[i].block ResNet blocks, down[i].attn blocks at a resolution in attn_resolutions, a downsampling
# that pads bottom and right by one and convolves 3 x 3 with stride 2 (floor(n / 2)), then mid.attn_1;
# ChameleonVQVAEEncoderAttnBlock is one head over the map's cells row-major, its own F.softmax [B, N, N].

CHAMELEON_VQ = dict(embed_dim=32, num_embeddings=64, latent_channels=32, base_channels=32, channel_multiplier=[1, 1, 2],
                    num_res_blocks=1, attn_resolutions=[16], resolution=64)


def _unit_convolutions(model: torch.nn.Module) -> torch.nn.Module:
    """Every Conv2d weight drawn with std fan_in^-1/2: Chameleon initialises them all at std 0.02, which leaves the
    maps so faint that attention is near uniform."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Conv2d):
                module.weight.normal_(std=module.weight[0].numel() ** -0.5)
    return model


def test_chameleon_vq_vae_attention_blocks_on_their_stage_map():
    """74 x 90 px: 37 x 45, then 18 x 22 at stride 4, where both blocks attend (Chameleon's VQ-VAE was refused for
    want of a patch embedding before 2026-12-05)."""
    torch.manual_seed(0)
    model = _unit_convolutions(transformers.models.chameleon.modeling_chameleon.ChameleonVQVAE(
        transformers.ChameleonVQVAEConfig(**CHAMELEON_VQ)).eval())
    pixels = torch.randn(2, 3, 74, 90, generator=torch.Generator().manual_seed(1))
    maps = _apertus_maps(model, lambda: model.encode(pixels), block="ChameleonVQVAEEncoderAttnBlock")
    with torch.no_grad():
        plain = model.encode(pixels).image_tokens
        with vitmad.record(model) as rec:
            recorded = model.encode(pixels).image_tokens
    assert torch.equal(plain, recorded)
    assert rec.layers == ["encoder.down.2.attn.0", "encoder.mid.attn_1"] and rec.skipped == {}
    _check_single_head(rec.calls[0], maps, (18, 22), 4.0)


def test_chameleon_whole_model_records_its_vq_vae_not_its_language_model():
    """ChameleonForConditionalGeneration encodes the images with its vqmodel (64 x 64 px: 16 x 16 cells at stride 4)
    and replaces its <image> tokens by their codes; the language model (causal) is not the tower."""
    # Image tokens named IMGIMG<code in letters A-J>Z (ChameleonImageVocabularyMapping), one per codebook entry.
    vocabulary = {"<image>": 5, **{f"IMGIMG{''.join(chr(65 + int(d)) for d in str(code))}Z": 100 + code
                                   for code in range(CHAMELEON_VQ["num_embeddings"])}}
    config = transformers.ChameleonConfig(vocab_size=200, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                          num_attention_heads=2, num_key_value_heads=1, vq_config=CHAMELEON_VQ,
                                          vocabulary_map=vocabulary)
    torch.manual_seed(0)
    model = _unit_convolutions(transformers.ChameleonForConditionalGeneration(config).eval())
    inputs = dict(input_ids=torch.tensor([[1] + [5] * (16 * 16) + [10, 11]]),
                  pixel_values=torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1)))
    maps = _apertus_maps(model, lambda: model(**inputs), block="ChameleonVQVAEEncoderAttnBlock")
    with torch.no_grad():
        plain = model(**inputs).logits
        with vitmad.record(model) as rec:
            recorded = model(**inputs).logits
    assert torch.equal(plain, recorded)
    assert rec.layers == ["model.vqmodel.encoder.down.2.attn.0", "model.vqmodel.encoder.mid.attn_1"]
    assert rec.skipped == {}
    _check_single_head(rec.calls[0], maps, (16, 16), 4.0)


# TVP -----------------------------------------------------------------------------------------------------------------
# TvpModel.forward (modeling_tvp.py): the frames, their borders replaced by learned visual prompts (pixels, no
# tokens), go through the ResNet backbone (its stage4 map: stride 32) and a 3 x 3 convolution, are max-pooled 2 x 2
# (stride 64) and averaged over the frames; the encoder then attends over [10 learned text-prompt tokens][the text
# tokens][that h x w grid, row-major]. Text in the sequence: vitmad does not place it by itself (the grid's stride
# would be read from a transformers ResNet, which reports none), so the encoder is refused by default, skipped with
# the reason when named, and recorded exactly when its layout is stated. (transformers 5.25's TVP runs one video at a
# time: its column position embeddings are viewed with the batch size.)

def _tvp(cls):
    backbone = dict(model_type="resnet", out_features=["stage4"], embedding_size=8, hidden_sizes=[8, 8, 8, 16],
                    depths=[1, 1, 1, 1])
    config = transformers.TvpConfig(backbone_config=backbone, hidden_size=32, intermediate_size=64,
                                    num_hidden_layers=2, num_attention_heads=2, max_img_size=256,
                                    visual_prompt_size=32, num_frames=2, vocab_size=100, pad_token_id=0)
    torch.manual_seed(0)
    model = sharpened(cls(config))
    tvp = model if isinstance(model, transformers.TvpModel) else model.model
    with torch.no_grad():  # grid cells told apart, queries and keys larger: attention far from uniform
        tvp.visual_embeddings.row_position_embeddings.weight.normal_()
        tvp.visual_embeddings.col_position_embeddings.weight.normal_()
        for layer in tvp.encoder.layer:
            layer.attention.query.weight.mul_(2.0)
            layer.attention.key.weight.mul_(2.0)
    gen = torch.Generator().manual_seed(1)
    inputs = dict(input_ids=torch.randint(1, 100, (1, 5), generator=gen),
                  pixel_values=torch.randn(1, 2, 3, 256, 256, generator=gen),
                  attention_mask=torch.tensor([[1, 1, 1, 1, 0]]))  # the last text token padding
    return model, inputs


@pytest.mark.parametrize("cls", ["TvpModel", "TvpForVideoGrounding"])
def test_tvp_text_visual_encoder_is_refused_unless_its_layout_is_stated(cls):
    model, inputs = _tvp(getattr(transformers, cls))
    encoder = "encoder" if cls == "TvpModel" else "model.encoder"
    layers = [f"{encoder}.layer.{i}.attention" for i in (0, 1)]
    with pytest.raises(NoLayerError, match=rf"no attention layer in .*vision_model.* \({layers[0]}, {layers[1]}\) "
                                           r"all lie outside it"):
        with torch.no_grad(), vitmad.record(model):
            model(**inputs)
    with pytest.raises(NoLayerError, match=rf"{layers[0]}: outside .*vision_model, the tower that embeds the image.*"
                                           r"pass num_prefix_tokens="):
        with torch.no_grad(), vitmad.record(model, layers=[f"{encoder}.*"]):
            model(**inputs)
    # Stated: 10 text prompts and 5 text tokens without a position, then the 4 x 4 grid of 64 px cells (256 px frames:
    # an 8 x 8 stage4 map, pooled 2 x 2). The reference: the probabilities the model returns (its own softmax, the
    # padding text token hidden by its mask).
    with torch.no_grad():
        out = model(**inputs, output_attentions=True)
    maps = [p.double() for p in out.attentions]
    assert [p.shape[-1] for p in maps] == [10 + 5 + 16] * 2
    rec, rec_tokens = record_both_reductions(
        model, lambda m: m(**inputs), lambda o: o.last_hidden_state if cls == "TvpModel" else o.logits, STATS,
        layers=[f"{encoder}.*"], num_prefix_tokens=15, patch=64, grid=(4, 4))
    assert rec.layers == layers
    check_prefix_and_grid(rec, rec_tokens, maps, (4, 4), 64, 15)


# PE-Video, PE-Audio-Video --------------------------------------------------------------------------------------------
# PeVideoEncoder (modeling_pe_video.py) runs its frame tower, timm's PE ViT (an Eva: a class token, then the row-major
# grid of 14 px patches, 2-D RoPE; a map-pooling head) in a TimmWrapperModel, on every frame as an image of its own
# (pixel_values_videos.view(-1, C, H, W): frame f of video b is image b * F + f), then a temporal encoder over one token
# per frame after a class token. PeAudioVideoEncoder runs a PeAudioEncoder (audio frames) and a PeVideoEncoder, then an
# encoder over the fused frames. Only the frame tower attends over the image; the reference is its unfused attention.

PE_FRAME_TOWER = dict(architecture="vit_pe_core_large_patch14_336", do_pooling=True, num_classes=16, num_labels=16,
                      global_pool="map", model_args=dict(embed_dim=32, depth=2, num_heads=2, img_size=42,
                                                         mlp_ratio=2.0))
PE_ENCODER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, head_dim=16)
PE_TEXT = dict(model_type="modernbert", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
               num_attention_heads=2, vocab_size=100, pad_token_id=0, eos_token_id=1, bos_token_id=2, cls_token_id=2,
               sep_token_id=1)
PE_AUDIO = dict(model_type="pe_audio_encoder", **PE_ENCODER,
                dac_config=dict(downsampling_ratios=[2, 4], encoder_hidden_size=8, codebook_dim=8, hidden_size=16))


def _check_frames(rec, tower_name: str, maps) -> None:
    """Each frame of the 2 videos of 3 frames an image (6 rows), the class token without a position, then 3 x 3
    patches of 14 px: the MAD of each layer against its unfused probabilities."""
    assert rec.layers == [f"{tower_name}.timm_model.blocks.{i}.attn" for i in (0, 1)]
    assert rec.mad.shape == (2, 6, 2)
    positions = torch.cat([torch.full((1, 2), math.nan, dtype=torch.float64), _centres(3, 3, 14)])
    for layer, (geometry, probabilities) in enumerate(zip(rec.geometry, maps, strict=True)):
        assert geometry.grid == (3, 3) and geometry.stride == (14.0, 14.0) and geometry.num_prefix_tokens == 1
        expected = statistics_reference(probabilities, positions)
        assert float(expected["entropy"].mean()) < 0.75 * math.log(probabilities.shape[-1])
        torch.testing.assert_close(rec.mad[layer].double(), expected["mad"].mean(-1), **TOL)


def _pe_frame_maps(tower: torch.nn.Module, run) -> list[torch.Tensor]:
    """The frame tower's weights drawn anew (std 0.3, its norms the identity, its q, k and v projections 0.9: peaked
    attention), then its unfused probabilities in one
    ``run()``; the tower switched back to its fused path."""
    with torch.no_grad():
        for name, parameter in tower.named_parameters():
            if "norm" in name:
                parameter.fill_(1.0 if name.endswith("weight") else 0.0)
            else:
                parameter.normal_(std=0.3)
            if name.endswith("qkv.weight"):
                parameter.mul_(3.0)
    maps = unfused_maps(tower, "AttentionRope")
    with torch.no_grad():
        run()
    for module in tower.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = True
    return [p.double() for _, p in maps[:2]]


def _pe_inputs(gen) -> dict:
    return dict(input_ids=torch.randint(3, 100, (2, 5), generator=gen),
                pixel_values_videos=torch.randn(2, 3, 3, 42, 42, generator=gen))


def test_pe_video_model_records_its_frame_tower_and_skips_its_temporal_encoder():
    torch.manual_seed(0)
    model = transformers.PeVideoModel(transformers.PeVideoConfig(
        text_config=PE_TEXT, video_config=dict(vision_config=PE_FRAME_TOWER, **PE_ENCODER))).eval()
    inputs = _pe_inputs(torch.Generator().manual_seed(1))
    tower = "video_encoder.embedder.vision_model"
    maps = _pe_frame_maps(model.get_submodule(tower), lambda: model(**inputs))
    with torch.no_grad():
        plain = model(**inputs).logits_video_text
        with vitmad.record(model, layers=[f"{tower}.*", "video_encoder.layers.*"]) as rec:
            recorded = model(**inputs).logits_video_text
    # The fused frame tower against its unfused forward: float32 rounding.
    torch.testing.assert_close(plain, recorded, rtol=1e-5, atol=1e-5)
    _check_frames(rec, tower, maps)
    assert rec.skipped[f"{tower}.timm_model.attn_pool"].startswith("attention pooling")
    assert rec.skipped["video_encoder.layers.0.self_attn"].startswith("attention over a video's frames (PE-Video")


def test_pe_audio_video_encoder_records_its_frame_tower_never_its_audio_or_fused_frames():
    """PeAudioVideoEncoder: the frame tower recorded; the audio encoder's, the temporal encoder's and the fused
    encoder's attention named in layers= are skipped as such. The whole PeAudioVideoModel holds two copies of the
    tower (video_model's, first in module order, and the encoder's, which its forward runs): the recording of the first
    says it did not run and names the other, whose own recording gives the frames."""
    audio_video = dict(audio_config=PE_AUDIO, video_config=dict(model_type="pe_video_encoder",
                                                                 vision_config=PE_FRAME_TOWER, **PE_ENCODER),
                       **PE_ENCODER)
    from transformers.models.pe_audio_video.modeling_pe_audio_video import PeAudioVideoEncoder

    torch.manual_seed(0)
    encoder = PeAudioVideoEncoder(transformers.PeAudioVideoEncoderConfig(**audio_video)).eval()
    gen = torch.Generator().manual_seed(1)
    inputs = dict(input_values=torch.randn(2, 1, 192, generator=gen), **_pe_inputs(gen))
    del inputs["input_ids"]
    tower = "embedder.video_encoder.embedder.vision_model"
    maps = _pe_frame_maps(encoder.get_submodule(tower), lambda: encoder(**inputs))
    with torch.no_grad(), vitmad.record(encoder, layers=["*attn*"]) as rec:
        encoder(**inputs)
    _check_frames(rec, tower, maps)
    assert rec.skipped["embedder.audio_encoder.layers.0.self_attn"].startswith("attention over audio frames")
    assert rec.skipped["embedder.video_encoder.layers.0.self_attn"].startswith("attention over a video's frames")
    assert rec.skipped["layers.0.self_attn"].startswith("attention over audio-video frames")
    with pytest.raises(NoLayerError, match=r"layers\.0\.self_attn: attention over audio frames"):
        with vitmad.record(encoder.embedder.audio_encoder):
            pass

    model = transformers.PeAudioVideoModel(transformers.PeAudioVideoConfig(
        text_config=PE_TEXT, audio_video_config=audio_video)).eval()
    model.audio_video_encoder.load_state_dict(encoder.state_dict())
    inputs["input_ids"] = torch.randint(3, 100, (2, 5), generator=gen)
    ran = f"audio_video_encoder.{tower}"
    with torch.no_grad(), vitmad.record(model) as first, vitmad.record(model.get_submodule(ran)) as second:
        model(**inputs)
    assert all("a second tower that embeds the image" in first.skipped[name] for name in first.skipped
               if name.startswith(ran))
    with pytest.raises(RuntimeError, match=r"PeAudioVideoModel ran 1 time\(s\) in this recording, but not through "
                                           r"the modules being recorded \(video_model\.video_encoder"):
        _ = first.mad
    with torch.no_grad(), vitmad.record(encoder.get_submodule(tower)) as alone:
        encoder(**inputs)
    torch.testing.assert_close(second.mad, alone.mad, rtol=0, atol=0)
