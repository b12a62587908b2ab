"""vitmad.record on the SAM encoders of DeepSeek-OCR-2 (``DeepseekOcr2SamVisionEncoder``) and Unlimited-OCR
(``UnlimitedOcrSamVisionEncoder``), alone and inside their vision models and full models.

Their attention (eager and SDPA) and block classes are SAM's ``SamVisionAttention``, ``SamVisionSdpaAttention`` and
``SamVisionLayer`` copied by transformers' modular converter (renamed, same code): each block pads its ``H x W``
token map at the bottom and right to a multiple of its window, partitions it into windows in row-major window
order, tokens row-major within a window, and attends within each window, or, in a global block
(``global_attn_indexes``), over the whole map; the padding is not masked. The eager class computes its own softmax
over ``[B * windows * heads, N, N]`` (batch, then window, then head) and returns it as its second output, which is
the reference here (for the SDPA class too: the same weights loaded into the eager class). A padding slot is a key
at its cell of the padded grid, past the image edge, and no query (docs/definition.md, windows). Tokens are
``patch_size`` pixels apart.

Unlike SAM's, their patch embedding takes any image size (80 x 56 px: a 10 x 7 map) and the absolute position
embedding (8 x 8 here) is resized to the map the convolution made, a value per cell: the grid is the
convolution's. Padding comes from a map the window does not divide (10 x 7 in windows of 4: 12 x 8), or one window
larger than the map (10 x 10 in one window of 14).

The second tower runs on the SAM projector's map, whose two convolutions (kernel 3, stride 2, padding 1: ``ceil(n /
2)`` of ``n``, twice) make cells of 4 x 4 patches (32 px here): Unlimited-OCR's is a CLIP encoder over a class token,
then that map row-major; DeepSeek-OCR-2's a Qwen2 decoder over that map row-major, then learned queries (144 up to
144 map tokens, else 256), its mask bidirectional over the map and causal over the queries (``block_sequence_ids``).
A recording of the vision model or the whole model places both towers: the map tokens at the centres of their
cells, the class token and the learned queries without a position (their rows the prefix maps). The full model given
local crops (``pixel_values_local``) runs the vision model on the global views, then on the crops, of another size:
each run is its own entry of ``rec.calls``, on its own maps. The geometry is written here from the modeling files,
the reference is each model's own eager probabilities.
"""

from __future__ import annotations

import pytest
import torch

import vitmad
from conftest import (
    attention_outputs,
    check_sam_windows,
    eager_attention_calls,
    padded_window_reference,
    record_both_reductions,
    sharpened,
)

transformers = pytest.importorskip("transformers")

TOL = {"rtol": 1e-5, "atol": 1e-4}  # float32 probabilities, float32 accumulation in the ops
# prefix_mass: no SAM token lacks a position (a padding key has its cell past the edge), so it is 0 there.
STATS = ["entropy", "self_mass", "prefix_mass"]
HEADS, BATCH, PATCH = 2, 2, 8
# Blocks 0 and 2 windowed, block 1 global; the projector's convolutions take 16 to 32 channels, the second tower's.
SAM = dict(hidden_size=32, output_channels=16, num_hidden_layers=3, num_attention_heads=HEADS, image_size=64,
           patch_size=PATCH, global_attn_indexes=[1], mlp_dim=64, downsample_channels=[16, 32])
# name -> (image height, image width, window)
SIZES = {"padded-10x7-in-4": (80, 56, 4), "one-window-14-over-10x10": (80, 80, 14), "whole-8x8-in-4": (64, 64, 4)}


def _modeling(name: str):
    return pytest.importorskip(f"transformers.models.{name}.modeling_{name}")


# name -> (modeling module, class prefix)
FAMILIES = {"deepseek_ocr2": ("deepseek_ocr2", "DeepseekOcr2"), "unlimited_ocr": ("unlimited_ocr", "UnlimitedOcr")}


def _sam_encoder(name: str, window: int, implementation: str) -> torch.nn.Module:
    module, prefix = FAMILIES[name]
    config = getattr(transformers, f"{prefix}SamVisionConfig")(**SAM, window_size=window)
    return getattr(_modeling(module), f"{prefix}SamVisionEncoder")._from_config(
        config, attn_implementation=implementation)


