"""vitmad.record on transformers' Swin2SR (``Swin2SRModel``, ``Swin2SRForImageSuperResolution``).

The geometry, written here from ``modeling_swin2sr.py`` (transformers 5.25):

- ``Swin2SRModel.pad_and_normalize`` reflects the image at the bottom and right to a multiple of
  ``config.window_size``; the first convolution (3 x 3, stride 1, padding 1) and the patch projection (1 x 1,
  ``patch_size`` 1) keep one token per pixel of the padded image: token ``(r, c)`` sits at ``(r + 0.5, c + 0.5)`` px.
- Every residual group (``Swin2SRStage``) runs Swinv2 blocks (``Swin2SRLayer``) on that whole map; nothing merges
  tokens. A block's window is ``min(config.window_size, configured resolution)`` and its shift ``window // 2`` in
  odd blocks, none where the configured resolution (``config.image_size``) is not larger than the window: both
  fixed at construction. The block pads the map with zeros at the bottom and right to whole windows, rolls the
  padded map by ``-shift``, cuts it into windows row-major, each window row-major; the attention is
  ``[B * windows, heads, N, N]``, images outermost.
- The tokens of the image's own pixels are queries and keys; every other slot (the reflected rows and columns, the
  block's zero padding) is a key at its cell of the padded grid, past the image edge, and no query
  (docs/definition.md, windows). Per-token values are on the image's ``H x W`` grid.

The reference is each block's own softmax probabilities (the input of its dropout) in float64, placed by that
geometry. transformers' ``Swin2SRModel`` unembeds the encoder's output at the image's size before padding, which
fails for an image its window does not divide, after its encoder ran on the padded map; for those sizes the tests
unembed at the padded size, as the original Swin2SR keeps the padded map to the end and crops the reconstruction
(``_unembed_padded``): the encoder, and so every attention, is the model's own.
"""

from __future__ import annotations

import math

import pytest
import torch

import vitmad
from conftest import record_both_reductions, sharpened

transformers = pytest.importorskip("transformers")
modeling = pytest.importorskip("transformers.models.swin2sr.modeling_swin2sr")

TOL = {"rtol": 1e-5, "atol": 1e-4}  # float32 probabilities, float32 accumulation in the ops; MADs here 0.5 to 5 px
STATS = ["entropy", "prefix_mass", "self_mass"]
HEADS = (1, 2)  # per residual group
TINY = dict(patch_size=1, embed_dim=16, depths=[2, 2], num_heads=list(HEADS), mlp_ratio=2.0)

# name -> (config.image_size, config.window_size, image (H, W), block window, shift of the odd blocks)
CASES = {
    # The window divides the image: no padding anywhere.
    "square-16": (16, 4, (16, 16), 4, 2),
    "non-square-12x20": (16, 4, (12, 20), 4, 2),
    # Odd sides: reflected to 16 x 20, then windows of 4 shifted by 2 over the padded map.
    "reflected-13x18": (16, 4, (13, 18), 4, 2),
    # Windows of 8, shifted by 4: 21 x 11 reflected to 24 x 16.
    "reflected-21x11-window-8": (24, 8, (21, 11), 8, 4),
    # A configured resolution of 3 clamps the blocks' window to 3 (and drops the shift); the model still pads the
    # image to a multiple of 4, so each block pads the map with zeros to whole windows of 3.
    "clamped-8x16": (3, 4, (8, 16), 3, 0),
    "clamped-reflected-7x13": (3, 4, (7, 13), 3, 0),
}
# Divisible sizes for the upsamplers; every upsampler but the plain one ("": pixel_values plus a convolution of the
# padded map, which fails) at a reflected size too.
UPSAMPLERS = {"pixelshuffle": 2, "pixelshuffledirect": 3, "pixelshuffle_aux": 2, "nearest+conv": 4, "": 1}


def _config(case: str, **overrides) -> transformers.Swin2SRConfig:
    image_size, window, *_ = CASES[case]
    return transformers.Swin2SRConfig(image_size=image_size, window_size=window, **TINY, **overrides)


def _build(model_cls, config) -> torch.nn.Module:
    """``model_cls`` with sharpened attention (conftest) and convolutions drawn anew (std 0.25), so that tokens
    differ from pixel to pixel and a token at a wrong place changes the values."""
    torch.manual_seed(0)
    model = sharpened(model_cls(config))
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Conv2d):
                module.weight.normal_(std=0.25)
    return model


def _swin2sr(model: torch.nn.Module) -> torch.nn.Module:
    return model if isinstance(model, modeling.Swin2SRModel) else model.swin2sr


def _padded(size, multiple: int) -> tuple[int, int]:
    return tuple(math.ceil(n / multiple) * multiple for n in size)


