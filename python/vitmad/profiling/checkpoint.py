"""Checkpoints of a running profile, so an interrupted ``vitmad profile`` resumes exactly.

A checkpoint holds the float64 running sums and the list of processed files. It is written to a temporary
file in the same folder, flushed to disk and renamed over the previous one, so a kill at any moment leaves
either the old or the new checkpoint, never a torn one.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from pathlib import Path

import torch

from .files import atomic_file, check_writable
from .options import OptionError, Parameter

__all__ = ["save_checkpoint", "load_checkpoint", "read_checkpoint", "fingerprint", "files_digest", "tensors_digest",
           "architecture_digest"]

FORMAT = "vitmad-checkpoint/1"


def fingerprint(settings: dict, files: list[str]) -> str:
    """A digest of everything that must match for a resumed run to end like an uninterrupted one."""
    text = json.dumps({"settings": settings, "files": files}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def files_digest(paths: list[str]) -> str:
    """``sha256:<hex>`` of each file's size and modification time (in nanoseconds), and of each frame folder's
    files': what tells an image replaced under its own name apart, without reading the images (one ``stat`` a
    file). A copy that does not keep the times (``cp`` without ``-p``) reads as other images."""
    digest = hashlib.sha256()
    for name in paths:
        path = Path(name)
        entries = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
        for entry in entries:
            digest.update(os.fsencode(entry) + b"\0")  # the file system's bytes: a name need not be UTF-8
            try:
                stat = entry.stat()
                digest.update(f"{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
            except OSError:  # gone or unreadable: the run skips it by name; its absence is its state
                digest.update(b"missing\n")
    return f"sha256:{digest.hexdigest()}"


def _flat_entries(tensors):
    """``(name, value)`` pairs with the tuples and lists of a state dict opened (a dynamically quantized Linear
    keeps ``(weight, bias)`` as one entry, ``_packed_params._packed_params``), each tensor by a name of its own."""
    for name, value in tensors:
        if isinstance(value, (tuple, list)):
            yield from _flat_entries((f"{name}.{i}", item) for i, item in enumerate(value))
        else:
            yield name, value


def tensors_digest(tensors) -> str:
    """``sha256:<hex>`` of named tensors' names, dtypes, shapes and bytes: what tells two models (or two pixel
    tensors) apart when their names and shapes agree; other values a state dict holds (a quantized Linear's
    ``dtype``, None) by their ``repr``. About 0.3 s for ViT-B/16's 86 M parameters."""
    digest = hashlib.sha256()
    for name, tensor in _flat_entries(tensors):
        if not isinstance(tensor, torch.Tensor):  # profiling a dynamically quantized model crashed here (QA 261)
            digest.update(f"{name}|{tensor!r}|".encode())
            continue
        tensor = tensor.detach()
        if tensor.is_quantized:  # a quantized model's weights: their scales, then their integers
            if tensor.qscheme() in (torch.per_tensor_affine, torch.per_tensor_symmetric):
                scales = torch.tensor([tensor.q_scale(), float(tensor.q_zero_point())], dtype=torch.float64)
            else:
                scales = torch.cat([tensor.q_per_channel_scales().double(),
                                    tensor.q_per_channel_zero_points().double()])
            digest.update(memoryview(scales.cpu().numpy()))
            tensor = tensor.int_repr()
        flat = tensor.reshape(-1).contiguous().cpu()
        digest.update(f"{name}|{flat.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(memoryview(flat.view(torch.uint8).numpy()))
    return f"sha256:{digest.hexdigest()}"


def weights_digest(module: torch.nn.Module, skip: frozenset[str] = frozenset()) -> str:
    """:func:`tensors_digest` of a model's parameters and persistent buffers (its state dict), in their order, but
    for the keys in ``skip`` (weights a checkpoint lacked, drawn at random at every load)."""
    return tensors_digest((name, value) for name, value in module.state_dict().items() if name not in skip)


# The identity's model of an hf: local folder: known by what it holds (weights, config, preprocessing), not its path.
LOCAL_FOLDER = "hf:<a local folder>"

# An object's address in its repr (a function held by a module): another in each process and each run.
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
# Of a transformers config: where and by which version it was read, and switches of what the forward returns, not
# of what it computes (its attention implementation is no key of to_dict: SDPA and eager compute one softmax).
_CONFIG_ORIGIN = frozenset({"_name_or_path", "_commit_hash", "transformers_version", "output_attentions",
                            "output_hidden_states", "return_dict", "use_cache", "torchscript"})


# A transformers attention class named for its implementation (Data2VecVision's ...SdpaSelfAttention): one softmax.
_IMPLEMENTATION = re.compile(r"(Sdpa|FlashAttention2|FlashAttention|Flash|Flex|Eager)(?=[A-Za-z0-9_]*Attention)")


def architecture_digest(module: torch.nn.Module) -> str:
    """``sha256:<hex>`` of what a model computes that its weights do not say: its modules as torch prints them
    (layers, activations, their options) and, for a transformers model, its configuration (head count, activation by
    name, ...), less where and by which version it was read. An edited config.json (``relu`` for ``gelu``, 2 heads
    for 4 over the same weights) was accepted on resume and mixed two models' sums (QA 276), as was a module of the
    user's with an activation swapped (QA 286). Attention classes named for their implementation (SDPA, eager) are
    one class here: they change no value (QA 285)."""
    text = _IMPLEMENTATION.sub("", repr(module))
    to_dict = getattr(getattr(module, "config", None), "to_dict", None)
    if callable(to_dict):
        config = {key: value for key, value in to_dict().items() if key not in _CONFIG_ORIGIN}
        text += json.dumps(config, sort_keys=True, default=repr)
    return "sha256:" + hashlib.sha256(_ADDRESS.sub("", text).encode()).hexdigest()


def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    """Write ``state`` (tensors, lists, numbers) to ``path`` atomically."""
    # Serialised in memory, then written: torch.save onto a full disk failed with its zip writer's RuntimeError
    # ("unexpected pos 9024 vs 8976"), which named neither the cause nor the file (QA 322); the write of the bytes
    # fails with the OSError that names both. A checkpoint holds sums per layer and head: megabytes at most.
    buffer = io.BytesIO()
    torch.save({"format": FORMAT, **state}, buffer)
    with atomic_file(path) as handle:
        handle.write(buffer.getbuffer())


def _read_state(path: Path) -> dict | None:
    """The state in a vitmad checkpoint file; None for any other file (unreadable, another format)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001  (whatever torch.load makes of a file that is not a checkpoint)
        return None
    return state if isinstance(state, dict) and state.get("format") == FORMAT else None


def read_checkpoint(path: str | os.PathLike) -> dict | None:
    """The state in the vitmad checkpoint at ``path``; None where there is none (no file, another file)."""
    path = Path(path).expanduser()
    return _read_state(path) if path.is_file() else None


# identity key -> what sets it, for saying what changed since a checkpoint was written (the parameters as
# Parameter, which the command spells as its flags).
_OPTIONS = {"model": (Parameter("model"),),
            "weights": ("model weights (the model's own, or ", Parameter("model_checkpoint"), ")"),
            "architecture": ("the model's architecture or configuration (a transformers model's config.json, "
                             "another's modules)",),
            "model_args": (Parameter("model_args"),),
            "renormalize": (Parameter("renormalize"),), "dtype": (Parameter("dtype"),),
            "image_size": (Parameter("image_size"),), "preprocessing": ("the model's preprocessing",),
            "batch_size": (Parameter("batch_size"),), "layers": (Parameter("layers"),), "stats": (Parameter("stats"),),
            "profiled": ("the part profiled",),
            "layout": ("the token layout given (", Parameter("positions"), ", ", Parameter("num_prefix_tokens"), ", ",
                       Parameter("patch"), ", ", Parameter("grid"), ")"),
            "frames": ("the video model's frame count (its config's num_frames)",),
            "rank": ("the process layout (torchrun)",), "world_size": ("the process layout (torchrun)",),
            "files": ("the images' files (contents or times)",), "pixels": ("the pixel tensor",),
            # The image list given too: a run on three named files resumed on two named none of what was said (QA 377).
            "images": ("the images (the files or folders given, ", Parameter("max_images"), ", a folder's files)")}


def _changes(saved: dict | None, identity: dict | None) -> tuple[str, ...]:
    """`` (changed since: stats, batch_size)`` in parts for the keys whose values differ; nothing when either
    side is unknown."""
    if not isinstance(saved, dict) or not identity:
        return ()
    keys = [key for key in sorted(saved.keys() | identity.keys()) if saved.get(key) != identity.get(key)]
    if "images" in keys and "files" in keys:  # other files have other sizes and times: one change, said once
        keys.remove("files")
    if "frames" in keys and "architecture" in keys:  # the config's frame count: said by its own name
        keys.remove("architecture")
    if "architecture" not in saved:  # a checkpoint of vitmad before 2026-12-06: its model known by path and weights
        keys = [key for key in keys if key != "architecture" and not (
            key == "model" and identity.get("model") == LOCAL_FOLDER and str(saved.get("model")).startswith("hf:"))]
    changed = list(dict.fromkeys(_OPTIONS.get(key, (key,)) for key in keys))
    if not changed:
        return ()
    listed = [part for i, option in enumerate(changed) for part in ((", ",) if i else ()) + option]
    return (" (changed since: ", *listed, ")")


def check_checkpoint_path(path: str | os.PathLike) -> None:
    """Check, before the model loads, that ``path`` can take the run's checkpoints.

    Raises:
        OptionError: ``path`` is a folder, an existing file that is not a vitmad checkpoint (the run would
            overwrite it), or in a folder that cannot be written.
    """
    if not os.fspath(path).strip():  # Path("") is the current folder, which it was said to be (QA 421)
        raise OptionError("checkpoint", f"expected a file, got {os.fspath(path)!r}")
    path = Path(path).expanduser()
    if path.is_dir():
        raise OptionError("checkpoint", f"expected a file, got the folder {path}")
    if path.is_file() and _read_state(path) is None:
        # Or vitmad's own, damaged (cut short by a copy or a full disk: QA 377 took the advice for a stranger's file).
        raise OptionError("checkpoint", f"{path} exists and is not a vitmad checkpoint that can be read (another "
                                        "program's file, or one damaged, cut short), which the run would overwrite; "
                                        "remove it, or write the run elsewhere")
    check_writable(path.parent, "checkpoint")
    CHECKED[path.resolve()] = file_state(path)


# The checkpoints this process checked (check_checkpoint_path) and resumed from (load_checkpoint): resolved path ->
# file_state() of the file then. The command's Ctrl-C message says progress is saved where its run wrote a checkpoint
# or resumed this very file, and names an earlier run's only where it is the very file the check passed, not
# wherever a file of that name lies (QA 306: one with other settings, never resumed, was called this run's progress;
# QA 308: the path alone outlived the run that resumed it; QA 310: a user's own torch file was called a run's).
CHECKED: dict[Path, tuple[int, int, int] | None] = {}
RESUMED: dict[Path, tuple[int, int, int] | None] = {}


def file_state(path: str | os.PathLike) -> tuple[int, int, int] | None:
    """What tells one file at ``path`` from another written there since (inode, size, modification time: a
    checkpoint is written whole, then renamed over the last), or None where there is none."""
    try:
        found = os.stat(path)
    except OSError:
        return None
    return found.st_ino, found.st_size, found.st_mtime_ns


def load_checkpoint(path: str | os.PathLike, expected_fingerprint: str, identity: dict | None = None,
                    earlier_fingerprint: str | None = None) -> dict | None:
    """Read a checkpoint written by :func:`save_checkpoint` for the same run.

    Args:
        identity: what the fingerprint digests, by key: a refusal names the keys that differ from those the
            checkpoint holds (checkpoints since 2026-12-04 hold them).
        earlier_fingerprint: the same run's fingerprint as vitmad made it before the model's architecture joined
            it (2026-12-06): a checkpoint written then resumes, its model checked by its weights alone.

    Returns:
        The state, or ``None`` when there is no checkpoint at ``path``.

    Raises:
        OptionError: the checkpoint belongs to a run with other settings, weights or images.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        return None
    state = _read_state(path)
    if state is None:
        raise OptionError("resume", f"{path} is not a vitmad checkpoint (unreadable, or another format)")
    if state["fingerprint"] not in (expected_fingerprint, earlier_fingerprint):
        raise OptionError("resume", (
            f"{path} was written by a run with other settings, other model weights or other images",
            *_changes(state.get("identity"), identity), "; rerun with the same model, weights, images and options, "
            "or without ", Parameter("resume"), " to start over"))
    RESUMED[path.resolve()] = file_state(path)
    return state
