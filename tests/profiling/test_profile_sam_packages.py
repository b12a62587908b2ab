"""vitmad profile on ``segment_anything:<model type>`` and ``sam2:<config>`` specs (profiling/sam_models.py): the image
encoder of Meta's segment_anything and sam2 packages, built by the package's own builder, loaded from the checkpoint
file the user passes, preprocessed as the package's own predictor preprocesses an image.

No test downloads anything. The packages build their full sizes only (``sam_model_registry``'s vit_b is ~90M
parameters; sam2's configs 1024 px): the runs use tiny models under the real names. segment_anything's registry
(``sam_model_registry``, the dict the loader reads) is given a builder of the same architecture by hand
(``_build_sam``'s classes and settings, few and narrow layers, 64 px); sam2's ``build_sam2`` is wrapped to add hydra
overrides that shrink the packaged config the loader names (its Hiera 16 wide, stages (1, 1, 2, 1), 64 px). Their
weights are saved as the packages save them (segment_anything: the Sam's state dict; sam2: under ``"model"``).

The pixels are compared with what the package's own predictor feeds its encoder (``SamPredictor.set_image``,
``SAM2ImagePredictor.set_image``, caught by a forward pre-hook on ``model.image_encoder``) on odd-size RGB images, at
the tiny size and at the real 1024 px. The reference MAD is float64, from the encoder's own attention probabilities
on those pixels (segment_anything's ``Tensor.softmax`` output; sam2's ``softmax(q k^T / sqrt(d))`` of the q and k its
SDPA is given), placed by the geometry read from the packages' source (below).

Geometry (tests/recording/test_record_segment_anything.py and test_record_sam2_package.py give it in full): a map of
``height x width`` cells of ``stride`` px, zero-padded at the bottom and right to whole windows (window 0: the whole
map), windows row-major, slots row-major in each; every slot is a key at its cell, padding too; sam2's first block of a
stage max-pools the queries of each window ``q x q``, a pooled query at the centre of its cell, a query where its cell
starts inside the map. segment_anything's encoder pads the image itself to a square (``Sam.preprocess``): those patches
are map cells like any other, so their tokens are queries and keys.
"""

from __future__ import annotations

import json
import math
import sys
from functools import partial
from unittest import mock

import numpy as np
import pytest
import torch

import vitmad
from conftest import ODD_IMAGE_SIZES, sharpened, tensor_softmax_outputs, write_sized_images
from vitmad.cli import main
from vitmad.profiling import OptionError
from vitmad.profiling.checkpoint import weights_digest
from vitmad.profiling.sam_models import sam2_preprocessing, sam_preprocessing

pytest.importorskip("segment_anything")
pytest.importorskip("sam2")
Image = pytest.importorskip("PIL.Image")
from sam2 import build_sam  # noqa: E402
from sam2.sam2_image_predictor import SAM2ImagePredictor  # noqa: E402
from segment_anything import SamPredictor, sam_model_registry  # noqa: E402
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer  # noqa: E402

TOL = {"rtol": 1e-5, "atol": 1e-4}  # float32 probabilities, float32 accumulation in vitmad's ops
SAM_PATCH = 8
# The tiny Sam's blocks: (window, heads); block 1 global. 64 px: an 8 x 8 map, windows of 3 padded to 9 x 9.
SAM_BLOCKS = [(3, 2), (0, 2), (3, 2)]
SAM2_CONFIG = "configs/sam2.1/sam2.1_hiera_t.yaml"
SAM2_TINY = ["++model.image_encoder.trunk.embed_dim=16", "++model.image_encoder.trunk.stages=[1,1,2,1]",
             "++model.image_encoder.trunk.global_att_blocks=[3]",
             "++model.image_encoder.neck.backbone_channel_list=[128,64,32,16]"]
_BUILD_SAM2 = build_sam.build_sam2  # the package's own, which the tiny_sam2 fixture wraps
# The tiny Hiera at 64 px, per block: (window, query stride, heads, input map side, its cell in px). The config's
# window_spec (8, 4, 14, 7); a stage's first block (1, 2, 4) pools its queries 2 x 2 and keeps the previous stage's
# window: block 4 pads its 4 x 4 map to 14 x 14 and keeps the 2 x 2 of its 7 x 7 pooled queries that start inside it.
SAM2_BLOCKS = [(8, 1, 1, 16, 4), (8, 2, 2, 16, 4), (4, 2, 4, 8, 8), (0, 1, 4, 4, 16), (14, 2, 8, 4, 16)]


