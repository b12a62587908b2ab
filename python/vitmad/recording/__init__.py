"""The recording layer: :func:`vitmad.record` measures every attention layer of a model while it runs.

- :mod:`.recorder`: ``record`` and the :class:`Recording` it returns (one :class:`RecordedCall` per forward);
- :mod:`.placement`: where each attention call's tokens are, and how its per-query values fold onto the image;
- :mod:`.families`: one module per model family that needs its own placement (windows, pooled keys, ...);
- one module per capture mechanism: :mod:`.transformers_capture` (transformers' ``AttentionInterface``) and
  :mod:`.module_capture` (a module's own ``F.scaled_dot_product_attention`` call or explicit softmax).
"""

from .placement import LayerGeometry, ModelLayout
from .recorder import RecordedCall, Recording, record

__all__ = ["record", "Recording", "RecordedCall", "ModelLayout", "LayerGeometry"]
