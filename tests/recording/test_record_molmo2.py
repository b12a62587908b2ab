"""vitmad.record on Molmo2's vision tower (transformers ``Molmo2VisionModel``), alone and inside
``Molmo2ForConditionalGeneration``, placed by its family (families/molmo2.py).

The tower takes pre-cut patches, ``pixel_values [views, N, p * p * C]``, embeds them with a ``Linear`` and adds a
position table of ``N`` rows (``Molmo2VisionModel.forward``): no class token, no interpolation. The views come from
``Molmo2ImageProcessor``, built here offline with small sizes (56 px crops of 14 px patches, one patch of overlap on
each side, at most 4 crops): per image its global view (the whole image squashed to 56 x 56), then its overlapping
crops, each cut row-major into 4 x 4 patches (``batch_pixels_to_patches``). Each view is an image of its own.

The reference is the model's own eager attention probabilities (float32, captured from its modeling file's
``eager_attention_forward``, in float64), placed by geometry written here: token ``t`` of a view at row
``t // gw``, column ``t % gw`` of the config's grid ``(image_size[0] // p, image_size[1] // p)``, at the centre
``((row + 0.5) p, (col + 0.5) p)`` pixels of its view. Statistics as docs/definition.md ("Beside the distance"),
each averaged over the view's queries: every token has a position, so the prefix mass is 0.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import vitmad
from conftest import eager_attention_calls, sharpened

transformers = pytest.importorskip("transformers")
pytest.importorskip("torchvision")  # Molmo2ImageProcessor is a TorchvisionBackend
from transformers.models.molmo2 import image_processing_molmo2, modeling_molmo2, video_processing_molmo2  # noqa: E402

# Recorded float32 values against float64 on the eager float32 probabilities; MADs here are 5 to 40 px.
TOL = {"rtol": 1e-5, "atol": 1e-4}
PATCH = 14
CROP = 56  # 4 x 4 patches
LAYERS = ["layers.0.self_attn", "layers.1.self_attn"]
STATS = ["mad", "entropy", "prefix_mass", "self_mass"]
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
              num_key_value_heads=2, head_dim=16, patch_size=PATCH)
# Patch ids of the tiny text model's vocabulary (200 + 8 extra): the special tokens sit at its end.
IMAGE_PATCH_ID = 193


def _tower(image_size=(CROP, CROP), **config) -> torch.nn.Module:
    vision = transformers.Molmo2VisionConfig(**VISION, image_size=list(image_size), **config)
    return _sharper(sharpened(modeling_molmo2.Molmo2VisionModel(vision)))


def _sharper(model: torch.nn.Module) -> torch.nn.Module:
    """Queries and keys 2x larger than ``sharpened`` draws them: the pre-norm leaves the logits of so small a tower
    near uniform otherwise."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, modeling_molmo2.Molmo2VisionAttention):
                module.q_proj.weight.mul_(2.0)
                module.k_proj.weight.mul_(2.0)
    return model


def _processor_output() -> dict[str, torch.Tensor]:
    """Two images through ``Molmo2ImageProcessor``: 90 x 90 px (its global view, then 2 x 2 overlapping crops of a
    84 x 84 canvas) and 70 x 120 px (its global view, then 1 x 3 crops of a 56 x 112 canvas): 9 views of 4 x 4
    patches."""
    processor = image_processing_molmo2.Molmo2ImageProcessor(
        size={"height": CROP, "width": CROP}, patch_size=PATCH, overlap_margins=[1, 1], max_crops=4,
        pooling_size=[2, 2])
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (90, 90, 3), dtype=np.uint8), rng.integers(0, 256, (70, 120, 3), dtype=np.uint8)]
    inputs = processor(images=images, return_tensors="pt")
    assert inputs["image_num_crops"].tolist() == [5, 4]
    assert tuple(inputs["pixel_values"].shape) == (9, 16, PATCH * PATCH * 3)
    return dict(inputs)


def _positions(grid: tuple[int, int]) -> torch.Tensor:
    """``[gh * gw, 2]``: the view's patches row-major at their cell centres, in pixels of the view."""
    cells = [((r + 0.5) * PATCH, (c + 0.5) * PATCH) for r in range(grid[0]) for c in range(grid[1])]
    return torch.tensor(cells, dtype=torch.float64)


