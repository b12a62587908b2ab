"""vitmad.record on the self-attention inside Hugging Face diffusers' UNets: ``UNet2DConditionModel`` (Stable
Diffusion 1.x / 2.x and SDXL layouts), ``UNet2DModel`` (unconditional DDPM UNets) and
``UNetSpatioTemporalConditionModel`` (Stable Video Diffusion: attention per frame over the map, and per cell over the
frames).

Tiny random-weight UNets, sharpened (every Linear redrawn, the query and key projections scaled up) so that attention
is far from uniform. The reference is each layer's own attention probabilities: ``AttnProcessor2_0`` calls
``F.scaled_dot_product_attention(query, key, value, attn_mask=None)`` with ``[B, heads, N, d]`` queries and keys and
the default scale ``d ** -0.5``; the test wraps that function in ``diffusers.models.attention_processor`` and
computes the softmax in float64 from the ``q`` and ``k`` it is given. The tokens are placed by geometry written here
from diffusers' source:

- ``Transformer2DModel._operate_on_continuous_inputs`` flattens its ``[B, C, h, w]`` input row-major
  (``permute(0, 2, 3, 1).reshape(B, h * w, C)``); ``AttnProcessor2_0`` flattens a 4-D input the same way
  (``view(B, C, h * w).transpose(1, 2)``): token ``t`` is cell ``(t // w, t % w)``.
- ``conv_in`` is a stride-1 convolution; ``Downsample2D`` (``use_conv``, ``padding=1``) is a 3x3 convolution of stride
  2 and padding 1: a side of ``n`` becomes ``ceil(n / 2)``; the last down block has none. ``ResnetBlock2D(down=True)``
  (``downsample_type="resnet"``) average-pools 2x2: ``floor(n / 2)``. ``UNet2DConditionModel.forward`` passes the skip
  connection's size as ``upsample_size`` where a side is not a multiple of its total down-sampling, so up block ``j``
  runs on the map down block ``n - 1 - j`` ran on; the mid block on the last down block's. Level ``l`` has stride
  ``2 ** l`` latent pixels; its cell ``i`` is centred at ``(i + 0.5) * 2 ** l``.
- Stable Video Diffusion: ``sample.flatten(0, 1)`` stacks each video's frames, videos outermost;
  ``TransformerSpatioTemporalModel`` runs ``transformer_blocks`` per frame over its map, then
  ``TemporalBasicTransformerBlock`` per cell over the frames (see ``_svd_reference``); latent frame ``f`` is at
  ``f + 0.5`` frames. Its samplings are the 2-D blocks' (``Downsample2D``, ``Upsample2D`` to the skip's size).
- ``attn2`` (cross-attention to ``encoder_hidden_states``) is skipped.
"""

from __future__ import annotations

import math
import types

import pytest
import torch

import vitmad
from conftest import FLOAT32_STAT_ATOL, sharpened

diffusers = pytest.importorskip("diffusers")
attention_processor = pytest.importorskip("diffusers.models.attention_processor")

TOL = {"rtol": 1e-5, "atol": 1e-4}  # float32 accumulation against float64; atol in latent pixels
STAT_TOL = {"rtol": 1e-5, "atol": FLOAT32_STAT_ATOL}  # conftest.py says why


def _sharpen(model: torch.nn.Module, scale: float = 3.0) -> torch.nn.Module:
    model = sharpened(model)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, attention_processor.Attention):
                module.to_q.weight.mul_(scale)
                module.to_k.weight.mul_(scale)
    return model


