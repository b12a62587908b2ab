"""vitmad profile on the videos of packed native-resolution towers: Qwen2-VL (a whole vision-language checkpoint, its
video processor taking every frame), Qwen2.5-VL (a tower saved alone, windows; its processor sampling 4 frames a
second) and Qwen3-VL (a tower saved alone, Qwen3VLVideoProcessor), and Qwen3-VL's tower inside whole Qwen3.5,
Qwen3-VL-MoE and Qwen3.5-MoE checkpoints, each clip through the model's own video processor.

Tiny random-weight towers, their attention far from uniform, are saved to folders with their video processors (built
from their classes with explicit settings). The reference is written here, independently of vitmad: each clip decoded
whole with PyAV, given to the model's own video processor with the clip's frame count and rate (so the processor
samples it, where it samples), then alone through the tower loaded by transformers with eager attention, its softmax
probabilities captured from the modeling file's ``eager_attention_forward``. Tokens are placed by geometry written
here from the modeling files: a clip of ``t`` temporal patches (2 frames each) is ``t`` slices of ``h * w`` tokens,
each slice in merge-block order (2 x 2 blocks row-major, the patches of a block row-major) and attended alone, one
call per slice and layer (Qwen2.5-VL's window blocks: one call per window of a slice, its full-attention block the
whole slice in window order); each patch at ``(row + 0.5, col + 0.5) * patch`` pixels of its frame; a query's MAD over
the keys of its call, a clip's MAD the mean over all its tokens, the profile's the mean over clips, in float64.
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
    profile_one_process_and_two_ranks,
    qwen_token_chunks,
    write_random_clip,
)
from vitmad.cli import main
from vitmad.profiling.options import OptionError

av = pytest.importorskip("av")
transformers = pytest.importorskip("transformers")
pytest.importorskip("torchvision")  # transformers' Qwen video processors
from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl  # noqa: E402
from transformers.models.qwen2_vl import modeling_qwen2_vl  # noqa: E402
from transformers.models.qwen3_5 import modeling_qwen3_5  # noqa: E402
from transformers.models.qwen3_5_moe import modeling_qwen3_5_moe  # noqa: E402
from transformers.models.qwen3_vl import modeling_qwen3_vl  # noqa: E402
from transformers.models.qwen3_vl_moe import modeling_qwen3_vl_moe  # noqa: E402
from transformers.video_utils import VideoMetadata  # noqa: E402

PATCH, MERGE, TEMPORAL, WINDOW_PX, RATE = 4, 2, 2, 16, 8  # clips written at 8 frames a second
TOL = {"rtol": 1e-5, "atol": 1e-4}
# The video processors' settings: 64 to 576 pixels a frame (Qwen3-VL's budget is over the whole clip).
QWEN2_VIDEO = dict(patch_size=PATCH, merge_size=MERGE, temporal_patch_size=TEMPORAL, min_pixels=64, max_pixels=576,
                   cap_pixels_per_frame=False)
QWEN3_VIDEO = dict(patch_size=PATCH, merge_size=MERGE, temporal_patch_size=TEMPORAL, cap_pixels_per_frame=False,
                   size={"shortest_edge": 64, "longest_edge": 576 * 4}, fps=4)
# name -> (modeling module, video processor settings, how its processor samples: a clip of 9 frames at 8 frames a
# second gives these frames)
CASES = {
    "qwen2_vl": (modeling_qwen2_vl, ("Qwen2VLVideoProcessor", QWEN2_VIDEO), list(range(9))),
    # 9 / 8 * 4 = 4.5 frames, at least min_frames 4, rounded down to whole temporal patches: 4, every 9 / 4 = 2.25th
    "qwen2_5_vl": (modeling_qwen2_5_vl, ("Qwen2VLVideoProcessor", dict(QWEN2_VIDEO, do_sample_frames=True, fps=4)),
                   [0, 2, 4, 6]),
    # int(9 / 8 * 4) = 4 frames spread over 0 .. 8 (np.linspace, rounded)
    "qwen3_vl": (modeling_qwen3_vl, ("Qwen3VLVideoProcessor", QWEN3_VIDEO), [0, 3, 5, 8]),
    "qwen3_5": (modeling_qwen3_5, ("Qwen3VLVideoProcessor", QWEN3_VIDEO), [0, 3, 5, 8]),
    "qwen3_vl_moe": (modeling_qwen3_vl_moe, ("Qwen3VLVideoProcessor", QWEN3_VIDEO), [0, 3, 5, 8]),
    "qwen3_5_moe": (modeling_qwen3_5_moe, ("Qwen3VLVideoProcessor", QWEN3_VIDEO), [0, 3, 5, 8]),
}
# Qwen3-VL's tower in whole checkpoints of other models (under model.visual): name -> (config class, model class,
# its language model's settings)
WHOLE = {
    "qwen2_vl": ("Qwen2VLConfig", "Qwen2VLForConditionalGeneration", dict(bos_token_id=0, eos_token_id=1)),
    "qwen3_5": ("Qwen3_5Config", "Qwen3_5ForConditionalGeneration", dict(layer_types=["full_attention"])),
    "qwen3_vl_moe": ("Qwen3VLMoeConfig", "Qwen3VLMoeForConditionalGeneration",
                     dict(moe_intermediate_size=32, num_experts=2, num_experts_per_tok=1)),
    "qwen3_5_moe": ("Qwen3_5MoeConfig", "Qwen3_5MoeForConditionalGeneration",
                    dict(layer_types=["full_attention"], moe_intermediate_size=32, shared_expert_intermediate_size=32,
                         num_experts=2, num_experts_per_tok=1)),
}
# (frames, height, width) of the clips: 9 frames (an odd count: the last frame repeated to whole temporal patches where
# the processor keeps them all), and 7 frames of another size.
CLIPS = {"a.mp4": (9, 28, 40), "b.mp4": (7, 36, 24)}


def _sharpen(tower: torch.nn.Module, seed: int) -> None:
    """Large weights, the query / key projections larger still: attention far from uniform, so that a token placed
    elsewhere changes the MAD."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, module in tower.named_modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.normal_(std=0.25)
                if name.endswith("attn.qkv"):
                    module.weight[:module.weight.shape[0] * 2 // 3] *= 3.0


def _vision(name: str) -> dict:
    common = dict(depth=2, num_heads=2, patch_size=PATCH, spatial_merge_size=MERGE, temporal_patch_size=TEMPORAL)
    if name == "qwen2_vl":
        return dict(embed_dim=32, hidden_size=32, mlp_ratio=2, **common)
    if name == "qwen2_5_vl":
        return dict(hidden_size=32, out_hidden_size=32, intermediate_size=64, window_size=WINDOW_PX,
                    fullatt_block_indexes=[1], **common)
    vision = dict(hidden_size=32, intermediate_size=64, out_hidden_size=32, num_position_embeddings=16, **common)
    # Qwen3.5's towers have no deepstack mergers
    return vision if name.startswith("qwen3_5") else dict(vision, deepstack_visual_indexes=[])


def _text(**extra) -> dict:
    return dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1, vocab_size=100, head_dim=16,
                rope_parameters={"rope_type": "default", "mrope_section": [2, 2, 4], "rope_theta": 1e4}, **extra)


