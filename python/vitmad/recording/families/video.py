"""Video transformers: tubelets on a frames x rows x columns grid, attended jointly or divided in space and time.

transformers ``VideoMAEModel``, ``VivitModel``, ``TimesformerModel`` and the encoder of ``VJEPA2Model`` (and their
heads). A tubelet of ``tt`` frames by ``p x p`` pixels at frame ``f``, row ``r``, column ``c`` of the embedding's
output stands at ``((r + 0.5) * p, (c + 0.5) * p)`` pixels and ``(f + 0.5) * tt`` frames, the centre of its input
frames (tubelet 2: frames 1, 3, 5, ...; docs/definition.md, video). Every call is folded onto the whole grid,
``[B, H, frames * grid_h * grid_w]`` in (frame, row, column) order, whatever the call's own token order:

- joint space-time attention (``"space-time"``): VideoMAE and V-JEPA 2 attend over the tubelets in (frame, row,
  column) order, ViViT with a CLS token first; TimeSformer's ``joint_space_time`` over a CLS token and the
  patches in (row, column, frame) order, time fastest;
- TimeSformer's divided attention: each block first attends in time (``"time"``: ``[B * grid_h * grid_w, heads,
  frames, frames]``, one call row per patch position, images outermost), then in space (``"space"``: ``[B *
  frames, heads, 1 + grid_h * grid_w, ...]``, one row per frame, each with its own copy of CLS). A time call's
  tokens share one spatial position, so its spatial MAD is 0; a space call's share one frame, so its temporal
  MAD is 0: both are measured like any other, not assumed. ``space_only`` runs each frame on its own (a batch
  of ``B * frames`` images), as a space call.

The grid is read from the tubelet (or, for TimeSformer, patch) embedding's output in each call; TimeSformer's
blocks reshape with ``config.num_frames``, which is its frame count. Left out, with the reason
(``rec.skipped`` when named): V-JEPA 2's predictor (context tokens chosen by masks, then mask tokens) and its
attentive pooler (learned queries; its self-attention layers belong to the classification head, not the
encoder), and VideoMAE's pretraining decoder (the visible tubelets, then the mask tokens). VideoMAE with
``bool_masked_pos`` (dropped tubelets) is refused.
"""

from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass

import torch
from torch import nn

from ..module_index import named_module_list
from ..placement import (
    CallContext,
    LayerGeometry,
    LayerPlacer,
    NotPlaceable,
    Placement,
    cell_centres,
    on_device,
    read_only,
)
from .plain import is_embedding_projection

__all__ = ["placer", "VideoPlacer"]

_VIDEOMAE = "transformers.models.videomae.modeling_videomae"
_VIVIT = "transformers.models.vivit.modeling_vivit"
_TIMESFORMER = "transformers.models.timesformer.modeling_timesformer"
_VJEPA2 = "transformers.models.vjepa2.modeling_vjepa2"

# Attention class -> tokens before the tubelets (joint space-time attention in (frame, row, column) order).
_JOINT = {(_VIDEOMAE, "VideoMAESelfAttention"): 0, (_VIVIT, "VivitAttention"): 1, (_VJEPA2, "VJEPA2RopeAttention"): 0}
_SKIPPED = {
    (_VJEPA2, "VJEPA2PoolerCrossAttention"): "V-JEPA 2 attentive pooler: learned queries without a position",
    (_VJEPA2, "VJEPA2PoolerSelfAttention"): "V-JEPA 2 attentive pooler: part of the classification head, not the "
                                            "video encoder",
}
_PREDICTOR = (_VJEPA2, "VJEPA2Predictor")
# VideoMAEForPreTraining's decoder attends over the visible tubelets in index order, then the mask tokens in index
# order (each with its own cell's position embedding): per video by bool_masked_pos, not the (frame, row, column)
# order of the encoder, which its token count (the whole grid) would pass for.
_VIDEOMAE_DECODER = (_VIDEOMAE, "VideoMAEDecoder")
_GRID = "video.grid"


def _key(module: nn.Module) -> tuple[str, str]:
    return type(module).__module__, type(module).__name__


