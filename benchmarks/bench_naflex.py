"""Cost of ``vitmad.record`` on a packed native-resolution batch: SigLIP2-NaFlex vision tower, base size (CPU).

Two routes in the same run, on the same inputs:
  plain   ``Siglip2VisionModel`` (hidden 768, 12 layers, 12 heads, patch 16, SDPA) on 8 images of different
          aspect ratios, cut and padded by its own ``Siglip2ImageProcessor`` (``max_num_patches``, 256 by default);
  record  the same forward inside ``vitmad.record`` (each layer's MAD of every image on its own grid).

Time: median over ``--repeats`` runs after one warm-up round, the routes alternating so that load drifts hit
both alike; wall time, the process's CPU time and the fastest run. Memory: one fresh subprocess per route, peak
RSS during the forward (``_results.peak_rss``). Random weights; nothing is downloaded. Writes its section of
benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from _results import machine, peak_rss, write_section

ROUTES = ("plain", "record")
# (height, width) of the source images: portrait, landscape, square, panoramas, ...
SOURCES = ((480, 640), (640, 480), (512, 512), (300, 900), (900, 300), (720, 1280), (1000, 750), (400, 1200))


def build(max_patches: int):
    """The base-sized tower (random weights) and the processor's inputs for the 8 images."""
    import transformers
    from PIL import Image

    torch.manual_seed(0)
    config = transformers.Siglip2VisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                              num_attention_heads=12, patch_size=16, num_patches=256)
    model = transformers.Siglip2VisionModel(config).eval()
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in SOURCES]
    processor = transformers.Siglip2ImageProcessor(patch_size=16, max_num_patches=max_patches)
    return model, dict(processor(images, return_tensors="pt"))


def run_route(route: str, model, inputs: dict) -> None:
    import vitmad

    with torch.inference_mode():
        if route == "plain":
            model(**inputs)
            return
        with vitmad.record(model) as rec:
            model(**inputs)
        assert rec.mad.shape == (12, len(SOURCES), 12) and bool(rec.mad.isfinite().all())


def time_routes(model, inputs: dict, repeats: int) -> dict[str, tuple[float, float, float]]:
    """Median wall ms, median CPU ms and fastest wall ms of each route."""
    times: dict[str, list[tuple[float, float]]] = {route: [] for route in ROUTES}
    for repeat in range(repeats + 1):
        for route in ROUTES:
            wall, cpu = time.perf_counter(), time.process_time()
            run_route(route, model, inputs)
            if repeat > 0:  # the first round warms up
                times[route].append((time.perf_counter() - wall, time.process_time() - cpu))
    return {route: (statistics.median(w for w, _ in t) * 1e3, statistics.median(c for _, c in t) * 1e3,
                    min(w for w, _ in t) * 1e3) for route, t in times.items()}


def memory_child(route: str, max_patches: int) -> None:
    """Runs in a fresh process: prints the route's RSS figures as JSON."""
    model, inputs = build(max_patches)
    run_route("plain", model, {k: v[:1] for k, v in inputs.items()})  # warm-up: lazily built buffers
    print(json.dumps(peak_rss(lambda: run_route(route, model, inputs))))


def measure_memory(route: str, max_patches: int) -> dict[str, float]:
    result = subprocess.run(
        [sys.executable, __file__, "--memory-child", route, "--max-patches", str(max_patches),
         "--threads", str(torch.get_num_threads())],
        capture_output=True, text=True, check=True,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def _loadavg() -> str:
    try:
        return Path("/proc/loadavg").read_text().split()[0]
    except OSError:
        return "?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-patches", type=int, default=256, help="the processor's max_num_patches")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per route after one warm-up")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--skip-memory", action="store_true", help="time only")
    parser.add_argument("--note", default="", help="free text added to the RESULTS.md section")
    parser.add_argument("--no-write", action="store_true", help="print only, leave RESULTS.md alone")
    parser.add_argument("--memory-child", metavar="ROUTE", help=argparse.SUPPRESS)
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))
    torch.set_num_threads(args.threads)
    if args.memory_child:
        memory_child(args.memory_child, args.max_patches)
        return

    import transformers

    import vitmad

    model, inputs = build(args.max_patches)
    grids = [f"{h}x{w}" for h, w in inputs["spatial_shapes"].tolist()]
    load_before = _loadavg()
    times = time_routes(model, inputs, args.repeats)
    load_after = _loadavg()
    (plain_wall, plain_cpu, plain_best), (record_wall, record_cpu, record_best) = times["plain"], times["record"]
    row = (f"| SigLIP2-NaFlex base, 8 images | {plain_wall:.0f} | {record_wall:.0f} | "
           f"{record_wall / plain_wall:.3f}x | {record_cpu / plain_cpu:.3f}x | {record_best / plain_best:.3f}x")
    if args.skip_memory:
        row += " | - | - | - |"
    else:
        plain, rec = (measure_memory(route, args.max_patches) for route in ROUTES)
        row += (f" | {plain['peak_mib']:.0f} | {rec['peak_mib']:.0f} | {rec['peak_mib'] / plain['peak_mib']:.3f}x |")
    lines = [
        f"## vitmad.record on a packed SigLIP2-NaFlex batch, CPU, {args.threads} torch thread(s) "
        "(benchmarks/bench_naflex.py)",
        "",
        f"{machine()}; transformers {transformers.__version__}; vitmad backend {vitmad.backend()}; "
        f"1-minute load average {load_before} before and {load_after} after the timing"
        + (f". {args.note}" if args.note else ""),
        "",
        f"Siglip2VisionModel base (768 wide, 12 layers, 12 heads, patch 16, sdpa, random weights), 8 images packed "
        f"by its processor into {inputs['pixel_values'].shape[1]} slots; grids {', '.join(grids)}. Median of "
        f"{args.repeats}, routes alternating. Memory: one process per route, peak RSS during the forward. "
        "Targets: time <= 1.2x, peak memory <= 1.1x.",
        "",
        "| forward | plain wall ms | record wall ms | wall ratio | CPU ratio | fastest-run ratio | plain peak MiB | "
        "record peak MiB | peak ratio |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        row,
    ]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        write_section(f"bench_naflex-cpu-threads{args.threads}", text)


if __name__ == "__main__":
    main()
