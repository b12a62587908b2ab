"""Shared test utilities: random attention, devices, and the float64 tolerance rule."""

from __future__ import annotations

import torch

import vitmad

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def random_attention(
    shape, dtype=torch.float32, device="cpu", *, seed: int = 0, temperature: float = 1.0
) -> torch.Tensor:
    """Softmax of random logits: rows sum to one, like real attention. Peaky for small temperatures."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(shape, generator=gen, dtype=torch.float64) / temperature
    return logits.softmax(-1).to(device=device, dtype=dtype)


def tolerance(dtype: torch.dtype) -> dict:
    """Tolerance of a vitmad result against the float64 reference computed from the *same* input values.

    The input is not rounded again, so only accumulation error remains: float32 accumulation for 16- and
    32-bit inputs, float64 for float64.
    """
    if dtype == torch.float64:
        return {"rtol": 1e-10, "atol": 1e-10}
    return {"rtol": 2e-5, "atol": 2e-5}


def compiled_kernel_available(op: str, device: str) -> bool:
    return vitmad.has_compiled_kernel(op, device.upper())
