"""vitmad.record on diffusers' other UNets: ``Kandinsky3UNet``, ``StableCascadeUNet`` (Würstchen's stages B and C),
aMUSEd's ``UVit2DModel``, and a ``TransformerTemporalModel`` recorded alone.

Tiny random-weight models, sharpened (every Linear redrawn, the query and key projections scaled up). The reference
is each layer's own attention probabilities: the ``q``, ``k`` (and mask) its ``AttnProcessor2_0`` hands
``F.scaled_dot_product_attention``, softmaxed in float64 (``_attention_maps`` of test_record_diffusers_images.py, each
call named by the ``Attention`` module that made it). The tokens are placed by geometry written here from diffusers'
source (``models/unets/unet_kandinsky3.py``, ``unet_stable_cascade.py``, ``uvit_2d.py``,
``models/transformers/transformer_temporal.py``):

- Kandinsky 3: ``conv_in`` has stride 1. A down block at level ``l`` runs its attention on the map of ``l`` halvings
  (each ``Kandinsky3ResNetBlock`` that samples down is a 2x2 convolution of stride 2: ``floor(n / 2)``), at stride
  ``2 ** l``; it samples after its attention. Up block ``k`` runs on level ``L - 1`` for ``k = 0`` and else first
  doubles the map of level ``L - k`` (a 2x2 transposed convolution of stride 2: ``2 * m``, stride ``2 ** (L - 1 -
  k)``), then attends. ``attentions.0`` of a block with self-attention flattens its map row-major
  (``reshape(B, C, h * w).permute(0, 2, 1)``) and passes it as queries and keys; the other attentions take the prompt.
- Stable Cascade: ``embedding`` pixel-unshuffles by ``patch_size``: level 0 is ``(H / p, W / p)`` at stride ``p``;
  ``down_downscalers[l]`` is a 2x2 convolution of stride 2 (``switch_level`` None: ``floor``, stride doubled) or
  identity (``switch_level`` False). Up block ``i`` runs on the map of level ``L - 1 - i`` (its first
  ``SDCascadeResBlock`` interpolates to the skip's size). The attention's queries are the map row-major (the processor
  flattens ``[B, C, h, w]`` with ``view(B, C, h * w).transpose(1, 2)``), its keys ``cat([map, kv_mapper(clip)])``: the
  cells, then the condition tokens without a position.
- aMUSEd: ``embed`` maps ``input_ids`` ``[B, H, W]`` to ``[B, C, H, W]``; ``down_block.downsample`` pads right and
  bottom by one and convolves 2x2 with stride 2 (``ceil(n / 2)``, stride 2); ``transformer_layers`` attend over that
  map row-major.
- ``TransformerTemporalModel``: ``hidden_states`` ``[B * F, C, h, w]`` reshaped to ``[B, F, C, h, w]`` and permuted to
  ``[B * h * w, F, C]``: one group per cell (row-major, videos outermost), its frames in order, frame ``f`` at ``f +
  0.5`` (``_svd_reference`` of test_record_diffusers_unets.py, stride 1).
"""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from test_record_diffusers_images import _attention_maps
from test_record_diffusers_unets import STAT_TOL, TOL, _own_probabilities, _record, _reference, _sharpen, _svd_reference
from test_record_diffusers_unets_2 import _merged_probabilities, use_processor

import vitmad
from conftest import grid_centres

diffusers = pytest.importorskip("diffusers")
attention_processor = pytest.importorskip("diffusers.models.attention_processor")

