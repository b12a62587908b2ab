"""vitmad.record on the transformer encoders of DETR-style detectors, against their own eager attention.

The reference places the tokens by the geometry written here from the modeling files:

- RT-DETR, RT-DETRv2, D-FINE, DEIMv2: AIFI layer ``i`` (``model.encoder.aifi.i``) flattens the map of level
  ``encode_proj_layers[i]`` row-major (``flatten(2).transpose(1, 2)``) and attends over it without a mask. The
  backbones here (ResNet, HGNetV2: strided convolutions padded by half their kernel) round each halving up, so a
  ``190 x 122`` image gives maps of ``ceil(H / s) x ceil(W / s)``: ``6 x 4`` at stride 32, ``12 x 8`` at 16.
- DETR, Conditional DETR, DAB-DETR, Table Transformer: the encoder flattens the backbone's last map the same way and
  masks as keys the tokens where ``pixel_mask``, downsampled by nearest sampling (token ``(r, c)`` of an ``h x w``
  map reads pixel ``(floor(r H / h), floor(c W / w))``), is 0. Those tokens have no position: neither query nor key,
  and an image's MAD is the mean over its own queries.

Token ``(r, c)`` of a map of stride ``s`` sits at ``((r + 0.5) s, (c + 0.5) s)`` pixels. Per query, float64, from
the probabilities the model's eager attention computed; entropy over the whole row, prefix mass on the keys without
a position.
"""

from __future__ import annotations

import importlib

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("timm")

import vitmad  # noqa: E402
from conftest import (  # noqa: E402
    DETR_MODELS,
    eager_attention_calls,
    mask_on_grid,
    pad_second_image,
    record_logits_unchanged,
    sharpened,
    tiny_detr,
)

TOL = {"rtol": 1e-5, "atol": 1e-4}  # atol in pixels or nats; MADs here are 20 to 110 px


def _centres(grid: tuple[int, int], stride: int) -> torch.Tensor:
    rows, cols = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
    return (torch.stack([rows, cols], -1).reshape(-1, 2).double() + 0.5) * stride


def _expected(probabilities: torch.Tensor, grid: tuple[int, int], stride: int,
              valid: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """``{statistic: [B, H]}`` of one call's ``[B, H, N, N]`` probabilities; ``valid`` ``[B, N]``: the tokens with a
    position (all by default)."""
    batch, heads, tokens = probabilities.shape[:3]
    valid = torch.ones(batch, tokens, dtype=torch.bool) if valid is None else valid
    distance = torch.cdist(_centres(grid, stride), _centres(grid, stride))
    found = {"mad": [], "entropy": [], "prefix_mass": []}
    for b in range(batch):
        p, keep = probabilities[b], valid[b]
        rows = p[:, keep]  # [H, queries with a position, N]
        found["mad"].append((rows[..., keep] * distance[keep][:, keep]).sum(-1).mean(-1))
        found["entropy"].append(-torch.special.xlogy(rows, rows).sum(-1).mean(-1))
        found["prefix_mass"].append(rows[..., ~keep].sum(-1).mean(-1))
    return {stat: torch.stack(values) for stat, values in found.items()}


# --- RT-DETR, RT-DETRv2, D-FINE, DEIMv2: AIFI over the maps of encode_proj_layers --------------------------------

_AIFI = {  # name: (config class, model class, modeling module, backbone)
    "rt_detr": ("RTDetrConfig", "RTDetrForObjectDetection", "rt_detr.modeling_rt_detr", "resnet"),
    "rt_detr_v2": ("RTDetrV2Config", "RTDetrV2ForObjectDetection", "rt_detr_v2.modeling_rt_detr_v2", "resnet"),
    "d_fine": ("DFineConfig", "DFineForObjectDetection", "d_fine.modeling_d_fine", "hgnet_v2"),
    "deimv2": ("Deimv2Config", "Deimv2ForObjectDetection", "deimv2.modeling_deimv2", "hgnet_v2"),
}


def _backbone(kind: str):
    if kind == "resnet":  # maps of stride 8, 16, 32 with 16, 16, 32 channels
        return transformers.RTDetrResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 16, 32], depths=[1, 1, 1, 1],
                                               layer_type="basic", out_features=["stage2", "stage3", "stage4"])
    return transformers.HGNetV2Config(embedding_size=8, depths=[1, 1, 1, 1], hidden_sizes=[16, 16, 32, 32],
                                      stem_channels=[3, 8, 8], stage_in_channels=[8, 16, 16, 32],
                                      stage_mid_channels=[8, 8, 16, 16], stage_out_channels=[16, 16, 32, 32],
                                      stage_num_blocks=[1, 1, 1, 1], stage_numb_of_layers=[1, 1, 1, 1],
                                      out_features=["stage2", "stage3", "stage4"])


