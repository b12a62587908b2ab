"""vitmad.record on transformers' Florence-2 vision tower (``Florence2VisionBackbone``), alone and as the
``vision_tower`` of ``Florence2ForConditionalGeneration``.

The geometry, written here from ``modeling_florence2.py`` (transformers 5.25):

- Stage ``i`` starts with its convolutional embedding ``convs.i`` (``patch_size[i]`` x ``patch_size[i]``, stride
  ``patch_stride[i]``, padding ``patch_padding[i]``: 7 / 4 / 3, then 3 / 2 / 1): a map side ``n`` becomes
  ``floor((n + 2 padding - kernel) / stride) + 1`` (:func:`_stage_maps`), and the stage's tokens are the product of the
  strides so far apart (4, 8, 16, 32 px), token ``(r, c)`` at the centre of its stride cell.
- Each ``Florence2VisionSpatialBlock`` hands its window attention the ``[B, H, W, C]`` map, which pads it with zeros
  at the bottom and right to whole ``window_size`` windows, cuts it into windows (``view(B, Hp / w, w, Wp / w, w, C)``
  permuted to windows row-major, tokens row-major in a window) and attends within each: ``[B * windows, heads, N,
  N]``, images outermost. The padding is not masked: a padding slot is a key at its cell of the padded grid, past the
  image edge, and no query (docs/definition.md, windows); every image token is the query of exactly one slot.
  conftest's ``padded_window_reference`` places such a call (the same padding and order as SAM's windows).
- ``Florence2VisionChannelBlock``'s attention runs its softmax over channels (``[B, groups, C / groups, C /
  groups]``): skipped with that reason.
- The tower has no token but the map's (its projector's pooled tokens come after it), so the prefix mass is 0.

The reference is each window attention's own softmax probabilities: the eager attention function of the modeling
file run in float64 on the queries and keys each call of the model (eager or SDPA) hands its attention
implementation, in a plain forward. Image sizes the windows do not divide (odd, non-square) make every stage pad.
"""

from __future__ import annotations

import math

import pytest
import torch

import vitmad
from conftest import padded_window_reference, record_both_reductions, sharpened

transformers = pytest.importorskip("transformers")
modeling = pytest.importorskip("transformers.models.florence2.modeling_florence2")

TOL = {"rtol": 1e-5, "atol": 1e-4}  # float32 logits and sums in the ops, float64 reference; MADs here 5 to 60 px
STATS = ["entropy", "prefix_mass", "self_mass"]
WINDOW, BATCH = 3, 2
HEADS = (1, 2, 2, 4)  # per stage
DEPTHS = (1, 1, 2, 1)  # stage 2 holds two blocks
VISION = dict(embed_dim=[16, 32, 32, 64], num_heads=list(HEADS), num_groups=[2, 4, 4, 8], depths=list(DEPTHS),
              window_size=WINDOW, projection_dim=32, max_position_embeddings=32)
TEXT = dict(vocab_size=64, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
            decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=128)
IMAGE_TOKEN = 63
# (H, W) in pixels: odd and non-square, no side a whole number of windows in any stage (53 x 75: maps 14 x 19,
# 7 x 10, 4 x 5, 2 x 3); one the other way round with a map smaller than a window (97 x 61: 25 x 16, ..., 4 x 2);
# one every window divides (96 x 192: 24 x 48, 12 x 24, 6 x 12, 3 x 6).
SIZES = {"odd-53x75": (53, 75), "odd-97x61": (97, 61), "divisible-96x192": (96, 192)}
WINDOW_LAYERS = [f"blocks.{stage}.{block}.spatial_block.window_attn"
                 for stage, depth in enumerate(DEPTHS) for block in range(depth)]
CHANNEL_LAYERS = [f"blocks.{stage}.{block}.channel_block.channel_attn"
                  for stage, depth in enumerate(DEPTHS) for block in range(depth)]


def _config(implementation: str):
    config = transformers.Florence2Config(vision_config=VISION, text_config=TEXT, image_token_id=IMAGE_TOKEN)
    config._attn_implementation = implementation
    return config


def _random(model: torch.nn.Module) -> torch.nn.Module:
    """Sharpened attention (conftest) and random convolutions, so that a token at a wrong place, a head in a wrong
    slot or one image's values given to another change the values."""
    sharpened(model)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Conv2d):
                module.weight.normal_(std=0.25)
    return model


def _tower(implementation: str) -> torch.nn.Module:
    torch.manual_seed(0)
    config = _config(implementation).vision_config
    return _random(modeling.Florence2VisionBackbone._from_config(config, attn_implementation=implementation))


