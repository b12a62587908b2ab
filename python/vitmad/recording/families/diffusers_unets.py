"""The self-attention inside Hugging Face diffusers' UNets and ControlNets (``diffusers.models.unets``, 0.42).

``UNet2DConditionModel`` (Stable Diffusion 1.x / 2.x, SDXL): each ``Transformer2DModel`` of a
``CrossAttnDownBlock2D``, ``UNetMidBlock2DCrossAttn`` or ``CrossAttnUpBlock2D`` flattens its block's feature map
``[B, C, h, w]`` row-major into ``h * w`` tokens (``permute(0, 2, 3, 1).reshape(B, h * w, C)``, before or after its
``proj_in``), and every ``BasicTransformerBlock`` runs ``attn1``, self-attention over those tokens, and ``attn2``,
cross-attention from them to the text (``encoder_hidden_states``). ``UNet2DModel`` (unconditional DDPM UNets): the
``Attention`` of an ``AttnDownBlock2D``, ``AttnUpBlock2D`` or ``UNetMidBlock2D`` takes the map ``[B, C, h, w]``
itself and its processor flattens it the same way. Each is one attention over the whole map: ``[B, heads, h * w,
h * w]`` through ``F.scaled_dot_product_attention`` (``AttnProcessor2_0``, the default processor).

Where the tokens are: a token is its cell of the block's feature map, at the cell's centre in *latent pixels* of the
UNet's input (``sample``; an image pipeline's latent pixel is ``pipe.vae_scale_factor`` image pixels, which vitmad
does not guess). The map's stride is followed in each forward call: ``conv_in`` (stride 1) starts at the latent
grid; each entry of a down block's ``downsamplers`` (``Downsample2D``, or a ``ResnetBlock2D`` with ``down=True``)
halves the map and doubles the stride; each entry of an up block's ``upsamplers`` doubles the map back (to the skip
connection's size where ``UNet2DConditionModel`` passes ``upsample_size`` for sides not divisible by its total
down-sampling) and halves the stride. Token ``i`` of a map at stride ``s`` sits at ``(i + 0.5) * s`` (the rule of
strided operations, docs/definition.md "Beyond one grid"): a down block's map of ``ceil(H / 2)`` rows puts its last
cell partly past an odd latent's edge, and an up block's map, the size of the down block's it is concatenated with,
is placed where that one was. The map an attention receives (the ``Transformer2DModel``'s input, or the
``Attention``'s own 4-D input) is read in each call and must be the map those samplings made, else the call is
refused.

``ControlNetModel`` (SD's ControlNet) is the UNet's ``conv_in``, down blocks and mid block, run on the same latent:
placed as the UNet's. ``UNetControlNetXSModel`` (ControlNet-XS) runs the UNet's blocks and its control model's side
by side on maps of the same size (``base_conv_in``, each down block's ``base_downsamplers``, the up blocks'
``upsamplers``): both streams' attention placed alike.

Video UNets. Stable Video Diffusion (``UNetSpatioTemporalConditionModel``) flattens ``sample`` ``[B, F, C, H, W]`` to
``[B * F, C, H, W]``; AnimateDiff's ``UNetMotionModel`` and its ``SparseControlNetModel``, ``UNet3DConditionModel``
(ModelScope, Zeroscope) and ``I2VGenXLUNet`` take ``[B, C, F, H, W]`` and fold it the same way (videos outermost),
reading ``F`` from ``sample``; all sample as the 2-D UNets do. Spatial attention runs per frame over the map
(``"space"``, ``[B * F, heads, h * w, h * w]``): SVD's ``TransformerSpatioTemporalModel``'s ``BasicTransformerBlock``,
the others' ``Transformer2DModel``. Temporal attention runs per cell over the frames (``"time"``, ``[B * h * w,
heads, F, F]``, cells row-major inside each video): SVD's ``TemporalBasicTransformerBlock`` (frames from its
``image_only_indicator``), and ``TransformerTemporalModel`` (``UNet3DConditionModel``'s ``transformer_in`` and
``temp_attentions``, I2VGen-XL's) and AnimateDiff's motion modules (``AnimateDiffTransformer3D``), which permute
their ``[B, C, F, h, w]`` view to ``[B * h * w, F, C]`` with ``num_frames`` and attend in both ``attn1`` and ``attn2``
(``double_self_attention``; their sinusoidal position encoding changes the logits, not the geometry). I2VGen-XL's
``image_latents_temporal_encoder`` attends over the frames of each latent pixel of ``image_latents`` before
``conv_in`` (stride 1). A token is its cell in its latent frame, at ``f + 0.5`` frames; both kinds fold onto ``[B,
heads, F * h * w]`` in (frame, row, column) order, as :mod:`.video` folds TimeSformer's divided attention: a space
call's temporal MAD is 0, a time call's spatial MAD is 0, both measured. AnimateDiff's FreeNoise
(``FreeNoiseTransformerBlock`` in the motion modules) attends over one context window of frames per forward of
``attn1`` / ``attn2``: each an entry of the call, on the same fold, NaN at the frames outside its window.

Processors: ``AttnProcessor2_0`` / ``FusedAttnProcessor2_0`` call ``F.scaled_dot_product_attention`` with ``[B,
heads, N, d]``; the classic ``AttnProcessor`` (which prompt-to-prompt style code builds on) merges batch and heads
(``head_to_batch_dim``: row ``b * heads + h``) and computes ``get_attention_scores``' softmax over ``[B * heads, N,
N]``, read by vitmad's softmax capture and unmerged here (the batch read from the attention's input in each call);
``SlicedAttnProcessor`` computes it in consecutive slices of ``slice_size`` rows, one call each (the last one the
rows left where ``slice_size`` does not divide ``B * heads``, as SD 2.x's 5 heads make it), joined along the rows in
order. A forward call starts at the UNet's forward
(:func:`call_start`): ControlNet's first 3-channel convolution is its conditioning image's, after ``conv_in``.

Skipped: ``attn2`` and every attention built as cross-attention (``Attention.is_cross_attention``: keys from the text
or image prompt, which have no position in the latent). Refused by name: attention in any other block
(``SimpleCrossAttn*``'s text keys appended to the image's, the ``K*`` and ``*Skip*`` blocks' own samplings), any
other diffusers UNet or ControlNet (Kandinsky 3's, Stable Cascade's and aMUSEd's are
:mod:`.diffusers_unets_more`'s), a placed attention given ``encoder_hidden_states`` at run time (its keys are not the
map's), and any other processor (xFormers' attention calls no function vitmad sees; IP-Adapter, PAG and one's own
processors are not read).

Generic (shareable with other diffusers families): :func:`_defined`, :func:`_classes`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import torch
from torch import nn

from ..module_index import module_list
from ..placement import (
    CallContext,
    LayerGeometry,
    LayerPlacer,
    NotPlaceable,
    Placement,
    RefusingPlacer,
    on_device,
    read_only,
)
from .diffusers_common import attention_under, backend_refusal, given_other_keys, is_attention
from .stages import forward_arguments, grid_placement, innermost_on_path, pair
from .video import tubelet_positions

__all__ = ["placer", "attention_modules", "call_start", "unets_holding", "is_unet", "unet_key", "UNetMap",
           "UNetMapPlacer", "FramesMapPlacer", "ImageLatentsPlacer"]

_UNET_PACKAGES = ("diffusers.models.unets.", "diffusers.models.controlnets.")
_2D_BLOCKS = "diffusers.models.unets.unet_2d_blocks"
_3D_BLOCKS = "diffusers.models.unets.unet_3d_blocks"
_MOTION = "diffusers.models.unets.unet_motion_model"
_SVD = ("diffusers.models.unets.unet_spatio_temporal_condition", "UNetSpatioTemporalConditionModel")
_I2VGEN_XL = ("diffusers.models.unets.unet_i2vgen_xl", "I2VGenXLUNet")
_SPARSE_CTRL = ("diffusers.models.controlnets.controlnet_sparsectrl", "SparseControlNetModel")


def _classes(module: str, *names: str) -> frozenset[tuple[str, str]]:
    return frozenset((module, name) for name in names)


_3D_UNET_BLOCKS = _classes(_3D_BLOCKS, "DownBlock3D", "CrossAttnDownBlock3D", "UNetMidBlock3DCrossAttn", "UpBlock3D",
                           "CrossAttnUpBlock3D")
# Per placed UNet, the blocks it may be built of, as (defining module, class name): blocks whose samplings are their
# ``downsamplers`` / ``upsamplers`` entries, each a factor of 2 (or none), and whose attention runs over their whole
# map (per frame, and over frames).
_CONTROLNET_UNION = ("diffusers.models.controlnets.controlnet_union", "ControlNetUnionModel")
_PLACED_UNETS = {
    ("diffusers.models.unets.unet_2d_condition", "UNet2DConditionModel"): _classes(
        _2D_BLOCKS, "DownBlock2D", "CrossAttnDownBlock2D", "UNetMidBlock2DCrossAttn", "UNetMidBlock2D", "UpBlock2D",
        "CrossAttnUpBlock2D"),
    ("diffusers.models.unets.unet_2d", "UNet2DModel"): _classes(
        _2D_BLOCKS, "DownBlock2D", "AttnDownBlock2D", "UNetMidBlock2D", "UpBlock2D", "AttnUpBlock2D"),
    # ControlNet: a copy of the UNet's encoder, down blocks and mid block, run on the same latent.
    ("diffusers.models.controlnets.controlnet", "ControlNetModel"): _classes(
        _2D_BLOCKS, "DownBlock2D", "CrossAttnDownBlock2D", "UNetMidBlock2DCrossAttn", "UNetMidBlock2D"),
    # ControlNet-Union (SDXL's ProMax): the same encoder; its condition fuser is skipped (placer).
    _CONTROLNET_UNION: _classes(
        _2D_BLOCKS, "DownBlock2D", "CrossAttnDownBlock2D", "UNetMidBlock2DCrossAttn", "UNetMidBlock2D"),
    # ControlNet-XS: the UNet and its control model side by side, block by block, on maps of the same size (the
    # base's samplings ``base_downsamplers``, ``upsamplers``; the control's run beside them).
    ("diffusers.models.controlnets.controlnet_xs", "UNetControlNetXSModel"): _classes(
        "diffusers.models.controlnets.controlnet_xs", "ControlNetXSCrossAttnDownBlock2D",
        "ControlNetXSCrossAttnMidBlock2D", "ControlNetXSCrossAttnUpBlock2D"),
    _SVD: _classes(_3D_BLOCKS, "DownBlockSpatioTemporal", "CrossAttnDownBlockSpatioTemporal",
                   "UNetMidBlockSpatioTemporal", "UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
    # AnimateDiff (its mid block without motion modules where use_motion_mid_block=False).
    (_MOTION, "UNetMotionModel"): _classes(
        _MOTION, "DownBlockMotion", "CrossAttnDownBlockMotion", "UNetMidBlockCrossAttnMotion", "UpBlockMotion",
        "CrossAttnUpBlockMotion") | _classes(_2D_BLOCKS, "UNetMidBlock2DCrossAttn"),
    # SparseCtrl: AnimateDiff's ControlNet, the motion UNet's encoder.
    _SPARSE_CTRL: _classes(_MOTION, "DownBlockMotion", "CrossAttnDownBlockMotion") | _classes(
        _2D_BLOCKS, "UNetMidBlock2DCrossAttn"),
    ("diffusers.models.unets.unet_3d_condition", "UNet3DConditionModel"): _3D_UNET_BLOCKS,  # ModelScope, Zeroscope
    _I2VGEN_XL: _3D_UNET_BLOCKS,
}
# The video UNets that take ``sample`` as [B, C, F, H, W] and fold it to [B * F, C, H, W], videos outermost
# (``sample.permute(0, 2, 1, 3, 4).reshape(B * F, C, H, W)``).
_FRAMES_IN_SAMPLE = {(_MOTION, "UNetMotionModel"), ("diffusers.models.unets.unet_3d_condition", "UNet3DConditionModel"),
                     _I2VGEN_XL, _SPARSE_CTRL}
# The modules that flatten a block's map into the tokens their attention runs over: per image or frame (the first),
# or per cell over the frames (``TransformerTemporalModel``, AnimateDiff's motion module ``AnimateDiffTransformer3D``:
# both ``permute(0, 3, 4, 2, 1).reshape(B * h * w, F, C)`` of their [B, C, F, h, w] view, with ``num_frames``).
_MAP_HOLDERS = {("diffusers.models.transformers.transformer_2d", "Transformer2DModel"),
                ("diffusers.models.transformers.transformer_temporal", "TransformerSpatioTemporalModel")}
_TEMPORAL_HOLDERS = {("diffusers.models.transformers.transformer_temporal", "TransformerTemporalModel"),
                     (_MOTION, "AnimateDiffTransformer3D")}
_TEMPORAL_BLOCK = ("diffusers.models.attention", "TemporalBasicTransformerBlock")
# AnimateDiff's FreeNoise block (pipe.enable_free_noise puts it in the motion modules): attention per context window.
_FREE_NOISE_BLOCK = ("diffusers.models.attention", "FreeNoiseTransformerBlock")
# pipe.enable_free_noise_split_inference wraps the UNet's attentions and motion modules in this module, which runs
# them once per chunk of its input's first dim (frames of several videos, cells of several maps): each chunk's call
# would be placed as a whole batch of its own (QA helper-181: a batch of 2 recorded as two entries of batch 1).
_SPLIT_INFERENCE = ("diffusers.pipelines.free_noise_utils", "SplitInferenceModule")
# I2VGen-XL's attention over the frames of each latent pixel of its image_latents, before conv_in.
_I2VGEN_ENCODER = ("diffusers.models.unets.unet_i2vgen_xl", "I2VGenXLTransformerTemporalEncoder")
# Processors that hand F.scaled_dot_product_attention the queries and keys as [B, heads, N, d].
_SDPA_PROCESSORS = {("diffusers.models.attention_processor", "AttnProcessor2_0"),
                    ("diffusers.models.attention_processor", "FusedAttnProcessor2_0")}
# Processors that merge batch and heads (``attn.head_to_batch_dim``: row ``b * heads + h``) and compute the
# probabilities with ``attn.get_attention_scores`` (baddbmm, then a softmax over the keys): ``AttnProcessor`` in one
# call ``[B * heads, N, N]``, ``SlicedAttnProcessor`` in consecutive slices of ``slice_size`` rows.
_MERGED_PROCESSORS = {("diffusers.models.attention_processor", "AttnProcessor"),
                      ("diffusers.models.attention_processor", "SlicedAttnProcessor")}


def _defined(module, where: tuple[str, str]) -> bool:
    """Whether ``module`` is an instance of exactly the class ``where = (defining module, class name)``."""
    cls = type(module)
    return (cls.__module__, cls.__name__) == where


def _key(module) -> tuple[str, str]:
    return type(module).__module__, type(module).__name__


def unet_key(module: nn.Module) -> tuple[str, str] | None:
    """(defining module, class name) of ``module``'s class, or of its nearest base class defined in diffusers'
    UNets or ControlNets: research code subclasses ``UNet2DConditionModel`` (DIFT's feature extractor,
    prompt-to-prompt's) and keeps its blocks, which the placers read per call; None for any other module."""
    for cls in type(module).__mro__:
        if cls.__module__.startswith(_UNET_PACKAGES):
            return cls.__module__, cls.__name__
    return None


def is_unet(module: nn.Module) -> bool:
    """Whether ``module`` is a diffusers UNet or ControlNet (its class, or a base of it, defined in diffusers' unets
    or controlnets) with ``down_blocks``."""
    return unet_key(module) is not None and hasattr(module, "down_blocks")


def unets_holding(model: nn.Module, recorded=()) -> list[nn.Module]:
    """The outermost diffusers UNets and ControlNets in ``model`` (itself included) holding ``recorded`` modules, in
    module order."""
    inside = {id(m) for m in recorded}
    holding = [m for m in module_list(model) if is_unet(m) and any(id(s) in inside for s in m.modules())]
    return [m for m in holding if not any(m is not o and any(s is m for s in o.modules()) for o in holding)]


def call_start(model: nn.Module, recorded=()) -> nn.Module | None:
    """The outermost diffusers UNet in ``model`` (itself included) holding ``recorded`` modules, or None: a forward
    call starts at its forward, before anything it runs. Its first convolution is no such start: ControlNet's first
    convolution on 3 channels is its conditioning image's, run after ``conv_in`` (whose map the placers read);
    I2VGen-XL attends over its ``image_latents``' frames before ``conv_in``; and the video UNets' ``sample`` (its
    frames) is read before ``conv_in`` runs. ``model`` itself where it holds several such UNets, or one twice."""
    outermost = unets_holding(model, recorded)
    if len(outermost) > 1:
        # Several UNets or ControlNets (a user's module running a ControlNet, then the UNet, each step; an EMA copy
        # registered first): which runs first is the forward's choice, not their order in the module tree, so the
        # model's own forward starts each call (QA helper-175: the first registered one split steps, or merged them).
        return model
    if outermost and sum(m is outermost[0] for _, m in model.named_modules(remove_duplicate=False)) > 1:
        # One ControlNet held twice (MultiControlNetModel([controlnet, controlnet]): one net per condition image, the
        # same weights) runs as two nets do, so a forward of the model holding it is one call, as for two nets.
        return model
    return outermost[0] if outermost else None


def attention_modules(model: nn.Module) -> dict[str, nn.Module]:
    """diffusers' attention modules inside a diffusers UNet, by qualified name (their forward calls a processor,
    so the generic discovery does not see them)."""
    return attention_under(model, is_unet)


def placer(model: nn.Module, name: str, module: nn.Module):
    """The placer of an ``Attention`` inside a diffusers UNet (a :class:`Skip` for cross-attention, a refusal where
    the layout is not known); None for any other module."""
    from . import Skip

    if isinstance(module, nn.MultiheadAttention) and ".transformer_layes." in f".{name}":
        union = innermost_on_path(model, name, is_unet)
        if union is not None and unet_key(union[1]) == _CONTROLNET_UNION:
            # ControlNet-Union's fuser: a token per condition image (its embedding's mean over the map, plus the
            # control type's embedding) and one of the latent's mean; no token is a cell of a map.
            return Skip("ControlNet-Union's condition fuser: it attends over one mean-pooled token per condition "
                        "image and one of the latent, none of them a cell of a map")
    if not is_attention(module):
        return None
    found = innermost_on_path(model, name, is_unet)
    if found is None:
        return None
    unet_name, unet = found
    unet_class = type(unet).__name__
    known = _PLACED_UNETS.get(unet_key(unet))
    if known is None:
        return RefusingPlacer(
            f"it is an attention layer of diffusers' {unet_class}, whose token layout vitmad does not know (it places "
            f"the self-attention of {', '.join(c for _, c in _PLACED_UNETS)}); pass positions=<[N, 2] latent-pixel "
            "position of each token> if its tokens are one feature map")
    blocks = [(f"down_blocks.{i}", b) for i, b in enumerate(unet.down_blocks)]
    blocks += [("mid_block", unet.mid_block)] if getattr(unet, "mid_block", None) is not None else []
    blocks += [(f"up_blocks.{i}", b) for i, b in enumerate(getattr(unet, "up_blocks", ()))]
    for block_name, block in blocks:
        if _key(block) not in known:
            return RefusingPlacer(
                f"{unet_class}'s {block_name} is a {type(block).__name__}, whose samplings or attention layout vitmad "
                f"does not follow (it knows {', '.join(sorted(c for _, c in known))}); pass positions=<[N, 2] "
                "latent-pixel position of each token> to place this layer by hand")
    inner = name[len(unet_name) + 1:] if unet_name else name
    split = innermost_on_path(unet, inner, lambda m: _defined(m, _SPLIT_INFERENCE))
    if split is not None:
        return RefusingPlacer(
            f"it runs inside {unet_class}'s {split[0]}, a SplitInferenceModule "
            f"(pipe.enable_free_noise_split_inference) that calls it once per chunk of {split[1].split_size} along "
            f"dim {split[1].split_dim} of its input, frames or cells of several videos, which vitmad does not join "
            "into the batch; record without split inference (FreeNoise alone, pipe.enable_free_noise, is recorded)")
    # After the blocks: a SimpleCrossAttn block's "cross-attention" appends the text's keys to the map's own.
    if getattr(module, "is_cross_attention", False):
        return Skip(f"cross-attention of {unet_class}'s feature map to its conditioning (encoder_hidden_states: the "
                    "text or an image prompt), whose keys have no position in the latent")
    conv_in = getattr(unet, "conv_in", None) or getattr(unet, "base_conv_in", None)
    if not isinstance(conv_in, nn.Conv2d) or pair(conv_in.stride) != (1, 1):
        return RefusingPlacer(f"{unet_class}'s conv_in is not a Conv2d of stride 1, so its latent grid is not known")
    holder = innermost_on_path(unet, inner, lambda m: _key(m) in _MAP_HOLDERS | _TEMPORAL_HOLDERS)
    temporal = holder is not None and _key(holder[1]) in _TEMPORAL_HOLDERS
    samplings = [(m, 2.0) for b in unet.down_blocks for m in _samplers(b, "downsamplers", "base_downsamplers")]
    samplings += [(m, 0.5) for b in getattr(unet, "up_blocks", ()) for m in _samplers(b, "upsamplers")]
    # A temporal holder's blocks attend over the frames twice (double_self_attention, and no text is passed to them:
    # checked per call). GLIGEN's fuser attends over the map and its grounding tokens; a Transformer2DModel's
    # double_self_attention attn2 takes the text.
    if holder is not None and not (name.endswith(".attn1") or temporal and name.endswith(".attn2")):
        return RefusingPlacer(f"it is an attention of {type(holder[1]).__name__} {holder[0]} other than its blocks' "
                              "attn1 (their self-attention over the map), whose tokens vitmad does not know; pass "
                              "layers=['*.attn1'] to record the self-attention alone")
    if unet_key(unet) == _SVD:
        temporal = innermost_on_path(unet, inner, lambda m: _defined(m, _TEMPORAL_BLOCK)) is not None
        if holder is None:
            return RefusingPlacer(f"it is no attention of a TransformerSpatioTemporalModel of {unet_class}, the ones "
                                  "vitmad places in it")
        return FramesMapPlacer(unet, module, holder[1], conv_in, samplings, "time" if temporal else "space")
    if unet_key(unet) in _FRAMES_IN_SAMPLE:
        if unet_key(unet) == _I2VGEN_XL and innermost_on_path(unet, inner, lambda m: _defined(m, _I2VGEN_ENCODER)):
            return ImageLatentsPlacer(unet, module)
        if holder is None:
            return RefusingPlacer(f"it is no attention of a Transformer2DModel, TransformerTemporalModel or "
                                  f"AnimateDiffTransformer3D of {unet_class}, the ones vitmad places in it")
        free_noise = innermost_on_path(unet, inner, lambda m: _defined(m, _FREE_NOISE_BLOCK)) if temporal else None
        return FramesMapPlacer(unet, module, holder[1], conv_in, samplings, "time" if temporal else "space",
                               None if free_noise is None else free_noise[1])
    return UNetMapPlacer(unet, module, module if holder is None else holder[1], conv_in, samplings)


def _samplers(block: nn.Module, *names: str) -> list[nn.Module]:
    """The block's samplings: its ``downsamplers`` / ``upsamplers`` list, or ControlNet-XS's single module (of the
    base UNet's where the control model has its own beside it)."""
    for name in names:
        found = getattr(block, name, None)
        if found is not None:
            return list(found) if isinstance(found, nn.ModuleList) else [found]
    return []


@dataclass(frozen=True)
class UNetMap:
    """The feature map the latest of the UNet's samplings made in this call: ``grid`` its ``(h, w)``, ``stride``
    latent pixels per cell."""

    grid: tuple[int, int]
    stride: tuple[float, float]


class UNetMapPlacer(LayerPlacer):
    """Self-attention over a UNet block's whole feature map, row-major, placed at its cells' centres in latent pixels.

    Args:
        unet: the UNet (named in messages).
        attention: the ``Attention`` module (its processor and its input are checked in each call).
        holder: the module whose input is the map the attention flattens: its ``Transformer2DModel`` (or temporal
            holder), or the ``Attention`` itself where it takes the map (``UNet2DModel``'s blocks).
        conv_in: the UNet's input convolution (stride 1): the latent grid.
        samplings: the down- and up-samplings of the UNet, each with its stride factor (2 or 1/2).
    """

    def __init__(self, unet: nn.Module, attention: nn.Module, holder: nn.Module | None, conv_in: nn.Module | None,
                 samplings: list[tuple[nn.Module, float]], map_argument: str = "hidden_states"):
        self.unet, self.attention, self.holder, self.conv_in, self.samplings = (unet, attention, holder, conv_in,
                                                                               samplings)
        self.map_argument = map_argument
        self.key = ("diffusers_unets.map", id(self))
        self.input_key = ("diffusers_unets.input", id(self))
        self.sample_key = ("diffusers_unets.sample", id(self))
        self.attention_key = ("diffusers_unets.attention", id(self))

    holder_word = "unet"  # (the model whose processors a refusal tells to set back)

    def map_source(self) -> nn.Module | None:
        """The module whose output starts the map this attention runs on (named where it has not run yet)."""
        return self.conv_in

    def install(self, context: CallContext) -> list[torch.utils.hooks.RemovableHandle]:
        handles = [self.conv_in.register_forward_hook(functools.partial(self.sampled, context, None))]
        handles += [m.register_forward_hook(functools.partial(self.sampled, context, f)) for m, f in self.samplings]
        handles.append(self.holder.register_forward_pre_hook(functools.partial(self.received, context),
                                                             with_kwargs=True))
        handles.append(self.unet.register_forward_hook(functools.partial(self.ended, context)))
        return handles + self.install_call_hooks(context)

    def ended(self, context: CallContext, module: nn.Module, args, output) -> None:
        """Forward hook of the network: its map ends with its forward. A block run by hand after it found the ended
        forward's last map and was placed on it, its entry joining that finished call (QA 370); it now finds none
        (unless it runs ``conv_in`` by hand first, which makes one) and is refused."""
        context.values.pop(self.key, None)

    def sampled(self, context: CallContext, factor: float | None, module: nn.Module, args, output) -> None:
        """Forward hook of ``conv_in`` (``factor`` None: the latent grid, stride 1) and of each sampling (its stride
        factor): the map of this call so far."""
        if not isinstance(output, torch.Tensor) or output.dim() != 4:
            raise RuntimeError(f"vitmad.record: a sampling ({type(module).__name__}) of "
                               f"{type(self.unet).__name__} returned no [B, C, h, w] map")
        previous = context.values.get(self.key)
        stride = (1.0, 1.0) if factor is None or previous is None else tuple(s * factor for s in previous.stride)
        context.values[self.key] = UNetMap((int(output.shape[-2]), int(output.shape[-1])), stride)

    def received(self, context: CallContext, module: nn.Module, args, kwargs) -> None:
        """Forward pre-hook of the holder: the shape of the map it was given (its ``map_argument``) and its frames."""
        arguments = forward_arguments(module, args, kwargs)
        hidden, frames = arguments.get(self.map_argument), arguments.get("image_only_indicator")
        if _key(module) in _TEMPORAL_HOLDERS:  # they view their [B * F, C, h, w] input as num_frames frames
            frames = int(arguments.get("num_frames", 1))
        elif isinstance(frames, torch.Tensor):
            frames = int(frames.shape[-1])
        context.values[self.input_key] = (tuple(hidden.shape) if isinstance(hidden, torch.Tensor) else None, frames)

    def install_call_hooks(self, context: CallContext) -> list[torch.utils.hooks.RemovableHandle]:
        """Hooks on the attention module (its batch, whether it was given keys of its own, its calls so far in this
        forward) and, for a video UNet, on the UNet (its ``sample`` ``[B, C, F, H, W]``)."""
        def attending(module, args, kwargs) -> None:
            hidden = forward_arguments(module, args, kwargs).get("hidden_states")
            context.values[self.attention_key] = _AttentionCall(
                int(hidden.shape[0]) if isinstance(hidden, torch.Tensor) else None,
                given_other_keys(module, args, kwargs))

        def sample(module, args, kwargs) -> None:
            context.values[self.sample_key] = {name: tuple(value.shape) for name, value in forward_arguments(
                module, args, kwargs).items() if isinstance(value, torch.Tensor)}

        handles = [self.attention.register_forward_pre_hook(attending, with_kwargs=True)]
        if unet_key(self.unet) in _FRAMES_IN_SAMPLE:
            handles.append(self.unet.register_forward_pre_hook(sample, with_kwargs=True))
        return handles

    def refusal_without_attention(self, module: nn.Module) -> str | None:
        # xFormers' processor, or an attention backend (flash, sage, flex), computes the attention where vitmad does
        # not look: no call reaches place().
        return self._processor_refusal() or backend_refusal(self.attention)

    def _processor(self) -> tuple[str, str]:
        return _key(getattr(self.attention, "processor", None))

    def _processor_refusal(self) -> str | None:
        processor = self._processor()
        if processor in _SDPA_PROCESSORS | _MERGED_PROCESSORS:
            return None
        return (f"its processor is {processor[1]}, which vitmad does not place (it places diffusers' "
                "AttnProcessor2_0 and FusedAttnProcessor2_0, which call F.scaled_dot_product_attention with the "
                "heads apart, and AttnProcessor and SlicedAttnProcessor, whose softmax it reads over merged batch and "
                f"heads); set it back with {self.holder_word}.set_attn_processor(AttnProcessor2_0()) while recording")

    def check_call(self, context: CallContext) -> None:
        """Refuses this call where its processor is not read or its attention was given keys of another tensor."""
        refusal = self._processor_refusal()
        if refusal is not None:
            raise NotPlaceable(refusal)
        call = context.values.get(self.attention_key)
        if call is not None and call.given_keys:
            raise NotPlaceable("it was given encoder_hidden_states, so its keys are not the map's own tokens; vitmad "
                               "places it only as self-attention over the map")

    def current_map(self, context: CallContext) -> tuple[UNetMap, tuple[int, ...], int | None]:
        """The map of this call, the shape of the holder's input and the frames it was told (``image_only_indicator``'s
        last side or ``num_frames``; else ``sample``'s frames for a video UNet; None where there are none), after
        checking the processor, that the attention took no keys of its own and that the input is that map."""
        self.check_call(context)
        current = context.values.get(self.key)
        if current is None:
            start = next((name for name, m in self.unet.named_modules() if m is self.map_source()), "conv_in")
            raise NotPlaceable(f"it ran before {type(self.unet).__name__}'s {start} made its map, or after the "
                               f"forward of {type(self.unet).__name__} ended (which ends its map), so its latent grid "
                               "is unknown")
        shape, frames = context.values.get(self.input_key, (None, None))
        if shape is None or len(shape) != 4 or tuple(shape[-2:]) != current.grid:
            raise NotPlaceable(
                f"its block's input is {list(shape) if shape else 'no tensor'}, but the samplings of "
                f"{type(self.unet).__name__} that ran in this call make a [B, C, {current.grid[0]}, "
                f"{current.grid[1]}] map; vitmad places only the attention over that map")
        if frames is None and unet_key(self.unet) in _FRAMES_IN_SAMPLE:
            frames = self.sample_frames(context, "sample")[1]
        return current, shape, frames

    def sample_frames(self, context: CallContext, argument: str) -> tuple[tuple[int, ...], int]:
        """The shape of the video UNet's ``argument`` (``sample`` or ``image_latents``, ``[B, C, F, H, W]``) in this
        call and its frames."""
        shape = context.values.get(self.sample_key, {}).get(argument)
        if shape is None or len(shape) != 5:
            raise NotPlaceable(f"{type(self.unet).__name__}'s {argument} in this call is "
                               f"{list(shape) if shape else 'no tensor'}, where vitmad reads [B, C, F, H, W]")
        return shape, shape[2]

    def place(self, context: CallContext, lead: torch.Size, num_queries: int, num_keys: int) -> Placement:
        current, shape, frames = self.current_map(context)
        if self._processor() not in _MERGED_PROCESSORS:
            return self.placement(context, current, shape, frames, lead, num_queries, num_keys)
        rows, heads, start, stop = self._merged_rows(context, lead)
        placement = self.placement(context, current, shape, frames, torch.Size([rows // heads, heads]), num_queries,
                                   num_keys)
        return _merged(placement, rows // heads, heads, start, stop)

    def _merged_rows(self, context: CallContext, lead: torch.Size) -> tuple[int, int, int, int]:
        """``(B * heads, heads, first row, end row)`` of a merged processor's call: ``AttnProcessor``'s one call
        holds every row; ``SlicedAttnProcessor``'s calls hold ``slice_size`` consecutive rows each, in order, the
        last one the rows left where ``slice_size`` does not divide them."""
        call = context.values.get(self.attention_key)
        heads = int(self.attention.heads)
        if call is None or call.batch is None:
            raise NotPlaceable("its batch was not seen before its attention ran")
        rows = call.batch * heads
        processor = self.attention.processor
        size = min(int(processor.slice_size), rows) if self._processor()[1] == "SlicedAttnProcessor" else rows
        start = call.calls * size
        stop = min(start + size, rows)
        call.calls += 1
        if len(lead) != 1 or start >= rows or lead[0] != stop - start:
            raise NotPlaceable(
                f"its attention has shape [{', '.join(map(str, lead))}, N, N] in its call {call.calls} of this "
                f"forward; its {self._processor()[1]} makes {-(-rows // size)} call(s) of [{size}, N, N] (the last "
                f"one of the rows left) over its {call.batch} x {heads} rows of batch times heads")
        return rows, heads, start, stop

    def placement(self, context: CallContext, current: UNetMap, shape: tuple[int, ...], frames: int | None,
                  lead: torch.Size, num_queries: int, num_keys: int) -> Placement:
        """The placement of a call whose attention is ``[*lead, Nq, Nk]``, ``lead`` ``[B, heads]``."""
        return grid_placement(lead, num_queries, num_keys, grid=current.grid, stride=current.stride,
                              attention="global")


@dataclass
class _AttentionCall:
    """What the attention module's current forward was given: its batch (``hidden_states``' first side), whether
    it was given keys of its own, how many attention calls it made so far, and which forward of the attention it is
    in its FreeNoise block's forward (its context window, counted from 0)."""

    batch: int | None
    given_keys: bool
    calls: int = 0
    window: int = 0


def _merged(placement: Placement, batch: int, heads: int, start: int, stop: int) -> Placement:
    """``placement`` of a ``[batch, heads]`` call, made the placement of rows ``start:stop`` of the same attention
    merged on ``[batch * heads]`` (row ``b * heads + h``, as ``head_to_batch_dim`` orders them). Its fold takes the
    per-query values of all the module's calls in this forward, joined along the rows (``Placement.rows_per_call``:
    slices of any sizes, in order)."""
    def rows(positions: torch.Tensor | None) -> torch.Tensor | None:
        if positions is None or positions.dim() <= 2:  # the same positions in every row
            return positions
        return positions.expand(batch, heads, *positions.shape[-2:]).reshape(batch * heads, *positions.shape[-2:])[
            start:stop]

    fold = placement.fold

    def merged_fold(values: torch.Tensor) -> torch.Tensor:
        return fold(values.unflatten(-2, (batch, heads)))

    return replace(placement, positions=rows(placement.positions), key_positions=rows(placement.key_positions),
                   time_positions=rows(placement.time_positions),
                   time_key_positions=rows(placement.time_key_positions), fold=merged_fold, rows_per_call=True)


@functools.lru_cache(maxsize=64)
def _frames_layout(kind: str, frames: int, grid: tuple[int, int], stride: tuple[float, float], first: int = 0,
                   end: int | None = None) -> tuple[torch.Tensor | None, ...]:
    """Where the tokens of each group of a video UNet's call are (read-only, cached per map): ``[G, n, 2]`` latent
    pixels, ``[G, n, 1]`` frames, the slot of each (frame, row, column) token of one video among the ``G * n`` of the
    call (:func:`.video.tubelet_positions`), and the tokens present (None: all). ``"space"``: one group per frame,
    its cells row-major; ``"time"``: one group per cell (row-major), its frames in order, those of ``first:end``
    alone where a FreeNoise window is given (the others' slots point past the call's, at a NaN the fold appends)."""
    end = frames if end is None else end
    cells = torch.arange(frames * grid[0] * grid[1]).view(frames, grid[0] * grid[1])
    positions, times, slot = tubelet_positions(cells[first:end] if kind == "space" else cells[first:end].t(),
                                               frames, grid, stride, 1.0)
    present = None
    if end - first < frames:
        present = torch.zeros(frames, grid[0] * grid[1], dtype=torch.bool)
        present[first:end] = True
        present = present.flatten()
        slot = torch.where(present, slot, (end - first) * grid[0] * grid[1])
        return read_only(positions, times, slot, present, positions=2)
    return (*read_only(positions, times, slot, positions=2), None)


def free_noise_windows(frames: int, length: int, stride: int) -> list[tuple[int, int]]:
    """The context windows ``(first frame, end frame)`` of AnimateDiff's FreeNoise over ``frames`` frames, in the order
    ``FreeNoiseTransformerBlock.forward`` runs them: one every ``stride`` frames while ``length`` frames fit, then one
    ending at the last frame where those did not reach it."""
    windows = [(start, start + length) for start in range(0, frames - length + 1, stride)]
    if windows and windows[-1][1] != frames:
        windows.append((frames - length, frames))
    return windows


class FramesMapPlacer(UNetMapPlacer):
    """A video UNet's attention: per frame over its block's map (``"space"``: ``[B * F, heads, h * w, h * w]``,
    videos outermost, as the UNets fold ``sample`` to ``[B * F, C, H, W]``), or per cell over the frames (``"time"``:
    Stable Video Diffusion's ``TemporalBasicTransformerBlock`` reshapes ``[B * F, h * w, C]`` to ``[B, F, h * w, C]``
    and permutes it to ``[B * h * w, F, C]``; ``TransformerTemporalModel`` and AnimateDiff's motion modules permute
    ``[B, C, F, h, w]`` to ``[B, h, w, F, C]``: both ``[B * h * w, heads, F, F]``). A token is its cell of the map, in
    latent pixels, in its latent frame, at ``f + 0.5`` frames; every call folds onto ``[B, heads, F * h * w]`` in
    (frame, row, column) order, as :mod:`.video` folds divided space-time attention.

    AnimateDiff's FreeNoise (``pipe.enable_free_noise``) makes a motion module's block a ``FreeNoiseTransformerBlock``,
    which runs its ``attn1`` and ``attn2`` once per context window (:func:`free_noise_windows`), each over that
    window's ``context_length`` frames, ``[B * h * w, heads, L, L]``: each forward is one entry of the call, its
    tokens at their frames of the video, folded onto the same ``F * h * w`` with the window's frames present
    (``Placement.present``) and NaN at the others.

    Args:
        kind: ``"space"`` or ``"time"``; the others as :class:`UNetMapPlacer`'s (``holder``: the
            ``TransformerSpatioTemporalModel``, whose ``image_only_indicator`` gives the frame count, the temporal
            holder, whose ``num_frames`` does, or the ``Transformer2DModel`` of a UNet whose ``sample`` does).
        free_noise: the ``FreeNoiseTransformerBlock`` whose attention this is, or None.
    """

    def __init__(self, unet: nn.Module, attention: nn.Module, holder: nn.Module | None, conv_in: nn.Module | None,
                 samplings: list[tuple[nn.Module, float]], kind: str, free_noise: nn.Module | None = None):
        super().__init__(unet, attention, holder, conv_in, samplings)
        self.kind, self.free_noise = kind, free_noise
        self.window_key = ("diffusers_unets.window", id(self))

    def install_call_hooks(self, context: CallContext) -> list[torch.utils.hooks.RemovableHandle]:
        """And, in a FreeNoise block, hooks that count the attention's forwards in each of the block's (its
        windows)."""
        handles = super().install_call_hooks(context)
        if self.free_noise is None:
            return handles

        def block_starts(module, args) -> None:
            context.values[self.window_key] = 0

        def window_starts(module, args) -> None:  # after install_call_hooks' own hook made this forward's record
            window = context.values.get(self.window_key, 0)
            context.values[self.attention_key].window = window
            context.values[self.window_key] = window + 1

        handles.append(self.free_noise.register_forward_pre_hook(block_starts))
        handles.append(self.attention.register_forward_pre_hook(window_starts))
        return handles

    def placement(self, context: CallContext, current: UNetMap, shape: tuple[int, ...], frames: int | None,
                  lead: torch.Size, num_queries: int, num_keys: int) -> Placement:
        if frames is None or frames < 1 or shape[0] % frames:
            raise NotPlaceable(f"its block's input is {list(shape)} and it was told of {frames} frames, which do not "
                               "divide its batch into videos")
        batch, cells = shape[0] // frames, current.grid[0] * current.grid[1]
        first, end = self._window(context, frames)
        groups, tokens = (frames, cells) if self.kind == "space" else (cells, end - first)
        if len(lead) != 2 or lead[0] != batch * groups or num_queries != tokens or num_keys != tokens:
            window = f" (FreeNoise's context window of frames {first} to {end - 1})" if end - first < frames else ""
            raise NotPlaceable(
                f"its attention has shape [{', '.join(map(str, lead))}, {num_queries}, {num_keys}]; its {self.kind} "
                f"attention over {batch} video(s) of {frames} frames of a {current.grid[0]}x{current.grid[1]} map"
                f"{window} gives [{batch * groups}, heads, {tokens}, {tokens}]")
        positions, times, slot, present = _frames_layout(self.kind, frames, current.grid, current.stride, first, end)
        heads = int(lead[1])

        def fold(values: torch.Tensor) -> torch.Tensor:
            values = values.reshape(batch, groups, heads, tokens).transpose(1, 2).reshape(batch, heads, -1)
            if present is not None:  # the window's frames; NaN at the others'
                values = torch.cat([values, values.new_full((*values.shape[:-1], 1), float("nan"))], -1)
            return values.index_select(-1, on_device(slot, values.device))

        geometry = LayerGeometry(current.grid, current.stride, self.kind, heads, frames=frames, frame_stride=1.0)
        return Placement(positions.repeat(batch, 1, 1).unsqueeze(1), None, fold, geometry, present=present,
                         time_positions=times.repeat(batch, 1, 1).unsqueeze(1))

    def _window(self, context: CallContext, frames: int) -> tuple[int, int]:
        """``(first frame, end frame)`` this call attends over: all ``frames``, or its FreeNoise block's window."""
        if self.free_noise is None or self.kind != "time":
            return 0, frames
        length, stride = int(self.free_noise.context_length), int(self.free_noise.context_stride)
        windows = free_noise_windows(frames, length, stride)
        call = context.values.get(self.attention_key)
        if call is None or call.window >= len(windows):
            raise NotPlaceable(
                f"its FreeNoiseTransformerBlock (context_length={length}, context_stride={stride}) makes "
                f"{len(windows)} context window(s) of {frames} frames, but this is its attention's forward "
                f"{'?' if call is None else call.window + 1} in the block's forward")
        return windows[call.window]


class ImageLatentsPlacer(FramesMapPlacer):
    """I2VGen-XL's ``image_latents_temporal_encoder``: before ``conv_in``, ``I2VGenXLUNet.forward`` views its
    ``image_latents`` ``[B, C, F, H, W]`` (after convolutions of stride 1) as ``[B * H * W, F, C]`` (``permute(0, 3,
    4, 1, 2)`` of ``[B, F, C, H, W]``) and attends over the frames of each latent pixel: ``"time"`` attention on the
    latent grid, stride 1."""

    def __init__(self, unet: nn.Module, attention: nn.Module):
        super().__init__(unet, attention, None, None, [], "time")

    def install(self, context: CallContext) -> list[torch.utils.hooks.RemovableHandle]:
        return self.install_call_hooks(context)

    def current_map(self, context: CallContext) -> tuple[UNetMap, tuple[int, ...], int | None]:
        self.check_call(context)
        shape, frames = self.sample_frames(context, "image_latents")
        return UNetMap(tuple(shape[-2:]), (1.0, 1.0)), (shape[0] * frames, shape[1], *shape[-2:]), frames
