"""vitmad: mean attention distance of Vision Transformers, fused and fast.

``import vitmad`` registers ``torch.ops.vitmad.mad`` and ``torch.ops.vitmad.mad_qk`` (compiled C++/CUDA
kernels, or pure-PyTorch ones when the compiled library is unavailable: see :func:`backend`).
"""

from ._library import backend, has_compiled_kernel
from .ops import mad
from .ops_qk import mad_qk
from .record import record
from .reference import mad_reference, pixel_distances, uniform_attention_mad

__all__ = [
    "mad",
    "mad_qk",
    "record",
    "backend",
    "has_compiled_kernel",
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
