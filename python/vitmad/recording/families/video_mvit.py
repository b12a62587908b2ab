"""torchvision's video MViT (``torchvision.models.video.MViT``: ``mvit_v1_b``, ``mvit_v2_s``): pooling attention
over a frames x rows x columns grid of space-time tokens.

``conv_proj``, a ``Conv3d`` (kernel (3, 7, 7), stride (2, 4, 4), padding (1, 3, 3) in both models), embeds the
video ``[B, 3, T, H, W]`` (an image ``[B, 3, H, W]`` as one frame) into a ``T' x H' x W'`` grid, flattened in
(frame, row, column) order after a CLS token. Each ``MultiscaleAttention`` receives its block's grid ``thw``, pools
its queries with ``pool_q`` and its keys with ``pool_k`` (a ``Pool``: a depthwise ``Conv3d`` over the grid, the CLS
token split off before it and put back first, unpooled), and computes its softmax itself, ``[B, heads, 1 + Nq,
1 + Nk]`` (MViTv2 adds a decomposed relative position bias before it): the recording reads those probabilities.

Every token is placed by the library's convention for strided operations (docs/definition.md, "Video"): an output
``i`` of stride ``s`` stands at the centre of its stride cell, ``(i + 0.5) * s`` cells of its input, whatever the
kernel and padding, in time as in space. A token of the embedding stands at ``((r + 0.5) * 4, (c + 0.5) * 4)``
pixels and ``(f + 0.5) * 2`` frames (the centre ``f * tt + tt / 2`` of ``tt``-frame tubelets, as VideoMAE's,
:mod:`.video`); a pooled query or key at the centre of its stride cell of the block's grid. The layer is folded onto
the queries' grid (the grid the next block receives). Where the keys are pooled onto the queries' own cells (the
same output grid and stride), the layer is self-attention over one grid: its self mass and its CLS row (the prefix
map) are measured; elsewhere the keys are other cells, and both are left out (NaN, None).

MViT's blocks reshape the tokens by the grid the model was built for (``temporal_size`` and ``spatial_size`` floor
divided by the embedding's stride), whatever the embedding made: a call whose embedding made another grid is refused,
as its blocks pool tokens that are not neighbours (with the sides swapped the count agrees, and the model runs).
"""

from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass

import torch
from torch import nn

from ..module_index import module_list
from ..placement import (
    CallContext,
    LayerGeometry,
    LayerPlacer,
    NotPlaceable,
    Placement,
    RefusingPlacer,
    read_only,
    select_tokens,
)
from .stages import innermost_on_path, strided_axis

__all__ = ["placer", "MultiscaleAttentionPlacer"]

_MODULE = "torchvision.models.video.mvit"
_POOLS = (nn.Conv3d, nn.AvgPool3d, nn.MaxPool3d)

Triple = tuple[int, int, int]


def _is(module: nn.Module | None, name: str) -> bool:
    return module is not None and type(module).__module__ == _MODULE and type(module).__name__ == name


def _triple(value) -> Triple:
    """``(v, v, v)`` for a number, the triple itself for a (time, height, width) triple."""
    if isinstance(value, (tuple, list)):
        return int(value[0]), int(value[1]), int(value[2])
    return int(value), int(value), int(value)


@dataclass(frozen=True)
class _Pooling:
    """The strided 3D operation of a ``Pool`` (per axis: time, height, width)."""

    kernel: Triple = (1, 1, 1)
    step: Triple = (1, 1, 1)
    padding: Triple = (0, 0, 0)
    dilation: Triple = (1, 1, 1)
    ceil_mode: bool = False

    def words(self) -> str:
        if self == _Pooling():
            return "not pooled"
        return f"pooled {'x'.join(map(str, self.kernel))}, stride {'x'.join(map(str, self.step))}"


_NOT_POOLED = _Pooling()


def _pooling(pool: nn.Module | None, what: str) -> _Pooling | str:
    """The operation of ``pool`` (an attention's ``pool_q`` or ``pool_k``), or why it is not placed."""
    if pool is None:
        return _NOT_POOLED
    inner = getattr(pool, "pool", None) if _is(pool, "Pool") else None
    if not isinstance(inner, _POOLS):
        kind = type(pool).__name__ if inner is None else f"Pool over a {type(inner).__name__}"
        return (f"its {what} are pooled by a {kind}; vitmad places poolings by a Conv3d, AvgPool3d or MaxPool3d "
                "inside torchvision's Pool (the CLS token passed through first), whose output cells it derives")
    if isinstance(inner.padding, str):
        return (f"its {what} are pooled by a {type(inner).__name__} with padding={inner.padding!r}, whose output "
                "size vitmad does not derive")
    return _Pooling(_triple(inner.kernel_size), _triple(inner.stride), _triple(inner.padding),
                    _triple(getattr(inner, "dilation", 1)), bool(getattr(inner, "ceil_mode", False)))


