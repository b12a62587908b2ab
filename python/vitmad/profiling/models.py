"""Model specs of ``vitmad profile --model``: ``hf:<hub id or folder>``, ``timm:<name>``, ``torchvision:<name>``,
``open_clip:<name>``, ``segment_anything:<model type>``, ``sam2:<config>``, ``monai:<network>``, ``builtin:<name>``.

Each spec loads to a :class:`LoadedModel`: the module in eval mode, how to call it on a pixel batch, and the
preprocessing its authors use.
"""

from __future__ import annotations

import inspect
import os
import pickle
import socket
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .images import NATIVE, Preprocessing, hf_processor_class_name, hf_rescale
from .monai_models import load_monai
from .open_clip_models import load_open_clip
from .options import (
    MissingPathError,
    OptionError,
    checkpoint_unread,
    error_said,
    first_line,
    import_optional,
    read_state_dict,
    state_dict_mismatch_said,
)
from .sam_models import load_sam2, load_segment_anything
from .torchvision_models import load_torchvision, video_forward
from .videos import video_processor_settings

__all__ = ["LoadedModel", "load_model", "wrap_module", "non_square_table_said", "random_masking", "MODEL_SPEC_HELP"]

MODEL_SPEC_HELP = ("hf:<hub id or local folder>, timm:<name>, torchvision:<name>[.<WEIGHTS>], "
                   "open_clip:<name>[.<pretrained tag>], segment_anything:<vit_b|vit_l|vit_h>, sam2:<config>, "
                   "monai:<ViT|UNETR|ViTAutoEnc|SwinUNETR> (3-D volumes) or builtin:dinov2-s14")
# The spec kinds that take a local weights file (model_checkpoint, --weights FILE); the last three require one.
_TAKE_WEIGHTS = ("timm", "torchvision", "open_clip", "segment_anything", "sam2", "monai")


@dataclass
class LoadedModel:
    """A model ready for profiling.

    Attributes:
        spec: the spec it was loaded from (what ``mad.json`` reports).
        module: the ``nn.Module``, in eval mode.
        preprocessing: its eval preprocessing (``None`` when only preprocessed tensors will be fed).
        forward: calls ``module`` on ``[B, 3, H, W]`` pixels; keyword arguments such a model needs (e.g.
            ``interpolate_pos_encoding`` at a non-native size) are added here.
        accepts_any_size: ``forward`` interpolates the position embedding to any input size.
        processor: the transformers image processor's settings (``preprocessor_config.json``), for models whose
            own processor feeds images at their native size (SigLIP2, the Qwen and Pixtral towers); None otherwise.
        description: what of the checkpoint is profiled when it is not the whole model (a vision-language
            model's vision tower), else None; ``mad.json`` reports it as ``settings.profiled``.
        unloaded: state-dict keys of ``module`` that the checkpoint did not hold (initialised at random when
            loaded, such as a transformers pooler): left out of the weights' digest (``settings.weights``).
        video_processor: a packed tower's checkpoint's video processor settings, as transformers reads them
            (:func:`~.packed_videos.video_processor_dict`); None: none saved, or not a packed tower.
        model_args: the constructor arguments a ``monai:`` network was built from (``mad.json``'s
            ``settings.model_args``); None for other models.
    """

    spec: str
    module: torch.nn.Module
    preprocessing: Preprocessing | None
    forward: Callable[[torch.Tensor], object]
    accepts_any_size: bool = False
    processor: dict | None = None
    description: str | None = None
    unloaded: frozenset[str] = frozenset()
    video_processor: dict | None = None
    model_args: dict | None = None


# Names of a forward's first argument that are an image (Florence2VisionBackbone's is hidden_states).
_IMAGE_ARGUMENTS = ("pixel_values", "hidden_states", "x", "images", "image", "pixels")


def _first_parameter(module: torch.nn.Module) -> inspect.Parameter | None:
    """The first parameter of ``module``'s forward, or None (none, or no signature to read)."""
    try:
        parameters = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    return parameters[0] if parameters else None


