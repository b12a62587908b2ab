"""vitmad.record on the towers fed ``flattened_patches`` (transformers Pix2Struct's vision encoder, alone and in
``Pix2StructForConditionalGeneration``; Kosmos-2.5's vision model): a batch of two images of different aspect ratios
through the model's own image processor (odd sizes, a small ``max_patches``, padding slots), against the statistics
of the model's own eager attention probabilities placed by geometry written here, float64.

The geometry, read from the processor's convention (``extract_flattened_patches``): column 0 of each slot is its row
id, column 1 its column id, both from 1; a padding slot is zeros, ids included, and ``attention_mask`` 0. The slot
with ids ``(r, c)`` is the patch at the centre of cell ``(r - 1, c - 1)`` of ``p x p`` pixels of the resized image;
the padding slots (mask 0, or ids ``(0, 0)``) have no position: neither query nor key, the attention on them is the
prefix mass. Image ``b``'s grid is its largest row id by its largest column id; per-token values lie on it
row-major, NaN past it.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

import vitmad  # noqa: E402
from conftest import eager_attention_calls, sharpened  # noqa: E402

# Recorded (float32 flash-MAD on q / k, or the fused op on float32 probabilities) vs float64 geometry on eager maps.
RECORD_TOL = {"rtol": 1e-5, "atol": 1e-4}  # atol in pixels, nats, mass
STATS = ["entropy", "prefix_mass", "self_mass"]
# Random images of odd sizes and different aspect ratios (height, width): the processor resizes the first to 6 x 3
# patches, the second to 2 x 8, within max_patches = 24 (padding slots in both).
SIZES = [(37, 23), (19, 61)]
MAX_PATCHES = 24


def _images() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in SIZES]


def _processed(patch: int = 16, max_patches: int = MAX_PATCHES, kosmos: bool = False, images=None) -> dict:
    cls = transformers.Kosmos2_5ImageProcessor if kosmos else transformers.Pix2StructImageProcessor
    processor = cls(patch_size={"height": patch, "width": patch}, max_patches=max_patches)
    out = processor(images=_images() if images is None else images, return_tensors="pt")
    return {"flattened_patches": out["flattened_patches"], "attention_mask": out["attention_mask"]}


def _vision_config(kosmos: bool, values: int) -> dict:
    common = dict(hidden_size=32, patch_embed_hidden_size=values, num_hidden_layers=2, num_attention_heads=2)
    if kosmos:
        return common | dict(intermediate_size=64, head_dim=16, max_num_patches=64)
    return common | dict(d_ff=64, d_kv=16, seq_len=64)


def _sharp(model: torch.nn.Module) -> torch.nn.Module:
    """:func:`sharpened`, with the query projections scaled back where the tower does not scale q.k (Pix2Struct's
    T5-style attention): attention far from uniform and far from one-hot."""
    sharpened(model)
    with torch.no_grad():
        for module in model.modules():
            if type(module).__name__ == "Pix2StructVisionAttention":
                module.query.weight.mul_(0.25)
    return model


def _tower(kind: str = "pix2struct", values: int = 768) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "kosmos":
        from transformers.models.kosmos2_5.modeling_kosmos2_5 import Kosmos2_5VisionModel

        return _sharp(Kosmos2_5VisionModel(transformers.Kosmos2_5VisionConfig(**_vision_config(True, values))))
    return _sharp(transformers.Pix2StructVisionModel(transformers.Pix2StructVisionConfig(**_vision_config(False,
                                                                                                          values))))


def _generator() -> torch.nn.Module:
    config = transformers.Pix2StructConfig(
        vision_config=_vision_config(False, 768),
        text_config=dict(hidden_size=32, d_ff=64, d_kv=16, num_layers=1, num_heads=2, vocab_size=50))
    torch.manual_seed(0)
    return _sharp(transformers.Pix2StructForConditionalGeneration(config))


def _eager_maps(kind: str, model: torch.nn.Module, inputs: dict) -> list[torch.Tensor]:
    """``[B, H, N, N]`` float64 probabilities of each vision layer, from the modeling file's eager function."""
    modeling = (transformers.models.kosmos2_5.modeling_kosmos2_5 if kind == "kosmos"
                else transformers.models.pix2struct.modeling_pix2struct)
    vision = "Kosmos2_5VisionAttention" if kind == "kosmos" else "Pix2StructVisionAttention"
    calls = eager_attention_calls(modeling, model, **inputs)
    return [probabilities for module, probabilities in calls if type(module).__name__ == vision]


