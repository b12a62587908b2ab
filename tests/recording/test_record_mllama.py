"""vitmad.record on Mllama's vision tower (Llama 3.2 Vision: transformers ``MllamaVisionModel``, also inside
``MllamaForConditionalGeneration``), placed by its family (families/mllama.py).

Geometry, from transformers 5.25's ``image_processing_mllama.py`` and ``modeling_mllama.py``: the processor resizes
an image onto a canvas of ``R x C`` tiles of ``TILE`` px and cuts it row-major (``split_to_tiles``: tile ``t`` at tile
row ``t // C``, column ``t % C``); ``aspect_ratio_ids`` is ``1 +`` the index of ``(R, C)`` in
``get_all_supported_aspect_ratios(4)`` (``LAYOUTS`` below), 0 for an empty media slot; ``aspect_ratio_mask`` marks
the first ``R * C`` tile slots (tile 0 of an empty slot too). The tower puts a class token before each tile's
``4 x 4`` patches of ``PATCH`` px and pads each tile to ``LENGTH = 24`` tokens (17 up to a multiple of 8), then both
its ``transformer`` and its ``global_transformer`` attend over all ``4 * 24`` tokens of a media slot.

The reference is the model's own eager attention probabilities (its modeling file's ``eager_attention_forward``, in
float64), placed by geometry written here: patch ``(r, c)`` of tile ``t`` at ``((t // C) * TILE + (r + 0.5) PATCH,
(t % C) * TILE + (c + 0.5) PATCH)``; class tokens, padding tokens and padding tiles without a position; each image's
values in canvas row-major order (sorted by position here). Statistics per docs/definition.md: the entropy and the
prefix mass over the whole row (the model's mask leaves every padding token visible to an image query: the prefix
mass is the attention on class tokens, padding tokens and padding tiles); the prefix maps are the rows of the four
tile slots' class tokens over the canvas, NaN for the tiles an image does not have.
"""

from __future__ import annotations

import math

import pytest
import torch

import vitmad
from conftest import FLOAT32_STAT_ATOL, eager_attention_calls, sharpened

transformers = pytest.importorskip("transformers")
from transformers.models.mllama import modeling_mllama  # noqa: E402

# Recorded float32 values against float64 on the eager float32 probabilities; MADs here are 10 to 40 px.
TOL = {"rtol": 1e-5, "atol": 1e-4}
PATCH, TILE, TILES = 8, 32, 4
SIDE = TILE // PATCH
LENGTH = 24
LAYOUTS = [(1, 1), (1, 2), (1, 3), (1, 4), (2, 1), (2, 2), (3, 1), (4, 1)]  # (tile rows, tile columns)
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_global_layers=1, attention_heads=2,
              image_size=TILE, patch_size=PATCH, max_num_tiles=TILES, intermediate_layers_indices=[0],
              vision_output_dim=64)
LAYERS = ["transformer.layers.0.self_attn", "transformer.layers.1.self_attn", "global_transformer.layers.0.self_attn"]
STATS = ("mad", "entropy", "prefix_mass", "self_mass")


def _sharp(model: torch.nn.Module) -> torch.nn.Module:
    """``sharpened``, with queries and keys 3x larger (its pre-norm leaves the logits of so small a tower near
    uniform otherwise) and the gates open: the tile embeddings (pre and post, per aspect ratio) and the tile position
    embedding count, and each tile's tokens differ from the same cell of another tile."""
    model = sharpened(model)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, modeling_mllama.MllamaVisionAttention):
                module.q_proj.weight.mul_(2)
                module.k_proj.weight.mul_(2)
            if isinstance(module, (modeling_mllama.MllamaPrecomputedAspectRatioEmbedding,
                                   modeling_mllama.MllamaPrecomputedPositionEmbedding)):
                module.gate.fill_(0.8)
    return model


def _tower() -> torch.nn.Module:
    torch.manual_seed(0)
    return _sharp(modeling_mllama.MllamaVisionModel(transformers.MllamaVisionConfig(**VISION)))


