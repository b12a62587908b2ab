"""Where a model's vision tower is, and where a forward call on it starts.

The recorder places the attention of one tower, the one that embeds the image: found by its patch embedding, or,
where the image is embedded otherwise (pre-cut patches, a CNN stem), by the tower families and the attribute
names transformers gives vision towers. ``vitmad profile`` finds the tower to feed by the same names.
"""

from __future__ import annotations

import re

from torch import nn

from ..ops.arguments import is_int
from .families import is_timm_model
from .families.diffusers_autoencoders import call_start as diffusers_autoencoders_call_start
from .families.diffusers_autoencoders import denoisers_holding as diffusers_denoisers_holding
from .families.diffusers_autoencoders import networks_holding as diffusers_autoencoders_holding
from .families.diffusers_images import call_start as diffusers_images_call_start
from .families.diffusers_unets import call_start as diffusers_unets_call_start
from .families.diffusers_unets import unets_holding as diffusers_unets_holding
from .families.kornia import call_start as kornia_call_start
from .families.llama4 import is_tower as is_llama4_tower
from .families.molmo2 import is_tower as is_molmo2_tower
from .families.monai import call_start as monai_call_start
from .families.monai_spatial import call_start as monai_spatial_call_start
from .families.monai_spatial import tower_starts as monai_spatial_tower_starts
from .families.naflex import call_start as naflex_call_start
from .families.naflex import is_tower as is_naflex_tower
from .families.packed import token_convolutions
from .families.pix2struct import is_tower as is_flattened_patches_tower
from .families.plain import find_patch_embedding, is_embedding_projection
from .families.radio import is_tower as is_radio_tower
from .families.ultralytics import call_start as ultralytics_call_start
from .families.vit_pytorch import image_cuts as vit_pytorch_image_cuts
from .families.vit_pytorch import token_convolutions as vit_pytorch_plain_convolutions
from .families.vit_pytorch_nd import call_start as vit_pytorch_nd_call_start
from .families.vit_pytorch_stages import token_convolutions as vit_pytorch_token_convolutions
from .families.vitamin import is_projectionless_embedding
from .families.vq_tokenizer import is_tower as is_vq_tokenizer
from .module_index import copy_holder, enclosing_modules, idle_copies, module_list, named_module_list
from .transformers_capture import is_hf_model

__all__ = ["TOWER_ATTRIBUTES", "encoder_prefix", "tower_of_embedding", "other_image_towers", "image_channels",
           "first_convolution", "tower_starts", "stems_beside_towers", "held_towers",
           "tower_inputs"]

# The attribute names transformers' vision-language models give their vision tower.
TOWER_ATTRIBUTES = ("vision_tower", "vision_model", "visual", "vision_encoder")


def encoder_prefix(model: nn.Module) -> str:
    """The qualified-name prefix of the tower that embeds the image ("vision_model." in CLIPModel).

    The image embedding is the first convolution named as a patch embedding's projection (any kernel: SAM2's
    HieraDet embeds with 7x7 of stride 4), else the plain patch embedding; a prompt encoder's mask convolution
    or a text tower never comes first.
    """
    embedding = next((name for name, module in named_module_list(model)
                      if is_embedding_projection(name, module) or is_projectionless_embedding(module)), None)
    if embedding is None:
        found = find_patch_embedding(model)
        embedding = None if found is None else found[0]
    if embedding is None:
        # NaFlex towers embed pre-cut patches with a Linear, Llama 4's unfolds the image into one, RADIO's cuts it
        # with a reshape, Pix2Struct's and Kosmos-2.5's get flattened_patches, Molmo2's pre-cut crops, Apertus 1.5's
        # VQGAN tokenizer a 3 x 3 convolution of stride 1: the tower itself (SigLIP2's vision_model,
        # Llama4ForConditionalGeneration's vision_model, Nemotron-H-Omni's vision_model, Molmo2's vision_tower,
        # Apertus 1.5's vision_tokenizer, Emu3's vqmodel.encoder (not its decoder, which attends over no input
        # image), whose language model's layers are then left out;
        # Pix2StructForConditionalGeneration's encoder, not its text decoder).
        tower = next((name for name, module in named_module_list(model)
                      if is_naflex_tower(module) or is_llama4_tower(module) or is_radio_tower(module)
                      or is_flattened_patches_tower(module) or is_molmo2_tower(module)
                      or is_vq_tokenizer(module)), None)
        if tower is None:
            # A vision-language model whose tower embeds with a CNN stem (FastVLM's FastViT, a TimmWrapperModel):
            # the module its model class names as the tower (transformers' vision_tower / vision_model / visual),
            # so that the language model's causal attention is not taken for the tower's.
            tower = next((name for name, module in named_module_list(model)
                          if name.rsplit(".", 1)[-1] in TOWER_ATTRIBUTES), None)
        if tower is None and any(type(m).__name__.endswith("PromptEncoder") for m in module_list(model)):
            # A SAM-style model whose image encoder embeds with a CNN (EdgeTAM's RepViT): its vision encoder is the
            # tower; the mask decoder, memory attention and perceiver around it are named in layers=.
            tower = next((name for name, module in named_module_list(model)
                          if name and type(module).__name__.endswith(("VisionModel", "VisionEncoder"))), None)
        return "" if not tower else tower + "."
    return tower_of_embedding(embedding, model)


