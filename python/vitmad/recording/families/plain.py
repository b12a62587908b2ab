"""The plain ViT layout: tokens without a position, a full row-major patch grid, tokens without a position.

ViT, DeiT, BEiT, DINOv2 (registers), EVA, CLIP/SigLIP towers and every model whose attention runs over the
patch-embedding grid plus extra tokens. The grid is the patch embedding's output in each call (non-square
inputs, ``dynamic_img_size`` and interpolated position embeddings are followed); the tokens before the grid
are the rest, unless the model puts some after it (YOLOS' detection tokens, ``config.num_detection_tokens``).

Pixel scale: one token covers the patch-embedding stride times the stride of whatever ran before it on the
image (a CNN stem in hybrid ViTs such as ``vit_tiny_r_s16_p8_224``, ViT-hybrid or DPT-hybrid): the stem's stride
is the product of the strides of its convolutions and pools, followed from the image's size to the patch
embedding's input in each call (:func:`stem_stride`); the ratio of those sizes alone is ambiguous where the stem
rounds its maps.
"""

from __future__ import annotations

import functools
import warnings

import torch
from torch import nn

from ..module_index import enclosing_modules, idle_copies, is_known_library, named_module_list, unwrapped_name
from ..placement import (
    PLACING_KEYS_ONLY,
    CallContext,
    LayerGeometry,
    LayerPlacer,
    NotPlaceable,
    Placement,
    cell_centres,
    read_only,
    select_tokens,
)
from .stages import pair
from .unplaced import molmo2_layout_unknown, radio_layout_unknown
from .windows import parent_module

__all__ = ["MODEL_INPUT_SHAPE", "PlainLayout", "PlainPlacer", "patch_dropout_modules", "dropping_patches",
           "find_patch_embedding", "stem_step", "stem_stride", "strided_stem",
           "in_a_known_library", "is_embedding_projection", "keeps_image_layout", "num_suffix_tokens",
           "random_token_order"]

_GRID, _EMBED_INPUT, _EMBED_BATCH = "plain.grid", "plain.embedding_input", "plain.embedding_batch"
# The shape of the model's input in this call (the recorder sets it where the model's forward runs), and the frames
# (or slices) of it that the patch embedding's images are: a clip [B, T, C, H, W] embedded frame by frame.
MODEL_INPUT_SHAPE, _FRAMES = "plain.model_input_shape", "plain.frames"
# The grids the patch embedding cut since a layer was last placed, in this call (and in the empty calls of this forward
# before it: the recorder carries them over), one per run: several runs before a layer leave its tokens' run unknown.
RUN_GRIDS = "plain.run_grids"
# The stem steps seen since the patch embedding last ran, and those that led to its latest run.
_STEM, _STEM_OF_EMBEDDING = "plain.stem", "plain.stem_of_embedding"
# (extra tokens, tokens) of the first layer of a call whose extra tokens were counted from a grid given by hand.
_HAND_PREFIX = "plain.hand_prefix"
# {grid: (extra tokens, tokens)} of the layers placed in this call with their extra tokens counted from the patch
# embedding's grid (PlainPlacer._check_no_fewer_extra_tokens).
_COUNTED_PREFIX = "plain.counted_prefix"


_PROJECTION_NAMES = ("proj", "projection", "patch_embedding", "patch_embed")


def is_embedding_projection(name: str, module: nn.Module) -> bool:
    """Whether ``module`` is a ``Conv2d`` (or a video model's tubelet ``Conv3d``) named as the projection of a patch
    embedding (``patch_embed.proj``, ``embeddings.patch_embeddings.projection``, ``embeddings.patch_embedding``),
    whatever its kernel."""
    parts = name.split(".")
    # A convolutional position embedding (CSATv2's blocks' pos_embed.proj) runs on tokens, not on the image.
    return (isinstance(module, (nn.Conv2d, nn.Conv3d)) and parts[-1] in _PROJECTION_NAMES
            and any("embed" in p and not p.startswith("pos") for p in parts))


def find_patch_embedding(model: nn.Module, before: str | None = None) -> tuple[str, nn.Conv2d] | None:
    """The convolution that turns the image (or a CNN stem's features) into tokens: ``(qualified name, conv)``.

    First choice, a ``Conv2d`` with kernel equal to its stride named as the projection of a patch embedding
    (``patch_embed.proj`` in timm, ``embeddings.patch_embeddings.projection`` or ``embeddings.patch_embedding``
    in transformers, ``embeddings.projection`` after DPT-hybrid's BiT stem), 1x1 included; else the first
    ``Conv2d`` whose kernel (larger than 1) equals its stride, or the 1x1 ``conv_last`` of torchvision's conv-stem
    ViT. A prompt encoder's convolutions and one named for a mask (``mask_downsample``) are never taken.

    With ``before`` (the qualified name of a layer), the embedding is sought first among those registered before
    that layer in the nearest module above it holding one, then in the whole model: a family whose own model class
    holds both (torchvision's Swin) reads its own, not a user's head declared before it (QA 334).
    """
    modules = named_module_list(model)
    index = None if before is None else next((i for i, (name, _) in enumerate(modules) if name == before), None)
    if index is not None:
        earlier = _candidates(model, modules[:index])
        for prefix, _ in enclosing_modules(model, before):
            found = _first_candidate([c for c in earlier if not prefix or c[0].startswith(prefix + ".")])
            if found is not None:
                return found
    return _first_candidate(_candidates(model, modules))


