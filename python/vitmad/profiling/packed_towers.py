"""Packed native-resolution vision towers in ``vitmad profile``: the Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3-VL-MoE,
Qwen3.5 and Qwen3.5-MoE vision towers and Pixtral's (``recording/families/packed.py`` records them, and more towers
that ``vitmad profile`` does not load: GLM, ERNIE-4.5-VL, dots3, the Omni models, EXAONE 4.5, Cohere Compass,
Qwen4-Exp, whose checkpoint layouts or image processors are not checked here).

Loading (``hf:<id or folder>``):

- a whole vision-language checkpoint (``Qwen2VLForConditionalGeneration``, ``Qwen2_5_VLForConditionalGeneration``,
  ``Qwen3VLForConditionalGeneration``, ``Qwen3VLMoeForConditionalGeneration``, ``Qwen3_5ForConditionalGeneration``,
  ``Qwen3_5MoeForConditionalGeneration``, their ``*Model``, and ``LlavaForConditionalGeneration`` /
  ``Mistral3ForConditionalGeneration`` whose ``vision_config`` is Pixtral's): only its vision tower is built and
  loaded, from the checkpoint's ``visual.*`` / ``model.visual.*`` (Qwen) or ``vision_tower.*`` /
  ``model.vision_tower.*`` (LLaVA, Mistral 3) weights; the language model is never loaded. A tower weight the
  checkpoint lacks is an error, never a random weight.
- a vision tower saved alone (``save_pretrained`` of a ``Qwen2VisionTransformerPretrainedModel``,
  ``Qwen2_5_VisionTransformerPretrainedModel``, ``Qwen3VLVisionModel``, ``Qwen3VLMoeVisionModel``,
  ``Qwen3_5VisionModel``, ``Qwen3_5MoeVisionModel`` or ``PixtralVisionModel``).

``LoadedModel.description`` (``mad.json``'s ``settings.profiled``) says which tower was profiled.

Feeding: the image processor of the checkpoint (its ``preprocessor_config.json``; without one, the defaults of
transformers' ``Qwen2VLImageProcessor`` / ``PixtralImageProcessor`` with the tower's patch, merge and temporal
patch sizes, and for Pixtral the tower's largest image side as ``longest_edge``) resizes each image; several images
of different sizes go into one packed forward (:class:`~.native.NativeFeed`). A fixed ``image_size`` resizes every
image to exactly that size (cover and centre crop, as for any model), which must be whole patches: multiples of
``patch * spatial_merge_size`` for Qwen, of ``patch`` (and at most the tower's ``image_size``) for Pixtral; no
``image_size`` is refused, since these towers have no input size of their own.
"""

from __future__ import annotations

import functools
import importlib
import json
import math
import re

import torch
from torch import nn

from .options import OptionError

__all__ = ["tower_kind", "find_packed_tower", "load_packed_tower", "packed_forward", "packed_processor",
           "processor_settings", "check_packed_size", "PACKED_TOWERS"]

# Tower class -> (kind, modeling module, config class of the tower).
PACKED_TOWERS = {
    "Qwen2VisionTransformerPretrainedModel": ("qwen", "transformers.models.qwen2_vl.modeling_qwen2_vl",
                                              "Qwen2VLVisionConfig"),
    "Qwen2_5_VisionTransformerPretrainedModel": ("qwen", "transformers.models.qwen2_5_vl.modeling_qwen2_5_vl",
                                                 "Qwen2_5_VLVisionConfig"),
    "Qwen3VLVisionModel": ("qwen", "transformers.models.qwen3_vl.modeling_qwen3_vl", "Qwen3VLVisionConfig"),
    # Qwen3-VL's tower under other names; their checkpoints keep it under model.visual, their processor is
    # Qwen2VLImageProcessor (transformers' image processor auto map).
    "Qwen3VLMoeVisionModel": ("qwen", "transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe",
                              "Qwen3VLMoeVisionConfig"),
    "Qwen3_5VisionModel": ("qwen", "transformers.models.qwen3_5.modeling_qwen3_5", "Qwen3_5VisionConfig"),
    "Qwen3_5MoeVisionModel": ("qwen", "transformers.models.qwen3_5_moe.modeling_qwen3_5_moe", "Qwen3_5MoeVisionConfig"),
    "PixtralVisionModel": ("pixtral", "transformers.models.pixtral.modeling_pixtral", "PixtralVisionConfig"),
}
_BY_CONFIG = {config: tower for tower, (_, _, config) in PACKED_TOWERS.items()}
# Where a vision-language checkpoint keeps its tower's weights (transformers 5 and original layouts).
_PREFIXES = {"qwen": ("model.visual.", "visual."), "pixtral": ("model.vision_tower.", "vision_tower.")}


