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
blocks reshape with ``config.num_frames``, which is its frame count.

Masked calls, each token at its own tubelet's cell, read per call from what the model received (hooks), and folded
onto the whole grid with the tubelets a call lacks absent (``Placement.present``):

- VideoMAE with ``bool_masked_pos``: ``VideoMAEEmbeddings`` keeps ``embeddings[~bool_masked_pos]`` reshaped to
  ``[B, K, C]``, each video's kept tubelets in index order (refused unless every video keeps the same count:
  the reshape would mix videos);
- ``VideoMAEForPreTraining``'s decoder (named in ``layers=``): the ``K`` visible tubelets in index order, then
  the mask tokens in index order, each with its own cell's position embedding: every tubelet once;
- V-JEPA 2's predictor (named in ``layers=``): the context tokens its ``context_mask`` chose and a mask token
  per index of its ``target_mask``, in the order of the ``position_mask`` its attention takes (sorted by index):
  index ``i`` is tubelet ``i`` of the encoder's sequence (refused where an index appears twice, in one mask or
  in both, as in the default forward: one tubelet cannot hold two values).

Left out, with the reason (``rec.skipped`` when named): V-JEPA 2's attentive pooler (learned queries; its
self-attention layers belong to the classification head, not the encoder).
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
from .embeddings import check_sequence
from .plain import is_embedding_projection

__all__ = ["placer", "VideoPlacer", "MaskedVideoMAEPlacer", "VideoMAEDecoderPlacer", "VJEPA2PredictorPlacer"]

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
_VIDEOMAE_MODEL = (_VIDEOMAE, "VideoMAEModel")
_VIDEOMAE_PRETRAINING = (_VIDEOMAE, "VideoMAEForPreTraining")
# VideoMAEForPreTraining's decoder attends over the visible tubelets in index order, then the mask tokens in index
# order (each with its own cell's position embedding): per video by bool_masked_pos, not the (frame, row, column)
# order of the encoder, which its token count (the whole grid) would pass for.
_VIDEOMAE_DECODER = (_VIDEOMAE, "VideoMAEDecoder")
_GRID = "video.grid"
# + a module's name: the tubelet index of each token of its call, [B, n] (or why it is not known), read this call.
_CELLS = "video.cells."


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


class GridSource:
    """What reads each call's :class:`_Grid` for a :class:`VideoPlacer` (its ``embedding``): it keeps the grid in the
    call's context under a key of its own. A model holding two video towers (a user's two-stream wrapper) has one
    per tower, and a layer reads its own tower's grid, not the last one that ran."""

    frames: int | None = None  # the frame count divided attention groups by (TimeSformer's); None: no such grouping

    @property
    def key(self) -> str:
        return f"{_GRID}.{id(self)}"

    def grid(self, context: CallContext) -> _Grid | None:
        """The grid read in the call in progress (None before the embedding ran)."""
        return context.values.get(self.key)


class _Embedding(GridSource):
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
        # The recording whose hook is on the convolution, and that hook.
        self._installed: tuple[CallContext, torch.utils.hooks.RemovableHandle] | None = None
        # (B, T) of the video video_module took last, until the convolution reads it. Not in the context's values:
        # the call starts at the convolution (towers.first_convolution), which clears them.
        self._video_shape: tuple[int, int] | None = None

    def install(self, context: CallContext) -> list[torch.utils.hooks.RemovableHandle]:
        # Every layer's placer shares this hook: one per recording. A recording entered again installs it again (its
        # exit removed the hook): keyed by the context alone, the second entry had no grid, and every layer refused.
        installed = self._installed
        if installed is not None and installed[0] is context and installed[1].id in self.conv._forward_hooks:
            return []

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
            context.values[self.key] = _Grid(batch, frames, (int(output.shape[-2]), int(output.shape[-1])),
                                          (float(kernel[-2]), float(kernel[-1])), frame_stride)

        handles = [self.conv.register_forward_hook(see)]
        self._installed = (context, handles[0])
        if self.video_module is not None:
            def see_video(module, args, kwargs) -> None:
                video = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
                if video is not None and video.dim() == 5:  # [B, T, C, H, W]
                    self._video_shape = (int(video.shape[0]), int(video.shape[1]))

            handles.append(self.video_module.register_forward_pre_hook(see_video, with_kwargs=True))
        return handles


