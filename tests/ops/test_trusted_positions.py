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


# Frames and positions of a video marked as NaN at the same tokens (trust_same_tokens) -------------------------------

SAME_TOKENS_MESSAGE = "times must be NaN exactly at the tokens without a position"
QK_KERNELS = [pytest.param(ops.stats_qk_pos, id="dispatched"), pytest.param(fallback.stats_qk_pos, id="pure-pytorch")]


def _video(n: int, seed: int):
    """q, k [2, 3, n, 8], positions [n, 2] and their frames [n, 1], token 0 without either."""
    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(2, 3, n, 8, generator=gen) for _ in range(2))
    positions = _positions(n, seed)
    times = torch.floor(torch.rand(n, 1, generator=gen) * 4)
    times[0] = math.nan
    return q, k, positions, times


def _temporal(kernel, q, k, positions, times):
    return kernel(q, k, positions, None, ["mad", "temporal_mad"], reduction="none", times=times)


def test_same_tokens_compares_the_nan_rows_under_broadcasting():
    from vitmad.ops.arguments import same_tokens

    positions = _positions(6, 0)
    times = torch.ones(6, 1)
    times[0] = math.nan
    assert same_tokens(times, positions)
    assert same_tokens(times.expand(4, 6, 1), positions.expand(2, 1, 6, 2))
    per_image = positions.repeat(2, 1, 1)
    per_image[1, 3] = math.nan
    assert not same_tokens(times, per_image)  # the second image has a token without a position but with a time
    assert not same_tokens(times[:5], positions)  # token counts that do not broadcast


@pytest.mark.parametrize("kernel", QK_KERNELS)
def test_a_trusted_pair_gives_the_same_values(kernel):
    from vitmad.ops.arguments import is_trusted_same_tokens, trust_same_tokens

    q, k, positions, times = _video(13, 7)
    want = _temporal(kernel, q, k, positions, times)
    trust_same_tokens(times, positions)
    assert is_trusted_same_tokens(times, positions)
    torch.testing.assert_close(_temporal(kernel, q, k, positions, times), want, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("kernel", QK_KERNELS)
def test_the_same_tokens_check_is_skipped_for_the_marked_pair_only(kernel):
    """A marked pair is not compared (a mismatch planted before the mark passes: only vitmad's own video layouts,
    compared on the host when their device copies were made, are ever marked); a copy of either side, or either
    side with another partner, is compared."""
    from vitmad.ops.arguments import trust_same_tokens

    if kernel is ops.stats_qk_pos and vitmad.backend() != "compiled":
        pytest.skip("the compiled library is not loaded")
    q, k, positions, times = _video(9, 8)
    times[4] = math.nan  # token 4 has a position and no time
    trust_same_tokens(times, positions)
    _temporal(kernel, q, k, positions, times)  # not compared
    for other_times, other_positions in ((times.clone(), positions), (times, positions.clone()),
                                         (times[:, :], positions)):
        with pytest.raises(ValueError, match=SAME_TOKENS_MESSAGE):
            _temporal(kernel, q, k, other_positions, other_times)


@pytest.mark.parametrize("kernel", QK_KERNELS)
def test_an_in_place_change_of_either_side_ends_the_pair_trust(kernel):
    from vitmad.ops.arguments import is_trusted_same_tokens, trust_same_tokens

    for side in ("times", "positions"):
        q, k, positions, times = _video(9, 9)
        trust_same_tokens(times, positions)
        _temporal(kernel, q, k, positions, times)
        if side == "times":
            times[5] = math.nan  # token 5 keeps its position and loses its time
        else:
            positions[5] = math.nan  # token 5 loses its position and keeps its time
        assert not is_trusted_same_tokens(times, positions)
        with pytest.raises(ValueError, match=SAME_TOKENS_MESSAGE):
            _temporal(kernel, q, k, positions, times)


@needs_compiled
def test_pair_trust_op_refuses_what_cannot_be_frames_or_positions():
    with pytest.raises(ValueError, match="_trust_same_tokens: expected dense floating-point tensors"):
        ops._trust_same_tokens(torch.arange(4), torch.rand(4, 2))
