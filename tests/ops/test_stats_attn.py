"""The CPU kernels of ``vitmad::stats`` and ``vitmad::stats_pos`` (csrc/cpu/stats_cpu.cpp).

Against the float64 definition (``attention_stats_reference``) on fresh random inputs, against the pure-PyTorch
kernels, against ``vitmad::mad`` / ``mad_pos`` (the "mad" row is theirs bit for bit), and the vectorised
logarithm behind the entropy against ``std::log`` (tests/cpp/log_check.cpp).

Tolerances: the reference gets the same input values (16-bit inputs are not rounded again), so only the
kernel's arithmetic differs. Float32 accumulation over at most a few hundred keys, in vector lanes of a few dozen
terms each, of terms of one sign (A, A d, A ln A), has a relative error of at most a few times 1e-7 per lane
chain: rtol 1e-5 leaves a tenfold margin; atol 1e-6 covers values near 0 (the entropy of a near one-hot row, a
prefix mass of 1e-7), where the error is relative to the row's mass, not to the value. The entropy's log adds
at most 2 ulp per term (checked by log_check). Float64: 1e-12.
"""

from __future__ import annotations

import math
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import vitmad
from conftest import random_attention
from vitmad.ops import fallback
from vitmad.ops.arguments import check_stats
from vitmad.ops.reference import attention_stats_reference

ops = torch.ops.vitmad
ROOT = Path(__file__).resolve().parents[2]
COMPILER = shutil.which("c++") or shutil.which("g++")
OP = "vitmad.attention_stats"
ALL = ("mad", "entropy", "prefix_mass", "self_mass")
# Subsets and orders, each statistic alone and first somewhere.
STAT_SETS = [ALL, ("entropy",), ("self_mass", "prefix_mass"), ("prefix_mass", "mad", "entropy"), ("mad",),
             ("entropy", "self_mass", "mad")]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]

pytestmark = pytest.mark.skipif(not vitmad.has_compiled_kernel("stats", "CPU"),
                                reason="the compiled CPU kernels of vitmad::stats are not built")


def tol(dtype: torch.dtype) -> dict:
    return {"rtol": 1e-12, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-6}


def check(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(got.double(), want, equal_nan=True, **tol(dtype))


def assert_same_bits(got: torch.Tensor, want: torch.Tensor, what=None) -> None:
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True, msg=None if what is None else str(what))