def tower_of_embedding(embedding: str, model: nn.Module | None = None) -> str:
    """The qualified-name prefix of the tower that holds the patch embedding named ``embedding`` (of ``model``,
    where given: it tells a list of stages from a list of towers)."""
    parts = embedding.split(".")
    for i, part in enumerate(parts):
        # An embedding's own name (embeddings, patch_embed, patch_embedding, ...), not a module that holds a whole
        # tower under another word: PE-Video's "embedder" holds its vision tower, and taken for the embedding it
        # made the whole model the tower (its temporal encoder's layers were then placed as the image's).
        if re.search(r"(^|_)embed(s|ding|dings)?(_|$)", part):
            tower = parts[:i]
            # A hierarchy embeds in every stage (PVT v2's encoder.layers.0.patch_embedding, Segformer's
            # stages.0.patch_embeddings): the tower is what holds the list of stages. Not a list of towers, each
            # embedding the image (an RGB and a depth ViT in towers.0 and towers.1): the whole model was then one
            # tower, and the second's layers refused as lying on the first's grid (QA 378).
            while len(tower) >= 2 and tower[-1].isdigit() and not _towers_in_list(model, tower, parts[i:]):
                tower = tower[:-2]
            return "".join(p + "." for p in tower)
    # An embedding named otherwise (OpenCLIP's VisionTransformer embeds with visual.conv1): the outermost module on
    # its path named as a vision tower, where there is one. Without it the whole CLIP model was the tower, and its
    # text transformer's causal attention was taken for the image's layers.
    for i, part in enumerate(parts[:-1]):
        if part in TOWER_ATTRIBUTES:
            return "".join(p + "." for p in parts[:i + 1])
    return ""


def _towers_in_list(model: nn.Module | None, entry: list[str], inside: list[str]) -> bool:
    """Whether the entries of the list holding ``entry`` (``["towers", "1"]``) are towers, each embedding the image,
    not stages: the embedding convolution at the path ``inside`` of each does not take the channels the one of the
    entry before it makes, as a stage's takes its previous stage's (PVT v2: 32 channels in, 32 made before)."""
    if model is None:
        return False
    try:
        holder = model.get_submodule(".".join(entry[:-1]))
    except AttributeError:
        return False
    if not isinstance(holder, (nn.ModuleList, nn.ModuleDict)):
        return False
    path = ".".join(inside)
    convolutions = []
    for member in holder.children():
        try:
            convolution = member.get_submodule(path)
        except AttributeError:
            return False
        if not isinstance(convolution, nn.modules.conv._ConvNd):
            return False
        convolutions.append(convolution)
    return len(convolutions) >= 2 and any(after.in_channels != before.out_channels
                                          for before, after in zip(convolutions, convolutions[1:]))


def other_image_towers(model: nn.Module, prefix: str) -> list[str]:
    """The prefixes of the towers that embed the image besides the one at ``prefix`` (DeepSeek-VL-Hybrid's
    low-resolution SigLIP beside its high-resolution SAM encoder), in module order."""
    if not prefix:
        return []
    towers = []
    for name, module in named_module_list(model):
        # MobileCLIP's ViT embeds with its ConvStem's convolutions, none named a projection (QA 318: a second such
        # tower beside ViTamin was left out without a word).
        if not name.startswith(prefix) and (is_embedding_projection(name, module)
                                             or is_projectionless_embedding(module)):
            tower = tower_of_embedding(name, model)
            if tower and not prefix.startswith(tower) and tower not in towers:
                towers.append(tower)
    return towers


