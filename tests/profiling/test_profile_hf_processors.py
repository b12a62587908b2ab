"""transformers image processors whose geometry is not a plain resize and centre crop: the Janus and DeepSeek-VL
pad to a centred square (reproduced, pixel for pixel), and the processors whose padding, resize or tiling
``Preprocessing`` does not reproduce (refused, naming the processor and the way around it, instead of squashing the
image as before: OWLv2's MAD was off by up to 4.3 px)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import vitmad
from vitmad.profiling.images import Preprocessing, find_images
from vitmad.profiling.options import OptionError

transformers = pytest.importorskip("transformers")

# (width, height): odd sides, both orientations, a side whose scaled length is exactly x.5 (33 * 48 / 96 = 16.5,
# Python's round: 16), a strip whose short side falls under the processors' min_size (14), and a square.
ODD_SIZES = [(301, 203), (203, 301), (96, 33), (33, 96), (470, 13), (57, 57), (49, 47)]
REFUSAL_HELP = ("pass an image size (--image-size, image_size=)", "vitmad.profile(model, pixel_values)")
# A processor cutting tiles: its pixel values hold padding tiles the model drops, so the model's own forward.
TILES_HELP = ("pass an image size (--image-size, image_size=)", "with vitmad.record(model) as rec: "
              "model(**processor(images=..., return_tensors='pt')), where each tile the model runs is an image")


def _image(width: int, height: int, seed: int = 0):
    from PIL import Image

    rng = np.random.default_rng(seed + 1000 * width + height)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.mark.parametrize("class_name", ["JanusImageProcessorPil", "DeepseekVLImageProcessorPil"])
@pytest.mark.parametrize("size", ODD_SIZES)
def test_janus_like_processors_fit_the_longest_side_and_pad_a_centred_square(class_name, size):
    """The long side scaled to the size (rounded as the processor rounds), the short side at least min_size, then
    padded to a square with int(255 * mean), the odd pixel of the margin right and below: the same pixels."""
    processor = getattr(transformers, class_name)(size={"height": 48, "width": 48})
    ours = Preprocessing.from_hf(processor.to_dict())
    assert ours.resize == ("longest", 48, 14) and not ours.center_crop and ours.size == (48, 48)
    assert ours.pad_fill == tuple(int(255 * m) for m in processor.image_mean)
    image = _image(*size)
    theirs = processor(images=image, return_tensors="pt")["pixel_values"][0]
    torch.testing.assert_close(ours(image), theirs, rtol=0, atol=1e-6)


def test_a_saved_janus_processor_keeps_its_mean_background_and_min_size(tmp_path):
    """From a preprocessor_config.json (another mean, hence another padding colour; another min_size), completed
    with the class's defaults as ``hf:`` loads it."""
    from transformers.image_processing_base import ImageProcessingMixin

    from vitmad.profiling.models import _with_class_defaults

    transformers.JanusImageProcessorPil(size={"height": 40, "width": 40}, image_mean=[0.2, 0.5, 0.9],
                                        min_size=20).save_pretrained(tmp_path)
    saved, _ = ImageProcessingMixin.get_image_processor_dict(str(tmp_path))
    ours = Preprocessing.from_hf(_with_class_defaults(transformers, str(tmp_path), saved, {}))
    processor = transformers.JanusImageProcessorPil.from_pretrained(tmp_path)
    assert ours.pad_fill == (51, 127, 229) and ours.resize == ("longest", 40, 20)
    for size in ODD_SIZES:
        image = _image(*size, seed=1)
        theirs = processor(images=image, return_tensors="pt")["pixel_values"][0]
        torch.testing.assert_close(ours(image), theirs, rtol=0, atol=1e-6)


def test_janus_without_padding_is_refused_not_squashed():
    """do_pad=false: Janus fits the longest side and leaves each image at its own aspect ratio, which a batch of
    one size cannot hold; it was squashed to the size."""
    processor = transformers.JanusImageProcessorPil(size={"height": 48, "width": 48}, do_pad=False)
    with pytest.raises(OptionError, match=r"JanusImageProcessor fits each image's longest side .* \(do_pad=false\)"):
        Preprocessing.from_hf(processor.to_dict())