def _eager_probabilities(tower: torch.nn.Module, pixels: torch.Tensor) -> list[torch.Tensor]:
    """Every tower layer's eager probabilities ``[views, H, N, N]`` (float64) in one forward, in call order."""
    return [probabilities for _, probabilities in eager_attention_calls(modeling_molmo2, tower, pixels)]


def _reference(probabilities: torch.Tensor, grid: tuple[int, int]) -> dict[str, torch.Tensor]:
    """From one layer's probabilities ``[views, H, N, N]``: per head ``[views, H]`` statistics averaged over the
    view's queries, and the per-query MAD ``[views, H, N]``."""
    distance = torch.cdist(_positions(grid), _positions(grid))
    logs = torch.where(probabilities > 0, probabilities.log(), torch.zeros_like(probabilities))
    per_query = (probabilities * distance).sum(-1)
    return {"mad": per_query.mean(-1), "per_query": per_query,
            "entropy": -(probabilities * logs).sum(-1).mean(-1),
            "prefix_mass": torch.zeros(probabilities.shape[:2], dtype=torch.float64),
            "self_mass": probabilities.diagonal(dim1=-2, dim2=-1).mean(-1)}


def _check_statistics(rec, expected: list[dict[str, torch.Tensor]]) -> None:
    for stat in STATS:
        torch.testing.assert_close(rec.stats[stat].double(), torch.stack([e[stat] for e in expected]), **TOL,
                                   msg=lambda m, stat=stat: f"{stat}: {m}")


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_processor_views_are_each_placed_on_the_config_grid_and_match_eager_attention(attn_implementation):
    tower = _tower()
    pixels = _processor_output()["pixel_values"]
    probabilities = _eager_probabilities(tower, pixels)
    assert [p.shape for p in probabilities] == [(9, 2, 16, 16)] * 2
    expected = [_reference(p, (4, 4)) for p in probabilities]
    tower.set_attn_implementation(attn_implementation)
    with torch.no_grad():
        plain = tower(pixels).last_hidden_state
        with vitmad.record(tower, stats=[*STATS, "prefix_maps"]) as rec:
            recorded = tower(pixels).last_hidden_state
    assert torch.equal(plain, recorded)
    assert rec.layers == LAYERS and rec.skipped == {} and len(rec.calls) == 1
    for geometry in rec.geometry:
        assert (geometry.grid, geometry.stride, geometry.num_prefix_tokens, geometry.heads) == (
            (4, 4), (float(PATCH), float(PATCH)), 0, 2)
    assert rec.mad.shape == (2, 9, 2)  # layer x view x head
    _check_statistics(rec, expected)
    assert float(rec.stats["prefix_mass"].abs().max()) == 0.0
    assert rec.prefix_maps == [None, None]  # no token without a position
    # Far from uniform attention, so that a misplaced patch would show.
    assert float(torch.stack([e["entropy"] for e in expected]).max()) < 0.8 * math.log(16)


def test_per_query_values_fold_onto_a_non_square_config_grid_row_major():
    # image_size (42, 70): a 3 x 5 grid, the processors' row-major cut (batch_pixels_to_patches) of 42 x 70 px views.
    tower = _tower(image_size=(42, 70))
    torch.manual_seed(2)
    views = torch.rand(3, 42, 70, 3)
    pixels = views.reshape(3, 3, PATCH, 5, PATCH, 3).transpose(2, 3).reshape(3, 15, PATCH * PATCH * 3)
    expected = [_reference(p, (3, 5)) for p in _eager_probabilities(tower, pixels)]
    tower.set_attn_implementation("sdpa")
    with torch.no_grad(), vitmad.record(tower, reduction="none", stats=STATS) as rec:
        tower(pixels)
    assert [g.grid for g in rec.geometry] == [(3, 5)] * 2
    for values, e in zip(rec.per_layer, expected):
        assert values.shape == (3, 2, 15)
        torch.testing.assert_close(values.double(), e["per_query"], **TOL)
    # Far from uniform: a transposed (5 x 3) grid would move the reference MAD by about 9 px.
    assert float(torch.stack([e["entropy"] for e in expected]).max()) < 0.8 * math.log(15)
    with torch.no_grad(), vitmad.record(tower, stats=STATS) as rec:
        tower(pixels)
    _check_statistics(rec, expected)


