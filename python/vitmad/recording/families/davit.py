"""DaViT: timm's (``timm.models.davit``) and transformers' Florence-2 vision tower (``Florence2VisionBackbone``, also
the ``vision_tower`` of ``Florence2Model`` / ``Florence2ForConditionalGeneration``): spatial window attention; the
channel attention of both is skipped (:mod:`.non_spatial`).

Each spatial block pads its stage's map with zeros at the bottom and right to whole ``window_size`` windows (no
shift), cuts it into windows (row-major, image-major in the batch) and runs its window attention: ``[B * windows,
heads, N, N]``. Padding tokens are attended as keys at their cells of the padded grid, beyond the image edge, and are
no queries (``docs/definition.md``, windows). timm's stage strides come from its ``feature_info``; Florence-2's from
the strides of the convolutional embeddings (``convs``, one per stage: 7x7 of stride 4, then 3x3 of stride 2, padded)
up to the stage, whose maps round up (``ceil(H / s)``), checked in every call. Florence-2's tower has no token but the
map's: its projector's pooled tokens come after the tower and attend nowhere in it.
"""

from __future__ import annotations

import math

from torch import nn

from ..module_index import named_module_list
from ..placement import RefusingPlacer
from .stages import innermost_on_path, pair
from .windows import PartitionPlacer, block_partition, nchw, nhwc, parent_module


def attention_modules(model: nn.Module) -> dict[str, nn.Module]:
    """DaViT's channel attention (no ``fused_attn`` switch, so the generic discovery misses it), to list it as
    skipped."""
    return {name: m for name, m in named_module_list(model)
            if type(m).__name__ in ("ChannelAttention", "ChannelAttentionV2") and type(m).__module__.endswith(".davit")}


def placer(model: nn.Module, name: str, module: nn.Module):
    cls = type(module)
    if cls.__name__ == "Florence2VisionWindowAttention" and _is_florence2(module):
        return _florence2_placer(model, name, module)
    if cls.__name__ != "WindowAttention" or not cls.__module__.endswith(".davit"):
        return None
    block = parent_module(model, name)
    if type(block).__name__ != "SpatialBlock":
        return None

    def partition(grid):
        size = tuple(int(s) for s in block.window_size)
        return block_partition(grid, size), f"window {size[0]}x{size[1]}"

    return PartitionPlacer(model, name, block, nchw, partition, "windows in batch")


def _is_florence2(module: nn.Module) -> bool:
    return type(module).__module__.startswith("transformers.models.florence2.")


def _florence2_placer(model: nn.Module, name: str, module: nn.Module):
    """The window attention of stage ``i`` (``blocks.<i>.<j>.spatial_block.window_attn`` of the backbone), on the
    ``[B, H, W, C]`` map it receives, at the product of the strides of the backbone's ``convs`` up to stage ``i``."""
    found = innermost_on_path(model, name, lambda m: type(m).__name__ == "Florence2VisionBackbone" and _is_florence2(m))
    if found is None:
        return RefusingPlacer("it is a Florence-2 window attention recorded without the Florence2VisionBackbone whose "
                              "convolutional embeddings give its stage's pixel stride; record the backbone (the "
                              "model's vision_tower) or the whole model")
    prefix, backbone = found
    parts = name[len(prefix) + 1 if prefix else 0:].split(".")
    convs = getattr(backbone, "convs", None)
    known = len(parts) == 5 and parts[0] == "blocks" and parts[1].isdigit() and parts[3:] == ["spatial_block",
                                                                                             "window_attn"]
    if not known or not isinstance(convs, nn.ModuleList) or int(parts[1]) >= len(convs):
        return RefusingPlacer(f"vitmad knows Florence-2's window attention as blocks.<stage>.<block>.spatial_block."
                              f"window_attn of a backbone with one convolutional embedding per stage (convs), not as "
                              f"{'.'.join(parts)}; pass positions=<[N, 2] pixel position of each token>")
    stage = int(parts[1])
    strides = [pair(getattr(getattr(embed, "conv", None), "stride", 0)) for embed in convs[:stage + 1]]
    if any(s[0] != s[1] or s[0] < 1 for s in strides):
        return RefusingPlacer(f"the convolutional embeddings up to its stage {stage} have strides {strides}, not "
                              "square ones of at least 1, and vitmad places a stage at one pixel stride per axis; "
                              "pass positions=")
    reduction = math.prod(s[0] for s in strides)

    def partition(grid):
        size = int(module.window_size)  # read in each call: a window size changed on the model is followed
        return block_partition(grid, (size, size)), f"window {size}x{size}"

    return PartitionPlacer(model, name, module, nhwc, partition, "windows in batch", reduction=reduction)
