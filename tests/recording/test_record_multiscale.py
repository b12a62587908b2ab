"""vitmad.record on ViTs with pooled queries or several token grids: MViTv2, PiT, CrossViT, CaiT, and XCiT's
refusal (no layer with spatial attention).

References: each layer's own eager softmax probabilities (the ``softmax`` calls of the forward, seen by patching
``torch.Tensor.softmax``, or the input of the attention dropout), placed by the geometry written here.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import vitmad
from conftest import tensor_softmax_maps
from vitmad.ops.reference import mad_positions_reference

timm = pytest.importorskip("timm")

TOL = {"rtol": 1e-5, "atol": 1e-4}  # pixels; float32 attention against a float64 reference


def axis(count: int, step: int, stride: float) -> torch.Tensor:
    """Pixel positions of the ``count`` outputs of a stride-``step`` operation (pooling, convolution,
    subsampling) along an axis of stride-pixel cells: output ``i`` sits at the centre of its stride cell, cells
    ``step * i ... step * i + step - 1``, whatever the kernel or padding (docs/definition.md); plain cells for
    step 1."""
    return (torch.arange(count, dtype=torch.float64) + 0.5) * step * stride


def grid(rows: torch.Tensor, cols: torch.Tensor, prefix: int = 0) -> torch.Tensor:
    """[prefix + len(rows) * len(cols), 2]: ``prefix`` rows of NaN, then the row-major grid."""
    return torch.cat([torch.full((prefix, 2), float("nan"), dtype=torch.float64), torch.cartesian_prod(rows, cols)])



def dropout_maps(model, pixels, owner) -> list[torch.Tensor]:
    """The input of the attention dropout of each module ``owner`` accepts, its ``fused_attn`` off."""
    model, maps = copy.deepcopy(model), []
    for module in model.modules():
        if owner(module):
            module.fused_attn = False
            module.attn_drop.register_forward_pre_hook(lambda m, args: maps.append(args[0]))
    with torch.no_grad():
        model(pixels)
    return maps


def record(model, pixels):
    """Records one forward; its output is that of the forward without recording, bit for bit."""
    with torch.no_grad():
        plain = model(pixels)
    with torch.no_grad(), vitmad.record(model) as rec:
        assert torch.equal(model(pixels), plain)
    return rec


@pytest.mark.parametrize("cls_token, mode", [(False, "conv"), (True, "avg")])
def test_mvitv2_pooled_queries_and_keys(cls_token, mode):
    from timm.models.mvitv2 import MultiScaleVit, MultiScaleVitCfg

    torch.manual_seed(0)
    config = MultiScaleVitCfg(depths=(1, 2, 1, 1), embed_dim=8, num_heads=1, use_cls_token=cls_token, mode=mode)
    model = MultiScaleVit(config, img_size=64, num_classes=10).eval()  # MViTv2 runs at its own size only
    pixels = torch.randn(2, 3, 64, 64)
    rec = record(model, pixels)
    maps = tensor_softmax_maps(model, pixels)
    # Per layer: the grid side it receives and its stride (a stride-4 patch embedding, then each stage's first
    # block pools the queries by 2), its query step and its key step (keys pooled to stride 32 until stage 3).
    # The poolings are 3 x 3 with padding 1; a pooled token sits at the centre of its stride cell.
    layers = [(16, 4, 1, 4), (16, 4, 2, 2), (8, 8, 1, 2), (8, 8, 2, 1), (4, 16, 2, 1)]
    assert len(maps) == len(rec.per_layer) == len(layers)
    prefix = int(cls_token)
    for index, (side, stride, q_step, k_step) in enumerate(layers):
        q_axis = axis((side - 1) // q_step + 1, q_step, stride)
        k_axis = axis((side - 1) // k_step + 1, k_step, stride)
        expected = mad_positions_reference(maps[index], grid(q_axis, q_axis, prefix), grid(k_axis, k_axis, prefix))
        torch.testing.assert_close(rec.per_layer[index].double(), expected, **TOL)
        geometry = rec.geometry[index]
        assert geometry.grid == (len(q_axis),) * 2 and geometry.stride == (stride * q_step,) * 2
    assert [g.heads for g in rec.geometry] == [1, 2, 2, 4, 8]


@pytest.mark.parametrize("height, width", [(37, 53), (61, 45)])
def test_mvitv2_without_relative_positions_at_odd_non_square_sizes(height, width):
    # timm's default spatial relative positions need a square grid the strides divide; without them MViTv2 runs
    # at any size, and its pooled grids round (docs/definition.md).
    from timm.models.mvitv2 import MultiScaleVit, MultiScaleVitCfg

    torch.manual_seed(0)
    config = MultiScaleVitCfg(depths=(1, 2, 1, 1), embed_dim=8, num_heads=1, use_cls_token=True, mode="conv",
                              rel_pos_type="none")
    model = MultiScaleVit(config, img_size=(height, width), num_classes=10).eval()
    pixels = torch.randn(2, 3, height, width)
    rec = record(model, pixels)
    maps = tensor_softmax_maps(model, pixels)
    # The 7 x 7 stride-4 patch convolution (padding 3) gives ceil(side / 4) cells; every pooling is 3 x 3 with
    # padding 1, so a stride-s pooling of n cells gives (n - 1) // s + 1. Per layer: its stride, query step, key step.
    rows, cols = (height - 1) // 4 + 1, (width - 1) // 4 + 1
    layers = [(4, 1, 4), (4, 2, 2), (8, 1, 2), (8, 2, 1), (16, 2, 1)]
    assert len(maps) == len(rec.per_layer) == len(layers)
    for index, (stride, q_step, k_step) in enumerate(layers):
        q_rows, q_cols = (rows - 1) // q_step + 1, (cols - 1) // q_step + 1
        queries = grid(axis(q_rows, q_step, stride), axis(q_cols, q_step, stride), 1)
        keys = grid(axis((rows - 1) // k_step + 1, k_step, stride), axis((cols - 1) // k_step + 1, k_step, stride), 1)
        expected = mad_positions_reference(maps[index], queries, keys)
        torch.testing.assert_close(rec.per_layer[index].double(), expected, **TOL)
        assert rec.geometry[index].grid == (q_rows, q_cols)
        rows, cols = q_rows, q_cols


@pytest.mark.parametrize("cls_token, mode", [(False, "conv"), (True, "avg")])
def test_mvitv2_self_mass_and_cls_map_where_keys_are_pooled_onto_the_queries_cells(cls_token, mode):
    """The second block pools queries and keys by the same stride 2: key i is query i's cell, so the self mass and
    the CLS row over the grid are measured there; the other blocks' keys are other cells (NaN, no map)."""
    from timm.models.mvitv2 import MultiScaleVit, MultiScaleVitCfg

    torch.manual_seed(0)
    config = MultiScaleVitCfg(depths=(1, 2, 1, 1), embed_dim=8, num_heads=1, use_cls_token=cls_token, mode=mode)
    model = MultiScaleVit(config, img_size=64, num_classes=10).eval()
    with torch.no_grad():  # logits of width 8 need weights of std 1 for attention far from uniform
        for linear in (m for m in model.modules() if isinstance(m, torch.nn.Linear)):
            linear.weight.normal_()
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        plain = model(pixels)
    with torch.no_grad(), vitmad.record(model, stats=["mad", "self_mass", "prefix_maps"]) as rec:
        assert torch.equal(model(pixels), plain)
    maps = tensor_softmax_maps(model, pixels)
    prefix = int(cls_token)
    same_cells = 1  # (16, 4, q step 2, k step 2) in the table of the test above: an 8 x 8 grid of both
    for index, probabilities in enumerate(maps):
        self_mass = rec.stats["self_mass"][index, :, :probabilities.shape[1]]
        if index != same_cells:
            assert torch.isnan(self_mass).all() and rec.prefix_maps[index] is None
            continue
        p = probabilities.double()
        assert p.shape[-2:] == (prefix + 64, prefix + 64)
        own = p[:, :, prefix:, prefix:].diagonal(dim1=-2, dim2=-1).mean(-1)
        neighbour = p[:, :, prefix:, prefix:].roll(1, -1).diagonal(dim1=-2, dim2=-1).mean(-1)
        assert (own - neighbour).abs().min() > 1e-5  # a key one cell off would show, far past the tolerance
        torch.testing.assert_close(self_mass.double(), own, rtol=1e-5, atol=1e-7)
        if cls_token:
            torch.testing.assert_close(rec.prefix_maps[index].double(), p[:, :, :1, 1:], rtol=1e-5, atol=1e-7)
        else:
            assert rec.prefix_maps[index] is None


