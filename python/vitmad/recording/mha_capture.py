"""Recording ``torch.nn.MultiheadAttention`` layers (torchvision's ViT, OpenCLIP's towers, many research ViTs).

Its forward runs one fused ``F.multi_head_attention_forward`` (or, in inference, the C++ fast path), whose
queries and keys no hook can see. So a forward pre-hook computes them from the layer's own inputs and
projection weights, as that function does: ``q = query W_q^T + b_q`` and ``k = key W_k^T + b_k`` split into
heads, scale ``1 / sqrt(head_dim)``, and the layer's ``attn_mask`` (``[L, S]`` or ``[B * H, L, S]``; a boolean
``True`` hides a key, the opposite of SDPA's) with its ``key_padding_mask`` (``[B, S]``, ``True`` hides). The
layer itself runs unchanged; the two extra projections are the cost (about a sixth of a ViT layer's matrix
products).

Refused with the layer's name: ``is_causal`` (causal attention has no MAD here, as elsewhere), extra keys
(``add_bias_kv``, ``add_zero_attn``) and nested-tensor inputs. A call whose ``key`` is another sequence than its
``query`` says so to the recording (``other_keys``): the keys of a layout that places them at the queries' tokens
are taken for those tokens projected apart, with a warning once per layer of a model no library vitmad reads
defines (it may be cross-attention to a memory, whose slots have no place in the image).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .module_capture import DoneCallback
from .module_index import named_module_list
from .placement import CAUSAL_ADVICE
from .transformers_capture import AttentionCallback

__all__ = ["functional_mha_query_key", "mha_modules", "MultiheadAttentionHooks", "mha_query_key", "reads_own_arguments"]

_ARGUMENTS = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask", "average_attn_weights",
              "is_causal")
# F.multi_head_attention_forward's, in order.
_FUNCTIONAL_ARGUMENTS = (
    "query", "key", "value", "embed_dim_to_check", "num_heads", "in_proj_weight", "in_proj_bias", "bias_k", "bias_v",
    "add_zero_attn", "dropout_p", "out_proj_weight", "out_proj_bias", "training", "key_padding_mask", "need_weights",
    "attn_mask", "use_separate_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight", "static_k",
    "static_v", "average_attn_weights", "is_causal")


def mha_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every ``nn.MultiheadAttention`` (or subclass) by qualified name."""
    return {name: m for name, m in named_module_list(model) if isinstance(m, nn.MultiheadAttention)}


