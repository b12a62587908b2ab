"""kornia's (0.9) vision transformers: its ViT, SAM's image encoder, DeDoDe's DINOv2, RT-DETR's AIFI, the Qwen2.5-VL
tower, MobileViT, TinyViT, the SigLIP2 vision tower, MoonViT and LoFTR's coarse self-attention.

- ``VisionTransformer`` (``kornia.models.vit``): ``PatchEmbedding`` cuts the image with a ``Conv2d`` of kernel = stride
  = ``patch_size`` (the input must be ``image_size`` square), flattens its map row-major and puts the class token
  first (``torch.cat([cls_tokens, x], dim=1)``); ``MultiHeadAttention`` takes ``.softmax(dim=-1)`` of ``[B, heads,
  N, N]`` (captured by vitmad's softmax capture). The class token has no position; the patches sit at their cells, in
  pixels of the image the ViT gets. With a ``backbone=`` (any module giving a ``[B, D, h, w]`` map) the map's stride
  is the backbone's, which vitmad cannot read: refused.
- DINOv2 of DeDoDe (``kornia.feature.dedode.transformer``, Meta's ``DinoVisionTransformer`` vendored): the class token,
  then the row-major grid of ``PatchEmbed``'s ``Conv2d`` (kernel = stride = 14; the image must be whole patches),
  no register tokens; ``mask_token`` replaces patches in place. ``Attention`` and ``MemEffAttention`` (the same
  computation, whose forward does not show the softmax, so vitmad's discovery would miss it) take ``.softmax`` of
  ``[B, heads, N, N]``. ``DeDoDe`` holds the backbone in a list (``descriptor.encoder.frozen_dinov2.dinov2_vitl14[0]``,
  hidden from DDP), so it is no submodule of ``DeDoDe``: record that ``DinoVisionTransformer`` and run the DeDoDe model,
  which calls its ``forward_features`` (recording the DeDoDe model refuses with that path, :func:`listed_dinov2`).
- SAM's ``ImageEncoderViT`` (``kornia.models.sam.architecture.image_encoder``) is Meta's ``segment_anything`` encoder
  copied (``PatchEmbed``, ``Block`` with ``window_partition`` from ``kornia.models.common``: bottom/right zero padding,
  unmasked; ``Attention`` merging image, window and head in one dim): placed by :mod:`.segment_anything`'s code. The
  mask decoder's two-way transformer is skipped with SAM's reasons.
- RT-DETR (``kornia.models.rt_detr``): ``HybridEncoder`` runs one ``AIFI`` over the last of the backbone's maps
  (after a 1 x 1 projection): ``x.permute(2, 3, 0, 1).flatten(0, 1)``, the row-major cells of the map, into a
  sequence-first ``nn.MultiheadAttention`` (the 2-D sin-cos positions added to queries and keys change scores, not
  places). The last map of its ``ResNetD`` and ``PPHGNetV2`` backbones has stride 32; the cells are placed as
  :mod:`.ultralytics` places its AIFI's, the map checked per call against the image the ``RTDETR`` model gets.
  ``HybridEncoder`` alone gets feature maps, not the image: refused. The decoder's self-attention (object queries)
  and multi-scale deformable attention (a softmax over sampled points) are skipped.
- The Qwen2.5-VL tower (``kornia.models.qwen25.vision``): patches in 2 x 2 merge-block order, kept in that order in
  every block, the windows a boolean mask over them (:class:`_MergeOrderPlacer`).

- MobileViT (``kornia.models.vit_mobile``): ``MobileViTBlock`` unfolds the map its ``conv2`` (1 x 1) gives,
  ``[b, d, h, w]``, into ``[b, ph * pw, nh * nw, d]``: sequence ``(i, j)`` (row-major over the pixel offsets within a
  patch) holds, for patch ``(a, c)`` (row-major), the cell at map row ``a * ph + i``, column ``c * pw + j``: timm's
  MobileViT layout (:mod:`.mobilevit`, a dilated grid), with the sequences a dim of their own before the heads
  (``Attention``'s ``nn.Softmax`` over ``[b, ph * pw, heads, N, N]``), not merged into the batch. kornia does not
  resize a map that is not whole patches (its reshape fails first). The map's stride is read from ``MobileViT.forward``:
  ``mvit[k]`` runs after ``conv1`` and ``mv2[: 5 + k]`` (8, 16, 32 px with the built-in strides), checked per call
  against the image (padded 3 x 3 convolutions: ``ceil`` of the image over the stride).
- TinyViT (``kornia.models.tiny_vit``): ``TinyViTBlock`` views its ``[B, H * W, C]`` tokens as the
  ``input_resolution`` map it was built for, pads it with zeros at the bottom and right to whole ``window_size``
  windows (kornia's ``window_partition``, also for a map smaller than one window) and runs ``Attention`` (``.softmax``)
  on ``[B * windows, heads, N, N]``: :func:`.windows.block_partition`, as timm's TinyViT. The stride of a stage is the
  product of the strides of the convolutions before its block in ``TinyViT`` (registered in the order they run: the
  patch embedding's 4, each ``PatchMerging``'s 2 or, for MobileSAM's last two, 1).
- SigLIP2's vision tower (``kornia.models.siglip2``; also ``SigLip2Model``'s and ``PaliGemma``'s ``vision_tower``):
  the row-major grid of ``embeddings.patch_embedding`` (a ``Conv2d`` of kernel = stride = ``patch_size``, on the
  ``image_size`` square image only: no NaFlex sizes), no class token; ``SigLip2Attention`` runs
  F.scaled_dot_product_attention over ``[B, heads, N, N]``. The attention-pooling head's ``nn.MultiheadAttention``
  (a learned probe queries the grid) is class attention over the same grid (:class:`~.ClassQueries`); the text
  tower's ``SigLip2Attention`` is skipped.
- MoonViT (``kornia.models.kimi_vl.moonvit``; ``KimiVLModel.vision_encoder``): kornia's port takes a batch of
  images, not transformers' packed sequence: the row-major grid of ``patch_embed`` (``Conv2d``, kernel = stride =
  ``patch_size``, any size, floored), no class token, the 2-D RoPE changing scores only; ``MoonViTAttention`` runs
  F.scaled_dot_product_attention over ``[B, heads, N, N]``. The 2 x 2 merge is ``KimiVLProjector``'s, after the
  encoder, without attention.

- LoFTR (``kornia.feature.loftr``) built with ``attention="full"`` in its ``coarse`` config: ``LoFTR.forward``
  flattens each image's coarse map (``ResNetFPN_8_2`` or ``_16_4``: stride ``config["resolution"][0]``, 8 or 16 px,
  ``ceil`` of the image's sides over it, the stride-2 convolutions padded) row-major, ``[N, h * w, C]``, and its
  ``loftr_coarse`` runs each ``"self"`` layer twice, on image 0's tokens, then on image 1's (``layer(feat0, feat0,
  mask0, mask0)``, ``layer(feat1, feat1, mask1, mask1)``: the images may differ in size, never batched together).
  ``FullAttention`` takes ``F.softmax(..., dim=2)`` of ``[N, L, S, H]`` (heads last), which vitmad reads as
  ``[N, H, L, S]`` (:func:`probabilities_view`). A cell of an image's map sits at the centre of its stride cell in
  that image's pixels; the side of a call is the order of the layer's calls in the coarse transformer's forward,
  its grid read from the pair given to ``LoFTR`` (the image, or the ``coarse`` map of ``features0`` / ``1``) and
  checked against the call's token count. ``mask0`` / ``mask1`` (the pixel a cell sits on, ``[..., ::s, ::s]``)
  reach ``FullAttention`` as ``q_mask`` and ``kv_mask``: a masked cell gets no weight as a key, and its row as a
  query is NaN (every key ``-inf``): it has no position, and an image's MAD is the mean over its own cells
  (``Placement.present``). The ``"cross"`` layers (queries of one image, keys of the other) are skipped; the fine
  transformer's full attention (``loftr_fine``: a window of ``fine_window_size`` squared fine cells around each
  coarse match, batched by match, not by image, zero-padded past the map's edge) is refused by name: record the
  coarse layers (``layers=["loftr_coarse.*"]``). A ``FullAttention`` outside a ``LoFTR`` model (its
  ``LocalFeatureTransformer`` alone gets flat tokens, no grid) is refused.

SigLIP2's and MoonViT's ``attention_mask`` (padded patches, or pairs) is refused per call: vitmad places their patches
attending over the whole grid. Skipped with their reason: LoFTR's linear attention (an ELU feature map, no softmax
probabilities) and LightGlue's attention (among detected keypoints).
"""

