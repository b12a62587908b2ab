"""vitmad.record on Emu3's VQ-VAE (transformers 5.25.0, modeling_emu3.py): its encoder's attention blocks, alone
(``Emu3VQVAE.encode``, images and clips) and inside ``Emu3Model`` / ``Emu3ForConditionalGeneration``.

Tiny random-weight models, sharpened so that attention is far from uniform. The reference is the model's own
attention probabilities, placed by the geometry written here from the model's source, reduced in float64: those of
the forward that is recorded, softmax(q k^T * scale) in float64 of the queries and keys its blocks' ``q_proj`` and
``k_proj`` give in that forward (SDPA), or modeling_emu3's ``eager_attention_forward``'s, caught as it runs (eager).
(Against an eager forward's probabilities an SDPA recording differs by float32 drift between the two forwards, not
vitmad's: 3.6e-4 px per token in the whole model in CI's run, two threads.)

The geometry, from modeling_emu3.py:

- ``Emu3VQVAE.encode`` makes an image ``[B, C, H, W]`` a clip of ``temporal_downsample_factor`` (T) copies of itself
  (``unsqueeze(1).repeat(1, T, 1, 1, 1)``); a clip ``[B, T, C, H, W]`` is taken as it is. ``Emu3VQVAEEncoder.forward``
  folds the frames into the batch (``reshape(-1, C, H, W)``: frame t of clip b at row b * T + t) and runs every
  spatial layer on each frame alone; the temporal convolutions come after the middle block. So each frame's attention
  is over its own map, and the attention's batch is B * T.
- ``conv_in`` is 3 x 3, stride 1, padding 1; the ResNet blocks' convolutions 3 x 3, padding 1 (1 x 1 shortcuts): the
  size kept. Each stage but the last ends in ``Emu3VQVAEEncoderConvDownsample``: ``F.pad(x, (0, 1, 0, 1))`` then a
  3 x 3 convolution of stride 2, padding 0: ``floor((n + 1 - 3) / 2) + 1 = floor(n / 2)`` rows and columns. Stage i
  runs on the map halved i times, cells 2^i px apart; the middle block on the last stage's map.
- ``Emu3VQVAEDownBlock.forward``: in a stage of ``attn_resolutions``, after ResNet block j, ``attn_norms[j]`` (a
  GroupNorm), then ``view(B, C, H * W).transpose(1, 2)``: the map's cells row-major, the tokens of
  ``Emu3VQVAEAttentionBlock`` ``attn[j]``, multi-head (``num_attention_heads``) through the attention interface,
  no mask, not causal. ``Emu3VQVAEMiddleBlock`` does the same with ``attn_norm`` and ``attn_1``.

Cell (r, c) of a map of stride s is at ((r + 0.5) s, (c + 0.5) s) px: the centre of its stride cell.
"""

from __future__ import annotations

import math

import pytest
import torch

import vitmad
from conftest import eager_attention_calls, run_hooked, sharpened, statistics_reference

transformers = pytest.importorskip("transformers")
modeling_emu3 = pytest.importorskip("transformers.models.emu3.modeling_emu3")

STATS = ["entropy", "prefix_mass"]
TOL = {"rtol": 1e-5, "atol": 1e-4}  # pixels: float32 attention against a float64 reference
STAT_TOL = {"rtol": 1e-5, "atol": 1e-6}  # nats and masses

# Stages 1 and 2 attend (attn_resolutions: stage indices), two ResNet blocks each: attn.0 and attn.1 with their own
# norms; the attention width hidden_size is those stages' channels (32 * 2); T = 2 copies of an image.
VQ = dict(codebook_size=64, embed_dim=8, latent_channels=8, temporal_downsample_factor=2, base_channels=32,
          channel_multiplier=(1, 2, 2), num_res_blocks=2, attn_resolutions=(1, 2), hidden_size=64,
          num_attention_heads=2)
