"""vitmad.record on diffusers' video transformers of the third wave: LTX-2, FramePack, Motif-Video and Kandinsky 6;
the refusals of the others by name.

Tiny random-weight models, their query / key projections drawn anew and their q / k norm gains raised so that
attention is far from uniform. The reference is each model's own attention: the probabilities of every
F.scaled_dot_product_attention call its processor makes (diffusers' native dispatch_attention_fn calls it), from
the q, k (RoPE applied), scale and mask it handed SDPA (``_own_attention`` of test_record_diffusers_video). Placed by
geometry written here from reading the models' source:

- LTX-2: its pipeline's ``_pack_latents`` (patch 1): one token per latent cell, ``[B, F * H * W, C]`` in (frame,
  row, column) order; the audio tokens attend in modules of their own (skipped).
- FramePack (``_pack_history_states``): the 4x history latents' tubelets (kernel 4x8x8), then the 2x ones (2x4x4),
  then the clean ones (1x2x2), then the current tubelets (1x2x2), each in (frame, row, column) order on the current
  latents' pixels, each frame at the index its forward was given (a tubelet of k frames at the middle of them); then
  the image and text tokens, without a position. ``HunyuanVideoHistoryPatchEmbed`` pads the 2x and 4x history with
  ``_pad_for_3d_conv`` (``F.pad(..., mode="replicate")`` at the end of the frames, rows and columns, up to
  multiples of the kernel), so they have ``ceil`` of each side over the kernel tubelets, each at the centre of its
  cell of the padded grid, a padded kernel's frames continuing its first index; the clean and current latents go to
  their ``Conv3d`` as they are (``floor``).
- Motif-Video: the ``Conv3d`` tubelets (``flatten(2)``), then its image and text tokens.
- Kandinsky 6: channels-last latents ``[B, F, H, W, C]`` reshaped into ``[B, F, H/2, W/2, ...]`` tubelets and
  flattened: (frame, row, column).
"""

from __future__ import annotations

import math

import pytest
import torch

import vitmad

diffusers = pytest.importorskip("diffusers")

from test_record_diffusers_video import (  # noqa: E402
    BATCH,
    STAT_TOL,
    STATS,
    TEXT,
    TEXT_DIM,
    TOL,
    _check,
    _own_attention,
)
from test_record_diffusers_video_2 import _recorded_and_reference, _sharpened  # noqa: E402

from conftest import statistics_reference  # noqa: E402


def _steps(model, layers, run, steps):
    """The model's own attention maps of ``layers`` for each timestep of ``steps`` and one recording of the same
    calls, one per step (rec.calls keeps them apart); asserts every output is bit-identical."""
    maps, plain = [], []
    for step in steps:
        maps.append(_own_attention(model, layers, lambda s=step: plain.append(run(s))))
    with torch.no_grad(), vitmad.record(model, reduction="none", stats=STATS) as rec:
        recorded = [run(step) for step in steps]
    assert all(torch.equal(a, b) for a, b in zip(recorded, plain)) and rec.layers == layers
    assert len(rec.calls) == len(steps)
    return rec, maps


# LTX-2 ------------------------------------------------------------------------------------------------------------

def _ltx2():
    torch.manual_seed(0)
    return _sharpened(diffusers.LTX2VideoTransformer3DModel(
        in_channels=4, out_channels=4, patch_size=1, patch_size_t=1, num_attention_heads=2, attention_head_dim=8,
        cross_attention_dim=16, audio_in_channels=4, audio_out_channels=4, audio_num_attention_heads=2,
        audio_attention_head_dim=4, audio_cross_attention_dim=8, num_layers=2, caption_channels=TEXT_DIM,
        rope_double_precision=False))


def _ltx2_inputs(model, frames: int, height: int, width: int, batch: int = BATCH) -> dict:
    """What LTX2Pipeline hands its transformer: the latents packed (``_pack_latents``, patch 1: ``[B, C, F, H, W]``
    -> ``[B, F * H * W, C]``), the audio latents, both captions, and ``video_coords`` as it computes them."""
    torch.manual_seed(2)
    latents = torch.randn(batch, 4, frames, height, width)
    return dict(hidden_states=latents.permute(0, 2, 3, 4, 1).reshape(batch, -1, 4),
                audio_hidden_states=torch.randn(batch, 6, 4), encoder_hidden_states=torch.randn(batch, TEXT, TEXT_DIM),
                audio_encoder_hidden_states=torch.randn(batch, TEXT, TEXT_DIM),
                encoder_attention_mask=torch.ones(batch, TEXT, dtype=torch.bool), num_frames=frames, height=height,
                width=width, audio_num_frames=6, fps=25.0,
                video_coords=model.rope.prepare_video_coords(batch, frames, height, width, torch.device("cpu"),
                                                             fps=25.0))