from __future__ import annotations

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
    cell_centres,
    select_tokens,
)
from .class_attention import _POOLING
from .segment_anything import _two_way_skip, windowed_encoder_placer
from .stages import grid_placement, innermost_on_path, reduction_before
from .ultralytics import _MapPlacer
from .windowed_vit import WindowedDesign
from .windows import PartitionPlacer, block_partition, grid_partition, nchw, parent_module

__all__ = ["placer", "attention_modules", "listed_dinov2", "probabilities_view", "call_start"]

_VIT = "kornia.models.vit"
_DINOV2 = "kornia.feature.dedode.transformer.dinov2"
_DINOV2_ATTENTION = "kornia.feature.dedode.transformer.layers.attention"
_DEDODE_ENCODER = "kornia.feature.dedode.encoder"
_QWEN25 = "kornia.models.qwen25.vision"
_SAM_ENCODER = "kornia.models.sam.architecture.image_encoder"
_SAM_DECODER = "kornia.models.sam.architecture.transformer"
_SAM_BLOCK = WindowedDesign("Block", "num_heads")
_RT_DETR = "kornia.models.rt_detr.model"
_RT_DETR_ENCODER = "kornia.models.rt_detr.architecture.hybrid_encoder"
_RT_DETR_HEAD = "kornia.models.rt_detr.architecture.rtdetr_head"
# The backbones RTDETR builds, whose last map (the one AIFI attends over) is 32 px per cell: ResNetD's stem (two
# strides of 2) and three strided stages, PPHGNetV2's stem (4) and three strided stages.
_RT_DETR_BACKBONES = {("kornia.models.rt_detr.architecture.resnet_d", "ResNetD"),
                      ("kornia.models.rt_detr.architecture.hgnetv2", "PPHGNetV2")}
_RT_DETR_STRIDE = 32.0
_MOBILEVIT = "kornia.models.vit_mobile"
_TINY_VIT = "kornia.models.tiny_vit"
_SIGLIP2_ATTENTION = "kornia.models.siglip2.attention"
_SIGLIP2_VISION = "kornia.models.siglip2.vision_encoder"
_SIGLIP2_TEXT = "kornia.models.siglip2.text_encoder"
_MOONVIT = "kornia.models.kimi_vl.moonvit"
_POSITIONS = "pass positions=<[N, 2] pixel position of each token>"