def _candidates(model: nn.Module, modules: list[tuple[str, nn.Module]]) -> list[tuple[str, nn.Conv2d, bool]]:
    """``(qualified name, conv, named as a projection)`` of each ``Conv2d`` of ``modules`` (of ``model``, in order)
    whose kernel equals its stride, that may be a patch embedding (:func:`find_patch_embedding`'s rule)."""
    # A prompt encoder's mask embedding (SAM's, SAM2's, EdgeTAM's prompt_encoder.mask_embed.conv1: 2x2, stride 2) and
    # a video model's mask_downsample (4x4, stride 4, of the predicted mask for its memory) embed a mask, never the
    # image: taken for the patch embedding, they made EdgeTAM's prompt encoder its image tower (found by QA).
    prompts = [name + "." for name, module in named_module_list(model)
               if type(module).__name__.endswith("PromptEncoder")]
    idle = idle_copies(model)
    found = []
    for name, module in modules:
        if any(name.startswith(prompt) for prompt in prompts) or "mask" in name.rpartition(".")[2] \
                or id(module) in idle:
            continue
        if not isinstance(module, nn.Conv2d) or any(part in ("lora_A", "lora_B") for part in name.split(".")):
            continue  # (PEFT's LoRA adapter convolutions beside the one they adapt: QA 372, lora_A, of its kernel
            # and stride, was taken for the embedding)
        stem_part = _conv_stem_part(model, name)
        if stem_part == "stack":
            continue  # a convolution of the conv-stem ViT's stack, before its conv_last: the stem, not the embedding
        if tuple(module.kernel_size) == tuple(module.stride):
            projection = is_embedding_projection(unwrapped_name(name), module)
            if projection or max(module.kernel_size) > 1 or stem_part == "last" and tuple(module.kernel_size) == (1, 1):
                found.append((name, module, projection))
    return found


def _conv_stem_part(model: nn.Module, name: str) -> str | None:
    """``"last"`` for the ``conv_last`` of torchvision's conv-stem ViT (``conv_stem_configs``: a ``conv_proj``
    Sequential of strided Conv-BN-ReLU blocks, then this 1x1 convolution, whose tokens are one per cell of the stack's
    map), ``"stack"`` for a convolution of that stack (``conv_proj.conv_bn_relu_<i>.0``), of the class or a subclass
    of it; None for any other convolution.

    ``conv_last`` is a candidate patch embedding as a convolution whose kernel (larger than 1) equals its stride is,
    the stack before it followed as a stem: of kernel 1, it was never taken, and the model was refused as having no
    patch embedding. (Not taken as named for a projection, preferred over earlier candidates: which tower a wrapper
    of two records, and the grid each is checked against, stay as they were, QA 369.) The stack's convolutions are
    never candidates: a kernel equal to its stride made the first taken before conv_last (QA 371)."""
    parts = unwrapped_name(name).split(".")  # PEFT's wrappers (modules_to_save, LoRA's base_layer) left out
    if parts[-2:] == ["conv_proj", "conv_last"]:
        part, tail = "last", 2
    elif len(parts) >= 3 and parts[-3] == "conv_proj" and parts[-2].startswith("conv_bn_relu_") and parts[-1] == "0":
        part, tail = "stack", 3
    else:
        return None
    try:
        owner = model.get_submodule(".".join(parts[:-tail]))
    except AttributeError:  # a wrapper above the ViT: its path is not the module's own
        return None
    # (conv_last exists only in a conv-stem ViT: conv_proj may be PEFT's wrapper of the stack, QA 371.)
    if any(base.__module__ == "torchvision.models.vision_transformer" and base.__name__ == "VisionTransformer"
           for base in type(owner).__mro__):
        return part
    return None


def _first_candidate(candidates: list[tuple[str, nn.Conv2d, bool]]) -> tuple[str, nn.Conv2d] | None:
    """The first named as a projection of the :func:`_candidates`, else the first of them, or None."""
    chosen = next((c for c in candidates if c[2]), candidates[0] if candidates else None)
    return None if chosen is None else (chosen[0], chosen[1])


def overlapping_patch_embedding(model: nn.Module) -> tuple[str, nn.Conv2d] | None:
    """The first ``Conv2d`` named as the projection of a patch embedding whose kernel overlaps its stride (an audio
    spectrogram transformer's 16 x 16 patches every 10 bins): the plain layout's embedding where the model has no
    :func:`find_patch_embedding`. Its tokens are the cells of its stride (``docs/definition.md``)."""
    idle = idle_copies(model)
    for name, module in named_module_list(model):
        if isinstance(module, nn.Conv2d) and id(module) not in idle \
                and is_embedding_projection(unwrapped_name(name), module) \
                and all(k > s for k, s in zip(module.kernel_size, module.stride)):
            return name, module
    return None


def num_suffix_tokens(model: nn.Module, embedding: tuple[str, nn.Module] | None = None) -> int:
    """Tokens the model appends after the patch grid: YOLOS' detection tokens, else none. Read from the config of
    the nearest module above the patch embedding that has one (the model itself without an embedding): a YOLOS
    inside a user's module or an nn.Sequential had its 100 detection tokens taken for prefix tokens, every patch a
    hundred tokens off, silently (QA 334)."""
    owners = (module for _, module in enclosing_modules(model, embedding[0])) if embedding is not None else [model]
    config = next((module.config for module in owners if getattr(module, "config", None) is not None), None)
    return int(getattr(config, "num_detection_tokens", 0) or 0)


