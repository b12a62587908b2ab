"""vitmad.record on packed towers that attend a whole clip in one ``cu_seqlens`` chunk: MiniMax-M3-VL
(``MiniMaxM3VLVisionModel``) and Kimi-K2.5 (``Kimi_K25VisionModel``). Inkling2 stays refused (no video processor).

Geometry written here from reading transformers 5.25's modeling files and video processors, not vitmad's placer:

- both towers take ``cu_seqlens = get_vision_cu_seqlens(grid_thw, merge_temporal=True)``: one chunk per
  ``grid_thw`` row ``(t, h, w)`` of ``t * h * w`` tokens, attended as one call without flash attention;
- MiniMax-M3-VL: a row's tokens are its ``t`` temporal patches in time order, each patch's ``h * w`` tokens in
  ``MERGE x MERGE`` merge blocks (blocks row-major, patches row-major in a block): its rotary position ids
  ``get_vision_position_ids(grid_thw, MERGE, include_temporal=True)`` and its video processor's permute
  ``(bs, grid_t, h/m, w/m, m, m, c, tps, p, p)``; a token is a ``Conv3d`` tubelet of ``temporal_patch_size`` frames
  (the processor stacks them as ``(c, tps, p, p)``, the embedding views them so), its time the centre of those
  frames, ``(slice + 0.5) * tps``;
- Kimi-K2.5: a row's tokens are its ``t`` frames in time order, each frame row-major (its video processor's permute
  ``(b, t, h, w, c, p, p)``, rotary ids ``get_vision_position_ids(grid_thw, 1)``, a frame index per token for its
  time embedding); a token is a ``Conv2d`` patch of one frame, at ``frame + 0.5`` frames.

Each token sits at ``((row + 0.5) * PATCH, (col + 0.5) * PATCH)`` pixels of its frame. A query's MAD is over the
keys of its own row (every frame of its clip), its temporal MAD the same mean of ``|time_q - time_k|``, from each
model's own eager attention probabilities in float64.
"""

from __future__ import annotations

import importlib
import math

import numpy as np
import pytest
import torch

import vitmad
from conftest import (
    PACKED_STATS,
    eager_attention_calls,
    qwen_token_chunks,
    record_packed_statistics,
    register_flash_like,
    sharpened,
)

transformers = pytest.importorskip("transformers")

PATCH, MERGE = 4, 2
# name -> (modeling module, tower class, attention modules of a tower, frames a token spans, merge of its order)
TOWERS = {
    "minimax_m3_vl": ("minimax_m3_vl", "MiniMaxM3VLVisionModel", lambda m: [layer.self_attn for layer in m.layers],
                      2, MERGE),
    "kimi_k25": ("kimi_k25", "Kimi_K25VisionModel", lambda m: [layer.attn for layer in m.layers], 1, 1),
}
# grid_thw rows: a clip and an image; two clips of different lengths and sizes; two clips alike.
CALLS = {
    "clip and image": [(3, 4, 6), (1, 6, 4)],
    "two clips": [(2, 6, 4), (4, 4, 6)],
    "clips alike": [(3, 4, 4), (3, 4, 4)],
}


def _modeling(name: str):
    module = TOWERS[name][0]
    return importlib.import_module(f"transformers.models.{module}.modeling_{module}")


def _vision_config(name: str):
    common = dict(intermediate_size=64, num_attention_heads=2, patch_size=PATCH, num_hidden_layers=2)
    if name == "minimax_m3_vl":
        # head_dim 24: its 3D rotary embedding rotates 8 dims per axis (time included)
        return transformers.MiniMaxM3VLVisionConfig(**common, hidden_size=48, spatial_merge_size=MERGE,
                                                    temporal_patch_size=2)
    return transformers.Kimi_K25VisionConfig(**common, hidden_size=32, pos_emb_height=4, pos_emb_width=4,
                                             pos_emb_time=4)


