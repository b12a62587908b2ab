"""Models compiled with ``torch.compile`` inside ``vitmad.record``: they run eagerly while they are recorded.

Code that ``torch.compile`` generated does not call Python forward hooks, transformers' ``AttentionInterface``
wrappers or a patched ``F.scaled_dot_product_attention``: a compiled model recorded as it is reports no layer, or
(where a graph breaks) only some. So while a compiled model (``torch.compile(model)``, ``model.compile()`` or a
submodule compiled in place) is being recorded, dynamo's stance is ``force_eager``
(``torch.compiler.set_stance``): compiled modules and functions run their original Python code and vitmad sees
every layer. The outputs are then those of the eager model (the same attention kernels; inductor's fused
epilogues round differently), and the compiled code is used again after the block.

Only then: a model that is not compiled keeps the compiled kernels it calls itself (transformers'
``flex_attention`` is a compiled function; forced eager it would run flex's slow reference path and round
differently), so its outputs stay bit-identical. A model compiled only inside the block is recorded: the
recording's hooks and its captures' calls into it are disabled for dynamo (``torch.compiler.disable``), so each is a
graph break that runs eagerly, and ``fullgraph=True`` fails with the reason. Code compiled before the block from the
same model, or from another instance of its class (dynamo keeps code per class's forward and does not guard on hooks),
reused by a wrapper of the recorded (uncompiled) model, calls no hooks: the recording then reports the model as run
but not through the recorded modules, naming the compiled forwards (:func:`compiled_forwards`) and what to do.

The stance is process-wide, not per thread: recordings that overlap in several threads share it (a count under
a lock), and it is restored when the last one ends, to what it was before the first.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from .module_index import named_module_list
from .process_scope import ProcessWideScope

__all__ = ["uncompiled", "is_compiled", "compiled_forwards", "check_compiled", "graph_form_refusal",
           "EagerWhileRecording"]


def _optimized_module_type() -> type | None:
    try:
        from torch._dynamo.eval_frame import OptimizedModule
    except ImportError:  # a torch without dynamo
        return None
    return OptimizedModule


def uncompiled(model: nn.Module) -> nn.Module:
    """The module ``torch.compile(model)`` wraps (its hooks and names are the ones to record), else ``model``."""
    optimized = _optimized_module_type()
    while optimized is not None and isinstance(model, optimized):
        model = model._orig_mod
    return model


def is_compiled(model: nn.Module) -> bool:
    """Whether ``model`` or a submodule of it runs compiled code when called: a ``torch.compile`` wrapper, or
    ``Module.compile()`` done in place (which keeps the module and sets its compiled call). A wrapper held as a
    submodule too (``model.blocks[1] = torch.compile(model.blocks[1])``, ``nn.DataParallel(torch.compile(model))``):
    run before the block, its code called none of the hooks, and the block was left out without a word, or the
    wrapped model refused as run "not through the modules being recorded" (QA 410)."""
    return bool(_compiled_parts(model))


def _compiled_parts(model: nn.Module) -> list[str]:
    """The qualified names of the modules of ``model`` that run compiled code when called (``""``: ``model``
    itself), in module order: :func:`is_compiled`'s test."""
    optimized = _optimized_module_type()
    return [name for name, m in named_module_list(model)
            if (optimized is not None and isinstance(m, optimized)) or getattr(m, "_compiled_call_impl", None)]


def compiled_forwards(model: nn.Module) -> list[str]:
    """``Class.forward`` of ``model``'s own class where dynamo holds compiled code for it (its cache is per code
    object, so a ``torch.compile`` of any instance of the class made it); a torch.compile wrapper of ``model``
    enters there and reuses that code however the hooks changed since (dynamo does not guard on them:
    ``torch._dynamo.config.skip_nnmodule_hook_guards``), and so calls none of the recording's. The model's own class
    alone: the classes inside it (Linear, a tower's encoder) get code of their own whenever any compiled function with
    a graph break calls them, anywhere in the process, and named them wrongly (the test suite's earlier compiled
    tests blamed a PeAudioVideoModel that no wrapper ran). Empty where this torch cannot say (the cache is read
    through dynamo's private ``_debug_get_cache_entry_list``)."""
    try:
        from torch._dynamo.eval_frame import _debug_get_cache_entry_list
    except ImportError:
        return []
    cls = type(model)
    code = getattr(cls.forward, "__code__", None)
    return [f"{cls.__name__}.forward"] if code is not None and _debug_get_cache_entry_list(code) else []


