"""vitmad profile on ``open_clip:<model>[.<pretrained tag>]`` specs (profiling/open_clip_models.py): OpenCLIP's models
built by its own ``create_model``, profiled through ``model.visual``, preprocessed as its own ``preprocess``.

No test downloads anything. The preprocessing is compared with OpenCLIP's ``image_transform_v2`` for every kind of
preprocessing its pretrained tags use (their configs only, no weights) and every resize mode. The runs use tiny
model configs registered for the test in OpenCLIP's registry (``open_clip.factory._MODEL_CONFIGS``, which its
``add_model_config`` fills from files), with a tag of the test's own (``open_clip.pretrained._PRETRAINED``); their
weights are a saved state dict (``model_checkpoint``, ``--weights FILE``), or OpenCLIP's download function replaced.
The reference: the same state dict in a model built here by OpenCLIP, fed the pixels OpenCLIP's own preprocess
gives, recorded by ``vitmad.record`` on its ``visual`` (whose exactness tests/recording/test_record_open_clip.py
holds).
"""

from __future__ import annotations

import json
import logging
import sys

import numpy as np
import pytest
import torch

open_clip = pytest.importorskip("open_clip")
Image = pytest.importorskip("PIL.Image")

from open_clip.transform import PreprocessCfg, image_transform_v2, merge_preprocess_dict  # noqa: E402

import vitmad  # noqa: E402
from conftest import ODD_IMAGE_SIZES, interrupted_profile, state_file_saver, write_sized_images  # noqa: E402
from vitmad.cli import main  # noqa: E402
from vitmad.profiling import OptionError  # noqa: E402
from vitmad.profiling.checkpoint import weights_digest  # noqa: E402
from vitmad.profiling.models import load_model  # noqa: E402
from vitmad.profiling.open_clip_models import preprocessing_of  # noqa: E402

TEXT = dict(context_length=20, vocab_size=64, width=32, heads=2, layers=2)
CONFIGS = {
    "vitmad-tiny-ViT": {"embed_dim": 16, "text_cfg": TEXT,
                        "vision_cfg": dict(layers=2, width=32, head_width=16, patch_size=8, image_size=32)},
    # A fixed 2-D sin-cos position embedding, which OpenCLIP builds for square grids only.
    "vitmad-tiny-sincos": {"embed_dim": 16, "text_cfg": TEXT,
                           "vision_cfg": dict(layers=1, width=32, head_width=16, patch_size=8, image_size=32,
                                              pos_embed_type="sin_cos_2d")},
    # Built for a non-square size: OpenCLIP resizes position embeddings only from square grids.
    "vitmad-tiny-wide": {"embed_dim": 16, "text_cfg": TEXT,
                         "vision_cfg": dict(layers=1, width=32, head_width=16, patch_size=8, image_size=[32, 48])},
    # The tiny ViT with a narrower text tower: the tiny ViT's weights fail its loading's position embedding resize.
    "vitmad-tiny-narrow-text": {"embed_dim": 16, "text_cfg": dict(TEXT, width=16),
                                "vision_cfg": dict(layers=2, width=32, head_width=16, patch_size=8, image_size=32)},
    # SigLIP's configs: a timm trunk pooled by timm's attention pooling, no projection after it.
    "vitmad-tiny-SigLIP": {"embed_dim": 16, "text_cfg": TEXT, "custom_text": True,
                           "vision_cfg": dict(image_size=224, timm_model_name="vit_tiny_patch16_224", timm_pool="map",
                                              timm_proj="none")},
}
# A tag of the test's: squashed to the size, bilinear, SigLIP's statistics, trained with QuickGELU.
TAG = {"hf_hub": "vitmad-test/none/", "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "interpolation": "bilinear",
       "resize_mode": "squash", "quick_gelu": True}
IMAGE_SIZES = ODD_IMAGE_SIZES


@pytest.fixture(autouse=True)
def _quiet_open_clip():
    """OpenCLIP logs at INFO and WARNING while it builds (random weights); the test logs stay readable."""
    logging.getLogger().setLevel(logging.ERROR)
    yield


@pytest.fixture
def tiny(monkeypatch):
    """The tiny configs in OpenCLIP's registry, and the test's tag for the tiny ViT."""
    for name, config in CONFIGS.items():
        monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, name, config)
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, "vitmad-tiny-ViT", {"squashed": TAG})