def _tiny_sam(img_size: int = 64) -> Sam:
    """segment_anything's ``_build_sam`` (its classes, norm, qkv bias, relative position bias, mean and std), with few
    and narrow layers at ``img_size``."""
    side = img_size // SAM_PATCH
    encoder = ImageEncoderViT(depth=3, embed_dim=32, img_size=img_size, mlp_ratio=2, num_heads=2,
                              norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), patch_size=SAM_PATCH, qkv_bias=True,
                              use_rel_pos=True, global_attn_indexes=[1], window_size=3, out_chans=16)
    prompt = PromptEncoder(embed_dim=16, image_embedding_size=(side, side), input_image_size=(img_size, img_size),
                           mask_in_chans=4)
    decoder = MaskDecoder(num_multimask_outputs=3, transformer=TwoWayTransformer(depth=2, embedding_dim=16,
                                                                                 mlp_dim=32, num_heads=2),
                          transformer_dim=16, iou_head_depth=2, iou_head_hidden_dim=16)
    return Sam(encoder, prompt, decoder, pixel_mean=[123.675, 116.28, 103.53],
               pixel_std=[58.395, 57.12, 57.375]).eval()


def _tiny_sam2(image_size: int = 64) -> torch.nn.Module:
    """sam2's ``build_sam2`` of its packaged sam2.1_hiera_t config, shrunk by hydra overrides, at ``image_size``."""
    return _BUILD_SAM2(SAM2_CONFIG, None, device="cpu",
                       hydra_overrides_extra=[*SAM2_TINY, f"++model.image_size={image_size}"])


def _far_from_uniform(model: torch.nn.Module) -> torch.nn.Module:
    """Sharpened projections (conftest; sam2's qkv drawn wider still: its first stage is 16 wide, one head), random
    position embeddings and relative-position tables (zeros at init) and convolutions, so that a token at a wrong
    cell, a head in a wrong slot or one image's values given to another would change the values."""
    sharpened(model)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "rel_pos" in name or "pos_embed" in name:
                parameter.normal_()
        for module in model.modules():
            if isinstance(module, torch.nn.Conv2d):
                module.weight.normal_(std=0.25)
            if type(module).__name__ == "MultiScaleAttention":
                module.qkv.weight.normal_(std=0.5)
    return model.eval()


@pytest.fixture
def tiny_sam(monkeypatch):
    """``sam_model_registry["vit_b"]`` builds the tiny Sam."""
    def build(checkpoint=None):
        assert checkpoint is None, "the loader builds without weights and loads the file itself"
        return _tiny_sam()

    monkeypatch.setitem(sam_model_registry, "vit_b", build)


@pytest.fixture
def tiny_sam2(monkeypatch):
    """``build_sam2`` builds any config it is asked for shrunk to the tiny Hiera; the configs asked are listed."""
    asked = []

    def build(config_file, ckpt_path=None, device="cuda", mode="eval", hydra_overrides_extra=(), **kwargs):
        assert ckpt_path is None, "the loader builds without weights and loads the file itself"
        asked.append(config_file)
        overrides = [*hydra_overrides_extra, *SAM2_TINY, "++model.image_size=64"]
        return _BUILD_SAM2(config_file, None, device, mode, overrides, **kwargs)

    monkeypatch.setattr(build_sam, "build_sam2", build)
    return asked


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_sized_images(tmp_path_factory.mktemp("sam_images"))


class _Fed(Exception):
    """Raised by the pre-hook once the encoder's input is caught: the encoder itself need not run."""


def _encoder_input(predictor, model: torch.nn.Module, image: np.ndarray) -> torch.Tensor:
    """``[3, H, W]``: what ``predictor.set_image(image)`` feeds ``model.image_encoder``."""
    fed = []

    def catch(module, args):
        fed.append(args[0])
        raise _Fed

    handle = model.image_encoder.register_forward_pre_hook(catch)
    try:
        with pytest.raises(_Fed):
            predictor.set_image(image)
    finally:
        handle.remove()
    assert fed[0].shape[0] == 1
    return fed[0][0]


