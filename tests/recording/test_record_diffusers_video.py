"""vitmad.record on diffusers' video diffusion transformers: Wan, CogVideoX (1.0 and 1.5) and HunyuanVideo.

Tiny random-weight models, their query / key projections (and the gains of their q / k norms) scaled so that
attention is far from uniform. The reference is each model's own attention: the probabilities of every
F.scaled_dot_product_attention call its attention processor makes, computed here in float64 from the q, k (RoPE
already applied), scale and mask the processor handed it. Placed by geometry written here from reading the models'
source: the tubelets of the latent video in (frame, row, column) order (``flatten(2)`` of the patch ``Conv3d``'s
output, CogVideoX's per-frame ``Conv2d`` flattened frames outermost), tubelet (f, r, c) at ``((r + 0.5) p, (c + 0.5)
p)`` latent pixels and ``(f + 0.5) p_t`` latent frames; CogVideoX's text tokens before them and HunyuanVideo's after
them, without a position.
"""

from __future__ import annotations

import math

import pytest
import torch

import vitmad
from conftest import statistics_reference

diffusers = pytest.importorskip("diffusers")

TOL, STAT_TOL = {"rtol": 1e-5, "atol": 1e-4}, {"rtol": 1e-5, "atol": 1e-6}  # atol in latent pixels / frames; masses
STATS = ["entropy", "prefix_mass", "prefix_maps"]
BATCH, TEXT, TEXT_DIM = 2, 5, 16


