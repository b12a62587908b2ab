"""vitmad.attention_stats / attention_stats_qk: the entry points of the statistics ops. The kernels' values are
tested against the float64 references in test_stats_attn.py and test_stats_qk.py; here: what the API adds (the
prefix maps, the grid and position forms, the order of the results), shapes under fake tensors, refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import vitmad
from vitmad.ops import attention_stats_qk_reference, attention_stats_reference, grid_positions

TOL = {"rtol": 2e-5, "atol": 2e-6}
STATS = ("mad", "entropy", "prefix_mass", "self_mass")


def _attention(*shape, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=gen) * 3).softmax(-1)


def test_grid_form_results_in_the_order_asked_with_the_prefix_rows_as_maps():
    attn = _attention(2, 3, 3 + 12, 3 + 12)
    out = vitmad.attention_stats(attn, 16, num_prefix_tokens=3, grid=(3, 4),
                                 stats=("prefix_maps", "entropy", "mad"))
    assert list(out) == ["prefix_maps", "entropy", "mad"]
    torch.testing.assert_close(out["prefix_maps"], attn[..., :3, 3:])
    assert out["prefix_maps"].data_ptr() != attn.data_ptr()  # a copy: writing to it leaves attn alone
    reference = attention_stats_reference(attn, ("entropy", "mad"), patch=16, num_prefix_tokens=3, grid=(3, 4))
    torch.testing.assert_close(out["entropy"].double(), reference[0], **TOL)
    torch.testing.assert_close(out["mad"].double(), reference[1], rtol=1e-5, atol=1e-4)


def test_position_form_maps_are_the_rows_without_a_position_over_the_keys_with_one():
    attn = _attention(2, 2, 9, 9)
    positions = torch.rand(9, 2) * 32
    positions[[0, 4]] = float("nan")  # a CLS first and a register in the middle of the sequence
    out = vitmad.attention_stats(attn, positions=positions, stats=STATS + ("prefix_maps",), reduction="none")
    keep = [1, 2, 3, 5, 6, 7, 8]
    torch.testing.assert_close(out["prefix_maps"], attn[..., [0, 4], :][..., keep])
    reference = attention_stats_reference(attn, STATS, positions=positions, reduction="none")
    for i, name in enumerate(STATS):
        torch.testing.assert_close(out[name].double(), reference[i], equal_nan=True, rtol=1e-5, atol=1e-5)
    assert out["entropy"][..., [0, 4]].isnan().all()


def test_qk_maps_equal_the_softmax_rows_and_the_grid_and_position_forms_agree():
    gen = torch.Generator().manual_seed(3)
    q, k = torch.randn(2, 2, 1 + 20, 8, generator=gen), torch.randn(2, 2, 1 + 20, 8, generator=gen)
    bias = torch.randn(2, 21, 21, generator=gen)
    grid = vitmad.attention_stats_qk(q, k, 14, grid=(4, 5), attn_bias=bias, scale=0.7,
                                     stats=STATS + ("prefix_maps",))
    attn = (q.double() @ k.double().transpose(-1, -2) * 0.7 + bias.double()).softmax(-1)
    torch.testing.assert_close(grid["prefix_maps"].double(), attn[..., :1, 1:], **TOL)
    positions = grid_positions(4, 5, 14, num_prefix_tokens=1)
    by_position = vitmad.attention_stats_qk(q, k, positions=positions, attn_bias=bias, scale=0.7,
                                            stats=STATS + ("prefix_maps",))
    for name in STATS + ("prefix_maps",):
        torch.testing.assert_close(by_position[name], grid[name], rtol=1e-5, atol=1e-4)
    reference = attention_stats_qk_reference(q, k, STATS, patch=14, grid=(4, 5), attn_bias=bias, scale=0.7)
    for i, name in enumerate(STATS):
        torch.testing.assert_close(grid[name].double(), reference[i], rtol=1e-5, atol=1e-4)


def test_maps_alone_need_no_kernel_and_still_check_the_arguments():
    attn = _attention(1, 1, 5, 5)
    assert list(vitmad.attention_stats(attn, 8, grid=(2, 2), stats=["prefix_maps"])) == ["prefix_maps"]
    with pytest.raises(ValueError, match="grid \\[3, 3\\] has 9 patches"):
        vitmad.attention_stats(attn, 8, grid=(3, 3), stats=["prefix_maps"])


@pytest.mark.parametrize("integers", [dict(patch=torch.tensor(8)), dict(patch=8, num_prefix_tokens=np.int64(1)),
                                      dict(patch=np.int32(8), num_prefix_tokens=torch.tensor(1))])
def test_maps_alone_take_the_integers_the_kernels_take(integers):
    """QA 329: an integer 0-d tensor or a NumPy integer, taken with a kernel statistic beside the maps, was
    refused for the maps alone; a bool or a float still is."""
    attn = _attention(2, 1, 5, 5)
    q, k = torch.randn(2, 1, 5, 4), torch.randn(2, 1, 5, 4)
    for call in (lambda **kw: vitmad.attention_stats(attn, grid=(2, 2), **kw),
                 lambda **kw: vitmad.attention_stats_qk(q, k, grid=(2, 2), **kw)):
        alone = call(stats=["prefix_maps"], **integers)["prefix_maps"]
        torch.testing.assert_close(alone, call(stats=["mad", "prefix_maps"], **integers)["prefix_maps"], rtol=0,
                                   atol=0)
        torch.testing.assert_close(alone, call(stats=["prefix_maps"], patch=8, num_prefix_tokens=1)["prefix_maps"],
                                   rtol=0, atol=0)
        for bad in (dict(patch=True), dict(patch=torch.tensor(8.0)), dict(patch=8, num_prefix_tokens=np.bool_(1))):
            with pytest.raises(TypeError, match="must be an int"):
                call(stats=["prefix_maps"], **bad)


@pytest.mark.parametrize("form", ["grid", "positions"])
def test_maps_from_q_and_k_compile_under_a_users_autocast(form):
    """QA 329: the maps turn the caller's autocast off, which dynamo could not trace (an ExitStack): fullgraph
    failed under autocast. They compile, in float32 as eager, whatever the autocast."""
    q, k = torch.randn(2, 3, 17, 8), torch.randn(2, 3, 17, 8)
    positions = grid_positions(4, 4, 16, num_prefix_tokens=1)

    def stats(q, k):
        if form == "grid":
            return vitmad.attention_stats_qk(q, k, 16, stats=["mad", "prefix_maps"])
        return vitmad.attention_stats_qk(q, k, positions=positions, stats=["mad", "prefix_maps"])

    expected = stats(q, k)
    torch._dynamo.reset()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        eager = stats(q, k)
        compiled = torch.compile(stats, fullgraph=True, backend="eager")(q, k)
    for name in expected:
        assert compiled[name].dtype == eager[name].dtype == torch.float32
        torch.testing.assert_close(compiled[name], eager[name], rtol=0, atol=0)
        torch.testing.assert_close(eager[name], expected[name], rtol=0, atol=0)


def test_maps_refused_when_the_tokens_without_a_position_differ_between_images():
    attn = _attention(2, 1, 5, 5)
    positions = torch.rand(2, 1, 5, 2)
    positions[0, 0, 0] = float("nan")
    positions[1, 0, 2] = float("nan")
    with pytest.raises(ValueError, match="same tokens without a position in every matrix"):
        vitmad.attention_stats(attn, positions=positions, stats=["prefix_maps"])
    vitmad.attention_stats(attn, positions=positions, stats=["entropy"])  # per-query statistics are fine


@pytest.mark.parametrize("stats, error, match", [
    ((), ValueError, "at least one of 'mad', 'entropy', 'prefix_mass', 'self_mass', 'temporal_mad', 'prefix_maps', "
                     "got none"),
    (("mad", "mad"), ValueError, "names 'mad' twice"),
    (("prefix_maps", "prefix_maps"), ValueError, "names 'prefix_maps' twice"),
    (("distance",), ValueError,  # the maps are a valid name here, and the message says so
     "must be among 'mad', 'entropy', 'prefix_mass', 'self_mass', 'temporal_mad', 'prefix_maps', got 'distance'"),
    ("", ValueError, "at least one of .* got none"),
    (" , ", ValueError, "at least one of .* got none"),
    ("mad,distance", ValueError, "must be among .* got 'distance'"),
    (None, TypeError, "stats must be a sequence of names .* got None"),
    (("mad", 1), TypeError, r"stats must be a sequence of names .* got \('mad', 1\)"),
])
def test_bad_statistics_are_named(stats, error, match):
    with pytest.raises(error, match=match):
        vitmad.attention_stats(_attention(1, 1, 5, 5), 8, grid=(2, 2), stats=stats)


def test_a_string_is_one_name_or_a_comma_list_as_record_takes_it():
    attn = _attention(2, 3, 5, 5)
    listed = vitmad.attention_stats(attn, 8, grid=(2, 2), stats=["entropy", "mad"])
    assert list(vitmad.attention_stats(attn, 8, grid=(2, 2), stats="entropy")) == ["entropy"]
    both = vitmad.attention_stats(attn, 8, grid=(2, 2), stats=" entropy, mad,")
    assert list(both) == ["entropy", "mad"]
    for name in both:
        assert torch.equal(both[name], listed[name])
    q, k = torch.randn(2, 5, 4), torch.randn(2, 5, 4)
    from_qk = vitmad.attention_stats_qk(q, k, 8, grid=(2, 2), stats="prefix_mass,prefix_maps")
    assert list(from_qk) == ["prefix_mass", "prefix_maps"]


def test_self_mass_needs_square_attention():
    attn = _attention(1, 1, 4, 6)
    with pytest.raises(ValueError, match="'self_mass' needs the queries and the keys to be the same tokens"):
        vitmad.attention_stats(attn, positions=torch.rand(4, 2), key_positions=torch.rand(6, 2),
                               stats=["self_mass"])
    out = vitmad.attention_stats(attn, positions=torch.rand(4, 2), key_positions=torch.rand(6, 2),
                                 stats=["entropy", "prefix_mass"])
    assert (out["prefix_mass"] == 0).all()


def test_statistics_are_measurements_not_differentiable():
    attn = _attention(1, 1, 5, 5).requires_grad_()
    with pytest.raises(RuntimeError, match="vitmad.attention_stats is not differentiable, but attn requires grad"):
        vitmad.attention_stats(attn, 8, grid=(2, 2))
    for maps_alone in (dict(patch=8, grid=(2, 2)), dict(positions=torch.rand(5, 2))):  # no kernel runs
        with pytest.raises(RuntimeError, match="attention_stats is not differentiable, but attn requires grad"):
            vitmad.attention_stats(attn, stats=["prefix_maps"], **maps_alone)
    with pytest.raises(RuntimeError, match="attention_stats_qk is not differentiable, but k requires grad"):
        q = torch.randn(1, 5, 4)
        vitmad.attention_stats_qk(q, q.clone().requires_grad_(), 8, grid=(2, 2), stats=["prefix_maps"])
    with torch.no_grad():
        vitmad.attention_stats(attn, 8, grid=(2, 2))
    q = torch.randn(1, 5, 4, requires_grad=True)
    with pytest.raises(RuntimeError, match="attention_stats_qk is not differentiable, but q requires grad"):
        vitmad.attention_stats_qk(q, q.detach(), 8, grid=(2, 2))


@pytest.mark.parametrize("stats", [["mad"], ["prefix_maps"], ["entropy", "prefix_maps"]])
@pytest.mark.parametrize("which", ["positions", "key_positions"])
def test_positions_that_require_grad_are_refused_whatever_is_asked(stats, which):
    """A request for the maps alone runs no kernel; it refuses what the kernels refuse all the same."""
    attn, q = _attention(1, 1, 5, 5), torch.randn(1, 5, 4)
    positions = {"positions": torch.rand(5, 2), "key_positions": torch.rand(5, 2)}
    positions[which] = positions[which].requires_grad_()
    with pytest.raises(RuntimeError, match=f"attention_stats is not differentiable, but {which} requires grad"):
        vitmad.attention_stats(attn, stats=stats, **positions)
    with pytest.raises(RuntimeError, match=f"attention_stats_qk is not differentiable, but {which} requires grad"):
        vitmad.attention_stats_qk(q, q, stats=stats, **positions)
    with torch.no_grad():
        maps = vitmad.attention_stats(attn, stats=stats, **positions)
    assert list(maps) == stats


def test_fake_tensors_get_the_output_shapes():
    with FakeTensorMode():
        attn = torch.empty(2, 3, 17, 17)
        out = torch.ops.vitmad.stats(attn, 8, ["mad", "entropy"], reduction="none")
        assert out.shape == (2, 2, 3, 16) and out.dtype == torch.float32
        out = torch.ops.vitmad.stats_pos(attn.double(), torch.empty(17, 2), None, ["self_mass"])
        assert out.shape == (1, 2, 3) and out.dtype == torch.float64
        q = torch.empty(2, 3, 17, 8, dtype=torch.bfloat16)
        out = torch.ops.vitmad.stats_qk(q, q, 8, ["entropy", "prefix_mass", "mad"])
        assert out.shape == (3, 2, 3) and out.dtype == torch.float32
        k = torch.empty(2, 3, 5, 8)
        out = torch.ops.vitmad.stats_qk_pos(q.float(), k, torch.empty(17, 2), torch.empty(5, 2), ["entropy"],
                                            reduction="none")
        assert out.shape == (1, 2, 3, 17)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_statistics_equal_the_cpu_ones(dtype):
    """CUDA runs the pure-PyTorch kernels of the statistics, or with VITMAD_CUDA_STATS_KERNELS=1 the fused ones
    (from q and k): the same values as the CPU's."""
    gen = torch.Generator().manual_seed(5)
    q, k = (torch.randn(2, 3, 1 + 48, 16, generator=gen).to(dtype) for _ in range(2))
    attn = (q.float() @ k.float().transpose(-1, -2) / 4).softmax(-1).to(dtype)
    stats = STATS + ("prefix_maps",)
    for reduction in ("mean", "none"):
        cpu = vitmad.attention_stats(attn, 8, grid=(6, 8), stats=stats, reduction=reduction)
        cuda = vitmad.attention_stats(attn.cuda(), 8, grid=(6, 8), stats=stats, reduction=reduction)
        cpu_qk = vitmad.attention_stats_qk(q, k, 8, grid=(6, 8), stats=stats, reduction=reduction)
        cuda_qk = vitmad.attention_stats_qk(q.cuda(), k.cuda(), 8, grid=(6, 8), stats=stats, reduction=reduction)
        for name in stats:
            torch.testing.assert_close(cuda[name].cpu(), cpu[name], rtol=1e-5, atol=1e-4)
            torch.testing.assert_close(cuda_qk[name].cpu(), cpu_qk[name], rtol=1e-5, atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_temporal_mad_equals_the_cpu_one(dtype):
    """The temporal MAD of a video's tokens on CUDA (pure-PyTorch kernels there) equals the CPU's fused pass."""
    gen = torch.Generator().manual_seed(6)
    f, r, c = torch.meshgrid(torch.arange(3), torch.arange(4), torch.arange(5), indexing="ij")
    nan = torch.full((1, 2), float("nan"))
    positions = torch.cat([nan, torch.stack([(r + 0.5) * 16, (c + 0.5) * 16], -1).reshape(-1, 2).float()])
    times = torch.cat([nan[:, :1], ((f + 0.5) * 2).reshape(-1, 1).float()])
    q, k = (torch.randn(2, 3, 61, 16, generator=gen).to(dtype) for _ in range(2))
    names = ("mad", "temporal_mad", "entropy")
    for reduction in ("mean", "none"):
        cpu = vitmad.attention_stats_qk(q, k, positions=positions, times=times, stats=names, reduction=reduction)
        cuda = vitmad.attention_stats_qk(q.cuda(), k.cuda(), positions=positions.cuda(), times=times.cuda(),
                                         stats=names, reduction=reduction)
        for name in names:
            torch.testing.assert_close(cuda[name].cpu(), cpu[name], rtol=1e-5, atol=1e-4, equal_nan=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_statistics_of_positions_are_captured_in_a_graph():
    """The position form's statistics (frames too) in a CUDA graph: the host-side checks of the positions' values
    stand aside while the stream captures (as the C++ ones do), and a replay on new q and k gives what a plain call
    gives."""
    gen = torch.Generator().manual_seed(7)
    f, r, c = torch.meshgrid(torch.arange(2), torch.arange(4), torch.arange(5), indexing="ij")
    positions = torch.stack([(r + 0.5) * 16, (c + 0.5) * 16], -1).reshape(-1, 2).float().cuda()
    times = ((f + 0.5) * 2).reshape(-1, 1).float().cuda()
    q, k = (torch.randn(2, 3, 40, 16, generator=gen).cuda() for _ in range(2))
    names = ("mad", "temporal_mad", "entropy", "self_mass")

    def call():
        return vitmad.attention_stats_qk(q, k, positions=positions, times=times, stats=names, reduction="none")

    side = torch.cuda.Stream()  # warm up on a side stream, as torch.cuda.graphs asks
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        call()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = call()
    q.copy_(torch.randn(q.shape, generator=gen).cuda())
    k.copy_(torch.randn(k.shape, generator=gen).cuda())
    graph.replay()
    expected = call()
    for name in names:
        torch.testing.assert_close(captured[name], expected[name], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("empty", ["queries", "keys"])
def test_maps_of_no_queries_or_no_keys_are_empty(empty):
    """Nq = 0 or Nk = 0 (the position form allows both): the maps are empty, beside the statistics."""
    nq, nk = (0, 4) if empty == "queries" else (4, 0)
    positions, key_positions = torch.rand(nq, 2), torch.rand(nk, 2)
    positions[:1] = float("nan")  # a token without a position, when there is one
    stats = ["mad", "entropy", "prefix_maps"]
    out = vitmad.attention_stats(torch.rand(2, nq, nk), positions=positions, key_positions=key_positions,
                                 stats=stats)
    q, k = torch.randn(2, nq, 3), torch.randn(2, nk, 3)
    out_qk = vitmad.attention_stats_qk(q, k, positions=positions, key_positions=key_positions, stats=stats)
    for result in (out, out_qk):
        assert list(result) == stats
        assert result["prefix_maps"].shape == ((2, 0, 4) if empty == "queries" else (2, 1, 0))
        assert result["mad"].shape == (2,)


def test_maps_from_q_and_k_under_dynamic_shapes():
    """torch.compile(dynamic=True, fullgraph=True): the maps' scale comes without the host-side checks, which
    cannot be traced with symbolic sizes."""
    q, k = torch.randn(2, 3, 17, 8), torch.randn(2, 3, 17, 8)

    def stats(q, k):
        return vitmad.attention_stats_qk(q, k, 16, stats=["mad", "prefix_maps"])

    compiled = torch.compile(stats, fullgraph=True, dynamic=True, backend="eager")(q, k)
    expected = stats(q, k)
    for name in expected:
        torch.testing.assert_close(compiled[name], expected[name])
    torch.testing.assert_close(expected["prefix_maps"][..., 0, :],
                               (q[..., 0:1, :] @ k.transpose(-1, -2) / 8 ** 0.5).softmax(-1)[..., 0, 1:])


def test_position_form_maps_from_q_and_k_compile_with_inductor():
    """torch.compile(fullgraph=True) with inductor: the map rows (the tokens without a position) are found by
    nonzero, a data-dependent count that inductor's matmul lowering refused to guard on ("could not guard on
    data-dependent expression Eq(u0, 1)", QA); the logits of those rows come from a fused multiply and sum there."""
    torch.manual_seed(0)
    q, k = torch.randn(2, 3, 1 + 6 * 7, 16), torch.randn(2, 3, 1 + 6 * 7, 16)
    cells = torch.stack(torch.meshgrid(torch.arange(6.0), torch.arange(7.0), indexing="ij"), -1).reshape(-1, 2)
    positions = torch.cat([torch.full((1, 2), float("nan")), (cells + 0.5) * 16])

    def stats(q, k, positions):
        return vitmad.attention_stats_qk(q, k, positions=positions, stats=["mad", "prefix_maps"])

    torch._dynamo.reset()
    compiled = torch.compile(stats, fullgraph=True)(q, k, positions)
    expected = stats(q, k, positions)
    for name in expected:
        torch.testing.assert_close(compiled[name], expected[name])
    torch.testing.assert_close(expected["prefix_maps"][..., 0, :],
                               (q[..., 0:1, :] @ k.transpose(-1, -2) / 4).softmax(-1)[..., 0, 1:])


def test_position_form_calls_that_run_no_stats_kernel_compile_and_check_their_positions_when_run():
    """The maps alone and the temporal MAD from stored attention run no stats kernel, whose host-side checks of
    the positions' values cannot steer a traced graph (QA 288: "could not guard on data-dependent expression"); an
    assert the compiler keeps raises when the graph runs, with the reason, where eager raises a ValueError."""
    torch.manual_seed(0)
    frames, side = 2, 3
    cells = torch.stack(torch.meshgrid(torch.arange(side * 1.0), torch.arange(side * 1.0), indexing="ij"), -1)
    nan = torch.full((1, 2), float("nan"))
    positions = torch.cat([nan, ((cells.reshape(-1, 2) + 0.5) * 16).repeat(frames, 1)])
    times = torch.cat([nan[:, :1], torch.arange(frames * 1.0).repeat_interleave(side * side)[:, None] + 0.5])
    q, k = torch.randn(2, 2, len(positions), 8), torch.randn(2, 2, len(positions), 8)
    attn = (q @ k.transpose(-1, -2) / 8 ** 0.5).softmax(-1)
    calls = {
        "maps": lambda p, t: vitmad.attention_stats(attn, positions=p, stats=["prefix_maps"]),
        "maps_qk": lambda p, t: vitmad.attention_stats_qk(q, k, positions=p, stats=["prefix_maps"]),
        "temporal": lambda p, t: vitmad.attention_stats(attn, positions=p, times=t, stats=["mad", "temporal_mad"]),
    }
    partly = positions.clone()
    partly[3, 1] = float("nan")  # a row half NaN: neither a token with a position nor one without
    for call in calls.values():
        torch._dynamo.reset()
        compiled = torch.compile(call, fullgraph=True)
        expected = call(positions, times)
        got = compiled(positions, times)
        assert got.keys() == expected.keys()
        for stat in expected:
            torch.testing.assert_close(got[stat], expected[stat], equal_nan=True, rtol=1e-6, atol=1e-6)
        with pytest.raises(ValueError, match="positions row 3 has 1 of its 2 coordinates NaN"):
            call(partly, times)
        # The assert's RuntimeError, or the ValueError of the mad kernel that checks them first (temporal).
        with pytest.raises((RuntimeError, ValueError), match="positions (must have each row all finite, or all NaN "
                                                             "for a token without a position|row 3 has 1 of its 2)"):
            compiled(partly, times)
    torch.testing.assert_close(calls["maps"](positions, times)["prefix_maps"], attn[..., :1, 1:])
    timeless = times.clone()
    timeless[4] = float("nan")  # a token with a position and no frame
    with pytest.raises(RuntimeError, match="times must be NaN exactly at the tokens without a position"):
        torch.compile(calls["temporal"], fullgraph=True)(positions, timeless)


@pytest.mark.parametrize("form", ["qk", "probabilities"])
def test_per_image_position_maps_compile_with_inductor(form):
    """Positions per image ([B, 1, N, 2], the documented per-image form) under torch.compile(fullgraph=True) with
    inductor: whether every matrix has the same tokens without a position cannot be a Python bool in the graph (QA),
    so there the maps of a matrix whose tokens differ from the first's are NaN, where eager raises."""
    torch.manual_seed(0)
    batch, n = 2, 2 + 12
    q, k = torch.randn(batch, 2, n, 16), torch.randn(batch, 2, n, 16)
    cells = torch.stack(torch.meshgrid(torch.arange(4.0), torch.arange(3.0), indexing="ij"), -1).reshape(-1, 2)
    positions = torch.cat([torch.full((2, 2), float("nan")), (cells + 0.5) * 16]).expand(batch, 1, n, 2).clone()
    attn = (q @ k.transpose(-1, -2) / 4).softmax(-1)

    def stats(positions):
        if form == "qk":
            return vitmad.attention_stats_qk(q, k, positions=positions, stats=["mad", "prefix_maps"])
        return vitmad.attention_stats(attn, positions=positions, stats=["mad", "prefix_maps"])

    torch._dynamo.reset()
    compiled = torch.compile(stats, fullgraph=True)
    expected = stats(positions)
    got = compiled(positions)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name])
    torch.testing.assert_close(expected["prefix_maps"], attn[..., :2, 2:])
    differing = positions.clone()
    differing[1, 0, 1] = torch.tensor([8.0, 8.0])  # image 1: one token without a position, not two
    with pytest.raises(ValueError, match="prefix maps need the same tokens without a position in every matrix"):
        stats(differing)
    maps = compiled(differing)["prefix_maps"]
    assert maps[1].isnan().all() and not maps[0].isnan().any()
    torch.testing.assert_close(maps[0], expected["prefix_maps"][0])