def _built(name: str, state: dict | None = None, **options) -> torch.nn.Module:
    """The tiny ``name`` as OpenCLIP builds it, far from uniform attention (every matrix drawn with std 0.25, the
    packed q / k / v projections 0.5) unless ``state`` is given."""
    model = open_clip.create_model(name, **options)
    if state is not None:
        model.load_state_dict(state)
        return model.eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter_name, parameter in model.named_parameters():
            if parameter.dim() >= 2:
                parameter.normal_(std=0.5 if parameter_name.endswith("in_proj_weight") else 0.25)
    return model.eval()


@pytest.fixture
def weights_file(tiny, tmp_path):
    """``weights_file(name)``: a saved state dict of the tiny ``name`` and that state dict."""
    return state_file_saver(_built, tmp_path)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_sized_images(tmp_path_factory.mktemp("oc_images"))


def _assert_same_pixels(cfg: dict) -> None:
    """vitmad's preprocessing of ``cfg`` against OpenCLIP's eval transform of it, on odd-size images. Measured: no
    value differs at all (0 levels in 255; the same float32 values)."""
    theirs = image_transform_v2(PreprocessCfg(**cfg), is_train=False)
    ours = preprocessing_of("open_clip:test", cfg)
    rng = np.random.default_rng(2)
    for h, w in [*IMAGE_SIZES, (1000, 517), (256, 256), (17, 9)]:
        image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        assert torch.equal(ours(image), theirs(image)), (cfg, h, w)


def _tag_kinds() -> dict[str, tuple[str, str]]:
    """One (model, tag) of OpenCLIP's for each kind of preprocessing its tags use (filter, resize mode, statistics)."""
    kinds = {}
    for name, tags in open_clip.pretrained._PRETRAINED.items():
        for tag, cfg in tags.items():
            kind = f"{cfg.get('interpolation')}-{cfg.get('resize_mode')}-{cfg.get('mean')}"
            if name in open_clip.list_models():
                kinds.setdefault(kind, (name, tag))
    return kinds


@pytest.mark.parametrize(("name", "tag"), list(_tag_kinds().values()), ids=lambda value: value)
def test_the_preprocessing_of_every_kind_of_pretrained_tag_is_open_clips(name, tag):
    """The preprocess_cfg create_model gives the model for the tag: the tag's settings over OpenCLIP's defaults, at
    the size of its tower (no model is built)."""
    cfg = merge_preprocess_dict(PreprocessCfg(), open_clip.pretrained.get_pretrained_cfg(name, tag))
    cfg["size"] = open_clip.get_model_config(name)["vision_cfg"]["image_size"]
    _assert_same_pixels(cfg)


@pytest.mark.parametrize("fill", [0, 127])
@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
@pytest.mark.parametrize("mode", ["shortest", "squash", "longest"])
@pytest.mark.parametrize("size", [32, (24, 40), (40, 24)], ids=str)
def test_the_preprocessing_of_every_resize_mode_is_open_clips(size, mode, interpolation, fill):
    """A non-square size resizes with ResizeKeepRatio in "shortest" mode (bicubic, whatever the filter asked),
    "longest" fits the image inside and pads it with fill_color."""
    _assert_same_pixels(dict(size=size, mode="RGB", mean=(0.48, 0.45, 0.40), std=(0.26, 0.26, 0.27),
                             interpolation=interpolation, resize_mode=mode, fill_color=fill))


