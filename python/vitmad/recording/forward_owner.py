"""One thread at a time inside a recorded model.

A recording's state (the call being filled, each layer's pending attention calls, the layout the placers read)
describes one forward. Two threads running the recorded model at once (a thread pool serving requests,
``nn.DataParallel`` over several GPUs, whose replicas share the model's hooks) would mix their layers into each
other's calls. So the thread that enters a forward of the model, of one of its recorded attention modules, of a
module holding one or of a child of the model (``forward_features`` runs them without the model's own call) owns
the recording until that forward ends; the recording's hooks in any other thread meanwhile refuse to run
(pre-hooks raise, so that the other forward stops before it reaches anything recorded) or do nothing (the hooks
torch runs as that refused forward unwinds). One thread after another is fine: ownership ends with the forward.
A thread paused outside all such modules (a user's loop over the blocks) holds nothing: the recorder then refuses
its next layer if another thread has run a forward meanwhile, as long as the paused forward is in progress (the
frame that runs it, forward_caller_frame, is on its stack: ``Recording._check_call_thread``). The capture modes of
:mod:`.module_capture` are kept per thread, as torch's mode stacks are.
"""

from __future__ import annotations

import sys
import threading
from types import CodeType, FrameType

import torch
from torch import nn

__all__ = ["ForwardOwner", "ModuleCall", "current_module_call", "forward_caller_frame", "frame_live", "in_backward",
           "module_call_live"]


def in_backward() -> bool:
    """Whether autograd is running a backward pass: gradient checkpointing runs a layer's forward again there
    (in autograd's device threads on CUDA), which is no new attention of the model to record, and neither takes
    nor needs ownership."""
    return torch._C._current_graph_task_id() != -1


# The frame of torch's module call that runs a hook: a forward is "entered" while that frame is on its thread's
# stack, which stays true through re-entrant calls and becomes false when a KeyboardInterrupt (which skips the
# hooks that end it) unwinds it.
_CALL_IMPL = nn.Module._call_impl.__code__


def _module_call_frame() -> FrameType | None:
    frame = sys._getframe(2)
    while frame is not None and frame.f_code is not _CALL_IMPL:
        frame = frame.f_back
    return frame


def _live_among(top: FrameType | None, frame_ids: list[int]) -> set[int]:
    """The ids of ``frame_ids`` that are on the stack from ``top`` down."""
    wanted, live = set(frame_ids), set()
    while top is not None and len(live) < len(wanted):
        if id(top) in wanted:
            live.add(id(top))
        top = top.f_back
    return live


_WRAPPED_CALL_IMPL = nn.Module._wrapped_call_impl.__code__


def forward_caller_frame() -> FrameType | None:
    """The frame that called the outermost module call on this thread's stack: ``forward_features`` for the
    calls it makes one after another (patch embedding, blocks, norm), the user's code for ``model(...)``. While
    it is on the stack, the forward it runs is in progress."""
    frame, outermost = sys._getframe(1), None
    while frame is not None:
        if frame.f_code is _CALL_IMPL:
            outermost = frame
        frame = frame.f_back
    caller = None if outermost is None else outermost.f_back
    while caller is not None and caller.f_code is _WRAPPED_CALL_IMPL:
        caller = caller.f_back
    return caller


def frame_live(thread: threading.Thread, frame_id: int, code: CodeType) -> bool:
    """Whether the frame of id ``frame_id`` running ``code`` is on ``thread``'s stack (a live thread's). The code
    is checked too because a frame that has ended leaves its address to new frames (a thread that finished
    ``forward_features`` and now waits on an event): only the same function, called again, could take it."""
    if not thread.is_alive():
        return False
    top = sys._getframe() if thread is threading.current_thread() else sys._current_frames().get(thread.ident)
    while top is not None:
        if id(top) == frame_id and top.f_code is code:
            return True
        top = top.f_back
    return False


# A module's forward in progress, taken from one of its hooks: (the thread, the id of its _call_impl frame).
ModuleCall = tuple[threading.Thread, int]


def current_module_call() -> ModuleCall | None:
    """The innermost module call of this thread, from one of that module's hooks (called from the hook itself,
    directly or through vitmad's hook wrapper)."""
    frame = _module_call_frame()
    return None if frame is None else (threading.current_thread(), id(frame))