def _sharpened(model: torch.nn.Module) -> torch.nn.Module:
    """Query and key projections drawn anew (std 0.5) and q / k norm gains x4 (Wan and HunyuanVideo normalise q
    and k, which undoes a larger projection): attention far from the uniform a tiny init gives."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            leaf = name.split(".")[-2] if "." in name else ""
            if leaf in ("to_q", "to_k", "add_q_proj", "add_k_proj") and parameter.dim() == 2:
                parameter.normal_(0.0, 0.5)
            elif leaf.startswith("norm_") and leaf.endswith(("_q", "_k")):
                parameter.mul_(4.0)
    return model.eval()


def _wan(**image_to_video):
    torch.manual_seed(0)
    return _sharpened(diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
        text_dim=TEXT_DIM, freq_dim=16, ffn_dim=32, num_layers=2, rope_max_seq_len=32, **image_to_video))


def _cogvideox(patch_t: int | None):
    """CogVideoX 1.0 (``patch_t`` None: sin-cos position embeddings) or 1.5 (rotary embeddings, as its pipeline
    computes them: ``image_rotary_emb`` is then what ``rotary(frames, grid)`` returns)."""
    torch.manual_seed(0)
    model = _sharpened(diffusers.CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=8,
        text_embed_dim=TEXT_DIM, num_layers=2, sample_width=12, sample_height=8, sample_frames=9, patch_size=2,
        patch_size_t=patch_t, temporal_compression_ratio=4, max_text_seq_length=TEXT,
        use_rotary_positional_embeddings=patch_t is not None))

    def rotary(frames: int, grid: tuple[int, int]):
        if patch_t is None:
            return None
        from diffusers.models.embeddings import get_3d_rotary_pos_embed
        return get_3d_rotary_pos_embed(embed_dim=16, crops_coords=None, grid_size=grid,
                                       temporal_size=(frames + patch_t - 1) // patch_t, grid_type="slice",
                                       max_size=(4, 6))

    return model, rotary


def _hunyuan():
    torch.manual_seed(0)
    return _sharpened(diffusers.HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1, num_single_layers=1,
        num_refiner_layers=1, patch_size=2, patch_size_t=1, text_embed_dim=TEXT_DIM, pooled_projection_dim=8,
        rope_axes_dim=(2, 2, 4)))


def _own_attention(model: torch.nn.Module, names: list[str], run) -> list[torch.Tensor]:
    """``[B, H, n, n]`` float64 probabilities of each SDPA call the modules ``names`` make while ``run()`` runs,
    in call order, from the arguments the processor gave SDPA."""
    real, inside, maps = torch.nn.functional.scaled_dot_product_attention, [], []

    def probabilities(*args, **kwargs):
        names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale")
        bound = dict(zip(names, args)) | kwargs  # diffusers' native backend passes them by keyword
        q, k, attn_mask, scale = bound["query"], bound["key"], bound.get("attn_mask"), bound.get("scale")
        if inside:
            logits = (q.double() @ k.double().transpose(-1, -2)) * (scale or q.shape[-1] ** -0.5)
            if attn_mask is not None:  # SDPA's: a boolean False hides a key, a float one adds
                logits = (logits.masked_fill(~attn_mask, -math.inf) if attn_mask.dtype == torch.bool
                          else logits + attn_mask.double())
            maps.append(logits.softmax(-1))
        return real(*args, **kwargs)

    handles = []
    for name in names:
        module = model.get_submodule(name)
        handles.append(module.register_forward_pre_hook(lambda *_: inside.append(1)))
        handles.append(module.register_forward_hook(lambda *_: inside.clear()))  # None: the output stays
    torch.nn.functional.scaled_dot_product_attention = probabilities
    try:
        with torch.no_grad():
            run()
    finally:
        torch.nn.functional.scaled_dot_product_attention = real
        for handle in handles:
            handle.remove()
    return maps


def _token_positions(frames: int, grid: tuple[int, int], patch: int, frame_size: int, prefix: int, suffix: int):
    """``[n, 2]`` latent pixels and ``[n, 1]`` latent frames of ``prefix`` text tokens, the tubelets in (frame,
    row, column) order, then ``suffix`` text tokens (NaN rows: no position)."""
    f, r, c = torch.meshgrid(torch.arange(frames), torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
    space = (torch.stack([r, c], -1).reshape(-1, 2).double() + 0.5) * patch
    time = (f.reshape(-1, 1).double() + 0.5) * frame_size
    return (torch.cat([torch.full((prefix, 2), math.nan), space, torch.full((suffix, 2), math.nan)]).double(),
            torch.cat([torch.full((prefix, 1), math.nan), time, torch.full((suffix, 1), math.nan)]).double())


def _check(rec, call: int, maps: list[torch.Tensor], frames: int, grid: tuple[int, int], patch: int,
           frame_size: int, prefix: int = 0, suffix: int = 0, stats: bool = True) -> None:
    """Call ``call`` of ``rec`` (reduction="none") against ``maps``, one per layer: spatial and temporal MAD per
    tubelet, entropy, prefix mass and the text tokens' maps (statistics_reference), and the geometry."""
    space, time = _token_positions(frames, grid, patch, frame_size, prefix, suffix)
    placed = ~space[:, 0].isnan()
    recorded = rec.calls[call]
    assert len(recorded.layers) == len(maps)
    for layer, probabilities in enumerate(maps):
        expected = statistics_reference(probabilities, space)
        # Far from uniform attention: a tubelet placed at a wrong cell would change the MAD.
        assert float(expected["entropy"].mean()) < 0.75 * math.log(probabilities.shape[-1])
        temporal = (probabilities[:, :, placed][..., placed] * torch.cdist(time[placed], time[placed])).sum(-1)
        torch.testing.assert_close(recorded.per_layer[layer].double(), expected["mad"], **TOL)
        torch.testing.assert_close(recorded.temporal[layer].double(), temporal, **TOL)
        geometry = recorded.geometry[layer]
        assert geometry.grid == grid and geometry.stride == (patch, patch) and geometry.attention == "space-time"
        assert geometry.frames == frames and geometry.frame_stride == frame_size
        assert geometry.num_prefix_tokens == (prefix or None) and geometry.num_suffix_tokens == (suffix or None)
        if not stats:
            continue
        for stat in ("entropy", "prefix_mass"):
            torch.testing.assert_close(recorded.statistics[stat][layer].double(), expected[stat], **STAT_TOL)
        if prefix or suffix:
            torch.testing.assert_close(recorded.prefix_maps[layer].double(), expected["prefix_maps"], **STAT_TOL)
        else:
            assert recorded.prefix_maps[layer] is None


