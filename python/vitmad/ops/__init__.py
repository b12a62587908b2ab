"""The ops layer: ``torch.ops.vitmad.*`` and their typed Python entry points.

- :mod:`.library` loads the compiled C++/CUDA kernels (``csrc/``) or registers the pure-PyTorch ones
  (:mod:`.fallback`) under the same names;
- :mod:`.arguments` checks the ops' arguments in Python, message for message like ``csrc/mad_args.cpp``;
- :mod:`.mad_op` and :mod:`.mad_qk_op`: the typed wrappers, fake (shape) kernels and autograd;
- :mod:`.stats_op`: the statistics beside the distance (entropy, prefix mass, self mass, prefix maps);
- :mod:`.reference`: the float64 definition every kernel is tested against;
- :mod:`.positions`: token positions for the position form (:func:`grid_positions`);
- :mod:`.bench`: the short timing behind ``vitmad bench``.
"""

from .library import backend, has_compiled_kernel
from .mad_op import mad
from .mad_qk_op import mad_qk
from .positions import grid_positions
from .reference import (
    attention_stats_qk_reference,
    attention_stats_reference,
    mad_positions_reference,
    mad_qk_positions_reference,
    mad_qk_reference,
    mad_reference,
    pixel_distances,
    uniform_attention_mad,
)
from .stats_op import DEFAULT_STATS, attention_stats, attention_stats_qk

__all__ = [
    "mad",
    "mad_qk",
    "attention_stats",
    "attention_stats_qk",
    "DEFAULT_STATS",
    "backend",
    "has_compiled_kernel",
    "mad_reference",
    "mad_qk_reference",
    "mad_positions_reference",
    "mad_qk_positions_reference",
    "grid_positions",
    "attention_stats_reference",
    "attention_stats_qk_reference",
    "pixel_distances",
    "uniform_attention_mad",
]
