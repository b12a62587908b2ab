"""vitmad.record on the newest of Hugging Face diffusers' (0.42.1) image diffusion transformers: Flux3 (per-mode
blocks, then joint single blocks), Krea2 (one position_ids tensor over the caption and the image), Ideogram4 (one
sequence of padding, caption and image), PRX and NucleusMoE (the image's queries alone, the caption's keys beside
the image's); the ones vitmad does not place refused by name with their reason.

The reference, the sharpening and the checks are those of test_record_diffusers_images.py: the float64 softmax of
every ``F.scaled_dot_product_attention`` the model's processors call (through ``dispatch_attention_fn``'s native
backend), from the ``q``, ``k`` and mask they give it, placed by geometry written here from diffusers' source, in
latent pixels of the transformer's input:

- ``Flux3Transformer2DModel``: the latent packed 2 x 2 (the Flux3 modular pipeline's ``[B, 128, H / 16, W / 16]``
  tokens, row-major), ``img_ids`` ``(0, 0.5 row, 0.5 column, 0)`` (``_prepare_image_ids``, ``image_rope_scale``
  0.5). ``txt_mode_blocks`` attend over the caption alone (skipped), ``mode_blocks["image"]`` over the image alone,
  the single blocks over ``cat([caption, image])``.
- ``Krea2Transformer2DModel``: packed 2 x 2 (``Krea2Pipeline._pack_latents``, ``patch_size`` 2), ``position_ids``
  the caption's ``(0, 0, 0)`` then the image's ``(0, row, column)`` (``prepare_position_ids``); its blocks attend over
  ``cat([caption, image])``, its ``text_fusion`` over the caption alone (skipped).
- ``Ideogram4Transformer2DModel``: each row ``[padding][caption][image]`` (``Ideogram4Pipeline._prepare_ids``), the
  image packed 2 x 2 at ``IMAGE_POSITION_OFFSET + (0, row, column)``; the padding in a segment of its own.
- ``PRXTransformer2DModel``: ``img2seq`` cuts the latent ``[B, C, H, W]`` into whole ``patch_size`` patches,
  row-major; ``PRXAttnProcessor2_0``'s queries are the image's, its keys ``cat([caption, image])``.
- ``NucleusMoEImageTransformer2DModel``: packed ``patch_size`` x ``patch_size`` (``NucleusMoEImagePipeline
  ._pack_latents``) on the ``(1, rows, columns)`` of ``img_shapes``; queries the image's, keys ``cat([image,
  caption])``.
"""

from __future__ import annotations

import math

import pytest
import torch
from test_record_diffusers_images import STAT_TOL, TOL, _attention_maps, _check, _positions, _record, _sharpen

import vitmad
from conftest import grid_centres

diffusers = pytest.importorskip("diffusers")


def _flux3():
    torch.manual_seed(0)
    return _sharpen(diffusers.Flux3Transformer2DModel(
        in_channels=16, cond_in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=12, timestep_channels=16, mlp_ratio=2.0,
        axes_dims_rope=(2, 2, 2, 2)))


def _flux3_ids(rows: int, columns: int, last: int = 0) -> torch.Tensor:
    # The Flux3 modular pipeline's _prepare_image_ids: cartesian_prod(t, h, w, l), h and w times 0.5; a reference
    # image's l is -(1 + its index).
    ids = torch.cartesian_prod(torch.arange(1), torch.arange(rows), torch.arange(columns), torch.tensor([last]))
    ids = ids.float()
    ids[:, 1:3] *= 0.5
    return ids


def _flux3_inputs(rows: int, columns: int, text: int, **extra) -> dict:
    return {"hidden_states": torch.randn(2, rows * columns, 16), "encoder_hidden_states": torch.randn(2, text, 12),
            "timestep": torch.tensor([0.7, 0.7]), "img_ids": _flux3_ids(rows, columns),
            "txt_ids": torch.cartesian_prod(*[torch.arange(1)] * 3, torch.arange(text)).float(), **extra}


