"""The attention blocks of a VQGAN image tokenizer's encoder: transformers' Apertus 1.5 vision tokenizer
(``Apertus1p5VisionTokenizerModel``, EMU3.5's encoder, Chameleon's design), whose codes stand for the image in the
language model.

``Apertus1p5VisionTokenizerAttnBlock`` attends with one head over every cell of its ``[B, C, H, W]`` input map,
flattened row-major (``reshape(B, C, H * W)``), queries and keys alike, its softmax ``[B, N, N]`` without a head
dimension. Its map is that of its stage: the encoder's convolutions keep the size (3 x 3, padding 1; 1 x 1), except
each stage's downsampling, a 3 x 3 convolution of stride 2 after padding the bottom and right by one (``floor(n /
2)`` outputs), so the stride is the product of the strides of the encoder's convolutions before the block, each cell
at the centre of its stride cell (docs/definition.md, "Beyond one grid"), checked per call against the image.
"""

from __future__ import annotations

from torch import nn

from .iformer import SingleHeadPlacer
from .stages import defined_in, innermost_on_path, reduction_before
from .windows import PartitionPlacer, nchw, whole_map

__all__ = ["placer", "is_tower"]


def is_tower(module: nn.Module) -> bool:
    """Whether ``module`` is Apertus 1.5's vision tokenizer: for the recorder, the tower that embeds the image in
    ``Apertus1p5ForConditionalGeneration`` (its first convolution is 3 x 3 of stride 1, no patch embedding)."""
    return defined_in(module, "Apertus1p5VisionTokenizerModel", "modeling_apertus1p5")


def _is_encoder(module: nn.Module) -> bool:
    return defined_in(module, "Apertus1p5VisionTokenizerEncoder", "modeling_apertus1p5")


def placer(model: nn.Module, name: str, module: nn.Module):
    if not defined_in(module, "Apertus1p5VisionTokenizerAttnBlock", "modeling_apertus1p5"):
        return None
    found = innermost_on_path(model, name, _is_encoder)
    if found is None:
        return None
    # Counted inside the encoder alone: its own convolutions run in the order they are registered, the attention
    # block's q, k, v and projection (1 x 1) after its input map.
    stride = reduction_before(found[1], module)
    return SingleHeadPlacer(PartitionPlacer(model, name, module, nchw, whole_map, "windows in batch",
                                            reduction=stride))
