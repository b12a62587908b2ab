"""vitmad.record on the transformers 5.25.0 vision towers examined after the packed towers: MiniMax-M3-VL,
Cosmos3-Edge and LFM3-VL are packed in Qwen2-VL's merge-block order with one ``cu_seqlens`` chunk per image (each
proven here against its own eager attention and its own image processor); Cosmos3-Edge and LFM3-VL give each
temporal slice of a video a chunk of its own, each slice placed as an image (proven the same way, and against their
video processors); MiniMax-M3-VL attends a whole clip in one chunk, placed in space and time
(test_record_packed_clips.py). Cosmos3-Omni adds no tower (its
``visual`` is Qwen3-VL's); lara_mini and olmo_hybrid are text-only models. RADIO, examined with them, has its own
family and tests (test_record_radio.py).

Tiny random-weight towers get three images of different sizes (odd numbers of merge blocks a side) packed in one
call. The reference is each model's own eager attention probabilities, captured call by call from its modeling
file's ``eager_attention_forward``, placed by geometry written here (conftest's ``qwen_token_chunks``, loops written
from transformers' modeling files, not vitmad's placer): tokens in spatial-merge blocks of ``MERGE x MERGE``
patches, blocks row-major over the image and patches row-major in a block, one call per image; each patch at
``(row + 0.5, col + 0.5) * PATCH`` pixels of its own image; a query's MAD over the keys of its own call, in float64.
"""

from __future__ import annotations

import importlib
import math

import numpy as np
import pytest
import torch

import vitmad
from conftest import (
    check_packed_values,
    chunk_token_mad,
    eager_attention_calls,
    qwen_token_chunks,
    record_packed_forward,
    self_similar_attention,
    sharpened,
)

transformers = pytest.importorskip("transformers")

# Recorded float32 MAD against float64 on the eager float32 probabilities; MADs here are 4 to 40 px.
TOL = {"rtol": 1e-5, "atol": 1e-4}
PATCH, MERGE = 4, 2  # 4 px patches, 2 x 2 merge blocks
# (h, w) patches: 3 x 2, 5 x 5 and 1 x 7 merge blocks.
GRIDS = [(6, 4), (10, 10), (2, 14)]

# name -> (modeling module, tower class, attention class, qualified names of its attention modules, temporal patch)
TOWERS = {
    "minimax_m3_vl": ("minimax_m3_vl", "MiniMaxM3VLVisionModel", "MiniMaxM3VLVisionAttention",
                      ["layers.0.self_attn", "layers.1.self_attn"], 2),
    "cosmos3_edge": ("cosmos3_edge", "Cosmos3EdgeVisionModel", "Cosmos3EdgeVisionAttention",
                     ["encoder.layers.0.self_attn", "encoder.layers.1.self_attn"], 1),
    # An attention layer, a gated convolution layer (its Conv2d runs once per image), an attention layer.
    "lfm3_vl": ("lfm3_vl", "Lfm3VlVisionModel", "Lfm3VlVisionAttention", ["layers.0.self_attn", "layers.2.self_attn"],
                2),
}


def _modeling(name: str):
    module = TOWERS[name][0]
    return importlib.import_module(f"transformers.models.{module}.modeling_{module}")


def _config(name: str):
    common = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, patch_size=PATCH,
                  spatial_merge_size=MERGE)
    if name == "minimax_m3_vl":
        # head_dim 24: its 3D rotary embedding rotates 2 * (24 // 3 // 2) = 8 dims per axis
        return transformers.MiniMaxM3VLVisionConfig(**{**common, "hidden_size": 48}, num_hidden_layers=2,
                                                    temporal_patch_size=2)
    if name == "cosmos3_edge":
        return transformers.Cosmos3EdgeVisionConfig(**common, num_hidden_layers=2, num_patches=16)
    # grouped-query attention: one key head for the two query heads
    return transformers.Lfm3VlVisionConfig(**common, num_hidden_layers=3, num_key_value_heads=1, temporal_patch_size=2,
                                           layer_types=["full_attention", "conv", "full_attention"])


def _tower(name: str) -> torch.nn.Module:
    _, tower_name, attention_name, layers, _ = TOWERS[name]
    model = getattr(_modeling(name), tower_name)(_config(name))
    assert [type(model.get_submodule(layer)).__name__ for layer in layers] == [attention_name] * 2
    return sharpened(model)


