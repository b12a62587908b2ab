"""vitmad.record on Llama 4's vision tower (transformers ``Llama4VisionModel``), placed by its family
(families/llama4.py).

The tower cuts the image with ``nn.Unfold`` (no convolution) into a row-major grid of ``PATCH`` px patches and
appends its class token AFTER them (``Llama4VisionModel.forward``: ``torch.cat([patches, class_embedding])``). The
reference is the model's own eager attention probabilities (float32, captured from its modeling file's
``vision_eager_attention_forward``, in float64), placed by geometry written here: patch ``(r, c)`` at
``((r + 0.5) * PATCH, (c + 0.5) * PATCH)`` pixels, the last token without a position. The statistics follow
docs/definition.md ("Beside the distance"): each averaged over the patch queries; the entropy and the prefix mass
(the class token's share) over the whole row; the prefix map is the class token's row over the grid.
"""

from __future__ import annotations

import math

import pytest
import torch

import vitmad
from conftest import eager_attention_calls, sharpened

transformers = pytest.importorskip("transformers")
from transformers.models.llama4 import modeling_llama4  # noqa: E402

# Recorded float32 values against float64 on the eager float32 probabilities; MADs here are 15 to 40 px.
TOL = {"rtol": 1e-5, "atol": 1e-4}
PATCH = 14
LAYERS = ["model.layers.0.self_attn", "model.layers.1.self_attn"]
VISION = dict(hidden_size=32, num_attention_heads=2, intermediate_size=128, num_hidden_layers=2, patch_size=PATCH,
              vision_output_dim=32, projector_input_dim=32, projector_output_dim=32, pixel_shuffle_ratio=0.5,
              rope_parameters={"rope_type": "default", "rope_theta": 10000.0})


def _tower(image_size: int) -> torch.nn.Module:
    config = transformers.Llama4VisionConfig(**VISION, image_size=image_size)
    return _sharper(sharpened(modeling_llama4.Llama4VisionModel(config)))


def _sharper(model: torch.nn.Module) -> torch.nn.Module:
    """Queries and keys 2.5x larger than ``sharpened`` draws them: its pre-norm leaves the logits of so small a
    tower near uniform otherwise."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, modeling_llama4.Llama4VisionAttention):
                module.q_proj.weight.mul_(2.5)
                module.k_proj.weight.mul_(2.5)
    return model


def _positions(side: int) -> torch.Tensor:
    """``[side * side + 1, 2]``: the grid row-major at cell centres, then the class token without a position."""
    cells = [((r + 0.5) * PATCH, (c + 0.5) * PATCH) for r in range(side) for c in range(side)]
    return torch.cat([torch.tensor(cells, dtype=torch.float64), torch.full((1, 2), float("nan"), dtype=torch.float64)])


def _eager_probabilities(model: torch.nn.Module, pixels: torch.Tensor) -> list[torch.Tensor]:
    """Every vision layer's eager probabilities ``[B, H, N, N]`` (float64) in one forward, in call order."""
    calls = eager_attention_calls(modeling_llama4, model, pixels, eager_function="vision_eager_attention_forward")
    return [probabilities for _, probabilities in calls]


def _reference(probabilities: torch.Tensor, side: int) -> dict[str, torch.Tensor]:
    """From one layer's probabilities ``[B, H, N, N]``: per head ``[B, H]`` statistics averaged over the patch
    queries, the per-query MAD ``[B, H, T]`` and the class token's map ``[B, H, 1, T]``."""
    positions = _positions(side)
    placed = ~positions[:, 0].isnan()
    distance = torch.cdist(positions[placed], positions[placed])
    patches = probabilities[:, :, placed][:, :, :, placed]
    rows = probabilities[:, :, placed]
    logs = torch.where(rows > 0, rows.log(), torch.zeros_like(rows))
    per_query = (patches * distance).sum(-1)
    return {"mad": per_query.mean(-1), "per_query": per_query,
            "entropy": -(rows * logs).sum(-1).mean(-1),
            "prefix_mass": rows[..., ~placed].sum(-1).mean(-1),
            "self_mass": patches.diagonal(dim1=-2, dim2=-1).mean(-1),
            "prefix_maps": probabilities[:, :, ~placed][:, :, :, placed]}


