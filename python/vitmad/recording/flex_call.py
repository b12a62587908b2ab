"""Recording ``torch.nn.attention.flex_attention.flex_attention`` calls a module makes itself.

``flex_attention`` is a Python function, not a torch function: a ``TorchFunctionMode`` does not see it (only the
higher-order op inside it, while dynamo compiles it). So while a recording captures modules' own attention
(:class:`~.module_capture.ModuleAttentionHooks`), :func:`flex_attention` stands in for torch's function wherever a
loaded module holds it (``torch.nn.attention.flex_attention.flex_attention``, and every module global bound to it by
``from ... import flex_attention``: vit-pytorch's ``vit_nd_masking`` and ``levjepa``, a user's model file). It hands
the call to the active torch function modes, as torch's own functions do (``handle_torch_function``), so the capture
mode sees it like ``F.scaled_dot_product_attention``, and then calls torch's function unchanged: the outputs do not
change. Torch's function is put back when the last recording ends (also where a module imported during the recording
bound the stand-in). The stand-in reaches torch's function through a global of this module bound at the first
recording's setup (:func:`torch_flex_attention`), never through torch's module, which holds the stand-in meanwhile.

Where dynamo traces it (a compiled function or model calling it during a recording, or ``torch.compile`` of the
stand-in itself, which transformers' ``WrappedFlexAttention`` makes at its first call and keeps) it is torch's function
alone, so compiled code is the code torch's function compiles to, also after the recording. vitmad does not get such a
call, nor one made through a binding the stand-in does not replace (an object's attribute, ``functools.partial``):
the capture mode sees only the higher-order op inside it, and the module that made it is refused by name
(:func:`unread_flex_refusal`). A module is found to call ``flex_attention`` where its forward's source calls a name
ending in ``flex_attention(`` or reads a global of its module bound to it under another name; one whose forward calls
it in a helper function is recorded where ``layers=`` names it.

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

Refused with the layer's name: causal attention, as the SDPA path refuses ``is_causal`` (a causal ``mask_mod``, or a
``score_mod`` returning ``-inf`` there): in any (image, head) of the call, over ``Nq = Nk >= 2`` tokens, no query keeps
a key after itself and some query keeps a key before itself that not every query keeps (keys kept by every query, a
class token or registers, are no order: each token attending to itself and the class token is not causal; with two
tokens, causal attention is that, and recorded); a ``score_mod`` or ``mask_mod`` that cannot be evaluated outside the
kernel (it raises); logits a ``score_mod`` makes NaN or ``+inf``; a call vitmad did not get (above).
"""

from __future__ import annotations

import contextlib
import math
import sys

import torch
from torch.overrides import handle_torch_function, has_torch_function

from .interface_call import _causal_refusal, _shared_key_heads, signature_of
from .process_scope import ProcessWideScope

__all__ = ["flex_attention", "is_flex_attention", "FlexAttentionStandIn", "flex_logits", "unread_flex_refusal",
           "without_autocast", "kept_keys", "kept_by_every_query", "first_query_looks_ahead",
           "refuse_causal", "MASKED_BELOW"]


# torch's function, bound by torch_flex_attention() at the first recording's setup, before any recording puts the
# stand-in in its module: the stand-in reads this plain global (never the module's attribute, which is the stand-in
# while a recording runs), also where dynamo traces it. Not bound at `import vitmad`: torch's flex_attention module
# imports dynamo and sympy, about 0.3 s of the import (with torch.nn.attention.bias, 1 s of its 1.3 s beyond torch's
# own, on the 2-core Xeon VM), which the ops and the command's --help need not pay.
_TORCH_FLEX_ATTENTION = None


def torch_flex_attention():
    """torch's ``flex_attention``, its module imported on the first call (a recording's setup)."""
    global _TORCH_FLEX_ATTENTION
    if _TORCH_FLEX_ATTENTION is None:
        from torch.nn.attention import flex_attention as torch_flex_module

        _TORCH_FLEX_ATTENTION = torch_flex_module.flex_attention
    return _TORCH_FLEX_ATTENTION


