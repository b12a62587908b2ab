"""vitmad.record on transformers' convolutional-hierarchy vision transformers: LeViT, MobileViT (and
MobileViTV2's linear attention, skipped) and CvT.

Each test builds a tiny random model, records it, and compares every layer's MAD with the MAD of the model's own
eager attention probabilities (the input of each attention module's dropout, or its ``softmax`` call), placed by
the geometry written here from the model's design:

- LeViT: a stem of four stride-2 convolutions (16 px cells); ``LevitAttentionSubsample`` queries rows and
  columns 0, 2, 4, ... of its grid, each query at the centre of its stride-2 cell, keys the whole grid.
- MobileViT: stride 8, 16, 32 maps in its three MobileViT layers; each image's map is unfolded into 2 x 2
  patches, and sequence (i, j) of the image holds the token at map row 2a + i, column 2b + j of patch (a, b).
- CvT: stage grids of the patch embeddings (stride 4, then 2, 2); keys from a 3 x 3 depthwise convolution of
  stride 2 (key i at the centre of its stride cell), queries the grid itself; the last stage's CLS token has no
  position.
"""

from __future__ import annotations

import pytest
import torch

import vitmad
from vitmad.ops.reference import mad_positions_reference

transformers = pytest.importorskip("transformers")

TOL = {"rtol": 1e-5, "atol": 1e-4}  # pixels; float32 attention against a float64 reference


def axis(count: int, step: int, stride: float) -> torch.Tensor:
    """Centres, in pixels, of the ``count`` outputs of a stride-``step`` operation over cells of ``stride``
    pixels: output i covers cells step * i ... step * i + step - 1."""
    return (torch.arange(count, dtype=torch.float64) + 0.5) * step * stride


def grid(rows: torch.Tensor, cols: torch.Tensor, prefix: int = 0) -> torch.Tensor:
    """``prefix`` rows of NaN, then the row-major grid of ``rows`` x ``cols``."""
    return torch.cat([torch.full((prefix, 2), float("nan"), dtype=torch.float64), torch.cartesian_prod(rows, cols)])


def dropout_maps(model, pixels, attention_class: str, dropout: str = "dropout") -> list[torch.Tensor]:
    """The softmax probabilities of every ``attention_class`` module: the input of its attention dropout."""
    maps = []
    handles = [getattr(m, dropout).register_forward_pre_hook(lambda m, args: maps.append(args[0]))
               for m in model.modules() if type(m).__name__ == attention_class]
    with torch.no_grad():
        model(pixels)
    for handle in handles:
        handle.remove()
    return maps


def sharpen(model, *projections: str, factor: float = 8.0) -> None:
    """Weights of unit gain (transformers draws every weight, batch norms' too, with std 0.02, which leaves tiny
    activations), then the
    query and key projections scaled, so that the attention is far from uniform: a token placed at the wrong
    position then changes the MAD (under uniform attention only the set of positions matters)."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
                module.weight.normal_(0.0, module.weight[0].numel() ** -0.5)
            elif isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.weight.fill_(1.0)
        for module in model.modules():
            for name in projections:
                projection = getattr(module, name, None)
                if isinstance(projection, torch.nn.Module):
                    for parameter in projection.parameters():
                        parameter.mul_(factor)


def peaked(maps: list[torch.Tensor]) -> None:
    """The test's maps are far from uniform: the strongest key of a query holds a clear share of its mass."""
    assert all(attn.amax(-1).mean() > 4.0 / attn.shape[-1] for attn in maps if attn.shape[-1] > 4)


def record(model, pixels):
    """Records one forward; its output is that of the forward without recording, bit for bit."""
    with torch.no_grad():
        plain = model(pixels).to_tuple()
    with torch.no_grad(), vitmad.record(model) as rec:
        recorded = model(pixels).to_tuple()
    assert all(torch.equal(a, b) for a, b in zip(plain, recorded, strict=True))
    return rec


