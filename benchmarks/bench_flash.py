"""Flash-MAD benchmark: vitmad.mad_qk against F.scaled_dot_product_attention and "softmax then mad".

All three routes get the same q, k (and v for SDPA) of shape [B, H, N, D]:
- ``mad_qk``: ``vitmad.mad_qk(q, k, patch)``, the attention never materialised;
- ``sdpa``: ``F.scaled_dot_product_attention(q, k, v)``, the attention a model computes anyway (the target:
  mad_qk at most 1.5x its time); on CUDA the flash backend is forced for 16-bit input, and float32 gets torch's
  own choice (flash has no float32 kernel);
- ``materialised``: ``vitmad.mad(softmax(q @ k^T * scale), patch)``, what MAD costs without mad_qk.

Time: median of --repeats timings after a warm-up call; on CUDA each timing spans enough back-to-back calls to
last about 2 ms, so the host's launch cost hides behind the kernels. Memory: CPU, one fresh subprocess per route
and shape; the kernel's peak-RSS counter (VmHWM) is reset through /proc/self/clear_refs just before the call, so the
"extra peak" is the peak RSS during the call minus the RSS just before it (inputs already allocated). CUDA:
torch.cuda.max_memory_allocated during the call minus the memory allocated before it.

Usage: ``PYTHONPATH=python python benchmarks/bench_flash.py --device cpu`` (writes its section of
benchmarks/RESULTS.md unless --no-write).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

import vitmad
from _results import calls_per_timing, logits_route, machine, peak_rss, time_once, write_section

RESULTS = Path(__file__).with_name("RESULTS.md")
ROUTES = ("mad_qk", "sdpa", "materialised")
CPU_SHAPES = ["8,16,577,64", "1,16,4097,64"]
CUDA_SHAPES = ["8,16,197,64", "8,16,577,64", "4,16,1025,64", "1,16,4097,64", "1,16,16385,64"]
PATCH = 16
# The materialised route is skipped where its attention alone would exceed this many bytes.
MATERIALISED_LIMIT_BYTES = 24 << 30


def parse_shape(text: str) -> tuple[int, int, int, int]:
    shape = tuple(int(s) for s in text.split(","))
    if len(shape) != 4:
        raise argparse.ArgumentTypeError(f"a shape is B,H,N,D (4 integers), got {text!r}")
    return shape


def grid_of(n: int) -> list[int]:
    """A square grid for N - 1 patches (one CLS token): every benchmark shape is 1 + side^2 tokens."""
    side = int(round((n - 1) ** 0.5))
    if side * side != n - 1:
        raise SystemExit(f"N = {n} is not 1 + a square; use N such as 197, 577, 1025, 4097, 16385")
    return [side, side]


def make_inputs(shape, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen).to(device=device, dtype=dtype) for _ in range(3)]


def route(name: str, q, k, v) -> Callable[[], object]:
    """A zero-argument call running one route on q, k (v for SDPA)."""
    grid = grid_of(q.shape[-2])
    if name == "mad_qk":
        return lambda: vitmad.mad_qk(q, k, PATCH, grid=grid)
    if name == "sdpa":
        if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):  # flash has no float32 kernel
            from torch.nn.attention import SDPBackend, sdpa_kernel

            def flash():
                with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                    return F.scaled_dot_product_attention(q, k, v)

            return flash
        return lambda: F.scaled_dot_product_attention(q, k, v)
    scale = q.shape[-1] ** -0.5
    return lambda: vitmad.mad(torch.softmax(q @ k.transpose(-1, -2) * scale, -1), PATCH, grid=grid)


def materialised_bytes(shape, dtype) -> int:
    b, h, n, _ = shape
    return b * h * n * n * torch.tensor([], dtype=dtype).element_size()


def time_routes(fns: dict[str, Callable[[], object]], device: str, repeats: int) -> dict[str, float]:
    """Median seconds per route after one warm-up call each. The routes take turns within every repeat, so
    load from other processes on a shared machine falls on all of them alike (CUDA: events on the stream)."""
    for fn in fns.values():
        fn()
    calls = {name: calls_per_timing(fn, device) for name, fn in fns.items()}
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(time_once(fn, device, calls[name]))
    return {name: statistics.median(t) for name, t in times.items()}


def _memory_child(name: str, shape: str, dtype: str) -> None:
    """Runs in a fresh process: prints the RSS before the call and the peak during it, in MiB, as JSON."""
    q, k, v = make_inputs(parse_shape(shape), getattr(torch, dtype), "cpu")
    fn = route(name, q, k, v)
    print(json.dumps(peak_rss(fn)))


def cpu_extra_peak_mib(name: str, shape, dtype: torch.dtype) -> float:
    cmd = [sys.executable, __file__, "--memory-child", name, ",".join(map(str, shape)), str(dtype).split(".")[1]]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=os.environ.copy()).stdout
    result = json.loads(out.strip().splitlines()[-1])
    return result["peak_mib"] - result["before_mib"]


def cuda_extra_peak_mib(fn) -> float:
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                        help="input dtype (default: float32 on CPU, bfloat16 on CUDA)")
    parser.add_argument("--shapes", nargs="+", type=parse_shape, default=None, metavar="B,H,N,D",
                        help=f"q/k/v shapes (default CPU: {' '.join(CPU_SHAPES)}; CUDA: {' '.join(CUDA_SHAPES)})")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per route (default 5 CPU, 25 CUDA)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements")
    parser.add_argument("--note", default="", help="a remark printed under the table (e.g. machine load)")
    parser.add_argument("--no-write", action="store_true", help="print only, do not touch RESULTS.md")
    parser.add_argument("--memory-child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        _memory_child(*args.memory_child)
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    dtype = getattr(torch, args.dtype or ("float32" if args.device == "cpu" else "bfloat16"))
    if args.repeats is None:  # a GPU call takes microseconds to a few milliseconds: more of them for a stable median
        args.repeats = 5 if args.device == "cpu" else 25
    shapes = args.shapes or [parse_shape(s) for s in (CPU_SHAPES if args.device == "cpu" else CUDA_SHAPES)]

    rows = []
    for shape in shapes:
        q, k, v = make_inputs(shape, dtype, args.device)
        fns = {
            name: route(name, q, k, v)
            for name in ROUTES
            if name != "materialised" or materialised_bytes(shape, dtype) <= MATERIALISED_LIMIT_BYTES
        }
        peaks = {}
        with torch.no_grad():
            times = time_routes(fns, args.device, args.repeats)
            if not args.no_memory:
                for name in fns.keys() - {"sdpa"}:
                    peaks[name] = (cpu_extra_peak_mib(name, shape, dtype) if args.device == "cpu"
                                   else cuda_extra_peak_mib(fns[name]))

        def ms(name):
            return f"{times[name] * 1e3:.{1 if args.device == 'cpu' else 3}f}" if name in times else "skipped"

        def ratio(a, b):
            return f"{times[a] / times[b]:.2f}x" if a in times and b in times else "-"

        def mib(name):
            return f"{peaks[name]:.1f}" if name in peaks else "-"

        rows.append([
            "x".join(map(str, shape)), ms("mad_qk"), ms("sdpa"), ms("materialised"), ratio("mad_qk", "sdpa"),
            ratio("mad_qk", "materialised"), mib("mad_qk"), mib("materialised"),
        ])
        print(" | ".join(rows[-1]), flush=True)

    header = ["B x H x N x D", "mad_qk ms", "sdpa ms", "materialised ms", "mad_qk / sdpa", "mad_qk / materialised",
              "mad_qk extra peak MiB", "materialised extra peak MiB"]
    table = "\n".join(["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
                      + ["| " + " | ".join(r) + " |" for r in rows])
    if args.no_memory:  # the columns say "-": say why, not how figures that are not there would be measured
        memory_note = "peak memory not measured (--no-memory)"
    elif args.device == "cpu":
        memory_note = "extra peak = peak RSS during one call minus RSS before it, fresh process per case"
    else:
        memory_note = "extra peak = max_memory_allocated during one call minus before"
    body = "\n".join([
        f"## Flash-MAD: mad_qk vs SDPA and softmax-then-mad ({args.device}, {str(dtype).split('.')[1]}) "
        "(benchmarks/bench_flash.py)",
        "",
        machine() + f"; vitmad backend {vitmad.backend()}"
        + (f"; {logits_route()}." if args.device == "cpu" else "."),
        "",
        f"Median of {args.repeats} calls; patch {PATCH}, one CLS token; {memory_note}.",
        "",
        table,
        *(["", args.note] if args.note else []),
    ])
    print()
    print(body)
    if not args.no_write:
        write_section(f"bench_flash-{args.device}-{str(dtype).split('.')[1]}", body)


if __name__ == "__main__":
    main()
