"""The ``vitmad`` command: ``vitmad profile``, ``vitmad compare``, ``vitmad bench``.

A thin layer over :func:`vitmad.profile` and the plotting functions. User mistakes (unknown model, missing
or empty image folder, bad option) end with one ``vitmad: error: ...`` line and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

__all__ = ["main", "build_parser"]

CHECKPOINT_NAME = "checkpoint.pt"


def build_parser() -> argparse.ArgumentParser:
    from .models import MODEL_SPEC_HELP

    parser = argparse.ArgumentParser(prog="vitmad", description="Mean attention distance of Vision Transformer heads.")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("profile", help="profile a model over an image set",
                              description="Profile the mean attention distance of every head over an image set.")
    run.add_argument("--model", default="builtin:dinov2-s14", help=f"{MODEL_SPEC_HELP} (default: %(default)s)")
    run.add_argument("--checkpoint", default=None, help="local weights file for a timm: model")
    run.add_argument("--images", nargs="+", default=["builtin"],
                     help="folders (searched recursively), files, or 'builtin': photographs shipped with "
                          "scikit-image (default)")
    run.add_argument("--image-size", default=None, help="S or HxW instead of the model's input size")
    run.add_argument("--batch-size", type=int, default=16)
    run.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    run.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    run.add_argument("--max-images", type=int, default=None, help="profile only the first K images")
    run.add_argument("--renormalize", action="store_true",
                     help="divide each query's distance by its attention mass on patches")
    run.add_argument("--out", default="vitmad_out", help="output folder (default: %(default)s)")
    run.add_argument("--resume", action="store_true", help=f"continue from OUT/{CHECKPOINT_NAME}")
    run.add_argument("--no-figures", action="store_true", help="write mad.json and mad.csv only")

    compare = commands.add_parser("compare", help="overlay several profiles",
                                  description="Overlay the mean and spread per layer of several mad.json files.")
    compare.add_argument("results", nargs="+", help="mad.json files")
    compare.add_argument("--labels", nargs="+", default=None, help="one label per result (default: model)")
    compare.add_argument("--out", required=True, help="figure file (.png, .pdf, .svg)")

    bench = commands.add_parser("bench", help="time the fused op against plain PyTorch (short form)")
    bench.add_argument("--device", default="auto")
    bench.add_argument("--repeats", type=int, default=10)
    return parser


def _quiet_transformers() -> None:
    """Keep transformers' weight-loading bars and load reports out of the command's output."""
    try:
        from transformers.utils import logging as hf_logging
    except ModuleNotFoundError:
        return
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _profile_command(args: argparse.Namespace) -> None:
    from .images import find_images, parse_image_size
    from .models import load_model
    from .plotting import plot_mad_maps
    from .profiling import mad_maps, profile

    out = Path(args.out)
    size = parse_image_size(args.image_size)
    files = find_images(args.images)  # before loading the model: a wrong folder fails at once
    _quiet_transformers()
    loaded = load_model(args.model, checkpoint=args.checkpoint, image_size=size)
    out.mkdir(parents=True, exist_ok=True)
    result = profile(
        loaded,
        files,
        batch_size=args.batch_size,
        device=args.device,
        dtype=args.dtype,
        renormalize=args.renormalize,
        image_size=size,
        max_images=args.max_images,
        checkpoint=out / CHECKPOINT_NAME,
        resume=args.resume,
        progress=True,
    )
    result.to_json(out / "mad.json")
    result.to_csv(out / "mad.csv")
    written = ["mad.json", "mad.csv"]
    if not args.no_figures:
        result.plot(out / "mad.png")
        maps, pixels, names, layout = mad_maps(loaded, result.images[0], image_size=size,
                                               renormalize=args.renormalize, device=args.device)
        prep = loaded.preprocessing
        plot_mad_maps(maps, pixels, names, out / "mad_map.png", patch=layout["patch"],
                      mean=prep.mean, std=prep.std)
        written += ["mad.png", "mad_map.png"]
    _print_summary(result)
    print(f"wrote {', '.join(str(out / name) for name in written)}")


def _print_summary(result) -> None:
    mad = result.mad
    print(f"{result.model}: {result.count} images ({len(result.skipped)} skipped), "
          f"uniform attention {result.uniform_mad:.1f} px")
    print(f"{'layer':>5}  {'mean':>7}  {'min head':>8}  {'max head':>8}  name")
    for i, name in enumerate(result.layers):
        row = mad[i]
        print(f"{i:>5}  {row.mean():7.1f}  {row.min():8.1f}  {row.max():8.1f}  {name}")


def _compare_command(args: argparse.Namespace) -> None:
    from .plotting import plot_compare
    from .profiling import Profile

    profiles = [Profile.from_json(path) for path in args.results]
    labels = args.labels or [p.model for p in profiles]
    if len(labels) != len(profiles):
        raise ValueError(f"--labels: expected {len(profiles)} labels (one per result), got {len(labels)}")
    plot_compare(profiles, labels, args.out)
    print(f"wrote {args.out}")


def _bench_command(args: argparse.Namespace) -> None:
    from .bench import run_op_bench

    run_op_bench(device=args.device, repeats=args.repeats)


def main(argv: list[str] | None = None) -> int:
    """Run the ``vitmad`` command line; returns the exit status."""
    args = build_parser().parse_args(argv)
    warnings.formatwarning = lambda message, *_, **__: f"vitmad: warning: {message}\n"
    commands = {"profile": _profile_command, "compare": _compare_command, "bench": _bench_command}
    try:
        commands[args.command](args)
    except (ValueError, FileNotFoundError, ModuleNotFoundError) as err:
        print(f"vitmad: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"vitmad: interrupted; progress is saved in {getattr(args, 'out', '.')}/{CHECKPOINT_NAME}, "
              "rerun the same command with --resume to continue", file=sys.stderr)
        return 130
    return 0
