"""Positions whose values were checked where they were built (``trust_position_values``).

``vitmad.record`` checks the positions of its own layouts once, on the host, when it builds them, and marks them
and their device copies as trusted (python/vitmad/recording/placement.py, ``read_only``); the ops then skip their
value check of those tensors, which on a GPU copies the positions to the host and waits for the work queued
before it, once per recorded layer. These tests hold the mechanism to what it promises: the results do not
change, the check is skipped only for the very tensor that was marked (not a copy, a view or another tensor with
the same values), and an in-place change ends the trust, in the compiled kernels (C++ registry, through
``vitmad::_trust_positions``) and in the pure-PyTorch ones (an attribute of the tensor).
"""

from __future__ import annotations

import math

import pytest
import torch

import vitmad
from vitmad.ops import fallback
from vitmad.ops.arguments import is_trusted_positions, trust_position_values

ops = torch.ops.vitmad
INF_MESSAGE = "positions must not be infinite"


def _attention(n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(2, 3, n, n, generator=gen), -1)


def _positions(n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    positions = torch.rand(n, 2, generator=gen) * 100
    positions[0] = math.nan  # a token without a position
    return positions


KERNELS = [pytest.param(ops.mad_pos, id="dispatched"), pytest.param(fallback.mad_pos, id="pure-pytorch")]
needs_compiled = pytest.mark.skipif(vitmad.backend() != "compiled", reason="the compiled library is not loaded")


@pytest.mark.parametrize("kernel", KERNELS)
def test_trusted_positions_give_the_same_values(kernel):
    attn, positions = _attention(11, 0), _positions(11, 1)
    want = kernel(attn, positions, None, reduction="none")
    trusted = positions.clone()
    trust_position_values(trusted)
    assert is_trusted_positions(trusted)
    torch.testing.assert_close(kernel(attn, trusted, None, reduction="none"), want, rtol=0, atol=0,
                               equal_nan=True)


@pytest.mark.parametrize("kernel", KERNELS)
def test_the_check_is_skipped_for_the_marked_tensor_only(kernel):
    """A marked tensor is not scanned (an infinity planted before the mark passes: only vitmad's own layouts,
    checked when they were built, are ever marked); the same values in another tensor, a copy or a view are."""
    if kernel is ops.mad_pos and vitmad.backend() != "compiled":
        pytest.skip("the compiled library is not loaded")
    attn = _attention(7, 2)
    planted = _positions(7, 3)
    planted[3, 1] = math.inf
    trust_position_values(planted)
    kernel(attn, planted, None)  # not scanned
    for other in (planted.clone(), planted[:, :], planted.contiguous().view(7, 2).clone()):
        with pytest.raises(ValueError, match=INF_MESSAGE):
            kernel(attn, other, None)


@pytest.mark.parametrize("kernel", KERNELS)
def test_an_in_place_change_ends_the_trust(kernel):
    attn, positions = _attention(9, 4), _positions(9, 5)
    trust_position_values(positions)
    kernel(attn, positions, None)
    positions[2, 0] = math.inf  # a new version of the tensor
    assert not is_trusted_positions(positions)
    with pytest.raises(ValueError, match=INF_MESSAGE):
        kernel(attn, positions, None)


@needs_compiled
def test_the_registry_forgets_dead_tensors():
    """The C++ registry holds its tensors weakly: a tensor that dies is no longer trusted, and a new tensor that
    happens to reuse its memory is checked."""
    attn = _attention(5, 6)
    for seed in range(80):  # more than the registry's 64 entries: old ones drop out, nothing grows without bound
        positions = _positions(5, seed)
        trust_position_values(positions)
        ops.mad_pos(attn, positions, None)
        del positions
    bad = _positions(5, 99)
    bad[1, 0] = math.inf
    with pytest.raises(ValueError, match=INF_MESSAGE):
        ops.mad_pos(attn, bad, None)


@needs_compiled
def test_trust_op_refuses_what_cannot_be_positions():
    with pytest.raises(ValueError, match="_trust_positions: expected a dense floating-point tensor"):
        ops._trust_positions(torch.arange(4))
