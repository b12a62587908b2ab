"""Video Swin: torchvision's ``SwinTransformer3d`` (``swin3d_t``, ``swin3d_s``, ``swin3d_b``), shifted, padded windows
over frames x rows x columns of tubelets.

Read from ``torchvision/models/video/swin_transformer.py``:

1. ``PatchEmbed3d`` pads the video ``[B, C, T, H, W]`` at the end of each axis to whole patches (``patch_size``,
   ``(2, 4, 4)`` in the released models) and embeds it with a ``Conv3d`` whose kernel is its stride: a map of
   ``ceil(T / pt) x ceil(H / ph) x ceil(W / pw)`` tubelets, ``[B, T', H', W', C]``. Every tubelet holds pixels of
   the video (the padding is less than a patch), so every one is a query.
2. Stages of ``SwinTransformerBlock`` (torchvision's 2-D block) with ``ShiftedWindowAttention3d``, separated by
   torchvision's 2-D ``PatchMerging``: 2 x 2 tokens in space (an odd height or width padded by one first), the
   frames kept.
3. ``ShiftedWindowAttention3d.forward`` takes the block's map ``[B, t, h, w, C]`` and, per axis, shrinks the window
   to the map and drops the shift where the map is not larger than the window (``_get_window_and_shift_size``, in
   every call). ``shifted_window_attention_3d`` pads the map at the end of each axis to whole windows, rolls the
   padded map by ``-shift`` (``torch.roll`` over the three axes, only when some shift is not 0), cuts it into
   windows (windows in (frame, row, column) order, each window's tokens too: ``[B * nW, heads, N, N]``, videos
   outermost), and computes ``F.softmax`` of the scores plus the relative position bias and the shift mask (-100
   between tokens from different regions of the rolled map): those probabilities are what vitmad reads.

A token stands where its tubelet is: ``((r + 0.5) s_h, (c + 0.5) s_w)`` pixels with ``s`` the patch times
``2 ** m`` after ``m`` mergings, at ``(f + 0.5) pt`` frames (the centre of its frames; docs/definition.md, video).
The padding slots of the windows (which the model attends, unmasked) are keys at their cell of the padded map, past
the video's last frame, row or column, and no query (docs/definition.md, windows). Each call checks that the block's
map is the one the patch embedding and the mergings before it give, so that a layout vitmad does not know (another
patch embedding or downsampling) is refused, not measured at a wrong scale.
"""

from __future__ import annotations

import functools
import math
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
    RefusingPlacer,
    on_device,
    read_only,
)
from .stages import innermost_on_path
from .swin import merged_length

__all__ = ["placer", "attention_modules", "VideoSwinPlacer"]

_VIDEO_SWIN = "torchvision.models.video.swin_transformer"
_SWIN = "torchvision.models.swin_transformer"
_ATTENTION = (_VIDEO_SWIN, "ShiftedWindowAttention3d")
_MODEL = (_VIDEO_SWIN, "SwinTransformer3d")
_EMBEDDING = (_VIDEO_SWIN, "PatchEmbed3d")
# torchvision's 2-D mergings, which SwinTransformer3d runs over [B, T, H, W, C] (downsample_layer).
_MERGINGS = ((_SWIN, "PatchMerging"), (_SWIN, "PatchMergingV2"))
# + the patch embedding's name: the _Tubelets of this call.
_TUBELETS = "video_swin.tubelets."
# + the attention module's name: (videos, map size (t, h, w)) of the call in progress.
_MAP = "video_swin.map."


def _key(module: nn.Module) -> tuple[str, str]:
    return type(module).__module__, type(module).__name__


def attention_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every ``ShiftedWindowAttention3d`` by qualified name: its forward computes no softmax itself (the function
    ``shifted_window_attention_3d`` does), so the generic discovery does not see it."""
    return {name: module for name, module in named_module_list(model) if _key(module) == _ATTENTION}


@dataclass(frozen=True)
class _Tubelets:
    """What the patch embedding saw in this call: the video's size and the tubelet map it made."""

    video: tuple[int, int, int]  # (frames, height, width) of the input, before PatchEmbed3d pads it
    patch: tuple[int, int, int]  # (frames, height, width) of a tubelet
    tokens: tuple[int, int, int]  # (t, h, w) of the map it returned


