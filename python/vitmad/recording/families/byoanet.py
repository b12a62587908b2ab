"""timm's attention layers in CNN stages (``byoanet``: BoTNet, HaloNet, HaloRegNetZ; any ByobNet using them).

- ``BottleneckAttn`` (BoTNet): global attention over the ``[B, C, H, W]`` map it receives, row-major, heads
  batched image-major: ``[B * heads, H * W, H * W]``.
- ``HaloAttn`` (HaloNet): the map is cut into ``b x b`` blocks; each block's queries attend to the keys of its
  ``(b + 2 h) x (b + 2 h)`` neighbourhood (halo ``h``), the map zero-padded by ``h`` on every side:
  ``[B * heads, blocks, q, (b + 2 h) ** 2]``. Keys past the map's edge are padding the model attends, so they
  sit at their cell of the padded grid (``docs/definition.md``, windows). With ``block_stride`` ``s`` > 1 the
  queries come from a 1x1 convolution of stride ``s``: ``b / s`` per block side, each at the centre of its
  stride cell.

The pixel stride of the map is its stage's ``feature_info`` reduction, checked against the map
(:func:`.windows.stage_stride`); in the first block of a stage that downsamples, the attention runs before the
downsampling (``HaloAttn`` and ``BottleneckAttn`` pool their output), so its map has the previous stage's
reduction, again checked against the map.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..module_index import enclosing_modules, named_module_list
from ..placement import CallContext, LayerGeometry, LayerPlacer, NotPlaceable, Placement, cell_centres
from .stages import defined_in
from .windows import nchw, stage_stride

__all__ = ["placer"]


class _MapAttentionPlacer(LayerPlacer):
    """Reads the module's ``[B, C, H, W]`` input at each call."""

    def __init__(self, model: nn.Module, name: str, module: nn.Module):
        self.model, self.name, self.module = model, name, module
        self.key = f"byoanet.map.{name}"

    def install(self, context: CallContext) -> list[torch.utils.hooks.RemovableHandle]:
        def see(module, args) -> None:
            context.values[self.key] = nchw(args[0]) if args and isinstance(args[0], torch.Tensor) else None

        return [self.module.register_forward_pre_hook(see)]

    def _map(self, context: CallContext) -> tuple[int, tuple[int, int], tuple[float, float]]:
        seen = context.values.get(self.key)
        if seen is None:
            raise NotPlaceable("it ran without a [B, C, H, W] map as its input")
        batch, height, width = seen
        try:
            return batch, (height, width), stage_stride(self.model, self.name, context.image_size, (height, width))
        except NotPlaceable as error:
            stride = self._previous_stage_stride(context.image_size, (height, width))
            if stride is None:
                raise error
            return batch, (height, width), stride

    def _previous_stage_stride(self, image, grid) -> tuple[float, float] | None:
        """The reduction of the stage before this module's, if the module is in its stage's first block and the
        map fits it. The stage is ``stages.<i>`` of the nearest model above the module whose ``feature_info``
        lists ``stages.<i - 1>``: timm's ``features_only`` wrapper renames its stages ``stages_<i>`` (QA 334:
        HaloNet's first stride-32 block was refused there), and the model may sit in a user's module."""
        if image is None:
            return None
        for prefix, owner in enclosing_modules(self.model, self.name):
            stage = _first_block_stage(self.name[len(prefix) + 1:] if prefix else self.name)
            infos = getattr(owner, "feature_info", None)
            infos = getattr(infos, "info", infos)
            if stage is None or not isinstance(infos, (list, tuple)):
                continue
            before = [i for i in infos if isinstance(i, dict) and i.get("module") == f"stages.{stage - 1}"]
            if not before:
                continue
            reduction = int(before[0]["reduction"])
            if all(side in (math.floor(size / reduction), math.ceil(size / reduction))
                   for size, side in zip(image, grid)):
                return float(reduction), float(reduction)
            return None
        return None


def _first_block_stage(name: str) -> int | None:
    """``i`` for a module in the first block of stage ``i`` (``stages.<i>.0.`` or, renamed by timm's
    ``features_only`` wrapper, ``stages_<i>.0.``), relative to the model holding the stages; else None."""
    parts = name.split(".")
    if len(parts) >= 3 and parts[0] == "stages" and parts[1].isdigit() and parts[2] == "0":
        return int(parts[1])
    if len(parts) >= 2 and parts[0].startswith("stages_") and parts[0][7:].isdigit() and parts[1] == "0":
        return int(parts[0][7:])
    return None


