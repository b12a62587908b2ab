"""vitmad.record on Hugging Face diffusers' image diffusion transformers: DiT, PixArt, SD3 (MMDiT, with SD3.5's
dual attention), Flux, Chroma and Flux2 (packed latents, RoPE, double and single stream blocks), HunyuanDiT, AuraFlow
(register tokens), QwenImage, CogView4 and Lumina2; Sana, GLM-Image, the processors vitmad has not read and ids of
several images refused or skipped.

Tiny random-weight models, sharpened (every Linear redrawn, the query projections scaled up) so that attention is far
from uniform. The reference is the model's own attention: every ``F.scaled_dot_product_attention`` its processors
call (``AttnProcessor2_0`` and ``JointAttnProcessor2_0`` directly, ``FluxAttnProcessor`` through
``dispatch_attention_fn``'s native backend) is wrapped here, and its softmax computed in float64 from the ``q`` and
``k`` it was given (RoPE and q / k norms already applied). The tokens are placed by geometry written here from
diffusers' source, in latent pixels of the transformer's input:

- ``PatchEmbed``: a ``Conv2d`` of kernel = stride = ``patch_size`` over the latent ``[B, C, H, W]``, flattened
  row-major (``flatten(2).transpose(1, 2)``): patch ``t`` at ``((t // gw + 0.5) p, (t % gw + 0.5) p)``, a side the
  patch does not divide floored.
- ``JointAttnProcessor2_0`` (SD3): ``cat([image, caption])``: the caption's tokens last, without a position.
- ``FluxAttnProcessor``: ``cat([caption, image])`` in the double blocks, and the single blocks attend over
  ``cat([encoder_hidden_states, hidden_states])``: the caption's tokens first. Image token ``i`` is at the
  ``(row, column)`` of ``img_ids[i]``, each step 2 latent pixels (``FluxPipeline._pack_latents`` packs 2 x 2).
  Chroma and Flux2 (ids ``(0, row, column, 0)``) alike; QwenImage's packed tokens row-major on its ``img_shapes``.
- AuraFlow, CogView4 and Lumina2 view the latent as whole patches, row-major, and put the caption (AuraFlow: after its
  8 register tokens) before the image.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import vitmad
from conftest import FLOAT32_STAT_ATOL, grid_centres, sharpened, statistics_reference
from vitmad.recording.recorder import NoLayerError

diffusers = pytest.importorskip("diffusers")

TOL = {"rtol": 1e-5, "atol": 1e-4}  # float32 flash-MAD against float64 on the same q and k; atol in latent pixels
STAT_TOL = {"rtol": 1e-5, "atol": FLOAT32_STAT_ATOL}  # conftest.py says why
STATS = ["entropy", "prefix_mass", "prefix_maps"]


def _sharpen(model: torch.nn.Module, scale: float = 4.0) -> torch.nn.Module:
    """Every Linear redrawn (``sharpened``), the logits ``scale`` times larger: by the query projections, or where a
    norm follows them (which would undo that) by the norm's weight (Flux's RMS ``norm_q``; CogView4's LayerNorm given
    one), or by the attention's own ``scale`` where the norm has none (AuraFlow's ``fp32_layer_norm``)."""
    model = sharpened(model)  # after torch.manual_seed(0): the draws below are the same in every run
    with torch.no_grad():
        for module in model.modules():
            if not hasattr(module, "processor"):  # not one of diffusers' attention modules
                continue
            norm = getattr(module, "norm_q", None)
            if type(norm) is torch.nn.LayerNorm and norm.weight is None:
                # CogView4's, without weights, before an SDPA at its default scale: the same norm, with weights.
                for name in ("norm_q", "norm_added_q"):
                    plain = getattr(module, name, None)
                    if type(plain) is torch.nn.LayerNorm:
                        weighted = torch.nn.LayerNorm(plain.normalized_shape, eps=plain.eps)
                        weighted.weight.fill_(scale)
                        weighted.bias.zero_()
                        setattr(module, name, weighted)
            elif getattr(norm, "weight", None) is not None:
                for name in ("norm_q", "norm_added_q"):
                    if getattr(getattr(module, name, None), "weight", None) is not None:
                        getattr(module, name).weight.mul_(scale)
            elif norm is None and isinstance(getattr(module, "to_q", None), torch.nn.Linear):
                for name in ("to_q", "add_q_proj"):
                    if getattr(module, name, None) is not None:
                        getattr(module, name).weight.mul_(scale)
            else:
                module.scale *= scale
    return model


def _attention_maps(monkeypatch, run) -> tuple[list[torch.Tensor], object]:
    """The float64 softmax of every SDPA call of ``run()`` (no grad), in call order, and what ``run`` returned."""
    maps = []
    original = F.scaled_dot_product_attention

    def spy(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
        assert not is_causal and not kwargs.get("enable_gqa", False)
        factor = query.shape[-1] ** -0.5 if scale is None else scale
        logits = query.double() @ key.double().transpose(-1, -2) * factor
        if attn_mask is not None and attn_mask.dtype == torch.bool:  # a caption's padding: keys kept where True
            logits = logits.masked_fill(~attn_mask, -math.inf)
        elif attn_mask is not None:  # CogView4's 0 / 1 float mask, added as SDPA adds a float mask
            logits = logits + attn_mask.double()
        maps.append(torch.softmax(logits, -1))
        return original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                        **kwargs)

    with monkeypatch.context() as patch, torch.no_grad():
        patch.setattr(F, "scaled_dot_product_attention", spy)
        returned = run()
    return maps, returned


def _record(model, run, spied, output=lambda returned: (returned.sample,)):
    """``(mean recording, per-token recording)`` of ``run()`` with the statistics; the model's output, the tensors
    ``output(returned)`` gives (its ``.sample`` by default; a ControlNet's block samples, Z-Image's list), unchanged
    by recording, bit for bit, and the same as ``spied``'s, the run whose attention was read."""
    with torch.no_grad():
        plain = output(run())
        with vitmad.record(model, stats=STATS) as rec:
            recorded = output(run())
        with vitmad.record(model, stats=STATS, reduction="none") as rec_tokens:
            run()
    for a, b, c in zip(plain, output(spied), recorded, strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)
    return rec, rec_tokens