def random_token_order(model: nn.Module, embedding: tuple[str, nn.Module] | None) -> str | None:
    """The function of a user's module above the patch embedding (the model itself included) that draws random
    numbers and orders by them (:func:`~..module_capture.random_ordering`: MAE's ``random_masking``, a shuffle),
    or None. A library's own are known by their families (timm's PatchDropout, transformers' ViTMAE, vit-pytorch's
    MAE)."""
    from ..module_capture import random_ordering

    owners = [owner for _, owner in enclosing_modules(model, embedding[0])] if embedding is not None else [model]
    for owner in owners:
        cls = type(owner)
        if is_known_library(cls) or cls.__module__.split(".")[0] == "torch":
            continue
        found = random_ordering(cls)
        if found is not None:
            return found
    return None


def in_a_known_library(model: nn.Module, path: str, embeddings: bool = True) -> bool:
    """Whether a module on the path to the module ``path`` (a patch embedding, an attention layer; the model itself
    included, that module and torch's own modules not) is defined in a library vitmad reads; with ``embeddings``
    False, a library's embedding module (its class name says "embed": timm's PatchEmbed, transformers'
    ViTPatchEmbeddings) does not count: a user's own ViT may be built of one (QA 325), where a library model
    holding the convolution itself (torchvision's conv_proj, OpenCLIP's conv1) does (QA 326)."""
    parts = path.split(".")
    for depth in range(len(parts)):
        owner = type(model.get_submodule(".".join(parts[:depth])))
        if is_known_library(owner) and (embeddings or "embed" not in owner.__name__.lower()):
            return True
    return False


def declared_prefix_tokens(model: nn.Module, embedding: tuple[str, nn.Module] | None) -> tuple[str, int] | None:
    """The count of tokens before the grid that the model holding the patch embedding declares, as timm's models
    do (``num_prefix_tokens``: class, distillation and register tokens), with that model's name; None where no
    module above the embedding declares one."""
    if embedding is None:
        return None
    for _, owner in enclosing_modules(model, embedding[0]):
        declared = getattr(owner, "num_prefix_tokens", None)
        if isinstance(declared, int) and not isinstance(declared, bool) and declared >= 0:
            return type(owner).__name__, declared
    return None


def appended_tokens(model: nn.Module, name: str) -> int:
    """Tokens one layer appends after the grid besides the model's own (:func:`num_suffix_tokens`): X-CLIP's
    cross-frame blocks append each frame's message token to [CLS, patches] before their self-attention."""
    owner = parent_module(model, name)
    return 1 if name.rpartition(".")[2] == "self_attn" and type(owner).__name__ == "XCLIPVisionEncoderLayer" else 0


def keeps_image_layout(model: nn.Module, name: str) -> bool:
    """Whether the attention module ``name``, outside the tower that embeds the image, still attends over that
    tower's tokens in its order (extra tokens, then the full row-major grid): ViTMAE's pretraining decoder (CLS,
    then every cell, mask tokens included) and BridgeTower's cross-modal image layers (their self-attention runs
    over the vision tower's output). Any other layer outside the tower may mix the image with text or other
    tokens (a language model, a multimodal encoder) and is placed only when the user states its layout."""
    parts = name.split(".")
    for depth in range(len(parts)):
        owner = model.get_submodule(".".join(parts[:depth]))
        if type(owner).__name__ == "ViTMAEDecoder":
            return True
        if type(owner).__module__.endswith("modeling_bridgetower") and parts[depth] == "cross_modal_image_layers":
            return True
    return False


def stem_stride(image: int, embedding_input: int, axis: str, model: nn.Module,
                 steps: list[tuple[int, int, int, int]] | None, patch: int,
                 advice: str = "pass patch=<pixels per token>", embedding: str = "the patch embedding") -> int:
    """The stride of what ran on the image before the patch embedding (1 without a stem), on one axis.

    ``steps`` are the ``(input size, output size, stride, kernel)`` on this axis of the strided convolutions and
    pools that ran before the patch embedding in this call, in the order they ran (None where the model has none).
    The stride is the product of the strides along the chain of maps from the image to the embedding's input: a
    stem that rounds its maps up (232 px through a ResNet stem of stride 16 gives 15 cells, which are 16 px apart,
    not 232 / 15) is followed exactly, as the ratio of the sizes is not. Without such modules (a stem that resizes
    by functions alone), only a ratio that divides exactly is taken; anything else is refused rather than guessed.
    ``patch`` is the embedding's stride on this axis; ``advice`` ends a refusal (what the caller's layout takes),
    ``embedding`` names what reads the stem's map in it."""
    if embedding_input == image:
        return 1
    if steps:
        stride, size = 1, image
        for seen, out, step, kernel in steps:
            if out == size:
                continue  # another module making the same map: a residual branch's strided shortcut
            # On the chain, a module reads the current map, or that map padded by what no hook sees (BiT's fixed
            # stem pads before its max pool: at most kernel - 1), and makes a smaller one. A module off it (a
            # branch from an earlier map) is not guessed around.
            if out > size or not size <= seen <= size + kernel - 1:
                raise NotPlaceable(
                    f"the strided modules before {embedding} of {type(model).__name__} do not make one chain "
                    f"of maps from the image {axis} of {image}: after a map of {size}, one reads {seen} and makes "
                    f"{out}, so vitmad cannot tell how many pixels apart its tokens are; {advice}"
                )
            stride, size = stride * step, out
        # The embedding sees that map, or that map padded up to a multiple of its patch (timm's HybridEmbed with
        # dynamic_img_pad): its tokens then cover the padded map, each `stride` pixels of the image per cell.
        if size <= embedding_input < size + patch:
            return stride
        raise NotPlaceable(
            f"the strided modules before {embedding} of {type(model).__name__} take the image {axis} of "
            f"{image} to {size}, but the embedding sees {embedding_input} (a crop or resize vitmad does not see, or a "
            "strided module that ran after the map the embedding takes), so "
            f"vitmad cannot tell how many pixels apart its tokens are; {advice}"
        )
    stride = round(image / embedding_input)
    if stride < 1 or embedding_input * stride != image:
        raise NotPlaceable(
            f"{embedding} of {type(model).__name__} sees a {axis} of {embedding_input} from an image "
            f"{axis} of {image}, which is no whole stride of the image, and no strided convolution or pool before it "
            f"tells how many pixels apart its tokens are; {advice}"
        )
    return stride


