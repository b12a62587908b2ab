"""timm's MobileViT (``timm.models.mobilevit``, on ``ByobNet``): attention across patches, a dilated grid; and
MobileViTv2's linear attention, skipped.

``MobileVitBlock`` unfolds its ``[B, C, H, W]`` map (the output of ``conv_1x1``) into ``patch_size`` patches and
attends across the patches, one sequence per pixel position within a patch: sequence ``p = (i, j)`` (row-major
over the ``ph x pw`` positions, image-major in the batch) holds, for patch ``(a, b)`` (row-major), the token at
map row ``a * ph + i``, column ``b * pw + j``. So the attention ``[B * ph * pw, heads, N, N]`` runs over a grid of
``H / ph x W / pw`` tokens spaced ``ph x pw`` apart: MaxViT's grid attention with ``H / ph x W / pw`` cells.

A map that is not a whole number of patches is resized (bilinear) to one before unfolding, so its tokens are
interpolated samples rather than cells of the map: such calls are refused.
"""

from __future__ import annotations

from torch import nn

from ..placement import NotPlaceable
from .windows import PartitionPlacer, grid_partition, nchw

_LINEAR = ("linear self-attention (MobileViTv2): one learned context vector weighs the tokens, no query per token "
           "attends to keys")


def _mobilevit_class(module: nn.Module, name: str) -> bool:
    return type(module).__name__ == name and type(module).__module__.endswith(".mobilevit")


def attention_modules(model: nn.Module) -> dict[str, nn.Module]:
    """MobileViTv2's linear attention (no ``fused_attn`` switch), to list it as skipped."""
    return {n: m for n, m in model.named_modules() if _mobilevit_class(m, "LinearSelfAttention")}


def _holder(model: nn.Module, name: str) -> nn.Module | None:
    """The ``MobileVitBlock`` holding module ``name``."""
    parts = name.split(".")
    for end in range(len(parts) - 1, 0, -1):
        module = model.get_submodule(".".join(parts[:end]))
        if _mobilevit_class(module, "MobileVitBlock"):
            return module
    return None


def placer(model: nn.Module, name: str, module: nn.Module):
    from . import Skip

    if _mobilevit_class(module, "LinearSelfAttention"):
        return Skip(_LINEAR)
    if not hasattr(module, "fused_attn") or ".transformer." not in f".{name}":
        return None
    block = _holder(model, name)
    if block is None:
        return None

    def partition(grid):
        ph, pw = (int(p) for p in block.patch_size)
        if grid[0] % ph or grid[1] % pw:
            raise NotPlaceable(
                f"{type(model).__name__}'s MobileVitBlock resizes its {grid[0]}x{grid[1]} map to whole {ph}x{pw} "
                "patches (bilinear) before attending, so its tokens are interpolated, not cells of the map; use an "
                f"input size whose map at this stage is a multiple of {ph}x{pw}"
            )
        cells = (grid[0] // ph, grid[1] // pw)
        attention = f"across {ph}x{pw} patches: grid {cells[0]}x{cells[1]}, dilated every {ph}x{pw}"
        return grid_partition(grid, cells), attention

    return PartitionPlacer(model, name, block.conv_1x1, nchw, partition, "windows in batch", output=True)
