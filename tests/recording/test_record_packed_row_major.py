"""vitmad.record on packed native-resolution towers whose images are not in Qwen2-VL's fixed merge-block order:
PaddleOCR-VL, HunYuanVL, HY-V4-VL and Kimi-K2.5 (each image's patches row-major, one ``cu_seqlens`` chunk per
image) and VideoLLaMA3 (a merge size per image, ``merge_sizes``: each image in merge blocks of its own size, 1
being row-major).

Tiny random-weight towers get three images of different sizes packed in one call. The reference is each model's
own eager attention probabilities, captured call by call from its modeling file's ``eager_attention_forward``,
placed by geometry written here from reading the modeling files and the image processors (not the code under
test): PaddleOCR-VL's encoder takes rotary position ids ``get_vision_position_ids(grid_thw, 1)`` and its processor
cuts patches ``[grid_h, grid_w]`` row-major; HunYuanVL's and HY-V4-VL's learned position grids are interpolated to
``h x w`` and added row-major, their patch mergers fold each image's run row-major, their processors permute the
patches to row-major; Kimi-K2.5's processor cuts them row-major and its rotary ids are
``get_vision_position_ids(grid_thw, 1)``; VideoLLaMA3's processor cuts ``m x m`` blocks row-major, patches row-major
in a block (``get_vision_position_ids(grid_thw, merge_sizes)``, ``pixel_unshuffle`` undoing it). Each patch sits at
``(row + 0.5, col + 0.5) * PATCH`` pixels of its own image; a query's MAD, entropy and prefix mass are over the keys
of its own call, in float64. A video's frames are chunks of their own in HY-V4-VL and VideoLLaMA3 (placed as
images); HunYuanVL runs no video: refused (Kimi-K2.5 attends a whole clip in one chunk: test_record_packed_clips.py).
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
    register_flash_like,
    sharpened,
)

transformers = pytest.importorskip("transformers")

PATCH = 4
# (h, w) patches: a tall image, a square one and a strip, even sides (VideoLLaMA3's 2 x 2 merge blocks fit).
GRIDS = [(6, 4), (10, 10), (2, 14)]
MERGE_SIZES = [2, 1, 2]  # VideoLLaMA3: the square image row-major, the others in 2 x 2 merge blocks


def _row_major(grid: tuple[int, int], merge: int = 1) -> list[tuple[int, int]]:
    """One image's (row, col) in sequence order: row-major, or in ``merge x merge`` blocks (blocks row-major,
    patches row-major in a block, conftest.qwen_token_chunks)."""
    if merge > 1:
        return qwen_token_chunks(grid, merge, None)[0]
    return [(r, c) for r in range(grid[0]) for c in range(grid[1])]


# name -> (modeling module, config class, tower class, pixel values of n patches)
TOWERS = {
    "paddleocr_vl": ("paddleocr_vl", "PaddleOCRVisionConfig", "PaddleOCRVisionModel",
                     lambda n: torch.randn(1, n, 3, PATCH, PATCH)),
    "hunyuan_vl": ("hunyuan_vl", "HunYuanVLVisionConfig", "HunYuanVLVisionTransformer",
                   lambda n: torch.randn(n, 3 * PATCH * PATCH)),
    "hy_v4_vl": ("hy_v4_vl", "HYV4VLVisionConfig", "HYV4VLVisionModel", lambda n: torch.randn(n, 3 * PATCH * PATCH)),
    "kimi_k25": ("kimi_k25", "Kimi_K25VisionConfig", "Kimi_K25VisionModel", lambda n: torch.randn(n, 3, PATCH, PATCH)),
    "video_llama_3": ("video_llama_3", "VideoLlama3VisionConfig", "VideoLlama3VisionModel",
                      lambda n: torch.randn(n, 3 * PATCH * PATCH)),
}
# Where each tower keeps its attention modules, for the reference's call order.
ATTENTION = {"paddleocr_vl": lambda m: [layer.self_attn for layer in m.vision_model.encoder.layers],
             "video_llama_3": lambda m: [layer.self_attn for layer in m.encoder.layers],
             "kimi_k25": lambda m: [layer.attn for layer in m.layers]}


def _modeling(name: str):
    module = TOWERS[name][0]
    return importlib.import_module(f"transformers.models.{module}.modeling_{module}")


def _tower(name: str) -> torch.nn.Module:
    module, config_name, tower_name, _ = TOWERS[name]
    settings = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                    patch_size=PATCH, attn_implementation="eager")
    settings.update({"paddleocr_vl": dict(image_size=16),
                     "hunyuan_vl": dict(max_image_size=16, text_hidden_size=32, out_hidden_size=32),
                     "hy_v4_vl": dict(max_image_size=16, out_hidden_size=32),
                     "kimi_k25": dict(pos_emb_height=4, pos_emb_width=4)}.get(name, {}))
    config_class = getattr(importlib.import_module(f"transformers.models.{module}.configuration_{module}"),
                           config_name)
    torch.manual_seed(0)  # the leaves sharpened does not draw (position tables) the same in any test order
    return sharpened(getattr(_modeling(name), tower_name)(config_class(**settings)))


def _attention_modules(name: str, model) -> list:
    return ATTENTION.get(name, lambda m: [layer.self_attn for layer in m.layers])(model)


def _inputs(name: str, rows: list[tuple[int, int, int]], merges: list[int] | None = None, seed: int = 1):
    """The tower's arguments for the grid_thw ``rows``, in the tower's (and its processor's) layout."""
    torch.manual_seed(seed)
    kwargs = {"grid_thw": torch.tensor(rows)}
    if name == "video_llama_3":
        kwargs["merge_sizes"] = torch.tensor(merges)
    return (TOWERS[name][3](sum(t * h * w for t, h, w in rows)),), kwargs


def _references(calls: list, model, name: str, entries: list[tuple[tuple[int, int], int]]) -> list[dict]:
    """One call per fold entry (an image or a video's frame, ``(grid, merge)`` in ``entries``) and layer, layer
    after layer, each over the entry's tokens in its own order."""
    chunks = [(index, _row_major(grid, merge)) for index, (grid, merge) in enumerate(entries)]
    layers = [(module, chunks) for module in _attention_modules(name, model)]
    return packed_chunk_references(calls, layers, [grid for grid, _ in entries], PATCH)


# Images ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("name", list(TOWERS))
def test_packed_images_match_eager_attention(name, attn_implementation):
    model = _tower(name)
    rows = [(1, h, w) for h, w in GRIDS]
    merges = MERGE_SIZES if name == "video_llama_3" else [1] * len(GRIDS)
    args, kwargs = _inputs(name, rows, merges)
    calls = eager_attention_calls(_modeling(name), model, *args, **kwargs)
    references = _references(calls, model, name, list(zip(GRIDS, merges)))
    model.set_attn_implementation(attn_implementation)
    rec, per_query = record_packed_statistics(model, *args, **kwargs)
    check_packed_statistics(rec, per_query, references, GRIDS, ["global per image"] * 2, PATCH)


def test_row_major_order_is_the_towers_own():
    """The order written here is the one the towers' own position ids and mergers assume: transformers'
    get_vision_position_ids with merge size 1 (PaddleOCR-VL, Kimi-K2.5) or VideoLLaMA3's merge_sizes, and the
    processors' patch order (a pixel's patch lands at the token the order says)."""
    from transformers.vision_utils import get_vision_position_ids

    grid_thw = torch.tensor([[1, h, w] for h, w in GRIDS])
    assert get_vision_position_ids(grid_thw, 1).tolist() == [list(c) for g in GRIDS for c in _row_major(g)]
    cells = [list(c) for g, m in zip(GRIDS, MERGE_SIZES) for c in _row_major(g, m)]
    assert get_vision_position_ids(grid_thw, torch.tensor(MERGE_SIZES)).tolist() == cells

    from transformers.models.hunyuan_vl.image_processing_hunyuan_vl import HunYuanVLImageProcessor
    from transformers.models.hy_v4_vl.image_processing_hy_v4_vl import HYV4VLImageProcessor
    from transformers.models.hy_v4_vl.video_processing_hy_v4_vl import HYV4VLVideoProcessor
    from transformers.models.kimi_k25.image_processing_kimi_k25 import Kimi_K25ImageProcessor
    from transformers.models.paddleocr_vl.image_processing_paddleocr_vl import PaddleOCRVLImageProcessor
    from transformers.models.video_llama_3.image_processing_video_llama_3 import VideoLlama3ImageProcessor
    from transformers.models.video_llama_3.video_processing_video_llama_3 import VideoLlama3VideoProcessor

    h, w, frames = 4, 6, 3
    image, video = patch_indexed_image_and_video(h, w, frames, PATCH)  # [1, T, C, H, W] for the video
    merged = dict(patch_size=PATCH, merge_size=2, temporal_patch_size=1)
    # (processor, its input, patchify's arguments, the merge size of the order it makes)
    cases = [(PaddleOCRVLImageProcessor(), image, merged, 1), (HunYuanVLImageProcessor(), image, merged, 1),
             (HYV4VLImageProcessor(), image, merged, 1), (HYV4VLVideoProcessor(), video, merged, 1),
             (Kimi_K25ImageProcessor(), image, dict(patch_size=PATCH), 1),
             (VideoLlama3ImageProcessor(), image, merged, 2), (VideoLlama3ImageProcessor(), image,
                                                               {**merged, "merge_size": 1}, 1),
             (VideoLlama3VideoProcessor(), video, merged, 2)]
    for processor, pixels, arguments, merge in cases:
        patches = processor.patchify(pixels, **arguments)[0]
        frame_count = frames if pixels is video else 1
        order = patches.reshape(frame_count * h * w, -1)[:, 0].long().tolist()
        expected = [100 * f + r * w + c for f in range(frame_count) for r, c in _row_major((h, w), merge)]
        assert order == expected, type(processor).__name__


# Videos ---------------------------------------------------------------------------------------------------------

# A video of 3 frames between two images: (t, h, w) patches per grid_thw row.
VIDEO_ROWS = [(1, 6, 4), (3, 4, 6), (1, 2, 14)]
VIDEO_MERGES = [1, 2, 2]


@pytest.mark.parametrize("name", ["hy_v4_vl", "video_llama_3"])
def test_video_frames_match_eager_attention(name):
    """HY-V4-VL and VideoLLaMA3 attend each frame of a video in a chunk of its own (get_vision_cu_seqlens per
    temporal slice, temporal_patch_size 1), its patches in an image's order: each frame is placed as an image."""
    model = _tower(name)
    args, kwargs = _inputs(name, VIDEO_ROWS, VIDEO_MERGES, seed=4)
    merges = VIDEO_MERGES if name == "video_llama_3" else [1] * len(VIDEO_ROWS)
    entries = [((h, w), m) for (t, h, w), m in zip(VIDEO_ROWS, merges) for _ in range(t)]
    calls = eager_attention_calls(_modeling(name), model, *args, **kwargs)
    references = _references(calls, model, name, entries)
    model.set_attn_implementation("sdpa")
    rec, per_query = record_packed_statistics(model, *args, **kwargs)
    check_packed_statistics(rec, per_query, references, [grid for grid, _ in entries], ["global per image"] * 2,
                            PATCH)


@pytest.mark.parametrize("name, reason", [
    ("hunyuan_vl", r"its patch merger folds a whole grid_thw row into one h x w map, so it runs no video"),
])
def test_video_rows_are_refused(name, reason):
    model = _tower(name)
    args, kwargs = _inputs(name, VIDEO_ROWS)
    attention = type(_attention_modules(name, model)[0]).__name__
    with torch.no_grad(), vitmad.record(model) as rec, pytest.raises(
            ValueError, match=rf"\({attention}\).*grid_thw \(t, h, w in patches: \[\(1, 6, 4\), \(3, 4, 6\), "
                              rf"\(1, 2, 14\)\]\) holds a video \(t > 1\).*{reason}.*record images"):
        model(*args, **kwargs)
    assert all(call.layers == [] for call in rec.calls)


# Refusals ---------------------------------------------------------------------------------------------------------

def test_precomputed_position_ids_are_refused():
    """VideoLLaMA3's tower takes precomputed rotary position ids (get_vision_position_ids pops them): the token order
    is then the caller's, not the one merge_sizes makes, so it is refused."""
    from transformers.vision_utils import get_vision_position_ids

    model = _tower("video_llama_3")
    args, kwargs = _inputs("video_llama_3", [(1, h, w) for h, w in GRIDS], MERGE_SIZES)
    position_ids = get_vision_position_ids(kwargs["grid_thw"], kwargs["merge_sizes"])
    with torch.no_grad():
        model(*args, **kwargs, position_ids=position_ids)  # the model runs it
        with vitmad.record(model) as rec, pytest.raises(
                ValueError, match=r"VideoLlama3VisionModel was given precomputed position_ids; vitmad places the "
                                  r"tokens by the order the tower derives from grid_thw"):
            model(*args, **kwargs, position_ids=position_ids)
    assert all(call.layers == [] for call in rec.calls)


def test_flash_attention_over_several_images_is_refused():
    """Flash attention attends the packed images in one variable-length call whose chunks vitmad's capture does
    not receive: refused. Simulated on the CPU by an attention function registered under a flash name."""
    name = register_flash_like("flash_attention_vitmad_test")
    model = _tower("paddleocr_vl")
    model.config._attn_implementation = name
    args, kwargs = _inputs("paddleocr_vl", [(1, h, w) for h, w in GRIDS])
    with torch.no_grad(), vitmad.record(model) as rec, pytest.raises(
            ValueError, match=r"layers\.0\.self_attn .*one call \[1, 2, 152, 152\] over the whole packed sequence of "
                              r"3 chunks \(flash attention"):
        model(*args, **kwargs)
    assert all(call.layers == [] for call in rec.calls)


# Whole vision-language models ----------------------------------------------------------------------------------

TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
            vocab_size=100, head_dim=16)
