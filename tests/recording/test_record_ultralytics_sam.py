"""Ultralytics' SAM image encoders besides SAM's ViT (``ultralytics.models.sam``, 8.4): MobileSAM's TinyViT, SAM 2's
Hiera and SAM 3's ViT trunk, built small and as ultralytics' builders build them (random weights, no checkpoint), each
against the model's own attention probabilities placed by the geometry written here from ultralytics' source; YOLOE's
visual-prompt pooling skipped. Nothing is downloaded: ``YOLO_OFFLINE`` is set and the settings file goes to a
temporary folder.

The layouts, from ``ultralytics/models/sam``:

- ``modules/tiny_encoder.py`` (TinyViT): ``PatchEmbed`` is two 3 x 3 convolutions of stride 2 (padding 1): 4 px
  cells. Stage 0 is ``MBConv``\\ s; each stage ends in a ``PatchMerging`` whose 3 x 3 depthwise convolution has stride
  2, or 1 where its ``out_dim`` is 320, 448 or 576 (MobileSAM's stages: 4, 8, 16 and 16 px). A ``TinyViTBlock`` gets
  ``[B, H * W, C]`` tokens of its ``input_resolution`` (``img_size // 4 // 2 ** i``, or ``set_imgsz``), pads the map
  at the bottom and right to whole ``window_size`` windows (``F.pad``) and cuts it with ``view(b, nH, ws, nW, ws, c)
  .transpose(2, 3)``: windows row-major, image-major in the batch, tokens row-major in each; a map of exactly one
  window is not cut. ``Attention``: ``((q @ k^T) * scale + bias).softmax(dim=-1)`` on ``[B * nW, heads, N, N]``. So
  the SAM window layout of ``conftest.padded_window_reference``, padding slots keys past the edge and no queries.
- ``modules/encoders.py`` / ``blocks.py`` (SAM 2's ``Hiera``, ``MultiScaleBlock``, ``MultiScaleAttention``): sam2's
  trunk copied: a 7 x 7 convolution of stride 4 (padding 3), SAM's windows, queries max-pooled per window at a stage
  change, SDPA on ``[B * nW, heads, Nq, Nk]``: ``conftest.pooled_window_reference``.
- ``sam3/vitdet.py`` (SAM 3's ``ViT``): a convolution of kernel = stride = patch, ``[B, H, W, C]``; ``Block`` runs
  SAM's ``window_partition`` (window 0 for ``global_att_blocks``: the whole map); ``Attention`` applies 2-D RoPE (and
  concatenates relative positions to q and k in ``rel_pos_blocks``), then SDPA on ``[B * nW, heads, N, N]``.
"""

from __future__ import annotations

import math
import os
import tempfile

import pytest
import torch
from PIL import Image

os.environ.setdefault("YOLO_OFFLINE", "1")  # ultralytics must never reach the network from these tests
os.environ.setdefault("YOLO_CONFIG_DIR", os.path.join(tempfile.gettempdir(), "vitmad-ultralytics-settings"))
_PIL_OPEN = Image.open
pytest.importorskip("ultralytics")
# Importing ultralytics replaces PIL.Image.open for the whole process: the rest of the suite gets PIL's own opener
# back (as tests/recording/test_record_ultralytics.py does).
Image.open = _PIL_OPEN

from ultralytics.models.sam.build import build_mobile_sam, build_sam2_t  # noqa: E402
from ultralytics.models.sam.modules.encoders import Hiera  # noqa: E402
from ultralytics.models.sam.modules.tiny_encoder import Attention as TinyViTAttention  # noqa: E402
from ultralytics.models.sam.modules.tiny_encoder import TinyViT, TinyViTBlock  # noqa: E402
from ultralytics.models.sam.modules.transformer import TwoWayTransformer  # noqa: E402
from ultralytics.models.sam.sam3.vitdet import Attention as ViTDetAttention  # noqa: E402
from ultralytics.models.sam.sam3.vitdet import ViT  # noqa: E402
from ultralytics.nn.tasks import YOLOEModel  # noqa: E402

