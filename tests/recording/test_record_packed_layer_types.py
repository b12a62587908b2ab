"""vitmad.record on packed towers whose blocks attend in windows or per image as their config's ``layer_types``
says: Ovis2.5 (Qwen2.5-VL's windows of ``2 x 2`` merge blocks), Muse Glimmer and Muse Spark (the same windows over
single patches: ``spatial_merge_size`` 1 in the tower, windows of ``pos_emb_height`` patches a side).

Tiny random-weight towers of three blocks (window, full, window attention) get three images of different sizes
packed in one call. The reference is each model's own eager attention probabilities, captured call by call from its
modeling file's ``eager_attention_forward``, placed by geometry written here from reading the modeling files
(``get_vision_window_index`` reorders the whole sequence by windows once, before the first block; windows row-major
over the image, blocks row-major in each, edge windows smaller; a window block attends once per window, a full block
once per image over the same order) and the processors (Ovis2.5's in merge blocks, Muse Glimmer's row-major; Muse
Spark uses Glimmer's). Each patch sits at ``(row + 0.5, col + 0.5) * PATCH`` pixels of its own image; a query's MAD,
entropy and prefix mass are over the keys of its own call, in float64. A video's temporal slices are chunks (and
windows) of their own, each placed as an image.
"""

from __future__ import annotations

import importlib

import pytest
import torch

import vitmad
from conftest import (
    PACKED_STATS,
    check_packed_statistics,
    eager_attention_calls,
    packed_chunk_references,
    patch_indexed_image_and_video,
    qwen_token_chunks,
    record_packed_statistics,
    sharpened,
)

transformers = pytest.importorskip("transformers")

PATCH = 4
LAYER_TYPES = ["window_attention", "full_attention", "window_attention"]
# (h, w) patches: windows cut at the bottom and right edges, a square image and a strip several windows long.
GRIDS = [(6, 4), (10, 10), (2, 14)]

# name -> (config class, tower class, merge size (patches a side of a merge block), window side in merge blocks)
TOWERS = {
    "ovis2_5": ("Ovis2_5VisionConfig", "Ovis2_5VisionModel", 2, 2),
    "muse_glimmer": ("MuseGlimmerVisionConfig", "MuseGlimmerVisionModel", 1, 3),
    "muse_spark": ("MuseSparkVisionConfig", "MuseSparkVisionModel", 1, 3),
}
KINDS = {"ovis2_5": "window 4x4 patches (2x2 merge blocks)", "muse_glimmer": "window 3x3 patches",
         "muse_spark": "window 3x3 patches"}


def _modeling(name: str):
    return importlib.import_module(f"transformers.models.{name}.modeling_{name}")


def _tower(name: str, layer_types: list[str] = LAYER_TYPES) -> torch.nn.Module:
    config_name, tower_name, merge, window = TOWERS[name]
    settings = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=len(layer_types), num_attention_heads=2,
                    patch_size=PATCH, layer_types=layer_types, attn_implementation="eager")
    if name == "ovis2_5":  # windows of window_size // merge // patch merge blocks
        settings.update(image_size=16, spatial_merge_size=merge, window_size=window * merge * PATCH)
    else:  # windows of pos_emb_height patches (the position table's side)
        settings.update(pos_emb_height=window, pos_emb_width=window)
    config = getattr(importlib.import_module(f"transformers.models.{name}.configuration_{name}"),
                     config_name)(**settings)
    torch.manual_seed(0)  # the leaves sharpened does not draw (position tables) the same in any test order
    return sharpened(getattr(_modeling(name), tower_name)(config))


def _patches(name: str, rows: list[tuple[int, int, int]], seed: int) -> torch.Tensor:
    # Ovis2.5: 3 channels (temporal_patch_size 1); the Muse towers: patch_temporal 2 frames of 3 channels.
    torch.manual_seed(seed)
    channels = 3 if name == "ovis2_5" else 6
    return torch.randn(sum(t * h * w for t, h, w in rows), channels * PATCH * PATCH)


def _references(name: str, model, calls: list, entries: list[tuple[int, int]], layer_types: list[str],
                window: int | None = None) -> list:
    """Per block, its calls' chunks: per fold entry (an image or a video's slice) in order, its windows (window
    blocks) or all its windows' tokens in window order (full blocks). ``window``: the window side in merge blocks,
    where not the tower's configured one."""
    _, _, merge, configured = TOWERS[name]
    window = configured if window is None else window
    layers = []
    for layer, kind in zip(model.layers, layer_types):
        chunks = []
        for entry, grid in enumerate(entries):
            windows = qwen_token_chunks(grid, merge, window)
            if kind == "full_attention":
                windows = [[cell for chunk in windows for cell in chunk]]
            chunks += [(entry, cells) for cells in windows]
        layers.append((getattr(layer, "self_attn", None) or layer.attn, chunks))
    return packed_chunk_references(calls, layers, entries, PATCH)


