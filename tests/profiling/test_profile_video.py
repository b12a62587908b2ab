"""vitmad profile on video models: clips decoded with PyAV and frame folders, sampled to the model's frame count,
preprocessed with the model's own video processor settings; temporal MAD in mad.json, mad.csv and the figure.

The tests write a tiny VideoMAE (random weights) with its VideoMAEVideoProcessor, an mp4 clip and a folder of
PNG frames. The reference for a frame folder: the frames picked by the sampling rule written here, run through
transformers' own VideoMAEVideoProcessor, then vitmad.record on the model.
"""

from __future__ import annotations

import json
import re
import shutil
from fractions import Fraction

import numpy as np
import pytest
import torch

import vitmad
from vitmad.cli import main
from vitmad.profiling import Profile
from vitmad.profiling.options import OptionError

av = pytest.importorskip("av")
transformers = pytest.importorskip("transformers")
Image = pytest.importorskip("PIL.Image")

FRAMES, SIZE = 4, 32


@pytest.fixture(scope="module")
def video_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("videomae")
    config = transformers.VideoMAEConfig(image_size=SIZE, patch_size=8, num_frames=FRAMES, tubelet_size=2,
                                         hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                         intermediate_size=64)
    torch.manual_seed(0)
    model = transformers.VideoMAEModel(config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "query" in name or "key" in name:
                parameter.normal_(0.0, 0.4)  # heads far from uniform
    model.save_pretrained(folder)
    transformers.VideoMAEVideoProcessor(size={"shortest_edge": SIZE},
                                        crop_size={"height": SIZE, "width": SIZE}).save_pretrained(folder)
    return folder


def _frames(count: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8) for _ in range(count)]


def _write_clip(path, frames: list[np.ndarray]) -> None:
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=8)
        stream.width, stream.height, stream.pix_fmt = SIZE, SIZE, "yuv420p"
        for array in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")))
        container.mux(stream.encode())


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    """A folder holding an mp4 clip of 9 frames and a folder of 7 PNG frames."""
    root = tmp_path_factory.mktemp("videos")
    _write_clip(root / "clip.mp4", _frames(9, seed=1))
    frame_folder = root / "frames"
    frame_folder.mkdir()
    for i, array in enumerate(_frames(7, seed=2)):
        Image.fromarray(array).save(frame_folder / f"{i:03d}.png")
    return root