import vitmad  # noqa: E402
from conftest import (  # noqa: E402
    assert_close_within_float32,
    check_sam_windows,
    hiera_random_tables,
    padded_window_reference,
    pooled_window_reference,
    sdpa_probabilities,
    sharpened,
    tensor_softmax_outputs,
)
from vitmad.recording.recorder import NoLayerError  # noqa: E402

TOL = {"rtol": 1e-5, "atol": 1e-4}  # pixels (and masses <= 1): float32 recordings against float64 references
WINDOW_STATS = ["entropy", "self_mass", "prefix_mass"]


def _record(model, run, stats):
    """``(mean recording, per-token recording)`` of ``run()``; its output unchanged by recording, bit for bit."""
    def tensors(output):
        return list(output) if isinstance(output, (list, tuple)) else [output]

    with torch.no_grad():
        plain = tensors(run())
        with vitmad.record(model, stats=stats) as rec:
            recorded = tensors(run())
        with vitmad.record(model, stats=stats, reduction="none") as rec_tokens:
            run()
    assert len(plain) == len(recorded) and all(torch.equal(a, b) for a, b in zip(plain, recorded))
    assert rec.layers == rec_tokens.layers and rec.skipped == {}
    return rec, rec_tokens


def _tiny_vit_tables(model: torch.nn.Module) -> torch.nn.Module:
    """Sharpened projections (conftest; each Attention's qkv drawn wider still: std 0.25 after its LayerNorm leaves a
    window of 9 near uniform) and random attention biases (zeros at init), set before ``eval()``, which caches each
    Attention's bias table (``ab``) from them."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("attention_biases"):
                parameter.normal_()
    sharpened(model)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, TinyViTAttention):
                module.qkv.weight.normal_(std=0.5)
    return model


def _tiny_vit() -> TinyViT:
    """Three stages (the first convolutional) of 4, 8 and 16 px; windows 3 and 8 in the attention stages."""
    torch.manual_seed(0)
    return _tiny_vit_tables(TinyViT(img_size=128, embed_dims=(16, 32, 48), depths=(1, 1, 2), num_heads=(1, 2, 2),
                                    window_sizes=(4, 3, 8)))


def _check_tiny_vit(rec, rec_tokens, maps, blocks, batch: int) -> None:
    """``blocks``: per recorded layer, ``(map height, map width, window, stride px)`` as the source gives them."""
    assert len(maps) == len(blocks) == len(rec.layers)
    tokens = rec_tokens.calls[-1]
    for layer, (probabilities, (height, width, window, stride)) in enumerate(zip(maps, blocks, strict=True)):
        heads = probabilities.shape[1]
        expected = padded_window_reference(probabilities.double(), height, width, window, stride, batch, heads)
        # Far from uniform: a token at a wrong cell would change the values.
        assert float(expected["entropy"].mean()) < 0.75 * math.log(probabilities.shape[-1])
        geometry = rec.geometry[layer]
        assert geometry.grid == (height, width) and geometry.stride == (stride, stride) and geometry.heads == heads
        padded = (math.ceil(height / window) * window, math.ceil(width / window) * window)
        assert geometry.attention == f"window {window}x{window}" + (
            f", padded to {padded[0]}x{padded[1]}" if padded != (height, width) else "")
        for name, values in expected.items():
            per_token = tokens.per_layer if name == "mad" else tokens.statistics[name]
            torch.testing.assert_close(per_token[layer].double(), values, **TOL)
            # rec.stats stacks the layers, heads padded with NaN to the widest layer's.
            means = rec.stats[name][layer].double()
            torch.testing.assert_close(means[:, :heads], values.mean(-1), **TOL)
            assert means[:, heads:].isnan().all()
        torch.testing.assert_close(rec.per_layer[layer].double(), expected["mad"].mean(-1), **TOL)


@pytest.mark.parametrize(("image", "blocks"), [
    # 128 x 128: stage 1 a 16 x 16 map of 8 px cells in windows of 3 (padded to 18 x 18); stage 2 an 8 x 8 map of
    # 16 px cells, exactly one window of 8 (the block's unpartitioned path).
    ((128, 128), [(16, 16, 3, 8.0), (8, 8, 8, 16.0), (8, 8, 8, 16.0)]),
    # set_imgsz([96, 160]): 12 x 20 in windows of 3 (padded to 12 x 21), then 6 x 10 in windows of 8 (8 x 16).
    ((96, 160), [(12, 20, 3, 8.0), (6, 10, 8, 16.0), (6, 10, 8, 16.0)]),
], ids=["square", "non-square-padded"])
def test_tiny_vit_windows(image, blocks):
    encoder = _tiny_vit()
    encoder.set_imgsz(list(image))
    pixels = torch.rand(2, 3, *image)
    maps = tensor_softmax_outputs(lambda: encoder(pixels))
    rec, rec_tokens = _record(encoder, lambda: encoder(pixels), WINDOW_STATS)
    assert rec.layers == ["layers.1.blocks.0.attn", "layers.2.blocks.0.attn", "layers.2.blocks.1.attn"]
    _check_tiny_vit(rec, rec_tokens, maps, blocks, 2)


def test_mobile_sam_image_encoder():
    """build_mobile_sam's SAMModel (TinyViT-5M: windows 7, 7, 14, 7), its encoder set to 224 x 320 px, run as
    SAMPredictor runs it (``model.image_encoder``): the last PatchMerging (out_dim 320) keeps 16 px cells; the
    mask decoder is not recorded by default."""
    torch.manual_seed(0)
    model = _tiny_vit_tables(build_mobile_sam())
    model.image_encoder.set_imgsz([224, 320])
    pixels = torch.rand(1, 3, 224, 320)
    maps = tensor_softmax_outputs(lambda: model.image_encoder(pixels))
    rec, rec_tokens = _record(model, lambda: model.image_encoder(pixels), WINDOW_STATS)
    depths = {1: 2, 2: 6, 3: 2}
    assert rec.layers == [f"image_encoder.layers.{s}.blocks.{b}.attn" for s, d in depths.items() for b in range(d)]
    blocks = [(28, 40, 7, 8.0)] * 2 + [(14, 20, 14, 16.0)] * 6 + [(14, 20, 7, 16.0)] * 2
    _check_tiny_vit(rec, rec_tokens, maps, blocks, 1)


def test_tiny_vit_block_without_its_model_refused():
    block = TinyViTBlock(dim=16, input_resolution=(6, 6), num_heads=2, window_size=4).eval()
    with pytest.raises(ValueError, match=r"attn \(Attention\).*placed only as the attention of a TinyViTBlock within "
                                         r"a TinyViT .*outside any TinyViT"):
        with torch.no_grad(), vitmad.record(block):
            block(torch.rand(1, 36, 16))



def _check_hiera(rec, rec_tokens, run, trunk: Hiera, batch: int, image: tuple[int, int], prefix: str) -> None:
    """Each block's call of ``run()`` placed by :func:`conftest.pooled_window_reference` from the block's window and
    query stride as the source reads them; the map 4 px cells of the image, each pooling block's map ``floor`` of its
    input's. Judged within float32's error (:func:`conftest.assert_close_within_float32`): the random tables put
    Hiera-T's logits in the tens, where PyTorch's own float32 softmax moves a MAD by up to 5e-4 px."""
    maps, maps32 = sdpa_probabilities(run), sdpa_probabilities(run, torch.float32)
    assert rec.layers == [f"{prefix}blocks.{i}.attn" for i in range(len(trunk.blocks))] and len(maps) == len(rec.layers)
    height, width, stride = image[0] // 4, image[1] // 4, 4
    tokens = rec_tokens.calls[-1]
    for layer, (probabilities, probabilities32, block) in enumerate(zip(maps, maps32, trunk.blocks, strict=True)):
        q = block.q_stride[0] if block.q_stride else 1
        grid, mad, entropy = pooled_window_reference(probabilities, batch, height, width, block.window_size, q, stride)
        _, mad32, entropy32 = pooled_window_reference(probabilities32, batch, height, width, block.window_size, q,
                                                      stride)
        assert float(entropy.mean()) < 0.75 * math.log(probabilities.shape[-1])
        geometry = rec.geometry[layer]
        assert geometry.grid == grid and geometry.stride == (stride * q, stride * q)
        assert geometry.heads == probabilities.shape[1] == block.attn.num_heads
        assert_close_within_float32(tokens.per_layer[layer], mad, mad32, **TOL)
        assert_close_within_float32(tokens.statistics["entropy"][layer], entropy, entropy32, **TOL)
        assert_close_within_float32(rec.per_layer[layer], mad.mean(-1), mad32.mean(-1), **TOL)
        height, width, stride = height // q, width // q, stride * q


@pytest.mark.parametrize("image", [(64, 64), (48, 64)], ids=["whole-windows", "padded-48x64"])
def test_hiera_trunk(image):
    # Stages (1, 2, 2, 1), windows (4, 4, 4, 2), blocks 2 and 4 global. 48 x 64: a 12 x 16 map, then 6 x 8 (block 3
    # pads it to 8 x 8), then 3 x 4 (block 5 pads it to 4 x 4 and keeps 2 x 2 pooled queries, the second row's cells
    # half padding).
    torch.manual_seed(0)
    trunk = hiera_random_tables(Hiera(embed_dim=16, num_heads=1, stages=(1, 2, 2, 1), global_att_blocks=(2, 4),
                                window_pos_embed_bkg_spatial_size=(4, 4), window_spec=(4, 4, 4, 2))).eval()
    pixels = torch.randn(2, 3, *image)
    rec, rec_tokens = _record(trunk, lambda: trunk(pixels), ["entropy"])
    _check_hiera(rec, rec_tokens, lambda: trunk(pixels), trunk, 2, image, "")


def test_sam2_model_forward_image():
    """build_sam2_t's SAM2Model (Hiera-T: stages 1, 2, 7, 2; windows 8, 4, 14, 7; blocks 5, 7, 9 global) through
    ``forward_image`` on 64 x 96 px: the trunk recorded alone, by default; its features unchanged, bit for bit."""
    torch.manual_seed(0)
    model = hiera_random_tables(build_sam2_t()).eval()
    pixels = torch.randn(1, 3, 64, 96)
    rec, rec_tokens = _record(model, lambda: model.forward_image(pixels)["vision_features"], ["entropy"])
    _check_hiera(rec, rec_tokens, lambda: model.forward_image(pixels), model.image_encoder.trunk, 1, (64, 96),
                 "image_encoder.trunk.")


@pytest.mark.parametrize(("image", "rel_pos"), [((56, 56), (1,)), ((44, 60), ())],
                         ids=["square-rel-pos", "non-square"])
def test_sam3_vit_windows(image, rel_pos):
    # 4 px patches, window 3, block 1 global: 56 x 56 px is a 14 x 14 map (windows over 15 x 15); 44 x 60 px
    # (set_imgsz, which resizes the global block's RoPE and relative tables) an 11 x 15 map (windows over 12 x 15).
    torch.manual_seed(0)
    vit = ViT(img_size=56, pretrain_img_size=28, patch_size=4, embed_dim=32, depth=3, num_heads=2, window_size=3,
              global_att_blocks=(1,), rel_pos_blocks=rel_pos, rel_pos_zero_init=False, use_rope=True,
              use_interp_rope=True, retain_cls_token=False, ln_pre=True, use_act_checkpoint=False)
    vit.set_imgsz(list(image))
    sharpened(vit)
    with torch.no_grad():
        for module in vit.modules():
            if isinstance(module, ViTDetAttention):  # std 0.25 leaves the global block's 196 keys near uniform
                module.qkv.weight.normal_(std=0.6)
        vit.pos_embed.normal_()
        vit.patch_embed.proj.weight.normal_(std=0.25)
    pixels = torch.rand(2, 3, *image)
    maps = sdpa_probabilities(lambda: vit(pixels))
    rec, rec_tokens = _record(vit, lambda: vit(pixels), WINDOW_STATS)
    assert rec.layers == ["blocks.0.attn", "blocks.1.attn", "blocks.2.attn"]
    for probabilities in maps:
        assert float((-torch.special.xlogy(probabilities, probabilities).sum(-1)).mean()) < 0.75 * math.log(
            probabilities.shape[-1])
    check_sam_windows(rec, rec_tokens, maps, image[0] // 4, image[1] // 4, 3, 4.0, batch=2, heads=2)


def test_sam3_vit_keeping_its_class_token_refused_by_name():
    """retain_cls_token=True (global blocks only, ultralytics asserts it) gives the blocks [B, 1 + h * w, C]: vitmad
    read that as a 65 x 32 map and refused with a shape message (QA helper-179). Its own forward then fails anyway
    (math.sqrt sizes in the reshape), which the refusal, raised at the first attention, comes before."""
    vit = ViT(img_size=32, pretrain_img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=2, window_size=0,
              global_att_blocks=(0, 1), rel_pos_blocks=(), use_rope=True, retain_cls_token=True,
              use_act_checkpoint=False).eval()
    pixels = torch.rand(1, 3, 32, 32)
    with pytest.raises(TypeError, match="reshape"):
        vit(pixels)
    with pytest.raises(ValueError, match=r"blocks\.0\.attn \(Attention\) of ViT: ultralytics' SAM 3 ViT keeps its "
                                         r"class token \(retain_cls_token=True\).* build the ViT with "
                                         r"retain_cls_token=False, as build_sam3 does, or pass positions="):
        with torch.no_grad(), vitmad.record(vit):
            vit(pixels)


def test_mask_decoder_attention_refused_by_name():
    transformer = TwoWayTransformer(depth=1, embedding_dim=16, num_heads=2, mlp_dim=32).eval()
    image, points = torch.rand(1, 16, 4, 4), torch.rand(1, 3, 16)
    with pytest.raises(ValueError, match=r"layers\.0\.self_attn \(Attention\).*ultralytics' SAM module Attention "
                                         r"\(ultralytics\.models\.sam\.modules\.transformer\) is not placed by vitmad: "
                                         r"it places the image encoders' self-attention"):
        with torch.no_grad(), vitmad.record(transformer):
            transformer(image, torch.zeros_like(image), points)


def test_yoloe_visual_prompt_pooling_skipped():
    # YOLOE's backbone C2PSA is YOLO11's (the ultralytics family places it); its SAVPE takes a softmax over each
    # visual prompt mask's cells, queries that are prompts, not cells.
    model = YOLOEModel("yoloe-11n.yaml", verbose=False).eval()
    with torch.no_grad(), vitmad.record(model) as rec:
        model(torch.rand(1, 3, 64, 96))
    assert rec.layers == ["model.10.m.0.attn"]
    with pytest.raises(NoLayerError, match=r"model\.23\.savpe: YOLOE's visual prompt embedding \(SAVPE\): a softmax "
                                           r"over each prompt mask's cells, whose queries are the visual prompts"):
        vitmad.record(model, layers=["model.23.savpe"])


def test_profile_takes_the_encoder():
    # vitmad.profile on the module and preprocessed pixels (SAMPredictor's resizing is not vitmad's): the mean over
    # the images of what the recording gives per image.
    encoder = _tiny_vit()
    pixels = torch.rand(4, 3, 128, 128)
    result = vitmad.profile(encoder, pixels, batch_size=2, device="cpu")
    with torch.no_grad(), vitmad.record(encoder) as rec:
        encoder(pixels)
    torch.testing.assert_close(result.mad.double(), rec.mad.double().mean(1), **TOL)
