"""Images for ``vitmad profile``: finding them, decoding them (skipping broken files) and preprocessing them
the way the model expects.

Every image source resolves to a sorted list of files, so a run is deterministic: the same files in the
same batches, which is what makes ``--resume`` and sharding over processes exact.
"""

from __future__ import annotations

import math
import numbers
import os
import stat
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path

import torch

from .options import OptionError, import_optional, missing_path

__all__ = [
    "IMAGE_EXTENSIONS",
    "BUILTIN_IMAGES",
    "Preprocessing",
    "builtin_image_paths",
    "find_images",
    "parse_image_size",
    "NATIVE",
    "load_image",
    "load_batch",
    "load_each",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm",
                    ".pbm", ".pnm")

# Photographs shipped inside scikit-image (no download): portraits, animals, objects, scenes, textures,
# astronomy, microscopy, so heads that look at different scales all have something to look at.
BUILTIN_IMAGES = (
    "astronaut.png",
    "camera.png",
    "chelsea.png",
    "coffee.png",
    "rocket.jpg",
    "motorcycle_left.png",
    "coins.png",
    "moon.png",
    "hubble_deep_field.jpg",
    "ihc.png",
    "retina.jpg",
    "brick.png",
    "grass.png",
    "gravel.png",
)

# image_size="native": every image at its own aspect ratio (profiling/native.py).
NATIVE = "native"

_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


def builtin_image_paths() -> list[Path]:
    """The real photographs bundled with scikit-image, as files.

    Raises:
        ModuleNotFoundError: scikit-image is not installed (``pip install "vitmad[profile]"``).
    """
    skimage = import_optional("skimage", "profile", "the built-in images (scikit-image's photographs)")
    folder = Path(skimage.__file__).parent / "data"
    return [folder / name for name in BUILTIN_IMAGES if (folder / name).is_file()]


def find_images(sources: str | os.PathLike | Sequence[str | os.PathLike],
                exclude: Collection[str | os.PathLike] = ()) -> list[Path]:
    """Resolve the ``images`` option to a list of files.

    Args:
        sources: ``"builtin"``, a folder (searched recursively for :data:`IMAGE_EXTENSIONS`), a file, or a
            list of folders and files. Files named explicitly are kept whatever their extension.
        exclude: files a folder search leaves out (``vitmad profile``'s own figures, where ``--out`` lies in an
            image folder: a second run would otherwise profile them as photographs).

    Returns:
        Files in a deterministic order: sorted within each folder, sources in the order given, no duplicates.

    Raises:
        FileNotFoundError: a source does not exist.
        ValueError: no image was found.
    """
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    excluded = exclusion(exclude)
    found: list[Path] = []
    for source in sources:
        if str(source) == "builtin":
            found.extend(builtin_image_paths())
            continue
        if not str(source).strip():
            # Path("") is the working folder: an unset variable in a job script must not profile it.
            raise OptionError("images", f"expected a folder, a file or builtin, got {str(source)!r}")
        path = Path(source).expanduser()  # "~/val" from Python, as the shell expands it for the command
        if path.is_dir():
            files = sorted(p for p in folder_files(path) if p.suffix.lower() in IMAGE_EXTENSIONS and not excluded(p))
            if not files:
                from .videos import VIDEO_EXTENSIONS  # (videos imports this module)

                clips = any(p.suffix.lower() in VIDEO_EXTENSIONS for p in folder_files(path))
                raise OptionError(  # a folder of clips for an image model: said so (QA 294)
                    "images", f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in folder {path}"
                    + ("; it holds video clips, which a video model takes" if clips else "")
                )
            found.extend(files)
        elif path.exists() or path.is_symlink():
            # A dangling link, a named pipe, a device: listed as skipped, with the reason (a pipe was "no such file
            # or folder", QA 322).
            found.append(path)
        else:
            raise missing_path(source)
    unique = distinct_inputs(found)
    if not unique:
        raise OptionError("images", "no images given")
    return unique


def distinct_inputs(paths: Sequence[Path]) -> list[Path]:
    """``paths`` as inputs (:func:`absolute_input`), each file once in the order first found: a file reached twice,
    through a link or a hard link (one file under two names, as datasets link to save space: profiled twice, QA
    421), is one input. A dangling link stays itself: resolved, it would name a file that is not there."""
    kept, seen = [], set()
    for path in dict.fromkeys(map(absolute_input, paths)):
        try:
            status = path.stat()
            key = (status.st_dev, status.st_ino) if stat.S_ISREG(status.st_mode) else path
        except (OSError, ValueError):
            key = path
        if key not in seen:
            seen.add(key)
            kept.append(path)
    return kept


def absolute_input(path: Path) -> Path:
    """``path`` resolved (a file reached twice is one input), or absolute where it does not resolve to a path that
    exists: a dangling link stays itself, and ``/dev/stdin`` resolved names a pipe as ``/proc/<pid>/fd/pipe:[N]``, no
    file (QA 326), where itself it is the pipe, skipped as one."""
    if not path.exists():  # (a link loop, which resolve() refuses)
        return path.absolute()
    resolved = path.resolve()
    return resolved if resolved.exists() else path.absolute()


def walk_folders(folder: Path):
    """``(folder, names of its non-folder entries)`` for ``folder`` and every folder under it, in sorted order,
    following linked folders (a dataset whose class folders are symbolic links, as torchvision's ``ImageFolder``
    reads them), each real folder once (a link to a folder above it is no loop). Hidden entries under it (names
    starting with a dot: ``.ipynb_checkpoints``, ``.thumbnails``, a macOS ``._photo.jpg``) are no inputs: a search
    for images averaged a notebook's checkpoint copies and a file manager's thumbnails in (QA 268), where the video
    search already passed them by."""
    seen = set()
    for root, dirs, names in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = sorted(name for name in dirs if not name.startswith("."))
        yield Path(root), [name for name in names if not name.startswith(".")]


def folder_files(folder: Path) -> list[Path]:
    """Every file under ``folder`` (:func:`walk_folders`). A dangling link is kept: loading it fails, and the run
    lists it among the skipped files with the reason instead of dropping it unseen."""
    return [root / name for root, names in walk_folders(folder) for name in names]


def exclusion(files: Collection[str | os.PathLike]) -> Callable[[Path], bool]:
    """Whether a path found by a folder search is one of ``files``: by name first, so that a search of a large
    folder resolves only the few paths that share a name with them."""
    resolved = {Path(f).resolve() for f in files}
    names = {f.name for f in resolved}
    return lambda path: path.name in names and path.resolve() in resolved