def _positions(grid, stride: float, before: int, after: int) -> torch.Tensor:
    nan = torch.full((1, 2), math.nan, dtype=torch.float64)
    return torch.cat([nan.expand(before, 2), grid_centres(grid, stride), nan.expand(after, 2)])


def _check(mean, tokens, layer: int, probabilities, positions, grid, stride: float, before: int, after: int) -> None:
    """Layer ``layer`` of a call of the mean and per-token recordings (``RecordedCall``) against its map
    ``[B, H, N, N]``, its tokens at ``positions`` (NaN rows: the caption's)."""
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
    if before or after:
        # A caption token masked out as padding (Chroma) attends to nothing: its row is NaN, as the model's own.
        torch.testing.assert_close(mean.prefix_maps[layer].double(), expected["prefix_maps"], equal_nan=True,
                                   **STAT_TOL)
    else:
        assert mean.prefix_maps[layer] is None


def _check_layers(mean, tokens, maps, grid, before: int, after: int, stride: float = 2.0) -> None:
    """Every layer of the first call of both recordings against its map, the grid's tokens after ``before`` and
    before ``after`` tokens without a position (the caption's, registers)."""
    positions = _positions(grid, stride, before, after)
    for layer, probabilities in enumerate(maps):
        _check(mean.calls[0], tokens.calls[0], layer, probabilities, positions, grid, stride, before, after)


def _dit():
    torch.manual_seed(0)
    return _sharpen(diffusers.DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, num_layers=2, sample_size=8, patch_size=2,
        norm_num_groups=1, num_embeds_ada_norm=10), scale=6.0)  # its adaLN-zero scales the normed tokens down


@pytest.mark.parametrize("side", [10, 11])  # 5 x 5 patches; 11 latent pixels: the convolution drops the last
def test_dit_two_denoising_steps(monkeypatch, side):
    model = _dit()
    latent = torch.randn(2, 4, side, side)
    labels = torch.tensor([1, 7])
    steps = [torch.tensor([900, 900]), torch.tensor([20, 20])]

    def run_steps():
        return [model(latent, timestep=t, class_labels=labels) for t in steps][-1]

    maps, spied = _attention_maps(monkeypatch, run_steps)
    rec, rec_tokens = _record(model, run_steps, spied)
    assert len(rec.calls) == len(rec_tokens.calls) == 2 and rec.skipped == {}
    assert rec.layers == ["transformer_blocks.0.attn1", "transformer_blocks.1.attn1"]
    grid, positions = (5, 5), _positions((5, 5), 2.0, 0, 0)
    for call in range(2):
        for layer in range(2):
            _check(rec.calls[call], rec_tokens.calls[call], layer, maps[2 * call + layer], positions, grid, 2.0, 0, 0)
    # The timestep changes the attention: each step keeps its own MAD.
    assert not torch.equal(rec.calls[0].mad, rec.calls[1].mad)


