"""The SVTR neck of PaddleOCR's text recognisers in transformers: PP-OCRv5 mobile and server, PP-OCRv6 small.

``<X>ForTextRecognition`` runs a CNN backbone (PP-LCNetV3, HGNetV2 or PP-LCNetV4), takes its last feature map
(``feature_maps[-1]``), averages it with ``F.avg_pool2d(map, (3, 2))`` (``<X>Model.forward``: kernel = stride, floor),
then its head's ``<X>EncoderWithSVTR`` maps the channels with stride-1 convolutions (``conv_block[0]`` and
``conv_block[1]``; PP-OCRv6 small adds a depthwise ``conv_block[2]`` of the same size to the second), flattens the
``[B, C, h, w]`` map row-major (``flatten(2).transpose(1, 2)``) and runs its ``svtr_block`` layers: global
self-attention over those ``h * w`` tokens, no other token, without a mask.

A text line's backbone strides differ in height and width (``[2, 1]`` stages halve the rows alone: PP-OCRv5's 48 px
high lines end as one row of tokens). Token ``(r, c)`` sits at the centre of its stride cell, ``((r + 0.5) * 3 *
s_h, (c + 0.5) * 2 * s_w)`` px (``docs/definition.md``, "Beyond one grid"): ``(s_h, s_w)`` is the backbone's stride at
its last output stage, read from the backbone's config, from which it builds its strided convolutions (stem, then
each stage's), times the pooling's ``(3, 2)``. It is checked in every call: each side of the backbone's last map
must be the floor or the ceiling of the image's side over the backbone's stride, and the map the attention runs on
must be the pooled map (``floor(side / 3)``, ``floor(side / 2)``), else the call is refused.

PP-OCRv6 tiny's head has no attention (depthwise and pointwise 1-D convolutions), and ``<X>Model`` alone is the
backbone and the pooling: neither has a layer to record.
"""

from __future__ import annotations

import torch
from torch import nn

from ..module_index import module_list
from ..placement import CallContext, LayerPlacer, NotPlaceable, Placement, RefusingPlacer
from .detr_encoder import modeling_suffix
from .stages import defined_in, grid_placement, innermost_on_path, pair

__all__ = ["placer"]

# modeling module suffix -> the class name prefix of its models.
_MODELS = {"modeling_pp_ocrv5_mobile_rec": "PPOCRV5MobileRec", "modeling_pp_ocrv5_server_rec": "PPOCRV5ServerRec",
           "modeling_pp_ocrv6_small_rec": "PPOCRV6SmallRec"}
# F.avg_pool2d(feature_maps[-1], (3, 2)) in <X>Model.forward: (rows, columns), kernel = stride, floor.
_POOL = (3, 2)


def _product(strides) -> tuple[int, int]:
    rows, cols = 1, 1
    for stride in strides:
        sy, sx = pair(stride)
        rows, cols = rows * sy, cols * sx
    return rows, cols


def _stage_strides(backbone: nn.Module) -> list[tuple[int, int]] | None:
    """Per entry of the backbone's ``stage_names`` (the stem, then each stage), the stride of its strided
    convolutions, as its modeling file builds them from its config; None for a backbone vitmad does not know."""
    config = backbone.config
    name = type(backbone).__name__
    if name == "HGNetV2Backbone":  # stem1 ... stem4 take stem_strides; a stage's downsample its stride, if any
        stages = [pair(s) if down else (1, 1)
                  for s, down in zip(config.stage_downsample_strides, config.stage_downsample)]
        return [_product(config.stem_strides), *stages]
    if name in ("PPLCNetV3Backbone", "PPLCNetV4Backbone"):  # each block's depthwise convolution takes its stride
        stages = [_product(block[3] for block in blocks) for blocks in config.block_configs]
        if name == "PPLCNetV3Backbone":
            stem = pair(config.stem_stride)
        else:  # the large stem takes stem_strides; the small one is two convolutions of stride 2
            stem = _product(config.stem_strides) if config.stem_type == "large" else (4, 4)
        return [stem, *stages]
    return None