def flex_attention(*args, **kwargs):
    """Stands in for torch's ``flex_attention`` while a recording captures modules' attention: the active torch
    function modes see the call (``func`` is this function), then torch's function computes it. Traced by dynamo
    (a compiled function or model calling it, ``torch.compile`` of the stand-in itself, as transformers'
    ``WrappedFlexAttention`` makes at its first call) it is torch's function alone: the compiled code is the one
    torch's function gives, then and after the recording."""
    torch_function = _TORCH_FLEX_ATTENTION or torch_flex_attention()
    if torch.compiler.is_compiling():
        return torch_function(*args, **kwargs)
    tensors = tuple(t for t in (*args[:3], *(kwargs.get(n) for n in ("query", "key", "value")))
                    if isinstance(t, torch.Tensor))
    if has_torch_function(tensors):
        return handle_torch_function(flex_attention, tensors, *args, **kwargs)
    return torch_function(*args, **kwargs)


def is_flex_attention(value) -> bool:
    """Whether ``value`` is torch's ``flex_attention`` or the stand-in."""
    return value is flex_attention or value is torch_flex_attention()


class FlexAttentionStandIn(ProcessWideScope):
    """Puts :func:`flex_attention` where loaded modules hold torch's, from the first active recording to the last
    (thread-safe); every binding of the stand-in goes back to torch's function at the last exit.

    The bindings are found by scanning module namespaces, which is dear over thousands of modules (28 ms for the 3,500
    of a process with timm and transformers loaded, on a 2-core Xeon VM), and a recording's setup is paid per batch: a
    namespace is scanned again only where the module is new or its namespace's size changed since it was last
    scanned (a module imported since, or one that has imported more names, including one imported during a
    recording, which holds the stand-in), and the names found stay known, each checked at every enter and exit
    (about 1.2 ms each for those 3,500 modules). A name of an already scanned module rebound to torch's function
    without adding a name (an assignment over another value) is not found.
    """

    _scanned: dict[str, tuple[int, int]] = {}  # module name -> (id of the module, size of its namespace) then
    _bindings: dict[int, tuple[dict, set[str]]] = {}  # id of a namespace -> it, and its names found holding either

    @classmethod
    def _scan(cls) -> None:
        """Finds the bindings of torch's function or the stand-in in the namespaces new or resized since the last
        scan. vitmad's own modules are left alone: they name the stand-in as such (module_capture compares with it)
        and torch's function as this module's ``_TORCH_FLEX_ATTENTION``."""
        package, scanned = __name__.partition(".")[0], cls._scanned
        torch_function = torch_flex_attention()  # once: the loop below tests every value of every namespace
        # Copies, each made in one step under the GIL: another thread may import meanwhile (a profile's image
        # decoder loading PIL's plugins), and iterating the live dicts then fails with "dictionary changed size".
        for name, module in sys.modules.copy().items():
            try:
                state = (id(module), len(module.__dict__))
            except (AttributeError, TypeError):  # not a module, or one without a namespace
                continue
            if scanned.get(name) == state:
                continue
            scanned[name] = state
            namespace = module.__dict__
            if name.partition(".")[0] == package or not isinstance(namespace, dict):
                continue
            found = {key for key, value in namespace.copy().items()
                     if value is torch_function or value is flex_attention}
            if found:
                cls._bindings.setdefault(id(namespace), (namespace, set()))[1].update(found)

    @classmethod
    def _rebind(cls, old, new) -> None:
        cls._scan()
        for namespace, names in cls._bindings.values():
            for name in names:
                if namespace.get(name) is old:
                    namespace[name] = new

    @classmethod
    def _first(cls) -> None:
        cls._rebind(torch_flex_attention(), flex_attention)

    @classmethod
    def _last(cls) -> None:
        cls._rebind(flex_attention, _TORCH_FLEX_ATTENTION)