def _inputs(name: str):
    grid_thw = torch.tensor([[1, h, w] for h, w in GRIDS])
    torch.manual_seed(1)
    return torch.randn(sum(h * w for h, w in GRIDS), 3 * TOWERS[name][4] * PATCH * PATCH), grid_thw


def _expected_per_layer(model, calls: list, layers: list, grids, chunks) -> list[list[torch.Tensor]]:
    """Per layer, per fold entry (an image or a video's slice of ``grids[i]`` patches, its tokens ``chunks[i]``),
    the per-query float64 MAD ``[2 heads, h * w]`` row-major from the eager ``calls``: one call per entry and
    layer, layer after layer."""
    expected_per_layer = []
    for layer, layer_name in enumerate(layers):
        expected = []
        for entry, (grid, chunk) in enumerate(zip(grids, chunks)):
            module, probabilities = calls[layer * len(grids) + entry]
            assert module is model.get_submodule(layer_name) and probabilities.shape[-1] == len(chunk)
            values = torch.full((2, grid[0] * grid[1]), float("nan"), dtype=torch.float64)
            per_token = chunk_token_mad(probabilities, chunk, PATCH)
            for q, (r, c) in enumerate(chunk):
                values[:, r * grid[1] + c] = per_token[:, q]
            assert not values.isnan().any()
            expected.append(values)
        expected_per_layer.append(expected)
    return expected_per_layer


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("name", list(TOWERS))
def test_packed_images_match_eager_attention(name, attn_implementation):
    model = _tower(name)
    layers = TOWERS[name][3]
    patches, grid_thw = _inputs(name)
    chunks = [qwen_token_chunks(grid, MERGE, None)[0] for grid in GRIDS]  # one chunk: the whole image

    # The order written here is the one the rotary position ids of MiniMax-M3-VL and LFM3-VL assume.
    if name != "cosmos3_edge":
        from transformers.vision_utils import get_vision_position_ids
        positions = get_vision_position_ids(grid_thw, MERGE, include_temporal=name == "minimax_m3_vl")
        assert positions[:, -2:].tolist() == [list(cell) for chunk in chunks for cell in chunk]

    calls = eager_attention_calls(_modeling(name), model, patches, grid_thw=grid_thw)
    assert len(calls) == len(layers) * len(GRIDS)  # one call per image and attention layer
    expected_per_layer = _expected_per_layer(model, calls, layers, GRIDS, chunks)

    model.set_attn_implementation(attn_implementation)
    rec, rec_mean = record_packed_forward(model, patches, grid_thw=grid_thw)
    assert rec.layers == layers and len(rec.calls) == 1
    check_packed_values(rec, expected_per_layer, GRIDS, ["global per image"] * 2, TOL)
    means = torch.stack([torch.stack([e.mean(-1) for e in layer]) for layer in expected_per_layer])
    torch.testing.assert_close(rec_mean.mad.double(), means, **TOL)  # [L, n_images, H]


def _processor(name: str):
    """The image processor each model's checkpoints use (LFM3-VL's, per transformers' auto map, Qwen2-VL's), without
    resizing or rescaling, so that a patch's values come through as they are."""
    from transformers.models.auto.image_processing_auto import IMAGE_PROCESSOR_MAPPING_NAMES

    if name == "minimax_m3_vl":
        from transformers.models.minimax_m3_vl.image_processing_minimax_m3_vl import MiniMaxM3VLImageProcessor as cls
    elif name == "cosmos3_edge":
        from transformers.models.cosmos3_edge.image_processing_cosmos3_edge import Cosmos3EdgeImageProcessor as cls
    else:
        assert IMAGE_PROCESSOR_MAPPING_NAMES["lfm3_vl"]["torchvision"] == "Qwen2VLImageProcessor"
        cls = transformers.Qwen2VLImageProcessor
    return cls(patch_size=PATCH, merge_size=MERGE, temporal_patch_size=TOWERS[name][4], do_resize=False,
               do_rescale=False, do_normalize=False)


