"""The class token's maps of class attention (CaiT, XCiT, VOLO), recorded with ``stats=[..., "prefix_maps"]``.

Reference: each class-attention layer's own eager probabilities (the input of its attention dropout, fused path
off) in a float64 copy of the model, placed by the geometry written here: key 0 is the class token, keys 1.. the
row-major grid of the last feature map, ``grid_h x grid_w`` cells of 16 pixels (8 for XCiT-p8) for a 64 x 96
input.
"""

from __future__ import annotations

import copy

import pytest
import torch

timm = pytest.importorskip("timm")

import vitmad  # noqa: E402
from conftest import pooling_rows  # noqa: E402
from vitmad.recording.recorder import NoLayerError  # noqa: E402

TOL = {"rtol": 1e-5, "atol": 1e-7}  # probabilities: a float32 forward against a float64 one
SIZE = (64, 96)


def _cait():
    return timm.create_model("cait_xxs24_224", pretrained=False, depth=2, img_size=SIZE, embed_dim=32)


def _xcit():
    return timm.create_model("xcit_nano_12_p16_224", pretrained=False, depth=2, img_size=SIZE)


def _xcit_p8():
    return timm.create_model("xcit_nano_12_p8_224", pretrained=False, depth=1, img_size=SIZE)


def _volo():
    # Outlookers on 8 x 12 @ 8 px, then attention and class attention on the 4 x 6 map @ 16 px.
    return timm.models.volo.VOLO(img_size=SIZE, layers=(1, 1, 1, 1), embed_dims=(32, 64, 64, 64),
                                 num_heads=(1, 2, 2, 2), stem_hidden_dim=16)


# case -> (model, class-attention layers, heads, recorded MAD layers, grid of the keys, its stride in pixels)
CASES = {
    "cait": (_cait, ["blocks_token_only.0.attn", "blocks_token_only.1.attn"], 4, ["blocks.0.attn", "blocks.1.attn"],
             (4, 6), 16.0),
    "xcit": (_xcit, ["cls_attn_blocks.0.attn", "cls_attn_blocks.1.attn"], 4, [], (4, 6), 16.0),
    "xcit_p8": (_xcit_p8, ["cls_attn_blocks.0.attn", "cls_attn_blocks.1.attn"], 4, [], (8, 12), 8.0),
    "volo": (_volo, ["post_network.0.attn", "post_network.1.attn"], 2,
             ["network.2.0.attn", "network.3.0.attn", "network.4.0.attn"], (4, 6), 16.0),
}


def _class_modules(model):
    return [m for m in model.modules() if type(m).__name__ in ("ClassAttn", "ClassAttention")]


def _eager_class_rows(model, pixels) -> list[torch.Tensor]:
    """``[B, H, 1, 1 + T]`` float64 attention of each class-attention layer, in execution order."""
    eager, rows = copy.deepcopy(model).double(), []
    for module in _class_modules(eager):
        if hasattr(module, "fused_attn"):
            module.fused_attn = False
        module.attn_drop.register_forward_pre_hook(lambda _, args: rows.append(args[0]))
    with torch.no_grad():
        eager(pixels.double())
    return rows


