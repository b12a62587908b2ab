"""Image discovery, decoding, preprocessing, running statistics and checkpoints of ``vitmad profile``."""

from __future__ import annotations

import os
import stat

import pytest
import torch

from conftest import write_corrupt_images, write_images
from vitmad.profiling.checkpoint import fingerprint, load_checkpoint, save_checkpoint
from vitmad.profiling.files import atomic_file
from vitmad.profiling.images import Preprocessing, builtin_image_paths, find_images, load_batch, parse_image_size
from vitmad.profiling.options import OptionError
from vitmad.profiling.stats import RunningStats

PREP = Preprocessing((24, 40), ("cover",), True, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3), "bilinear")


def test_find_images_recursive_sorted_and_deduplicated(tmp_path):
    paths = write_images(tmp_path, 7)
    (tmp_path / "notes.txt").write_text("not an image")
    found = find_images(tmp_path)
    assert found == sorted(p.resolve() for p in paths)
    assert any(p.parent.name == "sub" for p in found)
    # A file named next to its folder is listed once; explicit files keep the order given.
    assert find_images([paths[3], tmp_path]) == [paths[3].resolve()] + [p for p in found if p != paths[3].resolve()]


@pytest.mark.parametrize("make, match", [
    (lambda root: root / "missing", "no such file or folder"),
    (lambda root: root, "no images .* found in folder"),
    # Said as given (Path folded the URL's // into https:/) and why (QA helper-241).
    (lambda root: "https://example.com/cat.jpg", r"no such file or folder: https://example.com/cat.jpg \(a URL: "
                                                 r"vitmad reads local files and downloads nothing"),
    (lambda root: f"{root}/*.png", r"no such file or folder: .*/\*\.png \(a glob pattern: not expanded"),
])
def test_find_images_errors_name_the_option(tmp_path, make, match):
    with pytest.raises((FileNotFoundError, ValueError), match=f"images: {match}"):
        find_images(make(tmp_path))


def test_builtin_images_are_real_photographs():
    paths = builtin_image_paths()
    assert len(paths) >= 10
    assert {"astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg", "camera.png"} <= {p.name for p in paths}


@pytest.mark.parametrize("text, expected", [("224", (224, 224)), ("64x96", (64, 96)), (32, (32, 32)),
                                            ((20, 30), (20, 30)), (None, None)])
def test_parse_image_size(text, expected):
    assert parse_image_size(text) == expected


@pytest.mark.parametrize("text", ["0", "12x", "axb", "1x2x3", "-4", b"40", bytearray(b"40")])  # bytes: QA 413
def test_parse_image_size_rejects(text):
    with pytest.raises(ValueError, match="image_size: expected S or HxW"):
        parse_image_size(text)


def test_preprocessing_matches_hf_image_processor():
    from PIL import Image
    from transformers import ViTImageProcessor

    processor = ViTImageProcessor(size={"height": 28, "width": 36}, image_mean=[0.1, 0.2, 0.3],
                                  image_std=[0.5, 0.6, 0.7])
    ours = Preprocessing.from_hf(processor.to_dict())
    assert ours.size == (28, 36)
    image = Image.fromarray(torch.randint(0, 256, (50, 70, 3), dtype=torch.uint8).numpy())
    theirs = processor(images=image, return_tensors="pt")["pixel_values"][0]
    # Both resize with PIL's bilinear filter; HF rounds to uint8 once more in between: one grey level / std.
    torch.testing.assert_close(ours(image), theirs, rtol=0, atol=1.01 / 255 / 0.5)


