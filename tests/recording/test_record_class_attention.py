"""The class token's maps of class attention (CaiT, XCiT, VOLO) and the queries' maps of attention-pooling heads
(timm ViT / EVA / NaFlexViT, SigLIP, AIMv2, the CLIP ResNets' AttentionPool2d), recorded with
``stats=[..., "prefix_maps"]``.

Reference: each class-attention layer's own eager probabilities (the input of its attention dropout, fused path
off) in a float64 copy of the model, placed by the geometry written here: key 0 is the class token, keys 1.. the
row-major grid of the last feature map, ``grid_h x grid_w`` cells of 16 pixels (8 for XCiT-p8) for a 64 x 96
input. Pooling heads: the probabilities from the q and k their attention receives, in a float64 copy.
"""

from __future__ import annotations

import copy

import pytest
import torch

timm = pytest.importorskip("timm")

import vitmad  # noqa: E402
from conftest import pooling_rows, sharpened  # noqa: E402
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


# CLIP-style attention pooling over a CNN's final map (timm's AttentionPool2d, RotAttentionPool2d): the pooled token
# (the map's mean, or a class token) then the H x W map tokens, row-major; every token queries, and the output keeps
# the pooled token's row (pool_type "token") or the map tokens' rows ("").
MAP_GRID, MAP_STRIDE = (4, 6), 16.0  # the 64 x 96 input's final map: 4 x 6 cells of 16 pixels


def _clip_resnet(head_type: str = "attn_abs", *, self_attention: bool = False, **kwargs):
    """A tiny ByobNet of resnet50_clip's design (its stem, average-pool downsampling), whose final map is 16 pixels a
    cell (stem 2, stem pool 2, two stages of stride 2), pooled by a 2-head attention pool; a BoTNet block before the
    head with ``self_attention``. ``kwargs`` go to ByobNet (``global_pool``, ``output_stride``)."""
    from dataclasses import replace

    from timm.models.byobnet import ByoBlockCfg, ByobNet, model_cfgs

    blocks = [ByoBlockCfg(type="bottle", d=1, c=32, s=2, br=0.25), ByoBlockCfg(type="bottle", d=1, c=64, s=2, br=0.25)]
    if self_attention:
        blocks.append(ByoBlockCfg(type="self_attn", d=1, c=64, s=1, br=0.25))
    cfg = replace(model_cfgs["resnet50_clip"], blocks=tuple(blocks), stem_chs=(8, 8, 16), head_type=head_type,
                  head_hidden_size=128, self_attn_layer="bottleneck")
    torch.manual_seed(0)
    return ByobNet(cfg, img_size=SIZE, num_classes=10, **kwargs)


def _with_class_token():
    """The absolute head with a learned class token in place of the map's mean (``class_token=True``, which timm
    builds only as wide as the map: two heads of 32)."""
    model = _clip_resnet(self_attention=True)
    model.head = timm.layers.AttentionPool2d(64, feat_size=MAP_GRID, out_features=10, head_dim=32,
                                             qkv_separate=True, class_token=True)
    with torch.no_grad():
        model.head.cls_token.normal_()
    return model


# case -> (model, its final map's grid and stride in pixels)
POOL2D = {
    "abs": (lambda: _clip_resnet("attn_abs", self_attention=True), MAP_GRID, MAP_STRIDE),
    "rot": (lambda: _clip_resnet("attn_rot", self_attention=True), MAP_GRID, MAP_STRIDE),
    "abs_class_token": (_with_class_token, MAP_GRID, MAP_STRIDE),
    # Dilated last stage: the map stays at 8 pixels a cell, 8 x 12 (feature_info's reduction follows).
    "abs_output_stride_8": (lambda: _clip_resnet("attn_abs", self_attention=True, output_stride=8), (8, 12), 8.0),
}


def _sharp(model):
    """``sharpened``, and the head's query and key projections drawn at std 1: over the small features of the tiny
    CNN's map, std 0.25 leaves the pooled token's attention close to uniform (every cell near 1 / 25)."""
    model = sharpened(model)
    with torch.no_grad():
        for projection in (model.head.q, model.head.k):
            projection.weight.normal_(std=1.0)
    return model


