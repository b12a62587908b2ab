"""vitmad.record on more of Hugging Face diffusers' image diffusion transformers: the SD3 and Flux ControlNets (their
transformer's blocks; a union Flux ControlNet's control-mode token), Bria, OvisImage and LongCatImage (Flux's packed
latents, ids and attention order under their own names), CogView3Plus, and the fused QKV projections
(``model.fuse_qkv_projections()``), whose attention is the unfused one's; the transformers vitmad has not read refused
by name.

The reference, the sharpening and the checks are those of test_record_diffusers_images.py: the float64 softmax of
every ``F.scaled_dot_product_attention`` the model's processors call, from the ``q`` and ``k`` they give it, placed
by geometry written here from diffusers' source, in latent pixels of the model's input:

- ``SD3ControlNetModel``: SD3's ``PatchEmbed`` (a ``Conv2d`` of kernel = stride = ``patch_size``, row-major) and its
  ``JointTransformerBlock``s (``JointAttnProcessor2_0``: ``cat([image, caption])``, the caption last).
- ``FluxControlNetModel``: Flux's blocks (``FluxAttnProcessor``: ``cat([caption, image])``), image token ``i`` at the
  ``(row, column)`` of ``img_ids[i]``, 2 latent pixels a step; in union mode ``cat([controlnet_mode_emb, caption])``:
  one more token before the caption (its ``txt_ids`` repeated for it, ``cat([txt_ids[:1], txt_ids])``).
- ``BriaAttnProcessor``, ``OvisImageAttnProcessor``, ``LongCatImageAttnProcessor``: ``cat([encoder_query, query])``,
  their single blocks ``cat([encoder_hidden_states, hidden_states])``: the caption first; LongCatImagePipeline's
  image ids are ``(1, 512 + row, 512 + column)`` (``prepare_pos_ids(modality_id=1, start=(512, 512))``).
- ``CogView3PlusPatchEmbed``: the latent viewed as whole patches, row-major, after the caption
  (``cat([encoder_hidden_states, hidden_states])``); ``CogVideoXAttnProcessor2_0`` keeps that order.
- The fused processors (``FusedAttnProcessor2_0``, ``FusedJointAttnProcessor2_0``, ``FusedHunyuanAttnProcessor2_0``,
  ``FusedAuraFlowAttnProcessor2_0``; Flux's ``FluxAttnProcessor`` reading ``attn.fused_projections``) split one
  ``to_qkv`` projection into the same query, key and value and concatenate them in the unfused order.
"""

from __future__ import annotations

import pytest
import torch
from test_record_diffusers_images import (
    _attention_maps,
    _check,
    _check_layers,
    _flux,
    _flux_ids,
    _flux_inputs,
    _positions,
    _record,
    _sharpen,
)

import vitmad

diffusers = pytest.importorskip("diffusers")


def _controlnet_samples(returned) -> tuple:
    return tuple(returned.controlnet_block_samples) + tuple(getattr(returned, "controlnet_single_block_samples", ()))


def _sd3_config() -> dict:
    return {"sample_size": 8, "patch_size": 2, "in_channels": 4, "num_layers": 2, "attention_head_dim": 8,
            "num_attention_heads": 2, "joint_attention_dim": 12, "caption_projection_dim": 16,
            "pooled_projection_dim": 6, "out_channels": 4, "pos_embed_max_size": 16}


def test_sd3_controlnet_joint_attention_caption_last(monkeypatch):
    torch.manual_seed(0)
    model = _sharpen(diffusers.SD3ControlNetModel(**_sd3_config()))
    latent, control = torch.randn(2, 4, 10, 13), torch.randn(2, 4, 10, 13)  # 13: the convolution drops the last
    caption, pooled = torch.randn(2, 3, 12), torch.randn(2, 6)

    def run():
        return model(latent, control, encoder_hidden_states=caption, pooled_projections=pooled,
                     timestep=torch.tensor([3, 3]))

    maps, spied = _attention_maps(monkeypatch, run)
    rec, rec_tokens = _record(model, run, spied, _controlnet_samples)
    assert rec.layers == ["transformer_blocks.0.attn", "transformer_blocks.1.attn"] and rec.skipped == {}
    grid = (5, 6)
    for layer, probabilities in enumerate(maps):
        _check(rec.calls[0], rec_tokens.calls[0], layer, probabilities, _positions(grid, 2.0, 0, 3), grid, 2.0, 0, 3)


