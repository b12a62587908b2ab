"""vitmad.record on Hiera: timm ``hiera_*`` and transformers ``HieraModel``.

Hiera keeps its tokens in unroll order. With ``n`` unroll strides of ``2 x 2`` on a ``gh x gw`` patch grid, the
sequence enumerates the digits ``(sy1, sx1, sy2, sx2, ..., syn, sxn, r, c)`` (last fastest), and the token sits
at row ``r * 2**n + sy1 + 2 * sy2 + ... + 2**(n-1) * syn`` (columns alike). Each query pooling drops the leading
digit pair (the ``2 x 2`` cell), so after ``k`` poolings the row is ``r * 2**(n-k) + sum_j sy_j * 2**(j-k-1)``
over the remaining pairs, in cells of ``4 * 2**k`` pixels. Mask-unit attention puts token ``t`` in window
``t % nW``. The geometry below is written from that closed form; the reference probabilities are the models'
own eager softmax.

A masked forward (transformers' MAE pretraining, timm's ``mask=``) keeps the tokens of the kept mask units: both
models tile the bool mask ``[B, U]`` over the sequence (token ``t`` is in unit ``t % U``, the trailing ``(r, c)``
digits) and index with it, so the sequence keeps its digit order with the dropped units' tokens taken out: the
digits become ``(sy1, sx1, ..., u)`` over the kept units ``u`` in ascending order. Mask-unit attention then has one
window per kept unit.
"""

from __future__ import annotations

import copy
import itertools
import re

import pytest
import torch
from test_record_windowed_vit import TOL, eager_maps

import vitmad
from conftest import attention_outputs, record_both_reductions, sharpened
from vitmad.ops.reference import mad_positions_reference

timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")

NUM_STRIDES = 3  # unroll strides: one per stage change of a 4-stage Hiera


