"""Recording HF transformers attention through its own extension point, ``AttentionInterface``.

For each attention implementation in use (``sdpa``, ``flash_attention_2``, ``eager``, ...) one wrapper is
registered once per process under ``vitmad_record_<implementation>``: it hands ``(query, key, scaling,
attention_mask)`` of the modules being recorded to their callback, then calls the original implementation with
the very same arguments, so the model's outputs do not change. Modules not being recorded pass straight through.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import re
import sys
import threading
from collections.abc import Callable

import torch
from torch import nn

from .interface_call import attention_semantics, bound_arguments, call_bias
from .module_index import enclosing_modules, named_module_list

__all__ = ["AttentionCallback", "is_hf_model", "hf_attention_modules", "uses_attention_interface", "interface_config",
           "reads_implementation_by_interface", "forward_source",
           "HFAttentionHooks"]

# (qualified module name, q [B, H, N, D], k [B, H, N, D], scale or None, additive or boolean mask or None)
AttentionCallback = Callable[[str, torch.Tensor, torch.Tensor, "float | None", "torch.Tensor | None"], None]

_WRAPPER_PREFIX = "vitmad_record_"
# id(attention module) -> [(its qualified name, callback)] of every active recording holding it, in the order they
# began; read by the registered wrappers. One entry per module let a recording begun inside another (over a subset
# of its layers) take the module from it: the outer recording lost those layers, silently (QA 336).
_ACTIVE: dict[int, list[tuple[str, Callable]]] = {}


def is_hf_model(model: nn.Module) -> bool:
    """Whether ``model`` is a transformers ``PreTrainedModel`` (without importing transformers when it is not)."""
    if "transformers" not in sys.modules:
        return False
    from transformers import PreTrainedModel

    return isinstance(model, PreTrainedModel)


def hf_attention_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The modules that compute attention, by qualified name, in module order.

    They own the query and key projections: ``q_proj``/``k_proj`` (transformers 5.x and CLIP/SigLIP),
    ``query``/``key`` (``*SelfAttention`` of transformers 4.x and 5.0), or one ``qkv`` projection (BLIP, SAM's
    vision encoder).
    """
    found = {}
    for name, module in named_module_list(model):
        pairs = (("q_proj", "k_proj"), ("query", "key"), ("qkv", "qkv"))
        if any(isinstance(getattr(module, q, None), nn.Module) and isinstance(getattr(module, k, None), nn.Module)
               for q, k in pairs):
            found[name] = module
    return found


@functools.cache
def forward_source(cls: type) -> str:
    """The source of ``cls.forward`` ("" where Python has none, e.g. compiled or built-in classes)."""
    try:
        return inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return ""


def _forward_uses_interface(cls: type) -> bool:
    source = forward_source(cls)
    if re.search(r"getattr\(\s*ALL_ATTENTION_FUNCTIONS\b", source):
        # Kosmos-2.5's vision attention (transformers 5.25) looks its implementation up as an attribute of the
        # registry, a mapping without such attributes: it always runs its own eager function, whose softmax
        # module_capture records.
        return False
    return "ALL_ATTENTION_FUNCTIONS" in source or "attention_interface" in source


def uses_attention_interface(module: nn.Module) -> bool:
    """Whether the module's forward dispatches through ``AttentionInterface`` (else it computes its attention
    itself, and :mod:`.module_capture` records it)."""
    return _forward_uses_interface(type(module))


@functools.cache
def _eager_function_name(cls: type) -> str:
    """The eager function ``cls.forward`` falls back to: the default it hands ``get_interface(implementation,
    default)``, or the one it assigns before looking the implementation up; ``eager_attention_forward`` where the
    source says neither. (Phi-4-multimodal's vision attention uses ``simple_eager_attention_forward``, Llama 4's
    ``vision_eager_attention_forward``, beside an ``eager_attention_forward`` of other modules in the same file.)"""
    source = forward_source(cls)
    start = source.find("get_interface(")
    if start >= 0:
        depth, begin = 0, start + len("get_interface(")
        for end in range(begin, len(source)):
            if source[end] == "(":
                depth += 1
            elif source[end] == ")":
                if depth == 0:
                    name = source[begin:end].rsplit(",", 1)[-1].strip()
                    if name.isidentifier():
                        return name
                    break
                depth -= 1
    assigned = re.search(r"^\s*attention_interface(?:\s*:\s*Callable)?\s*=\s*([A-Za-z_]\w*)\s*$", source, re.M)
    return assigned.group(1) if assigned else "eager_attention_forward"


