"""lucidrains' vit-pytorch (``vit_pytorch``): its hierarchical, windowed, convolutional and two-branch models.

Every attention of these models computes its own softmax (``nn.Softmax`` or ``.softmax``) over ``einsum`` logits;
none has a ``fused_attn`` switch, and most have no query projection the generic discovery knows, so
:func:`attention_modules` lists them by class. Each class is recognised by its defining module
(``vit_pytorch.<file>``), its model by the class that holds it, and its tokens are placed from the model's own
modules (patch sizes, einops patterns, strides), read in each call:

- ``max_vit.MaxViT``: each block runs block attention then grid attention, each after an einops ``Rearrange`` of
  the stage's ``[B, C, H, W]`` map: ``b d (x w1) (y w2) -> b x y w1 w2 d`` (window ``(x, y)`` holds the token at map
  row ``x * w + w1``: :func:`~.windows.block_partition`) and ``b d (w1 x) (w2 y) -> ...`` (token ``(w1, w2)`` of
  window ``(x, y)`` at row ``w1 * H / w + x``: :func:`~.windows.grid_partition`); attention ``[B * windows, heads,
  w * w, w * w]``, image-major. The map is the ``Rearrange``'s input, its stride the product of the strides of the
  convolutions before it (the stem's 2, each stage's first MBConv's 2).
- ``twins_svt.TwinsSVT``: each stage's ``PatchEmbedding`` cuts its input into ``patch_size`` patches (an einops
  rearrange, no strided convolution: the stride is the product of the patch sizes). ``LocalAttention`` attends
  within ``patch_size`` windows of the map (``(b x y) c p1 p2``), ``GlobalAttention`` from every token over keys
  pooled by a ``k x k`` convolution of stride ``k``; both merge the batch (and windows) with the heads:
  ``[(B windows heads), Nq, Nk]``.
- ``pit.PiT``: an ``nn.Unfold`` of ``patch_size`` and stride ``patch_size // 2`` (overlapping patches: each at the
  centre of its stride cell), a class token first; each ``Pool`` folds the patches back to a map of
  ``int(sqrt(n))`` rows (a grid with other rows is refused) and halves it with a 3x3 convolution of stride 2, padding 1.
- ``levit.LeViT``: attention over its input map (the stem's four convolutions of stride 2, then 2x per
  downsampling attention); a downsampling attention takes its queries by a 1x1 convolution of stride 2 (each at
  the centre of its stride cell) and its keys from the whole map.
- ``cvt.CvT``: each stage's convolutional embedding makes the map; queries are every token, keys and values are
  pooled by a depthwise convolution of stride ``kv_proj_stride``; batch and heads merged: ``[(B heads), Nq, Nk]``.
- ``cross_vit.CrossViT``: two branches, each a class token then its own ``patch_size`` grid of the image. The
  cross attention (one branch's class token over itself and the other branch's patches) has no query with a
  position: it is skipped as class attention, its maps recorded with ``stats=[..., "prefix_maps"]``.
- ``nest.NesT``: level ``l`` (from the top) cuts the map into ``2^l x 2^l`` blocks (``(b b1 b2) c h w``: blocks
  in the batch, image-major, row-major) and attends within each; the map's stride is the patch size times 2 per
  ``Aggregate`` (a max pool of stride 2) before it.
- ``cct.CCT``: the ``Tokenizer``'s convolutions and max pools make the map, flattened row-major; no class token
  (sequence pooling after the encoder).
- ``t2t.T2TViT``: each ``nn.Unfold`` soft split (kernel, stride, padding ``stride // 2``) makes a grid (each token
  at the centre of its stride cell); the T2T module's transformer after split ``i`` attends over that grid, the
  ViT's layers over the last one after a class token. ``RearrangeImage`` folds the tokens back to a map of
  ``int(sqrt(n))`` rows: a grid with other rows is refused.
- ``scalable_vit.ScalableViT``: ``to_patches`` (7x7, stride 4) then a 3x3 convolution of stride 2 per stage make
  the map; ``ScalableSelfAttention`` from every token over keys pooled by a ``reduction_factor`` convolution of that
  stride, ``InteractiveWindowedSelfAttention`` within ``window_size`` windows (``(b x y) h (w1 w2) d``; the whole
  map without a window size).
- ``crossformer.CrossFormer``: each stage's ``CrossEmbedLayer`` (convolutions of one stride, their maps
  concatenated) makes the map; short-distance attention within ``window_size`` blocks (``b d (h s1) (w s2) -> (b h w)
  d s1 s2``), long-distance attention over a ``window_size`` grid dilated across the map (``b d (l1 h) (l2 w) -> (b h
  w) d l1 l2``: token ``(l1, l2)`` of window ``(h, w)`` at row ``l1 * H / window_size + h``), ``[B * windows, heads,
  N, N]``.
- ``mobile_vit.MobileViT``: each ``MobileViTBlock`` unfolds its ``conv2`` output into ``ph x pw`` patches
  (``b d (h ph) (w pw) -> b (ph pw) (h w) d``): one sequence per pixel offset in a patch, attending across the
  patches, ``[B, ph * pw, heads, N, N]``: a grid of ``H / ph x W / pw`` tokens spaced ``ph x pw`` apart.

- ``regionvit.RegionViT``: two maps per stage, the local tokens (``local_encoder``: strided convolutions, stride 4,
  then 2 per ``Downsample``) and the regional tokens (``region_encoder``: an einops cut into ``local_patch_size *
  window_size`` patches and a 1x1 convolution, then the same ``Downsample`` module run on them too). Each layer of
  an ``R2LTransformer`` calls its one ``Attention`` twice: over the regional tokens alone (R2R, ``[B, heads, rh *
  rw, rh * rw]``: the regional map's grid at its stride), then within each local window after that window's
  regional token (R2L, ``b (h p1) (w p2) d -> (b h w) (p1 p2) d`` with ``p = local / regional`` cells, the regional
  token concatenated first: ``[(B rh rw), heads, 1 + p1 p2, ...]``). In the R2L sequence the regional token is the
  window's summary, a token of another map that stands for no cell of the local one: it has no position, like a
  class token (its attention mass and maps are ``prefix_mass`` and ``prefix_maps``). The two calls are two entries of
  the recording under the module's one name, R2R first; the maps are read per call from the ``R2LTransformer``'s
  arguments.
- ``sep_vit.SepViT``: each ``OverlappingPatchEmbed`` (a convolution of stride 4, then 2) makes the stage's map. Its
  ``DSSA`` makes two softmax calls, recorded as two layers named after their modules: ``attend``, the depthwise
  attention within ``window_size`` windows (``b c (h w1) (w w2) -> (b h w) c (w1 w2)``) after a learned window
  token (first, without a position: a token of no cell, as a class token); and ``window_attend``, the pointwise
  attention among the windows' tokens, ``[B, heads, windows, windows]``, which mixes window ``j``'s map into window
  ``i`` at the same offset in both (``b h i j, b h j w d -> b h i w d``): every pixel moves by the distance between
  the windows' centres, so each window token sits at its window's centre, on the grid of windows at the map's
  stride times the window size. With one window the model skips the pointwise attention. A ``DSSA`` outside a
  ``SepViT`` is refused (the stride of its map is not known).

- ``max_vit_with_registers.MaxViT``: the same block and grid partitions of each block's map (its forward rearranges
  with einops functions: the map is read from the output of the block's MBConv, which both attentions' maps keep the
  size of), each window's sequence led by the stage's ``num_register_tokens`` register tokens (``pack([r, x], 'b *
  d')``: ``[B * windows, heads, registers + w * w, ...]``). The registers stand for no cell: they have no position,
  their attention mass and maps are ``prefix_mass`` and ``prefix_maps``, like RegionViT's regional tokens.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from ..module_index import module_list, named_module_list
from ..placement import CallContext, LayerPlacer, NotPlaceable, Placement, RefusingPlacer
from .stages import (
    StageGrid,
    StagePlacer,
    forward_arguments,
    grid_placement,
    innermost_on_path,
    pair,
    reduction_before,
    strided_centres,
    strided_module_centres,
)
from .windows import PartitionPlacer, block_partition, grid_partition, nchw, stage_stride, window_placement

__all__ = ["placer", "attention_modules"]

# (file, class) of the attention classes placed here; vit.Attention only inside a T2TViT (the plain ViTs' is not
# this family's).
_ATTENTION = {("max_vit", "Attention"), ("max_vit_with_registers", "Attention"), ("twins_svt", "LocalAttention"),
              ("twins_svt", "GlobalAttention"),
              ("pit", "Attention"), ("levit", "Attention"), ("cvt", "Attention"), ("cross_vit", "Attention"),
              ("nest", "Attention"), ("cct", "Attention"), ("mobile_vit", "Attention"),
              ("scalable_vit", "ScalableSelfAttention"), ("scalable_vit", "InteractiveWindowedSelfAttention"),
              ("crossformer", "Attention"), ("regionvit", "Attention")}
# SepViT's DSSA makes two softmax calls in one forward: each of its two softmax modules is recorded as a layer.
_DSSA_SOFTMAX = ("attend", "window_attend")



def _file_and_class(module: nn.Module) -> tuple[str, str] | None:
    cls = type(module)
    if not cls.__module__.startswith("vit_pytorch."):
        return None
    return cls.__module__.removeprefix("vit_pytorch."), cls.__name__


def _is(module: nn.Module, file: str, name: str) -> bool:
    return _file_and_class(module) == (file, name)


def attention_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The attention modules of the models placed or refused here (a T2TViT's ``vit.Attention`` too; of a SepViT
    ``DSSA``, its two softmax modules ``attend`` and ``window_attend``, each a layer)."""
    found = {}
    for name, module in named_module_list(model):
        key = _file_and_class(module)
        if key is None:
            continue
        if key in _ATTENTION or (key == ("vit", "Attention") and _t2t_owner(model, name)):
            found[name] = module
        elif key == ("sep_vit", "DSSA"):
            found.update({f"{name}.{part}" if name else part: getattr(module, part) for part in _DSSA_SOFTMAX})
    return found


