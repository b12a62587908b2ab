"""vitmad.record on timm's ``MultiQueryAttention2d`` (MobileNetV4 hybrids; MobileNetV5 uses the same module).

The reference is each layer's own eager softmax probabilities (``fused_attn`` off: the input of its attention
dropout), placed by the geometry written here from MobileNetV4-hybrid-medium's design: four attention blocks in
the stride-16 stage whose keys and values come from a 3 x 3 depthwise convolution of stride 2 and padding 1
(``ceil(n / 2)`` keys per axis, key i at the centre of its stride cell: ``(i + 0.5) * 32`` px), then four in the
stride-32 stage over the whole map; queries are the map's cells in both.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

import vitmad
from conftest import batch_norms_on, output_spreads
from vitmad.ops.reference import mad_positions_reference

timm = pytest.importorskip("timm")

TOL = {"rtol": 1e-5, "atol": 1e-4}  # pixels; float32 attention against a float64 reference


def axis(count: int, step: int, stride: float) -> torch.Tensor:
    """Centres of ``count`` outputs of a stride-``step`` operation over ``stride``-pixel cells."""
    return (torch.arange(count, dtype=torch.float64) + 0.5) * step * stride


def eager_maps(model, pixels) -> list[torch.Tensor]:
    model, maps = copy.deepcopy(model), []
    for module in model.modules():
        if type(module).__name__ == "MultiQueryAttention2d":
            module.fused_attn = False
            module.attn_drop.register_forward_pre_hook(lambda m, args: maps.append(args[0]))
    with torch.no_grad():
        model(pixels)
    return maps


@pytest.mark.parametrize("size", [(96, 96), (80, 112)])
def test_mobilenetv4_hybrid_keys_pooled_by_a_strided_convolution(size):
    torch.manual_seed(0)
    model = timm.create_model("mobilenetv4_hybrid_medium", pretrained=False)
    pixels = torch.randn(2, 3, *size)
    batch_norms_on(model, pixels)
    # The blocks' layer scales leave the attention input at ~0.006 and less: each layer's queries and keys are
    # scaled to a standard deviation of 3, which gives peaked attention.
    attention = [m for m in model.modules() if type(m).__name__ == "MultiQueryAttention2d"]
    spreads = output_spreads(model, pixels, [p for m in attention for p in (m.query, m.key)])
    with torch.no_grad():
        for module in attention:
            module.query.proj.weight.mul_(3.0 / spreads[module.query])
            module.key.proj.weight.mul_(3.0 / spreads[module.key])
    with torch.no_grad():
        plain = model(pixels)
    with torch.no_grad(), vitmad.record(model, stats="self_mass") as rec:
        assert torch.equal(model(pixels), plain)
    maps = eager_maps(model, pixels)
    h16, w16 = math.ceil(size[0] / 16), math.ceil(size[1] / 16)
    h32, w32 = math.ceil(size[0] / 32), math.ceil(size[1] / 32)
    stage16 = (torch.cartesian_prod(axis(h16, 1, 16), axis(w16, 1, 16)),
               torch.cartesian_prod(axis(math.ceil(h16 / 2), 2, 16), axis(math.ceil(w16 / 2), 2, 16)))
    stage32 = (torch.cartesian_prod(axis(h32, 1, 32), axis(w32, 1, 32)),) * 2
    layers = [stage16] * 4 + [stage32] * 4
    assert len(maps) == len(rec.per_layer) == len(layers)
    assert all(attn.amax(-1).mean() > 3.0 / attn.shape[-1] for attn in maps)  # far from uniform
    for recorded, attn, (queries, keys) in zip(rec.per_layer, maps, layers, strict=True):
        torch.testing.assert_close(recorded.double(), mad_positions_reference(attn, queries, keys), **TOL)
    # The stride-32 layers' keys are the queries' own cells (kv_stride 1): their self mass is A[t, t]'s mean (it
    # was NaN, as beside pooled keys, QA helper-240); the stride-16 layers' keys are other tokens: NaN.
    self_mass = rec.calls[-1].statistics["self_mass"]
    for recorded, attn in zip(self_mass[4:], maps[4:], strict=True):
        # Probabilities: the fused and the eager float32 softmax of these peaked logits differ by up to ~2e-6.
        torch.testing.assert_close(recorded.double(), attn.double().diagonal(dim1=-2, dim2=-1).mean(-1),
                                   rtol=1e-5, atol=5e-6)
    assert all(recorded.isnan().all() for recorded in self_mass[:4])
    assert [g.grid for g in rec.geometry] == [(h16, w16)] * 4 + [(h32, w32)] * 4
    assert [g.stride[0] for g in rec.geometry] == [16.0] * 4 + [32.0] * 4