def test_levit_subsampled_queries_on_its_fixed_grid():
    torch.manual_seed(0)
    config = transformers.LevitConfig(image_size=96, hidden_sizes=[16, 32, 48], num_attention_heads=[1, 2, 3],
                                      depths=[1, 1, 1], key_dim=[8, 8, 8])
    model = transformers.LevitModel(config).eval()
    sharpen(model, "queries_keys_values", "queries", "keys_values", factor=3.0)
    pixels = torch.randn(2, 3, 96, 96)
    rec = record(model, pixels)
    maps, original = [], torch.Tensor.softmax

    def spy(self, *args, **kwargs):
        maps.append(original(self, *args, **kwargs))
        return maps[-1]

    with torch.no_grad(), pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.Tensor, "softmax", spy)
        model(pixels)
    # 96 px / 16: a 6 x 6 grid; then 3 x 3 at 32 px, 2 x 2 at 64 px (ceil(3 / 2)).
    full = [grid(axis(6, 1, 16), axis(6, 1, 16)), grid(axis(3, 1, 32), axis(3, 1, 32)),
            grid(axis(2, 1, 64), axis(2, 1, 64))]
    subsampled = [grid(axis(3, 2, 16), axis(3, 2, 16)), grid(axis(2, 2, 32), axis(2, 2, 32))]
    layers = [(full[0], full[0]), (subsampled[0], full[0]), (full[1], full[1]), (subsampled[1], full[1]),
              (full[2], full[2])]
    peaked(maps)
    assert len(maps) == len(rec.per_layer) == len(layers)
    for recorded, attn, (queries, keys) in zip(rec.per_layer, maps, layers, strict=True):
        torch.testing.assert_close(recorded.double(), mad_positions_reference(attn, queries, keys), **TOL)
    assert [g.stride[0] for g in rec.geometry] == [16, 32, 32, 64, 64]
    assert [g.grid for g in rec.geometry] == [(6, 6), (3, 3), (3, 3), (2, 2), (2, 2)]


def mobilevit_sequences(side: int, stride: float, patch: int = 2) -> torch.Tensor:
    """[patch * patch, N, 2]: the positions of the tokens of each unfolded sequence (i, j) of one image's
    side x side map: token (a, b) of sequence (i, j) is map cell (patch * a + i, patch * b + j)."""
    cells = side // patch
    sequences = []
    for i in range(patch):
        for j in range(patch):
            rows = (torch.arange(cells, dtype=torch.float64) * patch + i + 0.5) * stride
            cols = (torch.arange(cells, dtype=torch.float64) * patch + j + 0.5) * stride
            sequences.append(torch.cartesian_prod(rows, cols))
    return torch.stack(sequences)


