"""vitmad.record on transformers 5.25.0 OCR, table and detection models that no other test named (QA helper h145):
the SVTR neck of PP-OCRv5 mobile / server and PP-OCRv6 small text recognisers (self-attention over a CNN backbone's
pooled map, strides unequal in height and width), MM-Grounding-DINO's Swin backbone, and the models whose attention
vitmad has no MAD for (SLANet's decoder, CLAP's audio encoder, SuperGlue and LightGlue, BLT) or that have none.

Tiny random-weight models, sharpened so that attention is far from uniform. The reference is each model's own eager
attention probabilities (its modeling file's eager attention function), placed by the layout written here from each
model's source, reduced in float64.
"""

from __future__ import annotations

import math
import re

import pytest
import torch

import vitmad
from conftest import batch_norms_on, eager_attention_calls, record_both_reductions, sharpened, statistics_reference
from vitmad.recording.recorder import NoLayerError

transformers = pytest.importorskip("transformers")
from test_record_more_backbones import SWIN_4_STAGES, SWIN_4_TABLE, SWIN_QK_GAIN, _check_windows  # noqa: E402
from transformers.models.swin import modeling_swin  # noqa: E402

STATS = ["entropy", "prefix_mass", "prefix_maps"]
TOL = {"rtol": 1e-5, "atol": 1e-4}  # pixels: float32 attention against a float64 reference
STAT_TOL = {"rtol": 1e-5, "atol": 1e-6}


def _centres(rows: int, cols: int, stride: tuple[float, float]) -> torch.Tensor:
    """``[rows * cols, 2]`` float64: the centre ``((r + 0.5) * s_h, (c + 0.5) * s_w)`` of each cell, row-major."""
    r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    return (torch.stack([r, c], -1).reshape(-1, 2).double() + 0.5) * torch.tensor(stride, dtype=torch.float64)


# SVTR text recognisers -----------------------------------------------------------------------------------------------
# <X>ForTextRecognition (modeling_pp_ocrv5_mobile_rec.py, ..._server_rec.py, modeling_pp_ocrv6_small_rec.py): the
# backbone's last feature map, F.avg_pool2d(map, (3, 2)) (kernel = stride, floor) in <X>Model.forward, then the head's
# EncoderWithSVTR: stride-1 convolutions, flatten(2).transpose(1, 2) (row-major), svtr_block layers of global
# self-attention over those tokens, no other token. The head squeezes the row axis after the encoder, so the model runs
# only where the pooled map is one row high (a text line): 61 px high images, whose backbone maps are 4 rows (stride 16
# in height, convolutions padded by half their kernel: ceil at each stride 2), pooled to 1.
# Backbone strides, written from the configs below and the backbones' modeling files:
# - PP-LCNetV3 (v5 mobile): the stem's stride 2, then each block's depthwise convolution: (2, 1), (2, 2), (1, 2),
#   (2, 1): 16 x 8 px; 203 px wide: 102, 102, 102, 51, 26, 26 columns, pooled to 13 tokens of 48 x 16 px.
# - HGNetV2 (v5 server): stem_strides (2, 1, 1, 1, 1), each stage's downsample (2, 1), (1, 2), (2, 1), (2, 1): 16 x 4
#   px; 102, 102, 51, 51, 51 columns, pooled to 25 tokens of 48 x 8 px.
# - PP-LCNetV4 (v6 small): the large stem's stem_strides (2, 1, 1, 2, 1): 4 px, then blocks (1, 2), (2, 1), (2, 1):
#   16 x 8 px; 102, then 51 after the stem, 26 after stage 2, pooled to 13 tokens of 48 x 16 px.

LCNET_V3 = dict(model_type="pp_lcnet_v3", scale=0.25, divisor=16, out_features=["stage2", "stage3", "stage4", "stage5"],
                block_configs=[[[3, 16, 32, 1, False]], [[3, 32, 64, [2, 1], False]], [[3, 64, 128, [2, 2], False]],
                               [[3, 128, 256, [1, 2], False]], [[5, 256, 512, [2, 1], True]]])
HGNET_V2 = dict(model_type="hgnet_v2", stem_channels=[3, 8, 8], stage_in_channels=[8, 16, 16, 32],
                stage_mid_channels=[8, 8, 16, 16], stage_out_channels=[16, 16, 32, 32], stage_num_blocks=[1, 1, 1, 1],
                stage_numb_of_layers=[1, 1, 1, 1], stage_light_block=[False, False, True, True],
                stage_kernel_size=[3, 3, 5, 5], stage_downsample=[True, True, True, True],
                stage_downsample_strides=[[2, 1], [1, 2], [2, 1], [2, 1]], stem_strides=[2, 1, 1, 1, 1],
                out_features=["stage1", "stage2", "stage3", "stage4"])