def _recorded(model, fused: bool, pixels: torch.Tensor, stats=("mad", "prefix_maps")):
    model.head.fused_attn = fused
    with torch.no_grad():
        plain = model(pixels)
        with vitmad.record(model, stats=list(stats)) as rec:
            assert torch.equal(model(pixels), plain)
    return rec


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "eager"])
@pytest.mark.parametrize("case", list(POOL2D))
def test_clip_attention_pool_maps_are_the_pooled_tokens_row_over_the_map(case, fused):
    make, grid, stride = POOL2D[case]
    model = _sharp(make())
    pixels = torch.randn(2, 3, *SIZE, generator=torch.Generator().manual_seed(1))
    rec = _recorded(model, fused, pixels)
    tokens = grid[0] * grid[1]
    expected = pooling_rows(model, "head", lambda double: double(pixels.double()))
    # Every token queries: [B, heads, 1 + H * W, 1 + H * W], the pooled token first.
    assert expected.shape == (2, 2, 1 + tokens, 1 + tokens)
    maps = rec.class_attention_maps
    assert list(maps) == ["head"] and maps["head"].shape == (2, 2, 1, tokens) and maps["head"].dtype == torch.float32
    # The pooled token's row alone; key 0 is the pooled token, key 1 + grid_w * r + c the map's cell (r, c).
    on_grid = maps["head"].double().reshape(2, 2, *grid)
    for r in range(grid[0]):
        for c in range(grid[1]):
            torch.testing.assert_close(on_grid[..., r, c], expected[:, :, 0, 1 + grid[1] * r + c], **TOL)
    # What the map leaves to 1 is the pooled token's attention on itself (its key has no position): one minus a sum
    # of float32 probabilities, resolved to float32's spacing at 1 (each term rounded by half an ulp of itself, half
    # an ulp of 1 in all, and the row normalised by a float32 sum: 2 ulps bound them; 1.06e-7 seen, against a
    # float64 mass of 2e-13).
    torch.testing.assert_close(1 - maps["head"].double().sum(-1), expected[:, :, :1, 0], rtol=TOL["rtol"],
                               atol=2 * torch.finfo(torch.float32).eps)
    geometry = rec.calls[-1].class_geometry[0]
    assert geometry.grid == grid and geometry.stride == (stride, stride) and geometry.heads == 2
    assert geometry.num_prefix_tokens == 1 and geometry.attention == "attention pooling over global"
    pooled = "its class token" if case == "abs_class_token" else "the mean of the map's tokens"
    assert rec.skipped["head"].startswith(f"attention pooling: one pooled query without a position on the image "
                                          f"({pooled}); its attention over the map is recorded with stats=[..., "
                                          "'prefix_maps'] (rec.class_attention_maps)")
    # The BoTNet layer before it: the same MAD layers and values as a recording without the maps.
    with torch.no_grad(), vitmad.record(model) as alone:
        model(pixels)
    assert rec.layers == alone.layers == ["stages.2.0.self_attn"]
    assert torch.equal(rec.mad, alone.mad) and alone.skipped == rec.skipped


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "eager"])
@pytest.mark.parametrize("head_type", ["attn_abs", "attn_rot"])
def test_clip_attention_pool_whose_output_is_the_map_has_a_mad_over_the_map(head_type, fused):
    # global_pool="": the map tokens' rows are the output, so they are queries with a position.
    model = _sharp(_clip_resnet(head_type, global_pool=""))
    pixels = torch.randn(2, 3, *SIZE, generator=torch.Generator().manual_seed(1))
    rec = _recorded(model, fused, pixels, stats=("mad", "entropy", "prefix_maps"))
    tokens = MAP_GRID[0] * MAP_GRID[1]
    expected = pooling_rows(model, "head", lambda double: double(pixels.double()))
    assert expected.shape == (2, 2, 1 + tokens, 1 + tokens)
    # Cell (r, c) of the map at ((r + 0.5) * 16, (c + 0.5) * 16) pixels, token 1 + 6 r + c; the pooled token (0)
    # has no position: neither query nor key of the MAD.
    cells = torch.tensor([[(r + 0.5) * MAP_STRIDE, (c + 0.5) * MAP_STRIDE]
                          for r in range(MAP_GRID[0]) for c in range(MAP_GRID[1])], dtype=torch.float64)
    distance = torch.cdist(cells, cells)
    map_rows = expected[:, :, 1:, :]
    mad = (map_rows[..., 1:] * distance).sum(-1).mean(-1)
    entropy = -(map_rows * map_rows.log()).sum(-1).mean(-1)
    assert rec.layers == ["head"] and rec.skipped == {} and rec.class_attention_maps == {}
    torch.testing.assert_close(rec.mad[0].double(), mad, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(rec.stats["entropy"][0].double(), entropy, rtol=1e-5, atol=1e-6)
    # The pooled token's row is the layer's prefix map.
    assert rec.prefix_maps[0].shape == (2, 2, 1, tokens)
    torch.testing.assert_close(rec.prefix_maps[0].double(), expected[:, :, :1, 1:], **TOL)
    geometry = rec.geometry[0]
    assert geometry.grid == MAP_GRID and geometry.stride == (MAP_STRIDE, MAP_STRIDE)
    assert geometry.attention == "global" and geometry.num_prefix_tokens == 1
    with torch.no_grad(), vitmad.record(model) as alone:
        model(pixels)
    assert torch.equal(rec.mad, alone.mad)


def test_a_clip_resnet_has_only_its_attention_pool_map_and_says_where_it_is():
    model = _clip_resnet().eval()
    with pytest.raises(NoLayerError, match=r"head: attention pooling: .* recorded with stats=\[\.\.\., "
                                           r"'prefix_maps'\] \(rec.class_attention_maps\)"):
        vitmad.record(model)
    with torch.no_grad(), vitmad.record(model, stats=["prefix_maps"]) as rec:
        model(torch.randn(1, 3, *SIZE))
    assert list(rec.class_attention_maps) == ["head"] and rec.layers == []
    with pytest.raises(ValueError, match=r"no layer with a MAD ran in this call, only class attention or attention "
                                         r"pooling \(head\)"):
        _ = rec.mad


def test_clip_attention_pool_whose_pool_type_changes_while_recorded_is_refused():
    model = _clip_resnet().eval()
    with torch.no_grad(), vitmad.record(model, stats=["prefix_maps"]) as rec:
        model(torch.randn(1, 3, *SIZE))
        model.reset_classifier(10, "")  # the map tokens' rows are now the output
        with pytest.raises(ValueError, match=r"head \(AttentionPool2d\) of ByobNet: its pool_type changed from "
                                             r"'token' to '' after the recording began"):
            model(torch.randn(1, 3, *SIZE))
    assert list(rec.class_attention_maps) == ["head"]


class _PoolOverConv(torch.nn.Module):
    """An AttentionPool2d over a convolution's map, outside a ByobNet: the map's pixel stride is not known."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 64, 16, stride=16)
        self.head = timm.layers.AttentionPool2d(64, feat_size=MAP_GRID, embed_dim=128)

    def forward(self, x):
        return self.head(self.conv(x))


@pytest.mark.parametrize("pool_type", ["token", ""])
def test_attention_pool_over_a_map_of_unknown_stride_is_skipped_with_the_reason(pool_type):
    model = _PoolOverConv().eval()
    model.head.pool_type = pool_type
    with pytest.raises(NoLayerError, match=r"head: attention pooling over a CNN's feature map whose pixel stride "
                                           r"vitmad does not know: .* this AttentionPool2d is not the head of a "
                                           r"ByobNet \(in _PoolOverConv\); neither its map nor a MAD is recorded"):
        vitmad.record(model, stats=["prefix_maps"])


_PRR = pytest.mark.skipif(not hasattr(timm.layers, "AttentionPoolPrr"),
                          reason="this timm has no AttentionPoolPrr (global_pool='prr', timm 1.0.25 and later)")
PRR_GRID, PRR_STRIDE = (4, 6), 16.0  # a 64 x 96 input at 16 pixels a patch


def _prr_vit(class_token: bool, fused: bool):
    """A ViT with the prr head, fused or not, and a 64 x 96 batch of two: two registers, and a class token or none
    (3 or 2 tokens without a position before the 4 x 6 grid)."""
    model = sharpened(timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=SIZE, depth=1,
                                        global_pool="prr", reg_tokens=2, class_token=class_token, embed_dim=32,
                                        num_heads=2))
    assert model.attn_pool.pool == ("token" if class_token else "avg")
    model.attn_pool.fused_attn = fused
    return model, torch.randn(2, 3, *SIZE, generator=torch.Generator().manual_seed(1))


@_PRR
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "eager"])
def test_prr_pooling_with_a_class_token_keeps_only_its_row_so_has_maps_and_no_mad(fused):
    # pool_type="token": the head's output is x[:, 0], the class token's row; the other rows are discarded, so the
    # layer has no MAD, and its maps are the rows of the tokens without a position (class token, two registers).
    model, pixels = _prr_vit(class_token=True, fused=fused)
    with torch.no_grad():
        plain = model(pixels)
        with vitmad.record(model, stats=["mad", "prefix_maps"]) as rec:
            assert torch.equal(model(pixels), plain)
    tokens = PRR_GRID[0] * PRR_GRID[1]
    expected = pooling_rows(model, "attn_pool", lambda double: double(pixels.double()))
    assert expected.shape == (2, 2, 3 + tokens, 3 + tokens)
    assert rec.layers == ["blocks.0.attn"]
    assert rec.skipped["attn_pool"].startswith("attention pooling: timm's AttentionPoolPrr (global_pool='prr') with "
                                               "pool_type='token' outputs the class token's row alone")
    maps = rec.class_attention_maps
    assert list(maps) == ["attn_pool"] and maps["attn_pool"].shape == (2, 2, 3, tokens)
    # Keys 0-2 have no position; key 3 + 6 r + c is the patch (r, c).
    on_grid = maps["attn_pool"].double().reshape(2, 2, 3, *PRR_GRID)
    for r in range(PRR_GRID[0]):
        for c in range(PRR_GRID[1]):
            torch.testing.assert_close(on_grid[..., r, c], expected[:, :, :3, 3 + PRR_GRID[1] * r + c], **TOL)
    geometry = rec.calls[-1].class_geometry[0]
    assert geometry.grid == PRR_GRID and geometry.stride == (PRR_STRIDE, PRR_STRIDE)
    assert geometry.num_prefix_tokens == 3
    with torch.no_grad(), vitmad.record(model) as alone:
        model(pixels)
    assert alone.layers == rec.layers and torch.equal(alone.mad, rec.mad) and "attn_pool" in alone.skipped


@_PRR
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "eager"])
def test_prr_pooling_without_a_class_token_averages_every_row_so_has_a_mad(fused):
    # pool_type="avg": every row is averaged into the output, so the patch rows count: a self-attention layer over
    # two registers and the grid, with a MAD over the patches' rows.
    model, pixels = _prr_vit(class_token=False, fused=fused)
    with torch.no_grad(), vitmad.record(model, stats=["mad", "prefix_maps"]) as rec:
        model(pixels)
    expected = pooling_rows(model, "attn_pool", lambda double: double(pixels.double()))
    cells = torch.tensor([[(r + 0.5) * PRR_STRIDE, (c + 0.5) * PRR_STRIDE]
                          for r in range(PRR_GRID[0]) for c in range(PRR_GRID[1])], dtype=torch.float64)
    mad = (expected[:, :, 2:, 2:] * torch.cdist(cells, cells)).sum(-1).mean(-1)
    assert rec.layers == ["blocks.0.attn", "attn_pool"] and rec.class_attention_maps == {}
    torch.testing.assert_close(rec.mad[1].double(), mad, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(rec.prefix_maps[1].double(), expected[:, :, :2, 2:], **TOL)