# name -> (config class, model class, its tower's attribute, the model's config beyond the two sub-configs)
VLMS = {
    "paddleocr_vl": ("PaddleOCRVLConfig", "PaddleOCRVLModel", "visual", dict(text_config=TEXT)),
    "hunyuan_vl": ("HunYuanVLConfig", "HunYuanVLModel", "vision_tower", dict(text_config=TEXT)),
    "hy_v4_vl": ("HYV4VLConfig", "HYV4VLModel", "vision_tower", dict(text_config=dict(
        TEXT, moe_intermediate_size=32, n_routed_experts=2, num_experts_per_tok=1, q_lora_rank=16, kv_lora_rank=16,
        qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=16, index_topk=4, index_head_dim=8, index_n_heads=2,
        pad_token_id=0, bos_token_id=None, eos_token_id=None,
        rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 1, 1]}),
        attn_implementation={"text_config": "eager", "vision_config": "sdpa"})),  # its text attention: eager only
    "kimi_k25": ("Kimi_K25Config", "Kimi_K25Model", "vision_tower",
                 dict(text_config=dict(TEXT, model_type="llama"), projection_hidden_size=32)),
    "video_llama_3": ("VideoLlama3Config", "VideoLlama3Model", "vision_model", dict(text_config=TEXT)),
}


