"""Ultralytics 8.4 (``ultralytics``): the attention of YOLO11 / YOLO26's ``C2PSA``, YOLOv10's ``PSA``, YOLO12's area
attention (``A2C2f``) and RT-DETR's ``AIFI``, in whole models built from their packaged yaml files with random
weights, each against the model's own softmax probabilities, placed by the geometry written here from ultralytics'
source. Nothing is downloaded: ``YOLO_OFFLINE`` is set and the settings file goes to a temporary folder.

The layouts, from ``ultralytics/nn/modules/block.py`` and ``transformer.py`` and the yaml files:

- ``Attention`` (in ``PSABlock`` / ``PSA``): ``qkv(x).view(B, heads, d, H * W)``, ``(q^T k).softmax(dim=-1)``: global
  attention over the row-major cells of its ``[B, C, H, W]`` input. ``C2PSA`` is layer 10 of yolo11.yaml and
  yolo26.yaml, ``PSA`` layer 10 of yolov10n.yaml, after five stride-2 convolutions (layers 0, 1, 3, 5, 7): 32 px.
  yolo11-cls.yaml's ``C2PSA`` is layer 9, after the same five.
- ``AAttn`` (in ``ABlock``): ``qkv(x).flatten(2).transpose(1, 2).reshape(B * area, N // area, C)``: the row-major
  sequence cut into ``area`` consecutive runs, each attending within itself, image-major in the batch. yolo12.yaml:
  layer 6 ``A2C2f(512, True, 4)`` after four stride-2 convolutions (16 px, area 4), layer 8 ``A2C2f(1024, True, 1)``
  after five (32 px, one area).
- ``AIFI`` (rtdetr-l.yaml layer 11): ``nn.MultiheadAttention`` (batch first) over ``x.flatten(2).permute(0, 2, 1)``,
  the row-major cells of the last map: ``HGStem`` (two stride-2 convolutions), then three stride-2 ``DWConv``: 32 px.

Each cell sits at ``((r + 0.5) * s, (c + 0.5) * s)`` px; maps are ``ceil(side / s)`` (3x3 convolutions of stride 2,
padded 1). Detection models concatenate upsampled maps with earlier ones, so they take sides divisible by 32; the
classification model takes any (an odd, non-square image here). Also: the CoreML export path of ``Attention``
(SDPA), ultralytics' copy of SAM's ``ImageEncoderViT`` (padded windows and a global block), a graph whose strides
vitmad cannot follow (refused), YOLO-World's image-pooling attention (skipped).
"""

from __future__ import annotations

import math
import os
import tempfile
from unittest import mock

import pytest
import torch
from PIL import Image

os.environ.setdefault("YOLO_OFFLINE", "1")  # ultralytics must never reach the network from these tests
os.environ.setdefault("YOLO_CONFIG_DIR", os.path.join(tempfile.gettempdir(), "vitmad-ultralytics-settings"))
_PIL_OPEN = Image.open
pytest.importorskip("ultralytics")
# Importing ultralytics replaces PIL.Image.open for the whole process (a HEIF plugin fetched on the first file PIL
# cannot identify). Collection imports this file before any test runs: the rest of the suite gets PIL's own opener
# back (tests/profiling/test_profile_inputs.py checks vitmad under such a replacement).
Image.open = _PIL_OPEN

from ultralytics.models.sam.modules.encoders import ImageEncoderViT  # noqa: E402
from ultralytics.nn.modules.block import C2PSA, Attention  # noqa: E402
from ultralytics.nn.tasks import ClassificationModel, DetectionModel, RTDETRDetectionModel, WorldModel  # noqa: E402

import vitmad  # noqa: E402
from conftest import batch_norms_on, check_sam_windows, sharpened, statistics_reference  # noqa: E402
from vitmad.recording.recorder import NoLayerError  # noqa: E402

TOL = {"rtol": 1e-5, "atol": 1e-4}  # pixels: float32 recordings against float64 on the same probabilities
STAT_TOL = {"rtol": 1e-5, "atol": 1e-6}
QK_GAIN = 2.0  # on the batch norm of each attention's qkv convolution: logits x4, attention far from uniform