def _own_probabilities(model, monkeypatch, run) -> dict[str, list[torch.Tensor]]:
    """Per ``Attention`` module name, the float64 probabilities ``[B, heads, Nq, Nk]`` of each of its calls in
    ``run``."""
    current, found = [], {}
    original = attention_processor.F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
        assert attn_mask is None and not is_causal
        logits = q.double() @ k.double().transpose(-1, -2) * (q.shape[-1] ** -0.5 if scale is None else scale)
        # Under "" an SDPA call before any diffusers Attention (ControlNet-Union's fuser, an nn.MultiheadAttention).
        found.setdefault(current[-1] if current else "", []).append(logits.softmax(-1))
        return original(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, **kwargs)

    handles = [m.register_forward_pre_hook(lambda m, a, n=n: current.append(n))
               for n, m in model.named_modules() if isinstance(m, attention_processor.Attention)]
    monkeypatch.setattr(attention_processor.F, "scaled_dot_product_attention", spy)
    try:
        with torch.no_grad():
            run()
    finally:
        monkeypatch.undo()
        for handle in handles:
            handle.remove()
    return found


def _level(name: str, down_blocks: int) -> int:
    """The level (number of halvings) of a block's map, from the module docstring's rules."""
    part, index = name.split(".")[:2]
    if part == "mid_block":
        return down_blocks - 1
    return int(index) if part == "down_blocks" else down_blocks - 1 - int(index)


def _map(latent: tuple[int, int], level: int, halve) -> tuple[int, int]:
    h, w = latent
    for _ in range(level):
        h, w = halve(h), halve(w)
    return h, w


def _reference(probs: torch.Tensor, grid: tuple[int, int], stride: float) -> dict[str, torch.Tensor]:
    rows = torch.arange(grid[0], dtype=torch.float64).repeat_interleave(grid[1])
    cols = torch.arange(grid[1], dtype=torch.float64).repeat(grid[0])
    centres = (torch.stack([rows, cols], -1) + 0.5) * stride
    return {"mad": (probs * torch.cdist(centres, centres)).sum(-1),
            "entropy": -torch.special.xlogy(probs, probs).sum(-1)}


def _check(rec, tokens, own, latent, down_blocks, halve=lambda n: -(-n // 2), call=-1) -> None:
    """Every recorded layer against its own probabilities, placed on its level's map."""
    assert rec.layers and all(name.endswith("attn1") or name.endswith(("attentions.0", "attentions.1"))
                              for name in rec.layers)
    for layer, name in enumerate(rec.layers):
        level = _level(name, down_blocks)
        grid, stride = _map(latent, level, halve), float(2 ** level)
        probs = own[name][call]
        assert probs.shape[-1] == math.prod(grid)
        expected = _reference(probs, grid, stride)
        assert float(expected["entropy"].mean()) < 0.6 * math.log(probs.shape[-1])  # far from uniform
        geometry = tokens.calls[call].geometry[layer]
        assert geometry.grid == grid and geometry.stride == (stride, stride)
        torch.testing.assert_close(tokens.calls[call].per_layer[layer].double(), expected["mad"], **TOL)
        torch.testing.assert_close(rec.calls[call].per_layer[layer].double(), expected["mad"].mean(-1), **TOL)
        torch.testing.assert_close(tokens.calls[call].statistics["entropy"][layer].double(), expected["entropy"],
                                   **STAT_TOL)


def _record(model, run):
    """(mean recording, per-token recording, outputs); the output bit-identical with and without recording."""
    with torch.no_grad():
        plain = run()
        with vitmad.record(model, stats=["entropy"]) as rec:
            recorded = run()
        with vitmad.record(model, stats=["entropy"], reduction="none") as tokens:
            run()
    assert torch.equal(plain, recorded)
    return rec, tokens


def _sd_unet(linear_projection: bool) -> torch.nn.Module:
    """Stable Diffusion 1.x's block layout (attention at the first two levels, none at the last), or SDXL's (none at
    the first level; two transformer layers per block, linear projections in and out, as SD 2.x and SDXL have)."""
    if linear_projection:
        down = ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
        up = ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")
        layers = (1, 2, 2)
    else:
        down = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
        up = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
        layers = 1
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 16, 32), layers_per_block=1,
        down_block_types=down, up_block_types=up, cross_attention_dim=12, attention_head_dim=2, norm_num_groups=4,
        transformer_layers_per_block=layers, use_linear_projection=linear_projection)
    return _sharpen(unet)


