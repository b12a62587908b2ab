"""The ``vitmad`` command: ``vitmad profile``, ``vitmad compare``, ``vitmad bench``.

A thin layer over :func:`vitmad.profile` and the plotting functions. The flags of ``vitmad profile`` parse
into ``profile()``'s own keyword arguments (each flag's ``dest`` is the parameter's name), and the library's
errors, which name the parameter, are shown with the flag instead: one direction, one spelling each. User
mistakes (unknown model, missing or empty image folder, bad option) end with one ``vitmad: error: ...`` line
and exit status 2.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import os
import sys
import traceback
import warnings
from pathlib import Path

__all__ = ["main", "build_parser"]

CHECKPOINT_NAME = "checkpoint.pt"
OUT_LOCK_NAME = ".vitmad-profile.lock"  # held while a run writes to its --out (profiling.files.held_by_this_run)


def checkpoint_path(out: Path, run) -> Path:
    """``OUT/checkpoint.pt`` for one process; ``OUT/checkpoint.rank<R>-of-<W>.pt`` per rank under torchrun."""
    if run is None:
        return out / CHECKPOINT_NAME
    return out / f"checkpoint.rank{run.rank}-of-{run.world_size}.pt"


# A checkpoint file not yet looked at (the run was interrupted before): unlike None (no file), never equal to a state.
_NOT_SEEN = object()


def _check_output_paths(out: Path, ours: list[Path], writes: set[str]) -> None:
    """Before the model loads: every file the run may write in ``out`` (``writes``) can be written, and none of
    them is a user's. A folder at such a path failed after the whole run, with a traceback and half the results; a
    file there without an earlier run's mad.json beside it, or one that run did not write (``ours``), is not ours
    to replace.

    Raises:
        OptionError: naming ``out``.
    """
    from .profiling.options import OptionError

    # (What this run writes, and the earlier run's files it removes: a folder named entropy.png beside a MAD-only
    # run is a user's, as a file so named is, QA 411.)
    folders = sorted(name for name in writes | {p.name for p in ours} if (out / name).is_dir())
    if folders:
        raise OptionError("out", f"{out} holds folders where this run writes files ({', '.join(folders)}); "
                                 "pass another folder")
    if not ours:
        # Only what this run writes: a user's entropy.png beside a MAD-only run, or a photo named mad.png beside a
        # --no-figures run, was refused as "which this run would write over" (QA 403); a later run that writes it
        # finds it unnamed by this run's mad.json, and is refused then.
        theirs = sorted(name for name in writes if (out / name).exists())
        if theirs:
            raise OptionError("out", f"{out} holds {', '.join(theirs)}, which this run would write over, and no "
                                     "mad.json of an earlier vitmad profile run (so not an earlier run's outputs: "
                                     "perhaps yours); pass another folder")
    theirs = sorted(name for name in writes - {p.name for p in ours} if (out / name).exists())
    if ours and theirs:
        raise OptionError("out", f"{out} holds {', '.join(theirs)}, which this run would write over, and which the "
                                 "earlier vitmad profile run there did not write (its mad.json does not name it: "
                                 "perhaps yours); pass another folder")


def _images(sources: list[str], ours: list[Path]) -> list[Path]:
    """``find_images`` of the sources, without this run's outputs (``ours``) nor an earlier run's that a folder
    search found (:func:`~.profiling.earlier_runs.without_earlier_outputs`)."""
    from .profiling.earlier_runs import without_earlier_outputs
    from .profiling.images import find_images

    return without_earlier_outputs(find_images(sources, exclude=ours), sources, "--images", stacklevel=1)


def _check_resume_world_size(out: Path, run) -> None:
    """Refuse to resume checkpoints written by a different number of processes (their shards differ)."""
    world = 1 if run is None else run.world_size
    found = {1} if (out / CHECKPOINT_NAME).is_file() else set()
    for shard in out.glob("checkpoint.rank*-of-*.pt"):
        try:
            found.add(int(shard.stem.rsplit("-of-", 1)[1]))
        except ValueError:  # not one of ours (checkpoint.rank<r>-of-<W>.pt): leave it, say which
            raise ValueError(f"--resume: {shard} is not a checkpoint this command writes "
                             "(checkpoint.rank<r>-of-<W>.pt); move it out of the folder or start over without "
                             "--resume") from None
    if found and world not in found:
        raise ValueError(
            f"--resume: the checkpoints in {out} were written by {min(found)} process(es), this run has {world}; "
            "resume with the same number of processes, or start over without --resume"
        )


class _RenamedFlag(argparse.Action):
    """A flag that was renamed: using it is an error that names the new flag (never silently another one)."""

    def __init__(self, option_strings, dest, message: str, **kwargs):
        self.message = message
        super().__init__(option_strings, dest, nargs="?", help=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(self.message)


class _Sources(argparse.Action):
    """``--images`` / ``--videos``: the sources; ``--videos`` also says they are videos, which a packed vision tower
    (it takes either) needs for folders of frames. Given twice, both lists are the sources (the first was dropped
    without a word, QA 284); ``--images`` beside ``--videos`` is refused, as one says the sources are videos."""

    def __call__(self, parser, namespace, values, option_string=None):
        earlier = getattr(namespace, "_sources_flag", None)
        if earlier is None:
            setattr(namespace, self.dest, list(values))
        elif earlier != option_string:
            parser.error("--images and --videos both given: pass every source with one of them (--videos says they "
                         "are all videos)")
        else:
            getattr(namespace, self.dest).extend(values)
        namespace._sources_flag = option_string
        namespace.as_videos = option_string == "--videos"


class _Parser(argparse.ArgumentParser):
    """argparse's own mistakes (an unknown flag, a value of the wrong type or outside the choices) end as vitmad's
    others do: one ``vitmad: error: ...`` line and exit status 2, not argparse's usage block and its own prefix. The
    subcommands' parsers are of this class too (``add_subparsers`` makes them of the parent's)."""

    def error(self, message: str):
        self.exit(2, f"vitmad: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from .profiling.models import MODEL_SPEC_HELP

    parser = _Parser(prog="vitmad", description="Mean attention distance of Vision Transformer heads.",
                     allow_abbrev=False)
    from . import __version__

    parser.add_argument("--version", action="version", version=f"vitmad {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    # allow_abbrev=False: a prefix such as --checkpoint must never be read as --checkpoint-every.
    run = commands.add_parser("profile", help="profile a model over an image set", allow_abbrev=False,
                              description="Profile the mean attention distance of every head over an image set.")
    run.add_argument("--model", default="builtin:dinov2-s14", help=f"{MODEL_SPEC_HELP} (default: %(default)s)")
    run.add_argument("--weights", dest="model_checkpoint", default=None, metavar="FILE",
                     help="local weights file for a timm:, torchvision: or open_clip: model (instead of its "
                          "pretrained download); the checkpoint a segment_anything:, sam2: or monai: model requires")
    run.add_argument("--model-args", default=None, metavar="FILE_OR_JSON",
                     help="monai: only: the network's constructor arguments, a JSON or YAML file or a JSON object "
                          "(img_size is the size every volume is resized to)")
    run.add_argument("--intensity", default=None, metavar="MODE",
                     help="monai: only: each volume's intensity scaling, minmax (default: 0 to 1), zscore, "
                          "window:LOW,HIGH (clipped, then 0 to 1) or none")
    run.add_argument("--volume-unit", default=None, choices=["mm", "voxel"],
                     help="monai: only: MAD in millimetres from each volume's voxel spacing (default) or in voxels")
    run.add_argument("--checkpoint", action=_RenamedFlag,
                     message="--checkpoint was renamed --weights (local weights of a timm:, torchvision:, "
                             "open_clip:, segment_anything: or sam2: model); the run's own checkpoint is "
                             f"OUT/{CHECKPOINT_NAME}, used by --resume")
    run.add_argument("--images", "--videos", nargs="+", default=["builtin"], action=_Sources,
                     help="folders (searched recursively), files, or 'builtin': photographs shipped with "
                          "scikit-image (default). A video model (VideoMAE, ViViT, TimeSformer, V-JEPA 2, "
                          "torchvision's MViT and video Swin) takes videos: clips (.mp4, .webm, .avi, ...; decoded "
                          "with PyAV), folders of frames (images in name order), or folders of those; each is sampled "
                          "evenly to the model's frame count. The Qwen2-VL, Qwen2.5-VL and Qwen3-VL vision towers "
                          "(and Qwen3-VL's kin), VideoLLaMA3's, Ovis2.5's, LFM3-VL's, Cosmos3-Edge's, HY-V4-VL's, "
                          "MiniMax-M3-VL's (space and time) and the Muse towers take clips too, or with --videos "
                          "folders of frames, each through the model's own video processor (its frame sampling, "
                          "size and patches). A monai: model takes NIfTI volumes (.nii, .nii.gz) or folders of them")
    run.set_defaults(as_videos=False)
    run.add_argument("--image-size", default=None,
                     help="S or HxW instead of the model's input size, or native: each image at its own aspect "
                          "ratio (NaFlex models such as SigLIP2 and timm naflexvit_*, the Qwen2-VL, Qwen2.5-VL, "
                          "Qwen3-VL, Qwen3-VL-MoE, Qwen3.5, Qwen3.5-MoE, MiniMax-M3-VL, Cosmos3-Edge, LFM3-VL, "
                          "PaddleOCR-VL, Ovis2.5, Muse Glimmer, Muse Spark, VideoLLaMA3, HunYuanVL, HY-V4-VL and "
                          "Pixtral vision "
                          "towers, which need native or a size, "
                          "and ViTs whose position embedding follows the input)")
    run.add_argument("--batch-size", type=int, default=16, help="images per forward pass (default: 16)")
    run.add_argument("--device", default="auto", help="auto (CUDA when present; the default), cpu, cuda, cuda:N")
    run.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                     help="the model's weights and computation (default: %(default)s)")
    run.add_argument("--max-images", type=int, default=None,
                     help="profile only the first K image files, sources in the order given and each folder "
                          "sorted (an unreadable one among them counts, listed as skipped)")
    run.add_argument("--renormalize", action="store_true",
                     help="divide each query's distance by its attention mass on patches")
    run.add_argument("--stats", action="append", metavar="NAMES",
                     help="comma list of what to profile from the same forward: mad (always), entropy, prefix_mass, "
                          "self_mass (each: mad.json, mad.csv columns, NAME.png), prefix_maps (CLS / register maps "
                          "over the grid, mean over images: prefix_maps.npz, prefix_maps.png); all for every one; "
                          "given twice, both lists (default: mad)")
    run.add_argument("--out", default="vitmad_out", help="output folder (default: %(default)s)")
    run.add_argument("--resume", action="store_true", help=f"continue from OUT/{CHECKPOINT_NAME}")
    run.add_argument("--no-figures", action="store_true",
                     help="draw nothing: write mad.json, mad.csv (and prefix_maps.npz) only")
    run.add_argument("--workers", dest="loader_threads", type=int, default=4,
                     help="threads decoding images (default: 4)")
    run.add_argument("--checkpoint-every", type=int, default=8, help="batches between checkpoints (default: 8)")
    run.add_argument("--backend", default=None, choices=["gloo", "nccl"],
                     help="torchrun only: process-group backend (default: nccl on GPUs, gloo on CPUs)")
    run.add_argument("--dist-timeout", type=float, default=1800,
                     help="torchrun only: seconds a collective waits for the other ranks (default: 1800)")

    compare = commands.add_parser("compare", help="overlay several profiles", allow_abbrev=False,
                                  description="Overlay the mean and spread per layer of several mad.json files.")
    # (nargs "*": the command says itself when none is left, --labels having taken them: QA 358)
    compare.add_argument("results", nargs="*",
                         help="mad.json files (or the --out folders of profile runs, which hold them)")
    compare.add_argument("--labels", nargs="+", default=None, help="one label per result (default: model)")
    compare.add_argument("--out", required=True,
                         help="figure file of MAD (.png, .pdf, .svg, .jpg, .webp, .tif, .eps, ...: any type "
                              "matplotlib writes); each other statistic every result has goes beside it, named with "
                              "the statistic (compare_entropy.png for compare.png)")

    bench = commands.add_parser("bench", help="time the fused op against plain PyTorch (short form)",
                                allow_abbrev=False,
                                description="Time vitmad.mad against the dense PyTorch formula (the distance "
                                            "matrix times the attention) on ViT shapes; benchmarks/ holds the full "
                                            "benchmarks.")
    bench.add_argument("--device", default="auto",
                       help="cpu, cuda, cuda:N or auto (CUDA when available; the default)")
    bench.add_argument("--repeats", type=int, default=10,
                       help="timed runs per shape, after one warm-up run (default: 10)")
    return parser


def _quiet_transformers() -> None:
    """Keep transformers' weight-loading bars and load reports out of the command's output."""
    try:
        from transformers.utils import logging as hf_logging
    except ModuleNotFoundError:
        return
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _profile_command(args: argparse.Namespace, run, held: contextlib.ExitStack) -> None:
    from .profiling import mad_maps, profile
    from .profiling.checkpoint import check_checkpoint_path
    from .profiling.earlier_runs import earlier_outputs, outputs_of
    from .profiling.engine import when_planned
    from .profiling.files import check_writable, held_by_this_run
    from .profiling.images import NATIVE, parse_image_size
    from .profiling.maps import image_prefix_maps
    from .profiling.models import load_model
    from .profiling.options import (
        OptionError,
        check_loader_threads,
        check_positive,
        import_optional,
        resolve_device,
        resolve_stats,
    )
    from .profiling.packed_towers import find_packed_tower
    from .profiling.plotting import plot_image_prefix_maps, plot_mad_maps
    from .profiling.videos import find_videos, is_video_source, model_frames, without_clips
    from .profiling.volumes import find_volumes

    # Every flag is resolved into the object profile() takes, cheapest and most likely mistakes first: a
    # wrong folder, size or device fails at once, before the model loads.
    if not str(args.out).strip():  # Path("") is the working folder: an unset variable in a job script
        raise OptionError("out", f"expected a folder, got {args.out!r}")
    out = Path(args.out)
    size = parse_image_size(args.image_size)
    stats = resolve_stats("mad" if args.stats is None else ",".join(args.stats))  # --stats a --stats b: both
    # The counts profile() checks too, before the model loads and the earlier outputs are said to go (QA 308).
    check_positive("batch_size", args.batch_size, optional=False)
    check_positive("max_images", args.max_images)
    check_positive("checkpoint_every", args.checkpoint_every, "a positive number of batches", optional=False)
    check_loader_threads(args.loader_threads)
    # An earlier run's outputs, known by its mad.json (a user's own photo named entropy.png is not ours): with
    # --out inside an image folder, they are no photographs to profile.
    ours = [out / name for name in sorted(earlier_outputs(out))]
    writes = {name for name in outputs_of(stats) if not (args.no_figures and name.endswith(".png"))}
    _check_output_paths(out, ours, writes)
    volumes = args.model.startswith("monai:")  # NIfTI files: no image or video search applies
    # Videos: clips, or what --videos names (an empty folder given as --videos is refused as holding no video).
    videos = not volumes and args.images != ["builtin"] and (
        args.as_videos or all(is_video_source(source) for source in args.images))
    # --out itself too: created below, it would make the frame folder it lies in a folder holding a folder.
    # What the search says is held back until the model tells whether its guess (videos or images) stands.
    with warnings.catch_warnings(record=True) as guessed:
        warnings.simplefilter("always")
        if volumes:
            files = find_volumes(args.images, exclude=ours)
        else:
            files = find_videos(args.images, exclude=[*ours, out]) if videos else _images(args.images, ours)
    device = resolve_device(args.device)
    check_writable(out)  # a read-only or full disk fails now, not after the run
    main_process = run is None or run.is_main
    if main_process:  # one run at a time writes to --out (torchrun's ranks are one run: its main process holds it)
        held.enter_context(held_by_this_run(out / OUT_LOCK_NAME, str(out), "out"))
    earlier = {p.name for p in ours if p.is_file()}
    if args.resume:  # before saying the earlier outputs go: a resume refused here replaces nothing (QA 306)
        _check_resume_world_size(out, run)
    # A checkpoint that is no vitmad checkpoint is refused before the model loads, as vitmad.profile refuses it (the
    # one that passed is remembered for the interrupt message: checkpoint.CHECKED).
    check_checkpoint_path(checkpoint_path(out, run))
    # --resume with nothing to resume starts over as a plain run does, and replaces the earlier outputs as it does
    # (QA 303: a job script that always passes --resume replaced them unannounced).
    resuming = args.resume and checkpoint_path(out, run).is_file()
    if not args.no_figures:
        import_optional("matplotlib", "profile", "vitmad profile's figures (or pass --no-figures)")
    _quiet_transformers()
    loaded = load_model(args.model, model_checkpoint=args.model_checkpoint, image_size=size, model_args=args.model_args,
                        intensity=args.intensity, volume_unit=args.volume_unit)
    video_model = model_frames(loaded.module) is not None
    # Whether a packed tower (which takes images and videos) is given videos.
    packed_videos = videos and not video_model and find_packed_tower(loaded.module) is not None
    # The model decides what the sources hold (the check above could only guess from the files).
    if videos == (video_model or packed_videos):
        for warning in guessed:
            warnings.warn(warning.message, stacklevel=1)
    if not videos and video_model:
        # Folders of image files are frame folders to a video model.
        if args.images == ["builtin"]:
            raise OptionError("images", f"{args.model} is a video model and the built-in images are still photographs: "
                                        "pass --videos with clips or folders of frames")
        files = find_videos(args.images, exclude=[*ours, out])
    elif videos and not video_model and not packed_videos and args.as_videos:
        # Said by --videos (a --model forgotten, say): the clips were dropped without a word and a frame folder's
        # frames profiled as stills (QA 268), where vitmad.profile(videos=True) refuses.
        raise OptionError("images", f"{type(loaded.module).__name__} ({args.model}) is no video model (no frame count "
                                    "in its config) and no packed vision tower: it takes images; pass them with "
                                    "--images, or a video model with --model")
    elif videos and not video_model and not packed_videos:
        # An image model takes the image files among them; a clip beside images made the folder a video
        # source, and its images were dropped (or read as frames of one video).
        files = _images(args.images, ours)
    if not (volumes or video_model or packed_videos):
        files = without_clips(files, f"{type(loaded.module).__name__} ({args.model})",
                              find_packed_tower(loaded.module) is not None, ("--videos", "--model"))
    if (video_model or packed_videos) and out.resolve() in files:
        # Its frames are every image in it: this run's figures would join them.
        raise OptionError("out", f"{out} is a folder of frames among --images; pass another folder")

    def say_replaced() -> None:
        # Once profile() has checked every option against the model (its sizes, that it has layers to record):
        # said before, a refused run warned of a replacement that never came (QA 342, QA 348, QA 351).
        if earlier and main_process and not resuming:
            warnings.warn(f"{out} holds an earlier run's outputs ({', '.join(sorted(earlier))}): this run replaces "
                          "them (pass another --out to keep them)", stacklevel=1)

    with when_planned(say_replaced):
        result = profile(
            loaded,
            files,
            batch_size=args.batch_size,
            device=device,
            dtype=args.dtype,
            renormalize=args.renormalize,
            image_size=size,
            max_images=args.max_images,
            checkpoint=checkpoint_path(out, run),
            checkpoint_every=args.checkpoint_every,
            loader_threads=args.loader_threads,
            resume=args.resume,
            progress=True,
            distributed=run,
            stats=stats,
            videos=packed_videos or None,
        )
    if run is not None:
        # The last collective is behind: the ranks leave the group together now. The others waited for the main
        # rank at a final barrier while it wrote the results and drew the figures (a large model's maps: a forward
        # of its own), and ended the job with a timeout past --dist-timeout, the main rank killed mid-write.
        run.close(wait_for_all=True)
        if not run.is_main:
            return
    # What this run writes, known before it writes any: mad.json names it (earlier_outputs reads it back).
    prefix_layers = result.prefix_maps is not None and bool(result.prefix_maps.layers)
    maps_over_image = not args.no_figures and result.temporal is None and not packed_videos and not volumes
    # (A native run has no mean maps, each image its own grid, but one image's maps are on its own grid.)
    native_maps = "prefix_maps" in stats and size == NATIVE
    planned = ["mad.json", "mad.csv", *(["prefix_maps.npz"] if prefix_layers else [])]
    if not args.no_figures:
        planned += ["mad.png", *(f"{name}.png" for name in result.statistics if result.has_values(name)),
                    *(["prefix_maps.png"] if prefix_layers else [])]
    if maps_over_image:
        planned += ["mad_map.png", *(["prefix_map_image.png"] if prefix_layers or native_maps else [])]
    # Every file of the earlier run goes before this run writes its own, those it does not rewrite (another
    # model's maps, a statistic not asked for now: "stale") too: an interruption while this run's files are written
    # left them beside its results as its own (QA 270), and one that failed while drawing the earlier model's
    # figure of a name it rewrites (QA 273).
    stale = sorted(earlier - set(planned))
    # mad.json last: it is what marks the others as an earlier run's, and a run killed among these unlinks left
    # figures without it, which the rerun then took for the user's files and refused to write over (QA 303).
    for name in sorted(earlier, key=lambda name: (name == "mad.json", name)):
        (out / name).unlink(missing_ok=True)
    result.to_json(out / "mad.json", outputs=planned)
    result.to_csv(out / "mad.csv")
    written = ["mad.json", "mad.csv"]
    try:
        if prefix_layers:
            result.save_prefix_maps(out / "prefix_maps.npz")
            written.append("prefix_maps.npz")
        if not args.no_figures:
            result.plot(out / "mad.png")
            written.append("mad.png")
            for name in result.statistics:
                if result.has_values(name):  # else _print_summary says why there is no figure
                    result.plot_stat(name, out / f"{name}.png")
                    written.append(f"{name}.png")
            if prefix_layers:
                result.plot_prefix_maps(out / "prefix_maps.png")
                written.append("prefix_maps.png")
        # Maps over one image (a volume's are not drawn: their figure is of 2-D grids over the image).
        if maps_over_image:
            maps, pixels, names, geometry = mad_maps(loaded, result.images[0], image_size=size,
                                                     renormalize=args.renormalize, device=device)
            prep = loaded.preprocessing
            plot_mad_maps(maps, pixels, names, out / "mad_map.png", geometry=geometry, mean=prep.mean, std=prep.std,
                          renormalized=args.renormalize)
            written.append("mad_map.png")
            # The mean maps blur what each image's CLS looks at: one image, every head, as in the DINO paper.
            if prefix_layers or native_maps:
                try:
                    token_maps, pixels, name, layer = image_prefix_maps(loaded, result.images[0], image_size=size,
                                                                        device=device)
                except OptionError:  # a native model without a class or register token (SigLIP2): nothing to draw
                    if not native_maps:
                        raise
                else:
                    plot_image_prefix_maps(token_maps, pixels, name, out / "prefix_map_image.png", geometry=layer,
                                           mean=prep.mean, std=prep.std)
                    written.append("prefix_map_image.png")
    finally:
        if set(written) != set(planned):
            # A figure planned and not drawn (a native model without a class token has no prefix maps of its
            # image; drawing failed): named, a user's file of its name would be removed by the next run as this
            # run's (QA 273, 275).
            result.to_json(out / "mad.json", outputs=written)
    _print_summary(result)
    print(f"wrote {', '.join(str(out / name) for name in written)}")
    if stale:
        print(f"removed the earlier run's {', '.join(str(out / name) for name in stale)}")


def _print_summary(result) -> None:
    mad = result.mad
    print(f"{result.model}: {result.count} {result.input_kind} ({len(result.skipped)} skipped), "
          f"uniform attention {result.uniform_mad:.1f} {result.distance_unit}")
    if result.settings.get("profiled"):  # a part of the checkpoint (a vision-language model's vision tower)
        print(f"profiled: {result.settings['profiled']}")
    print(f"{'layer':>5}  {'mean':>7}  {'min head':>8}  {'max head':>8}  name")
    for i, (name, heads) in enumerate(zip(result.layers, result.heads)):
        row = mad[i, :heads]
        # As mad.json's summary: the mean over every head (NaN where one has no value), the lowest and highest of
        # the heads that have one (both were NaN beside a NaN head, where mad.json names them; QA 263).
        finite = row[~row.isnan()]
        low, high = (finite.min(), finite.max()) if finite.numel() else (float("nan"), float("nan"))
        temporal = "" if result.temporal is None else f"  ({result.temporal_mad[i, :heads].mean():.2f} frames)"
        print(f"{i:>5}  {row.mean():7.1f}  {low:8.1f}  {high:8.1f}  {name}{temporal}")
    for name, reason in result.skipped_layers.items():
        if name in result.class_layers:  # the recorder's advice (rec.class_attention_maps) is not this run's
            reason = f"{reason.split(';')[0]}; no MAD, its queries' mean map is in prefix_maps.npz"
        print(f"skipped {name}: {reason}")
    for name in result.statistics:
        if not result.has_values(name):
            print(f"{name}: not defined in any recorded layer (differential attention, or self mass beside pooled "
                  "keys): null in mad.json, no figure")
    if result.prefix_maps is not None:
        maps = result.prefix_maps
        total = len(result.layers) + len(result.class_layers)
        classes = (f" ({len(result.layers)} recorded, {len(result.class_layers)} class-attention or pooling)"
                   if result.class_layers else "")
        print(f"prefix maps: {len(maps.layers)} of {total} layers{classes}")
        for reason in sorted(set(maps.skipped.values())):
            count = sum(1 for found in maps.skipped.values() if found == reason)
            print(f"  no maps in {count} layer{'s' if count != 1 else ''}: {reason}")


def _default_labels(profiles, paths) -> list[str]:
    """Each result's model; where two results share a model, their files tell them apart instead."""
    models = [p.model for p in profiles]
    if len(set(models)) == len(models):
        return models
    return [f"{model} ({path})" for model, path in zip(models, paths)]


