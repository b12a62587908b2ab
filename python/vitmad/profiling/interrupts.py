"""Ctrl-C that Python drops, kept for the run.

Python's own SIGINT handler raises ``KeyboardInterrupt`` wherever the main thread is. Where that is a finalizer (an
object's ``__del__`` or a weakref callback, which garbage collection runs at any line: the tokenizer of a
transformers model being loaded, say), Python prints "Exception ignored in ..." and goes on, and the run went on to
its end, replacing an interrupted earlier run's checkpoint with its own (QA 377): the progress a user pressed
Ctrl-C to keep was lost. The command line's handler raises it the same way and also remembers it; the run raises it
again at its next step (:func:`raise_dropped`) where it was dropped.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable

__all__ = ["keep_interrupts", "raise_dropped"]

_received = threading.Event()  # a Ctrl-C came since keep_interrupts() and was not raised through raise_dropped


def _remember_then_raise(signum, frame) -> None:
    _received.set()
    raise KeyboardInterrupt


def keep_interrupts() -> Callable[[], None]:
    """Installs the remembering handler where Python's default one is installed (a handler of the user's or of an
    embedding program is left alone), and returns what restores the one before."""
    _received.clear()
    if threading.current_thread() is not threading.main_thread() \
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        return lambda: None
    signal.signal(signal.SIGINT, _remember_then_raise)

    def restore() -> None:
        if signal.getsignal(signal.SIGINT) is _remember_then_raise:
            signal.signal(signal.SIGINT, signal.default_int_handler)
        _received.clear()

    return restore


def raise_dropped() -> None:
    """Raises ``KeyboardInterrupt`` where a Ctrl-C came since :func:`keep_interrupts` (one that went its way was
    never seen here: the run has ended)."""
    if _received.is_set():
        _received.clear()
        raise KeyboardInterrupt