def _full_model() -> torch.nn.Module:
    adapter = dict(vision_feature_layer=[-1, -2], hidden_size=32, num_attention_heads=2, num_key_value_heads=2,
                   head_dim=16, intermediate_size=64, text_hidden_size=32)
    text = dict(hidden_size=32, num_attention_heads=2, num_key_value_heads=1, head_dim=16, vocab_size=200,
                additional_vocab_size=8, num_hidden_layers=1, intermediate_size=64,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    config = transformers.Molmo2Config(
        vision_config={**VISION, "image_size": [CROP, CROP]}, adapter_config=adapter, text_config=text,
        image_start_token_id=190, low_res_image_start_token_id=191, image_end_token_id=192,
        image_patch_id=IMAGE_PATCH_ID, frame_start_token_id=194, frame_end_token_id=195)
    return _sharper(sharpened(modeling_molmo2.Molmo2ForConditionalGeneration(config)))


def _model_inputs() -> dict[str, torch.Tensor]:
    """The processor's output and a prompt with one patch token per pooled token (``image_grids``: per image the
    global view's pooled grid, then the crops' canvas's)."""
    inputs = _processor_output()
    grids = inputs["image_grids"]
    pooled = int((grids[:, 0] * grids[:, 1] + grids[:, 2] * grids[:, 3]).sum())
    inputs["input_ids"] = torch.tensor([[1, 2, *[IMAGE_PATCH_ID] * pooled, 3, 4]])
    return inputs


def _record_whole(model, inputs: dict):
    """The whole model recorded under sdpa, its logits bit-identical to a forward without recording."""
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        plain = model(**inputs).logits
        with vitmad.record(model, stats=STATS) as rec:
            recorded = model(**inputs).logits
    assert torch.equal(plain, recorded)
    return rec


def test_full_model_records_its_vision_tower_alone_one_row_per_view():
    model = _full_model()
    inputs = _model_inputs()
    tower = model.model.vision_tower
    expected = [_reference(p, (4, 4)) for p in _eager_probabilities(tower, inputs["pixel_values"])]
    rec = _record_whole(model, inputs)
    # Neither the adapter's pooling nor the language model: not recorded, not listed.
    assert rec.layers == ["model.vision_tower." + name for name in LAYERS] and rec.skipped == {}
    assert len(rec.calls) == 1 and rec.mad.shape == (2, 9, 2)
    _check_statistics(rec, expected)


def test_full_model_given_a_video_records_one_row_per_frame():
    # Molmo2VideoProcessor: each of the 3 frames resized to one 56 x 56 view (no crops), 4 x 4 patches row-major.
    processor = video_processing_molmo2.Molmo2VideoProcessor(size={"height": CROP, "width": CROP}, patch_size=PATCH,
                                                             pooling_size=[2, 2], do_sample_frames=False)
    video = np.random.default_rng(1).integers(0, 256, (3, 40, 60, 3), dtype=np.uint8)
    inputs = dict(processor(videos=[video], return_tensors="pt"))
    assert tuple(inputs["pixel_values_videos"].shape) == (3, 16, PATCH * PATCH * 3)
    inputs["input_ids"] = torch.tensor([[1, *[IMAGE_PATCH_ID] * inputs["video_token_pooling"].shape[0], 2]])
    model = _full_model()
    tower = model.model.vision_tower
    expected = [_reference(p, (4, 4)) for p in _eager_probabilities(tower, inputs["pixel_values_videos"])]
    rec = _record_whole(model, inputs)
    assert rec.layers == ["model.vision_tower." + name for name in LAYERS] and rec.mad.shape == (2, 3, 2)
    _check_statistics(rec, expected)


def test_generate_records_one_call_of_the_tower():
    model = _full_model()
    inputs = _model_inputs()
    model.set_attn_implementation("sdpa")
    with torch.no_grad(), vitmad.record(model) as rec:
        model(**inputs)
    with torch.no_grad(), vitmad.record(model) as rec_generate:
        model.generate(**inputs, max_new_tokens=3, do_sample=False, pad_token_id=0)
    # The tower runs in the first step alone; the later steps (the language model) start no call.
    assert len(rec_generate.calls) == 1
    assert torch.equal(rec_generate.mad, rec.mad)


def test_adapter_pooling_named_in_layers_is_skipped_with_its_reason():
    model = _full_model()
    inputs = _model_inputs()
    model.set_attn_implementation("sdpa")
    with torch.no_grad(), vitmad.record(model, layers=["model.vision_tower.layers.*.self_attn",
                                                       "model.multi_modal_projector.image_pooling_2d"]) as rec:
        model(**inputs)
    assert rec.layers == ["model.vision_tower." + name for name in LAYERS]
    reason = rec.skipped["model.multi_modal_projector.image_pooling_2d"]
    assert reason.startswith("Molmo2's adapter pooling") and "no position" in reason
    with pytest.raises(ValueError, match="Molmo2's adapter pooling"):
        vitmad.record(model.model.multi_modal_projector)


def test_layout_given_by_hand_wins_and_a_grid_other_than_the_configs_is_refused():
    tower = _tower(image_size=(42, 70))
    pixels = torch.rand(2, 15, PATCH * PATCH * 3)
    tower.set_attn_implementation("sdpa")
    with torch.no_grad():
        with vitmad.record(tower) as rec:
            tower(pixels)
        with vitmad.record(tower, patch=PATCH, grid=[3, 5]) as by_hand:
            tower(pixels)
        assert torch.equal(by_hand.mad, rec.mad)
        with vitmad.record(tower, grid=[5, 3], patch=PATCH), \
                pytest.raises(ValueError, match=r"the given grid=\[5, 3\] is not the 3x5 grid"):
            tower(pixels)


@pytest.mark.parametrize("given", [{"patch": PATCH}, {"grid": [3, 5]}, {"num_prefix_tokens": 0}])
def test_partial_layout_given_by_hand_is_refused_with_the_layout_vitmad_places(given):
    tower = _tower(image_size=(42, 70))
    tower.set_attn_implementation("sdpa")
    with pytest.raises(ValueError, match=r"layers\.0\.self_attn \(Molmo2VisionAttention\) of Molmo2VisionModel: "
                                         r"Molmo2's vision tower .*on the 3x5 grid of 14 px patches .*leave patch=, "
                                         r"grid= and num_prefix_tokens= unset, or give both patch=14 and "
                                         r"grid=\[3, 5\]"):
        with torch.no_grad(), vitmad.record(tower, **given):
            tower(torch.rand(1, 15, PATCH * PATCH * 3))


def test_views_it_cannot_place_are_refused_by_layer():
    tower = _tower()
    tower.set_attn_implementation("sdpa")
    # One patch per view: the model broadcasts it over its 16 position rows, which no view was cut into.
    with torch.no_grad(), vitmad.record(tower), pytest.raises(
            ValueError, match=r"layers\.0\.self_attn .*was given pixel_values \[2, 1, 588\]; vitmad places "
                              r"\[views, 16, 588\]"):
        tower(torch.rand(2, 1, PATCH * PATCH * 3))
    # A position table that is not the grid of image_size: which cell each row stands for is unknown.
    odd = _tower(image_size=(CROP, 70), num_position_embeddings=16)
    odd.set_attn_implementation("sdpa")
    with torch.no_grad(), vitmad.record(odd), pytest.raises(
            ValueError, match=r"num_position_embeddings=16, not the 4x5 = 20 patches"):
        odd(torch.rand(1, 16, PATCH * PATCH * 3))


def test_a_layer_run_outside_the_towers_forward_is_refused():
    tower = _tower()
    tower.set_attn_implementation("sdpa")
    with torch.no_grad(), vitmad.record(tower), pytest.raises(ValueError, match="outside a forward of"):
        tower.layers[0](torch.randn(1, 16, 32), None)
