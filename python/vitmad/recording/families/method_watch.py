"""What a model's own method returned, read in each call for the recording only: a draw made inside the model and
handed to no module (ViLT's ``visual_embed`` selecting patches, MONAI's ``MaskedAutoEncoderViT._masking`` keeping a
random subset of them), which no module hook sees. The method runs unchanged and its output is passed on as it is;
nothing is drawn again.

The method is wrapped on the instance's class while a watch of one of its instances is in: the wrapper reports what
each watched instance returned and is inert for every other instance, so a copy of the model made inside the block
(deepcopy, pickling) runs as without vitmad. A wrapper on the class, not an attribute of the instance: an instance
attribute would travel into such copies and call the original module.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable

from torch import nn

__all__ = ["MethodWatch"]

_LOCK = threading.Lock()
_INHERITED = object()  # the class did not define the method itself: the wrapper is deleted, not replaced, at the end
_ORIGINAL: dict[tuple[type, str], object] = {}  # (class, method) -> its own attribute, while wrapped
_WATCHERS: dict[tuple[type, str], dict[int, list]] = {}  # (class, method) -> id(instance) -> report callables


def _wrapped(key: tuple[type, str], original: Callable) -> Callable:
    @functools.wraps(original)
    def method(self, *args, **kwargs):
        output = original(self, *args, **kwargs)
        for report in list(_WATCHERS.get(key, {}).get(id(self), ())):
            report(self, output)
        return output

    return method


class MethodWatch:
    """Calls ``report(instance, output)`` after each call of ``instance.<method>`` returns, until :meth:`remove`
    (a hook handle's duty, so a placer returns it among its hooks).

    Args:
        instance: the module watched.
        method: the name of the method of its class.
        report: receives the instance and what the method returned.
    """

    def __init__(self, instance: nn.Module, method: str, report: Callable[[nn.Module, object], None]):
        cls = type(instance)
        self.key, self.ident, self.report = (cls, method), id(instance), report
        with _LOCK:
            if self.key not in _ORIGINAL:
                _ORIGINAL[self.key] = cls.__dict__.get(method, _INHERITED)
                setattr(cls, method, _wrapped(self.key, getattr(cls, method)))
            _WATCHERS.setdefault(self.key, {}).setdefault(self.ident, []).append(report)
        self.removed = False

    def remove(self) -> None:
        with _LOCK:
            if self.removed:
                return
            self.removed = True
            watchers = _WATCHERS[self.key]
            watchers[self.ident].remove(self.report)
            if not watchers[self.ident]:
                del watchers[self.ident]
            if not watchers:
                del _WATCHERS[self.key]
                original = _ORIGINAL.pop(self.key)
                if original is _INHERITED:
                    delattr(*self.key)
                else:
                    setattr(*self.key, original)
