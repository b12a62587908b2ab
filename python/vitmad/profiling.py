"""``vitmad.profile``: the mean attention distance of every head of a model, over an image set.

The engine runs the model batch by batch under :func:`vitmad.record`, adds each image's ``[L, H]`` MAD to
float64 running sums, and checkpoints them with the list of processed files every few batches. Batches are
fixed slices of the sorted file list (a broken file leaves a hole in its batch instead of shifting the
next ones), so a resumed run sees the same batches and ends with the same sums as an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .checkpoint import atomic_file, check_writable, fingerprint, load_checkpoint, save_checkpoint
from .stats import RunningStats

__all__ = ["Profile", "profile", "mad_maps", "resolve_device", "FORMAT"]

FORMAT = "vitmad-profile/1"


@dataclass
class Profile:
    """MAD per layer and head of one model over an image set.

    Attributes:
        model: the model spec or class name.
        layers: attention module names, in execution order (``L`` of them).
        layout: ``{"patch": int, "grid": [gh, gw], "num_prefix_tokens": int}``.
        stats: float64 running statistics over the images.
        images: files (or tensor rows) profiled, in order.
        skipped: ``{"path": ..., "reason": ...}`` for each unreadable image.
        settings: how it was run (renormalize, dtype, image size, preprocessing, batch size, layers).
        processes: how many processes shared the work (``torchrun``); the result does not depend on it.
    """

    model: str
    layers: list[str]
    layout: dict
    stats: RunningStats
    images: list[str] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    settings: dict = field(default_factory=dict)
    processes: int = 1

    @property
    def mad(self) -> torch.Tensor:
        """``[L, H]`` float64: MAD in pixels, mean over images."""
        return self.stats.mean

    @property
    def std(self) -> torch.Tensor:
        """``[L, H]`` float64: standard deviation over images."""
        return self.stats.std

    @property
    def min(self) -> torch.Tensor:
        """``[L, H]`` float64: smallest per-image MAD."""
        return self.stats.low

    @property
    def max(self) -> torch.Tensor:
        """``[L, H]`` float64: largest per-image MAD."""
        return self.stats.high

    @property
    def count(self) -> int:
        """Number of images profiled."""
        return self.stats.count

    @property
    def uniform_mad(self) -> float:
        """MAD of uniform attention on this grid: the value of a fully global head."""
        from .reference import uniform_attention_mad

        grid_h, grid_w = self.layout["grid"]
        return uniform_attention_mad(grid_h, grid_w, self.layout["patch"])

    def to_dict(self) -> dict:
        """The ``mad.json`` document (see :meth:`to_json`)."""
        mad, std, low, high = (t.tolist() for t in (self.mad, self.std, self.min, self.max))
        layers = []
        for i, name in enumerate(self.layers):
            layers.append({
                "index": i,
                "name": name,
                "mean": mad[i],
                "std": std[i],
                "min": low[i],
                "max": high[i],
                "count": self.count,
                "summary": {
                    "mean_over_heads": sum(mad[i]) / len(mad[i]),
                    "min_head": min(mad[i]),
                    "max_head": max(mad[i]),
                },
            })
        from . import __version__

        return {
            "format": FORMAT,
            "vitmad_version": __version__,
            "model": self.model,
            "layout": self.layout,
            "uniform_attention_mad": self.uniform_mad,
            "settings": self.settings,
            "processes": self.processes,
            "num_layers": len(self.layers),
            "num_heads": self.stats.total.shape[1],
            "count": self.count,
            "layers": layers,
            "images": self.images,
            "skipped": self.skipped,
            # Exact float64 sums (JSON floats round-trip), so results can be reloaded and merged losslessly.
            "sums": {"total": self.stats.total.tolist(), "total_sq": self.stats.total_sq.tolist()},
        }

    def to_json(self, path: str | os.PathLike) -> None:
        """Write ``mad.json``: model, layout, images used and skipped, per layer and head the mean, std, min,
        max and count over images, a per-layer summary, and the float64 sums. Written atomically."""
        with atomic_file(path) as handle:
            handle.write(json.dumps(self.to_dict(), indent=1).encode())

    @staticmethod
    def from_json(path: str | os.PathLike) -> Profile:
        """Read a file written by :meth:`to_json`.

        Raises:
            ValueError: the file cannot be read, is not a vitmad profile, comes from a vitmad whose format
                differs, or lacks fields (truncated or edited); the message names the file.
        """
        try:
            doc = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{path}: cannot read a vitmad profile ({err})") from err
        found = doc.get("format") if isinstance(doc, dict) else None
        if isinstance(found, str) and found.startswith("vitmad-profile/") and found != FORMAT:
            raise ValueError(f"{path}: written by another vitmad version (format {found!r}, "
                             f"version {doc.get('vitmad_version')!r}); this version reads {FORMAT!r}")
        if found != FORMAT:
            raise ValueError(f"{path}: not a vitmad profile (expected format {FORMAT!r})")
        try:
            def as_tensor(key: str) -> torch.Tensor:
                return torch.tensor([layer[key] for layer in doc["layers"]], dtype=torch.float64)

            stats = RunningStats(
                torch.tensor(doc["sums"]["total"], dtype=torch.float64),
                torch.tensor(doc["sums"]["total_sq"], dtype=torch.float64),
                as_tensor("min"),
                as_tensor("max"),
                int(doc["count"]),
            )
            return Profile(doc["model"], [layer["name"] for layer in doc["layers"]], doc["layout"], stats,
                           doc["images"], doc["skipped"], doc["settings"], doc.get("processes", 1))
        except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as err:
            raise ValueError(f"{path}: malformed vitmad profile ({type(err).__name__}: {err})") from err

    def to_csv(self, path: str | os.PathLike) -> None:
        """Write ``mad.csv``: one row per layer and head (layer, name, head, mean, std, min, max, count)."""
        lines = ["layer,name,head,mad_mean,mad_std,mad_min,mad_max,count"]
        mad, std, low, high = (t.tolist() for t in (self.mad, self.std, self.min, self.max))
        for i, name in enumerate(self.layers):
            for h in range(len(mad[i])):
                lines.append(f"{i},{name},{h},{mad[i][h]!r},{std[i][h]!r},{low[i][h]!r},{high[i][h]!r},{self.count}")
        with atomic_file(path) as handle:
            handle.write(("\n".join(lines) + "\n").encode())

    def plot(self, path: str | os.PathLike, *, title: str | None = None) -> None:
        """Draw the ViT-paper figure (MAD per head against layer depth, uniform attention as a reference)."""
        from .plotting import plot_profile

        plot_profile(self, path, title=title)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``"auto"`` (or ``None``) picks CUDA when present, else CPU.

    Raises:
        ValueError: not a device name, or CUDA requested but not available.
    """
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"--device: expected auto, cpu, cuda or cuda:N, got {str(device)!r}") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device: cuda requested but no CUDA device is available; use --device cpu or auto")
    return device


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"--dtype: expected one of {', '.join(_DTYPES)}, got {dtype!r}")
    return _DTYPES[dtype]


