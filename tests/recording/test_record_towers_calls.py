"""vitmad.record's calls in a user's module holding two towers: one call per forward of the module, whichever tower
runs first, when one tower alone is recorded and when the towers take images of different channel counts.

Two defects QA found: with one tower recorded (named in ``layers=``, or the other no tower vitmad records) and the
other declared first but run after it, the other tower's convolution opened each forward's call after the recorded
layers had run (two forwards gave calls of 2, 2 and 0 layers, and ``rec.mad`` raised on the empty last one); an RGB
tower beside a grayscale one was taken for one tower (only convolutions on three channels took the image), so the
RGB tower's convolution started the calls and a call mixed two forwards where the grayscale tower ran first.

References: each tower's own float64 softmax (timm's unfused path, transformers' eager attention function,
vit_pytorch's ``nn.Softmax``) on the image it takes, its tokens placed by the geometry written in
test_record_call_boundaries: a class token without a position, then the row-major 4 x 6 grid of 8 px patches, each
token at its cell's centre (given as ``positions=``, or, where each tower is placed by its own layout, the same
centres at each tower's own patch size).
"""

from __future__ import annotations

import re

import pytest
import torch
from test_record_call_boundaries import (
    GRID,
    PATCH,
    TOL,
    TOWER_DIM,
    TOWER_HEADS,
    TOWERS,
    _check_tower_mad,
    _class_and_grid,
    _hf_tower,
    _sharper,
    _timm_tower,
    _tower_mad,
    _tower_probabilities,
    _two_towers,
    _TwoTowers,
)
from torch import nn
from torch.nn import functional

import vitmad
from conftest import sharpened


def _images(count: int, scale: int = 1) -> list[torch.Tensor]:
    """``count`` RGB batches of two images, ``scale`` times the towers' 32 x 48 pixels."""
    generator = torch.Generator().manual_seed(2)
    return [torch.randn(2, 3, GRID[0] * PATCH * scale, GRID[1] * PATCH * scale, generator=generator)
            for _ in range(count)]


def _cnn_tower() -> nn.Module:
    """A convolutional tower on the image: no attention for vitmad to record, a convolution on its three channels."""
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 5))


def _outputs_equal(plain: list, recorded: list) -> bool:
    return all(torch.equal(x, y) for p, r in zip(plain, recorded, strict=True) for x, y in zip(p, r, strict=True))


@pytest.mark.parametrize("other", ["timm", "transformers"])
@pytest.mark.parametrize("recorded", ["a", "b"])
@pytest.mark.parametrize("order", ["ab", "ba"])
def test_one_recorded_tower_is_one_call_per_forward_whichever_runs_first(other, recorded, order):
    """Two towers, one named in ``layers=``: each forward is one call holding that tower's layers, equal to its own
    attention. With the other tower declared first and run after it, its convolution began each call after the
    recorded layers ran: calls of 2, 2 and 0 layers for two forwards, ``rec.mad`` raising on the empty one."""
    kinds = ("timm", other) if recorded == "a" else (other, "timm")
    model, names = _two_towers(kinds, order)
    names = [name for name in names if name.startswith(recorded + ".")]
    images = _images(2)
    references = [_tower_probabilities("timm", getattr(model, recorded), pixels) for pixels in images]
    with torch.no_grad():
        plain = [model(pixels) for pixels in images]
        with vitmad.record(model, layers=names, positions=_class_and_grid(), reduction="none") as rec:
            recorded_outputs = [model(pixels) for pixels in images]
    assert _outputs_equal(plain, recorded_outputs)
    assert [call.layers for call in rec.calls] == [names] * len(images)
    for call, reference in zip(rec.calls, references, strict=True):
        for recorded_mad, p in zip(call.mad, reference, strict=True):
            _check_tower_mad(recorded_mad, p)
    assert rec.mad.shape == (2, 2, 2, GRID[0] * GRID[1] + 1)  # the last forward's: [layers, B, H, tokens]


