"""Where :func:`vitmad.record` captures attention: transformers (:mod:`.hf`), timm and other
``F.scaled_dot_product_attention`` callers (:mod:`.timm`)."""