@pytest.mark.parametrize("name, prefix", [("pit_ti_224", 1), ("pit_ti_distilled_224", 2)])
def test_pit_stages_at_their_own_stride(name, prefix):
    torch.manual_seed(1)
    model = timm.create_model(name, pretrained=False, img_size=64, depth=(1, 1, 1), heads=(1, 2, 2)).eval()
    pixels = torch.randn(2, 3, 64, 64)
    rec = record(model, pixels)
    maps = dropout_maps(model, pixels, lambda m: type(m).__name__ == "Attention")
    # A 16-pixel patch embedding of stride 8 (no padding): 7 x 7; stride-2 poolings (kernel 3, padding 1): 4, 2.
    for index, (side, stride) in enumerate([(7, 8), (4, 16), (2, 32)]):
        positions = grid(axis(side, 1, stride), axis(side, 1, stride), prefix)
        torch.testing.assert_close(rec.per_layer[index].double(), mad_positions_reference(maps[index], positions),
                                   **TOL)
        assert rec.geometry[index].stride == (stride, stride) and rec.geometry[index].num_prefix_tokens == prefix


@pytest.mark.parametrize("size", [(240, 240), (248, 260)])
def test_crossvit_branches_in_pixels_of_the_input_and_cross_attention_skipped(size):
    torch.manual_seed(2)
    model = timm.create_model("crossvit_tiny_240", pretrained=False, depth=((1, 1, 0),), embed_dim=(16, 32),
                              num_heads=(1, 2)).eval()
    pixels = torch.randn(1, 3, *size)
    rec = record(model, pixels)
    maps = dropout_maps(model, pixels, lambda m: type(m).__name__ == "Attention")
    assert rec.layers == ["blocks.0.blocks.0.0.attn", "blocks.0.blocks.1.0.attn"]
    # Branch 0: 12-pixel patches of the input resized to 240 x 240; branch 1: 16-pixel patches of it at 224 x 224.
    for index, (side, patch, scaled) in enumerate([(20, 12, 240), (14, 16, 224)]):
        stride = (patch * size[0] / scaled, patch * size[1] / scaled)
        positions = grid(axis(side, 1, stride[0]), axis(side, 1, stride[1]), 1)
        torch.testing.assert_close(rec.per_layer[index].double(), mad_positions_reference(maps[index], positions),
                                   **TOL)
        assert rec.geometry[index].stride == pytest.approx(stride)
    assert set(rec.skipped) == {"blocks.0.fusion.0.attn", "blocks.0.fusion.1.attn"}
    assert all("cross-attention" in reason for reason in rec.skipped.values())