@pytest.mark.parametrize("name", list(TOWERS))
def test_image_processor_orders_the_patches_in_merge_blocks(name):
    """The model's image processor feeds the tower the order its attention is checked against above: each patch of
    the image, filled with a value naming its (row, col), comes out where the merge-block order puts it."""
    pixels = [np.zeros((h * PATCH, w * PATCH, 3), dtype=np.uint8) for h, w in GRIDS]
    for image, (h, w) in zip(pixels, GRIDS):
        for r in range(h):
            for c in range(w):
                image[r * PATCH:(r + 1) * PATCH, c * PATCH:(c + 1) * PATCH] = r * 16 + c
    out = _processor(name)(images=pixels, return_tensors="pt")
    assert out["image_grid_thw"].tolist() == [[1, h, w] for h, w in GRIDS]
    values = out["pixel_values"]
    assert values.shape[-1] == 3 * TOWERS[name][4] * PATCH * PATCH
    assert torch.equal(values.amin(-1), values.amax(-1))  # one value per patch
    cells = [(r * 16 + c) for grid in GRIDS for r, c in qwen_token_chunks(grid, MERGE, None)[0]]
    assert values[:, 0].long().tolist() == cells


# A video of 3 temporal slices of 5 x 3 merge blocks between two images: (t, h, w) patches per grid_thw row.
VIDEO_ROWS = [(1, 6, 4), (3, 10, 6), (1, 2, 14)]
VIDEO_ENTRIES = [(h, w) for t, h, w in VIDEO_ROWS for _ in range(t)]  # each image, each slice in time order


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("name", ["cosmos3_edge", "lfm3_vl"])
def test_video_slices_match_eager_attention(name, attn_implementation):
    """Cosmos3-Edge and LFM3-VL attend a video one temporal slice at a time (transformers' get_vision_cu_seqlens:
    one chunk of h * w tokens per slice, in an image's merge-block order; Cosmos3-Edge repeats its position grid per
    frame, LFM3-VL's rotary position ids repeat per slice and its convolutions run per slice): each slice is placed
    as an image, one entry per slice."""
    model = self_similar_attention(_tower(name))  # each slice's attention its own: a slice misplaced would show
    layers = TOWERS[name][3]
    grid_thw = torch.tensor(VIDEO_ROWS)
    torch.manual_seed(3)
    patches = torch.randn(sum(t * h * w for t, h, w in VIDEO_ROWS), 3 * TOWERS[name][4] * PATCH * PATCH)
    chunks = [qwen_token_chunks(grid, MERGE, None)[0] for grid in VIDEO_ENTRIES]  # one chunk: the whole slice

    if name == "lfm3_vl":  # its rotary position ids: each slice's cells in the order written here
        from transformers.vision_utils import get_vision_position_ids
        positions = get_vision_position_ids(grid_thw, MERGE)
        assert positions.tolist() == [list(cell) for chunk in chunks for cell in chunk]

    calls = eager_attention_calls(_modeling(name), model, patches, grid_thw=grid_thw)
    assert len(calls) == len(layers) * len(VIDEO_ENTRIES)  # one call per slice (or image) and attention layer
    for _, probabilities in calls:
        entropy = -(probabilities * probabilities.clamp_min(1e-300).log()).sum(-1).mean()
        assert float(entropy) < 0.6 * math.log(probabilities.shape[-1])  # far from uniform
    expected_per_layer = _expected_per_layer(model, calls, layers, VIDEO_ENTRIES, chunks)

    model.set_attn_implementation(attn_implementation)
    rec, rec_mean = record_packed_forward(model, patches, grid_thw=grid_thw)  # the output bit-identical
    assert rec.layers == layers and len(rec.calls) == 1
    check_packed_values(rec, expected_per_layer, VIDEO_ENTRIES, ["global per image"] * 2, TOL)
    means = torch.stack([torch.stack([e.mean(-1) for e in layer]) for layer in expected_per_layer])
    torch.testing.assert_close(rec_mean.mad.double(), means, **TOL)  # [L, n_entries, H]


