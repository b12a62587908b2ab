"""vitmad.record on kornia's (0.9) vision transformers: its ViT, DeDoDe's DINOv2, SAM's image encoder, RT-DETR's AIFI,
the Qwen2.5-VL tower (MobileViT, TinyViT, SigLIP2 and MoonViT: test_record_kornia_2.py).

From kornia's source:

- ``kornia.models.vit``: ``PatchEmbedding`` is a ``Conv2d`` of kernel = stride = patch on an ``image_size`` square
  image, flattened row-major, the class token concatenated first; ``MultiHeadAttention`` takes ``.softmax(dim=-1)`` of
  ``[B, heads, N, N]``. So: one token without a position, then the ``image_size / patch`` grid of ``patch`` px cells.
- ``kornia.feature.dedode.transformer`` (DINOv2): ``PatchEmbed``'s ``Conv2d`` (kernel = stride = 14; the image must be
  whole patches, any aspect), flattened row-major, then ``torch.cat((cls_token, x))``: the class token, then the grid;
  ``Attention`` (``MemEffAttention`` calls it) takes ``.softmax`` of ``[B, heads, N, N]``. ``mask_token`` replaces
  patches in place.
- ``kornia.models.sam``: Meta's ``ImageEncoderViT`` copied (the same ``window_partition``: bottom / right zero padding,
  unmasked, windows and tokens row-major; ``Attention`` over ``[B * windows * heads, N, N]``), placed as in
  test_record_segment_anything.py by ``conftest.check_sam_windows``.
- ``kornia.models.rt_detr``: ``AIFI`` runs a sequence-first ``nn.MultiheadAttention`` over ``x.permute(2, 3, 0,
  1).flatten(0, 1)`` of the last backbone map (``ResNetD``: stride 32, one 1 x 1 projection after it): its row-major
  cells at ``(r + 0.5) * 32`` px.
- ``kornia.models.qwen25.vision``: ``Qwen25VisionPatchEmbed`` puts the ``gh x gw`` patches of its ``Conv3d`` (stride =
  ``patch_size``) in 2 x 2 merge-block order, kept so by every block; a window block passes
  ``F.scaled_dot_product_attention`` a boolean ``attn_mask`` (same window), a ``fullatt_block_indexes`` block none.
  Each token at its patch's centre; the reference there is SDPA's own q, k and mask, spied, in float64.

The reference is each layer's own softmax (``Tensor.softmax`` spied, or ``nn.MultiheadAttention`` asked for its
per-head weights), placed by that geometry in float64.
"""

from __future__ import annotations

import math
from functools import partial
from unittest import mock

import pytest
import torch

import vitmad
from conftest import (
    check_prefix_and_grid,
    check_sam_windows,
    grid_centres,
    record_both_reductions,
    sam_random_tables,
    sharpened,
    statistics_reference,
    tensor_softmax_maps,
    tensor_softmax_outputs,
)

pytest.importorskip("kornia")
from kornia.feature import LoFTR  # noqa: E402
from kornia.feature.dedode.transformer.dinov2 import DinoVisionTransformer  # noqa: E402
from kornia.feature.dedode.transformer.layers.attention import MemEffAttention  # noqa: E402
from kornia.feature.dedode.transformer.layers.block import Block as DinoBlock  # noqa: E402
from kornia.models.qwen25 import Qwen25VisionConfig, Qwen25VisionTransformer  # noqa: E402
from kornia.models.rt_detr.architecture.hybrid_encoder import HybridEncoder  # noqa: E402
from kornia.models.rt_detr.architecture.resnet_d import BasicBlockD, ResNetD  # noqa: E402
from kornia.models.rt_detr.architecture.rtdetr_head import RTDETRHead  # noqa: E402
from kornia.models.rt_detr.model import RTDETR  # noqa: E402
from kornia.models.sam.architecture.image_encoder import ImageEncoderViT  # noqa: E402
from kornia.models.sam.architecture.mask_decoder import MaskDecoder  # noqa: E402
from kornia.models.sam.architecture.prompt_encoder import PromptEncoder  # noqa: E402
from kornia.models.sam.architecture.transformer import TwoWayTransformer  # noqa: E402
from kornia.models.sam.model import Sam  # noqa: E402
from kornia.models.vit import VisionTransformer  # noqa: E402