def test_ltx2_video_self_attention_over_the_packed_latent_cells_audio_skipped():
    """LTX-2: attn1 over 3 latent frames of 5x7 latent pixels (packed, one token per cell), the pipeline's
    video_coords; two denoising steps kept apart; the audio self-attention, both caption cross-attentions and the
    audio-video cross-attentions skipped."""
    model = _ltx2()
    inputs = _ltx2_inputs(model, 3, 5, 7)
    layers = ["transformer_blocks.0.attn1", "transformer_blocks.1.attn1"]
    rec, maps = _steps(model, layers, lambda t: model(**inputs, timestep=t)[0],
                       [torch.tensor([900.0, 900.0]), torch.tensor([100.0, 100.0])])
    names = ("attn2", "audio_attn1", "audio_attn2", "audio_to_video_attn", "video_to_audio_attn")
    assert set(rec.skipped) == {f"transformer_blocks.{i}.{name}" for i in (0, 1) for name in names}
    assert "audio tokens" in rec.skipped["transformer_blocks.0.audio_to_video_attn"]
    for call in range(2):
        _check(rec, call, maps[call], frames=3, grid=(5, 7), patch=1, frame_size=1)
    assert not torch.allclose(rec.calls[0].per_layer[1], rec.calls[1].per_layer[1])


def test_ltx2_video_coords_of_another_layout_are_refused():
    """Coordinates that are not the grid's (here: shifted by one latent frame, as a conditioning pipeline's tokens
    at coordinates of their own would be): refused, not placed on the grid."""
    model = _ltx2()
    inputs = _ltx2_inputs(model, 2, 4, 6, batch=1)
    inputs["video_coords"] = inputs["video_coords"] + 1.0
    with vitmad.record(model), torch.no_grad(), pytest.raises(ValueError, match=(
            r"transformer_blocks\.0\.attn1 .*video_coords \[1, 3, 48, 2\] that are not the 2x4x6 latent grid's at "
            r"fps 25\.0")):
        model(**inputs, timestep=torch.tensor([500.0]))


def test_ltx2_built_for_spatio_temporal_guidance_is_refused_with_what_to_do():
    """perturbed_attn=True (LTX2Pipeline's spatio-temporal guidance) puts LTX2PerturbedAttnProcessor in every block as
    built: the refusal said "record the model as built", which is what failed (QA helper-188)."""
    torch.manual_seed(0)
    model = diffusers.LTX2VideoTransformer3DModel(
        in_channels=4, out_channels=4, patch_size=1, patch_size_t=1, num_attention_heads=2, attention_head_dim=8,
        cross_attention_dim=16, audio_in_channels=4, audio_out_channels=4, audio_num_attention_heads=2,
        audio_attention_head_dim=4, audio_cross_attention_dim=8, num_layers=1, caption_channels=TEXT_DIM,
        rope_double_precision=False, perturbed_attn=True)
    inputs = _ltx2_inputs(model, 2, 4, 6, batch=1)
    with vitmad.record(model), torch.no_grad(), pytest.raises(ValueError, match=(
            r"transformer_blocks\.0\.attn1 .*LTX2PerturbedAttnProcessor .*perturbed_attn=True for spatio-temporal "
            r"guidance.*build the transformer with perturbed_attn=False \(the same weights\) to record it")):
        model(**inputs, timestep=torch.tensor([500.0]))


# FramePack --------------------------------------------------------------------------------------------------------

def _framepack():
    torch.manual_seed(0)
    return _sharpened(diffusers.HunyuanVideoFramepackTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1, num_single_layers=1,
        num_refiner_layers=1, patch_size=2, patch_size_t=1, text_embed_dim=TEXT_DIM, pooled_projection_dim=8,
        rope_axes_dim=(2, 2, 4), has_image_proj=True, image_proj_dim=8, has_clean_x_embedder=True))


