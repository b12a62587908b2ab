"""Global attention over one stage's whole feature map, in CNN-like hierarchies: timm VOLO and MetaFormer.

- VOLO (``volo_*``): after the outlooker stage (outlook attention, skipped: it has no query-key softmax), the
  ``Attention`` of the transformer stages takes the ``[B, H, W, C]`` map itself and attends over all of it,
  row-major. Its class-attention blocks at the end are :mod:`.class_attention`'s.
- MetaFormer (``caformer_*``, ``metaformer``-style models with attention token mixers): the stage flattens the
  ``[B, C, H, W]`` output of its downsampling row-major before the blocks, whose ``Attention`` attends over all
  of it; the map is read at that downsampling's output.

Each map's pixel stride is its stage's ``feature_info`` reduction, checked against the call's map
(:func:`.windows.stage_stride`).
"""

from __future__ import annotations

from torch import nn

from .stages import defined_in
from .windows import PartitionPlacer, nchw, nhwc, whole_map

__all__ = ["placer"]


def placer(model: nn.Module, name: str, module: nn.Module):
    if defined_in(module, "Attention", "volo"):
        return PartitionPlacer(model, name, module, nhwc, whole_map, "windows in batch")
    if defined_in(module, "Attention", "metaformer"):
        if ".blocks." not in name:
            return None
        owner = model.get_submodule(name.rsplit(".blocks.", 1)[0])  # the MetaFormerStage
        if not hasattr(owner, "downsample"):
            return None
        return PartitionPlacer(model, name, owner.downsample, nchw, whole_map, "windows in batch", output=True)
    return None