@pytest.mark.parametrize("name", ["cosmos3_edge", "lfm3_vl"])
def test_video_processor_orders_each_slice_as_an_image(name):
    """The model's video processor (LFM3-VL's, per transformers' auto map, Qwen3-VL's) feeds the tower the order its
    attention is checked against above: slice after slice, each in the merge-block order of an image. Each patch of
    each frame is filled with a value naming its (slice, row, col)."""
    from transformers.models.auto.video_processing_auto import VIDEO_PROCESSOR_MAPPING_NAMES

    if name == "cosmos3_edge":
        from transformers.models.cosmos3_edge.video_processing_cosmos3_edge import Cosmos3EdgeVideoProcessor as cls
        options = {}
    else:
        assert VIDEO_PROCESSOR_MAPPING_NAMES["lfm3_vl"]["torchvision"] == "Qwen3VLVideoProcessor"
        cls, options = transformers.Qwen3VLVideoProcessor, {"cap_pixels_per_frame": False}
    temporal = TOWERS[name][4]
    t, h, w = VIDEO_ROWS[1]
    frames = np.zeros((t * temporal, h * PATCH, w * PATCH, 3), dtype=np.uint8)
    for frame in range(t * temporal):
        for r in range(h):
            for c in range(w):
                frames[frame, r * PATCH:(r + 1) * PATCH, c * PATCH:(c + 1) * PATCH] = frame // temporal * 80 + r * 8 + c
    processor = cls(patch_size=PATCH, merge_size=MERGE, temporal_patch_size=temporal, do_resize=False,
                    do_rescale=False, do_normalize=False, do_sample_frames=False, **options)
    out = processor(videos=[frames], return_tensors="pt")
    assert out["video_grid_thw"].tolist() == [[t, h, w]]
    values = out["pixel_values_videos"]
    assert values.shape[-1] == 3 * temporal * PATCH * PATCH
    assert torch.equal(values.amin(-1), values.amax(-1))  # one value per patch
    cells = [s * 80 + r * 8 + c for s in range(t) for r, c in qwen_token_chunks((h, w), MERGE, None)[0]]
    assert values[:, 0].long().tolist() == cells


@pytest.mark.parametrize("video", [False, True])
def test_lfm3_vision_language_model_records_its_vision_tower_as_the_tower_alone(video):
    """A whole LFM3-VL model (its language model's short convolutions and attention beside the tower) records the
    tower's attention layers only, in one call per forward, as the tower alone does: images (get_image_features),
    and a video between two images (get_video_features, one entry per slice)."""
    config = transformers.Lfm3VlConfig(
        vision_config=_config("lfm3_vl").to_dict(),
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=100, layer_types=["conv", "full_attention"],
                         pad_token_id=0, bos_token_id=1, eos_token_id=2),
        projector_hidden_size=32)
    torch.manual_seed(0)
    model = transformers.Lfm3VlModel(config).eval()
    model.set_attn_implementation("sdpa")
    patches, grid_thw = _inputs("lfm3_vl")
    if video:
        grid_thw = torch.tensor(VIDEO_ROWS)
        patches = torch.randn(sum(t * h * w for t, h, w in VIDEO_ROWS), patches.shape[-1])
    with torch.no_grad():
        with vitmad.record(model, reduction="none") as rec:
            if video:
                model.get_video_features(patches, video_grid_thw=grid_thw)
            else:
                model.get_image_features(patches, image_grid_thw=grid_thw)
        with vitmad.record(model.vision_tower, reduction="none") as alone:
            model.vision_tower(patches, grid_thw=grid_thw)
    assert rec.layers == ["vision_tower.layers.0.self_attn", "vision_tower.layers.2.self_attn"]
    assert len(rec.calls) == 1 and len(alone.calls) == 1
    assert [g.image_grids for g in rec.geometry] == [tuple(VIDEO_ENTRIES if video else GRIDS)] * 2
    for whole, own in zip(rec.per_layer, alone.per_layer, strict=True):
        torch.testing.assert_close(whole, own, equal_nan=True)


def test_cosmos3_omni_vision_tower_is_qwen3_vl():
    """Cosmos3-Omni adds no tower of its own: its ``visual`` is Qwen3-VL's ``Qwen3VLVisionModel``, recorded as such
    (test_record_packed.py)."""
    config = transformers.Cosmos3OmniConfig(vision_config=dict(depth=1, hidden_size=32, intermediate_size=64,
                                                               num_heads=2, out_hidden_size=32))
    assert type(config.vision_config).__name__ == "Qwen3VLVisionConfig"
    assert type(transformers.AutoModel.from_config(config.vision_config)).__name__ == "Qwen3VLVisionModel"