@dataclass(frozen=True)
class _Grid:
    """The tubelet grid of one forward call, read from the embedding convolution."""

    batch: int
    frames: int
    size: tuple[int, int]  # (grid_h, grid_w)
    stride: tuple[float, float]  # pixels per tubelet (height, width)
    frame_stride: int  # input frames per tubelet


class _Embedding:
    """The hook on a video model's embedding convolution that puts each call's :class:`_Grid` in the context.

    Args:
        model: the model, named in messages.
        conv: its tubelet ``Conv3d``, or the per-frame patch ``Conv2d`` of TimeSformer.
        frames: the frame count of a per-frame ``Conv2d`` (TimeSformer's ``config.num_frames``); None for a
            ``Conv3d``.
        video_module: for a per-frame ``Conv2d``, the module that folds the video ``[B, T, C, H, W]`` into
            ``B * T`` images before it (TimeSformer's patch embedding): its input tells the call's frame count,
            which may differ from ``frames`` (TimeSformer interpolates its time embeddings).
    """

    def __init__(self, model: nn.Module, conv: nn.Module, frames: int | None, video_module: nn.Module | None = None):
        self.model, self.conv, self.frames, self.video_module = model, conv, frames, video_module
        self._context: CallContext | None = None
        # (B, T) of the video video_module took last, until the convolution reads it. Not in the context's values:
        # the call starts at the convolution (recorder._first_convolution), which clears them.
        self._video_shape: tuple[int, int] | None = None

    def install(self, context: CallContext) -> list[torch.utils.hooks.RemovableHandle]:
        # Every layer's placer shares this hook: one per recording.
        if self._context is context:
            return []
        self._context = context

        def see(module, args, output) -> None:
            kernel, stride = tuple(module.kernel_size), tuple(module.stride)
            if kernel != stride:
                raise RuntimeError(
                    f"vitmad.record: the embedding of {type(self.model).__name__} has kernel {list(kernel)} and "
                    f"stride {list(stride)}; vitmad places tubelets of a convolution whose kernel is its stride"
                )
            if self.frames is None:  # Conv3d: [B, C, frames, grid_h, grid_w]
                batch, frames, frame_stride = int(output.shape[0]), int(output.shape[2]), int(kernel[0])
            else:  # TimeSformer: every frame embedded as an image, [B * frames, C, grid_h, grid_w]
                video, self._video_shape = self._video_shape, None
                frames = self.frames if video is None else video[1]
                if int(output.shape[0]) % frames:
                    raise RuntimeError(
                        f"vitmad.record: the patch embedding of {type(self.model).__name__} embedded "
                        f"{int(output.shape[0])} frames, not a multiple of the video's {frames} frames"
                    )
                batch, frame_stride = int(output.shape[0]) // frames, 1
            context.values[_GRID] = _Grid(batch, frames, (int(output.shape[-2]), int(output.shape[-1])),
                                          (float(kernel[-2]), float(kernel[-1])), frame_stride)

        handles = [self.conv.register_forward_hook(see)]
        if self.video_module is not None:
            def see_video(module, args, kwargs) -> None:
                video = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
                if video is not None and video.dim() == 5:  # [B, T, C, H, W]
                    self._video_shape = (int(video.shape[0]), int(video.shape[1]))

            handles.append(self.video_module.register_forward_pre_hook(see_video, with_kwargs=True))
        return handles


