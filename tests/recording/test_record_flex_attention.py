"""Modules that call torch's ``flex_attention`` themselves, with a ``score_mod`` and a block mask: a small ViT written
here (relative position bias table, local windows, a class token, grouped key heads), vit-pytorch's N-D ViTs and
LeVJEPA's video transformer on their flex path. Each against the float64 softmax of the logits the test computes itself
from the q and k the model hands ``flex_attention`` (its bias and mask written here), tokens placed by geometry written
here; outputs bit-identical with and without recording. Causal masks and a ``score_mod`` that cannot be evaluated are
refused.

``flex_attention`` called from Python runs torch's dense path on this CPU (it compiles the higher-order op with the
eager backend: about half a second per new mask design), so these cases stay few and small.
"""

from __future__ import annotations

import functools
import math
import sys
import types

import pytest
import torch
from torch import nn
from torch.nn.attention import flex_attention as flex_module
from torch.nn.attention.flex_attention import create_block_mask, flex_attention
from torch.nn.attention.flex_attention import flex_attention as aliased_flex

import vitmad
from conftest import statistics_reference

TOL = {"rtol": 1e-5, "atol": 1e-4}  # pixels or frames
PATCH, GRID, BATCH = 8, (13, 11), 2  # 1 + 143 tokens: across flex's 128-token blocks
HEADS, KEY_HEADS, HEAD_DIM, REACH = 4, 2, 8, (2, 3)  # local windows: |row offset| <= 2, |column offset| <= 3


