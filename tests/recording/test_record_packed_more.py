"""vitmad.record on more packed native-resolution vision towers, each proven the same as a tower of
test_record_packed.py: Qwen3-VL-MoE, Qwen3.5, Qwen3.5-MoE, Qwen4-Exp, Qwen3-Omni-MoE and Cohere Compass (Qwen3-VL's
tower); Qwen2.5-Omni and EXAONE 4.5 (Qwen2.5-VL's windows and full-attention blocks; EXAONE with grouped-query
attention); GLM-5-Next, ERNIE-4.5-VL and dots3 (Qwen2-VL's order; ERNIE with a linear patch embedding, GLM-5-Next
and dots3 with q / k norms). GLM-Image is refused by name; the towers with a class token per image:
test_record_packed_prefix.py; row-major packings and a merge size per image: test_record_packed_row_major.py; windows
chosen by ``layer_types``: test_record_packed_layer_types.py.

Tiny random-weight towers get three images of different sizes (odd numbers of merge blocks a side) packed in one
call. The reference is each model's own eager attention probabilities, captured call by call from its modeling
file's ``eager_attention_forward``, placed by geometry written here with explicit loops (not the code under test):
tokens in spatial-merge blocks of ``MERGE x MERGE`` patches, blocks row-major over the image and patches row-major
in a block; for the windowed towers the blocks regrouped by windows of ``WINDOW x WINDOW`` blocks (windows
row-major, blocks row-major in each, edge windows smaller), one call per window in their window blocks and one per
image over the same order in their full-attention block. Each patch sits at ``(row + 0.5, col + 0.5) * PATCH``
pixels of its own image; a query's MAD is over the keys of its own call, in float64. A video between two images is
placed slice by slice, each temporal slice a call (or windows) of its own, as an image.
"""

from __future__ import annotations

import importlib

import pytest
import torch

import vitmad
from conftest import (
    check_packed_values,
    chunk_token_mad,
    eager_attention_calls,
    qwen_token_chunks,
    record_packed_forward,
    sharpened,
)

transformers = pytest.importorskip("transformers")

# Recorded float32 MAD against float64 on the eager float32 probabilities; MADs here are 4 to 40 px.
TOL = {"rtol": 1e-5, "atol": 1e-4}
PATCH, MERGE, WINDOW = 4, 2, 2  # 4 px patches, 2 x 2 merge blocks, windows of 2 x 2 merge blocks (16 px)
# (h, w) patches: 3 x 2, 5 x 5 and 1 x 7 merge blocks; windows at the bottom / right edges hold one block row or
# column, and the strip is three windows wide with a one-block window at its end.
GRIDS = [(6, 4), (10, 10), (2, 14)]

# name -> (modeling module, config class, tower class, attention class, windows)
TOWERS = {
    "qwen3_vl_moe": ("qwen3_vl_moe", "Qwen3VLMoeVisionConfig", "Qwen3VLMoeVisionModel", "Qwen3VLMoeVisionAttention",
                     False),
    "qwen3_5": ("qwen3_5", "Qwen3_5VisionConfig", "Qwen3_5VisionModel", "Qwen3_5VisionAttention", False),
    "qwen3_5_moe": ("qwen3_5_moe", "Qwen3_5MoeVisionConfig", "Qwen3_5MoeVisionModel", "Qwen3_5MoeVisionAttention",
                    False),
    "qwen4_exp": ("qwen4_exp", "Qwen4ExpVisionConfig", "Qwen4ExpVisionModel", "Qwen4ExpVisionAttention", False),
    "qwen3_omni_moe": ("qwen3_omni_moe", "Qwen3OmniMoeVisionEncoderConfig", "Qwen3OmniMoeVisionEncoder",
                       "Qwen3OmniMoeVisionAttention", False),
    "cohere_compass": ("cohere_compass", "CohereCompassVisionConfig", "CohereCompassVisionModel",
                       "CohereCompassVisionAttention", False),
    "glm5_next": ("glm5_next", "Glm5NextVisionConfig", "Glm5NextVisionModel", "Glm5NextVisionAttention", False),
    "qwen2_5_omni": ("qwen2_5_omni", "Qwen2_5OmniVisionEncoderConfig", "Qwen2_5OmniVisionEncoder",
                     "Qwen2_5OmniVisionAttention", True),
    "exaone4_5": ("exaone4_5", "Exaone4_5_VisionConfig", "Exaone4_5_VisionModel", "Exaone4_5_VisionAttention", True),
    "dots3_note": ("dots3_note", "Dots3NoteVisionConfig", "Dots3NoteVisionModel", "Dots3NoteVisionAttention", False),
    "ernie4_5_vl_moe": ("ernie4_5_vl_moe", "Ernie4_5_VLMoeVisionConfig",
                        "Ernie4_5_VLMoeVisionTransformerPretrainedModel", "Ernie4_5_VLMoeVisionAttention", False),
}


