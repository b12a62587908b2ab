"""EfficientLoFTR (transformers ``EfficientLoFTRForKeypointMatching``): a keypoint matcher whose coarse transformer
attends over an aggregated map of each image of a pair.

Each layer's self-attention aggregates the backbone's coarse map (stride 8: the RepVGG stages' strides 2, 1, 2, 2)
by a 4 x 4 convolution of stride 4 (queries) and a 4 x 4 max-pooling of stride 4 (keys), so queries and keys are the
same row-major grid of 32 px cells; it is recorded as a plain grid, one row per image of the pair. Its
cross-attention attends from one image's map to the other image's: skipped with the reason (no distance on the
query's image). Checked against the model's own eager probabilities placed on the grid written here.
"""

from __future__ import annotations

import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

import vitmad  # noqa: E402
from conftest import batch_norms_on, eager_attention_calls, sharpened  # noqa: E402

CELL = 32  # backbone stride 8 times the aggregation stride 4


def _model(pixels: torch.Tensor):
    config = transformers.EfficientLoFTRConfig(stage_num_blocks=[1, 1, 1, 1], num_attention_layers=2)
    torch.manual_seed(0)
    model = transformers.EfficientLoFTRForKeypointMatching(config)
    # The batch norms' initial weights (std 0.02) shrink the coarse map to a constant: every head would attend
    # uniformly, and a misplaced token would not show. Unit weights and the statistics of the test's pixels instead.
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            torch.nn.init.ones_(module.weight)
    batch_norms_on(model, pixels)
    return sharpened(model)


def _grid(size: int) -> int:
    """The aggregated map's side for an input side (a multiple of 32: the model's upsampling of the attention output
    by 4 must give back the coarse map): three stride-2 3x3 convolutions of padding 1, then a 4 x 4 convolution of
    stride 4."""
    for _ in range(3):
        size = (size + 1) // 2
    return (size - 4) // 4 + 1


def _record(model, pixels):
    """One recording of the model's forward, whose output must be the forward's without it, bit for bit."""
    with torch.no_grad():
        plain = model(pixel_values=pixels)
        with vitmad.record(model, stats=["mad", "entropy", "self_mass"]) as rec:
            recorded = model(pixel_values=pixels)
    torch.testing.assert_close(recorded.matches, plain.matches, rtol=0, atol=0)
    torch.testing.assert_close(recorded.matching_scores, plain.matching_scores, rtol=0, atol=0)
    return rec


@pytest.mark.parametrize("size", [(96, 128), (64, 160)])
def test_self_attention_is_a_grid_of_32_px_cells_and_cross_attention_is_skipped(size):
    pixels = torch.randn(1, 2, 3, *size)
    model = _model(pixels)
    sdpa = _record(model, pixels)
    from transformers.models.efficientloftr import modeling_efficientloftr
    calls = eager_attention_calls(modeling_efficientloftr, model, pixel_values=pixels)  # the model is eager now
    # Against the probabilities of the same (eager) forward; the sdpa recording's first layer has the same inputs,
    # its second layer those of sdpa's first (its own rounding, up to 4e-6 nats of entropy apart: first layer only).
    eager = _record(model, pixels)
    layers = [f"efficientloftr.local_feature_transformer.layers.{i}" for i in range(2)]
    for rec in (eager, sdpa):
        assert rec.layers == [f"{layer}.self_attention.attention" for layer in layers]
        assert list(rec.skipped) == [f"{layer}.cross_attention.attention" for layer in layers]
        assert all("another image" in reason for reason in rec.skipped.values())
    # Per layer: the self-attention of both images in one call, then the two cross-attention calls.
    self_calls = [p for module, p in calls if p.shape[0] == 2]
    assert len(self_calls) == 2
    gh, gw = _grid(size[0]), _grid(size[1])
    rows, cols = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    centres = (torch.stack([rows.flatten(), cols.flatten()], -1).double() + 0.5) * CELL
    distance = torch.cdist(centres, centres)
    for layer, p in enumerate(self_calls):
        assert p.shape[-1] == gh * gw
        expected = {"mad": (p * distance).sum(-1).mean(-1),
                    "entropy": -(p * p.clamp_min(1e-300).log()).sum(-1).mean(-1),
                    "self_mass": p.diagonal(dim1=-2, dim2=-1).mean(-1)}
        assert (expected["entropy"] < math.log(gh * gw) - 0.1).all()  # far from uniform: a misplaced token shows
        for rec in (eager, sdpa) if layer == 0 else (eager,):
            assert rec.geometry[layer].grid == (gh, gw) and rec.geometry[layer].stride == (CELL, CELL)
            for name, value in expected.items():
                torch.testing.assert_close(rec.stats[name][layer].double(), value, rtol=1e-5,
                                           atol=1e-4 if name == "mad" else 1e-6)


def test_a_wildcard_over_the_transformer_skips_the_cross_attention_modules_alone():
    """The cross-attention is recognised by where it sits (the layer's cross_attention); a wildcard also names the
    modules around it (its aggregation, norms, MLP), which are no attention to skip."""
    pixels = torch.randn(1, 2, 3, 64, 64)
    model = _model(pixels)
    with torch.no_grad(), vitmad.record(model, layers=["efficientloftr.local_feature_transformer.*"]) as rec:
        model(pixel_values=pixels)
    layers = [f"efficientloftr.local_feature_transformer.layers.{i}" for i in range(2)]
    assert rec.layers == [f"{layer}.self_attention.attention" for layer in layers]
    assert list(rec.skipped) == [f"{layer}.cross_attention.attention" for layer in layers]