def test_flux3_mode_blocks_and_single_blocks_two_steps(monkeypatch):
    model = _flux3()
    rows, columns, text = 3, 5, 4
    inputs = _flux3_inputs(rows, columns, text)
    steps = [torch.tensor([0.9, 0.9]), torch.tensor([0.2, 0.2])]

    def run_steps():
        return [model(**{**inputs, "timestep": t}) for t in steps][-1]

    maps, spied = _attention_maps(monkeypatch, run_steps)
    rec, rec_tokens = _record(model, run_steps, spied)
    assert rec.layers == ["mode_blocks.image.0.attn", "single_transformer_blocks.0.attn"]
    assert list(rec.skipped) == ["txt_mode_blocks.0.attn"] and "caption's tokens alone" in rec.skipped[
        "txt_mode_blocks.0.attn"]
    assert len(rec.calls) == 2
    # Per call: txt_mode_blocks (the caption alone), mode_blocks["image"] (the image alone), the single block.
    assert [m.shape[-1] for m in maps] == [text, 15, text + 15] * 2
    grid = (rows, columns)
    for call in range(2):
        image_maps = maps[3 * call + 1: 3 * call + 3]
        for layer, (probabilities, before) in enumerate(zip(image_maps, (0, text))):
            _check(rec.calls[call], rec_tokens.calls[call], layer, probabilities, _positions(grid, 2.0, before, 0),
                   grid, 2.0, before, 0)
    assert not torch.equal(rec.calls[0].mad, rec.calls[1].mad)


def test_flux3_refuses_reference_images():
    model = _flux3()
    # A Flux3 image-to-image call: the reference image's tokens join the single blocks after the image's.
    inputs = _flux3_inputs(2, 2, 3, image_cond_hidden_states=torch.randn(2, 4, 16),
                           image_cond_ids=_flux3_ids(2, 2, last=-1))
    with torch.no_grad(), vitmad.record(model), pytest.raises(ValueError, match="Flux3's reference images"):
        model(**inputs)


def test_flux3_refuses_ids_of_another_grid():
    model = _flux3()
    inputs = _flux3_inputs(2, 3, 3, img_ids=_flux3_ids(3, 2))  # 6 tokens, but named on a 3 x 2 grid the wrong way
    inputs["img_ids"] = inputs["img_ids"][torch.tensor([0, 2, 4, 1, 3, 5])]  # column-major
    with torch.no_grad(), vitmad.record(model), pytest.raises(ValueError, match="not the row-major grid"):
        model(**inputs)


def _krea2():
    torch.manual_seed(0)
    model = _sharpen(diffusers.Krea2Transformer2DModel(
        in_channels=16, num_layers=2, attention_head_dim=8, num_attention_heads=2, num_key_value_heads=1,
        intermediate_size=32, timestep_embed_dim=16, text_hidden_dim=12, num_text_layers=2,
        text_num_attention_heads=2, text_num_key_value_heads=2, text_intermediate_size=32,
        num_layerwise_text_blocks=1, num_refiner_text_blocks=1, axes_dims_rope=(2, 2, 4)))
    with torch.no_grad():
        for block in model.transformer_blocks:
            block.attn.norm_q.weight.fill_(5.0)  # Krea2RMSNorm scales by 1 + weight (zero as built): logits x 6
    return model


def _krea2_position_ids(text: int, rows: int, columns: int, first: float = 0.0) -> torch.Tensor:
    # Krea2Pipeline.prepare_position_ids: the caption's rows zero, then the image's (0, row, column), row-major.
    image = torch.cartesian_prod(torch.tensor([first]), torch.arange(rows).float(), torch.arange(columns).float())
    return torch.cat([torch.zeros(text, 3), image])


