"""Argument checking for ``vitmad::mad`` in Python, for the fake kernel, the pure-PyTorch fallback and the
reference. It mirrors ``csrc/mad_args.cpp`` message for message (``tests/test_errors.py`` holds them to it)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["MadLayout", "check_mad_args", "mad_output_dtype", "SUPPORTED_DTYPES"]

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
    """float32 for 16- and 32-bit attention, float64 for float64 (MAD_SPEC.md, "Output dtype")."""
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
                f"{op_name}: grid {_shape_str(grid)} has {grid[0] * grid[1]} patches but attn has "
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
