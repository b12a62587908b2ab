"""The options of :func:`vitmad.profile` turned into checked values, and the errors that name a bad one.

Library code names the Python parameter (``batch_size: expected a positive integer, got 0``); the ``vitmad``
command turns that name into its flag (``--batch-size: ...``), so each message is written once and both
audiences read their own spelling.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import torch

from ..ops.arguments import is_bool, is_int
from ..recording.recorder import RECORD_STATS, split_stat_names

__all__ = [
    "OptionError",
    "MissingPathError",
    "missing_path",
    "check_positive",
    "resolve_device",
    "resolve_dtype",
    "resolve_stats",
    "import_optional",
    "first_line",
    "error_said",
    "checkpoint_unread",
    "read_checkpoint",
    "read_state_dict",
    "DTYPES",
    "PROFILE_STATS",
]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# What ``profile(stats=...)`` / ``--stats`` takes, in the order results list them (vitmad.record's names).
PROFILE_STATS = RECORD_STATS


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (library errors can run to pages); its type where it has none."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def error_said(err: BaseException) -> str:
    """``Type: first line`` of an exception, for messages that quote another library's error (a bare ``assert``,
    ``torch.load`` of an empty file: no message)."""
    return f"{type(err).__name__}: {first_line(err) if str(err).strip() else 'no message'}"


def read_checkpoint(path: str | os.PathLike, what: str = "checkpoint"):
    """``torch.load(path)`` on the CPU, weights only.

    Raises:
        OptionError: (``model_checkpoint``) the file cannot be read (:func:`checkpoint_unread`).
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001  (pickle, zip and torch errors alike: the file is not a checkpoint)
        raise checkpoint_unread(path, err, what) from err


def read_state_dict(path: str | os.PathLike, keys: Sequence[str]) -> dict:
    """The state dict in the weights file ``path``: the file's content, or what it holds under the first of ``keys``
    that holds a dict (``"state_dict"``, ``"model"``, ...: training checkpoints keep it there). A ``.safetensors``
    file is read with safetensors.

    Raises:
        OptionError: (``model_checkpoint``) the file cannot be read, or holds no tensors by name there.
    """
    if Path(path).suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            loaded = load_file(str(path))
        except Exception as err:  # noqa: BLE001  (safetensors' own error type, OSError, ...)
            raise OptionError("model_checkpoint", f"{path} cannot be read as a safetensors file "
                                                  f"({error_said(err)})") from err
    else:
        loaded = read_checkpoint(path)
    if isinstance(loaded, dict):
        loaded = next((loaded[key] for key in keys if isinstance(loaded.get(key), dict)), loaded)
    if not isinstance(loaded, dict) or not loaded or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise OptionError("model_checkpoint", f"{path} holds no state dict (tensors by name), neither as a whole nor "
                                              f"under {', '.join(map(repr, keys))}")
    return loaded


def checkpoint_unread(path: str | os.PathLike, err: BaseException, what: str = "checkpoint") -> OptionError:
    """The error (``model_checkpoint``) of a weights file ``torch.load`` could not read, raising ``err``: a torch
    ``what`` (checkpoint, state dict)."""
    return OptionError("model_checkpoint", f"{path} cannot be read as a torch {what} "
                                           f"({_checkpoint_unread_said(path, err)})")


