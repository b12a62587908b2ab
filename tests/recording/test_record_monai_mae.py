"""vitmad.record on MONAI's ``MaskedAutoEncoderViT`` (``monai.networks.nets.masked_autoencoder_vit``), on images
(``spatial_dims=2``) and volumes (3).

Tiny random-weight models, sharpened so that attention is far from uniform. The reference is the model's own
attention probabilities (``SABlock``: ``att_mat.softmax(dim=-1)``, every ``Tensor.softmax`` of a forward), placed by
geometry written here from MONAI's source:

- ``PatchEmbeddingBlock`` (``proj_type="conv"``): a convolution of kernel = stride = the patch, flattened row-major:
  patch ``t`` is ``t`` unravelled over the grid, centred at ``(i + 0.5) * p`` on each axis;
- ``_masking``: ``selected_indices = torch.multinomial(ones(B, N), int((1 - ratio) * N), replacement=False)``, the
  kept rows gathered in that order; ``forward`` puts ``cls_token`` first: the encoder's blocks attend over
  ``[class token][patch selected_indices[b, 0]][patch selected_indices[b, 1]]...``;
- the decoder scatters the encoded patches back to their cells among mask tokens and puts the class token first:
  ``[class token][every patch, row-major]``.

The draw is read here by a wrapper of the instance's ``_masking`` in a reference forward; the recorded forwards run
under the same seed, and their returned masks equal the reference's (the same draw).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from test_record_monai import _centres

import vitmad
from conftest import sharpened, tensor_softmax_maps

nets = pytest.importorskip("monai.networks.nets")

TOL = {"rtol": 1e-5, "atol": 1e-4}  # float32 accumulation against float64; atol in pixels (voxels)
STAT_TOL = {"rtol": 1e-5, "atol": 1e-5}
STATS = ["entropy", "prefix_mass", "prefix_maps"]


def _model(dims: int, img_size, patch) -> torch.nn.Module:
    """Every Linear redrawn (``sharpened``), the q / k projections 3 times larger: far from uniform."""
    model = sharpened(nets.MaskedAutoEncoderViT(
        in_channels=2, img_size=img_size, patch_size=patch, hidden_size=48, mlp_dim=32, num_layers=2, num_heads=2,
        decoder_hidden_size=36, decoder_mlp_dim=16, decoder_num_layers=1, decoder_num_heads=2, spatial_dims=dims))
    with torch.no_grad():
        for module in model.modules():
            if type(module).__name__ == "SABlock":
                module.qkv.weight.mul_(3.0)
    return model


def _reference(model, x, seed: int, ratio):
    """(probabilities of every block, selected_indices, output) of one forward seeded ``seed``, the draw read by a
    wrapper of the instance's ``_masking`` (removed after)."""
    drawn = []
    original = model._masking

    def masking(*args, **kwargs):
        drawn.append(original(*args, **kwargs))
        return drawn[-1]

    model._masking = masking
    try:
        torch.manual_seed(seed)
        maps = tensor_softmax_maps(model, x, ratio)
    finally:
        del model._masking
    torch.manual_seed(seed)
    with torch.no_grad():
        output = model(x, ratio)
    assert torch.equal(output[1], drawn[0][2])  # the reference forward drew what the plain one draws
    return maps, drawn[0][1], output


def _statistics(probs: torch.Tensor, queries: torch.Tensor, keys: torch.Tensor) -> dict[str, torch.Tensor]:
    """``[B, H, Q]`` per statistic (maps: ``[B, H, 1, Q]``) of ``[B, H, 1 + Q, 1 + Q]`` probabilities, the class
    token first; ``queries``/``keys`` ``[B, Q, K]`` positions of the others."""
    attn = probs.double()
    distance = torch.cdist(queries, keys).unsqueeze(1)  # [B, 1, Q, Q]
    return {"mad": (attn[..., 1:, 1:] * distance).sum(-1),
            "entropy": -torch.special.xlogy(attn, attn).sum(-1)[..., 1:],
            "prefix_mass": attn[..., 1:, 0],
            "maps": attn[..., :1, 1:]}


def _on_grid(values: torch.Tensor, kept: torch.Tensor, cells: int) -> torch.Tensor:
    """``[B, H, Q]`` values of the kept tokens (in draw order) on the whole row-major grid, NaN where not kept."""
    folded = values.new_full((*values.shape[:-1], cells), float("nan"))
    index = kept.unsqueeze(1).expand(*values.shape[:2], kept.shape[1])
    if values.dim() == 4:  # maps [B, H, 1, Q]
        index = index.unsqueeze(2)
    return folded.scatter(-1, index, values)


# (spatial dims, img_size, patch, masking ratio passed to forward or None for the model's 0.75): a non-square image,
# an anisotropic volume and patch.
CASES = {
    "2d": (2, (24, 40), (8, 4), None),
    "2d_ratio_half": (2, (24, 40), (8, 4), 0.5),
    "3d": (3, (16, 24, 20), (8, 6, 4), 0.6),
}


