"""vitmad.record on block, grid and other windowed hybrids of timm: MaxViT / MaxxViT / CoAtNet, NesT, GCViT,
DaViT, TinyViT, FastViT, ViTamin, MobileViT, EfficientViT (MSRA); MobileViTv2 and CoaT refused with the reasons of
their skipped layers.

Each reference is the model's own eager attention (``fused_attn=False``; the probabilities are read at the input
of ``attn_drop`` or of the softmax), placed by geometry written here: the pixel coordinates of the stage's whole
feature map, cut into the model's windows by reshapes of that coordinate map (``_blocks``, ``_dilated_grid``),
reduced by the float64 definition ``mad_positions_reference``. The recordings run the models' default (fused)
path unless a test says otherwise.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vitmad
from vitmad.ops.reference import mad_positions_reference

timm = pytest.importorskip("timm")

TOL = {"rtol": 1e-5, "atol": 1e-4}  # pixels: float32 logits and sums against the float64 reference


# Geometry written for the tests ---------------------------------------------------------------------------------


def _pixel_map(height: int, width: int, stride: float) -> torch.Tensor:
    """``[height, width, 2]`` (row, col) pixel centres of a stage's map whose tokens are ``stride`` pixels."""
    rows = (torch.arange(height, dtype=torch.float64)[:, None].expand(height, width) + 0.5) * stride
    cols = (torch.arange(width, dtype=torch.float64)[None, :].expand(height, width) + 0.5) * stride
    return torch.stack([rows, cols], -1)


