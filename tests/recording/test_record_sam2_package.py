"""vitmad.record on Meta's ``sam2`` package (SAM 2): its ``Hiera`` image encoder alone and inside ``SAM2Base``
(``forward_image``, ``SAM2ImagePredictor``), its mask decoder and memory attention skipped or refused by name.

From the package's source (``modeling/backbones/hieradet.py``, ``utils.py``): ``PatchEmbed`` is a 7 x 7 convolution
of stride 4, padding 3, so the first map is ``H / 4 x W / 4`` cells of 4 px, ``[B, H, W, C]``. A ``MultiScaleBlock``
with a window pads its map at the bottom and right with zeros to whole windows (``window_partition``: windows
row-major, tokens row-major in each) and attends in each window; window 0 is a global block. The first block of a
stage (``q_stride``) max-pools the queries of each window by 2 x 2 (``MaxPool2d``, kernel = stride = 2), keys not
pooled: a pooled query stands at the centre of its 2 x 2 cell of the block's input map, and is a query where that
cell holds any image token (a cell reaching into the padding is computed, then cropped by the model: vitmad counts it,
docs/definition.md). ``MultiScaleAttention`` calls SDPA on ``[B * windows, heads, Nq, Nk]``, image then window. The
reference is ``softmax(q k^T / sqrt(d))`` of the q and k the model passes to SDPA, in float64, placed by that
geometry.

The tiny trunk: stages (1, 2, 2, 1), windows (4, 4, 4, 2) (a stage's first block keeps the previous stage's window),
blocks 2 and 4 global. A 48 x 64 image (a 12 x 16 map) gives 6 x 8, then 3 x 4 maps: block 3 pads 6 x 8 to 8 x 8,
block 5 pads 3 x 4 to 4 x 4 and keeps 2 x 2 pooled queries (the second row's cells half padding). Hiera's windowed
position embedding tiles over the first map, so the first map must be whole windows of ``window_spec[0]``.
"""

from __future__ import annotations

import math

import numpy
import pytest
import torch

import vitmad
from conftest import hiera_random_tables, pooled_window_reference, sdpa_probabilities

pytest.importorskip("sam2")
from sam2.modeling.backbones.hieradet import Hiera  # noqa: E402
from sam2.modeling.backbones.image_encoder import FpnNeck, ImageEncoder  # noqa: E402
from sam2.modeling.memory_attention import MemoryAttention, MemoryAttentionLayer  # noqa: E402
from sam2.modeling.memory_encoder import CXBlock, Fuser, MaskDownSampler, MemoryEncoder  # noqa: E402
from sam2.modeling.position_encoding import PositionEmbeddingSine  # noqa: E402
from sam2.modeling.sam.transformer import RoPEAttention  # noqa: E402
from sam2.modeling.sam2_base import SAM2Base  # noqa: E402
from sam2.sam2_image_predictor import SAM2ImagePredictor  # noqa: E402

STATS = ["entropy"]
TOL = {"rtol": 1e-5, "atol": 1e-4}  # float32 q and k, float32 accumulation in vitmad's ops
# Per block: (window, query stride, heads); stride in pixels of its input map: 4, 4, 8, 8, 16, 16.
BLOCKS = [(4, 1, 1), (4, 2, 2), (0, 1, 2), (4, 2, 4), (0, 1, 4), (4, 2, 8)]
INPUT_STRIDES = [4, 4, 8, 8, 16, 16]
D = 32


def _trunk() -> Hiera:
    return Hiera(embed_dim=16, num_heads=1, stages=(1, 2, 2, 1), global_att_blocks=(2, 4),
                 window_pos_embed_bkg_spatial_size=(4, 4), window_spec=(4, 4, 4, 2))