def _aifi_model(name: str, encode_proj_layers=(2,), **overrides):
    config_cls, model_cls, _, backbone = _AIFI[name]
    channels = [16, 16, 32] if backbone == "resnet" else [16, 32, 32]
    settings = dict(backbone_config=_backbone(backbone), encoder_in_channels=channels, encoder_hidden_dim=32,
                    d_model=32, encoder_ffn_dim=32, decoder_ffn_dim=32, encoder_attention_heads=2,
                    decoder_attention_heads=2, encoder_layers=2, decoder_layers=2, num_queries=5, num_denoising=0,
                    decoder_in_channels=[32, 32, 32], encode_proj_layers=list(encode_proj_layers))
    settings.update(overrides)
    config = getattr(transformers, config_cls)(**settings)
    torch.manual_seed(0)
    return sharpened(getattr(transformers, model_cls)(config))


def _attend_with(model, implementation: str) -> None:
    """The detector's attention implementation; its convolutional backbone keeps eager (it has no sdpa to set)."""
    model.set_attn_implementation({"": implementation, "backbone_config": "eager"})


def _pixels(batch: int, size: tuple[int, int]) -> torch.Tensor:
    return torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(1))


def _record(model, *inputs, stats=("mad", "entropy", "prefix_mass"), **kwargs):
    return record_logits_unchanged(model, *inputs, stats=stats, **kwargs)


def _check(rec, expected: list[dict[str, torch.Tensor]]) -> None:
    for stat in ("mad", "entropy", "prefix_mass"):
        torch.testing.assert_close(rec.stats[stat].double(), torch.stack([e[stat] for e in expected]), **TOL)
    torch.testing.assert_close(rec.mad, rec.stats["mad"])


