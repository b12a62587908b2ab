"""The attention blocks of a VQGAN image tokenizer's encoder, whose codes stand for the image in the language model:
transformers' Apertus 1.5 vision tokenizer (``Apertus1p5VisionTokenizerModel``, EMU3.5's encoder) and Chameleon's
VQ-VAE (``ChameleonVQVAE``, the ``vqmodel`` of ``ChameleonModel``), block for block the same design, and Emu3's VQ-VAE
(``Emu3VQVAE``, the ``vqmodel`` of ``Emu3Model``), the same encoder with another attention block.

``Apertus1p5VisionTokenizerAttnBlock`` (``ChameleonVQVAEEncoderAttnBlock``) attends with one head over every cell of
its ``[B, C, H, W]`` input map, flattened row-major (``reshape(B, C, H * W)``), queries and keys alike, its softmax
``[B, N, N]`` without a head dimension. Its map is that of its stage: the encoder's convolutions keep the size (3 x 3,
padding 1; 1 x 1), except each stage's downsampling, a 3 x 3 convolution of stride 2 after padding the bottom and right
by one (``floor(n / 2)`` outputs), so the stride is the product of the strides of the encoder's convolutions before the
block, each cell at the centre of its stride cell (docs/definition.md, "Beyond one grid"), checked per call against the
image.

``Emu3VQVAEAttentionBlock`` is multi-head attention through transformers' attention interface (``q_proj``, ``k_proj``,
``v_proj``; no mask, not causal) over the same cells, but its caller flattens the map before the block
(``view(B, C, H * W).transpose(1, 2)``), so the block sees ``[B, H * W, C]`` tokens without the map's shape. The map
is read per call where the caller normalises it just before: ``Emu3VQVAEDownBlock`` applies ``attn_norms[j]`` before
``attn[j]`` of the same stage, ``Emu3VQVAEMiddleBlock`` ``attn_norm`` before ``attn_1``; its batch and cell count must
be the attention's. ``Emu3VQVAEEncoderConvDownsample`` pads the bottom and right by one and convolves 3 x 3 with
stride 2, padding 0: ``floor(n / 2)`` outputs, as above. ``Emu3VQVAEEncoder`` folds the frames of a clip
(``pixel_values`` ``[B, T, C, H, W]``; ``encode`` makes an image a clip of ``temporal_downsample_factor`` copies of
itself) into the batch before its spatial layers, frame ``t`` of clip ``b`` at row ``b * T + t``, and convolves over
time only after the middle block: each frame attends within itself, an image of its own. The encoder, not the whole
VQ-VAE, is the tower: the decoder's blocks attend over a map it decodes from codes (``decode``), cells of the image it
generates, no input image's; named in ``layers=`` they are skipped with that reason.
"""

from __future__ import annotations

from torch import nn

from ..placement import RefusingPlacer
from .iformer import SingleHeadPlacer
from .stages import defined_in, innermost_on_path, reduction_before
from .windows import PartitionPlacer, nchw, whole_map

__all__ = ["placer", "is_tower"]

# (tokenizer, its encoder, the encoder's attention block, defining module) per model whose block takes the map itself.
_DESIGNS = (
    ("Apertus1p5VisionTokenizerModel", "Apertus1p5VisionTokenizerEncoder", "Apertus1p5VisionTokenizerAttnBlock",
     "modeling_apertus1p5"),
    ("ChameleonVQVAE", "ChameleonVQVAEEncoder", "ChameleonVQVAEEncoderAttnBlock", "modeling_chameleon"),
)
_EMU3 = "modeling_emu3"
_EMU3_DECODER = (
    "the attention of Emu3's VQ-VAE decoder: it attends over the map it decodes from image codes (decode), whose "
    "cells are pixels of the image it generates, not of an input image, so vitmad does not place it; the encoder's "
    "attention (encode) is the image's"
)