def _check_trunk(rec, rec_tokens, maps, batch: int, image: tuple[int, int], prefix: str, call: int = -1) -> None:
    assert rec.layers == [f"{prefix}blocks.{i}.attn" for i in range(6)] and rec.skipped == {}
    assert len(maps) == 6
    height, width = image[0] // 4, image[1] // 4
    tokens = rec_tokens.calls[call]
    for layer, (probabilities, (window, q, heads), stride) in enumerate(zip(maps, BLOCKS, INPUT_STRIDES,
                                                                          strict=True)):
        grid, mad, entropy = pooled_window_reference(probabilities, batch, height, width, window, q, stride)
        assert probabilities.shape[1] == heads
        # Far from uniform: a token at a wrong cell would change the values.
        assert float(entropy.mean()) < 0.75 * math.log(probabilities.shape[-1])
        geometry = rec.geometry[layer]
        assert geometry.grid == grid and geometry.stride == (stride * q, stride * q) and geometry.heads == heads
        torch.testing.assert_close(tokens.per_layer[layer].double(), mad, **TOL)
        torch.testing.assert_close(tokens.statistics["entropy"][layer].double(), entropy, **TOL)
        if call == -1:
            torch.testing.assert_close(rec.per_layer[layer].double(), mad.mean(-1), **TOL)
            # rec.stats stacks the layers, heads padded with NaN to the widest layer's (8).
            entropies = rec.stats["entropy"][layer].double()
            torch.testing.assert_close(entropies[:, :heads], entropy.mean(-1), **TOL)
            assert entropies[:, heads:].isnan().all()
        if q > 1:  # the next block's map: the model keeps floor(H / q) rows
            height, width = height // q, width // q


@pytest.mark.parametrize("image", [(64, 64), (48, 64)], ids=["whole-windows", "padded-48x64"])
def test_hiera_trunk_matches_its_own_attention(image):
    torch.manual_seed(0)
    trunk = hiera_random_tables(_trunk()).eval()
    pixels = torch.randn(2, 3, *image)
    maps = sdpa_probabilities(lambda: trunk(pixels))
    with torch.no_grad():
        plain = trunk(pixels)
        with vitmad.record(trunk, stats=STATS) as rec:
            recorded = trunk(pixels)
        with vitmad.record(trunk, stats=STATS, reduction="none") as rec_tokens:
            trunk(pixels)
    assert all(torch.equal(a, b) for a, b in zip(plain, recorded, strict=True))
    _check_trunk(rec, rec_tokens, maps, 2, image, "")


def _sam2() -> SAM2Base:
    """A tiny SAM2Base built as sam2.1_hiera_t.yaml builds it (32 wide, 64 px images)."""
    torch.manual_seed(0)
    trunk = _trunk()
    neck = FpnNeck(position_encoding=PositionEmbeddingSine(num_pos_feats=D, normalize=True), d_model=D,
                   backbone_channel_list=trunk.channel_list, fpn_top_down_levels=[2, 3], fpn_interp_model="nearest")

    def rope(**kwargs) -> RoPEAttention:
        return RoPEAttention(rope_theta=10000.0, feat_sizes=[4, 4], embedding_dim=D, num_heads=1, downsample_rate=1,
                             dropout=0.0, **kwargs)

    layer = MemoryAttentionLayer(activation="relu", dim_feedforward=64, dropout=0.0, pos_enc_at_attn=False,
                                 self_attention=rope(), d_model=D, pos_enc_at_cross_attn_keys=True,
                                 pos_enc_at_cross_attn_queries=False,
                                 cross_attention=rope(rope_k_repeat=True, kv_in_dim=16))
    memory_encoder = MemoryEncoder(out_dim=16,
                                   position_encoding=PositionEmbeddingSine(num_pos_feats=16, normalize=True),
                                   mask_downsampler=MaskDownSampler(kernel_size=3, stride=2, padding=1, embed_dim=D,
                                                                    total_stride=16),
                                   fuser=Fuser(CXBlock(dim=D, kernel_size=7, padding=3), num_layers=1))
    model = SAM2Base(ImageEncoder(trunk, neck, scalp=1), MemoryAttention(d_model=D, pos_enc_at_input=True, layer=layer,
                                                                         num_layers=1),
                     memory_encoder, image_size=64, num_maskmem=2, use_high_res_features_in_sam=True,
                     multimask_output_in_sam=True, use_obj_ptrs_in_encoder=True, pred_obj_scores=True,
                     pred_obj_scores_mlp=True, fixed_no_obj_ptr=True, use_mlp_for_obj_ptr_proj=True,
                     directly_add_no_mem_embed=True)
    return hiera_random_tables(model).eval()


