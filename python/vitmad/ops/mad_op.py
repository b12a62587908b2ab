"""Typed Python entry points of the vitmad ops, with their fake (shape) kernels and autograd formula.

The kernels themselves live in csrc/ (or in ``fallback.py`` when the compiled library is missing);
this module only adds what the compiler and autograd need to know about them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import library  # noqa: F401  (defines torch.ops.vitmad before anything is registered on it)
from .arguments import check_mad_args, mad_output_dtype

__all__ = ["mad"]


def mad(
    attn: torch.Tensor,
    patch: int,
    *,
    num_prefix_tokens: int = 1,
    grid: Sequence[int] | None = None,
    renormalize: bool = False,
    reduction: str = "mean",
) -> torch.Tensor:
    """Mean attention distance of attention probabilities, in pixels (``docs/definition.md``).

    The fused kernel computes the distance from token indices and reads ``attn`` once, in place (strided
    and sliced views are not copied). Differentiable with respect to ``attn``.

    Args:
        attn: ``[..., N, N]`` attention probabilities (rows are queries), float16, bfloat16, float32 or
            float64; any number of leading dims, e.g. ``[B, H, N, N]`` or a layer stack ``[L, B, H, N, N]``.
        patch: pixel size of a patch (1 gives distances in patches).
        num_prefix_tokens: ``P``, the tokens before the patches that have no position: 1 for a CLS token,
            2 for DeiT (CLS + distillation), ``1 + R`` with R registers, 0 for SigLIP.
        grid: ``[grid_h, grid_w]`` of the patch tokens (row-major); by default the square grid of side
            ``sqrt(N - P)``, an error if ``N - P`` is not a perfect square.
        renormalize: divide each query's distance-weighted sum by its attention mass on patch keys, so the
            mass put on prefix tokens does not shrink the distance. Off by default, as in the ViT paper.
        reduction: ``"mean"`` averages over query patches; ``"none"`` keeps one value per query patch.

    Returns:
        ``[...]`` (``attn.shape[:-2]``) for ``"mean"``, ``[..., N - P]`` for ``"none"``; float32, or float64
        for float64 input.

    Raises:
        TypeError: ``attn`` is not a floating-point tensor of a supported dtype.
        ValueError: a shape, size or option is invalid; the message names the argument.
    """
    return torch.ops.vitmad.mad.default(
        attn,
        patch,
        num_prefix_tokens=num_prefix_tokens,
        grid=None if grid is None else [int(g) for g in grid],
        renormalize=renormalize,
        reduction=reduction,
    )


@torch.library.register_fake("vitmad::mad")
def _mad_fake(attn, patch, *, num_prefix_tokens=1, grid=None, renormalize=False, reduction="mean"):
    layout = check_mad_args(attn.shape, attn.dtype, patch, num_prefix_tokens, grid, renormalize, reduction)
    shape = attn.shape[:-2] if layout.reduce_mean else (*attn.shape[:-2], layout.num_patches)
    return attn.new_empty(shape, dtype=mad_output_dtype(attn.dtype))


@torch.library.register_fake("vitmad::mad_backward")
def _mad_backward_fake(grad, attn, patch, *, num_prefix_tokens=1, grid=None, renormalize=False, reduction="mean"):
    check_mad_args(
        attn.shape, attn.dtype, patch, num_prefix_tokens, grid, renormalize, reduction, "vitmad.mad_backward"
    )
    return torch.empty(attn.shape, dtype=attn.dtype, device=attn.device)


def _mad_setup_context(ctx, inputs, keyword_only_inputs, output):
    attn, patch = inputs
    ctx.save_for_backward(attn)
    ctx.patch = patch
    ctx.options = keyword_only_inputs


def _mad_backward(ctx, grad):
    (attn,) = ctx.saved_tensors
    grad_attn = torch.ops.vitmad.mad_backward.default(grad, attn, ctx.patch, **ctx.options)
    return grad_attn, None


torch.library.register_autograd("vitmad::mad", _mad_backward, setup_context=_mad_setup_context)