@pytest.mark.parametrize("case", list(CASES))
def test_masked_autoencoder_equals_its_own_attention(case):
    dims, img_size, patch, ratio = CASES[case]
    model = _model(dims, img_size, patch)
    x = torch.randn(2, 2, *img_size, generator=torch.Generator().manual_seed(1))
    maps, kept, plain = _reference(model, x, 7, ratio)
    grid = tuple(n // p for n, p in zip(img_size, patch))
    cells = math.prod(grid)
    assert kept.shape == (2, int((1 - (ratio or 0.75)) * cells)) and len(maps) == 3
    records = {}
    for reduction in ("mean", "none"):
        torch.manual_seed(7)
        with torch.no_grad(), vitmad.record(model, stats=STATS, reduction=reduction) as rec:
            recorded = model(x, ratio)
        assert torch.equal(recorded[0], plain[0]) and torch.equal(recorded[1], plain[1])  # same draw, same output
        records[reduction] = rec
    rec, tokens = records["mean"], records["none"]
    assert rec.layers == ["blocks.0.attn", "blocks.1.attn", "decoder_blocks.0.attn"] and rec.skipped == {}
    centres = _centres(grid, tuple(float(p) for p in patch))
    positions = centres[kept]  # [B, K, axes]: the encoder's kept patches in draw order
    everywhere = centres.expand(2, *centres.shape)
    for layer, probs in enumerate(maps):
        encoder = layer < 2
        expected = _statistics(probs, positions, positions) if encoder else _statistics(probs, everywhere, everywhere)
        assert float(expected["entropy"].mean()) < 0.6 * math.log(probs.shape[-1])  # far from uniform
        if encoder:
            expected = {name: _on_grid(value, kept, cells) for name, value in expected.items()}
        geometry = rec.geometry[layer]
        assert geometry.num_prefix_tokens == 1
        if dims == 3:
            assert (geometry.depth, *geometry.grid) == grid
            assert (geometry.depth_stride, *geometry.stride) == tuple(float(p) for p in patch)
        else:
            assert geometry.grid == grid and geometry.stride == tuple(float(p) for p in patch)
        torch.testing.assert_close(tokens.per_layer[layer].double(), expected["mad"], equal_nan=True, **TOL)
        torch.testing.assert_close(rec.per_layer[layer].double(), expected["mad"].nanmean(-1), **TOL)
        for stat in ("entropy", "prefix_mass"):
            torch.testing.assert_close(tokens.calls[-1].statistics[stat][layer].double(), expected[stat],
                                       equal_nan=True, **STAT_TOL)
        torch.testing.assert_close(tokens.prefix_maps[layer].double(), expected["maps"], equal_nan=True, **STAT_TOL)
    assert "__wrapped__" not in vars(type(model))["_masking"].__dict__  # the class's own _masking again


def test_each_forward_is_placed_by_its_own_draw():
    model = _model(2, (16, 24), (4, 4))
    x = torch.randn(1, 2, 16, 24, generator=torch.Generator().manual_seed(2))
    first, kept_first, _ = _reference(model, x, 3, None)
    second, kept_second, _ = _reference(model, x, 4, None)
    assert not torch.equal(kept_first, kept_second)
    torch.manual_seed(3)
    with torch.no_grad(), vitmad.record(model, reduction="none") as rec:
        model(x)
        torch.manual_seed(4)
        model(x)
        copy.deepcopy(model)(x)  # a copy made inside the block runs as without vitmad: no call, no error
    assert len(rec.calls) == 2
    centres = _centres((4, 6), (4.0, 4.0))
    for call, probs, kept in ((rec.calls[0], first[0], kept_first), (rec.calls[1], second[0], kept_second)):
        expected = _on_grid(_statistics(probs, centres[kept], centres[kept])["mad"], kept, 24)
        torch.testing.assert_close(call.per_layer[0].double(), expected, equal_nan=True, **TOL)
        assert int(call.per_layer[0].isnan().logical_not().sum()) == 2 * kept.shape[1]  # 2 heads, the kept cells


def test_refuses_an_encoder_whose_draw_it_did_not_see():
    model = _model(2, (16, 16), (8, 8))
    original = model._masking
    model._masking = lambda *args, **kwargs: original(*args, **kwargs)  # on the instance: the class's never runs
    with torch.no_grad(), vitmad.record(model):
        with pytest.raises(ValueError, match=r"blocks\.0\.attn \(SABlock\) of MaskedAutoEncoderViT: the _masking of "
                                             r"its class did not run"):
            model(torch.randn(1, 2, 16, 16))


def test_a_subclass_is_refused_naming_the_classes_placed():
    """A subclass's forward may draw, order or mask its tokens otherwise: refused, and the message names the MAE among
    the classes placed (it listed ViT, UNETR, ViTAutoEnc and Swin alone; QA helper-185)."""
    from monai.networks.nets import MaskedAutoEncoderViT

    class Sub(MaskedAutoEncoderViT):
        pass

    model = _model(2, (16, 16), (8, 8))
    model.__class__ = Sub
    with torch.no_grad(), vitmad.record(model):
        with pytest.raises(ValueError, match=r"ViT, UNETR, ViTAutoEnc, MaskedAutoEncoderViT, SwinUNETR's "
                                             r"SwinTransformer, .* SPADEAutoencoderKL only \(those classes themselves: "
                                             r"a subclass's forward"):
            model(torch.randn(1, 2, 16, 16))
