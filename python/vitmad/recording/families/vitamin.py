"""timm's ViTamin (``timm.models.vitamin``): a convolutional stem, then a plain ViT over its feature map.

ViTamin embeds the image with a ``HybridEmbed`` whose backbone (MobileConv stages and a strided convolution)
ends at stride 16 and whose projection is the identity (``patch_size=1``), so there is no patch-embedding
convolution for the plain layout to find. Its attention layers are plain ViT attention ``[B, heads, N, N]`` over
the prefix tokens (none by default) and the row-major map of the embedding. The map is the embedding's
projection output in each call; one token is as many pixels of the image as the chain of the stem's strided
convolutions and pools that ran in the call makes (16 for every ViTamin), followed as the plain layout follows a
hybrid ViT's stem (:func:`.plain.stem_stride`). Neither the image over the map, which misreads maps the stem's
convolutions round up, nor timm's ``feature_ratio``, which is that ratio at the size the model was built for
(15 px for a ViTamin built at 200 px, whose tokens are 16 px apart: QA 315), is taken.
"""

from __future__ import annotations

import torch
from torch import nn

from ..placement import CallContext, LayerGeometry, LayerPlacer, NotPlaceable, Placement, cell_centres, select_tokens
from .plain import stem_step, stem_stride, strided_stem

# The map of the stem's latest call; the strided stem steps seen since the projection last ran, and those of its
# latest run. Each placer (one a layer) hooks the stem and keeps its own, under these keys and its id.
_MAP, _STEPS, _STEPS_OF_MAP = "vitamin.map", "vitamin.steps", "vitamin.steps_of_map"


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
        self.stem = strided_stem(embed.backbone, None)  # the backbone's strided convolutions and pools, all
        self.map, self.steps, self.steps_of_map = ((key, id(self)) for key in (_MAP, _STEPS, _STEPS_OF_MAP))

    def install(self, context: CallContext) -> list[torch.utils.hooks.RemovableHandle]:
        def see_step(module, args, output) -> None:
            step = stem_step(module, args, output)
            if step is not None:
                context.values.setdefault(self.steps, []).append(step)

        def see(module, args, output) -> None:
            context.values[self.map] = tuple(int(s) for s in output.shape[-2:]) if output.dim() == 4 else None
            context.values[self.steps_of_map] = context.values.pop(self.steps, None)

        return [self.embed.proj.register_forward_hook(see),
                *(module.register_forward_hook(see_step) for module in self.stem)]

    def _stride(self, context: CallContext, grid: tuple[int, int]) -> tuple[float, float]:
        """Pixels between two tokens, per axis: the stem's chain of strided modules from the image to the map."""
        steps = context.values.get(self.steps_of_map)
        image = context.image_size
        if image is None and steps:  # the stem's first strided module read the image (or a same-size map of it)
            image = tuple(steps[0][a][0] for a in range(2))
        if image is None:
            raise NotPlaceable(f"the stem of {type(self.model).__name__} ran no strided convolution or pool on an "
                               "image vitmad saw, so it cannot tell how many pixels apart the tokens are; pass "
                               "patch=<pixels per token>")
        patch = tuple(int(p) for p in self.embed.patch_size)
        return tuple(float(p * stem_stride(size, side, axis, self.model, None if steps is None else
                                           [step[a] for step in steps], p))
                     for a, (p, size, side, axis) in enumerate(zip(patch, image, grid, ("height", "width"))))

    def place(self, context: CallContext, lead: torch.Size, num_queries: int, num_keys: int) -> Placement:
        name = type(self.model).__name__
        grid = context.values.get(self.map)
        if grid is None:
            raise NotPlaceable(f"the stem of {name} did not give a [B, C, H, W] map before this layer ran")
        stride = self._stride(context, grid)
        tokens = grid[0] * grid[1]
        prefix = num_queries - tokens
        if num_queries != num_keys or len(lead) != 2 or prefix != int(getattr(self.model, "num_prefix_tokens", 0)):
            raise NotPlaceable(
                f"its attention is [{', '.join(map(str, lead))}, {num_queries}, {num_keys}]; expected [B, heads, N, "
                f"N] over {getattr(self.model, 'num_prefix_tokens', 0)} prefix tokens and the {grid[0]}x{grid[1]} "
                "map of the stem"
            )
        positions = torch.cat([torch.full((prefix, 2), float("nan")),
                               cell_centres(*grid, stride).reshape(tokens, 2)])
        geometry = LayerGeometry(grid, stride, "global", int(lead[-1]), prefix)
        return Placement(positions, None, select_tokens(torch.arange(prefix, prefix + tokens)), geometry)


def placer(model: nn.Module, name: str, module: nn.Module):
    if not name.startswith("blocks.") or not hasattr(module, "fused_attn"):
        return None
    embed = _hybrid_embedding(model)
    return None if embed is None else HybridStemPlacer(model, embed)