@pytest.mark.parametrize("name", list(_AIFI))
@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("size", [(190, 122), (192, 128)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_aifi_layers_equal_their_eager_attention_on_the_stride_32_map(name, attn_implementation, size):
    """190 x 122 gives a 6 x 4 map at stride 32 (rounded up); 192 x 128 the same map, exactly."""
    model = _aifi_model(name)
    pixels = _pixels(2, size)
    calls = eager_attention_calls(importlib.import_module(f"transformers.models.{_AIFI[name][2]}"), model, pixels)
    _attend_with(model, attn_implementation)
    rec = _record(model, pixels)
    encoder = [p for module, p in calls if p.shape[-1] == 24]  # the decoder's calls attend among its 5 queries
    assert rec.layers == [f"model.encoder.aifi.0.layers.{i}.self_attn" for i in range(2)] and len(encoder) == 2
    assert all(g.grid == (6, 4) and g.stride == (32.0, 32.0) and g.attention == "global" for g in rec.geometry)
    _check(rec, [_expected(p, (6, 4), 32) for p in encoder])
    # The decoder's query self-attention, and its deformable cross-attention to the map (listed since QA 221).
    assert list(rec.skipped) == [f"model.decoder.layers.{i}.{a}" for i in range(2)
                                 for a in ("self_attn", "encoder_attn")]
    assert all("object queries" in rec.skipped[f"model.decoder.layers.{i}.self_attn"] for i in range(2))
    assert all(rec.skipped[f"model.decoder.layers.{i}.encoder_attn"].startswith("deformable attention: each query's "
                                                                                "softmax runs over a few points")
               for i in range(2))


def test_aifi_layers_of_two_levels_each_at_its_own_stride():
    """encode_proj_layers=[1, 2]: aifi.0 runs on the stride-16 map (12 x 8), aifi.1 on the stride-32 one (6 x 4)."""
    model = _aifi_model("rt_detr", encode_proj_layers=(1, 2), encoder_layers=1)
    pixels = _pixels(2, (190, 122))
    calls = eager_attention_calls(importlib.import_module("transformers.models.rt_detr.modeling_rt_detr"), model,
                                  pixels)
    _attend_with(model, "sdpa")
    rec = _record(model, pixels)
    assert rec.layers == ["model.encoder.aifi.0.layers.0.self_attn", "model.encoder.aifi.1.layers.0.self_attn"]
    assert [(g.grid, g.stride) for g in rec.geometry] == [((12, 8), (16.0, 16.0)), ((6, 4), (32.0, 32.0))]
    _check(rec, [_expected(calls[0][1], (12, 8), 16), _expected(calls[1][1], (6, 4), 32)])


def test_a_feat_stride_the_maps_contradict_is_refused():
    """config.feat_strides says 16 for the level whose map is 6 x 4 for 190 x 122 pixels (stride 32)."""
    model = _aifi_model("d_fine", feat_strides=[8, 16, 16])
    with torch.no_grad(), vitmad.record(model):
        with pytest.raises(ValueError, match=r"model\.encoder\.aifi\.0\.layers\.0\.self_attn .*feature map has height "
                                             r"6 for an image height of 190, but a stride of 16 px, "
                                             r"config\.feat_strides\[2\].*gives 11 or 12"):
            model(_pixels(1, (190, 122)))


def test_a_timm_backbone_whose_reductions_contradict_feat_strides_is_refused():
    """The timm backbone reports 8, 16, 32 for its three maps; config.feat_strides says 64 for the last."""
    backbone = transformers.TimmBackboneConfig(backbone="resnet10t", out_indices=[2, 3, 4])
    model = _aifi_model("rt_detr", backbone_config=backbone, encoder_in_channels=[128, 256, 512],
                        feat_strides=[8, 16, 64])
    with torch.no_grad(), vitmad.record(model):
        with pytest.raises(ValueError, match=r"aifi\.0\.layers\.0\.self_attn .*of stride 64 by config\.feat_strides"
                                             r"\[2\].*timm backbone reports the reductions \[8, 16, 32\]"):
            model(_pixels(1, (192, 128)))


def test_deimv2_with_a_dinov3_backbone_records_its_aifi_layer_named():
    """The DINOv3 encoder resamples its 16 px patch grid to the three levels beside a strided-convolution branch;
    the model runs on sides that are multiples of 32 (192 x 128: a 6 x 4 map at stride 32). By default the recording
    takes the DINOv3 tower, which embeds the image; named, the AIFI layer is recorded."""
    backbone = transformers.DINOv3ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                            num_attention_heads=2, patch_size=16, image_size=64,
                                            num_register_tokens=0, out_indices=[1, 2, 3])
    model = _aifi_model("deimv2", backbone_config=backbone, encoder_in_channels=[32, 32, 32], encoder_layers=1,
                        spatial_tuning_adapter_inplanes=8)
    pixels = _pixels(2, (192, 128))
    calls = eager_attention_calls(importlib.import_module("transformers.models.deimv2.modeling_deimv2"), model,
                                  pixels)
    _attend_with(model, "sdpa")
    layer = "model.encoder.aifi.0.layers.0.self_attn"
    with torch.no_grad():
        plain = model(pixels).logits
        with vitmad.record(model, layers=[layer], stats=["mad", "entropy", "prefix_mass"]) as rec:
            assert torch.equal(model(pixels).logits, plain)
    assert rec.layers == [layer] and rec.geometry[0].grid == (6, 4) and rec.geometry[0].stride == (32.0, 32.0)
    _check(rec, [_expected(next(p for module, p in calls if p.shape[-1] == 24), (6, 4), 32)])


def test_the_decoder_and_its_deformable_attention_stay_out_named():
    """Named alone, the decoder's layers are no layer to record: each is listed with its reason."""
    model = _aifi_model("rt_detr")
    with pytest.raises(ValueError, match=r"has no layer with spatial softmax attention over positioned tokens.*"
                                         r"model\.decoder\.layers\.0\.self_attn: DETR decoder attention: its queries "
                                         r"are the object queries.*model\.decoder\.layers\.0\.encoder_attn: "
                                         r"deformable attention"):
        vitmad.record(model, layers=["model.decoder.layers.0.self_attn", "model.decoder.layers.0.encoder_attn"])


# --- DETR, Conditional DETR, DAB-DETR, Table Transformer: the last map, pixel_mask ---------------------------------

def _detr_model(name: str, **overrides):
    return tiny_detr(name, **{"encoder_layers": 2, **overrides})


def _padded_batch(size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Two images: the first whole, the second 150 x 100 px at the top left, padded with zeros to ``size``."""
    return pad_second_image(_pixels(2, size), (150, 100))


def _detr_probabilities(name: str, model, pixels, mask) -> list[torch.Tensor]:
    """The encoder layers' own probabilities ``[B, H, N, N]`` float64, in order."""
    modeling = DETR_MODELS[name][2]
    if modeling is not None:
        calls = eager_attention_calls(importlib.import_module(f"transformers.models.{modeling}"), model, pixels,
                                      pixel_mask=mask)
        encoder = [module for module in model.model.encoder.layers]
        return [p for module, p in calls if any(module is layer.self_attn for layer in encoder)]
    with torch.no_grad():  # their attention computes its softmax itself and returns it
        out = model(pixels, pixel_mask=mask, output_attentions=True)
    batch = pixels.shape[0]
    return [p.double().reshape(batch, -1, *p.shape[-2:]) for p in out.encoder_attentions]


@pytest.mark.parametrize(("name", "attn_implementation"), [
    ("detr", "sdpa"), ("detr", "eager"), ("conditional_detr", "sdpa"), ("conditional_detr", "eager"),
    ("dab_detr", "eager"), ("table_transformer", "eager"),  # these two compute their softmax themselves
])
def test_detr_encoders_place_the_last_map_and_leave_the_padding_without_a_position(name, attn_implementation):
    """200 x 136 pixels, a 7 x 5 map at stride 32 (rounded up); the second image's padding masks its last row and
    column of tokens: its MAD is the mean over its 6 x 4 tokens, among themselves."""
    model = _detr_model(name)
    pixels, mask = _padded_batch((200, 136))
    probabilities = _detr_probabilities(name, model, pixels, mask)
    if DETR_MODELS[name][2] is not None:
        model.set_attn_implementation(attn_implementation)
    rec = _record(model, pixels, pixel_mask=mask)
    valid = mask_on_grid(mask, (7, 5))
    assert valid[0].all() and valid[1].reshape(7, 5)[:6, :4].all() and valid[1].sum() == 24
    assert rec.layers == [f"model.encoder.layers.{i}.self_attn" for i in range(2)] and len(probabilities) == 2
    assert all(g.grid == (7, 5) and g.stride == (32.0, 32.0) for g in rec.geometry)
    assert rec.geometry[0].attention == "global, padding tokens (pixel_mask) without a position"
    _check(rec, [_expected(p, (7, 5), 32, valid) for p in probabilities])
    # Counting the padding tokens as queries and keys at their cells gives another value for the padded image.
    whole = _expected(probabilities[0], (7, 5), 32)["mad"][1]
    assert not torch.allclose(rec.mad[0, 1].double(), whole, rtol=1e-2)
    assert all("object queries" in rec.skipped[layer] for layer in rec.skipped)


def test_detr_without_padding_and_dilated_backbone_at_stride_16():
    """dilation=True (DC5): the timm backbone's last stage dilates instead of striding, its feature_info reports
    16, and 200 x 136 gives a 13 x 9 map."""
    model = _detr_model("detr", dilation=True)
    pixels = _pixels(2, (200, 136))
    probabilities = _detr_probabilities("detr", model, pixels, None)
    model.set_attn_implementation("sdpa")
    rec = _record(model, pixels)
    assert all(g.grid == (13, 9) and g.stride == (16.0, 16.0) and g.attention == "global" for g in rec.geometry)
    _check(rec, [_expected(p, (13, 9), 16) for p in probabilities])


def test_detr_segmentation_skips_its_mask_head_attention():
    model = _detr_model("detr", encoder_layers=1, encoder_attention_heads=8, decoder_attention_heads=8)
    model = sharpened(transformers.DetrForSegmentation(model.config))
    with torch.no_grad(), vitmad.record(model) as rec:
        model(_pixels(1, (128, 96)))
    assert rec.layers == ["detr.model.encoder.layers.0.self_attn"]
    assert rec.skipped["bbox_attention"].startswith("the segmentation head's attention map (MHAttentionMap)")


def test_detr_with_a_backbone_that_reports_no_stride_is_refused():
    backbone = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 16, 32], depths=[1, 1, 1, 1],
                                         out_features=["stage4"])
    model = _detr_model("detr", backbone_config=backbone, use_timm_backbone=False, backbone=None)
    with torch.no_grad(), vitmad.record(model):
        with pytest.raises(ValueError, match=r"model\.encoder\.layers\.0\.self_attn .*its backbone \(ResNetBackbone\) "
                                             r"does not report the stride of its feature maps"):
            model(_pixels(1, (64, 64)))


