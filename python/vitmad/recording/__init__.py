"""The recording layer: :func:`vitmad.record` measures every attention layer of a model while it runs.

- :mod:`.recorder`: ``record`` and the :class:`Recording` it returns (one :class:`RecordedCall` per forward);
- :mod:`.token_grid`: where the patch tokens are (patch size, grid, prefix tokens);
- one module per capture mechanism: :mod:`.transformers_capture` (transformers' ``AttentionInterface``) and
  :mod:`.sdpa_capture` (any module's ``F.scaled_dot_product_attention`` call: timm and others).
"""

from .recorder import RecordedCall, Recording, record
from .token_grid import ModelLayout

__all__ = ["record", "Recording", "RecordedCall", "ModelLayout"]
