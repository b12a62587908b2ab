"""vitmad.record on the UNets researchers use beside Stable Diffusion's: AnimateDiff's ``UNetMotionModel``,
ModelScope / Zeroscope's ``UNet3DConditionModel``, ``I2VGenXLUNet``, SD's ``ControlNetModel``, and the classic
``AttnProcessor`` / ``SlicedAttnProcessor`` (batch and heads merged) on any of them.

Tiny random-weight models, sharpened (every Linear redrawn, the query and key projections scaled up). The reference
is each layer's own attention probabilities: ``AttnProcessor2_0`` calls ``F.scaled_dot_product_attention`` with
``[B, heads, N, d]`` queries and keys (wrapped by ``_own_probabilities`` of test_record_diffusers_unets.py); the
classic processors call ``Attention.get_attention_scores(query, key, mask)`` with ``[rows, N, d]`` queries and keys
whose rows are batch and heads merged (wrapped here). The softmax is computed in float64 from what they are given.
The tokens are placed by geometry written here and in test_record_diffusers_unets.py from diffusers' source:

- ``Attention.head_to_batch_dim`` reshapes ``[B, N, heads * d]`` to ``[B, N, heads, d]``, permutes it to
  ``[B, heads, N, d]`` and reshapes that to ``[B * heads, N, d]``: row ``b * heads + h``. ``SlicedAttnProcessor``
  calls ``get_attention_scores`` on rows ``[i * slice_size, (i + 1) * slice_size)`` in order of ``i``.
- The video UNets take ``sample`` ``[B, C, F, H, W]`` and run ``sample.permute(0, 2, 1, 3, 4).reshape(B * F, C, H,
  W)``: videos outermost, then frames. ``Transformer2DModel`` attends per frame over the map (``"space"``).
  ``TransformerTemporalModel`` (``UNet3DConditionModel``'s ``transformer_in`` and ``temp_attentions``, I2VGen-XL's)
  and ``AnimateDiffTransformer3D`` (the motion modules) view their ``[B * F, C, h, w]`` input as ``[B, F, C, h, w]``,
  permute it to ``[B, C, F, h, w]`` and then ``permute(0, 3, 4, 2, 1).reshape(B * h * w, F, C)``: one group per
  cell (row-major, videos outermost), its frames in order (``"time"``); both attn1 and attn2 of their blocks attend
  over the frames (``double_self_attention``). Latent frame ``f`` is at ``f + 0.5`` frames.
- ``transformer_in`` runs on ``conv_in``'s map (level 0). I2VGen-XL's ``image_latents_temporal_encoder`` runs before
  ``conv_in`` on ``image_latents`` ``[B, C, F, H, W]`` (its convolutions have stride 1), viewed as ``[B * H * W, F,
  C]`` (``permute(0, 3, 4, 1, 2)`` of ``[B, F, C, H, W]``): the same "time" groups on the latent grid, level 0.
- Their samplings are the 2-D UNet's (``Downsample2D``: a side of ``n`` becomes ``ceil(n / 2)``; ``Upsample2D`` to
  the skip connection's size): level ``l``, stride ``2 ** l``, cell ``i`` at ``(i + 0.5) * 2 ** l``.
- ``ControlNetModel`` runs ``conv_in`` on the latent, adds its conditioning image's embedding (three convolutions of
  stride 2: a latent pixel is 8 image pixels) and runs the UNet's down blocks and mid block: the same levels.
"""

from __future__ import annotations

import copy
import math
import types

import pytest
import torch
from test_record_diffusers_unets import (
    STAT_TOL,
    TOL,
    _check,
    _level,
    _map,
    _own_probabilities,
    _record,
    _sd_unet,
    _sharpen,
    _svd_reference,
)

import vitmad

diffusers = pytest.importorskip("diffusers")
attention_processor = pytest.importorskip("diffusers.models.attention_processor")
AnimateDiffFreeNoiseMixin = pytest.importorskip("diffusers.pipelines.free_noise_utils").AnimateDiffFreeNoiseMixin
MultiControlNetModel = pytest.importorskip("diffusers.models.controlnets.multicontrolnet").MultiControlNetModel

