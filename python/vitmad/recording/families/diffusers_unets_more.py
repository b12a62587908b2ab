"""The self-attention of diffusers' other UNets (0.42): Kandinsky 3, Stable Cascade (Würstchen's stages B and C),
aMUSEd's U-ViT, and a ``TransformerTemporalModel`` recorded alone.

Each is placed as :mod:`.diffusers_unets` places Stable Diffusion's UNet: a token is its cell of the feature map the
attention runs over, at the cell's centre in *latent pixels* of the model's input (``(i + 0.5) * s`` for cell ``i``
of a map at stride ``s``, docs/definition.md "Beyond one grid"), the map read in each call and checked against the
one the model's samplings made; one ``rec.calls`` entry per forward (a denoising step).

- ``Kandinsky3UNet`` (``Kandinsky3Pipeline``'s ``pipe.unet``): each ``Kandinsky3AttentionBlock`` flattens its block's
  map ``[B, C, h, w]`` row-major (``reshape(B, C, h * w).permute(0, 2, 1)``). The first one of a block built with
  ``self_attention`` (``attentions.0``) passes that flattened map as both ``hidden_states`` and
  ``encoder_hidden_states``: self-attention over the map, placed (checked per call to be the same tensor). The
  others (``attentions.1`` on) attend from the map to the prompt (``encoder_hidden_states``): skipped, and so is
  ``add_time_condition.attention`` (``Kandinsky3AttentionPooling``), whose one query is the mean of the prompt's
  tokens and whose keys are the prompt's tokens: it pools the prompt into the time embedding, no token is a cell of
  a map. The map follows ``conv_in`` (stride 1) and the ``Kandinsky3ResNetBlock`` s that sample: a 2x2
  convolution of stride 2 (``floor(n / 2)``, the stride doubled) at the end of each down block but the last, and
  a 2x2 transposed convolution of stride 2 (twice the map, the stride halved) at the start of each up block but the
  first. Its up blocks concatenate the skip connection before up-sampling, so the UNet runs only on latents whose
  sides halve evenly down to its third-deepest level; an odd side runs where the levels above stay even (its last up
  block's map, ``2 * floor(n / 2)`` cells, then stops short of the latent's last row or column).
- ``StableCascadeUNet`` (``StableCascadePriorPipeline``'s ``pipe.prior``, stage C, and
  ``StableCascadeDecoderPipeline``'s ``pipe.decoder``, stage B): ``embedding`` pixel-unshuffles ``sample`` by
  ``patch_size`` (level 0 at stride ``patch_size``), and each level's ``down_downscalers`` entry halves the map by a
  2x2 convolution of stride 2 (``switch_level`` None: stage B), or keeps it (its ``UpDownBlock2d`` with
  ``switch_level`` False: stage C). An ``SDCascadeAttnBlock`` built with ``self_attn`` hands its ``Attention`` the map
  ``[B, C, h, w]`` itself (the processor flattens it row-major) and as keys ``cat([the same map flattened, the
  condition tokens])``: the map's
  cells, then the CLIP text and image tokens (``kv_mapper(clip)``, as many as its ``kv`` has), which have no position
  (keys only: ``prefix_mass`` is the map's attention on the condition). Up level ``i`` runs on the map of down
  level ``i`` (its first ``SDCascadeResBlock`` interpolates the up-sampled map to the skip connection's size, placed
  where that one was). Its ``repeat_mappers`` run a level's blocks several times per forward: each run one entry.
  Built with ``self_attn=False`` the block's attention takes the condition alone as keys: skipped. A ``switch_level``
  True (bilinear resizing with ``align_corners``, whose cells are not on the stride rule) is refused.
- ``UVit2DModel`` (aMUSEd, ``AmusedPipeline``'s ``pipe.transformer``): ``embed`` maps ``input_ids`` ``[B, H, W]``,
  the VQ tokens of the image, to a map at stride 1 (positions in VQ tokens: each ``pipe.vae_scale_factor`` image
  pixels); ``down_block`` keeps it, or halves it (``downsample``: ``Downsample2D`` pads right and bottom by one and
  cuts 2x2 cells, ``ceil(n / 2)`` at stride 2). The ``BasicTransformerBlock`` s of ``transformer_layers`` attend
  over ``down_block``'s output flattened row-major (``permute(0, 2, 3, 1).reshape(B, h * w, C)``): their ``attn1``
  is placed. Their ``attn2`` and both attentions of the ``SkipFFTransformerBlock`` s in ``down_block`` and
  ``up_block`` take the prompt (``encoder_hidden_states``) as keys: skipped.
- ``TransformerTemporalModel`` recorded alone (``vitmad.record(temporal_model)``): its forward views its
  ``hidden_states`` ``[B * F, C, h, w]`` as ``num_frames`` frames and attends per cell over them (``[B * h * w,
  heads, F, F]``, ``attn1``, and ``attn2`` where ``double_self_attention`` makes it self-attention), as inside
  ModelScope's UNet (:class:`.diffusers_unets.FramesMapPlacer`, ``"time"``): a token is its cell of that map (stride
  1: pixels of the module's input) in its frame, at ``f + 0.5`` frames; a temporal MAD in frames, a spatial MAD of 0.
  Inside another model the map's stride is that model's, which vitmad does not know: refused (inside a diffusers
  UNet it is :mod:`.diffusers_unets`' to place).

Processors, backends and keys given at run time are read as :class:`.diffusers_unets.UNetMapPlacer` reads them
(``AttnProcessor2_0``, ``FusedAttnProcessor2_0``, the classic ``AttnProcessor`` and ``SlicedAttnProcessor``; any
other refused by name).
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from ..placement import CallContext, NotPlaceable, Placement, RefusingPlacer, cell_centres
from .diffusers_common import attention_under, is_attention
from .diffusers_unets import FramesMapPlacer, UNetMap, UNetMapPlacer, is_unet, unet_key
from .stages import forward_arguments, grid_placement, innermost_on_path, pair

__all__ = ["placer", "attention_modules", "CascadeMapPlacer", "UVitMapPlacer", "TemporalModelPlacer"]

_KANDINSKY3 = ("diffusers.models.unets.unet_kandinsky3", "Kandinsky3UNet")
_CASCADE = ("diffusers.models.unets.unet_stable_cascade", "StableCascadeUNet")
_UVIT = ("diffusers.models.unets.uvit_2d", "UVit2DModel")
_TEMPORAL_MODEL = ("diffusers.models.transformers.transformer_temporal", "TransformerTemporalModel")


def _is(module: nn.Module, where: tuple[str, str]) -> bool:
    """Whether ``module``'s class is ``where = (defining module, class name)`` or derives from it."""
    return any((cls.__module__, cls.__name__) == where for cls in type(module).__mro__)