def _original_function(implementation: str, module: nn.Module) -> Callable:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if implementation in ALL_ATTENTION_FUNCTIONS:
        return ALL_ATTENTION_FUNCTIONS[implementation]
    # "eager" is not in the registry: each modeling file defines its own eager functions, and each module names
    # the one it uses.
    eager = getattr(sys.modules[type(module).__module__], _eager_function_name(type(module)), None)
    if implementation == "eager" and eager is not None:
        return eager
    raise RuntimeError(
        f"vitmad.record: attention implementation '{implementation}' of {type(module).__name__} is not in "
        "transformers' AttentionInterface; load the model with attn_implementation='sdpa' or 'eager'"
    )


class _WrapperName(str):
    """The wrapper's name as a recorded config holds it. A copy or a pickle of that config (``copy.deepcopy`` of
    the model, ``torch.save`` of the whole model inside the block) takes the implementation the config had before
    instead: a checkpoint saved mid-recording runs in another process as the model it was, where it once named an
    implementation that only this process had registered. (Loading it still imports vitmad: the model's hook dicts
    hold the recording's inert stand-ins, _RecordingHook.)"""

    original: str | None

    def __new__(cls, name: str, original: str | None):
        self = super().__new__(cls, name)
        self.original = original
        return self

    def __reduce_ex__(self, protocol):
        return (str, (self.original,)) if self.original is not None else (type(None), ())

    def __deepcopy__(self, memo):
        return self.original


def _recording_name(original: str | None) -> _WrapperName:
    """The name a recorded config holds for its implementation ``original`` (None: transformers' default)."""
    return _WrapperName(_register_wrapper(original or "eager"), original)


@contextlib.contextmanager
def _original_name_during(module: nn.Module, implementation: str):
    """The module's config names ``implementation`` again while its original function runs: transformers'
    ``flash_attention_forward`` reads ``module.config._attn_implementation`` to choose the kernel it imports
    (``flash_attention_2``, ``_3``, ``_4`` or a hub kernel), and under the recording's name it looked for a hub
    kernel of that name and failed (found by QA with a stand-in ``flash_attn``; no GPU here). Set back after the
    call, also when it raises; a config the recording does not hold (another name) is left alone."""
    config = getattr(module, "config", None)
    held = getattr(config, "_attn_implementation_internal", None)
    if not (isinstance(held, str) and held.startswith(_WRAPPER_PREFIX)):
        yield
        return
    config._attn_implementation_internal = implementation
    try:
        yield
    finally:
        config._attn_implementation_internal = held


def _measure(semantics: str, active: list, original: Callable, module, query, key, value, attention_mask,
             args: tuple, kwargs: dict) -> None:
    """Hands one call of the model's attention to the recordings measuring ``module``."""
    # By parameter name as the original reads them: sdpa's sixth parameter is dropout, eager's scaling.
    named = bound_arguments(original, module, query, key, value, attention_mask, args, kwargs)
    for layer, callback in active:
        measured_key, bias = call_bias(semantics, layer, named, query, key, attention_mask)
        callback(layer, query, measured_key, named.get("scaling"), bias)