_ceil_half = lambda n: -(-n // 2)  # noqa: E731  Downsample2D: 3x3, stride 2, padding 1
_TEMPORAL_PARTS = (".motion_modules.", ".temp_attentions.", "transformer_in.", "image_latents_temporal_encoder.")


def _merged_probabilities(model, monkeypatch, run) -> dict[str, list[torch.Tensor]]:
    """Per ``Attention`` module name, the float64 probabilities ``[B, heads, Nq, Nk]`` of each of its forwards in
    ``run``, from the merged ``[rows, N, d]`` queries and keys (and the additive mask) each ``get_attention_scores``
    call is given (a forward's slices joined in order, then row ``b * heads + h`` put at ``[b, h]``)."""
    current, found = [], {}
    original = attention_processor.Attention.get_attention_scores

    def spy(attn, query, key, attention_mask=None):
        assert not attn.upcast_attention
        logits = query.double() @ key.double().transpose(-1, -2) * attn.scale
        if attention_mask is not None:  # added to the logits (baddbmm's input)
            logits = logits + attention_mask.double()
        found[current[-1][0]][-1].append(logits.softmax(-1))
        return original(attn, query, key, attention_mask)

    def enter(module, args, name):
        current.append((name, module))
        found.setdefault(name, []).append([])

    handles = [m.register_forward_pre_hook(lambda m, a, n=n: enter(m, a, n))
               for n, m in model.named_modules() if isinstance(m, attention_processor.Attention)]
    monkeypatch.setattr(attention_processor.Attention, "get_attention_scores", spy)
    try:
        with torch.no_grad():
            run()
    finally:
        monkeypatch.undo()
        for handle in handles:
            handle.remove()
    heads = {n: m.heads for n, m in model.named_modules() if isinstance(m, attention_processor.Attention)}
    return {name: [torch.cat(slices).unflatten(0, (-1, heads[name])) for slices in forwards if slices]
            for name, forwards in found.items()}


def use_processor(unet, processor: str) -> None:
    """Sets every attention of ``unet`` to ``AttnProcessor`` ("classic") or ``SlicedAttnProcessor(n)`` ("sliced_n")."""
    unet.set_attn_processor(attention_processor.AttnProcessor() if processor == "classic"
                            else attention_processor.SlicedAttnProcessor(int(processor.split("_")[1])))


@pytest.mark.parametrize("processor", ["classic", "sliced_1", "sliced_2"])
def test_classic_and_sliced_processors_equal_their_own(processor, monkeypatch):
    # Stable Diffusion's layout with the processor prompt-to-prompt style code builds on; batch 2 of 2 heads: slices
    # of 1 row (set_attention_slice("max")) and of 2 rows (half the 4 rows of batch times heads).
    unet = _sd_unet(False)
    use_processor(unet, processor)
    latent = (9, 7)
    gen = torch.Generator().manual_seed(1)
    sample, text = torch.randn(2, 4, *latent, generator=gen), torch.randn(2, 5, 12, generator=gen)

    def run():
        return unet(sample, 10, text).sample

    own = _merged_probabilities(unet, monkeypatch, run)
    rec, tokens = _record(unet, run)
    assert sorted(rec.layers) == sorted(n for n in own if n.endswith("attn1"))
    assert set(rec.skipped) == {n for n in own if n.endswith("attn2")}
    _check(rec, tokens, own, latent, down_blocks=3)
    # The same layers measured through AttnProcessor2_0's F.scaled_dot_product_attention agree.
    unet.set_attn_processor(attention_processor.AttnProcessor2_0())
    fused, _ = _record(unet, run)
    for layer in range(len(rec.layers)):
        torch.testing.assert_close(rec.calls[-1].per_layer[layer], fused.calls[-1].per_layer[layer], **TOL)


def test_classic_processor_on_unet2d_attention_blocks(monkeypatch):
    # UNet2DModel's Attention takes the [B, C, h, w] map itself; the classic processor flattens it as 2_0 does.
    torch.manual_seed(0)
    unet = _sharpen(diffusers.UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=8, norm_num_groups=4))
    for module in unet.modules():  # UNet2DModel has no set_attn_processor
        if isinstance(module, attention_processor.Attention):
            module.set_processor(attention_processor.AttnProcessor())
    sample = torch.randn(2, 3, 6, 10, generator=torch.Generator().manual_seed(3))

    def run():
        return unet(sample, 10).sample

    own = _merged_probabilities(unet, monkeypatch, run)
    rec, tokens = _record(unet, run)
    assert len(rec.layers) == 4
    _check(rec, tokens, own, (6, 10), down_blocks=2)


@pytest.mark.parametrize("batch", [1, 2])
def test_slices_that_do_not_divide_the_rows_equal_their_own(batch, monkeypatch):
    """SD 2.x's 5 heads sliced by 3 (pipe.enable_attention_slicing(3) calls unet.set_attention_slice(3)): 5 rows
    of batch times heads are cut 3 + 2, 10 rows 3 + 3 + 3 + 1, which diffusers runs; vitmad refused it (QA
    helper-178). The slices are joined along the rows before batch and heads are put apart."""
    torch.manual_seed(0)
    unet = _sharpen(diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(20, 20, 40), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=12,
        attention_head_dim=5, norm_num_groups=4, use_linear_projection=True))
    unet.set_attention_slice(3)
    assert {type(p).__name__ for p in unet.attn_processors.values()} == {"SlicedAttnProcessor"}
    latent = (9, 7)
    gen = torch.Generator().manual_seed(1)
    sample, text = torch.randn(batch, 4, *latent, generator=gen), torch.randn(batch, 5, 12, generator=gen)

    def run():
        return unet(sample, 10, text).sample

    own = _merged_probabilities(unet, monkeypatch, run)
    assert all(p.shape[:2] == (batch, 5) for forwards in own.values() for p in forwards)
    rec, tokens = _record(unet, run)
    assert sorted(rec.layers) == sorted(n for n in own if n.endswith("attn1"))
    _check(rec, tokens, own, latent, down_blocks=3)


