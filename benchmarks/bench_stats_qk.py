"""The statistics beside flash-MAD: stats_qk against mad_qk alone, and the model's own attention.

    python benchmarks/bench_stats_qk.py [--device cpu|cuda] [--threads N] [--repeats R] [--no-write]

Cases: the q/k shapes of bench_flash.py in float32 and the first of them in bfloat16, one CLS token, patch 16.
Routes on the same q, k (and v for SDPA):
- ``mad_qk``: ``torch.ops.vitmad.mad_qk(q, k, patch)``, MAD alone;
- ``stats3``: ``torch.ops.vitmad.stats_qk`` with ("mad", "entropy", "prefix_mass") (target: <= 1.1x mad_qk);
- ``stats4``: the same with "self_mass" too;
- ``sdpa``: ``F.scaled_dot_product_attention(q, k, v)``, the attention a model computes anyway.

The routes of a case take turns within every repeat (bench_flash.time_routes), so load from other processes on a
shared machine falls on all of them alike. Prints a table and writes it to benchmarks/RESULTS.md (section
"bench_stats_qk-<device>-threads<N>", replaced when the same configuration runs again).
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F

import vitmad  # noqa: F401  (loads torch.ops.vitmad)
from _results import machine, markdown_table, write_section
from bench_flash import CPU_SHAPES, CUDA_SHAPES, PATCH, grid_of, make_inputs, parse_shape, time_routes

ops = torch.ops.vitmad

STATS3 = ["mad", "entropy", "prefix_mass"]
STATS4 = [*STATS3, "self_mass"]


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--shapes", nargs="+", type=parse_shape, default=None, metavar="B,H,N,D",
                        help="float32 q/k shapes (default: bench_flash.py's for the device)")
    parser.add_argument("--bf16-shape", type=parse_shape, default=None, metavar="B,H,N,D",
                        help="the bfloat16 case's shape (default: the first float32 shape)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = args.device
    shapes = args.shapes or [parse_shape(s) for s in (CUDA_SHAPES if device == "cuda" else CPU_SHAPES)]
    cases = [(torch.float32, shape) for shape in shapes] + [(torch.bfloat16, args.bf16_shape or shapes[0])]
    load_before = os.getloadavg()

    header = ["dtype", "B x H x N x D", "mad_qk ms", "stats3 ms", "stats4 ms", "sdpa ms", "stats3 / mad_qk",
              "stats4 / mad_qk", "stats3 / sdpa"]
    rows = []
    for dtype, shape in cases:
        q, k, v = make_inputs(shape, dtype, device)
        grid = grid_of(shape[2])
        with torch.no_grad():
            times = time_routes({
                "mad_qk": lambda: ops.mad_qk(q, k, PATCH, grid=grid),
                "stats3": lambda: ops.stats_qk(q, k, PATCH, STATS3, grid=grid),
                "stats4": lambda: ops.stats_qk(q, k, PATCH, STATS4, grid=grid),
                "sdpa": lambda: F.scaled_dot_product_attention(q, k, v),
            }, device, args.repeats)
        rows.append([str(dtype).split(".")[1], "x".join(map(str, shape)), ms(times["mad_qk"]), ms(times["stats3"]),
                     ms(times["stats4"]), ms(times["sdpa"]), f"{times['stats3'] / times['mad_qk']:.2f}x",
                     f"{times['stats4'] / times['mad_qk']:.2f}x", f"{times['stats3'] / times['sdpa']:.2f}x"])
        print(" | ".join(rows[-1]), flush=True)

    table = markdown_table(header, rows)
    load = (f"Load average (1, 5, 15 min) before the run {', '.join(f'{x:.2f}' for x in load_before)}, after it "
            f"{', '.join(f'{x:.2f}' for x in os.getloadavg())}: anything near or above the core count means other work "
            "shared the CPUs.")
    print(f"\n{machine()}\n{load}\n\n{table}")
    if not args.no_write:
        compiled = vitmad.has_compiled_kernel("stats_qk", device.upper())
        body = (f"## Statistics beside flash-MAD ({device}, {torch.get_num_threads()} torch threads) "
                f"(benchmarks/bench_stats_qk.py)\n\n"
                f"{machine()}; stats_qk kernel {'compiled' if compiled else 'pure PyTorch (fallback)'}.\n\n{load}\n\n"
                f"`mad_qk`: MAD alone; `stats3`: stats_qk with {tuple(STATS3)}; `stats4`: with 'self_mass' too; "
                f"`sdpa`: F.scaled_dot_product_attention on the same q, k (and v). Patch {PATCH}, one CLS token. "
                f"Median of {args.repeats} calls, the routes taking turns. Target: stats3 <= 1.1x mad_qk.\n\n{table}")
        write_section(f"bench_stats_qk-{device}-threads{torch.get_num_threads()}", body)


if __name__ == "__main__":
    main()