def module_call_live(call: ModuleCall, module: nn.Module) -> bool:
    """Whether ``call`` (current_module_call) still runs ``module``'s forward: a KeyboardInterrupt ends a forward
    without the hooks that say so. The frame at that address must also be a call of ``module``: an ended frame
    leaves its address to new ones, other modules' calls among them (only ``module`` called again could take it,
    and its pre-hooks then start over)."""
    thread, frame_id = call
    if not thread.is_alive():
        return False
    top = sys._getframe() if thread is threading.current_thread() else sys._current_frames().get(thread.ident)
    while top is not None:
        if id(top) == frame_id:
            return top.f_code is _CALL_IMPL and top.f_locals.get("self") is module
        top = top.f_back
    return False


class ForwardOwner:
    """The thread inside a forward of the recorded model, and the forwards it is inside (by the frame of each
    module call, so that a re-entrant call nests and a forward a KeyboardInterrupt left unfinished no longer
    counts once its frames are gone)."""

    def __init__(self, model_name: str):
        self.model_name = model_name
        self._thread: threading.Thread | None = None
        self._frames: list[int] = []  # ids of the module-call frames of the forwards the owner entered
        # Counts the outermost forwards entered: two module calls are in one forward where it is the same (a frame's
        # address, reused by the next forward's, cannot tell).
        self._serial = 0
        self._lock = threading.Lock()  # the check and the taking of ownership, as one step

    def busy_elsewhere(self) -> bool:
        """Whether another thread, still alive, is inside a forward of the recorded model."""
        thread = self._thread
        if not self._frames or thread is None or thread is threading.current_thread() or in_backward():
            return False
        if not thread.is_alive():
            return False
        return bool(_live_among(sys._current_frames().get(thread.ident), self._frames))

    def held_here(self) -> bool:
        """Whether this thread is inside a forward it entered (or one a KeyboardInterrupt left behind)."""
        return self._thread is threading.current_thread() and bool(self._frames)

    def inside_unentered(self, module: nn.Module) -> bool:
        """Whether this thread is inside a call of ``module`` whose forward the owner did not enter: one begun before
        the recording's hooks were installed, whose pre-hooks never ran."""
        frame = sys._getframe(1)
        mine = self._frames if self._thread is threading.current_thread() else []
        while frame is not None:
            if frame.f_code is _CALL_IMPL and frame.f_locals.get("self") is module and id(frame) not in mine:
                return True
            frame = frame.f_back
        return False

    def refusal(self) -> RuntimeError:
        thread = self._thread
        return RuntimeError(
            f"vitmad.record: {self.model_name} is being recorded and thread '{getattr(thread, 'name', '?')}' is "
            f"inside a forward of it, so this thread ('{threading.current_thread().name}') cannot run it now: a "
            "recorded model runs in one thread at a time (its calls would mix). Run the forwards one after "
            "another, or record a separate copy of the model in each thread; nn.DataParallel over several GPUs "
            "runs a replica per GPU in threads: record one GPU's model, or use DistributedDataParallel (torchrun)"
        )

    def enter(self, restart: bool = False) -> None:
        """A forward of the model or of a module of it begins (called from its pre-hook); ``restart``: of the
        whole model, when the forwards the owner left unfinished are forgotten."""
        if in_backward():
            return
        frame = _module_call_frame()
        me = threading.current_thread()
        with self._lock:
            if self.busy_elsewhere():
                raise self.refusal()
            if self._thread is not me:
                self._thread, self._frames = me, []
            elif restart and self._frames:
                live = _live_among(frame, self._frames)
                self._frames = [f for f in self._frames if f in live]
            if not self._frames or restart:
                # (A forward of the whole model is a new one even where a frame a KeyboardInterrupt left looks live:
                # its address taken by a live frame, QA 383.)
                self._serial += 1
            self._frames.append(id(frame))

    def forward_serial(self) -> int | None:
        """The number of the outermost forward this thread is inside (entered), or None outside any: equal for
        every module call within one forward of the model, different in the next."""
        return self._serial if self.held_here() else None

    def leave(self) -> bool:
        """That forward ended, returning or raising (called from its always_call forward hook); whether it had
        entered (a forward pre-hook that raised before enter(), a global one say, ends it without)."""
        if in_backward():
            return True
        frame_id = id(_module_call_frame())
        with self._lock:
            if self._thread is threading.current_thread() and frame_id in self._frames:
                # The last entry of this frame: the forwards entered after it are within it and ended first.
                del self._frames[len(self._frames) - 1 - self._frames[::-1].index(frame_id):]
                return True
            return False

    def reset(self) -> None:
        with self._lock:
            self._thread, self._frames = None, []