def _video_level(name: str, down_blocks: int) -> int:
    if name.startswith(("transformer_in.", "image_latents_temporal_encoder.")):
        return 0
    return _level(name, down_blocks)


def _check_video(rec, tokens, own, latent, down_blocks, batch, frames) -> set[str]:
    """Every recorded layer against its own probabilities (last call), placed per frame or per cell over the
    frames; returns the kinds seen."""
    call, kinds = tokens.calls[-1], set()
    for layer, name in enumerate(rec.layers):
        kind = "time" if any(part in name for part in _TEMPORAL_PARTS) else "space"
        level = _video_level(name, down_blocks)
        grid, stride = _map(latent, level, _ceil_half), float(2 ** level)
        probs = own[name][-1]
        assert float((-torch.special.xlogy(probs, probs).sum(-1)).mean()) < 0.6 * math.log(probs.shape[-1])
        expected = _svd_reference(probs, kind, batch, frames, grid, stride)
        geometry = call.geometry[layer]
        assert (geometry.grid, geometry.stride, geometry.attention, geometry.frames) == (
            grid, (stride, stride), kind, frames), name
        torch.testing.assert_close(call.per_layer[layer].double(), expected["mad"], **TOL)
        torch.testing.assert_close(call.temporal[layer].double(), expected["temporal"], **TOL)
        torch.testing.assert_close(call.statistics["entropy"][layer].double(), expected["entropy"], **STAT_TOL)
        torch.testing.assert_close(rec.calls[-1].per_layer[layer].double(), expected["mad"].mean(-1), **TOL)
        kinds.add(kind)
    return kinds


def _motion_unet() -> torch.nn.Module:
    torch.manual_seed(0)
    return _sharpen(diffusers.UNetMotionModel(
        in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=4,
        down_block_types=("CrossAttnDownBlockMotion", "DownBlockMotion"),
        up_block_types=("UpBlockMotion", "CrossAttnUpBlockMotion"), cross_attention_dim=12, num_attention_heads=2,
        motion_num_attention_heads=2, motion_max_seq_length=8), scale=5.0)


@pytest.mark.parametrize("processor", ["2_0", "classic"])
def test_animatediff_space_and_motion_modules_equal_their_own(processor, monkeypatch):
    unet = _motion_unet()
    if processor == "classic":
        unet.set_attn_processor(attention_processor.AttnProcessor())
    batch, frames, latent = 2, 3, (7, 5)
    gen = torch.Generator().manual_seed(4)
    # AnimateDiff's pipeline repeats the prompt per frame: encoder_hidden_states [B * F, L, D].
    sample = torch.randn(batch, 4, frames, *latent, generator=gen)
    text = torch.randn(batch * frames, 5, 12, generator=gen)

    def run():
        return unet(sample, 10, text).sample

    own = (_own_probabilities if processor == "2_0" else _merged_probabilities)(unet, monkeypatch, run)
    rec, tokens = _record(unet, run)
    # Self-attention: the spatial attn1 and both attn1 and attn2 of the motion modules; the spatial attn2 skipped.
    assert sorted(rec.layers) == sorted(n for n in own if n.endswith("attn1") or ".motion_modules." in n)
    assert set(rec.skipped) == {n for n in own if n.endswith("attn2") and ".motion_modules." not in n}
    assert any(".motion_modules." in n and n.endswith("attn2") for n in rec.layers)
    assert _check_video(rec, tokens, own, latent, 2, batch, frames) == {"space", "time"}


class _FreeNoise(AnimateDiffFreeNoiseMixin):
    """What AnimateDiffPipeline.enable_free_noise reads of the pipeline: its UNet, device, dtype and adapter's
    longest sequence (the tiny motion UNet's 8 frames)."""

    def __init__(self, unet):
        self.unet, self.device, self.dtype = unet, unet.device, unet.dtype
        self.motion_adapter = types.SimpleNamespace(config=types.SimpleNamespace(motion_max_seq_length=8))