def _inputs(layouts: list[list[tuple[int, int] | None]], seed: int = 1) -> dict:
    """pixel_values, aspect_ratio_ids and aspect_ratio_mask as the processor lays them out: per sample its media
    slots, a layout or None (an empty slot); padding tiles and empty slots zero."""
    torch.manual_seed(seed)
    batch, media = len(layouts), max(len(row) for row in layouts)
    pixels = torch.zeros(batch, media, TILES, 3, TILE, TILE)
    ids = torch.zeros(batch, media, dtype=torch.long)
    mask = torch.zeros(batch, media, TILES, dtype=torch.long)
    mask[:, :, 0] = 1
    for b, row in enumerate(layouts):
        for m, layout in enumerate(row):
            if layout is None:
                continue
            count = layout[0] * layout[1]
            pixels[b, m, :count] = torch.rand(count, 3, TILE, TILE)
            ids[b, m] = LAYOUTS.index(layout) + 1
            mask[b, m, :count] = 1
    return {"pixel_values": pixels, "aspect_ratio_ids": ids, "aspect_ratio_mask": mask}


def _positions(layout: tuple[int, int] | None, misplaced: bool = False) -> torch.Tensor:
    """``[TILES * LENGTH, 2]`` canvas pixel position of each token of a media slot, NaN rows for the rest; with
    ``misplaced``, the tiles in reverse order on the canvas (what a wrong tile order would measure)."""
    positions = torch.full((TILES * LENGTH, 2), float("nan"), dtype=torch.float64)
    if layout is not None:
        rows, cols = layout
        for t in range(rows * cols):
            at = rows * cols - 1 - t if misplaced else t
            for k in range(SIDE * SIDE):
                positions[t * LENGTH + 1 + k] = torch.tensor(
                    [(at // cols) * TILE + (k // SIDE + 0.5) * PATCH, (at % cols) * TILE + (k % SIDE + 0.5) * PATCH])
    return positions


def _canvas_order(positions: torch.Tensor) -> torch.Tensor:
    """The tokens with a position, in canvas row-major order (by row, then column)."""
    placed = (~positions[:, 0].isnan()).nonzero().squeeze(-1)
    return placed[(positions[placed, 0] * 1e4 + positions[placed, 1]).argsort()]


def _reference(probabilities: torch.Tensor, slots: list, misplaced: bool = False) -> dict[str, torch.Tensor]:
    """From one layer's probabilities ``[S, H, N, N]`` and each media slot's layout: per slot and head the
    statistics over its positioned queries, the per-query MAD ``[S, H, T]`` and the class tokens' maps ``[S, H, 4,
    T]`` on each canvas, NaN past an image's own canvas and at the tiles it does not have."""
    longest = max(0 if s is None else s[0] * s[1] * SIDE * SIDE for s in slots)
    heads = probabilities.shape[1]
    out = {stat: torch.full((len(slots), heads), float("nan"), dtype=torch.float64) for stat in STATS}
    out["per_query"] = torch.full((len(slots), heads, longest), float("nan"), dtype=torch.float64)
    out["prefix_maps"] = torch.full((len(slots), heads, TILES, longest), float("nan"), dtype=torch.float64)
    for s, layout in enumerate(slots):
        if layout is None:
            continue
        positions = _positions(layout, misplaced)
        order = _canvas_order(positions)
        unplaced = positions[:, 0].isnan()
        rows = probabilities[s][:, order]  # [H, T_s, N]
        keys = rows[:, :, order]
        logs = torch.where(rows > 0, rows.log(), torch.zeros_like(rows))
        per_query = (keys * torch.cdist(positions[order], positions[order])).sum(-1)
        out["mad"][s] = per_query.mean(-1)
        out["entropy"][s] = -(rows * logs).sum(-1).mean(-1)
        out["prefix_mass"][s] = rows[..., unplaced].sum(-1).mean(-1)
        out["self_mass"][s] = keys.diagonal(dim1=-2, dim2=-1).mean(-1)
        out["per_query"][s, :, :order.numel()] = per_query
        tiles = layout[0] * layout[1]
        classes = torch.arange(tiles) * LENGTH
        out["prefix_maps"][s, :, :tiles, :order.numel()] = probabilities[s][:, classes][:, :, order]
    return out


def _eager(model: torch.nn.Module, inputs: dict) -> list[torch.Tensor]:
    return [p for _, p in eager_attention_calls(modeling_mllama, model, **inputs)]


CASES = {
    "one 2x2 image": [[(2, 2)]],
    "1x2 and 2x1 images": [[(1, 2)], [(2, 1)]],
    "media slots of 2x2, 1x1, 1x3 and none": [[(2, 2), (1, 1)], [(1, 3), None]],
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_tiles_are_placed_on_their_canvas_and_match_eager_attention(case, attn_implementation):
    model = _tower()
    layouts = CASES[case]
    slots = [layout for row in layouts for layout in row + [None] * (max(map(len, layouts)) - len(row))]
    inputs = _inputs(layouts)
    probabilities = _eager(model, inputs)
    assert [p.shape for p in probabilities] == [(len(slots), 2, TILES * LENGTH, TILES * LENGTH)] * 3
    expected = [_reference(p, slots) for p in probabilities]
    model.set_attn_implementation(attn_implementation)
    with torch.no_grad():
        plain = model(**inputs).last_hidden_state
        with vitmad.record(model, stats=[*STATS, "prefix_maps"]) as rec:
            recorded = model(**inputs).last_hidden_state
        with vitmad.record(model, reduction="none") as per_token:
            model(**inputs)
    assert torch.equal(plain, recorded)
    assert rec.layers == LAYERS and rec.skipped == {}
    grids = tuple((0, 0) if s is None else (s[0] * SIDE, s[1] * SIDE) for s in slots)
    for geometry in rec.geometry:
        assert geometry.stride == (float(PATCH), float(PATCH)) and geometry.num_prefix_tokens is None
        assert (geometry.grid, geometry.image_grids) == ((grids[0], None) if len(set(grids)) == 1 else (None, grids))
    for stat in STATS:
        torch.testing.assert_close(rec.stats[stat].double(), torch.stack([e[stat] for e in expected]), **TOL,
                                   equal_nan=True, msg=lambda m, stat=stat: f"{stat}: {m}")
    for values, maps, e in zip(per_token.per_layer, rec.prefix_maps, expected):
        torch.testing.assert_close(values.double(), e["per_query"], **TOL, equal_nan=True)
        torch.testing.assert_close(maps.double(), e["prefix_maps"], rtol=1e-5, atol=FLOAT32_STAT_ATOL, equal_nan=True)
    # Far from uniform attention (ln 96 = 4.56 nats over a slot's tokens), so that a misplaced tile would show.
    assert float(torch.stack([e["entropy"] for e in expected]).nan_to_num().max()) < 0.75 * math.log(TILES * LENGTH)
    # The tiles attend to each other: the tiles in another order on the canvas would measure other distances.
    misplaced = torch.stack([_reference(p, slots, misplaced=True)["mad"] for p in probabilities])
    assert float((misplaced - torch.stack([e["mad"] for e in expected])).abs().nan_to_num().max()) > 1.0


def test_full_model_records_its_vision_tower_alone():
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=2, vocab_size=128, cross_attention_layers=[1], pad_token_id=0, bos_token_id=1,
                eos_token_id=2)
    config = transformers.MllamaConfig(vision_config=VISION, text_config=text, image_token_index=100)
    torch.manual_seed(0)
    model = _sharp(transformers.MllamaForConditionalGeneration(config))
    layouts = [[(1, 2)], [(2, 2)]]
    inputs = _inputs(layouts)
    ids = torch.tensor([[1, 100, 5, 6, 7], [1, 100, 8, 9, 10]])
    cross = inputs["aspect_ratio_mask"][:, None].expand(2, 5, 1, TILES)  # every text token sees the image's tiles
    expected = torch.stack([_reference(p, [(1, 2), (2, 2)])["mad"] for p in _eager(model.model.vision_model, inputs)])
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        plain = model(input_ids=ids, cross_attention_mask=cross, **inputs).logits
        with vitmad.record(model) as rec:
            recorded = model(input_ids=ids, cross_attention_mask=cross, **inputs).logits
    assert torch.equal(plain, recorded)
    assert rec.layers == ["model.vision_model." + name for name in LAYERS] and rec.skipped == {}
    assert rec.geometry[0].image_grids == ((SIDE, 2 * SIDE), (2 * SIDE, 2 * SIDE))
    torch.testing.assert_close(rec.mad.double(), expected, **TOL)


@pytest.mark.parametrize("ids, mask, match", [
    ([[6]], [[[1, 1, 0, 0]]], r"media slot 0 \(image 0, media 0\) has aspect_ratio_id 6, a 2x2 tile layout, so vitmad "
                              r"expects its first 4 of 4 tile slots marked in aspect_ratio_mask, but the mask is "
                              r"\[1, 1, 0, 0\]"),
    ([[2]], [[[1, 1, 1, 0]]], r"aspect_ratio_id 2, a 1x2 tile layout, so vitmad expects its first 2 of 4 tile slots "
                              r"marked in aspect_ratio_mask, but the mask is \[1, 1, 1, 0\]"),
])
def test_layouts_it_cannot_read_are_refused(ids, mask, match):
    model = _tower()
    model.set_attn_implementation("sdpa")
    pixels = torch.rand(1, 1, TILES, 3, TILE, TILE)
    with torch.no_grad(), vitmad.record(model), \
            pytest.raises(ValueError, match=r"transformer\.layers\.0\.self_attn.*" + match + ".*pass positions="):
        model(pixel_values=pixels, aspect_ratio_ids=torch.tensor(ids), aspect_ratio_mask=torch.tensor(mask))


def test_a_supported_list_other_than_the_processors_is_refused():
    torch.manual_seed(0)
    config = transformers.MllamaVisionConfig(**VISION, supported_aspect_ratios=[[1, 1], [2, 1], [1, 2], [2, 2]])
    model = modeling_mllama.MllamaVisionModel(config).eval()
    with torch.no_grad(), vitmad.record(model), \
            pytest.raises(ValueError, match=r"supported_aspect_ratios \[\[1, 1\], \[2, 1\], \[1, 2\], \[2, 2\]\] are "
                                            r"not the list MllamaImageProcessor numbers aspect_ratio_ids by"):
        model(**_inputs([[(1, 2)]]))


def test_encoder_alone_is_refused():
    model = _tower()
    model.set_attn_implementation("sdpa")
    hidden = torch.randn(1, TILES * LENGTH, 32)
    mask = torch.zeros(1, 1, TILES * LENGTH, TILES * LENGTH)  # without one, SDPA takes the module for causal
    with torch.no_grad(), vitmad.record(model), \
            pytest.raises(ValueError, match=r"Mllama's vision model \(MllamaVisionModel\) did not run in this call"):
        model.transformer(hidden, attention_mask=mask)
    with pytest.raises(ValueError, match=r"recorded without the MllamaVisionModel that tiles the image"), \
            torch.no_grad(), vitmad.record(model.transformer):
        model.transformer(hidden, attention_mask=mask)



def test_tiles_the_patch_does_not_divide_are_refused():
    """36 px tiles of 8 px patches: the tower's convolution drops the last 4 px of each tile, so the patches of one
    tile do not continue the grid of the one before it."""
    torch.manual_seed(0)
    model = modeling_mllama.MllamaVisionModel(transformers.MllamaVisionConfig(**{**VISION, "image_size": 36})).eval()
    inputs = {"pixel_values": torch.rand(1, 1, TILES, 3, 36, 36), "aspect_ratio_ids": torch.tensor([[6]]),
              "aspect_ratio_mask": torch.ones(1, 1, TILES, dtype=torch.long)}
    with torch.no_grad(), vitmad.record(model), \
            pytest.raises(ValueError, match=r"got tiles of 36x36 pixels, which its 8 px patches do not divide"):
        model(**inputs)


@pytest.mark.parametrize("height, width, layout", [(32, 64, (1, 2)), (64, 32, (2, 1)), (64, 64, (2, 2)),
                                                   (96, 32, (3, 1))])
def test_the_processor_cuts_its_canvas_into_tiles_row_major(height, width, layout):
    """The geometry above, read off MllamaImageProcessor itself: an image already of a canvas' size is cut, not
    resized; tile t is the canvas' tile (t // C, t % C), and its id is 1 + the index of (R, C) in LAYOUTS."""
    pytest.importorskip("torchvision")
    processor = transformers.MllamaImageProcessor(size={"height": TILE, "width": TILE}, max_image_tiles=TILES,
                                                  do_rescale=False, do_normalize=False)
    torch.manual_seed(0)
    image = torch.rand(3, height, width) * 255
    out = processor(images=[[image]], return_tensors="pt")
    rows, cols = layout
    assert out["aspect_ratio_ids"].tolist() == [[LAYOUTS.index(layout) + 1]]
    assert out["aspect_ratio_mask"].tolist() == [[[1] * (rows * cols) + [0] * (TILES - rows * cols)]]
    for t in range(rows * cols):
        tile = image[:, (t // cols) * TILE:(t // cols + 1) * TILE, (t % cols) * TILE:(t % cols + 1) * TILE]
        assert torch.equal(out["pixel_values"][0, 0, t], tile)
    assert not out["pixel_values"][0, 0, rows * cols:].any()
