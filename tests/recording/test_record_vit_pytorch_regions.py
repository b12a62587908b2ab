"""lucidrains' vit-pytorch: RegionViT and SepViT, whose windows are each led by a token of no cell of the map,
against the probabilities of each model's own softmax (every softmax over the last dim of a rank >= 3 tensor, in call
order), their tokens placed by the geometry written here from reading vit_pytorch's source:

- RegionViT (``regionvit.py``): ``local_encoder`` (a convolution 8 / 4 / 3, or three convolutions of strides 2, 2, 1)
  makes the local map at 4 px, ``region_encoder`` (``b c (h p1) (w p2) -> b (c p1 p2) h w``, p = local_patch_size *
  window_size, then a 1x1 convolution) the regional map at p px; each later stage's ``Downsample`` (3x3, stride 2,
  padding 1: ``ceil(n / 2)`` cells) halves both. ``R2LTransformer.forward``, per layer: ``attn(region_tokens)`` over
  the regional map row-major (R2R), then ``local_tokens`` cut by ``b (h p1) (w p2) d -> (b h w) (p1 p2) d`` with
  ``p = local / regional`` cells, each window's regional token concatenated FIRST, ``attn(...)`` over ``[(B rh rw), H,
  1 + p1 p2, ...]`` (R2L). The regional token has no position in its window (a class token of the window).
- SepViT (``sep_vit.py``): ``OverlappingPatchEmbed`` convolutions of stride 4, 2, 2, 2 make each stage's map. ``DSSA``
  cuts ``b c (h w1) (w w2) -> (b h w) c (w1 w2)`` with its ``window_size`` (SepViT builds each with 7, whatever it is
  given: set per DSSA here), the window token FIRST, softmax over ``[(B nW), H, 1 + w^2, ...]`` (depthwise); then,
  with more than one window, a softmax over the window tokens ``[B, H, nW, nW]``, windows ``(x y)`` row-major
  (pointwise), which moves window ``j``'s map into window ``i`` at the same offset: window tokens at the windows'
  centres, ``(x + 0.5) * w * stride``.

Cell ``(r, c)`` of a map of stride ``s`` is at ``((r + 0.5) s, (c + 0.5) s)`` px. MAD sums over the keys with a
position (not renormalised); entropy is the whole row's; prefix mass the leading token's share; the prefix maps the
leading token's row of each window over its window's cells, on the map.
"""

from __future__ import annotations

import math

import pytest
import torch

vit_pytorch = pytest.importorskip("vit_pytorch")

from test_record_vit_pytorch_stages import _sharpen as _sharpen_layers  # noqa: E402
from test_record_vit_pytorch_stages import _Softmaxes  # noqa: E402

import vitmad  # noqa: E402

TOL = {"rtol": 1e-5, "atol": 1e-4}  # MAD in pixels: float32 probabilities, float64 reference
STAT_TOL = {"rtol": 1e-5, "atol": 1e-6}
STATS = ["entropy", "prefix_mass", "prefix_maps"]


def _sharpen(model: torch.nn.Module, std: float) -> torch.nn.Module:
    return _sharpen_layers(model, std, layers=(torch.nn.Linear, torch.nn.Conv1d))  # their projections: Linear, Conv1d


def _run(model, pixels):
    """(maps, recording, per-token recording) with the statistics: the softmaxes of a plain forward, and two
    recordings whose output is the plain forward's, bit for bit."""
    with torch.no_grad():
        capture = _Softmaxes()
        with capture:
            plain = model(pixels)
        with vitmad.record(model, stats=STATS) as rec:
            recorded = model(pixels)
        with vitmad.record(model, stats=STATS, reduction="none") as rec_tokens:
            model(pixels)
    assert torch.equal(plain, recorded)
    return capture.maps, rec, rec_tokens


def _far_from_uniform(probabilities: torch.Tensor) -> None:
    entropy = -torch.special.xlogy(probabilities, probabilities).sum(-1).mean()
    assert float(entropy) < 0.75 * math.log(probabilities.shape[-1])


def _centres(grid: tuple[int, int], stride: float) -> torch.Tensor:
    rows, cols = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
    return (torch.stack([rows, cols], -1).reshape(-1, 2).double() + 0.5) * stride


def _global(attn: torch.Tensor, grid: tuple[int, int], stride: float) -> dict:
    """Statistics ``[B, H, T]`` of ``[B, H, T, T]`` attention over a row-major grid."""
    positions = _centres(grid, stride)
    return {"mad": (attn * torch.cdist(positions, positions)).sum(-1),
            "entropy": -torch.special.xlogy(attn, attn).sum(-1),
            "prefix_mass": torch.zeros(attn.shape[:-1], dtype=torch.float64), "maps": None}