def test_the_settings_of_existing_runs_keep_their_fingerprint():
    """to_dict of a plain processor's preprocessing has the keys it had: resumed runs keep matching."""
    ours = Preprocessing.from_hf(transformers.ViTImageProcessorPil(size={"height": 28, "width": 36}).to_dict())
    assert ours.to_dict() == {"size": [28, 36], "resize": ["exact", 28, 36], "center_crop": False,
                              "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "interpolation": "bilinear",
                              "crop_rounding": "floor"}


@pytest.mark.parametrize("pad_size", [None, {"height": 28, "width": 36}])
def test_the_generic_pad_to_the_batch_or_to_the_size_itself_is_nothing_to_reproduce(pad_size):
    """A class without padding code of its own pads to pad_size, or to the batch's largest image: at one size for
    every image, no padding at all."""
    processor = transformers.ViTImageProcessorPil(size={"height": 28, "width": 36}, do_pad=True, pad_size=pad_size)
    ours = Preprocessing.from_hf(processor.to_dict())
    for size in ODD_SIZES[:3]:
        image = _image(*size)
        theirs = processor(images=image, return_tensors="pt")["pixel_values"][0]
        torch.testing.assert_close(ours(image), theirs, rtol=0, atol=1.01 / 255 / 0.5)


REFUSED = [
    ("Owlv2ImageProcessorPil", {"size": {"height": 64, "width": 64}},
     "Owlv2ImageProcessor pads each image at the bottom and right to a square, then resizes it with a Gaussian"),
    ("YolosImageProcessorPil", {}, "YolosImageProcessor resizes each image to a shortest and a longest edge"),
    ("DetrImageProcessorPil", {}, "DetrImageProcessor resizes each image to a shortest and a longest edge"),
    ("DeepseekVLHybridImageProcessorPil", {}, "fits each image in high_res_size and pads it to a square"),
    ("ViltImageProcessorPil", {}, "ViltImageProcessor resizes to a shortest edge with a cap on the longest"),
    ("LevitImageProcessorPil", {}, "LevitImageProcessor resizes the shortest edge to 256 / 224"),
    ("ZoeDepthImageProcessorPil", {}, "ZoeDepthImageProcessor resizes at the image's aspect ratio"),
    ("LlavaNextImageProcessorPil", {}, "LlavaNextImageProcessor cuts each image into tiles"),
    ("LlavaImageProcessorPil", {"do_pad": True}, "pads each image to a square with its background colour before"),
    ("DPTImageProcessorPil", {"keep_aspect_ratio": True, "ensure_multiple_of": 14},
     r"resizes at each image's aspect ratio \(keep_aspect_ratio=True\)"),
    ("DPTImageProcessorPil", {"ensure_multiple_of": 14}, "rounds the size .* to a multiple of 14"),
    ("DPTImageProcessorPil", {"do_pad": True, "size_divisor": 32},
     r"pads each image at its centre to a multiple of size_divisor \(do_pad=true\)"),
    ("Gemma3ImageProcessorPil", {"do_pan_and_scan": True}, r"adds crops of each image \(pan and scan\)"),
    ("GotOcr2ImageProcessorPil", {"crop_to_patches": True}, "cuts each image into patches"),
    ("ViTImageProcessorPil", {"size": {"height": 28, "width": 36}, "do_pad": True,
                              "pad_size": {"height": 40, "width": 40}},
     r"pads each image at the bottom and right to \{'height': 40, 'width': 40\}"),
    ("ViTImageProcessorPil", {"size": {"shortest_edge": 32, "longest_edge": 50}},
     "resizes each image at its own aspect ratio"),
]


@pytest.mark.parametrize("class_name, settings, match", REFUSED,
                         ids=[f"{c.removesuffix('ImageProcessorPil')}-{'-'.join(s) or 'defaults'}"
                              for c, s, _ in REFUSED])