def _recorded_mad(tower: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """MAD per layer and head, mean over the batch, float64; the tower's output unchanged by recording."""
    with torch.no_grad():
        plain = tower(pixels)
        with vitmad.record(tower) as rec:
            output = tower(pixels)
    assert torch.equal(plain, output)
    return rec.mad.double().mean(1)


@pytest.mark.parametrize(("name", "tower"), [("vitmad-tiny-ViT", "VisionTransformer"),
                                             ("vitmad-tiny-SigLIP", "TimmModel")])
def test_a_model_is_profiled_through_its_image_tower_on_the_pixels_of_open_clips_preprocess(
        name, tower, weights_file, images, tmp_path):
    path, state = weights_file(name)
    spec = f"open_clip:{name}"
    result = vitmad.profile(spec, images, model_checkpoint=path, device="cpu", batch_size=3)
    result.to_json(tmp_path / "mad.json")
    doc = json.loads((tmp_path / "mad.json").read_text())
    model = _built(name, state)
    preprocess = image_transform_v2(PreprocessCfg(**model.visual.preprocess_cfg), is_train=False)
    pixels = torch.stack([preprocess(Image.open(p).convert("RGB")) for p in sorted(images.iterdir())])
    torch.testing.assert_close(result.mad, _recorded_mad(model.visual, pixels), rtol=1e-6, atol=1e-6)
    assert doc["model"] == spec
    assert doc["settings"]["profiled"] == f"visual ({tower}) of {type(model).__name__}, its vision tower"
    assert doc["settings"]["weights"] == weights_digest(model.visual)
    size = CONFIGS[name]["vision_cfg"]["image_size"]
    assert doc["settings"]["preprocessing"]["size"] == [size, size]
    assert doc["settings"]["preprocessing"]["resize"] == ["shortest", size]  # OpenCLIP's default for a file


def test_a_whole_open_clip_model_given_as_a_module_is_profiled_through_its_image_tower(tiny, images):
    """vitmad.profile(<an OpenCLIP CLIP module>, pixels) profiles its visual, as the open_clip: spec does, and says
    so in settings.profiled (it profiled the whole model, its layers named visual.*, with no description: QA
    helper-138); the numbers equal recording visual alone."""
    model = _built("vitmad-tiny-ViT")
    preprocess = image_transform_v2(PreprocessCfg(**model.visual.preprocess_cfg), is_train=False)
    pixels = torch.stack([preprocess(Image.open(p).convert("RGB")) for p in sorted(images.iterdir())])
    result = vitmad.profile(model, pixels, device="cpu")
    assert result.settings["profiled"] == "visual (VisionTransformer) of CLIP, its vision tower"
    assert result.layers[0].startswith("transformer.resblocks.0")
    torch.testing.assert_close(result.mad, _recorded_mad(model.visual, pixels), rtol=1e-6, atol=1e-6)


def test_a_tag_with_local_weights_keeps_the_tags_preprocessing_and_activation(weights_file):
    """A fine-tune of the tag's weights: its squash resize, bilinear filter and statistics, and the QuickGELU it was
    trained with (OpenCLIP itself would build this config with GELU and warn)."""
    path, _ = weights_file("vitmad-tiny-ViT")
    loaded = load_model("open_clip:vitmad-tiny-ViT.squashed", model_checkpoint=path)
    assert loaded.preprocessing == preprocessing_of("open_clip:x", {**TAG, "size": 32})
    assert loaded.preprocessing.resize == ("exact", 32, 32) and loaded.preprocessing.interpolation == "bilinear"
    activation = loaded.module.transformer.resblocks[0].mlp.gelu
    assert isinstance(activation, open_clip.transformer.QuickGELU)
    assert isinstance(load_model("open_clip:vitmad-tiny-ViT", model_checkpoint=path).module.transformer.resblocks[0]
                      .mlp.gelu, torch.nn.GELU)


def test_a_tags_weights_come_through_open_clips_own_download(weights_file, monkeypatch):
    path, state = weights_file("vitmad-tiny-ViT")
    asked = []

    def download(cfg, *args, **kwargs):
        asked.append(cfg)
        return str(path)

    monkeypatch.setattr(open_clip.factory, "download_pretrained", download)
    loaded = load_model("open_clip:vitmad-tiny-ViT.squashed")
    assert asked == [TAG]
    tower = loaded.module.state_dict()
    assert all(torch.equal(tower[k.removeprefix("visual.")], v) for k, v in state.items() if k.startswith("visual."))
    assert loaded.preprocessing.resize == ("exact", 32, 32)

    def offline(cfg, *args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(open_clip.factory, "download_pretrained", offline)
    with pytest.raises(OptionError, match=r"model: open_clip:vitmad-tiny-ViT.squashed: cannot load its weights "
                                          r"through OpenCLIP \(RuntimeError: Failed to download weights for tag "
                                          r"'squashed': We couldn't connect .*\); download them on a connected "
                                          r"machine .* or pass local weights \(--weights FILE"):
        load_model("open_clip:vitmad-tiny-ViT.squashed")


def test_another_image_size_is_built_by_open_clip_with_its_position_embedding_resized(weights_file, images):
    """OpenCLIP's force_image_size: the tower built for 48 x 40 px, the weights' 4 x 4 position embedding resized to
    6 x 5 by its load_checkpoint; the images scaled to cover the size and centre-cropped, as for every model."""
    path, _ = weights_file("vitmad-tiny-ViT")
    result = vitmad.profile("open_clip:vitmad-tiny-ViT", images, model_checkpoint=path, device="cpu",
                            image_size=(48, 40))
    model = open_clip.create_model("vitmad-tiny-ViT", pretrained=str(path), force_image_size=(48, 40)).eval()
    assert model.visual.positional_embedding.shape == (1 + 6 * 5, 32)
    preprocessing = preprocessing_of("open_clip:x", dict(model.visual.preprocess_cfg)).with_size((48, 40))
    pixels = torch.stack([preprocessing(Image.open(p).convert("RGB")) for p in sorted(images.iterdir())])
    torch.testing.assert_close(result.mad, _recorded_mad(model.visual, pixels), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(("spec", "options", "message"), [
    ("open_clip:ViT-B-33", {}, r"model: open_clip:ViT-B-33: OpenCLIP has no model named 'ViT-B-33'; the closest: "
                               r"ViT-B-32, .* \(see open_clip.list_models\(\)\)"),
    ("open_clip:ViT-B-32.laion", {}, r"model: open_clip:ViT-B-32.laion: OpenCLIP has no pretrained weights 'laion' "
                                     r"for ViT-B-32; its tags: openai, laion400m_e31, .*laion2b_s34b_b79k, "),
    ("open_clip:vitmad-tiny-ViT.other", {}, r"OpenCLIP has no pretrained weights 'other' for vitmad-tiny-ViT; its "
                                            r"tags: squashed$"),
    ("open_clip:RN50.openai", {"model_checkpoint": None}, r"model: open_clip:RN50.openai: its image tower is "
                                                          r"OpenCLIP's ModifiedResNet \(a CNN\), whose one attention "
                                                          r"is its attention pool"),
    ("open_clip:ViT-B-32.", {}, r"model: open_clip:ViT-B-32.: expected open_clip:<model> or "
                                r"open_clip:<model>.<pretrained tag>, got nothing after the dot"),
    ("open_clip:vitmad-tiny-SigLIP", {"model_checkpoint": None}, r"model: open_clip:vitmad-tiny-SigLIP: name its "
                                                                 r"pretrained weights, open_clip:vitmad-tiny-SigLIP."
                                                                 r"<tag> \(its tags: none\), or pass local weights"),
    ("open_clip:vitmad-tiny-ViT", {"image_size": "native"}, r"image_size: open_clip:vitmad-tiny-ViT: OpenCLIP's image "
                                                            r"towers take one input size"),
    ("open_clip:vitmad-tiny-sincos", {"image_size": (32, 48)},
     r"image_size: OpenCLIP's vitmad-tiny-sincos cannot be built for 32x48 px \(AssertionError: currently sin cos 2d "
     r"pos embedding only supports square input\)"),
    ("open_clip:vitmad-tiny-ViT", {"image_size": 44}, r"image_size: expected whole 8x8 patches of the model "
                                                      r"\(conv1 takes no partial patch\), got 44x44"),
    # Resizing the weights' position embedding to no patch failed, said as weights that do not fit (QA 330).
    ("open_clip:vitmad-tiny-ViT", {"image_size": 4}, r"image_size: expected at least one 8x8 patch of the model "
                                                     r"\(open_clip:vitmad-tiny-ViT's visual.conv1\), got 4x4"),
    # Its weights failed to load with a reshape error, said as weights that do not fit (QA helper-138).
    ("open_clip:vitmad-tiny-wide", {"image_size": (24, 40)},
     r"image_size: open_clip:vitmad-tiny-wide: OpenCLIP resizes the weights' position embedding to another size only "
     r"from a square grid .* vitmad-tiny-wide is built for 32x48 px; leave --image-size unset"),
])
def test_what_the_spec_cannot_take_is_refused_before_any_image(weights_file, images, spec, options, message):
    path = weights_file("vitmad-tiny-ViT")[0]
    options = {"model_checkpoint": path, **options}
    with pytest.raises(OptionError, match=message):
        vitmad.profile(spec, images, device="cpu", **options)


def test_a_file_that_is_not_the_models_weights_is_refused_naming_it(weights_file, tmp_path, images):
    path, _ = weights_file("vitmad-tiny-SigLIP")
    with pytest.raises(OptionError, match=r"model_checkpoint: .*vitmad-tiny-SigLIP.pt does not fit OpenCLIP's "
                                          r"vitmad-tiny-ViT: Error\(s\) in loading state_dict for CLIP"):
        vitmad.profile("open_clip:vitmad-tiny-ViT", images, model_checkpoint=path, device="cpu")
    for content in (b"", b"not a checkpoint"):
        (tmp_path / "bad.pt").write_bytes(content)
        with pytest.raises(OptionError, match=r"model_checkpoint: .*bad.pt cannot be read as a torch checkpoint "
                                              r"\((EOFError|neither torch.save's zip archive nor a pickle: it starts "
                                              r"with b'not a ch')"):
            vitmad.profile("open_clip:vitmad-tiny-ViT", images, model_checkpoint=tmp_path / "bad.pt", device="cpu")
    with pytest.raises(OptionError, match=r"model_checkpoint: no such file"):
        vitmad.profile("open_clip:vitmad-tiny-ViT", images, model_checkpoint=tmp_path / "none.pt", device="cpu")
    # Weights whose loading OpenCLIP refuses by an assertion: said as weights that do not fit, with a size too (a
    # traceback escaped, or, with image_size, the size was blamed; QA 255).
    path, _ = weights_file("vitmad-tiny-ViT")
    for size in (None, 40):
        with pytest.raises(OptionError, match=r"model_checkpoint: .*vitmad-tiny-ViT.pt does not fit OpenCLIP's "
                                              r"vitmad-tiny-narrow-text: its loading refused it \(AssertionError: "
                                              r"text pos_embed width changed!\)"):
            vitmad.profile("open_clip:vitmad-tiny-narrow-text", images, model_checkpoint=path, image_size=size,
                           device="cpu")


def test_without_open_clip_the_spec_names_the_package(monkeypatch, images):
    monkeypatch.setitem(sys.modules, "open_clip", None)
    with pytest.raises(OptionError, match=r"model: open_clip:ViT-B-32.openai needs OpenCLIP, which is not "
                                          r"installed: pip install open_clip_torch"):
        vitmad.profile("open_clip:ViT-B-32.openai", images, device="cpu")


def test_a_resumed_run_ends_as_the_whole_and_other_weights_are_refused(weights_file, images, tmp_path, monkeypatch):
    path, _ = weights_file("vitmad-tiny-ViT")
    options = dict(model_checkpoint=path, device="cpu", batch_size=1, stats=["prefix_maps"])
    spec = "open_clip:vitmad-tiny-ViT"
    whole = vitmad.profile(spec, images, **options)
    checkpoint = tmp_path / "checkpoint.pt"
    interrupted_profile(monkeypatch, lambda: vitmad.profile(spec, images, checkpoint=checkpoint, **options),
                        at_batch=3)
    other = tmp_path / "other.pt"
    torch.save({k: v + 1 if k.startswith("visual.") and v.is_floating_point() else v
                for k, v in torch.load(path).items()}, other)
    with pytest.raises(OptionError, match=r"changed since: model weights"):
        vitmad.profile(spec, images, checkpoint=checkpoint, resume=True, **{**options, "model_checkpoint": other})
    resumed = vitmad.profile(spec, images, checkpoint=checkpoint, resume=True, **options)
    assert resumed.images == whole.images
    assert torch.equal(resumed.running("mad").total, whole.running("mad").total)


def test_the_command_profiles_an_open_clip_spec_with_local_weights(weights_file, images, tmp_path, capsys):
    path, state = weights_file("vitmad-tiny-ViT")
    out = tmp_path / "out"
    code = main(["profile", "--model", "open_clip:vitmad-tiny-ViT", "--weights", str(path), "--images", str(images),
                 "--device", "cpu", "--out", str(out), "--no-figures"])
    assert code == 0, capsys.readouterr().err
    doc = json.loads((out / "mad.json").read_text())
    assert doc["model"] == "open_clip:vitmad-tiny-ViT"
    assert doc["settings"]["profiled"] == "visual (VisionTransformer) of CLIP, its vision tower"
    assert doc["settings"]["weights"] == weights_digest(_built("vitmad-tiny-ViT", state).visual)
    assert len(doc["images"]) == len(IMAGE_SIZES)
    capsys.readouterr()
    code = main(["profile", "--model", "open_clip:ViT-B-33", "--weights", str(path), "--images", str(images),
                 "--device", "cpu", "--out", str(tmp_path / "other"), "--no-figures"])
    assert code == 2
    assert capsys.readouterr().err.strip().startswith("vitmad: error: --model: open_clip:ViT-B-33: OpenCLIP has no "
                                                      "model named 'ViT-B-33'; the closest: ViT-B-32")
