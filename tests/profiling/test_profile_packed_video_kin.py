"""vitmad profile on the videos of the packed towers beside the Qwen ones: VideoLLaMA3 (its video processor's merge
blocks of 2, told to the tower per clip as merge_sizes), Ovis2.5 (windows as layer_types says), LFM3-VL
(Qwen3VLVideoProcessor, gated convolutions between its attention layers), Cosmos3-Edge (one frame a slice, each
patch channels last), HY-V4-VL (one frame a slice, row-major) and Muse Glimmer / Muse Spark (row-major, each patch
(t, C, p, p), windows over single patches) and MiniMax-M3-VL (each clip cut into rows of at most 4 temporal patches,
each row attended whole over space and time: a temporal MAD), each clip through the model's own video processor.

Tiny random-weight towers, their attention far from uniform, are saved alone to folders with their models' video
processors (built from their classes with explicit settings). Two references, both written here:

- every tower: each clip decoded whole with PyAV and given to the model's own video processor, loaded from the
  folder, with the clip's frame count and rate (so it samples as it does), then alone through the tower loaded by
  transformers under ``vitmad.record(reduction="none")``; a clip's MAD the mean over every token of every temporal
  slice or row (the per-token values, NaN padding left out; MiniMax-M3-VL's temporal MAD too), the profile's the
  mean over clips. The tower's output is
  bit-identical with and without recording.
- MiniMax-M3-VL in float64 from its eager attention (``_whole_clip_reference``: one call per row over its
  ``t * h * w`` tokens, time-major, merge blocks within a slice, tubelets at ``(s + 0.5) * 2`` frames), and
  VideoLLaMA3 and HY-V4-VL, in float64 from the tower's own eager attention (the modeling file's
  ``eager_attention_forward`` captured): a clip of ``t`` frames is ``t`` slices of ``h * w`` tokens, one attention
  call per slice and layer (``get_vision_attention_seqlens``: ``h * w`` repeated ``t`` times), VideoLLaMA3's tokens
  in merge blocks of the processor's ``merge_size`` (2 x 2 blocks row-major, the patches of a block row-major:
  its ``patchify`` permute and ``get_vision_position_ids``), HY-V4-VL's row-major; each patch at
  ``(row + 0.5, col + 0.5) * patch`` pixels of its frame, a query's MAD over the keys of its call.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import vitmad
from conftest import (
    check_interrupted_resume_equals_one_run,
    chunk_token_mad,
    decoded_frames,
    eager_attention_calls,
    qwen_token_chunks,
    self_similar_attention,
    write_random_clip,
)
from vitmad.cli import main
from vitmad.profiling.options import OptionError

av = pytest.importorskip("av")
transformers = pytest.importorskip("transformers")
pytest.importorskip("torchvision")  # transformers' video processors
from transformers.models.cosmos3_edge import modeling_cosmos3_edge  # noqa: E402
from transformers.models.hy_v4_vl import modeling_hy_v4_vl  # noqa: E402
from transformers.models.lfm3_vl import modeling_lfm3_vl  # noqa: E402
from transformers.models.minimax_m3_vl import modeling_minimax_m3_vl  # noqa: E402
from transformers.models.muse_glimmer import modeling_muse_glimmer  # noqa: E402
from transformers.models.muse_spark import modeling_muse_spark  # noqa: E402
from transformers.models.ovis2_5 import modeling_ovis2_5  # noqa: E402
from transformers.models.video_llama_3 import modeling_video_llama_3  # noqa: E402
from transformers.video_utils import VideoMetadata  # noqa: E402

PATCH, MERGE, RATE = 4, 2, 8  # clips written at 8 frames a second
TOL = {"rtol": 1e-5, "atol": 1e-4}
# (frames, height, width) of the clips: 9 frames (odd: the last repeated to whole temporal patches of 2), 7 of another
# size.
CLIPS = {"a.mp4": (9, 28, 40), "b.mp4": (7, 36, 24)}
VISION = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, patch_size=PATCH, num_hidden_layers=2)
WINDOWS = ["window_attention", "full_attention"]
# name -> (modeling module, tower class, its vision config, video processor class, its settings, the frames it takes
# of clip a: 9 frames at 8 a second)
CASES = {
    # fps 4: 9 / 8 * 4 = 4.5, at least min_frames 4, floored: 4, at 9 / 4 = 2.25 apart (truncated)
    "video_llama_3": (modeling_video_llama_3, "VideoLlama3VisionModel", dict(VISION), "VideoLlama3VideoProcessor",
                      dict(patch_size=PATCH, merge_size=MERGE, temporal_patch_size=1, do_sample_frames=True, fps=4,
                           size={"shortest_edge": 64, "longest_edge": 576 * 4}), [0, 2, 4, 6]),
    # every frame (its default), 64 to 576 pixels a frame
    "ovis2_5": (modeling_ovis2_5, "Ovis2_5VisionModel",
                dict(VISION, spatial_merge_size=MERGE, image_size=16, window_size=16, layer_types=WINDOWS),
                "Ovis2_5VideoProcessor", dict(patch_size=PATCH, merge_size=MERGE, temporal_patch_size=1,
                                              size={"shortest_edge": 64, "longest_edge": 576}), list(range(9))),
    # int(9 / 8 * 4) = 4 frames spread over 0 .. 8 (np.linspace, rounded); 64 to 4 x 576 pixels over the clip
    "lfm3_vl": (modeling_lfm3_vl, "Lfm3VlVisionModel",
                dict(VISION, num_hidden_layers=3, spatial_merge_size=MERGE, num_key_value_heads=1,
                     temporal_patch_size=2, layer_types=["full_attention", "conv", "full_attention"]),
                "Qwen3VLVideoProcessor", dict(patch_size=PATCH, merge_size=MERGE, temporal_patch_size=2, fps=4,
                                              cap_pixels_per_frame=False,
                                              size={"shortest_edge": 64, "longest_edge": 576 * 4}), [0, 3, 5, 8]),
    # the same sampling as Qwen3-VL's; its budget over the whole clip (frames x pixels)
    "cosmos3_edge": (modeling_cosmos3_edge, "Cosmos3EdgeVisionModel",
                     dict(VISION, spatial_merge_size=MERGE, num_patches=16), "Cosmos3EdgeVideoProcessor",
                     dict(patch_size=PATCH, merge_size=MERGE, temporal_patch_size=1, fps=4,
                          size={"shortest_edge": 64, "longest_edge": 576 * 4}), [0, 3, 5, 8]),
    # every frame (its default); never upscaled, at most 576 pixels a frame
    "hy_v4_vl": (modeling_hy_v4_vl, "HYV4VLVisionModel",
                 dict(VISION, spatial_merge_size=MERGE, num_key_value_heads=2, out_hidden_size=32, max_image_size=16),
                 "HYV4VLVideoProcessor", dict(patch_size=PATCH, merge_size=MERGE, temporal_patch_size=1,
                                              size={"longest_edge": 576 * 9}, max_image_size={"longest_edge": 576}),
                 list(range(9))),
    # min(int(9 * 4 / 8), 96, 9) = 4 frames, whole temporal patches, torch.linspace(0, 8, 4) truncated
    **{name: (modeling, f"{prefix}VisionModel",
              dict(VISION, pos_emb_height=4, pos_emb_width=4, max_position_embeddings=16, merge_size=MERGE,
                   patch_temporal=2, layer_types=WINDOWS),
              "MuseGlimmerVideoProcessor", dict(patch_size=PATCH, merge_size=MERGE, temporal_patch_size=2, fps=4,
                                                max_video_frame_tokens=9), [0, 2, 5, 8])
       for name, modeling, prefix in (("muse_glimmer", modeling_muse_glimmer, "MuseGlimmer"),
                                      ("muse_spark", modeling_muse_spark, "MuseSpark"))},
    # every frame (its default), 64 to 576 pixels a frame; a clip cut into rows of at most 4 temporal patches (clip
    # a: 5 temporal patches, rows of 4 and 1), each attended whole over space and time. head_dim 24: its 3D rotary
    # embedding rotates 8 dims per axis.
    "minimax_m3_vl": (modeling_minimax_m3_vl, "MiniMaxM3VLVisionModel",
                      dict(VISION, hidden_size=48, spatial_merge_size=MERGE, temporal_patch_size=2),
                      "MiniMaxM3VLVideoProcessor", dict(patch_size=PATCH, merge_size=MERGE, temporal_patch_size=2,
                                                        min_pixels=64, max_pixels=576), list(range(9))),
}
# The towers attending each grid_thw row whole, over space and time: a clip's rows, a temporal MAD.
WHOLE_CLIP = ("minimax_m3_vl",)
# The towers checked against a float64 reference from their own eager attention: name -> the tokens' merge blocks.
EAGER = {"video_llama_3": MERGE, "hy_v4_vl": 1}  # and MiniMax-M3-VL's space-time rows: _whole_clip_reference


def _config(name: str):
    modeling, tower_name, vision = CASES[name][:3]
    return getattr(modeling, tower_name).config_class(**vision)


def _sharpen(tower: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Large weights, the query / key projections larger still, and (LFM3-VL, Cosmos3-Edge, HY-V4-VL) the key
    projection as query projection too: attention far from uniform, so that a token placed elsewhere changes the
    MAD."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, module in tower.named_modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.normal_(std=0.25)
                if name.endswith(("qkv", "q_proj", "k_proj")):
                    rows = module.weight.shape[0] * 2 // 3 if name.endswith("qkv") else module.weight.shape[0]
                    module.weight[:rows] *= 3.0
        self_similar_attention(tower)
        for module in tower.modules():
            if type(module).__name__ == "HYV4VLVisionAttention":
                module.q_proj.weight.copy_(module.k_proj.weight)
                module.q_proj.bias.copy_(module.k_proj.bias)
    return tower


def _save(folder: Path, name: str) -> None:
    modeling, tower_name, _, processor, settings, _ = CASES[name]
    torch.manual_seed(0)
    _sharpen(getattr(modeling, tower_name)(_config(name)), 3).save_pretrained(folder)
    getattr(transformers, processor)(**settings).save_pretrained(folder)


def _tower(folder: Path, name: str) -> torch.nn.Module:
    modeling, tower_name = CASES[name][:2]
    return getattr(modeling, tower_name).from_pretrained(folder).eval()


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("packed_video_kin")
    for name in CASES:
        _save(root / name, name)
    return root


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    root = tmp_path_factory.mktemp("clips")
    for seed, (file, (frames, height, width)) in enumerate(CLIPS.items()):
        write_random_clip(root / file, frames, height, width, seed, RATE)
    return root


def _processed(folder: Path, name: str, clip: np.ndarray, rate: float | None = RATE) -> dict:
    """The model's own video processor, loaded from the folder, on a whole decoded clip and its metadata: the tower's
    inputs as its model's ``get_video_features`` passes them (VideoLLaMA3's ``video_merge_sizes`` as
    ``merge_sizes``)."""
    processor = getattr(transformers, CASES[name][3]).from_pretrained(folder)
    metadata = VideoMetadata(total_num_frames=len(clip), fps=rate)
    found = processor(videos=[torch.from_numpy(clip).permute(0, 3, 1, 2)], video_metadata=[metadata],
                      return_tensors="pt")
    inputs = {"pixel_values": found["pixel_values_videos"], "grid_thw": found["video_grid_thw"]}
    if "video_merge_sizes" in found:
        inputs["merge_sizes"] = found["video_merge_sizes"]
    return inputs


def _recorded(tower: torch.nn.Module, inputs: dict) -> dict[str, torch.Tensor]:
    """``{"mad", "entropy"}`` (and, for a tower attending whole clips, ``"temporal"``) ``[L, H]`` of one clip from
    ``vitmad.record(reduction="none")``: the mean over every token of every temporal slice or row; the output checked
    bit-identical to the tower's unrecorded one."""
    with torch.no_grad():
        plain = tower(**inputs).last_hidden_state
        with vitmad.record(tower, reduction="none", stats=["mad", "entropy"]) as rec:
            recorded = tower(**inputs).last_hidden_state
    assert torch.equal(plain, recorded)
    found, call = {}, rec.calls[-1]
    values = [("mad", call.per_layer), ("entropy", call.statistics["entropy"])]
    if all(t is not None for t in call.temporal):
        values.append(("temporal", call.temporal))
    for stat, per_layer in values:
        rows = []
        for values in per_layer:  # [slices, H, tokens], NaN beyond a slice's tokens
            tokens = values.permute(1, 0, 2).reshape(values.shape[1], -1).double()
            rows.append(tokens.nanmean(1))
        found[stat] = torch.stack(rows)
    return found