def _hidden_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """MultiheadAttention's mask as an additive bias: a boolean ``True`` hides (-inf), a float one adds, in its own
    dtype: the layer hands a float32 mask of a 16-bit layer to SDPA as it is (need_weights=False, as
    nn.TransformerEncoderLayer calls it), and SDPA adds it unrounded (QA 398)."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask


def reads_own_arguments(module: nn.Module) -> bool:
    """Whether ``module`` is an ``nn.MultiheadAttention`` whose forward is the layer's own, read by
    :class:`MultiheadAttentionHooks` from its call's arguments and its ``in_proj_weight`` before it runs. A subclass
    with a forward of its own may call the layer's with other arguments (a mask it adds, its own signature: a
    ``forward(x)`` failed with a KeyError, QA 398), or attend with other weights (torch.ao's quantizable
    MultiheadAttention projects with its ``linear_Q`` and ``linear_K``, its ``in_proj_weight`` left as initialised:
    a silently wrong MAD): it is recorded by what its forward computes, as any module that attends
    (``module_capture``; the function it calls: :func:`functional_mha_query_key`)."""
    return isinstance(module, nn.MultiheadAttention) and type(module).forward is nn.MultiheadAttention.forward


def mha_query_key(layer: str, module: nn.MultiheadAttention, args: tuple, kwargs: dict
                  ) -> tuple[torch.Tensor, torch.Tensor, float, torch.Tensor | None, bool, torch.Tensor | None]:
    """``(q [B, H, L, D], k [B, H, S, D], scale, bias [B or 1, H or 1, L, S] or None, other_keys, padded)`` of one
    forward call; ``other_keys``: its ``key`` is not its ``query`` (neither the same tensor nor equal to it);
    ``padded``: ``[B, L]`` bool, the tokens its ``key_padding_mask`` hides (True, or -inf) where its keys are its
    queries' tokens and it hides any, else None: padding, whose own query rows are no token's either."""
    named = dict(zip(_ARGUMENTS, args)) | kwargs
    query, key = named["query"], named["key"]
    if module.batch_first and query.dim() == 3 and not (query.is_nested or key.is_nested):
        # [L, B, E], as the functional takes them; one tensor given as both stays one (two views of it were told
        # apart by their values, which NaN made unequal: a warning of keys not the queries, QA 418).
        same = key is query
        query = query.transpose(0, 1)
        key = query if same else key.transpose(0, 1)
    separate = not module._qkv_same_embed_dim
    return _query_key(f"{layer} (MultiheadAttention)", {
        **named, "query": query, "key": key, "num_heads": module.num_heads, "in_proj_bias": module.in_proj_bias,
        "in_proj_weight": module.in_proj_weight, "use_separate_proj_weight": separate,
        "q_proj_weight": module.q_proj_weight, "k_proj_weight": module.k_proj_weight,
        "bias_k": module.bias_k, "add_zero_attn": module.add_zero_attn})


def functional_mha_query_key(label: str, args: tuple, kwargs: dict
                             ) -> tuple[torch.Tensor, torch.Tensor, float, torch.Tensor | None, bool,
                                        torch.Tensor | None]:
    """:func:`mha_query_key` of one ``F.multi_head_attention_forward`` call a recorded module makes itself (a
    subclass of ``nn.MultiheadAttention`` with a forward of its own calling the layer's, a block calling the
    functional with its own weights as CLIP's attention pool does): its queries and keys from the arguments the
    function is given, whatever the module's own forward took. ``label``: the layer, as refusals name it."""
    return _query_key(label, dict(zip(_FUNCTIONAL_ARGUMENTS, args)) | kwargs)


def _query_key(label: str, named: dict
               ) -> tuple[torch.Tensor, torch.Tensor, float, torch.Tensor | None, bool, torch.Tensor | None]:
    """What :func:`mha_query_key` returns, from ``F.multi_head_attention_forward``'s arguments by name (query and
    key ``[L, B, E]`` or ``[L, E]``)."""
    query, key = named["query"], named["key"]
    # torchvision's ViT and most encoders pass one tensor as both; a norm applied twice gives equal ones.
    other_keys = key is not query and (key.shape != query.shape or not torch.equal(key, query))
    if query.is_nested or key.is_nested:
        # nn.TransformerEncoder makes them of a padded batch (src_key_padding_mask, eval mode, no grad): the user's
        # way out was not said (QA 378).
        raise ValueError(f"vitmad.record: {label} received nested tensors, which vitmad does not read (it reads "
                         "padded batches); nn.TransformerEncoder makes them of a batch given src_key_padding_mask in "
                         "eval mode without grad: build it with enable_nested_tensor=False, or set its "
                         "use_nested_tensor = False (the outputs are the same)")
    if named.get("is_causal", False):
        raise ValueError(f"vitmad.record: {label} runs causal attention (is_causal=True); MAD is defined for a "
                         f"vision transformer's bidirectional attention{CAUSAL_ADVICE}")
    if named.get("bias_k") is not None or named.get("add_zero_attn", False) or named.get("static_k") is not None:
        raise ValueError(f"vitmad.record: {label} adds keys of its own (add_bias_kv, add_zero_attn or static_k), "
                         "which have no position")
    batched = query.dim() == 3
    if not batched:  # [L, E]: one sequence
        query, key = query.unsqueeze(1), key.unsqueeze(1)
    # [L, B, E] from here, as F.multi_head_attention_forward takes them.
    heads = named["num_heads"]
    embed = query.shape[-1]
    head_dim = embed // heads
    bias = named.get("in_proj_bias")
    b_q, b_k = (None, None) if bias is None else (bias[:embed], bias[embed:2 * embed])
    if named.get("use_separate_proj_weight", False):
        w_q, w_k = named["q_proj_weight"], named["k_proj_weight"]
    else:
        w_q, w_k = named["in_proj_weight"][:embed], named["in_proj_weight"][embed:2 * embed]
    with torch.no_grad():
        q = F.linear(query, w_q, b_q)
        k = F.linear(key, w_k, b_k)
    length, batch = q.shape[:2]
    keys = k.shape[0]
    q = q.reshape(length, batch, heads, head_dim).permute(1, 2, 0, 3)
    k = k.reshape(keys, batch, heads, head_dim).permute(1, 2, 0, 3)

    mask = None
    attn_mask = named.get("attn_mask")
    if attn_mask is not None:
        mask = _hidden_mask(attn_mask, q.dtype)
        if mask.dim() == 3:  # [B * H, L, S]
            mask = mask.reshape(batch, heads, length, keys)
    padding, padded = named.get("key_padding_mask"), None
    if padding is not None:
        if not batched:
            padding = padding.unsqueeze(0)
        padding = _hidden_mask(padding, q.dtype)
        hidden = padding == float("-inf")
        if not other_keys and length == keys and bool(hidden.any()):
            padded = hidden.detach()
        padding = padding[:, None, None, :]
        mask = padding if mask is None else mask + padding
    return q, k, 1.0 / math.sqrt(head_dim), mask, other_keys, padded


class MultiheadAttentionHooks:
    """Captures each given ``nn.MultiheadAttention`` layer's queries and keys while installed.

    Args:
        modules: the layers to record, by qualified name.
        on_qk: called with ``(name, q, k, scale, bias, other_keys=...)`` for every forward call.
        done: called with ``(name, module, completed)`` when the layer's forward has ended.
    """

    def __init__(self, modules: dict[str, nn.Module], on_qk: AttentionCallback, done: DoneCallback):
        self.modules = modules
        self.on_qk = on_qk
        self.done = done
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self.trailing: list[torch.utils.hooks.RemovableHandle] = []  # hooks the recording keeps after the user's

    def install(self) -> None:
        for name, module in self.modules.items():
            def enter(module, args, kwargs, name=name) -> None:
                q, k, scale, bias, other_keys, padded = mha_query_key(name, module, args, kwargs)
                self.on_qk(name, q, k, scale, bias, other_keys=other_keys, padded=padded)

            def leave(module, args, output, name=name) -> None:
                self.done(name, module, output is not None)

            self._handles.append(module.register_forward_pre_hook(enter, with_kwargs=True))
            self._handles.append(module.register_forward_hook(leave, always_call=True))
            self.trailing.append(self._handles[-1])

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.trailing.clear()
