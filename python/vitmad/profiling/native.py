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

- Packed native-resolution towers (``profiling/packed_towers.py``): the Qwen2-VL, Qwen2.5-VL and Qwen3-VL vision towers
  (and Qwen3-VL-MoE's, Qwen3.5's, Qwen3.5-MoE's) take the model's own ``Qwen2VLImageProcessor`` (``smart_resize``: sides
  multiples of ``patch * merge``, ``min_pixels <= H * W <= max_pixels``; its patches in spatial-merge block order with
  the image's ``grid_thw``), MiniMax-M3-VL, Cosmos3-Edge, LFM3-VL, Ovis2.5, PaddleOCR-VL, Muse Glimmer / Spark,
  VideoLLaMA3 (``merge_sizes`` 1), HunYuanVL and HY-V4-VL their models' own processors (the same order; Cosmos3-Edge's
  patches channels last, without a temporal patch; PaddleOCR-VL's, the Muse towers', VideoLLaMA3's, HunYuanVL's and
  HY-V4-VL's row-major, the Muse towers' time first, their budget ``max_image_tokens`` merged tokens), Pixtral the
  model's own ``PixtralImageProcessor`` (the longest edge at most ``longest_edge``, each side rounded up to whole
  patches; ``image_sizes``). Every image of a batch goes into one packed forward, several grids in it; images only (a
  Qwen video, ``t > 1``, goes through the model's video processor: ``profiling/packed_videos.py``). With a fixed
  ``image_size`` these towers get every image resized to that size (its sides whole patches), and without one they
  are refused: they have no input size of their own.

Any other model is refused. ``mad.json`` lists each image's grid and size in ``image_grids``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path

import torch

from .images import hf_rescale, load_each, load_image, rescaled
from .models import LoadedModel, non_square_table_said
from .options import OptionError, error_said
from .packed_towers import (
    call_packed,
    channels_last,
    check_packed_size,
    find_packed_tower,
    packed_processor,
    qwen_unpatch,
    row_major,
    temporal_first,
    tower_kind,
    tower_sizes,
)

__all__ = ["NativeFeed", "native_feed", "native_grid", "load_native_batch", "native_geometry", "check_fixed_size"]


def native_grid(height: int, width: int, patch: int, max_patches: int) -> tuple[int, int]:
    """``(gh, gw)`` whole patches for an image of ``height x width`` pixels: the image scaled by one factor so
    that ``gh * gw <= max_patches`` (each side rounded down, at least one patch). ``patch`` does not change it: the
    image is resized to whole patches either way."""
    # height * scale / patch is sqrt(max_patches * height / width), and floor(sqrt(x)) = isqrt(floor(x)): exact
    # integers, where the float product landed on 13.999... for 255 of the square sizes up to 2048 px at ViT-B's
    # budget of 196 (a 300 px square got 13 x 13 patches, not 14 x 14).
    grid_h = max(1, min(max_patches, math.isqrt(max_patches * height // width)))
    grid_w = max(1, min(max_patches // grid_h, math.isqrt(max_patches * width // height)))
    return grid_h, grid_w


def _normalised(image, size: tuple[int, int], mean, std, interpolation: str, rescale: float | None) -> torch.Tensor:
    """``[3, H, W]`` float32: the RGB ``PIL.Image`` resized to ``size`` (height, width), rescaled and normalised."""
    import numpy as np
    from PIL import Image

    resample = getattr(Image.Resampling, interpolation.upper(), Image.Resampling.BICUBIC)
    image = image.resize((size[1], size[0]), resample)
    pixels = rescaled(torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1), rescale)
    return (pixels - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]


@dataclass(frozen=True)
class NativeFeed:
    """How one model takes images at their own aspect ratio.

    Attributes:
        kind: ``"siglip2"``, ``"naflexvit"``, ``"qwen"``, ``"pixtral"`` (several grids per forward) or
            ``"dynamic"`` (one image per forward).
        patch: pixels per patch.
        max_patches: the token budget of one image.
        mean, std, interpolation: the model's normalisation and resampling filter.
        processor: the image processor's settings of SigLIP2, the Qwen towers and Pixtral, else None.
        channels_last: timm NaFlexViT's patch layout ``(p, p, C)`` (else ``(C, p, p)``).
        rescale: from 0-255 values to those ``mean`` and ``std`` apply to (``Preprocessing.rescale``); None: / 255.
        alpha_on_white: transparency composited onto white (``Preprocessing.alpha_on_white``), else dropped.
    """

    kind: str
    patch: int
    max_patches: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str
    processor: dict | None = None
    channels_last: bool = True
    rescale: float | None = None
    alpha_on_white: bool = False

    def to_dict(self) -> dict:
        """The settings that shape the result (``mad.json``'s ``settings.preprocessing``)."""
        found = {"native": self.kind, "patch": self.patch, "max_patches": self.max_patches, "mean": list(self.mean),
                 "std": list(self.std), "interpolation": self.interpolation}
        if self.kind in ("qwen", "pixtral"):  # the processor's size rule (min / max pixels, longest edge)
            # and the processor's class where the tower names its own (MiniMax-M3-VL, Cosmos3-Edge, LFM3-VL, ...)
            found["processor"] = {k: v for k, v in self.processor.items() if k in (
                "size", "min_pixels", "max_pixels", "max_image_tokens", "merge_size", "image_processor_type")}
        if self.rescale is not None:  # only then: other runs keep their settings and fingerprints
            found["rescale"] = self.rescale
        if self.alpha_on_white:
            found["alpha_on_white"] = True
        return found

    def _packed(self, image):
        """The model's own processor on one image: Qwen ``(patches [h * w, D], (h, w))``, Pixtral ``[3, H, W]``."""
        found = packed_processor(self.kind, self.processor)([image], return_tensors="pt")
        if self.kind == "pixtral":
            return found["pixel_values"][0]
        return found["pixel_values"], tuple(int(v) for v in found["image_grid_thw"][0, 1:])

    def prepare(self, image):
        """One decoded RGB image as this model's per-image input (SigLIP2's processor works on the batch)."""
        if self.kind == "siglip2":
            return image
        if self.kind in ("qwen", "pixtral"):
            return self._packed(image)
        if self.kind == "naflexvit":
            from timm.data.naflex_transforms import get_image_size_for_seq, patchify_image

            _, size = get_image_size_for_seq((image.height, image.width), self.patch, self.max_patches)
            pixels = _normalised(image, size, self.mean, self.std, self.interpolation, self.rescale)
            return patchify_image(pixels, (self.patch, self.patch), channels_last=self.channels_last)
        grid = native_grid(image.height, image.width, self.patch, self.max_patches)
        return _normalised(image, (grid[0] * self.patch, grid[1] * self.patch), self.mean, self.std,
                           self.interpolation, self.rescale)

    def display(self, image) -> torch.Tensor:
        """``[3, H, W]`` the image as the model sees it (normalised like the model input), for ``mad_map.png``."""
        if self.kind == "pixtral":
            return self._packed(image)
        if self.kind == "qwen":
            patches, grid = self._packed(image)
            merge = 1 if row_major(self.processor) else int(self.processor["merge_size"])
            return qwen_unpatch(patches.reshape(patches.shape[0], -1), grid, self.patch, merge,
                                int(self.processor["temporal_patch_size"]), channels_last(self.processor),
                                temporal_first(self.processor))
        if self.kind == "siglip2":
            from transformers.models.siglip2.image_processing_siglip2 import get_image_size_for_max_num_patches

            size = get_image_size_for_max_num_patches(image.height, image.width, self.patch, self.max_patches)
        elif self.kind == "naflexvit":
            from timm.data.naflex_transforms import get_image_size_for_seq

            _, size = get_image_size_for_seq((image.height, image.width), self.patch, self.max_patches)
        else:
            grid = native_grid(image.height, image.width, self.patch, self.max_patches)
            size = grid[0] * self.patch, grid[1] * self.patch
        return _normalised(image, tuple(size), self.mean, self.std, self.interpolation, self.rescale)

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
        elif self.kind == "qwen":  # the images' patches one after the other, each image's grid in grid_thw
            patches = torch.cat([p for p, _ in items])
            grid_thw = torch.tensor([[1, h, w] for _, (h, w) in items])
            call_packed(loaded.module, patches.to(device=device, dtype=dtype), grid_thw.to(device))
        elif self.kind == "pixtral":  # padded at the bottom and right, as PixtralImageProcessor pads a batch
            height, width = max(p.shape[1] for p in items), max(p.shape[2] for p in items)
            pixels = torch.zeros(len(items), 3, height, width)
            for i, p in enumerate(items):
                pixels[i, :, :p.shape[1], :p.shape[2]] = p
            sizes = torch.tensor([list(p.shape[1:]) for p in items])
            loaded.module(pixels.to(device=device, dtype=dtype), image_sizes=sizes.to(device))
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


def check_fixed_size(loaded: LoadedModel, size: tuple[int, int] | None = None, pixels: bool = False) -> None:
    """Refuse a model that takes only patches its processor cut at each image's own size (SigLIP2) when images
    are to be fed at one size, and a packed tower (Qwen, Pixtral) fed image files without a size or at a size
    that is not whole patches.

    Args:
        size: the ``image_size`` asked for (None: the model's own).
        pixels: the images are preprocessed pixels (their size is checked when the tower runs).

    Raises:
        OptionError: (``image_size``) the model is SigLIP2's NaFlex vision tower, or a packed tower without a size
            (for image files) or at a size it cannot take.
    """
    from ..recording.families.naflex import towers

    packed = find_packed_tower(loaded.module)
    if packed is not None:
        tower = packed[1]
        kind = tower_kind(tower)
        if size is not None:
            check_packed_size(kind, tower, *size, "image_size")
        elif not pixels:
            patch, merge, _ = tower_sizes(tower)
            multiple = patch * merge
            raise OptionError("image_size", f"{type(tower).__name__} has no input size of its own: use "
                                            "image_size='native' (--image-size native) to feed each image at its own "
                                            f"aspect ratio, or a fixed S or HxW (multiples of {multiple} px)")
        return

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
    packed = find_packed_tower(module)
    if packed is not None:
        return _packed_feed(loaded, packed[1])
    tower = next(iter(towers(module).values()), None)
    if tower is not None and type(tower).__name__ == "Siglip2VisionModel":
        settings = dict(loaded.processor or {})
        settings.setdefault("patch_size", int(tower.config.patch_size))
        settings = {k: v for k, v in settings.items() if k not in ("image_processor_type", "processor_class")}
        from transformers import Siglip2ImageProcessor

        processor = Siglip2ImageProcessor(**settings)
        return NativeFeed("siglip2", int(processor.patch_size), int(processor.max_num_patches),
                          tuple(processor.image_mean), tuple(processor.image_std),
                          _filter_name(processor.resample), settings, rescale=hf_rescale(processor),
                          alpha_on_white=processor.do_convert_rgb is True)
    if prep is None:
        raise OptionError("image_size", f"native: {name} has no known preprocessing (mean, std, input size)")
    if tower is not None:  # timm NaFlexVit
        embeds = tower.embeds
        patch = int(embeds.patch_size[0])
        budget = (prep.size[0] // patch) * (prep.size[1] // patch)
        return NativeFeed("naflexvit", patch, budget, prep.mean, prep.std, prep.interpolation,
                          channels_last=bool(getattr(embeds, "channels_last", True)), rescale=prep.rescale)
    embedding = find_patch_embedding(module)
    dynamic = bool(getattr(module, "dynamic_img_size", False)) or loaded.accepts_any_size
    non_square = non_square_table_said(module)
    if non_square is not None:
        raise OptionError("image_size", f"native: {non_square}")
    if embedding is None or not dynamic:
        raise OptionError(
            "image_size",
            f"native: {name} takes one input size; native resolution needs a NaFlex model (SigLIP2, timm "
            "naflexvit_*) or a ViT whose position embedding follows the input (timm dynamic_img_size=True, "
            "transformers interpolate_pos_encoding)",
        )
    patch = int(embedding[1].kernel_size[0])
    budget = (prep.size[0] // patch) * (prep.size[1] // patch)
    return NativeFeed("dynamic", patch, budget, prep.mean, prep.std, prep.interpolation, rescale=prep.rescale,
                      alpha_on_white=prep.alpha_on_white)


def _packed_feed(loaded: LoadedModel, tower) -> NativeFeed:
    """The feed of a Qwen or Pixtral tower: its processor's settings (checked against the tower when loaded)."""
    from .packed_towers import processor_settings

    kind = tower_kind(tower)
    settings = processor_settings(kind, tower, loaded.processor)
    processor = packed_processor(kind, settings)
    tokens = getattr(processor, "max_image_tokens", None) if kind == "qwen" else None
    if tokens is None:
        size = {k: int(processor.size[k]) for k in ("shortest_edge", "longest_edge") if processor.size.get(k)}
        settings = settings | {"size": size}  # the effective size rule, whichever keys the checkpoint used
    else:  # Muse Glimmer's: no size, a cap on merged tokens
        settings = settings | {"max_image_tokens": int(tokens)}
    if kind == "qwen":
        patch = int(processor.patch_size)
        budget = (int(processor.size["longest_edge"]) // (patch * patch) if tokens is None
                  else int(tokens) * int(processor.merge_size) ** 2)
        settings = settings | {"merge_size": int(processor.merge_size),
                               "temporal_patch_size": int(processor.temporal_patch_size)}
    else:
        # PixtralImageProcessor takes patch_size as {"height", "width"} or one int (checked square against the
        # tower by processor_settings).
        given = processor.patch_size
        patch = int(given["height"] if isinstance(given, dict) else given)
        budget = (int(processor.size["longest_edge"]) // patch) ** 2
    mean, std = tuple(processor.image_mean), tuple(processor.image_std)
    if not processor.do_normalize:
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    return NativeFeed(kind, patch, budget, mean, std, _filter_name(processor.resample), settings,
                      rescale=hf_rescale(processor), alpha_on_white=processor.do_convert_rgb is True)


def load_native_batch(paths: Sequence[Path], feed: NativeFeed, pool: Executor | None = None
                      ) -> tuple[list | None, list[Path], list[tuple[Path, str]]]:
    """Decode and prepare a batch of files at their own aspect ratio, setting unreadable ones aside.

    Returns:
        ``(items, loaded, skipped)`` as :func:`~.images.load_batch`, with one prepared input per loaded file
        instead of a stacked tensor (``None`` if nothing loaded).
    """

    def one(path: Path):
        image, reason = load_image(path, feed.alpha_on_white)
        if image is None:
            return None, reason
        try:
            return feed.prepare(image), None
        except ValueError as err:
            # An image the model's own processor cannot take (Ovis2.5's smart_resize makes a 10 x 200 px image 0
            # px wide, then refuses it): set aside with the processor's reason, as load_batch does for the fixed
            # preprocessing, not the end of the run (QA helper-140).
            return None, f"the model's image processor refuses it ({error_said(err)})"

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
        for key in ("image_grids", "frames", "image_frames"):  # per image or clip of one batch (image_grids, later)
            found.pop(key, None)
        geometry.append(found | {"grid": None})
    return torch.cat(mad, dim=1), geometry, images
