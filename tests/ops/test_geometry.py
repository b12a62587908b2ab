"""The index helpers of csrc/mad_geometry.h, checked on the host.

``KeyWalk`` and ``split_for_vectors`` are used only by the CUDA kernels; compiling a small C++ harness against
the header checks them on machines without a GPU. ``MatrixOffsets`` is used by the CPU kernel too, so strided
leading dimensions are checked through the CPU op.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import vitmad
from conftest import random_attention, tolerance
from vitmad.ops.reference import mad_reference, pixel_distances

ROOT = Path(__file__).resolve().parents[2]  # the repository
COMPILER = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")


@pytest.fixture(scope="module")
def geometry_check(tmp_path_factory) -> Path:
    if COMPILER is None:
        pytest.skip("no C++ compiler to build tests/cpp/geometry_check.cpp")
    exe = tmp_path_factory.mktemp("geometry") / "geometry_check"
    subprocess.run(
        [COMPILER, "-std=c++17", "-O1", "-Wall", "-Wextra", "-Werror", f"-I{ROOT / 'csrc'}",
         str(ROOT / "tests" / "cpp" / "geometry_check.cpp"), "-o", str(exe)],
        check=True,
    )
    return exe


def test_walks_and_vector_splits_self_test(geometry_check):
    result = subprocess.run([geometry_check, "self-test"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stdout


@pytest.mark.parametrize(("grid_h", "grid_w", "query", "first"), [(14, 14, 0, 0), (14, 14, 97, 13), (3, 7, 20, 5),
                                                                   (37, 37, 700, 650), (1, 9, 4, 0), (9, 1, 4, 2)])
def test_key_walk_matches_reference_distances(geometry_check, grid_h, grid_w, query, first):
    result = subprocess.run([geometry_check, "walk", str(grid_h), str(grid_w), str(query), str(first)],
                            capture_output=True, text=True, check=True)
    walked = torch.tensor([float(v) for v in result.stdout.split()], dtype=torch.float64)
    expected = pixel_distances(grid_h, grid_w, 1.0, slice(query, query + 1))[0, first:]
    torch.testing.assert_close(walked, expected, rtol=1e-15, atol=0)


def _layouts():
    """Attention views whose leading dims merge in different ways: (name, view of a [2, 3, 4, N, N] tensor)."""
    return {
        "contiguous": lambda a: a,
        "permuted": lambda a: a.permute(2, 0, 1, 3, 4),
        "middle-transposed": lambda a: a.transpose(0, 1),
        "sliced-step": lambda a: a[:, ::2],
        "size-one-dims": lambda a: a[:, :1].unsqueeze(2),
        "expanded": lambda a: a[:, :1].expand(2, 5, 4, *a.shape[-2:]),
        "flattened-2d": lambda a: a[1, 2, 3],
    }


@pytest.mark.parametrize("layout", list(_layouts()))
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_cpu_op_reads_strided_leading_dims_in_place(layout, reduction):
    if not vitmad.has_compiled_kernel("mad", "CPU"):
        pytest.skip("the compiled CPU kernel is not built")
    attn = _layouts()[layout](random_attention((2, 3, 4, 17, 17), torch.float64, seed=3))
    out = vitmad.mad(attn, 16, reduction=reduction)
    torch.testing.assert_close(out, mad_reference(attn, 16, reduction=reduction), **tolerance(torch.float64))
