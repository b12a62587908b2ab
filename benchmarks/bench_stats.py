"""The statistics ops against MAD alone: vitmad::stats / stats_pos vs mad / mad_pos vs one read.

    python benchmarks/bench_stats.py [--device cpu|cuda] [--threads N] [--repeats R] [--no-write]

Cases (float32 attention probabilities):
- ViT shapes [64, 12, 197, 197] and [16, 16, 577, 577], one CLS token, grid form;
- Swin-like windows [8, 64, 4, 49, 49] with per-window positions [64, 1, 49, 2], position form.

Routes: ``mad`` alone (``mad_pos`` for the windows), ``stats`` with ("mad", "entropy", "prefix_mass"), ``stats``
with all four statistics, and ``attn.sum(dtype=float32)``, one read of the data. Target (issue #16): MAD +
entropy + prefix mass at most 1.1x the time of MAD alone.

The routes of a case take turns within every repeat (bench_flash.time_routes), so load from other processes on a
shared machine falls on all of them alike. Prints a table and writes it to benchmarks/RESULTS.md (section
"bench_stats-<device>-threads<N>", replaced when the same configuration runs again).
"""

from __future__ import annotations

import argparse
import os

import torch

import vitmad  # noqa: F401  (loads torch.ops.vitmad)
from _results import machine, markdown_table, write_section
from bench_flash import time_routes
from bench_positions import window_positions

ops = torch.ops.vitmad

THREE = ["mad", "entropy", "prefix_mass"]
ALL = ["mad", "entropy", "prefix_mass", "self_mass"]
# name, attention shape, patch, prefix tokens, grid of one matrix
GRID_CASES = [
    ("ViT-B/16 224, B=64", (64, 12, 197, 197), 16, 1, (14, 14)),
    ("ViT-L/14 336, B=16", (16, 16, 577, 577), 14, 1, (24, 24)),
]
# B, nW, H, window side, patch
WINDOW_CASES = [("Swin windows B=8, nW=64, H=4", (8, 64, 4), 7, 4)]


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = args.device
    load_before = os.getloadavg()
    gen = torch.Generator().manual_seed(0)

    header = ["case", "shape", "mad ms", "mad+entropy+prefix ms", "all four ms", "attn.sum ms",
              "(mad+entropy+prefix) / mad", "all four / mad", "mad / sum"]
    rows = []

    def add(name, shape, times):
        rows.append([name, "x".join(map(str, shape)), ms(times["mad"]), ms(times["three"]), ms(times["all"]),
                     ms(times["sum"]), f"{times['three'] / times['mad']:.2f}x", f"{times['all'] / times['mad']:.2f}x",
                     f"{times['mad'] / times['sum']:.2f}x"])
        print(" | ".join(rows[-1]), flush=True)

    for name, shape, patch, prefix, grid in GRID_CASES:
        attn = torch.rand(shape, generator=gen).softmax(-1).to(device)
        options = {"num_prefix_tokens": prefix, "grid": list(grid)}
        times = time_routes({
            "mad": lambda: ops.mad(attn, patch, **options),
            "three": lambda: ops.stats(attn, patch, THREE, **options),
            "all": lambda: ops.stats(attn, patch, ALL, **options),
            "sum": lambda: attn.sum(dtype=torch.float32),
        }, device, args.repeats)
        add(name, shape, times)

    for name, (b, nw, h), side, patch in WINDOW_CASES:
        shape = (b, nw, h, side * side, side * side)
        attn = torch.rand(shape, generator=gen).softmax(-1).to(device)
        pos = window_positions(nw, side, patch, device)
        times = time_routes({
            "mad": lambda: ops.mad_pos(attn, pos),
            "three": lambda: ops.stats_pos(attn, pos, None, THREE),
            "all": lambda: ops.stats_pos(attn, pos, None, ALL),
            "sum": lambda: attn.sum(dtype=torch.float32),
        }, device, args.repeats)
        add(name + f", positions [{nw}, 1, {side * side}, 2]", shape, times)

    table = markdown_table(header, rows)
    load = (f"Load average (1, 5, 15 min) before the run {', '.join(f'{x:.2f}' for x in load_before)}, after it "
            f"{', '.join(f'{x:.2f}' for x in os.getloadavg())}: anything near or above the core count means other work "
            "shared the CPUs.")
    print(f"\n{machine()}\n{load}\n\n{table}")
    if not args.no_write:
        body = (f"## Statistics vs MAD alone ({device}, float32, {torch.get_num_threads()} torch threads) "
                f"(benchmarks/bench_stats.py)\n\n"
                f"{machine()}\n\n{load}\n\n`mad`: vitmad::mad (mad_pos for the windows); `mad+entropy+prefix`: "
                "vitmad::stats (stats_pos) with ('mad', 'entropy', 'prefix_mass'); `all four`: with 'self_mass' too; "
                "`attn.sum`: `attn.sum(dtype=torch.float32)`, one read of the data. "
                f"Median of {args.repeats} calls, the routes taking turns. Target: mad+entropy+prefix <= 1.1x mad.\n\n"
                f"{table}")
        write_section(f"bench_stats-{device}-threads{torch.get_num_threads()}", body)


if __name__ == "__main__":
    main()