@functools.lru_cache(maxsize=64)
def _layout(kind: str, frames: int, size: tuple[int, int], stride: tuple[float, float], frame_stride: int,
            prefix: int) -> tuple[torch.Tensor, ...]:
    """Where the tokens of each group of a call are (read-only tensors, cached per grid).

    A call's leading dim is ``B * G``, images outermost; group ``g`` holds ``n`` tokens. Returns the first
    group's spatial and temporal positions (``[n, 2]``, ``[n, 1]``: a call with one group uses them as they are),
    then every group's, ``[G, n, 2]`` (pixels) and ``[G, n, 1]`` (frames), NaN rows for tokens without a
    position, and ``slot`` ``[frames * grid_h * grid_w]``: where tubelet (frame, row, column) sits among the
    ``G * n`` slots of one image.
    """
    patches = size[0] * size[1]
    grid = torch.arange(frames * patches).view(frames, patches)  # tubelet index, (frame, row, column) order
    cls = torch.full((frames, 1), -1)
    tokens = {
        "space-time": torch.cat([torch.full((prefix,), -1), grid.reshape(-1)])[None],  # [1, P + F * hw]
        "space-time, frames fastest": torch.cat([torch.full((1,), -1), grid.t().reshape(-1)])[None],
        "time": grid.t(),  # [hw, F]: one group per patch position
        "space": torch.cat([cls, grid], dim=1),  # [F, 1 + hw]: one group per frame, each with its CLS copy
    }[kind]
    cells = cell_centres(*size, stride).reshape(patches, 2).repeat(frames, 1)
    times = ((torch.arange(frames, dtype=torch.float64) + 0.5) * frame_stride).repeat_interleave(patches)[:, None]
    known = tokens >= 0
    at = tokens.clamp(min=0)
    positions = torch.where(known[..., None], cells[at], float("nan"))
    time_positions = torch.where(known[..., None], times.to(torch.float32)[at], float("nan"))
    slot = torch.empty(frames * patches, dtype=torch.long)
    slot[tokens[known]] = torch.arange(tokens.numel()).view(tokens.shape)[known]
    # With one group, every layer's call uses positions[0] and time_positions[0]: those views are made here, once,
    # so that a GPU gets one copy of them (on_device), not one per layer.
    group_positions, group_times = positions[0], time_positions[0]
    return read_only(group_positions, group_times, positions, time_positions, slot, positions=4)


class VideoPlacer(LayerPlacer):
    """Places the tokens of one attention call of a video transformer (``[B * G, heads, n, n]``).

    Args:
        model: the model, named in messages.
        embedding: the hook that reads each call's tubelet grid.
        kind: ``"space-time"`` (tubelets in (frame, row, column) order after ``prefix`` tokens), ``"space-time,
            frames fastest"`` (TimeSformer's joint attention), ``"time"`` or ``"space"`` (TimeSformer's divided
            attention).
        prefix: tokens without a position before the tubelets (``"space-time"`` only).
        divided: a block of TimeSformer's divided space-time attention, which groups its tokens by the configured
            frame count (``_Embedding.frames``), not the video's.
    """

    def __init__(self, model: nn.Module, embedding: _Embedding, kind: str, prefix: int = 0, divided: bool = False):
        self.model, self.embedding, self.kind, self.prefix, self.divided = model, embedding, kind, prefix, divided

    def install(self, context: CallContext) -> list[torch.utils.hooks.RemovableHandle]:
        return self.embedding.install(context)

    def place(self, context: CallContext, lead: torch.Size, num_queries: int, num_keys: int) -> Placement:
        grid = context.values.get(_GRID)
        if grid is None:
            raise NotPlaceable("it ran before the video embedding, so its tubelet grid is unknown")
        if self.divided and grid.frames != self.embedding.frames:
            # TimeSformer's divided blocks group the tokens by config.num_frames, whatever the video holds: with
            # other frame counts its "time" groups are runs of patches, not frames.
            raise NotPlaceable(
                f"TimeSformer's divided space-time attention groups its tokens by config.num_frames = "
                f"{self.embedding.frames}, and this video has {grid.frames} frames, so its groups are not frames; "
                f"record videos of {self.embedding.frames} frames (attention_type joint_space_time and space_only "
                "take any frame count)"
            )
        patches = grid.size[0] * grid.size[1]
        groups, tokens, described = {
            "space-time": (1, self.prefix + grid.frames * patches,
                           (f"{self.prefix} prefix tokens then " if self.prefix else "")
                           + f"the {grid.frames}x{grid.size[0]}x{grid.size[1]} tubelets"),
            "space-time, frames fastest": (1, 1 + grid.frames * patches,
                                           f"CLS then the {grid.size[0]}x{grid.size[1]}x{grid.frames} patches"),
            "time": (patches, grid.frames, f"{grid.frames} frames of each of the {patches} patch positions"),
            "space": (grid.frames, 1 + patches, f"CLS and the {patches} patches of each of {grid.frames} frames"),
        }[self.kind]
        if len(lead) != 2 or num_queries != num_keys or num_queries != tokens or lead[0] != grid.batch * groups:
            raise NotPlaceable(
                f"its attention has shape [{', '.join(map(str, lead))}, {num_queries}, {num_keys}]; its "
                f"{self.kind} attention over {grid.batch} video{'s' if grid.batch != 1 else ''} of {described} gives "
                f"[{grid.batch * groups}, heads, {tokens}, {tokens}]"
                + (" (masked or dropped tubelets are not supported)" if self.kind == "space-time" else "")
            )
        group_positions, group_times, positions, time_positions, slot = _layout(
            self.kind, grid.frames, grid.size, grid.stride, grid.frame_stride, self.prefix)
        if groups > 1:  # one set per row of the call: [B * G, 1, n, K]
            positions = positions.repeat(grid.batch, 1, 1).unsqueeze(1)
            time_positions = time_positions.repeat(grid.batch, 1, 1).unsqueeze(1)
        else:
            positions, time_positions = group_positions, group_times
        batch, heads = grid.batch, int(lead[1])

        def fold(values: torch.Tensor) -> torch.Tensor:
            values = values.reshape(batch, groups, heads, tokens).transpose(1, 2).reshape(batch, heads, -1)
            return values.index_select(-1, on_device(slot, values.device))

        attention = "space-time" if self.kind.startswith("space-time") else self.kind
        geometry = LayerGeometry(grid.size, grid.stride, attention, heads, frames=grid.frames,
                                 frame_stride=float(grid.frame_stride))
        return Placement(positions, None, fold, geometry, time_positions=time_positions)