def tower_kind(module: nn.Module) -> str | None:
    """``"qwen"`` or ``"pixtral"`` for a packed tower of transformers, else None."""
    found = PACKED_TOWERS.get(type(module).__name__)
    return found[0] if found and type(module).__module__ == found[1] else None


def find_packed_tower(module: nn.Module) -> tuple[str, nn.Module] | None:
    """``(qualified name, tower)`` of the packed tower ``module`` is or holds (the shallowest), or None."""
    for name, found in module.named_modules():
        if tower_kind(found) is not None:
            return name, found
    return None


def _tower_class(name: str) -> type:
    return getattr(importlib.import_module(PACKED_TOWERS[name][1]), name)


def load_packed_tower(spec: str, name: str, config, options: dict) -> tuple[nn.Module, str] | None:
    """``(tower, description)`` when the checkpoint ``name`` is a packed tower or a vision-language model holding
    one (its vision tower alone is loaded), else None.

    Raises:
        OptionError: (``model``) the checkpoint lacks some of the tower's weights.
    """
    tower_name = _BY_CONFIG.get(type(config).__name__)
    if tower_name is not None:
        tower = _tower_class(tower_name).from_pretrained(name, **options)
        return tower.eval(), f"{tower_name} (a vision tower saved alone)"
    vision = getattr(config, "vision_config", None)
    tower_name = _BY_CONFIG.get(type(vision).__name__)
    if tower_name is None:
        return None
    kind = PACKED_TOWERS[tower_name][0]
    mapping = {"^" + re.escape(prefix): "" for prefix in _PREFIXES[kind]}
    tower, info = _tower_class(tower_name).from_pretrained(name, config=vision, key_mapping=mapping,
                                                           output_loading_info=True, **options)
    missing = sorted(info.get("missing_keys", ()))
    if missing:
        raise OptionError(
            "model",
            f"{spec}: the checkpoint has no weights for {len(missing)} parameters of its vision tower {tower_name} "
            f"(e.g. {missing[0]}; looked for them under {' or '.join(_PREFIXES[kind])})",
        )
    architecture = (getattr(config, "architectures", None) or [type(config).__name__])[0]
    where = "visual" if kind == "qwen" else "vision_tower"
    return tower.eval(), (f"{where} ({tower_name}) of {architecture}, its vision tower alone (the language model "
                          "is not loaded)")


def _sizes(kind: str, tower: nn.Module) -> tuple[int, int]:
    """``(patch, factor)``: pixels per patch, and the multiple every side must be (Qwen: patch * merge)."""
    if kind == "qwen":
        patch = int(tower.patch_embed.patch_size)
        return patch, patch * int(tower.spatial_merge_size)
    return int(tower.patch_size), int(tower.patch_size)


def check_packed_size(kind: str, tower: nn.Module, height: int, width: int, parameter: str) -> None:
    """Refuse an input size the tower cannot take as one grid of whole patches.

    Raises:
        OptionError: (``parameter``) a side is not a multiple of the patch (Qwen: patch * merge) or, for Pixtral,
            longer than the tower's ``image_size``.
    """
    _, factor = _sizes(kind, tower)
    what = (f"multiples of {factor} px (patch {factor // int(tower.spatial_merge_size)} x spatial merge "
            f"{int(tower.spatial_merge_size)})" if kind == "qwen" else f"multiples of the {factor} px patch")
    if height % factor or width % factor:
        raise OptionError(parameter, f"{type(tower).__name__} takes whole patches: height and width must be {what}, "
                                     f"got {height}x{width}")
    if kind == "pixtral" and max(height, width) > int(tower.config.image_size):
        raise OptionError(parameter, f"{type(tower).__name__} takes sides of at most {int(tower.config.image_size)} px "
                                     f"(its config's image_size), got {height}x{width}")


def packed_forward(kind: str, tower: nn.Module):
    """Calls ``tower`` on ``[B, 3, H, W]`` normalised pixels of one size: Qwen's patches and ``grid_thw`` (the
    image repeated over the temporal patch, as its processor does for an image), Pixtral's ``image_sizes``."""

    def forward(pixels: torch.Tensor):
        if pixels.dim() != 4:
            raise OptionError("images", f"{type(tower).__name__} takes images [B, 3, H, W], got shape "
                                        f"{list(pixels.shape)}")
        batch, _, height, width = pixels.shape
        check_packed_size(kind, tower, height, width, "images")
        if kind == "pixtral":
            return tower(pixels, image_sizes=torch.tensor([[height, width]] * batch, device=pixels.device))
        patches, grid = qwen_patches(pixels, int(tower.patch_embed.patch_size), int(tower.spatial_merge_size),
                                     int(tower.patch_embed.temporal_patch_size))
        grid_thw = torch.tensor([[1, *grid]] * batch, device=pixels.device)
        return tower(patches.reshape(-1, patches.shape[-1]), grid_thw=grid_thw)

    return forward


