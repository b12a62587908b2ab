"""vitmad.record on transformers image encoders that no other test ran (QA helper h385 checked them by hand): I-JEPA,
ViT-MSN, Kosmos-2's vision tower (alone and in the whole Kosmos2Model), X-CLIP's vision tower and YOLOS at sizes they
were not built for (positions interpolated, non-square), Ovis2's vision tower (its built size), BridgeTower's vision
tower (``nn.MultiheadAttention`` fed sequence-first, its ``image_mask`` hiding keys) and BEiT as the backbone of
DPTForDepthEstimation (its relative position bias resized to the input's grid).

Tiny random-weight models, sharpened so that attention is far from uniform. The reference is each model's own
attention probabilities (its modeling file's ``eager_attention_forward``; for BridgeTower, whose
``nn.MultiheadAttention`` returns none, the softmax of its own queries and keys in float64), placed by the layout
written here from each embeddings' source: ``prefix`` tokens without a position, the patches row-major at
``((r + 0.5) * 8, (c + 0.5) * 8)`` px, then ``suffix`` tokens without a position (X-CLIP's message token, YOLOS'
detection tokens); reduced in float64 by conftest's ``statistics_reference``.
"""

from __future__ import annotations

import math

import pytest
import torch

import vitmad
from conftest import (
    FLOAT32_STAT_ATOL,
    check_prefix_and_grid,
    eager_attention_calls,
    grid_centres,
    record_both_reductions,
    run_hooked,
    sharpened,
    statistics_reference,
)
from vitmad.recording.recorder import NoLayerError

transformers = pytest.importorskip("transformers")
from test_record_more_towers import modeling, peaked  # noqa: E402

PATCH = 8
STATS = ["entropy", "prefix_mass", "prefix_maps"]
# MADs (pixels) from float32 attention against float64 on the same model's float32 probabilities or q / k.
TOL = {"rtol": 1e-5, "atol": 1e-4}
STAT_TOL = {"rtol": 1e-5, "atol": FLOAT32_STAT_ATOL}
SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
INTERPOLATE = {"interpolate_pos_encoding": True}


def positions(prefix: int, grid: tuple[int, int], suffix: int) -> torch.Tensor:
    """``[N, 2]`` px: ``prefix`` tokens without a position (NaN), the row-major grid's cell centres, ``suffix``
    tokens without a position."""
    nan = torch.full((1, 2), math.nan, dtype=torch.float64)
    return torch.cat([nan.expand(prefix, 2), grid_centres(grid, PATCH), nan.expand(suffix, 2)])


def _kosmos2_vision(**config):
    return modeling("kosmos2").Kosmos2VisionModel(transformers.Kosmos2VisionConfig(**config))


def _ovis2_vision(**config):
    return modeling("ovis2").Ovis2VisionModel(transformers.Ovis2VisionConfig(
        **config, hidden_stride=2, vocab_size=40, num_visual_indicator_tokens=5))


# name -> (modeling module, builder of config kwargs, built size, run size, images in the batch, forward kwargs,
# tokens before the grid, tokens after it, its attention layers)
TOWERS = {
    # No class token (IJepaEmbeddings: the patches alone).
    "ijepa": ("ijepa", lambda **c: transformers.IJepaModel(transformers.IJepaConfig(**c)), 32, (43, 61), 2,
              INTERPOLATE, 0, 0, "layers.{}.attention"),
    "vit_msn": ("vit_msn", lambda **c: transformers.ViTMSNModel(transformers.ViTMSNConfig(**c)), 32, (43, 61), 2,
                INTERPOLATE, 1, 0, "layers.{}.attention"),
    "kosmos2_vision": ("kosmos2", _kosmos2_vision, 32, (40, 56), 2, INTERPOLATE, 1, 0,
                       "model.encoder.layers.{}.self_attn"),
    # Its position embedding is a table of the built grid: the built size only.
    "ovis2_vision": ("ovis2", _ovis2_vision, 48, (48, 48), 2, {}, 0, 0, "transformer.encoder.layers.{}.attention"),
    # 2 videos of 3 frames: [class token, patches, the frame's message token] per frame; the message attention
    # across frames is no image layer.
    "xclip_vision": ("x_clip", lambda **c: transformers.XCLIPVisionModel(transformers.XCLIPVisionConfig(
        **c, num_frames=3, mit_hidden_size=32, mit_intermediate_size=64)), 32, (43, 61), 6, INTERPOLATE, 1, 1,
        "encoder.layers.{}.self_attn"),
    # Built 24 x 40, run 48 x 32 (YolosEmbeddings interpolates its positions to any input): the class token, the
    # patches, then 3 detection tokens.
    "yolos": ("yolos", lambda **c: transformers.YolosModel(transformers.YolosConfig(**c, num_detection_tokens=3)),
              [24, 40], (48, 32), 2, {}, 1, 3, "encoder.layer.{}.attention.attention"),
}


