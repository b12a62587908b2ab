"""The memory attention of SAM2-video, EdgeTAM-video and SAM3-tracker-video (transformers ``Sam2VideoModel``,
``EdgeTamVideoModel``, ``Sam3TrackerVideoModel``; SAM3's memory attention is SAM2's line for line).

On a frame that is not a conditioning frame, ``<X>MemoryAttention`` conditions the current frame's image tokens on
the memory bank. Each of its layers runs

- ``self_attn``: self-attention over the current frame's tokens, ``[B, heads, h * w, h * w]``. They are
  ``current_vision_feats[-1]``: ``get_image_features`` flattens the vision encoder's last ``fpn_hidden_states`` map
  row-major (``flatten(2).permute(2, 0, 1)``, its 1x1 ``conv_s0`` / ``conv_s1`` touch only levels 0 and 1), and the
  memory attention only adds a position embedding, moves the batch first and splits the heads; its 2-D RoPE
  rotates q and k, it moves no token. The vision encoder's FPN keeps its last ``num_feature_levels`` levels from
  high to low resolution, so that map is the one of backbone stage ``num_feature_levels - 1`` (the neck's top-down
  sum adds the next stage's map upsampled 2x nearest, on the same grid). Placed, when named in ``layers=`` (the
  default searches the vision encoder alone: the memory attention is outside it), at the centre of each cell of
  that map, the stride read from the backbone: Hiera's ``patch_stride`` times its ``query_stride`` for each
  pooling stage up to that stage (SAM2), the reduction a timm backbone's ``feature_info`` reports for that stage
  (EdgeTAM's RepViT), checked in every call against the image the vision encoder ran on (``detr_encoder.py``'s
  map placer). The model runs each object alone (``batch_size=1``), so an object's call has batch 1.
  Sam3TrackerVideo's ``get_image_features`` drops the vision encoder's last FPN level first, so its map is the
  neck's last but one level, which resamples the ViT's patch grid by its scale factor: stride ``patch_size /
  scale_factor`` (as SAM3's DETR encoder, ``detr_encoder.py``).
- ``cross_attn_image``: cross-attention from those tokens to the memory bank: the memory tokens of other frames
  (their maps through the memory encoder, EdgeTAM's compressed by its perceiver) followed by object-pointer
  tokens. Its keys are no cells of the current frame: skipped with that reason.
"""

from __future__ import annotations

import torch
from torch import nn

from ..placement import CallContext, NotPlaceable, Placement, RefusingPlacer
from .detr_encoder import _Map, _MapPlacer, _reported_reductions, modeling_suffix
from .stages import defined_in, innermost_on_path

__all__ = ["FpnMapPlacer", "hiera_stride", "placer"]

# modeling module suffix -> the class name prefix of its video model.
_MODELS = {"modeling_sam2_video": "Sam2Video", "modeling_edgetam_video": "EdgeTamVideo",
           "modeling_sam3_tracker_video": "Sam3TrackerVideo"}
# The vision encoder each video model holds (transformers builds it from its config: AutoModel).
_VISION = {"modeling_sam2_video": ("Sam2VisionModel", "modeling_sam2"),
           "modeling_edgetam_video": ("EdgeTamVisionModel", "modeling_edgetam"),
           "modeling_sam3_tracker_video": ("Sam3VisionModel", "modeling_sam3")}

_CROSS = ("memory attention cross-attention (cross_attn_image): the current frame's tokens attend to the memory "
          "bank, the memory tokens of other frames (their maps through the memory encoder) and object-pointer "
          "tokens, keys that are no cells of the current frame's map, so it has no MAD")


def placer(model: nn.Module, name: str, module: nn.Module):
    from . import Skip

    suffix = modeling_suffix(module)
    prefix = _MODELS.get(suffix)
    if prefix is None:
        return None
    found = innermost_on_path(model, name, lambda m: defined_in(m, f"{prefix}MemoryAttentionLayer", suffix))
    if found is None:
        return None
    layer_name, layer = found
    if module is getattr(layer, "cross_attn_image", None):
        return Skip(_CROSS)
    if module is not getattr(layer, "self_attn", None):
        return None
    # <video model>.memory_attention.layers.<i>
    video_name = layer_name.rpartition(".")[0].rpartition(".")[0].rpartition(".")[0]
    video = model.get_submodule(video_name) if video_name else model
    memory = getattr(video, "memory_attention", None)
    vision = getattr(video, "vision_encoder", None)
    vision_class, vision_suffix = _VISION[suffix]
    if not defined_in(video, f"{prefix}Model", suffix) or not isinstance(memory, nn.Module) \
            or not any(other is layer for other in getattr(memory, "layers", ())) \
            or not isinstance(vision, nn.Module) or not defined_in(vision, vision_class, vision_suffix):
        return RefusingPlacer(f"it is a memory attention layer recorded without the {prefix}Model and its "
                              f"{vision_class} that give it the current frame's map, so the map's stride is "
                              f"unknown; record the {prefix}Model that holds it")
    if suffix == "modeling_sam3_tracker_video":
        return _sam3_placer(vision, video)
    levels, convs = int(vision.num_feature_levels), len(vision.neck.convs)
    if not 1 <= levels <= convs:
        return RefusingPlacer(f"its vision encoder keeps {levels} FPN levels of its neck's {convs}, so vitmad does "
                              "not know which backbone stage the memory attention's map comes from")
    stage = levels - 1  # the neck's levels run low to high resolution; the kept ones are reversed: the last is this
    if suffix == "modeling_sam2_video":
        config = vision.backbone.config
        stride, source = hiera_stride(config.patch_stride, config.query_stride, config.num_query_pool_stages, stage)
    else:
        reported = _reported_reductions(vision.backbone)
        if not reported or len(reported) != convs:
            return RefusingPlacer(
                f"its vision encoder's backbone reports {'no reductions' if not reported else reported} for the "
                f"{convs} maps its neck takes (vitmad reads them from a timm backbone's feature_info), so the "
                "stride of the memory attention's map is unknown")
        stride, source = reported[stage], (f"the reduction its timm backbone's feature_info reports for map "
                                           f"{stage} (the vision encoder's last kept FPN level)")
    if stride is None:
        return RefusingPlacer(source)
    return FpnMapPlacer(vision, -1, stride, source, video=video)