def stem_step(module: nn.Module, args: tuple, output) -> tuple | None:
    """``(input size, output size, stride, kernel)`` per axis (height, width) of one call of a strided module of
    :func:`strided_stem` (a forward hook's arguments), the step :func:`stem_stride` follows; None for a call on
    other than ``[B, C, H, W]`` maps."""
    if not (isinstance(output, torch.Tensor) and output.dim() == 4 and args and isinstance(args[0], torch.Tensor)
            and args[0].dim() == 4):
        return None
    stride, kernel = pair(module.stride), pair(module.kernel_size)
    return tuple((int(args[0].shape[a]), int(output.shape[a]), stride[a], kernel[a]) for a in (-2, -1))


def strided_stem(model: nn.Module, embedding: nn.Module | None) -> list[nn.Module]:
    """The strided convolutions and pools (and the stride-1 convolutions that shrink their map) registered before the
    patch-embedding convolution ``embedding`` (every one of ``model`` for None: a projectionless HybridEmbed's
    backbone, all stem): the modules a CNN stem (hybrid ViTs) downsamples the image with, when the model has one.
    Those registered here that do not run before the embedding in a call are not seen in it; one of another part of
    the model that does run before it, on maps off the stem's chain, makes :func:`stem_stride` refuse the call
    rather than guess. A stem that downsamples by functions (``F.avg_pool2d``), pixel unshuffle or adaptive pools
    makes no chain, and only an exact ratio is taken."""
    found = []
    for _, module in named_module_list(model):
        if module is embedding:
            return found
        if isinstance(module, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)) and max(pair(module.stride)) > 1 \
                or _shrinks(module):
            found.append(module)
    return found


def _shrinks(module: nn.Module) -> bool:
    """Whether ``module`` is a stride-1 convolution padded less than its kernel's half (``nn.Conv2d(3, 3, 3)``): its
    map is smaller than its input by ``kernel - 1 - 2 * padding``, a step of stride 1 on the stem's chain. Left out,
    a 34 px image through it to a 32 px embedding input was taken for a resize by 34 / 32 and refused (QA 351)."""
    if not isinstance(module, nn.Conv2d) or max(pair(module.stride)) > 1 or isinstance(module.padding, str):
        return False
    return any(kernel > 1 and 2 * padding < (kernel - 1) * dilation
               for kernel, padding, dilation in zip(pair(module.kernel_size), pair(module.padding),
                                                    pair(module.dilation), strict=True))


def _text_vocabulary_clause(model: nn.Module) -> str:
    """Where a model with no patch embedding embeds text tokens (transformers' embed_tokens / word_embeddings, GPT's
    wte, CLIP-style text encoders' token_embedding: SAM3 LiteText's, whose refusal said no more than that it found no
    patch embedding), a clause saying what such a model may be: an encoder-free multimodal model (NeoMME, Gemma 4
    Unified, Fuyu) puts its image patches through a Linear into its language model, whose layers were taken for the
    tower's (QA helper-120: the refusal invited placing them)."""
    found = next(((n, m) for n, m in named_module_list(model) if isinstance(m, nn.Embedding)
                  and n.rsplit(".", 1)[-1] in ("embed_tokens", "word_embeddings", "wte", "token_embedding")), None)
    if found is None:
        return ""
    return (f" ({type(model).__name__} embeds text tokens, {found[0]}: {found[1].num_embeddings} of them; if it is "
            "an encoder-free multimodal model, whose image patches go through a Linear straight into its language "
            "model and are attended mixed with text, it has no vision transformer whose MAD vitmad measures)")


