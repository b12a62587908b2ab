"""The self-attention inside Hugging Face diffusers' image autoencoders (``diffusers.models.autoencoders``, 0.42):
``AutoencoderKL`` (the Stable Diffusion, SDXL, SD3 and Flux VAEs), ``VQModel`` (MoVQ's spatially normed decoder
included), ``AsymmetricAutoencoderKL`` and any module holding their ``Encoder`` and ``Decoder``.

Which attention: the ``Attention`` of an encoder's or decoder's ``UNetMidBlock2D`` (``mid_block_add_attention``, the
default), of an ``AttnDownEncoderBlock2D`` or of an ``AttnUpDecoderBlock2D``. Each is handed its block's map ``[B, C,
h, w]`` itself and its processor flattens it row-major (``view(B, C, h * w).transpose(1, 2)``): ``[B, heads, h * w, h
* w]`` over the whole map, as :mod:`.diffusers_unets`' ``UNet2DModel`` blocks (same processors, read per call).

Where the tokens are, as MONAI's autoencoders (:mod:`.monai_spatial`): cell ``i`` of a map at stride ``s`` sits at ``(i
+ 0.5) * s`` along each axis, in pixels of the image. The ``Encoder`` starts at its ``conv_in`` (stride 1) on the
image; each down block's ``downsamplers`` entry (``Downsample2D`` padded by one at the end of each axis, then a 3 x 3
convolution of stride 2: ``floor(n / 2)``) doubles the stride. The ``Decoder`` (and ``MaskConditionDecoder``) starts at
its ``conv_in`` on the latent, at stride ``2 ** u`` for the ``u`` up blocks that up-sample, each halving it: its maps
are in pixels of the image it decodes (the autoencoder's input's grid in ``forward``, where an odd side's last row,
dropped by the encoder's floor, is in none of them; the decoded image's where ``decode`` runs alone). The map the
attention receives is read in each call and must be the map those samplings made, else the call is refused.

A forward call starts at the forward of the one network (encoder or decoder) holding the recorded layers, or the
model's own where both do; ``encode`` and ``decode`` run alone (latent diffusion decodes without the autoencoder's
forward) each start a call of their own (``towers.tower_starts``). Tiled and sliced encoding or decoding
(``enable_tiling``, ``enable_slicing``) run the network once per tile or image: each run is an entry of the layer (a
call of its own where ``encode`` or ``decode`` runs alone), in pixels of its tile: MAD does not depend on where the
tile lies.

Refused by name: the attention of Stable Video Diffusion's ``TemporalDecoder`` (``AutoencoderKLTemporalDecoder``),
whose blocks attend over frames as well as the map, and of any other block of these networks.
"""

from __future__ import annotations

from torch import nn

from ..module_index import enclosing_modules, is_known_library, module_list, named_module_list
from ..placement import CallContext, RefusingPlacer
from .diffusers_common import attention_under, is_attention
from .diffusers_unets import UNetMap, UNetMapPlacer
from .stages import innermost_holders, innermost_on_path, pair

__all__ = ["placer", "attention_modules", "call_start", "networks_holding", "denoisers_holding", "network_key",
           "beside_a_denoiser", "AutoencoderMapPlacer"]

_VAE = "diffusers.models.autoencoders.vae"
_BLOCKS = "diffusers.models.unets.unet_2d_blocks"
_ENCODER = (_VAE, "Encoder")
_DECODERS = {(_VAE, "Decoder"), (_VAE, "MaskConditionDecoder")}
_TEMPORAL_DECODER = ("diffusers.models.autoencoders.autoencoder_kl_temporal_decoder", "TemporalDecoder")
# The blocks a placed network may hold: samplings by their downsamplers / upsamplers entries (a factor of 2 each, or
# none), attention over the whole map they are handed.
_ENCODER_BLOCKS = {(_BLOCKS, "DownEncoderBlock2D"), (_BLOCKS, "AttnDownEncoderBlock2D")}
_DECODER_BLOCKS = {(_BLOCKS, "UpDecoderBlock2D"), (_BLOCKS, "AttnUpDecoderBlock2D")}
_MID_BLOCK = (_BLOCKS, "UNetMidBlock2D")


def _key(module) -> tuple[str, str]:
    return type(module).__module__, type(module).__name__


def network_key(module: nn.Module) -> tuple[str, str] | None:
    """(defining module, class name) of ``module``'s class, or of its nearest base class, where that is an encoder or
    decoder of diffusers' autoencoders (research code subclasses them, keeping their blocks, which the placers read
    per call); None for any other module."""
    for cls in type(module).__mro__:
        key = cls.__module__, cls.__name__
        if key == _ENCODER or key in _DECODERS or key == _TEMPORAL_DECODER:
            return key
    return None


