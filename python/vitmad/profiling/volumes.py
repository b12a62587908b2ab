"""3-D medical volumes for ``vitmad profile``: NIfTI files (``.nii``, ``.nii.gz``, read with nibabel) fed to a
volume model (a ``monai:`` spec, :mod:`vitmad.profiling.monai_models`), with MAD in millimetres.

Each volume is read as nibabel reads it, in its file's voxel axis order (``img.shape`` ``(i, j, k)``, as MONAI's
``LoadImage`` without an orientation transform; nothing is reoriented: reorient the files first if the model was
trained on another orientation), the header's scaling applied (``get_fdata``), and becomes the model's
``[C, D, H, W]`` input with ``D, H, W = i, j, k``:

1. channels: a 3-D volume is one channel; a 4-D one (``i, j, k, c``) has ``c`` channels, which must be the model's
   ``in_channels``; trailing axes of one voxel are dropped. A volume with a side of one voxel (a single slice, a 2-D
   image stored as NIfTI), a non-finite voxel, or a file nibabel cannot read is skipped with the reason.
2. intensity, per volume, over all its voxels: ``"minmax"`` (default: ``(x - min) / (max - min)``, 0 to 1),
   ``"zscore"`` (``(x - mean) / std``, population std), ``"window:LOW,HIGH"`` (clipped to ``[LOW, HIGH]``, then
   ``(x - LOW) / (HIGH - LOW)``, MONAI's ``ScaleIntensityRange`` with ``clip=True`` onto 0 to 1: a CT window in HU) or
   ``"none"`` (the values as stored). A constant volume has no min-max or z-score scale and is skipped.
3. size: resized to the model's ``img_size`` with trilinear interpolation (``torch.nn.functional.interpolate``,
   ``align_corners=False``: the volume's extent is kept, each output voxel at the centre of its share of it, no
   antialiasing, as MONAI's ``Resize`` without ``anti_aliasing``); a volume already at that size is unchanged.

The voxel size of the model's input, per axis ``a``: ``pixdim[a] * shape[a] / img_size[a]`` (the header's
``pixdim`` in its ``xyzt_units``, converted to millimetres; a header without a unit is taken to be in millimetres,
as NIfTI readers do, and says so in ``mad.json``). Volumes of one run may differ in it (each is scaled by its own
extent): :func:`spacing_groups` cuts a batch into runs of one spacing, each recorded with that spacing
(``vitmad.record(spacing=...)``), so that every volume's MAD is in millimetres of its own voxels; nothing is
averaged. ``unit="voxel"`` gives MAD in voxels of the model's input instead (no spacing read or used).
"""

from __future__ import annotations

import math
import os
from collections.abc import Collection, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path

import torch

from .images import distinct_inputs, exclusion, folder_files, load_each
from .options import OptionError, import_optional, missing_path

__all__ = ["VOLUME_EXTENSIONS", "INTENSITIES", "UNITS", "VolumePreprocessing", "VolumeBatch", "is_volume_file",
           "find_volumes", "load_volume", "load_volume_batch", "spacing_groups", "uniform_volume_mad"]

VOLUME_EXTENSIONS = (".nii", ".nii.gz")
INTENSITIES = ("minmax", "zscore", "none", "window:LOW,HIGH")
UNITS = ("mm", "voxel")

# Millimetres per unit of a NIfTI header's spatial unit (nibabel's names of xyzt_units); "unknown" is taken to be mm.
_MILLIMETRES = {"mm": 1.0, "unknown": 1.0, "micron": 1e-3, "meter": 1e3}


def is_volume_file(path: str | os.PathLike) -> bool:
    """Whether a file name is a NIfTI volume's (``.nii``, ``.nii.gz``, any case)."""
    return Path(path).name.lower().endswith(VOLUME_EXTENSIONS)


def find_volumes(sources: str | os.PathLike | Sequence[str | os.PathLike],
                 exclude: Collection[str | os.PathLike] = ()) -> list[Path]:
    """Every NIfTI file under ``sources`` (files or folders, searched recursively as for images), absolute, each
    folder's files sorted, sources in the order given, no duplicates. A file named on its own is kept whatever its
    name (one nibabel cannot read is skipped with the reason).

    Raises:
        MissingPathError: a source does not exist.
        OptionError: (``images``) a folder without a volume, or no source.
    """
    sources = [sources] if isinstance(sources, (str, os.PathLike)) else list(sources)
    excluded = exclusion(exclude)
    found: list[Path] = []
    for source in sources:
        if not str(source).strip() or str(source) == "builtin":
            raise OptionError("images", f"expected NIfTI volumes (.nii, .nii.gz) or folders of them, got "
                                        f"{str(source)!r} (the built-in photographs are 2-D images)")
        path = Path(source).expanduser()
        if path.is_dir():
            files = sorted(p for p in folder_files(path) if is_volume_file(p) and not excluded(p))
            if not files:
                raise OptionError("images", f"no volumes ({', '.join(VOLUME_EXTENSIONS)}) found in folder {path}")
            found.extend(files)
        elif path.exists() or path.is_symlink():  # a dangling link, a named pipe: skipped, with the reason
            found.append(path)
        else:
            raise missing_path(source)
    unique = distinct_inputs(found)
    if not unique:
        raise OptionError("images", "no volumes given")
    return unique


