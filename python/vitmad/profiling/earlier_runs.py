"""What earlier ``vitmad profile`` runs wrote: the files a run may write in its output folder, those an earlier run
there says it wrote (its mad.json), and an image search without them, for the command and :func:`vitmad.profile`
alike (an earlier run's figures under the images profiled were averaged in as photographs, QA 421).
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

from .options import PROFILE_STATS, OptionError

__all__ = ["earlier_outputs", "output_names", "outputs_of", "without_earlier_outputs"]


def outputs_of(stats) -> set[str]:
    """The files a ``vitmad profile`` run asking for ``stats`` may write in ``--out`` besides its checkpoints."""
    names = {"mad.json", "mad.csv", "mad.png", "mad_map.png", *(f"{name}.png" for name in stats)}
    if "prefix_maps" in stats:
        names.update({"prefix_maps.npz", "prefix_map_image.png"})
    return names


def output_names() -> set[str]:
    """Every file ``vitmad profile`` may write in ``--out`` besides its checkpoints, whatever the run's
    statistics: what a folder search for images leaves out where an earlier run's mad.json says it wrote it."""
    return outputs_of(PROFILE_STATS)


def _profile_document(folder: Path) -> dict | None:
    """The mad.json of a ``vitmad profile`` run in ``folder`` (not a user's file of that name), else None."""
    try:
        doc = json.loads((folder / "mad.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) and str(doc.get("format", "")).startswith("vitmad-profile/") else None


def earlier_outputs(folder: Path) -> set[str]:
    """The files the run whose mad.json ``folder`` holds wrote: its ``"outputs"``, else (files of earlier versions)
    those of the statistics it says it profiled (``settings.stats``, MAD alone without it); empty where it holds
    none. A file there at another output's name is not that run's (a user's own entropy.png beside a MAD-only run's
    results was removed as its, QA 268; a user's mad.png beside a --no-figures run's, QA 270)."""
    doc = _profile_document(folder)
    if doc is None:
        return set()
    outputs = doc.get("outputs")  # what it wrote, named before it wrote them (files of 2026-12-06 on)
    if isinstance(outputs, list) and all(isinstance(name, str) for name in outputs):
        return set(outputs) & output_names()
    settings = doc.get("settings")
    stats = settings.get("stats") if isinstance(settings, dict) else None
    if not isinstance(stats, list) or not all(isinstance(name, str) for name in stats):
        stats = ["mad"]
    return outputs_of(stats) & output_names()


def resolved(path: Path) -> Path:
    """``path.resolve()``, or its absolute form where links loop (``a.png`` -> ``b.png`` -> ``a.png`` named on the
    command line: a traceback, QA 268; find_images sets such a file aside with its reason)."""
    try:
        return path.resolve()
    except (RuntimeError, OSError):
        return Path(os.path.abspath(path))


def without_earlier_outputs(files: list[Path], sources: Sequence[str | os.PathLike], parameter: str, *,
                            stacklevel: int) -> list[Path]:
    """``files`` (found in ``sources``) without the outputs of earlier runs that a folder search found (the figures
    of ``--out run_a`` when profiling the folder that holds run_a), with a warning naming them; files named among
    ``sources`` are kept, as asked.

    Raises:
        OptionError: naming ``parameter``, where nothing else was found.
    """
    named = {resolved(Path(s).expanduser()) for s in sources if s != "builtin"}
    names = output_names()
    profile_folders: dict[Path, set[str]] = {}  # each folder's mad.json read once

    def written_there(file: Path) -> bool:
        if file.parent not in profile_folders:
            profile_folders[file.parent] = earlier_outputs(file.parent)
        return file.name in profile_folders[file.parent]

    earlier = [f for f in files if f.name in names and f not in named and written_there(f)]
    if not earlier:
        return files
    left_out = set(earlier)
    kept = [f for f in files if f not in left_out]
    shown = ", ".join(str(f) for f in earlier[:4]) + (f" and {len(earlier) - 4} more" if len(earlier) > 4 else "")
    if not kept:
        raise OptionError(parameter.lstrip("-"), f"found only the outputs of earlier vitmad profile runs ({shown})")
    outputs = "output" if len(earlier) == 1 else "outputs"
    warnings.warn(f"left out {len(earlier)} {outputs} of earlier vitmad profile runs found under {parameter}: {shown}",
                  stacklevel=stacklevel + 1)
    return kept