def _is_network(module: nn.Module) -> bool:
    return network_key(module) is not None


def attention_modules(model: nn.Module) -> dict[str, nn.Module]:
    """diffusers' attention modules inside an autoencoder's encoder or decoder, by qualified name (their forward calls
    a processor, so the generic discovery does not see them)."""
    return attention_under(model, _is_network)


def networks_holding(model: nn.Module, recorded) -> tuple[list[nn.Module], list[nn.Module]]:
    """The encoders and decoders of ``model`` holding ``recorded`` modules (each the innermost network of one), in
    module order, and the ``recorded`` modules in none of them (a UNet's or a transformer's beside the autoencoder in
    a user's module, or ``ConsistencyDecoderVAE``'s UNet decoder)."""
    return innermost_holders(model, recorded, _is_network)


def beside_a_denoiser(model: nn.Module, prefix: str) -> bool:
    """Whether the tower of qualified-name prefix ``prefix`` (the one that embeds the image, ``"net."``) lies in a
    diffusers model other than ``model`` itself: a diffusion transformer, whose step's autoencoder layers are then
    recorded with it by default (QA 361); a ViT of timm's beside a VAE is not (QA 362)."""
    tower = prefix.rstrip(".")
    return bool(tower) and (_is_diffusers_model(model.get_submodule(tower)) or any(
        _is_diffusers_model(module) for name, module in enclosing_modules(model, tower) if name))


# The names text encoders give their token embedding (CLIP's, T5's, BERT's, GPT-2's, Llama's).
_TOKEN_EMBEDDINGS = ("token_embedding", "embed_tokens", "word_embeddings", "wte", "shared")


def text_encoders_beside_nets(model: nn.Module) -> tuple[str, ...]:
    """The qualified-name prefixes (``"text_encoder."``) of the text encoders in a user's step that holds diffusers
    models (``model`` not a diffusers model itself): the outermost modules of a library vitmad reads (transformers'
    text models, OpenCLIP's) outside every diffusers model that embed text tokens (an ``nn.Embedding`` under one of
    :data:`_TOKEN_EMBEDDINGS`) and hold no convolution (no image tower); empty where the step holds no diffusers
    model. Their layers are left out by default, as beside a diffusion transformer, whose patch embedding names the
    tower: a UNet or a VAE embeds with no patch convolution, so every attention was taken, and a CLIP text encoder's
    causal attention refused the whole step (QA 370). A user's own attention beside the nets stays (QA 371: dropping
    every layer outside them lost a latent ViT; QA 372: a module of the user's with a class-label embedding named
    shared was taken for a text encoder)."""
    named = named_module_list(model)
    if _is_diffusers_model(model) or not any(name and _is_diffusers_model(m) for name, m in named):
        return ()
    found: list[str] = []
    passed: list[str] = []  # the diffusers models and text encoders found: nothing inside them is looked at
    for name, module in named:  # (in module order: a module after the modules above it)
        if not name or name.startswith(tuple(passed)):
            continue
        if _is_diffusers_model(module):
            passed.append(name + ".")
            continue
        if not is_known_library(type(module)):
            continue  # a module of the user's own is never left out unsaid (QA 372: a latent transformer of theirs
            # with a class-label embedding named shared was dropped)
        inner = named_module_list(module)
        if any(isinstance(m, nn.Embedding) and n.rpartition(".")[2] in _TOKEN_EMBEDDINGS for n, m in inner) \
                and not any(isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) for _, m in inner):
            found.append(name + ".")
            passed.append(name + ".")
    return tuple(found)


def _is_diffusers_model(module: nn.Module) -> bool:
    """Whether ``module`` is a whole diffusers model (its class a ``ModelMixin``): a UNet, a ControlNet, a diffusion
    transformer, an autoencoder."""
    return any(cls.__name__ == "ModelMixin" and cls.__module__.startswith("diffusers.") for cls in type(module).__mro__)


def denoisers_holding(model: nn.Module, modules) -> list[nn.Module] | None:
    """The outermost diffusers models inside ``model`` (not ``model`` itself) holding ``modules``, in module order: the
    UNets, ControlNets and diffusion transformers beside an autoencoder in a user's step (or ``ConsistencyDecoderVAE``'s
    UNet decoder); None where one of ``modules`` lies in none (a ViT of timm's beside a VAE: its calls are not this
    family's to start, QA 362)."""
    inside = {id(m) for m in modules}
    found = {}
    for name, module in named_module_list(model):
        if id(module) not in inside or not name:
            continue
        # The module itself, then the modules above it, nearest first: the last diffusers model before the root is
        # the outermost.
        path = [(name, module), *enclosing_modules(model, name)]
        owners = [m for prefix, m in path if prefix and _is_diffusers_model(m)]
        if not owners:
            return None
        found[id(owners[-1])] = owners[-1]
    order = {id(m): i for i, m in enumerate(module_list(model))}
    return sorted(found.values(), key=lambda m: order[id(m)])