def _check_labels(labels: list[str]) -> None:
    """A label matplotlib would draw as mathematics (an even number of unescaped $) must parse as such: said
    here naming --labels, not as matplotlib's four-line parser error."""
    from matplotlib.mathtext import MathTextParser

    for label in labels:
        dollars = label.count("$") - label.count(r"\$")
        if dollars and dollars % 2 == 0:
            try:
                MathTextParser("path").parse(label)
            except ValueError as err:
                found = str(err).strip().splitlines()[-1]
                raise ValueError(f"--labels: matplotlib cannot draw {label!r} as mathematics ({found}); escape "
                                 r"its dollar signs as \$ for plain text") from None


def _compare_figures(out: Path, names: list[str]) -> tuple[list[Path], list[Path]]:
    """Of the per-statistic figures beside ``out``: those this comparison writes (``names``), each checked to be
    free or an earlier comparison's figure (``out`` itself too), and the earlier comparison's figures of other
    statistics (stale, to remove). A file vitmad compare did not write is never replaced: a user's plot named
    cmp_entropy.png beside cmp.png is refused before anything is drawn. A format that cannot carry compare's
    mark (.raw, .rgba, .pgf) never replaces or removes a file beside ``out`` (``out`` itself, the path named, is
    replaced): with ``out`` there, its user's own cmp_entropy.jpg was written over and its cmp_temporal_mad.jpg
    removed (QA 259; .jpg carries the mark now)."""
    from .ops.arguments import STAT_NAMES, TEMPORAL_MAD
    from .profiling.plotting import marks, written_by_compare

    def earlier(path: Path) -> bool:
        return path.is_file() and marks(path) and written_by_compare(path)

    figures = {name: out.with_name(f"{out.stem}_{name}{out.suffix}")
               for name in (*STAT_NAMES, TEMPORAL_MAD) if name != "mad"}
    # The MAD figure at --out itself too: a user's photo named there was written over (QA 276). In a format without
    # the mark (.webp, .tif) compare cannot tell its own figure there from another file: the path named is replaced,
    # as any tool's output, or no comparison could be drawn there twice (QA 285).
    if (out.exists() or out.is_symlink()) and marks(out) and not earlier(out):
        raise ValueError(f"--out: {out} exists and was not written by vitmad compare; move it, or choose another "
                         "--out")
    for name in names:
        path = figures[name]
        if path.is_dir():
            raise ValueError(f"--out: {path}, where the {name} figure goes, is a folder; remove it or choose "
                             "another --out")
        if (path.exists() or path.is_symlink()) and not earlier(path):
            raise ValueError(f"--out: {path}, where the {name} figure goes, exists and was not written by vitmad "
                             "compare; move it, or choose another --out")
    stale = [path for name, path in figures.items() if name not in names and earlier(path)]
    return [figures[name] for name in names], stale


