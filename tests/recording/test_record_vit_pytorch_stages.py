"""lucidrains' vit-pytorch: MaxViT, Twins-SVT, PiT, LeViT, CvT, CrossViT, NesT, CCT, T2T-ViT and MobileViT, against
the probabilities of each model's own softmax (every softmax over the last dim of a rank >= 3 tensor, in call order),
their tokens placed by the geometry written here from reading vit_pytorch's source."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

vit_pytorch = pytest.importorskip("vit_pytorch")

import vitmad  # noqa: E402
from conftest import batch_norms_on, grid_centres, statistics_reference  # noqa: E402

STD = 0.5
TOL = {"rtol": 1e-5, "atol": 1e-4}  # MAD in pixels: float32 probabilities, float64 reference
STAT_TOL = {"rtol": 1e-5, "atol": 1e-6}


class _Softmaxes(TorchFunctionMode):
    """The model's attention probabilities, as its softmaxes return them, in call order."""

    def __init__(self):
        super().__init__()
        self.maps = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        dim = (kwargs or {}).get("dim", args[1] if len(args) > 1 else None)
        if func in (torch.softmax, F.softmax, torch.Tensor.softmax) and out.dim() >= 3 and dim in (-1, out.dim() - 1):
            self.maps.append(out.detach().double())
        return out


def _sharpen(model: torch.nn.Module, std: float, layers=(torch.nn.Linear, torch.nn.Conv2d)) -> torch.nn.Module:
    """``model`` in eval mode with the weights of its attention modules' ``layers`` (linear and convolutional; Conv1d
    for RegionViT's and SepViT's) drawn anew (std ``std``): attention far from uniform, which the default init makes
    every head of a tiny model look, so that a token at a wrong position changes the MAD."""
    torch.manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "heads") and hasattr(module, "scale"):  # vit_pytorch's attention modules
                for layer in module.modules():
                    if isinstance(layer, layers):
                        layer.weight.normal_(std=std)
    return model.eval()


def _run(model, pixels, **kwargs):
    """(maps, recording, per-token recording): the softmaxes of a plain forward, and two recordings whose output is
    the plain forward's, bit for bit."""
    with torch.no_grad():
        capture = _Softmaxes()
        with capture:
            plain = model(pixels)
        with vitmad.record(model, **kwargs) as rec:
            recorded = model(pixels)
        with vitmad.record(model, reduction="none", **kwargs) as rec_tokens:
            model(pixels)
    assert torch.equal(plain, recorded)
    return capture.maps, rec, rec_tokens


def _far_from_uniform(probabilities: torch.Tensor) -> None:
    entropy = -torch.special.xlogy(probabilities, probabilities).sum(-1).mean()
    assert float(entropy) < 0.75 * math.log(probabilities.shape[-1])


def _mad(attn, queries, keys):
    """[..., Nq]: attention-weighted distance of each query, float64."""
    return (attn * torch.cdist(queries.double(), keys.double())).sum(-1)


def _cells(rows: torch.Tensor, cols: torch.Tensor, stride: float) -> torch.Tensor:
    return (torch.stack([rows, cols], -1).double() + 0.5) * stride


def _windows_reference(attn: torch.Tensor, cells: torch.Tensor, grid: tuple[int, int], stride: float) -> torch.Tensor:
    """[B, H, T] per map token (row-major) from ``attn`` [B, nW, H, N, N] of windows whose tokens are at the map
    cells ``cells`` [nW, N, 2] (row, column)."""
    batch, windows, heads, size, _ = attn.shape
    positions = (cells.double() + 0.5) * stride
    per_slot = _mad(attn, positions[None, :, None], positions[None, :, None])  # [B, nW, H, N]
    out = torch.full((batch, heads, grid[0] * grid[1]), math.nan, dtype=torch.float64)
    index = cells[..., 0] * grid[1] + cells[..., 1]  # [nW, N]
    out[:, :, index.reshape(-1)] = per_slot.permute(0, 2, 1, 3).reshape(batch, heads, -1)
    assert not out.isnan().any()
    return out