def test_pixart_self_attention_placed_cross_attention_skipped(monkeypatch):
    torch.manual_seed(0)
    model = _sharpen(diffusers.PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, num_layers=2, sample_size=8,
        patch_size=2, cross_attention_dim=16, caption_channels=12, norm_num_groups=1, num_embeds_ada_norm=10))
    latent, caption = torch.randn(1, 4, 10, 14), torch.randn(1, 3, 12)
    extra = {"resolution": torch.tensor([[80.0, 112.0]]), "aspect_ratio": torch.tensor([[1.4]])}

    def run():
        return model(latent, encoder_hidden_states=caption, timestep=torch.tensor([500]),
                     added_cond_kwargs=extra)

    maps, spied = _attention_maps(monkeypatch, run)
    self_maps = [m for m in maps if m.shape[-1] == m.shape[-2]]  # the cross-attention's keys are the 3 caption tokens
    assert len(self_maps) == 2 and len(maps) == 4
    rec, rec_tokens = _record(model, run, spied)
    assert rec.layers == ["transformer_blocks.0.attn1", "transformer_blocks.1.attn1"]
    assert set(rec.skipped) == {"transformer_blocks.0.attn2", "transformer_blocks.1.attn2"}
    assert all("cross-attention" in reason for reason in rec.skipped.values())
    for layer, probabilities in enumerate(self_maps):
        _check(rec.calls[0], rec_tokens.calls[0], layer, probabilities, _positions((5, 7), 2.0, 0, 0), (5, 7), 2.0, 0,
               0)


def test_sd3_joint_attention_caption_last_and_dual_attention(monkeypatch):
    torch.manual_seed(0)
    model = _sharpen(diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=12, caption_projection_dim=16, pooled_projection_dim=6, out_channels=4,
        pos_embed_max_size=16, dual_attention_layers=(0,)))
    latent, caption, pooled = torch.randn(2, 4, 10, 15), torch.randn(2, 3, 12), torch.randn(2, 6)

    def run():
        return model(latent, encoder_hidden_states=caption, pooled_projections=pooled, timestep=torch.tensor([3, 3]))

    maps, spied = _attention_maps(monkeypatch, run)
    rec, rec_tokens = _record(model, run, spied)
    # Block 0 is an SD3.5 dual-attention block: its attn2 attends over the image alone.
    assert rec.layers == ["transformer_blocks.0.attn", "transformer_blocks.0.attn2", "transformer_blocks.1.attn"]
    assert rec.skipped == {}
    grid = (5, 7)
    joint, alone = _positions(grid, 2.0, 0, 3), _positions(grid, 2.0, 0, 0)
    for layer, positions, after in ((0, joint, 3), (1, alone, 0), (2, joint, 3)):
        _check(rec.calls[0], rec_tokens.calls[0], layer, maps[layer], positions, grid, 2.0, 0, after)


def _flux():
    torch.manual_seed(0)
    return _sharpen(diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=12, pooled_projection_dim=6, axes_dims_rope=(2, 2, 4)))


def _flux_ids(rows: int, columns: int, first: float = 0.0) -> torch.Tensor:
    # FluxPipeline._prepare_latent_image_ids: (0, row, column), row-major.
    r, c = torch.meshgrid(torch.arange(rows).float(), torch.arange(columns).float(), indexing="ij")
    return torch.stack([torch.full_like(r, first), r, c], -1).reshape(-1, 3)


def _flux_inputs(rows: int, columns: int, text: int) -> dict:
    """What FluxPipeline passes ``_flux()``: two latents packed on a ``rows x columns`` grid of ids, a caption of
    ``text`` tokens (its ids zero), pooled projections."""
    return {"hidden_states": torch.randn(2, rows * columns, 16), "encoder_hidden_states": torch.randn(2, text, 12),
            "pooled_projections": torch.randn(2, 6), "timestep": torch.tensor([0.7, 0.7]),
            "img_ids": _flux_ids(rows, columns), "txt_ids": torch.zeros(text, 3)}