def _checkpoint_unread_said(path: str | os.PathLike, err: BaseException) -> str:
    """Why ``torch.load`` could not read ``path``: its error, unless the file is in neither of torch's formats (a
    zip archive, or a pickle: legacy ``torch.save``), where ``weights_only``'s complaint about pickle globals would
    send the user after a pickle problem the file does not have."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(8)
    except OSError:
        return error_said(err)
    # A zip archive starts with "PK" (a cut one too: torch's reason then says what is wrong), a pickle of protocol 2
    # and up with 0x80. torch reads a safetensors file itself, through that package: its own words where it is
    # missing (QA 296: the file was called neither format).
    if "safetensors" in str(err):
        return error_said(err)
    if head and not head.startswith((b"PK", b"\x80")):
        return f"neither torch.save's zip archive nor a pickle: it starts with {head!r}"
    return error_said(err)


def state_dict_mismatch_said(err: BaseException) -> str:
    """``load_state_dict``'s error in a message: torch's first line names only the class, the second the first keys
    that differ (a long list, cut at 400 characters)."""
    said = " ".join(line.strip() for line in str(err).splitlines()[:2] if line.strip()) or type(err).__name__
    return f"{said[:400]}{'...' if len(said) > 400 else ''}"


class Parameter(str):
    """A parameter's name inside an :class:`OptionError`'s message, which the CLI spells as its flag."""


class OptionError(ValueError):
    """A bad value of one parameter; ``str(err)`` starts with ``"<parameter>: "``.

    Attributes:
        parameter: the Python parameter's name (``batch_size``); the CLI maps it to its flag.
        parts: the message after ``"<parameter>: "`` in pieces, the other parameters it names as
            :class:`Parameter` (a refused resume names what changed: ``--batch-size`` to the command's user).
    """

    def __init__(self, parameter: str, message: str | Sequence[str]):
        self.parameter = parameter
        self.parts = (message,) if isinstance(message, str) else tuple(message)
        super().__init__(f"{parameter}: {''.join(self.parts)}")

    def __reduce__(self):  # its arguments, for a process pool to send it back (QA 299: the pool broke instead)
        return type(self), (self.parameter, self.parts)


class MissingPathError(OptionError, FileNotFoundError):
    """A file or folder given in a parameter does not exist."""


def missing_path(source: str | os.PathLike) -> MissingPathError:
    """The error for an input that is no file or folder, as given (``Path`` would fold a URL's ``//``), saying
    why where it looks like something else: a URL (nothing is downloaded) or a glob pattern (not expanded)."""
    text = os.fspath(source)
    if "://" in text:
        why = " (a URL: vitmad reads local files and downloads nothing; download it and pass the file)"
    elif any(c in text for c in "*?["):
        why = (" (a glob pattern: not expanded, as the shell does for the command; pass the folder, or the files "
               "glob.glob finds)")
    else:
        why = ""
    return MissingPathError("images", f"no such file or folder: {text}{why}")


def check_positive(parameter: str, value: int | None, what: str = "a positive integer", *,
                   optional: bool = True) -> None:
    """Raise :class:`OptionError` unless ``value`` is a positive integer (or None, where ``optional``)."""
    if value is None and optional:
        return
    if not is_int(value) or value <= 0:
        raise OptionError(parameter, f"expected {what}, got {value!r}")


def check_flag(parameter: str, value) -> None:
    """Raise :class:`OptionError` unless ``value`` is True or False (a string such as "no" would be true)."""
    if not is_bool(value):
        raise OptionError(parameter, f"expected True or False, got {value!r}")


def check_layers(layers) -> None:
    """Raise :class:`OptionError` unless ``layers`` is None or a non-empty list of module names or patterns."""
    if layers is None:
        return
    if isinstance(layers, str) or not all(isinstance(name, str) for name in layers) or len(layers) == 0:
        raise OptionError("layers", f"expected a non-empty list of module names or patterns (strings), "
                                    f"got {layers!r}")


def check_loader_threads(value) -> None:
    """Raise :class:`OptionError` unless ``value`` is a number of decoding threads >= 0."""
    if not is_int(value) or value < 0:
        raise OptionError("loader_threads", f"expected a number of threads >= 0 (0: decode on the calling thread), "
                                            f"got {value!r}")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``"auto"`` (or ``None``) picks CUDA when present, else CPU.

    Raises:
        OptionError: not a device name, or CUDA requested but not available.
    """
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except RuntimeError as err:
        raise OptionError("device", f"expected auto, cpu, cuda or cuda:N, got {str(device)!r}") from err
    if device.type not in ("cpu", "cuda") or (device.type == "cpu" and device.index not in (None, 0)):
        # meta tensors hold no values; vitmad's kernels are CPU and CUDA; torch has one CPU device (cpu:1 is cpu)
        raise OptionError("device", f"expected auto, cpu, cuda or cuda:N, got {str(device)!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise OptionError("device", "cuda requested but no CUDA device is available; use cpu or auto")
    return device


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    """``None`` -> float32; a name of :data:`DTYPES` or a ``torch.dtype`` among them.

    Raises:
        OptionError: another dtype.
    """
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if dtype not in DTYPES:
        raise OptionError("dtype", f"expected one of {', '.join(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def resolve_stats(stats) -> tuple[str, ...]:
    """The statistics to profile, in :data:`PROFILE_STATS` order, MAD always among them.

    Args:
        stats: None (MAD only), a comma list (``"entropy,prefix_mass"``, as ``--stats`` takes it) or a sequence
            of names; ``"all"`` stands for every statistic.

    Raises:
        OptionError: an unknown name, or neither a string nor a sequence of strings.
    """
    found = split_stat_names(stats)
    if found is None:
        raise OptionError("stats", f"expected a comma list or a list of names among {', '.join(PROFILE_STATS)} "
                                   f"(or all), got {stats!r}")
    names, unknown = found
    if unknown:
        raise OptionError("stats", f"expected names among {', '.join(PROFILE_STATS)} (or all), got unknown "
                                   f"{', '.join(repr(name) for name in unknown)}")
    return tuple(name for name in PROFILE_STATS if name in names or name == "mad")


def import_for_spec(spec: str, module: str, needs: str) -> ModuleType:
    """Import the library a ``--model`` spec loads through (``torchvision.models`` for ``torchvision:``,
    ``open_clip`` for ``open_clip:``), or refuse the spec saying what to install.

    Raises:
        OptionError: (``model``) ``"<spec> needs <needs>"`` when the library itself is not installed; a module
            missing inside it is raised as it is.
    """
    top = module.split(".")[0]
    try:
        # The package first, as an import statement does: a submodule already in sys.modules would be found
        # without it.
        importlib.import_module(top)
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        if err.name != top:
            raise
        raise OptionError("model", f"{spec} needs {needs}") from err


# Import name -> the distribution pip installs under another name (QA 296: "needs the package yaml").
_DISTRIBUTIONS = {"PIL": "Pillow", "yaml": "PyYAML", "skimage": "scikit-image"}


def import_optional(module: str, extra: str, purpose: str) -> ModuleType:
    """Import an optional dependency, or say which extra of vitmad brings it.

    Raises:
        ModuleNotFoundError: ``"<purpose> needs <package>: pip install "vitmad[<extra>]""``.
    """
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        package = (err.name or module).split(".")[0]
        package = _DISTRIBUTIONS.get(package, package)  # what pip installs, where it is not what Python imports
        raise ModuleNotFoundError(
            f"{purpose} needs the package {package}, which is not installed: pip install \"vitmad[{extra}]\"",
            name=err.name,
        ) from err
