"""timm's ViTamin (``timm.models.vitamin``): a convolutional stem, then a plain ViT over its feature map.

ViTamin embeds the image with a ``HybridEmbed`` whose backbone (MobileConv stages and a strided convolution)
ends at stride 16 and whose projection is the identity (``patch_size=1``), so there is no patch-embedding
convolution for the plain layout to find. Its attention layers are plain ViT attention ``[B, heads, N, N]`` over
the prefix tokens (none by default) and the row-major map of the embedding. The map is the embedding's
projection output in each call. The same placer serves any timm ViT over a ``HybridEmbed`` without projection
(MobileCLIP's ``vit_base_mci_224`` over its ConvStem, a user's ``features_only`` backbone). One token is, in
pixels of the image:

- the reduction a timm ``features_only`` backbone declares for the map it returns (its ``FeatureInfo``: what
  the hooks see may not say it, a stride taken by ``F.conv2d`` in BlurPool, stages run past the map returned);
- else the product of the strides along the chain of the stem's strided convolutions and pools that ran in the
  call (16 for every ViTamin), followed as the plain layout follows a hybrid ViT's stem (:func:`.plain.stem_stride`);
- else timm's ``feature_ratio`` (times ``patch_size``) where that ratio is exact at the size the model was built
  for (a stem that pools by function).

Each is checked against the call's map. Neither the image over the map, which misreads maps the stem's
convolutions round up, nor an inexact ``feature_ratio`` (15 px for a ViTamin built at 200 px, whose tokens are
16 px apart: QA 315) is taken.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..placement import CallContext, LayerGeometry, LayerPlacer, NotPlaceable, Placement, cell_centres, select_tokens
from .plain import stem_step, stem_stride, strided_stem

# The map of the stem's latest call; the strided stem steps seen since the projection last ran, and those of its
# latest run. Each placer (one a layer) hooks the stem and keeps its own, under these keys and its id.
_MAP, _STEPS, _STEPS_OF_MAP = "vitamin.map", "vitamin.steps", "vitamin.steps_of_map"


# What a refusal of this placer advises: it places no plain layout that patch= or grid= would correct.
_ADVICE = "pass positions=<[N, 2] pixel position of each token>"


def _declared_reduction(backbone: nn.Module) -> int | None:
    """The stride of the map a timm ``features_only`` backbone returns last (``HybridEmbed`` takes the last), as
    its ``FeatureInfo`` declares it; None for a backbone without one (ViTamin's stages, MobileCLIP's ConvStem)."""
    reduction = getattr(getattr(backbone, "feature_info", None), "reduction", None)
    values = reduction() if callable(reduction) else None
    return int(values[-1]) if values else None


def is_projectionless_embedding(module: nn.Module) -> bool:
    """Whether ``module`` is a timm ``HybridEmbed`` whose projection is the identity (a stem does all the patching):
    no patch-embedding convolution names its tower (:func:`~vitmad.recording.towers.other_image_towers`)."""
    return (type(module).__name__ in ("HybridEmbed", "HybridEmbedWithSize")
            and isinstance(getattr(module, "proj", None), nn.Identity))


def _hybrid_embedding(model: nn.Module) -> nn.Module | None:
    """The projectionless ``HybridEmbed`` of a timm ViT."""
    embed = getattr(model, "patch_embed", None)
    return embed if is_projectionless_embedding(embed) else None


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
        """Pixels between two tokens, per axis: the reduction a timm feature backbone declares for the map it
        returns, else the stem's chain of strided modules from the image to the map, else timm's ``feature_ratio``
        where it is exact at the size the model was built for. Each is checked against the call's map."""
        name = type(self.model).__name__
        image = context.image_size
        patch = tuple(int(p) for p in self.embed.patch_size)
        declared = _declared_reduction(self.embed.backbone)
        if declared is not None:  # a features_only backbone: its stages' strides, not what the hooks can see
            return self._fitted(image, grid, tuple(float(declared * p) for p in patch), "its backbone's reduction")
        steps = context.values.get(self.steps_of_map)
        start = image if image is not None or not steps else tuple(steps[0][a][0] for a in range(2))
        refusal = f"the stem of {name} ran no strided convolution or pool on an image vitmad saw"
        if start is not None:
            try:
                return tuple(float(p * stem_stride(size, side, axis, self.model, None if steps is None else
                                                   [step[a] for step in steps], p, advice=_ADVICE))
                             for a, (p, size, side, axis) in enumerate(zip(patch, start, grid, ("height", "width"))))
            except NotPlaceable as error:  # strides vitmad cannot follow (a pool by function, BlurPool's conv2d)
                refusal = str(error)
        built = tuple(int(s) for s in getattr(self.embed, "img_size", ()) or ())
        ratio = tuple(int(r) for r in self.embed.feature_ratio)
        size = tuple(int(s) for s in getattr(self.embed, "feature_size", ()) or ())
        if len(built) == len(size) == len(ratio) == 2 and all(b == f * r for b, f, r in zip(built, size, ratio)):
            # timm's ratio of its build size to the map it made, exact there: that stride, checked on this call
            return self._fitted(image, grid, tuple(float(r * p) for r, p in zip(ratio, patch)),
                                "timm's feature_ratio x patch_size")
        raise NotPlaceable(refusal if refusal.endswith(_ADVICE) else f"{refusal}; {_ADVICE}")

    def _fitted(self, image: tuple[int, int] | None, grid: tuple[int, int], stride: tuple[float, float],
                source: str) -> tuple[float, float]:
        """``stride``, where the call's map is the image over it, rounded down or up (or the image is unknown)."""
        if image is not None and any(side not in (math.floor(size / s), math.ceil(size / s))
                                     for size, side, s in zip(image, grid, stride)):
            raise NotPlaceable(
                f"the stem of {type(self.model).__name__} gave a {grid[0]}x{grid[1]} map for a {image[0]}x{image[1]} "
                f"image (the input of the first convolution that ran), which does not fit its stride "
                f"{stride[0]:g}x{stride[1]:g} ({source}); {_ADVICE}"
            )
        return stride

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