# --- PP-DocLayoutV2 / V3 / V4: RT-DETR's AIFI; decoders, reading order and order scores skipped -------------------

def _pp_doclayout(version: str, backbone=None, channels=(16, 32, 32), **overrides):
    """Tiny PP-DocLayout detectors on the HGNetV2 backbone above (maps of stride 8, 16, 32). V3 also takes the
    stride-4 map, first (its mask head's), which it drops before the encoder's levels."""
    if backbone is None:
        stages = ["stage1", "stage2", "stage3", "stage4"] if version == "v3" else ["stage2", "stage3", "stage4"]
        backbone = transformers.HGNetV2Config(**{**_backbone("hgnet_v2").to_dict(), "out_features": stages,
                                                 "out_indices": None})
    settings = dict(backbone_config=backbone, encoder_in_channels=list(channels), encoder_hidden_dim=32, d_model=32,
                    encoder_ffn_dim=32, decoder_ffn_dim=32, encoder_attention_heads=2, decoder_attention_heads=2,
                    encoder_layers=2, decoder_layers=1, num_queries=5, num_denoising=0,
                    decoder_in_channels=[32, 32, 32])
    if version == "v2":  # its reading-order encoder runs on the detected boxes after the detector
        settings.update(num_labels=2, class_thresholds=[0.5, 0.5], class_order=[0, 1], reading_order_config=dict(
            hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, coordinate_size=8,
            shape_size=8, num_classes=2, global_pointer_head_size=8))
    if version == "v3":
        settings.update(x4_feat_dim=16, mask_feature_channels=[16, 16], num_prototypes=8)
    if version == "v4":
        settings.update(global_pointer_head_size=8)
    settings.update(overrides)
    name = f"PPDocLayout{version.upper()}"
    torch.manual_seed(0)
    return sharpened(getattr(transformers, f"{name}ForObjectDetection")(getattr(transformers, f"{name}Config")(
        **settings)))


