"""vitmad.record on Swin: timm Swin, Swin V2 and Swin V2-CR, transformers Swin, Swinv2, DonutSwin and MaskFormerSwin.

Tiny random-weight models. The reference is each model's own eager attention probabilities, placed by the
geometry written here: each layer's map size, window, shift and pixel stride in a table per case, the map's cell
centres shifted and padded the way the model's source does it (timm: ``torch.roll`` of the map, then padding;
transformers: padding, then ``torch.roll`` of the padded map), cut into windows, and the per-query MAD put back
on the unshifted map; reduced by the float64 reference of the definition.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

import vitmad
from conftest import SoftmaxOutputs
from vitmad.ops.reference import mad_positions_reference

timm = pytest.importorskip("timm")

# The recorded MAD is float32 (fused ops, or mad_qk on the q/k of the fused path) against float64 on the same
# float32 probabilities (or the eager path's, which differ by float32 rounding); MADs here are 2 to 40 px.
TOL = {"rtol": 1e-5, "atol": 1e-4}  # atol in pixels
TINY = dict(embed_dim=16, depths=(2, 2), num_heads=(1, 2), patch_size=4)  # heads 1, then 2


def _windowed_mad(probs: torch.Tensor, batch: int, size, window, shift, stride: float,
                  roll_first: bool) -> torch.Tensor:
    """``[B, heads, H * W]`` per-token MAD, row-major on the unshifted map, from window attention
    ``[B * nW, heads, N, N]`` of an ``H x W`` map of ``stride``-pixel cells."""
    (height, width), (win_h, win_w), (shift_h, shift_w) = size, window, shift
    padded_h, padded_w = math.ceil(height / win_h) * win_h, math.ceil(width / win_w) * win_w
    # Per axis, the index on the unshifted, padded grid of each slot of the shifted, padded map. A padding slot
    # is a key at its own cell past the image edge, and no query (docs/definition.md, windows). timm rolls the
    # real map then pads, so the shift is undone modulo the real size and padding stays put; transformers pads
    # then rolls, so the shift is undone modulo the padded size.
    def axis(length, padded, step):
        if roll_first:
            return torch.cat([torch.arange(length).roll(-step), torch.arange(length, padded)])
        return torch.arange(padded).roll(-step)

    rows, cols = torch.meshgrid(axis(height, padded_h, shift_h), axis(width, padded_w, shift_w), indexing="ij")
    keys = (torch.stack([rows, cols], dim=-1).double() + 0.5) * stride  # [Hp, Wp, 2]
    is_padding = ((rows >= height) | (cols >= width))[..., None]
    queries = keys.masked_fill(is_padding, float("nan"))
    nh, nw = padded_h // win_h, padded_w // win_w

    def windows(x):
        return x.view(nh, win_h, nw, win_w, 2).permute(0, 2, 1, 3, 4).reshape(nh * nw, 1, win_h * win_w, 2)

    positions, key_positions = windows(queries), windows(keys)
    heads = probs.shape[1]
    per_query = mad_positions_reference(probs.view(batch, nh * nw, heads, win_h * win_w, win_h * win_w),
                                        positions, key_positions, reduction="none")  # [B, nW, heads, N]
    shifted_map = per_query.view(batch, nh, nw, heads, win_h, win_w).permute(3, 0, 1, 4, 2, 5)
    shifted_map = shifted_map.reshape(heads, batch, padded_h, padded_w).permute(1, 0, 2, 3)
    if roll_first:
        unshifted = shifted_map[..., :height, :width].roll((shift_h, shift_w), (-2, -1))
    else:
        unshifted = shifted_map.roll((shift_h, shift_w), (-2, -1))[..., :height, :width]
    assert not unshifted.isnan().any(), "a token of the map is a padding slot: the reference geometry is wrong"
    return unshifted.reshape(batch, heads, height * width)


def _check(rec, probabilities, batch, table, roll_first):
    """rec (reduction="none") against the reference of every layer in ``table``: (size, window, shift, stride)."""
    assert len(rec.layers) == len(table) == len(probabilities)
    assert rec.skipped == {}
    for index, (size, window, shift, stride) in enumerate(table):
        expected = _windowed_mad(probabilities[index], batch, size, window, shift, stride, roll_first)
        geometry = rec.geometry[index]
        assert geometry.grid == size and geometry.stride == (stride, stride)
        assert geometry.heads == expected.shape[1]
        torch.testing.assert_close(rec.per_layer[index].double(), expected, **TOL)


# timm ----------------------------------------------------------------------------------------------------------

# Per layer: (map size, window, shift, pixel stride). The second stage has twice the stride (one patch merging).
TIMM_CASES = {
    # Built for 32 x 32: an 8 x 8 map, then 4 x 4, where timm clamps nothing but drops the shift (map == window).
    "square": (dict(img_size=32, window_size=4), (32, 32), [
        ((8, 8), (4, 4), (0, 0), 4.0), ((8, 8), (4, 4), (2, 2), 4.0),
        ((4, 4), (4, 4), (0, 0), 8.0), ((4, 4), (4, 4), (0, 0), 8.0)]),
    # 9 x 13, then 5 x 7 (the odd map padded to 10 x 14 before merging): windows padded, shifted, non-square.
    "padded": (dict(img_size=(36, 52), window_size=4, strict_img_size=False), (36, 52), [
        ((9, 13), (4, 4), (0, 0), 4.0), ((9, 13), (4, 4), (2, 2), 4.0),
        ((5, 7), (4, 4), (0, 0), 8.0), ((5, 7), (4, 4), (2, 2), 8.0)]),
    # Windows of 8: shifted by 4 on the 9 x 13 map, clamped to the whole 5 x 7 map (no shift) in stage 2.
    "clamped": (dict(img_size=(36, 52), window_size=8, strict_img_size=False), (36, 52), [
        ((9, 13), (8, 8), (0, 0), 4.0), ((9, 13), (8, 8), (4, 4), 4.0),
        ((5, 7), (5, 7), (0, 0), 8.0), ((5, 7), (5, 7), (0, 0), 8.0)]),
    # always_partition: windows of 8 and their shift of 4 kept on every map, the 5 x 7 map padded to one window.
    "always_partition": (dict(img_size=(36, 52), window_size=8, strict_img_size=False, always_partition=True),
                         (36, 52), [
        ((9, 13), (8, 8), (0, 0), 4.0), ((9, 13), (8, 8), (4, 4), 4.0),
        ((5, 7), (8, 8), (0, 0), 8.0), ((5, 7), (8, 8), (4, 4), 8.0)]),
    # Built for 32 x 32, run at 36 x 52: stage 2 keeps the unshifted 4 x 4 windows it was built with, padded.
    "dynamic": (dict(img_size=32, window_size=4, strict_img_size=False), (36, 52), [
        ((9, 13), (4, 4), (0, 0), 4.0), ((9, 13), (4, 4), (2, 2), 4.0),
        ((5, 7), (4, 4), (0, 0), 8.0), ((5, 7), (4, 4), (0, 0), 8.0)]),
}
# model name -> the attention class, its dropout on the probabilities
TIMM_MODELS = {
    "swin_tiny_patch4_window7_224": "WindowAttention",
    "swinv2_tiny_window8_256": "WindowAttention",
    "swinv2_cr_tiny_224": "WindowMultiHeadAttention",
}


def _timm_probabilities(model) -> list[torch.Tensor]:
    """Hooks collecting every window attention's softmax output (the input of its attn_drop), in call order."""
    maps = []
    for module in model.modules():
        if type(module).__name__ in ("WindowAttention", "WindowMultiHeadAttention"):
            if hasattr(module, "fused_attn"):
                module.fused_attn = False
            module.attn_drop.register_forward_pre_hook(lambda m, args: maps.append(args[0]))
    return maps