def _preprocessing_sizes(side: int) -> list[tuple[int, int]]:
    # (5, 2 * side): the short side scales to 2.5 px, which ResizeLongestSide rounds up (round() would give 2).
    return [*ODD_IMAGE_SIZES, (1000, 517), (17, 9), (5, 2 * side), (side, side), (side + 1, side - 1)]


@pytest.mark.parametrize("size", [64, 1024])
@pytest.mark.parametrize("package", ["segment_anything", "sam2"])
def test_the_preprocessing_is_its_predictors(package, size):
    """What the package's predictor's set_image hands the encoder. SamPredictor: ResizeLongestSide (PIL bilinear on
    the uint8 image), then Sam.preprocess (normalised in 0-255 units, zeros at the bottom and right).
    SAM2ImagePredictor: SAM2Transforms (ToTensor, Resize of the floats to a square, antialiased, Normalize).
    Measured: no value differs at all (torch.equal)."""
    build, predictor_class, preprocessing, seed = {
        "segment_anything": (_tiny_sam, SamPredictor, sam_preprocessing, 2),
        "sam2": (_tiny_sam2, SAM2ImagePredictor, sam2_preprocessing, 3),
    }[package]
    model = build(size)
    predictor, ours = predictor_class(model), preprocessing(model)
    assert ours.size == (size, size)
    rng = np.random.default_rng(seed)
    for h, w in _preprocessing_sizes(size):
        array = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        assert torch.equal(ours(Image.fromarray(array)), _encoder_input(predictor, model, array)), (h, w)


def test_an_image_segment_anything_scales_to_nothing_is_refused_with_the_reason():
    """A short side scaled to 0 px, which PIL cannot make: the image is skipped by a run, with this reason."""
    with pytest.raises(ValueError, match=r"scales this 1x300 px image's long side to 64 px and its short side to 0 "
                                         r"px: its aspect ratio is too extreme"):
        sam_preprocessing(_tiny_sam(64))(Image.new("RGB", (300, 1)))