def _cells(inputs: dict, mask_free: bool = False) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per image, ``(slots, rows, cols)`` of its patches: the slots with mask 1 and ids not (0, 0), their 0-based
    row and column (ids - 1). ``mask_free``: the model's default mask, flattened_patches.sum(-1) != 0."""
    patches = inputs["flattened_patches"].double().numpy()
    mask = (patches.sum(-1) != 0) if mask_free else inputs["attention_mask"].numpy() != 0
    out = []
    for b in range(patches.shape[0]):
        ids = patches[b, :, :2]
        slots = np.nonzero(mask[b] & ~(ids == 0).all(-1))[0]
        out.append((slots, ids[slots, 0].astype(int) - 1, ids[slots, 1].astype(int) - 1))
    return out


def _reference(maps, cells, patch: int) -> tuple[dict, list[tuple[int, int]]]:
    """Per statistic, ``[L, B, H, T]`` float64 per-token values on each image's grid (row-major, NaN past it and at
    cells without a patch), and the grids."""
    grids = [(int(rows.max()) + 1, int(cols.max()) + 1) for _, rows, cols in cells]
    longest = max(h * w for h, w in grids)
    layers, batch, heads = len(maps), len(cells), maps[0].shape[1]
    out = {name: np.full((layers, batch, heads, longest), np.nan) for name in ["mad", *STATS]}
    for layer, probabilities in enumerate(maps):
        for b, (slots, rows, cols) in enumerate(cells):
            a = probabilities[b].numpy()  # [H, N, N]
            centres = (np.stack([rows, cols], -1) + 0.5) * patch
            distance = np.sqrt(((centres[:, None] - centres[None]) ** 2).sum(-1))
            rows_of_queries = a[:, slots]  # [H, n, N]
            unplaced = np.setdiff1d(np.arange(a.shape[-1]), slots)
            logs = np.where(rows_of_queries > 0, np.log(np.where(rows_of_queries > 0, rows_of_queries, 1)), 0)
            values = {
                "mad": (rows_of_queries[:, :, slots] * distance).sum(-1),
                "entropy": -(rows_of_queries * logs).sum(-1),
                "prefix_mass": rows_of_queries[:, :, unplaced].sum(-1),
                "self_mass": rows_of_queries[:, np.arange(len(slots)), slots],
            }
            cell = rows * grids[b][1] + cols
            for name, v in values.items():
                out[name][layer, b][:, cell] = v
    return out, grids


def _check(rec, rec_tokens, expected: dict, grids, patch: int) -> None:
    same = len(set(grids)) == 1
    for geometry in rec.geometry:
        assert geometry.stride == (float(patch), float(patch)) and geometry.num_prefix_tokens == 0
        assert geometry.grid == (grids[0] if same else None)
        assert geometry.image_grids == (None if same else tuple(grids))
    for name, values in expected.items():
        np.testing.assert_allclose(rec.stats[name].double().numpy(), np.nanmean(values, -1), **RECORD_TOL)
        per_token = rec_tokens.calls[-1].per_layer if name == "mad" else rec_tokens.calls[-1].statistics[name]
        np.testing.assert_allclose(torch.stack(list(per_token)).double().numpy(), values, equal_nan=True,
                                   **RECORD_TOL)