_PP_SKIPPED = {  # version: (skipped layer, words of its reason)
    "v2": [("model.decoder.layers.0.self_attn", "object queries"),
           ("reading_order.encoder.layer.0.attention.self", "reading-order encoder")],
    "v3": [("model.decoder.layers.0.self_attn", "object queries")],
    "v4": [("model.decoder.layers.0.self_attn", "object queries"),
           ("model.decoder.successor_order_head.global_pointer", "reading-order scores"),
           ("model.decoder.relative_order_head.global_pointer", "reading-order scores")],
}


@pytest.mark.parametrize("version", ["v2", "v3", "v4"])
@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_pp_doclayout_aifi_layers_equal_their_eager_attention(version, attn_implementation):
    """190 x 122 gives a 6 x 4 map at stride 32 (V3's mask head needs sides that are multiples of 32: 192 x 128, the
    same map); the decoder's query attention, V2's reading-order encoder and V4's order scores are skipped."""
    model = _pp_doclayout(version)
    size = (192, 128) if version == "v3" else (190, 122)
    pixels = _pixels(2, size)
    modeling = importlib.import_module(f"transformers.models.pp_doclayout_{version}.modeling_pp_doclayout_{version}")
    calls = eager_attention_calls(modeling, model, pixels)
    aifi = [layer.self_attn for layer in model.model.encoder.aifi[0].layers]
    encoder = [p for module, p in calls if any(module is attention for attention in aifi)]
    model.set_attn_implementation({"": attn_implementation, "backbone_config": "eager"})
    rec = _record(model, pixels)
    assert rec.layers == [f"model.encoder.aifi.0.layers.{i}.self_attn" for i in range(2)] and len(encoder) == 2
    assert all(g.grid == (6, 4) and g.stride == (32.0, 32.0) and g.attention == "global" for g in rec.geometry)
    _check(rec, [_expected(p, (6, 4), 32) for p in encoder])
    for layer, words in _PP_SKIPPED[version]:
        assert words in rec.skipped[layer]