def _takes_images(module: torch.nn.Module) -> bool:
    """Whether ``module``'s forward takes an image batch as its first argument (by the argument's name)."""
    first = _first_parameter(module)
    return first is not None and first.name in _IMAGE_ARGUMENTS and first.kind in (
        inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


def vision_tower(module: torch.nn.Module) -> tuple[torch.nn.Module, str]:
    """A transformers (or OpenCLIP) model's vision tower and its qualified-name prefix (``"vision_model."``), or the
    model and ``""``: image-text models (CLIP, SigLIP, ...) and vision-language models (Florence-2) need text for
    their forward, promptable segmenters (SAM, SAM 2) prompts for their mask decoder, so their vision tower is profiled
    alone. The tower is found by the names the recorder knows (``TOWER_ATTRIBUTES``), if its forward takes
    images. A ``VisionEncoderDecoderModel`` (TrOCR, Donut, ...), whose forward wants the text decoder's inputs,
    is profiled through its image ``encoder``."""
    from ..recording.towers import TOWER_ATTRIBUTES

    if getattr(getattr(module, "config", None), "model_type", None) == "vision-encoder-decoder":
        return module.encoder, "encoder."
    prefix = ""
    base = getattr(module, "base_model", module)
    if isinstance(base, torch.nn.Module) and base is not module and not any(
            isinstance(getattr(module, tower, None), torch.nn.Module) for tower in TOWER_ATTRIBUTES):
        # A head over a base model (Florence2ForConditionalGeneration's tower is model.vision_tower): its tower.
        inner, inner_prefix = vision_tower(base)
        if inner is not base:
            name = next(n for n, m in module.named_children() if m is base)
            return inner, f"{name}.{inner_prefix}"
    for tower in TOWER_ATTRIBUTES:
        found = getattr(module, tower, None)
        if isinstance(found, torch.nn.Module) and _takes_images(found):
            module, prefix = found, f"{prefix}{tower}."
    if _takes_other_inputs(module):
        # A tower held under another name (Phi-4-multimodal's embed_tokens_extend.image_embed.img_processor): the
        # outermost module on the way to the patch embedding whose forward takes images.
        from ..recording.families.plain import find_patch_embedding

        embedding = find_patch_embedding(module)
        parts = [] if embedding is None else embedding[0].split(".")
        for depth in range(1, len(parts)):
            name = ".".join(parts[:depth])
            if _takes_images(module.get_submodule(name)):
                return module.get_submodule(name), f"{prefix}{name}."
    return module, prefix


def _takes_other_inputs(module: torch.nn.Module) -> bool:
    """Whether a transformers ``module``'s forward takes something other than images first: token ids, audio
    features (``input_ids``, ``input_values``, ``input_features``, ``inputs_embeds``)."""
    first = _first_parameter(module)
    return type(module).__module__.startswith("transformers.") and first is not None and \
        first.name.startswith(("input_", "inputs_"))


def local_weights(model_checkpoint: str | os.PathLike | None) -> Path | None:
    """``--weights FILE`` (``model_checkpoint``) as a path, ``~`` expanded; None for none.

    Raises:
        MissingPathError: there is no such file.
        OptionError: the path is a folder or another kind of file (a device, a pipe).
    """
    if model_checkpoint is None:
        return None
    model_checkpoint = Path(model_checkpoint).expanduser()
    if model_checkpoint.exists() and not model_checkpoint.is_file():
        kind = "a folder" if model_checkpoint.is_dir() else "not a regular file (a device, a pipe or a socket)"
        raise OptionError("model_checkpoint", f"{model_checkpoint} is {kind}; expected a weights file")
    if not model_checkpoint.is_file():
        raise MissingPathError("model_checkpoint", f"no such file: {model_checkpoint}")
    return model_checkpoint


def tower_description(name: str, tower: torch.nn.Module, model: torch.nn.Module) -> str:
    """What ``mad.json``'s ``settings.profiled`` says of a vision tower profiled alone: its name in ``model``, both
    classes."""
    return f"{name} ({type(tower).__name__}) of {type(model).__name__}, its vision tower"


def _refuse_pre_cut_patches(module: torch.nn.Module) -> None:
    """Refuse a model whose vision tower takes the patches its processor cuts (Pix2Struct's and Kosmos-2.5's
    ``flattened_patches``, Molmo2's crops), not ``[B, 3, H, W]`` images: profiling feeds images.

    Raises:
        OptionError: (``model``) naming the model and what records it instead.
    """
    from ..recording.families.molmo2 import is_tower as is_molmo2_tower
    from ..recording.families.pix2struct import is_tower as is_flattened_patches_tower
    from ..recording.module_index import named_module_list

    for name, tower in named_module_list(module):
        if is_flattened_patches_tower(tower):
            inputs = "flattened_patches=, attention_mask="
        elif is_molmo2_tower(tower):
            inputs = "pixel_values="
        else:
            continue
        call = f"model.{name}" if name else "model"
        raise OptionError(
            "model",
            f"{type(module).__name__}: its vision tower ({type(tower).__name__}) takes the patches its own image "
            "processor cuts, not [B, 3, H, W] images, so vitmad profile cannot feed it; record it around a forward on "
            f"that processor's output instead: with vitmad.record(model) as rec: {call}({inputs} from "
            "image_processor(images=..., return_tensors='pt'))")


def _refuse_frames_in_the_batch(module: torch.nn.Module, outer: torch.nn.Module) -> None:
    """X-CLIP's vision tower takes a video's frames folded into its batch, and its config's ``num_frames`` made
    profile feed it clips ``[B, frames, 3, H, W]``: its forward failed, and the refusal blamed the size its own
    preprocessing gives (QA 399). Neither a clip nor images in batches fit it (its message tokens attend across the
    batch's groups of ``num_frames``)."""
    if not type(module).__module__.startswith("transformers.models.x_clip."):
        return
    holder = "" if outer is module else f"{type(outer).__name__}: "
    raise OptionError(
        "model",
        f"{holder}X-CLIP's vision tower ({type(module).__name__}) takes a video's frames folded into "
        "its batch ([B * frames, 3, H, W]), neither clips [B, frames, 3, H, W] nor images, so vitmad profile cannot "
        "feed it; record it around your own forward instead (README, Video): with vitmad.record(model) as rec: "
        "model(pixel_values=<the frames of B videos, [B * frames, 3, H, W]>)")


def non_square_table_said(module: torch.nn.Module) -> str | None:
    """Why a transformers model built for a non-square ``config.image_size`` (a pair of unequal sides) takes that
    size only, or None for any other model."""
    size = getattr(getattr(module, "config", None), "image_size", None)
    if not (type(module).__module__.startswith("transformers.") and isinstance(size, (tuple, list))
            and len(size) == 2 and size[0] != size[1]):
        return None
    return (f"{type(module).__name__} takes {size[0]}x{size[1]} px only: it was built for that non-square "
            "image_size, and transformers' interpolate_pos_encoding reads the position table as a square")


def wrap_module(module: torch.nn.Module, spec: str | None = None,
                preprocessing: Preprocessing | None = None) -> LoadedModel:
    """Wrap a model the caller built (``vitmad.profile(model, ...)``).

    HF models whose forward takes ``interpolate_pos_encoding`` get it set, so any ``--image-size`` works (not for
    one built at a non-square ``image_size``: transformers' interpolation assumes a square table). A
    Qwen2-VL / Qwen2.5-VL / Qwen3-VL or Pixtral vision tower, or a model holding one (a vision-language model), is
    profiled through that tower (:func:`wrap_packed_tower`).
    """
    from .packed_towers import find_packed_tower

    packed = find_packed_tower(module)
    if packed is not None:
        return wrap_packed_tower(module, packed, spec, preprocessing)
    # An image-text model (CLIP, SigLIP, ...) built in Python: its vision tower, as an hf: spec of it profiles (its
    # forward wants text: pixels passed alone landed in input_ids); OpenCLIP's CLIP, CustomTextCLIP and CoCa too
    # (their visual), as an open_clip: spec profiles them.
    _refuse_pre_cut_patches(module)
    outer, tower_path = module, ""
    if type(module).__module__.startswith(("transformers.", "open_clip.")):
        module, tower_path = vision_tower(module)
    _refuse_frames_in_the_batch(module, outer)
    if _takes_other_inputs(module):
        # Fed images, an audio model's convolution failed on a 5-D input and a language model took the pixels for
        # token ids, each deep in the model at the first batch, after a checkpoint was written.
        raise OptionError(
            "model", f"{type(outer).__name__}'s forward takes {_first_parameter(module).name}, not images [B, 3, H, W] "
                     f"(text or audio features), and vitmad found no vision tower in it that takes images; vitmad "
                     "profile feeds images: profile a vision model, or record this one around your own forward: "
                     "with vitmad.record(model) as rec: model(<its inputs>)")
    description = None
    if outer is not module and spec is None:
        description = tower_description(tower_path[:-1], module, outer)
    module.eval()
    # transformers' interpolate_pos_encoding reads the position table as a square of sqrt(num_positions) patches a
    # side: for a model built at a non-square image_size it fails, or (a table of 2 x 8 read as 4 x 4) scrambles
    # the positions, even at the model's own size, where the flag would still send it through the interpolation.
    # Such a model runs without the flag, at its own size only.
    accepts_interpolate = ("interpolate_pos_encoding" in inspect.signature(module.forward).parameters
                           and non_square_table_said(module) is None)
    # transformers' DINOv2 interpolates its position embedding at every forward, with no flag to ask for it;
    # AIMv2's native tower (config.is_native) builds its 2-D sin-cos positions for the input's grid (it was refused
    # for image_size 'native' as taking one input size, QA 269).
    always_interpolates = type(module).__name__ in ("Dinov2Model", "Dinov2WithRegistersModel") or (
        type(module).__name__ == "Aimv2VisionModel" and getattr(module.config, "is_native", False) is True)

    # VidEoMT takes clips [B, F, 3, H, W] and attends within each frame only (its frames are images of the batch
    # to the recorder): each image is a clip of one frame.
    one_frame_clips = type(module).__name__ == "VideomtForUniversalSegmentation"
    # torchvision's video models take [B, 3, frames, H, W].
    clips = video_forward(module)

    def forward(pixels: torch.Tensor):
        if clips is not None:
            return clips(pixels)
        if one_frame_clips:
            return module(pixels[:, None])
        if accepts_interpolate:
            return module(pixels, interpolate_pos_encoding=True)
        return module(pixels)

    return LoadedModel(spec or type(outer).__name__, module, preprocessing, forward,
                       accepts_interpolate or always_interpolates, description=description)


def wrap_packed_tower(model: torch.nn.Module, packed: tuple[str, torch.nn.Module], spec: str | None,
                      preprocessing: Preprocessing | None = None, processor: dict | None = None,
                      description: str | None = None) -> LoadedModel:
    """A packed vision tower (``packed``: its name in ``model`` and the tower) ready for profiling.

    Args:
        processor: the checkpoint's image processor settings; None: transformers' defaults for the tower
            (``packed_towers.processor_settings``).
        description: what was profiled; by default the tower's name and class in ``model``'s.

    Raises:
        OptionError: (``model``) the processor settings do not fit the tower.
    """
    from .native import _filter_name
    from .packed_towers import (
        nominal_size,
        packed_forward,
        packed_processor,
        processor_settings,
        tower_kind,
        tower_sizes,
    )

    name, tower = packed
    kind = tower_kind(tower)
    settings = processor_settings(kind, tower, processor)
    if preprocessing is None:
        own = packed_processor(kind, settings)
        mean, std = tuple(own.image_mean), tuple(own.image_std)
        if not own.do_normalize:
            mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
        patch, merge, _ = tower_sizes(tower)
        multiple = patch * merge
        size = nominal_size(kind, settings, multiple)
        preprocessing = Preprocessing(size, ("exact", *size), False, mean, std, _filter_name(own.resample),
                                      rescale=hf_rescale(own))
    if description is None and name:
        description = tower_description(name, tower, model)
    tower.eval()
    return LoadedModel(spec or type(model).__name__, tower, preprocessing, packed_forward(kind, tower, settings),
                       processor=settings, description=description)


def load_model(
    spec: str, *, model_checkpoint: str | os.PathLike | None = None, image_size: tuple[int, int] | str | None = None,
    model_args=None, intensity: str | None = None, volume_unit: str | None = None,
) -> LoadedModel:
    """Load a model from its spec.

    Args:
        spec: ``hf:<hub id or local folder>``, ``timm:<name>``, ``torchvision:<name>[.<WEIGHTS>]`` (see
            :mod:`vitmad.profiling.torchvision_models`), ``open_clip:<name>[.<pretrained tag>]`` (see
            :mod:`vitmad.profiling.open_clip_models`), ``segment_anything:<model type>`` or ``sam2:<config>`` (see
            :mod:`vitmad.profiling.sam_models`), ``monai:<network>`` (see :mod:`vitmad.profiling.monai_models`) or
            ``builtin:dinov2-s14``.
        model_checkpoint: local weights file for a ``timm:``, ``torchvision:`` or ``open_clip:`` model (instead of
            its pretrained download); required by ``segment_anything:``, ``sam2:`` and ``monai:``.
        model_args, intensity, volume_unit: a ``monai:`` network's constructor arguments, and how its volumes'
            intensities are scaled and their distances measured (:mod:`vitmad.profiling.volumes`); refused for
            other models.
        image_size: ``(height, width)`` the model will be fed, or ``"native"`` (each image at its own size),
            when not its default size: timm ViTs are then built with ``dynamic_img_size=True`` so their
            position embedding follows the input.

    Raises:
        OptionError: the spec has no known prefix, names no known model, or ``model_checkpoint`` is given for
            a model kind that does not take one (the message starts with the parameter's name).
        MissingPathError: a model folder or ``model_checkpoint`` does not exist.
    """
    kind, _, name = spec.partition(":")
    if not name:
        raise OptionError("model", f"expected {MODEL_SPEC_HELP}, got {spec!r}")
    if model_checkpoint is not None and kind not in _TAKE_WEIGHTS:
        raise OptionError("model_checkpoint", f"only {', '.join(k + ':' for k in _TAKE_WEIGHTS[:-1])} and "
                                              f"{_TAKE_WEIGHTS[-1]}: models take local weights, got model {spec!r}")
    if kind == "monai":
        return load_monai(spec, model_checkpoint, image_size, model_args, intensity, volume_unit)
    for parameter, value in (("model_args", model_args), ("intensity", intensity), ("volume_unit", volume_unit)):
        if value is not None:
            raise OptionError(parameter, f"only monai: models (3-D volumes) take it, got model {spec!r}")
    if kind == "hf":
        return _load_hf(spec, name, image_size)
    if kind == "timm":
        return _load_timm(spec, name, model_checkpoint, image_size)
    if kind == "torchvision":
        return load_torchvision(spec, model_checkpoint, image_size)
    if kind == "open_clip":
        return load_open_clip(spec, model_checkpoint, image_size)
    if kind == "segment_anything":
        return load_segment_anything(spec, model_checkpoint, image_size)
    if kind == "sam2":
        return load_sam2(spec, model_checkpoint, image_size)
    if kind == "builtin":
        from .builtin_model import builtin_model_dir

        return _load_hf(spec, str(builtin_model_dir(name)), image_size)
    raise OptionError("model", f"unknown model kind {kind!r} in {spec!r}; expected {MODEL_SPEC_HELP}")



def _hub_reachable(timeout_s: float = 3.0) -> bool:
    """Whether a TCP connection to the Hugging Face hub's endpoint opens within ``timeout_s``."""
    from huggingface_hub import constants

    url = urllib.parse.urlsplit(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout_s).close()
    except OSError:
        return False
    return True


def _hub_loading_options(spec: str, name: str) -> dict:
    """``from_pretrained`` options for a hub id: the local cache alone when the hub cannot be reached.

    Offline, transformers would retry the hub five times (minutes) before falling back to its cache or
    failing; a quick connection test decides at once instead.

    Raises:
        OptionError: the hub cannot be reached and the model is not in the local cache.
    """
    from huggingface_hub import constants

    if Path(name).expanduser().is_dir() or constants.HF_HUB_OFFLINE or _hub_reachable():
        return {}
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(name, local_files_only=True)
    except (OSError, ValueError) as err:
        raise OptionError(
            "model",
            f"{spec}: cannot reach the Hugging Face hub ({constants.ENDPOINT}) and {name} is not in the local "
            "cache; download it on a connected machine (hf download " + name + ") or pass a local folder",
        ) from err
    return {"local_files_only": True}


def _timm_weights_options(cfg, spec: str, name: str) -> dict:
    """``timm.create_model`` options for a model's pretrained weights (``cfg``, its timm pretrained config, None
    for none) when the Hugging Face hub, where timm gets them, cannot be reached: the file from the local hub
    cache, or an error at once.

    Offline, timm would ask the hub for the file five times (about a minute) before failing, even for weights in
    the cache. Weights that timm takes from a URL instead (no ``hf_hub_id``) are left to it: torch's download
    fails at once offline and reads its own cache.

    Raises:
        OptionError: the hub cannot be reached and the weights are not in the local cache.
    """
    from huggingface_hub import constants, try_to_load_from_cache

    if cfg is None or not cfg.hf_hub_id or constants.HF_HUB_OFFLINE or _hub_reachable():
        return {}
    repo, _, revision = cfg.hf_hub_id.partition("@")
    filename = cfg.hf_hub_filename or "pytorch_model.bin"
    candidates = [filename]
    if filename.endswith(".bin"):  # timm's order: the safetensors form first (model.safetensors for the default)
        safe = "model.safetensors" if filename == "pytorch_model.bin" else filename[: -len(".bin")] + ".safetensors"
        candidates.insert(0, safe)
    for candidate in candidates:
        cached = try_to_load_from_cache(repo, candidate, revision=revision or None)
        if isinstance(cached, str):
            return {"pretrained_cfg_overlay": {"file": cached}}
    raise OptionError(
        "model",
        f"{spec}: cannot reach the Hugging Face hub ({constants.ENDPOINT}) and the weights of {name} ({repo}) are "
        "not in the local cache; download them on a connected machine (hf download " + repo + ") or pass "
        "local weights (--weights FILE, model_checkpoint=)",
    )


def _with_class_defaults(transformers, name: str, processor: dict, options: dict) -> dict:
    """The saved processor settings completed with its class's defaults: a ``preprocessor_config.json`` may omit
    what its class sets itself (CLIP's mean, std and bicubic filter, its do_convert_rgb), which the generic
    defaults would replace. A ``size`` or ``crop_size`` saved as one number or a pair is the class's reading of it
    (CLIP's ``"size": 224`` is its short side, ``{"shortest_edge": 224}``; ViT's is 224 x 224): read as a square,
    the openai CLIP checkpoints' images were squashed (2.8 normalised units off; QA 270). A file that names only a
    ``feature_extractor_type`` (those checkpoints) is the image processor transformers loads for it. The saved dict
    as it is when transformers cannot build the processor (no class named, a missing backend)."""
    if "image_processor_type" not in processor and "feature_extractor_type" not in processor:
        return processor
    try:
        built = transformers.AutoImageProcessor.from_pretrained(name, **options).to_dict()
    except Exception:  # noqa: BLE001  (any failure of a third-party constructor: keep what the file says)
        return processor
    merged = {**built, **processor}
    for key in ("size", "crop_size"):
        if not isinstance(processor.get(key), dict) and isinstance(built.get(key), dict):
            merged[key] = built[key]
    return merged


def _normalizes_its_input(module: torch.nn.Module) -> bool:
    """Whether a transformers model normalises its pixel values itself (RADIO's ``input_conditioner``)."""
    cls = type(module)
    return cls.__name__ == "RadioModel" and cls.__module__.endswith("modeling_radio") \
        and hasattr(module, "input_conditioner")


def _auto_model(transformers, config):
    """The class to load a checkpoint with: ``AutoModel``, or, for a config it has no class for (EoMT, Pix2Struct),
    the class the checkpoint's ``config.json`` names in ``architectures``, when transformers has it (else
    ``AutoModel``, whose error then says the config is not loadable)."""
    from transformers.models.auto.modeling_auto import MODEL_MAPPING

    if type(config) in MODEL_MAPPING:
        return transformers.AutoModel
    for architecture in getattr(config, "architectures", None) or ():
        found = getattr(transformers, architecture, None)
        if isinstance(found, type) and hasattr(found, "from_pretrained"):
            return found
    return transformers.AutoModel


def _load_hf(spec: str, name: str, image_size: tuple[int, int] | str | None = None) -> LoadedModel:
    transformers = import_optional("transformers", "hf", f"model {spec!r}")
    from transformers.image_processing_base import ImageProcessingMixin

    if name.startswith((".", "/", "~")) and not Path(name).expanduser().is_dir():
        raise MissingPathError("model", f"{spec}: no such model folder {name}")
    if name.startswith("~"):  # transformers takes "~/x" for a hub id; the spec (mad.json's model) keeps it as given
        name = str(Path(name).expanduser())
    options = _hub_loading_options(spec, name)
    from .packed_towers import load_packed_tower

    try:
        config = transformers.AutoConfig.from_pretrained(name, **options)
        # Qwen2-VL / Qwen2.5-VL / Qwen3-VL / Pixtral: the vision tower alone, even of a whole vision-language model.
        packed = load_packed_tower(spec, name, config, options)
        missing: set[str] = set()
        if packed is None:
            module, info = _auto_model(transformers, config).from_pretrained(name, output_loading_info=True,
                                                                            **options)
            missing = set(info.get("missing_keys", ()))
        else:
            module = packed[0]
    except OptionError:
        raise
    except (OSError, ValueError, KeyError) as err:
        raise OptionError("model", f"{spec}: cannot load it with transformers: {first_line(err)}") from err
    if packed is None:  # before its processor, whose refusal would advise an image size
        _refuse_pre_cut_patches(module)
    if packed is not None:  # its videos, if vitmad profile feeds them, go through its own video processor
        from .packed_videos import video_processor_dict

        videos = video_processor_dict(name, options)
    try:
        processor, _ = ImageProcessingMixin.get_image_processor_dict(name, **options)
    except OSError:
        if packed is not None:  # no processor saved: transformers' defaults for the tower
            loaded = wrap_packed_tower(module, ("", module), spec, description=packed[1])
            loaded.video_processor = videos
            return loaded
        # A transformers 5 video processor has its own file with the same settings; else a bare saved model:
        # the defaults of ViTImageProcessor at the config's image size, without their normalisation for a model
        # that normalises its pixels itself (RADIO's input conditioner takes [0, 1]; its checkpoints' processors
        # say do_normalize false).
        processor = video_processor_settings(name)
        if not processor and _normalizes_its_input(module):
            processor = {"do_normalize": False}
    if packed is not None:
        loaded = wrap_packed_tower(module, ("", module), spec, processor=processor, description=packed[1])
        loaded.video_processor = videos
        return loaded
    processor = _with_class_defaults(transformers, name, processor, options)
    _refuse_foreign_naflex_processor(module, processor)
    vision = getattr(config, "vision_config", config)
    # An image size replaces the processor's resize, crop and padding (Preprocessing.with_size): a geometry this
    # library does not reproduce is then no reason to refuse the model.
    preprocessing = Preprocessing.from_hf(processor, getattr(vision, "image_size", None),
                                          own_geometry=image_size in (None, NATIVE))
    outer = module
    module, prefix = vision_tower(module)
    refuse_random_weights_before_attention(spec, module, {key[len(prefix):] for key in missing
                                                           if key.startswith(prefix)})
    masked = random_masking(module)
    if masked is not None:
        # A profile measures each image whole and the same in every run: an MAE encoder keeping a random quarter
        # of the patches at every forward gave another MAD each run (9.3 and 10.1 px) and a map of another draw
        # (QA 259). The checkpoint's own config, loaded here, runs every patch; mad.json says so.
        masked.mask_ratio = 0.0
    loaded = wrap_module(module, spec, preprocessing)
    loaded.processor = processor
    if prefix:  # mad.json's settings.profiled names the part of the checkpoint profiled, as for a module given
        loaded.description = tower_description(prefix[:-1], module, outer)
    if masked is not None:
        loaded.description = (f"{loaded.description or type(module).__name__}, every patch (the checkpoint's "
                              "random masking, mask_ratio, set to 0)")
    # Weights the checkpoint lacks (a pooler, a head) are drawn anew at every load: not part of the run's identity.
    loaded.unloaded = frozenset(key[len(prefix):] for key in missing if key.startswith(prefix))
    return loaded


def random_masking(module: torch.nn.Module):
    """The config by which ``module`` drops patches at random at every forward, eval mode included (transformers'
    ViTMAE: ``config.mask_ratio`` of them), or None where it drops none."""
    for inner in module.modules():
        config = getattr(inner, "config", None)
        if type(inner).__name__ == "ViTMAEEmbeddings" and float(getattr(config, "mask_ratio", 0) or 0) > 0:
            return config
    return None


def _refuse_foreign_naflex_processor(module: torch.nn.Module, processor: dict) -> None:
    """Refuse a checkpoint whose SigLIP2 (NaFlex) tower is fed by another processor than Siglip2ImageProcessor
    (LFM2-VL's tiles and their own patch cutting): vitmad profile cuts such a tower's patches with
    Siglip2ImageProcessor only, so no image size fits; its refusals sent the user from --image-size to native and
    back (QA 224).

    Raises:
        OptionError: (``model``).
    """
    from ..recording.families.naflex import towers

    own = hf_processor_class_name(processor)
    tower = next((t for t in towers(module).values() if type(t).__name__ == "Siglip2VisionModel"), None)
    if tower is None or own in ("Siglip2ImageProcessor", ""):
        return
    raise OptionError(
        "model", f"{type(module).__name__}'s vision tower ({type(tower).__name__}) takes the patches its processor "
                 f"cuts, and its {own} cuts them its own way, which vitmad profile does not reproduce (it cuts a "
                 "SigLIP2 tower's patches with Siglip2ImageProcessor only), at any --image-size; record the model "
                 "around a forward on that processor's output instead: with vitmad.record(model) as rec: "
                 "model(**processor(images=..., return_tensors='pt'))")


def refuse_random_weights_before_attention(spec: str, module: torch.nn.Module, missing: set[str] | frozenset[str],
                                           maps: bool = False) -> None:
    """Refuse a checkpoint that lacks weights of ``module`` (the part profiled) that run before or in its last
    attention layer: transformers initialises them at random, and the MAD would be that of random weights, different
    at every load (a tower saved with a weight deleted ran without a word, QA helper-140). Weights after it (a final
    norm, a pooler, a head) change no attention: they stay allowed, as they were. The attention layers are those the
    recording places (a pooling head's, which it skips, is not one: SigLIP's tower saved without its head was
    refused, QA 366), and with ``maps`` (``--stats prefix_maps``, which records a pooling head's maps) every one,
    the head's included (QA 371: its maps were those of a head drawn at random). Modules are taken to run in the
    order they are registered, the whole block holding the last attention layer (the module a ModuleList or
    Sequential holds) counted as running before it: transformers' ViT, CLIP and SigLIP layers register their
    pre-attention norm after the attention, and that norm missing in the last layer went unnoticed, its MAD that of
    a norm of ones (QA 366); so a weight of that block run after its attention (its MLP) is refused too, rather than
    a norm of ones measured. A ``mask_token`` is used only when a mask is passed, which profiling never does.

    Raises:
        OptionError: (``model``) naming the first such weight.
    """
    from ..recording import record
    from ..recording.recorder import attention_modules

    missing = {key for key in missing if key.rpartition(".")[2] != "mask_token"}
    if not missing:
        return
    named = dict(module.named_modules())
    names = list(named)
    attention = None
    if not maps:
        try:
            attention = list(record(module)._modules)  # the layers it places, not entered: no hook is installed
        except Exception:  # noqa: BLE001 (the profile refuses such a model itself, with its own words)
            pass
    if attention is None:
        attention = list(attention_modules(module))
    if not attention:
        return
    position = {name: i for i, name in enumerate(names)}
    last = names[max(position[name] for name in attention)]
    # The block holding it: the nearest module above it that a ModuleList or Sequential holds.
    parts = last.split(".")
    for depth in range(len(parts) - 1, 0, -1):
        if isinstance(named.get(".".join(parts[:depth - 1])), (torch.nn.ModuleList, torch.nn.Sequential)):
            last = ".".join(parts[:depth])
            break
    end = position[last] + 1  # past that block and everything inside it
    while end < len(names) and names[end].startswith(last + "."):
        end += 1
    harmful = sorted(key for key in missing if position.get(key.rpartition(".")[0], len(names)) < end)
    if harmful:
        what = ("its attention layers, the pooling head whose maps --stats prefix_maps records included" if maps
                else "its attention layers")
        raise OptionError("model", f"{spec}: the checkpoint has no weights for {len(harmful)} parameters of "
                                   f"{type(module).__name__} that run before or in {what}, or in the block of the last "
                                   f"of them (e.g. {harmful[0]}), which transformers would initialise at random: the "
                                   f"{'maps would be those' if maps else 'MAD would be that'} of random weights")


def _raised_reading(err: BaseException) -> bool:
    """Whether ``err`` was raised while a checkpoint file was read (in ``torch.load``), not by what was read."""
    traceback = err.__traceback__
    while traceback is not None:
        if Path(traceback.tb_frame.f_code.co_filename).parts[-2:] == ("torch", "serialization.py"):
            return True
        traceback = traceback.tb_next
    return isinstance(err.__cause__, pickle.UnpicklingError)  # timm's own message for pickled objects


# Where timm's load_checkpoint finds a training checkpoint's state dict (the EMA weights first, as it loads them).
_TIMM_STATE_KEYS = ("state_dict_ema", "model_ema", "state_dict", "model")


def _create_timm(timm, name: str, model_checkpoint: Path | None, tries: list[dict], weights: dict):
    """``timm.create_model`` with the first of ``tries`` (size options) the model's constructor takes, and those
    options.

    Raises:
        OptionError: naming ``image_size``, when it takes none of them.
    """
    for attempt, options in enumerate(tries):
        try:
            return timm.create_model(name, pretrained=model_checkpoint is None,
                                     checkpoint_path=str(model_checkpoint or ""), **options, **weights), options
        except TypeError as err:  # an option its constructor does not have; any other TypeError is the model's
            if not any(f"'{option}'" in str(err) for option in options):
                raise
            if attempt == len(tries) - 1:
                raise OptionError("image_size", f"timm model {name} cannot take other input sizes ({err})") from err
        except (AssertionError, ValueError) as err:  # built for the size asked, its constructor refuses it
            if "img_size" not in options:
                raise
            raise OptionError("image_size", f"timm model {name} cannot be built for "
                                            f"{'x'.join(map(str, options['img_size']))} px ({error_said(err)}); "
                                            "use its own size, or one it takes") from err
        except RuntimeError as err:
            if "img_size" not in options or model_checkpoint is None or _raised_reading(err):
                raise
            # Built for the size asked, its size-dependent tables (relative positions, attention biases) no
            # longer have the checkpoint's shapes.
            size = "x".join(map(str, options["img_size"]))
            raise OptionError("image_size", f"timm model {name} built for {size} px does not take the weights of "
                                            f"{model_checkpoint}, whose size-dependent tables are for another size; "
                                            f"use the size it was trained at ({first_line(err)})") from err
    raise AssertionError("unreachable: tries is never empty")


def _check_runs_at(module: torch.nn.Module, name: str, image_size: tuple[int, int]) -> None:
    """One forward of a blank image at ``image_size``, for a timm model built for that size (or taking no size
    option): whether it runs there is known only by running it (MViTv2 asserts square maps, EfficientFormer's
    attention biases are sized for 224 px whatever img_size says). Said now, naming the option, rather than at
    the first batch, after a checkpoint.

    Raises:
        OptionError: naming ``image_size``.
    """
    try:
        with torch.no_grad():
            module(torch.zeros(1, 3, *image_size))
    except (RuntimeError, AssertionError, ValueError, IndexError, TypeError) as err:
        raise OptionError("image_size", f"timm model {name} does not run at {image_size[0]}x{image_size[1]} px "
                                        f"({error_said(err)}); use its own size, or one it takes") from err


def _load_timm(
    spec: str, name: str, model_checkpoint: str | os.PathLike | None, image_size: tuple[int, int] | str | None
) -> LoadedModel:
    timm = import_optional("timm", "timm", f"model {spec!r}")

    if not timm.is_model(name):
        raise OptionError("model", f"{spec}: timm has no model named {name!r} (see timm.list_models())")
    try:  # a pretrained tag the architecture does not have (is_model reads the architecture alone)
        pretrained_cfg = timm.models.get_pretrained_cfg(name)
    except RuntimeError as err:
        raise OptionError("model", f"{spec}: {str(err).rstrip('.')} (see timm.list_pretrained())") from err
    model_checkpoint = local_weights(model_checkpoint)
    # NaFlexViT follows any input size by itself (and takes no such option).
    naflex = timm.models.model_entrypoint(name).__module__.endswith(".naflexvit")
    weights = {} if model_checkpoint is not None else _timm_weights_options(pretrained_cfg, spec, name)
    # The ways a timm model takes another size, in order: any size (the ViTs: dynamic_img_size); built for this
    # size (hierarchies whose position tables or attention biases are sized at construction: MViTv2, MaxViT,
    # CoAtNet, LeViT, Hiera, EfficientFormer: img_size); neither option at all (PVT v2, DaViT: no table tied to a
    # size). Only a model that takes none of them is refused here.
    tries = [{}]
    if image_size is not None and not naflex:
        tries = [{"dynamic_img_size": True}]
        if image_size != NATIVE:
            tries += [{"img_size": tuple(image_size)}, {}]
    try:
        module, options = _create_timm(timm, name, model_checkpoint, tries, weights)
    except OSError as err:  # the pretrained weights could not be downloaded (offline, unknown tag)
        raise OptionError("model", f"{spec}: cannot load its pretrained weights ({first_line(err).rstrip('.')}); "
                                   "pass local weights (--weights FILE, model_checkpoint=)") from err
    except (RuntimeError, EOFError) as err:  # the file unreadable; or load_state_dict: missing, unexpected or
        # mis-shaped weights
        if model_checkpoint is None:
            raise
        if _raised_reading(err):  # an empty file (EOFError without a message), a cut zip, pickled objects
            raise checkpoint_unread(model_checkpoint, err) from err
        raise OptionError(  # torch's first line names only the class: the keys that differ follow it
            "model_checkpoint", f"{model_checkpoint} does not fit timm model {name}: {state_dict_mismatch_said(err)}"
        ) from err
    except Exception:  # noqa: BLE001  (what timm's loader makes of a file that is no checkpoint: KeyError, ...)
        # A text file, a tensor or a list saved alone, a junk .safetensors escaped as tracebacks (QA 284): where the
        # file is the cause, say so; else the error is the model's, raised as it is.
        if model_checkpoint is not None and model_checkpoint.suffix.lower() not in (".npz", ".npy"):
            read_state_dict(model_checkpoint, _TIMM_STATE_KEYS)  # (timm reads JAX .npz weights its own way)
        raise
    if image_size not in (None, NATIVE) and "dynamic_img_size" not in options:
        _check_runs_at(module.eval(), name, image_size)
    data_config = timm.data.resolve_model_data_config(module)
    try:
        preprocessing = Preprocessing.from_timm(data_config)
    except OptionError:
        if image_size is None or image_size == NATIVE:
            raise
        # A crop mode this library does not reproduce, but an image size replaces the model's resize and crop
        # (Preprocessing.with_size): its mean, std and filter are all that is kept.
        preprocessing = Preprocessing.from_timm({**data_config, "crop_mode": "center"})
    return wrap_module(module, spec, preprocessing)
