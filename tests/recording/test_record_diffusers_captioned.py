"""vitmad.record on the diffusers image transformers whose forward builds one sequence of the latent's patches and
their conditioning tokens: ERNIE-Image (caption after the image, its padding masked), HiDream-I1 (a non-square
latent padded to ``max_seq`` with attended zero-key tokens, then the caption; double- and single-stream blocks) and
OmniGen (its prompt, input images' patches and time token before the latent's patches).

Tiny random-weight models, sharpened (every Linear redrawn, the query norm's weight or the query projection scaled)
so that attention is far from uniform. The reference is the model's own attention: every
``F.scaled_dot_product_attention`` its processors call (HiDream's and OmniGen's directly, ERNIE's through
``dispatch_attention_fn``'s native backend) is wrapped here, and its softmax computed in float64 from the ``q``,
``k`` and mask it was given (RoPE and q / k norms already applied). The tokens are placed by geometry written here
from diffusers 0.42.1's source, in latent pixels of the transformer's input:

- ERNIE-Image: ``x_embedder.proj``, a ``Conv2d`` of kernel = stride = ``patch_size``, flattened row-major; its forward
  attends over ``cat([image, text_bth])``: the caption's ``T`` tokens after the patches, without a position.
- HiDream: ``patchify`` cuts whole ``p x p`` patches row-major; a latent with H != W is padded to ``max_seq =
  max_resolution[0] * max_resolution[1] / p**2`` tokens (zero keys, attended with logit 0); double blocks attend over
  ``cat([image and pads, T5, Llama[-1], Llama[block]])``, single blocks over the same order.
- OmniGen: ``cat([the prompt's embedded ids (an input image's patches written over its placeholders), the time token,
  the latent's patches])``: the latent's ``output_image_proj`` patches last, row-major, the only tokens with a
  position.
"""

from __future__ import annotations

import math

import pytest
import torch
from test_record_diffusers_images import _attention_maps, _positions, _record  # the SDPA spy, masks included

import vitmad
from conftest import sharpened, statistics_reference

diffusers = pytest.importorskip("diffusers")

TOL = {"rtol": 1e-5, "atol": 1e-4}  # float32 flash-MAD against float64 on the same q and k; atol in latent pixels
STAT_TOL = {"rtol": 1e-5, "atol": 1e-6}
STATS = ["entropy", "prefix_mass", "prefix_maps"]


def _check(mean, tokens, layer: int, probabilities, grid, stride: float, before: int, after: int) -> None:
    """Layer ``layer`` of a call of the mean and per-token recordings (``RecordedCall``) against its map
    ``[B, H, N, N]``: ``before`` tokens without a position, the row-major grid, ``after`` tokens without one."""
    positions = _positions(grid, stride, before, after)
    assert probabilities.shape[-1] == len(positions)
    expected = statistics_reference(probabilities, positions)
    assert float(expected["entropy"].mean()) < 0.75 * math.log(probabilities.shape[-1])  # far from uniform
    geometry = mean.geometry[layer]
    assert geometry.grid == grid and geometry.stride == (stride, stride)
    assert geometry.num_prefix_tokens == before and (geometry.num_suffix_tokens or 0) == after
    torch.testing.assert_close(tokens.per_layer[layer].double(), expected["mad"], **TOL)
    torch.testing.assert_close(mean.per_layer[layer].double(), expected["mad"].mean(-1), **TOL)
    for stat in ("entropy", "prefix_mass"):
        torch.testing.assert_close(tokens.statistics[stat][layer].double(), expected[stat], **STAT_TOL)
        torch.testing.assert_close(mean.statistics[stat][layer].double(), expected[stat].mean(-1), **STAT_TOL)
    # A token whose every key is masked would attend to nothing: its row NaN, as the model's own.
    torch.testing.assert_close(mean.prefix_maps[layer].double(), expected["prefix_maps"], equal_nan=True, **STAT_TOL)