def test_pp_doclayout_v3_with_a_timm_backbone_drops_its_first_map_before_the_levels():
    """The timm backbone reports 4, 8, 16, 32 for its four maps; the levels are the last three, so the AIFI layer's
    level 2 is stride 32, as config.feat_strides says (no refusal for four reductions against three strides)."""
    backbone = transformers.TimmBackboneConfig(backbone="resnet10t", out_indices=[1, 2, 3, 4])
    model = _pp_doclayout("v3", backbone=backbone, channels=(128, 256, 512), x4_feat_dim=64)
    pixels = _pixels(1, (192, 128))
    modeling = importlib.import_module("transformers.models.pp_doclayout_v3.modeling_pp_doclayout_v3")
    calls = eager_attention_calls(modeling, model, pixels)
    aifi = [layer.self_attn for layer in model.model.encoder.aifi[0].layers]
    model.set_attn_implementation({"": "sdpa", "backbone_config": "eager"})
    rec = _record(model, pixels)
    assert [(g.grid, g.stride) for g in rec.geometry] == [((6, 4), (32.0, 32.0))] * 2
    _check(rec, [_expected(p, (6, 4), 32) for module, p in calls if any(module is a for a in aifi)])


def test_pp_doclayout_given_a_plain_layout_by_hand_still_skips_its_decoder():
    """The refusal PP-DocLayout got before its family was known advised patch= and grid=; followed, the decoder's
    object queries were measured as 8 extra tokens and the grid (found by QA). Now the family places the AIFI
    layer and skips the decoder, and the values given are said to be unused."""
    model = _pp_doclayout("v3", num_queries=20)
    pixels = _pixels(1, (128, 96))
    with torch.no_grad():
        with vitmad.record(model) as rec:
            model(pixels)
        with pytest.warns(UserWarning, match=r"patch=32, grid=\[4, 3\] given, but no recorded layer"):
            with vitmad.record(model, patch=32, grid=[4, 3]) as given:
                model(pixels)
    assert given.layers == rec.layers == [f"model.encoder.aifi.0.layers.{i}.self_attn" for i in range(2)]
    assert torch.equal(given.mad, rec.mad) and "object queries" in given.skipped["model.decoder.layers.0.self_attn"]


# --- OmDet-Turbo: RT-DETR's encoder design over its timm Swin's stride-32 map --------------------------------------

