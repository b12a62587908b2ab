"""``open_clip:<model>[.<pretrained tag>]`` specs of ``vitmad profile --model``: OpenCLIP's image-text models
(``pip install open_clip_torch``: OpenAI CLIP, LAION, DataComp, DFN, MetaCLIP, EVA-CLIP, SigLIP, CoCa, ...),
profiled through their image tower, ``model.visual``.

A spec names one of OpenCLIP's model configs (``open_clip.list_models()``) and, optionally, one of its pretrained
tags for that model (``open_clip.list_pretrained_tags_by_model(name)``): ``open_clip:ViT-B-32.laion2b_s34b_b79k``.
The model is built by OpenCLIP's own ``create_model``, which downloads a tag's weights through its own path (the
Hugging Face hub, or the tag's URL), or loads a local file (``model_checkpoint``, ``--weights FILE``: what OpenCLIP
saves or takes, a state dict of the whole model or a training checkpoint holding one under ``state_dict``). With a
file and a tag, the tag still gives the preprocessing and the activation (a fine-tune of those weights); a file
alone gets OpenCLIP's default preprocessing, as ``create_model_and_transforms(name, pretrained=FILE)`` gives it. A
tag trained with QuickGELU (the ``openai`` ones) builds the model with QuickGELU, as the weights were trained
(OpenCLIP itself builds a plain config with GELU and only warns).

Preprocessing is OpenCLIP's eval ``preprocess`` for the model (``image_transform_v2`` of its ``preprocess_cfg``):
``shortest`` (the short side resized, centre crop; for a non-square size its ``ResizeKeepRatio``, which resizes
bicubic whatever the tag's filter), ``squash`` (resized to the size) and ``longest`` (fitted inside, padded with its
``fill_color``), its mean, std and filter (bicubic or bilinear). One difference, on purpose: vitmad converts every
image to RGB when it reads it (a palette image through its palette, an alpha channel dropped, 16-bit scaled to 8,
the EXIF orientation applied: README, "Profile a model"), before resizing; OpenCLIP's transform resizes first and
converts after, so a palette image is resized by nearest neighbour there and a 16-bit one is not scaled. The two
agree on RGB and grayscale images (0 levels in 255) and on any image converted to RGB before OpenCLIP's
``preprocess``.
"""

from __future__ import annotations

import difflib
import logging
import os

from .images import NATIVE, Preprocessing
from .options import OptionError, checkpoint_unread, error_said, import_for_spec, state_dict_mismatch_said

__all__ = ["load_open_clip", "preprocessing_of"]


def _names(open_clip, spec: str) -> tuple[str, str, list[str]]:
    """The model config and the pretrained tag (empty: none) a spec names, and the model's tags.

    Raises:
        OptionError: (``model``) nothing after a dot, a name OpenCLIP has no config for (with the closest names), or
            a tag it has no weights for (with that model's tags).
    """
    name, dot, tag = spec.partition(":")[2].partition(".")
    if dot and not tag:
        raise OptionError("model", f"{spec}: expected open_clip:<model> or open_clip:<model>.<pretrained tag>, got "
                                   "nothing after the dot")
    models = open_clip.list_models()
    if name not in models:
        close = difflib.get_close_matches(name, models, n=6, cutoff=0.6)
        raise OptionError("model", f"{spec}: OpenCLIP has no model named {name!r}"
                                   + (f"; the closest: {', '.join(close)}" if close else "")
                                   + " (see open_clip.list_models())")
    tags = open_clip.list_pretrained_tags_by_model(name)
    if tag and not open_clip.pretrained.is_pretrained_cfg(name, tag):
        raise OptionError("model", f"{spec}: OpenCLIP has no pretrained weights {tag!r} for {name}; its tags: "
                                   + (", ".join(tags) if tags else "none (pass local weights: --weights FILE)"))
    return name, tag, tags


