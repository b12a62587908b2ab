"""benchmarks/gpu_check.sh without a GPU: it checks its arguments, says so and exits 0 (a bad argument: 2)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.sh"
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the dry run is what a machine without a GPU does")


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable})


def test_dry_run_without_gpu_says_so_and_exits_0(tmp_path):
    done = _run(str(tmp_path / "out"))
    assert done.returncode == 0, done.stderr
    assert "no CUDA GPU" in done.stdout
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args", [[], ["OUT", "--budget", "0"], ["/etc/passwd/out"], ["OUT", "--frobnicate"]])
def test_bad_arguments_exit_2(tmp_path, args):
    done = _run(*[str(tmp_path / "OUT") if a == "OUT" else a for a in args])
    assert done.returncode == 2
    assert "gpu_check: error:" in done.stderr
