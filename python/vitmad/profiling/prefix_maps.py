"""Where the tokens without a position look, over an image set (``vitmad profile --stats prefix_maps``).

:func:`vitmad.record` gives, per layer, the attention rows of the CLS and register tokens over the positioned
tokens (``rec.prefix_maps``, ``[B, H, Q, T]``). :class:`PrefixMapSums` adds them up over images in float64, per
layer and head, like :class:`~vitmad.profiling.stats.RunningStats` does for MAD: immutable (a batch makes a
new object, so an interrupt never leaves half an update), checkpointed, and summed across ``torchrun`` ranks.

A mean map is only meaningful where every image puts the layer's tokens on the same grid: a layer without
maps in some batch (no CLS or register, keys that are not its queries, prefix tokens that differ between
images) or whose grid changes is dropped, and the reason kept for ``mad.json``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

__all__ = ["PrefixMapSums"]


def _missing_reason(geometry) -> str:
    """Why :func:`vitmad.record` gave no prefix maps for a layer, as far as its geometry tells."""
    if geometry.num_prefix_tokens == 0:
        return "no token without a position (CLS, registers) in this layer"
    if geometry.grid is None:
        return "the images have token grids of their own"
    if "pooled" in geometry.attention:
        return f"no prefix maps: the layer's keys are not its queries ({geometry.attention})"
    if "window" in geometry.attention or "mask unit" in geometry.attention:  # (Hiera's mask units: QA 352)
        return f"no prefix maps: no token without a position (CLS, registers) in its windows ({geometry.attention})"
    return ("no prefix maps: the layer's keys are not its queries (windows, pooled keys), it has no CLS or register "
            "token, or those differ between images")


@dataclass(frozen=True)
class PrefixMapSums:
    """float64 sums over images of each layer's prefix maps, per head, and the sum of the input images.

    Attributes:
        total: by layer index, ``[H, Q, T]``: the sum over images of the attention of the layer's ``Q`` tokens
            without a position on its ``T`` positioned tokens (row-major over ``grids[i]``).
        count: by layer index, ``[T]``: images counted at each position (a masked token is not).
        grids: by layer index, ``(grid_h, grid_w)``.
        skipped: by layer index, why the layer has no mean map.
        pixels_total: ``[3, H, W]`` sum of the model inputs (the average input image); None before any batch or
            when the inputs are not all of one size.
        pixels_count: images in ``pixels_total``.
    """

    total: dict[int, torch.Tensor] = field(default_factory=dict)
    count: dict[int, torch.Tensor] = field(default_factory=dict)
    grids: dict[int, tuple[int, int]] = field(default_factory=dict)
    skipped: dict[int, str] = field(default_factory=dict)
    pixels_total: torch.Tensor | None = None
    pixels_count: int = 0

    @staticmethod
    def skipping(num_layers: int, reason: str) -> PrefixMapSums:
        """Sums with every layer dropped for one ``reason`` (a run whose images have no common grid)."""
        return PrefixMapSums(skipped=dict.fromkeys(range(num_layers), reason))

    def add(self, maps: Sequence[torch.Tensor | None], geometry: Sequence,
            pixels: torch.Tensor | None, differential: Sequence[int] = ()) -> PrefixMapSums:
        """The sums with one batch added.

        Args:
            maps: ``rec.prefix_maps`` of the batch: per layer ``[B, H, Q, T]`` or None.
            geometry: ``rec.geometry`` of the batch (the layers' grids).
            pixels: ``[B, 3, H, W]`` the batch's model input, for the average input image; None to leave it out.
            differential: indices of the layers whose attention is differential (``rec.calls[-1].components``),
                which have no maps for that reason.
        """
        total, count, grids, skipped = dict(self.total), dict(self.count), dict(self.grids), dict(self.skipped)

        def drop(layer: int, reason: str) -> None:
            skipped[layer] = reason
            for sums in (total, count, grids):
                sums.pop(layer, None)

        for layer, (batch_maps, layer_geometry) in enumerate(zip(maps, geometry)):
            if layer in skipped:
                continue
            grid = None if layer_geometry.grid is None else tuple(int(g) for g in layer_geometry.grid)
            if batch_maps is None and layer in differential:
                drop(layer, "differential attention (A1 - lambda * A2) is not a probability distribution")
            elif batch_maps is None:
                drop(layer, _missing_reason(layer_geometry))
            elif grid is None or math.prod(grid) != batch_maps.shape[-1]:
                drop(layer, "the layer's positioned tokens are not one grid")
            elif layer in grids and grids[layer] != grid:
                drop(layer, f"the layer's grid changes between images ({list(grids[layer])}, then {list(grid)})")
            elif layer in total and total[layer].shape != batch_maps.shape[1:]:
                drop(layer, "the layer's heads or tokens without a position change between images")
            else:
                values = batch_maps.detach().to("cpu", torch.float64)
                # A token the image lacks (a masked encoder drops it) is NaN in the fold, in every head and row:
                # not counted there. A NaN of one head (attention that overflowed) stays NaN in the mean, as in
                # mad.json (QA 295: read from head 0 alone, it was summed as 0, or made every head's count 0).
                present = ~values.isnan().flatten(1, 2).all(1)  # [B, T]
                # An image without any value is attention that overflowed in every head, no encoder's dropped
                # tokens (it keeps some): NaN in the mean, as its MAD (QA 297: left out, unsaid).
                present |= ~present.any(-1, keepdim=True)
                batch_total = torch.where(present[:, None, None, :], values, 0.0).sum(0)
                batch_count = present.sum(0).to(torch.float64)
                total[layer] = batch_total if layer not in total else total[layer] + batch_total
                count[layer] = batch_count if layer not in count else count[layer] + batch_count
                grids[layer] = grid
        pixels_total, pixels_count = self.pixels_total, self.pixels_count
        if pixels is not None and (pixels_total is None or pixels_total.shape == pixels.shape[1:]):
            batch_pixels = pixels.detach().to("cpu", torch.float64).sum(0)
            pixels_total = batch_pixels if pixels_total is None else pixels_total + batch_pixels
            pixels_count += pixels.shape[0]
        return PrefixMapSums(total, count, grids, skipped, pixels_total, pixels_count)

    @property
    def layers(self) -> list[int]:
        """Indices of the layers with a mean map, in order."""
        return sorted(self.total)

    def check_layers(self, layers: Sequence[int] | None = None) -> None:
        """Raise the ValueError that says why there is no mean map: of any layer (``layers`` None), or of one of
        ``layers`` (a native-resolution run has none: every image has its own grid)."""
        if not self.layers:
            reasons = sorted(set(self.skipped.values()))
            raise ValueError(f"no layer has mean prefix maps ({'; '.join(reasons) or 'no layer recorded'})")
        without = [layer for layer in layers or () if layer not in self.total]
        if without:
            raise ValueError(f"layers {without} have no mean prefix maps; layers with maps: {self.layers}")

    def mean(self, layer: int) -> torch.Tensor:
        """``[H, Q, grid_h, grid_w]`` float64: the layer's prefix maps, mean over images (NaN where no image had
        the token).

        Raises:
            ValueError: the layer has no mean map (:meth:`check_layers`; a bare KeyError before).
        """
        self.check_layers([layer])
        mean = self.total[layer] / self.count[layer]
        return mean.reshape(*mean.shape[:-1], *self.grids[layer])

    @property
    def mean_pixels(self) -> torch.Tensor | None:
        """``[3, H, W]`` float64: the average model input (normalised as the model takes it), or None."""
        return None if self.pixels_total is None else self.pixels_total / max(self.pixels_count, 1)

    def merged(self, others: Sequence[PrefixMapSums]) -> PrefixMapSums:
        """These sums and ``others`` (other processes' shares of the images) added; a layer dropped in any of
        them is dropped."""
        result = self
        for other in others:
            skipped = {**result.skipped, **other.skipped}
            total, count, grids = {}, {}, {}
            for layer in sorted(set(result.total) | set(other.total)):
                if layer in skipped:
                    continue
                parts = [part for part in (result, other) if layer in part.total]
                shapes = {(part.grids[layer], tuple(part.total[layer].shape)) for part in parts}
                if len(shapes) > 1:
                    skipped[layer] = "the layer's grid or tokens without a position differ between images"
                    continue
                total[layer] = sum(part.total[layer] for part in parts)
                count[layer] = sum(part.count[layer] for part in parts)
                grids[layer] = parts[0].grids[layer]
            pixel_parts = [p for p in (result, other) if p.pixels_total is not None]
            same_size = len({tuple(p.pixels_total.shape) for p in pixel_parts}) == 1
            result = PrefixMapSums(
                total, count, grids, skipped,
                sum(p.pixels_total for p in pixel_parts) if pixel_parts and same_size else None,
                sum(p.pixels_count for p in pixel_parts) if pixel_parts and same_size else 0,
            )
        return result

    def skipped_by_name(self, names: Sequence[str]) -> dict[str, str]:
        """``{layer name: reason}`` of the dropped layers, given the layers' names."""
        return {names[layer]: reason for layer, reason in sorted(self.skipped.items())}

    def state_dict(self) -> dict:
        # Lists of plain entries: a checkpoint is read back with torch.load(weights_only=True).
        return {
            "layers": [{"index": layer, "total": self.total[layer], "count": self.count[layer],
                        "grid": list(self.grids[layer])} for layer in self.layers],
            "skipped": [[layer, reason] for layer, reason in sorted(self.skipped.items())],
            "pixels_total": self.pixels_total,
            "pixels_count": self.pixels_count,
        }

    @staticmethod
    def from_state_dict(state: dict) -> PrefixMapSums:
        layers = state["layers"]
        return PrefixMapSums(
            {int(e["index"]): e["total"] for e in layers}, {int(e["index"]): e["count"] for e in layers},
            {int(e["index"]): tuple(int(g) for g in e["grid"]) for e in layers},
            {int(layer): str(reason) for layer, reason in state["skipped"]},
            state["pixels_total"], int(state["pixels_count"]),
        )

    def save(self, path: str | os.PathLike, names: Sequence[str]) -> None:
        """Write the mean maps as ``.npz`` (numpy): ``layer_<i>`` ``[H, Q, grid_h, grid_w]`` float32 per layer with
        maps, ``layer_indices`` and ``layer_names`` of those layers, ``counts`` (images per layer), and
        ``mean_input`` ``[3, H, W]``, the average model input, when known. Written atomically.

        Raises:
            ValueError: no layer has a mean map (:meth:`check_layers`).
        """
        import numpy as np

        from .files import atomic_file

        self.check_layers()  # an .npz of no layer was written without a word
        arrays = {f"layer_{layer}": self.mean(layer).to(torch.float32).numpy() for layer in self.layers}
        arrays["layer_indices"] = np.array(self.layers, dtype=np.int64)
        arrays["layer_names"] = np.array([names[layer] for layer in self.layers], dtype=str)
        arrays["counts"] = np.array([int(self.count[layer].max()) for layer in self.layers], dtype=np.int64)
        if self.mean_pixels is not None:
            arrays["mean_input"] = self.mean_pixels.to(torch.float32).numpy()
        with atomic_file(path) as handle:
            np.savez(handle, **arrays)