@pytest.mark.parametrize("latent", [(9, 7), (8, 12)], ids=["odd_9x7", "8x12"])
@pytest.mark.parametrize("linear_projection", [False, True], ids=["sd1", "sdxl_layout"])
def test_unet2d_condition_self_attention_equals_its_own(linear_projection, latent, monkeypatch):
    unet = _sd_unet(linear_projection)
    gen = torch.Generator().manual_seed(1)
    sample, text = torch.randn(2, 4, *latent, generator=gen), torch.randn(2, 5, 12, generator=gen)

    def run():
        return unet(sample, 10, text).sample

    own = _own_probabilities(unet, monkeypatch, run)
    rec, tokens = _record(unet, run)
    self_attention = [n for n in own if n.endswith("attn1")]
    assert sorted(rec.layers) == sorted(self_attention)
    assert set(rec.skipped) == {n for n in own if n.endswith("attn2")}
    assert all("cross-attention" in reason for reason in rec.skipped.values())
    _check(rec, tokens, own, latent, down_blocks=3)


def test_unet2d_condition_keeps_denoising_steps_apart(monkeypatch):
    # One forward per denoising step: rec.calls keeps them apart, each measured against its own probabilities.
    unet = _sd_unet(False)
    gen = torch.Generator().manual_seed(2)
    sample, text = torch.randn(1, 4, 7, 10, generator=gen), torch.randn(1, 5, 12, generator=gen)

    def run():
        return torch.cat([unet(sample, t, text).sample for t in (900, 50)])

    own = _own_probabilities(unet, monkeypatch, run)
    rec, tokens = _record(unet, run)
    assert len(rec.calls) == len(tokens.calls) == 2
    for call in (0, 1):
        _check(rec, tokens, own, (7, 10), down_blocks=3, call=call)
    assert not torch.equal(rec.calls[0].per_layer[0], rec.calls[1].per_layer[0])


@pytest.mark.parametrize("downsample", ["conv", "resnet"])
def test_unet2d_attention_blocks_equal_their_own(downsample, monkeypatch):
    # DDPM's layout: attention blocks at the second level and in the mid block, over the map the Attention takes.
    torch.manual_seed(0)
    unet = _sharpen(diffusers.UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=8, norm_num_groups=4, downsample_type=downsample, upsample_type=downsample))
    latent = (6, 10)
    sample = torch.randn(2, 3, *latent, generator=torch.Generator().manual_seed(3))

    def run():
        return unet(sample, 10).sample

    own = _own_probabilities(unet, monkeypatch, run)
    rec, tokens = _record(unet, run)
    assert rec.layers == ["down_blocks.1.attentions.0", "mid_block.attentions.0", "up_blocks.0.attentions.0",
                          "up_blocks.0.attentions.1"]
    assert rec.skipped == {}
    _check(rec, tokens, own, latent, down_blocks=2, halve=lambda n: n // 2)
    # Its up-sampling doubles the map without the skip connection's size: an odd side does not run at all.
    with pytest.raises(RuntimeError, match="Sizes of tensors must match"):
        unet(torch.randn(1, 3, 7, 10), 10)


def test_gligen_fuser_is_refused_and_attn1_recorded_alone():
    # GLIGEN's gated fuser attends over the map and the grounding tokens concatenated: refused by name.
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, block_out_channels=(16, 32), layers_per_block=1, cross_attention_dim=12, attention_head_dim=2,
        norm_num_groups=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_type="gated")
    gligen = {"gligen": {"boxes": torch.rand(1, 2, 4), "positive_embeddings": torch.randn(1, 2, 12),
                         "masks": torch.ones(1, 2)}}

    def run():
        return unet(torch.randn(1, 4, 8, 8), 10, torch.randn(1, 5, 12), cross_attention_kwargs=gligen)

    with pytest.raises(ValueError, match=r"fuser.attn \(Attention\).*other than its blocks' attn1"):
        with torch.no_grad(), vitmad.record(unet):
            run()
    with torch.no_grad(), vitmad.record(unet, layers=["*.attn1"]) as rec:
        run()
    assert rec.layers and all(name.endswith(".attn1") for name in rec.layers)


