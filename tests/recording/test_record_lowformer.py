"""vitmad.record on timm's LowFormer: attention among the tokens of a strided depthwise convolution of the stage
map (``ConvAttention``).

The reference is each layer's own eager softmax probabilities (``fused_attn`` off, seen by patching
``Tensor.softmax`` while the model runs), placed by the geometry written here from ``lowformer_b0``'s design: the
stride-16 stage pools its map with a 5 x 5 convolution of stride 2 and padding 2 (``ceil(n / 2)`` tokens per
axis, token i at the centre of its stride cell, ``(i + 0.5) * 32`` px); the stride-32 stage with a 3 x 3
convolution of stride 1 (its own cells).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

import vitmad
from conftest import batch_norms_on, output_spreads, tensor_softmax_maps
from vitmad.ops.reference import mad_positions_reference

timm = pytest.importorskip("timm")

TOL = {"rtol": 1e-5, "atol": 1e-4}  # pixels; float32 attention against a float64 reference


def cells(gh: int, gw: int, stride: float) -> torch.Tensor:
    rows = (torch.arange(gh, dtype=torch.float64) + 0.5) * stride
    cols = (torch.arange(gw, dtype=torch.float64) + 0.5) * stride
    return torch.cartesian_prod(rows, cols)


def peaked_lowformer(pixels: torch.Tensor):
    """lowformer_b0 with batch norms on this batch's statistics and each attention's q, k, v projection scaled
    to a standard deviation of 2: random weights leave them tiny, and uniform attention hides a misplaced
    token."""
    torch.manual_seed(0)
    model = timm.create_model("lowformer_b0", pretrained=False)
    batch_norms_on(model, pixels)
    attention = [m for m in model.modules() if type(m).__name__ == "ConvAttention"]
    spreads = output_spreads(model, pixels, [m.pwise for m in attention])
    with torch.no_grad():
        for module in attention:
            module.pwise.weight.mul_(2.0 / spreads[module.pwise])
    return model


def eager_maps(model, pixels) -> list[torch.Tensor]:
    model = copy.deepcopy(model)
    for module in model.modules():
        if type(module).__name__ == "ConvAttention":
            module.fused_attn = False
    return tensor_softmax_maps(model, pixels)


@pytest.mark.parametrize("size", [(224, 192), (160, 160)])
def test_lowformer_attention_among_pooled_tokens(size):
    pixels = torch.randn(2, 3, *size)
    model = peaked_lowformer(pixels)
    with torch.no_grad():
        plain = model(pixels)
    with torch.no_grad(), vitmad.record(model) as rec:
        assert torch.equal(model(pixels), plain)
    maps = eager_maps(model, pixels)
    h16, w16 = math.ceil(size[0] / 16), math.ceil(size[1] / 16)
    h32, w32 = math.ceil(size[0] / 32), math.ceil(size[1] / 32)
    pooled = torch.cartesian_prod((torch.arange(math.ceil(h16 / 2), dtype=torch.float64) + 0.5) * 32,
                                  (torch.arange(math.ceil(w16 / 2), dtype=torch.float64) + 0.5) * 32)
    layers = [pooled] * 3 + [cells(h32, w32, 32)] * 4
    assert len(maps) == len(rec.per_layer) == len(layers)
    assert all(attn.amax(-1).mean() > 3.0 / attn.shape[-1] for attn in maps)  # far from uniform
    for recorded, attn, positions in zip(rec.per_layer, maps, layers, strict=True):
        torch.testing.assert_close(recorded.double(), mad_positions_reference(attn, positions), **TOL)
    assert [g.stride[0] for g in rec.geometry] == [32.0] * 7
