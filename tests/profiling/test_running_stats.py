"""The running float64 statistics over images (vitmad.profiling.stats.RunningStats): the standard deviation from
the sum of squared deviations, merged batch by batch and across processes by Chan's formula, against NumPy's
two-pass float64 standard deviation of the same values; files written before ``m2`` was kept still read."""

from __future__ import annotations

import json

import numpy as np
import torch

from vitmad.profiling.stats import RunningStats, combined_m2


def _values(count: int, seed: int = 0) -> torch.Tensor:
    """``[L=2, count, H=3]`` per-image values that differ by about 1e-7 of their size (an entropy of nearly
    uniform heads, say): where ``total_sq / n - mean^2`` cancels."""
    generator = torch.Generator().manual_seed(seed)
    base = torch.tensor([[2.8, 5.0, 120.0], [0.3, 3.7, 64.0]], dtype=torch.float64)
    return base[:, None, :] * (1 + 1e-7 * torch.randn(2, count, 3, generator=generator, dtype=torch.float64))


def _in_batches(values: torch.Tensor, sizes) -> RunningStats:
    stats, start = RunningStats.empty(values.shape[0], values.shape[2]), 0
    for size in sizes:
        stats = stats.add(values[:, start:start + size])
        start += size
    assert start == values.shape[1]
    return stats


def test_std_of_nearly_equal_values_is_numpys_two_pass_std():
    values = _values(7)
    expected = torch.from_numpy(np.std(values.numpy(), axis=1))  # population std, two passes
    for sizes in ([7], [3, 3, 1], [1] * 7, [2, 5]):
        stats = _in_batches(values, sizes)
        torch.testing.assert_close(stats.std, expected, rtol=1e-6, atol=0)
        torch.testing.assert_close(stats.mean, values.mean(1), rtol=1e-15, atol=0)
    # The sums alone cancel: what the std was before m2 was kept is percents off here.
    old = RunningStats(stats.total, stats.total_sq, stats.low, stats.high, stats.count)
    assert float(((old.std - expected).abs() / expected).max()) > 1e-3


def test_groups_merge_as_the_whole():
    """Chan's formula over the parts (what the merge across ranks adds up) gives the whole's m2; an empty part
    adds nothing."""
    values = _values(9, seed=1)
    whole = _in_batches(values, [9])
    parts = [_in_batches(values[:, :4], [4]), _in_batches(values[:, 4:], [2, 3]),
             RunningStats.empty(2, 3)]
    merged = combined_m2([(p.count, p.mean, p.m2) for p in parts])
    torch.testing.assert_close(merged, whole.m2, rtol=1e-6, atol=1e-30)


def test_checkpoints_and_files_without_m2_still_read():
    values = torch.tensor([[[1.0, 2.0], [3.0, 6.0], [5.0, 7.0]]], dtype=torch.float64)  # [L=1, B=3, H=2]
    stats = _in_batches(values, [3])
    state = stats.state_dict()
    assert torch.equal(RunningStats.from_state_dict(state).m2, stats.m2)
    del state["m2"]  # a checkpoint of vitmad before m2
    torch.testing.assert_close(RunningStats.from_state_dict(state).std, torch.from_numpy(np.std(values.numpy(), 1)))


def test_mad_json_keeps_m2_and_reads_files_without_it(tmp_path):
    import timm

    import vitmad

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2, num_heads=2,
                              embed_dim=32).eval()
    profile = vitmad.profile(model, torch.rand(5, 3, 32, 32), batch_size=2, stats=["entropy"])
    path = tmp_path / "mad.json"
    profile.to_json(path)
    doc = json.loads(path.read_text())
    assert {"m2", "entropy_m2"} <= set(doc["sums"])
    again = vitmad.profiling.results.Profile.from_json(path)
    torch.testing.assert_close(again.std, profile.std, rtol=0, atol=0)
    torch.testing.assert_close(again.running("entropy").std, profile.running("entropy").std, rtol=0, atol=0)
    # A file written before m2 was kept: the std from its sums, as then.
    for key in ("m2", "entropy_m2"):
        del doc["sums"][key]
    path.write_text(json.dumps(doc))
    old = vitmad.profiling.results.Profile.from_json(path)
    torch.testing.assert_close(old.std, profile.std, rtol=1e-6, atol=1e-9)
