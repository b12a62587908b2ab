"""vitmad.record on torchvision's video Swin Transformer (``SwinTransformer3d``: swin3d_t, swin3d_s, swin3d_b).

Tiny random-weight models, sharpened so that attention is far from uniform. The reference is the model's own
attention probabilities (every ``F.softmax`` output of rank 4, in call order: ``shifted_window_attention_3d``
computes its softmax itself), placed by geometry written here from torchvision's source: ``PatchEmbed3d`` pads the
video to whole ``(2, 4, 4)`` patches; each layer's map, window and shift are listed in a table per case (the window
shrunk to the map and the shift dropped along an axis the map does not exceed); the (frame, row, column) of every
cell of the map padded at the end of each axis to whole windows is rolled by ``-shift`` and cut into windows exactly
as ``shifted_window_attention_3d`` rolls and views its input; a padding slot is a key at its padded cell and no
query. Spatial centres ``(index + 0.5) * stride`` px (the patch's 4 px times 2 per merging), temporal centres
``(frame + 0.5) * 2`` frames; every statistic is computed here in float64 and put back at its token, (frame, row,
column) order.
"""

from __future__ import annotations

import math

import pytest
import torch

import vitmad
from conftest import SoftmaxOutputs, sharpened

video_swin = pytest.importorskip("torchvision.models.video.swin_transformer")

TOL = {"rtol": 1e-5, "atol": 1e-4}  # float32 probabilities and accumulation; atol in pixels or frames
STAT_TOL = {"rtol": 1e-5, "atol": 1e-5}
BATCH, FRAMES, HEIGHT, WIDTH = 2, 5, 30, 38  # a 3 x 8 x 10 tubelet map: padded to whole patches on every axis
TUBELET, PATCH = 2, 4
STATS = ["entropy", "prefix_mass", "self_mass", "prefix_maps"]

# Per layer: (map t x h x w, window, shift, pixel stride). Blocks alternate unshifted and shifted by half the window;
# one 2x2 patch merging between stages halves h and w (odd sizes padded by one first), and keeps the frames.
CASES = {
    # Windows 2x3x3 on 3x8x10 (padded to 4x9x12), 3x4x5 (4x6x6), and 3x2x3, where the window shrinks to the map's
    # rows and columns (no shift along them) and stays 2 frames, shifted by 1 and padded to 4 frames.
    "small_windows": ([2, 3, 3], [1, 2, 2], [
        ((3, 8, 10), (2, 3, 3), (0, 0, 0), 4.0), ((3, 8, 10), (2, 3, 3), (1, 1, 1), 4.0),
        ((3, 4, 5), (2, 3, 3), (0, 0, 0), 8.0), ((3, 4, 5), (2, 3, 3), (1, 1, 1), 8.0),
        ((3, 2, 3), (2, 2, 3), (0, 0, 0), 16.0), ((3, 2, 3), (2, 2, 3), (1, 0, 0), 16.0)]),
    # The released models' 8x7x7 windows: 3 frames shrink the window to the map's frames (no shift in time); 8x10 is
    # padded to 14x14 and shifted by 3; 4x5 and 2x3 are one window each, unshifted and unpadded.
    "released_windows": ([8, 7, 7], [2, 2, 2], [
        ((3, 8, 10), (3, 7, 7), (0, 0, 0), 4.0), ((3, 8, 10), (3, 7, 7), (0, 3, 3), 4.0),
        ((3, 4, 5), (3, 4, 5), (0, 0, 0), 8.0), ((3, 4, 5), (3, 4, 5), (0, 0, 0), 8.0),
        ((3, 2, 3), (3, 2, 3), (0, 0, 0), 16.0), ((3, 2, 3), (3, 2, 3), (0, 0, 0), 16.0)]),
}


def _model(window, heads, **kwargs):
    torch.manual_seed(0)
    model = video_swin.SwinTransformer3d(patch_size=[TUBELET, PATCH, PATCH], embed_dim=16, depths=[2, 2, 2],
                                         num_heads=heads, window_size=window, stochastic_depth_prob=0.0,
                                         num_classes=5, **kwargs)
    model = sharpened(model)
    with torch.no_grad():  # std 0.25 gives near-uniform windows of 16-wide heads: q and k 2.5x larger
        for module in model.modules():
            if isinstance(module, video_swin.ShiftedWindowAttention3d):
                module.qkv.weight.mul_(2.5)
    return model