@pytest.mark.parametrize("name", list(VLMS))
def test_vision_language_model_records_its_tower_as_the_tower_alone(name):
    """The whole model's get_image_features records its vision tower only (the text layers skipped), the same as
    the tower alone on the inputs the model gives it."""
    config_name, model_name, tower, settings = VLMS[name]
    vision = _tower(name).config.to_dict()
    config = getattr(transformers, config_name)(vision_config=vision, **{"attn_implementation": "sdpa", **settings})
    torch.manual_seed(0)
    model = sharpened(getattr(transformers, model_name)(config))
    tower = getattr(model, tower)
    rows = [(1, h, w) for h, w in GRIDS]
    (pixels,), kwargs = _inputs(name, rows, MERGE_SIZES)
    features = {"pixel_values": pixels.reshape(-1, *pixels.shape[2:]) if name == "paddleocr_vl" else pixels,
                "image_grid_thw": kwargs["grid_thw"]}
    if name == "video_llama_3":
        features["image_merge_sizes"] = kwargs["merge_sizes"]
    given = []
    hook = tower.register_forward_pre_hook(lambda module, args, kw: given.append((args, kw)), with_kwargs=True)
    with torch.no_grad():
        plain = model.get_image_features(**features).last_hidden_state
        hook.remove()
        with vitmad.record(model, reduction="none", stats=PACKED_STATS) as whole:
            recorded = model.get_image_features(**features).last_hidden_state
        with vitmad.record(tower, reduction="none", stats=PACKED_STATS) as alone:
            tower(*given[0][0], **given[0][1])
    assert torch.equal(plain, recorded)
    assert whole.layers == [f"{VLMS[name][2]}.{layer}" for layer in alone.layers] and len(alone.layers) == 2
    assert whole.geometry[0].image_grids == tuple(GRIDS) and len(whole.calls) == 1
    for stat in ("mad", "entropy", "prefix_mass"):
        for mine, own in zip(whole.stats[stat], alone.stats[stat]):
            torch.testing.assert_close(mine, own, equal_nan=True)