def is_tower(module: nn.Module) -> bool:
    """Whether ``module`` is such a tokenizer: for the recorder, the tower that embeds the image in
    ``Apertus1p5ForConditionalGeneration`` and ``ChameleonForConditionalGeneration`` (its first convolution is 3 x 3
    of stride 1, no patch embedding); in ``Emu3ForConditionalGeneration`` the VQ-VAE's encoder, since its decoder
    attends over no input image."""
    return (any(defined_in(module, tower, source) for tower, _, _, source in _DESIGNS)
            or defined_in(module, "Emu3VQVAEEncoder", _EMU3))


def placer(model: nn.Module, name: str, module: nn.Module):
    if defined_in(module, "Emu3VQVAEAttentionBlock", _EMU3):
        return _emu3_placer(model, name, module)
    design = next((d for d in _DESIGNS if defined_in(module, d[2], d[3])), None)
    if design is None:
        return None
    found = innermost_on_path(model, name, lambda owner: defined_in(owner, design[1], design[3]))
    if found is None:
        return None
    # Counted inside the encoder alone: its own convolutions run in the order they are registered, the attention
    # block's q, k, v and projection (1 x 1) after its input map.
    stride = reduction_before(found[1], module)
    return SingleHeadPlacer(PartitionPlacer(model, name, module, nchw, whole_map, "windows in batch",
                                            reduction=stride))


def _emu3_placer(model: nn.Module, name: str, module: nn.Module):
    from . import Skip

    if innermost_on_path(model, name, lambda owner: defined_in(owner, "Emu3VQVAEDecoder", _EMU3)) is not None:
        return Skip(_EMU3_DECODER)
    found = innermost_on_path(model, name, lambda owner: defined_in(owner, "Emu3VQVAEEncoder", _EMU3))
    if found is None:
        return None
    norm = _norm_before(model, name)
    if norm is None:
        # Its tokens are a map flattened by its caller, whose shape only that caller's code knows.
        return RefusingPlacer(
            "vitmad knows Emu3's encoder attention as down_block.down.<stage>.attn.<j> (after attn_norms.<j>) and "
            "middle_block.attn_1 (after attn_norm), where the map they flatten is read; this block is held "
            "otherwise, so the shape of its map is unknown; pass positions=<[N, 2] pixel position of each token>"
        )
    # The encoder registers its convolutions in the order they run (conv_in, each stage's ResNet blocks, its
    # attention, its downsampling; the middle block), its temporal ones (Conv3d) after the middle block.
    stride = reduction_before(found[1], module)
    return PartitionPlacer(model, name, norm, nchw, whole_map, "windows in batch", reduction=stride)


def _norm_before(model: nn.Module, name: str) -> nn.Module | None:
    """The norm the encoder applies to the ``[B, C, H, W]`` map just before the attention block ``name`` flattens
    it: ``attn_norms[j]`` of a stage of ``Emu3VQVAEDownBlock`` for its ``attn[j]``, ``Emu3VQVAEMiddleBlock``'s
    ``attn_norm`` for its ``attn_1``; None for a block held otherwise."""
    holder, _, attribute = name.rpartition(".")
    parent = model.get_submodule(holder) if holder else model
    if defined_in(parent, "Emu3VQVAEMiddleBlock", _EMU3):
        return parent.attn_norm if attribute == "attn_1" else None
    stage_name, _, list_name = holder.rpartition(".")
    down = innermost_on_path(model, name, lambda owner: defined_in(owner, "Emu3VQVAEDownBlock", _EMU3))
    if down is None or list_name != "attn" or not attribute.isdigit() or stage_name.rpartition(".")[0] != (
            down[0] + ".down" if down[0] else "down"):
        return None
    norms = getattr(model.get_submodule(stage_name), "attn_norms", None)
    return norms[int(attribute)] if isinstance(norms, nn.ModuleList) and int(attribute) < len(norms) else None
