"""The position form against the grid form: mad_pos vs mad vs one read, mad_qk_pos vs mad_qk.

    python benchmarks/bench_positions.py [--device cpu|cuda] [--threads N] [--repeats R] [--no-write]

Cases (float32 attention unless --dtype says otherwise):
- ViT shapes [64, 12, 197, 197] and [16, 16, 577, 577], one CLS token: ``mad_pos`` with the grid's pixel
  positions ([N, 2], CLS a NaN row) against the grid form ``mad(attn, patch)`` and ``attn.sum(dtype=float32)``,
  one read of the data (targets: positions <= 1.3x grid, <= 1.5x one read);
- Swin-like windows [B, nW, H, 49, 49] with per-window positions [nW, 1, 49, 2] (target <= 1.5x one read; the
  grid form of one 7 x 7 window is timed too, since windows of one layout give it the same numbers);
- flash-MAD at the shapes of bench_flash.py: ``mad_qk_pos`` with the grid's positions against ``mad_qk``
  (target <= 1.1x).

The routes of a case take turns within every repeat (bench_flash.time_routes), so load from other processes on a
shared machine falls on all of them alike. Prints a table and writes it to benchmarks/RESULTS.md (section
"bench_positions-<device>-<dtype>-threads<N>", replaced when the same configuration runs again).
"""

from __future__ import annotations

import argparse
import math
import os

import torch

import vitmad  # noqa: F401  (loads torch.ops.vitmad)
from _results import machine, markdown_table, write_section
from bench_flash import CPU_SHAPES, CUDA_SHAPES, PATCH, grid_of, make_inputs, parse_shape, time_routes

ops = torch.ops.vitmad

# name, attention shape, patch, prefix tokens, grid of one matrix
ATTN_CASES = [
    ("ViT-B/16 224, B=64", (64, 12, 197, 197), 16, 1, (14, 14)),
    ("ViT-L/14 336, B=16", (16, 16, 577, 577), 14, 1, (24, 24)),
]
# B, nW, H, window side, patch (a stage whose tokens stand for `patch` pixels)
WINDOW_CASES = [("Swin windows B=8, nW=64, H=4", (8, 64, 4), 7, 4)]


def grid_positions(prefix: int, gh: int, gw: int, patch: float, device) -> torch.Tensor:
    """[prefix + gh * gw, 2]: NaN rows for the prefix tokens, then the patch centres in pixels."""
    t = torch.arange(gh * gw, dtype=torch.float32)
    centres = torch.stack([(t // gw) * patch + patch / 2, (t % gw) * patch + patch / 2], -1)
    return torch.cat([torch.full((prefix, 2), math.nan), centres]).to(device)


def window_positions(nw: int, side: int, patch: float, device) -> torch.Tensor:
    """[nW, 1, side^2, 2]: the tokens of window w on a square grid of windows, in pixels."""
    per_row = int(math.isqrt(nw))
    w = torch.arange(nw, dtype=torch.float32)[:, None]
    t = torch.arange(side * side, dtype=torch.float32)[None, :]
    row = (w // per_row) * side + t // side
    col = (w % per_row) * side + t % side
    return torch.stack([row * patch + patch / 2, col * patch + patch / 2], -1)[:, None].to(device)


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--flash-shapes", nargs="+", type=parse_shape, default=None, metavar="B,H,N,D",
                        help="q/k shapes of the flash cases (default: bench_flash.py's for the device)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device, dtype = args.device, getattr(torch, args.dtype)
    load_before = os.getloadavg()
    gen = torch.Generator().manual_seed(0)

    header = ["case", "shape", "positions ms", "grid ms", "attn.sum ms", "positions / grid", "positions / sum"]
    rows = []

    def add(name, shape, times):
        grid, one_read = times.get("grid"), times.get("sum")
        rows.append([name, "x".join(map(str, shape)), ms(times["positions"]), ms(grid) if grid else "-",
                     ms(one_read) if one_read else "-",
                     f"{times['positions'] / grid:.2f}x" if grid else "-",
                     f"{times['positions'] / one_read:.2f}x" if one_read else "-"])
        print(" | ".join(rows[-1]), flush=True)

    for name, shape, patch, prefix, (gh, gw) in ATTN_CASES:
        attn = torch.rand(shape, generator=gen).softmax(-1).to(device=device, dtype=dtype)
        pos = grid_positions(prefix, gh, gw, patch, device)
        times = time_routes({
            "positions": lambda: ops.mad_pos(attn, pos),
            "grid": lambda: ops.mad(attn, patch, num_prefix_tokens=prefix, grid=[gh, gw]),
            "sum": lambda: attn.sum(dtype=torch.float32),
        }, device, args.repeats)
        add(name, shape, times)

    for name, (b, nw, h), side, patch in WINDOW_CASES:
        shape = (b, nw, h, side * side, side * side)
        attn = torch.rand(shape, generator=gen).softmax(-1).to(device=device, dtype=dtype)
        pos = window_positions(nw, side, patch, device)
        times = time_routes({
            "positions": lambda: ops.mad_pos(attn, pos),
            "grid": lambda: ops.mad(attn, patch, num_prefix_tokens=0, grid=[side, side]),
            "sum": lambda: attn.sum(dtype=torch.float32),
        }, device, args.repeats)
        add(name + f", positions [{nw}, 1, {side * side}, 2]", shape, times)

    for shape in args.flash_shapes or [parse_shape(s) for s in (CUDA_SHAPES if device == "cuda" else CPU_SHAPES)]:
        q, k, _ = make_inputs(shape, dtype, device)
        gh, gw = grid_of(shape[2])
        pos = grid_positions(1, gh, gw, PATCH, device)
        times = time_routes({
            "positions": lambda: ops.mad_qk_pos(q, k, pos),
            "grid": lambda: ops.mad_qk(q, k, PATCH, grid=[gh, gw]),
        }, device, args.repeats)
        add("flash: mad_qk_pos vs mad_qk", shape, times)

    table = markdown_table(header, rows)
    load = (f"Load average (1, 5, 15 min) before the run {', '.join(f'{x:.2f}' for x in load_before)}, after it "
            f"{', '.join(f'{x:.2f}' for x in os.getloadavg())}: anything near or above the core count means other work "
            "shared the CPUs.")
    print(f"\n{machine()}\n{load}\n\n{table}")
    if not args.no_write:
        body = (f"## Position form vs grid form ({device}, {args.dtype}, {torch.get_num_threads()} torch threads) "
                f"(benchmarks/bench_positions.py)\n\n"
                f"{machine()}\n\n{load}\n\n`positions`: mad_pos (flash rows: mad_qk_pos) with the grid's pixel "
                "positions; `grid`: "
                "mad (mad_qk) on the same tensor; `attn.sum`: `attn.sum(dtype=torch.float32)`, one read of the data. "
                f"Median of {args.repeats} calls, the routes taking turns. Targets: positions <= 1.3x grid and <= "
                "1.5x one read for the ViT shapes, <= 1.5x one read for windows, <= 1.1x mad_qk for flash.\n\n"
                f"{table}")
        write_section(f"bench_positions-{device}-{args.dtype}-threads{torch.get_num_threads()}", body)


if __name__ == "__main__":
    main()
