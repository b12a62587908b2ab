"""vitmad.record on SAM3's ViT (``Sam3ViTModel``), alone and as the vision encoder's backbone inside ``Sam3Model``,
``Sam3TrackerModel``, ``Sam3TrackerVideoModel`` and ``Sam3VideoModel`` (its detector is a ``Sam3Model``).

Read from transformers' modeling_sam3.py: the tokens are the patch convolution's ``H x W`` map, row-major (the
absolute position embedding is tiled over the map, a value added per cell). A windowed block (``Sam3ViTLayer`` with
``window_size > 0``) takes its ``[B, H, W, C]`` map through ``window_partition``: zeros padded at the bottom and
right (``F.pad(x, (0, 0, 0, pad_w, 0, pad_h))``, after the layer norm) to a multiple of the window, windows
row-major (``view(B, H/w, w, W/w, w, C).permute(0, 1, 3, 2, 4, 5)``), tokens row-major within a window; its
attention (``Sam3ViTRoPEAttention``) runs over ``[B * windows, heads, N, N]``, batch then window, with no mask, so a
padding slot is a key like any other, and ``window_unpartition`` crops the padded rows and columns away. A global
block (``global_attn_indexes``, ``window_size`` 0) attends over the whole map. The 2-D RoPE (positions local to the
window in a windowed block, over the configured grid in a global one) changes the scores, not where a token is.
So a padding slot is a key at its cell of the padded grid, past the image edge, and no query (docs/definition.md,
windows); no token lacks a position, so the prefix mass is 0.

The reference is the model's own eager attention probabilities (transformers' ``eager_attention_forward`` in
modeling_sam3, captured by conftest's ``eager_attention_calls``), placed by the geometry written here. The global
blocks' RoPE table is built for the configured image size, so each model runs at its configured size; padding comes
from a map the window does not divide (5 x 3 in windows of 2: 6 x 4; 3 x 3 in one window of 4), none from one it
divides (4 x 6 in windows of 2).
"""

from __future__ import annotations

import pytest
import torch

from conftest import check_sam_windows, eager_attention_calls, record_both_reductions, sharpened

transformers = pytest.importorskip("transformers")
modeling = pytest.importorskip("transformers.models.sam3.modeling_sam3")

STATS = ["entropy", "self_mass", "prefix_mass"]
HEADS, BATCH, PATCH = 2, 2, 8
# name -> (image height, image width, window); the tiny position table is 3 x 3 (24 px), tiled over the map.
SIZES = {"padded-5x3-in-2": (40, 24, 2), "one-window-4-over-3x3": (24, 24, 4), "whole-4x6-in-2": (32, 48, 2)}


def _vit(height: int, width: int, window: int) -> dict:
    # Blocks 0 and 2 windowed, block 1 global.
    return dict(model_type="sam3_vit_model", hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                num_attention_heads=HEADS, patch_size=PATCH, image_size=[height, width], pretrain_image_size=24,
                window_size=window, global_attn_indexes=[1])


def _random_tables(model: torch.nn.Module) -> torch.nn.Module:
    """Sharpened attention (conftest), a random position table and patch convolution (std 0.02 at init), so that a
    token at a wrong place, a head in a wrong slot or one image's values given to another change the values."""
    sharpened(model)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("embeddings.position_embeddings"):
                parameter.normal_()
        for module in model.modules():
            if isinstance(module, torch.nn.Conv2d):
                module.weight.normal_(std=0.25)
    return model


def _record(model, run, output):
    return record_both_reductions(model, run, output, STATS)


def _vit_maps(calls) -> list[torch.Tensor]:
    """The probabilities of the ViT blocks' calls among ``eager_attention_calls``' (the DETR encoder and decoder,
    the geometry encoder and the mask decoder of ``Sam3Model`` call the same function)."""
    maps = [probabilities for module, probabilities in calls if isinstance(module, modeling.Sam3ViTRoPEAttention)]
    assert len(maps) == 3
    # Far from uniform (a uniform row of N keys has a largest weight of 1 / N; a padding query's row is uniform, its
    # query and keys the projections' zero biases): a misplaced token shows.
    assert all(p.amax(-1).mean() > 1.5 / p.shape[-1] for p in maps)
    return maps


def _check(rec, rec_tokens, maps, height: int, width: int, window: int, layers: list[str]) -> None:
    """The recordings' ``layers`` (the ViT's blocks 0 to 2) against the blocks' probabilities ``maps``."""
    first = rec.layers.index(layers[0])
    assert rec.layers[first:first + 3] == layers and not set(layers) & set(rec.skipped)
    check_sam_windows(rec, rec_tokens, maps, height, width, window, PATCH, BATCH, HEADS, first)