def unread_flex_refusal(name: str, module: torch.nn.Module) -> str:
    """Why a recorded module is refused whose forward ran a ``flex_attention`` call vitmad saw only as the higher-order
    op inside it (which a mode sees where dynamo traces the call: compiled code, and torch's function called eagerly,
    which compiles that op with dynamo's eager backend), not as a call of the stand-in."""
    return (f"vitmad.record: {name} ({type(module).__name__}) called torch's flex_attention where vitmad cannot "
            "read it: compiled (torch.compile of flex_attention, or of a function or model that calls it) or through "
            "a binding the recording does not replace (an attribute of an object, functools.partial), so its "
            "attention is unknown; "
            "while recording, have it call torch's flex_attention uncompiled, through a module global (`from "
            "torch.nn.attention.flex_attention import flex_attention as <any name>`, or that module's attribute): "
            "compile after the recording, or wrap the function that calls it in torch.compiler.disable; or compute "
            "its attention with F.scaled_dot_product_attention")


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


# An additive mask or modified logit at or below this masks its key as -inf does: transformers fills masks with the
# dtype's lowest value, others with -1e4 or -1e9, where exp gives 0 (QA 300: a causal mask so filled was recorded).
# (Swin's -100 between windows' regions is far above: those keys are kept, as they are for MAD.)
MASKED_BELOW = -1e4


def kept_keys(bias: torch.Tensor) -> torch.Tensor:
    """The keys a boolean mask keeps, or an additive mask or modified logits leave above :data:`MASKED_BELOW`."""
    return bias if bias.dtype == torch.bool else bias > MASKED_BELOW


def kept_by_every_query(kept: torch.Tensor) -> torch.Tensor:
    """``[..., 1, Nk]``: the keys every query of each matrix of ``kept`` (``[..., Nq, Nk]`` bool) keeps, over the
    queries that keep any (a padding query that keeps none took every key out of it: QA 300). A class token or
    registers kept by all are no order to the causal rules."""
    return (kept | ~kept.any(dim=-1, keepdim=True)).all(dim=-2, keepdim=True)


def first_query_looks_ahead(kept: torch.Tensor) -> bool:
    """Whether the first query of every matrix of ``kept`` (``[..., Nq, Nk]`` keys kept, or just its first row
    ``[..., 1, Nk]``) keeps a key after itself. Then no matrix is causal: :func:`refuse_causal`'s O(N^2) passes
    are not needed (a padding mask's check took a quarter of the SDPA call's time: 1024 tokens, CPU)."""
    return bool(kept[..., 0, 1:].any(-1).all())


def refuse_causal(who: str, kept: torch.Tensor, source: str = "its flex_attention mask") -> None:
    """Refuses a mask ``[B, H, Nq, Nk]`` (keys kept) that is causal in any of its (batch, head) slices: one of
    ``Nq = Nk >= 2`` tokens in which no query keeps a key after itself, and some query keeps a key before itself
    that not every query keeps (keys every query keeps, a class token or registers, are no order: each token attending
    to itself and the class token is not causal, nor is every token attending to itself alone)."""
    num_queries, num_keys = kept.shape[-2:]
    if num_queries != num_keys or num_queries < 2 or first_query_looks_ahead(kept):
        return
    index = torch.arange(num_queries, device=kept.device)
    after = index[None, :] > index[:, None]
    before = index[None, :] < index[:, None]
    shared = kept_by_every_query(kept)
    forward = (kept & after).flatten(-2).any(-1)
    backward = (kept & before & ~shared).flatten(-2).any(-1)
    causal = (~forward & backward).nonzero()
    if len(causal):
        image, head = causal[0].tolist()
        raise _causal_refusal(who, f"{source} keeps no key after its query, in image {image}, head {head}")


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
    named = signature_of(torch_flex_attention()).bind(*args, **kwargs).arguments
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
            refuse_causal(who, kept)
        return query, key, scale, kept
    scores = (query @ key.transpose(-2, -1)) * scale
    modified = _modified_logits(who, score_mod, scores).to(working)
    if kept is not None:
        modified = modified.masked_fill(~kept, float("-inf"))
    if bool((modified.isnan() | modified.isposinf()).any()):
        raise ValueError(f"vitmad.record: {who}: the score_mod of its flex_attention call makes NaN or +inf logits, "
                         "whose softmax is not a distribution over its keys")
    refuse_causal(who, kept_keys(modified))
    return query, key, scale, modified - scores
