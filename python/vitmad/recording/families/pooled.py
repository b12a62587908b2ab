"""Spatial-reduction attention: every query of a stage's grid attends over keys pooled from that grid.

- PVT v2 (timm ``pvt_v2_*``, transformers ``PvtV2Model``), Segformer (``SegformerModel``) and GLPN's Segformer
  encoder (``GLPNModel``): keys made by a
  convolution with kernel = stride = ``sr_ratio`` (none in the last stage), or, in the linear variant
  (``pvt_v2_b2_li``, ``linear_attention=True``), by ``AdaptiveAvgPool2d(7)``; overlapping patch embeddings
  (stride 4, then 2 per stage).
- PVT v1 (transformers ``PvtModel``): the same with non-overlapping patch embeddings, and a CLS token, without a
  position, in the last stage.
- Twins (timm ``twins_pcpvt_*``, ``twins_svt_*``): ``GlobalSubSampleAttn`` (keys by a strided convolution) and
  ``LocallyGroupedAttn``, attention inside ``ws x ws`` windows of the grid zero-padded at the bottom and right,
  unmasked: a padding token is a key at its cell of the padded grid, past the image edge, and no query (it
  stands for no image content; docs/definition.md, windows).

- CvT (transformers ``CvtModel``): queries, keys and values made by depthwise convolutions of the stage's map
  (keys and values with stride ``stride_kv``, 2 by default; queries with ``stride_q``, 1 by default), and a CLS
  token, without a position, in the stages that have one (the last, by default), as query and as key.

Each token sits at the centre of its cell of the stage's grid (:mod:`.stages`), a pooled key at the centre of
its stride cell (with kernel = stride = ``sr``, the cells it pools); the pixel stride of a stage is the product
of the strides of the patch embeddings that ran.
"""

from __future__ import annotations

import torch
from torch import nn

from ..module_index import module_list, named_module_list
from ..placement import CallContext, LayerGeometry, LayerPlacer, NotPlaceable, Placement, cell_centres
from .stages import (
    KeyLayout,
    StageGrid,
    StagePlacer,
    adaptive_centres,
    defined_in,
    global_keys,
    grid_placement,
    pair,
    strided_module_centres,
)

__all__ = ["placer", "attention_modules"]


def attention_modules(model: nn.Module) -> dict[str, nn.Module]:
    """CvT's attention (its projections are named ``projection_query`` / ``projection_key``)."""
    return {n: m for n, m in named_module_list(model) if defined_in(m, "CvtSelfAttention", "modeling_cvt")}


def _conv_keys(conv: nn.Conv2d) -> KeyLayout:
    def keys(grid, stride):
        _, centres = strided_module_centres(grid, stride, conv)
        kh, kw = pair(conv.kernel_size)
        return centres, f"keys pooled {kh}x{kw} by a strided convolution"

    return keys


def _adaptive_keys(pool: nn.AdaptiveAvgPool2d) -> KeyLayout:
    def keys(grid, stride):
        oh, ow = pair(pool.output_size)
        return adaptive_centres(grid, stride, pool.output_size), f"keys pooled to {oh}x{ow} (adaptive average)"

    return keys