_SKIPPED = {
    ("kornia.feature.loftr.loftr_module.linear_attention", "LinearAttention"):
        "LoFTR's linear attention: an ELU feature map of queries and keys, no softmax attention probabilities",
    ("kornia.feature.lightglue", "Attention"):
        "LightGlue's attention among detected keypoints (self-attention within an image's keypoints, "
        "cross-attention to the other image's), no image grid",
    ("kornia.models.paligemma.modeling_paligemma", "GemmaAttention"):
        "PaliGemma's Gemma language model (attention over the image's projected tokens and the text), not the "
        "vision tower",
    (_RT_DETR_HEAD, "MultiScaleDeformableAttention"):
        "deformable attention (RT-DETR's decoder): a softmax over sampled points around each object query's "
        "reference, not attention between tokens",
}
_LOFTR = "kornia.feature.loftr.loftr"
_LOFTR_FULL = ("kornia.feature.loftr.loftr_module.linear_attention", "FullAttention")
_LOFTR_LAYER = "kornia.feature.loftr.loftr_module.transformer"
# LoFTR's backbones by their coarse map's pixel stride (config["resolution"][0]): build_backbone's choice.
_LOFTR_BACKBONES = {8: "ResNetFPN_8_2", 16: "ResNetFPN_16_4"}
# Attention classes whose forwards may not show their softmax to vitmad's discovery (MobileViT's is an nn.Softmax
# submodule), listed by name.
_LISTED = {(_MOBILEVIT, "Attention"), (_TINY_VIT, "Attention"), (_SIGLIP2_ATTENTION, "SigLip2Attention"),
           (_MOONVIT, "MoonViTAttention")}


def _is(module: nn.Module, class_name: str, defining_module: str) -> bool:
    cls = type(module)
    return cls.__name__ == class_name and cls.__module__ == defining_module


def _key(module: nn.Module) -> tuple[str, str]:
    return type(module).__module__, type(module).__name__


def attention_modules(model: nn.Module) -> dict[str, nn.Module]:
    """DINOv2's ``MemEffAttention`` (its forward calls its parent's, so no softmax shows in it) and the kornia
    attention classes this family places, skips or refuses by name, whose own forwards may not show theirs either
    (MobileViT's ``nn.Softmax``)."""
    return {name: module for name, module in named_module_list(model)
            if (type(module).__module__ == _DINOV2_ATTENTION and type(module).__name__ in ("Attention",
                                                                                         "MemEffAttention"))
            or _is(module, "Qwen25VisionAttention", _QWEN25) or _key(module) in _SKIPPED or _key(module) == _LOFTR_FULL
            or _key(module) in _LISTED}


def listed_dinov2(model: nn.Module) -> str | None:
    """Where ``model`` (DeDoDe, its descriptor or encoder) holds DeDoDe's DINOv2 in the list of a ``FrozenDINOv2``,
    out of the module tree, so out of vitmad's reach: the message saying what to record instead; else None."""
    held = [name for name, module in named_module_list(model) if _is(module, "FrozenDINOv2", _DEDODE_ENCODER)]
    if not held:
        return None
    paths = ", ".join(f"model.{name + '.' if name else ''}dinov2_vitl14[0]" for name in held)
    return (f"{type(model).__name__} runs its attention in DeDoDe's DINOv2 (a DinoVisionTransformer, {paths}), which "
            "its FrozenDINOv2 holds in a plain Python list to hide it from DDP, so it is no submodule of the model "
            f"and vitmad's hooks cannot reach it: record it, vitmad.record({paths.split(', ')[0]}), and run the "
            f"{type(model).__name__} model inside the block, which calls its forward_features")


def placer(model: nn.Module, name: str, module: nn.Module):
    if isinstance(module, nn.MultiheadAttention):
        return _multihead_placer(model, name, module)
    if not type(module).__module__.startswith("kornia."):
        return None
    if _key(module) in _SKIPPED:
        return _skip(_SKIPPED[_key(module)])
    if _key(module) == _LOFTR_FULL:
        return _loftr_placer(model, name, module)
    if _is(module, "MultiHeadAttention", _VIT):
        return _vit_placer(model, name)
    if _is(module, "Qwen25VisionAttention", _QWEN25):
        return _qwen25_placer(model, name, module)
    if _is(module, "Attention", _MOBILEVIT):
        return _mobilevit_placer(model, name)
    if _is(module, "Attention", _TINY_VIT):
        return _tiny_vit_placer(model, name, module)
    if _is(module, "SigLip2Attention", _SIGLIP2_ATTENTION):
        return _siglip2_placer(model, name, module)
    if _is(module, "MoonViTAttention", _MOONVIT):
        return _moonvit_placer(model, name, module)
    if type(module).__module__ == _DINOV2_ATTENTION:
        found = innermost_on_path(model, name, lambda m: _is(m, "DinoVisionTransformer", _DINOV2))
        if found is None:
            return RefusingPlacer(f"kornia's DINOv2 {type(module).__name__} is placed only within a "
                                  f"DinoVisionTransformer (whose patch embedding gives its grid); {name or 'it'} is "
                                  "outside one: record the DinoVisionTransformer, or " + _POSITIONS)
        return _GridPlacer(found[1].patch_embed.proj, "DeDoDe's DINOv2", prefix=1)
    if _is(module, "Attention", _SAM_DECODER):
        return _two_way_skip(name, "kornia")
    if _is(module, "Attention", _SAM_ENCODER):
        return windowed_encoder_placer(model, name, module, "Block", "ImageEncoderViT", _SAM_ENCODER, _SAM_BLOCK,
                                       "kornia's SAM image-encoder Attention", "the ImageEncoderViT or the Sam model")
    return None