def _unembed_padded(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with its ``Swin2SRModel``'s final unembedding at the padded image's size (see the module docstring):
    transformers passes the size before padding, which fails after the encoder wherever the image was padded."""
    swin2sr = _swin2sr(model)
    multiple, unembed = swin2sr.config.window_size, swin2sr.patch_unembed
    original = unembed.forward
    unembed.forward = lambda embeddings, size: original(embeddings, _padded(size, multiple))
    return model


def _probabilities(model: torch.nn.Module, pixels: torch.Tensor) -> list[torch.Tensor]:
    """Each block's softmax probabilities (the input of its attention's dropout), float64, in call order."""
    maps, handles = [], []
    for module in model.modules():
        if isinstance(module, modeling.Swin2SRSelfAttention):
            handles.append(module.dropout.register_forward_pre_hook(lambda m, args: maps.append(args[0].double())))
    try:
        with torch.no_grad():
            model(pixels)
    finally:
        for handle in handles:
            handle.remove()
    return maps


def _reference(probabilities: torch.Tensor, batch: int, image, padded_image, window: int,
               shift: int) -> dict[str, torch.Tensor]:
    """Per statistic, ``[B, heads, H * W]`` on the image's grid, from one block's ``[B * nW, heads, N, N]``
    probabilities: the map ``padded_image`` (the reflected image) padded again to whole windows, rolled by
    ``-shift``, cut into windows; image tokens queries, every slot a key at its cell of the padded grid."""
    height, width = image
    rows_p, cols_p = _padded(padded_image, window)
    # The row (column) of the unshifted, padded grid at each row (column) of the rolled map: roll(x, -s)[i] = x[i + s].
    rows = (torch.arange(rows_p) + shift) % rows_p
    cols = (torch.arange(cols_p) + shift) % cols_p
    grid_r, grid_c = torch.meshgrid(rows, cols, indexing="ij")
    cells = (torch.stack([grid_r, grid_c], dim=-1).double() + 0.5)  # [Hp, Wp, 2] px, stride 1
    nh, nw = rows_p // window, cols_p // window

    def windows(x: torch.Tensor) -> torch.Tensor:  # [Hp, Wp, ...] -> [nW, N, ...]
        x = x.reshape(nh, window, nw, window, *x.shape[2:]).transpose(1, 2)
        return x.reshape(nh * nw, window * window, *x.shape[4:])

    centres = windows(cells)  # [nW, N, 2]
    heads = probabilities.shape[1]
    attention = probabilities.view(batch, nh * nw, heads, window * window, window * window)
    distances = torch.cdist(centres, centres)[None, :, None]  # [1, nW, 1, N, N]
    per_slot = {
        "mad": (attention * distances).sum(-1),
        "entropy": -torch.special.xlogy(attention, attention).sum(-1),
        "prefix_mass": torch.zeros_like(attention[..., 0]),  # every key has a position
        "self_mass": attention.diagonal(dim1=-2, dim2=-1),
    }
    expected = {}
    for name, values in per_slot.items():  # [B, nW, heads, N] -> [B, heads, Hp, Wp], rolled back, the image cut
        rolled = values.view(batch, nh, nw, heads, window, window).permute(0, 3, 1, 4, 2, 5)
        on_map = rolled.reshape(batch, heads, rows_p, cols_p).roll((shift, shift), (-2, -1))
        expected[name] = on_map[..., :height, :width].reshape(batch, heads, height * width)
    return expected


def _check(rec, rec_tokens, maps, batch: int, case: str) -> None:
    """Every layer of the recordings against the blocks' probabilities ``maps``, with the geometry of ``case``."""
    _, multiple, image, window, shift = CASES[case]
    padded_image = _padded(image, multiple)
    assert len(maps) == len(rec.layers) == len(TINY["depths"]) * 2 and rec.skipped == {}
    tokens = rec_tokens.calls[-1]
    for layer, probabilities in enumerate(maps):
        layer_shift = shift if layer % 2 else 0
        geometry = rec.geometry[layer]
        assert geometry.grid == image and geometry.stride == (1.0, 1.0) and geometry.heads == HEADS[layer // 2]
        attention = f"window {window}x{window}" + (f", shift {layer_shift}x{layer_shift}" if layer_shift else "")
        blocks = _padded(padded_image, window)
        if blocks != padded_image:
            attention += f", padded to {blocks[0]}x{blocks[1]}"
        if padded_image != image:
            attention += f", image padded to {padded_image[0]}x{padded_image[1]} px by reflection"
        assert geometry.attention == attention
        expected = _reference(probabilities, batch, image, padded_image, window, layer_shift)
        for name, values in expected.items():
            per_token = tokens.per_layer if name == "mad" else tokens.statistics[name]
            mean = rec.per_layer if name == "mad" else rec.calls[-1].statistics[name]
            torch.testing.assert_close(per_token[layer].double(), values, **TOL)
            torch.testing.assert_close(mean[layer].double(), values.mean(-1), **TOL)


def _output(model_cls):
    if model_cls is transformers.Swin2SRModel:
        return lambda out: out.last_hidden_state
    return lambda out: out.reconstruction


def _run(pixels):
    return lambda m: m(pixels)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("model_cls", [transformers.Swin2SRModel, transformers.Swin2SRForImageSuperResolution],
                         ids=["model", "super-resolution"])
def test_swin2sr_equals_the_mad_and_statistics_of_its_own_windows(model_cls, case):
    model = _build(model_cls, _config(case, upscale=2, upsampler="pixelshuffledirect"))
    image = CASES[case][2]
    if _padded(image, CASES[case][1]) != image:
        _unembed_padded(model)
    pixels = torch.rand(2, 3, *image, generator=torch.Generator().manual_seed(1))
    rec, rec_tokens = record_both_reductions(model, _run(pixels), _output(model_cls), STATS)
    prefix = "" if model_cls is transformers.Swin2SRModel else "swin2sr."
    assert rec.layers == [f"{prefix}encoder.stages.{s}.layers.{b}.attention.self" for s in (0, 1) for b in (0, 1)]
    maps = _probabilities(model, pixels)
    # Far from uniform (entropy 0.3 to 0.56 of a uniform window's, ln N), so that a token at a wrong place would show.
    assert all(float(-torch.special.xlogy(m, m).sum(-1).mean()) < 0.6 * math.log(m.shape[-1]) for m in maps)
    _check(rec, rec_tokens, maps, pixels.shape[0], case)


@pytest.mark.parametrize("upsampler, case", [(u, c) for u in UPSAMPLERS for c in ("non-square-12x20", "reflected-13x18")
                                             if u or c == "non-square-12x20"], ids=lambda v: v or "none")
def test_swin2sr_upsamplers_leave_the_low_resolution_geometry(upsampler, case):
    image = CASES[case][2]
    padded = _padded(image, CASES[case][1]) != image
    model = _build(transformers.Swin2SRForImageSuperResolution,
                   _config(case, upscale=UPSAMPLERS[upsampler], upsampler=upsampler))
    if padded:
        _unembed_padded(model)
    pixels = torch.rand(2, 3, *image, generator=torch.Generator().manual_seed(2))
    rec, rec_tokens = record_both_reductions(model, _run(pixels), _output(transformers.Swin2SRForImageSuperResolution),
                                             STATS)
    assert model(pixels).reconstruction.shape[-2:] == tuple(n * UPSAMPLERS[upsampler] for n in image)
    _check(rec, rec_tokens, _probabilities(model, pixels), pixels.shape[0], case)


def test_swin2sr_keeps_no_call_of_a_forward_transformers_fails():
    # Unpatched, the model fails after its encoder for an image its window does not divide: nothing is recorded.
    model = _build(transformers.Swin2SRModel, _config("reflected-13x18"))
    with torch.no_grad(), vitmad.record(model) as rec:
        with pytest.raises(RuntimeError, match="is invalid for input of size"):
            model(torch.rand(1, 3, 13, 18))
    assert rec.calls == []


def test_swin2sr_follows_the_image_size_in_each_forward():
    model = _unembed_padded(_build(transformers.Swin2SRModel, _config("reflected-13x18")))
    first, second = torch.rand(1, 3, 16, 16), torch.rand(1, 3, 13, 18)
    with torch.no_grad(), vitmad.record(model) as both:
        model(first)
        model(second)
    with torch.no_grad(), vitmad.record(model) as alone:
        model(second)
    assert [g.grid for g in both.calls[0].geometry] == [(16, 16)] * 4
    assert [g.grid for g in both.calls[1].geometry] == [(13, 18)] * 4
    for mixed, single in zip(both.calls[1].per_layer, alone.per_layer, strict=True):
        torch.testing.assert_close(mixed, single)


def test_swin2sr_refuses_a_map_its_padding_does_not_give():
    # A model that pads its image to another multiple than its config says: the map is not the one vitmad expects.
    model = _build(transformers.Swin2SRModel, _config("square-16"))
    model.pad_and_normalize = lambda pixels: torch.nn.functional.pad(pixels, (0, 4, 0, 4), "reflect")
    with torch.no_grad(), vitmad.record(model):
        with pytest.raises(ValueError, match=r"encoder\.stages\.0\.layers\.0\.attention\.self .*map height of 20 "
                                             r"tokens, but Swin2SRModel pads an image height of 16 px to 16 px"):
            model(torch.rand(1, 3, 16, 16))


def test_swin2sr_refuses_a_block_run_outside_the_model():
    model = _build(transformers.Swin2SRForImageSuperResolution, _config("square-16"))
    with torch.no_grad(), vitmad.record(model):
        model(torch.rand(1, 3, 16, 16))  # the image of this forward is not taken for a later call
        block = model.swin2sr.encoder.stages[0].layers[0]
        with pytest.raises(ValueError, match=r"ran outside a forward of swin2sr \(Swin2SRModel\)"):
            block(torch.randn(1, 256, 16), (16, 16))