def test_krea2_caption_first_padding_masked(monkeypatch):
    model = _krea2()
    rows, columns, text = 5, 3, 4
    kept = torch.ones(2, text, dtype=torch.bool)
    kept[0, -1] = False  # the caption's padding (Krea2Pipeline's prompt mask)
    inputs = {"hidden_states": torch.randn(2, rows * columns, 16), "encoder_hidden_states": torch.randn(2, text, 2, 12),
              "timestep": torch.tensor([0.5, 0.5]), "position_ids": _krea2_position_ids(text, rows, columns),
              "encoder_attention_mask": kept}

    def run():
        return model(**inputs)

    maps, spied = _attention_maps(monkeypatch, run)
    rec, rec_tokens = _record(model, run, spied)
    assert rec.layers == ["transformer_blocks.0.attn", "transformer_blocks.1.attn"]
    assert set(rec.skipped) == {"text_fusion.layerwise_blocks.0.attn", "text_fusion.refiner_blocks.0.attn"}
    # text_fusion: over each token's 2 encoder layers, then over the caption; the blocks over [caption, image].
    joint = [m for m in maps if m.shape[-1] == text + rows * columns]
    assert len(joint) == 2 and len(maps) == 4
    grid = (rows, columns)
    for layer, probabilities in enumerate(joint):
        assert float(probabilities[0, :, :, text - 1].abs().max()) == 0.0  # the padding token is no key
        _check(rec.calls[0], rec_tokens.calls[0], layer, probabilities, _positions(grid, 2.0, text, 0), grid, 2.0,
               text, 0)


def test_krea2_refuses_position_ids_it_does_not_know():
    model = _krea2()
    inputs = {"hidden_states": torch.randn(1, 4, 16), "encoder_hidden_states": torch.randn(1, 3, 2, 12),
              "timestep": torch.tensor([0.5]), "position_ids": _krea2_position_ids(3, 2, 2, first=1.0)}
    with torch.no_grad(), vitmad.record(model), pytest.raises(ValueError, match="Krea2's img_ids"):
        model(**inputs)


def _ideogram4():
    torch.manual_seed(0)
    return _sharpen(diffusers.Ideogram4Transformer2DModel(
        in_channels=16, num_layers=2, attention_head_dim=8, num_attention_heads=2, intermediate_size=32, adaln_dim=16,
        llm_features_dim=12, rope_theta=10_000, mrope_section=(2, 1, 1)))


def _ideogram4_inputs(lengths: list[int], width: int, rows: int, columns: int) -> dict:
    """Ideogram4Pipeline._prepare_ids: per row ``[padding][caption][image]``, the caption's positions (i, i, i), the
    image's IMAGE_POSITION_OFFSET + (0, row, column), the padding in segment -1; the caption's features and the
    image's latents each zero at the other's places."""
    from diffusers.models.transformers import transformer_ideogram4 as ideogram

    image = rows * columns
    length = width + image
    positions = torch.zeros(len(lengths), length, 3, dtype=torch.long)
    segments = torch.full((len(lengths), length), ideogram.SEQUENCE_PADDING_INDICATOR, dtype=torch.long)
    indicator = torch.zeros(len(lengths), length, dtype=torch.long)
    latents, features = torch.zeros(len(lengths), length, 16), torch.zeros(len(lengths), length, 12)
    grid = torch.cartesian_prod(torch.arange(1), torch.arange(rows), torch.arange(columns))
    for b, text in enumerate(lengths):
        start = width - text
        positions[b, start:width] = torch.arange(text)[:, None]
        positions[b, width:] = grid + ideogram.IMAGE_POSITION_OFFSET
        indicator[b, start:width], indicator[b, width:] = ideogram.LLM_TOKEN_INDICATOR, ideogram.OUTPUT_IMAGE_INDICATOR
        segments[b, start:] = 1
        features[b, start:width], latents[b, width:] = torch.randn(text, 12), torch.randn(image, 16)
    return {"hidden_states": latents, "encoder_hidden_states": features, "timestep": torch.tensor([0.5, 0.5]),
            "position_ids": positions, "segment_ids": segments, "indicator": indicator}