def test_flux_packed_latents_caption_first(monkeypatch):
    model = _flux()
    rows, columns, text = 3, 5, 4
    inputs = _flux_inputs(rows, columns, text)

    def run():
        return model(**inputs)

    maps, spied = _attention_maps(monkeypatch, run)
    rec, rec_tokens = _record(model, run, spied)
    assert rec.layers == ["transformer_blocks.0.attn", "single_transformer_blocks.0.attn"] and rec.skipped == {}
    _check_layers(rec, rec_tokens, maps, (rows, columns), text, 0)


def test_chroma_packed_latents_caption_first_padding_masked(monkeypatch):
    torch.manual_seed(0)
    model = _sharpen(diffusers.ChromaTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=12, axes_dims_rope=(2, 2, 4), approximator_num_channels=8, approximator_hidden_dim=16,
        approximator_layers=1))
    rows, columns, text = 4, 3, 3
    # ChromaPipeline._prepare_attention_mask: the caption's padding masked out, every image token kept.
    kept = torch.ones(2, text + rows * columns, dtype=torch.bool)
    kept[1, text - 1] = False
    inputs = {"hidden_states": torch.randn(2, rows * columns, 16), "encoder_hidden_states": torch.randn(2, text, 12),
              "timestep": torch.tensor([0.3, 0.3]), "img_ids": _flux_ids(rows, columns),
              "txt_ids": torch.zeros(text, 3), "attention_mask": kept}

    def run():
        return model(**inputs)

    maps, spied = _attention_maps(monkeypatch, run)
    rec, rec_tokens = _record(model, run, spied)
    assert rec.layers == ["transformer_blocks.0.attn", "single_transformer_blocks.0.attn"] and rec.skipped == {}
    positions = _positions((rows, columns), 2.0, text, 0)
    for layer, probabilities in enumerate(maps):
        assert float(probabilities[1, :, text:, text - 1].abs().max()) == 0.0  # the padding token is no key
        _check(rec.calls[0], rec_tokens.calls[0], layer, probabilities, positions, (rows, columns), 2.0, text, 0)


def test_hunyuan_dit_rotary_self_attention_cross_attention_skipped(monkeypatch):
    torch.manual_seed(0)
    model = _sharpen(diffusers.HunyuanDiT2DModel(
        num_attention_heads=2, attention_head_dim=8, hidden_size=16, in_channels=4, patch_size=2, num_layers=2,
        sample_size=8, cross_attention_dim=16, pooled_projection_dim=16, text_len=3, text_len_t5=2,
        cross_attention_dim_t5=16, use_style_cond_and_image_meta_size=False))  # HunyuanDiT v1.2
    latent = torch.randn(1, 4, 8, 12)
    grid = (4, 6)
    # HunyuanDiTPipeline: the 2-D rotary embedding of the patch grid, resized into its base grid.
    base = 4
    crops = diffusers.pipelines.hunyuandit.pipeline_hunyuandit.get_resize_crop_region_for_grid(grid, base)
    rotary = diffusers.models.embeddings.get_2d_rotary_pos_embed(8, crops, grid, output_type="pt")
    inputs = {"encoder_hidden_states": torch.randn(1, 3, 16), "text_embedding_mask": torch.ones(1, 3),
              "encoder_hidden_states_t5": torch.randn(1, 2, 16), "text_embedding_mask_t5": torch.ones(1, 2),
              "image_rotary_emb": rotary}

    def run():
        return model(latent, torch.tensor([400.0]), **inputs)  # its timestep's dtype is its embeddings'

    maps, spied = _attention_maps(monkeypatch, run)
    # Besides: the cross-attention over the 3 + 2 caption tokens and the text pooler's attention (no layer).
    self_maps = [m for m in maps if m.shape[-2:] == (24, 24)]
    assert len(self_maps) == 2 and len(maps) == 5
    rec, rec_tokens = _record(model, run, spied)
    assert rec.layers == ["blocks.0.attn1", "blocks.1.attn1"]
    assert set(rec.skipped) == {"blocks.0.attn2", "blocks.1.attn2"}
    for layer, probabilities in enumerate(self_maps):
        _check(rec.calls[0], rec_tokens.calls[0], layer, probabilities, _positions(grid, 2.0, 0, 0), grid, 2.0, 0, 0)


