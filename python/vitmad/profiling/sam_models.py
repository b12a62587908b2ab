"""``segment_anything:<model type>`` and ``sam2:<config>`` specs of ``vitmad profile --model``: the image encoder of
Meta's Segment Anything packages, ``segment_anything`` (1.0, ``pip install segment_anything``) and ``sam2`` (1.1.0,
``pip install sam2``), built by the package's own builder, given the checkpoint file the user passes
(``--weights FILE``, ``model_checkpoint``; neither package is asked to download anything, and there is no default),
and preprocessed as the package's own image predictor preprocesses an image.

``segment_anything:vit_b`` (``vit_l``, ``vit_h``, and ``default``, which is ``vit_h``) names a builder of
``segment_anything.sam_model_registry``; its checkpoints (``sam_vit_b_01ec64.pth``, ...) are the whole ``Sam``'s state
dict. ``sam2:sam2.1_hiera_t`` (``sam2.1_hiera_s``, ``sam2.1_hiera_b+``, ``sam2.1_hiera_l``, and SAM 2.0's
``sam2_hiera_t`` ...) names one of the package's hydra model configs (``sam2/configs/sam2.1/sam2.1_hiera_t.yaml``),
built by ``build_sam2``; its checkpoints (``sam2.1_hiera_tiny.pt``, ...) hold the ``SAM2Base``'s state dict under
``"model"``. The file is loaded into the whole model with ``strict=True``, as the packages' builders load it: a file
of another model or size is refused, naming the keys or shapes that differ.

What is profiled: ``model.image_encoder``, as the predictors call it (segment_anything's ``ImageEncoderViT``; sam2's
``ImageEncoder``, its Hiera trunk and FPN neck, whose attention is the trunk's). The prompt encoder and the mask
decoder need prompts and hold no image self-attention (:mod:`vitmad.recording.families.segment_anything`).

The preprocessing is the predictors' ``set_image`` on an RGB image:

- segment_anything: ``ResizeLongestSide(img_size)`` (the long side to the encoder's ``img_size``, 1024, the short one
  to ``int(short * img_size / long + 0.5)``, PIL's bilinear filter on the 8-bit image), then ``Sam.preprocess``:
  ``(x - pixel_mean) / pixel_std`` in 0-255 units, and zeros (the mean colour) at the bottom and right up to an
  ``img_size`` square. The encoder masks nothing: the patches of that padding are embedded and attended as image
  content, so their tokens are recorded as every other token is (a 1024 x 512 px input is a 64 x 64 map, its right
  half padding, all of it in the MAD), as the encoder runs.
- sam2: ``SAM2Transforms`` (``ToTensor``'s 0-1 floats, torchvision's ``Resize((image_size, image_size))`` on them:
  bilinear, antialiased, not rounded, the aspect ratio not kept; ``Normalize`` with its mean and std).

Both encoders take their own input size only (the absolute position embedding of segment_anything's is fixed to its
map; the predictors feed nothing else): ``image_size`` is refused.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

from .images import Preprocessing
from .options import OptionError, import_for_spec, read_checkpoint, state_dict_mismatch_said

__all__ = ["load_segment_anything", "load_sam2", "sam2_configs", "sam_preprocessing", "sam2_preprocessing"]


def _refuse_options(spec: str, model_checkpoint, image_size, builds: str) -> None:
    """Refuse ``image_size`` and a missing checkpoint file, before the model is built.

    Raises:
        OptionError: (``image_size``) any size; (``model_checkpoint``) none given.
    """
    if image_size is not None:
        raise OptionError("image_size", f"{spec}: the package's predictor feeds its image encoder at the one size it "
                                        "is built for, as vitmad does; leave --image-size unset")
    if model_checkpoint is None:
        raise OptionError("model_checkpoint", f"{spec}: pass the checkpoint file (--weights FILE, model_checkpoint=); "
                                              f"{builds}, and vitmad downloads nothing for it")


def _read_state_dict(model_checkpoint: Path, key: str | None) -> dict:
    """The state dict in a checkpoint file: the file's whole content (``key`` None), or what it holds under ``key``.

    Raises:
        OptionError: (``model_checkpoint``) the file cannot be read, or holds no state dict where expected.
    """
    loaded = read_checkpoint(model_checkpoint)
    if key is not None:
        if not isinstance(loaded, dict) or not isinstance(loaded.get(key), dict):
            raise OptionError("model_checkpoint", f"{model_checkpoint} holds no state dict under {key!r}, where sam2's "
                                                  f"checkpoints keep it (found {_described(loaded)})")
        loaded = loaded[key]
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise OptionError("model_checkpoint", f"{model_checkpoint} holds no state dict (tensors by name), as "
                                              f"segment_anything's checkpoints are (found {_described(loaded)})")
    return loaded


def _described(loaded) -> str:
    """What a checkpoint file held, for a message: a dict's first keys, else its type."""
    if not isinstance(loaded, dict):
        return type(loaded).__name__
    keys = list(loaded)
    return f"a dict of keys {', '.join(map(repr, keys[:4]))}{', ...' if len(keys) > 4 else ''}"