def _compare_command(args: argparse.Namespace, run) -> None:
    from .ops.arguments import STAT_NAMES, TEMPORAL_MAD
    from .profiling import Profile
    from .profiling.files import check_writable
    from .profiling.options import import_optional
    from .profiling.plotting import figure_type_refused, plot_compare, renormalized

    if not args.results:
        shown = ", ".join(args.labels or [])
        raise ValueError("results: no mad.json given" + (
            f"; --labels took every argument after it ({shown}): give the results before --labels" if shown else
            "; give one or more mad.json files, or the --out folders of profile runs"))
    # A comparison is only figures: a missing matplotlib is said first, with the extra that brings it.
    import_optional("matplotlib", "profile", "vitmad compare")
    # A profile run's --out folder stands for its mad.json, the name a researcher has at hand (QA 290).
    args.results = [os.path.join(path, "mad.json") if os.path.isdir(os.path.expanduser(path))
                    and os.path.isfile(os.path.join(os.path.expanduser(path), "mad.json")) else path
                    for path in args.results]
    profiles = [Profile.from_json(path) for path in args.results]
    labels = args.labels or _default_labels(profiles, args.results)
    if len(labels) != len(profiles):
        raise ValueError(f"--labels: expected {len(profiles)} labels (one per result), got {len(labels)}")
    _check_labels(labels)
    units = {path: profile.distance_unit for path, profile in zip(args.results, profiles)}
    if len(set(units.values())) > 1:  # one axis: millimetres beside pixels would read as one scale
        raise ValueError("results: their MAD is in different units (" + ", ".join(
            f"{path}: {unit}" for path, unit in units.items()) + "); compare results of one unit (a volume "
            "profile's --volume-unit mm or voxel, an image profile's pixels)")
    seen: dict[Path, int] = {}
    for i, path in enumerate(args.results):
        first = seen.setdefault(Path(path).expanduser().resolve(), i)
        if first != i:
            warnings.warn(f"results {first + 1} and {i + 1} are the same file, {path}: its curves are drawn twice",
                          stacklevel=2)
    subsets = [path for path, profile in zip(args.results, profiles) if profile.layers_named]
    if subsets:  # counted in the order named: a model's last layer alone is drawn where layer 1 is
        warnings.warn(f"{', '.join(subsets)} profiled the layers named in layers=: "
                      f"{'its' if len(subsets) == 1 else 'their'} layers are drawn in the order they ran, which need "
                      "not be their depth in the model", stacklevel=2)
    marked = [path for path, profile in zip(args.results, profiles) if renormalized(profile)]
    if marked and len(marked) < len(profiles):  # two quantities on one axis: drawn, each marked, and said
        warnings.warn(f"{', '.join(marked)} profiled with --renormalize (each query's distance over its attention "
                      "on patches, at least the plain MAD) beside results without it: a quantity of its own, whose "
                      "curves are marked (renormalized)", stacklevel=2)
    if not args.out.strip():  # Path("") is the current folder, which it was said to be (QA 421)
        raise ValueError(f"--out: expected the figure file, got {args.out!r}")
    out = Path(args.out).expanduser()
    if out.is_dir():
        raise ValueError(f"--out: {out} is a folder; name the figure file, such as {out / 'compare.png'}")
    refused = figure_type_refused(out)
    if refused is not None:  # said before its folders are made (they were left behind, empty; QA 284)
        raise ValueError(f"--out: {refused}")
    if not out.suffix:  # matplotlib would add ".png" itself: name the file it writes
        out = out.with_name(out.name + ".png")
    check_writable(out.parent)  # a path through a file, or a read-only folder: said now, by name
    # Every statistic all the results have, each in its own figure beside the MAD one; the others said.
    names = [name for name in STAT_NAMES if name != "mad" and any(name in p.statistics for p in profiles)]
    common, lacking_by_files = [], {}
    for name in names:
        lacking = tuple(path for path, p in zip(args.results, profiles) if name not in p.statistics)
        if lacking:
            lacking_by_files.setdefault(lacking, []).append(name)
        elif not any(p.has_values(name) for p in profiles):
            warnings.warn(f"no {name} figure: no result has a value of it (not defined in their layers)",
                          stacklevel=2)
        else:
            common.append(name)
    # Video profiles' temporal MAD (frames), drawn where every result has it.
    videos = [path for path, p in zip(args.results, profiles) if p.temporal is not None]
    if videos and len(videos) == len(profiles):
        common.append(TEMPORAL_MAD)
    elif videos:
        images = tuple(path for path in args.results if path not in videos)
        lacking_by_files.setdefault(images, []).append(TEMPORAL_MAD)
    for lacking, missing in lacking_by_files.items():
        warnings.warn(f"no {', '.join(missing)} figure{'s' if len(missing) > 1 else ''}: {', '.join(lacking)} "
                      f"{'was' if len(lacking) == 1 else 'were'} profiled without "
                      f"{', '.join(missing[:-1]) + ' or ' if len(missing) > 1 else ''}{missing[-1]}",
                      stacklevel=2)
    paths, stale = _compare_figures(out, common)
    plot_compare(profiles, labels, out)
    for name, path in zip(common, paths):
        plot_compare(profiles, labels, path, statistic=name)
    for path in stale:
        path.unlink()
    print(f"wrote {', '.join(map(str, [out, *paths]))}")
    if stale:
        print(f"removed an earlier comparison's {', '.join(map(str, stale))}")