def _timm_case(name: str, case: str, fused: bool | None):
    kwargs, image, table = TIMM_CASES[case]
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **TINY, **kwargs).eval()
    for module in model.modules():
        if hasattr(module, "fused_attn") and fused is not None:
            module.fused_attn = fused
    return model, torch.randn(2, 3, *image), table


@pytest.mark.parametrize("case", list(TIMM_CASES))
@pytest.mark.parametrize("name, fused", [("swin_tiny_patch4_window7_224", False),
                                         ("swin_tiny_patch4_window7_224", True),
                                         ("swinv2_tiny_window8_256", None), ("swinv2_cr_tiny_224", None)])
def test_timm_swin_equals_the_mad_of_its_eager_windows(name, fused, case):
    model, pixels, table = _timm_case(name, case, fused)
    eager = copy.deepcopy(model)
    probabilities = _timm_probabilities(eager)
    with torch.no_grad():
        plain = model(pixels)
        with vitmad.record(model, reduction="none") as rec:
            recorded = model(pixels)
        eager(pixels)
    assert torch.equal(recorded, plain)
    _check(rec, probabilities, pixels.shape[0], table, roll_first=True)
    for geometry, (_, window, shift, _) in zip(rec.geometry, table, strict=True):
        assert geometry.attention.startswith(f"window {window[0]}x{window[1]}")
        assert ("shift" in geometry.attention) == any(shift)


