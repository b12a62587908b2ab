"""Writing profile outputs safely: atomic replacement, permissions of a normally created file, a write test of
an output folder before any work is done, and one run at a time writing to a path.
"""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from .options import OptionError

__all__ = ["atomic_file", "check_writable", "held_by_this_run"]


def check_writable(folder: str | os.PathLike, parameter: str = "out") -> None:
    """Create ``folder`` if needed and write, flush and delete a small file in it, before any work is done.

    A read-only or full disk, or a path through a file, would otherwise only show at the first checkpoint or
    at the end of a long run.

    Raises:
        OptionError: the folder cannot be created or written; the message names ``parameter`` and the reason.
    """
    folder = Path(folder)
    # The nearest existing path on the way: a file there makes mkdir say "File exists" or "Not a directory".
    existing = next((p for p in (folder, *folder.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        where = "" if existing == folder else f" ({existing} is one)"
        raise OptionError(parameter, f"cannot write to {folder}: a file, not a folder{where}")
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
        if err.errno == errno.ENOENT and existing is not None:  # /proc: a folder that takes no new entries
            reason = (f"the folder exists but takes no new files ({reason})" if existing == folder
                      else f"{existing} takes no new folders ({reason})")
        raise OptionError(parameter, f"cannot write to {folder}: {reason}") from err


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """Write ``path`` through a temporary file in the same folder, flushed to disk and renamed over ``path`` on
    success: a reader, or a kill at any moment, sees the old or the new content, never a torn file.

    Example::

        with atomic_file("out/mad.json") as handle:
            handle.write(data)
    """
    path = Path(path).expanduser()
    if path.is_dir():  # else the rename at the end fails, after all the writing, naming the temporary file
        raise IsADirectoryError(errno.EISDIR, "a folder, where a file was to be written (give a file path in it)",
                                str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp creates the file private (0600); the result gets what open() would have given it, so
        # colleagues can read results on a shared machine exactly as the user's umask allows.
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as handle:
            try:
                yield handle
                handle.flush()
                os.fsync(handle.fileno())
            except OSError as err:
                if err.filename is not None or err.errno is None:
                    raise
                # A full disk said "[Errno 28] No space left on device" and not where (QA 322): the path named.
                raise OSError(err.errno, err.strerror, str(path)) from err
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    # Temporary files of a writer killed mid-write (SIGKILL skips the cleanup above); one writer per path.
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        stale.unlink(missing_ok=True)


@contextmanager
def held_by_this_run(lock: Path, what: str, parameter: str) -> Iterator[None]:
    """Hold ``lock`` (a hidden file beside what a run writes) while the block runs: another process holding it,
    a second run writing to the same ``what``, is refused. Two runs into one --out replaced each other's
    checkpoints and temporary files (one died naming a temporary file; their results could mix; QA 276).

    An advisory lock (``flock``) that goes with its process, whatever kills it; the file is removed at the end.
    Where the system or file system has no ``flock`` (Windows, some network file systems), nothing is held.

    Raises:
        OptionError: naming ``parameter``, another process holds ``lock``.
    """
    try:
        import fcntl
    except ImportError:  # no flock here: one writer per path, as before
        yield
        return
    for _ in range(8):
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            held = True
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            by = (" (in this process)" if holder == str(os.getpid()) else
                  f" (process {holder})" if holder.isdigit() else "")
            raise OptionError(parameter, f"another vitmad profile run{by} is writing to {what}; wait for it to end, "
                                         "or pass another") from None
        except OSError:  # a file system that takes no flock
            held = False
            break
        # The file locked must still be the one at the path: a run ending removes its file, and one opened just
        # before that removal and locked just after it is a deleted file, beside which a third run would lock a
        # new one (QA 286): then open the path again.
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(lock))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    else:  # the path changed under us eight times: another run is starting and ending there
        raise OptionError(parameter, f"another vitmad profile run is writing to {what}; wait for it to end, or pass "
                                     "another")
    try:
        if held:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        lock.unlink(missing_ok=True)
        os.close(fd)


def _umask() -> int:
    """The process umask: read from /proc where it can be (setting it to read it races with other threads
    creating files), else set and restored at once."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
