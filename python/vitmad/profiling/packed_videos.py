"""Videos of packed native-resolution towers in ``vitmad profile``: the Qwen2-VL, Qwen2.5-VL and Qwen3-VL vision towers
(and Qwen3-VL's tower in Qwen3-VL-MoE, Qwen3.5 and Qwen3.5-MoE), and the VideoLLaMA3, Ovis2.5, LFM3-VL, Cosmos3-Edge,
HY-V4-VL, Muse Glimmer, Muse Spark and MiniMax-M3-VL towers, each clip through the model's own video processor.

Each clip goes through the checkpoint's video processor (transformers' auto map, :data:`VIDEO_PROCESSORS`:
``Qwen2VLVideoProcessor`` for Qwen2-VL and Qwen2.5-VL, ``Qwen3VLVideoProcessor`` for the Qwen3-VL towers and LFM3-VL,
``VideoLlama3VideoProcessor``, ``Ovis2_5VideoProcessor``, ``Cosmos3EdgeVideoProcessor``, ``HYV4VLVideoProcessor``,
``MuseGlimmerVideoProcessor`` for both Muse towers, ``MiniMaxM3VLVideoProcessor``), read as transformers reads it
(``processor_config.json``'s ``video_processor``, else ``video_preprocessor_config.json``, else the image processor's
``preprocessor_config.json``; without any, the class's defaults with the tower's sizes), so the model's own rules
decide what the tower sees, not the fixed frame count of the video models' path (``videos.py``):

- frames: the processor's ``sample_frames`` given the clip's frame count and frame rate, where its
  ``do_sample_frames`` is set (the default of Qwen3-VL's, Cosmos3-Edge's and the Muse towers': ``fps`` frames a
  second within ``min_frames`` and ``max_frames``, the Muse towers' at most ``num_frames``), with the settings its
  ``preprocess`` passes it (read by transformers' private ``_merge_and_standardize_kwargs``: there is no public way
  in transformers 5.25, and without them some processors sample otherwise); else every frame, as the processor takes
  the frames it is given (the default of Qwen2-VL's, VideoLLaMA3's, Ovis2.5's, HY-V4-VL's and MiniMax-M3-VL's). Only
  the picked frames are decoded. A clip the processor cannot sample (fewer frames than it asks, Qwen3-VL's fewer
  than a temporal patch) is skipped with the processor's reason; a frame folder has no frame rate (Qwen3-VL's,
  Cosmos3-Edge's, HY-V4-VL's and the Muse processors then take 24 frames a second; Qwen2-VL's and VideoLLaMA3's
  refuse to sample it by ``fps``).
- size and patches: the processor's ``smart_resize`` (sides multiples of ``patch * merge``, within its pixel budget:
  per frame, or over the whole clip for Qwen3-VL's, Cosmos3-Edge's, VideoLLaMA3's and HY-V4-VL's; the Muse
  processors' at most ``max_video_frame_tokens`` merged tokens a frame; HY-V4-VL's never upscaling), its
  normalisation, and its ``patchify``: the frames padded with the last to whole temporal patches, ``grid_thw = (t,
  h, w)``, each temporal slice's ``h * w`` patches in the order the tower places an image's (Qwen2-VL's merge blocks,
  each patch ``(C, temporal_patch, p, p)``, for the Qwen towers, LFM3-VL, Ovis2.5 and MiniMax-M3-VL; Cosmos3-Edge's
  merge blocks, each patch ``(p, p, C)`` of one frame; VideoLLaMA3's merge blocks of its ``merge_size``, 2 by
  default, each patch ``(C, p, p)`` of one frame; HY-V4-VL's row-major, each ``(C, p, p)`` of one frame; the Muse
  towers' row-major, each ``(temporal_patch, C, p, p)``).

Every clip of a batch goes into one packed forward of the tower (``pixel_values_videos`` and ``video_grid_thw`` as the
model's ``get_video_features`` passes them; VideoLLaMA3's tower told the processor's ``merge_size`` per clip, its
``video_merge_sizes``, where its images are fed with 1). These towers but MiniMax-M3-VL attend each temporal slice (a
temporal patch of ``temporal_patch_size`` frames; one frame for VideoLLaMA3, Ovis2.5's default, Cosmos3-Edge and
HY-V4-VL) within itself (``cu_seqlens`` per slice; Ovis2.5's and the Muse towers' window layers per window of a
slice): the recorder places each slice as an image of its own, and a clip's MAD is the mean over its tokens, every
slice's (the slices are alike, so the mean of their MADs). No attention crosses slices, so there is no temporal MAD:
``mad.json`` has none, and lists each clip's grid, size and the frames its temporal patches hold in ``image_grids``.

MiniMax-M3-VL (:data:`WHOLE_CLIPS`) attends each ``grid_thw`` row whole, over space and time, and its video processor
cuts a clip into rows of at most ``vision_segment_max_frames`` (4) temporal patches, the last often shorter: the
recorder places each row as a clip (tokens at their pixel centres and at ``(s + 0.5) * temporal_patch_size`` frames
from the row's first), and a clip's spatial and temporal MAD are the means over all its tokens, its rows' weighted by
their temporal patches. The temporal MAD, in frames of the clip as sampled, rides as a video model's (``mad.json``'s
``"temporal"`` entries and sums, ``mad.csv``'s ``tmad_*``, ``mad.png``). A clip of one temporal patch (at most 2
frames) is skipped saying why: alone in a forward the recorder would place it as an image, without time.

Refused by name: the other packed towers (:data:`_NO_VIDEOS` says why for each), a processor of another class or of
another patch, merge or temporal patch size than the tower's (VideoLLaMA3's merge size is the processor's, told to
the tower), a fixed ``image_size`` (the processor resizes each clip), and pixel tensors.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path

import torch

from .images import load_each
from .models import LoadedModel
from .options import OptionError, error_said
from .packed_towers import PACKED_TOWERS, _plain, call_packed, find_packed_tower, tower_sizes
from .videos import load_video

__all__ = ["PackedVideoFeed", "packed_video_feed", "video_processor_dict", "load_packed_video_batch",
           "VIDEO_PROCESSORS", "WHOLE_CLIPS"]

# Tower class -> its model's video processor (transformers' auto map), the towers whose videos vitmad profile feeds:
# each attends every temporal slice of a clip within itself, the slice's patches in the order its image's are
# (recording/families/packed.py, video_slices), and its video processor cuts them in that order: Qwen2-VL's merge
# blocks, each patch (C, t, p, p) (the Qwen towers, LFM3-VL, Ovis2.5); Cosmos3-Edge's merge blocks, each patch
# (p, p, C) of one frame; VideoLLaMA3's merge blocks of its merge_size (2 by default), the tower told so per clip
# (merge_sizes); HY-V4-VL's row-major patches of one frame; the Muse towers' row-major patches, each (t, C, p, p).
VIDEO_PROCESSORS = {
    "Qwen2VisionTransformerPretrainedModel": "Qwen2VLVideoProcessor",
    "Qwen2_5_VisionTransformerPretrainedModel": "Qwen2VLVideoProcessor",
    "Qwen3VLVisionModel": "Qwen3VLVideoProcessor",
    "Qwen3VLMoeVisionModel": "Qwen3VLVideoProcessor",
    "Qwen3_5VisionModel": "Qwen3VLVideoProcessor",
    "Qwen3_5MoeVisionModel": "Qwen3VLVideoProcessor",
    "Cosmos3EdgeVisionModel": "Cosmos3EdgeVideoProcessor",
    "Lfm3VlVisionModel": "Qwen3VLVideoProcessor",
    "Ovis2_5VisionModel": "Ovis2_5VideoProcessor",
    "MuseGlimmerVisionModel": "MuseGlimmerVideoProcessor",
    "MuseSparkVisionModel": "MuseGlimmerVideoProcessor",
    "VideoLlama3VisionModel": "VideoLlama3VideoProcessor",
    "HYV4VLVisionModel": "HYV4VLVideoProcessor",
    "MiniMaxM3VLVisionModel": "MiniMaxM3VLVideoProcessor",
}
# The towers among them that attend each grid_thw row whole, over space and time (recording/families/packed.py,
# whole_clip): MiniMax-M3-VL, whose video processor cuts a clip into rows of at most vision_segment_max_frames
# temporal patches, each row placed as a clip of its own by vitmad.record, with a temporal MAD.
WHOLE_CLIPS = ("MiniMaxM3VLVisionModel",)
# The other packed towers vitmad profile loads: why their videos are not fed.
_NO_VIDEOS = {
    "PaddleOCRVisionModel": "its model has no video processor",
    "HunYuanVLVisionTransformer": "its patch merger folds a whole grid_thw row into one map: it runs no video",
    "PixtralVisionModel": "it takes images only",
}
# Video processor settings that are no setting of the video processor itself.
_DROPPED = ("image_processor_type", "video_processor_type", "processor_class", "auto_map", "_processor_class")
# The settings that shape a result: mad.json's settings.preprocessing (and so the run's fingerprint).
_SHOWN = ("size", "patch_size", "merge_size", "temporal_patch_size", "do_sample_frames", "fps", "num_frames",
          "min_frames", "max_frames", "cap_pixels_per_frame", "max_video_tokens", "image_mean", "image_std",
          "do_normalize", "do_rescale", "rescale_factor", "resample")
# More settings that shape a result, shown only by the processors that have them (HY-V4-VL's per-frame pixel cap,
# the Muse towers' tokens per frame, MiniMax-M3-VL's pixels per frame and temporal patches per row): the Qwen
# processors' settings, and so their runs' fingerprints, are unchanged.
_SHOWN_WHERE_HELD = ("max_image_size", "max_video_frame_tokens", "min_pixels", "max_pixels",
                     "vision_segment_max_frames")


def video_processor_dict(name: str, options: dict) -> dict | None:
    """The video processor settings of the checkpoint ``name`` as transformers reads them (a nested
    ``processor_config.json``, ``video_preprocessor_config.json``, else ``preprocessor_config.json``), or None where
    it has none."""
    from transformers.video_processing_utils import BaseVideoProcessor

    try:
        found, _ = BaseVideoProcessor.get_video_processor_dict(name, **options)
    except OSError:
        return None
    return found


@functools.lru_cache(maxsize=8)
def _processor(settings_json: str):
    import transformers

    settings = json.loads(settings_json)
    return getattr(transformers, settings.pop("video_processor_type"))(**settings)


def _video_processor(settings: dict):
    """The transformers video processor of ``settings`` (one per settings: shared, read-only)."""
    return _processor(json.dumps(settings, sort_keys=True, default=_plain))


def video_settings(tower: torch.nn.Module, saved: dict | None) -> dict:
    """The checked video processor settings of ``tower``: the checkpoint's (``saved``), else its class's defaults,
    with the tower's patch, merge and temporal patch sizes; ``video_processor_type`` names the class.

    Raises:
        OptionError: (``images``) the tower's videos are not fed by vitmad profile; (``model``) the processor is of
            another class than the tower's model's, or cuts other patches than the tower takes.
    """
    name = type(tower).__name__
    own = VIDEO_PROCESSORS.get(name)
    if own is None:
        reason = _NO_VIDEOS.get(name, "its videos were not checked")
        fed = ", ".join(sorted(VIDEO_PROCESSORS))
        raise OptionError("images", f"the vision tower {name} is profiled on images only: {reason}; vitmad profile "
                                    f"takes the videos of {fed}")
    saved = saved or {}
    # A video processor's file names its class; an image processor's file (transformers' fallback) the image
    # processor's, from which transformers builds the model's video processor.
    given = saved.get("video_processor_type") or own
    if given != own:
        raise OptionError("model", f"the checkpoint's video processor is {given}, but the vision tower {name} is fed "
                                   f"by {own} (its model's video processor in transformers), whose sampling, "
                                   f"resizing and patch order vitmad checked; {given}'s it did not")
    settings = {k: v for k, v in saved.items() if k not in _DROPPED}
    patch, merge, temporal = tower_sizes(tower)
    expected = {"patch_size": patch, "merge_size": merge, "temporal_patch_size": temporal}
    if PACKED_TOWERS[name].merge_argument is not None:
        # VideoLLaMA3: the tower takes a merge size per clip (merge_sizes), told the processor's own (its class's
        # default 2 where the checkpoint says none), as get_video_features passes video_merge_sizes.
        del expected["merge_size"]
    for key, value in expected.items():
        settings.setdefault(key, value)
        if int(settings[key]) != value:
            raise OptionError("model", f"the video processor has {key}={settings[key]}, but the vision tower {name} "
                                       f"takes {value}")
    return {**settings, "video_processor_type": own}


@dataclass(frozen=True)
class PackedVideoFeed:
    """How a packed tower takes clips: its model's video processor.

    Attributes:
        processor: the checked video processor settings (:func:`video_settings`), its class in
            ``video_processor_type``.
        whole_clip: the tower attends each ``grid_thw`` row whole over space and time (:data:`WHOLE_CLIPS`): each
            row the recording's entry (a clip's segment), with a temporal MAD; else each temporal slice is.
    """

    processor: dict
    whole_clip: bool = False

    @property
    def _own(self):
        return _video_processor(self.processor)

    def to_dict(self) -> dict:
        """The settings that shape the result (``mad.json``'s ``settings.preprocessing``): the processor's class and
        its effective settings of sampling, size and normalisation."""
        own = self._own
        shown = {key: getattr(own, key, None) for key in _SHOWN}
        shown |= {key: getattr(own, key) for key in _SHOWN_WHERE_HELD if getattr(own, key, None) is not None}
        if dataclasses.is_dataclass(shown["size"]):  # transformers' SizeDict: the keys it has
            shown["size"] = {k: v for k, v in dataclasses.asdict(shown["size"]).items() if v is not None}
        shown = json.loads(json.dumps(shown, default=_plain))  # PIL filters, tuples: plain values
        return {"native": "qwen", "videos": True, "video_processor": self.processor["video_processor_type"],
                "processor": shown, **({"whole_clip": True} if self.whole_clip else {})}

    def pick(self, count: int, rate: float | None) -> list[int]:
        """The frames of a clip of ``count`` frames at ``rate`` frames a second the processor takes: its
        ``sample_frames`` where it samples, else every frame."""
        own = self._own
        if not own.do_sample_frames:
            return list(range(count))
        from transformers.video_utils import VideoMetadata

        settings = _sampling_settings(own)
        try:
            chosen = own.sample_frames(VideoMetadata(total_num_frames=count, fps=rate), **settings)
        except ZeroDivisionError as err:  # Qwen2VLVideoProcessor asked for 0 frames (a clip of 1 frame)
            raise ValueError(f"{type(own).__name__} samples no frame of a clip of {count} ({err})") from err
        return [int(i) for i in chosen]

    def prepare(self, frames: list) -> tuple[torch.Tensor, tuple[tuple[int, int, int], ...]]:
        """The processor on one clip's frames (RGB ``PIL.Image``): its patches ``[sum t * h * w, D]`` and its
        ``grid_thw`` rows ``(t, h, w)``: one, or (MiniMax-M3-VL's) one per segment of the clip.

        Raises:
            ValueError: the processor refuses the clip.
        """
        import numpy as np

        clip = torch.from_numpy(np.stack([np.asarray(frame, dtype=np.uint8) for frame in frames])).permute(0, 3, 1, 2)
        found = self._own(videos=[clip], do_sample_frames=False, return_tensors="pt")
        rows = tuple(tuple(int(v) for v in row) for row in found["video_grid_thw"])
        return found["pixel_values_videos"], rows

    def unplaced(self, rows: tuple[tuple[int, int, int], ...]) -> str | None:
        """Why a prepared clip cannot be profiled (None: it can): a tower attending whole clips given a clip of one
        temporal patch, which the recorder would place as an image (no row of the forward holding a video), without
        a temporal MAD."""
        if self.whole_clip and all(t == 1 for t, _, _ in rows):
            frames = int(self.processor["temporal_patch_size"])
            return (f"it is one temporal patch ({frames} frames after padding): its tower attends a clip over space "
                    "and time, and a single temporal patch has no time in it")
        return None

    def forwards(self, loaded: LoadedModel, items: list, device: torch.device, dtype: torch.dtype) -> None:
        """One packed forward of the tower on a batch of prepared clips, each clip its ``grid_thw`` rows
        (VideoLLaMA3's told the processor's ``merge_size`` per row, as its ``video_merge_sizes``)."""
        patches = torch.cat([p for p, _ in items])
        grid_thw = torch.tensor([list(row) for _, rows in items for row in rows])
        call_packed(loaded.module, patches.to(device=device, dtype=dtype), grid_thw.to(device),
                    merge_size=int(self._own.merge_size))

    def per_clip(self, values: torch.Tensor, entries: list[dict], items: list) -> tuple[torch.Tensor, list[dict]]:
        """``values`` ``[S, n_entries, H]`` (the recording's entries, in order: every clip's temporal slices, or
        with :attr:`whole_clip` every clip's rows) as ``[S, n_clips, H]``, each clip the mean over its tokens (of
        its slices, alike; of its rows, weighted by their temporal patches), and each clip's ``{"grid", "size",
        "frames"}``.

        Raises:
            RuntimeError: the recording's entries are not the clips' slices or rows (each on its clip's grid).
        """
        counts = [len(rows) if self.whole_clip else sum(t for t, _, _ in rows) for _, rows in items]
        expected = []
        for (_, rows), count in zip(items, counts):  # a clip's rows share its frames' grid
            expected += [rows[0][1:]] * count
        if [tuple(entry["grid"]) for entry in entries] != expected:
            what = "rows" if self.whole_clip else "temporal slices"
            raise RuntimeError(f"the recording placed {len(entries)} entries on grids "
                               f"{[entry['grid'] for entry in entries]}, not the clips' {what} {expected}")
        temporal = int(self.processor["temporal_patch_size"])
        clips, grids, start = [], [], 0
        for (_, rows), count in zip(items, counts):
            found = values[:, start:start + count]
            if self.whole_clip:  # rows of t * h * w tokens each: their means weighted by their temporal patches
                weights = torch.tensor([t for t, _, _ in rows], dtype=values.dtype, device=values.device)
                clips.append((found * weights[:, None]).sum(1) / weights.sum())
            else:
                clips.append(found.mean(1))
            h, w = rows[0][1:]
            grids.append({"grid": [h, w], "size": entries[start]["size"],
                          "frames": sum(t for t, _, _ in rows) * temporal})
            start += count
        return torch.stack(clips, 1), grids


def _sampling_settings(own) -> dict:
    """The settings the video processor ``own`` passes its ``sample_frames``: what its ``preprocess`` passes (every
    setting of its class, standardised), less the ones that are no sampling's.

    transformers 5.25 has no public way to these: ``preprocess`` builds them with the private
    ``_merge_and_standardize_kwargs`` and calls ``sample_frames`` with them, and ``sample_frames`` alone, without
    them, samples otherwise (``Qwen3VLVideoProcessor``'s by its ``fps`` where it is saved with ``num_frames``,
    ``MuseGlimmerVideoProcessor``'s needs its ``temporal_patch_size``). So they are built as ``preprocess`` builds
    them, and a transformers without that method is refused, never sampled by another rule.

    Raises:
        RuntimeError: the installed transformers has no ``_merge_and_standardize_kwargs``.
    """
    merge = getattr(own, "_merge_and_standardize_kwargs", None)
    if merge is None:
        import transformers

        raise RuntimeError(f"{type(own).__name__} of transformers {transformers.__version__} has no "
                           "_merge_and_standardize_kwargs, by which vitmad reads the settings its preprocess "
                           "samples frames with (checked with transformers 5.25); install transformers 5.25, or "
                           "save the video processor with do_sample_frames false (every frame)")
    settings = merge()
    for key in ("input_data_format", "do_convert_rgb", "do_sample_frames", "device", "video_metadata"):
        settings.pop(key, None)
    return settings


def packed_video_feed(loaded: LoadedModel) -> PackedVideoFeed:
    """The way ``loaded`` (a packed tower, or a model holding one) takes clips.

    Raises:
        OptionError: the model holds no packed tower, or its tower's videos are not fed (:func:`video_settings`).
    """
    packed = find_packed_tower(loaded.module)
    if packed is None:
        raise OptionError("images", f"{type(loaded.module).__name__} is no video model and no packed vision tower: "
                                    "it takes images")
    feed = PackedVideoFeed(video_settings(packed[1], loaded.video_processor),
                           whole_clip=type(packed[1]).__name__ in WHOLE_CLIPS)
    try:  # sampling settings it cannot sample by would fail every clip: said once, now
        feed.pick(64, 30.0)
    except TypeError as err:  # Qwen2VLVideoProcessor told to sample with neither fps nor num_frames
        raise OptionError("model", f"the video processor {feed.processor['video_processor_type']} samples frames "
                                   f"(do_sample_frames) but cannot by its settings ({err}): give it fps or num_frames, "
                                   "or do_sample_frames false (every frame)") from err
    except ValueError:  # a refusal of this clip length only
        pass
    return feed


def load_packed_video_batch(paths: Sequence[Path], feed: PackedVideoFeed, pool: Executor | None = None
                            ) -> tuple[list | None, list[Path], list[tuple[Path, str]]]:
    """Decode the frames the processor picks of a batch of clips and prepare them, setting unreadable ones aside.

    Returns:
        ``(items, loaded, skipped)`` as :func:`~.native.load_native_batch`.
    """

    def one(path: Path):
        frames, reason = load_video(path, feed.pick)
        if frames is None:
            return None, reason
        try:
            item = feed.prepare(frames)
        except ValueError as err:  # a clip the processor cannot take (Qwen3-VL's: fewer frames than a temporal patch)
            return None, f"the model's video processor refuses it ({error_said(err)})"
        reason = feed.unplaced(item[1])
        return (None, reason) if reason else (item, None)

    items, loaded, skipped = load_each(paths, one, pool)
    return (items or None), loaded, skipped
