"""Hugging Face diffusers' image transformers whose caption (and other conditioning tokens) joins the latent's patches
in one sequence that their own forward builds: ERNIE-Image, HiDream-I1 and OmniGen. What they attend over is read
per call from the modules that make that sequence, and the latent's patches are the tokens with a position.

The recorded module is the transformer a pipeline calls (``pipe.transformer``): positions and MAD are in latent
pixels of its input (a pipeline's latent pixel is ``pipe.vae_scale_factor`` image pixels); each forward is one
denoising step, one of ``rec.calls`` (as in :mod:`.diffusers_images`).

- ``ErnieImageTransformer2DModel``: ``x_embedder.proj``, a ``Conv2d`` of kernel = stride = ``patch_size``, cuts the
  latent ``[B, C, H, W]`` and flattens it row-major; its forward attends over ``cat([image, caption])``, the
  caption ``text_bth`` padded to its longest entry (``text_lens`` masks the padding as keys). The caption reaches the
  layers through no module of its own (``text_proj`` is None where ``text_in_dim`` is the model's width), so the
  sequence's length is read from the ids ``pos_embed`` gets (``cat([image_ids, text_ids])``, one per token): the
  caption is what follows the patches. Its 3-axis RoPE changes the logits, never the geometry.
- ``HiDreamImageTransformer2DModel``: ``patchify`` cuts the latent into whole patches, row-major, and, for a
  non-square latent (H != W), pads the sequence to ``max_seq`` (``max_resolution`` over the patch area) with zero
  tokens whose keys its processor multiplies by ``hidden_states_masks``' 0: attended with logit 0, not masked, so
  they draw attention mass. Its double-stream blocks attend over ``cat([image and pads, caption])``, the caption
  ``cat([T5, the last Llama layer's, this block's Llama layer's])``; its single-stream blocks over one sequence of
  the same order (the image and pads first). Each block's caption count is read from that block's own attention
  call (``norm_encoder_hidden_states``; a single block's: its sequence past the image and pads). The pads and the
  caption are tokens without a position after the grid. Its MoE feed-forward does not touch the attention. A latent
  given already patchified (3-D, with ``hidden_states_masks``, ``img_ids`` and ``img_sizes``) is refused: its
  tokens' places are then the caller's ids.
- ``OmniGenTransformer2DModel``: one Phi-3 sequence ``cat([condition, time token, latent patches])``; the condition
  is the prompt's token ids (``embed_tokens``) with each input image's patches written over its placeholder ids,
  left-padded by the pipeline (the padding masked by its ``attention_mask``). The latent's patches
  (``patch_embedding.output_image_proj``, a ``Conv2d`` of kernel = stride = ``patch_size``, row-major) are the last
  tokens, and the only ones with a position: an input image's patches are another image's, with no place in this
  latent, so they are tokens without a position like the prompt's text and the time token (their mass is part of
  ``prefix_mass``). Its ``position_ids`` feed the RoPE: logits only.

MAD is over the latent's queries and keys. ``prefix_mass`` is the latent queries' mass on every token without a
position: the caption (ERNIE, HiDream), HiDream's padding tokens (which its processor attends with logit 0), and
OmniGen's prompt, input-image patches and time token; ``stats=[..., "prefix_maps"]`` gives each such token's row.

Refused: a processor vitmad has not read, also when it attends out of vitmad's sight, and ERNIE-Image's attention on
a diffusers backend that calls no ``F.scaled_dot_product_attention`` (HiDream's and OmniGen's processors call it
themselves).
"""

from __future__ import annotations

import torch
from torch import nn

from ..placement import CallContext, LayerGeometry, LayerPlacer, NotPlaceable, Placement, select_tokens
from .diffusers_common import attention_under, backend_refusal, is_attention, is_diffusers_class, processor_refusal
from .plain import _plain_positions
from .stages import forward_arguments, innermost_on_path, pair

__all__ = ["placer", "attention_modules", "JointSequencePlacer"]

_ERNIE, _HIDREAM, _OMNIGEN = "ErnieImageTransformer2DModel", "HiDreamImageTransformer2DModel", \
    "OmniGenTransformer2DModel"
# The processors whose calls vitmad has read, per model.
_PROCESSORS = {_ERNIE: ("ErnieImageSingleStreamAttnProcessor",), _HIDREAM: ("HiDreamAttnProcessor",),
               _OMNIGEN: ("OmniGenAttnProcessor2_0",)}
_KEY = "diffusers_captioned."  # + the transformer's name + what this call's hooks saw


def _owner(module: nn.Module) -> bool:
    return is_diffusers_class(module, _PROCESSORS)