def _model(case: str, fused: bool):
    make, *_ = CASES[case]
    torch.manual_seed(0)
    model = make().eval()
    for module in _class_modules(model):
        if hasattr(module, "fused_attn"):
            module.fused_attn = fused
    return model


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "eager"])
@pytest.mark.parametrize("case", list(CASES))
def test_class_attention_maps_are_the_eager_rows_over_the_grid(case, fused):
    _, class_layers, heads, mad_layers, grid, stride = CASES[case]
    model = _model(case, fused)
    pixels = torch.randn(2, 3, *SIZE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = model(pixels)
        with vitmad.record(model, stats=["mad", "prefix_maps"]) as rec:
            assert torch.equal(model(pixels), plain)
    expected = _eager_class_rows(model, pixels)
    maps = rec.class_attention_maps
    assert list(maps) == class_layers == rec.calls[-1].class_layers
    assert len(expected) == len(class_layers)
    for name, row in zip(class_layers, expected):
        assert row.shape == (2, heads, 1, 1 + grid[0] * grid[1])
        assert maps[name].shape == (2, heads, 1, grid[0] * grid[1]) and maps[name].dtype == torch.float32
        # Key 0 is the class token; the rest, in token order, the row-major grid: row r, column c at
        # 1 + grid_w * r + c.
        on_grid = maps[name].double().reshape(2, heads, 1, *grid)
        for r, c in [(0, 0), (0, grid[1] - 1), (grid[0] - 1, 0), (2, 4)]:
            torch.testing.assert_close(on_grid[..., r, c], row[..., 1 + grid[1] * r + c], **TOL)
        torch.testing.assert_close(maps[name].double(), row[..., 1:], **TOL)
    for geometry in rec.calls[-1].class_geometry:
        assert geometry.grid == grid and geometry.stride == (stride, stride) and geometry.heads == heads
        assert geometry.num_prefix_tokens == 1 and geometry.attention.startswith("class attention")
    # They stay skipped as MAD layers: the MAD layers and their values are those of a recording without maps.
    assert rec.layers == mad_layers
    assert set(class_layers) <= set(rec.skipped)
    if mad_layers:
        with torch.no_grad(), vitmad.record(model) as alone:
            model(pixels)
        assert torch.equal(rec.mad, alone.mad)
        assert alone.skipped == rec.skipped


def test_a_model_of_class_attention_alone_records_its_maps_and_says_it_has_no_mad():
    model = _model("xcit", True)
    pixels = torch.randn(1, 3, *SIZE)
    with pytest.raises(NoLayerError, match=r"stats=\['prefix_maps'\] \(rec.class_attention_maps\)"):
        vitmad.record(model)
    with torch.no_grad(), vitmad.record(model, stats=["prefix_maps"]) as rec:
        model(pixels)
    assert list(rec.class_attention_maps) == CASES["xcit"][1]
    assert rec.layers == [] and rec.prefix_maps == []
    with pytest.raises(ValueError, match=r"no layer with a MAD ran in this call, only class attention or attention "
                                         r"pooling \(cls_attn_blocks.0.attn, cls_attn_blocks.1.attn\), whose queries"):
        _ = rec.mad


def test_class_attention_maps_need_the_prefix_maps():
    model = _model("cait", True)
    with torch.no_grad(), vitmad.record(model, stats=["mad", "entropy"]) as rec:
        model(torch.randn(1, 3, *SIZE))
    with pytest.raises(KeyError, match=r"stats=\[\.\.\., 'prefix_maps'\]"):
        _ = rec.class_attention_maps
    assert rec.calls[-1].class_layers == []
    assert "recorded with stats=[..., 'prefix_maps']" in rec.skipped["blocks_token_only.0.attn"]


def test_a_model_without_class_attention_has_no_class_maps():
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=1, img_size=32).eval()
    with torch.no_grad(), vitmad.record(model, stats=["prefix_maps"]) as rec:
        model(torch.randn(1, 3, 32, 32))
    assert rec.class_attention_maps == {}
    assert rec.prefix_maps[0].shape == (1, 3, 1, 4)


def test_positions_given_by_hand_leave_class_attention_maps_out_with_the_reason():
    model = _model("cait", True)
    positions = torch.cat([torch.cartesian_prod(torch.arange(4.0), torch.arange(6.0)) * 16 + 8])
    with torch.no_grad(), vitmad.record(model, positions=positions, stats=["prefix_maps"]) as rec:
        model(torch.randn(1, 3, *SIZE))
    assert rec.layers == ["blocks.0.attn", "blocks.1.attn"]
    assert rec.class_attention_maps == {}
    assert "not recorded with positions= given by hand" in rec.skipped["blocks_token_only.1.attn"]


class _Boom(RuntimeError):
    pass


def test_a_forward_that_raises_in_class_attention_leaves_no_half_call():
    model = _model("cait", True)
    pixels = torch.randn(1, 3, *SIZE)

    def boom(module, args, output):
        raise _Boom

    with torch.no_grad(), vitmad.record(model, stats=["prefix_maps"]) as rec:
        model(pixels)
        before = rec.class_attention_maps
        # After the second class attention's attention call, inside its block's forward.
        handle = model.blocks_token_only[1].attn.proj.register_forward_hook(boom)
        # The model's own call, then forward_features (an outermost forward outside it) raising halfway.
        for run in (model, model.forward_features):
            with pytest.raises(_Boom):
                run(pixels)
            assert len(rec.calls) == 1 and rec.calls[-1].class_layers == list(before)
        handle.remove()
        model.forward_features(pixels)
    assert len(rec.calls) == 2
    for name, maps in rec.class_attention_maps.items():
        torch.testing.assert_close(maps, before[name], rtol=0, atol=0)


