"""Ultralytics' SAM image encoders besides SAM's ViT (``ultralytics.models.sam``, 8.4): MobileSAM's TinyViT, SAM 2's
Hiera and SAM 3's ViTDet trunk, alone or inside their ``SAMModel`` / ``SAM2Model`` / ``SAM3Model``; and YOLOE's
visual-prompt pooling, skipped. (SAM's ``ImageEncoderViT`` is placed by :mod:`.ultralytics`.)

- ``TinyViT`` (``modules/tiny_encoder.py``, MobileSAM): ``PatchEmbed`` is two 3 x 3 convolutions of stride 2; stage
  0 is convolutional (``MBConv``); each later stage runs ``TinyViTBlock``\\ s on ``[B, H * W, C]`` tokens, the map
  ``input_resolution`` (set by the model from ``img_size``, or ``set_imgsz``) row-major. A block zero-pads the map at
  the bottom and right to whole ``window_size`` windows, windows row-major in the batch and tokens row-major in each
  (``view(b, nH, ws, nW, ws, c).transpose(2, 3)``), and ``Attention`` takes ``(q k^T) * scale + attention bias``,
  ``.softmax(dim=-1)`` on ``[B * windows, heads, N, N]``: timm's TinyViT's layout (:mod:`.tiny_vit`), the padding
  unmasked (keys past the image edge, no queries). A map of exactly one window is not partitioned: the same one
  window. The attention bias depends on the offset between tokens: scores, not places. Each stage's stride is the
  product of the strides of the convolutions that run before it, in module order (the patch embedding's, then each
  ``PatchMerging``'s, whose stride is 1 where its ``out_dim`` is 320, 448 or 576: MobileSAM's last stage stays at
  16 px).
- ``Hiera`` (``modules/encoders.py``, SAM 2 / 2.1) with ``MultiScaleBlock`` and ``MultiScaleAttention``
  (``modules/blocks.py``): sam2's code copied (SAM's ``window_partition``, query pooling at a stage change, SDPA on
  ``[B * windows, heads, Nq, Nk]``), placed as :mod:`.segment_anything` places sam2's, the patch stride from its
  7 x 7 / 4 convolution.
- SAM 3's ``ViT`` (``sam3/vitdet.py``): SAM's ``window_partition`` on a ``[B, H, W, C]`` map, ``Attention`` with
  2-D RoPE (and, where asked, relative positions concatenated to q and k) calling SDPA on ``[B * windows, heads, N,
  N]``, global blocks (window 0) over the whole map; the patch embedding a convolution of kernel = stride = patch.
  Placed as transformers' SAM3 ViT (:mod:`.windowed_vit`). A ViT that keeps its class token (``retain_cls_token``)
  gives its blocks ``[B, 1 + H * W, C]`` (the token first, no windows, no relative positions: ultralytics asserts
  both): refused by name in the call, as ultralytics' own ``forward`` cannot reshape those tokens back into a map
  (``math.sqrt`` sizes), so no forward of such a model finishes for a recording to be checked against.

The rest of ``ultralytics.models.sam`` that attends (the mask decoders' two-way transformers between prompt tokens
and the image embedding, SAM 2's memory attention, SAM 3's detector, geometry and text encoders) is refused by name.
"""

from __future__ import annotations

from torch import nn

from ..module_index import module_list
from ..placement import RefusingPlacer
from .segment_anything import windowed_encoder_placer
from .stages import innermost_on_path, pair
from .windowed_vit import WindowedDesign
from .windows import PartitionPlacer, block_partition, parent_module

__all__ = ["placer"]

_SAM = "ultralytics.models.sam."
_TINY_VIT = "ultralytics.models.sam.modules.tiny_encoder"
_SAM_BLOCKS = "ultralytics.models.sam.modules.blocks"
_SAM_ENCODERS = "ultralytics.models.sam.modules.encoders"
_VITDET = "ultralytics.models.sam.sam3.vitdet"
_HIERA_BLOCK = WindowedDesign("MultiScaleBlock", "num_heads", "q_stride")
_VITDET_BLOCK = WindowedDesign("Block", "num_heads")
_POSITIONS = "pass positions=<[N, 2] pixel position of each token>"
_VITDET_CLASS_TOKEN = (
    "ultralytics' SAM 3 ViT keeps its class token (retain_cls_token=True): its blocks attend over the class token, "
    "then the row-major patch grid, all global. vitmad does not place it: ultralytics' (8.4) own ViT.forward cannot "
    "finish with that token (it reshapes the patch tokens to sqrt(count) x sqrt(count), a float), so no recording of "
    "the model could be checked; build the ViT with retain_cls_token=False, as build_sam3 does, or pass "
    "positions=<[1 + h * w, 2] pixel position of each token: a NaN row for the class token, then the row-major patch "
    "grid at patch_size px>")