def test_a_frame_folder_is_profiled_as_the_model_own_processor_prepares_it(video_model, videos):
    result = vitmad.profile(f"hf:{video_model}", [videos / "frames"], device="cpu", batch_size=1)
    # 7 frames to 4: indices round(i * 6 / 3) = 0, 2, 4, 6, through transformers' own video processor.
    files = sorted((videos / "frames").iterdir())
    picked = [np.asarray(Image.open(files[i]).convert("RGB")) for i in (0, 2, 4, 6)]
    processor = transformers.VideoMAEVideoProcessor.from_pretrained(video_model)
    pixels = processor([np.stack(picked)], return_tensors="pt")["pixel_values"]
    model = transformers.VideoMAEModel.from_pretrained(video_model).eval()
    with torch.no_grad(), vitmad.record(model) as rec:
        model(pixels)
    assert result.count == 1 and result.temporal is not None
    torch.testing.assert_close(result.mad, rec.mad[:, 0].double(), rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(result.temporal_mad, rec.temporal_mad[:, 0].double(), rtol=1e-4, atol=1e-4)
    assert [g["frames"] for g in result.geometry] == [2, 2]


def test_mad_json_and_csv_carry_the_temporal_mad_and_read_back(video_model, videos, tmp_path):
    result = vitmad.profile(f"hf:{video_model}", videos, device="cpu", batch_size=2)
    assert result.images == [str(videos / "clip.mp4"), str(videos / "frames")]
    result.to_json(tmp_path / "mad.json")
    result.to_csv(tmp_path / "mad.csv")
    document = json.loads((tmp_path / "mad.json").read_text())
    assert document["format"] == "vitmad-profile/2"
    assert document["layers"][0]["temporal"]["mean"] == result.temporal_mad[0].tolist()
    assert document["layers"][0]["temporal"]["unit"] == "frames" and document["unit"] == "px"
    again = Profile.from_json(tmp_path / "mad.json")
    torch.testing.assert_close(again.temporal_mad, result.temporal_mad)
    torch.testing.assert_close(again.mad, result.mad)
    # An edited temporal sum (or mean) is refused as an edited MAD is (QA 287: read as 10x the temporal MAD).
    document["sums"]["temporal_total"][0][0] *= 10
    (tmp_path / "edited.json").write_text(json.dumps(document))
    with pytest.raises(ValueError, match="layer 0's temporal mean .* is not its sums' total / count"):
        Profile.from_json(tmp_path / "edited.json")
    rows = (tmp_path / "mad.csv").read_text().splitlines()
    assert rows[0].endswith(",tmad_mean,tmad_std,tmad_min,tmad_max")
    assert float(rows[1].split(",")[8]) == pytest.approx(result.temporal_mad[0, 0].item())
    # 2 tubelets of 2 frames: every query's temporal MAD lies in [0, 2] frames.
    assert ((result.temporal_mad > 0) & (result.temporal_mad < 2)).all()


def test_the_uniform_line_stays_on_the_spatial_panel_when_every_head_is_below_it(video_model, videos, tmp_path,
                                                                                   monkeypatch):
    """The panel's y limits were fixed before the uniform-attention line was drawn: with every head below it, the
    legend named a line left off the plot."""
    from vitmad.profiling import plotting

    result = vitmad.profile(f"hf:{video_model}", videos, device="cpu", batch_size=2)
    result.stats.total.mul_(0.5)  # every head's mean far below the uniform value
    figures = []
    monkeypatch.setattr(plotting, "_save", lambda fig, path, dpi: figures.append(fig))
    plotting.plot_space_time(result, tmp_path / "mad.png")
    spatial = figures[0].axes[0]
    assert spatial.get_ylim()[1] > result.uniform_mads[0] > result.mad.max().item()


@pytest.mark.parametrize("kinds, labelled", [(["time", "space"], True), (["keys pooled 3x3x3, stride 1x2x2",
                                                                            "keys pooled 3x3x3, stride 1x4x4"], False)])
@pytest.mark.parametrize("num_layers", [8, 30])
def test_the_kind_of_each_layer_is_named_under_the_ticks_shown_when_short(tmp_path, monkeypatch, kinds, labelled,
                                                                          num_layers):
    """Beyond 24 layers (a deep TimeSformer's divided attention, two layers a block) every layer's label went to
    fewer ticks, which matplotlib refuses; MViT's long pooling descriptions ran into each other under the ticks."""
    from types import SimpleNamespace

    from vitmad.profiling import plotting

    geometry = [{"attention": kinds[i % 2], "grid": [4, 4], "stride": [16.0, 16.0]} for i in range(num_layers)]
    profile = SimpleNamespace(mad=torch.rand(num_layers, 2) * 50, temporal_mad=torch.rand(num_layers, 2),
                              geometry=geometry, uniform_mads=[30.0] * num_layers, model="m", count=1,
                              layers_named=False, settings={}, heads=[2] * num_layers)
    figures = []
    monkeypatch.setattr(plotting, "_save", lambda fig, path, dpi: figures.append(fig))
    plotting.plot_space_time(profile, tmp_path / "mad.png")
    for ax in figures[0].axes[:2]:
        ticks = [int(t) for t in ax.get_xticks()]
        labels = [label.get_text() for label in ax.get_xticklabels()]
        assert len(labels) == len(ticks) and (len(ticks) == num_layers) == (num_layers <= 24)
        expected = [f"{t}\n{kinds[(t - 1) % 2]}" for t in ticks] if labelled else [str(t) for t in ticks]
        if labelled or labels[0]:  # unlabelled ticks keep matplotlib's numbers (drawn when the figure is saved)
            assert labels == expected


def test_the_command_takes_videos_and_draws_both_figures(video_model, videos, tmp_path, capsys):
    (videos / "broken.mp4").write_bytes(b"not a video")
    try:
        with pytest.warns(UserWarning, match="skipping video .*broken.mp4: InvalidDataError"):
            status = main(["profile", "--model", f"hf:{video_model}", "--videos", str(videos), "--out",
                           str(tmp_path), "--device", "cpu", "--batch-size", "2"])
    finally:
        (videos / "broken.mp4").unlink()
    assert status == 0
    stdout = capsys.readouterr().out
    assert "frames)" in stdout and "2 videos (1 skipped)" in stdout
    assert {p.name for p in tmp_path.iterdir()} >= {"mad.json", "mad.csv", "mad.png"}
    document = json.loads((tmp_path / "mad.json").read_text())
    assert document["count"] == 2 and document["skipped"][0]["path"].endswith("broken.mp4")


def test_compare_draws_the_temporal_mad_of_video_profiles(video_model, videos, tiny_model, image_folder, tmp_path):
    """compare drew the spatial MAD alone and said nothing of the temporal MAD: now a figure of it in frames where
    every result is a video profile, and said where one is not."""
    from vitmad.profiling.plotting import written_by_compare

    video = vitmad.profile(f"hf:{video_model}", videos, device="cpu")
    video.to_json(tmp_path / "video.json")
    halved = Profile.from_json(tmp_path / "video.json")
    temporal = halved.temporal  # another video profile, every video's temporal MAD halved (a file's summary must
    temporal.total /= 2  # be what its sums give: all of them are halved)
    temporal.low /= 2
    temporal.high /= 2
    temporal.total_sq /= 4
    temporal.m2 /= 4
    halved.to_json(tmp_path / "halved.json")
    assert torch.equal(halved.stat("temporal_mad"), video.temporal_mad / 2)
    results = [str(tmp_path / "video.json"), str(tmp_path / "halved.json")]
    assert main(["compare", *results, "--out", str(tmp_path / "cmp.png")]) == 0
    assert written_by_compare(tmp_path / "cmp_temporal_mad.png")
    image = vitmad.profile(f"hf:{tiny_model}", image_folder, device="cpu", max_images=2)
    image.to_json(tmp_path / "image.json")
    with pytest.raises(KeyError, match="no 'temporal_mad': this profile is not a video profile"):
        image.stat("temporal_mad")
    with pytest.warns(UserWarning, match=r"^no temporal_mad figure: .*image\.json was profiled without temporal_mad$"):
        assert main(["compare", results[0], str(tmp_path / "image.json"), "--out", str(tmp_path / "cmp.png")]) == 0
    assert not (tmp_path / "cmp_temporal_mad.png").exists()  # the earlier comparison's, removed


def test_image_profiles_keep_their_files_without_temporal_fields(tiny_model, image_folder, tmp_path):
    result = vitmad.profile(f"hf:{tiny_model}", image_folder, device="cpu", max_images=2)
    assert result.temporal is None and result.temporal_mad is None
    result.to_json(tmp_path / "mad.json")
    result.to_csv(tmp_path / "mad.csv")
    document = json.loads((tmp_path / "mad.json").read_text())
    assert "temporal" not in document["layers"][0] and "temporal_total" not in document["sums"]
    header = (tmp_path / "mad.csv").read_text().splitlines()[0]
    assert header == "layer,name,head,mad_mean,mad_std,mad_min,mad_max,count"


def test_an_image_model_takes_every_image_of_a_folder_that_also_holds_a_clip(tiny_model, tmp_path, capsys):
    """A clip beside images made the command read the folder as videos before the model was known: the top-level
    images were dropped silently and the clip listed as an unreadable image."""
    folder = tmp_path / "mixed"
    (folder / "sub").mkdir(parents=True)
    for i, array in enumerate(_frames(4, seed=3)):
        Image.fromarray(array).save(folder / ("sub" if i > 1 else "") / f"img{i}.png")
    _write_clip(folder / "x.mp4", _frames(3, seed=4))
    assert main(["profile", "--model", f"hf:{tiny_model}", "--images", str(folder), "--out", str(tmp_path / "out"),
                 "--device", "cpu", "--no-figures"]) == 0
    document = json.loads((tmp_path / "out" / "mad.json").read_text())
    assert sorted(p.rsplit("/", 1)[-1] for p in document["images"]) == ["img0.png", "img1.png", "img2.png",
                                                                        "img3.png"]
    assert document["skipped"] == []


def test_a_missing_video_decoder_names_the_extra_before_the_run(video_model, videos, tmp_path, capsys,
                                                                 monkeypatch):
    """Without PyAV the refusal came at the first batch, after a checkpoint of no batch was written (QA
    helper-124); now before the run, and frame folders alone need no decoder."""
    import sys

    monkeypatch.setitem(sys.modules, "av", None)  # import av now raises ModuleNotFoundError
    status = main(["profile", "--model", f"hf:{video_model}", "--videos", str(videos), "--out", str(tmp_path / "out"),
                   "--device", "cpu", "--no-figures"])
    captured = capsys.readouterr()
    assert status == 2 and captured.out == ""
    assert captured.err.strip() == ("vitmad: error: decoding video files needs the package av, which is not "
                                    'installed: pip install "vitmad[profile]"')
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    assert main(["profile", "--model", f"hf:{video_model}", "--videos", str(videos / "frames"), "--out",
                 str(tmp_path / "frames_out"), "--device", "cpu", "--no-figures"]) == 0


def test_a_video_the_preprocessing_cannot_take_is_skipped_by_name(video_model, tmp_path):
    """A processor that does not resize and a video of another size ended the whole run with the image message
    and no video named; an image of another size is skipped by name."""
    model = tmp_path / "no_resize"
    transformers.VideoMAEModel.from_pretrained(video_model).save_pretrained(model)
    (model / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "VideoMAEImageProcessor", "size": {"height": SIZE, "width": SIZE},
        "crop_size": {"height": SIZE, "width": SIZE}, "do_center_crop": False, "do_resize": False}))
    folder = tmp_path / "videos"
    for name, size in (("fits", SIZE), ("larger", SIZE + 8)):
        (folder / name).mkdir(parents=True)
        for i in range(FRAMES):
            Image.fromarray(np.full((size, size, 3), 40 * i, dtype=np.uint8)).save(folder / name / f"{i}.png")
    from vitmad.profiling.videos import find_videos

    with pytest.warns(UserWarning, match="skipping video .*larger"):
        result = vitmad.profile(f"hf:{model}", find_videos(folder), device="cpu")
    assert [p.rsplit("/", 1)[-1] for p in result.images] == ["fits"]
    assert [s["path"].rsplit("/", 1)[-1] for s in result.skipped] == ["larger"]
    assert "does not resize (do_resize=false) and this image is 40x40 px" in result.skipped[0]["reason"]