@pytest.mark.parametrize("settings,grey_level", [
    ({"do_rescale": False, "image_mean": [127.5] * 3, "image_std": [127.5] * 3}, 1 / 127.5),
    ({"rescale_factor": 1 / 127.5, "image_mean": [1.0] * 3, "image_std": [1.0] * 3}, 1 / 127.5),
    ({"do_rescale": False, "do_normalize": False}, 1.0),
], ids=["no_rescale", "rescale_127", "raw_values"])
def test_preprocessing_rescales_as_the_hf_image_processor_says(settings, grey_level):
    """do_rescale and rescale_factor were read as 1 / 255 whatever they said (values off by up to 0.9)."""
    from PIL import Image
    from transformers import ViTImageProcessor

    processor = ViTImageProcessor(size={"height": 28, "width": 36}, **settings)
    ours = Preprocessing.from_hf(processor.to_dict())
    image = Image.fromarray(torch.randint(0, 256, (50, 70, 3), dtype=torch.uint8).numpy())
    theirs = processor(images=image, return_tensors="pt")["pixel_values"][0].float()  # uint8 when kept raw
    # One grey level in the processor's units, as above (its uint8 rounding between the resize and the rest).
    torch.testing.assert_close(ours(image), theirs, rtol=0, atol=1.01 * grey_level)
    assert ours.to_dict()["rescale"] == (1.0 if settings.get("do_rescale") is False else settings["rescale_factor"])


@pytest.mark.parametrize("kind", ["image", "video"])
def test_vivit_processor_offset_is_followed(kind):
    """ViViT's processor rescales by 1 / 127.5 and subtracts 1 (offset=True, its default and its checkpoints'):
    pixels in [-3, 1] after its normalisation; they were fed in [-1, 3]. Its transformers 5 video processor always
    subtracts it, and saves no offset setting: a checkpoint saved with it was fed in [-1, 3] still (QA 226)."""
    import numpy as np
    from PIL import Image
    from transformers import VivitImageProcessor, VivitVideoProcessor

    frame = torch.randint(0, 256, (50, 70, 3), dtype=torch.uint8).numpy()
    if kind == "image":
        processor = VivitImageProcessor(size={"height": 28, "width": 36}, do_center_crop=False)
        theirs = processor([[frame]], return_tensors="pt")["pixel_values"][0, 0]
    else:
        processor = VivitVideoProcessor(size={"height": 28, "width": 36}, do_center_crop=False)
        assert "offset" not in processor.to_dict()
        theirs = processor([np.stack([frame])], return_tensors="pt")["pixel_values"][0, 0]
    ours = Preprocessing.from_hf(processor.to_dict())
    torch.testing.assert_close(ours(Image.fromarray(frame)), theirs, rtol=0, atol=1.01 / 127.5 / 0.5)
    assert ours.to_dict()["rescale_offset"] == 1.0 and float(theirs.min()) < -1


def _saved_settings(processor, folder) -> dict:
    """A processor's settings as a checkpoint holds them (save_pretrained), completed as loading does."""
    import json

    import transformers

    from vitmad.profiling.models import _with_class_defaults

    processor.save_pretrained(folder)
    saved = json.loads((folder / "preprocessor_config.json").read_text())
    return _with_class_defaults(transformers, str(folder), saved, {})


def test_a_class_without_a_crop_step_is_not_cropped_and_dinov3_resizes_floats(tmp_path):
    """Segformer's processor (as Gemma 3's, RT-DETR's, SegGPT's, GOT-OCR2's and PromptDepthAnything's) takes and
    saves do_center_crop and crop_size but has no crop step: vitmad cropped 40 x 48 to 32 x 32. DINOv3's resizes the
    rescaled floats, unclamped: through PIL, 15% of the values were over half a level off, and a bicubic overshoot
    16 levels (QA 228)."""
    from PIL import Image
    from transformers import DINOv3ViTImageProcessor, SegformerImageProcessorPil

    image = Image.fromarray(torch.randint(0, 256, (61, 97, 3), dtype=torch.uint8,
                                          generator=torch.Generator().manual_seed(0)).numpy())
    segformer = SegformerImageProcessorPil(size={"height": 40, "width": 48}, do_center_crop=True,
                                           crop_size={"height": 32, "width": 32})
    ours = Preprocessing.from_hf(_saved_settings(segformer, tmp_path / "segformer"))
    theirs = segformer(images=image, return_tensors="pt")["pixel_values"][0]
    assert theirs.shape == (3, 40, 48)
    torch.testing.assert_close(ours(image), theirs, rtol=0, atol=1e-6)
    for resample in (2, 3):  # bilinear (its default), bicubic
        dinov3 = DINOv3ViTImageProcessor(size={"height": 32, "width": 48}, resample=resample)
        ours = Preprocessing.from_hf(_saved_settings(dinov3, tmp_path / f"dinov3_{resample}"))
        theirs = dinov3(images=image, return_tensors="pt")["pixel_values"][0]
        torch.testing.assert_close(ours(image), theirs, rtol=0, atol=1e-5)