def _bench_command(args: argparse.Namespace, run) -> None:
    from .ops.bench import run_op_bench
    from .profiling.options import check_positive, resolve_device

    check_positive("repeats", args.repeats)  # (0 divided the time by zero)
    run_op_bench(resolve_device(args.device), repeats=args.repeats)


def _flags(parser: argparse.ArgumentParser) -> dict[str, str]:
    """Parameter name -> flag, for every subcommand (the flags' ``dest`` are the parameters' names)."""
    flags = {"checkpoint": "--out", "image": "--images"}  # profile() parameters the CLI fills from other flags
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                flags.update(_flags(sub))
        elif action.option_strings and not isinstance(action, _RenamedFlag):
            flags[action.dest] = max(action.option_strings, key=len)
    return flags


def _message(err: BaseException, flags: dict[str, str]) -> str:
    """The error's message, with the parameter it starts with and those it names spelled as their flags."""
    from .profiling.options import OptionError, Parameter

    if not isinstance(err, OptionError):
        return str(err)
    parts = "".join(flags.get(part, part) if isinstance(part, Parameter) else part for part in err.parts)
    return f"{flags.get(err.parameter, err.parameter)}: {parts}"


def main(argv: list[str] | None = None) -> int:
    """Run the ``vitmad`` command line; returns the exit status."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args, unknown = parser.parse_known_args(argv)
    # The top level takes no values, so the first word that is no flag is the subcommand: an unknown flag before
    # it is the top level's (`vitmad --bogus profile` pointed to profile's --help).
    before = collections.Counter(argv[:argv.index(args.command)] if args.command in argv else [])
    top = []
    for token in unknown:  # in order: the top level's come first, and a flag given again after is the subcommand's
        if before[token] > 0:
            before[token] -= 1
            top.append(token)
    if top:
        parser.error(f"unrecognized arguments: {' '.join(top)}")
    if unknown:  # said by the subcommand's parser, whose --help lists its flags (not the top level's)
        command = next(action.choices[args.command] for action in parser._actions
                       if isinstance(action, argparse._SubParsersAction))
        command.error(f"unrecognized arguments: {' '.join(unknown)}")
    if str(getattr(args, "out", "") or "").strip():
        # --out=~/x reaches us unexpanded (the shell expands a ~ only at a word's start): the checks of what is
        # there looked at ./~/x while the files went to ~/x, over a user's own mad.csv (QA 276).
        args.out = os.path.expanduser(args.out)
    warnings.formatwarning = lambda message, *_, **__: f"vitmad: warning: {message}\n"
    held = contextlib.ExitStack()  # what a profile run holds until it ends: its --out folder
    commands = {"profile": functools.partial(_profile_command, held=held), "compare": _compare_command,
                "bench": _bench_command}
    run, where = None, ""
    # A profile run creates --out before the model loads (check_writable: a read-only disk fails at once); a run
    # that fails before writing anything there takes the empty folder away again.
    new_out = _missing_folders(args.out) if args.command == "profile" else []
    completed = False
    checkpoint_before = _NOT_SEEN  # the state of this process's checkpoint file before the run: see the interrupt
    from .profiling.interrupts import keep_interrupts

    restore_interrupts = keep_interrupts()  # a Ctrl-C a finalizer drops is raised at a profile run's next step
    try:
        if args.command == "profile":
            from .profiling.distributed import init_from_env

            run = init_from_env(args.backend, args.device, args.dist_timeout)
            where = "" if run is None else f"rank {run.rank} of {run.world_size}: "
            from .profiling.checkpoint import CHECKED, RESUMED, file_state

            # What an earlier command or profile() call of this process checked or resumed is not this run's.
            CHECKED.clear()
            RESUMED.clear()
            checkpoint_before = file_state(checkpoint_path(Path(args.out), run))
        commands[args.command](args, run)  # a profile under torchrun leaves the group once its results are merged
        completed = True
    except (ValueError, FileNotFoundError, ModuleNotFoundError) as err:
        flags = _flags(parser)
        if getattr(args, "as_videos", False):  # the sources were given as --videos: name them so
            flags["images"] = "--videos"
        print(f"vitmad: error: {where}{_message(err, flags)}", file=sys.stderr)
        return 2
    except OSError as err:  # a full disk, a permission changed mid-run: the message names the file
        print(f"vitmad: error: {where}{err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        # Only a profile run saves progress, and only once a batch has finished: its checkpoint is then another file
        # than the one there before (written whole, then renamed), or the one it resumed (checked and loaded). One
        # left by an earlier run, with other settings perhaps, is no progress of this command (QA 303: a finished
        # run's was taken for it, and the rerun with --resume refused; QA 306: also under --resume, before the
        # resume had checked it).
        # Decided from the files' states alone: a second Ctrl-C while a large checkpoint was unpickled here ended
        # in a traceback (QA 308). An earlier run's is the very file the command checked to be a vitmad checkpoint.
        from .profiling.checkpoint import CHECKED, RESUMED, file_state

        out = Path(args.out) if args.command == "profile" else None
        checkpoint = checkpoint_path(out, run) if out is not None else None
        now = file_state(checkpoint) if checkpoint is not None else None
        wrote = now is not None and checkpoint_before is not _NOT_SEEN and now != checkpoint_before
        if wrote or (now is not None and RESUMED.get(checkpoint.resolve()) == now):
            print(f"vitmad: {where}interrupted; progress is saved in {out}, "
                  "rerun the same command with --resume to continue", file=sys.stderr)
        elif now is not None and CHECKED.get(checkpoint.resolve(), _NOT_SEEN) == now:
            print(f"vitmad: {where}interrupted before this run saved any progress; {checkpoint} is an earlier "
                  "run's, which --resume continues where that run had this command's settings", file=sys.stderr)
        else:
            print(f"vitmad: {where}interrupted; nothing was saved", file=sys.stderr)
        return 130
    except Exception as err:
        if run is None:
            raise
        # Under torchrun: name the rank, and exit (the launcher then stops the other ranks) instead of hanging.
        traceback.print_exc()
        # A collective that waited past its deadline names milliseconds and a transport's source file, not the
        # option that set them (QA 303).
        timeout = ""
        if isinstance(err, RuntimeError) and "timed out" in str(err).lower():
            timeout = (f"; a collective waits at most --dist-timeout seconds ({args.dist_timeout:g}) for the other "
                       "ranks: raise it where one waits longer (a slower share, model load or first batch)")
        print(f"vitmad: error: rank {run.rank} of {run.world_size} failed: {type(err).__name__}: {err}{timeout}",
              file=sys.stderr)
        return 1
    finally:
        restore_interrupts()
        held.close()
        if run is not None:
            run.close()
        if not completed:
            _remove_if_empty(new_out)
    return 0


def _missing_folders(out: str) -> list[Path]:
    """The folders a profile run will create for ``out``: ``out`` and its missing parents, deepest first."""
    if not str(out).strip():
        return []
    path, missing = Path(out).expanduser().absolute(), []
    while not path.exists() and path != path.parent:
        missing.append(path)
        path = path.parent
    return missing


def _remove_if_empty(folders: list[Path]) -> None:
    """Remove ``folders``, deepest first, while each holds nothing (another rank may have written there, or be
    removing them)."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return