def test_sd3_controlnet_without_its_patch_embedding_refused():
    # SD3.5's large ControlNet: its input is the transformer's patch embedding, already cut.
    model = diffusers.SD3ControlNetModel(**{**_sd3_config(), "joint_attention_dim": None, "use_pos_embed": False})
    with torch.no_grad(), vitmad.record(model), pytest.raises(ValueError, match="has no pos_embed"):
        model(torch.randn(1, 16, 16), torch.randn(1, 4, 8, 8), pooled_projections=torch.randn(1, 6),
              timestep=torch.tensor([3]))


def _flux_controlnet(num_mode=None):
    torch.manual_seed(0)
    return _sharpen(diffusers.FluxControlNetModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=12, pooled_projection_dim=6, axes_dims_rope=(2, 2, 4), num_mode=num_mode))


@pytest.mark.parametrize("union", [False, True])
def test_flux_controlnet_packed_latents_caption_first(monkeypatch, union):
    model = _flux_controlnet(num_mode=3 if union else None)
    rows, columns, text = 3, 4, 4
    tokens = rows * columns
    inputs = {"hidden_states": torch.randn(2, tokens, 16), "controlnet_cond": torch.randn(2, tokens, 16),
              "encoder_hidden_states": torch.randn(2, text, 12), "pooled_projections": torch.randn(2, 6),
              "timestep": torch.tensor([0.7, 0.7]), "img_ids": _flux_ids(rows, columns),
              "txt_ids": torch.zeros(text, 3)}
    if union:
        inputs["controlnet_mode"] = torch.tensor([[1], [2]])
    before = text + union  # a union ControlNet's control-mode token leads the caption

    def run():
        return model(**inputs)

    maps, spied = _attention_maps(monkeypatch, run)
    assert [m.shape[-1] for m in maps] == [before + rows * columns] * 2
    rec, rec_tokens = _record(model, run, spied, _controlnet_samples)
    assert rec.layers == ["transformer_blocks.0.attn", "single_transformer_blocks.0.attn"] and rec.skipped == {}
    _check_layers(rec, rec_tokens, maps, (rows, columns), before, 0)


def _longcat_ids(rows: int, columns: int, modality: float = 1.0) -> torch.Tensor:
    # LongCatImagePipeline: prepare_pos_ids(modality_id=1, type="image", start=(512, 512)), row-major.
    r, c = torch.meshgrid(torch.arange(rows).float(), torch.arange(columns).float(), indexing="ij")
    return torch.stack([torch.full_like(r, modality), r + 512, c + 512], -1).reshape(-1, 3)


def _flux_like(name: str):
    torch.manual_seed(0)
    common = {"patch_size": 1, "in_channels": 16, "num_layers": 1, "num_single_layers": 1, "attention_head_dim": 8,
              "num_attention_heads": 2, "joint_attention_dim": 12, "axes_dims_rope": (2, 2, 4)}
    if name == "bria":
        return _sharpen(diffusers.BriaTransformer2DModel(**common))
    if name == "ovis":
        return _sharpen(diffusers.OvisImageTransformer2DModel(**common, out_channels=16))
    return _sharpen(diffusers.LongCatImageTransformer2DModel(**common, pooled_projection_dim=6))


@pytest.mark.parametrize("name", ["bria", "ovis", "longcat"])
def test_flux_like_packed_latents_caption_first(monkeypatch, name):
    model = _flux_like(name)
    rows, columns, text = 4, 3, 5
    if name == "longcat":
        # prepare_pos_ids(modality_id=0, type="text"): (0, i, i).
        txt_ids = torch.arange(text).float()[:, None].expand(text, 3) * torch.tensor([0.0, 1.0, 1.0])
        img_ids = _longcat_ids(rows, columns)
    else:
        txt_ids, img_ids = torch.zeros(text, 3), _flux_ids(rows, columns)
    inputs = {"hidden_states": torch.randn(2, rows * columns, 16), "encoder_hidden_states": torch.randn(2, text, 12),
              "timestep": torch.tensor([0.4, 0.4]), "img_ids": img_ids, "txt_ids": txt_ids}

    def run():
        return model(**inputs)

    maps, spied = _attention_maps(monkeypatch, run)
    rec, rec_tokens = _record(model, run, spied)
    assert rec.layers == ["transformer_blocks.0.attn", "single_transformer_blocks.0.attn"] and rec.skipped == {}
    _check_layers(rec, rec_tokens, maps, (rows, columns), text, 0)


