"""vitmad.record on the ``sam2`` package's video tracking (``SAM2VideoPredictor``: its memory attention's
self-attention) and its automatic mask generator, against the model's own attention.

The geometry, from the package's source (sam2 1.1.0): ``SAM2VideoPredictor`` resizes every frame to ``image_size``
square (``load_video_frames``); ``_get_image_feature`` runs ``forward_image`` on a frame whose features are not
cached (the cache holds the latest frame alone) and ``_prepare_backbone_features`` flattens each kept FPN level
row-major (``flatten(2).permute(2, 0, 1)``). ``_prepare_memory_conditioned_features`` hands ``current_vision_feats``
to ``MemoryAttention``, whose layers' ``self_attn`` (``RoPEAttention``: its RoPE rotates q and k, it moves no token)
attend over ``current_vision_feats[-1]``, the top-level map ``feat_sizes[-1]``: ``ImageEncoder`` drops the last
``scalp`` (1) of the trunk's four stage maps, so that map is Hiera's stage 2, the 4 px patch grid pooled twice:
stride 16, a 128 px frame gives 8 x 8 tokens; token ``(r, c)`` at ``((r + 0.5) 16, (c + 0.5) 16)`` pixels. The
first frame is clicked: a conditioning frame, whose features skip the memory attention
(``directly_add_no_mem_embed``); every later frame runs each layer once per object (``propagate_in_video`` loops
over the objects, batch 1 each, the second reading the frame's cached features). ``cross_attn_image`` attends to
other frames' memories and object pointers: skipped.

The reference is ``softmax(q k^T / sqrt(d))`` in float64 of the q and k each memory self-attention hands
``F.scaled_dot_product_attention`` (patched in ``sam2/modeling/sam/transformer.py``'s namespace alone).
"""

from __future__ import annotations

import math
import os
import types

import numpy
import pytest
import torch
from torch.nn import functional

import vitmad
from conftest import sharpened

pytest.importorskip("sam2")
PIL = pytest.importorskip("PIL.Image")
from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator  # noqa: E402
from sam2.modeling.backbones import hieradet  # noqa: E402
from sam2.modeling.backbones.hieradet import Hiera  # noqa: E402
from sam2.modeling.backbones.image_encoder import FpnNeck, ImageEncoder  # noqa: E402
from sam2.modeling.memory_attention import MemoryAttention, MemoryAttentionLayer  # noqa: E402
from sam2.modeling.memory_encoder import CXBlock, Fuser, MaskDownSampler, MemoryEncoder  # noqa: E402
from sam2.modeling.position_encoding import PositionEmbeddingSine  # noqa: E402
from sam2.modeling.sam import transformer as sam2_transformer  # noqa: E402
from sam2.modeling.sam.transformer import RoPEAttention  # noqa: E402
from sam2.sam2_video_predictor import SAM2VideoPredictor  # noqa: E402

TOL = {"rtol": 1e-5, "atol": 1e-4}  # atol in pixels or nats; float32 q and k
SIZE, FRAMES, D = 128, 4, 32
MAP, STRIDE = 8, 16  # the memory attention's map: 128 / 16 cells a side
SELF = [f"memory_attention.layers.{i}.self_attn" for i in range(2)]
CROSS = [f"memory_attention.layers.{i}.cross_attn_image" for i in range(2)]