def test_wan_self_attention_is_joint_space_time_over_latent_tubelets_one_call_per_step():
    """Wan's attn1 over 3 latent frames of a 3x5 patch grid (6x10 latents, patch 1x2x2: odd, not square), two
    denoising steps with their own timesteps kept apart in rec.calls; attn2 (cross-attention to text) skipped."""
    model = _wan()
    torch.manual_seed(2)
    latents, text = torch.randn(BATCH, 4, 3, 6, 10), torch.randn(BATCH, TEXT, TEXT_DIM)
    steps = [torch.tensor([900, 900]), torch.tensor([100, 100])]
    layers = ["blocks.0.attn1", "blocks.1.attn1"]
    maps, plain = [], []
    for timestep in steps:
        maps.append(_own_attention(model, layers, lambda t=timestep: plain.append(model(latents, t, text).sample)))
    with torch.no_grad(), vitmad.record(model, reduction="none", stats=STATS) as rec:
        recorded = [model(latents, t, text).sample for t in steps]
    assert all(torch.equal(a, b) for a, b in zip(recorded, plain))
    assert rec.layers == layers and len(rec.calls) == 2
    assert set(rec.skipped) == {"blocks.0.attn2", "blocks.1.attn2"}
    assert "cross-attention" in rec.skipped["blocks.0.attn2"]
    for call in range(2):
        _check(rec, call, maps[call], frames=3, grid=(3, 5), patch=2, frame_size=1)
    # The steps differ (the timestep modulates every block): what researchers plot against the timestep.
    assert not torch.allclose(rec.calls[0].per_layer[1], rec.calls[1].per_layer[1])


class _AttentionVitmadDoesNotSee:
    """A processor that attends where vitmad does not look (xFormers' kernel, a custom CUDA kernel): here it
    computes nothing, so no attention call reaches vitmad at all."""

    def __call__(self, attn, hidden_states, *args, **kwargs):
        return hidden_states


def test_processor_that_attends_out_of_sight_is_refused_not_left_out():
    """Such a layer never reached the placer's processor check: it was left out of the recording, silently."""
    model = _wan()
    model.blocks[0].attn1.set_processor(_AttentionVitmadDoesNotSee())
    with torch.no_grad(), vitmad.record(model), pytest.raises(ValueError, match=(
            r"blocks\.0\.attn1 \(WanAttention\) of WanTransformer3DModel: it runs the attention processor "
            "_AttentionVitmadDoesNotSee")):
        model(torch.randn(1, 4, 2, 4, 6), torch.tensor([500]), torch.randn(1, TEXT, TEXT_DIM))


def test_attention_backend_out_of_sight_is_refused_not_left_out():
    """diffusers' attention backends other than the native ones (flash, sage, xformers; flex through a compiled or
    wrapped flex_attention) compute the attention without a call vitmad sees: the processor's class is the one read,
    so the layer was left out without a word (QA helper-169). Refused, naming the backend; the flex backend calling
    torch's flex_attention itself is read as the native one (the same MAD), and the native backend records again."""
    import functools
    import types

    from diffusers.models import attention_dispatch
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    model = _wan()
    inputs = (torch.randn(1, 4, 2, 4, 6), torch.tensor([500]), torch.randn(1, TEXT, TEXT_DIM))
    active = _AttentionBackendRegistry._active_backend  # set_attention_backend changes it for the whole process
    flex_module = attention_dispatch.flex_attention
    # What production code holds (torch.compile(flex_attention)): a callable that is not torch's function, which
    # vitmad's stand-in does not replace.
    wrapped = types.SimpleNamespace(**vars(flex_module))
    wrapped.flex_attention = functools.partial(flex_module.flex_attention)
    recorded = {}
    try:
        for backend in ("flex", "native"):
            model.set_attention_backend(backend)
            with torch.no_grad(), vitmad.record(model) as rec:
                model(*inputs)
            recorded[backend] = rec
        model.set_attention_backend("flex")
        attention_dispatch.flex_attention = wrapped
        with torch.no_grad(), vitmad.record(model), pytest.raises(ValueError, match=(
                r"blocks\.0\.attn1 \(WanAttention\) of WanTransformer3DModel: its attention ran on diffusers' "
                r"attention backend 'flex', .*, which calls no F.scaled_dot_product_attention \(nor torch's "
                r"flex_attention itself, uncompiled\) vitmad sees")):
            model(*inputs)
    finally:
        attention_dispatch.flex_attention = flex_module
        model.reset_attention_backend()
        _AttentionBackendRegistry.set_active_backend(active)
    assert recorded["flex"].layers == recorded["native"].layers == ["blocks.0.attn1", "blocks.1.attn1"]
    torch.testing.assert_close(recorded["flex"].mad, recorded["native"].mad, rtol=1e-5, atol=1e-5)