def test_ideogram4_padding_and_caption_first(monkeypatch):
    model = _ideogram4()
    rows, columns, width = 3, 5, 5
    inputs = _ideogram4_inputs([5, 3], width, rows, columns)  # the second prompt's 2 slots of left padding

    def run():
        return model(**inputs)

    maps, spied = _attention_maps(monkeypatch, run)
    rec, rec_tokens = _record(model, run, spied)
    assert rec.layers == ["layers.0.attention", "layers.1.attention"] and rec.skipped == {}
    grid = (rows, columns)
    for layer, probabilities in enumerate(maps):
        assert float(probabilities[1, :, width:, :2].abs().max()) == 0.0  # the image sees no padding
        _check(rec.calls[0], rec_tokens.calls[0], layer, probabilities, _positions(grid, 2.0, width, 0), grid, 2.0,
               width, 0)


def test_ideogram4_refuses_image_tokens_not_at_the_end():
    model = _ideogram4()
    inputs = _ideogram4_inputs([3], 3, 2, 2)
    order = torch.tensor([3, 4, 5, 6, 0, 1, 2])  # the image first: no layout Ideogram4Pipeline makes
    inputs = {k: v[:, order] if k != "timestep" else v[:1] for k, v in inputs.items()}
    with torch.no_grad(), vitmad.record(model), pytest.raises(ValueError, match="not all at its end"):
        model(**inputs)


def _check_image_queries(mean, tokens, layer: int, probabilities, grid, stride: float, caption: int,
                         first: bool) -> None:
    """Layer ``layer`` against its map ``[B, H, Nq, Nk]`` whose queries are the ``grid``'s patches alone (row-major)
    and whose keys are those patches and ``caption`` tokens without a position, ``first`` or last."""
    probabilities = probabilities.double()
    cells = grid_centres(grid, stride)
    nan = torch.full((caption, 2), math.nan, dtype=torch.float64)
    keys = torch.cat([nan, cells] if first else [cells, nan])
    placed = ~keys[:, 0].isnan()
    mad = (probabilities[..., placed] * torch.cdist(cells, keys[placed])).sum(-1)
    entropy = -torch.special.xlogy(probabilities, probabilities).sum(-1)
    prefix_mass = probabilities[..., ~placed].sum(-1)
    assert float(entropy.mean()) < 0.75 * math.log(probabilities.shape[-1])  # far from uniform
    geometry = mean.geometry[layer]
    assert geometry.grid == grid and geometry.stride == (stride, stride)
    torch.testing.assert_close(tokens.per_layer[layer].double(), mad, **TOL)
    torch.testing.assert_close(mean.per_layer[layer].double(), mad.mean(-1), **TOL)
    for stat, expected in (("entropy", entropy), ("prefix_mass", prefix_mass)):
        torch.testing.assert_close(tokens.statistics[stat][layer].double(), expected, **STAT_TOL)
        torch.testing.assert_close(mean.statistics[stat][layer].double(), expected.mean(-1), **STAT_TOL)


def _prx():
    torch.manual_seed(0)
    return _sharpen(diffusers.PRXTransformer2DModel(
        in_channels=4, patch_size=2, context_in_dim=12, hidden_size=32, mlp_ratio=2.0, num_heads=2, depth=2,
        axes_dim=(8, 8)))


