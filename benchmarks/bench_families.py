"""Cost of ``vitmad.record`` on hierarchical vision transformers: Swin-T, PVT-v2-b2 and Hiera-S (timm).

For each model, two cases in the same run:
  plain   the model's forward alone (timm defaults: Swin computes its window softmax itself, PVT-v2 and Hiera
          call SDPA);
  record  the same forward inside ``vitmad.record`` (every attention layer's MAD, placed by its family).

Time: batch 8 at 224 px by default, median over ``--repeats`` runs after one warm-up, the cases interleaved so
that load drifts hit both alike; wall time and the process's CPU time (all threads). Memory (CPU): one fresh
subprocess per model and case; the kernel's peak-RSS counter (VmHWM) is reset through ``/proc/self/clear_refs``
right before the forward, so "forward peak" is the process's peak RSS during the forward and "increase" is that
minus the RSS just before it (model and input already in memory). Random weights; nothing is downloaded.
Writes its section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from _results import machine, peak_rss, write_section

MODELS = ("swin_tiny_patch4_window7_224", "pvt_v2_b2", "hiera_small_224")
CASES = ("plain", "record")


def build_model(name: str):
    import timm

    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False).eval()


def run_case(case: str, model, pixels: torch.Tensor) -> None:
    import vitmad

    with torch.inference_mode():
        if case == "plain":
            model(pixels)
            return
        with vitmad.record(model) as rec:
            model(pixels)
        assert rec.per_layer


def time_model(name: str, batch: int, image: int, repeats: int) -> dict[str, tuple[float, float, float]]:
    """Median wall ms, median CPU ms and fastest wall ms of each case (the fastest run is the one least disturbed
    by other work on a shared machine)."""
    model = build_model(name)
    pixels = torch.randn(batch, 3, image, image)
    times: dict[str, list[tuple[float, float]]] = {case: [] for case in CASES}
    for repeat in range(repeats + 1):
        for case in CASES:
            wall, cpu = time.perf_counter(), time.process_time()
            run_case(case, model, pixels)
            if repeat > 0:  # the first round warms up
                times[case].append((time.perf_counter() - wall, time.process_time() - cpu))
    return {case: (statistics.median(w for w, _ in t) * 1e3, statistics.median(c for _, c in t) * 1e3,
                   min(w for w, _ in t) * 1e3) for case, t in times.items()}


def memory_child(name: str, case: str, batch: int, image: int) -> None:
    """Runs in a fresh process: prints the case's RSS figures as JSON."""
    model = build_model(name)
    pixels = torch.randn(batch, 3, image, image)
    run_case("plain", model, pixels[:1])  # one small warm-up forward: lazily built buffers and caches
    print(json.dumps(peak_rss(lambda: run_case(case, model, pixels))))


def measure_memory(name: str, case: str, batch: int, image: int) -> dict[str, float]:
    result = subprocess.run(
        [sys.executable, __file__, "--memory-child", name, case, "--batch", str(batch), "--image", str(image),
         "--threads", str(torch.get_num_threads())],
        capture_output=True, text=True, check=True,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), help="timm model names")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--image", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per case after one warm-up")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--skip-memory", action="store_true", help="time only")
    parser.add_argument("--note", default="", help="free text added to the RESULTS.md section (e.g. machine load)")
    parser.add_argument("--no-write", action="store_true", help="print only, leave RESULTS.md alone")
    parser.add_argument("--memory-child", nargs=2, metavar=("MODEL", "CASE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))
    torch.set_num_threads(args.threads)
    if args.memory_child:
        memory_child(*args.memory_child, args.batch, args.image)
        return

    import timm

    import vitmad

    lines = [
        f"## vitmad.record on hierarchical models, CPU, {args.threads} torch thread(s) "
        "(benchmarks/bench_families.py)",
        "",
        f"{machine()}; timm {timm.__version__}; vitmad backend {vitmad.backend()}"
        + (f". {args.note}" if args.note else ""),
        "",
        f"Batch {args.batch}, {args.image}x{args.image} px, median of {args.repeats} (random weights). Memory: "
        "one process per case, VmHWM reset before the forward.",
        "",
        "| model | plain wall ms | record wall ms | wall ratio | CPU ratio | fastest-run ratio | plain peak MiB | "
        "record peak MiB | peak ratio | increase ratio |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name in args.models:
        times = time_model(name, args.batch, args.image, args.repeats)
        (plain_wall, plain_cpu, plain_best), (record_wall, record_cpu, record_best) = times["plain"], times["record"]
        row = (f"| {name} | {plain_wall:.0f} | {record_wall:.0f} | {record_wall / plain_wall:.3f}x | "
               f"{record_cpu / plain_cpu:.3f}x | {record_best / plain_best:.3f}x")
        if args.skip_memory:
            row += " | - | - | - | - |"
        else:
            plain, rec = (measure_memory(name, case, args.batch, args.image) for case in CASES)
            row += (f" | {plain['peak_mib']:.0f} | {rec['peak_mib']:.0f} | {rec['peak_mib'] / plain['peak_mib']:.3f}x"
                    f" | {rec['increase_mib'] / max(plain['increase_mib'], 1e-9):.3f}x |")
        print(row, flush=True)
        lines.append(row)
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        write_section(f"bench_families-cpu-threads{args.threads}", text)


if __name__ == "__main__":
    main()