def _record(model, inputs: dict, output: str = "last_hidden_state", **kwargs) -> tuple:
    """``(mean recording, per-token recording)`` with the statistics; the output unchanged by recording, bit for
    bit."""
    with torch.no_grad():
        plain = getattr(model(**inputs), output)
        with vitmad.record(model, stats=STATS, **kwargs) as rec:
            recorded = getattr(model(**inputs), output)
        with vitmad.record(model, stats=STATS, reduction="none", **kwargs) as rec_tokens:
            model(**inputs)
    assert torch.equal(plain, recorded)
    return rec, rec_tokens


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_pix2struct_processor_batch_equals_its_eager_attention_placed_by_the_ids(implementation):
    model = _tower()
    model.set_attn_implementation(implementation)
    inputs = _processed()
    rec, rec_tokens = _record(model, inputs)
    expected, grids = _reference(_eager_maps("pix2struct", model, inputs), _cells(inputs), 16)
    assert grids == [(6, 3), (2, 8)]  # different aspect ratios; 18 and 16 of the 24 slots, padding after
    assert rec.layers == ["encoder.layer.0.attention", "encoder.layer.1.attention"] and not rec.skipped
    _check(rec, rec_tokens, expected, grids, 16)
    assert rec.mad.shape == (2, 2, 2) and rec_tokens.per_layer[0].shape == (2, 2, 18)
    # Far from uniform (ln of 18 or 16 patches: 2.9, 2.8 nats) and far from one-hot, so a misplaced token shows.
    assert 0.5 < float(np.nanmean(expected["entropy"])) < 2.3
    # The padding keys are masked: no mass on them.
    np.testing.assert_allclose(rec.stats["prefix_mass"].double().numpy(), 0, atol=1e-6)


def test_pix2struct_generator_records_its_encoder_alone_also_in_generate():
    model = _generator()
    inputs = _processed()
    decoder = {"decoder_input_ids": torch.zeros(2, 3, dtype=torch.long)}
    rec, rec_tokens = _record(model, inputs | decoder, output="logits")
    assert rec.layers == ["encoder.encoder.layer.0.attention", "encoder.encoder.layer.1.attention"]
    maps = _eager_maps("pix2struct", model, inputs | decoder)
    expected, grids = _reference(maps, _cells(inputs), 16)
    _check(rec, rec_tokens, expected, grids, 16)
    # generate() runs the encoder without the model's forward, then the decoder step by step: one call.
    model.set_attn_implementation("sdpa")
    with torch.no_grad(), vitmad.record(model) as rec_generate:
        model.generate(**inputs, max_new_tokens=3)
    assert len(rec_generate.calls) == 1
    torch.testing.assert_close(rec_generate.mad, rec.mad, rtol=1e-5, atol=1e-4)


def test_kosmos_2_5_vision_model_equals_its_eager_attention_placed_by_the_ids():
    """Kosmos-2.5's vision attention always runs its own eager function (it looks its implementation up with getattr
    on ALL_ATTENTION_FUNCTIONS): recorded through its softmax, with its own processor's output."""
    model = _tower("kosmos")
    inputs = _processed(kosmos=True)
    rec, rec_tokens = _record(model, inputs)
    expected, grids = _reference(_eager_maps("kosmos", model, inputs), _cells(inputs), 16)
    assert grids == [(6, 3), (2, 8)]
    _check(rec, rec_tokens, expected, grids, 16)
    assert 0.5 < float(np.nanmean(expected["entropy"])) < 2.3


