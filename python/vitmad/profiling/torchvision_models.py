"""``torchvision:<name>`` specs of ``vitmad profile --model``: torchvision's vision transformers that
``vitmad.record`` places, with the eval preprocessing of their weights (``weights.transforms()``).

A spec names the model and, optionally, its weights: ``torchvision:vit_b_16`` (the weights torchvision calls
``DEFAULT``) or ``torchvision:vit_b_16.IMAGENET1K_SWAG_E2E_V1``. The model is built as torchvision's builder builds
it for those weights (the settings it reads from their meta: the class count, ViT's image size, MaxViT's input
size; MViT's builders fix their clip size themselves), without weights, and then given their state dict: the
pretrained one (downloaded by torchvision into torch's hub cache on first use) or a local file
(``model_checkpoint``, ``--weights FILE``). Building first lets MaxViT be built for another input size: its
relative position tables depend on its partition only.

Video models (MViT, the video Swin) take clips ``[B, 3, frames, H, W]``; the profiler's video batches are
``[B, frames, 3, H, W]`` (:mod:`vitmad.profiling.videos`), turned as torchvision's ``VideoClassification`` turns
them.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlparse

import torch

from .images import NATIVE, Preprocessing
from .options import OptionError, error_said, first_line, import_for_spec, read_checkpoint

__all__ = ["MODELS", "SWIN3D_FRAMES", "build", "load_torchvision", "preprocessing_of", "video_frames", "video_forward"]

# The models vitmad.record places, by the family that places them (recording/families and mha_capture).
MODELS = {
    **dict.fromkeys(("vit_b_16", "vit_b_32", "vit_l_16", "vit_l_32", "vit_h_14"), "VisionTransformer"),
    **dict.fromkeys(("swin_t", "swin_s", "swin_b", "swin_v2_t", "swin_v2_s", "swin_v2_b"), "SwinTransformer"),
    "maxvit_t": "MaxVit",
    **dict.fromkeys(("mvit_v1_b", "mvit_v2_s"), "MViT"),
    **dict.fromkeys(("swin3d_t", "swin3d_s", "swin3d_b"), "SwinTransformer3d"),
}

# The clip length torchvision evaluates the video Swin's Kinetics-400 weights at (their docs: clip_len=32); the
# model itself takes any. MViT takes the frame count it was built for (16 for its weights) and no other.
SWIN3D_FRAMES = 32

_VIDEO_CLASSES = {("torchvision.models.video.mvit", "MViT"),
                  ("torchvision.models.video.swin_transformer", "SwinTransformer3d")}


def _is_video_class(module: torch.nn.Module) -> bool:
    return (type(module).__module__, type(module).__name__) in _VIDEO_CLASSES


def video_frames(module: torch.nn.Module) -> int | None:
    """The frames a torchvision video model takes a clip of, or None for any other module: an MViT's built clip
    length (its embedding's frames times its temporal stride), :data:`SWIN3D_FRAMES` for the video Swin."""
    if not _is_video_class(module):
        return None
    if type(module).__name__ == "MViT":
        return int(module.pos_encoding.temporal_size) * int(module.conv_proj.stride[0])
    return SWIN3D_FRAMES


def video_forward(module: torch.nn.Module) -> Callable[[torch.Tensor], object] | None:
    """For a torchvision video model, its call on the profiler's ``[B, frames, 3, H, W]`` clips (as
    ``VideoClassification`` hands them over: ``[B, 3, frames, H, W]``); None for any other module."""
    if not _is_video_class(module):
        return None
    return lambda clips: module(clips.permute(0, 2, 1, 3, 4))


def _weights(models, spec: str, name: str, tag: str):
    """The weights enum member a spec names: ``DEFAULT`` without a tag."""
    enum = models.get_model_weights(name)
    if not tag:
        return enum.DEFAULT
    if tag not in enum.__members__:
        raise OptionError("model", f"{spec}: torchvision has no weights {tag!r} for {name}; its weights: "
                                   f"{', '.join(enum.__members__)}")
    return enum[tag]


def _architecture(family: str, weights, image_size: tuple[int, int] | str | None) -> dict:
    """The builder's settings for the model the weights are for, as torchvision's builder reads them from their
    meta; MaxViT at ``image_size`` when one is given.

    Raises:
        OptionError: (``image_size``) a size the model cannot take: ViT and MViT take their built size only.
    """
    meta = weights.meta
    settings = {"num_classes": len(meta["categories"])}
    own = tuple(meta["min_size"])
    other = image_size not in (None, NATIVE) and tuple(image_size) != own
    if family == "VisionTransformer":
        settings["image_size"] = own[0]
        if other:
            raise OptionError("image_size", f"torchvision's VisionTransformer takes {own[0]}x{own[1]} px only (its "
                                            "position embedding is built for that size, and its forward checks it), "
                                            f"got {image_size[0]}x{image_size[1]}; leave the size unset, or name "
                                            "weights trained at another size (e.g. "
                                            "torchvision:vit_b_16.IMAGENET1K_SWAG_E2E_V1, 384 px)")
    elif family == "MaxVit":
        settings["input_size"] = tuple(image_size) if other else own
    elif family == "MViT":  # its builders set the clip size of their weights themselves (and take no other)
        if other:
            raise OptionError("image_size", f"torchvision's MViT takes {own[0]}x{own[1]} px only (its blocks reshape "
                                            "the tokens by the grid it was built for), got "
                                            f"{image_size[0]}x{image_size[1]}; leave the size unset")
    return settings


def build(spec: str, image_size: tuple[int, int] | str | None = None):
    """The model of a ``torchvision:<name>[.<WEIGHTS>]`` spec as torchvision's builder builds it for those weights
    (at ``image_size`` where the model is built for a size), without weights; and the weights.

    Raises:
        OptionError: torchvision is not installed; a model vitmad does not profile, unknown weights, or an image
            size the model does not take (each naming its parameter).
    """
    models = import_for_spec(spec, "torchvision.models", "the package torchvision, which is not installed: pip "
                                                         "install torchvision (the build that matches your torch, "
                                                         "see pytorch.org)")
    name, dot, tag = spec.partition(":")[2].partition(".")
    if dot and not tag:  # "torchvision:swin_t." ran as the default weights, the dot kept in mad.json's model
        raise OptionError("model", f"{spec}: expected torchvision:<name> or torchvision:<name>.<WEIGHTS>, got "
                                   "nothing after the dot")
    family = MODELS.get(name)
    if family is None:
        raise OptionError("model", f"{spec}: vitmad profiles torchvision's {', '.join(MODELS)}; got {name!r}")
    if image_size == NATIVE:
        raise OptionError("image_size", f"{spec}: torchvision's models take one input size for a whole batch, not "
                                        "each image at its own (native); pass S or HxW, or leave it unset")
    weights = _weights(models, spec, name, tag)
    settings = _architecture(family, weights, image_size)
    try:
        module = models.get_model(name, weights=None, **settings)
    except ValueError as err:
        if family != "MaxVit" or image_size is None:
            raise
        # MaxViT's constructor refuses an input whose blocks' maps are not whole partitions.
        raise OptionError("image_size", f"torchvision's MaxVit ({name}) cannot be built for "
                                        f"{image_size[0]}x{image_size[1]} px: {first_line(err)} (every "
                                        "block's map must be a whole number of partitions: e.g. 448 or 672 px)"
                                        ) from err
    return module, weights



def _state_dict(spec: str, weights, model_checkpoint: Path | None) -> dict:
    """The weights' state dict: ``model_checkpoint``'s (a state dict, or a training checkpoint holding one under
    ``"model"``, as torchvision's reference scripts save, or ``"state_dict"``), else the pretrained one.

    Raises:
        OptionError: the file is no state dict, or the pretrained weights cannot be downloaded.
    """
    if model_checkpoint is None:
        # torch's hub cache is read first, without its hash: a file there that cannot be read is that file's fault.
        cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(weights.url).path)
        try:
            return weights.get_state_dict(progress=True, check_hash=True)
        except Exception as err:  # noqa: BLE001  (offline, a download cut short or corrupt, a bad cached file)
            if cached.is_file():
                raise OptionError("model", f"{spec}: cannot read its weights cached at {cached} "
                                           f"({error_said(err)}); remove that file to download them again, or pass "
                                           "local weights (--weights FILE, model_checkpoint=)") from err
            raise OptionError("model", f"{spec}: cannot download its weights ({weights.url}): "
                                       f"{error_said(err)}; download them on a connected machine (into torch's hub "
                                       "cache) or pass local weights (--weights FILE, model_checkpoint=)") from err
    loaded = read_checkpoint(model_checkpoint, "state dict")
    for key in ("model", "state_dict"):
        if isinstance(loaded, dict) and isinstance(loaded.get(key), dict):
            loaded = loaded[key]
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise OptionError("model_checkpoint", f"{model_checkpoint} holds no state dict (tensors by name), got "
                                              f"{type(loaded).__name__}")
    return loaded