def _omdet(size: tuple[int, int]):
    config = transformers.OmDetTurboConfig(
        image_size=list(size), text_config=dict(model_type="clip_text_model", vocab_size=100, hidden_size=64,
                                                intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                                max_position_embeddings=16, projection_dim=32),
        text_projection_in_dim=64, text_projection_out_dim=64, task_encoder_hidden_dim=64, class_embed_dim=64,
        encoder_hidden_dim=32, vision_features_channels=[32, 32, 32], encoder_attention_heads=2,
        encoder_dim_feedforward=32, encoder_layers=2, decoder_hidden_dim=32, decoder_num_heads=2,
        decoder_num_layers=1, decoder_dim_feedforward=32, num_queries=10, disable_custom_kernels=True)
    torch.manual_seed(0)
    return sharpened(transformers.OmDetTurboForObjectDetection(config))


def _omdet_inputs(pixels: torch.Tensor) -> dict:
    generator = torch.Generator().manual_seed(2)
    return dict(pixel_values=pixels, classes_input_ids=torch.randint(0, 100, (2, 5), generator=generator),
                classes_attention_mask=torch.ones(2, 5, dtype=torch.long),
                tasks_input_ids=torch.randint(0, 100, (1, 6), generator=generator),
                tasks_attention_mask=torch.ones(1, 6, dtype=torch.long), classes_structure=torch.tensor([2]))


def test_omdet_turbo_encoder_named_is_placed_on_its_swin_stride_32_map():
    """The Swin backbone (timm, feature_info reductions 8, 16, 32) makes a 6 x 4 map at stride 32 of 192 x 128
    pixels; encoder_projection_indices=[2] takes it, flattened row-major, without a mask. By default the recording
    takes the Swin tower, which embeds the image; named, the encoder's layers are placed, its decoder skipped."""
    model = _omdet((192, 128))
    inputs = _omdet_inputs(_pixels(1, (192, 128)))
    attentions = [layer.self_attn for layer in model.encoder.encoder[0].layers]
    probabilities = []
    hooks = [a.register_forward_hook(lambda m, args, out: probabilities.append(out[1].double())) for a in attentions]
    with torch.no_grad():
        model(**inputs, output_attentions=True)  # the attention returns its own softmax
    for hook in hooks:
        hook.remove()
    layers = [f"encoder.encoder.0.layers.{i}.self_attn" for i in range(2)]
    with torch.no_grad():
        plain = model(**inputs).decoder_coord_logits
        with vitmad.record(model) as default:
            model(**inputs)
        with vitmad.record(model, layers=[*layers, "decoder.layers.0.self_attn"],
                           stats=["mad", "entropy", "prefix_mass"]) as rec:
            assert torch.equal(model(**inputs).decoder_coord_logits, plain)
    assert all(name.startswith("vision_backbone.") for name in default.layers)
    assert rec.layers == layers and len(probabilities) == 2
    assert all(g.grid == (6, 4) and g.stride == (32.0, 32.0) for g in rec.geometry)
    _check(rec, [_expected(p, (6, 4), 32) for p in probabilities])
    assert "object queries" in rec.skipped["decoder.layers.0.self_attn"]


# --- SAM3: its DETR encoder over the FPN level Sam3Model hands it -------------------------------------------------

def _sam3(detector: str, scale_factors=None, size=(48, 32)):
    """Sam3Model, or Sam3LiteTextModel: SAM3 LiteText's copy of its detector (the same Sam3VisionModel, DETR encoder
    and decoders under its own class names) around a MobileCLIP text encoder, its ViT built for ``size``."""
    vit = dict(model_type="sam3_vit_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=2, patch_size=8, image_size=list(size), pretrain_image_size=16, window_size=3,
               global_attn_indexes=[1])
    text = dict(vocab_size=100, hidden_size=32, intermediate_size=64, projection_dim=32, num_hidden_layers=1,
                num_attention_heads=2, max_position_embeddings=16)
    if detector == "Sam3":
        text.update(model_type="clip_text_model", bos_token_id=0, eos_token_id=1, pad_token_id=1)
    else:
        text.update(num_hidden_layers=2, repmixer_kernel_size=3)  # a RepMixer block, then an attention block
    config = getattr(transformers, f"{detector}Config")(
        vision_config=dict(backbone_config=vit, fpn_hidden_size=32, scale_factors=scale_factors),
        text_config=text,
        geometry_encoder_config=dict(hidden_size=32, num_layers=1, num_attention_heads=2, intermediate_size=64,
                                     roi_size=2),
        detr_encoder_config=dict(hidden_size=32, num_layers=2, num_attention_heads=2, intermediate_size=64),
        detr_decoder_config=dict(hidden_size=32, num_layers=1, num_queries=5, num_attention_heads=2,
                                 intermediate_size=64),
        mask_decoder_config=dict(hidden_size=32, num_upsampling_stages=2, num_attention_heads=2))
    torch.manual_seed(0)
    return sharpened(getattr(transformers, f"{detector}Model")(config))