def grid_positions(prefix: int, gh: int, gw: int, patch: float = 16.0) -> torch.Tensor:
    t = torch.arange(gh * gw, dtype=torch.float64)
    centres = torch.stack([(t // gw) * patch, (t % gw) * patch], -1)
    return torch.cat([torch.full((prefix, 2), math.nan, dtype=torch.float64), centres])


def test_compiled_backend_serves_stats():
    assert vitmad.backend() == "compiled"
    assert vitmad.ops.has_compiled_kernel("stats", "CPU") and vitmad.ops.has_compiled_kernel("stats_pos", "CPU")


# Grid form -------------------------------------------------------------------------------------------------------

# (grid, prefix): N - P across the kernels' vector and block boundaries (8 and 16 float lanes, half vectors of 4)
GRIDS = [((1, 1), 1), ((1, 7), 0), ((2, 4), 5), ((3, 3), 1), ((3, 5), 0), ((4, 4), 1), ((1, 17), 5), ((1, 31), 1),
         ((3, 11), 0), ((14, 14), 1), ((14, 14), 0), ((2, 9), 1)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_grid_matches_reference(dtype, renormalize, reduction):
    for i, (grid, prefix) in enumerate(GRIDS):
        n = grid[0] * grid[1] + prefix
        stats = STAT_SETS[i % len(STAT_SETS)]
        attn = random_attention((2, 3, n, n), dtype, seed=i, temperature=0.5)
        got = ops.stats(attn, 16, list(stats), num_prefix_tokens=prefix, grid=list(grid), renormalize=renormalize,
                        reduction=reduction)
        want = attention_stats_reference(attn, stats, patch=16, num_prefix_tokens=prefix, grid=grid,
                                         renormalize=renormalize, reduction=reduction)
        assert got.shape == want.shape
        check(got, want, dtype)


def _grid_views(n: int, dtype) -> dict:
    """Non-contiguous [2, 3, n, n] attention: every layout a kernel path reads differently."""
    base = random_attention((2, 3, n, n + 3), dtype, seed=7)[..., :n]  # rows padded: query stride n + 3
    wide = random_attention((2, 3, n, 2 * n), dtype, seed=8)[..., ::2]  # key stride 2
    one = random_attention((1, 3, n, n), dtype, seed=9)
    return {
        "padded rows": base,
        "key stride 2": wide,
        "transposed": random_attention((2, 3, n, n), dtype, seed=10).transpose(-1, -2),  # query axis contiguous
        "broadcast": one.expand(2, 3, n, n),  # stride 0 leading dim
        "leading slice": random_attention((4, 3, n, n), dtype, seed=11)[::2],
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_grid_strided_views(dtype, reduction):
    for (grid, prefix) in [((14, 14), 1), ((3, 5), 5)]:
        n = grid[0] * grid[1] + prefix
        for name, attn in _grid_views(n, dtype).items():
            for renormalize in (False, True):
                got = ops.stats(attn, 14, list(ALL), num_prefix_tokens=prefix, grid=list(grid),
                                renormalize=renormalize, reduction=reduction)
                want = attention_stats_reference(attn, ALL, patch=14, num_prefix_tokens=prefix, grid=grid,
                                                 renormalize=renormalize, reduction=reduction)
                check(got, want, dtype)
                mad = ops.mad(attn, 14, num_prefix_tokens=prefix, grid=list(grid), renormalize=renormalize,
                              reduction=reduction)
                assert_same_bits(got[0], mad, name)


@pytest.mark.parametrize("dtype", DTYPES)
def test_grid_mad_row_is_mads_output(dtype):
    """Same distances, same summation order: the "mad" row of stats is vitmad::mad's output bit for bit, with and
    without entropy (which changes how many matrices are read together)."""
    attn = random_attention((3, 5, 197, 197), dtype, seed=3)
    for renormalize in (False, True):
        for reduction in ("mean", "none"):
            mad = ops.mad(attn, 16, renormalize=renormalize, reduction=reduction)
            for stats in (["mad"], ["entropy", "mad"], ["mad", "prefix_mass", "self_mass"]):
                got = ops.stats(attn, 16, stats, renormalize=renormalize, reduction=reduction)
                assert_same_bits(got[stats.index("mad")], mad, (stats, renormalize, reduction))


def test_grid_peaked_and_zero_probabilities():
    """Near one-hot rows and exact zeros (0 ln 0 = 0), all dtypes; the all-zero prefix column too."""
    for dtype in DTYPES:
        attn = random_attention((2, 4, 50, 50), torch.float64, seed=4, temperature=0.02)
        attn[..., ::3] = 0  # exact zeros, the prefix key included
        attn = (attn / attn.sum(-1, keepdim=True)).to(dtype)
        for reduction in ("mean", "none"):
            got = ops.stats(attn, 16, list(ALL), grid=[7, 7], reduction=reduction)
            want = attention_stats_reference(attn, ALL, patch=16, grid=(7, 7), reduction=reduction)
            check(got, want, dtype)
            assert got.isfinite().all()


def test_grid_zero_size():
    attn = torch.rand(0, 3, 50, 50)
    assert ops.stats(attn, 16, list(ALL), grid=[7, 7]).shape == (4, 0, 3)
    assert ops.stats(attn, 16, ["entropy"], grid=[7, 7], reduction="none").shape == (1, 0, 3, 49)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grid_matches_fallback(dtype):
    attn = random_attention((2, 6, 65, 65), dtype, seed=5)
    for renormalize in (False, True):
        for reduction in ("mean", "none"):
            for stats in STAT_SETS[:3]:
                options = {"num_prefix_tokens": 1, "grid": [8, 8], "renormalize": renormalize,
                           "reduction": reduction}
                torch.testing.assert_close(ops.stats(attn, 16, list(stats), **options),
                                           fallback.stats(attn, 16, list(stats), **options), **tol(dtype))


# Position form ---------------------------------------------------------------------------------------------------


def _positions(n: int, k: int, seed: int, *, missing=(), lead=()) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    p = torch.rand(*lead, n, k, generator=gen, dtype=torch.float64) * 20
    for t in missing:
        p[..., t, :] = math.nan
    return p


# (name, attention shape, positions, key_positions): broadcast, per image and per window positions, queries and
# keys without a position (first, middle, last, runs), rectangular attention.
def _position_cases():
    return [
        ("complete windows", (2, 4, 3, 49, 49), _positions(49, 2, 1, lead=(4, 1)), None),
        ("broadcast, CLS", (2, 3, 197, 197), grid_positions(1, 14, 14).float(), None),
        ("missing tokens", (2, 3, 37, 37), _positions(37, 3, 2, missing=(0, 5, 6, 7, 20, 36)), None),
        ("per image", (2, 3, 17, 17), torch.stack([_positions(17, 1, 3, missing=(1,)),
                                                   _positions(17, 1, 4, missing=(9, 16))])[:, None], None),
        ("rectangular", (2, 3, 9, 33), _positions(9, 2, 5, missing=(4,)), _positions(33, 2, 6, missing=(0, 1, 32))),
        ("rectangular no gaps", (3, 16, 8), _positions(16, 2, 7), _positions(8, 2, 8)),
        ("one key", (2, 5, 1), _positions(5, 2, 9), _positions(1, 2, 10)),
    ]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_positions_match_reference(dtype, renormalize, reduction):
    for i, (name, shape, positions, key_positions) in enumerate(_position_cases()):
        stats = ALL if key_positions is None else ("entropy", "mad", "prefix_mass")
        stats = stats if i % 2 else stats[::-1]
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        attn = random_attention(shape, dtype, seed=20 + i, temperature=0.5)
        pos = positions.to(acc)
        keys = None if key_positions is None else key_positions.to(acc)
        got = ops.stats_pos(attn, pos, keys, list(stats), renormalize=renormalize, reduction=reduction)
        want = attention_stats_reference(attn, stats, positions=pos, key_positions=keys, renormalize=renormalize,
                                         reduction=reduction)
        assert got.shape == want.shape, name
        check(got, want, dtype)
        mad = ops.mad_pos(attn, pos, keys, renormalize=renormalize, reduction=reduction)
        assert_same_bits(got[stats.index("mad")], mad, name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_positions_strided_views(dtype):
    n = 37
    pos = _positions(n, 2, 30, missing=(0, 3, 4, 36)).float()
    views = {
        "padded rows": random_attention((2, 3, n, n + 5), dtype, seed=31)[..., :n],
        "key stride 2": random_attention((2, 3, n, 2 * n), dtype, seed=32)[..., ::2],
        "transposed": random_attention((2, 3, n, n), dtype, seed=33).transpose(-1, -2),
        "broadcast": random_attention((1, 3, n, n), dtype, seed=34).expand(2, 3, n, n),
    }
    for name, attn in views.items():
        for reduction in ("mean", "none"):
            got = ops.stats_pos(attn, pos, None, list(ALL), reduction=reduction)
            want = attention_stats_reference(attn, ALL, positions=pos, reduction=reduction)
            check(got, want, dtype)
            assert_same_bits(got[0], ops.mad_pos(attn, pos, None, reduction=reduction), name)


def test_positions_zero_size_and_no_query():
    pos = _positions(10, 2, 40)
    assert ops.stats_pos(torch.rand(3, 0, 10, 10, dtype=torch.float64), pos, None, list(ALL)).shape == (4, 3, 0)
    # No key: MAD, entropy and prefix mass are empty sums (MAD renormalised: 0 / 0), as the definition has them.
    no_keys = torch.rand(2, 5, 0)
    for renormalize in (False, True):
        for reduction in ("mean", "none"):
            stats = ("mad", "entropy", "prefix_mass")
            got = ops.stats_pos(no_keys, pos[:5].float(), pos[:0].float(), list(stats), renormalize=renormalize,
                                reduction=reduction)
            want = attention_stats_reference(no_keys, stats, positions=pos[:5].float(), key_positions=pos[:0].float(),
                                             renormalize=renormalize, reduction=reduction)
            check(got, want, torch.float32)
    # Every query without a position: NaN in "none" and in "mean" (no query to average over).
    attn = random_attention((2, 10, 10), torch.float32, seed=41)
    none = torch.full((10, 2), math.nan)
    assert ops.stats_pos(attn, none, None, list(ALL)).isnan().all()
    assert ops.stats_pos(attn, none, None, list(ALL), reduction="none").isnan().all()


def test_positions_match_fallback():
    attn = random_attention((2, 3, 4, 49, 49), torch.float32, seed=50)
    pos = _positions(49, 2, 51, lead=(3, 1), missing=(10,))
    for reduction in ("mean", "none"):
        for renormalize in (False, True):
            options = {"renormalize": renormalize, "reduction": reduction}
            torch.testing.assert_close(ops.stats_pos(attn, pos.float(), None, list(ALL), **options),
                                       fallback.stats_pos(attn, pos.float(), None, list(ALL), **options),
                                       equal_nan=True, **tol(torch.float32))


@pytest.mark.parametrize("specials_last", [False, True])
@pytest.mark.parametrize("nk", [13, 29, 64, 67])
def test_entropy_of_single_values(nk, specials_last):
    """A row whose only nonzero value x sits at column t (a diagonal) has entropy -x ln x exactly as the kernel's
    log gives it: every lane of the vectors and of the padded tail sees denormals, 1, values above 1, NaN and
    negatives, at the start of the rows and at their end (the last values, which the contiguous rows read as the
    row's last two vectors with the lanes already counted zeroed: 67 = 4 * 16 + 3 keys), and in rows shorter
    than two vectors (13). Within 2 ulp of float64 (the log's ulp and the product's rounding) where the kernels'
    clones fuse multiply-adds (AVX2 CPUs), 2.5 on CPUs without (log_check's bounds)."""
    gen = torch.Generator().manual_seed(60)
    specials = torch.tensor([0.0, 1.0, 1e-45, 1e-40, 1.17549435e-38, 0.5, 2.0, 0.70710677, 1.4142135, math.nan,
                             -0.25, 1 - 2**-24, 3.0e38], dtype=torch.float64)
    others = torch.exp(torch.empty(nk - 13, dtype=torch.float64).uniform_(-100, 0.5, generator=gen))
    values = (torch.cat([others, specials]) if specials_last else torch.cat([specials, others])).float().double()
    attn = torch.diag(values).float()
    pos = _positions(nk, 1, 61)
    want = -torch.special.xlogy(values, values)
    representable = want.float().isfinite()  # x ln x of 3e38 is beyond float's range: -inf
    ulp = (torch.finfo(torch.float32).eps * want.abs()).clamp_min(torch.finfo(torch.float32).smallest_normal)
    allowed = 2.0 if torch.backends.cpu.get_cpu_capability() != "DEFAULT" else 2.5
    # Contiguous rows (shared_distance_sums) and rows of stride nk (range_sums): the same diagonal matrix.
    for layout, matrix in (("contiguous", attn), ("strided", attn.t())):
        got = ops.stats_pos(matrix, pos.float(), None, ["entropy", "self_mass"], reduction="none")
        assert_same_bits(got[1], values.float(), layout)
        err = (got[0].double() - want).abs()
        bad = (err > allowed * ulp) & representable
        assert not bad.any(), (layout, values[bad])
        assert got[0][values.isnan() | (values < 0)].isnan().all(), layout
        assert got[0][values == 0].eq(0).all() and got[0][values == 1].eq(0).all(), layout
        assert got[0][values > 1e38].eq(-math.inf).all(), layout


@pytest.fixture(scope="module")
def log_check(tmp_path_factory) -> Path:
    if COMPILER is None:
        pytest.skip("no C++ compiler to build tests/cpp/log_check.cpp")
    exe = tmp_path_factory.mktemp("log") / "log_check"
    subprocess.run([COMPILER, "-std=gnu++20", "-O2", "-Wall", "-Wextra", "-Werror", f"-I{ROOT / 'csrc'}",
                    str(ROOT / "tests" / "cpp" / "log_check.cpp"), "-o", str(exe)], check=True)
    return exe


def test_vector_log_against_std_log(log_check):
    result = subprocess.run([log_check], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stdout
    numbers = result.stdout.split()
    # With fused multiply-adds (the x86-64-v3 clones and up): under 1 ulp for ln, 2 for the x ln x terms; the
    # baseline clone rounds each product: 1.06 and 2.31 ulp over the sweep.
    log_bound, term_bound = (1.0, 2.0) if numbers[7] == "1" else (1.5, 2.5)
    assert float(numbers[1]) < log_bound, result.stdout
    assert float(numbers[3]) < term_bound and float(numbers[5]) < term_bound, result.stdout


# Errors ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("stats", "message"), [
    (["mad", "spread"],
     "stats must be among 'mad', 'entropy', 'prefix_mass', 'self_mass', 'temporal_mad', got 'spread'"),
    (["entropy", "mad", "entropy"], "stats names 'entropy' twice"),
    ([], "stats must name at least one of 'mad', 'entropy', 'prefix_mass', 'self_mass', 'temporal_mad', got none"),
])
def test_stats_argument_errors(stats, message):
    attn = random_attention((2, 50, 50), torch.float32)
    full = f"{OP}: {message}"
    with pytest.raises(ValueError) as grid_error:
        ops.stats(attn, 16, stats, grid=[7, 7])
    with pytest.raises(ValueError) as pos_error:
        ops.stats_pos(attn, _positions(50, 2, 70).float(), None, stats)
    with pytest.raises(ValueError) as python_error:
        check_stats(stats, 50, 50, OP)
    for error in (grid_error, pos_error, python_error):
        assert str(error.value).splitlines()[0] == full


def test_self_mass_needs_square_attention():
    attn = random_attention((2, 9, 33), torch.float32)
    full = (f"{OP}: the statistic 'self_mass' needs the queries and the keys to be the same tokens (Nq == Nk), got "
            "Nq = 9 queries and Nk = 33 keys")
    with pytest.raises(ValueError) as error:
        ops.stats_pos(attn, _positions(9, 2, 71).float(), _positions(33, 2, 72).float(), ["mad", "self_mass"])
    with pytest.raises(ValueError) as python_error:
        check_stats(["mad", "self_mass"], 9, 33, OP)
    assert str(error.value).splitlines()[0] == full == str(python_error.value)
