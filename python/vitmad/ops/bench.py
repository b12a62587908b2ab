"""``vitmad bench``: a short timing of the fused op against the plain PyTorch formula, on typical shapes.

The full benchmarks (more shapes, memory, CUDA graphs, profiling throughput) live in ``benchmarks/``.
"""

from __future__ import annotations

import time

import torch

__all__ = ["run_op_bench", "SHAPES"]

# (label, [B, H, N, N] with one CLS token, patch size)
SHAPES = (
    ("ViT-B/16 224px, batch 32", (32, 12, 197, 197), 16),
    ("ViT-S/14 518px, batch 4", (4, 6, 1370, 1370), 14),
)


def _time(fn, repeats: int, device: torch.device) -> float:
    fn()  # warm-up: kernel selection, allocator
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / repeats


def run_op_bench(device: torch.device, repeats: int = 10) -> list[dict]:
    """Time ``vitmad.mad`` and the dense PyTorch formula (distance matrix times attention) per shape.

    Args:
        device: where to run (the CLI resolves ``--device auto`` before calling).
        repeats: timed runs per shape (after one warm-up run).

    Returns:
        One row per shape: label, shape, milliseconds of each, speed-up; also printed as a table.
    """
    from .library import has_compiled_kernel
    from .mad_op import mad
    from .reference import pixel_distances

    rows = []
    # The kernels of the device timed: a library loaded without CUDA kernels (built without nvcc) runs the
    # pure-PyTorch ones on a GPU, which the header called compiled, from the library's state alone (QA 413).
    kernels = "compiled" if has_compiled_kernel("mad", device) else "python"
    print(f"vitmad bench on {device} ({kernels} kernels), torch {torch.__version__}, mean of {repeats} runs")
    print(f"{'shape':<28} {'fused ms':>9} {'torch ms':>9} {'speed-up':>8}")
    for label, shape, patch in SHAPES:
        attn = torch.softmax(torch.randn(shape, device=device), dim=-1)
        side = int((shape[-1] - 1) ** 0.5)
        dist = pixel_distances(side, side, patch, dtype=torch.float32, device=device)
        fused = _time(lambda: mad(attn, patch), repeats, device)
        dense = _time(lambda: (attn[..., 1:, 1:] * dist).sum(-1).mean(-1), repeats, device)
        rows.append({"label": label, "shape": list(shape), "fused_ms": fused * 1e3, "torch_ms": dense * 1e3,
                     "speedup": dense / fused})
        print(f"{label:<28} {fused * 1e3:9.2f} {dense * 1e3:9.2f} {dense / fused:7.1f}x")
    return rows