def _random_tables(model: torch.nn.Module) -> torch.nn.Module:
    """Sharpened attention (conftest), random relative-position tables and absolute position embeddings (zeros at
    init), and random convolutions (std 1e-10 at init: every image would give the same tokens), so that a token at a
    wrong place, a head in a wrong slot or one image's values given to another change the values."""
    sharpened(model)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "rel_pos" in name or name.endswith("pos_embed") or "position_embedding" in name:
                parameter.normal_()
        for module in model.modules():
            if isinstance(module, torch.nn.Conv2d):
                module.weight.normal_(std=0.25)
    return model


def _eager_twin(model: torch.nn.Module, build_eager) -> torch.nn.Module:
    """``model``'s weights in the eager attention classes (the SDPA classes return no probabilities)."""
    eager = build_eager()
    eager.load_state_dict(model.state_dict())
    return eager.eval()


def _record(model, run, output, stats=tuple(STATS), **kwargs):
    return record_both_reductions(model, run, output, list(stats), **kwargs)


def _sam_probabilities(model: torch.nn.Module, run) -> list[torch.Tensor]:
    """Each SAM attention call's own softmax probabilities (the eager class's second output), float64, call order."""
    return attention_outputs(model, lambda m: type(m).__name__.endswith("SamVisionAttention"), run)


def _stat(call, name: str) -> list[torch.Tensor]:
    """Per layer of one entry of ``rec.calls``, statistic ``name``: ``[B, H]`` (``reduction="mean"``) or
    ``[B, H, T]`` (``"none"``; read per call, as layers on different grids do not stack)."""
    return call.per_layer if name == "mad" else call.statistics[name]


def _check_sam(rec, rec_tokens, maps, height: int, width: int, window: int, first: int = 0) -> None:
    """Layers ``first`` to ``first + 2`` of the recordings against the SAM blocks' probabilities ``maps``."""
    check_sam_windows(rec, rec_tokens, maps, height, width, window, PATCH, BATCH, HEADS, first)


@pytest.mark.parametrize("size", list(SIZES.values()), ids=list(SIZES))
@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("name", list(FAMILIES))
def test_sam_encoder_matches_its_own_attention(name, implementation, size):
    image_h, image_w, window = size
    torch.manual_seed(0)
    model = _random_tables(_sam_encoder(name, window, implementation))
    suffix = "SamVisionSdpaAttention" if implementation == "sdpa" else "SamVisionAttention"
    assert all(type(m).__name__.endswith(suffix) for n, m in model.named_modules() if n.endswith(".attn"))
    pixels = torch.randn(BATCH, 3, image_h, image_w)
    run = lambda m: m(pixels)  # noqa: E731
    rec, rec_tokens = _record(model, run, lambda out: out.last_hidden_state)
    assert rec.layers == [f"layers.{i}.attn" for i in range(3)] and rec.skipped == {}
    maps = _sam_probabilities(_eager_twin(model, lambda: _sam_encoder(name, window, "eager")), run)
    _check_sam(rec, rec_tokens, maps, image_h // PATCH, image_w // PATCH, window)


# The second towers, tiny: DeepSeek-OCR-2's Qwen2 decoder, Unlimited-OCR's CLIP encoder (its 4 x 4 position
# table resized to the projector's map).
ENCODERS = {
    "deepseek_ocr2": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=HEADS,
                          num_key_value_heads=HEADS, vocab_size=16, max_position_embeddings=512),
    "unlimited_ocr": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=HEADS,
                          image_size=28, patch_size=7),
}


def _vision_config(name: str, window: int):
    prefix = FAMILIES[name][1]
    return getattr(transformers, f"{prefix}VisionConfig")(sam_config=dict(SAM, window_size=window),
                                                          encoder_config=ENCODERS[name])


def _vision_model(name: str, window: int, implementation: str) -> torch.nn.Module:
    module, prefix = FAMILIES[name]
    return getattr(_modeling(module), f"{prefix}VisionModel")._from_config(
        _vision_config(name, window), attn_implementation=implementation)


# The second encoder's attention class and where its layers are in the vision model.
SECOND = {"deepseek_ocr2": ("DeepseekOcr2VisionAttention", "vision_encoder.layers"),
          "unlimited_ocr": ("UnlimitedOcrAttention", "vision_encoder.encoder.layers")}
# name -> (image height, image width, the projector's map): the 8 px patches' map, then ceil(n / 2) twice
# (kernel 3, stride 2, padding 1). 392 x 360 px: 49 x 45 patches, 13 x 12 = 156 cells, past DeepSeek-OCR-2's 144.
MAP_SIZES = {"square-4x4": (128, 128, (4, 4)), "non-square-3x2": (80, 56, (3, 2)),
             "many-cells-13x12": (392, 360, (13, 12))}
