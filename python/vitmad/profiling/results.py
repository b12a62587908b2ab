"""The result of :func:`vitmad.profile`: :class:`Profile`, its files (``mad.json``, ``mad.csv``) and figure.

``mad.json`` keeps the exact float64 sums beside the summary, so results can be reloaded and merged
losslessly; reading checks the format tag and names the file in every error.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import __version__
from ..ops.reference import uniform_attention_mad
from .files import atomic_file
from .stats import RunningStats

__all__ = ["Profile", "FORMAT", "layout_dict"]

FORMAT = "vitmad-profile/1"


def layout_dict(layout) -> dict:
    """A recording's layout (``rec.layout``, or its dict) as plain JSON: patch size, grid, prefix tokens."""
    get = layout.get if isinstance(layout, dict) else lambda key: getattr(layout, key)
    return {"patch": int(get("patch")), "grid": [int(g) for g in get("grid")],
            "num_prefix_tokens": int(get("num_prefix_tokens"))}


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