def _video(seed: int = 1) -> torch.Tensor:
    return torch.randn(BATCH, 3, FRAMES, HEIGHT, WIDTH, generator=torch.Generator().manual_seed(seed))


def _slots(size, window, shift):
    """``[nW, N, 3]`` (frame, row, column) on the padded map of every slot of every window, and ``[nW, N]`` whether
    the slot is a token of the map (not padding): as shifted_window_attention_3d pads, rolls and partitions."""
    padded = [math.ceil(n / w) * w for n, w in zip(size, window)]
    cells = torch.stack(torch.meshgrid(*(torch.arange(p) for p in padded), indexing="ij"), dim=-1)  # [tp, hp, wp, 3]
    if sum(shift) > 0:
        cells = torch.roll(cells, shifts=(-shift[0], -shift[1], -shift[2]), dims=(0, 1, 2))
    cells = cells.view(padded[0] // window[0], window[0], padded[1] // window[1], window[1],
                       padded[2] // window[2], window[2], 3)
    cells = cells.permute(0, 2, 4, 1, 3, 5, 6).reshape(-1, window[0] * window[1] * window[2], 3)
    real = (cells < torch.tensor(size)).all(-1)
    return cells, real


def _reference(probabilities, size, window, shift, stride) -> dict[str, torch.Tensor]:
    """Per statistic, ``[B, heads, t * h * w]`` per token in (frame, row, column) order, from one call's
    probabilities ``[B * nW, heads, N, N]``."""
    cells, real = _slots(size, window, shift)
    windows, slots = real.shape
    heads = probabilities.shape[1]
    attn = probabilities.double().view(BATCH, windows, heads, slots, slots)
    pixels = (cells[..., 1:].double() + 0.5) * stride  # [nW, N, 2]
    frames = (cells[..., :1].double() + 0.5) * TUBELET  # [nW, N, 1]
    per_slot = {
        "mad": (attn * torch.cdist(pixels, pixels)[None, :, None]).sum(-1),
        "temporal": (attn * torch.cdist(frames, frames)[None, :, None]).sum(-1),
        "entropy": -torch.special.xlogy(attn, attn).sum(-1),
        "self_mass": attn.diagonal(dim1=-2, dim2=-1),  # a slot's own key is the same slot
        "prefix_mass": torch.zeros(attn.shape[:-1], dtype=torch.float64),  # every key has a cell
    }
    token = (cells[..., 0] * size[1] + cells[..., 1]) * size[2] + cells[..., 2]  # [nW, N]
    out = {}
    for name, values in per_slot.items():
        placed = torch.full((BATCH, heads, size[0] * size[1] * size[2]), float("nan"), dtype=torch.float64)
        placed[:, :, token[real]] = values.permute(0, 2, 1, 3)[:, :, real]
        out[name] = placed
    assert not out["mad"].isnan().any()  # every token is the query of exactly one slot
    return out


def _record(model, video):
    """(mean recording, per-token recording, the model's softmax outputs); the output unchanged, bit for bit."""
    with torch.no_grad():
        with SoftmaxOutputs(rank=4) as seen:
            plain = model(video)
        with vitmad.record(model, stats=STATS) as rec:
            recorded = model(video)
        with vitmad.record(model, stats=STATS, reduction="none") as rec_tokens:
            model(video)
    assert torch.equal(plain, recorded)
    return rec, rec_tokens, seen.maps


@pytest.mark.parametrize("case", list(CASES))
def test_swin3d_equals_the_statistics_of_its_own_windows(case):
    window, heads, table = CASES[case]
    model = _model(window, heads)
    rec, rec_tokens, maps = _record(model, _video())
    names = [f"features.{stage}.{block}.attn" for stage in (0, 2, 4) for block in (0, 1)]
    assert rec.layers == rec_tokens.layers == names and rec.skipped == {}
    assert len(maps) == len(table)
    tokens = rec_tokens.calls[-1]
    for layer, (probabilities, (size, win, shift, stride)) in enumerate(zip(maps, table, strict=True)):
        geometry = rec.geometry[layer]
        assert (geometry.frames, *geometry.grid) == size and geometry.stride == (stride, stride)
        assert geometry.frame_stride == TUBELET and geometry.heads == probabilities.shape[1]
        assert geometry.attention.startswith(f"window {win[0]}x{win[1]}x{win[2]}")
        assert ("shift" in geometry.attention) == any(shift)
        expected = _reference(probabilities, size, win, shift, stride)
        # Far from uniform attention over the window: a token at a wrong cell would change the values.
        assert float(expected["entropy"].mean()) < 0.75 * math.log(probabilities.shape[-1])
        torch.testing.assert_close(tokens.per_layer[layer].double(), expected["mad"], **TOL)
        torch.testing.assert_close(tokens.temporal[layer].double(), expected["temporal"], **TOL)
        torch.testing.assert_close(rec.per_layer[layer].double(), expected["mad"].mean(-1), **TOL)
        torch.testing.assert_close(rec.calls[-1].temporal[layer].double(), expected["temporal"].mean(-1), **TOL)
        for stat in ("entropy", "prefix_mass", "self_mass"):
            torch.testing.assert_close(tokens.statistics[stat][layer].double(), expected[stat], **STAT_TOL)
            torch.testing.assert_close(rec.stats[stat][layer][:, :geometry.heads].double(), expected[stat].mean(-1),
                                       **STAT_TOL)
        # Every token has a position, so no token has a map (as in a 2-D Swin).
        assert rec.prefix_maps[layer] is None
    # [L, B, largest head count]: the single-head first stage padded with NaN heads.
    assert rec.temporal_mad.shape == rec.mad.shape == (len(table), BATCH, max(heads))


def test_swin3d_temporal_mad_is_zero_in_one_frame_and_follows_the_tubelet():
    # One tubelet in time (2 frames): every query and key at frame 1, so the temporal MAD is 0, measured.
    model = _model([2, 3, 3], [1, 2, 2])
    with torch.no_grad(), vitmad.record(model) as rec:
        model(_video()[:, :, :2])
    assert [g.frames for g in rec.geometry] == [1] * 6
    measured = ~rec.mad.isnan()  # the single-head first stage's second head is NaN
    assert torch.equal(rec.temporal_mad.isnan(), ~measured)
    assert (rec.temporal_mad[measured] == 0).all() and (rec.mad[measured] > 0).all()


def test_swin3d_follows_the_video_size_in_each_forward():
    model = _model([2, 3, 3], [1, 2, 2])
    other = torch.randn(BATCH, 3, 8, 16, 24, generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), vitmad.record(model) as both:
        model(other)
        model(_video())
    with torch.no_grad(), vitmad.record(model) as alone:
        model(_video())
    assert [(g.frames, *g.grid) for g in both.calls[0].geometry] == [(4, 4, 6)] * 2 + [(4, 2, 3)] * 2 + [(4, 1, 2)] * 2
    for first, second in zip(both.calls[1].per_layer, alone.per_layer, strict=True):
        torch.testing.assert_close(first, second)
    torch.testing.assert_close(both.calls[1].temporal_mad, alone.temporal_mad, equal_nan=True)


def test_swin3d_refuses_its_attention_called_after_the_forward():
    model = _model([2, 3, 3], [1, 2, 2])
    with torch.no_grad(), vitmad.record(model) as rec:
        model(_video())  # the tubelets of this forward are not taken for a later call
        with pytest.raises(ValueError,
                           match=r"features\.0\.0\.attn .*without a forward of patch_embed \(PatchEmbed3d\)"):
            model.features[0][0].attn(torch.randn(BATCH, 3, 8, 10, 16))
    assert len(rec.layers) == 6


class _OtherMerging(video_swin.PatchMerging):
    """A downsampling layer vitmad does not know (the same 2x2 merging, another class)."""


class _OtherEmbedding(video_swin.PatchEmbed3d):
    """A patch embedding vitmad does not know (the same one, another class)."""


def test_swin3d_refuses_a_downsampling_it_does_not_know():
    model = _model([2, 3, 3], [1, 2, 2], downsample_layer=_OtherMerging)
    with torch.no_grad(), vitmad.record(model):
        with pytest.raises(ValueError, match=r"features\.2\.0\.attn .*map of 3x4x5 tubelets.*3x8x10 map of "
                                             r"patch_embed with no patch merging before this block; .*a "
                                             r"downsampling other than torchvision's PatchMerging"):
            model(_video())


def test_swin3d_refuses_a_patch_embedding_it_does_not_know():
    model = _model([2, 3, 3], [1, 2, 2], patch_embed=_OtherEmbedding)
    with torch.no_grad(), vitmad.record(model):
        with pytest.raises(ValueError, match=r"features\.0\.0\.attn .*patch_embed \(_OtherEmbedding\), not "
                                             "torchvision's PatchEmbed3d"):
            model(_video())