def test_processors_whose_geometry_is_not_reproduced_are_refused(class_name, settings, match):
    """Each was profiled squashed (or cropped) to the size before: a silent difference from the model's own
    input. The message names the processor and what it does, and the two ways around it."""
    processor = getattr(transformers, class_name)(**settings)
    with pytest.raises(OptionError, match=match) as refused:
        Preprocessing.from_hf(processor.to_dict())
    assert str(refused.value).startswith(f"model: the {class_name.removesuffix('Pil')} ")
    tiles = any(settings.get(key) for key in ("crop_to_patches", "do_pan_and_scan")) or class_name.startswith(
        "LlavaNext")
    assert all(way in str(refused.value) for way in (TILES_HELP if tiles else REFUSAL_HELP))
    # An image size replaces the processor's geometry: its statistics and filter are then all that is read.
    replaced = Preprocessing.from_hf(processor.to_dict(), own_geometry=False)
    assert replaced.mean == tuple(processor.image_mean) and replaced.std == tuple(processor.image_std)


def test_a_processor_class_transformers_does_not_have_is_refused_where_it_pads():
    """Remote code (or a newer transformers): what its do_pad does is unknown."""
    settings = {"image_processor_type": "SomeRemoteImageProcessor", "size": {"height": 32, "width": 32},
                "do_pad": True}
    with pytest.raises(OptionError, match="pads with code this library does not know"):
        Preprocessing.from_hf(settings)
    assert Preprocessing.from_hf({**settings, "do_pad": False}).resize == ("exact", 32, 32)


@pytest.mark.parametrize("class_name, match", [
    ("MobileViTImageProcessorPil", r"flips the channels to BGR \(do_flip_channel_order=true\)"),
    ("EfficientNetImageProcessorPil", r"normalises twice \(include_top=true\)"),
])
def test_processors_whose_pixel_values_differ_are_refused_even_with_an_image_size(class_name, match):
    """An image size replaces the geometry, not the channel order or a second normalisation."""
    settings = getattr(transformers, class_name)().to_dict()
    for own_geometry in (True, False):
        with pytest.raises(OptionError, match=f"^model: the .*{match}.*vitmad.profile\\(model, pixel_values\\)"):
            Preprocessing.from_hf(settings, own_geometry=own_geometry)


def _janus_folder(folder):
    """A tiny Janus (vision tower 48 px, patches of 8) saved with its processor, as QA's janus_cli.py built it."""
    text = dict(vocab_size=120, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                model_type="llama")
    config = transformers.JanusConfig(
        text_config=text,
        vision_config=dict(hidden_size=64, mlp_ratio=2.0, num_hidden_layers=2, num_attention_heads=2, image_size=48,
                           patch_size=8, projection_dim=64, depth=1),
        vq_config=dict(embed_dim=8, num_embeddings=16, base_channels=32, channel_multiplier=[1, 1], num_res_blocks=1,
                       latent_channels=8, projection_dim=64, image_token_embed_dim=64, num_patches=6),
        image_token_id=110)
    torch.manual_seed(0)
    transformers.JanusModel(config).save_pretrained(folder)
    transformers.JanusImageProcessorPil(size={"height": 48, "width": 48}).save_pretrained(folder)
    return folder


def _odd_image_folder(folder):
    folder.mkdir()
    for i, size in enumerate(ODD_SIZES):
        _image(*size, seed=i).save(folder / f"img_{i}.png")
    return folder


def test_hf_janus_profiles_the_pixels_of_its_own_processor(tmp_path):
    """``hf:`` Janus from image files gives the MAD of its own processor's pixel values fed to the module (QA saw
    up to 4.3 px of difference when the images were squashed)."""
    folder, images = _janus_folder(tmp_path / "janus"), _odd_image_folder(tmp_path / "images")
    result = vitmad.profile(f"hf:{folder}", images, device="cpu", batch_size=3)
    assert result.settings["preprocessing"]["resize"] == ["longest", 48, 14]
    processor = transformers.JanusImageProcessorPil.from_pretrained(folder)
    from PIL import Image

    pixels = processor(images=[Image.open(p).convert("RGB") for p in find_images(images)],
                       return_tensors="pt")["pixel_values"]
    own = vitmad.profile(transformers.JanusModel.from_pretrained(folder), pixels, device="cpu", batch_size=3)
    assert result.count == own.count == len(ODD_SIZES)
    torch.testing.assert_close(result.mad, own.mad, rtol=0, atol=1e-9)