# Attention pooling: learned queries apart from the keys, which are the tokens the head pools.
def _pooling_models():
    import transformers

    siglip = transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                             num_attention_heads=2, image_size=32, patch_size=8)
    aimv2 = transformers.Aimv2VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                           num_attention_heads=2, image_size=32, patch_size=8, use_head=True)
    return {
        # timm ViT, global_pool="map": the head pools the 4 x 6 patches alone (the prefix tokens are cut off) ...
        "vit_map": (lambda: timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=1, img_size=SIZE,
                                              global_pool="map", class_token=False), "attn_pool", SIZE, 3, 0),
        # ... or CLS, two registers and the patches with pool_include_prefix.
        "vit_map_prefix": (lambda: timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=1, img_size=SIZE,
                                                     global_pool="map", reg_tokens=2, pool_include_prefix=True),
                           "attn_pool", SIZE, 3, 3),
        # EVA-02 pools every token, CLS first: 14-pixel patches of 56 x 84 pixels.
        "eva_map": (lambda: timm.create_model("eva02_tiny_patch14_224", pretrained=False, depth=1, img_size=(56, 84),
                                              global_pool="map"), "attn_pool", (56, 84), 3, 1),
        # SigLIP's MultiheadAttention with the probe as its query; 32 x 48 pixels, position embedding interpolated.
        "siglip": (lambda: transformers.SiglipVisionModel(siglip), "head.attention", (32, 48), 2, 0),
        # AIMv2's learned query through SDPA; its position embedding takes only its own 32 x 32 input.
        "aimv2": (lambda: transformers.Aimv2VisionModel(aimv2), "head", (32, 32), 2, 0),
    }


# (case, fused): SigLIP's MultiheadAttention and AIMv2's head have one attention path each.
POOLING = [(case, fused) for case in _pooling_models() for fused in (True, False)
           if fused or case not in ("siglip", "aimv2")]


def _run(model, pixels):
    import transformers

    if isinstance(model, transformers.PreTrainedModel):
        extra = {"interpolate_pos_encoding": True} if "Siglip" in type(model).__name__ else {}
        return model(pixel_values=pixels, **extra).pooler_output
    return model(pixels)


@pytest.mark.parametrize(("case", "fused"), POOLING, ids=[f"{c}-{'fused' if f else 'eager'}" for c, f in POOLING])
def test_attention_pooling_maps_are_the_heads_rows_over_the_grid(case, fused):
    make, name, size, heads, prefix = _pooling_models()[case]
    torch.manual_seed(0)
    model = make().eval()
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = fused
    grid = (size[0] // (14 if case == "eva_map" else 16 if case.startswith("vit") else 8),
            size[1] // (14 if case == "eva_map" else 16 if case.startswith("vit") else 8))
    stride = size[0] / grid[0]
    pixels = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = _run(model, pixels)
        with vitmad.record(model, stats=["mad", "prefix_maps"]) as rec:
            assert torch.equal(_run(model, pixels), plain)
    maps = rec.class_attention_maps
    assert list(maps) == [name]
    assert maps[name].shape == (2, heads, 1, grid[0] * grid[1])
    # The keys: `prefix` tokens without a position, then the row-major grid.
    expected = pooling_rows(model, name, lambda double: _run(double, pixels.double()))
    assert expected.shape == (2, heads, 1, prefix + grid[0] * grid[1])
    torch.testing.assert_close(maps[name].double(), expected[..., prefix:], **TOL)
    geometry = rec.calls[-1].class_geometry[0]
    assert geometry.grid == grid and geometry.stride == (stride, stride)
    assert geometry.attention == "attention pooling over global" and geometry.num_prefix_tokens == prefix
    assert name in rec.skipped and "attention pooling" in rec.skipped[name]
    with torch.no_grad(), vitmad.record(model) as alone:
        _run(model, pixels)
    assert torch.equal(rec.mad, alone.mad) and alone.layers == rec.layers
