"""A 16-bit model whose own SDPA call is given a float32 additive bias: torch accepts a float32 mask beside
bfloat16 or float16 q and k and adds it to the float32 logits as it is. vitmad rounded the bias to q's dtype
first (96.3 is 96.5 in bfloat16), so a user's distance bias moved a layer's entropy by 2e-3 with no warning (QA 398).
``nn.MultiheadAttention`` called with ``need_weights=False`` (as ``nn.TransformerEncoderLayer`` calls it) hands its
float32 ``attn_mask`` to SDPA the same way, and was rounded the same way.

The reference is the float64 softmax of the q and k the SDPA kernel received (read by a dispatch mode) with the
float32 bias, placed by geometry written here: a 5 x 7 grid of 8 px patches, no extra tokens.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vitmad
from conftest import FLOAT32_STAT_ATOL, KernelInputs, grid_centres, statistics_reference

_PATCH, _ROWS, _COLS, _HEADS, _HEAD_DIM = 8, 5, 7, 4, 8


class _KeepsFloat32Bias(nn.Module):
    """``.to(bfloat16)`` leaves the ``bias`` buffer float32, as a user's float32 table."""

    def _apply(self, fn, recurse=True):
        bias = self.bias
        out = super()._apply(fn, recurse)
        self.bias = bias
        return out


class _BiasedAttention(_KeepsFloat32Bias):
    """Self-attention over the grid with a float32 bias per head made in the forward (a random relative bias
    scaled large, so that rounding it to 16 bits moves the probabilities well past float32's noise)."""

    def __init__(self, bias: torch.Tensor):
        super().__init__()
        self.qkv = nn.Linear(_HEADS * _HEAD_DIM, 3 * _HEADS * _HEAD_DIM)
        self.register_buffer("bias", bias, persistent=False)  # float32 whatever the module's dtype

    def forward(self, x):
        batch, tokens, width = x.shape
        q, k, v = self.qkv(x).view(batch, tokens, 3, _HEADS, _HEAD_DIM).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=self.bias)
        return out.transpose(1, 2).reshape(batch, tokens, width)


class _MultiheadAttention(_KeepsFloat32Bias, nn.MultiheadAttention):
    """nn.MultiheadAttention given the same float32 bias, repeated per head ([B * H, N, N])."""

    def __init__(self, bias: torch.Tensor):
        super().__init__(_HEADS * _HEAD_DIM, _HEADS, batch_first=True)
        self.register_buffer("bias", bias, persistent=False)

    def forward(self, x):
        mask = self.bias.expand(x.shape[0], -1, -1, -1).reshape(-1, *self.bias.shape[-2:])
        return super().forward(x, x, x, attn_mask=mask, need_weights=False)[0]


class _ViT(nn.Module):
    def __init__(self, bias, attention):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, _HEADS * _HEAD_DIM, _PATCH, _PATCH)
        self.attn = attention(bias)

    def forward(self, images):
        return self.attn(self.patch_embed(images).flatten(2).transpose(1, 2))


def _reference(q, k, bias):
    """MAD, entropy and self mass per image and head (float64) of softmax(q k^T / sqrt(D) + bias)."""
    attn = (q.double() @ k.double().transpose(-1, -2) * _HEAD_DIM ** -0.5 + bias.double()).softmax(-1)
    stats = statistics_reference(attn, grid_centres((_ROWS, _COLS), _PATCH))
    return stats["mad"].mean(-1), stats["entropy"].mean(-1), attn.diagonal(dim1=-2, dim2=-1).mean(-1)


@pytest.mark.parametrize("attention", [_BiasedAttention, _MultiheadAttention])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_float32_bias_of_a_16bit_sdpa_call_is_added_unrounded(dtype, attention):
    torch.manual_seed(0)
    tokens = _ROWS * _COLS
    bias = (torch.randn(1, _HEADS, tokens, tokens) * 4 + 96).float()  # large: 16-bit spacing 0.5 at 96 in bf16
    model = _ViT(bias, attention).eval().to(dtype)
    assert model.attn.bias.dtype == torch.float32
    images = torch.randn(2, 3, _ROWS * _PATCH, _COLS * _PATCH).to(dtype)
    kernel = KernelInputs()
    with torch.no_grad(), vitmad.record(model, stats="all") as rec, kernel:
        model(images)
    (q, k), = kernel.qk
    assert q.dtype == dtype and q.shape == (2, _HEADS, tokens, _HEAD_DIM)
    mad, entropy, self_mass = _reference(q, k, bias)
    got = rec.stats
    torch.testing.assert_close(rec.mad[0].double(), mad, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(got["entropy"][0].double(), entropy, rtol=0, atol=FLOAT32_STAT_ATOL)
    torch.testing.assert_close(got["self_mass"][0].double(), self_mass, rtol=0, atol=FLOAT32_STAT_ATOL)
    # The test tells the two apart: with the bias rounded to q's dtype the entropy is off by more than the tolerance.
    _, rounded_entropy, _ = _reference(q, k, bias.to(dtype))
    assert (rounded_entropy - entropy).abs().max() > 4 * FLOAT32_STAT_ATOL


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sdpa_itself_adds_a_float32_bias_unrounded(dtype):
    """What the test above rests on: two keys with float32 biases 96.0 and 96.3 (96.5 in bfloat16) and equal
    logits get probabilities 0.4256 and 0.5744 from SDPA, not bfloat16's 0.3775 and 0.6225."""
    q = torch.zeros(1, 1, 1, 8, dtype=dtype)
    k = torch.zeros(1, 1, 2, 8, dtype=dtype)
    v = torch.eye(2, 8, dtype=dtype)[None, None]
    bias = torch.tensor([[96.0, 96.3]])
    got = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)[0, 0, 0, :2].double()
    torch.testing.assert_close(got, bias[0].double().softmax(-1), rtol=0, atol=4e-3)  # the output's 16-bit rounding
