"""What the diffusers families share: recognising Hugging Face diffusers' attention modules and their processors.

diffusers computes attention in two kinds of module: ``diffusers.models.attention_processor.Attention`` (DiT,
PixArt, SD3, the UNets' transformer blocks) and the per-model classes that mix in
``diffusers.models.attention.AttentionModuleMixin`` (``FluxAttention``, ``WanAttention``, ...). Neither computes
attention in its own ``forward``: it hands its inputs to ``self.processor``, an object swapped at run time
(``set_attn_processor``, IP-Adapters, PAG, fused projections), whose ``__call__`` calls
``F.scaled_dot_product_attention`` or ``dispatch_attention_fn`` (whose native backend calls it), computes a softmax
itself over merged batch and heads (``AttnProcessor``), or no softmax at all (Sana's linear attention). So vitmad's
source search finds none of them, and what a call attends over is the processor's choice: a family reads the
processor's class by name in each call (:func:`processor_name`) and refuses one it has not read.

Classes are recognised by their defining module, so that no other library's ``Attention`` changes behaviour.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from ..module_index import named_module_list
from .stages import forward_arguments

__all__ = ["is_attention", "is_cross_attention", "given_other_keys", "processor_name", "processor_refusal",
           "attention_under", "is_diffusers_class", "backend_refusal"]


def is_diffusers_class(module: nn.Module, names) -> bool:
    """Whether ``module``'s class is one of ``names`` (class names) and is defined in diffusers."""
    cls = type(module)
    return cls.__name__ in names and cls.__module__.startswith("diffusers.")


def is_attention(module: nn.Module) -> bool:
    """Whether ``module`` is a diffusers attention module: an ``attention_processor.Attention`` or a class that
    mixes in ``attention.AttentionModuleMixin`` (subclasses included)."""
    for cls in type(module).__mro__:
        if cls.__module__ == "diffusers.models.attention_processor" and cls.__name__ == "Attention":
            return True
        if cls.__module__ == "diffusers.models.attention" and cls.__name__ == "AttentionModuleMixin":
            return True
    return False


def is_cross_attention(module: nn.Module) -> bool:
    """Whether a diffusers ``Attention`` was built for cross-attention (``cross_attention_dim`` given: its keys are
    ``encoder_hidden_states``, a caption's or another condition's tokens, never the queries' own)."""
    return getattr(module, "is_cross_attention", False) is True


def given_other_keys(module: nn.Module, args: tuple, kwargs: dict) -> bool:
    """Whether a diffusers attention call (a forward pre-hook's ``args`` and ``kwargs``, ``with_kwargs``) was given
    keys of another tensor than its queries: ``encoder_hidden_states`` present and not ``hidden_states`` itself
    (Kandinsky 3's and LuminaNext's self-attention pass the queries' own tensor as both). What a layer was built as
    does not decide it: a ``BasicTransformerBlock`` built with ``double_self_attention`` hands its ``attn2`` the
    forward's ``encoder_hidden_states`` whenever it gets them, so that self-attention then attends to a caption."""
    arguments = forward_arguments(module, args, kwargs)
    keys = arguments.get("encoder_hidden_states")
    return keys is not None and keys is not arguments.get("hidden_states")


def processor_name(module: nn.Module) -> str:
    """The class name of the processor a diffusers attention module runs now (it may change between calls)."""
    return type(getattr(module, "processor", None)).__name__


def processor_refusal(attention: nn.Module, kind: str, processors, positions: str = "[N, 2]") -> str | None:
    """Why an attention module of a ``kind`` model is refused: it runs a processor other than ``processors``, the ones
    whose calls vitmad has read (another may add IP-Adapter's tokens, perturb the attention, merge batch and heads
    or compute it out of vitmad's sight); None where it runs one of them. ``positions``: the shape a user passes
    instead."""
    processor = processor_name(attention)
    if processor in processors:
        return None
    shown = ", ".join(processors)
    return (f"it runs the attention processor {processor}; vitmad has read the layout of {kind}'s calls through "
            f"{shown} only (another processor may add IP-Adapter tokens, perturb the attention, merge batch and heads "
            f"or compute it out of vitmad's sight); set {shown} back (model.set_attn_processor), or pass "
            f"positions=<{positions} latent-pixel position of each token>")


def attention_under(model: nn.Module, owner: Callable[[nn.Module], bool]) -> dict[str, nn.Module]:
    """The diffusers attention modules of ``model`` inside a module for which ``owner`` holds (the model itself
    included), by qualified name in module order; one inside another is left to the outer one."""
    owners: list[str] = []
    found = {}
    for name, module in named_module_list(model):
        if owner(module):
            owners.append(name)
        elif is_attention(module) and any(o == "" or name.startswith(o + ".") for o in owners) \
                and not any(name.startswith(outer + ".") for outer in found):
            found[name] = module
    return found


# diffusers' attention backends (attention_dispatch.AttentionBackendName) whose function calls
# F.scaled_dot_product_attention, where vitmad sees q and k: "native" and the "_native_*" ones that pick a torch
# SDPA kernel. "flex" calls torch's flex_attention, which vitmad sees where it is torch's function itself
# (recording.flex_call), not through torch.compile. flash-attn, sage, xformers, aiter and the NPU / XLA kernels compute
# the attention elsewhere, and so do the native ones under context parallelism (aten ops, ring or Ulysses exchanges
# between devices).
_SDPA_BACKENDS = frozenset({"native", "_native_cudnn", "_native_efficient", "_native_flash", "_native_math"})


def backend_refusal(module: nn.Module) -> str | None:
    """Why ``module``'s attention went unseen, when its processor dispatches it (``dispatch_attention_fn``) to a
    diffusers attention backend that does not call ``F.scaled_dot_product_attention`` (``set_attention_backend``,
    the ``attention_backend`` context, ``DIFFUSERS_ATTN_BACKEND``, or context parallelism); None where the backend
    calls it. Asked only of a forward that computed no attention vitmad saw (``refusal_without_attention``): the
    class of the processor was read, so this is where its attention went."""
    processor = getattr(module, "processor", None)
    if getattr(processor, "_parallel_config", None) is not None:
        return ("its processor runs diffusers' context-parallel attention (enable_parallelism), which exchanges keys "
                "between devices and calls no F.scaled_dot_product_attention vitmad sees; record without it")
    backend = getattr(processor, "_attention_backend", None)
    source = "the processor's (set_attention_backend)"
    if backend is None:
        try:
            from diffusers.models.attention_dispatch import _AttentionBackendRegistry
        except ImportError:  # another diffusers: nothing to name
            return None
        backend = getattr(_AttentionBackendRegistry, "_active_backend", None)
        source = "the active one (the attention_backend context or DIFFUSERS_ATTN_BACKEND)"
    name = getattr(backend, "value", backend)
    if name is None or name in _SDPA_BACKENDS:
        return None
    # set_attention_backend sets the processors' and the active one; reset_attention_backend clears only the
    # processors', so the active one stays until set again.
    return (f"its attention ran on diffusers' attention backend '{name}', {source}, which calls no "
            "F.scaled_dot_product_attention (nor torch's flex_attention itself, uncompiled) vitmad sees; record with "
            "the native backend (model.set_attention_backend('native'), or inside diffusers' "
            "attention_backend('native') context)")