def _led_windows(attn: torch.Tensor, grid: tuple[int, int], window: tuple[int, int], stride: float) -> dict:
    """Statistics on the map ``[B, H, T]`` (maps ``[B, H, 1, T]``) of ``[B * nW, H, 1 + n, 1 + n]`` attention within
    ``window`` blocks of the ``grid`` map, windows row-major in the batch, each led by a token without a position:
    token ``(i, j)`` of window ``(a, b)`` at cell ``(a * wh + i, b * ww + j)``."""
    (gh, gw), (wh, ww) = grid, window
    windows, size = (gh // wh) * (gw // ww), wh * ww
    attn = attn.view(-1, windows, attn.shape[1], 1 + size, 1 + size)
    a, b, i, j = torch.meshgrid(torch.arange(gh // wh), torch.arange(gw // ww), torch.arange(wh), torch.arange(ww),
                                indexing="ij")
    cells = torch.stack([a * wh + i, b * ww + j], -1).reshape(windows, size, 2)
    positions = (cells.double() + 0.5) * stride  # [nW, n, 2]
    distance = torch.cdist(positions, positions)[None, :, None]  # [1, nW, 1, n, n]
    per_window = {"mad": (attn[..., 1:, 1:] * distance).sum(-1),
                  "entropy": -torch.special.xlogy(attn, attn).sum(-1)[..., 1:],
                  "prefix_mass": attn[..., 1:, 0],
                  "maps": attn[..., 0, 1:]}  # each [B, nW, H, n]
    index = (cells[..., 0] * gw + cells[..., 1]).reshape(-1)
    out = {}
    for name, values in per_window.items():
        on_map = torch.full((values.shape[0], values.shape[2], gh * gw), math.nan, dtype=torch.float64)
        on_map[:, :, index] = values.permute(0, 2, 1, 3).reshape(values.shape[0], values.shape[2], -1)
        assert not on_map.isnan().any()
        out[name] = on_map.unsqueeze(2) if name == "maps" else on_map
    return out


def _compare(rec, rec_tokens, expected: list[tuple[dict, tuple, float]]) -> None:
    assert len(rec.layers) == len(expected)
    for layer, (reference, grid, stride) in enumerate(expected):
        geometry = rec.geometry[layer]
        assert geometry.grid == tuple(grid) and geometry.stride == (float(stride),) * 2, (layer, geometry)
        torch.testing.assert_close(rec_tokens.per_layer[layer].double(), reference["mad"], **TOL)
        torch.testing.assert_close(rec.per_layer[layer].double(), reference["mad"].mean(-1), **TOL)
        for stat in ("entropy", "prefix_mass"):
            torch.testing.assert_close(rec_tokens.calls[-1].statistics[stat][layer].double(), reference[stat],
                                       **STAT_TOL)
        if reference["maps"] is None:
            assert rec_tokens.prefix_maps[layer] is None
        else:
            torch.testing.assert_close(rec_tokens.prefix_maps[layer].double(), reference["maps"], **STAT_TOL)


def _halved(grid: tuple[int, int]) -> tuple[int, int]:
    return (-(-grid[0] // 2), -(-grid[1] // 2))  # Downsample: 3x3, stride 2, padding 1


# (window_size, tokenize_local_3_conv, image): 64x128 halves evenly (windows 2x2 in every stage); 96x48 with windows
# of 3 leaves a 3x2 local map over a 1x1 regional one in the last stage (windows 3x2).
REGION_CASES = {"windows_2": (2, False, (64, 128)), "windows_3_three_convs": (3, True, (96, 48))}


@pytest.mark.parametrize("case", list(REGION_CASES))
def test_regionvit_regional_and_local_attention(case):
    from vit_pytorch.regionvit import RegionViT

    window, three_convs, size = REGION_CASES[case]
    model = _sharpen(RegionViT(dim=(16, 16, 16, 16), depth=(1, 2, 1, 1), window_size=window, num_classes=3,
                               local_patch_size=4, tokenize_local_3_conv=three_convs), 0.5)
    pixels = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1))
    maps, rec, rec_tokens = _run(model, pixels)
    region_patch = 4 * window
    local, region = (size[0] // 4, size[1] // 4), (size[0] // region_patch, size[1] // region_patch)
    expected, names = [], []
    for stage, depth in enumerate((1, 2, 1, 1)):
        if stage:
            local, region = _halved(local), _halved(region)
        cells = (local[0] // region[0], local[1] // region[1])
        for layer in range(depth):
            r2r, r2l = maps[len(expected)], maps[len(expected) + 1]
            assert r2r.shape[0] == 2 and r2l.shape[0] == 2 * region[0] * region[1]
            expected.append((_global(r2r, region, region_patch * 2 ** stage), region, region_patch * 2 ** stage))
            expected.append((_led_windows(r2l, local, cells, 4 * 2 ** stage), local, 4 * 2 ** stage))
            names += [f"layers.{stage}.2.layers.{layer}.0"] * 2
    assert len(maps) == len(expected) and rec.layers == names
    _far_from_uniform(maps[0])
    _far_from_uniform(maps[1])
    _compare(rec, rec_tokens, expected)
    assert [g.attention for g in rec.geometry][-2:] == [
        "regional tokens (R2R)", f"window {cells[0]}x{cells[1]} after its regional token (R2L)"]


def test_sepvit_depthwise_and_pointwise_attention():
    from vit_pytorch.sep_vit import SepViT

    model = SepViT(num_classes=3, dim=16, depth=(1, 1, 1, 1), heads=(2, 1, 1, 1), dim_head=8)
    sizes = (4, 3, 3, 3)  # each DSSA's window (SepViT's own are all 7)
    for (_, _, transformer), window in zip(model.layers, sizes):
        for dssa, _ in transformer.layers:
            dssa.window_size = window
    model = _sharpen(model, 0.5)
    pixels = torch.randn(2, 3, 96, 192, generator=torch.Generator().manual_seed(1))
    maps, rec, rec_tokens = _run(model, pixels)
    expected, grid = [], (24, 48)  # the stride-4 embedding's map, then halved per stage
    for stage, window in enumerate(sizes):
        if stage:
            grid = (grid[0] // 2, grid[1] // 2)
        stride = 4 * 2 ** stage
        depthwise, pointwise = maps[len(expected)], maps[len(expected) + 1]
        windows = (grid[0] // window, grid[1] // window)
        expected.append((_led_windows(depthwise, grid, (window, window), stride), grid, stride))
        expected.append((_global(pointwise, windows, stride * window), windows, stride * window))
    assert len(maps) == len(expected)
    assert rec.layers == [f"layers.{s}.2.layers.0.0.{part}" for s in range(4) for part in ("attend", "window_attend")]
    for probabilities in maps[:2]:
        _far_from_uniform(probabilities)
    _compare(rec, rec_tokens, expected)


def test_sepvit_with_one_window_skips_the_pointwise_attention():
    from vit_pytorch.sep_vit import SepViT

    model = _sharpen(SepViT(num_classes=3, dim=8, depth=(1, 1), heads=(1, 1), dim_head=8), 0.5)
    pixels = torch.randn(1, 3, 56, 112, generator=torch.Generator().manual_seed(2))
    maps, rec, rec_tokens = _run(model, pixels)  # maps 14x28 (2x4 windows of 7x7), then 7x14 (1x2)
    assert rec.layers == ["layers.0.2.layers.0.0.attend", "layers.0.2.layers.0.0.window_attend",
                          "layers.1.2.layers.0.0.attend", "layers.1.2.layers.0.0.window_attend"]
    model.layers[1][2].layers[0][0].window_size = 4  # a window size changed on the model is read in each call
    pixels = torch.randn(1, 3, 28, 28, generator=torch.Generator().manual_seed(2))
    maps, rec, rec_tokens = _run(model, pixels)  # maps 7x7 and 4x4, one window each: no pointwise attention
    assert len(maps) == 2 and rec.layers == ["layers.0.2.layers.0.0.attend", "layers.1.2.layers.0.0.attend"]
    _compare(rec, rec_tokens, [(_led_windows(maps[0], (7, 7), (7, 7), 4), (7, 7), 4),
                               (_led_windows(maps[1], (4, 4), (4, 4), 8), (4, 4), 8)])


def test_refused_designs_are_named():
    from vit_pytorch.regionvit import Attention
    from vit_pytorch.sep_vit import DSSA

    # A DSSA or RegionViT attention alone: the stride of the map it attends over is not known.
    attention = DSSA(dim=16, heads=2, dim_head=8, window_size=2).eval()
    with pytest.raises(ValueError, match=r"attend \(Sequential\) of DSSA: it is SepViT's depthwise-separable "
                                         r"self-attention \(DSSA\) outside a SepViT"), torch.no_grad():
        with vitmad.record(attention):
            attention(torch.randn(1, 16, 4, 4))
    attention = Attention(dim=16, heads=2, dim_head=8).eval()
    with pytest.raises(ValueError, match="RegionViT's attention outside a RegionViT's R2LTransformer"), \
            torch.no_grad():
        with vitmad.record(attention):
            attention(torch.randn(1, 5, 16))


def test_profile_takes_regionvit_with_its_two_calls_per_layer():
    """vitmad.profile on RegionViT: per entry (R2R, then R2L, under one name) and head, the MAD over the images and
    their tokens, from the model's own attention."""
    from vit_pytorch.regionvit import RegionViT

    model = _sharpen(RegionViT(dim=(16, 16, 16, 16), depth=(1, 1, 1, 1), window_size=2, num_classes=3,
                               local_patch_size=4), 0.5)
    pixels = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    prof = vitmad.profile(model, pixels, batch_size=3, device="cpu")
    capture = _Softmaxes()
    with torch.no_grad(), capture:
        model(pixels)
    expected, local, region = [], (16, 16), (8, 8)
    for stage in range(4):
        if stage:
            local, region = _halved(local), _halved(region)
        r2r, r2l = capture.maps[2 * stage], capture.maps[2 * stage + 1]
        expected.append(_global(r2r, region, 8 * 2 ** stage)["mad"].mean((0, 2)))
        expected.append(_led_windows(r2l, local, (2, 2), 4 * 2 ** stage)["mad"].mean((0, 2)))
    torch.testing.assert_close(prof.mad.double(), torch.stack(expected), **TOL)
