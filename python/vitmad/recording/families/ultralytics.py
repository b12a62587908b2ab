"""Ultralytics' YOLO and RT-DETR models (``ultralytics``, 8.4): attention over one feature map of the yaml graph.

An ultralytics model (``DetectionModel`` and its task kin, ``RTDETRDetectionModel``, ``ClassificationModel``; the
``YOLO`` / ``RTDETR`` wrappers hold it as ``.model``) runs ``model.model``, an ``nn.Sequential`` its yaml file builds:
layer ``i`` takes the output of the layers its ``f`` names (-1: the one before). It has no patch embedding: its
attention layers run inside a layer of that graph, over the ``[B, C, h, w]`` map the layer gets, flattened
row-major (``flatten(2)`` or ``view(B, heads, d, h * w)``), no other token:

- ``Attention`` (``ultralytics.nn.modules.block``) of YOLO11's and YOLO26's ``C2PSA`` (its ``PSABlock``\\ s) and
  YOLOv10's ``PSA``: global softmax attention over the ``h * w`` cells (``.softmax(dim=-1)`` of ``[B, heads, N, N]``;
  ``F.scaled_dot_product_attention`` where exported for CoreML);
- ``AAttn`` of YOLO12's ``A2C2f`` (its ``ABlock``\\ s): area attention. With ``area > 1`` the row-major sequence is cut
  into ``area`` consecutive runs of ``h * w / area`` cells (``reshape(B * area, N // area, C)``: strips of whole rows
  where ``area`` divides ``h``), each attending within itself, the runs folded into the batch image-major;
- ``AIFI`` of RT-DETR (and ``TransformerBlock`` of ``C3TR``): an ``nn.MultiheadAttention`` over the flattened map
  (the 2-D sin-cos positions, or a learned linear position, are added to the queries and keys: scores, not token
  places).

Each cell sits at the centre of its stride cell, ``((r + 0.5) * s, (c + 0.5) * s)`` px (``docs/definition.md``,
"Beyond one grid"). The stride ``s`` of the layer that holds the attention is read from the yaml graph once: the
image's stride 1 carried through each layer's ``f`` and multiplied by what the layer itself does (its one strided
convolution or pool, ``nn.Upsample``'s scale, ``HGStem``'s and ``ResNetLayer``'s known strides; a layer with several
strided modules vitmad does not know, a ``TorchVision`` backbone say, leaves the stride unknown and the layers after
it refused). In each call the map the attention gets is checked against the image: each side the floor or the
ceiling of the image's side over ``s``, else the call is refused.

Skipped with their reason: RT-DETR's decoder (its self-attention among object queries; its deformable
cross-attention, ``MSDeformAttn``, a softmax over sampled points) and YOLO-World's ``ImagePoolingAttn`` (text
embeddings attending over pooled maps). Ultralytics' copy of SAM's image encoder (``ImageEncoderViT`` of
``ultralytics.models.sam``, SAM ViT-B / L / H) is placed as the windowed ViT family places Meta's (padded windows and
global blocks on the patch grid); its other SAM modules (MobileSAM's TinyViT, SAM 2's Hiera, SAM 3) are
:mod:`.ultralytics_sam`'s.
"""

from __future__ import annotations

import torch
from torch import nn

from ..module_index import module_list
from ..placement import CallContext, LayerPlacer, NotPlaceable, Placement, RefusingPlacer
from .stages import grid_placement, innermost_on_path, pair
from .windowed_vit import WindowedDesign, WindowedGridPlacer
from .windows import parent_module, stride_mismatch, window_placement

__all__ = ["placer", "call_start"]

_PACKAGE = "ultralytics."
_BLOCKS = "ultralytics.nn.modules.block"
_CONV = "ultralytics.nn.modules.conv"
_TRANSFORMER = "ultralytics.nn.modules.transformer"
_SAM_BLOCKS = "ultralytics.models.sam.modules.blocks"
_POSITIONS = "pass positions=<[N, 2] pixel position of each token>"
# ultralytics' copy of SAM's image encoder (ImageEncoderViT): its Block pads its [B, H, W, C] map to whole windows of
# window_size (0: global), windows row-major in the batch, and REAttention merges batch and heads, [B * nW * heads,
# N, N], as Meta's SAM does: the windowed ViT family's placement, the patch stride from patch_embed's convolution.
_SAM_BLOCK = WindowedDesign("Block", "num_heads")