def _owner(module: nn.Module) -> bool:
    return unet_key(module) in (_KANDINSKY3, _CASCADE, _UVIT)


def attention_modules(model: nn.Module) -> dict[str, nn.Module]:
    """diffusers' attention modules inside aMUSEd's ``UVit2DModel`` or a ``TransformerTemporalModel`` (Kandinsky 3's
    and Stable Cascade's UNets are found by :mod:`.diffusers_unets`)."""
    return attention_under(model, lambda m: _is(m, _UVIT) or _is(m, _TEMPORAL_MODEL))


def placer(model: nn.Module, name: str, module: nn.Module):
    """The placer of an attention module of one of these models (a :class:`Skip` for attention whose keys or queries
    have no position, a refusal where the layout is not known); None for any other module."""
    if not is_attention(module):
        return None
    found = innermost_on_path(model, name, _owner)
    if found is not None:
        owner_name, owner = found
        inner = name[len(owner_name) + 1:] if owner_name else name
        place = {_KANDINSKY3: _kandinsky3, _CASCADE: _cascade, _UVIT: _uvit}[unet_key(owner)]
        return place(owner, inner, module)
    temporal = innermost_on_path(model, name, lambda m: _is(m, _TEMPORAL_MODEL))
    if temporal is None or innermost_on_path(model, name, is_unet) is not None:
        return None
    return _temporal_model(model, temporal, name, module)