def test_flux_refuses_ids_it_does_not_know():
    model = _flux()
    # Flux Kontext: the reference image's tokens after the latent's, their first id 1.
    ids = torch.cat([_flux_ids(2, 3), _flux_ids(2, 3, first=1.0)])
    inputs = {"hidden_states": torch.randn(1, 12, 16), "encoder_hidden_states": torch.randn(1, 2, 12),
              "pooled_projections": torch.randn(1, 6), "timestep": torch.tensor([0.5]), "img_ids": ids,
              "txt_ids": torch.zeros(2, 3)}
    with torch.no_grad(), vitmad.record(model), pytest.raises(ValueError, match="Flux Kontext's reference image"):
        model(**inputs)
    # One latent's grid in another order than the pipelines' row-major one (README): refused, naming positions=.
    permuted = _flux_ids(2, 3)[torch.tensor([3, 0, 4, 1, 5, 2])]
    inputs.update(hidden_states=torch.randn(1, 6, 16), img_ids=permuted)
    with torch.no_grad(), vitmad.record(model), pytest.raises(ValueError, match="not the row-major grid.*positions="):
        model(**inputs)


def _flux2():
    torch.manual_seed(0)
    return _sharpen(diffusers.Flux2Transformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=12, timestep_guidance_channels=16, mlp_ratio=2.0, axes_dims_rope=(2, 2, 2, 2)))


def _flux2_ids(rows: int, columns: int, time: int = 0) -> torch.Tensor:
    # Flux2Pipeline._prepare_latent_ids: cartesian_prod(t, h, w, l), batched; a reference image's t is 10 * (i + 1).
    grid = torch.cartesian_prod(torch.tensor([time]), torch.arange(rows), torch.arange(columns), torch.arange(1))
    return grid.unsqueeze(0).expand(2, -1, -1)


def _flux2_inputs(ids: torch.Tensor, text: int) -> dict:
    txt_ids = torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(text))
    return {"hidden_states": torch.randn(2, ids.shape[1], 16), "encoder_hidden_states": torch.randn(2, text, 12),
            "timestep": torch.tensor([0.2, 0.2]), "guidance": torch.tensor([4.0, 4.0]), "img_ids": ids,
            "txt_ids": txt_ids.unsqueeze(0).expand(2, -1, -1)}


def test_flux2_packed_latents_caption_first(monkeypatch):
    model = _flux2()
    rows, columns, text = 3, 4, 5
    inputs = _flux2_inputs(_flux2_ids(rows, columns), text)

    def run():
        return model(**inputs)

    maps, spied = _attention_maps(monkeypatch, run)
    rec, rec_tokens = _record(model, run, spied)
    assert rec.layers == ["transformer_blocks.0.attn", "single_transformer_blocks.0.attn"] and rec.skipped == {}
    _check_layers(rec, rec_tokens, maps, (rows, columns), text, 0)


def test_flux2_refuses_reference_images():
    model = _flux2()
    ids = torch.cat([_flux2_ids(2, 2), _flux2_ids(2, 2, time=10)], dim=1)  # Flux2Pipeline with an image to edit
    with torch.no_grad(), vitmad.record(model), pytest.raises(ValueError, match="a reference image's"):
        model(**_flux2_inputs(ids, 2))


def test_cogview4_caption_first_padding_as_its_bias(monkeypatch):
    torch.manual_seed(0)
    model = _sharpen(diffusers.CogView4Transformer2DModel(
        patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        text_embed_dim=12, time_embed_dim=16, condition_dim=8, pos_embed_max_size=16, sample_size=8,
        rope_axes_dim=(4, 4)))
    latent, text = torch.randn(2, 4, 6, 8), 4
    kept = torch.ones(2, text)
    kept[1, -1] = 0  # CogView4AttnProcessor's text_attn_mask: the caption's padding
    sizes = torch.tensor([[48.0, 64.0], [48.0, 64.0]])

    def run():
        return model(latent, torch.randn(2, text, 12, generator=torch.Generator().manual_seed(1)),
                     torch.tensor([300, 300]), sizes, sizes, torch.zeros(2, 2), attention_mask=kept)

    maps, spied = _attention_maps(monkeypatch, run)
    rec, rec_tokens = _record(model, run, spied)
    assert rec.layers == ["transformer_blocks.0.attn1", "transformer_blocks.1.attn1"] and rec.skipped == {}
    # CogView4PatchEmbed: whole 2 x 2 patches, row-major, after the caption.
    _check_layers(rec, rec_tokens, maps, (3, 4), text, 0)