def test_timm_swin_mean_is_the_mean_over_the_tokens_and_stacks_with_nan_heads():
    model, pixels, table = _timm_case("swin_tiny_patch4_window7_224", "padded", False)
    with torch.no_grad(), vitmad.record(model) as rec:
        model(pixels)
    with torch.no_grad(), vitmad.record(model, reduction="none") as per_token:
        model(pixels)
    for mean, tokens in zip(rec.per_layer, per_token.per_layer, strict=True):
        torch.testing.assert_close(mean, tokens.mean(-1))
    assert rec.mad.shape == (4, 2, 2)  # [L, B, largest head count]
    assert rec.mad[:2, :, 1].isnan().all() and not rec.mad[2:].isnan().any()
    assert [g.heads for g in rec.geometry] == [1, 1, 2, 2]


def test_per_token_statistics_on_several_grids_are_refused_naming_where_each_is_per_layer():
    """Per-token values of a hierarchy's stages do not stack; rec.stats pointed to rec.per_layer alone, which holds
    MAD only (QA helper-125): the refusal names where every statistic is, per layer."""
    model, pixels, _ = _timm_case("swin_tiny_patch4_window7_224", "padded", False)
    with torch.no_grad(), vitmad.record(model, reduction="none", stats=["entropy", "self_mass"]) as rec:
        model(pixels)
    with pytest.raises(ValueError, match=r"different token grids .*read rec.per_layer \(MAD\) and "
                                         r"rec.calls\[-1\].statistics\['entropy'\] and "
                                         r"rec.calls\[-1\].statistics\['self_mass'\] .* instead of rec.stats"):
        _ = rec.stats
    # Where the refusal points: one [B, H, T] per layer, per statistic, on each stage's grid.
    entropy = rec.calls[-1].statistics["entropy"]
    assert [tuple(t.shape) for t in entropy] == [tuple(t.shape) for t in rec.per_layer]
    assert len({t.shape[-1] for t in entropy}) == 2


def test_timm_swin_follows_the_input_size_in_each_forward():
    model, pixels, _ = _timm_case("swin_tiny_patch4_window7_224", "dynamic", False)
    square = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), vitmad.record(model) as both:
        model(square)
        model(pixels)
    with torch.no_grad(), vitmad.record(model) as alone:
        model(pixels)
    assert [g.grid for g in both.calls[0].geometry] == [(8, 8), (8, 8), (4, 4), (4, 4)]
    assert [g.grid for g in both.calls[1].geometry] == [(9, 13), (9, 13), (5, 7), (5, 7)]
    for first, second in zip(both.calls[1].per_layer, alone.per_layer, strict=True):
        torch.testing.assert_close(first, second)


