"""Typed Python entry point of ``vitmad::mad_qk`` and ``vitmad::mad_qk_pos`` (MAD straight from queries and
keys), their fake (shape) kernels, and the autograd kernels that refuse gradients.

The kernels live in csrc/cpu/mad_qk_cpu.cpp and csrc/cuda/mad_qk_cuda.cu (or ``fallback.mad_qk`` when the
compiled library is missing). The ops are not differentiable: MAD is a measurement, and a backward pass would
need a second flash-style sweep. Calling them on a tensor that requires grad while grad mode is on raises
before any work is done; call them under ``torch.no_grad()`` or on detached tensors.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import library  # noqa: F401  (defines torch.ops.vitmad before anything is registered on it)
from .arguments import (
    call_op,
    check_int_args,
    check_mad_qk_args,
    check_one_form,
    check_position_args,
    check_qk_tensors,
    check_renormalize,
    grid_ints,
    mad_output_dtype,
    scale_float,
)

__all__ = ["mad_qk"]


def mad_qk(
    q: torch.Tensor,
    k: torch.Tensor,
    patch: int | None = None,
    *,
    num_prefix_tokens: int | None = None,
    grid: Sequence[int] | None = None,
    positions: torch.Tensor | None = None,
    key_positions: torch.Tensor | None = None,
    scale: float | None = None,
    attn_bias: torch.Tensor | None = None,
    renormalize: bool = False,
    reduction: str = "mean",
) -> torch.Tensor:
    """Mean attention distance of ``softmax(q @ k^T * scale + attn_bias)``, without the attention.

    Equals ``mad(softmax(q @ k.transpose(-1, -2) * scale + attn_bias, -1), ...)`` with the softmax over all
    keys (tokens without a position included, as in the model), but the attention never exists: the kernels
    run flash attention's online softmax over key blocks. Extra memory is ``O(B * H * Nq)``. The grid and
    position forms are those of :func:`vitmad.mad`.

    Args:
        q: ``[..., Nq, D]`` queries, e.g. ``[B, H, N, D]``; float16, bfloat16, float32 or float64. Any strides.
        k: ``[..., Nk, D]`` keys: q's leading dims, D, dtype and device (``Nk == Nq`` in the grid form).
        patch: grid form: pixel size of a patch (1 gives distances in patches).
        num_prefix_tokens: grid form: ``P``, the tokens before the patches (CLS, distillation, registers); 1 by
            default.
        grid: grid form: ``[grid_h, grid_w]`` of the ``N - P`` patch tokens; square by default.
        positions: position form: ``[..., Nq, K]`` positions of the queries (NaN rows: no position),
            broadcast over q's leading dims; see :func:`vitmad.mad`.
        key_positions: position form: ``[..., Nk, K]`` positions of the keys; ``positions`` by default.
        scale: multiplies ``q @ k^T``; ``D ** -0.5`` by default.
        attn_bias: broadcastable to ``[..., Nq, Nk]``, e.g. ``[H, N, N]`` (relative position bias) or
            ``[B, 1, 1, N]`` (key padding); read in place through broadcast strides, never expanded. Of q's
            dtype, added to the logits; or bool, True where a query may attend to a key (as
            ``F.scaled_dot_product_attention``'s ``attn_mask``). A query whose keys are all masked gets NaN,
            as softmax gives.
        renormalize: divide each query's distance-weighted sum by its attention mass on keys with a position.
        reduction: ``"mean"`` averages over the queries with a position; ``"none"`` keeps one value per query.

    Returns:
        ``q.shape[:-2]`` for ``"mean"``; for ``"none"``, ``[..., N - P]`` (grid form) or ``[..., Nq]`` with NaN
        at queries without a position. float32, or float64 for float64 input. Logits are accumulated in
        float32 (float64 for float64 input).

    Raises:
        TypeError: an argument of the wrong type, a dtype is unsupported, ``k`` / ``attn_bias`` does not match
            ``q``'s, or neither ``patch`` nor ``positions`` is given; the message names the argument.
        ValueError: a shape, device or option is invalid, or both forms are mixed; the message names the
            argument.
        RuntimeError: ``q``, ``k``, ``attn_bias`` or a positions tensor requires grad while grad mode is on.
    """
    check_renormalize(renormalize, "vitmad.mad_qk")
    check_one_form("vitmad.mad_qk", positions, key_positions,
                    {"patch": patch, "num_prefix_tokens": num_prefix_tokens, "grid": grid})
    check_int_args("vitmad.mad_qk", patch=patch, num_prefix_tokens=num_prefix_tokens)
    options = {"scale": scale_float(scale, "vitmad.mad_qk"), "attn_bias": attn_bias, "renormalize": renormalize,
               "reduction": reduction}
    if positions is not None:
        return call_op(torch.ops.vitmad.mad_qk_pos.default, "vitmad.mad_qk", q, k, positions, key_positions,
                       **options)
    return call_op(torch.ops.vitmad.mad_qk.default, "vitmad.mad_qk", q, k, patch,
                   num_prefix_tokens=1 if num_prefix_tokens is None else num_prefix_tokens,
                   grid=grid_ints(grid, "vitmad.mad_qk"), **options)


@torch.library.register_fake("vitmad::mad_qk")
def _mad_qk_fake(
    q, k, patch, *, num_prefix_tokens=1, grid=None, scale=None, attn_bias=None, renormalize=False, reduction="mean"
):
    qk = check_mad_qk_args(q, k, patch, num_prefix_tokens, grid, scale, attn_bias, renormalize, reduction)
    shape = q.shape[:-2] if qk.mad.reduce_mean else (*q.shape[:-2], qk.mad.num_patches)
    return q.new_empty(shape, dtype=mad_output_dtype(q.dtype))


@torch.library.register_fake("vitmad::mad_qk_pos")
def _mad_qk_pos_fake(
    q, k, positions, key_positions=None, *, scale=None, attn_bias=None, renormalize=False, reduction="mean"
):
    shape = check_qk_tensors(q, k, scale, attn_bias, False)
    layout = check_position_args(q, shape.num_queries, shape.num_keys, positions, key_positions, renormalize,
                                 reduction, "vitmad.mad_qk", check_values=False)
    out = q.shape[:-2] if layout.reduce_mean else (*q.shape[:-2], layout.num_queries)
    return q.new_empty(out, dtype=mad_output_dtype(q.dtype))


def _refuse_grad(tensors: dict) -> None:
    if torch.is_grad_enabled():
        for name, t in tensors.items():
            if t is not None and t.requires_grad:
                raise RuntimeError(
                    f"vitmad.mad_qk is not differentiable, but {name} requires grad; call it under "
                    "torch.no_grad() or pass detached tensors"
                )


def _mad_qk_autograd(q, k, patch, **options):
    """Autograd kernel: refuse gradients up front, otherwise run the kernel below autograd."""
    _refuse_grad({"q": q, "k": k, "attn_bias": options.get("attn_bias")})
    with torch._C._AutoDispatchBelowAutograd():
        return torch.ops.vitmad.mad_qk.default(q, k, patch, **options)


def _mad_qk_pos_autograd(q, k, positions, key_positions=None, **options):
    """Autograd kernel of the position form: refuse gradients up front, otherwise run the kernel."""
    _refuse_grad({"q": q, "k": k, "positions": positions, "key_positions": key_positions,
                  "attn_bias": options.get("attn_bias")})
    with torch._C._AutoDispatchBelowAutograd():
        return torch.ops.vitmad.mad_qk_pos.default(q, k, positions, key_positions, **options)


_autograd_lib = torch.library.Library("vitmad", "IMPL")
_autograd_lib.impl("mad_qk", _mad_qk_autograd, "Autograd")
_autograd_lib.impl("mad_qk_pos", _mad_qk_pos_autograd, "Autograd")