def _sam3_placer(vision: nn.Module, video: nn.Module):
    # Sam3TrackerVideoModel.get_image_features keeps fpn_hidden_states[:-1]: the memory attention's map is the
    # neck's last but one level, the ViT's patch grid resampled by that level's scale factor.
    layers = vision.neck.fpn_layers
    if len(layers) < 2:
        return RefusingPlacer(f"its vision encoder's neck has {len(layers)} FPN level(s); Sam3TrackerVideoModel drops "
                              "the last and hands the last of the others to the memory attention, so its map is "
                              "unknown")
    level = len(layers) - 2
    patch, scale = vision.config.backbone_config.patch_size, float(layers[level].scale_factor)
    source = (f"the ViT's patch_size ({patch}) over the scale factor ({scale:g}) of neck.fpn_layers.{level}, the "
              "level Sam3TrackerVideoModel hands its memory attention")
    return FpnMapPlacer(vision, -2, patch / scale, source, video=video, resampled=(int(patch), scale))


def hiera_stride(patch, query, pooling_stages: int, stage: int) -> tuple[int | None, str]:
    """The stride of Hiera's stage ``stage`` (transformers' ``Sam2HieraDetModel``, the ``sam2`` package's
    ``Hiera``): its patch embedding's stride ``patch`` times the query stride ``query`` of each pooling stage up to
    it (stage ``s`` max-pools its first block's queries when ``0 < s <= pooling_stages``); None and the reason
    where a stride differs between the axes. ``patch`` and ``query`` are ints or (height, width) pairs."""
    patch = [patch, patch] if isinstance(patch, int) else list(patch)
    query = [query, query] if isinstance(query, int) else list(query)
    if patch[0] != patch[1] or query[0] != query[1]:
        return None, (f"its backbone's strides differ between height and width (patch_stride {patch}, "
                      f"query_stride {query}), which vitmad does not place")
    pools = min(stage, int(pooling_stages))
    stride = int(patch[0]) * int(query[0]) ** pools
    return stride, (f"Hiera's patch_stride ({patch[0]}) times query_stride ({query[0]}) for each of the {pools} "
                    f"pooling stages up to stage {stage}, the vision encoder's last kept FPN level")


class FpnMapPlacer(_MapPlacer):
    """The map of the vision encoder's ``fpn_hidden_states[level]`` (-1: the last), seen as the encoder returns it;
    ``field`` names another entry of its output, read by key where the output is a dict (the ``sam2`` package's
    ``ImageEncoder`` returns ``{"backbone_fpn": [...], ...}``). ``video``: the video model whose forward runs both
    (transformers'), where a forward that takes the frame's features from its session's cache runs no encoder."""

    def __init__(self, vision: nn.Module, level: int, stride: float, source: str, field: str = "fpn_hidden_states",
                 video: nn.Module | None = None, resampled: tuple[int, float] | None = None):
        super().__init__(vision, "output", stride, source, resampled=resampled)
        self.level, self.field, self.video = level, field, video

    def install(self, context: CallContext):
        def see_output(module, args, output) -> None:
            # transformers' ModelOutput is a dict too, holding the field as a key where it is set.
            maps = output.get(self.field) if isinstance(output, dict) else getattr(output, self.field, None)
            last = maps[self.level] if isinstance(maps, (list, tuple)) and len(maps) >= -self.level else None
            context.values[self.key] = None
            if isinstance(last, torch.Tensor) and last.dim() == 4:
                context.values[self.key] = _Map(int(last.shape[0]), (int(last.shape[2]), int(last.shape[3])), None)

        def forget_map(module, args) -> None:
            # A forward of the video model that runs no vision encoder (the frame's features from the session's
            # cache) starts no call of its own: its memory attention joined the call before, on that call's map.
            context.values[self.key] = None

        handles = [self.watch.register_forward_hook(see_output)]
        if self.video is not None:
            handles.append(self.video.register_forward_pre_hook(forget_map))
        return handles

    def place(self, context: CallContext, lead: torch.Size, num_queries: int, num_keys: int) -> Placement:
        if context.values.get(self.key) is None:
            # The model reuses a frame's features from its inference session's cache: the vision encoder did not
            # run in this call, so neither the map nor the image it came from were seen.
            raise NotPlaceable(
                f"its {type(self.watch).__name__} did not run in this call (the frame's features came from the "
                "inference session's cache, or were given), so the map its tokens come from and the image's size "
                "are unknown; record calls that encode their frame"
            )
        return super().place(context, lead, num_queries, num_keys)
