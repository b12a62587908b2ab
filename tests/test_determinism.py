"""The CPU op is bit-identical from run to run and for any thread count; it is safe to call from threads."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from helpers import random_attention

import vitmad
from vitmad.reference import mad_reference


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_bit_identical_across_runs_and_thread_counts(restore_threads, layout, reduction):
    attn = random_attention((4, 6, 197, 197), seed=3)
    if layout == "transposed":
        attn = attn.transpose(-1, -2).contiguous().transpose(-1, -2)
    results = []
    for threads in (1, 2, 3, 1, 2):
        torch.set_num_threads(threads)
        results.append(vitmad.mad(attn, 16, reduction=reduction, renormalize=True))
        results.append(torch.ops.vitmad.mad_backward(torch.ones_like(results[-1]), attn, 16, reduction=reduction))
    for a, b in zip(results[::2], results[2::2]):
        assert torch.equal(a, b)
    for a, b in zip(results[1::2], results[3::2]):
        assert torch.equal(a, b)


def test_concurrent_calls_from_python_threads():
    inputs = [random_attention((2, 4, 1 + (4 + i) ** 2, 1 + (4 + i) ** 2), seed=i) for i in range(8)]
    expected = [mad_reference(a, 16) for a in inputs]

    def run(i):
        return [vitmad.mad(inputs[i], 16) for _ in range(20)]

    with ThreadPoolExecutor(8) as pool:
        outputs = list(pool.map(run, range(8)))
    for outs, ref in zip(outputs, expected):
        for out in outs:
            torch.testing.assert_close(out.double(), ref, rtol=2e-5, atol=2e-5)