class EagerWhileRecording(ProcessWideScope):
    """Sets dynamo's stance to ``force_eager`` from the first active recording of a compiled model to the last
    (thread-safe)."""

    _stance = None  # the set_stance object of the first recording; its exit restores the prior stance

    @classmethod
    def available(cls) -> bool:
        return hasattr(torch, "compiler") and hasattr(torch.compiler, "set_stance")

    @classmethod
    def _first(cls) -> None:
        """Only for a model check_compiled accepted, which a torch without set_stance never is."""
        try:
            cls._stance = torch.compiler.set_stance("force_eager")
        except RuntimeError as error:  # "attempted to set_stance in a torch.compile region"
            raise RuntimeError(
                "vitmad.record: the recording was entered inside a function being compiled by torch.compile, "
                "whose generated code cannot report its attention; enter `with vitmad.record(model)` outside "
                f"the compiled function ({error})"
            ) from None

    @classmethod
    def _last(cls) -> None:
        stance, cls._stance = cls._stance, None
        stance.__exit__(None, None, None)


def graph_form_refusal(model: nn.Module) -> str | None:
    """Why a model made into TorchScript (``torch.jit.script`` / ``trace``, or holding such a module) or the module of
    a ``torch.export`` program cannot be recorded, naming what to record instead; None for any other model. Their
    forward runs code no hook of vitmad sees, and their module trees are not the model's (a scripted module's
    ``get_submodule`` raises; an exported one has no attention modules): they failed with torch's own errors, or
    recorded nothing in silence (QA 261). ``vitmad.record`` and ``vitmad.profile`` each refuse in their own words."""
    for name, module in named_module_list(model):
        if isinstance(module, torch.jit.ScriptModule) and not name:
            return (f"the model ({type(model).__name__}) is a TorchScript module (torch.jit.script or "
                    "torch.jit.trace), whose forward runs TorchScript code no hook of vitmad sees; record the "
                    "nn.Module it was made from (a trace or script made inside the recording block runs unrecorded)")
        if isinstance(module, torch.jit.ScriptModule):
            # A part of the model, attention or not (a scripted preprocessing step): vitmad walks and hooks the
            # whole tree, which TorchScript modules do not allow (torch's "get_submodule is not supported").
            return (f"{name} of {type(model).__name__} is a TorchScript module (torch.jit.script or "
                    "torch.jit.trace), whose module tree vitmad cannot walk or hook; record the model with that part "
                    "as the nn.Module it was made from (its output is the same), or record the part of the model "
                    "beside it that holds the attention")
        if not name and isinstance(module, torch.fx.GraphModule) and hasattr(module, "_in_spec"):
            return ("the model is the module of a torch.export program (ExportedProgram.module()), a graph of aten "
                    "operations without the model's attention modules; record the nn.Module it was exported from")
    return None


def check_compiled(model: nn.Module, given: nn.Module) -> bool:
    """Whether the recording must run compiled code eagerly: ``given`` (unwrapped to ``model``) is compiled. Then
    one warning: it will run with eager speed and eager rounding. A torch without ``set_stance`` cannot run it
    eagerly: a clear error."""
    parts = _compiled_parts(model) if given is model else [""]
    if not parts:
        return False
    name = type(model).__name__
    if "" not in parts:  # compiled inside: say where
        name = f"{parts[0]} of {name}"
    if not EagerWhileRecording.available():
        raise ValueError(
            f"vitmad.record: {name} is compiled with torch.compile, whose generated code cannot hand its attention "
            f"to vitmad, and this torch ({torch.__version__}) has no torch.compiler.set_stance to run it eagerly "
            "inside the recording; record and call the uncompiled model"
        )
    warnings.warn(
        f"vitmad.record: {name} is compiled with torch.compile; inside the recording it runs eagerly (compiled code "
        "cannot hand its attention to vitmad), so its outputs are the eager model's and its speed eager speed; it "
        "runs compiled again after the block",
        UserWarning, stacklevel=4,
    )
    return True