@pytest.mark.parametrize("size", [64, 128])
def test_mobilevit_attention_across_patches_in_pixels(size):
    torch.manual_seed(1)
    config = transformers.MobileViTConfig(image_size=size, hidden_sizes=[16, 24, 32],
                                          neck_hidden_sizes=[8, 8, 16, 16, 24, 24, 32], num_attention_heads=2)
    model = transformers.MobileViTModel(config).eval()
    sharpen(model, "query", "key")
    batch = 2
    pixels = torch.randn(batch, 3, size, size)
    rec = record(model, pixels)
    maps = dropout_maps(model, pixels, "MobileViTSelfAttention")
    depths = [2, 4, 3]  # transformer layers of the three MobileViT layers
    strides = [8, 16, 32]
    layers = [s for s, d in zip(strides, depths) for _ in range(d)]
    peaked(maps)
    assert len(maps) == len(rec.per_layer) == len(layers)
    for recorded, attn, stride in zip(rec.per_layer, maps, layers, strict=True):
        sequences = mobilevit_sequences(size // stride, stride)
        per_sequence = mad_positions_reference(attn, sequences.repeat(batch, 1, 1).unsqueeze(1))  # [B * 4, H]
        expected = per_sequence.view(batch, 4, -1).mean(1)  # every sequence has the same number of queries
        torch.testing.assert_close(recorded.double(), expected, **TOL)
    assert [g.stride[0] for g in rec.geometry] == layers
    assert rec.geometry[0].grid == (size // 8, size // 8)


def test_mobilevit_map_not_a_whole_number_of_patches_is_measured_on_the_resized_grid():
    """72 px: maps of 9 x 9, 5 x 5 and 3 x 3 (strides 8, 16, 32; the convolutions pad up), each resized bilinearly
    (corners not aligned) to 10 x 10, 6 x 6 and 4 x 4 before unfolding: the tokens sample the map at the centres of
    the resized grid, whose cells are stride * side / resized pixels (was: refused)."""
    torch.manual_seed(1)
    config = transformers.MobileViTConfig(image_size=64, hidden_sizes=[16, 24, 32],
                                          neck_hidden_sizes=[8, 8, 16, 16, 24, 24, 32], num_attention_heads=2)
    model = transformers.MobileViTModel(config).eval()
    sharpen(model, "query", "key")
    pixels = torch.randn(2, 3, 72, 72)
    rec = record(model, pixels)
    maps = dropout_maps(model, pixels, "MobileViTSelfAttention")
    layers = [(8, 9)] * 2 + [(16, 5)] * 4 + [(32, 3)] * 3
    assert len(maps) == len(rec.per_layer) == len(layers)
    for recorded, attn, (stride, side), geometry in zip(rec.per_layer, maps, layers, rec.geometry, strict=True):
        resized = -(-side // 2) * 2
        sequences = mobilevit_sequences(resized, stride * side / resized)
        per_sequence = mad_positions_reference(attn, sequences.repeat(2, 1, 1).unsqueeze(1))  # [B * 4, H]
        torch.testing.assert_close(recorded.double(), per_sequence.view(2, 4, -1).mean(1), **TOL)
        assert geometry.grid == (resized, resized) and geometry.stride[0] == stride * side / resized


def test_mobilevitv2_linear_attention_is_skipped_with_its_reason():
    config = transformers.MobileViTV2Config(image_size=64)
    model = transformers.MobileViTV2Model(config).eval()
    with pytest.raises(ValueError, match="linear self-attention"):
        vitmad.record(model)


@pytest.mark.parametrize("size", [(64, 64), (72, 88)])
def test_cvt_keys_from_strided_convolutions_and_a_cls_token_in_the_last_stage(size):
    torch.manual_seed(2)
    # depth[i] > i: transformers' CvtStage indexes its drop-path rates by the stage index.
    config = transformers.CvtConfig(embed_dim=[16, 32, 48], num_heads=[1, 2, 3], depth=[1, 2, 3])
    model = transformers.CvtModel(config).eval()
    sharpen(model, "projection_query", "projection_key")
    pixels = torch.randn(2, 3, *size)
    rec = record(model, pixels)
    maps = dropout_maps(model, pixels, "CvtSelfAttention")
    # Patch embeddings: 7x7 stride 4 padding 2, then 3x3 stride 2 padding 1 (twice).
    h, w = (size[0] + 4 - 7) // 4 + 1, (size[1] + 4 - 7) // 4 + 1
    stages, stride = [], 4
    for stage in range(3):
        if stage:
            h, w, stride = (h + 2 - 3) // 2 + 1, (w + 2 - 3) // 2 + 1, stride * 2
        kh, kw = (h + 2 - 3) // 2 + 1, (w + 2 - 3) // 2 + 1  # keys: 3x3 depthwise convolution, stride 2, padding 1
        prefix = int(stage == 2)
        queries = grid(axis(h, 1, stride), axis(w, 1, stride), prefix)
        keys = grid(axis(kh, 2, stride), axis(kw, 2, stride), prefix)
        stages += [(queries, keys, (h, w), stride)] * (stage + 1)
    peaked(maps)
    assert len(maps) == len(rec.per_layer) == len(stages)
    for recorded, attn, (queries, keys, _, _) in zip(rec.per_layer, maps, stages, strict=True):
        torch.testing.assert_close(recorded.double(), mad_positions_reference(attn, queries, keys), **TOL)
    assert [g.grid for g in rec.geometry] == [s[2] for s in stages]
    assert [g.stride[0] for g in rec.geometry] == [s[3] for s in stages]
