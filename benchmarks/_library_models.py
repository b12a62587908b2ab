"""The models benchmarks/sweep_models.py builds for ``--library vit_pytorch``, ``monai``, ``ultralytics`` and
``segment_anything`` (``diffusers``: benchmarks/_diffusers_models.py): each a small configuration with random
weights, chosen per class from its constructor, and the input of its one forward.

Each catalogue is a list of ``Case``: a label, a builder of the model, a builder of its input and the call that
runs it. Everything is imported inside the builders, so that the sweep of one library needs no other installed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch


def _default_forward(model, inputs):
    return model(inputs)


@dataclass
class Case:
    """One model of a sweep.

    Args:
        module: where it comes from (the library's module, or the yaml's folder).
        label: the class or config name, and what sets it apart.
        build: makes the model (random weights).
        inputs: makes the input passed to ``forward`` (seeded).
        forward: runs the model on the input.
        extent: the input's spatial size (rows, columns) or (slices, rows, columns) that bounds the MAD, where the
            input is not one tensor of that shape (packed images: the largest).
        training: runs the model in training mode (its random draws are what is swept).
        skip: why the model is not built (it would download weights), if it is not.
        frames: the input's frame count that bounds the temporal MAD of a video model, where the input is not one
            ``[B, C, T, H, W]`` tensor (diffusers' latents, given as keyword arguments).
        not_vision: why the model is no vision model (audio, music, proteins), listed without being built.
    """

    module: str
    label: str
    build: Callable[[], torch.nn.Module]
    inputs: Callable[[], object]
    forward: Callable = _default_forward
    extent: tuple[int, ...] | None = None
    training: bool = False
    skip: str = ""
    frames: int | None = None
    not_vision: str = ""


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _image(height: int = 32, width: int = 32, channels: int = 3) -> Callable[[], torch.Tensor]:
    return lambda: _randn(2, channels, height, width)


def _video(frames: int = 4, height: int = 32, width: int = 32) -> Callable[[], torch.Tensor]:
    return lambda: _randn(2, 3, frames, height, width)


# vit-pytorch: dim 32, two layers of two heads of 16 where the class takes them; 32 x 32 images of 8 px patches.
_SMALL = {"dim": 32, "depth": 2, "heads": 2, "mlp_dim": 32, "dim_head": 16}
_VIT = {"image_size": 32, "patch_size": 8, "num_classes": 3, **_SMALL}
_VIT_3D = {"image_size": 32, "image_patch_size": 8, "frames": 4, "frame_patch_size": 2, "num_classes": 3, **_SMALL}


def _vp(module: str, name: str):
    import importlib

    return getattr(importlib.import_module(f"vit_pytorch.{module}"), name)


def _vit(**overrides):
    return _vp("vit", "ViT")(**{**_VIT, **overrides})


def _torch_encoder(dim: int = 32) -> torch.nn.Module:
    layer = torch.nn.TransformerEncoderLayer(dim, 2, dim, dropout=0.0, batch_first=True)
    return torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)


def _video_transformer():
    # Its block-causal mask (the default) is a torch.compile'd function that create_block_mask cannot inspect in
    # torch 2.14 ("Expected 4 or 5 positional args"): the model runs only with block_causal=False.
    return _vp("levjepa", "VideoTransformer")(image_size=32, patch_size=8, frames=4, block_causal=False, **_SMALL)


def _nd_transformer():
    return _vp("levjepa_nd", "NDTransformer")(ndim=3, input_shape=(4, 32, 32), patch_size=(2, 8, 8), **_SMALL)


def _navit_batch():
    generator = torch.Generator().manual_seed(0)
    return [[torch.randn(3, 16, 16, generator=generator), torch.randn(3, 8, 24, generator=generator)],
            [torch.randn(3, 32, 16, generator=generator)]]


def _nested_images():
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(3, 16, 16, generator=generator), torch.randn(3, 8, 24, generator=generator),
            torch.randn(3, 32, 16, generator=generator)]


def _nested_volumes():
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(3, 4, 16, 16, generator=generator), torch.randn(3, 2, 8, 24, generator=generator)]


def _distill_wrapper():
    teacher = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, 2, 1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                  torch.nn.Flatten(), torch.nn.Linear(8, 3))
    student = _vp("distill", "DistillableViT")(**_VIT)
    return _vp("distill", "DistillWrapper")(teacher=teacher, student=student, temperature=3.0, alpha=0.5)


def _cvt():
    return _vp("cvt", "CvT")(num_classes=3, s1_emb_dim=8, s1_depth=1, s2_emb_dim=16, s2_heads=2, s2_depth=1,
                             s3_emb_dim=16, s3_heads=2, s3_depth=1)


def _ssl(module: str, name: str, **kwargs):
    """Dino, LeJEPA: a trainer around a ViT, its latent the hidden layer."""
    return _vp(module, name)(_vit(), image_size=32, hidden_layer="to_latent", projection_hidden_size=32,
                             num_classes_K=16, projection_layers=2, **kwargs)


def vit_pytorch_cases() -> list[Case]:
    """Every model class of vit-pytorch's modules (helpers such as ``Attention`` or ``Transformer`` are reached
    through them), each small; the wrappers (``MAE``, ``SimMIM``, ``Dino``, ``Extractor``, ...) around a ViT."""
    vp = _vp
    image = _image()
    video = _video()
    cases = [
        Case("accept_video_wrapper", "AcceptVideoWrapper(ViT)",
             lambda: vp("accept_video_wrapper", "AcceptVideoWrapper")(_vit()), video),
        Case("ats_vit", "ViT (adaptive token sampling)",
             lambda: vp("ats_vit", "ViT")(**_VIT, max_tokens_per_depth=(12, 8)), image),
        Case("attn_residual_with_dca_simple_vit", "SimpleViT",
             lambda: vp("attn_residual_with_dca_simple_vit", "SimpleViT")(**_VIT), image),
        Case("cait", "CaiT", lambda: vp("cait", "CaiT")(**_VIT, cls_depth=1), image),
        Case("cct", "CCT", lambda: vp("cct", "CCT")(img_size=32, embedding_dim=32, n_conv_layers=2, kernel_size=3,
                                                    stride=1, padding=1, num_layers=2, num_heads=2, mlp_ratio=1,
                                                    num_classes=3), image),
        Case("cct_3d", "CCT", lambda: vp("cct_3d", "CCT")(img_size=32, num_frames=4, embedding_dim=32,
                                                          n_conv_layers=1, kernel_size=3, stride=1, padding=1,
                                                          num_layers=2, num_heads=2, mlp_ratio=1, num_classes=3),
             video),
        Case("cross_vit", "CrossViT", lambda: vp("cross_vit", "CrossViT")(
            image_size=32, num_classes=3, sm_dim=16, lg_dim=24, sm_patch_size=4, sm_enc_depth=1, sm_enc_heads=2,
            sm_enc_mlp_dim=16, sm_enc_dim_head=8, lg_patch_size=8, lg_enc_depth=1, lg_enc_heads=2, lg_enc_mlp_dim=16,
            lg_enc_dim_head=8, cross_attn_depth=1, cross_attn_heads=2, cross_attn_dim_head=8, depth=1, dropout=0.0,
            emb_dropout=0.0), image),
        Case("crossformer", "CrossFormer", lambda: vp("crossformer", "CrossFormer")(
            dim=(32, 32, 32, 32), depth=(1, 1, 1, 1), global_window_size=(2, 2, 2, 2), local_window_size=2,
            cross_embed_kernel_sizes=((4, 8), (2, 4), (2, 4), (2, 4)), num_classes=3), _image(64, 64)),
        Case("cvt", "CvT", _cvt, image),
        Case("deepvit", "DeepViT", lambda: vp("deepvit", "DeepViT")(**_VIT), image),
        Case("dino", "Dino(ViT)", lambda: _ssl("dino", "Dino"), image),
        Case("distill", "DistillableViT", lambda: vp("distill", "DistillableViT")(**_VIT), image),
        Case("distill", "DistillableT2TViT", lambda: vp("distill", "DistillableT2TViT")(
            image_size=32, num_classes=3, dim=32, depth=2, heads=2, mlp_dim=32, dim_head=16,
            t2t_layers=((7, 4), (3, 2))), image),
        Case("distill", "DistillableEfficientViT", lambda: vp("distill", "DistillableEfficientViT")(
            image_size=32, patch_size=8, num_classes=3, dim=32, transformer=_torch_encoder()), image),
        Case("distill", "DistillWrapper(CNN teacher, DistillableViT)", _distill_wrapper, image,
             lambda m, x: m(x, torch.tensor([0, 1]))),
        Case("efficient", "ViT(nn.TransformerEncoder)", lambda: vp("efficient", "ViT")(
            image_size=32, patch_size=8, num_classes=3, dim=32, transformer=_torch_encoder()), image),
        Case("es_vit", "EsViTTrainer(CvT)", lambda: vp("es_vit", "EsViTTrainer")(
            _cvt(), image_size=32, hidden_layer=-2, projection_hidden_size=32, num_classes_K=16, projection_layers=2),
             image),
        Case("extractor", "Extractor(ViT)", lambda: vp("extractor", "Extractor")(_vit()), image),
        Case("jet_vit", "JetViT", lambda: vp("jet_vit", "JetViT")(**{**_VIT, "patch_size": 4}, window_size=4),
             image),
        Case("jumbo_vit", "JumboViT", lambda: vp("jumbo_vit", "JumboViT")(**{**_VIT, "dim": 48}), image),
        Case("learnable_memory_vit", "ViT", lambda: vp("learnable_memory_vit", "ViT")(**_VIT), image),
        Case("learnable_memory_vit", "Adapter(ViT)", lambda: vp("learnable_memory_vit", "Adapter")(
            vit=vp("learnable_memory_vit", "ViT")(**_VIT), num_memories_per_layer=2, num_classes=3), image),
        Case("lejepa", "LeJEPA(ViT)", lambda: _ssl("lejepa", "LeJEPA"), image),
        Case("levjepa", "VideoTransformer", lambda: _video_transformer(), video),
        Case("levjepa", "LeVJEPA(VideoTransformer)", lambda: vp("levjepa", "LeVJEPA")(
            _video_transformer(), image_size=32, local_size=16), video, lambda m, x: m(x, return_embedding=True)),
        Case("levjepa_nd", "NDTransformer (3-D)", lambda: _nd_transformer(), video),
        Case("levjepa_nd", "LeVJEPAND(NDTransformer)", lambda: vp("levjepa_nd", "LeVJEPAND")(
            _nd_transformer(), input_shape=(4, 32, 32)), video, lambda m, x: m(x, return_embedding=True)),
        Case("levit", "LeViT", lambda: vp("levit", "LeViT")(image_size=64, num_classes=3, dim=(16, 24), depth=1,
                                                            heads=(2, 2), mlp_mult=2, stages=2, dim_key=8,
                                                            dim_value=8), _image(64, 64)),
        Case("local_vit", "LocalViT", lambda: vp("local_vit", "LocalViT")(**_VIT), image),
        Case("look_vit", "LookViT", lambda: vp("look_vit", "LookViT")(
            dim=32, image_size=32, num_classes=3, depth=2, patch_size=8, heads=2, dim_head=16, highres_patch_size=4,
            cross_attn_heads=2, cross_attn_dim_head=16, patch_conv_kernel_size=3, dropout=0.0), image),
        Case("looped_vit", "LoopedViT", lambda: vp("looped_vit", "LoopedViT")(
            num_classes=3, dim=32, image_size=32, patch_size=8, pre_loop_depth=1, num_looped_blocks=1,
            post_loop_depth=1, loop_depth=2, heads=2, dim_head=16, mlp_dim=32), image),
        Case("mae", "MAE(ViT)", lambda: vp("mae", "MAE")(encoder=_vit(pool="mean"), decoder_dim=16,
                                                         masking_ratio=0.5, decoder_heads=2, decoder_dim_head=8),
             image),
        Case("max_vit", "MaxViT", lambda: vp("max_vit", "MaxViT")(
            num_classes=3, dim=16, depth=(1, 1), dim_head=8, window_size=4, dropout=0.0), image),
        Case("max_vit_with_registers", "MaxViT", lambda: vp("max_vit_with_registers", "MaxViT")(
            num_classes=3, dim=16, depth=(1, 1), dim_head=8, window_size=4, dropout=0.0), image),
        Case("mobile_vit", "MobileViT", lambda: vp("mobile_vit", "MobileViT")(
            image_size=(64, 64), dims=[16, 16, 16], channels=[8] * 10 + [16], num_classes=3, depths=(1, 1, 1)),
             _image(64, 64)),
        Case("mp3", "ViT", lambda: vp("mp3", "ViT")(**_VIT), image),
        Case("mp3", "MP3(ViT)", lambda: vp("mp3", "MP3")(vp("mp3", "ViT")(**_VIT), masking_ratio=0.5), image),
        # MPP slices a class token of shape [1, 1, D] (DeepViT's; vit.ViT's is [1, D] in 1.26.14).
        Case("mpp", "MPP(DeepViT)", lambda: vp("mpp", "MPP")(transformer=vp("deepvit", "DeepViT")(**_VIT), patch_size=8,
                                                             dim=32), image),
        Case("na_vit", "NaViT", lambda: vp("na_vit", "NaViT")(**_VIT), _navit_batch, extent=(32, 24)),
        Case("na_vit_nested_tensor", "NaViT", lambda: vp("na_vit_nested_tensor", "NaViT")(**_VIT), _nested_images,
             extent=(32, 24)),
        Case("na_vit_nested_tensor_3d", "NaViT", lambda: vp("na_vit_nested_tensor_3d", "NaViT")(
            **_VIT, max_frames=4, frame_patch_size=2), _nested_volumes, extent=(16, 24)),
        Case("nest", "NesT", lambda: vp("nest", "NesT")(image_size=32, patch_size=4, num_classes=3, dim=8, heads=1,
                                                        num_hierarchies=3, block_repeats=(1, 1, 1), dim_head=8),
             image),
        Case("normalized_vit", "nViT", lambda: vp("normalized_vit", "nViT")(**_VIT), image),
        Case("parallel_vit", "ViT", lambda: vp("parallel_vit", "ViT")(**_VIT), image),
        Case("pit", "PiT", lambda: vp("pit", "PiT")(**{**_VIT, "depth": (1, 1)}), image),
        Case("recorder", "Recorder(ViT)", lambda: vp("recorder", "Recorder")(_vit()), image),
        Case("regionvit", "RegionViT", lambda: vp("regionvit", "RegionViT")(
            dim=(16, 16, 16, 16), depth=(1, 1, 1, 1), window_size=2, num_classes=3, local_patch_size=4),
             _image(64, 64)),
        Case("rvt", "RvT", lambda: vp("rvt", "RvT")(**_VIT), image),
        Case("scalable_vit", "ScalableViT", lambda: vp("scalable_vit", "ScalableViT")(
            num_classes=3, dim=8, depth=(1, 1), heads=2, reduction_factor=(2, 1), window_size=2, iwsa_dim_key=8,
            iwsa_dim_value=8, ssa_dim_key=8, ssa_dim_value=8), image),
        Case("sep_vit", "SepViT", lambda: vp("sep_vit", "SepViT")(
            num_classes=3, dim=16, depth=(1, 1, 1, 1), heads=(1, 1, 1, 1), window_size=7, dim_head=8),
             _image(224, 224)),
        Case("simmim", "SimMIM(DeepViT)", lambda: vp("simmim", "SimMIM")(encoder=vp("deepvit", "DeepViT")(**_VIT),
                                                                        masking_ratio=0.5), image),
        Case("simple_flash_attn_vit", "SimpleViT", lambda: vp("simple_flash_attn_vit", "SimpleViT")(**_VIT), image),
        Case("simple_flash_attn_vit_3d", "SimpleViT", lambda: vp("simple_flash_attn_vit_3d", "SimpleViT")(
            **_VIT_3D), video),
        Case("simple_uvit", "SimpleUViT", lambda: vp("simple_uvit", "SimpleUViT")(**{**_VIT, "depth": 3}), image),
        Case("simple_vit", "SimpleViT", lambda: vp("simple_vit", "SimpleViT")(**_VIT), image),
        Case("simple_vit_1d", "SimpleViT (series)", lambda: vp("simple_vit_1d", "SimpleViT")(
            seq_len=64, patch_size=8, num_classes=3, **_SMALL), lambda: _randn(2, 3, 64), extent=(1, 64)),
        Case("simple_vit_3d", "SimpleViT", lambda: vp("simple_vit_3d", "SimpleViT")(**_VIT_3D), video),
        Case("simple_vit_attn_residual", "SimpleViTAttnResidual", lambda: vp(
            "simple_vit_attn_residual", "SimpleViTAttnResidual")(**_VIT), image),
        Case("simple_vit_orthog_residual_update", "SimpleViT", lambda: vp(
            "simple_vit_orthog_residual_update", "SimpleViT")(**_VIT), image),
        Case("simple_vit_with_fft", "SimpleViT", lambda: vp("simple_vit_with_fft", "SimpleViT")(
            **_VIT, freq_patch_size=8), image),
        Case("simple_vit_with_hyper_connections", "SimpleViT", lambda: vp(
            "simple_vit_with_hyper_connections", "SimpleViT")(**_VIT, num_residual_streams=2), image),
        Case("simple_vit_with_patch_dropout", "SimpleViT (training: patches dropped)", lambda: vp(
            "simple_vit_with_patch_dropout", "SimpleViT")(**_VIT, patch_dropout=0.5), image, training=True),
        Case("simple_vit_with_qk_norm", "SimpleViT", lambda: vp("simple_vit_with_qk_norm", "SimpleViT")(**_VIT),
             image),
        Case("simple_vit_with_register_tokens", "SimpleViT", lambda: vp(
            "simple_vit_with_register_tokens", "SimpleViT")(**_VIT), image),
        Case("simple_vit_with_relative_proj_pos_bias", "SimpleViT", lambda: vp(
            "simple_vit_with_relative_proj_pos_bias", "SimpleViT")(**_VIT), image),
        Case("simple_vit_with_sparse_gating", "SimpleViTWithSparseGating", lambda: vp(
            "simple_vit_with_sparse_gating", "SimpleViTWithSparseGating")(**_VIT), image),
        Case("simple_vit_with_specialized_cls", "SimpleViT", lambda: vp(
            "simple_vit_with_specialized_cls", "SimpleViT")(**_VIT), image),
        Case("simple_vit_with_value_residual", "SimpleViT", lambda: vp(
            "simple_vit_with_value_residual", "SimpleViT")(**_VIT), image),
        Case("t2t", "T2TViT", lambda: vp("t2t", "T2TViT")(image_size=32, num_classes=3, dim=32, depth=2, heads=2,
                                                          mlp_dim=32, dim_head=16, t2t_layers=((7, 4), (3, 2))),
             image),
        Case("twins_svt", "TwinsSVT", lambda: vp("twins_svt", "TwinsSVT")(num_classes=3, **{
            f"s{i}_{k}": v for i in range(1, 5) for k, v in (("emb_dim", 8), ("patch_size", 2 if i < 4 else 1),
                                                             ("local_patch_size", 2), ("global_k", 2), ("depth", 1))}),
             image),
        Case("vaat", "VAAT", lambda: vp("vaat", "VAAT"), image),
        Case("vat", "VAT(ViT)", lambda: vp("vat", "VAT")(
            _vp("vat", "ViT")(**_VIT), dim=32, depth=2, heads=2, dim_head=16, dim_action=4, mlp_dim=32,
            action_chunk_len=2), lambda: _randn(2, 1, 3, 32, 32)),  # [B, views, C, H, W]
        Case("vat_siglip", "SigLIPVAT", lambda: vp("vat_siglip", "SigLIPVAT")(
            dim=32, depth=2, heads=2, dim_head=16, dim_action=4, mlp_dim=32, action_chunk_len=2,
            siglip_image_size=28, siglip_patch_size=14, siglip_dim=32, siglip_depth=2, siglip_heads=2,
            siglip_mlp_dim=32), lambda: _randn(2, 1, 3, 28, 28)),
        Case("vit", "ViT", lambda: _vit(), image),
        Case("vit", "ViT (mean pool, 24 x 40, 4 x 8 patches)", lambda: _vit(image_size=(24, 40), patch_size=(4, 8),
                                                                           pool="mean"), _image(24, 40)),
        Case("vit_1d", "ViT (series)", lambda: vp("vit_1d", "ViT")(seq_len=64, patch_size=8, num_classes=3,
                                                                   **_SMALL), lambda: _randn(2, 3, 64),
             extent=(1, 64)),
        Case("vit_3d", "ViT", lambda: vp("vit_3d", "ViT")(**_VIT_3D), video),
        Case("vit_5", "ViT", lambda: vp("vit_5", "ViT")(**_VIT), image),
        Case("vit_detpool", "ViTDetPool", lambda: vp("vit_detpool", "ViTDetPool")(**_VIT), image),
        Case("vit_for_small_dataset", "ViT", lambda: vp("vit_for_small_dataset", "ViT")(**_VIT), image),
        Case("vit_nd", "ViTND (2-D)", lambda: vp("vit_nd", "ViTND")(ndim=2, input_shape=32, patch_size=8,
                                                                    num_classes=3, **_SMALL), image),
        Case("vit_nd_pope", "ViTND (2-D)", lambda: vp("vit_nd_pope", "ViTND")(ndim=2, input_shape=32, patch_size=8,
                                                                              num_classes=3, **_SMALL), image),
        Case("vit_nd_rotary", "ViTND (2-D)", lambda: vp("vit_nd_rotary", "ViTND")(
            ndim=2, input_shape=32, patch_size=8, num_classes=3, **_SMALL), image),
        Case("vit_with_decorr", "ViT", lambda: vp("vit_with_decorr", "ViT")(**_VIT), image),
        Case("vit_with_keel_post_ln", "ViT", lambda: vp("vit_with_keel_post_ln", "ViT")(**_VIT), image),
        Case("vit_with_patch_dropout", "ViT (training: patches dropped)", lambda: vp(
            "vit_with_patch_dropout", "ViT")(**_VIT), image, training=True),
        Case("vit_with_patch_merger", "ViT", lambda: vp("vit_with_patch_merger", "ViT")(**_VIT), image),
        Case("vivit", "ViViT (factorized encoder)", lambda: vp("vivit", "ViViT")(
            image_size=32, image_patch_size=8, frames=4, frame_patch_size=2, num_classes=3, dim=32,
            spatial_depth=1, temporal_depth=1, heads=2, mlp_dim=32, dim_head=16), video),
        Case("vivit", "ViViT (factorized self-attention)", lambda: vp("vivit", "ViViT")(
            image_size=32, image_patch_size=8, frames=4, frame_patch_size=2, num_classes=3, dim=32,
            spatial_depth=1, temporal_depth=1, heads=2, mlp_dim=32, dim_head=16,
            variant="factorized_self_attention"), video),
        Case("vivit_with_moss", "ViViT", lambda: vp("vivit_with_moss", "ViViT")(
            image_size=32, image_patch_size=8, frames=4, frame_patch_size=2, num_classes=3, dim=32,
            spatial_depth=1, temporal_depth=1, heads=2, mlp_dim=32, dim_head=16, moss_hidden_dim=16), video),
        Case("wwt", "WWT", lambda: vp("wwt", "WWT")(**_VIT, num_slots=4), image),
        Case("xcit", "XCiT", lambda: vp("xcit", "XCiT")(**_VIT, cls_depth=1), image),
    ]
    return cases


def _nets():
    import monai.networks.nets

    return monai.networks.nets


def _vit_kwargs(dims: int, **overrides):
    size = (32, 32) if dims == 2 else (16, 16, 16)
    return {"in_channels": 1, "img_size": size, "patch_size": 8, "hidden_size": 32, "mlp_dim": 32, "num_layers": 2,
            "num_heads": 2, "spatial_dims": dims, **overrides}


def _volume(*sides: int, channels: int = 1) -> Callable[[], torch.Tensor]:
    return lambda: _randn(2, channels, *sides)


def _timesteps(model, x, **kwargs):
    return model(x, timesteps=torch.tensor([10, 500]), **kwargs)


_DIFFUSION = {"num_res_blocks": 1, "channels": (16, 32), "attention_levels": (False, True), "norm_num_groups": 8,
              "num_head_channels": 8}


def monai_cases() -> list[Case]:
    """MONAI's nets with attention (ViT and its users, Swin, the diffusion UNets and autoencoders, Restormer, NaViT,
    Transchex, MIL, the decoder-only transformer), in 2-D and 3-D where they take both, and four without."""
    nets = _nets
    image, volume = _volume(32, 32), _volume(16, 16, 16)
    cases = [
        Case("nets.vit", "ViT 2-D, conv, class token", lambda: nets().ViT(**_vit_kwargs(2, classification=True)),
             image),
        Case("nets.vit", "ViT 2-D, perceptron", lambda: nets().ViT(**_vit_kwargs(2, proj_type="perceptron")), image),
        Case("nets.vit", "ViT 3-D, conv", lambda: nets().ViT(**_vit_kwargs(3)), volume),
        Case("nets.vit", "ViT 3-D, perceptron, class token", lambda: nets().ViT(
            **_vit_kwargs(3, proj_type="perceptron", classification=True)), volume),
        Case("nets.vitautoenc", "ViTAutoEnc 2-D", lambda: nets().ViTAutoEnc(**_vit_kwargs(2, patch_size=4)), image),
        Case("nets.vitautoenc", "ViTAutoEnc 3-D", lambda: nets().ViTAutoEnc(**_vit_kwargs(3, patch_size=4)), volume),
        Case("nets.unetr", "UNETR 2-D", lambda: nets().UNETR(in_channels=1, out_channels=2, img_size=(32, 32),
                                                             feature_size=8, hidden_size=32, mlp_dim=32, num_heads=2,
                                                             spatial_dims=2), image),
        Case("nets.unetr", "UNETR 3-D, perceptron", lambda: nets().UNETR(
            in_channels=1, out_channels=2, img_size=(32, 32, 32), feature_size=8, hidden_size=32, mlp_dim=32,
            num_heads=2, proj_type="perceptron", spatial_dims=3), _volume(32, 32, 32)),
        Case("nets.swin_unetr", "SwinUNETR 2-D", lambda: nets().SwinUNETR(
            in_channels=1, out_channels=2, feature_size=12, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1),
            spatial_dims=2), _volume(64, 64)),
        Case("nets.swin_unetr", "SwinUNETR 2-D, v2, window 4", lambda: nets().SwinUNETR(
            in_channels=1, out_channels=2, feature_size=12, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1),
            window_size=4, use_v2=True, spatial_dims=2), _volume(64, 64)),
        Case("nets.swin_unetr", "SwinUNETR 3-D", lambda: nets().SwinUNETR(
            in_channels=1, out_channels=2, feature_size=12, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1),
            spatial_dims=3), _volume(64, 64, 64)),  # its bottleneck's instance norm needs more than one voxel
        Case("nets.masked_autoencoder_vit", "MaskedAutoEncoderViT 2-D", lambda: nets().MaskedAutoEncoderViT(
            **_vit_kwargs(2), decoder_hidden_size=16, decoder_mlp_dim=16, decoder_num_layers=1, decoder_num_heads=2),
             image),
        Case("nets.masked_autoencoder_vit", "MaskedAutoEncoderViT 3-D", lambda: nets().MaskedAutoEncoderViT(
            **_vit_kwargs(3, hidden_size=36), decoder_hidden_size=12, decoder_mlp_dim=16, decoder_num_layers=1,
            decoder_num_heads=2), volume),  # 3-D sin-cos position embeddings: widths divisible by 6
        Case("nets.transchex", "Transchex", skip="its constructor downloads bert-base-uncased's weights",
             build=lambda: nets().Transchex(
            in_channels=3, img_size=(32, 32), patch_size=(8, 8), num_classes=3, num_language_layers=1,
            num_vision_layers=1, num_mixed_layers=1, hidden_size=32, intermediate_size=32, num_attention_heads=2,
            max_position_embeddings=32), inputs=_image()),
        Case("nets.diffusion_model_unet", "DiffusionModelUNet 2-D", lambda: nets().DiffusionModelUNet(
            spatial_dims=2, in_channels=1, out_channels=1, **_DIFFUSION), image, _timesteps),
        Case("nets.diffusion_model_unet", "DiffusionModelUNet 2-D, cross-attention", lambda: nets().DiffusionModelUNet(
            spatial_dims=2, in_channels=1, out_channels=1, with_conditioning=True, cross_attention_dim=8,
            **_DIFFUSION), image, lambda m, x: _timesteps(m, x, context=_randn(2, 3, 8, seed=1))),
        Case("nets.diffusion_model_unet", "DiffusionModelUNet 3-D", lambda: nets().DiffusionModelUNet(
            spatial_dims=3, in_channels=1, out_channels=1, **_DIFFUSION), volume, _timesteps),
        Case("nets.controlnet", "ControlNet 2-D", lambda: nets().ControlNet(
            spatial_dims=2, in_channels=1, conditioning_embedding_num_channels=(16,), **_DIFFUSION), image,
             lambda m, x: _timesteps(m, x, controlnet_cond=x)),
        Case("nets.spade_diffusion_model_unet", "SPADEDiffusionModelUNet 2-D", lambda: nets().SPADEDiffusionModelUNet(
            spatial_dims=2, in_channels=1, out_channels=1, label_nc=2, spade_intermediate_channels=8, **_DIFFUSION),
             image, lambda m, x: _timesteps(m, x, seg=_randn(2, 2, 32, 32, seed=1))),
        Case("nets.autoencoderkl", "AutoencoderKL 2-D", lambda: nets().AutoencoderKL(
            spatial_dims=2, num_res_blocks=1, channels=(16, 32), attention_levels=(False, True), latent_channels=2,
            norm_num_groups=8), image),
        Case("nets.autoencoderkl", "AutoencoderKL 3-D", lambda: nets().AutoencoderKL(
            spatial_dims=3, num_res_blocks=1, channels=(16, 32), attention_levels=(False, True), latent_channels=2,
            norm_num_groups=8), volume),
        Case("nets.spade_autoencoderkl", "SPADEAutoencoderKL 2-D", lambda: nets().SPADEAutoencoderKL(
            spatial_dims=2, label_nc=2, num_res_blocks=1, channels=(16, 32), attention_levels=(False, True),
            latent_channels=2, norm_num_groups=8, spade_intermediate_channels=8), image,
             lambda m, x: m(x, seg=_randn(2, 2, 32, 32, seed=1))),
        Case("nets.restormer", "Restormer 2-D", lambda: __import__("monai.networks.nets.restormer", fromlist=["x"])
             .Restormer(spatial_dims=2, in_channels=1, out_channels=1, dim=8, num_blocks=(1, 1, 1, 1),
                        heads=(1, 1, 1, 1), num_refinement_blocks=1), image),
        Case("nets.navit", "NaViT 2-D (packed images)", lambda: nets().NaViT(
            image_size=32, patch_size=8, num_classes=3, hidden_size=32, mlp_dim=32, num_layers=2, num_heads=2,
            spatial_dims=2), lambda: [[_randn(1, 16, 16), _randn(1, 8, 24, seed=1)], [_randn(1, 32, 16, seed=2)]],
             extent=(32, 24)),
        Case("nets.transformer", "DecoderOnlyTransformer (tokens)", lambda: nets().DecoderOnlyTransformer(
            num_tokens=16, max_seq_len=16, attn_layers_dim=32, attn_layers_depth=2, attn_layers_heads=2),
             lambda: torch.randint(0, 16, (2, 16), generator=torch.Generator().manual_seed(0)), extent=(1, 16)),
        Case("nets.milmodel", "MILModel (att_trans, ResNet-50 random)", lambda: nets().MILModel(
            num_classes=3, mil_mode="att_trans", pretrained=False, trans_blocks=1), lambda: _randn(1, 4, 3, 32, 32)),
        Case("nets.unet", "UNet 2-D (no attention)", lambda: nets().UNet(
            spatial_dims=2, in_channels=1, out_channels=2, channels=(8, 16), strides=(2,)), image),
        Case("nets.attentionunet", "AttentionUnet 2-D (attention gates)", lambda: nets().AttentionUnet(
            spatial_dims=2, in_channels=1, out_channels=2, channels=(8, 16), strides=(2,)), image),
        Case("nets.segresnet", "SegResNet 3-D (no attention)", lambda: nets().SegResNet(
            spatial_dims=3, in_channels=1, out_channels=2, init_filters=8), volume),
        Case("nets.densenet", "DenseNet121 2-D (no attention)", lambda: nets().DenseNet121(
            spatial_dims=2, in_channels=1, out_channels=3), image),
    ]
    return cases


def _ultralytics_offline() -> None:
    """Ultralytics never reaches the network and writes its settings to a temporary folder: set before its import."""
    import os
    import tempfile

    os.environ.setdefault("YOLO_OFFLINE", "1")
    os.environ.setdefault("YOLO_CONFIG_DIR", os.path.join(tempfile.gettempdir(), "vitmad-ultralytics-settings"))


def _ultralytics_model(path):
    """The task model of a packaged yaml at its smallest scale (the first of its ``scales``), random weights."""
    from ultralytics.nn import tasks

    config = tasks.yaml_model_load(path)
    scales = config.get("scales")
    if scales:
        config["scale"] = next(iter(scales))
    head = str(config["head"][-1][2])
    if "RTDETRDecoder" in head:
        model_class = tasks.RTDETRDetectionModel
    elif "WorldDetect" in head:
        model_class = tasks.WorldModel
    elif "YOLOESegment" in head:
        model_class = tasks.YOLOESegModel
    elif "YOLOEDetect" in head:
        model_class = tasks.YOLOEModel
    else:
        model_class = {"detect": tasks.DetectionModel, "segment": tasks.SegmentationModel, "pose": tasks.PoseModel,
                       "obb": tasks.OBBModel, "classify": tasks.ClassificationModel,
                       "semantic": tasks.SemanticSegmentationModel, "depth": tasks.DepthModel}[
            tasks.guess_model_task(config)]
    return model_class(config, verbose=False)


def ultralytics_cases() -> list[Case]:
    """Every yaml under ultralytics/cfg/models, at its smallest scale, on a 128 x 192 image (every stride up to 64
    divides it: the P6 models' last map is 2 x 3). A yaml with a ``TorchVision`` layer is not built: that layer
    loads torchvision's pretrained weights (a download)."""
    _ultralytics_offline()
    import ultralytics

    root = Path(ultralytics.__file__).parent / "cfg" / "models"
    cases = []
    for path in sorted(root.rglob("*.yaml")):
        scales = _yaml_scales(path)
        label = path.name + (f" (scale {scales[0]})" if scales else "")
        downloads = "TorchVision" in path.read_text()
        cases.append(Case(str(path.parent.relative_to(root)), label, lambda path=path: _ultralytics_model(path),
                          _image(128, 192), skip="its TorchVision layer downloads torchvision's weights" * downloads))
    return cases


def _yaml_scales(path) -> list[str]:
    import yaml

    return list((yaml.safe_load(path.read_text()) or {}).get("scales") or [])


# segment_anything's packaged builders (build_sam.py): encoder width, depth, heads and global blocks per config.
_SAM_CONFIGS = {"vit_b": (768, 12, 12, (2, 5, 8, 11)), "vit_l": (1024, 24, 16, (5, 11, 17, 23)),
                "vit_h": (1280, 32, 16, (7, 15, 23, 31))}


def _sam_encoder(config: str, img_size: int):
    """The ImageEncoderViT of a packaged config (as ``_build_sam`` makes it: 16 px patches, window 14, relative
    position bias), built for ``img_size`` instead of 1024."""
    from functools import partial

    from segment_anything.modeling import ImageEncoderViT

    width, depth, heads, global_blocks = _SAM_CONFIGS[config]
    return ImageEncoderViT(depth=depth, embed_dim=width, img_size=img_size, mlp_ratio=4,
                           norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_heads=heads, patch_size=16,
                           qkv_bias=True, use_rel_pos=True, global_attn_indexes=global_blocks, window_size=14,
                           out_chans=256)


def _sam_prompted(model, image):
    """Sam.forward on one image (the long side at the encoder's size, as SamPredictor resizes it) and a point."""
    return model([{"image": image, "original_size": tuple(image.shape[-2:]),
                   "point_coords": torch.tensor([[[100.0, 200.0]]]), "point_labels": torch.ones(1, 1)}],
                 multimask_output=True)


def _sam2_model(config: str):
    from sam2.build_sam import build_sam2

    return build_sam2(config, ckpt_path=None, device="cpu")


def segment_anything_cases() -> list[Case]:
    """segment_anything 1.0: the packaged ``vit_b`` Sam as built (1024 px, prompted), each packaged config's
    encoder at 256 px; sam2 1.1.0: every packaged model config (random weights), its ``forward_image`` at 256 px."""
    import sam2

    cases = [Case("segment_anything", "sam_model_registry['vit_b'] (Sam, 1024 px, a point prompt)",
                  lambda: __import__("segment_anything").sam_model_registry["vit_b"](),
                  lambda: _randn(3, 1024, 768).mul(40).add(120), _sam_prompted, extent=(1024, 1024))]
    cases += [Case("segment_anything", f"ImageEncoderViT of {config} at 256 px",
                   lambda config=config: _sam_encoder(config, 256), lambda: _randn(1, 3, 256, 256))
              for config in _SAM_CONFIGS]
    root = Path(sam2.__file__).parent
    for path in sorted(root.glob("configs/**/*.yaml")):
        config = str(path.relative_to(root))
        training = "training" in path.parent.name
        cases.append(Case("sam2", config, lambda config=config: _sam2_model(config), lambda: _randn(1, 3, 256, 256),
                          lambda m, x: m.forward_image(x),
                          skip="a training config (data, optimiser and trainer around a model config)" * training))
    return cases


def diffusers_cases() -> list[Case]:
    """Every model class of diffusers' transformers, UNets and ControlNets: benchmarks/_diffusers_models.py."""
    import _diffusers_models

    return _diffusers_models.diffusers_cases()