def _token_cells(grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column of every token; the class token (index 0), which the masks and biases treat apart, at (0, 0)."""
    cells = torch.cat([torch.tensor([0]), torch.arange(grid[0] * grid[1])])
    return cells // grid[1], cells % grid[1]


class LocalAttention(nn.Module):
    """Self-attention through ``flex_attention``: a learned bias per head and (row, column) offset, windows of
    ``REACH`` around each patch (the class token attends and is attended everywhere, without a bias), grouped keys."""

    def __init__(self, dim: int = HEADS * HEAD_DIM, causal: bool = False, score_mod=None):
        super().__init__()
        self.q = nn.Linear(dim, HEADS * HEAD_DIM)
        self.kv = nn.Linear(dim, 2 * KEY_HEADS * HEAD_DIM)
        self.proj = nn.Linear(HEADS * HEAD_DIM, dim)
        self.table = nn.Parameter(torch.randn(HEADS, 2 * GRID[0] - 1, 2 * GRID[1] - 1))
        self.causal, self.score_mod = causal, score_mod

    def forward(self, x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        batch, tokens, _ = x.shape
        q = self.q(x).view(batch, tokens, HEADS, HEAD_DIM).transpose(1, 2)
        k, v = self.kv(x).view(batch, tokens, 2, KEY_HEADS, HEAD_DIM).permute(2, 0, 3, 1, 4)
        table = self.table

        def relative_bias(score, b, h, q_idx, kv_idx):
            bias = table[h, rows[q_idx] - rows[kv_idx] + GRID[0] - 1, cols[q_idx] - cols[kv_idx] + GRID[1] - 1]
            return score + torch.where((q_idx == 0) | (kv_idx == 0), 0.0, bias)

        def local(b, h, q_idx, kv_idx):
            near = ((rows[q_idx] - rows[kv_idx]).abs() <= REACH[0]) & ((cols[q_idx] - cols[kv_idx]).abs() <= REACH[1])
            return near | (q_idx == 0) | (kv_idx == 0)

        def causal(b, h, q_idx, kv_idx):
            return kv_idx <= q_idx

        block_mask = create_block_mask(causal if self.causal else local, None, None, tokens, tokens, device=x.device)
        out = flex_attention(q, k, v, score_mod=self.score_mod or relative_bias, block_mask=block_mask,
                             enable_gqa=True)
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, -1))


class FlexViT(nn.Module):
    def __init__(self, depth: int = 2, **attention):
        super().__init__()
        dim = HEADS * HEAD_DIM
        self.patch_embed = nn.Conv2d(3, dim, PATCH, PATCH)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.blocks = nn.ModuleList([LocalAttention(dim, **attention) for _ in range(depth)])

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(image)
        rows, cols = _token_cells(tuple(x.shape[-2:]))
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x.flatten(2).transpose(1, 2)], dim=1)
        for block in self.blocks:
            x = x + block(x, rows, cols)
        return x


def _handed(monkeypatch, namespace, run) -> list[dict]:
    """The arguments of every ``flex_attention`` call ``run`` makes through ``namespace.flex_attention``."""
    calls, original = [], flex_module.flex_attention

    def spy(query, key, value, **kwargs):
        calls.append({"query": query.double(), "key": key.double(), **kwargs})
        return original(query, key, value, **kwargs)

    with monkeypatch.context() as patch, torch.no_grad():
        patch.setattr(namespace, "flex_attention", spy)
        run()
    return calls


def _softmax(query: torch.Tensor, key: torch.Tensor, scale: float, bias: torch.Tensor | None = None) -> torch.Tensor:
    """float64 ``softmax(q k^T * scale + bias)``, each key head serving consecutive query heads."""
    key = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)
    logits = query @ key.transpose(-2, -1) * scale
    return (logits if bias is None else logits + bias).softmax(-1)


def _record(model, run, **kwargs):
    with torch.no_grad():
        plain = run()
        with vitmad.record(model, reduction="none", **kwargs) as tokens:
            recorded = run()
    assert torch.equal(plain, recorded)
    return tokens


def test_score_mod_and_block_mask_are_the_attention_recorded(monkeypatch):
    import test_record_flex_attention as here

    torch.manual_seed(0)
    model = FlexViT().eval()
    image = torch.randn(BATCH, 3, GRID[0] * PATCH, GRID[1] * PATCH, generator=torch.Generator().manual_seed(1))
    tokens = _record(model, lambda: model(image), num_prefix_tokens=1)  # a model of no library: its class token
    calls = _handed(monkeypatch, here, lambda: model(image))
    # The test's own bias and mask, per (query, key) token pair.
    rows, cols = _token_cells(GRID)
    prefix = (torch.arange(rows.numel()) == 0)
    drow, dcol = rows[:, None] - rows[None, :], cols[:, None] - cols[None, :]
    local = ((drow.abs() <= REACH[0]) & (dcol.abs() <= REACH[1])) | prefix[:, None] | prefix[None, :]
    positions = torch.cat([torch.full((1, 2), math.nan), torch.stack([rows[1:], cols[1:]], -1) + 0.5]).double() * PATCH
    assert len(calls) == len(tokens.layers) == 2
    for layer, (call, block) in enumerate(zip(calls, model.blocks)):
        table = block.table.detach().double()[:, drow + GRID[0] - 1, dcol + GRID[1] - 1]
        bias = torch.where(prefix[:, None] | prefix[None, :], 0.0, table).masked_fill(~local, -math.inf)
        probabilities = _softmax(call["query"], call["key"], HEAD_DIM ** -0.5, bias)
        expected = statistics_reference(probabilities, positions)["mad"]
        geometry = tokens.geometry[layer]
        assert geometry.grid == GRID and geometry.num_prefix_tokens == 1 and geometry.heads == HEADS
        torch.testing.assert_close(tokens.per_layer[layer].double(), expected, **TOL)
    assert flex_module.flex_attention is here.flex_attention  # torch's own function, back after the block


def _forced_flex(monkeypatch) -> None:
    """vit-pytorch's N-D ViTs take flex_attention where its compiled kernel exists (CUDA, AVX2 CPUs): forced here."""
    from vit_pytorch import vit_nd_masking

    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    monkeypatch.setattr(vit_nd_masking, "flex_attention_supported", lambda device: True)


def _cells(grid: tuple[int, ...], patch: tuple[int, ...]) -> torch.Tensor:
    """float64 centres of a row-major grid of ``patch`` cells, axis 0 slowest."""
    axes = [(torch.arange(n).double() + 0.5) * p for n, p in zip(grid, patch)]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, len(grid))