@pytest.mark.parametrize("detector", ["Sam3", "Sam3LiteText"])
@pytest.mark.parametrize(("scale_factors", "size", "grid", "stride"), [
    (None, (48, 32), (6, 4), 8.0),  # [4, 2, 1, 0.5]: the 1x level, on the ViT's 8 px patches
    ([4.0, 2.0, 0.5], (48, 32), (12, 8), 4.0),  # the 2x level: each patch's 2 x 2 cells of 4 px
    # 44 x 36 px: a 5 x 4 patch grid (floored), 10 x 8 on the 2x level, refused before (44 / 4 px allows 11 rows)
    ([4.0, 2.0, 0.5], (44, 36), (10, 8), 4.0),
])
def test_sam3_detr_encoder_named_is_placed_on_its_fpn_level(detector, scale_factors, size, grid, stride):
    """48 x 32 pixels, 8 px patches: a 6 x 4 patch grid. Sam3Model (and SAM3 LiteText's copy of it, placed alike
    since 2026-12-05, refused as outside the tower before) drops the neck's last level and hands the last of the
    others to its DETR encoder, flattened row-major; the encoder's cross-attention to the prompt, the geometry
    encoder, the DETR decoder and the mask decoder are skipped with their reasons."""
    model = _sam3(detector, scale_factors, size)
    ids = torch.randint(0, 100, (2, 6), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, 4:] = 0
    boxes = torch.tensor([[[0.5, 0.5, 0.3, 0.3]], [[0.3, 0.6, 0.2, 0.4]]])
    inputs = dict(pixel_values=_pixels(2, size), input_ids=ids, attention_mask=mask, input_boxes=boxes)
    modeling = "sam3.modeling_sam3" if detector == "Sam3" else "sam3_lite_text.modeling_sam3_lite_text"
    calls = eager_attention_calls(importlib.import_module(f"transformers.models.{modeling}"), model, **inputs)
    own = [layer.self_attn for layer in model.detr_encoder.layers]
    probabilities = [p for module, p in calls if any(module is a for a in own)]
    model.set_attn_implementation("sdpa")
    layers = [f"detr_encoder.layers.{i}.self_attn" for i in range(2)]
    with torch.no_grad():
        plain = model(**inputs).pred_masks
        with vitmad.record(model, layers=["detr_encoder.*", "detr_decoder.*", "geometry_encoder.*", "mask_decoder.*"],
                           stats=["mad", "entropy", "prefix_mass"]) as rec:
            assert torch.equal(model(**inputs).pred_masks, plain)
    assert rec.layers == layers and len(probabilities) == 2
    assert all(g.grid == grid and g.stride == (stride, stride) for g in rec.geometry)
    _check(rec, [_expected(p, grid, stride) for p in probabilities])
    assert "prompt's text and geometry tokens" in rec.skipped["detr_encoder.layers.0.cross_attn"]
    assert "object queries" in rec.skipped["detr_decoder.layers.0.self_attn"]
    assert "geometry encoder" in rec.skipped["geometry_encoder.layers.0.self_attn"]
    assert "mask decoder" in rec.skipped["mask_decoder.prompt_cross_attn"]
