"""Where the tokens of one attention call are, and how its per-query MAD folds back onto the image.

Every recorded attention call is measured with the position form of the ops: each query and key gets the
centre, in pixels of the input image, of the cell it stands for (``docs/definition.md``, "Beyond one grid"),
and a row of NaN when it has none (CLS, registers, detection tokens, masked padding; unmasked window padding
is a key at its cell of the padded grid, and no query). The ops return one value per query; a
:class:`Placement` then folds those values back onto the layer's token grid, ``[B, H, T]`` with the
``T = grid_h * grid_w`` positioned tokens of each image in row-major order, whatever the call's own layout
(windows batched with the images, windows in their own dimension, shifted or padded windows). The layer's MAD
of an image is the mean over its ``T`` tokens, so a windowed layer's MAD averages every query of the image,
not one window.

Each model family supplies a :class:`LayerPlacer` per recorded module (:mod:`.families`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..ops.arguments import check_position_values, is_trusted_positions, trust_position_values

# Ends every refusal of causal attention: such a layer is often a text encoder's or a language model's beside the
# tower, which the default layers took (QA 373: a user's own text encoder beside a UNet).
CAUSAL_ADVICE = ("; if it is not the image tower's (a text encoder or language model beside it), leave it out with "
                 "layers=[the layers to record]")

__all__ = ["ModelLayout", "LayerGeometry", "Placement", "LayerPlacer", "RefusingPlacer", "without_owner", "CallContext",
           "cell_centres", "select_tokens", "NotPlaceable", "read_only", "is_read_only", "on_device",
           "copy_by_content"]


class NotPlaceable(ValueError):
    """The tokens of an attention call cannot be placed: vitmad refuses rather than guess."""


@dataclass(frozen=True)
class ModelLayout:
    """The plain ViT layout of a recording (``rec.layout``): every layer attends over one patch grid.

    Attributes:
        patch: pixel size of a patch.
        grid: ``(grid_h, grid_w)`` of the patch tokens in the latest forward call; None before the first one
            (unless given by hand).
        num_prefix_tokens: tokens before the patches (CLS, distillation, registers) in the latest call; None
            before the first one (unless given by hand).
    """

    patch: int | None
    grid: tuple[int, int] | None = None
    num_prefix_tokens: int | None = None


@dataclass(frozen=True)
class LayerGeometry:
    """The token grid a recorded layer's per-query MAD is folded onto.

    Attributes:
        grid: ``(grid_h, grid_w)`` of the layer's positioned tokens; None when the images of the call have
            grids of their own (native resolution, packed images): then ``image_grids`` gives each.
        stride: ``(stride_y, stride_x)``: pixels of the input image per token of that grid.
        attention: what the layer attends over, in words ("global", "window 7x7, shift 3", "keys pooled 2x2").
        heads: the layer's head count.
        num_prefix_tokens: tokens without a position before the grid (plain ViTs); None where the sequence has
            another layout.
        num_suffix_tokens: tokens without a position after the grid (YOLOS' detection tokens); None where there
            are none. The prefix maps' rows are the tokens without a position in token order: the prefix tokens,
            then these.
        image_grids: per image of the call, ``(grid_h, grid_w)`` of its own tokens, when images differ in size
            (``grid`` is None then); image ``i``'s values are the first ``grid_h * grid_w`` of its ``T`` in
            row-major order, NaN after them (see ``Placement.present``).
        frames: video layers: the tubelets' frame count (the grid is then ``frames x grid_h x grid_w``, folded in
            (frame, row, column) order); None for image layers.
        frame_stride: video layers: input frames per tubelet (its temporal size); None for image layers.
        image_frames: packed clips of their own sizes (``image_grids``): per entry, its tubelets' frame count; entry
            ``i``'s values are the first ``image_frames[i] * grid_h * grid_w`` of its ``T`` in (frame, row, column)
            order, NaN after them (``frames`` is None then, ``frame_stride`` the tubelets' temporal size).
        depth: volume layers (a 3-D model's ``[B, C, D, H, W]`` input): the grid's cells along the first spatial
            axis (the grid is then ``depth x grid_h x grid_w``, folded in (slice, row, column) order, and every
            token is placed in all three axes: MAD is the distance over them, in voxels); None for image and
            video layers.
        depth_stride: volume layers: voxels of the input per token along that axis; None otherwise.
    """

    grid: tuple[int, int] | None
    stride: tuple[float, float]
    attention: str
    heads: int
    num_prefix_tokens: int | None = None
    image_grids: tuple[tuple[int, int], ...] | None = None
    frames: int | None = None
    frame_stride: float | None = None
    num_suffix_tokens: int | None = None
    image_frames: tuple[int, ...] | None = None
    depth: int | None = None
    depth_stride: float | None = None

    @classmethod
    def of_grid(cls, grid: tuple[int, ...], stride: tuple[float, ...], attention: str, heads: int,
                num_prefix_tokens: int | None = None) -> LayerGeometry:
        """The geometry of a layer over one grid of two axes ``(grid_h, grid_w)`` (an image) or three
        ``(depth, grid_h, grid_w)`` (a volume), ``stride`` one entry per axis."""
        if len(grid) == 3:
            return cls(tuple(grid[1:]), tuple(stride[1:]), attention, heads, num_prefix_tokens, depth=int(grid[0]),
                       depth_stride=float(stride[0]))
        return cls(tuple(grid), tuple(stride), attention, heads, num_prefix_tokens)

    def as_dict(self) -> dict:
        """The geometry as JSON values (``mad.json``'s ``geometry`` of each layer)."""
        found = {"grid": None if self.grid is None else list(self.grid), "stride": [float(s) for s in self.stride],
                 "attention": self.attention, "heads": int(self.heads), "num_prefix_tokens": self.num_prefix_tokens}
        # Keys beyond these only where the layer has them: image layers keep the keys they always had.
        if self.image_grids is not None:
            found["image_grids"] = [list(g) for g in self.image_grids]
        if self.frames is not None:
            found.update(frames=int(self.frames), frame_stride=float(self.frame_stride))
        if self.image_frames is not None:
            found.update(image_frames=[int(f) for f in self.image_frames], frame_stride=float(self.frame_stride))
        if self.num_suffix_tokens:
            found["num_suffix_tokens"] = int(self.num_suffix_tokens)
        if self.depth is not None:
            found.update(depth=int(self.depth), depth_stride=float(self.depth_stride))
        return found


@dataclass
class Placement:
    """The positions of one attention call's tokens, and the fold of its per-query values.

    Attributes:
        positions: ``[..., Nq, K]`` query positions in pixels (NaN rows: no position), broadcastable against the
            call's leading dims; ``K = 2`` (row, column), or 3 (slice, row, column) in voxels for a volume layer
            (``LayerGeometry.depth``).
        key_positions: ``[..., Nk, K]`` key positions, or None when the keys are the queries.
        fold: maps per-query values ``[*lead, Nq]`` (NaN at queries without a position) to ``[B, H, T]``, the
            layer's positioned tokens of each image in row-major grid order (video: ``T = frames * grid_h *
            grid_w`` in (frame, row, column) order).
        geometry: the grid ``T`` lies on.
        heads_per_call: True when the module computes each head in its own call (EfficientViT's cascaded group
            attention: one softmax per head, in head order): the per-query values of its calls in one forward are
            stacked on a head dim (``[*lead, H, Nq]``, dim -2) before ``fold``.
        consecutive_chunks: True when the module splits one token sequence into consecutive chunks and computes
            the attention of each chunk in its own call (Qwen2-VL's vision attention without flash attention: one
            call per image or window, split by ``cu_seqlens``): the per-query values of its calls in one forward
            are concatenated along the query dim (``[*lead, sum of Nq]``) before ``fold``; each call's placement
            holds the positions of its own chunk and the ``fold`` of the whole sequence.
        rows_per_call: True when the module computes its attention over consecutive rows of its one leading dim in
            calls of its own (diffusers' ``SlicedAttnProcessor``: slices of batch and heads merged, the last one
            shorter where the slice size does not divide them): the per-query values of its calls in one forward are
            concatenated along that dim (``[sum of rows, Nq]``) before ``fold``; each call's placement holds the
            positions of its own rows and the ``fold`` of all.
        present: ``[B, T]`` (or ``[T]``) bool, the tokens of the folded grid that exist in this call, or None
            when all do. A masked encoder keeps a subset of each image's grid; packed images of different sizes
            are folded onto the largest one. ``fold`` leaves NaN at the absent tokens, and an image's MAD is the
            mean over its present tokens only (a NaN at a present token still propagates).
        time_positions: video layers: ``[..., Nq, 1]`` query positions in input frames (the centre of each
            tubelet's frames; NaN rows where ``positions`` has them), measured beside the spatial ones; None for
            image layers.
        time_key_positions: ``[..., Nk, 1]`` key positions in frames, or None when the keys are the queries.
        padded_keys: True when ``key_positions`` differs from ``positions`` only at padding slots (a window cut
            past the map's edge: a key where the query has none): key ``i`` is query ``i``'s token, so each query's
            attention on its own token (the self mass) is measured; False for any other key set (pooled, halo).
        map_tokens: ``[Q]`` token indices, in token order, of the tokens whose attention rows are the layer's prefix
            maps, where those are neither every token without a position nor the counted prefix and suffix tokens
            (Mllama: each tile's class token, among padding tokens and padding tiles); each without a position in
            every matrix. None: the maps' rows are found from the geometry.
        map_present: ``[B, Q]`` bool, which of the ``map_tokens`` each image has (its rows are NaN where not: the
            class token of a padding tile), or None when every image has all.
        batch_parts: the module's forward runs this many times in one forward of the model, each over the next part
            of the batch (VidEoMT's query blocks: once per frame, over that frame of every video), its calls all
            placed alike: the per-query values (and prefix rows) of those forwards are concatenated along the batch
            dim, in the order they ran, before ``fold``, and the layer is recorded once, when the last has ended.
    """

    positions: torch.Tensor
    key_positions: torch.Tensor | None
    fold: Callable[[torch.Tensor], torch.Tensor]
    geometry: LayerGeometry
    heads_per_call: bool = False
    present: torch.Tensor | None = None
    consecutive_chunks: bool = False
    rows_per_call: bool = False
    time_positions: torch.Tensor | None = None
    time_key_positions: torch.Tensor | None = None
    padded_keys: bool = False
    map_tokens: torch.Tensor | None = None
    map_present: torch.Tensor | None = None
    batch_parts: int = 1


@dataclass
class CallContext:
    """What a placer may read about the model's current forward call.

    Attributes:
        image_size: ``(height, width)`` in pixels of the model input of this call (the input of the first
            convolution that ran), or None before it ran.
        values: per-call facts gathered by the placers' own hooks (a block's input shape, a shift), by key.
    """

    image_size: tuple[int, int] | None = None
    values: dict = field(default_factory=dict)


# Set in CallContext.values while a placer places the keys of queries without a position (class attention, attention
# pooling): those keys may leave out tokens the self-attention before attended over (the class token a pooling head
# drops), which is no merging of the patches (PlainPlacer's check of fewer extra tokens).
PLACING_KEYS_ONLY = "placing_keys_only"


class LayerPlacer:
    """Places the tokens of one recorded attention module.

    Subclasses implement :meth:`place`; :meth:`install` may add hooks that collect what :meth:`place` needs
    into the :class:`CallContext` (removed with the recording).

    A family placer that places a plain layout read its own way (RADIO's: no patch-embedding convolution) sets
    ``defers_to_given_layout``: when the user gives the plain layout by hand (``patch=``, ``grid=``,
    ``num_prefix_tokens=``), the recorder sets its ``given_layout`` to the plain placer of that layout, which the
    user's values make win.
    """

    defers_to_given_layout = False

    def install(self, context: CallContext) -> list[torch.utils.hooks.RemovableHandle]:
        return []

    def place(self, context: CallContext, lead: torch.Size, num_queries: int, num_keys: int) -> Placement:
        """The placement of a call whose attention is ``[*lead, num_queries, num_keys]``.

        Raises:
            NotPlaceable: the call does not have the layout this placer knows; the message says what it saw.
        """
        raise NotImplementedError

    def refusal_without_attention(self, module: torch.nn.Module) -> str | None:
        """Why ``module`` cannot be recorded, when one of its forwards ended without computing attention vitmad
        sees; None when such a forward is not an error (a module that attends in some calls only). A module whose
        attention runs where vitmad does not look (diffusers' xFormers processor, a softmax over another dim)
        never reaches :meth:`place`, so its refusal would otherwise never be said: its layer would be missing from
        the recording, silently."""
        return None


class RefusingPlacer(LayerPlacer):
    """The placer of a module whose tokens a family knows it cannot place: every call is refused with ``reason``."""

    def __init__(self, reason: str):
        self.reason = reason

    def place(self, context: CallContext, lead: torch.Size, num_queries: int, num_keys: int) -> Placement:
        raise NotPlaceable(self.reason)

    def refusal_without_attention(self, module: torch.nn.Module) -> str | None:
        return self.reason


def without_owner(class_name: str) -> RefusingPlacer:
    """The refusal of a layer whose family reads its strides from its model, where neither that model nor timm's
    features_only wrapper of it is recorded (its stages taken into a user's module: a bare AttributeError, QA
    297)."""
    return RefusingPlacer(f"its strides are read from its {class_name} (the order of the model's modules), which is "
                          "not in the recorded model (nor timm's features_only wrapper of it); record the whole "
                          f"{class_name}, or pass positions=<[N, 2] pixel position of each token>")


def cell_centres(
    grid_h: int, grid_w: int, stride: tuple[float, float], *, device=None, dtype=torch.float32
) -> torch.Tensor:
    """``[grid_h, grid_w, 2]`` (row, column) pixel centres of a grid whose cells are ``stride`` pixels."""
    rows = (torch.arange(grid_h, dtype=torch.float64) + 0.5) * stride[0]
    cols = (torch.arange(grid_w, dtype=torch.float64) + 0.5) * stride[1]
    centres = torch.stack(torch.meshgrid(rows, cols, indexing="ij"), dim=-1)
    return centres.to(device=device, dtype=dtype)


# The attribute of a read_only tensor that holds its copies on other devices.
_DEVICE_COPIES = "_vitmad_device_copies"


def read_only(*tensors: torch.Tensor, positions: int = 0) -> tuple[torch.Tensor, ...]:
    """Marks tensors that vitmad builds once and never changes (the cached positions and token indices of a
    layout), so that :func:`on_device` copies each to a device once, not once per layer and call. The first
    ``positions`` of them are positions (``[..., N, K]``, NaN rows for tokens without one): their values are
    checked here, once, and the ops then skip the check of them and of their device copies
    (:func:`vitmad.ops.arguments.trust_position_values`), which on a GPU is a host copy that waits for the work
    queued before it."""
    for index, tensor in enumerate(tensors):
        setattr(tensor, _DEVICE_COPIES, {})
        if index < positions:
            check_position_values(tensor, "positions", "vitmad.record")  # a layout of ours: never fails
            trust_position_values(tensor)
    return tensors


def is_read_only(tensor: torch.Tensor) -> bool:
    """Whether :func:`read_only` marked ``tensor``."""
    return getattr(tensor, _DEVICE_COPIES, None) is not None


def copy_by_content(host: torch.Tensor, device: torch.device, cache: dict, limit: int, *,
                    positions: bool = False) -> torch.Tensor:
    """The copy on ``device`` of the small host tensor ``host`` that every tensor with the same values shares,
    kept in ``cache`` (by device, dtype, shape and bytes; emptied when it holds ``limit`` copies). With
    ``positions``, the values are checked on the host before the first copy, and that copy is trusted
    (:func:`vitmad.ops.arguments.trust_position_values`): the ops do not copy it back to check it."""
    host = host.detach().contiguous()
    key = (device, host.dtype, tuple(host.shape), host.reshape(-1).view(torch.uint8).numpy().tobytes())
    copy = cache.get(key)
    if copy is None:
        if positions:
            check_position_values(host, "positions", "vitmad.record")
        if len(cache) >= limit:
            cache.clear()
        copy = cache[key] = host.to(device)
        if positions:
            trust_position_values(copy)
    return copy


# Device copies of the small host index tensors of folds (on_device), by device and content. Folds only read
# their indices, so a copy is shared by every fold whose index has the same values.
_INDEX_COPIES: dict[tuple, torch.Tensor] = {}
_INDEX_COPIES_LIMIT = 256
_INDEX_ELEMENTS_LIMIT = 1 << 16  # 512 KiB of int64: far beyond a layer's token count, small for a GPU


def on_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor.to(device)`` for a tensor that is only read there: for a :func:`read_only` tensor, its copy made
    the first time (trusted like the tensor when it holds positions); for a small host index tensor (a fold's
    token order), the copy of the first tensor with the same values. On a GPU, a copy from pageable host memory
    waits for the work queued before it: the twelve layers of a ViT-B that share one grid's positions and
    indices paid 24 of those waits per forward."""
    copies = getattr(tensor, _DEVICE_COPIES, None)
    device = torch.device(device)
    if tensor.device == device:
        return tensor
    if copies is None:
        if (tensor.device.type != "cpu" or tensor.is_floating_point() or tensor.is_complex()
                or tensor.numel() > _INDEX_ELEMENTS_LIMIT):
            return tensor.to(device)
        return copy_by_content(tensor, device, _INDEX_COPIES, _INDEX_COPIES_LIMIT)
    copy = copies.get(device)
    if copy is None:
        copy = tensor.to(device)
        if is_trusted_positions(tensor):
            trust_position_values(copy)
        copies[device] = copy
    return copy


def select_tokens(index: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """The fold of a call whose leading dims are ``[B, H]`` and whose positioned tokens are ``index`` (in grid
    order): ``values[..., index]``."""

    def fold(values: torch.Tensor) -> torch.Tensor:
        return values.index_select(-1, on_device(index, values.device))

    return fold
