"""What it costs to set up ``vitmad.record`` on a model, against one forward of that model at batch 1.

    python benchmarks/bench_setup.py [--threads N] [--repeats R] [--no-write]

``with vitmad.record(model) as rec: model(x)`` around every batch is the README's usage and what ``vitmad profile``
does per batch, so the recorder's setup (finding the attention modules, choosing each one's placer, installing the
hooks) is paid per batch. Each model below is timed three ways, the routes taking turns: ``setup`` (entering and
leaving ``vitmad.record`` with no forward), ``plain`` (one forward at batch 1, default attention) and ``record``
(the same forward inside ``vitmad.record``, setup included). Random weights; nothing is downloaded. Before
2026-12-01 every family walked the module tree on its own (37-47 walks of a ViT's root per setup: timm ViT-S/16
30.5 ms, ViT-L/16 42.5 ms, Swin-B 28.7 ms, CrossViT-S 28.3 ms, transformers ViT-B/16 18.7 ms on the 2-core AMD
EPYC VM); recording/module_index.py now shares one walk per root. Writes its section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import vitmad
from _results import machine, markdown_table, write_section

TIMM_MODELS = ("vit_small_patch16_224", "vit_large_patch16_224", "swin_base_patch4_window7_224",
               "crossvit_small_240", "pit_s_224")


def build(name: str) -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    if name == "transformers ViT-B/16":
        from transformers import ViTConfig, ViTModel

        return ViTModel(ViTConfig()).eval(), torch.randn(1, 3, 224, 224)
    import timm

    model = timm.create_model(name, pretrained=False).eval()
    return model, torch.randn(1, *model.default_cfg["input_size"])


def time_routes(model: torch.nn.Module, image: torch.Tensor, repeats: int) -> dict[str, float]:
    """Median milliseconds of each route, the routes taking turns."""

    def setup() -> None:
        with vitmad.record(model):
            pass

    def plain() -> None:
        model(image)

    def record() -> None:
        with vitmad.record(model):
            model(image)

    routes = {"setup": setup, "plain": plain, "record": record}
    times: dict[str, list[float]] = {name: [] for name in routes}
    with torch.inference_mode():
        for repeat in range(repeats + 1):
            for name, fn in routes.items():
                start = time.perf_counter()
                fn()
                if repeat > 0:  # the first round warms up
                    times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    header = ["model", "modules", "setup ms", "plain forward ms (batch 1)", "recorded forward ms",
              "setup / plain", "recorded / plain"]
    rows = []
    for name in ("transformers ViT-B/16", *TIMM_MODELS):
        model, image = build(name)
        ms = time_routes(model, image, args.repeats)
        rows.append([name, str(len(list(model.modules()))), f"{ms['setup']:.1f}", f"{ms['plain']:.1f}",
                     f"{ms['record']:.1f}", f"{ms['setup'] / ms['plain']:.3f}", f"{ms['record'] / ms['plain']:.2f}x"])
        print(" | ".join(rows[-1]), flush=True)
    body = "\n".join([
        f"## Recorder setup vs one forward (cpu, {args.threads} torch threads) (benchmarks/bench_setup.py)",
        "",
        f"{machine()}",
        "",
        f"Median of {args.repeats} after one warm-up, the routes taking turns; batch 1 at each model's default size. "
        "`setup`: entering and leaving `vitmad.record` with no forward; `recorded forward`: the forward inside "
        "`vitmad.record`, setup included.",
        "",
        markdown_table(header, rows),
    ])
    print(body)
    if not args.no_write:
        write_section(f"bench_setup-cpu-threads{args.threads}", body)


if __name__ == "__main__":
    main()