@pytest.mark.parametrize("design, prefix", [("vit_nd", 1), ("vit_nd_pope", 0), ("vit_nd_rotary", 0)])
def test_nd_vits_are_recorded_on_their_flex_path(design, prefix, monkeypatch):
    pytest.importorskip("vit_pytorch")
    import importlib

    from vit_pytorch import vit_nd_masking

    _forced_flex(monkeypatch)
    module = importlib.import_module(f"vit_pytorch.{design}")
    torch.manual_seed(0)
    size, patch = (24, 40), (8, 8)
    model = module.ViTND(ndim=2, input_shape=size, patch_size=patch, num_classes=3, dim=32, depth=2, heads=2,
                         mlp_dim=32, dim_head=16).eval()
    x = torch.randn(BATCH, 3, *size, generator=torch.Generator().manual_seed(1))
    tokens = _record(model, lambda: model(x))
    calls = _handed(monkeypatch, vit_nd_masking, lambda: model(x))
    grid = (3, 5)
    positions = torch.cat([torch.full((prefix, 2), math.nan, dtype=torch.float64), _cells(grid, patch)])
    assert len(calls) == len(tokens.layers) == 2
    for layer, call in enumerate(calls):
        assert call.get("block_mask") is None  # no causal_dims: no mask
        expected = statistics_reference(_softmax(call["query"], call["key"], call["scale"]), positions)["mad"]
        assert tokens.geometry[layer].grid == grid and tokens.geometry[layer].num_prefix_tokens == prefix
        torch.testing.assert_close(tokens.per_layer[layer].double(), expected, **TOL)


def test_levjepa_video_transformer_without_block_causal_mask_is_recorded_in_space_and_time(monkeypatch):
    levjepa = pytest.importorskip("vit_pytorch.levjepa")
    torch.manual_seed(0)
    model = levjepa.VideoTransformer(image_size=(16, 24), patch_size=8, frames=3, block_causal=False, dim=32, depth=2,
                                     heads=2, mlp_dim=32, dim_head=16).eval()
    video = torch.randn(BATCH, 3, 3, 16, 24, generator=torch.Generator().manual_seed(2))
    tokens = _record(model, lambda: model(video))
    calls = _handed(monkeypatch, levjepa, lambda: model(video))
    nan = torch.full((1, 1), math.nan, dtype=torch.float64)
    space = torch.cat([nan.expand(1, 2), _cells((2, 3), (8, 8)).repeat(3, 1)])
    time = torch.cat([nan, (torch.arange(3).double() + 0.5).repeat_interleave(6)[:, None]])
    assert len(calls) == len(tokens.layers) == 2
    for layer, call in enumerate(calls):
        probabilities = _softmax(call["query"], call["key"], call["scale"])
        assert tokens.geometry[layer].frames == 3 and tokens.geometry[layer].grid == (2, 3)
        torch.testing.assert_close(tokens.per_layer[layer].double(),
                                   statistics_reference(probabilities, space)["mad"], **TOL)
        torch.testing.assert_close(tokens.calls[-1].temporal[layer].double(),
                                   statistics_reference(probabilities, time)["mad"], **TOL)


def test_causal_block_masks_are_refused_by_layer():
    model = FlexViT(depth=1, causal=True).eval()
    image = torch.randn(BATCH, 3, GRID[0] * PATCH, GRID[1] * PATCH)
    with pytest.raises(ValueError, match=r"blocks\.0 \(LocalAttention\) runs causal attention .*flex_attention mask"), \
            torch.no_grad(), vitmad.record(model):
        model(image)


def test_levjepa_block_causal_attention_is_refused(monkeypatch):
    levjepa = pytest.importorskip("vit_pytorch.levjepa")
    # Its mask function compiled fails on this CPU (torch 2.14): run it as written.
    monkeypatch.setattr(torch, "compile", lambda fn, *args, **kwargs: fn)
    model = levjepa.VideoTransformer(image_size=16, patch_size=8, frames=2, dim=32, depth=1, heads=2, mlp_dim=32,
                                     dim_head=16).eval()
    with pytest.raises(ValueError, match="block-causally across frames"), torch.no_grad(), vitmad.record(model):
        model(torch.randn(BATCH, 3, 2, 16, 16))