def test_a_folder_without_videos_is_refused_naming_the_flag(video_model, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["profile", "--model", f"hf:{video_model}", "--videos", str(tmp_path / "empty"),
                 "--out", str(tmp_path / "out"), "--device", "cpu"]) == 2
    assert "vitmad: error: --videos: found no video" in capsys.readouterr().err


def test_the_command_takes_folders_of_frame_folders(video_model, tmp_path, capsys):
    """A folder of frame folders (PNG files only, no clip) is video to a video model: the command once took the
    PNGs for images and refused them; it must equal the Python API on the same folder."""
    root = tmp_path / "frames_root"
    for name, seed in (("a", 3), ("b", 4)):
        (root / name).mkdir(parents=True)
        for i, array in enumerate(_frames(5, seed=seed)):
            Image.fromarray(array).save(root / name / f"{i:03d}.png")
    assert main(["profile", "--model", f"hf:{video_model}", "--videos", str(root), "--out", str(tmp_path / "out"),
                 "--device", "cpu", "--no-figures"]) == 0
    document = json.loads((tmp_path / "out" / "mad.json").read_text())
    expected = vitmad.profile(f"hf:{video_model}", root, device="cpu")
    assert document["count"] == 2 == expected.count
    torch.testing.assert_close(Profile.from_json(tmp_path / "out" / "mad.json").mad, expected.mad)