def parse_intensity(intensity: str | None) -> tuple:
    """``intensity`` as ``("minmax",)``, ``("zscore",)``, ``("none",)`` or ``("window", low, high)``.

    Raises:
        OptionError: (``intensity``) anything else.
    """
    text = "minmax" if intensity is None else intensity
    if not isinstance(text, str):
        raise OptionError("intensity", f"expected one of {', '.join(INTENSITIES)}, got {intensity!r}")
    if text in ("minmax", "zscore", "none"):
        return (text,)
    kind, _, bounds = text.partition(":")
    if kind == "window":
        try:
            low, high = (float(v) for v in bounds.split(","))
        except ValueError:
            low = high = math.nan
        if math.isfinite(low) and math.isfinite(high) and low < high:
            return ("window", low, high)
    raise OptionError("intensity", f"expected one of {', '.join(INTENSITIES)} (LOW < HIGH, finite numbers), got "
                                   f"{intensity!r}")


def check_unit(unit: str | None) -> str:
    """``unit`` (None: ``"mm"``).

    Raises:
        OptionError: (``volume_unit``) another value.
    """
    unit = "mm" if unit is None else unit
    if unit not in UNITS:
        raise OptionError("volume_unit", f"expected {' or '.join(UNITS)}, got {unit!r}")
    return unit


@dataclass(frozen=True)
class VolumePreprocessing:
    """How a volume becomes the model's input (the module's docstring).

    Attributes:
        size: ``(D, H, W)`` voxels, the model's ``img_size``.
        channels: the model's ``in_channels``.
        intensity: ``("minmax",)``, ``("zscore",)``, ``("none",)`` or ``("window", low, high)``.
        unit: ``"mm"`` (MAD in millimetres, from each volume's voxel spacing) or ``"voxel"`` (voxels of the input).
    """

    size: tuple[int, int, int]
    channels: int
    intensity: tuple = ("minmax",)
    unit: str = "mm"

    def to_dict(self) -> dict:
        kind = self.intensity[0]
        intensity = kind if kind != "window" else f"window:{self.intensity[1]!r},{self.intensity[2]!r}"
        return {"volumes": True, "size": list(self.size), "channels": self.channels, "intensity": intensity,
                "resize": "trilinear, align_corners=False", "axes": "file voxel order (i, j, k) -> (D, H, W)",
                "unit": self.unit}

    def scaled(self, values: torch.Tensor) -> torch.Tensor | str:
        """``values`` (float32) scaled as ``intensity`` says, or the reason it cannot be."""
        kind = self.intensity[0]
        if kind == "none":
            return values
        if kind == "window":
            low, high = self.intensity[1:]
            return (values.clamp(low, high) - low) / (high - low)
        wide = values.double()
        if kind == "minmax":
            low, high = wide.min(), wide.max()
            if not high > low:
                return f"constant intensity ({float(low):g} everywhere): min-max scaling is undefined"
            return ((wide - low) / (high - low)).float()
        std = wide.std(correction=0)
        if not std > 0:
            return f"constant intensity ({float(wide.mean()):g} everywhere): z-score scaling is undefined"
        return ((wide - wide.mean()) / std).float()


@dataclass
class VolumeBatch:
    """A batch of volumes: ``pixels`` ``[B, C, D, H, W]``, and per volume its input's voxel size in millimetres
    (``spacings``; None for ``unit="voxel"``) and what ``mad.json`` lists of it (``info``)."""

    pixels: torch.Tensor
    spacings: list[tuple[float, float, float] | None]
    info: list[dict]