LCNET_V4 = dict(model_type="pp_lcnet_v4", stem_channels=[3, 8, 16], out_features=["stage4"],
                block_configs=[[[3, 16, 16, 1, True]], [[3, 16, 16, [1, 2], False]], [[3, 16, 32, [2, 1], False]],
                               [[3, 32, 32, [2, 1], False]]])
SVTR_PIXELS = (61, 203)
SVTR_QK_GAIN = 3.0
# name -> (class name prefix, backbone config, token grid, token stride (s_h, s_w) in px)
SVTR_MODELS = {
    "pp_ocrv5_mobile_rec": ("PPOCRV5MobileRec", LCNET_V3, (1, 13), (48.0, 16.0)),
    "pp_ocrv5_server_rec": ("PPOCRV5ServerRec", HGNET_V2, (1, 25), (48.0, 8.0)),
    "pp_ocrv6_small_rec": ("PPOCRV6SmallRec", LCNET_V4, (1, 13), (48.0, 16.0)),
}


def _recogniser(name: str, backbone: dict | None = None) -> torch.nn.Module:
    prefix, default, _, _ = SVTR_MODELS[name]
    config = getattr(transformers, f"{prefix}Config")(backbone_config=backbone or default, hidden_size=16,
                                                      num_attention_heads=2, head_out_channels=10)
    torch.manual_seed(0)
    model = sharpened(getattr(transformers, f"{prefix}ForTextRecognition")(config))
    batch_norms_on(model, _pixels())  # the initial statistics shrink the backbone's maps to ~1e-10
    with torch.no_grad():  # 8 channels a head: sharpened alone leaves the attention near uniform
        for block in model.head.encoder.svtr_block:
            block.self_attn.qkv.weight[:2 * block.embed_dim].mul_(SVTR_QK_GAIN)
    return model


def _modeling(name: str):
    import importlib

    return importlib.import_module(f"transformers.models.{name}.modeling_{name}")


