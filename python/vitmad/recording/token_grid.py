"""Where the patch tokens are in a model's attention: the patch size, the grid and the prefix tokens.

:func:`vitmad.record` reads the patch size from the model's patch-embedding convolution and the grid from that
convolution's output on every forward call, so non-square inputs, ``dynamic_img_size`` and interpolated
position embeddings are followed. The prefix tokens are the tokens left over: ``N - grid_h * grid_w``.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

__all__ = ["ModelLayout", "find_patch_embedding"]


@dataclass(frozen=True)
class ModelLayout:
    """What :func:`vitmad.record` uses to place tokens on the image.

    Attributes:
        patch: pixel size of a patch.
        grid: ``(grid_h, grid_w)`` of the patch tokens in the latest forward call; None before the first one
            (unless given by hand).
        num_prefix_tokens: tokens before the patches (CLS, distillation, registers) in the latest call; None
            before the first one (unless given by hand).
    """

    patch: int
    grid: tuple[int, int] | None = None
    num_prefix_tokens: int | None = None


def find_patch_embedding(model: nn.Module) -> tuple[str, nn.Conv2d] | None:
    """The first ``Conv2d`` whose kernel (larger than 1) equals its stride: ``(qualified name, conv)``.

    Non-overlapping patches: the patch embedding of HF ViT, DeiT, BEiT, DINOv2, ViTMAE, CLIP and SigLIP and of
    timm ViTs. 1x1 convolutions are skipped: in hybrid (CNN-stem) ViTs they do not see pixels.
    """
    for name, module in model.named_modules():
        if (
            isinstance(module, nn.Conv2d)
            and tuple(module.kernel_size) == tuple(module.stride)
            and max(module.kernel_size) > 1
        ):
            return name, module
    return None