class _BottleneckPlacer(_MapAttentionPlacer):
    def place(self, context: CallContext, lead: torch.Size, num_queries: int, num_keys: int) -> Placement:
        batch, grid, stride = self._map(context)
        heads = self.module.num_heads
        tokens = grid[0] * grid[1]
        if list(lead) != [batch * heads] or num_queries != tokens or num_keys != tokens:
            raise NotPlaceable(f"its attention is [{', '.join(map(str, lead))}, {num_queries}, {num_keys}], expected "
                               f"[{batch * heads}, {tokens}, {tokens}] over its {grid[0]}x{grid[1]} map")
        positions = cell_centres(*grid, stride).reshape(tokens, 2)

        def fold(values: torch.Tensor) -> torch.Tensor:
            return values.reshape(batch, heads, tokens)

        return Placement(positions, None, fold, LayerGeometry(grid, stride, "global", heads))


class _HaloPlacer(_MapAttentionPlacer):
    def place(self, context: CallContext, lead: torch.Size, num_queries: int, num_keys: int) -> Placement:
        batch, (height, width), stride = self._map(context)
        m = self.module
        block, halo, step, window = m.block_size, m.halo_size, m.block_stride, m.win_size
        per_side = m.block_size_ds
        blocks_h, blocks_w = height // block, width // block
        heads = m.num_heads
        if (list(lead) != [batch * heads, blocks_h * blocks_w] or num_queries != per_side ** 2
                or num_keys != window ** 2):
            raise NotPlaceable(
                f"its attention is [{', '.join(map(str, lead))}, {num_queries}, {num_keys}], expected "
                f"[{batch * heads}, {blocks_h * blocks_w}, {per_side ** 2}, {window ** 2}]: {block}x{block} blocks "
                f"with a halo of {halo} over its {height}x{width} map"
            )
        a = torch.arange(blocks_h).view(-1, 1, 1, 1)
        c = torch.arange(blocks_w).view(1, -1, 1, 1)
        # Queries: cell (a * b/s + i, c * b/s + j) of the stride-s map, at the centre of its stride cell.
        i = torch.arange(per_side).view(1, 1, -1, 1)
        j = torch.arange(per_side).view(1, 1, 1, -1)
        q_rows, q_cols = torch.broadcast_tensors(a * per_side + i, c * per_side + j)  # [bh, bw, ps, ps]
        q_stride = (stride[0] * step, stride[1] * step)
        queries = torch.stack([(q_rows + 0.5) * q_stride[0], (q_cols + 0.5) * q_stride[1]], -1)
        # Keys: cell (a * b - h + u, c * b - h + v) of the map, padding included.
        u = torch.arange(window).view(1, 1, -1, 1)
        v = torch.arange(window).view(1, 1, 1, -1)
        k_rows, k_cols = torch.broadcast_tensors(a * block - halo + u, c * block - halo + v)
        keys = torch.stack([(k_rows + 0.5) * stride[0], (k_cols + 0.5) * stride[1]], -1)
        num_blocks = blocks_h * blocks_w
        positions = queries.reshape(num_blocks, per_side ** 2, 2).float()
        key_positions = keys.reshape(num_blocks, window ** 2, 2).float()
        grid = (blocks_h * per_side, blocks_w * per_side)

        def fold(values: torch.Tensor) -> torch.Tensor:
            values = values.reshape(batch, heads, blocks_h, blocks_w, per_side, per_side).permute(0, 1, 2, 4, 3, 5)
            return values.reshape(batch, heads, grid[0] * grid[1])

        attention = f"blocks {block}x{block}, halo {halo}" + (f", queries of stride {step}" if step > 1 else "")
        return Placement(positions, key_positions, fold, LayerGeometry(grid, q_stride, attention, heads))


def attention_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in named_module_list(model)
            if defined_in(m, "BottleneckAttn", "bottleneck_attn") or defined_in(m, "HaloAttn", "halo_attn")}


def placer(model: nn.Module, name: str, module: nn.Module):
    if defined_in(module, "BottleneckAttn", "bottleneck_attn"):
        return _BottleneckPlacer(model, name, module)
    if defined_in(module, "HaloAttn", "halo_attn"):
        return _HaloPlacer(model, name, module)
    return None