def test_crossvit_forward_features_after_a_forward_is_not_placed_at_that_forwards_size():
    """QA 274: the model input's size, taken at CrossViT's forward, was kept past it: forward_features on a 224 px
    image after a forward on 240 px was placed at the 240 px scale (124.67 px for 116.36), silently. Without the
    model's forward the input size is unknown: refused, as in a new recording."""
    torch.manual_seed(2)
    model = timm.create_model("crossvit_tiny_240", pretrained=False, depth=((1, 1, 0),), embed_dim=(16, 32),
                              num_heads=(1, 2)).eval()
    with torch.no_grad(), vitmad.record(model) as rec:
        model(torch.randn(1, 3, 240, 240))
        with pytest.raises(ValueError, match=r"blocks\.0\.blocks\.0\.0\.attn \(Attention\) of CrossVit: it ran "
                                             r"outside CrossVit\.forward, so the size of the model's input is unknown "
                                             r"\(each branch sees it resized\); record a call of the model itself"):
            model.forward_features(torch.randn(1, 3, 224, 224))
    assert len(rec.calls) == 1 and rec.geometry[1].stride == pytest.approx((16.0 * 240 / 224,) * 2)


def test_cait_talking_heads_recorded_and_class_attention_skipped():
    torch.manual_seed(3)
    model = timm.create_model("cait_xxs24_224", pretrained=False, depth=2, img_size=(64, 96), embed_dim=32).eval()
    pixels = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        plain = model(pixels)
    with torch.no_grad(), vitmad.record(model) as rec:
        assert torch.equal(model(pixels), plain)
    # The self-attention blocks: a 4 x 6 grid of 16-pixel patches, no CLS token yet; each head's softmax.
    maps = [m for m in tensor_softmax_maps(model, pixels) if m.shape[-1] == m.shape[-2] == 24]
    positions = grid(axis(4, 1, 16), axis(6, 1, 16))
    expected = torch.stack([mad_positions_reference(m, positions) for m in maps])
    torch.testing.assert_close(rec.mad.double(), expected, **TOL)
    assert rec.layers == ["blocks.0.attn", "blocks.1.attn"]
    assert set(rec.skipped) == {"blocks_token_only.0.attn", "blocks_token_only.1.attn"}
    assert all("class attention" in reason for reason in rec.skipped.values())


