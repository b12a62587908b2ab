"""Videos for ``vitmad profile``: clips (decoded with PyAV) or folders of frames, sampled to the model's frame
count and preprocessed frame by frame with the model's own processor settings.

A video source is a clip file (``.mp4``, ``.webm``, ``.avi``, ``.mkv``, ``.mov``, ``.m4v``, ``.gif`` is an image)
or a folder whose files are images only (its frames, in name order); a folder holding clips or frame folders is
searched recursively. Every source resolves to a sorted list, so runs are deterministic and resumable.

Sampling: ``frames`` indices spread evenly over the whole clip, ``round(i * (n - 1) / (frames - 1))`` (the first
and the last frame included); a clip shorter than ``frames`` repeats frames. The model's frame count is its
config's ``num_frames`` (VideoMAE, ViViT, TimeSformer) or ``frames_per_clip`` (V-JEPA 2); torchvision's MViT takes
the clip length it was built for, its video Swin the length its weights are evaluated at (32).
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
import warnings
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import Executor
from pathlib import Path

import torch

from .images import (
    IMAGE_EXTENSIONS,
    Preprocessing,
    absolute_input,
    distinct_inputs,
    exclusion,
    folder_files,
    load_each,
    load_image,
    walk_folders,
)
from .options import OptionError, import_optional, missing_path
from .torchvision_models import video_frames

__all__ = ["VIDEO_EXTENSIONS", "model_frames", "find_videos", "is_video_source", "without_clips", "sample_indices",
           "load_video", "load_video_batch", "video_processor_settings"]

VIDEO_EXTENSIONS = (".mp4", ".webm", ".avi", ".mkv", ".mov", ".m4v", ".mpg", ".mpeg")


def model_frames(module: torch.nn.Module) -> int | None:
    """The number of frames a video model takes (from its config; torchvision's video models:
    :func:`~vitmad.profiling.torchvision_models.video_frames`), or None for an image model."""
    frames = video_frames(module)
    if frames is not None:
        return frames
    config = getattr(module, "config", None)
    for key in ("num_frames", "frames_per_clip"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def video_processor_settings(folder: str) -> dict:
    """A local model folder's ``video_preprocessor_config.json`` (transformers 5 video processors), or {}."""
    path = Path(folder).expanduser() / "video_preprocessor_config.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _natural_key(path: Path) -> list:
    """Sort key of a frame's name with its numbers by value: frame_2 before frame_10 (and frame_002 before
    frame_010, as a plain sort already has them)."""
    # isdecimal, not isdigit: "²" is a digit that int() refuses, and a frame named so ended the run.
    return [(0, int(part), part) if part.isdecimal() else (1, 0, part)
            for part in re.split(r"(\d+)", path.name) if part]


def frame_files(path: Path) -> list[Path]:
    """The frames of a frame folder: its image files in name order, numbers by value (:func:`_natural_key`);
    hidden files and files of other kinds (a macOS ``.DS_Store``, a ``readme.txt``) are no frames."""
    # A dangling link is a frame that cannot be read (the video is skipped naming it), not one left out unseen.
    # A named pipe too: its video is skipped naming it (images.special_file).
    return sorted((p for p in path.iterdir() if (not p.is_dir() or p.is_symlink()) and not p.name.startswith(".")
                   and p.suffix.lower() in IMAGE_EXTENSIONS), key=_natural_key)


def _is_frame_folder(path: Path, excluded: Callable[[Path], bool] = lambda p: False) -> bool:
    """A folder of frames: image files and no clip or folder beside them (hidden entries, other files and the
    ``excluded`` ones aside)."""
    entries = [p for p in path.iterdir() if not p.name.startswith(".") and not excluded(p)]
    return (any(p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS for p in entries)
            and not any((p.is_dir() and not _holds_no_video(p)) or p.suffix.lower() in VIDEO_EXTENSIONS
                        for p in entries))