def test_steps_a_cache_skips_are_empty_calls_that_say_so():
    """diffusers' Pyramid Attention Broadcast returns the attention's cached output on some steps: those calls
    have no layer, and reading their MAD says why (it blamed class attention, QA helper-169)."""
    model, _ = _cogvideox(None)
    step = {"t": 999}
    diffusers.apply_pyramid_attention_broadcast(model, diffusers.PyramidAttentionBroadcastConfig(
        spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(100, 800),
        current_timestep_callback=lambda: step["t"]))
    latents, text = torch.randn(1, 3, 4, 8, 12), torch.randn(1, TEXT, TEXT_DIM)
    with torch.no_grad(), vitmad.record(model) as rec:
        for t in (900, 700, 600, 500):
            step["t"] = t
            model(latents, text, torch.tensor([t]))
    assert [len(call.layers) for call in rec.calls] == [2, 0, 2, 0]
    with pytest.raises(ValueError, match=r"no recorded layer ran in this call, so it has no mad \(a cache such as "
                                         r"diffusers' Pyramid Attention Broadcast may have skipped them\)"):
        _ = rec.calls[1].mad
    assert torch.stack([call.mad for call in rec.calls if call.layers]).shape == (2, 2, 1, 2)
    # The latest call is one the cache skipped: rec.mad says so (it advised other layers=, QA helper-236).
    with pytest.raises(RuntimeError, match=r"latest forward call ran none of the attention .* which earlier calls of "
                                           r"this recording did: a cache such as diffusers' Pyramid Attention "
                                           r"Broadcast may have skipped them"):
        _ = rec.mad


def test_wan_image_to_video_skips_both_cross_attentions():
    """Wan 2.1 image-to-video: attn2 attends to the CLIP image tokens (added key / value projections) and to the
    text (its processor takes the last 512 of encoder_hidden_states as text): skipped; attn1 placed as in
    text-to-video."""
    model = _wan(image_dim=8, added_kv_proj_dim=16)
    torch.manual_seed(2)
    inputs = (torch.randn(1, 4, 2, 4, 6), torch.tensor([500]), torch.randn(1, 512, TEXT_DIM))
    image = torch.randn(1, 3, 8)
    layers = ["blocks.0.attn1", "blocks.1.attn1"]
    plain = []
    maps = _own_attention(model, layers, lambda: plain.append(
        model(*inputs, encoder_hidden_states_image=image).sample))
    with torch.no_grad(), vitmad.record(model, reduction="none", stats=STATS) as rec:
        recorded = model(*inputs, encoder_hidden_states_image=image).sample
    assert torch.equal(recorded, plain[0]) and rec.layers == layers
    assert "CLIP image tokens" in rec.skipped["blocks.1.attn2"]
    _check(rec, 0, maps, frames=2, grid=(2, 3), patch=2, frame_size=1)