def _blocks(height: int, width: int, stride: float, wh: int, ww: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(queries, keys), each ``[windows, wh * ww, 2]``: the map padded at the bottom and right to whole windows,
    cut in row-major ``wh x ww`` blocks. Padding cells are keys where the grid continues past the image edge and
    no queries (NaN)."""
    ph, pw = height + -height % wh, width + -width % ww
    keys = _pixel_map(ph, pw, stride)
    queries = keys.clone()
    queries[height:] = float("nan")
    queries[:, width:] = float("nan")

    def cut(coords):
        return coords.view(ph // wh, wh, pw // ww, ww, 2).permute(0, 2, 1, 3, 4).reshape(-1, wh * ww, 2)

    return cut(queries), cut(keys)


def _dilated_grid(coords: torch.Tensor, gh: int, gw: int) -> torch.Tensor:
    """``[windows, gh * gw, 2]``: MaxViT's grid windows; window (a, b) takes every (H / gh)-th row from row a
    and every (W / gw)-th column from column b."""
    h, w, _ = coords.shape
    sh, sw = h // gh, w // gw
    return torch.stack([coords[a::sh, b::sw].reshape(gh * gw, 2) for a in range(sh) for b in range(sw)])


def _reference(attn: torch.Tensor, windows, heads_first_windows: bool = False) -> torch.Tensor:
    """``[B, H]``: the mean over every positioned query of each image of the float64 MAD of ``attn``.

    ``attn`` is ``[B * windows, H, N, N]`` (image-major windows), or ``[B, H, windows, N, N]`` with
    ``heads_first_windows``; ``windows`` is ``[windows, N, 2]``, or (queries, keys) of padded windows.
    """
    windows, keys = windows if isinstance(windows, tuple) else (windows, windows)
    count = windows.shape[0]
    if heads_first_windows:
        per_query = mad_positions_reference(attn, windows, keys, reduction="none")  # [B, H, windows, N]
        return per_query.nanmean((-2, -1))
    batch = attn.shape[0] // count
    positions, keys = (w.repeat(batch, 1, 1)[:, None] for w in (windows, keys))
    per_query = mad_positions_reference(attn, positions, keys, reduction="none")  # [B * windows, H, N]
    per_query = per_query.view(batch, count, attn.shape[1], -1).transpose(1, 2)
    return per_query.reshape(batch, attn.shape[1], -1).nanmean(-1)


def _reference_map(attn: torch.Tensor, windows, grid: tuple[int, int], stride: float,
                   heads_first_windows: bool = False) -> torch.Tensor:
    """``[B, H, grid_h * grid_w]``: each token's float64 MAD, put back on the map where its pixel centre is."""
    windows, keys = windows if isinstance(windows, tuple) else (windows, windows)
    count = windows.shape[0]
    if heads_first_windows:
        values = mad_positions_reference(attn, windows, keys, reduction="none").flatten(-2)  # [B, H, windows * N]
    else:
        batch = attn.shape[0] // count
        positions, keys = (w.repeat(batch, 1, 1)[:, None] for w in (windows, keys))
        per_query = mad_positions_reference(attn, positions, keys, reduction="none")
        values = per_query.view(batch, count, attn.shape[1], -1).transpose(1, 2).flatten(-2)
    coords = windows.reshape(-1, 2)
    real = ~coords[:, 0].isnan()
    cells = (coords[real] / stride - 0.5).round().long()
    out = torch.full((*values.shape[:2], grid[0] * grid[1]), float("nan"), dtype=torch.float64)
    out[..., cells[:, 0] * grid[1] + cells[:, 1]] = values[..., real]
    return out


def _eager_probabilities(model: nn.Module, classes: tuple[str, ...]) -> list[torch.Tensor]:
    """Runs nothing; switches every module of ``classes`` to its unfused path and collects, in call order, the
    probabilities its ``attn_drop`` receives."""
    maps = []
    for module in model.modules():
        if type(module).__name__ in classes:
            if hasattr(module, "fused_attn"):
                module.fused_attn = False
            module.attn_drop.register_forward_pre_hook(lambda m, args: maps.append(args[0].detach()))
    return maps


def _record_and_reference(model, pixels, classes, *, eager_recording=False, **options):
    """(recording, eager probabilities, outputs equal) for one forward of ``model`` and of its eager copy."""
    eager = copy.deepcopy(model)
    maps = _eager_probabilities(eager, classes)
    if eager_recording:
        _eager_probabilities(model, classes)
    with torch.no_grad():
        plain = model(pixels)
        with vitmad.record(model, **options) as rec:
            recorded = model(pixels)
        eager(pixels)
    return rec, maps, torch.equal(plain, recorded)


# MaxViT, MaxxViT, CoAtNet -----------------------------------------------------------------------------------------

MAXXVIT_SMALL = dict(embed_dim=(16, 32, 32, 64), depths=(1, 1, 1, 1), transformer_dim_head=8, stem_width=16)
MAXXVIT_STRIDES = (4, 8, 16, 32)
MAXXVIT_HEADS = (2, 4, 4, 8)  # embed_dim over transformer_dim_head


@pytest.mark.parametrize("nchw", [False, True], ids=["channels_last", "nchw"])
@pytest.mark.parametrize("size", [(64, 64), (64, 96)], ids=["square", "non_square"])
@pytest.mark.parametrize("eager_recording", [False, True], ids=["fused", "eager"])
def test_maxvit_block_and_grid_attention_equal_the_eager_attention_placed_by_hand(nchw, size, eager_recording):
    torch.manual_seed(0)
    model = timm.create_model("maxvit_nano_rw_256", pretrained=False, img_size=size,
                              transformer_use_nchw_attn=nchw, **MAXXVIT_SMALL).eval()
    pixels = torch.randn(2, 3, *size)
    rec, maps, unchanged = _record_and_reference(model, pixels, ("Attention2d", "AttentionCl"),
                                                 eager_recording=eager_recording)
    assert unchanged
    assert rec.skipped == {}
    partition = (size[0] // 32, size[1] // 32)  # MaxViT's window and grid: the image over 32
    expected_layers = [f"stages.{stage}.blocks.0.attn_{kind}.attn" for stage in range(4) for kind in ("block", "grid")]
    assert rec.layers == expected_layers
    assert len(maps) == len(expected_layers)
    for index, (attn, geometry) in enumerate(zip(maps, rec.geometry, strict=True)):
        stride = MAXXVIT_STRIDES[index // 2]
        coords = _pixel_map(size[0] // stride, size[1] // stride, stride)
        windows = (_blocks(*coords.shape[:2], stride, *partition) if index % 2 == 0
                   else _dilated_grid(coords, *partition))
        assert geometry.grid == coords.shape[:2]
        assert geometry.stride == (stride, stride)
        assert geometry.heads == attn.shape[1] == MAXXVIT_HEADS[index // 2]
        torch.testing.assert_close(rec.per_layer[index].double(), _reference(attn, windows), **TOL)


def test_maxvit_per_token_values_are_folded_onto_the_map_in_row_major_order():
    torch.manual_seed(1)
    size = (64, 96)
    model = timm.create_model("maxvit_nano_rw_256", pretrained=False, img_size=size, **MAXXVIT_SMALL).eval()
    pixels = torch.randn(1, 3, *size)
    rec, maps, _ = _record_and_reference(model, pixels, ("AttentionCl",), reduction="none")
    grid_attn, stride = maps[1], 4  # stage 0 grid attention over the 16 x 24 map, 2 x 3 cells per window
    h, w = 16, 24
    windows = _dilated_grid(_pixel_map(h, w, stride), 2, 3)
    per_query = mad_positions_reference(grid_attn, windows[:, None], reduction="none")  # [windows, H, 6]
    expected = torch.empty(grid_attn.shape[1], h, w, dtype=torch.float64)
    for window, (a, b) in enumerate((a, b) for a in range(h // 2) for b in range(w // 3)):
        expected[:, a::h // 2, b::w // 3] = per_query[window].view(-1, 2, 3)
    torch.testing.assert_close(rec.per_layer[1][0].double(), expected.reshape(-1, h * w), **TOL)


def test_maxvit_parallel_block_and_grid_attention():
    torch.manual_seed(2)
    size = (64, 96)
    model = timm.create_model("maxvit_tiny_pm_256", pretrained=False, img_size=size, **MAXXVIT_SMALL).eval()
    pixels = torch.randn(2, 3, *size)
    rec, maps, unchanged = _record_and_reference(model, pixels, ("AttentionCl",))
    assert unchanged
    assert rec.layers[:2] == ["stages.0.blocks.0.attn.attn_block", "stages.0.blocks.0.attn.attn_grid"]
    assert len(maps) == len(rec.layers) == 8
    for index, attn in enumerate(maps):
        stride = MAXXVIT_STRIDES[index // 2]
        coords = _pixel_map(size[0] // stride, size[1] // stride, stride)
        windows = _blocks(*coords.shape[:2], stride, 2, 3) if index % 2 == 0 else _dilated_grid(coords, 2, 3)
        torch.testing.assert_close(rec.per_layer[index].double(), _reference(attn, windows), **TOL)


# CoAtNet's relative position bias is built for the map of img_size, and its pooling rounds odd maps down,
# so only sizes divisible by 32 run.
@pytest.mark.parametrize("size", [(64, 64), (64, 96)], ids=["square", "non_square"])
def test_coatnet_global_attention_at_stride_16_and_32(size):
    torch.manual_seed(3)
    model = timm.create_model("coatnet_nano_rw_224", pretrained=False, img_size=size,
                              **{**MAXXVIT_SMALL, "depths": (1, 1, 2, 2)}).eval()
    pixels = torch.randn(2, 3, *size)
    rec, maps, unchanged = _record_and_reference(model, pixels, ("Attention2d",))
    assert unchanged
    assert rec.layers == ["stages.2.blocks.0.attn", "stages.2.blocks.1.attn", "stages.3.blocks.0.attn",
                          "stages.3.blocks.1.attn"]
    maps_seen = {16: (size[0] // 16, size[1] // 16), 32: (size[0] // 32, size[1] // 32)}
    for index, (attn, stride) in enumerate(zip(maps, (16, 16, 32, 32), strict=True)):
        coords = _pixel_map(*maps_seen[stride], stride)
        windows = coords.reshape(1, -1, 2)
        assert rec.geometry[index].stride == (stride, stride)
        assert rec.geometry[index].attention == "global"
        torch.testing.assert_close(rec.per_layer[index].double(), _reference(attn, windows), **TOL)
    # CoAtNet-rw expands channels after the attention: the first block of a stage keeps the input's 4 heads.
    assert [g.heads for g in rec.geometry] == [a.shape[1] for a in maps] == [4, 4, 4, 8]


# NesT, GCViT, DaViT, TinyViT -------------------------------------------------------------------------------------


class _Softmaxes(torch.overrides.TorchFunctionMode):
    """Collects the output of every softmax of a tensor of rank ``rank`` or more (the eager attention of modules
    without an ``attn_drop``)."""

    def __init__(self, rank: int):
        super().__init__()
        self.maps, self.rank = [], rank

    def __torch_function__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        if getattr(func, "__name__", "") == "softmax" and result.dim() >= self.rank:
            self.maps.append(result.detach())
        return result


def _eager_softmaxes(model, pixels, rank: int = 4):
    eager = copy.deepcopy(model)
    for module in eager.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = False
    with torch.no_grad(), _Softmaxes(rank) as mode:
        eager(pixels)
    return mode.maps


class _Holding(nn.Module):
    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone

    def forward(self, pixels):
        return self.backbone(pixels)


@pytest.mark.parametrize("wrapped", ["bare", "sequential", "module"])
def test_nest_attention_within_blocks_of_each_level(wrapped):
    """Also inside an nn.Sequential or a user's module (QA 331: refused as a plain ViT layer, its levels and its
    feature_info read at the model's root only)."""
    torch.manual_seed(4)
    from timm.models.nest import Nest

    model = Nest(img_size=64, patch_size=4, num_levels=3, embed_dims=(16, 32, 64), num_heads=(1, 2, 4),
                 depths=(1, 1, 1)).eval()
    prefix = {"bare": "", "sequential": "0.", "module": "backbone."}[wrapped]
    if wrapped != "bare":
        model = (nn.Sequential(model) if wrapped == "sequential" else _Holding(model)).eval()
    pixels = torch.randn(2, 3, 64, 64)
    rec, maps, unchanged = _record_and_reference(model, pixels, ("Attention",))
    assert unchanged
    assert rec.layers == [f"{prefix}levels.{i}.transformer_encoder.0.attn" for i in range(3)]
    for level, (attn, stride, side) in enumerate(zip(maps, (4, 8, 16), (16, 8, 4), strict=True)):
        windows = _blocks(side, side, stride, 4, 4)  # 4 x 4 blocks: 16, 4 and 1 of them
        assert attn.shape[:3] == (2, 2 ** level, windows[0].shape[0])
        assert rec.geometry[level].stride == (stride, stride) and rec.geometry[level].heads == 2 ** level
        torch.testing.assert_close(rec.per_layer[level].double(), _reference(attn, windows, True), **TOL)


def test_gcvit_local_and_global_query_windows_non_square():
    torch.manual_seed(5)
    from timm.models.gcvit import GlobalContextVit

    size = (64, 128)  # the global query is pooled to the window's shape, so windows follow the aspect
    model = GlobalContextVit(img_size=size, embed_dim=16, depths=(1, 2, 1, 1), num_heads=(1, 2, 4, 8),
                             window_size=((2, 4),) * 4).eval()
    pixels = torch.randn(2, 3, *size)
    rec, maps, unchanged = _record_and_reference(model, pixels, ("WindowAttentionGlobal",))
    assert unchanged
    assert rec.layers == ["stages.0.blocks.0.attn", "stages.1.blocks.0.attn", "stages.1.blocks.1.attn",
                          "stages.2.blocks.0.attn", "stages.3.blocks.0.attn"]
    assert "global query" in rec.geometry[2].attention
    for index, (attn, stride, heads) in enumerate(zip(maps, (4, 8, 8, 16, 32), (1, 2, 2, 4, 8), strict=True)):
        # Global-query layers too: query n of window w is placed at the local token n of w it is written to.
        windows = _blocks(size[0] // stride, size[1] // stride, stride, 2, 4)
        assert rec.geometry[index].heads == heads and rec.geometry[index].stride == (stride, stride)
        torch.testing.assert_close(rec.per_layer[index].double(), _reference(attn, windows), **TOL)
    # The self mass: each local token's attention on itself; none where the queries are the global query's (key n
    # is not query n's token: it was reported as A[n, n], QA 254).
    with torch.no_grad(), vitmad.record(model, stats=["self_mass"]) as rec:
        model(pixels)
    for index, attn in enumerate(maps):
        if index == 2:
            assert bool(rec.stats["self_mass"][index].isnan().all())
            continue
        own = attn.diagonal(dim1=-2, dim2=-1)  # [B * windows, heads, N], image-major
        expected = own.double().reshape(2, -1, *own.shape[1:]).mean(dim=(1, 3))
        torch.testing.assert_close(rec.stats["self_mass"][index][:, :attn.shape[1]].double(), expected, **TOL)


@pytest.mark.parametrize("size", [(64, 64), (70, 90)], ids=["square", "odd_non_square"])
def test_davit_padded_windows_and_skipped_channel_attention(size):
    torch.manual_seed(6)
    from timm.models.davit import DaVit

    model = DaVit(embed_dims=(16, 32, 64, 128), depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8), window_size=3).eval()
    pixels = torch.randn(2, 3, *size)
    with torch.no_grad():
        plain = model(pixels)
        with vitmad.record(model) as rec:
            assert torch.equal(model(pixels), plain)
    maps = [m for m in _eager_softmaxes(model, pixels) if m.shape[-1] == 9]  # spatial 3 x 3 windows
    assert rec.layers == [f"stages.{i}.blocks.0.0.attn" for i in range(4)]
    assert sorted(rec.skipped) == [f"stages.{i}.blocks.0.1.attn" for i in range(4)]
    assert all("channel" in reason for reason in rec.skipped.values())
    # The stem and each downsampling pad the map up to whole strides: 70 x 90 -> 18 x 23, 9 x 12, 5 x 6, 3 x 3.
    for index, (attn, stride) in enumerate(zip(maps, (4, 8, 16, 32), strict=True)):
        side = (-(-size[0] // stride), -(-size[1] // stride))
        windows = _blocks(*side, stride, 3, 3)
        assert rec.geometry[index].grid == side and rec.geometry[index].heads == 2 ** index
        torch.testing.assert_close(rec.per_layer[index].double(), _reference(attn, windows), **TOL)


@pytest.mark.parametrize("size", [(64, 64), (70, 90)], ids=["square", "odd_non_square"])
def test_tiny_vit_padded_windows_with_attention_bias(size):
    torch.manual_seed(7)
    from timm.models.tiny_vit import TinyVit

    model = TinyVit(embed_dims=(16, 32, 64, 64), depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 4),
                    window_sizes=(3, 3, 3, 3)).eval()
    pixels = torch.randn(2, 3, *size)
    with torch.no_grad():
        plain = model(pixels)
        with vitmad.record(model) as rec:
            assert torch.equal(model(pixels), plain)
    maps = _eager_softmaxes(model, pixels)
    assert rec.layers == [f"stages.{i}.blocks.0.attn" for i in (1, 2, 3)]
    for index, (attn, stride) in enumerate(zip(maps, (8, 16, 32), strict=True)):
        side = (-(-size[0] // stride), -(-size[1] // stride))  # each stride-2 convolution rounds up
        windows = _blocks(*side, stride, 3, 3)
        assert rec.geometry[index].grid == side and rec.geometry[index].stride == (stride, stride)
        torch.testing.assert_close(rec.per_layer[index].double(), _reference(attn, windows), **TOL)
    assert [g.heads for g in rec.geometry] == [2, 4, 4]


# FastViT, ViTamin -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(64, 96), (72, 104)], ids=["non_square", "rounded_up"])
def test_fastvit_global_attention_over_the_last_stage_map(size):
    torch.manual_seed(8)
    model = timm.create_model("fastvit_sa12", pretrained=False, embed_dims=(16, 32, 64, 128),
                              layers=(1, 1, 1, 1)).eval()
    pixels = torch.randn(2, 3, *size)
    rec, maps, unchanged = _record_and_reference(model, pixels, ("Attention",))
    assert unchanged
    assert rec.layers == ["stages.3.blocks.0.token_mixer"]
    side = (-(-size[0] // 32), -(-size[1] // 32))  # the stem and downsamplings pad up
    windows = _pixel_map(*side, 32).reshape(1, -1, 2)
    assert rec.geometry[0].grid == side and rec.geometry[0].stride == (32, 32) and rec.geometry[0].heads == 4
    torch.testing.assert_close(rec.per_layer[0].double(), _reference(maps[0], windows), **TOL)


@pytest.mark.parametrize("size, built", [((64, 96), (64, 96)), ((72, 104), (64, 96)), ((200, 200), (200, 200)),
                                         ((100, 132), (100, 132))],
                         ids=["non_square", "rounded_up", "built_at_200", "built_at_100x132"])
def test_vitamin_attention_over_the_stem_map_at_stride_16(size, built):
    """Built at a size its stride 16 does not divide, timm's feature_ratio is that size over the map (15 px at
    200 px, 14 x 14 at 100 x 132), where the stem's four stride-2 convolutions keep the tokens 16 px apart (QA 315:
    placed at feature_ratio)."""
    torch.manual_seed(9)
    model = timm.create_model("vitamin_small_224", pretrained=False, img_size=built, depth=2,
                              dynamic_img_size=built == (64, 96)).eval()
    pixels = torch.randn(1, 3, *size)
    rec, maps, unchanged = _record_and_reference(model, pixels, ("Attention",))
    assert unchanged
    assert rec.layers == ["blocks.0.attn", "blocks.1.attn"]
    side = (-(-size[0] // 16), -(-size[1] // 16))  # the stem's strided convolutions pad up
    windows = _pixel_map(*side, 16).reshape(1, -1, 2)  # no class token
    for index, attn in enumerate(maps):
        assert rec.geometry[index].grid == side and rec.geometry[index].stride == (16, 16)
        torch.testing.assert_close(rec.per_layer[index].double(), _reference(attn, windows), **TOL)


def _vit_over(backbone: nn.Module, width: int, size: int, patch: int = 1, **options) -> nn.Module:
    """A timm ViT over ``backbone`` through HybridEmbed without projection (ViTamin's and MobileCLIP's embedding)."""
    from functools import partial

    from timm.layers import HybridEmbed
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(img_size=size, patch_size=patch, embed_dim=width, depth=1, num_heads=4,
                             class_token=False, global_pool="avg", **options,
                             embed_layer=partial(HybridEmbed, backbone=backbone, proj=False)).eval()


@pytest.mark.parametrize("name, out_indices, size, patch, stride", [
    ("tf_efficientnet_b0", (3,), 64, 1, 16),  # its next stage runs past the level returned: one stride the hooks see
    ("resnetblur18", (3,), 64, 1, 16),  # BlurPool strides by F.conv2d, which no hook sees
    ("resnet18", (3, 1), 64, 1, 16),  # the outputs come in module order: the deepest, last, is taken
    ("tresnet_m", (1,), 64, 1, 4),  # space-to-depth before the first convolution
    ("resnet18", None, 128, 2, 32),  # a whole network as the stem; an identity patches nothing
    ("resnetblur18", None, 128, 1, 32),  # a whole network: its feature_info list, BlurPool's strides unseen
])
def test_a_vit_over_a_backbone_without_projection_at_its_true_stride(name, out_indices, size, patch, stride):
    """timm's HybridEmbed(proj=False) over a features_only backbone takes the stride its FeatureInfo declares for
    the deepest map returned, a whole timm network its feature_info list's; over another network, the chain of its
    strided modules; whatever patch_size says (QA 318-320: refused, placed at a shallower level's stride, at the
    first convolution's input, or at patch_size times the stride)."""
    torch.manual_seed(10)
    if out_indices is None:
        backbone = timm.create_model(name, pretrained=False, num_classes=0, global_pool="")
        width = backbone.num_features
    else:
        backbone = timm.create_model(name, pretrained=False, features_only=True, out_indices=out_indices)
        width = backbone.feature_info.channels()[-1] if len(out_indices) == 1 else max(backbone.feature_info.channels())
    # Its position embedding sized for the map over patch_size (a 2 x 2 table for 4 x 4 cells): resampled.
    model = _vit_over(backbone, width, size, patch, dynamic_img_size=patch > 1)
    pixels = torch.randn(2, 3, size, size)
    rec, maps, unchanged = _record_and_reference(model, pixels, ("Attention",))
    assert unchanged
    side = size // stride
    assert rec.geometry[0].grid == (side, side) and rec.geometry[0].stride == (stride, stride)
    torch.testing.assert_close(rec.per_layer[0].double(),
                               _reference(maps[0], _pixel_map(side, side, stride).reshape(1, -1, 2)), **TOL)


class _PoolByFunctionStem(nn.Module):
    """Stride 16: a convolution, F.max_pool2d (no module the hooks see), two convolutions."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.a, self.b, self.c = (nn.Conv2d(3 if i == 0 else width, width, 3, 2, 1) for i in range(3))

    def forward(self, x):
        return self.c(self.b(F.max_pool2d(self.a(x), 2)))


@pytest.mark.parametrize("size", [64, 120])
def test_a_stem_that_pools_by_function_is_refused(size):
    """A stride no module shows: not guessed from timm's feature_ratio, the build size over its map, which is exact
    at 64 px but 15 at 120 px (8 cells, 16 px apart; QA 319: taken, MAD 6% low)."""
    model = _vit_over(_PoolByFunctionStem(), 32, size)
    with torch.no_grad(), pytest.raises(ValueError, match=rf"do not make one chain of maps from the image height of "
                                                          rf"{size}: .*; pass positions=<\[N, 2\] pixel position"):
        with vitmad.record(model):
            model(torch.randn(1, 3, size, size))


# MobileViT, CoaT ---------------------------------------------------------------------------------------------------


def _across_patches(coords: torch.Tensor, ph: int, pw: int) -> torch.Tensor:
    """``[ph * pw, patches, 2]``: MobileViT's unfolding; sequence (i, j) holds pixel (i, j) of every patch."""
    h, w, _ = coords.shape
    return coords.view(h // ph, ph, w // pw, pw, 2).permute(1, 3, 0, 2, 4).reshape(ph * pw, -1, 2)


def test_mobilevit_attention_across_patches_is_a_dilated_grid():
    torch.manual_seed(10)
    size = (64, 128)  # maps of 8 x 16, 4 x 8 and 2 x 4: whole 2 x 2 patches
    model = timm.create_model("mobilevit_xxs", pretrained=False).eval()
    pixels = torch.randn(2, 3, *size)
    rec, maps, unchanged = _record_and_reference(model, pixels, ("Attention",))
    assert unchanged
    # 2, 4 and 3 transformer layers in the MobileViT blocks of stages 2, 3 and 4 (strides 8, 16, 32), 2x2 patches.
    strides = [8] * 2 + [16] * 4 + [32] * 3
    assert len(rec.layers) == len(maps) == len(strides)
    for index, (attn, stride) in enumerate(zip(maps, strides, strict=True)):
        windows = _across_patches(_pixel_map(size[0] // stride, size[1] // stride, stride), 2, 2)
        assert rec.geometry[index].stride == (stride, stride) and rec.geometry[index].heads == 4
        torch.testing.assert_close(rec.per_layer[index].double(), _reference(attn, windows), **TOL)


def test_mobilevit_measures_maps_it_resizes_to_whole_patches_on_the_resized_grid():
    """At 224 px the last stage's 7 x 7 map (stride 32) is resized bilinearly, corners not aligned, to 8 x 8 before
    the 2 x 2 unfolding: its tokens sample the map at the centres of an 8 x 8 grid over the same image, 28 px
    apart (was: refused). At 72 x 88 px every stage is resized: 9 x 11 -> 10 x 12, 5 x 6 -> 6 x 6, 3 x 3 -> 4 x 4."""
    torch.manual_seed(10)
    model = timm.create_model("mobilevit_xxs", pretrained=False).eval()
    for size in ((224, 224), (72, 88)):
        pixels = torch.randn(1, 3, *size)
        rec, maps, unchanged = _record_and_reference(model, pixels, ("Attention",))
        assert unchanged
        strides = [8] * 2 + [16] * 4 + [32] * 3
        for index, (attn, stride) in enumerate(zip(maps, strides, strict=True)):
            height, width = -(-size[0] // stride), -(-size[1] // stride)  # the strided convolutions pad up
            resized = (-(-height // 2) * 2, -(-width // 2) * 2)
            step = (stride * height / resized[0], stride * width / resized[1])
            centres = _pixel_map(*resized, 1.0) * torch.tensor(step, dtype=torch.float64)
            windows = _across_patches(centres, 2, 2)
            assert rec.geometry[index].grid == resized and rec.geometry[index].stride == step
            torch.testing.assert_close(rec.per_layer[index].double(), _reference(attn, windows), **TOL)


def test_mobilevitv2_and_coat_are_refused_with_their_skipped_layers_reasons():
    # efficientvit_b0 (MIT) and lambda_resnet26t: were "found no attention layer ... pass layers=[...]" (QA 240).
    # efficientvim_m1, gcresnet33ts: a softmax over the tokens, no query per token; "found no attention" with advice
    # (layers=, then positions=) that failed twice (QA 274).
    for name, reason in (("efficientvim_m1", r"hidden-state mixer \(EfficientViM's HSM-SSD\)"),
                         ("gcresnet33ts", r"global context block \(GCNet\)"),
                         ("mobilevitv2_050", "linear self-attention"), ("coat_lite_tiny", "factorized attention"),
                         ("efficientvit_b0", r"ReLU linear attention \(EfficientViT-MIT's LiteMLA\)"),
                         ("lambda_resnet26t", r"lambda layer \(LambdaNetworks\): softmax\(k\) over the positions")):
        model = timm.create_model(name, pretrained=False)
        with pytest.raises(ValueError, match=f"no layer with spatial softmax attention.*{reason}"):
            vitmad.record(model)


# EfficientViT (MSRA) -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(64, 64), (72, 104)], ids=["square", "odd_non_square"])
def test_efficientvit_msra_cascaded_heads_in_padded_windows(size):
    torch.manual_seed(11)
    # Built for 224 px: 7 x 7 windows, but 4 x 4 in the last stage, whose map there is 4 x 4; 4 heads per layer.
    model = timm.create_model("efficientvit_m0", pretrained=False).eval()
    pixels = torch.randn(2, 3, *size)
    with torch.no_grad():
        plain = model(pixels)
        with vitmad.record(model) as rec:
            assert torch.equal(model(pixels), plain)
    per_head = _eager_softmaxes(model, pixels, rank=3)  # one [B * windows, 49, 49] softmax per head
    assert rec.layers == ["stages.0.blocks.0.mixer.m.attn", "stages.1.blocks.0.mixer.m.attn",
                          "stages.1.blocks.1.mixer.m.attn", "stages.2.blocks.0.mixer.m.attn",
                          "stages.2.blocks.1.mixer.m.attn", "stages.2.blocks.2.mixer.m.attn"]
    assert len(per_head) == 4 * len(rec.layers)
    strides, window_sides = (16, 32, 32, 64, 64, 64), (7, 7, 7, 4, 4, 4)
    for index, (stride, window) in enumerate(zip(strides, window_sides, strict=True)):
        attn = torch.stack(per_head[4 * index:4 * index + 4], dim=1)  # [B * windows, 4, N, N]
        side = (-(-size[0] // stride), -(-size[1] // stride))  # every strided convolution rounds up
        windows = _blocks(*side, stride, window, window)
        assert rec.geometry[index].grid == side and rec.geometry[index].heads == 4
        torch.testing.assert_close(rec.per_layer[index].double(), _reference(attn, windows), **TOL)


# Per-token values -------------------------------------------------------------------------------------------------


def test_per_token_values_of_blocks_and_padded_windows_fold_onto_each_map_in_row_major_order():
    torch.manual_seed(12)
    from timm.models.nest import Nest
    from timm.models.tiny_vit import TinyVit

    nest = Nest(img_size=64, patch_size=4, num_levels=3, embed_dims=(16, 32, 64), num_heads=(1, 2, 4),
                depths=(1, 1, 1)).eval()
    pixels = torch.randn(2, 3, 64, 64)
    rec, maps, _ = _record_and_reference(nest, pixels, ("Attention",), reduction="none")
    for level, (attn, stride, side) in enumerate(zip(maps, (4, 8, 16), (16, 8, 4), strict=True)):
        expected = _reference_map(attn, _blocks(side, side, stride, 4, 4), (side, side), stride, True)
        torch.testing.assert_close(rec.per_layer[level].double(), expected, **TOL)

    tiny = TinyVit(embed_dims=(16, 32, 64, 64), depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 4),
                   window_sizes=(3, 3, 3, 3)).eval()
    pixels = torch.randn(2, 3, 70, 90)
    with torch.no_grad(), vitmad.record(tiny, reduction="none") as rec:
        tiny(pixels)
    for index, (attn, stride) in enumerate(zip(_eager_softmaxes(tiny, pixels), (8, 16, 32), strict=True)):
        side = (-(-70 // stride), -(-90 // stride))
        expected = _reference_map(attn, _blocks(*side, stride, 3, 3), side, stride)
        assert not expected.isnan().any()  # every token of the map exactly once, padding dropped
        torch.testing.assert_close(rec.per_layer[index].double(), expected, **TOL)


def test_stage_stride_takes_feature_info_where_it_fits_and_refuses_to_guess_otherwise():
    from vitmad.recording.families.windows import stage_stride
    from vitmad.recording.placement import NotPlaceable

    model = nn.Module()
    model.feature_info = [{"module": "stages.3", "reduction": 32}]
    # A 70 x 90 image rounds up to a 3 x 3 map at stride 32, in the model and in its features_only copy.
    assert stage_stride(model, "stages.3.blocks.0.attn", (70, 90), (3, 3)) == (32.0, 32.0)
    assert stage_stride(model, "stages_3.blocks.0.attn", (70, 90), (3, 3)) == (32.0, 32.0)
    # No ratio guesses: 66 px over 3 tokens could be 22 px, or 32 px rounded up.
    with pytest.raises(NotPlaceable, match="names no stage holding it"):
        stage_stride(model, "other.attn", (66, 64), (3, 2))
    with pytest.raises(NotPlaceable, match="height 4 for an image height of 70.*gives 2 or 3"):
        stage_stride(model, "stages.3.blocks.0.attn", (70, 96), (4, 3))
