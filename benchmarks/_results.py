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


def logits_route() -> str:
    """Which product gives mad_qk's logits on the CPU in this process, as the kernel decides it
    (csrc/cpu/panel_logits.h, tile_logits.h): VITMAD_CPU_LOGITS if set, else by the CPU (torch's capability stands
    in for it; bfloat16 runs on AMX tiles where the CPU has AMX-BF16)."""
    chosen = os.environ.get("VITMAD_CPU_LOGITS", "")
    capability = torch.backends.cpu.get_cpu_capability()
    amx = " and AMX-BF16" if cpu_has_amx_bf16() else ""
    if chosen:
        return f"CPU logits VITMAD_CPU_LOGITS={chosen} (CPU capability {capability}{amx})"
    default = {"AVX2": "AVX2 panels", "AVX512": "AVX-512 panels"}.get(capability, "ATen's GEMM")
    if amx:
        default += " (bfloat16: AMX tiles)"
    return f"CPU logits: the default, {default} (CPU capability {capability}{amx})"


def cpu_has_amx_bf16() -> bool:
    """Whether the CPU reports AMX-BF16 (Linux's /proc/cpuinfo flags; False elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            return any(line.startswith("flags") and " amx_bf16" in line for line in info)
    except OSError:
        return False


def time_once(fn: Callable[[], object], device: str, calls: int = 1) -> float:
    """Wall time of one fn() in seconds, the mean of `calls` back-to-back calls (CUDA: measured with events on the
    current stream, so that with enough calls the host's launch cost hides behind the kernels and the figure is
    the GPU's time per call)."""
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / calls
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls


def calls_per_timing(fn: Callable[[], object], device: str, target_seconds: float = 2e-3) -> int:
    """How many back-to-back calls one CUDA timing should span to last about `target_seconds` (1 on the CPU,
    where one call of a benchmark case takes milliseconds or more)."""
    if device != "cuda":
        return 1
    one = time_once(fn, device)
    return int(min(1000, max(1, target_seconds // max(one, 1e-7))))


def time_call(fn: Callable[[], object], device: str, repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of fn() in seconds over `repeats` timings after `warmup` calls; on CUDA each timing spans
    enough back-to-back calls to last about 2 ms (calls_per_timing)."""
    for _ in range(warmup):
        fn()
    calls = calls_per_timing(fn, device)
    return statistics.median(time_once(fn, device, calls) for _ in range(repeats))


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
    """Replace (or append) the section `name` of RESULTS.md, leaving the other benchmarks' sections as they are.

    Refuses while vitmad runs its pure-PyTorch kernels: figures of the fallback once stood in RESULTS.md as the
    compiled library's (a Hiera-S recording at 1.17x the plain forward, about 1.0x with the kernels).
    """
    import vitmad
    from vitmad.ops.fallback import SCHEMAS

    if not all(vitmad.ops.has_compiled_kernel(op, "CPU") for op in SCHEMAS):
        raise SystemExit("benchmarks: vitmad is running its pure-PyTorch kernels (the compiled library did not load "
                         "or lacks ops); build it (README) before recording figures, or pass --no-write")
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    header = "# Benchmark results\n\nWritten by the scripts in benchmarks/.\n"
    text = RESULTS.read_text() if RESULTS.exists() else header
    block = f"{start}\n{body.strip()}\n{end}"
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    RESULTS.write_text(text)

