"""timm TNT: inner attention between the 4x4 "pixel" tokens of each 16x16 patch, outer attention between the
patches and CLS, against the model's own eager attention placed by hand."""

from __future__ import annotations

import copy

import pytest
import torch

timm = pytest.importorskip("timm")

import vitmad  # noqa: E402

TOL = {"rtol": 1e-5, "atol": 1e-4}  # float32 softmax of two paths; atol in pixels


def _mad(attn: torch.Tensor, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """[..., Nq] per-query attention-weighted distance, float64."""
    return (attn.double() * torch.cdist(queries.double(), keys.double())).sum(-1)


@pytest.mark.parametrize("legacy", [False, True])
def test_tnt_inner_and_outer_attention_match_eager_maps(legacy):
    torch.manual_seed(0)
    model = timm.models.tnt.TNT(img_size=64, patch_size=16, embed_dim=32, inner_dim=8, depth=2, num_heads_outer=2,
                                num_heads_inner=2, legacy=legacy).eval()
    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = model(pixels)
        with vitmad.record(model, reduction="none") as rec:
            recorded = model(pixels)
    assert torch.equal(recorded, plain)
    eager, maps = copy.deepcopy(model), {}
    for name, module in eager.named_modules():
        if name.endswith(("attn_in", "attn_out")):
            module.attn_drop.register_forward_pre_hook(lambda _, args, name=name: maps.setdefault(name, args[0]))
    with torch.no_grad():
        eager(pixels)
    assert rec.layers == ["blocks.0.attn_in", "blocks.0.attn_out", "blocks.1.attn_in", "blocks.1.attn_out"]

    # Outer: CLS, then the 4x4 patches of 16 px at their centres.
    patch = (torch.cartesian_prod(torch.arange(4), torch.arange(4)).double() + 0.5) * 16
    # Inner: patch (r, c), pixel token (i, j) at (16 r + 4 i + 2, 16 c + 4 j + 2); patches batched image-major.
    fine = torch.cartesian_prod(torch.arange(16), torch.arange(16))  # the 16x16 map of pixel tokens, row-major
    for layer, per_token in zip(rec.layers, rec.per_layer):
        attn = maps[layer]
        if layer.endswith("attn_out"):
            expected = _mad(attn[..., 1:, 1:], patch, patch)
            assert per_token.shape == (2, 2, 16)
        else:
            at = (fine.double() + 0.5) * 4  # [256, 2]: same as 16 r + 4 i + 2
            slots = (fine[:, 0] // 4) * 4 + fine[:, 1] // 4, (fine[:, 0] % 4) * 4 + fine[:, 1] % 4  # (patch, pixel)
            within = at.view(4, 4, 4, 4, 2).permute(0, 2, 1, 3, 4).reshape(16, 16, 2)  # [patch, pixel, 2]
            per_patch = _mad(attn.view(2, 16, 2, 16, 16), within[None, :, None], within[None, :, None])
            expected = per_patch[:, slots[0], :, slots[1]].permute(1, 2, 0)  # [256, B, H] -> [B, H, 256], fine map
            assert per_token.shape == (2, 2, 256)
        torch.testing.assert_close(per_token.double(), expected, **TOL)
    assert rec.geometry[0].stride == (4.0, 4.0) and rec.geometry[1].stride == (16.0, 16.0)
