"""Meta's original Segment Anything package (``segment_anything``): ``ImageEncoderViT`` alone or inside ``Sam``.

``ImageEncoderViT`` is ViTDet's plain ViT on a ``[B, H, W, C]`` token map: ``PatchEmbed`` is a convolution with
kernel = stride = ``patch_size`` and no padding (a remainder of the image past the last whole patch is dropped),
then the map is permuted channels-last; the absolute position embedding and the decomposed relative position bias
(``add_decomposed_rel_pos``, added to the scores before the softmax) change the scores, not where a token is. Each
``Block`` with ``window_size > 0`` runs ``window_partition``: the map zero-padded at the bottom and right to a multiple
of the window, windows row-major, tokens row-major within a window; the padding is not masked, so a padding slot is
a key at its cell of the padded grid past the image edge and no query (docs/definition.md, windows). A block in
``global_attn_indexes`` (``window_size`` 0) attends over the whole map. ``Attention`` splits heads with
``reshape(3, B * heads, H * W, -1)``, so its softmax (``Tensor.softmax``, captured by vitmad's softmax capture)
runs over ``[B * windows * heads, N, N]``: image, then window, then head; transformers' SAM and timm's
``vision_transformer_sam`` merge them in the same order, so :class:`.windowed_vit.WindowedGridPlacer` places it,
the patch stride read from ``PatchEmbed``'s convolution. Token centres are in the pixels of the image the encoder
receives (``Sam.preprocess`` and ``SamPredictor`` resize the long side to ``img_size`` and pad the bottom and right
with zeros, which the encoder embeds as image content).

``Sam`` (and ``SamPredictor.set_image``, ``SamAutomaticMaskGenerator.generate``, which call
``model.image_encoder`` as a module, once per image or crop) holds the encoder beside ``PromptEncoder`` (no
attention) and ``MaskDecoder``, whose ``TwoWayTransformer`` runs ``transformer.Attention`` between the prompt
tokens and the image embedding. That is no image self-attention: the prompt (point, box and output) tokens have no
cell on the image. It lies outside the encoder that embeds the image, so it is not recorded by default, and is
skipped with its reason when named in ``layers``.
"""

from __future__ import annotations

from torch import nn

from ..placement import RefusingPlacer
from .stages import innermost_on_path
from .windowed_vit import WindowedDesign, WindowedGridPlacer

__all__ = ["placer"]

_ENCODER_MODULE = "segment_anything.modeling.image_encoder"
_DECODER_MODULE = "segment_anything.modeling.transformer"
_BLOCK = WindowedDesign("Block", "num_heads")

_TWO_WAY = "two-way transformer of the mask decoder (segment_anything TwoWayTransformer): "
# Attention attribute in its owner (TwoWayAttentionBlock, or the TwoWayTransformer itself) -> why it has no MAD.
_TWO_WAY_REASONS = {
    "self_attn": "self-attention of the prompt (point/box) and output tokens, none of which has a cell on the image",
    "cross_attn_token_to_image": "cross-attention from the prompt tokens to the image embedding: its queries have "
                                 "no cell on the image",
    "final_attn_token_to_image": "cross-attention from the prompt tokens to the image embedding: its queries have "
                                 "no cell on the image",
    "cross_attn_image_to_token": "cross-attention from the image embedding to the prompt tokens: its keys have no "
                                 "cell on the image",
}


def _is(module: nn.Module, class_name: str, defining_module: str) -> bool:
    cls = type(module)
    return cls.__name__ == class_name and cls.__module__ == defining_module


def placer(model: nn.Module, name: str, module: nn.Module):
    from . import Skip

    if _is(module, "Attention", _DECODER_MODULE):
        what = _TWO_WAY_REASONS.get(name.rpartition(".")[2], "attention between the prompt tokens and the image "
                                                               "embedding, no image self-attention")
        return Skip(_TWO_WAY + what)
    if not _is(module, "Attention", _ENCODER_MODULE):
        return None
    parent_name = name.rpartition(".")[0]
    block = model.get_submodule(parent_name) if parent_name else None
    found = innermost_on_path(model, name, lambda m: _is(m, "ImageEncoderViT", _ENCODER_MODULE))
    if block is None or not _is(block, "Block", _ENCODER_MODULE) or found is None:
        return RefusingPlacer(
            f"segment_anything's image-encoder Attention is placed as a Block's attention inside an ImageEncoderViT "
            f"(whose PatchEmbed gives the patch stride); {name} is held by "
            f"{type(block).__name__ if block is not None else 'nothing'}"
            f"{'' if found is not None else ' outside any ImageEncoderViT'}: record the ImageEncoderViT or the Sam "
            f"model that holds it"
        )
    # The encoder, not the whole model, is searched for the patch embedding (its first convolution).
    return WindowedGridPlacer(found[1], name, block, module, _BLOCK)