def _is(module: nn.Module, class_name: str, module_name: str) -> bool:
    cls = type(module)
    return cls.__name__ == class_name and cls.__module__ == module_name


def _is_graph_model(module: nn.Module) -> bool:
    """An ultralytics model run by its yaml graph (``ultralytics.nn.tasks.BaseModel`` and its task models)."""
    return type(module).__module__ == "ultralytics.nn.tasks" and isinstance(getattr(module, "model", None),
                                                                            nn.Sequential)


_STRIDED = (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)


def call_start(model: nn.Module) -> nn.Module | None:
    """The first layer of the first ultralytics yaml graph in ``model`` (module order), which the image enters: a
    forward call starts there, and the image's size is its input's. The first convolution is no such start where
    layer 0 changes the image before convolving it: YOLOv5's ``Focus`` stacks each 2 x 2 pixels as channels, so the
    image read there was half the input and every stride counted from it half the map's (MAD halved, QA
    helper-156); a first ``MaxPool2d`` made a refusal name the wrong image size. ``model`` itself where it holds
    several such models."""
    graphs = [module.model for module in module_list(model) if _is_graph_model(module)]
    if len(graphs) > 1:
        # A user's module holding several (an ensemble, a teacher and a student): its own forward starts each call,
        # whichever model it runs first (the first graph's layer split a forward running the second one first into
        # two calls, each mixing two forwards; QA 258), and each model's layers read its own image's size.
        return model
    return graphs[0][0] if graphs and len(graphs[0]) else None


def _own_stride(layer: nn.Module) -> float | None:
    """The factor by which one layer of the graph shrinks its input map (0.5 for a 2x upsampling), or None where
    vitmad cannot tell."""
    if isinstance(layer, nn.Upsample):
        scale = layer.scale_factor
        scale = scale if isinstance(scale, (int, float)) else None if scale is None else (
            scale[0] if len(set(scale)) == 1 else None)
        return None if layer.size is not None or not scale else 1.0 / float(scale)
    if _is(layer, "Focus", _CONV):  # the image's 2 x 2 pixels stacked as channels (YOLOv5's stem), then its Conv
        stride = pair(layer.conv.conv.stride)
        return None if stride[0] != stride[1] else 2.0 * stride[0]
    if _is(layer, "HGStem", _BLOCKS):  # stem1 then stem3, each 3x3 of stride 2; its pool keeps the size
        return float(pair(layer.stem1.conv.stride)[0] * pair(layer.stem3.conv.stride)[0])
    if _is(layer, "ResNetLayer", _BLOCKS):  # a 7x7 of stride 2 and a max pool of 2, or its first block's stride
        if layer.is_first:
            return 4.0
        return float(pair(layer.layer[0].cv2.conv.stride)[0])
    strides = [pair(m.stride)[0] for m in layer.modules() if isinstance(m, _STRIDED)
               and pair(m.stride) != (1, 1)]
    if any(pair(m.stride)[0] != pair(m.stride)[1] for m in layer.modules() if isinstance(m, _STRIDED)):
        return None
    if not strides:
        return 1.0
    # One strided module (Conv, DWConv, ADown, SCDown, AConv): it is the layer's downsampling. Several (parallel
    # branches, a torchvision backbone) would need the layer's own reading.
    return float(strides[0]) if len(strides) == 1 else None


def _layer_strides(graph: nn.Sequential) -> list[float | None]:
    """Per layer of the yaml graph, the pixel stride of its output map (None where unknown)."""
    strides: list[float | None] = []
    for index, layer in enumerate(graph):
        sources = getattr(layer, "f", None)  # set by ultralytics' parse_model on every layer it builds
        sources = sources if isinstance(sources, (list, tuple)) else [sources]
        if index == 0 and sources == [-1]:
            inputs = {1.0}  # the image
        elif all(isinstance(s, int) and -index <= s < index for s in sources):
            inputs = {strides[s if s >= 0 else index + s] for s in sources}
        else:
            inputs = {None}
        own = _own_stride(layer)
        strides.append(None if len(inputs) != 1 or None in inputs or own is None else inputs.pop() * own)
    return strides


