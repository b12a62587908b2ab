"""Plain ViT layouts that used to be refused or mismeasured: transformers families outside AttentionInterface
(Data2VecVision, BLIP, FLAVA), YOLOS' detection tokens after the patches, and CNN stems (timm's hybrid ViTs,
DPT-hybrid) whose tokens cover the stem's stride times the projection's.

The expected MAD is computed here from the model's own eager attention probabilities, with every token placed
by hand: ``P`` tokens without a position, the row-major grid at ``(row + 0.5) * stride``, then the trailing
tokens without a position.
"""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")
timm = pytest.importorskip("timm")

import vitmad  # noqa: E402
from conftest import sharpened  # noqa: E402

RECORD_TOL = {"rtol": 1e-5, "atol": 1e-4}  # float32 softmax from two kernels; atol in pixels
SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)


def _expected_mad(attn: torch.Tensor, grid: tuple[int, int], stride: float | tuple[float, float], prefix: int,
                  suffix: int):
    """[B, H] MAD of eager maps [B, H, N, N] by the definition, in float64, tokens placed by hand; ``stride``
    in pixels, or (down, across) for non-square patches."""
    rows, cols = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
    step = torch.tensor(stride if isinstance(stride, tuple) else (stride, stride), dtype=torch.float64)
    centres = (torch.stack([rows, cols], -1).reshape(-1, 2).double() + 0.5) * step
    distance = torch.cdist(centres, centres)
    patches = slice(prefix, attn.shape[-1] - suffix)
    assert attn.shape[-1] == prefix + grid[0] * grid[1] + suffix
    on_patches = attn.double()[..., patches, patches]
    return (on_patches * distance).sum(-1).mean(-1)


def _hf_eager_maps(model, pixels, **kwargs) -> list[torch.Tensor]:
    # Built anew in eager mode with the same weights: families outside AttentionInterface choose their attention
    # class at construction (Data2VecVisionSdpaSelfAttention returns no maps).
    config = copy.deepcopy(model.config)
    config._attn_implementation = "eager"
    eager = type(model)(config).eval()
    eager.load_state_dict(model.state_dict())
    with torch.no_grad():
        return list(eager(pixels, output_attentions=True, **kwargs).attentions)


def _dpt_hybrid():
    # A small BiT (GroupNorm of 32 groups: bottleneck widths of 32 channels and more); its stem has stride 16 and
    # the 1x1 projection keeps it: 4x4 tokens of 16 px after CLS at 64 px.
    backbone = dict(model_type="bit", global_padding="same", layer_type="bottleneck", depths=[1, 1, 1],
                    out_features=["stage1", "stage2", "stage3"], embedding_dynamic_padding=True,
                    hidden_sizes=[128, 256, 512], embedding_size=32)
    return transformers.DPTModel(transformers.DPTConfig(
        **SMALL, image_size=64, patch_size=16, is_hybrid=True, backbone_config=backbone,
        backbone_featmap_shape=[1, 512, 4, 4], neck_hidden_sizes=[32, 32, 32, 32]))


HF_CASES = {
    # name -> (model builder, input size, grid, stride, prefix, suffix)
    "data2vec_vision": (lambda: transformers.Data2VecVisionModel(transformers.Data2VecVisionConfig(
        **SMALL, image_size=32, patch_size=8, use_relative_position_bias=True)), (32, 32), (4, 4), 8, 1, 0),
    "blip_vision": (lambda: transformers.BlipVisionModel(transformers.BlipVisionConfig(
        **SMALL, image_size=32, patch_size=8)), (32, 32), (4, 4), 8, 1, 0),
    "flava_image": (lambda: transformers.FlavaImageModel(transformers.FlavaImageConfig(
        **SMALL, image_size=32, patch_size=8)), (32, 32), (4, 4), 8, 1, 0),
    "yolos_detection_tokens_last": (lambda: transformers.YolosModel(transformers.YolosConfig(
        **SMALL, image_size=[24, 40], patch_size=8, num_detection_tokens=3)), (24, 40), (3, 5), 8, 1, 3),
    "dpt_hybrid_bit_stem": (_dpt_hybrid, (64, 64), (4, 4), 16, 1, 0),
}


@pytest.mark.parametrize("wrapped", [False, True], ids=["bare", "in_sequential"])
@pytest.mark.parametrize("case", list(HF_CASES))
def test_transformers_plain_layouts_match_eager_maps(case, wrapped):
    """Also inside an nn.Sequential (QA 334: YOLOS' detection tokens, read from the root's config, were taken for
    prefix tokens there, every patch 3 tokens off)."""
    build, size, grid, stride, prefix, suffix = HF_CASES[case]
    torch.manual_seed(0)
    model = build().eval()
    recorded_model = torch.nn.Sequential(model) if wrapped else model
    pixels = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = model(pixels).last_hidden_state
        with vitmad.record(recorded_model) as rec:
            recorded = recorded_model(pixels).last_hidden_state
    torch.testing.assert_close(recorded, plain, rtol=0, atol=0)
    maps = _hf_eager_maps(model, pixels)
    expected = torch.stack([_expected_mad(a, grid, stride, prefix, suffix) for a in maps])
    assert len(rec.layers) == len(maps) == 2
    assert [g.grid for g in rec.geometry] == [grid] * 2 and rec.geometry[0].stride == (stride, stride)
    # The tokens without a position on either side of the grid, as the prefix maps' rows count them.
    assert [(g.num_prefix_tokens, g.num_suffix_tokens or 0) for g in rec.geometry] == [(prefix, suffix)] * 2
    assert ("num_suffix_tokens" in rec.geometry[0].as_dict()) == bool(suffix)
    torch.testing.assert_close(rec.mad.double(), expected, **RECORD_TOL)


