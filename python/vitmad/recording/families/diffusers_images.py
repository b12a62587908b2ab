"""Hugging Face diffusers' image diffusion transformers: the latent patch grid, read per call, and the caption's
tokens without a position where they share the image's attention.

The recorded module is the transformer a pipeline calls (``pipe.transformer``), whose input is the VAE's latent:
positions and MAD are in latent pixels of that input (a pipeline's latent pixel is ``pipe.vae_scale_factor``
image pixels; vitmad does not guess the VAE). Each forward is one denoising step, one of ``rec.calls``.

- ``DiTTransformer2DModel`` (class-conditioned DiT) and ``PixArtTransformer2DModel``: ``PatchEmbed`` cuts the
  latent ``[B, C, H, W]`` with a ``Conv2d`` of kernel = stride = ``patch_size`` and flattens it row-major; their
  ``BasicTransformerBlock``'s ``attn1`` attends over that grid alone. PixArt's ``attn2`` attends from the patches
  to the caption (``encoder_hidden_states``): its keys have no position in the latent, so it is skipped.
- The generic ``Transformer2DModel`` given a ``patch_size`` (DiT / PixArt checkpoints of the older format): the same
  ``PatchEmbed`` grid and blocks as DiT's. Without ``patch_size`` it works on a feature map: inside a UNet, that
  UNet's (diffusers_unets'); recorded alone, its own input's, ``[B, C, H, W]`` flattened row-major
  (``permute(0, 2, 3, 1).reshape(B, H * W, C)``, before or after ``proj_in``), one token per input pixel (stride 1),
  read per call from ``proj_in``'s input (a 1x1 ``Conv2d``) or the forward's (``use_linear_projection``).
- ``SD3Transformer2DModel`` (MMDiT) and ``SD3ControlNetModel`` (its blocks): the same ``PatchEmbed`` grid;
  ``JointAttnProcessor2_0`` concatenates the image tokens, THEN the caption's (``torch.cat([query,
  encoder_hidden_states_query_proj], dim=2)``): the caption's tokens are suffix tokens without a position. SD3.5's
  dual-attention blocks' ``attn2`` attends over the image alone.
  SD3.5's large ControlNet has no ``pos_embed`` (it gets the transformer's patches already cut): refused.
- ``HunyuanImageTransformer2DModel``: ``x_embedder``'s ``Conv2d`` grid, row-major; ``HunyuanImageAttnProcessor``
  puts the text after the image in both kinds of block (``cat([query, encoder_query])``, ``cat([hidden_states,
  encoder_hidden_states])``), the text the caption's tokens and, with ``context_embedder_2``, the ByT5 glyph tokens
  (reordered among themselves, their padding masked); its token refiner (``context_embedder``) attends over the
  caption alone: skipped. A video latent (``Conv3d``) is refused.
- ``CogView3PlusTransformer2DModel``: ``CogView3PlusPatchEmbed`` views the latent as whole patches and puts the
  caption first (``cat([encoder_hidden_states, hidden_states])``, as ``CogVideoXAttnProcessor2_0`` keeps them).
- ``LuminaNextDiT2DModel``: ``LuminaPatchEmbed`` views whole patches, row-major; ``attn1`` over them alone,
  ``attn2`` to the caption (skipped).
- ``AuraFlowTransformer2DModel``: ``AuraFlowPatchEmbed`` views the latent as whole patches (``view`` + ``permute``,
  row-major) and projects them with a ``Linear`` (no convolution: the model's forward starts the call); its 8 learned
  ``register_tokens`` lead the caption (``cat([registers, caption])``), and ``AuraFlowAttnProcessor2_0`` and its
  single blocks put that text first: registers and caption are prefix tokens without a position.
- ``CogView4Transformer2DModel``: ``CogView4PatchEmbed`` cuts whole patches the same way (and gets the caption, its
  second argument); ``CogView4AttnProcessor`` attends over ``cat([caption, image])``: the caption first. Its padding
  mask is made a float 0 / 1 bias (``(attn_mask_matrix > 0).to(query.dtype)``), measured as the model adds it.
- ``Lumina2Transformer2DModel``: ``Lumina2RotaryPosEmbed`` cuts whole patches the same way; its ``noise_refiner``
  attends over the image alone, its ``context_refiner`` over the caption alone (skipped), its layers over
  ``[caption, image]`` with the caption's padding dropped (its length the sum of ``encoder_attention_mask``); a
  batch whose captions differ in length (each entry's image then starts at its own place) is refused.
- ``HunyuanDiT2DModel``: the same ``PatchEmbed`` grid; ``attn1`` attends over it alone (its 2-D RoPE, given by the
  pipeline, changes the logits only), ``attn2`` to the caption (skipped). ``HunyuanDiT2DControlNetModel`` runs its
  blocks on the same grid; its ``pos_embed`` cuts the latent, then the condition (added), with one convolution, so
  its calls start at the model's forward (:func:`call_start`), not at that convolution; in a user's step running it,
  then the transformer (``HunyuanDiTControlNetPipeline``'s order), at the step's forward, whichever net's layers are
  recorded. Recorded by default, such a step takes both nets' layers (:func:`denoisers_beside`), each on the grid its
  own patch embedding cuts.
- ``FluxTransformer2DModel`` and ``ChromaTransformer2DModel`` (Flux's blocks, attention and ids; a padding mask over
  the caption, measured as given): its input comes packed, ``[B, (H/2)(W/2), C*4]`` (each token 2 x 2 latent pixels,
  ``FluxPipeline._pack_latents``), its places named by ``img_ids`` ``[N, 3]`` (0, row, column). ``FluxAttnProcessor``
  puts the caption's tokens FIRST (``torch.cat([encoder_query, query], dim=1)``), and the single-stream blocks
  attend over ``cat([text, image])`` too: the caption's tokens are prefix tokens without a position. ``img_ids``
  is read per call (from the ids ``pos_embed`` gets, past the caption's ``txt_ids``) and must be the row-major
  grid ``FluxPipeline._prepare_latent_image_ids`` makes; any other (Flux Kontext's reference image, with a first
  coordinate of 1) is refused. RoPE changes the logits, never the geometry. ``FluxControlNetModel`` runs Flux's blocks
  on the same ids; in union mode one control-mode token leads the caption (``cat([controlnet_mode_emb, caption])``,
  ``txt_ids`` repeated for it). ``BriaTransformer2DModel``, ``OvisImageTransformer2DModel`` and
  ``LongCatImageTransformer2DModel`` are Flux's layout under their own names (processors, ids, 2 x 2 packing);
  LongCatImagePipeline's ids are ``(1, 512 + row, 512 + column)``, a grid read from its first id, its edit
  pipeline's reference image (a first id of 2) refused.
- ``Flux2Transformer2DModel``: Flux's layout with ids of four coordinates, ``(0, row, column, 0)``
  (``Flux2Pipeline._prepare_latent_ids``), read per call from its forward's ``img_ids``; a reference image's ids
  (a first coordinate of 10 or more) and its reference KV cache are refused.
- ``QwenImageTransformer2DModel``: packed as Flux's (``QwenImagePipeline._pack_latents``), its grid the
  ``(1, rows, columns)`` of ``img_shapes`` (read per call from what ``pos_embed`` gets), which must name one image
  of one frame per batch entry, all the same (an edit pipeline's several images are refused);
  ``QwenDoubleStreamAttnProcessor2_0`` puts the caption first (its length what ``txt_in`` gets), its padding masked.
  ``QwenImageControlNetModel`` runs QwenImage's blocks on the same packing and ``img_shapes``.
- ``Flux3Transformer2DModel``: Flux2's packing and four-coordinate ids, its rows and columns scaled by the pipeline's
  ``image_rope_scale`` (``(0, 0.5 row, 0.5 column, 0)``; any one step is read as the grid it steps over), read per
  call from its forward's ``img_ids``; its ``txt_mode_blocks`` attend over the caption alone (skipped),
  ``mode_blocks["image"]`` over the image alone, its single blocks over ``cat([caption, image])``. Reference images
  (``image_cond_hidden_states``) are refused.
- ``Krea2Transformer2DModel``: packed 2 x 2 (``Krea2Pipeline``'s ``patch_size``), its ``position_ids`` the caption's
  ``(0, 0, 0)`` rows, then the image's ``(0, row, column)``: read as Flux's ids from what ``rotary_emb`` gets, past
  the caption's count (what ``txt_in`` gets); its blocks attend over ``cat([caption, image])``, its ``text_fusion``
  over the caption alone (skipped).
- ``Ideogram4Transformer2DModel``: one sequence per row, ``[padding][caption][image]`` (``Ideogram4Pipeline
  ._prepare_ids``), packed 2 x 2: the image the last tokens of every row (its ``indicator``), at
  ``IMAGE_POSITION_OFFSET + (0, row, column)`` row-major (its ``position_ids``); padding and caption without a
  position.
- ``PRXTransformer2DModel`` (whole ``patch_size`` patches of the latent, ``img2seq``) and
  ``NucleusMoEImageTransformer2DModel`` (packed ``patch_size`` x ``patch_size`` on QwenImage's ``img_shapes``)
  attend from the image's queries alone over ``cat([caption, image])`` (PRX) or ``cat([image, caption])``
  (NucleusMoE) keys: the caption's keys without a position, and no caption query.
- ``BriaFibo2Transformer2DModel``: whole ``patch_size`` patches of the latent (``_patchify``); its layers attend over
  ``cat([gist, image])``, or ``cat([image, gist])`` where a batch pads the gist tokens (read per call from its
  Perceiver's arguments); its Perceiver and its injection blocks' ``cross_attention`` are skipped, images to edit
  (``context_latents``) refused.

The caption's length is what the model's ``context_embedder`` gets in this call; the grid what ``PatchEmbed``'s
convolution gets (any latent size, never ``sample_size``). MAD is over the image's queries and keys; with the
caption in the attention, ``prefix_mass`` is the image queries' mass on the caption's tokens and
``stats=[..., "prefix_maps"]`` gives each caption token's row over the grid.

The fused QKV processors (``fuse_qkv_projections()``: ``FusedAttnProcessor2_0``, ``FusedJointAttnProcessor2_0``,
``FusedHunyuanAttnProcessor2_0``, ``FusedAuraFlowAttnProcessor2_0``, ``FusedCogVideoXAttnProcessor2_0``) split one
``to_qkv`` into the same query, key and value and concatenate them in the unfused order: read as the unfused ones
(Flux's processor reads ``attn.fused_projections`` itself).

Refused: a processor vitmad has not read (IP-Adapter, PAG, ``AttnProcessor``'s merged batch and heads): the layout
of its call is its own; a layer placed as self-attention over the latent alone (no caption in its sequence) given
``encoder_hidden_states`` of another tensor in a call (:func:`.diffusers_common.given_other_keys`): a
``BasicTransformerBlock`` built with ``double_self_attention`` (``only_cross_attention``) hands its ``attn2``
(``attn1``) the forward's ``encoder_hidden_states`` whenever it gets them, so its keys are the caption's, whatever
their count. Skipped: cross-attention to a caption; Sana's linear attention (no softmax map), its
ControlNet's too. The other image transformers of diffusers are refused by name, each with what keeps it unplaced
(``_NOT_PLACED``).

The Multi wrappers (``FluxMultiControlNetModel``, ``HunyuanDiT2DMultiControlNetModel``,
``QwenImageMultiControlNetModel``, ``SD3MultiControlNetModel``) hold their nets in ``nets``, each placed as above; a
forward of the wrapper is one call, its nets' runs in it in order (one union net run once per condition: its layers
once per run).
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from ..module_index import module_list, named_module_list
from ..placement import (
    CallContext,
    LayerGeometry,
    LayerPlacer,
    NotPlaceable,
    Placement,
    RefusingPlacer,
    cell_centres,
    read_only,
    select_tokens,
)
from .diffusers_common import (
    attention_under,
    backend_refusal,
    given_other_keys,
    is_attention,
    is_cross_attention,
    is_diffusers_class,
    processor_refusal,
)
from .diffusers_unets import is_unet
from .plain import _plain_positions
from .stages import innermost_on_path, pair

__all__ = ["placer", "attention_modules", "call_start", "denoisers_beside", "LatentGridPlacer"]

# The 2 x 2 latent pixels every Flux pipeline packs into one token (_pack_latents): the latent pixels per img_ids step.
_FLUX_PACKING = 2

# Per placed model class: how its tokens are cut, where the caption's tokens sit in a joint attention ("first",
# "last"; "keys first", "keys last": among the keys only, the queries the image's alone; None: no joint attention),
# and the processors whose calls are read as that (their class names). The cuts: "conv", PatchEmbed's convolution of
# the latent; "view", the latent viewed as whole patches and a Linear (AuraFlow, CogView4); "latent", the latent
# [B, C, H, W] the model's forward gets, cut into whole patches of its config's patch_size by a function (PRX's
# img2seq); "ids", packed latents at the places img_ids name (Flux); "ids4", img_ids of four coordinates read from the
# forward's arguments (Flux2, Flux3); "shapes", packed latents on the (1, rows, columns) img_shapes names (QwenImage);
# "sequence", Ideogram4's one sequence of padding, caption and packed latents, read from its forward's indicator and
# position_ids.
_PLACED = {
    "DiTTransformer2DModel": ("conv", None, ("AttnProcessor2_0", "FusedAttnProcessor2_0")),
    "PixArtTransformer2DModel": ("conv", None, ("AttnProcessor2_0", "FusedAttnProcessor2_0")),
    "Transformer2DModel": ("conv", None, ("AttnProcessor2_0", "FusedAttnProcessor2_0")),
    "HunyuanDiT2DModel": ("conv", None, ("HunyuanAttnProcessor2_0", "FusedHunyuanAttnProcessor2_0")),
    "HunyuanDiT2DControlNetModel": ("conv", None, ("HunyuanAttnProcessor2_0", "FusedHunyuanAttnProcessor2_0")),
    "SD3Transformer2DModel": ("conv", "last", ("JointAttnProcessor2_0", "FusedJointAttnProcessor2_0")),
    "SD3ControlNetModel": ("conv", "last", ("JointAttnProcessor2_0", "FusedJointAttnProcessor2_0")),
    "HunyuanImageTransformer2DModel": ("conv", "last", ("HunyuanImageAttnProcessor",)),
    "AuraFlowTransformer2DModel": ("view", "first", ("AuraFlowAttnProcessor2_0", "FusedAuraFlowAttnProcessor2_0")),
    "FluxTransformer2DModel": ("ids", "first", ("FluxAttnProcessor",)),
    "ChromaTransformer2DModel": ("ids", "first", ("FluxAttnProcessor",)),
    "FluxControlNetModel": ("ids", "first", ("FluxAttnProcessor",)),
    "BriaTransformer2DModel": ("ids", "first", ("BriaAttnProcessor",)),
    "OvisImageTransformer2DModel": ("ids", "first", ("OvisImageAttnProcessor",)),
    "LongCatImageTransformer2DModel": ("ids", "first", ("LongCatImageAttnProcessor",)),
    "QwenImageTransformer2DModel": ("shapes", "first", ("QwenDoubleStreamAttnProcessor2_0",)),
    "QwenImageControlNetModel": ("shapes", "first", ("QwenDoubleStreamAttnProcessor2_0",)),
    "Flux2Transformer2DModel": ("ids4", "first", ("Flux2AttnProcessor", "Flux2ParallelSelfAttnProcessor")),
    "Flux3Transformer2DModel": ("ids4", "first", ("Flux3AttnProcessor",)),
    "Krea2Transformer2DModel": ("ids", "first", ("Krea2AttnProcessor",)),
    "NucleusMoEImageTransformer2DModel": ("shapes", "keys last", ("NucleusMoEAttnProcessor2_0",)),
    "PRXTransformer2DModel": ("latent", "keys first", ("PRXAttnProcessor2_0",)),
    "Ideogram4Transformer2DModel": ("sequence", "first", ("Ideogram4AttnProcessor",)),
    "BriaFibo2Transformer2DModel": ("latent", "first", ("BriaFibo2AttnProcessor",)),
    "CogView3PlusTransformer2DModel": ("view", "first",
                                       ("CogVideoXAttnProcessor2_0", "FusedCogVideoXAttnProcessor2_0")),
    "CogView4Transformer2DModel": ("view", "first", ("CogView4AttnProcessor",)),
    "Lumina2Transformer2DModel": ("view", "first", ("Lumina2AttnProcessor2_0",)),
    "LuminaNextDiT2DModel": ("view", None, ("LuminaAttnProcessor2_0",)),
}
# The img_ids of the "ids" models: (the model's name, the first coordinate of one latent's ids, whether the grid may
# start at any row and column, the pipeline that makes them, what another image's ids look like). LongCatImagePipeline
# numbers the image after the caption's 512 places ((1, 512 + row, 512 + column)): a shifted grid is the same grid.
_IDS = {
    "FluxTransformer2DModel": ("Flux", 0, False, "FluxPipeline", "Flux Kontext's reference image has a first id of 1"),
    "ChromaTransformer2DModel": ("Chroma", 0, False, "ChromaPipeline", "a reference image's would have another"),
    "FluxControlNetModel": ("FluxControlNetModel", 0, False, "FluxControlNetPipeline",
                            "Flux Kontext's reference image has a first id of 1"),
    "BriaTransformer2DModel": ("Bria", 0, False, "BriaPipeline", "a reference image's would have another"),
    "OvisImageTransformer2DModel": ("OvisImage", 0, False, "OvisImagePipeline",
                                    "a reference image's would have another"),
    "LongCatImageTransformer2DModel": ("LongCatImage", 1, True, "LongCatImagePipeline",
                                       "LongCatImageEditPipeline's reference image has a first id of 2"),
    # Krea2Pipeline.prepare_position_ids: the caption's rows (0, 0, 0), then the image's (0, row, column); its
    # position_ids reach rotary_emb (_PATCH_EMBEDDING) whole.
    "Krea2Transformer2DModel": ("Krea2", 0, False, "Krea2Pipeline", "Krea2Pipeline makes no other"),
}
# The module whose input (which argument) is the caption, its length the caption's token count, where not
# context_embedder's first (Lumina2's: the caption's mask, whose sum per entry is the caption's length); and the
# patch embedding, where not pos_embed.
_CAPTION_EMBEDDER = {"QwenImageTransformer2DModel": ("txt_in", 0), "QwenImageControlNetModel": ("txt_in", 0),
                     "CogView4Transformer2DModel": ("patch_embed", 1),
                     "CogView3PlusTransformer2DModel": ("patch_embed", 1),
                     "Lumina2Transformer2DModel": ("rope_embedder", 1), "Krea2Transformer2DModel": ("txt_in", 0),
                     "PRXTransformer2DModel": ("txt_in", 0), "NucleusMoEImageTransformer2DModel": ("txt_norm", 0)}
_PATCH_EMBEDDING = {"CogView4Transformer2DModel": "patch_embed", "CogView3PlusTransformer2DModel": "patch_embed",
                    "Lumina2Transformer2DModel": "rope_embedder", "HunyuanImageTransformer2DModel": "x_embedder",
                    "LuminaNextDiT2DModel": "patch_embedder", "Krea2Transformer2DModel": "rotary_emb"}
# A second caption embedder whose tokens join the first's (HunyuanImage's ByT5 glyph tokens, which it reorders with
# the caption's: all of them after the image), by attribute of the model; its first argument the tokens.
_SECOND_CAPTION = {"HunyuanImageTransformer2DModel": "context_embedder_2"}
# Blocks that attend over the caption alone (Lumina2's context_refiner, HunyuanImage's token refiner), by attribute
# of the model.
_CAPTION_ONLY = {"Lumina2Transformer2DModel": "context_refiner", "HunyuanImageTransformer2DModel": "context_embedder",
                 "Flux3Transformer2DModel": "txt_mode_blocks", "Krea2Transformer2DModel": "text_fusion",
                 "BriaFibo2Transformer2DModel": "perceiver"}
_LINEAR = ("SanaTransformer2DModel", "SanaControlNetModel")
# diffusers' other image transformers, refused by name with what keeps vitmad from placing their tokens (read from
# their source, diffusers 0.42.1).
_NOT_PLACED = {
    "BriaFiboTransformer2DModel": (
        "BriaFiboPipeline packs its latent 2 x 2 or not at all (do_patching): a step of img_ids is 2 latent pixels or "
        "1, which the transformer's inputs do not tell"),
    "DreamLiteTransformer2DModel": (
        "it is the transformer of DreamLiteUNetModel's blocks, over one of that UNet's feature maps, not over the "
        "latent: where its tokens are depends on the UNet's samplings before it, and vitmad has not read that UNet"),
    "GlmImageTransformer2DModel": (
        "its attention can prepend cached keys of earlier images (its KV cache), tokens of another image"),
    "QwenImage21Transformer2DModel": (
        "its attention is block-causal and runs in several calls per layer (the caption's causal queries, each "
        "condition image, then the target image's queries over everything before), the caption's tokens interleaved "
        "with the condition images' (img_mask), and with its KV cache (kv_cache_mode='cached', QwenImage21Pipeline's "
        "default after the first step) the image's queries attend to cached keys: vitmad places one attention call "
        "over one sequence per layer"),
}
_KNOWN = (*_PLACED, *_LINEAR, *_NOT_PLACED)
_CROSS = ("cross-attention of the latent patches to the caption's tokens (encoder_hidden_states): its keys have no "
          "position in the latent, so it has no MAD")
_LINEAR_REASON = ("Sana's linear attention (ReLU feature maps, no softmax): it makes no attention map, so MAD is not "
                  "defined for it")
_KEY = "diffusers_images."  # + the transformer's name + ".grid" / ".text": what this call's hooks saw


def _owner(module: nn.Module) -> bool:
    if is_diffusers_class(module, ("Transformer2DModel",)):
        # The generic class cuts patches (DiT / PixArt checkpoints of the older format) only with patch_size; a
        # UNet's, over a feature map, is diffusers_unets' (one recorded alone: _owners).
        return getattr(module, "is_input_patches", False) is True
    return is_diffusers_class(module, _KNOWN)


def _on_its_input(module: nn.Module) -> bool:
    """Whether ``module`` is a generic ``Transformer2DModel`` over a continuous ``[B, C, H, W]`` input (no
    ``patch_size``, no ``num_vector_embeds``): its tokens are the input's pixels."""
    return is_diffusers_class(module, ("Transformer2DModel",)) and getattr(module, "is_input_continuous", False) is True