def _is(module: nn.Module, class_name: str, defining_module: str) -> bool:
    cls = type(module)
    return cls.__name__ == class_name and cls.__module__ == defining_module


def placer(model: nn.Module, name: str, module: nn.Module):
    cls = type(module)
    if _is(module, "SAVPE", "ultralytics.nn.modules.block"):
        from . import Skip

        return Skip("YOLOE's visual prompt embedding (SAVPE): a softmax over each prompt mask's cells, whose queries "
                    "are the visual prompts, with no position in the image: attention pooling, no MAD")
    if not cls.__module__.startswith(_SAM):
        return None
    if _is(module, "Attention", _TINY_VIT):
        return _tiny_vit_placer(model, name)
    if _is(module, "MultiScaleAttention", _SAM_BLOCKS):
        return windowed_encoder_placer(model, name, module, "MultiScaleBlock", "Hiera", _SAM_BLOCKS, _HIERA_BLOCK,
                                       "ultralytics' SAM 2 MultiScaleAttention", "the Hiera trunk, its ImageEncoder "
                                       "or the SAM2Model", encoder_module=_SAM_ENCODERS)
    if _is(module, "Attention", _VITDET) and getattr(module, "cls_token", False):
        return RefusingPlacer(_VITDET_CLASS_TOKEN)
    if _is(module, "Attention", _VITDET):
        return windowed_encoder_placer(model, name, module, "Block", "ViT", _VITDET, _VITDET_BLOCK,
                                       "ultralytics' SAM 3 ViT Attention", "the ViT trunk or the SAM3 model")
    return RefusingPlacer(
        f"ultralytics' SAM module {cls.__name__} ({cls.__module__}) is not placed by vitmad: it places the image "
        "encoders' self-attention (SAM's ImageEncoderViT, MobileSAM's TinyViT, SAM 2's Hiera, SAM 3's ViT), not the "
        "mask decoder's attention between prompt tokens and the image, memory attention or SAM 3's detector; leave "
        "it out of layers=, or " + _POSITIONS)


def _tiny_vit_placer(model: nn.Module, name: str):
    block = parent_module(model, name)
    found = innermost_on_path(model, name, lambda m: _is(m, "TinyViT", _TINY_VIT))
    if block is None or not _is(block, "TinyViTBlock", _TINY_VIT) or found is None:
        return RefusingPlacer(
            f"ultralytics' TinyViT Attention is placed only as the attention of a TinyViTBlock within a TinyViT "
            f"(whose convolutions give the stride); "
            f"{f'{name} is held by {type(block).__name__}' if name else 'it was recorded alone'}"
            f"{'' if found is not None else ', outside any TinyViT'}: record the TinyViT (MobileSAM's image_encoder) "
            "or the SAMModel that holds it, or " + _POSITIONS)
    encoder_name, encoder = found
    reduction = _stride_before(encoder, block)
    if reduction is None:
        return RefusingPlacer(f"the convolutions of {type(encoder).__name__} before {name} have unequal or "
                              "fractional strides, so the pixel stride of its map is unknown; " + _POSITIONS)

    def read_map(x):
        # TinyViTBlock gets [B, H * W, C] tokens of its input_resolution (it asserts as much itself).
        height, width = (int(side) for side in block.input_resolution)
        return (int(x.shape[0]), height, width) if x.dim() == 3 and x.shape[1] == height * width else None

    def partition(grid):
        size = int(block.window_size)
        return block_partition(grid, (size, size)), f"window {size}x{size}"

    inner = name[len(encoder_name) + 1:] if encoder_name else name
    return PartitionPlacer(encoder, inner, block, read_map, partition, "windows in batch", reduction=reduction)


def _stride_before(encoder: nn.Module, block: nn.Module) -> int | None:
    """The product of the strides of the convolutions of ``encoder`` that come before ``block`` in module order, which
    is TinyViT's order of running them (its patch embedding, then each stage's blocks and its PatchMerging); None
    where a stride is not square."""
    stride = 1
    for module in module_list(encoder):
        if module is block:
            return stride
        if isinstance(module, nn.Conv2d):
            step = pair(module.stride)
            if step[0] != step[1]:
                return None
            stride *= int(step[0])
    return None