class PlainLayout:
    """The patch embedding, the user's overrides and the per-call grid shared by a model's plain placers."""

    def __init__(self, model: nn.Module, patch: int | None, grid: tuple[int, int] | None,
                 num_prefix_tokens: int | None):
        self.model = model
        self.embedding = find_patch_embedding(model) or overlapping_patch_embedding(model)
        self.patch, self.grid, self.num_prefix_tokens = patch, grid, num_prefix_tokens
        # The user stated (part of) the layout: families that read a plain layout their own way defer to it.
        self.given_by_hand = (patch, grid, num_prefix_tokens) != (None, None, None)
        self.suffix = num_suffix_tokens(model, self.embedding)
        self.declared_prefix = declared_prefix_tokens(model, self.embedding)
        name = type(model).__name__
        if self.embedding is None and (patch is None or grid is None):
            # RADIO and Molmo2 cut their patches without a convolution (their families place them): a partial layout
            # given by hand for them is refused with the layout vitmad places.
            self.unavailable = (radio_layout_unknown(model) or molmo2_layout_unknown(model) if self.given_by_hand
                                else None) or (
                f"found no patch-embedding Conv2d (kernel == stride) in {name} and vitmad knows no other layout of "
                "this module's tokens" + _text_vocabulary_clause(model)
                + ("; pass positions=<[N, 3] position of each token on the volume (slice, row, column)>"
                   if any(isinstance(m, nn.Conv3d) for _, m in named_module_list(model))
                   else "; pass positions=<[N, 2] pixel position of each token>")
                + ", or, only if they are a "
                "plain ViT grid (extra tokens first), patch=<pixels per patch> and grid=[grid_h, grid_w], with "
                "layers=[the modules that attend over those tokens] where others (a decoder's queries) attend too "
                "(layers over other token counts in one call are refused)")
        else:
            self.unavailable = None
        self.stem = [] if self.embedding is None else strided_stem(model, self.embedding[1])
        # Found once: every layer's placement asks whether one drops patches in this forward (train or eval mode
        # may change between forwards), and a walk of the model per layer call would cost the hot path. (Eva's
        # PatchDropoutWithIndices got the generic refusal, advising grid=, before it was among them.)
        self.patch_dropouts = patch_dropout_modules(model)
        self.patch_said = False  # the given patch= that is not the embedding's stride was warned of
        # A model no library vitmad knows defines (a user's own ViT) declares nowhere where its extra tokens are:
        # they are taken to come first, and that is said once per count of them (a class token last moved every
        # patch one cell; registers appended after the grid part-way through the model were placed first under
        # the warning of the earlier layers' class token alone, QA 325). Not the patch embedding's own module: a
        # user's ViT built of timm's PatchEmbed and Blocks (as MAE's code is) is the user's, and was not warned.
        self.extra_tokens_said: set[int] | None = (
            None if self.embedding is None or in_a_known_library(model, self.embedding[0], embeddings=False)
            else set())
        # A user's masked encoder (MAE's random_masking) keeps a random subset of the patches in a random order: at
        # a count that fits the grid (every patch kept, shuffled; or as many dropped as there are extra tokens) they
        # were placed as the row-major grid, silently (QA 337). Said once per recording: a static reading of the
        # source cannot tell a shuffle of the tokens from a random mask kept in place (SimMIM), so it warns; a
        # refusal refused such models and many more (QA 340).
        self.random_order = random_token_order(model, self.embedding)
        self.random_order_said = False

    def install(self, context: CallContext) -> list[torch.utils.hooks.RemovableHandle]:
        if self.embedding is None:
            return []

        def see_stem(module, args, output) -> None:
            step = stem_step(module, args, output)
            if step is not None:
                context.values.setdefault(_STEM, []).append(step)

        def see(module, args, output) -> None:
            if output.dim() != 4:
                raise RuntimeError(
                    f"vitmad.record: the patch embedding of {type(self.model).__name__} returned shape "
                    f"{list(output.shape)}, expected [B, C, grid_h, grid_w]; pass grid=[grid_h, grid_w]"
                )
            context.values[_GRID] = (int(output.shape[-2]), int(output.shape[-1]))
            context.values.setdefault(RUN_GRIDS, []).append(context.values[_GRID])
            context.values[_EMBED_INPUT] = (int(args[0].shape[-2]), int(args[0].shape[-1]))
            # A forward that embeds twice (several crops in one call) pairs each embedding with its own stem steps.
            if self.stem:
                context.values[_STEM_OF_EMBEDDING] = context.values.pop(_STEM, None)
            context.values[_EMBED_BATCH] = int(output.shape[0])
            context.values[_FRAMES] = _frames(context.values.get(MODEL_INPUT_SHAPE), int(output.shape[0]))

        return [self.embedding[1].register_forward_hook(see),
                *(module.register_forward_hook(see_stem) for module in self.stem)]

    def stride(self, context: CallContext) -> tuple[float, float]:
        if self.patch is None:
            return self._embedding_stride(context)
        given = float(self.patch), float(self.patch)
        if self.grid is None and self.embedding is not None:
            # An override by design (a model resizing its pixels where vitmad cannot see it), but one that silently
            # scaled every distance when it was a mistake (QA: patch=8 on a 16 px embedding halved MAD).
            read = self._embedding_stride(context)
            if read != given and not self.patch_said:
                self.patch_said = True
                shown = "x".join(f"{v:g}" for v in dict.fromkeys(read))
                warnings.warn(f"vitmad.record: the given patch={self.patch} is not the {shown} px stride vitmad reads "
                              f"from {type(self.model).__name__}'s patch embedding {self.embedding[0]} on the image "
                              f"it was given; the given one is used (MAD in units of {self.patch} px per token)",
                              stacklevel=2)
        return given

    def _embedding_stride(self, context: CallContext) -> tuple[float, float]:
        # Per axis: a patch of 16 x 8 pixels (timm's patch_size=(16, 8)) has its cells 16 px apart down, 8 across.
        # The embedding's stride: its kernel, or, for overlapping patches, the stride cell.
        step = tuple(int(k) for k in self.embedding[1].stride)
        image, seen = context.image_size, context.values.get(_EMBED_INPUT)
        if image is None or seen is None:
            return float(step[0]), float(step[1])
        steps = context.values.get(_STEM_OF_EMBEDDING)
        return tuple(float(k * stem_stride(i, s, axis, self.model, None if steps is None else [t[a] for t in steps],
                                            k))
                     for a, (k, i, s, axis) in enumerate(zip(step, image, seen, ("height", "width"))))

    def call_grid(self, context: CallContext) -> tuple[int, int]:
        grid = self.grid or context.values.get(_GRID)
        if grid is None:
            raise NotPlaceable(
                f"the patch embedding {self.embedding[0]} had not run in this call when it attended (the model "
                "embeds its patches with another module, or runs this layer first), so the grid of its tokens is "
                "unknown; pass positions=<[N, 2] pixel position of each token, NaN rows for tokens off the image>, "
                "or grid=[grid_h, grid_w] only if its tokens are [extra tokens][that full row-major grid]"
            )
        return grid