IMAGE = 3  # image tokens of FramePack's image projection


def _framepack_inputs(batch: int, height: int, width: int, frames: int, history: dict, mask=None,
                      sizes: dict | None = None) -> dict:
    """FramePack's forward: ``frames`` current latent frames at indices 1.., and ``history``: name -> the frame
    indices of history latents on the same latent pixels (``sizes``: name -> their (height, width) where another)."""
    torch.manual_seed(2)
    inputs = dict(hidden_states=torch.randn(batch, 4, frames, height, width),
                  encoder_hidden_states=torch.randn(batch, TEXT, TEXT_DIM),
                  encoder_attention_mask=torch.ones(batch, TEXT) if mask is None else mask,
                  pooled_projections=torch.randn(batch, 8), image_embeds=torch.randn(batch, IMAGE, 8),
                  indices_latents=torch.arange(1, 1 + frames), guidance=torch.tensor([3000.0] * batch))
    for name, indices in history.items():
        inputs[name] = torch.randn(batch, 4, len(indices), *(sizes or {}).get(name, (height, width)))
        inputs[f"indices_{name}"] = torch.tensor(indices)
    return inputs


def _framepack_positions(height: int, width: int, frames: int, history: dict, suffix: int,
                         sizes: dict | None = None):
    """``[n, 2]`` latent pixels and ``[n, 1]`` latent frames of FramePack's sequence: the 4x, 2x and clean history
    (the ones given, on ``sizes`` where given), then the current tubelets (indices 1..), then ``suffix`` tokens
    without a position; and the current tubelets' slots."""
    kernels = {"latents_history_4x": (4, 8), "latents_history_2x": (2, 4), "latents_clean": (1, 2)}
    padded = {"latents_history_4x", "latents_history_2x"}  # _pad_for_3d_conv: the others' Conv3d floors
    segments = [(history[name], *kernels[name], (sizes or {}).get(name, (height, width)), name in padded)
                for name in kernels if name in history]
    space, time = [], []
    for indices, frame_kernel, pixel_kernel, (h, w), pad in segments + [
            (list(range(1, 1 + frames)), 1, 2, (height, width), False)]:
        cells = [-(-n // k) if pad else n // k for n, k in ((len(indices), frame_kernel), (h, pixel_kernel),
                                                             (w, pixel_kernel))]
        f, r, c = torch.meshgrid(*(torch.arange(n) for n in cells), indexing="ij")
        space.append((torch.stack([r, c], -1).reshape(-1, 2).double() + 0.5) * pixel_kernel)
        # A tubelet's frames are indices[f k .. f k + k - 1], consecutive (a padded kernel's continuing its first):
        # it stands at the middle of them.
        first = torch.tensor(indices, dtype=torch.float64)[f.reshape(-1) * frame_kernel]
        time.append((first + frame_kernel / 2)[:, None])
    current = torch.arange(len(space[-1])) + sum(len(s) for s in space[:-1])
    space.append(torch.full((suffix, 2), math.nan, dtype=torch.float64))
    time.append(torch.full((suffix, 1), math.nan, dtype=torch.float64))
    return torch.cat(space), torch.cat(time), current


def _check_framepack(rec, call: int, maps, space, time, current, frames: int, grid: tuple[int, int],
                     suffix: int) -> None:
    """Call ``call``'s current tubelets against ``maps``: spatial MAD over every key with a position (history and
    current), temporal MAD, entropy, prefix mass and the image and text tokens' maps, and the geometry."""
    placed = ~space[:, 0].isnan()
    recorded = rec.calls[call]
    assert len(recorded.layers) == len(maps)
    for layer, probabilities in enumerate(maps):
        expected = statistics_reference(probabilities, space)
        queries = placed.nonzero().squeeze(-1)
        at = torch.searchsorted(queries, current)  # the current tubelets among the queries with a position
        assert float(expected["entropy"].mean()) < 0.75 * math.log(probabilities.shape[-1])
        temporal = (probabilities[:, :, current][..., placed] * torch.cdist(time[current], time[placed])).sum(-1)
        torch.testing.assert_close(recorded.per_layer[layer].double(), expected["mad"][..., at], **TOL)
        torch.testing.assert_close(recorded.temporal[layer].double(), temporal, **TOL)
        for stat in ("entropy", "prefix_mass"):
            torch.testing.assert_close(recorded.statistics[stat][layer].double(), expected[stat][..., at],
                                       **STAT_TOL)
        torch.testing.assert_close(recorded.prefix_maps[layer].double(), expected["prefix_maps"][..., at],
                                   **STAT_TOL)
        geometry = recorded.geometry[layer]
        assert geometry.grid == grid and geometry.stride == (2, 2) and geometry.attention == "space-time"
        assert geometry.frames == frames and geometry.frame_stride == 1
        assert geometry.num_prefix_tokens is None and geometry.num_suffix_tokens == suffix