def tubelet_positions(tokens: torch.Tensor, frames: int, size: tuple[int, int], stride: tuple[float, float],
                      frame_stride: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Where the tokens of a video's groups are: ``tokens`` ``[G, n]`` holds each slot's tubelet index in (frame,
    row, column) order, -1 for a token without a position (a class token). Returns ``[G, n, 2]`` pixel and
    ``[G, n, 1]`` frame positions (NaN rows for those), tubelet ``(f, r, c)`` at ``((r + 0.5) s_h, (c + 0.5) s_w)``
    px and ``(f + 0.5) frame_stride`` frames, and ``slot`` ``[frames * grid_h * grid_w]``: where each tubelet sits
    among the ``G * n`` slots."""
    patches = size[0] * size[1]
    cells = cell_centres(*size, stride).reshape(patches, 2).repeat(frames, 1)
    times = ((torch.arange(frames, dtype=torch.float64) + 0.5) * frame_stride).repeat_interleave(patches)[:, None]
    known = tokens >= 0
    at = tokens.clamp(min=0)
    positions = torch.where(known[..., None], cells[at], float("nan"))
    time_positions = torch.where(known[..., None], times.to(torch.float32)[at], float("nan"))
    slot = torch.empty(frames * patches, dtype=torch.long)
    slot[tokens[known]] = torch.arange(tokens.numel()).view(tokens.shape)[known]
    return positions, time_positions, slot


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
    positions, time_positions, slot = tubelet_positions(tokens, frames, size, stride, frame_stride)
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
        grid = self.embedding.grid(context)
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


def _by_index(mask: torch.Tensor, chosen: bool) -> torch.Tensor:
    """``[B, K]``: each video's tubelet indices where ``mask`` is ``chosen``, ascending, the order in which
    boolean indexing takes them (every video has the same count: :func:`_mask_refusal`)."""
    return (mask == chosen).nonzero()[:, 1].view(mask.shape[0], -1).cpu()


def _mask_refusal(mask, grid: _Grid | None, selector: str) -> str | None:
    """Why ``bool_masked_pos`` does not name the same count of this call's tubelets in every video (None when it
    does): ``selector`` takes ``tensor[~bool_masked_pos]`` and reshapes it to ``[B, -1, C]``."""
    if grid is None:
        return f"{selector} ran before the video embedding, so the tubelet grid bool_masked_pos indexes is unknown"
    tubelets = grid.frames * grid.size[0] * grid.size[1]
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        given = f"a {mask.dtype} tensor" if isinstance(mask, torch.Tensor) else type(mask).__name__
        return (f"bool_masked_pos is {given}; {selector} keeps tensor[~bool_masked_pos], the tubelets marked False "
                "only for a torch.bool mask: pass one")
    if tuple(mask.shape) != (grid.batch, tubelets):
        return (f"bool_masked_pos has shape {list(mask.shape)}; over {grid.batch} video(s) of "
                f"{grid.frames}x{grid.size[0]}x{grid.size[1]} tubelets it is [{grid.batch}, {tubelets}]")
    masked = mask.sum(1).cpu()
    if bool((masked != masked[0]).any()):
        return (f"bool_masked_pos masks {masked.tolist()} tubelets of the {grid.batch} videos; {selector} reshapes "
                "the kept tubelets of all videos to [B, -1, C], so where the counts differ a row holds tubelets of "
                "two videos: mask the same count in every video (as transformers asks)")
    return None


def _cells_placement(grid: _Grid, cells: torch.Tensor, heads: int, attention: str) -> Placement:
    """The placement of a call whose token ``j`` of video ``b`` is tubelet ``cells[b, j]`` (its (frame, row,
    column) index; ``cells`` ``[B, n]`` on the host, each tubelet at most once per video), folded onto the whole
    grid with the tubelets a video lacks absent."""
    patches = grid.size[0] * grid.size[1]
    tubelets = grid.frames * patches
    batch, count = cells.shape
    spatial = cell_centres(*grid.size, grid.stride).reshape(patches, 2).repeat(grid.frames, 1)
    times = ((torch.arange(grid.frames, dtype=torch.float64) + 0.5) * grid.frame_stride).repeat_interleave(patches)
    positions = spatial[cells].unsqueeze(1)  # [B, 1, n, 2]: shared by the heads
    time_positions = times.to(torch.float32)[cells][..., None].unsqueeze(1)  # [B, 1, n, 1]

    def fold(values: torch.Tensor) -> torch.Tensor:
        # values [B, H, n] -> [B, H, tubelets]: token j of video b goes to tubelet cells[b, j].
        index = cells.to(values.device).unsqueeze(1).expand(values.shape[0], values.shape[1], count)
        return values.new_full((*values.shape[:2], tubelets), float("nan")).scatter(-1, index, values)

    present = None
    if count < tubelets:
        present = torch.zeros(batch, tubelets, dtype=torch.bool).scatter_(1, cells, True)
    geometry = LayerGeometry(grid.size, grid.stride, attention, heads, frames=grid.frames,
                             frame_stride=float(grid.frame_stride))
    return Placement(positions, None, fold, geometry, present=present, time_positions=time_positions)


def _shared(context: CallContext, key: str, cells: torch.Tensor, heads: int, build) -> Placement:
    """The placement the layers of this call share for the same ``cells`` and head count, built once."""
    known = context.values.get(key)
    if known is not None and known[0] is cells and known[1] == heads:
        return known[2]
    placement = build()
    context.values[key] = (cells, heads, placement)
    return placement


class MaskedVideoMAEPlacer(VideoPlacer):
    """VideoMAE's encoder (``VideoMAEModel``, also inside ``VideoMAEForPreTraining``): the whole grid as
    :class:`VideoPlacer` places it, or, in a call given ``bool_masked_pos``, the ``K`` tubelets each video kept,
    in index order, at their own cells.

    Args:
        model: the model, named in messages.
        embedding: the hook that reads each call's tubelet grid.
        embeddings_name: qualified name of the ``VideoMAEEmbeddings`` that drop the masked tubelets.
        embeddings: that module.
    """

    def __init__(self, model: nn.Module, embedding: _Embedding, embeddings_name: str, embeddings: nn.Module):
        super().__init__(model, embedding, "space-time")
        self.embeddings_name, self.embeddings = embeddings_name, embeddings

    def install(self, context: CallContext) -> list[torch.utils.hooks.RemovableHandle]:
        key = _CELLS + self.embeddings_name

        def keep(module, args, kwargs, output) -> None:
            # Every layer's placer hooks the same embeddings: the first hook of the call reads them.
            if key in context.values:
                return
            mask = args[1] if len(args) > 1 else kwargs.get("bool_masked_pos")
            if mask is None:  # the whole grid, in (frame, row, column) order
                context.values[key] = None
                return
            grid = self.embedding.grid(context)
            refusal = _mask_refusal(mask, grid, type(module).__name__)
            if refusal is None:
                kept = grid.frames * grid.size[0] * grid.size[1] - int(mask[0].sum())
                if tuple(output.shape[:2]) != (grid.batch, kept):
                    refusal = (f"{type(module).__name__} returned {list(output.shape)} where bool_masked_pos keeps "
                               f"{kept} tubelets of each of {grid.batch} video(s)")
            context.values[key] = refusal or _by_index(mask, False)

        return [*super().install(context), self.embeddings.register_forward_hook(keep, with_kwargs=True)]

    def place(self, context: CallContext, lead: torch.Size, num_queries: int, num_keys: int) -> Placement:
        kept = context.values.get(_CELLS + self.embeddings_name)
        if kept is None:
            return super().place(context, lead, num_queries, num_keys)
        if isinstance(kept, str):
            raise NotPlaceable(f"it attends over the tubelets {self.embeddings_name} kept, and {kept}")
        grid = self.embedding.grid(context)
        batch, count = kept.shape
        tubelets = grid.frames * grid.size[0] * grid.size[1]
        check_sequence(lead, num_queries, num_keys, batch, count,
                       f"{self.embeddings_name} kept the {count} of {tubelets} tubelets bool_masked_pos leaves in "
                       f"each of {batch} video(s)")
        heads = int(lead[1])
        return _shared(context, "video.kept.placement", kept, heads, lambda: _cells_placement(
            grid, kept, heads, f"space-time over the {count} of {tubelets} tubelets kept"))


class VideoMAEDecoderPlacer(LayerPlacer):
    """A layer of ``VideoMAEForPreTraining``'s decoder: per video the visible tubelets in index order, then the
    mask tokens in index order, by the ``bool_masked_pos`` of the pretraining forward that runs it.

    Args:
        model: the model, named in messages.
        embedding: the hook that reads each call's tubelet grid.
        pretraining: the ``VideoMAEForPreTraining`` whose forward builds the decoder's tokens.
        decoder_name: qualified name of its ``VideoMAEDecoder``.
        decoder: that module.
    """

    def __init__(self, model: nn.Module, embedding: _Embedding, pretraining: nn.Module, decoder_name: str,
                 decoder: nn.Module):
        self.model, self.embedding, self.pretraining = model, embedding, pretraining
        self.decoder_name, self.decoder = decoder_name, decoder

    def install(self, context: CallContext) -> list[torch.utils.hooks.RemovableHandle]:
        key = _CELLS + self.decoder_name
        given: list = []  # the bool_masked_pos of the pretraining forward in progress

        def enter(module, args, kwargs) -> None:
            given[:] = [args[1] if len(args) > 1 else kwargs.get("bool_masked_pos")]

        def leave(*_) -> None:
            given.clear()

        def decode(module, args, kwargs) -> None:
            if key in context.values:  # every layer's placer hooks the decoder: the first of the call reads it
                return
            hidden = args[0] if args else kwargs.get("hidden_states")
            returned = args[1] if len(args) > 1 else kwargs.get("return_token_num")
            grid = self.embedding.grid(context)
            if not given:
                refusal = ("VideoMAEDecoder ran outside a forward of VideoMAEForPreTraining, so which of its tokens "
                           "are mask tokens, and of which tubelets, is unknown")
            else:
                refusal = _mask_refusal(given[0], grid, "VideoMAEForPreTraining")
            if refusal is None:
                masked, tubelets = int(given[0][0].sum()), grid.frames * grid.size[0] * grid.size[1]
                shape = list(hidden.shape) if isinstance(hidden, torch.Tensor) else type(hidden).__name__
                if shape[:2] != [grid.batch, tubelets] or not isinstance(returned, int) or returned != masked:
                    refusal = (f"VideoMAEDecoder took hidden states {shape} and return_token_num {returned}, where "
                               f"bool_masked_pos masks {masked} of {tubelets} tubelets of each of {grid.batch} "
                               f"video(s): [{grid.batch}, {tubelets}, C] and {masked}")
            if refusal is not None:
                context.values[key] = refusal
                return
            visible = _by_index(given[0], False)
            context.values[key] = (torch.cat([visible, _by_index(given[0], True)], 1), int(visible.shape[1]))

        return [*self.embedding.install(context),
                self.pretraining.register_forward_pre_hook(enter, with_kwargs=True),
                self.pretraining.register_forward_hook(leave, always_call=True),
                self.decoder.register_forward_pre_hook(decode, with_kwargs=True)]

    def place(self, context: CallContext, lead: torch.Size, num_queries: int, num_keys: int) -> Placement:
        order = context.values.get(_CELLS + self.decoder_name)
        if order is None:
            raise NotPlaceable(f"it ran before {self.decoder_name} in this call, so the order of its tokens is unknown")
        if isinstance(order, str):
            raise NotPlaceable(order)
        order, visible = order
        grid = self.embedding.grid(context)
        batch, count = order.shape
        check_sequence(lead, num_queries, num_keys, batch, count,
                       f"{self.decoder_name} took the visible tubelets and the mask tokens of {batch} video(s)")
        heads = int(lead[1])
        return _shared(context, "video.decoded.placement", order, heads, lambda: _cells_placement(
            grid, order, heads, f"space-time over the {visible} visible tubelets, then the {count - visible} mask "
                                "tokens"))


class VJEPA2PredictorPlacer(LayerPlacer):
    """A layer of V-JEPA 2's predictor: each token at the tubelet its index in the ``position_mask`` the layer's
    attention takes names (the index of the encoder's sequence its context token was gathered from, or its mask
    token predicts), in that order.

    Args:
        model: the model, named in messages.
        embedding: the hook that reads each call's tubelet grid (the encoder's).
        predictor: the ``VJEPA2Predictor``, whose ``encoder_hidden_states`` the indices select from.
        predictor_name: its qualified name.
        attention_name: qualified name of this layer's ``VJEPA2RopeAttention``.
        attention: that module.
    """

    def __init__(self, model: nn.Module, embedding: _Embedding, predictor: nn.Module, predictor_name: str,
                 attention_name: str, attention: nn.Module):
        self.model, self.embedding, self.predictor, self.predictor_name = model, embedding, predictor, predictor_name
        self.attention_name, self.attention = attention_name, attention

    def install(self, context: CallContext) -> list[torch.utils.hooks.RemovableHandle]:
        states_key, ids_key = _CELLS + self.predictor_name, _CELLS + self.attention_name

        def predict(module, args, kwargs) -> None:
            states = args[0] if args else kwargs.get("encoder_hidden_states")
            context.values[states_key] = list(states.shape) if isinstance(states, torch.Tensor) else None

        def attend(module, args, kwargs) -> None:
            context.values[ids_key] = args[1] if len(args) > 1 else kwargs.get("position_mask")

        return [*self.embedding.install(context),
                self.predictor.register_forward_pre_hook(predict, with_kwargs=True),
                self.attention.register_forward_pre_hook(attend, with_kwargs=True)]

    def place(self, context: CallContext, lead: torch.Size, num_queries: int, num_keys: int) -> Placement:
        grid = self.embedding.grid(context)
        if grid is None:
            raise NotPlaceable("it ran before the video embedding, so the tubelet grid its indices name is unknown")
        tubelets = grid.frames * grid.size[0] * grid.size[1]
        states = context.values.get(_CELLS + self.predictor_name)
        if states is None or states[:2] != [grid.batch, tubelets]:
            raise NotPlaceable(
                f"{self.predictor_name} took encoder_hidden_states {states}, not the [{grid.batch}, {tubelets}, C] of "
                f"the {grid.frames}x{grid.size[0]}x{grid.size[1]} tubelets the encoder embedded in this call, so the "
                "tubelets its indices name are unknown"
            )
        ids = context.values.get(_CELLS + self.attention_name)
        if not isinstance(ids, torch.Tensor):
            raise NotPlaceable(f"its position_mask is {type(ids).__name__}, not the index of each token: which "
                               "tubelet each token stands for is unknown")
        if len(lead) != 2 or num_queries != num_keys or list(ids.shape) != [lead[0], num_queries]:
            shape = f"[{', '.join(map(str, lead))}, {num_queries}, {num_keys}]"
            raise NotPlaceable(f"its attention has shape {shape} and its position_mask {list(ids.shape)}; vitmad "
                               "places self-attention [B, heads, n, n] with one index per token, [B, n]")
        if lead[0] != grid.batch:
            raise NotPlaceable(
                f"it attends over {lead[0]} sequences for {grid.batch} video(s): one per video and mask of "
                "context_mask and target_mask, and a video's values fold onto its tubelets once; pass one context "
                "mask and one target mask"
            )

        def build() -> Placement:
            cells = ids.detach().to("cpu", torch.long)
            if bool(((cells < 0) | (cells >= tubelets)).any()):
                raise NotPlaceable(f"its position_mask holds indices from {int(cells.min())} to {int(cells.max())}, "
                                   f"beyond the {tubelets} tubelets of the encoder's sequence")
            ordered = cells.sort(dim=1).values
            twice = (ordered[:, 1:] == ordered[:, :-1]).nonzero()
            if twice.numel():
                video, at = int(twice[0, 0]), int(ordered[twice[0, 0], twice[0, 1]])
                raise NotPlaceable(
                    f"tubelet {at} of video {video} is the index of two of its tokens (an index repeated in "
                    "context_mask or target_mask, or in both: VJEPA2Model's default forward gives both every "
                    "tubelet), and a tubelet holds one value: pass masks whose indices are all distinct"
                )
            return _cells_placement(grid, cells, int(lead[1]),
                                    f"space-time over {num_queries} of {tubelets} tubelets, context and mask tokens")

        return _shared(context, "video.predicted.placement", ids, int(lead[1]), build)


# One embedding hook per recorded model and embedding convolution (by its name there), shared by the placers of its
# tower's layers. Per recorded model: a recording of a model and one of its tower around the same forward each read
# TimeSformer's video shape with a hook of their own (one shared, the first read it and the second fell back to
# the configured frame count, QA 326).
_EMBEDDINGS: weakref.WeakKeyDictionary[nn.Module, dict[str, _Embedding]] = weakref.WeakKeyDictionary()


def _embedding(model: nn.Module, projections: list[str], layer: str, frames: int | None) -> _Embedding | None:
    """The video embedding of the layer named ``layer``: of the convolutions named as a patch embedding's projection
    (``projections``, qualified names in module order), the first one in the layer's nearest ancestor that holds
    one. Not the first in the whole model: a wrapper holding two video towers placed the second's layers on the
    first one's tubelets (QA 323), and an image ViT declared before a VideoMAE lent it its patch convolution."""
    parts = layer.split(".")
    ancestors = ["".join(part + "." for part in parts[:i]) for i in reversed(range(len(parts)))]  # nearest first
    found = next(((ancestor, name) for ancestor in ancestors for name in projections if name.startswith(ancestor)),
                 None)
    if found is None:
        return None
    ancestor, name = found
    embeddings = _EMBEDDINGS.setdefault(model, {})
    known = embeddings.get(name)
    if known is not None and known.frames == frames:
        return known
    tower = model.get_submodule(ancestor[:-1])  # "": the model itself
    # A per-frame convolution's parent takes the video whole (TimeSformer's patch embedding).
    video_module = model.get_submodule(name.rpartition(".")[0]) if frames is not None and "." in name else None
    embeddings[name] = _Embedding(tower, model.get_submodule(name), frames, video_module)
    return embeddings[name]


