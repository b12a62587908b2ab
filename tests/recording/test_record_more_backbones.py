"""vitmad.record on transformers 5.25.0 dense-prediction models and vision-language models whose image backbone no
other test names (QA helper-112 checked them by hand): Depth Anything and Prompt Depth Anything over DINOv2, CHMv2 over
DINOv3 (class token and 4 registers), ViTMatte's VitDet (a window block, then a global one), a Swin backbone inside
UperNet, Mask2Former, OneFormer and Grounding DINO (``always_partition``: windows and shifts kept on every map),
PerceptionLM's timm PE tower (class token, 2-D RoPE) and LFM2-VL's SigLIP2 tower (each image on its own grid). The
DeepSeek-VL-Hybrid towers and LayoutLMv3 are tested in test_record_outside_tower.py and test_record_layoutlmv3.py.

Tiny random-weight models, sharpened so that attention is far from uniform. The reference is each model's own eager
attention probabilities (its modeling file's ``eager_attention_forward``, VitDet's returned probabilities, timm's
unfused softmax), placed by geometry written here from the models' source, reduced in float64 by conftest's
``statistics_reference``: a prefix, then a row-major grid (``check_prefix_and_grid``); windows cut from the map padded
at the bottom and right to whole windows, then rolled by ``-shift`` (transformers' Swin: pad, then roll), window after
window row-major, each slot a key at its cell of the unshifted padded map, a query only inside the image.
"""

from __future__ import annotations

import math

import pytest
import torch

import vitmad
from conftest import (
    assert_close_within_float32,
    attention_outputs,
    check_prefix_and_grid,
    eager_attention_calls,
    grid_centres,
    record_both_reductions,
    sdpa_probabilities,
    sharpened,
    statistics_reference,
    unfused_maps,
)

transformers = pytest.importorskip("transformers")
from transformers.models.dinov2 import modeling_dinov2  # noqa: E402
from transformers.models.dinov3_vit import modeling_dinov3_vit  # noqa: E402
from transformers.models.siglip2 import modeling_siglip2  # noqa: E402
from transformers.models.swin import modeling_swin  # noqa: E402

TOL = {"rtol": 1e-5, "atol": 1e-4}  # pixels; float32 probabilities, float32 accumulation in the ops
STAT_TOL = {"rtol": 1e-5, "atol": 1e-6}  # entropies in nats, masses <= 1
STATS = ["entropy", "prefix_mass", "prefix_maps"]
SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2)
DPT_HEAD = dict(reassemble_factors=[2, 1], fusion_hidden_size=16, head_hidden_size=8)


# Depth models over a ViT backbone: its tokens are a prefix, then the row-major grid ------------------------------


def _depth_anything(config_cls, model_cls):
    def build():
        backbone = transformers.Dinov2Config(**SMALL, intermediate_size=64, image_size=56, patch_size=14,
                                             out_indices=[1, 2], reshape_hidden_states=False)
        return model_cls(config_cls(backbone_config=backbone, reassemble_hidden_size=32, neck_hidden_sizes=[16, 32],
                                    **DPT_HEAD))
    return build


def _chmv2():
    backbone = transformers.DINOv3ViTConfig(**SMALL, intermediate_size=64, image_size=64, patch_size=16,
                                            num_register_tokens=4, out_indices=[1, 2], reshape_hidden_states=True,
                                            apply_layernorm=True, return_class_token=True, key_bias=True)
    return transformers.CHMv2ForDepthEstimation(transformers.CHMv2Config(
        backbone_config=backbone, patch_size=16, post_process_channels=[16, 32], number_output_channels=16,
        **DPT_HEAD))


