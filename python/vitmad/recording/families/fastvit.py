"""timm's FastViT and MobileCLIP's MCi (``timm.models.fastvit``): global attention over the flattened map of the
last stage(s).

FastViT's ``Attention`` takes the ``[B, C, H, W]`` map itself, flattens it row-major and attends over all of it:
``[B, heads, H * W, H * W]``. Its map is read from the module's own input; its stride from ``feature_info``
(32 for the attention stage of ``fastvit_sa*``; the MCi variants alike). The RepMixer stages have no attention.
"""

from __future__ import annotations

from torch import nn

from .windows import PartitionPlacer, nchw, whole_map


def placer(model: nn.Module, name: str, module: nn.Module):
    cls = type(module)
    if cls.__name__ != "Attention" or not cls.__module__.endswith(".fastvit"):
        return None
    return PartitionPlacer(model, name, module, nchw, whole_map, "windows in batch")
