"""Copies of a layout's read-only tensors to the attention's device (python/vitmad/recording/placement.py).

A plain ViT's layers share one grid's positions and patch indices; the recorder used to copy them to the GPU for
every layer and call (a pageable host-to-device copy waits for the work queued before it). ``read_only`` marks
the tensors vitmad builds once and never changes, and ``on_device`` copies each of them to a device once. The
"meta" device stands in for a GPU here: a copy to it is a new tensor, as a copy to a GPU is.
"""

from __future__ import annotations

import pytest
import torch

import vitmad
from vitmad.recording.families.plain import _plain_positions
from vitmad.recording.placement import on_device, read_only, select_tokens

timm = pytest.importorskip("timm")

META = torch.device("meta")


def test_a_read_only_tensor_is_copied_once_per_device():
    (positions,) = read_only(torch.rand(5, 2))
    first = on_device(positions, META)
    assert first.device == META and first.shape == positions.shape
    assert on_device(positions, "meta") is first
    assert on_device(positions, positions.device) is positions  # already there: the tensor itself


def test_any_other_tensor_is_copied_every_time():
    """A tensor a user may change between calls (given positions) is never served from a copy."""
    positions = torch.rand(5, 2)
    assert on_device(positions, META) is not on_device(positions, META)
    view = read_only(torch.rand(5, 2))[0][1:]  # a view of a read-only tensor is a tensor of its own
    assert on_device(view, META) is not on_device(view, META)


def test_folds_reuse_the_copy_of_their_index():
    index = read_only(torch.tensor([2, 0, 1]))[0]
    values = torch.rand(1, 2, 4)
    torch.testing.assert_close(select_tokens(index)(values), values[..., [2, 0, 1]], rtol=0, atol=0)
    meta_values = values.to(META)
    select_tokens(index)(meta_values)
    copy = on_device(index, META)
    select_tokens(index)(meta_values)
    assert on_device(index, META) is copy


def test_plain_layout_tensors_are_read_only_and_shared_by_the_layers():
    """Every layer of a plain ViT gets the same cached tensors, marked read-only: one copy per device."""
    positions, index = _plain_positions((14, 14), (16.0, 16.0), 1, 0)
    assert on_device(positions, META) is on_device(positions, META)
    assert on_device(index, META) is on_device(index, META)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False).eval()
    seen = []
    with torch.no_grad(), vitmad.record(model) as rec:
        measure = rec._measure

        def spy(name, placement, *args, **kwargs):
            seen.append(placement.positions)
            return measure(name, placement, *args, **kwargs)

        rec._measure = spy
        model(torch.randn(1, 3, 224, 224))
    assert len(seen) == 12 and all(p is positions for p in seen)


def test_video_layers_share_their_spatial_and_temporal_positions():
    """VideoMAE's layers attend over one tubelet grid: every layer's call gets the same read-only positions in
    space and in time."""
    transformers = pytest.importorskip("transformers")
    config = transformers.VideoMAEConfig(image_size=32, patch_size=8, num_frames=4, tubelet_size=2, hidden_size=32,
                                         num_hidden_layers=3, num_attention_heads=2, intermediate_size=64)
    torch.manual_seed(0)
    model = transformers.VideoMAEModel(config).eval()
    seen = []
    with torch.no_grad(), vitmad.record(model) as rec:
        measure = rec._measure

        def spy(name, placement, *args, **kwargs):
            seen.append((placement.positions, placement.time_positions))
            return measure(name, placement, *args, **kwargs)

        rec._measure = spy
        model(torch.randn(1, 4, 3, 32, 32))
    assert len(seen) == 3
    for positions, times in seen:
        assert positions is seen[0][0] and times is seen[0][1]
        assert on_device(positions, META) is on_device(seen[0][0], META)
        assert on_device(times, META) is on_device(seen[0][1], META)
    assert rec.temporal_mad.shape == (3, 1, 2)
    # Frames and positions were compared once, on the host: the op skips comparing them in every layer.
    from vitmad.ops.arguments import is_trusted_same_tokens

    assert is_trusted_same_tokens(seen[0][1], seen[0][0])


