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

import math

import pytest
import torch
from torch import nn
from torch.nn.attention import flex_attention as flex_module
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

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


def _record(model, run):
    with torch.no_grad():
        plain = run()
        with vitmad.record(model, reduction="none") as tokens:
            recorded = run()
    assert torch.equal(plain, recorded)
    return tokens


def test_score_mod_and_block_mask_are_the_attention_recorded(monkeypatch):
    import test_record_flex_attention as here

    torch.manual_seed(0)
    model = FlexViT().eval()
    image = torch.randn(BATCH, 3, GRID[0] * PATCH, GRID[1] * PATCH, generator=torch.Generator().manual_seed(1))
    tokens = _record(model, lambda: model(image))
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
