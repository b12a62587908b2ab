"""Recording attention that calls ``F.scaled_dot_product_attention``: timm ViTs, DeiT, EVA and any module given.

While a recorded module runs, a ``TorchFunctionMode`` sees each of its calls of
``F.scaled_dot_product_attention`` and hands the callback the exact ``q`` and ``k`` it receives: after
``q_norm``/``k_norm`` and after the rotary embedding of RoPE models such as EVA, with the same ``scale`` and
``attn_mask``. The call itself then runs unchanged, so the model's outputs do not change. The mode is entered
and left by forward hooks (the post hook with ``always_call=True``), so it is left even when the forward raises;
when the module's forward returns, ``done`` is told, so that a module making several calls (differential
attention) is recorded as one layer.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from .transformers_capture import AttentionCallback

__all__ = ["sdpa_attention_modules", "SdpaAttentionHooks", "DoneCallback"]

# (qualified module name, module, completed): the module's forward ended, returning (completed) or raising.
DoneCallback = Callable[[str, nn.Module, bool], None]
# The input projections of timm's self-attention: q, k, v at once (Attention, DiffAttention, ...), q alone
# (EvaAttention, AttentionRope), or q, k, v and the MLP's input at once (ParallelScalingBlock, the *_xp_* and
# vit_pwee_* blocks that compute attention without an attention submodule).
_SELF_ATTENTION_PROJECTIONS = ("qkv", "q_proj", "in_proj")


def sdpa_attention_modules(model: nn.Module) -> dict[str, nn.Module]:
    """timm's self-attention modules by qualified name: ``Attention``, ``AttentionRope``, ``EvaAttention``,
    ``DiffAttention``, ``ParallelScalingBlock``, ...

    They have a ``fused_attn`` switch and an input projection of their own (``qkv``, ``q_proj`` or
    ``in_proj``); attention pooling (``AttentionPoolLatent``, a cross-attention from learned latent queries
    through ``q`` and ``kv``) has none of them.
    """
    return {
        name: module
        for name, module in model.named_modules()
        if hasattr(module, "fused_attn") and any(hasattr(module, p) for p in _SELF_ATTENTION_PROJECTIONS)
    }


def _sdpa_arguments(args: tuple, kwargs: dict) -> tuple:
    """(query, key, attn_mask, is_causal, scale, enable_gqa) of a ``scaled_dot_product_attention`` call."""
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
    bound = dict(zip(names, args)) | kwargs
    return (bound["query"], bound["key"], bound.get("attn_mask"), bound.get("is_causal", False),
            bound.get("scale"), bound.get("enable_gqa", False))


class _CaptureSdpa(TorchFunctionMode):
    def __init__(self, layer: str, module: nn.Module, callback: AttentionCallback):
        super().__init__()
        self.layer, self.module, self.callback = layer, module, callback

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            query, key, mask, is_causal, scale, enable_gqa = _sdpa_arguments(args, kwargs)
            if is_causal:
                raise ValueError(
                    f"vitmad.record: {self.layer} ({type(self.module).__name__}) runs causal attention; MAD is "
                    "defined for a ViT's bidirectional attention"
                )
            if enable_gqa and key.shape[-3] != query.shape[-3]:
                key = key.repeat_interleave(query.shape[-3] // key.shape[-3], dim=-3)
            self.callback(self.layer, query, key, scale, mask)
        return func(*args, **kwargs)


class SdpaAttentionHooks:
    """Captures the ``F.scaled_dot_product_attention`` calls of each given module while installed.

    Args:
        modules: the attention modules to record, by qualified name.
        callback: called with ``(name, q, k, scale, mask)`` for every recorded call.
        done: called with ``(name, module, completed)`` when a recorded module's forward has ended.

    Raises:
        ValueError: a module has ``fused_attn = False`` (it would never call the fused attention).
    """

    def __init__(self, modules: dict[str, nn.Module], callback: AttentionCallback, done: DoneCallback):
        self.modules = modules
        self.callback = callback
        self.done = done
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def install(self) -> None:
        for name, module in self.modules.items():
            if getattr(module, "fused_attn", True) is False:
                raise ValueError(
                    f"vitmad.record: {name} ({type(module).__name__}) has fused_attn=False, so its attention "
                    "never reaches F.scaled_dot_product_attention; set module.fused_attn = True (or unset "
                    "TIMM_FUSED_ATTN=0)"
                )
        for name, module in self.modules.items():
            mode = _CaptureSdpa(name, module, self.callback)

            def enter(*_, mode=mode) -> None:
                mode.__enter__()

            def leave(module, args, output, name=name, mode=mode) -> None:
                mode.__exit__(None, None, None)
                # A forward that raised reaches this hook with no output: its calls are dropped, not recorded.
                self.done(name, module, output is not None)

            self._handles.append(module.register_forward_pre_hook(enter))
            self._handles.append(module.register_forward_hook(leave, always_call=True))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