def _free_noise_reference(probs: torch.Tensor, window: tuple[int, int], batch: int, frames: int,
                          grid: tuple[int, int]) -> dict[str, torch.Tensor]:
    """Per statistic ``[B, heads, F * h * w]`` in (frame, row, column) order of one context window's call ``[B * h *
    w, heads, L, L]`` (groups: the cells of each video row-major; tokens: the window's frames, frame ``f`` at ``f +
    0.5``), NaN at the frames outside the window."""
    first, end = window
    times = torch.arange(first, end, dtype=torch.float64)[:, None] + 0.5
    cells, heads = grid[0] * grid[1], probs.shape[1]
    values = {"temporal": (probs * torch.cdist(times, times)).sum(-1),
              "entropy": -torch.special.xlogy(probs, probs).sum(-1)}
    values["mad"] = torch.zeros_like(values["temporal"])
    placed = {}
    for name, value in values.items():
        full = value.new_full((batch, heads, frames, cells), math.nan)
        full[:, :, first:end] = value.reshape(batch, cells, heads, end - first).permute(0, 2, 3, 1)
        placed[name] = full.reshape(batch, heads, frames * cells)
    return placed


@pytest.mark.parametrize("processor", ["2_0", "sliced_3"])
def test_animatediff_free_noise_windows_equal_their_own(processor, monkeypatch):
    """FreeNoise (pipe.enable_free_noise) runs each motion module's attention once per context window of frames; it
    was refused with a shape message that did not name FreeNoise (QA helper-178). FreeNoiseTransformerBlock.forward
    makes its windows ``range(0, F - L + 1, stride)``: with F = 6 frames, context_length L = 3 and stride 2, (0, 3)
    and (2, 5), then (F - L, F) = (3, 6) since the last did not reach frame 6; per window attn1, then attn2, over
    ``hidden_states[:, first:end]``. Also with slices of 3 rows of batch times heads, which divide no call's."""
    unet = _motion_unet()
    _FreeNoise(unet).enable_free_noise(context_length=3, context_stride=2)
    if processor == "sliced_3":
        unet.set_attn_processor(attention_processor.SlicedAttnProcessor(3))
    windows = [(0, 3), (2, 5), (3, 6)]
    batch, frames, latent = 2, 6, (7, 5)
    gen = torch.Generator().manual_seed(11)
    sample, text = torch.randn(batch, 4, frames, *latent, generator=gen), torch.randn(batch * frames, 5, 12,
                                                                                        generator=gen)

    def run():
        return unet(sample, 10, text).sample

    own = (_own_probabilities if processor == "2_0" else _merged_probabilities)(unet, monkeypatch, run)
    rec, tokens = _record(unet, run)
    motion = [n for n in own if ".motion_modules." in n]
    assert motion and all(len(own[n]) == len(windows) for n in motion)
    call, seen = tokens.calls[-1], {}
    assert sorted(set(call.layers)) == sorted({n for n in own if n.endswith("attn1")} | set(motion))
    for layer, name in enumerate(call.layers):
        index = seen[name] = seen.get(name, -1) + 1
        level = _level(name, 2)
        grid, stride = _map(latent, level, _ceil_half), float(2 ** level)
        probs = own[name][index]
        if name in motion:  # a context window's temporal attention
            assert probs.shape[-1] == 3
            expected = _free_noise_reference(probs, windows[index], batch, frames, grid)
        else:
            expected = _svd_reference(probs, "space", batch, frames, grid, stride)
        assert float((-torch.special.xlogy(probs, probs).sum(-1)).mean()) < 0.6 * math.log(probs.shape[-1])
        geometry = call.geometry[layer]
        kind = "time" if name in motion else "space"
        assert (geometry.grid, geometry.stride, geometry.attention, geometry.frames) == (
            grid, (stride, stride), kind, frames), name
        torch.testing.assert_close(call.per_layer[layer].double(), expected["mad"], equal_nan=True, **TOL)
        torch.testing.assert_close(call.temporal[layer].double(), expected["temporal"], equal_nan=True, **TOL)
        torch.testing.assert_close(call.statistics["entropy"][layer].double(), expected["entropy"], equal_nan=True,
                                   **STAT_TOL)
        torch.testing.assert_close(rec.calls[-1].per_layer[layer].double(), expected["mad"].nanmean(-1), **TOL)
        torch.testing.assert_close(rec.calls[-1].statistics["entropy"][layer].double(),
                                   expected["entropy"].nanmean(-1), **STAT_TOL)
    assert {n: seen[n] + 1 for n in motion} == {n: len(windows) for n in motion}


