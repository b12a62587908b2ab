"""``vitmad.profile``: the mean attention distance of every head of a model, over an image set.

Three steps, one function each: :func:`plan_run` checks the options and fixes what will run (model, device,
the batches of this process, the run's fingerprint); :func:`run_batches` runs the model batch by batch under
:func:`vitmad.record`, adds each image's ``[L, H]`` MAD (and the other statistics asked for, from the same
forward) to float64 running sums and checkpoints them with the list of processed files every few batches;
:func:`finish` merges the processes' sums and returns the :class:`~vitmad.profiling.results.Profile`.

Batches are fixed slices of the sorted file list (a broken file leaves a hole in its batch instead of
shifting the next ones), so a resumed run sees the same batches and ends with the same sums as an
uninterrupted one.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import os
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..recording.placement import NotPlaceable
from ..recording.recorder import LayersError, NoAttentionRanError, NoLayerError, Recording, attention_modules
from ..recording.towers import image_channels
from .checkpoint import (
    LOCAL_FOLDER,
    architecture_digest,
    check_checkpoint_path,
    files_digest,
    fingerprint,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
    tensors_digest,
    weights_digest,
)
from .distributed import (
    DistributedRun,
    GlobalProgress,
    check_same_run,
    current_run,
    merge_across_ranks,
    merge_prefix_maps,
)
from .earlier_runs import without_earlier_outputs
from .files import held_by_this_run
from .images import NATIVE, find_images, load_batch, parse_image_size
from .interrupts import raise_dropped
from .model_failure import MODEL_ERRORS, own_forward_refusal
from .models import (
    LoadedModel,
    load_model,
    non_square_table_said,
    random_masking,
    refuse_random_weights_before_attention,
    wrap_module,
)
from .native import NativeFeed, check_fixed_size, load_native_batch, native_feed, native_geometry
from .options import (
    DTYPES,
    OptionError,
    check_flag,
    check_layers,
    check_loader_threads,
    check_positive,
    import_optional,
    resolve_device,
    resolve_dtype,
    resolve_stats,
)
from .packed_towers import find_packed_tower
from .packed_videos import PackedVideoFeed, load_packed_video_batch, packed_video_feed
from .prefix_maps import PrefixMapSums
from .results import Profile, layout_dict
from .stats import RunningStats
from .videos import find_videos, is_video_source, load_video_batch, model_frames, without_clips
from .volumes import VolumeBatch, VolumePreprocessing, find_volumes, load_volume_batch, spacing_groups

if TYPE_CHECKING:
    from tqdm import tqdm

__all__ = ["profile", "plan_run", "run_batches", "finish", "RunPlan", "RunState", "prepare_model", "when_planned"]

# What the caller of profile() runs once every option is checked, before the first batch (when_planned).
_PLANNED: contextvars.ContextVar[Callable[[], None] | None] = contextvars.ContextVar("vitmad_planned", default=None)


@contextmanager
def when_planned(announce: Callable[[], None]) -> Iterator[None]:
    """Within it, :func:`profile` calls ``announce()`` once its options are all checked against the model (the
    cheap ones, the model's, the sizes, that it has layers to record), before it reads an image: ``vitmad profile``
    says there that an earlier run's outputs will be replaced. Said before, a run refused by those checks warned of
    a replacement that never came (QA 342, QA 348, QA 351). What only a batch tells (no image could be read, a size
    the model's forward fails at) is refused after it: said after a batch, the warning came once that batch's
    checkpoint had replaced an interrupted earlier run's, which a Ctrl-C at the warning must keep (QA 243)."""
    token = _PLANNED.set(announce)
    try:
        yield
    finally:
        _PLANNED.reset(token)

# (pixels [B, 3, H, W] (videos: [B, T, 3, H, W]; volumes: a VolumeBatch) or None, names of the images loaded,
# [(path, reason)] of the images skipped)
Batch = tuple[torch.Tensor | VolumeBatch | None, list[str], list[tuple[str, str]]]


@dataclass
class RunPlan:
    """Everything fixed before the first batch runs.

    Attributes:
        loaded: the model, its forward and preprocessing.
        device, dtype: where and in which precision the model runs.
        names: every image of the run (all processes), in order.
        load: loads global batch ``i``.
        batches: the global batch indices this process runs, in order.
        settings: the options that shape the result (written to ``mad.json``).
        fingerprint: digest of model, settings, images and process layout; a checkpoint must match it.
        checkpoint: this process's checkpoint file, or None.
        checkpoint_every: batches between checkpoints.
        record_options: keyword arguments of :func:`vitmad.record`.
        run: the ``torch.distributed`` job, or None for one process.
        native: how the model takes each image at its own aspect ratio (``image_size="native"``), or how a packed
            tower takes clips (its video processor), else None.
        statistics: the statistics profiled besides MAD (``"entropy"``, ``"prefix_mass"``, ``"self_mass"``).
        prefix_maps: the CLS / register maps are averaged over the images.
        maps_skipped: why no layer can have mean prefix maps in this run (the images have no common grid), or None.
        identity: the settings, model, process layout and image digests the fingerprint is made of.
        converts_weights: the model's weights are converted to ``dtype`` (False for a module the caller passed,
            moved to the device with its parameters' dtypes as they are: a bfloat16 model's float32 norms stay so).
        earlier_fingerprint: the fingerprint vitmad made before the model's architecture joined it (2026-12-06):
            a checkpoint of that version resumes.
    """

    loaded: LoadedModel
    device: torch.device
    dtype: torch.dtype
    names: list[str]
    load: Callable[[int], Batch]
    batches: range
    settings: dict
    fingerprint: str
    checkpoint: Path | None
    checkpoint_every: int
    record_options: dict
    run: DistributedRun | None
    native: NativeFeed | PackedVideoFeed | None = None
    statistics: tuple[str, ...] = ()
    prefix_maps: bool = False
    maps_skipped: str | None = None
    identity: dict = field(default_factory=dict)
    converts_weights: bool = True
    earlier_fingerprint: str | None = None

    def checkpoint_state(self, state: RunState) -> dict:
        """What the checkpoint of ``state`` holds: its sums, and what a later command needs to say what it finds
        there (the settings the fingerprint digests, how many batches the run has)."""
        return {**state.state_dict(self.fingerprint), "identity": self.identity, "batches_total": len(self.batches)}


@dataclass(frozen=True)
class RunState:
    """What a run has done so far: replaced as a whole after each batch, so an interrupt never leaves half.

    Attributes:
        stats: float64 running statistics (None before the first readable batch): MAD's ``L`` rows, then (video)
            the temporal MAD's and each of the plan's ``statistics``' ``L`` rows, in that order.
        meta: ``{"layers": [...], "layout": {...} or None, "geometry": [...], "skipped_layers": {...}}`` of the
            recording; native runs add ``"image_grids"``: per image name, its ``grid`` and ``size``; volume runs
            per volume its first layer's ``grid``, input ``size``, source ``shape`` and (millimetres) ``spacing``.
        images: names of the images profiled.
        skipped: ``{"path", "reason"}`` of the images that could not be read.
        batches_done: how many of the plan's batches are done.
        maps: float64 sums of the prefix maps, when the plan averages them (None before the first batch).
    """

    stats: RunningStats | None = None
    meta: dict | None = None
    images: tuple[str, ...] = ()
    skipped: tuple[dict, ...] = ()
    batches_done: int = 0
    maps: PrefixMapSums | None = None

    def state_dict(self, run_fingerprint: str) -> dict:
        state = {"fingerprint": run_fingerprint, "batches_done": self.batches_done, "images": list(self.images),
                 "skipped": list(self.skipped), "stats": self.stats.state_dict() if self.stats else None,
                 "meta": self.meta}
        if self.maps is not None:
            state["prefix_maps"] = self.maps.state_dict()
        return state

    @staticmethod
    def from_state_dict(state: dict) -> RunState:
        stats = RunningStats.from_state_dict(state["stats"]) if state["stats"] else None
        maps = PrefixMapSums.from_state_dict(state["prefix_maps"]) if state.get("prefix_maps") else None
        return RunState(stats, state["meta"], tuple(state["images"]), tuple(state["skipped"]),
                        state["batches_done"], maps)


def prepare_model(model, image_size: tuple[int, int] | str | None, model_checkpoint=None, model_args=None,
                  intensity: str | None = None, volume_unit: str | None = None):
    """``(LoadedModel, preprocessing)`` for a spec string, a :class:`LoadedModel` or a module."""
    if not isinstance(model, (str, os.PathLike)):
        for parameter, value in (("model_args", model_args), ("intensity", intensity), ("volume_unit", volume_unit)):
            if value is not None:
                raise OptionError(parameter, "only a monai: spec (3-D volumes) takes it, loaded here; got a model "
                                             f"already built ({type(model).__name__})")
        if model_checkpoint is not None:  # (QA 292: ignored, the module's own weights profiled without a word)
            raise OptionError("model_checkpoint", f"weights are loaded into a model vitmad builds from a spec; got a "
                                                  f"model already built ({type(model).__name__}): load them into it "
                                                  "yourself (model.load_state_dict(...)) or pass its spec")
    if isinstance(model, LoadedModel):
        loaded = model
    elif isinstance(model, (str, os.PathLike)):
        loaded = load_model(str(model), model_checkpoint=model_checkpoint, image_size=image_size,
                            model_args=model_args, intensity=intensity, volume_unit=volume_unit)
    elif isinstance(model, torch.nn.Module):
        from ..recording.compiled import graph_form_refusal, uncompiled

        refused = graph_form_refusal(uncompiled(model))
        if refused is not None:
            raise OptionError("model", refused)
        masked = random_masking(model)
        if masked is not None:
            raise OptionError("model", f"{type(model).__name__} drops {masked.mask_ratio:g} of the patches at random "
                                       "at every forward (config.mask_ratio), so every run would measure another "
                                       "draw; set model.config.mask_ratio = 0.0 to profile each image whole (an hf: "
                                       "spec does so), or record its masked forwards with vitmad.record")
        loaded = wrap_module(model)
    else:
        raise OptionError("model", f"expected an nn.Module or a model spec string, got {type(model).__name__}")
    preprocessing = loaded.preprocessing
    if image_size not in (None, NATIVE) and preprocessing is not None:
        _check_patches_fit(loaded.module, image_size)
        _check_size_the_model_checks(loaded, image_size)
        preprocessing = preprocessing.with_size(image_size)
    return loaded, preprocessing


def _check_patches_fit(module: torch.nn.Module, image_size: tuple[int, int], parameter: str = "image_size") -> None:
    """Refuse, before any image is read, an input size the model's patch embedding cannot take: smaller than one
    patch, or not a whole number of patches where the patch embedding neither pads nor asserts
    (:func:`_pads_partial_patches`). ``parameter``: the one that gave the size (``images`` for a pixel tensor, fed
    as it is).

    Raises:
        OptionError: naming ``parameter``.
    """
    from ..recording.families.plain import find_patch_embedding
    from ..recording.module_index import named_module_list
    from .packed_towers import find_packed_tower

    found = find_patch_embedding(module)
    first_conv = next((m for _, m in named_module_list(module) if isinstance(m, torch.nn.Conv2d)), None)
    if found is None or found[1] is not first_conv:  # no patch embedding on the image itself (a CNN stem first)
        return
    name, conv = found
    (height, width), (kh, kw) = image_size, conv.kernel_size
    given = f"{height}x{width}" if parameter == "image_size" else f"a pixel tensor of {height}x{width}"
    if height < kh or width < kw:
        raise OptionError(parameter, f"expected at least one {kh}x{kw} patch of the model ({name}), got {given}")
    owner = module.get_submodule(name.rpartition(".")[0]) if "." in name else module
    if (height % kh or width % kw) and not _pads_partial_patches(owner, conv) and find_packed_tower(module) is None:
        # (A packed tower's own check says more: Qwen's merge factor, Pixtral's longest side.)
        fit = f"{max(kh, height // kh * kh)}x{max(kw, width // kw * kw)}"
        crop = "" if parameter == "image_size" else " (crop it: the model would never see the last rows or columns)"
        raise OptionError(parameter, f"expected whole {kh}x{kw} patches of the model ({name} takes no partial "
                                     f"patch), got {given}; for example {fit}{crop}")


def _check_size_the_model_checks(loaded: LoadedModel, image_size: tuple[int, int]) -> None:
    """Refuse, before any input is read, a size the model's own forward refuses: a patch embedding that raises
    when its input differs from its ``image_size`` (transformers' VideoMAE, whose position table is fixed), or
    that adds its table of ``image_size``'s positions without a check (Granite Docling's tower, whose forward
    has no ``interpolate_pos_encoding``: a shape error inside the model), in a model that does not interpolate.
    Its error came from the first batch's forward, naming no option, after a checkpoint was written.

    Raises:
        OptionError: naming ``image_size``.
    """
    from ..recording.module_index import named_module_list
    from ..recording.transformers_capture import forward_source

    _check_timesformer_size(loaded.module, image_size)
    if loaded.accepts_any_size:
        return
    non_square = non_square_table_said(loaded.module)
    if non_square is not None and tuple(loaded.module.config.image_size) != tuple(image_size):
        raise OptionError("image_size", f"{non_square}; got {image_size[0]}x{image_size[1]}")
    for name, module in named_module_list(loaded.module):
        # (AIMv2's embeddings hold theirs in their config.)
        own = getattr(module, "image_size", getattr(getattr(module, "config", None), "image_size", None))
        if isinstance(own, int) and not isinstance(own, bool):
            own = (own, own)
        if not (isinstance(own, (tuple, list)) and len(own) == 2 and all(isinstance(v, int) for v in own)):
            continue
        source = forward_source(type(module))
        checks = "self.image_size" in source and "raise" in source
        # (The table added in the sum itself, Granite Docling's, or first taken out, AIMv2's; QA 269.)
        adds_table = "self.position_embedding(self.position_ids)" in source and isinstance(
            getattr(module, "position_embedding", None), torch.nn.Embedding)
        if checks or adds_table:
            if tuple(own) != tuple(image_size):
                what = ("checks its input against its image_size" if checks else
                        "adds one position embedding per patch of its image_size")
                raise OptionError("image_size", f"{type(loaded.module).__name__} takes {own[0]}x{own[1]} px only "
                                                f"({name} {what}, and the model does not interpolate its position "
                                                f"embeddings), got {image_size[0]}x{image_size[1]}")
            return


def _check_timesformer_size(model: torch.nn.Module, image_size: tuple[int, int], parameter: str = "image_size") -> None:
    """transformers' TimeSformer interpolates its position embeddings, so the checks above let any whole-patch size
    through, but two sizes fail inside its first forward with a shape error (QA 301, QA 304):

    - frames one patch wide, where the patch count is not the configured one: the embeddings take the height of the
      grid as (1 + patches) // width, one row more than there is, and the interpolated table does not fit;
    - with divided space-time attention, a frame whose patches are no whole number of rows of
      ``config.image_size // patch_size``: each block cuts the frame's patches into such rows whatever the input's
      width. Any other size runs as it should: the blocks only regroup the patches in their order.

    ``parameter``: the one that gave the size (``images`` for a tensor of videos, fed as it is).

    Raises:
        OptionError: naming ``parameter``.
    """
    from ..recording.module_index import named_module_list

    modules = [module for _, module in named_module_list(model)]
    for embeddings in (m for m in modules if type(m).__name__ == "TimesformerEmbeddings"):
        patch = embeddings.patch_embeddings.patch_size
        rows, columns = image_size[0] // patch[0], image_size[1] // patch[1]
        said = f"got {image_size[0]}x{image_size[1]} ({rows}x{columns} patches of {patch[0]}x{patch[1]} px)"
        if columns == 1 and rows != embeddings.num_patches:
            raise OptionError(parameter, f"{type(model).__name__} takes frames at least two patches wide (or of its "
                                         f"{embeddings.num_patches} patches): its embeddings read a frame one patch "
                                         f"wide as one row taller than it is, and its position embeddings do not "
                                         f"fit; {said}")
    for layer in (m for m in modules if type(m).__name__ == "TimesformerLayer"):
        if getattr(layer, "attention_type", None) != "divided_space_time":
            continue
        config = layer.config
        row = config.image_size // config.patch_size  # as the layer takes it
        rows, columns = image_size[0] // config.patch_size, image_size[1] // config.patch_size
        said = f"got {image_size[0]}x{image_size[1]} ({rows}x{columns} patches of {config.patch_size} px)"
        if (rows * columns) % row:
            raise OptionError(
                parameter, f"{type(model).__name__} takes a size whose patches per frame are a multiple of {row}: "
                f"its divided space-time blocks cut each frame into rows of config.image_size // patch_size = "
                f"{config.image_size} // {config.patch_size} patches whatever the input's width (such as "
                f"{config.image_size}x{config.image_size}); {said}")
        return


def _pads_partial_patches(owner: torch.nn.Module, conv: torch.nn.Conv2d) -> bool:
    """Whether a patch embedding takes an image that is not a whole number of patches without losing pixels.
    timm's says so (``dynamic_img_pad``; without it, it asserts whole patches); transformers' Swin family pads in
    its forward (``maybe_pad``). Any other patchifying convolution (kernel = stride, no padding: transformers'
    ViT, DINOv2, BEiT, SigLIP with ``interpolate_pos_encoding``) floors, and the partial patches at the right
    and bottom edges are never seen while the run would state the size it was given. A convolution with
    overlapping or padded windows is not a patchify, and is left to the model."""
    from ..recording.transformers_capture import forward_source

    if hasattr(owner, "dynamic_img_pad"):
        return bool(owner.dynamic_img_pad)
    # Padding given as a string ("same", "valid") is left to the model as well.
    if tuple(conv.stride) != tuple(conv.kernel_size) or conv.padding != (0, 0):
        return True
    return hasattr(owner, "maybe_pad") or "pad(" in forward_source(type(owner))


def _own_model_dtype(model: torch.nn.Module, dtype, resolved: torch.dtype) -> torch.dtype:
    """The dtype a model the caller passed runs in, its pixels' dtype: that of most of its weights. The run moves
    the model to the device in place, as any inference does, but converting its weights to another dtype would
    change the caller's model beyond repair (float32 weights rounded to bfloat16): that is refused, and weights of
    other dtypes beside (float32 norms in a bfloat16 model) are left as they are.

    Raises:
        OptionError: ``dtype`` differs from the model's, or the model's is not one the run takes.
    """
    # The dtype of most of its weights: a bfloat16 model may keep its norms in float32, or a scalar in float64.
    sizes: dict[torch.dtype, int] = {}
    for parameter in model.parameters():
        if parameter.is_floating_point():
            sizes[parameter.dtype] = sizes.get(parameter.dtype, 0) + parameter.numel()
    if not sizes:
        return resolved
    own = max(sizes, key=sizes.get)
    if own not in DTYPES.values():
        raise OptionError("dtype", f"the model passed is {str(own).removeprefix('torch.')}; profile runs "
                                   f"{', '.join(DTYPES)}: convert a copy of it (model.to(...)) and pass that")
    if dtype is not None and resolved != own:
        raise OptionError("dtype", f"the model passed is {str(own).removeprefix('torch.')}; converting it to "
                                   f"{str(resolved).removeprefix('torch.')} would change your model in place: pass a "
                                   "converted copy (model.to(...)) and leave dtype unset")
    return own


def no_known_preprocessing(parameter: str, shape: str) -> OptionError:
    """The error for image files given with a model whose preprocessing is unknown (a module built in Python),
    naming what works instead: pixels of ``shape``, or a spec. (An image size would not do: the mean and std are
    unknown too.)"""
    return OptionError(parameter, f"this model has no known preprocessing (a module built in Python); pass "
                                  f"preprocessed pixels as a {shape} tensor, or the model as a spec whose "
                                  "preprocessing vitmad reads ('timm:NAME', 'hf:NAME_OR_FOLDER'; a MONAI 3-D "
                                  "network on NIfTI volumes: 'monai:<ViT|UNETR|ViTAutoEnc|SwinUNETR>' with "
                                  "model_args)")


def model_input_size(module: torch.nn.Module) -> tuple[int, int] | None:
    """The one input size a model takes, where it says so: a timm patch embedding with ``strict_img_size`` and
    neither ``dynamic_img_size`` nor ``dynamic_img_pad`` (which asserts the size inside the forward); None for
    models that take other sizes or do not say."""
    embed = getattr(module, "patch_embed", None)
    size = getattr(embed, "img_size", None)
    if (not getattr(embed, "strict_img_size", False) or getattr(embed, "dynamic_img_pad", False)
            or getattr(module, "dynamic_img_size", False) or size is None or len(size) != 2):
        return None
    return int(size[0]), int(size[1])


def _image_batches(images, preprocessing, batch_size: int, max_images: int | None, pool: Executor | None,
                   frames: int | None = None, native: NativeFeed | PackedVideoFeed | None = None,
                   channels: int | None = None, input_size: tuple[int, int] | None = None,
                   model: tuple[str, bool] = ("the model", False)):
    """Image (or, for a video model taking ``frames`` frames, video) names and a function loading global batch
    ``i``; ``native``: each image at its own aspect ratio, or (:class:`PackedVideoFeed`) each clip through a packed
    tower's video processor; ``channels``, ``input_size``: what a pixel tensor must have, where the model says
    (:func:`~vitmad.recording.towers.image_channels`, :func:`model_input_size`); ``model``: its name and whether it
    is a packed vision tower, for the message on clips among images."""
    packed_videos = isinstance(native, PackedVideoFeed)
    volumes = isinstance(preprocessing, VolumePreprocessing)
    if volumes and isinstance(images, torch.Tensor):
        raise OptionError("images", "a monai: spec reads NIfTI volumes (.nii, .nii.gz) and their voxel spacing: pass "
                                    "files or folders of them, not a tensor")
    if packed_videos and isinstance(images, torch.Tensor):
        raise OptionError("images", "a packed vision tower's videos go through its model's video processor, which "
                                    "samples, resizes and cuts each clip: pass clip files or frame folders, not a "
                                    "tensor")
    if native is not None and not packed_videos and (isinstance(images, torch.Tensor) or frames is not None):
        raise OptionError("images", "image_size='native' resizes each image itself: pass image files (of an image "
                                    "model), not a tensor or videos")
    if isinstance(images, torch.Tensor):
        expected = 4 if frames is None else 5
        c = 3 if channels is None else channels  # the model's own count where it says (a 1-channel medical ViT)
        shape = f"[B, {c}, H, W]" if frames is None else f"[B, frames, {c}, H, W]"
        if images.dim() != expected:
            # A 3-D network's [B, C, D, H, W] volumes: profiled from their files, whose headers give the spacing. A
            # tiling processor's [images, tiles, 3, H, W]: recorded through the model's own forward, which drops
            # the padding tiles a flattened tensor would count (QA 260).
            tiles = frames is None and images.dim() == 5 and images.shape[2] == 3
            volume = (" (the tiles of a processor that cuts each image into several, [images, tiles, 3, H, W]: "
                      "record the model's own forward instead, with vitmad.record(model) as rec: "
                      "model(**processor(images=..., return_tensors='pt')), which drops the padding tiles a "
                      "flattened tensor would count)" if tiles else
                      " (volumes of a MONAI 3-D network are profiled from NIfTI files with a "
                      "'monai:<ViT|UNETR|ViTAutoEnc|SwinUNETR>' spec and model_args)" if frames is None
                      and images.dim() == 5 else "")
            raise OptionError("images", f"a tensor of {'videos' if frames else 'images'} must be {shape}, got "
                                        f"shape {list(images.shape)}{volume}")
        if frames is not None and images.shape[1] != frames:
            raise OptionError("images", f"the video model takes {frames} frames a video, [B, {frames}, {c}, H, W]; "
                                        f"got a tensor of shape {list(images.shape)} (video files are sampled to "
                                        f"{frames} frames; a tensor is fed as it is)")
        if channels is not None and images.shape[-3] != channels:
            raise OptionError("images", f"the model takes {channels} channels, {shape}; "
                                        f"got a tensor of shape {list(images.shape)}")
        if input_size is not None and tuple(images.shape[-2:]) != input_size:
            raise OptionError("images", f"the model takes {input_size[0]}x{input_size[1]} px images only; got a "
                                        f"tensor of shape {list(images.shape)} (resize it, or build the model to take "
                                        "other sizes: timm's dynamic_img_size=True)")
        if not images.is_floating_point():  # 0-255 bytes would be taken for normalised pixels
            advice = ("pass image files to have them preprocessed" if preprocessing is not None else
                      "this model's preprocessing is unknown (a module built in Python): normalise them as it was "
                      "trained, or pass the model as a spec ('timm:NAME', 'hf:NAME_OR_FOLDER') and image files")
            raise OptionError("images", f"a tensor of pixels must be preprocessed (normalised floats, {shape}), "
                                        f"got {images.dtype}; {advice}")
        if images.shape[0] == 0:
            raise OptionError("images", f"the pixel tensor holds no image (shape {list(images.shape)})")
        pixels = images[:max_images] if max_images else images
        names = [f"tensor[{i}]" for i in range(pixels.shape[0])]

        def load_rows(i: int) -> Batch:
            rows = slice(i * batch_size, (i + 1) * batch_size)
            batch, batch_names = pixels[rows], names[rows]
            # A NaN or inf pixel makes every statistic of its image NaN, and the means over all images with it:
            # such a row is skipped, named, as an unreadable file is.
            finite = torch.isfinite(batch).flatten(1).all(1).cpu()
            if bool(finite.all()):
                return batch, batch_names, []
            rows_ok = list(zip(batch_names, finite.tolist()))
            skipped = [(name, "non-finite pixel values (NaN or inf)") for name, ok in rows_ok if not ok]
            kept = [name for name, ok in rows_ok if ok]
            return (batch[finite.to(batch.device)] if kept else None), kept, skipped

        return names, load_rows
    if not isinstance(images, (str, os.PathLike, list, tuple)):
        raise OptionError("images", f"expected 'builtin', a folder, a file, a list of those or a pixel tensor, "
                                    f"got {type(images).__name__}")
    # The pixel tensor this model takes (a video model's: its config's frame count, QA 301).
    tensor_shape = (f"[B, {channels or 3}, H, W]" if frames is None else
                    f"[B, frames ({frames}), {channels or 3}, H, W]")
    if isinstance(images, (list, tuple)) and not all(isinstance(item, (str, os.PathLike)) for item in images):
        kinds = sorted({type(item).__name__ for item in images if not isinstance(item, (str, os.PathLike))})
        raise OptionError("images", f"a list must hold image files and folders (paths), got {', '.join(kinds)} in "
                                    "it" + (f"; stack pixel tensors into one {tensor_shape} tensor" if "Tensor" in kinds
                                            else ""))
    if preprocessing is None:
        raise no_known_preprocessing("images", tensor_shape)
    if volumes:
        files = find_volumes(images)
    else:
        files = find_images(images) if frames is None and not packed_videos else find_videos(images)
        if frames is None and not packed_videos:
            # (The command found its files itself: each is named here, so kept.)
            sources = [images] if isinstance(images, (str, os.PathLike)) else list(images)
            files = without_earlier_outputs(files, sources, "images", stacklevel=4)
            files = without_clips(files, *model, stacklevel=4)  # at the caller of profile()
    if max_images:
        files = files[:max_images]
    # The decoders, said before the run starts (at the first batch the model was loaded and the bar drawn).
    if (frames is not None or packed_videos) and any(not f.is_dir() for f in files):
        import_optional("av", "profile", "decoding video files")
    if frames is None and not packed_videos and not volumes and files:
        import_optional("PIL.Image", "profile", "decoding image files")  # (QA 296: said after the model loaded)
    if volumes and files:
        import_optional("nibabel", "volumes", "reading NIfTI volumes")
    names = [str(f) for f in files]

    def load_files(i: int) -> Batch:
        paths = files[i * batch_size:(i + 1) * batch_size]
        if volumes:
            pixels, loaded, skipped = load_volume_batch(paths, preprocessing, pool)
        elif packed_videos:
            pixels, loaded, skipped = load_packed_video_batch(paths, native, pool)
        elif native is not None:
            pixels, loaded, skipped = load_native_batch(paths, native, pool)
        elif frames is None:
            pixels, loaded, skipped = load_batch(paths, preprocessing, pool)
        else:
            pixels, loaded, skipped = load_video_batch(paths, frames, preprocessing, pool)
        return pixels, [str(p) for p in loaded], [(str(p), r) for p, r in skipped]

    return names, load_files


def plan_run(
    model,
    images,
    *,
    batch_size: int,
    device,
    dtype,
    renormalize: bool,
    image_size,
    max_images: int | None,
    layers: Sequence[str] | None,
    checkpoint,
    checkpoint_every: int,
    model_checkpoint,
    decoders: Executor | None,
    distributed: DistributedRun | None,
    stats: str | Sequence[str] | None = None,
    videos: bool | None = None,
    model_args=None,
    intensity: str | None = None,
    volume_unit: str | None = None,
    layout: dict | None = None,
) -> RunPlan:
    """Check the options (cheap checks first: a bad one fails before the model loads) and plan the run.

    Raises:
        OptionError: an option is invalid; the message starts with the parameter's name.
    """
    check_positive("batch_size", batch_size, optional=False)
    check_positive("max_images", max_images)
    check_positive("checkpoint_every", checkpoint_every, "a positive number of batches", optional=False)
    check_flag("renormalize", renormalize)
    check_layers(layers)
    if videos is not None:
        check_flag("videos", videos)
        videos = bool(videos)  # NumPy's False is no `False` to the `is` tests below (QA 294)
    stats = resolve_stats(stats)
    run = distributed if distributed is not None else current_run()
    rank, world = (run.rank, run.world_size) if run else (0, 1)
    size = parse_image_size(image_size)
    device = resolve_device(device)
    if run is not None:
        device = run.device(device)
    torch_dtype = resolve_dtype(dtype)
    if checkpoint is not None:
        check_checkpoint_path(checkpoint)
    loaded, preprocessing = prepare_model(model, size, model_checkpoint, model_args, intensity, volume_unit)
    if isinstance(model, torch.nn.Module):
        torch_dtype = _own_model_dtype(model, dtype, torch_dtype)
    if _packed_videos(loaded, images, videos):
        if size not in (None, NATIVE):
            raise OptionError("image_size", f"{size[0]}x{size[1]} given, but a packed vision tower's video processor "
                                            "resizes each clip by its own rule (sides multiples of patch x merge "
                                            "within its pixel budget): leave image_size unset")
        native = packed_video_feed(loaded)
    else:
        native = native_feed(loaded) if size == NATIVE else None
        if native is None:
            check_fixed_size(loaded, size, isinstance(images, torch.Tensor))
    if (isinstance(images, torch.Tensor) and size not in (None, NATIVE) and images.dim() >= 2
            and tuple(images.shape[-2:]) != tuple(size)):  # (fewer dims: the shape is refused below, QA 306)
        # The size resizes image files; a tensor is fed as it is, and its size is the run's.
        raise OptionError("image_size", f"{size[0]}x{size[1]} given, but the pixel tensor is "
                                        f"{images.shape[-2]}x{images.shape[-1]} (shape {list(images.shape)}): a tensor "
                                        "is fed as it is; leave image_size unset")
    frames = model_frames(loaded.module)  # a video model's frame count (its config's), else None
    if isinstance(images, torch.Tensor) and size is None and frames is None and images.dim() == 4:
        # A tensor is fed as it is: its size is checked as a given image_size is.
        _check_patches_fit(loaded.module, tuple(images.shape[-2:]), "images")
    names, load = _image_batches(images, preprocessing, batch_size, max_images, decoders, frames, native,
                                 image_channels(loaded.module), model_input_size(loaded.module),
                                 (f"{type(loaded.module).__name__} ({loaded.spec})",
                                  find_packed_tower(loaded.module) is not None))
    if isinstance(images, torch.Tensor) and frames is not None:
        # A tensor of videos, its shape checked above, is fed as it is: its frames' size is checked as a given
        # image_size is (a size equal to it is the tensor's own; another was refused).
        _check_timesformer_size(loaded.module, tuple(images.shape[-2:]), "images")
    settings = {
        "renormalize": bool(renormalize),
        "dtype": str(torch_dtype).removeprefix("torch."),
        "image_size": size if size in (None, NATIVE) else list(size),
        "preprocessing": native.to_dict() if native else preprocessing.to_dict() if preprocessing else None,
        "batch_size": batch_size,
        "layers": list(layers) if layers else None,
    }
    if frames is not None:
        # A video model's frame count comes from its config, not its weights: a resume after the config changed it
        # would mix clips sampled to two counts (QA 235).
        settings["frames"] = frames
    if loaded.description is not None:  # the part of a checkpoint profiled (a vision-language model's tower)
        settings["profiled"] = loaded.description
    if loaded.model_args is not None:  # a monai: network: its architecture is these, not a name
        settings["model_args"] = loaded.model_args
    # The weights themselves, not only the model's name: a resume with other weights (another --weights file,
    # another fine-tune in an hf: folder, another module of the same class) would mix two models' sums.
    settings["weights"] = weights_digest(loaded.module, loaded.unloaded)
    if stats != ("mad",):
        # Only when asked for: a MAD-only run keeps the mad.json and the fingerprint (its checkpoints) it had.
        settings["stats"] = list(stats)
    layout_options, layout_said = _layout_options(layout or {}, native is not None or frames is not None or isinstance(
        preprocessing, VolumePreprocessing))
    if layout_said:  # only when given: a run without keeps the fingerprint it had
        settings["layout"] = layout_said
    # The model's config and structure too (not written to mad.json): a config.json edited between a run and its
    # resume changes what the same weights compute. A local folder is known by what it holds, not by its path (a
    # resume spelling it another way was refused, QA 276; torchrun's nodes may hold it at other paths, QA 285).
    earlier = {"model": loaded.spec, "rank": rank, "world_size": world, **settings}
    identity = {**earlier, "model": _spec_identity(loaded.spec), "architecture": architecture_digest(loaded.module)}
    if isinstance(images, torch.Tensor):  # rows named tensor[i]: their values tell two tensors apart
        identity["pixels"] = tensors_digest([("pixels", images[:max_images] if max_images else images)])
    else:  # files: their sizes and times tell an image replaced under the same name apart
        identity["files"] = files_digest(names)
    run_id = fingerprint(identity, names)
    # A checkpoint of vitmad before 2026-12-06, which made the fingerprint without the architecture: it resumes.
    earlier_id = fingerprint({**earlier, **{k: identity[k] for k in ("pixels", "files") if k in identity}}, names)
    if run is not None:
        check_same_run(run, identity, names)
    # Rank r takes global batches r, r + W, ...: the same batches as a single process, each exactly once.
    batches = range(rank, math.ceil(len(names) / batch_size), world)
    record_options = {"renormalize": bool(renormalize), **({"layers": list(layers)} if layers else {}),
                      **layout_options}
    statistics = tuple(name for name in stats if name not in ("mad", "prefix_maps"))
    maps_skipped = None
    if "prefix_maps" in stats and isinstance(native, PackedVideoFeed):
        maps_skipped = "packed videos: every clip has its own token grid, so maps do not average"
    elif "prefix_maps" in stats and native is not None:
        maps_skipped = ("native resolution: every image has its own token grid, so maps do not average "
                        "(prefix_map_image.png: the first image's, where the model has tokens without a position: "
                        "class or register tokens, or an attention-pooling head's query)")
    elif "prefix_maps" in stats and frames is not None:
        maps_skipped = "video model: prefix maps are averaged for image models only"
    elif "prefix_maps" in stats and isinstance(preprocessing, VolumePreprocessing):
        maps_skipped = "volumes: prefix maps are averaged over 2-D image grids only"
    recorded = (*statistics, *(["prefix_maps"] if "prefix_maps" in stats and maps_skipped is None else []))
    drawn = "prefix_maps" in recorded or "prefix_maps" in stats and native is not None and not isinstance(
        native, PackedVideoFeed)  # a native-resolution run draws the first image's maps (QA 372)
    if drawn and loaded.unloaded:
        refuse_random_weights_before_attention(loaded.spec, loaded.module, loaded.unloaded, maps=True)
    if recorded:
        record_options["stats"] = ["mad", *recorded]
    _check_recordable(loaded.module, record_options, layers)
    return RunPlan(loaded, device, torch_dtype, names, load, batches, settings, run_id,
                   None if checkpoint is None else Path(checkpoint).expanduser(), checkpoint_every, record_options,
                   run, native, statistics, "prefix_maps" in stats, maps_skipped,
                   identity={**identity, "images": names}, converts_weights=not isinstance(model, torch.nn.Module),
                   earlier_fingerprint=earlier_id)


def _layout_options(layout: dict, own_grids: bool) -> tuple[dict, dict]:
    """``(record options, settings)`` of the token layout given to :func:`profile` (``positions``,
    ``num_prefix_tokens``, ``patch``, ``grid``: :func:`vitmad.record`'s own, which checks them further), the
    settings with ``positions`` known by shape and digest. A model of the user's that puts its class token last had
    it placed first, with a warning advising these, which profile did not take (QA 413). ``own_grids``: the run
    feeds a video model, volumes or native resolution, whose grids are the feed's.

    Raises:
        OptionError: naming the option: of the wrong type, or given where the feed sets the grids.
    """
    given = {name: value for name, value in layout.items() if value is not None}
    if not given:
        return {}, {}
    name = next(iter(given))
    if own_grids:
        raise OptionError(name, "a token layout is given for image models at a fixed size only: a video model, "
                                "volumes and native resolution have the grids their feed makes")
    options, said = {}, {}
    for name, value in given.items():
        if name == "positions":
            if callable(value) or not isinstance(value, torch.Tensor) or value.dim() != 2:
                got = list(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise OptionError("positions", "expected a tensor [N, 2] (or [N, 3]) of each token's pixel position, "
                                               f"NaN for a token without one, the same for every image, got {got}")
            options["positions"] = value.detach().cpu()
            # Of the tensor as given, its dtype too: a digest of other values (float64, then float32 ones) refused
            # to resume the checkpoints written before (QA 429, QA 430); the same positions in another dtype are
            # then another layout.
            said["positions"] = {"shape": list(value.shape),
                                 "digest": tensors_digest([("positions", options["positions"])])}
        elif name in ("num_prefix_tokens", "patch"):
            if isinstance(value, bool) or not isinstance(value, int):
                raise OptionError(name, f"expected an int, got {value!r}")
            options[name] = said[name] = int(value)
        elif name == "grid":
            if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or len(value) != 2 or any(
                    isinstance(v, bool) or not isinstance(v, int) for v in value):
                raise OptionError("grid", f"expected two ints (rows, columns), got {value!r}")
            options["grid"] = said["grid"] = [int(v) for v in value]
    return options, said


def _packed_videos(loaded: LoadedModel, images, videos: bool | None) -> bool:
    """Whether the run feeds clips to a packed tower through its video processor: ``videos`` True (the sources are
    clips or frame folders) for a model that is no video model of the fixed frame count; None (the default) where
    the model holds a packed tower and every source is a clip file or a folder holding clips.

    Raises:
        OptionError: (``videos``) ``videos`` True for a model that takes images only.
    """
    if model_frames(loaded.module) is not None or videos is False:
        return False
    packed = find_packed_tower(loaded.module) is not None
    if videos:
        if not packed:
            raise OptionError("videos", f"{type(loaded.module).__name__} is no video model (no frame count in its "
                                        "config) and no packed vision tower: it takes images")
        return True
    sources = [images] if isinstance(images, (str, os.PathLike)) else images
    return (packed and isinstance(sources, (list, tuple)) and bool(sources)
            and all(isinstance(s, (str, os.PathLike)) and is_video_source(s) for s in sources))


def _check_recordable(module: torch.nn.Module, record_options: dict, layers: Sequence[str] | None) -> None:
    """A model with nothing to record fails here, as a bad ``model`` (or ``layers``), before a checkpoint is
    written: a Recording finds its layers when made, and installs nothing until it is entered."""
    try:
        with warnings.catch_warnings():  # a compiled model's warning: each batch's recording gives it
            warnings.simplefilter("ignore")
            recording = Recording(module, **record_options)
    except NoLayerError as err:
        if layers:
            raise OptionError("layers", err.finding) from None
        raise OptionError("model", f"{err.finding}; if some of its modules compute softmax attention, "
                                   "vitmad.profile(..., layers=[their qualified names]) records them") from None
    except LayersError as err:  # a pattern matching no module, the model itself named: OptionErrors (QA 292)
        raise OptionError("layers", err.finding) from None
    classes = recording._class_layers
    if classes and classes == set(recording._modules):
        # XCiT: every other layer attends over channels. A profile is per-layer MAD first; the maps alone are
        # vitmad.record's.
        raise OptionError(
            "layers" if layers else "model",
            f"{type(module).__name__}: no chosen layer has a MAD, only class attention or attention pooling "
            f"({', '.join(sorted(classes))}), whose queries (a class token, learned queries, a pooled token) have no "
            "position; vitmad profile needs one layer with a MAD. The maps of those queries are recorded by "
            "vitmad.record(model, stats=['prefix_maps']) (rec.class_attention_maps)"
        )


def resume_state(plan: RunPlan, resume: bool) -> RunState:
    """The state saved in the plan's checkpoint when resuming (and one exists), else a fresh one."""
    if plan.checkpoint is None:
        return RunState()
    if not resume:
        _warn_unfinished(plan)
        return RunState()
    saved = load_checkpoint(plan.checkpoint, plan.fingerprint, plan.identity, plan.earlier_fingerprint)
    if saved is None and not plan.batches:
        # A torchrun rank with no share (more processes than batches) never writes a checkpoint: nothing was lost,
        # and "starting from the first image" read as if its progress had been (QA 387).
        return RunState()
    if saved is None:  # said, not silent: a mistyped --out resumes nothing and runs every image again
        # Worded without the parameter's name, which the command spells --resume (QA 290).
        warnings.warn(f"no checkpoint to resume at {plan.checkpoint}; starting from the first image", stacklevel=3)
        return RunState()
    return RunState.from_state_dict(saved)


def _warn_unfinished(plan: RunPlan) -> None:
    """A run started over where an interrupted one left its progress says so: the first checkpoint of this run
    replaces that progress. Under torchrun every rank says it of its own checkpoint: one rank's share may be
    finished and another's not (QA 303: the main rank's alone was read)."""
    saved = read_checkpoint(plan.checkpoint)
    if saved is None:
        return
    done = saved.get("batches_done", 0)
    total = saved.get("batches_total")
    if total is None and saved.get("fingerprint") in (plan.fingerprint, plan.earlier_fingerprint):
        total = len(plan.batches)  # written before checkpoints said how many batches their run had
    if total is not None and done < total:
        warnings.warn(f"{plan.checkpoint} holds an interrupted run's progress ({done} of {total} batches); this run "
                      "starts over and replaces it (--resume, or resume=True, continues that run instead)",
                      stacklevel=4)


def _run_batch(plan: RunPlan, state: RunState, batch: Batch) -> RunState:
    """The state with one loaded batch profiled and added."""
    from ..recording import record

    pixels, loaded_names, batch_skipped = batch
    if batch_skipped:
        kind = "volume" if isinstance(plan.loaded.preprocessing, VolumePreprocessing) else (
            "video" if _takes_videos(plan) else "image")
        for path, reason in batch_skipped:
            warnings.warn(f"skipping {kind} {path}: {reason}", stacklevel=4)  # at the caller of profile()
    stats, meta, maps = state.stats, state.meta, state.maps
    if pixels is not None and plan.native is not None:
        # Images at their own size: one forward per packed batch or per image; each image's grid is kept.
        with torch.inference_mode(), record(plan.loaded.module, **plan.record_options) as rec:
            plan.native.forwards(plan.loaded, pixels, plan.device, plan.dtype)
        mad, geometry, grids = native_geometry(rec)
        whole_clips = isinstance(plan.native, PackedVideoFeed) and plan.native.whole_clip
        if whole_clips:
            # Clips attended over space and time: their temporal MAD rides as L more rows, as a video model's.
            mad = torch.cat([mad, torch.cat([call.temporal_mad for call in rec.calls], dim=1)])
        if plan.statistics:
            # The other statistics ride as more blocks of L rows of the same sums, as the temporal MAD does.
            mad = torch.cat([mad, *(torch.cat([call.stat(name) for call in rec.calls], dim=1)
                                    for name in plan.statistics)])
        if isinstance(plan.native, PackedVideoFeed):  # the entries are the clips' slices or rows: one row a clip
            mad, grids = plan.native.per_clip(mad, grids, pixels)
        stats = (stats or RunningStats.empty(*mad.shape[::2])).add(mad)
        meta = {"layers": list(rec.layers), "layout": None, "geometry": geometry, "skipped_layers": dict(rec.skipped),
                "image_grids": {**(meta or {}).get("image_grids", {}), **dict(zip(loaded_names, grids))},
                **({"temporal": True} if whole_clips else {})}
    elif isinstance(pixels, VolumeBatch):
        mad, rec = _volume_values(plan, pixels)
        stats = (stats or RunningStats.empty(*mad.shape[::2])).add(mad)
        first = rec.geometry[0]
        grid = [first.depth, *first.grid] if first.depth is not None else list(first.grid)
        volumes = {name: {"grid": grid, "size": list(pixels.pixels.shape[2:]), **info}
                   for name, info in zip(loaded_names, pixels.info)}
        meta = {"layers": list(rec.layers), "layout": layout_dict(rec.layout),
                "geometry": [g.as_dict() for g in rec.geometry], "skipped_layers": dict(rec.skipped),
                "temporal": False, "image_grids": {**(meta or {}).get("image_grids", {}), **volumes}}
    elif pixels is not None:
        module = plan.loaded.module
        with torch.inference_mode(), record(module, **plan.record_options) as rec:
            plan.loaded.forward(pixels.to(device=plan.device, dtype=plan.dtype, non_blocking=True))
        mad, call = rec.mad, rec.calls[-1]
        video = all(t is not None for t in call.temporal)
        if video:
            # The temporal statistics ride as L more rows of the same sums, so checkpoints and the merge across
            # processes carry them unchanged; finish() splits them off.
            mad = torch.cat([mad, rec.temporal_mad])
        if plan.statistics:
            recorded = rec.stats
            mad = torch.cat([mad, *(recorded[name] for name in plan.statistics)])
        stats = (stats or RunningStats.empty(*mad.shape[::2])).add(mad)
        if plan.prefix_maps and plan.maps_skipped is None:
            differential = [i for i, name in enumerate(rec.layers) if name in call.components]
            # The class-attention and pooling layers' maps follow the layers' own, as map indices L, L + 1, ...
            _, layer_maps, layer_geometry = zip(*call.map_layers)
            maps = (maps or PrefixMapSums()).add(layer_maps, layer_geometry, pixels, differential=differential)
        meta = {"layers": list(rec.layers), "layout": layout_dict(rec.layout),
                "geometry": [g.as_dict() for g in rec.geometry], "skipped_layers": dict(rec.skipped),
                "temporal": video}
        if call.class_layers:  # only with the maps; a profile without any keeps its checkpoint's meta
            meta.update(class_layers=list(call.class_layers), class_geometry=[g.as_dict() for g in call.class_geometry])
    skipped = tuple({"path": p, "reason": r} for p, r in batch_skipped)
    return RunState(stats, meta, state.images + tuple(loaded_names), state.skipped + skipped,
                    state.batches_done + 1, maps)


def _volume_values(plan: RunPlan, batch: VolumeBatch) -> tuple[torch.Tensor, Recording]:
    """``[L * blocks, B, H]`` values of a batch of volumes (MAD, then each of the plan's statistics) and the last
    recording. Each group of volumes of one spacing runs in a forward of its own, recorded with that spacing, so
    that every volume's distances are in millimetres of its own voxels (never one batch's mean spacing); entries
    of the model (LayerNorm, no batch statistics) do not depend on the others of their batch."""
    from ..recording import record

    values = None
    for spacing, rows in spacing_groups(batch.spacings).items():
        options = plan.record_options if spacing is None else {**plan.record_options, "spacing": spacing}
        pixels = batch.pixels[rows].to(device=plan.device, dtype=plan.dtype, non_blocking=True)
        with torch.inference_mode(), record(plan.loaded.module, **options) as rec:
            plan.loaded.forward(pixels)
        found = torch.cat([rec.mad, *(rec.stats[name] for name in plan.statistics)])
        if values is None:
            values = found.new_full((found.shape[0], len(batch.spacings), found.shape[2]), float("nan"))
        values[:, rows] = found
    return values, rec


def _spec_identity(spec: str) -> str:
    """``spec`` for the run's identity: an ``hf:`` local folder is known by what it holds (its weights, config and
    preprocessing, each in the identity), not by how its path is spelled."""
    kind, _, name = spec.partition(":")
    return LOCAL_FOLDER if kind == "hf" and Path(name).expanduser().is_dir() else spec


def _takes_videos(plan: RunPlan) -> bool:
    """Whether the run's inputs are videos (a video model's, or a packed tower's through its video processor)."""
    return model_frames(plan.loaded.module) is not None or isinstance(plan.native, PackedVideoFeed)


# The progress bars drawn now (profiles may run in several threads), and the warnings' display they replaced.
_BARS: list[tqdm] = []
_BARS_LOCK = threading.Lock()
_SHOWN_BEFORE: list[Callable] = []


def _show_above_bars(*args, **kwargs) -> None:
    """``warnings.showwarning`` while bars are drawn: the earlier display, with the bars cleared around it."""
    shown = _SHOWN_BEFORE[0]  # set before this function was first installed
    bar = _BARS[-1] if _BARS else None
    if bar is None:
        shown(*args, **kwargs)
        return
    with bar.external_write_mode():
        shown(*args, **kwargs)


@contextmanager
def _warnings_above(bar: tqdm) -> Iterator[None]:
    """Show warnings given while ``bar`` is drawn on lines of their own above it, not glued to its line.

    The earlier ``showwarning`` still shows them (a caller's ``catch_warnings(record=True)`` keeps its record);
    tqdm only clears its line before and draws it again after. Profiles overlapping in threads share one
    replacement, put back when the last of them ends (each putting back what it saw left another's in place).
    """
    with _BARS_LOCK:
        if not _BARS:
            _SHOWN_BEFORE[:] = [warnings.showwarning]
            warnings.showwarning = _show_above_bars
        _BARS.append(bar)
    try:
        yield
    finally:
        with _BARS_LOCK:
            _BARS.remove(bar)
            if not _BARS and warnings.showwarning is _show_above_bars:
                warnings.showwarning = _SHOWN_BEFORE[0]


# What vitmad refuses, each in a message of its own: a batch failing so is not run again to ask the model.
_VITMAD_REFUSALS = (NotPlaceable, NoLayerError, LayersError, OptionError)


def run_batches(plan: RunPlan, state: RunState, *, progress: bool) -> RunState:
    """Run the plan's remaining batches, checkpointing every ``checkpoint_every`` batches and at the end.

    The next batch is decoded on other threads while the model runs on this one. On any exception
    (``KeyboardInterrupt`` included) the checkpoint of every finished batch is saved, then it is re-raised.
    """
    from tqdm.auto import tqdm

    def save(current: RunState) -> None:
        # Not before an image was read: the checkpoint there (an interrupted earlier run's progress) stays until
        # this run has sums of its own; a run reading nothing replaced it with one of nothing, then removed it (QA
        # 284). A resume of a run cut before any image redoes its batches of unreadable files.
        if plan.checkpoint is not None and current.stats is not None:
            save_checkpoint(plan.checkpoint, plan.checkpoint_state(current))

    rank = plan.run.rank if plan.run else 0
    counter = GlobalProgress(plan.run)
    unit = "video" if _takes_videos(plan) else "volume" if isinstance(plan.loaded.preprocessing,
                                                                        VolumePreprocessing) else "img"
    bar = tqdm(total=len(plan.names), unit=unit, disable=not (progress and rank == 0), desc="vitmad profile",
               dynamic_ncols=True)
    bar.update(counter.add(len(state.images) + len(state.skipped)))
    plan.loaded.module.to(device=plan.device, **({"dtype": plan.dtype} if plan.converts_weights else {}))
    pending, started = plan.batches[state.batches_done:], state.batches_done
    prefetch = ThreadPoolExecutor(1, "vitmad-prefetch")
    upcoming = prefetch.submit(plan.load, pending[0]) if len(pending) else None
    with _warnings_above(bar) if not bar.disable else contextlib.nullcontext():
        try:
            for position in range(len(pending)):
                raise_dropped()  # a Ctrl-C a finalizer dropped (model loading, the last batch) ends the run here
                batch = upcoming.result()
                upcoming = prefetch.submit(plan.load, pending[position + 1]) if position + 1 < len(pending) else None
                try:
                    state = _run_batch(plan, state, batch)
                except NoAttentionRanError as err:  # modules named in layers= that compute none: said of layers
                    if "layers" not in plan.record_options:
                        raise
                    found = list(attention_modules(plan.loaded.module))
                    such = f", such as {', '.join(found[:4])}{', ...' if len(found) > 4 else ''}" if found else ""
                    raise OptionError("layers", f"{err.finding}; name the modules that compute its attention{such}") \
                        from None
                except _VITMAD_REFUSALS:
                    raise
                except MODEL_ERRORS as err:  # the model's own failure (a size it cannot run), or vitmad's
                    refusal = own_forward_refusal(plan, batch, err, ran_before=state.batches_done > 0)
                    if refusal is None:
                        raise
                    raise refusal from err
                bar.update(counter.add(len(batch[1]) + len(batch[2])) - bar.n)
                if state.batches_done % plan.checkpoint_every == 0:
                    raise_dropped()
                    save(state)
            raise_dropped()
            save(state)
        except BaseException:
            # Ctrl-C or a failure: keep every batch finished so far for resume. Where this run finished none, the
            # checkpoint there (a resumed run's, or an interrupted earlier run's that a new run was about to replace)
            # is left as it is: a Ctrl-C at the warning that the new run replaces it wiped that progress (QA 243), and
            # a run refused at its first batch (--image-size native on a hierarchy) left a checkpoint of nothing.
            if state.batches_done > started:
                save(state)
            raise
        finally:
            bar.close()
            prefetch.shutdown(wait=False, cancel_futures=True)
    return state


def finish(plan: RunPlan, state: RunState) -> Profile:
    """Merge the processes' results (under ``torch.distributed``) into the :class:`Profile`.

    Raises:
        OptionError: no image could be read.
    """
    stats, meta, images, skipped = state.stats, state.meta, list(state.images), list(state.skipped)
    maps = state.maps
    if plan.run is not None:
        order = {name: i for i, name in enumerate(plan.names)}
        stats, meta, images, skipped = merge_across_ranks(plan.run, stats, meta, images, skipped, order)
        if plan.prefix_maps:
            maps = merge_prefix_maps(plan.run, maps)
    if stats is None:
        kind = "volumes" if isinstance(plan.loaded.preprocessing, VolumePreprocessing) else (
            "videos" if _takes_videos(plan) else "images")
        # This run wrote no checkpoint (run_batches saves none before an image is read): a checkpoint there is an
        # earlier run's, kept (QA 284: an interrupted run's progress was lost to a run given the wrong folder).
        raise OptionError("images", f"none of the {len(plan.names)} {kind} could be read")
    world = plan.run.world_size if plan.run else 1
    layers = len(meta["layers"])
    blocks = ["mad", *(["temporal"] if meta.get("temporal") else []), *plan.statistics]
    split = {name: stats.rows(slice(i * layers, (i + 1) * layers)) for i, name in enumerate(blocks)}
    stats, temporal = split.pop("mad"), split.pop("temporal", None)
    if plan.prefix_maps:
        maps = PrefixMapSums.skipping(layers, plan.maps_skipped) if plan.maps_skipped else maps or PrefixMapSums()
    image_grids = meta.get("image_grids")
    if image_grids is not None:
        image_grids = {name: image_grids[name] for name in images}
    skipped_layers = dict(meta.get("skipped_layers", {}))  # absent in checkpoints of vitmad 0.1
    if plan.prefix_maps and plan.maps_skipped:
        # A class-attention or pooling layer's reason advises the maps (rec.class_attention_maps), which a run
        # without a common grid does not average: it has none (QA 332: unlisted under "prefix_maps", the advice
        # standing).
        skipped_layers = {name: f"{reason.split(';')[0]}; no MAD, and no mean map in this run ({plan.maps_skipped})"
                          if "rec.class_attention_maps" in reason else reason
                          for name, reason in skipped_layers.items()}
    return Profile(plan.loaded.spec, meta["layers"], meta["layout"], stats, images, skipped, plan.settings, world,
                   meta.get("geometry"), skipped_layers,
                   temporal=temporal, image_grids=image_grids, statistics=split, prefix_maps=maps,
                   class_layers=meta.get("class_layers", []), class_geometry=meta.get("class_geometry", []))


def profile(
    model,
    images="builtin",
    *,
    batch_size: int = 16,
    device: str | torch.device | None = "auto",
    dtype: str | torch.dtype | None = None,
    renormalize: bool = False,
    image_size: str | int | Sequence[int] | None = None,
    max_images: int | None = None,
    layers: Sequence[str] | None = None,
    checkpoint: str | os.PathLike | None = None,
    resume: bool = False,
    checkpoint_every: int = 8,
    model_checkpoint: str | os.PathLike | None = None,
    progress: bool = False,
    loader_threads: int = 4,
    distributed=None,
    stats: str | Sequence[str] | None = None,
    videos: bool | None = None,
    model_args=None,
    intensity: str | None = None,
    volume_unit: str | None = None,
    positions: torch.Tensor | None = None,
    num_prefix_tokens: int | None = None,
    patch: int | None = None,
    grid: Sequence[int] | None = None,
) -> Profile:
    """Profile the mean attention distance of every head of ``model`` over ``images``.

    Args:
        model: an ``nn.Module`` (any model :func:`vitmad.record` measures), or a spec as ``--model`` takes it:
            ``hf:<id or folder>``, ``timm:<name>``, ``torchvision:<name>[.<WEIGHTS>]``,
            ``open_clip:<name>[.<pretrained tag>]``, ``segment_anything:<vit_b|vit_l|vit_h>``, ``sam2:<config>``,
            ``monai:<ViT|UNETR|ViTAutoEnc|SwinUNETR>`` (with ``model_args``), ``builtin:dinov2-s14``.
        images: ``"builtin"``, a folder (recursive), a file, a list of those, or preprocessed pixels
            ``[B, 3, H, W]``. Files need a model loaded from a spec (which knows its preprocessing). A video
            model (its config has ``num_frames`` or ``frames_per_clip``) takes videos instead: clip files, frame
            folders, folders of those (:mod:`vitmad.profiling.videos`), or pixels ``[B, frames, 3, H, W]``.
        batch_size: images per forward pass.
        device: ``"auto"`` (CUDA when present), ``"cpu"``, ``"cuda"``, ``"cuda:1"``...
        dtype: ``"float32"`` (default), ``"bfloat16"`` or ``"float16"`` for the model and its inputs. A model
            passed as an ``nn.Module`` runs in its own dtype (it is moved to ``device`` in place, never converted:
            another ``dtype`` is an error).
        renormalize: MAD over the attention mass on patches only (``docs/definition.md``).
        image_size: ``S``, ``"HxW"`` or ``(H, W)`` instead of the model's own input size, or ``"native"``: each
            image at its own aspect ratio, resized to whole patches within the model's token budget, for
            NaFlex models (SigLIP2, timm NaFlexViT: packed batches), the packed vision towers of Qwen2-VL,
            Qwen2.5-VL, Qwen3-VL (and their kin), MiniMax-M3-VL, Cosmos3-Edge, LFM3-VL, PaddleOCR-VL, Ovis2.5,
            Muse Glimmer / Spark, VideoLLaMA3, HunYuanVL, HY-V4-VL and Pixtral (the model's
            own image processor; one packed forward per batch) and
            ViTs whose position embedding follows the input (one image per forward); ``mad.json`` then lists
            every image's grid. The Qwen and Pixtral towers take ``"native"`` or a size of whole patches.
        max_images: profile only the first ``K`` image files (sources in the order given, each folder sorted): an
            unreadable one among them counts, and is listed as skipped, so that the batches, resume and torchrun
            are those of the file list.
        layers: attention module names (wildcards as :func:`vitmad.record` takes them); all by default. The
            layers named are counted in the order they run (``mad.json``'s ``index``, the figures' axis), not at
            their depth in the model; the figures and ``compare`` say so.
        checkpoint: file for the running sums; written atomically every ``checkpoint_every`` batches. An existing
            file that is not a vitmad checkpoint is refused rather than overwritten.
        resume: continue from ``checkpoint`` if it exists (same model, images and settings).
        checkpoint_every: batches between checkpoints.
        model_checkpoint: local weights file for a ``timm:``, ``torchvision:`` or ``open_clip:`` spec (instead of
            its pretrained download); the checkpoint a ``segment_anything:``, ``sam2:`` or ``monai:`` spec
            requires. Refused beside a module, whose weights are its own.
        progress: show a tqdm bar with images/s (on rank 0, counting every rank's images).
        loader_threads: threads decoding and preprocessing image files (0: on the calling thread); batches
            are loaded one ahead of the model either way.
        distributed: a :class:`vitmad.profiling.distributed.DistributedRun`; by default the process group the
            caller initialised, if any. Each rank profiles its share of the batches and every rank returns
            the whole result; ``checkpoint`` must then be a file per rank.
        stats: what to profile besides MAD, from the same forward (:func:`vitmad.record`'s statistics):
            ``"entropy"`` (nats), ``"prefix_mass"``, ``"self_mass"`` (running statistics per layer and head like
            MAD's), ``"prefix_maps"`` (the CLS / register maps, mean over images); a list, a comma list, or
            ``"all"``. MAD only by default.
        videos: the sources are videos (clips, frame folders) for a packed vision tower (Qwen2-VL, Qwen2.5-VL,
            Qwen3-VL and Qwen3-VL's kin), each fed through its model's own video processor
            (:mod:`vitmad.profiling.packed_videos`); None: so where every source is a clip or a folder holding
            clips; False: images. A video model takes videos either way.
        model_args: a ``monai:<ViT|UNETR|ViTAutoEnc|SwinUNETR>`` spec's constructor arguments (a dict, a JSON or
            YAML file, or a JSON object as text; :mod:`vitmad.profiling.monai_models`); its weights are
            ``model_checkpoint``, and ``images`` are NIfTI volumes or folders of them
            (:mod:`vitmad.profiling.volumes`).
        intensity: how a volume's values are scaled: ``"minmax"`` (default), ``"zscore"``, ``"window:LOW,HIGH"``
            or ``"none"``.
        volume_unit: ``"mm"`` (default: MAD in millimetres, from each volume's voxel spacing) or ``"voxel"``.
        positions, num_prefix_tokens, patch, grid: the token layout, as :func:`vitmad.record` takes it, for a
            model whose layout vitmad cannot read or only assumes (a model of your own with its class token last:
            ``positions=``, the same ``[N, 2]`` for every image; extra tokens first: ``num_prefix_tokens=``); image
            models at a fixed size. Part of the run's settings (``positions`` by shape and digest).

    Returns:
        The :class:`Profile` (``.mad`` and ``.std`` are ``[L, H]``; video models add ``.temporal_mad``, frames;
        ``.stat(name)`` and ``.prefix_maps`` give the other statistics).

    Raises:
        OptionError (a ValueError), MissingPathError (also a FileNotFoundError): bad model spec, images, size,
            device or dtype, or a ``checkpoint`` folder that cannot be written (checked before the model
            loads); the message starts with the parameter's name. Any exception (``KeyboardInterrupt``
            included) is re-raised after the checkpoint is saved.
    """
    check_loader_threads(loader_threads)
    check_flag("resume", resume)
    check_flag("progress", progress)
    if resume and checkpoint is None:
        raise OptionError("resume", "resume continues from a checkpoint file: pass checkpoint= too")
    decoders = ThreadPoolExecutor(loader_threads, "vitmad-decode") if loader_threads > 0 else None
    try:
        plan = plan_run(
            model, images, batch_size=batch_size, device=device, dtype=dtype, renormalize=renormalize,
            image_size=image_size, max_images=max_images, layers=layers, checkpoint=checkpoint,
            checkpoint_every=checkpoint_every, model_checkpoint=model_checkpoint, decoders=decoders,
            distributed=distributed, stats=stats, videos=videos, model_args=model_args, intensity=intensity,
            volume_unit=volume_unit, layout={"positions": positions, "num_prefix_tokens": num_prefix_tokens,
                                             "patch": patch, "grid": grid},
        )
        announce = _PLANNED.get()
        if announce is not None:
            announce()
        with contextlib.ExitStack() as held:
            if plan.checkpoint is not None:  # one run at a time writes (and resumes) a checkpoint
                lock = plan.checkpoint.with_name(f".{plan.checkpoint.name}.lock")
                held.enter_context(held_by_this_run(lock, str(plan.checkpoint), "checkpoint"))
            state = run_batches(plan, resume_state(plan, resume), progress=progress)
            return finish(plan, state)
    finally:
        if decoders is not None:
            decoders.shutdown(wait=False, cancel_futures=True)