def test_framepack_history_at_three_compressions_then_the_current_tubelets():
    """FramePack over 8x16 latent pixels: 4 frames of 4x history (1x2 tubelets of 4x8x8, indices 15-18), 2 of 2x
    history (1x2x4 of 2x4x4, 13-14), 2 clean frames (4x8 of 1x2x2, indices 0 and 12: not consecutive, each its own),
    then 3 current frames (indices 1-3); the 3 image and 5 text tokens last; the padded text of the second video
    masked. Two denoising steps kept apart; the text refiner skipped."""
    model = _framepack()
    history = {"latents_history_4x": [15, 16, 17, 18], "latents_history_2x": [13, 14], "latents_clean": [0, 12]}
    mask = torch.ones(BATCH, TEXT)
    mask[1, -2:] = 0
    inputs = _framepack_inputs(BATCH, 8, 16, 3, history, mask)
    layers = ["transformer_blocks.0.attn", "single_transformer_blocks.0.attn"]
    rec, maps = _steps(model, layers, lambda t: model(**inputs, timestep=t).sample,
                       [torch.tensor([900, 900]), torch.tensor([100, 100])])
    assert list(rec.skipped) == ["context_embedder.token_refiner.refiner_blocks.0.attn"]
    space, time, current = _framepack_positions(8, 16, 3, history, IMAGE + TEXT)
    assert len(space) == 2 + 8 + 64 + 96 + IMAGE + TEXT
    assert float(maps[0][0][1, :, :, -2:].abs().max()) == 0.0  # the padded text keys really are masked
    for call in range(2):
        _check_framepack(rec, call, maps[call], space, time, current, 3, (4, 8), IMAGE + TEXT)
    assert not torch.allclose(rec.calls[0].per_layer[1], rec.calls[1].per_layer[1])


def test_framepack_one_video_its_caption_cut_to_its_valid_tokens_odd_grids():
    """A single video: its forward cuts the caption to its valid tokens (3 of 5, no mask). Over 24x8 latent pixels:
    the 4x history on an odd 3x1 grid (indices 8-11), the 2x on 6x2 (6-7), one clean frame (3) and 2 current frames
    on 12x4 (1-2)."""
    model = _framepack()
    history = {"latents_history_4x": [8, 9, 10, 11], "latents_history_2x": [6, 7], "latents_clean": [3]}
    mask = torch.ones(1, TEXT)
    mask[0, -2:] = 0
    inputs = _framepack_inputs(1, 24, 8, 2, history, mask)
    layers = ["transformer_blocks.0.attn", "single_transformer_blocks.0.attn"]
    rec, maps = _recorded_and_reference(model, layers, lambda: model(**inputs, timestep=torch.tensor([500])).sample)
    assert maps[0].shape[-1] == 3 + 12 + 48 + 2 * 48 + IMAGE + TEXT - 2
    space, time, current = _framepack_positions(24, 8, 2, history, IMAGE + TEXT - 2)
    _check_framepack(rec, 0, maps, space, time, current, 2, (12, 4), IMAGE + TEXT - 2)