def qwen_patches(pixels: torch.Tensor, patch: int, merge: int, temporal: int) -> tuple[torch.Tensor, tuple]:
    """``([B, h * w, C * temporal * patch * patch], (h, w))``: Qwen2VLImageProcessor's ``patchify`` of images
    ``[B, C, H, W]`` (tokens in merge-block order, each image repeated over the temporal patch)."""
    batch, channels, height, width = pixels.shape
    grid_h, grid_w = height // patch, width // patch
    blocks = pixels.reshape(batch, channels, grid_h // merge, merge, patch, grid_w // merge, merge, patch)
    blocks = blocks.permute(0, 2, 5, 3, 6, 1, 4, 7)  # [B, h/m, w/m, m, m, C, p, p]
    flat = blocks.unsqueeze(6).expand(-1, -1, -1, -1, -1, -1, temporal, -1, -1)
    return flat.reshape(batch, grid_h * grid_w, channels * temporal * patch * patch), (grid_h, grid_w)


def qwen_unpatch(patches: torch.Tensor, grid: tuple[int, int], patch: int, merge: int, temporal: int
                 ) -> torch.Tensor:
    """``[C, H, W]``: the image behind one image's Qwen patches (the inverse of :func:`qwen_patches`)."""
    grid_h, grid_w = grid
    blocks = patches.reshape(grid_h // merge, grid_w // merge, merge, merge, -1, temporal, patch, patch)[:, :, :, :,
                                                                                                        :, 0]
    return blocks.permute(4, 0, 2, 5, 1, 3, 6).reshape(-1, grid_h * patch, grid_w * patch)


_DROPPED = ("image_processor_type", "processor_class", "auto_map", "_processor_class")


def processor_settings(kind: str, tower: nn.Module, saved: dict | None) -> dict:
    """The image processor's settings: the checkpoint's (``saved``), else transformers' defaults with the tower's
    sizes; checked against the tower.

    Raises:
        OptionError: (``model``) the checkpoint's processor cuts patches of another size than the tower's, or
            (Pixtral) resizes beyond the tower's largest image.
    """
    settings = {k: v for k, v in (saved or {}).items() if k not in _DROPPED}
    patch, factor = _sizes(kind, tower)
    name = type(tower).__name__
    if kind == "qwen":
        expected = {"patch_size": patch, "merge_size": factor // patch,
                    "temporal_patch_size": int(tower.patch_embed.temporal_patch_size)}
        for key, value in expected.items():
            settings.setdefault(key, value)
            if int(settings[key]) != value:
                raise OptionError("model", f"the image processor has {key}={settings[key]}, but the vision tower "
                                           f"{name} takes {value}")
        return settings
    settings.setdefault("patch_size", {"height": patch, "width": patch})
    settings.setdefault("size", {"longest_edge": int(tower.config.image_size)})
    given = settings["patch_size"]
    given = (int(given["height"]), int(given["width"])) if isinstance(given, dict) else (int(given),) * 2
    if given != (patch, patch):
        raise OptionError("model", f"the image processor has patch_size {list(given)}, but the vision tower {name} "
                                   f"takes {patch}")
    longest = (settings["size"] or {}).get("longest_edge")
    if longest is None or int(longest) > int(tower.config.image_size):
        raise OptionError("model", f"the image processor resizes to size {settings['size']}, but the vision tower "
                                   f"{name} takes sides of at most {int(tower.config.image_size)} px (its "
                                   "config's image_size)")
    return settings


@functools.lru_cache(maxsize=8)
def _processor(kind: str, settings_json: str):
    from transformers import PixtralImageProcessor, Qwen2VLImageProcessor

    settings = json.loads(settings_json)
    return (Qwen2VLImageProcessor if kind == "qwen" else PixtralImageProcessor)(**settings)


def packed_processor(kind: str, settings: dict):
    """The transformers image processor of ``settings`` (one per settings: they are shared, read-only)."""
    return _processor(kind, json.dumps(settings, sort_keys=True, default=_plain))


def _plain(value):
    """JSON of the odd values in processor settings (PIL resampling enums)."""
    return int(value) if isinstance(value, int) or hasattr(value, "__index__") else str(value)


def nominal_size(kind: str, settings: dict, factor: int) -> tuple[int, int]:
    """A square of whole patches within the processor's budget: the ``size`` of :class:`~.images.Preprocessing`
    for towers that take no input size of their own (never used to resize: ``image_size`` is required)."""
    processor = packed_processor(kind, settings)
    if kind == "qwen":
        side = max(factor, math.isqrt(int(processor.size["longest_edge"])) // factor * factor)
    else:
        side = int(processor.size["longest_edge"]) // factor * factor
    return side, side
