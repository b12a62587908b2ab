"""Hugging Face diffusers' Z-Image (Tongyi's Z-Image, Z-Image-Turbo): ``ZImageTransformer2DModel`` and its
``ZImageControlNetModel``, whose batch is a list of latents, each entry its own sequence (diffusers 0.42.1,
``transformer_z_image.py``, ``controlnet_z_image.py``).

The recorded module is the transformer a pipeline calls (``pipe.transformer``), whose input ``x`` is a list of
latents ``[C, F, H, W]`` (``ZImagePipeline``: ``latents.unsqueeze(2).unbind(0)``, one frame): positions and MAD are
in latent pixels of them (the pipeline's latent pixel is ``pipe.vae_scale_factor`` image pixels, 8 with its VAE;
vitmad does not guess the VAE). Each forward is one denoising step, one of ``rec.calls``.

Each entry ``i`` of the batch (``patchify_and_embed``):

- its latent is cut into whole ``p x p`` patches (``patch_size``; ``f_patch_size`` frames, 1 in every released
  model), ``view`` + ``permute`` to ``(frame, row, column)`` order, projected by a ``Linear``: ``n_i = (H / p)(W / p)``
  tokens of one frame, row-major. Then ``_pad_with_ids`` pads them to a multiple of ``SEQ_MULTI_OF`` (32) with copies
  of the last, which ``_prepare_sequence`` replaces by the learned ``x_pad_token``: ``xlen_i`` tokens, the pad
  tokens attended (no mask hides them) but no patch of the latent: tokens without a position, as registers are.
- its caption ``cap_feats[i]`` (``L_i`` tokens, the prompt's padding already dropped by the pipeline) is padded to a
  multiple of 32 alike, ``cap_pad_token`` for the copies: ``clen_i`` tokens, attended, without a position.

``noise_refiner`` (and the ControlNet's ``control_noise_refiner``) attends over each entry's ``xlen_i`` image
tokens, ``context_refiner`` over its ``clen_i`` caption tokens (skipped: nothing of the latent), and the main
``layers`` (the ControlNet's ``control_layers``) over ``[image tokens, caption tokens]`` (``_build_unified_sequence``,
basic mode: the image first). In each, the entries are padded with zeros to the batch's longest sequence, and those
slots are masked out as keys (``attn_mask`` ``[B, 1, 1, N]``, True for the entry's own tokens; None where every
entry is as long): they are no token of the entry, no position, zero mass. So entry ``i``'s patches are its first
``n_i`` tokens in every layer; everything after them has no position, and ``prefix_mass`` is the patches' mass on
the pad tokens and (in the main layers) the caption's tokens. Entries of different latent sizes have grids of their
own (``LayerGeometry.image_grids``, ``Placement.present``): positions ``[B, 1, N, 2]`` per entry. The 3-axis RoPE ids
(caption index, row, column) change the logits, never the geometry.

Read per call from the transformer's forward arguments (``x``, ``cap_feats``, ``patch_size``, ``f_patch_size``; the
ControlNet's ``control_context``, which must be latents of the same frames and sizes as ``x``, as its pipeline makes
them). Refused: the Omni call (``x`` a list of lists: condition images and SigLIP tokens in one sequence with the
caption first), a latent of several patch frames, a processor other than ``ZSingleStreamAttnProcessor``, an attention
backend vitmad does not see, a Z-Image layer run outside its model's forward (``ZImageControlNetModel.from_transformer``
shares the transformer's ``noise_refiner``, so one recorded model's refiner runs in the other's forward), and a
ControlNet built with ``add_control_noise_refiner="control_layers"``, whose ``control_layers`` attend twice per
forward over two layouts.
"""

from __future__ import annotations

import inspect
import sys
from dataclasses import dataclass

import torch
from torch import nn

from ..placement import CallContext, LayerGeometry, LayerPlacer, NotPlaceable, Placement, RefusingPlacer, read_only
from .diffusers_common import attention_under, backend_refusal, is_attention, is_diffusers_class, processor_refusal
from .stages import innermost_on_path

__all__ = ["placer", "attention_modules", "ZImagePlacer"]