def test_framepack_history_padded_to_whole_kernels_at_the_pipelines_default_sizes():
    """The pipeline's default 720x1280 gives 90x160 latents: sides that are not multiples of 8 (nor, 90, of 4), so
    the model pads the 4x and 2x history by repeating its last row and column. Over 10x14 latent pixels (a 5x7
    current grid): the 4x history on 2x2 tubelets of the padded 16x16, its 6 frames (indices 10-15) padded to 8 (two
    tubelets at 12 and 16), the 2x on 3x4 of 12x16, its 3 frames (7-9) padded to 4 (at 8 and 10), one clean frame
    (3) and 2 current frames; a batch of 2, the second video's text padded and masked."""
    model = _framepack()
    history = {"latents_history_4x": list(range(10, 16)), "latents_history_2x": [7, 8, 9], "latents_clean": [3]}
    mask = torch.ones(BATCH, TEXT)
    mask[1, -2:] = 0
    inputs = _framepack_inputs(BATCH, 10, 14, 2, history, mask)
    layers = ["transformer_blocks.0.attn", "single_transformer_blocks.0.attn"]
    timestep = torch.tensor([500, 500])
    rec, maps = _recorded_and_reference(model, layers, lambda: model(**inputs, timestep=timestep).sample)
    space, time, current = _framepack_positions(10, 14, 2, history, IMAGE + TEXT)
    assert maps[0].shape[-1] == len(space) == 2 * 4 + 2 * 12 + 35 + 2 * 35 + IMAGE + TEXT
    assert float(space[:8, 0].max()) == 12.0 and float(time[:8].max()) == 16.0  # past the latent's 10 rows, frame 15
    _check_framepack(rec, 0, maps, space, time, current, 2, (5, 7), IMAGE + TEXT)


def test_framepack_odd_latents_the_history_padded_on_odd_sides():
    """Odd 9x13 current and clean latents (their Conv3d drops the last row and column: a 4x6 grid); the 2x and 4x
    history on odd 7x11 latents, padded to 8x12 (2x3 tubelets of 2x4x4) and 8x16 (1x2 of 4x8x8): the rotary grid
    the model pools for them is the current 4x6 (history on the full 9x13 gives 3x4 and 2x2 tubelets against it: the
    model's own forward fails). The 4x history's 5 frames padded to 8 (indices 12-16: at 14 and 18)."""
    model = _framepack()
    history = {"latents_history_4x": list(range(12, 17)), "latents_history_2x": [9, 10], "latents_clean": [0, 3]}
    sizes = {"latents_history_4x": (7, 11), "latents_history_2x": (7, 11)}
    inputs = _framepack_inputs(1, 9, 13, 3, history, sizes=sizes)
    layers = ["transformer_blocks.0.attn", "single_transformer_blocks.0.attn"]
    rec, maps = _recorded_and_reference(model, layers, lambda: model(**inputs, timestep=torch.tensor([500])).sample)
    space, time, current = _framepack_positions(9, 13, 3, history, IMAGE + TEXT, sizes)
    assert maps[0].shape[-1] == len(space) == 2 * 2 + 6 + 2 * 24 + 3 * 24 + IMAGE + TEXT
    _check_framepack(rec, 0, maps, space, time, current, 3, (4, 6), IMAGE + TEXT)


@pytest.mark.parametrize("change, message", [
    (dict(indices_latents_history_2x=torch.tensor([3, 5])),
     r"its indices_latents_history_2x \[3, 5\] are not 2 frame indices, consecutive within each group of 2"),
    (dict(latents_history_4x=torch.zeros(1, 4, 7, 8, 8), indices_latents_history_4x=torch.tensor([5, 6, 7, 8, 9, 10,
                                                                                                  12])),
     r"its indices_latents_history_4x \[5, 6, 7, 8, 9, 10, 12\] are not 7 frame indices, consecutive within each "
     r"group of 4"),
])
def test_framepack_history_vitmad_cannot_place_is_refused(change, message):
    """Tubelets over frames that are not consecutive, also in a last kernel the model pads (frames 9, 10, 12 and a
    repeat of 12): refused, naming what was given."""
    model = _framepack()
    history = {"latents_history_4x": [5, 6, 7, 8], "latents_history_2x": [3, 4], "latents_clean": [2]}
    inputs = _framepack_inputs(1, 8, 8, 2, history) | change
    with vitmad.record(model), torch.no_grad(), pytest.raises(ValueError, match=(
            r"transformer_blocks\.0\.attn .*" + message)):
        model(**inputs, timestep=torch.tensor([500]))


# Motif-Video ------------------------------------------------------------------------------------------------------