def call_start(model: nn.Module, recorded=()) -> nn.Module | None:
    """The outermost LoFTR model in ``model`` (itself included) holding ``recorded`` modules, or None: a forward call
    starts at its forward. Its first convolution is no such start: its backbone runs once per image of a pair of
    two sizes (two calls where there is one), and not at all for an image given as ``features0`` / ``features1``."""
    inside = {id(m) for m in recorded}
    holding = [m for m in named_module_list(model) if _is(m[1], "LoFTR", _LOFTR)
               and any(id(s) in inside for s in m[1].modules())]
    return min(holding, key=lambda m: m[0].count("."))[1] if holding else None


def probabilities_view(module: nn.Module):
    """LoFTR's ``FullAttention`` takes its softmax over dim 2 of ``[N, L, S, H]``: its attention is that softmax with
    the heads moved before the queries, ``[N, H, L, S]`` (a view, read in place)."""
    if _key(module) != _LOFTR_FULL:
        return None

    def heads_first(probabilities: torch.Tensor, dim: int) -> torch.Tensor | None:
        return probabilities.permute(0, 3, 1, 2) if probabilities.dim() == 4 and dim % 4 == 2 else None

    return heads_first


def _loftr_placer(model: nn.Module, name: str, module: nn.Module):
    found = innermost_on_path(model, name, lambda m: _is(m, "LoFTR", _LOFTR))
    layer = parent_module(model, name)
    holder = innermost_on_path(model, name, lambda m: _is(m, "LocalFeatureTransformer", _LOFTR_LAYER))
    transformer = None if holder is None else holder[1]
    if (found is None or not _is(layer, "LoFTREncoderLayer", _LOFTR_LAYER) or layer.attention is not module
            or transformer is None or not any(m is layer for m in getattr(transformer, "layers", ()))):
        return RefusingPlacer(
            f"kornia's LoFTR FullAttention ({name}) is placed only as the attention of a layer of a LoFTR model's "
            "transformer (the LoFTR model flattens each image's coarse map into the tokens it gets); it is not: "
            "record the LoFTR model, or " + _POSITIONS)
    loftr = found[1]
    kind = transformer.layer_names[next(i for i, m in enumerate(transformer.layers) if m is layer)]
    if kind == "cross":
        return _skip("cross-attention from one image of a pair to the other (kornia's LoFTR): the keys lie on "
                     "another image, so no distance on the query's image is defined")
    if transformer is loftr.loftr_fine:
        return RefusingPlacer(
            "vitmad does not place the full attention of kornia's LoFTR fine transformer (loftr_fine): its tokens "
            "are a window of fine cells around each coarse match, batched by match, not by image; record the coarse "
            f"transformer's layers, layers=['{found[0] + '.' if found[0] else ''}loftr_coarse.*']")
    if transformer is not loftr.loftr_coarse or kind != "self":
        return RefusingPlacer(f"kornia's LoFTR FullAttention ({name}) is in a layer named {kind!r} of a transformer "
                              "that is not the LoFTR model's loftr_coarse; vitmad places the 'self' layers of "
                              "loftr_coarse: " + _POSITIONS)
    stride = int(loftr.config["resolution"][0])
    if type(loftr.backbone).__name__ != _LOFTR_BACKBONES.get(stride):
        return RefusingPlacer(
            f"kornia's LoFTR has a {type(loftr.backbone).__name__} backbone and a coarse resolution of {stride} px; "
            f"vitmad knows the stride of {', '.join(_LOFTR_BACKBONES.values())} (8 and 16 px): " + _POSITIONS)
    return _LoFTRSelfPlacer(loftr, module, float(stride))


def _skip(reason: str):
    from . import Skip  # the families' verdict lives in the package that imports this module

    return Skip(reason)


def _vit_placer(model: nn.Module, name: str):
    found = innermost_on_path(model, name, lambda m: _is(m, "VisionTransformer", _VIT))
    if found is None:
        return RefusingPlacer(f"kornia's ViT MultiHeadAttention is placed only within its VisionTransformer (whose "
                              f"PatchEmbedding gives the grid); {name or 'it'} is outside one: record the "
                              "VisionTransformer, or " + _POSITIONS)
    embedding = found[1].patch_embedding
    if embedding.custom_backbone:
        return RefusingPlacer(
            "kornia's VisionTransformer embeds its patches with a backbone= module "
            f"({type(embedding.backbone).__name__}), whose map's pixel stride vitmad cannot read; pass "
            "positions=<[N, 2] pixel position of each token: a NaN row for the class token first, then the "
            "backbone's map row-major>")
    return _GridPlacer(embedding.backbone, "kornia's VisionTransformer", prefix=1)


def _qwen25_placer(model: nn.Module, name: str, module: nn.Module):
    found = innermost_on_path(model, name, lambda m: _is(m, "Qwen25VisionTransformer", _QWEN25))
    block = parent_module(model, name)
    blocks = [] if found is None else list(found[1].blocks)
    if block is None or getattr(block, "attn", None) is not module or not any(b is block for b in blocks):
        return RefusingPlacer(
            f"kornia's Qwen25VisionAttention is placed only as the attention of a block of a Qwen25VisionTransformer "
            f"(whose patch embedding gives the grid and whose config the windows); {name or 'it'} is "
            f"{'outside one' if found is None else 'not the attention of one of its blocks'}: record the "
            "Qwen25VisionTransformer, or " + _POSITIONS)
    tower = found[1]
    index = next(i for i, b in enumerate(blocks) if b is block)
    return _MergeOrderPlacer(tower, module, _qwen25_window(tower, index), index)