def _kinds(name: str, layer_types: list[str]) -> list[str]:
    return [KINDS[name] if kind == "window_attention" else "global per image" for kind in layer_types]


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("name", list(TOWERS))
def test_packed_images_match_eager_attention(name, attn_implementation):
    model = _tower(name)
    rows = [(1, h, w) for h, w in GRIDS]
    patches, grid_thw = _patches(name, rows, seed=1), torch.tensor(rows)
    calls = eager_attention_calls(_modeling(name), model, patches, grid_thw=grid_thw)
    references = _references(name, model, calls, GRIDS, LAYER_TYPES)
    model.set_attn_implementation(attn_implementation)
    rec, per_query = record_packed_statistics(model, patches, grid_thw=grid_thw)
    check_packed_statistics(rec, per_query, references, GRIDS, _kinds(name, LAYER_TYPES), PATCH)


def test_layer_types_and_window_changed_inside_the_block_are_followed():
    """Ovis2.5 reads its layer_types and window_size in every forward; so does vitmad: a second forward in the same
    recording after both changed is placed by the new ones. (Read once at setup, a tower of full blocks whose window
    grew kept its old window order, which its per-image cu_seqlens cannot show: MAD 6.8% off; found by QA
    helper-136.)"""
    name = "ovis2_5"
    model = _tower(name, layer_types=["full_attention"] * 3)
    rows = [(1, h, w) for h, w in GRIDS]
    patches, grid_thw = _patches(name, rows, seed=1), torch.tensor(rows)
    changed = LAYER_TYPES
    model.set_attn_implementation("sdpa")
    with torch.no_grad(), vitmad.record(model, stats=PACKED_STATS) as rec:
        model(patches, grid_thw=grid_thw)
        model.config.layer_types = changed
        model.window_size = 3 * 2 * PATCH  # windows of 3 x 3 merge blocks, 6 x 6 patches
        model(patches, grid_thw=grid_thw)
    assert [g.attention for g in rec.calls[-1].geometry] == [
        "window 6x6 patches (3x3 merge blocks)", "global per image", "window 6x6 patches (3x3 merge blocks)"]
    model.set_attn_implementation("eager")
    calls = eager_attention_calls(_modeling(name), model, patches, grid_thw=grid_thw)
    references = _references(name, model, calls, GRIDS, changed, window=3)
    for layer, reference in enumerate(references):
        means = torch.stack([values.mean(-1) for values in reference["mad"]])  # [n_images, H]
        torch.testing.assert_close(rec.calls[-1].per_layer[layer].double(), means, rtol=1e-5, atol=1e-4)


