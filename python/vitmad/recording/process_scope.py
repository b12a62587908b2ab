"""A process-wide state held from the first active recording to the last.

Some of what a recording changes belongs to the process, not to one recording or one thread: dynamo's stance
(:class:`.compiled.EagerWhileRecording`), the bindings of torch's ``flex_attention`` in loaded modules
(:class:`.flex_call.FlexAttentionStandIn`). Recordings that overlap, in one thread or several, share it: the first
to enter sets it up, the last to leave undoes it, a count under a lock between them.
"""

from __future__ import annotations

import threading

__all__ = ["ProcessWideScope"]


class ProcessWideScope:
    """Counts the active recordings that hold this state (thread-safe): :meth:`_first` runs at the first
    :meth:`enter`, :meth:`_last` at the last :meth:`leave`; a :meth:`leave` without an :meth:`enter` does nothing.
    Each subclass has a count and a lock of its own."""

    _lock: threading.Lock
    _depth: int

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        cls._lock = threading.Lock()
        cls._depth = 0

    @classmethod
    def _first(cls) -> None:
        """Sets the state up; raising leaves the count as it was."""
        raise NotImplementedError

    @classmethod
    def _last(cls) -> None:
        """Undoes what :meth:`_first` set up."""
        raise NotImplementedError

    @classmethod
    def enter(cls) -> None:
        with cls._lock:
            if cls._depth == 0:
                cls._first()
            cls._depth += 1

    @classmethod
    def leave(cls) -> None:
        with cls._lock:
            if cls._depth == 0:
                return
            cls._depth -= 1
            if cls._depth == 0:
                cls._last()