def placer(model: nn.Module, name: str, module: nn.Module):
    """The placer of a video transformer's attention module, a Skip for V-JEPA 2's attentive pooler, or None."""
    from . import Skip

    key = _key(module)
    if key not in _JOINT and key not in _SKIPPED and key != (_TIMESFORMER, "TimesformerSelfAttention"):
        return None
    if key in _SKIPPED:
        return Skip(_SKIPPED[key])
    modules = dict(named_module_list(model))
    parts = name.split(".")
    names = [".".join(parts[:i]) for i in range(len(parts))]
    ancestors = [modules[n] for n in names]

    def nearest(kind: tuple[str, str]) -> int | None:
        return next((i for i in reversed(range(len(ancestors))) if _key(ancestors[i]) == kind), None)

    projections = [name for name, module in modules.items() if is_embedding_projection(name, module)]

    if key in _JOINT:
        embedding = _embedding(model, projections, name, None)
        if embedding is None:
            return None
        predictor, decoder, videomae = nearest(_PREDICTOR), nearest(_VIDEOMAE_DECODER), nearest(_VIDEOMAE_MODEL)
        if predictor is not None:
            return VJEPA2PredictorPlacer(model, embedding, ancestors[predictor], names[predictor], name, module)
        pretraining = None if decoder is None else nearest(_VIDEOMAE_PRETRAINING)
        if pretraining is not None and pretraining < decoder:
            return VideoMAEDecoderPlacer(model, embedding, ancestors[pretraining], names[decoder], ancestors[decoder])
        if decoder is not None:
            return Skip("VideoMAE pretraining decoder outside VideoMAEForPreTraining: its tokens are the visible "
                        "tubelets, then the mask tokens, by the bool_masked_pos of that model's forward")
        if videomae is not None:
            embeddings = ancestors[videomae].embeddings
            return MaskedVideoMAEPlacer(model, embedding, f"{names[videomae]}.embeddings".lstrip("."), embeddings)
        return VideoPlacer(model, embedding, "space-time", _JOINT[key])
    # TimeSformer: the block's attention type and the attribute the module hangs from say what it attends over.
    block = ancestors[-2] if len(ancestors) >= 2 else None
    if block is None or not hasattr(block, "attention_type"):
        return None
    embedding = _embedding(model, projections, name, int(block.config.num_frames))
    if embedding is None:
        return None
    if parts[-2] == "temporal_attention":
        kind = "time"
    else:
        kind = {"divided_space_time": "space", "space_only": "space"}.get(block.attention_type,
                                                                          "space-time, frames fastest")
    return VideoPlacer(model, embedding, kind, divided=block.attention_type == "divided_space_time")
