"""vitmad.record on the memory attention of SAM2-video, EdgeTAM-video and SAM3-tracker-video, against their own eager
attention.

The reference places the tokens by the geometry written here from the modeling files (transformers 5.25): on a frame
that is not a conditioning frame, ``memory_attention.layers.<i>.self_attn`` attends over ``current_vision_feats[-1]``,
the vision encoder's last ``fpn_hidden_states`` map flattened row-major (``flatten(2).permute(2, 0, 1)``), one object
at a time (batch 1). That map is backbone stage ``num_feature_levels - 1`` = 2 of the FPN: a 128 x 128 frame gives
``8 x 8`` tokens at stride 16 (Hiera: patch stride 4, then 2x query pooling at stages 1 and 2; RepViT: reductions
4, 8, 16, 32). SAM3-tracker-video drops the vision encoder's last FPN level (scale 0.5) first: its map is the
scale-1 level, the ViT's 16 px patch grid, 8 x 8 too. Token ``(r, c)`` sits at ``((r + 0.5) 16, (c + 0.5) 16)``
pixels. Per query, float64, from the probabilities the model's eager attention computed. ``cross_attn_image`` attends
to other frames' memories and object pointers: skipped.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("timm")

import vitmad  # noqa: E402
from conftest import sharpened  # noqa: E402

TOL = {"rtol": 1e-5, "atol": 1e-4}  # atol in pixels or nats; MADs here are 20 to 110 px
SIZE, FRAMES = 128, 3
SELF = "memory_attention.layers.0.self_attn"
CROSS = "memory_attention.layers.0.cross_attn_image"

_COMMON = dict(
    prompt_encoder_config=dict(hidden_size=128, image_size=SIZE, patch_size=16, mask_input_channels=4),
    mask_decoder_config=dict(hidden_size=128, mlp_dim=64, num_hidden_layers=1, num_attention_heads=2,
                             iou_head_hidden_dim=32),
    image_size=SIZE, num_maskmem=3, memory_attention_hidden_size=128, memory_attention_num_layers=1,
    memory_attention_num_attention_heads=2, memory_attention_rope_feat_sizes=[8, 8], memory_encoder_hidden_size=128,
    memory_encoder_output_channels=64, mask_downsampler_embed_dim=128, memory_fuser_num_layers=1,
    memory_fuser_embed_dim=128, memory_fuser_intermediate_dim=64,
)


def _sam2_video():
    from transformers.models.sam2_video import configuration_sam2_video as config
    from transformers.models.sam2_video import modeling_sam2_video as modeling

    backbone = dict(model_type="sam2_hiera_det_model", hidden_size=16, num_attention_heads=1, image_size=[SIZE, SIZE],
                    blocks_per_stage=[1, 2, 1, 1], embed_dim_per_stage=[16, 32, 64, 128],
                    num_attention_heads_per_stage=[1, 1, 2, 2], window_size_per_stage=[4, 4, 4, 4],
                    global_attention_blocks=[2], window_positional_embedding_background_size=[4, 4])
    cfg = config.Sam2VideoConfig(
        vision_config=dict(model_type="sam2_vision_model", backbone_config=backbone,
                           backbone_channel_list=[128, 64, 32, 16],
                           backbone_feature_sizes=[[32, 32], [16, 16], [8, 8]], fpn_hidden_size=128),
        memory_attention_feed_forward_hidden_size=64, **_COMMON)
    torch.manual_seed(0)
    return sharpened(modeling.Sam2VideoModel(cfg)), modeling, modeling.Sam2VideoInferenceSession


def _edgetam_video():
    from transformers.models.edgetam_video import (
        configuration_edgetam_video as config,
    )
    from transformers.models.edgetam_video import (
        modeling_edgetam_video as modeling,
    )

    backbone = transformers.TimmWrapperConfig(
        architecture="repvit_m0_9", model_args={"in_chans": 3, "features_only": True, "out_indices": [0, 1, 2, 3]})
    cfg = config.EdgeTamVideoConfig(
        vision_config=dict(model_type="edgetam_vision_model", backbone_config=backbone,
                           backbone_channel_list=[384, 192, 96, 48],
                           backbone_feature_sizes=[[32, 32], [16, 16], [8, 8]], fpn_hidden_size=128),
        memory_attention_mlp_hidden_size=64, memory_attention_rope_k_sizes=[4, 4], perceiver_resampler_num_latents=8,
        perceiver_resampler_num_latents_2d=16, perceiver_resampler_num_layers=1, **_COMMON)
    torch.manual_seed(0)
    return sharpened(modeling.EdgeTamVideoModel(cfg)), modeling, modeling.EdgeTamVideoInferenceSession


def _sam3_tracker_video():
    from transformers.models.sam3_tracker_video import configuration_sam3_tracker_video as config
    from transformers.models.sam3_tracker_video import modeling_sam3_tracker_video as modeling

    vit = dict(model_type="sam3_vit_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=2, patch_size=16, image_size=[SIZE, SIZE], pretrain_image_size=64, window_size=3,
               global_attn_indexes=[1])
    cfg = config.Sam3TrackerVideoConfig(
        vision_config=dict(model_type="sam3_vision_model", backbone_config=vit, fpn_hidden_size=128,
                           backbone_feature_sizes=[[32, 32], [16, 16], [8, 8]]),
        memory_attention_feed_forward_hidden_size=64, **_COMMON)
    torch.manual_seed(0)
    return sharpened(modeling.Sam3TrackerVideoModel(cfg)), modeling, modeling.Sam3TrackerVideoInferenceSession


_MODELS = {"sam2_video": _sam2_video, "edgetam_video": _edgetam_video, "sam3_tracker_video": _sam3_tracker_video}


def _run(model, session_cls, frames=range(FRAMES), session=None):
    """The masks of each frame of a fixed random video with one clicked object (a point on frame 0)."""
    if session is None:
        video = torch.randn(FRAMES, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
        session = session_cls(video=video, video_height=SIZE, video_width=SIZE, dtype=torch.float32)
        index = session.obj_id_to_idx(1)
        session.add_point_inputs(index, 0, {"point_coords": torch.tensor([[[[20.0, 30.0]]]]),
                                            "point_labels": torch.ones(1, 1, 1, dtype=torch.int32)})
        session.obj_with_new_inputs = [1]
    with torch.no_grad():
        return [model(inference_session=session, frame_idx=f).pred_masks for f in frames], session


def _eager_self_attention(model, modeling, session_cls) -> list[torch.Tensor]:
    """``[1, H, 64, 64]`` float64 probabilities of the memory attention's self-attention, one per frame it ran on."""
    original, found = modeling.eager_attention_forward, []
    target = model.get_submodule(SELF)

    def capture(module, *args, **kwargs):
        output, probabilities = original(module, *args, **kwargs)
        if module is target:
            found.append(probabilities.detach().double())
        return output, probabilities

    model.set_attn_implementation("eager")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(modeling, "eager_attention_forward", capture)
        _run(model, session_cls)
    return found


