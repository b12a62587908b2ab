"""Running one profile on many processes with ``torch.distributed`` (launched by ``torchrun``).

How a run is split and put back together, so that the result equals a single-process run:
- the image list and its batches are the same on every rank (sorted files, fixed batch slices); rank ``r``
  of ``W`` takes global batches ``r, r + W, r + 2W, ...``, so every image is profiled exactly once, in the
  same batch as in a single-process run (same per-image values), and uneven tails just leave the last ranks
  one batch short;
- at the end the float64 sums, sums of squares and counts are all-reduced (min and max too), and the
  per-rank lists of processed and skipped files are gathered and put back in global order; the sums of the
  prefix maps (``--stats prefix_maps``) are gathered and added in rank order.
Only the order of the float64 additions differs from a single process: results agree to about 1e-13 relative (the
std, measured to 4.9e-14; the sums and means closer).

Each rank checkpoints its own part (``OUT/checkpoint.rank<R>-of-<W>.pt``), so a killed job resumed with the
same number of processes ends with the same result; the CLI refuses to resume with another number (the
batches would be dealt out differently).
"""

from __future__ import annotations

import datetime
import hashlib
import itertools
import json
import math
import os
from dataclasses import dataclass

import torch

from .options import OptionError
from .prefix_maps import PrefixMapSums
from .stats import RunningStats

__all__ = ["DistributedRun", "init_from_env", "current_run", "check_same_run", "merge_across_ranks",
           "merge_prefix_maps", "GlobalProgress"]

DEFAULT_TIMEOUT_S = 1800


@dataclass(frozen=True)
class DistributedRun:
    """This process's place in the job.

    Attributes:
        rank, world_size, local_rank: from the process group (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``).
        backend: ``"gloo"`` or ``"nccl"``.
        owns_group: this module initialised the process group (and tears it down).
    """

    rank: int
    world_size: int
    local_rank: int
    backend: str
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, requested: torch.device) -> torch.device:
        """The device of this rank: CUDA requests go to the local GPU ``cuda:LOCAL_RANK``."""
        if requested.type == "cuda" and requested.index is None:
            return torch.device("cuda", self.local_rank)
        return requested

    def close(self, *, wait_for_all: bool = False) -> None:
        """Tear down the process group this module created.

        Args:
            wait_for_all: meet the other ranks first (after a successful run): a rank that tears its group down
                while another still talks to it can abort in gloo's teardown.
        """
        if self.owns_group and torch.distributed.is_initialized():
            if wait_for_all:
                torch.distributed.barrier()
            torch.distributed.destroy_process_group()


# The longest --dist-timeout: 1e9 s ran under torchrun (QA 286), 9e9 s hung (int64 nanoseconds end at 9.2e9 s).
MAX_TIMEOUT_S = 1e9


def init_from_env(
    backend: str | None = None, device: str = "auto", timeout_s: float = DEFAULT_TIMEOUT_S
) -> DistributedRun | None:
    """Join the job ``torchrun`` started, if any.

    Args:
        backend: ``"gloo"`` or ``"nccl"``; by default NCCL when this rank will run on CUDA, else gloo.
        device: the ``device`` option, to pick the backend.
        timeout_s: limit of every collective, so a dead or stuck rank ends the job instead of hanging it.

    Returns:
        The run, or ``None`` outside ``torchrun`` (``WORLD_SIZE`` unset or 1).

    Raises:
        ValueError: an unknown backend, NCCL without CUDA, or a timeout that is not a positive number of at most
            :data:`MAX_TIMEOUT_S` seconds, each outside ``torchrun`` too.
    """
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not math.isfinite(timeout_s) \
            or timeout_s <= 0:
        # Checked outside torchrun too: the same command line must not fail only once it runs on several ranks.
        raise OptionError("dist_timeout", f"expected a positive number of seconds, got {timeout_s!r}")
    if timeout_s > MAX_TIMEOUT_S:
        # torch's process group keeps its deadline in nanoseconds of an int64: 1e15 s failed in timedelta, and
        # values past about 9e9 s hung or timed out at once (QA 284, 286).
        raise OptionError("dist_timeout", f"expected at most {MAX_TIMEOUT_S:.0f} seconds (about 31 years: torch "
                                          f"counts the deadline in int64 nanoseconds), got {timeout_s!r}")
    timeout = datetime.timedelta(seconds=timeout_s)
    # The backend too: accepted in one process, nccl without CUDA failed only under torchrun (QA 284).
    if backend is not None and backend not in ("gloo", "nccl"):
        raise OptionError("backend", f"expected gloo or nccl, got {backend!r}")
    if backend == "nccl" and not torch.cuda.is_available():
        raise OptionError("backend", "nccl needs CUDA GPUs; use gloo on CPUs")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1 and not torch.distributed.is_initialized():
        return None
    if not torch.distributed.is_available():
        raise ValueError("torchrun: this build of torch has no torch.distributed")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    on_cuda = torch.cuda.is_available() and device in ("auto", "cuda")
    backend = backend or ("nccl" if on_cuda else "gloo")
    owns = not torch.distributed.is_initialized()
    if owns:
        _import_group_defaults_first()
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        torch.distributed.init_process_group(backend, timeout=timeout)
    return DistributedRun(torch.distributed.get_rank(), torch.distributed.get_world_size(), local_rank,
                          torch.distributed.get_backend(), owns)


