"""The models benchmarks/sweep_models.py builds for ``--library diffusers``: every model class of diffusers'
``models.transformers``, ``models.unets`` and ``models.controlnets``, each tiny (one or two layers, two heads of 8 or
16, channels of 4 to 32) from a configuration written per class from its constructor, random weights, and the
inputs its forward takes (latents, timestep, text embeddings, pooled embeddings, ids, image sizes) built per class as
its pipeline would make them, on a latent of 8 x 8 pixels (2 or 3 latent frames for video).

Every case's ``extent`` is the latent's size in latent pixels (the unit vitmad gives diffusers' MAD in; packed
latents: twice the id grid, as the pipelines pack 2 x 2) and ``frames`` its latent frames. Audio, music, protein and
embedding-prior transformers are listed as not vision, without running; the two adapters that do not run alone
(AnimateDiff's ``MotionAdapter``, ``ControlNetXSAdapter``) as not run, swept inside the UNets that hold them.
Packed multimodal sequences (Cosmos 3, MiniMax-H3, OmniGen, Ideogram 4, Krea 2) are built as their pipelines order
them, from diffusers 0.42.1's source. ``diffusers_classes`` lists the classes the catalogue must cover: a class a
newer diffusers adds is listed as not run, naming this file, not silently left out.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import torch

from _library_models import Case, _default_forward

T, D = 4, 16  # caption tokens and their width in every text-conditioned model
_FOLDERS = ("transformers", "unets", "controlnets")


def _r(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _kwargs_forward(model, inputs):
    return model(**inputs)


def _class(name: str):
    import diffusers

    found = getattr(diffusers, name, None)
    if found is None:  # not exported at the top level: looked up in the three folders
        for module, cls in diffusers_classes():
            if cls == name:
                return getattr(importlib.import_module(module), name)
    return found


def _build(name: str, **config):
    return lambda: _class(name)(**config)


def _text(seed: int = 1) -> torch.Tensor:
    return _r(1, T, D, seed=seed)


def _flux_ids(rows: int = 4, columns: int = 4, axes: int = 3) -> torch.Tensor:
    """FluxPipeline._prepare_latent_image_ids: (0, row, column) row-major (Flux2: (t, row, column, l))."""
    r, c = torch.meshgrid(torch.arange(rows).float(), torch.arange(columns).float(), indexing="ij")
    ids = [torch.zeros_like(r), r, c] + [torch.zeros_like(r)] * (axes - 3)
    return torch.stack(ids, -1).reshape(-1, axes)


def _text_ids(axes: int = 3) -> torch.Tensor:
    ids = torch.zeros(T, axes)
    if axes == 4:
        ids[:, 3] = torch.arange(T)  # Flux2: the caption's tokens along l
    return ids


def _flux_inputs(channels: int = 16, pooled: int | None = 6, axes: int = 3, batched_ids: bool = False, **extra):
    """Packed latents of a 4 x 4 id grid (an 8 x 8 latent packed 2 x 2), as FluxPipeline passes them."""
    img, txt = _flux_ids(axes=axes), _text_ids(axes)
    if batched_ids:
        img, txt = img[None], txt[None]
    inputs = {"hidden_states": _r(1, 16, channels), "encoder_hidden_states": _text(), "timestep": torch.tensor([0.5]),
              "img_ids": img, "txt_ids": txt, **extra}
    if pooled:
        inputs["pooled_projections"] = _r(1, pooled, seed=2)
    return lambda: inputs


def _latent_inputs(*shape: int, timestep: float | torch.Tensor = 500.0, **extra):
    """``hidden_states``, ``encoder_hidden_states`` (unless given None), ``timestep`` and ``extra``."""
    def make():
        time = timestep if isinstance(timestep, torch.Tensor) else torch.tensor([timestep])
        inputs = {"hidden_states": _r(1, *shape), "encoder_hidden_states": _text(), "timestep": time}
        inputs.update(extra)
        return {k: v for k, v in inputs.items() if v is not None}

    return make


def _unet_inputs(*shape: int, **extra):
    return lambda: {"sample": _r(1, *shape), "timestep": torch.tensor([500]), "encoder_hidden_states": _text(),
                    **extra}


# Wan and its relatives: patches of 1 x 2 x 2, two heads of 8, one layer.
_WAN = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
            text_dim=D, freq_dim=16, ffn_dim=32, num_layers=1, rope_max_seq_len=32)
_FLUX = dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8,
             num_attention_heads=2, joint_attention_dim=D, axes_dims_rope=(2, 2, 4))
_SD3 = dict(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
            joint_attention_dim=D, caption_projection_dim=16, pooled_projection_dim=6, out_channels=4,
            pos_embed_max_size=16)
_QWEN = dict(patch_size=2, in_channels=16, out_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=2,
             joint_attention_dim=D, axes_dims_rope=(2, 2, 4))
_HUNYUAN_DIT = dict(num_attention_heads=2, attention_head_dim=8, hidden_size=16, in_channels=4, patch_size=2,
                    sample_size=8, cross_attention_dim=16, pooled_projection_dim=16, text_len=3, text_len_t5=2,
                    cross_attention_dim_t5=16, use_style_cond_and_image_meta_size=False)
_SANA = dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1,
             num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=D,
             sample_size=8, patch_size=2)
_UNET_2D = dict(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=4, cross_attention_dim=D)
_SD_BLOCKS = dict(down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
_CONTROLNET = dict(in_channels=4, down_block_types=_SD_BLOCKS["down_block_types"], attention_head_dim=8,
                   conditioning_embedding_out_channels=(8, 8), **_UNET_2D)
_BLOCKS_3D = dict(down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
                  up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"))
_MOTION = dict(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=4, cross_attention_dim=D,
               down_block_types=("CrossAttnDownBlockMotion", "DownBlockMotion"), motion_num_attention_heads=2,
               motion_max_seq_length=8)


_per_frame_times = {"timestep": torch.full((1, 2), 500.0), "r_timestep": torch.full((1, 2), 400.0)}
_per_frame_text = _r(2, T, D, seed=1)  # AnimateDiff's pipelines repeat the caption for each frame


def _hunyuan_dit_inputs(controlnet: bool = False):
    def make():
        import diffusers

        grid = (4, 4)
        crops = diffusers.pipelines.hunyuandit.pipeline_hunyuandit.get_resize_crop_region_for_grid(grid, 4)
        rotary = diffusers.models.embeddings.get_2d_rotary_pos_embed(8, crops, grid, output_type="pt")
        inputs = {"hidden_states": _r(1, 4, 8, 8), "timestep": torch.tensor([400.0]),
                  "encoder_hidden_states": _r(1, 3, 16, seed=1), "text_embedding_mask": torch.ones(1, 3),
                  "encoder_hidden_states_t5": _r(1, 2, 16, seed=2), "text_embedding_mask_t5": torch.ones(1, 2),
                  "image_rotary_emb": rotary}
        if controlnet:
            inputs["controlnet_cond"] = _r(1, 4, 8, 8, seed=3)
        return inputs

    return make


def _lumina_next_inputs():
    from diffusers.models.embeddings import get_2d_rotary_pos_embed_lumina

    return {"hidden_states": _r(1, 4, 8, 8), "timestep": torch.tensor([0.5]), "encoder_hidden_states": _text(),
            "encoder_mask": torch.ones(1, T, dtype=torch.bool),
            "image_rotary_emb": get_2d_rotary_pos_embed_lumina(8, 384, 384, linear_factor=1.0, ntk_factor=1.0),
            "cross_attention_kwargs": {}}  # its forward unpacks them


def _qwen_inputs(controlnet: bool = False, channels: int = 16, **extra):
    def make():
        inputs = {"hidden_states": _r(1, 16, channels), "encoder_hidden_states": _text(),
                  "encoder_hidden_states_mask": torch.ones(1, T, dtype=torch.bool), "timestep": torch.tensor([0.6]),
                  "img_shapes": [[(1, 4, 4)]], **extra}
        if controlnet:
            inputs["controlnet_cond"] = _r(1, 16, channels, seed=3)
        return inputs

    return make


def _ideogram4_inputs():
    """Ideogram4Pipeline's one sequence: the caption's tokens (their features in ``encoder_hidden_states``, zero
    latents), then the image's (zero features), rotary ids (t, h, w) shifted by IMAGE_POSITION_OFFSET, an indicator
    of each token's kind."""
    from diffusers.models.transformers import transformer_ideogram4 as ideogram

    images = 16
    latents, features = torch.zeros(1, T + images, 16), torch.zeros(1, T + images, D)
    latents[:, T:], features[:, :T] = _r(1, images, 16), _text()[0]
    positions = torch.zeros(1, T + images, 3, dtype=torch.long)
    positions[0, :T] = torch.arange(T)[:, None]
    positions[0, T:] = _flux_ids().long() + ideogram.IMAGE_POSITION_OFFSET
    indicator = torch.full((1, T + images), ideogram.OUTPUT_IMAGE_INDICATOR)
    indicator[:, :T] = ideogram.LLM_TOKEN_INDICATOR
    return {"hidden_states": latents, "encoder_hidden_states": features, "timestep": torch.tensor([0.5]),
            "position_ids": positions, "segment_ids": torch.ones(1, T + images, dtype=torch.long),
            "indicator": indicator}