def preprocessing_of(spec: str, cfg: dict) -> Preprocessing:
    """OpenCLIP's eval preprocessing of a model (``model.visual.preprocess_cfg``, what ``image_transform_v2``
    builds its ``preprocess`` from), in :class:`Preprocessing`'s terms.

    Raises:
        OptionError: (``model``) a resize mode, filter or colour mode OpenCLIP's eval transform does not have.
    """
    size = cfg["size"]
    size = (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))
    # image_transform gives a scalar mean or std to every channel.
    mean, std = ((tuple(v) if isinstance(v, list | tuple) else (v,) * 3) for v in (cfg["mean"], cfg["std"]))
    interpolation, mode = cfg.get("interpolation") or "bicubic", cfg.get("resize_mode") or "shortest"
    if interpolation not in ("bicubic", "bilinear") or mode not in ("shortest", "squash", "longest") \
            or cfg.get("mode", "RGB") != "RGB":
        raise OptionError("model", f"{spec}: its preprocess_cfg ({cfg}) is not one OpenCLIP's eval transform has "
                                   "(resize_mode shortest / squash / longest, interpolation bicubic / bilinear, "
                                   "RGB); profile the output of its preprocess from Python: vitmad.profile(model."
                                   "visual, pixels)")
    if mode == "squash":
        return Preprocessing(size, ("exact", *size), False, mean, std, interpolation)
    if mode == "longest":  # ResizeKeepRatio(longest=1), then CenterCropOrPad with fill_color
        fill = int(cfg.get("fill_color", 0) or 0)
        return Preprocessing(size, ("fit", *size), True, mean, std, interpolation, "round", pad_fill=(fill,) * 3)
    if size[0] == size[1]:  # Resize(S), CenterCrop
        return Preprocessing(size, ("shortest", size[0]), True, mean, std, interpolation, "round")
    # A non-square size: ResizeKeepRatio(size), built without the interpolation (its default: bicubic).
    return Preprocessing(size, ("keep_ratio", *size), True, mean, std, "bicubic", "round")