def test_longcat_refuses_a_reference_image():
    model = _flux_like("longcat")
    # LongCatImageEditPipeline: the image to edit after the latent's tokens, its modality 2.
    ids = torch.cat([_longcat_ids(2, 2), _longcat_ids(2, 2, modality=2.0)])
    inputs = {"hidden_states": torch.randn(1, 8, 16), "encoder_hidden_states": torch.randn(1, 2, 12),
              "timestep": torch.tensor([0.5]), "img_ids": ids, "txt_ids": torch.zeros(2, 3)}
    with torch.no_grad(), vitmad.record(model), pytest.raises(ValueError, match="reference image has a first id of 2"):
        model(**inputs)


def test_cogview3plus_caption_first(monkeypatch):
    torch.manual_seed(0)
    model = _sharpen(diffusers.CogView3PlusTransformer2DModel(
        patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2, out_channels=4,
        text_embed_dim=12, time_embed_dim=16, condition_dim=8, pos_embed_max_size=16, sample_size=8))
    latent, caption, text = torch.randn(2, 4, 6, 10), torch.randn(2, 3, 12), 3
    sizes = torch.tensor([[48.0, 80.0], [48.0, 80.0]])

    def run():
        return model(latent, caption, torch.tensor([10, 10]), sizes, sizes, torch.zeros(2, 2))

    maps, spied = _attention_maps(monkeypatch, run)
    rec, rec_tokens = _record(model, run, spied)
    assert rec.layers == ["transformer_blocks.0.attn1", "transformer_blocks.1.attn1"] and rec.skipped == {}
    _check_layers(rec, rec_tokens, maps, (3, 5), text, 0)


def _pixart():
    torch.manual_seed(0)
    return _sharpen(diffusers.PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, num_layers=2, sample_size=8,
        patch_size=2, cross_attention_dim=16, caption_channels=12, norm_num_groups=1, num_embeds_ada_norm=10))


def _sd3():
    torch.manual_seed(0)
    return _sharpen(diffusers.SD3Transformer2DModel(**_sd3_config()))


def _auraflow():
    torch.manual_seed(0)
    return _sharpen(diffusers.AuraFlowTransformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_mmdit_layers=1, num_single_dit_layers=1,
        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=12, caption_projection_dim=16,
        out_channels=4, pos_embed_max_size=64))


def _hunyuan_dit():
    torch.manual_seed(0)
    return _sharpen(diffusers.HunyuanDiT2DModel(
        num_attention_heads=2, attention_head_dim=8, hidden_size=16, in_channels=4, patch_size=2, num_layers=2,
        sample_size=8, cross_attention_dim=16, pooled_projection_dim=16, text_len=3, text_len_t5=2,
        cross_attention_dim_t5=16, use_style_cond_and_image_meta_size=False))


def _fused_cases():
    """(model, inputs, the latent patch grid, caption tokens before, after, the fused processor's name)."""
    latent = torch.randn(2, 4, 6, 10)
    rotary = diffusers.models.embeddings.get_2d_rotary_pos_embed(8, ((0, 0), (3, 5)), (3, 5), output_type="pt")
    return {
        "pixart": (_pixart, {"hidden_states": latent, "encoder_hidden_states": torch.randn(2, 3, 12),
                             "timestep": torch.tensor([500, 500]),
                             "added_cond_kwargs": {"resolution": torch.tensor([[48.0, 80.0]] * 2),
                                                   "aspect_ratio": torch.tensor([[1.6]] * 2)}},
                   (3, 5), 0, 0, "FusedAttnProcessor2_0"),
        "sd3": (_sd3, {"hidden_states": latent, "encoder_hidden_states": torch.randn(2, 3, 12),
                       "pooled_projections": torch.randn(2, 6), "timestep": torch.tensor([3, 3])},
                (3, 5), 0, 3, "FusedJointAttnProcessor2_0"),
        "auraflow": (_auraflow, {"hidden_states": latent, "encoder_hidden_states": torch.randn(2, 3, 12),
                                 "timestep": torch.tensor([0.4, 0.4])}, (3, 5), 8 + 3, 0,
                     "FusedAuraFlowAttnProcessor2_0"),
        "hunyuan_dit": (_hunyuan_dit, {"hidden_states": latent, "timestep": torch.tensor([400.0, 400.0]),
                                       "encoder_hidden_states": torch.randn(2, 3, 16),
                                       "text_embedding_mask": torch.ones(2, 3),
                                       "encoder_hidden_states_t5": torch.randn(2, 2, 16),
                                       "text_embedding_mask_t5": torch.ones(2, 2), "image_rotary_emb": rotary},
                        (3, 5), 0, 0, "FusedHunyuanAttnProcessor2_0"),
    }