def _predictor() -> SAM2VideoPredictor:
    """A tiny SAM2VideoPredictor built as sam2.1_hiera_t.yaml builds it (32 wide, two memory-attention layers of
    two heads, 128 px frames), random weights far from uniform attention."""
    torch.manual_seed(0)
    trunk = Hiera(embed_dim=16, num_heads=1, stages=(1, 2, 2, 1), global_att_blocks=(2, 4),
                  window_pos_embed_bkg_spatial_size=(4, 4), window_spec=(4, 4, 4, 2))
    neck = FpnNeck(position_encoding=PositionEmbeddingSine(num_pos_feats=D, normalize=True), d_model=D,
                   backbone_channel_list=trunk.channel_list, fpn_top_down_levels=[2, 3], fpn_interp_model="nearest")

    def rope(**kwargs) -> RoPEAttention:
        return RoPEAttention(rope_theta=10000.0, feat_sizes=[MAP, MAP], embedding_dim=D, num_heads=2,
                             downsample_rate=1, dropout=0.0, **kwargs)

    layer = MemoryAttentionLayer(activation="relu", dim_feedforward=64, dropout=0.0, pos_enc_at_attn=False,
                                 self_attention=rope(), d_model=D, pos_enc_at_cross_attn_keys=True,
                                 pos_enc_at_cross_attn_queries=False,
                                 cross_attention=rope(rope_k_repeat=True, kv_in_dim=16))
    memory_encoder = MemoryEncoder(out_dim=16, in_dim=D,
                                   position_encoding=PositionEmbeddingSine(num_pos_feats=16, normalize=True),
                                   mask_downsampler=MaskDownSampler(kernel_size=3, stride=2, padding=1, embed_dim=D,
                                                                    total_stride=16),
                                   fuser=Fuser(CXBlock(dim=D, kernel_size=7, padding=3), num_layers=1))
    model = SAM2VideoPredictor(
        image_encoder=ImageEncoder(trunk, neck, scalp=1),
        memory_attention=MemoryAttention(d_model=D, pos_enc_at_input=True, layer=layer, num_layers=2),
        memory_encoder=memory_encoder, image_size=SIZE, num_maskmem=3, use_high_res_features_in_sam=True,
        multimask_output_in_sam=True, use_obj_ptrs_in_encoder=True, pred_obj_scores=True, pred_obj_scores_mlp=True,
        fixed_no_obj_ptr=True, use_mlp_for_obj_ptr_proj=True, directly_add_no_mem_embed=True)
    sharpened(model)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "pos_embed" in name:  # zeros at init
                parameter.normal_()
        for module in model.modules():
            if isinstance(module, torch.nn.Conv2d):
                module.weight.normal_(std=0.25)
        # Random frames give the memory self-attention content without any layout: drawn alone, its attention
        # is near uniform over the map. One shared, large query and key bias leaves RoPE's relative phase to
        # decide: each token attends most to its neighbours, so a token at a wrong cell would show.
        for layer in model.memory_attention.layers:
            bias = torch.randn(D) * 1.5
            for projection in (layer.self_attn.q_proj, layer.self_attn.k_proj):
                projection.weight.mul_(0.2)
                projection.bias.copy_(bias)
    return model


@pytest.fixture(scope="module")
def video(tmp_path_factory) -> str:
    """A folder of four 96 x 120 JPEG frames, ``<index>.jpg`` as the package reads them."""
    folder = tmp_path_factory.mktemp("frames")
    pixels = numpy.random.default_rng(0).integers(0, 256, (FRAMES, 96, 120, 3), dtype=numpy.uint8)
    for index, frame in enumerate(pixels):
        PIL.fromarray(frame).save(os.path.join(folder, f"{index:05d}.jpg"))
    return str(folder)


def _track(model: SAM2VideoPredictor, video: str, objects: int) -> list[torch.Tensor]:
    """Each frame's masks, one clicked point per object on frame 0, then propagated."""
    state = model.init_state(video)
    for obj_id, point in list(zip((1, 2), ([30.0, 40.0], [90.0, 70.0]), strict=True))[:objects]:
        model.add_new_points_or_box(state, frame_idx=0, obj_id=obj_id, points=numpy.array([point], numpy.float32),
                                    labels=numpy.array([1], numpy.int32))
    return [masks.clone() for _, _, masks in model.propagate_in_video(state)]


class _SpiedFunctional(types.ModuleType):
    """torch.nn.functional for a sam2 module's namespace, whose SDPA keeps the float64 probabilities of the calls
    made while one of ``modules`` runs (no mask, default scale: as sam2's attention calls it)."""

    def __init__(self, modules: list[torch.nn.Module]):
        super().__init__("spied_functional")
        self.found: list[torch.Tensor] = []
        self._active = [False]
        for module in modules:
            module.register_forward_pre_hook(lambda *_: self._active.__setitem__(0, True))
            module.register_forward_hook(lambda *_: self._active.__setitem__(0, False))

    def __getattr__(self, name):
        return getattr(functional, name)

    def scaled_dot_product_attention(self, q, k, v, *args, **kwargs):
        if self._active[0]:
            assert not args and set(kwargs) <= {"dropout_p"} and not kwargs.get("dropout_p")
            scores = q.double() @ k.double().transpose(-2, -1) / math.sqrt(q.shape[-1])
            self.found.append(scores.softmax(-1))
        return functional.scaled_dot_product_attention(q, k, v, *args, **kwargs)