CELL = 4.0 * PATCH  # a cell of 4 x 4 patches
MAP_STATS = [*STATS, "prefix_maps"]


def _second_layers(name: str, owner: str = "") -> list[str]:
    return [f"{owner}{SECOND[name][1]}.{i}.self_attn" for i in range(2)]


def _map_tokens(name: str, grid: tuple[int, int], num_tokens: int) -> torch.Tensor:
    """Indices of the map tokens in the second encoder's sequence (from the modeling file): Unlimited-OCR's CLIP
    embeddings put the class token first (``torch.cat([class_embeds, patch_embeds])``), DeepSeek-OCR-2's vision
    model the map first, its learned queries after (``torch.cat([hidden_states, queries])``)."""
    first = 1 if name == "unlimited_ocr" else 0
    index = torch.arange(first, first + grid[0] * grid[1])
    assert num_tokens == (1 + grid[0] * grid[1] if name == "unlimited_ocr"
                          else grid[0] * grid[1] + (144 if grid[0] * grid[1] <= 144 else 256))
    return index


def _map_reference(name: str, probabilities: torch.Tensor, grid: tuple[int, int]) -> dict[str, torch.Tensor]:
    """Per statistic, ``[B, H, gh * gw]`` per map token, and the prefix maps ``[B, H, Q, gh * gw]`` (the rows of the
    tokens without a position, in token order), from the second encoder's probabilities ``[B, H, N, N]``: the map
    row-major, each token at the centre of its ``CELL``-pixel cell."""
    index = _map_tokens(name, grid, probabilities.shape[-1])
    others = torch.ones(probabilities.shape[-1], dtype=torch.bool)
    others[index] = False
    rows, cols = torch.meshgrid(torch.arange(grid[0], dtype=torch.float64), torch.arange(grid[1], dtype=torch.float64),
                                indexing="ij")
    centres = torch.stack([(rows.flatten() + 0.5) * CELL, (cols.flatten() + 0.5) * CELL], -1)
    map_rows = probabilities[:, :, index]
    on_map = map_rows[..., index]
    return {
        # The mass on tokens without a position drops out, not renormalised (docs/definition.md).
        "mad": (on_map * torch.cdist(centres, centres)).sum(-1),
        "entropy": -torch.special.xlogy(map_rows, map_rows).sum(-1),
        "prefix_mass": map_rows[..., others].sum(-1),
        "self_mass": on_map.diagonal(dim1=-2, dim2=-1),
        "prefix_maps": probabilities[:, :, others][..., index],
    }


def _check_deepseek_mask(probabilities: torch.Tensor, cells: int) -> None:
    """DeepSeek-OCR-2's mask as its modeling file builds it (``block_sequence_ids``: map tokens 0, queries -1, over a
    causal mask): a map token sees every map token and no query, a query the map and the queries up to itself."""
    assert bool((probabilities[:, :, :cells, :cells] > 0).all())
    assert bool((probabilities[:, :, :cells, cells:] == 0).all())
    queries = probabilities[:, :, cells:, cells:]
    assert bool((queries.triu(1) == 0).all()) and bool((queries.diagonal(dim1=-2, dim2=-1) > 0).all())


def _second_probabilities(name: str, model: torch.nn.Module, *inputs, **kwargs) -> list[torch.Tensor]:
    """The second encoder's eager probabilities ``[B, H, N, N]``, float64, per layer (the language model's calls
    of the same eager function left out)."""
    calls = eager_attention_calls(_modeling(name), model, *inputs, **kwargs)
    return [p for module, p in calls if type(module).__name__ == SECOND[name][0]]


def _check_second(name: str, call, call_tokens, maps: list[torch.Tensor], grid: tuple[int, int], first: int) -> None:
    """Layers ``first`` and ``first + 1`` of one entry of ``rec.calls`` (the mean and the per-token recording's)
    against the second encoder's probabilities ``maps`` in that run."""
    assert len(maps) == 2
    cells = grid[0] * grid[1]
    for i, probabilities in enumerate(maps):
        if name == "deepseek_ocr2":
            _check_deepseek_mask(probabilities, cells)
        expected = _map_reference(name, probabilities, grid)
        geometry = call.geometry[first + i]
        queries = probabilities.shape[-1] - cells
        assert geometry.grid == grid and geometry.stride == (CELL, CELL) and geometry.heads == HEADS
        assert (geometry.num_prefix_tokens, geometry.num_suffix_tokens) == (
            (1, None) if name == "unlimited_ocr" else (0, queries))
        for stat, values in expected.items():
            if stat == "prefix_maps":
                torch.testing.assert_close(call.prefix_maps[first + i].double(), values, **TOL)
                continue
            torch.testing.assert_close(_stat(call, stat)[first + i].double(), values.mean(-1), **TOL)
            torch.testing.assert_close(_stat(call_tokens, stat)[first + i].double(), values, **TOL)


