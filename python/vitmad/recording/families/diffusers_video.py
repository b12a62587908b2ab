"""diffusers' video diffusion transformers: joint space-time attention over latent tubelets, text tokens beside them.

What is recorded is the transformer a video pipeline calls (``vitmad.record(pipe.transformer)``), one denoising
step per forward call (``rec.calls``). Its input is the VAE's latent video ``[B, C, F, H, W]``, so positions are in
latent pixels and latent frames: a tubelet of ``p_t`` latent frames by ``p x p`` latent pixels at (frame ``f``, row
``r``, column ``c``) of the patch grid stands at ``((r + 0.5) p, (c + 0.5) p)`` latent pixels and ``(f + 0.5) p_t``
latent frames, as :mod:`.video` places a ViViT tubelet in pixels and frames. A latent frame is the VAE's temporal
compression of video frames (4 for CogVideoX, Wan, HunyuanVideo), a latent pixel its spatial one (8): vitmad does
not guess the VAE. The grid is read from the patch embedding in every call, never from ``sample_size``.

- ``WanTransformer3DModel`` (Wan 2.1 / 2.2): ``patch_embedding`` (``Conv3d``, kernel = stride = ``patch_size``) cuts
  the latents; each block's ``attn1`` attends over the tubelets in (frame, row, column) order (``flatten(2)``), RoPE
  in the logits only. ``attn2`` is cross-attention to the text (and, image-to-video, to the CLIP image tokens, a
  second softmax in the same module): skipped.
- ``CogVideoXTransformer3DModel`` (CogVideoX 1.0 and 1.5): ``patch_embed`` projects the text, then the tubelets
  (``Conv2d`` per frame, or 1.5's ``Linear`` over ``patch_size_t`` frames), and concatenates them, text first; each
  block's ``attn1`` attends over that joint sequence: the text tokens are prefix tokens without a position, their
  count read per call from ``patch_embed``'s input.
- ``HunyuanVideoTransformer3DModel``: ``x_embedder.proj`` (``Conv3d``) cuts the latents; the dual- and
  single-stream blocks attend over the tubelets, then the refined text tokens (suffix tokens without a position,
  their count read per call from ``context_embedder``'s output; padded text keys masked by the model). The text
  token refiner's self-attention (text alone) is skipped.
- ``LTXVideoTransformer3DModel``: its pipeline packs the latents into tokens, one per latent cell (``patch_size`` and
  ``patch_size_t`` 1 in every released model; others refused), ``[B, F * H * W, C]`` in (frame, row, column) order,
  and hands the grid as ``num_frames``, ``height``, ``width``, read per call from its ``rope``'s arguments; ``attn1``
  over those tokens, ``attn2`` (text) skipped. A call given ``video_coords`` (conditioning pipelines, whose tokens
  carry coordinates of their own) is refused.
- ``AllegroTransformer3DModel``: ``pos_embed.proj`` (``Conv2d``) cuts each latent frame, ``[B * F, ...]``, then the
  frames are flattened frames outermost: ``attn1`` is joint space-time attention over the tubelets (its video
  ``attention_mask`` read as SDPA reads it), ``attn2`` (text) skipped.
- ``LatteTransformer3DModel``: ``pos_embed.proj`` cuts each latent frame; each spatial block's ``attn1`` attends
  within one frame (``[B * F, heads, H'W', H'W']``, ``"space"``), each temporal block's ``attn1`` over the frames of
  one patch position (``[B * H'W', heads, F, F]``, ``"time"``), as :mod:`.video` places TimeSformer's divided
  attention (without a class token); the caption cross-attention ``attn2`` skipped.
- Built on Wan's blocks, placed as Wan: ``SkyReelsV2Transformer3DModel`` (diffusion forcing: its causal block mask
  read as SDPA reads it), ``ChronoEditTransformer3DModel`` (its rotary embedding puts the edited frame at a later
  temporal index: logits only; the frames stand where the latent video holds them), ``WanAnimateTransformer3DModel``
  (the pose latents' tubelets added onto frames 1.., its ``face_adapter`` cross-attention to each frame's face motion
  tokens skipped) and ``WanVACETransformer3DModel``, whose ``vace_blocks`` run first, their ``attn1`` over the control
  video's tubelets (``vace_patch_embedding``, the same kernel) on the video's cells, as their rotary positions are;
  a control video of another grid, which the model pads with zeros to the video's token count, is refused.
- ``CosmosTransformer3DModel`` and ``Kandinsky5Transformer3DModel``: the patch embedding (``CosmosPatchEmbed``,
  ``visual_embeddings``: a ``Linear`` over each ``p_t x p x p`` tubelet) returns ``[B, F', H', W', D]``, flattened in
  (frame, row, column) order; Cosmos' ``attn1`` and Kandinsky 5's visual blocks' ``self_attention`` attend over it,
  their cross-attention to the text and Kandinsky 5's text blocks skipped. Kandinsky 5 given ``sparse_params``
  (NABLA: tokens reordered by 8x8 blocks, a block mask) is refused.
  ``CosmosControlNetModel`` (Cosmos Transfer 2.5): its ``patch_embed`` cuts the control latents (and
  ``patch_embed_base`` the noisy latents, added in its first block), its ``control_blocks`` are Cosmos' blocks over
  the control tubelets: placed as Cosmos'.
- ``JoyImageEditTransformer3DModel``: ``img_in`` (``Conv3d``) cuts ``[B, C, F, H, W]`` latents (or one item
  ``[B, 1, C, F, H, W]``), flattened (frame, row, column); ``JoyImageAttnProcessor`` attends over ``cat([image,
  caption])``, the caption's count that of the forward's ``encoder_hidden_states``.
  ``JoyImageEditPlusTransformer3DModel`` gets the latent cut by its pipeline, ``[B, N, C, p_t, p, p]`` in (frame,
  row, column) order on its ``shape_list``'s one ``(t, h, w)``, the caption last, padded keys masked. Reference
  images (JoyImageEdit's further items, stacked on the frames; Plus's further ``shape_list`` entries) are other
  images: refused.
- ``ConsisIDTransformer3DModel``: CogVideoX's blocks and ``patch_embed`` (text first); its face identity attention
  (``PerceiverAttention``, ``PerceiverCrossAttention``: the identity tokens' own softmax) skipped.
- ``EasyAnimateTransformer3DModel``: ``proj`` (``Conv2d``) cuts each latent frame, flattened frames outermost; its
  ``attn1`` over the text (``text_proj``), its T5 text (``text_proj_t5``), then the tubelets.
- ``HunyuanVideo15Transformer3DModel``: ``x_embedder.proj`` (``Conv3d``); its blocks' ``attn`` over the tubelets, then
  the image, ByT5 and refined text tokens (their counts read per call from ``image_embedder``,
  ``context_embedder_2`` and ``context_embedder``; each video's valid ones first, its padding masked as keys and as
  queries); the token refiner skipped.
- ``MochiTransformer3DModel``: ``patch_embed.proj`` (``Conv2d``) cuts each latent frame, flattened frames outermost;
  its processor calls SDPA once per video, ``[1, heads, n + t, n + t]``, over its tubelets then the ``t`` text tokens
  its ``attention_mask`` keeps (the padding dropped): the calls are consecutive chunks of one batch
  (:class:`PerVideoPlacer`). A batch whose videos keep text of different lengths is refused (no one layout of the
  layer's text rows); the caption's attention pooling (``MochiAttentionPool``) skipped.

- ``LTX2VideoTransformer3DModel`` (LTX-2): packed as LTX-Video (patch ``p`` by ``p_t``), the grid its forward's
  ``num_frames``, ``height``, ``width``, read by ``proj_in``'s hook; the ``video_coords`` its pipelines pass must be
  that grid's (``rope.prepare_video_coords``), else refused. ``attn1`` over the video tokens; the audio attention
  (``audio_attn1``, ``audio_attn2``), the text cross-attention and the audio-video cross-attention skipped.
- ``HunyuanVideoFramepackTransformer3DModel`` (FramePack, :class:`FramepackPlacer`): HunyuanVideo's blocks over its
  4x, 2x and clean history tubelets (``clean_x_embedder``'s kernels), then the current ones, then the image and text
  tokens; each history tubelet at its kernel's centre on the current latents' pixels (the 2x and 4x history padded
  to whole kernels by the model: on the padded grid), every frame at the index its forward was given; history
  tubelets are keys only (the current tubelets are the queries folded).
- ``MotifVideoTransformer3DModel``: ``x_embedder.proj`` (``Conv3d``); ``attn`` over the tubelets, then the image and
  text tokens; ``cross_attn`` skipped, its decoder blocks (a second token per cell) refused.
- ``Kandinsky6Transformer3DModel``: placed as Kandinsky 5 (``video_dec_block.self_attention``); its text, audio and
  audio-video attention skipped; a ``visual_rope_pos`` other than the tubelets' grid refused.
- ``AnyFlowTransformer3DModel``: placed as Wan (its ``[B, F, C, H, W]`` latents permuted for the same ``Conv3d``).

MAD is over the tubelet queries and keys only (keys without a position are never read); ``prefix_mass`` is then the
mass the tubelet queries put on the text tokens. A module whose attention processor was replaced
(``set_attn_processor``) by one vitmad does not know is refused by name at its first call: another processor may
order or mask the tokens otherwise.

Refused by name (:data:`_REFUSED`), each with its reason: the other video transformers of diffusers.
Its attention modules are recognised as the other diffusers families recognise theirs (:mod:`.diffusers_common`);
:func:`_processor_name` gives the current processor's module and class, checked at every call by :func:`_call_grid`.
"""

