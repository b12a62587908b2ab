"""Loads the compiled vitmad kernels, or registers the pure-PyTorch ones under the same op names.

Either way ``torch.ops.vitmad.mad`` works after ``import vitmad``; :func:`backend` says which is in use, and a
missing compiled library is logged once, never a silent difference.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from . import fallback

__all__ = ["backend", "has_compiled_kernel"]

log = logging.getLogger("vitmad")

_LIBRARY_NAME = "_vitmad_ops.so"
# The devices whose kernels csrc/ may provide; any other device gets the pure-PyTorch kernels.
_COMPILED_DEVICES = ("CPU", "CUDA")

_backend = "python"
_fallback_lib: torch.library.Library | None = None
# (op, dispatch key) pairs served by the pure-PyTorch kernels although the compiled library is loaded.
_fallback_kernels: set[tuple[str, str]] = set()


def has_compiled_kernel(op: str, device: str | torch.device) -> bool:
    """Whether the compiled library registered a kernel of ``vitmad::<op>`` for ``device``: a device as torch names
    it (``"cpu"``, ``"cuda"``, ``"cuda:1"``, a ``torch.device``) or its dispatch key (``"CPU"``, ``"CUDA"``). False
    for a device csrc/ has no kernels for (``"mps"``, ...).

    Raises:
        ValueError: ``op`` is no vitmad op, or ``device`` no device torch knows.
    """
    if not isinstance(op, str) or not _op_defined(op):
        raise ValueError(f"vitmad.has_compiled_kernel: op={op!r} is no vitmad op (torch.ops.vitmad.<op>: 'mad', "
                         "'mad_qk', 'stats', ...)")
    key = device if device in _COMPILED_DEVICES else None
    if key is None:
        try:
            kind = torch.device(device).type
        except (RuntimeError, TypeError) as error:
            raise ValueError(f"vitmad.has_compiled_kernel: device={device!r} is no device torch knows (expected 'cpu', "
                             "'cuda', 'cuda:N', a torch.device, or the dispatch keys 'CPU', 'CUDA')") from error
        key = kind.upper()
        if key not in _COMPILED_DEVICES:
            return False
    return (
        _backend == "compiled"
        and (op, key) not in _fallback_kernels
        and torch._C._dispatch_has_kernel_for_dispatch_key(f"vitmad::{op}", key)
    )


def backend() -> str:
    """``"compiled"`` when the C++/CUDA library is loaded, ``"python"`` when the pure-PyTorch kernels stand in."""
    return _backend


def _load_compiled() -> Exception | None:
    if os.environ.get("VITMAD_DISABLE_COMPILED", "") not in ("", "0"):
        return RuntimeError("disabled by VITMAD_DISABLE_COMPILED")
    # The build installs the library at the package root (CMakeLists.txt), beside vitmad/__init__.py.
    path = Path(__file__).parent.parent / _LIBRARY_NAME
    try:
        torch.ops.load_library(str(path))
    except (OSError, RuntimeError) as error:
        return error
    return None


def _op_defined(name: str) -> bool:
    try:
        torch._C._dispatch_find_schema_or_throw(f"vitmad::{name}", "")
    except RuntimeError:
        return False
    return True


def _register_fallback_kernels(dispatch_key: str, names) -> None:
    """Serve ``names`` with the pure-PyTorch kernels for ``dispatch_key``, defining the ops that nothing
    defined yet (no compiled library, or one built before the op existed)."""
    global _fallback_lib
    if _fallback_lib is None:
        _fallback_lib = torch.library.Library("vitmad", "FRAGMENT")
    for name in names:
        if not _op_defined(name):
            _fallback_lib.define(fallback.SCHEMAS[name])
        _fallback_lib.impl(name, getattr(fallback, name), dispatch_key)
        _fallback_kernels.add((name, dispatch_key))


def _initialise() -> None:
    global _backend
    error = _load_compiled()
    if error is None:
        _backend = "compiled"
        missing = [
            d for d in _COMPILED_DEVICES if not torch._C._dispatch_has_kernel_for_dispatch_key("vitmad::mad", d)
        ]
        if "CUDA" in missing and torch.cuda.is_available():
            log.warning("vitmad: the compiled library has no CUDA kernels (built without CUDA); "
                        "CUDA tensors use the pure-PyTorch kernels")
        undefined = [n for n in fallback.SCHEMAS if not _op_defined(n)]
        if undefined:
            log.warning("vitmad: the compiled library predates the ops %s (reinstall vitmad from source to build "
                        "them); they use the pure-PyTorch kernels", ", ".join(undefined))
            _register_fallback_kernels("CompositeExplicitAutograd", undefined)
        # Devices without a compiled kernel (CUDA in a CPU-only build, MPS, XPU, ...) fall back explicitly,
        # op by op: a build may carry one op's CUDA kernel and not another's.
        for key in _COMPILED_DEVICES:
            names = [
                n for n in fallback.SCHEMAS
                if n not in undefined and not torch._C._dispatch_has_kernel_for_dispatch_key(f"vitmad::{n}", key)
            ]
            if names:
                _register_fallback_kernels(key, names)
        return
    if os.environ.get("VITMAD_DISABLE_COMPILED", "") not in ("", "0"):
        # Chosen, not missing: the advice to reinstall misled the user who set it (QA 416).
        log.warning("vitmad: the compiled kernels are disabled by VITMAD_DISABLE_COMPILED; using the pure-PyTorch "
                    "kernels, which are correct but slower")
    else:
        log.warning(
            "vitmad: the compiled kernels could not be loaded (%s); using the pure-PyTorch kernels, which are "
            "correct but slower. Reinstall vitmad from source to build them.",
            error,
        )
    _register_fallback_kernels("CompositeExplicitAutograd", list(fallback.SCHEMAS))


_initialise()