def _modeling(name: str):
    module = TOWERS[name][0]
    return importlib.import_module(f"transformers.models.{module}.modeling_{module}")


def _tower(name: str) -> torch.nn.Module:
    module, config_name, tower_name, attention_name, windows = TOWERS[name]
    settings = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=PATCH,
                    spatial_merge_size=MERGE, attn_implementation="eager")
    if name == "dots3_note":  # its own names; one dense and one mixture-of-experts MLP
        settings.update(num_hidden_layers=settings.pop("depth"), num_attention_heads=settings.pop("num_heads"),
                        moe_intermediate_size=32, mlp_layer_types=["dense", "sparse"], num_local_experts=2,
                        num_experts_per_tok=1, per_layer_config={}, adapter_in_dim=32, adapter_out_dim=32)
    elif name != "ernie4_5_vl_moe":
        settings.update(temporal_patch_size=2, out_hidden_size=32)
    if name.startswith("qwen3") or name in ("qwen4_exp", "cohere_compass"):
        settings["num_position_embeddings"] = 16
    if name == "glm5_next":
        settings["projection_intermediate_size"] = 64
    if name in ("qwen3_vl_moe", "qwen3_omni_moe", "cohere_compass"):
        settings["deepstack_visual_indexes"] = []
    if name == "exaone4_5":  # grouped-query attention: one key head for the two query heads
        settings["num_key_value_heads"] = 1
    if windows:  # block 0 attends in windows, block 1 per image
        settings.update(window_size=WINDOW * MERGE * PATCH, fullatt_block_indexes=[1])
    config = getattr(transformers, config_name)(**settings)
    modeling = _modeling(name)
    model = getattr(modeling, tower_name)(config)
    assert type(model.blocks[0].attn).__name__ == attention_name
    return sharpened(model)


def _inputs(name: str):
    grid_thw = torch.tensor([[1, h, w] for h, w in GRIDS])
    temporal = 1 if name in ("ernie4_5_vl_moe", "dots3_note") else 2
    torch.manual_seed(1)
    return torch.randn(sum(h * w for h, w in GRIDS), 3 * temporal * PATCH * PATCH), grid_thw


# Geometry written here -------------------------------------------------------------------------------------------

def _chunks(grid: tuple[int, int], window: int | None) -> list[list[tuple[int, int]]]:
    """One image's tokens as (row, col) in sequence order, cut into its attention calls: the whole image
    (``window=None``), or windows of ``window x window`` merge blocks."""
    return qwen_token_chunks(grid, MERGE, window)


def _eager_calls(name, model, *inputs, **kwargs) -> list:
    """``[(attention module, probabilities [1, H, n, n] float64)]`` of every eager attention call of one forward."""
    return eager_attention_calls(_modeling(name), model, *inputs, **kwargs)