def image_channels(model: nn.Module) -> int | None:
    """The colour channels of a model's pixels, where the model says so: a transformers config's
    ``num_channels``, or the first convolution of a timm patch embedding (its stem where it has one, as VOLO's:
    the ``proj`` after it takes the stem's channels); None where it does not."""
    config = getattr(model, "config", None)
    for holder in (config, getattr(config, "vision_config", None)):
        channels = getattr(holder, "num_channels", None)
        if is_int(channels) and channels > 0:
            return channels
    embed = getattr(model, "patch_embed", None)
    if isinstance(embed, nn.Module):
        first = next((m for m in embed.modules() if isinstance(m, (nn.Conv2d, nn.Conv3d))), None)
        if first is not None:
            return _stem_input_channels(model, first)
    return None


def _stem_input_channels(model: nn.Module, first: nn.Module) -> int:
    """The channels of the image before the patch embedding whose first convolution is ``first``: its own input's,
    or, where that is wider than an image (more than 4 channels) and other convolutions make that many, those of
    the stem they chain back to by their channels.

    A user's convolution stem before a module named patch_embed (declared before or after it) takes the image:
    the patch embedding's channels, the stem's output, were taken for the image's, a convolution part-way through
    the stem for the one on the image, and the stem's stride was left out (MAD 2-4x low, QA 325). Its input
    channels alone cannot say so: a grayscale ViT's token convolution (QA 326) and a 13-band ViT's convolution of
    a derived band (QA 328) take other counts than the image, and chain to no convolution making the embedding's.
    A patch embedding taking at most 4 channels (grey, RGB, RGBA) takes the image, whatever makes 3 channels
    elsewhere (a decoder's reconstruction)."""
    channels = first.in_channels
    if channels <= 4:
        return channels
    convolutions = [m for m in module_list(model) if isinstance(m, (nn.Conv2d, nn.Conv3d)) and m is not first]
    seen = {channels}
    while True:
        # The earliest declared convolution making these channels from others (a stem comes before the heads that
        # may make them too; a token convolution keeping the width is no step back).
        maker = next((m for m in convolutions if m.out_channels == channels and m.in_channels not in seen), None)
        if maker is None:
            return channels
        channels = maker.in_channels
        seen.add(channels)


def first_convolution(model: nn.Module, recorded=()) -> nn.Module | None:
    """The first convolution in module order that takes the image's channels (:func:`_convolutions_on_image`): it
    runs on the image, so a forward call starts there (a wrapper may declare a head that convolves the features
    before its backbone); the first convolution of all where none does; without any, a NaFlex tower, one fed
    flattened_patches or Molmo2's (their patches come cut, and a text tower beside them must not start a call). A
    packed tower's convolutions over its tokens (LFM3-VL's, run once per image) are none of these: a model without
    any other starts its calls as one without convolutions. A MONAI ViT or Swin transformer starts its calls at its
    patch embedding (UNETR convolves its input only after its ViT; of several, the one holding the ``recorded``
    modules), an ultralytics model at its yaml graph's first layer (YOLOv5's Focus halves the image before its
    convolution), MONAI's diffusion UNets and autoencoders at the forward of the network holding the ``recorded``
    modules (a ControlNet's conditioning embedding runs after ``conv_in``; an autoencoder's decoder runs alone in
    ``decode``), kornia's LoFTR at its own forward (its backbone runs once per image of a pair of two sizes), a
    diffusers UNet or ControlNet at its own forward (ControlNet's first convolution on 3 channels is its
    conditioning image's, run after ``conv_in``; I2VGen-XL attends before ``conv_in``), vit_pytorch's ViViT with
    MOSS at its own forward (MOSS convolves after its spatial transformer), a model holding diffusers' HunyuanDiT
    ControlNet at its own forward (its patch convolution cuts the latent, then the condition). A model whose
    ``recorded`` modules lie in several towers that take the image (:func:`tower_starts`) starts its calls at its own
    forward; one with several towers that holds them in one alone, at that tower's start."""
    # diffusers' autoencoders first: where their layers lie beside a UNet's or a transformer's, the model's forward
    # starts each call, not the UNet's (QA 361).
    start = (monai_call_start(model, recorded) or monai_spatial_call_start(model, recorded)
             or ultralytics_call_start(model) or diffusers_autoencoders_call_start(model, recorded)
             or diffusers_unets_call_start(model, recorded) or diffusers_images_call_start(model, recorded)
             or kornia_call_start(model, recorded) or vit_pytorch_nd_call_start(model, recorded))
    if start is not None:
        return start
    if _held_tower_starts(model, recorded):
        # Several towers take the image and the recorded modules lie in one or more of them: the model's own forward
        # starts each call (a forward that runs no recorded tower keeps its empty entry), and each tower's start one
        # outside it (tower_starts). The first convolution on the image in module order may be another tower's, run
        # after the recorded one (its layers joined the call before, the last call left empty); a tower's own start
        # may not run in every forward, and a container of towers (a ModuleList, a module whose towers the wrapper
        # calls one by one) runs no forward of its own.
        return model
    convolutions = _convolutions_on_pixels(model)
    on_image = _convolutions_on_image(model)
    if on_image or convolutions:
        first = (on_image or convolutions)[0]
        # In a copy PEFT's ModulesToSaveWrapper holds (a patch embedding trained whole beside LoRA): the wrapper,
        # whose forward runs whichever copy is active, also after the adapters are switched inside the block.
        return copy_holder(model, first) or first
    # A tower fed its processor's pre-cut patches: its own forward starts the call (generate runs Pix2Struct's
    # encoder, and Molmo2's tower in its first step alone, without the model's forward).
    return naflex_call_start(model) or next(
        (m for m in module_list(model) if is_flattened_patches_tower(m) or is_molmo2_tower(m)), None)