@pytest.mark.parametrize("name", ["levit_128s", "levit_conv_128s"])
def test_levit_subsampled_queries_on_its_fixed_grid(name):
    torch.manual_seed(4)
    model = timm.create_model(name, pretrained=False, img_size=(64, 96), embed_dim=(16, 32, 48), num_heads=(1, 2, 3),
                              depth=(1, 1, 1), key_dim=8).eval()
    pixels = torch.randn(2, 3, 64, 96)
    rec = record(model, pixels)
    maps = tensor_softmax_maps(model, pixels)
    # A stride-16 stem: a 4 x 6 grid; each downsampling attention queries rows and columns 0, 2, 4, ... of its
    # grid (keys: all of it), a subsampling of stride 2 whose query i sits at the centre of cells 2i, 2i + 1,
    # where the next grid's token i sits: 2 x 3 at 32 px, then 1 x 2 at 64 px.
    full = [grid(axis(4, 1, 16), axis(6, 1, 16)), grid(axis(2, 1, 32), axis(3, 1, 32)),
            grid(axis(1, 1, 64), axis(2, 1, 64))]
    subsampled = [grid(axis(2, 2, 16), axis(3, 2, 16)), grid(axis(1, 2, 32), axis(2, 2, 32))]
    layers = [(full[0], full[0]), (subsampled[0], full[0]), (full[1], full[1]), (subsampled[1], full[1]),
              (full[2], full[2])]
    assert len(maps) == len(rec.per_layer) == len(layers)
    for recorded, attn, (queries, keys) in zip(rec.per_layer, maps, layers):
        torch.testing.assert_close(recorded.double(), mad_positions_reference(attn, queries, keys), **TOL)
    assert [g.stride[0] for g in rec.geometry] == [16, 32, 32, 64, 64]
    assert [g.grid for g in rec.geometry] == [(4, 6), (2, 3), (2, 3), (1, 2), (1, 2)]


def test_efficientformer_v1_flattened_last_stage():
    torch.manual_seed(5)
    model = timm.create_model("efficientformer_l1", pretrained=False, depths=(1, 1, 1, 2), embed_dims=(8, 8, 8, 32),
                              num_vit=1).eval()
    pixels = torch.randn(1, 3, 224, 224)  # its attention bias is for a 7 x 7 grid: 224 px at stride 32
    rec = record(model, pixels)
    (attn,) = tensor_softmax_maps(model, pixels)
    expected = mad_positions_reference(attn, grid(axis(7, 1, 32), axis(7, 1, 32)))
    torch.testing.assert_close(rec.per_layer[0].double(), expected, **TOL)
    assert rec.geometry[0].stride == (32, 32)