from vitmad.recording.recorder import NoLayerError  # noqa: E402

PREFIX_STATS = ["entropy", "prefix_mass", "prefix_maps"]
TOL = {"rtol": 1e-5, "atol": 1e-4}  # float32 probabilities, float32 accumulation in vitmad's ops


@pytest.fixture(autouse=True)
def _seeded():
    """Fixed random weights and inputs: the far-from-uniform check of a random tiny model holds for most draws, not
    all (seed 15 of 40 gave the ViT a mean entropy above 0.75 ln N), so a test must not depend on the draw."""
    torch.manual_seed(0)


def _vit() -> VisionTransformer:
    return sharpened(VisionTransformer(image_size=40, patch_size=8, embed_dim=32, depth=2, num_heads=2))


def test_vit_class_token_then_patch_grid_match_its_softmax():
    model, pixels = _vit(), torch.rand(2, 3, 40, 40)
    maps = [m.double() for m in tensor_softmax_maps(model, pixels)]
    rec, rec_tokens = record_both_reductions(model, lambda m: m(pixels), lambda out: out, PREFIX_STATS)
    assert rec.layers == ["encoder.blocks.0.0.fn.1", "encoder.blocks.1.0.fn.1"]
    check_prefix_and_grid(rec, rec_tokens, maps, (5, 5), 8.0, 1)


def test_vit_with_a_backbone_refused():
    backbone = torch.nn.Sequential(torch.nn.Conv2d(3, 32, 3, stride=2, padding=1), torch.nn.ReLU(),
                                   torch.nn.Conv2d(32, 32, 3, stride=2, padding=1))
    model = VisionTransformer(image_size=32, embed_dim=32, depth=1, num_heads=2, backbone=backbone).eval()
    with pytest.raises(ValueError, match=r"backbone= module \(Sequential\), whose map's pixel stride"):
        with torch.no_grad(), vitmad.record(model):
            model(torch.rand(1, 3, 32, 32))


def _dinov2() -> DinoVisionTransformer:
    """DeDoDe's DINOv2 as ``vit_large`` builds it (MemEffAttention blocks, layer scale, MLP), tiny; its patch
    convolution and position embedding drawn anew too (conftest.sam_random_tables), or the patches look alike, and
    its query and key projections doubled: attention far from uniform."""
    model = sam_random_tables(DinoVisionTransformer(
        img_size=56, patch_size=14, embed_dim=32, depth=2, num_heads=2, init_values=1.0, ffn_layer="mlp",
        block_fn=partial(DinoBlock, attn_class=MemEffAttention), block_chunks=0))
    with torch.no_grad():
        for block in model.blocks:
            block.attn.qkv.weight[:64].mul_(2.0)
    return model


@pytest.mark.parametrize("masked", [False, True], ids=["plain", "mask_token"])
def test_dedode_dinov2_class_token_then_patch_grid_match_its_softmax(masked):
    # 42 x 70 px: a 3 x 5 grid (not the 4 x 4 of img_size: the position embedding is interpolated), run through
    # forward_features as DeDoDe's FrozenDINOv2 runs it.
    model, pixels = _dinov2(), torch.rand(2, 3, 42, 70)
    masks = torch.rand(2, 15) < 0.4 if masked else None
    maps = [m.double() for m in tensor_softmax_outputs(lambda: model.forward_features(pixels, masks=masks))]
    rec, rec_tokens = record_both_reductions(model, lambda m: m.forward_features(pixels, masks=masks),
                                             lambda out: out["x_norm_patchtokens"], PREFIX_STATS)
    assert rec.layers == ["blocks.0.attn", "blocks.1.attn"]
    check_prefix_and_grid(rec, rec_tokens, maps, (3, 5), 14.0, 1)


