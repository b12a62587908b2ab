"""Windowed attention on a 2-D token grid: SAM's, SAM3's and ViTDet's plain ViTs, SAM2's HieraDet; SAM's encoder
also where transformers' GOT-OCR2 (and PP-Chart2Table), PP-FormulaNet, SLANeXt, DeepSeek-OCR-2 and Unlimited-OCR
carry a copy of it as their vision tower.

Each block holds its tokens as a ``[B, H, W, C]`` map (ViTDet: ``[B, C, H, W]``). A windowed block pads the map
at the bottom and right to a multiple of its window, partitions it into windows in row-major window order and
runs attention within each window (``[B * nW, ...]``); a global block attends over the whole map. The padding is
not masked, so it is attended like any token (docs/definition.md, windows): as a key it sits at its cell of the
padded grid, past the image edge; as a query it has no position (it stands for no image content).

HieraDet (timm ``hieradet_sam2``, transformers ``Sam2HieraDetModel``) also pools the queries at a stage change:
a max-pool with kernel = stride = ``q_stride`` on each (padded) window, keys unpooled. A pooled query sits at
the centre of its stride cell (the cells it pools). One whose cell holds image content is a query, also where
the cell reaches into padding (a ``ceil(H / q_stride)``-th row: the model computes it, then crops it away with
the padding, as its residual path keeps ``H // q_stride`` rows); one whose cell is all padding has no position.
The layer's grid is then the pooled queries', ``ceil(H / q_stride) x ceil(W / q_stride)``. A global block pools
the unpadded map (floor), and has no such row.

Capture: timm's modules call ``F.scaled_dot_product_attention`` (the relative position bias as its mask) or,
unfused, compute the softmax themselves; transformers' SAM and ViTDet compute the softmax themselves (SAM's
``sdpa`` class calls SDPA), Sam2's and SAM3's attention goes through ``AttentionInterface``. Heads are either
merged into the batch (``[B * nW * heads, N, N]``: timm SAM, SAM eager, ViTDet) or their own dimension
(``[B * nW, heads, ...]``: SAM3, Sam2, SAM's SDPA class); both are placed.

Pixel scale: the patch embedding's stride times the query strides of the blocks before (HieraDet's stages are
4, 8, 16 and 32 pixels per token).

SAM's mask decoder (a two-way transformer between prompt tokens and the image embedding) is not image
self-attention; it lies outside the vision encoder that owns the patch embedding, so it is not recorded by
default, and skipped with the reason when named in ``layers`` (by :mod:`.non_spatial`, which runs first).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..module_index import enclosing_modules, module_list, named_module_list
from ..placement import CallContext, LayerGeometry, LayerPlacer, NotPlaceable, Placement
from .stages import pair

__all__ = ["placer", "attention_modules", "WindowedDesign", "WindowedGridPlacer"]


@dataclass(frozen=True)
class WindowedDesign:
    """How one family's attention module and its block read.

    Attributes:
        block: class name of the block (the attention module's parent) that partitions the windows.
        heads: attribute of the attention module holding its head count.
        query_stride: attribute of the block holding its query-pooling stride (None or a pair), if any.
        channels_first: the block's input is ``[B, C, H, W]`` (ViTDet) instead of ``[B, H, W, C]``.
    """

    block: str
    heads: str
    query_stride: str | None = None
    channels_first: bool = False


_SAM = WindowedDesign("SamVisionLayer", "num_attention_heads")
_SAM_HQ = WindowedDesign("SamHQVisionLayer", "num_attention_heads")
_DEEPSEEK_OCR2 = WindowedDesign("DeepseekOcr2SamVisionLayer", "num_attention_heads")
_UNLIMITED_OCR = WindowedDesign("UnlimitedOcrSamVisionLayer", "num_attention_heads")
# (attention class name, defining module's suffix) -> design.
_DESIGNS = {
    ("Attention", "vision_transformer_sam"): WindowedDesign("Block", "num_heads"),
    ("SamVisionAttention", "modeling_sam"): _SAM,
    ("SamVisionSdpaAttention", "modeling_sam"): _SAM,
    ("SamHQVisionAttention", "modeling_sam_hq"): _SAM_HQ,
    ("SamHQVisionSdpaAttention", "modeling_sam_hq"): _SAM_HQ,
    # SAM's encoder copied into other models (transformers' modular copies of SamVisionAttention and
    # SamVisionLayer, eager attention only): GOT-OCR2's vision tower (also PP-Chart2Table's, which builds
    # GotOcr2ForConditionalGeneration), PP-FormulaNet's and SLANeXt's. Same windows, padding, global blocks,
    # merged batch and heads; their necks and projectors after the blocks are convolutions.
    ("GotOcr2VisionAttention", "modeling_got_ocr2"): WindowedDesign("GotOcr2VisionLayer", "num_attention_heads"),
    ("PPFormulaNetVisionAttention", "modeling_pp_formulanet"): WindowedDesign("PPFormulaNetVisionLayer",
                                                                             "num_attention_heads"),
    ("SLANeXtVisionAttention", "modeling_slanext"): WindowedDesign("SLANeXtVisionLayer", "num_attention_heads"),
    # DeepSeek-OCR-2's and Unlimited-OCR's SAM encoders: SAM's attention (eager and SDPA) and block copied whole.
    # Their patch embedding takes any image size and the absolute position embedding is resized (bicubic) to the
    # map the convolution made: a value added per cell, the grid unchanged. Their neck and projector are
    # convolutions; the second tower runs on the projector's map (cells of 4 patches): :mod:`.sam_map_encoder`.
    ("DeepseekOcr2SamVisionAttention", "modeling_deepseek_ocr2"): _DEEPSEEK_OCR2,
    ("DeepseekOcr2SamVisionSdpaAttention", "modeling_deepseek_ocr2"): _DEEPSEEK_OCR2,
    ("UnlimitedOcrSamVisionAttention", "modeling_unlimited_ocr"): _UNLIMITED_OCR,
    ("UnlimitedOcrSamVisionSdpaAttention", "modeling_unlimited_ocr"): _UNLIMITED_OCR,
    # SAM3's ViT (Sam3ViTModel; the backbone of Sam3VisionModel, built into Sam3Model, Sam3TrackerModel,
    # Sam3TrackerVideoModel and Sam3VideoModel through AutoModel): SAM's window_partition copied (bottom/right zero
    # padding, windows and tokens row-major, the padding unmasked), [B * windows, heads, N, N] (eager and SDPA),
    # global blocks with window_size 0. Its 2-D RoPE (window-local positions in a windowed block) and its position
    # embedding (tiled, a value added per cell) change the scores, not where a token is on the image.
    ("Sam3ViTRoPEAttention", "modeling_sam3"): WindowedDesign("Sam3ViTLayer", "num_attention_heads"),
    ("VitDetAttention", "modeling_vitdet"): WindowedDesign("VitDetLayer", "num_heads", channels_first=True),
    ("MultiScaleAttention", "hieradet_sam2"): WindowedDesign("MultiScaleBlock", "num_heads", "q_stride"),
    ("Sam2MultiScaleAttention", "modeling_sam2"): WindowedDesign("Sam2MultiScaleBlock", "num_attention_heads",
                                                                "query_stride"),
}


def _key(module: nn.Module) -> tuple[str, str]:
    cls = type(module)
    return cls.__name__, cls.__module__.rpartition(".")[2]


def _pair(value) -> tuple[int, int]:
    """stages.pair, with no stride (None) read as 1."""
    return (1, 1) if value is None else pair(value)


def attention_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The attention modules of these families that the generic discovery misses (no q/k projections, no
    ``fused_attn``): transformers' SAM, SAM-HQ (and SAM's copies), ViTDet and Sam2 vision attention."""
    return {name: m for name, m in named_module_list(model) if _key(m) in _DESIGNS}


def placer(model: nn.Module, name: str, module: nn.Module):
    key = _key(module)
    design = _DESIGNS.get(key)
    if design is None:
        return None
    parent_name = name.rpartition(".")[0]
    block = model.get_submodule(parent_name) if parent_name else None
    if block is None or type(block).__name__ != design.block:
        return None
    return WindowedGridPlacer(model, name, block, module, design)


def _patch_stride_and_pooling(model: nn.Module, block: nn.Module, design: WindowedDesign) -> tuple[tuple[int, int],
                                                                                             tuple[int, int]]:
    """The stride of the patch embedding and the product of the query strides of the blocks before ``block``. The
    patch embedding is the first convolution before the first block of the nearest module above the block that
    holds one (the tower): the first of the whole model was a user's head declared before the backbone, or a 1x1
    colour adapter in front of it, whose stride 1 made the MAD 16x small (QA 331)."""
    block_name = next((name for name, module in named_module_list(model) if module is block), None)
    if block_name is None:
        raise NotPlaceable(f"its block is not a module of {type(model).__name__}")
    for _, tower in enclosing_modules(model, block_name):
        conv, pooled, blocks = None, (1, 1), False
        for module in module_list(tower):
            if type(module).__name__ == design.block:
                if module is block:
                    break
                blocks = True
                if design.query_stride is not None:
                    stride = _pair(getattr(module, design.query_stride))
                    pooled = (pooled[0] * stride[0], pooled[1] * stride[1])
            elif conv is None and not blocks and isinstance(module, nn.Conv2d):
                conv = module
        if conv is not None:
            return _pair(conv.stride), pooled
    raise NotPlaceable(f"found no patch-embedding convolution before the blocks of {type(model).__name__}")


class WindowedGridPlacer(LayerPlacer):
    """Places one attention call of a block that attends within (padded) windows of its 2-D map, or globally,
    optionally with pooled queries."""

    def __init__(self, model: nn.Module, name: str, block: nn.Module, attention: nn.Module, design: WindowedDesign):
        self.model, self.name, self.block, self.attention, self.design = model, name, block, attention, design
        self._key = f"windowed_vit.{name}"
        self._scale: tuple[tuple[float, float], str | None] | None = None

    def install(self, context: CallContext) -> list[torch.utils.hooks.RemovableHandle]:
        def see(module, args) -> None:
            x = args[0]
            if x.dim() != 4:
                context.values[self._key] = tuple(x.shape)
                return
            batch, h, w = (x.shape[0], x.shape[2], x.shape[3]) if self.design.channels_first else x.shape[:3]
            context.values[self._key] = (int(batch), int(h), int(w))

        return [self.block.register_forward_pre_hook(see)]

    def _stride(self) -> tuple[float, float]:
        if self._scale is None:
            try:
                patch, pooled = _patch_stride_and_pooling(self.model, self.block, self.design)
                self._scale = ((float(patch[0] * pooled[0]), float(patch[1] * pooled[1])), None)
            except NotPlaceable as error:
                self._scale = ((0.0, 0.0), str(error))
        if self._scale[1] is not None:
            raise NotPlaceable(self._scale[1])
        return self._scale[0]

    def place(self, context: CallContext, lead: torch.Size, num_queries: int, num_keys: int) -> Placement:
        seen = context.values.get(self._key)
        block_name = type(self.block).__name__
        if seen is None or len(seen) != 3:
            raise NotPlaceable(
                f"its block {block_name} received {'no input' if seen is None else f'shape {list(seen)}'}; "
                "expected a [B, H, W, C] token map"
            )
        batch, height, width = seen
        heads = int(getattr(self.attention, self.design.heads))
        window = _pair(self.block.window_size)
        windowed = window[0] > 0 and window[1] > 0
        if not windowed:
            window = (height, width)
        qy, qx = _pair(getattr(self.block, self.design.query_stride) if self.design.query_stride else None)
        padded = (math.ceil(height / window[0]) * window[0], math.ceil(width / window[1]) * window[1])
        windows = (padded[0] // window[0], padded[1] // window[1])
        if windowed and (window[0] % qy or window[1] % qx):
            raise NotPlaceable(f"its window {window[0]}x{window[1]} is not a multiple of its query stride {qy}x{qx}")
        # Pooled query grid of one window (a global block pools the unpadded map, floor: max-pool, ceil_mode=False).
        pooled_window = (window[0] // qy, window[1] // qx) if windowed else (height // qy, width // qx)
        # The pooled queries whose stride cell holds image content: ceil(H / q) rows of the padded windows (of
        # a global block's floor(H / q) rows, all).
        kept = (min(-(-height // qy), windows[0] * pooled_window[0]),
                min(-(-width // qx), windows[1] * pooled_window[1]))
        count = batch * windows[0] * windows[1]
        expected_lead = [(count * heads,), (count, heads)]
        expected_n = (pooled_window[0] * pooled_window[1], window[0] * window[1])
        if tuple(lead) not in expected_lead or (num_queries, num_keys) != expected_n:
            kind = f"windows of {window[0]}x{window[1]}" if windowed else "global attention"
            raise NotPlaceable(
                f"its attention has shape [{', '.join(map(str, lead))}, {num_queries}, {num_keys}]; for the "
                f"{height}x{width} map of its block ({kind}, {heads} heads, query stride {qy}x{qx}) vitmad expects "
                f"[{count * heads}, {expected_n[0]}, {expected_n[1]}] or [{count}, {heads}, {expected_n[0]}, "
                f"{expected_n[1]}]"
            )
        stride = self._stride()
        keys = _window_centres(windows, window, stride)
        queries = _window_centres(windows, pooled_window, (stride[0] * qy, stride[1] * qx), kept)

        def per_call(positions: torch.Tensor) -> torch.Tensor:
            # [nW, N, 2] -> one row per entry of the call's leading dims (windows of every image, then heads).
            positions = positions.unsqueeze(1).repeat(batch, 1, 1, 1)
            if len(lead) == 1:
                positions = positions.expand(-1, heads, -1, -1).reshape(count * heads, *positions.shape[-2:])
            return positions

        def fold(values: torch.Tensor) -> torch.Tensor:
            grid = values.reshape(batch, windows[0], windows[1], heads, *pooled_window)
            grid = grid.permute(0, 3, 1, 4, 2, 5).reshape(batch, heads, windows[0] * pooled_window[0],
                                                            windows[1] * pooled_window[1])
            return grid[:, :, :kept[0], :kept[1]].reshape(batch, heads, kept[0] * kept[1])

        if windowed:
            attention = f"window {window[0]}x{window[1]}"
            if padded != (height, width):
                attention += f" (map {height}x{width} padded to {padded[0]}x{padded[1]})"
        else:
            attention = "global"
        if (qy, qx) != (1, 1):
            attention += f", queries pooled {qy}x{qx}"
            if kept != (height // qy, width // qx):
                attention += f" to {kept[0]}x{kept[1]} (cells reaching into the padding included)"
        geometry = LayerGeometry(kept, (stride[0] * qy, stride[1] * qx), attention, heads)
        # Key positions are given when they differ from the queries': pooled queries, or padding (no query, a key).
        same = (qy, qx) == (1, 1) and padded == (height, width)
        return Placement(per_call(queries), None if same else per_call(keys), fold, geometry,
                         padded_keys=(qy, qx) == (1, 1) and not same)


def _window_centres(windows: tuple[int, int], window: tuple[int, int], stride: tuple[float, float],
                    real: tuple[int, int] | None = None) -> torch.Tensor:
    """``[nW, wh * ww, 2]`` pixel centres of the tokens of each window (windows and tokens row-major) of a map
    padded to ``windows * window``, padding included (keys); with ``real``, the tokens outside the ``real``
    top-left part of the map (queries without image content) are NaN."""
    rows = torch.arange(windows[0] * window[0], dtype=torch.float64)
    cols = torch.arange(windows[1] * window[1], dtype=torch.float64)
    centres = torch.stack(torch.meshgrid((rows + 0.5) * stride[0], (cols + 0.5) * stride[1], indexing="ij"), -1)
    if real is not None:
        centres[(rows[:, None] >= real[0]) | (cols[None, :] >= real[1])] = float("nan")
    centres = centres.view(windows[0], window[0], windows[1], window[1], 2).permute(0, 2, 1, 3, 4)
    return centres.reshape(windows[0] * windows[1], window[0] * window[1], 2).float()
