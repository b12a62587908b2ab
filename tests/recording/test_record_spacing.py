"""vitmad.record(model, spacing=...): distances in the unit of a pixel's (a voxel's) physical size, axis by axis;
and positions given by hand over three axes (a volume's slice, row, column).

The references are the models' own attention probabilities, placed by the geometry their own tests write (MONAI's
ViT: tokens at the centres of their patches on each axis; PVT v2: queries at the centres of their cells, keys
pooled by an sr x sr convolution at the centres of their stride cells), each centre's coordinates then multiplied
by the spacing of its axis here, and the distances taken in float64.
"""

from __future__ import annotations

import math

import pytest
import torch

import vitmad
from conftest import tensor_softmax_maps
from vitmad.ops.reference import mad_positions_reference

TOL = {"rtol": 1e-5, "atol": 1e-4}  # float32 attention against float64; atol in the spacing's unit
STAT_TOL = {"rtol": 1e-5, "atol": 1e-5}


def _monai_vit(dims: int, img_size, patch):
    nets = pytest.importorskip("monai.networks.nets")
    from test_record_monai import _sharpen

    return _sharpen(nets.ViT(in_channels=1, img_size=img_size, patch_size=patch, hidden_size=48, mlp_dim=16,
                             num_layers=2, num_heads=2, proj_type="conv", pos_embed_type="learnable",
                             classification=True, spatial_dims=dims), 3.0)


def _centres(grid, stride) -> torch.Tensor:
    """``[prod(grid), K]`` float64 centres of a row-major grid of ``stride``-voxel cells, last axis fastest."""
    axes = [(torch.arange(side, dtype=torch.float64) + 0.5) * step for side, step in zip(grid, stride)]
    return torch.cartesian_prod(*axes).reshape(-1, len(grid))