def test_timm_swin_stage_two_is_measured_in_input_pixels():
    # Uniform attention (zero q/k) over a window: the stage-2 MAD is twice the stage-1 MAD of the same window.
    model, pixels, _ = _timm_case("swin_tiny_patch4_window7_224", "square", True)
    for module in model.modules():
        if type(module).__name__ == "WindowAttention":
            torch.nn.init.zeros_(module.qkv.weight)
            torch.nn.init.zeros_(module.qkv.bias)
            torch.nn.init.zeros_(module.relative_position_bias_table)
    with torch.no_grad(), vitmad.record(model) as rec:
        model(pixels)
    uniform_4x4 = vitmad.uniform_attention_mad(4, 4, 1)
    torch.testing.assert_close(rec.per_layer[0], torch.full((2, 1), 4 * uniform_4x4), **TOL)
    torch.testing.assert_close(rec.per_layer[2], torch.full((2, 2), 8 * uniform_4x4), **TOL)


def test_timm_swin_refuses_a_map_the_image_does_not_give():
    model, pixels, _ = _timm_case("swin_tiny_patch4_window7_224", "padded", False)
    with torch.no_grad(), vitmad.record(model) as rec:
        model(pixels)
        block = model.layers[0].blocks[0]
        with pytest.raises(ValueError, match=r"layers\.0\.blocks\.0\.attn .*map height of 12 tokens.*gives 9"):
            block(torch.randn(1, 12, 13, 16))
    assert len(rec.layers) == 4


def test_timm_swin_refuses_its_attention_called_outside_a_block():
    model, pixels, _ = _timm_case("swin_tiny_patch4_window7_224", "square", False)
    with torch.no_grad(), vitmad.record(model):
        model(pixels)  # the blocks' maps of this forward are not taken for a later call
        with pytest.raises(ValueError, match="outside a forward of its block layers.0.blocks.0"):
            model.layers[0].blocks[0].attn(torch.randn(8, 16, 16))


# transformers ----------------------------------------------------------------------------------------------------

transformers = pytest.importorskip("transformers")

HF_TINY = dict(image_size=32, patch_size=4, embed_dim=16, depths=[2, 2], num_heads=[1, 2], window_size=4)
HF_MODELS = {
    "swin": (transformers.SwinConfig, transformers.SwinModel),
    "swinv2": (transformers.Swinv2Config, transformers.Swinv2Model),
    "donut_swin": (transformers.DonutSwinConfig, transformers.DonutSwinModel),
    "maskformer_swin": (transformers.MaskFormerSwinConfig, transformers.MaskFormerSwinModel),
}
# Per family and input size: (map size, window, shift, stride) per layer. 34 x 50 is padded to 36 x 52 by the
# patch embedding: a 9 x 13 map, then 5 x 7. Swin and DonutSwin drop the shift where the map is not larger than
# the window (in each call); Swinv2 decides at construction, for the configured 32 x 32; MaskFormerSwin never.
_STAGE1_32 = [((8, 8), (4, 4), (0, 0), 4.0), ((8, 8), (4, 4), (2, 2), 4.0)]
_STAGE1_34x50 = [((9, 13), (4, 4), (0, 0), 4.0), ((9, 13), (4, 4), (2, 2), 4.0)]
_UNSHIFTED_4x4 = [((4, 4), (4, 4), (0, 0), 8.0)] * 2
_SHIFTED_5x7 = [((5, 7), (4, 4), (0, 0), 8.0), ((5, 7), (4, 4), (2, 2), 8.0)]
HF_TABLES = {
    ("swin", (32, 32)): _STAGE1_32 + _UNSHIFTED_4x4,
    ("swin", (34, 50)): _STAGE1_34x50 + _SHIFTED_5x7,
    ("donut_swin", (32, 32)): _STAGE1_32 + _UNSHIFTED_4x4,
    ("donut_swin", (34, 50)): _STAGE1_34x50 + _SHIFTED_5x7,
    ("swinv2", (32, 32)): _STAGE1_32 + _UNSHIFTED_4x4,
    ("swinv2", (34, 50)): _STAGE1_34x50 + [((5, 7), (4, 4), (0, 0), 8.0)] * 2,
    ("maskformer_swin", (32, 32)): _STAGE1_32 + [((4, 4), (4, 4), (0, 0), 8.0), ((4, 4), (4, 4), (2, 2), 8.0)],
    ("maskformer_swin", (34, 50)): _STAGE1_34x50 + _SHIFTED_5x7,
}


