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

The second tower runs on the SAM projector's map, whose two convolutions of stride 2 make cells of 4 patches
(32 px here): Unlimited-OCR's is a CLIP encoder over a class token and that map, row-major; DeepSeek-OCR-2's a
Qwen2 decoder over that map then learned queries, causal over the queries. Neither embeds the image itself, so a
recording of the whole model places the SAM tower alone; the second tower's layers are skipped with the reason when
named, and Unlimited-OCR's are placed when its layout is given (``num_prefix_tokens=1``, the map's ``grid`` and
``patch=32``).
"""

from __future__ import annotations

import pytest
import torch

import vitmad
from conftest import attention_outputs, check_sam_windows, record_both_reductions, sharpened

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


def _record(model, run, output, **kwargs):
    return record_both_reductions(model, run, output, STATS, **kwargs)


def _sam_probabilities(model: torch.nn.Module, run) -> list[torch.Tensor]:
    """Each SAM attention call's own softmax probabilities (the eager class's second output), float64, call order."""
    return attention_outputs(model, lambda m: type(m).__name__.endswith("SamVisionAttention"), run)


def _tokens(rec, name: str) -> list[torch.Tensor]:
    """Per layer, ``[B, H, T]`` of statistic ``name`` in a ``reduction="none"`` recording (layers on different grids
    do not stack)."""
    call = rec.calls[-1]
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


SECOND_TOWER = {"deepseek_ocr2": "vision_encoder.layers", "unlimited_ocr": "vision_encoder.encoder.layers"}


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("name", list(FAMILIES))
def test_vision_model_records_the_sam_tower_and_skips_the_second_when_named(name, implementation):
    """The vision model (SAM, then the second tower on its projector's map): by default its SAM blocks are recorded,
    placed as the encoder alone is, and nothing else; the second tower's layers, named, are skipped with the reason
    (its tokens are not the patch embedding's grid), never placed on SAM's grid."""
    torch.manual_seed(0)
    model = _random_tables(_vision_model(name, 4, implementation))
    pixels = torch.randn(BATCH, 3, 80, 56)
    run = lambda m: m(pixels)  # noqa: E731
    rec, rec_tokens = _record(model, run, lambda out: out.last_hidden_state)
    assert rec.layers == [f"sam_encoder.layers.{i}.attn" for i in range(3)] and rec.skipped == {}
    maps = _sam_probabilities(_eager_twin(model, lambda: _vision_model(name, 4, "eager")), run)
    _check_sam(rec, rec_tokens, maps, 10, 7, 4)
    with torch.no_grad(), vitmad.record(model, layers=["*attn"]) as named:
        run(model)
    second = [f"{SECOND_TOWER[name]}.{i}.self_attn" for i in range(2)]
    assert named.layers == rec.layers and sorted(named.skipped) == second
    assert all("outside sam_encoder, the tower that embeds the image" in named.skipped[n] for n in second)


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("name", list(FAMILIES))
def test_second_tower_layout_without_its_cells_is_refused(name, implementation):
    """A layout given for the second tower that is not its tokens is refused, never placed on SAM's cells:
    DeepSeek-OCR-2's 16 map tokens come with 144 learned queries (no plain layout), and Unlimited-OCR's 4 x 4 map
    given without patch= would take the patch embedding's 8 px for its 32 px cells."""
    torch.manual_seed(0)
    model = _vision_model(name, 4, implementation).eval()
    layers = [f"{SECOND_TOWER[name]}.*.self_attn"]
    given = dict(num_prefix_tokens=0) if name == "deepseek_ocr2" else dict(num_prefix_tokens=1, grid=[4, 4])
    match = "attends over 160 tokens" if name == "deepseek_ocr2" else r"grid=\[4, 4\] is not the 16x16 grid.*patch="
    with torch.no_grad(), vitmad.record(model, layers=layers, **given):
        with pytest.raises(ValueError, match=match):
            model(torch.randn(1, 3, 128, 128))


def _clip_reference(probabilities: torch.Tensor, grid: tuple[int, int], cell: float) -> dict[str, torch.Tensor]:
    """Per statistic, ``[B, H, gh * gw]`` per map token, from the CLIP attention's probabilities ``[B, H, 1 + gh * gw,
    1 + gh * gw]``: the class token first (no position), then the projector's map row-major, ``cell`` px apart."""
    rows, cols = torch.meshgrid(torch.arange(grid[0], dtype=torch.float64), torch.arange(grid[1], dtype=torch.float64),
                                indexing="ij")
    centres = torch.stack([(rows.flatten() + 0.5) * cell, (cols.flatten() + 0.5) * cell], -1)
    grid_rows = probabilities[:, :, 1:]  # the map tokens' rows
    on_map = grid_rows[..., 1:]
    return {
        # The class token's mass drops out, not renormalised (docs/definition.md).
        "mad": (on_map * torch.cdist(centres, centres)).sum(-1),
        "entropy": -torch.special.xlogy(grid_rows, grid_rows).sum(-1),
        "prefix_mass": grid_rows[..., 0],
        "self_mass": on_map.diagonal(dim1=-2, dim2=-1),
    }


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_unlimited_ocr_second_tower_placed_when_its_layout_is_given(implementation, monkeypatch):
    """Unlimited-OCR's CLIP tower with its layout given (class token, the projector's 4 x 4 map, 32 px cells: patch 8
    times the projector's two strides of 2), recorded in one recording with the SAM blocks, which keep their own
    placement: every statistic against the CLIP eager attention's own probabilities."""
    modeling = _modeling("unlimited_ocr")
    torch.manual_seed(0)
    model = _random_tables(_vision_model("unlimited_ocr", 4, implementation))
    pixels = torch.randn(BATCH, 3, 128, 128)
    run = lambda m: m(pixels)  # noqa: E731
    rec, rec_tokens = _record(model, run, lambda out: out.last_hidden_state, num_prefix_tokens=1, grid=[4, 4],
                              patch=32, layers=["*attn"])
    clip = [f"vision_encoder.encoder.layers.{i}.self_attn" for i in range(2)]
    assert rec.layers == [f"sam_encoder.layers.{i}.attn" for i in range(3)] + clip
    eager = _eager_twin(model, lambda: _vision_model("unlimited_ocr", 4, "eager"))
    calls = []
    original = modeling.eager_attention_forward
    monkeypatch.setattr(modeling, "eager_attention_forward",
                        lambda *args, **kwargs: calls.append(original(*args, **kwargs)) or calls[-1])
    maps = _sam_probabilities(eager, run)
    _check_sam(rec, rec_tokens, maps, 16, 16, 4)
    assert len(calls) == 2
    for i, (_, probabilities) in enumerate(calls):
        expected = _clip_reference(probabilities.double(), (4, 4), 32.0)
        geometry = rec.geometry[3 + i]
        assert geometry.grid == (4, 4) and geometry.stride == (32.0, 32.0) and geometry.heads == HEADS
        for stat, values in expected.items():
            torch.testing.assert_close(rec.stats[stat][3 + i].double(), values.mean(-1), **TOL)
            torch.testing.assert_close(_tokens(rec_tokens, stat)[3 + i].double(), values, **TOL)


# A one-layer dense text model (the MoE layers are beside the point).
TEXT = dict(hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=2, vocab_size=64, n_routed_experts=2, num_experts_per_tok=1, n_shared_experts=1,
            mlp_layer_types=["dense"])
# Image tokens of one 128 px image (a 16 x 16 map, 4 x 4 after the projector), with the view separator:
# DeepSeek-OCR-2's 144 learned queries; Unlimited-OCR's 4 rows of 4 cells and a newline.
IMAGE_TOKENS = {"deepseek_ocr2": 144 + 1, "unlimited_ocr": 4 * 5 + 1}


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("name", list(FAMILIES))
def test_full_model_records_its_sam_tower_alone(name, implementation):
    """The whole model (SAM, the second tower, a language model): its SAM blocks are recorded, placed as the encoder
    alone is, and nothing else; named, the second tower's and the language model's layers are skipped with the
    reason."""
    prefix = FAMILIES[name][1]
    config = getattr(transformers, f"{prefix}Config")(vision_config=_vision_config(name, 4), text_config=TEXT,
                                                      image_token_id=5)
    build = getattr(transformers, f"{prefix}ForConditionalGeneration")._from_config
    torch.manual_seed(0)
    model = _random_tables(build(config, attn_implementation=implementation))
    ids = torch.tensor([[1, 2] + [5] * IMAGE_TOKENS[name] + [3]] * BATCH)
    pixels = torch.randn(BATCH, 3, 128, 128)
    run = lambda m: m(input_ids=ids, pixel_values=pixels)  # noqa: E731
    rec, rec_tokens = _record(model, run, lambda out: out.logits)
    assert rec.layers == [f"model.vision_tower.sam_encoder.layers.{i}.attn" for i in range(3)] and rec.skipped == {}
    eager = _eager_twin(model, lambda: build(config, attn_implementation="eager"))
    _check_sam(rec, rec_tokens, _sam_probabilities(eager, run), 16, 16, 4)
    with torch.no_grad(), vitmad.record(model, layers=["*attn"]) as named:
        run(model)
    outside = [f"model.vision_tower.{SECOND_TOWER[name]}.{i}.self_attn" for i in range(2)]
    assert named.layers == rec.layers and sorted(named.skipped) == sorted([*outside, "model.language_model.layers.0."
                                                                                       "self_attn"])
    assert all("the tower that embeds the image" in reason for reason in named.skipped.values())