def _skip(reason: str):
    from . import Skip

    return Skip(reason)


def _kandinsky3(unet: nn.Module, name: str, module: nn.Module):
    if name == "add_time_condition.attention":
        return _skip("Kandinsky 3's attention pooling of the prompt into its time embedding: its one query is the mean "
                     "of the prompt's tokens and its keys are the prompt's tokens, none a cell of the map")
    holder = innermost_on_path(unet, name, lambda m: type(m).__name__ == "Kandinsky3AttentionBlock")
    block = innermost_on_path(unet, name, lambda m: type(m).__name__ in (
        "Kandinsky3DownSampleBlock", "Kandinsky3UpSampleBlock"))
    if holder is None or block is None or not holder[0].startswith(block[0] + ".attentions."):
        return RefusingPlacer("it is no attention of a Kandinsky3AttentionBlock in a down or up block of "
                              "Kandinsky3UNet, the ones vitmad places")
    index = int(holder[0].rsplit(".", 1)[1])
    if index > 0 and block[1].context_dim is not None:
        return _skip("cross-attention of Kandinsky3UNet's feature map to the prompt (encoder_hidden_states), whose "
                     "keys have no position in the latent")
    if index != 0 or not block[1].self_attention:
        return RefusingPlacer(f"it is attention {index} of {block[0]}, which Kandinsky3UNet neither builds as "
                              "self-attention over the map nor as cross-attention to the prompt")
    samplings = []
    for resnet in unet.modules():
        if type(resnet).__name__ != "Kandinsky3ResNetBlock":
            continue
        for sampler, factor in ((resnet.shortcut_down_sample, 2.0), (resnet.shortcut_up_sample, 0.5)):
            if isinstance(sampler, nn.Identity):
                continue
            if pair(sampler.kernel_size) != (2, 2) or pair(sampler.stride) != (2, 2) or pair(sampler.padding) != (0, 0):
                return RefusingPlacer(f"a Kandinsky3ResNetBlock of Kandinsky3UNet samples with {sampler}, where vitmad "
                                      "follows 2x2 (transposed) convolutions of stride 2 without padding")
            samplings.append((resnet, factor))
    return UNetMapPlacer(unet, module, holder[1], unet.conv_in, samplings, map_argument="x")


def _cascade(unet: nn.Module, name: str, module: nn.Module):
    holder = innermost_on_path(unet, name, lambda m: type(m).__name__ == "SDCascadeAttnBlock")
    parts = name.split(".")
    if holder is None or parts[0] not in ("down_blocks", "up_blocks") or not name.endswith(".attention"):
        return RefusingPlacer("it is no attention of an SDCascadeAttnBlock in StableCascadeUNet's down or up blocks, "
                              "the ones vitmad places")
    if not holder[1].self_attn:
        return _skip("cross-attention of StableCascadeUNet's feature map to its condition (the CLIP text and image "
                     "tokens; self_attn=False), whose keys have no position in the latent")
    levels = len(unet.down_blocks)
    level = int(parts[1]) if parts[0] == "down_blocks" else levels - 1 - int(parts[1])
    embedding = unet.embedding
    unshuffle = embedding[0] if isinstance(embedding, nn.Sequential) and len(embedding) > 1 else None
    if not isinstance(unshuffle, nn.PixelUnshuffle) or not isinstance(embedding[1], nn.Conv2d) \
            or pair(embedding[1].kernel_size) != (1, 1):
        return RefusingPlacer("StableCascadeUNet's embedding is not a PixelUnshuffle and a 1x1 convolution, so its "
                              "latent grid is not known")
    strides = [float(unshuffle.downscale_factor)]
    for i in range(1, level + 1):
        sampler = unet.down_downscalers[i][-1]
        if isinstance(sampler, nn.Conv2d) and pair(sampler.kernel_size) == pair(sampler.stride) == (2, 2) \
                and pair(sampler.padding) == (0, 0):
            strides.append(strides[-1] * 2)
        elif type(sampler).__name__ == "UpDownBlock2d" and all(
                isinstance(m, (nn.Identity, nn.Conv2d)) and pair(getattr(m, "kernel_size", 1)) == (1, 1)
                for m in sampler.blocks):
            strides.append(strides[-1])
        else:
            parts = ", ".join(type(m).__name__ for m in getattr(sampler, "blocks", [sampler]))
            return RefusingPlacer(
                f"StableCascadeUNet's down_downscalers.{i} resizes its map with a {type(sampler).__name__} ({parts}; "
                "switch_level True: bilinear with align_corners, whose cells do not lie on the stride rule); vitmad "
                "places levels joined by a 2x2 convolution of stride 2 or by none (switch_level None or False)")
    source = embedding if level == 0 else unet.down_downscalers[level]
    return CascadeMapPlacer(unet, module, holder[1], source, strides[-1])