def _eager_reference(name: str, tower, inputs: dict) -> torch.Tensor:
    """``[L, H]`` float64 MAD of one clip from the tower's eager probabilities: one call per temporal slice and
    layer, the slice's tokens in merge blocks of ``EAGER[name]`` (1: row-major)."""
    modeling = CASES[name][0]
    calls = eager_attention_calls(modeling, tower, **inputs)
    t, h, w = (int(v) for v in inputs["grid_thw"][0])
    (chunk,) = qwen_token_chunks((h, w), EAGER[name], None)
    layers, used = [], 0
    for _ in range(len(calls) // t):
        values = []
        for _ in range(t):
            module, probabilities = calls[used]
            used += 1
            assert probabilities.shape[-1] == h * w
            values.append(chunk_token_mad(probabilities, chunk, PATCH))
            rows = probabilities[0]
            # Far from uniform: a token placed elsewhere would show.
            assert float(-torch.special.xlogy(rows, rows).sum(-1).mean()) < 0.8 * math.log(h * w)
        layers.append(torch.cat(values, dim=1).mean(1))
    assert used == len(calls) == t * len(layers)
    return torch.stack(layers)


def _whole_clip_reference(tower, inputs: dict) -> dict[str, torch.Tensor]:
    """``{"mad", "temporal"}`` ``[L, H]`` float64 of one MiniMax-M3-VL clip from the tower's eager probabilities:
    one call per ``grid_thw`` row and layer over its ``t * h * w`` tokens (``get_vision_cu_seqlens(...,
    merge_temporal=True)``), time-major, each temporal slice in 2 x 2 merge blocks (the processor's permute); token
    ``(s, r, c)`` at ``((r + 0.5) p, (c + 0.5) p)`` pixels and ``(s + 0.5) * 2`` frames from its row's first (a
    tubelet of 2 frames); a query's spatial MAD the attention-weighted pixel distance to the keys of its row, its
    temporal MAD the weighted frame distance; the clip's the mean over all its tokens."""
    calls = eager_attention_calls(modeling_minimax_m3_vl, tower, **inputs)
    rows = [tuple(int(v) for v in row) for row in inputs["grid_thw"]]
    spatial, temporal, used = [], [], 0
    for _ in range(len(calls) // len(rows)):
        layer_spatial, layer_temporal = [], []
        for t, h, w in rows:
            _, probabilities = calls[used]
            used += 1
            (chunk,) = qwen_token_chunks((h, w), MERGE, None)
            cells = [(s, r, c) for s in range(t) for r, c in chunk]
            assert probabilities.shape[-1] == len(cells)
            place = torch.tensor([[(r + 0.5) * PATCH, (c + 0.5) * PATCH] for _, r, c in cells], dtype=torch.float64)
            time = torch.tensor([[(s + 0.5) * 2.0] for s, _, _ in cells], dtype=torch.float64)
            rows_p = probabilities[0]  # [H, n, n]
            layer_spatial.append((rows_p * torch.cdist(place, place)).sum(-1))
            layer_temporal.append((rows_p * torch.cdist(time, time)).sum(-1))
            entropy = float(-torch.special.xlogy(rows_p, rows_p).sum(-1).mean())
            assert entropy < 0.8 * math.log(len(cells))  # far from uniform: a token placed elsewhere would show
        spatial.append(torch.cat(layer_spatial, dim=1).mean(1))
        temporal.append(torch.cat(layer_temporal, dim=1).mean(1))
    assert used == len(calls)
    return {"mad": torch.stack(spatial), "temporal": torch.stack(temporal)}


@pytest.mark.parametrize("name", list(CASES))
def test_clips_are_profiled_as_the_model_own_video_processor_and_tower_take_them(folders, clips, name):
    folder = folders / name
    result = vitmad.profile(f"hf:{folder}", clips, device="cpu", batch_size=2, stats="entropy")
    assert result.images == [str(clips / file) for file in CLIPS] and result.skipped == []
    # Every temporal slice attends within itself, no distance in time; or each row whole, in space and time.
    assert (result.temporal is not None) == (name in WHOLE_CLIP)
    tower = _tower(folder, name)
    temporal = CASES[name][4]["temporal_patch_size"]
    recorded, grids = [], {}
    for file in CLIPS:
        inputs = _processed(folder, name, decoded_frames(clips / file))
        recorded.append(_recorded(tower, inputs))
        if name in EAGER:
            expected = _eager_reference(name, tower, inputs)
            torch.testing.assert_close(recorded[-1]["mad"], expected, **TOL)
            print(f"{name} {file} recorded vs float64 eager: max |difference| "
                  f"{float((recorded[-1]['mad'] - expected).abs().max()):.2e}")
        if name in WHOLE_CLIP:
            for stat, expected in _whole_clip_reference(tower, inputs).items():
                torch.testing.assert_close(recorded[-1][stat], expected, **TOL)
                print(f"{name} {file} {stat} recorded vs float64 eager: max |difference| "
                      f"{float((recorded[-1][stat] - expected).abs().max()):.2e}")
        ((h, w),) = {tuple(row) for row in inputs["grid_thw"][:, 1:].tolist()}  # the grid of each of its rows
        t = int(inputs["grid_thw"][:, 0].sum())
        grids[str(clips / file)] = {"grid": [h, w], "size": [h * PATCH, w * PATCH], "frames": t * temporal}
    # The frames the processor takes of clip a (9 frames), padded to whole temporal patches.
    picked = CASES[name][5]
    assert grids[str(clips / "a.mp4")]["frames"] == math.ceil(len(picked) / temporal) * temporal
    assert result.image_grids == grids
    if name in WHOLE_CLIP:  # clip a: rows of 4 and 1 temporal patches; b: one of 4
        rows = [_processed(folder, name, decoded_frames(clips / f))["grid_thw"][:, 0].tolist() for f in CLIPS]
        assert rows == [[4, 1], [4]]
    for stat in ("mad", "entropy", *(["temporal"] if name in WHOLE_CLIP else [])):
        expected = torch.stack([clip[stat] for clip in recorded]).mean(0)
        found = {"mad": result.mad, "temporal": result.temporal_mad}.get(stat)
        found = result.stat("entropy") if found is None else found
        torch.testing.assert_close(found.double(), expected, **TOL)
        print(f"{name} {stat}: max |difference| {float((found.double() - expected).abs().max()):.2e}")
    assert result.settings["preprocessing"]["video_processor"] == CASES[name][3]
    assert result.settings["preprocessing"]["processor"]["merge_size"] == MERGE


def test_the_processor_picks_the_frames_it_samples(folders, clips):
    """The frames vitmad decodes are those the processor's own sampling picks from the whole clip."""
    from vitmad.profiling.models import load_model
    from vitmad.profiling.packed_videos import packed_video_feed
    from vitmad.profiling.videos import load_video

    whole = decoded_frames(clips / "a.mp4")
    for name, case in CASES.items():
        picked = case[5]
        feed = packed_video_feed(load_model(f"hf:{folders / name}"))
        assert feed.pick(9, RATE) == picked
        own = getattr(transformers, case[3]).from_pretrained(folders / name)
        metadata = VideoMetadata(total_num_frames=9, fps=RATE)
        own(videos=[torch.from_numpy(whole).permute(0, 3, 1, 2)], video_metadata=[metadata], return_tensors="pt")
        assert [int(i) for i in metadata.frames_indices] == picked if own.do_sample_frames else picked == list(range(9))
        frames, reason = load_video(clips / "a.mp4", feed.pick)
        assert reason is None
        assert all(np.array_equal(np.asarray(frame), whole[i]) for frame, i in zip(frames, picked, strict=True))


def test_the_command_and_a_frame_folder(folders, clips, tmp_path, capsys):
    """``--videos`` on clips (VideoLLaMA3) writes the Python API's sums; a folder of frames is a clip where the
    sources are said to be videos (HY-V4-VL's processor takes every frame, in name order), by the command and by
    ``videos=True``."""
    from PIL import Image

    out = tmp_path / "out"
    spec = f"hf:{folders / 'video_llama_3'}"
    assert main(["profile", "--model", spec, "--videos", str(clips), "--device", "cpu", "--out", str(out),
                 "--batch-size", "1"]) == 0
    assert "2 videos (0 skipped)" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir() if p.suffix != ".pt") == ["mad.csv", "mad.json", "mad.png"]
    document = json.loads((out / "mad.json").read_text())
    single = vitmad.profile(spec, clips, device="cpu", batch_size=2)
    assert document["count"] == 2 and document["image_grids"] == single.image_grids
    assert "temporal" not in document["layers"][0]
    np.testing.assert_allclose(np.array(document["sums"]["total"]), single.stats.total.numpy(), rtol=1e-6)

    frames = tmp_path / "frames"
    frames.mkdir()
    rng = np.random.default_rng(5)
    arrays = [rng.integers(0, 256, (20, 28, 3), dtype=np.uint8) for _ in range(3)]
    for i, array in enumerate(arrays):
        Image.fromarray(array).save(frames / f"frame_{i * 5}.png")  # frame_0, frame_5, frame_10: by value
    folder = folders / "hy_v4_vl"
    result = vitmad.profile(f"hf:{folder}", [frames], videos=True, device="cpu")
    inputs = _processed(folder, "hy_v4_vl", np.stack(arrays), rate=None)
    assert inputs["grid_thw"].tolist() == [[3, 4, 6]]  # 20 x 28 px, never upscaled: 16 x 24, every frame a slice
    expected = _eager_reference("hy_v4_vl", _tower(folder, "hy_v4_vl"), inputs)
    torch.testing.assert_close(result.mad.double(), expected, **TOL)
    out = tmp_path / "frames_out"
    assert main(["profile", "--model", f"hf:{folder}", "--videos", str(frames), "--device", "cpu", "--out", str(out),
                 "--no-figures"]) == 0
    document = json.loads((out / "mad.json").read_text())
    assert document["images"] == [str(frames)] and document["image_grids"][str(frames)]["frames"] == 3
    np.testing.assert_allclose(np.array(document["sums"]["total"]), result.stats.total.numpy(), rtol=1e-12)


def test_resume_after_an_interrupt_equals_the_uninterrupted_run(folders, clips, tmp_path):
    check_interrupted_resume_equals_one_run(f"hf:{folders / 'video_llama_3'}", clips, tmp_path / "run.pt")


def test_video_llama_3_without_a_video_processor_file_merges_as_transformers_builds_it(folders, clips, tmp_path):
    """A VideoLLaMA3 checkpoint with only its image processor's preprocessor_config.json: transformers builds the
    video processor from it (merge_size 1: row-major patches), and the tower is told merge_sizes 1."""
    import shutil

    folder = tmp_path / "video_llama_3"
    shutil.copytree(folders / "video_llama_3", folder)
    (folder / "video_preprocessor_config.json").unlink()
    transformers.VideoLlama3ImageProcessor(patch_size=PATCH, merge_size=1, min_pixels=64,
                                           max_pixels=576 * 4).save_pretrained(folder)
    assert transformers.VideoLlama3VideoProcessor.from_pretrained(folder).merge_size == 1
    result = vitmad.profile(f"hf:{folder}", clips, device="cpu")
    assert result.settings["preprocessing"]["processor"]["merge_size"] == 1
    tower = _tower(folder, "video_llama_3")
    expected = []
    for file in CLIPS:
        inputs = _processed(folder, "video_llama_3", decoded_frames(clips / file))
        assert inputs["merge_sizes"].tolist() == [1]
        expected.append(_recorded(tower, inputs)["mad"])
    torch.testing.assert_close(result.mad.double(), torch.stack(expected).mean(0), **TOL)


def test_a_clip_of_one_temporal_patch_is_skipped_where_the_tower_attends_whole_clips(folders, clips, tmp_path):
    """MiniMax-M3-VL attends a clip over space and time: a clip of 2 frames (one temporal patch, which the recorder
    would place as an image) is skipped saying so; the other clips are profiled as alone."""
    write_random_clip(tmp_path / "short.mp4", 2, 28, 40, seed=9, rate=RATE)
    (tmp_path / "a.mp4").symlink_to(clips / "a.mp4")
    spec = f"hf:{folders / 'minimax_m3_vl'}"
    with pytest.warns(UserWarning, match=r"skipping video .*short\.mp4: it is one temporal patch \(2 frames after "
                                         r"padding\): its tower attends a clip over space and time"):
        result = vitmad.profile(spec, tmp_path, device="cpu", batch_size=2)
    assert [Path(p).name for p in result.images] == ["a.mp4"] and len(result.skipped) == 1
    alone = vitmad.profile(spec, [clips / "a.mp4"], device="cpu")
    assert torch.equal(result.stats.total, alone.stats.total) and torch.equal(result.temporal.total,
                                                                              alone.temporal.total)


@pytest.mark.parametrize(("name", "processor", "change", "message"), [
    ("ovis2_5", "Qwen2VLVideoProcessor", {}, r"model: the checkpoint's video processor is Qwen2VLVideoProcessor, but "
                                             r"the vision tower Ovis2_5VisionModel is fed by Ovis2_5VideoProcessor"),
    ("video_llama_3", "VideoLlama3VideoProcessor", {"patch_size": 8},
     r"model: the video processor has patch_size=8, but the vision tower VideoLlama3VisionModel takes 4"),
    ("muse_glimmer", "MuseGlimmerVideoProcessor", {"merge_size": 1},
     r"model: the video processor has merge_size=1, but the vision tower MuseGlimmerVisionModel takes 2"),
    ("lfm3_vl", "Qwen3VLVideoProcessor", {"temporal_patch_size": 1},
     r"model: the video processor has temporal_patch_size=1, but the vision tower Lfm3VlVisionModel takes 2"),
])
def test_a_video_processor_that_does_not_fit_the_tower_is_refused(folders, clips, tmp_path, name, processor, change,
                                                                  message):
    import shutil

    folder = tmp_path / name
    shutil.copytree(folders / name, folder)
    settings = {**(CASES[name][4] if processor == CASES[name][3] else dict(patch_size=PATCH, merge_size=MERGE,
                                                                          temporal_patch_size=1)), **change}
    getattr(transformers, processor)(**settings).save_pretrained(folder)
    with pytest.raises(OptionError, match=message):
        vitmad.profile(f"hf:{folder}", clips, device="cpu")


def test_sampling_without_transformers_private_settings_is_refused(folders, clips, monkeypatch):
    """The settings a video processor samples frames with come from transformers' private
    _merge_and_standardize_kwargs (no public way in 5.25): without it a sampling processor is refused, not sampled by
    another rule."""
    from transformers.image_processing_utils import BaseImageProcessor

    monkeypatch.delattr(BaseImageProcessor, "_merge_and_standardize_kwargs")
    with pytest.raises(RuntimeError, match=r"VideoLlama3VideoProcessor of transformers .* has no "
                                           r"_merge_and_standardize_kwargs.*do_sample_frames false"):
        vitmad.profile(f"hf:{folders / 'video_llama_3'}", clips, device="cpu")


def test_the_command_writes_the_temporal_mad_of_whole_clips_and_resumes(folders, clips, tmp_path, capsys):
    """MiniMax-M3-VL's clips: mad.json's temporal entries and sums, mad.csv's tmad columns and mad.png, equal to the
    Python API's; resumed from its finished checkpoint, the same document."""
    spec = f"hf:{folders / 'minimax_m3_vl'}"
    args = ["profile", "--model", spec, "--videos", str(clips), "--device", "cpu", "--batch-size", "1",
            "--checkpoint-every", "1", "--out", str(tmp_path / "out")]
    assert main(args) == 0
    assert "2 videos (0 skipped)" in capsys.readouterr().out
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir() if p.suffix != ".pt") == ["mad.csv", "mad.json", "mad.png"]
    document = json.loads((out / "mad.json").read_text())
    single = vitmad.profile(spec, clips, device="cpu", batch_size=1)
    assert "temporal" in document["layers"][0] and document["settings"]["preprocessing"]["whole_clip"] is True
    np.testing.assert_allclose(np.array(document["sums"]["total"]), single.stats.total.numpy(), rtol=1e-12)
    np.testing.assert_allclose(np.array(document["sums"]["temporal_total"]), single.temporal.total.numpy(),
                               rtol=1e-12)
    assert (out / "mad.csv").read_text().splitlines()[0] == ("layer,name,head,mad_mean,mad_std,mad_min,mad_max,count,"
                                                             "tmad_mean,tmad_std,tmad_min,tmad_max")
    assert main([*args, "--resume"]) == 0
    again = json.loads((out / "mad.json").read_text())
    assert again["sums"] == document["sums"] and again["settings"] == document["settings"]
