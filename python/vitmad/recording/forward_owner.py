"""One thread at a time inside a recorded model.

A recording's state (the call being filled, each layer's pending attention calls, the layout the placers read,
the torch-function modes of :mod:`.module_capture`) describes one forward. Two threads running the recorded model
at once (a thread pool serving requests, ``nn.DataParallel`` over several GPUs, whose replicas share the model's
hooks) would mix their layers into each other's calls, or leave a mode on the wrong thread's stack. So the
thread that enters a forward of the model, or of one of its recorded attention modules, owns the recording until
that forward ends; the same modules' hooks in any other thread meanwhile refuse to run (pre-hooks raise, so that
the other forward stops before it reaches anything recorded) or do nothing (the hooks torch runs as that refused
forward unwinds). One thread after another is fine: ownership ends with the forward.
"""

from __future__ import annotations

import threading

import torch

__all__ = ["ForwardOwner", "in_backward"]


def in_backward() -> bool:
    """Whether autograd is running a backward pass: gradient checkpointing runs a layer's forward again there
    (in autograd's device threads on CUDA), which is no new attention of the model to record, and neither takes
    nor needs ownership."""
    return torch._C._current_graph_task_id() != -1


class ForwardOwner:
    """The thread inside a forward of the recorded model, and how many recorded forwards it is inside."""

    def __init__(self, model_name: str):
        self.model_name = model_name
        self._thread: threading.Thread | None = None
        self._depth = 0
        self._lock = threading.Lock()  # the check and the taking of ownership, as one step

    def busy_elsewhere(self) -> bool:
        """Whether another thread, still alive, is inside a forward of the recorded model."""
        thread = self._thread
        return (self._depth > 0 and thread is not None and thread is not threading.current_thread()
                and thread.is_alive() and not in_backward())

    def refusal(self) -> RuntimeError:
        thread = self._thread
        return RuntimeError(
            f"vitmad.record: {self.model_name} is being recorded and thread '{getattr(thread, 'name', '?')}' is "
            f"inside a forward of it, so this thread ('{threading.current_thread().name}') cannot run it now: a "
            "recorded model runs in one thread at a time (its calls would mix). Run the forwards one after "
            "another, or record a separate copy of the model in each thread; nn.DataParallel over several GPUs "
            "runs a replica per GPU in threads: record one GPU's model, or use DistributedDataParallel (torchrun). "
            "(A forward that a KeyboardInterrupt stopped counts as running until its thread runs the model again.)"
        )

    def enter(self, restart: bool = False) -> None:
        """A forward of the model (``restart``: of the whole model, which ends whatever forward this thread left
        unfinished, a KeyboardInterrupt skipping the hooks that end it) or of a recorded module begins."""
        if in_backward():
            return
        me = threading.current_thread()
        with self._lock:
            if self.busy_elsewhere():
                raise self.refusal()
            if self._thread is not me or restart:
                self._thread, self._depth = me, 0
            self._depth += 1

    def leave(self) -> None:
        """That forward ended, returning or raising."""
        if in_backward():
            return
        with self._lock:
            if self._thread is threading.current_thread() and self._depth > 0:
                self._depth -= 1

    def reset(self) -> None:
        with self._lock:
            self._thread, self._depth = None, 0