@pytest.mark.parametrize("order", ["ab", "ba"])
def test_a_convolutional_tower_beside_the_recorded_one_starts_no_call(order):
    """A CNN declared before a timm ViT, the ViT recorded by default and placed by its own layout (no positions=):
    one call per forward, each with the ViT's layers; a run of the ViT alone is a call of its own, one of the CNN
    none."""
    torch.manual_seed(0)
    model = _TwoTowers(sharpened(_cnn_tower(), 0), _sharper(sharpened(_timm_tower(), 1)), order).eval()
    names = [f"b.{layer}" for layer in TOWERS["timm"][1]]
    images = _images(2)
    references = [_tower_probabilities("timm", model.b, pixels) for pixels in images]
    with torch.no_grad():
        plain = [model(pixels) for pixels in images]
        with vitmad.record(model, reduction="none") as rec:
            recorded_outputs = [model(pixels) for pixels in images]
            model.run("a", images[0])
            model.run("b", images[1])
    assert _outputs_equal(plain, recorded_outputs)
    assert [call.layers for call in rec.calls] == [names] * 3
    for call, reference in zip(rec.calls, [*references, references[1]], strict=True):
        assert [g.grid for g in call.geometry] == [GRID] * 2
        for recorded_mad, p in zip(call.mad, reference, strict=True):
            # Placed by the tower's own layout, reduction="none" gives the grid queries alone.
            torch.testing.assert_close(recorded_mad.double(), _tower_mad(p), **TOL)


@pytest.mark.parametrize("kinds", [("timm", "timm"), ("timm", "transformers")], ids="+".join)
@pytest.mark.parametrize("gray", ["a", "b"])
@pytest.mark.parametrize("order", ["ab", "ba"])
def test_towers_of_different_channels_are_one_call_per_forward(kinds, gray, order):
    """An RGB tower and a grayscale one (timm's ``in_chans=1``, transformers' ``num_channels=1``) fed the image's
    channel mean: one call per forward holding both towers' layers in the order they ran, each equal to that
    tower's own attention on the image it takes. Only convolutions on three channels took the image: the RGB
    tower's started the calls, and a call mixed two forwards where the grayscale tower ran first, unwarned. Outside
    the forward each tower's run is a call of its own."""
    model, names = _two_towers(kinds, order, gray)
    assert next(m for m in getattr(model, gray).modules() if isinstance(m, nn.Conv2d)).in_channels == 1
    images = _images(2)
    references = [{tower: _tower_probabilities(kind, getattr(model, tower),
                                               pixels.mean(1, keepdim=True) if tower == gray else pixels)
                   for tower, kind in zip("ab", kinds, strict=True)} for pixels in images]
    with torch.no_grad():
        plain = [model(pixels) for pixels in images]
        with vitmad.record(model, layers=names, positions=_class_and_grid(), reduction="none") as rec:
            recorded_outputs = [model(pixels) for pixels in images]
            for tower in reversed(order):
                model.run(tower, images[1])
    assert _outputs_equal(plain, recorded_outputs)
    layers = {tower: [name for name in names if name.startswith(tower + ".")] for tower in "ab"}
    assert [call.layers for call in rec.calls] == (
        [[name for tower in order for name in layers[tower]]] * 2 + [layers[tower] for tower in reversed(order)])
    expected = [[p for tower in order for p in reference[tower]] for reference in references]
    expected += [references[1][tower] for tower in reversed(order)]
    for call, probabilities in zip(rec.calls, expected, strict=True):
        for recorded_mad, p in zip(call.mad, probabilities, strict=True):
            _check_tower_mad(recorded_mad, p)