def test_dedode_dinov2_under_inference_mode_as_dedode_runs_it():
    model, pixels = _dinov2(), torch.rand(1, 3, 28, 42)
    with torch.inference_mode():
        plain = model.forward_features(pixels)["x_norm_patchtokens"]
        with vitmad.record(model) as rec:
            recorded = model.forward_features(pixels)["x_norm_patchtokens"]
    assert torch.equal(plain, recorded)
    assert rec.geometry[0].grid == (2, 3) and rec.geometry[0].num_prefix_tokens == 1


def test_dedode_names_the_dinov2_it_holds_in_a_list_and_recording_that_one_works():
    """DeDoDe's G descriptor keeps its DINOv2 in a list (``FrozenDINOv2.dinov2_vitl14 = [model]``), out of the module
    tree: recording the DeDoDe model said "found no attention layer vitmad knows", as of a model without attention
    (QA helper-179). The refusal names the DINOv2 and where it is; recording that one while DeDoDe runs works. The
    DINOv2 is tiny but 1024 wide, as FrozenDINOv2's reshape of its patch tokens requires."""
    from kornia.feature.dedode import DeDoDe

    dinov2 = DinoVisionTransformer(img_size=56, patch_size=14, embed_dim=1024, depth=1, num_heads=16, init_values=1.0,
                                   ffn_layer="mlp", block_fn=partial(DinoBlock, attn_class=MemEffAttention),
                                   block_chunks=0)
    with mock.patch("kornia.feature.dedode.transformer.vit_large", lambda **kwargs: dinov2), \
            mock.patch("kornia.feature.dedode.encoder.load_state_dict_from_url", lambda *a, **k: dinov2.state_dict()):
        dedode = DeDoDe(descriptor_model="G", amp_dtype=torch.float32).eval()
    path = r"model\.descriptor\.encoder\.frozen_dinov2\.dinov2_vitl14\[0\]"
    with pytest.raises(NoLayerError, match=rf"DeDoDe runs its attention in DeDoDe's DINOv2 \(a DinoVisionTransformer, "
                                           rf"{path}\), which its FrozenDINOv2 holds in a plain Python list .* "
                                           rf"record it, vitmad.record\({path}\), and run the DeDoDe model"):
        vitmad.record(dedode)
    assert dedode.descriptor.encoder.frozen_dinov2.dinov2_vitl14[0] is dinov2
    pixels = torch.rand(1, 3, 42, 56)
    plain = dedode(pixels, n=20)
    with vitmad.record(dinov2) as rec:
        recorded = dedode(pixels, n=20)
    assert all(torch.equal(a, b) for a, b in zip(plain, recorded))
    assert rec.layers == ["blocks.0.attn"] and rec.geometry[0].grid == (3, 4)
    assert rec.geometry[0].num_prefix_tokens == 1


def _sam_encoder() -> ImageEncoderViT:
    """Blocks 0 and 2 in windows of 3, block 1 global; relative position bias on, no absolute position embedding (which
    fixes the map at img_size / patch), so the encoder takes a non-square image."""
    return sam_random_tables(ImageEncoderViT(img_size=64, patch_size=8, embed_dim=32, depth=3, num_heads=2,
                                             mlp_ratio=2.0, out_chans=16, use_abs_pos=False, use_rel_pos=True,
                                             window_size=3, global_attn_indexes=(1,)))