def _uvit(model: nn.Module, name: str, module: nn.Module):
    parts = name.split(".")
    if len(parts) == 3 and parts[0] == "transformer_layers" and parts[2] == "attn1":
        downsample = model.down_block.downsample
        samplings = []
        if downsample is not None:
            conv = getattr(downsample, "conv", None)
            if type(downsample).__name__ != "Downsample2D" or not downsample.use_conv or downsample.padding != 0 \
                    or pair(conv.kernel_size) != (2, 2) or pair(conv.stride) != (2, 2):
                return RefusingPlacer(f"UVit2DModel's down_block samples with a {type(downsample).__name__} other "
                                      "than the Downsample2D of 2x2 cells, stride 2, padded right and bottom by one, "
                                      "it builds, whose cells vitmad does not know")
            samplings.append((downsample, 2.0))
        return UVitMapPlacer(model, module, model.down_block, model.embed, samplings)
    if getattr(module, "is_cross_attention", False):
        return _skip("cross-attention of UVit2DModel's tokens to the prompt (encoder_hidden_states), whose keys have "
                     "no position in the latent")
    return RefusingPlacer("it is an attention of UVit2DModel other than its transformer_layers' attn1 (self-attention "
                          "over the down block's map), whose tokens vitmad does not know")


def _temporal_model(model: nn.Module, temporal: tuple[str, nn.Module], name: str, module: nn.Module):
    owner_name, owner = temporal
    if owner_name:
        return RefusingPlacer(
            f"it is an attention of the TransformerTemporalModel {owner_name} inside {type(model).__name__}, which "
            "vitmad does not place (the stride of its map in the model's input is the model's); record the "
            "TransformerTemporalModel itself, whose cells are then pixels of its own input")
    if getattr(module, "is_cross_attention", False):
        return _skip("cross-attention of TransformerTemporalModel's frames to encoder_hidden_states, whose keys have "
                     "no position in the video")
    if not name.endswith((".attn1", ".attn2")):
        return RefusingPlacer("it is an attention of TransformerTemporalModel other than its blocks' attn1 and attn2 "
                              "(self-attention over the frames of each cell), whose tokens vitmad does not know")
    return TemporalModelPlacer(owner, module)