def test_an_image_size_scales_as_torchvisions_resize_at_that_size():
    """--image-size S scaled the long side to round(long * S / short), torchvision's Resize(S) (and timm at crop_pct
    1, OpenCLIP's preprocess) to int(...): a 301 x 203 image at 256 got 380 px, not 379, the crop resampled at
    another scale, up to 121 grey levels apart (QA 229)."""
    import timm.data
    from PIL import Image

    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    ours = Preprocessing((224, 224), ("shortest", 224), True, mean, std, "bicubic", "round").with_size((256, 256))
    theirs = timm.data.create_transform(input_size=(3, 256, 256), crop_pct=1.0, crop_mode="center",
                                        interpolation="bicubic", mean=mean, std=std)
    pixels = torch.randint(0, 256, (203, 301, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    assert int(256 * 301 / 203) == 379 != round(256 * 301 / 203)
    wide = Image.fromarray(pixels.numpy())
    for image in (wide, wide.transpose(Image.Transpose.ROTATE_90)):
        torch.testing.assert_close(ours(image), theirs(image), rtol=0, atol=1e-5)


def test_a_square_padding_processor_sized_by_its_shortest_edge_is_refused():
    """Janus's and DeepSeek-VL's processors pad to a square of their size's side: a shortest_edge size (which the
    processors themselves cannot take) raised a TypeError comparing None with the minimum size."""
    with pytest.raises(OptionError, match=r"^model: the JanusImageProcessor pads to a square of another size than "
                                          r"\{'shortest_edge': 40\}"):
        Preprocessing.from_hf({"image_processor_type": "JanusImageProcessor", "size": {"shortest_edge": 40},
                               "do_pad": True, "min_size": 14})


def test_a_processor_that_does_not_resize_takes_images_at_the_model_size_only(tmp_path):
    from PIL import Image
    from transformers import ViTImageProcessor

    processor = ViTImageProcessor(size={"height": 28, "width": 36}, do_resize=False)
    ours = Preprocessing.from_hf(processor.to_dict())
    fits = Image.fromarray(torch.randint(0, 256, (28, 36, 3), dtype=torch.uint8).numpy())
    theirs = processor(images=fits, return_tensors="pt")["pixel_values"][0]
    torch.testing.assert_close(ours(fits), theirs, rtol=0, atol=1e-6)
    fits.save(tmp_path / "fits.png")
    Image.fromarray(torch.randint(0, 256, (50, 70, 3), dtype=torch.uint8).numpy()).save(tmp_path / "other.png")
    pixels, loaded, skipped = load_batch([tmp_path / "fits.png", tmp_path / "other.png"], ours)
    assert pixels.shape == (1, 3, 28, 36) and loaded == [tmp_path / "fits.png"]
    assert skipped == [(tmp_path / "other.png", "the model's image processor does not resize (do_resize=false) and "
                        "this image is 50x70 px, not the model's 28x36; pass an image size (--image-size, "
                        "image_size=) to have it scaled")]


def test_images_are_decoded_upright_as_their_exif_orientation_says(tmp_path):
    """A camera's JPEG stored sideways with an orientation tag: upright, as a viewer and transformers'
    load_image show it (was decoded as stored)."""
    from PIL import Image
    from transformers.image_utils import load_image as hf_load_image

    from vitmad.profiling.images import load_image

    stored = Image.fromarray(torch.randint(0, 256, (100, 300, 3), dtype=torch.uint8).numpy())
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to view
    stored.save(tmp_path / "sideways.jpg", exif=exif)
    ours, reason = load_image(tmp_path / "sideways.jpg")
    assert reason is None and ours.size == (100, 300)  # (width, height): upright
    assert ours.tobytes() == hf_load_image(str(tmp_path / "sideways.jpg")).tobytes()


def test_preprocessing_size_override_is_non_square_and_normalised():
    from PIL import Image

    image = Image.new("RGB", (100, 30), (127, 102, 76))
    pixels = PREP(image)
    assert pixels.shape == (3, 24, 40)
    expected = (torch.tensor([127, 102, 76]) / 255 - torch.tensor(PREP.mean)) / torch.tensor(PREP.std)
    torch.testing.assert_close(pixels.mean((1, 2)), expected.float(), rtol=0, atol=1e-5)


def test_load_batch_sets_broken_files_aside(tmp_path):
    good = write_images(tmp_path, 3, nested=False)
    broken = write_corrupt_images(tmp_path / "bad")
    pixels, loaded, skipped = load_batch([good[0], broken[0], good[1], broken[1], good[2]], PREP)
    assert pixels.shape == (3, 3, 24, 40)
    assert loaded == [good[0], good[1], good[2]]
    assert [p for p, _ in skipped] == broken
    assert all(reason for _, reason in skipped)
    assert load_batch(broken, PREP)[0] is None


def test_a_file_pil_cannot_identify_is_skipped_under_another_librarys_replacement_of_pil_open(tmp_path, monkeypatch):
    """Importing ultralytics replaces PIL.Image.open for the whole process: on a file PIL cannot identify it fetches
    a HEIF plugin, and offline fails with ModuleNotFoundError, which ended the profile run (vitmad skipped decoding
    errors only); now the file is skipped with that reason, naming the replacement. The opener here does what
    ultralytics' does without its network."""
    from PIL import Image

    original = Image.open

    def replaced(path, *args, **kwargs):
        try:
            return original(path, *args, **kwargs)
        except Image.UnidentifiedImageError:
            import pi_heif_not_installed  # noqa: F401  (as ultralytics imports pi_heif after its pip attempt)

    monkeypatch.setattr(Image, "open", replaced)
    good = write_images(tmp_path, 2, nested=False)
    (tmp_path / "text.png").write_text("not an image")
    pixels, loaded, skipped = load_batch([good[0], tmp_path / "text.png", good[1]], PREP)
    assert pixels.shape == (2, 3, 24, 40) and loaded == good
    assert skipped == [(tmp_path / "text.png", "ModuleNotFoundError: No module named 'pi_heif_not_installed' "
                                               f"(raised by {__name__}'s replacement of PIL.Image.open)")]


def test_running_stats_match_torch():
    mad = torch.rand(3, 11, 4, dtype=torch.float64) * 100  # [L, images, H]
    stats = RunningStats.empty(3, 4)
    for chunk in mad.split([5, 1, 5], dim=1):
        stats = stats.add(chunk.float())
    values = mad.float().double()
    assert stats.count == 11
    torch.testing.assert_close(stats.mean, values.mean(1), rtol=1e-12, atol=0)
    torch.testing.assert_close(stats.std, values.std(1, correction=0), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(stats.low, values.amin(1), rtol=0, atol=0)
    torch.testing.assert_close(stats.high, values.amax(1), rtol=0, atol=0)


def test_checkpoint_round_trip_and_refuses_other_runs(tmp_path):
    path = tmp_path / "out" / "checkpoint.pt"
    run = fingerprint({"model": "a"}, ["x.png", "y.png"])
    stats = RunningStats.empty(2, 3).add(torch.rand(2, 4, 3))
    save_checkpoint(path, {"fingerprint": run, "stats": stats.state_dict(), "images": ["x.png"]})
    assert [p.name for p in path.parent.iterdir()] == ["checkpoint.pt"]  # no temporary file left behind
    state = load_checkpoint(path, run)
    assert state["images"] == ["x.png"]
    assert torch.equal(RunningStats.from_state_dict(state["stats"]).total, stats.total)
    assert load_checkpoint(tmp_path / "none.pt", run) is None
    other = fingerprint({"model": "a"}, ["x.png", "z.png"])
    with pytest.raises(ValueError, match="resume: .* other settings, other model weights or other images"):
        load_checkpoint(path, other)


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_results_and_checkpoints_get_the_permissions_of_a_normally_created_file(tmp_path, umask, mode):
    """Atomic writes go through a private temporary file; the result must not stay private (0600)."""
    old = os.umask(umask)
    try:
        with atomic_file(tmp_path / "mad.json") as handle:
            handle.write(b"{}")
        save_checkpoint(tmp_path / "checkpoint.pt", {"fingerprint": "run"})
        (tmp_path / "plain.txt").write_bytes(b"")
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
    assert modes == {"mad.json": mode, "checkpoint.pt": mode, "plain.txt": mode}


@pytest.mark.parametrize("size", [(300, 249), (249, 403), (256, 256), (333, 250)])
def test_shortest_edge_resize_and_crop_match_the_hf_pil_processor(size):
    """The short side is exactly S (w * (S / short) fell a pixel short for 216 of the sides 1-1999 at S = 256,
    which shifted and rescaled the whole crop), the long side int(S * long / short), the crop at (H - h) // 2."""
    from PIL import Image

    transformers = pytest.importorskip("transformers")
    # The PIL backend (transformers 5; its default CLIPImageProcessor resizes with torchvision, a few 1e-2 off).
    processor_class = getattr(transformers, "CLIPImageProcessorPil", transformers.CLIPImageProcessor)
    processor = processor_class(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224})
    ours = Preprocessing.from_hf(processor.to_dict())
    image = Image.fromarray(torch.randint(0, 256, (size[1], size[0], 3), dtype=torch.uint8).numpy())
    theirs = processor(images=image, return_tensors="pt")["pixel_values"][0]
    std = min(processor.image_std)
    torch.testing.assert_close(ours(image), theirs, rtol=0, atol=1.01 / 255 / std)


@pytest.mark.parametrize("input_size", [(224, 224), (224, 320), (320, 224)])
@pytest.mark.parametrize("crop_mode", ["center", "squash", "border"])
@pytest.mark.parametrize("size", [(249, 301), (300, 251), (641, 480), (260, 260), (101, 600)])
def test_timm_preprocessing_equals_timm_eval_transform(input_size, crop_mode, size):
    """torchvision's CenterCrop rounds an odd margin (round((H - h) / 2)), transformers floors it: timm models
    get timm's rule; its "squash" crop mode resizes without keeping the aspect ratio, a non-square input in
    "center" mode keeps it (timm's ResizeKeepRatio), and "border" fits the image inside and pads it with the mean
    colour (timm's CenterCropOrPad)."""
    timm = pytest.importorskip("timm")
    from PIL import Image

    config = {"input_size": (3, *input_size), "interpolation": "bicubic", "mean": (0.485, 0.456, 0.406),
              "std": (0.229, 0.224, 0.225), "crop_pct": 0.9, "crop_mode": crop_mode}
    transform = timm.data.create_transform(**config, is_training=False)
    image = Image.fromarray(torch.randint(0, 256, (size[1], size[0], 3), dtype=torch.uint8).numpy())
    torch.testing.assert_close(Preprocessing.from_timm(config)(image), transform(image), rtol=0, atol=1e-5)


def test_an_unknown_timm_crop_mode_is_refused():
    """A crop mode timm may add later is not guessed at: the run is refused, naming the way around it."""
    from vitmad.profiling.options import OptionError

    config = {"input_size": (3, 224, 224), "interpolation": "bicubic", "mean": (0.5,) * 3, "std": (0.5,) * 3,
              "crop_pct": 0.9, "crop_mode": "letterbox"}
    with pytest.raises(OptionError, match="timm crop_mode 'letterbox' is not one this library reproduces"):
        Preprocessing.from_timm(config)


def test_a_partial_processor_file_gets_its_class_defaults(tmp_path):
    """A preprocessor_config.json naming CLIPImageProcessor but not its mean, std or filter: CLIP's own (OpenAI
    statistics, bicubic), not the generic 0.5 and bilinear."""
    import json

    import transformers
    from transformers.image_processing_base import ImageProcessingMixin

    from vitmad.profiling.models import _with_class_defaults

    (tmp_path / "preprocessor_config.json").write_text(json.dumps(
        {"image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": 224},
         "crop_size": {"height": 224, "width": 224}}))
    saved, _ = ImageProcessingMixin.get_image_processor_dict(str(tmp_path))
    ours = Preprocessing.from_hf(_with_class_defaults(transformers, str(tmp_path), saved, {}))
    clip = transformers.CLIPImageProcessor()
    assert ours.mean == tuple(clip.image_mean) and ours.std == tuple(clip.image_std)
    assert ours.interpolation == "bicubic" and ours.center_crop and ours.size == (224, 224)


def test_a_16_bit_greyscale_png_keeps_its_contrast(tmp_path):
    """PIL's convert("RGB") clips 16-bit greyscale at 255 (a white image); load_image scales by 255 / 65535, also in a
    PGM whose values are all small."""
    import numpy as np
    from PIL import Image

    from vitmad.profiling.images import load_image

    values = np.random.default_rng(0).integers(0, 65536, (20, 30)).astype(np.uint16)
    Image.fromarray(values).save(tmp_path / "grey16.png")
    # A dark 16-bit PGM (every value at most 255) opens as mode I, as a 32-bit TIFF does: it was read as 8-bit,
    # 257 times too bright (QA 229); its file says 16 bits.
    dark = values // 257
    (tmp_path / "dark16.pgm").write_bytes(b"P5\n30 20\n65535\n" + dark.astype(">u2").tobytes())
    for name, stored in (("grey16.png", values), ("dark16.pgm", dark)):
        image, reason = load_image(tmp_path / name)
        assert reason is None and image.mode == "RGB" and image.size == (30, 20)
        decoded = np.asarray(image)
        expected = np.rint(stored / 257.0).astype(np.uint8)
        for channel in range(3):
            np.testing.assert_array_equal(decoded[..., channel], expected)


def test_transparency_goes_on_white_where_the_transformers_processor_puts_it_there(tmp_path):
    """QA 268: the alpha channel was dropped, the colours under it kept: a logo whose transparent half is stored
    black was fed black where CLIP's and DINOv2's processors (do_convert_rgb: transformers' convert_to_rgb) make it
    white, 72.8 px off on one head. Each image with an alpha band or a palette's transparent index is now the
    processor's own pixels; a processor that does not convert (do_convert_rgb false) and timm's loader (PIL's
    convert("RGB")) keep the colours under the alpha."""
    import numpy as np
    import transformers
    from PIL import Image

    from vitmad.profiling.images import hf_alpha_on_white

    rng = np.random.default_rng(0)
    colours = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
    alpha = np.where(np.arange(48)[None, :] < 24, 0, rng.integers(0, 256, (40, 48))).astype(np.uint8)
    Image.fromarray(np.dstack([colours, alpha]), "RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(np.dstack([colours[..., 0], alpha]), "LA").save(tmp_path / "la.png")
    palette = Image.fromarray(colours).quantize(16)
    palette.save(tmp_path / "palette.png", transparency=int(np.asarray(palette)[0, 0]))
    paths = sorted(tmp_path.glob("*.png"))
    processor = transformers.CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    settings = {**processor.to_dict(), "image_processor_type": "CLIPImageProcessor"}
    default = {k: v for k, v in settings.items() if k != "do_convert_rgb"}
    assert hf_alpha_on_white(default) and not hf_alpha_on_white({**settings, "do_convert_rgb": False})
    ours, _, _ = load_batch(paths, Preprocessing.from_hf(default))
    theirs = processor([Image.open(path) for path in paths], return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    assert Preprocessing.from_hf(default).to_dict()["alpha_on_white"] is True
    kept = Preprocessing.from_hf({**settings, "do_convert_rgb": False})
    assert "alpha_on_white" not in kept.to_dict()
    dropped, _, _ = load_batch(paths, kept)
    plain = torch.stack([kept(Image.open(path).convert("RGB")) for path in paths])
    torch.testing.assert_close(dropped, plain, rtol=0, atol=0)
    assert (dropped - ours).abs().amax() > 1  # the two ways differ on these images


def test_a_float_tiff_is_skipped_with_its_reason_not_profiled_black(tmp_path):
    """PIL's convert("RGB") truncates 32-bit float pixels: values in [0, 1] became a black image, profiled."""
    import numpy as np
    from PIL import Image

    from vitmad.profiling.images import load_image

    Image.fromarray(np.full((20, 30), 0.75, dtype=np.float32), "F").save(tmp_path / "float.tif")
    image, reason = load_image(tmp_path / "float.tif")
    assert image is None
    assert reason == ("ValueError: floating-point pixels (PIL mode F, values 0.75 to 0.75) have no known scale; "
                      "save the image with 8 or 16 bits a channel")


def test_a_32_bit_integer_tiff_is_skipped_with_its_reason_and_a_16_bit_one_read(tmp_path):
    """A 32-bit integer TIFF (PIL mode I, raw I;32S) was scaled by its own maximum: 200 read as 200, 300 as 1, and
    values over 65535 clipped white, profiled without a word (QA 421). Its scale is unknown, as a float TIFF's is;
    a 16-bit TIFF keeps its scale of 65535."""
    import numpy as np
    from PIL import Image

    from vitmad.profiling.images import load_image

    Image.fromarray(np.array([[0, 300], [70000, 1_000_000]], dtype=np.int32)).save(tmp_path / "counts.tif")
    image, reason = load_image(tmp_path / "counts.tif")
    assert image is None
    assert reason == ("ValueError: 32-bit integer pixels (PIL mode I, values 0 to 1000000) have no known scale; "
                      "save the image with 8 or 16 bits a channel")
    Image.fromarray(np.array([[0, 257], [65535, 25700]], dtype=np.uint16)).save(tmp_path / "sixteen.tif")
    image, reason = load_image(tmp_path / "sixteen.tif")
    assert reason is None and np.asarray(image)[..., 0].tolist() == [[0, 1], [255, 100]]


def test_paths_from_python_expand_the_home_folder(tmp_path, monkeypatch):
    """"~/val" from Python names the same folder as from the shell, which expands it for the command."""
    monkeypatch.setenv("HOME", str(tmp_path))
    write_images(tmp_path / "val", 2)
    assert find_images("~/val") == find_images(tmp_path / "val")
    assert load_checkpoint("~/no_checkpoint.pt", "any") is None
    with atomic_file("~/out/mad.json") as handle:
        handle.write(b"{}")
    assert (tmp_path / "out" / "mad.json").read_bytes() == b"{}"


def test_a_folder_search_passes_hidden_entries_by_and_finds_every_image_suffix(tmp_path):
    """QA 268: a notebook's .ipynb_checkpoints copies and a file manager's .thumbnails were averaged in with the
    photos (the video search passed hidden entries by); .jfif, .jpe, .pbm and .pnm files were left out in
    silence."""
    from PIL import Image

    from vitmad.profiling.images import load_image

    for folder in (".ipynb_checkpoints", ".thumbnails", "class_a"):
        (tmp_path / folder).mkdir()
    picture = Image.new("RGB", (8, 6), (10, 200, 30))
    for name in (".ipynb_checkpoints/a-checkpoint.jpg", ".thumbnails/a.png", ".hidden.png", "class_a/a.jpg"):
        picture.save(tmp_path / name)
    for name, format_ in (("b.jfif", "JPEG"), ("c.JPE", "JPEG"), ("d.pbm", "PPM"), ("e.pnm", "PPM")):
        (picture.convert("1") if name.endswith("pbm") else picture).save(tmp_path / name, format=format_)
    found = find_images(tmp_path)
    assert [p.relative_to(tmp_path).as_posix() for p in found] == ["b.jfif", "c.JPE", "class_a/a.jpg", "d.pbm",
                                                                   "e.pnm"]
    assert all(load_image(path)[1] is None for path in found)
    assert find_images(tmp_path / ".thumbnails") == [(tmp_path / ".thumbnails" / "a.png").resolve()]  # named