def _hf_probabilities(model) -> list[torch.Tensor]:
    """Hooks collecting every window attention's probabilities in call order: the output of Swin's eager
    attention, the input of the others' dropout on the probabilities."""
    maps = []
    for module in model.modules():
        name = type(module).__name__
        if name == "SwinAttention":
            module.register_forward_hook(lambda m, args, output: maps.append(output[1]))
        elif name in ("Swinv2SelfAttention", "DonutSwinSelfAttention", "MaskFormerSwinSelfAttention"):
            module.dropout.register_forward_pre_hook(lambda m, args: maps.append(args[0]))
    return maps


@pytest.mark.parametrize("size", [(32, 32), (34, 50)], ids=["square", "padded"])
@pytest.mark.parametrize("family, implementation", [("swin", "sdpa"), ("swin", "eager"), ("swinv2", None),
                                                    ("donut_swin", None), ("maskformer_swin", None)])
def test_transformers_swin_equals_the_mad_of_its_eager_windows(family, implementation, size):
    config_cls, model_cls = HF_MODELS[family]
    torch.manual_seed(0)
    model = model_cls(config_cls(**HF_TINY)).eval()
    if implementation is not None:
        model.set_attn_implementation(implementation)
    eager = copy.deepcopy(model)
    if implementation is not None:
        eager.set_attn_implementation("eager")
    probabilities = _hf_probabilities(eager)
    pixels = torch.randn(2, 3, *size)
    # A fresh copy per forward: Swin and DonutSwin keep the window and shift they clamped in an earlier call.
    reference = copy.deepcopy(model)
    with torch.no_grad():
        plain = reference(pixels).last_hidden_state
        with vitmad.record(model, reduction="none") as rec:
            recorded = model(pixels).last_hidden_state
        eager(pixels)
    assert torch.equal(recorded, plain)
    _check(rec, probabilities, pixels.shape[0], HF_TABLES[family, size], roll_first=False)


# torchvision -------------------------------------------------------------------------------------------------

torchvision_swin = pytest.importorskip("torchvision.models.swin_transformer")

# torchvision floors the image to whole patches, pads each map to whole windows, then rolls it; a shift is dropped
# along an axis whose padded map one window covers (in each call). 34 x 50: an 8 x 12 map, then 4 x 6 (shifted
# along the width only); 36 x 52: 9 x 13, then 5 x 7 (padded to 10 x 14 before merging).
TV_TABLES = {
    (32, 32): _STAGE1_32 + _UNSHIFTED_4x4,
    (34, 50): [((8, 12), (4, 4), (0, 0), 4.0), ((8, 12), (4, 4), (2, 2), 4.0),
               ((4, 6), (4, 4), (0, 0), 8.0), ((4, 6), (4, 4), (0, 2), 8.0)],
    (36, 52): _STAGE1_34x50 + _SHIFTED_5x7,
}


@pytest.mark.parametrize("size", list(TV_TABLES), ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("version", [1, 2])
def test_torchvision_swin_equals_the_mad_of_its_windows(version, size):
    extra = {} if version == 1 else dict(block=torchvision_swin.SwinTransformerBlockV2,
                                         downsample_layer=torchvision_swin.PatchMergingV2)
    torch.manual_seed(0)
    model = torchvision_swin.SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[1, 2],
                                             window_size=[4, 4], stochastic_depth_prob=0.0, num_classes=10,
                                             **extra).eval()
    pixels = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        with SoftmaxOutputs(rank=4) as seen:
            plain = model(pixels)
        with vitmad.record(model, reduction="none") as rec:
            recorded = model(pixels)
    assert torch.equal(recorded, plain)
    assert rec.layers == [f"features.{stage}.{block}.attn" for stage in (1, 3) for block in (0, 1)]
    _check(rec, seen.maps, pixels.shape[0], TV_TABLES[size], roll_first=False)