def _load_into(model: torch.nn.Module, state: dict, model_checkpoint: Path, what: str) -> None:
    """``model.load_state_dict(state)``, strict, as the packages' builders load their checkpoints.

    Raises:
        OptionError: (``model_checkpoint``) missing, unexpected or mis-shaped weights, naming the first of them.
    """
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise OptionError("model_checkpoint", f"{model_checkpoint} does not fit {what}: "
                                              f"{state_dict_mismatch_said(err)}") from err


def _wrapped(model: torch.nn.Module, spec: str, preprocessing: Preprocessing):
    from .models import tower_description, wrap_module

    encoder = model.image_encoder
    loaded = wrap_module(encoder, spec, preprocessing)
    loaded.description = tower_description("image_encoder", encoder, model)
    return loaded


def sam_preprocessing(model: torch.nn.Module) -> Preprocessing:
    """``SamPredictor.set_image``'s preprocessing for a segment_anything ``Sam``, from the model itself: its encoder's
    ``img_size``, its ``pixel_mean`` and ``pixel_std`` (0-255 units: the values are not divided by 255)."""
    side = int(model.image_encoder.img_size)
    # Each float32 value as its shortest decimal (123.675, not 123.67500305175781), which is that float32 again.
    mean, std = (tuple(float(str(v)) for v in buffer.flatten().numpy()) for buffer in (model.pixel_mean,
                                                                                       model.pixel_std))
    return Preprocessing((side, side), ("long_side", side), False, mean, std, "bilinear", rescale=1.0,
                         pad_normalised=True)


def load_segment_anything(spec: str, model_checkpoint: str | os.PathLike | None, image_size):
    """Load a ``segment_anything:<model type>`` spec (the module's docstring): ``model.image_encoder`` is profiled.

    Raises:
        OptionError: the package is not installed; an unknown model type, no checkpoint file, a file that cannot be
            read or does not fit, or an image size (each naming its parameter).
        MissingPathError: ``model_checkpoint`` does not exist.
    """
    from .models import local_weights

    package = import_for_spec(spec, "segment_anything", "Meta's segment_anything, which is not installed: pip "
                                                        "install segment-anything")
    name = spec.partition(":")[2]
    registry = package.sam_model_registry
    if name not in registry:
        raise OptionError("model", f"{spec}: segment_anything's sam_model_registry has no {name!r}; its model types: "
                                   f"{', '.join(registry)}")
    _refuse_options(spec, model_checkpoint, image_size, "segment_anything's sam_model_registry builds the model "
                                                        f"without weights (the {name} checkpoint from the "
                                                        "segment-anything repository, e.g. sam_vit_b_01ec64.pth)")
    model_checkpoint = local_weights(model_checkpoint)
    state = _read_state_dict(model_checkpoint, None)  # before the build, which takes seconds to minutes
    model = registry[name]()
    _load_into(model, state, model_checkpoint, f"segment_anything's {name} (sam_model_registry[{name!r}])")
    return _wrapped(model.eval(), spec, sam_preprocessing(model))