def _save(folder: Path, name: str) -> None:
    """``WHOLE``: a whole vision-language checkpoint (a one-layer language model beside the tower); Qwen2.5-VL and
    Qwen3-VL: the tower saved alone. With the model's video processor and image processor."""
    torch.manual_seed(0)
    if name in WHOLE:
        config_name, model_name, text = WHOLE[name]
        config = getattr(transformers, config_name)(text_config=_text(**text), vision_config=_vision(name))
        model = getattr(transformers, model_name)(config)
        _sharpen(model.model.visual, 1)
        model.save_pretrained(folder)
    else:
        config = {"qwen2_5_vl": transformers.Qwen2_5_VLConfig, "qwen3_vl": transformers.Qwen3VLConfig}[name](
            vision_config=_vision(name)).vision_config
        tower = {"qwen2_5_vl": modeling_qwen2_5_vl.Qwen2_5_VisionTransformerPretrainedModel,
                 "qwen3_vl": modeling_qwen3_vl.Qwen3VLVisionModel}[name](config)
        _sharpen(tower, 2)
        tower.save_pretrained(folder)
    processor, settings = CASES[name][1]
    getattr(transformers, processor)(**settings).save_pretrained(folder)
    transformers.Qwen2VLImageProcessor(patch_size=PATCH, merge_size=MERGE, temporal_patch_size=TEMPORAL, min_pixels=64,
                                       max_pixels=576).save_pretrained(folder)


