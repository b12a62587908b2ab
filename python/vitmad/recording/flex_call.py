"""Recording ``torch.nn.attention.flex_attention.flex_attention`` calls a module makes itself.

``flex_attention`` is a Python function, not a torch function: a ``TorchFunctionMode`` does not see it (only the
higher-order op inside it, while dynamo compiles it). So while a recording captures modules' own attention
(:class:`~.module_capture.ModuleAttentionHooks`), :func:`flex_attention` stands in for torch's function wherever a
loaded module holds it (``torch.nn.attention.flex_attention.flex_attention``, and every module global bound to it by
``from ... import flex_attention``: vit-pytorch's ``vit_nd_masking`` and ``levjepa``, a user's model file). It hands
the call to the active torch function modes, as torch's own functions do (``handle_torch_function``), so the capture
mode sees it like ``F.scaled_dot_product_attention``, and then calls torch's function unchanged: the outputs do not
change. Inside code dynamo compiles it is torch's function itself. Torch's function is put back when the last
recording ends (also where a module imported during the recording bound the stand-in).

What the call attends to (:func:`flex_logits`), as torch's flex attention computes it on the path it runs when called
from Python (``math_attention``, the higher-order op's dense path: ``flex_attention`` not wrapped in ``torch.compile``,
or a compiled model run eagerly inside the recording): the logits ``q k^T * scale`` in float32 (float64 for float64
inputs; q and k first cast to the autocast dtype under autocast), ``score_mod(logit, b, h, q_idx, kv_idx)`` applied to
every one, ``-inf`` where the block mask's ``mask_mod`` is False. That path evaluates ``mask_mod`` on every element and
ignores which blocks the ``BlockMask`` lists (a compiled kernel would skip the blocks it does not list: the two agree
for a ``BlockMask`` built by ``create_block_mask`` from its ``mask_mod``); ``kernel_options``, ``return_lse`` and
``return_aux`` change no probability. Grouped-query attention (``enable_gqa``): query head ``h`` reads key head
``h // (H / Hk)``. The result goes to ``vitmad::mad_qk`` as the SDPA path's would: q, k, and the additive bias
``score_mod(logits) - logits`` (``-inf`` at the masked keys), or the boolean mask alone without a ``score_mod``.

Refused with the layer's name: causal attention (no key after its query is kept, some before it are: a causal
``mask_mod``, or a ``score_mod`` returning ``-inf`` there), as the SDPA path refuses ``is_causal``; a ``score_mod`` or
``mask_mod`` that cannot be evaluated outside the kernel (it raises); logits a ``score_mod`` makes NaN or ``+inf``.
"""

from __future__ import annotations

import contextlib
import functools
import math
import sys
import threading

import torch
from torch.overrides import handle_torch_function, has_torch_function

from .interface_call import _causal_refusal, _shared_key_heads, signature_of

__all__ = ["flex_attention", "FlexAttentionStandIn", "flex_logits", "without_autocast"]


@functools.cache
def _torch_flex_attention():
    """torch's ``flex_attention`` (imported on first use: the module pulls in dynamo)."""
    from torch.nn.attention import flex_attention as module

    return module.flex_attention


def flex_attention(*args, **kwargs):
    """Stands in for torch's ``flex_attention`` while a recording captures modules' attention: the active torch
    function modes see the call (``func`` is this function), then torch's function computes it."""
    if not torch.compiler.is_compiling():
        tensors = tuple(t for t in (*args[:3], *(kwargs.get(n) for n in ("query", "key", "value")))
                        if isinstance(t, torch.Tensor))
        if has_torch_function(tensors):
            return handle_torch_function(flex_attention, tensors, *args, **kwargs)
    return _torch_flex_attention()(*args, **kwargs)


class FlexAttentionStandIn:
    """Puts :func:`flex_attention` where loaded modules hold torch's, from the first active recording to the last
    (thread-safe); every binding of the stand-in goes back to torch's function at the last exit."""

    _lock = threading.Lock()
    _depth = 0

    @staticmethod
    def _rebind(old, new) -> None:
        package = __name__.partition(".")[0]
        for name, module in list(sys.modules.items()):
            namespace = getattr(module, "__dict__", None)
            if not isinstance(namespace, dict) or name.partition(".")[0] == package:
                continue  # vitmad's own modules name the stand-in as such (module_capture compares with it)
            for key, value in list(namespace.items()):
                if value is old:
                    namespace[key] = new

    @classmethod
    def enter(cls) -> None:
        with cls._lock:
            if cls._depth == 0:
                cls._rebind(_torch_flex_attention(), flex_attention)
            cls._depth += 1

    @classmethod
    def leave(cls) -> None:
        with cls._lock:
            if cls._depth == 0:
                return
            cls._depth -= 1
            if cls._depth == 0:
                cls._rebind(flex_attention, _torch_flex_attention())