@pytest.mark.parametrize("patch_t, frames", [(None, 3), (2, 4)])
def test_cogvideox_text_tokens_come_first_without_a_position(patch_t, frames):
    """CogVideoX 1.0 (per-frame Conv2d, 3 latent frames) and 1.5 (Linear over patch_size_t = 2 latent frames, 4
    latent frames: 2 tubelet frames): the text first, then the tubelets of a 3x5 grid (6x10 latents)."""
    model, rotary = _cogvideox(patch_t)
    torch.manual_seed(2)
    latents, text = torch.randn(BATCH, frames, 4, 6, 10), torch.randn(BATCH, TEXT, TEXT_DIM)
    timestep, rope = torch.tensor([500, 500]), rotary(frames, (3, 5))
    layers = ["transformer_blocks.0.attn1", "transformer_blocks.1.attn1"]
    plain = []
    maps = _own_attention(model, layers, lambda: plain.append(
        model(latents, text, timestep, image_rotary_emb=rope).sample))
    with torch.no_grad(), vitmad.record(model, reduction="none", stats=STATS) as rec:
        recorded = model(latents, text, timestep, image_rotary_emb=rope).sample
    assert torch.equal(recorded, plain[0]) and rec.layers == layers and rec.skipped == {}
    _check(rec, 0, maps, frames=frames // (patch_t or 1), grid=(3, 5), patch=2, frame_size=patch_t or 1,
           prefix=TEXT)


def test_hunyuan_video_text_tokens_come_last_padding_masked_refiner_skipped():
    """HunyuanVideo's dual- and single-stream blocks: the tubelets of 3 latent frames of a 3x5 grid, then the
    refined text tokens, the second video's last 2 text tokens padding (masked keys: no mass on them)."""
    model = _hunyuan()
    torch.manual_seed(2)
    latents, text = torch.randn(BATCH, 4, 3, 6, 10), torch.randn(BATCH, TEXT, TEXT_DIM)
    text_mask = torch.ones(BATCH, TEXT, dtype=torch.long)
    text_mask[1, -2:] = 0
    inputs = (latents, torch.tensor([500, 500]), text, text_mask, torch.randn(BATCH, 8))
    layers = ["transformer_blocks.0.attn", "single_transformer_blocks.0.attn"]
    plain = []
    maps = _own_attention(model, layers, lambda: plain.append(model(*inputs, guidance=torch.tensor([3.0, 3.0])).sample))
    assert float(maps[0][1, :, :, -2:].abs().max()) == 0.0  # the padding keys really are masked
    with torch.no_grad(), vitmad.record(model, reduction="none", stats=STATS) as rec:
        recorded = model(*inputs, guidance=torch.tensor([3.0, 3.0])).sample
    assert torch.equal(recorded, plain[0]) and rec.layers == layers
    assert list(rec.skipped) == ["context_embedder.token_refiner.refiner_blocks.0.attn"]
    _check(rec, 0, maps, frames=3, grid=(3, 5), patch=2, frame_size=1, suffix=TEXT)


def test_a_replaced_attention_processor_is_refused_by_name():
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor

    class LoggingProcessor(WanAttnProcessor):  # a user's own: it may order or mask the tokens otherwise
        pass

    model = _wan()
    model.blocks[0].attn1.set_processor(LoggingProcessor())
    with vitmad.record(model), torch.no_grad(), pytest.raises(ValueError, match=r"blocks\.0\.attn1.*LoggingProcessor.*"
                                                                               r"not WanAttnProcessor"):
        model(torch.randn(1, 4, 2, 4, 4), torch.tensor([1]), torch.randn(1, TEXT, TEXT_DIM))


def _ltx():
    torch.manual_seed(0)
    return _sharpened(diffusers.LTXVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16,
        num_layers=2, caption_channels=TEXT_DIM))


def _packed(latents: torch.Tensor) -> torch.Tensor:
    """LTX's pipeline packing with patch 1 (``_pack_latents``): ``[B, C, F, H, W]`` -> ``[B, F * H * W, C]``, one
    token per latent cell in (frame, row, column) order."""
    return latents.permute(0, 2, 3, 4, 1).flatten(1, 3)