def _tower(folder: Path, name: str) -> torch.nn.Module:
    """The tower as transformers loads it from the folder (the whole model's visual for a whole checkpoint)."""
    if name in WHOLE:
        return getattr(transformers, WHOLE[name][1]).from_pretrained(folder).model.visual.eval()
    cls = {"qwen2_5_vl": modeling_qwen2_5_vl.Qwen2_5_VisionTransformerPretrainedModel,
           "qwen3_vl": modeling_qwen3_vl.Qwen3VLVisionModel}[name]
    return cls.from_pretrained(folder).eval()


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("packed_video_towers")
    for name in CASES:
        _save(root / name, name)
    return root


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    root = tmp_path_factory.mktemp("clips")
    for seed, (file, (frames, height, width)) in enumerate(CLIPS.items()):
        write_random_clip(root / file, frames, height, width, seed, RATE)
    return root


def _processed(folder: Path, name: str, clip: np.ndarray, rate: float | None = RATE):
    """The model's own video processor, loaded from the folder, on a whole decoded clip and its metadata: it samples
    the clip as it does (or takes every frame). ``(pixel_values_videos, video_grid_thw)``."""
    processor = getattr(transformers, CASES[name][1][0]).from_pretrained(folder)
    metadata = VideoMetadata(total_num_frames=len(clip), fps=rate)
    found = processor(videos=[torch.from_numpy(clip).permute(0, 3, 1, 2)], video_metadata=[metadata],
                      return_tensors="pt")
    return found["pixel_values_videos"], found["video_grid_thw"]