@pytest.mark.parametrize("available, frames, expected", [
    (10, 5, [0, 2, 4, 7, 9]),  # evenly spread, first and last included; 2.25 and 6.75 round to the nearest
    (9, 5, [0, 2, 4, 6, 8]),
    (5, 4, [0, 1, 3, 4]),  # 1.333 and 2.667
    (3, 5, [0, 0, 1, 2, 2]),  # fewer frames than the model takes repeat some; 0.5 -> 0 and 1.5 -> 2 (halves to even)
    (3, 4, [0, 1, 1, 2]),
    (7, 1, [0]),
])
def test_the_sampling_rule_the_readme_states(available, frames, expected):
    from vitmad.profiling.videos import sample_indices

    assert sample_indices(available, frames) == expected


@pytest.mark.parametrize("count, codec", [(9, "mpeg4"), (40, "libx264"), (3, "mpeg4")])
def test_a_clip_keeps_only_its_sampled_frames_and_picks_those_of_a_full_decode(tmp_path, count, codec):
    """load_video decodes the clip once, keeping the sampled frames only (a long clip's whole decode took
    gigabytes), and they are the frames a full decode gives at the sampling rule's indices."""
    from vitmad.profiling.videos import load_video, sample_indices

    path = tmp_path / "clip.mp4"
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=8)
        stream.width, stream.height, stream.pix_fmt = SIZE, SIZE, "yuv420p"
        for i in range(count):  # every frame a different grey
            frame = av.VideoFrame.from_ndarray(np.full((SIZE, SIZE, 3), 6 * i, np.uint8), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    with av.open(str(path)) as container:
        everything = [frame.to_image().convert("RGB") for frame in container.decode(video=0)]
    assert len(everything) == count
    for frames in (1, 4, 16):
        picked, reason = load_video(path, frames)
        assert reason is None
        expected = [everything[i] for i in sample_indices(count, frames)]
        assert [np.asarray(p).tobytes() for p in picked] == [np.asarray(e).tobytes() for e in expected]


def test_videos_are_named_by_absolute_paths_as_images_are(videos, monkeypatch):
    """A relative --videos gives the same absolute names as find_images gives images (mad.json, resume)."""
    from vitmad.profiling.videos import find_videos

    monkeypatch.chdir(videos.parent)
    relative = find_videos(videos.name)
    assert relative == find_videos(str(videos)) == sorted([videos / "clip.mp4", videos / "frames"])
    assert all(path.is_absolute() for path in relative)


def test_frame_folders_take_their_images_only_in_the_order_of_their_numbers(tmp_path):
    """A macOS .DS_Store or a readme.txt beside the frames dropped the whole folder from the run, silently; frames
    named frame_0 ... frame_11 were read in string order (frame_10 after frame_1)."""
    from PIL import Image

    from vitmad.profiling.videos import find_videos, load_video

    root = tmp_path / "clips"
    for name, count, extra in (("x", 12, ".DS_Store"), ("y", 4, None), ("z", 3, "readme.txt")):
        folder = root / name
        folder.mkdir(parents=True)
        for i in range(count):  # each frame a grey level of its own: the sample shows which frames it took
            Image.new("RGB", (8, 8), (10 * i,) * 3).save(folder / f"frame_{i}.png")
        if extra:
            (folder / extra).write_bytes(b"not a frame")
    assert find_videos(root) == [root / "x", root / "y", root / "z"]
    picked, reason = load_video(root / "x", 4)
    assert reason is None and [image.getpixel((0, 0))[0] for image in picked] == [0, 40, 70, 110]  # 0, 4, 7, 11
    (root / "x" / "sub").mkdir()  # an empty folder (as --out is when a run starts) makes no video
    assert find_videos(root) == [root / "x", root / "y", root / "z"]
    Image.new("RGB", (8, 8)).save(root / "x" / "sub" / "frame_0.png")
    # A folder of frames beside the frames: then x is a folder of videos, and its own images are no video's.
    with pytest.warns(UserWarning, match=r"x: 12 image files beside clips or folders are left out"):
        assert find_videos(root) == [root / "x" / "sub", root / "y", root / "z"]


def test_hidden_clips_are_passed_by_and_frame_transparency_follows_the_processor(tmp_path):
    """QA 270: a macOS ._clip.mp4 beside the clip was listed as a video (and skipped as unreadable); a frame
    folder's transparent frames were read with their alpha dropped while mad.json said the processor's
    do_convert_rgb (transparency onto white)."""
    from PIL import Image

    from vitmad.profiling.images import Preprocessing
    from vitmad.profiling.videos import find_videos, load_video_batch

    root = tmp_path / "clips"
    frames = root / "frames"
    frames.mkdir(parents=True)
    for i in range(2):  # the left half transparent over black
        rgba = np.zeros((8, 8, 4), np.uint8)
        rgba[:, 4:] = (200, 10 * i, 30, 255)
        Image.fromarray(rgba, "RGBA").save(frames / f"frame_{i}.png")
    (root / "._frames.mp4").write_bytes(b"\0\5\22\7")
    assert find_videos(root) == [frames]
    for on_white, left in ((True, 255), (False, 0)):
        preprocessing = Preprocessing((8, 8), ("exact", 8, 8), False, (0.0,) * 3, (1.0,) * 3,
                                      alpha_on_white=on_white)
        pixels, loaded, skipped = load_video_batch([frames], 2, preprocessing)
        assert loaded == [frames] and not skipped
        torch.testing.assert_close(pixels[0, :, :, :, :4], torch.full((2, 3, 8, 4), left / 255))
        torch.testing.assert_close(pixels[0, 1, :, :, 4:], torch.tensor([200, 10, 30])[:, None, None].expand(3, 8, 4)
                                   / 255.0)


def test_a_video_tensor_of_another_frame_count_is_refused_by_name(video_model):
    pixels = torch.randn(2, FRAMES + 2, 3, SIZE, SIZE)
    with pytest.raises(ValueError, match=rf"images: the video model takes {FRAMES} frames a video, \[B, {FRAMES}, 3, "
                                         rf"H, W\]; got a tensor of shape \[2, {FRAMES + 2}, 3, {SIZE}, {SIZE}\]"):
        vitmad.profile(f"hf:{video_model}", pixels, device="cpu")


def test_a_video_module_without_preprocessing_names_the_video_tensor_it_takes(video_model, videos):
    # A module built in Python: the advice named a [B, 3, H, W] tensor, which a video model then refused (QA 301).
    module = transformers.VideoMAEModel.from_pretrained(video_model).eval()
    with pytest.raises(OptionError, match=rf"^images: this model has no known preprocessing .* pass preprocessed "
                                          rf"pixels as a \[B, frames \({FRAMES}\), 3, H, W\] tensor"):
        vitmad.profile(module, videos, device="cpu", videos=True)
    with pytest.raises(OptionError, match=rf"stack pixel tensors into one \[B, frames \({FRAMES}\), 3, H, W\]"):
        vitmad.profile(module, [torch.randn(FRAMES, 3, SIZE, SIZE)], device="cpu")
    assert vitmad.profile(module, torch.randn(2, FRAMES, 3, SIZE, SIZE), device="cpu").count == 2
    grey = transformers.VideoMAEModel(transformers.VideoMAEConfig(  # its channel count too (QA 304)
        image_size=SIZE, patch_size=8, num_frames=FRAMES, tubelet_size=2, num_channels=1, hidden_size=32,
        num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)).eval()
    with pytest.raises(OptionError, match=rf"as a \[B, frames \({FRAMES}\), 1, H, W\] tensor"):
        vitmad.profile(grey, videos, device="cpu", videos=True)
    assert vitmad.profile(grey, torch.randn(2, FRAMES, 1, SIZE, SIZE), device="cpu").count == 2


def _frame_folder(folder, count: int, seed: int, name=lambda i: f"{i:03d}.png") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, array in enumerate(_frames(count, seed=seed)):
        Image.fromarray(array).save(folder / name(i))


def test_linked_video_folders_are_searched_and_a_dangling_clip_is_listed_as_skipped(video_model, tmp_path,
                                                                                    capsys):
    """rglob did not follow a linked folder of frame folders (one video of six was profiled, nothing said), and a
    link to a clip that is gone was dropped unseen."""
    shared = tmp_path / "shared"
    for name, seed in (("a", 3), ("b", 4)):
        _frame_folder(shared / name, 5, seed)
    root = tmp_path / "root"
    _frame_folder(root / "own", 5, 5)
    (root / "linked").symlink_to(shared, target_is_directory=True)
    (root / "again").symlink_to(shared, target_is_directory=True)  # the same real folder: its videos once
    (root / "gone.mp4").symlink_to(tmp_path / "nowhere.mp4")
    with pytest.warns(UserWarning, match="skipping .*gone.mp4"):
        assert main(["profile", "--model", f"hf:{video_model}", "--videos", str(root), "--out", str(tmp_path / "out"),
                     "--device", "cpu", "--no-figures"]) == 0
    document = json.loads((tmp_path / "out" / "mad.json").read_text())
    assert sorted(p.rsplit("/", 2)[-1] for p in document["images"]) == ["a", "b", "own"]
    assert [s["path"].rsplit("/", 1)[-1] for s in document["skipped"]] == ["gone.mp4"]
    assert document["skipped"][0]["reason"].startswith("FileNotFoundError")


def test_images_beside_clips_or_folders_are_left_out_with_a_warning(video_model, tmp_path):
    """They are no video's frames: they were dropped without a word."""
    root = tmp_path / "root"
    _frame_folder(root / "clip", 5, 3)
    _frame_folder(root, 2, 4, name=lambda i: f"loose_{i}.png")
    with pytest.warns(UserWarning, match=rf"{root}: 2 image files beside clips or folders are left out"):
        result = vitmad.profile(f"hf:{video_model}", root, device="cpu")
    assert result.count == 1 and result.images[0].endswith("clip")


def test_out_inside_a_frame_folder_keeps_that_video(video_model, tmp_path, capsys):
    """--out clip/out made clip a folder holding a folder, no longer a video: it was dropped silently, and named
    alone it was "no video"."""
    root = tmp_path / "root"
    _frame_folder(root / "clip", 5, 3)
    _frame_folder(root / "clip2", 5, 4)
    for sources, out, count in (([root], root / "clip" / "out", 2), ([root / "clip"], root / "clip" / "out2", 1)):
        assert main(["profile", "--model", f"hf:{video_model}", "--videos", *map(str, sources), "--out", str(out),
                     "--device", "cpu", "--no-figures"]) == 0
        assert json.loads((out / "mad.json").read_text())["count"] == count
    assert main(["profile", "--model", f"hf:{video_model}", "--videos", str(root), "--out",
                 str(root / "clip" / "out"), "--device", "cpu", "--no-figures", "--resume"]) == 0


def test_frame_names_with_digit_characters_int_refuses_are_sorted(tmp_path):
    """"²" is a digit to str.isdigit, and int("²") raised: one such frame name ended the whole run. It is text
    between the numbers 1 and 3."""
    from vitmad.profiling.videos import frame_files

    _frame_folder(tmp_path / "f", 3, 1, name=lambda i: ["shot_1²3.png", "shot_2.png", "shot_10.png"][i])
    assert [p.name for p in frame_files(tmp_path / "f")] == ["shot_1²3.png", "shot_2.png", "shot_10.png"]


def test_a_video_model_with_the_built_in_stills_and_an_audio_only_clip_say_what_they_are(video_model, tmp_path,
                                                                                         capsys):
    assert main(["profile", "--model", f"hf:{video_model}", "--out", str(tmp_path / "out"), "--device", "cpu"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"vitmad: error: --images: hf:{video_model} is a video model and the built-in images are still photographs: "
        "pass --videos with clips or folders of frames")
    from vitmad.profiling.videos import load_video

    with av.open(str(tmp_path / "audio.mkv"), mode="w") as container:
        stream = container.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), dtype=np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        for packet in stream.encode(frame):
            container.mux(packet)
        container.mux(stream.encode())
    assert load_video(tmp_path / "audio.mkv", 4) == (None, "no video stream (audio or data only)")


def test_a_clip_stored_sideways_is_decoded_upright(tmp_path):
    """A clip with a display rotation (a phone's portrait video) was profiled sideways, while a still with the same
    EXIF orientation is turned upright. PyAV's frame.rotation is the counterclockwise angle of the display matrix."""
    from vitmad.profiling.videos import load_video

    stored = np.zeros((32, 64, 3), dtype=np.uint8)
    stored[:8, :8] = 255  # a white corner at the stored frame's top left
    path = tmp_path / "sideways.mp4"
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=8)
        stream.width, stream.height, stream.pix_fmt = 64, 32, "yuv420p"
        stream.set_display_rotation(90)
        for _ in range(3):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(stored, format="rgb24")))
        container.mux(stream.encode())
    with av.open(str(path)) as container:
        angle = next(container.decode(video=0)).rotation
    assert angle in (90, -90)
    frames, reason = load_video(path, 2)
    assert reason is None and frames[0].size == (32, 64)  # (width, height): upright
    pixels = np.asarray(frames[0])
    # Turned counterclockwise by 90, the top-left corner goes to the bottom left; by -90, to the top right.
    corner = pixels[-8:, :8] if angle == 90 else pixels[:8, -8:]
    assert corner.mean() > 200 and pixels[:8, :8].mean() < 60


