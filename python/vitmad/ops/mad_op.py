"""Typed Python entry point of ``vitmad::mad`` and ``vitmad::mad_pos``, with their fake (shape) kernels and
autograd formulas.

The kernels themselves live in csrc/ (or in ``fallback.py`` when the compiled library is missing);
this module only adds what the compiler and autograd need to know about them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import library  # noqa: F401  (defines torch.ops.vitmad before anything is registered on it)
from .arguments import (
    INT64_MAX,
    INT64_MIN,
    call_op,
    check_attn_tensor,
    check_int_args,
    check_mad_args,
    check_mad_grad,
    check_one_form,
    check_position_args,
    check_renormalize,
    grid_ints,
    mad_output_dtype,
    none_for_a_tensor,
    not_dense_error,
    schema_type_error,
)

__all__ = ["mad"]


def mad(
    attn: torch.Tensor,
    patch: int | None = None,
    *,
    num_prefix_tokens: int | None = None,
    grid: Sequence[int] | None = None,
    positions: torch.Tensor | None = None,
    key_positions: torch.Tensor | None = None,
    renormalize: bool = False,
    reduction: str = "mean",
) -> torch.Tensor:
    """Mean attention distance of attention probabilities (``docs/definition.md``).

    Two forms. The grid form (``patch``, ``num_prefix_tokens``, ``grid``): ``P`` prefix tokens, then a
    row-major grid of patches, distances in pixels. The position form (``positions``, ``key_positions``): any
    token anywhere, each with its own position or none, rectangular attention allowed (pooled keys,
    subsampled queries), distances in the positions' unit.

    The fused kernels compute distances on the fly and read ``attn`` once, in place (strided and sliced views
    are not copied). Differentiable with respect to ``attn``.

    Args:
        attn: ``[..., N, N]`` (grid form) or ``[..., Nq, Nk]`` (position form) attention probabilities (rows
            are queries), float16, bfloat16, float32 or float64; any number of leading dims, e.g.
            ``[B, H, N, N]``, a layer stack ``[L, B, H, N, N]`` or windows ``[B, nW, H, n, n]``.
        patch: grid form: pixel size of a patch (1 gives distances in patches).
        num_prefix_tokens: grid form: ``P``, the tokens before the patches that have no position: 1 (the
            default) for a CLS token, 2 for DeiT (CLS + distillation), ``1 + R`` with R registers, 0 for SigLIP.
        grid: grid form: ``[grid_h, grid_w]`` of the patch tokens (row-major); by default the square grid of
            side ``sqrt(N - P)``, an error if ``N - P`` is not a perfect square.
        positions: position form: ``[..., Nq, K]`` floating positions (K in 1..3) of the query tokens, every
            token included; a row of NaN is a token without a position (CLS, registers, padding), neither a
            query nor a key. Its leading dims broadcast against ``attn.shape[:-2]`` (``[Nq, K]`` for all,
            ``[B, 1, Nq, K]`` per image, ``[nW, 1, Nq, K]`` per window of ``[B, nW, H, Nq, Nk]``) and are read
            through strides, never expanded. :func:`vitmad.grid_positions` gives a plain ViT's.
        key_positions: position form: ``[..., Nk, K]`` positions of the keys, for rectangular attention;
            ``positions`` by default (then ``Nq == Nk``).
        renormalize: divide each query's distance-weighted sum by its attention mass on keys with a position,
            so the mass put on tokens without one does not shrink the distance. Off by default, as in the ViT
            paper.
        reduction: ``"mean"`` averages over the queries with a position; ``"none"`` keeps one value per query.

    Returns:
        ``attn.shape[:-2]`` for ``"mean"``; for ``"none"``, ``[..., N - P]`` (grid form) or ``[..., Nq]``
        with NaN at queries without a position (position form). float32, or float64 for float64 input.

    Raises:
        TypeError: an argument of the wrong type (a float or bool ``patch``, a string ``renormalize``...), ``attn``
            or ``positions`` of an unsupported dtype, or neither ``patch`` nor ``positions`` given; the message
            names the argument.
        ValueError: a shape, size or option is invalid, both forms are mixed, or ``positions`` or
            ``key_positions`` requires grad while grad mode is on (MAD is differentiable with respect to ``attn``
            only; under ``torch.no_grad()`` nothing is differentiated and they are taken); the message names the
            argument.
    """
    if renormalize.__class__ is not bool:
        check_renormalize(renormalize, "vitmad.mad")
    if positions is None and key_positions is None and patch is not None:
        # The grid form, with only the options that differ from the schema's defaults passed: each keyword
        # argument costs the op call about 0.5 us, a good part of a small call (benchmarks/bench_op.py).
        options = {}
        if num_prefix_tokens is not None:
            options["num_prefix_tokens"] = num_prefix_tokens
        if grid is not None:
            options["grid"] = grid_ints(grid, "vitmad.mad")
        if renormalize:
            options["renormalize"] = renormalize
        if reduction != "mean":
            options["reduction"] = reduction
        if patch.__class__ is not int or num_prefix_tokens.__class__ not in (int, type(None)) \
                or not INT64_MIN <= patch <= INT64_MAX \
                or (num_prefix_tokens is not None and not INT64_MIN <= num_prefix_tokens <= INT64_MAX):
            # the dispatcher takes True for 1 and a 0-d float tensor rounded toward zero, refuses an int beyond
            # int64 in the words it has for a str, and writes one of over 4,300 digits into a message Python
            # refuses to build (QA 308); two comparisons on a good call
            check_int_args("vitmad.mad", patch=patch, num_prefix_tokens=num_prefix_tokens)
        try:  # call_op's work, inline: a function call more would be a few percent of a small call
            return torch.ops.vitmad.mad.default(attn, patch, **options)
        except RuntimeError as error:
            op = torch.ops.vitmad.mad.default
            raise (none_for_a_tensor(op, "vitmad.mad", {"attn": attn})
                   or not_dense_error(op, "vitmad.mad", (attn, patch), options)
                   or schema_type_error(error, "vitmad.mad", {"patch": patch, "num_prefix_tokens": num_prefix_tokens,
                                                              **options})) from None
    check_one_form("vitmad.mad", positions, key_positions,
                    {"patch": patch, "num_prefix_tokens": num_prefix_tokens, "grid": grid})
    return call_op(torch.ops.vitmad.mad_pos.default, "vitmad.mad", attn, positions, key_positions,
                   renormalize=renormalize, reduction=reduction)


# Grid form ---------------------------------------------------------------------------------------------------


@torch.library.register_fake("vitmad::mad")
def _mad_fake(attn, patch, *, num_prefix_tokens=1, grid=None, renormalize=False, reduction="mean"):
    layout = check_mad_args(attn.shape, attn.dtype, patch, num_prefix_tokens, grid, renormalize, reduction)
    shape = attn.shape[:-2] if layout.reduce_mean else (*attn.shape[:-2], layout.num_patches)
    return attn.new_empty(shape, dtype=mad_output_dtype(attn.dtype))


@torch.library.register_fake("vitmad::mad_backward")
def _mad_backward_fake(grad, attn, patch, *, num_prefix_tokens=1, grid=None, renormalize=False, reduction="mean"):
    layout = check_mad_args(
        attn.shape, attn.dtype, patch, num_prefix_tokens, grid, renormalize, reduction, "vitmad.mad_backward"
    )
    check_mad_grad(grad, attn, layout.reduce_mean, layout.num_patches)  # as the kernels and the positions form do
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


# The compiled library registers this autograd formula in C++ (csrc/mad_autograd.cpp), which spares a call that
# needs no gradient the Python autograd kernel's cost (about 9 us); this one serves the pure-PyTorch kernels and a
# library built before it.
if not torch._C._dispatch_has_kernel_for_dispatch_key("vitmad::mad", "Autograd"):
    torch.library.register_autograd("vitmad::mad", _mad_backward, setup_context=_mad_setup_context)


# Position form -----------------------------------------------------------------------------------------------


def _position_layout(attn, positions, key_positions, renormalize, reduction, op_name):
    """Shape checks only: fake tensors have no values to check."""
    check_attn_tensor(attn, "[..., Nq, Nk]", op_name)
    return check_position_args(attn, attn.shape[-2], attn.shape[-1], positions, key_positions, renormalize,
                               reduction, op_name, check_values=False)


@torch.library.register_fake("vitmad::mad_pos")
def _mad_pos_fake(attn, positions, key_positions=None, *, renormalize=False, reduction="mean"):
    layout = _position_layout(attn, positions, key_positions, renormalize, reduction, "vitmad.mad")
    shape = attn.shape[:-2] if layout.reduce_mean else (*attn.shape[:-2], layout.num_queries)
    return attn.new_empty(shape, dtype=mad_output_dtype(attn.dtype))


@torch.library.register_fake("vitmad::mad_pos_backward")
def _mad_pos_backward_fake(grad, attn, positions, key_positions=None, *, renormalize=False, reduction="mean"):
    layout = _position_layout(attn, positions, key_positions, renormalize, reduction, "vitmad.mad_backward")
    check_mad_grad(grad, attn, layout.reduce_mean, layout.num_queries)
    return torch.empty(attn.shape, dtype=attn.dtype, device=attn.device)


def _mad_pos_setup_context(ctx, inputs, keyword_only_inputs, output):
    attn, positions, key_positions = inputs
    for name, t in (("positions", positions), ("key_positions", key_positions)):
        if t is not None and t.requires_grad:
            raise ValueError(  # an invalid argument, as the README's guarantees name them
                f"vitmad.mad: {name} requires grad, but vitmad.mad is differentiable with respect to attn only; pass "
                f"{name}.detach()"
            )
    ctx.save_for_backward(attn, positions, key_positions)
    ctx.options = keyword_only_inputs


def _mad_pos_backward(ctx, grad):
    attn, positions, key_positions = ctx.saved_tensors
    grad_attn = torch.ops.vitmad.mad_pos_backward.default(grad, attn, positions, key_positions, **ctx.options)
    return grad_attn, None, None


torch.library.register_autograd("vitmad::mad_pos", _mad_pos_backward, setup_context=_mad_pos_setup_context)


# Differentiable once ---------------------------------------------------------------------------------------------
# The gradient ops compute attn's gradient and nothing differentiates them. Without an autograd kernel, the gradient
# taken with create_graph=True would be silently cut from attn (no second-order term, torch only warns); with
# this one it records a node that refuses to be differentiated, as torch.autograd.function.once_differentiable
# does. Without create_graph, grad mode is off in backward and this kernel only passes the call on.


def _refuse_second_order(setup_name: str):
    def backward(ctx, *grads):
        raise RuntimeError(
            "vitmad.mad is differentiable once: its gradient with respect to attn (vitmad::" + setup_name + ") is "
            "not differentiable, so a second-order gradient through vitmad.mad (create_graph=True, then backward "
            "through that gradient) is not supported"
        )

    return backward


def _no_context(ctx, inputs, keyword_only_inputs, output):
    pass


torch.library.register_autograd("vitmad::mad_backward", _refuse_second_order("mad_backward"),
                                setup_context=_no_context)
torch.library.register_autograd("vitmad::mad_pos_backward", _refuse_second_order("mad_pos_backward"),
                                setup_context=_no_context)