from __future__ import annotations

import functools
import inspect
import weakref

import torch
from torch import nn

from ...ops.arguments import index_int
from ..module_index import named_module_list
from ..placement import (
    CallContext,
    LayerGeometry,
    LayerPlacer,
    NotPlaceable,
    Placement,
    RefusingPlacer,
    cell_centres,
    on_device,
    read_only,
)
from .diffusers_common import backend_refusal, is_attention
from .video import _Grid, tubelet_positions

__all__ = ["placer", "attention_modules"]

_LIBRARY = "diffusers."
_WAN = ("diffusers.models.transformers.transformer_wan", "WanTransformer3DModel")
_COGVIDEOX = ("diffusers.models.transformers.cogvideox_transformer_3d", "CogVideoXTransformer3DModel")
_HUNYUAN = ("diffusers.models.transformers.transformer_hunyuan_video", "HunyuanVideoTransformer3DModel")
_LATTE = ("diffusers.models.transformers.latte_transformer_3d", "LatteTransformer3DModel")
_LTX = ("diffusers.models.transformers.transformer_ltx", "LTXVideoTransformer3DModel")
_ALLEGRO = ("diffusers.models.transformers.transformer_allegro", "AllegroTransformer3DModel")
_SKYREELS = ("diffusers.models.transformers.transformer_skyreels_v2", "SkyReelsV2Transformer3DModel")
_CHRONOEDIT = ("diffusers.models.transformers.transformer_chronoedit", "ChronoEditTransformer3DModel")
_WAN_VACE = ("diffusers.models.transformers.transformer_wan_vace", "WanVACETransformer3DModel")
_WAN_ANIMATE = ("diffusers.models.transformers.transformer_wan_animate", "WanAnimateTransformer3DModel")
_COSMOS = ("diffusers.models.transformers.transformer_cosmos", "CosmosTransformer3DModel")
_KANDINSKY5 = ("diffusers.models.transformers.transformer_kandinsky", "Kandinsky5Transformer3DModel")
_CONSISID = ("diffusers.models.transformers.consisid_transformer_3d", "ConsisIDTransformer3DModel")
_EASYANIMATE = ("diffusers.models.transformers.transformer_easyanimate", "EasyAnimateTransformer3DModel")
_HUNYUAN15 = ("diffusers.models.transformers.transformer_hunyuan_video15", "HunyuanVideo15Transformer3DModel")
_MOCHI = ("diffusers.models.transformers.transformer_mochi", "MochiTransformer3DModel")
_LTX2 = ("diffusers.models.transformers.transformer_ltx2", "LTX2VideoTransformer3DModel")
_FRAMEPACK = ("diffusers.models.transformers.transformer_hunyuan_video_framepack",
              "HunyuanVideoFramepackTransformer3DModel")
_MOTIF = ("diffusers.models.transformers.transformer_motif_video", "MotifVideoTransformer3DModel")
_KANDINSKY6 = ("diffusers.models.transformers.transformer_kandinsky6", "Kandinsky6Transformer3DModel")
_ANYFLOW = ("diffusers.models.transformers.transformer_anyflow", "AnyFlowTransformer3DModel")
_COSMOS_CONTROLNET = ("diffusers.models.controlnets.controlnet_cosmos", "CosmosControlNetModel")
_JOY = ("diffusers.models.transformers.transformer_joyimage", "JoyImageEditTransformer3DModel")
_JOY_PLUS = ("diffusers.models.transformers.transformer_joyimage_edit_plus", "JoyImageEditPlusTransformer3DModel")
# Mochi's attention module: no Attention, no AttentionModuleMixin, its forward hands the attention to its processor.
_MOCHI_ATTENTION = ("diffusers.models.attention_processor", "MochiAttention")
# Wan and the models built on its blocks: self-attention attn1 over the tubelets a Conv3d patch_embedding cuts,
# cross-attention attn2 to the text (and CLIP image tokens).
_WAN_LIKE = (_WAN, _SKYREELS, _CHRONOEDIT, _WAN_VACE, _WAN_ANIMATE, _ANYFLOW)
# The processor each placed attention module must run (module, class): another one may order the tokens otherwise.
_PROCESSORS = {
    _WAN: ("diffusers.models.transformers.transformer_wan", "WanAttnProcessor"),
    _COGVIDEOX: ("diffusers.models.attention_processor", "CogVideoXAttnProcessor2_0"),
    _HUNYUAN: ("diffusers.models.transformers.transformer_hunyuan_video", "HunyuanVideoAttnProcessor2_0"),
    _LATTE: ("diffusers.models.attention_processor", "AttnProcessor2_0"),
    _LTX: ("diffusers.models.transformers.transformer_ltx", "LTXVideoAttnProcessor"),
    _ALLEGRO: ("diffusers.models.attention_processor", "AllegroAttnProcessor2_0"),
    _SKYREELS: ("diffusers.models.transformers.transformer_skyreels_v2", "SkyReelsV2AttnProcessor"),
    _CHRONOEDIT: ("diffusers.models.transformers.transformer_chronoedit", "WanAttnProcessor"),
    _WAN_VACE: ("diffusers.models.transformers.transformer_wan", "WanAttnProcessor"),
    _WAN_ANIMATE: ("diffusers.models.transformers.transformer_wan_animate", "WanAttnProcessor"),
    _COSMOS: ("diffusers.models.transformers.transformer_cosmos", "CosmosAttnProcessor2_0"),
    _COSMOS_CONTROLNET: ("diffusers.models.transformers.transformer_cosmos", "CosmosAttnProcessor2_0"),
    _KANDINSKY5: ("diffusers.models.transformers.transformer_kandinsky", "Kandinsky5AttnProcessor"),
    _CONSISID: ("diffusers.models.attention_processor", "CogVideoXAttnProcessor2_0"),
    _EASYANIMATE: ("diffusers.models.transformers.transformer_easyanimate", "EasyAnimateAttnProcessor2_0"),
    _HUNYUAN15: ("diffusers.models.transformers.transformer_hunyuan_video15", "HunyuanVideo15AttnProcessor2_0"),
    _MOCHI: ("diffusers.models.attention_processor", "MochiAttnProcessor2_0"),
    # LTX-2 with perturbed_attn (LTX2PerturbedAttnProcessor: spatio-temporal guidance may replace a video's attention
    # by its values, no attention call then) runs another processor: refused by name.
    _LTX2: ("diffusers.models.transformers.transformer_ltx2", "LTX2AudioVideoAttnProcessor"),
    _FRAMEPACK: ("diffusers.models.transformers.transformer_hunyuan_video", "HunyuanVideoAttnProcessor2_0"),
    _MOTIF: ("diffusers.models.transformers.transformer_motif_video", "MotifVideoAttnProcessor2_0"),
    _KANDINSKY6: ("diffusers.models.transformers.transformer_kandinsky6", "Kandinsky6AttnProcessor"),
    _ANYFLOW: ("diffusers.models.transformers.transformer_anyflow", "AnyFlowAttnProcessor"),
    _JOY: ("diffusers.models.transformers.transformer_joyimage", "JoyImageAttnProcessor"),
    _JOY_PLUS: ("diffusers.models.transformers.transformer_joyimage_edit_plus", "JoyImageEditPlusAttnProcessor"),
}
# Video transformers of diffusers not placed here, by class name -> why.
_REFUSED = {
    "Cosmos3OmniTransformer": "Cosmos 3 packs text, vision, sound and action tokens into one sequence by index "
                              "(vision_sequence_indexes and the like), each vision clip of a shape of its own "
                              "(vision_token_shapes), through mixture-of-transformers layers; that packing is not read "
                              "here",
    "WanAnimate2Transformer3DModel": "Wan-Animate 2's generation pass attends over the current tubelets and a KV "
                                     "cache of reference tokens (kv_cache_mode 'extract' / 'cached'), keys vitmad "
                                     "does not place",
    "SanaVideoTransformer3DModel": "Sana-Video's linear attention has no softmax map",
    "SanaWMTransformer3DModel": "Sana-WM's blocks are gated delta-rule linear attention (no softmax map) beside "
                                "softmax blocks conditioned on camera poses (UCPE), whose sequence is not read here",
    "SanaWMLTX2RefinerTransformer3DModel": "Sana-WM's LTX-2 refiner is chunk-causal and autoregressive: each chunk's "
                                           "self-attention runs against a sliding-window KV cache of the attention "
                                           "sink and earlier refined chunks, keys from other calls that vitmad does "
                                           "not place",
    "Kandinsky6SRTransformer3DModel": "Kandinsky 6's super-resolution blocks always attend through NABLA's sparse "
                                      "block mask on diffusers' flex backend (no F.scaled_dot_product_attention), "
                                      "where vitmad does not see the attention",
    "AnyFlowFARTransformer3DModel": "AnyFlow FAR's causal self-attention runs only on diffusers' flex backend with a "
                                    "BlockMask and a KV cache across calls (AnyFlowCausalAttnProcessor), where vitmad "
                                    "does not see the attention; causal attention is no vision transformer's "
                                    "bidirectional attention either",
    "HeliosTransformer3DModel": "Helios puts short, mid and long history latents (patch_short, patch_mid, "
                                "patch_long) before the current tubelets, its rotary grid the short history's, which "
                                "its pyramid pipeline keeps at full size while the current latents are denoised at a "
                                "smaller one: two scales of one video whose alignment vitmad does not read",
    "MiniMaxH3Transformer3DModel": "MiniMax-H3 scatters its video rows (conditioning and target, patchified) into one "
                                   "packed sequence with the text and audio rows (video_indices), their (t, h, w) "
                                   "only in the rotary position_ids: that packing is not read here",
}
_GRID_KEY = "diffusers_video.grid"  # + the model's id: its _Grid this call, or why it is unknown
_TEXT_KEY = "diffusers_video.text"  # + the model's id: text tokens beside the tubelets this call