def test_xclip_message_tokens_are_placed_after_the_grid_and_their_attention_across_frames_skipped():
    """X-CLIP's cross-frame blocks append each frame's message token to [CLS, patches] before the self-attention
    (was counted as a second token before the grid: every patch measured at the previous one's cell), and attend
    across a video's frames between those message tokens first (no position on the image: skipped, was refused
    with advice that led to a grid read from frames)."""
    torch.manual_seed(0)
    config = transformers.XCLIPVisionConfig(**SMALL, image_size=32, patch_size=8, num_frames=2, mit_hidden_size=32,
                                            mit_intermediate_size=64)
    model = transformers.XCLIPVisionModel(config).eval()
    with torch.no_grad():  # weights of unit gain: attention far from uniform, so a shifted grid shows
        for module in model.modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
                module.weight.normal_(0.0, 3 * module.weight[0].numel() ** -0.5)
    frames = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))  # 2 videos of 2 frames
    with torch.no_grad(), vitmad.record(model) as rec:
        model(frames)
    assert rec.layers == ["encoder.layers.0.self_attn", "encoder.layers.1.self_attn"]
    assert set(rec.skipped) == {f"encoder.layers.{i}.message_attn" for i in (0, 1)}
    assert "message tokens (X-CLIP)" in rec.skipped["encoder.layers.0.message_attn"]
    maps = _hf_eager_maps(model, frames)
    assert all(a.shape[-1] == 1 + 16 + 1 for a in maps)  # CLS, 4x4 patches, the message token
    expected = torch.stack([_expected_mad(a, (4, 4), 8, 1, 1) for a in maps])
    assert [(g.num_prefix_tokens, g.num_suffix_tokens) for g in rec.geometry] == [(1, 1)] * 2
    torch.testing.assert_close(rec.mad.double(), expected, **RECORD_TOL)


def test_xclip_with_as_many_frames_as_patches_is_recorded():
    """QA 429: the rule refusing a user's clip model whose frames (folded into the batch) are as many as each frame's
    patches refused X-CLIP at 4 frames of 2 x 2 patches, whose layers over frames its family skips. A library's
    layers are placed as before: equal to its vision tower recorded on the folded frames."""
    torch.manual_seed(0)
    vision = dict(image_size=32, patch_size=16, num_frames=4, hidden_size=32, num_hidden_layers=1,
                  num_attention_heads=2, intermediate_size=64, mit_hidden_size=32, mit_intermediate_size=64,
                  mit_num_hidden_layers=1, mit_num_attention_heads=2)
    text = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=100)
    model = transformers.XCLIPModel(transformers.XCLIPConfig(
        vision_config=vision, text_config=text, projection_dim=32, prompt_layers=1, prompt_attention_heads=2,
        prompt_projection_dim=32, prompt_num_attention_heads=2)).eval()
    clips, ids = torch.randn(2, 4, 3, 32, 32), torch.randint(0, 100, (2, 5))
    with torch.no_grad(), vitmad.record(model) as rec:
        model(input_ids=ids, pixel_values=clips)
    assert rec.layers == ["vision_model.encoder.layers.0.self_attn"]
    with torch.no_grad(), vitmad.record(model.vision_model) as tower:
        model.vision_model(clips.flatten(0, 1))
    torch.testing.assert_close(rec.mad, tower.mad, rtol=0, atol=0)

    class Head(torch.nn.Module):  # a user's wrapper (QA 432: refused as a clip model of its own)
        def __init__(self):
            super().__init__()
            self.xclip = model

        def forward(self, input_ids, pixel_values):
            return self.xclip(input_ids=input_ids, pixel_values=pixel_values).logits_per_video

    wrapper = Head().eval()
    with torch.no_grad(), vitmad.record(wrapper) as wrapped:
        wrapper(ids, clips)
    assert wrapped.layers == ["xclip.vision_model.encoder.layers.0.self_attn"]
    torch.testing.assert_close(wrapped.mad, tower.mad, rtol=0, atol=0)


def test_xclip_frame_integration_transformer_is_no_image_layer_whatever_layout_is_stated():
    """X-CLIP's multi-frame integration transformer attends over one pooled token per frame: named in ``layers=``
    with a grid or positions stated, it was recorded as an image's grid (QA 357). It is skipped with its reason, as
    PE-Video's temporal encoder is, so a recording of it alone has no layer."""
    torch.manual_seed(0)
    vision = dict(SMALL, image_size=32, patch_size=8, num_frames=4, mit_hidden_size=32, mit_intermediate_size=32,
                  mit_num_hidden_layers=1, mit_num_attention_heads=2)
    text = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, vocab_size=99,
                max_position_embeddings=16)
    model = transformers.XCLIPModel(transformers.XCLIPConfig(
        text_config=text, vision_config=vision, projection_dim=32, prompt_layers=1, prompt_attention_heads=2,
        prompt_projection_dim=32)).eval()
    for layout in ({"num_prefix_tokens": 0, "grid": [2, 2], "patch": 8}, {"positions": torch.rand(4, 2) * 32}):
        with pytest.raises(ValueError, match=r"mit\.encoder\.layers\.0\.self_attn: attention over a "
                                               r"video's frames \(X-CLIP's multi-frame integration"):
            with torch.no_grad(), vitmad.record(model, layers=["mit.*"], **layout):
                model(input_ids=torch.randint(1, 98, (2, 5)), pixel_values=torch.randn(2, 4, 3, 32, 32))


def _timm_eager_maps(model, pixels) -> list[torch.Tensor]:
    """The attention probabilities of each block of a copy of timm ``model`` on its explicit (unfused) path."""
    eager, maps = copy.deepcopy(model), []
    for block in eager.blocks:
        block.attn.fused_attn = False
        block.attn.attn_drop.register_forward_pre_hook(lambda _, args: maps.append(args[0]))
    with torch.no_grad():
        eager(pixels)
    return maps