ENCODER_LAYERS = ["encoder.down_block.down.1.attn.0", "encoder.down_block.down.1.attn.1",
                  "encoder.down_block.down.2.attn.0", "encoder.down_block.down.2.attn.1", "encoder.middle_block.attn_1"]
STAGE_OF_LAYER = [1, 1, 2, 2, 2]  # the middle block runs on the last stage's map


def _stage_map(height: int, width: int, stage: int) -> tuple[tuple[int, int], float]:
    """The map of encoder stage ``stage`` for a ``height x width`` frame and its stride in px: each downsampling
    pads bottom and right by one and convolves 3 x 3 with stride 2, ``floor(n / 2)``."""
    for _ in range(stage):
        height, width = height // 2, width // 2
    return (height, width), float(2 ** stage)


def _centres(grid: tuple[int, int], stride: float, *, column_major: bool = False) -> torch.Tensor:
    """``[h * w, 2]`` float64: the centre of each cell in token order (row-major; ``column_major`` is a wrong order,
    to show that the test would see a misplaced token)."""
    rows, cols = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
    cells = torch.stack([rows, cols], -1)
    cells = cells.transpose(0, 1) if column_major else cells
    return (cells.reshape(-1, 2).double() + 0.5) * stride


def _redraw(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` sharpened (every Linear, q / k / v among them, drawn with std 0.25) and every Conv2d drawn with std
    fan_in^-1/2: Emu3 initialises its convolutions by fan_out (kaiming), small where a layer widens the channels,
    which leaves the maps faint."""
    sharpened(model)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Conv2d):
                module.weight.normal_(std=module.weight[0].numel() ** -0.5)
    return model


def _vq_vae() -> torch.nn.Module:
    torch.manual_seed(0)
    return _redraw(transformers.Emu3VQVAE(transformers.Emu3VQVAEConfig(**VQ)).eval())


def _eager_maps(model: torch.nn.Module, vq_vae: torch.nn.Module, run, *inputs, **kwargs) -> list[torch.Tensor]:
    """The probabilities ``[B * T, H, N, N]`` float64 of every eager call of an encoder attention block in one
    ``run(*inputs, **kwargs)``, in call order (the language model's calls, through the same function, left out);
    ``model`` (which ``run`` belongs to) back to SDPA after."""
    calls = eager_attention_calls(modeling_emu3, run, *inputs, switched=model, **kwargs)
    model.set_attn_implementation("sdpa")
    calls = [(module, p) for module, p in calls if type(module).__name__ == "Emu3VQVAEAttentionBlock"]
    assert [module for module, _ in calls] == [vq_vae.get_submodule(n) for n in ENCODER_LAYERS]
    return [probabilities for _, probabilities in calls]


def _own_maps(vq_vae: torch.nn.Module, run) -> list[torch.Tensor]:
    """The probabilities ``[B * T, H, N, N]`` float64 of every encoder attention block in one ``run()`` as it runs
    (its SDPA forward): softmax(q k^T * scale) of the queries and keys its ``q_proj`` and ``k_proj`` give, ``[B, N,
    C]`` split into the block's heads, in call order."""
    blocks = [vq_vae.get_submodule(n) for n in ENCODER_LAYERS]
    seen: dict = {}

    def keep(key):
        def hook(module, args, out) -> None:  # returns None: the output is the model's, unchanged
            seen.setdefault(key, out.detach().double())
        return hook

    handles = [getattr(block, projection).register_forward_hook(keep((i, projection)))
               for i, block in enumerate(blocks) for projection in ("q_proj", "k_proj")]
    run_hooked(handles, run)
    maps = []
    for i, block in enumerate(blocks):
        def heads(x: torch.Tensor, block=block) -> torch.Tensor:  # [B, N, C] -> [B, H, N, C / H]
            return x.unflatten(-1, (block.num_heads, block.head_dim)).transpose(1, 2)
        logits = heads(seen[i, "q_proj"]) @ heads(seen[i, "k_proj"]).transpose(-1, -2) * block.scale
        maps.append(logits.softmax(-1))
    return maps


def _check(rec, rec_tokens, maps: list[torch.Tensor], frame: tuple[int, int], rows: int, prefix: str = "") -> None:
    """Each recorded layer against the probabilities of the forward it recorded, placed on its stage's map of a
    ``frame``-sized frame: geometry, MAD (mean and per token), entropy and prefix mass (zero: every token is a
    cell), ``rows`` frames."""
    tolerances = {"entropy": STAT_TOL, "prefix_mass": STAT_TOL}
    assert rec.layers == [prefix + n for n in ENCODER_LAYERS] and rec.skipped == {}
    for layer, (probabilities, stage) in enumerate(zip(maps, STAGE_OF_LAYER, strict=True)):
        grid, stride = _stage_map(*frame, stage)
        geometry = rec.geometry[layer]
        assert geometry.grid == grid and geometry.stride == (stride, stride) and geometry.heads == 2
        assert probabilities.shape == (rows, 2, grid[0] * grid[1], grid[0] * grid[1])
        expected = statistics_reference(probabilities, _centres(grid, stride))
        # Far from uniform attention, and a token order the test would tell apart: a wrong placement shows.
        assert float(expected["entropy"].mean()) < 0.75 * math.log(probabilities.shape[-1])
        wrong = statistics_reference(probabilities, _centres(grid, stride, column_major=True))["mad"].mean(-1)
        assert float((wrong - expected["mad"].mean(-1)).abs().max()) > 0.05 * stride
        torch.testing.assert_close(rec_tokens.per_layer[layer].double(), expected["mad"], **TOL)
        torch.testing.assert_close(rec.per_layer[layer].double(), expected["mad"].mean(-1), **TOL)
        for stat in STATS:
            # Per token on stages of different maps: per layer, not stacked (rec_tokens.stats).
            torch.testing.assert_close(rec_tokens.calls[-1].statistics[stat][layer].double(), expected[stat],
                                       **tolerances[stat])
            torch.testing.assert_close(rec.stats[stat][layer].double(), expected[stat].mean(-1), **tolerances[stat])
        assert float(rec.stats["prefix_mass"][layer].abs().max()) == 0.0


def _record(model: torch.nn.Module, run, output, attention: str) -> tuple:
    """``(mean recording, per-token recording)`` of ``run()`` with ``model`` on ``attention``; the output
    (``output`` of what ``run`` returns) the same as without recording, bit for bit."""
    model.set_attn_implementation(attention)
    try:
        with torch.no_grad():
            plain = output(run())
            with vitmad.record(model, stats=STATS) as rec:
                recorded = output(run())
            with vitmad.record(model, stats=STATS, reduction="none") as rec_tokens:
                run()
    finally:
        model.set_attn_implementation("sdpa")
    assert torch.equal(plain, recorded)
    return rec, rec_tokens


def _encoded(output) -> torch.Tensor:
    return torch.cat([output.last_hidden_state.flatten(), *(codes.flatten().double() for codes in output.image_tokens)])


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_emu3_vq_vae_encode_places_each_block_on_its_stage_map(attention):
    """Two 37 x 45 images, each encoded as T = 2 copies (4 rows): stage 1 attends over 18 x 22 cells 2 px apart,
    stage 2 and the middle block over 9 x 11 cells 4 px apart, two heads each (Emu3's VQ-VAE was refused before
    2026-12-05: no patch embedding, and its blocks see flattened tokens without the map's shape)."""
    model = _vq_vae()
    pixels = torch.randn(2, 3, 37, 45, generator=torch.Generator().manual_seed(1))
    sizes = torch.tensor([[37, 45], [37, 45]])
    if attention == "eager":
        maps = _eager_maps(model, model, model.encode, pixels, sizes)
    else:
        maps = _own_maps(model, lambda: model.encode(pixels, sizes))
    rec, rec_tokens = _record(model, lambda: model.encode(pixels, sizes), _encoded, attention)
    _check(rec, rec_tokens, maps, (37, 45), rows=4)
    # An image's T copies are the same frame: their rows agree.
    torch.testing.assert_close(rec.mad[:, 0::2], rec.mad[:, 1::2], rtol=0, atol=0)


def test_emu3_vq_vae_encode_of_a_clip_attends_within_each_frame():
    """A clip [B, T, C, H, W] (2 clips of 4 frames, 26 x 35 px): frame t of clip b is row b * T + t of every layer,
    attending over its own 13 x 17 (stage 1) or 6 x 8 (stage 2, middle) map; the temporal convolutions after the
    middle block see no attention."""
    model = _vq_vae()
    clips = torch.randn(2, 4, 3, 26, 35, generator=torch.Generator().manual_seed(2))
    sizes = torch.tensor([[26, 35], [26, 35]])
    maps = _own_maps(model, lambda: model.encode(clips, sizes))
    rec, rec_tokens = _record(model, lambda: model.encode(clips, sizes), _encoded, "sdpa")
    _check(rec, rec_tokens, maps, (26, 35), rows=8)
    # Each row is its own frame: the frames differ, so do their MADs.
    assert float((rec.mad[:, 0] - rec.mad[:, 1]).abs().max()) > 1e-3


# The whole model: Emu3Model.get_image_features runs vqmodel.encode once on the batch of images, padded by the
# processor at the bottom and right to the largest (image_sizes crop only the codes after the encoder, so the encoder
# attends over the padding as over the image), and puts (h // 4) * (w // 4 + 1) tokens per image (a row of codes and
# an end-of-line token per row) in place of the <image> tokens. Its language model (causal) is not the tower.
VOCABULARY = {"<image>": 5, "<|extra_200|>": 6, **{f"<|visual token {code:06d}|>": 100 + code for code in range(64)}}
TEXT = dict(vocab_size=200, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1, pad_token_id=3, bos_token_id=1, eos_token_id=2)


@pytest.mark.parametrize("cls, output", [("Emu3ForConditionalGeneration", "logits"),
                                         ("Emu3Model", "last_hidden_state")])
def test_emu3_whole_model_records_its_vq_encoder_not_its_language_model(cls, output):
    """Two images, 37 x 45 and 29 x 41 padded to 37 x 45 (image_sizes), in one forward: one run of the encoder
    on the padded batch (4 rows: 2 copies each), its blocks recorded, the language model's attention not."""
    config = transformers.Emu3Config(vq_config=VQ, text_config=TEXT, vocabulary_map=VOCABULARY)
    torch.manual_seed(0)
    model = _redraw(getattr(transformers, cls)(config).eval())
    vq_vae = model.get_submodule("model.vqmodel" if cls == "Emu3ForConditionalGeneration" else "vqmodel")
    pixels = torch.randn(2, 3, 37, 45, generator=torch.Generator().manual_seed(1))
    pixels[1, :, 29:] = 0
    pixels[1, :, :, 41:] = 0
    sizes = torch.tensor([[37, 45], [29, 41]])
    image_tokens = (37 // 4) * (45 // 4 + 1) + (29 // 4) * (41 // 4 + 1)
    inputs = dict(input_ids=torch.tensor([[1] + [5] * image_tokens + [10, 11]]), pixel_values=pixels,
                  image_sizes=sizes)
    # The eager forward's calls are this model's blocks, and none of its language model's.
    assert len(_eager_maps(model, vq_vae, model, **inputs)) == len(ENCODER_LAYERS)
    maps = _own_maps(vq_vae, lambda: model(**inputs))
    rec, rec_tokens = _record(model, lambda: model(**inputs), lambda out: getattr(out, output), "sdpa")
    prefix = "model.vqmodel." if cls == "Emu3ForConditionalGeneration" else "vqmodel."
    _check(rec, rec_tokens, maps, (37, 45), rows=4, prefix=prefix)
    assert len(rec.calls) == 1


def test_emu3_generate_records_the_encoder_once():
    """generate encodes the image in its first step alone (32 x 40 px: 8 x 10 cells at stride 4): one call, the
    generated tokens the same as without recording."""
    config = transformers.Emu3Config(vq_config=VQ, text_config=TEXT, vocabulary_map=VOCABULARY)
    torch.manual_seed(0)
    model = _redraw(transformers.Emu3ForConditionalGeneration(config).eval())
    inputs = dict(input_ids=torch.tensor([[1] + [5] * (8 * 11) + [10]]),
                  pixel_values=torch.randn(1, 3, 32, 40, generator=torch.Generator().manual_seed(1)),
                  image_sizes=torch.tensor([[32, 40]]))
    with torch.no_grad():
        plain = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        with vitmad.record(model) as rec:
            generated = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert torch.equal(plain, generated)
    assert len(rec.calls) == 1 and rec.layers == ["model.vqmodel." + n for n in ENCODER_LAYERS]
    assert rec.geometry[-1].grid == (8, 10) and rec.mad.shape == (5, 2, 2)


def test_emu3_vq_vae_decoder_attention_is_skipped_when_named():
    """The decoder's blocks attend over a map decoded from codes, no input image's: outside the tower (the encoder),
    not recorded by default; named in layers=, skipped with that reason. decode runs unchanged under recording."""
    model = _vq_vae()
    pixels = torch.randn(1, 3, 32, 40, generator=torch.Generator().manual_seed(1))
    sizes = torch.tensor([[32, 40]])
    with torch.no_grad():
        codes = model.encode(pixels, sizes).image_tokens[0][None]
        plain = model.decode(codes)
        with vitmad.record(model, layers=["*.attn_1"]) as rec:
            model.encode(pixels, sizes)
            decoded = model.decode(codes)
    assert torch.equal(plain, decoded)
    assert rec.layers == ["encoder.middle_block.attn_1"]
    assert list(rec.skipped) == ["decoder.middle_block.attn_1"]
    assert "decodes from image codes" in rec.skipped["decoder.middle_block.attn_1"]
    assert rec.geometry[0].grid == (8, 10) and rec.geometry[0].stride == (4.0, 4.0)


def test_emu3_vq_vae_block_whose_tokens_are_not_its_map_is_refused():
    """The map is read where the middle block normalises it (attn_norm) and checked against the attention's token
    count: a map changed between the two (its last row cropped by a hook: 8 x 11 tokens for a 9 x 11 map seen) is
    refused with the layer's name, never placed on the wrong map."""
    model = _vq_vae()
    pixels = torch.randn(1, 3, 37, 45, generator=torch.Generator().manual_seed(1))
    model.encoder.middle_block.attn_norm.register_forward_hook(lambda module, args, out: out[:, :, :-1])
    with torch.no_grad(), vitmad.record(model, layers=["encoder.middle_block.attn_1"]):
        with pytest.raises(ValueError, match=r"encoder\.middle_block\.attn_1 \(Emu3VQVAEAttentionBlock\).*88, 88\], "
                                             r"expected 99 queries and keys .*9x11 map"):
            model.encode(pixels, torch.tensor([[37, 45]]))


def test_emu3_encoder_block_held_elsewhere_is_refused():
    """A block in the encoder but neither a stage's attn[j] nor the middle block's attn_1 has no norm vitmad knows to
    read its map from: refused with the layer's name and what to pass, not placed on a guessed map."""
    model = _vq_vae()
    model.encoder.add_module("extra_attention", modeling_emu3.Emu3VQVAEAttentionBlock(model.config))
    tokens = torch.randn(1, 12, VQ["hidden_size"])
    with torch.no_grad(), vitmad.record(model, layers=["encoder.extra_attention"]):
        with pytest.raises(ValueError, match=r"encoder\.extra_attention \(Emu3VQVAEAttentionBlock\).*held otherwise.*"
                                             r"positions="):
            model.encoder.extra_attention(tokens)