def _convolutions_on_image(model: nn.Module) -> list[nn.Module]:
    """The convolutions on pixels (:func:`_convolutions_on_pixels`) that take the image's channels, in module order:
    the model's (:func:`image_channels`, else 3), or, inside a timm or transformers model it holds that says its own,
    that model's (the innermost's). A user's module holding an RGB tower and a grayscale one: the grayscale tower's
    patch embedding was no tower's start, and the RGB tower's convolution started the calls, a call mixing two
    forwards where the grayscale tower ran first."""
    channels = image_channels(model) or 3
    # Only whole models say their channels here: a timm block holding a patch_embed of its own (NextViT's) does not
    # take the image.
    said = [(name + ".", image_channels(module)) for name, module in named_module_list(model)
            if name and (is_timm_model(module) or is_hf_model(module))]
    said = [(prefix, own) for prefix, own in said if own is not None]
    on_pixels = {id(m) for m in _convolutions_on_pixels(model)}
    found = []
    for name, module in named_module_list(model):
        if id(module) in on_pixels:
            # Module order lists a holder before what it holds: the last prefix that matches is the innermost.
            own = next((c for prefix, c in reversed(said) if name.startswith(prefix)), channels)
            if module.in_channels == own:
                found.append(module)
    return found


def _convolutions_on_pixels(model: nn.Module) -> list[nn.Module]:
    """The convolutions of ``model``, in module order, less those over tokens (a packed tower's, PiT's, ...)."""
    on_tokens = (token_convolutions(model) | vit_pytorch_token_convolutions(model)
                 | vit_pytorch_plain_convolutions(model))
    excluded = on_tokens | idle_copies(model)  # and the copies PEFT's ModulesToSaveWrapper does not run now
    return [m for m in module_list(model) if isinstance(m, (nn.Conv2d, nn.Conv3d)) and id(m) not in excluded]


def tower_starts(model: nn.Module, recorded=()) -> list[nn.Module]:
    """Where each tower's calls start, when ``model`` holds several towers that take the image (a user's module
    holding a timm ViT and a transformers ViTModel, an RGB and a grayscale timm ViT, or a vit_pytorch ViT) and the
    ``recorded`` modules lie in one or more of them: the start of each tower holding some; empty otherwise.

    The modules that take the image are the convolutions on its channels (:func:`_convolutions_on_image`: each
    tower's own where a timm or transformers tower says them), vit_pytorch's patch cuts and the towers fed pre-cut
    patches (NaFlex, flattened_patches, Molmo2's); the towers are the children of the innermost module holding
    them all, one per path to them. Which tower runs first is the forward's choice, not their order in the module
    tree: the first convolution in module order split each forward where the other tower ran first (its layers
    joined the call before). So the model's own forward starts each call (:func:`first_convolution`), and outside
    it (a tower called on its own, a method of the user's) each tower's start, the module where it would start its
    calls recorded alone, starts one. MONAI's diffusion UNets and autoencoders: each of their networks holding
    recorded modules (an autoencoder's encoder and decoder, :func:`.families.monai_spatial.tower_starts`).
    """
    networks = monai_spatial_tower_starts(model, recorded)
    if networks:
        return networks
    networks, outside = diffusers_autoencoders_holding(model, recorded)
    denoisers = diffusers_denoisers_holding(model, outside) if outside else []
    if networks and denoisers is not None and (len(networks) > 1 or denoisers):
        # An autoencoder's encoder and decoder (encode and decode run alone), and each diffusers UNet, ControlNet or
        # transformer beside them at its own start (ConsistencyDecoderVAE's UNet steps, a DiT run alone: QA 361; the
        # first convolution of the model's was the VAE's, QA 362).
        held = [{id(m) for m in denoiser.modules()} for denoiser in denoisers]
        starts = [first_convolution(denoiser, [m for m in outside if id(m) in inside])
                  for denoiser, inside in zip(denoisers, held)]
        return networks + [start for start in starts if start is not None]
    unets = diffusers_unets_holding(model, recorded)
    if unets and all(unet is not model for unet in unets) and diffusers_unets_call_start(model, recorded) is model:
        # A user's step running a ControlNet, then the UNet (or MultiControlNetModel holding one net twice): each
        # run alone outside the step starts a call (it joined the step's call before, QA 362, QA 365).
        return unets
    return _held_tower_starts(model, recorded)