@pytest.mark.parametrize("size", list(MAP_SIZES.values()), ids=list(MAP_SIZES))
@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("name", list(FAMILIES))
def test_vision_model_records_both_towers_against_their_own_attention(name, implementation, size):
    """The vision model (SAM, then the second encoder on its projector's map): by default both are recorded, the
    SAM blocks placed as the encoder alone is, the second encoder's map tokens at the centres of their 32 px cells
    (the class token, or the learned queries, without a position), read per call at each size: every statistic
    and the prefix maps against the model's own eager probabilities, the output unchanged."""
    image_h, image_w, grid = size
    torch.manual_seed(0)
    model = _random_tables(_vision_model(name, 4, implementation))
    pixels = torch.randn(BATCH, 3, image_h, image_w)
    run = lambda m: m(pixels)  # noqa: E731
    rec, rec_tokens = _record(model, run, lambda out: out.last_hidden_state, stats=MAP_STATS)
    assert rec.layers == [f"sam_encoder.layers.{i}.attn" for i in range(3)] + _second_layers(name)
    assert rec.skipped == {}
    eager = _eager_twin(model, lambda: _vision_model(name, 4, "eager"))
    _check_sam(rec, rec_tokens, _sam_probabilities(eager, run), image_h // PATCH, image_w // PATCH, 4)
    _check_second(name, rec.calls[-1], rec_tokens.calls[-1], _second_probabilities(name, eager, pixels), grid, 3)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_second_encoder_named_alone_is_placed_per_call_and_a_layout_given_by_hand_is_not_used(name):
    """Named in layers=, the second encoder alone is placed on the map of each call (two sizes in one recording,
    each call against its own eager probabilities); a plain layout given by hand (num_prefix_tokens, grid, patch)
    is not used, and said so."""
    torch.manual_seed(0)
    model = _random_tables(_vision_model(name, 4, "sdpa"))
    eager = _eager_twin(model, lambda: _vision_model(name, 4, "eager"))
    layers, sizes = _second_layers(name), list(MAP_SIZES.values())[:2]
    images = [torch.randn(BATCH, 3, image_h, image_w) for image_h, image_w, _ in sizes]
    with torch.no_grad(), vitmad.record(model, layers=[f"{SECOND[name][1]}.*.self_attn"], stats=MAP_STATS) as rec:
        for pixels in images:
            model(pixels)
    assert rec.layers == layers and rec.skipped == {} and len(rec.calls) == 2
    for call, pixels, (_, _, grid) in zip(rec.calls, images, sizes, strict=True):
        for i, probabilities in enumerate(_second_probabilities(name, eager, pixels)):
            expected = _map_reference(name, probabilities, grid)
            assert call.geometry[i].grid == grid
            torch.testing.assert_close(call.per_layer[i].double(), expected["mad"].mean(-1), **TOL)
            torch.testing.assert_close(call.prefix_maps[i].double(), expected["prefix_maps"], **TOL)
    with pytest.warns(UserWarning, match="no recorded layer of .* has a plain ViT layout"):
        given = vitmad.record(model, layers=layers, num_prefix_tokens=1, grid=[4, 4], patch=32)
    with torch.no_grad(), given:
        model(torch.randn(BATCH, 3, 128, 128))
    assert given.geometry[0].stride == (CELL, CELL) and given.geometry[0].grid == (4, 4)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_a_projector_of_another_layout_is_refused(name):
    """A projector whose convolutions do not round the map up as the verified one does (kernel 2, no padding: floor)
    is refused with the convolution named, never placed on cells of another size; a second encoder run without the
    SAM encoder before it in the call (on a map of its own) is refused too."""
    torch.manual_seed(0)
    model = _vision_model(name, 4, "sdpa").eval()
    model.sam_encoder.proj.conv2 = torch.nn.Conv2d(*model.sam_encoder.proj.conv2.weight.shape[1::-1], kernel_size=2,
                                                   stride=2, bias=False)
    with torch.no_grad(), vitmad.record(model):
        with pytest.raises(ValueError, match=r"sam_encoder\.proj has a convolution of kernel \(2, 2\), padding"):
            model(torch.randn(1, 3, 80, 56))
    # The second encoder run on its own after a forward of the vision model: the map it is given is no image's that
    # vitmad saw.
    model = _vision_model(name, 4, "sdpa").eval()
    map_ = torch.randn(1, 32, 4, 4)
    run_alone = ((lambda: model.vision_encoder(map_)) if name == "unlimited_ocr" else
                 (lambda: model.vision_encoder(inputs_embeds=torch.randn(1, 16 + 144, 32), num_patches=16)))
    with torch.no_grad(), vitmad.record(model):
        model(torch.randn(1, 3, 128, 128))
        with pytest.raises(ValueError, match=r"did not run its patch embedding and projector before this layer "
                                             r"attended, in the same forward"):
            run_alone()

# A one-layer dense text model (the MoE layers are beside the point).
TEXT = dict(hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=2, vocab_size=64, n_routed_experts=2, num_experts_per_tok=1, n_shared_experts=1,
            mlp_layer_types=["dense"])
# Image tokens of one 128 px image (a 16 x 16 map, 4 x 4 after the projector), with the view separator:
# DeepSeek-OCR-2's 144 learned queries; Unlimited-OCR's 4 rows of 4 cells and a newline.
IMAGE_TOKENS = {"deepseek_ocr2": 144 + 1, "unlimited_ocr": 4 * 5 + 1}



def _full_model(name: str, implementation: str) -> torch.nn.Module:
    """The whole model (SAM, the second encoder, a small language model), random tables as the towers' tests."""
    prefix = FAMILIES[name][1]
    config = getattr(transformers, f"{prefix}Config")(vision_config=_vision_config(name, 4), text_config=TEXT,
                                                      image_token_id=5)
    build = getattr(transformers, f"{prefix}ForConditionalGeneration")._from_config
    torch.manual_seed(0)
    return _random_tables(build(config, attn_implementation=implementation))


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("name", list(FAMILIES))
def test_full_model_records_both_towers(name, implementation):
    """The whole model (SAM, the second encoder, a language model): its SAM blocks and its second encoder are
    recorded, each placed as in the vision model, against the model's own eager probabilities, the logits unchanged;
    named, the language model's layer is skipped with the reason."""
    model = _full_model(name, implementation)
    ids = torch.tensor([[1, 2] + [5] * IMAGE_TOKENS[name] + [3]] * BATCH)
    pixels = torch.randn(BATCH, 3, 128, 128)
    run = lambda m: m(input_ids=ids, pixel_values=pixels)  # noqa: E731
    rec, rec_tokens = _record(model, run, lambda out: out.logits, stats=MAP_STATS)
    tower = "model.vision_tower."
    assert rec.layers == [f"{tower}sam_encoder.layers.{i}.attn" for i in range(3)] + _second_layers(name, tower)
    assert rec.skipped == {}
    eager = _eager_twin(model, lambda: _full_model(name, "eager"))
    _check_sam(rec, rec_tokens, _sam_probabilities(eager, run), 16, 16, 4)
    _check_second(name, rec.calls[-1], rec_tokens.calls[-1],
                  _second_probabilities(name, eager, input_ids=ids, pixel_values=pixels), (4, 4), 3)
    with torch.no_grad(), vitmad.record(model, layers=["*attn"]) as named:
        run(model)
    assert named.layers == rec.layers and list(named.skipped) == ["model.language_model.layers.0.self_attn"]
    assert "outside model.vision_tower.sam_encoder, the tower that embeds the image" in named.skipped[
        "model.language_model.layers.0.self_attn"]


# Local crops beside the global view: ``get_image_features`` runs the vision tower on ``pixel_values`` (the global
# views), then on ``pixel_values_local`` (every image's crops, flattened over the batch), two runs of the tower in one
# forward. name -> (global view px, crop px, the crop's projector map, crops per image). Unlimited-OCR folds the
# projector's output into a square (``int(shape[1] ** 0.5)`` rows), so its views and crops are square; 72 px is a
# 9 x 9 map (padded to 12 x 12 in windows of 4) rounded up to 5 x 5, then 3 x 3. DeepSeek-OCR-2's crops are 80 x 56
# px (10 x 7 patches, padded to 12 x 8; 3 x 2 cells).
CROPS = {"deepseek_ocr2": ((128, 128), (80, 56), (3, 2), [2, 1]),
         "unlimited_ocr": ((128, 128), (72, 72), (3, 3), [2, 1])}
PATCHES_GRID = [[2, 1], [1, 1]]  # Unlimited-OCR's (columns, rows) of each image's crops


def _image_tokens(name: str, global_grid: tuple[int, int], crop_grid: tuple[int, int], crops: int) -> int:
    """One image's placeholder tokens, from ``get_image_features``: DeepSeek-OCR-2 puts each crop's learned queries
    (144 up to 144 cells), the global view's, then the view separator; Unlimited-OCR each row of the crops' cells
    (``rows * side`` rows of ``columns * side`` cells, a newline after each), the global view's rows of cells with a
    newline each, then the separator."""
    if name == "deepseek_ocr2":
        queries = lambda grid: 144 if grid[0] * grid[1] <= 144 else 256  # noqa: E731
        return crops * queries(crop_grid) + queries(global_grid) + 1
    columns, rows = PATCHES_GRID[0] if crops == 2 else PATCHES_GRID[1]
    local = rows * crop_grid[0] * (columns * crop_grid[1] + 1)
    return local + global_grid[0] * (global_grid[1] + 1) + 1


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("name", list(FAMILIES))
def test_full_model_with_local_crops_places_each_run_on_its_own_map(name, implementation):
    """The whole model given local crops of another size than the global view runs its vision tower twice in one
    forward (the global views, then the crops, three of them for two images): vitmad warns once per recording and
    records each run as its own entry of rec.calls, its SAM blocks on the patch map of that run's images and its
    second encoder on that run's projected map, each against the model's own eager probabilities of that run; the
    logits unchanged."""
    (global_h, global_w), (crop_h, crop_w), crop_grid, per_image = CROPS[name]
    global_grid = (4, 4)  # 128 px: 16 x 16 patches, 8 x 8, then 4 x 4 cells
    model = _full_model(name, implementation)
    counts = [_image_tokens(name, global_grid, crop_grid, n) for n in per_image]
    ids = torch.tensor([[1, 2] + [5] * n + [3] * (1 + max(counts) - n) for n in counts])
    pixels, local = torch.randn(BATCH, 3, global_h, global_w), torch.randn(sum(per_image), 3, crop_h, crop_w)
    inputs = dict(input_ids=ids, pixel_values=pixels, pixel_values_local=local, num_local_patches=per_image)
    if name == "unlimited_ocr":
        inputs["patches_grid"] = PATCHES_GRID
    run = lambda m: m(**inputs)  # noqa: E731
    with pytest.warns(UserWarning, match=r"ran its recorded layers 2 times .* read rec\.calls\[-2:\]") as caught:
        rec, rec_tokens = _record(model, run, lambda out: out.logits, stats=MAP_STATS)
    assert sum("ran its recorded layers" in str(w.message) for w in caught) == 2  # once per recording
    tower = "model.vision_tower."
    layers = [f"{tower}sam_encoder.layers.{i}.attn" for i in range(3)] + _second_layers(name, tower)
    assert len(rec.calls) == len(rec_tokens.calls) == 2 and rec.skipped == {}
    eager = _eager_twin(model, lambda: _full_model(name, "eager"))
    sam = _sam_probabilities(eager, run)
    second = _second_probabilities(name, eager, **inputs)
    # In the order get_image_features runs them: the global views, then the crops.
    runs = [(BATCH, (global_h, global_w), global_grid), (sum(per_image), (crop_h, crop_w), crop_grid)]
    assert len(sam) == 3 * len(runs) and len(second) == 2 * len(runs)
    for r, (call, call_tokens, (batch, (image_h, image_w), grid)) in enumerate(
            zip(rec.calls[-2:], rec_tokens.calls[-2:], runs, strict=True)):
        assert call.layers == call_tokens.layers == layers
        for i, (probabilities, window) in enumerate(zip(sam[3 * r:3 * r + 3], [4, 0, 4], strict=True)):
            height, width = image_h // PATCH, image_w // PATCH
            expected = padded_window_reference(probabilities, height, width, window, PATCH, batch, HEADS)
            assert call.geometry[i].grid == (height, width) and call.geometry[i].stride == (PATCH, PATCH)
            for stat, values in expected.items():
                torch.testing.assert_close(_stat(call, stat)[i].double(), values.mean(-1), **TOL)
                torch.testing.assert_close(_stat(call_tokens, stat)[i].double(), values, **TOL)
        _check_second(name, call, call_tokens, second[2 * r:2 * r + 2], grid, 3)