@pytest.mark.parametrize("spatial, temporal", [(10000, 6), (4, 10000)])
def test_animatediff_free_noise_split_inference_refused_by_name(spatial, temporal):
    """pipe.enable_free_noise_split_inference wraps the attentions and motion modules in SplitInferenceModule, which
    runs each once per chunk of its input's first dim: with temporal_split_size = 6 frames a batch of two videos was
    recorded as two entries of batch 1 each, the second's row 0 being video 1 (QA helper-181), and smaller chunks
    were refused with a shape message naming FreeNoise's window alone."""
    unet = _motion_unet()
    free_noise = _FreeNoise(unet)
    free_noise.enable_free_noise(context_length=4, context_stride=2)
    free_noise.enable_free_noise_split_inference(spatial_split_size=spatial, temporal_split_size=temporal)
    gen = torch.Generator().manual_seed(3)
    sample, text = torch.randn(2, 4, 6, 5, 3, generator=gen), torch.randn(12, 5, 12, generator=gen)
    with pytest.raises(ValueError, match=r"a SplitInferenceModule \(pipe\.enable_free_noise_split_inference\) that "
                                         r"calls it once per chunk of \d+ along dim 0"):
        with torch.no_grad(), vitmad.record(unet):
            unet(sample, 900, text)


def test_animatediff_keeps_denoising_steps_apart(monkeypatch):
    unet = _motion_unet()
    gen = torch.Generator().manual_seed(5)
    sample, text = torch.randn(1, 4, 4, 6, 6, generator=gen), torch.randn(4, 5, 12, generator=gen)

    def run():
        return torch.cat([unet(sample, t, text).sample for t in (900, 50)])

    rec, _ = _record(unet, run)
    assert len(rec.calls) == 2
    assert not torch.equal(rec.calls[0].per_layer[0], rec.calls[1].per_layer[0])


@pytest.mark.parametrize("latent", [(7, 9), (6, 8)], ids=["odd_7x9", "6x8"])
def test_unet3d_condition_space_and_time_equal_their_own(latent, monkeypatch):
    # ModelScope / Zeroscope text-to-video: transformer_in over the frames at conv_in's map, then per block a
    # Transformer2DModel per frame and a TransformerTemporalModel over the frames.
    torch.manual_seed(0)
    unet = _sharpen(diffusers.UNet3DConditionModel(
        in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=4,
        down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"), up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
        cross_attention_dim=12, attention_head_dim=2), scale=5.0)
    batch, frames = 2, 3
    gen = torch.Generator().manual_seed(6)
    sample, text = torch.randn(batch, 4, frames, *latent, generator=gen), torch.randn(batch, 5, 12, generator=gen)

    def run():
        return unet(sample, 10, text).sample

    own = _own_probabilities(unet, monkeypatch, run)
    rec, tokens = _record(unet, run)
    temporal = [n for n in own if any(part in n for part in _TEMPORAL_PARTS)]
    assert sorted(rec.layers) == sorted({n for n in own if n.endswith("attn1")} | set(temporal))
    assert "transformer_in.transformer_blocks.0.attn1" in rec.layers
    assert set(rec.skipped) == set(own) - set(rec.layers)
    assert _check_video(rec, tokens, own, latent, 2, batch, frames) == {"space", "time"}


def test_i2vgen_xl_space_time_and_image_latents_equal_their_own(monkeypatch):
    torch.manual_seed(0)
    unet = _sharpen(diffusers.I2VGenXLUNet(
        in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=4,
        down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"), up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
        cross_attention_dim=12, attention_head_dim=2, num_attention_heads=2), scale=5.0)
    with torch.no_grad():  # its 4 channels (in_channels) need a sharper query and key to be far from uniform
        encoder = unet.image_latents_temporal_encoder.attn1
        encoder.to_q.weight.mul_(2.0)
        encoder.to_k.weight.mul_(2.0)
    batch, frames, latent = 1, 3, (5, 7)
    gen = torch.Generator().manual_seed(7)
    sample = torch.randn(batch, 4, frames, *latent, generator=gen)
    image_latents = torch.randn(batch, 4, frames, *latent, generator=gen)
    image_embeddings, text = torch.randn(batch, 12, generator=gen), torch.randn(batch, 5, 12, generator=gen)

    def run():
        return unet(sample, 10, fps=torch.tensor([8]), image_latents=image_latents, image_embeddings=image_embeddings,
                    encoder_hidden_states=text).sample

    own = _own_probabilities(unet, monkeypatch, run)
    rec, tokens = _record(unet, run)
    assert "image_latents_temporal_encoder.attn1" in rec.layers
    assert sorted(rec.layers) == sorted(
        {n for n in own if n.endswith("attn1")} | {n for n in own if any(p in n for p in _TEMPORAL_PARTS)})
    assert _check_video(rec, tokens, own, latent, 2, batch, frames) == {"space", "time"}


