"""``monai:<network>`` specs of ``vitmad profile --model``: Project MONAI's 3-D transformers ``ViT``, ``UNETR``,
``ViTAutoEnc`` and ``SwinUNETR`` (``pip install monai``), profiled on NIfTI volumes (:mod:`vitmad.profiling.volumes`).

A MONAI network has no hub and no pretrained tag: it is built from its constructor's keyword arguments
(``model_args``, ``--model-args``: a dict, a JSON or YAML file holding one, or a JSON object in the text itself, as
a training config writes them, e.g. ``{"in_channels": 1, "img_size": [96, 96, 96], "patch_size": 16}``) and given the
state dict of a local file (``model_checkpoint``, ``--weights FILE``: a state dict, or a training checkpoint holding
one under ``state_dict``, ``model`` or ``net``), loaded strictly. Both are required: random weights have no MAD worth
profiling, and a file of another architecture is refused naming the keys or shapes that differ.

The volume size is the network's ``img_size`` (ViT, UNETR, ViTAutoEnc take it; SwinUNETR, which since MONAI 1.5
takes any size of whole ``2 ** 5`` patches, reads it from ``img_size`` in ``model_args`` too, which older SwinUNETR
configs have and vitmad does not pass on). ``spatial_dims`` must be 3 (2-D MONAI networks take images, which this
spec does not feed: record them with ``vitmad.record``). ``image_size`` is refused: the size is the config's.
MaskedAutoEncoderViT is not offered: it draws a new random mask in every forward, so a profile of it would not repeat.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .options import (
    OptionError,
    error_said,
    import_for_spec,
    import_optional,
    read_state_dict,
    state_dict_mismatch_said,
)
from .volumes import VolumePreprocessing, check_unit, parse_intensity

__all__ = ["MONAI_NETWORKS", "load_monai", "read_model_args"]

MONAI_NETWORKS = ("ViT", "UNETR", "ViTAutoEnc", "SwinUNETR")
# Keys under which training checkpoints keep the network's state dict (MONAI's CheckpointSaver names its own).
_STATE_KEYS = ("state_dict", "model", "net")


def read_model_args(model_args) -> dict:
    """``model_args`` as a dict of constructor arguments: a dict, a ``.json`` / ``.yaml`` / ``.yml`` file, or a JSON
    object written out (``'{"in_channels": 1, ...}'``).

    Raises:
        OptionError: (``model_args``) none given, an unreadable file, or not a mapping with text keys.
    """
    if model_args is None:
        raise OptionError("model_args", "a MONAI network is built from its constructor's arguments: pass them "
                                        "(--model-args FILE.json|FILE.yaml or a JSON object, model_args={...})")
    if isinstance(model_args, dict):
        found = model_args
    elif isinstance(model_args, (str, os.PathLike)):
        text = str(model_args).strip()
        path = Path(text).expanduser()
        try:
            if text.startswith(("{", "[")):  # JSON written out ('[1, 2]' was looked for as a file, QA 284)
                found = json.loads(text)
            elif path.suffix.lower() in (".yaml", ".yml"):
                yaml = import_optional("yaml", "volumes", "reading --model-args from YAML")
                found = yaml.safe_load(path.read_text(encoding="utf-8"))
            else:
                found = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise OptionError("model_args", f"cannot read {text!r} as a JSON object or a JSON / YAML file of one "
                                            f"({error_said(err)})") from err
        except Exception as err:  # noqa: BLE001  (yaml's own errors)
            raise OptionError("model_args", f"cannot read {text!r} as YAML ({error_said(err)})") from err
    else:
        raise OptionError("model_args", f"expected a dict, a JSON / YAML file or a JSON object, got "
                                        f"{type(model_args).__name__}")
    if not isinstance(found, dict) or not all(isinstance(key, str) for key in found):
        raise OptionError("model_args", f"expected a mapping of constructor arguments by name, got "
                                        f"{type(found).__name__}")
    try:  # mad.json states them, and the run's fingerprint digests them
        json.dumps(found, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise OptionError("model_args", f"expected JSON values (numbers, text, lists, true / false / null), as a config"
                                        f" file holds them ({error_said(err)})") from err
    return dict(found)


def _volume_size(name: str, value) -> tuple[int, int, int]:
    """``img_size`` as three positive ints.

    Raises:
        OptionError: (``model_args``) anything else.
    """
    sides = [value] * 3 if isinstance(value, int) and not isinstance(value, bool) else value
    if (not isinstance(sides, (list, tuple)) or len(sides) != 3
            or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in sides)):
        raise OptionError("model_args", f"monai:{name}: img_size must be one positive int or three (D, H, W), got "
                                        f"{value!r}")
    return tuple(sides)


def load_monai(spec: str, model_checkpoint, image_size, model_args, intensity=None, volume_unit=None):
    """Load a ``monai:<network>`` spec (the module's docstring) with its volume preprocessing.

    Raises:
        OptionError: MONAI is not installed; an unknown network, missing or unusable ``model_args``, no weights file,
            one that cannot be read or does not fit, an ``image_size``, a bad ``intensity`` or ``volume_unit``.
        MissingPathError: ``model_checkpoint`` does not exist.
    """
    from .models import local_weights, wrap_module

    name = spec.partition(":")[2]
    if name not in MONAI_NETWORKS:
        raise OptionError("model", f"{spec}: vitmad profiles MONAI's {', '.join(MONAI_NETWORKS)} on volumes, got "
                                   f"{name!r}")
    intensity, unit = parse_intensity(intensity), check_unit(volume_unit)
    if image_size is not None:
        raise OptionError("image_size", f"{spec}: volumes are resized to the network's img_size (model_args); leave "
                                        "--image-size unset")
    arguments = read_model_args(model_args)
    if model_checkpoint is None:
        raise OptionError("model_checkpoint", f"{spec}: pass the network's weights (--weights FILE, "
                                              "model_checkpoint=): MONAI builds it with random weights, whose MAD says "
                                              "nothing of a trained model")
    model_checkpoint = local_weights(model_checkpoint)
    nets = import_for_spec(spec, "monai.networks.nets", "Project MONAI, which is not installed: pip install monai")
    if arguments.get("spatial_dims", 3) != 3:
        raise OptionError("model_args", f"{spec}: spatial_dims={arguments['spatial_dims']!r}; vitmad profile feeds "
                                        "volumes to 3-D networks (spatial_dims=3): record a 2-D one with vitmad.record")
    constructor = dict(arguments)
    if "img_size" not in arguments:
        raise OptionError("model_args", f"{spec}: img_size (D, H, W) is needed, the size every volume is resized to")
    size = _volume_size(name, arguments["img_size"])
    if name == "SwinUNETR":
        del constructor["img_size"]  # MONAI 1.5 and later take any size; the size is the volumes'
    state = read_state_dict(model_checkpoint, _STATE_KEYS)  # the file's content, or under one of these keys
    try:
        model = getattr(nets, name)(**constructor)
    except (TypeError, ValueError, AssertionError, KeyError) as err:
        raise OptionError("model_args", f"{spec}: MONAI's {name} cannot be built from {arguments} "
                                        f"({error_said(err)})") from err
    if name == "SwinUNETR":
        try:
            model._check_input_size(size)
        except ValueError as err:
            raise OptionError("model_args", f"{spec}: img_size {list(size)} does not fit SwinUNETR "
                                            f"({error_said(err)})") from err
        if all(side // 2 ** 5 == 1 for side in size):
            # Whole 2 ** 5 patches, but its bottleneck (size / 32) is one voxel, which its instance norm refuses
            # in MONAI's own forward: MONAI's raw error came at the first batch, naming no option (QA 267).
            raise OptionError("model_args", f"{spec}: img_size {list(size)} leaves SwinUNETR's bottleneck (the size "
                                            "/ 32) one voxel, on which its instance norm fails; make a side 64 or "
                                            "more")
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise OptionError("model_checkpoint", f"{model_checkpoint} does not fit MONAI's {name} built from "
                                              f"{arguments}: {state_dict_mismatch_said(err)}") from err
    channels = int(arguments.get("in_channels", 1))
    loaded = wrap_module(model.eval(), spec, VolumePreprocessing(size, channels, intensity, unit))
    loaded.model_args = arguments
    return loaded