def _minimax_h3_inputs():
    """MiniMax-H3's packed sequence as its pipelines order it: the caption, the audio rows, then the video's 4 x 4
    patches (one latent frame, patchified: 4 x 2 x 2 values each), each row tagged (0 video, 1 text, 2 audio) with its
    timestep's index; rotary ids (sequence index, row, column)."""
    audio, video = 6, 16
    length = T + audio + video
    text_rows, audio_rows = torch.arange(T), torch.arange(T, T + audio)
    video_rows = torch.arange(T + audio, length)
    tags = torch.zeros(length, dtype=torch.long)
    tags[text_rows], tags[audio_rows] = 1, 2
    times = torch.zeros(length, dtype=torch.long)
    times[audio_rows] = 1
    positions = torch.zeros(length, 3)
    positions[:, 0] = torch.arange(length)
    positions[video_rows, 1:] = _flux_ids()[:, 1:]
    return {"hidden_states": _r(1, video, 16), "audio_hidden_states": _r(1, audio, 6, seed=2),
            "encoder_hidden_states": _text(), "timestep": torch.tensor([0.7, 0.3]), "timestep_indices": times,
            "token_tags": tags, "position_ids": positions, "video_indices": video_rows, "audio_indices": audio_rows,
            "text_indices": text_rows}


def _sana_wm_inputs():
    frames = 4
    camera = torch.eye(4).repeat(1, frames, 1, 1)
    camera[..., 2, 3] = torch.arange(frames) * 0.1
    intrinsics = torch.tensor([8.0, 8.0, 4.0, 4.0]).expand(1, frames, 4)
    return {"hidden_states": _r(1, 4, frames, 8, 8), "timestep": torch.full((1, 1, frames), 500.0),
            "encoder_hidden_states": _text()[:, None], "encoder_attention_mask": torch.ones(1, T, dtype=torch.long),
            "camera_conditions": torch.cat([camera.flatten(start_dim=-2), intrinsics], -1),
            "chunk_plucker": _r(1, 8, frames, 8, 8, seed=2)}


def _wan_animate2_forward(model, inputs):
    from diffusers.models.transformers.transformer_wan_animate_2 import WanAnimate2KVCache

    return model(**inputs, kv_cache=WanAnimate2KVCache(len(model.blocks)), kv_cache_mode="extract")


def _cosmos3_inputs():
    length = 2 + 16
    vision = torch.arange(2, length)
    positions = torch.zeros(3, length, dtype=torch.long)
    positions[:, :2] = torch.arange(2)
    positions[:, 2:] = 2 + torch.cat([torch.zeros(16, 1), _flux_ids()[:, 1:]], 1).long().T
    return {"input_ids": torch.tensor([1, 2]), "text_indexes": torch.tensor([0, 1]), "position_ids": positions,
            "und_len": 2, "sequence_length": length, "vision_tokens": [_r(1, 2, 1, 4, 4)],
            "vision_token_shapes": [(1, 4, 4)], "vision_sequence_indexes": vision, "vision_mse_loss_indexes": vision,
            "vision_timesteps": torch.ones(16), "vision_noisy_frame_indexes": [torch.tensor([0])]}


def _z_image_inputs():
    return {"x": [_r(4, 1, 8, 8)], "t": torch.tensor([0.5]), "cap_feats": [_r(T, D, seed=1)]}


_Z_IMAGE = dict(all_patch_size=(2,), all_f_patch_size=(1,), dim=32, n_refiner_layers=1, n_heads=2, n_kv_heads=2)


def _z_image():
    return _class("ZImageTransformer2DModel")(**_Z_IMAGE, in_channels=4, n_layers=1, cap_feat_dim=D,
                                              axes_dims=[4, 6, 6], axes_lens=[64, 32, 32])


def _z_image_controlnet():
    controlnet = _class("ZImageControlNetModel")(**_Z_IMAGE, control_layers_places=[0],
                                                 control_refiner_layers_places=[0], control_in_dim=4)
    return controlnet.from_transformer(controlnet, _z_image())


def _multi(wrapper: str, member):
    return lambda: _class(wrapper)([member()])


def _not_vision(folder: str, name: str, what: str) -> Case:
    return Case(folder, name, lambda: None, lambda: None, not_vision=what)