_MODELS = ("ZImageTransformer2DModel", "ZImageControlNetModel")
# ZSingleStreamAttnProcessor (the ControlNet's module holds a copy of the same name): q, k unflattened to heads,
# RMS-normed, RoPE'd, then dispatch_attention_fn over [B, N, heads, D] with the [B, 1, 1, N] padding mask.
_PROCESSORS = ("ZSingleStreamAttnProcessor",)
# The blocks of each model by attribute: over the image tokens alone, or over [image, caption].
_IMAGE_BLOCKS = ("noise_refiner", "control_noise_refiner")
_JOINT_BLOCKS = ("layers", "control_layers")
_CAPTION_ONLY = ("self-attention of the caption's tokens alone (Z-Image's context_refiner): they have no position in "
                 "the latent, so it has no MAD")
_OMNI = ("Z-Image Omni's call (x a list of lists: each entry's condition images and its target in one sequence, "
         "[captions, images, SigLIP tokens], the caption first, with per-token noise masks) is not placed by vitmad; "
         "record the basic call (x a list of latents, ZImagePipeline's), or pass positions=<[B, N, 2] latent-pixel "
         "position of each token, NaN rows for the others>")
_KEY = "diffusers_zimage."  # + the model's name: this call's _Tokens, or why there are none (a string)


def _owner(module: nn.Module) -> bool:
    return is_diffusers_class(module, _MODELS)


