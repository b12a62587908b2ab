"""Checkpoints of a running profile, so an interrupted ``vitmad profile`` resumes exactly.

A checkpoint holds the float64 running sums and the list of processed files. It is written to a temporary
file in the same folder, flushed to disk and renamed over the previous one, so a kill at any moment leaves
either the old or the new checkpoint, never a torn one.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from .files import atomic_file
from .options import OptionError

__all__ = ["save_checkpoint", "load_checkpoint", "fingerprint"]

FORMAT = "vitmad-checkpoint/1"


def fingerprint(settings: dict, files: list[str]) -> str:
    """A digest of everything that must match for a resumed run to end like an uninterrupted one."""
    text = json.dumps({"settings": settings, "files": files}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    """Write ``state`` (tensors, lists, numbers) to ``path`` atomically."""
    with atomic_file(path) as handle:
        torch.save({"format": FORMAT, **state}, handle)


def load_checkpoint(path: str | os.PathLike, expected_fingerprint: str) -> dict | None:
    """Read a checkpoint written by :func:`save_checkpoint` for the same run.

    Returns:
        The state, or ``None`` when there is no checkpoint at ``path``.

    Raises:
        OptionError: the checkpoint belongs to a run with other settings or another image list.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("format") != FORMAT:
        raise OptionError("resume", f"{path} is not a vitmad checkpoint (format {state.get('format')!r})")
    if state["fingerprint"] != expected_fingerprint:
        raise OptionError(
            "resume",
            f"{path} was written by a run with other settings or another image list; rerun with the same "
            "options, or without resume to start over",
        )
    return state