def test_controlnet_down_and_mid_blocks_are_placed_as_the_unets(monkeypatch):
    torch.manual_seed(0)
    controlnet = _sharpen(diffusers.ControlNetModel(
        in_channels=4, block_out_channels=(16, 16, 32), layers_per_block=1, norm_num_groups=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"), cross_attention_dim=12,
        attention_head_dim=2, conditioning_embedding_out_channels=(4, 4, 4, 8)))
    latent = (9, 7)
    gen = torch.Generator().manual_seed(8)
    sample, text = torch.randn(2, 4, *latent, generator=gen), torch.randn(2, 5, 12, generator=gen)
    condition = torch.rand(2, 3, 8 * latent[0], 8 * latent[1], generator=gen)  # image pixels: 8 per latent pixel

    def run():
        down, mid = controlnet(sample, 10, text, controlnet_cond=condition, return_dict=False)
        return torch.cat([t.flatten() for t in (*down, mid)])

    own = _own_probabilities(controlnet, monkeypatch, run)
    rec, tokens = _record(controlnet, run)
    assert sorted(rec.layers) == sorted(n for n in own if n.endswith("attn1"))
    assert {n.split(".")[0] for n in rec.layers} == {"down_blocks", "mid_block"}
    assert set(rec.skipped) == {n for n in own if n.endswith("attn2")}
    _check(rec, tokens, own, latent, down_blocks=3)


class _ControlledStep(torch.nn.Module):
    """A user's denoising step: a ControlNet, then the UNet given its residuals. The modules are registered in the
    order given (an unused ``ema`` UNet, a copy kept for evaluation, first of all where asked), not the order the
    forward runs them."""

    def __init__(self, order: tuple[str, ...]):
        super().__init__()
        unet = _sd_unet(False)
        parts = {"unet": unet, "ema": _sd_unet(False),
                 "controlnet": _sharpen(diffusers.ControlNetModel.from_unet(
                     unet, conditioning_embedding_out_channels=(4, 4, 4, 8)))}
        for name in order:
            setattr(self, name, parts[name])

    def forward(self, sample, timestep, text, condition):
        down, mid = self.controlnet(sample, timestep, text, controlnet_cond=condition, return_dict=False)
        return self.unet(sample, timestep, text, down_block_additional_residuals=down,
                         mid_block_additional_residual=mid).sample


@pytest.mark.parametrize("order", [("unet", "controlnet"), ("controlnet", "unet"), ("ema", "unet", "controlnet")],
                         ids=["unet_first", "controlnet_first", "unused_ema_first"])