def test_processor_not_read_is_refused():
    model = _dit()
    for block in model.transformer_blocks:
        block.attn1.set_processor(diffusers.models.attention_processor.AttnProcessor())
    with torch.no_grad(), vitmad.record(model), pytest.raises(ValueError, match="processor AttnProcessor;"):
        model(torch.randn(1, 4, 8, 8), timestep=torch.tensor([1]), class_labels=torch.tensor([0]))


class _AttentionVitmadDoesNotSee:
    """A processor that attends where vitmad does not look (xFormers' kernel, a custom CUDA kernel): here it
    computes nothing, so no attention call reaches vitmad at all."""

    def __call__(self, attn, hidden_states, *args, **kwargs):
        return hidden_states


def test_processor_that_attends_out_of_sight_is_refused_not_left_out():
    """Such a layer never reached the placer's processor check: it was left out of the recording, silently."""
    model = _dit()
    model.transformer_blocks[1].attn1.set_processor(_AttentionVitmadDoesNotSee())
    with torch.no_grad(), vitmad.record(model), pytest.raises(ValueError, match=(
            r"transformer_blocks\.1\.attn1 \(Attention\) of DiTTransformer2DModel: it runs the attention processor "
            "_AttentionVitmadDoesNotSee;")):
        model(torch.randn(1, 4, 8, 8), timestep=torch.tensor([1]), class_labels=torch.tensor([0]))


def test_sana_linear_attention_has_no_mad():
    model = diffusers.SanaTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1,
        num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=12,
        sample_size=8, patch_size=2)
    with pytest.raises(NoLayerError, match="linear attention"):
        vitmad.record(model)


def test_auraflow_registers_and_caption_first(monkeypatch):
    torch.manual_seed(0)
    model = _sharpen(diffusers.AuraFlowTransformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_mmdit_layers=1, num_single_dit_layers=1,
        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=12, caption_projection_dim=16,
        out_channels=4, pos_embed_max_size=64))
    latent, caption = torch.randn(2, 4, 6, 10), torch.randn(2, 3, 12)
    # AuraFlowTransformer2DModel.forward: cat([its 8 register tokens, the caption]) before the image, in both kinds of
    # block; AuraFlowPatchEmbed views the latent as whole 2 x 2 patches, row-major.
    before, grid = 8 + 3, (3, 5)

    def run():
        return model(latent, encoder_hidden_states=caption, timestep=torch.tensor([0.4, 0.4]))

    maps, spied = _attention_maps(monkeypatch, run)
    rec, rec_tokens = _record(model, run, spied)
    assert rec.layers == ["joint_transformer_blocks.0.attn", "single_transformer_blocks.0.attn"]
    assert rec.skipped == {}
    _check_layers(rec, rec_tokens, maps, grid, before, 0)


def _qwen_image():
    torch.manual_seed(0)
    return _sharpen(diffusers.QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=12, axes_dims_rope=(2, 2, 4)))


def _qwen_inputs(rows: int, columns: int, text: int, shapes) -> dict:
    kept = torch.ones(2, text, dtype=torch.bool)
    kept[0, -1] = False  # the caption's padding (QwenImagePipeline's prompt_embeds_mask)
    return {"hidden_states": torch.randn(2, rows * columns, 16), "encoder_hidden_states": torch.randn(2, text, 12),
            "encoder_hidden_states_mask": kept, "timestep": torch.tensor([0.6, 0.6]), "img_shapes": shapes}