def _cases() -> list[Case]:
    tr, un, cn = "models.transformers", "models.unets", "models.controlnets"
    flux = _build("FluxTransformer2DModel", **_FLUX, pooled_projection_dim=6)
    sd3_controlnet = _build("SD3ControlNetModel", **{**_SD3, "num_layers": 1})
    flux_controlnet = _build("FluxControlNetModel", **_FLUX, pooled_projection_dim=6)
    flux_union = _build("FluxControlNetModel", **_FLUX, pooled_projection_dim=6, num_mode=2)
    qwen_controlnet = _build("QwenImageControlNetModel", **_QWEN)
    hunyuan_controlnet = _build("HunyuanDiT2DControlNetModel", conditioning_channels=4, transformer_num_layers=4,
                                **_HUNYUAN_DIT)
    controlnet = _build("ControlNetModel", **_CONTROLNET)
    # ControlNet-Union is SDXL's: its text_time embedding of the pooled text and six size ids.
    union = _build("ControlNetUnionModel", in_channels=4, down_block_types=_SD_BLOCKS["down_block_types"],
                   attention_head_dim=8, conditioning_embedding_out_channels=(8, 8), num_control_type=2,
                   num_trans_channel=16, num_trans_head=2, num_trans_layer=1, num_proj_channel=16,
                   addition_embed_type="text_time", addition_time_embed_dim=4,
                   projection_class_embeddings_input_dim=D + 6 * 4, **_UNET_2D)
    sdxl = {"text_embeds": _r(1, D, seed=5), "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]])}
    union_inputs = _unet_inputs(4, 8, 8, controlnet_cond=[_r(1, 3, 16, 16, seed=3), _r(1, 3, 16, 16, seed=4)],
                                control_type=torch.tensor([[1.0, 1.0]]), control_type_idx=[0, 1],
                                added_cond_kwargs=sdxl)
    video = (2, 8, 8)  # latent frames, rows, columns
    return [
        # --- diffusers.models.transformers
        _not_vision(tr, "AceStepTransformer1DModel", "music (ACE-Step: audio latents over time)"),
        Case(tr, "AuraFlowTransformer2DModel", _build(
            "AuraFlowTransformer2DModel", sample_size=8, patch_size=2, in_channels=4, num_mmdit_layers=1,
            num_single_dit_layers=1, attention_head_dim=8, num_attention_heads=2, joint_attention_dim=D,
            caption_projection_dim=16, out_channels=4, pos_embed_max_size=64), _latent_inputs(4, 8, 8)),
        Case(tr, "CogVideoXTransformer3DModel", _build(
            "CogVideoXTransformer3DModel", num_attention_heads=2, attention_head_dim=16, in_channels=4,
            out_channels=4, time_embed_dim=8, text_embed_dim=D, num_layers=1, sample_width=8, sample_height=8,
            sample_frames=5, patch_size=2, temporal_compression_ratio=4, max_text_seq_length=T),
             _latent_inputs(2, 4, 8, 8), frames=2),
        Case(tr, "ConsisIDTransformer3DModel", _build(
            "ConsisIDTransformer3DModel", num_attention_heads=2, attention_head_dim=16, in_channels=4,
            out_channels=4, time_embed_dim=8, text_embed_dim=D, num_layers=1, sample_width=8, sample_height=8,
            sample_frames=5, patch_size=2, temporal_compression_ratio=4, max_text_seq_length=T),
             _latent_inputs(2, 4, 8, 8), frames=2),
        Case(tr, "DiTTransformer2DModel", _build(
            "DiTTransformer2DModel", num_attention_heads=2, attention_head_dim=8, in_channels=4, num_layers=1,
            sample_size=8, patch_size=2, norm_num_groups=1, num_embeds_ada_norm=10),
             _latent_inputs(4, 8, 8, encoder_hidden_states=None, class_labels=torch.tensor([1]))),
        Case(tr, "HunyuanDiT2DModel", _build("HunyuanDiT2DModel", num_layers=2, **_HUNYUAN_DIT),
             _hunyuan_dit_inputs()),
        Case(tr, "LatteTransformer3DModel", _build(
            "LatteTransformer3DModel", num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
            num_layers=1, sample_size=8, patch_size=2, cross_attention_dim=16, caption_channels=D, video_length=2),
             _latent_inputs(4, *video), frames=2),
        Case(tr, "LuminaNextDiT2DModel", _build(
            "LuminaNextDiT2DModel", sample_size=8, patch_size=2, in_channels=4, hidden_size=16, num_layers=1,
            num_attention_heads=2, num_kv_heads=2, multiple_of=16, cross_attention_dim=D), _lumina_next_inputs),
        _not_vision(tr, "MiniMaxMusic3RVQDepthDecoder", "music (MiniMax Music 3's codebook decoder)"),
        Case(tr, "PixArtTransformer2DModel", _build(
            "PixArtTransformer2DModel", num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
            num_layers=1, sample_size=8, patch_size=2, cross_attention_dim=16, caption_channels=D,
            norm_num_groups=1, num_embeds_ada_norm=10),
             _latent_inputs(4, 8, 8, added_cond_kwargs={"resolution": None, "aspect_ratio": None})),
        _not_vision(tr, "PriorTransformer", "the CLIP image-embedding prior (Kandinsky 2, unCLIP): no image tokens"),
        Case(tr, "SanaTransformer2DModel", _build("SanaTransformer2DModel", **_SANA), _latent_inputs(4, 8, 8)),
        _not_vision(tr, "StableAudioDiTModel", "audio (Stable Audio)"),
        _not_vision(tr, "T5FilmDecoder", "music (spectrogram diffusion's note decoder)"),
        Case(tr, "Transformer2DModel", _build(
            "Transformer2DModel", num_attention_heads=2, attention_head_dim=8, in_channels=16, norm_num_groups=4,
            cross_attention_dim=D), _latent_inputs(16, 8, 8)),
        Case(tr, "DreamLiteTransformer2DModel", _build(
            "DreamLiteTransformer2DModel", num_attention_heads=2, attention_head_dim=8, in_channels=16,
            norm_num_groups=4, cross_attention_dim=D), _latent_inputs(16, 8, 8)),
        Case(tr, "AllegroTransformer3DModel", _build(
            "AllegroTransformer3DModel", patch_size=2, patch_size_t=1, num_attention_heads=2, attention_head_dim=8,
            in_channels=4, out_channels=4, num_layers=1, cross_attention_dim=16, sample_height=8, sample_width=8,
            sample_frames=5, caption_channels=D), _latent_inputs(4, *video), frames=2),
        Case(tr, "AnyFlowTransformer3DModel", _build("AnyFlowTransformer3DModel", **_WAN),  # [B, F, C, H, W]
             _latent_inputs(2, 4, 8, 8, **_per_frame_times), frames=2),
        Case(tr, "AnyFlowFARTransformer3DModel", _build("AnyFlowFARTransformer3DModel", **_WAN,
                                                        chunk_partition=(1, 1)),
             _latent_inputs(2, 4, 8, 8, **_per_frame_times, chunk_partition=[1, 1]), frames=2),
        Case(tr, "BriaTransformer2DModel", _build("BriaTransformer2DModel", **_FLUX), _flux_inputs(pooled=None)),
        Case(tr, "BriaFiboTransformer2DModel", _build("BriaFiboTransformer2DModel", **_FLUX, text_encoder_dim=D),
             _flux_inputs(pooled=None, text_encoder_layers=[_r(1, T, D, seed=5)] * 2)),
        Case(tr, "BriaFibo2Transformer2DModel", _build(
            "BriaFibo2Transformer2DModel", in_channels=4, patch_size=2, dim=32, n_layers=1, n_refiner_layers=1,
            n_heads=2, cap_feat_dim=D, injection_layer_ids=(0,), perceiver_num_layers=1, min_num_gist_tokens=4,
            max_num_gist_tokens=8, gist_step=4, gist_min_text_len=4, gist_max_text_len=16, axes_dims=(4, 6, 6),
            axes_lens=(64, 32, 32)),  # the caption's text bundles: one for its Perceiver, one per injection block
             _latent_inputs(4, 8, 8, timestep=0.5, encoder_hidden_states=_r(1, 2, T, D, seed=1))),
        Case(tr, "ChromaTransformer2DModel", _build(
            "ChromaTransformer2DModel", **_FLUX, approximator_num_channels=8, approximator_hidden_dim=16,
            approximator_layers=1), _flux_inputs(pooled=None)),
        Case(tr, "ChronoEditTransformer3DModel", _build("ChronoEditTransformer3DModel", **_WAN),
             _latent_inputs(4, *video), frames=2),
        Case(tr, "CogView3PlusTransformer2DModel", _build(
            "CogView3PlusTransformer2DModel", patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8,
            num_attention_heads=2, out_channels=4, text_embed_dim=D, time_embed_dim=16, condition_dim=8,
            pos_embed_max_size=16, sample_size=8), _latent_inputs(
            4, 8, 8, original_size=torch.tensor([[64.0, 64.0]]), target_size=torch.tensor([[64.0, 64.0]]),
            crop_coords=torch.zeros(1, 2))),
        Case(tr, "CogView4Transformer2DModel", _build(
            "CogView4Transformer2DModel", patch_size=2, in_channels=4, out_channels=4, num_layers=1,
            attention_head_dim=8, num_attention_heads=2, text_embed_dim=D, time_embed_dim=16, condition_dim=8,
            pos_embed_max_size=16, sample_size=8, rope_axes_dim=(4, 4)), _latent_inputs(
            4, 8, 8, original_size=torch.tensor([[64.0, 64.0]]), target_size=torch.tensor([[64.0, 64.0]]),
            crop_coords=torch.zeros(1, 2))),
        Case(tr, "CosmosTransformer3DModel", _build(
            "CosmosTransformer3DModel", in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=12,
            num_layers=1, mlp_ratio=2.0, text_embed_dim=D, adaln_lora_dim=4, max_size=(4, 16, 16),
            patch_size=(1, 2, 2), encoder_hidden_states_channels=D, crossattn_proj_in_channels=D),
             _latent_inputs(4, *video, padding_mask=torch.zeros(1, 1, 8, 8)), frames=2),
        # Cosmos 3's packed sequence: two text ids, then the 4 x 4 vision tokens of one latent frame (patch 1), with
        # multimodal rotary ids (text: its index on the three axes; vision: frame, row, column after the text).
        Case(tr, "Cosmos3OmniTransformer", _build(
            "Cosmos3OmniTransformer", head_dim=8, hidden_act="relu2", hidden_size=16, intermediate_size=32,
            latent_channel=2, latent_patch_size=1, num_attention_heads=2, num_hidden_layers=1, num_key_value_heads=1,
            patch_latent_dim=2, qk_norm_for_text=False, rope_axes_dim=[2, 1, 1], rope_theta=1e4, vocab_size=32),
             _cosmos3_inputs, extent=(4, 4), frames=1),
        Case(tr, "EasyAnimateTransformer3DModel", _build(
            "EasyAnimateTransformer3DModel", num_attention_heads=2, attention_head_dim=16, in_channels=4,
            out_channels=4, patch_size=2, sample_width=8, sample_height=8, num_layers=1, mmdit_layers=1,
            time_embed_dim=16, text_embed_dim=D), _latent_inputs(4, *video), frames=2),
        Case(tr, "ErnieImageTransformer2DModel", _build(
            "ErnieImageTransformer2DModel", hidden_size=32, num_attention_heads=2, num_layers=1, ffn_hidden_size=32,
            in_channels=4, out_channels=4, patch_size=1, text_in_dim=D, rope_axes_dim=(4, 6, 6)),
             lambda: {"hidden_states": _r(1, 4, 8, 8), "timestep": torch.tensor([500.0]), "text_bth": _text(),
                      "text_lens": torch.tensor([T])}),
        Case(tr, "FluxTransformer2DModel", flux, _flux_inputs()),
        Case(tr, "Flux2Transformer2DModel", _build(
            "Flux2Transformer2DModel", **{**_FLUX, "axes_dims_rope": (2, 2, 2, 2)}, timestep_guidance_channels=16,
            mlp_ratio=2.0), _flux_inputs(pooled=None, axes=4, batched_ids=True, guidance=torch.tensor([4.0]))),
        Case(tr, "Flux3Transformer2DModel", _build(
            "Flux3Transformer2DModel", in_channels=16, cond_in_channels=16, num_layers=1, num_single_layers=1,
            attention_head_dim=8, num_attention_heads=2, joint_attention_dim=D, timestep_channels=16, mlp_ratio=2.0,
            axes_dims_rope=(2, 2, 2, 2)), _flux_inputs(pooled=None, axes=4)),
        Case(tr, "GlmImageTransformer2DModel", _build(
            "GlmImageTransformer2DModel", patch_size=2, in_channels=4, out_channels=4, num_layers=1,
            attention_head_dim=8, num_attention_heads=2, text_embed_dim=D, time_embed_dim=16, condition_dim=8,
            prior_vq_quantizer_codebook_size=32), _latent_inputs(
            4, 8, 8, prior_token_id=torch.zeros(1, 16, dtype=torch.long), prior_token_drop=torch.tensor([False]),
            target_size=torch.tensor([[64.0, 64.0]]), crop_coords=torch.zeros(1, 2))),
        Case(tr, "HeliosTransformer3DModel", _build(
            "HeliosTransformer3DModel", **{k: v for k, v in _WAN.items() if k != "rope_max_seq_len"},
            rope_dim=(4, 2, 2)), _latent_inputs(4, *video), frames=2),
        Case(tr, "HiDreamImageTransformer2DModel", _build(
            "HiDreamImageTransformer2DModel", patch_size=2, in_channels=4, out_channels=4, num_layers=1,
            num_single_layers=1, attention_head_dim=8, num_attention_heads=2, caption_channels=[D, D],
            text_emb_dim=D, num_routed_experts=2, num_activated_experts=1, axes_dims_rope=(4, 2, 2),
            max_resolution=(16, 16), llama_layers=(0, 1)),
             lambda: {"hidden_states": _r(1, 4, 8, 8), "timesteps": torch.tensor([500.0]),
                      "encoder_hidden_states_t5": _text(), "encoder_hidden_states_llama3": _r(2, 1, T, D, seed=2),
                      "pooled_embeds": _r(1, D, seed=3)}),
        Case(tr, "HunyuanVideoTransformer3DModel", _build(
            "HunyuanVideoTransformer3DModel", in_channels=4, out_channels=4, num_attention_heads=2,
            attention_head_dim=8, num_layers=1, num_single_layers=1, num_refiner_layers=1, patch_size=2,
            patch_size_t=1, text_embed_dim=D, pooled_projection_dim=8, rope_axes_dim=(2, 2, 4)), _latent_inputs(
            4, *video, encoder_attention_mask=torch.ones(1, T), pooled_projections=_r(1, 8, seed=2),
            guidance=torch.tensor([3000.0])), frames=2),
        Case(tr, "HunyuanVideo15Transformer3DModel", _build(
            "HunyuanVideo15Transformer3DModel", in_channels=4, out_channels=4, num_attention_heads=2,
            attention_head_dim=8, num_layers=1, num_refiner_layers=1, patch_size=1, text_embed_dim=D,
            text_embed_2_dim=D, image_embed_dim=D, rope_axes_dim=(2, 2, 4), task_type="t2v"), _latent_inputs(
            4, *video, encoder_attention_mask=torch.ones(1, T), encoder_hidden_states_2=_r(1, T, D, seed=2),
            encoder_attention_mask_2=torch.ones(1, T), image_embeds=_r(1, T, D, seed=3)), frames=2),
        Case(tr, "HunyuanVideoFramepackTransformer3DModel", _build(
            "HunyuanVideoFramepackTransformer3DModel", in_channels=4, out_channels=4, num_attention_heads=2,
            attention_head_dim=8, num_layers=1, num_single_layers=1, num_refiner_layers=1, patch_size=2,
            patch_size_t=1, text_embed_dim=D, pooled_projection_dim=8, rope_axes_dim=(2, 2, 4), has_image_proj=True,
            image_proj_dim=D, has_clean_x_embedder=True), _latent_inputs(
            4, *video, encoder_attention_mask=torch.ones(1, T), pooled_projections=_r(1, 8, seed=2),
            image_embeds=_r(1, T, D, seed=3), indices_latents=torch.tensor([0, 1]),
            latents_clean=_r(1, 4, 1, 8, 8, seed=4), indices_latents_clean=torch.tensor([2]),
            latents_history_2x=_r(1, 4, 2, 8, 8, seed=5), indices_latents_history_2x=torch.tensor([3, 4]),
            latents_history_4x=_r(1, 4, 4, 8, 8, seed=6), indices_latents_history_4x=torch.tensor([5, 6, 7, 8]),
            guidance=torch.tensor([3000.0])), frames=2),
        Case(tr, "HunyuanImageTransformer2DModel", _build(
            "HunyuanImageTransformer2DModel", in_channels=4, out_channels=4, num_attention_heads=2,
            attention_head_dim=8, num_layers=1, num_single_layers=1, num_refiner_layers=1, patch_size=(1, 1),
            text_embed_dim=D, rope_axes_dim=(4, 4)),
             _latent_inputs(4, 8, 8, encoder_attention_mask=torch.ones(1, T))),
        Case(tr, "Ideogram4Transformer2DModel", _build(
            "Ideogram4Transformer2DModel", in_channels=16, num_layers=1, attention_head_dim=8, num_attention_heads=2,
            intermediate_size=32, adaln_dim=16, llm_features_dim=D, rope_theta=10_000, mrope_section=(2, 1, 1)),
             _ideogram4_inputs),
        Case(tr, "JoyImageEditTransformer3DModel", _build(
            "JoyImageEditTransformer3DModel", patch_size=[1, 2, 2], in_channels=4, hidden_size=16,
            num_attention_heads=2, text_dim=D, num_layers=1, rope_dim_list=[2, 2, 4]),
             _latent_inputs(4, 1, 8, 8), frames=1),
        Case(tr, "JoyImageEditPlusTransformer3DModel", _build(
            "JoyImageEditPlusTransformer3DModel", patch_size=[1, 2, 2], in_channels=4, hidden_size=16,
            num_attention_heads=2, text_dim=D, num_layers=1, rope_dim_list=[2, 2, 4]),
             _latent_inputs(16, 4, 1, 2, 2, shape_list=[[(1, 4, 4)]]), frames=1),  # patches [B, N, C, pt, ph, pw]
        # Kandinsky5T2VPipeline: channels-last latents [B, F, H, W, C], rotary positions as aranges of the patch grid.
        Case(tr, "Kandinsky5Transformer3DModel", _build(
            "Kandinsky5Transformer3DModel", in_visual_dim=4, in_text_dim=D, in_text_dim2=8, time_dim=16,
            out_visual_dim=4, patch_size=(1, 2, 2), model_dim=32, ff_dim=32, num_text_blocks=1, num_visual_blocks=1,
            axes_dims=(4, 6, 6)), _latent_inputs(
            *video, 4, pooled_projections=_r(1, 8, seed=2), text_rope_pos=torch.arange(T),
            visual_rope_pos=[torch.arange(2), torch.arange(4), torch.arange(4)]), frames=2),
        # Kandinsky 6: as Kandinsky 5, its conditioning latent and mask stacked on the channels (visual_cond); no
        # audio latents given, its audio branch idle.
        Case(tr, "Kandinsky6Transformer3DModel", _build(
            "Kandinsky6Transformer3DModel", in_visual_dim=4, out_visual_dim=4, in_text_dim=D, in_text_dim2=8,
            time_dim=16, patch_size=(1, 2, 2), model_dim=32, ff_dim=32, num_text_blocks=1, num_visual_blocks=1,
            axes_dims=(4, 6, 6), in_audio_dim=4, out_audio_dim=4), _latent_inputs(
            *video, 9, pooled_projections=_r(1, 8, seed=2),
            visual_rope_pos=[torch.arange(2), torch.arange(4), torch.arange(4)]), frames=2),
        # Its super-resolution stage: one 16 x 16 tile (NABLA's blocks are 8 latent pixels), latent, anchor, mask.
        Case(tr, "Kandinsky6SRTransformer3DModel", _build(
            "Kandinsky6SRTransformer3DModel", in_visual_dim=4, out_visual_dim=4, time_dim=16, model_dim=32, ff_dim=32,
            num_visual_blocks=1, axes_dims=(4, 6, 6)),
             lambda: {"hidden_states": _r(1, 2, 16, 16, 9), "timestep": torch.tensor([500.0])}, extent=(16, 16),
             frames=2),
        # Krea2Pipeline: packed latents, the text encoder's layers stacked [B, T, layers, D], rotary ids (0, h, w)
        # of the image after the caption's at the origin (prepare_position_ids).
        Case(tr, "Krea2Transformer2DModel", _build(
            "Krea2Transformer2DModel", in_channels=16, num_layers=1, attention_head_dim=8, num_attention_heads=2,
            num_key_value_heads=2, intermediate_size=32, timestep_embed_dim=16, text_hidden_dim=D, num_text_layers=2,
            text_num_attention_heads=2, text_num_key_value_heads=2, text_intermediate_size=32,
            num_layerwise_text_blocks=1, num_refiner_text_blocks=1, axes_dims_rope=(2, 2, 4)),
             lambda: {"hidden_states": _r(1, 16, 16), "encoder_hidden_states": _r(1, T, 2, D, seed=1),
                      "timestep": torch.tensor([0.5]), "encoder_attention_mask": torch.ones(1, T, dtype=torch.bool),
                      "position_ids": torch.cat([torch.zeros(T, 3), _flux_ids()])}),
        _not_vision(tr, "LongCatAudioDiTTransformer", "audio (LongCat-Audio)"),
        # LongCatImagePipeline's ids: the image's (1, 512 + row, 512 + column), after the caption's.
        Case(tr, "LongCatImageTransformer2DModel", _build(
            "LongCatImageTransformer2DModel", **_FLUX, pooled_projection_dim=D),
             _flux_inputs(pooled=None, img_ids=_flux_ids() + torch.tensor([1.0, 512.0, 512.0]))),
        Case(tr, "LTXVideoTransformer3DModel", _build(
            "LTXVideoTransformer3DModel", in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8,
            cross_attention_dim=16, num_layers=1, caption_channels=D),
             lambda: {"hidden_states": _r(1, 2 * 8 * 8, 4), "encoder_hidden_states": _text(),
                      "timestep": torch.tensor([500]), "encoder_attention_mask": torch.ones(1, T), "num_frames": 2,
                      "height": 8, "width": 8}, frames=2),
        # LTX2Pipeline: packed video latents (patch 1) beside packed audio latents, each with its caption.
        Case(tr, "LTX2VideoTransformer3DModel", _build(
            "LTX2VideoTransformer3DModel", in_channels=4, out_channels=4, patch_size=1, patch_size_t=1,
            num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16, audio_in_channels=4,
            audio_out_channels=4, audio_num_attention_heads=2, audio_attention_head_dim=4, audio_cross_attention_dim=8,
            num_layers=1, caption_channels=D, rope_double_precision=False),
             lambda: {"hidden_states": _r(1, 2 * 8 * 8, 4), "audio_hidden_states": _r(1, 5, 4, seed=2),
                      "encoder_hidden_states": _text(), "audio_encoder_hidden_states": _r(1, T, D, seed=3),
                      "timestep": torch.tensor([500.0]), "encoder_attention_mask": torch.ones(1, T, dtype=torch.bool),
                      "num_frames": 2, "height": 8, "width": 8, "audio_num_frames": 5, "fps": 25.0}, frames=2),
        Case(tr, "Lumina2Transformer2DModel", _build(
            "Lumina2Transformer2DModel", sample_size=8, patch_size=2, in_channels=4, hidden_size=16, num_layers=1,
            num_refiner_layers=1, num_attention_heads=2, num_kv_heads=2, multiple_of=16, axes_dim_rope=(4, 2, 2),
            axes_lens=(16, 16, 16), cap_feat_dim=D),
             _latent_inputs(4, 8, 8, timestep=0.5, encoder_attention_mask=torch.ones(1, T, dtype=torch.bool))),
        Case(tr, "MiniMaxH3Transformer3DModel", _build(
            "MiniMaxH3Transformer3DModel", num_attention_heads=2, attention_head_dim=16, hidden_size=24, num_layers=1,
            num_refiner_layers=1, ffn_dim=32, in_channels=4, audio_in_channels=6, patch_size=(1, 2, 2), text_dim=D,
            freq_dim=8, time_embed_hidden_dim=24, time_embed_dim=16, rope_freq_dim=2), _minimax_h3_inputs, frames=1),
        _not_vision(tr, "MiniMaxMusic3Transformer1DModel", "music (MiniMax Music 3)"),
        Case(tr, "MochiTransformer3DModel", _build(
            "MochiTransformer3DModel", patch_size=2, num_attention_heads=2, attention_head_dim=8, num_layers=1,
            pooled_projection_dim=8, in_channels=4, text_embed_dim=D, time_embed_dim=8),
             _latent_inputs(4, *video, encoder_attention_mask=torch.ones(1, T, dtype=torch.long)), frames=2),
        Case(tr, "MotifVideoTransformer3DModel", _build(
            "MotifVideoTransformer3DModel", in_channels=4, out_channels=4, num_attention_heads=2,
            attention_head_dim=8, num_layers=1, num_single_layers=1, patch_size=2, text_embed_dim=D,
            rope_axes_dim=(2, 2, 4)), _latent_inputs(4, *video, encoder_attention_mask=torch.ones(1, T)), frames=2),
        Case(tr, "NucleusMoEImageTransformer2DModel", _build(
            "NucleusMoEImageTransformer2DModel", patch_size=2, in_channels=16, num_layers=1, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=D, axes_dims_rope=(2, 2, 4), moe_enabled=False,
            num_experts=2, moe_intermediate_dim=16), _qwen_inputs()),
        # OmniGenPipeline: one sequence of the prompt's ids (an input image's 16 latent patches in its first 16
        # places), the time token and the 16 patches of the latent, a full attention mask.
        Case(tr, "OmniGenTransformer2DModel", _build(
            "OmniGenTransformer2DModel", hidden_size=16, num_attention_heads=2, num_key_value_heads=2,
            intermediate_size=32, num_layers=1, pad_token_id=0, vocab_size=64, in_channels=4, time_step_dim=4,
            rope_scaling={"long_factor": [1, 2, 3, 4], "short_factor": [1, 2, 3, 4]}),
             lambda: {"hidden_states": _r(1, 4, 8, 8), "timestep": torch.tensor([0.5]),
                      "input_ids": torch.randint(0, 10, (1, 20), generator=torch.Generator().manual_seed(1)),
                      "input_img_latents": [_r(1, 4, 8, 8, seed=2)], "input_image_sizes": {0: [[0, 16]]},
                      "attention_mask": torch.ones(1, 37, 37), "position_ids": torch.arange(37)[None]}),
        Case(tr, "OvisImageTransformer2DModel", _build(
            "OvisImageTransformer2DModel", **{**_FLUX, "in_channels": 16}, out_channels=16),
             _flux_inputs(pooled=None)),
        Case(tr, "PRXTransformer2DModel", _build(
            "PRXTransformer2DModel", in_channels=4, patch_size=2, context_in_dim=D, hidden_size=32, mlp_ratio=2.0,
            num_heads=2, depth=1, axes_dim=(8, 8)), _latent_inputs(4, 8, 8)),
        Case(tr, "QwenImageTransformer2DModel", _build("QwenImageTransformer2DModel", **_QWEN), _qwen_inputs()),
        # QwenImage21Pipeline: after the caption, one vision slot per 2 x 2 group of target latents (img_mask).
        Case(tr, "QwenImage21Transformer2DModel", _build(
            "QwenImage21Transformer2DModel", patch_size=1, in_channels=4, out_channels=4, num_layers=1,
            attention_head_dim=16, num_attention_heads=2, context_in_dim=D, mlp_ratio=2, axes_dims_rope=(4, 6, 6)),
             _qwen_inputs(channels=4, img_mask=torch.tensor([[False] * T + [True] * 4]))),
        _not_vision(tr, "RFD4ProteinaTransformer", "proteins (RFdiffusion 4 / Proteina backbones)"),
        Case(tr, "SanaVideoTransformer3DModel", _build(
            "SanaVideoTransformer3DModel", **{**_SANA, "patch_size": (1, 2, 2)}), _latent_inputs(4, *video),
             frames=2),
        # SANA-WM: two blocks (softmax_every_n=2: a gated linear one, then a softmax one) over 4 latent frames,
        # a camera moving forward (per frame a flat 4 x 4 camera-to-world and fx, fy, cx, cy) and its Plucker rays.
        Case(tr, "SanaWMTransformer3DModel", _build(
            "SanaWMTransformer3DModel", in_channels=4, num_layers=2, hidden_size=32, num_attention_heads=2,
            patch_size=(1, 1, 1), softmax_every_n=2, linear_head_dim=16, t_kernel_size=3, conv_kernel_size=4,
            caption_channels=D, mlp_ratio=2.0, chunk_plucker_channels=8, chunk_plucker_post_attn_blocks=2),
             _sana_wm_inputs, frames=4),
        # SANA-WM's stage-2 refiner (LTX-2's video branch): per-token timesteps, the rotary embedding of frames
        # 0 and 1 built by the model (build_rotary_emb_for_absolute_positions), as its pipeline does.
        Case(tr, "SanaWMLTX2RefinerTransformer3DModel", _build(
            "SanaWMLTX2RefinerTransformer3DModel", in_channels=4, out_channels=4, patch_size=1, patch_size_t=1,
            num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16, audio_in_channels=4,
            audio_out_channels=4, audio_num_attention_heads=2, audio_attention_head_dim=4, audio_cross_attention_dim=8,
            num_layers=1, caption_channels=D, rope_double_precision=False),
             lambda: {"hidden_states": _r(1, 2 * 8 * 8, 4), "encoder_hidden_states": _text(),
                      "timestep": torch.full((1, 2 * 8 * 8), 500.0), "encoder_attention_mask": torch.ones(1, T)},
             lambda m, x: m(**x, video_rotary_emb=m.build_rotary_emb_for_absolute_positions(
                 batch_size=1, frame_positions=[0, 1], height=8, width=8, device="cpu", fps=24.0)), frames=2),
        Case(tr, "SD3Transformer2DModel", _build("SD3Transformer2DModel", **_SD3, dual_attention_layers=(0,)),
             _latent_inputs(4, 8, 8, pooled_projections=_r(1, 6, seed=2))),
        Case(tr, "SkyReelsV2Transformer3DModel", _build("SkyReelsV2Transformer3DModel", **_WAN),
             _latent_inputs(4, *video), frames=2),
        _not_vision(tr, "StableAudio3DiTModel", "audio (Stable Audio 3)"),
        Case(tr, "TransformerTemporalModel", _build(
            "TransformerTemporalModel", num_attention_heads=2, attention_head_dim=8, in_channels=16,
            norm_num_groups=4), lambda: {"hidden_states": _r(2, 16, 8, 8), "num_frames": 2}, frames=2),
        Case(tr, "WanTransformer3DModel", _build("WanTransformer3DModel", **_WAN), _latent_inputs(4, *video),
             frames=2),
        # WanAnimatePipeline: latents, reference and mask channels stacked (2 C + 4), pose latents, face crops of a
        # 77-frame segment (its face encoder's frames: 21 latent frames).
        Case(tr, "WanAnimateTransformer3DModel", _build(
            "WanAnimateTransformer3DModel", **{**_WAN, "in_channels": 12, "attention_head_dim": 12}, latent_channels=4,
            image_dim=D, motion_encoder_channel_sizes={"4": 16, "8": 16, "16": 16}, motion_encoder_size=16,
            motion_style_dim=8, motion_dim=4, motion_encoder_dim=16, face_encoder_hidden_dim=16,
            face_encoder_num_heads=2, inject_face_latents_blocks=1),
             _latent_inputs(12, 21, 8, 8, encoder_hidden_states_image=_r(1, T, D, seed=2),
                            pose_hidden_states=_r(1, 4, 20, 8, 8, seed=3),
                            face_pixel_values=_r(1, 3, 77, 16, 16, seed=4)), frames=21),
        # Wan-Animate-2's reference pass (kv_cache_mode="extract", a fresh cache each call): lists of [C, F, H, W]
        # latents and their condition latents (4 channels and a 4-channel mask), CLIP image tokens (1280 wide).
        Case(tr, "WanAnimate2Transformer3DModel", _build(
            "WanAnimate2Transformer3DModel", patch_size=(1, 2, 2), text_len=8, in_dim=12, dim=32, ffn_dim=32,
            freq_dim=16, text_dim=D, out_dim=4, num_heads=2, num_layers=1, use_img_emb=True),
             lambda: {"hidden_states": [_r(4, *video)], "timestep": torch.tensor([1.0]),
                      "encoder_hidden_states": [_text()[0]], "condition_latents": [_r(8, *video, seed=2)],
                      "encoder_hidden_states_image": _r(1, T, 1280, seed=3), "seq_len": 2 * 16,
                      "offset_grid_sizes": torch.tensor([[2, 4, 4]])}, _wan_animate2_forward, frames=2),
        Case(tr, "WanVACETransformer3DModel", _build("WanVACETransformer3DModel", **_WAN, vace_layers=[0],
                                                     vace_in_channels=8),
             _latent_inputs(4, *video, control_hidden_states=_r(1, 8, *video, seed=3)), frames=2),
        Case(tr, "ZImageTransformer2DModel", _z_image, _z_image_inputs),
        # --- diffusers.models.unets
        _not_vision(un, "UNet1DModel", "1-D signals (Dance Diffusion audio, value functions)"),
        Case(un, "UNet2DModel", _build(
            "UNet2DModel", sample_size=8, in_channels=3, out_channels=3, block_out_channels=(16, 32),
            layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=8, norm_num_groups=4),
             lambda: {"sample": _r(1, 3, 8, 8), "timestep": torch.tensor([500])}),
        Case(un, "UNet2DConditionModel", _build(
            "UNet2DConditionModel", sample_size=8, in_channels=4, out_channels=4, attention_head_dim=8,
            **_UNET_2D, **_SD_BLOCKS), _unet_inputs(4, 8, 8)),
        Case(un, "UNet3DConditionModel", _build(
            "UNet3DConditionModel", in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
            **_BLOCKS_3D,
            norm_num_groups=4, cross_attention_dim=D, attention_head_dim=8), _unet_inputs(4, *video), frames=2),
        Case(un, "DreamLiteUNetModel", _build(
            "DreamLiteUNetModel", in_channels=4, out_channels=4, block_out_channels=(16, 32, 32), layers_per_block=1,
            norm_num_groups=4, cross_attention_dim=D, attention_head_dim=8), _unet_inputs(4, 16, 16), extent=(16, 16)),
        Case(un, "I2VGenXLUNet", _build(
            "I2VGenXLUNet", in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
            **_BLOCKS_3D,
            norm_num_groups=4, cross_attention_dim=D, attention_head_dim=8, num_attention_heads=2),
             _unet_inputs(4, *video, fps=torch.tensor([8]), image_latents=_r(1, 4, *video, seed=3),
                          image_embeddings=_r(1, D, seed=4)), frames=2),
        Case(un, "Kandinsky3UNet", _build(
            "Kandinsky3UNet", in_channels=4, time_embedding_dim=32, groups=4, attention_head_dim=8,
            layers_per_block=2, block_out_channels=(32, 64, 64, 64), cross_attention_dim=D, encoder_hid_dim=D),
             _unet_inputs(4, 16, 16, encoder_attention_mask=torch.ones(1, T)), extent=(16, 16)),
        Case(un, "MotionAdapter", lambda: None, lambda: None,
             skip="AnimateDiff's motion modules alone (its forward does nothing): swept inside UNetMotionModel"),
        Case(un, "UNetMotionModel", _build(
            "UNetMotionModel", in_channels=4, out_channels=4, num_attention_heads=2,
            up_block_types=("UpBlockMotion", "CrossAttnUpBlockMotion"), **_MOTION),
             _unet_inputs(4, *video, encoder_hidden_states=_per_frame_text), frames=2),
        Case(un, "UNetSpatioTemporalConditionModel", _build(
            "UNetSpatioTemporalConditionModel", sample_size=8, in_channels=4, out_channels=4,
            block_out_channels=(32, 64), layers_per_block=1,
            down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
            up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"), addition_time_embed_dim=4,
            projection_class_embeddings_input_dim=12, cross_attention_dim=12, num_attention_heads=(2, 2),
            num_frames=2),
             lambda: {"sample": _r(1, 2, 4, 8, 8), "timestep": torch.tensor([10]),
                      "encoder_hidden_states": _r(1, 1, 12, seed=1), "added_time_ids": _r(1, 3, seed=2)},
             frames=2),
        Case(un, "StableCascadeUNet", _build(
            "StableCascadeUNet", in_channels=4, out_channels=4, timestep_ratio_embedding_dim=16, patch_size=1,
            conditioning_dim=16, block_out_channels=(16, 32), num_attention_heads=(2, 2),
            down_num_layers_per_block=(1, 1), up_num_layers_per_block=(1, 1), clip_text_pooled_in_channels=D,
            clip_seq=2, dropout=(0.0, 0.0)),
             lambda: {"sample": _r(1, 4, 8, 8), "timestep_ratio": torch.tensor([0.5]),
                      "clip_text_pooled": _r(1, 1, D, seed=1)}),
        Case(un, "UVit2DModel", _build(
            "UVit2DModel", hidden_size=32, cond_embed_dim=D, micro_cond_encode_dim=2, micro_cond_embed_dim=10,
            encoder_hidden_size=D, vocab_size=32, codebook_size=16, in_channels=16, block_out_channels=16,
            num_res_blocks=1, block_num_heads=2, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
            sample_size=8),
             lambda: {"input_ids": torch.randint(0, 16, (1, 8, 8), generator=torch.Generator().manual_seed(0)),
                      "encoder_hidden_states": _text(), "pooled_text_emb": _r(1, D, seed=2),
                      "micro_conds": torch.tensor([[64.0, 64.0, 0.0, 0.0, 6.0]])}),
        # --- diffusers.models.controlnets
        Case(cn, "ControlNetModel", controlnet, _unet_inputs(4, 8, 8, controlnet_cond=_r(1, 3, 16, 16, seed=3))),
        # Cosmos Transfer's control branch: control and noisy latents, each with its condition and padding masks
        # (4 + 1 + 1 channels), one latent frame.
        Case(cn, "CosmosControlNetModel", _build(
            "CosmosControlNetModel", n_controlnet_blocks=1, in_channels=6, latent_channels=6, model_channels=32,
            num_attention_heads=2, attention_head_dim=16, mlp_ratio=2, text_embed_dim=D, adaln_lora_dim=4,
            patch_size=(1, 2, 2), max_size=(4, 16, 16), extra_pos_embed_type=None, img_context_dim_in=None,
            img_context_dim_out=32),
             lambda: {"controls_latents": _r(1, 4, 1, 8, 8), "latents": _r(1, 4, 1, 8, 8, seed=2),
                      "timestep": torch.tensor([0.5]), "encoder_hidden_states": _text(),
                      "condition_mask": torch.ones(1, 1, 1, 8, 8), "padding_mask": torch.zeros(1, 1, 8, 8)},
             frames=1),
        Case(cn, "FluxControlNetModel", flux_controlnet, _flux_inputs(controlnet_cond=_r(1, 16, 16, seed=3))),
        # One ControlNet in the wrapper: run as a union (FluxControlNetPipeline's), a mode per condition.
        Case(cn, "FluxMultiControlNetModel", _multi("FluxMultiControlNetModel", flux_union), _flux_inputs(
            controlnet_cond=[_r(1, 16, 16, seed=3)], controlnet_mode=[torch.tensor([1])], conditioning_scale=[1.0])),
        Case(cn, "HunyuanDiT2DControlNetModel", hunyuan_controlnet, _hunyuan_dit_inputs(controlnet=True)),
        Case(cn, "HunyuanDiT2DMultiControlNetModel", _multi("HunyuanDiT2DMultiControlNetModel", hunyuan_controlnet),
             lambda: {**_hunyuan_dit_inputs(controlnet=True)(), "controlnet_cond": [_r(1, 4, 8, 8, seed=3)],
                      "conditioning_scale": [1.0]}),
        Case(cn, "QwenImageControlNetModel", qwen_controlnet, _qwen_inputs(controlnet=True)),
        Case(cn, "QwenImageMultiControlNetModel", _multi("QwenImageMultiControlNetModel", qwen_controlnet),
             lambda: {**_qwen_inputs()(), "controlnet_cond": [_r(1, 16, 16, seed=3)], "conditioning_scale": [1.0]}),
        Case(cn, "SanaControlNetModel", _build("SanaControlNetModel", **_SANA),
             _latent_inputs(4, 8, 8, controlnet_cond=_r(1, 4, 8, 8, seed=3))),
        Case(cn, "SD3ControlNetModel", sd3_controlnet,
             _latent_inputs(4, 8, 8, pooled_projections=_r(1, 6, seed=2), controlnet_cond=_r(1, 4, 8, 8, seed=3))),
        Case(cn, "SD3MultiControlNetModel", _multi("SD3MultiControlNetModel", sd3_controlnet),
             _latent_inputs(4, 8, 8, pooled_projections=_r(1, 6, seed=2), controlnet_cond=[_r(1, 4, 8, 8, seed=3)],
                            conditioning_scale=[1.0])),
        Case(cn, "SparseControlNetModel", _build(
            "SparseControlNetModel", in_channels=4, conditioning_channels=4, attention_head_dim=8,
            conditioning_embedding_out_channels=(8, 8), **_MOTION),
             _unet_inputs(4, *video, encoder_hidden_states=_per_frame_text, controlnet_cond=_r(1, 4, *video, seed=3),
                          conditioning_mask=torch.ones(1, 1, *video)), frames=2),
        Case(cn, "ControlNetUnionModel", union, union_inputs),
        Case(cn, "ControlNetXSAdapter", lambda: None, lambda: None,
             skip="ControlNet-XS's control branch alone (its forward raises by design): swept inside "
                  "UNetControlNetXSModel"),
        Case(cn, "UNetControlNetXSModel", _build(
            "UNetControlNetXSModel", sample_size=8, block_out_channels=(16, 32), norm_num_groups=4,
            cross_attention_dim=D, num_attention_heads=2, ctrl_block_out_channels=(4, 8), ctrl_num_attention_heads=2,
            ctrl_max_norm_num_groups=2, ctrl_conditioning_embedding_out_channels=(8, 8), **_SD_BLOCKS),
             _unet_inputs(4, 8, 8, controlnet_cond=_r(1, 3, 16, 16, seed=3))),
        # ZImageControlNetPipeline: the branch borrows its transformer's embedders and refiners (from_transformer).
        Case(cn, "ZImageControlNetModel", _z_image_controlnet,
             lambda: {**_z_image_inputs(), "control_context": [_r(4, 1, 8, 8, seed=3)]}),
        Case(cn, "MultiControlNetModel", _multi("MultiControlNetModel", controlnet),
             _unet_inputs(4, 8, 8, controlnet_cond=[_r(1, 3, 16, 16, seed=3)], conditioning_scale=[1.0])),
        Case(cn, "MultiControlNetUnionModel", _multi("MultiControlNetUnionModel", union),
             lambda: {**union_inputs(), "controlnet_cond": [union_inputs()["controlnet_cond"]],
                      "control_type": [torch.tensor([[1.0, 1.0]])], "control_type_idx": [[0, 1]],
                      "conditioning_scale": [1.0]}),
    ]


def diffusers_classes() -> list[tuple[str, str]]:
    """(module, class) of every model class (``ModelMixin``) defined in diffusers' ``models.transformers``,
    ``models.unets`` and ``models.controlnets``."""
    from diffusers.models.modeling_utils import ModelMixin

    found = []
    for folder in _FOLDERS:
        package = importlib.import_module(f"diffusers.models.{folder}")
        for info in pkgutil.iter_modules(package.__path__):
            module = importlib.import_module(f"{package.__name__}.{info.name}")
            found += [(module.__name__, name) for name, cls in vars(module).items()
                      if inspect.isclass(cls) and issubclass(cls, ModelMixin) and cls.__module__ == module.__name__]
    return found


def diffusers_cases() -> list[Case]:
    """The catalogue, extent 8 x 8 latent pixels unless a case says otherwise, and one ERROR case per class of the
    installed diffusers the catalogue does not list (a new class is reported, not skipped)."""
    cases = _cases()
    for case in cases:
        if case.forward is _default_forward:  # the catalogue's inputs are keyword arguments
            case.forward = _kwargs_forward
        case.extent = case.extent or (8, 8)
    listed = {case.label for case in cases}
    for module, name in diffusers_classes():
        if name not in listed:
            folder = ".".join(module.split(".")[1:3])
            cases.append(Case(folder, name, lambda: None, lambda: None,
                              skip=f"not in benchmarks/_diffusers_models.py's catalogue ({module}): add a config"))
    return cases