def parse_image_size(text: str | int | Sequence[int] | None) -> tuple[int, int] | str | None:
    """``"224"`` -> ``(224, 224)``, ``"224x320"`` -> ``(224, 320)`` (height x width); ``None`` and
    ``"native"`` (each image at its own aspect ratio) stay as they are.

    Raises:
        ValueError: not ``S``, ``HxW`` with positive integers or ``native``.
    """
    if text is None or text == NATIVE:
        return text
    if _is_integer(text):
        parts = [int(text), int(text)]
    elif isinstance(text, str):
        try:
            parts = [int(p) for p in text.lower().split("x")]
        except ValueError:
            parts = []
        if len(parts) == 1:
            parts = parts * 2
    elif isinstance(text, Sequence) and not isinstance(text, (bytes, bytearray)) and all(
            _is_integer(p) for p in text):  # (b"40" is a sequence of byte values: 52x48, QA 413)
        parts = [int(p) for p in text]
    else:
        # A float (32.5, or 32.7 in a pair) is refused, not truncated: the run would state a size it never used.
        parts = []
    if len(parts) != 2 or min(parts) <= 0:
        raise OptionError("image_size",
                          f"expected S or HxW with positive integers (e.g. 224 or 224x320) or native, got {text!r}")
    from PIL import Image

    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and parts[0] * parts[1] > limit:
        # Every image resized to it would be over PIL's limit: each was skipped as of "too extreme" an aspect
        # ratio, and the run ended with none read (QA 284).
        raise OptionError("image_size", f"{parts[0]}x{parts[1]} px is {parts[0] * parts[1]} pixels, over "
                                        f"PIL.Image.MAX_IMAGE_PIXELS = {limit}, which every resized image must stay "
                                        "under")
    return parts[0], parts[1]