# One embedding hook per model, shared by its layers' placers.
_EMBEDDINGS: weakref.WeakKeyDictionary[nn.Module, _Embedding] = weakref.WeakKeyDictionary()


def _embedding(model: nn.Module, frames: int | None) -> _Embedding | None:
    """The video embedding of ``model``: its first convolution named as a patch embedding's projection."""
    known = _EMBEDDINGS.get(model)
    if known is not None and known.frames == frames:
        return known
    found = next(((name, module) for name, module in named_module_list(model)
                  if is_embedding_projection(name, module)), None)
    if found is None:
        return None
    name, conv = found
    # A per-frame convolution's parent takes the video whole (TimeSformer's patch embedding).
    video_module = model.get_submodule(name.rpartition(".")[0]) if frames is not None and "." in name else None
    _EMBEDDINGS[model] = _Embedding(model, conv, frames, video_module)
    return _EMBEDDINGS[model]


def placer(model: nn.Module, name: str, module: nn.Module):
    """The placer of a video transformer's attention module, a Skip for its predictor and pooler, or None."""
    from . import Skip

    key = _key(module)
    if key not in _JOINT and key not in _SKIPPED and key != (_TIMESFORMER, "TimesformerSelfAttention"):
        return None
    if key in _SKIPPED:
        return Skip(_SKIPPED[key])
    modules = dict(named_module_list(model))
    parts = name.split(".")
    ancestors = [modules[".".join(parts[:i])] for i in range(len(parts))]
    if any(_key(a) == _PREDICTOR for a in ancestors):
        return Skip("V-JEPA 2 predictor: context tokens chosen by masks and mask tokens, not the encoder's tubelets")
    if any(_key(a) == _VIDEOMAE_DECODER for a in ancestors):
        return Skip("VideoMAE pretraining decoder: the visible tubelets, then the mask tokens, each in the order "
                    "bool_masked_pos leaves them, not the encoder's (frame, row, column) order; vitmad does not "
                    "place it")
    if key in _JOINT:
        embedding = _embedding(model, None)
        return None if embedding is None else VideoPlacer(model, embedding, "space-time", _JOINT[key])
    # TimeSformer: the block's attention type and the attribute the module hangs from say what it attends over.
    block = ancestors[-2] if len(ancestors) >= 2 else None
    if block is None or not hasattr(block, "attention_type"):
        return None
    embedding = _embedding(model, int(block.config.num_frames))
    if embedding is None:
        return None
    if parts[-2] == "temporal_attention":
        kind = "time"
    else:
        kind = {"divided_space_time": "space", "space_only": "space"}.get(block.attention_type,
                                                                          "space-time, frames fastest")
    return VideoPlacer(model, embedding, kind, divided=block.attention_type == "divided_space_time")