def _graph_stride(model: nn.Module, name: str, module: nn.Module) -> tuple[float, str] | str:
    """``(stride, layer in words)`` of the map the attention module ``name`` runs on, or why it is unknown."""
    found = innermost_on_path(model, name, _is_graph_model)
    if found is None:
        return (f"it is an ultralytics {type(module).__name__} recorded without the ultralytics model (DetectionModel, "
                "RTDETRDetectionModel, ClassificationModel, ...) whose yaml graph gives the pixel stride of the map "
                "it attends over; record that model (YOLO(...).model), or " + _POSITIONS)
    owner, graph_model = found
    rest = name[len(owner) + 1 if owner else 0:].split(".")
    if len(rest) < 3 or rest[0] != "model" or not rest[1].isdigit():
        return (f"it lies outside the layers of {type(graph_model).__name__}.model, whose yaml graph gives the "
                "strides; " + _POSITIONS)
    index = int(rest[1])
    layer = graph_model.model[index]
    stride = _layer_strides(graph_model.model)[index]
    if stride is None or _own_stride(layer) != 1.0:
        if _own_stride(layer) != 1.0:
            culprit = ": the layer itself changes the size of the map it gets, so its attention's map is not its input"
        else:
            unknown = next((i for i in range(index) if _own_stride(graph_model.model[i]) is None), None)
            culprit = "" if unknown is None else (
                f": layer {unknown} ({type(graph_model.model[unknown]).__name__}) changes the map's size by modules "
                "vitmad cannot follow (several strided convolutions or pools)")
        return (f"the pixel stride of the map of layer {index} ({type(layer).__name__}) of its yaml graph is "
                f"unknown{culprit}; " + _POSITIONS)
    return stride, f"layer {index} ({type(layer).__name__}) of its yaml graph"


def placer(model: nn.Module, name: str, module: nn.Module):
    if isinstance(module, nn.MultiheadAttention):
        return _multihead_placer(model, name, module)
    cls = type(module)
    if not cls.__module__.startswith(_PACKAGE):
        return None
    if _is(module, "Attention", _BLOCKS) or _is(module, "AAttn", _BLOCKS):
        return _map_placer(model, name, module, module)
    if _is(module, "ImagePoolingAttn", _BLOCKS):
        return _skip("YOLO-World's image-pooling attention: its queries are the text embeddings, attending over "
                     "each level's map pooled to a few cells, so no query has a position in the image")
    if _is(module, "MSDeformAttn", _TRANSFORMER):
        return _skip("deformable attention (RT-DETR's decoder): a softmax over sampled points around each object "
                     "query's reference, not attention between tokens")
    if _is(module, "REAttention", _SAM_BLOCKS):
        block = parent_module(model, name)
        if block is not None and _is(block, "Block", _SAM_BLOCKS):
            return WindowedGridPlacer(model, name, block, module, _SAM_BLOCK)
    return None  # its other SAM modules: :mod:`.ultralytics_sam`, which comes after this family


def _skip(reason: str):
    from . import Skip  # the families' verdict lives in the package that imports this module

    return Skip(reason)


def _multihead_placer(model: nn.Module, name: str, module: nn.Module):
    parent = parent_module(model, name)
    if parent is None or not type(parent).__module__.startswith(_PACKAGE):
        return None
    if _is(parent, "AIFI", _TRANSFORMER):
        return _map_placer(model, name, module, parent)
    if _is(parent, "TransformerLayer", _TRANSFORMER):
        found = innermost_on_path(model, name, lambda m: _is(m, "TransformerBlock", _TRANSFORMER))
        if found is not None:
            return _map_placer(model, name, module, found[1])
        return RefusingPlacer("it is an ultralytics TransformerLayer run outside a TransformerBlock, so the map its "
                              "tokens were flattened from is unknown; " + _POSITIONS)
    if _is(parent, "DeformableTransformerDecoderLayer", _TRANSFORMER):
        return _skip("RT-DETR's decoder self-attention: its queries are object queries, without a position in the "
                     "image")
    return RefusingPlacer(f"it is an nn.MultiheadAttention inside ultralytics' {type(parent).__name__}, whose token "
                          "layout vitmad does not know; " + _POSITIONS)