def attention_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The diffusers attention modules inside a Z-Image transformer or ControlNet."""
    return attention_under(model, _owner)


def placer(model: nn.Module, name: str, module: nn.Module):
    """The placer, :class:`Skip` or refusal of an attention module inside a Z-Image model, else None."""
    from . import Skip

    if not is_attention(module):
        return None
    found = innermost_on_path(model, name, _owner)
    if found is None:
        return None
    owner_name, owner = found
    kind = type(owner).__name__
    block = (name[len(owner_name) + 1:] if owner_name else name).split(".")[0]
    if block == "context_refiner":
        return Skip(_CAPTION_ONLY)
    if block == "siglip_refiner":  # Omni's SigLIP tokens alone: runs only in the Omni call
        return RefusingPlacer(_OMNI)
    if kind == "ZImageControlNetModel" and getattr(owner, "add_control_noise_refiner", None) == "control_layers":
        return RefusingPlacer(
            "this ZImageControlNetModel is built with add_control_noise_refiner='control_layers': each of its "
            "control_layers attends twice per forward, over the control image's tokens alone, then over [image, "
            "caption], two layouts under one layer name, which vitmad does not record apart; pass positions=<[B, N, "
            "2] latent-pixel position of each token> for one of them")
    if block not in _IMAGE_BLOCKS + _JOINT_BLOCKS:
        return RefusingPlacer(f"vitmad has not read the tokens of {kind}'s {block} blocks (it places "
                              f"{', '.join(_IMAGE_BLOCKS + _JOINT_BLOCKS)})")
    return ZImagePlacer(owner_name, owner, module, joint=block in _JOINT_BLOCKS)


@dataclass(frozen=True)
class _Tokens:
    """Where one forward's tokens are, per batch entry.

    Attributes:
        grids: ``(rows, columns)`` of each entry's patch grid.
        patch: latent pixels per patch side.
        image: each entry's image tokens: its patches, then its pad tokens (a multiple of ``SEQ_MULTI_OF``).
        caption: each entry's caption tokens, padded alike.
    """

    grids: tuple[tuple[int, int], ...]
    patch: int
    image: tuple[int, ...]
    caption: tuple[int, ...]


def _padded(count: int, multiple: int) -> int:
    return count + (-count) % multiple


def _tokens_of(owner: nn.Module, args: tuple, kwargs: dict) -> _Tokens | str:
    """The tokens of a Z-Image forward from its arguments, or why they are not placed (a string)."""
    kind = type(owner).__name__
    try:
        bound = inspect.signature(owner.forward).bind(*args, **kwargs)
    except TypeError:
        return f"{kind}'s forward got arguments it does not take"
    bound.apply_defaults()
    given = bound.arguments
    latents, captions = given.get("x"), given.get("cap_feats")
    patch, frames = given.get("patch_size"), given.get("f_patch_size")
    if isinstance(latents, (list, tuple)) and any(isinstance(entry, (list, tuple)) for entry in latents):
        return _OMNI
    multiple = getattr(sys.modules.get(type(owner).__module__), "SEQ_MULTI_OF", None)
    if not isinstance(multiple, int) or not isinstance(patch, int) or not isinstance(frames, int):
        return (f"{kind}'s patch_size ({patch!r}), f_patch_size ({frames!r}) or its module's SEQ_MULTI_OF "
                f"({multiple!r}) is not an int: not the diffusers 0.42 Z-Image vitmad has read")
    if not isinstance(latents, (list, tuple)) or not latents or not isinstance(captions, (list, tuple)) \
            or len(captions) != len(latents) \
            or any(not isinstance(t, torch.Tensor) or t.dim() != 4 for t in latents) \
            or any(not isinstance(t, torch.Tensor) or t.dim() != 2 for t in captions):
        return (f"{kind} got x {_shapes(latents)} and cap_feats {_shapes(captions)}; vitmad places a list of latents "
                "[C, F, H, W] and a list of captions [L, D], one of each per batch entry (ZImagePipeline's call)")
    sizes = [tuple(int(s) for s in latent.shape[1:]) for latent in latents]
    if any(size[0] // frames != 1 for size in sizes):
        return (f"{kind} got latents of frames {[size[0] for size in sizes]} with f_patch_size {frames}: tokens of "
                "several frames (in (frame, row, column) order); vitmad places one frame's patches, as ZImagePipeline "
                "passes them")
    control = given.get("control_context")
    if kind == "ZImageControlNetModel" and (
            not isinstance(control, (list, tuple)) or len(control) != len(latents)
            or any(not isinstance(c, torch.Tensor) or c.dim() != 4 or tuple(c.shape[1:]) != size
                   for c, size in zip(control, sizes))):
        # Its control tokens are added onto the image's slot by slot (before_proj(c) + x) and padded with x's mask.
        return (f"ZImageControlNetModel got control_context {_shapes(control)} for latents {sizes}: vitmad places "
                "control latents of each entry's own frames and size (as ZImageControlNetPipeline prepares them), "
                "whose patches then stand on the latent's cells")
    grids = tuple((size[1] // patch, size[2] // patch) for size in sizes)
    return _Tokens(grids, patch, tuple(_padded(rows * columns, multiple) for rows, columns in grids),
                   tuple(_padded(int(caption.shape[0]), multiple) for caption in captions))


def _shapes(value) -> object:
    if isinstance(value, torch.Tensor):
        return list(value.shape)
    if isinstance(value, (list, tuple)):
        return [_shapes(v) for v in value]
    return value


class ZImagePlacer(LayerPlacer):
    """Places one attention layer of a Z-Image transformer or ControlNet: each entry's patches first, row-major on
    its own grid, then its pad tokens and (``joint``) caption tokens without a position, then the batch's padding.

    Args:
        owner_name: qualified name of the ``ZImageTransformer2DModel`` / ``ZImageControlNetModel``.
        owner: that module.
        attention: the recorded attention module (its processor is read per call).
        joint: the layer attends over ``[image, caption]`` (``layers``, ``control_layers``); else over the image
            tokens alone (``noise_refiner``, ``control_noise_refiner``).
    """

    def __init__(self, owner_name: str, owner: nn.Module, attention: nn.Module, joint: bool):
        self.owner_name, self.owner, self.attention, self.joint = owner_name, owner, attention, joint
        self.kind = type(owner).__name__
        self._layouts: dict[tuple, tuple] = {}

    def install(self, context: CallContext) -> list:
        key = _KEY + self.owner_name

        def see_inputs(module, args, kwargs) -> None:
            context.values[key] = _tokens_of(module, args, kwargs)

        def forget_inputs(module, args, output) -> None:
            # What a layer run later outside this model's forward sees is no call of this model's.
            context.values.pop(key, None)

        # The model has no convolution: the recorded model's forward starts the call before this runs.
        return [self.owner.register_forward_pre_hook(see_inputs, with_kwargs=True),
                self.owner.register_forward_hook(forget_inputs, always_call=True)]

    def _processor_refusal(self) -> str | None:
        return processor_refusal(self.attention, self.kind, _PROCESSORS, positions="[B, N, 2]")

    def refusal_without_attention(self, module: nn.Module) -> str | None:
        # A processor or an attention backend (flash, sage, flex) that computes the attention where vitmad does
        # not look reaches no place().
        return self._processor_refusal() or backend_refusal(self.attention)

    def place(self, context: CallContext, lead: torch.Size, num_queries: int, num_keys: int) -> Placement:
        refusal = self._processor_refusal()
        if refusal is not None:
            raise NotPlaceable(refusal)
        tokens = context.values.get(_KEY + self.owner_name)
        if tokens is None:
            raise NotPlaceable(
                f"it ran outside a forward of its {self.kind} ({self.owner_name or 'the recorded model'}), whose "
                "arguments place the tokens (ZImageControlNetModel.from_transformer shares the transformer's "
                "noise_refiner, which the other model's forward then runs; a block called alone); record the "
                "transformer in a pipeline without the ControlNet, or pass positions=<[B, N, 2] latent-pixel position "
                "of each token>")
        if isinstance(tokens, str):
            raise NotPlaceable(tokens)
        lengths = tokens.image if not self.joint else tuple(i + c for i, c in zip(tokens.image, tokens.caption))
        batch, longest = len(lengths), max(lengths)
        if len(lead) != 2 or int(lead[0]) != batch or num_queries != num_keys or num_keys != longest:
            sequence = "[image, caption]" if self.joint else "image"
            raise NotPlaceable(
                f"its attention has shape [{', '.join(map(str, lead))}, {num_queries}, {num_keys}]; for the grids "
                f"{list(tokens.grids)} of this call, a {self.kind} layer over each entry's {sequence} tokens (padded "
                f"to multiples of 32) attends [{batch}, heads, {longest}, {longest}]"
            )
        layout = (tokens, self.joint)
        if layout not in self._layouts:
            self._layouts = {layout: _layout(tokens, lengths)}
        positions, present, maps, map_present = self._layouts[layout]
        same = len(set(tokens.grids)) == 1
        patches = max(rows * columns for rows, columns in tokens.grids)
        attention = "global, caption last" if self.joint else "global"
        geometry = LayerGeometry(tokens.grids[0] if same else None, (float(tokens.patch),) * 2, attention,
                                 int(lead[-1]), 0, image_grids=None if same else tokens.grids,
                                 num_suffix_tokens=(longest - patches) if same else None)

        def fold(values: torch.Tensor) -> torch.Tensor:
            return values[..., :patches]

        return Placement(positions, None, fold, geometry, present=present, map_tokens=maps, map_present=map_present)


def _layout(tokens: _Tokens, lengths: tuple[int, ...]) -> tuple:
    """``(positions, present, map_tokens, map_present)`` of a call whose entries hold ``lengths`` tokens each: entry
    ``i``'s patch ``t`` at ``((t // columns + 0.5) p, (t % columns + 0.5) p)`` latent pixels, every later token
    without a position. One grid for the batch: positions ``[N, 2]``, and the prefix maps are the rows of every token
    after the patches, NaN where the entry has none there (its slot is the batch's padding). Grids of their own:
    positions ``[B, 1, N, 2]``, and no prefix maps (the tokens without a position differ between entries)."""
    longest, patch = max(lengths), float(tokens.patch)
    counts = [rows * columns for rows, columns in tokens.grids]
    most = max(counts)
    placed = torch.full((len(lengths), longest, 2), float("nan"))
    for entry, (rows, columns) in enumerate(tokens.grids):
        row, column = torch.meshgrid(torch.arange(rows, dtype=torch.float64),
                                     torch.arange(columns, dtype=torch.float64), indexing="ij")
        placed[entry, :rows * columns] = torch.stack([(row.reshape(-1) + 0.5) * patch,
                                                      (column.reshape(-1) + 0.5) * patch], -1).float()
    if len(set(tokens.grids)) == 1:
        slots = torch.arange(most, longest)
        owned = slots[None] < torch.tensor(lengths)[:, None]
        positions, = read_only(placed[0].contiguous(), positions=1)
        if not len(slots):  # every token a patch: no maps
            return positions, None, None, None
        return positions, None, slots, None if bool(owned.all()) else owned
    present = torch.arange(most)[None] < torch.tensor(counts)[:, None]
    positions, = read_only(placed.unsqueeze(1).contiguous(), positions=1)
    return positions, present, None, None