def _compare(rec, rec_tokens, expected: list[torch.Tensor], grids, strides) -> None:
    assert len(rec.layers) == len(expected)
    for layer, reference in enumerate(expected):
        geometry = rec.geometry[layer]
        assert geometry.grid == tuple(grids[layer]) and geometry.stride == (float(strides[layer]),) * 2
        torch.testing.assert_close(rec_tokens.per_layer[layer].double(), reference, **TOL)
        torch.testing.assert_close(rec.per_layer[layer].double(), reference.mean(-1), **TOL)


def test_maxvit_block_and_grid_attention():
    from vit_pytorch.max_vit import MaxViT

    torch.manual_seed(0)
    model = _sharpen(MaxViT(num_classes=5, dim=16, depth=(1, 1), dim_head=8, window_size=4, dropout=0.0), STD)
    pixels = torch.randn(2, 3, 32, 64, generator=torch.Generator().manual_seed(1))
    batch_norms_on(model, pixels)  # the initial statistics shrink the activations to ~1e-5 by the attention
    maps, rec, rec_tokens = _run(model, pixels)
    assert rec.layers == ["layers.0.2.fn", "layers.0.6.fn", "layers.1.2.fn", "layers.1.6.fn"]
    # Stem stride 2, each stage's first MBConv stride 2: maps 8x16 (4 px), 4x8 (8 px); 4x4 windows, [B * nW, H, 16, 16].
    expected, grids, strides = [], [], []
    for (gh, gw), stride, block, attn in zip([(8, 16)] * 2 + [(4, 8)] * 2, [4, 4, 8, 8], [True, False] * 2, maps):
        x, y, w1, w2 = torch.meshgrid(torch.arange(gh // 4), torch.arange(gw // 4), torch.arange(4), torch.arange(4),
                                      indexing="ij")
        if block:  # 'b d (x w1) (y w2) -> b x y w1 w2 d'
            rows, cols = x * 4 + w1, y * 4 + w2
        else:  # 'b d (w1 x) (w2 y) -> b x y w1 w2 d'
            rows, cols = w1 * (gh // 4) + x, w2 * (gw // 4) + y
        cells = torch.stack([rows, cols], -1).reshape(-1, 16, 2)
        heads = attn.shape[1]
        expected.append(_windows_reference(attn.view(2, -1, heads, 16, 16), cells, (gh, gw), stride))
        grids.append((gh, gw))
        strides.append(stride)
    _far_from_uniform(maps[0])
    _far_from_uniform(maps[1])
    _compare(rec, rec_tokens, expected, grids, strides)
    assert [g.attention for g in rec.geometry][:2] == ["window 4x4", "grid 4x4, dilated every 2x4"]


def test_mobilevit_attention_across_patches():
    from vit_pytorch.mobile_vit import MobileViT

    torch.manual_seed(0)
    model = _sharpen(MobileViT(image_size=(64, 128), dims=[16, 16, 16], channels=[8] * 10 + [16], num_classes=5,
                               depths=(1, 1, 1)), STD)
    pixels = torch.randn(2, 3, 64, 128, generator=torch.Generator().manual_seed(1))
    batch_norms_on(model, pixels)  # the initial statistics shrink the activations to ~1e-5 by the attention
    maps, rec, rec_tokens = _run(model, pixels)
    # conv1 and stem[1] stride 2, each trunk MV2Block stride 2: maps 8x16 (8 px), 4x8 (16 px), 2x4 (32 px).
    # 'b d (h ph) (w pw) -> b (ph pw) (h w) d': sequence (i, j) holds patch (a, b)'s pixel at (a * 2 + i, b * 2 + j).
    expected, grids, strides = [], [], []
    for (gh, gw), stride, attn in zip([(8, 16), (4, 8), (2, 4)], [8, 16, 32], maps):
        i, j, a, b = torch.meshgrid(torch.arange(2), torch.arange(2), torch.arange(gh // 2), torch.arange(gw // 2),
                                    indexing="ij")
        cells = torch.stack([a * 2 + i, b * 2 + j], -1).reshape(4, -1, 2)
        expected.append(_windows_reference(attn, cells, (gh, gw), stride))  # attn is [B, 4, H, N, N] already
        grids.append((gh, gw))
        strides.append(stride)
    _far_from_uniform(maps[0])
    _compare(rec, rec_tokens, expected, grids, strides)


def test_twins_svt_local_windows_and_pooled_global_keys():
    from vit_pytorch.twins_svt import TwinsSVT

    stages = {f"s{i}_{k}": v for i in range(1, 5) for k, v in (("emb_dim", 8), ("patch_size", 2 if i < 4 else 1),
                                                               ("local_patch_size", 2), ("global_k", 2), ("depth", 1))}
    torch.manual_seed(0)
    model = _sharpen(TwinsSVT(num_classes=5, **stages), STD)
    pixels = torch.randn(2, 3, 32, 48, generator=torch.Generator().manual_seed(1))
    maps, rec, rec_tokens = _run(model, pixels)
    # Patch sizes 2, 2, 2, 1: maps 16x24 (2 px), 8x12 (4), 4x6 (8), 4x6 (8); the last stage has
    # no local attention. Local: 2x2 windows, [(B x y heads), 4, 4]; global: keys by a 2x2 conv of stride 2.
    layout = [((16, 24), 2)] * 4 + [((8, 12), 4)] * 4 + [((4, 6), 8)] * 4 + [((4, 6), 8)] * 2
    local = [True, False] * 6 + [False, False]
    expected, heads = [], 8
    for ((gh, gw), stride), is_local, attn in zip(layout, local, maps):
        if is_local:
            x, y, p1, p2 = torch.meshgrid(torch.arange(gh // 2), torch.arange(gw // 2), torch.arange(2),
                                          torch.arange(2), indexing="ij")
            cells = torch.stack([x * 2 + p1, y * 2 + p2], -1).reshape(-1, 4, 2)
            expected.append(_windows_reference(attn.view(2, -1, heads, 4, 4), cells, (gh, gw), stride))
        else:
            kr, kc = torch.meshgrid(torch.arange(gh // 2), torch.arange(gw // 2), indexing="ij")
            keys = _cells(kr.reshape(-1), kc.reshape(-1), 2 * stride)
            expected.append(_mad(attn.view(2, heads, gh * gw, -1), grid_centres((gh, gw), stride), keys))
    _far_from_uniform(maps[0])
    _far_from_uniform(maps[1])
    _compare(rec, rec_tokens, expected, [g for g, _ in layout], [s for _, s in layout])


def _check_prefix_stats(rec, rec_tokens, maps, positions_per_layer) -> None:
    for layer, (probabilities, positions) in enumerate(zip(maps, positions_per_layer)):
        expected = statistics_reference(probabilities, positions)
        torch.testing.assert_close(rec_tokens.per_layer[layer].double(), expected["mad"], **TOL)
        for stat in ("entropy", "prefix_mass"):
            torch.testing.assert_close(rec_tokens.calls[-1].statistics[stat][layer].double(), expected[stat],
                                       **STAT_TOL)
        if bool(positions[:, 0].isnan().any()):
            torch.testing.assert_close(rec.prefix_maps[layer].double(), expected["prefix_maps"], **STAT_TOL)
        else:
            assert rec.prefix_maps[layer] is None


def _with_class_token(centres: torch.Tensor) -> torch.Tensor:
    return torch.cat([torch.full((1, 2), math.nan, dtype=torch.float64), centres])


STATS = ["entropy", "prefix_mass", "prefix_maps"]


@pytest.mark.parametrize("size,depth,grids", [((32, 32), (1, 1), [(7, 7), (4, 4)]), ((28, 32), (1,), [(6, 7)])])
def test_pit_pooled_stages_after_class_token(size, depth, grids):
    from vit_pytorch.pit import PiT

    torch.manual_seed(0)
    model = _sharpen(PiT(image_size=32, patch_size=8, num_classes=5, dim=16, depth=depth, heads=2, mlp_dim=16,
                         dim_head=8), STD)
    pixels = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1))
    maps, rec, rec_tokens = _run(model, pixels, stats=STATS)
    # nn.Unfold(8, stride 4): (n - 8) // 4 + 1 patches a side, 4 px stride cells; Pool: 3x3 conv, stride 2, pad 1.
    strides = [4, 8][:len(grids)]
    positions = [_with_class_token(grid_centres(g, s)) for g, s in zip(grids, strides)]
    _far_from_uniform(maps[0])
    _check_prefix_stats(rec, rec_tokens, maps, positions)
    assert [g.grid for g in rec.geometry] == grids and [g.num_prefix_tokens for g in rec.geometry] == [1] * len(grids)


def test_pit_refuses_a_grid_its_pool_folds_into_other_rows():
    from vit_pytorch.pit import PiT

    model = PiT(image_size=32, patch_size=8, num_classes=5, dim=16, depth=(1, 1), heads=2, mlp_dim=16,
                dim_head=8).eval()
    pixels = torch.randn(1, 3, 20, 40)  # a 4x9 grid: Pool folds its 36 patches into 6 rows of 6
    with pytest.raises(ValueError, match=r"folds the 4x9 grid of tokens into 6 rows"), torch.no_grad():
        with vitmad.record(model):
            model(pixels)


def test_calls_start_at_the_model_forward():
    """PiT's, Twins-SVT's and NesT's first convolution runs after their patches are cut (PiT's in its first Pool):
    each forward is one call holding every layer, as a forward recorded alone."""
    from vit_pytorch.nest import NesT
    from vit_pytorch.pit import PiT

    pit = PiT(image_size=32, patch_size=8, num_classes=5, dim=16, depth=(1, 1), heads=2, mlp_dim=16, dim_head=8)
    nest = NesT(image_size=32, patch_size=4, num_classes=5, dim=8, heads=1, num_hierarchies=2, block_repeats=1,
                dim_head=8)
    first, second = torch.randn(2, 1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    for model in (pit.eval(), nest.eval()):
        with torch.no_grad():
            with vitmad.record(model) as both:
                model(first)
                model(second)
            with vitmad.record(model) as alone:
                model(second)
        assert [len(call.layers) for call in both.calls] == [2, 2]
        assert all(torch.equal(a, b) for a, b in zip(both.per_layer, alone.per_layer))


def test_levit_subsampled_queries():
    from vit_pytorch.levit import LeViT

    torch.manual_seed(0)
    model = _sharpen(LeViT(image_size=64, num_classes=5, dim=(16, 24), depth=1, heads=(2, 2), mlp_mult=2, stages=2,
                           dim_key=8, dim_value=8), STD)
    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    maps, rec, rec_tokens = _run(model, pixels)
    # Stem: four stride-2 convolutions: a 4x4 map of 16 px. The downsampling attention's queries (1x1 conv, stride 2)
    # at the centres of its 2x2 stride cells, the 2x2 grid of 32 px the next stage runs on.
    fine, coarse = grid_centres((4, 4), 16), grid_centres((2, 2), 32)
    expected = [_mad(maps[0], fine, fine), _mad(maps[1], coarse, fine), _mad(maps[2], coarse, coarse)]
    _far_from_uniform(maps[0])
    _compare(rec, rec_tokens, expected, [(4, 4), (2, 2), (2, 2)], [16, 32, 32])


def test_cvt_keys_pooled_by_strided_convolution():
    from vit_pytorch.cvt import CvT

    torch.manual_seed(0)
    model = _sharpen(CvT(num_classes=5, s1_emb_dim=8, s1_depth=1, s2_emb_dim=16, s2_heads=2, s2_depth=1,
                         s3_emb_dim=16, s3_heads=2, s3_depth=1), STD)
    pixels = torch.randn(2, 3, 36, 52, generator=torch.Generator().manual_seed(1))
    maps, rec, rec_tokens = _run(model, pixels)
    # Embeddings: 7x7 stride 4 pad 3 -> 9x13 (4 px); 3x3 stride 2 pad 1 -> 5x7 (8 px), 3x4 (16 px). Keys: 3x3 stride 2
    # pad 1 of each map (5x7, 3x4, 2x2) at the centres of their 2x2 stride cells. Attention [(B heads), Nq, Nk].
    layout = [((9, 13), (5, 7), 4, 1), ((5, 7), (3, 4), 8, 2), ((3, 4), (2, 2), 16, 2)]
    expected = []
    for ((gh, gw), keys, stride, heads), attn in zip(layout, maps):
        expected.append(_mad(attn.view(2, heads, gh * gw, -1), grid_centres((gh, gw), stride),
                             grid_centres(keys, 2 * stride)))
    _far_from_uniform(maps[0])
    _compare(rec, rec_tokens, expected, [g for g, *_ in layout], [s for _, _, s, _ in layout])


def test_keys_made_at_the_queries_own_cells_measure_the_self_mass():
    """CvT with s2_kv_proj_stride=1 and Twins-SVT's last stage with global_k=1 make their keys by a stride-1
    convolution of the map: key i at query i's cell, one per cell, as MViTv2 pooling both alike, so the self mass
    A[t, t] is defined; it was NaN, as beside pooled keys (QA helper-248). Their strided layers stay NaN."""
    from vit_pytorch.cvt import CvT
    from vit_pytorch.twins_svt import TwinsSVT

    torch.manual_seed(0)
    cvt = _sharpen(CvT(num_classes=5, s1_emb_dim=8, s1_depth=1, s2_emb_dim=16, s2_heads=2, s2_depth=1,
                       s2_kv_proj_stride=1, s3_emb_dim=16, s3_heads=2, s3_depth=1), STD)
    twins = _sharpen(TwinsSVT(num_classes=5, **{f"s{i}_{k}": v for i in range(1, 5) for k, v in (
        ("emb_dim", 8), ("patch_size", 2 if i < 4 else 1), ("local_patch_size", 2), ("global_k", 2 if i < 4 else 1),
        ("depth", 1))}), STD)
    pixels = torch.randn(2, 3, 32, 48, generator=torch.Generator().manual_seed(1))
    for model, layer, heads in ((cvt, 1, 2), (twins, -1, 8)):
        maps, rec, _ = _run(model, pixels, stats=["self_mass"])
        attn = maps[layer].double()
        attn = attn.view(2, heads, *attn.shape[-2:])
        assert attn.shape[-1] == attn.shape[-2]
        torch.testing.assert_close(rec.stats["self_mass"][layer].double(), attn.diagonal(dim1=-2, dim2=-1).mean(-1),
                                   rtol=1e-5, atol=1e-7)
    strided = [i for i, g in enumerate(rec.geometry) if "stride 2x2" in g.attention]  # Twins: global_k 2
    assert strided and all(rec.stats["self_mass"][i].isnan().all() for i in strided)


def test_a_model_run_twice_in_one_call_restarts_its_stages_from_the_image():
    """A student CvT then a teacher CvT run twice (EsViT's trainer does so): one call, the teacher's second run placed
    from the image again. Its stage strides went on from the last stage of its first run (64, 128, 256 px instead of
    4, 8, 16: MAD beyond the image's diagonal; the benchmarks' vit-pytorch sweep, helper-157)."""
    from vit_pytorch.cvt import CvT

    class StudentTeacher(torch.nn.Module):
        def __init__(self):
            super().__init__()
            config = dict(num_classes=5, s1_emb_dim=8, s1_depth=1, s2_emb_dim=16, s2_heads=2, s2_depth=1,
                          s3_emb_dim=16, s3_heads=2, s3_depth=1)
            self.student, self.teacher = CvT(**config), CvT(**config)

        def forward(self, x):
            return self.student(x), self.teacher(x), self.teacher(x.flip(-1))

    torch.manual_seed(0)
    model = _sharpen(StudentTeacher(), STD).eval()
    pixels = torch.randn(2, 3, 36, 52, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), vitmad.record(model) as rec:
        model(pixels)
    with torch.no_grad(), vitmad.record(model.teacher) as alone:
        model.teacher(pixels.flip(-1))
    assert len(rec.calls) == 1 and len(rec.layers) == 9
    assert [g.stride[0] for g in rec.geometry] == [4.0, 8.0, 16.0] * 3
    torch.testing.assert_close(rec.mad[6:], alone.mad, rtol=0, atol=0, equal_nan=True)  # NaN: heads a stage lacks


def test_crossvit_branches_and_cross_attention_maps():
    from vit_pytorch.cross_vit import CrossViT

    torch.manual_seed(0)
    model = _sharpen(CrossViT(image_size=48, num_classes=5, sm_dim=16, lg_dim=24, sm_patch_size=4, sm_enc_depth=1,
                              sm_enc_heads=2, sm_enc_mlp_dim=16, sm_enc_dim_head=8, lg_patch_size=8, lg_enc_depth=1,
                              lg_enc_heads=2, lg_enc_mlp_dim=16, lg_enc_dim_head=8, cross_attn_depth=1,
                              cross_attn_heads=2, cross_attn_dim_head=8, depth=1, dropout=0.0, emb_dropout=0.0), STD)
    pixels = torch.randn(2, 3, 32, 48, generator=torch.Generator().manual_seed(1))
    maps, rec, rec_tokens = _run(model, pixels, stats=STATS)
    # Small branch: CLS + 8x12 patches of 4 px; large: CLS + 4x6 of 8 px. Then the small CLS over [itself, the large
    # patches], the large CLS over [itself, the small patches].
    small, large = _with_class_token(grid_centres((8, 12), 4)), _with_class_token(grid_centres((4, 6), 8))
    assert rec.layers == ["multi_scale_encoder.layers.0.0.layers.0.0", "multi_scale_encoder.layers.0.1.layers.0.0"]
    _far_from_uniform(maps[0])
    _check_prefix_stats(rec, rec_tokens, maps[:2], [small, large])
    cross = rec.class_attention_maps
    names = ["multi_scale_encoder.layers.0.2.layers.0.0.fn", "multi_scale_encoder.layers.0.2.layers.0.1.fn"]
    assert list(cross) == names and set(rec.skipped) == set(names)
    torch.testing.assert_close(cross[names[0]].double(), maps[2][..., 1:], **STAT_TOL)  # [B, H, 1, 24]
    torch.testing.assert_close(cross[names[1]].double(), maps[3][..., 1:], **STAT_TOL)  # [B, H, 1, 96]
    assert [g.grid for g in rec.calls[-1].class_geometry] == [(4, 6), (8, 12)]


def test_nest_blocks_of_each_level():
    from vit_pytorch.nest import NesT

    torch.manual_seed(0)
    model = _sharpen(NesT(image_size=48, patch_size=4, num_classes=5, dim=8, heads=1, num_hierarchies=3,
                          block_repeats=(1, 1, 1), dim_head=8), STD)
    pixels = torch.randn(2, 3, 32, 48, generator=torch.Generator().manual_seed(1))
    maps, rec, rec_tokens = _run(model, pixels)
    # Level maps 8x12 (4 px), 4x6 (8 px), 2x3 (16 px), cut into 4x4, 2x2, 1x1 blocks ('b c (b1 h) (b2 w) ->
    # (b b1 b2) c h w'): block (b1, b2) holds (b1 * h + i, b2 * w + j); attention [(B blocks), heads, h * w, h * w].
    expected, layout = [], [((8, 12), 4, 4), ((4, 6), 8, 2), ((2, 3), 16, 1)]
    for ((gh, gw), stride, blocks), attn in zip(layout, maps):
        h, w = gh // blocks, gw // blocks
        b1, b2, i, j = torch.meshgrid(torch.arange(blocks), torch.arange(blocks), torch.arange(h), torch.arange(w),
                                      indexing="ij")
        cells = torch.stack([b1 * h + i, b2 * w + j], -1).reshape(blocks * blocks, h * w, 2)
        heads = attn.shape[1]
        expected.append(_windows_reference(attn.view(2, blocks * blocks, heads, h * w, h * w), cells, (gh, gw),
                                           stride))
    _far_from_uniform(maps[0])
    _compare(rec, rec_tokens, expected, [g for g, *_ in layout], [s for _, s, _ in layout])


def test_cct_convolutional_tokenizer_grid():
    from vit_pytorch.cct import CCT

    torch.manual_seed(0)
    model = _sharpen(CCT(img_size=(30, 44), embedding_dim=16, n_conv_layers=2, kernel_size=3, stride=1, padding=1,
                         num_layers=2, num_heads=2, mlp_ratio=1, num_classes=5, positional_embedding="learnable"), STD)
    pixels = torch.randn(2, 3, 30, 44, generator=torch.Generator().manual_seed(1))
    maps, rec, rec_tokens = _run(model, pixels, stats=STATS)
    # Two (3x3 conv stride 1, 3x3 max pool stride 2 pad 1): 30x44 -> 15x22 -> 8x11, 4 px stride cells; no class
    # token (CCT pools the sequence after its encoder).
    centres = grid_centres((8, 11), 4)
    assert len(maps) == 2  # the sequence pooling's softmax is over [B, N]: not attention
    _far_from_uniform(maps[0])
    _check_prefix_stats(rec, rec_tokens, maps, [centres, centres])
    assert [g.grid for g in rec.geometry] == [(8, 11)] * 2 and rec.prefix_maps == [None, None]


@pytest.mark.parametrize("size", [(32, 32), (28, 36)])
def test_t2t_soft_splits_and_final_grid(size):
    from vit_pytorch.t2t import T2TViT

    torch.manual_seed(0)
    model = _sharpen(T2TViT(image_size=40, num_classes=5, dim=16, depth=1, heads=2, mlp_dim=16, dim_head=8,
                            t2t_layers=((7, 4), (3, 2))), STD)
    pixels = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1))
    maps, rec, rec_tokens = _run(model, pixels, stats=STATS)
    # Unfold(7, stride 4, pad 2): (n + 4 - 7) // 4 + 1 a side, 4 px cells; RearrangeImage folds them back (rows
    # int(sqrt(n))); Unfold(3, stride 2, pad 1): 8 px cells; then CLS + that grid.
    first = ((size[0] - 3) // 4 + 1, (size[1] - 3) // 4 + 1)
    second = ((first[0] - 1) // 2 + 1, (first[1] - 1) // 2 + 1)
    positions = [grid_centres(first, 4), _with_class_token(grid_centres(second, 8))]
    assert rec.layers == ["to_patch_embedding.3.layers.0.0", "transformer.layers.0.0"]
    for layer, (probabilities, at) in enumerate(zip(maps, positions)):
        _far_from_uniform(probabilities)
        torch.testing.assert_close(rec_tokens.per_layer[layer].double(), statistics_reference(probabilities, at)["mad"],
                                   **TOL)
    assert [g.grid for g in rec.geometry] == [first, second]
    torch.testing.assert_close(rec.prefix_maps[1].double(), statistics_reference(maps[1], positions[1])["prefix_maps"],
                               **STAT_TOL)


@pytest.mark.parametrize("window", [2, None])
def test_scalable_vit_pooled_keys_and_windows(window):
    from vit_pytorch.scalable_vit import ScalableViT

    torch.manual_seed(0)
    model = _sharpen(ScalableViT(num_classes=5, dim=8, depth=(1, 1), heads=2, reduction_factor=(2, 1),
                                 window_size=window, iwsa_dim_key=8, iwsa_dim_value=8, ssa_dim_key=8,
                                 ssa_dim_value=8), 2 * STD)
    pixels = torch.randn(2, 3, 30, 46, generator=torch.Generator().manual_seed(1))
    maps, rec, rec_tokens = _run(model, pixels)
    # to_patches 7x7 stride 4 pad 3: 8x12 (4 px); Downsample 3x3 stride 2 pad 1: 4x6 (8 px). SSA keys: a 2x2 conv of
    # stride 2 (4x6 at 8 px), then 1x1 (the map itself). IWSA: 'b (h d) (x w1) (y w2) -> (b x y) h (w1 w2) d'.
    expected = []
    for (gh, gw), stride, reduction, attn_ssa, attn_iwsa in zip([(8, 12), (4, 6)], [4, 8], [2, 1], maps[0::2],
                                                                  maps[1::2]):
        keys = grid_centres((gh // reduction, gw // reduction), stride * reduction)
        expected.append(_mad(attn_ssa, grid_centres((gh, gw), stride), keys))
        wh, ww = (gh, gw) if window is None else (window, window)
        x, y, w1, w2 = torch.meshgrid(torch.arange(gh // wh), torch.arange(gw // ww), torch.arange(wh),
                                      torch.arange(ww), indexing="ij")
        cells = torch.stack([x * wh + w1, y * ww + w2], -1).reshape(-1, wh * ww, 2)
        expected.append(_windows_reference(attn_iwsa.view(2, -1, 2, wh * ww, wh * ww), cells, (gh, gw), stride))
    _far_from_uniform(maps[0])
    _far_from_uniform(maps[1])
    _compare(rec, rec_tokens, expected, [(8, 12)] * 2 + [(4, 6)] * 2, [4, 4, 8, 8])


def test_crossformer_short_and_long_distance_windows():
    from vit_pytorch.crossformer import CrossFormer

    torch.manual_seed(0)
    model = _sharpen(CrossFormer(dim=(32, 32, 32, 32), depth=(1, 1, 1, 1), global_window_size=(2, 2, 2, 2),
                                 local_window_size=2, cross_embed_kernel_sizes=((4, 8), (2, 4), (2, 4), (2, 4)),
                                 num_classes=5), STD)
    pixels = torch.randn(2, 3, 64, 128, generator=torch.Generator().manual_seed(1))
    maps, rec, rec_tokens = _run(model, pixels)
    # CrossEmbedLayer strides 4, 2, 2, 2: maps 16x32 (4 px), 8x16, 4x8, 2x4. Short: 'b d (h s1) (w s2) -> (b h w) d s1
    # s2'; long: 'b d (l1 h) (l2 w) -> (b h w) d l1 l2' (token (l1, l2) of window (h, w) at (l1 * H / 2 + h, ...)).
    expected, grids, strides = [], [], []
    for stage, (gh, gw) in enumerate([(16, 32), (8, 16), (4, 8), (2, 4)]):
        h, w, i, j = torch.meshgrid(torch.arange(gh // 2), torch.arange(gw // 2), torch.arange(2), torch.arange(2),
                                    indexing="ij")
        for cells in (torch.stack([h * 2 + i, w * 2 + j], -1), torch.stack([i * (gh // 2) + h, j * (gw // 2) + w], -1)):
            attn = maps[len(expected)]
            expected.append(_windows_reference(attn.view(2, -1, attn.shape[1], 4, 4), cells.reshape(-1, 4, 2),
                                               (gh, gw), 4 * 2 ** stage))
            grids.append((gh, gw))
            strides.append(4 * 2 ** stage)
    _far_from_uniform(maps[0])
    _far_from_uniform(maps[1])
    _compare(rec, rec_tokens, expected, grids, strides)