def _holds_no_video(folder: Path) -> bool:
    """An empty folder, or a ``vitmad profile`` output folder (its mad.json or checkpoints): inside a frame
    folder (``--out clip/out``) it does not make the frames those of several videos."""
    names = [p.name for p in folder.iterdir() if not p.name.startswith(".")]
    return not names or "mad.json" in names or any(n.startswith("checkpoint") and n.endswith(".pt") for n in names)


def is_video_source(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a clip file, a frame folder or a folder holding any clip."""
    path = Path(path)
    if path.is_file():
        return path.suffix.lower() in VIDEO_EXTENSIONS
    return path.is_dir() and any(p.suffix.lower() in VIDEO_EXTENSIONS for p in folder_files(path))


def without_clips(files: list[Path], model: str, packed: bool,
                  spelled: tuple[str, str] = ("videos=True", "model=..."), stacklevel: int = 2) -> list[Path]:
    """The image files among ``files`` for ``model`` profiling images: a clip named among them was skipped as an
    unidentified image, and the run then refused as reading none, without a word that the model takes no clips
    (QA 290, 294). Refused where they are all clips, else left out and said.

    Args:
        model: the model as the message names it.
        packed: a packed vision tower, which takes clips given alone, as videos.
        spelled: how the caller spells "the sources are videos" and the model parameter (the command's flags).
        stacklevel: the warning's, to point at the caller's call.
    """
    clips = [f for f in files if f.suffix.lower() in VIDEO_EXTENSIONS and f.is_file()]  # a stat for clips alone
    if not clips:
        return files
    shown = ", ".join(map(str, clips[:3])) + (" ..." if len(clips) > 3 else "")
    kind = "a video clip" if len(clips) == 1 else "video clips"
    videos, model_parameter = spelled
    if packed:  # Qwen2-VL and its kin: clips alone (as videos) or images alone
        why = f"{model} takes clips apart from images, given alone with {videos}"
    else:
        why = f"{model} is no video model (no frame count in its config)"
    if len(clips) == len(files):
        raise OptionError("images", f"{shown}: {kind}, and {why}: " + (
            f"pass {'it' if len(clips) == 1 else 'them'} with {videos}" if packed else
            f"it takes images; pass image files, or a video model with {model_parameter}"))
    warnings.warn(f"left out {kind} among the images ({shown}): {why}", stacklevel=stacklevel + 1)
    left_out = set(clips)
    return [f for f in files if f not in left_out]


def _folders(path: Path) -> list[Path]:
    """``path`` and every folder under it, following linked folders (each real folder once), in sorted order."""
    return [root for root, _ in walk_folders(path)]


def find_videos(sources: str | os.PathLike | Sequence[str | os.PathLike],
                exclude: Collection[str | os.PathLike] = ()) -> list[Path]:
    """Every clip file and frame folder under ``sources`` (files or folders), absolute and sorted; a folder
    search leaves the ``exclude`` files out (as find_images), so a folder of ``vitmad profile``'s figures is no
    folder of frames.

    Raises:
        MissingPathError: a source does not exist.
        OptionError: no video was found.
    """
    sources = [sources] if isinstance(sources, (str, os.PathLike)) else list(sources)
    excluded = exclusion(exclude)
    found: set[Path] = set()
    for source in sources:
        path = Path(source).expanduser()
        if not path.exists() and not path.is_symlink():
            raise missing_path(source)
        if not path.is_dir():  # a file; a dangling link or a named pipe: skipped with the reason
            if path.suffix.lower() not in VIDEO_EXTENSIONS:
                raise OptionError("images", f"{source} is not a video file ({', '.join(VIDEO_EXTENSIONS)})")
            found.add(path)
        elif _is_frame_folder(path, excluded):
            found.add(path)
        else:
            for sub in _folders(path):
                # A dangling link to a clip is listed as skipped with its reason, not dropped unseen.
                # (Hidden files are none: macOS's ._a.mp4 resource forks, QA 270; as walk_folders.)
                found.update(p for p in sub.iterdir() if (not p.is_dir() or p.is_symlink())
                             and p.suffix.lower() in VIDEO_EXTENSIONS and not p.name.startswith("."))
                if sub != path and _is_frame_folder(sub, excluded):
                    found.add(sub)
                else:
                    _warn_loose_images(sub, excluded)
    if not found:
        shown = ", ".join(map(str, sources))
        raise OptionError("images", f"found no video ({', '.join(VIDEO_EXTENSIONS)} files or folders of frames) "
                                    f"in {shown}")
    # Absolute, as find_images gives: the same clip once (a hard link too); a dangling link stays itself.
    return distinct_inputs(sorted(set(map(absolute_input, found))))


def _warn_loose_images(folder: Path, excluded: Callable[[Path], bool]) -> None:
    """Image files beside clips or folders are no video's frames: said, as they are left out."""
    images = [p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
              and p.suffix.lower() in IMAGE_EXTENSIONS and not excluded(p)]
    if images:
        warnings.warn(f"{folder}: {len(images)} image files beside clips or folders are left out (a folder of "
                      "frames holds image files only; give each video's frames a folder of their own)",
                      stacklevel=3)


def sample_indices(available: int, frames: int) -> list[int]:
    """``frames`` frame indices spread evenly over ``available`` frames, first and last included."""
    if frames == 1:
        return [0]
    return [round(i * (available - 1) / (frames - 1)) for i in range(frames)]


def load_video(path: Path, frames: int | Callable[[int, float | None], Sequence[int]], alpha_on_white: bool = False):
    """Decode ``frames`` evenly sampled RGB frames (``PIL.Image``) of a clip or a frame folder; or, where ``frames``
    is a function, the frames it picks given the clip's frame count and frame rate (None for a frame folder, or a
    clip whose header gives none), as a packed tower's video processor samples them (``packed_videos``). A frame
    file's transparency is composited onto white with ``alpha_on_white`` (the model's processor's
    ``do_convert_rgb``, which ``mad.json`` states: it said so while the frames were read with their alpha dropped,
    QA 270), else dropped.

    Returns:
        ``(frames, None)``, or ``(None, reason)`` when it cannot be read or ``frames`` refuses it (a ``ValueError``).
    """
    pick = frames if callable(frames) else lambda count, rate: sample_indices(count, frames)
    if path.is_dir():
        files = frame_files(path)
        try:
            indices = pick(len(files), None)
        except ValueError as err:
            return None, f"ValueError: {err}"
        picked = []
        for index in indices:
            image, reason = load_image(files[index], alpha_on_white)
            if image is None:
                return None, f"frame {files[index].name}: {reason}"
            picked.append(image)
        return picked, None
    av = import_optional("av", "profile", "decoding video files")
    try:
        # Only the sampled frames are kept: a whole decoded clip takes gigabytes (1500 frames of 640 x 480,
        # 1.8 GiB). The frame count comes from the packets (no decoding); where the decoder gives another count,
        # the frames are picked again by the true one, so the sample is always that of the decoded clip.
        with av.open(str(path)) as container:
            if not container.streams.video:  # (demux(video=0) says "IndexError: tuple index out of range")
                return None, "no video stream (audio or data only)"
            # The stills' limit on decoded pixels holds for frames too (load_image): refused before decoding.
            from PIL import Image

            stream, limit = container.streams.video[0], Image.MAX_IMAGE_PIXELS
            if limit and stream.codec_context.width * stream.codec_context.height > limit:
                return None, (f"DecompressionBombError: frame size ({stream.codec_context.width}x"
                              f"{stream.codec_context.height} pixels) exceeds PIL.Image.MAX_IMAGE_PIXELS = {limit}")
            announced_end, announced_frames = _announced_end(container), _announced_frames(container)
            rate = stream.average_rate or stream.guessed_rate
            rate = float(rate) if rate else None
            # Packets an edit list discards (the pre-roll of a clip cut with stream copy) are decoded by no player.
            count, end = 0, None
            for packet in container.demux(video=0):
                if packet.size > 0 and not packet.is_discard:
                    count += 1
                    if packet.pts is not None:
                        stop = float((packet.pts + (packet.duration or 0)) * stream.time_base)
                        end = stop if end is None else max(end, stop)
        picked, decoded = _decode_frames(av, path, pick(count, rate) if count else [])
        if decoded != count and decoded > 0:
            picked, _ = _decode_frames(av, path, pick(decoded, rate))
    except (av.error.FFmpegError, OSError, ValueError, IndexError) as err:
        return None, f"{type(err).__name__}: {err}"
    if not decoded:
        return None, "no video frame"
    # A clip cut short (an interrupted copy) decodes what survives: sampled over that span, its frames would be
    # others than the clip's, so it is skipped, as a truncated still is. Told by time where the packets have times
    # (a variable frame rate, Matroska's estimated count and an edit list's discarded pre-roll do not mislead it),
    # else by the header's frame count.
    if end is not None and announced_end is not None:
        start, stop = announced_end
        if stop - end >= max(2 / rate if rate else 0, 0.05 * (stop - start)) and stop > end:
            return None, (f"truncated: its frames end at {end - start:.3g} s of the {stop - start:.3g} s its header "
                          "announces")
    elif announced_frames is not None and announced_frames - decoded >= max(2, 0.05 * announced_frames):
        return None, f"truncated: {decoded} of the {announced_frames} frames its header announces could be decoded"
    return picked, None


def _announced_end(container) -> tuple[float, float] | None:
    """Where the container's header says its first video stream starts and ends, in seconds of the stream's
    timestamps: from the stream's duration or, for a file holding that stream alone, from the container's
    (Matroska, WebM); None where neither is known. Used only to tell a clip cut short: a header that says too
    little (MPEG program streams) hides nothing but never refuses a clip."""
    stream = container.streams.video[0]
    if stream.duration and stream.time_base:
        start = stream.start_time if stream.start_time is not None else 0
        return float(start * stream.time_base), float((start + stream.duration) * stream.time_base)
    if container.duration and len(container.streams) == 1:  # no audio track to lengthen it
        start = (container.start_time or 0) / 1_000_000
        return start, start + container.duration / 1_000_000
    return None


def _announced_frames(container) -> int | None:
    """The frame count of the first video stream's header (mp4, avi, mov), or None: what tells a clip cut short
    where its packets carry no times (:func:`_announced_end`)."""
    frames = container.streams.video[0].frames
    return int(frames) if frames else None


def _decode_frames(av, path: Path, indices: Sequence[int]):
    """The RGB frames at ``indices`` (in that order, repeats allowed) of the clip's first video stream, decoding
    the whole stream but keeping only those; and the number of frames decoded."""
    wanted = set(indices)
    kept = {}
    decoded = 0
    with av.open(str(path)) as container:
        for index, frame in enumerate(container.decode(video=0)):
            if index in wanted:
                kept[index] = _upright(frame)
            decoded = index + 1
    return [kept[i] for i in indices if i in kept], decoded


def _upright(frame):
    """The RGB ``PIL.Image`` of a decoded frame as it is shown: a clip stored sideways or mirrored (a phone's portrait
    video, a front camera's) carries a display matrix, as a still carries its EXIF orientation, and is turned and
    mirrored as ffmpeg's players show it (:func:`_display_transforms`)."""
    image = frame.to_image().convert("RGB")
    for transform in _display_transforms(frame):
        image = transform(image)
    return image


def _display_matrix(frame) -> tuple[int, ...] | None:
    """The frame's display matrix (nine 16.16 fixed-point numbers, row-major), or None where it has none."""
    side_data = getattr(frame, "side_data", None) or ()
    for item in side_data:
        # PyAV 18.1.1 iterates the side data as a mapping does, by type (earlier versions: the side data itself,
        # whose mirrored clips were then turned by the rotation alone: upside down).
        data = item if hasattr(item, "type") else side_data[item]
        if getattr(getattr(data, "type", None), "name", None) == "DISPLAYMATRIX":
            raw = bytes(data)
            if len(raw) == 36:
                return struct.unpack("=9i", raw)
    return None


def _display_transforms(frame) -> list:
    """What to do to a frame's image, in order, to show it as ffmpeg does (its ``autorotate``, which ffplay and
    ffmpeg apply; ``fftools/ffmpeg_filter.c``): the display matrix's rotation rounded to whole degrees, a quarter turn
    a transpose whose direction says whether the matrix mirrors, a half turn the mirrors the matrix says (a matrix
    that mirrors left to right reads as a half turn: turning it 180 degrees, as vitmad did until 2026-12-05, also
    turned it upside down, QA helper-152), no turn the vertical mirror alone; any other angle turned as it is. Without
    the matrix's bytes (PyAV before 14), PyAV's ``rotation``, the angle the matrix turns the frame counterclockwise."""
    from PIL import Image

    matrix = _display_matrix(frame)
    if matrix is None:
        angle = getattr(frame, "rotation", 0) or 0
        return [lambda image: image.rotate(angle, expand=True)] if angle % 360 else []
    a, b, c, d = (value / 65536.0 for value in (matrix[0], matrix[1], matrix[3], matrix[4]))
    if math.hypot(a, c) == 0.0 or math.hypot(b, d) == 0.0:  # av_display_rotation_get's NaN: no rotation known
        return []
    # av_display_rotation_get (counterclockwise degrees), then fftools' get_rotation: clockwise, in [0, 360).
    counterclockwise = -math.degrees(math.atan2(b / math.hypot(b, d), a / math.hypot(a, c)))
    theta = -round(counterclockwise)
    theta -= 360 * math.floor(theta / 360 + 0.9 / 360)

    def transposed(method):
        return lambda image: image.transpose(method)

    flip_lr, flip_tb = transposed(Image.Transpose.FLIP_LEFT_RIGHT), transposed(Image.Transpose.FLIP_TOP_BOTTOM)
    if abs(theta - 90) < 1:  # transpose=cclock_flip (the main-diagonal transpose) or clock
        return [transposed(Image.Transpose.TRANSPOSE if matrix[3] > 0 else Image.Transpose.ROTATE_270)]
    if abs(theta - 180) < 1:
        return [t for t, mirrored in ((flip_lr, matrix[0] < 0), (flip_tb, matrix[4] < 0)) if mirrored]
    if abs(theta - 270) < 1:  # transpose=clock_flip (the anti-diagonal transpose) or cclock
        return [transposed(Image.Transpose.TRANSVERSE if matrix[3] < 0 else Image.Transpose.ROTATE_90)]
    if abs(theta) > 1:  # ffmpeg's rotate filter keeps the frame's size; vitmad keeps every pixel of the frame
        return [lambda image: image.rotate(-theta, expand=True)]
    return [flip_tb] if matrix[4] < 0 else []


def load_video_batch(
    paths: Sequence[Path], frames: int, preprocessing: Preprocessing, pool: Executor | None = None
) -> tuple[torch.Tensor | None, list[Path], list[tuple[Path, str]]]:
    """Decode, sample and preprocess a batch of videos, setting unreadable ones aside.

    Returns:
        ``(pixels, loaded, skipped)``: ``pixels`` ``[len(loaded), frames, 3, H, W]`` (None if nothing loaded), the
        videos behind its rows, and ``(video, reason)`` for each one skipped.
    """

    def one(path: Path) -> tuple[torch.Tensor | None, str | None]:
        images, reason = load_video(path, frames, preprocessing.alpha_on_white)
        if images is None:
            return None, reason
        try:
            return torch.stack([preprocessing(i) for i in images]), None
        except ValueError as err:  # frames the model's preprocessing cannot take (Preprocessing.resize "none"),
            return None, str(err)  # skipped by name as such an image is, not the end of the run

    tensors, loaded, skipped = load_each(paths, one, pool)
    return (torch.stack(tensors) if tensors else None), loaded, skipped
