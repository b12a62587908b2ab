"""lucidrains' vit-pytorch: the ViT with adaptive token sampling (``ats_vit``), MaxViT with register tokens
(``max_vit_with_registers``) and CCT on video (``cct_3d``), each against the model's own softmax probabilities, its
tokens placed by geometry written here from the models' source (for ATS, the tokens each layer keeps read from what
the model's own attention modules return)."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("vit_pytorch")

from test_record_vit_pytorch import STAT_TOL, STATS, TOL, _attend_maps, _cells, _record, _sharp  # noqa: E402
from test_record_vit_pytorch_stages import _far_from_uniform  # noqa: E402
from vit_pytorch import ats_vit  # noqa: E402

from conftest import statistics_reference  # noqa: E402


def _ats_sequences(model: torch.nn.Module, run) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, ``(ids, mask)`` ``[B, n]``: the patch each token of the layer's sequence started as (0: the class
    token) and the mask the layer was given (False: a padding row), as ``Transformer.forward`` composes them from the
    ``sampled_token_ids`` each ``Attention`` returns."""
    layers = [attention for attention, _ in model.transformer.layers]
    seen, returned = [], []
    handles = [a.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs["mask"]), with_kwargs=True)
               for a in layers]
    handles += [a.register_forward_hook(lambda m, args, out: returned.append(out[2])) for a in layers]
    try:
        with torch.no_grad():
            run()
    finally:
        for handle in handles:
            handle.remove()
    ids = torch.arange(seen[0].shape[1]).expand(seen[0].shape[0], -1)
    sequences = []
    for mask, sampled in zip(seen, returned):
        sequences.append((ids, mask))
        if sampled is not None:
            ids = ids.gather(1, sampled)
    return sequences


def test_ats_vit_places_the_tokens_each_layer_keeps_per_image():
    torch.manual_seed(0)
    model = _sharp(ats_vit.ViT(image_size=(24, 40), patch_size=8, num_classes=3, max_tokens_per_depth=(12, 8, 5),
                               dim=32, depth=3, heads=2, mlp_dim=32, dim_head=16))
    pixels = torch.randn(2, 3, 24, 40, generator=torch.Generator().manual_seed(1))

    def run():  # the Gumbel draws come from the global generator: the same draw in every run
        torch.manual_seed(2)
        return model(pixels)

    _, tokens, mean = _record(model, run, stats=STATS)
    maps = _attend_maps(model, run)
    sequences = _ats_sequences(model, run)
    cells = _cells((3, 5), (8, 8))
    assert len(maps) == len(tokens.layers) == 3
    kept = [mask.sum(1).tolist() for _, mask in sequences]
    assert kept[0] == [16, 16] and kept[1][0] != kept[1][1] and kept[2][0] != kept[2][1]  # padded rows in 1 and 2
    for layer, (probabilities, (ids, mask)) in enumerate(zip(maps, sequences)):
        geometry = tokens.geometry[layer]
        assert geometry.grid == (3, 5) and geometry.num_prefix_tokens == 1
        expected = {stat: torch.full((2, 2, 15), math.nan, dtype=torch.float64) for stat in ("mad", *STATS[:2])}
        class_rows = torch.full((2, 2, 1, 15), math.nan, dtype=torch.float64)
        for image in range(2):
            placed = mask[image] & (ids[image] > 0)  # the class token and the padding rows have no position
            positions = torch.full((ids.shape[1], 2), math.nan, dtype=torch.float64)
            positions[placed] = cells[ids[image][placed] - 1]
            reference = statistics_reference(probabilities[image:image + 1], positions)
            at = ids[image][placed] - 1
            for stat in expected:
                expected[stat][image][:, at] = reference[stat][0]
            class_rows[image][..., at] = reference["prefix_maps"][0, :, :1]  # the class token's row alone
        _far_from_uniform(probabilities)
        torch.testing.assert_close(tokens.per_layer[layer].double(), expected["mad"], equal_nan=True, **TOL)
        torch.testing.assert_close(mean.per_layer[layer].double(), expected["mad"].nanmean(-1), **TOL)
        for stat in STATS[:2]:
            torch.testing.assert_close(tokens.stats[stat][layer].double(), expected[stat], equal_nan=True,
                                       **STAT_TOL)
        torch.testing.assert_close(tokens.prefix_maps[layer].double(), class_rows, equal_nan=True, **STAT_TOL)