def _slice_chunks(name: str, layer: int, grid: tuple[int, int]) -> list[list[tuple[int, int]]]:
    """The (row, col) of the tokens of each call over one temporal slice, in sequence order: Qwen2.5-VL's window
    block one call per window (windows of 2 x 2 merge blocks), its full-attention block the whole slice in window
    order; the others the whole slice in merge-block order."""
    if name != "qwen2_5_vl":
        return qwen_token_chunks(grid, MERGE, None)
    chunks = qwen_token_chunks(grid, MERGE, WINDOW_PX // MERGE // PATCH)
    return chunks if layer == 0 else [[cell for chunk in chunks for cell in chunk]]


def _clip_reference(name: str, tower, pixels, grid_thw) -> dict[str, torch.Tensor]:
    """``{"mad", "entropy"}`` ``[L, H]`` float64 of one clip: the mean over every token of every slice of its
    per-query values, from the tower's eager probabilities (one call per slice, or per window of a slice)."""
    calls = eager_attention_calls(CASES[name][0], tower, pixels, grid_thw=grid_thw)
    t, h, w = (int(v) for v in grid_thw[0])
    layers, used = {"mad": [], "entropy": []}, 0
    for layer, block in enumerate(tower.blocks):
        values = {"mad": [], "entropy": []}
        for _ in range(t):
            for chunk in _slice_chunks(name, layer, (h, w)):
                module, probabilities = calls[used]
                used += 1
                assert module is block.attn and probabilities.shape[-1] == len(chunk)
                rows = probabilities[0]  # [H, n, n]
                values["mad"].append(chunk_token_mad(probabilities, chunk, PATCH))
                values["entropy"].append(-torch.special.xlogy(rows, rows).sum(-1))
        for stat, parts in values.items():
            layers[stat].append(torch.cat(parts, dim=1).mean(1))  # every token of the clip, [H]
        tokens = torch.cat(values["entropy"], dim=1)
        # Far from uniform over the calls' tokens: a token placed elsewhere would show.
        assert float(tokens.mean()) < 0.8 * math.log(h * w)
    assert used == len(calls)
    return {stat: torch.stack(rows) for stat, rows in layers.items()}


@pytest.mark.parametrize("name", list(CASES))
def test_clips_are_profiled_as_the_model_own_video_processor_and_tower_take_them(folders, clips, name):
    folder = folders / name
    result = vitmad.profile(f"hf:{folder}", clips, device="cpu", batch_size=2, stats="entropy")
    assert result.images == [str(clips / file) for file in CLIPS] and result.skipped == []
    assert result.temporal is None  # every temporal slice attends within itself: no distance in time
    tower = _tower(folder, name)
    references, grids = [], {}
    for file in CLIPS:
        pixels, grid_thw = _processed(folder, name, decoded_frames(clips / file))
        with torch.no_grad():  # the output bit-identical while recorded
            plain = tower(pixels, grid_thw=grid_thw).last_hidden_state
            with vitmad.record(tower):
                recorded = tower(pixels, grid_thw=grid_thw).last_hidden_state
        assert torch.equal(plain, recorded)
        references.append(_clip_reference(name, tower, pixels, grid_thw))
        t, h, w = (int(v) for v in grid_thw[0])
        grids[str(clips / file)] = {"grid": [h, w], "size": [h * PATCH, w * PATCH], "frames": t * TEMPORAL}
    # The frames the processor takes of clip a (9 frames): every one (padded to 10), or the 4 it samples.
    picked = CASES[name][2]
    assert grids[str(clips / "a.mp4")]["frames"] == (len(picked) + 1) // TEMPORAL * TEMPORAL
    assert result.image_grids == grids
    for stat in ("mad", "entropy"):
        expected = torch.stack([reference[stat] for reference in references]).mean(0)
        found = result.mad if stat == "mad" else result.stat("entropy")
        torch.testing.assert_close(found, expected, **TOL)
        print(f"{name} {stat}: max |difference| {float((found - expected).abs().max()):.2e}")
    assert result.settings["preprocessing"]["video_processor"] == CASES[name][1][0]
    assert result.settings["preprocessing"]["processor"]["temporal_patch_size"] == TEMPORAL


def test_the_processor_picks_the_frames_it_samples(folders, clips):
    """The frames vitmad decodes are those the processor's own sampling picks from the whole clip."""
    from vitmad.profiling.models import load_model
    from vitmad.profiling.packed_videos import packed_video_feed
    from vitmad.profiling.videos import load_video

    for name, (_, _, picked) in CASES.items():
        feed = packed_video_feed(load_model(f"hf:{folders / name}"))
        assert feed.pick(9, RATE) == picked
        frames, reason = load_video(clips / "a.mp4", feed.pick)
        assert reason is None
        whole = decoded_frames(clips / "a.mp4")
        assert all(np.array_equal(np.asarray(frame), whole[i]) for frame, i in zip(frames, picked, strict=True))


def test_a_frame_folder_is_a_clip_when_the_sources_are_said_to_be_videos(folders, tmp_path):
    """A folder of frames is a clip (videos=True, --videos); Qwen2-VL's processor takes every frame, in name order."""
    from PIL import Image

    frames = tmp_path / "frames"
    frames.mkdir()
    rng = np.random.default_rng(5)
    arrays = [rng.integers(0, 256, (20, 28, 3), dtype=np.uint8) for _ in range(4)]
    for i, array in enumerate(arrays):
        Image.fromarray(array).save(frames / f"{i:02d}.png")
    folder = folders / "qwen2_vl"
    result = vitmad.profile(f"hf:{folder}", [frames], videos=True, device="cpu")
    pixels, grid_thw = _processed(folder, "qwen2_vl", np.stack(arrays), rate=None)
    assert grid_thw.tolist() == [[2, 4, 8]]  # 20 x 28 px -> 16 x 32 (multiples of 8), 4 frames -> 2 slices
    expected = _clip_reference("qwen2_vl", _tower(folder, "qwen2_vl"), pixels, grid_thw)["mad"]
    torch.testing.assert_close(result.mad, expected, **TOL)
    as_images = vitmad.profile(f"hf:{folder}", [frames], image_size="native", device="cpu")
    assert as_images.count == 4 and as_images.image_grids[str(frames / "00.png")].keys() == {"grid", "size"}
    out = tmp_path / "out"
    assert main(["profile", "--model", f"hf:{folder}", "--videos", str(frames), "--device", "cpu", "--out", str(out),
                 "--no-figures"]) == 0
    document = json.loads((out / "mad.json").read_text())
    assert document["images"] == [str(frames)] and document["image_grids"][str(frames)]["frames"] == 4
    np.testing.assert_allclose(np.array(document["sums"]["total"]), result.stats.total.numpy(), rtol=1e-12)


def test_the_command_writes_mad_json_csv_and_figure_and_resumes(folders, clips, tmp_path, capsys):
    args = ["profile", "--model", f"hf:{folders / 'qwen2_5_vl'}", "--videos", str(clips), "--device", "cpu",
            "--batch-size", "1", "--checkpoint-every", "1"]
    out = tmp_path / "out"
    assert main([*args, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "2 videos (0 skipped)" in printed
    assert sorted(p.name for p in out.iterdir() if p.suffix != ".pt") == ["mad.csv", "mad.json", "mad.png"]
    document = json.loads((out / "mad.json").read_text())
    assert document["count"] == 2 and sorted(document["image_grids"]) == [str(clips / file) for file in CLIPS]
    assert "temporal" not in document["layers"][0]
    single = vitmad.profile(f"hf:{folders / 'qwen2_5_vl'}", clips, device="cpu", batch_size=1)
    np.testing.assert_allclose(np.array(document["sums"]["total"]), single.stats.total.numpy(), rtol=1e-12)
    rows = (out / "mad.csv").read_text().splitlines()
    assert rows[0] == "layer,name,head,mad_mean,mad_std,mad_min,mad_max,count" and len(rows) == 1 + 2 * 2
    # Resumed from its finished checkpoint: the same sums, nothing run again.
    assert main([*args, "--out", str(out), "--resume"]) == 0
    again = json.loads((out / "mad.json").read_text())
    assert again["sums"] == document["sums"] and again["settings"] == document["settings"]


def test_resume_after_an_interrupt_equals_the_uninterrupted_run(folders, clips, tmp_path):
    check_interrupted_resume_equals_one_run(f"hf:{folders / 'qwen3_vl'}", clips, tmp_path / "run.pt")


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_torchrun_two_ranks_equal_one_process(folders, clips, tmp_path):
    args = ["--model", f"hf:{folders / 'qwen2_vl'}", "--videos", str(clips), "--batch-size", "1", "--device", "cpu",
            "--no-figures"]
    profile_one_process_and_two_ranks(args, tmp_path)
    single, two = (json.loads((tmp_path / name / "mad.json").read_text()) for name in ("one", "two"))
    assert two["processes"] == 2 and two["images"] == single["images"]
    assert two["image_grids"] == single["image_grids"] and two["settings"] == single["settings"]
    np.testing.assert_allclose(np.array(two["sums"]["total"]), np.array(single["sums"]["total"]), rtol=1e-12)


def test_a_clip_too_short_for_the_processor_is_skipped_with_its_reason(folders, clips, tmp_path):
    """Qwen3-VL's processor refuses a clip of fewer frames than a temporal patch; the other clips are profiled."""
    write_random_clip(tmp_path / "short.mp4", 1, 28, 40, seed=9, rate=RATE)
    (tmp_path / "a.mp4").symlink_to(clips / "a.mp4")
    with pytest.warns(UserWarning, match=r"skipping video .*short\.mp4: the model's video processor refuses it"):
        result = vitmad.profile(f"hf:{folders / 'qwen3_vl'}", tmp_path, device="cpu")
    assert [Path(p).name for p in result.images] == ["a.mp4"]
    (skipped,) = result.skipped
    assert Path(skipped["path"]).name == "short.mp4" and "temporal_factor:2" in skipped["reason"]


def test_a_tower_whose_videos_are_not_fed_is_refused_by_name(tmp_path, clips, capsys):
    """Pixtral's tower takes images only: given clips, it is refused naming it, not fed their frames as images."""
    config = transformers.PixtralVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                              num_attention_heads=2, patch_size=8, image_size=64)
    transformers.PixtralVisionModel(config).save_pretrained(tmp_path / "pixtral")
    with pytest.raises(OptionError, match=r"images: the vision tower PixtralVisionModel is profiled on images only: it "
                                          r"takes images only; vitmad profile takes the videos of .*Qwen2Vision"):
        vitmad.profile(f"hf:{tmp_path / 'pixtral'}", clips, device="cpu")
    assert main(["profile", "--model", f"hf:{tmp_path / 'pixtral'}", "--videos", str(clips), "--device", "cpu",
                 "--out", str(tmp_path / "out")]) == 2
    assert "PixtralVisionModel is profiled on images only" in capsys.readouterr().err


def test_without_a_video_processor_file_the_image_processor_settings_make_it(folders, clips, tmp_path):
    """A checkpoint without video_preprocessor_config.json (Qwen2-VL's own): transformers builds its video processor
    from preprocessor_config.json, and so does vitmad: here the image processor's 64 to 256 pixels a frame."""
    import shutil

    folder = tmp_path / "qwen2_vl"
    shutil.copytree(folders / "qwen2_vl", folder)
    (folder / "video_preprocessor_config.json").unlink()
    transformers.Qwen2VLImageProcessor(patch_size=PATCH, merge_size=MERGE, temporal_patch_size=TEMPORAL, min_pixels=64,
                                       max_pixels=256).save_pretrained(folder)
    result = vitmad.profile(f"hf:{folder}", clips, device="cpu")
    processor = transformers.Qwen2VLVideoProcessor.from_pretrained(folder)  # transformers' own fallback
    assert dict(processor.size) == {"shortest_edge": 64, "longest_edge": 256}
    assert result.settings["preprocessing"]["processor"]["size"] == {"shortest_edge": 64, "longest_edge": 256}
    tower = _tower(folder, "qwen2_vl")
    references = []
    for file in CLIPS:
        pixels, grid_thw = _processed(folder, "qwen2_vl", decoded_frames(clips / file))
        assert int(grid_thw[0, 1]) * int(grid_thw[0, 2]) * PATCH ** 2 <= 256
        references.append(_clip_reference("qwen2_vl", tower, pixels, grid_thw)["mad"])
    torch.testing.assert_close(result.mad, torch.stack(references).mean(0), **TOL)


@pytest.mark.parametrize(("change", "message"), [
    ({"processor": "Qwen3VLVideoProcessor"}, r"model: the checkpoint's video processor is Qwen3VLVideoProcessor, but "
                                             r"the vision tower Qwen2VisionTransformerPretrainedModel is fed by "
                                             r"Qwen2VLVideoProcessor"),
    ({"temporal_patch_size": 1}, r"model: the video processor has temporal_patch_size=1, but the vision tower "
                                 r"Qwen2VisionTransformerPretrainedModel takes 2"),
    ({"do_sample_frames": True}, r"model: the video processor Qwen2VLVideoProcessor samples frames "
                                 r"\(do_sample_frames\) but cannot by its settings .*give it fps or num_frames"),
])
def test_a_video_processor_that_does_not_fit_the_tower_is_refused(folders, clips, tmp_path, change, message):
    import shutil

    folder = tmp_path / "qwen2_vl"
    shutil.copytree(folders / "qwen2_vl", folder)
    name = change.pop("processor", "Qwen2VLVideoProcessor")
    settings = {**(QWEN3_VIDEO if name.startswith("Qwen3") else QWEN2_VIDEO), **change}
    getattr(transformers, name)(**settings).save_pretrained(folder)
    with pytest.raises(OptionError, match=message):
        vitmad.profile(f"hf:{folder}", clips, device="cpu")


def test_every_packed_tower_profile_loads_has_its_videos_fed_or_refused_with_a_reason():
    from vitmad.profiling.packed_towers import PACKED_TOWERS
    from vitmad.profiling.packed_videos import _NO_VIDEOS, VIDEO_PROCESSORS

    assert set(VIDEO_PROCESSORS) | set(_NO_VIDEOS) == set(PACKED_TOWERS)
    assert not set(VIDEO_PROCESSORS) & set(_NO_VIDEOS)


def test_a_fixed_size_a_tensor_and_videos_for_an_image_model_are_refused(folders, clips, tiny_model):
    spec = f"hf:{folders / 'qwen2_vl'}"
    with pytest.raises(OptionError, match=r"image_size: 16x16 given, but a packed vision tower's video processor "
                                          r"resizes each clip"):
        vitmad.profile(spec, clips, image_size=16, device="cpu")
    with pytest.raises(OptionError, match=r"images: a packed vision tower's videos go through its model's video "
                                          r"processor.*not a tensor"):
        vitmad.profile(spec, torch.zeros(1, 4, 3, 16, 16), videos=True, device="cpu")
    with pytest.raises(OptionError, match=r"videos: .* is no video model .* and no packed vision tower"):
        vitmad.profile(f"hf:{tiny_model}", clips, videos=True, device="cpu")


def test_videos_false_as_numpy_bool_is_false(folders, clips):
    """videos=np.False_ (taken as a flag since 2026-12-06) went the auto-detecting way of None: a clip given to a
    packed tower was profiled as a video where videos=False reads it as an image and reads none (QA 294)."""
    spec = f"hf:{folders / 'qwen2_5_vl'}"
    for flag in (False, np.False_):  # a clip given as an image: said to be one
        with pytest.raises(OptionError, match=r"images: .*a\.mp4: a video clip, and .* takes clips apart from "
                                              r"images, given alone with videos=True"):
            vitmad.profile(spec, [clips / "a.mp4"], videos=flag, image_size="native", device="cpu")
    assert vitmad.profile(spec, [clips / "a.mp4"], videos=np.True_, device="cpu").count == 1