_floor_half = lambda n: n // 2  # noqa: E731  a 2x2 convolution of stride 2 without padding
_ceil_half = lambda n: -(-n // 2)  # noqa: E731  Downsample2D padded right and bottom by one


def _halved(latent: tuple[int, int], times: int, halve) -> tuple[int, int]:
    h, w = latent
    for _ in range(times):
        h, w = halve(h), halve(w)
    return h, w


def _named_maps(model, monkeypatch, run) -> dict[str, list[torch.Tensor]]:
    """Per ``Attention`` module name, the float64 probabilities of each of its SDPA calls in ``run`` (masks applied)."""
    names = []
    handles = [m.register_forward_pre_hook(lambda m, a, n=n: names.append(n))
               for n, m in model.named_modules() if isinstance(m, attention_processor.Attention)]
    try:
        maps, _ = _attention_maps(monkeypatch, run)
    finally:
        for handle in handles:
            handle.remove()
    assert len(names) == len(maps)  # one SDPA call per forward of each Attention (AttnProcessor2_0)
    found = {}
    for name, probabilities in zip(names, maps):
        found.setdefault(name, []).append(probabilities)
    return found


def _check_map(call, tokens_call, layer: int, expected: dict, grid, stride: float, mass=None) -> None:
    geometry = call.geometry[layer]
    assert geometry.grid == grid and geometry.stride == (stride, stride)
    torch.testing.assert_close(tokens_call.per_layer[layer].double(), expected["mad"], **TOL)
    torch.testing.assert_close(call.per_layer[layer].double(), expected["mad"].mean(-1), **TOL)
    torch.testing.assert_close(tokens_call.statistics["entropy"][layer].double(), expected["entropy"], **STAT_TOL)
    if mass is not None:
        torch.testing.assert_close(tokens_call.statistics["prefix_mass"][layer].double(), mass, **STAT_TOL)


def _sharp(probabilities: torch.Tensor) -> None:
    entropy = -torch.special.xlogy(probabilities, probabilities).sum(-1)
    assert float(entropy.mean()) < 0.6 * math.log(probabilities.shape[-1])  # far from uniform


# --- Kandinsky 3


def _kandinsky3():
    torch.manual_seed(0)
    return _sharpen(diffusers.Kandinsky3UNet(
        in_channels=4, time_embedding_dim=32, groups=4, attention_head_dim=8, layers_per_block=2,
        block_out_channels=(32, 64, 64, 64), cross_attention_dim=12, encoder_hid_dim=12))


def _kandinsky3_map(name: str, latent: tuple[int, int], levels: int) -> tuple[tuple[int, int], float]:
    """The map and stride of a Kandinsky3 block's attention, from the module docstring's rules."""
    part, index = name.split(".")[0], int(name.split(".")[1])
    if part == "down_blocks":
        return _halved(latent, index, _floor_half), float(2 ** index)
    if index == 0:
        return _halved(latent, levels - 1, _floor_half), float(2 ** (levels - 1))
    h, w = _halved(latent, levels - index, _floor_half)
    return (2 * h, 2 * w), float(2 ** (levels - 1 - index))


@pytest.mark.parametrize("latent", [(17, 24), (16, 8)], ids=["odd_17x24", "16x8"])
def test_kandinsky3_self_attention_over_each_blocks_map_prompt_attention_skipped(latent, monkeypatch):
    unet = _kandinsky3()
    gen = torch.Generator().manual_seed(1)
    sample, text = torch.randn(2, 4, *latent, generator=gen), torch.randn(2, 5, 12, generator=gen)
    mask = torch.tensor([[1.0] * 5, [1.0] * 3 + [0.0] * 2])  # the second prompt padded

    def run():
        return unet(sample, torch.tensor([10]), text, mask).sample

    own = _named_maps(unet, monkeypatch, run)
    rec, tokens = _record(unet, run)
    placed = [f"{part}.{i}.attentions.0.attention" for part, levels in (("down_blocks", (1, 2, 3)),
                                                                       ("up_blocks", (0, 1, 2))) for i in levels]
    assert rec.layers == placed
    assert set(rec.skipped) == set(own) - set(placed)
    assert "add_time_condition.attention" in rec.skipped and "pooling" in rec.skipped["add_time_condition.attention"]
    for layer, name in enumerate(rec.layers):
        grid, stride = _kandinsky3_map(name, latent, 4)
        probabilities = own[name][-1]
        assert probabilities.shape[-2:] == (math.prod(grid),) * 2
        _sharp(probabilities)
        _check_map(rec.calls[-1], tokens.calls[-1], layer, _reference(probabilities, grid, stride), grid, stride)


@pytest.mark.parametrize("processor", ["classic", "sliced_3"])
def test_kandinsky3_classic_and_sliced_processors_equal_their_own(processor, monkeypatch):
    # The processors without SDPA: each get_attention_scores call's probabilities (3 rows of batch x heads at a time
    # for the sliced one, which do not divide the 2 x 8 rows of the self-attention blocks) placed by the same rules;
    # the prompt's mask reaches the classic processors as an additive mask (the cross-attentions, skipped).
    unet = _kandinsky3()
    use_processor(unet, processor)
    latent = (16, 8)
    gen = torch.Generator().manual_seed(4)
    sample, text = torch.randn(2, 4, *latent, generator=gen), torch.randn(2, 5, 12, generator=gen)

    def run():
        return unet(sample, torch.tensor([10]), text, torch.ones(2, 5)).sample

    own = _merged_probabilities(unet, monkeypatch, run)
    rec, tokens = _record(unet, run)
    assert rec.layers == [name for name in own if name.endswith("attentions.0.attention")
                          and not name.startswith("down_blocks.0")]
    for layer, name in enumerate(rec.layers):
        grid, stride = _kandinsky3_map(name, latent, 4)
        probabilities = own[name][-1]
        assert probabilities.shape[-2:] == (math.prod(grid),) * 2
        _check_map(rec.calls[-1], tokens.calls[-1], layer, _reference(probabilities, grid, stride), grid, stride)


# --- Stable Cascade


def _cascade(**config):
    torch.manual_seed(0)
    return _sharpen(diffusers.StableCascadeUNet(**{
        "in_channels": 4, "out_channels": 4, "timestep_ratio_embedding_dim": 16, "conditioning_dim": 16,
        "block_out_channels": (16, 16, 32), "num_attention_heads": (2, 2, 2), "down_num_layers_per_block": (1, 1, 1),
        "up_num_layers_per_block": (1, 1, 1), "down_blocks_repeat_mappers": (1, 1, 1),
        "up_blocks_repeat_mappers": (1, 2, 1), "block_types_per_layer": (("SDCascadeResBlock",
        "SDCascadeTimestepBlock", "SDCascadeAttnBlock"),) * 3, "clip_text_pooled_in_channels": 12, "clip_seq": 2,
        "dropout": (0.0, 0.0, 0.0), "self_attn": (True, True, False), **config}))


@pytest.mark.parametrize("stage", ["decoder_b", "prior_c"])
def test_stable_cascade_map_then_condition_keys_without_a_position(stage, monkeypatch):
    # Stage B: pixel-unshuffled by 2, levels halved by 2x2 convolutions, an odd level; its level 1 repeated twice on
    # the way up (repeat_mappers). Stage C: patch 1, levels of one size (switch_level False), text and image tokens.
    decoder = stage == "decoder_b"
    unet = _cascade(patch_size=2) if decoder else _cascade(
        patch_size=1, switch_level=(False, False), clip_text_in_channels=12, clip_image_in_channels=12)
    gen = torch.Generator().manual_seed(2)
    latent = (18, 14) if decoder else (7, 5)
    sample = torch.randn(2, 4, *latent, generator=gen)
    extra = {} if decoder else {"clip_text": torch.randn(2, 3, 12, generator=gen),
                                "clip_img": torch.randn(2, 1, 12, generator=gen)}
    pooled = torch.randn(2, 1, 12, generator=gen)
    condition = 2 if decoder else 3 + 2 + 2  # clip_seq tokens per pooled text (and image), the text's own

    def run():
        return unet(sample, torch.tensor([0.5, 0.25]), pooled, **extra).sample

    own = _named_maps(unet, monkeypatch, run)
    rec, _ = _record(unet, run)
    with torch.no_grad(), vitmad.record(unet, stats=["entropy", "prefix_mass"], reduction="none") as tokens:
        run()
    placed = ["down_blocks.0.2.attention", "down_blocks.1.2.attention", "up_blocks.1.2.attention",
              "up_blocks.1.2.attention", "up_blocks.2.2.attention"]
    assert rec.layers == placed
    assert set(rec.skipped) == {"down_blocks.2.2.attention", "up_blocks.0.2.attention"}  # self_attn=False
    patch = 2 if decoder else 1
    seen = Counter()
    for layer, name in enumerate(rec.layers):
        level = int(name.split(".")[1]) if name.startswith("down") else 2 - int(name.split(".")[1])
        grid = _halved((latent[0] // patch, latent[1] // patch), level if decoder else 0, _floor_half)
        stride = float(patch * (2 ** level if decoder else 1))
        probabilities = own[name][seen[name]]
        seen[name] += 1
        cells = math.prod(grid)
        assert probabilities.shape[-2:] == (cells, cells + condition)
        _sharp(probabilities)
        centres = grid_centres(grid, stride)
        on_map = probabilities[..., :cells]
        expected = {"mad": (on_map * torch.cdist(centres, centres)).sum(-1),
                    "entropy": -torch.special.xlogy(probabilities, probabilities).sum(-1)}
        _check_map(rec.calls[-1], tokens.calls[-1], layer, expected, grid, stride,
                   mass=probabilities[..., cells:].sum(-1))
    assert seen["up_blocks.1.2.attention"] == 2


def test_stable_cascade_bilinear_switch_level_is_refused():
    unet = _cascade(patch_size=1, switch_level=(True, True))
    with pytest.raises(ValueError, match=r"down_downscalers.1 resizes its map with a UpDownBlock2d \(Conv2d, "
                                         r"Upsample; switch_level True"):
        with torch.no_grad(), vitmad.record(unet):
            unet(torch.randn(1, 4, 8, 8), torch.tensor([0.5]), torch.randn(1, 1, 12))


# --- aMUSEd


@pytest.mark.parametrize("downsample", [False, True], ids=["amused_stride_1", "downsampled"])
def test_amused_transformer_layers_over_the_down_blocks_map(downsample, monkeypatch):
    torch.manual_seed(0)
    model = _sharpen(diffusers.UVit2DModel(
        hidden_size=32, cond_embed_dim=12, micro_cond_encode_dim=2, micro_cond_embed_dim=10, encoder_hidden_size=12,
        vocab_size=32, codebook_size=16, in_channels=16, block_out_channels=16, num_res_blocks=1, block_num_heads=2,
        num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, sample_size=8, downsample=downsample,
        upsample=downsample))
    gen = torch.Generator().manual_seed(3)
    latent = (7, 9)
    ids = torch.randint(0, 16, (2, *latent), generator=gen)
    text, pooled, micro = torch.randn(2, 5, 12, generator=gen), torch.randn(2, 12, generator=gen), torch.rand(2, 5)

    def run():
        return model(ids, text, pooled, micro)

    own = _own_probabilities(model, monkeypatch, run)
    rec, tokens = _record(model, run)
    assert rec.layers == ["transformer_layers.0.attn1", "transformer_layers.1.attn1"]
    assert set(rec.skipped) == set(own) - set(rec.layers)
    assert all("cross-attention" in reason for reason in rec.skipped.values())
    grid = _halved(latent, 1, _ceil_half) if downsample else latent
    stride = 2.0 if downsample else 1.0
    for layer, name in enumerate(rec.layers):
        probabilities = own[name][-1]
        _sharp(probabilities)
        _check_map(rec.calls[-1], tokens.calls[-1], layer, _reference(probabilities, grid, stride), grid, stride)


def test_attention_run_outside_the_forward_names_the_module_that_starts_the_map():
    # aMUSEd's map starts at `embed`, Stable Cascade's level 0 at `embedding`: neither has the conv_in of diffusers'
    # UNets, and an attention called before them is refused naming the module that makes its map.
    torch.manual_seed(0)
    amused = diffusers.UVit2DModel(
        hidden_size=32, cond_embed_dim=12, micro_cond_encode_dim=2, micro_cond_embed_dim=10, encoder_hidden_size=12,
        vocab_size=32, codebook_size=16, in_channels=16, block_out_channels=16, num_res_blocks=1, block_num_heads=2,
        num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, sample_size=8)
    cascade = _cascade(patch_size=1)
    cases = [(amused, "transformer_layers.0.attn1", amused.transformer_layers[0].attn1, (1, 12, 32), "embed"),
             (cascade, "down_blocks.0.2.attention", cascade.down_blocks[0][2].attention, (1, 6, 16), "embedding")]
    for model, name, attention, shape, start in cases:
        unet = type(model).__name__
        with pytest.raises(ValueError, match=rf"{name} \(Attention\) of {unet}: it ran before {unet}'s {start} made "
                                             rf"its map, or after the forward of {unet} ended \(which ends its map\), "
                                             "so its latent grid is unknown"):
            with torch.no_grad(), vitmad.record(model, layers=[name]):
                attention(torch.randn(*shape))


# --- TransformerTemporalModel


@pytest.mark.parametrize("double_self_attention", [True, False])
def test_transformer_temporal_model_alone_attends_over_the_frames_of_each_cell(double_self_attention, monkeypatch):
    torch.manual_seed(0)
    model = _sharpen(diffusers.TransformerTemporalModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=16, norm_num_groups=4,
        double_self_attention=double_self_attention, cross_attention_dim=None if double_self_attention else 12),
        scale=6.0)
    batch, frames, grid = 2, 3, (5, 3)
    gen = torch.Generator().manual_seed(4)
    hidden = torch.randn(batch * frames, 16, *grid, generator=gen)
    text = None if double_self_attention else torch.randn(batch * grid[0] * grid[1], 4, 12, generator=gen)

    def run():
        return model(hidden, encoder_hidden_states=text, num_frames=frames).sample

    own = _own_probabilities(model, monkeypatch, run)
    rec, tokens = _record(model, run)
    expected_layers = ["transformer_blocks.0.attn1"] + (["transformer_blocks.0.attn2"] if double_self_attention else [])
    assert rec.layers == expected_layers
    assert list(rec.skipped) == ([] if double_self_attention else ["transformer_blocks.0.attn2"])
    call = tokens.calls[-1]
    for layer, name in enumerate(rec.layers):
        probabilities = own[name][-1]
        assert probabilities.shape == (batch * grid[0] * grid[1], 2, frames, frames)
        expected = _svd_reference(probabilities, "time", batch, frames, grid, 1.0)
        geometry = call.geometry[layer]
        assert (geometry.grid, geometry.stride, geometry.attention, geometry.frames) == (grid, (1.0, 1.0), "time",
                                                                                          frames)
        torch.testing.assert_close(call.per_layer[layer].double(), expected["mad"], **TOL)
        torch.testing.assert_close(call.temporal[layer].double(), expected["temporal"], **TOL)
        torch.testing.assert_close(call.statistics["entropy"][layer].double(), expected["entropy"], **STAT_TOL)
        torch.testing.assert_close(rec.calls[-1].temporal[layer].double(), expected["temporal"].mean(-1), **TOL)


class _HoldsATemporalModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.pool = torch.nn.AvgPool2d(2)
        self.temporal = diffusers.TransformerTemporalModel(num_attention_heads=2, attention_head_dim=8, in_channels=16,
                                                           norm_num_groups=4)

    def forward(self, hidden, frames):
        return self.temporal(self.pool(hidden), num_frames=frames).sample


def test_transformer_temporal_model_inside_another_model_is_refused():
    model = _HoldsATemporalModel()
    with pytest.raises(ValueError, match=r"the TransformerTemporalModel temporal inside _HoldsATemporalModel, which "
                                         r"vitmad does not place"):
        with torch.no_grad(), vitmad.record(model):
            model(torch.randn(4, 16, 6, 6), 2)