# 56 px: a 4 x 4 grid; 62 px: the unfold drops the last 6 pixels of each side, a 4 x 4 grid again.
@pytest.mark.parametrize("image_size", [56, 62])
@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_tower_places_its_class_token_last_and_matches_eager_attention(image_size, attn_implementation):
    model = _tower(image_size)
    side = image_size // PATCH
    torch.manual_seed(1)
    pixels = torch.rand(2, 3, image_size, image_size)
    probabilities = _eager_probabilities(model, pixels)
    assert [p.shape for p in probabilities] == [(2, 2, side * side + 1, side * side + 1)] * 2
    expected = [_reference(p, side) for p in probabilities]
    model.set_attn_implementation(attn_implementation)
    with torch.no_grad():
        plain = model(pixels).last_hidden_state
        with vitmad.record(model, stats=["mad", "entropy", "prefix_mass", "self_mass", "prefix_maps"]) as rec:
            recorded = model(pixels).last_hidden_state
    assert torch.equal(plain, recorded)
    assert rec.layers == LAYERS and rec.skipped == {}
    for geometry in rec.geometry:
        assert (geometry.grid, geometry.stride, geometry.num_prefix_tokens, geometry.num_suffix_tokens) == (
            (side, side), (float(PATCH), float(PATCH)), 0, 1)
    for stat in ("mad", "entropy", "prefix_mass", "self_mass"):
        torch.testing.assert_close(rec.stats[stat].double(), torch.stack([e[stat] for e in expected]), **TOL,
                                   msg=lambda m, stat=stat: f"{stat}: {m}")
    # Far from uniform attention, so that the class token taken for a patch (or first) would show.
    assert float(torch.stack([e["entropy"] for e in expected]).max()) < 0.8 * math.log(side * side + 1)
    for maps, e in zip(rec.prefix_maps, expected):
        assert maps.shape == (2, 2, 1, side * side)
        torch.testing.assert_close(maps.double(), e["prefix_maps"], rtol=1e-5, atol=1e-6)


def test_per_query_values_fold_onto_the_grid_row_major():
    model = _tower(56)
    pixels = torch.rand(2, 3, 56, 56)
    expected = [_reference(p, 4)["per_query"] for p in _eager_probabilities(model, pixels)]
    model.set_attn_implementation("sdpa")
    with torch.no_grad(), vitmad.record(model, reduction="none") as rec:
        model(pixels)
    for values, e in zip(rec.per_layer, expected):
        assert values.shape == (2, 2, 16)
        torch.testing.assert_close(values.double(), e, **TOL)


def test_full_model_records_its_vision_tower_alone_with_one_row_per_tile():
    text = dict(hidden_size=32, intermediate_size=32, intermediate_size_mlp=64, num_hidden_layers=1,
                num_attention_heads=2, num_key_value_heads=1, head_dim=16, vocab_size=64, num_local_experts=2)
    config = transformers.Llama4Config(vision_config={**VISION, "image_size": 56}, text_config=text,
                                       image_token_index=63, boi_token_index=62, eoi_token_index=61)
    model = _sharper(sharpened(modeling_llama4.Llama4ForConditionalGeneration(config)))
    tiles = torch.rand(2, 3, 56, 56)  # two tiles; the pixel shuffle leaves 4 tokens of each
    ids = torch.tensor([[1, 2, *[63] * 8, 3]])
    tower = model.vision_model
    expected = [_reference(p, 4)["mad"] for p in _eager_probabilities(tower, tiles)]
    tower.set_attn_implementation("sdpa")
    with torch.no_grad():
        plain = model(input_ids=ids, pixel_values=tiles).logits
        with vitmad.record(model) as rec:
            recorded = model(input_ids=ids, pixel_values=tiles).logits
    assert torch.equal(plain, recorded)
    assert rec.layers == ["vision_model." + name for name in LAYERS] and rec.skipped == {}
    assert rec.mad.shape == (2, 2, 2)
    torch.testing.assert_close(rec.mad.double(), torch.stack(expected), **TOL)


def test_encoder_called_on_hidden_states_is_refused():
    model = _tower(56)
    model.set_attn_implementation("sdpa")
    hidden = torch.randn(1, 17, 32)
    with vitmad.record(model), pytest.raises(ValueError, match="patch embedding .* did not run"):
        model.model(hidden, freqs_ci=model.rotary_embedding(hidden))


class _Resizing(torch.nn.Module):
    def __init__(self, tower: torch.nn.Module):
        super().__init__()
        self.tower = tower

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.tower(torch.nn.functional.interpolate(pixels, size=(56, 56))).last_hidden_state


def test_pixels_resized_before_the_patch_embedding_are_refused():
    wrapper = _Resizing(_tower(56)).eval()
    wrapper.tower.set_attn_implementation("sdpa")
    with torch.no_grad(), vitmad.record(wrapper), \
            pytest.raises(ValueError, match=r"Llama 4's patch embedding \(tower.patch_embedding\) took 56x56 pixels "
                                            r"from an input of 112x112 \(resized before it\?\)"):
        wrapper(torch.rand(1, 3, 112, 112))