class CascadeMapPlacer(UNetMapPlacer):
    """The self-attention of a Stable Cascade ``SDCascadeAttnBlock``: its queries the block's map row-major, its keys
    the same cells, then the condition's tokens, without a position.

    Args:
        unet: the ``StableCascadeUNet``.
        attention: the block's ``Attention``.
        block: the ``SDCascadeAttnBlock`` (its ``x`` is the map, its ``kv`` the condition's tokens).
        source: the module whose output is the map of the block's level in this call (``embedding`` or that level's
            ``down_downscalers`` entry).
        stride: latent pixels per cell of that level.
    """

    def __init__(self, unet: nn.Module, attention: nn.Module, block: nn.Module, source: nn.Module, stride: float):
        super().__init__(unet, attention, block, None, [], map_argument="x")
        self.source, self.stride = source, (stride, stride)
        self.condition_key = ("diffusers_unets_more.condition", id(self))

    def map_source(self) -> nn.Module:
        return self.source

    def install(self, context: CallContext) -> list[torch.utils.hooks.RemovableHandle]:
        def level_map(module, args, output) -> None:
            context.values[self.key] = UNetMap((int(output.shape[-2]), int(output.shape[-1])), self.stride)

        def received(module, args, kwargs) -> None:
            arguments = forward_arguments(module, args, kwargs)
            hidden, condition = arguments.get("x"), arguments.get("kv")
            context.values[self.input_key] = (tuple(hidden.shape) if isinstance(hidden, torch.Tensor) else None, None)
            context.values[self.condition_key] = (
                int(condition.shape[1]) if isinstance(condition, torch.Tensor) and condition.dim() == 3 else None)

        return [self.source.register_forward_hook(level_map),
                self.holder.register_forward_pre_hook(received, with_kwargs=True),
                *self.install_call_hooks(context)]

    def check_call(self, context: CallContext) -> None:
        # Its block hands the attention its keys (the map and the condition) as encoder_hidden_states: what they are
        # is read from the block's input (placement), not refused.
        refusal = self._processor_refusal()
        if refusal is not None:
            raise NotPlaceable(refusal)

    def placement(self, context: CallContext, current: UNetMap, shape: tuple[int, ...], frames: int | None,
                  lead: torch.Size, num_queries: int, num_keys: int) -> Placement:
        condition = context.values.get(self.condition_key)
        if condition is None:
            raise NotPlaceable("its SDCascadeAttnBlock was given no [B, N, C] condition (kv) in this call")
        cells = cell_centres(*current.grid, current.stride).reshape(-1, 2)
        keys = torch.cat([cells, cells.new_full((condition, 2), float("nan"))])
        return grid_placement(lead, num_queries, num_keys, grid=current.grid, stride=current.stride,
                              attention=f"global, {condition} condition keys last", keys=keys, key_prefix=0)


class UVitMapPlacer(UNetMapPlacer):
    """The self-attention of aMUSEd's ``UVit2DModel`` transformer layers over ``down_block``'s output map, row-major
    (``embed``'s map of the VQ tokens at stride 1, halved where ``down_block`` samples)."""

    def install(self, context: CallContext) -> list[torch.utils.hooks.RemovableHandle]:
        def flattened(module, args, output) -> None:  # the map the transformer layers flatten
            context.values[self.input_key] = (tuple(output.shape) if isinstance(output, torch.Tensor) else None, None)

        handles = [self.conv_in.register_forward_hook(functools.partial(self.sampled, context, None))]
        handles += [m.register_forward_hook(functools.partial(self.sampled, context, f)) for m, f in self.samplings]
        handles.append(self.holder.register_forward_hook(flattened))
        return handles + self.install_call_hooks(context)


class TemporalModelPlacer(FramesMapPlacer):
    """A ``TransformerTemporalModel`` recorded alone: attention per cell of its input map ``[B * F, C, h, w]`` (stride
    1) over its ``num_frames`` frames (``"time"``)."""

    def __init__(self, model: nn.Module, attention: nn.Module):
        super().__init__(model, attention, model, None, [], "time")

    def install(self, context: CallContext) -> list[torch.utils.hooks.RemovableHandle]:
        return [self.holder.register_forward_pre_hook(functools.partial(self.received, context), with_kwargs=True),
                *self.install_call_hooks(context)]

    def current_map(self, context: CallContext) -> tuple[UNetMap, tuple[int, ...], int | None]:
        self.check_call(context)
        shape, frames = context.values.get(self.input_key, (None, None))
        if shape is None or len(shape) != 4:
            raise NotPlaceable(f"TransformerTemporalModel was given {list(shape) if shape else 'no tensor'}, where "
                               "vitmad reads [B * F, C, h, w]")
        return UNetMap(tuple(shape[-2:]), (1.0, 1.0)), shape, frames