@pytest.mark.parametrize("size", [(10, 6), (6, 14)])  # 5 x 3 and 3 x 7 patches of 2 x 2 latent pixels
def test_prx_image_queries_caption_keys_first(monkeypatch, size):
    model = _prx()
    text = 4
    kept = torch.ones(2, text, dtype=torch.bool)
    kept[1, -2:] = False  # PRXPipeline's prompt mask: the second caption's padding
    inputs = {"hidden_states": torch.randn(2, 4, *size), "timestep": torch.tensor([0.4, 0.4]),
              "encoder_hidden_states": torch.randn(2, text, 12), "attention_mask": kept}

    def run():
        return model(**inputs)

    maps, spied = _attention_maps(monkeypatch, run)
    rec, rec_tokens = _record(model, run, spied)
    assert rec.layers == ["blocks.0.attention", "blocks.1.attention"] and rec.skipped == {}
    grid = (size[0] // 2, size[1] // 2)
    for layer, probabilities in enumerate(maps):
        assert probabilities.shape[-2:] == (grid[0] * grid[1], text + grid[0] * grid[1])
        assert float(probabilities[1, :, :, text - 2:text].abs().max()) == 0.0  # the padding is no key
        _check_image_queries(rec.calls[0], rec_tokens.calls[0], layer, probabilities, grid, 2.0, text, first=True)


def _nucleus_moe(patch: int = 2):
    torch.manual_seed(0)
    return _sharpen(diffusers.NucleusMoEImageTransformer2DModel(
        patch_size=patch, in_channels=4 * patch * patch, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=12, axes_dims_rope=(2, 2, 4), moe_enabled=False, num_experts=2, moe_intermediate_dim=16))


def _nucleus_inputs(rows: int, columns: int, text: int, patch: int, shapes) -> dict:
    kept = torch.ones(2, text, dtype=torch.bool)
    kept[0, -1] = False  # the caption's padding (NucleusMoEImagePipeline's prompt mask)
    return {"hidden_states": torch.randn(2, rows * columns, 4 * patch * patch), "img_shapes": shapes,
            "encoder_hidden_states": torch.randn(2, text, 12), "encoder_hidden_states_mask": kept,
            "timestep": torch.tensor([0.3, 0.3])}


@pytest.mark.parametrize("patch", [2, 1])
def test_nucleus_moe_image_queries_caption_keys_last(monkeypatch, patch):
    model = _nucleus_moe(patch)
    rows, columns, text = 3, 5, 4
    # NucleusMoEImagePipeline: img_shapes = [(1, rows, columns)] * batch, its latents packed patch x patch, row-major.
    inputs = _nucleus_inputs(rows, columns, text, patch, [(1, rows, columns)] * 2)

    def run():
        return model(**inputs)

    maps, spied = _attention_maps(monkeypatch, run)
    rec, rec_tokens = _record(model, run, spied)
    assert rec.layers == ["transformer_blocks.0.attn", "transformer_blocks.1.attn"] and rec.skipped == {}
    for layer, probabilities in enumerate(maps):
        assert probabilities.shape[-2:] == (rows * columns, rows * columns + text)
        assert float(probabilities[0, :, :, -1].abs().max()) == 0.0  # the padding token is no key
        _check_image_queries(rec.calls[0], rec_tokens.calls[0], layer, probabilities, (rows, columns), float(patch),
                             text, first=False)


def test_nucleus_moe_refuses_several_images():
    model = _nucleus_moe()
    inputs = _nucleus_inputs(2, 3, 3, 2, [[(1, 1, 3), (1, 1, 3)]] * 2)
    with torch.no_grad(), vitmad.record(model), pytest.raises(ValueError, match="NucleusMoE's img_shapes"):
        model(**inputs)


def _bria_fibo2():
    torch.manual_seed(0)
    return _sharpen(diffusers.BriaFibo2Transformer2DModel(
        in_channels=4, patch_size=2, dim=32, n_layers=2, n_refiner_layers=1, n_heads=2, cap_feat_dim=12,
        injection_layer_ids=(1,), perceiver_num_layers=1, min_num_gist_tokens=4, max_num_gist_tokens=8, gist_step=4,
        gist_min_text_len=4, gist_max_text_len=16, axes_dims=(4, 6, 6), axes_lens=(64, 32, 32)))


@pytest.mark.parametrize("lengths", [(16, 16), (4, 16)])  # one gist count: gist first; two: padded, gist last
def test_bria_fibo2_gist_tokens_first_or_last(monkeypatch, lengths):
    model = _bria_fibo2()
    kept = torch.arange(16)[None] < torch.tensor(lengths)[:, None]
    # BriaFibo2Pipeline: the latent [B, C, H, W], the caption's bundles [B, 1 + injections, T, D] and its mask.
    inputs = {"hidden_states": torch.randn(2, 4, 10, 6), "timestep": torch.tensor([0.5, 0.5]),
              "encoder_hidden_states": torch.randn(2, 2, 16, 12), "encoder_attention_mask": kept}

    def run():
        return model(**inputs)

    maps, spied = _attention_maps(monkeypatch, run)
    rec, rec_tokens = _record(model, run, spied)
    assert rec.layers == ["noise_refiner.0.attention", "layers.0.attention", "layers.1.attention"]
    assert set(rec.skipped) == {"perceiver.layers.0.cross_attention", "perceiver.layers.0.self_attention",
                                "layers.1.cross_attention"}
    # compute_gist_count: 8 gist tokens for 16 caption tokens, 4 for 4; the batch pads the 4 to 8.
    gist, grid = 8, (5, 3)
    image_maps = [m for m in maps if m.shape[-1] in (15, 15 + gist) and m.shape[-2] == m.shape[-1]]
    assert [m.shape[-1] for m in image_maps] == [15, 23, 23]
    before, after = (gist, 0) if lengths[0] == lengths[1] else (0, gist)
    for layer, probabilities in enumerate(image_maps):
        b, a = (0, 0) if layer == 0 else (before, after)
        if after and layer:
            assert float(probabilities[0, :, :, -4:].abs().max()) == 0.0  # the first entry's 4 padded gist tokens
        _check(rec.calls[0], rec_tokens.calls[0], layer, probabilities, _positions(grid, 2.0, b, a), grid, 2.0, b, a)


def test_bria_fibo2_refuses_images_to_edit():
    model = _bria_fibo2()
    inputs = {"hidden_states": torch.randn(1, 4, 4, 4), "timestep": torch.tensor([0.5]),
              "encoder_hidden_states": torch.randn(1, 2, 4, 12), "context_latents": [torch.randn(1, 4, 4, 4)]}
    with torch.no_grad(), vitmad.record(model), pytest.raises(ValueError, match="images to edit"):
        model(**inputs)


def _qwen_image21():
    return diffusers.QwenImage21Transformer2DModel(
        patch_size=1, in_channels=4, out_channels=4, num_layers=1, attention_head_dim=16, num_attention_heads=2,
        context_in_dim=12, mlp_ratio=2, axes_dims_rope=(4, 6, 6)), {
        "hidden_states": torch.randn(1, 16, 4), "encoder_hidden_states": torch.randn(1, 3, 12),
        "timestep": torch.tensor([0.6]), "img_shapes": [[(1, 4, 4)]],
        "img_mask": torch.tensor([[False] * 3 + [True] * 4])}


def _dreamlite():
    return diffusers.DreamLiteTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=16, norm_num_groups=4, cross_attention_dim=12), {
        "hidden_states": torch.randn(1, 16, 4, 4), "encoder_hidden_states": torch.randn(1, 3, 12),
        "timestep": torch.tensor([500])}


@pytest.mark.parametrize(("build", "reason"), [
    (_qwen_image21, "block-causal and runs in several calls per layer"),
    (_dreamlite, "over one of that UNet's feature maps"),
])
def test_image_transformers_refused_with_their_reason(build, reason):
    torch.manual_seed(0)
    model, inputs = build()
    name = type(model).__name__
    with torch.no_grad(), vitmad.record(model), pytest.raises(ValueError, match=f"{name} yet: .*{reason}"):
        model(**inputs)