def _owners(model: nn.Module):
    """The test of the modules whose attention this family places in ``model``: the known image transformers, and
    ``model`` itself where it is a ``Transformer2DModel`` over its input's pixels (recorded alone; inside a UNet it
    works on that UNet's feature maps, which diffusers_unets places)."""
    alone = _on_its_input(model)
    return lambda module: _owner(module) or (alone and module is model)


def _outer_owners(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The image transformers this family places in ``model`` (:func:`_owner`), each not inside another, in module
    order."""
    outer: list[tuple[str, nn.Module]] = []
    for name, module in named_module_list(model):
        if _owner(module) and not any(o == "" or name.startswith(o + ".") for o, _ in outer):
            outer.append((name, module))
    return outer


def call_start(model: nn.Module, recorded=()) -> nn.Module | None:
    """``model`` itself where it holds a ``HunyuanDiT2DControlNetModel`` and a ``recorded`` module lies in an image
    transformer of this family (that ControlNet, or the ``HunyuanDiT2DModel`` a user's denoising step runs after it),
    else None: the ControlNet's ``pos_embed`` cuts the latent, then the condition image, with the same convolution,
    the first of the model in module order, so that convolution would start two calls in each forward (the first
    empty where the ControlNet's layers are not recorded, and the transformer's joined the second); the model's
    forward starts each."""
    owners = _outer_owners(model)
    if not any(is_diffusers_class(m, ("HunyuanDiT2DControlNetModel",)) for m in module_list(model)):
        return None
    inside = {id(m) for m in recorded}
    if any(id(sub) in inside for _, owner in owners for sub in owner.modules()):
        return model
    return None


def denoisers_beside(model: nn.Module, tower: str) -> list[str]:
    """The qualified-name prefixes of the image transformers of this family in ``model`` beside the one holding the
    tower that embeds the image (prefix ``tower``): a user's denoising step running a ControlNet, then the
    transformer it feeds (as ``HunyuanDiTControlNetPipeline`` and ``SD3ControlNetPipeline`` call them), whose first
    patch embedding in module order is the ControlNet's. Recorded with that tower by default, each net placed on the
    latent grid its own patch embedding cuts (the tower alone left the other net's layers out, listed nowhere);
    empty where the tower lies in none of them."""
    owners = [owner + "." for owner, _ in _outer_owners(model) if owner]
    if not any(tower.startswith(owner) for owner in owners):
        return []
    return [owner for owner in owners if not tower.startswith(owner)]


def attention_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The diffusers attention modules inside the image transformers this family knows (placed or refused by name),
    and inside a generic ``Transformer2DModel`` over its input's pixels held by a user's module (refused with the
    reason: :func:`_held_on_its_input`); those of other diffusers models (UNets, video transformers) are not this
    family's."""
    owners = _owners(model)
    unets = {id(m) for unet in module_list(model) if is_unet(unet) for m in module_list(unet)}
    return attention_under(model, lambda m: owners(m) or (_on_its_input(m) and id(m) not in unets))


def _held_on_its_input(model: nn.Module, name: str) -> tuple[str, nn.Module] | None:
    """The generic ``Transformer2DModel`` over its input's pixels holding the attention ``name``, where ``model`` is
    not that transformer itself and it is in no UNet (whose feature maps diffusers_unets places): a user's module
    holding it. Its tokens are the pixels of its own input, whose stride in the outer model's input vitmad does not
    know (a user's module may downsample before it); None elsewhere."""
    found = innermost_on_path(model, name, _on_its_input)
    if found is None or found[1] is model or innermost_on_path(model, name, is_unet) is not None:
        return None
    return found


def placer(model: nn.Module, name: str, module: nn.Module):
    """The placer, :class:`Skip` or refusal of a diffusers attention module inside a known image transformer, else
    None."""
    from . import Skip

    if not is_attention(module):
        return None
    found = innermost_on_path(model, name, _owners(model))
    if found is None:
        held = _held_on_its_input(model, name)
        if held is not None:
            # As a TransformerTemporalModel inside a model: said, where no attention layer was found at all (QA 334).
            return RefusingPlacer(
                f"it is an attention of the Transformer2DModel {held[0]} inside {type(model).__name__}, which takes "
                "a continuous [B, C, H, W] input (no patch_size) whose stride in the model's input vitmad does not "
                "know; record the Transformer2DModel itself, whose cells are then pixels of its own input")
        return None
    owner_name, owner = found
    kind = type(owner).__name__
    if kind in _LINEAR:
        return Skip(_CROSS if is_cross_attention(module) else _LINEAR_REASON)
    if kind in _NOT_PLACED:
        return RefusingPlacer(
            f"vitmad does not place the tokens of diffusers' {kind} yet: {_NOT_PLACED[kind]} (it places "
            f"{', '.join(_PLACED)}); pass positions=<[N, 2] latent-pixel position of each token, NaN rows for text "
            "and other tokens off the latent>"
        )
    if is_cross_attention(module):
        return Skip(_CROSS)
    if kind == "SD3ControlNetModel" and owner.pos_embed is None:
        return RefusingPlacer(
            "this SD3ControlNetModel has no pos_embed (SD3.5's large ControlNet): its input is the transformer's "
            "patch embedding, already cut, so vitmad does not see the latent grid; pass positions=<[N, 2] "
            "latent-pixel position of each token>"
        )
    caption_only = _CAPTION_ONLY.get(kind)
    if caption_only is not None and name.startswith(".".join(filter(None, (owner_name, caption_only))) + "."):
        return Skip(f"self-attention of the caption's tokens alone ({kind}'s {caption_only}): they have no position "
                    "in the latent, so it has no MAD")
    if kind == "BriaFibo2Transformer2DModel" and name.rsplit(".", 1)[-1] == "cross_attention":
        return Skip(_CROSS)  # its injection blocks' BriaFibo2Attention, built with kv_dim: keys from the caption
    return LatentGridPlacer(owner_name, owner, module)


class LatentGridPlacer(LayerPlacer):
    """Places one self- or joint-attention layer of a diffusers image transformer: the latent patch grid of this
    call in row-major order, with the caption's tokens (where the attention has them) first or last, without a
    position.

    Args:
        owner_name: qualified name of the transformer (``DiTTransformer2DModel``, ...).
        owner: that module.
        attention: the recorded attention module (its processor is read per call).
    """

    def __init__(self, owner_name: str, owner: nn.Module, attention: nn.Module):
        self.owner_name, self.owner, self.attention = owner_name, owner, attention
        self.kind = type(owner).__name__
        self.cut, self.text_side, self.processors = _PLACED[self.kind]
        if _on_its_input(owner):
            self.cut = "map"  # a Transformer2DModel recorded alone, over its input's pixels
        self.packed = self.cut in ("ids", "shapes", "ids4", "sequence")
        self.caption_embedder = _CAPTION_EMBEDDER.get(self.kind, ("context_embedder", 0))[0]
        self._layouts: dict[tuple, tuple[torch.Tensor, ...]] = {}
        self.keys_key = (_KEY + "other_keys", id(self))

    def install(self, context: CallContext) -> list:
        key = _KEY + self.owner_name
        handles = []
        if self.text_side is None:
            def see_keys(module, args, kwargs) -> None:
                context.values[self.keys_key] = given_other_keys(module, args, kwargs)

            # Self-attention over the latent alone: keys of another tensor in a call (a double_self_attention
            # attn2 given the forward's encoder_hidden_states) are refused in place().
            handles.append(self.attention.register_forward_pre_hook(see_keys, with_kwargs=True))
        argument = _CAPTION_EMBEDDER.get(self.kind, ("context_embedder", 0))[1]
        context_embedder = getattr(self.owner, self.caption_embedder, None)
        if isinstance(context_embedder, nn.Module):
            def see_text(module, args) -> None:
                text = args[argument] if len(args) > argument else None
                if self.kind == "Lumina2Transformer2DModel":
                    context.values[key + ".text"] = _lumina2_caption(text)
                else:
                    context.values[key + ".text"] = int(text.shape[-2]) if isinstance(text, torch.Tensor) else None

            handles.append(context_embedder.register_forward_pre_hook(see_text))
        if self.kind == "BriaFibo2Transformer2DModel":
            def see_gist(module, args) -> None:
                # BriaFibo2PerceiverResampler(encoder_hidden_states, num_gist_tokens, encoder_attention_mask,
                # gist_mask): the gist tokens lead the stream, or end it where the batch pads them (gist_mask).
                count = args[1] if len(args) > 1 else None
                context.values[key + ".text"] = count if isinstance(count, int) else None
                context.values[key + ".side"] = "last" if len(args) > 3 and args[3] is not None else "first"

            handles.append(self.owner.perceiver.register_forward_pre_hook(see_gist))
        second = getattr(self.owner, _SECOND_CAPTION.get(self.kind, ""), None)
        if isinstance(second, nn.Module):
            def see_second_text(module, args) -> None:
                text = args[0] if args else None
                context.values[key + ".text2"] = int(text.shape[-2]) if isinstance(text, torch.Tensor) else None

            handles.append(second.register_forward_pre_hook(see_second_text))
        if self.cut in ("ids4", "latent", "sequence"):
            def see_forward(module, args, kwargs) -> None:
                try:
                    given = inspect.signature(module.forward).bind_partial(*args, **kwargs).arguments
                except TypeError:
                    given = None  # a call its forward itself refuses
                if given is None:
                    seen = f"{self.kind}'s forward got arguments it does not take"
                elif given.get("context_latents"):
                    seen = (f"{self.kind}'s images to edit are in this call (context_latents): their tokens follow "
                            "the image's, places of other latents; vitmad places one latent's tokens and the gist "
                            "tokens; record a text-to-image call")
                elif self.cut == "latent":
                    seen = self._latent_grid(given.get("hidden_states"))
                elif self.cut == "sequence":
                    seen, context.values[key + ".text"] = _ideogram4_layout(given)
                else:
                    seen = _grid_of_forward_ids(self.kind, given)
                context.values[key + ".grid"] = seen

            # These models have no convolution: the recorded model's forward starts the call before this runs.
            handles.append(self.owner.register_forward_pre_hook(see_forward, with_kwargs=True))
        elif self.cut == "shapes":
            def see_shapes(module, args, kwargs) -> None:
                context.values[key + ".grid"] = _grid_of_shapes(args[0] if args else kwargs.get("video_fhw"),
                                                                self.kind)

            handles.append(self.owner.pos_embed.register_forward_pre_hook(see_shapes, with_kwargs=True))
        elif self.packed:
            def see_ids(module, args) -> None:
                text = context.values.get(key + ".text")
                context.values[key + ".grid"] = _grid_of_ids(
                    args[0] if args else None, None if not isinstance(text, int) else text + self._registers(),
                    _IDS[self.kind])

            handles.append(self._patch_embedding().register_forward_pre_hook(see_ids))
        elif self.cut == "map":
            proj_in = self.owner.proj_in

            def see_map(module, args, kwargs) -> None:
                latent = args[0] if args else kwargs.get("hidden_states")
                context.values[key + ".grid"] = self._latent_grid(latent)

            # Its proj_in, a 1x1 Conv2d over the normed input, starts the call (the recorder's first convolution),
            # clearing what came before; a Linear one (use_linear_projection) has none: the model's forward starts it.
            hooked = proj_in if isinstance(proj_in, nn.Conv2d) else self.owner
            handles.append(hooked.register_forward_pre_hook(see_map, with_kwargs=True))
        elif self.cut == "view":
            def see_view(module, args) -> None:
                context.values[key + ".grid"] = self._latent_grid(args[0] if args else None)

            # AuraFlow and CogView4 have no convolution: the model's forward starts the call, before this runs.
            handles.append(self._patch_embedding().register_forward_pre_hook(see_view))
        else:
            conv = self._patch_embedding().proj

            def see_latent(module, args) -> None:
                context.values[key + ".grid"] = self._latent_grid(args[0] if args else None)

            # On the convolution, not on PatchEmbed: the recorder starts a call there, clearing what came before.
            handles.append(conv.register_forward_pre_hook(see_latent))
        return handles

    def _latent_grid(self, latent) -> tuple[int, int, int] | str | None:
        """(batch, height, width) of the image latent the patch embedding gets; why it is not one (a video's
        ``[B, C, F, H, W]``: HunyuanImage built with a Conv3d); None without a tensor."""
        if not isinstance(latent, torch.Tensor):
            return None
        if latent.dim() != 4:
            return (f"{self.kind}'s patch embedding got a latent of shape {list(latent.shape)}; vitmad places the "
                    "patches of an image's [B, C, H, W] latent, not a video's [B, C, F, H, W]")
        return int(latent.shape[0]), int(latent.shape[-2]), int(latent.shape[-1])

    def _where(self) -> str:
        return self.owner_name or type(self.owner).__name__

    def _processor_refusal(self) -> str | None:
        return processor_refusal(self.attention, self.kind, self.processors)

    def refusal_without_attention(self, module: nn.Module) -> str | None:
        # A processor (xFormers') or an attention backend (flash, sage, flex) that computes the attention where
        # vitmad does not look reaches no place().
        return self._processor_refusal() or backend_refusal(self.attention)

    def place(self, context: CallContext, lead: torch.Size, num_queries: int, num_keys: int) -> Placement:
        refusal = self._processor_refusal()
        if refusal is not None:
            raise NotPlaceable(refusal)
        if context.values.get(self.keys_key):
            raise NotPlaceable(
                "it was given encoder_hidden_states in this call, so its keys are those tokens (a caption's), not "
                f"the latent's own ({self.kind}'s blocks hand the forward's encoder_hidden_states to attn2 even where "
                "it was built as self-attention, double_self_attention); vitmad places it only as self-attention over "
                "the latent: leave it out with layers=['*.attn1'], or run the forward without encoder_hidden_states")
        key = _KEY + self.owner_name
        side = context.values.get(key + ".side", self.text_side)  # BriaFibo2's gist tokens: first, or last
        seen = context.values.get(key + ".grid")
        if seen is None:
            what = {"ids": f"{_PATCH_EMBEDDING.get(self.kind, 'pos_embed')} (img_ids)", "ids4": "forward (img_ids)",
                    "shapes": "pos_embed (img_shapes)", "latent": "forward (the latent)",
                    "sequence": "forward (indicator, position_ids)", "map": "forward (its input)",
                    "view": f"{_PATCH_EMBEDDING.get(self.kind, 'pos_embed')} (the latent)"}.get(
                self.cut, f"{_PATCH_EMBEDDING.get(self.kind, 'pos_embed')}.proj (the latent)")
            raise NotPlaceable(
                f"{self.kind}'s {what} did not run in this call before it attended ({self._where()} recorded "
                "from a block called alone?), so the latent grid is unknown; run the transformer's forward"
            )
        if isinstance(seen, str):
            raise NotPlaceable(seen)
        if self.packed:
            batch, grid, stride = int(lead[0]) if len(lead) else 0, seen, (float(self._packing()),) * 2
        else:
            batch, height, width = seen
            grid, stride = self._patch_grid(height, width)
        patches = grid[0] * grid[1]
        text = num_keys - patches
        if side is not None and side.startswith("keys "):
            return self._place_image_queries(context, lead, num_queries, num_keys, batch, grid, stride)
        joint = text > 0
        if joint and side is not None:
            caption = context.values.get(key + ".text")
            if isinstance(caption, str):
                raise NotPlaceable(caption)
            if caption is not None and context.values.get(key + ".text2") is not None:
                caption += context.values[key + ".text2"]
            registers = self._registers()
            if caption is None or caption + registers != text:
                extra = f" and its {registers} register or mode tokens" if registers else ""
                raise NotPlaceable(
                    f"it attends over {num_keys} tokens: the {grid[0]}x{grid[1]} latent patches and {text} more, but "
                    f"{self.kind}'s {self.caption_embedder} got {caption} caption tokens in this call{extra}; vitmad "
                    "places the patches and the caption's tokens alone"
                )
        if len(lead) != 2 or int(lead[0]) != batch or num_queries != num_keys or text < 0 \
                or (joint and side is None):
            sequence = "the latent patches" + (f", the caption's {side}" if side else "")
            raise NotPlaceable(
                f"its attention has shape [{', '.join(map(str, lead))}, {num_queries}, {num_keys}]; on a "
                f"{grid[0]}x{grid[1]} latent patch grid ({batch} latents), a {self.kind} layer attends "
                f"[{batch}, heads, N, N] over {sequence}"
            )
        prefix, suffix = (text, 0) if side == "first" else (0, text)
        layout = (grid, stride, prefix, suffix)
        if layout not in self._layouts:
            self._layouts = {layout: _plain_positions(grid, stride, prefix, suffix)}
        positions, index = self._layouts[layout]
        attention = "global, caption " + ("first" if prefix else "last") if joint else "global"
        geometry = LayerGeometry(grid, stride, attention, int(lead[-1]), prefix, num_suffix_tokens=suffix or None)
        return Placement(positions, None, select_tokens(index), geometry)

    def _place_image_queries(self, context: CallContext, lead: torch.Size, num_queries: int, num_keys: int,
                             batch: int, grid: tuple[int, int], stride: tuple[float, float]) -> Placement:
        """A layer whose queries are the latent patches alone and whose keys are the patches and the caption's
        tokens (PRX: ``cat([caption, image])``; NucleusMoE: ``cat([image, caption])``): the caption's keys have no
        position, and no query is a caption token."""
        patches = grid[0] * grid[1]
        caption = context.values.get(_KEY + self.owner_name + ".text")
        first = self.text_side == "keys first"
        if len(lead) != 2 or int(lead[0]) != batch or num_queries != patches or not isinstance(caption, int) \
                or num_keys != patches + caption:
            order = "the caption's tokens, then the patches" if first else "the patches, then the caption's tokens"
            raise NotPlaceable(
                f"its attention has shape [{', '.join(map(str, lead))}, {num_queries}, {num_keys}]; on a "
                f"{grid[0]}x{grid[1]} latent patch grid ({batch} latents) with {caption} caption tokens "
                f"({self.kind}'s {self.caption_embedder} in this call), a {self.kind} layer attends "
                f"[{batch}, heads, {patches}, {patches} + {caption}]: the patches' queries over {order}"
            )
        layout = (grid, stride, caption, first)
        if layout not in self._layouts:
            cells = cell_centres(*grid, stride).reshape(-1, 2)
            caption_keys = torch.full((caption, 2), float("nan"))
            keys = torch.cat([caption_keys, cells] if first else [cells, caption_keys])
            self._layouts = {layout: read_only(cells, keys, torch.arange(patches), positions=2)}
        cells, keys, index = self._layouts[layout]
        geometry = LayerGeometry(grid, stride, "global, caption keys " + ("first" if first else "last"), int(lead[-1]))
        return Placement(cells, keys, select_tokens(index), geometry)

    def _packing(self) -> int:
        """The latent pixels per token side of a packed model: NucleusMoEImagePipeline packs patch_size x patch_size
        (the transformer's config); the others 2 x 2."""
        if self.kind == "NucleusMoEImageTransformer2DModel":
            return int(self.owner.config.patch_size)
        return _FLUX_PACKING

    def _patch_embedding(self) -> nn.Module:
        return getattr(self.owner, _PATCH_EMBEDDING.get(self.kind, "pos_embed"))

    def _registers(self) -> int:
        """The tokens before the caption's that its embedder does not count: AuraFlow's learned register tokens
        (``cat([register_tokens, caption])``); a union FluxControlNetModel's one control-mode token
        (``cat([controlnet_mode_emb, caption])``, its ``txt_ids`` repeated for it)."""
        if self.kind == "FluxControlNetModel":
            return 1 if getattr(self.owner, "union", False) is True else 0
        registers = getattr(self.owner, "register_tokens", None)
        return int(registers.shape[1]) if isinstance(registers, torch.Tensor) and registers.dim() == 3 else 0

    def _patch_grid(self, height: int, width: int) -> tuple[tuple[int, int], tuple[float, float]]:
        if self.cut == "map":
            return (height, width), (1.0, 1.0)  # one token per pixel of its input, row-major
        if self.cut == "latent":
            # PRX's img2seq: whole patches of its config's patch_size, row-major (a side it does not divide fails
            # there).
            patch = int(self.owner.config.patch_size)
            return (height // patch, width // patch), (float(patch), float(patch))
        if self.cut == "view":
            # AuraFlowPatchEmbed and CogView4PatchEmbed view the latent as whole patches (a side the patch does not
            # divide fails there).
            patch = int(self._patch_embedding().patch_size)
            return (height // patch, width // patch), (float(patch), float(patch))
        conv = self._patch_embedding().proj
        where = f"{self._where()}.{_PATCH_EMBEDDING.get(self.kind, 'pos_embed')}.proj"
        if not isinstance(conv, nn.Conv2d):
            raise NotPlaceable(f"{where} is a {type(conv).__name__}; vitmad places the patches of a Conv2d over a "
                               "[B, C, H, W] latent (an image), not a video's")
        kernel, stride = pair(conv.kernel_size), pair(conv.stride)
        if kernel != stride or pair(conv.padding) != (0, 0) or pair(conv.dilation) != (1, 1):
            raise NotPlaceable(
                f"{where} cuts the latent with kernel {kernel}, stride {stride}, padding "
                f"{pair(conv.padding)} and dilation {pair(conv.dilation)}; vitmad places whole patches (kernel == "
                "stride, no padding, no dilation) only"
            )
        grid = ((height - kernel[0]) // stride[0] + 1, (width - kernel[1]) // stride[1] + 1)
        return grid, (float(stride[0]), float(stride[1]))


def _lumina2_caption(mask) -> int | str | None:
    """The caption's token count of a ``Lumina2Transformer2DModel`` call from its mask ``[B, S]``: the sum of each
    entry's, which ``Lumina2RotaryPosEmbed`` puts first (the padding dropped); where entries differ, each entry's
    image starts at its own place, and the reason (a string) is returned."""
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        return None
    lengths = {int(v) for v in mask.sum(dim=1).tolist()}
    if len(lengths) == 1:
        return lengths.pop()
    return (f"its batch holds captions of {len(lengths)} different lengths (encoder_attention_mask sums "
            f"{sorted(lengths)}): Lumina2 then starts each entry's image after its own caption, and vitmad places a "
            "batch whose captions have one length (Lumina2Pipeline runs each prompt, and the negative one, alone); "
            "record the entries one at a time")


def _grid_of_shapes(shapes, kind: str) -> tuple[int, int] | str:
    """The ``(rows, columns)`` grid of QwenImage's or NucleusMoE's ``img_shapes`` (per batch entry, the ``(frames,
    rows, columns)`` of each image packed in its sequence, or that tuple alone), where every entry packs one image of
    one frame and all the same size (as ``QwenImagePipeline`` and ``NucleusMoEImagePipeline`` make them); else the
    reason (a string)."""
    model, pipeline, caption = {
        "NucleusMoEImageTransformer2DModel": ("NucleusMoE", "NucleusMoEImagePipeline", "which are keys after them"),
    }.get(kind, ("QwenImage", "QwenImagePipeline", "which come first"))
    entries = shapes if isinstance(shapes, (list, tuple)) else [shapes]
    entries = [entry if isinstance(entry, list) else [entry] for entry in entries]
    found = {tuple(int(v) for v in image) for entry in entries for image in entry
             if isinstance(image, (list, tuple)) and len(image) == 3}
    if entries and all(len(entry) == 1 for entry in entries) and len(found) == 1:
        frames, rows, columns = next(iter(found))
        if frames == 1:
            return rows, columns
    return (f"{model}'s img_shapes are {shapes!r}; vitmad places one image of one frame per batch entry, all the "
            f"same size, as {pipeline} packs them (an edit pipeline's several images, or images of different "
            "sizes, are not placed); pass positions=<[N, 2] latent-pixel position of each token, NaN rows for the "
            f"caption's tokens, {caption}>")


def _grid_of_ids(ids, text: int | None, spec: tuple) -> tuple[int, int] | str:
    """The ``(rows, columns)`` grid of a Flux-like model's ``img_ids``: the rows of ``ids``
    (``cat([txt_ids, img_ids])``, what its ``pos_embed`` gets) past the ``text`` tokens before the image; or, where
    they are no grid vitmad understands, the reason (a string). ``spec``: the model's entry of ``_IDS``."""
    model, first, shifted, pipeline, example = spec
    form = f"({first}, row, column)"
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[-1] != 3 or text is None:
        return (f"{model}'s position ids are {None if not isinstance(ids, torch.Tensor) else list(ids.shape)} with "
                f"{text} caption tokens; vitmad places the [N, 3] {form} img_ids of {pipeline}")
    return _grid_of_image_ids(ids[text:], model, form, pipeline, example, first, shifted)


def _grid_of_image_ids(image, model: str, form: str, pipeline: str, example: str, first: float = 0.0,
                       shifted: bool = False, scaled: bool = False) -> tuple[int, int] | str:
    """The ``(rows, columns)`` grid of image ids ``[N, K]`` whose columns 1 and 2 are the row and column of a
    row-major grid from 0 (``shifted``: from the first id's row and column; ``scaled``: times one step, the smallest
    positive one of them), column 0 ``first`` and every other column 0; else the reason (a string)."""
    image = image.detach().to("cpu", torch.float64)
    origin = image[0, 1:3].clone() if shifted and len(image) else torch.zeros(2, dtype=torch.float64)
    steps = image[:, 1:3][image[:, 1:3] > 0]
    step = float(steps.min()) if scaled and len(steps) else 1.0
    image = image.clone()
    image[:, 1:3] /= step  # a step of a power of 2 (Flux3's 0.5) divides exactly
    rows = int(image[:, 1].max() - origin[0]) + 1 if len(image) else 0
    columns = len(image) // rows if rows > 0 else 0
    if rows > 0 and rows * columns == len(image):
        r, c = torch.meshgrid(torch.arange(rows, dtype=torch.float64), torch.arange(columns, dtype=torch.float64),
                              indexing="ij")
        expected = torch.zeros_like(image)
        expected[:, 0] = first
        expected[:, 1], expected[:, 2] = r.reshape(-1) + origin[0], c.reshape(-1) + origin[1]
        if torch.equal(image, expected):
            return rows, columns
    return (f"{model}'s img_ids ({len(image)} rows) are not the row-major grid of {form} ids {pipeline} makes for "
            f"one latent ({example}; an edit pipeline may offset them): vitmad does not know where those tokens are; "
            "pass positions=<[N, 2] latent-pixel position of each token, NaN rows for the caption's tokens, which "
            "come first>")


def _ideogram4_layout(kwargs: dict) -> tuple[tuple[int, int] | str, int | None]:
    """The ``(rows, columns)`` grid of an ``Ideogram4Transformer2DModel`` call and the tokens before it, from its
    forward's ``indicator`` ``[B, L]`` and ``position_ids`` ``[B, L, 3]``; or the reason (a string) and None.

    ``Ideogram4Pipeline._prepare_ids`` lays out each row as ``[padding][caption][image]``: the image's tokens (indicator
    ``OUTPUT_IMAGE_INDICATOR``) the last ``rows * columns`` of every row, at ``IMAGE_POSITION_OFFSET + (0, row,
    column)``, row-major; the padding and the caption before them, without a position (the padding in a segment of its
    own, which the image's queries do not see)."""
    from diffusers.models.transformers import transformer_ideogram4 as ideogram

    indicator, ids = kwargs.get("indicator"), kwargs.get("position_ids")
    refusal = ("Ideogram4's indicator and position_ids are {}; vitmad places the rows Ideogram4Pipeline makes: "
               "padding and caption, then one image's tokens, the same count in every row, at IMAGE_POSITION_OFFSET "
               "+ (0, row, column), row-major; pass positions=<[N, 2] latent-pixel position of each token, NaN rows "
               "for the others>")
    if not isinstance(indicator, torch.Tensor) or not isinstance(ids, torch.Tensor) or indicator.dim() != 2 \
            or ids.dim() != 3 or ids.shape[:2] != indicator.shape or ids.shape[-1] != 3:
        return refusal.format("not [B, L] and [B, L, 3] tensors"), None
    image = indicator == ideogram.OUTPUT_IMAGE_INDICATOR
    count = int(image[0].sum())
    length = indicator.shape[1]
    if count == 0 or not bool(image[:, length - count:].all()) or bool(image[:, :length - count].any()):
        return refusal.format(f"{sorted({int(v) for v in image.sum(dim=1)})} image tokens per row, not all at its "
                              "end"), None
    grids = set()
    offset = float(ideogram.IMAGE_POSITION_OFFSET)
    for row in ids[:, length - count:]:
        grids.add(_grid_of_image_ids(row.to(torch.float64) - offset, "Ideogram4", "IMAGE_POSITION_OFFSET + (0, row, "
                                     "column)", "Ideogram4Pipeline", "another image's would be elsewhere"))
    grid = grids.pop() if len(grids) == 1 else refusal.format("grids of different sizes")
    return grid, length - count if isinstance(grid, tuple) else None


def _grid_of_forward_ids(kind: str, kwargs: dict) -> tuple[int, int] | str:
    """The ``(rows, columns)`` grid of the ``img_ids`` a Flux2 or Flux3 forward gets, from its arguments by name, or
    the reason (a string). Flux2: ``[N, 4]`` or ``[B, N, 4]`` (of which it reads the first), ``(0, row, column, 0)``;
    Flux3: ``[N, 4]``, ``(0, s row, s column, 0)`` (``_prepare_image_ids`` scales rows and columns by the pipeline's
    ``image_rope_scale``, 0.5: any one step ``s`` is read as the grid it steps over)."""
    if kind == "Flux3Transformer2DModel":
        model, pipeline, form = "Flux3", "Flux3 modular pipeline", "(0, s row, s column, 0)"
        if kwargs.get("image_cond_hidden_states") is not None:
            return ("Flux3's reference images are in this call (image_cond_hidden_states): their tokens join the "
                    "image's in the single blocks, places of other latents; vitmad places one latent's tokens and the "
                    "caption's; record a text-to-image call")
        example = "a reference image's have a last id of -1 or less"
    else:
        model, pipeline, form = "Flux2", "Flux2Pipeline", "(0, row, column, 0)"
        if kwargs.get("kv_cache_mode") is not None or kwargs.get("kv_cache") is not None \
                or kwargs.get("num_ref_tokens"):
            return ("Flux2's reference-image KV cache is in use (kv_cache / kv_cache_mode / num_ref_tokens): its "
                    "reference tokens are not places of this latent; vitmad places one latent's tokens and the "
                    "caption's")
        example = "a reference image's have a first id of 10 or more"
    ids = kwargs.get("img_ids")
    if kind != "Flux3Transformer2DModel" and isinstance(ids, torch.Tensor) and ids.dim() == 3:
        ids = ids[0]  # as Flux2Transformer2DModel.forward reads them
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[-1] != 4:
        return (f"{model}'s img_ids are {None if not isinstance(ids, torch.Tensor) else list(ids.shape)}; vitmad "
                f"places the [N, 4] {form} img_ids of {pipeline}")
    return _grid_of_image_ids(ids, model, form, pipeline, example, scaled=kind == "Flux3Transformer2DModel")
