"""Profiling throughput against plain inference: what ``vitmad profile`` costs over running the model.

    python benchmarks/bench_profile.py [--device auto|cpu|cuda] [--batch-size B] [--images K] [--quick] [--no-write]

All columns run the same model (its default attention: SDPA), the same batches of preprocessed pixels, moved
to the device batch by batch, under ``torch.inference_mode``: "plain" is the forward alone, "record only" the
forward under ``vitmad.record`` (the hooks' cost), "profile" the whole engine (``vitmad.profile``: record plus
float64 running sums, no checkpoint file). Target: profile throughput at least 80% of plain (issue 6).
Prints a table and writes it to benchmarks/RESULTS.md (section "bench_profile-<device>-<N>threads").
"""

from __future__ import annotations

import argparse
import statistics

import torch

import vitmad
from _results import machine, markdown_table, time_call, write_section
from vitmad.profiling import resolve_device
from vitmad.profiling.models import LoadedModel, load_model, wrap_module


def _random_vit_b16() -> LoadedModel:
    """ViT-B/16 at 224 px with random weights (a download-free stand-in with the real shapes)."""
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    return wrap_module(ViTModel(ViTConfig(), add_pooling_layer=False), "ViT-B/16 (random weights)")


MODELS = {
    "builtin:dinov2-s14": lambda: load_model("builtin:dinov2-s14"),
    "vit-b16": _random_vit_b16,
}


def bench(name: str, device: torch.device, batch_size: int, num_images: int, repeats: int) -> list[str]:
    loaded = MODELS[name]()
    module = loaded.module.to(device)
    pixels = torch.randn(num_images, 3, 224, 224, generator=torch.Generator().manual_seed(0))

    def plain() -> None:
        with torch.inference_mode():
            for batch in pixels.split(batch_size):
                loaded.forward(batch.to(device, non_blocking=True))

    def recorded() -> None:
        with torch.inference_mode():
            for batch in pixels.split(batch_size):
                with vitmad.record(module) as rec:
                    loaded.forward(batch.to(device, non_blocking=True))
                rec.mad.cpu()

    def profiled() -> None:
        vitmad.profile(loaded, pixels, batch_size=batch_size, device=device)

    # Interleaved, so that load changes on a shared machine hit all three alike.
    times = {"plain": [], "record": [], "profile": []}
    for _ in range(repeats):
        for key, fn in (("plain", plain), ("record", recorded), ("profile", profiled)):
            times[key].append(time_call(fn, device.type, repeats=1))
    plain_s, record_s, profile_s = (statistics.median(times[k]) for k in ("plain", "record", "profile"))
    ratio = plain_s / profile_s
    return [loaded.spec, str(batch_size), str(num_images), f"{num_images / plain_s:.1f}",
            f"{num_images / record_s:.1f}", f"{num_images / profile_s:.1f}", f"{ratio:.2f}",
            "yes" if ratio >= 0.8 else "no"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=None, help="default: 64 on CUDA, 8 on CPU")
    parser.add_argument("--images", type=int, default=None, help="default: 512 on CUDA, 16 on CPU")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--quick", action="store_true", help="builtin model only, one repeat")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--note", default="", help="a sentence about the conditions, written under the table")
    parser.add_argument("--no-write", action="store_true", help="print only, leave RESULTS.md alone")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    batch_size = args.batch_size or (64 if cuda else 8)
    num_images = args.images or (512 if cuda else 16)
    models = ["builtin:dinov2-s14"] if args.quick else args.models
    repeats = 1 if args.quick else args.repeats
    header = ["model", "batch", "images", "plain img/s", "record only img/s", "profile img/s", "profile / plain",
              ">= 0.8"]
    rows = [bench(name, device, batch_size, num_images, repeats) for name in models]
    table = markdown_table(header, rows)
    where = machine()
    print(where)
    print(table)
    if not args.no_write:
        write_section(
            f"bench_profile-{device.type}-{torch.get_num_threads()}threads",
            f"## Profiling throughput vs plain inference ({device.type}, {torch.get_num_threads()} torch threads)"
            f"\n\n{where}\n\n"
            f"Median of {repeats} runs over {num_images} images of 224 x 224; {vitmad.backend()} kernels.\n\n"
            f"{table}\n\n{args.note}",
        )


if __name__ == "__main__":
    main()