class _StoringProcessor(attention_processor.AttnProcessor):
    """A prompt-to-prompt style processor of one's own (here: diffusers' AttnProcessor under another name), which
    vitmad has not read: what it does with the probabilities is its own."""


def test_unknown_processor_and_blocks_are_refused_by_name():
    unet = _sd_unet(False)
    unet.set_attn_processor(_StoringProcessor())
    with pytest.raises(ValueError, match="its processor is _StoringProcessor, which vitmad does not place"):
        with torch.no_grad(), vitmad.record(unet):
            unet(torch.randn(1, 4, 8, 8), 10, torch.randn(1, 5, 12))
    torch.manual_seed(0)
    simple = diffusers.UNet2DConditionModel(
        sample_size=8, block_out_channels=(16, 32), layers_per_block=1, cross_attention_dim=12, attention_head_dim=8,
        norm_num_groups=4, down_block_types=("SimpleCrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "SimpleCrossAttnUpBlock2D"), mid_block_type="UNetMidBlock2DSimpleCrossAttn")
    with pytest.raises(ValueError, match="down_blocks.0 is a SimpleCrossAttnDownBlock2D, whose samplings or attention"):
        with torch.no_grad(), vitmad.record(simple):
            simple(torch.randn(1, 4, 8, 8), 10, torch.randn(1, 5, 12))


@pytest.mark.parametrize("where", ["up_blocks", ""], ids=["up_blocks_only", "every_layer"])
def test_xformers_processor_is_refused_not_left_out(where, monkeypatch):
    """xFormers' processor computes the attention where vitmad does not look: no call of it reached the placer,
    and its layers were left out of the recording without a word (QA helper-166). Its kernel is stood in for by
    the same arithmetic in torch (xformers is not installed); the real one calls nothing vitmad sees either."""
    def memory_efficient_attention(q, k, v, attn_bias=None, op=None, scale=None):
        logits = q @ k.transpose(-1, -2) * (q.shape[-1] ** -0.5 if scale is None else scale)
        weights = (logits - logits.amax(-1, keepdim=True)).exp()
        return weights / weights.sum(-1, keepdim=True) @ v

    xformers = types.SimpleNamespace(ops=types.SimpleNamespace(memory_efficient_attention=memory_efficient_attention))
    monkeypatch.setattr(attention_processor, "xformers", xformers, raising=False)
    unet = _sd_unet(False)
    unet.set_attn_processor({name: attention_processor.XFormersAttnProcessor() if name.startswith(where)
                             else attention_processor.AttnProcessor2_0() for name in unet.attn_processors})
    with pytest.raises(ValueError, match=r"vitmad.record: up_blocks\.\d\.attentions\.0\.transformer_blocks\.0\.attn1 "
                       r"\(Attention\) of UNet2DConditionModel: its processor is XFormersAttnProcessor, which vitmad "
                       r"does not place") if where else pytest.raises(
                           ValueError, match=r"down_blocks\.0\.attentions\.0\.transformer_blocks\.0\.attn1 "
                           r"\(Attention\) of UNet2DConditionModel: its processor is XFormersAttnProcessor"):
        with torch.no_grad(), vitmad.record(unet):
            unet(torch.randn(1, 4, 8, 8), 10, torch.randn(1, 5, 12))


def _svd_reference(probs: torch.Tensor, kind: str, batch: int, frames: int, grid: tuple[int, int], stride: float):
    """Per statistic ``[B, heads, F * h * w]`` in (frame, row, column) order, from the call's ``[B * G, heads, n, n]``:
    ``"space"`` groups are the frames of each video (``sample.flatten(0, 1)``), their tokens the map row-major;
    ``"time"`` groups the cells of each video row-major (``TemporalBasicTransformerBlock``'s ``reshape(B, F, hw, C)
    .permute(0, 2, 1, 3)``), their tokens the frames, frame ``f`` at ``f + 0.5``."""
    cells = grid[0] * grid[1]
    entropy = -torch.special.xlogy(probs, probs).sum(-1)
    if kind == "space":
        space = _reference(probs, grid, stride)["mad"]
        time = torch.zeros_like(space)
    else:
        times = torch.arange(frames, dtype=torch.float64)[:, None] + 0.5
        time = (probs * torch.cdist(times, times)).sum(-1)
        space = torch.zeros_like(time)

    def by_frame_row_column(values: torch.Tensor) -> torch.Tensor:
        heads = values.shape[1]
        if kind == "space":  # [B * F, heads, hw] -> [B, heads, F, hw]
            values = values.reshape(batch, frames, heads, cells).transpose(1, 2)
        else:  # [B * hw, heads, F] -> [B, heads, F, hw]
            values = values.reshape(batch, cells, heads, frames).permute(0, 2, 3, 1)
        return values.reshape(batch, heads, frames * cells)

    return {"mad": by_frame_row_column(space), "temporal": by_frame_row_column(time),
            "entropy": by_frame_row_column(entropy)}


@pytest.mark.parametrize("latent", [(7, 5), (6, 8)], ids=["odd_7x5", "6x8"])
def test_stable_video_diffusion_space_and_time_equal_their_own(latent, monkeypatch):
    torch.manual_seed(0)
    unet = _sharpen(diffusers.UNetSpatioTemporalConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
        up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"), addition_time_embed_dim=4,
        projection_class_embeddings_input_dim=12, cross_attention_dim=12, num_attention_heads=(2, 2), num_frames=3),
        scale=6.0)
    batch, frames = 2, 3
    gen = torch.Generator().manual_seed(4)
    sample = torch.randn(batch, frames, 4, *latent, generator=gen)
    image, added = torch.randn(batch, 1, 12, generator=gen), torch.randn(batch, 3, generator=gen)

    def run():
        return unet(sample, 10, image, added).sample

    own = _own_probabilities(unet, monkeypatch, run)
    rec, tokens = _record(unet, run)
    assert sorted(rec.layers) == sorted(n for n in own if n.endswith("attn1"))
    assert set(rec.skipped) == {n for n in own if n.endswith("attn2")}
    call = tokens.calls[-1]
    for layer, name in enumerate(rec.layers):
        kind = "time" if ".temporal_transformer_blocks." in name else "space"
        level = _level(name, 2)
        grid, stride = _map(latent, level, lambda n: -(-n // 2)), float(2 ** level)
        probs = own[name][-1]
        assert float((-torch.special.xlogy(probs, probs).sum(-1)).mean()) < 0.6 * math.log(probs.shape[-1])
        expected = _svd_reference(probs, kind, batch, frames, grid, stride)
        geometry = call.geometry[layer]
        assert (geometry.grid, geometry.stride, geometry.attention, geometry.frames) == (
            grid, (stride, stride), kind, frames)
        torch.testing.assert_close(call.per_layer[layer].double(), expected["mad"], **TOL)
        torch.testing.assert_close(call.temporal[layer].double(), expected["temporal"], **TOL)
        torch.testing.assert_close(call.statistics["entropy"][layer].double(), expected["entropy"], **STAT_TOL)
        torch.testing.assert_close(rec.calls[-1].per_layer[layer].double(), expected["mad"].mean(-1), **TOL)
