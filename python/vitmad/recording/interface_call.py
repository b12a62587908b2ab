"""What one transformers ``AttentionInterface`` call attends to, in the terms of ``vitmad::mad_qk``: the keys and
one mask or additive bias.

Each attention implementation reads its arguments its own way, and a recorder that passed ``attention_mask`` on
as it came would measure another attention than the model's wherever they differ:

- ``sdpa``: a 4-D boolean or additive mask; with no mask, ``is_causal`` (the argument, else the module's
  attribute, True when it has none) makes the attention causal; ``position_bias`` is added to the logits.
- ``eager``: the 4-D mask as is (each modeling file's ``eager_attention_forward``).
- ``flex_attention``: a ``BlockMask`` (its ``mask_mod`` on the blocks it computes; blocks it skips are masked)
  or a 4-D additive mask of which only head 0 is read; ``position_bias`` is added.
- ``flash_attention_*``: a 2-D ``[B, Nk]`` padding mask (non-zero: keep), or sequences packed through
  ``cu_seq_lens_q`` / ``cu_seq_lens_k`` (block-diagonal attention); ``is_causal`` (the argument, else the
  module's attribute); ``sliding_window``.
- every one: grouped-query attention (fewer key heads than query heads, each serving consecutive query heads).

Refused with the layer's name, never ignored: causal attention (MAD is defined for a vision transformer's
bidirectional attention, as for modules that call ``F.scaled_dot_product_attention`` themselves; a module that
lacks ``is_causal`` is causal under ``sdpa``), and logit changes ``mad_qk`` cannot make: ``softcap`` (tanh
capping), ``s_aux`` (learned attention sinks), a ``sliding_window`` that ``flash_attention_*`` would apply with no
mask, sequences packed through ``position_ids``. An implementation whose arguments vitmad does not know is refused
when the recording begins.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable

import torch

from .placement import CAUSAL_ADVICE

__all__ = ["attention_semantics", "bound_arguments", "call_bias"]

# The implementations whose arguments are read here, by the family of their semantics.
_KNOWN = {"eager": "eager", "sdpa": "sdpa", "flex_attention": "flex"}


def attention_semantics(implementation: str, model_name: str) -> str:
    """``"eager"``, ``"sdpa"``, ``"flex"`` or ``"flash"`` for an ``attn_implementation`` name; a clear error for
    one whose masks and flags vitmad does not know."""
    if implementation in _KNOWN:
        return _KNOWN[implementation]
    if implementation.startswith("flash_attention_"):
        return "flash"
    raise ValueError(
        f"vitmad.record: {model_name} uses the attention implementation '{implementation}', whose masks and flags "
        "vitmad does not know, so it could measure another attention than the model's; load the model with "
        "attn_implementation='sdpa' (or 'eager', 'flex_attention', 'flash_attention_2')"
    )


@functools.cache
def signature_of(function: Callable) -> inspect.Signature | None:
    try:
        return inspect.signature(function)
    except (TypeError, ValueError):
        return None


def bound_arguments(function: Callable, module, query, key, value, mask, args: tuple, kwargs: dict) -> dict:
    """The call's arguments by parameter name, as ``function`` reads them (a positional ``scaling`` of an eager
    function and a keyword one of ``sdpa`` alike), defaults left out; ``module`` under its own name."""
    signature = signature_of(function)
    named = None
    if signature is not None:
        try:
            bound = signature.bind_partial(module, query, key, value, mask, *args, **kwargs)
        except TypeError:
            pass
        else:
            named = dict(bound.arguments)
            extra = next((p.name for p in signature.parameters.values() if p.kind is p.VAR_KEYWORD), None)
            if extra is not None:
                named.update(named.pop(extra, {}))
    if named is None:  # no signature to bind by: the keywords, and eager_attention_forward's sixth parameter
        named = dict(kwargs)
        if args and "scaling" not in named:
            named["scaling"] = args[0]
    named["module"] = module
    return named


def _causal_refusal(layer: str, why: str) -> ValueError:
    return ValueError(f"vitmad.record: {layer} runs causal attention ({why}); MAD is defined for a vision "
                      f"transformer's bidirectional attention{CAUSAL_ADVICE}")


def _refuse(layer: str, what: str) -> ValueError:
    return ValueError(f"vitmad.record: {layer}: {what}; flash-MAD cannot apply it, and a MAD without it would not "
                      "be the model's attention")


def _add_bias(bias: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """An additive position bias combined with a boolean or additive mask, as ``sdpa`` combines them."""
    if mask is None:
        return bias
    if mask.dtype == torch.bool:
        return bias.masked_fill(~mask, float("-inf"))
    return bias + mask


def _block_diagonal(starts_q: torch.Tensor, starts_k: torch.Tensor, num_queries: int, num_keys: int,
                    device) -> torch.Tensor:
    """Query i attends to key j when both lie in the same packed sequence (``cu_seq_lens``)."""
    def sequence_of(starts: torch.Tensor, n: int) -> torch.Tensor:
        starts = starts.to(device=device, dtype=torch.long)
        return torch.bucketize(torch.arange(n, device=device), starts[1:], right=True)

    return sequence_of(starts_q, num_queries)[:, None] == sequence_of(starts_k, num_keys)[None, :]


def _dense_block_mask(block_mask, num_queries: int, num_keys: int, device) -> torch.Tensor | None:
    """The element mask flex attention applies for a ``BlockMask``: on the blocks it computes partially its
    ``mask_mod``, on its full blocks every key, elsewhere none. None when every key of every query is kept."""
    from torch.nn.attention.flex_attention import BlockMask, create_mask

    q_block, k_block = block_mask.BLOCK_SIZE

    def spread(blocks: torch.Tensor) -> torch.Tensor:
        return (blocks.bool().repeat_interleave(q_block, -2)[..., :num_queries, :]
                .repeat_interleave(k_block, -1)[..., :num_keys])

    def blocks_of(num_blocks, indices) -> torch.Tensor:
        return spread(BlockMask.from_kv_blocks(num_blocks, indices, BLOCK_SIZE=block_mask.BLOCK_SIZE,
                                               seq_lengths=(num_queries, num_keys)).to_dense())

    batch, heads = block_mask.kv_num_blocks.shape[:2]
    partial = blocks_of(block_mask.kv_num_blocks, block_mask.kv_indices)
    keep = create_mask(block_mask.mask_mod, batch, heads, num_queries, num_keys, device=device) & partial.to(device)
    if block_mask.full_kv_num_blocks is not None:
        keep |= blocks_of(block_mask.full_kv_num_blocks, block_mask.full_kv_indices).to(device)
    return None if bool(keep.all()) else keep


def _flash_mask(layer: str, named: dict, query: torch.Tensor, key: torch.Tensor, mask) -> torch.Tensor | None:
    num_queries, num_keys, device = query.shape[-2], key.shape[-2], query.device
    keep = None
    if mask is not None:
        if mask.dim() != 2:
            raise _refuse(layer, f"flash attention received a {mask.dim()}-D mask {list(mask.shape)}, not the 2-D "
                                 "[batch, keys] padding mask it takes")
        keep = (mask != 0)[:, None, None, :]  # [B, 1, 1, Nk]
    starts_q, starts_k = named.get("cu_seq_lens_q"), named.get("cu_seq_lens_k")
    if starts_q is not None or starts_k is not None:
        if starts_q is None or starts_k is None:
            raise _refuse(layer, "flash attention received only one of cu_seq_lens_q and cu_seq_lens_k")
        packed = _block_diagonal(starts_q, starts_k, num_queries, num_keys, device)
        keep = packed if keep is None else keep & packed
    elif mask is None and named.get("position_ids") is not None:
        positions = named["position_ids"]
        steps = positions.diff(dim=-1)
        if bool((steps != 1).any()):
            raise _refuse(layer, "flash attention packs several sequences through position_ids (they restart), "
                                 "which vitmad does not read")
    causal = named.get("is_causal")
    if causal is None:
        causal = getattr(named.get("module"), "is_causal", False)
    if causal and num_queries > 1:
        raise _causal_refusal(layer, "flash attention runs it causal (is_causal)")
    window = named.get("sliding_window")
    if window is not None and window < num_keys:
        raise _refuse(layer, f"flash attention applies a sliding window of {window} keys")
    return keep


def _shared_key_heads(layer: str, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """Grouped-query attention: each of the ``Hk`` key heads serves ``H / Hk`` consecutive query heads (as
    transformers' ``repeat_kv`` and SDPA's ``enable_gqa`` pair them); the keys per query head, as a view where
    they can be one."""
    heads, key_heads = query.shape[-3], key.shape[-3]
    if key_heads in (heads, 1):
        return key
    if key.dim() != 4 or heads % key_heads:
        raise ValueError(f"vitmad.record: {layer}: {heads} query heads cannot share {key_heads} key heads")
    batch, _, num_keys, dim = key.shape
    return key[:, :, None].expand(batch, key_heads, heads // key_heads, num_keys, dim).reshape(
        batch, heads, num_keys, dim)


def call_bias(semantics: str, layer: str, named: dict, query: torch.Tensor, key: torch.Tensor,
              mask) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(key, mask or bias)`` that ``mad_qk`` takes for the attention this call computes; ``named`` holds the
    call's arguments by name (:func:`bound_arguments`). Grouped key heads come back one per
    query head."""
    key = _shared_key_heads(layer, query, key)
    if named.get("softcap") is not None:
        raise _refuse(layer, f"the logits are capped (softcap={named['softcap']})")
    if named.get("s_aux") is not None:
        raise _refuse(layer, "learned attention sinks (s_aux) join the softmax")
    position_bias = named.get("position_bias")
    if semantics == "flash":
        if position_bias is not None:
            raise _refuse(layer, "flash attention received a position_bias")
        return key, _flash_mask(layer, named, query, key, mask)
    if semantics == "flex":
        from torch.nn.attention.flex_attention import BlockMask

        if isinstance(mask, BlockMask):
            mask = _dense_block_mask(mask, query.shape[-2], key.shape[-2], query.device)
        elif mask is not None:
            mask = mask[:, :1, :, : key.shape[-2]]  # flex's score_mod reads head 0 of a 4-D mask
    elif semantics == "sdpa":
        given = named.get("is_causal")
        module = named.get("module")
        causal = given if given is not None else getattr(module, "is_causal", True)
        if causal and mask is None and query.shape[-2] > 1:
            if given is not None:
                raise _causal_refusal(layer, "is_causal=True")
            why = ("its is_causal attribute is True" if hasattr(module, "is_causal")
                   else "sdpa runs a module without an is_causal attribute causal")
            # The eager implementation has no causal flag: there the same module attends both ways (transformers'
            # Phi-4-multimodal vision tower is one where the two disagree).
            raise _causal_refusal(layer, f"{why}, so sdpa hides the keys after each query; under "
                                         "attn_implementation='eager' the same module attends to every key")
    if position_bias is not None:
        mask = _add_bias(position_bias.to(query.dtype), mask)
    return key, mask
