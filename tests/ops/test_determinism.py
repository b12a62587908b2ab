"""Determinism: the CPU ops (mad, mad_backward, mad_qk) are bit-identical from run to run and for any thread
count; the CUDA ops are bit-identical from run to run (tested when a GPU is present); calls from threads are safe.

Why the thread count changes nothing on the CPU: the kernels split the work into fixed tasks (a block of queries
of one matrix) whose per-query results do not depend on which thread runs them, and the mean over queries is a
sum in a fixed order per matrix (csrc/cpu/mad_cpu_common.h). Only the speed changes with the thread count.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import vitmad
from conftest import make_bias, make_qk, random_attention
from vitmad.ops.reference import mad_reference


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


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_mad_qk_bit_identical_across_runs_and_thread_counts(restore_threads, reduction, dtype):
    # Odd sizes: N = 261 leaves a partial query block and a partial key block; a per-head bias.
    q, k = make_qk(3, 4, 261, 40, dtype, "cpu", seed=11)
    bias = make_bias("heads", 3, 4, 261, dtype, "cpu", torch.Generator().manual_seed(4))
    options = dict(num_prefix_tokens=5, grid=[16, 16], attn_bias=bias, renormalize=True, reduction=reduction)
    results = {}
    for threads in (1, 2, 3, 1, 2, 3):
        torch.set_num_threads(threads)
        results.setdefault(threads, []).append(vitmad.mad_qk(q, k, 16, **options))
    first = results[1][0]
    assert all(torch.equal(out, first) for outs in results.values() for out in outs)


@pytest.mark.skipif(not (torch.cuda.is_available() and vitmad.has_compiled_kernel("mad_qk", "CUDA")),
                    reason="needs a GPU and the compiled CUDA kernel of vitmad::mad_qk")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_cuda_mad_qk_bit_identical_across_runs_and_streams(dtype):
    # (The CUDA mad and mad_backward are checked the same way in test_cuda.py.)
    q, k = make_qk(4, 6, 581, 64, dtype, "cuda", seed=5)
    bias = make_bias("key_mask", 4, 6, 581, dtype, "cuda", torch.Generator().manual_seed(6))
    options = dict(num_prefix_tokens=5, grid=[24, 24], attn_bias=bias, reduction="none")
    first = vitmad.mad_qk(q, k, 14, **options)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    for run in range(5):
        with torch.cuda.stream(side if run % 2 else torch.cuda.current_stream()):
            again = vitmad.mad_qk(q, k, 14, **options)
        torch.cuda.synchronize()
        assert torch.equal(again, first)
