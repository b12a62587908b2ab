"""Argument checking for ``vitmad::mad`` in Python, for the fake kernel, the pure-PyTorch fallback and the
reference. It mirrors ``csrc/mad_args.cpp`` message for message (``tests/ops/test_errors.py`` holds them
to it)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "MadLayout",
    "MadQkLayout",
    "check_mad_args",
    "check_mad_options",
    "check_mad_qk_args",
    "mad_output_dtype",
    "SUPPORTED_DTYPES",
]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class MadLayout:
    """Where the patch tokens are inside an ``[..., N, N]`` attention tensor."""

    num_tokens: int  # N
    num_prefix: int  # P: CLS, distillation and register tokens, without a position
    grid_h: int
    grid_w: int
    renormalize: bool
    reduce_mean: bool

    @property
    def num_patches(self) -> int:
        return self.num_tokens - self.num_prefix


def mad_output_dtype(attn_dtype: torch.dtype) -> torch.dtype:
    """float32 for 16- and 32-bit attention, float64 for float64 (``docs/definition.md``, "Output dtype")."""
    return torch.float64 if attn_dtype == torch.float64 else torch.float32


def _shape_str(shape: Sequence[int]) -> str:
    return "[" + ", ".join(str(int(s)) for s in shape) + "]"


def check_mad_args(
    shape: Sequence[int],
    dtype: torch.dtype,
    patch: int,
    num_prefix_tokens: int,
    grid: Sequence[int] | None,
    renormalize: bool,
    reduction: str,
    op_name: str = "vitmad.mad",
) -> MadLayout:
    """Validate the arguments of ``mad`` for an attention tensor of ``shape`` and ``dtype``.

    Raises:
        TypeError: ``dtype`` is not float16, bfloat16, float32 or float64.
        ValueError: any other argument is out of range; the message names it, says what was expected and
            what was given.
    """
    if dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{op_name}: attn must be float16, bfloat16, float32 or float64, got {dtype}")
    if len(shape) < 2:
        raise ValueError(f"{op_name}: attn must have at least 2 dimensions [..., N, N], got shape {_shape_str(shape)}")
    n = shape[-1]
    if shape[-2] != n:
        raise ValueError(
            f"{op_name}: attn must be square in its last two dimensions [..., N, N] (queries x keys), "
            f"got shape {_shape_str(shape)}"
        )
    return check_mad_options(n, patch, num_prefix_tokens, grid, renormalize, reduction, op_name)


def check_mad_options(
    n: int,
    patch: int,
    num_prefix_tokens: int,
    grid: Sequence[int] | None,
    renormalize: bool,
    reduction: str,
    op_name: str,
    tokens_arg: str = "attn",
) -> MadLayout:
    """Validate patch, num_prefix_tokens, grid and reduction for ``n`` tokens held by ``tokens_arg``.

    Raises:
        ValueError: an argument is out of range; the message names it, says what was expected and what was
            given.
    """
    if patch <= 0:
        raise ValueError(f"{op_name}: patch must be a positive patch size in pixels, got {patch}")
    if not 0 <= num_prefix_tokens < n:
        raise ValueError(
            f"{op_name}: num_prefix_tokens must be in [0, N) with N = {n} tokens, got {num_prefix_tokens}"
        )
    if reduction not in ("mean", "none"):
        raise ValueError(f"{op_name}: reduction must be 'mean' or 'none', got '{reduction}'")
    num_patches = n - num_prefix_tokens
    if grid is not None:
        grid = list(grid)
        if len(grid) != 2:
            raise ValueError(
                f"{op_name}: grid must be [grid_h, grid_w] (2 values), got {len(grid)} values {_shape_str(grid)}"
            )
        if grid[0] <= 0 or grid[1] <= 0:
            raise ValueError(f"{op_name}: grid must hold positive sizes, got {_shape_str(grid)}")
        if grid[0] * grid[1] != num_patches:
            raise ValueError(
                f"{op_name}: grid {_shape_str(grid)} has {grid[0] * grid[1]} patches but {tokens_arg} has "
                f"N - num_prefix_tokens = {n} - {num_prefix_tokens} = {num_patches} patch tokens"
            )
        grid_h, grid_w = int(grid[0]), int(grid[1])
    else:
        side = math.isqrt(int(num_patches))
        if side * side != num_patches:
            raise ValueError(
                f"{op_name}: N - num_prefix_tokens = {n} - {num_prefix_tokens} = {num_patches} patch tokens "
                "do not form a square grid; pass grid=[grid_h, grid_w]"
            )
        grid_h = grid_w = side
    return MadLayout(int(n), int(num_prefix_tokens), grid_h, grid_w, bool(renormalize), reduction == "mean")


@dataclass(frozen=True)
class MadQkLayout:
    """The attention layout of ``mad_qk``'s logits, with the head dimension and the logits' scale."""

    mad: MadLayout
    head_dim: int  # D
    scale: float  # the given scale, or D ** -0.5


def check_mad_qk_args(
    q: torch.Tensor,
    k: torch.Tensor,
    patch: int,
    num_prefix_tokens: int,
    grid: Sequence[int] | None,
    scale: float | None,
    attn_bias: torch.Tensor | None,
    renormalize: bool,
    reduction: str,
    op_name: str = "vitmad.mad_qk",
) -> MadQkLayout:
    """Validate the arguments of ``mad_qk`` (mirrors ``check_mad_qk_args`` in ``csrc/mad_args.cpp``).

    Args:
        q, k: ``[..., N, D]`` queries and keys: the same dtype, shape and device.
        attn_bias: q's dtype (added to the logits) or bool (True keeps a key, as in
            ``F.scaled_dot_product_attention``), broadcastable to ``[..., N, N]``, on q's device; or None.

    Raises:
        TypeError: a dtype is unsupported or differs from q's.
        ValueError: a shape, device or option is invalid; the message names the argument, says what was
            expected and what was given.
    """
    for name, t in (("q", q), ("k", k)):
        if t.layout != torch.strided:
            raise ValueError(f"{op_name}: {name} must be a dense (strided) tensor, got layout {t.layout}")
    if q.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{op_name}: q must be float16, bfloat16, float32 or float64, got {q.dtype}")
    if k.dtype != q.dtype:
        raise TypeError(f"{op_name}: k must have q's dtype {q.dtype}, got {k.dtype}")
    if q.dim() < 2:
        raise ValueError(f"{op_name}: q must have at least 2 dimensions [..., N, D], got shape {_shape_str(q.shape)}")
    if k.dim() != q.dim() or k.shape[:-2] != q.shape[:-2]:
        raise ValueError(
            f"{op_name}: k must have q's leading dimensions, shape [..., N, D] = {_shape_str(q.shape[:-2])} + "
            f"[N, D], got k of shape {_shape_str(k.shape)} and q of shape {_shape_str(q.shape)}"
        )
    n, d = q.shape[-2], q.shape[-1]
    if d <= 0:
        raise ValueError(f"{op_name}: q must have a head dimension D > 0, got shape {_shape_str(q.shape)}")
    if k.shape[-1] != d:
        raise ValueError(f"{op_name}: k must have q's head dimension D = {d}, got shape {_shape_str(k.shape)}")
    if k.shape[-2] != n:
        raise ValueError(f"{op_name}: k must have q's number of tokens N = {n}, got shape {_shape_str(k.shape)}")
    if k.device != q.device:
        raise ValueError(f"{op_name}: k must be on q's device {q.device}, got {k.device}")
    if scale is not None and not math.isfinite(scale):
        raise ValueError(f"{op_name}: scale must be finite, got {scale}")
    if attn_bias is not None:
        if attn_bias.layout != torch.strided:
            raise ValueError(f"{op_name}: attn_bias must be a dense (strided) tensor, got layout {attn_bias.layout}")
        if attn_bias.dtype not in (q.dtype, torch.bool):
            raise TypeError(
                f"{op_name}: attn_bias must have q's dtype {q.dtype} (added to the logits) or be bool "
                f"(True keeps a key), got {attn_bias.dtype}"
            )
        if attn_bias.device != q.device:
            raise ValueError(f"{op_name}: attn_bias must be on q's device {q.device}, got {attn_bias.device}")
        target = (*q.shape[:-1], n)
        bias_shape = tuple(attn_bias.shape)
        broadcastable = len(bias_shape) <= len(target) and all(
            size in (1, want) for size, want in zip(reversed(bias_shape), reversed(target))
        )
        if not broadcastable:
            raise ValueError(
                f"{op_name}: attn_bias must be broadcastable to the logits' shape [..., N, N] = "
                f"{_shape_str(target)}, got shape {_shape_str(bias_shape)}"
            )
    layout = check_mad_options(n, patch, num_prefix_tokens, grid, renormalize, reduction, op_name, tokens_arg="q")
    return MadQkLayout(layout, int(d), float(scale) if scale is not None else 1.0 / math.sqrt(d))
