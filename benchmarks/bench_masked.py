"""Cost of ``vitmad.record`` on a masked encoder: ViTMAE-B/16 at 224 px, ``mask_ratio`` 0.75 (49 of 196 patches
kept per image, each image its own), against the same forward without recording.

  plain   ``ViTMAEModel`` forward, default (SDPA) attention, no MAD: the baseline;
  record  the same forward inside ``vitmad.record``: every layer's MAD over each image's kept patches.

Both cases get the same ``noise``, so they keep the same patches. Time: median over ``--repeats`` runs after
one warm-up, the cases interleaved; wall and process CPU time. Memory (CPU): one fresh subprocess per case, the
peak-RSS counter (VmHWM) reset through ``/proc/self/clear_refs`` right before the forward. Random weights from
``ViTMAEConfig()``; nothing is downloaded. Writes its section of benchmarks/RESULTS.md.
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

CASES = ("plain", "record")


def build(mask_ratio: float, batch: int):
    """ViTMAE-B/16 with random weights, its input and a fixed masking noise."""
    from transformers import ViTMAEConfig, ViTMAEModel

    torch.manual_seed(0)
    model = ViTMAEModel(ViTMAEConfig(mask_ratio=mask_ratio)).eval()  # hidden 768, 12 layers, 12 heads, 224 px
    gen = torch.Generator().manual_seed(1)
    pixels = torch.randn(batch, 3, 224, 224, generator=gen)
    noise = torch.rand(batch, 196, generator=gen)
    return model, pixels, noise


def run_case(case: str, model, pixels: torch.Tensor, noise: torch.Tensor) -> torch.Tensor | None:
    import vitmad

    with torch.no_grad():
        if case == "plain":
            model(pixels, noise=noise)
            return None
        with vitmad.record(model) as rec:
            model(pixels, noise=noise)
        return rec.mad


def time_cases(mask_ratio: float, batch: int, repeats: int) -> dict[str, tuple[float, float]]:
    """Median (wall ms, CPU ms) of each case."""
    model, pixels, noise = build(mask_ratio, batch)
    times: dict[str, list[tuple[float, float]]] = {case: [] for case in CASES}
    for repeat in range(repeats + 1):
        for case in CASES:
            wall, cpu = time.perf_counter(), time.process_time()
            run_case(case, model, pixels, noise)
            if repeat > 0:  # the first round warms up
                times[case].append((time.perf_counter() - wall, time.process_time() - cpu))
    return {case: (statistics.median(w for w, _ in t) * 1e3, statistics.median(c for _, c in t) * 1e3)
            for case, t in times.items()}


def memory_child(case: str, mask_ratio: float, batch: int) -> None:
    """Runs in a fresh process: prints the case's RSS figures as JSON."""
    model, pixels, noise = build(mask_ratio, batch)
    print(json.dumps(peak_rss(lambda: run_case(case, model, pixels, noise))))


def measure_memory(case: str, mask_ratio: float, batch: int, threads: int) -> dict[str, float]:
    result = subprocess.run(
        [sys.executable, __file__, "--memory-child", case, "--mask-ratio", str(mask_ratio), "--batch", str(batch),
         "--threads", str(threads)],
        capture_output=True, text=True, check=True,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16, help="images per forward (default 16)")
    parser.add_argument("--mask-ratio", type=float, default=0.75, help="ViTMAE's mask_ratio (default 0.75)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per case after one warm-up")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="torch threads (default: torch's default); 1 avoids OpenMP waits on a loaded machine")
    parser.add_argument("--skip-memory", action="store_true", help="time only")
    parser.add_argument("--note", default="", help="free text added to the RESULTS.md section (e.g. machine load)")
    parser.add_argument("--no-write", action="store_true", help="print only, leave RESULTS.md alone")
    parser.add_argument("--memory-child", choices=CASES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))
    torch.set_num_threads(args.threads)
    if args.memory_child:
        memory_child(args.memory_child, args.mask_ratio, args.batch)
        return

    import vitmad

    kept = int(196 * (1 - args.mask_ratio))
    lines = [
        f"## vitmad.record on ViTMAE-B/16, mask_ratio {args.mask_ratio}, CPU, {args.threads} torch thread(s) "
        "(benchmarks/bench_masked.py)",
        "",
        f"{machine()}; vitmad backend {vitmad.backend()}" + (f". {args.note}" if args.note else ""),
        "",
        f"Forward time, batch {args.batch}, 224x224 px, {kept} of 196 patches kept per image (1 + {kept} tokens), "
        f"median of {args.repeats} (random weights, the same noise in both cases):",
        "",
        "| case | wall ms | wall vs plain | CPU ms | CPU vs plain |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    times = time_cases(args.mask_ratio, args.batch, args.repeats)
    base_wall, base_cpu = times["plain"]
    for case in CASES:
        wall, cpu = times[case]
        lines.append(f"| {case} | {wall:.0f} | {wall / base_wall:.2f}x | {cpu:.0f} | {cpu / base_cpu:.2f}x |")
    if not args.skip_memory:
        lines += [
            "",
            f"Peak RSS of one forward, batch {args.batch}, CPU, one process per case (VmHWM reset before the "
            "forward):",
            "",
            "| case | RSS before MiB | forward peak MiB | increase MiB | peak vs plain |",
            "| --- | ---: | ---: | ---: | ---: |",
        ]
        results = {}
        for case in CASES:
            results[case] = r = measure_memory(case, args.mask_ratio, args.batch, args.threads)
            lines.append(f"| {case} | {r['before_mib']:.0f} | {r['peak_mib']:.0f} | {r['increase_mib']:.0f} | "
                         f"{r['peak_mib'] / results['plain']['peak_mib']:.2f}x |")
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        write_section(f"bench_masked-mask{args.mask_ratio}-threads{args.threads}", text)


if __name__ == "__main__":
    main()