@pytest.mark.parametrize("name", list(TOWERS))
def test_tower_matches_its_eager_attention_placed_by_hand(name):
    module, build, built, size, images, kwargs, prefix, suffix, layer = TOWERS[name]
    torch.manual_seed(0)
    model = peaked(sharpened(build(**SMALL, image_size=built, patch_size=PATCH)))
    pixels = torch.randn(images, 3, *size, generator=torch.Generator().manual_seed(1))
    calls = eager_attention_calls(modeling(module), model, pixels, **kwargs)
    model.set_attn_implementation("sdpa")
    rec, rec_tokens = record_both_reductions(model, lambda m: m(pixels, **kwargs), lambda out: out.last_hidden_state,
                                             STATS)
    layers = [layer.format(i) for i in range(2)]
    assert rec.layers == layers
    # X-CLIP's message attention across frames is no image's: skipped with its reason.
    skipped = tuple(f"encoder.layers.{i}.message_attn" for i in range(2)) if name == "xclip_vision" else ()
    recorded = [model.get_submodule(path) for path in layers]
    maps = [probabilities for called, probabilities in calls if called in recorded]
    assert len(maps) == 2 and all(m.shape[0] == images for m in maps)
    check_prefix_and_grid(rec, rec_tokens, maps, (size[0] // PATCH, size[1] // PATCH), PATCH, prefix, suffix, skipped)


def test_kosmos2_model_records_its_vision_tower_alone():
    """The whole Kosmos2Model at 24 x 40 px (built for 32 x 32): its vision tower's layers only, never the text
    decoder or the latent queries' cross-attention of its image-to-text projection, which is refused when named."""
    vision = dict(SMALL, image_size=32, patch_size=PATCH)
    text = dict(embed_dim=32, layers=1, attention_heads=2, ffn_dim=64, vocab_size=100, max_position_embeddings=64)
    torch.manual_seed(0)
    model = peaked(sharpened(transformers.Kosmos2Model(transformers.Kosmos2Config(
        text_config=text, vision_config=vision, latent_query_num=4))))
    image_tokens = torch.zeros(2, 10, dtype=torch.bool)
    image_tokens[:, 1:5] = True  # the 4 latent queries' places among the text tokens
    inputs = dict(pixel_values=torch.randn(2, 3, 24, 40, generator=torch.Generator().manual_seed(1)),
                  input_ids=torch.randint(5, 100, (2, 10), generator=torch.Generator().manual_seed(2)),
                  image_embeds_position_mask=image_tokens, interpolate_pos_encoding=True)
    tower = set(model.vision_model.modules())
    calls = [(m, p) for m, p in eager_attention_calls(modeling("kosmos2"), model, **inputs) if m in tower]
    model.set_attn_implementation("sdpa")
    rec, rec_tokens = record_both_reductions(model, lambda m: m(**inputs), lambda out: out.last_hidden_state, STATS)
    layers = [f"vision_model.model.encoder.layers.{i}.self_attn" for i in range(2)]
    assert rec.layers == layers and rec.skipped == {}
    assert [m for m, _ in calls] == [model.get_submodule(path) for path in layers]
    check_prefix_and_grid(rec, rec_tokens, [p for _, p in calls], (3, 5), PATCH, 1)
    with pytest.raises(NoLayerError, match=r"outside vision_model\.model, the tower that embeds the image"):
        with torch.no_grad(), vitmad.record(model, layers=["image_to_text_projection.*"]):
            model(**inputs)


# BridgeTower's vision tower: CLIP's design with torch's nn.MultiheadAttention (hidden_size // 64 heads), fed
# [L, B, C] sequence-first; the class token, then the patches.
BRIDGETOWER_VISION = dict(hidden_size=128, num_hidden_layers=2, image_size=32, patch_size=PATCH)


def _bridgetower_vision():
    torch.manual_seed(0)
    model = peaked(sharpened(modeling("bridgetower").BridgeTowerVisionModel(
        transformers.BridgeTowerVisionConfig(**BRIDGETOWER_VISION))))
    with torch.no_grad():  # in_proj is no Linear: sharpened leaves its initial, near-uniform weights
        for attention in model.modules():
            if isinstance(attention, torch.nn.MultiheadAttention):
                attention.in_proj_weight.normal_(std=0.25)
    return model


def multihead_probabilities(model: torch.nn.Module, run) -> list[torch.Tensor]:
    """``[B, H, L, L]`` float64 per call of each ``nn.MultiheadAttention`` of ``model`` in ``run()``: the softmax of
    its own queries and keys, projected by its ``in_proj`` from its sequence-first input ``[L, B, C]``, scaled by
    ``1 / sqrt(d)``, the keys its ``key_padding_mask`` hides (True) at -inf."""
    maps = []

    def capture(module, args, kwargs):
        assert not module.batch_first and args[0] is args[1] and kwargs.get("attn_mask") is None
        x = args[0].double()
        width, heads = x.shape[-1], module.num_heads
        weight, bias = module.in_proj_weight.double(), module.in_proj_bias.double()
        q, k = (torch.nn.functional.linear(x, weight[i * width:(i + 1) * width], bias[i * width:(i + 1) * width])
                .permute(1, 0, 2).unflatten(-1, (heads, -1)).transpose(1, 2) for i in (0, 1))  # [B, H, L, d]
        logits = q @ k.transpose(-2, -1) / math.sqrt(width // heads)
        if kwargs.get("key_padding_mask") is not None:
            logits = logits.masked_fill(kwargs["key_padding_mask"][:, None, None, :], -math.inf)
        maps.append(logits.softmax(-1))

    handles = [m.register_forward_pre_hook(capture, with_kwargs=True) for m in model.modules()
               if isinstance(m, torch.nn.MultiheadAttention)]
    run_hooked(handles, run)
    return maps


def test_bridgetower_vision_multihead_attention_fed_sequence_first():
    model = _bridgetower_vision()
    pixels = torch.randn(2, 3, 40, 56, generator=torch.Generator().manual_seed(1))
    rec, rec_tokens = record_both_reductions(model, lambda m: m(pixels, interpolate_pos_encoding=True),
                                             lambda out: out, STATS)
    assert rec.layers == [f"visual.transformer.resblocks.{i}.attn" for i in range(2)] and rec.skipped == {}
    maps = multihead_probabilities(model, lambda: model(pixels, interpolate_pos_encoding=True))
    check_prefix_and_grid(rec, rec_tokens, maps, (5, 7), PATCH, 1)


def test_bridgetower_image_mask_hides_keys_and_their_queries():
    """``image_mask`` (True: hidden, the key padding mask of every layer) over the second image's last row of
    patches, at 24 x 40 px (positions interpolated to a 3 x 5 grid): those tokens are padding, neither keys (their
    probability is 0) nor queries (NaN per query, out of the means), as README says of a MultiheadAttention's
    key_padding_mask."""
    model = _bridgetower_vision()
    pixels = torch.randn(2, 3, 24, 40, generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(2, 1 + 15, dtype=torch.bool)
    mask[1, 11:] = True  # tokens 11 to 15: the patches of row 2 of the 3 x 5 grid
    kwargs = dict(image_mask=mask, interpolate_pos_encoding=True)
    rec, rec_tokens = record_both_reductions(model, lambda m: m(pixels, **kwargs), lambda out: out, STATS)
    maps = multihead_probabilities(model, lambda: model(pixels, **kwargs))
    assert len(rec.layers) == len(maps) == 2
    for layer, probabilities in enumerate(maps):
        assert rec.geometry[layer].grid == (3, 5) and rec.geometry[layer].num_prefix_tokens == 1
        for image in range(2):
            placed = positions(1, (3, 5), 0)
            placed[mask[image]] = math.nan  # the hidden tokens have no place: padding
            kept = int((~mask[image]).sum()) - 1  # the queries: the patches not hidden
            expected = statistics_reference(probabilities[image:image + 1], placed)
            assert float(expected["entropy"].mean()) < 0.75 * math.log(kept + 1)
            expected["prefix_maps"] = probabilities[image:image + 1, :, :1, 1:kept + 1]  # the class token's row
            for stat, close in (("mad", TOL), ("entropy", STAT_TOL), ("prefix_mass", STAT_TOL)):
                tokens = rec_tokens.stats[stat][layer][image:image + 1]
                torch.testing.assert_close(tokens[..., :kept].double(), expected[stat], **close)
                assert tokens[..., kept:].isnan().all()
                torch.testing.assert_close(rec.stats[stat][layer][image:image + 1].double(),
                                           expected[stat].mean(-1), **close)
            prefix_map = rec.prefix_maps[layer][image:image + 1]
            torch.testing.assert_close(prefix_map[..., :kept].double(), expected["prefix_maps"], **STAT_TOL)
            assert prefix_map[..., kept:].isnan().all()
        torch.testing.assert_close(rec.mad[layer], rec.stats["mad"][layer])


def test_beit_backbone_of_dpt_with_its_relative_position_bias_resized():
    """DPTForDepthEstimation over a BeitBackbone run at 40 x 24 px (built for 32 x 32): each layer's relative
    position bias is interpolated from its 4 x 4 table to the 5 x 3 grid; the class token, then the patches."""
    beit = transformers.BeitConfig(**dict(SMALL, num_hidden_layers=4), image_size=32, patch_size=PATCH,
                                   use_relative_position_bias=True, use_absolute_position_embeddings=False,
                                   out_indices=[1, 2, 3, 4], reshape_hidden_states=False, layer_scale_init_value=0.1)
    config = transformers.DPTConfig(backbone_config=beit, neck_hidden_sizes=[16, 16, 16, 16], fusion_hidden_size=16,
                                    reassemble_factors=[4, 2, 1, 0.5], head_in_index=-1)
    torch.manual_seed(0)
    model = transformers.DPTForDepthEstimation(config)
    peaked(sharpened(model.backbone))
    with torch.no_grad():  # zeros at init: a bias of no effect would leave its resizing untested
        for name, parameter in model.backbone.named_parameters():
            if "relative_position_bias_table" in name:
                parameter.normal_(std=2.0)
    model.eval()
    pixels = torch.randn(2, 3, 40, 24, generator=torch.Generator().manual_seed(1))
    calls = eager_attention_calls(modeling("beit"), model, pixels, switched=model.backbone)
    model.backbone.set_attn_implementation("sdpa")
    rec, rec_tokens = record_both_reductions(model, lambda m: m(pixels), lambda out: out.predicted_depth, STATS)
    layers = [f"backbone.beit.layers.{i}.attention" for i in range(4)]
    assert rec.layers == layers and rec.skipped == {}
    assert [m for m, _ in calls] == [model.get_submodule(path) for path in layers]
    check_prefix_and_grid(rec, rec_tokens, [p for _, p in calls], (5, 3), PATCH, 1)