def _key(module: nn.Module) -> tuple[str, str]:
    return type(module).__module__, type(module).__name__


def _processor_name(module: nn.Module) -> tuple[str, str]:
    """(defining module, class name) of a diffusers attention module's current processor."""
    processor = getattr(module, "processor", None)
    return type(processor).__module__, type(processor).__name__


def _video_model(model: nn.Module, name: str) -> tuple[nn.Module, str] | None:
    """The outermost diffusers video transformer (placed or refused) on the path to module ``name``, and its
    qualified name; None when there is none."""
    path, parts = [("", model)], name.split(".") if name else []
    for i in range(len(parts)):
        sub = ".".join(parts[:i + 1])
        path.append((sub, model.get_submodule(sub)))
    for sub, module in path:
        if type(module).__module__.startswith(_LIBRARY) and (
                _key(module) in _PROCESSORS or type(module).__name__ in _REFUSED):
            return module, sub
    return None


def attention_modules(model: nn.Module) -> dict[str, nn.Module]:
    """diffusers' attention modules inside a video transformer this family places or refuses (their forward hands
    the attention to a processor, so no ``scaled_dot_product_attention(`` is in it); one inside another is left to
    the outer one. Image transformers and UNets are not claimed here."""
    found = {}
    for name, module in named_module_list(model):
        if (is_attention(module) or _key(module) == _MOCHI_ATTENTION) and not any(
                name.startswith(outer + ".") for outer in found):
            if _video_model(model, name) is not None:
                found[name] = module
    return found


