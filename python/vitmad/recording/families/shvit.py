"""timm's SHViT (``timm.models.shvit``): single-head self-attention (``SHSA``) over a stage's whole map.

``SHSA`` takes the stage's ``[B, C, H, W]`` map, attends with one head over all of it flattened row-major (on a
slice of its channels), and computes the softmax itself: the attention is ``[B, N, N]``, without a head
dimension. The map's stride is its stage's reduction in ``feature_info`` (16, 32, 64).
"""

from __future__ import annotations

from torch import nn

from ..module_index import named_module_list
from .iformer import SingleHeadPlacer
from .stages import defined_in
from .windows import PartitionPlacer, nchw, whole_map

__all__ = ["attention_modules", "placer"]


def _is_shsa(module: nn.Module) -> bool:
    return defined_in(module, "SHSA", "shvit")


def attention_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The ``SHSA`` modules, which the generic discovery misses (no "attention" in the class name)."""
    return {name: m for name, m in named_module_list(model) if _is_shsa(m)}


def placer(model: nn.Module, name: str, module: nn.Module):
    if not _is_shsa(module):
        return None
    return SingleHeadPlacer(PartitionPlacer(model, name, module, nchw, whole_map, "windows in batch"))