def preprocessing_of(spec: str, weights) -> Preprocessing:
    """The eval preprocessing of torchvision ``weights``: their ``ImageClassification`` (resize, centre crop with
    torchvision's rounding, PIL's filter, as it runs on PIL images) or ``VideoClassification`` (the same on each
    frame, resized as a uint8 tensor without antialiasing, as it does).

    Raises:
        OptionError: (``model``) a transform or filter this library does not reproduce.
    """
    transform = weights.transforms()
    kind = type(transform).__name__
    interpolation = getattr(transform.interpolation, "value", transform.interpolation)
    what = None
    if kind not in ("ImageClassification", "VideoClassification"):
        what = f"are {kind}"
    elif interpolation not in ("bilinear", "bicubic", "nearest"):
        what = f"resize with the {interpolation} filter"
    elif not 1 <= len(transform.resize_size) <= 2 or not 1 <= len(transform.crop_size) <= 2:
        what = f"resize to {transform.resize_size} and crop {transform.crop_size}"
    if what is not None:
        raise OptionError("model", f"{spec}: its weights' transforms {what}, which vitmad does not reproduce: "
                                   "profile the output of weights.transforms() from Python: vitmad.profile(model, "
                                   "pixels) with the module and the preprocessed [B, 3, H, W] pixels")
    resize = transform.resize_size
    resize = ("shortest", resize[0]) if len(resize) == 1 else ("exact", resize[0], resize[1])
    crop = transform.crop_size * (3 - len(transform.crop_size))
    return Preprocessing((crop[0], crop[1]), resize, True, tuple(transform.mean), tuple(transform.std),
                         interpolation, "round", antialias=kind == "ImageClassification")