def _owner(model: nn.Module, name: str, file: str, cls: str) -> tuple[str, nn.Module] | None:
    """(qualified name, module) of the innermost ``vit_pytorch.<file>.<cls>`` holding module ``name``."""
    return innermost_on_path(model, name, lambda m: _is(m, file, cls))


def _t2t_owner(model: nn.Module, name: str) -> tuple[str, nn.Module] | None:
    return _owner(model, name, "t2t", "T2TViT")


def _relative(name: str, owner_name: str) -> list[str]:
    return (name[len(owner_name) + 1:] if owner_name else name).split(".")


class _MergedHeads(LayerPlacer):
    """Places a call whose batch (and windows) and heads are merged in one leading dim, batch-major:
    ``[(B heads), Nq, Nk]`` (vit_pytorch's ``rearrange(t, 'b (h d) ... -> (b h) ... d')``), as ``inner`` places
    ``[B, heads, Nq, Nk]``."""

    def __init__(self, inner: LayerPlacer, heads: int):
        self.inner, self.heads = inner, int(heads)

    def install(self, context: CallContext) -> list[torch.utils.hooks.RemovableHandle]:
        return self.inner.install(context)

    def place(self, context: CallContext, lead: torch.Size, num_queries: int, num_keys: int) -> Placement:
        heads = self.heads
        if len(lead) != 1 or int(lead[0]) % heads:
            raise NotPlaceable(f"its attention has leading dims {list(lead)}, expected one dim: the batch and its "
                               f"{heads} heads merged, batch-major")
        split = torch.Size([int(lead[0]) // heads, heads])
        placement = self.inner.place(context, split, num_queries, num_keys)
        inner_fold = placement.fold
        return dataclasses.replace(
            placement, positions=_merge(placement.positions, split),
            key_positions=None if placement.key_positions is None else _merge(placement.key_positions, split),
            fold=lambda values: inner_fold(values.reshape(*split, values.shape[-1])))


def _merge(positions: torch.Tensor, split: torch.Size) -> torch.Tensor:
    """Positions broadcastable against ``[L, H]`` as positions of ``[L * H]``."""
    if positions.dim() <= 2:  # one sequence for every matrix
        return positions
    return positions.expand(*split, *positions.shape[-2:]).reshape(-1, *positions.shape[-2:])


class _Windows(LayerPlacer):
    """Attention within a partition of a stage's map whose stride the model states exactly (patches cut by
    einops, no convolution sees the image first): ``stages`` gives the map (the output of its latest embedding),
    ``partition(grid)`` the windows (see :func:`~.windows.window_placement`) and their description; ``prefix``
    tokens without a position lead each window's sequence."""

    def __init__(self, stages: StageGrid, partition, order: str = "windows in batch", prefix: int = 0):
        self.stages, self.partition, self.order, self.prefix = stages, partition, order, prefix

    def install(self, context: CallContext) -> list[torch.utils.hooks.RemovableHandle]:
        return self.stages.install(context)

    def place(self, context: CallContext, lead: torch.Size, num_queries: int, num_keys: int) -> Placement:
        stage = self.stages.current(context)
        cells, attention = self.partition(stage.grid)
        return window_placement(cells, stage.grid, stage.stride, lead, num_queries, num_keys, order=self.order,
                                attention=attention, prefix=self.prefix)


def _pooled_keys(conv: nn.Module):
    """The key layout of keys pooled from the stage's map by the convolution ``conv``."""

    def keys(grid, stride):
        _, centres = strided_module_centres(grid, stride, conv)
        kernel, step = pair(conv.kernel_size), pair(conv.stride)
        return centres, f"keys pooled by a {kernel[0]}x{kernel[1]} convolution of stride {step[0]}x{step[1]}"

    return keys


# MaxViT ---------------------------------------------------------------------------------------------------------

_MAXVIT_BLOCK = "b d (x w1) (y w2) -> b x y w1 w2 d"
_MAXVIT_GRID = "b d (w1 x) (w2 y) -> b x y w1 w2 d"


def _maxvit_partition(kind: str, window: tuple[int, int]):
    """MaxViT's block (``"block"``) or dilated grid (``"grid"``) partition of a map into ``window`` windows."""

    def partition(grid):
        if kind == "block":
            return block_partition(grid, window), f"window {window[0]}x{window[1]}"
        step = (grid[0] // window[0], grid[1] // window[1])
        return grid_partition(grid, window), f"grid {window[0]}x{window[1]}, dilated every {step[0]}x{step[1]}"

    return partition


def _maxvit(model: nn.Module, name: str) -> LayerPlacer | None:
    found = _owner(model, name, "max_vit", "MaxViT")
    if found is None:
        return None
    maxvit = found[1]
    residual = name.rpartition(".")[0]  # the attention is the fn of a Residual in the block's nn.Sequential
    block_name, _, index = residual.rpartition(".")
    block = model.get_submodule(block_name) if block_name else None
    if not isinstance(block, nn.Sequential) or not index.isdigit():
        return RefusingPlacer("it is not in a MaxViT block (an nn.Sequential of MBConv, Rearrange, Residual, ...)")
    rearrange = next((m for m in reversed(list(block)[:int(index)]) if type(m).__name__ == "Rearrange"), None)
    pattern = getattr(rearrange, "pattern", None)
    if pattern not in (_MAXVIT_BLOCK, _MAXVIT_GRID):
        return RefusingPlacer(f"the Rearrange before it has pattern {pattern!r}, expected {_MAXVIT_BLOCK!r} (block "
                              f"attention) or {_MAXVIT_GRID!r} (grid attention)")
    window = (int(rearrange.axes_lengths["w1"]), int(rearrange.axes_lengths["w2"]))
    partition = _maxvit_partition("block" if pattern == _MAXVIT_BLOCK else "grid", window)
    return PartitionPlacer(model, name, rearrange, nchw, partition, "windows in batch",
                           reduction=reduction_before(maxvit, rearrange))


def _maxvit_registers(model: nn.Module, name: str) -> LayerPlacer | None:
    """MaxViT with register tokens: its forward rearranges the map with einops functions (no module to hook), as
    MaxViT's modules do, then packs the stage's register tokens before each window's tokens: ``[(B x y), registers + w
    * w, d]``. The map is the output of the block's MBConv (the grid attention runs on the block attention's output,
    of the same size)."""
    found = _owner(model, name, "max_vit_with_registers", "MaxViT")
    if found is None:
        return RefusingPlacer("it is an Attention of vit_pytorch.max_vit_with_registers outside its MaxViT, whose "
                              "forward partitions the map and packs the register tokens; record the MaxViT")
    owner_name, maxvit = found
    parts = _relative(name, owner_name)
    if len(parts) != 4 or parts[0] != "layers" or not parts[1].isdigit() or parts[2] not in ("1", "2") \
            or parts[3] != "0":
        return RefusingPlacer(f"it is not the block (layers.i.1.0) or grid (layers.i.2.0) attention of a MaxViT "
                              f"block ({name})")
    block = int(parts[1])
    conv = maxvit.layers[block][0]
    window = (int(maxvit.window_size), int(maxvit.window_size))
    registers = int(maxvit.register_tokens[block].shape[0])
    return PartitionPlacer(model, name, conv, nchw, _maxvit_partition("block" if parts[2] == "1" else "grid", window),
                           "windows in batch", output=True,
                           reduction=reduction_before(maxvit, maxvit.layers[block][1][0]), prefix=registers)


# Twins-SVT --------------------------------------------------------------------------------------------------------

def _patch_embedding_stages(owner: nn.Module, embeddings: list[nn.Module]) -> StageGrid:
    """The stages of a model whose ``PatchEmbedding`` modules cut ``patch_size`` patches by einops: each one's
    stride is its patch size."""
    return StageGrid(owner, embeddings, strides=[int(e.patch_size) for e in embeddings])


def _twins(model: nn.Module, name: str, module: nn.Module) -> LayerPlacer | None:
    found = _owner(model, name, "twins_svt", "TwinsSVT")
    if found is None:
        return None
    twins = found[1]
    stages = _patch_embedding_stages(twins, [m for m in module_list(twins) if _is(m, "twins_svt", "PatchEmbedding")])
    if _is(module, "twins_svt", "LocalAttention"):
        size = int(module.patch_size)

        def partition(grid):
            return block_partition(grid, (size, size)), f"window {size}x{size}"

        return _MergedHeads(_Windows(stages, partition), module.heads)
    return _MergedHeads(StagePlacer(stages, _pooled_keys(module.to_kv)), module.heads)


# PiT ------------------------------------------------------------------------------------------------------------

class _InputSize:
    """Keeps the ``(height, width)`` of the ``[B, C, H, W]`` image or map a module receives in each call."""

    def __init__(self, module: nn.Module, what: str):
        self.module, self.what, self.key = module, what, ("vit_pytorch.input", id(module))

    def install(self, context: CallContext) -> list[torch.utils.hooks.RemovableHandle]:
        def see(module, args) -> None:
            x = args[0] if args else None
            context.values[self.key] = tuple(int(s) for s in x.shape[-2:]) if isinstance(x, torch.Tensor) \
                and x.dim() == 4 else None

        return [self.module.register_forward_pre_hook(see)]

    def get(self, context: CallContext) -> tuple[int, int]:
        size = context.values.get(self.key)
        if size is None:
            raise NotPlaceable(f"{self.what} did not receive a [B, C, H, W] tensor before it ran")
        return size


def _unfold_grid(size: tuple[int, int], stride: tuple[float, float], unfold: nn.Unfold) -> tuple[int, int]:
    """The grid of an ``nn.Unfold`` (a soft split: one token per window) over ``size`` cells."""
    return strided_centres(size, stride, unfold.kernel_size, unfold.stride, unfold.padding, unfold.dilation)[0]


def _check_folded(grid: tuple[int, int], where: str) -> None:
    """PiT's Pool and T2T-ViT's RearrangeImage fold ``n`` tokens back to a map of ``int(sqrt(n))`` rows (einops
    infers the columns): the tokens of a ``grid`` with another row count land on other cells."""
    rows = math.isqrt(grid[0] * grid[1])
    if rows != grid[0]:
        raise NotPlaceable(f"{where} folds the {grid[0]}x{grid[1]} grid of tokens into {rows} rows of "
                           f"{grid[0] * grid[1] / rows:g} (int(sqrt(n)) rows), not the grid's own rows; pass an "
                           "image whose grid has int(sqrt(h * w)) == h rows (a square one)")


class _PitPlacer(LayerPlacer):
    def __init__(self, pit: nn.Module, stage: int):
        self.pit, self.stage = pit, stage
        self.image = _InputSize(pit.to_patch_embedding, "PiT's patch embedding")

    def install(self, context: CallContext) -> list[torch.utils.hooks.RemovableHandle]:
        return self.image.install(context)

    def place(self, context: CallContext, lead: torch.Size, num_queries: int, num_keys: int) -> Placement:
        unfold = self.pit.to_patch_embedding[0]
        grid = _unfold_grid(self.image.get(context), (1.0, 1.0), unfold)
        step = pair(unfold.stride)
        stride = (float(step[0]), float(step[1]))
        pools = [m for m in self.pit.layers if _is(m, "pit", "Pool")][:self.stage]
        for pool in pools:
            _check_folded(grid, "a Pool before its stage")
            conv = pool.downsample.net[0]
            grid, _ = strided_module_centres(grid, stride, conv)
            stride = tuple(s * c for s, c in zip(stride, pair(conv.stride)))
        return grid_placement(lead, num_queries, num_keys, grid=grid, stride=stride, attention="global", prefix=1)


def _pit(model: nn.Module, name: str) -> LayerPlacer | None:
    found = _owner(model, name, "pit", "PiT")
    if found is None:
        return None
    owner_name, pit = found
    parts = _relative(name, owner_name)
    if parts[0] != "layers" or not parts[1].isdigit():
        return None
    before = list(pit.layers)[:int(parts[1])]
    return _PitPlacer(pit, sum(_is(m, "pit", "Pool") for m in before))


# LeViT ----------------------------------------------------------------------------------------------------------

class _LevitPlacer(LayerPlacer):
    """Attention over its own input map; a downsampling one takes its queries by a 1x1 convolution of stride 2."""

    def __init__(self, model: nn.Module, name: str, module: nn.Module, reduction: int):
        self.model, self.name, self.module, self.reduction = model, name, module, reduction
        self.map = _InputSize(module, "it")

    def install(self, context: CallContext) -> list[torch.utils.hooks.RemovableHandle]:
        return self.map.install(context)

    def place(self, context: CallContext, lead: torch.Size, num_queries: int, num_keys: int) -> Placement:
        grid = self.map.get(context)
        stride = stage_stride(self.model, self.name, context.image_size, grid, self.reduction)
        query_conv = self.module.to_q[0]
        step = pair(query_conv.stride)
        if step == (1, 1):
            return grid_placement(lead, num_queries, num_keys, grid=grid, stride=stride, attention="global")
        query_grid, queries = strided_module_centres(grid, stride, query_conv)
        keys = strided_centres(grid, stride, 1, 1, 0)[1]
        return grid_placement(lead, num_queries, num_keys, grid=query_grid,
                              stride=(stride[0] * step[0], stride[1] * step[1]),
                              attention=f"global; queries subsampled, stride {step[0]}", queries=queries, keys=keys)


def _levit(model: nn.Module, name: str, module: nn.Module) -> LayerPlacer | None:
    found = _owner(model, name, "levit", "LeViT")
    if found is None:
        return None
    levit = found[1]
    stride = 1
    for conv in levit.conv_embedding:
        stride *= pair(conv.stride)[0]
    for attention in module_list(levit.backbone):
        if attention is module:
            return _LevitPlacer(model, name, module, stride)
        if _is(attention, "levit", "Attention"):
            stride *= pair(attention.to_q[0].stride)[0]
    return None


# CvT ------------------------------------------------------------------------------------------------------------

def _cvt(model: nn.Module, name: str, module: nn.Module) -> LayerPlacer | None:
    found = _owner(model, name, "cvt", "CvT")
    if found is None:
        return None
    cvt = found[1]
    stages = StageGrid(cvt, [stage[0] for stage in cvt.layers])
    return _MergedHeads(StagePlacer(stages, _pooled_keys(module.to_kv.net[0])), module.heads)


# CrossViT -------------------------------------------------------------------------------------------------------

class _BranchPlacer(LayerPlacer):
    """A CrossViT branch's tokens: its class token, then its ``patch_size`` grid of the image."""

    def __init__(self, embedder: nn.Module):
        self.embedder, self.image = embedder, _InputSize(embedder, "the branch's ImageEmbedder")
        self.patch = (int(embedder.to_patch_embedding[0].axes_lengths["p1"]),
                      int(embedder.to_patch_embedding[0].axes_lengths["p2"]))

    def install(self, context: CallContext) -> list[torch.utils.hooks.RemovableHandle]:
        return self.image.install(context)

    def place(self, context: CallContext, lead: torch.Size, num_queries: int, num_keys: int) -> Placement:
        height, width = self.image.get(context)
        grid = (height // self.patch[0], width // self.patch[1])
        return grid_placement(lead, num_queries, num_keys, grid=grid, stride=(float(self.patch[0]),
                              float(self.patch[1])), attention="global", prefix=1)


_CROSS = ("cross attention: only one branch's class token queries, over itself and the other branch's patches "
          "(CrossViT); its attention over them is recorded with stats=[..., 'prefix_maps'] (rec.class_attention_maps)")


def _crossvit(model: nn.Module, name: str):
    from . import ClassQueries

    found = _owner(model, name, "cross_vit", "CrossViT")
    if found is None:
        return None
    owner_name, crossvit = found
    parts = _relative(name, owner_name)
    branches = {"0": crossvit.sm_image_embedder, "1": crossvit.lg_image_embedder}
    # multi_scale_encoder.layers.<i>.<0 small | 1 large>.layers.<j>.0: a branch's own transformer;
    # multi_scale_encoder.layers.<i>.2.layers.<j>.<0: small over large | 1: large over small>.fn: cross attention.
    if len(parts) == 7 and parts[:2] == ["multi_scale_encoder", "layers"] and parts[3] in branches \
            and parts[4] == "layers" and parts[6] == "0":
        return _BranchPlacer(branches[parts[3]])
    if len(parts) == 8 and parts[:2] == ["multi_scale_encoder", "layers"] and parts[3] == "2" \
            and parts[4] == "layers" and parts[6] in branches and parts[7] == "fn":
        other = "1" if parts[6] == "0" else "0"
        size = "large" if other == "1" else "small"
        return ClassQueries(_CROSS, _BranchPlacer(branches[other]),
                            f"the class token, then the {size}-patch branch's grid")
    return RefusingPlacer(f"it is not where CrossViT's MultiScaleEncoder holds its attention ({'.'.join(parts)})")


# NesT -----------------------------------------------------------------------------------------------------------

def _nest(model: nn.Module, name: str) -> LayerPlacer | None:
    found = _owner(model, name, "nest", "NesT")
    if found is None:
        return None
    owner_name, nest = found
    parts = _relative(name, owner_name)
    if parts[0] != "layers" or not parts[1].isdigit():
        return None
    level = int(parts[1])
    blocks = 2 ** (len(nest.layers) - 1 - level)  # blocks a side: NesT.forward's block_size
    transformer = nest.layers[level][0]
    patch = int(nest.to_patch_embedding[0].axes_lengths["p1"])

    def read_map(x: torch.Tensor):
        # [(B b1 b2), C, h, w]: each block's map, blocks in the batch.
        if x.dim() != 4 or x.shape[0] % (blocks * blocks):
            return None
        return int(x.shape[0]) // (blocks * blocks), int(x.shape[2]) * blocks, int(x.shape[3]) * blocks

    stages = _FixedStride(transformer, read_map, float(patch * 2 ** level))

    def partition(grid):
        size = (grid[0] // blocks, grid[1] // blocks)
        return block_partition(grid, size), f"block {size[0]}x{size[1]} ({blocks}x{blocks} blocks)"

    return _Windows(stages, partition)


class _FixedStride:
    """A :class:`~.stages.StageGrid` stand-in for a map of a stride the model fixes: the map is read from the
    input of ``module`` by ``read_map`` (``(batch, h, w)`` or None)."""

    def __init__(self, module: nn.Module, read_map, stride: float):
        self.module, self.read_map, self.stride = module, read_map, stride
        self.key = ("vit_pytorch.map", id(module))

    def install(self, context: CallContext) -> list[torch.utils.hooks.RemovableHandle]:
        def see(module, args) -> None:
            x = args[0] if args else None
            context.values[self.key] = self.read_map(x) if isinstance(x, torch.Tensor) else None

        return [self.module.register_forward_pre_hook(see)]

    def current(self, context: CallContext):
        seen = context.values.get(self.key)
        if seen is None:
            raise NotPlaceable(f"the map of its level was not seen ({type(self.module).__name__} did not run on "
                               "[B * blocks, C, h, w] first)")
        return _Seen(grid=(seen[1], seen[2]), stride=(self.stride, self.stride))


@dataclasses.dataclass(frozen=True)
class _Seen:
    grid: tuple[int, int]
    stride: tuple[float, float]


# CCT ------------------------------------------------------------------------------------------------------------

def _cct(model: nn.Module, name: str) -> LayerPlacer | None:
    found = _owner(model, name, "cct", "CCT")
    if found is None:
        return None
    cct = found[1]
    convs = [m for m in module_list(cct.tokenizer.conv_layers) if isinstance(m, (nn.Conv2d, nn.MaxPool2d))]
    return StagePlacer(StageGrid(cct, convs))


# T2T-ViT --------------------------------------------------------------------------------------------------------

class _T2tPlacer(LayerPlacer):
    """Tokens on the grid of the ``split``-th soft split (``nn.Unfold``) of the T2T module, after ``prefix``
    tokens without a position."""

    def __init__(self, t2t: nn.Module, split: int, prefix: int):
        self.t2t, self.split, self.prefix = t2t, split, prefix
        self.image = _InputSize(t2t.to_patch_embedding, "T2T-ViT's to_patch_embedding")

    def install(self, context: CallContext) -> list[torch.utils.hooks.RemovableHandle]:
        return self.image.install(context)

    def place(self, context: CallContext, lead: torch.Size, num_queries: int, num_keys: int) -> Placement:
        grid = self.image.get(context)
        stride = (1.0, 1.0)
        unfolds = [m for m in self.t2t.to_patch_embedding if isinstance(m, nn.Unfold)]
        for index, unfold in enumerate(unfolds[:self.split + 1]):
            if index:
                _check_folded(grid, f"the RearrangeImage before soft split {index}")
            grid = _unfold_grid(grid, stride, unfold)
            step = pair(unfold.stride)
            stride = (stride[0] * step[0], stride[1] * step[1])
        return grid_placement(lead, num_queries, num_keys, grid=grid, stride=stride, attention="global",
                              prefix=self.prefix)


def _t2t(model: nn.Module, name: str) -> LayerPlacer | None:
    found = _t2t_owner(model, name)
    if found is None:
        return None
    owner_name, t2t = found
    parts = _relative(name, owner_name)
    unfolds = sum(isinstance(m, nn.Unfold) for m in t2t.to_patch_embedding)
    if parts[0] == "transformer":
        return _T2tPlacer(t2t, unfolds - 1, 1)
    if parts[0] == "to_patch_embedding" and parts[1].isdigit():
        before = list(t2t.to_patch_embedding)[:int(parts[1])]
        return _T2tPlacer(t2t, sum(isinstance(m, nn.Unfold) for m in before) - 1, 0)
    return RefusingPlacer(f"it is neither in T2T-ViT's to_patch_embedding nor in its transformer ({name})")


# ScalableViT ----------------------------------------------------------------------------------------------------

def _scalable_vit(model: nn.Module, name: str, module: nn.Module) -> LayerPlacer | None:
    found = _owner(model, name, "scalable_vit", "ScalableViT")
    if found is None:
        return None
    scalable = found[1]
    stages = StageGrid(scalable, [scalable.to_patches] + [downsample.conv for _, downsample in scalable.layers
                                                           if downsample is not None])
    if _is(module, "scalable_vit", "ScalableSelfAttention"):
        return StagePlacer(stages, _pooled_keys(module.to_k))
    size = module.window_size

    def partition(grid):
        window = grid if size is None else (int(size), int(size))
        return block_partition(grid, window), f"window {window[0]}x{window[1]}"

    return _Windows(stages, partition)


# CrossFormer ----------------------------------------------------------------------------------------------------

def _crossformer(model: nn.Module, name: str, module: nn.Module) -> LayerPlacer | None:
    found = _owner(model, name, "crossformer", "CrossFormer")
    if found is None:
        return None
    crossformer = found[1]
    # Each CrossEmbedLayer's convolutions share one stride and output size: its first one gives the stage's map.
    stages = StageGrid(crossformer, [embed.convs[0] for embed, _ in crossformer.layers])
    size, kind = int(module.window_size), module.attn_type  # "short" or "long" (its __init__ asserts so)

    def partition(grid):
        if kind == "short":
            return block_partition(grid, (size, size)), f"window {size}x{size} (short distance)"
        step = (grid[0] // size, grid[1] // size)
        return grid_partition(grid, (size, size)), (f"grid {size}x{size}, dilated every {step[0]}x{step[1]} (long "
                                                    "distance)")

    return _Windows(stages, partition)


# MobileViT ------------------------------------------------------------------------------------------------------

def _mobilevit(model: nn.Module, name: str) -> LayerPlacer | None:
    found = _owner(model, name, "mobile_vit", "MobileViT")
    block = _owner(model, name, "mobile_vit", "MobileViTBlock")
    if found is None or block is None:
        return None
    mobilevit, block = found[1], block[1]
    patch = (int(block.ph), int(block.pw))

    def partition(grid):
        if grid[0] % patch[0] or grid[1] % patch[1]:
            raise NotPlaceable(f"its {grid[0]}x{grid[1]} map is not a whole number of {patch[0]}x{patch[1]} patches")
        cells = (grid[0] // patch[0], grid[1] // patch[1])
        return grid_partition(grid, cells), (f"across {patch[0]}x{patch[1]} patches: grid {cells[0]}x{cells[1]}, "
                                             f"dilated every {patch[0]}x{patch[1]}")

    conv = block.conv2[0]
    return PartitionPlacer(model, name, block.conv2, nchw, partition, "windows before heads", output=True,
                           reduction=reduction_before(mobilevit, conv))


# RegionViT ------------------------------------------------------------------------------------------------------

def _conv_stride(module: nn.Module) -> tuple[int, int]:
    """The product of the strides of the convolutions in ``module`` (a chain of them on the main path)."""
    stride = (1, 1)
    for conv in module.modules():
        if isinstance(conv, nn.Conv2d):
            step = pair(conv.stride)
            stride = (stride[0] * step[0], stride[1] * step[1])
    return stride


class _RegionPlacer(LayerPlacer):
    """The two calls of one RegionViT ``Attention`` per layer of its ``R2LTransformer``: over the regional map (R2R),
    then within each local window after its regional token (R2L); the maps are the transformer's arguments.

    Args:
        transformer: the ``R2LTransformer`` holding the attention.
        local_stride, region_stride: pixels per cell of its local and regional maps.
    """

    def __init__(self, transformer: nn.Module, local_stride: tuple[int, int], region_stride: tuple[int, int]):
        self.transformer = transformer
        self.local_stride = (float(local_stride[0]), float(local_stride[1]))
        self.region_stride = (float(region_stride[0]), float(region_stride[1]))
        self.key = ("vit_pytorch.regions", id(transformer))

    def install(self, context: CallContext) -> list[torch.utils.hooks.RemovableHandle]:
        def see(module, args, kwargs) -> None:
            maps = forward_arguments(module, args, kwargs)
            local, region = maps.get("local_tokens"), maps.get("region_tokens")
            if isinstance(local, torch.Tensor) and isinstance(region, torch.Tensor) and local.dim() == 4 \
                    and region.dim() == 4:
                context.values[self.key] = (int(local.shape[0]), tuple(int(n) for n in local.shape[-2:]),
                                            tuple(int(n) for n in region.shape[-2:]))
            else:
                context.values.pop(self.key, None)

        return [self.transformer.register_forward_pre_hook(see, with_kwargs=True)]

    def place(self, context: CallContext, lead: torch.Size, num_queries: int, num_keys: int) -> Placement:
        seen = context.values.get(self.key)
        if seen is None:
            raise NotPlaceable("its R2LTransformer did not receive [B, C, h, w] local and regional maps before it "
                               "attended, so where its tokens are is not known; run the RegionViT on images")
        batch, local, region = seen
        if len(lead) == 2 and int(lead[0]) == batch and num_queries == region[0] * region[1]:
            # R2R: the regional tokens alone (an R2L call has 1 + p1 p2 > 1 tokens, and B * rh * rw rows where
            # there are several regions).
            return grid_placement(lead, num_queries, num_keys, grid=region, stride=self.region_stride,
                                  attention="regional tokens (R2R)")
        if local[0] % region[0] or local[1] % region[1]:
            raise NotPlaceable(f"its {local[0]}x{local[1]} local map is not a whole number of windows per cell of "
                               f"the {region[0]}x{region[1]} regional map")
        window = (local[0] // region[0], local[1] // region[1])
        return window_placement(block_partition(local, window), local, self.local_stride, lead, num_queries,
                                num_keys, order="windows in batch", prefix=1,
                                attention=f"window {window[0]}x{window[1]} after its regional token (R2L)")


def _regionvit(model: nn.Module, name: str) -> LayerPlacer:
    found = _owner(model, name, "regionvit", "RegionViT")
    transformer = _owner(model, name, "regionvit", "R2LTransformer")
    if found is None or transformer is None:
        return RefusingPlacer("it is RegionViT's attention outside a RegionViT's R2LTransformer, whose local and "
                              "regional maps (and their strides) place its tokens; record the RegionViT")
    regionvit, transformer = found[1], transformer[1]
    stage = next((i for i, layer in enumerate(regionvit.layers) if layer[2] is transformer), None)
    if stage is None:
        return RefusingPlacer("its R2LTransformer is not one of the RegionViT's stages (layers[i][2])")
    cut = regionvit.region_encoder[0].axes_lengths
    local, region = _conv_stride(regionvit.local_encoder), _conv_stride(regionvit.region_encoder)
    local, region = list(local), [region[0] * int(cut["p1"]), region[1] * int(cut["p2"])]
    for layer in list(regionvit.layers)[:stage + 1]:
        down = _conv_stride(layer[0])  # the one Downsample runs on both maps (nn.Identity in the first stage)
        local, region = [s * d for s, d in zip(local, down)], [s * d for s, d in zip(region, down)]
    return _RegionPlacer(transformer, tuple(local), tuple(region))


# SepViT ---------------------------------------------------------------------------------------------------------

class _WindowTokens(LayerPlacer):
    """SepViT's pointwise attention: one token per ``window_size x window_size`` window of the stage's map (the
    ``DSSA``'s, read in each call), at the window's centre."""

    def __init__(self, stages: StageGrid, dssa: nn.Module):
        self.stages, self.dssa = stages, dssa

    def install(self, context: CallContext) -> list[torch.utils.hooks.RemovableHandle]:
        return self.stages.install(context)

    def place(self, context: CallContext, lead: torch.Size, num_queries: int, num_keys: int) -> Placement:
        stage, size = self.stages.current(context), int(self.dssa.window_size)
        if stage.grid[0] % size or stage.grid[1] % size:
            raise NotPlaceable(f"its {stage.grid[0]}x{stage.grid[1]} map is not a whole number of {size}x{size} "
                               "windows")
        grid = (stage.grid[0] // size, stage.grid[1] // size)
        return grid_placement(lead, num_queries, num_keys, grid=grid,
                              stride=(stage.stride[0] * size, stage.stride[1] * size),
                              attention=f"window tokens, one per {size}x{size} window, at its centre (pointwise)")


def _dssa_of(model: nn.Module, name: str) -> nn.Module | None:
    """The SepViT ``DSSA`` whose softmax module ``name`` is (``attend`` or ``window_attend``), or None."""
    parent, _, part = name.rpartition(".")
    if part not in _DSSA_SOFTMAX:
        return None
    dssa = model.get_submodule(parent) if parent else model
    return dssa if _is(dssa, "sep_vit", "DSSA") else None


def _sepvit(model: nn.Module, name: str, dssa: nn.Module) -> LayerPlacer:
    found = _owner(model, name, "sep_vit", "SepViT")
    if found is None:
        return RefusingPlacer("it is SepViT's depthwise-separable self-attention (DSSA) outside a SepViT, whose "
                              "patch embeddings give the pixel stride of the map it attends over; record the SepViT")
    sepvit = found[1]
    stages = StageGrid(sepvit, [layer[0].conv for layer in sepvit.layers])
    if name.rpartition(".")[2] == "window_attend":
        return _WindowTokens(stages, dssa)

    def partition(grid):
        size = int(dssa.window_size)  # read in each call: SepViT builds every DSSA with 7, whatever it is given
        return block_partition(grid, (size, size)), f"window {size}x{size} after its window token (depthwise)"

    return _Windows(stages, partition, prefix=1)


# Models that cut the image into patches by einops or nn.Unfold before any convolution: their convolutions run on
# patches or tokens, never on the image, so a forward call starts at the model's own forward.
_CUT_BEFORE_CONVOLVING = (("pit", "PiT"), ("twins_svt", "TwinsSVT"), ("nest", "NesT"))


def token_convolutions(model: nn.Module) -> set[int]:
    """Ids of the convolutions of PiT, Twins-SVT and NesT, none of which runs on the image: the recorder starts no
    call at them (the first of them runs after the patch embedding, or after PiT's first stage)."""
    return {id(conv) for owner in module_list(model) if _file_and_class(owner) in _CUT_BEFORE_CONVOLVING
            for conv in owner.modules() if isinstance(conv, nn.Conv2d)}


def placer(model: nn.Module, name: str, module: nn.Module):
    key = _file_and_class(module)
    if key is None:
        dssa = _dssa_of(model, name)
        return None if dssa is None else _sepvit(model, name, dssa)
    file = key[0]
    if file == "max_vit":
        return _maxvit(model, name)
    if file == "max_vit_with_registers":
        return _maxvit_registers(model, name)
    if file == "twins_svt":
        return _twins(model, name, module)
    if file == "pit":
        return _pit(model, name)
    if file == "levit":
        return _levit(model, name, module)
    if file == "cvt":
        return _cvt(model, name, module)
    if file == "cross_vit":
        return _crossvit(model, name)
    if file == "nest":
        return _nest(model, name)
    if file == "cct":
        return _cct(model, name)
    if file == "scalable_vit":
        return _scalable_vit(model, name, module)
    if file == "crossformer":
        return _crossformer(model, name, module)
    if file == "mobile_vit":
        return _mobilevit(model, name)
    if file == "regionvit":
        return _regionvit(model, name)
    if key == ("vit", "Attention"):
        return _t2t(model, name)
    return None