class PaddedWindowPlacer(LayerPlacer):
    """Twins' ``LocallyGroupedAttn``: the stage's grid, padded at the bottom and right to a multiple of ``ws``,
    cut into ``ws x ws`` windows in row-major order, attention ``[B, nW, H, ws * ws, ws * ws]``; the padding,
    which the model does not mask, is a key at its cell of the padded grid and no query."""

    def __init__(self, stages: StageGrid, window: int):
        self.stages, self.window = stages, window

    def install(self, context: CallContext) -> list[torch.utils.hooks.RemovableHandle]:
        return self.stages.install(context)

    def place(self, context: CallContext, lead: torch.Size, num_queries: int, num_keys: int) -> Placement:
        stage = self.stages.current(context)
        (gh, gw), ws = stage.grid, self.window
        nh, nw = -(-gh // ws), -(-gw // ws)
        if len(lead) != 3 or lead[1] != nh * nw or num_queries != ws * ws or num_keys != ws * ws:
            raise NotPlaceable(
                f"its attention has shape [{', '.join(map(str, lead))}, {num_queries}, {num_keys}]; expected "
                f"[B, {nh * nw}, H, {ws * ws}, {ws * ws}]: the {nh}x{nw} windows of {ws}x{ws} tokens of the "
                f"{gh}x{gw} grid padded at the bottom and right"
            )

        def windows(cells: torch.Tensor) -> torch.Tensor:
            return cells.reshape(nh, ws, nw, ws, 2).transpose(1, 2).reshape(nh * nw, 1, ws * ws, 2)

        cells = cell_centres(nh * ws, nw * ws, stage.stride)
        # docs/definition.md, windows: the padding is attended as a key at its cell of the padded grid (past the
        # image edge), and is no query: it stands for no image content.
        key_positions = windows(cells) if (nh * ws, nw * ws) != (gh, gw) else None
        cells = cells.clone()
        cells[gh:] = float("nan")
        cells[:, gw:] = float("nan")
        positions = windows(cells)

        def fold(values: torch.Tensor) -> torch.Tensor:
            batch, heads = values.shape[0], values.shape[2]
            grid = values.reshape(batch, nh, nw, heads, ws, ws).permute(0, 3, 1, 4, 2, 5)
            return grid.reshape(batch, heads, nh * ws, nw * ws)[:, :, :gh, :gw].reshape(batch, heads, gh * gw)

        padded = "" if (gh % ws, gw % ws) == (0, 0) else f", grid padded to {nh * ws}x{nw * ws}"
        geometry = LayerGeometry((gh, gw), stage.stride, f"window {ws}x{ws}{padded}", int(lead[-1]))
        return Placement(positions, key_positions, fold, geometry, padded_keys=key_positions is not None)


def _embeddings(model: nn.Module, class_name: str, module_suffix: str, conv: str) -> list[nn.Module]:
    return [getattr(m, conv) for m in module_list(model) if defined_in(m, class_name, module_suffix)]


def _timm_pvt_v2(model: nn.Module, module: nn.Module) -> LayerPlacer:
    stages = StageGrid(model, _embeddings(model, "OverlapPatchEmbed", "pvt_v2", "proj"))
    if module.pool is not None:
        return StagePlacer(stages, _adaptive_keys(module.pool))
    return StagePlacer(stages, global_keys if module.sr is None else _conv_keys(module.sr))


def _hf_pvt(model: nn.Module, module: nn.Module) -> LayerPlacer:
    embeddings = [m for m in module_list(model) if defined_in(m, "PvtPatchEmbeddings", "modeling_pvt")]
    stages = StageGrid(model, [m.projection for m in embeddings])
    keys = _conv_keys(module.sequence_reduction) if module.sequences_reduction_ratio > 1 else global_keys
    return StagePlacer(stages, keys, lambda index: int(embeddings[index].cls_token is not None))


def _hf_pvt_v2(model: nn.Module, module: nn.Module) -> LayerPlacer:
    stages = StageGrid(model, _embeddings(model, "PvtV2OverlapPatchEmbeddings", "modeling_pvt_v2", "proj"))
    if module.linear_attention:
        return StagePlacer(stages, _adaptive_keys(module.pool))
    reduced = module.spatial_reduction_ratio > 1
    return StagePlacer(stages, _conv_keys(module.spatial_reduction) if reduced else global_keys)


def _hf_segformer(model: nn.Module, module: nn.Module) -> LayerPlacer:
    stages = StageGrid(model, _embeddings(model, "SegformerOverlapPatchEmbeddings", "modeling_segformer", "proj"))
    if module.sequence_reduction_ratio > 1:
        return StagePlacer(stages, _conv_keys(module.sequence_reduction.sequence_reduction))
    return StagePlacer(stages, global_keys)


def _hf_glpn(model: nn.Module, module: nn.Module) -> LayerPlacer:
    stages = StageGrid(model, _embeddings(model, "GLPNOverlapPatchEmbeddings", "modeling_glpn", "proj"))
    return StagePlacer(stages, _conv_keys(module.sr) if module.sr_ratio > 1 else global_keys)


def _twins_global(model: nn.Module, module: nn.Module) -> LayerPlacer:
    stages = StageGrid(model, _embeddings(model, "PatchEmbed", "twins", "proj"))
    return StagePlacer(stages, global_keys if module.sr is None else _conv_keys(module.sr))


def _twins_local(model: nn.Module, module: nn.Module) -> LayerPlacer:
    return PaddedWindowPlacer(StageGrid(model, _embeddings(model, "PatchEmbed", "twins", "proj")), int(module.ws))


class CvtPlacer(LayerPlacer):
    """CvT's convolutional projections: queries and keys are each the output of a (depthwise, usually strided
    for the keys) convolution of the stage's map, or the map itself (``projection_method="linear"``); the CLS
    token, where the stage has one, is first among both."""

    def __init__(self, stages: StageGrid, module: nn.Module):
        self.stages, self.module = stages, module

    def install(self, context: CallContext) -> list[torch.utils.hooks.RemovableHandle]:
        return self.stages.install(context)

    @staticmethod
    def _projected(projection: nn.Module, grid, stride) -> tuple[tuple[int, int], torch.Tensor, tuple[int, int]]:
        """(grid, [n, 2] centres, step) of the tokens a projection makes from the stage's map."""
        conv = getattr(projection, "convolution_projection", None)
        if conv is None:
            return grid, cell_centres(*grid, stride).reshape(-1, 2), (1, 1)
        conv = conv.convolution
        out, centres = strided_module_centres(grid, stride, conv)
        return out, centres, pair(conv.stride)

    def place(self, context: CallContext, lead: torch.Size, num_queries: int, num_keys: int) -> Placement:
        stage = self.stages.current(context)
        module = self.module
        query_grid, queries, q_step = self._projected(module.convolution_projection_query, stage.grid, stage.stride)
        _, keys, kv_step = self._projected(module.convolution_projection_key, stage.grid, stage.stride)
        words = "global" if kv_step == (1, 1) else f"keys pooled by a stride-{kv_step[0]}x{kv_step[1]} convolution"
        if q_step != (1, 1):
            words += f"; queries subsampled, stride {q_step[0]}x{q_step[1]}"
        prefix = int(module.with_cls_token)
        query_stride = (stage.stride[0] * q_step[0], stage.stride[1] * q_step[1])
        return grid_placement(lead, num_queries, num_keys, grid=query_grid, stride=query_stride, attention=words,
                              prefix=prefix, queries=queries, keys=keys, key_prefix=prefix)


def _hf_cvt(model: nn.Module, module: nn.Module) -> LayerPlacer:
    return CvtPlacer(StageGrid(model, _embeddings(model, "CvtConvEmbeddings", "modeling_cvt", "projection")), module)


# (class name, defining module's suffix) -> placer factory.
_PLACERS = {
    ("Attention", "pvt_v2"): _timm_pvt_v2,
    ("PvtEfficientSelfAttention", "modeling_pvt"): _hf_pvt,
    ("PvtV2SelfAttention", "modeling_pvt_v2"): _hf_pvt_v2,
    ("SegformerAttention", "modeling_segformer"): _hf_segformer,
    ("GLPNEfficientSelfAttention", "modeling_glpn"): _hf_glpn,
    ("GlobalSubSampleAttn", "twins"): _twins_global,
    ("LocallyGroupedAttn", "twins"): _twins_local,
    ("CvtSelfAttention", "modeling_cvt"): _hf_cvt,
}


def placer(model: nn.Module, name: str, module: nn.Module):
    cls = type(module)
    factory = _PLACERS.get((cls.__name__, cls.__module__.rpartition(".")[2]))
    return None if factory is None else factory(model, module)