def _self_attention_probabilities(video: str, objects: int) -> list[torch.Tensor]:
    """``[1, 2, 64, 64]`` per memory self-attention call of a tracking run, in call order (a fresh model: the
    spy's hooks stay on it)."""
    model = _predictor()
    spied = _SpiedFunctional([model.get_submodule(name) for name in SELF])
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sam2_transformer, "F", spied)
        _track(model, video, objects)
    return spied.found


def _centres(grid: tuple[int, int], stride: float) -> torch.Tensor:
    rows, cols = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
    return (torch.stack([rows, cols], -1).reshape(-1, 2).double() + 0.5) * stride


def _expected(probabilities: torch.Tensor, grid: tuple[int, int], stride: float) -> dict[str, torch.Tensor]:
    """``{statistic: [B, H]}`` of one call's ``[B, H, N, N]`` probabilities over a row-major map."""
    distance = torch.cdist(_centres(grid, stride), _centres(grid, stride))
    return {"mad": (probabilities * distance).sum(-1).mean(-1),
            "entropy": -torch.special.xlogy(probabilities, probabilities).sum(-1).mean(-1)}


def _heads(values: torch.Tensor, heads: int) -> torch.Tensor:
    """A layer's ``[B, heads]`` of a call's values, whose heads are padded with NaN to the widest layer's (the
    trunk's last stage has 8)."""
    assert values[:, heads:].isnan().all()
    return values[:, :heads].double()


@pytest.mark.parametrize("objects", [1, 2])
def test_tracking_records_the_memory_self_attention_on_the_stride_16_map(video, objects):
    """Recorded with the image encoder's trunk (whose patch embedding starts each frame's call), each frame after
    the first is a call holding each memory self-attention layer once per object, at its cell of the 8 x 8 map."""
    reference = _self_attention_probabilities(video, objects)
    assert len(reference) == 2 * (FRAMES - 1) * objects and all(p.shape == (1, 2, 64, 64) for p in reference)
    model = _predictor()
    plain = _track(model, video, objects)
    with vitmad.record(model, layers=["image_encoder.*", "memory_attention.*"], stats=["entropy"]) as rec:
        recorded = _track(model, video, objects)
    assert all(torch.equal(a, b) for a, b in zip(plain, recorded, strict=True))
    assert rec.skipped == dict.fromkeys(CROSS, rec.skipped[CROSS[0]]) and "memory bank" in rec.skipped[CROSS[0]]
    # init_state encodes frame 0 (the clicked frame: no memory attention), propagation frames 1 to 3.
    assert len(rec.calls) == FRAMES and not any(name in SELF for name in rec.calls[0].layers)
    probabilities = iter(reference)
    for call in rec.calls[1:]:
        memory = [i for i, name in enumerate(call.layers) if name in SELF]
        assert [call.layers[i] for i in memory] == [name for _ in range(objects) for name in SELF]
        for i in memory:
            geometry = call.geometry[i]
            assert geometry.grid == (MAP, MAP) and geometry.stride == (STRIDE, STRIDE)
            assert geometry.attention == "global" and geometry.heads == 2
            p = next(probabilities)
            expected = _expected(p, (MAP, MAP), STRIDE)
            torch.testing.assert_close(_heads(call.mad[i], 2), expected["mad"], **TOL)
            torch.testing.assert_close(_heads(call.stat("entropy")[i], 2), expected["entropy"], **TOL)
            # Far from uniform: the tokens read in another order (no isometry of the grid, as a transpose would
            # be) give MADs pixels away.
            order = torch.randperm(64, generator=torch.Generator().manual_seed(0))
            shuffled = _expected(p[..., order][..., order, :], (MAP, MAP), STRIDE)["mad"]
            assert (shuffled - _heads(call.mad[i], 2)).abs().max() > 1.0
    assert next(probabilities, None) is None


