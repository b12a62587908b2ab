"""Project MONAI's generative networks (``monai.networks.nets``, 1.6): self-attention over every cell of a feature map
in the diffusion UNets (``DiffusionModelUNet``, ``ControlNet``, ``SPADEDiffusionModelUNet``) and the autoencoders
(``AutoencoderKL``, ``SPADEAutoencoderKL``), on images (``spatial_dims=2``, ``[B, C, H, W]``) and volumes (3,
``[B, C, D, H, W]``).

Which attention: a ``SpatialAttentionBlock`` (``AttnDownBlock``, ``AttnMidBlock``, ``AttnUpBlock``, their SPADE up
blocks, the autoencoders' ``Encoder`` / ``Decoder`` / ``SPADEDecoder`` levels and non-local block) group-norms its map
``[B, C, *sides]``, flattens it row-major over the spatial axes (einops ``"b c h w (d) -> b (h w (d)) c"``) and runs
its ``SABlock`` ``attn`` over all of it; a ``SpatialTransformer`` (the ``CrossAttn*`` blocks, built with
``with_conditioning=True``) flattens its map the same way after its 1 x 1 ``proj_in`` (``permute`` to channels last,
then ``reshape``) and each of its ``DiffusionUNetTransformerBlock``'s ``attn1`` (an ``SABlock``) attends over it.
Either is ``[B, heads, N, N]`` with ``N`` the map's cells, through ``att_mat.softmax(dim=-1)`` or, with
``use_flash_attention``, ``F.scaled_dot_product_attention``. Skipped: each transformer block's ``attn2``
(``CrossAttentionBlock``), cross-attention to ``context``, whose tokens have no position on the map (without a
``context`` it attends over the map itself, and is still not recorded).

Where the tokens are, as diffusers' UNets (:mod:`.diffusers_unets`, ``docs/definition.md``): token ``t`` is cell ``t``
of the map (unravelled row-major), at its cell's centre ``(i + 0.5) * s`` along each axis in pixels (voxels) of the
network's input, ``s`` the map's stride. The stride is followed per call: a UNet's ``conv_in`` (stride 1) makes the
input's grid; each down block's ``downsampler`` (``DiffusionUnetDownsample``: a 3 x 3 convolution of stride 2 padded
by 1, ``ceil(n / 2)``, or a 2 x 2 average pool, ``floor(n / 2)``; or a ``DiffusionUNetResnetBlock`` with
``down=True``) halves the map and doubles the stride; each up block's ``upsampler`` (``WrappedUpsample``, nearest x 2,
or a ``DiffusionUNetResnetBlock`` with ``up=True``) doubles the map and halves the stride (MONAI's UNets concatenate
each up block's map with the skip connection's, so their inputs' sides must be divisible by their total
down-sampling: a ``[12, 20]`` input with three levels has maps of ``12 x 20``, ``6 x 10`` and ``3 x 5``). The
autoencoders' ``Encoder`` starts at its first convolution (stride 1), each ``AEKLDownsample`` (padded by one at the
end of each axis, then a 3 x 3 convolution of stride 2: ``floor(n / 2)``) halving the map; the ``Decoder`` and
``SPADEDecoder`` start at their first convolution on the latent with the stride ``2 ** u``, ``u`` the ``Upsample``
blocks among their ``blocks``, each halving it: the decoder's maps are placed in pixels of the image it decodes
(the autoencoder's input's grid in ``forward``; the decoded image's where ``decode`` runs alone). A volume's cells are
placed in all three axes (``LayerGeometry.depth``), as :mod:`.monai` places a 3-D ViT's. Each sampling's output is
checked against the map before it (half rounded either way, or double), and the map each block receives against the
one the samplings made; a mismatch refuses the call.

A forward call starts at the outermost of these UNets holding the recorded layers (:func:`call_start`; the
conditioning image of a ``ControlNet`` is convolved after ``conv_in``); an autoencoder's at its first convolution,
the encoder's.

NaViT (``monai.networks.nets.navit``, ``spatial_dims=2``): images of their own sizes packed in rows, placed as
vit_pytorch's NaViT (:class:`MonaiNaViTPlacer`); its attention pooling skipped; built for volumes, refused (packed
entries of their own sizes fold onto grids of two axes only).

Refused by name: attention in any other block of these networks or in a subclass of them (its samplings are not
read), an ``SABlock`` built causal or with relative positions, and MONAI's other generative nets
(``DiffusionModelEncoder``, the transformers).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..placement import CallContext, LayerGeometry, LayerPlacer, NotPlaceable, Placement, RefusingPlacer, select_tokens
from .monai import _grid_positions, _sides
from .stages import innermost_holders, innermost_on_path
from .vit_pytorch import _NAVIT_POOL, _NaVitPlacer

__all__ = ["placer", "call_start", "tower_starts", "FeatureMapPlacer", "MonaiNaViTPlacer"]

_UNET = "monai.networks.nets.diffusion_model_unet"
_SPADE_UNET = "monai.networks.nets.spade_diffusion_model_unet"
_AEKL = "monai.networks.nets.autoencoderkl"
_SPADE_AEKL = "monai.networks.nets.spade_autoencoderkl"
_UNETS = {(_UNET, "DiffusionModelUNet"), ("monai.networks.nets.controlnet", "ControlNet"),
          (_SPADE_UNET, "SPADEDiffusionModelUNet")}
_ENCODER = (_AEKL, "Encoder")
_DECODERS = {(_AEKL, "Decoder"), (_SPADE_AEKL, "SPADEDecoder")}
# The blocks a placed UNet may be built of: their samplings are their ``downsampler`` / ``upsampler`` (or none), each
# a factor of 2, and their attention runs over their whole map.
_UNET_BLOCKS = {(_UNET, name) for name in ("DownBlock", "AttnDownBlock", "CrossAttnDownBlock", "AttnMidBlock",
                                          "CrossAttnMidBlock", "UpBlock", "AttnUpBlock", "CrossAttnUpBlock")} | {
    (_SPADE_UNET, name) for name in ("SPADEUpBlock", "SPADEAttnUpBlock", "SPADECrossAttnUpBlock")}
# The blocks an encoder's or decoder's ``blocks`` may hold, with the factor of the stride each applies.
_CONVOLUTION = ("monai.networks.blocks.convolutions", "Convolution")
_CHAIN_BLOCKS = {_CONVOLUTION: 1.0, ("torch.nn.modules.normalization", "GroupNorm"): 1.0,
                 (_AEKL, "AEKLResBlock"): 1.0, (_SPADE_AEKL, "SPADEResBlock"): 1.0,
                 ("monai.networks.blocks.spatialattention", "SpatialAttentionBlock"): 1.0,
                 (_AEKL, "AEKLDownsample"): 2.0, ("monai.networks.blocks.upsample", "UpSample"): 0.5}
_HOLDERS = {("monai.networks.blocks.spatialattention", "SpatialAttentionBlock"), (_UNET, "SpatialTransformer")}
_SA_BLOCK = ("monai.networks.blocks.selfattention", "SABlock")
_CROSS = ("monai.networks.blocks.crossattention", "CrossAttentionBlock")
_TRANSFORMER_BLOCK = (_UNET, "DiffusionUNetTransformerBlock")
_NAVIT = ("monai.networks.nets.navit", "NaViT")
_NAVIT_ATTENTION = ("monai.networks.nets.navit", "_NaViTAttention")


def _key(module) -> tuple[str, str]:
    return type(module).__module__, type(module).__name__


def _is_chain(module: nn.Module) -> bool:
    key = _key(module)
    return key in _UNETS or key == _ENCODER or key in _DECODERS


def _chains_holding(model: nn.Module, recorded) -> list[nn.Module]:
    """The networks of ``model`` whose maps the placers follow (a UNet, an encoder, a decoder) holding ``recorded``
    modules, each the innermost such network of one of them, in module order."""
    return innermost_holders(model, recorded, _is_chain)[0]


def call_start(model: nn.Module, recorded=()) -> nn.Module | None:
    """Where a forward call starts when the ``recorded`` modules lie in MONAI's diffusion UNets or autoencoders: the
    forward of the one network (a UNet or ControlNet, an autoencoder's encoder or decoder) holding them all, before
    its first convolution runs (a ControlNet's conditioning embedding runs after ``conv_in``, whose map the placers
    read); ``model``'s own forward where several hold them (:func:`tower_starts` starts a call where one of them runs
    outside it: ``AutoencoderKL.decode`` alone); None where none does."""
    chains = _chains_holding(model, recorded)
    if not chains:
        return None
    return chains[0] if len(chains) == 1 else model


def tower_starts(model: nn.Module, recorded=()) -> list[nn.Module]:
    """The networks that start a call of their own where they run outside ``model``'s forward, when several hold the
    ``recorded`` modules (an autoencoder's encoder and decoder: ``encode`` and ``decode`` each run one; a ControlNet
    and a UNet in a user's module); empty otherwise."""
    chains = _chains_holding(model, recorded)
    return chains if len(chains) > 1 else []


def placer(model: nn.Module, name: str, module: nn.Module):
    """The placer of an ``SABlock`` over a feature map of a MONAI diffusion UNet or autoencoder, a :class:`Skip` for
    a ``DiffusionUNetTransformerBlock``'s cross-attention, a refusal where the layout is not known; None for any
    other module."""
    from . import Skip

    key = _key(module)
    if key == _NAVIT_ATTENTION:
        return _navit_placer(model, name, module)
    if key not in (_SA_BLOCK, _CROSS):
        return None
    found = innermost_on_path(model, name, _is_chain)
    if found is None:
        return None
    chain_name, chain = found
    owner_name = name.rpartition(".")[0]
    owner = model.get_submodule(owner_name) if owner_name else model
    what = f"{type(chain).__name__} ({chain_name or 'the model'})"
    if key == _CROSS:
        if _key(owner) == _TRANSFORMER_BLOCK and name.endswith(".attn2"):
            return Skip(f"cross-attention of {what}'s feature map to its context, whose tokens have no position on "
                        "the map (without a context it attends over the map itself, and is not recorded)")
        return None
    if _key(owner) == _TRANSFORMER_BLOCK and name.endswith(".attn1"):
        holder = innermost_on_path(model, name, lambda m: _key(m) == (_UNET, "SpatialTransformer"))
    elif _key(owner) in _HOLDERS and name.endswith(".attn"):
        holder = owner_name, owner
    else:
        holder = None
    if holder is None:
        return RefusingPlacer(f"it is an SABlock of {what} other than a SpatialAttentionBlock's attn or a "
                              "DiffusionUNetTransformerBlock's attn1, whose tokens vitmad does not know")
    if module.causal or module.rel_positional_embedding is not None:
        return RefusingPlacer(f"it is built causal or with relative position embeddings, which {what}'s blocks "
                              "never build; vitmad places the plain self-attention over the map only")
    chain_or_refusal = _chain(chain, what)
    if isinstance(chain_or_refusal, str):
        return RefusingPlacer(chain_or_refusal)
    return FeatureMapPlacer(what, chain_or_refusal, holder[1])


@dataclass(frozen=True)
class _Chain:
    """How one network's map changes before an attention: ``start`` makes the first map, at ``stride`` pixels per
    cell of the network's image; each of ``samplings`` multiplies the stride by its factor (2: half the map, 0.5:
    double)."""

    start: nn.Module
    stride: float
    samplings: tuple[tuple[nn.Module, float], ...]


def _chain(network: nn.Module, what: str) -> _Chain | str:
    """The :class:`_Chain` of a UNet, an encoder or a decoder; a refusal (str) where one of its blocks is not one
    vitmad has read."""
    if _key(network) in _UNETS:
        blocks = [*network.down_blocks, network.middle_block, *getattr(network, "up_blocks", ())]
        unknown = [type(b).__name__ for b in blocks if _key(b) not in _UNET_BLOCKS]
        if unknown or not _unit_convolution(network.conv_in):
            shown = ", ".join(unknown) or "its conv_in (not a MONAI Convolution of stride 1)"
            return (f"{what} holds {shown}, whose samplings vitmad has not read; pass positions=<[N, 2] (or [N, 3] "
                    "for a volume) pixel position of each token> to place a layer by hand")
        samplings = [(b.downsampler, 2.0) for b in network.down_blocks if b.downsampler is not None]
        samplings += [(b.upsampler, 0.5) for b in getattr(network, "up_blocks", ()) if b.upsampler is not None]
        return _Chain(network.conv_in, 1.0, tuple(samplings))
    factors = [_CHAIN_BLOCKS.get(_key(b)) for b in network.blocks]
    if None in factors or not _unit_convolution(network.blocks[0]):
        shown = ", ".join(sorted({type(b).__name__ for b, f in zip(network.blocks, factors) if f is None}))
        return (f"{what}'s blocks hold {shown or 'a first block that is no MONAI Convolution of stride 1'}, whose "
                "samplings vitmad has not read; pass positions=<[N, 2] (or [N, 3] for a volume) pixel position of "
                "each token> to place a layer by hand")
    samplings = tuple((b, f) for b, f in zip(network.blocks, factors) if f != 1.0)
    # A decoder's first map is the latent: each later Upsample halves its stride, down to the decoded image's pixels.
    stride = 2.0 ** len(samplings) if _key(network) in _DECODERS else 1.0
    return _Chain(network.blocks[0], stride, samplings)


def _unit_convolution(module: nn.Module) -> bool:
    """Whether ``module`` is a MONAI ``Convolution`` whose convolution has stride 1 (it keeps the map's grid)."""
    conv = getattr(module, "conv", None)
    return _key(module) == _CONVOLUTION and isinstance(conv, nn.modules.conv._ConvNd) and all(
        s == 1 for s in conv.stride)


@dataclass(frozen=True)
class _Map:
    """The map the latest sampling of a network made in this call: its sides and pixels per cell along each."""

    sides: tuple[int, ...]
    stride: float


class FeatureMapPlacer(LayerPlacer):
    """Self-attention over the whole feature map a ``SpatialAttentionBlock`` or ``SpatialTransformer`` receives,
    row-major, each cell at its centre in pixels (voxels) of the network's image.

    Args:
        what: the network, in words (for messages).
        chain: how its maps are made (:func:`_chain`).
        holder: the module whose input is the map the attention flattens.
    """

    def __init__(self, what: str, chain: _Chain, holder: nn.Module):
        self.what, self.chain, self.holder = what, chain, holder
        # Per placer: each placer's hooks follow the samplings once (a key per network would be halved once per
        # placer holding hooks on it).
        self.map_key = ("monai_spatial.map", id(self))
        self.input_key = ("monai_spatial.input", id(self))

    def install(self, context: CallContext) -> list[torch.utils.hooks.RemovableHandle]:
        def started(module, args, output) -> None:
            context.values[self.map_key] = (_Map(tuple(int(s) for s in output.shape[2:]), self.chain.stride)
                                            if isinstance(output, torch.Tensor) and output.dim() in (4, 5) else None)

        def sampled(module, args, output, factor) -> None:
            previous = context.values.get(self.map_key)
            if not isinstance(previous, _Map):
                return  # the map before is unknown: so is this one (refused where an attention runs on it)
            sides = tuple(int(s) for s in output.shape[2:]) if isinstance(output, torch.Tensor) else ()
            made = [(n // 2, -(-n // 2)) if factor > 1 else (2 * n,) for n in previous.sides]
            if len(sides) != len(made) or any(s not in m for s, m in zip(sides, made)):
                context.values[self.map_key] = (
                    f"its sampling {type(module).__name__} made a map of {_sides(sides) or 'no tensor'} from one of "
                    f"{_sides(previous.sides)}, not {'half' if factor > 1 else 'double'} its sides, so the stride "
                    "of the maps after it is unknown")
                return
            context.values[self.map_key] = _Map(sides, previous.stride * factor)

        def received(module, args) -> None:
            x = args[0] if args else None
            context.values[self.input_key] = tuple(x.shape) if isinstance(x, torch.Tensor) else None

        def left(module, args, output) -> None:
            # The map is known only while the holder runs: its attention called on its own is refused.
            context.values.pop(self.input_key, None)

        handles = [self.chain.start.register_forward_hook(started)]
        handles += [m.register_forward_hook(lambda m, a, o, f=f: sampled(m, a, o, f)) for m, f in self.chain.samplings]
        handles.append(self.holder.register_forward_pre_hook(received))
        handles.append(self.holder.register_forward_hook(left, always_call=True))
        return handles

    def place(self, context: CallContext, lead: torch.Size, num_queries: int, num_keys: int) -> Placement:
        shape = context.values.get(self.input_key)
        current = context.values.get(self.map_key)
        holder = type(self.holder).__name__
        if shape is None:
            raise NotPlaceable(f"it ran outside a forward of its {holder} on a [B, C, H, W] or [B, C, D, H, W] map, "
                               "so the map it attends over is unknown")
        if isinstance(current, str):
            raise NotPlaceable(f"in {self.what}, {current}")
        if current is None:
            raise NotPlaceable(f"the first convolution of {self.what} did not run in this call before it, so the "
                               "stride of its map is unknown")
        sides = tuple(int(s) for s in shape[2:])
        if sides != current.sides or len(sides) not in (2, 3):
            raise NotPlaceable(f"its {holder} received a map of {_sides(sides)}, but the samplings of {self.what} "
                               f"that ran in this call make one of {_sides(current.sides)}; vitmad places only the "
                               "attention over that map (2 or 3 spatial axes)")
        cells = math.prod(sides)
        if len(lead) != 2 or int(lead[0]) != shape[0] or num_queries != cells or num_keys != cells:
            raise NotPlaceable(f"its attention has shape [{', '.join(map(str, lead))}, {num_queries}, {num_keys}]; "
                               f"over {shape[0]} map(s) of {_sides(sides)} it attends [{shape[0]}, heads, {cells}, "
                               f"{cells}]")
        stride = (current.stride,) * len(sides)
        positions, index = _grid_positions(sides, stride, 0)
        geometry = LayerGeometry.of_grid(sides, stride, "global over the feature map", int(lead[1]))
        return Placement(positions, None, select_tokens(index), geometry)


def _navit_placer(model: nn.Module, name: str, module: nn.Module):
    """The placer of an attention of MONAI's NaViT (a :class:`Skip` for its attention pooling), None outside one."""
    from . import Skip

    found = innermost_on_path(model, name, lambda m: _key(m) == _NAVIT)
    if found is None:
        return None
    navit_name, navit = found
    if module is navit.attn_pool:
        return Skip(_NAVIT_POOL)
    if navit.spatial_dims != 2:
        return RefusingPlacer(
            f"MONAI's NaViT ({navit_name or 'the model'}) is built with spatial_dims={navit.spatial_dims}: it packs "
            "volumes of their own sizes in one row, and vitmad folds packed entries of their own sizes onto grids of "
            "two axes only; record one volume per forward's row with positions=<[B, N, 3] voxel position of each "
            "token, NaN rows for the padding>")
    return MonaiNaViTPlacer(navit)


class MonaiNaViTPlacer(_NaVitPlacer):
    """MONAI's NaViT (``spatial_dims=2``): vit_pytorch's packing, read per call from its forward's arguments. Each
    group of ``batched_images`` is a row, its images' ``patch_size`` patches row-major one image after the other
    (``unfold``), the rows padded to the longest; its mask keeps each image to its own patches and every query off
    the padding (``-finfo.max``: probability 0). A padding query (no position) attends to the row's first image, and
    is no query of the MAD. Each image is placed on its own grid, in its own pixels, and folded onto ``[images, H,
    T_max]`` in the order of the model's logits. With ``group_images=True`` the images are grouped as MONAI's forward
    groups them (its token dropout's fraction counted where set, as it counts it); token dropout in training is
    refused (a random draw per image, handed to no module)."""

    def grouped(self, images: list, max_seq_len: int) -> list:
        from monai.networks.nets.navit import _group_images_by_max_seq_len

        return _group_images_by_max_seq_len(images, patch_size=self.patch,
                                            calc_token_dropout=self.navit.calc_token_dropout, max_seq_len=max_seq_len)