def sequence_cells(gh: int, gw: int, pooled: int, units=None) -> torch.Tensor:
    """``[N, 2]`` (row, col) at the pooled level of each token, in Hiera's order after ``pooled`` poolings;
    ``units``: the kept mask units (row-major over the ``gh / 8 x gw / 8`` units, ascending), all by default."""
    remaining = NUM_STRIDES - pooled
    size = 2**NUM_STRIDES
    units = range((gh // size) * (gw // size)) if units is None else units
    cells = []
    for digits in itertools.product(*[range(2)] * (2 * remaining), units):
        *pairs, unit = digits
        r, c = divmod(unit, gw // size)
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


def _unfused_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of a timm Hiera on its explicit softmax path (``fused_attn = False``), whose probabilities
    eager_maps reads."""
    eager = copy.deepcopy(model)
    for module in eager.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = False
    return eager


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
    eager = _unfused_copy(model)
    maps = eager_maps(eager, {"MaskUnitAttention"})
    with torch.no_grad():
        eager(pixels)
    check(maps, recorded, plain, LAYERS[q_pool], size)
    assert recorded[0].mad.shape == (5, 2, 8)


@pytest.mark.filterwarnings("ignore:indexing with dtype torch.uint8:UserWarning")
def test_timm_hiera_with_a_mask_not_bool_is_refused():
    model = _timm_hiera((64, 64))
    mask = torch.tensor([[1, 0, 1, 0]], dtype=torch.uint8)  # timm indexes its tokens with it as with a bool one
    with pytest.raises(ValueError, match=r"blocks\.0\.attn.*its mask is torch\.uint8; vitmad places the mask units "
                       "a bool mask keeps"), torch.no_grad(), vitmad.record(model):
        model.forward_features(torch.randn(1, 3, 64, 64), mask=mask)


def test_timm_hiera_masked_with_units_smaller_than_its_query_stride_is_refused_saying_why():
    # 4x4 mask units and three 2x2 query poolings: after two, each kept unit is one token, and the third groups
    # tokens of different units (anywhere on the image). timm runs it; vitmad refuses it, now with the cause and what
    # to do (QA 356: the refusal said only that the pooled tokens are not 2x2 cells).
    model = timm.create_model("hiera_tiny_224", pretrained=False, embed_dim=16, num_heads=1, stages=(1, 2, 1, 1),
                              img_size=(64, 64), mask_unit_size=(4, 4)).eval()
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[0, [0, 2, 3, 5, 6, 9, 12, 15]] = True
    mask[1, [1, 4, 7, 8, 10, 11, 13, 14]] = True
    with pytest.raises(ValueError, match=r"blocks\.4\.attn .*not 2x2 cells: with a mask, each kept mask unit is "
                       r"pooled .* build it with mask units at least as large as the total query stride"):
        with torch.no_grad(), vitmad.record(model):
            model(torch.randn(2, 3, 64, 64), mask=mask)


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


STATS = ["mad", "entropy", "prefix_mass", "self_mass"]


def masked_reference(probabilities: torch.Tensor, gh: int, gw: int, key_level: int, query_level: int,
                     kept: list[list[int]]) -> dict[str, torch.Tensor]:
    """Per statistic, ``[B, H, T]`` float64 on the row-major query grid (NaN at the dropped units' cells) of one
    Hiera layer of a masked call, image ``b`` keeping the mask units ``kept[b]``."""
    attn = probabilities.double() if probabilities.dim() == 5 else probabilities.double().unsqueeze(2)
    batch, heads, windows = attn.shape[:3]
    qh, qw = gh // 2**query_level, gw // 2**query_level
    out = {name: torch.full((batch, heads, qh * qw), float("nan"), dtype=torch.float64) for name in STATS}
    for b, units in enumerate(kept):
        keys = (sequence_cells(gh, gw, key_level, units) + 0.5) * 4 * 2**key_level
        query_cells = sequence_cells(gh, gw, query_level, units)
        queries = (query_cells + 0.5) * 4 * 2**query_level
        # Token t is in window t % nW, at place t // nW.
        key_positions = keys.view(-1, windows, 2).transpose(0, 1)
        positions = queries.view(-1, windows, 2).transpose(0, 1)
        p = attn[b]  # [H, nW, Nq, Nk]
        per_query = {
            "mad": (p * torch.cdist(positions, key_positions)).sum(-1),
            "entropy": -torch.special.xlogy(p, p).sum(-1),
            "prefix_mass": torch.zeros(p.shape[:-1], dtype=torch.float64),  # every token has a position
            # A pooled layer's keys are not its queries: no own token.
            "self_mass": p.diagonal(dim1=-2, dim2=-1) if key_level == query_level
            else torch.full(p.shape[:-1], float("nan"), dtype=torch.float64),
        }
        cells = query_cells.view(-1, windows, 2).transpose(0, 1).reshape(-1, 2).long()
        index = cells[:, 0] * qw + cells[:, 1]
        for name, values in per_query.items():
            out[name][b][:, index] = values.reshape(heads, -1)
    return out


def check_masked(maps, recorded, layers, size, kept, units):
    gh, gw = size[0] // 4, size[1] // 4
    rec, rec_tokens = recorded
    assert len(rec.per_layer) == len(layers) == len(maps)
    tokens = rec_tokens.calls[-1]
    for i, (key_level, query_level, heads, windowed) in enumerate(layers):
        if windowed:
            assert maps[i].shape[2] == len(kept[0])  # one window per kept mask unit
        expected = masked_reference(maps[i], gh, gw, key_level, query_level, kept)
        geometry = rec.geometry[i]
        stride = 4.0 * 2**query_level
        assert geometry.stride == (stride, stride) and geometry.heads == heads
        assert geometry.grid == (gh // 2**query_level, gw // 2**query_level)
        assert geometry.attention.startswith("mask units" if windowed else "global")
        assert geometry.attention.endswith(f"({len(kept[0])} of {units} mask units kept)")
        for name, values in expected.items():
            per_token = tokens.per_layer if name == "mad" else tokens.statistics[name]
            torch.testing.assert_close(per_token[i].double(), values, equal_nan=True, **TOL)
            mean = values.mean(-1) if name == "self_mass" and key_level != query_level else values.nanmean(-1)
            torch.testing.assert_close(rec.stats[name][i].double()[..., :heads], mean, equal_nan=True, **TOL)


MASKED = [((64, 64), 0.5), ((96, 128), 0.5), ((64, 64), 0.75), ((96, 128), 0.25)]
MASKED_IDS = ["square-half", "wide-half", "square-three-quarters", "wide-quarter"]


@pytest.mark.parametrize("size, mask_ratio", MASKED, ids=MASKED_IDS)
def test_timm_hiera_masked_keeps_each_unit_at_its_cells(size, mask_ratio):
    model = sharpened(_timm_hiera(size))
    units = (size[0] // 32) * (size[1] // 32)
    generator = torch.Generator().manual_seed(1)
    pixels = torch.randn(2, 3, *size, generator=generator)
    keep = int(units * (1 - mask_ratio))
    mask = torch.zeros(2, units, dtype=torch.bool)
    for b in range(2):
        mask[b, torch.randperm(units, generator=generator)[:keep]] = True
    kept = [mask[b].nonzero()[:, 0].tolist() for b in range(2)]
    assert kept[0] != kept[1]
    recorded = record_both_reductions(model, lambda m: m.forward_features(pixels, mask=mask), lambda x: x, STATS)
    eager = _unfused_copy(model)
    maps = eager_maps(eager, {"MaskUnitAttention"})
    with torch.no_grad():
        eager.forward_features(pixels, mask=mask)
    check_masked(maps, recorded, LAYERS[3], size, kept, units)


def _hf_pretraining(size, mask_ratio):
    torch.manual_seed(0)
    config = transformers.HieraConfig(embed_dim=16, image_size=list(size), num_heads=[1, 2, 4, 8],
                                      depths=[1, 1, 2, 1], num_query_pool=3, mask_ratio=mask_ratio,
                                      decoder_hidden_size=16, decoder_depth=1, decoder_num_heads=1)
    return sharpened(transformers.HieraForPreTraining(config))


@pytest.mark.parametrize("size, mask_ratio", MASKED, ids=MASKED_IDS)
def test_hf_hiera_pretraining_keeps_each_unit_at_its_cells(size, mask_ratio):
    model = _hf_pretraining(size, mask_ratio)
    units = (size[0] // 32) * (size[1] // 32)
    pixels = torch.randn(2, 3, *size)
    noise = torch.rand(units)
    noise = torch.stack([noise, 1 - noise])  # argsort(noise) keeps the smallest: the images keep other units
    run = lambda m: m(pixels, noise=noise)  # noqa: E731
    recorded = record_both_reductions(model, run, lambda out: out.logits, STATS)
    with torch.no_grad():
        bool_masked_pos = run(model).bool_masked_pos  # the model's own mask: True where a unit is kept
    kept = [bool_masked_pos[b].nonzero()[:, 0].tolist() for b in range(2)]
    assert len(kept[0]) == int(units * (1 - mask_ratio)) and kept[0] != kept[1]
    maps = attention_outputs(model, lambda m: type(m).__name__ == "HieraMaskUnitAttention" and m is not
                             model.decoder.decoder_block.layers[0].attn, lambda m: m(pixels, noise=noise,
                                                                                      output_attentions=True))
    check_masked(maps, recorded, LAYERS[3], size, kept, units)


def test_hf_hiera_pretraining_reads_the_mask_of_each_call():
    """Without ``noise`` the model draws a new mask in every call: each call is placed by its own."""
    model = _hf_pretraining((64, 96), 0.5)
    pixels = torch.randn(2, 3, 64, 96)
    masks, maps = [], []
    for module in model.hiera.modules():
        if type(module).__name__ == "HieraMaskUnitAttention":
            module.register_forward_hook(lambda m, a, out: maps.append(out[1].detach()))
    with torch.no_grad(), vitmad.record(model, stats=STATS, reduction="none") as rec:
        for seed in (1, 2):
            torch.manual_seed(seed)
            masks.append(model(pixels, output_attentions=True).bool_masked_pos)
    assert not torch.equal(masks[0], masks[1])
    for call, mask in enumerate(masks):
        kept = [mask[b].nonzero()[:, 0].tolist() for b in range(2)]
        for i, (key_level, query_level, _, _) in enumerate(LAYERS[3]):
            expected = masked_reference(maps[5 * call + i], 16, 24, key_level, query_level, kept)
            torch.testing.assert_close(rec.calls[call].per_layer[i].double(), expected["mad"], equal_nan=True,
                                       **TOL)


def test_timm_hiera_patch_drop_in_training_keeps_the_units_it_drew():
    """timm's ``patch_drop_rate`` draws the mask inside ``forward_features`` (``get_random_mask``) in training mode."""
    torch.manual_seed(0)
    model = timm.create_model("hiera_tiny_224", pretrained=False, img_size=(96, 128), embed_dim=16, num_heads=1,
                              stages=(1, 1, 2, 1), patch_drop_rate=0.5)
    model = sharpened(model).train()
    pixels = torch.randn(2, 3, 96, 128)

    def run(m):
        torch.manual_seed(1)
        return m(pixels)

    recorded = record_both_reductions(model, run, lambda x: x, STATS)
    eager = _unfused_copy(model)
    maps, masks, draw = eager_maps(eager, {"MaskUnitAttention"}), [], eager.get_random_mask
    eager.get_random_mask = lambda *args, **kwargs: masks.append(draw(*args, **kwargs)) or masks[-1]
    with torch.no_grad():
        run(eager)
    kept = [masks[0][b].nonzero()[:, 0].tolist() for b in range(2)]
    assert len(kept[0]) == 6 and kept[0] != kept[1]
    check_masked(maps, recorded, LAYERS[3], (96, 128), kept, 12)


# transformers' MAE decoder (HieraDecoder), named in layers=. Read from modeling_hiera: HieraDecoder.forward scatters
# the kept units' tokens into [B, U, uh, uw, C] (mask tokens elsewhere), and undo_windowing views the U units as
# their U_h x U_w grid, permutes to [B, U_h, uh, U_w, uw, C] and flattens: token n is cell divmod(n, gw') of the
# gh' x gw' grid, gh' = gh / 2**num_query_pool, each cell 4 * 2**num_query_pool pixels (patch stride 4, query
# stride 2 per pooling). Every cell is a token (a kept one or a mask token).
DECODER_STATS = ["mad", "entropy", "self_mass"]
DECODER = [((64, 96), 2, 0.5), ((96, 128), 3, 0.5), ((64, 96), 2, 0.75), ((96, 128), 2, 0.75)]


def _hf_decoder_model(size, num_query_pool, mask_ratio):
    torch.manual_seed(0)
    config = transformers.HieraConfig(embed_dim=16, image_size=list(size), num_heads=[1, 2, 4, 8],
                                      depths=[1, 1, 2, 1], num_query_pool=num_query_pool, mask_ratio=mask_ratio,
                                      decoder_hidden_size=16, decoder_depth=2, decoder_num_heads=2)
    return sharpened(transformers.HieraForPreTraining(config))


@pytest.mark.parametrize("size, num_query_pool, mask_ratio", DECODER,
                         ids=["half-two-poolings", "half-three-poolings", "three-quarters", "wide-three-quarters"])
def test_hf_hiera_pretraining_decoder_attends_every_cell_row_major(size, num_query_pool, mask_ratio):
    model = _hf_decoder_model(size, num_query_pool, mask_ratio)
    cell = 4 * 2**num_query_pool
    gh, gw = size[0] // cell, size[1] // cell
    unit = 8 // 2**num_query_pool  # an 8 x 8 mask unit of patches, pooled
    units_h, units_w = gh // unit, gw // unit
    pixels = torch.randn(2, 3, *size)
    noise = torch.rand(units_h * units_w)
    noise = torch.stack([noise, 1 - noise])
    run = lambda m: m(pixels, noise=noise)  # noqa: E731
    layers = ["decoder.decoder_block.layers.*.attn"]
    recorded = record_both_reductions(model, run, lambda out: out.logits, DECODER_STATS, layers=layers)
    rec, tokens = recorded[0], recorded[1].calls[-1]
    assert rec.layers == ["decoder.decoder_block.layers.0.attn", "decoder.decoder_block.layers.1.attn"]
    with torch.no_grad():
        out = run(model)
    # The decoder's own bool_masked_pos, undone as its tokens are: unit u's cells in the row-major grid.
    units = model.hiera.embeddings.patch_embeddings.random_masking(pixels, noise=noise)[0]
    on_grid = units.view(2, units_h, 1, units_w, 1).expand(2, units_h, unit, units_w, unit).reshape(2, -1)
    assert torch.equal(out.bool_masked_pos, on_grid) and 0 < int(on_grid[0].sum()) < gh * gw
    maps = attention_outputs(model, lambda m: m in [layer.attn for layer in model.decoder.decoder_block.layers],
                             lambda m: m(pixels, noise=noise, output_attentions=True))
    rows, cols = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    positions = (torch.stack([rows, cols], -1).reshape(-1, 2).double() + 0.5) * cell
    distance = torch.cdist(positions, positions)
    for i, p in enumerate(maps):
        assert p.shape == (2, 2, 1, gh * gw, gh * gw)
        p = p[:, :, 0]
        expected = {"mad": (p * distance).sum(-1), "entropy": -torch.special.xlogy(p, p).sum(-1),
                    "self_mass": p.diagonal(dim1=-2, dim2=-1)}
        geometry = rec.geometry[i]
        assert geometry.grid == (gh, gw) and geometry.stride == (cell, cell) and geometry.heads == 2
        for name, values in expected.items():
            per_token = tokens.per_layer if name == "mad" else tokens.statistics[name]
            torch.testing.assert_close(per_token[i].double(), values, **TOL)
            torch.testing.assert_close(rec.stats[name][i].double(), values.mean(-1), **TOL)


def test_hf_hiera_decoder_is_not_recorded_by_default():
    model = _hf_decoder_model((64, 96), 2, 0.5)
    with torch.no_grad(), vitmad.record(model) as rec:
        model(torch.randn(1, 3, 64, 96))
    assert not any(name.startswith("decoder.") for name in rec.layers) and len(rec.layers) == 5


def test_hf_hiera_decoder_run_outside_its_pretraining_forward_is_refused():
    model = _hf_decoder_model((64, 96), 2, 0.5)
    pixels = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        encoded = model.hiera(pixels)
    fused = torch.randn(2, 3, 2, 2, 128)  # 3 of the 6 mask units, 2 x 2 cells each, the encoder's 128 channels
    layers = ["decoder.decoder_block.layers.*.attn"]
    with torch.no_grad(), vitmad.record(model, layers=layers), pytest.raises(
            ValueError, match=r"decoder\.decoder_block\.layers\.0\.attn.*the patch embedding of the "
            "HieraForPreTraining's encoder did not run.*call the HieraForPreTraining itself"):
        model.decoder(fused, encoded.bool_masked_pos)
    with torch.no_grad(), vitmad.record(model.decoder), pytest.raises(
            ValueError, match="a HieraDecoder, recorded without the HieraForPreTraining around it"):
        model.decoder(fused, encoded.bool_masked_pos)
    # The decoder's blocks run in the model's forward, but not through the decoder, which lays out their tokens.
    block = model.decoder.decoder_block
    model.encoder_norm.register_forward_hook(lambda m, args, out: block(torch.randn(2, 24, 16)))
    with torch.no_grad(), vitmad.record(model, layers=layers), pytest.raises(
            ValueError, match=r"it ran outside the forward of decoder \(HieraDecoder\), which lays out its tokens"):
        model(pixels)


def test_hf_hiera_backbone_records_its_first_stage_and_refuses_its_pooled_queries_naming_it():
    # transformers' HieraBackbone runs its blocks on the row-major patch sequence, without the unroll: mask-unit
    # attention then takes token t into window t % nW, and a pooled query the maximum over tokens a quarter of the
    # sequence apart (no cell). The refusal named no way out (QA 366): it names the layers before the first pooling,
    # which record, placed row-major; all of them, however many, so that the list can be pasted.
    torch.manual_seed(0)
    config = transformers.HieraConfig(embed_dim=16, image_size=[64, 96], depths=[4, 1, 1, 1],
                                      num_heads=[2, 2, 4, 8], out_features=["stage4"])
    model = sharpened(transformers.HieraBackbone(config))
    pixels = torch.randn(2, 3, 64, 96)
    with torch.no_grad(), pytest.raises(ValueError, match=re.escape(
            "encoder.stages.1.layers.0.attn (HieraMaskUnitAttention) of HieraBackbone: it pools 4 tokens into each "
            "query, and HieraBackbone does not unroll its tokens (it runs its blocks on the row-major sequence), so "
            "the tokens a pooled query takes the maximum over lie far apart in the image and it stands for no cell; "
            "record the layers before the first pooling, layers=['encoder.stages.0.layers.0.attn', "
            "'encoder.stages.0.layers.1.attn', 'encoder.stages.0.layers.2.attn', 'encoder.stages.0.layers.3.attn'] "
            "(4 of them), or HieraModel")):
        with vitmad.record(model):
            model(pixels)
    layers = ["encoder.stages.0.layers.0.attn", "encoder.stages.0.layers.1.attn"]
    with torch.no_grad(), vitmad.record(model, layers=layers, reduction="none") as rec:
        model(pixels)
    maps = attention_outputs(model, lambda m: type(m).__name__ == "HieraMaskUnitAttention",
                             lambda m: m(pixels, output_attentions=True))[:2]
    gh, gw = 16, 24
    rows, cols = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    positions = (torch.stack([rows, cols], -1).reshape(-1, 2).double() + 0.5) * 4
    windows = (gh // 8) * (gw // 8)
    for i, p in enumerate(maps):
        assert p.shape == (2, 2, windows, gh * gw // windows, gh * gw // windows)
        mad = torch.empty(2, 2, gh * gw, dtype=torch.float64)
        for w in range(windows):
            members = positions[w::windows]  # window w: the row-major tokens t with t % nW == w, in order
            mad[..., w::windows] = (p[:, :, w] * torch.cdist(members, members)).sum(-1)
        assert rec.geometry[i].stride == (4.0, 4.0)
        torch.testing.assert_close(rec.per_layer[i].double(), mad, **TOL)