class _Embedding:
    """The hook on an MViT's ``conv_proj`` that checks, in each call, that it made the grid the blocks take.

    Args:
        owner: the ``MViT``.
    """

    def __init__(self, owner: nn.Module):
        self.conv = owner.conv_proj
        encoding = owner.pos_encoding
        self.configured = (int(encoding.temporal_size), *(int(s) for s in encoding.spatial_size))
        self.key = ("video_mvit.embedding", id(self))
        # The recording whose hook is on the convolution, and that hook: one per recording, whatever its layers.
        self._installed: tuple[CallContext, torch.utils.hooks.RemovableHandle] | None = None

    def install(self, context: CallContext) -> list[torch.utils.hooks.RemovableHandle]:
        installed = self._installed
        if installed is not None and installed[0] is context and installed[1].id in self.conv._forward_hooks:
            return []

        def see(module, args, output) -> None:
            made = tuple(int(s) for s in output.shape[-3:])
            context.values[self.key] = (made, int(args[0].shape[-3])) if made == self.configured else (
                f"its patch embedding (conv_proj) made a {'x'.join(map(str, made))} grid of tokens (frames x rows "
                f"x columns), and MViT's blocks reshape them as the {'x'.join(map(str, self.configured))} grid it "
                "was built for (temporal_size and spatial_size floor divided by the embedding's stride), so its "
                "poolings do not pool neighbouring tokens; record videos whose embedding makes that grid, or build "
                "the model for the video's size"
            )

        handle = self.conv.register_forward_hook(see)
        self._installed = (context, handle)
        return [handle]


_EMBEDDINGS: weakref.WeakKeyDictionary[nn.Module, _Embedding] = weakref.WeakKeyDictionary()


def _embedding(owner: nn.Module) -> _Embedding:
    known = _EMBEDDINGS.get(owner)
    if known is None or known.conv is not owner.conv_proj:
        known = _EMBEDDINGS[owner] = _Embedding(owner)
    return known


@dataclass(frozen=True)
class _Layout:
    """Where one attention call's tokens are (read-only tensors, CLS first without a position)."""

    grid: Triple  # the queries' (frames, rows, columns)
    stride: tuple[float, float, float]  # the queries' (frames, pixels, pixels) per cell
    keys: Triple  # the keys' (frames, rows, columns)
    positions: torch.Tensor  # [1 + Nq, 2] pixels
    times: torch.Tensor  # [1 + Nq, 1] frames
    key_positions: torch.Tensor | None  # [1 + Nk, 2], None where the keys are the queries' cells
    key_times: torch.Tensor | None  # [1 + Nk, 1]
    index: torch.Tensor  # the queries with a position, in (frame, row, column) order


def _pooled(grid: Triple, stride: tuple[float, float, float], pooling: _Pooling):
    """``(output grid, per-axis centres, output stride)`` of ``pooling`` over ``grid`` of ``stride`` per cell."""
    sizes, axes = zip(*(strided_axis(n, s, k, st, p, d, pooling.ceil_mode) for n, s, k, st, p, d in zip(
        grid, stride, pooling.kernel, pooling.step, pooling.padding, pooling.dilation)))
    return tuple(sizes), axes, tuple(s * st for s, st in zip(stride, pooling.step))


def _with_cls(axes) -> tuple[torch.Tensor, torch.Tensor]:
    """``([1 + n, 2], [1 + n, 1])`` pixel and frame positions of a CLS token and the (frame, row, column) grid of
    ``axes``."""
    frames, rows, columns = torch.meshgrid(*axes, indexing="ij")
    nan = torch.full((1, 3), float("nan"), dtype=torch.float64)
    tokens = torch.cat([nan, torch.stack([frames, rows, columns], dim=-1).reshape(-1, 3)]).float()
    return tokens[:, 1:].contiguous(), tokens[:, :1].contiguous()


@functools.lru_cache(maxsize=64)
def _layout(grid: Triple, stride: tuple[float, float, float], queries: _Pooling, keys: _Pooling) -> _Layout:
    query_grid, query_axes, query_stride = _pooled(grid, stride, queries)
    key_grid, key_axes, key_stride = _pooled(grid, stride, keys)
    positions, times = _with_cls(query_axes)
    own_cells = key_grid == query_grid and key_stride == query_stride
    key_positions, key_times = (None, None) if own_cells else _with_cls(key_axes)
    tensors = read_only(*(t for t in (positions, times, key_positions, key_times) if t is not None),
                        positions=2 if own_cells else 4)
    positions, times = tensors[:2]
    if not own_cells:
        key_positions, key_times = tensors[2:]
    index = torch.arange(1, positions.shape[0])
    return _Layout(query_grid, query_stride, key_grid, positions, times, key_positions, key_times, index)