def without_autocast(device: torch.device):
    """A context in which autocast is off on ``device``: the logits :func:`flex_logits` returns are the kernel's
    already (its q and k cast as autocast casts them), and the recorder's autocast casts must not round them again."""
    if device.type in ("cpu", "cuda") and torch.is_autocast_enabled(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def _over_scores(score_mod):
    """``score_mod`` of scalars applied to ``[B, H, Nq, Nk]`` logits with index vectors ``b, h, q_idx, kv_idx``:
    vmapped over each index in turn, as flex attention's dense path evaluates it (so a ``score_mod`` that indexes a
    table with the index tensors reads it as in the kernel)."""
    mapped = score_mod
    for axis in (3, 2, 1, 0):  # the innermost vmap maps the key index
        mapped = torch.vmap(mapped, in_dims=(0, *(0 if i == axis else None for i in range(4))))
    return mapped


def _modified_logits(who: str, score_mod, scores: torch.Tensor) -> torch.Tensor:
    from torch._dynamo._trace_wrapped_higher_order_op import TransformGetItemToIndex

    b, h, q, k = (torch.arange(n, device=scores.device) for n in scores.shape)
    try:
        with TransformGetItemToIndex():
            return _over_scores(score_mod)(scores, b, h, q, k)
    except Exception as error:  # what torch's vmap and the user's function raise varies
        raise ValueError(
            f"vitmad.record: {who}: the score_mod of its flex_attention call could not be evaluated outside the "
            f"kernel on the [B, H, Nq, Nk] = {list(scores.shape)} logits, so its attention is unknown "
            f"({type(error).__name__}: {error}); give it a score_mod that torch.vmap can evaluate, or leave this "
            "module out with layers=[the other attention modules]"
        ) from None


def _kept(who: str, mask_mod, shape: torch.Size, device: torch.device) -> torch.Tensor:
    from torch.nn.attention.flex_attention import create_mask

    try:
        return create_mask(mask_mod, *shape, device=device)
    except Exception as error:
        raise ValueError(
            f"vitmad.record: {who}: the mask_mod of its flex_attention block mask could not be evaluated outside the "
            f"kernel ({type(error).__name__}: {error}), so which keys it attends to is unknown; leave this module out "
            "with layers=[the other attention modules]"
        ) from None


def _refuse_causal(who: str, kept: torch.Tensor) -> None:
    """A mask under which no query attends to a key after it, and some to one before it: causal attention."""
    num_queries, num_keys = kept.shape[-2:]
    if num_queries != num_keys or num_queries < 2:
        return
    index = torch.arange(num_queries, device=kept.device)
    after = index[None, :] > index[:, None]
    before = index[None, :] < index[:, None]
    if not bool((kept & after).any()) and bool((kept & before).any()):
        raise _causal_refusal(who, "its flex_attention mask keeps no key after its query")


def flex_logits(who: str, args: tuple, kwargs: dict) -> tuple:
    """``(query, key, scale, mask)`` for ``vitmad::mad_qk`` of one ``flex_attention`` call: q and k as the kernel's
    dense path multiplies them (``[B, H, N, D]``, one key head per query head, in its working precision), and None,
    a boolean mask (keys kept) or an additive bias (``score_mod(logits) - logits``, ``-inf`` at masked keys).

    Args:
        who: the layer, as refusals name it.
        args, kwargs: the call's arguments.

    Raises:
        ValueError: the attention is causal, or its ``score_mod`` / ``mask_mod`` cannot be evaluated.
    """
    named = signature_of(_torch_flex_attention()).bind(*args, **kwargs).arguments
    query, key = named["query"], named["key"]
    score_mod, block_mask, scale = named.get("score_mod"), named.get("block_mask"), named.get("scale")
    device = query.device
    if device.type in ("cpu", "cuda") and torch.is_autocast_enabled(device.type):
        # The op's autocast rule casts q and k to the autocast dtype before its dense path upcasts them.
        dtype = torch.get_autocast_dtype(device.type)
        query, key = (t.to(dtype) if t.is_floating_point() and t.dtype != torch.float64 else t for t in (query, key))
    working = torch.float64 if query.dtype == torch.float64 else torch.float32
    query = query.detach().to(working)
    key = _shared_key_heads(who, query, key.detach().to(working))
    key = key.expand(query.shape[0], *key.shape[1:])  # a key batch of 1 serves every query batch
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale)
    shape = torch.Size((*query.shape[:2], query.shape[-2], key.shape[-2]))
    kept = None if block_mask is None else _kept(who, block_mask.mask_mod, shape, device)
    if score_mod is None:
        if kept is not None:
            _refuse_causal(who, kept)
        return query, key, scale, kept
    scores = (query @ key.transpose(-2, -1)) * scale
    modified = _modified_logits(who, score_mod, scores).to(working)
    if kept is not None:
        modified = modified.masked_fill(~kept, float("-inf"))
    if bool((modified.isnan() | modified.isposinf()).any()):
        raise ValueError(f"vitmad.record: {who}: the score_mod of its flex_attention call makes NaN or +inf logits, "
                         "whose softmax is not a distribution over its keys")
    _refuse_causal(who, modified > float("-inf"))
    return query, key, scale, modified - scores