def test_ltx_video_packed_latents_are_placed_on_the_grid_its_forward_is_given():
    """LTX-Video takes its latents packed, one token per latent cell, the grid only as num_frames, height, width:
    3 latent frames of 3x5 latent pixels; attn2 (cross-attention to text) skipped."""
    model = _ltx()
    torch.manual_seed(2)
    inputs = (_packed(torch.randn(BATCH, 4, 3, 3, 5)), torch.randn(BATCH, TEXT, TEXT_DIM), torch.tensor([500, 500]),
              torch.ones(BATCH, TEXT))
    grid = dict(num_frames=3, height=3, width=5)
    layers = ["transformer_blocks.0.attn1", "transformer_blocks.1.attn1"]
    plain = []
    maps = _own_attention(model, layers, lambda: plain.append(model(*inputs, **grid).sample))
    with torch.no_grad(), vitmad.record(model, reduction="none", stats=STATS) as rec:
        recorded = model(*inputs, **grid).sample
    assert torch.equal(recorded, plain[0]) and rec.layers == layers
    assert set(rec.skipped) == {"transformer_blocks.0.attn2", "transformer_blocks.1.attn2"}
    _check(rec, 0, maps, frames=3, grid=(3, 5), patch=1, frame_size=1)
    # The grid given as 0-d tensors and NumPy ints, which the model takes too: the same placement (was refused as
    # latents "not packed on that grid", QA helper-169).
    numpy = pytest.importorskip("numpy")
    with torch.no_grad(), vitmad.record(model, reduction="none", stats=STATS) as again:
        model(*inputs, num_frames=torch.tensor(3), height=numpy.int64(3), width=5)
    assert [g.grid for g in again.geometry] == [(3, 5), (3, 5)]
    torch.testing.assert_close(again.mad, rec.mad, rtol=0, atol=0)
    # Conditioning pipelines place tokens by video_coords of their own: refused, not guessed.
    coords = torch.zeros(BATCH, 3, 45)
    with vitmad.record(model), torch.no_grad(), pytest.raises(ValueError, match="video_coords"):
        model(*inputs, **grid, video_coords=coords)


def test_allegro_attends_over_the_tubelets_its_per_frame_embedding_cuts():
    """Allegro: each latent frame cut by pos_embed's Conv2d, the frames then flattened frames outermost: joint
    space-time attention over 3 latent frames of a 3x5 grid; the second video's last latent frame masked as keys
    by the attention_mask the model takes (a bias SDPA adds); attn2 (cross-attention to text) skipped."""
    torch.manual_seed(0)
    model = _sharpened(diffusers.AllegroTransformer3DModel(
        patch_size=2, patch_size_t=1, num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
        num_layers=2, cross_attention_dim=16, sample_height=8, sample_width=8, sample_frames=9,
        caption_channels=TEXT_DIM))
    torch.manual_seed(2)
    video_mask = torch.ones(BATCH, 3, 6, 10)
    video_mask[1, -1] = 0
    inputs = (torch.randn(BATCH, 4, 3, 6, 10), torch.randn(BATCH, TEXT, TEXT_DIM), torch.tensor([500, 500]))
    layers = ["transformer_blocks.0.attn1", "transformer_blocks.1.attn1"]
    plain = []
    maps = _own_attention(model, layers, lambda: plain.append(model(*inputs, attention_mask=video_mask).sample))
    assert float(maps[0][1, :, :, -15:].max()) < 1e-30  # the masked frame's keys hold no mass
    with torch.no_grad(), vitmad.record(model, reduction="none", stats=STATS) as rec:
        recorded = model(*inputs, attention_mask=video_mask).sample
    assert torch.equal(recorded, plain[0]) and rec.layers == layers
    assert set(rec.skipped) == {"transformer_blocks.0.attn2", "transformer_blocks.1.attn2"}
    _check(rec, 0, maps, frames=3, grid=(3, 5), patch=2, frame_size=1)


def _latte():
    torch.manual_seed(0)
    return _sharpened(diffusers.LatteTransformer3DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, num_layers=2, sample_size=8,
        patch_size=2, cross_attention_dim=16, caption_channels=TEXT_DIM, video_length=3))