def _record():
    """:func:`vitmad.record`, looked up at call time (``import vitmad`` stays light)."""
    import vitmad

    return vitmad.record


def _layout_dict(layout) -> dict:
    """``rec.layout`` as plain JSON: patch size, grid and number of prefix tokens."""
    get = layout.get if isinstance(layout, dict) else lambda key: getattr(layout, key)
    return {"patch": int(get("patch")), "grid": [int(g) for g in get("grid")],
            "num_prefix_tokens": int(get("num_prefix_tokens"))}


def _prepare(model, image_size, checkpoint_file=None):
    from .models import LoadedModel, load_model, wrap_module

    if isinstance(model, LoadedModel):
        loaded = model
    elif isinstance(model, (str, os.PathLike)):
        loaded = load_model(str(model), checkpoint=checkpoint_file, image_size=image_size)
    elif isinstance(model, torch.nn.Module):
        loaded = wrap_module(model)
    else:
        raise TypeError(f"vitmad.profile: model must be an nn.Module or a model spec string, got {type(model).__name__}")
    preprocessing = loaded.preprocessing
    if image_size is not None and preprocessing is not None:
        preprocessing = preprocessing.with_size(image_size)
    return loaded, preprocessing


def _batches(images, preprocessing, batch_size: int, max_images: int | None, pool: Executor | None = None):
    """Image names and a function loading batch ``i`` as ``(pixels, loaded names, skipped)``."""
    from .images import find_images, load_batch

    if isinstance(images, torch.Tensor):
        if images.dim() != 4:
            raise ValueError(f"vitmad.profile: images tensor must be [B, 3, H, W], got shape {list(images.shape)}")
        pixels = images[:max_images] if max_images else images
        names = [f"tensor[{i}]" for i in range(pixels.shape[0])]

        def load(i: int):
            rows = slice(i * batch_size, (i + 1) * batch_size)
            return pixels[rows], names[rows], []

        return names, load
    if preprocessing is None:
        raise ValueError("vitmad.profile: this model has no known preprocessing; pass preprocessed pixels as a "
                         "[B, 3, H, W] tensor, or image files together with image_size")
    files = find_images(images)
    if max_images:
        files = files[:max_images]
    names = [str(f) for f in files]

    def load(i: int):
        pixels, loaded, skipped = load_batch(files[i * batch_size:(i + 1) * batch_size], preprocessing, pool)
        return pixels, [str(p) for p in loaded], [(str(p), r) for p, r in skipped]

    return names, load