def _image_towers(model: nn.Module) -> list[str]:
    """The qualified names of the towers of ``model`` that take the image (:func:`tower_starts`: the children of the
    innermost module holding every module that takes it, one per path to them), where there are two or more; else
    empty."""
    on_image = {id(m) for m in _convolutions_on_image(model)}
    cuts = {id(m) for m in vit_pytorch_image_cuts(model)}
    entries = [name.split(".") for name, module in named_module_list(model) if name and (
        id(module) in on_image or id(module) in cuts or is_naflex_tower(module)
        or is_flattened_patches_tower(module) or is_molmo2_tower(module))]
    if len(entries) < 2:
        return []
    depth = 0
    while all(len(path) > depth + 1 and path[depth] == entries[0][depth] for path in entries):
        depth += 1
    towers = list(dict.fromkeys(".".join(path[:depth + 1]) for path in entries))
    return towers if len(towers) >= 2 else []


def stems_beside_towers(model: nn.Module, recorded) -> list[nn.Module]:
    """In the towers of ``model`` (:func:`_image_towers`) that hold none of the ``recorded`` modules, the
    convolutions on the image's channels and the modules holding them up to that tower: a branch with no attention
    of its own, which may be a stem that feeds a recorded tower (a learned 2x downsampler, ``nn.Conv2d(3, 3, 2,
    2)``, or that in an ``nn.Sequential`` with its norm and activation, before an RGB ViT) as well as a branch beside
    it. The recorder tells them apart in each call by the tensor a recorded tower starts on: the very output of one
    of these modules, or another (``Recording._start_tower_call``)."""
    inside = {id(m) for m in recorded}
    on_image = {id(m) for m in _convolutions_on_image(model)}
    found: dict[int, nn.Module] = {}
    for name in _image_towers(model):
        tower = model.get_submodule(name)
        if any(id(m) in inside for m in tower.modules()):
            continue
        for path, module in named_module_list(tower):
            if id(module) in on_image:  # the convolution, then each module above it up to the tower
                for holder in (module, *(above for _, above in enclosing_modules(tower, path))):
                    found.setdefault(id(holder), holder)
    return list(found.values())


def tower_inputs(model: nn.Module, recorded) -> list[tuple[nn.Module, nn.Module, bool]]:
    """``(module, start, outermost)`` for each module on the path from a tower of :func:`held_towers` down to its
    start, the start left out (``outermost``: the tower itself): those that may receive the tower's input and pad or
    cast it before the convolution that starts it (the tower's forward, or its patch embedding where a method such
    as ``forward_features`` runs the tower)."""
    found = []
    for tower, start in held_towers(model, recorded):
        path = next((name for name, module in named_module_list(tower) if module is start), None)
        if path:
            found.extend((holder, start, not prefix) for prefix, holder in enclosing_modules(tower, path))
    return found


def _held_tower_starts(model: nn.Module, recorded) -> list[nn.Module]:
    """The start (:func:`tower_starts`) of each tower of ``model`` that holds some of the ``recorded`` modules, where
    it has two towers or more that take the image; empty otherwise. A tower that holds several towers itself (a
    ``ModuleList`` of them) gives theirs."""
    return [start for _, start in held_towers(model, recorded)]


def held_towers(model: nn.Module, recorded) -> list[tuple[nn.Module, nn.Module]]:
    """``(tower, start)`` of each tower of :func:`_held_tower_starts`: the tower's module and its start."""
    inside = {id(m) for m in recorded}
    found = []
    for name in _image_towers(model):
        tower = model.get_submodule(name)
        held = [m for m in tower.modules() if id(m) in inside]
        if held:
            found.extend(held_towers(tower, held) or [(tower, first_convolution(tower, held) or tower)])
    return found