def _centres(grid: tuple[int, int], stride: int) -> torch.Tensor:
    rows, cols = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
    return (torch.stack([rows, cols], -1).reshape(-1, 2).double() + 0.5) * stride


def _expected(probabilities: torch.Tensor) -> dict[str, torch.Tensor]:
    """``{statistic: [B, H]}`` of one call's ``[B, H, 64, 64]`` probabilities over the 8 x 8 map of stride 16."""
    distance = torch.cdist(_centres((8, 8), 16), _centres((8, 8), 16))
    return {"mad": (probabilities * distance).sum(-1).mean(-1),
            "entropy": -torch.special.xlogy(probabilities, probabilities).sum(-1).mean(-1)}


@pytest.mark.parametrize("name", list(_MODELS))
@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_memory_self_attention_equals_its_eager_attention_on_the_stride_16_map(name, attn_implementation):
    """Frame 0 is the clicked (conditioning) frame: no memory attention; frames 1 and 2 run it once each."""
    model, modeling, session_cls = _MODELS[name]()
    reference = _eager_self_attention(model, modeling, session_cls)
    assert len(reference) == 2 and all(p.shape == (1, 2, 64, 64) for p in reference)
    model.set_attn_implementation(attn_implementation)
    plain, _ = _run(model, session_cls)
    with vitmad.record(model, layers=[SELF], stats=["mad", "entropy"]) as rec:
        recorded, _ = _run(model, session_cls)
    assert all(torch.equal(a, b) for a, b in zip(plain, recorded, strict=True))
    assert rec.layers == [SELF] and rec.skipped == {}
    assert all(g.grid == (8, 8) and g.stride == (16.0, 16.0) and g.attention == "global" for g in rec.geometry)
    ran = [call for call in rec.calls if call.layers]
    assert len(rec.calls) == FRAMES and len(ran) == 2
    for call, probabilities in zip(ran, reference, strict=True):
        expected = _expected(probabilities)
        torch.testing.assert_close(call.mad.double(), expected["mad"][None], **TOL)
        torch.testing.assert_close(call.stat("entropy").double(), expected["entropy"][None], **TOL)
        # The attention is far from uniform: the tokens read in another order (no isometry of the grid, as a
        # transpose would be) give MADs pixels away.
        order = torch.randperm(64, generator=torch.Generator().manual_seed(0))
        shuffled = _expected(probabilities[..., order][..., order, :])["mad"][None]
        assert (shuffled - call.mad.double()).abs().max() > 1.0


