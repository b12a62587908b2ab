"""timm's MobileViT (``timm.models.mobilevit``, on ``ByobNet``): attention across patches, a dilated grid; and
MobileViTv2's linear attention, skipped.

``MobileVitBlock`` unfolds its ``[B, C, H, W]`` map (the output of ``conv_1x1``) into ``patch_size`` patches and
attends across the patches, one sequence per pixel position within a patch: sequence ``p = (i, j)`` (row-major
over the ``ph x pw`` positions, image-major in the batch) holds, for patch ``(a, b)`` (row-major), the token at
map row ``a * ph + i``, column ``b * pw + j``. So the attention ``[B * ph * pw, heads, N, N]`` runs over a grid of
``H / ph x W / pw`` tokens spaced ``ph x pw`` apart: MaxViT's grid attention with ``H / ph x W / pw`` cells.

A map that is not a whole number of patches is resized (bilinear, without aligned corners) up to one before
unfolding (``ceil(H / ph) * ph`` rows): its tokens are samples of the map at the centres of the resized grid's
bins, and are placed there (``docs/definition.md``, resized maps): the stage's stride times ``H / H'``.

transformers' ``MobileViTModel`` unfolds the same way (``MobileViTLayer.unfolding``: sequence ``(i, j)`` of each
image holds the token at map row ``a * patch + i`` of patch ``(a, b)``), and ``MobileViTV2Model`` has the linear
attention. transformers' models carry no ``feature_info``: a stage's pixel stride is the product of the strides
of the convolutions that run before its ``conv_1x1`` (the stem's, the downsampling blocks'; module order is run
order in ``MobileViTModel``), checked against each call's map like timm's.
"""

from __future__ import annotations

import math

from torch import nn

from ..module_index import named_module_list
from .stages import defined_in, innermost_on_path, reduction_before
from .windows import PartitionPlacer, grid_partition, nchw

_LINEAR = ("linear self-attention (MobileViTv2): one learned context vector weighs the tokens, no query per token "
           "attends to keys")


def _mobilevit_class(module: nn.Module, name: str) -> bool:
    return type(module).__name__ == name and type(module).__module__.endswith(".mobilevit")


def _is_linear_attention(module: nn.Module) -> bool:
    return (_mobilevit_class(module, "LinearSelfAttention")
            or defined_in(module, "MobileViTV2LinearSelfAttention", "modeling_mobilevitv2"))


def attention_modules(model: nn.Module) -> dict[str, nn.Module]:
    """MobileViTv2's linear attention (no ``fused_attn`` switch, no query/key projections), to list it as
    skipped."""
    return {n: m for n, m in named_module_list(model) if _is_linear_attention(m)}


def _holder(model: nn.Module, name: str, is_block) -> nn.Module | None:
    """The MobileViT block holding module ``name``."""
    parts = name.split(".")
    for end in range(len(parts) - 1, 0, -1):
        module = model.get_submodule(".".join(parts[:end]))
        if is_block(module):
            return module
    return None


def placer(model: nn.Module, name: str, module: nn.Module):
    from . import Skip

    if _is_linear_attention(module):
        return Skip(_LINEAR)
    if defined_in(module, "MobileViTSelfAttention", "modeling_mobilevit"):
        layer = _holder(model, name, lambda m: defined_in(m, "MobileViTLayer", "modeling_mobilevit"))
        if layer is None:
            return None
        conv = layer.conv_1x1.convolution
        # The convolutions before it in the MobileViTModel holding it, not in a user's module around it (QA 334).
        found = innermost_on_path(model, name, lambda m: defined_in(m, "MobileViTModel", "modeling_mobilevit"))
        return _patch_placer(model, name, conv, (layer.patch_height, layer.patch_width),
                             reduction=reduction_before(model if found is None else found[1], conv))
    if not hasattr(module, "fused_attn") or ".transformer." not in f".{name}":
        return None
    block = _holder(model, name, lambda m: _mobilevit_class(m, "MobileVitBlock"))
    if block is None:
        return None
    return _patch_placer(model, name, block.conv_1x1, block.patch_size)


def _patch_placer(model: nn.Module, name: str, conv_1x1: nn.Module, patch_size, *,
                  reduction: int | None = None) -> PartitionPlacer:
    """Attention across the ``patch_size`` patches of the map ``conv_1x1`` makes."""

    def partition(grid):
        ph, pw = (int(p) for p in patch_size)
        # Both libraries resize to whole patches first, as math.ceil(H / ph) * ph (bilinear, corners not aligned).
        resized = (math.ceil(grid[0] / ph) * ph, math.ceil(grid[1] / pw) * pw)
        cells = (resized[0] // ph, resized[1] // pw)
        attention = f"across {ph}x{pw} patches: grid {cells[0]}x{cells[1]}, dilated every {ph}x{pw}"
        if resized == tuple(grid):
            return grid_partition(grid, cells), attention
        attention += f", map resized {grid[0]}x{grid[1]} -> {resized[0]}x{resized[1]}"
        return grid_partition(resized, cells), attention, resized

    return PartitionPlacer(model, name, conv_1x1, nchw, partition, "windows in batch", output=True,
                           reduction=reduction)