def _map_placer(model: nn.Module, name: str, module: nn.Module, watch: nn.Module):
    stride = _graph_stride(model, name, module)
    if isinstance(stride, str):
        return RefusingPlacer(stride)
    area = int(getattr(module, "area", 1)) if _is(module, "AAttn", _BLOCKS) else 1
    # The graph's first layer takes its model's image (_graph_stride found the model).
    first = innermost_on_path(model, name, _is_graph_model)[1].model[0]
    return _MapPlacer(watch, *stride, area, first)


class _MapPlacer(LayerPlacer):
    """Places the row-major cells of the map ``watch`` receives (its first argument, ``[B, C, h, w]``), whose
    stride is ``stride`` px (``source`` says where it comes from) in the image the graph's ``first`` layer takes
    (None: the call's image, kornia's RT-DETR); with ``area > 1``, the ``area`` consecutive runs of cells that
    attend each within itself, folded into the batch."""

    def __init__(self, watch: nn.Module, stride: float, source: str, area: int, first: nn.Module | None = None):
        self.watch, self.stride, self.source, self.area, self.first = watch, stride, source, area, first
        self.key = f"ultralytics.map.{id(watch)}"
        # The size of the image its own model took in its latest forward: a user's module holding two models (an
        # ensemble, a teacher and a student) may feed each its own size, or run them in either order, and the
        # call's image (the first convolution's) was taken for both (QA 258). Kept here, not in the call context,
        # which the first convolution (after this hook) clears.
        self.input_size: tuple[int, int] | None = None

    def install(self, context: CallContext) -> list[torch.utils.hooks.RemovableHandle]:
        def see(module, args) -> None:
            x = args[0] if args else None
            context.values[self.key] = tuple(x.shape[-2:]) if isinstance(x, torch.Tensor) and x.dim() == 4 else None

        def see_image(module, args) -> None:
            x = args[0] if args else None
            self.input_size = (int(x.shape[-2]), int(x.shape[-1])) if isinstance(x, torch.Tensor) and x.dim() == 4 \
                else None

        own = [] if self.first is None else [self.first.register_forward_pre_hook(see_image)]
        return [*own, self.watch.register_forward_pre_hook(see)]

    def place(self, context: CallContext, lead: torch.Size, num_queries: int, num_keys: int) -> Placement:
        image, grid = self.input_size or context.image_size, context.values.get(self.key)
        if image is None or grid is None:
            raise NotPlaceable(f"{type(self.watch).__name__} did not get a [B, C, h, w] map after a convolution saw "
                               "the image in this call, so its tokens are unknown; " + _POSITIONS)
        grid = (int(grid[0]), int(grid[1]))
        mismatch = stride_mismatch(image, grid, self.stride)
        if mismatch is not None:
            raise NotPlaceable(mismatch.format(f"a stride of {self.stride:g} px ({self.source})")
                               + "; a graph whose maps vitmad cannot follow; " + _POSITIONS)
        stride = (self.stride, self.stride)
        if self.area == 1:
            return grid_placement(lead, num_queries, num_keys, grid=grid, stride=stride, attention="global")
        cells = grid[0] * grid[1]
        if cells % self.area:
            raise NotPlaceable(f"its {grid[0]}x{grid[1]} map does not split into {self.area} areas of whole cells")
        index = torch.arange(cells)
        runs = torch.stack([index // grid[1], index % grid[1]], dim=-1).view(self.area, cells // self.area, 2)
        return window_placement(runs, grid, stride, lead, num_queries, num_keys, order="windows in batch",
                                attention=f"{self.area} areas of {cells // self.area} row-major cells")
