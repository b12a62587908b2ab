"""timm's ViTamin (``timm.models.vitamin``): a convolutional stem, then a plain ViT over its feature map.

ViTamin embeds the image with a ``HybridEmbed`` whose backbone (MobileConv stages and a strided convolution)
ends at stride 16 and whose projection is the identity (``patch_size=1``), so there is no patch-embedding
convolution for the plain layout to find. Its attention layers are plain ViT attention ``[B, heads, N, N]`` over
the prefix tokens (none by default) and the row-major map of the embedding. The map is the embedding's
projection output in each call; one token is ``feature_ratio * patch_size`` pixels of the image (the
embedding's own stride, checked against each call's map), not the image over the map, which misreads maps the
stem's convolutions round up.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..placement import CallContext, LayerGeometry, LayerPlacer, NotPlaceable, Placement, cell_centres, select_tokens

_MAP = "vitamin.map"


def _hybrid_embedding(model: nn.Module) -> nn.Module | None:
    """The ``HybridEmbed`` of a timm ViT whose projection is the identity (a stem does all the patching)."""
    embed = getattr(model, "patch_embed", None)
    if type(embed).__name__ in ("HybridEmbed", "HybridEmbedWithSize") and isinstance(embed.proj, nn.Identity):
        return embed
    return None


class HybridStemPlacer(LayerPlacer):
    """Places one attention layer of a ViT over a convolutional stem's map (ViTamin)."""

    def __init__(self, model: nn.Module, embed: nn.Module):
        self.model, self.embed = model, embed
        ratio = tuple(int(r) for r in embed.feature_ratio)
        patch = tuple(int(p) for p in embed.patch_size)
        self.stride = (float(ratio[0] * patch[0]), float(ratio[1] * patch[1]))

    def install(self, context: CallContext) -> list[torch.utils.hooks.RemovableHandle]:
        def see(module, args, output) -> None:
            context.values[_MAP] = tuple(int(s) for s in output.shape[-2:]) if output.dim() == 4 else None

        return [self.embed.proj.register_forward_hook(see)]

    def place(self, context: CallContext, lead: torch.Size, num_queries: int, num_keys: int) -> Placement:
        name = type(self.model).__name__
        grid = context.values.get(_MAP)
        if grid is None:
            raise NotPlaceable(f"the stem of {name} did not give a [B, C, H, W] map before this layer ran")
        image = context.image_size
        if image is not None and any(side not in (math.floor(size / s), math.ceil(size / s))
                                     for size, side, s in zip(image, grid, self.stride)):
            raise NotPlaceable(
                f"the stem of {name} gave a {grid[0]}x{grid[1]} map for a {image[0]}x{image[1]} image, which does "
                f"not fit its stride {self.stride[0]:g}x{self.stride[1]:g} (feature_ratio x patch_size)"
            )
        tokens = grid[0] * grid[1]
        prefix = num_queries - tokens
        if num_queries != num_keys or len(lead) != 2 or prefix != int(getattr(self.model, "num_prefix_tokens", 0)):
            raise NotPlaceable(
                f"its attention is [{', '.join(map(str, lead))}, {num_queries}, {num_keys}]; expected [B, heads, N, "
                f"N] over {getattr(self.model, 'num_prefix_tokens', 0)} prefix tokens and the {grid[0]}x{grid[1]} "
                "map of the stem"
            )
        positions = torch.cat([torch.full((prefix, 2), float("nan")),
                               cell_centres(*grid, self.stride).reshape(tokens, 2)])
        geometry = LayerGeometry(grid, self.stride, "global", int(lead[-1]), prefix)
        return Placement(positions, None, select_tokens(torch.arange(prefix, prefix + tokens)), geometry)


def placer(model: nn.Module, name: str, module: nn.Module):
    if not name.startswith("blocks.") or not hasattr(module, "fused_attn"):
        return None
    embed = _hybrid_embedding(model)
    return None if embed is None else HybridStemPlacer(model, embed)