def load_volume(path: str | os.PathLike, preprocessing: VolumePreprocessing):
    """One volume: ``((pixels [C, D, H, W], spacing or None, info), None)``, or ``(None, reason)``."""
    nibabel = import_optional("nibabel", "volumes", "reading NIfTI volumes")
    import numpy as np

    try:
        image = nibabel.load(str(path))
        if not isinstance(image, (nibabel.Nifti1Image, nibabel.Nifti2Image)):
            return None, f"not a NIfTI volume ({type(image).__name__})"
        data = image.get_fdata(dtype=np.float32)
    except Exception as err:  # noqa: BLE001  (nibabel, gzip, zlib and OS errors alike: the file is unreadable)
        return None, f"{type(err).__name__}: {err}"
    shape = tuple(int(s) for s in data.shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    data = data.reshape(shape)
    if len(shape) < 3 or min(shape[:3]) < 2:
        return None, (f"a {len(shape)}-D image of shape {'x'.join(map(str, shape))}, not a volume: the model takes "
                      f"3-D volumes of at least 2 voxels a side")
    channels = 1 if len(shape) == 3 else shape[3]
    if len(shape) > 4 or channels != preprocessing.channels:
        return None, (f"shape {'x'.join(map(str, shape))}: the model takes {preprocessing.channels} channel(s), a 3-D "
                      f"volume (one channel) or a 4-D one with the channels last")
    values = torch.from_numpy(np.ascontiguousarray(data))
    values = values[None] if channels == 1 else values.permute(3, 0, 1, 2)
    if not bool(torch.isfinite(values).all()):
        return None, "non-finite voxel values (NaN or inf)"
    values = preprocessing.scaled(values)
    if isinstance(values, str):
        return None, values
    info = {"shape": list(shape[:3])}
    spacing = None
    if preprocessing.unit == "mm":
        unit = image.header.get_xyzt_units()[0]
        zooms = _raw_voxel_sizes(nibabel, path, image)
        if not all(math.isfinite(z) and z > 0 for z in zooms):
            return None, (f"its header's pixdim gives voxel sizes {zooms}, not all positive: no millimetres to "
                          "measure in (volume_unit='voxel' measures in voxels)")
        millimetres = [z * _MILLIMETRES.get(unit, 1.0) for z in zooms]
        spacing = tuple(m * n / s for m, n, s in zip(millimetres, shape, preprocessing.size))
        if not all(1e-9 <= m <= 1e9 for m in spacing):
            # vitmad.record takes spacings within 1e-12..1e12 (float32 squares): one such header stopped the whole
            # run after the other volumes, naming no file (QA helper-189).
            return None, (f"its header's voxel sizes {zooms} ({unit or 'no unit'}) make input voxels of "
                          f"{[float(f'{m:.3g}') for m in spacing]} mm, outside 1e-9..1e9 mm: a header whose unit is "
                          "wrong? (volume_unit='voxel' measures in voxels)")
        info.update(pixdim_mm=millimetres, header_unit=unit, spacing=list(spacing))
    if tuple(shape[:3]) != preprocessing.size:
        values = torch.nn.functional.interpolate(values[None], size=preprocessing.size, mode="trilinear",
                                                 align_corners=False)[0]
    return (values.contiguous(), spacing, info), None


def _raw_voxel_sizes(nibabel, path: Path, image) -> list[float]:
    """The header's pixdim[1:4] as the file holds it. nibabel's load "fixes" a zero to 1 and a negative to its
    absolute value (with a log line), which made millimetres out of a voxel size no header gave (QA helper-189):
    the header is read again without that check."""
    with nibabel.openers.ImageOpener(str(path)) as file:
        raw = type(image.header).from_fileobj(file, check=False)
    return [float(z) for z in raw["pixdim"][1:4]]


def load_volume_batch(paths: Sequence[Path], preprocessing: VolumePreprocessing, pool: Executor | None = None
                      ) -> tuple[VolumeBatch | None, list[Path], list[tuple[Path, str]]]:
    """Read and preprocess a batch of volumes, setting unreadable ones aside (as :func:`~.images.load_batch`)."""
    items, loaded, skipped = load_each(paths, lambda path: load_volume(path, preprocessing), pool)
    if not items:
        return None, loaded, skipped
    pixels, spacings, info = zip(*items)
    return VolumeBatch(torch.stack(pixels), list(spacings), list(info)), loaded, skipped


def spacing_groups(spacings: Sequence[tuple[float, ...] | None]) -> dict[tuple[float, ...] | None, list[int]]:
    """The batch positions of each distinct spacing, in order of first appearance: one recorded forward each."""
    groups: dict[tuple[float, ...] | None, list[int]] = {}
    for i, spacing in enumerate(spacings):
        groups.setdefault(spacing, []).append(i)
    return groups


def uniform_volume_mad(grid: Sequence[int], stride: Sequence[float]) -> float:
    """MAD of uniform attention over a ``(depth, grid_h, grid_w)`` grid of cells ``stride`` apart per axis: the mean
    distance between two cells, in float64, summed over the offsets weighted by how many cell pairs have each."""
    offsets = [torch.arange(1 - n, n, dtype=torch.float64) for n in grid]
    pairs = torch.ones((), dtype=torch.float64)
    distance = torch.zeros((), dtype=torch.float64)
    for axis, (delta, n, step) in enumerate(zip(offsets, grid, stride)):
        shape = [1] * len(grid)
        shape[axis] = -1
        pairs = pairs * (n - delta.abs()).reshape(shape)
        distance = distance + (delta * step).square().reshape(shape)
    return float((pairs * distance.sqrt()).sum() / math.prod(grid) ** 2)