# name -> (builder, modeling module of the backbone's attention, prefix, patch, input size, extra inputs). The sizes
# are no multiples of the patch: DINOv2 and DINOv3 floor them (5 x 7 patches) and interpolate their positions.
DEPTH_MODELS = {
    "depth_anything": (_depth_anything(transformers.DepthAnythingConfig, transformers.DepthAnythingForDepthEstimation),
                       modeling_dinov2, 1, 14, (73, 103), {}),
    "prompt_depth_anything": (
        _depth_anything(transformers.PromptDepthAnythingConfig, transformers.PromptDepthAnythingForDepthEstimation),
        modeling_dinov2, 1, 14, (73, 103), {"prompt_depth": (2, 1, 37, 51)}),
    # The class token, then 4 registers (DINOv3ViTEmbeddings), then the patches; its RoPE moves no token.
    "chmv2": (_chmv2, modeling_dinov3_vit, 5, 16, (87, 121), {}),
}


@pytest.mark.parametrize("name", list(DEPTH_MODELS))
def test_depth_model_backbone_tokens_after_their_prefix_match_eager_attention(name):
    build, modeling, prefix, patch, pixels, extra = DEPTH_MODELS[name]
    torch.manual_seed(0)
    model = sharpened(build())
    gen = torch.Generator().manual_seed(1)
    inputs = {"pixel_values": torch.randn(2, 3, *pixels, generator=gen),
              **{key: torch.rand(shape, generator=gen) for key, shape in extra.items()}}
    calls = eager_attention_calls(modeling, model, switched=model.backbone, **inputs)
    model.backbone.set_attn_implementation("sdpa")
    rec, rec_tokens = record_both_reductions(model, lambda m: m(**inputs), lambda out: out.predicted_depth, STATS)
    assert all(layer.startswith("backbone.") for layer in rec.layers)
    assert [model.get_submodule(layer) for layer in rec.layers] == [m for m, _ in calls]
    check_prefix_and_grid(rec, rec_tokens, [p for _, p in calls], (pixels[0] // patch, pixels[1] // patch), patch,
                          prefix)


# Windows: ViTMatte's VitDet and Swin backbones ------------------------------------------------------------------


def _window_reference(probabilities: torch.Tensor, batch: int, size: tuple[int, int], window: int | None, shift: int,
                      stride: float) -> dict[str, torch.Tensor]:
    """Per statistic ``[B, H, h * w]`` row-major over the ``size`` map of ``stride`` px cells, from one call's window
    attention ``[B * nW, H, n, n]`` (``window`` None: one global window ``[B, H, h * w, h * w]``): the map padded at
    the bottom and right to whole windows, rolled by ``-shift`` on both axes, cut into windows row-major; each window
    put back on the unshifted padded map, where a padding slot is a key at its cell and no query."""
    height, width = size
    if window is None:
        return statistics_reference(probabilities, grid_centres(size, stride))
    padded_h, padded_w = math.ceil(height / window) * window, math.ceil(width / window) * window
    # Slot i of the rolled map holds row (i + shift) % padded_h of the unshifted one (torch.roll by -shift).
    rows, cols = torch.arange(padded_h).roll(-shift), torch.arange(padded_w).roll(-shift)
    heads, n = probabilities.shape[1], window * window
    per_window = probabilities.double().reshape(batch, padded_h // window, padded_w // window, heads, n, n)
    whole = torch.zeros(batch, heads, padded_h * padded_w, padded_h * padded_w, dtype=torch.float64)
    slot = torch.arange(n)
    for i in range(padded_h // window):
        for j in range(padded_w // window):
            tokens = rows[i * window + slot // window] * padded_w + cols[j * window + slot % window]
            whole[:, :, tokens[:, None], tokens[None, :]] = per_window[:, i, j]
    cells = torch.arange(padded_h * padded_w)
    inside = (cells // padded_w < height) & (cells % padded_w < width)
    return statistics_reference(whole, grid_centres((padded_h, padded_w), stride), is_query=inside)


def _check_windows(rec, rec_tokens, maps, table, batch: int, maps32=None) -> None:
    """Per layer, its (map size, window or None, shift, stride) in ``table``: geometry, MAD (mean and per token),
    entropy and prefix mass (0: every key has a cell) against ``maps``; where ``maps32`` gives the same calls'
    probabilities from PyTorch's float32 softmax, within float32's error (:func:`conftest.assert_close_within_float32`).
    """
    assert len(rec.layers) == len(maps) == len(table) and rec.skipped == {}
    # Per layer: per-token values of maps of different sizes, and layers of different head counts, do not stack.
    mean, tokens = rec.calls[-1], rec_tokens.calls[-1]
    for layer, (probabilities, (size, window, shift, stride)) in enumerate(zip(maps, table, strict=True)):
        geometry = rec.geometry[layer]
        assert geometry.grid == size and geometry.stride == (stride, stride)
        assert geometry.attention.startswith("global" if window is None else f"window {window}x{window}")
        assert ("shift" in geometry.attention) == (shift > 0)
        expected = _window_reference(probabilities, batch, size, window, shift, stride)
        expected32 = expected if maps32 is None else _window_reference(maps32[layer], batch, size, window, shift,
                                                                       stride)
        keys = size[0] * size[1] if window is None else window * window
        assert float(expected["entropy"].mean()) < 0.75 * math.log(keys)  # far from uniform
        assert_close_within_float32(tokens.per_layer[layer], expected["mad"], expected32["mad"], **TOL)
        assert_close_within_float32(mean.per_layer[layer], expected["mad"].mean(-1), expected32["mad"].mean(-1),
                                    **TOL)
        # Against an eager forward's maps (``maps32`` None), the eager hidden states drift from the SDPA forward's by
        # float32 rounding, block after block: Swin's fourth block's entropies differ by up to 4.3e-5 nats between
        # the two (vitmad is within 1.3e-6 of float64 on the SDPA call's own queries and keys), so entropy takes the
        # window tests' tolerance (conftest.check_sam_windows); the prefix mass is 0.
        for stat, tol in (("entropy", TOL), ("prefix_mass", STAT_TOL)):
            assert_close_within_float32(tokens.statistics[stat][layer], expected[stat], expected32[stat], **tol)
            assert_close_within_float32(mean.statistics[stat][layer], expected[stat].mean(-1),
                                        expected32[stat].mean(-1), **tol)
        assert rec.prefix_maps[layer] is None


@pytest.mark.parametrize("pixels", [(64, 128), (96, 160)], ids=["whole_windows", "padded"])
def test_vitmatte_vitdet_window_and_global_blocks_match_eager_attention(pixels):
    """ViTMatte's VitDet backbone on 4 channels (image and trimap): block 0 in 4 x 4 windows of the 16 px patch map
    (4 x 8, or 6 x 10 padded to 8 x 12), block 1 global. (Its matting head takes no size but multiples of 32.)"""
    backbone = transformers.VitDetConfig(**SMALL, mlp_ratio=2, num_channels=4, image_size=64, pretrain_image_size=64,
                                         patch_size=16, window_block_indices=[0], window_size=4,
                                         use_relative_position_embeddings=True, out_features=["stage2"])
    torch.manual_seed(0)
    model = sharpened(transformers.VitMatteForImageMatting(transformers.VitMatteConfig(
        backbone_config=backbone, hidden_size=32, convstream_hidden_sizes=[8, 16, 16],
        fusion_hidden_sizes=[16, 16, 8, 8])))
    with torch.no_grad():
        for name, parameter in model.named_parameters():  # random relative position tables (zeros at init)
            if "rel_pos" in name:
                parameter.normal_()
    images = torch.randn(2, 4, *pixels, generator=torch.Generator().manual_seed(1))
    maps = attention_outputs(model, lambda m: type(m).__name__ == "VitDetAttention",
                             lambda m: m(images, output_attentions=True))
    rec, rec_tokens = record_both_reductions(model, lambda m: m(images), lambda out: out.alphas, STATS)
    assert rec.layers == ["backbone.encoder.layer.0.attention", "backbone.encoder.layer.1.attention"]
    size = (pixels[0] // 16, pixels[1] // 16)
    _check_windows(rec, rec_tokens, maps, [(size, 4, 0, 16.0), (size, None, 0, 16.0)], 2)


class _HeadDeclaredFirst(torch.nn.Module):
    """A user's segmentation wrapper: its 1x1 head is declared before the backbone and runs after it."""

    def __init__(self, backbone: torch.nn.Module, channels: int):
        super().__init__()
        self.head = torch.nn.Conv2d(channels, 3, 1)
        self.backbone = backbone

    def forward(self, images, **kwargs):
        return self.head(self.backbone(images, **kwargs).last_hidden_state)


class _ColourAdapter(torch.nn.Module):
    """A 1x1 colour adapter in front of the backbone: the image keeps its pixels."""

    def __init__(self, backbone: torch.nn.Module):
        super().__init__()
        self.adapt = torch.nn.Conv2d(3, 3, 1)
        self.backbone = backbone

    def forward(self, images, **kwargs):
        return self.backbone(self.adapt(images), **kwargs).last_hidden_state


@pytest.mark.parametrize("wrapper", ["head_first", "adapter"])
def test_vitdet_inside_a_users_module_with_a_convolution_of_its_own_keeps_its_patch_stride(wrapper):
    """QA 331: the window families took the first convolution of the whole model for the patch embedding; a head
    declared before the backbone, or a 1x1 adapter in front, made every layer's stride 1 px (MAD 16x small). The
    patch embedding is the tower's own: 16 px cells, block 0 in 4 x 4 windows (6 x 10 padded to 8 x 12), block 1
    global, against the probabilities VitDet returns."""
    config = transformers.VitDetConfig(**SMALL, mlp_ratio=2, image_size=64, pretrain_image_size=64, patch_size=16,
                                       window_block_indices=[0], window_size=4)
    torch.manual_seed(0)
    backbone = transformers.VitDetModel(config)
    model = sharpened(_HeadDeclaredFirst(backbone, 32) if wrapper == "head_first" else _ColourAdapter(backbone))
    images = torch.randn(2, 3, 96, 160, generator=torch.Generator().manual_seed(1))
    maps = attention_outputs(model, lambda m: type(m).__name__ == "VitDetAttention",
                             lambda m: m(images, output_attentions=True))
    rec, rec_tokens = record_both_reductions(model, lambda m: m(images), lambda out: out, STATS)
    assert rec.layers == ["backbone.encoder.layer.0.attention", "backbone.encoder.layer.1.attention"]
    _check_windows(rec, rec_tokens, maps, [((6, 10), 4, 0, 16.0), ((6, 10), None, 0, 16.0)], 2)


SWIN_2_STAGES = dict(embed_dim=16, depths=[2, 2], num_heads=[1, 2], window_size=3, image_size=48, patch_size=4,
                     out_features=["stage1", "stage2"])
SWIN_4_STAGES = dict(embed_dim=8, depths=[2, 1, 1, 1], num_heads=[1, 1, 2, 2], window_size=3, image_size=64,
                     patch_size=4, out_features=["stage1", "stage2", "stage3", "stage4"])
SWIN_QK_GAIN = 3.0
HEADS = dict(encoder_layers=1, decoder_layers=2, num_attention_heads=2, dim_feedforward=32, num_queries=5,
             num_labels=3)


def _upernet():
    config = transformers.UperNetConfig(backbone_config=transformers.SwinConfig(**SWIN_2_STAGES), hidden_size=16,
                                        pool_scales=[1, 2], num_labels=3, use_auxiliary_head=False)
    return transformers.UperNetForSemanticSegmentation(config), {}, "backbone", lambda out: out.logits


def _mask2former():
    config = transformers.Mask2FormerConfig(backbone_config=transformers.SwinConfig(**SWIN_4_STAGES), feature_size=32,
                                            mask_feature_size=32, hidden_dim=32, encoder_feedforward_dim=32, **HEADS)
    return (transformers.Mask2FormerForUniversalSegmentation(config), {}, "model.pixel_level_module.encoder",
            lambda out: out.masks_queries_logits)


def _oneformer():
    config = transformers.OneFormerConfig(backbone_config=transformers.SwinConfig(**SWIN_4_STAGES), task_seq_len=8,
                                          text_encoder_width=32, text_encoder_context_length=8,
                                          text_encoder_num_layers=1, text_encoder_vocab_size=50, text_encoder_n_ctx=2,
                                          conv_dim=32, mask_dim=32, hidden_dim=32, encoder_feedforward_dim=32,
                                          query_dec_layers=1, **HEADS)
    return (transformers.OneFormerForUniversalSegmentation(config), {"task_inputs": torch.randint(0, 50, (2, 8))},
            "model.pixel_level_module.encoder", lambda out: out.masks_queries_logits)


def _grounding_dino():
    text = transformers.BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                                   vocab_size=100, max_position_embeddings=64)
    config = transformers.GroundingDinoConfig(
        backbone_config=transformers.SwinConfig(**SWIN_4_STAGES), text_config=text, d_model=32, encoder_layers=1,
        decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
        num_queries=5, num_feature_levels=4, max_text_len=16, encoder_n_points=2, decoder_n_points=2)
    return (transformers.GroundingDinoForObjectDetection(config), {"input_ids": torch.randint(1, 100, (2, 7))},
            "model.backbone.conv_encoder.model", lambda out: out.logits)


# 37 x 53 px in 4 px patches: a 10 x 14 map (padded by the patch embedding), then 5 x 7, 3 x 4 and 2 x 2 after each
# merge. SwinBackbone runs its layers with always_partition=True: every block keeps the configured window of 3 (a map
# of 2 x 2 is padded to one window of 3 x 3) and the shift it was built with (1 in odd blocks, 0 in even ones), where
# SwinModel would clamp the window to a small map and drop the shift.
SWIN_2_TABLE = [((10, 14), 3, 0, 4.0), ((10, 14), 3, 1, 4.0), ((5, 7), 3, 0, 8.0), ((5, 7), 3, 1, 8.0)]
SWIN_4_TABLE = [((10, 14), 3, 0, 4.0), ((10, 14), 3, 1, 4.0), ((5, 7), 3, 0, 8.0), ((3, 4), 3, 0, 16.0),
                ((2, 2), 3, 0, 32.0)]
# name -> (builder: (model, extra inputs, the SwinBackbone's name, the output to compare), layer table)
SWIN_MODELS = {
    "upernet": (_upernet, SWIN_2_TABLE),
    "mask2former": (_mask2former, SWIN_4_TABLE),
    "oneformer": (_oneformer, SWIN_4_TABLE),
    "grounding_dino": (_grounding_dino, SWIN_4_TABLE),
}


@pytest.mark.parametrize("name", list(SWIN_MODELS))
def test_swin_backbone_windows_match_eager_attention(name):
    build, table = SWIN_MODELS[name]
    torch.manual_seed(0)
    model, extra, backbone, output = build()
    model = sharpened(model)
    inputs = {"pixel_values": torch.randn(2, 3, 37, 53, generator=torch.Generator().manual_seed(1)), **extra}
    swin = model.get_submodule(backbone)
    assert type(swin).__name__ == "SwinBackbone"
    with torch.no_grad():  # 8 or 16 channels a head: sharpened alone leaves the windows' attention near uniform
        for parameter_name, parameter in swin.named_parameters():
            if parameter_name.endswith(("attention.q_proj.weight", "attention.k_proj.weight")):
                parameter.mul_(SWIN_QK_GAIN)
            elif parameter_name.endswith("relative_position_bias_table"):  # zeros at init
                parameter.normal_()
    calls = eager_attention_calls(modeling_swin, model, switched=swin, **inputs)
    swin.set_attn_implementation("sdpa")
    rec, rec_tokens = record_both_reductions(model, lambda m: m(**inputs), output, STATS)
    assert [model.get_submodule(layer) for layer in rec.layers] == [m for m, _ in calls]
    # The values against the SDPA forward's own queries, keys and masks (the eager forward's hidden states drift from
    # them by float32 rounding, block after block), within float32's error: the backbone run alone on the pixels, as
    # the model runs it (Grounding DINO's text encoder calls SDPA too).
    def backbone():
        return swin(inputs["pixel_values"])

    _check_windows(rec, rec_tokens, sdpa_probabilities(backbone), table, 2, sdpa_probabilities(backbone, torch.float32))


@pytest.mark.parametrize("name, decoder", [("mask2former", "Mask2Former"), ("oneformer", "OneFormer")])
def test_universal_segmenters_decoders_named_in_layers_say_why(name, decoder):
    """layers=["*"]: the Swin backbone is recorded as by default, and the mask queries' self- and (masked)
    cross-attention is skipped naming the queries; it was skipped as lying outside the image's tower, with advice
    meant for a language model's text (QA helper-246). The pixel decoder's deformable attention keeps its reason."""
    torch.manual_seed(0)
    model, extra, backbone, _ = SWIN_MODELS[name][0]()
    inputs = {"pixel_values": torch.randn(2, 3, 37, 53), **extra}
    with torch.no_grad(), vitmad.record(model, layers=["*"]) as rec:
        model.eval()(**inputs)
    assert len(rec.layers) == len(SWIN_MODELS[name][1]) and all(layer.startswith(backbone) for layer in rec.layers)
    queries = [n for n, reason in rec.skipped.items() if n.startswith("model.transformer_module.decoder.")]
    assert queries and all(rec.skipped[n].startswith(f"{decoder}'s transformer decoder: its queries are the mask "
                                                      "queries") for n in queries)
    assert all(not reason.startswith("outside") for reason in rec.skipped.values())
    assert any(reason.startswith("deformable attention") for reason in rec.skipped.values())


# Vision-language models -----------------------------------------------------------------------------------------

TEXT = dict(hidden_size=32, intermediate_size=32, num_attention_heads=2, num_key_value_heads=1)


def test_perception_lm_timm_pe_tower_matches_its_unfused_attention():
    """PerceptionLM's tower is timm's PE (an Eva with 2-D RoPE) in a TimmWrapperModel, its class token first: 48 x 80
    px is a 3 x 5 grid of 16 px patches."""
    vision = transformers.TimmWrapperConfig(architecture="vit_pe_core_tiny_patch16_384", model_args=dict(
        embed_dim=32, depth=2, num_heads=2, img_size=(48, 80), global_pool="", ref_feat_shape=(3, 5),
        use_post_transformer_norm=False))
    config = transformers.PerceptionLMConfig(vision_config=vision,
                                             text_config=transformers.LlamaConfig(**TEXT, vocab_size=100,
                                                                                  num_hidden_layers=1),
                                             image_token_id=99, video_token_id=98, vision_use_cls_token=True)
    torch.manual_seed(0)
    model = sharpened(transformers.PerceptionLMForConditionalGeneration(config))
    inputs = dict(input_ids=torch.cat([torch.full((2, 15), 99), torch.randint(1, 90, (2, 5))], 1),
                  pixel_values=torch.randn(2, 1, 3, 48, 80, generator=torch.Generator().manual_seed(1)))
    tower = model.model.vision_tower.timm_model
    maps = unfused_maps(tower, "AttentionRope")
    with torch.no_grad():
        model(**inputs)
    for module in tower.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = True
    rec, rec_tokens = record_both_reductions(model, lambda m: m(**inputs), lambda out: out.logits, STATS)
    assert rec.layers == [f"model.vision_tower.timm_model.blocks.{i}.attn" for i in (0, 1)]
    assert [module for module, _ in maps] == [tower.blocks[0].attn, tower.blocks[1].attn]
    check_prefix_and_grid(rec, rec_tokens, [p.double() for _, p in maps], (3, 5), 16, 1)


def test_lfm2_vl_siglip2_tower_places_each_image_on_its_own_grid():
    """LFM2-VL feeds its SigLIP2 tower NaFlex patches: each image's ``h x w`` patches row-major (``spatial_shapes``),
    then padding the ``pixel_attention_mask`` hides; here 3 x 5 and 4 x 2 patches of 4 px in one batch of 16 slots."""
    vision = dict(**SMALL, intermediate_size=64, num_patches=16, patch_size=4, vision_use_head=False)
    text = transformers.Lfm2Config(**TEXT, num_hidden_layers=2, vocab_size=400, layer_types=["conv", "full_attention"])
    config = transformers.Lfm2VlConfig(vision_config=transformers.Siglip2VisionConfig(**vision), text_config=text,
                                       image_token_id=396, projector_hidden_size=32)
    torch.manual_seed(0)
    model = sharpened(transformers.Lfm2VlForConditionalGeneration(config))
    grids = [(3, 5), (4, 2)]
    patches, mask = torch.zeros(2, 16, 3 * 4 * 4), torch.zeros(2, 16, dtype=torch.bool)
    gen = torch.Generator().manual_seed(1)
    for image, (h, w) in enumerate(grids):
        patches[image, :h * w] = torch.randn(h * w, 3 * 4 * 4, generator=gen)
        mask[image, :h * w] = True
    image_tokens = sum((h // 2) * (w // 2) for h, w in grids)  # its projector merges 2 x 2 patches
    ids = torch.cat([torch.tensor([[1, 2, 3]]), torch.full((1, image_tokens), 396), torch.tensor([[4, 5]])], 1)
    inputs = dict(input_ids=ids, pixel_values=patches, spatial_shapes=torch.tensor(grids), pixel_attention_mask=mask)
    tower = set(model.model.vision_tower.modules())
    calls = [c for c in eager_attention_calls(modeling_siglip2, model, **inputs) if c[0] in tower]
    model.set_attn_implementation("sdpa")
    rec, rec_tokens = record_both_reductions(model, lambda m: m(**inputs), lambda out: out.logits, STATS)
    assert rec.layers == [f"model.vision_tower.encoder.layers.{i}.self_attn" for i in (0, 1)] and rec.skipped == {}
    assert [model.get_submodule(layer) for layer in rec.layers] == [m for m, _ in calls]
    for layer, (_, probabilities) in enumerate(calls):
        assert rec.geometry[layer].image_grids == tuple(grids) and rec.geometry[layer].stride == (4.0, 4.0)
        assert rec.prefix_maps[layer] is None  # no token without a position but padding, which differs per image
        for image, (h, w) in enumerate(grids):
            positions = torch.full((16, 2), math.nan, dtype=torch.float64)
            positions[:h * w] = grid_centres((h, w), 4)
            expected = statistics_reference(probabilities[image:image + 1], positions)
            assert float(expected["entropy"].mean()) < 0.75 * math.log(h * w)  # far from uniform
            torch.testing.assert_close(rec_tokens.per_layer[layer][image, :, :h * w].double(), expected["mad"][0],
                                       **TOL)
            assert rec_tokens.per_layer[layer][image, :, h * w:].isnan().all()
            torch.testing.assert_close(rec.per_layer[layer][image].double(), expected["mad"][0].mean(-1), **TOL)
            for stat in ("entropy", "prefix_mass"):
                torch.testing.assert_close(rec_tokens.stats[stat][layer][image, :, :h * w].double(),
                                           expected[stat][0], **STAT_TOL)
                torch.testing.assert_close(rec.stats[stat][layer][image].double(), expected[stat][0].mean(-1),
                                           **STAT_TOL)
