"""MViTv2 (timm ``mvitv2_*``): pooling attention, queries and keys pooled from the block's grid.

``MultiScaleAttention`` (and ``MultiScaleAttentionPoolFirst``) receives the tokens of a ``feat_size`` grid (after
a CLS token in the ``*_cls`` models), pools the queries with ``pool_q`` (stride 2 in the first block of stages
2-4, so the next blocks run on the pooled grid) and the keys with ``pool_k`` (a 3x3 convolution or pool of
stride 4, 2 or 1 by stage), then attends ``[B, H, 1 + Nq, 1 + Nk]`` with a relative position bias. A pooling is
a strided operation: its output ``i`` sits at the centre of its stride cell, ``(i + 0.5) * stride`` cells of the
block's grid, whatever its kernel and padding (docs/definition.md, "Beyond one grid";
:func:`.stages.strided_module_centres`), so pooled queries sit where the next blocks' tokens do; the queries'
grid, and its stride, is what the layer is folded onto. A block whose keys are pooled onto the queries' own cells
(``pool_q`` and ``pool_k`` of the same stride) is self-attention over one grid: its self mass and its CLS row (the
prefix map) are measured; elsewhere the keys are other cells, and both are left out (NaN, None).

These modules have no ``fused_attn`` switch, so :func:`attention_modules` finds them.
"""

from __future__ import annotations

import torch
from torch import nn

from ..module_index import module_list, named_module_list
from ..placement import CallContext, LayerPlacer, NotPlaceable, Placement, cell_centres
from .stages import defined_in, grid_placement, pair, strided_module_centres

__all__ = ["placer", "attention_modules"]

_CLASSES = ("MultiScaleAttention", "MultiScaleAttentionPoolFirst")


def _is_mvit_attention(module: nn.Module) -> bool:
    return any(defined_in(module, name, "mvitv2") for name in _CLASSES)


def attention_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in named_module_list(model) if _is_mvit_attention(m)}


def _input_strides(model: nn.Module) -> dict[int, tuple[float, float]]:
    """Per attention module (by id), the pixel stride of the grid it receives: the patch embedding's stride
    times the query strides of the attention layers before it (the blocks run in module order)."""
    owner = next(m for m in module_list(model) if defined_in(m, "MultiScaleVit", "mvitv2"))
    stride = tuple(float(s) for s in pair(owner.patch_embed.proj.stride))
    strides = {}
    for module in module_list(owner):
        if _is_mvit_attention(module):
            strides[id(module)] = stride
            if module.pool_q is not None:
                step = pair(module.pool_q.stride)
                stride = (stride[0] * step[0], stride[1] * step[1])
    return strides


class PoolingAttentionPlacer(LayerPlacer):
    def __init__(self, module: nn.Module, stride: tuple[float, float]):
        self.module, self.stride = module, stride
        self.key = ("mvit.feat_size", id(module))

    def install(self, context: CallContext) -> list[torch.utils.hooks.RemovableHandle]:
        def see(module, args, kwargs) -> None:
            size = args[1] if len(args) > 1 else kwargs.get("feat_size")
            if size is not None:
                context.values[self.key] = (int(size[0]), int(size[1]))

        return [self.module.register_forward_pre_hook(see, with_kwargs=True)]

    def place(self, context: CallContext, lead: torch.Size, num_queries: int, num_keys: int) -> Placement:
        grid = context.values.get(self.key)
        if grid is None:
            raise NotPlaceable("its forward was not given feat_size (x, feat_size), so its grid is unknown")
        module, stride = self.module, self.stride

        def pooled(pool):
            if pool is None:
                return grid, cell_centres(*grid, stride).reshape(-1, 2), stride
            out, centres = strided_module_centres(grid, stride, pool)
            step = pair(pool.stride)
            return out, centres, (stride[0] * step[0], stride[1] * step[1])

        query_grid, queries, query_stride = pooled(module.pool_q)
        key_grid, keys, _ = pooled(module.pool_k)
        words = "global" if module.pool_k is None else (
            f"keys pooled {'x'.join(map(str, pair(module.pool_k.kernel_size)))}, stride "
            f"{'x'.join(map(str, pair(module.pool_k.stride)))} to {key_grid[0]}x{key_grid[1]}")
        if module.pool_q is not None and pair(module.pool_q.stride) != (1, 1):
            words += f"; queries pooled, stride {'x'.join(map(str, pair(module.pool_q.stride)))}"
        prefix = int(module.has_cls_token)
        if key_grid == query_grid and torch.equal(keys, queries):
            # Keys pooled onto the queries' own cells (both of stride 1, or of the same stride): key i is query
            # i's token, pooled as the query is, so the layer is self-attention over one grid: its self mass and
            # the CLS token's row (prefix maps) are measured as any such layer's.
            keys = None
        return grid_placement(lead, num_queries, num_keys, grid=query_grid, stride=query_stride, attention=words,
                              prefix=prefix, queries=queries, keys=keys, key_prefix=prefix)


def placer(model: nn.Module, name: str, module: nn.Module):
    if not _is_mvit_attention(module):
        return None
    return PoolingAttentionPlacer(module, _input_strides(model)[id(module)])
