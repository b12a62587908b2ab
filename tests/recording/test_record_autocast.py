"""vitmad under the caller's ``torch.autocast``: what is measured is the attention the kernel computed, and vitmad's
own products keep their float32 accumulation.

Under CPU bfloat16 autocast, SDPA casts float32 q and k to bfloat16 below where vitmad sees the call: a timm ViT with
``qk_norm`` (its LayerNorm runs in float32 under autocast) hands SDPA float32 q and k, and they were measured as
given, 1e-4 to 2e-3 relative off the kernel's attention (found by QA, also on DINOv3's rotary q and k). vitmad's own
matrix products (the prefix maps, the pure-PyTorch kernels) ran in bfloat16 under the caller's autocast: 1e-3 off.
The reference here is the float64 softmax of the q and k the SDPA kernel itself received (read by a dispatch mode,
below autocast), placed by geometry written here: the class token, then a 4 x 4 grid of 8 px patches.
"""

from __future__ import annotations

import pytest
import torch

import vitmad
from conftest import KernelInputs
from vitmad.ops import fallback

timm = pytest.importorskip("timm")


def _centres() -> torch.Tensor:
    rows, cols = torch.meshgrid(torch.arange(4), torch.arange(4), indexing="ij")
    return (torch.stack([rows, cols], -1).reshape(16, 2).double() + 0.5) * 8


def test_q_and_k_cast_by_autocast_below_sdpa_are_measured_as_the_kernel_got_them():
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                              embed_dim=64, num_heads=2, qk_norm=True).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.normal_(std=0.3)
            if isinstance(module, torch.nn.LayerNorm) and module.weight is not None:
                module.weight.normal_(mean=3.0, std=0.5)  # q and k norms that sharpen the attention
    pixels = torch.randn(2, 3, 32, 32)
    kernel = KernelInputs()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        with kernel:
            plain = model(pixels)
        with vitmad.record(model, stats=["entropy", "prefix_maps"]) as rec:
            recorded = model(pixels)
    assert torch.equal(plain, recorded)
    assert [q.dtype for q, _ in kernel.qk] == [torch.bfloat16] * 2
    distance = torch.cdist(_centres(), _centres())
    for layer, (q, k) in enumerate(kernel.qk):
        attn = (q.double() @ k.double().transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(-1)
        patches = attn[:, :, 1:]
        expected_mad = (patches[..., 1:] * distance).sum(-1).mean(-1)
        expected_entropy = -(patches * patches.log()).sum(-1).mean(-1)
        torch.testing.assert_close(rec.mad[layer].double(), expected_mad, rtol=1e-6, atol=1e-5)
        torch.testing.assert_close(rec.stats["entropy"][layer].double(), expected_entropy, rtol=1e-6, atol=1e-6)
        assert rec.prefix_maps[layer].dtype == torch.float32
        torch.testing.assert_close(rec.prefix_maps[layer].double(), attn[:, :, :1, 1:], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_pure_pytorch_kernels_keep_float32_products_under_autocast(dtype):
    gen = torch.Generator().manual_seed(1)
    q, k = (torch.randn(2, 3, 17, 16, generator=gen) * 2 for _ in range(2))
    attn = (q.double() @ k.double().transpose(-1, -2) * 0.25).softmax(-1)
    distance = torch.cdist(_centres(), _centres())
    expected = (attn[:, :, 1:, 1:] * distance).sum(-1).mean(-1)
    with torch.autocast("cpu", dtype=dtype):
        from_qk = fallback.mad_qk(q, k, 8, num_prefix_tokens=1, grid=[4, 4])
        from_attn = fallback.mad(attn.float(), 8, num_prefix_tokens=1, grid=[4, 4])
        stats = fallback.stats_qk(q, k, 8, ["mad", "entropy"], num_prefix_tokens=1, grid=[4, 4])
    for value in (from_qk, from_attn, stats[0]):
        assert value.dtype == torch.float32
        torch.testing.assert_close(value.double(), expected, rtol=1e-6, atol=1e-5)