def test_qwen_image_packed_shapes_caption_first(monkeypatch):
    model = _qwen_image()
    rows, columns, text = 5, 3, 4
    # QwenImagePipeline: img_shapes = [[(1, rows, columns)]] * batch; its latents packed 2 x 2 as Flux's, row-major;
    # QwenDoubleStreamAttnProcessor2_0: cat([caption, image]).
    inputs = _qwen_inputs(rows, columns, text, [[(1, rows, columns)]] * 2)

    def run():
        return model(**inputs)

    maps, spied = _attention_maps(monkeypatch, run)
    rec, rec_tokens = _record(model, run, spied)
    assert rec.layers == ["transformer_blocks.0.attn", "transformer_blocks.1.attn"] and rec.skipped == {}
    positions = _positions((rows, columns), 2.0, text, 0)
    for layer, probabilities in enumerate(maps):
        assert float(probabilities[0, :, :, text - 1].abs().max()) == 0.0  # the padding token is no key
        _check(rec.calls[0], rec_tokens.calls[0], layer, probabilities, positions, (rows, columns), 2.0, text, 0)


def test_qwen_image_refuses_several_images():
    model = _qwen_image()
    # QwenImageEditPipeline: the image to edit packed after the latent's tokens.
    inputs = _qwen_inputs(2, 3, 3, [[(1, 1, 3), (1, 1, 3)]] * 2)
    with torch.no_grad(), vitmad.record(model), pytest.raises(ValueError, match="one image of one frame"):
        model(**inputs)


def _lumina2():
    torch.manual_seed(0)
    return _sharpen(diffusers.Lumina2Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, hidden_size=16, num_layers=2, num_refiner_layers=1,
        num_attention_heads=2, num_kv_heads=2, multiple_of=16, axes_dim_rope=(4, 2, 2), axes_lens=(16, 16, 16),
        cap_feat_dim=12))


def test_lumina2_refiners_and_joint_layers_caption_first(monkeypatch):
    model = _lumina2()
    latent, caption = torch.randn(1, 4, 6, 10), torch.randn(1, 5, 12)
    kept = torch.tensor([[True, True, True, False, False]])  # Lumina2Pipeline's padded prompt: 3 tokens of 5

    def run():
        return model(latent, torch.tensor([0.5]), caption, kept)

    maps, spied = _attention_maps(monkeypatch, run)
    rec, rec_tokens = _record(model, run, spied)
    # Lumina2Transformer2DModel.forward: context_refiner (the caption alone, skipped), noise_refiner (the image alone),
    # then its layers over [the caption's 3 kept tokens, the image] (Lumina2RotaryPosEmbed: whole 2 x 2 patches,
    # row-major).
    assert rec.layers == ["noise_refiner.0.attn", "layers.0.attn", "layers.1.attn"]
    assert list(rec.skipped) == ["context_refiner.0.attn"] and "caption's tokens alone" in rec.skipped[
        "context_refiner.0.attn"]
    grid = (3, 5)
    image_maps = [m for m in maps if m.shape[-1] != 5]  # the context refiner's map is over the 5 caption slots
    assert [m.shape[-1] for m in image_maps] == [15, 18, 18]
    for layer, (probabilities, before) in enumerate(zip(image_maps, (0, 3, 3))):
        _check(rec.calls[0], rec_tokens.calls[0], layer, probabilities, _positions(grid, 2.0, before, 0), grid, 2.0,
               before, 0)


def test_lumina2_refuses_captions_of_different_lengths():
    model = _lumina2()
    kept = torch.tensor([[True, True, True, False], [True, True, True, True]])
    with torch.no_grad(), vitmad.record(model), pytest.raises(ValueError, match="different lengths"):
        model(torch.randn(2, 4, 4, 4), torch.tensor([0.5, 0.5]), torch.randn(2, 4, 12), kept)


def test_other_image_transformer_refused_by_name():
    torch.manual_seed(0)
    model = diffusers.GlmImageTransformer2DModel(
        patch_size=2, in_channels=4, out_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=2,
        text_embed_dim=12, time_embed_dim=16, condition_dim=8, prior_vq_quantizer_codebook_size=32)
    inputs = {"hidden_states": torch.randn(1, 4, 8, 8), "encoder_hidden_states": torch.randn(1, 3, 12),
              "timestep": torch.tensor([500.0]), "prior_token_id": torch.zeros(1, 16, dtype=torch.long),
              "prior_token_drop": torch.tensor([False]), "target_size": torch.tensor([[64.0, 64.0]]),
              "crop_coords": torch.zeros(1, 2)}
    with torch.no_grad(), vitmad.record(model), pytest.raises(ValueError, match="GlmImageTransformer2DModel yet: "):
        model(**inputs)
