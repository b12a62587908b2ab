"""The DETR paper's decoder attention maps: with stats=[..., "prefix_maps"], the cross-attention of DETR, Conditional
DETR, DAB-DETR and Table Transformer's object queries over the encoder's map is recorded as class-attention maps,
against the model's own eager probabilities.

The reference places the keys by the geometry written here from the modeling files: the decoder's cross-attention
(``encoder_attn``; DAB-DETR's ``cross_attn.cross_attn``) attends from the ``num_queries`` object queries over the
encoder's output, the backbone's last map flattened row-major (``flatten(2).transpose(1, 2)``), masked with the
same ``flattened_mask`` as the encoder: ``pixel_mask`` downsampled by nearest sampling (token ``(r, c)`` of an
``h x w`` map reads pixel ``(floor(r H / h), floor(c W / w))``). Key ``(r, c)`` is column ``r * w + c`` of the map,
at ``((r + 0.5) s, (c + 0.5) s)`` pixels; a masked key has no position and is NaN in the map. Conditional DETR and
DAB-DETR concatenate content and positional parts of q and k, but their softmax is still over the map's tokens.
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

TOL = {"rtol": 1e-5, "atol": 1e-6}  # probabilities; float32 model against its own float32 probabilities

_QUERIES = 5


def _model(name: str, **overrides):
    return tiny_detr(name, **{"decoder_layers": 2, "num_queries": _QUERIES, **overrides})


def _cross_attention(name: str, layer):
    return layer.cross_attn.cross_attn if name == "dab_detr" else layer.encoder_attn


def _layer_names(name: str, prefix: str = "model.") -> list[str]:
    inner = "cross_attn.cross_attn" if name == "dab_detr" else "encoder_attn"
    return [f"{prefix}decoder.layers.{i}.{inner}" for i in range(2)]


def _padded_batch(size: tuple[int, int], kept: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Two images: the first whole, the second ``kept`` px at the top left, padded with zeros to ``size``."""
    return pad_second_image(torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1)), kept)


def _cross_probabilities(name: str, model, pixels, mask) -> list[torch.Tensor]:
    """The decoder layers' own cross-attention probabilities ``[B, H, Q, N]`` float64, in order."""
    modeling = DETR_MODELS[name][2]
    if modeling is not None:
        calls = eager_attention_calls(importlib.import_module(f"transformers.models.{modeling}"), model, pixels,
                                      pixel_mask=mask)
        cross = [_cross_attention(name, layer) for layer in model.model.decoder.layers]
        return [p for module, p in calls if any(module is c for c in cross)]
    with torch.no_grad():  # their attention computes its softmax itself and returns it
        out = model(pixels, pixel_mask=mask, output_attentions=True)
    return [p.double().reshape(pixels.shape[0], -1, *p.shape[-2:]) for p in out.cross_attentions]


def _record(model, *inputs, stats, **kwargs):
    return record_logits_unchanged(model, *inputs, stats=stats, **kwargs)