def _vit_reference(probs: torch.Tensor, centres: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-token MAD ``[B, H, T]`` and the other statistics of a ViT block with one class token first."""
    attn = probs.double()
    return {"mad": (attn[..., 1:, 1:] * torch.cdist(centres, centres)).sum(-1),
            "entropy": -torch.special.xlogy(attn, attn).sum(-1)[..., 1:],
            "prefix_mass": attn[..., 1:, :1].sum(-1)}


@pytest.mark.parametrize(("dims", "sides", "patch", "spacing"), [
    # A CT-like volume: thick slices, unequal in-plane spacing.
    (3, (20, 24, 30), (4, 6, 5), (5.0, 0.7, 0.9)),
    (3, (20, 24, 30), (4, 6, 5), 0.8),  # one value for every axis
    (2, (36, 45), (8, 6), (0.5, 2.0)),  # a micrograph of non-square pixels
])
def test_monai_vit_in_the_spacing_unit(dims, sides, patch, spacing):
    model = _monai_vit(dims, sides, patch)
    x = torch.randn(2, 1, *sides, generator=torch.Generator().manual_seed(3))
    maps = tensor_softmax_maps(model, x)
    with torch.no_grad():
        plain = model(x)[0]
        with vitmad.record(model, spacing=spacing, reduction="none", stats=["entropy", "prefix_mass"]) as rec:
            recorded = model(x)[0]
    assert torch.equal(plain, recorded)
    assert rec.spacing == ((float(spacing),) if isinstance(spacing, float) else spacing)
    grid = tuple(n // p for n, p in zip(sides, patch))
    scale = torch.tensor(spacing, dtype=torch.float64).expand(dims)
    centres = _centres(grid, patch) * scale
    assert len(maps) == len(rec.layers) == 2
    for layer, probs in enumerate(maps):
        expected = _vit_reference(probs, centres)
        assert float(expected["entropy"].mean()) < 0.6 * math.log(probs.shape[-1])  # far from uniform
        torch.testing.assert_close(rec.per_layer[layer].double(), expected["mad"], **TOL)
        for stat in ("entropy", "prefix_mass"):  # no distance in them: unchanged by the spacing
            torch.testing.assert_close(rec.calls[-1].statistics[stat][layer].double(), expected[stat], **STAT_TOL)
        geometry = rec.geometry[layer]  # the grid and its strides stay in input voxels
        assert (geometry.grid if dims == 2 else (geometry.depth, *geometry.grid)) == grid
        assert (geometry.stride if dims == 2 else (geometry.depth_stride, *geometry.stride)) == tuple(map(float, patch))


def test_pooled_keys_are_scaled_like_the_queries():
    """PVT v2's keys pooled by a convolution lie on another grid than the queries: both are scaled, per axis."""
    timm = pytest.importorskip("timm")
    from test_record_pooled import DIMS, eager_maps, expected_sr, stage_grids

    torch.manual_seed(0)
    model = timm.create_model("pvt_v2_b0", pretrained=False, depths=(1, 1, 1, 1), **DIMS).eval()
    pixels = torch.randn(2, 3, 60, 92)
    spacing = (0.25, 3.0)
    with torch.no_grad(), vitmad.record(model, spacing=spacing) as rec:
        model(pixels)
    maps = eager_maps(model, pixels, "attn_drop", lambda m: type(m).__name__ == "Attention")
    layers = expected_sr(stage_grids(60, 92, 4, 2, overlapping=True), (8, 4, 2, 1), 1)
    scale = torch.tensor(spacing, dtype=torch.float64)
    assert len(rec.per_layer) == len(maps) == len(layers) == 4
    for recorded, attn, (queries, keys) in zip(rec.per_layer, maps, layers, strict=True):
        expected = mad_positions_reference(attn, queries * scale, keys * scale)
        torch.testing.assert_close(recorded.double(), expected, **TOL)
    # A second forward reuses the scaled layouts (kept with vitmad's own): the same values again.
    with torch.no_grad(), vitmad.record(model, spacing=spacing) as again:
        model(pixels)
        model(pixels)
    for first, second in zip(again.calls[0].per_layer, again.calls[1].per_layer, strict=True):
        assert torch.equal(first, second)
    torch.testing.assert_close(again.calls[1].mad, rec.mad, rtol=0, atol=0, equal_nan=True)  # heads a stage lacks: NaN


def test_positions_given_over_three_axes():
    """``positions=[N, 3]``: (slice, row, column) of each token of a model vitmad does not place; the spacing
    scales them too."""
    model = _monai_vit(3, (8, 12, 10), (4, 4, 5))
    x = torch.randn(1, 1, 8, 12, 10, generator=torch.Generator().manual_seed(5))
    maps = tensor_softmax_maps(model, x)
    grid = (2, 3, 2)
    centres = _centres(grid, (4, 4, 5))
    given = torch.cat([torch.full((1, 3), float("nan"), dtype=torch.float64), centres]).float()
    with torch.no_grad():
        with vitmad.record(model, positions=given, reduction="none") as rec:
            model(x)
        with vitmad.record(model, positions=given, spacing=(2.0, 1.0, 0.5), reduction="none") as spaced:
            model(x)
    for layer, probs in enumerate(maps):
        for recording, scale in ((rec, (1.0, 1.0, 1.0)), (spaced, (2.0, 1.0, 0.5))):
            expected = _vit_reference(probs, centres * torch.tensor(scale, dtype=torch.float64))["mad"]
            values = recording.per_layer[layer].double()  # [B, H, N] in token order: NaN at the class token
            assert values[..., 0].isnan().all()
            torch.testing.assert_close(values[..., 1:], expected, **TOL)


def test_spacing_as_numbers_of_any_kind():
    """A tensor or NumPy array (a NIfTI header's pixdim), NumPy scalars: taken as their numbers."""
    np = pytest.importorskip("numpy")
    model = _monai_vit(2, (16, 16), (8, 8))
    for spacing in (torch.tensor([0.5, 2.0]), np.array([0.5, 2.0]), (np.float32(0.5), np.float64(2.0)),
                    torch.tensor(0.5)):
        with vitmad.record(model, spacing=spacing) as rec:
            pass
        assert rec.spacing in ((0.5, 2.0), (0.5,))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_positions_are_scaled_in_float32(dtype):
    """Patch centres are exact in half precision, 0.7 and their products are not: the spacing is applied in
    float32 (bfloat16 products were 0.5% off, QA helper-164)."""
    model = _monai_vit(2, (24, 40), (8, 8))
    x = torch.randn(2, 1, 24, 40, generator=torch.Generator().manual_seed(7))
    maps = tensor_softmax_maps(model, x)
    centres = _centres((3, 5), (8, 8))
    given = torch.cat([torch.full((1, 2), float("nan"), dtype=torch.float64), centres]).to(dtype)
    with torch.no_grad(), vitmad.record(model, positions=given, spacing=(0.7, 1.3), reduction="none") as rec:
        model(x)
    for layer, probs in enumerate(maps):
        expected = _vit_reference(probs, centres * torch.tensor((0.7, 1.3), dtype=torch.float64))["mad"]
        torch.testing.assert_close(rec.per_layer[layer][..., 1:].double(), expected, **TOL)


@pytest.mark.parametrize(("spacing", "error", "message"), [
    ("1mm", TypeError, "vitmad.record: spacing must be one positive number"),
    ((1.0, "2"), TypeError, "vitmad.record: spacing must be one positive number"),
    (True, TypeError, "vitmad.record: spacing must be one positive number"),
    ((1.0, 2.0, 3.0, 4.0), ValueError, "vitmad.record: spacing must be one positive number (the size of an input "
                                       "pixel on every axis) or 2 (row, column) or 3 (slice, row, column) positive "
                                       "numbers, in the unit MAD is to be in; got 4 values"),
    ((1.0, 0.0), ValueError, "vitmad.record: spacing must be one positive number"),
    ((1.0, float("nan")), ValueError, "vitmad.record: spacing must be one positive number"),
    (-0.5, ValueError, "vitmad.record: spacing must be one positive number"),
    # The ops square distances in float32: 1e-30 gave 0 and 1e18 NaN, silently (QA helper-164).
    (1e-30, ValueError, "vitmad.record: spacing must be between 1e-12 and 1e+12 units per pixel (distances are "
                        "squared in float32); got 1e-30"),
    ((1.0, 1e18), ValueError, "vitmad.record: spacing must be between 1e-12 and 1e+12 units per pixel"),
    (torch.ones(2, device="meta"), ValueError, "vitmad.record: spacing must be one positive number"),
])
def test_invalid_spacing_is_refused(spacing, error, message):
    model = _monai_vit(2, (16, 16), (8, 8))
    with pytest.raises(error) as raised:
        vitmad.record(model, spacing=spacing)
    assert str(raised.value).startswith(message)


def test_spacing_of_the_wrong_axis_count_names_the_layer():
    """Two values for a volume (or three for an image) would scale the wrong axes: refused at the layer."""
    volume = _monai_vit(3, (8, 8, 8), (4, 4, 4))
    with torch.no_grad(), vitmad.record(volume, spacing=(1.0, 2.0)), pytest.raises(ValueError) as raised:
        volume(torch.randn(1, 1, 8, 8, 8))
    assert ("blocks.0.attn (SABlock) of ViT: spacing=(1.0, 2.0) gives 2 values (row, column), but this layer's "
            "tokens lie on a volume's 3 axes (slice, row, column): pass 3 values, or one for all") in str(raised.value)
    image = _monai_vit(2, (16, 16), (8, 8))
    with torch.no_grad(), vitmad.record(image, spacing=(1.0, 2.0, 3.0)), pytest.raises(ValueError, match=(
            r"gives 3 values \(slice, row, column\), but this layer's tokens lie on an image's 2 axes \(row, "
            r"column\) \(a video's time axis is never scaled: its frames are not space\)")):
        image(torch.randn(1, 1, 16, 16))
