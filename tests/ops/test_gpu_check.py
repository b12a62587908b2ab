"""benchmarks/gpu_check.sh without a GPU: it checks its arguments, says so and exits 0 (a bad argument: 2)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import vitmad

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


def test_sanitizer_cases_are_valid_calls(capsys):
    # The calls compute-sanitizer runs on a GPU, made on the CPU kernels: a GPU session must not lose its minutes
    # to a call that is refused for its arguments. They are calls of the compiled ops (gpu_check asserts it).
    if vitmad.backend() != "compiled":
        pytest.skip("the sanitizer cases call the compiled ops; this run uses the Python fallback")
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(SCRIPT.parent))
    gpu_check.run_sanitizer_cases(device="cpu")
    assert capsys.readouterr().out.strip().endswith("sanitizer cases done")
