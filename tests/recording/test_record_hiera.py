"""vitmad.record on Hiera: timm ``hiera_*`` and transformers ``HieraModel``.

Hiera keeps its tokens in unroll order. With ``n`` unroll strides of ``2 x 2`` on a ``gh x gw`` patch grid, the
sequence enumerates the digits ``(sy1, sx1, sy2, sx2, ..., syn, sxn, r, c)`` (last fastest), and the token sits
at row ``r * 2**n + sy1 + 2 * sy2 + ... + 2**(n-1) * syn`` (columns alike). Each query pooling drops the leading
digit pair (the ``2 x 2`` cell), so after ``k`` poolings the row is ``r * 2**(n-k) + sum_j sy_j * 2**(j-k-1)``
over the remaining pairs, in cells of ``4 * 2**k`` pixels. Mask-unit attention puts token ``t`` in window
``t % nW``. The geometry below is written from that closed form; the reference probabilities are the models'
own eager softmax.
"""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from test_record_windowed_vit import TOL, eager_maps

import vitmad
from vitmad.ops.reference import mad_positions_reference

timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")

NUM_STRIDES = 3  # unroll strides: one per stage change of a 4-stage Hiera


def sequence_cells(gh: int, gw: int, pooled: int) -> torch.Tensor:
    """``[N, 2]`` (row, col) at the pooled level of each token, in Hiera's order after ``pooled`` poolings."""
    remaining = NUM_STRIDES - pooled
    size = 2**NUM_STRIDES
    cells = []
    for digits in itertools.product(*[range(2)] * (2 * remaining), range(gh // size), range(gw // size)):
        *pairs, r, c = digits
        row, col = r * 2**remaining, c * 2**remaining
        for j in range(remaining):  # pairs[2j], pairs[2j+1]: the (sy, sx) of the (pooled + j + 1)-th unroll
            row += pairs[2 * j] * 2**j
            col += pairs[2 * j + 1] * 2**j
        cells.append((row, col))
    return torch.tensor(cells, dtype=torch.float64)


def reference(probabilities: torch.Tensor, gh: int, gw: int, key_level: int, query_level: int):
    """(MAD [B, H], per-token MAD [B, H, T] in row-major order of the query grid) of one Hiera layer."""
    attn = probabilities if probabilities.dim() == 5 else probabilities.unsqueeze(2)  # [B, H, nW, Nq, Nk]
    windows = attn.shape[2]
    keys = (sequence_cells(gh, gw, key_level) + 0.5) * 4 * 2**key_level
    queries_cells = sequence_cells(gh, gw, query_level)
    queries = (queries_cells + 0.5) * 4 * 2**query_level
    # Token t is in window t % nW, at place t // nW.
    key_positions = keys.view(-1, windows, 2).transpose(0, 1)
    positions = queries.view(-1, windows, 2).transpose(0, 1)
    per_query = mad_positions_reference(attn, positions, key_positions, reduction="none")  # [B, H, nW, Nq]
    qw = gw // 2**query_level
    grid_index = (queries_cells[:, 0] * qw + queries_cells[:, 1]).long().view(-1, windows).transpose(0, 1)
    tokens = torch.empty(*per_query.shape[:2], queries_cells.shape[0], dtype=torch.float64)
    tokens[:, :, grid_index.reshape(-1)] = per_query.reshape(*per_query.shape[:2], -1)
    return per_query.mean(dim=(2, 3)), tokens


# stages (1, 1, 2, 1): (key level, query level, heads, mask units) per block
LAYERS = {3: [(0, 0, 1, True), (0, 1, 2, True), (1, 2, 4, True), (2, 2, 4, False), (2, 3, 8, False)],
          2: [(0, 0, 1, True), (0, 1, 2, True), (1, 2, 4, True), (2, 2, 4, False), (2, 2, 8, False)]}


def check(maps, recorded, plain, layers, size):
    gh, gw = size[0] // 4, size[1] // 4
    rec, rec_tokens, outputs = recorded
    for a, b in zip(plain, outputs, strict=True):
        assert torch.equal(a, b)
    assert len(rec.per_layer) == len(layers) == len(maps)
    for i, (key_level, query_level, heads, windowed) in enumerate(layers):
        if windowed:
            assert maps[i].shape[2] == (gh // 8) * (gw // 8)  # one window per 8 x 8 mask unit
        mean, tokens = reference(maps[i], gh, gw, key_level, query_level)
        geometry = rec.geometry[i]
        stride = 4.0 * 2**query_level
        assert geometry.stride == (stride, stride) and geometry.heads == heads
        assert geometry.grid == (gh // 2**query_level, gw // 2**query_level)
        torch.testing.assert_close(rec.per_layer[i].double(), mean, **TOL)
        torch.testing.assert_close(rec_tokens.per_layer[i].double(), tokens, **TOL)


def _timm_hiera(size, q_pool=3):
    torch.manual_seed(0)
    return timm.create_model("hiera_tiny_224", pretrained=False, img_size=size, embed_dim=16, num_heads=1,
                             stages=(1, 1, 2, 1), q_pool=q_pool).eval()


def _record(model, run):
    with torch.no_grad():
        plain = run(model)
        with vitmad.record(model) as rec:
            out = run(model)
        with vitmad.record(model, reduction="none") as rec_tokens:
            run(model)
    return plain, (rec, rec_tokens, out)


@pytest.mark.parametrize("size, q_pool", [((64, 64), 3), ((96, 64), 3), ((64, 96), 2)],
                         ids=["square", "non-square", "two-poolings"])
def test_timm_hiera_mask_units_and_pooled_queries_match_eager_attention(size, q_pool):
    model = _timm_hiera(size, q_pool)
    pixels = torch.randn(2, 3, *size)
    plain, recorded = _record(model, lambda m: [m(pixels)])
    eager = copy.deepcopy(model)
    for module in eager.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = False
    maps = eager_maps(eager, {"MaskUnitAttention"})
    with torch.no_grad():
        eager(pixels)
    check(maps, recorded, plain, LAYERS[q_pool], size)
    assert recorded[0].mad.shape == (5, 2, 8)


def test_timm_hiera_with_dropped_mask_units_is_refused():
    model = _timm_hiera((64, 64))
    mask = torch.tensor([[True, False, True, False]])  # 2 of the 4 mask units kept
    with pytest.raises(ValueError, match="mask units dropped"), torch.no_grad(), vitmad.record(model):
        model.forward_features(torch.randn(1, 3, 64, 64), mask=mask)


@pytest.mark.parametrize("size", [(64, 64), (64, 96)], ids=["square", "non-square"])
def test_hf_hiera_matches_its_attention_weights(size):
    torch.manual_seed(0)
    config = transformers.HieraConfig(embed_dim=16, image_size=list(size), num_heads=[1, 2, 4, 8],
                                      depths=[1, 1, 2, 1], num_query_pool=3)
    model = transformers.HieraModel(config).eval()
    pixels = torch.randn(2, 3, *size)
    plain, recorded = _record(model, lambda m: [m(pixels).last_hidden_state])
    maps = []
    for module in model.modules():
        if type(module).__name__ == "HieraMaskUnitAttention":
            module.register_forward_hook(lambda m, a, out: maps.append(out[1]))
    with torch.no_grad():
        model(pixels, output_attentions=True)
    check(maps, recorded, plain, LAYERS[3], size)