class MultiscaleAttentionPlacer(LayerPlacer):
    """Places the calls of one ``MultiscaleAttention`` of a torchvision ``MViT``.

    Args:
        module: the attention module.
        embedding: the hook that checks the grid the model's patch embedding made.
        stride: (frames, pixels, pixels) per cell of the grid the module receives: the embedding's stride times the
            query strides of the attention modules before it.
        queries, keys: its query and key poolings.
    """

    def __init__(self, module: nn.Module, embedding: _Embedding, stride: tuple[float, float, float],
                 queries: _Pooling, keys: _Pooling):
        self.module, self.embedding, self.stride = module, embedding, stride
        self.queries, self.keys = queries, keys
        self.key = ("video_mvit.thw", id(module))

    def install(self, context: CallContext) -> list[torch.utils.hooks.RemovableHandle]:
        def see(module, args, kwargs) -> None:
            thw = args[1] if len(args) > 1 else kwargs.get("thw")
            if thw is not None:
                context.values[self.key] = tuple(int(s) for s in thw)

        return [*self.embedding.install(context), self.module.register_forward_pre_hook(see, with_kwargs=True)]

    def place(self, context: CallContext, lead: torch.Size, num_queries: int, num_keys: int) -> Placement:
        embedded = context.values.get(self.embedding.key)
        if embedded is None:
            raise NotPlaceable("it ran before MViT's patch embedding (conv_proj), so its token grid is unknown")
        if isinstance(embedded, str):
            raise NotPlaceable(embedded)
        video = embedded[1] > 1
        grid = context.values.get(self.key)
        if grid is None or len(grid) != 3:
            raise NotPlaceable(f"its forward was given thw={grid}, not the (frames, rows, columns) of its grid")
        layout = _layout(grid, self.stride, self.queries, self.keys)
        words = "global" if self.keys == _NOT_POOLED else (
            f"keys {self.keys.words()} to {'x'.join(map(str, layout.keys))}")
        if self.queries.step != (1, 1, 1):
            words += f"; queries pooled, stride {'x'.join(map(str, self.queries.step))}"
        expected = (layout.positions.shape[0], layout.positions.shape[0] if layout.key_positions is None
                    else layout.key_positions.shape[0])
        if len(lead) != 2 or (num_queries, num_keys) != expected:
            raise NotPlaceable(
                f"its attention has shape [{', '.join(map(str, lead))}, {num_queries}, {num_keys}]; over a "
                f"{'x'.join(map(str, grid))} grid (frames x rows x columns) after a CLS token, with queries "
                f"{self.queries.words()} and keys {self.keys.words()}, it is [B, heads, {expected[0]}, {expected[1]}]"
            )
        if not video and (layout.grid[0], layout.keys[0]) != (1, 1):
            raise NotPlaceable(f"its clip of one frame makes {layout.grid[0]} frames of queries and {layout.keys[0]} "
                               "of keys (padding in time): they are neither one frame nor frames of the clip")
        own_cells = layout.key_positions is None
        # One input frame (an image, which MViT takes as a clip of one): every token is of that frame, an image
        # layer. Its frame positions, the centres of stride cells in time, would differ between pooled grids.
        geometry = LayerGeometry(layout.grid[1:], layout.stride[1:], words, int(lead[1]),
                                 num_prefix_tokens=1 if own_cells else None,
                                 frames=layout.grid[0] if video else None,
                                 frame_stride=layout.stride[0] if video else None)
        return Placement(layout.positions, layout.key_positions, select_tokens(layout.index), geometry,
                         time_positions=layout.times if video else None,
                         time_key_positions=layout.key_times if video else None)


def _input_strides(owner: nn.Module) -> dict[int, tuple[float, float, float] | None]:
    """Per attention module of ``owner`` (by id), the (frames, pixels, pixels) stride of the grid it receives: the
    patch embedding's stride times the query strides of the attention modules before it (MViT runs its blocks in
    module order); None after a query pooling vitmad does not place."""
    stride = tuple(float(s) for s in _triple(owner.conv_proj.stride))
    strides = {}
    for module in module_list(owner):
        if _is(module, "MultiscaleAttention"):
            strides[id(module)] = stride
            pooling = _pooling(module.pool_q, "queries")
            stride = None if stride is None or isinstance(pooling, str) else tuple(
                s * st for s, st in zip(stride, pooling.step))
    return strides


def placer(model: nn.Module, name: str, module: nn.Module):
    if not _is(module, "MultiscaleAttention"):
        return None
    found = innermost_on_path(model, name, lambda owner: _is(owner, "MViT"))
    if found is None:
        return RefusingPlacer(
            "it is an attention module of torchvision's video MViT, recorded without the MViT around it, whose patch "
            "embedding (conv_proj) and block order place its tokens: record the MViT"
        )
    owner = found[1]
    if not isinstance(getattr(owner, "conv_proj", None), nn.Conv3d):
        return RefusingPlacer(f"its MViT's conv_proj is a {type(getattr(owner, 'conv_proj', None)).__name__}, "
                              "not the Conv3d patch embedding vitmad places its tokens by")
    queries, keys = _pooling(module.pool_q, "queries"), _pooling(module.pool_k, "keys")
    for refusal in (queries, keys):
        if isinstance(refusal, str):
            return RefusingPlacer(refusal)
    stride = _input_strides(owner)[id(module)]
    if stride is None:
        return RefusingPlacer("an attention module before it pools its queries in a way vitmad does not place, so "
                              "the grid this one receives is unknown")
    return MultiscaleAttentionPlacer(module, _embedding(owner), stride, queries, keys)