def sam2_configs(package) -> dict[str, str]:
    """The model configs sam2 ships, by name (``"sam2.1_hiera_t"``), as hydra names them
    (``"configs/sam2.1/sam2.1_hiera_t.yaml"``); its training configs (``configs/*_training``) are left out."""
    root = Path(package.__file__).parent
    found = sorted((root / "configs").glob("*/*.yaml"))
    return {path.stem: path.relative_to(root).as_posix() for path in found
            if not path.parent.name.endswith("_training")}


def sam2_preprocessing(model: torch.nn.Module) -> Preprocessing:
    """``SAM2ImagePredictor.set_image``'s preprocessing for a ``SAM2Base``: its ``SAM2Transforms`` at the model's
    ``image_size``, whose mean and std are read from the transforms the predictor builds.

    Raises:
        OptionError: (``model``) transforms that are not the resize and normalisation of sam2 1.1.0.
    """
    from sam2.utils.transforms import SAM2Transforms

    side = int(model.image_size)
    with warnings.catch_warnings():  # it scripts its transforms with torch.jit, which torch now says is deprecated
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.* is deprecated", category=FutureWarning)
        transforms = SAM2Transforms(resolution=side, mask_threshold=0.0)
    steps = list(transforms.transforms.children())
    names = [getattr(step, "original_name", type(step).__name__) for step in steps]
    if names == ["Resize", "Normalize"]:
        resize, normalize = steps
        interpolation = getattr(resize.interpolation, "value", resize.interpolation)
        if tuple(resize.size) == (side, side) and interpolation == "bilinear" and resize.antialias \
                and resize.max_size is None:
            return Preprocessing((side, side), ("exact", side, side), False, tuple(normalize.mean),
                                 tuple(normalize.std), "bilinear", float_resize=True)
    raise OptionError("model", f"sam2's SAM2Transforms at {side} px is not the resize to {side}x{side} px (bilinear, "
                               f"antialiased) and normalisation vitmad reproduces (its steps: {', '.join(names)}); "
                               "profile the output of its transforms from Python: vitmad.profile(model.image_encoder, "
                               "pixels)")


def load_sam2(spec: str, model_checkpoint: str | os.PathLike | None, image_size):
    """Load a ``sam2:<config>`` spec (the module's docstring): ``model.image_encoder`` is profiled.

    Raises:
        OptionError: the package is not installed; an unknown config, no checkpoint file, a file that cannot be read
            or does not fit, or an image size (each naming its parameter).
        MissingPathError: ``model_checkpoint`` does not exist.
    """
    from .models import local_weights

    package = import_for_spec(spec, "sam2", "Meta's sam2, which is not installed: pip install sam2")
    name = spec.partition(":")[2]
    configs = sam2_configs(package)
    if name not in configs:
        raise OptionError("model", f"{spec}: sam2 has no model config {name!r}; its configs: {', '.join(configs)}")
    _refuse_options(spec, model_checkpoint, image_size, f"sam2's build_sam2 builds the model from {configs[name]} "
                                                        "without weights (its checkpoint, e.g. sam2.1_hiera_tiny.pt)")
    model_checkpoint = local_weights(model_checkpoint)
    state = _read_state_dict(model_checkpoint, "model")
    from sam2 import build_sam

    model = build_sam.build_sam2(configs[name], ckpt_path=None, device="cpu", mode="eval")
    _load_into(model, state, model_checkpoint, f"sam2's {name} ({configs[name]})")
    return _wrapped(model.eval(), spec, sam2_preprocessing(model))