class _LatentGrid:
    """The hooks on one video transformer that put each call's tubelet grid (:class:`~.video._Grid`, in latent
    pixels and latent frames) and its text token count in the context, shared by the model's layers.

    Args:
        model: the video transformer.
        kind: its ``(module, class)`` key (:data:`_PROCESSORS`).
    """

    def __init__(self, model: nn.Module, kind: tuple[str, str]):
        self.model, self.kind = model, kind
        self.grid_key, self.text_key = f"{_GRID_KEY}.{id(model)}", f"{_TEXT_KEY}.{id(model)}"
        self._installed: tuple[CallContext, torch.utils.hooks.RemovableHandle] | None = None
        # Latte, Allegro: (B, F) of the latent video the forward took last, until the per-frame convolution reads it.
        # Not in the context's values: the call starts at that convolution (towers.first_convolution), which clears
        # them.
        self._video_shape: tuple[int, int] | None = None
        # Kandinsky 5: whether its forward was given sparse_params, until its visual embedding reads it; Kandinsky 6:
        # why its visual_rope_pos is refused, or None.
        self._sparse: bool | str | None = False
        # LTX-2, FramePack: the arguments of the forward that ran last, until the input projection reads them.
        self._forward_arguments: dict | None = None
        self.control_key = f"{_GRID_KEY}.control.{id(model)}"
        self.history_key = f"{_GRID_KEY}.history.{id(model)}"  # FramePack: its history tokens this call

    def install(self, context: CallContext) -> list[torch.utils.hooks.RemovableHandle]:
        installed = self._installed
        # Every layer's placer shares these hooks: one set per recording (LTX's is a pre-hook). A recording entered
        # again installs them again (its exit removed them).
        hooked = self._hooked()
        if installed is not None and installed[0] is context and (
                installed[1].id in hooked._forward_hooks or installed[1].id in hooked._forward_pre_hooks):
            return []
        # Each hook writes the context of the recording that installed it (bound with partial).
        model = self.model
        if self.kind in (_COGVIDEOX, _CONSISID):
            handles = [model.patch_embed.register_forward_hook(functools.partial(self._cogvideox, context),
                                                                with_kwargs=True)]
        elif self.kind == _LTX:
            handles = [model.rope.register_forward_pre_hook(functools.partial(self._ltx, context), with_kwargs=True)]
        elif self.kind in (_LATTE, _ALLEGRO, _EASYANIMATE, _MOCHI):
            handles = [self._hooked().register_forward_hook(functools.partial(self._per_frame, context)),
                       model.register_forward_pre_hook(self._video, with_kwargs=True)]
            if self.kind == _EASYANIMATE:
                # Its text, then its T5 text (where given), go before the tubelets.
                handles.extend(embedder.register_forward_hook(functools.partial(self._more_text, context))
                               for embedder in (model.text_proj, model.text_proj_t5) if embedder is not None)
        elif self.kind in (_JOY, _JOY_PLUS):
            handles = [self._hooked().register_forward_hook(functools.partial(self._joy, context)),
                       model.register_forward_pre_hook(self._arguments, with_kwargs=True)]
        elif self.kind in (_COSMOS, _COSMOS_CONTROLNET, _KANDINSKY5, _KANDINSKY6):
            handles = [self._hooked().register_forward_hook(functools.partial(self._channels_last, context))]
            if self.kind == _KANDINSKY5:
                handles.append(model.register_forward_pre_hook(self._kandinsky5_call, with_kwargs=True))
            elif self.kind == _KANDINSKY6:
                handles.append(model.register_forward_pre_hook(self._kandinsky6_call, with_kwargs=True))
        elif self.kind == _LTX2:
            handles = [self._hooked().register_forward_hook(functools.partial(self._ltx2, context)),
                       model.register_forward_pre_hook(self._arguments, with_kwargs=True)]
        elif self.kind == _FRAMEPACK:
            handles = [self._hooked().register_forward_hook(functools.partial(self._framepack, context)),
                       model.register_forward_pre_hook(self._arguments, with_kwargs=True),
                       model.context_embedder.register_forward_hook(functools.partial(self._more_text, context))]
            if model.image_projection is not None:
                handles.append(model.image_projection.register_forward_hook(
                    functools.partial(self._more_text, context)))
        else:
            handles = [self._hooked().register_forward_hook(functools.partial(self._conv3d, context))]
            if self.kind == _HUNYUAN:
                handles.append(model.context_embedder.register_forward_hook(
                    functools.partial(self._refined_text, context)))
            elif self.kind == _HUNYUAN15:
                # After the tubelets: the image tokens, the ByT5 tokens and the refined text tokens (each video's
                # valid ones first, its padding after them, masked).
                handles.extend(embedder.register_forward_hook(functools.partial(self._more_text, context))
                               for embedder in (model.context_embedder, model.context_embedder_2,
                                                model.image_embedder))
            elif self.kind == _WAN_VACE:
                handles.append(model.vace_patch_embedding.register_forward_hook(
                    functools.partial(self._control, context)))
            elif self.kind == _MOTIF:
                # After the tubelets: the image tokens (where given), then the text tokens.
                handles.extend(embedder.register_forward_hook(functools.partial(self._more_text, context))
                               for embedder in (model.context_embedder, getattr(model, "image_embedder", None))
                               if embedder is not None)
        self._installed = (context, handles[0])
        return handles

    def _hooked(self) -> nn.Module:
        if self.kind in (_COGVIDEOX, _CONSISID):
            return self.model.patch_embed
        if self.kind in (_LATTE, _ALLEGRO):
            return self.model.pos_embed.proj
        if self.kind == _MOCHI:
            return self.model.patch_embed.proj
        if self.kind == _EASYANIMATE:
            return self.model.proj
        if self.kind == _LTX:
            return self.model.rope
        if self.kind in (_COSMOS, _COSMOS_CONTROLNET):
            return self.model.patch_embed  # the ControlNet's: the control latents' (its blocks attend over them)
        if self.kind in (_JOY, _JOY_PLUS):
            return self.model.img_in
        if self.kind in (_KANDINSKY5, _KANDINSKY6):
            return self.model.visual_embeddings
        if self.kind == _LTX2:
            return self.model.proj_in
        return self.model.patch_embedding if self.kind in _WAN_LIKE else self.model.x_embedder.proj

    def _conv3d(self, context: CallContext, module, args, output) -> None:
        """The ``patch_embedding`` of Wan and the models on its blocks, HunyuanVideo's (1.0, 1.5)
        ``x_embedder.proj``: ``[B, C, F', H', W']`` tubelets."""
        kernel, stride = tuple(module.kernel_size), tuple(module.stride)
        if kernel != stride:
            context.values[self.grid_key] = (f"its patch embedding has kernel {list(kernel)} and stride "
                                             f"{list(stride)}; vitmad places tubelets of a kernel equal to its stride")
            return
        context.values[self.grid_key] = _Grid(int(output.shape[0]), int(output.shape[2]),
                                              (int(output.shape[3]), int(output.shape[4])),
                                              (float(kernel[1]), float(kernel[2])), int(kernel[0]))
        context.values[self.text_key] = 0

    def _ltx(self, context: CallContext, module, args, kwargs) -> None:
        """LTX-Video's ``rope(hidden_states, num_frames, height, width, ..., video_coords)``: the latents come packed,
        ``[B, F * H * W, C]`` in (frame, row, column) order (its pipeline's ``_pack_latents``), the grid given only
        as these numbers."""
        names = ("hidden_states", "num_frames", "height", "width", "rope_interpolation_scale", "video_coords")
        bound = dict(zip(names, args)) | kwargs
        tokens = bound.get("hidden_states")
        # An int of any kind (a 0-d tensor, NumPy's): the model itself takes them (QA helper-169).
        given = [index_int(bound.get(n)) for n in ("num_frames", "height", "width")]
        config = self.model.config
        refusal = None
        if bound.get("video_coords") is not None:
            refusal = ("it was given video_coords (LTX's conditioning pipelines: conditioning tokens at coordinates "
                       "of their own), not the grid num_frames x height x width, which is what vitmad places")
        elif (config.patch_size, config.patch_size_t) != (1, 1):
            refusal = (f"patch_size {config.patch_size} and patch_size_t {config.patch_size_t}: vitmad places the "
                       "packing of every released LTX-Video model, one token per latent cell (1 and 1)")
        elif any(n is None for n in given) or not isinstance(tokens, torch.Tensor) or (
                tokens.dim() != 3 or int(tokens.shape[1]) != given[0] * given[1] * given[2]):
            shape = list(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
            refusal = (f"it took hidden_states {shape} with num_frames, height, width = {given}: not [B, F * H * W, "
                       "C] latents packed on that grid")
        if refusal is not None:
            context.values[self.grid_key] = refusal
            return
        context.values[self.grid_key] = _Grid(int(tokens.shape[0]), given[0], (given[1], given[2]), (1.0, 1.0), 1)

    def _video(self, module, args, kwargs) -> None:
        """Latte's, Allegro's, EasyAnimate's and Mochi's forward: the latents ``[B, C, F, H, W]`` it folds into
        ``B * F`` images."""
        video = args[0] if args else kwargs.get("hidden_states")
        self._video_shape = (int(video.shape[0]), int(video.shape[2])) if isinstance(video, torch.Tensor) else None

    def _per_frame(self, context: CallContext, module, args, output) -> None:
        """Latte's and Allegro's ``pos_embed.proj``: every latent frame a ``[D, H', W']`` patch map, ``[B * F, D,
        H', W']`` (Allegro then flattens them to ``[B, F * H' * W', D]``, frames outermost)."""
        video, self._video_shape = self._video_shape, None
        kernel, stride = tuple(module.kernel_size), tuple(module.stride)
        if self.kind == _ALLEGRO and self.model.config.patch_size_t != 1:
            # Its forward divides the frames by patch_size_t for the output, but embeds and attends every frame.
            context.values[self.grid_key] = (f"its patch_size_t is {self.model.config.patch_size_t}; its patch "
                                             "embedding cuts every latent frame (patch_size_t 1, as released)")
            return
        if video is None or int(output.shape[0]) != video[0] * video[1] or kernel != stride:
            context.values[self.grid_key] = (
                f"its patch embedding (kernel {list(kernel)}, stride {list(stride)}) returned {list(output.shape)} "
                f"outside a forward of {type(self.model).__name__} over [B, C, F, H, W] latents, or not one map per "
                "latent frame of a kernel equal to its stride")
            return
        context.values[self.grid_key] = _Grid(video[0], video[1], (int(output.shape[2]), int(output.shape[3])),
                                              (float(kernel[0]), float(kernel[1])), 1)

    def _channels_last(self, context: CallContext, module, args, output) -> None:
        """Cosmos' ``patch_embed``, Kandinsky 5's ``visual_embeddings``: each tubelet of ``patch_size`` (frames,
        rows, columns) a token, ``[B, F', H', W', D]``, then flattened in (frame, row, column) order (Kandinsky 5
        without its sparse attention's block order)."""
        sparse, self._sparse = self._sparse, False
        if isinstance(sparse, str):
            context.values[self.grid_key] = sparse
            return
        if sparse:
            context.values[self.grid_key] = (
                "it was given sparse_params (NABLA sparse attention): its tokens then attend through a block mask "
                "(and, with to_fractal, in the order of 8x8 blocks), which vitmad does not place; record it without "
                "sparse_params")
            return
        patch = tuple(int(p) for p in module.patch_size)
        if output.dim() != 5 or len(patch) != 3:
            context.values[self.grid_key] = (f"its patch embedding returned {list(output.shape)} for patch_size "
                                             f"{list(patch)}, not the [B, F', H', W', D] tubelets of (t, h, w) patches")
            return
        context.values[self.grid_key] = _Grid(int(output.shape[0]), int(output.shape[1]),
                                              (int(output.shape[2]), int(output.shape[3])),
                                              (float(patch[1]), float(patch[2])), patch[0])
        context.values[self.text_key] = 0

    def _kandinsky6_call(self, module, args, kwargs) -> None:
        """Kandinsky 6's forward: why its ``visual_rope_pos`` (positional: the sixth argument) is refused, or None
        when it is not given or is the tubelets' own grid (what its forward builds without it)."""
        bound = _bound(module, args, kwargs)
        given, video = bound.get("visual_rope_pos"), bound.get("hidden_states")
        self._sparse = None
        if given is None or not isinstance(video, torch.Tensor) or video.dim() != 5:
            return
        patch = tuple(int(p) for p in self.model.visual_embeddings.patch_size)
        sizes = [int(video.shape[1 + axis]) // patch[axis] for axis in range(3)]
        if not (len(given) == 3 and all(isinstance(axis, torch.Tensor) and axis.dim() == 1 and axis.numel() == size
                                        and bool((axis.cpu() == torch.arange(size)).all())
                                        for axis, size in zip(given, sizes))):
            # Its image-to-video pipeline appends the clean reference frame as a last latent frame at rotary time 0.
            self._sparse = (
                f"it was given visual_rope_pos whose (t, h, w) indices are not the {sizes[0]}x{sizes[1]}x{sizes[2]} "
                "tubelets' own grid (Kandinsky 6's image-to-video pipeline appends the clean reference frame as a "
                "last latent frame at rotary time 0): a frame the latent video and the rotary positions put at two "
                "times, which vitmad does not place; record a call without visual_rope_pos (text-to-video)")

    def _arguments(self, module, args, kwargs) -> None:
        """LTX-2's and FramePack's forward: its arguments, read by the input projection's hook."""
        self._forward_arguments = _bound(module, args, kwargs)

    def _joy(self, context: CallContext, module, args, output) -> None:
        """JoyImage's ``img_in`` (``Conv3d``, kernel = stride = ``patch_size``) and the text tokens its processors put
        after the image's (``cat([img, txt])``), as many as its forward's ``encoder_hidden_states`` (a per-token
        projection). JoyImageEdit cuts ``[B, C, F, H, W]`` latents, or ``[B, n, C, F, H, W]`` items stacked on the
        frames; JoyImageEditPlus gets them cut by its pipeline, ``[B, N, C, p_t, p, p]`` in (frame, row, column)
        order of each item of its ``shape_list``. One item (the latent) is placed: a second is a reference image."""
        bound, self._forward_arguments = self._forward_arguments or {}, None
        latent, text = bound.get("hidden_states"), bound.get("encoder_hidden_states")
        if self.kind == _JOY:
            if isinstance(latent, torch.Tensor) and latent.dim() == 6 and int(latent.shape[1]) > 1:
                context.values[self.grid_key] = (
                    f"its hidden_states hold {int(latent.shape[1])} items ([B, n, C, F, H, W]): JoyImageEditPipeline's "
                    "reference images and the latent, stacked on the frame axis (the latent moved first), tokens of "
                    "other images rather than frames of one video; vitmad places one latent's tokens; record a call "
                    "without reference images")
                return
            self._conv3d(context, module, args, output)
        else:
            context.values[self.grid_key] = _joy_plus_grid(latent, bound.get("shape_list"), module)
        context.values[self.text_key] = int(text.shape[1]) if isinstance(text, torch.Tensor) else 0

    def _ltx2(self, context: CallContext, module, args, output) -> None:
        """LTX-2's ``proj_in`` over the video latents its pipeline packs (``_pack_latents``): ``[B, F' * H' * W',
        C p_t p p]`` in (frame, row, column) order, the latent grid given as ``num_frames``, ``height``, ``width``;
        ``video_coords``, which its pipelines always pass, must be that grid's (``rope.prepare_video_coords``)."""
        bound, self._forward_arguments = self._forward_arguments or {}, None
        tokens, coords = bound.get("hidden_states"), bound.get("video_coords")
        given = [index_int(bound.get(n)) for n in ("num_frames", "height", "width")]
        p, p_t = int(self.model.config.patch_size), int(self.model.config.patch_size_t)
        if any(n is None for n in given) or not isinstance(tokens, torch.Tensor) or tokens.dim() != 3 or (
                given[0] % p_t or given[1] % p or given[2] % p) or (
                int(tokens.shape[1]) != given[0] * given[1] * given[2] // (p_t * p * p)):
            shape = list(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
            context.values[self.grid_key] = (
                f"it took hidden_states {shape} with num_frames, height, width = {given} (patch_size {p}, "
                f"patch_size_t {p_t}): not [B, F' * H' * W', C] video latents packed on that grid")
            return
        if coords is not None:
            expected = self.model.rope.prepare_video_coords(int(tokens.shape[0]), *given, coords.device,
                                                            fps=bound.get("fps", 24.0))
            if coords.shape != expected.shape or not torch.equal(coords, expected.to(coords.dtype)):
                context.values[self.grid_key] = (
                    f"it was given video_coords {list(coords.shape)} that are not the {given[0]}x{given[1]}x"
                    f"{given[2]} latent grid's at fps {bound.get('fps', 24.0)} (rope.prepare_video_coords; LTX-2's "
                    "conditioning pipelines append keyframe tokens at coordinates of their own): vitmad places the "
                    "plain grid only")
                return
        context.values[self.grid_key] = _Grid(int(tokens.shape[0]), given[0] // p_t, (given[1] // p, given[2] // p),
                                              (float(p), float(p)), p_t)

    def _framepack(self, context: CallContext, module, args, output) -> None:
        """FramePack's ``x_embedder.proj`` (``Conv3d``): the current tubelets; with them the clean history its
        forward puts before them (``_pack_history_states``: the 4x, then the 2x history latents, then the clean
        ones, each cut by its own ``clean_x_embedder`` kernel, (4, 8, 8), (2, 4, 4), (1, 2, 2)), every frame at the
        time its frame indices give, the history on the current latents' pixels (its rotary positions are the
        current grid's, average-pooled over each kernel). The model pads the 2x and 4x history to whole kernels
        (``_pad_for_3d_conv``: the last frame, row and column repeated at the end of each axis), so their tubelets
        are the cells of the padded grid, ``ceil`` of each side over the kernel; the clean latents go to their
        ``Conv3d`` unpadded (``floor``, as the current ones)."""
        bound, self._forward_arguments = self._forward_arguments or {}, None
        self._conv3d(context, module, args, output)
        grid = context.values.get(self.grid_key)
        if isinstance(grid, str):
            return
        refusal = None
        if grid.frame_stride != 1:
            refusal = (f"its patch embedding has a temporal kernel of {grid.frame_stride} latent frames: FramePack "
                       "gives one frame index per latent frame (patch_size_t 1, as released)")
        segments = []
        parts = (("latents_history_4x", "proj_4x", True), ("latents_history_2x", "proj_2x", True),
                 ("latents_clean", "proj", False))
        for name, conv, padded in (() if refusal else parts):
            history, indices = bound.get(name), bound.get(f"indices_{name}")
            if history is None or indices is None:
                continue  # the forward then fails on its own: it packs all three
            kernel = tuple(int(k) for k in getattr(self.model.clean_x_embedder, conv).kernel_size)
            refusal = _history_refusal(name, history, indices, kernel)
            if refusal is not None:
                break
            cells = [-(-int(n) // k) if padded else int(n) // k for n, k in zip(history.shape[2:], kernel)]
            # A tubelet's frames are consecutive, a padded kernel's repeats continuing them: it stands at the
            # middle of its kernel.
            starts = indices.reshape(-1).double().cpu()[::kernel[0]]
            segments.append((cells[0], (cells[1], cells[2]), (float(kernel[1]), float(kernel[2])),
                             tuple(float(t) + kernel[0] / 2 for t in starts)))
        current = bound.get("indices_latents")
        if refusal is None and not (isinstance(current, torch.Tensor) and current.dim() == 1
                                    and current.numel() == grid.frames):
            shape = list(current.shape) if isinstance(current, torch.Tensor) else current
            refusal = (f"its indices_latents ({shape}) are not one frame index per each of the {grid.frames} latent "
                       "frames")
        if refusal is not None:
            context.values[self.grid_key] = refusal
            return
        segments.append((grid.frames, grid.size, grid.stride,
                         tuple(float(t) + 0.5 for t in current.double().cpu().tolist())))
        mask = bound.get("encoder_attention_mask")
        # A single video's caption is cut to its valid tokens (no mask then); a batch keeps them all, masked.
        dropped = int(mask.shape[1]) - int(mask.sum()) if grid.batch == 1 and isinstance(mask, torch.Tensor) else 0
        context.values[self.history_key] = (tuple(segments), dropped)

    def _kandinsky5_call(self, module, args, kwargs) -> None:
        """Kandinsky 5's forward: whether it was given ``sparse_params`` (positional: the eighth argument)."""
        given = kwargs.get("sparse_params", args[7] if len(args) > 7 else None)
        self._sparse = given is not None

    def _control(self, context: CallContext, module, args, output) -> None:
        """Wan-VACE's ``vace_patch_embedding``: the control tubelets ``[B, D, F', H', W']`` its VACE blocks attend
        over, padded with zeros to the video's token count."""
        context.values[self.control_key] = tuple(int(n) for n in (output.shape[0], *output.shape[2:]))

    def _more_text(self, context: CallContext, module, args, output) -> None:
        """A text or image embedder whose tokens join the others beside the tubelets (``[B, L, D]``)."""
        context.values[self.text_key] = int(context.values.get(self.text_key, 0)) + int(output.shape[1])

    def _refined_text(self, context: CallContext, module, args, output) -> None:
        """HunyuanVideo's ``context_embedder``: the text tokens its blocks put after the tubelets."""
        context.values[self.text_key] = int(output.shape[1])

    def _cogvideox(self, context: CallContext, module, args, kwargs, output) -> None:
        """CogVideoX's ``patch_embed(text_embeds, image_embeds)``: text, then the tubelets of ``[B, F, C, H, W]``."""
        bound = dict(zip(("text_embeds", "image_embeds"), args)) | kwargs
        text, video = bound.get("text_embeds"), bound.get("image_embeds")
        p, p_t = int(module.patch_size), module.patch_size_t
        frames = int(video.shape[1]) // (p_t or 1)
        size = (int(video.shape[3]) // p, int(video.shape[4]) // p)
        tokens = int(text.shape[1]) + frames * size[0] * size[1]
        if tuple(output.shape[:2]) != (int(video.shape[0]), tokens):
            context.values[self.grid_key] = (
                f"patch_embed returned {list(output.shape)} for text {list(text.shape)} and latents "
                f"{list(video.shape)}, not the [{int(video.shape[0])}, {tokens}, C] of the text then "
                f"{frames}x{size[0]}x{size[1]} tubelets")
            return
        context.values[self.grid_key] = _Grid(int(video.shape[0]), frames, size, (float(p), float(p)), int(p_t or 1))
        context.values[self.text_key] = int(text.shape[1])


def _joy_plus_grid(latent, shapes, conv: nn.Conv3d) -> _Grid | str:
    """The tubelet grid of a ``JoyImageEditPlusTransformer3DModel`` call from its ``hidden_states`` ``[B, N, C, p_t,
    p, p]`` and ``shape_list`` (per batch entry, the ``(t, h, w)`` of each item), where every entry holds one item,
    all of one size, whose tubelets fill the ``N`` tokens; else the reason (a string)."""
    entries = list(shapes) if isinstance(shapes, (list, tuple)) else []
    found = {tuple(int(n) for n in items[0]) for items in entries if len(items) == 1 and len(items[0]) == 3}
    patch = tuple(int(n) for n in conv.kernel_size)
    if isinstance(latent, torch.Tensor) and latent.dim() == 6 and len(found) == 1 and len(entries) == latent.shape[0] \
            and all(len(items) == 1 for items in entries) and tuple(conv.stride) == patch:
        frames, rows, columns = found.pop()
        if int(latent.shape[1]) == frames * rows * columns:
            return _Grid(int(latent.shape[0]), frames, (rows, columns), (float(patch[1]), float(patch[2])), patch[0])
    shape = list(latent.shape) if isinstance(latent, torch.Tensor) else type(latent).__name__
    return (f"its shape_list is {shapes!r} for hidden_states {shape}; vitmad places one item per batch entry, all of "
            "one (t, h, w), whose tubelets fill hidden_states' [B, t h w, C, p_t, p, p] in (frame, row, column) order "
            "(JoyImageEditPlusPipeline without reference images: a reference image is another item, padding another "
            "token); record a call without reference images")


def _bound(module: nn.Module, args: tuple, kwargs: dict) -> dict:
    """The arguments of ``module``'s forward, by name."""
    return dict(zip(_forward_parameters(type(module)), args)) | kwargs


@functools.lru_cache(maxsize=16)
def _forward_parameters(kind: type) -> tuple[str, ...]:
    return tuple(inspect.signature(kind.forward).parameters)[1:]


def _history_refusal(name: str, history: torch.Tensor, indices: torch.Tensor, kernel: tuple[int, int, int]
                     ) -> str | None:
    """Why FramePack's history latents ``name`` (``[B, C, F, H, W]``, cut by ``kernel``) cannot be placed: they
    must come with one frame index per frame, consecutive within each kernel (the last one too where the model pads
    it to a whole kernel), for a tubelet to stand at its kernel's centre in time. (Their pixels are the current
    latents': the model's rotary positions, built on the current grid and pooled over each kernel, fail otherwise.)"""
    frames, k = int(history.shape[2]), kernel[0]
    given = indices.reshape(-1).cpu() if indices.dim() == 1 and indices.numel() == frames else None
    if given is None or bool((given - given[::k].repeat_interleave(k)[:frames] != torch.arange(frames) % k).any()):
        return (f"its indices_{name} {indices.tolist()} are not "
                f"{frames} frame indices, consecutive within each group of {k} (one kernel)")
    return None


@functools.lru_cache(maxsize=64)
def _layout(frames: int, size: tuple[int, int], stride: tuple[float, float], frame_stride: int, prefix: int,
            suffix: int) -> tuple[torch.Tensor, ...]:
    """``[n, 2]`` latent-pixel and ``[n, 1]`` latent-frame positions of ``prefix`` tokens without a position, the
    tubelets in (frame, row, column) order, then ``suffix`` tokens without one (NaN rows), and the tubelets' slots
    (read-only, cached per grid)."""
    tubelets = frames * size[0] * size[1]
    tokens = torch.cat([torch.full((prefix,), -1), torch.arange(tubelets), torch.full((suffix,), -1)])[None]
    positions, time_positions, slot = tubelet_positions(tokens, frames, size, stride, frame_stride)
    return read_only(positions[0], time_positions[0], slot, positions=2)


def _processor_refusal(grid: _LatentGrid, module: nn.Module) -> str | None:
    """Why ``module`` is refused: it runs another processor than the one whose token order was read; else None."""
    expected, seen = _PROCESSORS[grid.kind], _processor_name(module)
    if seen == expected:
        return None
    if seen[1] == "LTX2PerturbedAttnProcessor":
        # LTX-2 built with perturbed_attn=True (spatio-temporal guidance) runs it in every block as built, so
        # "record the model as built" cannot help: its perturbed entries skip the attention (QA helper-188).
        return (f"it runs the attention processor {seen[1]} ({seen[0]}), that of an LTX-2 built with "
                "perturbed_attn=True for spatio-temporal guidance, whose perturbed batch entries skip the attention; "
                f"vitmad has read {expected[1]}'s calls only: build the transformer with perturbed_attn=False (the "
                "same weights) to record it")
    return (f"it runs the attention processor {seen[1]} ({seen[0]}), not {expected[1]}, whose token order vitmad "
            "read; restore it (set_default_attn_processor does not) or record the model as built")


def _call_grid(context: CallContext, grid: _LatentGrid, module: nn.Module) -> _Grid:
    """This call's tubelet grid, once ``module`` is seen to run the processor whose token order was read."""
    refusal = _processor_refusal(grid, module)
    if refusal is not None:
        raise NotPlaceable(refusal)
    found = context.values.get(grid.grid_key)
    if found is None:
        raise NotPlaceable("it ran before the patch embedding, so the latent tubelet grid is unknown")
    if isinstance(found, str):
        raise NotPlaceable(found)
    return found


class _VideoPlacer(LayerPlacer):
    """What the placers of one video transformer's attention share: the model's grid hooks (``self.grid``) and the
    refusal of a processor or attention backend that attends where vitmad does not look (``self.module``)."""

    grid: _LatentGrid
    module: nn.Module

    def refusal_without_attention(self, module: nn.Module) -> str | None:
        # A processor (xFormers') or an attention backend (flash, sage, flex) that computes the attention where
        # vitmad does not look reaches no place().
        return _processor_refusal(self.grid, self.module) or backend_refusal(self.module)

    def install(self, context: CallContext) -> list[torch.utils.hooks.RemovableHandle]:
        return self.grid.install(context)


class JointVideoPlacer(_VideoPlacer):
    """Self-attention of a diffusers video transformer over text tokens (first or last, without a position) and the
    latent tubelets in (frame, row, column) order, ``[B, heads, n, n]``.

    Args:
        grid: the model's hooks reading each call's grid and text count.
        module: the attention module, whose processor is checked at every call.
        text: ``"first"``, ``"last"`` or ``"none"``: where the text tokens are in the joint sequence.
        control: Wan-VACE's control blocks: the tokens are the control video's tubelets, placed on the video's grid
            (its rotary positions are the video's), which they must fill: a control video of another grid is padded
            with zeros to the video's token count, its tubelets then not at their own cells.
    """

    def __init__(self, grid: _LatentGrid, module: nn.Module, text: str, control: bool = False):
        self.grid, self.module, self.text, self.control = grid, module, text, control

    def place(self, context: CallContext, lead: torch.Size, num_queries: int, num_keys: int) -> Placement:
        grid = _call_grid(context, self.grid, self.module)
        if self.control:
            control, video = context.values.get(self.grid.control_key), (grid.batch, grid.frames, *grid.size)
            if control != video:
                raise NotPlaceable(
                    f"its control tubelets (vace_patch_embedding: [B, F', H', W'] = {list(control or [])}) are not "
                    f"the video's {list(video)}: the model pads them with zeros to the video's token count, so they "
                    "are not at the video's cells their rotary positions give; give control latents of the video's "
                    "shape")
        text = int(context.values.get(self.grid.text_key, 0)) if self.text != "none" else 0
        prefix, suffix = (text, 0) if self.text == "first" else (0, text)
        patches = grid.size[0] * grid.size[1]
        tokens = prefix + grid.frames * patches + suffix
        if len(lead) != 2 or num_queries != num_keys or num_queries != tokens or lead[0] != grid.batch:
            words = {"first": f"{text} text tokens then ", "last": "", "none": ""}[self.text]
            after = f" then {text} text tokens" if self.text == "last" else ""
            raise NotPlaceable(
                f"its attention has shape [{', '.join(map(str, lead))}, {num_queries}, {num_keys}]; self-attention "
                f"over {grid.batch} video(s) of {words}{grid.frames}x{grid.size[0]}x{grid.size[1]} tubelets{after} "
                f"gives [{grid.batch}, heads, {tokens}, {tokens}]"
            )
        positions, time_positions, slot = _layout(grid.frames, grid.size, grid.stride, grid.frame_stride, prefix,
                                                  suffix)
        heads = int(lead[1])

        def fold(values: torch.Tensor) -> torch.Tensor:
            return values.index_select(-1, on_device(slot, values.device))

        geometry = LayerGeometry(grid.size, grid.stride, "space-time", heads, frames=grid.frames,
                                 frame_stride=float(grid.frame_stride), num_prefix_tokens=prefix or None,
                                 num_suffix_tokens=suffix or None)
        return Placement(positions, None, fold, geometry, time_positions=time_positions)


class FramepackPlacer(_VideoPlacer):
    """FramePack's joint attention, ``[B, heads, n, n]``: its clean history (the 4x, 2x and 1x history latents'
    tubelets, each at the centre of its kernel in latent pixels and at the frame indices its forward was given),
    then the current tubelets in (frame, row, column) order, then the image and text tokens (suffix tokens without a
    position; a single video's text cut to its valid tokens). The 2x and 4x history the model pads to whole kernels
    has its tubelets at the cells of the padded grid. Only the current tubelets are folded: the history tokens are
    keys with a position (their own rows are not counted), never a cell of the grid.

    Args:
        grid: the model's hooks reading each call's grid, history and text count.
        module: the attention module, whose processor is checked at every call.
    """

    def __init__(self, grid: _LatentGrid, module: nn.Module):
        self.grid, self.module = grid, module

    def place(self, context: CallContext, lead: torch.Size, num_queries: int, num_keys: int) -> Placement:
        grid = _call_grid(context, self.grid, self.module)
        segments, dropped = context.values[self.grid.history_key]
        text = int(context.values.get(self.grid.text_key, 0)) - dropped
        counts = [frames * size[0] * size[1] for frames, size, _, _ in segments]
        tokens = sum(counts) + text
        if len(lead) != 2 or num_queries != num_keys or num_queries != tokens or lead[0] != grid.batch:
            raise NotPlaceable(
                f"its attention has shape [{', '.join(map(str, lead))}, {num_queries}, {num_keys}]; self-attention "
                f"over {grid.batch} video(s) of {sum(counts[:-1])} history tubelets, {grid.frames}x{grid.size[0]}x"
                f"{grid.size[1]} tubelets then {text} image and text tokens gives [{grid.batch}, heads, {tokens}, "
                f"{tokens}]")
        positions, time_positions, slot = _history_layout(segments, text)

        def fold(values: torch.Tensor) -> torch.Tensor:
            return values.index_select(-1, on_device(slot, values.device))

        geometry = LayerGeometry(grid.size, grid.stride, "space-time", int(lead[1]), frames=grid.frames,
                                 frame_stride=1.0, num_suffix_tokens=text or None)
        return Placement(positions, None, fold, geometry, time_positions=time_positions)


@functools.lru_cache(maxsize=64)
def _history_layout(segments: tuple, suffix: int) -> tuple[torch.Tensor, ...]:
    """``[n, 2]`` latent-pixel and ``[n, 1]`` latent-frame positions of FramePack's segments (each ``(frames,
    (grid_h, grid_w), stride, frame times)``: its tubelets in (frame, row, column) order), then ``suffix`` tokens
    without a position, and the slots of the last segment's tubelets (read-only, cached per layout)."""
    spaces, times = [], []
    for frames, size, stride, frame_times in segments:
        spaces.append(cell_centres(*size, stride, dtype=torch.float64).reshape(-1, 2).repeat(frames, 1))
        times.append(torch.tensor(frame_times, dtype=torch.float64).repeat_interleave(size[0] * size[1])[:, None])
    spaces.append(torch.full((suffix, 2), float("nan"), dtype=torch.float64))
    times.append(torch.full((suffix, 1), float("nan"), dtype=torch.float64))
    current = segments[-1][0] * segments[-1][1][0] * segments[-1][1][1]
    slot = torch.arange(current) + sum(len(space) for space in spaces[:-2])
    return read_only(torch.cat(spaces).float(), torch.cat(times).float(), slot, positions=2)


class PerVideoPlacer(_VideoPlacer):
    """Mochi's joint attention: one SDPA call per video, ``[1, heads, n + t_b, n + t_b]``, over its tubelets in
    (frame, row, column) order, then its own valid text tokens (suffix tokens without a position, the ``t_b``
    its ``attention_mask`` keeps: the processor drops the padding), the videos in batch order. Placed as
    consecutive chunks (:attr:`Placement.consecutive_chunks`): each call its own video's positions, the fold of
    the whole batch picking each video's tubelets from the joined values.

    Args:
        grid: the model's hooks reading each call's grid.
        module: the ``MochiAttention`` module, whose processor is checked at every call and whose
            ``attention_mask`` (the text mask, ``[B, L]``) each forward gives the videos' text counts.
    """

    def __init__(self, grid: _LatentGrid, module: nn.Module):
        self.grid, self.module = grid, module
        self.key = f"{_GRID_KEY}.per_video.{id(module)}"  # this forward: [text count per video, next video]

    def install(self, context: CallContext) -> list[torch.utils.hooks.RemovableHandle]:
        return [*self.grid.install(context),
                self.module.register_forward_pre_hook(functools.partial(self._texts, context), with_kwargs=True)]

    def _texts(self, context: CallContext, module, args, kwargs) -> None:
        names = ("hidden_states", "encoder_hidden_states", "attention_mask")
        mask = (dict(zip(names, args)) | kwargs).get("attention_mask")
        counts = [int(n) for n in mask.reshape(mask.shape[0], -1).bool().sum(-1)] if isinstance(
            mask, torch.Tensor) else None
        context.values[self.key] = [counts, 0]

    def place(self, context: CallContext, lead: torch.Size, num_queries: int, num_keys: int) -> Placement:
        grid = _call_grid(context, self.grid, self.module)
        counts, video = context.values.get(self.key) or (None, 0)
        if counts is None or len(counts) != grid.batch:
            raise NotPlaceable(f"its attention_mask ({'none' if counts is None else f'{len(counts)} rows'}) does not "
                               f"give the valid text tokens of each of the {grid.batch} video(s)")
        if len(set(counts)) != 1:
            # Each video's chunk would end with text rows of its own count: no one layout of prefix rows or suffix
            # count for the layer.
            raise NotPlaceable(f"its videos keep {counts} text tokens (attention_mask): vitmad places a batch whose "
                               "videos keep as many, one video per call otherwise")
        tubelets, text = grid.frames * grid.size[0] * grid.size[1], counts[0]
        context.values[self.key][1] = video + 1
        if len(lead) != 2 or lead[0] != 1 or num_queries != num_keys or num_queries != tubelets + text \
                or video >= grid.batch:
            raise NotPlaceable(
                f"its attention call {video + 1} has shape [{', '.join(map(str, lead))}, {num_queries}, {num_keys}]; "
                f"one call per video over its {grid.frames}x{grid.size[0]}x{grid.size[1]} tubelets then its {text} "
                f"valid text tokens gives {grid.batch} call(s) of [1, heads, {tubelets + text}, {tubelets + text}]")
        positions, time_positions, _ = _layout(grid.frames, grid.size, grid.stride, grid.frame_stride, 0, text)
        index = _per_video_tubelets(grid.batch, tubelets, text)
        batch, heads = grid.batch, int(lead[1])

        def fold(values: torch.Tensor) -> torch.Tensor:
            # [1, H, B (n + t)], the videos' chunks joined -> [B, H, n]
            values = values.index_select(-1, on_device(index, values.device))
            return values.reshape(heads, batch, tubelets).transpose(0, 1)

        geometry = LayerGeometry(grid.size, grid.stride, "space-time", heads, frames=grid.frames,
                                 frame_stride=float(grid.frame_stride), num_suffix_tokens=text or None)
        return Placement(positions, None, fold, geometry, consecutive_chunks=True, time_positions=time_positions)


@functools.lru_cache(maxsize=64)
def _per_video_tubelets(batch: int, tubelets: int, text: int) -> torch.Tensor:
    """The tubelets' slots among ``batch`` joined chunks of ``tubelets`` tubelets then ``text`` text tokens."""
    starts = torch.arange(batch) * (tubelets + text)
    return read_only((starts[:, None] + torch.arange(tubelets)).reshape(-1))[0]


@functools.lru_cache(maxsize=64)
def _factorised_layout(kind: str, frames: int, size: tuple[int, int], stride: tuple[float, float]
                       ) -> tuple[torch.Tensor, ...]:
    """Latte's calls: ``"space"``, one group per latent frame over its patches (row-major), or ``"time"``, one
    group per patch position over its frames. Returns ``[G, n, 2]`` latent pixels, ``[G, n, 1]`` latent frames and
    the slot of each tubelet (frame, row, column) among the ``G * n`` (read-only, cached per grid)."""
    grid = torch.arange(frames * size[0] * size[1]).view(frames, size[0] * size[1])
    tokens = grid if kind == "space" else grid.t()
    positions, time_positions, slot = tubelet_positions(tokens, frames, size, stride, 1)
    return read_only(positions, time_positions, slot, positions=2)


class FactorisedVideoPlacer(_VideoPlacer):
    """Latte's factorised attention: a spatial block attends within each latent frame (``[B * F, heads, H'W',
    H'W']``, the frames of a video consecutive), a temporal block over the frames of each patch position (``[B *
    H'W', heads, F, F]``, the positions of a video consecutive, row-major); placed as :mod:`.video` places
    TimeSformer's divided attention, without its class token.

    Args:
        grid: the model's hooks reading each call's grid.
        module: the attention module, whose processor is checked at every call.
        kind: ``"space"`` or ``"time"``.
    """

    def __init__(self, grid: _LatentGrid, module: nn.Module, kind: str):
        self.grid, self.module, self.kind = grid, module, kind

    def place(self, context: CallContext, lead: torch.Size, num_queries: int, num_keys: int) -> Placement:
        grid = _call_grid(context, self.grid, self.module)
        patches = grid.size[0] * grid.size[1]
        groups, tokens = (grid.frames, patches) if self.kind == "space" else (patches, grid.frames)
        if len(lead) != 2 or num_queries != num_keys or num_queries != tokens or lead[0] != grid.batch * groups:
            described = (f"the {grid.size[0]}x{grid.size[1]} patches of each of {grid.frames} latent frames"
                         if self.kind == "space" else f"the {grid.frames} latent frames of each of {patches} patches")
            raise NotPlaceable(
                f"its attention has shape [{', '.join(map(str, lead))}, {num_queries}, {num_keys}]; {self.kind} "
                f"attention over {grid.batch} video(s) of {described} gives [{grid.batch * groups}, heads, {tokens}, "
                f"{tokens}]"
            )
        positions, time_positions, slot = _factorised_layout(self.kind, grid.frames, grid.size, grid.stride)
        positions = positions.repeat(grid.batch, 1, 1).unsqueeze(1)  # [B * G, 1, n, 2]: one set per row of the call
        time_positions = time_positions.repeat(grid.batch, 1, 1).unsqueeze(1)
        batch, heads = grid.batch, int(lead[1])

        def fold(values: torch.Tensor) -> torch.Tensor:
            values = values.reshape(batch, groups, heads, tokens).transpose(1, 2).reshape(batch, heads, -1)
            return values.index_select(-1, on_device(slot, values.device))

        geometry = LayerGeometry(grid.size, grid.stride, self.kind, heads, frames=grid.frames, frame_stride=1.0)
        return Placement(positions, None, fold, geometry, time_positions=time_positions)


# One grid reader per model, shared by its layers' placers.
_GRIDS: weakref.WeakKeyDictionary[nn.Module, _LatentGrid] = weakref.WeakKeyDictionary()


def placer(model: nn.Module, name: str, module: nn.Module):
    """The placer of an attention module of a diffusers video transformer, a Skip for its cross-attention and
    text-only attention, a refusing placer for the video transformers not placed here, or None."""
    from . import Skip

    found = _video_model(model, name)
    if found is None:
        return None
    video, prefix = found
    kind, inner = _key(video), name[len(prefix):].lstrip(".") if prefix else name
    parts = inner.split(".")
    if kind == _CONSISID and type(module).__name__ in ("PerceiverCrossAttention", "PerceiverAttention") \
            and type(module).__module__ == _CONSISID[0]:
        # Its own softmax, found by the softmax search: the identity tokens' attention, never a tubelet's key.
        return Skip("ConsisID's face identity attention (PerceiverCrossAttention: the tubelets' cross-attention to "
                    "the identity tokens; PerceiverAttention: the identity tokens over the face features): keys "
                    "without a position on the latent video")
    if kind == _MOCHI and _key(module) == ("diffusers.models.embeddings", "MochiAttentionPool"):
        return Skip("Mochi's attention pooling of the caption tokens into one pooled query: no position on the "
                    "latent video")
    if kind in _PROCESSORS and not (is_attention(module) or _key(module) == _MOCHI_ATTENTION):
        # Found by another discovery (it calls scaled_dot_product_attention or a softmax itself): not one of the
        # processors' attention modules whose sequence was read.
        return RefusingPlacer(f"{type(module).__name__} in {type(video).__name__} is no attention module whose "
                              "tokens vitmad read; leave it out with layers=[the other attention modules]")
    if kind not in _PROCESSORS:
        placed = ", ".join(sorted(name for _, name in _PROCESSORS))
        return RefusingPlacer(f"{type(video).__name__} (diffusers) is not placed by vitmad: "
                              f"{_REFUSED[type(video).__name__]}; vitmad places {placed}")
    blocks = _BLOCKS[kind]
    if kind == _WAN_ANIMATE and parts[0] == "face_adapter":
        return Skip("Wan-Animate's face adapter: cross-attention of each latent frame's tubelets to that frame's "
                    "face motion tokens, keys without a position on the latent video")
    if kind in (_HUNYUAN, _HUNYUAN15, _FRAMEPACK) and parts[0] == "context_embedder":
        version = {_HUNYUAN15: " 1.5", _FRAMEPACK: " FramePack"}.get(kind, "")
        return Skip(f"HunyuanVideo{version}'s text token refiner: self-attention among the text tokens, none with a "
                    "position on the latent video")
    if kind == _KANDINSKY5 and parts[0] == "text_transformer_blocks":
        return Skip("Kandinsky 5's text blocks: self-attention among the text tokens, none with a position on the "
                    "latent video")
    if kind == _KANDINSKY6:
        if parts[0] in ("video_text_transformer_blocks", "audio_text_transformer_blocks"):
            return Skip(f"Kandinsky 6's {parts[0].split('_')[0]} text blocks: self-attention among the text tokens, "
                        "none with a position on the latent video")
        if "audio_dec_block" in parts:
            return Skip("Kandinsky 6's audio blocks: attention of the audio tokens (to themselves or to the text), "
                        "none with a position on the latent video")
    if kind == _MOTIF and parts[0] == "single_transformer_blocks" and len(parts) > 1 and parts[1].isdigit() and (
            int(parts[1]) >= video.config.num_single_layers - video.config.num_decoder_layers):
        return RefusingPlacer(
            f"{inner} is one of Motif-Video's decoder blocks (num_decoder_layers {video.config.num_decoder_layers}): "
            "its attention is over the decoder's tubelets then the encoder's output tubelets (a second token per "
            "cell, without rotary positions), which vitmad does not place; leave the decoder blocks out with "
            "layers=[the other attention modules]")
    if parts[-1] in blocks["skip"]:
        return Skip(blocks["skip"][parts[-1]])
    if parts[-1] not in blocks["self"] or (kind == _LATTE and parts[0] not in _LATTE_BLOCKS):
        names = ", ".join([*blocks["self"], *blocks["skip"]])
        return RefusingPlacer(f"{inner} is no attention of {type(video).__name__}'s blocks ({names}), whose tokens "
                              "vitmad read")
    if kind == _LATTE:
        return FactorisedVideoPlacer(_reader(video, kind), module, _LATTE_BLOCKS[parts[0]])
    if kind == _MOCHI:
        return PerVideoPlacer(_reader(video, kind), module)
    if kind == _FRAMEPACK:
        return FramepackPlacer(_reader(video, kind), module)
    return JointVideoPlacer(_reader(video, kind), module, blocks["text"], control=parts[0] == "vace_blocks")


_TO_TEXT = "cross-attention of the latent tubelets to the text tokens{}: keys without a position on the latent video"
_WAN_ATTENTION = {"self": ("attn1",), "text": "none", "skip": {"attn2": _TO_TEXT.format(
    " (and, image-to-video, to the CLIP image tokens)")}}
# Per placed model: its blocks' self-attention module names, where its text tokens are in their sequence ("first",
# "last", "none": attended by cross-attention only), and its cross-attention module names -> why skipped.
_BLOCKS = {
    **{kind: _WAN_ATTENTION for kind in _WAN_LIKE},
    _LTX: {"self": ("attn1",), "text": "none", "skip": {"attn2": _TO_TEXT.format("")}},
    _ALLEGRO: {"self": ("attn1",), "text": "none", "skip": {"attn2": _TO_TEXT.format("")}},
    _COSMOS: {"self": ("attn1",), "text": "none", "skip": {"attn2": _TO_TEXT.format(
        " (and, Cosmos 2.5 with an image context, to the image tokens)")}},
    _JOY: {"self": ("attn",), "text": "last", "skip": {}},
    _JOY_PLUS: {"self": ("attn",), "text": "last", "skip": {}},
    _KANDINSKY5: {"self": ("self_attention",), "text": "none", "skip": {"cross_attention": _TO_TEXT.format("")}},
    _LATTE: {"self": ("attn1",), "text": "none", "skip": {"attn2": "cross-attention of the latent patches to the "
                                                                  "caption tokens: keys without a position on the "
                                                                  "latent video"}},
    _COGVIDEOX: {"self": ("attn1",), "text": "first", "skip": {}},
    _CONSISID: {"self": ("attn1",), "text": "first", "skip": {}},
    _EASYANIMATE: {"self": ("attn1",), "text": "first", "skip": {}},
    _HUNYUAN: {"self": ("attn",), "text": "last", "skip": {}},
    _HUNYUAN15: {"self": ("attn",), "text": "last", "skip": {}},
    _MOCHI: {"self": ("attn1",), "text": "last", "skip": {}},
    _LTX2: {"self": ("attn1",), "text": "none", "skip": {
        "attn2": _TO_TEXT.format(""),
        "audio_attn1": "LTX-2's audio self-attention: audio tokens, none with a position on the latent video",
        "audio_attn2": "LTX-2's audio cross-attention to the text: no token with a position on the latent video",
        "audio_to_video_attn": "LTX-2's audio-to-video cross-attention: the video tokens' queries over the audio "
                               "tokens, keys without a position on the latent video",
        "video_to_audio_attn": "LTX-2's video-to-audio cross-attention: the audio tokens' queries over the video "
                               "tokens, queries without a position on the latent video"}},
    _FRAMEPACK: {"self": ("attn",), "text": "last", "skip": {}},
    _MOTIF: {"self": ("attn",), "text": "last", "skip": {"cross_attn": _TO_TEXT.format(
        " (and, image-to-video, to the image tokens)")}},
    _KANDINSKY6: {"self": ("self_attention",), "text": "none", "skip": {
        "cross_attention": _TO_TEXT.format(""),
        "va_cross_attention": "Kandinsky 6's video-to-audio attention: the video tokens' queries over the audio "
                              "tokens, keys without a position on the latent video",
        "av_cross_attention": "Kandinsky 6's audio-to-video attention: the audio tokens' queries over the video "
                              "tokens, queries without a position on the latent video"}},
}
_BLOCKS[_COSMOS_CONTROLNET] = _BLOCKS[_COSMOS]  # its control_blocks are Cosmos' blocks
# Latte's block lists -> the attention of their attn1.
_LATTE_BLOCKS = {"transformer_blocks": "space", "temporal_transformer_blocks": "time"}


def _reader(model: nn.Module, kind: tuple[str, str]) -> _LatentGrid:
    """The grid reader of ``model``, one per model, shared by its layers' placers."""
    grid = _GRIDS.get(model)
    if grid is None:
        grid = _GRIDS[model] = _LatentGrid(model, kind)
    return grid
