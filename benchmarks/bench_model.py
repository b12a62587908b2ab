"""Cost of ``vitmad.record`` on a ViT-B/16 forward: time at 224 px and peak memory at 1024 px (N = 4097).

Ways to get every layer's MAD (and the statistics beside it), compared in the same run:
  sdpa    the forward alone, default (SDPA) attention, no MAD: the baseline;
  record  the same forward inside ``vitmad.record`` (MAD of every layer, maps never stored);
  record_stats
          the same with every statistic and the CLS maps (``stats=[entropy, prefix_mass, self_mass,
          prefix_maps]``), from the same op call per layer (issue target: at most 1.1x sdpa);
  eager   the route users take today: ``attn_implementation="eager"``, ``output_attentions=True``, then
          ``vitmad.attention_stats`` (MAD, the statistics and the CLS rows) on the returned maps.

Time: median over ``--repeats`` runs after one warm-up, the cases interleaved so that load drifts hit all alike;
both wall time and the process's CPU time (all threads), which other processes on a shared machine disturb less.
Memory (CPU): one fresh subprocess per case; the kernel's peak-RSS counter (VmHWM) is reset through
``/proc/self/clear_refs`` right before the forward, so "forward peak" is the process's peak RSS during the
forward, and "increase" is that minus the RSS just before it (model and input already in memory).
Random ViT-B/16 weights from ``ViTConfig()``; nothing is downloaded. Writes its section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from _results import machine, peak_rss, write_section

CASES = ("sdpa", "record", "record_stats", "eager")
STATS = ["entropy", "prefix_mass", "self_mass", "prefix_maps"]


def build_model(implementation: str):
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    config = ViTConfig()  # ViT-B/16 at 224: 12 layers, 12 heads, hidden 768
    config._attn_implementation = implementation
    return ViTModel(config).eval()


def run_case(case: str, model, pixels: torch.Tensor) -> torch.Tensor | None:
    """One forward of ``case``; returns the ``[L, B, H]`` MAD where the case computes it."""
    import vitmad

    kwargs = {"interpolate_pos_encoding": pixels.shape[-1] != 224}
    with torch.no_grad():
        if case == "sdpa":
            model(pixels, **kwargs)
            return None
        if case in ("record", "record_stats"):
            with vitmad.record(model, stats=STATS if case == "record_stats" else ["mad"]) as rec:
                model(pixels, **kwargs)
            return rec.mad
        maps = model(pixels, output_attentions=True, **kwargs).attentions
        return torch.stack([vitmad.attention_stats(a, 16, stats=["mad", *STATS])["mad"] for a in maps])


def time_cases(batch: int, image: int, repeats: int, device: str) -> dict[str, tuple[float, float]]:
    """Median (wall ms, CPU ms) of each case."""
    models = {"sdpa": build_model("sdpa").to(device)}
    models["record"] = models["record_stats"] = models["sdpa"]
    models["eager"] = copy.deepcopy(models["sdpa"])
    models["eager"].set_attn_implementation("eager")
    pixels = torch.randn(batch, 3, image, image, device=device)
    times: dict[str, list[tuple[float, float]]] = {case: [] for case in CASES}
    for repeat in range(repeats + 1):
        for case in CASES:
            if device == "cuda":
                torch.cuda.synchronize()
            wall, cpu = time.perf_counter(), time.process_time()
            run_case(case, models[case], pixels)
            if device == "cuda":
                torch.cuda.synchronize()
            if repeat > 0:  # the first round warms up
                times[case].append((time.perf_counter() - wall, time.process_time() - cpu))
    return {
        case: (statistics.median(w for w, _ in t) * 1e3, statistics.median(c for _, c in t) * 1e3)
        for case, t in times.items()
    }


def memory_child(case: str, image: int) -> None:
    """Runs in a fresh process: prints the case's RSS figures as JSON."""
    model = build_model("eager" if case == "eager" else "sdpa")
    pixels = torch.randn(1, 3, image, image)
    print(json.dumps(peak_rss(lambda: run_case(case, model, pixels))))


def measure_memory(case: str, image: int) -> dict[str, float]:
    result = subprocess.run(
        [sys.executable, __file__, "--memory-child", case, "--memory-image", str(image), "--threads",
         str(torch.get_num_threads())],
        capture_output=True, text=True, check=True,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def eager_memory_needed_mib(image: int) -> float:
    """The eager route keeps 12 layers of [1, 12, N, N] float32 maps, plus one layer's logits while forming one."""
    n = (image // 16) ** 2 + 1
    return 13 * 12 * n * n * 4 / 2**20


def available_mib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    return 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32, help="batch of the timed 224 px forward (default 32)")
    parser.add_argument("--image", type=int, default=224, help="image size of the timed forward")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per case after one warm-up")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="device of the timed forward")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="torch threads (default: torch's default); 1 avoids OpenMP waits on a loaded machine")
    parser.add_argument("--memory-image", type=int, default=1024, help="image size of the memory cases")
    parser.add_argument("--skip-memory", action="store_true", help="time only")
    parser.add_argument("--note", default="", help="free text added to the RESULTS.md section (e.g. machine load)")
    parser.add_argument("--no-write", action="store_true", help="print only, leave RESULTS.md alone")
    parser.add_argument("--memory-child", choices=CASES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))
    torch.set_num_threads(args.threads)
    if args.memory_child:
        memory_child(args.memory_child, args.memory_image)
        return

    import vitmad

    lines = [
        f"## vitmad.record on ViT-B/16, {args.device}, {args.threads} torch thread(s) (benchmarks/bench_model.py)",
        "",
        f"{machine()}; vitmad backend {vitmad.backend()}" + (f". {args.note}" if args.note else ""),
        "",
        f"Forward time, batch {args.batch}, {args.image}x{args.image} px, {args.device}, median of "
        f"{args.repeats} (random weights):",
        "",
        "| case | wall ms | wall vs sdpa | CPU ms | CPU vs sdpa |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    times = time_cases(args.batch, args.image, args.repeats, args.device)
    (base_wall, base_cpu) = times["sdpa"]
    for case in CASES:
        wall, cpu = times[case]
        lines.append(f"| {case} | {wall:.0f} | {wall / base_wall:.2f}x | {cpu:.0f} | {cpu / base_cpu:.2f}x |")
    if not args.skip_memory:
        n = (args.memory_image // 16) ** 2 + 1
        lines += [
            "",
            f"Peak RSS of one forward, batch 1, {args.memory_image}x{args.memory_image} px (N = {n}), CPU, one "
            "process per case (VmHWM reset before the forward):",
            "",
            "| case | RSS before MiB | forward peak MiB | increase MiB | peak vs sdpa |",
            "| --- | ---: | ---: | ---: | ---: |",
        ]
        results = {}
        for case in CASES:
            if case == "eager" and eager_memory_needed_mib(args.memory_image) > 0.8 * available_mib():
                lines.append(f"| eager | not run: needs about {eager_memory_needed_mib(args.memory_image):.0f} MiB "
                             f"of maps, {available_mib():.0f} MiB available | | | |")
                continue
            results[case] = r = measure_memory(case, args.memory_image)
            lines.append(f"| {case} | {r['before_mib']:.0f} | {r['peak_mib']:.0f} | {r['increase_mib']:.0f} | "
                         f"{r['peak_mib'] / results['sdpa']['peak_mib']:.2f}x |")
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        write_section(f"bench_model-{args.device}-threads{args.threads}", text)


if __name__ == "__main__":
    main()