def call_start(model: nn.Module, recorded=()) -> nn.Module | None:
    """Where a forward call starts when ``recorded`` modules lie in diffusers' autoencoder networks: the forward of
    the one network holding them all, before its ``conv_in`` runs; ``model``'s own forward where several networks hold
    them, or where the others lie in diffusers UNets or transformers beside them (a user's encode, denoise, decode
    step: QA 361, the UNet's start split each forward); None where no network holds any, or some recorded module lies
    in no diffusers model (the other rules start those calls). Outside ``model``'s forward, each network and each of
    those models starts a call of its own (towers.tower_starts)."""
    networks, outside = networks_holding(model, recorded)
    if not networks:
        return None
    if not outside:
        return networks[0] if len(networks) == 1 else model
    return model if denoisers_holding(model, outside) is not None else None


def placer(model: nn.Module, name: str, module: nn.Module):
    """The placer of an ``Attention`` over a feature map of a diffusers autoencoder's encoder or decoder, a refusal
    where its layout is not known; None for any other module."""
    if not is_attention(module):
        return None
    found = innermost_on_path(model, name, _is_network)
    if found is None:
        return None
    network_name, network = found
    what = f"{type(network).__name__} ({network_name or 'the model'})"
    if network_key(network) == _TEMPORAL_DECODER:
        return RefusingPlacer(f"it is an attention layer of {what}, Stable Video Diffusion's decoder, whose blocks "
                              "attend over the frames as well as the map; vitmad does not place them")
    encoder = network_key(network) == _ENCODER
    blocks = [*(network.down_blocks if encoder else network.up_blocks), network.mid_block]
    known = (_ENCODER_BLOCKS if encoder else _DECODER_BLOCKS) | {_MID_BLOCK}
    unknown = sorted({type(b).__name__ for b in blocks if _key(b) not in known})
    if unknown or not isinstance(network.conv_in, nn.Conv2d) or pair(network.conv_in.stride) != (1, 1):
        shown = ", ".join(unknown) or "its conv_in (not a Conv2d of stride 1)"
        return RefusingPlacer(f"{what} holds {shown}, whose samplings vitmad has not read; pass positions=<[N, 2] "
                              "pixel position of each token> to place a layer by hand")
    inner = name[len(network_name) + 1:] if network_name else name
    # A block's attention: <block>.attentions.<i>, the block one of the known ones.
    block, _, index = inner.rpartition(".attentions.")
    owner = network.get_submodule(block) if block and index.isdigit() else None
    if getattr(module, "is_cross_attention", False) or owner is None or _key(owner) not in known:
        return RefusingPlacer(f"it is an attention of {what} other than its blocks' attentions over their map, whose "
                              "tokens vitmad does not know")
    if encoder:
        samplings = [(m, 2.0) for b in network.down_blocks for m in (getattr(b, "downsamplers", None) or ())]
        start = 1.0
    else:
        samplings = [(m, 0.5) for b in network.up_blocks for m in (getattr(b, "upsamplers", None) or ())]
        start = 2.0 ** len(samplings)  # the latent's cell: 2 ** u pixels of the decoded image
    return AutoencoderMapPlacer(network, module, module, network.conv_in, samplings, start)


class AutoencoderMapPlacer(UNetMapPlacer):
    """Self-attention over the whole map an encoder's or decoder's block hands its ``Attention``, row-major, each cell
    at its centre in pixels of the image: :class:`~.diffusers_unets.UNetMapPlacer` with the first map (``conv_in``'s)
    at ``start`` pixels per cell (1 for an encoder, ``2 ** u`` for a decoder's latent)."""

    holder_word = "vae"

    def __init__(self, network: nn.Module, attention: nn.Module, holder: nn.Module, conv_in: nn.Module,
                 samplings: list[tuple[nn.Module, float]], start: float):
        super().__init__(network, attention, holder, conv_in, samplings)
        self.start = start

    def sampled(self, context: CallContext, factor: float | None, module: nn.Module, args, output) -> None:
        super().sampled(context, factor, module, args, output)
        if factor is None:  # conv_in: the network's first map, at its own stride
            current = context.values[self.key]
            context.values[self.key] = UNetMap(current.grid, (self.start, self.start))

