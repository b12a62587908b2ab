"""The routes of the flash-MAD CPU kernels' logits (csrc/cpu/block_logits.h): the register-tile kernels on keys
packed in 16-key panels (panel_logits.h: AVX-512's, the default on AVX-512 CPUs, and AVX2's, the default on the
others with AVX2 and FMA), ATen's GEMM (the default elsewhere) and, for bfloat16 on CPUs with AMX-BF16, oneDNN's
tile micro-kernels (tile_logits.h, the default there), each forced in a child process by VITMAD_CPU_LOGITS,
against the float64 references; and the two panel kernels against each other, bit for bit. The cases cross what
the kernels block by: 6- and 8-query strips (every remainder), 16-, 32- and 64-key panels (partial last panels, odd
panel counts), 512-key blocks, 128-wide chunks of the head dimension (D = 130, 257, 300), odd head dimensions (the
tiles pad them to even), scales that are and are not powers of two (the tiles fold only the former into the
queries), a bias read at the logits' row stride, 16-bit inputs, and the statistics pass with frames (the video
recorder's)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import vitmad
from conftest import compiled_kernel_available, make_bias, make_qk, subprocess_env, tolerance
from vitmad.ops.reference import attention_stats_qk_reference, mad_qk_positions_reference, mad_qk_reference

pytestmark = pytest.mark.skipif(not compiled_kernel_available("mad_qk", "cpu"),
                                reason="the routes are the compiled CPU kernel's")

# (B, H, N, prefix tokens, grid, D, dtype): patch counts N - prefix of every remainder modulo 6 and 8.
GRID_CASES = [
    (1, 1, 2, 1, [1, 1], 1, torch.float32),
    (2, 3, 17, 1, [4, 4], 5, torch.float32),
    (1, 2, 66, 1, [5, 13], 257, torch.float32),
    (1, 2, 530, 2, [24, 22], 64, torch.float32),
    (1, 1, 1031, 5, [38, 27], 130, torch.float32),
    (2, 2, 203, 3, [10, 20], 64, torch.bfloat16),
    (1, 3, 530, 2, [24, 22], 33, torch.bfloat16),
    (1, 2, 1031, 5, [38, 27], 80, torch.bfloat16),
    (1, 2, 101, 1, [10, 10], 40, torch.float16),
    (2, 2, 40, 1, [3, 13], 16, torch.float32),
    (1, 3, 150, 3, [7, 21], 64, torch.float32),
    (1, 1, 70, 3, [67, 1], 96, torch.float32),
    (1, 2, 55, 1, [6, 9], 24, torch.float32),
    (2, 1, 30, 1, [1, 29], 8, torch.float32),
]
# (B, H, N, D, bias kind) of the position form, with some keys without a position.
POSITION_CASES = [
    (1, 3, 700, 300, "full"),
    (2, 2, 523, 33, "key_mask"),
]

CHILD = textwrap.dedent("""
    import sys, torch
    sys.path[:0] = [{tests!r}, {ops_tests!r}]
    from test_cpu_logit_routes import compute
    torch.save(compute(), sys.argv[1])