def _motif(**changed):
    torch.manual_seed(0)
    return _sharpened(diffusers.MotifVideoTransformer3DModel(**dict(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1, num_single_layers=1,
        patch_size=2, text_embed_dim=TEXT_DIM, image_embed_dim=8, rope_axes_dim=(2, 2, 4),
        enable_text_cross_attention_dual=True) | changed))


def test_motif_video_tubelets_then_its_image_and_text_tokens():
    """Motif-Video: the Conv3d tubelets of 3 latent frames of a 3x5 grid (6x10 latents), then 2 image and 5 text
    tokens (the second video's last 2 text tokens padding, masked); its text cross-attention skipped."""
    model = _motif()
    torch.manual_seed(2)
    mask = torch.ones(BATCH, TEXT)
    mask[1, -2:] = 0
    inputs = dict(hidden_states=torch.randn(BATCH, 4, 3, 6, 10), timestep=torch.tensor([500, 500]),
                  encoder_hidden_states=torch.randn(BATCH, TEXT, TEXT_DIM), encoder_attention_mask=mask,
                  image_embeds=torch.randn(BATCH, 2, 8))
    layers = ["transformer_blocks.0.attn", "single_transformer_blocks.0.attn"]
    rec, maps = _recorded_and_reference(model, layers, lambda: model(**inputs).sample)
    assert float(maps[0][1, :, :, -2:].abs().max()) == 0.0
    assert list(rec.skipped) == ["transformer_blocks.0.cross_attn"]
    _check(rec, 0, maps, frames=3, grid=(3, 5), patch=2, frame_size=1, suffix=2 + TEXT)


def test_motif_video_decoder_blocks_are_refused():
    """Its decoder blocks attend over the decoder's tubelets then the encoder's output tubelets (two tokens per
    cell): refused by name, with what to pass."""
    model = _motif(num_single_layers=2, num_decoder_layers=1)
    with vitmad.record(model), torch.no_grad(), pytest.raises(ValueError, match=(
            r"single_transformer_blocks\.1\.attn is one of Motif-Video's decoder blocks \(num_decoder_layers 1\).*"
            r"layers=\[the other attention modules\]")):
        model(torch.randn(1, 4, 1, 4, 4), torch.tensor([500]), torch.randn(1, TEXT, TEXT_DIM))


# Kandinsky 6 ------------------------------------------------------------------------------------------------------

def _kandinsky6():
    torch.manual_seed(0)
    return _sharpened(diffusers.Kandinsky6Transformer3DModel(
        in_visual_dim=4, out_visual_dim=4, in_text_dim=TEXT_DIM, in_text_dim2=8, time_dim=16, patch_size=(1, 2, 2),
        model_dim=32, ff_dim=32, num_text_blocks=1, num_visual_blocks=2, axes_dims=(4, 6, 6), in_audio_dim=4,
        out_audio_dim=4, visual_cond=False))


def test_kandinsky6_video_self_attention_placed_audio_and_text_skipped():
    """Kandinsky 6 with audio latents: its video blocks' self_attention over 3 latent frames of 6x10 channels-last
    latents (3x5 tubelets); the text blocks, the audio blocks and the audio-video attention skipped."""
    model = _kandinsky6()
    torch.manual_seed(2)
    inputs = dict(hidden_states=torch.randn(BATCH, 3, 6, 10, 4),
                  encoder_hidden_states=torch.randn(BATCH, TEXT, TEXT_DIM), pooled_projections=torch.randn(BATCH, 8),
                  timestep=torch.tensor([500.0, 500.0]), audio_hidden_states=torch.randn(BATCH, 6, 4))
    layers = [f"visual_transformer_blocks.{i}.video_dec_block.self_attention" for i in (0, 1)]
    rec, maps = _recorded_and_reference(model, layers, lambda: model(**inputs).sample)
    assert set(rec.skipped) == {"video_text_transformer_blocks.0.attn", "audio_text_transformer_blocks.0.attn"} | {
        f"visual_transformer_blocks.{i}.{name}" for i in (0, 1)
        for name in ("video_dec_block.cross_attention", "audio_dec_block.self_attention",
                     "audio_dec_block.cross_attention", "va_cross_attention", "av_cross_attention")}
    _check(rec, 0, maps, frames=3, grid=(3, 5), patch=2, frame_size=1)


