"""One walk over a model's modules per recorder setup, shared by every family's finder and placer.

Setting up :func:`vitmad.record` asks the same questions of the module tree many times: every family looks for
its attention modules, and for each attention module every family looks for its owner (the PiT or CrossViT
around it, the stem before it). Each ``model.modules()`` is a recursive generator over the whole tree, so a
ViT-S/16 (276 modules) took about 30 ms to set up, most of it in such walks, paid again for every ``with
vitmad.record(model)`` around a batch.

Inside :func:`shared_walks` (the recorder's setup and hook installation), :func:`named_module_list` and
:func:`module_list` walk each root once and hand out the same list afterwards. Outside it they walk afresh, so code
that runs during a forward call never sees a tree from before a change the user made between recordings.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from torch import nn

__all__ = ["shared_walks", "named_module_list", "module_list", "enclosing_modules", "idle_copies", "copy_holder",
           "unwrapped_name", "is_known_library"]

# The libraries whose models vitmad reads (their families, or their plain layout, tested): where the extra tokens
# of their towers are, and which of their modules compute attention, is known.
_KNOWN_LIBRARIES = ("timm", "transformers", "open_clip", "vit_pytorch", "kornia", "monai", "ultralytics", "diffusers",
                    "segment_anything", "sam2", "torchvision", "mobile_sam")


def is_known_library(cls: type) -> bool:
    """Whether the class is defined in a library vitmad reads."""
    return cls.__module__.split(".")[0] in _KNOWN_LIBRARIES


def is_users_class(cls: type) -> bool:
    """Whether the class is the user's: defined neither by torch nor by a library vitmad reads."""
    return not cls.__module__.startswith("torch.") and not is_known_library(cls)

# id(root) -> (root, its named modules, its modules). The root is kept in the entry, so its id cannot be reused
# while the cache lives.
_WALKS: ContextVar[dict[int, tuple[nn.Module, list[tuple[str, nn.Module]], list[nn.Module]]] | None] = ContextVar(
    "vitmad_module_walks", default=None)


@contextmanager
def shared_walks() -> Iterator[None]:
    """Within the block, each root's module walk is made once (nested blocks share the outer one's)."""
    if _WALKS.get() is not None:
        yield
        return
    token = _WALKS.set({})
    try:
        yield
    finally:
        _WALKS.reset(token)


def _walk(root: nn.Module) -> tuple[nn.Module, list[tuple[str, nn.Module]], list[nn.Module]]:
    named = list(root.named_modules())
    return root, named, [module for _, module in named]


def _shared_walk(root: nn.Module):
    """The walk of ``root`` inside :func:`shared_walks` (made the first time it is asked for), else None."""
    walks = _WALKS.get()
    if walks is None:
        return None
    entry = walks.get(id(root))
    if entry is None:
        entry = walks[id(root)] = _walk(root)
    return entry


def named_module_list(root: nn.Module) -> list[tuple[str, nn.Module]]:
    """``list(root.named_modules())``: once per root inside :func:`shared_walks` (do not modify the list)."""
    entry = _shared_walk(root)
    return list(root.named_modules()) if entry is None else entry[1]


def module_list(root: nn.Module) -> list[nn.Module]:
    """``list(root.modules())``: once per root inside :func:`shared_walks` (do not modify the list)."""
    entry = _shared_walk(root)
    return list(root.modules()) if entry is None else entry[2]


def enclosing_modules(root: nn.Module, name: str) -> Iterator[tuple[str, nn.Module]]:
    """``(qualified name, module)`` of each module above the module ``name`` in ``root``, nearest first, ending with
    ``("", root)``: where a family looks for the tower holding a layer or a patch embedding (its config, its
    ``feature_info``, its first convolution) rather than the root, which may be a user's wrapper. A prefix of
    ``name`` that is no module of ``root`` (a family's name relative to another module) is passed over."""
    parts = name.split(".")
    for depth in range(len(parts) - 1, -1, -1):
        prefix = ".".join(parts[:depth])
        try:
            yield prefix, root.get_submodule(prefix)
        except AttributeError:
            continue


def _is_saved_copies(module: nn.Module) -> bool:
    return type(module).__name__ == "ModulesToSaveWrapper" and type(module).__module__.startswith("peft.")


def _wrappers(root: nn.Module) -> list[tuple[nn.Module, nn.Module | None, list[nn.Module]]]:
    """``(wrapper, the copy its forward runs, every copy)`` for each PEFT ``ModulesToSaveWrapper`` in ``root`` (a
    module trained whole beside an adapter: ``original_module`` and one copy per adapter in ``modules_to_save``): the
    active adapter's copy, or the original where adapters are disabled, none is active or one active has no copy
    here. A wrapper PEFT registered on another wrapper (``modules_to_save=["embeddings"]`` wraps ``embeddings`` and,
    through that wrapper, ``embeddings.patch_embeddings``) is never called (the outer wrapper's copies call their own
    modules, its original among them): None runs."""
    found = []
    for name, module in named_module_list(root):
        if not _is_saved_copies(module):
            continue
        saved, active = module.modules_to_save, list(module.active_adapters or [])
        if "." in name and _is_saved_copies(root.get_submodule(name.rpartition(".")[0])):
            runs = None
        elif module.disable_adapters or not active or any(a not in saved for a in active):
            runs = module.original_module
        else:
            runs = saved[active[0]]
        found.append((module, runs, [module.original_module, *saved.values()]))
    return found


def idle_copies(root: nn.Module) -> set[int]:
    """The ids of the modules in the copies of PEFT's ``ModulesToSaveWrapper`` that no forward runs now
    (:func:`_wrappers`): a search for where the image enters (the patch embedding, the first convolution) takes the
    copy that runs. With the patch embedding trained whole beside LoRA its ``original_module`` was taken, which never
    ran: every layer was refused, and with ``grid=`` given every forward joined one call (QA helper-242)."""
    wrappers = _wrappers(root)
    idle = {id(m) for _, runs, copies in wrappers for copy in copies if copy is not runs for m in copy.modules()}
    # A never-called wrapper's original is the module the outer wrapper's running copy calls.
    running = {id(m) for _, runs, _ in wrappers if runs is not None for m in runs.modules()}
    return idle - running


def copy_holder(root: nn.Module, module: nn.Module) -> nn.Module | None:
    """The outermost PEFT ``ModulesToSaveWrapper`` in ``root`` that is called and one of whose copies holds
    ``module``, or None: its forward runs whichever copy is active, also after the adapters are switched."""
    for wrapper, runs, copies in _wrappers(root):
        if runs is not None and any(m is module for copy in copies for m in copy.modules()):
            return wrapper
    return None


def unwrapped_name(name: str) -> str:
    """``name`` as the module would be named without PEFT's ``ModulesToSaveWrapper`` around it or a holder of it
    (``…projection.original_module`` and ``…projection.modules_to_save.default`` are ``…projection``), or PEFT's LoRA
    layer around it (``…projection.base_layer``: a LoRA adapter on the patch convolution, QA 369)."""
    parts, kept, skip = name.split("."), [], 0
    for i, part in enumerate(parts):
        if skip:
            skip -= 1
        elif part == "original_module" or part == "base_layer" and i > 0:
            continue
        elif part == "modules_to_save" and i + 1 < len(parts):
            skip = 1  # and the adapter's name after it
        else:
            kept.append(part)
    return ".".join(kept)