@pytest.mark.parametrize("size", [(64, 88), (52, 75)], ids=["64x88", "52x75_floored"])
def test_sam_encoder_windows_and_global_block_match_its_softmax(size):
    # 64 x 88 px: an 8 x 11 map, padded to 9 x 12 by windows of 3; 52 x 75 px: a 6 x 9 map, the last 4 and 3 px
    # dropped by the patch convolution, windows of 3 dividing it.
    encoder, pixels = _sam_encoder(), torch.rand(2, 3, *size)
    maps = [m.double() for m in tensor_softmax_maps(encoder, pixels)]
    stats = ["entropy", "self_mass", "prefix_mass"]
    rec, rec_tokens = record_both_reductions(encoder, lambda m: m(pixels), lambda out: out, stats)
    assert rec.layers == ["blocks.0.attn", "blocks.1.attn", "blocks.2.attn"]
    check_sam_windows(rec, rec_tokens, maps, size[0] // 8, size[1] // 8, 3, 8.0, batch=2, heads=2)


def test_sam_model_records_its_encoder_and_skips_the_mask_decoder():
    encoder = _sam_encoder()
    sam = Sam(encoder,
              PromptEncoder(embed_dim=16, image_embedding_size=(8, 8), input_image_size=(64, 64), mask_in_chans=4),
              MaskDecoder(transformer_dim=16, iou_head_hidden_dim=16,
                          transformer=TwoWayTransformer(depth=1, embedding_dim=16, num_heads=2, mlp_dim=32))).eval()
    pixels = torch.rand(1, 3, 64, 64)
    with torch.no_grad(), vitmad.record(encoder) as alone:
        encoder(pixels)
    with torch.no_grad(), vitmad.record(sam) as whole:
        sam.image_encoder(pixels)
    assert whole.layers == [f"image_encoder.{name}" for name in alone.layers]
    assert torch.equal(whole.mad, alone.mad)
    decoder = "mask_decoder.transformer.layers.0.cross_attn_token_to_image"
    placer = vitmad.recording.families.family_placer(sam, decoder, sam.get_submodule(decoder))
    assert isinstance(placer, vitmad.recording.families.Skip)
    assert "kornia TwoWayTransformer" in placer.reason and "prompt tokens" in placer.reason


def _multihead_maps(run) -> list[torch.Tensor]:
    """Per-head probabilities ``[B, heads, N, N]`` of every ``nn.MultiheadAttention`` call of ``run()``, float64:
    the layer asked for them (``need_weights=True, average_attn_weights=False``, the softmax its fused path
    computes)."""
    maps, original = [], torch.nn.MultiheadAttention.forward

    def spy(self, *args, **kwargs):
        out = original(self, *args, **{**kwargs, "need_weights": True, "average_attn_weights": False})
        maps.append(out[1].double())
        return out

    with torch.no_grad(), mock.patch.object(torch.nn.MultiheadAttention, "forward", spy):
        run()
    return maps


def _rtdetr() -> RTDETR:
    torch.manual_seed(0)
    backbone = ResNetD([1, 1, 1, 1], BasicBlockD)
    model = RTDETR(backbone, HybridEncoder(backbone.out_channels, 32, 64),
                   RTDETRHead(5, 32, 10, [32, 32, 32], 1, num_heads=4, num_denoising=0))
    sharpened(model)
    with torch.no_grad():  # the AIFI's query and key projections scaled: attention far from uniform
        aifi = model.encoder.encoder[0].layers[0].self_attn
        aifi.in_proj_weight[:2 * aifi.embed_dim].mul_(4.0)
    return model


def test_rtdetr_aifi_over_the_last_map_and_its_decoder_skipped():
    # 96 x 160 px (RT-DETR's CCFM needs sides of whole 32 px cells): a 3 x 5 last map.
    model, pixels = _rtdetr(), torch.rand(2, 3, 96, 160)
    maps = _multihead_maps(lambda: model(pixels))
    assert maps[0].shape == (2, 8, 15, 15)  # the AIFI, then the decoder's self-attention over the object queries
    stats = ["entropy", "self_mass"]
    rec, rec_tokens = record_both_reductions(model, lambda m: m(pixels), lambda out: torch.cat(out, -1), stats)
    assert rec.layers == ["encoder.encoder.0.layers.0.self_attn"]
    assert rec.skipped == {
        "decoder.decoder.layers.0.self_attn": "RT-DETR's decoder self-attention: its queries are object queries, "
                                              "without a position in the image",
        "decoder.decoder.layers.0.cross_attn": "deformable attention (RT-DETR's decoder): a softmax over sampled "
                                               "points around each object query's reference, not attention between "
                                               "tokens"}
    geometry = rec.geometry[0]
    assert geometry.grid == (3, 5) and geometry.stride == (32.0, 32.0) and geometry.attention == "global"
    expected = statistics_reference(maps[0], grid_centres((3, 5), 32.0))
    expected["self_mass"] = maps[0].diagonal(dim1=-2, dim2=-1)
    assert float(expected["entropy"].mean()) < 0.75 * math.log(15)
    for name, values in expected.items():
        if name in ("mad", *stats):
            per_token = rec_tokens.per_layer if name == "mad" else rec_tokens.stats[name]
            mean = rec.per_layer if name == "mad" else rec.stats[name]
            torch.testing.assert_close(per_token[0].double(), values, **TOL)
            torch.testing.assert_close(mean[0].double(), values.mean(-1), **TOL)


def test_rtdetr_hybrid_encoder_alone_refused():
    encoder = _rtdetr().encoder
    maps = [torch.rand(1, c, s, s) for c, s in zip([128, 256, 512], [8, 4, 2])]
    with pytest.raises(ValueError, match="kornia's AIFI .* is placed only inside an RTDETR model"):
        with torch.no_grad(), vitmad.record(encoder):
            encoder(maps)


def _qwen25() -> Qwen25VisionTransformer:
    """4 px patches merged 2 x 2, windows of 16 px (4 x 4 patches), block 1 global, the rest windowed; the query and
    key projections tripled, or a window's 16 keys stay near uniform."""
    config = Qwen25VisionConfig(depth=3, hidden_size=32, intermediate_size=48, num_heads=2, patch_size=4,
                                spatial_merge_size=2, window_size=16, fullatt_block_indexes=(1,), out_hidden_size=16)
    model = sharpened(Qwen25VisionTransformer(config))
    with torch.no_grad():
        for block in model.blocks:
            block.attn.qkv.weight[:64].mul_(3.0)
    return model


def _qwen25_token_cells(gh: int, gw: int) -> list[tuple[int, int]]:
    """(row, column) patch of each token, in the order kornia's Qwen25VisionPatchEmbed gives them (its
    ``reshape(b, d, gh // 2, 2, gw // 2, 2).permute(0, 2, 4, 3, 5, 1)``): the 2 x 2 squares row-major, the patches of
    a square row-major within it."""
    return [(square_row * 2 + i, square_col * 2 + j) for square_row in range(gh // 2) for square_col in range(gw // 2)
            for i in range(2) for j in range(2)]


def _masked_sdpa_probabilities(run) -> tuple[list[torch.Tensor], list]:
    """float64 ``softmax(q k^T / sqrt(d))`` of each SDPA call of ``run()``, with the call's boolean ``attn_mask``
    (False: the pair is not attended), and the masks, in call order."""
    maps, masks, original = [], [], torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kwargs):
        scores = q.double() @ k.double().transpose(-2, -1) / math.sqrt(q.shape[-1])
        if attn_mask is not None:
            scores = scores.masked_fill(~attn_mask, -math.inf)
        maps.append(scores.softmax(-1))
        masks.append(attn_mask)
        return original(q, k, v, attn_mask=attn_mask, **kwargs)

    with torch.no_grad(), mock.patch.object(torch.nn.functional, "scaled_dot_product_attention", spy):
        run()
    return maps, masks


@pytest.mark.parametrize("size", [(40, 56), (32, 32)], ids=["40x56_partial_windows", "32x32"])
def test_qwen25_tower_windows_as_a_mask_over_merge_order_match_its_softmax(size):
    """Until QA helper-179 refused by name. A 40 x 56 px image: 10 x 14 patches, windows of 4 x 4 patches cut at the
    bottom and right (kornia's ``_window_mask``: ``row // 4``, ``col // 4``, no padding)."""
    model, pixels = _qwen25(), torch.rand(2, 3, *size)
    gh, gw = size[0] // 4, size[1] // 4
    maps, masks = _masked_sdpa_probabilities(lambda: model(pixels))
    assert [m is None for m in masks] == [False, True, False]
    cells = _qwen25_token_cells(gh, gw)
    positions = torch.tensor([[(r + 0.5) * 4.0, (c + 0.5) * 4.0] for r, c in cells], dtype=torch.float64)
    grid_order = torch.tensor(sorted(range(gh * gw), key=lambda token: cells[token]))  # row-major cell -> token
    rec, rec_tokens = record_both_reductions(model, lambda m: m(pixels), lambda out: out, ["entropy"])
    assert rec.layers == ["blocks.0.attn", "blocks.1.attn", "blocks.2.attn"]
    for layer, probabilities in enumerate(maps):
        geometry = rec.geometry[layer]
        assert geometry.grid == (gh, gw) and geometry.stride == (4.0, 4.0)
        assert geometry.attention == ("global" if layer == 1 else "window 4x4 patches (a mask over the tokens)")
        expected = statistics_reference(probabilities, positions)
        keys = torch.full((gh * gw,), gh * gw) if masks[layer] is None else masks[layer].sum(-1)
        assert float((expected["entropy"] / keys.double().log()).mean()) < 0.75  # far from uniform over its keys
        for stat, tol in (("mad", TOL), ("entropy", {"rtol": 1e-5, "atol": 1e-6})):
            in_grid_order = expected[stat][..., grid_order]
            torch.testing.assert_close(rec_tokens.stats[stat][layer].double(), in_grid_order, **tol)
            torch.testing.assert_close(rec.stats[stat][layer].double(), in_grid_order.mean(-1), **tol)


def test_qwen25_tower_with_another_window_mask_refused():
    """The token order is read from kornia's code; the window mask, checked per call, is what would show it changed."""
    model = _qwen25()

    def rows_of_patches(self, gh, gw, device):  # windows as whole rows of patches: not the layout vitmad knows
        row = torch.arange(gh, device=device).unsqueeze(1).expand(gh, gw).reshape(-1)
        return row.unsqueeze(1) == row.unsqueeze(0)

    with mock.patch.object(Qwen25VisionTransformer, "_window_mask", rows_of_patches):
        with pytest.raises(ValueError, match=r"blocks\.0\.attn .*the attn_mask of this window block of kornia's "
                                             r"Qwen2\.5-VL tower is not the 4x4-patch windows over its 8x8 patches in "
                                             "merge order"):
            with torch.no_grad(), vitmad.record(model):
                model(torch.rand(1, 3, 32, 32))


def test_qwen25_tower_config_changed_inside_a_recording_is_said_so():
    """window_size and fullatt_block_indexes are read when the recording begins: changed in it, the refusal blamed
    the mask the model built from the new config (QA helper-194)."""
    model = _qwen25()
    with torch.no_grad(), vitmad.record(model) as rec:
        model(torch.rand(1, 3, 32, 32))
        model.config.fullatt_block_indexes = [0, *model.config.fullatt_block_indexes]
        with pytest.raises(ValueError, match=r"blocks\.0\.attn .*config changed since the recording began: block 0 "
                                             r"is now global, not 4x4-patch windows"):
            model(torch.rand(1, 3, 32, 32))
    assert rec.mad.shape[0] == len(model.blocks)


def test_loftr_linear_attention_skipped_with_its_reason():
    model = LoFTR(pretrained=None).eval()  # random weights, nothing downloaded
    pair = {"image0": torch.rand(1, 1, 64, 64), "image1": torch.rand(1, 1, 64, 64)}
    with pytest.raises(NoLayerError, match=r"loftr_coarse\.layers\.0\.attention: LoFTR's linear attention: an ELU "
                                           "feature map of queries and keys, no softmax attention probabilities"):
        with torch.no_grad(), vitmad.record(model):
            model(pair)