def _expected_per_layer(model, calls: list, grids, windows: bool) -> list[list[torch.Tensor]]:
    """Per layer (two), per fold entry (an image or a video's slice, each ``grids[i]`` patches), the per-query
    float64 MAD ``[2 heads, h * w]`` row-major from the eager ``calls`` in call order: the windowed towers' first
    layer one call per window of each entry, every other layer one call per entry over its (window-ordered, for the
    windowed towers) sequence."""
    expected_per_layer, used = [], 0
    for layer in range(2):
        windowed = windows and layer == 0
        expected = [torch.full((2, h * w), float("nan"), dtype=torch.float64) for h, w in grids]
        for entry, grid in enumerate(grids):
            chunks = _chunks(grid, WINDOW if windows else None)
            if not windowed:
                chunks = [[cell for chunk in chunks for cell in chunk]]
            for chunk in chunks:
                module, probabilities = calls[used]
                used += 1
                assert module is model.blocks[layer].attn and probabilities.shape[-1] == len(chunk)
                for q, (r, c) in enumerate(chunk):
                    expected[entry][:, r * grid[1] + c] = chunk_token_mad(probabilities, chunk, PATCH)[:, q]
        assert all(not e.isnan().any() for e in expected)
        expected_per_layer.append(expected)
    assert used == len(calls)
    return expected_per_layer


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("name", list(TOWERS))
def test_packed_images_match_eager_attention(name, attn_implementation):
    model = _tower(name)
    windows = TOWERS[name][4]
    patches, grid_thw = _inputs(name)

    # The order written here is the one the tower's own rotary / position ids assume (merge-block order).
    from transformers.vision_utils import get_vision_position_ids
    cells = [cell for grid in GRIDS for cell in _chunks(grid, None)[0]]
    assert get_vision_position_ids(grid_thw, MERGE).tolist() == [list(c) for c in cells]

    calls = _eager_calls(name, model, patches, grid_thw=grid_thw)
    expected_per_layer = _expected_per_layer(model, calls, GRIDS, windows)

    model.set_attn_implementation(attn_implementation)
    rec, rec_mean = record_packed_forward(model, patches, grid_thw=grid_thw)
    assert rec.layers == ["blocks.0.attn", "blocks.1.attn"]
    kinds = ["window 4x4 patches" if windows else "global per image", "global per image"]
    check_packed_values(rec, expected_per_layer, GRIDS, kinds, TOL)
    means = torch.stack([torch.stack([e.mean(-1) for e in layer]) for layer in expected_per_layer])
    torch.testing.assert_close(rec_mean.mad.double(), means, **TOL)  # [L, n_images, H]


# A video of 3 temporal slices of 5 x 3 merge blocks between two images: (t, h, w) patches per grid_thw row.
VIDEO_ROWS = [(1, 6, 4), (3, 10, 6), (1, 2, 14)]
VIDEO_ENTRIES = [(h, w) for t, h, w in VIDEO_ROWS for _ in range(t)]  # each image, each slice in time order


@pytest.mark.parametrize("name", list(TOWERS))
def test_video_slices_match_eager_attention(name):
    """Each temporal slice of a video is a cu_seqlens chunk of its own (windowed as an image in the windowed
    towers' window blocks), its tokens in an image's merge-block order: placed as an image, one fold entry per
    slice."""
    model = _tower(name)
    windows = TOWERS[name][4]
    temporal = 1 if name in ("ernie4_5_vl_moe", "dots3_note") else 2
    grid_thw = torch.tensor(VIDEO_ROWS)
    torch.manual_seed(4)
    patches = torch.randn(sum(t * h * w for t, h, w in VIDEO_ROWS), 3 * temporal * PATCH * PATCH)

    calls = _eager_calls(name, model, patches, grid_thw=grid_thw)
    expected_per_layer = _expected_per_layer(model, calls, VIDEO_ENTRIES, windows)

    model.set_attn_implementation("sdpa")
    rec, rec_mean = record_packed_forward(model, patches, grid_thw=grid_thw)
    kinds = ["window 4x4 patches" if windows else "global per image", "global per image"]
    check_packed_values(rec, expected_per_layer, VIDEO_ENTRIES, kinds, TOL)
    means = torch.stack([torch.stack([e.mean(-1) for e in layer]) for layer in expected_per_layer])
    torch.testing.assert_close(rec_mean.mad.double(), means, **TOL)  # [L, n_entries, H]