def _pixels() -> torch.Tensor:
    return torch.randn(2, 3, *SVTR_PIXELS, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", list(SVTR_MODELS))
def test_svtr_neck_attention_on_the_pooled_backbone_map_matches_its_eager_attention(name):
    _, _, grid, stride = SVTR_MODELS[name]
    model, pixels = _recogniser(name), _pixels()
    encoder = model.head.encoder  # the backbone takes no attention implementation
    assert encoder.svtr_block[0].self_attn.config._attn_implementation == "sdpa"  # the default
    calls = eager_attention_calls(_modeling(name), model, pixels, switched=encoder)
    encoder.set_attn_implementation("sdpa")
    rec, rec_tokens = record_both_reductions(model, lambda m: m(pixels), lambda out: out.last_hidden_state, STATS)
    assert rec.layers == ["head.encoder.svtr_block.0.self_attn", "head.encoder.svtr_block.1.self_attn"]
    assert [model.get_submodule(layer) for layer in rec.layers] == [m for m, _ in calls] and rec.skipped == {}
    positions = _centres(*grid, stride)
    for layer, (_, probabilities) in enumerate(calls):
        geometry = rec.geometry[layer]
        assert geometry.grid == grid and geometry.stride == stride and geometry.attention == "global"
        expected = statistics_reference(probabilities, positions)
        assert float(expected["entropy"].mean()) < 0.75 * math.log(probabilities.shape[-1])  # far from uniform
        torch.testing.assert_close(rec_tokens.per_layer[layer].double(), expected["mad"], **TOL)
        torch.testing.assert_close(rec.per_layer[layer].double(), expected["mad"].mean(-1), **TOL)
        for stat in ("entropy", "prefix_mass"):
            torch.testing.assert_close(rec_tokens.stats[stat][layer].double(), expected[stat], **STAT_TOL)
            torch.testing.assert_close(rec.stats[stat][layer].double(), expected[stat].mean(-1), **STAT_TOL)
        assert rec.prefix_maps[layer] is None  # no token without a position


def test_svtr_encoder_alone_or_a_backbone_whose_strides_do_not_fit_is_refused():
    model = _recogniser("pp_ocrv5_mobile_rec").eval()
    encoder = model.head.encoder
    with torch.no_grad(), pytest.raises(ValueError, match=r"svtr_block\.0\.self_attn \(PPOCRV5MobileRecAttention\).*"
                                        r"recorded without the PPOCRV5MobileRecForTextRecognition whose backbone"):
        with vitmad.record(encoder):
            encoder(torch.randn(2, encoder.conv_block[0].convolution.in_channels, 1, 13))
    # A config that no longer says what the backbone's convolutions do: a stem of stride 1 makes the map 8 px a row.
    model.model.backbone.config.stem_stride = 1
    with torch.no_grad(), pytest.raises(ValueError, match=r"the backbone's last map has height 4 for an image height "
                                        r"of 61, but a stride of 8 px \(the strides its PPLCNetV3Backbone config gives "
                                        r"up to stage5\) gives 7 or 8"):
        with vitmad.record(model):
            model(_pixels())


# MM-Grounding-DINO ---------------------------------------------------------------------------------------------------
# MMGroundingDinoModel holds transformers' SwinBackbone as model.backbone.conv_encoder.model (always_partition: the
# windows and shifts of test_record_more_backbones.SWIN_4_TABLE on a 37 x 53 image), a BERT text backbone, a text
# enhancer, an image-text fusion layer, deformable attention in its encoder and decoder.


def _mm_grounding_dino() -> torch.nn.Module:
    text = transformers.BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                                   vocab_size=100, max_position_embeddings=64)
    config = transformers.MMGroundingDinoConfig(
        backbone_config=transformers.SwinConfig(**SWIN_4_STAGES), text_config=text, d_model=32, encoder_layers=1,
        decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
        num_queries=5, num_feature_levels=4, max_text_len=16, encoder_n_points=2, decoder_n_points=2)
    torch.manual_seed(0)
    model = sharpened(transformers.MMGroundingDinoForObjectDetection(config))
    with torch.no_grad():  # 8 or 16 channels a head: sharpened alone leaves the windows' attention near uniform
        for name, parameter in model.model.backbone.conv_encoder.model.named_parameters():
            if name.endswith(("attention.q_proj.weight", "attention.k_proj.weight")):
                parameter.mul_(SWIN_QK_GAIN)
            elif name.endswith("relative_position_bias_table"):  # zeros at init
                parameter.normal_()
    return model


def test_mm_grounding_dino_records_its_swin_backbone_alone():
    model = _mm_grounding_dino()
    gen = torch.Generator().manual_seed(1)
    inputs = {"pixel_values": torch.randn(2, 3, 37, 53, generator=gen),
              "input_ids": torch.randint(1, 100, (2, 7), generator=gen)}
    swin = model.model.backbone.conv_encoder.model
    calls = eager_attention_calls(modeling_swin, model, switched=swin, **inputs)
    swin.set_attn_implementation("sdpa")
    rec, rec_tokens = record_both_reductions(model, lambda m: m(**inputs), lambda out: out.logits, STATS)
    assert all(layer.startswith("model.backbone.conv_encoder.model.swin.encoder.") for layer in rec.layers)
    assert [model.get_submodule(layer) for layer in rec.layers] == [m for m, _ in calls]
    _check_windows(rec, rec_tokens, [p for _, p in calls], SWIN_4_TABLE, 2)
    # Named in layers=: the deformable attention, the text backbone's, the text enhancer's, the image-text fusion and
    # the decoder's object queries, each skipped with its reason.
    named = {"model.encoder.layers.0.deformable_layer.self_attn": r"deformable attention: each query's softmax runs "
                                                                  r"over a few points sampled",
             "model.decoder.layers.0.encoder_attn": r"deformable attention",
             "model.text_backbone.encoder.layer.0.attention.self": r"Grounding DINO's text side \(its text backbone, "
                                                                   r"its encoder's text enhancer\): attention among "
                                                                   r"the prompt's text tokens",
             "model.encoder.layers.0.text_enhancer_layer.self_attn": r"Grounding DINO's text side",
             "model.encoder.layers.0.fusion_layer.attn": r"Grounding DINO's image-text fusion: bidirectional "
                                                         r"cross-attention between the image's tokens and the prompt's",
             "model.decoder.layers.0.self_attn": r"DETR decoder attention: its queries are the object queries"}
    with torch.no_grad(), vitmad.record(model, layers=[*rec.layers, *named]) as named_rec:
        model(**inputs)
    assert named_rec.layers == rec.layers
    for layer, reason in named.items():
        assert re.match(reason, named_rec.skipped[layer]), (layer, named_rec.skipped[layer])