@dataclass(frozen=True)
class _Windows:
    """Where the tokens of one call are (read-only, shared by the calls of the same layout)."""

    positions: torch.Tensor  # [B * nW, 1, N, 2] pixel centres of the slots as queries; NaN for padding
    key_positions: torch.Tensor | None  # [B * nW, 1, N, 2] as keys (padding past the edge); None without padding
    times: torch.Tensor  # [B * nW, 1, N, 1] frame centres as queries; NaN for padding
    key_times: torch.Tensor | None  # [B * nW, 1, N, 1] as keys; None without padding
    index: torch.Tensor  # [t * h * w] the slot among one video's nW * N of each token, (frame, row, column) order
    padded: tuple[int, int, int]


# Blocks of one stage share their partitions, and a model sees few video sizes: keep them.
@functools.lru_cache(maxsize=64)
def _windows(batch: int, size: tuple[int, int, int], window: tuple[int, int, int], shift: tuple[int, int, int],
             stride: tuple[float, float], frame_stride: float) -> _Windows:
    """The slot of every token when a ``t x h x w`` map is padded at the end of each axis to whole windows, rolled
    by ``-shift`` and cut into windows (``shifted_window_attention_3d``)."""
    padded = tuple(math.ceil(n / w) * w for n, w in zip(size, window))
    counts = tuple(p // w for p, w in zip(padded, window))
    # Per axis, the index on the unrolled, padded map of each index of the rolled one (roll by -shift after padding:
    # the tokens that wrap around are padding too where the map was padded). Indices >= the map's size are padding.
    frames, rows, cols = (((torch.arange(p) + s) % p).view(n, w) for p, w, s, n in zip(padded, window, shift, counts))
    # Window-major, (frame, row, column) order of windows, then of slots: view(b, nT, wt, nH, wh, nW, ww) permuted.
    frames = frames.view(counts[0], 1, 1, window[0], 1, 1)
    rows = rows.view(1, counts[1], 1, 1, window[1], 1)
    cols = cols.view(1, 1, counts[2], 1, 1, window[2])
    frames, rows, cols = (a.reshape(-1) for a in torch.broadcast_tensors(frames, rows, cols))
    real = (frames < size[0]) & (rows < size[1]) & (cols < size[2])
    # docs/definition.md, windows: padding the model attends is a key at its cell of the padded map (past the video's
    # edge), and no query: it stands for no content.
    key_positions = torch.stack([(rows + 0.5) * stride[0], (cols + 0.5) * stride[1]], dim=-1).to(torch.float32)
    key_times = ((frames + 0.5) * frame_stride).to(torch.float32)[:, None]
    positions = key_positions.masked_fill(~real[:, None], float("nan"))
    times = key_times.masked_fill(~real[:, None], float("nan"))
    index = torch.empty(size[0] * size[1] * size[2], dtype=torch.long)
    index[((frames * size[1] + rows) * size[2] + cols)[real]] = torch.arange(frames.numel())[real]
    num_windows, tokens = counts[0] * counts[1] * counts[2], window[0] * window[1] * window[2]

    def per_call(values: torch.Tensor) -> torch.Tensor:  # [nW * N, K] -> [B * nW, 1, N, K]: shared by the heads
        return values.view(num_windows, tokens, -1).repeat(batch, 1, 1).unsqueeze(1)

    if padded == size:
        positions, times = read_only(per_call(positions), per_call(times), positions=2)
        return _Windows(positions, None, times, None, read_only(index)[0], padded)
    positions, key_positions, times, key_times, index = read_only(
        per_call(positions), per_call(key_positions), per_call(times), per_call(key_times), index, positions=4)
    return _Windows(positions, key_positions, times, key_times, index, padded)


def _window_and_shift(attention: nn.Module, size: tuple[int, int, int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The window and shift ``ShiftedWindowAttention3d.forward`` uses on a map of ``size``: along an axis the map
    does not exceed, the window is the map and there is no shift (``_get_window_and_shift_size``)."""
    window, shift = [int(w) for w in attention.window_size], [int(s) for s in attention.shift_size]
    for axis, length in enumerate(size):
        if length <= window[axis]:
            window[axis], shift[axis] = length, 0
    return tuple(window), tuple(shift)


def _dims(values) -> str:
    return "x".join(map(str, values))


class VideoSwinPlacer(LayerPlacer):
    """Places the tokens of one ``ShiftedWindowAttention3d`` call (``[B * nW, heads, N, N]``) on the tubelets.

    Args:
        name: qualified name of the attention module.
        attention: that module; its ``window_size`` and ``shift_size`` are read in each call.
        embedding_name: qualified name of the ``PatchEmbed3d`` of its ``SwinTransformer3d``.
        embedding: that module.
        owner: the ``SwinTransformer3d``: the tubelets its embedding made are forgotten when its forward ends.
        merges: torchvision ``PatchMerging`` modules of that model before the block.
    """

    def __init__(self, name: str, attention: nn.Module, embedding_name: str, embedding: nn.Module, owner: nn.Module,
                 merges: int):
        self.attention = attention
        self.embedding_name, self.embedding, self.owner, self.merges = embedding_name, embedding, owner, merges
        self._tubelets_key, self._map_key = _TUBELETS + embedding_name, _MAP + name

    def install(self, context: CallContext) -> list[torch.utils.hooks.RemovableHandle]:
        def embedded(module, args, output) -> None:
            # After the convolution, which starts the call (and clears its values). Every layer's placer hooks the
            # embedding and writes the same value.
            video = args[0] if args else None
            if isinstance(video, torch.Tensor) and video.dim() == 5 and output.dim() == 5:
                context.values[self._tubelets_key] = _Tubelets(
                    tuple(int(n) for n in video.shape[2:]), tuple(int(p) for p in module.tuple_patch_size),
                    tuple(int(n) for n in output.shape[1:4]))

        def done(module, args, output) -> None:
            # A block called after the model's forward must not be placed on that forward's tubelets.
            context.values.pop(self._tubelets_key, None)

        def see(module, args) -> None:
            x = args[0] if args else None
            if isinstance(x, torch.Tensor) and x.dim() == 5:  # [B, t, h, w, C]
                context.values[self._map_key] = (int(x.shape[0]), tuple(int(n) for n in x.shape[1:4]))

        def forget(module, args, output) -> None:
            # The map is known only while the attention runs.
            context.values.pop(self._map_key, None)

        return [self.embedding.register_forward_hook(embedded),
                self.owner.register_forward_hook(done, always_call=True),
                self.attention.register_forward_pre_hook(see),
                self.attention.register_forward_hook(forget, always_call=True)]

    def _tubelets(self, context: CallContext, size: tuple[int, int, int]) -> _Tubelets:
        """The patch embedding's tubelets of this call, checked against the map this block sees."""
        tubelets = context.values.get(self._tubelets_key)
        if tubelets is None:
            raise NotPlaceable(
                f"it ran without a forward of {self.embedding_name} (PatchEmbed3d) on a [B, C, T, H, W] video before "
                "it in this call, so the size of its tubelets is unknown"
            )
        padded = tuple(-(-n // p) for n, p in zip(tubelets.video, tubelets.patch))
        if tubelets.tokens != padded:
            raise NotPlaceable(
                f"{self.embedding_name} made a map of {_dims(tubelets.tokens)} tubelets from a video of "
                f"{_dims(tubelets.video)} (frames x height x width) with {_dims(tubelets.patch)} patches, where "
                f"PatchEmbed3d's padding to whole patches gives {_dims(padded)}; vitmad does not know what ran"
            )
        expected = (tubelets.tokens[0], *(merged_length(n, self.merges) for n in tubelets.tokens[1:]))
        if size != expected:
            path = (f"through {self.merges} 2x2 patch merging{'s' if self.merges > 1 else ''} before this block "
                    f"gives {_dims(expected)}" if self.merges else "with no patch merging before this block")
            raise NotPlaceable(
                f"it sees a map of {_dims(size)} tubelets (frames x rows x columns), but the {_dims(tubelets.tokens)} "
                f"map of {self.embedding_name} {path}; vitmad does not know what ran in between (a downsampling "
                "other than torchvision's PatchMerging)"
            )
        return tubelets

    def place(self, context: CallContext, lead: torch.Size, num_queries: int, num_keys: int) -> Placement:
        seen = context.values.get(self._map_key)
        if seen is None:
            raise NotPlaceable("its forward did not receive a [B, T, H, W, C] map, so its windows cannot be placed")
        batch, size = seen
        tubelets = self._tubelets(context, size)
        window, shift = _window_and_shift(self.attention, size)
        num_windows = math.prod(math.ceil(n / w) for n, w in zip(size, window))
        tokens = math.prod(window)
        if len(lead) != 2 or num_queries != num_keys or num_queries != tokens or lead[0] != batch * num_windows:
            raise NotPlaceable(
                f"its attention has shape [{', '.join(map(str, lead))}, {num_queries}, {num_keys}]; "
                f"{batch} maps of {_dims(size)} tubelets in {num_windows} windows of {_dims(window)} give "
                f"[{batch * num_windows}, heads, {tokens}, {tokens}]"
            )
        scale = 2 ** self.merges
        stride = (float(tubelets.patch[1] * scale), float(tubelets.patch[2] * scale))
        windows = _windows(batch, size, window, shift, stride, float(tubelets.patch[0]))
        heads, index = int(lead[1]), windows.index

        def fold(values: torch.Tensor) -> torch.Tensor:
            values = values.reshape(batch, num_windows, heads, tokens).transpose(1, 2)
            return values.reshape(batch, heads, num_windows * tokens).index_select(-1, on_device(index, values.device))

        attention = f"window {_dims(window)}"
        if any(shift):
            attention += f", shift {_dims(shift)}"
        if windows.padded != size:
            attention += f", padded to {_dims(windows.padded)}"
        geometry = LayerGeometry(size[1:], stride, attention, heads, frames=size[0],
                                 frame_stride=float(tubelets.patch[0]))
        return Placement(windows.positions, windows.key_positions, fold, geometry,
                         padded_keys=windows.key_positions is not None, time_positions=windows.times,
                         time_key_positions=windows.key_times)


def placer(model: nn.Module, name: str, module: nn.Module):
    """The placer of a ``ShiftedWindowAttention3d``, or None for any other module."""
    if _key(module) != _ATTENTION:
        return None
    found = innermost_on_path(model, name, lambda candidate: _key(candidate) == _MODEL)
    if found is None:
        return RefusingPlacer("it is not inside a SwinTransformer3d, whose PatchEmbed3d says where its tubelets are")
    owner, owner_module = found
    embedding = getattr(owner_module, "patch_embed", None)
    embedding_name = f"{owner}.patch_embed".lstrip(".")
    if embedding is None or _key(embedding) != _EMBEDDING:
        found = type(embedding).__name__
        return RefusingPlacer(
            f"its SwinTransformer3d embeds the video with {embedding_name} ({found}), not torchvision's PatchEmbed3d, "
            "whose padding to whole patches vitmad places"
        )
    merges = 0
    for other_name, other in named_module_list(model):
        if other_name == name:
            break
        if other_name.startswith(f"{owner}.".lstrip(".")) and _key(other) in _MERGINGS:
            merges += 1
    return VideoSwinPlacer(name, module, embedding_name, embedding, owner_module, merges)