def test_efficientformer_v2_subsampled_grids_and_queries():
    torch.manual_seed(6)
    model = timm.create_model("efficientformerv2_s0", pretrained=False, img_size=(64, 96), depths=(1, 1, 3, 3),
                              embed_dims=(8, 16, 24, 32)).eval()
    pixels = torch.randn(2, 3, 64, 96)
    rec = record(model, pixels)
    maps = tensor_softmax_maps(model, pixels)
    # Stage 3 (stride 16, 4 x 6): attention over the tokens of a stride-2 depthwise convolution (kernel 3,
    # padding 1), 2 x 3 of them, each at the centre of its 2 x 2 stride cell (not of its 3 x 3 window). Stage
    # 4's downsampling attention: queries of a stride-2 convolution and pool alike, keys the whole 4 x 6 grid;
    # then global attention over the 2 x 3 grid at 32 px, whose tokens sit where those queries do.
    subsampled = grid(axis(2, 2, 16), axis(3, 2, 16))
    full, coarse = grid(axis(4, 1, 16), axis(6, 1, 16)), grid(axis(2, 1, 32), axis(3, 1, 32))
    expected_layers = {"stages.2": (subsampled, subsampled), "stages.3.downsample": (subsampled, full),
                       "stages.3.blocks": (coarse, coarse)}
    assert len(maps) == len(rec.layers) == 5
    for name, recorded, attn in zip(rec.layers, rec.per_layer, maps):
        queries, keys = next(v for k, v in expected_layers.items() if name.startswith(k))
        torch.testing.assert_close(recorded.double(), mad_positions_reference(attn, queries, keys), **TOL)
    assert {g.grid for g in rec.geometry} == {(2, 3)} and {g.stride for g in rec.geometry} == {(32, 32)}


def test_nextvit_keys_averaged_over_consecutive_tokens():
    torch.manual_seed(7)
    model = timm.create_model("nextvit_small", pretrained=False).eval()
    pixels = torch.randn(1, 3, 64, 96)
    rec = record(model, pixels)
    maps = dropout_maps(model, pixels, lambda m: type(m).__name__ == "EfficientAttention")
    # Stem stride 4, then stride 2 per stage: E-MHSA in stage 2 (8 x 12 at 8 px, keys: means of 16 consecutive
    # tokens of the row-major sequence), stage 3 (4 x 6 at 16 px, 4 tokens) and stage 4 (2 x 3 at 32 px, all).
    stages = {"stages.1": (8, 12, 8, 16), "stages.2": (4, 6, 16, 4), "stages.3": (2, 3, 32, 1)}
    assert len(maps) == len(rec.layers) == 4
    for name, recorded, attn in zip(rec.layers, rec.per_layer, maps):
        rows, cols, stride, run = next(v for k, v in stages.items() if name.startswith(k))
        queries = grid(axis(rows, 1, stride), axis(cols, 1, stride))
        keys = queries.reshape(-1, run, 2).mean(1)
        torch.testing.assert_close(recorded.double(), mad_positions_reference(attn, queries, keys), **TOL)
        assert rec.geometry[rec.layers.index(name)].stride == (stride, stride)


def test_visformer_attention_on_its_stage_maps():
    torch.manual_seed(8)
    model = timm.create_model("visformer_tiny", pretrained=False, img_size=(64, 96), embed_dim=48, num_heads=2,
                              depth=(1, 1, 1)).eval()
    pixels = torch.randn(2, 3, 64, 96)
    rec = record(model, pixels)
    maps = dropout_maps(model, pixels, lambda m: type(m).__name__ == "Attention")
    # Stage 2 at 16 px (4 x 6), stage 3 at 32 px (2 x 3); stage 1 is convolutional.
    for recorded, attn, (rows, cols, stride) in zip(rec.per_layer, maps, [(4, 6, 16), (2, 3, 32)], strict=True):
        positions = grid(axis(rows, 1, stride), axis(cols, 1, stride))
        torch.testing.assert_close(recorded.double(), mad_positions_reference(attn, positions), **TOL)
    assert [g.stride for g in rec.geometry] == [(16, 16), (32, 32)]


def test_xcit_has_no_spatial_attention_and_is_a_clear_error():
    model = timm.create_model("xcit_nano_12_p16_224", pretrained=False, depth=2, img_size=64).eval()
    with pytest.raises(ValueError, match="Xcit has no layer with spatial softmax attention.*cross-covariance"):
        vitmad.record(model)


