"""Shared by the benchmark scripts: timing, machine description and benchmarks/RESULTS.md sections."""

from __future__ import annotations

import datetime
import os
import platform
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS = Path(__file__).with_name("RESULTS.md")


def machine() -> str:
    """One line naming the CPU or GPU, the core count, torch and the date."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (
        f"{cpu}, {os.cpu_count()} cores ({torch.get_num_threads()} torch threads){gpu}; "
        f"torch {torch.__version__}; Python {platform.python_version()}; "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC"
    )


def time_once(fn: Callable[[], object], device: str) -> float:
    """Wall time of one fn() in seconds (CUDA: measured with events on the current stream)."""
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def time_call(fn: Callable[[], object], device: str, repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of fn() in seconds over `repeats` calls after `warmup` calls."""
    for _ in range(warmup):
        fn()
    return statistics.median(time_once(fn, device) for _ in range(repeats))


def status_mib(field: str) -> float:
    """A memory figure of this process from ``/proc/self/status`` (``VmRSS``, ``VmHWM``), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def peak_rss(fn: Callable[[], object]) -> dict[str, float]:
    """The process's RSS just before ``fn()`` and its peak during it (Linux): the kernel's peak-RSS counter
    (VmHWM) is reset through ``/proc/self/clear_refs`` right before the call. Run it in a fresh process per case,
    after a warm-up, so that the figures of one case do not include another's.

    Returns:
        ``{"before_mib", "peak_mib", "increase_mib"}``.
    """
    before = status_mib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (peak RSS) to the current RSS
    fn()
    peak = status_mib("VmHWM")
    return {"before_mib": before, "peak_mib": peak, "increase_mib": peak - before}


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def write_section(name: str, body: str) -> None:
    """Replace (or append) the section `name` of RESULTS.md, leaving the other benchmarks' sections as they are."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    header = "# Benchmark results\n\nWritten by the scripts in benchmarks/.\n"
    text = RESULTS.read_text() if RESULTS.exists() else header
    block = f"{start}\n{body.strip()}\n{end}"
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    RESULTS.write_text(text)

