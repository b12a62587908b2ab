"""The chunked MAD from queries and keys (vitmad.hooks.attention) against the float64 reference."""

from __future__ import annotations

import pytest
import torch

import vitmad
from vitmad.hooks import attention

from helpers import tolerance


def _reference(q, k, patch, *, scale=None, attn_bias=None, **options):
    """vitmad.mad_reference of softmax(q @ k^T * scale + bias), all in float64."""
    q, k = q.double(), k.double()
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = q @ k.transpose(-1, -2) * scale
    if attn_bias is not None:
        logits = logits + attention.additive_bias(attn_bias, torch.float64)
    return vitmad.mad_reference(logits.softmax(-1), patch, **options)


# (leading dims, prefix tokens, grid): odd sizes, no prefix, registers, non-square grids.
CASES = [
    ((2, 3), 1, (5, 5)),
    ((1, 2), 0, (3, 7)),
    ((3,), 5, (4, 3)),
    ((), 2, (1, 6)),
]
# CHUNK_ELEMENTS values: whole matrices per block (all, some with a remainder), query rows (several, one).
CHUNKS = [1 << 22, 4 * 26 * 26 + 7, 40, 1]


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("lead,prefix,grid", CASES)
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("renormalize", [False, True])
def test_chunked_matches_reference(monkeypatch, lead, prefix, grid, chunk, reduction, renormalize):
    monkeypatch.setattr(attention, "CHUNK_ELEMENTS", chunk)
    n = prefix + grid[0] * grid[1]
    gen = torch.Generator().manual_seed(n)
    q = torch.randn(*lead, n, 12, generator=gen, dtype=torch.float64)
    k = torch.randn(*lead, n, 12, generator=gen, dtype=torch.float64)
    options = dict(num_prefix_tokens=prefix, grid=grid, renormalize=renormalize, reduction=reduction)
    out = attention.mad_qk_chunked(q, k, 16, **options)
    expected = _reference(q, k, 16, **options)
    assert out.dtype == torch.float64 and out.shape == expected.shape
    torch.testing.assert_close(out, expected, **tolerance(torch.float64))


@pytest.mark.parametrize("chunk", [1 << 22, 50])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_bias_scale_and_broadcast(monkeypatch, chunk, dtype):
    """A [H, N, N] relative-position-style bias and a k shared across the batch broadcast like SDPA's."""
    monkeypatch.setattr(attention, "CHUNK_ELEMENTS", chunk)
    gen = torch.Generator().manual_seed(0)
    n = 1 + 3 * 4
    q = torch.randn(2, 3, n, 8, generator=gen).to(dtype)
    k = torch.randn(1, 3, n, 8, generator=gen).to(dtype)
    bias = torch.randn(3, n, n, generator=gen)
    out = attention.mad_qk_chunked(q, k, 14, grid=[3, 4], scale=0.3, attn_bias=bias)
    expected = _reference(q, k.expand(2, 3, n, 8), 14, grid=[3, 4], scale=0.3, attn_bias=bias)
    assert out.dtype == torch.float32 and out.shape == (2, 3)
    # float32 logits and softmax of the same (bfloat16-exact) q/k: float32 rounding only.
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-4)


def test_chunked_boolean_mask_drops_keys():
    gen = torch.Generator().manual_seed(1)
    n = 1 + 16
    q = torch.randn(1, 2, n, 8, generator=gen, dtype=torch.float64)
    k = torch.randn(1, 2, n, 8, generator=gen, dtype=torch.float64)
    mask = torch.rand(n, n, generator=gen) > 0.3
    mask.fill_diagonal_(True)
    out = attention.mad_qk_chunked(q, k, 8, attn_bias=mask, reduction="none")
    torch.testing.assert_close(out, _reference(q, k, 8, attn_bias=mask, reduction="none"), **tolerance(torch.float64))


def test_mad_from_qk_uses_fused_op_when_registered(monkeypatch):
    calls = []

    def fused(q, k, patch, **options):
        calls.append(options)
        return torch.zeros(q.shape[:-2])

    monkeypatch.setattr(torch.ops.vitmad, "mad_qk", fused, raising=False)
    q = torch.randn(1, 2, 5, 4)
    attention.mad_from_qk(q, q, 8, num_prefix_tokens=1, grid=[2, 2], scale=None, attn_bias=None,
                          renormalize=False, reduction="mean")
    assert calls == [dict(num_prefix_tokens=1, grid=[2, 2], scale=None, attn_bias=None, renormalize=False,
                          reduction="mean")]


@pytest.mark.parametrize(
    "q_shape,k_shape,options,message",
    [
        ((2, 5, 4), (2, 6, 4), {}, r"q and k must have the same number of tokens N and head size D"),
        ((5,), (5,), {}, r"q and k must be \[..., N, D\], got shapes \[5\] and \[5\]"),
        ((2, 5, 4), (3, 5, 4), {}, r"leading dims of q \[2, 5, 4\] and k \[3, 5, 4\] do not broadcast"),
        ((1, 6, 4), (1, 6, 4), {}, r"vitmad.mad_qk: N - num_prefix_tokens = 6 - 1 = 5 patch tokens"),
        ((1, 5, 4), (1, 5, 4), {"reduction": "sum"}, r"vitmad.mad_qk: reduction must be 'mean' or 'none'"),
    ],
)
def test_chunked_errors_name_the_argument(q_shape, k_shape, options, message):
    with pytest.raises(ValueError, match=message):
        attention.mad_qk_chunked(torch.randn(q_shape), torch.randn(k_shape), 8, **options)
