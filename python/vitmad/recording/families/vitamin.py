"""timm's ViTamin (``timm.models.vitamin``): a convolutional stem, then a plain ViT over its feature map.

ViTamin embeds the image with a ``HybridEmbed`` whose backbone (MobileConv stages and a strided convolution)
ends at stride 16 and whose projection is the identity (``patch_size=1``), so there is no patch-embedding
convolution for the plain layout to find. Its attention layers are plain ViT attention ``[B, heads, N, N]`` over
the prefix tokens (none by default) and the row-major map of the embedding. The same placer serves any timm ViT
over a ``HybridEmbed`` without projection (MobileCLIP's ``vit_base_mci_224`` over its ConvStem, a user's
``features_only`` backbone). The map is the projection's (the identity's) output in each call: the backbone's
cells, padded up to a multiple of ``patch_size`` under ``dynamic_img_pad`` and not otherwise grouped by it (an
identity patches nothing). One cell is, in pixels of the image the embedding takes:

- the reduction a timm backbone declares for the deepest map it returns (a ``features_only`` one's
  ``FeatureInfo``: ``HybridEmbed`` takes the last, the deepest, whatever the order of ``out_indices``; a whole
  network's ``feature_info`` list, its final map); what the
  hooks see may not say it (a stride taken by ``F.conv2d`` in BlurPool, stages run past the map returned, a
  space-to-depth stem before the first convolution); checked against the call's map;
- else the product of the strides along the chain of the stem's strided convolutions and pools that ran in the
  call (16 for every ViTamin), followed as the plain layout follows a hybrid ViT's stem (:func:`.plain.stem_stride`).

Anything else is refused. Neither the image over the map nor timm's ``feature_ratio`` (that ratio, rounded down, at
the size the model was built for) is taken: both misread maps the stem's convolutions round up (a ViTamin built at
200 px has a ratio of 15 where its tokens are 16 px apart: QA 315; a stride-32 backbone built at 240 px one of 30,
which divides the build size exactly: QA 319).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..placement import CallContext, LayerGeometry, LayerPlacer, NotPlaceable, Placement, cell_centres, select_tokens
from .plain import stem_step, stem_stride, strided_stem

# The image the embedding took and the map its projection made in its latest call; the strided stem steps seen
# since the projection last ran, and those of its latest run. Each placer (one a layer) hooks the embedding and
# keeps its own, under these keys and its id.
_IMAGE, _MAP, _STEPS, _STEPS_OF_MAP = "vitamin.image", "vitamin.map", "vitamin.steps", "vitamin.steps_of_map"


# What a refusal of this placer advises: it places no plain layout that patch= or grid= would correct.
_ADVICE = "pass positions=<[N, 2] pixel position of each token>"


def _declared_reduction(backbone: nn.Module) -> int | None:
    """The stride of the deepest map a timm backbone returns, as it declares it: a ``features_only`` one's
    ``FeatureInfo`` (its outputs come in module order, the deepest last, which ``HybridEmbed`` takes, whatever the
    order of ``out_indices``), or a whole network's ``feature_info`` list (``num_classes=0, global_pool=''``: its
    final map; QA 320: BlurPool's and HRNet's, whose chains no hook follows, were refused); None for a backbone
    without one (ViTamin's stages, MobileCLIP's ConvStem)."""
    info = getattr(backbone, "feature_info", None)
    if callable(getattr(info, "reduction", None)):
        values = info.reduction()
    elif isinstance(info, (list, tuple)) and info and all(isinstance(f, dict) and "reduction" in f for f in info):
        values = [f["reduction"] for f in info]
    else:
        values = None
    return max(int(v) for v in values) if values else None


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
        self.image, self.map, self.steps, self.steps_of_map = (
            (key, id(self)) for key in (_IMAGE, _MAP, _STEPS, _STEPS_OF_MAP))

    def install(self, context: CallContext) -> list[torch.utils.hooks.RemovableHandle]:
        def see_image(module, args, output) -> None:
            # After the embedding ran: the call starts at its first convolution and forgets what came before it.
            image = args[0] if args else None
            context.values[self.image] = (tuple(int(s) for s in image.shape[-2:])
                                          if isinstance(image, torch.Tensor) and image.dim() == 4 else None)

        def see_step(module, args, output) -> None:
            step = stem_step(module, args, output)
            if step is not None:
                context.values.setdefault(self.steps, []).append(step)

        def see(module, args, output) -> None:
            context.values[self.map] = tuple(int(s) for s in output.shape[-2:]) if output.dim() == 4 else None
            context.values[self.steps_of_map] = context.values.pop(self.steps, None)

        return [self.embed.register_forward_hook(see_image), self.embed.proj.register_forward_hook(see),
                *(module.register_forward_hook(see_step) for module in self.stem)]

    def _stride(self, context: CallContext, grid: tuple[int, int]) -> tuple[float, float]:
        """Pixels between two cells of the map, per axis (the module docstring says how they are read)."""
        name = type(self.model).__name__
        image = context.values.get(self.image)
        if image is None:
            raise NotPlaceable(f"the embedding of {name} took no [B, C, H, W] image vitmad saw, so it cannot tell "
                               f"how many pixels apart its tokens are; {_ADVICE}")
        # The map the projection sees: the backbone's, padded up to a multiple of patch_size under dynamic_img_pad.
        pad = tuple(int(p) for p in self.embed.patch_size) if getattr(self.embed, "dynamic_img_pad", False) \
            else (1, 1)
        declared = _declared_reduction(self.embed.backbone)
        if declared is not None:  # a timm backbone that declares it: its stages' strides, not what hooks see
            for size, side, multiple in zip(image, grid, pad):
                sides = {math.floor(size / declared), math.ceil(size / declared)}
                if side not in sides | {-(-s // multiple) * multiple for s in sides}:
                    raise NotPlaceable(
                        f"the backbone of {name} declares a stride of {declared} px for the map it returns (its "
                        f"feature_info), but made a {grid[0]}x{grid[1]} map of the {image[0]}x{image[1]} image its "
                        f"embedding took; {_ADVICE}"
                    )
            return float(declared), float(declared)
        steps = context.values.get(self.steps_of_map)
        return tuple(float(stem_stride(size, side, axis, self.model, None if steps is None else
                                       [step[a] for step in steps], multiple, advice=_ADVICE,
                                       embedding="the token map (its HybridEmbed's backbone output)"))
                     for a, (size, side, multiple, axis) in enumerate(zip(image, grid, pad, ("height", "width"))))

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