def test_a_grayscale_tower_is_placed_on_its_own_grid_beside_an_rgb_one():
    """A vit_pytorch ViT (16 px patches) on the RGB 64 x 96 input, then a grayscale timm ViT (8 px) on its channel
    mean at half size, no positions= given: one call per forward, each tower on its own grid in the pixels of the
    image it takes. The grayscale tower's convolution, the only one, started the calls: after the vit_pytorch
    tower had run, whose layers joined the call before."""
    vit_pytorch = pytest.importorskip("vit_pytorch")

    class Resizing(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = _sharper(sharpened(_timm_tower(1), 0))
            self.b = _sharper(sharpened(vit_pytorch.ViT(image_size=(64, 96), patch_size=16, num_classes=5,
                                                        dim=TOWER_DIM, depth=2, heads=TOWER_HEADS,
                                                        mlp_dim=2 * TOWER_DIM, dim_head=8), 1))

        @staticmethod
        def small_gray(pixels: torch.Tensor) -> torch.Tensor:
            return functional.interpolate(pixels.mean(1, keepdim=True), scale_factor=0.5)

        def forward(self, pixels):
            return self.b(pixels), self.a(self.small_gray(pixels))

    torch.manual_seed(0)
    model = Resizing().eval()
    images = _images(2, scale=2)
    references = [_tower_probabilities("vit_pytorch", model.b, pixels)
                  + _tower_probabilities("timm", model.a, model.small_gray(pixels)) for pixels in images]
    names = ["b.transformer.layers.0.0", "b.transformer.layers.1.0", "a.blocks.0.attn", "a.blocks.1.attn"]
    with torch.no_grad():
        plain = [model(pixels) for pixels in images]
        with vitmad.record(model, layers=names, reduction="none") as rec:
            recorded_outputs = [model(pixels) for pixels in images]
    assert _outputs_equal(plain, recorded_outputs)
    assert [call.layers for call in rec.calls] == [names] * 2
    for call, reference in zip(rec.calls, references, strict=True):
        assert [g.stride for g in call.geometry] == [(16.0, 16.0)] * 2 + [(8.0, 8.0)] * 2
        for recorded_mad, p, stride in zip(call.mad, reference, (2, 2, 1, 1), strict=True):
            # _tower_mad places the grid at 8 px cells: the 16 px cells of tower b are twice as far apart.
            torch.testing.assert_close(recorded_mad.double(), stride * _tower_mad(p), **TOL)


class _HeldTowers(nn.Module):
    """Towers ``a`` and ``b`` held by a container (``nn.ModuleList``, ``nn.ModuleDict``, or a plain module whose
    forward the wrapper never runs), a stem convolution or a third, unrecorded tower beside them; the wrapper runs
    the towers one by one."""

    def __init__(self, container: str, beside: str):
        super().__init__()
        torch.manual_seed(0)
        a, b = (_sharper(sharpened(_timm_tower(), seed)) for seed in (0, 1))
        if container == "list":
            self.towers = nn.ModuleList([a, b])
        elif container == "dict":
            self.towers = nn.ModuleDict({"0": a, "1": b})
        else:
            self.towers = nn.Module()
            self.towers.add_module("0", a)
            self.towers.add_module("1", b)
        self.beside = nn.Conv2d(3, 3, 1) if beside == "stem" else sharpened(_timm_tower(), 2)

    def tower(self, index: int) -> nn.Module:
        return self.towers.get_submodule(str(index))

    def forward(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        if isinstance(self.beside, nn.Conv2d):
            pixels = pixels + self.beside(pixels)
            return [self.tower(i)(pixels) for i in range(2)]
        return [self.tower(i)(pixels) for i in range(2)] + [self.beside(pixels)]


@pytest.mark.parametrize("container", ["list", "dict", "module"])
@pytest.mark.parametrize("beside", ["stem", "third_tower"])
def test_towers_held_by_a_container_are_one_call_per_forward(container, beside):
    """Two recorded towers in a container that runs no forward of its own (QA helper-207): beside a stem convolution
    (or an unrecorded third tower), the container was taken for the one tower holding the recorded layers and made
    the start of every call; it never runs, so three forwards were one call of twelve layer runs, unwarned. Each
    forward is one call, each tower equal to its own attention."""
    model = _HeldTowers(container, beside).eval()
    names = [f"towers.{i}.{layer}" for i in range(2) for layer in TOWERS["timm"][1]]
    images = _images(3)
    inputs = [pixels + model.beside(pixels) if beside == "stem" else pixels for pixels in images]
    with torch.no_grad():
        references = [_tower_probabilities("timm", model.tower(0), x) + _tower_probabilities("timm", model.tower(1), x)
                      for x in inputs]
        plain = [model(pixels) for pixels in images]
        with vitmad.record(model, layers=names, positions=_class_and_grid(), reduction="none") as rec:
            recorded_outputs = [model(pixels) for pixels in images]
    assert _outputs_equal(plain, recorded_outputs)
    assert [call.layers for call in rec.calls] == [names] * 3
    for call, reference in zip(rec.calls, references, strict=True):
        for recorded_mad, p in zip(call.mad, reference, strict=True):
            _check_tower_mad(recorded_mad, p)


def test_forwards_without_the_one_recorded_tower_keep_their_empty_calls():
    """One of two towers recorded, run in the second and fourth of four forwards: four calls, the first and third
    empty (rec.calls[i] is forward i, as README says), where the recorded tower's start made two calls (QA
    helper-207)."""

    class Sometimes(_TwoTowers):
        def forward(self, pixels: torch.Tensor, with_b: bool) -> list[torch.Tensor]:
            return [self.run("a", pixels)] + ([self.run("b", pixels)] if with_b else [])

    torch.manual_seed(0)
    model = Sometimes(sharpened(_timm_tower(), 0), _sharper(sharpened(_timm_tower(), 1)), "ab").eval()
    names = [f"b.{layer}" for layer in TOWERS["timm"][1]]
    images = _images(4)
    with torch.no_grad(), vitmad.record(model, layers=names, positions=_class_and_grid(), reduction="none") as rec:
        for i, pixels in enumerate(images):
            model(pixels, with_b=i % 2 == 1)
    assert [call.layers for call in rec.calls] == [[], names, [], names]
    for i in (1, 3):
        reference = _tower_probabilities("timm", model.b, images[i])
        for recorded_mad, p in zip(rec.calls[i].mad, reference, strict=True):
            _check_tower_mad(recorded_mad, p)
    with pytest.raises(ValueError, match="no recorded layer ran in this call"):
        _ = rec.calls[0].mad
    # A last forward without the recorded tower: rec.mad says the forward ran none of the recorded modules, not
    # that they ran without computing attention.
    with torch.no_grad(), vitmad.record(model, layers=names, positions=_class_and_grid()) as rec:
        model(images[0], with_b=True)
        model(images[1], with_b=False)
    with pytest.raises(RuntimeError, match=r"Sometimes's latest forward call ran none of the modules being recorded "
                                           r"\(b\.blocks\.0\.attn, b\.blocks\.1\.attn\): its forward took a path"):
        _ = rec.mad
    assert rec.calls[0].mad.shape == (2, 2, 2)


def test_a_second_timm_tower_is_named_as_a_tower_with_its_own_embedding():
    """Two timm towers, both named in layers=, no positions=: the second's layers are skipped (one recording places
    one patch grid) with a reason naming its own patch embedding and its own recording, as the default's does (QA
    helper-207), not as a language model outside the image tower, whose advice (num_prefix_tokens=) is refused for
    a tower with its own embedding; the second alone is refused with that reason."""
    model, _ = _two_towers(("timm", "timm"), "ab")
    reason = (r"in b, a second tower that embeds the image with its own patch embedding \(b\.patch_embed\.proj\) "
              r"beside a")
    with torch.no_grad(), vitmad.record(model, layers=["a.blocks.*.attn", "b.blocks.*.attn"]) as rec:
        model(_images(1)[0])
    assert rec.layers == ["a.blocks.0.attn", "a.blocks.1.attn"]
    for layer in ("b.blocks.0.attn", "b.blocks.1.attn"):
        assert re.match(reason, rec.skipped[layer])
        assert "vitmad.record(model.get_submodule('b'))" in rec.skipped[layer]
    with pytest.raises(vitmad.recording.recorder.NoLayerError, match=reason):
        vitmad.record(model, layers=["b.blocks.*.attn"])


def test_a_second_tower_embedding_with_a_stem_and_no_projection_is_named():
    """MobileCLIP's ViT embeds with its ConvStem (timm's HybridEmbed without projection), no convolution named a
    patch projection: beside a ViTamin its layers were left out of the recording without a word (QA 318)."""
    timm = pytest.importorskip("timm")

    class Two(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = timm.create_model("vitamin_small_224", pretrained=False, depth=1, dynamic_img_size=True)
            self.b = timm.create_model("vit_base_mci_224", pretrained=False, depth=1, dynamic_img_size=True)

        def forward(self, x):
            return self.a(x), self.b(torch.nn.functional.interpolate(x, size=(48, 64)))

    model = Two().eval()
    with torch.no_grad(), vitmad.record(model) as rec:
        model(torch.randn(1, 3, 64, 96))
    assert rec.layers == ["a.blocks.0.attn"]
    assert rec.skipped["b.blocks.0.attn"].startswith("in b, a second tower that embeds the image beside a")
    with torch.no_grad(), vitmad.record(model.b) as alone:
        model(torch.randn(1, 3, 64, 96))
    assert alone.layers == ["blocks.0.attn"] and alone.geometry[0].grid == (3, 4)


def _recorded_at(model: nn.Module, pixels: torch.Tensor, reference: list[torch.Tensor], scale: float):
    """The recording (``reduction="none"``) of one forward of ``model`` with its one timm tower, checked against the
    tower's own probabilities ``reference`` on what it took: tokens ``scale * PATCH`` pixels of the image apart."""
    with torch.no_grad(), vitmad.record(model, reduction="none") as rec:
        model(pixels)
    assert [g.stride for g in rec.geometry] == [(scale * PATCH, scale * PATCH)] * len(reference)
    for recorded_mad, p in zip(rec.mad, reference, strict=True):
        torch.testing.assert_close(recorded_mad.double(), scale * _tower_mad(p), **TOL)
    return rec


class _StemBeforeViT(nn.Module):
    """A user's learned 2x downsampler on the RGB image (three channels out, ``stem`` declared first), then a timm
    ViT on its map; or, with ``beside``, a convolution as a branch of its own beside the ViT, which takes the image
    halved by interpolation."""

    def __init__(self, stem: nn.Module, vit: nn.Module, beside: bool = False):
        super().__init__()
        self.stem, self.vit, self.beside = stem, vit, beside

    def forward(self, pixels: torch.Tensor):
        if self.beside:
            return self.stem(pixels).mean(), self.vit(functional.interpolate(pixels, scale_factor=0.5))
        return self.vit(self.stem(pixels))


class _Downsampler(nn.Module):
    """A user's stem module with a forward of its own: a convolution, a norm and an activation."""

    def __init__(self):
        super().__init__()
        self.conv, self.norm = nn.Conv2d(3, 3, 2, stride=2), nn.BatchNorm2d(3)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return functional.gelu(self.norm(self.conv(pixels)))


def _downsampler(kind: str) -> nn.Module:
    conv = nn.Conv2d(3, 3, 2, stride=2)
    return {"conv": lambda: conv, "conv-bn-relu": lambda: nn.Sequential(conv, nn.BatchNorm2d(3), nn.ReLU()),
            "own-module": _Downsampler}[kind]()


@pytest.mark.parametrize("stem", ["conv", "conv-bn-relu", "own-module"])
def test_a_stem_of_three_channels_before_the_vit_is_followed_not_taken_for_a_tower(stem):
    """A 64 x 96 image halved by a stride-2 ``nn.Conv2d(3, 3, 2, 2)`` before a ViT of 8 px patches: its tokens are
    16 px of the image apart. The convolution takes the image's channels as the ViT's does, so it was taken for a
    second tower and the ViT placed in pixels of the map it takes (8 px apart), silently, where a stem of 8
    channels gave 16 (QA 345)."""
    torch.manual_seed(0)
    model = _StemBeforeViT(sharpened(_downsampler(stem), 3), _sharper(sharpened(_timm_tower(), 1))).eval()
    (pixels,) = _images(1, scale=2)
    with torch.no_grad():
        stemmed = model.stem(pixels)
    reference = _tower_probabilities("timm", model.vit, stemmed)
    rec = _recorded_at(model, pixels, reference, scale=2.0)
    assert rec.layers == [f"vit.{layer}" for layer in TOWERS["timm"][1]]


@pytest.mark.parametrize("branch", ["same-shape", "whole-image"])
def test_a_branch_of_three_channels_beside_the_vit_leaves_it_in_the_pixels_it_takes(branch):
    """A convolution of three channels out as a branch beside the ViT, the ViT on the image halved by interpolation:
    a tower beside it, whose own image the ViT's tokens are placed in (8 px apart), as for two towers. Its map has
    the shape of the ViT's input (a stride-2 convolution) or the image's: the first was taken for a stem by its
    shape alone, every distance doubled (QA 348)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 3, 2, stride=2) if branch == "same-shape" else nn.Conv2d(3, 3, 3, padding=1)
    model = _StemBeforeViT(sharpened(conv, 3), _sharper(sharpened(_timm_tower(), 1)), beside=True)
    (pixels,) = _images(1, scale=2)
    reference = _tower_probabilities("timm", model.vit, functional.interpolate(pixels, scale_factor=0.5))
    _recorded_at(model, pixels, reference, scale=1.0)


class _StemThen(nn.Module):
    """A stride-2 ``nn.Conv2d(3, 3, 2, 2)`` stem, then ``vit`` on its map as ``how`` says: ``forward_features`` of a
    timm ViT that pads its input to whole patches itself (``dynamic_img_pad``), a view of the stem's map (a slice
    of its channels, the map itself a temporary), or a transformers ViTModel in float64 that casts the float32 map
    (``pixel_values.to``)."""

    def __init__(self, vit: nn.Module, how: str):
        super().__init__()
        self.stem, self.vit, self.how = nn.Conv2d(3, 3, 2, stride=2), vit, how

    def forward(self, pixels: torch.Tensor):
        stemmed = self.stem(pixels)
        if self.how == "forward_features":
            return self.vit.forward_features(stemmed)
        if self.how == "view":
            return self.vit(self.stem(pixels)[:, :3])
        return self.vit(pixel_values=stemmed).last_hidden_state


@pytest.mark.parametrize("how", ["forward_features", "view", "cast"])
def test_a_stem_is_followed_when_the_vit_pads_or_casts_its_map_or_it_is_a_view(how):
    """The tower's first convolution receives another tensor than the stem's map where the tower pads it (timm's
    dynamic_img_pad) or casts it (transformers' pixel_values.to(dtype)), or the user passes a view of it: the stem
    was taken for a branch beside the tower, the ViT's tokens 8 px apart instead of 16 (QA 351). The tensor each
    module on the tower's path receives counts."""
    torch.manual_seed(0)
    if how == "cast":
        vit = _sharper(sharpened(_hf_tower(), 1)).double()
    else:
        timm = pytest.importorskip("timm")
        vit = _sharper(sharpened(timm.create_model(
            "vit_tiny_patch16_224", pretrained=False, depth=2, embed_dim=TOWER_DIM, num_heads=TOWER_HEADS,
            patch_size=PATCH, img_size=(GRID[0] * PATCH, GRID[1] * PATCH), dynamic_img_pad=True), 1))
    model = _StemThen(vit, how).eval()
    (pixels,) = _images(1, scale=2)
    with torch.no_grad():
        stemmed = model.stem(pixels)
    kind = "transformers" if how == "cast" else "timm"
    reference = _tower_probabilities(kind, model.vit, stemmed.double() if how == "cast" else stemmed)
    _recorded_at(model, pixels, reference, scale=2.0)


def test_a_stride_one_stem_that_shrinks_the_map_is_followed():
    """``nn.Conv2d(3, 3, 3)`` unpadded takes a 34 x 50 image to the ViT's 32 x 48: a step of stride 1 on the stem's
    chain, the tokens 8 px apart. Followed as a stem (QA 351), it was refused as a resize by 34 / 32: only strided
    modules were steps."""
    torch.manual_seed(0)
    model = _StemBeforeViT(sharpened(nn.Conv2d(3, 3, 3), 3), _sharper(sharpened(_timm_tower(), 1))).eval()
    pixels = torch.randn(2, 3, GRID[0] * PATCH + 2, GRID[1] * PATCH + 2, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        reference = _tower_probabilities("timm", model.vit, model.stem(pixels))
    _recorded_at(model, pixels, reference, scale=1.0)


class _TowerWithExtra(nn.Module):
    """A user's wrapper of a timm ViT whose forward takes a second tensor it does not give the ViT."""

    def __init__(self, vit: nn.Module):
        super().__init__()
        self.vit = vit

    def forward(self, pixels: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
        return self.vit(pixels)


class _StemAndCrop(nn.Module):
    """A stride-2 3-channel stem and a ViT run as ``how`` says, on a 64 x 96 image: ``"twice"``, the ViT on the
    stem's map, then on the image's top-left 32 x 48 crop (``"crop-first"``: the other way round); ``"extra"``, the
    ViT on the image halved by
    interpolation, the stem's map given to its wrapper as a second argument it does not read."""

    def __init__(self, vit: nn.Module, how: str):
        super().__init__()
        self.stem, self.tower, self.how = nn.Conv2d(3, 3, 2, stride=2), _TowerWithExtra(vit), how

    def forward(self, pixels: torch.Tensor):
        crop = pixels[..., :GRID[0] * PATCH, :GRID[1] * PATCH]
        if self.how == "twice":
            return self.tower(self.stem(pixels)), self.tower(crop)
        if self.how == "crop-first":
            return self.tower(crop), self.tower(self.stem(pixels))
        return self.tower(functional.interpolate(pixels, scale_factor=0.5), self.stem(pixels))


@pytest.mark.parametrize("how", ["twice", "crop-first", "extra"])
def test_only_the_towers_run_on_the_stems_map_is_placed_by_the_stem(how):
    """The ViT on a crop after a run on the stem's map in the same call, or given the stem's map only as an argument
    it does not read, is in the pixels of what it takes (8 px apart): the first version kept the stem for every later
    run of the tower in the call, and took any argument for its input, every distance doubled (QA 354). Its run on
    the stem's map after one on a crop kept the crop's image, every distance halved (QA 355)."""
    torch.manual_seed(0)
    model = _StemAndCrop(_sharper(sharpened(_timm_tower(), 1)), how).eval()
    (pixels,) = _images(1, scale=2)
    with torch.no_grad():
        stemmed = model.stem(pixels)
    crop = pixels[..., :GRID[0] * PATCH, :GRID[1] * PATCH]
    if how == "twice":
        runs = [(stemmed, 2.0), (crop, 1.0)]
    elif how == "crop-first":
        runs = [(crop, 1.0), (stemmed, 2.0)]
    else:
        runs = [(functional.interpolate(pixels, scale_factor=0.5), 1.0)]
    with torch.no_grad(), vitmad.record(model, reduction="none") as rec:
        model(pixels)
    assert len(rec.calls) == 1 and len(rec.calls[0].layers) == 2 * len(runs)
    recorded = iter(zip(rec.calls[0].mad, rec.calls[0].geometry, strict=True))
    for taken, scale in runs:
        for p in _tower_probabilities("timm", model.tower.vit, taken):
            recorded_mad, geometry = next(recorded)
            assert geometry.stride == (scale * PATCH, scale * PATCH)
            torch.testing.assert_close(recorded_mad.double(), scale * _tower_mad(p), **TOL)


class _SwitchedOff(nn.Module):
    """A user's optional learned downsampler, switched off: it holds a convolution on the image but hands back its
    input."""

    def __init__(self):
        super().__init__()
        self.conv, self.use = nn.Conv2d(3, 3, 2, stride=2), False

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.conv(pixels) if self.use else pixels


def test_a_branch_that_hands_back_the_image_is_no_stem_of_a_tower_on_a_crop():
    """The switched-off downsampler's output is the image itself: taken for a stem's map, a ViT on a crop of the
    image (a view of it) was placed 16 px apart, every distance doubled (QA 355)."""
    torch.manual_seed(0)

    class _Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.down, self.vit = _SwitchedOff(), _sharper(sharpened(_timm_tower(), 1))

        def forward(self, pixels: torch.Tensor) -> torch.Tensor:
            pixels = self.down(pixels)
            return self.vit(pixels[..., 8:8 + GRID[0] * PATCH, 8:8 + GRID[1] * PATCH])

    model = _Model().eval()
    (pixels,) = _images(1, scale=2)
    reference = _tower_probabilities("timm", model.vit, pixels[..., 8:8 + GRID[0] * PATCH, 8:8 + GRID[1] * PATCH])
    _recorded_at(model, pixels, reference, scale=1.0)


@pytest.mark.parametrize("tower", ["segment_anything", "kornia"])
def test_a_tower_whose_family_reads_its_own_patch_embedding_is_refused_behind_a_stem(tower):
    """SAM's image encoder, kornia's ViT: their layout is read from their own patch embedding, in pixels of the map
    the stem made, so behind a stride-2 stem every distance was halved, silently (QA 363). Refused, saying what to
    record instead; the plain layout (timm's ViT above) follows the stem."""
    if tower == "segment_anything":
        encoder = pytest.importorskip("segment_anything.modeling").ImageEncoderViT(
            img_size=40, patch_size=8, embed_dim=32, depth=1, num_heads=2, out_chans=16)
    else:
        encoder = pytest.importorskip("kornia.models.vit").VisionTransformer(image_size=40, patch_size=8,
                                                                             embed_dim=32, depth=1, num_heads=2)

    class Stemmed(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.tower = nn.Sequential(nn.Conv2d(3, 3, 3, 2, 1), nn.ReLU()), encoder

        def forward(self, x):
            return self.tower(self.stem(x))

    model = Stemmed().eval()
    with torch.no_grad(), vitmad.record(model):
        with pytest.raises(ValueError, match=r"its tower runs on the 40x40 map a stem of yours made from the 80x80 "
                                             r"image, .* record the tower itself"):
            model(torch.randn(1, 3, 80, 80))
    with torch.no_grad(), vitmad.record(model.tower) as alone:  # in pixels of its own input, as said
        model(torch.randn(1, 3, 80, 80))
    assert alone.geometry[0].stride == (8.0, 8.0)
