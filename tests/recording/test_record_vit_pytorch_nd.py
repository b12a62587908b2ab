"""lucidrains' vit-pytorch: the N-D ViTs (2-D images and 3-D volumes), the 3-D SimpleViT with flash attention, ViViT
with MOSS, the ViT with a patch merger, ``efficient.ViT`` over ``nn.TransformerEncoder`` and MPP, each against the
model's own probabilities, its tokens placed by geometry written here from the models' source; and the designs refused
with their reason. Their flex_attention path and LeVJEPA's video transformer: test_record_flex_attention.py."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("vit_pytorch")

from test_record_vit_pytorch import (  # noqa: E402
    SMALL,
    TOL,
    _attend_maps,
    _cells,
    _check_layers,
    _frame_positions,
    _nan,
    _record,
    _sdpa_probabilities,
    _sharp,
    _tensor_softmax_maps,
)
from vit_pytorch import (  # noqa: E402
    deepvit,
    efficient,
    mpp,
    simple_flash_attn_vit_3d,
    vit_nd,
    vit_nd_pope,
    vit_nd_rotary,
    vit_with_patch_merger,
    vivit_with_moss,
)

import vitmad  # noqa: E402
from conftest import statistics_reference  # noqa: E402


def _voxels(grid: tuple[int, ...], patch: tuple[int, ...]) -> torch.Tensor:
    """``[prod(grid), K]`` float64 centres of a row-major grid of ``patch`` cells, axis 0 slowest."""
    axes = [(torch.arange(n).double() + 0.5) * p for n, p in zip(grid, patch)]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, len(grid))


ND = {"vit_nd": (vit_nd, 1), "pope": (vit_nd_pope, 0), "rotary": (vit_nd_rotary, 0)}


@pytest.mark.parametrize("design", list(ND))
@pytest.mark.parametrize("sides", [((24, 40), (8, 8)), ((4, 16, 24), (2, 8, 8))], ids=["2d", "3d"])
def test_nd_vits_place_their_patches_on_every_axis(design, sides, monkeypatch):
    # vit_nd_masking takes flex_attention on an AVX2 CPU; its dense fallback (a softmax vitmad reads) where
    # ATEN_CPU_CAPABILITY=default.
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "default")
    module, prefix = ND[design]
    size, patch = sides
    torch.manual_seed(0)
    model = _sharp(module.ViTND(ndim=len(size), input_shape=size, patch_size=patch, num_classes=3, **SMALL))
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1))
    _, tokens, mean = _record(model, lambda: model(x))
    grid = tuple(s // p for s, p in zip(size, patch))
    positions = torch.cat([torch.full((prefix, len(size)), math.nan, dtype=torch.float64), _voxels(grid, patch)])
    maps = _tensor_softmax_maps(lambda: model(x))
    assert len(maps) == len(tokens.layers) == 2
    for layer, probabilities in enumerate(maps):
        geometry = tokens.geometry[layer]
        assert geometry.grid == grid[-2:] and geometry.num_prefix_tokens == prefix
        assert geometry.depth == (grid[0] if len(grid) == 3 else None)
        expected = statistics_reference(probabilities, positions)["mad"]
        torch.testing.assert_close(tokens.per_layer[layer].double(), expected, **TOL)
        torch.testing.assert_close(mean.mad[layer].double(), expected.mean(-1), **TOL)


def test_nd_vits_refuse_flex_attention_causal_masks_and_other_axis_counts(monkeypatch):
    x = torch.randn(2, 3, 16, 24)
    model = vit_nd.ViTND(ndim=2, input_shape=(16, 24), patch_size=8, num_classes=3, **SMALL)
    monkeypatch.setattr(vit_nd, "nd_attention", _flex_stand_in())
    with pytest.raises(ValueError, match="where vitmad did not see it"), torch.no_grad(), vitmad.record(model):
        model(x)
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "default")
    causal = vit_nd.ViTND(ndim=2, input_shape=(16, 24), patch_size=8, num_classes=3, causal_dims=0, **SMALL)
    with pytest.raises(ValueError, match="causally"), torch.no_grad(), vitmad.record(causal):
        causal(x)
    series = vit_nd.ViTND(ndim=1, input_shape=32, patch_size=8, num_classes=3, **SMALL)
    with pytest.raises(ValueError, match="ndim=1"), torch.no_grad(), vitmad.record(series):
        series(torch.randn(2, 3, 32))


def _flex_stand_in():
    """``nd_attention`` as compiled code would run it, where neither flex_attention nor a softmax is seen: the dense
    result computed without ``Tensor.softmax`` (exp over the sum)."""

    def attend(q, k, v, mask_fn=None, block_mask=None, scale=None):
        scores = (q @ k.transpose(-1, -2) * scale).double()
        weights = (scores - scores.amax(-1, keepdim=True)).exp()
        return (weights / weights.sum(-1, keepdim=True)).to(q.dtype) @ v

    return attend


def test_flash_attn_3d_simple_vit_places_tubelets_in_space_and_time():
    torch.manual_seed(0)
    model = _sharp(simple_flash_attn_vit_3d.SimpleViT(image_size=(16, 24), image_patch_size=8, frames=6,
                                                     frame_patch_size=2, num_classes=3, **SMALL))
    video = torch.randn(2, 3, 6, 16, 24, generator=torch.Generator().manual_seed(2))
    with pytest.warns(FutureWarning):  # its torch.backends.cuda.sdp_kernel
        _, tokens, mean = _record(model, lambda: model(video))
    with pytest.warns(FutureWarning):
        maps = _sdpa_probabilities(simple_flash_attn_vit_3d, lambda: model(video))
    space = _cells((2, 3), (8, 8)).repeat(3, 1)
    time = ((torch.arange(3).double() + 0.5) * 2).repeat_interleave(6)[:, None]
    assert len(maps) == len(tokens.layers) == 2
    for layer, probabilities in enumerate(maps):
        assert tokens.geometry[layer].frames == 3 and tokens.geometry[layer].grid == (2, 3)
        spatial = statistics_reference(probabilities, space)["mad"]
        temporal = statistics_reference(probabilities, time)["mad"]
        torch.testing.assert_close(tokens.per_layer[layer].double(), spatial, **TOL)
        torch.testing.assert_close(mean.temporal_mad[layer].double(), temporal.mean(-1), **TOL)


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_vivit_with_moss_places_each_frame_and_skips_its_temporal_transformer(pool):
    torch.manual_seed(0)
    model = _sharp(vivit_with_moss.ViViT(image_size=(16, 24), image_patch_size=8, frames=4, frame_patch_size=2,
                                         num_classes=3, dim=32, spatial_depth=2, temporal_depth=1, heads=2,
                                         mlp_dim=32, dim_head=16, moss_hidden_dim=16, pool=pool))
    video = torch.randn(2, 3, 4, 16, 24, generator=torch.Generator().manual_seed(3))
    _, tokens, mean = _record(model, lambda: model(video))
    maps = _sdpa_probabilities(vivit_with_moss, lambda: model(video))[:2]  # the spatial layers run first
    assert list(mean.skipped) == ["temporal_transformer.layers.0.0"] and len(tokens.layers) == 2
    space, _ = _frame_positions((2, 3), (8, 8), 2, 2, pool == "cls")
    for layer, probabilities in enumerate(maps):
        spatial = statistics_reference(probabilities, space)["mad"].view(2, 2, 2, 6)  # [B, F, H, 6]
        torch.testing.assert_close(tokens.per_layer[layer].double(), spatial.transpose(1, 2).reshape(2, 2, 12), **TOL)
        torch.testing.assert_close(mean.mad[layer].double(), spatial.mean((1, 3)), **TOL)


def test_patch_merger_vit_places_the_layers_before_the_merger_and_skips_the_rest():
    torch.manual_seed(0)
    model = _sharp(vit_with_patch_merger.ViT(image_size=(24, 40), patch_size=8, num_classes=3,
                                             **{**SMALL, "depth": 3}, patch_merge_layer=2))
    image = torch.randn(2, 3, 24, 40, generator=torch.Generator().manual_seed(4))
    _, tokens, mean = _record(model, lambda: model(image), stats=["entropy", "prefix_mass", "prefix_maps"])
    maps = _attend_maps(model, lambda: model(image))[:2]  # the merger's layer is index 1: layers 0 and 1 on the grid
    assert list(mean.skipped) == ["transformer.layers.2.0"]
    _check_layers(tokens, mean, maps, _cells((3, 5), (8, 8)), (3, 5), (8, 8), 0, 0)


def test_efficient_vit_places_its_multihead_attention_and_refuses_sequence_first_layers():
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(32, 2, 32, dropout=0.0, batch_first=True)
    encoder = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    model = efficient.ViT(image_size=(24, 40), patch_size=8, num_classes=3, dim=32, transformer=encoder).eval()
    image = torch.randn(2, 3, 24, 40, generator=torch.Generator().manual_seed(5))
    _, tokens, mean = _record(model, lambda: model(image))
    positions = torch.cat([_nan(1), _cells((3, 5), (8, 8))])
    assert len(tokens.layers) == 2
    x = model.to_patch_embedding(image)
    x = torch.cat([model.cls_token.expand(2, -1, -1), x], 1) + model.pos_embedding[:, :16]
    with torch.no_grad():
        for index, block in enumerate(encoder.layers):
            _, weights = block.self_attn(x, x, x, need_weights=True, average_attn_weights=False)
            expected = statistics_reference(weights, positions)["mad"]
            torch.testing.assert_close(tokens.per_layer[index].double(), expected, **TOL)
            torch.testing.assert_close(mean.mad[index].double(), expected.mean(-1), **TOL)
            x = block(x)
    sequence_first = efficient.ViT(image_size=(24, 40), patch_size=8, num_classes=3, dim=32, transformer=(
        torch.nn.TransformerEncoder(torch.nn.TransformerEncoderLayer(32, 2, 32, dropout=0.0), 1,
                                    enable_nested_tensor=False))).eval()
    with pytest.raises(ValueError, match="batch_first"), torch.no_grad(), vitmad.record(sequence_first):
        sequence_first(image)


def test_mpp_places_the_class_token_and_every_patch_of_its_cut():
    torch.manual_seed(0)
    model = mpp.MPP(transformer=_sharp(deepvit.DeepViT(image_size=40, patch_size=8, num_classes=3, **SMALL)),
                    patch_size=8, dim=32)
    image = torch.randn(2, 3, 24, 40, generator=torch.Generator().manual_seed(6))

    def run():  # MPP draws its masks with the global generator: the same draw in every run
        torch.manual_seed(7)
        return model(image)

    _, tokens, mean = _record(model, run, stats=["entropy", "prefix_mass", "prefix_maps"])
    maps = _tensor_softmax_maps(run)  # DeepViT's dots.softmax, before its re-attention mixes the heads
    _check_layers(tokens, mean, maps, torch.cat([_nan(1), _cells((3, 5), (8, 8))]), (3, 5), (8, 8), 1, 0)
