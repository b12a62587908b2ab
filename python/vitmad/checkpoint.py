"""Atomic checkpoints of a running profile, so an interrupted ``vitmad profile`` resumes exactly, and atomic
writes of its result files.

A checkpoint holds the float64 running sums and the list of processed files. It is written to a temporary
file in the same folder, flushed to disk and renamed over the previous one, so a kill at any moment leaves
either the old or the new checkpoint, never a torn one.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import torch

__all__ = ["save_checkpoint", "load_checkpoint", "fingerprint", "check_writable", "atomic_file"]

FORMAT = "vitmad-checkpoint/1"


def fingerprint(settings: dict, files: list[str]) -> str:
    """A digest of everything that must match for a resumed run to end like an uninterrupted one."""
    text = json.dumps({"settings": settings, "files": files}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def check_writable(folder: str | os.PathLike, option: str = "--out") -> None:
    """Create ``folder`` if needed and write, flush and delete a small file in it, before any work is done.

    A read-only or full disk, or a path through a file, would otherwise only show at the first checkpoint or
    at the end of a long run.

    Raises:
        ValueError: the folder cannot be created or written; the message names ``option`` and the reason.
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".vitmad-write-test.", dir=folder)
        try:
            os.write(fd, b"0" * 4096)  # one block: a full disk refuses it
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise ValueError(f"{option}: cannot write to {folder}: {reason}") from err


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """Write ``path`` through a temporary file in the same folder, flushed to disk and renamed over ``path`` on
    success: a reader, or a kill at any moment, sees the old or the new content, never a torn file.

    Example::

        with atomic_file("out/mad.json") as handle:
            handle.write(data)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    # Temporary files of a writer killed mid-write (SIGKILL skips the cleanup above); one writer per path.
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        stale.unlink(missing_ok=True)


def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    """Write ``state`` (tensors, lists, numbers) to ``path`` atomically."""
    with atomic_file(path) as handle:
        torch.save({"format": FORMAT, **state}, handle)


def load_checkpoint(path: str | os.PathLike, expected_fingerprint: str) -> dict | None:
    """Read a checkpoint written by :func:`save_checkpoint` for the same run.

    Returns:
        The state, or ``None`` when there is no checkpoint at ``path``.

    Raises:
        ValueError: the checkpoint belongs to a run with other settings or another image list.
    """
    path = Path(path)
    if not path.is_file():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("format") != FORMAT:
        raise ValueError(f"--resume: {path} is not a vitmad checkpoint (format {state.get('format')!r})")
    if state["fingerprint"] != expected_fingerprint:
        raise ValueError(
            f"--resume: {path} was written by a run with other settings or another image list; "
            "rerun with the same options, or without --resume to start over"
        )
    return state
