"""Global attention over a stage's whole map in CNN-like hierarchies (timm VOLO and CaFormer), against each
model's own eager attention placed by hand: a row-major grid of the stage's map at its stride."""

from __future__ import annotations

import copy

import pytest
import torch

timm = pytest.importorskip("timm")

import vitmad  # noqa: E402

TOL = {"rtol": 1e-5, "atol": 1e-4}  # float32 softmax of two paths; atol in pixels


def _grid_mad(attn: torch.Tensor, grid: tuple[int, int], stride: float) -> torch.Tensor:
    """[B, H] MAD of [B, H, N, N] attention over a row-major grid of ``stride``-pixel cells, float64."""
    rows, cols = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
    centres = (torch.stack([rows, cols], -1).reshape(-1, 2).double() + 0.5) * stride
    assert attn.shape[-1] == grid[0] * grid[1]
    return (attn.double() * torch.cdist(centres, centres)).sum(-1).mean(-1)


def _eager_maps(model, pixels, class_name: str) -> list[torch.Tensor]:
    eager, maps = copy.deepcopy(model), []
    for module in eager.modules():
        if type(module).__name__ == class_name and hasattr(module, "attn_drop"):
            if hasattr(module, "fused_attn"):
                module.fused_attn = False
            module.attn_drop.register_forward_pre_hook(lambda _, args: maps.append(args[0]))
    with torch.no_grad():
        eager(pixels)
    return maps


# name -> (create kwargs, input size, per recorded layer (grid, stride))
CASES = {
    # VOLO-D1 at 64 px: outlookers on 8x8 @ 8 px (skipped: no query-key softmax), then attention on 4x4 @ 16 px;
    # its two class-attention blocks are skipped.
    "volo": ("volo", dict(img_size=64, layers=(1, 1, 1, 1), embed_dims=(32, 64, 64, 64), num_heads=(1, 2, 2, 2)),
             (64, 64), [((4, 4), 16.0)] * 3),
    # CaFormer-S18 with one block per stage: attention in stages 3 and 4, maps at strides 16 and 32.
    "caformer": ("metaformer", dict(depths=(1, 1, 1, 1), dims=(16, 32, 64, 96)), (64, 96),
                 [((4, 6), 16.0), ((2, 3), 32.0)]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_stage_map_attention_matches_eager_maps(case):
    name, kwargs, size, layers = CASES[case]
    torch.manual_seed(0)
    # The registered models fix their depths: build the classes, CaFormer's token mixers as caformer_s18's.
    if name == "volo":
        model = timm.models.volo.VOLO(**kwargs).eval()
    else:
        mf = timm.models.metaformer
        model = mf.MetaFormer(token_mixers=[mf.SepConv, mf.SepConv, mf.Attention, mf.Attention],
                              norm_layers=[mf.LayerNorm2dNoBias] * 2 + [mf.LayerNormNoBias] * 2, **kwargs).eval()
    pixels = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = model(pixels)
        with vitmad.record(model) as rec:
            recorded = model(pixels)
    assert torch.equal(recorded, plain)
    maps = _eager_maps(model, pixels, "Attention")
    assert len(maps) == len(rec.layers) == len(layers)
    for i, (grid, stride) in enumerate(layers):
        assert rec.geometry[i].grid == grid and rec.geometry[i].stride == (stride, stride)
        torch.testing.assert_close(rec.per_layer[i].double(), _grid_mad(maps[i], grid, stride), **TOL)
    if case == "volo":  # its outlook attention listed too (it was not, which the README said it was; QA 264)
        assert list(rec.skipped) == ["network.0.0.attn", "post_network.0.attn", "post_network.1.attn"]
        assert "outlook attention" in rec.skipped["network.0.0.attn"]
        assert all("class attention" in rec.skipped[f"post_network.{i}.attn"] for i in (0, 1))
