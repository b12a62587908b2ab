"""Cost of ``vitmad.record`` on a video transformer: VideoMAE-B (transformers' base config, random weights).

Two routes in the same run, 16 frames of 224 x 224 px, batch 2 by default:
  plain   the model's forward alone (SDPA);
  record  the same forward inside ``vitmad.record``: every layer's spatial and temporal MAD.

Time: median over ``--repeats`` runs after one warm-up, the routes alternating so that load drifts hit both
alike; wall time and the process's CPU time. Memory: one fresh subprocess per route, peak RSS during the forward
(``_results.peak_rss``). Beside it, per layer, the recorder's measurement (one ``attention_stats_qk`` pass giving
the spatial and the temporal MAD: ``"temporal_mad"`` with ``times``), the two separate ``mad_qk`` calls the
recorder made before, the spatial call alone, and one SDPA call of the same shape. (One call over both position
sets stacked on a stride-0 leading dim was measured too, on 2026-11-30: 2109 ms against 1105 ms for two calls.)
Nothing is downloaded. Writes its section of benchmarks/RESULTS.md.
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

from _results import logits_route, machine, peak_rss, time_call, write_section

ROUTES = ("plain", "record")


def build_model(frames: int, image: int):
    """VideoMAE-B (12 layers, 12 heads, tubelets 2 x 16 x 16) built for ``frames`` frames of ``image`` px: its
    position table is sized at construction (with the default config, --frames and --image failed inside it)."""
    from transformers import VideoMAEConfig, VideoMAEModel

    torch.manual_seed(0)
    return VideoMAEModel(VideoMAEConfig(num_frames=frames, image_size=image)).eval()


def run_route(route: str, model, video: torch.Tensor) -> None:
    import vitmad

    with torch.inference_mode():
        if route == "plain":
            model(video)
            return
        with vitmad.record(model) as rec:
            model(video)
        assert rec.temporal_mad.shape[0] == 12


def time_routes(model, video: torch.Tensor, repeats: int) -> dict[str, tuple[float, float]]:
    """Median wall ms and median CPU ms of each route."""
    times: dict[str, list[tuple[float, float]]] = {route: [] for route in ROUTES}
    for repeat in range(repeats + 1):
        for route in ROUTES:
            wall, cpu = time.perf_counter(), time.process_time()
            run_route(route, model, video)
            if repeat > 0:  # the first round warms up
                times[route].append((time.perf_counter() - wall, time.process_time() - cpu))
    return {route: (statistics.median(w for w, _ in t) * 1e3, statistics.median(c for _, c in t) * 1e3)
            for route, t in times.items()}


def time_layer_ops(batch: int, tokens: tuple[int, int, int], repeats: int) -> dict[str, float]:
    """Milliseconds of one VideoMAE-B layer's measurement, each way: q, k ``[B, 12, F * gh * gw, 64]``."""
    import vitmad

    frames, rows, cols = tokens
    gen = torch.Generator().manual_seed(0)
    q, k = (torch.randn(batch, 12, frames * rows * cols, 64, generator=gen) for _ in range(2))
    f, r, c = torch.meshgrid(torch.arange(frames), torch.arange(rows), torch.arange(cols), indexing="ij")
    space = torch.stack([(r + 0.5) * 16, (c + 0.5) * 16], -1).reshape(-1, 2).float()
    times = ((f + 0.5) * 2).reshape(-1, 1).float()
    both = {
        "one pass (the recorder's)": lambda: vitmad.attention_stats_qk(
            q, k, positions=space, times=times, stats=("mad", "temporal_mad"), reduction="none"),
        "two calls": lambda: (vitmad.mad_qk(q, k, positions=space, reduction="none"),
                              vitmad.mad_qk(q, k, positions=times, reduction="none")),
        "spatial call only": lambda: vitmad.mad_qk(q, k, positions=space, reduction="none"),
        "model's SDPA": lambda: torch.nn.functional.scaled_dot_product_attention(q, k, k),
    }
    with torch.inference_mode():
        return {name: time_call(fn, "cpu", repeats=repeats) * 1e3 for name, fn in both.items()}


def memory_child(route: str, batch: int, frames: int, image: int) -> None:
    """Runs in a fresh process: prints the route's RSS figures as JSON."""
    model = build_model(frames, image)
    video = torch.randn(batch, frames, 3, image, image)
    run_route("plain", model, video[:1])  # one warm-up forward: lazily built buffers and caches
    print(json.dumps(peak_rss(lambda: run_route(route, model, video))))


def measure_memory(route: str, args) -> dict[str, float]:
    result = subprocess.run(
        [sys.executable, __file__, "--memory-child", route, "--batch", str(args.batch), "--frames", str(args.frames),
         "--image", str(args.image), "--threads", str(torch.get_num_threads())],
        capture_output=True, text=True, check=True,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--image", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per route after one warm-up")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--note", default="", help="free text added to the RESULTS.md section (e.g. machine load)")
    parser.add_argument("--no-write", action="store_true", help="print only, leave RESULTS.md alone")
    parser.add_argument("--memory-child", metavar="ROUTE", help=argparse.SUPPRESS)
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))
    torch.set_num_threads(args.threads)
    if args.memory_child:
        memory_child(args.memory_child, args.batch, args.frames, args.image)
        return

    import transformers

    import vitmad

    model = build_model(args.frames, args.image)
    video = torch.randn(args.batch, args.frames, 3, args.image, args.image)
    (plain_wall, plain_cpu), (record_wall, record_cpu) = time_routes(model, video, args.repeats).values()
    plain_memory, record_memory = (measure_memory(route, args) for route in ROUTES)
    grid = (args.frames // 2, args.image // 16, args.image // 16)
    ops = time_layer_ops(args.batch, grid, args.repeats)
    lines = [
        f"## vitmad.record on VideoMAE-B, CPU, {args.threads} torch thread(s) (benchmarks/bench_video.py)",
        "",
        f"{machine()}; transformers {transformers.__version__}; vitmad backend {vitmad.backend()}; "
        f"{logits_route()}"
        + (f". {args.note}" if args.note else ""),
        "",
        f"Batch {args.batch}, {args.frames} frames of {args.image}x{args.image} px ({grid[0]}x{grid[1]}x{grid[2]} "
        f"tubelets), random weights, SDPA; median of {args.repeats} after one warm-up, routes alternating. Memory: "
        "one process per route, VmHWM reset before the forward. Targets: time <= 1.2x, peak <= 1.1x.",
        "",
        "| route | wall ms | CPU ms | wall ratio | CPU ratio | peak RSS MiB | increase MiB | peak ratio |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for route, wall, cpu, memory in (("plain", plain_wall, plain_cpu, plain_memory),
                                     ("record (space + time)", record_wall, record_cpu, record_memory)):
        lines.append(f"| {route} | {wall:.0f} | {cpu:.0f} | {wall / plain_wall:.3f}x | {cpu / plain_cpu:.3f}x | "
                     f"{memory['peak_mib']:.0f} | {memory['increase_mib']:.0f} | "
                     f"{memory['peak_mib'] / plain_memory['peak_mib']:.3f}x |")
    lines += ["", "One layer's measurement (q, k of one layer), ms, median of "
              f"{args.repeats}:", "", "| way | ms | vs the model's SDPA |", "| --- | ---: | ---: |"]
    sdpa = ops["model's SDPA"]
    lines += [f"| {name} | {ms:.0f} | {ms / sdpa:.2f}x |" for name, ms in ops.items()]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        write_section(f"bench_video-cpu-threads{args.threads}", text)


if __name__ == "__main__":
    main()