def _factorised_reference(probabilities: torch.Tensor, kind: str, frames: int, grid: tuple[int, int], patch: int):
    """Spatial (latent px) and temporal (latent frames) MAD per tubelet ``[B, H, frames * h * w]`` of one Latte
    call: ``"space"`` ``[B * frames, H, hw, hw]`` (a video's frames consecutive), ``"time"`` ``[B * hw, H, frames,
    frames]`` (a video's patch positions consecutive, row-major)."""
    hw = grid[0] * grid[1]
    cells = (torch.stack(torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij"), -1)
             .reshape(-1, 2).double() + 0.5) * patch
    heads = probabilities.shape[1]
    spatial = torch.full((BATCH, heads, frames, hw), math.nan, dtype=torch.float64)
    temporal = spatial.clone()
    if kind == "space":
        p = probabilities.view(BATCH, frames, heads, hw, hw)
        spatial[:] = (p * torch.cdist(cells, cells)).sum(-1).transpose(1, 2)  # [B, H, frames, hw]
        temporal[:] = 0.0  # one frame per call row
    else:
        p = probabilities.view(BATCH, hw, heads, frames, frames)
        times = torch.arange(frames).double()[:, None]
        temporal[:] = (p * torch.cdist(times, times)).sum(-1).permute(0, 2, 3, 1)  # [B, H, frames, hw]
        spatial[:] = 0.0  # one patch position per call row
    return spatial.flatten(2), temporal.flatten(2)


def test_latte_spatial_and_temporal_blocks_are_placed_as_divided_attention():
    """Latte over 3 latent frames of a 3x5 grid (6x10 latents): each spatial block's attn1 within a frame, each
    temporal block's attn1 across the frames of a patch position; the caption cross-attention skipped."""
    model = _latte()
    torch.manual_seed(2)
    inputs = dict(hidden_states=torch.randn(BATCH, 4, 3, 6, 10), timestep=torch.tensor([500, 500]),
                  encoder_hidden_states=torch.randn(BATCH, TEXT, TEXT_DIM))
    layers = ["transformer_blocks.0.attn1", "temporal_transformer_blocks.0.attn1", "transformer_blocks.1.attn1",
              "temporal_transformer_blocks.1.attn1"]
    plain = []
    maps = _own_attention(model, layers, lambda: plain.append(model(**inputs).sample))
    with torch.no_grad(), vitmad.record(model, reduction="none") as rec:
        recorded = model(**inputs).sample
    assert torch.equal(recorded, plain[0]) and rec.layers == layers
    assert set(rec.skipped) == {"transformer_blocks.0.attn2", "transformer_blocks.1.attn2"}
    for layer, probabilities in enumerate(maps):
        kind = "space" if layer % 2 == 0 else "time"
        entropy = -torch.special.xlogy(probabilities, probabilities).sum(-1).mean()
        assert float(entropy) < 0.75 * math.log(probabilities.shape[-1])
        spatial, temporal = _factorised_reference(probabilities, kind, 3, (3, 5), 2)
        torch.testing.assert_close(rec.per_layer[layer].double(), spatial, **TOL)
        torch.testing.assert_close(rec.calls[0].temporal[layer].double(), temporal, **TOL)
        geometry = rec.geometry[layer]
        assert (geometry.grid, geometry.stride, geometry.attention) == ((3, 5), (2.0, 2.0), kind)
        assert (geometry.frames, geometry.frame_stride) == (3, 1.0)
    assert (rec.mad[1::2] == 0).all() and (rec.temporal_mad[0::2] == 0).all()


def test_video_transformers_not_placed_are_refused_by_name():
    torch.manual_seed(0)
    model = diffusers.SanaVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1,
        num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=TEXT_DIM,
        sample_size=8).eval()
    with vitmad.record(model), torch.no_grad(), pytest.raises(ValueError, match=(
            "SanaVideoTransformer3DModel \\(diffusers\\) is not placed by vitmad: Sana-Video's linear")):
        model(torch.randn(1, 4, 2, 4, 6), torch.randn(1, TEXT, TEXT_DIM), torch.tensor([1]))