def _backbone_stride(backbone: nn.Module) -> tuple[tuple[int, int], str] | str:
    """``((s_h, s_w), source in words)`` of the backbone's last output map, or why it is unknown."""
    strides = _stage_strides(backbone)
    names = list(getattr(backbone, "stage_names", ()))
    last = list(getattr(backbone, "out_features", ()) or ())[-1:]
    if strides is None or len(strides) != len(names) or not last or last[0] not in names:
        return (f"its backbone ({type(backbone).__name__}) is not one whose strides vitmad reads (HGNetV2, "
                "PP-LCNetV3, PP-LCNetV4), so the pixel stride of the map it attends over is unknown")
    index = names.index(last[0])
    return _product(strides[:index + 1]), f"the strides its {type(backbone).__name__} config gives up to {last[0]}"


def placer(model: nn.Module, name: str, module: nn.Module):
    suffix = modeling_suffix(module)
    prefix = _MODELS.get(suffix)
    if prefix is None or not defined_in(module, f"{prefix}Attention", suffix):
        return None
    found = innermost_on_path(model, name, lambda m: defined_in(m, f"{prefix}ForTextRecognition", suffix))
    recogniser = None if found is None else found[1]
    encoder = getattr(getattr(recogniser, "head", None), "encoder", None)
    backbone = getattr(getattr(recogniser, "model", None), "backbone", None)
    if encoder is None or backbone is None or not any(m is module for m in module_list(encoder)):
        return RefusingPlacer(
            f"it is an SVTR block recorded without the {prefix}ForTextRecognition whose backbone and pooling make "
            f"the map it attends over, so the map's pixel stride is unknown; record the {prefix}ForTextRecognition "
            "that holds it, or pass positions=<[N, 2] pixel position of each token>")
    stride = _backbone_stride(backbone)
    if isinstance(stride, str):
        return RefusingPlacer(stride + "; pass positions=<[N, 2] pixel position of each token>")
    return _SvtrPlacer(backbone, encoder.conv_block[1], *stride)


class _SvtrPlacer(LayerPlacer):
    """Places the row-major tokens of the map ``tokens`` (``conv_block[1]``) returns, the pooled last map of
    ``backbone``, whose stride is ``stride`` (``source`` says where it comes from)."""

    def __init__(self, backbone: nn.Module, tokens: nn.Module, stride: tuple[int, int], source: str):
        self.backbone, self.tokens, self.stride, self.source = backbone, tokens, stride, source
        self.key = f"svtr.maps.{id(backbone)}"

    def install(self, context: CallContext) -> list[torch.utils.hooks.RemovableHandle]:
        # The image is the call's (context.image_size: the input of the first convolution that ran, the stem's).
        def see_backbone(module, args, output) -> None:
            maps = getattr(output, "feature_maps", None)
            context.values[self.key + ".map"] = tuple(maps[-1].shape[-2:]) if maps else None

        def see_tokens(module, args, output) -> None:
            context.values[self.key + ".tokens"] = tuple(output.shape[-2:]) \
                if isinstance(output, torch.Tensor) and output.dim() == 4 else None

        return [self.backbone.register_forward_hook(see_backbone), self.tokens.register_forward_hook(see_tokens)]

    def place(self, context: CallContext, lead: torch.Size, num_queries: int, num_keys: int) -> Placement:
        image = context.image_size
        feature_map, grid = context.values.get(self.key + ".map"), context.values.get(self.key + ".tokens")
        if image is None or feature_map is None or grid is None:
            raise NotPlaceable(f"the backbone ({type(self.backbone).__name__}) or the encoder's conv_block[1] did "
                               "not run on an image before it in this call, so its tokens are unknown")
        for size, side, stride, axis in zip(image, feature_map, self.stride, ("height", "width")):
            if side not in (size // stride, -(-size // stride)):
                raise NotPlaceable(
                    f"the backbone's last map has {axis} {side} for an image {axis} of {size}, but a stride of "
                    f"{stride} px ({self.source}) gives {size // stride} or {-(-size // stride)}: a backbone whose "
                    "maps vitmad cannot follow; pass positions=<[N, 2] pixel position of each token>")
        pooled = (feature_map[0] // _POOL[0], feature_map[1] // _POOL[1])
        if grid != pooled:
            raise NotPlaceable(
                f"it attends over a {grid[0]}x{grid[1]} map, but the backbone's last map, {feature_map[0]}x"
                f"{feature_map[1]}, pooled by (3, 2) is {pooled[0]}x{pooled[1]}: a neck vitmad does not know; pass "
                "positions=<[N, 2] pixel position of each token>")
        stride = (float(self.stride[0] * _POOL[0]), float(self.stride[1] * _POOL[1]))
        return grid_placement(lead, num_queries, num_keys, grid=grid, stride=stride, attention="global")
