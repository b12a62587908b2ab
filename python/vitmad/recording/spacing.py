"""``vitmad.record(model, spacing=...)``: distances in a physical unit instead of input pixels.

A scan's voxels are rarely cubes (a CT series: 0.7 mm within a slice, 5 mm between slices) and a microscope's
pixels have a size: a MAD in voxels then mixes axes of different lengths, and is in no unit a reader can compare
across scans. ``spacing`` gives the size of one input pixel (or voxel) along each axis; every layer's token
positions are scaled by it, axis by axis, before the distances are measured, so that MAD is in the spacing's unit
(millimetres, micrometres). Only the distances change: the attention, and so entropy and the masses, do not
depend on where tokens are; ``LayerGeometry`` (grids, strides) stays in input pixels; a video's time axis is not
scaled (``rec.temporal_mad`` stays in frames).

Scaling happens on each call's :class:`~.placement.Placement`, after its family placed it, so that every family
(and ``positions=`` given by hand, which are then in pixels of the input) gets it alike. The layouts vitmad keeps
(:func:`~.placement.read_only` positions, shared by the layers and calls of a grid) are scaled once per spacing and
the scaled copy kept with them, so their device copies stay shared; other positions (built per call) are scaled per
call.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Sequence

import torch

from .placement import NotPlaceable, Placement, is_read_only, read_only

__all__ = ["check_spacing", "Spacing"]

_AXES = {2: "(row, column)", 3: "(slice, row, column)"}


def check_spacing(spacing) -> tuple[float, ...] | None:
    """``spacing`` as ``record`` takes it: None; one positive number (every axis); or 2 (row, column) or 3
    (slice, row, column) positive numbers. Returns a tuple of floats, or None.

    Raises:
        TypeError: not a number or a sequence of numbers.
        ValueError: the wrong count, or a value that is not finite and positive.
    """
    if spacing is None:
        return None
    expected = ("one positive number (the size of an input pixel on every axis) or 2 (row, column) or 3 (slice, "
                "row, column) positive numbers, in the unit MAD is to be in")
    if isinstance(spacing, torch.Tensor) and spacing.device.type == "meta":  # no values to read
        raise ValueError(f"vitmad.record: spacing must be {expected}; got a tensor on the meta device, which holds "
                         "no values")
    # A tensor or NumPy array (a header's pixdim) as its numbers; NumPy's scalars are numbers.Real already.
    values = spacing.tolist() if isinstance(spacing, torch.Tensor) or type(spacing).__name__ == "ndarray" else spacing
    if not isinstance(values, Sequence) or isinstance(values, (str, bytes)):
        values = [values]
        single = True
    else:
        values = list(values)
        single = False
    if not all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in values):
        raise TypeError(f"vitmad.record: spacing must be {expected}; got {spacing!r}")
    if not single and len(values) not in (2, 3):
        raise ValueError(f"vitmad.record: spacing must be {expected}; got {len(values)} values {spacing!r}")
    if not all(math.isfinite(v) and v > 0 for v in values):
        raise ValueError(f"vitmad.record: spacing must be {expected}; got {spacing!r}")
    # The ops square distances in float32: a pixel of 1e-30 units underflows them to 0 and one of 1e20 overflows
    # them to inf (NaN MAD). Between these bounds every distance of an image or volume of up to 1e5 pixels a side
    # keeps float32's precision.
    if not all(_SMALLEST <= v <= _LARGEST for v in values):
        raise ValueError(f"vitmad.record: spacing must be between {_SMALLEST:g} and {_LARGEST:g} units per pixel "
                         f"(distances are squared in float32); got {spacing!r}: choose a unit in which a pixel is "
                         "within that range (micrometres rather than kilometres)")
    return tuple(float(v) for v in values)


_SMALLEST, _LARGEST = 1e-12, 1e12


class Spacing:
    """Scales the positions of each call's placement by the spacing (one value, or one per axis)."""

    def __init__(self, axes: tuple[float, ...]):
        self.axes = axes

    def apply(self, placement: Placement) -> Placement:
        positions = self._scaled(placement.positions)
        keys = None if placement.key_positions is None else self._scaled(placement.key_positions)
        return dataclasses.replace(placement, positions=positions, key_positions=keys)

    def _scaled(self, positions: torch.Tensor) -> torch.Tensor:
        axes = positions.shape[-1]
        if len(self.axes) != 1 and len(self.axes) != axes:
            given = _AXES.get(len(self.axes), f"{len(self.axes)} axes")
            lying = _AXES.get(axes, f"{axes} axes")
            what = "a volume's" if axes == 3 else "an image's"
            time = " (a video's time axis is never scaled: its frames are not space)" if axes == 2 else ""
            raise NotPlaceable(f"spacing={self.axes} gives {len(self.axes)} values {given}, but this layer's "
                               f"tokens lie on {what} {axes} axes {lying}{time}: pass {axes} values, or one for all")
        if not is_read_only(positions):
            return _times(positions, self.axes)
        # Kept with the layout itself, by spacing: it never changes, and goes when the layout goes.
        kept = getattr(positions, _SCALED, None)
        if kept is None:
            kept = {}
            setattr(positions, _SCALED, kept)
        if self.axes not in kept:
            (kept[self.axes],) = read_only(_times(positions, self.axes), positions=1)
        return kept[self.axes]


# The attribute of a read-only layout's positions that holds its scaled copies, by spacing.
_SCALED = "_vitmad_spaced"


def _times(positions: torch.Tensor, axes: tuple[float, ...]) -> torch.Tensor:
    """``positions`` times the spacing, in float32 at least: positions given in half precision are exact small
    integers and halves, but 0.7 in bfloat16 is 0.6992 and the products would round again (0.4% off)."""
    dtype = torch.promote_types(positions.dtype, torch.float32)
    return positions.to(dtype) * torch.tensor(axes, dtype=dtype, device=positions.device)