@pytest.mark.parametrize("size", [(96, 96), (64, 128)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_timm_hybrid_vit_measures_in_input_pixels(size):
    # vit_tiny_r_s16_p8: a ResNet stem of stride 4, then 8x8 patches: each token covers 32 px of the image.
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_r_s16_p8_224", pretrained=False, img_size=96, depth=2,
                              dynamic_img_size=True).eval()
    pixels = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = model(pixels)
        with vitmad.record(model) as rec:
            recorded = model(pixels)
    torch.testing.assert_close(recorded, plain, rtol=0, atol=0)
    grid = (size[0] // 32, size[1] // 32)
    expected = torch.stack([_expected_mad(a, grid, 32, 1, 0) for a in _timm_eager_maps(model, pixels)])
    assert [g.stride for g in rec.geometry] == [(32.0, 32.0)] * 2
    torch.testing.assert_close(rec.mad.double(), expected, **RECORD_TOL)


@pytest.mark.parametrize(("variant", "size", "stride", "grid"), [
    # A ResNet-50 stem of stride 16 (1 x 1 patches) at 232 px: 15 cells, each 16 px of the image, not 232 / 15.
    ("vit_base_r50_s16_224", (232, 232), 16, (15, 15)),
    # A ResNet-26 stem of stride 32 at 200 x 136 px: 7 x 5 cells of 32 px (were 29 x 27 px apart).
    ("vit_small_r26_s32_224", (200, 136), 32, (7, 5)),
], ids=["r50-232", "r26-200x136"])
def test_timm_hybrid_vit_stem_that_rounds_its_maps_keeps_its_stride(variant, size, stride, grid):
    """A stem whose maps round up (232 -> 116 -> 58 -> 29 -> 15): the token stride is the product of the strides
    the image went through, not the rounded ratio of the image to the stem's output (was: 6 to 9 % too small a
    MAD, silently)."""
    torch.manual_seed(0)
    model = sharpened(timm.create_model(variant, pretrained=False, img_size=224, depth=1, num_heads=2, embed_dim=32,
                                        dynamic_img_size=True))
    pixels = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), vitmad.record(model) as rec:
        model(pixels)
    expected = torch.stack([_expected_mad(a, grid, stride, 1, 0) for a in _timm_eager_maps(model, pixels)])
    assert [(g.grid, g.stride) for g in rec.geometry] == [(grid, (float(stride), float(stride)))]
    torch.testing.assert_close(rec.mad.double(), expected, **RECORD_TOL)


def _bit_fixed_stem_vit():
    """A ViT on a BiT "fixed" stem (stride-2 convolution, ConstantPad2d(1), max pool of stride 2 without padding),
    1 x 1 patches: the pad, which no hook sees, grows the map between the two strided modules."""
    import functools

    from timm.layers import HybridEmbed
    from timm.models.resnetv2 import ResNetV2
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    stem = ResNetV2(layers=(), stem_type="fixed", num_classes=0, global_pool="", preact=False)
    embed = functools.partial(HybridEmbed, backbone=stem)
    return sharpened(VisionTransformer(img_size=64, patch_size=1, embed_dim=16, depth=1, num_heads=2,
                                       dynamic_img_size=True, embed_layer=embed))


@pytest.mark.parametrize(("make", "size", "stride", "grid"), [
    # 66 -> 33, padded to 35 -> 17 (70 -> 35 -> 37 -> 18): 4 px per token (was refused after the chain, and right
    # before it by the rounded ratio).
    (_bit_fixed_stem_vit, (66, 70), 4, (17, 18)),
    # A stem of stride 4 gives 12 cells of 48 px, which HybridEmbed pads to 16 for its 8 x 8 patches: 2 tokens,
    # 32 px apart (was 24 px: 48 / 2).
    (lambda: sharpened(timm.create_model("vit_tiny_r_s16_p8_224", pretrained=False, img_size=224, depth=1,
                                         dynamic_img_size=True, dynamic_img_pad=True)), (48, 48), 32, (2, 2)),
], ids=["bit-fixed-stem-66x70", "dynamic-img-pad-48"])
def test_timm_hybrid_vit_stem_padded_before_a_pool_or_the_embedding(make, size, stride, grid):
    model = make()
    pixels = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), vitmad.record(model) as rec:
        model(pixels)
    expected = torch.stack([_expected_mad(a, grid, stride, 1, 0) for a in _timm_eager_maps(model, pixels)])
    assert [(g.grid, g.stride) for g in rec.geometry] == [(grid, (float(stride), float(stride)))] * len(rec.layers)
    torch.testing.assert_close(rec.mad.double(), expected, **RECORD_TOL)