# No MAD: attention that is not over the image's cells, or none at all -----------------------------------------------


def _superpoint() -> dict:
    return dict(keypoint_detector_config=transformers.SuperPointConfig(
        encoder_hidden_sizes=[8, 8, 16, 16], decoder_hidden_size=16, keypoint_decoder_dim=65, descriptor_decoder_dim=16,
        max_keypoints=12))


def _slanet():
    backbone = dict(model_type="pp_lcnet", scale=0.25, divisor=16,
                    out_features=["stage2", "stage3", "stage4", "stage5"])
    return (transformers.SLANetForTableRecognition(transformers.SLANetConfig(backbone_config=backbone,
                                                                             max_text_length=3)),
            {"pixel_values": torch.randn(1, 3, 64, 64)})


def _clap(audio_alone: bool):
    audio = transformers.ClapAudioConfig(depths=[1, 1], num_attention_heads=[2, 2], hidden_size=32,
                                         patch_embeds_hidden_size=16, window_size=8, spec_size=64, num_mel_bins=16,
                                         projection_dim=16)
    inputs = {"input_features": torch.randn(1, 1, 64, 16)}
    if audio_alone:
        return transformers.ClapAudioModel(audio), inputs
    text = transformers.ClapTextConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                       intermediate_size=32, vocab_size=100, projection_dim=16)
    config = transformers.ClapConfig(text_config=text.to_dict(), audio_config=audio.to_dict(), projection_dim=16)
    return transformers.ClapModel(config), {**inputs, "input_ids": torch.randint(1, 100, (1, 5))}


def _superglue():
    config = transformers.SuperGlueConfig(**_superpoint(), hidden_size=16, keypoint_encoder_sizes=[8, 16],
                                          gnn_layers_types=["self", "cross"], num_attention_heads=2,
                                          sinkhorn_iterations=3)
    return transformers.SuperGlueForKeypointMatching(config), {"pixel_values": torch.rand(1, 2, 3, 64, 64)}


def _lightglue():
    config = transformers.LightGlueConfig(**_superpoint(), descriptor_dim=16, num_hidden_layers=1,
                                          num_attention_heads=2)
    return transformers.LightGlueForKeypointMatching(config), {"pixel_values": torch.rand(1, 2, 3, 64, 64)}


def _blt():
    sub = dict(hidden_size=16, num_attention_heads=2, num_hidden_layers=1, intermediate_size=32)
    config = transformers.BltConfig(
        vocab_size=260, patcher_config=dict(sub, vocab_size=260),
        encoder_config=dict(sub, vocab_size=260, hidden_size_global=32),
        decoder_config=dict(sub, vocab_size=260, hidden_size_global=32), global_config=dict(sub, hidden_size=32),
        encoder_hash_byte_group_vocab=100, encoder_hash_byte_group_size=[3], max_position_embeddings=64)
    # use_cache=False: BltModel's own cache set-up fails in transformers 5.25 (it asks its config for
    # num_hidden_layers).
    return transformers.BltModel(config), {"input_ids": torch.randint(4, 260, (1, 12)), "use_cache": False}


# name -> (builder of (model, inputs), its first layer, why it has no MAD)
NO_MAD = {
    "slanet": (_slanet, "head.structure_attention_cell",
               "additive attention of SLANet's table-structure decoder: each step's query is the GRU's state"),
    "clap": (lambda: _clap(False), "audio_model.audio_encoder.layers.0.blocks.0.attention.self",
             "attention over an audio clip's mel spectrogram"),
    "clap_audio": (lambda: _clap(True), "audio_encoder.layers.0.blocks.0.attention.self",
                   "attention over an audio clip's mel spectrogram"),
    "superglue": (_superglue, "gnn.layers.0.attention.self", "attention among keypoints"),
    "lightglue": (_lightglue, "transformer_layers.0.self_attention", "attention among keypoints"),
}


@pytest.mark.parametrize("name", list(NO_MAD))
def test_attention_without_mad_is_named_with_its_reason(name):
    build, layer, reason = NO_MAD[name]
    torch.manual_seed(0)
    model, inputs = build()
    with torch.no_grad(), pytest.raises(NoLayerError, match=(
            rf"{type(model.eval()).__name__} has no layer with spatial softmax attention over positioned tokens, so "
            rf"MAD is not defined for it \({re.escape(layer)}: {re.escape(reason)}")):
        with vitmad.record(model):
            model(**inputs)


