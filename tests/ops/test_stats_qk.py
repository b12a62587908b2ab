"""vitmad::stats_qk and stats_qk_pos (MAD, entropy, prefix mass and self mass of softmax(q @ k^T * scale + bias)
without the attention) against the float64 materialised route, attention_stats_qk_reference.

Inputs are rounded to the tested dtype first and the reference is computed from the rounded values, so only the
kernels' accumulation error remains: float32 (float64 for float64) logits, exponentials and sums, the error class
of mad_qk, hence conftest.tolerance for every statistic. Entropy (up to ln Nk, about 6 nats here) is ln Z minus
a weighted mean of logit gaps, each term within a few float32 ulps; prefix and self mass are probabilities.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import vitmad
from conftest import DTYPES, make_bias, make_qk, tolerance
from vitmad.ops import fallback as _fallback
from vitmad.ops.arguments import check_stats
from vitmad.ops.reference import attention_stats_qk_reference

ALL_STATS = ["mad", "entropy", "prefix_mass", "self_mass"]
OP = "vitmad.attention_stats_qk"
NAN = float("nan")

pytestmark = pytest.mark.skipif(not vitmad.has_compiled_kernel("stats_qk", "CPU"),
                                reason="the compiled CPU kernels of stats_qk are not built")

# (N, P, grid, D) of the grid form across the CPU kernel's blocks (block_logits.h: 64 queries, 512 keys per
# block): 63 / 64 / 65 patch queries, 511 / 512 / 513 / 517 keys, P in {0, 1, 5}, rectangular grids, odd D.
GRID_SHAPES = [
    (2, 1, [1, 1], 3),
    (5, 1, [2, 2], 40),
    (64, 1, [7, 9], 33),
    (64, 0, [8, 8], 17),
    (66, 1, [5, 13], 40),
    (69, 5, [8, 8], 24),
    (197, 1, None, 72),
    (511, 0, [7, 73], 9),
    (512, 0, [16, 32], 8),
    (513, 1, [16, 32], 20),
    (517, 5, [16, 32], 12),
]
BIAS_KINDS = [None, "heads", "key_mask"]


def stats_qk(q, k, stats, **options):
    return torch.ops.vitmad.stats_qk.default(q, k, options.pop("patch", 16), list(stats), **options)


def stats_qk_pos(q, k, positions, key_positions, stats, **options):
    return torch.ops.vitmad.stats_qk_pos.default(q, k, positions, key_positions, list(stats), **options)


def assert_matches(out, ref, dtype):
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert out.shape == ref.shape
    torch.testing.assert_close(out.double(), ref, **tolerance(dtype), equal_nan=True)


def random_positions(shape, gen, *, nan_rows=()):
    """Positions in [0, 50)^K with the given rows (tokens) NaN: tokens without a position."""
    pos = 50 * torch.rand(shape, generator=gen, dtype=torch.float64)
    pos[..., list(nan_rows), :] = NAN
    return pos.float()


@pytest.mark.parametrize("n, prefix, grid, d", GRID_SHAPES)
@pytest.mark.parametrize("bias_kind", BIAS_KINDS)
@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_grid_form_matches_reference(n, prefix, grid, d, bias_kind, renormalize, reduction):
    q, k = make_qk(2, 2, n, d, torch.float32, "cpu", seed=n + d)
    bias = make_bias(bias_kind, 2, 2, n, torch.float32, "cpu", torch.Generator().manual_seed(n))
    options = dict(num_prefix_tokens=prefix, grid=grid, attn_bias=bias, renormalize=renormalize, reduction=reduction)
    stats = ALL_STATS[n % 4:] + ALL_STATS[: n % 4]  # each shape its own order
    out = stats_qk(q, k, stats, **options)
    assert_matches(out, attention_stats_qk_reference(q, k, stats, patch=16, **options), torch.float32)


@pytest.mark.parametrize("nq, nk", [(1, 1), (63, 63), (64, 64), (65, 65), (257, 257), (65, 513), (200, 37)])
@pytest.mark.parametrize("bias_kind", [None, "matrix", "key_mask"])
@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_position_form_matches_reference(nq, nk, bias_kind, renormalize, reduction):
    # Positionless keys both as a leading run (CLS-like) and scattered (padding); queries without a position too.
    # Rectangular attention takes key_positions and leaves self_mass out (it needs Nq == Nk).
    gen = torch.Generator().manual_seed(nq * 1000 + nk)
    q, k = make_qk(2, 3, max(nq, nk), 19, torch.float32, "cpu", seed=nq + nk)
    q, k = q[..., :nq, :], k[..., :nk, :]
    positions = random_positions((nq, 2), gen, nan_rows=range(0, nq, 7))
    key_positions = None if nq == nk else random_positions((nk, 2), gen, nan_rows=[0, *range(3, nk, 5)])
    bias = None
    if bias_kind == "matrix":
        bias = torch.randn(nq, nk, generator=gen)
    elif bias_kind == "key_mask":
        bias = torch.rand(2, 1, 1, nk, generator=gen) > 0.3
        bias[..., nk // 2] = True  # a key every query keeps, so no row is masked whole (tested on its own)
    stats = ALL_STATS if nq == nk else ["entropy", "mad", "prefix_mass"]
    options = dict(attn_bias=bias, renormalize=renormalize, reduction=reduction)
    out = stats_qk_pos(q, k, positions, key_positions, stats, **options)
    ref = attention_stats_qk_reference(q, k, stats, positions=positions, key_positions=key_positions, **options)
    assert_matches(out, ref, torch.float32)
    if reduction == "none":  # queries without a position: NaN for every statistic
        assert out[..., ::7].isnan().all()


@pytest.mark.parametrize("renormalize", [False, True])
def test_own_key_without_a_position(renormalize):
    # Square attention with key_positions of their own: query t may have a position while key t has none. Its
    # self mass is still the softmax's A[t, t], over every key, though renormalisation leaves that key out of MAD.
    gen = torch.Generator().manual_seed(19)
    q, k = make_qk(1, 2, 70, 16, torch.float32, "cpu", seed=19)
    positions = random_positions((70, 2), gen, nan_rows=[0])
    key_positions = random_positions((70, 2), gen, nan_rows=[0, *range(5, 70, 4)])
    options = dict(renormalize=renormalize, reduction="none")
    out = stats_qk_pos(q, k, positions, key_positions, ALL_STATS, **options)
    ref = attention_stats_qk_reference(q, k, ALL_STATS, positions=positions, key_positions=key_positions, **options)
    assert_matches(out, ref, torch.float32)
    assert (out[3, ..., 5::4] > 0).all()


@pytest.mark.parametrize("renormalize", [False, True])
def test_padding_run_across_a_key_block(renormalize):
    # NaFlex-like rows: 2 prefix tokens, 398 patches, then 200 padding tokens without a position, a run that
    # crosses the 512-key block edge; image 0 also masks its padding keys out, image 1 attends to them.
    n = 600
    q, k = make_qk(2, 2, n, 24, torch.float32, "cpu", seed=17)
    positions = random_positions((n, 2), torch.Generator().manual_seed(17), nan_rows=[0, 1, *range(400, n)])
    keep = torch.ones(2, 1, 1, n, dtype=torch.bool)
    keep[0, ..., 400:] = False
    for reduction in ("mean", "none"):
        options = dict(attn_bias=keep, renormalize=renormalize, reduction=reduction)
        out = stats_qk_pos(q, k, positions, None, ALL_STATS, **options)
        ref = attention_stats_qk_reference(q, k, ALL_STATS, positions=positions, **options)
        assert_matches(out, ref, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("form", ["grid", "positions"])
@pytest.mark.parametrize("bias_kind", [None, "heads"])
def test_dtypes(dtype, form, bias_kind):
    n, d = 197, 40
    q, k = make_qk(2, 3, n, d, dtype, "cpu", seed=7)
    bias = make_bias(bias_kind, 2, 3, n, dtype, "cpu", torch.Generator().manual_seed(1))
    options = dict(attn_bias=bias, reduction="none")
    for renormalize in (False, True):
        if form == "grid":
            out = stats_qk(q, k, ALL_STATS, renormalize=renormalize, **options)
            ref = attention_stats_qk_reference(q, k, ALL_STATS, patch=16, renormalize=renormalize, **options)
        else:
            positions = random_positions((n, 3), torch.Generator().manual_seed(3), nan_rows=[0, 1, 100])
            out = stats_qk_pos(q, k, positions.to(dtype), None, ALL_STATS, renormalize=renormalize, **options)
            ref = attention_stats_qk_reference(q, k, ALL_STATS, positions=positions.to(dtype),
                                               renormalize=renormalize, **options)
        assert_matches(out, ref, dtype)


def test_subsets_and_orders_are_rows_of_the_full_call():
    # Every statistic is computed the same way whichever others come with it (entropy is compiled in or not):
    # a subset in any order gives the full call's rows, bit for bit.
    q, k = make_qk(2, 2, 69, 24, torch.float32, "cpu", seed=2)
    bias = make_bias("key_mask", 2, 2, 69, torch.float32, "cpu", torch.Generator().manual_seed(2))
    positions = random_positions((69, 2), torch.Generator().manual_seed(4), nan_rows=[0, 1, 30])
    for renormalize in (False, True):
        calls = {
            "grid": lambda s: stats_qk(q, k, s, num_prefix_tokens=5, attn_bias=bias, renormalize=renormalize,
                                       reduction="none"),
            "positions": lambda s: stats_qk_pos(q, k, positions, None, s, attn_bias=bias, renormalize=renormalize,
                                                reduction="none"),
        }
        for call in calls.values():
            full = call(ALL_STATS)
            for size in (1, 2, 3, 4):
                for subset in itertools.permutations(ALL_STATS, size):
                    if size == 4 and subset == tuple(ALL_STATS):
                        continue
                    expected = full[[ALL_STATS.index(s) for s in subset]]
                    torch.testing.assert_close(call(subset), expected, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("bias_kind", [None, "heads", "key_mask"])
def test_mad_row_is_mad_qk_bit_for_bit(dtype, bias_kind):
    # The MAD row is mad_qk's weighted / total from the same loop: the same bits, renormalised or not, mean or not.
    n = 581
    q, k = make_qk(2, 2, n, 36, dtype, "cpu", seed=5)
    bias = make_bias(bias_kind, 2, 2, n, dtype, "cpu", torch.Generator().manual_seed(5))
    positions = random_positions((n, 2), torch.Generator().manual_seed(6), nan_rows=[0, 1, 2, 3, 4, 300])
    for renormalize, reduction in itertools.product((False, True), ("mean", "none")):
        options = dict(attn_bias=bias, renormalize=renormalize, reduction=reduction)
        grid = dict(num_prefix_tokens=5, grid=[24, 24])
        out = stats_qk(q, k, ["entropy", "mad"], patch=14, **grid, **options)[1]
        torch.testing.assert_close(out, torch.ops.vitmad.mad_qk(q, k, 14, **grid, **options), rtol=0, atol=0,
                                   equal_nan=True)
        out = stats_qk_pos(q, k, positions, None, ["mad", "self_mass"], **options)[0]
        torch.testing.assert_close(out, torch.ops.vitmad.mad_qk_pos(q, k, positions, **options), rtol=0, atol=0,
                                   equal_nan=True)


@pytest.mark.parametrize("form", ["grid", "positions"])
def test_compiled_matches_fallback(form):
    q, k = make_qk(2, 3, 257, 40, torch.bfloat16, "cpu", seed=8)
    bias = make_bias("heads", 2, 3, 257, torch.bfloat16, "cpu", torch.Generator().manual_seed(8))
    positions = random_positions((257, 2), torch.Generator().manual_seed(9), nan_rows=[0, 77])
    for renormalize in (False, True):
        options = dict(attn_bias=bias, renormalize=renormalize, reduction="none")
        if form == "grid":
            out, expected = (f(q, k, 16, ALL_STATS, **options) for f in (torch.ops.vitmad.stats_qk, _fallback.stats_qk))
        else:
            out, expected = (f(q, k, positions, None, ALL_STATS, **options)
                             for f in (torch.ops.vitmad.stats_qk_pos, _fallback.stats_qk_pos))
        torch.testing.assert_close(out, expected, **tolerance(torch.float32), equal_nan=True)


def test_strided_inputs_and_broadcast_bias():
    # [B, N, H, D] viewed as [B, H, N, D] as models produce them, every other channel of a wider head, and a bias
    # given as an expanded view: all read in place.
    gen = torch.Generator().manual_seed(10)
    q = torch.randn(2, 197, 3, 80, generator=gen).transpose(1, 2)[..., ::2]
    k = torch.randn(2, 197, 3, 40, generator=gen).transpose(1, 2)
    bias = torch.randn(3, 1, 197, generator=gen).expand(2, 3, 197, 197)
    for renormalize in (False, True):
        options = dict(scale=0.3, attn_bias=bias, renormalize=renormalize, reduction="none")
        out = stats_qk(q, k, ALL_STATS, **options)
        assert_matches(out, attention_stats_qk_reference(q, k, ALL_STATS, patch=16, **options), torch.float32)


@pytest.mark.parametrize("form", ["grid", "positions"])
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float32])
def test_fully_masked_queries_give_nan(form, mask_dtype):
    # A query whose every key is masked has no attention distribution: NaN for every statistic, as softmax gives,
    # and a NaN mean for its matrix; the other queries are unaffected. Queries 3 and 70 (of 2 key blocks' worth of
    # queries) are masked whole, query 5 keeps only its own key, query 6 only the prefix (CLS) key.
    n = 577
    q, k = make_qk(1, 2, n, 16, torch.float32, "cpu", seed=11)
    keep = torch.ones(2, n, n, dtype=torch.bool)
    keep[:, [3, 70]] = False
    keep[:, 5] = False
    keep[:, 5, 5] = True
    keep[:, 6] = False
    keep[:, 6, 0] = True
    bias = keep if mask_dtype == torch.bool else torch.zeros(2, n, n).masked_fill(~keep, -math.inf)
    for renormalize, reduction in itertools.product((False, True), ("mean", "none")):
        options = dict(attn_bias=bias, renormalize=renormalize, reduction=reduction)
        if form == "grid":
            out = stats_qk(q, k, ALL_STATS, **options)
            ref = attention_stats_qk_reference(q, k, ALL_STATS, patch=16, **options)
            masked = [2, 69]  # patch queries of tokens 3 and 70
        else:
            positions = random_positions((n, 2), torch.Generator().manual_seed(12), nan_rows=[0])
            out = stats_qk_pos(q, k, positions, None, ALL_STATS, **options)
            ref = attention_stats_qk_reference(q, k, ALL_STATS, positions=positions, **options)
            masked = [3, 70]
        if reduction == "none":
            assert out[..., masked].isnan().all()
        else:
            assert out.isnan().all()
        assert_matches(out, ref, torch.float32)


def test_large_logits_peaked_rows_and_a_query_attending_to_cls():
    # Logits exact in float32 (q and k multiples of 1/8 below 4 in magnitude, D = 16, scale 32), so any error is
    # the kernel's own: logits in the hundreds (a naive exp overflows) and rows so peaked that entropy is near 0.
    # Query 0's CLS logit is raised 200 above its patch keys' (bias, a multiple of 1/2: still exact): their mass
    # underflows float32 next to CLS (not float64, the reference's), yet the renormalised MAD over them stays finite.
    gen = torch.Generator().manual_seed(13)
    q, k = ((torch.randn(1, 2, 197, 16, generator=gen) * 8).round().clamp(-31, 31) / 8 for _ in range(2))
    logits = q @ k.transpose(-1, -2) * 32
    assert logits.abs().max() > 100
    bias = torch.zeros(197, 197)
    bias[1, 0] = (logits[..., 1, 1:].amax() - logits[..., 1, 0].amin() + 200).item()
    for renormalize, reduction in itertools.product((False, True), ("mean", "none")):
        options = dict(scale=32.0, attn_bias=bias, renormalize=renormalize, reduction=reduction)
        out = stats_qk(q, k, ALL_STATS, **options)
        ref = attention_stats_qk_reference(q, k, ALL_STATS, patch=16, **options)
        assert_matches(out, ref, torch.float32)
        assert out.isfinite().all()
        if reduction == "none":
            assert out[1].median() < 1e-3  # entropy: most rows put nearly all mass on one key
            assert (out[2, ..., 0] > 1 - 1e-6).all()  # query 0's prefix mass


def test_positionless_keys_only_and_no_keys():
    gen = torch.Generator().manual_seed(15)
    q, k = make_qk(2, 1, 9, 8, torch.float32, "cpu", seed=15)
    positions = random_positions((9, 2), gen)
    # Every key without a position: prefix mass 1, MAD 0 (NaN renormalised: no key left), entropy as usual.
    no_keys = torch.full((9, 2), NAN)
    for renormalize in (False, True):
        options = dict(renormalize=renormalize, reduction="none")
        out = stats_qk_pos(q, k, positions, no_keys, ["mad", "entropy", "prefix_mass"], **options)
        ref = attention_stats_qk_reference(q, k, ["mad", "entropy", "prefix_mass"], positions=positions,
                                           key_positions=no_keys, **options)
        assert_matches(out, ref, torch.float32)
        torch.testing.assert_close(out[2], torch.ones(2, 1, 9), rtol=0, atol=2e-7)
    # Nk = 0: softmax over no key, NaN for every statistic; "mean" over the queries is NaN too.
    empty_k = k[..., :0, :]
    for reduction in ("mean", "none"):
        out = stats_qk_pos(q, empty_k, positions, positions[:0], ["prefix_mass", "entropy", "mad"], reduction=reduction)
        assert out.shape == ((3, 2, 1) if reduction == "mean" else (3, 2, 1, 9)) and out.isnan().all()


def test_leading_dims_and_empty_batches():
    q, k = make_qk(1, 6, 50, 16, torch.float64, "cpu", seed=16)
    q, k = q.view(2, 3, 50, 16), k.view(2, 3, 50, 16)
    out = stats_qk(q, k, ALL_STATS, grid=[7, 7])
    assert_matches(out, attention_stats_qk_reference(q, k, ALL_STATS, patch=16, grid=[7, 7]), torch.float64)
    assert stats_qk(q[0, 0], k[0, 0], ["self_mass"], grid=[7, 7], reduction="none").shape == (1, 49)
    empty = torch.empty(0, 4, 50, 16)
    assert stats_qk(empty, empty, ALL_STATS, grid=[7, 7]).shape == (4, 0, 4)
    assert stats_qk_pos(empty, empty, torch.zeros(50, 2), None, ["mad", "entropy"], reduction="none").shape == (
        2, 0, 4, 50)
    no_queries = stats_qk_pos(q[..., :0, :], k, torch.zeros(0, 2), torch.zeros(50, 2), ["entropy"])
    assert no_queries.shape == (1, 2, 3) and no_queries.isnan().all()  # a mean over no query


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_no_query_in_the_pure_pytorch_kernels(reduction):
    # What CUDA runs (and the CPU without the compiled library): no query gives [S, ..., 0] or NaN means, as the
    # compiled CPU kernels do, not an error. Both forms, with the frames too.
    q, k = make_qk(2, 3, 50, 16, torch.float32, "cpu", seed=17)
    names = ["mad", "entropy", "prefix_mass", "temporal_mad"]
    frames = {"times": torch.zeros(0, 1), "key_times": torch.arange(50.0).unsqueeze(-1)}
    key_positions = torch.rand(50, 2, generator=torch.Generator().manual_seed(3)) * 100
    calls = {"q/k": lambda ops: ops.stats_qk_pos(q[..., :0, :], k, torch.zeros(0, 2), key_positions, names,
                                                 reduction=reduction, **frames),
             "attn": lambda ops: ops.stats_pos(torch.rand(2, 3, 0, 50), torch.zeros(0, 2), key_positions,
                                               names[:3], reduction=reduction)}
    for form, call in calls.items():
        compiled, pure = call(torch.ops.vitmad), call(_fallback)
        assert pure.shape == compiled.shape == ((len(names) if form == "q/k" else 3, 2, 3) +
                                                ((0,) if reduction == "none" else ())), form
        assert pure.isnan().all() and compiled.isnan().all(), form


@pytest.mark.parametrize("stats", [[], ["mad", "mad"], ["entropy", "Entropy"], ["prefix", "mad"]])
def test_bad_stats_name_the_op_as_python_does(stats):
    q, k = make_qk(1, 1, 5, 8, torch.float32, "cpu")
    with pytest.raises(ValueError) as expected:
        check_stats(stats, 5, 5, OP)
    grid_call = lambda: stats_qk(q, k, stats, grid=[2, 2])  # noqa: E731
    position_call = lambda: stats_qk_pos(q, k, torch.zeros(5, 2), None, stats)  # noqa: E731
    for call in (grid_call, position_call):
        with pytest.raises(ValueError) as raised:
            call()
        assert str(expected.value) in str(raised.value)


def test_self_mass_needs_square_attention():
    q, k = make_qk(1, 1, 7, 8, torch.float32, "cpu")
    with pytest.raises(ValueError) as expected:
        check_stats(["mad", "self_mass"], 5, 7, OP)
    with pytest.raises(ValueError) as raised:
        stats_qk_pos(q[..., :5, :], k, torch.zeros(5, 2), torch.zeros(7, 2), ["mad", "self_mass"])
    assert str(expected.value) in str(raised.value)


def test_argument_errors_name_the_statistics_op():
    q, k = make_qk(1, 1, 5, 8, torch.float32, "cpu")
    with pytest.raises(ValueError, match=f"{OP}: reduction must be"):
        stats_qk(q, k, ["mad"], grid=[2, 2], reduction="max")
    with pytest.raises(ValueError, match=f"{OP}: .*grid"):
        stats_qk(q, k, ["mad"], grid=[3, 3])
    with pytest.raises(TypeError, match=f"{OP}: k must have q's dtype"):
        stats_qk_pos(q, k.double(), torch.zeros(5, 2), None, ["mad"])
    with pytest.raises(ValueError, match=f"{OP}: positions"):
        stats_qk_pos(q, k, torch.zeros(4, 2), None, ["mad"])


@pytest.mark.parametrize("form", ["grid", "positions"])
def test_bit_identical_across_thread_counts(restore_threads, form):
    # Each query's statistics come from one task whatever thread runs it, and the means sum in a fixed order
    # (test_determinism.py says why): the thread count changes nothing.
    q, k = make_qk(3, 4, 261, 40, torch.float32, "cpu", seed=18)
    bias = make_bias("heads", 3, 4, 261, torch.float32, "cpu", torch.Generator().manual_seed(18))
    positions = random_positions((261, 2), torch.Generator().manual_seed(18), nan_rows=[0, 1, 2, 3, 4, 200])
    results = []
    for threads in (1, 2, 3):
        torch.set_num_threads(threads)
        for reduction in ("mean", "none"):
            options = dict(attn_bias=bias, renormalize=True, reduction=reduction)
            if form == "grid":
                results.append(stats_qk(q, k, ALL_STATS, num_prefix_tokens=5, grid=[16, 16], **options))
            else:
                results.append(stats_qk_pos(q, k, positions, None, ALL_STATS, **options))
    for i in range(2, len(results)):
        torch.testing.assert_close(results[i], results[i % 2], rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("prefix", [0, 1])
def test_a_query_without_a_distribution_is_nan_everywhere_in_both_backends(prefix):
    """Every key masked, or a NaN logit: softmax gives no distribution, so every statistic is NaN, the prefix
    mass too, even with no key without a position (a sum over no key would give 0), compiled and fallback; and so
    in the float64 reference, whose prefix mass there was 0 (QA 422), in the grid and the positions form."""
    q, k = make_qk(1, 1, 4 + prefix, 8, torch.float32, "cpu", seed=11)
    mask = torch.ones(1, 1, 4 + prefix, 4 + prefix, dtype=torch.bool)
    mask[..., prefix, :] = False
    bias = torch.zeros(1, 1, 4 + prefix, 4 + prefix)
    bias[..., prefix + 1, 2] = float("nan")
    grid = {"num_prefix_tokens": prefix, "grid": [2, 2], "reduction": "none"}
    for attn_bias, row in ((mask, 0), (bias, 1)):
        for kernel in (torch.ops.vitmad.stats_qk, _fallback.stats_qk):
            out = kernel(q, k, 16, ALL_STATS, attn_bias=attn_bias, **grid)
            assert out[..., row].isnan().all(), (kernel, out[..., row])
            assert not out[..., 3].isnan().any()
        reference = attention_stats_qk_reference(q, k, ALL_STATS, patch=16, attn_bias=attn_bias, **grid)
        assert_matches(out, reference, torch.float32)
        positions = random_positions((4 + prefix, 2), torch.Generator().manual_seed(12), nan_rows=list(range(prefix)))
        for kernel in (torch.ops.vitmad.stats_qk_pos, _fallback.stats_qk_pos):
            out = kernel(q, k, positions, None, ALL_STATS, attn_bias=attn_bias, reduction="none")
            assert out[..., prefix + row].isnan().all(), (kernel, out[..., prefix + row])
        reference = attention_stats_qk_reference(q, k, ALL_STATS, positions=positions, attn_bias=attn_bias,
                                                 reduction="none")
        assert_matches(out, reference, torch.float32)