def _scale_norms(model: torch.nn.Module, names: tuple[str, ...], scale: float) -> torch.nn.Module:
    """The logits ``scale`` times larger through the weight of the query norms ``names`` (RMS norms after the query
    projections, which would undo a scaled projection)."""
    with torch.no_grad():
        for module in model.modules():
            for name in names:
                norm = getattr(module, name, None)
                if isinstance(norm, torch.nn.RMSNorm):
                    norm.weight.mul_(scale)
    return model


# ERNIE-Image ---------------------------------------------------------------------------------------------------------


def _ernie(patch: int = 2):
    torch.manual_seed(0)
    return _scale_norms(sharpened(diffusers.ErnieImageTransformer2DModel(
        hidden_size=32, num_attention_heads=2, num_layers=2, ffn_hidden_size=32, in_channels=4, out_channels=4,
        patch_size=patch, text_in_dim=12, rope_axes_dim=(4, 6, 6))), ("norm_q",), 4.0)


def test_ernie_image_caption_last_padding_masked_two_steps(monkeypatch):
    model = _ernie()
    latent, text = torch.randn(2, 4, 6, 10), 4  # 3 x 5 patches of 2 x 2 latent pixels
    caption, lengths = torch.randn(2, text, 12), torch.tensor([4, 2])  # entry 1's caption: 2 tokens, 2 of padding
    steps = [torch.tensor([900.0, 900.0]), torch.tensor([20.0, 20.0])]

    def run_steps():
        return [model(latent, t, caption, lengths) for t in steps][-1]

    maps, spied = _attention_maps(monkeypatch, run_steps)
    assert len(maps) == 4
    rec, rec_tokens = _record(model, run_steps, spied)
    assert len(rec.calls) == len(rec_tokens.calls) == 2 and rec.skipped == {}
    assert rec.layers == ["layers.0.self_attention", "layers.1.self_attention"]
    grid, patches = (3, 5), 15
    for call in range(2):
        for layer in range(2):
            probabilities = maps[2 * call + layer]
            assert float(probabilities[1, :, :, patches + 2:].abs().max()) == 0.0  # the padding is no key
            _check(rec.calls[call], rec_tokens.calls[call], layer, probabilities, grid, 2.0, 0, text)
    assert rec.calls[0].geometry[0].attention == "global, caption last"
    # The timestep changes the attention: each step keeps its own MAD.
    assert not torch.equal(rec.calls[0].mad, rec.calls[1].mad)


def test_ernie_image_caption_without_a_projection(monkeypatch):
    """text_in_dim equal to the width: no text_proj, so nothing but the sequence's ids tells the caption's length."""
    torch.manual_seed(0)
    model = _scale_norms(sharpened(diffusers.ErnieImageTransformer2DModel(
        hidden_size=16, num_attention_heads=2, num_layers=1, ffn_hidden_size=32, in_channels=4, out_channels=4,
        patch_size=1, text_in_dim=16, rope_axes_dim=(2, 2, 4))), ("norm_q",), 4.0)
    assert model.text_proj is None
    latent, caption = torch.randn(1, 4, 3, 5), torch.randn(1, 3, 16)

    def run():
        return model(latent, torch.tensor([300.0]), caption, torch.tensor([3]))

    maps, spied = _attention_maps(monkeypatch, run)
    rec, rec_tokens = _record(model, run, spied)
    assert rec.layers == ["layers.0.self_attention"]
    _check(rec.calls[0], rec_tokens.calls[0], 0, maps[0], (3, 5), 1.0, 0, 3)


class _AttentionVitmadDoesNotSee:
    """A processor that attends where vitmad does not look (a custom kernel): here it computes nothing."""

    def __call__(self, attn, hidden_states, *args, **kwargs):
        return hidden_states


