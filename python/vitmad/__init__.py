"""vitmad: mean attention distance of Vision Transformers, fused and fast.

Three layers, one folder each: :mod:`vitmad.ops` (``torch.ops.vitmad.*``: compiled C++/CUDA kernels, or
pure-PyTorch ones when the compiled library is unavailable, see :func:`backend`), :mod:`vitmad.recording`
(:func:`record`: every layer's MAD while a real model runs) and :mod:`vitmad.profiling` (:func:`profile`:
a model over an image set, with results files and figures). The definition: ``docs/definition.md``.
"""

from .ops import (
    attention_stats,
    attention_stats_qk,
    backend,
    grid_positions,
    has_compiled_kernel,
    mad,
    mad_qk,
    mad_reference,
    pixel_distances,
    uniform_attention_mad,
)
from .recording import record

__all__ = [
    "mad",
    "mad_qk",
    "attention_stats",
    "attention_stats_qk",
    "record",
    "backend",
    "has_compiled_kernel",
    "grid_positions",
    "mad_reference",
    "pixel_distances",
    "uniform_attention_mad",
    "profile",
    "Profile",
]
__version__ = "0.1.0"


def __getattr__(name: str):
    # Profiling pulls in tqdm, PIL and (for figures) matplotlib: load it on first use only.
    if name in ("profile", "Profile"):
        from . import profiling

        return getattr(profiling, name)
    raise AttributeError(f"module 'vitmad' has no attribute {name!r}")


def __dir__() -> list[str]:
    # The names loaded on first use too, for dir() and tab completion (QA 296: profile and Profile were not offered).
    return sorted({*globals(), *__all__})