def _import_group_defaults_first() -> None:
    """Import, before the process group exists, the torch modules whose functions take ``group=group.WORLD``.

    Such a default is evaluated when the module is imported. transformers imports ``torch.distributed.nn``
    lazily while it loads a model (its tensor-parallel support); imported after ``init_process_group``, its
    defaults would keep the group alive past ``destroy_process_group``. Its gloo worker threads would then
    outlive the interpreter: one still freeing the tensors of the last collective when Python finalises
    aborts the rank ("terminate called without an active exception", measured about 1 run in 40).
    Imported before, the defaults are ``None``.
    """
    import torch.distributed.nn  # noqa: F401


def current_run() -> DistributedRun | None:
    """The run of a process group the caller initialised itself (``vitmad.profile`` from a user's script)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return None
    if torch.distributed.get_world_size() == 1:
        return None
    return DistributedRun(torch.distributed.get_rank(), torch.distributed.get_world_size(),
                          int(os.environ.get("LOCAL_RANK", "0")), torch.distributed.get_backend())


def check_same_run(run: DistributedRun, identity: dict, names: list[str]) -> None:
    """Refuse a job whose ranks do not plan the same run: each lists its inputs and loads its model on its own, so a
    node whose copy of the images (or of the model) differs would deal out other batches than the others, and the
    merged result would profile some images twice and others never, silently (QA helper-243).

    Args:
        identity: this rank's settings, model and input digests (its own rank aside).
        names: this rank's inputs, in order.

    Raises:
        OptionError: the ranks differ; the message names what and which ranks.
    """
    names_digest = hashlib.sha256(json.dumps(names).encode()).hexdigest()
    # Not the files' times: a node's own copy of the images made by a plain cp has other times and the same pixels.
    own = {**{k: v for k, v in identity.items() if k not in ("rank", "files")}, "names": [len(names), names_digest]}
    parts: list = [None] * run.world_size
    torch.distributed.all_gather_object(parts, own)
    differing = sorted({key for part in parts for key in part.keys() | parts[0].keys()
                        if part.get(key) != parts[0].get(key)})
    if not differing:
        return
    ranks = [r for r, part in enumerate(parts) if part != parts[0]]
    counts = ", ".join(f"rank {r}: {part['names'][0]}" for r, part in enumerate(parts))
    what = {"names": f"the list of inputs ({counts} inputs)", "pixels": "the pixel tensor",
            "weights": "the model's weights"}
    raise OptionError("images" if set(differing) <= {"names", "pixels"} else "model",
                      f"the processes of this job do not plan the same run: rank(s) {ranks} differ from rank 0 in "
                      f"{', '.join(what.get(key, key) for key in differing)}; every process must see the same "
                      "inputs at the same paths and the same model")


def merge_across_ranks(
    run: DistributedRun, stats: RunningStats | None, meta: dict | None, processed: list[str],
    skipped: list[dict], order: dict[str, int],
) -> tuple[RunningStats | None, dict | None, list[str], list[dict]]:
    """Combine every rank's part of the profile; every rank gets the whole result.

    Args:
        stats: this rank's running statistics (``None`` if it profiled no image).
        meta: ``{"layers": [...], "layout": ..., "geometry": [...], ...}`` of this rank (``None`` likewise).
        processed, skipped: this rank's files.
        order: position of every file in the global list, to restore the single-process order.

    Returns:
        ``(stats, meta, processed, skipped)`` of the whole job; ``stats`` is ``None`` if no rank read an image.
    """
    dist = torch.distributed
    parts: list = [None] * run.world_size
    shape = None if stats is None else tuple(stats.total.shape)
    dist.all_gather_object(parts, (shape, meta, processed, skipped))
    shapes = {p[0] for p in parts if p[0] is not None}
    if len(shapes) > 1:
        raise RuntimeError(f"ranks disagree on the number of layers and heads: {sorted(shapes)}")
    all_processed = sorted((name for p in parts for name in p[2]), key=order.__getitem__)
    all_skipped = sorted((s for p in parts for s in p[3]), key=lambda s: order[s["path"]])
    if not shapes:
        return None, None, all_processed, all_skipped
    meta = next(p[1] for p in parts if p[1] is not None)
    if "image_grids" in meta:  # native resolution: every rank's images have their own grids
        meta = meta | {"image_grids": {k: v for p in parts if p[1] is not None for k, v in p[1]["image_grids"].items()}}
    local = stats if stats is not None else RunningStats.empty(*shapes.pop())
    device = torch.device("cuda", torch.cuda.current_device()) if run.backend == "nccl" else torch.device("cpu")
    sums = torch.stack([local.total, local.total_sq]).to(device)
    # A NaN (a head without a value for an image) in any rank's min or max is the job's, as in one process
    # (torch.minimum keeps it): gloo's MIN and MAX dropped it, leaving the other ranks' finite range (QA 263).
    undefined = (local.low.isnan() | local.high.isnan()).to(device, torch.float64)
    low = local.low.to(device).nan_to_num(nan=float("inf"))
    high = local.high.to(device).nan_to_num(nan=float("-inf"))
    count = torch.tensor([local.count], dtype=torch.float64, device=device)
    for tensor, op in ((sums, dist.ReduceOp.SUM), (count, dist.ReduceOp.SUM), (undefined, dist.ReduceOp.SUM),
                       (low, dist.ReduceOp.MIN), (high, dist.ReduceOp.MAX)):
        dist.all_reduce(tensor, op=op)
    low, high = low.masked_fill(undefined > 0, float("nan")), high.masked_fill(undefined > 0, float("nan"))
    # The squared deviations, by Chan's formula as RunningStats.add merges batches: each rank's own m2 and its count
    # times its mean's squared distance from the job's mean, added up (never the job's sums subtracted).
    mean = sums[0] / max(float(count.item()), 1.0)
    deviations = local.m2.to(device) + local.count * (local.mean.to(device) - mean).square()
    dist.all_reduce(deviations, op=dist.ReduceOp.SUM)
    merged = RunningStats(sums[0].cpu(), sums[1].cpu(), low.cpu(), high.cpu(), int(count.item()), deviations.cpu())
    return merged, meta, all_processed, all_skipped


def merge_prefix_maps(run: DistributedRun, maps: PrefixMapSums | None) -> PrefixMapSums | None:
    """Every rank's sums of the prefix maps added up; every rank gets the whole result.

    Their layers and grids can differ (a rank that saw no image has none), so the sums travel as objects
    rather than through one all-reduce; they are a few maps per layer.

    Returns:
        The sums of the job, or ``None`` if no rank profiled an image.
    """
    parts: list = [None] * run.world_size
    torch.distributed.all_gather_object(parts, None if maps is None else maps.state_dict())
    found = [PrefixMapSums.from_state_dict(part) for part in parts if part is not None]
    return found[0].merged(found[1:]) if found else None


class GlobalProgress:
    """Images done by all ranks, counted in the process group's key-value store (no collective, no lockstep)."""

    _runs = itertools.count()  # every rank creates its counters in the same order: same key on all ranks

    def __init__(self, run: DistributedRun | None):
        self._key = f"vitmad/images_done/{next(self._runs)}"
        self._local = 0
        self._store = None
        if run is not None:
            try:
                self._store = torch.distributed.distributed_c10d._get_default_store()
            except (AttributeError, RuntimeError, ValueError):
                self._store = None  # the rank-0 bar then shows its own share times the world size
        self._scale = 1 if run is None or self._store is not None else run.world_size

    def add(self, count: int) -> int:
        """Count ``count`` more images of this rank; returns the job's total so far (an estimate without a store)."""
        if self._store is None:
            self._local += count
            return self._local * self._scale
        return int(self._store.add(self._key, count))