def test_the_default_records_the_trunk_alone(video):
    model = _predictor()
    with vitmad.record(model) as rec:
        _track(model, video, 1)
    assert len(rec.calls) == FRAMES
    assert all(name.startswith("image_encoder.trunk.blocks.") for call in rec.calls for name in call.layers)


def test_a_frame_whose_features_come_from_the_cache_is_refused(video):
    """Tracking frame 3 again reads its features from the state's cache (the latest frame's): the image encoder
    does not run, so the map and the image of that call are unseen."""
    model = _predictor()
    state = model.init_state(video)
    model.add_new_points_or_box(state, frame_idx=0, obj_id=1, points=numpy.array([[30.0, 40.0]], numpy.float32),
                                labels=numpy.array([1], numpy.int32))
    list(model.propagate_in_video(state))
    with vitmad.record(model, layers=["image_encoder.*", "memory_attention.*"]), \
            pytest.raises(ValueError, match="did not run in this call"):
        list(model.propagate_in_video(state, start_frame_idx=FRAMES - 1, max_frame_num_to_track=0))


def test_the_memory_attention_recorded_without_its_sam2_base_is_refused():
    model = _predictor()
    current, position = torch.randn(64, 1, D), torch.randn(64, 1, D)
    memory, memory_position = torch.randn(128, 1, 16), torch.randn(128, 1, 16)
    with vitmad.record(model.memory_attention, layers=["layers.0.self_attn"]), torch.no_grad(), \
            pytest.raises(ValueError, match="recorded without the SAM2Base"):
        model.memory_attention(curr=[current], curr_pos=[position], memory=memory, memory_pos=memory_position)


def test_automatic_mask_generator_records_the_trunk_per_crop():
    """SAM2AutomaticMaskGenerator runs SAM2ImagePredictor.set_image once per crop (the whole image, then 2 x 2
    crops), each resized to the 128 px square: one call each, the trunk alone, the masks unchanged. The trunk's
    global blocks (2 and 4, unpooled) attend over the whole 16 x 16 map of 8 px cells and 8 x 8 map of 16 px cells,
    checked against Hiera's own attention (SDPA patched in ``hieradet``'s namespace)."""
    model = _predictor()
    generator = SAM2AutomaticMaskGenerator(model, points_per_side=4, points_per_batch=16, pred_iou_thresh=0.0,
                                           stability_score_thresh=0.0, crop_n_layers=1)
    # The predictor's feature sizes are those of 1024 px images; these are 128 px.
    generator.predictor._bb_feat_sizes = [(32, 32), (16, 16), (8, 8)]
    image = numpy.random.default_rng(1).integers(0, 256, (90, 110, 3), dtype=numpy.uint8)
    spied = _SpiedFunctional([model.image_encoder.trunk.blocks[i].attn for i in (2, 4)])
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(hieradet, "F", spied)
        plain = generator.generate(image)
    with vitmad.record(model, stats=["entropy"]) as rec:
        recorded = generator.generate(image)
    assert plain and len(plain) == len(recorded)
    for a, b in zip(plain, recorded, strict=True):
        assert a.keys() == b.keys() and all(numpy.array_equal(numpy.asarray(a[k]), numpy.asarray(b[k])) for k in a)
    assert len(rec.calls) == 5 and len(spied.found) == 2 * 5
    trunk = [f"image_encoder.trunk.blocks.{i}.attn" for i in range(6)]
    assert all(call.layers == trunk for call in rec.calls) and rec.skipped == {}
    probabilities = iter(spied.found)
    for call in rec.calls:
        for layer, grid, stride in ((2, (16, 16), 8), (4, (8, 8), 16)):
            p = next(probabilities)
            assert p.shape[-1] == grid[0] * grid[1] and call.geometry[layer].grid == grid
            expected = _expected(p, grid, stride)
            heads = p.shape[1]
            torch.testing.assert_close(_heads(call.mad[layer], heads), expected["mad"], **TOL)
            torch.testing.assert_close(_heads(call.stat("entropy")[layer], heads), expected["entropy"], **TOL)
