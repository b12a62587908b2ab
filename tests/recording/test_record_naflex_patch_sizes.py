"""timm's NaFlexViT fed patches of another size than its own, its projection resampled to them
(``enable_patch_interpolator``; ``[B, N, Ph, Pw, C]`` patches as its NaFlex loader gives them when training with
``patch_size_choices``): each token covers the patch it was given. It was placed at the model's patch size, every
MAD scaled by the ratio of the sizes, silently (QA 339: 8 / 12). Against the model's own softmax in float64, the
patches at the centres of their 12 px cells, written here."""

from __future__ import annotations

import copy

import pytest
import torch

import vitmad
from conftest import unfused_maps

timm = pytest.importorskip("timm")

MODEL_PATCH, GIVEN_PATCH = 8, 12
SIZES = [(36, 60), (48, 24)]  # grids of 12 px patches: 3 x 5 and 4 x 2


def _inputs(channels_last: bool):
    generator = torch.Generator().manual_seed(1)
    grids = [(h // GIVEN_PATCH, w // GIVEN_PATCH) for h, w in SIZES]
    slots = max(gh * gw for gh, gw in grids)
    shape = (GIVEN_PATCH, GIVEN_PATCH, 3) if channels_last else (3, GIVEN_PATCH, GIVEN_PATCH)
    patches = torch.zeros(len(SIZES), slots, *shape, dtype=torch.float64)
    coord = torch.zeros(len(SIZES), slots, 2, dtype=torch.long)
    valid = torch.zeros(len(SIZES), slots, dtype=torch.bool)
    for b, (gh, gw) in enumerate(grids):
        n = gh * gw
        patches[b, :n] = torch.randn(n, *shape, generator=generator, dtype=torch.float64)
        rows, cols = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
        coord[b, :n] = torch.stack([rows.flatten(), cols.flatten()], -1)
        valid[b, :n] = True
    return {"patches": patches, "patch_coord": coord, "patch_valid": valid}, grids


@pytest.mark.parametrize("channels_last", [True, False])
def test_patches_of_another_size_are_placed_at_their_own_size(channels_last):
    torch.manual_seed(0)
    model = timm.create_model("naflexvit_base_patch16_gap", pretrained=False, patch_size=MODEL_PATCH, embed_dim=48,
                              depth=2, num_heads=3, enable_patch_interpolator=True).eval().double()
    model.embeds.channels_last = channels_last
    with torch.no_grad():
        for block in model.blocks:  # peaked attention, so that a scale shows
            block.attn.qkv.weight[:96] *= 4
    inputs, grids = _inputs(channels_last)
    with torch.no_grad(), vitmad.record(model) as rec:
        model(inputs)
    assert rec.geometry[0].stride == (GIVEN_PATCH, GIVEN_PATCH)
    eager = copy.deepcopy(model)
    probabilities = unfused_maps(eager, "Attention")
    with torch.no_grad():
        eager(inputs)
    prefix = model.num_prefix_tokens
    assert len(probabilities) == len(model.blocks)
    for layer, (_, attention) in enumerate(probabilities):
        expected = []
        for b, (gh, gw) in enumerate(grids):
            rows, cols = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
            cells = (torch.stack([rows.flatten(), cols.flatten()], -1).double() + 0.5) * GIVEN_PATCH
            block = attention[b, :, prefix:prefix + gh * gw, prefix:prefix + gh * gw]
            expected.append((block * torch.cdist(cells, cells)).sum(-1).mean(-1))
        torch.testing.assert_close(rec.per_layer[layer].double(), torch.stack(expected), rtol=1e-6, atol=1e-6)