def test_glm_image_is_refused_by_name():
    from transformers.models.glm_image import modeling_glm_image

    config = transformers.GlmImageVisionConfig(depth=2, hidden_size=32, intermediate_size=64, num_heads=2,
                                               patch_size=PATCH, spatial_merge_size=MERGE, image_size=16)
    model = modeling_glm_image.GlmImageVisionModel(config).eval()
    patches = torch.randn(sum(h * w for h, w in GRIDS), 3 * PATCH * PATCH)
    with vitmad.record(model) as rec, pytest.raises(
            ValueError, match=r"blocks\.0\.attn \(GlmImageVisionAttention\).*GLM-Image.*does not record this tower"):
        model(patches, grid_thw=torch.tensor([[1, h, w] for h, w in GRIDS]))
    assert rec.calls == []


def test_every_refused_design_names_its_model():
    """Each refused design's attention module gets a placer that refuses with its reason (built without a config:
    the placer reads only the module's class)."""
    from vitmad.recording.families import packed
    from vitmad.recording.placement import NotPlaceable

    refused = [d for d in packed._DESIGNS if d.kind == "refused"]
    assert [d.reason.split("'s ")[0] for d in refused] == ["GLM-Image"]
    for design in refused:
        cls = getattr(importlib.import_module(design.module), design.attention)
        module = cls.__new__(cls)
        torch.nn.Module.__init__(module)
        placer = packed.placer(module, "", module)
        with pytest.raises(NotPlaceable, match="does not record this tower"):
            placer.place(None, torch.Size([1, 2]), 4, 4)


def test_qwen3_5_vision_language_model_records_its_vision_tower_only():
    config = transformers.Qwen3_5Config(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=100, head_dim=16, layer_types=["full_attention"],
                         rope_parameters={"rope_type": "default", "mrope_section": [2, 2, 4], "rope_theta": 1e4}),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=PATCH,
                           spatial_merge_size=MERGE, temporal_patch_size=2, out_hidden_size=32,
                           num_position_embeddings=16),
        attn_implementation="sdpa")
    model = transformers.Qwen3_5Model(config).eval()
    patches, grid_thw = _inputs("qwen3_5")
    with torch.no_grad(), vitmad.record(model) as rec:
        model.get_image_features(patches, image_grid_thw=grid_thw)
    assert rec.layers == ["visual.blocks.0.attn", "visual.blocks.1.attn"]
    assert rec.mad.shape == (2, 3, 2)


def test_glm46v_vision_tower_is_glm4v():
    """GLM-4.6V adds no tower of its own: its ``visual`` is GLM-4.1V's ``Glm4vVisionModel``, recorded as such."""
    config = transformers.Glm46VConfig(vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2,
                                                          out_hidden_size=32))
    assert type(config.vision_config).__name__ == "Glm4vVisionConfig"
    assert type(transformers.AutoModel.from_config(config.vision_config)).__name__ == "Glm4vVisionModel"


def test_ernie_vision_language_model_records_its_tower_as_the_tower_alone():
    """ERNIE-4.5-VL has no convolution anywhere (its patch embedding is a linear): the whole model's recording of
    its tower equals the tower's own."""
    config = transformers.Ernie4_5_VLMoeConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=100, head_dim=16, moe_intermediate_size=[32, 32],
                         moe_num_experts=2, moe_k=1, moe_layer_start_index=1,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [3, 3, 2]}),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=PATCH,
                           spatial_merge_size=MERGE),
        attn_implementation="sdpa")
    model = transformers.Ernie4_5_VLMoeModel(config).eval()
    patches, grid_thw = _inputs("ernie4_5_vl_moe")
    with torch.no_grad():
        with vitmad.record(model, reduction="none") as rec:
            model.get_image_features(patches, image_grid_thw=grid_thw)
        with vitmad.record(model.vision_tower, reduction="none") as alone:
            model.vision_tower(patches, grid_thw=grid_thw)
    assert rec.layers == ["vision_tower.blocks.0.attn", "vision_tower.blocks.1.attn"] and len(rec.calls) == 1
    for whole, own in zip(rec.per_layer, alone.per_layer):
        torch.testing.assert_close(whole, own, equal_nan=True)
