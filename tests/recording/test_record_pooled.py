"""vitmad.record on spatial-reduction attention: PVT v2 (timm and transformers), PVT v1, Segformer and Twins.

Each test builds a tiny random model, records it, and compares every layer's MAD with the MAD of the model's
own eager attention probabilities, placed by the geometry written here: a stage's grid is the image divided by
the strides of the patch embeddings (4, then 2 per stage, rounded up by the overlapping convolutions' padding),
each token at the centre of its cell, a key pooled by an r x r convolution of stride r at the centre of its
stride cell (the r x r cells it reads); Twins' window padding, which the model does not mask, is a key at its
cell of the padded grid (past the image edge) and no query.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

import vitmad
from vitmad.ops.reference import mad_positions_reference

timm = pytest.importorskip("timm")

TOL = {"rtol": 1e-5, "atol": 1e-4}  # pixels; float32 attention against a float64 reference
DIMS = dict(embed_dims=(8, 16, 24, 32), num_heads=(1, 2, 2, 4))
HF_DIMS = dict(hidden_sizes=[8, 16, 24, 32], num_attention_heads=[1, 2, 2, 4], depths=[1, 1, 1, 1],
               mlp_ratios=[2, 2, 2, 2])


def cells(gh: int, gw: int, stride: float) -> torch.Tensor:
    """[gh * gw, 2] centres of a gh x gw grid of stride-pixel cells, row-major."""
    rows = (torch.arange(gh, dtype=torch.float64) + 0.5) * stride
    cols = (torch.arange(gw, dtype=torch.float64) + 0.5) * stride
    return torch.cartesian_prod(rows, cols)


def with_nan(count: int, positions: torch.Tensor) -> torch.Tensor:
    return torch.cat([torch.full((count, 2), float("nan"), dtype=torch.float64), positions])


def adaptive_7(gh: int, gw: int, stride: float) -> torch.Tensor:
    """Centres of AdaptiveAvgPool2d(7)'s windows: output i averages input rows floor(7i / n) ... ceil(7(i+1) / n)."""
    def axis(n):
        return torch.tensor([(math.floor(i * n / 7) + math.ceil((i + 1) * n / 7)) / 2 * stride for i in range(7)],
                            dtype=torch.float64)
    return torch.cartesian_prod(axis(gh), axis(gw))


def stage_grids(height: int, width: int, first: int, later: int, overlapping: bool):
    """[(grid_h, grid_w, stride)] of four stages: patch embeddings of stride ``first`` then ``later``; overlapping
    ones (kernel 7 / 3, padding 3 / 1) round up, plain ones (kernel = stride) round down."""
    rounding = math.ceil if overlapping else math.floor
    gh, gw, stride = rounding(height / first), rounding(width / first), first
    grids = [(gh, gw, stride)]
    for _ in range(3):
        gh, gw, stride = rounding(gh / later), rounding(gw / later), stride * later
        grids.append((gh, gw, stride))
    return grids


