"""Images at their own aspect ratio (``image_size="native"``, ``vitmad profile --image-size native``).

Each image keeps its aspect ratio and is resized to its own grid of whole patches within the model's token
budget; its MAD is in pixels of that resized image (``docs/definition.md``, native resolution):

- transformers SigLIP2 (NaFlex): the model's own ``Siglip2ImageProcessor`` (its ``max_num_patches``) resizes,
  cuts and pads a batch; one forward per batch, several grids in it.
- timm NaFlexViT: timm's own NaFlex pipeline (``get_image_size_for_seq``, the rule of its ``ResizeToSequence``,
  then ``patchify_image`` and the collator's padding); the budget is the patches of the model's default input
  size. One forward per batch.
- Plain ViTs whose position embedding follows the input (timm ``dynamic_img_size=True``, transformers models
  taking ``interpolate_pos_encoding``): the image is resized to ``gh x gw`` patches, ``gh / gw`` as close to its
  own ratio as whole patches allow and ``gh * gw`` at most the patches of the model's input size
  (:func:`native_grid`); one image per forward, since images of different sizes do not stack.

Any other model is refused. ``mad.json`` lists each image's grid and size in ``image_grids``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path

import torch

from .images import load_each, load_image
from .models import LoadedModel
from .options import OptionError

__all__ = ["NativeFeed", "native_feed", "native_grid", "load_native_batch", "native_geometry", "check_fixed_size"]


def native_grid(height: int, width: int, patch: int, max_patches: int) -> tuple[int, int]:
    """``(gh, gw)`` whole patches for an image of ``height x width`` pixels: the image scaled by one factor so
    that ``gh * gw <= max_patches`` (each side rounded down, at least one patch)."""
    scale = math.sqrt(max_patches / ((height / patch) * (width / patch)))
    grid_h = max(1, min(max_patches, math.floor(height * scale / patch)))
    grid_w = max(1, min(max_patches // grid_h, math.floor(width * scale / patch)))
    return grid_h, grid_w


def _normalised(image, size: tuple[int, int], mean, std, interpolation: str) -> torch.Tensor:
    """``[3, H, W]`` float32: the RGB ``PIL.Image`` resized to ``size`` (height, width) and normalised."""
    import numpy as np
    from PIL import Image

    resample = getattr(Image.Resampling, interpolation.upper(), Image.Resampling.BICUBIC)
    image = image.resize((size[1], size[0]), resample)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1) / 255.0
    return (pixels - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]


@dataclass(frozen=True)
class NativeFeed:
    """How one model takes images at their own aspect ratio.

    Attributes:
        kind: ``"siglip2"``, ``"naflexvit"`` (several grids per forward) or ``"dynamic"`` (one image per forward).
        patch: pixels per patch.
        max_patches: the token budget of one image.
        mean, std, interpolation: the model's normalisation and resampling filter.
        processor: SigLIP2's image processor settings (``kind == "siglip2"``), else None.
        channels_last: timm NaFlexViT's patch layout ``(p, p, C)`` (else ``(C, p, p)``).
    """

    kind: str
    patch: int
    max_patches: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str
    processor: dict | None = None
    channels_last: bool = True

    def to_dict(self) -> dict:
        """The settings that shape the result (``mad.json``'s ``settings.preprocessing``)."""
        return {"native": self.kind, "patch": self.patch, "max_patches": self.max_patches, "mean": list(self.mean),
                "std": list(self.std), "interpolation": self.interpolation}

    def prepare(self, image):
        """One decoded RGB image as this model's per-image input (SigLIP2's processor works on the batch)."""
        if self.kind == "siglip2":
            return image
        if self.kind == "naflexvit":
            from timm.data.naflex_transforms import get_image_size_for_seq, patchify_image

            _, size = get_image_size_for_seq((image.height, image.width), self.patch, self.max_patches)
            pixels = _normalised(image, size, self.mean, self.std, self.interpolation)
            return patchify_image(pixels, (self.patch, self.patch), channels_last=self.channels_last)
        grid = native_grid(image.height, image.width, self.patch, self.max_patches)
        return _normalised(image, (grid[0] * self.patch, grid[1] * self.patch), self.mean, self.std,
                           self.interpolation)

    def display(self, image) -> torch.Tensor:
        """``[3, H, W]`` the image as the model sees it (normalised like the model input), for ``mad_map.png``."""
        if self.kind == "siglip2":
            from transformers.models.siglip2.image_processing_siglip2 import get_image_size_for_max_num_patches

            size = get_image_size_for_max_num_patches(image.height, image.width, self.patch, self.max_patches)
        elif self.kind == "naflexvit":
            from timm.data.naflex_transforms import get_image_size_for_seq

            _, size = get_image_size_for_seq((image.height, image.width), self.patch, self.max_patches)
        else:
            grid = native_grid(image.height, image.width, self.patch, self.max_patches)
            size = grid[0] * self.patch, grid[1] * self.patch
        return _normalised(image, tuple(size), self.mean, self.std, self.interpolation)

    def forwards(self, loaded: LoadedModel, items: list, device: torch.device, dtype: torch.dtype):
        """Runs the model on a batch of prepared images: one forward (packed) or one per image (dynamic)."""
        if self.kind == "dynamic":
            for pixels in items:
                loaded.forward(pixels[None].to(device=device, dtype=dtype))
        elif self.kind == "siglip2":
            from transformers import Siglip2ImageProcessor

            inputs = Siglip2ImageProcessor(**self.processor)(items, return_tensors="pt")
            loaded.module(pixel_values=inputs["pixel_values"].to(device=device, dtype=dtype),
                          pixel_attention_mask=inputs["pixel_attention_mask"].to(device),
                          spatial_shapes=inputs["spatial_shapes"].to(device))
        else:
            slots = max(patches.shape[0] for patches, _, _ in items)
            patches = torch.zeros(len(items), slots, items[0][0].shape[1])
            coord = torch.zeros(len(items), slots, 2, dtype=torch.long)
            valid = torch.zeros(len(items), slots, dtype=torch.bool)
            for i, (p, c, v) in enumerate(items):  # padded at the end, as timm's NaFlexCollator does
                patches[i, :len(p)], coord[i, :len(p)], valid[i, :len(p)] = p, c, v
            loaded.module({"patches": patches.to(device=device, dtype=dtype), "patch_coord": coord.to(device),
                           "patch_valid": valid.to(device)})


def _filter_name(resample) -> str:
    """A PIL resampling filter (enum or int) by name: ``2`` -> ``"bilinear"``."""
    from PIL import Image

    return Image.Resampling(int(resample)).name.lower()


def check_fixed_size(loaded: LoadedModel) -> None:
    """Refuse a model that takes only patches its processor cut at each image's own size (SigLIP2) when images
    are to be fed at one size.

    Raises:
        OptionError: (``image_size``) the model is SigLIP2's NaFlex vision tower.
    """
    from ..recording.families.naflex import towers

    if any(type(t).__name__ == "Siglip2VisionModel" for t in towers(loaded.module).values()):
        raise OptionError("image_size", f"{type(loaded.module).__name__} takes patches its processor cuts at each "
                                        "image's own aspect ratio: use image_size='native' (--image-size native)")


def native_feed(loaded: LoadedModel) -> NativeFeed:
    """The way ``loaded`` takes images at their own aspect ratio.

    Raises:
        OptionError: the model takes one input size only (``image_size``).
    """
    from ..recording.families.naflex import towers
    from ..recording.families.plain import find_patch_embedding

    module, prep = loaded.module, loaded.preprocessing
    name = type(module).__name__
    tower = next(iter(towers(module).values()), None)
    if tower is not None and type(tower).__name__ == "Siglip2VisionModel":
        settings = dict(loaded.processor or {})
        settings.setdefault("patch_size", int(tower.config.patch_size))
        settings = {k: v for k, v in settings.items() if k not in ("image_processor_type", "processor_class")}
        from transformers import Siglip2ImageProcessor

        processor = Siglip2ImageProcessor(**settings)
        return NativeFeed("siglip2", int(processor.patch_size), int(processor.max_num_patches),
                          tuple(processor.image_mean), tuple(processor.image_std),
                          _filter_name(processor.resample), settings)
    if prep is None:
        raise OptionError("image_size", f"native: {name} has no known preprocessing (mean, std, input size)")
    if tower is not None:  # timm NaFlexVit
        embeds = tower.embeds
        patch = int(embeds.patch_size[0])
        budget = (prep.size[0] // patch) * (prep.size[1] // patch)
        return NativeFeed("naflexvit", patch, budget, prep.mean, prep.std, prep.interpolation,
                          channels_last=bool(getattr(embeds, "channels_last", True)))
    embedding = find_patch_embedding(module)
    dynamic = bool(getattr(module, "dynamic_img_size", False)) or loaded.accepts_any_size
    if embedding is None or not dynamic:
        raise OptionError(
            "image_size",
            f"native: {name} takes one input size; native resolution needs a NaFlex model (SigLIP2, timm "
            "naflexvit_*) or a ViT whose position embedding follows the input (timm dynamic_img_size=True, "
            "transformers interpolate_pos_encoding)",
        )
    patch = int(embedding[1].kernel_size[0])
    budget = (prep.size[0] // patch) * (prep.size[1] // patch)
    return NativeFeed("dynamic", patch, budget, prep.mean, prep.std, prep.interpolation)


def load_native_batch(paths: Sequence[Path], feed: NativeFeed, pool: Executor | None = None
                      ) -> tuple[list | None, list[Path], list[tuple[Path, str]]]:
    """Decode and prepare a batch of files at their own aspect ratio, setting unreadable ones aside.

    Returns:
        ``(items, loaded, skipped)`` as :func:`~.images.load_batch`, with one prepared input per loaded file
        instead of a stacked tensor (``None`` if nothing loaded).
    """

    def one(path: Path):
        image, reason = load_image(path)
        return (None, reason) if image is None else (feed.prepare(image), None)

    items, loaded, skipped = load_each(paths, one, pool)
    return (items or None), loaded, skipped


def native_geometry(rec) -> tuple[torch.Tensor, list[dict], list[dict]]:
    """What a recording of native forwards gives: ``([L, n, H] MAD of the n images, per-layer geometry without
    a grid, per image {"grid": [gh, gw], "size": [H, W]})``, the images in call order.

    Raises:
        OptionError: (``image_size``) the layers attend at different strides (a hierarchy such as Swin): one grid
            per image would not describe them.
    """
    strides = {layer.stride for call in rec.calls for layer in call.geometry}
    if len(strides) > 1:
        raise OptionError("image_size", f"native: the layers of {type(rec.model).__name__} attend at strides "
                                        f"{sorted(strides)} px; native resolution takes models whose layers all "
                                        "attend over the patch grid")
    mad, images = [], []
    for call in rec.calls:
        first = call.geometry[0]
        grids = first.image_grids or (first.grid,) * call.per_layer[0].shape[0]
        images += [{"grid": list(g), "size": [round(g[0] * first.stride[0]), round(g[1] * first.stride[1])]}
                   for g in grids]
        mad.append(call.mad)
    geometry = []
    for layer in rec.calls[0].geometry:
        found = layer.as_dict()
        found.pop("image_grids", None)
        geometry.append(found | {"grid": None})
    return torch.cat(mad, dim=1), geometry, images
