"""timm's Transformer in Transformer (``tnt_*``): attention between the pixels of each patch, and between patches.

- Outer attention (``attn_out``): a plain ViT over the CLS token and the ``gh x gw`` patches of ``patch_size``
  pixels (``TNT.patch_embed`` has no patch convolution: the patches are ``nn.Unfold`` windows).
- Inner attention (``attn_in``): within each patch, between its ``ph x pw`` "pixel" tokens: the output cells of
  ``PixelEmbed.proj``, a convolution of stride ``s`` (4) over the patch (or over the image, then unfolded, in
  the legacy layout). A pixel token ``(i, j)`` of the patch at ``(r, c)`` sits at the centre of its stride cell,
  ``(r * patch + (i + 0.5) * s, c * patch + (j + 0.5) * s)``; the attention is ``[B * gh * gw, H, ph * pw,
  ph * pw]`` (patches in batch, image-major, row-major), folded onto the ``gh * ph x gw * pw`` map of pixel
  tokens at stride ``s``.

Image sizes are the model's own (``PixelEmbed`` asserts them), read from ``img_size`` and ``patch_size``.
"""

from __future__ import annotations

import torch
from torch import nn

from ..module_index import module_list
from ..placement import (
    CallContext,
    LayerGeometry,
    LayerPlacer,
    NotPlaceable,
    Placement,
    cell_centres,
    on_device,
    select_tokens,
)

__all__ = ["placer"]


def _owner(model: nn.Module) -> nn.Module | None:
    return next((m for m in module_list(model) if type(m).__name__ == "TNT" and type(m).__module__.endswith(".tnt")),
                None)


class _TntPlacer(LayerPlacer):
    def __init__(self, tnt: nn.Module, inner: bool):
        embed = tnt.pixel_embed
        self.patch = tuple(int(p) for p in embed.patch_size)
        self.grid = tuple(int(i) // p for i, p in zip(embed.img_size, self.patch))
        self.pixels = tuple(int(p) for p in embed.new_patch_size)
        self.step = tuple(float(s) for s in embed.proj.stride)
        self.inner = inner

    def place(self, context: CallContext, lead: torch.Size, num_queries: int, num_keys: int) -> Placement:
        (gh, gw), (ph, pw) = self.grid, self.pixels
        if not self.inner:
            if len(lead) != 2 or num_queries != num_keys or num_queries != 1 + gh * gw:
                raise NotPlaceable(f"its attention is [{', '.join(map(str, lead))}, {num_queries}, {num_keys}], "
                                   f"expected [B, H, N, N] over the CLS token and {gh}x{gw} patches")
            stride = (float(self.patch[0]), float(self.patch[1]))
            cells = cell_centres(gh, gw, stride).reshape(-1, 2)
            positions = torch.cat([torch.full((1, 2), float("nan")), cells])
            geometry = LayerGeometry((gh, gw), stride, "global (patches)", int(lead[1]), 1)
            return Placement(positions, None, select_tokens(torch.arange(1, 1 + gh * gw)), geometry)
        if len(lead) != 2 or num_queries != num_keys or num_queries != ph * pw or lead[0] % (gh * gw):
            raise NotPlaceable(f"its attention is [{', '.join(map(str, lead))}, {num_queries}, {num_keys}], "
                               f"expected [B * {gh * gw}, H, {ph * pw}, {ph * pw}]: the {ph}x{pw} pixel tokens of "
                               f"each of {gh}x{gw} patches")
        batch, heads = int(lead[0]) // (gh * gw), int(lead[1])
        rows = torch.arange(gh).view(gh, 1, 1, 1) * ph + torch.arange(ph).view(1, 1, ph, 1)  # [r, 1, i, 1]
        cols = torch.arange(gw).view(1, gw, 1, 1) * pw + torch.arange(pw).view(1, 1, 1, pw)  # [1, c, 1, j]
        rows, cols = torch.broadcast_tensors(rows, cols)  # [gh, gw, ph, pw]: patches row-major, then pixels
        # Pixel token (i, j) of patch (r, c): the centre of its stride cell inside the patch, in image pixels.
        pos_y = torch.arange(gh).view(gh, 1, 1, 1) * self.patch[0] + (torch.arange(ph).view(1, 1, ph, 1) + 0.5) \
            * self.step[0]
        pos_x = torch.arange(gw).view(1, gw, 1, 1) * self.patch[1] + (torch.arange(pw).view(1, 1, 1, pw) + 0.5) \
            * self.step[1]
        pos_y, pos_x = torch.broadcast_tensors(pos_y, pos_x)
        positions = torch.stack([pos_y, pos_x], -1).reshape(gh * gw, 1, ph * pw, 2).float().repeat(batch, 1, 1, 1)
        inverse = torch.empty(gh * ph * gw * pw, dtype=torch.long)
        inverse[(rows * (gw * pw) + cols).reshape(-1)] = torch.arange(rows.numel())

        def fold(values: torch.Tensor) -> torch.Tensor:
            values = values.reshape(batch, gh * gw, heads, ph * pw).transpose(1, 2).reshape(batch, heads, -1)
            return values.index_select(-1, on_device(inverse, values.device))

        geometry = LayerGeometry((gh * ph, gw * pw), self.step, f"within each {self.patch[0]}x{self.patch[1]} patch",
                                 heads)
        return Placement(positions, None, fold, geometry)


def placer(model: nn.Module, name: str, module: nn.Module):
    leaf = name.rpartition(".")[2]
    if leaf not in ("attn_in", "attn_out") or type(module).__module__.rpartition(".")[2] != "tnt":
        return None
    tnt = _owner(model)
    if tnt is None:
        return None
    return _TntPlacer(tnt, inner=leaf == "attn_in")