def load_open_clip(spec: str, model_checkpoint: str | os.PathLike | None,
                   image_size: tuple[int, int] | str | None):
    """Load an ``open_clip:<model>[.<tag>]`` spec (the module's docstring): ``model.visual`` is profiled.

    Raises:
        OptionError: OpenCLIP is not installed; an unknown model or tag, neither a tag nor a file, weights that
            cannot be downloaded, a file that cannot be read or does not fit, an image size the model cannot be
            built for, or ``native`` (each naming its parameter).
        MissingPathError: ``model_checkpoint`` does not exist.
    """
    from .models import _raised_reading, local_weights, tower_description, wrap_module

    open_clip = import_for_spec(spec, "open_clip", "OpenCLIP, which is not installed: pip install open_clip_torch")
    name, tag, tags = _names(open_clip, spec)
    model_checkpoint = local_weights(model_checkpoint)
    if not tag and model_checkpoint is None:
        raise OptionError("model", f"{spec}: name its pretrained weights, open_clip:{name}.<tag> (its tags: "
                                   f"{', '.join(tags) or 'none'}), or pass local weights (--weights FILE, "
                                   "model_checkpoint=)")
    vision = open_clip.get_model_config(name)["vision_cfg"]
    if isinstance(vision.get("layers"), list | tuple) and not vision.get("timm_model_name"):
        # Said before any download: a ModifiedResNet's one attention is its pool's.
        raise OptionError("model", f"{spec}: its image tower is OpenCLIP's ModifiedResNet (a CNN), whose one "
                                   "attention is its attention pool, the mean token's query over the final map: no "
                                   "self-attention over positioned tokens, so MAD is not defined for it; profile one "
                                   "of OpenCLIP's ViTs")
    if image_size == NATIVE:
        raise OptionError("image_size", f"{spec}: OpenCLIP's image towers take one input size for a whole batch, not "
                                        "each image at its own (native); pass S or HxW, or leave it unset")
    built = vision.get("image_size")
    if image_size is not None and isinstance(built, (list, tuple)) and len(built) == 2 and built[0] != built[1] \
            and tuple(image_size) != tuple(built):
        # Its weights would fail to load with a reshape error that reads as weights that do not fit.
        raise OptionError("image_size", f"{spec}: OpenCLIP resizes the weights' position embedding to another size "
                                        "only from a square grid (open_clip.model.resize_pos_embed takes its side as "
                                        f"the square root of its length), and {name} is built for {built[0]}x"
                                        f"{built[1]} px; leave --image-size unset")
    patch = vision.get("patch_size")
    if image_size is not None and isinstance(patch, int) and min(image_size) < patch:
        # Said before the weights load: resizing their position embedding to no patch failed, and was said as
        # weights that do not fit (QA 330).
        raise OptionError("image_size", f"expected at least one {patch}x{patch} patch of the model ({spec}'s "
                                        f"visual.conv1), got {image_size[0]}x{image_size[1]}")
    pretrained = open_clip.pretrained.get_pretrained_cfg(name, tag) if tag else {}
    options = {"force_quick_gelu": bool(pretrained.get("quick_gelu", False)), "weights_only": True}
    if image_size is not None:
        # OpenCLIP builds the tower for the size and resizes the weights' position embedding to it.
        options["force_image_size"] = tuple(image_size)
    if model_checkpoint is not None and tag:
        options["force_preprocess_cfg"] = open_clip.transform.merge_preprocess_dict({}, pretrained)
    try:
        model = open_clip.create_model(name, pretrained=str(model_checkpoint) if model_checkpoint else tag,
                                       **options)
    except AssertionError as err:
        # A size its constructor refuses (a sin-cos position embedding: square only), or weights of another model
        # whose position embedding its loading cannot resize ("text pos_embed width changed!"): built again without
        # the weights, the tower tells which (the file was blamed on the size, or escaped as a traceback; QA 255).
        if image_size is not None and not _builds(open_clip, name, options):
            raise OptionError("image_size", f"OpenCLIP's {name} cannot be built for {image_size[0]}x{image_size[1]} "
                              f"px ({error_said(err)}); use its own size, or one it takes") from err
        if model_checkpoint is None:
            raise
        raise OptionError("model_checkpoint", f"{model_checkpoint} does not fit OpenCLIP's {name}: its loading "
                                              f"refused it ({error_said(err)})") from err
    except Exception as err:  # noqa: BLE001  (a download, or torch.load and load_state_dict of a file)
        if model_checkpoint is None:  # OpenCLIP says a failed download as a RuntimeError of its own
            raise OptionError("model", f"{spec}: cannot load its weights through OpenCLIP ({error_said(err)}); "
                                       "download them on a connected machine (OpenCLIP keeps them in the Hugging "
                                       "Face hub cache) or pass local weights (--weights FILE, model_checkpoint=)"
                              ) from err
        if _raised_reading(err):
            raise checkpoint_unread(model_checkpoint, err) from err
        raise OptionError("model_checkpoint", f"{model_checkpoint} does not fit OpenCLIP's {name}: "
                                              f"{state_dict_mismatch_said(err)}") from err
    visual = model.visual
    loaded = wrap_module(visual, spec, preprocessing_of(spec, dict(visual.preprocess_cfg)))
    loaded.description = tower_description("visual", visual, model)
    return loaded


def _builds(open_clip, name: str, options: dict) -> bool:
    """Whether OpenCLIP builds the model ``name`` with ``options`` and no weights (its warning that it has none,
    which the run does not use, silenced)."""
    previous = logging.root.manager.disable
    logging.disable(max(previous, logging.WARNING))
    try:
        open_clip.create_model(name, **{k: v for k, v in options.items() if k != "weights_only"})
    except AssertionError:
        return False
    finally:
        logging.disable(previous)
    return True