def test_a_video_layout_device_pair_is_compared_on_the_host_and_trusted():
    """The device copies of a video layout's frames and positions are marked as NaN at the same tokens after a
    comparison of their host originals (no wait on a GPU); a pair that differs is left to the op's own check,
    and so are tensors vitmad did not check (a user's)."""
    from vitmad.ops.arguments import is_trusted_same_tokens
    from vitmad.recording.recorder import _trust_same_tokens

    positions, times = torch.rand(5, 2), torch.rand(5, 1)
    positions[0], times[0] = float("nan"), float("nan")
    positions, times = read_only(positions, times, positions=2)
    on_meta = on_device(positions, META), on_device(times, META)
    _trust_same_tokens(times, on_meta[1], positions, on_meta[0])
    assert is_trusted_same_tokens(on_meta[1], on_meta[0])
    other_positions = positions.clone()
    other_positions[3] = float("nan")
    (other_positions,) = read_only(other_positions, positions=1)
    other_on_meta = on_device(other_positions, META)
    _trust_same_tokens(times, on_meta[1], other_positions, other_on_meta)
    assert not is_trusted_same_tokens(on_meta[1], other_on_meta)
    users = torch.rand(5, 1), torch.rand(5, 2)  # not trusted: never marked
    _trust_same_tokens(users[0], users[0], users[1], users[1])
    assert not is_trusted_same_tokens(*users)


def _recording() -> vitmad.Recording:
    return vitmad.record(timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=1).eval())


def test_host_positions_go_to_a_device_once_per_content_checked_and_trusted():
    """Positions a family builds per call (a new tensor each time) reach a device once per distinct content: the
    layers of a stage share one copy; their values are checked on the host and the copy is trusted, so the op
    does not copy it back to check it."""
    from vitmad.ops.arguments import is_trusted_positions

    rec = _recording()
    first = torch.tensor([[float("nan")] * 2, [8.0, 8.0], [8.0, 24.0]])
    copy = rec._to_device(first, META)
    assert copy.device == META and is_trusted_positions(copy)
    assert rec._to_device(first.clone(), META) is copy  # the same values in another tensor: the same copy
    other = first.clone()
    other[1, 0] = 9.0
    assert rec._to_device(other, META) is not copy
    assert rec._to_device(first, "cpu") is first  # nothing to copy on the host (the op checks it as before)


def test_host_positions_are_checked_before_they_are_trusted():
    rec = _recording()
    bad = torch.tensor([[1.0, float("inf")], [2.0, 3.0]])
    with pytest.raises(ValueError, match="positions must not be infinite"):
        rec._to_device(bad, META)
    half = torch.tensor([[1.0, float("nan")], [2.0, 3.0]])
    with pytest.raises(ValueError, match="has 1 of its 2 coordinates NaN"):
        rec._to_device(half, META)


def test_the_copies_a_recording_keeps_are_bounded():
    rec = _recording()
    for i in range(3 * rec._DEVICE_POSITIONS_LIMIT):
        rec._to_device(torch.full((4, 2), float(i)), META)
    assert len(rec._device_positions) <= rec._DEVICE_POSITIONS_LIMIT


def test_small_host_indices_share_one_copy_per_content():
    """A fold's token order built per call (windows, mask units, packed images) reaches a device once per
    distinct content; floating tensors (values a user may give) and large ones are copied as they come."""
    order = torch.tensor([3, 1, 2, 0])
    copy = on_device(order, META)
    assert on_device(order.clone(), META) is copy and copy.dtype == torch.int64
    assert on_device(torch.tensor([3, 1, 0, 2]), META) is not copy
    assert on_device(order.int(), META) is not copy  # another dtype: another copy
    floats = torch.rand(4)
    assert on_device(floats, META) is not on_device(floats, META)
    large = torch.arange(1 << 17)
    assert on_device(large, META) is not on_device(large, META)