def _windowed_mad(probabilities: torch.Tensor, batch: int, side: int, window: int, q: int,
                  stride: int) -> torch.Tensor:
    """``[batch, heads]``: one block's MAD per image and head, the mean over its queries, from its probabilities
    (image, window and head in that order on the leading dims: ``[B * nW * heads, Nq, Nk]`` or ``[B * nW, heads, Nq,
    Nk]``) on a ``side x side`` map of ``stride`` px cells (the module docstring's geometry)."""
    w = window or side
    across = math.ceil(side / w)
    pooled = w // q
    attention = probabilities.reshape(batch, across * across, -1, pooled * pooled, w * w)
    per_query, entropy = [], []
    for n in range(across * across):
        wr, wc = divmod(n, across)
        keys = torch.tensor([((wr * w + t // w + 0.5) * stride, (wc * w + t % w + 0.5) * stride)
                             for t in range(w * w)], dtype=torch.float64)
        for slot in range(pooled * pooled):
            r, c = wr * pooled + slot // pooled, wc * pooled + slot % pooled
            if r * q >= side or c * q >= side:  # its cell is all padding: no query
                continue
            centre = torch.tensor([(r + 0.5) * stride * q, (c + 0.5) * stride * q], dtype=torch.float64)
            row = attention[:, n, :, slot]
            per_query.append((row * (keys - centre).norm(dim=-1)).sum(-1))
            entropy.append(-torch.special.xlogy(row, row).sum(-1))
    # Far from uniform: a token at a wrong cell would change the values.
    assert float(torch.stack(entropy).mean()) < 0.75 * math.log(w * w)
    return torch.stack(per_query, -1).mean(-1)


def _sdpa_maps(run) -> list[torch.Tensor]:
    """``softmax(q k^T / sqrt(d))`` in float64 of every SDPA call of ``run()`` (no mask, default scale: Hiera's)."""
    maps, original = [], torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        assert not args and kwargs.get("attn_mask") is None and kwargs.get("scale") is None
        maps.append((q.double() @ k.double().transpose(-2, -1) / math.sqrt(q.shape[-1])).softmax(-1))
        return original(q, k, v, *args, **kwargs)

    with torch.no_grad(), mock.patch.object(torch.nn.functional, "scaled_dot_product_attention", spy):
        run()
    return maps


def _their_pixels(predictor, model, images) -> torch.Tensor:
    return torch.stack([_encoder_input(predictor, model, np.asarray(Image.open(p).convert("RGB")))
                        for p in sorted(images.iterdir())])


def _assert_unchanged_by_recording(encoder: torch.nn.Module, pixels: torch.Tensor) -> None:
    with torch.no_grad():
        plain = encoder(pixels)
        with vitmad.record(encoder):
            recorded = encoder(pixels)
    if isinstance(plain, dict):  # sam2's ImageEncoder
        plain, recorded = plain["backbone_fpn"], recorded["backbone_fpn"]
    else:
        plain, recorded = [plain], [recorded]
    assert all(torch.equal(a, b) for a, b in zip(plain, recorded, strict=True))


def _profiled(spec: str, images, path, tmp_path) -> dict:
    result = vitmad.profile(spec, images, model_checkpoint=path, device="cpu", batch_size=3)
    result.to_json(tmp_path / "mad.json")
    return json.loads((tmp_path / "mad.json").read_text())


def test_segment_anything_is_profiled_from_its_encoders_own_attention_on_its_predictors_pixels(tiny_sam, images,
                                                                                                tmp_path):
    """The odd-size images are padded on the right or below (301 x 227 px: 64 x 48, map columns 6 and 7 padding);
    their padded patches are tokens as the encoder attends them, queries and keys."""
    torch.manual_seed(0)
    model = _far_from_uniform(_tiny_sam())
    path = tmp_path / "sam_tiny.pth"
    torch.save(model.state_dict(), path)
    doc = _profiled("segment_anything:vit_b", images, path, tmp_path)

    pixels = _their_pixels(SamPredictor(model), model, images)
    maps = [m.double() for m in tensor_softmax_outputs(lambda: model.image_encoder(pixels))]
    assert len(maps) == len(SAM_BLOCKS) and [b.window_size for b in model.image_encoder.blocks] == [3, 0, 3]
    assert [layer["name"] for layer in doc["layers"]] == [f"blocks.{i}.attn" for i in range(3)]
    for layer, probabilities, (window, heads) in zip(doc["layers"], maps, SAM_BLOCKS, strict=True):
        expected = _windowed_mad(probabilities, len(pixels), 64 // SAM_PATCH, window, 1, SAM_PATCH).mean(0)
        assert len(expected) == heads
        torch.testing.assert_close(torch.tensor(layer["mean"], dtype=torch.float64), expected, **TOL)
    _assert_unchanged_by_recording(model.image_encoder, pixels)
    assert doc["model"] == "segment_anything:vit_b"
    assert doc["settings"]["profiled"] == "image_encoder (ImageEncoderViT) of Sam, its vision tower"
    assert doc["settings"]["weights"] == weights_digest(model.image_encoder)
    preprocessing = doc["settings"]["preprocessing"]
    assert preprocessing["size"] == [64, 64] and preprocessing["resize"] == ["long_side", 64]
    assert preprocessing["pad_normalised"] is True and preprocessing["rescale"] == 1.0
    assert preprocessing["mean"] == [123.675, 116.28, 103.53] and preprocessing["std"] == [58.395, 57.12, 57.375]


def test_sam2_is_profiled_from_its_trunks_own_attention_on_its_predictors_pixels(tiny_sam2, images, tmp_path):
    torch.manual_seed(0)
    model = _far_from_uniform(_tiny_sam2())
    path = tmp_path / "sam2_tiny.pt"
    torch.save({"model": model.state_dict()}, path)
    doc = _profiled("sam2:sam2.1_hiera_t", images, path, tmp_path)
    assert tiny_sam2 == [SAM2_CONFIG]

    pixels = _their_pixels(SAM2ImagePredictor(model), model, images)
    maps = _sdpa_maps(lambda: model.image_encoder(pixels))
    trunk = model.image_encoder.trunk
    assert [(b.window_size, b.q_stride[0] if b.q_stride else 1, b.attn.num_heads) for b in trunk.blocks] == \
        [block[:3] for block in SAM2_BLOCKS]
    assert [layer["name"] for layer in doc["layers"]] == [f"trunk.blocks.{i}.attn" for i in range(5)]
    for layer, probabilities, (window, q, heads, side, stride) in zip(doc["layers"], maps, SAM2_BLOCKS, strict=True):
        assert probabilities.shape[1] == heads
        expected = _windowed_mad(probabilities, len(pixels), side, window, q, stride).mean(0)
        torch.testing.assert_close(torch.tensor(layer["mean"], dtype=torch.float64), expected, **TOL)
    _assert_unchanged_by_recording(model.image_encoder, pixels)
    assert doc["model"] == "sam2:sam2.1_hiera_t"
    assert doc["settings"]["profiled"] == "image_encoder (ImageEncoder) of SAM2Base, its vision tower"
    assert doc["settings"]["weights"] == weights_digest(model.image_encoder)
    preprocessing = doc["settings"]["preprocessing"]
    assert preprocessing["resize"] == ["exact", 64, 64] and preprocessing["float_resize"] is True


def test_the_command_profiles_both_specs_and_says_what_is_missing(tiny_sam, tiny_sam2, images, tmp_path, capsys):
    torch.manual_seed(0)
    sam_file, sam2_file = tmp_path / "sam.pth", tmp_path / "sam2.pt"
    torch.save(_tiny_sam().state_dict(), sam_file)
    torch.save({"model": _tiny_sam2().state_dict()}, sam2_file)
    for spec, path in (("segment_anything:vit_b", sam_file), ("sam2:sam2.1_hiera_t", sam2_file)):
        out = tmp_path / spec.partition(":")[0]
        code = main(["profile", "--model", spec, "--weights", str(path), "--images", str(images), "--device", "cpu",
                     "--out", str(out), "--no-figures"])
        assert code == 0, capsys.readouterr().err
        doc = json.loads((out / "mad.json").read_text())
        assert doc["model"] == spec and len(doc["images"]) == len(ODD_IMAGE_SIZES)
    capsys.readouterr()
    code = main(["profile", "--model", "segment_anything:vit_b", "--images", str(images), "--device", "cpu",
                 "--out", str(tmp_path / "none"), "--no-figures"])
    assert code == 2
    assert capsys.readouterr().err.strip().startswith(
        "vitmad: error: --weights: segment_anything:vit_b: pass the checkpoint file (--weights FILE, "
        "model_checkpoint=); segment_anything's sam_model_registry builds the model without weights")


@pytest.mark.parametrize(("spec", "options", "message"), [
    ("segment_anything:vit_x", {}, r"model: segment_anything:vit_x: segment_anything's sam_model_registry has no "
                                   r"'vit_x'; its model types: default, vit_h, vit_l, vit_b$"),
    ("segment_anything:vit_b", {"model_checkpoint": None},
     r"model_checkpoint: segment_anything:vit_b: pass the checkpoint file \(--weights FILE, model_checkpoint=\); "
     r"segment_anything's sam_model_registry builds the model without weights \(the vit_b checkpoint"),
    ("segment_anything:vit_b", {"image_size": (64, 64)}, r"image_size: segment_anything:vit_b: the package's "
                                                         r"predictor feeds its image encoder at the one size"),
    ("segment_anything:vit_b", {"image_size": "native"}, r"image_size: segment_anything:vit_b:"),
    ("sam2:sam2.1_hiera_x", {}, r"model: sam2:sam2.1_hiera_x: sam2 has no model config 'sam2.1_hiera_x'; its "
                                r"configs: sam2_hiera_b\+, sam2_hiera_l, sam2_hiera_s, sam2_hiera_t, "
                                r"sam2.1_hiera_b\+, sam2.1_hiera_l, sam2.1_hiera_s, sam2.1_hiera_t$"),
    ("sam2:sam2.1_hiera_t", {"model_checkpoint": None},
     r"model_checkpoint: sam2:sam2.1_hiera_t: pass the checkpoint file .*; sam2's build_sam2 builds the model from "
     r"configs/sam2.1/sam2.1_hiera_t.yaml without weights"),
    ("sam2:sam2.1_hiera_t", {"image_size": (64, 64)}, r"image_size: sam2:sam2.1_hiera_t: the package's predictor"),
])
def test_what_the_spec_cannot_take_is_refused_before_any_image(tiny_sam, tiny_sam2, images, tmp_path, spec, options,
                                                               message):
    path = tmp_path / "weights.pth"
    torch.save({}, path)
    with pytest.raises(OptionError, match=message):
        vitmad.profile(spec, images, device="cpu", **{"model_checkpoint": path, **options})
    assert tiny_sam2 == []  # refused before any build


def test_a_file_that_is_not_the_models_checkpoint_is_refused_naming_it(tiny_sam, tiny_sam2, images, tmp_path):
    sam_file, sam2_file = tmp_path / "sam.pth", tmp_path / "sam2.pt"
    torch.save(_tiny_sam().state_dict(), sam_file)
    torch.save({"model": _tiny_sam2().state_dict()}, sam2_file)
    with pytest.raises(OptionError, match=r"model_checkpoint: .*sam.pth holds no state dict under 'model', where "
                                          r"sam2's checkpoints keep it \(found a dict of keys "
                                          r"'image_encoder.pos_embed', "):
        vitmad.profile("sam2:sam2.1_hiera_t", images, model_checkpoint=sam_file, device="cpu")
    with pytest.raises(OptionError, match=r"model_checkpoint: .*sam2.pt holds no state dict \(tensors by name\), as "
                                          r"segment_anything's checkpoints are \(found a dict of keys 'model'\)"):
        vitmad.profile("segment_anything:vit_b", images, model_checkpoint=sam2_file, device="cpu")
    other = tmp_path / "other.pt"
    torch.save({"model": _tiny_sam().state_dict()}, other)
    with pytest.raises(OptionError, match=r"model_checkpoint: .*other.pt does not fit sam2's sam2.1_hiera_t "
                                          r"\(configs/sam2.1/sam2.1_hiera_t.yaml\): Error\(s\) in loading state_dict "
                                          r"for SAM2Base: Missing key\(s\)"):
        vitmad.profile("sam2:sam2.1_hiera_t", images, model_checkpoint=other, device="cpu")
    wider = _tiny_sam().state_dict()
    wider["image_encoder.pos_embed"] = torch.zeros(1, 16, 16, 32)
    torch.save(wider, other)
    with pytest.raises(OptionError, match=r"model_checkpoint: .*other.pt does not fit segment_anything's vit_b "
                                          r"\(sam_model_registry\['vit_b'\]\): Error\(s\) in loading state_dict for "
                                          r"Sam: size mismatch for image_encoder.pos_embed"):
        vitmad.profile("segment_anything:vit_b", images, model_checkpoint=other, device="cpu")
    for content in (b"", b"not a checkpoint"):
        (tmp_path / "bad.pth").write_bytes(content)
        with pytest.raises(OptionError, match=r"model_checkpoint: .*bad.pth cannot be read as a torch checkpoint "
                                              r"\((EOFError|neither torch.save's zip archive nor a pickle: it starts "
                                              r"with b'not a ch')"):
            vitmad.profile("segment_anything:vit_b", images, model_checkpoint=tmp_path / "bad.pth", device="cpu")
    with pytest.raises(OptionError, match=r"model_checkpoint: no such file"):
        vitmad.profile("sam2:sam2.1_hiera_t", images, model_checkpoint=tmp_path / "none.pt", device="cpu")


@pytest.mark.parametrize(("spec", "package", "message"), [
    ("segment_anything:vit_b", "segment_anything", "Meta's segment_anything, which is not installed: pip install "
                                                   "segment-anything"),
    ("sam2:sam2.1_hiera_t", "sam2", "Meta's sam2, which is not installed: pip install sam2"),
])
def test_without_the_package_the_spec_names_it(monkeypatch, images, tmp_path, spec, package, message):
    monkeypatch.setitem(sys.modules, package, None)
    with pytest.raises(OptionError, match=rf"model: {spec} needs {message}$"):
        vitmad.profile(spec, images, model_checkpoint=tmp_path / "none.pt", device="cpu")