def test_kosmos_2_5_generator_records_its_vision_model_alone():
    """Kosmos2_5Model hands its vision model flattened_patches without a mask (its attention_mask is the text's):
    the tower's default mask, flattened_patches.sum(-1) != 0, is read."""
    config = transformers.Kosmos2_5Config(
        vision_config=_vision_config(True, 768), latent_query_num=4,
        text_config=dict(embed_dim=32, ffn_dim=64, layers=1, attention_heads=2, vocab_size=64))
    torch.manual_seed(0)
    model = _sharp(transformers.Kosmos2_5ForConditionalGeneration(config))
    patches = _processed(kosmos=True)["flattened_patches"]
    image_slots = torch.zeros(2, 8, dtype=torch.long)
    image_slots[:, 1:5] = 1  # the latent queries' places among the text tokens
    inputs = {"flattened_patches": patches, "input_ids": torch.randint(4, 64, (2, 8)),
              "image_embeds_position_mask": image_slots, "attention_mask": torch.ones(2, 8, dtype=torch.long)}
    rec, rec_tokens = _record(model, inputs, output="logits")
    assert rec.layers == ["vision_model.encoder.layer.0.attention", "vision_model.encoder.layer.1.attention"]
    expected, grids = _reference(_eager_maps("kosmos", model, inputs),
                                 _cells({"flattened_patches": patches}, mask_free=True), 16)
    _check(rec, rec_tokens, expected, grids, 16)


def test_without_an_attention_mask_the_towers_default_is_read():
    model = _tower()
    inputs = _processed()
    with torch.no_grad(), vitmad.record(model) as rec:
        model(**inputs)
        model(flattened_patches=inputs["flattened_patches"])
    assert torch.equal(rec.calls[0].mad, rec.calls[1].mad)


def test_slots_in_any_order_are_placed_by_their_ids():
    """The ids alone place a patch: the slots shuffled (mask with them) give each token the same value at its cell,
    and the tower's output shuffled alike."""
    model = _tower()
    inputs = _processed()
    order = torch.randperm(MAX_PATCHES, generator=torch.Generator().manual_seed(3))
    shuffled = {k: v[:, order] for k, v in inputs.items()}
    with torch.no_grad(), vitmad.record(model, reduction="none") as rec:
        out = model(**inputs).last_hidden_state
        out_shuffled = model(**shuffled).last_hidden_state
    torch.testing.assert_close(out_shuffled, out[:, order], rtol=1e-5, atol=1e-5)
    for first, second in zip(rec.calls[0].per_layer, rec.calls[1].per_layer, strict=True):
        torch.testing.assert_close(second, first, rtol=1e-5, atol=1e-4, equal_nan=True)
    expected, grids = _reference(_eager_maps("pix2struct", model, shuffled), _cells(shuffled), 16)
    np.testing.assert_allclose(torch.stack(rec.calls[1].per_layer).double().numpy(), expected["mad"],
                               equal_nan=True, **RECORD_TOL)


def test_an_image_alone_equals_the_same_image_in_a_padded_batch():
    model = _tower()
    with torch.no_grad(), vitmad.record(model) as rec:
        model(**_processed())
        alone = []
        for image in _images():
            model(**_processed(images=[image]))
            alone.append(rec.mad[:, 0])
    batched = rec.calls[0].mad
    for i in range(len(SIZES)):
        torch.testing.assert_close(batched[:, i], alone[i], rtol=1e-5, atol=1e-4)


def test_a_cell_without_a_patch_is_nan_and_left_out_of_the_mean():
    """A patch taken out (its slot's mask 0): its cell has no token; the others keep their cells of the full grid."""
    model = _tower()
    inputs = _processed()
    inputs["attention_mask"][0, 4] = 0  # image 0's patch (2, 2), in the middle of its 6 x 3 grid
    rec, rec_tokens = _record(model, inputs)
    expected, grids = _reference(_eager_maps("pix2struct", model, inputs), _cells(inputs), 16)
    assert grids == [(6, 3), (2, 8)] and np.isnan(expected["mad"][:, 0, :, 4]).all()
    _check(rec, rec_tokens, expected, grids, 16)


def test_padding_a_users_mask_leaves_visible_is_no_key():
    """attention_mask all ones: the tower attends the zero slots, ids (0, 0), like patches; they stand for no place
    on the image, so their attention drops out like a prefix token's (docs/definition.md)."""
    model = _tower()
    inputs = _processed()
    inputs["attention_mask"] = torch.ones_like(inputs["attention_mask"])
    rec, rec_tokens = _record(model, inputs)
    expected, grids = _reference(_eager_maps("pix2struct", model, inputs), _cells(inputs), 16)
    assert float(np.nanmean(expected["prefix_mass"])) > 0.01
    _check(rec, rec_tokens, expected, grids, 16)


