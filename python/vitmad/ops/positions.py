"""Token positions for the position form of the ops: where each token of an attention call is.

A position is the centre, in pixels of the input image, of the cell a token stands for; a row of NaN marks a
token without a position (CLS, registers, padding). ``docs/definition.md``, "Beyond one grid: where each token
is", gives the rules for windows, pooled keys, hierarchies and video.
"""

from __future__ import annotations

import torch

from .arguments import MAX_SIZE, grid_sides, index_int, int_text, pixel_size

__all__ = ["grid_positions"]


def grid_positions(
    grid_h: int,
    grid_w: int,
    patch: float,
    *,
    num_prefix_tokens: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Positions of a plain ViT's tokens: ``P`` prefix tokens without a position, then a row-major grid.

    Patch ``t`` sits at the centre of its cell, ``(row * patch + patch / 2, col * patch + patch / 2)`` with
    ``row = t // grid_w``, ``col = t % grid_w``; with these positions every op returns what its grid form
    returns for the same ``patch``, ``num_prefix_tokens`` and ``grid``.

    Args:
        grid_h, grid_w: the patch grid.
        patch: pixel size of a patch (the unit of the distances).
        num_prefix_tokens: ``P`` leading tokens without a position (NaN rows).
        dtype: a floating dtype.

    Returns:
        ``[P + grid_h * grid_w, 2]`` (row, column) positions.

    Raises:
        TypeError: a size or count that is not an int, a patch that is not a number, a dtype that is not floating.
        ValueError: a non-positive grid size, a patch that is not finite and positive, or a negative prefix count.
    """
    grid_h, grid_w = grid_sides("vitmad.grid_positions", grid_h, grid_w)
    patch = pixel_size("vitmad.grid_positions", patch)
    prefix = index_int(num_prefix_tokens)
    if prefix is None:
        raise TypeError(f"vitmad.grid_positions: num_prefix_tokens must be an int, got {num_prefix_tokens!r}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"vitmad.grid_positions: dtype must be a floating torch.dtype (NaN marks the prefix "
                        f"tokens), got {dtype!r}")
    if prefix < 0:
        raise ValueError(f"vitmad.grid_positions: num_prefix_tokens must be >= 0, got {int_text(prefix)}")
    if prefix + grid_h * grid_w >= MAX_SIZE:  # as grid_sides says of the grid (QA 308)
        raise ValueError(f"vitmad.grid_positions: num_prefix_tokens + grid_h * grid_w must be below 2**58 (the "
                         f"positions of more tokens exceed torch's largest storage), got {int_text(prefix)} + "
                         f"{grid_h} * {grid_w}")
    rows = torch.arange(grid_h, dtype=torch.float64).repeat_interleave(grid_w)
    cols = torch.arange(grid_w, dtype=torch.float64).repeat(grid_h)
    patches = (torch.stack([rows, cols], dim=-1) + 0.5) * patch
    prefix_rows = torch.full((prefix, 2), float("nan"), dtype=torch.float64)
    return torch.cat([prefix_rows, patches]).to(device=device, dtype=dtype)