@pytest.mark.parametrize("name", list(_MODELS))
def test_memory_cross_attention_is_skipped_and_the_default_records_the_vision_encoder_alone(name):
    """The default (layers=None) leaves the memory attention out: SAM2's Hiera is recorded alone, EdgeTAM's RepViT
    has no attention, so its default is refused, naming the layers outside it."""
    model, _, session_cls = _MODELS[name]()
    with vitmad.record(model, layers=["memory_attention.*"]) as rec:
        _run(model, session_cls)
    assert rec.layers == [SELF] and list(rec.skipped) == [CROSS]
    assert "memory bank" in rec.skipped[CROSS] and "object-pointer tokens" in rec.skipped[CROSS]
    if name == "edgetam_video":
        with pytest.raises(ValueError, match="found no attention layer in vision_encoder.*memory attention"):
            vitmad.record(model).__enter__()
        return
    with vitmad.record(model) as rec:
        _run(model, session_cls)
    assert rec.layers and all(layer.startswith("vision_encoder.") for layer in rec.layers)


def test_a_frame_whose_features_come_from_the_cache_is_refused():
    """The session caches the latest frame's features: running frame 2 again skips the vision encoder, so the map
    and the image of that call are unseen."""
    model, _, session_cls = _sam2_video()
    _, session = _run(model, session_cls)
    with vitmad.record(model, layers=[SELF]), pytest.raises(ValueError, match="did not run in this call"):
        _run(model, session_cls, frames=[2], session=session)
    # After frames that ran the encoder in the same recording: the cached frame's attention joined the call before,
    # placed on that call's map (QA 223), where it is now refused as in a recording of its own.
    with vitmad.record(model, layers=[SELF]) as rec:
        _run(model, session_cls, frames=[1, 2], session=session)
        with pytest.raises(ValueError, match="did not run in this call"):
            _run(model, session_cls, frames=[2], session=session)
    assert [len(call.layers) for call in rec.calls] == [1, 1]


def test_two_objects_each_run_the_self_attention_on_the_frame_in_one_call():
    """The model runs each object alone (batch_size=1): per frame the layer runs once per object, kept as two
    entries of the call (the same frame's tokens, each at its cell)."""
    model, modeling, session_cls = _sam2_video()
    video = torch.randn(FRAMES, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))

    def run(model):
        session = session_cls(video=video, video_height=SIZE, video_width=SIZE, dtype=torch.float32)
        for obj_id, point in ((1, [20.0, 30.0]), (2, [90.0, 100.0])):
            session.add_point_inputs(session.obj_id_to_idx(obj_id), 0, {
                "point_coords": torch.tensor([[[point]]]), "point_labels": torch.ones(1, 1, 1, dtype=torch.int32)})
        session.obj_with_new_inputs = [1, 2]
        with torch.no_grad():
            return [model(inference_session=session, frame_idx=f).pred_masks for f in range(FRAMES)]

    original, reference = modeling.eager_attention_forward, []

    def capture(module, *args, **kwargs):
        output, probabilities = original(module, *args, **kwargs)
        if module is model.get_submodule(SELF):
            reference.append(probabilities.detach().double())
        return output, probabilities

    model.set_attn_implementation("eager")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(modeling, "eager_attention_forward", capture)
        run(model)
    model.set_attn_implementation("sdpa")
    plain = run(model)
    with vitmad.record(model, layers=[SELF]) as rec:
        recorded = run(model)
    assert all(torch.equal(a, b) for a, b in zip(plain, recorded, strict=True))
    ran = [call for call in rec.calls if call.layers]
    assert len(ran) == 2 and len(reference) == 4
    for index, call in enumerate(ran):
        expected = torch.stack([_expected(p)["mad"] for p in reference[2 * index:2 * index + 2]])
        torch.testing.assert_close(call.mad.double(), expected, **TOL)


def test_the_memory_attention_recorded_without_its_video_model_is_refused():
    """Recorded alone, the memory attention has no vision encoder beside it to tell its map's stride."""
    model, _, session_cls = _sam2_video()
    with vitmad.record(model.memory_attention, layers=["layers.0.self_attn"]), \
            pytest.raises(ValueError, match="recorded without the Sam2VideoModel and its Sam2VisionModel"):
        _run(model, session_cls)