def attention_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The diffusers attention modules inside the transformers this family places."""
    return attention_under(model, _owner)


def placer(model: nn.Module, name: str, module: nn.Module):
    """The placer of a diffusers attention module inside ERNIE-Image, HiDream or OmniGen, else None."""
    if not is_attention(module):
        return None
    found = innermost_on_path(model, name, _owner)
    if found is None:
        return None
    return JointSequencePlacer(*found, module)


def _conv_grid(conv: nn.Module, where: str, output) -> tuple[int, tuple[int, int], tuple[float, float]] | str:
    """``(batch, grid, stride)`` of the patches a patch-embedding ``Conv2d`` made (its output ``[B, D, gh, gw]``),
    or why vitmad does not place them (a string)."""
    kernel, stride = pair(conv.kernel_size), pair(conv.stride)
    if kernel != stride or pair(conv.padding) != (0, 0) or pair(conv.dilation) != (1, 1):
        return (f"{where} cuts the latent with kernel {kernel}, stride {stride}, padding {pair(conv.padding)} and "
                f"dilation {pair(conv.dilation)}; vitmad places whole patches (kernel == stride, no padding, no "
                "dilation) only")
    if not isinstance(output, torch.Tensor) or output.dim() != 4:
        return f"{where} made no [B, D, H, W] patch map"
    return int(output.shape[0]), (int(output.shape[-2]), int(output.shape[-1])), (float(stride[0]), float(stride[1]))


class JointSequencePlacer(LayerPlacer):
    """Places one attention layer of ERNIE-Image, HiDream or OmniGen: the latent's patches row-major at their cells,
    every other token (caption, HiDream's padding, OmniGen's prompt, input images and time token) without a position,
    before the patches (OmniGen) or after them.

    Args:
        owner_name: qualified name of the transformer.
        owner: that module.
        attention: the recorded attention module (its processor is read per call).
    """

    def __init__(self, owner_name: str, owner: nn.Module, attention: nn.Module):
        self.owner_name, self.owner, self.attention = owner_name, owner, attention
        self.kind = type(owner).__name__
        self.processors = _PROCESSORS[self.kind]
        self._key = _KEY + owner_name
        self._layouts: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    # Hooks -------------------------------------------------------------------------------------------------------

    def install(self, context: CallContext) -> list:
        key, owner = self._key, self.owner
        if self.kind in (_ERNIE, _OMNIGEN):
            where = "x_embedder.proj" if self.kind == _ERNIE else "patch_embedding.output_image_proj"
            conv = owner.get_submodule(where)

            def see_patches(module, args, output) -> None:
                context.values[key + ".grid"] = _conv_grid(module, f"{self._where()}.{where}", output)

            # A forward hook: the recorder starts the call in this convolution's pre-hook, clearing what came before.
            handles = [conv.register_forward_hook(see_patches)]
            if self.kind == _ERNIE:
                def see_ids(module, args) -> None:
                    ids = args[0] if args else None
                    context.values[key + ".tokens"] = int(ids.shape[1]) if isinstance(ids, torch.Tensor) \
                        and ids.dim() == 3 else None

                # cat([image_ids, text_ids]): one id per token of the sequence its layers attend over.
                handles.append(owner.pos_embed.register_forward_pre_hook(see_ids))
            else:
                def see_prompt(module, args) -> None:
                    ids = args[0] if args else None
                    context.values[key + ".prompt"] = int(ids.shape[-1]) if isinstance(ids, torch.Tensor) else None

                # Its forward embeds input_ids only where it has some; then the condition is the time token alone.
                handles.append(owner.embed_tokens.register_forward_pre_hook(see_prompt))
            return handles

        def see_latent(module, args, kwargs) -> None:
            context.values[key + ".grid"] = self._hidream_latent(module, args, kwargs)

        def see_sequence(module, args) -> None:
            tokens = args[0] if args else None
            context.values[key + ".tokens"] = int(tokens.shape[1]) if isinstance(tokens, torch.Tensor) else None

        def see_block(module, args, kwargs) -> None:
            try:
                given = forward_arguments(module, args, kwargs)
            except TypeError:
                given = {}  # a call its forward itself refuses
            stream, caption = given.get("norm_hidden_states"), given.get("norm_encoder_hidden_states")
            context.values[key + ".call." + str(id(module))] = (
                int(stream.shape[1]) if isinstance(stream, torch.Tensor) else None,
                int(caption.shape[1]) if isinstance(caption, torch.Tensor) else None)

        # HiDream has no convolution: the recorded model's forward starts the call before these run.
        return [owner.register_forward_pre_hook(see_latent, with_kwargs=True),
                owner.x_embedder.register_forward_pre_hook(see_sequence),
                self.attention.register_forward_pre_hook(see_block, with_kwargs=True)]

    def _hidream_latent(self, model: nn.Module, args, kwargs) -> tuple | str:
        """``(batch, grid, stride)`` of the latent a HiDream forward patchifies, or why vitmad does not place it."""
        try:
            given = forward_arguments(model, args, kwargs)
        except TypeError:
            return "HiDream's forward got arguments it does not take"
        latent = given.get("hidden_states")
        if given.get("hidden_states_masks") is not None or not isinstance(latent, torch.Tensor) or latent.dim() != 4:
            return (f"HiDream's forward got hidden_states of shape "
                    f"{list(latent.shape) if isinstance(latent, torch.Tensor) else None}"
                    f"{' with hidden_states_masks' if given.get('hidden_states_masks') is not None else ''}; vitmad "
                    "places the [B, C, H, W] latent HiDreamImagePipeline passes, which the model patchifies itself "
                    "(a latent given patchified is placed by its img_ids, which vitmad does not read); pass "
                    "positions=<[N, 2] latent-pixel position of each token, NaN rows for the others>")
        patch = int(model.config.patch_size)
        # patchify: whole patches, row-major (a side the patch does not divide fails there).
        return int(latent.shape[0]), (latent.shape[-2] // patch, latent.shape[-1] // patch), (float(patch),) * 2

    # Placement ---------------------------------------------------------------------------------------------------

    def _where(self) -> str:
        return self.owner_name or self.kind

    def _processor_refusal(self) -> str | None:
        return processor_refusal(self.attention, self.kind, self.processors)

    def refusal_without_attention(self, module: nn.Module) -> str | None:
        refusal = self._processor_refusal()
        if refusal is None and self.kind == _ERNIE:
            # Its processor calls dispatch_attention_fn: a backend (flash, sage, flex) attends out of sight.
            return backend_refusal(self.attention)
        return refusal

    def place(self, context: CallContext, lead: torch.Size, num_queries: int, num_keys: int) -> Placement:
        refusal = self._processor_refusal()
        if refusal is not None:
            raise NotPlaceable(refusal)
        seen = context.values.get(self._key + ".grid")
        if seen is None:
            raise NotPlaceable(
                f"{self.kind}'s patch embedding did not run in this call before it attended ({self._where()} "
                "recorded from a block called alone?), so the latent grid is unknown; run the transformer's forward")
        if isinstance(seen, str):
            raise NotPlaceable(seen)
        batch, grid, stride = seen
        patches = grid[0] * grid[1]
        prefix, suffix, sequence, attention = self._others(context, patches)
        tokens = prefix + patches + suffix
        if len(lead) != 2 or int(lead[0]) != batch or num_queries != num_keys or num_keys != tokens:
            raise NotPlaceable(
                f"its attention has shape [{', '.join(map(str, lead))}, {num_queries}, {num_keys}]; on a "
                f"{grid[0]}x{grid[1]} latent patch grid ({batch} latents), a {self.kind} layer attends "
                f"[{batch}, heads, {tokens}, {tokens}] over {sequence}")
        layout = (grid, stride, prefix, suffix)
        if layout not in self._layouts:
            self._layouts = {layout: _plain_positions(grid, stride, prefix, suffix)}
        positions, index = self._layouts[layout]
        geometry = LayerGeometry(grid, stride, attention, int(lead[-1]), prefix, num_suffix_tokens=suffix or None)
        return Placement(positions, None, select_tokens(index), geometry)

    def _others(self, context: CallContext, patches: int) -> tuple[int, int, str, str]:
        """``(before, after, the sequence in words, the attention in words)``: the tokens without a position before
        and after the latent's patches in this call's sequence, as the model's own hooks read it."""
        values, key = context.values, self._key
        if self.kind == _OMNIGEN:
            prompt = int(values.get(key + ".prompt") or 0)
            return prompt + 1, 0, f"its prompt's {prompt} tokens (input images' patches among them), its time token " \
                "and the latent's patches", "global, prompt and time token first"
        sequence = values.get(key + ".tokens")
        if self.kind == _ERNIE:
            if sequence is None or sequence < patches:
                raise NotPlaceable(f"ERNIE-Image's pos_embed got ids of {sequence} tokens in this call, not the "
                                   f"{patches} latent patches and the caption's; run the transformer's forward")
            return 0, sequence - patches, f"the latent patches and the caption's {sequence - patches} tokens", \
                "global, caption last"
        stream, caption = values.get(key + ".call." + str(id(self.attention)), (None, None))
        if sequence is None or stream is None or sequence < patches or stream < sequence \
                or (caption is not None and stream != sequence):
            raise NotPlaceable(
                f"HiDream's x_embedder got {sequence} tokens for {patches} latent patches, and this attention "
                f"{stream} tokens of the image's stream and {caption} of the caption's: vitmad places the image's "
                "stream [patches, padding to max_seq] followed by the caption")
        pads = sequence - patches
        text = caption if caption is not None else stream - sequence
        words = f"the latent patches, {pads} padding tokens and the caption's {text} tokens" if pads else \
            f"the latent patches and the caption's {text} tokens"
        return 0, pads + text, words, "global, padding and caption last" if pads else "global, caption last"