def profile(
    model,
    images="builtin",
    *,
    batch_size: int = 16,
    device: str | torch.device | None = "auto",
    dtype: str | torch.dtype | None = None,
    renormalize: bool = False,
    image_size: str | int | Sequence[int] | None = None,
    max_images: int | None = None,
    layers: Sequence[str] | None = None,
    checkpoint: str | os.PathLike | None = None,
    resume: bool = False,
    checkpoint_every: int = 8,
    model_checkpoint: str | os.PathLike | None = None,
    progress: bool = False,
    loader_threads: int = 4,
    distributed=None,
) -> Profile:
    """Profile the mean attention distance of every head of ``model`` over ``images``.

    Args:
        model: an ``nn.Module`` (HF transformers or timm ViT), or a spec ``hf:<id or folder>``,
            ``timm:<name>``, ``builtin:dinov2-s14``.
        images: ``"builtin"``, a folder (recursive), a file, a list of those, or preprocessed pixels
            ``[B, 3, H, W]``. Files need a model loaded from a spec (which knows its preprocessing).
        batch_size: images per forward pass.
        device: ``"auto"`` (CUDA when present), ``"cpu"``, ``"cuda"``, ``"cuda:1"``...
        dtype: ``"float32"`` (default), ``"bfloat16"`` or ``"float16"`` for the model and its inputs.
        renormalize: MAD over the attention mass on patches only (MAD_SPEC.md).
        image_size: ``S``, ``"HxW"`` or ``(H, W)`` instead of the model's own input size.
        max_images: profile only the first ``K`` images (in sorted order).
        layers: attention module names (wildcards as :func:`vitmad.record` takes them); all by default.
        checkpoint: file for the running sums; written atomically every ``checkpoint_every`` batches.
        resume: continue from ``checkpoint`` if it exists (same model, images and settings).
        model_checkpoint: local weights for a ``timm:`` spec.
        progress: show a tqdm bar with images/s (on rank 0, counting every rank's images).
        loader_threads: threads decoding and preprocessing image files (0: on the calling thread); batches
            are loaded one ahead of the model either way.
        distributed: a :class:`vitmad.distributed.DistributedRun`; by default the process group the caller
            initialised, if any. Each rank profiles its share of the batches and every rank returns the
            whole result; ``checkpoint`` must then be a file per rank.

    Returns:
        The :class:`Profile` (``.mad`` and ``.std`` are ``[L, H]``).

    Raises:
        ValueError, FileNotFoundError: bad model spec, images, size, device or dtype, or a ``checkpoint``
            folder that cannot be written (checked before the model loads); the message names the option.
            Any exception (``KeyboardInterrupt`` included) is re-raised after the checkpoint is saved.
    """
    from .distributed import GlobalProgress, current_run, merge_across_ranks
    from .images import parse_image_size

    record = _record()
    if batch_size <= 0:
        raise ValueError(f"--batch-size: expected a positive integer, got {batch_size}")
    if max_images is not None and max_images <= 0:
        raise ValueError(f"--max-images: expected a positive integer, got {max_images}")
    if checkpoint_every <= 0:
        raise ValueError(f"--checkpoint-every: expected a positive number of batches, got {checkpoint_every}")
    run = distributed if distributed is not None else current_run()
    rank, world = (run.rank, run.world_size) if run else (0, 1)
    size = parse_image_size(image_size)
    device = resolve_device(device)
    if run is not None:
        device = run.device(device)
    torch_dtype = _resolve_dtype(dtype)
    if checkpoint is not None:
        check_writable(Path(checkpoint).parent, "checkpoint")
    loaded, preprocessing = _prepare(model, size, model_checkpoint)
    decoders = ThreadPoolExecutor(loader_threads, "vitmad-decode") if loader_threads > 0 else None
    names, load = _batches(images, preprocessing, batch_size, max_images, decoders)
    settings = {
        "renormalize": bool(renormalize),
        "dtype": str(torch_dtype).removeprefix("torch."),
        "image_size": list(size) if size else None,
        "preprocessing": preprocessing.to_dict() if preprocessing else None,
        "batch_size": batch_size,
        "layers": list(layers) if layers else None,
    }
    run_id = fingerprint({"model": loaded.spec, "rank": rank, "world_size": world, **settings}, names)
    module = loaded.module.to(device=device, dtype=torch_dtype)
    # Rank r takes global batches r, r + W, ...: the same batches as a single process, each exactly once.
    my_batches = range(rank, math.ceil(len(names) / batch_size), world)

    state = load_checkpoint(checkpoint, run_id) if (resume and checkpoint) else None
    if state is not None:
        stats = RunningStats.from_state_dict(state["stats"]) if state["stats"] else None
        done, processed, skipped = state["batches_done"], state["images"], state["skipped"]
        meta = state["meta"]
    else:
        stats, done, processed, skipped, meta = None, 0, [], [], None

    def save() -> None:
        if checkpoint is not None:
            save_checkpoint(checkpoint, {
                "fingerprint": run_id, "batches_done": done, "images": processed, "skipped": skipped,
                "stats": stats.state_dict() if stats else None, "meta": meta,
            })

    from tqdm.auto import tqdm

    counter = GlobalProgress(run)
    bar = tqdm(total=len(names), unit="img", disable=not (progress and rank == 0), desc="vitmad profile",
               dynamic_ncols=True)
    bar.update(counter.add(len(processed) + len(skipped)))
    record_options = {"renormalize": renormalize, **({"layers": list(layers)} if layers else {})}
    # The next batch is decoded on other threads while the model runs on this one.
    prefetch = ThreadPoolExecutor(1, "vitmad-prefetch")
    pending = my_batches[done:]
    upcoming = prefetch.submit(load, pending[0]) if len(pending) else None
    try:
        for position in range(len(pending)):
            pixels, loaded_names, batch_skipped = upcoming.result()
            upcoming = prefetch.submit(load, pending[position + 1]) if position + 1 < len(pending) else None
            for path, reason in batch_skipped:
                warnings.warn(f"skipping unreadable image {path}: {reason}", stacklevel=2)
            new_stats, new_meta = stats, meta
            if pixels is not None:
                with torch.inference_mode(), record(module, **record_options) as rec:
                    loaded.forward(pixels.to(device=device, dtype=torch_dtype, non_blocking=True))
                new_stats = (stats or RunningStats.empty(*rec.mad.shape[::2])).add(rec.mad)
                new_meta = {"layers": list(rec.layers), "layout": _layout_dict(rec.layout)}
            # Everything of a batch is committed together, so an interrupt before this line loses only it.
            stats, meta, processed, skipped, done = (
                new_stats, new_meta, processed + loaded_names,
                skipped + [{"path": p, "reason": r} for p, r in batch_skipped], done + 1,
            )
            bar.update(counter.add(len(loaded_names) + len(batch_skipped)) - bar.n)
            if done % checkpoint_every == 0:
                save()
        save()
        if run is not None:
            order = {name: i for i, name in enumerate(names)}
            stats, meta, processed, skipped = merge_across_ranks(run, stats, meta, processed, skipped, order)
            bar.update(len(processed) + len(skipped) - bar.n)
    except BaseException:
        save()  # Ctrl-C or a failure: keep every batch finished so far for --resume
        raise
    finally:
        bar.close()
        prefetch.shutdown(wait=False, cancel_futures=True)
        if decoders is not None:
            decoders.shutdown(wait=False, cancel_futures=True)
    if stats is None:
        raise ValueError(f"--images: none of the {len(names)} images could be read")
    return Profile(loaded.spec, meta["layers"], meta["layout"], stats, processed, skipped, settings, world)