def test_a_step_of_several_unets_is_one_call(order, monkeypatch):
    """A call per forward of the user's module, whichever of its UNets it runs first (QA helper-175: calls began at
    the first UNet in module order, so a step's ControlNet layers joined the previous step's call, or an unused
    first UNet merged every step into one call)."""
    step = _ControlledStep(order)
    latent = (9, 7)
    gen = torch.Generator().manual_seed(8)
    sample, text = torch.randn(1, 4, *latent, generator=gen), torch.randn(1, 5, 12, generator=gen)
    condition = torch.rand(1, 3, 8 * latent[0], 8 * latent[1], generator=gen)
    steps = (900, 50)

    def run():
        return torch.cat([step(sample, t, text, condition).flatten() for t in steps])

    own = _own_probabilities(step, monkeypatch, run)
    with torch.no_grad():
        plain = run()
        with vitmad.record(step) as rec:
            recorded = run()
    assert torch.equal(plain, recorded)
    assert len(rec.calls) == len(steps)
    for index, call in enumerate(rec.calls):
        # The step's ControlNet layers, then its UNet's: each attn1 the step ran, once.
        ran = [n for n in own if n.endswith("attn1")]
        assert sorted(call.layers) == sorted(ran) and len(call.layers) == len(ran)
        parts = [n.split(".")[0] for n in call.layers]
        assert parts == sorted(parts) and set(parts) == {"controlnet", "unet"}
        for layer, name in enumerate(call.layers):
            level = _level(name.split(".", 1)[1], 3)
            grid = _map(latent, level, lambda n: -(-n // 2))
            centres = torch.cartesian_prod(torch.arange(grid[0]), torch.arange(grid[1])).double() + 0.5
            probabilities = own[name][index]  # this step's own attention, not the other's
            expected = (probabilities * torch.cdist(centres, centres) * 2 ** level).sum(-1).mean(-1)
            torch.testing.assert_close(call.per_layer[layer].double(), expected, **TOL)


@pytest.mark.parametrize("nets", ["same_net_twice", "two_nets"])
def test_multi_controlnet_forward_is_one_call_also_of_one_net_twice(nets, monkeypatch):
    """MultiControlNetModel([controlnet, controlnet]) (one net for two condition images) made two calls per forward
    and a warning, where two nets made one (QA helper-178). MultiControlNetModel.forward runs ``self.nets`` in order,
    each on the same latent with its own condition image: each run's attn1 in the call, the first net's, then the
    second's (the same net's names twice where it is held twice), each equal to its own probabilities."""
    unet = _sd_unet(False)
    controlnet = _sharpen(diffusers.ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(4, 4, 4, 8)))
    twin = controlnet if nets == "same_net_twice" else copy.deepcopy(controlnet)
    multi = MultiControlNetModel([controlnet, twin])
    latent = (9, 7)
    gen = torch.Generator().manual_seed(12)
    sample, text = torch.randn(1, 4, *latent, generator=gen), torch.randn(1, 5, 12, generator=gen)
    conditions = [torch.rand(1, 3, 8 * latent[0], 8 * latent[1], generator=gen) for _ in range(2)]
    steps = (900, 50)

    def run():
        outputs = [multi(sample, t, text, conditions, [1.0, 0.5], return_dict=False) for t in steps]
        return torch.cat([t.flatten() for down, mid in outputs for t in (*down, mid)])

    own = _own_probabilities(multi, monkeypatch, run)
    rec, tokens = _record(multi, run)
    assert len(rec.calls) == len(tokens.calls) == len(steps)
    first = sorted(n for n in own if n.startswith("nets.0.") and n.endswith("attn1"))
    second = first if nets == "same_net_twice" else [n.replace("nets.0.", "nets.1.", 1) for n in first]
    for step, call in enumerate(tokens.calls):
        half = len(call.layers) // 2
        assert sorted(call.layers[:half]) == first and sorted(call.layers[half:]) == second
        for layer, name in enumerate(call.layers):
            runs_per_step = len(own[name]) // len(steps)  # 2 where the net is held twice
            probs = own[name][step * runs_per_step + (layer >= half and runs_per_step == 2)]
            level = _level(name.split(".", 2)[2], 3)
            grid, stride = _map(latent, level, _ceil_half), float(2 ** level)
            rows = torch.arange(grid[0], dtype=torch.float64).repeat_interleave(grid[1])
            cols = torch.arange(grid[1], dtype=torch.float64).repeat(grid[0])
            centres = (torch.stack([rows, cols], -1) + 0.5) * stride
            expected = (probs * torch.cdist(centres, centres)).sum(-1)
            assert float((-torch.special.xlogy(probs, probs).sum(-1)).mean()) < 0.6 * math.log(probs.shape[-1])
            torch.testing.assert_close(call.per_layer[layer].double(), expected, **TOL)
            torch.testing.assert_close(rec.calls[step].per_layer[layer].double(), expected.mean(-1), **TOL)


def test_controlnet_xs_base_and_control_attention_equal_their_own(monkeypatch):
    # ControlNet-XS runs the UNet's blocks and its control model's side by side on maps of the same size: both
    # streams' attn1 at their level. Its up blocks double the map without the skip's size (even latents only).
    torch.manual_seed(0)
    model = _sharpen(diffusers.UNetControlNetXSModel(
        sample_size=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), block_out_channels=(16, 32), norm_num_groups=4,
        cross_attention_dim=12, num_attention_heads=2, ctrl_block_out_channels=(4, 8), ctrl_num_attention_heads=2,
        ctrl_max_norm_num_groups=2, ctrl_conditioning_embedding_out_channels=(4, 4, 4, 8)), scale=5.0)
    latent = (6, 10)
    gen = torch.Generator().manual_seed(9)
    sample, text = torch.randn(2, 4, *latent, generator=gen), torch.randn(2, 5, 12, generator=gen)
    condition = torch.rand(2, 3, 8 * latent[0], 8 * latent[1], generator=gen)

    def run():
        return model(sample, 10, text, controlnet_cond=condition).sample

    own = _own_probabilities(model, monkeypatch, run)
    rec, tokens = _record(model, run)
    assert sorted(rec.layers) == sorted(n for n in own if n.endswith("attn1"))
    assert any(".ctrl_attentions." in n for n in rec.layers) and any(".ctrl_midblock." in n for n in rec.layers)
    assert set(rec.skipped) == {n for n in own if n.endswith("attn2")}
    _check(rec, tokens, own, latent, down_blocks=2)


def test_sparse_ctrl_space_and_motion_modules_equal_their_own(monkeypatch):
    # SparseCtrl (AnimateDiff's ControlNet): the motion UNet's down blocks and a 2-D mid block.
    torch.manual_seed(0)
    model = _sharpen(diffusers.SparseControlNetModel(
        block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlockMotion", "DownBlockMotion"),
        layers_per_block=1, norm_num_groups=4, cross_attention_dim=12, attention_head_dim=2,
        motion_num_attention_heads=2, conditioning_channels=3, conditioning_embedding_out_channels=(4, 8)),
        scale=5.0)
    batch, frames, latent = 1, 3, (7, 5)
    gen = torch.Generator().manual_seed(10)
    sample = torch.randn(batch, 4, frames, *latent, generator=gen)
    text = torch.randn(batch * frames, 5, 12, generator=gen)
    condition = torch.rand(batch, 3, frames, *latent, generator=gen)  # use_simplified_condition_embedding: latent size

    def run():
        down, mid = model(sample, 10, text, controlnet_cond=condition,
                          conditioning_mask=torch.ones(batch, 1, frames, *latent), return_dict=False)
        return torch.cat([t.flatten() for t in (*down, mid)])

    own = _own_probabilities(model, monkeypatch, run)
    rec, tokens = _record(model, run)
    assert sorted(rec.layers) == sorted(n for n in own if n.endswith("attn1") or ".motion_modules." in n)
    assert _check_video(rec, tokens, own, latent, 2, batch, frames) == {"space", "time"}