@pytest.mark.parametrize("degrees", [0, 90, 180, 270])
@pytest.mark.parametrize("hflip", [False, True], ids=["unmirrored", "mirrored"])
def test_a_clip_in_any_of_the_eight_orientations_is_decoded_as_shown(tmp_path, degrees, hflip):
    """The eight orientations a display matrix states (EXIF's eight), written by PyAV's set_display_rotation: the
    stored frame turned counterclockwise by ``degrees``, then mirrored left to right. A mirrored clip was decoded
    turned by PyAV's rotation alone, which for a mirror without a turn is 180 degrees: upside down (QA helper-152)."""
    from vitmad.profiling.videos import load_video

    # Coarse random blocks of 8 x 8 px: lossy coding keeps them, and no two of the eight orientations look alike.
    stored = np.kron(np.random.default_rng(0).integers(0, 256, (4, 8, 3)), np.ones((8, 8, 1))).astype(np.uint8)
    path = tmp_path / "oriented.mp4"
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=8)
        stream.width, stream.height, stream.pix_fmt = 64, 32, "yuv420p"
        stream.set_display_rotation(degrees, hflip=hflip)
        for _ in range(2):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(stored, format="rgb24")))
        container.mux(stream.encode())
    shown = np.rot90(stored, k=degrees // 90)  # counterclockwise
    shown = shown[:, ::-1] if hflip else shown
    frames, reason = load_video(path, 1)
    decoded = np.asarray(frames[0]).astype(float)
    assert reason is None and decoded.shape == shown.shape
    errors = {}  # the mean error against each of the eight orientations: the shown one is far the closest
    for k in range(4):
        for mirrored in (False, True):
            candidate = np.rot90(stored, k=k)
            candidate = candidate[:, ::-1] if mirrored else candidate
            if candidate.shape == decoded.shape:
                errors[k * 90, mirrored] = np.abs(decoded - candidate).mean()
    assert min(errors, key=errors.get) == (degrees, hflip) and errors[degrees, hflip] < 12


def test_a_size_the_video_model_refuses_is_refused_naming_the_option_before_any_checkpoint(video_model, videos,
                                                                                         tmp_path, capsys):
    """VideoMAE's patch embedding raises at any size but its own (its position table is fixed): the error came
    from the first forward, naming no option, with a checkpoint left behind."""
    out = tmp_path / "out"
    assert main(["profile", "--model", f"hf:{video_model}", "--videos", str(videos), "--out", str(out),
                 "--device", "cpu", "--image-size", "48"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"vitmad: error: --image-size: VideoMAEModel takes {SIZE}x{SIZE} px only (embeddings.patch_embeddings checks "
        "its input against its image_size, and the model does not interpolate its position embeddings), got 48x48")
    assert not (out / "checkpoint.pt").exists()
    assert vitmad.profile(f"hf:{video_model}", videos, device="cpu", image_size=SIZE).count == 2


def test_sizes_timesformer_cannot_take_are_refused_naming_the_option(videos, tmp_path, capsys):
    """TimeSformer interpolates its position embeddings, but its divided blocks cut each frame's patches into rows of
    config.image_size // patch_size (4 here): 24 x 24 px (9 patches) failed inside the first forward with a reshape
    error (QA 301); and its embeddings take a frame one patch wide for one row taller (QA 304), in every attention
    type. 16 x 48 px (12 patches, three rows) runs (test_record_video holds its numbers)."""
    folder = tmp_path / "timesformer"
    config = transformers.TimesformerConfig(image_size=SIZE, patch_size=8, num_frames=FRAMES, hidden_size=32,
                                            num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    torch.manual_seed(0)
    transformers.TimesformerModel(config).save_pretrained(folder)
    transformers.VideoMAEImageProcessor(size={"height": SIZE, "width": SIZE}, do_center_crop=False).save_pretrained(
        folder)
    capsys.readouterr()  # transformers' progress bar while saving
    rows = ("TimesformerModel takes a size whose patches per frame are a multiple of 4: its divided space-time "
            "blocks cut each frame into rows of config.image_size // patch_size = 32 // 8 patches whatever the input's "
            "width (such as 32x32); got 24x24 (3x3 patches of 8 px)")
    out = tmp_path / "out"
    assert main(["profile", "--model", f"hf:{folder}", "--videos", str(videos), "--out", str(out), "--device", "cpu",
                 "--image-size", "24"]) == 2
    assert capsys.readouterr().err.strip() == f"vitmad: error: --image-size: {rows}"
    assert not out.exists() or not any(out.iterdir())
    model = transformers.TimesformerModel(config).eval()
    for size in (None, 24, (24, 24)):  # a module without preprocessing: the tensor's own size, given or not
        with pytest.raises(OptionError, match=r"^images: " + re.escape(rows)):
            vitmad.profile(model, torch.randn(1, FRAMES, 3, 24, 24), device="cpu", image_size=size)
    # A tensor of another shape is told so first, as it was before the size is checked (QA 304).
    for shape in ((5,), (1, 3, 24, 24), (1, FRAMES + 1, 3, 24, 24)):
        with pytest.raises(OptionError, match=r"^images: (a tensor of videos must be|the video model takes)"):
            vitmad.profile(model, torch.randn(shape), device="cpu")
    narrow = ("TimesformerModel takes frames at least two patches wide (or of its 16 patches): its embeddings read a "
              "frame one patch wide as one row taller than it is, and its position embeddings do not fit; got 32x8 "
              "(4x1 patches of 8x8 px)")
    for attention in ("divided_space_time", "joint_space_time", "space_only"):
        config.attention_type = attention
        model = transformers.TimesformerModel(config).eval()
        with pytest.raises(OptionError, match=r"^images: " + re.escape(narrow)):
            vitmad.profile(model, torch.randn(1, FRAMES, 3, 32, 8), device="cpu")
        with pytest.raises(RuntimeError):  # the model's own forward, which the refusal spares
            model(torch.randn(1, FRAMES, 3, 32, 8))
    profiled = vitmad.profile(f"hf:{folder}", videos, device="cpu", image_size=(16, 48))
    assert profiled.count == 2 and profiled.mad.shape == (2, 2)


def test_the_pixel_limit_of_stills_holds_for_the_frames_of_a_clip(videos, monkeypatch):
    """A still or a frame folder over PIL.Image.MAX_IMAGE_PIXELS is refused before decoding; a clip's frames were
    decoded whatever their size."""
    from vitmad.profiling.videos import load_video

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", SIZE * SIZE - 1)
    frames, reason = load_video(videos / "clip.mp4", 2)
    assert frames is None
    assert reason == (f"DecompressionBombError: frame size ({SIZE}x{SIZE} pixels) exceeds PIL.Image.MAX_IMAGE_PIXELS "
                      f"= {SIZE * SIZE - 1}")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", SIZE * SIZE)
    assert load_video(videos / "clip.mp4", 2)[1] is None


@pytest.mark.parametrize("container_format, codec", [("mkv", "ffv1"), ("mp4", "mpeg4")])
def test_a_clip_cut_short_is_skipped_with_the_reason(tmp_path, container_format, codec):
    """An interrupted copy of a clip decoded what survived, and its sample was taken over that shorter span (frames
    0, 2, 5, 7 of a 12-frame clip instead of 0, 4, 7, 11), silently; a truncated still is skipped."""
    from vitmad.profiling.videos import load_video

    whole = tmp_path / f"whole.{container_format}"
    with av.open(str(whole), mode="w") as container:
        stream = container.add_stream(codec, rate=10)
        stream.width, stream.height = SIZE, SIZE
        stream.pix_fmt = "yuv420p" if codec == "mpeg4" else stream.pix_fmt
        for array in _frames(12, seed=7):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")))
        container.mux(stream.encode())
    frames, reason = load_video(whole, 4)
    assert reason is None and len(frames) == 4
    cut = tmp_path / f"cut.{container_format}"
    cut.write_bytes(whole.read_bytes()[: int(whole.stat().st_size * 0.6)])
    frames, reason = load_video(cut, 4)
    assert frames is None
    # mp4 keeps its index at the end: cut, it does not open at all; Matroska's header gives the duration.
    assert reason.startswith("truncated: ") if container_format == "mkv" else reason.startswith("InvalidDataError")


def test_a_resume_after_the_config_changed_the_frame_count_is_refused(video_model, videos, tmp_path):
    """VideoMAE's frame count is its config's num_frames, which no weight shows (its position table is
    sinusoidal): a checkpoint of 4-frame clips resumed after config.json said 8 fed 8-frame clips and wrote one
    result of both (QA helper-235). mad.json says the count; the resume is refused, naming it."""
    folder = tmp_path / "model"
    shutil.copytree(video_model, folder)
    checkpoint, clips = tmp_path / "run.pt", [videos / "clip.mp4", videos / "frames"]
    first = vitmad.profile(f"hf:{folder}", clips, device="cpu", batch_size=1, checkpoint=checkpoint)
    assert first.settings["frames"] == FRAMES
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "num_frames": 2 * FRAMES}))
    with pytest.raises(OptionError, match=r"\(changed since: the video model's frame count \(its config's "
                                          r"num_frames\)\)"):
        vitmad.profile(f"hf:{folder}", clips, device="cpu", batch_size=1, checkpoint=checkpoint, resume=True)


