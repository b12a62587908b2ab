"""vitmad::mad against the tutorial's NumPy code, a vectorised PyTorch version and one read of the data.

    python benchmarks/bench_op.py [--device cpu|cuda] [--quick] [--no-write]

Prints a table and writes it to benchmarks/RESULTS.md (section "bench_op-<device>").
"""

from __future__ import annotations

import argparse
import gc
import timeit

import torch

import vitmad
from _results import machine, markdown_table, time_call, write_section
from vitmad.ops.reference import pixel_distances, tutorial_mean_attention_distance

# name, shape [B, H, N, N], patch, tutorial?  N = 1 + grid^2 (one CLS token).
CASES = [
    ("ViT-B/16 224, B=1", (1, 12, 197, 197), 16, False),
    ("ViT-B/16 224, B=8 (tutorial)", (8, 12, 197, 197), 16, True),
    ("ViT-B/16 224, B=64", (64, 12, 197, 197), 16, False),
    ("ViT-L/14 336, B=16", (16, 16, 577, 577), 14, False),
    ("ViT-L/14 336, B=40 (> LLC)", (40, 16, 577, 577), 14, False),
    ("DINOv2-g/14 518, B=4", (4, 24, 1370, 1370), 14, False),
    ("ViT-B/16 1024, B=1", (1, 12, 4097, 4097), 16, False),
]
QUICK = {"ViT-B/16 224, B=1", "ViT-B/16 224, B=8 (tutorial)", "ViT-L/14 336, B=16"}


def materialised_mad(attn: torch.Tensor, patch: int) -> torch.Tensor:
    """Vectorised PyTorch that builds the whole distance matrix: what a careful user would write."""
    side = int(round((attn.shape[-1] - 1) ** 0.5))
    dist = pixel_distances(side, side, patch, dtype=torch.float32, device=attn.device)
    return (attn[..., 1:, 1:].float() * dist).sum(-1).mean(-1)


def tiny_call_us(device: str, calls: int = 2000, repeats: int = 7) -> float:
    """Microseconds of vitmad.mad on a [1, 1, 5, 5] attention (a CLS token and a 2 x 2 grid): what a call costs
    beyond reading its data (argument checks, dispatch, autograd, allocation, threads). Fastest of `repeats`
    rounds of `calls` calls, so that other processes' load shows as little as possible."""
    attn = torch.rand(1, 1, 5, 5, device=device)

    def call():
        vitmad.mad(attn, 16)

    call()
    if device == "cuda":
        torch.cuda.synchronize()
    per_call = min(timeit.repeat(call, number=calls, repeat=repeats)) / calls
    if device == "cuda":
        torch.cuda.synchronize()
    return per_call * 1e6


def fmt_ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--quick", action="store_true", help="only the small cases")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    parser.add_argument("--note", default="", help="a remark written under the table (e.g. machine load)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    note = f" {args.note}" if args.note else ""
    device = args.device

    header = ["case", "dtype", "MB", "tutorial ms", "materialised ms", "vitmad ms", "attn.sum ms", "vitmad GB/s",
              "vitmad / sum", "GB/s vs float32 sum", "speed-up vs tutorial"]
    rows = []
    single_image = {}  # batch -> vitmad float32 seconds, for the intercept of the ViT-B/16 224 cases
    for name, shape, patch, run_tutorial in CASES:
        if args.quick and name not in QUICK:
            continue
        base = torch.rand(shape, device=device)
        sum_gbs = None  # float32 sum's bandwidth: the bound for every dtype's bytes per second
        for dtype in (torch.float32, torch.bfloat16):
            attn = base.to(dtype)
            mb = attn.numel() * attn.element_size() / 1e6
            t_op = time_call(lambda: vitmad.mad(attn, patch), device, args.repeats)
            # torch's 16-bit sum is no bound (on CPU it is many times slower than the float32 one): 16-bit rows are
            # judged by bandwidth against the float32 sum of the same case.
            t_sum = time_call(lambda: attn.sum(dtype=torch.float32), device, args.repeats) \
                if dtype == torch.float32 else None
            if t_sum is not None:
                sum_gbs = mb / 1e3 / t_sum
            t_mat = None
            if attn.numel() * 4 < 2e9:  # the materialised product needs a float32 copy of attn
                t_mat = time_call(lambda: materialised_mad(attn, patch), device, max(1, args.repeats // 2))
            t_tut = None
            if run_tutorial and dtype == torch.float32:
                host = attn.cpu().numpy()
                t_tut = time_call(lambda: tutorial_mean_attention_distance(patch, host), "cpu", repeats=1, warmup=0)
            speedup = "-" if t_tut is None else f"{t_tut / t_op:.0f}x"
            ratio = "-" if t_sum is None else f"{t_op / t_sum:.2f}"
            if name.startswith("ViT-B/16 224") and dtype == torch.float32:
                single_image[shape[0]] = t_op
            rows.append([name, str(dtype).replace("torch.", ""), f"{mb:.0f}", fmt_ms(t_tut), fmt_ms(t_mat),
                         fmt_ms(t_op), fmt_ms(t_sum), f"{mb / 1e3 / t_op:.1f}", ratio,
                         f"{mb / 1e3 / t_op / sum_gbs:.2f}", speedup])
            print(" | ".join(rows[-1]), flush=True)
        del base
        gc.collect()

    table = markdown_table(header, rows)
    fixed = f"Fixed cost of a call: vitmad.mad on a [1, 1, 5, 5] attention takes {tiny_call_us(device):.1f} us"
    if 1 in single_image and 8 in single_image:
        # t(B) = fixed + B * per_image between B = 1 and B = 8 (ViT-B/16 at 224 px, float32)
        intercept = (8 * single_image[1] - single_image[8]) / 7
        fixed += (f"; the intercept of the ViT-B/16 224 float32 times at B = 1 and B = 8 (t = fixed + B x per image) "
                  f"is {intercept * 1e6:.1f} us")
    fixed += "."
    print(f"\n{machine()}\nbackend: {vitmad.backend()}\n{fixed}\n\n{table}")
    if not args.no_write:
        body = (f"## bench_op.py --device {device}\n\n{machine()}; vitmad backend: {vitmad.backend()}\n\n"
                "`vitmad / sum` (float32): time of vitmad.mad over the time of `attn.sum(dtype=torch.float32)` on "
                "the same tensor, one read of the data (lower is better; 1.0 is the bandwidth limit). `GB/s vs "
                "float32 sum`: vitmad's bytes per second over those of the float32 sum of the same case (higher is "
                "better; 1.0 reads 16-bit input as fast as float32 is read), since torch's own 16-bit sum is no bound. "
                f"Median of {args.repeats} runs.{note}\n\n{fixed}\n\n{table}")
        write_section(f"bench_op-{device}", body)


if __name__ == "__main__":
    main()
