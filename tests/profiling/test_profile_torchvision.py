"""vitmad profile on ``torchvision:<name>`` specs (profiling/torchvision_models.py): torchvision's ViT, Swin, Swin V2,
MaxViT, MViT and video Swin, loaded as torchvision's builder loads them for their weights, preprocessed as their
weights' own ``transforms()``.

No test downloads anything. The preprocessing is compared with torchvision's transforms for every model the spec
takes (the transforms come with the weights enum, without their file). The runs use tiny models under the real names:
torchvision's registry (``torchvision.models._api.BUILTIN_MODELS``) is given a builder of the same class with few,
narrow layers, wrapped with the real builder's signature (which names its weights enum), so the loader reads the real
weights' meta and transforms and builds through ``get_model``; their weights are a saved state dict
(``model_checkpoint``, ``--weights FILE``). The reference: the same state dict in a module built here, fed the pixels
torchvision's own transforms give, recorded by ``vitmad.record`` (whose exactness the recording tests hold).
"""

from __future__ import annotations

import functools
import json
import sys
import urllib.error

import numpy as np
import pytest
import torch

import vitmad
from conftest import ODD_IMAGE_SIZES, interrupted_profile, state_file_saver, write_sized_images
from vitmad.cli import main
from vitmad.profiling import OptionError
from vitmad.profiling.checkpoint import weights_digest
from vitmad.profiling.images import Preprocessing
from vitmad.profiling.models import load_model
from vitmad.profiling.torchvision_models import MODELS, build, preprocessing_of

torchvision = pytest.importorskip("torchvision")
Image = pytest.importorskip("PIL.Image")
from torchvision.models import _api, maxvit, swin_transformer  # noqa: E402
from torchvision.models.video import mvit  # noqa: E402
from torchvision.models.video import swin_transformer as video_swin  # noqa: E402

MSBlock = mvit.MSBlockConfig
# Few, narrow layers of each real class; the builder's settings from the weights' meta (classes, image size) are
# passed through, so the model is built as the loader asks; what the real builder fixes (MViT's clip size) is fixed
# here too, so that a setting the real one refuses fails alike.
TINY = {
    "vit_b_16": lambda **kw: torchvision.models.VisionTransformer(patch_size=16, num_layers=2, num_heads=2,
                                                                  hidden_dim=32, mlp_dim=64, **kw),
    "swin_t": lambda **kw: swin_transformer.SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[1, 1],
                                                            num_heads=[1, 2], window_size=[7, 7],
                                                            stochastic_depth_prob=0.0, **kw),
    "swin_v2_t": lambda **kw: swin_transformer.SwinTransformer(
        patch_size=[4, 4], embed_dim=16, depths=[1, 1], num_heads=[1, 2], window_size=[8, 8],
        stochastic_depth_prob=0.0, block=swin_transformer.SwinTransformerBlockV2,
        downsample_layer=swin_transformer.PatchMergingV2, **kw),
    "maxvit_t": lambda **kw: maxvit.MaxVit(stem_channels=8, partition_size=7, block_channels=[16, 32],
                                           block_layers=[1, 1], head_dim=8, stochastic_depth_prob=0.0, **kw),
    # mvit_v1_b's style (absolute position embeddings) and mvit_v2_s's (relative position bias, residual pooling).
    "mvit_v1_b": lambda **kw: mvit.MViT(block_setting=[MSBlock(1, 8, 8, [3, 3, 3], [3, 3, 3], [1, 1, 1], [1, 8, 8]),
                                                       MSBlock(2, 8, 16, [3, 3, 3], [3, 3, 3], [1, 2, 2], [1, 4, 4])],
                                        residual_pool=False, residual_with_cls_embed=False, rel_pos_embed=False,
                                        proj_after_attn=False,
                                        spatial_size=(224, 224), temporal_size=16, **kw),
    "mvit_v2_s": lambda **kw: mvit.MViT(block_setting=[MSBlock(1, 8, 8, [3, 3, 3], [3, 3, 3], [1, 1, 1], [1, 8, 8]),
                                                       MSBlock(2, 8, 16, [3, 3, 3], [3, 3, 3], [1, 2, 2], [1, 4, 4])],
                                        residual_pool=True, residual_with_cls_embed=False, rel_pos_embed=True,
                                        proj_after_attn=True,
                                        spatial_size=(224, 224), temporal_size=16, **kw),
    "swin3d_t": lambda **kw: video_swin.SwinTransformer3d(patch_size=[2, 4, 4], embed_dim=16, depths=[1, 1],
                                                          num_heads=[1, 2], window_size=[8, 7, 7],
                                                          stochastic_depth_prob=0.0, **kw),
}
VIDEO = ("mvit_v1_b", "mvit_v2_s", "swin3d_t")
IMAGE_SIZES = ODD_IMAGE_SIZES