def load_torchvision(spec: str, model_checkpoint: str | os.PathLike | None,
                     image_size: tuple[int, int] | str | None):
    """Load a ``torchvision:<name>[.<WEIGHTS>]`` spec (the module's docstring).

    Raises:
        OptionError: torchvision is not installed; a model vitmad does not profile, unknown weights, a file that
            does not fit, or an image size the model does not take (each naming its parameter).
        MissingPathError: ``model_checkpoint`` does not exist.
    """
    from .models import local_weights, wrap_module

    model_checkpoint = local_weights(model_checkpoint)
    module, weights = build(spec, image_size)
    preprocessing = preprocessing_of(spec, weights)
    try:
        module.load_state_dict(_state_dict(spec, weights, model_checkpoint))
    except RuntimeError as err:  # missing, unexpected or mis-shaped weights
        source = model_checkpoint or weights.url
        # torch's first line names only the class; the second, the first keys that differ (a long list, cut).
        said = " ".join(line.strip() for line in str(err).splitlines()[:2] if line.strip())
        raise OptionError("model_checkpoint" if model_checkpoint else "model",
                          f"{source} does not fit torchvision's {spec.partition(':')[2].partition('.')[0]} built "
                          f"for {weights}: "
                          f"{said[:400]}{'...' if len(said) > 400 else ''}") from err
    return wrap_module(module, spec, preprocessing)