def patch_dropout_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``model``'s patch dropout modules by qualified name: timm's PatchDropout and PatchDropoutWithIndices (Eva's,
    NaFlexVit's), OpenCLIP's PatchDropout. Found once per layout: :func:`dropping_patches` reads them per call."""
    return [(name, module) for name, module in named_module_list(model)
            if type(module).__name__ in ("PatchDropout", "PatchDropoutWithIndices")]


def dropping_patches(patch_dropouts: list[tuple[str, nn.Module]]) -> str | None:
    """``"timm's PatchDropout (<name>, prob p)"`` for the first of the model's ``PatchDropout`` modules (timm's or
    OpenCLIP's, ``PlainLayout.patch_dropouts``) that drops patches in this forward (training mode, ``prob > 0``),
    else None. Neither says which patches it kept (OpenCLIP's draws them from the global generator)."""
    for name, module in patch_dropouts:
        if module.training and float(getattr(module, "prob", 0)) > 0:
            library = "OpenCLIP" if type(module).__module__.startswith("open_clip.") else "timm"
            return f"{library}'s PatchDropout ({name}, prob {float(module.prob):g})"
    return None


class PlainPlacer(LayerPlacer):
    """Places the tokens of one attention layer of a plain ViT (attention ``[B, H, N, N]``)."""

    def __init__(self, layout: PlainLayout, appended: int = 0, named: bool = False):
        self.layout = layout
        self.appended = appended  # tokens this layer appends after the grid (appended_tokens)
        # The user chose the layer in layers=, or a library vitmad reads lays out its tokens (X-CLIP's, whose layers
        # over frames its family skips: recorder._laid_out_by_library): it attends over the grid it is placed on.
        self.named = named

    def place(self, context: CallContext, lead: torch.Size, num_queries: int, num_keys: int) -> Placement:
        layout = self.layout
        suffix = layout.suffix + self.appended
        if layout.unavailable is not None:
            raise NotPlaceable(layout.unavailable)
        if num_queries != num_keys or len(lead) != 2:
            # Say which way it differs: a user reading it learns whether the layer merges batch and heads (GroupViT,
            # SegGPT), attends from other queries than its keys, or has dims of its own.
            shape = f"[{', '.join(map(str, lead))}, {num_queries}, {num_keys}]"
            how = ("its queries are not its keys" if num_queries != num_keys else
                   "batch and heads merged in one dim, or no head dim" if len(lead) == 1 else
                   f"{len(lead)} leading dims")
            # positions= places self-attention [B, H, N, N] only (GivenPositionsPlacer): advising it here would send
            # the user to a second refusal.
            raise NotPlaceable(
                f"its attention has shape {shape} ({how}); a plain ViT layer attends [B, H, N, N] over the patch "
                f"grid and its extra tokens, and vitmad does not know the token layout of this attention of "
                f"{type(layout.model).__name__}, so it cannot record it; positions= cannot place it either (it places "
                "self-attention [B, H, N, N] over each image's tokens); where the model holds other attention that "
                "vitmad places, leave this module out with layers=[the other attention modules]"
            )
        grid = layout.call_grid(context)
        patches = grid[0] * grid[1]
        dropping = dropping_patches(layout.patch_dropouts)
        if dropping is not None:
            # It drops at least one patch per image (int(L * (1 - prob)) < L kept): the rest could still pass for a
            # grid after fewer extra tokens (registers outnumbering the dropped patches), so it is never counted.
            raise NotPlaceable(
                f"it attends over {num_queries} tokens while {dropping} keeps a random subset of the "
                f"{grid[0]}x{grid[1]} = {patches} patches in training mode, and vitmad does not place the kept ones; "
                "record the model in eval mode (model.eval()), or with its patch dropout off"
            )
        embedded = context.values.get(_EMBED_BATCH)
        if embedded is not None and layout.grid is None and int(lead[0]) != embedded:
            # Tiles, crops or windows batched apart from the images the patch embedding saw: its tokens are not
            # one image's extra tokens and grid (Mllama's tiles in one sequence, a SAM-style encoder's windows).
            raise NotPlaceable(
                f"it attends over {int(lead[0])} sequences, but the patch embedding {layout.embedding[0]} embedded "
                f"{embedded} images in this call (tiles, crops or windows regrouped? heads before the images, "
                "[H, B, N, D], where vitmad reads [B, H, N, D]?), so its tokens are not each image's extra tokens and "
                "patch grid, and vitmad does not know their layout; pass positions=<[N, 2] pixel position of each "
                "token> if you know it"
            )
        frames = context.values.get(_FRAMES)
        if frames is not None and frames > 1 and frames in (num_queries, patches) and not self.named:
            # A clip embedded frame by frame whose frames are as many as this layer's tokens: attention over time
            # ([B*N, H, T, T] of divided space-time attention) has the shape of attention over a frame's tokens, and
            # was placed on its grid: pixel distances between one cell's frames (QA 423: 7-10 px where the spatial
            # MAD is 0; with a class token per frame, T = N + 1, QA 431); so too where the frames are as many as a
            # frame's patches, a layer over time with a temporal class token of its own then having the spatial
            # layer's shape (QA 432). Refused; where T differs, a layer over time is refused by its batch.
            raise NotPlaceable(
                f"{type(layout.model).__name__} embeds its input clip as {frames} frames (or slices), as many as "
                + (f"this layer's tokens (a frame's {grid[0]}x{grid[1]} patches and extra tokens?)"
                   if frames == num_queries else f"the {grid[0]}x{grid[1]} patches of each") +
                ", so a layer attending over the frames has the shape of one attending over a frame's tokens, and "
                "vitmad cannot tell which this layer is; name the layers that "
                "attend over each frame's patches in layers= (with num_prefix_tokens= where extra tokens come "
                "first), or record a clip of another number of frames"
            )
        source = "given grid" if layout.grid else "patch embedding"
        prefix = layout.num_prefix_tokens
        seen = context.values.get(_GRID)
        if prefix is None and layout.grid and seen is not None and tuple(seen) != tuple(layout.grid):
            # The extra tokens are counted from the grid: a grid that is not the embedding's would count some
            # patches as extra tokens and measure the rest on the wrong grid. A hybrid whose first kernel ==
            # stride convolution is not the patch embedding says num_prefix_tokens too.
            # RADIO's family reports the grid its patch embeddings cut (no convolution: layout.embedding is None).
            embedding = layout.embedding[0] if layout.embedding is not None else "read by its family"
            raise NotPlaceable(
                f"the given grid={list(layout.grid)} is not the {seen[0]}x{seen[1]} grid of its patch embedding "
                f"({embedding}) in this call, and its extra tokens would be counted from it; leave grid "
                "unset, or, if its tokens are a grid of that size (pooled, or a stage after other strides), pass "
                "num_prefix_tokens=<tokens before the grid> and patch=<pixels per token of the given grid> too"
            )
        counted = prefix is None
        if counted:
            prefix = num_queries - patches - suffix
            if prefix < 0:
                raise NotPlaceable(
                    f"it attends over {num_queries} tokens, fewer than the {grid[0]}x{grid[1]} = {patches} "
                    f"patches of the {source}"
                    + (f" plus {suffix} tokens after them" if suffix else "")
                    + " (windows, pooled tokens or dropped patches?), so its tokens cannot be placed; if they are a "
                    "full grid, pass grid=[grid_h, grid_w], num_prefix_tokens=<tokens before the grid> and "
                    "patch=<pixels per token of that grid>, or positions=<[N, 2] pixel position of each token, NaN "
                    "rows for tokens off the image>"
                )
            declared = layout.declared_prefix
            if declared is not None and prefix > declared[1] and layout.grid is None:
                # Counted from the grid, the extra tokens would all be taken to come first: tokens a user's hook
                # appends after the grid would shift every patch's position by their number. Fewer is no sign of
                # that: CaiT and ConViT declare the class token their first blocks run without.
                raise NotPlaceable(
                    f"it attends over {num_queries} tokens: the {grid[0]}x{grid[1]} = {patches} patches of the "
                    f"{source}{f' and {suffix} tokens after them' if suffix else ''} leave {prefix} extra tokens, but "
                    f"{declared[0]} declares num_prefix_tokens={declared[1]} (tokens added after the grid or "
                    "between its patches?), so vitmad does not know where they are; pass num_prefix_tokens=<tokens "
                    "before the grid> if the extra tokens all come first, or positions=<[N, 2] pixel position of "
                    "each token, NaN rows for tokens off the image>"
                )
            elif declared is not None and 0 < prefix < declared[1] and layout.grid is None \
                    and not context.values.get(PLACING_KEYS_ONLY):
                # Fewer than declared: CaiT and ConViT run their first blocks without the class token, over the
                # patches alone (0). Some but not all of them is patches pruned or merged before the layer in a model
                # with registers (ToMe's patch of a timm ViT): the registers would be placed on the first cells
                # (QA 394: 24.5 px where 20.5 px is right).
                raise NotPlaceable(
                    f"it attends over {num_queries} tokens: the {grid[0]}x{grid[1]} = {patches} patches of the "
                    f"{source}{f' and {suffix} tokens after them' if suffix else ''} leave {prefix} extra tokens, "
                    f"fewer than the num_prefix_tokens={declared[1]} {declared[0]} declares (patch tokens merged or "
                    "pruned before this layer, ToMe, EViT? or some extra tokens dropped, by a head that keeps the "
                    "class token: vitmad cannot tell which), so vitmad does not know where its tokens are; pass "
                    "positions=<[N, 2] pixel position of each token, NaN rows for tokens off the image> if you know "
                    "them, or num_prefix_tokens=<tokens before the grid> if they are the row-major grid after that "
                    "many extra tokens"
                )
        if counted and layout.grid is None and not context.values.get(PLACING_KEYS_ONLY):
            self._check_no_fewer_extra_tokens(context, grid, prefix, num_queries)
        said = layout.extra_tokens_said
        if counted and prefix and layout.declared_prefix is None and said is not None and prefix not in said:
            said.add(prefix)
            warnings.warn(
                f"vitmad.record: {type(layout.model).__name__} attends over {num_queries} tokens and its patch "
                f"embedding {layout.embedding[0]} cuts {grid[0]}x{grid[1]} = {patches}: the {prefix} extra token(s) "
                "are taken to come first, as a ViT's class token and registers; if they do not (a class token last, "
                "registers between the patches), pass positions=<[N, 2] pixel position of each token, NaN rows for "
                f"tokens off the image>, or num_prefix_tokens={prefix} to say they do", stacklevel=2)
        if counted and layout.random_order is not None and not layout.random_order_said and layout.grid is None:
            layout.random_order_said = True
            warnings.warn(
                f"vitmad.record: {type(layout.model).__name__} sorts random numbers ({layout.random_order}), as "
                "MAE-style masking does to shuffle the patches and keep a random subset of them: if its layers "
                "attend over such tokens, they are not the row-major grid of the patch embedding that vitmad places "
                "them on, and their MAD is wrong; pass positions=<[N, 2] pixel position of each token in this call, "
                "NaN rows for tokens off the image> (the kept patches' cells) for those layers (num_prefix_tokens= "
                "given says the tokens are the grid in order, and is not warned)", stacklevel=2)
        if counted and layout.grid and seen is None:
            self._check_same_extra_tokens(context, grid, prefix, num_queries)
        if prefix + patches + suffix != num_queries:
            raise NotPlaceable(
                f"it attends over {num_queries} tokens, not the {grid[0]}x{grid[1]} = {patches} patches "
                f"plus the num_prefix_tokens={prefix} given; pass the num_prefix_tokens and grid of its tokens (and "
                "patch=<pixels per token> where its cells are not the patch embedding's)"
            )
        if layout.patch is None and layout.grid and seen is not None and tuple(seen) != tuple(layout.grid):
            # The stride is the embedding's: a grid given by hand that is not its grid has cells of another size (a
            # stage after strided convolutions, Unlimited-OCR's CLIP stage on SAM's map: 4x too small, found by QA).
            raise NotPlaceable(
                f"the given grid={list(layout.grid)} is not the {seen[0]}x{seen[1]} grid of its patch embedding "
                f"({layout.embedding[0]}) in this call, so the pixels per token are not that embedding's stride; "
                "pass patch=<pixels per token of the given grid> too"
            )
        stride = layout.stride(context)
        positions, index = _plain_positions(grid, stride, prefix, suffix)
        geometry = LayerGeometry(grid, stride, "global", int(lead[-1]), prefix,
                                 num_suffix_tokens=suffix or None)
        return Placement(positions, None, select_tokens(index), geometry)

    @staticmethod
    def _check_no_fewer_extra_tokens(context: CallContext, grid: tuple[int, int], prefix: int,
                                     num_queries: int) -> None:
        """A layer of one call that attends over fewer tokens than a layer before it, on the same patch grid, has
        had tokens merged or dropped between them (ToMe, EViT's pruning): with registers enough, the rest still
        outnumber the grid's cells and would pass for fewer extra tokens and the grid, row-major, though the merged
        tokens are in an order of their own and no cell is theirs (QA 390: 41, 37, 33 tokens on 32 cells placed as
        9, 5, 1 extra tokens). Tokens added later (ConViT's class token) are no such sign, nor a layer over exactly
        the grid's cells."""
        seen = context.values.setdefault(_COUNTED_PREFIX, {})
        before = seen.get(tuple(grid))
        # A layer over the patches alone (a head that drops the class token and registers, Segmenter's) is the grid
        # itself: recorded (QA 394). Fewer extra tokens left is either.
        if before is not None and 0 < prefix < before[0]:
            raise NotPlaceable(
                f"it attends over {num_queries} tokens, fewer than the {before[1]} a layer recorded before it in this "
                f"call attends over on the same {grid[0]}x{grid[1]} patch grid, and still more than its cells: "
                "patch tokens merged or dropped between the layers (ToMe, token pruning) are no longer the grid in "
                "row-major order after the extra tokens, and vitmad cannot tell them from extra tokens dropped (a "
                f"head that keeps the class token and drops the registers); record the layers over {before[1]} "
                "tokens and this one in recordings of their own (layers=[...]), or pass positions=<[N, 2] pixel "
                "position of each token, NaN rows for tokens off the image> if you know them"
            )
        if before is None or prefix > before[0]:
            seen[tuple(grid)] = (prefix, num_queries)

    @staticmethod
    def _check_same_extra_tokens(context: CallContext, grid: tuple[int, int], prefix: int, num_queries: int) -> None:
        """With the grid given by hand and no patch embedding's grid to check it against, each layer's extra tokens
        are counted as its tokens less the grid's: layers of one call that attend over different counts cannot all be
        [extra tokens][that grid]. A detector's decoder attends among its object queries (PP-DocLayout's 300 taken
        for 288 class tokens and a grid, found by QA): one of them is something else, and neither count is trusted."""
        first = context.values.setdefault(_HAND_PREFIX, (prefix, num_queries))
        if first[0] != prefix:
            raise NotPlaceable(
                f"it attends over {num_queries} tokens, {prefix} more than the given grid={list(grid)} has cells, but "
                f"a layer recorded before it in this call attends over {first[1]} ({first[0]} more): a grid given by "
                "hand, with num_prefix_tokens unset, is one layout, [extra tokens][that grid], for every recorded "
                "layer, and these are not both that (a decoder's object queries?); pass layers=[the modules that "
                "attend over the image's tokens] and num_prefix_tokens=<tokens before the grid>"
            )


# Every layer of a plain ViT, in every call at one input size, has the same positions: built once (read-only).
@functools.lru_cache(maxsize=64)
def _plain_positions(grid: tuple[int, int], stride: tuple[float, float], prefix: int,
                     suffix: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[prefix + gh * gw + suffix, 2]`` positions (NaN rows around the grid) and the grid tokens' indices."""
    patches = grid[0] * grid[1]
    cells = cell_centres(*grid, stride).reshape(patches, 2)
    positions = torch.cat([torch.full((prefix, 2), float("nan")), cells, torch.full((suffix, 2), float("nan"))])
    return read_only(positions, torch.arange(prefix, prefix + patches), positions=1)


def _frames(model_input: tuple[int, ...] | None, embedded: int) -> int | None:
    """How many frames (or slices, views) of each sample of the model's input ``model_input`` (a clip ``[B, T, C, H,
    W]``, ``[B, C, T, H, W]``, channels last, resized or subsampled by the model) the patch embedding took at once as
    its ``embedded`` images: the clip's frames folded into its batch, ``embedded / B``; None for an image model's
    input and a clip embedded one frame (a key frame, or a loop) at a time (QA 427)."""
    if model_input is None or len(model_input) < 5 or not model_input[0] or embedded % model_input[0]:
        return None
    frames = embedded // model_input[0]
    return frames if frames > 1 else None
