"""The attention blocks of a VQGAN image tokenizer's encoder, whose codes stand for the image in the language model:
transformers' Apertus 1.5 vision tokenizer (``Apertus1p5VisionTokenizerModel``, EMU3.5's encoder) and Chameleon's
VQ-VAE (``ChameleonVQVAE``, the ``vqmodel`` of ``ChameleonModel``), block for block the same design.

``Apertus1p5VisionTokenizerAttnBlock`` (``ChameleonVQVAEEncoderAttnBlock``) attends with one head over every cell of
its ``[B, C, H, W]`` input map, flattened row-major (``reshape(B, C, H * W)``), queries and keys alike, its softmax
``[B, N, N]`` without a head dimension. Its map is that of its stage: the encoder's convolutions keep the size (3 x 3,
padding 1; 1 x 1), except each stage's downsampling, a 3 x 3 convolution of stride 2 after padding the bottom and right
by one (``floor(n / 2)`` outputs), so the stride is the product of the strides of the encoder's convolutions before the
block, each cell at the centre of its stride cell (docs/definition.md, "Beyond one grid"), checked per call against the
image.
"""

from __future__ import annotations

from torch import nn

from .iformer import SingleHeadPlacer
from .stages import defined_in, innermost_on_path, reduction_before
from .windows import PartitionPlacer, nchw, whole_map

__all__ = ["placer", "is_tower"]

# (tokenizer, its encoder, the encoder's attention block, defining module) per model.
_DESIGNS = (
    ("Apertus1p5VisionTokenizerModel", "Apertus1p5VisionTokenizerEncoder", "Apertus1p5VisionTokenizerAttnBlock",
     "modeling_apertus1p5"),
    ("ChameleonVQVAE", "ChameleonVQVAEEncoder", "ChameleonVQVAEEncoderAttnBlock", "modeling_chameleon"),
)


def is_tower(module: nn.Module) -> bool:
    """Whether ``module`` is such a tokenizer: for the recorder, the tower that embeds the image in
    ``Apertus1p5ForConditionalGeneration`` and ``ChameleonForConditionalGeneration`` (its first convolution is 3 x 3
    of stride 1, no patch embedding)."""
    return any(defined_in(module, tower, source) for tower, _, _, source in _DESIGNS)


def placer(model: nn.Module, name: str, module: nn.Module):
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