def _qwen25_window(tower: nn.Module, index: int) -> int | None:
    """Block ``index``'s window in patches a side by the tower's config now, None for a global block."""
    config = tower.config
    return None if index in config.fullatt_block_indexes else int(config.window_size) // int(config.patch_size)


def _mobilevit_placer(model: nn.Module, name: str):
    found = innermost_on_path(model, name, lambda m: _is(m, "MobileViT", _MOBILEVIT))
    block = innermost_on_path(model, name, lambda m: _is(m, "MobileViTBlock", _MOBILEVIT))
    index = None if found is None or block is None else next(
        (k for k, b in enumerate(found[1].mvit) if b is block[1]), None)
    if index is None:
        return RefusingPlacer(
            f"kornia's MobileViT Attention is placed only in a MobileViTBlock of a MobileViT (whose forward gives the "
            f"stride of the map the block unfolds); {name or 'the module recorded'} is "
            f"{'outside one' if found is None or block is None else 'in a block that is not one of its mvit'}: "
            "record the MobileViT, or " + _POSITIONS)
    mobilevit, block = found[1], block[1]
    # MobileViT.forward runs mvit[k] after conv1 and mv2[0 .. 4 + k] (the order of its lines, not of registration,
    # which puts every mv2 block first).
    reduction = int(mobilevit.conv1[0].stride[0])
    for mv2 in list(mobilevit.mv2)[:5 + index]:
        reduction *= int(mv2.stride)

    def partition(grid):
        ph, pw = int(block.ph), int(block.pw)
        cells = (grid[0] // ph, grid[1] // pw)
        return grid_partition(grid, cells), f"across {ph}x{pw} patches: grid {cells[0]}x{cells[1]}, dilated every " \
                                            f"{ph}x{pw}"

    # [b, ph * pw, heads, N, N]: the pixel offsets within a patch are a dim of their own, before the heads.
    return PartitionPlacer(model, name, block.conv2, nchw, partition, "windows before heads", output=True,
                           reduction=reduction)


def _tiny_vit_placer(model: nn.Module, name: str, module: nn.Module):
    found = innermost_on_path(model, name, lambda m: _is(m, "TinyViT", _TINY_VIT))
    block = parent_module(model, name)
    if found is None or not _is(block, "TinyViTBlock", _TINY_VIT) or block.attn is not module:
        return RefusingPlacer(
            f"kornia's TinyViT Attention is placed only as the attn of a TinyViTBlock of a TinyViT (whose "
            f"convolutions give the stride of the block's map); {name or 'the module recorded'} is "
            f"{'outside one' if found is None else 'not the attn of a TinyViTBlock'}: record the TinyViT (or the Sam "
            "model holding it), or " + _POSITIONS)
    size = int(block.window_size)

    def partition(grid):
        return block_partition(grid, (size, size)), f"window {size}x{size}"

    def tokens_as_map(x: torch.Tensor) -> tuple[int, int, int] | None:
        # The block views its [B, H * W, C] tokens as the input_resolution it was built for.
        height, width = (int(n) for n in block.input_resolution)
        return (int(x.shape[0]), height, width) if x.dim() == 3 and x.shape[1] == height * width else None

    return PartitionPlacer(model, name, block, tokens_as_map, partition, "windows in batch",
                           reduction=reduction_before(found[1], block))


def _layer_of(model: nn.Module, name: str, module: nn.Module, tower: tuple[str, nn.Module] | None, layers: str,
              attention: str) -> bool:
    """Whether ``module`` is the ``attention`` of one of the ``layers`` (a dotted path in ``tower``) of ``tower``."""
    layer = parent_module(model, name)
    return (tower is not None and layer is not None and getattr(layer, attention, None) is module
            and any(m is layer for m in tower[1].get_submodule(layers)))


def _siglip2_placer(model: nn.Module, name: str, module: nn.Module):
    if innermost_on_path(model, name, lambda m: _is(m, "SigLip2TextModel", _SIGLIP2_TEXT)) is not None:
        return _skip("SigLIP2's text encoder: attention among the tokens of a text, not of an image")
    found = innermost_on_path(model, name, lambda m: _is(m, "SigLip2VisionModel", _SIGLIP2_VISION))
    if not _layer_of(model, name, module, found, "encoder.layers", "self_attn"):
        return RefusingPlacer(
            f"kornia's SigLip2Attention is placed only as the self_attn of a layer of a SigLip2VisionModel (whose "
            f"patch embedding gives the grid) or skipped in a SigLip2TextModel; {name or 'it'} is neither: record the "
            "SigLip2VisionModel (or the SigLip2Model or PaliGemma holding it), or " + _POSITIONS)
    return _GridPlacer(found[1].embeddings.patch_embedding, "kornia's SigLIP2 vision tower", prefix=0,
                       masked=(module, 1))


def _moonvit_placer(model: nn.Module, name: str, module: nn.Module):
    found = innermost_on_path(model, name, lambda m: _is(m, "MoonViT", _MOONVIT))
    if not _layer_of(model, name, module, found, "encoder.layers", "attn"):
        return RefusingPlacer(
            f"kornia's MoonViTAttention is placed only as the attn of a layer of a MoonViT (whose patch embedding "
            f"gives the grid); {name or 'it'} is not: record the MoonViT (or the KimiVLModel holding it), or "
            + _POSITIONS)
    return _GridPlacer(found[1].patch_embed, "kornia's MoonViT", prefix=0, masked=(module, 3))


def _multihead_placer(model: nn.Module, name: str, module: nn.Module):
    parent = parent_module(model, name)
    if parent is None:
        return None
    if _is(parent, "SigLip2MultiheadAttentionPoolingHead", _SIGLIP2_VISION) and parent.attention is module:
        return _siglip2_pooling(model, name, parent)
    if _is(parent, "TransformerDecoderLayer", _RT_DETR_HEAD):
        return _skip("RT-DETR's decoder self-attention: its queries are object queries, without a position in the "
                     "image")
    if not _is(parent, "AIFI", _RT_DETR_ENCODER):
        return None
    found = innermost_on_path(model, name, lambda m: _is(m, "RTDETR", _RT_DETR))
    if found is None:
        return RefusingPlacer(
            f"kornia's AIFI ({name}) is placed only inside an RTDETR model, whose backbone gives the stride of the "
            "map it attends over; recorded alone, its HybridEncoder gets feature maps, not the image: record the "
            "RTDETR model, or " + _POSITIONS)
    backbone = found[1].backbone
    if _key(backbone) not in _RT_DETR_BACKBONES:
        return RefusingPlacer(
            f"kornia's RTDETR has a {type(backbone).__name__} backbone, whose last map's pixel stride vitmad does not "
            "know (it knows ResNetD's and PPHGNetV2's, 32 px); " + _POSITIONS)
    return _MapPlacer(parent, _RT_DETR_STRIDE, f"the last map of RT-DETR's {type(backbone).__name__} backbone", 1)


def _siglip2_pooling(model: nn.Module, name: str, head: nn.Module):
    """The attention-pooling head of kornia's SigLIP2 vision tower: its learned probe queries the patch grid."""
    from . import ClassQueries  # the families' verdicts live in the package that imports this module

    found = innermost_on_path(model, name, lambda m: _is(m, "SigLip2VisionModel", _SIGLIP2_VISION))
    if found is None or found[1].head is not head:
        return RefusingPlacer(
            f"kornia's SigLip2MultiheadAttentionPoolingHead ({name}) is placed only as the head of a "
            "SigLip2VisionModel, whose patch embedding gives the grid it pools; record the SigLip2VisionModel, or "
            + _POSITIONS)
    keys = _GridPlacer(found[1].embeddings.patch_embedding, "kornia's SigLIP2 vision tower", prefix=0,
                       masked=(head, 1))
    return ClassQueries(_POOLING.format("a learned query (kornia SigLIP2's probe)", "its"), keys,
                        "the patch grid it pools", queries_in_keys=False)


class _GridPlacer(LayerPlacer):
    """``prefix`` tokens without a position (the class token of kornia's ViT and DINOv2), then the row-major grid that
    ``embedding`` (a ``Conv2d`` of kernel = stride, run on the image) gives in each call, in pixels of its input.

    ``masked``: ``(module, index)`` where ``module`` takes an ``attention_mask`` (keyword, or positional argument
    ``index``) that vitmad does not read (SigLIP2's and MoonViT's padded patches or pairs): a call given one is
    refused, not placed as if every patch attended over the whole grid."""

    def __init__(self, embedding: nn.Conv2d, what: str, *, prefix: int,
                 masked: tuple[nn.Module, int] | None = None):
        self.embedding, self.what, self.prefix, self.masked = embedding, what, prefix, masked
        self.stride = (float(embedding.stride[0]), float(embedding.stride[1]))
        self.key = f"kornia.grid.{id(embedding)}"
        self.mask_key = None if masked is None else f"kornia.mask.{id(masked[0])}"

    def install(self, context: CallContext) -> list[torch.utils.hooks.RemovableHandle]:
        def see(module, args, output) -> None:
            context.values[self.key] = (int(output.shape[-2]), int(output.shape[-1]))

        handles = [self.embedding.register_forward_hook(see)]
        if self.masked is not None:
            module, index = self.masked

            def see_mask(module, args, kwargs) -> None:
                mask = args[index] if len(args) > index else kwargs.get("attention_mask")
                context.values[self.mask_key] = mask is not None

            handles.append(module.register_forward_pre_hook(see_mask, with_kwargs=True))
        return handles

    def place(self, context: CallContext, lead: torch.Size, num_queries: int, num_keys: int) -> Placement:
        grid = context.values.get(self.key)
        if grid is None:
            raise NotPlaceable(f"the patch embedding of {self.what} had not run in this call when it attended, so "
                               "its grid is unknown; " + _POSITIONS)
        if self.mask_key is not None and context.values.get(self.mask_key):
            raise NotPlaceable(f"it was given an attention_mask (padded patches, or pairs that do not attend), which "
                               f"vitmad does not read for {self.what}: it places every patch attending over the whole "
                               "grid; record a call without attention_mask")
        return grid_placement(lead, num_queries, num_keys, grid=grid, stride=self.stride, attention="global",
                              prefix=self.prefix)


def _merge_order(index: torch.Tensor, merge: int) -> torch.Tensor:
    """``[gh, gw]`` values per patch, in the token order of kornia's Qwen2.5-VL tower: its ``merge`` x ``merge``
    squares row-major, the patches of a square row-major within it."""
    gh, gw = index.shape
    return index.reshape(gh // merge, merge, gw // merge, merge).permute(0, 2, 1, 3).flatten()


class _MergeOrderPlacer(LayerPlacer):
    """kornia's Qwen2.5-VL tower (``kornia.models.qwen25.vision``, a port of transformers' that takes images): its
    ``Conv3d`` patch embedding (stride ``patch_size``; one temporal cell, the image repeated over
    ``temporal_patch_size`` frames) gives a ``[B, D, 1, gh, gw]`` map whose patches it puts in merge order (each
    ``spatial_merge_size`` square contiguous). Every block attends over all of an image's tokens, kept in that order
    (``[B, heads, N, N]``, F.scaled_dot_product_attention): a window block with a boolean ``attn_mask`` allowing the
    pairs in the same window (``window_size // patch_size`` patches a side, row-major windows over the patch grid),
    which vitmad applies as the model does; a ``fullatt_block_indexes`` block without one. The mask is checked per
    call against those windows, so a changed token order is refused, not misplaced."""

    def __init__(self, tower: nn.Module, module: nn.Module, window: int | None, index: int):
        self.tower, self.index = tower, index
        self.embedding, self.module = tower.patch_embed.proj, module
        self.merge, self.window = int(tower.config.spatial_merge_size), window
        self.stride = (float(self.embedding.stride[-2]), float(self.embedding.stride[-1]))
        self.grid_key, self.mask_key = f"kornia.qwen25.grid.{id(self.embedding)}", f"kornia.qwen25.mask.{id(module)}"
        self.attention = "global" if window is None else f"window {window}x{window} patches (a mask over the tokens)"

    def install(self, context: CallContext) -> list[torch.utils.hooks.RemovableHandle]:
        def see_grid(module, args, output) -> None:
            context.values[self.grid_key] = tuple(int(n) for n in output.shape[-3:])

        def see_mask(module, args, kwargs) -> None:
            context.values[self.mask_key] = args[3] if len(args) > 3 else kwargs.get("attn_mask")

        return [self.embedding.register_forward_hook(see_grid),
                self.module.register_forward_pre_hook(see_mask, with_kwargs=True)]

    def place(self, context: CallContext, lead: torch.Size, num_queries: int, num_keys: int) -> Placement:
        cells = context.values.get(self.grid_key)
        if cells is None:
            raise NotPlaceable("the patch embedding of kornia's Qwen2.5-VL tower had not run in this call when it "
                               "attended, so its grid is unknown; " + _POSITIONS)
        frames, gh, gw = cells
        if frames != 1 or gh % self.merge or gw % self.merge:
            raise NotPlaceable(f"its patch embedding gave {frames} temporal x {gh} x {gw} patches; vitmad places one "
                               f"temporal cell of whole {self.merge} x {self.merge} merge squares")
        tokens = gh * gw
        if len(lead) != 2 or num_queries != tokens or num_keys != tokens:
            raise NotPlaceable(f"its attention has shape [{', '.join(map(str, lead))}, {num_queries}, {num_keys}]; "
                               f"expected [B, H, {tokens}, {tokens}]: the {gh}x{gw} patches in merge order")
        self._check_mask(context, gh, gw)
        order = _merge_order(torch.arange(tokens).reshape(gh, gw), self.merge)  # token i is patch order[i]
        positions = cell_centres(gh, gw, self.stride).reshape(-1, 2)[order]
        geometry = LayerGeometry((gh, gw), self.stride, self.attention, int(lead[-1]))
        return Placement(positions, None, select_tokens(torch.argsort(order)), geometry)

    def _check_mask(self, context: CallContext, gh: int, gw: int) -> None:
        now = _qwen25_window(self.tower, self.index)
        if now != self.window:  # read when the recording began (QA helper-194: the mask message blamed the mask)
            def shown(window: int | None) -> str:
                return "global" if window is None else f"{window}x{window}-patch windows"

            raise NotPlaceable(
                f"kornia's Qwen2.5-VL tower's config changed since the recording began: block {self.index} is now "
                f"{shown(now)}, not {shown(self.window)} (window_size and fullatt_block_indexes are read when the "
                "recording begins); begin a new recording after changing them")
        mask = context.values.get(self.mask_key)
        if self.window is None:
            if mask is not None:
                raise NotPlaceable("this fullatt_block_indexes block of kornia's Qwen2.5-VL tower was given an "
                                   "attn_mask, which vitmad does not know; " + _POSITIONS)
            return
        checked = f"kornia.qwen25.checked.{id(self.embedding)}"
        if mask is not None and context.values.get(checked) is mask:  # the tower hands every window block one mask
            return
        rows = torch.arange(gh).unsqueeze(1) // self.window
        cols = torch.arange(gw).unsqueeze(0) // self.window
        window = _merge_order(rows * -(-gw // self.window) + cols, self.merge)
        expected = window.unsqueeze(1) == window.unsqueeze(0)
        if not (isinstance(mask, torch.Tensor) and mask.dtype == torch.bool and mask.shape[-2:] == expected.shape
                and bool((mask == expected.to(mask.device)).all())):
            raise NotPlaceable(f"the attn_mask of this window block of kornia's Qwen2.5-VL tower is not the "
                               f"{self.window}x{self.window}-patch windows over its {gh}x{gw} patches in merge order "
                               "that vitmad reads from kornia's code; " + _POSITIONS)
        context.values[checked] = mask


class _LoFTRSelfPlacer(LayerPlacer):
    """A ``"self"`` layer of kornia's LoFTR coarse transformer with full attention: each call attends over one
    image's coarse cells, image 0's in the layer's first call of a ``loftr_coarse`` forward, image 1's in its
    second; the masked cells (``q_mask``, the same tensor as ``kv_mask``) without a position."""

    def __init__(self, loftr: nn.Module, module: nn.Module, stride: float):
        self.loftr, self.module, self.stride = loftr, module, (stride, stride)
        self.grids_key, self.call_key = f"kornia.loftr.grids.{id(loftr)}", f"kornia.loftr.call.{id(module)}"
        self.count_key = f"kornia.loftr.count.{id(module)}"

    def install(self, context: CallContext) -> list[torch.utils.hooks.RemovableHandle]:
        def see_pair(module, args, kwargs) -> None:  # after the call's start, also at the LoFTR model (call_start)
            data = args[0] if args else kwargs.get("data")
            context.values[self.grids_key] = _loftr_grids(data, int(self.stride[0]))

        def start(module, args, kwargs) -> None:
            context.values[self.count_key] = 0

        def see_call(module, args, kwargs) -> None:
            side = context.values.get(self.count_key)
            if side is not None:
                context.values[self.count_key] = side + 1
            q_mask = args[3] if len(args) > 3 else kwargs.get("q_mask")
            kv_mask = args[4] if len(args) > 4 else kwargs.get("kv_mask")
            context.values[self.call_key] = (side, q_mask, kv_mask)

        return [self.loftr.register_forward_pre_hook(see_pair, with_kwargs=True),
                self.loftr.loftr_coarse.register_forward_pre_hook(start, with_kwargs=True),
                self.module.register_forward_pre_hook(see_call, with_kwargs=True)]

    def place(self, context: CallContext, lead: torch.Size, num_queries: int, num_keys: int) -> Placement:
        grids = context.values.get(self.grids_key)
        side, q_mask, kv_mask = context.values.get(self.call_key, (None, None, None))
        if grids is None or side is None:
            raise NotPlaceable("it ran outside a forward of its LoFTR model's loftr_coarse (called on its own?), so "
                               "the image its tokens belong to is unknown; record a forward of the LoFTR model")
        if isinstance(grids, str):
            raise NotPlaceable(grids)
        if side > 1:
            raise NotPlaceable(f"it ran {side + 1} times in one forward of loftr_coarse; kornia's 'self' layer runs "
                               "twice, on image 0's cells, then on image 1's")
        batch, (gh, gw) = grids[side]
        tokens = gh * gw
        if len(lead) != 2 or int(lead[0]) != batch or num_queries != tokens or num_keys != tokens:
            raise NotPlaceable(
                f"its attention has shape [{', '.join(map(str, lead))}, {num_queries}, {num_keys}]; expected "
                f"[{batch}, H, {tokens}, {tokens}]: self-attention over the {gh}x{gw} coarse map of image{side} "
                f"({self.stride[0]:g} px cells)")
        if (q_mask is None) != (kv_mask is None) or (q_mask is not None and not (
                q_mask is kv_mask and q_mask.dtype == torch.bool and tuple(q_mask.shape) == (batch, tokens))):
            raise NotPlaceable(
                f"its q_mask and kv_mask are not one bool [{batch}, {tokens}] mask of image{side}'s cells (LoFTR's "
                f"mask{side} at its cells), the masks vitmad reads from kornia's 'self' layer; " + _POSITIONS)
        cells = cell_centres(gh, gw, self.stride).reshape(-1, 2)
        heads = int(lead[1])
        if q_mask is None or bool(q_mask.all()):
            geometry = LayerGeometry((gh, gw), self.stride, "global", heads, 0)
            return Placement(cells, None, _identity, geometry)
        mask = q_mask.detach()
        positions = torch.where(mask.unsqueeze(-1), cells.to(mask.device), float("nan")).unsqueeze(1)  # [N, 1, L, 2]
        geometry = LayerGeometry((gh, gw), self.stride, f"global, cells mask{side} pads without a position", heads, 0)
        return Placement(positions, None, _identity, geometry, present=mask)


def _loftr_grids(data, stride: int) -> list[tuple[int, tuple[int, int]]] | str:
    """``(batch, (h, w))`` of the coarse map of each image of the pair ``data`` given to LoFTR, or why not known:
    the ``coarse`` map of ``features<side>``, else the ``ceil`` of ``image<side>``'s sides over ``stride`` (the
    backbone's stride-2 convolutions are padded)."""
    if not isinstance(data, dict):
        return f"its LoFTR model was called with a {type(data).__name__}, not the dict of the pair; " + _POSITIONS
    grids = []
    for side in (0, 1):
        features, image = data.get(f"features{side}"), data.get(f"image{side}")
        if isinstance(features, dict) and isinstance(features.get("coarse"), torch.Tensor):
            coarse = features["coarse"]
            grids.append((int(coarse.shape[0]), (int(coarse.shape[-2]), int(coarse.shape[-1]))))
        elif isinstance(image, torch.Tensor) and image.dim() == 4:
            grids.append((int(image.shape[0]), (-(-int(image.shape[-2]) // stride),
                                                -(-int(image.shape[-1]) // stride))))
        else:
            return (f"its LoFTR model got neither a [N, 1, H, W] image{side} nor features{side} with a coarse map; "
                    + _POSITIONS)
    return grids


def _identity(values: torch.Tensor) -> torch.Tensor:
    return values  # one image's cells, row-major