def test_sam2_base_and_image_predictor_record_the_trunk():
    """forward_image and SAM2ImagePredictor.set_image (which calls it) record the trunk alone, by default; the
    features and the predicted masks unchanged, bit for bit."""
    model = _sam2()
    pixels = torch.randn(2, 3, 64, 64)
    maps = sdpa_probabilities(lambda: model.forward_image(pixels))
    with torch.no_grad():
        plain = model.forward_image(pixels)["vision_features"]
        with vitmad.record(model, stats=STATS) as rec:
            recorded = model.forward_image(pixels)["vision_features"]
        with vitmad.record(model, stats=STATS, reduction="none") as rec_tokens:
            model.forward_image(pixels)
    assert torch.equal(plain, recorded)
    _check_trunk(rec, rec_tokens, maps, 2, (64, 64), "image_encoder.trunk.")

    predictor = SAM2ImagePredictor(model)
    # The predictor's feature sizes are those of 1024 px images (256, 128, 64 cells a side); these are 64 px.
    predictor._bb_feat_sizes = [(16, 16), (8, 8), (4, 4)]
    image = (torch.rand(40, 56, 3) * 255).to(torch.uint8).numpy()
    points = dict(point_coords=numpy.array([[20, 12]]), point_labels=numpy.array([1]))
    maps = sdpa_probabilities(lambda: predictor.set_image(image))
    predictor.set_image(image)
    masks = predictor.predict(**points)
    with vitmad.record(model, stats=STATS, reduction="none") as rec_tokens:
        predictor.set_image(image)
        recorded = predictor.predict(**points)
    assert all((a == b).all() for a, b in zip(masks, recorded, strict=True))
    _check_trunk(rec_tokens, rec_tokens, maps, 1, (64, 64), "image_encoder.trunk.", call=0)


SAM2_TWO_WAY = "two-way transformer of the mask decoder (sam2 TwoWayTransformer): "


def test_mask_decoder_and_memory_attention_named_in_layers():
    """The mask decoder's two-way attention and the memory attention's cross-attention to the memory bank are
    skipped with their reasons; the memory attention's self-attention over the current frame, called without the
    image encoder that gives it the frame's map, is refused when it runs (test_record_sam2_memory.py places it in
    tracking)."""
    model = _sam2()
    pixels = torch.randn(1, 3, 64, 64)
    with torch.no_grad(), vitmad.record(model, layers=["image_encoder.*", "sam_mask_decoder.*",
                                                       "memory_attention.layers.0.cross_attn_image"]) as rec:
        model.forward_image(pixels)
    assert rec.layers == [f"image_encoder.trunk.blocks.{i}.attn" for i in range(6)]
    two_way = "sam_mask_decoder.transformer"
    queries_off = "cross-attention from the prompt tokens to the image embedding: its queries have no cell on the image"
    expected = {}
    for i in range(2):
        expected[f"{two_way}.layers.{i}.self_attn"] = SAM2_TWO_WAY + (
            "self-attention of the prompt (point/box) and output tokens, none of which has a cell on the image")
        expected[f"{two_way}.layers.{i}.cross_attn_token_to_image"] = SAM2_TWO_WAY + queries_off
        expected[f"{two_way}.layers.{i}.cross_attn_image_to_token"] = SAM2_TWO_WAY + (
            "cross-attention from the image embedding to the prompt tokens: its keys have no cell on the image")
    expected[f"{two_way}.final_attn_token_to_image"] = SAM2_TWO_WAY + queries_off
    expected["memory_attention.layers.0.cross_attn_image"] = (
        "memory attention cross-attention (sam2 MemoryAttentionLayer.cross_attn_image): the current frame's tokens "
        "attend to the memory bank, other frames' memories and object-pointer tokens, keys that are no cells of the "
        "current frame, so it has no MAD")
    assert rec.skipped == expected

    # The memory attention as _prepare_memory_conditioned_features calls it: the current frame's 4 x 4 map
    # flattened, sequence first, and 2 memory frames of it.
    current, position = torch.randn(16, 1, D), torch.randn(16, 1, D)
    memory, memory_position = torch.randn(32, 1, 16), torch.randn(32, 1, 16)
    with pytest.raises(ValueError, match=r"memory_attention\.layers\.0\.self_attn \(RoPEAttention\) of SAM2Base: its "
                                         r"ImageEncoder did not run in this call"):
        with torch.no_grad(), vitmad.record(model, layers=["memory_attention.*"]):
            model.memory_attention(curr=[current], curr_pos=[position], memory=memory, memory_pos=memory_position)