def expected_sr(grids, sr_ratios, depth: int, *, linear: bool = False, cls_last: bool = False):
    """Per layer (queries, keys) of spatial-reduction attention: keys pooled by an sr x sr convolution."""
    layers = []
    for stage, ((gh, gw, stride), sr) in enumerate(zip(grids, sr_ratios)):
        queries = cells(gh, gw, stride)
        if linear:
            keys = adaptive_7(gh, gw, stride)
        elif sr > 1:
            keys = cells(gh // sr, gw // sr, stride * sr)
        else:
            keys = queries
        if cls_last and stage == len(grids) - 1:
            queries, keys = with_nan(1, queries), with_nan(1, keys)
        layers += [(queries, keys)] * depth
    return layers


def assert_recorded(rec, maps, layers):
    """Every recorded layer against the reference MAD of its eager map, placed by ``layers``."""
    assert len(rec.per_layer) == len(maps) == len(layers)
    for recorded, attn, (queries, keys) in zip(rec.per_layer, maps, layers, strict=True):
        expected = mad_positions_reference(attn, queries, keys)
        torch.testing.assert_close(recorded.double(), expected, **TOL)


def tensors(output) -> list[torch.Tensor]:
    """The tensors of a model output: a tensor, or a transformers ModelOutput."""
    if isinstance(output, torch.Tensor):
        return [output]
    return [t for t in output.to_tuple() if isinstance(t, torch.Tensor)]


def record_and_compare_outputs(model, pixels):
    """Records one forward; its outputs are those of the forward without recording, bit for bit."""
    with torch.no_grad():
        plain = tensors(model(pixels))
    with torch.no_grad(), vitmad.record(model) as rec:
        recorded = tensors(model(pixels))
    assert plain and all(torch.equal(a, b) for a, b in zip(plain, recorded, strict=True))
    return rec


def eager_maps(model, pixels, dropout: str, owner=lambda m: True) -> list[torch.Tensor]:
    """The softmax probabilities of every attention module (``fused_attn`` off): the input of its dropout."""
    model = copy.deepcopy(model)
    maps = []
    for module in model.modules():
        if hasattr(module, dropout) and owner(module):
            if hasattr(module, "fused_attn"):
                module.fused_attn = False
            getattr(module, dropout).register_forward_pre_hook(lambda m, args: maps.append(args[0]))
    with torch.no_grad():
        model(pixels)
    return maps


@pytest.mark.parametrize("name, linear, size", [("pvt_v2_b0", False, (60, 92)), ("pvt_v2_b2_li", True, (64, 64))])
def test_timm_pvt_v2_keys_pooled_by_convolution_or_adaptive_pool(name, linear, size):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, depths=(1, 1, 1, 1), **DIMS).eval()
    pixels = torch.randn(2, 3, *size)
    rec = record_and_compare_outputs(model, pixels)
    maps = eager_maps(model, pixels, "attn_drop", lambda m: type(m).__name__ == "Attention")
    grids = stage_grids(*size, 4, 2, overlapping=True)
    assert_recorded(rec, maps, expected_sr(grids, (8, 4, 2, 1), 1, linear=linear))
    assert [g.stride for g in rec.geometry] == [(4.0, 4.0), (8.0, 8.0), (16.0, 16.0), (32.0, 32.0)]
    assert [g.grid for g in rec.geometry] == [(g[0], g[1]) for g in grids]
    assert rec.mad.shape == (4, 2, 4)  # heads 1, 2, 2, 4: the missing ones NaN
    assert rec.mad[0, :, 1:].isnan().all() and not rec.mad[3].isnan().any()
    assert rec.skipped == {}


@pytest.mark.parametrize("linear, size", [(False, (60, 92)), (True, (64, 48))])
def test_transformers_pvt_v2(linear, size):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(1)
    config = transformers.PvtV2Config(linear_attention=linear, **HF_DIMS)
    model = transformers.PvtV2Model(config).eval()
    pixels = torch.randn(2, 3, *size)
    rec = record_and_compare_outputs(model, pixels)
    maps = eager_maps(model, pixels, "attn_drop", lambda m: type(m).__name__ == "PvtV2SelfAttention")
    grids = stage_grids(*size, 4, 2, overlapping=True)
    assert_recorded(rec, maps, expected_sr(grids, config.sr_ratios, 1, linear=linear))
    assert [g.stride[0] for g in rec.geometry] == [4.0, 8.0, 16.0, 32.0]


@pytest.mark.parametrize("implementation, size", [("eager", (64, 64)), ("sdpa", (60, 92))])
def test_transformers_segformer(implementation, size):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(2)
    config = transformers.SegformerConfig(**HF_DIMS)
    model = transformers.SegformerModel._from_config(config, attn_implementation=implementation).eval()
    pixels = torch.randn(2, 3, *size)
    rec = record_and_compare_outputs(model, pixels)
    eager = transformers.SegformerModel._from_config(config, attn_implementation="eager").eval()
    eager.load_state_dict(model.state_dict())
    with torch.no_grad():
        maps = eager(pixels, output_attentions=True).attentions
    grids = stage_grids(*size, 4, 2, overlapping=True)
    assert_recorded(rec, maps, expected_sr(grids, config.sr_ratios, 1))
    assert rec.layers == [f"stages.{i}.blocks.0.attention" for i in range(4)]


def test_transformers_glpn_segformer_encoder():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(6)
    config = transformers.GLPNConfig(**HF_DIMS)
    model = transformers.GLPNModel(config).eval()
    pixels = torch.randn(2, 3, 60, 92)
    rec = record_and_compare_outputs(model, pixels)
    maps = eager_maps(model, pixels, "dropout", lambda m: type(m).__name__ == "GLPNEfficientSelfAttention")
    grids = stage_grids(60, 92, 4, 2, overlapping=True)
    assert_recorded(rec, maps, expected_sr(grids, config.sr_ratios, 1))


