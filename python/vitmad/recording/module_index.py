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

__all__ = ["shared_walks", "named_module_list", "module_list"]

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
