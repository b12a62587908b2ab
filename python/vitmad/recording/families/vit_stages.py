"""Plain ViT attention on more than one grid: PiT's pooled stages, CrossViT's two branches, CaiT's talking heads.

- PiT (timm ``pit_*``): each stage is a plain ViT over its grid, after the CLS token (and the distillation token
  in ``*_distilled_*``); the stages are joined by a depthwise convolution of stride 2, so stage ``k`` has a
  stride of the patch embedding's (8 px) times ``2 ** k``.
- CrossViT (timm ``crossvit_*``): two plain ViT branches with their own patch size, each on the image resized
  (or cropped, ``crop_scale``) to its own size; a branch's tokens are placed in pixels of the model's input, so
  both branches compare. The cross-attention between the branches' CLS tokens is skipped
  (:mod:`.non_spatial`); :func:`attention_modules` finds it, so that it is listed.
- CaiT (timm ``cait_*``): its self-attention blocks are talking-heads attention over the patch grid, without a
  CLS token (plain layout); the MAD is that of each head's softmax, before ``proj_w`` mixes the heads. Its
  class-attention blocks are skipped (:mod:`.non_spatial`).
"""

from __future__ import annotations

import torch
from torch import nn

from ..module_index import module_list, named_module_list
from ..placement import CallContext, LayerPlacer, NotPlaceable, Placement
from .stages import StageGrid, StagePlacer, defined_in, grid_placement, owner_of, pair

__all__ = ["placer", "attention_modules"]


def attention_modules(model: nn.Module) -> dict[str, nn.Module]:
    """CaiT's talking-heads attention and CrossViT's cross-attention: they have no ``fused_attn`` switch."""
    return {name: m for name, m in named_module_list(model)
            if defined_in(m, "TalkingHeadAttn", "cait") or defined_in(m, "CrossAttention", "crossvit")}


def _pit(model: nn.Module, module: nn.Module) -> LayerPlacer | None:
    pit = owner_of(model, "PoolingVisionTransformer", "pit")
    if pit is None or not any(m is module for m in module_list(pit.transformers)):
        return None
    embeddings = [pit.patch_embed.conv] + [stage.pool.conv for stage in pit.transformers if stage.pool is not None]
    prefix = int(pit.cls_token.shape[1])
    return StagePlacer(StageGrid(model, embeddings), prefix=lambda index: prefix)


class CrossVitBranchPlacer(LayerPlacer):
    """A CrossViT branch's self-attention: CLS, then the branch's patch grid, in pixels of the model input."""

    def __init__(self, crossvit: nn.Module, branch: int):
        self.crossvit, self.branch = crossvit, branch
        convs = [m for m in module_list(crossvit.patch_embed[branch]) if isinstance(m, nn.Conv2d)]
        self.stages = StageGrid(crossvit, convs)
        # The model's input size in the current call: the image the branches are resized from. Kept here, not in
        # the call context, which is cleared when the first convolution (after this hook) runs.
        self.input_size: tuple[int, int] | None = None

    def install(self, context: CallContext) -> list[torch.utils.hooks.RemovableHandle]:
        def see(module, args) -> None:
            self.input_size = (int(args[0].shape[-2]), int(args[0].shape[-1]))

        def forget(*_) -> None:
            # Kept past the forward, a later forward_features on another size was placed at this one's scale (QA
            # 274: 124.67 px for 116.36); without the model's forward, the input size is unknown and refused.
            self.input_size = None

        return [self.crossvit.register_forward_pre_hook(see),
                self.crossvit.register_forward_hook(forget, always_call=True), *self.stages.install(context)]

    def place(self, context: CallContext, lead: torch.Size, num_queries: int, num_keys: int) -> Placement:
        stage = self.stages.current(context)
        if self.input_size is None:
            # forward_intermediates and timm's features_only wrapper resize the input for each branch themselves
            # (QA 293): what to run instead is said.
            raise NotPlaceable("it ran outside CrossVit.forward, so the size of the model's input is unknown (each "
                               "branch sees it resized); record a call of the model itself, model(x), not "
                               "forward_intermediates or a features_only copy")
        scaled = pair(self.crossvit.img_size_scaled[self.branch])
        cropped = self.crossvit.crop_scale and all(s <= n for s, n in zip(scaled, self.input_size))
        # The branch sees the input resized to `scaled` (or cropped to it, which moves every token alike).
        scale = (1.0, 1.0) if cropped or scaled == self.input_size else tuple(
            n / s for n, s in zip(self.input_size, scaled))
        stride = (stage.stride[0] * scale[0], stage.stride[1] * scale[1])
        return grid_placement(lead, num_queries, num_keys, grid=stage.grid, stride=stride,
                              attention=f"global (branch {self.branch})", prefix=1)


def _crossvit(model: nn.Module, module: nn.Module) -> LayerPlacer | None:
    crossvit = owner_of(model, "CrossVit", "crossvit")
    if crossvit is None:
        return None
    for block in crossvit.blocks:
        for branch, blocks in enumerate(block.blocks):
            if any(m is module for m in module_list(blocks)):
                return CrossVitBranchPlacer(crossvit, branch)
    return None


def placer(model: nn.Module, name: str, module: nn.Module):
    # PiT and CrossViT reuse the plain ViT's Attention: they are told apart by the model that holds it.
    if not hasattr(module, "fused_attn"):
        return None
    return _pit(model, module) or _crossvit(model, module)