def test_a_score_mod_that_cannot_be_evaluated_outside_the_kernel_is_refused_by_layer():
    def kernel_only(score, b, h, q_idx, kv_idx):
        if not torch.compiler.is_compiling():  # traced into the kernel: never called eagerly there
            raise RuntimeError("evaluated outside the kernel")
        return score

    model = FlexViT(depth=1, score_mod=kernel_only).eval()
    image = torch.randn(BATCH, 3, GRID[0] * PATCH, GRID[1] * PATCH)
    with torch.no_grad():
        model(image)  # the model itself runs
        with pytest.raises(ValueError, match=r"blocks\.0 \(LocalAttention\): the score_mod .* could not be evaluated "
                                             r".*evaluated outside the kernel"), vitmad.record(model):
            model(image)


# Tokens handed to the call-route models below: a 5 x 6 grid of 8 px cells, row-major, given as positions=.
ROUTE_GRID, ROUTE_HEADS, ROUTE_DIM = (5, 6), 2, 16
ROUTE_TOKENS = ROUTE_GRID[0] * ROUTE_GRID[1]
UNREAD = "called torch's flex_attention where vitmad cannot read it"


def _route_positions(prefix: int = 0) -> torch.Tensor:
    return torch.cat([torch.full((prefix, 2), math.nan, dtype=torch.float64), _cells(ROUTE_GRID, (8, 8))])


class _Projected(nn.Module):
    """q, k, v ``[B, H, N, D]`` of its input tokens; each subclass hands them to flex_attention its own way."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(ROUTE_DIM, 3 * ROUTE_HEADS * HEAD_DIM)

    def heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        batch, tokens, _ = x.shape
        return self.qkv(x).view(batch, tokens, 3, ROUTE_HEADS, HEAD_DIM).permute(2, 0, 3, 1, 4).unbind(0)


def _attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    return flex_attention(query, key, value)


_compiled_attend = torch.compile(_attend, backend="eager")
_partial_flex = functools.partial(flex_attention, enable_gqa=False)


class AliasCall(_Projected):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return aliased_flex(*self.heads(x))


class HelperCall(_Projected):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _attend(*self.heads(x))


class CompiledHelperCall(_Projected):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _compiled_attend(*self.heads(x))


class InstanceCall(_Projected):
    def __init__(self):
        super().__init__()
        self.flex_attention = flex_attention  # an object's attribute: not a module global the recording replaces

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.flex_attention(*self.heads(x))


class PartialCall(_Projected):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _partial_flex(*self.heads(x))


class MaskedCall(_Projected):
    """flex_attention under a block mask of ``mask_mod``, over the batch and heads."""

    def __init__(self, mask_mod):
        super().__init__()
        self.mask_mod = mask_mod

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, _ = x.shape
        mask = create_block_mask(self.mask_mod, batch, ROUTE_HEADS, tokens, tokens, device=x.device)
        return flex_attention(*self.heads(x), block_mask=mask)


def _route_reference(module: _Projected, x: torch.Tensor, positions: torch.Tensor,
                     bias: torch.Tensor | None = None) -> torch.Tensor:
    """The float64 MAD per query of ``module``'s attention over ``x``, from the q and k the test projects itself."""
    with torch.no_grad():
        query, key, _ = (t.double() for t in module.heads(x))
    return statistics_reference(_softmax(query, key, HEAD_DIM ** -0.5, bias), positions)["mad"]