def _write_timed(path, arrays, times_ms, codec="ffv1", **options):
    """A clip whose frames are shown at ``times_ms`` (a variable frame rate), nominally 30 fps."""
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=30, options=options)
        stream.width, stream.height = SIZE, SIZE
        stream.pix_fmt = "yuv420p" if codec == "mpeg4" else stream.pix_fmt
        stream.codec_context.time_base = stream.time_base = Fraction(1, 1000)
        for array, time in zip(arrays, times_ms):
            frame = av.VideoFrame.from_ndarray(array, format="rgb24")
            frame.pts, frame.time_base = time, Fraction(1, 1000)
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


def test_a_variable_frame_rate_clip_is_not_taken_for_a_cut_one(tmp_path):
    """A phone clip that paused: 12 frames over 3.1 s at a nominal 30 fps. Matroska's header has no frame count,
    and its duration times the nominal rate (94 frames) had it skipped as truncated (QA helper-235); the packets'
    times reach the header's end. Its frames are sampled by index as any clip's."""
    from vitmad.profiling.videos import load_video

    arrays = _frames(12, seed=3)
    clip = tmp_path / "paused.mkv"
    _write_timed(clip, arrays, [0, 33, 66, 100, 133, 1000, 1033, 1066, 3000, 3033, 3066, 3100])
    with av.open(str(clip)) as container:
        shown = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    assert len(shown) == 12
    frames, reason = load_video(clip, 4)
    assert reason is None
    for frame, index in zip(frames, [0, 4, 7, 11]):  # round(i * 11 / 3)
        assert np.array_equal(np.asarray(frame), shown[index])
    cut = tmp_path / "cut.mkv"
    cut.write_bytes(clip.read_bytes()[: int(clip.stat().st_size * 0.6)])
    assert load_video(cut, 4)[1].startswith("truncated: its frames end at ")