def mad_maps(
    model,
    image,
    *,
    layers: Sequence[int] | None = None,
    image_size: str | int | Sequence[int] | None = None,
    renormalize: bool = False,
    device: str | torch.device | None = "auto",
) -> tuple[torch.Tensor, torch.Tensor, list[str], dict]:
    """Per-patch MAD maps of one image, averaged over heads, for a few layers.

    Args:
        model: as for :func:`profile`.
        image: an image file, or preprocessed pixels ``[3, H, W]``.
        layers: layer indices; by default four spread from the first to the last layer.

    Returns:
        ``(maps, pixels, names, layout)``: ``maps`` ``[len(layers), gh, gw]`` float32 in pixels,
        ``pixels`` ``[3, H, W]`` the model input, the chosen layers' names and the layout.
    """
    from .images import load_image, parse_image_size

    record = _record()

    loaded, preprocessing = _prepare(model, parse_image_size(image_size))
    if isinstance(image, torch.Tensor):
        pixels = image
    else:
        picture, reason = load_image(image)
        if picture is None:
            raise ValueError(f"mad_maps: cannot read image {image}: {reason}")
        pixels = preprocessing(picture)
    device = resolve_device(device)
    module = loaded.module.to(device)
    with torch.inference_mode(), record(module, renormalize=renormalize, reduction="none") as rec:
        loaded.forward(pixels[None].to(device=device, dtype=next(module.parameters()).dtype))
    per_patch = rec.mad[:, 0].float().mean(1).cpu()  # [L, N - P], mean over heads
    num_layers = per_patch.shape[0]
    if layers is None:
        layers = sorted({round(i * (num_layers - 1) / 3) for i in range(4)})
    layout = _layout_dict(rec.layout)
    grid_h, grid_w = layout["grid"]
    maps = per_patch[list(layers)].reshape(len(layers), grid_h, grid_w)
    return maps, pixels, [rec.layers[i] for i in layers], layout