def _owlv2_folder(folder):
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=100,
                max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, image_size=64,
                  patch_size=8)
    torch.manual_seed(0)
    transformers.Owlv2Model(transformers.Owlv2Config(text_config=text, vision_config=vision,
                                                     projection_dim=32)).save_pretrained(folder)
    transformers.Owlv2ImageProcessorPil(size={"height": 64, "width": 64}).save_pretrained(folder)
    return folder


def test_hf_owlv2_is_refused_and_both_ways_around_it_work(tmp_path, capsys):
    """The refusal from the command line (one line, status 2) and from Python; an image size profiles the images
    scaled to cover it and centre-cropped; the module with its own processor's pixels profiles what the model sees,
    and for images already square at the model's size the processor neither pads nor resizes: the same MAD as the
    image size run on them."""
    from PIL import Image

    from vitmad.cli import main

    folder, images = _owlv2_folder(tmp_path / "owlv2"), _odd_image_folder(tmp_path / "images")
    capsys.readouterr()  # transformers' progress bar while saving
    assert main(["profile", "--model", f"hf:{folder}", "--images", str(images), "--device", "cpu",
                 "--no-figures", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vitmad: error: --model: the Owlv2ImageProcessor pads each image at the bottom and right")
    assert len(err.strip().splitlines()) == 1
    with pytest.raises(OptionError, match="^model: the Owlv2ImageProcessor pads"):
        vitmad.profile(f"hf:{folder}", images, device="cpu")

    square = tmp_path / "square"
    square.mkdir()
    for i in range(3):
        _image(64, 64, seed=i).save(square / f"sq_{i}.png")
    sized = vitmad.profile(f"hf:{folder}", square, device="cpu", image_size=64)
    assert sized.settings["preprocessing"]["resize"] == ["cover"]
    processor = transformers.Owlv2ImageProcessorPil.from_pretrained(folder)
    pixels = processor(images=[Image.open(p).convert("RGB") for p in find_images(square)],
                       return_tensors="pt")["pixel_values"]
    own = vitmad.profile(transformers.Owlv2Model.from_pretrained(folder), pixels, device="cpu")
    assert own.count == sized.count == 3
    torch.testing.assert_close(sized.mad, own.mad, rtol=0, atol=1e-6)
    assert vitmad.profile(f"hf:{folder}", images, device="cpu", image_size=64).count == len(ODD_SIZES)


CHECKED = ["Beit", "Flava", "Segformer", "SegGpt", "MobileNetV2", "VideoMAE", "RTDetr", "Gemma3", "GotOcr2", "Ovis2",
           "Llava", "DPT", "PromptDepthAnything", "DINOv3ViT", "Sam2", "Sam3", "Sapiens2"]


@pytest.mark.parametrize("name", CHECKED)
def test_processors_with_code_of_their_own_that_is_the_generic_geometry_are_followed(name):
    """The classes with a resize or pipeline of their own that vitmad follows (images._CHECKED_OWN_CODE, less
    ViViT and SigLIP2, tested with their video and native paths): within one level in 255 of their output, at
    their defaults and a small size of the same form. Those without a PIL backend resize floats with torchvision,
    hence the level."""
    cls = getattr(transformers, f"{name}ImageProcessorPil", None) or getattr(transformers, f"{name}ImageProcessor")
    default = cls().to_dict()
    if "shortest_edge" in default["size"]:
        small = {"size": {"shortest_edge": 40}, "crop_size": {"height": 32, "width": 32}}
    else:
        small = {"size": {"height": 40, "width": 36}}
    processor = cls(**small)
    ours = Preprocessing.from_hf(processor.to_dict())
    std = min(processor.image_std) if processor.do_normalize else 1.0
    for size in ODD_SIZES:
        image = _image(*size)
        theirs = torch.as_tensor(processor(images=image, return_tensors="pt")["pixel_values"])
        theirs = theirs.reshape(-1, *theirs.shape[-3:])[0]  # VideoMAE's: one clip of one frame
        torch.testing.assert_close(ours(image), theirs.float(), rtol=0, atol=1.01 / 255 / std)


@pytest.mark.parametrize("name", ["DPT", "PromptDepthAnything"])
def test_a_size_divisor_that_only_sets_the_pad_is_nothing_to_reproduce_without_do_pad(name):
    """DPT's and Prompt Depth Anything's size_divisor is read only by their centred pad (do_pad), never by the
    resize: with do_pad off (their default) the processor was refused for it all the same; now followed, within one
    level in 255 of its output."""
    cls = getattr(transformers, f"{name}ImageProcessorPil")
    processor = cls(size={"height": 40, "width": 36}, size_divisor=32, do_pad=False)
    ours = Preprocessing.from_hf(processor.to_dict())
    std = min(processor.image_std)
    for size in ODD_SIZES:
        image = _image(*size)
        theirs = torch.as_tensor(processor(images=image, return_tensors="pt")["pixel_values"])[0]
        assert theirs.shape[-2:] == (40, 36)
        torch.testing.assert_close(ours(image), theirs.float(), rtol=0, atol=1.01 / 255 / std)


@pytest.mark.parametrize("named", [{"feature_extractor_type": "CLIPFeatureExtractor"},
                                   {"image_processor_type": "CLIPImageProcessor"}])
def test_a_clip_processor_saved_with_one_number_sizes_is_read_as_clip_reads_it(tmp_path, named):
    """QA 270: the openai CLIP checkpoints' preprocessor_config.json says "size": 224 and "crop_size": 224 and names
    only a feature_extractor_type. vitmad read the size as 224 x 224 (each image squashed, 2.8 normalised units off
    on a non-square image) and, no class named, took no do_convert_rgb (transparency dropped, 3.7 off); CLIP reads
    it as its short side, then crops, and composites transparency onto white. Equal to its PIL processor now."""
    import json

    from PIL import Image

    from vitmad.profiling.images import load_batch
    from vitmad.profiling.models import load_model

    torch.manual_seed(0)
    config = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                           num_attention_heads=2, image_size=32, patch_size=8)
    transformers.CLIPVisionModel(config).save_pretrained(tmp_path)
    settings = {"crop_size": 32, "do_center_crop": True, "do_normalize": True, "do_resize": True,
                "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
                "resample": 3, "size": 32, **named}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(settings))
    rgba = np.dstack([np.asarray(_image(48, 40)), np.where(np.arange(48) < 24, 0, 255)[None].repeat(40, 0)])
    Image.fromarray(rgba.astype(np.uint8), "RGBA").save(tmp_path / "rgba.png")
    _image(57, 31).save(tmp_path / "wide.png")
    paths = [tmp_path / "rgba.png", tmp_path / "wide.png"]
    preprocessing = load_model(f"hf:{tmp_path}").preprocessing
    assert preprocessing.resize == ("shortest", 32) and preprocessing.center_crop and preprocessing.alpha_on_white
    ours, _, _ = load_batch(paths, preprocessing)
    processor = transformers.AutoImageProcessor.from_pretrained(tmp_path, backend="pil")
    theirs = processor([Image.open(path) for path in paths], return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


@pytest.mark.parametrize("side,crop_pct", [(32, 0.875), (40, 0.9), (384, 0.875)])
def test_the_convnext_processor_is_reproduced(side, crop_pct):
    """CvT's checkpoints preprocess with ConvNextImageProcessor (refused before as code of its own; a legacy file
    naming it as a feature extractor was squashed, QA 273): below 384 px the shortest edge to int(size / crop_pct),
    then the centre size x size; from 384 px a squash to size x size. Pixel for pixel on odd sizes."""
    processor = transformers.ConvNextImageProcessorPil(size={"shortest_edge": side}, crop_pct=crop_pct)
    settings = {**processor.to_dict(), "image_processor_type": "ConvNextImageProcessor"}
    ours = Preprocessing.from_hf(settings)
    assert ours.size == (side, side) and ours.center_crop == (side < 384)
    for width, height in ODD_SIZES:
        image = _image(width, height)
        theirs = processor(image, return_tensors="pt")["pixel_values"][0]
        torch.testing.assert_close(ours(image), theirs, rtol=0, atol=1e-5)
