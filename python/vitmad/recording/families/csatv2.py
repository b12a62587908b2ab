"""CSATv2 (timm ``csatv2*``): ConvNeXt-style stages on a frequency-domain stem, transformer blocks at the end of the
last stages.

- The stem (``LearnableDct2d``) is not a convolution: it cuts the image into non-overlapping ``k x k`` pixel blocks
  (``k = 8``; the image must be a whole number of blocks, the stem reshapes it) and turns each block's DCT into one
  token, so the stem's map has one cell per block: stride ``k``. Every later stage starts with a stride-2
  convolution, so stage ``i`` runs at ``k * 2 ** i`` px (``feature_info``'s reductions).
- ``TransformerBlock.attn`` (timm's ``Attention``) attends over the whole map of its block: the stage's map, or
  with ``downsample=True`` the ``MaxPool2d(3, 2, 1)`` of it (``pool2``; ``pool1`` makes the same grid for the
  shortcut and is not counted twice).
- ``SpatialTransformerBlock`` (in each ConvNeXt block's ``SpatialAttention``) is skipped: its scalar ``q`` and
  ``k`` are ``[B, N]``, so ``q @ k.transpose(-1, -2)`` is ``[B, B]``: its softmax runs over the images of the
  batch, not over the 7 x 7 pooled tokens its docstring names (a batch of one gives the weight 1). No token
  attends to another token, so there is no MAD; :func:`attention_modules` finds it so that it is listed.
"""

from __future__ import annotations

from torch import nn

from ..module_index import module_list, named_module_list
from .stages import StageGrid, StagePlacer, defined_in, owner_or_features, strided_modules

__all__ = ["placer", "attention_modules"]

_ACROSS_IMAGES = ("attention across the images of the batch, not between tokens: its scalar q and k are [B, N], so "
                  "q @ k^T is [B, B] (CSATv2's SpatialTransformerBlock)")


def attention_modules(model: nn.Module) -> dict[str, nn.Module]:
    """CSATv2's ``SpatialTransformerBlock``s (no ``fused_attn`` switch, no attention-like class name), to list
    them as skipped."""
    return {n: m for n, m in named_module_list(model) if defined_in(m, "SpatialTransformerBlock", "csatv2")}


def _stage_grid(model: nn.Module, csatv2: nn.Module) -> StageGrid:
    """The stem (stride ``k``), then the stages' strided convolutions and the downsampling blocks' ``pool2``.
    ``csatv2``: the model, or timm's ``features_only`` wrapper of its children (``stem_dct``, ``stages_0`` ...)."""
    stem = csatv2.stem_dct
    stages = getattr(csatv2, "stages", csatv2)
    shortcut_pools = tuple(m.pool1 for m in module_list(stages)
                           if defined_in(m, "TransformerBlock", "csatv2") and m.downsample)
    later = strided_modules(stages, inside=(stem, *shortcut_pools))  # the stem's own convolutions: stride 1
    return StageGrid(model, [stem, *later], strides=[int(stem.k), *(m.stride for m in later)])


def placer(model: nn.Module, name: str, module: nn.Module):
    from . import Skip

    if defined_in(module, "SpatialTransformerBlock", "csatv2"):
        return Skip(_ACROSS_IMAGES)
    if not hasattr(module, "fused_attn"):
        return None
    csatv2 = owner_or_features(model, "CSATv2", "csatv2")  # features_only: refused as a second tower (QA 293)
    if csatv2 is None or not hasattr(csatv2, "stem_dct") or not any(
            defined_in(m, "TransformerBlock", "csatv2") and m.attn is module for m in module_list(csatv2)):
        return None
    return StagePlacer(_stage_grid(model, csatv2))