def test_ernie_image_processor_out_of_sight_refused():
    model = _ernie()
    model.layers[1].self_attention.set_processor(_AttentionVitmadDoesNotSee())
    with torch.no_grad(), vitmad.record(model), pytest.raises(ValueError, match=(
            r"layers\.1\.self_attention \(ErnieImageAttention\) of ErnieImageTransformer2DModel: it runs the "
            "attention processor _AttentionVitmadDoesNotSee;")):
        model(torch.randn(1, 4, 4, 4), torch.tensor([10.0]), torch.randn(1, 3, 12), torch.tensor([3]))


# HiDream -------------------------------------------------------------------------------------------------------------


def _hidream():
    torch.manual_seed(0)
    return _scale_norms(sharpened(diffusers.HiDreamImageTransformer2DModel(
        patch_size=2, in_channels=4, out_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8,
        num_attention_heads=2, caption_channels=[12, 10], text_emb_dim=6, num_routed_experts=2,
        num_activated_experts=1, axes_dims_rope=(4, 2, 2), max_resolution=(8, 12), llama_layers=(0, 1))),
        ("q_rms_norm", "q_rms_norm_t"), 4.0)


def _hidream_inputs(height: int, width: int, t5: int, llama: int) -> dict:
    """What HiDreamImagePipeline passes: the [B, C, H, W] latent, T5's caption, the Llama layers' hidden states
    ``[layers, B, L, D]`` (llama_layers picks one per block), the pooled embedding."""
    return {"hidden_states": torch.randn(2, 4, height, width), "encoder_hidden_states_t5": torch.randn(2, t5, 12),
            "encoder_hidden_states_llama3": torch.randn(2, 2, llama, 10), "pooled_embeds": torch.randn(2, 6)}