def test_kandinsky6_reference_frame_at_rotary_time_zero_is_refused():
    """Its image-to-video pipeline appends the clean reference frame as a last latent frame at rotary time 0: a
    frame at two times. Refused, with what to record instead."""
    model = _kandinsky6()
    with vitmad.record(model), torch.no_grad(), pytest.raises(ValueError, match=(
            r"visual_transformer_blocks\.0\.video_dec_block\.self_attention .*visual_rope_pos whose \(t, h, w\) "
            r"indices are not the 3x2x3 tubelets' own grid.*record a call without visual_rope_pos")):
        model(torch.randn(1, 3, 4, 6, 4), torch.randn(1, TEXT, TEXT_DIM), torch.randn(1, 8), torch.tensor([500.0]),
              visual_rope_pos=(torch.tensor([0, 1, 0]), torch.arange(2), torch.arange(3)))


# Refused by name --------------------------------------------------------------------------------------------------

def test_anyflow_bidirectional_placed_as_wan():
    """AnyFlow takes its latents frames first, [B, F, C, H, W], and permutes them for Wan's Conv3d
    patch_embedding: attn1 over 3 latent frames of a 3x5 grid (6x10 latents); attn2 (text) skipped."""
    from test_record_diffusers_video_2 import _wan_config

    torch.manual_seed(0)
    model = _sharpened(diffusers.AnyFlowTransformer3DModel(**_wan_config()))
    torch.manual_seed(2)
    latents, text = torch.randn(BATCH, 3, 4, 6, 10), torch.randn(BATCH, TEXT, TEXT_DIM)
    times = dict(timestep=torch.full((BATCH, 3), 500.0), r_timestep=torch.full((BATCH, 3), 400.0))
    layers = ["blocks.0.attn1", "blocks.1.attn1"]
    rec, maps = _recorded_and_reference(
        model, layers, lambda: model(latents, encoder_hidden_states=text, **times).sample)
    assert set(rec.skipped) == {"blocks.0.attn2", "blocks.1.attn2"}
    _check(rec, 0, maps, frames=3, grid=(3, 5), patch=2, frame_size=1)


# Refused by name --------------------------------------------------------------------------------------------------

def _catalogue_case(label: str):
    """The benchmark sweep's tiny build and inputs of ``label`` (benchmarks/_diffusers_models.py)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    import _diffusers_models

    return next(case for case in _diffusers_models.diffusers_cases() if case.label == label)


@pytest.mark.parametrize("label, reason", [
    ("SanaWMTransformer3DModel", r"gated delta-rule linear attention \(no softmax map\)"),
    ("SanaWMLTX2RefinerTransformer3DModel", r"chunk-causal and autoregressive: .*sliding-window KV cache"),
    ("Kandinsky6SRTransformer3DModel", r"NABLA's sparse block mask on diffusers' flex backend"),
    ("AnyFlowFARTransformer3DModel", r"only on diffusers' flex backend with a BlockMask and a KV cache"),
    ("HeliosTransformer3DModel", r"short, mid and long history latents .*pyramid pipeline"),
    ("MiniMaxH3Transformer3DModel", r"scatters its video rows .*only in the rotary position_ids"),
])
def test_video_transformers_not_placed_are_refused_with_the_reason(label, reason):
    """Each refused video transformer, built tiny as the sweep builds it: the recording refuses it by name, saying
    what in its sequence vitmad does not place."""
    case = _catalogue_case(label)
    model = case.build().eval()
    with vitmad.record(model), torch.no_grad(), pytest.raises(ValueError, match=(
            rf"{label} \(diffusers\) is not placed by vitmad: .*{reason}")):
        case.forward(model, case.inputs())


def test_cosmos3_is_refused_at_its_causal_attention():
    """Cosmos 3's packed sequence (refused by name too) attends causally in its first layer: that refusal, the
    first one its forward meets, is what the user reads."""
    case = _catalogue_case("Cosmos3OmniTransformer")
    model = case.build().eval()
    with vitmad.record(model), torch.no_grad(), pytest.raises(ValueError, match=(
            r"layers\.0\.self_attn \(Cosmos3PackedMoTAttention\) runs causal attention")):
        case.forward(model, case.inputs())