""")

VIDEO_STATS = ("mad", "entropy", "self_mass", "temporal_mad")


def grid_case(case):
    """The kernel call and the float64 reference call of one grid case, on the same inputs."""
    batch, heads, n, prefix, grid, d, dtype = case
    q, k = make_qk(batch, heads, n, d, dtype, "cpu", seed=n + d, logit_scale=4 / d**0.5)
    layout = dict(num_prefix_tokens=prefix, grid=grid, reduction="none")
    return lambda: vitmad.mad_qk(q, k, 16, **layout), lambda: mad_qk_reference(q, k, 16, **layout)


def position_case(case):
    batch, heads, n, d, bias_kind = case
    gen = torch.Generator().manual_seed(n + d)
    q, k = make_qk(batch, heads, n, d, torch.float32, "cpu", seed=n * d, logit_scale=4 / d**0.5)
    positions = 100 * torch.rand(n, 2, generator=gen, dtype=torch.float64).float()
    positions[:3] = float("nan")  # three keys (and queries) without a position
    bias = make_bias(bias_kind, batch, heads, n, torch.float32, "cpu", gen)
    return (lambda: vitmad.mad_qk(q, k, positions=positions, attn_bias=bias, reduction="none"),
            lambda: mad_qk_positions_reference(q, k, positions, attn_bias=bias, reduction="none"))


def video_case():
    frames, rows, cols = 4, 5, 7
    f, r, c = torch.meshgrid(torch.arange(frames), torch.arange(rows), torch.arange(cols), indexing="ij")
    space = torch.stack([(r + 0.5) * 16, (c + 0.5) * 16], -1).reshape(-1, 2).float()
    times = ((f + 0.5) * 2).reshape(-1, 1).float()
    q, k = make_qk(2, 3, frames * rows * cols, 64, torch.float32, "cpu", seed=7, logit_scale=2.0)

    def kernel():
        stats = vitmad.attention_stats_qk(q, k, positions=space, times=times, stats=VIDEO_STATS, reduction="none")
        return torch.stack([stats[name] for name in VIDEO_STATS])

    return kernel, lambda: attention_stats_qk_reference(q, k, VIDEO_STATS, positions=space, times=times,
                                                        reduction="none")


def cases() -> list[tuple[str, Callable, Callable]]:
    """(label, kernel call, reference call) of every case, the inputs built the same in every process."""
    return ([(str(case), *grid_case(case)) for case in GRID_CASES]
            + [(str(case), *position_case(case)) for case in POSITION_CASES]
            + [("video", *video_case())])


def compute() -> list[torch.Tensor]:
    """Every case's result from this process's route."""
    return [kernel() for _, kernel, _ in cases()]


def run_child(route: str, tmp_path) -> subprocess.CompletedProcess:
    path = tmp_path / f"{route}.pt"
    here = Path(__file__).parent
    script = CHILD.format(tests=str(here.parent), ops_tests=str(here))
    return subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True,
                          env=subprocess_env(VITMAD_CPU_LOGITS=route), timeout=300)


def has_avx2() -> bool:
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


NO_AMX = "VITMAD_CPU_LOGITS=amx needs a CPU with AMX-BF16"


def has_avx512() -> bool:
    return torch.backends.cpu.get_cpu_capability() == "AVX512"


NEEDS_AVX2 = pytest.mark.skipif(not has_avx2(), reason="needs AVX2 and FMA")


@pytest.mark.parametrize("route", [
    "blas", pytest.param("panels", marks=NEEDS_AVX2), pytest.param("panels-avx2", marks=NEEDS_AVX2), "amx"])
def test_route_matches_float64_reference(route, tmp_path):
    result = run_child(route, tmp_path)
    if route == "amx" and result.returncode != 0 and NO_AMX in result.stderr:
        pytest.skip("this CPU has no AMX-BF16 (the child refused VITMAD_CPU_LOGITS=amx, as it should)")
    assert result.returncode == 0, result.stderr[-3000:]
    got = torch.load(tmp_path / f"{route}.pt")
    all_cases = cases()
    assert len(got) == len(all_cases)
    for (case, _, reference), out in zip(all_cases, got, strict=True):
        ref = reference()
        assert out.shape == ref.shape, case
        assert ref.isfinite().any(), case  # the reference measures something
        torch.testing.assert_close(out.double(), ref, **tolerance(torch.float32), equal_nan=True,
                                   msg=lambda m, case=case: f"{route}, {case}: {m}")


@pytest.mark.skipif(not has_avx512(), reason="the AVX-512 panel kernel needs AVX-512F")
def test_panel_kernels_agree_bit_for_bit(tmp_path):
    # Both kernels sum each logit as the same FMA chain per 128-wide chunk of the head dimension, so a model's MAD
    # does not depend on which of them the CPU runs. (Both routes widen 16-bit inputs, bfloat16 included.)
    results = {}
    for route in ("panels", "panels-avx2"):
        result = run_child(route, tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        results[route] = torch.load(tmp_path / f"{route}.pt")
    for (case, _, _), wide, narrow in zip(cases(), results["panels"], results["panels-avx2"], strict=True):
        assert torch.equal(wide.nan_to_num(-1.0), narrow.nan_to_num(-1.0)), case


def test_unknown_route_is_refused(tmp_path):
    result = run_child("mkl", tmp_path)
    assert result.returncode != 0
    assert ("VITMAD_CPU_LOGITS must be 'blas', 'panels', 'panels-avx2', 'amx' or unset, got 'mkl'"
            in result.stderr)


def test_tiles_follow_mkldnn_switch(tmp_path):
    # oneDNN's micro-kernels obey torch.backends.mkldnn: switched off, bfloat16 takes the widened float32 product
    # (the default route) and still matches the reference; VITMAD_CPU_LOGITS=amx then refuses instead.
    case = (1, 2, 203, 3, [10, 20], 40, torch.bfloat16)
    kernel, reference = grid_case(case)
    with torch.backends.mkldnn.flags(enabled=False):
        out = kernel()
    torch.testing.assert_close(out.double(), reference(), **tolerance(torch.float32), equal_nan=True)
    script = textwrap.dedent("""
        import torch, vitmad
        q = torch.randn(1, 1, 5, 8).bfloat16()
        with torch.backends.mkldnn.flags(enabled=False):
            vitmad.mad_qk(q, q, 16, grid=[2, 2])
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env=subprocess_env(VITMAD_CPU_LOGITS="amx"), timeout=300)
    assert result.returncode != 0
    assert NO_AMX in result.stderr