def _register_wrapper(implementation: str) -> str:
    """Registers (once per process) the recording wrapper of ``implementation``; returns its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    name = _WRAPPER_PREFIX + implementation
    if name in ALL_ATTENTION_FUNCTIONS:
        return name

    semantics = attention_semantics(implementation, "this model")

    def attention(module, query, key, value, attention_mask, *args, **kwargs):
        original = find_original(implementation, module)
        # The model's own attention first: a call it cannot make (a Swin stage smaller than its window, whose bias
        # does not fit the logits) fails with the model's error, not with vitmad's refusal of the same arguments.
        # Only flash attention reads the config's name while it runs; the others leave the config alone (another
        # thread's model sharing it reads the recording's name throughout).
        with _original_name_during(module, implementation) if semantics == "flash" else contextlib.nullcontext():
            result = original(module, query, key, value, attention_mask, *args, **kwargs)
        active = list(_ACTIVE.get(id(module), ()))
        if active:
            measure(semantics, active, original, module, query, key, value, attention_mask, args, kwargs)
        return result

    # Eager between compiled graphs, as the recording's hooks: a model compiled inside the block had dynamo trace the
    # cached signature_of, and torch warned of "silent incorrectness" in vitmad's file (QA 391). Made here, when a
    # recording first wraps an implementation: torch.compiler.disable imports dynamo, which import vitmad need not.
    reason = "vitmad.record measures the attention eagerly, between compiled graphs"
    measure = torch.compiler.disable(_measure, reason=reason)
    # The eager function is found in the modeling file's source (cached per class): eager between graphs too. The
    # others are a lookup in transformers' registry, which dynamo traces without a break.
    find_original = _original_function if implementation in ALL_ATTENTION_FUNCTIONS else \
        torch.compiler.disable(_original_function, reason=reason)
    AttentionInterface.register(name, attention)
    # The mask the model builds depends on the implementation's name: build the one the original gets.
    if implementation in ALL_MASK_ATTENTION_FUNCTIONS:
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[implementation])
    return name


# The configs recordings have switched to the wrapper: id -> [config, its implementation before, recordings holding
# it]. Models built from one config object (ViTModel(config) twice) share it: a second recording took the first's
# wrapper name for a copied config's and set it back, and the first recording to end set it back under the other
# one's forward (another thread's, or an outer recording's), whose later layers then went unrecorded. Shared, the
# config is switched by the first recording and set back by the last.
_HELD_CONFIGS: dict[int, list] = {}
_HELD_LOCK = threading.Lock()


def _implementation(config) -> str | None:
    """The implementation the config names for its model: the one it had before a recording switched it."""
    held = _HELD_CONFIGS.get(id(config))
    return held[1] if held is not None else config._attn_implementation_internal


def interface_config(model: nn.Module, name: str, module: nn.Module):
    """The config whose ``_attn_implementation`` the attention module ``name`` reads at each forward: its own, else
    that of the nearest transformers model above it (``model`` may be a user's module holding one); None where
    neither has one."""
    config = getattr(module, "config", None)
    if config is not None:
        return config
    return next((owner.config for _, owner in enclosing_modules(model, name) if is_hf_model(owner)), None)


def reads_implementation_by_interface(model: nn.Module, name: str, module: nn.Module) -> bool:
    """Whether the transformers attention module ``name`` of ``model`` is recorded through the
    ``AttentionInterface`` (:class:`HFAttentionHooks`): always in a transformers model; inside a user's module (an
    ``nn.Sequential``, a wrapper), where its implementation is one the module capture does not read (flex_attention:
    refused there, while the same model bare recorded, QA 334); eager and SDPA are read by the module capture as
    any module's."""
    if not uses_attention_interface(module):
        return False
    if is_hf_model(model):
        return True
    config = interface_config(model, name, module)
    return config is not None and str(_implementation(config) or "eager") not in ("eager", "sdpa")


