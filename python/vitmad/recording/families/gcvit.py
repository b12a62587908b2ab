"""timm's GCViT (``timm.models.gcvit``): window attention and global-query window attention.

Every ``GlobalContextVitBlock`` cuts its ``[B, H, W, C]`` map into ``window_size`` windows (row-major, image-major
in the batch) and runs ``WindowAttentionGlobal`` on them: ``[B * windows, heads, N, N]``. In the odd blocks the
queries are not the window's tokens but the stage's global query, a ``window_size`` map pooled from the whole
stage (``FeatureBlock``), the same for every window of an image (``repeat_interleave`` over the windows). The
global query has no place of its own: each of its tokens is placed at the local token it replaces, the token
whose output it becomes (``window_reverse`` writes query ``n`` of window ``w`` there), so its MAD is the distance
from where its result lands to the keys of that window. Its queries are not the keys' tokens, so there is no
attention on a query's own token: its self mass is NaN, as beside pooled keys.

``WindowAttentionGlobal`` has no ``fused_attn`` switch (it always computes its softmax), so this family finds
its modules itself.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..module_index import named_module_list
from ..placement import CallContext, Placement
from .stages import defined_in
from .windows import PartitionPlacer, block_partition, nhwc, parent_module


def _is_window_attention(module: nn.Module) -> bool:
    return defined_in(module, "WindowAttentionGlobal", "gcvit")


def attention_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in named_module_list(model) if _is_window_attention(m)}


class _GlobalQueryPlacer(PartitionPlacer):
    """The windows of a global-query block: the keys are the window's tokens, the queries the global query's, placed
    where their results land; key ``n`` is no query's own token (the self mass is not measured)."""

    def place(self, context: CallContext, lead: torch.Size, num_queries: int, num_keys: int) -> Placement:
        placement = super().place(context, lead, num_queries, num_keys)
        keys = placement.positions if placement.key_positions is None else placement.key_positions
        return dataclasses.replace(placement, key_positions=keys, padded_keys=False)


def placer(model: nn.Module, name: str, module: nn.Module):
    if not _is_window_attention(module):
        return None
    block = parent_module(model, name)
    if type(block).__name__ != "GlobalContextVitBlock":
        return None
    kind = "global query, placed at the local tokens it replaces" if module.use_global else "local"

    def partition(grid):
        size = tuple(int(s) for s in block.window_size)
        return block_partition(grid, size), f"window {size[0]}x{size[1]}, {kind}"

    kind_of_placer = _GlobalQueryPlacer if module.use_global else PartitionPlacer
    return kind_of_placer(model, name, block, nhwc, partition, "windows in batch")