def test_window_order_is_the_towers_own():
    """The window order written here is transformers' get_vision_window_index, which the towers apply to their
    sequence (Ovis2.5 over merge blocks, the Muse towers over patches), and the processors' patch order is the one
    the tower's get_vision_position_ids assumes (Ovis2.5: merge blocks; Muse Glimmer: row-major), frame after frame
    in a video."""
    from transformers.models.muse_glimmer.image_processing_muse_glimmer import MuseGlimmerImageProcessor
    from transformers.models.muse_glimmer.video_processing_muse_glimmer import MuseGlimmerVideoProcessor
    from transformers.models.ovis2_5.image_processing_ovis2_5 import Ovis2_5ImageProcessor
    from transformers.models.ovis2_5.video_processing_ovis2_5 import Ovis2_5VideoProcessor
    from transformers.vision_utils import get_vision_window_index

    grid_thw = torch.tensor([[1, h, w] for h, w in GRIDS])
    for name, (_, _, merge, window) in TOWERS.items():
        index, cu_window = get_vision_window_index(grid_thw, merge, window * merge * PATCH, PATCH)
        cells, lengths, start = [], [], 0
        for h, w in GRIDS:
            blocks = [(r, c) for r in range(h // merge) for c in range(w // merge)]  # row-major merge blocks
            for chunk in qwen_token_chunks((h, w), merge, window):
                cells += [start + blocks.index((r // merge, c // merge)) for r, c in chunk[::merge * merge]]
                lengths.append(len(chunk))
            start += len(blocks)
        assert index.tolist() == cells and torch.diff(cu_window).tolist() == lengths, name

    h, w, frames = 4, 6, 3
    image, video = patch_indexed_image_and_video(h, w, frames, PATCH)  # [1, T, C, H, W] for the video
    merged = dict(patch_size=PATCH, merge_size=2, temporal_patch_size=1)
    single = dict(patch_size=PATCH, temporal_patch_size=1)
    # (processor, its input, patchify's arguments, the merge size of the order it makes)
    cases = [(Ovis2_5ImageProcessor(), image, merged, 2), (Ovis2_5VideoProcessor(), video, merged, 2),
             (MuseGlimmerImageProcessor(), image, single, 1), (MuseGlimmerVideoProcessor(), video, single, 1)]
    for processor, pixels, arguments, merge in cases:
        patches = processor.patchify(pixels, **arguments)[0]
        frame_count = frames if pixels is video else 1
        order = patches.reshape(frame_count * h * w, -1)[:, 0].long().tolist()
        cells = qwen_token_chunks((h, w), merge, None)[0]
        assert order == [100 * f + r * w + c for f in range(frame_count) for r, c in cells], type(processor).__name__


# A video of 3 temporal slices between two images: (t, h, w) patches per grid_thw row.
VIDEO_ROWS = [(1, 6, 4), (3, 4, 6), (1, 2, 14)]
VIDEO_ENTRIES = [(h, w) for t, h, w in VIDEO_ROWS for _ in range(t)]


@pytest.mark.parametrize("name", list(TOWERS))
def test_video_slices_match_eager_attention(name):
    """Each temporal slice of a video is a cu_seqlens chunk of its own (get_vision_cu_seqlens per slice), windowed
    as an image (get_vision_window_index per slice): placed as an image, one fold entry per slice."""
    model = _tower(name)
    patches, grid_thw = _patches(name, VIDEO_ROWS, seed=4), torch.tensor(VIDEO_ROWS)
    calls = eager_attention_calls(_modeling(name), model, patches, grid_thw=grid_thw)
    references = _references(name, model, calls, VIDEO_ENTRIES, LAYER_TYPES)
    model.set_attn_implementation("sdpa")
    rec, per_query = record_packed_statistics(model, patches, grid_thw=grid_thw)
    check_packed_statistics(rec, per_query, references, VIDEO_ENTRIES, _kinds(name, LAYER_TYPES), PATCH)


# Whole vision-language models -----------------------------------------------------------------------------------

TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
            vocab_size=100, head_dim=16)
MUSE = dict(out_hidden_size=4 * 32, projector_hidden_size=32)  # the adapter takes pixel_shuffle's 2 x 2 x hidden
# name -> (config class, model class, the model's config beyond the vision config)
VLMS = {
    "ovis2_5": ("Ovis2_5Config", "Ovis2_5Model", dict(text_config=TEXT)),
    "muse_glimmer": ("MuseGlimmerConfig", "MuseGlimmerModel",
                     dict(text_config=dict(TEXT, bos_token_id=None, eos_token_id=None), **MUSE)),
    "muse_spark": ("MuseSparkConfig", "MuseSparkModel", dict(
        text_config=dict(TEXT, moe_intermediate_size=32, num_local_experts=2, bos_token_id=None, eos_token_id=None),
        audio_config=dict(hidden_sizes=[8, 8, 8, 8], depths=[1, 1, 1, 1], out_hidden_size=32), **MUSE)),
}


@pytest.mark.parametrize("name", list(VLMS))
def test_vision_language_model_records_its_tower_as_the_tower_alone(name):
    """The whole model's get_image_features records its ``vision_tower`` only (the text layers skipped), the same
    as the tower alone on the same inputs."""
    config_name, model_name, settings = VLMS[name]
    config = getattr(transformers, config_name)(vision_config=_tower(name).config.to_dict(),
                                                attn_implementation="sdpa", **settings)
    torch.manual_seed(0)
    model = sharpened(getattr(transformers, model_name)(config))
    rows = [(1, h, w) for h, w in GRIDS]
    patches, grid_thw = _patches(name, rows, seed=1), torch.tensor(rows)
    with torch.no_grad():
        plain = model.get_image_features(patches, image_grid_thw=grid_thw).pooler_output
        with vitmad.record(model, reduction="none", stats=PACKED_STATS) as whole:
            recorded = model.get_image_features(patches, image_grid_thw=grid_thw).pooler_output
        with vitmad.record(model.vision_tower, reduction="none", stats=PACKED_STATS) as alone:
            model.vision_tower(patches, grid_thw=grid_thw)
    assert all(torch.equal(a, b) for a, b in zip(plain, recorded))
    assert whole.layers == [f"vision_tower.{layer}" for layer in alone.layers] and len(alone.layers) == 3
    assert [g.attention for g in whole.geometry] == _kinds(name, LAYER_TYPES) and len(whole.calls) == 1
    for stat in ("mad", "entropy", "prefix_mass"):
        for mine, own in zip(whole.stats[stat], alone.stats[stat]):
            torch.testing.assert_close(mine, own, equal_nan=True)