@pytest.mark.parametrize("image_size", [64])
def test_transformers_pvt_v1_with_its_cls_token_in_the_last_stage(image_size):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(3)
    # PvtModel runs at its configured image size (its position embeddings are not interpolated to others).
    config = transformers.PvtConfig(image_size=image_size, **HF_DIMS)
    model = transformers.PvtModel(config).eval()
    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    pixels = torch.randn(2, 3, height, width)
    rec = record_and_compare_outputs(model, pixels)
    maps = eager_maps(model, pixels, "dropout", lambda m: type(m).__name__ == "PvtEfficientSelfAttention")
    grids = stage_grids(height, width, 4, 2, overlapping=False)
    assert_recorded(rec, maps, expected_sr(grids, config.sequence_reduction_ratios, 1, cls_last=True))
    assert maps[-1].shape[-1] == grids[-1][0] * grids[-1][1] + 1  # the CLS token is there, without a position
    assert rec.geometry[-1].num_prefix_tokens == 1


def twins_local_positions(gh: int, gw: int, stride: float, ws: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(queries, keys), each [nW, 1, ws * ws, 2]: the grid padded at the bottom and right to multiples of ws,
    cut into ws x ws windows, windows in row-major order; a padding slot is a key at its cell of the padded grid
    and no query (NaN)."""
    ph, pw = -(-gh // ws) * ws, -(-gw // ws) * ws
    keys = cells(ph, pw, stride).reshape(ph, pw, 2)
    queries = keys.clone()
    queries[gh:], queries[:, gw:] = float("nan"), float("nan")

    def windows(grid):
        return torch.stack([grid[i:i + ws, j:j + ws].reshape(ws * ws, 2)
                            for i in range(0, ph, ws) for j in range(0, pw, ws)])[:, None]

    return windows(queries), windows(keys)


@pytest.mark.parametrize("size", [(56, 56), (60, 92)])
def test_timm_twins_svt_windows_padded_and_subsampled_keys(size):
    torch.manual_seed(4)
    model = timm.create_model("twins_svt_small", pretrained=False, depths=(2, 2, 2, 2), wss=(3, 3, 3, 3),
                              sr_ratios=(4, 2, 1, 1), **DIMS).eval()
    pixels = torch.randn(2, 3, *size)
    rec = record_and_compare_outputs(model, pixels)
    maps = eager_maps(model, pixels, "attn_drop")
    grids = stage_grids(*size, 4, 2, overlapping=False)
    for layer, ((gh, gw, stride), sr) in enumerate(zip(grids, (4, 2, 1, 1))):
        local, pooled = maps[2 * layer], maps[2 * layer + 1]
        per_query = mad_positions_reference(local, *twins_local_positions(gh, gw, stride, 3), reduction="none")
        batch, _, heads, _ = per_query.shape
        expected = per_query.permute(0, 2, 1, 3).reshape(batch, heads, -1).nanmean(-1)  # every real query once
        torch.testing.assert_close(rec.per_layer[2 * layer].double(), expected, **TOL)
        keys = cells(gh // sr, gw // sr, stride * sr)
        torch.testing.assert_close(rec.per_layer[2 * layer + 1].double(),
                                   mad_positions_reference(pooled, cells(gh, gw, stride), keys), **TOL)
        assert rec.geometry[2 * layer].grid == (gh, gw) and rec.geometry[2 * layer].stride == (stride, stride)
    assert rec.geometry[0].attention.startswith("window 3x3, grid padded to 15x")  # 14 or 15 rows: padded to 15


def test_timm_twins_pcpvt_is_spatial_reduction():
    torch.manual_seed(5)
    model = timm.create_model("twins_pcpvt_small", pretrained=False, depths=(1, 1, 1, 1), **DIMS).eval()
    pixels = torch.randn(2, 3, 64, 96)
    rec = record_and_compare_outputs(model, pixels)
    maps = eager_maps(model, pixels, "attn_drop")
    grids = stage_grids(64, 96, 4, 2, overlapping=False)
    assert_recorded(rec, maps, expected_sr(grids, (8, 4, 2, 1), 1))


def test_attention_run_outside_the_model_is_refused_with_what_was_seen():
    model = timm.create_model("pvt_v2_b0", pretrained=False, depths=(1, 1, 1, 1), **DIMS).eval()
    attention = model.stages[0].blocks[0].attn
    with torch.no_grad(), vitmad.record(model) as rec:
        with pytest.raises(ValueError, match=r"stages\.0\.blocks\.0\.attn \(Attention\) of "
                                             r"PyramidVisionTransformerV2: it ran before any stage embedding"):
            attention(torch.randn(1, 64, 8), [8, 8])
        model(torch.randn(1, 3, 32, 32))  # a whole forward afterwards is recorded as usual
    assert len(rec.layers) == 4