def test_what_the_maps_derive_from_trusted_positions_is_derived_once():
    """The tokens with and without a position, which the prefix maps need in every layer, are read from vitmad's own
    (trusted) positions once (on a GPU each reading waits for the queued work); a user's positions are read at
    every call, and an in-place change or another partner derives them anew."""
    from vitmad.ops.stats_op import derived_once

    calls = []

    def compute():
        calls.append(1)
        return len(calls)

    (positions, keys) = read_only(torch.rand(4, 2), torch.rand(6, 2), positions=2)
    assert derived_once(positions, None, "x", compute) == derived_once(positions, None, "x", compute) == 1
    assert derived_once(positions, keys, "x", compute) == 2  # another partner
    assert derived_once(positions, keys, "x", compute) == 2
    keys[0, 0] = 1.0  # an in-place change ends the trust of the keys: derived at every call from now
    assert derived_once(positions, keys, "x", compute) == 3
    assert derived_once(positions, keys, "x", compute) == 4
    users = torch.rand(4, 2)
    assert derived_once(users, None, "x", compute) == 5
    assert derived_once(users, None, "x", compute) == 6


def test_recorded_prefix_maps_read_the_layouts_tokens_once():
    """Every layer of a ViT with a CLS token gives its CLS map; the tokens with a position are found at most once
    for the grid's positions, which the layers share (the layout is cached across recordings: an earlier test
    may have found them already), not once per layer."""
    from unittest import mock

    from vitmad.recording import recorder

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=3, img_size=80, patch_size=16).eval()
    found = mock.Mock(side_effect=recorder._common_prefix_columns)
    with mock.patch.object(recorder, "_common_prefix_columns", found):
        with torch.no_grad(), vitmad.record(model, stats=("prefix_maps",)) as rec:
            model(torch.randn(2, 3, 80, 80))
    assert len(rec.prefix_maps) == 3 and all(m.shape == (2, 3, 1, 25) for m in rec.prefix_maps)
    assert found.call_count <= 1
    positions, _ = _plain_positions((5, 5), (16.0, 16.0), 1, 0)
    assert "prefix_rows" in positions._vitmad_map_tokens


def test_probabilities_on_a_device_are_read_for_a_causal_mask_once_per_layout():
    """The causal check reads values back (a wait for the GPU): on a device once per module and shape, as the
    positions are checked, so a windowed model's later forwards never wait (QA 359: timm's Swin, which computes its
    own softmax, waited once per layer)."""
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False).eval()
    rec = vitmad.record(model)
    on_meta = torch.zeros(1, 3, 5, 5, device=META)
    assert rec._causal_check_due("blocks.0.attn", on_meta)
    assert not rec._causal_check_due("blocks.0.attn", on_meta)
    assert rec._causal_check_due("blocks.1.attn", on_meta)
    assert rec._causal_check_due("blocks.0.attn", torch.zeros(2, 3, 5, 5, device=META))  # another batch: read again
    on_host = torch.zeros(1, 3, 5, 5)
    assert rec._causal_check_due("blocks.0.attn", on_host) and rec._causal_check_due("blocks.0.attn", on_host)


def test_a_windowed_model_run_on_the_meta_device_inside_the_recording():
    # Shape inference (a FLOP or summary tool) on the meta device: the causal check reads no values there (QA 359:
    # Tensor.item() on a meta tensor raised from inside vitmad).
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=112, depths=(1, 1, 1, 1),
                              embed_dim=24, num_heads=(1, 2, 2, 4)).eval()
    x = torch.randn(1, 3, 112, 112)
    with torch.no_grad(), vitmad.record(model) as rec:
        model(x)
        model.to(META)
        assert model(x.to(META)).shape == (1, 1000)
    assert len(rec.calls) == 2 and rec.calls[0].per_layer[0].device.type == "cpu"
