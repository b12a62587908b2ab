"""The result of :func:`vitmad.profile`: :class:`Profile`, its files (``mad.json``, ``mad.csv``) and figure.

``mad.json`` keeps the exact float64 sums beside the summary, so results can be reloaded and merged
losslessly (``m2``, the sum of squared deviations from the mean that the std comes from, is derived from
``total`` and ``total_sq`` in files written before it was kept); reading checks the format tag and names the
file in every error.

Models whose head count or token grid changes with depth (Swin: 3, 6, 12, 24 heads on grids of stride 4 to
32 px) keep, per layer, its own heads and geometry: in memory the statistics are ``[L, H_max]`` with NaN for
the heads a layer does not have; the files list each layer's own heads only. Format 2 adds the per-layer
geometry, heads and the layers skipped; format 1 files (plain ViTs) are still read.

The top-level ``"unit"`` is MAD's: ``"px"`` (pixels of the model input), or a volume profile's ``"mm"`` or
``"voxel"``. Video models add, in the same format, the temporal MAD in frames beside the spatial one: per layer
a ``"temporal"`` entry (``"unit": "frames"``, and mean, std, min, max per head), ``"temporal_total"``,
``"temporal_total_sq"`` and ``"temporal_m2"`` among the sums, and ``tmad_*`` columns in ``mad.csv``; files
without them are image profiles.

Other statistics (``vitmad profile --stats``), in the same format: ``"statistics"``, by name, the unit and per
layer and head the mean, std, min and max over images (null where a layer has no value: self mass beside
pooled keys), ``"<name>_total"``, ``"<name>_total_sq"`` and ``"<name>_m2"`` among the sums, and
``<name>_mean``, ``_std``, ``_min``, ``_max`` columns in ``mad.csv``; ``"prefix_maps"`` lists the layers with
mean CLS / register maps (the maps themselves are in ``prefix_maps.npz``) and those without, with the reason.
Files without them hold MAD only.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import __version__
from ..ops.reference import uniform_attention_mad
from .files import atomic_file
from .prefix_maps import PrefixMapSums
from .stats import RunningStats

__all__ = ["Profile", "FORMAT", "layout_dict"]

FORMAT = "vitmad-profile/2"
_READABLE = ("vitmad-profile/1", FORMAT)
# The unit of each statistic beside MAD, as mad.json states it.
STAT_UNITS = {"entropy": "nats", "prefix_mass": "fraction of attention", "self_mass": "fraction of attention"}


def _nullable(values: list) -> list:
    """Rows of floats with NaN as None: strict JSON has no NaN."""
    return [[_null_if_nan(v) for v in row] for row in values]


def _null_if_nan(value: float) -> float | None:
    """``value``, or None for NaN: strict JSON has no NaN."""
    return None if value != value else value


def _numbers(rows: list) -> list:
    """Rows read from JSON with None (a value a layer lacks) as NaN."""
    return [[float("nan") if v is None else v for v in row] for row in rows]


def layout_dict(layout) -> dict | None:
    """A recording's layout (``rec.layout``, or its dict) as plain JSON: patch size, grid, prefix tokens; None
    for a model whose layers do not share one plain ViT layout (their geometry is kept per layer)."""
    if layout is None:
        return None
    get = layout.get if isinstance(layout, dict) else lambda key: getattr(layout, key)
    return {"patch": int(get("patch")), "grid": [int(g) for g in get("grid")],
            "num_prefix_tokens": int(get("num_prefix_tokens"))}


@dataclass(eq=False)  # == of two profiles compared their tensors, an error (QA 287): identity, as a module's
class Profile:
    """MAD per layer and head of one model over an image set.

    Attributes:
        model: the model spec or class name.
        layers: attention module names, in execution order (``L`` of them).
        layout: ``{"patch": int, "grid": [gh, gw], "num_prefix_tokens": int}`` when every layer attends over one
            plain ViT layout, else None.
        stats: float64 running statistics over the images, ``[L, H_max]`` (NaN for heads a layer lacks).
        images: files (or tensor rows) profiled, in order.
        skipped: ``{"path": ..., "reason": ...}`` for each unreadable image.
        settings: how it was run (renormalize, dtype, image size, preprocessing, batch size, layers).
        processes: how many processes shared the work (``torchrun``); the result does not depend on it.
        geometry: per layer, its token grid, pixel stride, attention kind and heads
            (:meth:`vitmad.recording.LayerGeometry.as_dict`); None in format-1 files.
        skipped_layers: attention layers left out of the recording, by name, with the reason.
        temporal: video models: float64 running statistics of the temporal MAD in frames, ``[L, H_max]``; None
            for image models.
        image_grids: native resolution (``image_size="native"``): per image name, ``{"grid": [gh, gw],
            "size": [H, W]}``, its token grid and the pixels it was resized to; the layers' ``geometry`` then has
            no grid. Volumes (``monai:`` specs): per volume its first layer's token ``grid`` ``[D, gh, gw]``, the
            input ``size`` in voxels, the file's ``shape`` and, in millimetres, the header's ``pixdim_mm`` and the
            input voxels' ``spacing`` (the unit of its MAD). None otherwise.
        statistics: by name, float64 running statistics of the other statistics profiled (``"entropy"``,
            ``"prefix_mass"``, ``"self_mass"``), ``[L, H_max]`` like ``stats``; empty for a MAD-only profile.
        prefix_maps: with ``stats=[..., "prefix_maps"]``: the sums of the CLS / register maps over the images
            (:class:`~vitmad.profiling.prefix_maps.PrefixMapSums`); None otherwise, and in a profile read back
            from ``mad.json`` (the maps are in ``prefix_maps.npz``). Its layer indices ``0 .. L - 1`` are
            ``layers``; ``L, L + 1, ...`` are ``class_layers``.
        class_layers: with the prefix maps, the class-attention layers (CaiT, VOLO) whose class token's maps follow
            the layers' own in ``prefix_maps``; they have no MAD (``skipped_layers`` says why).
        class_geometry: one geometry dict per ``class_layers``: the grid and stride of its keys.
    """

    model: str
    layers: list[str]
    layout: dict
    stats: RunningStats
    images: list[str] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    settings: dict = field(default_factory=dict)
    processes: int = 1
    geometry: list[dict] | None = None
    skipped_layers: dict[str, str] = field(default_factory=dict)
    temporal: RunningStats | None = None
    image_grids: dict[str, dict] | None = None
    statistics: dict[str, RunningStats] = field(default_factory=dict)
    prefix_maps: PrefixMapSums | None = None
    # mad.json's "prefix_maps" entry (layers, grids, counts) of a profile read back with from_json, which does not
    # hold the maps themselves (prefix_maps.npz beside it does): written out again as it was.
    prefix_map_summary: dict | None = None
    class_layers: list[str] = field(default_factory=list)
    class_geometry: list[dict] = field(default_factory=list)

    @property
    def map_layers(self) -> list[str]:
        """The names of ``prefix_maps``' layer indices: ``layers``, then ``class_layers``."""
        return [*self.layers, *self.class_layers]

    @property
    def map_geometry(self) -> list[dict] | None:
        """The geometry of ``prefix_maps``' layer indices (None in format-1 files, which have no maps)."""
        return None if self.geometry is None else [*self.geometry, *self.class_geometry]

    @property
    def stat_names(self) -> list[str]:
        """The statistics with running statistics per layer and head: ``"mad"``, then the others profiled."""
        return ["mad", *self.statistics]

    def running(self, name: str) -> RunningStats:
        """The running statistics of ``name`` (``"mad"`` included, and a video profile's ``"temporal_mad"``, in
        frames), ``[L, H_max]``.

        Raises:
            KeyError: ``name`` was not profiled; the message lists what was.
        """
        if name == "mad":
            return self.stats
        if name == "temporal_mad":  # a video profile's, in frames
            if self.temporal is None:
                raise KeyError("no 'temporal_mad': this profile is not a video profile (a video model's profile of "
                               "videos has it)")
            return self.temporal
        if name not in self.statistics:
            if name == "prefix_maps":
                raise KeyError("'prefix_maps' are maps, not a per-head statistic: read profile.prefix_maps "
                               "(mean(layer) gives [H, Q, grid_h, grid_w]) or prefix_maps.npz")
            if name not in STAT_UNITS and name.lower() in (*STAT_UNITS, "mad"):
                raise KeyError(f"no statistic '{name}': the names are lower case ({', '.join(self.stat_names)} "
                               "in this profile)")
            if name not in STAT_UNITS:
                raise KeyError(f"no statistic '{name}': vitmad profiles mad, {', '.join(STAT_UNITS)} (this profile: "
                               f"{', '.join(self.stat_names)})")
            raise KeyError(f"the statistic '{name}' was not profiled (profiled: {', '.join(self.stat_names)}); "
                           f"profile with stats=[..., '{name}'] (vitmad profile --stats {name})")
        return self.statistics[name]

    def stat(self, name: str) -> torch.Tensor:
        """``[L, H]`` float64: the mean over images of statistic ``name`` (``"mad"`` is :attr:`mad`); NaN for the
        heads a layer lacks and where the layer has no value. ``running(name)`` gives std, min and max.

        Raises:
            KeyError: ``name`` was not profiled.
        """
        return self.running(name).mean

    def has_values(self, name: str) -> bool:
        """Whether some layer has a value of statistic ``name`` (none where it is not defined in any layer, such as
        every statistic but MAD of a model whose attention is differential): what a figure of it needs.

        Raises:
            KeyError: ``name`` was not profiled.
        """
        return bool(self.stat(name).isfinite().any())

    @property
    def heads(self) -> list[int]:
        """Each layer's head count."""
        if self.geometry is not None:
            return [int(g["heads"]) for g in self.geometry]
        return [int(self.stats.total.shape[1])] * len(self.layers)

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
    def temporal_mad(self) -> torch.Tensor | None:
        """Video models: ``[L, H]`` float64, temporal MAD in frames, mean over videos; None for image models."""
        return None if self.temporal is None else self.temporal.mean

    @property
    def count(self) -> int:
        """Number of images profiled."""
        return self.stats.count

    @property
    def layers_named(self) -> bool:
        """Whether it profiled the layers named in ``layers=``: counted in the order they ran (``index``, the
        figures' axis), not at their depth in the model."""
        return bool(self.settings.get("layers"))

    @property
    def input_kind(self) -> str:
        """What it profiled: ``"images"``, ``"videos"`` (a video model's, or clips through a packed tower's video
        processor) or ``"volumes"``; the figures' titles and the command's summary say it."""
        preprocessing = self.settings.get("preprocessing") or {}
        if preprocessing.get("volumes"):
            return "volumes"
        return "videos" if self.temporal is not None or preprocessing.get("videos") else "images"

    @property
    def distance_unit(self) -> str:
        """The unit of MAD: ``"px"`` (pixels of the model input), or a volume profile's ``"mm"`` or ``"voxel"``."""
        preprocessing = self.settings.get("preprocessing") or {}
        return preprocessing.get("unit", "px") if preprocessing.get("volumes") else "px"

    @property
    def uniform_mad(self) -> float:
        """MAD of uniform attention over the first layer's grid: the value of a fully global head there."""
        return self.uniform_mads[0]

    @property
    def uniform_mads(self) -> list[float]:
        """Per layer, the MAD of uniform attention over that layer's grid (stages of a hierarchy differ); at
        native resolution, its mean over the images' own grids."""
        if self.geometry is None:
            grid_h, grid_w = self.layout["grid"]
            return [uniform_attention_mad(grid_h, grid_w, self.layout["patch"])] * len(self.layers)
        return [self._uniform_over_volumes(g) if g.get("depth") is not None else
                self._uniform_over_images(tuple(g["stride"])) if g["grid"] is None else
                uniform_attention_mad(*g["grid"], tuple(g["stride"])) for g in self.geometry]

    def _uniform_over_volumes(self, geometry: dict) -> float:
        """A volume layer's uniform-attention MAD over its ``depth x grid`` cells: in voxels, or the mean over the
        volumes of each one's in millimetres of its own voxels (``image_grids``' ``spacing``)."""
        from .volumes import uniform_volume_mad

        grid = (geometry["depth"], *geometry["grid"])
        stride = (geometry["depth_stride"], *geometry["stride"])
        spacings = [tuple(entry["spacing"]) for entry in (self.image_grids or {}).values() if "spacing" in entry]
        if not spacings:
            return uniform_volume_mad(grid, stride)
        per_spacing = {s: uniform_volume_mad(grid, [a * b for a, b in zip(stride, s)]) for s in set(spacings)}
        return sum(per_spacing[s] for s in spacings) / len(spacings)

    def _uniform_over_images(self, stride: tuple[float, float]) -> float:
        """The mean over images of uniform attention's MAD on each image's grid (NaN without image grids)."""
        grids = [tuple(entry["grid"]) for entry in (self.image_grids or {}).values()]
        if not grids:
            return float("nan")
        per_grid = {grid: uniform_attention_mad(*grid, stride) for grid in set(grids)}
        return sum(per_grid[grid] for grid in grids) / len(grids)

    def to_dict(self) -> dict:
        """The ``mad.json`` document (see :meth:`to_json`)."""
        # NaN (a model whose attention overflowed, say) as null: strict JSON has no NaN.
        mad, std, low, high = (_nullable(t.tolist()) for t in (self.mad, self.std, self.min, self.max))
        total, total_sq = _nullable(self.stats.total.tolist()), _nullable(self.stats.total_sq.tolist())
        uniform = self.uniform_mads
        temporal = None if self.temporal is None else {key: _nullable(value.tolist()) for key, value in (
            ("mean", self.temporal.mean), ("std", self.temporal.std), ("min", self.temporal.low),
            ("max", self.temporal.high))}
        layers = []
        for i, (name, heads) in enumerate(zip(self.layers, self.heads)):
            means = mad[i][:heads]
            finite = [m for m in means if m is not None]
            layers.append({
                "index": i,
                "name": name,
                "heads": heads,
                "geometry": None if self.geometry is None else self.geometry[i],
                "uniform_attention_mad": _null_if_nan(uniform[i]),
                "mean": means,
                "std": std[i][:heads],
                "min": low[i][:heads],
                "max": high[i][:heads],
                "count": self.count,
                "summary": {
                    "mean_over_heads": sum(finite) / heads if len(finite) == heads else None,
                    "min_head": min(finite, default=None),
                    "max_head": max(finite, default=None),
                },
            })
            if temporal is not None:
                layers[-1]["temporal"] = {"unit": "frames", **{key: rows[i][:heads] for key, rows in temporal.items()}}
        heads = self.heads
        sums = {"total": [row[:h] for row, h in zip(total, heads)],
                "total_sq": [row[:h] for row, h in zip(total_sq, heads)],
                "m2": [row[:h] for row, h in zip(_nullable(self.stats.m2.tolist()), heads)]}
        if self.temporal is not None:
            for part in ("total", "total_sq", "m2"):
                sums[f"temporal_{part}"] = _nullable([row[:h] for row, h in zip(getattr(self.temporal, part).tolist(),
                                                                                 heads)])
        return {
            "format": FORMAT,
            "vitmad_version": __version__,
            "model": self.model,
            "layout": self.layout,
            # (NaN where no layer has a grid: positions= given by hand, QA 428; null in strict JSON.)
            "uniform_attention_mad": _null_if_nan(self.uniform_mad),
            "unit": self.distance_unit,  # of MAD (the layers' mean, std, min, max and the uniform figures)
            "settings": self.settings,
            "processes": self.processes,
            "num_layers": len(self.layers),
            "num_heads": heads[0] if len(set(heads)) == 1 else heads,
            "count": self.count,
            "layers": layers,
            "skipped_layers": [{"name": n, "reason": r} for n, r in self.skipped_layers.items()],
            "images": self.images,
            "skipped": self.skipped,
            **({} if self.image_grids is None else {"image_grids": self.image_grids}),
            **self._statistics_dict(sums),
            # Exact float64 sums (JSON floats round-trip), so results can be reloaded and merged losslessly.
            "sums": sums,
        }

    def _statistics_dict(self, sums: dict) -> dict:
        """The ``"statistics"`` and ``"prefix_maps"`` entries of ``mad.json`` (none for a MAD-only profile); the
        statistics' sums go to ``sums``."""
        found = {}
        heads = self.heads

        def per_head(values: torch.Tensor) -> list:
            return _nullable([row[:h] for row, h in zip(values.tolist(), heads)])

        if self.statistics:
            found["statistics"] = {
                name: {"unit": STAT_UNITS.get(name), "mean": per_head(stats.mean), "std": per_head(stats.std),
                       "min": per_head(stats.low), "max": per_head(stats.high)}
                for name, stats in self.statistics.items()
            }
            for name, stats in self.statistics.items():
                sums[f"{name}_total"] = per_head(stats.total)
                sums[f"{name}_total_sq"] = per_head(stats.total_sq)
                sums[f"{name}_m2"] = per_head(stats.m2)
        if self.prefix_maps is None and self.prefix_map_summary is not None:
            found["prefix_maps"] = self.prefix_map_summary
        if self.prefix_maps is not None:
            maps = self.prefix_maps
            found["prefix_maps"] = {
                "layers": [{"index": i, "name": self.map_layers[i], "grid": list(maps.grids[i]),
                            "tokens": int(maps.total[i].shape[1]), "count": int(maps.count[i].max())}
                           for i in maps.layers],
                "skipped_layers": [{"name": name, "reason": reason}
                                   for name, reason in maps.skipped_by_name(self.map_layers).items()],
            }
            if self.class_layers:  # indices len(layers), ... of "layers" above
                found["prefix_maps"]["class_attention_layers"] = [
                    {"name": name, "geometry": geometry} for name, geometry in zip(self.class_layers,
                                                                                  self.class_geometry)]
        return found

    def to_json(self, path: str | os.PathLike, outputs: Sequence[str] | None = None) -> None:
        """Write ``mad.json``: model, layout, images used and skipped, per layer and head the mean, std, min,
        max and count over images, a per-layer summary, and the float64 sums. Written atomically. ``outputs``:
        the files ``vitmad profile`` writes beside it (``"outputs"``), so that a later run into the folder knows
        which files are an earlier run's and which a user's."""
        doc = self.to_dict()
        if outputs is not None:
            doc["outputs"] = list(outputs)
        with atomic_file(path) as handle:
            handle.write(json.dumps(doc, indent=1).encode())

    @staticmethod
    def from_json(path: str | os.PathLike) -> Profile:
        """Read a file written by :meth:`to_json`.

        Raises:
            ValueError: the file cannot be read, is not a vitmad profile, comes from a vitmad whose format
                differs, or lacks fields (truncated or edited); the message names the file.
        """
        file = Path(path).expanduser()  # "~/runs/..." as to_json takes it
        if file.is_dir():  # was IsADirectoryError's words (QA 290)
            held = " (it holds no mad.json)" if not (file / "mad.json").is_file() else ""
            raise ValueError(f"{path}: cannot read a vitmad profile: a folder{held}; pass a profile's mad.json")
        try:
            doc = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:  # nested past Python's limit
            raise ValueError(f"{path}: cannot read a vitmad profile ({type(err).__name__}: {err})") from err
        found = doc.get("format") if isinstance(doc, dict) else None
        if isinstance(found, str) and found.startswith("vitmad-profile/") and found not in _READABLE:
            readable = " and ".join(map(repr, _READABLE))
            raise ValueError(f"{path}: written by another vitmad version (format {found!r}, "
                             f"version {doc.get('vitmad_version')!r}); this version reads {readable}")
        if found not in _READABLE:
            raise ValueError(f"{path}: not a vitmad profile (expected format {FORMAT!r})")
        try:
            layers = doc["layers"]
            geometry = [layer["geometry"] for layer in layers] if found == FORMAT else None
            if geometry is not None and any(g is None for g in geometry):
                geometry = None
            heads = [int(layer["heads"]) if found == FORMAT else len(layer["mean"]) for layer in layers]
            width = max(heads)
            for entry, count in zip(geometry or (), heads):
                # Read back by Profile.heads and the figures: an edited one escaped compare as a traceback (QA 330).
                if not isinstance(entry, dict) or entry.get("heads") != count or isinstance(entry["heads"], bool):
                    raise ValueError("each layer's geometry must be an object whose heads is the layer's head count")

            def padded(rows, fill=float("nan")) -> torch.Tensor:
                if len(rows) != len(layers) or any(len(r) != h for r, h in zip(rows, heads)):
                    raise ValueError(f"expected one value per head of each of the {len(layers)} layers")
                return torch.tensor([list(r) + [fill] * (width - len(r)) for r in rows], dtype=torch.float64)

            count = doc["count"]
            if not isinstance(count, int) or isinstance(count, bool) or count < 1:
                # every profile written has profiled at least one image, and counted them in a JSON integer
                raise ValueError(f"count must be a positive number of images, got {count!r}")
            def deviations(key: str) -> torch.Tensor | None:
                # The sums of squared deviations, absent in files written before vitmad kept them: then derived
                # from the sums (RunningStats).
                return padded(_numbers(doc["sums"][key])) if key in doc["sums"] else None

            stats = RunningStats(
                padded(_numbers(doc["sums"]["total"])),
                padded(_numbers(doc["sums"]["total_sq"])),
                padded(_numbers([layer["min"] for layer in layers])),
                padded(_numbers([layer["max"] for layer in layers])),
                count,
                deviations("m2"),
            )
            def check_summary(what: str, means: list, running: RunningStats) -> None:
                # The summary must be what the sums give: compare draws from the sums, and a file whose "mean"
                # was edited (or lists fewer heads) was drawn from them without a word (QA 259; the statistics'
                # and the temporal MAD's too, QA 287), as were a min above the mean or a max below it.
                written = padded(_numbers(means))
                wrong = ~torch.isclose(written, running.mean, rtol=1e-9, atol=1e-12, equal_nan=True)
                if bool(wrong.any()):
                    layer = int(wrong.any(1).nonzero()[0])
                    raise ValueError(f"layer {layer}'s {what}mean {means[layer]} is not its sums' total / count "
                                     f"{running.mean[layer, :heads[layer]].tolist()} (an edited file?)")
                slack = 1e-9 * running.mean.abs() + 1e-12
                outside = (running.low > running.mean + slack) | (running.high < running.mean - slack)
                if bool(outside.any()):
                    layer = int(outside.any(1).nonzero()[0])
                    raise ValueError(f"layer {layer}'s {what}min {running.low[layer, :heads[layer]].tolist()} and max "
                                     f"{running.high[layer, :heads[layer]].tolist()} do not hold its mean "
                                     f"{running.mean[layer, :heads[layer]].tolist()} (an edited file?)")

            check_summary("", [layer["mean"] for layer in layers], stats)
            skipped_layers = {e["name"]: e["reason"] for e in doc.get("skipped_layers", [])}
            temporal = None
            if "temporal_total" in doc["sums"]:  # a video profile
                temporal = RunningStats(
                    padded(_numbers(doc["sums"]["temporal_total"])),
                    padded(_numbers(doc["sums"]["temporal_total_sq"])),
                    padded(_numbers([layer["temporal"]["min"] for layer in layers])),
                    padded(_numbers([layer["temporal"]["max"] for layer in layers])),
                    count,
                    deviations("temporal_m2"),
                )
                check_summary("temporal ", [layer["temporal"]["mean"] for layer in layers], temporal)
            for field_name, kind in (("model", str), ("statistics", dict), ("settings", dict)):
                if field_name in doc and not isinstance(doc[field_name], kind):
                    raise TypeError(f"{field_name} must be a {kind.__name__}, got {type(doc[field_name]).__name__}")
            statistics = {}
            for name, entry in doc.get("statistics", {}).items():  # absent in MAD-only profiles
                statistics[name] = RunningStats(
                    padded(_numbers(doc["sums"][f"{name}_total"])),
                    padded(_numbers(doc["sums"][f"{name}_total_sq"])),
                    padded(_numbers(entry["min"])),
                    padded(_numbers(entry["max"])),
                    count,
                    deviations(f"{name}_m2"),
                )
                check_summary(f"{name} ", entry["mean"], statistics[name])
            summary = doc.get("prefix_maps")
            if summary is not None and not isinstance(summary, dict):
                raise TypeError(f"prefix_maps must be a dict, got {type(summary).__name__}")
            classes = (summary or {}).get("class_attention_layers", [])
            if not isinstance(classes, list):
                raise TypeError(f"prefix_maps.class_attention_layers must be a list, got {type(classes).__name__}")
            profile = Profile(doc["model"], [layer["name"] for layer in layers], doc["layout"], stats,
                              doc["images"], doc["skipped"], doc["settings"], doc.get("processes", 1),
                              geometry, skipped_layers, temporal=temporal, image_grids=doc.get("image_grids"),
                              statistics=statistics, prefix_map_summary=summary,
                              class_layers=[str(entry["name"]) for entry in classes],
                              class_geometry=[dict(entry["geometry"]) for entry in classes])
            if "unit" in doc and doc["unit"] != profile.distance_unit:
                # The unit is read from the settings (a volume profile's preprocessing); a file saying another was
                # read, and compared, as pixels (QA 287).
                raise ValueError(f"unit {doc['unit']!r} is not the unit its settings give, "
                                 f"{profile.distance_unit!r} (an edited file?)")
            return profile
        except (KeyError, IndexError, TypeError, ValueError, RuntimeError, AttributeError) as err:
            raise ValueError(f"{path}: malformed vitmad profile ({type(err).__name__}: {err})") from err

    def to_csv(self, path: str | os.PathLike) -> None:
        """Write ``mad.csv``: one row per layer and head (layer, name, head, mean, std, min, max, count); video
        models add the temporal MAD in frames (``tmad_mean, tmad_std, tmad_min, tmad_max``), and every other
        statistic profiled its four columns (``entropy_mean, entropy_std, entropy_min, entropy_max``, ...; ``nan``
        where a layer has no value), so ``pandas.read_csv`` gives one tidy row per head."""
        header = ["layer", "name", "head", "mad_mean", "mad_std", "mad_min", "mad_max", "count"]
        mad, std, low, high = (t.tolist() for t in (self.mad, self.std, self.min, self.max))
        extra = []
        if self.temporal is not None:
            header += ["tmad_mean", "tmad_std", "tmad_min", "tmad_max"]
            extra.append(self.temporal)
        for name, stats in self.statistics.items():
            header += [f"{name}_mean", f"{name}_std", f"{name}_min", f"{name}_max"]
            extra.append(stats)
        columns = [t.tolist() for stats in extra for t in (stats.mean, stats.std, stats.low, stats.high)]
        # The csv module quotes a layer name holding a comma (a module named "vit,a" shifted every later column,
        # QA 287); floats are written as repr writes them, exactly.
        text = io.StringIO()
        writer = csv.writer(text, lineterminator="\n")
        writer.writerow(header)
        for i, (name, heads) in enumerate(zip(self.layers, self.heads)):
            for h in range(heads):
                writer.writerow([i, name, h, mad[i][h], std[i][h], low[i][h], high[i][h], self.count,
                                 *(values[i][h] for values in columns)])
        with atomic_file(path) as handle:
            handle.write(text.getvalue().encode())

    def plot(self, path: str | os.PathLike, *, title: str | None = None) -> None:
        """Draw the ViT-paper figure (MAD per head against layer depth, uniform attention as a reference); video
        models: spatial and temporal MAD side by side (:func:`~.plotting.plot_space_time`)."""
        from .plotting import plot_profile, plot_space_time

        (plot_profile if self.temporal is None else plot_space_time)(self, path, title=title)

    def plot_stat(self, name: str, path: str | os.PathLike, *, title: str | None = None) -> None:
        """Draw statistic ``name`` per head against layer depth, like the MAD figure
        (:func:`~.plotting.plot_statistic`)."""
        from .plotting import plot_statistic

        plot_statistic(self, name, path, title=title)

    def save_prefix_maps(self, path: str | os.PathLike) -> None:
        """Write the mean CLS / register maps as ``.npz`` (:meth:`~.prefix_maps.PrefixMapSums.save`).

        Raises:
            ValueError: the profile has no prefix maps.
        """
        self.check_prefix_maps()
        self.prefix_maps.save(path, self.map_layers)

    def check_prefix_maps(self) -> None:
        """Raise the ValueError that says why this profile holds no prefix maps, if it holds none."""
        if self.prefix_maps is not None:
            return
        if self.prefix_map_summary is not None:
            raise ValueError("this profile was read from mad.json, which lists the layers with prefix maps but not "
                             "the maps: they are in prefix_maps.npz beside it (numpy.load; layer_<i> is "
                             "[H, Q, grid_h, grid_w])")
        raise ValueError("this profile has no prefix maps; profile with stats=[..., 'prefix_maps']")

    def plot_prefix_maps(self, path: str | os.PathLike, **options) -> None:
        """Draw the mean CLS / register maps of a few layers beside the average input image
        (:func:`~.plotting.plot_prefix_maps`).

        Raises:
            ValueError: the profile has no prefix maps, or no layer has a mean map.
        """
        from .plotting import plot_prefix_maps

        plot_prefix_maps(self, path, **options)