def _tower(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = sharpened(getattr(_modeling(name), TOWERS[name][1])(_vision_config(name)))
    if name == "kimi_k25":  # its attention over a whole clip is still wide at std 0.25: sharper queries
        with torch.no_grad():
            for attention in TOWERS[name][2](model):
                attention.q_proj.weight.mul_(3)
    return model


def _pixels(name: str, rows: list[tuple[int, int, int]], seed: int = 1) -> torch.Tensor:
    """The flattened patches of ``rows`` in the tower's layout: ``[N, C * tps * p * p]`` (MiniMax-M3-VL),
    ``[N, C, p, p]`` (Kimi-K2.5)."""
    torch.manual_seed(seed)
    count = sum(t * h * w for t, h, w in rows)
    if name == "kimi_k25":
        return torch.randn(count, 3, PATCH, PATCH)
    return torch.randn(count, 3 * TOWERS[name][3] * PATCH * PATCH)


def _clip_tokens(name: str, row: tuple[int, int, int]) -> list[tuple[int, int, int]]:
    """(slice, row, col) of each token of one grid_thw row in sequence order: slice after slice, each slice in
    merge blocks (MiniMax-M3-VL) or row-major (Kimi-K2.5)."""
    t, h, w = row
    merge = TOWERS[name][4]
    spatial = qwen_token_chunks((h, w), merge, None)[0] if merge > 1 else [(r, c) for r in range(h) for c in range(w)]
    return [(s, r, c) for s in range(t) for r, c in spatial]


def _references(name: str, model, calls: list, rows) -> list[dict]:
    """Per layer, per statistic, per row: ``[H, t * h * w]`` in (slice, row, col) order, float64, from the eager
    probabilities of the row's call (one call per row and layer, layer after layer)."""
    stride = TOWERS[name][3]
    modules = TOWERS[name][2](model)
    assert len(calls) == len(modules) * len(rows)
    references, used = [], 0
    for module in modules:
        values = {stat: [] for stat in ("mad", "temporal", "entropy", "prefix_mass")}
        for t, h, w in rows:
            called, probabilities = calls[used]
            used += 1
            tokens = _clip_tokens(name, (t, h, w))
            assert called is module and probabilities.shape[-1] == len(tokens)
            probabilities = probabilities[0]  # [H, n, n] over the whole clip
            space = torch.tensor([[(r + 0.5) * PATCH, (c + 0.5) * PATCH] for _, r, c in tokens], dtype=torch.float64)
            time = torch.tensor([[(s + 0.5) * stride] for s, _, _ in tokens], dtype=torch.float64)
            entropy = -torch.special.xlogy(probabilities, probabilities).sum(-1)
            assert float(entropy.mean()) < 0.8 * math.log(len(tokens))  # far from uniform: a misplaced token shows
            order = torch.tensor([s * h * w + r * w + c for s, r, c in tokens])  # sequence -> (slice, row, col)
            heads = probabilities.shape[0]
            for stat, per_query in (("mad", (probabilities * torch.cdist(space, space)).sum(-1)),
                                    ("temporal", (probabilities * torch.cdist(time, time)).sum(-1)),
                                    ("entropy", entropy), ("prefix_mass", torch.zeros(heads, len(tokens)))):
                folded = torch.full((heads, len(tokens)), math.nan, dtype=torch.float64)
                folded[:, order] = per_query.double()
                values[stat].append(folded)
        references.append(values)
    return references


def _check(name: str, rows, rec, per_query, references) -> None:
    tol, stat_tol = {"rtol": 1e-5, "atol": 1e-4}, {"rtol": 1e-5, "atol": 1e-5}
    counts = [t * h * w for t, h, w in rows]
    grids = tuple((h, w) for _, h, w in rows)
    frames = tuple(t for t, _, _ in rows)
    assert rec.skipped == {} and len(rec.layers) == len(references) == 2 and len(rec.calls) == 1
    for layer, expected in enumerate(references):
        geometry = per_query.geometry[layer]
        assert geometry.attention == "space-time per clip" and geometry.stride == (PATCH, PATCH)
        assert geometry.frame_stride == TOWERS[name][3] and geometry.num_prefix_tokens is None
        if len(set(rows)) == 1:
            assert geometry.grid == grids[0] and geometry.frames == frames[0] and geometry.image_grids is None
        else:
            assert geometry.grid is None and geometry.frames is None
            assert geometry.image_grids == grids and geometry.image_frames == frames
        assert rec.prefix_maps[layer] is None
        written = geometry.as_dict()  # mad.json's layer geometry
        assert written["frame_stride"] == TOWERS[name][3]
        assert written.get("image_frames", [written.get("frames")] * len(rows)) == list(frames)
        recorded = {stat: per_query.stats[stat][layer] for stat in ("mad", "entropy", "prefix_mass")}
        recorded["temporal"] = per_query.temporal_mad[layer]
        means = {stat: rec.stats[stat][layer] for stat in ("mad", "entropy", "prefix_mass")}
        means["temporal"] = rec.temporal_mad[layer]
        for stat, close in (("mad", tol), ("temporal", tol), ("entropy", stat_tol), ("prefix_mass", stat_tol)):
            tokens = recorded[stat]
            assert tokens.shape == (len(rows), 2, max(counts))
            for entry, count in enumerate(counts):
                torch.testing.assert_close(tokens[entry, :, :count].double(), expected[stat][entry], **close,
                                           msg=lambda m, s=stat: f"layer {layer} {s}: {m}")
                assert tokens[entry, :, count:].isnan().all()
            reference_means = torch.stack([values.mean(-1) for values in expected[stat]])
            torch.testing.assert_close(means[stat].double(), reference_means, **close)
        torch.testing.assert_close(per_query.per_layer[layer], recorded["mad"], equal_nan=True)


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("call", list(CALLS))
@pytest.mark.parametrize("name", list(TOWERS))
def test_clips_match_eager_attention(name, call, attn_implementation):
    """Each grid_thw row attended whole across its frames: spatial MAD, temporal MAD, entropy and prefix mass per
    query, and their means, against the model's own eager attention; the output bit-identical while recorded."""
    rows = CALLS[call]
    model = _tower(name)
    pixels, grid_thw = _pixels(name, rows), torch.tensor(rows)
    from transformers.vision_utils import get_vision_cu_seqlens, get_vision_position_ids

    # The chunks and the order written here are the ones the tower derives from grid_thw.
    counts = [t * h * w for t, h, w in rows]
    assert get_vision_cu_seqlens(grid_thw, merge_temporal=True).tolist() == [0, *np.cumsum(counts).tolist()]
    tokens = [token for row in rows for token in _clip_tokens(name, row)]
    if name == "minimax_m3_vl":
        assert get_vision_position_ids(grid_thw, MERGE, include_temporal=True).tolist() == [list(x) for x in tokens]
    else:
        assert get_vision_position_ids(grid_thw, 1).tolist() == [[r, c] for _, r, c in tokens]
        frame_index = _modeling(name).get_vision_frame_index(grid_thw)  # its time embedding: frame s -> s + 1
        assert frame_index.tolist() == [s + (t > 1) for t, h, w in rows for s in range(t) for _ in range(h * w)]

    calls = eager_attention_calls(_modeling(name), model, pixels, grid_thw=grid_thw)
    references = _references(name, model, calls, rows)
    model.set_attn_implementation(attn_implementation)
    rec, per_query = record_packed_statistics(model, pixels, grid_thw=grid_thw)  # outputs bit-identical
    _check(name, rows, rec, per_query, references)


def test_images_alone_keep_the_image_placement():
    """A call of images only (every row t = 1) is placed as images, without frames: nothing to say in time."""
    for name in TOWERS:
        model = _tower(name)
        rows = [(1, 6, 4), (1, 4, 6)]
        with torch.no_grad(), vitmad.record(model) as rec:
            model(_pixels(name, rows), grid_thw=torch.tensor(rows))
        assert rec.geometry[0].frames is None and rec.geometry[0].image_frames is None
        assert rec.geometry[0].attention == "global per image"
        with pytest.raises(ValueError, match="temporal_mad is defined for video layers only"):
            _ = rec.temporal_mad


def test_minimax_video_processor_order():
    """MiniMax-M3-VL's video processor: rows of at most vision_segment_max_frames temporal patches, each token's
    values (c, tps, p, p) of frames 2s and 2s + 1 at its cell, slices time-major, each in merge blocks."""
    from transformers.models.minimax_m3_vl.video_processing_minimax_m3_vl import MiniMaxM3VLVideoProcessor

    h, w, count, tps = 4, 6, 6, 2
    video = np.zeros((count, h * PATCH, w * PATCH, 3), dtype=np.uint8)
    for frame in range(count):
        for r in range(h):
            for c in range(w):
                video[frame, r * PATCH:(r + 1) * PATCH, c * PATCH:(c + 1) * PATCH] = frame * 40 + r * 8 + c
    processor = MiniMaxM3VLVideoProcessor(patch_size=PATCH, merge_size=MERGE, temporal_patch_size=tps,
                                          do_resize=False, do_rescale=False, do_normalize=False,
                                          do_sample_frames=False, vision_segment_max_frames=2)
    out = processor(videos=[video], return_tensors="pt")
    assert out["video_grid_thw"].tolist() == [[2, h, w], [1, h, w]]  # 3 temporal patches, cut 2 + 1
    values = out["pixel_values_videos"].reshape(-1, 3, tps, PATCH, PATCH)  # as the Conv3d embedding views them
    assert torch.equal(values.amin((1, 3, 4)), values.amax((1, 3, 4)))  # one value per (token, frame)
    # Token k of the video: its slice, cell; its frame k' of the temporal patch: frame 2 * slice + k'.
    expected = [[(2 * s + k) * 40 + r * 8 + c for k in range(tps)]
                for s in range(3) for r, c in qwen_token_chunks((h, w), MERGE, None)[0]]
    assert (values[:, 0, :, 0, 0].long().tolist() == expected) and len(expected) == (2 + 1) * h * w
    rows = out["video_grid_thw"].tolist()
    assert [token for row in rows for token in _clip_tokens("minimax_m3_vl", tuple(row))] == [
        (s, r, c) for s in (0, 1) for r, c in qwen_token_chunks((h, w), MERGE, None)[0]] + [
        (0, r, c) for r, c in qwen_token_chunks((h, w), MERGE, None)[0]]


def test_kimi_video_processor_order():
    """Kimi-K2.5's video processor: rows of temporal_patch_size frames (the last shorter), each token one frame's
    patch, frames time-major, each row-major."""
    from transformers.models.kimi_k25.video_processing_kimi_k25 import Kimi_K25VideoProcessor

    h, w, count = 4, 6, 5
    video = np.zeros((count, h * PATCH, w * PATCH, 3), dtype=np.uint8)
    for frame in range(count):
        for r in range(h):
            for c in range(w):
                video[frame, r * PATCH:(r + 1) * PATCH, c * PATCH:(c + 1) * PATCH] = frame * 40 + r * 8 + c
    processor = Kimi_K25VideoProcessor(patch_size=PATCH, merge_size=MERGE, temporal_patch_size=3, do_resize=False,
                                       do_rescale=False, do_normalize=False, do_sample_frames=False)
    out = processor(videos=[video], return_tensors="pt")
    assert out["video_grid_thw"].tolist() == [[3, h, w], [2, h, w]]
    values = out["pixel_values_videos"]  # [N, C, p, p]: the Conv2d patch embedding's input
    assert values.shape[1:] == (3, PATCH, PATCH)
    assert torch.equal(values.amin((1, 2, 3)), values.amax((1, 2, 3)))  # one value per patch
    expected = [frame * 40 + r * 8 + c for frame in range(count) for r in range(h) for c in range(w)]
    assert values[:, 0, 0, 0].long().tolist() == expected
    # The same order as written for the tower, frames counted from each row's first.
    tokens = [token for row in ([3, h, w], [2, h, w]) for token in _clip_tokens("kimi_k25", tuple(row))]
    assert [(s + 3 * (k >= 3 * h * w)) * 40 + r * 8 + c for k, (s, r, c) in enumerate(tokens)] == expected


def test_flash_attention_over_several_clips_is_refused():
    """Flash attention attends every clip in one variable-length call whose chunks the capture does not receive."""
    flash = register_flash_like("flash_attention_vitmad_clips_test")
    model = _tower("kimi_k25")
    model.config._attn_implementation = flash
    rows = CALLS["two clips"]
    with torch.no_grad(), vitmad.record(model) as rec, pytest.raises(
            ValueError, match=r"layers\.0\.attn .*one call \[1, 2, 144, 144\] over the whole packed sequence of "
                              r"2 chunks \(flash attention"):
        model(_pixels("kimi_k25", rows), grid_thw=torch.tensor(rows))
    assert all(call.layers == [] for call in rec.calls)


@pytest.mark.parametrize("given", ["position_ids", "cu_seqlens"])
def test_precomputed_position_ids_and_other_chunks_are_refused(given):
    """Position ids given by the caller are refused (the order would be theirs); cu_seqlens that are not one chunk
    per row (here: per temporal slice, as Qwen2-VL's) are refused against the chunks rebuilt from grid_thw."""
    from transformers.vision_utils import get_vision_cu_seqlens, get_vision_position_ids

    model = _tower("minimax_m3_vl")
    rows = CALLS["clip and image"]
    grid_thw = torch.tensor(rows)
    extra = ({"position_ids": get_vision_position_ids(grid_thw, MERGE, include_temporal=True)}
             if given == "position_ids" else {"cu_seqlens": get_vision_cu_seqlens(grid_thw)})
    pixels = _pixels("minimax_m3_vl", rows)
    message = (r"was given precomputed position_ids" if given == "position_ids" else
               r"received cu_seqlens \[0, 24, 48, 72, 96\], but the chunks of grid_thw .* attended a clip \(a row\) "
               r"at a time are \[0, 72, 96\]")
    with torch.no_grad():
        model(pixels, grid_thw=grid_thw, **extra)  # the model runs it
        with vitmad.record(model) as rec, pytest.raises(ValueError, match=message):
            model(pixels, grid_thw=grid_thw, **extra)
    assert all(call.layers == [] for call in rec.calls)


def test_inkling2_video_rows_stay_refused():
    """Inkling2's tower would attend a t > 1 row whole, but no processor of transformers makes one: refused."""
    config = transformers.Inkling2VisionConfig(num_hidden_layers=1, hidden_size=32, intermediate_size=64,
                                               num_attention_heads=2, patch_size=PATCH, spatial_merge_size=MERGE)
    model = sharpened(_modeling_inkling2().Inkling2VisionModel(config))
    grid = torch.tensor([[2, 2, 3]])  # merge blocks
    pixels = torch.randn(2 * 2 * 3, PATCH * MERGE, PATCH * MERGE, 3)
    with torch.no_grad(), vitmad.record(model) as rec, pytest.raises(
            ValueError, match=r"holds a video \(t > 1\).*no video processor and its models no get_video_features"):
        model(pixels, image_grid_thw=grid)
    assert all(call.layers == [] for call in rec.calls)


def _modeling_inkling2():
    return importlib.import_module("transformers.models.inkling2.modeling_inkling2")


# Whole vision-language models: get_video_features ---------------------------------------------------------------

TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
            vocab_size=100, head_dim=16, bos_token_id=None, eos_token_id=None, pad_token_id=None)