@pytest.mark.parametrize("case", ["pixart", "sd3", "auraflow", "hunyuan_dit"])
def test_fused_qkv_projections_measure_the_unfused_attention(monkeypatch, case):
    torch.manual_seed(1)
    build, inputs, grid, before, after, fused = _fused_cases()[case]
    model = build()

    def run():
        return model(**inputs)

    def self_maps(maps):  # PixArt's and HunyuanDiT's cross-attention (and text pooler) over the caption alone
        return [m for m in maps if m.shape[-1] == before + grid[0] * grid[1] + after]

    unfused, _ = _attention_maps(monkeypatch, run)
    model.fuse_qkv_projections()
    assert {type(p).__name__ for p in model.attn_processors.values()} == {fused}
    maps, spied = _attention_maps(monkeypatch, run)
    rec, rec_tokens = _record(model, run, spied)
    assert len(rec.layers) == len(self_maps(maps)) == 2
    positions = _positions(grid, 2.0, before, after)
    for layer, (probabilities, reference) in enumerate(zip(self_maps(maps), self_maps(unfused), strict=True)):
        _check(rec.calls[0], rec_tokens.calls[0], layer, probabilities, positions, grid, 2.0, before, after)
        # The same attention as unfused (one projection split in three): the unfused map, placed alike, too.
        _check(rec.calls[0], rec_tokens.calls[0], layer, reference, positions, grid, 2.0, before, after)


def test_flux_fused_qkv_projections_measure_the_unfused_attention(monkeypatch):
    model = _flux()
    rows, columns, text = 3, 5, 4
    inputs = _flux_inputs(rows, columns, text)

    def run():
        return model(**inputs)

    unfused, _ = _attention_maps(monkeypatch, run)
    model.fuse_qkv_projections()  # FluxAttnProcessor then reads attn.to_qkv (attn.fused_projections)
    assert model.transformer_blocks[0].attn.fused_projections
    maps, spied = _attention_maps(monkeypatch, run)
    rec, rec_tokens = _record(model, run, spied)
    positions = _positions((rows, columns), 2.0, text, 0)
    for layer, (probabilities, reference) in enumerate(zip(maps, unfused, strict=True)):
        _check(rec.calls[0], rec_tokens.calls[0], layer, probabilities, positions, (rows, columns), 2.0, text, 0)
        _check(rec.calls[0], rec_tokens.calls[0], layer, reference, positions, (rows, columns), 2.0, text, 0)


def test_hunyuan_image_built_for_video_latents_refused_with_its_reason():
    """patch_size (1, 2, 2) builds a Conv3d over [B, C, F, H, W] latents: refused, saying so (the message said the
    patch embedding had not run, QA helper-174)."""
    torch.manual_seed(0)
    model = diffusers.HunyuanImageTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1, num_single_layers=1,
        num_refiner_layers=1, patch_size=(1, 2, 2), text_embed_dim=12, rope_axes_dim=(2, 2, 4))
    with torch.no_grad(), vitmad.record(model), pytest.raises(ValueError, match=(
            r"HunyuanImageTransformer2DModel's patch embedding got a latent of shape \[1, 4, 2, 4, 6\]; vitmad "
            r"places the patches of an image's \[B, C, H, W\] latent, not a video's")):
        model(torch.randn(1, 4, 2, 4, 6), torch.tensor([300.0]), encoder_hidden_states=torch.randn(1, 3, 12),
              encoder_attention_mask=torch.ones(1, 3))