@pytest.mark.parametrize("height, width", [(6, 10), (6, 6)])  # 3 x 5 patches padded to max_seq 24; 3 x 3, not
def test_hidream_padding_and_caption_after_the_image_two_steps(monkeypatch, height, width):
    model = _hidream()
    t5, llama = 4, 3
    inputs = _hidream_inputs(height, width, t5, llama)
    steps = [torch.tensor([900.0, 900.0]), torch.tensor([20.0, 20.0])]

    def run_steps():
        return [model(timesteps=t, **inputs) for t in steps][-1]

    maps, spied = _attention_maps(monkeypatch, run_steps)
    rec, rec_tokens = _record(model, run_steps, spied)
    assert len(rec.calls) == len(rec_tokens.calls) == 2 and rec.skipped == {}
    assert rec.layers == ["double_stream_blocks.0.block.attn1", "single_stream_blocks.0.block.attn1"]
    grid = (height // 2, width // 2)
    patches = grid[0] * grid[1]
    # patchify pads a latent with H != W to max_seq = 8 * 12 / 2**2 tokens; every block's caption is
    # cat([T5, the last Llama layer's, this block's Llama layer's]).
    pads = 24 - patches if height != width else 0
    caption = t5 + llama + llama
    for call in range(2):
        for layer in range(2):
            probabilities = maps[2 * call + layer]
            if pads:
                # Their keys are zeroed, not masked: logit 0, so they draw mass (in prefix_mass).
                assert float(probabilities[:, :, :patches, patches:patches + pads].sum(-1).min()) > 0.0
            _check(rec.calls[call], rec_tokens.calls[call], layer, probabilities, grid, 2.0, 0, pads + caption)
    assert rec.calls[0].geometry[0].attention == ("global, padding and caption last" if pads else
                                                 "global, caption last")
    assert not torch.equal(rec.calls[0].mad, rec.calls[1].mad)


def test_hidream_refuses_a_patchified_latent():
    model = _hidream()
    inputs = _hidream_inputs(6, 10, 2, 2)
    # The patchified path: [B, max_seq, p * p * C] with the caller's masks, ids and sizes.
    tokens, masks, sizes, ids = model.patchify(inputs.pop("hidden_states"))
    with torch.no_grad(), vitmad.record(model), pytest.raises(ValueError, match="given patchified"):
        model(tokens, timesteps=torch.tensor([5.0, 5.0]), hidden_states_masks=masks, img_ids=ids, img_sizes=sizes,
              **inputs)


# OmniGen -------------------------------------------------------------------------------------------------------------


def _omnigen():
    torch.manual_seed(0)
    model = sharpened(diffusers.OmniGenTransformer2DModel(
        hidden_size=16, num_attention_heads=2, num_key_value_heads=2, intermediate_size=32, num_layers=2,
        pad_token_id=0, vocab_size=64, in_channels=4, time_step_dim=4, rope_scaling={
            "long_factor": [1.0, 1.0, 1.0, 1.0], "short_factor": [1.0, 1.0, 1.0, 1.0]}))
    with torch.no_grad():
        for layer in model.layers:
            layer.self_attn.to_q.weight.mul_(4.0)
    return model


def test_omnigen_latent_last_after_prompt_input_image_and_time_token(monkeypatch):
    model = _omnigen()
    # OmniGenCollator: entry 0's prompt of 9 ids (an input image's 2 x 3 patches over its placeholders 2..7), entry
    # 1's of 7, left-padded with 2 pad ids; the mask causal over [prompt, time token], every latent patch seeing all
    # but the padding, the input image's patches each other; position ids from 0 after the padding.
    text, image = 9, (2, 3)
    latent = torch.randn(2, 4, 6, 10)  # 3 x 5 patches
    patches = 15
    length = text + 1 + patches
    kept = torch.zeros(2, length, length)
    position_ids = torch.zeros(2, length, dtype=torch.long)
    for entry, pad in enumerate((0, 2)):
        own = length - pad
        mask = torch.ones(own, own)
        mask[:text - pad + 1] = torch.tril(torch.ones(text - pad + 1, own))
        kept[entry, pad:, pad:] = mask
        kept[entry, :pad, :] = 1.0  # OmniGenCollator: a padding row attends to everything
        position_ids[entry, pad:] = torch.arange(own)
    kept[0, 2:8, 2:8] = 1.0  # adjust_attention_for_input_images
    input_ids = torch.randint(1, 64, (2, text), generator=torch.Generator().manual_seed(1))
    input_ids[1, :2] = 0
    input_image = torch.randn(1, 4, 2 * image[0], 2 * image[1])

    def run():
        return model(latent, torch.tensor([0.5, 0.5]), input_ids, [input_image], {0: [[2, 8]]}, kept, position_ids)

    maps, spied = _attention_maps(monkeypatch, run)
    rec, rec_tokens = _record(model, run, spied)
    assert rec.layers == ["layers.0.self_attn", "layers.1.self_attn"] and rec.skipped == {}
    for layer, probabilities in enumerate(maps):
        assert float(probabilities[1, :, 2:, :2].abs().max()) < 1e-30  # the padding: masked by the dtype's min
        assert float(probabilities[0, :, text + 1:, 2:8].sum(-1).min()) > 0.0  # the input image: attended
        _check(rec.calls[0], rec_tokens.calls[0], layer, probabilities, (3, 5), 2.0, text + 1, 0)
    assert rec.calls[0].geometry[0].attention == "global, prompt and time token first"


def test_omnigen_without_a_prompt(monkeypatch):
    """input_ids None: the sequence is the time token and the latent's patches."""
    model = _omnigen()
    latent = torch.randn(1, 4, 4, 6)

    def run():
        return model(latent, torch.tensor([0.2]), None, [], {}, None, torch.arange(7)[None])

    maps, spied = _attention_maps(monkeypatch, run)
    rec, rec_tokens = _record(model, run, spied)
    for layer, probabilities in enumerate(maps):
        _check(rec.calls[0], rec_tokens.calls[0], layer, probabilities, (2, 3), 2.0, 1, 0)
