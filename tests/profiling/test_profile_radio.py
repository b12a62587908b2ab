"""vitmad profile on a RADIO checkpoint (transformers ``RadioModel``): RADIO normalises its pixels itself (its
``input_conditioner`` takes [0, 1] values; its checkpoints' processors say ``do_normalize: false``), so a
checkpoint saved without a processor is fed [0, 1] pixels, not ViTImageProcessor's default normalisation; a saved
processor is followed as it is. Its layers are placed by the RADIO family (tests/recording/test_record_radio.py
checks them against its eager attention); the profile's MAD equals vitmad.record's on the same pixels."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

import vitmad  # noqa: E402
from conftest import write_images  # noqa: E402
from vitmad.profiling.images import Preprocessing, find_images, load_batch  # noqa: E402


@pytest.fixture(scope="module")
def radio_folder(tmp_path_factory):
    torch.manual_seed(0)
    config = transformers.RadioConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, patch_size=8,
                                      image_size=32, intermediate_size=64)
    folder = tmp_path_factory.mktemp("radio")
    transformers.RadioModel(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("radio_images")
    write_images(folder, 3)
    return folder


def test_a_radio_checkpoint_without_a_processor_is_fed_unnormalised_pixels(radio_folder, images):
    result = vitmad.profile(f"hf:{radio_folder}", images, device="cpu")
    preprocessing = result.settings["preprocessing"]
    assert preprocessing["mean"] == [0.0, 0.0, 0.0] and preprocessing["std"] == [1.0, 1.0, 1.0]
    assert result.layers == ["encoder.layer.0.attention", "encoder.layer.1.attention"]
    # The same pixels, [0, 1] at the config's 32 x 32, through vitmad.record on the model itself.
    pixels, _, _ = load_batch(find_images(images),
                              Preprocessing((32, 32), ("exact", 32, 32), False, (0.0,) * 3, (1.0,) * 3, "bilinear"))
    assert 0.0 <= float(pixels.min()) and float(pixels.max()) <= 1.0
    model = transformers.RadioModel.from_pretrained(radio_folder).eval()
    with torch.no_grad(), vitmad.record(model) as rec:
        model(pixel_values=pixels)
    torch.testing.assert_close(result.mad, rec.mad.mean(1).double(), rtol=1e-6, atol=1e-6)


def test_a_saved_processor_is_followed(radio_folder, images, tmp_path):
    folder = tmp_path / "radio"
    folder.mkdir()
    for path in radio_folder.iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "CLIPImageProcessor", "do_normalize": True, "image_mean": [0.25, 0.25, 0.25],
        "image_std": [0.5, 0.5, 0.5], "do_resize": True, "size": {"height": 32, "width": 32},
        "do_center_crop": False}))
    result = vitmad.profile(f"hf:{folder}", images, device="cpu")
    assert result.settings["preprocessing"]["mean"] == [0.25, 0.25, 0.25]