def _is_integer(value) -> bool:
    """An int (numpy's too), not a bool: True is no image size."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


@dataclass(frozen=True)
class Preprocessing:
    """Eval preprocessing of one model: resize, centre crop, scale to [0, 1], normalise.

    Attributes:
        size: ``(height, width)`` of the model input.
        resize: ``("shortest", S)`` resizes the short side to ``S`` keeping the aspect ratio; ``("exact", H, W)``
            resizes to ``H x W``; ``("keep_ratio", H, W)`` keeps the aspect ratio and just covers ``H x W`` (timm's
            ``ResizeKeepRatio``); ``("fit", H, W)`` keeps the aspect ratio and just fits inside ``H x W`` (the same
            at ``longest=1``, timm's "border" crop mode); ``("longest", S, M)`` scales the long side to ``S``, the
            short one to ``round(short * S / long)``, at least ``M`` (the Janus and DeepSeek-VL processors, which then
            pad to a square); ``("long_side", S)`` scales the long side to ``S``, the short one to
            ``int(short * S / long + 0.5)``, rounding half up (segment_anything's ``ResizeLongestSide``);
            ``("cover",)`` scales so the image just covers ``size``, the other side ``int(side * scale)`` (at least
            ``size``'s), as torchvision's ``Resize(S)``;
            ``("none",)`` keeps the image's size (a transformers processor with ``do_resize=false``): an image that
            does not come at ``size`` (or, with the centre crop, at least ``size``) is refused.
        center_crop: crop the centre ``size`` after resizing.
        mean, std: per-channel normalisation on [0, 1] pixel values.
        interpolation: PIL resampling filter name (``"bicubic"``, ``"bilinear"``, ...).
        crop_rounding: where an odd margin puts the centre crop: ``"floor"`` (transformers' ``center_crop``:
            ``(H - h) // 2``) or ``"round"`` (torchvision's ``CenterCrop``, timm's eval transform:
            ``round((H - h) / 2)``, half to even).
        pad_fill: the RGB colour (0-255) that pads the resized image to ``size`` where it falls short, before the
            centre crop (timm's ``CenterCropOrPad`` in its "border" crop mode, the mean colour); ``None``: no
            padding.
        rescale: the factor from 0-255 pixel values to the values ``mean`` and ``std`` apply to (a transformers
            processor's ``rescale_factor``, 1 with ``do_rescale=false``); ``None``: divided by 255.
        rescale_offset: subtracted after the rescaling (ViViT's processor, ``offset=True``: ``x / 127.5 - 1``);
            ``None``: nothing.
        antialias: resize with PIL (which low-pass filters when it shrinks); False: interpolate the 0-255 values
            as floats without that filter, rounded back to integers, as torchvision's video presets
            (``VideoClassification``) resize the uint8 frames of a video tensor (``antialias=False``); no
            ``pad_fill`` with it (that path pads nothing).
        pad_normalised: pad the normalised image with zeros at the bottom and right up to ``size`` (segment_anything's
            ``Sam.preprocess``, which pads after its normalisation: the padding is the mean colour, a value no 0-255
            pixel has); only after a ``("long_side", S)`` resize to a square ``size`` of ``S``.
        float_resize: rescale the 0-255 values first (``rescale``) and resize those floats with torch's
            ``interpolate``, antialiased, not rounded back to integers (torchvision's ``Resize`` on the float tensor
            ``ToTensor`` gives: SAM 2's ``SAM2Transforms``).
        alpha_on_white: an image with transparency is composited onto white (a transformers processor with
            ``do_convert_rgb``: its ``convert_to_rgb``); False: the alpha channel is dropped, the colours under it
            kept (PIL's ``convert("RGB")``, as timm's and torchvision's loaders read a file).
    """

    size: tuple[int, int]
    resize: tuple
    center_crop: bool
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    crop_rounding: str = "floor"
    pad_fill: tuple[int, int, int] | None = None
    rescale: float | None = None
    rescale_offset: float | None = None
    antialias: bool = True
    pad_normalised: bool = False
    float_resize: bool = False
    alpha_on_white: bool = False

    def __post_init__(self) -> None:
        if not self.antialias and self.pad_fill is not None:
            # The float resize of torchvision's video presets has no padding step: this would be a silent no-pad.
            raise ValueError("Preprocessing: antialias=False resizes as torchvision's video presets do, which pad "
                             f"nothing; got pad_fill={self.pad_fill}")
        if self.float_resize and (not self.antialias or self.pad_fill is not None
                                  or self.interpolation not in ("bilinear", "bicubic")):
            # That path resizes antialiased (which torch's interpolate does for these two filters only) and pads
            # nothing before normalising.
            raise ValueError("Preprocessing: float_resize resizes antialiased floats, bilinear or bicubic, and pads "
                             f"nothing; got antialias={self.antialias}, interpolation={self.interpolation!r}, "
                             f"pad_fill={self.pad_fill}")
        if self.pad_normalised and (self.resize[0] != "long_side" or self.size != (self.resize[1],) * 2
                                    or self.center_crop or self.pad_fill is not None):
            # Any other resize could leave the image larger than size, or padded twice.
            raise ValueError("Preprocessing: pad_normalised pads a ('long_side', S) resize to an S x S size, "
                             f"nothing else; got resize={self.resize}, size={self.size}, "
                             f"center_crop={self.center_crop}, pad_fill={self.pad_fill}")

    def with_size(self, size: tuple[int, int]) -> Preprocessing:
        """The same statistics and filter for another input size (``image_size``): scale to cover, crop."""
        return Preprocessing(tuple(size), ("cover",), True, self.mean, self.std, self.interpolation,
                             self.crop_rounding, rescale=self.rescale, rescale_offset=self.rescale_offset,
                             antialias=self.antialias, float_resize=self.float_resize,
                             alpha_on_white=self.alpha_on_white)

    def to_dict(self) -> dict:
        settings = {
            "size": list(self.size),
            "resize": list(self.resize),
            "center_crop": self.center_crop,
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": self.interpolation,
            "crop_rounding": self.crop_rounding,
        }
        if self.pad_fill is not None:  # only then: the settings of runs without padding keep their fingerprint
            settings["pad_fill"] = list(self.pad_fill)
        if self.rescale is not None:  # likewise
            settings["rescale"] = self.rescale
        if self.rescale_offset is not None:
            settings["rescale_offset"] = self.rescale_offset
        if not self.antialias:
            settings["antialias"] = False
        if self.pad_normalised:
            settings["pad_normalised"] = True
        if self.float_resize:
            settings["float_resize"] = True
        if self.alpha_on_white:
            settings["alpha_on_white"] = True
        return settings

    @staticmethod
    def from_hf(processor: dict, config_image_size: int | Sequence[int] | None = None, *,
                own_geometry: bool = True) -> Preprocessing:
        """From a transformers image processor's settings (the ``preprocessor_config.json`` dict).

        Args:
            own_geometry: False when an image size replaces the processor's resize, crop and padding
                (:meth:`with_size`): its statistics, filter and rescaling are all that is read, and a geometry
                this class does not reproduce is no reason to refuse.

        Raises:
            OptionError: (``model``) a processor whose resize, crop or padding this class does not reproduce
                (:func:`hf_geometry_refusal`), or whose pixel values it does not (:func:`hf_values_refusal`).
        """
        refusal = hf_values_refusal(processor) or (hf_geometry_refusal(processor, config_image_size)
                                                     if own_geometry else None)
        if refusal:
            raise OptionError("model", refusal)
        rescale, alpha_on_white = hf_rescale(processor), hf_alpha_on_white(processor)
        mean = tuple(processor.get("image_mean", (0.5, 0.5, 0.5)))
        std = tuple(processor.get("image_std", (0.5, 0.5, 0.5)))
        if not processor.get("do_normalize", True):
            mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
        interpolation = _RESAMPLE.get(processor.get("resample", 2), "bilinear")
        size = hf_size(processor, config_image_size)
        crop = processor.get("crop_size")
        name = hf_processor_class_name(processor)
        # A class whose own code has no crop step takes do_center_crop and crop_size and ignores them: cropping for it
        # fed 32 x 32 where it gives 40 x 48 (QA 228).
        do_crop = bool(processor.get("do_center_crop", False)) and crop is not None and name not in _IGNORES_CROP
        if not own_geometry and not ("height" in size and "width" in size or "shortest_edge" in size):
            size = {"height": 224, "width": 224}  # replaced by the image size: only a placeholder
        if _pads_to_a_centred_square(processor):
            side = int(size["height"])
            return Preprocessing((side, side), ("longest", side, int(processor.get("min_size", 14))), False, mean,
                                 std, interpolation, pad_fill=_janus_background(processor), rescale=rescale,
                                 rescale_offset=hf_rescale_offset(processor),
                                 alpha_on_white=alpha_on_white)
        if name == "ConvNextImageProcessor" and "shortest_edge" in size and own_geometry:
            side = int(size["shortest_edge"])
            crop_pct = float(processor.get("crop_pct") or 224 / 256)
            resizes = processor.get("do_resize", True)
            cropped = resizes and side < 384  # (the crop is part of its resize step)
            resize = ("none",) if not resizes else ("shortest", int(side / crop_pct)) if cropped else (
                "exact", side, side)
            return Preprocessing((side, side), resize, cropped, mean, std, interpolation, rescale=rescale,
                                 rescale_offset=hf_rescale_offset(processor),
                                 alpha_on_white=alpha_on_white)
        if "height" in size and "width" in size:
            resize = ("exact", int(size["height"]), int(size["width"]))
            final = (int(size["height"]), int(size["width"]))
        else:  # {"shortest_edge": S}: hf_geometry_refusal refused the other forms
            resize = ("shortest", int(size["shortest_edge"]))
            final = (int(size["shortest_edge"]),) * 2
        if not processor.get("do_resize", True):
            resize = ("none",)  # as the processor: each image at its own size (then the centre crop, if any)
        if do_crop:
            crop = _pair(crop) if not isinstance(crop, dict) else (int(crop["height"]), int(crop["width"]))
            final = crop
        elif resize[0] == "shortest":
            do_crop = True  # a shortest-edge resize alone gives a size per image: batches need one size
        # DINOv3's processor (torchvision only) resizes the rescaled floats, unclamped: through PIL 15% of the values
        # were over half a level off, and bicubic overshoot was clamped (16 levels; QA 228).
        return Preprocessing(final, resize, do_crop, mean, std, interpolation, rescale=rescale,
                             rescale_offset=hf_rescale_offset(processor),
                             float_resize=name in _RESIZES_FLOATS and interpolation in ("bilinear", "bicubic"),
                             alpha_on_white=alpha_on_white)

    @staticmethod
    def from_timm(data_config: dict) -> Preprocessing:
        """From ``timm.data.resolve_model_data_config(model)``, as timm's eval transform does it.

        Raises:
            OptionError: a ``crop_mode`` other than timm's "center", "squash" and "border".
        """
        _, height, width = data_config["input_size"]
        crop_pct = data_config.get("crop_pct", 1.0) or 1.0
        scale = (math.floor(height / crop_pct), math.floor(width / crop_pct))
        mean = tuple(data_config["mean"])
        # timm's "squash" crop mode resizes to the scaled size, aspect ratio lost, before the centre crop; its
        # "center" mode keeps the ratio: the short side to the scaled size when square, else timm's
        # ResizeKeepRatio (the smaller of the two ratios, so that the image covers the scaled size); its "border"
        # mode fits the image inside the scaled size (the larger ratio) and pads it with the mean colour.
        crop_mode = data_config.get("crop_mode") or "center"
        pad_fill = None
        if crop_mode == "squash":
            resize = ("exact", *scale)
        elif crop_mode == "border":
            resize = ("fit", *scale)
            pad_fill = tuple(round(255 * v) for v in mean)
        elif crop_mode == "center":
            resize = ("shortest", scale[0]) if scale[0] == scale[1] else ("keep_ratio", *scale)
        else:
            raise OptionError("model", f"timm crop_mode {crop_mode!r} is not one this library reproduces "
                                       "('center', 'squash', 'border'); pass an image size (--image-size, image_size=) "
                                       "to scale the images to cover it and crop the centre instead")
        return Preprocessing(
            (height, width),
            resize,
            True,
            mean,
            tuple(data_config["std"]),
            data_config.get("interpolation", "bicubic"),
            "round",  # torchvision's CenterCrop
            pad_fill,
        )

    def __call__(self, image) -> torch.Tensor:
        """Preprocess one RGB ``PIL.Image``.

        Returns:
            ``[3, H, W]`` float32, normalised.
        """
        from PIL import Image

        resample = getattr(Image.Resampling, self.interpolation.upper(), Image.Resampling.BICUBIC)
        height, width = self.size
        w, h = image.size
        if self.resize[0] == "shortest":
            # As transformers' get_resize_output_image_size and torchvision's Resize: the short side exactly S,
            # the long one int(S * long / short) (w * (S / short) can fall a pixel short of S on the short side).
            target = self.resize[1]
            if w <= h:
                new = (target, max(1, int(target * h / w)))
            else:
                new = (max(1, int(target * w / h)), target)
        elif self.resize[0] == "exact":
            new = (self.resize[2], self.resize[1])
        elif self.resize[0] == "none":
            new = (w, h)
            if (w, h) != (width, height) and not (self.center_crop and w >= width and h >= height):
                raise ValueError(f"the model's image processor does not resize (do_resize=false) and this image is "
                                 f"{h}x{w} px, not the model's {height}x{width}; pass an image size (--image-size, "
                                 "image_size=) to have it scaled")
        elif self.resize[0] == "longest":  # as the Janus processor's resize, in its arithmetic
            scale = self.resize[1] / max(w, h)
            new = (max(round(w * scale), self.resize[2]), max(round(h * scale), self.resize[2]))
        elif self.resize[0] == "long_side":  # as ResizeLongestSide.get_preprocess_shape, in its arithmetic
            scale = self.resize[1] * 1.0 / max(w, h)
            new = (int(w * scale + 0.5), int(h * scale + 0.5))
            if min(new) < 1:  # PIL cannot make it (and the package's own predictor fails on it)
                raise ValueError(f"the model's preprocessing scales this {h}x{w} px image's long side to "
                                 f"{self.resize[1]} px and its short side to 0 px: its aspect ratio is too extreme; "
                                 "crop it first")
        elif self.resize[0] in ("keep_ratio", "fit"):  # timm's ResizeKeepRatio at longest=0 / 1, in its arithmetic
            ratios = (h / self.resize[1], w / self.resize[2])
            ratio = min(ratios) if self.resize[0] == "keep_ratio" else max(ratios)
            new = (round(w / ratio), round(h / ratio))
        elif height / h >= width / w:  # cover: the height binds; the other side as torchvision's Resize(S) does it
            # int(S * long / short), as torchvision's Resize, timm at crop_pct 1 and OpenCLIP's preprocess take it at
            # a square size S: rounding instead resampled the crop at another scale where the two differ by a pixel
            # (up to 121 grey levels apart, QA 229).
            new = (max(width, int(height * w / h)), height)
        else:
            new = (width, max(height, int(width * h / w)))
        limit = Image.MAX_IMAGE_PIXELS
        if limit is not None and new[0] * new[1] > limit and new != (w, h):
            # A strip (1 x 3000 px) whose short side is scaled up to the model's: a few kB of file, gigabytes of
            # resized image before the crop. Skipped with the reason, as a decompression bomb is.
            raise ValueError(f"the model's preprocessing resizes this {h}x{w} px image to {new[1]}x{new[0]} px "
                             f"({new[0] * new[1]} pixels, over PIL.Image.MAX_IMAGE_PIXELS = {limit}): its aspect "
                             "ratio is too extreme; crop it first")
        if self.float_resize:
            # As torchvision's Resize on ToTensor's output: the 0-1 floats resized, antialiased, not rounded (its
            # resize returns an image already at the size as it is).
            pixels = rescaled(_pixel_values(image), self.rescale, self.rescale_offset)
            if new != (w, h):
                pixels = torch.nn.functional.interpolate(pixels[None], size=(new[1], new[0]), mode=self.interpolation,
                                                         align_corners=False, antialias=True)[0]
            if self.center_crop:
                left, top = self._crop_origin(new)
                pixels = pixels[:, top:top + height, left:left + width]
        elif new != (w, h) and not self.antialias:
            # As torchvision's video presets resize a uint8 video tensor: the values interpolated as floats without
            # PIL's low-pass filter, rounded back to integers; then its centre crop.
            pixels = _interpolated(_pixel_values(image), new, self.interpolation)
            if self.center_crop:
                left, top = self._crop_origin(new)
                pixels = pixels[:, top:top + height, left:left + width]
        else:
            if new != (w, h):
                image = image.resize(new, resample)
            if self.pad_fill is not None and (new[0] < width or new[1] < height):
                # As timm's center_crop_or_pad and the Janus processor's pad_to_square: the odd pixel of a margin
                # goes right and below.
                left, top = max(0, (width - new[0]) // 2), max(0, (height - new[1]) // 2)
                padded = Image.new("RGB", (max(width, new[0]), max(height, new[1])), self.pad_fill)
                padded.paste(image, (left, top))
                image, new = padded, padded.size
            if self.center_crop:
                left, top = self._crop_origin(new)
                image = image.crop((left, top, left + width, top + height))
            pixels = _pixel_values(image)
        if not self.float_resize:
            pixels = rescaled(pixels, self.rescale, self.rescale_offset)
        mean = torch.tensor(self.mean, dtype=torch.float32)[:, None, None]
        std = torch.tensor(self.std, dtype=torch.float32)[:, None, None]
        normalised = (pixels - mean) / std
        if self.pad_normalised:
            normalised = torch.nn.functional.pad(normalised, (0, width - new[0], 0, height - new[1]))
        return normalised

    def _crop_origin(self, resized: tuple[int, int]) -> tuple[int, int]:
        """The top-left corner of the centre crop in an image of ``resized`` (width, height)."""
        height, width = self.size
        if self.crop_rounding == "round":
            return int(round((resized[0] - width) / 2.0)), int(round((resized[1] - height) / 2.0))
        return (resized[0] - width) // 2, (resized[1] - height) // 2


def _pixel_values(image) -> torch.Tensor:
    """An RGB ``PIL.Image`` as ``[3, H, W]`` float32 values 0-255."""
    import numpy as np

    return torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1)


def _interpolated(pixels: torch.Tensor, size: tuple[int, int], interpolation: str) -> torch.Tensor:
    """``[3, H, W]`` 0-255 values resized to ``size`` (width, height) as torchvision resizes a uint8 tensor with
    ``antialias=False``: ``interpolate`` on floats (half-pixel centres), clamped to 0-255 (bicubic overshoots),
    rounded to integers."""
    corners = None if interpolation == "nearest" else False
    resized = torch.nn.functional.interpolate(pixels[None], size=(size[1], size[0]), mode=interpolation,
                                              align_corners=corners, antialias=False)[0]
    return resized.clamp(0, 255).round()


def hf_rescale(processor) -> float | None:
    """A transformers image processor's rescaling of 0-255 values (its settings dict or the processor): 1 with
    ``do_rescale`` off, its ``rescale_factor`` otherwise; None for the usual 1 / 255 (:func:`rescaled` divides)."""
    get = processor.get if isinstance(processor, dict) else lambda key, default: getattr(processor, key, default)
    if not get("do_rescale", True):
        return 1.0
    factor = float(get("rescale_factor", 1 / 255))
    return None if factor == 1 / 255 else factor


def hf_rescale_offset(processor: dict) -> float | None:
    """What a transformers image or video processor subtracts after rescaling: 1 for ViViT's (``x / 127.5 - 1``),
    else None. VivitImageProcessor does so by its ``offset`` setting, True by default; VivitVideoProcessor always
    (its own ``rescale_and_normalize``), and its saved settings hold no ``offset``: a checkpoint saved with it was
    fed every pixel 2.0 too high after normalising, its MAD silently another (QA 226)."""
    if not processor.get("do_rescale", True):
        return None
    kind = hf_processor_class_name(processor, video=True)
    if kind == "VivitVideoProcessor" or processor.get("offset", kind == "VivitImageProcessor"):
        return 1.0
    return None


# What transformers 5.25 image processors with code of their own do to the geometry that Preprocessing does not
# reproduce (class names as saved in preprocessor_config.json, without the "Pil" of their PIL backend). A class with
# its own resize, pad or pipeline that is neither here nor in _CHECKED_OWN_CODE is refused too, in general words.
_PADS_TO_A_CENTRED_SQUARE = ("JanusImageProcessor", "DeepseekVLImageProcessor")
_DETR_LIKE = ("resizes each image to a shortest and a longest edge at its own aspect ratio and pads the batch to its "
              "largest image (bottom and right)")
_TILES = "cuts each image into tiles or patches of its own grid"
_OWN_GEOMETRY = {
    "Owlv2ImageProcessor": "pads each image at the bottom and right to a square, then resizes it with a Gaussian "
                           "anti-aliasing filter and scipy's zoom, not PIL",
    "DeepseekVLHybridImageProcessor": "fits each image in high_res_size and pads it to a square, then resizes that "
                                      "square to size (two resizes)",
    "DepthProImageProcessor": "resizes normalised floats without anti-aliasing",
    **dict.fromkeys(("DetrImageProcessor", "ConditionalDetrImageProcessor", "DeformableDetrImageProcessor",
                     "GroundingDinoImageProcessor", "YolosImageProcessor", "RfDetrImageProcessor",
                     "MaskFormerImageProcessor", "Mask2FormerImageProcessor", "OneFormerImageProcessor"), _DETR_LIKE),
    "EomtImageProcessor": "resizes the longest edge and pads, or splits the image into square crops",
    "ViltImageProcessor": "resizes to a shortest edge with a cap on the longest, to a multiple of size_divisor, and "
                          "pads the batch to its largest image",
    "BridgeTowerImageProcessor": "resizes to a shortest edge with a cap on the longest, to a multiple of "
                                 "size_divisor, and pads the batch to its largest image",
    "DonutImageProcessor": "turns an image to align its long axis, shrinks it to a thumbnail and pads it to the size",
    "NougatImageProcessor": "crops the margins, shrinks the image to a thumbnail and pads it to the size",
    "ZoeDepthImageProcessor": "resizes at the image's aspect ratio to a multiple of ensure_multiple_of and pads by "
                              "reflection",
    "GLPNImageProcessor": "rounds each image's size down to a multiple of size_divisor",
    "Swin2SRImageProcessor": "pads each image by reflection to a multiple of its window size",
    "VitMatteImageProcessor": "pads each image to a multiple of size_divisor and takes a trimap as a fourth channel",
    "TextNetImageProcessor": "resizes to a shortest edge, rounding the other to a multiple of size_divisor",
    "PerceiverImageProcessor": "crops the centre at crop_size / size of the shorter side before resizing",
    "LevitImageProcessor": "resizes the shortest edge to 256 / 224 of the size before its centre crop",
    "PoolFormerImageProcessor": "resizes the shortest edge to size / crop_pct before its centre crop",
    "SuperPointImageProcessor": "turns images grey",
    "DeepseekOcr2ImageProcessor": "pads to a square and cuts tiles",
    **dict.fromkeys(("LlavaNextImageProcessor", "LlavaOnevisionImageProcessor", "MllamaImageProcessor",
                     "Idefics2ImageProcessor", "Idefics3ImageProcessor", "SmolVLMImageProcessor",
                     "AriaImageProcessor", "FuyuImageProcessor", "GraniteDoclingImageProcessor",
                     "Llama4ImageProcessor", "Cohere2VisionImageProcessor"), _TILES),
}
# Classes of _CHECKED_OWN_CODE (below) whose own pipeline has no centre crop, whatever do_center_crop says.
_IGNORES_CROP = frozenset({"SegformerImageProcessor", "Gemma3ImageProcessor", "RTDetrImageProcessor",
                           "SegGptImageProcessor", "GotOcr2ImageProcessor", "PromptDepthAnythingImageProcessor"})
# Classes of _CHECKED_OWN_CODE that resize the rescaled floats (torchvision's resize of a float tensor,
# antialiased): for these, Preprocessing's float_resize gives their pixels exactly (SAM 2's, SAM 3's and Sapiens2's
# agree better with PIL's resize of the 0-255 values: measured, QA 228).
_RESIZES_FLOATS = frozenset({"DINOv3ViTImageProcessor"})
# Processors with code of their own whose geometry this library checked to be its own, on images of odd sizes
# (tests/profiling/test_profile_hf_processors.py; ViViT and SigLIP2 with their video and native paths), as long as
# the settings _GEOMETRY_SETTINGS names, and do_pad, are off.
_CHECKED_OWN_CODE = frozenset({
    "BeitImageProcessor", "FlavaImageProcessor", "SegformerImageProcessor", "SegGptImageProcessor",
    "MobileNetV2ImageProcessor", "VideoMAEImageProcessor", "VivitImageProcessor", "RTDetrImageProcessor",
    "Gemma3ImageProcessor", "GotOcr2ImageProcessor", "Ovis2ImageProcessor", "LlavaImageProcessor",
    "DPTImageProcessor", "PromptDepthAnythingImageProcessor", "Siglip2ImageProcessor", *_PADS_TO_A_CENTRED_SQUARE,
    # Its resize: below 384 px the shortest edge to int(size / crop_pct), then the centre size x size; from 384 px a
    # squash to size x size (Preprocessing.from_hf reads it so: CvT's checkpoints, QA 273).
    "ConvNextImageProcessor",
    # torchvision only (no PIL backend): resized from floats, within one level in 255 of PIL's resize
    "DINOv3ViTImageProcessor", "Sam2ImageProcessor", "Sam3ImageProcessor", "Sapiens2ImageProcessor",
})
# Settings that, on, change the geometry in a way Preprocessing does not reproduce, whatever the class.
_GEOMETRY_SETTINGS = {
    "keep_aspect_ratio": "resizes at each image's aspect ratio",
    "do_thumbnail": "shrinks each image to a thumbnail",
    "do_align_long_axis": "turns images to align their long axis",
    "do_pan_and_scan": "adds crops of each image (pan and scan)",
    "crop_to_patches": "cuts each image into patches",
    "do_image_splitting": "splits each image into tiles",
    "size_divisor": "rounds the size to a multiple of size_divisor",
}
# Classes whose size_divisor only sets the multiple their centred pad reaches (do_pad), never the resize: with
# do_pad off it changes nothing.
_SIZE_DIVISOR_ONLY_PADS = frozenset({"DPTImageProcessor", "PromptDepthAnythingImageProcessor"})


def hf_processor_class_name(processor: dict, *, video: bool = False) -> str:
    """The class a processor's settings name (``"ViTImageProcessor"``; with ``video``, a video processor's
    ``video_processor_type`` first), without the ``Pil`` or ``Fast`` of a backend; ``""`` when none is named."""
    name = str((video and processor.get("video_processor_type")) or processor.get("image_processor_type") or "")
    for suffix in ("Pil", "Fast"):
        name = name.removesuffix(suffix)
    return name


def hf_alpha_on_white(processor: dict) -> bool:
    """Whether a transformers image processor composites transparency onto white: its ``do_convert_rgb``, else its
    class's default (``CLIPImageProcessor``'s and ``BitImageProcessor``'s True, ``ViTImageProcessor`` none). Fed
    with the alpha channel dropped, a logo whose transparent half is stored black was black where the model's own
    processor makes it white: 72.8 px off on one head (QA 268)."""
    given = processor.get("do_convert_rgb")
    if given is None:
        try:
            import transformers

            # Without Pillow, transformers gives a stand-in class whose attributes raise ImportError (QA 296: an
            # hf: spec crashed with it, even over a pixel tensor); without Pillow no image file is decoded either.
            given = getattr(getattr(transformers, hf_processor_class_name(processor), None), "do_convert_rgb", None)
        except ImportError:
            return False
    return given is True


def _own_code(name: str) -> list[str] | None:
    """The preprocessing steps a transformers image processor class (its PIL backend where it has one, which vitmad
    follows) defines itself instead of inheriting the generic ones; None when transformers has no such class."""
    try:
        import transformers
        from transformers.image_processing_backends import PilBackend, TorchvisionBackend
        from transformers.image_processing_utils import BaseImageProcessor
        from transformers.models.auto.image_processing_auto import get_image_processor_class_from_name
    except ImportError:
        return None
    cls = getattr(transformers, name + "Pil", None) or get_image_processor_class_from_name(name)
    if cls is None:
        return None
    # A legacy class (BaseImageProcessor, no backend) holds its whole pipeline in preprocess; a backend class
    # overrides preprocess only to document it.
    steps = ("resize", "pad", "center_crop", "_preprocess", "_preprocess_image_like_inputs")
    if not issubclass(cls, (PilBackend, TorchvisionBackend)):
        steps += ("preprocess",)
    own = []
    for base in cls.__mro__:
        if base in (PilBackend, TorchvisionBackend, BaseImageProcessor):
            break
        own += [step for step in steps if step in vars(base) and step not in own]
    return own


def hf_size(processor: dict, config_image_size: int | Sequence[int] | None = None) -> dict:
    """A processor's ``size`` as a dict (an int or pair from older files as ``height`` and ``width``); the model
    config's image size, else 224, when it has none."""
    size = processor.get("size") or config_image_size or 224
    if isinstance(size, int) or (isinstance(size, Sequence) and not isinstance(size, dict)):
        size = {"height": _pair(size)[0], "width": _pair(size)[1]}
    return {key: value for key, value in size.items() if value is not None}


def _pads_to_a_centred_square(processor: dict) -> bool:
    return hf_processor_class_name(processor) in _PADS_TO_A_CENTRED_SQUARE and bool(processor.get("do_pad", True))


def _janus_background(processor: dict) -> tuple[int, int, int]:
    """The colour the Janus and DeepSeek-VL processors pad with: ``int(255 * mean)`` of their ``image_mean``, which
    their constructor derives it from whatever ``background_color`` says; grey 127 without a mean."""
    mean = processor.get("image_mean")
    return (127, 127, 127) if mean is None else tuple(int(x * 255) for x in mean)


def hf_geometry_refusal(processor: dict, config_image_size: int | Sequence[int] | None = None) -> str | None:
    """Why :class:`Preprocessing` cannot resize, crop and pad as a transformers image processor does (its settings
    dict), in a message saying what to do instead; None when it can."""
    name = hf_processor_class_name(processor)
    label = name or "image processor"
    size = hf_size(processor, config_image_size)
    what = None
    if name in _OWN_GEOMETRY:
        what = f"{_OWN_GEOMETRY[name]}"
    elif name:
        own = _own_code(name)
        if own is None and processor.get("do_pad"):
            what = "pads with code this library does not know (do_pad=true; a class transformers does not have)"
        elif own and name not in _CHECKED_OWN_CODE:
            what = f"preprocesses with code of its own ({', '.join(own)})"
    if what is None and name in _SIZE_DIVISOR_ONLY_PADS and processor.get("do_pad"):
        what = "pads each image at its centre to a multiple of size_divisor (do_pad=true)"
    if what is None:
        on = [key for key in _GEOMETRY_SETTINGS if processor.get(key)
              and not (key == "size_divisor" and name in _SIZE_DIVISOR_ONLY_PADS)]
        if on:
            what = f"{_GEOMETRY_SETTINGS[on[0]]} ({on[0]}={processor[on[0]]!r})"
    if what is None and processor.get("ensure_multiple_of", 1) not in (None, 1) and (
            "height" not in size or size["height"] % processor["ensure_multiple_of"]
            or size["width"] % processor["ensure_multiple_of"]):
        what = f"rounds the size {size} to a multiple of {processor['ensure_multiple_of']} (ensure_multiple_of)"
    if what is None and not ("height" in size and "width" in size or list(size) == ["shortest_edge"]):
        what = (f"resizes each image at its own aspect ratio (size {size})" if "longest_edge" in size or
                "max_height" in size else f"has a size {size} this library does not know")
    if what is None and name in _PADS_TO_A_CENTRED_SQUARE and not processor.get("do_pad", True):
        what = "fits each image's longest side to the size and leaves it at its own aspect ratio (do_pad=false)"
    elif what is None and _pads_to_a_centred_square(processor):
        side = size.get("height")
        if not processor.get("do_resize", True):
            what = "pads each image to a square of its own longest side (do_pad=true without do_resize)"
        elif side is None or side != size.get("width") or side < int(processor.get("min_size", 14)):
            what = f"pads to a square of another size than {size} (do_pad=true, min_size={processor.get('min_size')})"
    elif what is None and processor.get("do_pad") and name not in _PADS_TO_A_CENTRED_SQUARE:
        # The generic pad (no code of the class's own) fills the bottom and right up to pad_size, or to the batch's
        # largest image, which at one size for all is none.
        pad = processor.get("pad_size")
        final = processor.get("crop_size") if processor.get("do_center_crop") else size
        if name == "LlavaImageProcessor":
            what = "pads each image to a square with its background colour before resizing (do_pad=true)"
        elif name and _own_code(name):
            what = "pads each image in a way of its own (do_pad=true)"
        elif pad and hf_size({"size": pad}) != hf_size({"size": final}):
            what = f"pads each image at the bottom and right to {pad} (do_pad=true, pad_size)"
    if what is None:
        return None
    if _cuts_tiles(processor):
        # Its pixel values are [images, tiles, 3, H, W], padding tiles among them that the model drops: a tensor fed
        # to profile would count them (QA 260: 10 tiles for 7), and the model's own forward is what places them.
        own = ("or record the model's own forward from Python, with vitmad.record(model) as rec: "
               "model(**processor(images=..., return_tensors='pt')), where each tile the model runs is an image of "
               "rec.mad (the padding tiles it drops are not)")
    else:
        own = ("or profile the model's own processor output from Python: vitmad.profile(model, pixel_values) with "
               "the module and processor(images=..., return_tensors='pt')['pixel_values']")
    return (f"the {label} {what}, which vitmad does not reproduce: pass an image size (--image-size, image_size=) "
            "to scale the images to cover it and crop the centre instead, with the processor's mean, std and filter "
            f"(not the model's own preprocessing), {own}")


# Settings by which a processor cuts each image into several tiles (and may pad their count with blank ones).
_TILING = ("do_image_splitting", "crop_to_patches", "do_pan_and_scan", "image_grid_pinpoints", "split_image")


def _cuts_tiles(processor: dict) -> bool:
    """Whether the processor cuts each image into tiles (Idefics3's splitting, InternVL's and Aya Vision's crops,
    Gemma 3's pan and scan, LLaVA-NeXT's anyres grid)."""
    return any(processor.get(key) for key in _TILING)


def hf_values_refusal(processor: dict) -> str | None:
    """Why :class:`Preprocessing` cannot give the pixel values a transformers image processor gives (other than
    by its geometry), in a message saying what to do instead; None when it can."""
    name = hf_processor_class_name(processor)
    what = None
    if processor.get("do_flip_channel_order"):
        what = "flips the channels to BGR (do_flip_channel_order=true)"
    elif name == "EfficientNetImageProcessor" and (processor.get("include_top", True)
                                                   or processor.get("rescale_offset")):
        what = "normalises twice (include_top=true) or rescales to [-1, 1] (rescale_offset=true)"
    if what is None:
        return None
    return (f"the {name or 'image processor'} {what}, which vitmad does not reproduce: profile the model's own "
            "processor output from Python: vitmad.profile(model, pixel_values) with the module and "
            "processor(images=..., return_tensors='pt')['pixel_values']")


def rescaled(pixels: torch.Tensor, rescale: float | None, offset: float | None = None) -> torch.Tensor:
    """0-255 ``pixels`` times ``rescale``, or divided by 255 when it is None (the bits every run had before
    processors' own factors were read), less ``offset`` when given."""
    values = pixels / 255.0 if rescale is None else pixels * rescale
    return values if offset is None else values - offset


def _pair(value) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    return int(value[0]), int(value[1])


def _stored_bits(image) -> int | None:
    """The bits a sample of a not yet decoded PIL image's file of mode ``I`` stores, from its raw mode: 16 (``I;16*``:
    a PGM of maxval 65535 opens as mode ``I``, like a 32-bit TIFF, and only its raw mode tells them apart), 32
    (``I``, ``I;32*``), or None where the raw mode says neither."""
    tile = getattr(image, "tile", None) or []
    raw = tile[0].args if tile else None
    raw = raw[0] if isinstance(raw, tuple) and raw else raw
    if not isinstance(raw, str):
        return None
    return 16 if raw.startswith("I;16") else 32 if raw == "I" or raw.startswith("I;32") else None


def _to_rgb(image, stored_bits: int | None = None, alpha_on_white: bool = False):
    """RGB with 8 bits a channel. 16-bit greyscale (PIL modes ``I;16*``, ``I`` from a file storing 16 bits
    (``stored_bits``: a PGM), or ``I`` with values above 255) is scaled by 255 / 65535: PIL's ``convert("RGB")``
    clips it at 255, which turns a 16-bit PNG white (and a dark 16-bit PGM, all of its values at most 255, was read
    as 8-bit, 257 times too bright: QA 229). Transparency (an alpha band, a palette's transparent index) is
    composited onto white with ``alpha_on_white`` (transformers' ``convert_to_rgb``), else dropped.

    Raises:
        ValueError: pixels of no known scale: 32-bit floats (mode ``F``) or integers (a 32-bit TIFF: scaled by its
            own maximum, values over 65535 clipped white, QA 421)."""
    import numpy as np
    from PIL import Image

    if image.mode == "I" and stored_bits == 32:
        low, high = image.getextrema()
        raise ValueError(f"32-bit integer pixels (PIL mode I, values {low} to {high}) have no known scale; save the "
                         "image with 8 or 16 bits a channel")
    if image.mode.startswith("I;16") or (image.mode == "I" and (stored_bits == 16 or image.getextrema()[1] > 255)):
        # (values + 128) // 257 rounds values / 257 to nearest (257 is odd: no ties), in place in one integer copy:
        # float64 temporaries of an 8000 x 6000 image took 1.1 GB (QA 268). Mode I may hold any 32-bit value.
        scaled = np.asarray(image).astype(np.int64 if image.mode == "I" else np.uint32)
        scaled += 128
        scaled //= 257
        np.clip(scaled, 0, 255, out=scaled)
        return Image.fromarray(scaled.astype(np.uint8), "L").convert("RGB")
    if image.mode == "F":
        # 32-bit float pixels (a TIFF): PIL truncates them to integers, so values in [0, 1] turned into a black
        # image profiled as any other. Their scale is the file's convention, which the file does not say.
        low, high = image.getextrema()
        raise ValueError(f"floating-point pixels (PIL mode F, values {low:g} to {high:g}) have no known scale; "
                         "save the image with 8 or 16 bits a channel")
    if alpha_on_white and ("A" in image.getbands() or image.info.get("transparency") is not None):
        on_white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(on_white, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


def special_file(path: str | os.PathLike) -> str | None:
    """Why ``path`` is not read: it is a named pipe, a socket or a device (opening a pipe waits for a writer, and a
    run that found one with an image's name in a folder hung for good, QA 322). None for a regular file or folder,
    and for a path that cannot be examined: its loader says why."""
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        return None
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    kind = ("a named pipe (FIFO)" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
            else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a special file")
    return f"{kind}, not a regular file: not read"


def load_image(path: str | os.PathLike, alpha_on_white: bool = False):
    """Decode an image file as RGB, upright as its EXIF orientation says; transparency composited onto white with
    ``alpha_on_white`` (:attr:`Preprocessing.alpha_on_white`), else dropped.

    Returns:
        ``(image, None)``, or ``(None, reason)`` when the file cannot be read or decoded, or claims more pixels
        than ``PIL.Image.MAX_IMAGE_PIXELS`` (a decompression bomb: refused before decoding).
    """
    Image = import_optional("PIL.Image", "profile", "decoding image files")
    ImageOps = import_optional("PIL.ImageOps", "profile", "decoding image files")

    special = special_file(path)  # a frame of a frame folder comes here without load_each
    if special is not None:
        return None, special
    try:
        with Image.open(path) as image:
            # PIL only warns between its limit and twice it, then decodes: a file claiming 100M pixels would
            # still cost gigabytes. Refuse everything over the limit (PIL.Image.MAX_IMAGE_PIXELS; None: none).
            limit = Image.MAX_IMAGE_PIXELS
            if limit is not None and image.width * image.height > limit:
                raise Image.DecompressionBombError(
                    f"image size ({image.width}x{image.height} pixels) exceeds PIL.Image.MAX_IMAGE_PIXELS = "
                    f"{limit}, could be a decompression bomb"
                )
            stored_bits = _stored_bits(image)  # known before decoding only
            image.load()
            # Upright as a viewer shows it (and transformers' load_image gives it): a camera's JPEG is often
            # stored sideways with an EXIF orientation tag.
            ImageOps.exif_transpose(image, in_place=True)
            return _to_rgb(image, stored_bits, alpha_on_white), None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        return None, f"{type(err).__name__}: {err}"
    except ImportError as err:
        # Another library may have replaced PIL.Image.open for the whole process: importing ultralytics makes it
        # fetch a HEIF plugin on the first file PIL cannot identify, and fail with the plugin missing (offline).
        # The file is still one that cannot be decoded here, not the end of the run.
        opener = getattr(Image.open, "__module__", None)
        by = f" (raised by {opener}'s replacement of PIL.Image.open)" if opener and opener != Image.__name__ else ""
        return None, f"{type(err).__name__}: {err}{by}"


def load_batch(
    paths: Sequence[Path], preprocessing: Preprocessing, pool: Executor | None = None
) -> tuple[torch.Tensor | None, list[Path], list[tuple[Path, str]]]:
    """Decode and preprocess a batch of files, setting unreadable ones aside.

    Args:
        pool: threads to decode the files in parallel (PIL releases the GIL while decoding and resizing).

    Returns:
        ``(pixels, loaded, skipped)``: ``pixels`` ``[len(loaded), 3, H, W]`` (``None`` if nothing loaded),
        the files behind its rows, and ``(file, reason)`` for each file skipped.
    """

    def one(path: Path) -> tuple[torch.Tensor | None, str | None]:
        image, reason = load_image(path, preprocessing.alpha_on_white)
        if image is None:
            return None, reason
        try:
            return preprocessing(image), None
        except ValueError as err:  # an image the model's preprocessing cannot take (Preprocessing.resize "none")
            return None, str(err)

    tensors, loaded, skipped = load_each(paths, one, pool)
    return (torch.stack(tensors) if tensors else None), loaded, skipped


def load_each(paths: Sequence[Path], load: Callable, pool: Executor | None = None
              ) -> tuple[list, list[Path], list[tuple[Path, str]]]:
    """``load(path) -> (item, None)`` or ``(None, reason)`` for every path (in ``pool``'s threads when given):
    the items loaded, the paths behind them and ``(path, reason)`` for each one set aside, in order."""

    def read(path: Path):
        special = special_file(path)
        return (None, special) if special is not None else load(path)

    results = list(pool.map(read, paths)) if pool is not None else [read(p) for p in paths]
    items, loaded, skipped = [], [], []
    for path, (item, reason) in zip(paths, results):
        if item is None:
            skipped.append((path, reason))
        else:
            items.append(item)
            loaded.append(path)
    return items, loaded, skipped