@pytest.mark.parametrize("size", list(SIZES.values()), ids=list(SIZES))
@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_sam3_vit_matches_its_own_attention(implementation, size):
    height, width, window = size
    torch.manual_seed(0)
    model = _random_tables(modeling.Sam3ViTModel._from_config(modeling.Sam3ViTConfig(**_vit(height, width, window)),
                                                              attn_implementation=implementation))
    pixels = torch.randn(BATCH, 3, height, width)
    rec, rec_tokens = _record(model, lambda m: m(pixels), lambda out: out.last_hidden_state)
    layers = [f"layers.{i}.attention" for i in range(3)]
    assert rec.layers == layers and rec.skipped == {}
    maps = _vit_maps(eager_attention_calls(modeling, model, pixels))
    _check(rec, rec_tokens, maps, height // PATCH, width // PATCH, window, layers)


# The whole models, tiny, at 40 px: a 5 x 5 map in windows of 2, padded to 6 x 6.
FPN, IMAGE, WINDOW = 16, 40, 2
VISION = dict(model_type="sam3_vision_model", backbone_config=_vit(IMAGE, IMAGE, WINDOW), fpn_hidden_size=FPN,
              backbone_feature_sizes=[[20, 20], [10, 10], [5, 5]])
TRACKER = dict(vision_config=VISION,
               prompt_encoder_config=dict(hidden_size=FPN, image_size=IMAGE, patch_size=PATCH, mask_input_channels=4),
               mask_decoder_config=dict(hidden_size=FPN, mlp_dim=32, num_hidden_layers=1, num_attention_heads=2,
                                        iou_head_hidden_dim=16))
# Sam3TrackerVideoConfig sets its vision and prompt encoders' image size from its own (1008 unless given).
MEMORY = dict(image_size=IMAGE, memory_attention_hidden_size=FPN, memory_attention_num_layers=1,
              memory_attention_feed_forward_hidden_size=32, memory_encoder_hidden_size=FPN,
              memory_encoder_output_channels=8, mask_downsampler_embed_dim=FPN, memory_fuser_embed_dim=FPN,
              memory_fuser_intermediate_dim=32)


def _sam3_config():
    small = dict(hidden_size=FPN, num_layers=1, num_attention_heads=2, intermediate_size=32)
    return transformers.Sam3Config(
        vision_config=VISION,
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         vocab_size=64, projection_dim=FPN, max_position_embeddings=16, bos_token_id=1,
                         eos_token_id=2),
        geometry_encoder_config=dict(small, roi_size=2), detr_encoder_config=small,
        detr_decoder_config=dict(small, num_queries=5),
        mask_decoder_config=dict(hidden_size=FPN, num_attention_heads=2, num_upsampling_stages=3))


IDS = torch.tensor([[1, 5, 6, 2]] * BATCH)
POINTS, LABELS = torch.tensor([[[[10.0, 20.0]]]] * BATCH), torch.ones(BATCH, 1, 1, dtype=torch.long)


def _sam3(implementation):
    model = transformers.Sam3Model._from_config(_sam3_config(), attn_implementation=implementation)
    return (model, lambda m, pixels: m(pixel_values=pixels, input_ids=IDS), lambda out: out.pred_masks,
            lambda m, pixels: eager_attention_calls(modeling, m, pixel_values=pixels, input_ids=IDS),
            "vision_encoder.backbone")


def _tracker(implementation):
    model = transformers.Sam3TrackerModel._from_config(transformers.Sam3TrackerConfig(**TRACKER),
                                                       attn_implementation=implementation)
    return (model, lambda m, pixels: m(pixel_values=pixels, input_points=POINTS, input_labels=LABELS),
            lambda out: out.pred_masks, lambda m, pixels: eager_attention_calls(modeling, m.vision_encoder, pixels),
            "vision_encoder.backbone")


def _tracker_video(implementation):
    # Its forward tracks through an inference session; the image features are the vision encoder's forward.
    model = transformers.Sam3TrackerVideoModel._from_config(transformers.Sam3TrackerVideoConfig(**TRACKER, **MEMORY),
                                                            attn_implementation=implementation)
    return (model, lambda m, pixels: m.get_image_features(pixels), lambda out: out.last_hidden_state,
            lambda m, pixels: eager_attention_calls(modeling, m.vision_encoder, pixels), "vision_encoder.backbone")


def _video(implementation):
    # The detector (a Sam3Model) holds the vision encoder; the tracker is built without one.
    config = transformers.Sam3VideoConfig(detector_config=_sam3_config(),
                                          tracker_config=transformers.Sam3TrackerVideoConfig(**TRACKER, **MEMORY))
    model = transformers.Sam3VideoModel._from_config(config, attn_implementation=implementation)
    return (model, lambda m, pixels: m.detector_model.get_vision_features(pixels), lambda out: out.last_hidden_state,
            lambda m, pixels: eager_attention_calls(modeling, m.detector_model.vision_encoder, pixels),
            "detector_model.vision_encoder.backbone")


MODELS = {"sam3": _sam3, "sam3_tracker": _tracker, "sam3_tracker_video": _tracker_video, "sam3_video": _video}


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("name", list(MODELS))
def test_whole_model_records_every_vit_block(name, implementation):
    """A recording of the whole model holds every block of its ViT (windowed and global, none skipped), placed as
    the ViT alone is, against the blocks' own probabilities; the model's output unchanged, bit for bit."""
    torch.manual_seed(0)
    model, run, output, reference, tower = MODELS[name](implementation)
    _random_tables(model)
    pixels = torch.randn(BATCH, 3, IMAGE, IMAGE)
    rec, rec_tokens = _record(model, lambda m: run(m, pixels), output)
    maps = _vit_maps(reference(model, pixels))
    _check(rec, rec_tokens, maps, IMAGE // PATCH, IMAGE // PATCH, WINDOW, [f"{tower}.layers.{i}.attention"
                                                                           for i in range(3)])