@pytest.mark.parametrize(("name", "attn_implementation"), [
    ("detr", "sdpa"), ("detr", "eager"), ("conditional_detr", "sdpa"), ("conditional_detr", "eager"),
    ("dab_detr", "eager"), ("table_transformer", "eager"),  # these two compute their softmax themselves
])
def test_decoder_cross_attention_maps_equal_the_models_own_on_the_encoders_grid(name, attn_implementation):
    """200 x 136 pixels, a 7 x 5 map at stride 32 (rounded up); the second image keeps 150 x 100 px, so its last
    row and column of keys are padding: NaN in its maps, whose other columns are the model's probabilities."""
    model = _model(name)
    pixels, mask = _padded_batch((200, 136), (150, 100))
    probabilities = _cross_probabilities(name, model, pixels, mask)
    if DETR_MODELS[name][2] is not None:
        model.set_attn_implementation(attn_implementation)
    valid = mask_on_grid(mask, (7, 5))
    assert valid[0].all() and valid[1].reshape(7, 5)[:6, :4].all() and valid[1].sum() == 24
    rec = _record(model, pixels, pixel_mask=mask, stats=("mad", "entropy", "prefix_maps"))
    assert len(probabilities) == 2 and all(p.shape == (2, 2, _QUERIES, 35) for p in probabilities)
    assert list(rec.class_attention_maps) == _layer_names(name)
    for maps, geometry, expected in zip(rec.class_attention_maps.values(), rec.calls[-1].class_geometry,
                                        probabilities):
        assert geometry.grid == (7, 5) and geometry.stride == (32.0, 32.0)
        assert geometry.attention == ("cross-attention of the object queries over global, padding tokens "
                                      "(pixel_mask) without a position")
        reference = expected.masked_fill(~valid[:, None, None, :], float("nan"))
        assert maps.shape == (2, 2, _QUERIES, 35)
        torch.testing.assert_close(maps.double(), reference, equal_nan=True, **TOL)
        assert maps[1, ..., ~valid[1]].isnan().all() and not maps[:, ..., valid[1]].isnan().any()
    # The encoder's layers are recorded as without the maps; the decoder's skipped, with their reasons.
    mad_only = _record(model, pixels, pixel_mask=mask, stats=("mad", "entropy"))
    assert rec.layers == mad_only.layers == ["model.encoder.layers.0.self_attn"]
    for stat in ("mad", "entropy"):
        assert torch.equal(rec.stats[stat], mad_only.stats[stat])
    assert mad_only.calls[-1].class_layers == []
    self_attention = "self_attn.self_attn" if name == "dab_detr" else "self_attn"
    assert list(rec.skipped) == list(mad_only.skipped) and set(rec.skipped) == {
        *_layer_names(name), *(f"model.decoder.layers.{i}.{self_attention}" for i in range(2))}
    for i in range(2):
        assert rec.skipped[f"model.decoder.layers.{i}.{self_attention}"].startswith("DETR decoder attention: ")
    for layer in _layer_names(name):
        assert "object queries" in rec.skipped[layer] and "rec.class_attention_maps" in rec.skipped[layer]


def test_detr_cross_attention_without_padding_on_a_dilated_stride_16_map():
    """dilation=True (DC5): 161 x 97 pixels give an 11 x 7 map at stride 16 (rounded up), no key masked."""
    model = _model("detr", dilation=True)
    pixels = torch.randn(2, 3, 161, 97, generator=torch.Generator().manual_seed(2))
    probabilities = _cross_probabilities("detr", model, pixels, None)
    model.set_attn_implementation("sdpa")
    rec = _record(model, pixels, stats=("mad", "prefix_maps"))
    for maps, geometry, expected in zip(rec.class_attention_maps.values(), rec.calls[-1].class_geometry,
                                        probabilities):
        assert geometry.grid == (11, 7) and geometry.stride == (16.0, 16.0)
        assert geometry.attention == "cross-attention of the object queries over global"
        assert maps.shape == (2, 2, _QUERIES, 77)
        torch.testing.assert_close(maps.double(), expected, **TOL)


def test_detr_segmentation_records_its_decoder_maps_and_skips_its_mask_head_joint_softmax():
    """DetrMHAttentionMap's softmax runs over heads and tokens together: per query its weights sum to 1 over both,
    not per head, so it stays skipped, named; the decoder's cross-attention maps are recorded."""
    model = _model("detr", decoder_layers=1, encoder_attention_heads=8, decoder_attention_heads=8)
    model = sharpened(transformers.DetrForSegmentation(model.config))
    pixels = torch.randn(1, 3, 128, 96, generator=torch.Generator().manual_seed(3))
    seen = []
    model.bbox_attention.register_forward_hook(lambda module, args, output: seen.append(output))
    with torch.no_grad(), vitmad.record(model, stats=["mad", "prefix_maps"]) as rec:
        model(pixels)
    weights = seen[0]  # [B, Q, heads, h, w]
    assert torch.allclose(weights.flatten(2).sum(-1), torch.ones(1, _QUERIES))
    assert not torch.allclose(weights.flatten(3).sum(-1), torch.ones(1, _QUERIES, 8))
    assert rec.layers == ["detr.model.encoder.layers.0.self_attn"]
    assert list(rec.class_attention_maps) == ["detr.model.decoder.layers.0.encoder_attn"]
    assert rec.class_attention_maps["detr.model.decoder.layers.0.encoder_attn"].shape == (1, 8, _QUERIES, 12)
    assert "jointly" in rec.skipped["bbox_attention"]