class HFAttentionHooks:
    """Routes a transformers model's attention through the recording wrapper while installed.

    Args:
        model: the ``PreTrainedModel``, or a user's module holding one.
        modules: the attention modules to record, by qualified name in ``model``.
        callback: called with ``(name, q, k, scale, mask)`` for every call of a recorded module.
        done: called with ``(name, module, completed)`` when a recorded module's forward has ended, returning
            (completed) or raising; its interface calls in that forward (one, or one per chunk) are one layer.
    """

    def __init__(self, model: nn.Module, modules: dict[str, nn.Module], callback: AttentionCallback,
                 done: Callable[[str, nn.Module, bool], None]):
        self.model = model
        self.modules = modules
        self.callback = callback
        self.done = done
        self._saved: list = []  # the configs this recording holds (_HELD_CONFIGS)
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self.trailing: list[torch.utils.hooks.RemovableHandle] = []  # hooks the recording keeps after the user's

    def _configs(self) -> list:
        """The configs that choose the recorded modules' attention implementation (each module reads its own
        ``config._attn_implementation`` at every forward), without duplicates."""
        configs = {}
        for name, module in self.modules.items():
            config = interface_config(self.model, name, module)
            configs[id(config)] = config
        recorded = any(id(module) in _ACTIVE for module in self.modules.values())
        for config in configs.values():
            implementation = str(config._attn_implementation)
            if implementation.startswith(_WRAPPER_PREFIX) and id(config) not in _HELD_CONFIGS:
                if recorded:
                    raise RuntimeError(f"vitmad.record: {type(self.model).__name__} is already being recorded")
                # A config copied while recorded by other means than copy.deepcopy or pickling (which give the
                # original name, _WrapperName), copy.copy say, holds the wrapper's name; the wrapper runs the
                # original implementation for modules no recording holds: that implementation.
                config._attn_implementation_internal = implementation[len(_WRAPPER_PREFIX):]
        return list(configs.values())

    def install(self) -> None:
        # Only the configs of the recorded modules are switched to the wrapper, on the attribute the modules read:
        # the rest of the model (a CNN backbone that refuses SDPA, another tower) is left exactly as it was.
        with _HELD_LOCK:
            self._install()

    def _install(self) -> None:
        configs = self._configs()
        for name, module in self.modules.items():
            _ACTIVE.setdefault(id(module), []).append((name, self.callback))
        for name, module in self.modules.items():
            # The module's forward is one layer, whatever number of interface calls it makes (Qwen2-VL's vision
            # attention calls it once per image or window): done when the forward ends, also when it raises.
            def leave(module, args, output, name=name) -> None:
                self.done(name, module, output is not None)

            self._handles.append(module.register_forward_hook(leave, always_call=True))
            self.trailing.append(self._handles[-1])
        for config in configs:  # before any change: an implementation vitmad cannot read is refused here
            attention_semantics(_implementation(config) or "eager", type(self.model).__name__)
        for config in configs:
            self._saved.append(config)
            held = _HELD_CONFIGS.get(id(config))
            if held is not None:  # switched by another active recording: shared until the last one ends
                held[2] += 1
                continue
            original = config._attn_implementation_internal
            _HELD_CONFIGS[id(config)] = [config, original, 1]
            config._attn_implementation_internal = _recording_name(original)

    def before_forward(self) -> None:
        """At each forward of the model: an implementation the user set inside the block
        (``model.set_attn_implementation``) is wrapped in its turn, so the recording goes on, and is what the
        config keeps at exit."""
        with _HELD_LOCK:
            for config in self._saved:
                current = config._attn_implementation_internal
                if not str(current).startswith(_WRAPPER_PREFIX):
                    attention_semantics(current or "eager", type(self.model).__name__)
                    _HELD_CONFIGS[id(config)][1] = current
                    config._attn_implementation_internal = _recording_name(current)

    def remove(self) -> None:
        for module in self.modules.values():
            # Only this recording's entries: a second record() of the same model fails without touching them.
            entries = _ACTIVE.get(id(module))
            if entries is not None:
                entries[:] = [entry for entry in entries if entry[1] != self.callback]
                if not entries:
                    del _ACTIVE[id(module)]
        with _HELD_LOCK:
            for config in reversed(self._saved):
                held = _HELD_CONFIGS[id(config)]
                held[2] -= 1
                if held[2]:
                    continue  # another active recording holds it
                del _HELD_CONFIGS[id(config)]
                # Set back only what is still the recording's: an implementation the user chose inside the block
                # (model.set_attn_implementation) stays.
                if str(config._attn_implementation_internal).startswith(_WRAPPER_PREFIX):
                    config._attn_implementation_internal = held[1]
            self._saved.clear()
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.trailing.clear()
