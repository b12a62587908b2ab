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
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("timm")

import vitmad  # noqa: E402
from conftest import eager_attention_calls, sharpened  # noqa: E402

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
    """Records one forward; the output must be the plain forward's, bit for bit."""
    with torch.no_grad():
        plain = model(*inputs, **kwargs).logits
        with vitmad.record(model, stats=list(stats)) as rec:
            recorded = model(*inputs, **kwargs).logits
    assert torch.equal(plain, recorded)
    return rec


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
    assert list(rec.skipped) == [f"model.decoder.layers.{i}.self_attn" for i in range(2)]
    assert all("object queries" in reason for reason in rec.skipped.values())


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

_DETR = {  # name: (config class, model class, modeling module or None where its softmax is its own)
    "detr": ("DetrConfig", "DetrForObjectDetection", "detr.modeling_detr"),
    "conditional_detr": ("ConditionalDetrConfig", "ConditionalDetrForObjectDetection",
                         "conditional_detr.modeling_conditional_detr"),
    "dab_detr": ("DabDetrConfig", "DabDetrForObjectDetection", None),
    "table_transformer": ("TableTransformerConfig", "TableTransformerForObjectDetection", None),
}


def _detr_model(name: str, **overrides):
    config_cls, model_cls, _ = _DETR[name]
    settings = dict(d_model=32, encoder_layers=2, decoder_layers=1, encoder_attention_heads=2,
                    decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, num_queries=5,
                    use_timm_backbone=True, backbone="resnet10t")
    if name == "dab_detr":
        settings["hidden_size"] = settings.pop("d_model")
    settings.update(overrides)
    torch.manual_seed(0)
    return sharpened(getattr(transformers, model_cls)(getattr(transformers, config_cls)(**settings)))


def _padded_batch(size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Two images: the first whole, the second 150 x 100 px at the top left, padded with zeros to ``size``."""
    pixels = _pixels(2, size)
    mask = torch.ones(2, *size, dtype=torch.long)
    mask[1, 150:] = 0
    mask[1, :, 100:] = 0
    pixels[1] *= mask[1]
    return pixels, mask


def _valid_tokens(mask: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """``[B, h * w]``: nearest sampling of ``pixel_mask`` at each token, as the model downsamples it."""
    height, width = mask.shape[-2:]
    rows = [math.floor(r * height / grid[0]) for r in range(grid[0])]
    cols = [math.floor(c * width / grid[1]) for c in range(grid[1])]
    return mask[:, rows][:, :, cols].reshape(mask.shape[0], -1).bool()


def _detr_probabilities(name: str, model, pixels, mask) -> list[torch.Tensor]:
    """The encoder layers' own probabilities ``[B, H, N, N]`` float64, in order."""
    modeling = _DETR[name][2]
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
    if _DETR[name][2] is not None:
        model.set_attn_implementation(attn_implementation)
    rec = _record(model, pixels, pixel_mask=mask)
    valid = _valid_tokens(mask, (7, 5))
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