def _whole(implementation: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return _random(transformers.Florence2ForConditionalGeneration._from_config(
        _config(implementation), attn_implementation=implementation))


def _stage_maps(height: int, width: int) -> list[tuple[tuple[int, int], int]]:
    """``((map height, map width), stride in px)`` of each stage: the chain of the convolutional embeddings of the
    config's defaults (kernel, stride, padding), written out."""
    maps, stride = [], 1
    for kernel, step, padding in ((7, 4, 3), (3, 2, 1), (3, 2, 1), (3, 2, 1)):
        height = (height + 2 * padding - kernel) // step + 1
        width = (width + 2 * padding - kernel) // step + 1
        stride *= step
        maps.append(((height, width), stride))
    return maps


class _EagerTwins:
    """Stands for the modeling file's ``ALL_ATTENTION_FUNCTIONS``: hands each module the implementation it asks for,
    and, for each window attention call, first computes the modeling file's own eager attention
    (``eager_attention_forward``) on that call's queries and keys in float64, into ``maps``. The reference is then
    the attention of the very q and k the recorded implementation (eager or SDPA) receives: an eager copy of an SDPA
    model drifts from it by float32 rounding through the layers before."""

    def __init__(self, interfaces, maps: list):
        self.interfaces, self.maps = interfaces, maps

    def get_interface(self, implementation, default):
        inner = self.interfaces.get_interface(implementation, default)

        def attend(module, query, key, value, attention_mask, **kwargs):
            if type(module).__name__ == "Florence2VisionWindowAttention":
                _, probabilities = modeling.eager_attention_forward(
                    module, query.double(), key.double(), value.double(), attention_mask, **kwargs)
                self.maps.append(probabilities)
            return inner(module, query, key, value, attention_mask, **kwargs)

        return attend


def _window_probabilities(model: torch.nn.Module, *inputs, **kwargs) -> list[torch.Tensor]:
    """Each window attention call's own softmax probabilities, float64, in call order (:class:`_EagerTwins`), from
    one plain forward of ``model``."""
    maps = []
    with pytest.MonkeyPatch.context() as patch, torch.no_grad():
        patch.setattr(modeling, "ALL_ATTENTION_FUNCTIONS", _EagerTwins(modeling.ALL_ATTENTION_FUNCTIONS, maps))
        model(*inputs, **kwargs)
    return maps


def _check(rec, rec_tokens, maps, height: int, width: int, prefix: str = "") -> None:
    """Every window layer of the recordings against its probabilities ``maps`` placed by the written geometry:
    geometry, mean and per-token values of MAD and each statistic; the channel attention skipped."""
    assert rec.layers == [prefix + name for name in WINDOW_LAYERS]
    assert rec.skipped == {prefix + name: "channel attention: the softmax runs over channels, not tokens "
                           "(Florence-2's DaViT)" for name in CHANNEL_LAYERS}
    stages = [stage for stage, depth in enumerate(DEPTHS) for _ in range(depth)]
    assert len(maps) == len(stages)
    means, tokens = rec.calls[-1], rec_tokens.calls[-1]  # per call: the stages' head counts differ
    for index, (probabilities, stage) in enumerate(zip(maps, stages, strict=True)):
        (gh, gw), stride = _stage_maps(height, width)[stage]
        windows = math.ceil(gh / WINDOW) * math.ceil(gw / WINDOW)
        assert probabilities.shape == (BATCH * windows, HEADS[stage], WINDOW ** 2, WINDOW ** 2)
        geometry = rec.geometry[index]
        assert geometry.grid == (gh, gw) and geometry.stride == (stride, stride) and geometry.heads == HEADS[stage]
        padded = (math.ceil(gh / WINDOW) * WINDOW, math.ceil(gw / WINDOW) * WINDOW)
        assert geometry.attention == f"window {WINDOW}x{WINDOW}" + (
            f", padded to {padded[0]}x{padded[1]}" if padded != (gh, gw) else "")
        expected = padded_window_reference(probabilities, gh, gw, WINDOW, stride, BATCH, HEADS[stage])
        for name, values in expected.items():
            mean, per_token = ((call.per_layer if name == "mad" else call.statistics[name])[index]
                               for call in (means, tokens))
            torch.testing.assert_close(mean.double(), values.mean(-1), **TOL)
            torch.testing.assert_close(per_token.double(), values, **TOL)
        # rec.mad and rec.stats stack the layers, the heads a stage lacks NaN.
        torch.testing.assert_close(rec.stats["entropy"][index, :, :HEADS[stage]].double(),
                                   expected["entropy"].mean(-1), **TOL)
        assert rec.mad[index, :, HEADS[stage]:].isnan().all()
        # Far from uniform: a query's attention differs from one window slot to the next, so a misplaced token shows.
        assert expected["entropy"].mean() < 0.9 * math.log(WINDOW ** 2)
        assert expected["mad"].std() > 0.1 * stride


@pytest.mark.parametrize("size", list(SIZES.values()), ids=list(SIZES))
@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_tower_windows_on_every_stage_map(implementation, size):
    model = _tower(implementation)
    pixels = torch.randn(BATCH, 3, *size)
    run = lambda m: m(pixels)  # noqa: E731
    rec, rec_tokens = record_both_reductions(model, run, lambda out: out.last_hidden_state, STATS)
    _check(rec, rec_tokens, _window_probabilities(model, pixels), *size)


def _prompt(height: int, width: int) -> torch.Tensor:
    """Input ids: one image token per token the projector makes (the last map's, then its pooled one), then text."""
    (gh, gw), _ = _stage_maps(height, width)[-1]
    torch.manual_seed(1)
    text = torch.randint(0, IMAGE_TOKEN, (BATCH, 5))
    return torch.cat([torch.full((BATCH, gh * gw + 1), IMAGE_TOKEN), text], 1)


@pytest.mark.parametrize("size", [SIZES["odd-53x75"], SIZES["odd-97x61"]], ids=["odd-53x75", "odd-97x61"])
@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_whole_model_records_the_vision_tower_alone(implementation, size):
    model = _whole(implementation)
    pixels, ids = torch.randn(BATCH, 3, *size), _prompt(*size)
    run = lambda m: m(input_ids=ids, pixel_values=pixels)  # noqa: E731
    rec, rec_tokens = record_both_reductions(model, run, lambda out: out.logits, STATS)
    # The BART encoder and decoder attend over text and the projector's tokens: neither recorded nor listed.
    assert len(rec.calls) == 1
    _check(rec, rec_tokens, _window_probabilities(model, input_ids=ids, pixel_values=pixels), *size,
           prefix="model.vision_tower.")
    assert rec.mad.shape == (len(WINDOW_LAYERS), BATCH, max(HEADS))


def test_tower_and_whole_model_agree():
    """The tower inside the whole model is placed as the tower alone: the same weights give the same values."""
    model = _whole("sdpa")
    tower = modeling.Florence2VisionBackbone._from_config(model.config.vision_config, attn_implementation="sdpa")
    tower.load_state_dict(model.model.vision_tower.state_dict())
    size = SIZES["odd-53x75"]
    pixels, ids = torch.randn(BATCH, 3, *size), _prompt(*size)
    with torch.no_grad():
        with vitmad.record(model, stats=STATS) as rec_whole:
            model(input_ids=ids, pixel_values=pixels)
        with vitmad.record(tower.eval(), stats=STATS) as rec_tower:
            tower(pixels)
    assert rec_whole.geometry == rec_tower.geometry
    torch.testing.assert_close(rec_whole.mad, rec_tower.mad, rtol=0, atol=0, equal_nan=True)
    for name in STATS:
        torch.testing.assert_close(rec_whole.stats[name], rec_tower.stats[name], rtol=0, atol=0, equal_nan=True)


def test_window_attention_without_its_backbone_is_refused():
    """A spatial block recorded alone: no convolutional embedding says its stage's stride."""
    model = _tower("sdpa")
    block = model.blocks[1][0]
    features = torch.randn(BATCH, 32, 7, 10)
    with torch.no_grad(), vitmad.record(block) as rec:
        with pytest.raises(ValueError, match="recorded without the Florence2VisionBackbone"):
            block(features)
    assert rec.calls == []


def test_generate_records_the_tower_once():
    """``generate`` runs the tower once, before the text is decoded: one call, the forward's values, the same ids."""
    model = _whole("sdpa")
    size = SIZES["odd-97x61"]
    pixels, ids = torch.randn(BATCH, 3, *size), _prompt(*size)
    settings = dict(input_ids=ids, pixel_values=pixels, max_new_tokens=3, do_sample=False, num_beams=1)
    with torch.no_grad():
        plain = model.generate(**settings)
        with vitmad.record(model.model, stats=STATS) as rec_forward:
            model.model(input_ids=ids, pixel_values=pixels)
        with vitmad.record(model, stats=STATS) as rec:
            assert torch.equal(model.generate(**settings), plain)
    assert len(rec.calls) == 1
    assert rec.layers == ["model." + name for name in rec_forward.layers]
    torch.testing.assert_close(rec.mad, rec_forward.mad, rtol=0, atol=0, equal_nan=True)


def test_stage_map_that_is_not_the_strides_is_refused():
    """Unpadded embeddings (``patch_padding`` 0) make a 12 x 18 first map of a 53 x 75 image: neither the floor nor
    the ceiling of the image over the stride 4 the convolutions give, so no cell size is taken for it."""
    torch.manual_seed(0)
    config = transformers.Florence2VisionConfig(**VISION, patch_padding=[0, 1, 1, 1])
    model = _random(modeling.Florence2VisionBackbone._from_config(config, attn_implementation="sdpa"))
    with torch.no_grad(), vitmad.record(model) as rec:
        with pytest.raises(ValueError, match=r"blocks\.0\.0\.spatial_block\.window_attn.*height 12 for an image "
                                             r"height of 53, but its stage's stride 4, read from the model, gives 13 "
                                             "or 14"):
            model(torch.randn(BATCH, 3, 53, 75))
    assert rec.calls == []