def test_blt_byte_language_model_is_refused_as_causal():
    torch.manual_seed(0)
    model, inputs = _blt()
    with torch.no_grad(), pytest.raises(ValueError, match=r"patcher\.layers\.0\.self_attn runs causal attention"):
        with vitmad.record(model.eval()):
            model(**inputs)


INTRACLASS = {key: [1, 1, 0] for key in ["reduce_channel", "return_channel"] + [
    f"{branch}_{ratio}ratio" for branch in ("vertical_long_to_small_conv", "horizontal_small_to_long_conv",
                                            "symmetric_conv_long") for ratio in ("long", "mid", "short")]}
LCNET_V3_DET = dict(model_type="pp_lcnet_v3", scale=0.25, divisor=16, out_features=["stage2", "stage3", "stage4",
                                                                                    "stage5"])
HGNET_V2_DET = {key: value for key, value in HGNET_V2.items()
                if not key.startswith(("stem_strides", "stage_downsample"))}  # square strides
DB_HEAD = dict(backbone_config=HGNET_V2_DET, intraclass_block_config=INTRACLASS, neck_out_channels=16,
               scale_factor_list=[1, 2, 4, 8], kernel_list=[3, 2, 2])
# name -> (model class, config class, config): every convolutional model of the group; none computes a softmax.
NO_ATTENTION = {
    "pp_ocrv5_mobile_rec": ("PPOCRV5MobileRecModel", "PPOCRV5MobileRecConfig", dict(backbone_config=LCNET_V3)),
    "pp_ocrv6_tiny_rec": ("PPOCRV6TinyRecForTextRecognition", "PPOCRV6TinyRecConfig",
                          dict(backbone_config=LCNET_V4, hidden_size=16, head_out_channels=10)),
    "convnextv2": ("ConvNextV2Model", "ConvNextV2Config", dict(hidden_sizes=[8, 16, 16, 16], depths=[1, 1, 1, 1])),
    "dinov3_convnext": ("DINOv3ConvNextModel", "DINOv3ConvNextConfig",
                        dict(hidden_sizes=[8, 16, 16, 16], depths=[1, 1, 1, 1])),
    "mobilenet_v1": ("MobileNetV1Model", "MobileNetV1Config", dict(depth_multiplier=0.25)),
    "pp_lcnet": ("PPLCNetForImageClassification", "PPLCNetConfig", dict(scale=0.25)),
    "pp_lcnet_v3": ("PPLCNetV3Backbone", "PPLCNetV3Config", dict(scale=0.25)),
    "pp_lcnet_v4": ("PPLCNetV4Backbone", "PPLCNetV4Config", dict(LCNET_V4, model_type=None)),
    "pp_ocrv5_mobile_det": ("PPOCRV5MobileDetForObjectDetection", "PPOCRV5MobileDetConfig",
                            dict(backbone_config=LCNET_V3_DET, neck_out_channels=16)),
    "pp_ocrv6_small_det": ("PPOCRV6SmallDetForObjectDetection", "PPOCRV6SmallDetConfig",
                           dict(backbone_config=LCNET_V3_DET, layer_list_out_channels=[16, 32, 64, 128],
                                neck_out_channels=16)),
    "pp_ocrv5_server_det": ("PPOCRV5ServerDetForObjectDetection", "PPOCRV5ServerDetConfig", DB_HEAD),
    "pp_ocrv6_medium_det": ("PPOCRV6MediumDetForObjectDetection", "PPOCRV6MediumDetConfig", DB_HEAD),
    # UVDocModel's forward fails in transformers 5.25 (its bridge returns the last branch alone, not the concatenation
    # its connector takes); vitmad refuses it before it runs.
    "uvdoc": ("UVDocModel", "UVDocConfig", {}),
}


@pytest.mark.parametrize("name", list(NO_ATTENTION))
def test_model_without_attention_is_refused_by_name(name):
    model_cls, config_cls, settings = NO_ATTENTION[name]
    settings = {key: value for key, value in settings.items() if value is not None}
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**settings)).eval()
    with torch.no_grad(), pytest.raises(NoLayerError, match=rf"found no attention layer vitmad knows in {model_cls}"):
        with vitmad.record(model):
            model(torch.randn(1, 3, 61, 96))