@pytest.fixture
def tiny(monkeypatch):
    """Every name of :data:`TINY` builds its tiny model through ``get_model``."""
    for name, make in TINY.items():
        real = _api.BUILTIN_MODELS[name]

        def build(*, weights=None, progress=True, _make=make, **settings):
            assert weights is None, "the loader builds without weights and loads the state dict itself"
            return _make(**settings)

        monkeypatch.setitem(_api.BUILTIN_MODELS, name, functools.wraps(real)(build))


def _weights(name: str):
    return torchvision.models.get_model_weights(name).DEFAULT


def _preprocessing(name: str):
    return preprocessing_of(f"torchvision:{name}", _weights(name))


def _built(name: str, state: dict | None = None, **override) -> torch.nn.Module:
    """The tiny ``name`` as the loader builds it for the default weights (their meta's settings), far from uniform
    attention (every matrix and table drawn with std 0.5) unless ``state`` is given."""
    meta = _weights(name).meta
    settings = {"num_classes": len(meta["categories"])}
    kind = MODELS[name]
    if kind == "VisionTransformer":
        settings["image_size"] = meta["min_size"][0]
    elif kind == "MaxVit":
        settings["input_size"] = meta["min_size"]
    model = torchvision.models.get_model(name, weights=None, **{**settings, **override})
    if state is not None:
        model.load_state_dict(state)
        return model.eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() >= 2:
                parameter.normal_(std=0.5)
    return model.eval()


@pytest.fixture
def weights_file(tiny, tmp_path):
    """``weights_file(name)``: a saved state dict of the tiny ``name`` and that state dict."""
    return state_file_saver(_built, tmp_path)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_sized_images(tmp_path_factory.mktemp("tv_images"))


