"""The temporal MAD of a video's tokens ("temporal_mad" with ``times``), computed in the same online-softmax pass as
the spatial MAD by vitmad::stats_qk_pos, and from stored attention by ``vitmad.attention_stats``.

The reference here is written in the test, in float64 NumPy, from the definition (docs/definition.md, video):
softmax(q k^T * scale + bias) over every key, then per query with a position the attention-weighted distance
|t_q - t_k| over the keys with a position (divided by their mass with renormalize), NaN for a query without one,
the mean over those with one. Inputs are rounded to the tested dtype first, so only accumulation error remains.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import vitmad
from conftest import make_bias, make_qk, tolerance
from vitmad.ops import fallback as _fallback
from vitmad.ops.reference import attention_stats_qk_reference, attention_stats_reference

OP = "vitmad.attention_stats_qk"
NAN = float("nan")

pytestmark = pytest.mark.skipif(not vitmad.has_compiled_kernel("stats_qk_pos", "CPU"),
                                reason="the compiled CPU kernels of stats_qk_pos are not built")


def video_tokens(frames, rows, cols, *, prefix=0, tubelet=2, patch=16):
    """Positions [N, 2] (pixel centres) and times [N, 1] (the tubelet's centre frame) of a frames x rows x cols
    grid of tubelets after `prefix` tokens without either, token order frame-major then row-major."""
    t, r, c = np.meshgrid(np.arange(frames), np.arange(rows), np.arange(cols), indexing="ij")
    pos = np.stack([(r.ravel() + 0.5) * patch, (c.ravel() + 0.5) * patch], -1)
    times = ((t.ravel() + 0.5) * tubelet)[:, None]
    pos = np.concatenate([np.full((prefix, 2), np.nan), pos])
    times = np.concatenate([np.full((prefix, 1), np.nan), times])
    return torch.from_numpy(pos).float(), torch.from_numpy(times).float()


def numpy_stats(q, k, positions, times, *, key_positions=None, key_times=None, scale=None, bias=None,
                renormalize=False, reduction="mean"):
    """(spatial MAD, temporal MAD), float64 NumPy, [..., Nq] or their means over the queries with a position."""
    qd, kd = q.double().numpy(), k.double().numpy()
    scale = qd.shape[-1] ** -0.5 if scale is None else scale
    logits = qd @ np.swapaxes(kd, -1, -2) * scale
    if bias is not None:
        b = bias.numpy()
        logits = np.where(b, logits, -np.inf) if b.dtype == bool else logits + b.astype(np.float64)
    logits = logits - logits.max(-1, keepdims=True)
    attn = np.exp(logits)
    attn /= attn.sum(-1, keepdims=True)
    lead = attn.shape[:-2]
    nq = attn.shape[-2]
    qpos = np.broadcast_to(positions.double().numpy(), (*lead, nq, positions.shape[-1]))
    qt = np.broadcast_to(times.double().numpy(), (*lead, nq, 1))
    kp = qpos if key_positions is None else np.broadcast_to(key_positions.double().numpy(),
                                                           (*lead, attn.shape[-1], positions.shape[-1]))
    kt = qt if key_times is None else np.broadcast_to(key_times.double().numpy(), (*lead, attn.shape[-1], 1))
    has_key = ~np.isnan(kp[..., 0])
    has_query = ~np.isnan(qpos[..., 0])
    weights = np.where(has_key[..., None, :], attn, 0.0)
    out = []
    for qx, kx in ((qpos, kp), (qt, kt)):
        d = np.sqrt(((qx[..., :, None, :] - kx[..., None, :, :]) ** 2).sum(-1))
        value = np.nansum(weights * np.where(has_key[..., None, :], d, 0.0), -1)
        if renormalize:
            value = value / weights.sum(-1)
        value = np.where(has_query, value, np.nan)
        if reduction == "mean":
            value = np.nansum(np.where(has_query, value, 0.0), -1) / has_query.sum(-1)
        out.append(torch.from_numpy(np.asarray(value)))
    return out


def temporal(q, k, positions, times, stats=("mad", "temporal_mad"), **options):
    return torch.ops.vitmad.stats_qk_pos.default(q, k, positions, options.pop("key_positions", None), list(stats),
                                                 times=times, **options)


def check(out, expected, dtype):
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(out.double(), expected, **tolerance(dtype), equal_nan=True)


# (frames, rows, cols, prefix, D): one key block, across the 64-query and 512-key blocks, beyond three key blocks.
VIDEO_SHAPES = [(2, 3, 3, 0, 8), (2, 4, 8, 1, 16), (3, 13, 13, 1, 24), (4, 8, 16, 0, 12), (8, 14, 14, 1, 16)]


@pytest.mark.parametrize("frames, rows, cols, prefix, d", VIDEO_SHAPES)
@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_video_grid_matches_numpy(frames, rows, cols, prefix, d, renormalize, reduction):
    positions, times = video_tokens(frames, rows, cols, prefix=prefix)
    n = positions.shape[0]
    q, k = make_qk(1, 2, n, d, torch.float32, "cpu", seed=n, logit_scale=4.0)
    out = temporal(q, k, positions, times, renormalize=renormalize, reduction=reduction)
    spatial, time_mad = numpy_stats(q, k, positions, times, renormalize=renormalize, reduction=reduction)
    check(out[0], spatial, torch.float32)
    check(out[1], time_mad, torch.float32)
    # The package's float64 reference agrees, and the temporal MAD is mad_qk over the frames as positions.
    ref = attention_stats_qk_reference(q, k, ["mad", "temporal_mad"], positions=positions, times=times,
                                       renormalize=renormalize, reduction=reduction)
    check(out, ref, torch.float32)
    over_frames = vitmad.mad_qk(q, k, positions=times, renormalize=renormalize, reduction=reduction)
    check(out[1], over_frames.double(), torch.float32)


@pytest.mark.parametrize("nq, nk", [(37, 37), (70, 23), (9, 1600)])
@pytest.mark.parametrize("bias_kind", [None, "key_mask"])
@pytest.mark.parametrize("renormalize", [False, True])
def test_random_positions_rectangular_with_nan_rows(nq, nk, bias_kind, renormalize):
    gen = torch.Generator().manual_seed(nq * nk)
    q = torch.randn(2, 3, nq, 16, generator=gen)
    k = torch.randn(2, 3, nk, 16, generator=gen)
    square = nq == nk
    # Per image positions and times for the queries; for keys broadcast over the batch.
    positions = 40 * torch.rand(2, 1, nq, 3, generator=gen)
    times = 8 * torch.rand(2, 1, nq, 1, generator=gen)
    positions[:, :, [0, nq // 2]] = NAN
    times[:, :, [0, nq // 2]] = NAN
    options = dict(renormalize=renormalize)
    key_positions = key_times = None
    if not square:
        key_positions = 40 * torch.rand(nk, 3, generator=gen)
        key_times = 8 * torch.rand(nk, 1, generator=gen)
        key_positions[[1, nk - 1]] = NAN
        key_times[[1, nk - 1]] = NAN
        options.update(key_positions=key_positions, key_times=key_times)
    bias = None
    if bias_kind == "key_mask":
        bias = torch.rand(2, 1, 1, nk, generator=gen) > 0.3
        bias[..., 0] = True
        options["attn_bias"] = bias
    stats = ["entropy", "temporal_mad", "prefix_mass", "mad"] + (["self_mass"] if square else [])
    for reduction in ("none", "mean"):
        out = temporal(q, k, positions, times, stats, reduction=reduction, **options)
        spatial, time_mad = numpy_stats(q, k, positions, times, key_positions=key_positions, key_times=key_times,
                                        bias=bias, renormalize=renormalize, reduction=reduction)
        check(out[3], spatial, torch.float32)
        check(out[1], time_mad, torch.float32)
        ref = attention_stats_qk_reference(q, k, stats, positions=positions, times=times, reduction=reduction,
                                           **options)
        check(out, ref, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_dtypes(dtype):
    positions, times = video_tokens(3, 5, 7, prefix=1)
    q, k = make_qk(2, 2, positions.shape[0], 20, dtype, "cpu", seed=3)
    out = temporal(q, k, positions.to(dtype), times.to(dtype), ["temporal_mad", "entropy", "mad"],
                   reduction="none")
    ref = attention_stats_qk_reference(q, k, ["temporal_mad", "entropy", "mad"], positions=positions,
                                       times=times, reduction="none")
    check(out, ref, dtype)


def test_other_statistics_unchanged_by_the_temporal_sum():
    # The temporal sum is a separate accumulator: every other row is bit-identical to the call without it.
    positions, times = video_tokens(4, 6, 6, prefix=1)
    q, k = make_qk(2, 3, positions.shape[0], 16, torch.float32, "cpu", seed=9)
    names = ["mad", "entropy", "prefix_mass", "self_mass"]
    with_time = temporal(q, k, positions, times, [*names, "temporal_mad"], reduction="none")
    without = torch.ops.vitmad.stats_qk_pos.default(q, k, positions, None, names, reduction="none")
    torch.testing.assert_close(with_time[:4], without, rtol=0, atol=0, equal_nan=True)
    only_time = temporal(q, k, positions, times, ["temporal_mad"], reduction="none")
    torch.testing.assert_close(only_time[0], with_time[4], rtol=0, atol=0, equal_nan=True)


def test_compiled_matches_fallback_and_fake_shapes():
    positions, times = video_tokens(2, 4, 5, prefix=2)
    q, k = make_qk(2, 2, positions.shape[0], 8, torch.float32, "cpu", seed=1)
    for reduction in ("mean", "none"):
        out = temporal(q, k, positions, times, ["temporal_mad", "mad"], reduction=reduction)
        fallback = _fallback.stats_qk_pos(q, k, positions, None, ["temporal_mad", "mad"], times=times,
                                          reduction=reduction)
        torch.testing.assert_close(out, fallback, rtol=2e-5, atol=2e-5, equal_nan=True)
    compiled = torch.compile(
        lambda q, k: torch.ops.vitmad.stats_qk_pos.default(q, k, positions, None, ["mad", "temporal_mad"],
                                                           times=times), fullgraph=True)
    torch.testing.assert_close(compiled(q, k), temporal(q, k, positions, times))


def test_attention_stats_qk_api_and_from_attention():
    positions, times = video_tokens(3, 4, 4, prefix=1)
    n = positions.shape[0]
    q, k = make_qk(2, 2, n, 16, torch.float32, "cpu", seed=5, logit_scale=4.0)
    names = ("mad", "temporal_mad", "entropy", "prefix_maps")
    out = vitmad.attention_stats_qk(q, k, positions=positions, times=times, stats=names)
    assert list(out) == list(names)
    spatial, time_mad = numpy_stats(q, k, positions, times)
    check(out["mad"], spatial, torch.float32)
    check(out["temporal_mad"], time_mad, torch.float32)
    # From the stored attention: the same values (a second read for the frames).
    attn = (q.double() @ k.double().transpose(-1, -2) * 16**-0.5).softmax(-1).float()
    stored = vitmad.attention_stats(attn, positions=positions, times=times, stats=names, reduction="none")
    assert list(stored) == list(names)
    ref = attention_stats_reference(attn, ["mad", "temporal_mad", "entropy"], positions=positions, times=times,
                                    reduction="none")
    for i, name in enumerate(("mad", "temporal_mad", "entropy")):
        check(stored[name], ref[i], torch.float32)
    torch.testing.assert_close(stored["prefix_maps"], out["prefix_maps"], rtol=1e-5, atol=1e-6)


def test_mean_reduction_per_image_positions_broadcast_over_heads():
    # [B, 1, N, 2] per image: image 1 keeps half of its tokens (a masked encoder), the rest NaN.
    positions, times = video_tokens(2, 4, 4)
    n = positions.shape[0]
    pos = positions.expand(2, 1, n, 2).clone()
    tim = times.expand(2, 1, n, 1).clone()
    pos[1, :, ::2] = NAN
    tim[1, :, ::2] = NAN
    q, k = make_qk(2, 4, n, 8, torch.float32, "cpu", seed=11, logit_scale=2.0)
    bias = make_bias("heads", 2, 4, n, torch.float32, "cpu", torch.Generator().manual_seed(2))
    out = temporal(q, k, pos, tim, ["temporal_mad"], attn_bias=bias, renormalize=True)
    _, time_mad = numpy_stats(q, k, pos, tim, bias=bias, renormalize=True)
    check(out[0], time_mad, torch.float32)


ERRORS = [
    (dict(stats=["temporal_mad"], times=None), "the statistic 'temporal_mad' needs times"),
    (dict(stats=["mad"]), "times is read only by the statistic 'temporal_mad'"),
    (dict(times="k2"), r"times must be \[..., Nq, 1\], the frame of each token, got shape \[13, 2\]"),
    # One frame per token without its column: the positions' "K in {1, 2, 3}" was said first (QA 301).
    (dict(times="flat"), r"times must be \[..., Nq, 1\], the frame of each token, got shape \[13\]"),
    (dict(times="rows"), "times has Nq = 12 rows but q has 13 queries"),
    (dict(times="mismatch"), "times must be NaN exactly at the tokens without a position in positions, but token 0 "
                             "of matrix 0 has a time and no position"),
    (dict(times="hole"), "but token 5 of matrix 0 has a position and no time"),
    (dict(times="inf"), "times must not be infinite"),
    (dict(times="int"), "times must be a floating-point tensor"),
    (dict(key_times="given"), "key_times is given without key_positions"),
    (dict(times=None, key_times="given"), "key_times is given without times"),
]


@pytest.mark.parametrize("change, message", ERRORS)
def test_errors_name_the_argument(change, message):
    positions, times = video_tokens(1, 3, 4, prefix=1)
    q, k = make_qk(1, 1, 13, 8, torch.float32, "cpu")
    stats = change.pop("stats", ["temporal_mad"])
    variants = {"k2": times.expand(13, 2), "flat": times[:, 0], "rows": times[1:], "int": times.nan_to_num(0).long(),
                "mismatch": times.nan_to_num(0.0)}
    bad_inf = times.clone()
    bad_inf[3] = float("inf")
    hole = times.clone()
    hole[5] = NAN
    variants.update(inf=bad_inf, hole=hole)
    t = change.get("times", "ok")
    t = times if t == "ok" else variants.get(t, t)
    key_times = times if change.get("key_times") == "given" else None
    error = TypeError if change.get("times") == "int" else ValueError
    with pytest.raises(error, match=message):
        torch.ops.vitmad.stats_qk_pos.default(q, k, positions, None, stats, times=t, key_times=key_times)
    # The fallback and the Python API say the same.
    with pytest.raises(error, match=message):
        _fallback.stats_qk_pos(q, k, positions, None, stats, times=t, key_times=key_times)
    if t is not None:
        with pytest.raises(error, match=message):
            vitmad.attention_stats_qk(q, k, positions=positions, times=t, key_times=key_times, stats=stats)


def test_rectangular_needs_key_times_and_grid_form_refuses_times():
    q, k = make_qk(1, 1, 6, 8, torch.float32, "cpu")
    k = k[..., :4, :]
    positions, times = torch.rand(6, 2), torch.rand(6, 1)
    with pytest.raises(ValueError, match=r"key_positions is given, so the keys' frames are needed too"):
        vitmad.attention_stats_qk(q, k, positions=positions, key_positions=torch.rand(4, 2), times=times,
                                  stats=["temporal_mad"])
    for flat in (torch.rand(4), torch.rand(1, 4, 2)):  # the keys' frames too, before any other check of theirs
        shape = ", ".join(map(str, flat.shape))
        said = rf"key_times must be \[..., Nk, 1\], the frame of each key, got shape \[{shape}\]"
        for call in (vitmad.attention_stats_qk, _fallback.stats_qk_pos):
            with pytest.raises(ValueError, match=said):
                if call is _fallback.stats_qk_pos:
                    call(q, k, positions, torch.rand(4, 2), ["temporal_mad"], times=times, key_times=flat)
                else:
                    call(q, k, positions=positions, key_positions=torch.rand(4, 2), times=times, key_times=flat,
                         stats=["temporal_mad"])
        with pytest.raises(ValueError, match=said):
            torch.ops.vitmad.stats_qk_pos.default(q, k, positions, torch.rand(4, 2), ["temporal_mad"], times=times,
                                                  key_times=flat)
    q, k = make_qk(1, 1, 5, 8, torch.float32, "cpu")
    with pytest.raises(ValueError, match="times .* come with the position form"):
        vitmad.attention_stats_qk(q, k, 16, grid=[2, 2], times=torch.rand(5, 1), stats=["temporal_mad"])
    with pytest.raises(ValueError, match="needs times"):
        vitmad.attention_stats_qk(q, k, 16, grid=[2, 2], stats=["temporal_mad"])
    with pytest.raises(ValueError, match="needs times"):
        vitmad.attention_stats(torch.rand(5, 5).softmax(-1), 16, grid=[2, 2], stats=["temporal_mad"])


@pytest.mark.parametrize("d", [64, 256, 512])
def test_tasks_of_one_to_four_matrices(d):
    # A task shares one block of distances among up to four matrices whose packed keys take at most 2 MiB in all
    # (mad_qk_cpu.cpp, PositionDistances): 700 keys of D = 64 (4 matrices), 256 (2), 512 (1, 1.4 MB each).
    positions, times = video_tokens(4, 5, 35, prefix=0)
    n = positions.shape[0]
    # Logits of the same size (about 8) for every D: the float32 error of a logit grows with its size.
    q, k = make_qk(1, 5, n, d, torch.float32, "cpu", seed=d, logit_scale=8 / d**0.5)
    spatial, time_mad = numpy_stats(q, k, positions, times, reduction="none")
    out = temporal(q, k, positions, times, reduction="none")
    check_within_logit_rounding(out[0], spatial, q, k, positions)
    check_within_logit_rounding(out[1], time_mad, q, k, times)
    check_within_logit_rounding(vitmad.mad_qk(q, k, positions=positions, reduction="none"), spatial, q, k, positions)


def check_within_logit_rounding(out, expected, q, k, coords):
    """Per-query MAD [1, H, N] against the float64 reference, allowing for float32 logits of a long dot product.

    With D in the hundreds, a float32 logit (a BLAS SGEMM where the CPU has AVX-512, vitmad's panels elsewhere:
    csrc/cpu/panel_logits.h) is off by up to ~3e-5 here, more than accumulation error. To first order a logit
    error delta_k moves the MAD by sum_k p_k (d_k - MAD) delta_k, at most max|delta| * sum_k p_k |d_k - MAD|. The
    bound is that with twice the largest error of PyTorch's own float32 logits of the same inputs in the query's
    row (as flash-attention's tests bound a kernel by twice the same-precision route), plus the usual tolerance.
    On Xeon (Sapphire Rapids) the measured error stays under a quarter of this bound on either route."""
    scale = q.shape[-1] ** -0.5
    exact = (q.double() @ k.double().transpose(-1, -2)) * scale
    float32_logits = (q @ k.transpose(-1, -2)).double() * scale
    delta = (float32_logits - exact).abs().amax(-1)
    attn = exact.softmax(-1)
    distances = torch.cdist(coords.double(), coords.double())
    spread = (attn * (distances - expected[..., None]).abs()).sum(-1)
    tol = tolerance(torch.float32)
    bound = tol["atol"] + tol["rtol"] * expected.abs() + 2 * delta * spread
    assert out.dtype == torch.float32 and out.shape == expected.shape
    excess = (out.double() - expected).abs() - bound
    assert (excess <= 0).all(), f"{int((excess > 0).sum())} queries beyond the bound, worst by {excess.max():.3g}"


def test_not_differentiable_from_attention_either():
    positions, times = video_tokens(2, 2, 2)
    attn = torch.rand(1, 8, 8).softmax(-1).requires_grad_()
    with pytest.raises(RuntimeError, match="not differentiable, but attn requires grad"):
        vitmad.attention_stats(attn, positions=positions, times=times, stats=["temporal_mad"])
    with torch.no_grad():
        vitmad.attention_stats(attn, positions=positions, times=times, stats=["temporal_mad"])


def test_frames_that_require_grad_are_refused():
    # The statistics are measurements: frames that require grad are refused like positions, in both entry points.
    positions, times = video_tokens(2, 2, 2)
    q, k = make_qk(1, 2, positions.shape[0], 8, torch.float32, "cpu", seed=5)
    attn = torch.rand(1, positions.shape[0], positions.shape[0]).softmax(-1)
    for call in (lambda t: vitmad.attention_stats_qk(q, k, positions=positions, times=t, stats=["temporal_mad"]),
                 lambda t: vitmad.attention_stats(attn, positions=positions, times=t, stats=["temporal_mad"])):
        with pytest.raises(RuntimeError, match="not differentiable, but times requires grad"):
            call(times.clone().requires_grad_())
        with torch.no_grad():
            assert call(times.clone().requires_grad_())["temporal_mad"].isfinite().all()
