"""Typed Python entry point of ``vitmad::mad_qk`` (MAD straight from queries and keys), its fake (shape)
kernel, and the autograd kernel that refuses gradients.

The kernels live in csrc/cpu/mad_qk_cpu.cpp and csrc/cuda/mad_qk_cuda.cu (or ``fallback.mad_qk`` when the
compiled library is missing). The op is not differentiable: MAD is a measurement, and a backward pass would
need a second flash-style sweep. Calling it on a ``q``, ``k`` or ``attn_bias`` that requires grad while grad
mode is on raises before any work is done; call it under ``torch.no_grad()`` or on detached tensors.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import library  # noqa: F401  (defines torch.ops.vitmad before anything is registered on it)
from .arguments import check_mad_qk_args, mad_output_dtype

__all__ = ["mad_qk"]


def mad_qk(
    q: torch.Tensor,
    k: torch.Tensor,
    patch: int,
    *,
    num_prefix_tokens: int = 1,
    grid: Sequence[int] | None = None,
    scale: float | None = None,
    attn_bias: torch.Tensor | None = None,
    renormalize: bool = False,
    reduction: str = "mean",
) -> torch.Tensor:
    """Mean attention distance of ``softmax(q @ k^T * scale + attn_bias)``, in pixels, without the attention.

    Equals ``mad(softmax(q @ k.transpose(-1, -2) * scale + attn_bias, -1), patch, ...)`` with the softmax over
    all keys (prefix tokens included, as in the model), but the ``[..., N, N]`` attention never exists: the
    kernels run flash attention's online softmax over key blocks. Extra memory is ``O(B * H * N)``.

    Args:
        q: ``[..., N, D]`` queries, e.g. ``[B, H, N, D]``, prefix tokens first; float16, bfloat16, float32 or
            float64. Any strides.
        k: ``[..., N, D]`` keys: q's shape, dtype and device.
        patch: pixel size of a patch (1 gives distances in patches).
        num_prefix_tokens: ``P``, the tokens before the patches (CLS, distillation, registers).
        grid: ``[grid_h, grid_w]`` of the ``N - P`` patch tokens; square by default.
        scale: multiplies ``q @ k^T``; ``D ** -0.5`` by default.
        attn_bias: broadcastable to ``[..., N, N]``, e.g. ``[H, N, N]`` (relative position bias) or
            ``[B, 1, 1, N]`` (key padding); read in place through broadcast strides, never expanded. Of q's
            dtype, added to the logits; or bool, True where a query may attend to a key (as
            ``F.scaled_dot_product_attention``'s ``attn_mask``). A query whose keys are all masked gets NaN,
            as softmax gives.
        renormalize: divide each query's distance-weighted sum by its attention mass on patch keys.
        reduction: ``"mean"`` averages over query patches; ``"none"`` keeps one value per query patch.

    Returns:
        ``[...]`` (``q.shape[:-2]``) for ``"mean"``, ``[..., N - P]`` for ``"none"``; float32, or float64 for
        float64 input. Logits are accumulated in float32 (float64 for float64 input).

    Raises:
        TypeError: a dtype is unsupported, or ``k`` / ``attn_bias`` does not match ``q``'s.
        ValueError: a shape, device or option is invalid; the message names the argument.
        RuntimeError: ``q``, ``k`` or ``attn_bias`` requires grad while grad mode is on.
    """
    return torch.ops.vitmad.mad_qk.default(
        q,
        k,
        patch,
        num_prefix_tokens=num_prefix_tokens,
        grid=None if grid is None else [int(g) for g in grid],
        scale=None if scale is None else float(scale),
        attn_bias=attn_bias,
        renormalize=renormalize,
        reduction=reduction,
    )


@torch.library.register_fake("vitmad::mad_qk")
def _mad_qk_fake(
    q, k, patch, *, num_prefix_tokens=1, grid=None, scale=None, attn_bias=None, renormalize=False, reduction="mean"
):
    qk = check_mad_qk_args(q, k, patch, num_prefix_tokens, grid, scale, attn_bias, renormalize, reduction)
    shape = q.shape[:-2] if qk.mad.reduce_mean else (*q.shape[:-2], qk.mad.num_patches)
    return q.new_empty(shape, dtype=mad_output_dtype(q.dtype))


def _mad_qk_autograd(q, k, patch, **options):
    """Autograd kernel: refuse gradients up front, otherwise run the kernel below autograd."""
    if torch.is_grad_enabled():
        for name, t in (("q", q), ("k", k), ("attn_bias", options.get("attn_bias"))):
            if t is not None and t.requires_grad:
                raise RuntimeError(
                    f"vitmad.mad_qk is not differentiable, but {name} requires grad; call it under "
                    "torch.no_grad() or pass detached tensors"
                )
    with torch._C._AutoDispatchBelowAutograd():
        return torch.ops.vitmad.mad_qk.default(q, k, patch, **options)


_autograd_lib = torch.library.Library("vitmad", "IMPL")
_autograd_lib.impl("mad_qk", _mad_qk_autograd, "Autograd")