VLMS = {
    "minimax_m3_vl": ("MiniMaxM3VLConfig", "MiniMaxM3VLModel",
                      dict(text_config=dict(TEXT, moe_intermediate_size=32, num_local_experts=2, num_experts_per_tok=1,
                                            shared_intermediate_size=32, dense_intermediate_size=32),
                           projector_hidden_size=32)),
    "kimi_k25": ("Kimi_K25Config", "Kimi_K25Model",
                 dict(text_config=dict(TEXT, model_type="llama"), projection_hidden_size=32)),
}


@pytest.mark.parametrize("name", list(VLMS))
def test_vision_language_model_records_its_video_features_as_the_tower_alone(name):
    """The whole model's get_video_features records its vision tower only, the same as the tower alone on the
    inputs the model gives it; its features bit-identical while recorded."""
    config_name, model_name, settings = VLMS[name]
    config = getattr(transformers, config_name)(vision_config=_vision_config(name).to_dict(),
                                                attn_implementation="sdpa", **settings)
    torch.manual_seed(0)
    model = sharpened(getattr(transformers, model_name)(config))
    rows = CALLS["two clips"]
    pixels, grid_thw = _pixels(name, rows), torch.tensor(rows)
    given = []
    hook = model.vision_tower.register_forward_pre_hook(lambda module, args, kw: given.append((args, kw)),
                                                        with_kwargs=True)
    with torch.no_grad():
        plain = model.get_video_features(pixels, video_grid_thw=grid_thw)
        hook.remove()
        with vitmad.record(model, reduction="none", stats=PACKED_STATS) as whole:
            recorded = model.get_video_features(pixels, video_grid_thw=grid_thw)
        with vitmad.record(model.vision_tower, reduction="none", stats=PACKED_STATS) as alone:
            model.vision_tower(*given[0][0], **given[0][1])
    assert torch.equal(plain.last_hidden_state, recorded.last_hidden_state)
    assert all(torch.equal(a, b) for a, b in zip(plain.pooler_output, recorded.pooler_output, strict=True))
    assert whole.layers == [f"vision_tower.{layer}" for layer in alone.layers] and len(alone.layers) == 2
    assert whole.geometry[0].image_frames == (2, 4) and len(whole.calls) == 1
    for stat in ("mad", "entropy", "prefix_mass"):
        for mine, own in zip(whole.stats[stat], alone.stats[stat], strict=True):
            torch.testing.assert_close(mine, own, equal_nan=True)
    torch.testing.assert_close(whole.temporal_mad, alone.temporal_mad, equal_nan=True)