def _route_input(tokens: int = ROUTE_TOKENS) -> torch.Tensor:
    return torch.randn(BATCH, tokens, ROUTE_DIM, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("design, layers", [(AliasCall, None), (HelperCall, None), (HelperCall, ["0"])])
def test_an_aliased_import_and_a_helper_are_recorded(design, layers):
    """An alias of flex_attention read by the forward is found; so is a forward of the user's calling a helper that
    calls it (it was recorded only where layers= named it; the helper's module global is replaced like any
    other)."""
    torch.manual_seed(0)
    model = nn.Sequential(design()).eval()
    x, positions = _route_input(), _route_positions()
    with torch.no_grad():
        plain = model(x)
        with vitmad.record(model, positions=positions, reduction="none", layers=layers) as tokens:
            recorded = model(x)
    assert torch.equal(plain, recorded) and tokens.layers == ["0"]
    torch.testing.assert_close(tokens.per_layer[0].double(), _route_reference(model[0], x, positions), **TOL)


@pytest.mark.parametrize("design, compile_inside", [(CompiledHelperCall, False), (HelperCall, True),
                                                     (InstanceCall, False), (PartialCall, False)])
def test_flex_attention_vitmad_cannot_read_is_refused_by_name(design, compile_inside):
    """Compiled (a compiled helper, run before the recording too; the model compiled inside the block) or reached
    through a binding the recording does not replace: refused by layer, naming flex_attention, never a crash; torch's
    function is back everywhere after the block, and the model runs as before."""
    torch.manual_seed(0)
    model = nn.Sequential(design()).eval()
    x = _route_input()
    with torch.no_grad():
        plain = model(x)
        with pytest.raises(ValueError, match=rf"vitmad.record: 0 \({design.__name__}\) {UNREAD}: compiled"), \
                vitmad.record(model, positions=_route_positions(), layers=["0"]):
            (torch.compile(model, backend="eager") if compile_inside else model)(x)
        assert torch.equal(model(x), plain)
    assert flex_module.flex_attention is flex_attention


def test_flex_attention_compiled_during_a_recording_is_torchs_compiled_function_after_it():
    """transformers' WrappedFlexAttention compiles the flex_attention global it holds at its first call and keeps it:
    made during a recording, that is torch.compile of the stand-in, which must compute what torch's function
    compiled computes, during the recording and after it."""
    from vitmad.recording.flex_call import flex_attention as stand_in  # a local: module globals are rebound

    torch.manual_seed(0)
    model = nn.Sequential(AliasCall()).eval()
    x = _route_input()
    query, key, value = (torch.randn(BATCH, ROUTE_HEADS, ROUTE_TOKENS, HEAD_DIM, generator=torch.Generator()
                                     .manual_seed(seed)) for seed in (4, 5, 6))
    with torch.no_grad():
        expected = torch.compile(flex_attention, backend="eager")(query, key, value)
        with vitmad.record(model, positions=_route_positions()):
            assert flex_module.flex_attention is stand_in
            compiled = torch.compile(flex_module.flex_attention, backend="eager")
            during = compiled(query, key, value)
            model(x)
        after = compiled(query, key, value)
    assert torch.equal(during, expected) and torch.equal(after, expected)


def test_modules_imported_between_and_during_recordings_are_served(monkeypatch):
    """Module namespaces are scanned once and again only where new or resized: a module imported after a first
    recording is recorded in the next, and one imported during a recording holds torch's function after it."""
    source = ("from torch.nn.attention.flex_attention import flex_attention as late_flex\n"
              "def attend(query, key, value):\n    return late_flex(query, key, value)\n")

    def load(name: str) -> types.ModuleType:
        module = types.ModuleType(name)
        monkeypatch.setitem(sys.modules, name, module)
        exec(source, module.__dict__)
        return module

    class LateCall(_Projected):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return late.attend(*self.heads(x))

    torch.manual_seed(0)
    model = nn.Sequential(LateCall()).eval()
    x, positions = _route_input(), _route_positions()
    with torch.no_grad(), vitmad.record(nn.Sequential(AliasCall()).eval(), positions=positions, layers=["0"]) as first:
        first.model(x)
        during = load("vitmad_test_imported_during_a_recording")
    assert during.late_flex is flex_attention
    late = load("vitmad_test_imported_after_a_recording")
    with torch.no_grad(), vitmad.record(model, positions=positions, reduction="none", layers=["0"]) as tokens:
        model(x)
    assert late.late_flex is flex_attention
    torch.testing.assert_close(tokens.per_layer[0].double(), _route_reference(model[0], x, positions), **TOL)


def _causal_before_image_1(b, h, q_idx, kv_idx):
    return (b == 1) | (kv_idx <= q_idx)


def _causal_in_head_1(b, h, q_idx, kv_idx):
    return (h == 0) | (kv_idx <= q_idx)


@pytest.mark.parametrize("mask_mod, where", [(_causal_before_image_1, "image 0, head 0"),
                                             (_causal_in_head_1, "image 0, head 1")])
def test_causal_attention_in_any_image_or_head_is_refused(mask_mod, where):
    """The causal test is per (image, head): one causal image beside a bidirectional one is refused at batch 2 as
    it is alone."""
    model = nn.Sequential(MaskedCall(mask_mod)).eval()
    with pytest.raises(ValueError, match=rf"0 \(MaskedCall\) runs causal attention \(its flex_attention mask keeps no "
                                         rf"key after its query, in {where}\)"), \
            torch.no_grad(), vitmad.record(model, positions=_route_positions()):
        model(_route_input())


def _self_and_class_token(b, h, q_idx, kv_idx):
    """Each token attends to itself and the class token."""
    return (kv_idx == q_idx) | (kv_idx == 0)


def _self_and_class_token_beside_a_window(b, h, q_idx, kv_idx):
    """Head 0: each token attends to itself and the class token; head 1: a window of the 4 tokens either side."""
    return _self_and_class_token(b, h, q_idx, kv_idx) | ((h == 1) & ((q_idx - kv_idx).abs() <= 4))


@pytest.mark.parametrize("window", [False, True])
def test_a_mask_of_each_token_and_the_class_token_is_not_causal(window):
    """Keys every query keeps (the class token) are no order: a head keeping no key after its query, and none before
    it but the class token, is recorded, in every head or beside a head attending to a window."""
    torch.manual_seed(0)
    model = nn.Sequential(MaskedCall(_self_and_class_token_beside_a_window if window else _self_and_class_token))
    model.eval()
    x, positions = _route_input(1 + ROUTE_TOKENS), _route_positions(prefix=1)
    with torch.no_grad():
        plain = model(x)
        with vitmad.record(model, positions=positions, reduction="none") as tokens:
            recorded = model(x)
    assert torch.equal(plain, recorded)
    index = torch.arange(1 + ROUTE_TOKENS)
    kept = ((index[:, None] == index[None, :]) | (index[None, :] == 0)).expand(ROUTE_HEADS, -1, -1).clone()
    if window:
        kept[1] |= (index[:, None] - index[None, :]).abs() <= 4
    bias = torch.zeros(kept.shape, dtype=torch.float64).masked_fill(~kept, -math.inf)
    expected = _route_reference(model[0], x, positions, bias)
    assert bool((expected[:, 0] == 0).all()) and bool((expected[:, 1] > 0).all()) == window  # patch keys: self alone
    assert bool(tokens.per_layer[0][..., 0].isnan().all())  # the class token's query has no position
    torch.testing.assert_close(tokens.per_layer[0][..., 1:].double(), expected, **TOL)


def test_the_module_scan_survives_an_import_in_another_thread(monkeypatch):
    """A recording's start scans every loaded module for torch's flex_attention. `vitmad profile` starts one per
    batch while its loader thread decodes the next, and PIL importing a plugin there (a corrupt or WebP image) changed
    sys.modules during the scan: "dictionary changed size during iteration" ended the run, 1 in 3 times under load
    (QA 215). The scan reads a copy made in one step; here the import lands in the middle of any iteration of the
    live dict."""
    from vitmad.recording.flex_call import FlexAttentionStandIn

    class ImportingMeanwhile(dict):
        def items(self):
            def items():
                for index, item in enumerate(dict.items(self)):
                    if index == 1:
                        self["_vitmad_imported_meanwhile"] = types.ModuleType("_vitmad_imported_meanwhile")
                    yield item
            return items()

    scanned = {}
    monkeypatch.setattr(FlexAttentionStandIn, "_scanned", scanned)
    monkeypatch.setattr(sys, "modules", ImportingMeanwhile(sys.modules))
    FlexAttentionStandIn._scan()
    monkeypatch.undo()
    assert "torch.nn.attention.flex_attention" in scanned