def test_a_clip_cut_by_stream_copy_is_read_as_players_show_it(tmp_path):
    """``ffmpeg -ss T -c copy`` starts a clip at the keyframe before T and hides the frames before T with an edit
    list: its header counts 30 samples, players show 20. The 10 discarded packets had it skipped as truncated (QA
    helper-235); they are no frames of the clip, which is sampled over the 20 shown."""
    from vitmad.profiling.videos import load_video

    source, trimmed = tmp_path / "source.mp4", tmp_path / "trimmed.mp4"
    arrays = _frames(60, seed=4)
    _write_timed(source, arrays, [40 * i for i in range(60)], codec="mpeg4", g="30", bf="0")
    with av.open(str(source)) as reader, av.open(str(trimmed), mode="w") as writer:
        stream = reader.streams.video[0]
        out = writer.add_stream_from_template(stream)
        shift = round(Fraction(40, 25) / stream.time_base)  # frame 40 at time 0: the keyframe 30 ten frames before
        for packet in reader.demux(stream):
            if packet.dts is None or packet.pts * stream.time_base < Fraction(30 * 40, 1000):
                continue
            packet.pts, packet.dts, packet.stream = packet.pts - shift, packet.dts - shift, out
            writer.mux(packet)
    with av.open(str(trimmed)) as container:
        assert container.streams.video[0].frames == 30
        shown = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    assert len(shown) == 20
    frames, reason = load_video(trimmed, 3)
    assert reason is None
    for frame, index in zip(frames, [0, 10, 19]):  # round(i * 19 / 2)
        assert np.array_equal(np.asarray(frame), shown[index])