def _centres(grid: tuple[int, int], stride: float) -> torch.Tensor:
    """``[h * w, 2]`` float64 pixel centres of a row-major grid of ``stride``-pixel cells."""
    rows, cols = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
    return (torch.stack([rows, cols], -1).reshape(-1, 2).double() + 0.5) * stride


def _prepared(model: torch.nn.Module, pixels: torch.Tensor) -> torch.nn.Module:
    """Batch norms set from ``pixels`` (random weights shrink the maps to ~1e-9 by layer 10 otherwise), then each
    attention's q / k scaled up; eval mode."""
    torch.manual_seed(0)
    batch_norms_on(model, pixels)
    with torch.no_grad():
        for module in model.modules():
            if type(module).__name__ in ("Attention", "AAttn"):
                module.qkv.bn.weight.mul_(QK_GAIN)
    return model.eval()


def _softmax_maps(run) -> list[torch.Tensor]:
    """Every ``Tensor.softmax(dim=-1)`` of rank 4 in one run (the attention of ``Attention`` and ``AAttn``; the
    detection head's DFL takes ``softmax(1)``), in call order."""
    maps, original = [], torch.Tensor.softmax

    def spy(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        if kwargs.get("dim") == -1 and out.dim() == 4:
            maps.append(out.double())
        return out

    with torch.no_grad(), mock.patch.object(torch.Tensor, "softmax", spy):
        run()
    return maps


def _multihead_maps(run) -> list[torch.Tensor]:
    """The per-head probabilities of every ``nn.MultiheadAttention`` call in one run (asked for with
    ``need_weights``: the same softmax its fused path computes), in call order."""
    maps, original = [], torch.nn.MultiheadAttention.forward

    def spy(self, *args, **kwargs):
        out = original(self, *args, **{**kwargs, "need_weights": True, "average_attn_weights": False})
        maps.append(out[1].double())
        return out

    with torch.no_grad(), mock.patch.object(torch.nn.MultiheadAttention, "forward", spy):
        run()
    return maps


def _tensors(output) -> list[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, dict):
        output = list(output.values())
    return [t for item in output for t in _tensors(item)] if isinstance(output, (list, tuple)) else []


def _record(model, pixels, **kwargs):
    """``(mean recording, per-token recording)`` of ``model(pixels)``; every output tensor unchanged, bit for bit."""
    with torch.no_grad():
        plain = _tensors(model(pixels))
        with vitmad.record(model, stats=["entropy", "prefix_mass"], **kwargs) as rec:
            recorded = _tensors(model(pixels))
        with vitmad.record(model, stats=["entropy", "prefix_mass"], reduction="none", **kwargs) as rec_tokens:
            model(pixels)
    assert len(plain) == len(recorded) > 0 and all(torch.equal(a, b) for a, b in zip(plain, recorded))
    return rec, rec_tokens


def _check(rec, rec_tokens, layer: int, expected: dict, grid, stride: float, attention: str) -> None:
    geometry = rec.geometry[layer]
    assert (geometry.grid, geometry.stride, geometry.attention) == (grid, (stride, stride), attention)
    torch.testing.assert_close(rec_tokens.per_layer[layer].double(), expected["mad"], **TOL)
    torch.testing.assert_close(rec.per_layer[layer].double(), expected["mad"].mean(-1), **TOL)
    torch.testing.assert_close(rec_tokens.calls[-1].statistics["entropy"][layer].double(), expected["entropy"],
                               **STAT_TOL)
    # No token without a position: no attention sink to measure.
    torch.testing.assert_close(rec.calls[-1].statistics["prefix_mass"][layer].double(), expected["mad"].new_zeros(
        expected["mad"].shape[:-1]), **STAT_TOL)
    assert float(expected["mad"].mean()) > 0.2 * stride  # attention beyond each cell itself: a misplaced cell shows


def _global_reference(probabilities: torch.Tensor, grid, stride: float) -> dict:
    assert probabilities.shape[-1] == grid[0] * grid[1]
    expected = statistics_reference(probabilities, _centres(grid, stride))
    assert float(expected["entropy"].mean()) < 0.75 * math.log(probabilities.shape[-1])  # far from uniform
    return expected


# yolo26.yaml's layer 22, C3k2(1024, True, 0.5, True), holds a PSABlock too: after the head's upsampling (x2 twice)
# and stride-2 convolutions (layers 17 and 20), on the 32 px map again.
@pytest.mark.parametrize("config, layers", [
    ("yolo11n.yaml", ["model.10.m.0.attn"]),
    ("yolo26n.yaml", ["model.10.m.0.attn", "model.22.m.0.1.attn"]),
    ("yolov10n.yaml", ["model.10.attn"]),
])
def test_psa_attention_over_the_stride_32_map(config, layers):
    pixels = torch.rand(2, 3, 160, 224)
    model = _prepared(DetectionModel(config, verbose=False), pixels)
    maps = _softmax_maps(lambda: model(pixels))
    rec, rec_tokens = _record(model, pixels)
    assert rec.layers == layers and len(maps) == len(layers)
    assert rec.skipped == {}
    for layer, probabilities in enumerate(maps):
        _check(rec, rec_tokens, layer, _global_reference(probabilities, (5, 7), 32.0), (5, 7), 32.0, "global")


def test_classification_model_on_an_odd_image():
    # 107 x 75 px: 54 x 38, 27 x 19, 14 x 10, 7 x 5, then 4 x 3 cells of 32 px (ceil), the last past the image edge.
    pixels = torch.rand(2, 3, 107, 75)
    model = _prepared(ClassificationModel("yolo11n-cls.yaml", verbose=False), pixels)
    (probabilities,) = _softmax_maps(lambda: model(pixels))
    rec, rec_tokens = _record(model, pixels)
    assert rec.layers == ["model.9.m.0.attn"]
    _check(rec, rec_tokens, 0, _global_reference(probabilities, (4, 3), 32.0), (4, 3), 32.0, "global")


def _area_reference(probabilities: torch.Tensor, grid, stride: float, area: int) -> dict:
    """``probabilities`` ``[B * area, H, n, n]``: run ``j`` of each image holds the cells ``j * n ... (j + 1) * n - 1``
    of the row-major map; the per-query values in row-major order, ``[B, H, h * w]``."""
    cells = _centres(grid, stride)
    n = cells.shape[0] // area
    assert probabilities.shape[-1] == n
    runs = probabilities.unflatten(0, (-1, area))
    parts = [statistics_reference(runs[:, j], cells[j * n:(j + 1) * n]) for j in range(area)]
    expected = {key: torch.cat([part[key] for part in parts], dim=-1) for key in ("mad", "entropy")}
    assert float(expected["entropy"].mean()) < 0.75 * math.log(n)
    return expected


def test_yolo12_area_attention():
    pixels = torch.rand(2, 3, 160, 224)
    model = _prepared(DetectionModel("yolo12n.yaml", verbose=False), pixels)
    maps = _softmax_maps(lambda: model(pixels))
    rec, rec_tokens = _record(model, pixels)
    assert rec.layers == [f"model.{i}.m.{j}.{k}.attn" for i in (6, 8) for j in (0, 1) for k in (0, 1)]
    assert len(maps) == 8
    for layer, probabilities in enumerate(maps[:4]):
        # Layer 6: a 10 x 14 map of 16 px cells in 4 runs of 35 cells: two rows and a half each.
        expected = _area_reference(probabilities, (10, 14), 16.0, 4)
        _check(rec, rec_tokens, layer, expected, (10, 14), 16.0, "4 areas of 35 row-major cells")
        # Runs taken for whole-width strips of the map transposed (column-major) would give another MAD.
        transposed = _centres((14, 10), 16.0).flip(-1)
        wrong = statistics_reference(probabilities.unflatten(0, (-1, 4))[:, 0], transposed[:35])["mad"]
        assert not torch.allclose(wrong, expected["mad"][..., :35], **TOL)
    for layer, probabilities in enumerate(maps[4:], start=4):
        _check(rec, rec_tokens, layer, _global_reference(probabilities, (5, 7), 32.0), (5, 7), 32.0, "global")


class _Pair(torch.nn.Module):
    """A user's module holding two models (an ensemble, a teacher and a student): the second on the image halved,
    run first with ``reverse``."""

    def __init__(self, first, second, reverse: bool):
        super().__init__()
        self.first, self.second, self.reverse = first, second, reverse

    def forward(self, pixels):
        halved = torch.nn.functional.interpolate(pixels, scale_factor=0.5)
        if self.reverse:
            return self.second(halved), self.first(pixels)
        return self.first(pixels), self.second(halved)


@pytest.mark.parametrize("reverse", [False, True], ids=["in_order", "second_first"])
def test_two_models_in_one_module_each_on_its_own_image(reverse):
    """The call's image (the first model's) was taken for both: the second model's layers on the image halved were
    refused ("height 10 for an image height of 320"), and run first they split each forward into two calls (QA
    258). Each model's layers are placed in its own image's pixels, one call per forward."""
    pixels = torch.rand(2, 3, 320, 448)
    first = _prepared(DetectionModel("yolo11n.yaml", verbose=False), pixels)
    second = _prepared(DetectionModel("yolo12n.yaml", verbose=False), pixels[..., ::2, ::2])
    pair = _Pair(first, second, reverse).eval()
    maps = _softmax_maps(lambda: pair(pixels))
    with torch.no_grad(), vitmad.record(pair, stats=["entropy", "prefix_mass"]) as rec:
        pair(pixels)
        pair(pixels)
    with torch.no_grad(), vitmad.record(pair, stats=["entropy", "prefix_mass"], reduction="none") as rec_tokens:
        pair(pixels)
    assert len(rec.calls) == 2  # one per forward
    second_layers = [f"second.model.{i}.m.{j}.{k}.attn" for i in (6, 8) for j in (0, 1) for k in (0, 1)]
    assert rec.layers == (second_layers + ["first.model.10.m.0.attn"] if reverse else
                          ["first.model.10.m.0.attn"] + second_layers)
    own, theirs = (maps[:8], maps[8:]) if reverse else (maps[1:], maps[:1])
    layers = {name: index for index, name in enumerate(rec.layers)}
    # The first model on 320 x 448: its PSA on the 10 x 14 map of 32 px; the second on 160 x 224: 10 x 14 cells of
    # 16 px in 4 areas, then 5 x 7 cells of 32 px, in pixels of the image it takes.
    _check(rec, rec_tokens, layers["first.model.10.m.0.attn"], _global_reference(theirs[0], (10, 14), 32.0),
           (10, 14), 32.0, "global")
    for name, probabilities in zip(second_layers[:4], own[:4]):
        _check(rec, rec_tokens, layers[name], _area_reference(probabilities, (10, 14), 16.0, 4), (10, 14), 16.0,
               "4 areas of 35 row-major cells")
    for name, probabilities in zip(second_layers[4:], own[4:]):
        _check(rec, rec_tokens, layers[name], _global_reference(probabilities, (5, 7), 32.0), (5, 7), 32.0, "global")


def test_rtdetr_aifi_and_its_decoder_skipped():
    pixels = torch.rand(2, 3, 96, 160)
    model = RTDETRDetectionModel("rtdetr-l.yaml", verbose=False)
    torch.manual_seed(0)
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None
    with torch.no_grad():
        model.model[:12].train()(pixels)  # the backbone and the AIFI; the decoder in training wants targets
        embed = model.model[11].ma.embed_dim
        model.model[11].ma.in_proj_weight[:2 * embed].mul_(4.0)
    model.eval()
    maps = _multihead_maps(lambda: model(pixels))
    assert [tuple(m.shape) for m in maps[:2]] == [(2, 8, 15, 15), (2, 8, 300, 300)]  # AIFI, then the decoder
    rec, rec_tokens = _record(model, pixels)
    assert rec.layers == ["model.11.ma"]
    assert sorted(rec.skipped) == [f"model.28.decoder.layers.{i}.self_attn" for i in range(6)]
    assert all("object queries" in reason for reason in rec.skipped.values())
    _check(rec, rec_tokens, 0, _global_reference(maps[0], (3, 5), 32.0), (3, 5), 32.0, "global")
    # A wildcard over the decoder: its attention is all skipped, and the norms, dropouts and projections it also
    # matches are no layers (90 of them were, and the recording refused only when read; QA 258).
    with pytest.raises(ValueError, match="^vitmad.record: RTDETRDetectionModel has no layer") as refused:
        vitmad.record(model, layers=["model.28.decoder.*"])
    assert "object queries" in str(refused.value)


def test_yolo_wrapper_model():
    from ultralytics import YOLO

    pixels = torch.rand(1, 3, 128, 96)
    yolo = YOLO("yolo11n.yaml")  # built from the packaged yaml: random weights, nothing downloaded
    model = _prepared(yolo.model, pixels)
    (probabilities,) = _softmax_maps(lambda: model(pixels))
    rec, rec_tokens = _record(model, pixels)
    _check(rec, rec_tokens, 0, _global_reference(probabilities, (4, 3), 32.0), (4, 3), 32.0, "global")
    with torch.no_grad(), vitmad.record(yolo) as whole:  # the wrapper itself, its model run as the user runs it
        yolo.model(pixels)
    assert whole.layers == ["model.model.10.m.0.attn"]
    assert torch.equal(whole.mad, rec.mad)


def test_attention_without_its_model_refused():
    block = C2PSA(128, 128).eval()
    with pytest.raises(ValueError, match=r"m\.0\.attn \(Attention\).*recorded without the ultralytics model"):
        with torch.no_grad(), vitmad.record(block):
            block(torch.rand(1, 128, 4, 5))


def test_coreml_export_path_through_sdpa(monkeypatch):
    # Attention.format == "coreml" (set at export) runs F.scaled_dot_product_attention on the same q, k: recorded
    # from q and k (flash-MAD), equal to the eager path's probabilities placed on the same map.
    pixels = torch.rand(2, 3, 160, 224)
    model = _prepared(DetectionModel("yolo11n.yaml", verbose=False), pixels)
    (probabilities,) = _softmax_maps(lambda: model(pixels))
    monkeypatch.setattr(Attention, "format", "coreml")
    assert _softmax_maps(lambda: model(pixels)) == []  # no softmax of its own on this path
    rec, rec_tokens = _record(model, pixels)
    _check(rec, rec_tokens, 0, _global_reference(probabilities, (5, 7), 32.0), (5, 7), 32.0, "global")


def test_unknown_stride_refused():
    # GhostBottleneck(s=2) downsamples in two branches (its main path and its shortcut): vitmad does not follow it.
    cfg = {"nc": 10, "backbone": [[-1, 1, "Conv", [32, 3, 2]], [-1, 1, "GhostBottleneck", [64, 3, 2]],
                                  [-1, 1, "C2PSA", [64]]], "head": [[-1, 1, "Classify", [10]]]}
    model = ClassificationModel(cfg, verbose=False).eval()
    with pytest.raises(ValueError, match=r"model\.2\.m\.0\.attn \(Attention\).*map of layer 2 \(C2PSA\).*unknown: "
                                         r"layer 1 \(GhostBottleneck\)"):
        with torch.no_grad(), vitmad.record(model):
            model(torch.rand(1, 3, 64, 96))


def test_yolo_world_image_pooling_skipped():
    model = WorldModel("yolov8s-world.yaml", verbose=False).eval()
    with pytest.raises(NoLayerError, match=r"model\.16: YOLO-World's image-pooling attention: its queries are "):
        vitmad.record(model)


def test_sam_image_encoder_windows():
    # ultralytics' ImageEncoderViT (models/sam/modules/encoders.py, blocks.py): an 8 px patch convolution, a
    # [B, H, W, C] map; Block pads it at the bottom and right to whole windows (window_partition), windows and their
    # tokens row-major, REAttention over [B * nW * heads, N, N]; global_attn_indexes blocks attend over the map.
    # 64 x 88 px: an 8 x 11 map, windows of 3 over 9 x 12.
    encoder = sharpened(ImageEncoderViT(img_size=64, patch_size=8, embed_dim=32, depth=3, num_heads=2, out_chans=16,
                                        use_rel_pos=True, window_size=3, global_attn_indexes=(1,)))
    pixels = torch.rand(2, 3, 64, 88)
    maps = []
    original = torch.Tensor.softmax

    def spy(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        maps.append(out.double())
        return out

    with torch.no_grad(), mock.patch.object(torch.Tensor, "softmax", spy):
        encoder(pixels)
    stats = ["entropy", "self_mass", "prefix_mass"]
    with torch.no_grad():
        plain = encoder(pixels)
        with vitmad.record(encoder, stats=stats) as rec:
            recorded = encoder(pixels)
        with vitmad.record(encoder, stats=stats, reduction="none") as rec_tokens:
            encoder(pixels)
    assert torch.equal(plain, recorded)
    assert rec.layers == ["blocks.0.attn", "blocks.1.attn", "blocks.2.attn"]
    check_sam_windows(rec, rec_tokens, maps, 8, 11, 3, 8.0, batch=2, heads=2)


@pytest.mark.parametrize(("stem", "size", "grid", "stride"), [
    # C3TR (block.py) holds a TransformerBlock (transformer.py): p = x.flatten(2).permute(2, 0, 1), the row-major cells
    # sequence-first, plus a learned linear position, then TransformerLayer's nn.MultiheadAttention (not batch first).
    # Two stride-2 convolutions before it: 4 px cells; 37 x 22 px: a 10 x 6 map (ceil).
    (None, (37, 22), (10, 6), 4.0),
    # YOLOv5's Focus stem (conv.py): x[..., ::2, ::2] and its three neighbours stacked as channels (even sides only:
    # its slices of an odd side differ), then its Conv of stride 1: the cells of the 2 x 2 pixels it stacks, 19 x 11;
    # then the two stride-2 convolutions (ceil): 5 x 3 cells of 8 px.
    ([-1, 1, "Focus", [16, 3]], (38, 22), (5, 3), 8.0),
    # A max pool of 2 before any convolution (floor: 18 x 11), the first convolution seeing half the image.
    ([-1, 1, "nn.MaxPool2d", [2, 2]], (37, 22), (5, 3), 8.0),
], ids=["c3tr", "focus-stem", "pool-stem"])
def test_c3tr_transformer_block(stem, size, grid, stride):
    """C3TR's transformer over its layer's map; after a stem that shrinks the image before its first convolution
    (YOLOv5's Focus, a first pool) too: the call's image was read at the first convolution, half the input, and Focus
    counted as stride 1, so every cell was placed at half its distance (MAD halved, the per-call check passing) and a
    first pool's refusal named half the image (QA helper-156)."""
    layers = [[-1, 1, "Conv", [32, 3, 2]], [-1, 1, "Conv", [64, 3, 2]], [-1, 1, "C3TR", [64]]]
    cfg = {"nc": 10, "backbone": layers if stem is None else [stem, *layers], "head": [[-1, 1, "Classify", [10]]]}
    index = len(cfg["backbone"]) - 1
    pixels = torch.rand(2, 3, *size)
    model = sharpened(ClassificationModel(cfg, verbose=False))
    batch_norms_on(model, pixels)
    with torch.no_grad():
        layer = model.model[index].m.tr[0]
        layer.q.weight.mul_(3.0)
        layer.k.weight.mul_(3.0)
    maps = _multihead_maps(lambda: model(pixels))
    rec, rec_tokens = _record(model, pixels)
    assert rec.layers == [f"model.{index}.m.tr.0.ma"] and len(maps) == 1
    _check(rec, rec_tokens, 0, _global_reference(maps[0], grid, stride), grid, stride, "global")


def test_a_copy_that_ran_instead_is_named_when_the_recording_is_read():
    """YOLO.predict runs the predictor's own copy of the model (AutoBackend's), which a recording of the model does
    not see; reading the recording said nothing of copies (torch.compile, encode_text; QA helper-156)."""
    import copy

    model = DetectionModel("yolo11n.yaml", verbose=False).eval()
    with torch.no_grad(), vitmad.record(model) as rec:
        copy.deepcopy(model)(torch.rand(1, 3, 64, 64))
    with pytest.raises(RuntimeError, match=r"has not run in this recording; .* a copy of the model runs without "
                                           r"vitmad, as a predictor's own copy does \(ultralytics' YOLO.predict"):
        _ = rec.mad


def test_profile_takes_the_model():
    # vitmad.profile on the module and preprocessed pixels (ultralytics' own letterbox preprocessing is not vitmad's):
    # the mean over the images of what the recording gives per image.
    pixels = torch.rand(4, 3, 160, 224)
    model = _prepared(DetectionModel("yolo11n.yaml", verbose=False), pixels)
    result = vitmad.profile(model, pixels, batch_size=2, device="cpu")
    with torch.no_grad(), vitmad.record(model) as rec:
        model(pixels)
    torch.testing.assert_close(result.mad.double(), rec.mad.double().mean(1), **TOL)