def test_a_stem_vitmad_cannot_follow_is_refused():
    """A crop between the stem and the patch embedding: the map the embedding sees is no map the strided modules
    made, and no stride is guessed from the ratio of the sizes."""
    import functools

    from timm.layers import HybridEmbed
    from timm.models.vision_transformer import VisionTransformer

    class CroppingStem(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 3, 2, 1)

        def forward(self, x):
            y = self.conv(x)
            return y[..., : y.shape[-2] // 2, : y.shape[-1] // 2]

    torch.manual_seed(0)
    model = VisionTransformer(img_size=32, patch_size=1, embed_dim=16, depth=1, num_heads=2, dynamic_img_size=True,
                              embed_layer=functools.partial(HybridEmbed, backbone=CroppingStem())).eval()
    with pytest.raises(ValueError, match=r"take the image height of 64 to 32, but the embedding sees 16 .*"
                                         r"pass patch=<pixels per token>"):
        with torch.no_grad(), vitmad.record(model):
            model(torch.randn(1, 3, 64, 48))


def test_timm_vit_with_non_square_patches_is_measured_on_its_cells():
    """patch_size=(16, 8): refused with advice (pass patch=) that gave wrong numbers (patch=16: 60.8 px for 34.4)."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(img_size=(64, 64), patch_size=(16, 8), embed_dim=32, depth=2, num_heads=2,
                              dynamic_img_size=True, num_classes=0).eval()
    pixels = torch.randn(2, 3, 48, 88, generator=torch.Generator().manual_seed(1))  # 3 x 11 cells of 16 x 8 px
    with torch.no_grad(), vitmad.record(model) as rec:
        model(pixels)
    expected = torch.stack([_expected_mad(a, (3, 11), (16.0, 8.0), 1, 0) for a in _timm_eager_maps(model, pixels)])
    assert [(g.grid, g.stride) for g in rec.geometry] == [((3, 11), (16.0, 8.0))] * 2
    assert rec.layout is None  # no one patch size: read rec.geometry
    torch.testing.assert_close(rec.mad.double(), expected, **RECORD_TOL)


@pytest.mark.parametrize("frames, bins", [(64, 48), (57, 37)])
def test_audio_spectrogram_transformer_on_its_stride_cells(frames, bins):
    """AST: 16 x 16 patches every 10 bins (overlapping), CLS and distillation first; a token stands for its stride
    cell, so tokens 10 bins apart along frequency (rows) and time (columns) are 10 units apart."""
    config = transformers.ASTConfig(**SMALL, patch_size=16, frequency_stride=10, time_stride=10, max_length=frames,
                                    num_mel_bins=bins, initializer_range=0.3)
    torch.manual_seed(0)
    model = transformers.ASTModel(config).eval()
    spectrogram = torch.randn(2, frames, bins)
    with torch.no_grad(), vitmad.record(model) as rec:
        model(spectrogram)
    grid = ((bins - 16) // 10 + 1, (frames - 16) // 10 + 1)  # frequency rows, time columns
    assert rec.geometry[0].grid == grid and rec.geometry[0].stride == (10.0, 10.0)
    model.set_attn_implementation("eager")
    with torch.no_grad():
        maps = model(spectrogram, output_attentions=True).attentions
    for layer, attn in enumerate(maps):
        torch.testing.assert_close(rec.mad[layer].double(), _expected_mad(attn, grid, 10.0, 2, 0), **RECORD_TOL)


def test_tokens_a_hook_appends_after_a_timm_grid_are_refused_unless_placed():
    """A timm ViT declares its extra tokens (num_prefix_tokens): tokens a user's hook adds after the grid were
    counted as prefix tokens (every patch then one place off: 25.68 px for 25.72 in helper-55's reproduction); now
    refused with the way out, and measured right with positions= placing them."""
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, depth=2).eval()
    trailing = torch.randn(1, 3, model.embed_dim)
    model.pos_drop.register_forward_hook(lambda _, args, out: torch.cat([out, trailing.expand(len(out), -1, -1)], 1))
    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), vitmad.record(model) as rec:
        with pytest.raises(ValueError, match=r"the 4x4 = 16 patches of the patch embedding leave 4 extra tokens, but "
                                             r"VisionTransformer declares num_prefix_tokens=1"):
            model(pixels)
    rows, cols = torch.meshgrid(torch.arange(4.0), torch.arange(4.0), indexing="ij")
    cells = (torch.stack([rows, cols], -1).reshape(16, 2) + 0.5) * 16
    nan = torch.full((1, 2), float("nan"))
    positions = torch.cat([nan, cells, nan.expand(3, 2)])
    with torch.no_grad(), vitmad.record(model, positions=positions) as rec:
        model(pixels)
    expected = torch.stack([_expected_mad(a, (4, 4), 16, 1, 3) for a in _timm_eager_maps(model, pixels)])
    torch.testing.assert_close(rec.mad.double(), expected, **RECORD_TOL)


class _EncoderDecoder(torch.nn.Module):
    """No patch embedding (a 9 x 9 convolution of stride 8): an encoder attends over the 4 x 3 map of a 32 x 24
    image, then a decoder among 20 learned queries, as a detector's (PP-DocLayout's before its family was known)."""

    def __init__(self):
        super().__init__()
        from timm.layers import Attention

        self.stem = torch.nn.Conv2d(3, 16, kernel_size=9, stride=8, padding=4)
        self.encoder = Attention(16, num_heads=2)
        self.queries = torch.nn.Parameter(torch.randn(1, 20, 16))
        self.decoder = Attention(16, num_heads=2)

    def forward(self, pixels):
        tokens = self.stem(pixels).flatten(2).transpose(1, 2)
        tokens = tokens + self.encoder(tokens)
        return self.decoder(self.queries.expand(len(tokens), -1, -1) + tokens.mean(1, keepdim=True)), tokens


def test_a_grid_given_by_hand_refuses_layers_of_one_call_over_other_token_counts():
    """With grid= given and num_prefix_tokens unset, each layer's extra tokens are its tokens less the grid's cells:
    the decoder's 20 queries were taken for 8 extra tokens and a 4 x 3 grid and measured (found by QA). Layers of one
    call that count differently cannot all be [extra tokens][that grid]: refused; named alone, the encoder is
    placed."""
    torch.manual_seed(0)
    model = sharpened(_EncoderDecoder())
    pixels = torch.randn(2, 3, 32, 24, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), vitmad.record(model, patch=8, grid=[4, 3]):
        with pytest.raises(ValueError, match=r"decoder \(Attention\).*it attends over 20 tokens, 8 more than the "
                                             r"given grid=\[4, 3\] has cells, but a layer recorded before it in this "
                                             r"call attends over 12 \(0 more\).*pass layers="):
            model(pixels)
    maps = []
    model.encoder.fused_attn = False
    model.encoder.attn_drop.register_forward_pre_hook(lambda _, args: maps.append(args[0]))
    with torch.no_grad():
        plain = model(pixels)
        with vitmad.record(model, layers=["encoder"], patch=8, grid=[4, 3]) as rec:
            recorded = model(pixels)
    assert all(torch.equal(a, b) for a, b in zip(plain, recorded))
    assert rec.layers == ["encoder"] and rec.geometry[0].num_prefix_tokens == 0
    torch.testing.assert_close(rec.mad[0].double(), _expected_mad(maps[0], (4, 3), 8, 0, 0), **RECORD_TOL)


class _ClassTokenLast(torch.nn.Module):
    """A user's ViT: an 8 px patch convolution, then the patches and its class token LAST, one SDPA layer."""

    def __init__(self, dim=16, heads=2):
        super().__init__()
        self.heads = heads
        self.embed = torch.nn.Conv2d(3, dim, 8, 8)
        self.cls = torch.nn.Parameter(torch.randn(1, 1, dim))
        self.qkv = torch.nn.Linear(dim, 3 * dim)

    def forward(self, pixels):
        tokens = self.embed(pixels).flatten(2).transpose(1, 2)
        tokens = torch.cat([tokens, self.cls.expand(len(tokens), -1, -1)], 1)
        b, n, c = tokens.shape
        q, k, v = self.qkv(tokens).view(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)


def test_extra_tokens_of_a_model_of_no_library_are_said_to_be_taken_first():
    """Where a user's model keeps its extra tokens is declared nowhere: taken first, as a ViT's class token, a class
    token last moved every patch one cell and doubled the MAD, silently (QA helper-247). That reading is said once
    per recording, naming positions= for another layout and num_prefix_tokens= to confirm it."""
    torch.manual_seed(0)
    model = _ClassTokenLast().eval()
    pixels = torch.randn(2, 3, 24, 32)
    with pytest.warns(UserWarning, match=r"_ClassTokenLast attends over 13 tokens and its patch embedding embed cuts "
                                         r"3x4 = 12: the 1 extra token\(s\) are taken to come first") as said:
        with torch.no_grad(), vitmad.record(model) as rec:
            model(pixels)
            model(pixels)
    assert len(said) == 1 and rec.geometry[0].num_prefix_tokens == 1
    cells = torch.cartesian_prod(torch.arange(3.0), torch.arange(4.0)) * 8 + 4
    positions = torch.cat([cells, torch.full((1, 2), float("nan"))])
    with torch.no_grad(), vitmad.record(model, positions=positions) as placed:
        model(pixels)
    with torch.no_grad(), vitmad.record(model, num_prefix_tokens=1) as confirmed:
        model(pixels)  # said by the user: no warning
    assert torch.equal(confirmed.mad, rec.mad) and not torch.equal(placed.mad, rec.mad)


class _TimmPartsLateRegisters(torch.nn.Module):
    """A user's ViT of timm parts (PatchEmbed, as MAE's code builds it): its class token after the patches, then
    two registers appended after the grid before its second layer."""

    def __init__(self, dim=16):
        super().__init__()
        from timm.layers import PatchEmbed

        self.patch_embed = PatchEmbed(img_size=None, patch_size=8, in_chans=3, embed_dim=dim, strict_img_size=False)
        self.cls = torch.nn.Parameter(torch.randn(1, 1, dim))
        self.registers = torch.nn.Parameter(torch.randn(1, 2, dim))
        self.layers = torch.nn.ModuleList(_UserAttention(dim, 2) for _ in range(2))

    def forward(self, pixels):
        tokens = self.patch_embed(pixels)
        tokens = torch.cat([tokens, self.cls.expand(len(tokens), -1, -1)], 1)
        tokens = self.layers[0](tokens)
        return self.layers[1](torch.cat([tokens, self.registers.expand(len(tokens), -1, -1)], 1))


def test_extra_tokens_are_said_for_a_model_of_library_parts_and_again_for_another_count():
    """A user's ViT built of timm's PatchEmbed was taken for timm's (the embedding's own module is timm's): its class
    token last was read as first without a word. Registers appended part-way through moved the patches under the
    one warning of the first layer's single extra token (QA 325). Each count of extra tokens is said now."""
    torch.manual_seed(0)
    model = _TimmPartsLateRegisters().eval()
    with pytest.warns(UserWarning, match="extra token") as said, torch.no_grad(), vitmad.record(model):
        model(torch.randn(1, 3, 24, 32))
    assert [str(w.message).split(": the ")[1][:1] for w in said if "extra token" in str(w.message)] == ["1", "3"]


def test_a_volume_model_of_no_known_layout_is_told_three_coordinates():
    """A user's 3-D model (a Conv3d cutting the volume) was told positions=<[N, 2] ...> (QA helper-247)."""

    class Volume(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Conv3d(1, 8, 4, 4)
            self.qkv = torch.nn.Linear(8, 24)

        def forward(self, volume):
            tokens = self.embed(volume).flatten(2).transpose(1, 2)
            q, k, v = self.qkv(tokens).view(*tokens.shape[:2], 3, 2, 4).permute(2, 0, 3, 1, 4)
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    model = Volume().eval()
    with pytest.raises(ValueError, match=r"pass positions=<\[N, 3\] position of each token on the volume \(slice, "
                                         r"row, column\)>"):
        with torch.no_grad(), vitmad.record(model, layers=[""]):
            model(torch.randn(1, 1, 8, 8, 8))


class _UserAttention(torch.nn.Module):
    """SDPA attention that keeps its own float64 probabilities for the reference."""

    def __init__(self, dim: int = 32, heads: int = 4):
        super().__init__()
        self.heads, self.qkv, self.proj = heads, torch.nn.Linear(dim, 3 * dim), torch.nn.Linear(dim, dim)
        with torch.no_grad():
            self.qkv.weight[: 2 * dim] *= 5  # far from uniform attention

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        self.probabilities = (q.double() @ k.double().transpose(-1, -2) * (c // self.heads) ** -0.5).softmax(-1)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


def _check_users_vit(model, channels: int, size: tuple[int, int], grid: tuple[int, int], stride: int):
    """Record ``model`` (a ``_UserAttention`` at ``model.attn``) on 2 random images: one global layer on ``grid`` at
    ``stride`` px, its MAD that of the model's own float64 probabilities on that grid."""
    with torch.no_grad(), vitmad.record(model) as rec:
        model(torch.randn(2, channels, *size, generator=torch.Generator().manual_seed(1)))
    assert [(g.grid, g.stride) for g in rec.geometry] == [(grid, (float(stride), float(stride)))]
    torch.testing.assert_close(rec.mad[0].double(), _expected_mad(model.attn.probabilities, grid, stride, 0, 0),
                               **RECORD_TOL)


class _EarlyConvViT(torch.nn.Module):
    """A user's ViT after "Early convolutions help transformers see better": 3x3 convolutions of stride 2 (as many
    as ``strided``), then a module named patch_embed with a 1x1 projection (declared before the stem where
    ``stem_last``: it runs after it all the same)."""

    def __init__(self, strided: int, stem_last: bool = False):
        super().__init__()
        widths = [3] + [8 * 2 ** i for i in range(strided)]
        stem = torch.nn.Sequential(*[layer for i in range(strided) for layer in (
            torch.nn.Conv2d(widths[i], widths[i + 1], 3, 2, 1), torch.nn.ReLU())])
        if not stem_last:
            self.stem = stem
        self.patch_embed = torch.nn.Module()
        self.patch_embed.proj = torch.nn.Conv2d(widths[-1], 32, 1)
        if stem_last:
            self.stem = stem
        self.attn = _UserAttention()

    def forward(self, x):
        return self.attn(self.patch_embed.proj(self.stem(x)).flatten(2).transpose(1, 2))


@pytest.mark.parametrize("strided, stem_last", [(1, False), (4, False), (2, True)])
def test_a_users_stem_before_a_module_named_patch_embed_keeps_its_stride(strided, stem_last):
    """The first convolution inside a module named patch_embed was taken to say the image's channels (as timm's
    VOLO's stem does): here the stem's, so a convolution part-way through the stem, or the projection itself, was
    taken for the one on the image, and the stem's stride was left out: MAD 2x (one strided convolution) to 4x (four)
    too low, silently (QA 325); with the stem declared after patch_embed too (QA 326)."""
    torch.manual_seed(0)
    stride = 2 ** strided
    _check_users_vit(_EarlyConvViT(strided, stem_last).eval(), 3, (96, 128), (96 // stride, 128 // stride), stride)


class _GatedAttention(_UserAttention):
    """SDPA attention weighted per token by a softmax gate over its heads, ``[B, N, H]``, taken before or after."""

    def __init__(self, gate_first: bool, dim: int = 32, heads: int = 4):
        super().__init__(dim, heads)
        self.gate_first, self.router = gate_first, torch.nn.Linear(dim, heads)

    def forward(self, x):
        gate = self.router(x).softmax(-1) if self.gate_first else None
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        self.probabilities = (q.double() @ k.double().transpose(-1, -2) * (c // self.heads) ** -0.5).softmax(-1)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        gate = self.router(x).softmax(-1) if gate is None else gate
        return self.proj((out * gate.transpose(1, 2)[..., None]).transpose(1, 2).reshape(b, n, c))


@pytest.mark.parametrize("gate_first", [True, False])
def test_a_softmax_gate_beside_the_fused_attention_is_not_its_attention(gate_first):
    """The gate's [B, N, H] softmax was placed as the module's attention and refused the layer ("its attention has
    shape [1, 36, 4]"), though the module's SDPA call is its attention (QA 325)."""
    torch.manual_seed(0)
    embed, attention = torch.nn.Conv2d(3, 32, 8, 8), _GatedAttention(gate_first)
    model = torch.nn.Sequential(embed, torch.nn.Flatten(2), _Transposed(), attention).eval()
    with torch.no_grad(), vitmad.record(model) as rec:
        model(torch.randn(2, 3, 48, 40))
    assert rec.layers == ["3"] and rec.geometry[0].grid == (6, 5)
    torch.testing.assert_close(rec.mad[0].double(), _expected_mad(attention.probabilities, (6, 5), 8, 0, 0),
                               **RECORD_TOL)


class _Transposed(torch.nn.Module):
    def forward(self, x):
        return x.transpose(1, 2)


class _GrayViTWithTokenConvolution(torch.nn.Module):
    """A user's grayscale ViT whose depthwise position-encoding convolution over the tokens is declared before its
    patch embedding."""

    def __init__(self, dim: int = 32):
        super().__init__()
        self.position_conv = torch.nn.Conv2d(dim, dim, 3, 1, 1, groups=dim)
        self.patch_embed = torch.nn.Module()
        self.patch_embed.proj = torch.nn.Conv2d(1, dim, 8, 8)
        self.attn = _UserAttention(dim)

    def forward(self, x):
        grid = self.patch_embed.proj(x)
        return self.attn((grid + self.position_conv(grid)).flatten(2).transpose(1, 2))


def test_a_grayscale_users_vit_with_a_token_convolution_declared_first_starts_at_its_patch_embedding():
    """Its channels were said by its patch embedding, 1; taken for 3 once the stem rule came (QA 325), no convolution
    took the image, the token convolution started each call, and the layer was refused (QA 326)."""
    torch.manual_seed(0)
    _check_users_vit(_GrayViTWithTokenConvolution().eval(), 1, (48, 64), (6, 8), 8)


def test_a_library_vit_whose_model_holds_its_patch_convolution_is_not_warned_inside_a_wrapper():
    """torchvision's VisionTransformer holds conv_proj itself: with its embedding's own module no longer counted (a
    user's ViT of timm's PatchEmbed), a wrapper around it was warned its class token is taken to come first (QA
    326)."""
    import warnings

    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    vit = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=1, num_heads=2, hidden_dim=16,
                                               mlp_dim=32).eval()
    wrapper = torch.nn.Sequential(vit)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad(), vitmad.record(wrapper) as rec:
            wrapper(torch.randn(1, 3, 32, 32))
    assert rec.geometry[0].num_prefix_tokens == 1


class _Stage(torch.nn.ModuleList):
    """A list of blocks with a forward of its own (as kornia's DINOv2 BlockChunk)."""

    def forward(self, x):
        for block in self:
            x = block(x)
        return x


def test_a_module_list_with_a_forward_of_its_own_named_in_layers_is_a_layer():
    """layers= naming a plain ModuleList is refused (it runs no forward); one that defines its forward runs its
    blocks there, and was refused too, with that untrue reason (QA 326)."""
    torch.manual_seed(0)
    embed, attention = torch.nn.Conv2d(3, 32, 8, 8), _UserAttention()
    model = torch.nn.Sequential(embed, torch.nn.Flatten(2), _Transposed(), _Stage([attention])).eval()
    with torch.no_grad(), vitmad.record(model, layers=["3"]) as rec:
        model(torch.randn(1, 3, 32, 40))
    assert rec.layers == ["3"]
    torch.testing.assert_close(rec.mad[0].double(), _expected_mad(attention.probabilities, (4, 5), 8, 0, 0),
                               **RECORD_TOL)
    with pytest.raises(ValueError, match=r"names '3', a ModuleList of Sequential: a container"):
        vitmad.record(torch.nn.Sequential(embed, torch.nn.Flatten(2), _Transposed(), torch.nn.ModuleList([attention])),
                      layers=["3"])


class _MultispectralViT(torch.nn.Module):
    """A user's 13-band ViT that also embeds a band it derives (an index of two bands) with a 1-channel convolution,
    declared first."""

    def __init__(self, dim: int = 32):
        super().__init__()
        self.index_embed = torch.nn.Conv2d(1, dim, 8, 8)
        self.patch_embed = torch.nn.Module()
        self.patch_embed.proj = torch.nn.Conv2d(13, dim, 8, 8)
        self.attn = _UserAttention(dim)

    def forward(self, x):
        index = (x[:, 7:8] - x[:, 3:4]) / (x[:, 7:8].abs() + x[:, 3:4].abs() + 1)
        tokens = self.patch_embed.proj(x) + self.index_embed(index)
        return self.attn(tokens.flatten(2).transpose(1, 2))


def test_a_multispectral_users_vit_with_a_one_band_convolution_takes_its_13_bands():
    """With the stem rule reading any convolution of at most 4 channels as the image's (QA 326), the 1-channel
    convolution of a derived band was taken for the one on the image: the layer refused, profile refused the 13-band
    input (QA 328). Only convolutions that chain to the patch embedding's channels are a stem."""
    torch.manual_seed(0)
    _check_users_vit(_MultispectralViT().eval(), 13, (32, 40), (4, 5), 8)


class _MergedHeadsAttention(torch.nn.Module):
    """Explicit attention with batch and heads merged ([B * H, N, N]: not placeable), counting its forwards past the
    softmax and returning nothing (it writes into the buffer it is given)."""

    def __init__(self, dim: int = 32, heads: int = 4):
        super().__init__()
        self.heads, self.qkv, self.past_softmax = heads, torch.nn.Linear(dim, 3 * dim), 0

    def forward(self, x, out):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        merged = (q.reshape(b * self.heads, n, -1) @ k.reshape(b * self.heads, n, -1).transpose(-1, -2)).softmax(-1)
        self.past_softmax += 1
        out.copy_((merged @ v.reshape(b * self.heads, n, -1)).reshape(b, self.heads, n, -1).transpose(1, 2)
                  .reshape(b, n, c))


def test_an_unplaceable_softmax_of_a_module_without_fused_attention_is_refused_where_it_is_taken():
    """Deferred to the module's end for every module (QA 325), the refusal let its forward go on past the softmax,
    and was lost where the forward returned None, a misleading "none computed attention" in its place (QA 328)."""
    torch.manual_seed(0)
    embed, attention = torch.nn.Conv2d(3, 32, 8, 8), _MergedHeadsAttention()

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.attention = embed, attention

        def forward(self, x):
            tokens = self.embed(x).flatten(2).transpose(1, 2)
            out = torch.empty_like(tokens)
            self.attention(tokens, out)
            return out

    with pytest.raises(ValueError, match=r"attention \(_MergedHeadsAttention\) of Model: its attention has shape "
                                         r"\[8, 16, 16\] \(batch and heads merged"):
        model = Model().eval()
        with torch.no_grad(), vitmad.record(model):
            model(torch.randn(2, 3, 32, 32))
    assert attention.past_softmax == 0


class _StemOfTheTokensWidth(torch.nn.Module):
    """A user's ViT: a position-encoding convolution over the tokens (32 to 32) declared first, then a stem making
    32 channels at stride 2 and patch_embed's 4 px projection keeping 32: tokens 8 px apart."""

    def __init__(self, dim: int = 32):
        super().__init__()
        self.position_conv = torch.nn.Conv2d(dim, dim, 3, 1, 1, groups=dim)
        self.stem = torch.nn.Conv2d(3, dim, 3, 2, 1)
        self.patch_embed = torch.nn.Module()
        self.patch_embed.proj = torch.nn.Conv2d(dim, dim, 4, 4)
        self.attn = _UserAttention(dim)

    def forward(self, x):
        grid = self.patch_embed.proj(self.stem(x))
        return self.attn((grid + self.position_conv(grid)).flatten(2).transpose(1, 2))


def test_a_stem_is_found_past_a_token_convolution_of_the_same_width():
    """Chained back by channels from patch_embed's 32, the token convolution (32 from 32) declared first ended the
    search at 32, and the stem's stride was lost."""
    torch.manual_seed(0)
    _check_users_vit(_StemOfTheTokensWidth().eval(), 3, (48, 64), (6, 8), 8)


class _PrunedRegistersViT(torch.nn.Module):
    """A user's ViT with a class token and 8 registers that keeps the 28 patch tokens of largest norm after its
    first block (EViT-style pruning; ToMe's merging changes the count alike): 41, then 37 tokens on a 4 x 8 grid."""

    def __init__(self, dim=32):
        super().__init__()
        self.patch_embed = torch.nn.Conv2d(3, dim, 8, 8)
        self.tokens = torch.nn.Parameter(torch.randn(1, 9, dim))
        self.blocks = torch.nn.ModuleList(_UserAttention(dim, 4) for _ in range(2))

    def forward(self, pixels):
        patches = self.patch_embed(pixels).flatten(2).transpose(1, 2)
        x = self.blocks[0](torch.cat([self.tokens.expand(len(patches), -1, -1), patches], 1))
        kept = x[:, 9:].norm(dim=-1).topk(28, dim=1).indices.sort(dim=1).values
        x = torch.cat([x[:, :9], x[:, 9:].gather(1, kept[..., None].expand(-1, -1, x.shape[-1]))], 1)
        return self.blocks[1](x)


def test_a_layer_over_fewer_tokens_than_an_earlier_one_on_the_same_grid_is_refused():
    """QA 390: tokens pruned or merged between blocks of a model with registers still outnumber the grid's cells,
    and were placed as fewer extra tokens before the row-major grid (41, 37, 33 tokens on 32 cells: 9, 5, 1 extra
    tokens), under the extra-token warning alone, though no cell is a merged token's. The first layer is still
    recorded, on its own probabilities placed by hand."""
    torch.manual_seed(0)
    model = _PrunedRegistersViT().eval()
    pixels = torch.randn(2, 3, 32, 64)
    with pytest.raises(ValueError, match=r"blocks\.1 \(_UserAttention\) of _PrunedRegistersViT: it attends over 37 "
                                         r"tokens, fewer than the 41 a layer recorded before it in this call attends "
                                         r"over on the same 4x8 patch grid, and still more than its cells: patch "
                                         r"tokens merged or dropped"):
        with pytest.warns(UserWarning, match="the 9 extra token"), torch.no_grad(), vitmad.record(model):
            model(pixels)
    with pytest.warns(UserWarning, match="the 9 extra token"), torch.no_grad(), \
            vitmad.record(model, layers=["blocks.0"]) as rec:
        model(pixels)
    expected = _expected_mad(model.blocks[0].probabilities, (4, 8), 8, 9, 0)
    torch.testing.assert_close(rec.mad[0].double(), expected, **RECORD_TOL)


class _PatchHeadViT(torch.nn.Module):
    """A user's ViT whose head drops the class token and registers and attends over the patches alone (Segmenter's
    mask transformer, a refinement head): 37, 37, then 32 tokens on a 4 x 8 grid."""

    def __init__(self, dim=32):
        super().__init__()
        self.patch_embed = torch.nn.Conv2d(3, dim, 8, 8)
        self.tokens = torch.nn.Parameter(torch.randn(1, 5, dim))
        self.blocks = torch.nn.ModuleList(_UserAttention(dim, 4) for _ in range(2))
        self.head_blocks = torch.nn.ModuleList([_UserAttention(dim, 4)])

    def forward(self, pixels):
        patches = self.patch_embed(pixels).flatten(2).transpose(1, 2)
        x = torch.cat([self.tokens.expand(len(patches), -1, -1), patches], 1)
        for block in self.blocks:
            x = block(x)
        return self.head_blocks[0](x[:, 5:])


def test_a_head_over_the_patches_alone_after_layers_with_extra_tokens_is_recorded():
    """QA 394: the refusal of layers over fewer tokens than an earlier one (above) first refused this head, which
    drops every extra token: its tokens are the grid itself."""
    torch.manual_seed(0)
    model = _PatchHeadViT().eval()
    with pytest.warns(UserWarning, match="the 5 extra token"), torch.no_grad(), vitmad.record(model) as rec:
        model(torch.randn(2, 3, 32, 64))
    assert rec.layers == ["blocks.0", "blocks.1", "head_blocks.0"]
    assert [g.num_prefix_tokens for g in rec.geometry] == [5, 5, 0]
    for layer, module in enumerate([*model.blocks, model.head_blocks[0]]):
        prefix = 5 if layer < 2 else 0
        expected = _expected_mad(module.probabilities, (4, 8), 8, prefix, 0)
        torch.testing.assert_close(rec.mad[layer].double(), expected, **RECORD_TOL)


def test_a_timm_vit_with_registers_whose_patches_are_pruned_before_its_first_layer_is_refused():
    """QA 394: a timm ViT with a class token and 4 registers (num_prefix_tokens=5) whose first block drops the 4
    patch tokens of lowest norm before attending (EViT-style): every layer attends over 33 tokens on 32 cells, no
    count falls between layers, and 1 extra token was placed before the grid, the 4 registers on the first cells
    (24.5 px where 20.5 px is right). Fewer extra tokens than declared, but some, is refused."""
    import types

    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_224", pretrained=False, img_size=(32, 64), patch_size=8, depth=2,
                              reg_tokens=4, embed_dim=32, num_heads=2).eval()
    block = model.blocks[0]
    unpruned = type(block).forward

    def pruned(self, x):
        kept = x[:, 5:].norm(dim=-1).topk(28, dim=1).indices.sort(dim=1).values
        return unpruned(self, torch.cat([x[:, :5], x[:, 5:].gather(1, kept[..., None].expand(-1, -1, x.shape[-1]))],
                                        1))

    block.forward = types.MethodType(pruned, block)
    with pytest.raises(ValueError, match=r"blocks\.0\.attn \(Attention\) of VisionTransformer: it attends over 33 "
                                         r"tokens: the 4x8 = 32 patches of the patch embedding leave 1 extra tokens, "
                                         r"fewer than the num_prefix_tokens=5 VisionTransformer declares \(patch "
                                         r"tokens merged or pruned"):
        with torch.no_grad(), vitmad.record(model):
            model(torch.randn(2, 3, 32, 64))