def test_temporal_attention_given_other_keys_is_refused():
    # A motion module's attn2 given keys of its own (here the frames reversed: as many keys as frames, so the shape
    # alone would pass) attends to tokens that are not the queries' frames: refused, not placed as the frames.
    unet = _motion_unet()
    attn2 = unet.down_blocks[0].motion_modules[0].transformer_blocks[0].attn2

    def reversed_frames(module, args, kwargs):
        return args, {**kwargs, "encoder_hidden_states": args[0].flip(1)}

    attn2.register_forward_pre_hook(reversed_frames, with_kwargs=True)
    with pytest.raises(ValueError, match=r"motion_modules\.0\.transformer_blocks\.0\.attn2 \(Attention\) of "
                                         r"UNetMotionModel: it was given encoder_hidden_states"):
        with torch.no_grad(), vitmad.record(unet):
            unet(torch.randn(1, 4, 3, 6, 6), 10, torch.randn(3, 5, 12))


class _FeatureUNet(diffusers.UNet2DConditionModel):
    """Research code's subclass (DIFT's feature extractor, prompt-to-prompt's): the same blocks, its own forward."""

    def forward(self, sample, timestep, encoder_hidden_states):
        return super().forward(sample, timestep, encoder_hidden_states).sample


def test_a_subclass_of_the_unet_is_placed_as_the_unet(monkeypatch):
    """A subclass defined outside diffusers was refused as "no attention layer vitmad knows" (QA helper-175)."""
    base = _sd_unet(False)
    unet = _FeatureUNet.from_config(base.config)
    unet.load_state_dict(base.state_dict())
    latent = (9, 7)
    gen = torch.Generator().manual_seed(3)
    sample, text = torch.randn(2, 4, *latent, generator=gen), torch.randn(2, 5, 12, generator=gen)

    def run():
        return unet(sample, 10, text)

    own = _own_probabilities(unet, monkeypatch, run)
    rec, tokens = _record(unet, run)
    assert set(rec.skipped) == {n for n in own if n.endswith("attn2")}
    _check(rec, tokens, own, latent, down_blocks=3)


def test_controlnet_union_placed_as_a_controlnet_its_condition_fuser_skipped(monkeypatch):
    """SDXL's ControlNet-Union (ProMax): the ControlNet's encoder on the latent, placed as the UNet's; its fuser, a
    transformer over one mean-pooled token per condition image and one of the latent, skipped with its reason (the
    model was refused: the fuser's nn.MultiheadAttention had no patch embedding)."""
    torch.manual_seed(0)
    model = _sharpen(diffusers.ControlNetUnionModel(
        in_channels=4, block_out_channels=(16, 16, 32), layers_per_block=1, norm_num_groups=4, cross_attention_dim=12,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"), attention_head_dim=2,
        conditioning_embedding_out_channels=(4, 4, 4, 8), num_control_type=2, num_trans_channel=16, num_trans_head=2,
        num_trans_layer=1, num_proj_channel=16, addition_embed_type="text_time", addition_time_embed_dim=4,
        projection_class_embeddings_input_dim=12 + 6 * 4), scale=6.0)
    latent = (9, 7)
    gen = torch.Generator().manual_seed(4)
    sample, text = torch.randn(1, 4, *latent, generator=gen), torch.randn(1, 5, 12, generator=gen)
    conditions = [torch.rand(1, 3, 8 * latent[0], 8 * latent[1], generator=gen) for _ in range(2)]
    sdxl = {"text_embeds": torch.randn(1, 12, generator=gen),
            "time_ids": torch.tensor([[72.0, 56.0, 0.0, 0.0, 72.0, 56.0]])}

    def run():
        down, mid = model(sample, 10, text, controlnet_cond=conditions, control_type=torch.tensor([[1.0, 1.0]]),
                          control_type_idx=[0, 1], added_cond_kwargs=sdxl, return_dict=False)
        return torch.cat([t.flatten() for t in (*down, mid)])

    own = _own_probabilities(model, monkeypatch, run)
    rec, tokens = _record(model, run)
    assert sorted(rec.layers) == sorted(n for n in own if n.endswith("attn1"))
    fuser = {n for n in rec.skipped if n.startswith("transformer_layes.")}
    assert fuser == {"transformer_layes.0.attn"} and "condition fuser" in rec.skipped["transformer_layes.0.attn"]
    assert set(rec.skipped) - fuser == {n for n in own if n.endswith("attn2")}
    _check(rec, tokens, own, latent, down_blocks=3)