@pytest.mark.parametrize("pool", [
    torch.nn.MaxPool2d(3, 2, 1), torch.nn.MaxPool2d(3, 2, 1, ceil_mode=True), torch.nn.AvgPool2d(2, 2, ceil_mode=True),
    torch.nn.AvgPool2d(1, 2), torch.nn.Conv2d(1, 1, 3, 2, 1, dilation=2), torch.nn.Conv2d(1, 1, 3, 4, 1),
], ids=["max3s2p1", "max3s2p1-ceil", "avg2s2-ceil", "avg1s2", "conv3s2p1d2", "conv3s4p1"])
@pytest.mark.parametrize("size", [(7, 10), (8, 5)])
def test_strided_outputs_sit_at_the_centre_of_their_stride_cell(pool, size):
    # The output grid is the one PyTorch makes (floor or ceil); output i sits at (i + 0.5) * step cells of
    # 16 px, whatever the kernel, padding or dilation.
    from vitmad.recording.families.stages import strided_module_centres

    out = pool(torch.zeros(1, 1, *size)).shape[-2:]
    step = pool.stride if isinstance(pool.stride, int) else pool.stride[0]
    grid_out, centres = strided_module_centres(size, (16.0, 16.0), pool)
    assert grid_out == tuple(out)
    torch.testing.assert_close(centres.double(), grid(axis(out[0], step, 16), axis(out[1], step, 16)))


@pytest.mark.parametrize(("name", "options"), [
    ("efficientformerv2_s0", {"img_size": (64, 96), "depths": (1, 1, 3, 3), "embed_dims": (8, 16, 24, 32)}),
    ("nextvit_small", {}),
    ("visformer_tiny", {"img_size": (64, 96), "embed_dim": 48, "num_heads": 2, "depth": (1, 1, 1)}),
    ("csatv2", {"depths": (1, 1, 2, 2), "transformer_depths": (0, 0, 1, 1)}),
])
def test_a_features_only_backbone_is_recorded_as_its_model(name, options):
    """timm's features_only wrapper holds the model's children without the model's own class, which these
    families read their strides from: a bare StopIteration / AttributeError (QA 293), CSATv2 refused as a second
    tower. The model itself is checked against its eager attention above (test_record_csatv2.py for CSATv2)."""
    size = (64, 64) if name == "csatv2" else (64, 96)
    pixels = torch.randn(2, 3, *size)
    recorded = []
    for features_only in (False, True):
        torch.manual_seed(9)
        model = timm.create_model(name, pretrained=False, features_only=features_only, **options).eval()
        with torch.no_grad():
            plain = model(pixels)
            with vitmad.record(model) as rec:
                outputs = model(pixels)
        assert all(map(torch.equal, outputs, plain)) if features_only else torch.equal(outputs, plain)
        recorded.append(rec)
    whole, features = recorded
    # The wrapper's names: stages_0... (FeatureListNet), model.<name> (Visformer's FeatureGetterNet).
    assert [n.removeprefix("model.").replace("stages_", "stages.", 1) for n in features.layers] == whole.layers
    torch.testing.assert_close(features.mad, whole.mad, rtol=0, atol=0, equal_nan=True)
    assert [g.stride for g in features.geometry] == [g.stride for g in whole.geometry]


@pytest.mark.parametrize(("name", "owner", "options"), [
    ("efficientformerv2_s0", "EfficientFormerV2",
     {"img_size": 64, "depths": (1, 1, 3, 3), "embed_dims": (8, 16, 24, 32)}),
    ("nextvit_small", "NextViT", {}),
])
def test_stages_taken_out_of_their_model_are_refused_naming_it(name, owner, options):
    """QA 297: a user's nn.Sequential of the model's stem and stages (neither the model's class nor timm's
    features_only wrapper) crashed with a bare AttributeError: the strides are read from the model."""
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **options).eval()
    parts = nn.Sequential(model.stem, model.stages).eval()
    with torch.no_grad(), pytest.raises(ValueError, match=f"its strides are read from its {owner} .* which is not in "
                                                          "the recorded model"):
        with vitmad.record(parts):
            parts(torch.randn(1, 3, 64, 64))