def test_hunyuan_image_caption_and_glyph_tokens_last_refiner_skipped(monkeypatch):
    torch.manual_seed(0)
    model = _sharpen(diffusers.HunyuanImageTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1, num_single_layers=1,
        num_refiner_layers=1, patch_size=(2, 2), text_embed_dim=12, text_embed_2_dim=10, rope_axes_dim=(4, 4)))
    latent = torch.randn(2, 4, 7, 10)  # 7: the convolution drops the last row
    kept, glyphs_kept = torch.ones(2, 4), torch.ones(2, 3)
    kept[1, -1] = 0  # the caption's padding
    glyphs_kept[0, -2:] = 0
    inputs = {"encoder_hidden_states": torch.randn(2, 4, 12), "encoder_attention_mask": kept,
              "encoder_hidden_states_2": torch.randn(2, 3, 10), "encoder_attention_mask_2": glyphs_kept}

    def run():
        return model(latent, torch.tensor([300.0, 300.0]), **inputs)

    maps, spied = _attention_maps(monkeypatch, run)
    # HunyuanImagePatchEmbed: a Conv2d, row-major; HunyuanImageAttnProcessor: cat([image, text]) in both kinds of
    # block, the text the 4 caption and 3 ByT5 tokens (reordered among themselves, padding masked); the token
    # refiner attends over the caption alone.
    grid, after = (3, 5), 4 + 3
    image_maps = [m for m in maps if m.shape[-1] == 15 + after]
    assert len(image_maps) == 2 and len(maps) == 3
    rec, rec_tokens = _record(model, run, spied)
    assert rec.layers == ["transformer_blocks.0.attn", "single_transformer_blocks.0.attn"]
    assert list(rec.skipped) == ["context_embedder.token_refiner.refiner_blocks.0.attn"]
    for layer, probabilities in enumerate(image_maps):
        _check(rec.calls[0], rec_tokens.calls[0], layer, probabilities, _positions(grid, 2.0, 0, after), grid, 2.0, 0,
               after)


def test_lumina_next_self_attention_placed_cross_attention_skipped(monkeypatch):
    torch.manual_seed(0)
    model = _sharpen(diffusers.LuminaNextDiT2DModel(
        sample_size=8, patch_size=2, in_channels=4, hidden_size=16, num_layers=2, num_attention_heads=2,
        num_kv_heads=1, multiple_of=16, cross_attention_dim=12))
    latent, caption = torch.randn(2, 4, 6, 10), torch.randn(2, 3, 12)  # LuminaPatchEmbed's view needs whole patches
    # LuminaText2ImgPipeline: the 2-D rotary embedding of a large grid, which LuminaPatchEmbed cuts to the latent's.
    rotary = diffusers.models.embeddings.get_2d_rotary_pos_embed_lumina(8, 16, 16)

    def run():
        return model(latent, torch.tensor([0.5, 0.5]), caption, torch.ones(2, 3), rotary, cross_attention_kwargs={})

    maps, spied = _attention_maps(monkeypatch, run)
    # LuminaPatchEmbed: whole 2 x 2 patches, row-major (view + permute + flatten); attn1 over them alone (its one
    # key head repeated for both query heads), attn2 to the caption.
    self_maps = [m for m in maps if m.shape[-1] == 15]
    assert len(self_maps) == 2 and len(maps) == 4
    rec, rec_tokens = _record(model, run, spied)
    assert rec.layers == ["layers.0.attn1", "layers.1.attn1"]
    assert set(rec.skipped) == {"layers.0.attn2", "layers.1.attn2"}
    for layer, probabilities in enumerate(self_maps):
        _check(rec.calls[0], rec_tokens.calls[0], layer, probabilities, _positions((3, 5), 2.0, 0, 0), (3, 5), 2.0,
               0, 0)


def test_generic_transformer2d_with_patches_placed_as_dit(monkeypatch):
    torch.manual_seed(0)
    # The generic class with patch_size: PatchEmbed's Conv2d grid, BasicTransformerBlock's attn1 over it alone (a
    # DiT checkpoint of the older format).
    model = _sharpen(diffusers.Transformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, num_layers=2, sample_size=8, patch_size=2,
        norm_type="ada_norm_zero", num_embeds_ada_norm=10, norm_num_groups=1), scale=12.0)
    latent = torch.randn(2, 4, 10, 10)

    def run():
        return model(latent, timestep=torch.tensor([5, 5]), class_labels=torch.tensor([1, 3]))

    maps, spied = _attention_maps(monkeypatch, run)
    rec, rec_tokens = _record(model, run, spied)
    assert rec.layers == ["transformer_blocks.0.attn1", "transformer_blocks.1.attn1"] and rec.skipped == {}
    for layer, probabilities in enumerate(maps):
        _check(rec.calls[0], rec_tokens.calls[0], layer, probabilities, _positions((5, 5), 2.0, 0, 0), (5, 5), 2.0, 0,
               0)