@pytest.fixture(scope="module")
def frames(tmp_path_factory):
    """A folder of 20 PNG frames of 61 x 83 px (one video)."""
    folder = tmp_path_factory.mktemp("tv_video") / "clip"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for i in range(20):
        Image.fromarray(rng.integers(0, 256, (61, 83, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")
    return folder


@pytest.mark.parametrize("name", MODELS)
def test_the_preprocessing_is_the_weights_own_transforms(name):
    """On odd-size images: ImageClassification on a PIL image (PIL's resize, as torchvision runs it on one),
    VideoClassification on the frames as a uint8 video tensor (its float resize without antialiasing). Measured:
    no value differs (0 levels in 255)."""
    weights = _weights(name)
    transform = weights.transforms()
    preprocessing = _preprocessing(name)
    rng = np.random.default_rng(2)
    for h, w in [*IMAGE_SIZES, (1000, 517), (256, 256)]:
        array = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        ours = preprocessing(Image.fromarray(array))
        if name in ("mvit_v1_b", "mvit_v2_s", "swin3d_t", "swin3d_s", "swin3d_b"):
            theirs = transform(torch.from_numpy(array).permute(2, 0, 1)[None, None])[0, :, 0]
        else:
            theirs = transform(Image.fromarray(array))
        assert ours.shape == theirs.shape
        levels = (ours - theirs).abs() * torch.tensor(transform.std)[:, None, None] * 255
        assert levels.max() <= 1.0 + 1e-4, (name, h, w)


def _recorded_mad(model: torch.nn.Module, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """MAD (and temporal MAD of a video model) per layer and head, mean over the batch, float64."""
    with torch.no_grad():
        plain = model(pixels)
        with vitmad.record(model) as rec:
            output = model(pixels)
    assert torch.equal(plain, output)
    temporal = rec.temporal_mad.double().mean(1) if pixels.dim() == 5 else None
    return rec.mad.double().mean(1), temporal


@pytest.mark.parametrize("name", ["vit_b_16", "swin_t", "swin_v2_t", "maxvit_t"])
def test_an_image_model_is_profiled_as_recorded_on_the_pixels_of_its_weights_transforms(name, weights_file, images,
                                                                                        tmp_path):
    path, state = weights_file(name)
    spec = f"torchvision:{name}"
    result = vitmad.profile(spec, images, model_checkpoint=path, device="cpu", batch_size=3)
    result.to_json(tmp_path / "mad.json")
    doc = json.loads((tmp_path / "mad.json").read_text())
    model = _built(name, state)
    transform = _weights(name).transforms()
    pixels = torch.stack([transform(Image.open(p).convert("RGB")) for p in sorted(images.iterdir())])
    expected, _ = _recorded_mad(model, pixels)
    torch.testing.assert_close(result.mad, expected, rtol=1e-6, atol=1e-6, equal_nan=True)
    assert doc["model"] == spec
    assert doc["settings"]["weights"] == weights_digest(model)
    assert doc["settings"]["preprocessing"]["size"] == list(transform.crop_size) * 2


@pytest.mark.parametrize("name", VIDEO)
def test_a_video_model_is_profiled_as_recorded_on_the_clip_its_weights_transforms_give(name, weights_file, frames):
    """MViT takes the 16 frames it is built for, the video Swin 32 (its weights' evaluation clip): sampled from the
    20 frames by the video path's rule, round(i * 19 / (frames - 1)), resized as VideoClassification resizes a uint8
    video tensor."""
    path, state = weights_file(name)
    result = vitmad.profile(f"torchvision:{name}", [frames], model_checkpoint=path, device="cpu")
    count = 16 if name.startswith("mvit") else 32
    files = sorted(frames.iterdir())
    picked = [np.asarray(Image.open(files[round(i * 19 / (count - 1))]).convert("RGB")) for i in range(count)]
    clip = torch.from_numpy(np.stack(picked)).permute(0, 3, 1, 2)[None]  # [1, T, 3, H, W] uint8
    pixels = _weights(name).transforms()(clip)  # [1, 3, T, 224, 224]
    expected, temporal = _recorded_mad(_built(name, state), pixels)
    torch.testing.assert_close(result.mad, expected, rtol=1e-6, atol=1e-6, equal_nan=True)
    torch.testing.assert_close(result.temporal_mad, temporal, rtol=1e-6, atol=1e-6, equal_nan=True)


def test_a_video_module_passed_in_is_called_on_its_clips(tiny):
    """A torchvision video model built in Python takes the profiler's [B, frames, 3, H, W] tensors (turned to its
    [B, 3, frames, H, W]); the video Swin, 32 frames of any size."""
    model = _built("swin3d_t")
    clips = torch.randn(2, 32, 3, 40, 56, generator=torch.Generator().manual_seed(3))
    result = vitmad.profile(model, clips, device="cpu")
    expected, temporal = _recorded_mad(model, clips.permute(0, 2, 1, 3, 4))
    torch.testing.assert_close(result.mad, expected, rtol=1e-6, atol=1e-6, equal_nan=True)
    torch.testing.assert_close(result.temporal_mad, temporal, rtol=1e-6, atol=1e-6, equal_nan=True)


def test_maxvit_is_built_for_another_size_of_whole_partitions(weights_file, images):
    """Its relative position tables depend on its partition only: the weights load at 448 px, the model built for
    it (its grid attention partitions by the map it was built for)."""
    path, state = weights_file("maxvit_t")
    result = vitmad.profile("torchvision:maxvit_t", images, model_checkpoint=path, device="cpu", image_size=448,
                            max_images=2)
    model = _built("maxvit_t", state, input_size=(448, 448))
    preprocessing = _preprocessing("maxvit_t").with_size((448, 448))
    pixels = torch.stack([preprocessing(Image.open(p).convert("RGB")) for p in sorted(images.iterdir())[:2]])
    expected, _ = _recorded_mad(model, pixels)
    torch.testing.assert_close(result.mad, expected, rtol=1e-6, atol=1e-6, equal_nan=True)


def test_the_video_swin_takes_another_size(weights_file, frames):
    """Scaled to cover it and centre-cropped, resized as its weights' transforms resize (no antialiasing)."""
    path, state = weights_file("swin3d_t")
    result = vitmad.profile("torchvision:swin3d_t", [frames], model_checkpoint=path, device="cpu",
                            image_size=(40, 56))
    files = sorted(frames.iterdir())
    preprocessing = _preprocessing("swin3d_t").with_size((40, 56))
    assert not preprocessing.antialias
    clip = torch.stack([preprocessing(Image.open(files[round(i * 19 / 31)]).convert("RGB")) for i in range(32)])
    expected, temporal = _recorded_mad(_built("swin3d_t", state), clip.permute(1, 0, 2, 3)[None])
    torch.testing.assert_close(result.mad, expected, rtol=1e-6, atol=1e-6, equal_nan=True)
    torch.testing.assert_close(result.temporal_mad, temporal, rtol=1e-6, atol=1e-6, equal_nan=True)


@pytest.mark.parametrize("name", ["vit_b_32", "vit_b_16.IMAGENET1K_SWAG_E2E_V1", "swin_t", "swin_v2_t", "maxvit_t",
                                  "mvit_v1_b", "mvit_v2_s", "swin3d_t"])
def test_the_real_builders_take_the_settings_the_loader_passes(name):
    """torchvision's own builders (not the tiny ones): the settings read from the weights' meta are ones they take,
    and the model is the one the weights are for, its parameter count theirs (no weights loaded)."""
    model, weights = build(f"torchvision:{name}")
    assert type(model).__name__ == MODELS[name.partition(".")[0]]
    assert sum(p.numel() for p in model.parameters()) == weights.meta["num_params"]


def test_the_default_weights_are_torchvisions_download(tiny, monkeypatch):
    """Without a file the DEFAULT weights are loaded through torchvision (its hub cache, else a download), and an
    unreachable download is one error naming what to do."""
    state = _built("swin_t").state_dict()
    urls = []

    def download(url, *args, **kwargs):
        urls.append(url)
        return state

    monkeypatch.setattr(_api, "load_state_dict_from_url", download)
    loaded = load_model("torchvision:swin_t")
    assert urls == [_weights("swin_t").url]
    assert all(torch.equal(loaded.module.state_dict()[k], v) for k, v in state.items())

    def offline(url, *args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(_api, "load_state_dict_from_url", offline)
    with pytest.raises(OptionError, match=r"model: torchvision:swin_t: cannot download its weights \(https://.*"
                                          r"Temporary failure .* pass local weights \(--weights FILE"):
        load_model("torchvision:swin_t")


@pytest.mark.parametrize("content", [b"", b"not a checkpoint"])
def test_a_weights_file_or_cached_download_that_cannot_be_read_is_refused_naming_it(tiny, tmp_path, monkeypatch,
                                                                                   content):
    """An empty --weights file crashed with an IndexError (its EOFError has no message), and a bad file in torch's
    hub cache with an EOFError or UnpicklingError (QA helper-130): each is one error naming the file."""
    (tmp_path / "bad.pth").write_bytes(content)
    with pytest.raises(OptionError, match=r"model_checkpoint: .*bad.pth cannot be read as a torch state dict "
                                          r"\((EOFError|neither torch.save's zip archive nor a pickle: it starts with "
                                          r"b'not a ch')"):
        load_model("torchvision:swin_t", model_checkpoint=tmp_path / "bad.pth")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cached = tmp_path / "torch" / "hub" / "checkpoints" / _weights("swin_t").url.rsplit("/", 1)[1]
    cached.parent.mkdir(parents=True)
    cached.write_bytes(content)
    with pytest.raises(OptionError, match=r"model: torchvision:swin_t: cannot read its weights cached at .*"
                                          r"swin_t-.*\.pth \((EOFError|UnpicklingError).*remove that file to "
                                          r"download them again, or pass local weights"):
        load_model("torchvision:swin_t")


def test_a_weights_tag_selects_the_architecture_and_the_transforms_of_those_weights(tiny, tmp_path):
    """vit_b_16's SWAG weights are for 384 px: the model is built for 384, its images cropped to 384."""
    model = _built("vit_b_16", image_size=384)
    torch.save({"model": model.state_dict(), "epoch": 3}, tmp_path / "swag.pth")  # a reference-script checkpoint
    loaded = load_model("torchvision:vit_b_16.IMAGENET1K_SWAG_E2E_V1", model_checkpoint=tmp_path / "swag.pth")
    assert loaded.module.image_size == 384 and loaded.preprocessing.size == (384, 384)
    assert loaded.preprocessing.interpolation == "bicubic"


@pytest.mark.parametrize(("spec", "options", "message"), [
    ("torchvision:resnet50", {}, r"model: torchvision:resnet50: vitmad profiles torchvision's vit_b_16, .*, "
                                 r"swin3d_b; got 'resnet50'"),
    ("torchvision:swin_t.", {}, r"model: torchvision:swin_t.: expected torchvision:<name> or "
                                r"torchvision:<name>.<WEIGHTS>, got nothing after the dot"),
    ("torchvision:swin_t.IMAGENET22K", {}, r"model: torchvision:swin_t.IMAGENET22K: torchvision has no weights "
                                          r"'IMAGENET22K' for swin_t; its weights: IMAGENET1K_V1"),
    ("torchvision:vit_b_16", {"image_size": 256}, r"image_size: torchvision's VisionTransformer takes 224x224 px only "
                                                  r".* got 256x256"),
    ("torchvision:mvit_v2_s", {"image_size": 160}, r"image_size: torchvision's MViT takes 224x224 px only"),
    ("torchvision:maxvit_t", {"image_size": 230}, r"image_size: torchvision's MaxVit \(maxvit_t\) cannot be built "
                                                  r"for 230x230 px: .* partitions: e.g. 448 or 672 px\)"),
    ("torchvision:swin_t", {"image_size": 98}, r"image_size: expected whole 4x4 patches of the model"),
    ("torchvision:swin_t", {"image_size": "native"}, r"image_size: torchvision:swin_t: torchvision's models take "
                                                     r"one input size"),
])
def test_what_the_spec_cannot_take_is_refused_before_any_image(weights_file, images, spec, options, message):
    name = spec.partition(":")[2].partition(".")[0]
    path = weights_file(name)[0] if name in TINY else None
    with pytest.raises(OptionError, match=message):
        vitmad.profile(spec, images, model_checkpoint=path, device="cpu", **options)


def test_a_file_that_is_not_the_models_weights_is_refused_naming_it(weights_file, tmp_path, images):
    path, _ = weights_file("swin_v2_t")
    with pytest.raises(OptionError, match=r"model_checkpoint: .*swin_v2_t.pt does not fit torchvision's swin_t "
                                          r"built for Swin_T_Weights.IMAGENET1K_V1: Error\(s\) in loading"):
        vitmad.profile("torchvision:swin_t", images, model_checkpoint=path, device="cpu")
    (tmp_path / "notes.pt").write_text("not a tensor file")
    with pytest.raises(OptionError, match=r"model_checkpoint: .*notes.pt cannot be read as a torch state dict"):
        vitmad.profile("torchvision:swin_t", images, model_checkpoint=tmp_path / "notes.pt", device="cpu")
    with pytest.raises(OptionError, match=r"model_checkpoint: no such file"):
        vitmad.profile("torchvision:swin_t", images, model_checkpoint=tmp_path / "none.pt", device="cpu")


def test_without_torchvision_the_spec_names_the_package(monkeypatch, images):
    monkeypatch.setitem(sys.modules, "torchvision", None)
    with pytest.raises(OptionError, match=r"model: torchvision:swin_t needs the package torchvision, which is not "
                                          r"installed: pip install torchvision"):
        vitmad.profile("torchvision:swin_t", images, device="cpu")


def test_a_resumed_run_ends_as_the_whole_and_other_weights_are_refused(weights_file, images, tmp_path, monkeypatch):
    path, _ = weights_file("vit_b_16")
    options = dict(model_checkpoint=path, device="cpu", batch_size=1, stats=["prefix_maps"])
    whole = vitmad.profile("torchvision:vit_b_16", images, **options)
    checkpoint = tmp_path / "checkpoint.pt"
    interrupted_profile(monkeypatch, lambda: vitmad.profile("torchvision:vit_b_16", images, checkpoint=checkpoint,
                                                            **options), at_batch=3)
    other = tmp_path / "other.pt"
    torch.save({k: v + 1 if v.is_floating_point() else v for k, v in torch.load(path).items()}, other)
    with pytest.raises(OptionError, match=r"changed since: model weights"):
        vitmad.profile("torchvision:vit_b_16", images, checkpoint=checkpoint, resume=True,
                       **{**options, "model_checkpoint": other})
    resumed = vitmad.profile("torchvision:vit_b_16", images, checkpoint=checkpoint, resume=True, **options)
    assert resumed.images == whole.images
    assert torch.equal(resumed.running("mad").total, whole.running("mad").total)


def test_the_command_profiles_a_torchvision_spec_with_local_weights(weights_file, images, tmp_path, capsys):
    path, state = weights_file("swin_t")
    out = tmp_path / "out"
    code = main(["profile", "--model", "torchvision:swin_t", "--weights", str(path), "--images", str(images),
                 "--device", "cpu", "--out", str(out), "--no-figures"])
    assert code == 0, capsys.readouterr().err
    doc = json.loads((out / "mad.json").read_text())
    assert doc["model"] == "torchvision:swin_t"
    assert doc["settings"]["weights"] == weights_digest(_built("swin_t", state))
    assert len(doc["images"]) == len(IMAGE_SIZES)


def test_the_float_resize_of_video_presets_takes_no_padding():
    """antialias=False resizes as torchvision's video presets do, a path without the padding step: a pad_fill
    with it would be ignored, so it is refused (QA helper-130: latent, no preset sets both)."""
    with pytest.raises(ValueError, match=r"antialias=False resizes as torchvision's video presets do, which pad "
                                         r"nothing; got pad_fill=\(0, 0, 0\)"):
        Preprocessing((8, 8), ("shortest", 8), True, (0.5,) * 3, (0.5,) * 3, pad_fill=(0, 0, 0), antialias=False)
