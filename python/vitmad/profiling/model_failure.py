"""Whether a batch that failed under recording fails in the model's own forward too, and the refusal that says so.

A size the model's own code cannot run (transformers' LeViT and PVT at another size than their config's, Swin on a
map smaller than its window at native resolution, torchvision's MaxViT on a non-square input) raised a shape error
from deep inside the model, as a traceback naming no option (QA 330). What the model can run is known only by
running it; a blank-image probe at plan time would cost every run a forward (and video towers take clips). The
batch that failed is run again instead, without vitmad: where it fails there too, the failure is the model's, said
in one line naming the option; where it runs, the failure is vitmad's and its traceback is kept.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .images import NATIVE
from .options import OptionError, error_said
from .packed_videos import PackedVideoFeed
from .volumes import VolumeBatch

if TYPE_CHECKING:
    from .engine import Batch, RunPlan

__all__ = ["MODEL_ERRORS", "model_error", "own_forward_refusal"]

# What a model's own forward raises at a size it cannot run: shape mismatches (RuntimeError), its asserts, its
# checks (ValueError), an index out of its tables. (Not torch.OutOfMemoryError: not a size the model refuses.)
MODEL_ERRORS = (RuntimeError, AssertionError, ValueError, IndexError, TypeError)


# What an allocation that failed says (the CPU allocator raises a plain RuntimeError; cuBLAS and cuDNN name their own):
# memory, not a size the model refuses (QA 336: a batch too large for the CPU's memory was blamed on --image-size).
_OUT_OF_MEMORY = ("out of memory", "can't allocate memory", "DefaultCPUAllocator", "ALLOC_FAILED", "bad_alloc")


def model_error(err: BaseException) -> bool:
    """Whether ``err``, raised by a batch under recording, may be the model's own failure to run its input: one of
    :data:`MODEL_ERRORS`, not vitmad's (its messages start with "vitmad"), not an allocation that failed."""
    text = str(err)
    return (isinstance(err, MODEL_ERRORS) and not isinstance(err, torch.OutOfMemoryError)
            and not text.startswith("vitmad") and not any(said in text for said in _OUT_OF_MEMORY))


def _fails(run) -> BaseException | None:
    """The exception ``run()`` raises where it is the model's own (:func:`model_error`), else None."""
    try:
        with torch.inference_mode():
            run()
    except MODEL_ERRORS as err:
        return err if model_error(err) else None
    return None


def _size(pixels: torch.Tensor, dims: int = 2) -> str:
    return "x".join(str(side) for side in pixels.shape[-dims:])


def own_forward_refusal(plan: RunPlan, batch: Batch, plan_error: BaseException, ran_before: bool) -> OptionError | None:
    """The refusal for a batch whose recorded forward failed, where the model's own forward, without vitmad,
    fails on it too; None where it runs (the failure is vitmad's: raise it as it is).

    Args:
        plan: the run.
        batch: the batch that failed.
        plan_error: what it raised under recording: vitmad's own refusals (another thread recording the model) and
            a failed allocation are not asked about (None).
        ran_before: a batch of this run (or of the run it resumes) finished: at one fixed size, the size is not the
            cause then, and None is returned without a forward.
    """
    pixels, names, _ = batch
    if pixels is None or not model_error(plan_error) or isinstance(plan.native, PackedVideoFeed):
        # (A packed tower's clips are sized by its video processor's rule, not by an option of the run's.)
        return None
    module, size = plan.loaded.module, plan.settings["image_size"]
    model = type(module).__name__
    if plan.loaded.spec not in (None, model):  # (a module the caller passed has its class name as its spec)
        model = f"{model} ({plan.loaded.spec})"
    device = {"device": plan.device, "dtype": plan.dtype}
    # The dtype is said beside the size where it is not float32: a model's forward can fail for either.
    dtype = "" if plan.dtype == torch.float32 else f" in {str(plan.dtype).removeprefix('torch.')}"
    other = "; or another dtype" if dtype else ""
    if plan.native is not None:  # every image at its own size: any batch can be the first of a size
        if plan.native.kind == "dynamic":  # one forward an image: the image is named
            for name, image in zip(names, pixels):
                err = _fails(lambda image=image: plan.loaded.forward(image[None].to(**device)))
                if err is not None:
                    return OptionError("image_size", f"{model} does not run {name} at native resolution "
                                                     f"({_size(image)} px{dtype}): its own forward, without vitmad, "
                                                     f"fails with {error_said(err)}; give a fixed size{other}")
            return None
        err = _fails(lambda: plan.native.forwards(plan.loaded, pixels, plan.device, plan.dtype))
        if err is None:
            return None
        return OptionError("image_size", f"{model} does not run the images {', '.join(names)} at native resolution"
                                         f"{dtype}: its own forward, without vitmad, fails with {error_said(err)}; "
                                         f"give a fixed size{other}")
    if ran_before:
        return None
    if isinstance(pixels, VolumeBatch):
        tensor, dims, what = pixels.pixels, 3, "volumes"
    else:
        tensor, dims, what = pixels, 2, "clips" if pixels.dim() == 5 else "images"
    err = _fails(lambda: plan.loaded.forward(tensor.to(**device)))
    if err is None:
        return None
    said = f"its own forward, without vitmad, fails with {error_said(err)}"
    if size not in (None, NATIVE):
        return OptionError("image_size", f"{model} does not run at {size[0]}x{size[1]} px{dtype}: {said}; use its own "
                                         f"size, or one it takes{other}")
    if plan.identity.get("pixels") is not None:  # a tensor the caller gave, fed as it is, in batches
        return OptionError("images", f"{model} does not run the pixel tensor's first batch (shape "
                                     f"{list(tensor.shape)}{dtype}): {said}")
    return OptionError("model", f"{model} does not run its {what} at the size its own preprocessing gives "
                                f"({_size(tensor, dims)} px{dtype}): {said}")