def test_patch_is_read_from_the_processors_default_else_given_else_refused():
    model = _tower(values=3 * 4 * 4)
    inputs = _processed(patch=4)
    with pytest.raises(ValueError, match=r"Pix2StructVisionModel embeds patches of 48 values .* not the 768 = "
                                         r"3 x 16 x 16 .*pass patch=<pixels per side"):
        vitmad.record(model)
    with pytest.raises(ValueError, match=r"patch=5 does not fit Pix2StructVisionModel: .* takes 48"):
        vitmad.record(model, patch=5)
    # 48 values divide by 2 x 2 (12 channels): no RGB patch of that side, accepted once with the MAD off (QA 324).
    with pytest.raises(ValueError, match=r"patch=2 does not fit Pix2StructVisionModel: its image processor cuts RGB "
                                         r"patches, of 3 x 2 x 2 = 12 values at that side, but .* takes 48"):
        vitmad.record(model, patch=2)
    rec, rec_tokens = _record(model, inputs, patch=4)
    expected, grids = _reference(_eager_maps("pix2struct", model, inputs), _cells(inputs), 4)
    _check(rec, rec_tokens, expected, grids, 4)
    # patch= given for a 768-input tower is its RGB side, 16, the default: any other was taken, its distances scaled.
    default = _tower()
    inputs = _processed()
    with torch.no_grad():
        with vitmad.record(default) as rec:
            default(**inputs)
        with vitmad.record(default, patch=16) as rec16:
            default(**inputs)
    assert torch.equal(rec16.mad, rec.mad)
    with pytest.raises(ValueError, match=r"patch=8 does not fit .* 3 x 8 x 8 = 192 values .* takes 768"):
        vitmad.record(default, patch=8)
    with pytest.warns(UserWarning, match=r"grid=\[2, 2\] given, but no recorded layer"):
        vitmad.record(default, grid=[2, 2])


def _refused(inputs: dict, match: str) -> None:
    model = _tower()
    with pytest.raises(ValueError, match=r"encoder\.layer\.0\.attention \(Pix2StructVisionAttention\) of "
                                         r"Pix2StructVisionModel: " + match):
        with torch.no_grad(), vitmad.record(model):
            model(**inputs)


def test_ids_it_cannot_place_are_refused():
    inputs = _processed()
    repeated = {k: v.clone() for k, v in inputs.items()}
    repeated["flattened_patches"][1, 3, :2] = repeated["flattened_patches"][1, 2, :2]
    _refused(repeated, r"image 1 of the batch has two patches with the same row and column ids .*16 patches on 15")
    zero_based = {k: v.clone() for k, v in inputs.items()}
    zero_based["flattened_patches"][..., :2] -= zero_based["attention_mask"][..., None]  # the patches' ids from 0
    _refused(zero_based, r"slot 1 of image 0 is a patch \(attention_mask 1\) with row id 0 and column id 1; .*"
                         r"0-based ids\?")
    fractional = {k: v.clone() for k, v in inputs.items()}
    fractional["flattened_patches"][0, 5, 0] = 2.5
    _refused(fractional, r"slot 5 of image 0 is a patch .* row id 2\.5 and column id 3")
    half = {k: v.clone() for k, v in inputs.items()}
    half["attention_mask"][0, 0] = 0.5
    _refused(half, r"Pix2StructVisionModel got an attention_mask with values other than 0 and 1")
    empty = {k: v.clone() for k, v in inputs.items()}
    empty["attention_mask"][1] = 0
    _refused(empty, r"image 1 of the batch has no patch")


def test_the_tower_alone_starts_its_calls_and_stats_all_has_no_prefix_maps():
    model = _tower()
    with torch.no_grad(), vitmad.record(model, stats="all") as rec:
        model(**_processed())
    assert rec.prefix_maps == [None, None]
    assert math.isfinite(float(rec.stats["entropy"].mean()))
