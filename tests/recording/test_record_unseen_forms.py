"""Attention in forms vitmad does not read, in a user's own ViT: a layer it found whose forward computed its attention
unseen (QA 333: left out of rec.layers silently, rec.mad[1] the next block's), and cross-attention through
F.scaled_dot_product_attention to a sequence as long as the image's (QA 333: recorded as MAD silently)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vitmad
from vitmad.recording.recorder import NoAttentionRanError

DIM, HEADS, PATCH = 32, 4, 8


class Attention(nn.Module):
    """Self-attention over [B, N, DIM]; ``heads_last`` computes it as [B, Nq, Nk, H] with a softmax over dim 2,
    which vitmad does not take for attention."""

    by_hand = False  # exp(l - max) / sum: a softmax by hand, spelled as by_hand says (True: e / sum)

    def __init__(self, heads_last: bool = False):
        super().__init__()
        self.heads_last = heads_last
        self.qkv = nn.Linear(DIM, 3 * DIM)
        with torch.no_grad():
            self.qkv.weight.mul_(4.0)  # sharp heads: a misplaced layer shows

    def probabilities(self, x: torch.Tensor) -> torch.Tensor:
        """[B, H, N, N] in float64: the reference."""
        b, n, _ = x.shape
        q, k, _ = self.qkv(x).double().reshape(b, n, 3, HEADS, DIM // HEADS).unbind(2)
        return torch.einsum("bqhd,bkhd->bhqk", q, k).mul((DIM // HEADS) ** -0.5).softmax(-1)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, HEADS, DIM // HEADS).unbind(2)
        scale = (DIM // HEADS) ** -0.5
        if self.heads_last:
            a = torch.einsum("bqhd,bkhd->bqkh", q, k).mul(scale).softmax(dim=2)
            return torch.einsum("bqkh,bkhd->bqhd", a, v).reshape(b, n, DIM)
        if self.by_hand:
            logits = torch.einsum("bqhd,bkhd->bhqk", q, k).mul(scale)
            e = (logits - logits.amax(-1, keepdim=True)).exp()
            if self.by_hand == "divide":
                a = torch.divide(e, e.sum(-1, keepdim=True))
            elif self.by_hand == "reciprocal":
                a = e * e.sum(-1, keepdim=True).reciprocal()
            elif self.by_hand == "masked":
                masked = e.masked_fill(torch.zeros_like(e, dtype=torch.bool), 0.0)
                a = masked / masked.sum(-1, keepdim=True)
            elif self.by_hand == "float64":
                wide = e.double()
                a = (wide / wide.sum(-1, keepdim=True)).to(e.dtype)
            else:
                a = e / e.sum(-1, keepdim=True)
            return torch.einsum("bhqk,bkhd->bqhd", a, v).reshape(b, n, DIM)
        a = torch.einsum("bqhd,bkhd->bhqk", q, k).mul(scale).softmax(dim=-1)
        return torch.einsum("bhqk,bkhd->bqhd", a, v).reshape(b, n, DIM)


class ViT(nn.Module):
    def __init__(self, heads_last_blocks=(), depth=4):
        super().__init__()
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, DIM, PATCH, PATCH)
        self.cls_token = nn.Parameter(torch.randn(1, 1, DIM))
        self.num_prefix_tokens = 1
        self.blocks = nn.ModuleList([Attention(i in heads_last_blocks) for i in range(depth)])

    def tokens(self, pixels):
        x = self.patch_embed.proj(pixels).flatten(2).transpose(1, 2)
        return torch.cat([self.cls_token.expand(len(x), -1, -1), x], 1)

    def forward(self, pixels):
        x = self.tokens(pixels)
        for block in self.blocks:
            x = x + block(x)
        return x


def _reference_mads(model: ViT, pixels: torch.Tensor, grid: int) -> list[torch.Tensor]:
    """Each block's MAD per image and head [B, H], from its own float64 probabilities; patch (i, j) at pixel
    (i * PATCH + PATCH/2, j * PATCH + PATCH/2), the class token first and without a place."""
    ii, jj = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    centres = torch.stack([ii.flatten(), jj.flatten()], -1).double() * PATCH + PATCH / 2
    distance = torch.cdist(centres, centres)
    mads, x = [], model.tokens(pixels)
    with torch.no_grad():
        for block in model.blocks:
            a = block.probabilities(x)[..., 1:, 1:]
            mads.append((a * distance).sum(-1).mean(-1))
            x = x + block(x)
    return mads


@pytest.mark.parametrize("unseen", [(1,), (0,), (3,), (0, 2)])
def test_a_found_layer_that_attends_unseen_is_skipped_with_a_warning(unseen):
    torch.manual_seed(0)
    model = ViT(unseen).eval()
    pixels = torch.randn(2, 3, 5 * PATCH, 5 * PATCH)
    kept = [i for i in range(4) if i not in unseen]
    for layers in (None, ["blocks.*"]):
        with pytest.warns(UserWarning, match="ran without computing attention vitmad sees") as said, \
                torch.no_grad(), vitmad.record(model, layers=layers) as rec:
            model(pixels)
        assert rec.layers == [f"blocks.{i}" for i in kept]
        assert sorted(rec.skipped) == [f"blocks.{i}" for i in unseen]
        assert len(said) == len(unseen)
        assert all("rec.mad's layer axis skips it" in str(w.message) for w in said)
        reference = _reference_mads(model, pixels, 5)
        torch.testing.assert_close(rec.mad.double(), torch.stack([reference[i] for i in kept]), rtol=1e-5, atol=1e-4)


class StableAttention(Attention):
    """An attention class of its own that normalises its logits by hand, never calling a softmax."""

    by_hand = True

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, HEADS, DIM // HEADS).unbind(2)
        logits = torch.einsum("bqhd,bkhd->bhqk", q, k).mul((DIM // HEADS) ** -0.5)
        e = (logits - logits.amax(-1, keepdim=True)).exp()
        return torch.einsum("bhqk,bkhd->bqhd", e / e.sum(-1, keepdim=True), v).reshape(b, n, DIM)


@pytest.mark.parametrize("spelling", ["divide", "reciprocal", "masked", "float64"])
def test_a_softmax_by_hand_is_warned_of_however_spelled(spelling):
    """QA 432: torch.divide, a product with the sum's reciprocal, a mask filled in out of place or a cast between
    the exp and the division left the layer out without a word after the rule was narrowed to an exp divided by its
    sum (QA 430: an exp alone warned of state-space blocks)."""
    torch.manual_seed(0)
    model = ViT().eval()
    model.blocks[1].by_hand = spelling
    with pytest.warns(UserWarning, match=r"blocks\.1 \(Attention\) of ViT ran without computing attention vitmad "
                                         r"sees"), torch.no_grad(), vitmad.record(model) as rec:
        model(torch.randn(2, 3, 5 * PATCH, 5 * PATCH))
    assert rec.layers == ["blocks.0", "blocks.2", "blocks.3"] and list(rec.skipped) == ["blocks.1"]


def test_a_layer_normalising_its_logits_by_hand_is_warned_of():
    """QA 426: exp(l - max) / sum, the usual softmax by hand, left its layer out of rec.layers without a word: a
    found class taking that path, and a class of its own that never calls a softmax. The first is skipped with the
    reason, the second named in the warning of blocks left out between recorded ones."""
    torch.manual_seed(0)
    model = ViT().eval()
    pixels = torch.randn(2, 3, 5 * PATCH, 5 * PATCH)
    model.blocks[1].by_hand = True
    with pytest.warns(UserWarning, match=r"blocks\.1 \(Attention\) of ViT ran without computing attention vitmad "
                                         r"sees"), torch.no_grad(), vitmad.record(model) as rec:
        model(pixels)
    assert rec.layers == ["blocks.0", "blocks.2", "blocks.3"]
    assert rec.skipped["blocks.1"].endswith("(it normalised logits in another form)")
    # Named in layers=, it was said to have "ran without computing attention" (QA 426): it attended, unread.
    with pytest.warns(UserWarning, match=r"blocks\.1 \(Attention\) of ViT, named in layers, ran without computing "
                                         r"attention vitmad reads .*; it normalised logits in a form vitmad does not "
                                         r"read"), torch.no_grad(), vitmad.record(model, layers=["blocks.1"]):
        model(pixels)
    reference = _reference_mads(model, pixels, 5)
    torch.testing.assert_close(rec.mad.double(), torch.stack([reference[i] for i in (0, 2, 3)]), rtol=1e-5,
                               atol=1e-4)
    model.blocks[1] = StableAttention()
    with pytest.warns(UserWarning, match=r"blocks\.1 of ViT, in a list beside recorded attention layers, .* or are "
                                         r"named as attention with query or key projections and compute no softmax "
                                         r"it reads"), torch.no_grad(), vitmad.record(model) as rec:
        model(pixels)
    assert rec.layers == ["blocks.0", "blocks.2", "blocks.3"] and rec.skipped == {}


def test_every_layer_unseen_is_still_the_error_and_seen_layers_say_nothing():
    torch.manual_seed(0)
    pixels = torch.randn(1, 3, 4 * PATCH, 4 * PATCH)
    model = ViT((0, 1, 2, 3)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad(), vitmad.record(model) as rec:
            model(pixels)
    with pytest.raises(NoAttentionRanError, match="none of the 4 modules"):
        _ = rec.mad
    # A wildcard over everything matches modules that do not attend (the patch embedding, the projections):
    # only a module of a recorded layer's class is said.
    model = ViT().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad(), vitmad.record(model, layers=["*"]) as rec:
            model(pixels)
    assert rec.layers == [f"blocks.{i}" for i in range(4)] and rec.skipped == {}


class CrossAttention(nn.Module):
    """Image queries over another sequence's keys (text tokens, a second view) through SDPA."""

    def __init__(self):
        super().__init__()
        self.q, self.kv = nn.Linear(DIM, DIM), nn.Linear(DIM, 2 * DIM)

    def forward(self, x, context):
        b, n, _ = x.shape
        q = self.q(x).reshape(b, n, HEADS, -1).transpose(1, 2)
        k, v = self.kv(context).reshape(b, context.shape[1], 2, HEADS, -1).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, DIM)


class SelfAttentionApart(nn.Module):
    """Self-attention with q, k and v projected apart: from one tensor, or (DETR's way) from x + pos made twice."""

    def __init__(self, twice: bool):
        super().__init__()
        self.twice = twice
        self.q, self.k, self.v = nn.Linear(DIM, DIM), nn.Linear(DIM, DIM), nn.Linear(DIM, DIM)

    def forward(self, x, pos):
        b, n, _ = x.shape
        queries = x + pos
        keys = x + pos if self.twice else queries
        q = self.q(queries).reshape(b, n, HEADS, -1).transpose(1, 2)
        k = self.k(keys).reshape(b, n, HEADS, -1).transpose(1, 2)
        v = self.v(x).reshape(b, n, HEADS, -1).transpose(1, 2)
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, DIM)


class LoraSelfAttention(nn.Module):
    """Self-attention whose q projection carries a LoRA adapter (peft's default targets): q = W x + B(A(x)) s. The
    adapter's intermediates are freed mid-forward, and a sum may land at a freed projection's address."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(DIM, DIM), nn.Linear(DIM, DIM), nn.Linear(DIM, DIM)
        self.lora_a, self.lora_b = nn.Linear(DIM, 4, bias=False), nn.Linear(4, DIM, bias=False)

    def forward(self, x, _):
        b, n, _ = x.shape
        q = (self.q(x) + self.lora_b(self.lora_a(x)) * 0.5).reshape(b, n, HEADS, -1).transpose(1, 2)
        k = self.k(x).reshape(b, n, HEADS, -1).transpose(1, 2)
        v = self.v(x).reshape(b, n, HEADS, -1).transpose(1, 2)
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, DIM)


class Wrapper(nn.Module):
    def __init__(self, attention: nn.Module):
        super().__init__()
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, DIM, PATCH, PATCH)
        self.attention = attention

    def forward(self, pixels, other):
        x = self.patch_embed.proj(pixels).flatten(2).transpose(1, 2)
        return x + self.attention(x, other)


def test_cross_attention_through_sdpa_to_as_many_tokens_is_warned_of():
    torch.manual_seed(0)
    pixels = torch.randn(2, 3, 4 * PATCH, 4 * PATCH)
    text = torch.randn(2, 16, DIM)  # as many tokens as the 4 x 4 grid
    model = Wrapper(CrossAttention()).eval()
    with pytest.warns(UserWarning, match="is given a key that is not its query"), torch.no_grad(), \
            vitmad.record(model) as rec:
        model(pixels, text)
    assert rec.layers == ["attention"]


@pytest.mark.parametrize("twice", [False, True])
def test_self_attention_projected_apart_is_not_taken_for_cross_attention(twice):
    torch.manual_seed(0)
    pixels = torch.randn(2, 3, 4 * PATCH, 4 * PATCH)
    pos = torch.randn(1, 16, DIM)
    model = Wrapper(SelfAttentionApart(twice)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad(), vitmad.record(model) as rec:
            model(pixels, pos)
    # The reference: softmax(q k^T / sqrt(d)) in float64 on the 4 x 4 grid of 8 px patches, no prefix token.
    x = model.patch_embed.proj(pixels).flatten(2).transpose(1, 2).double()
    attention = model.attention.double()
    q = attention.q(x + pos.double()).reshape(2, 16, HEADS, -1).transpose(1, 2)
    k = attention.k(x + pos.double()).reshape(2, 16, HEADS, -1).transpose(1, 2)
    a = (q @ k.transpose(-1, -2) * (DIM // HEADS) ** -0.5).softmax(-1)
    ii, jj = torch.meshgrid(torch.arange(4), torch.arange(4), indexing="ij")
    centres = torch.stack([ii.flatten(), jj.flatten()], -1).double() * PATCH + PATCH / 2
    expected = (a * torch.cdist(centres, centres)).sum(-1).mean(-1)
    torch.testing.assert_close(rec.mad[0].double(), expected, rtol=1e-5, atol=1e-4)


class GatedAttention(nn.Module):
    """Explicit softmax attention whose heads a per-token router weighs: a second softmax, [B, N, H]."""

    def __init__(self, gate_first: bool):
        super().__init__()
        self.gate_first = gate_first
        self.qkv, self.router = nn.Linear(DIM, 3 * DIM), nn.Linear(DIM, HEADS)
        with torch.no_grad():
            self.qkv.weight.mul_(4.0)

    def probabilities(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, _ = self.qkv(x).double().reshape(b, n, 3, HEADS, DIM // HEADS).permute(2, 0, 3, 1, 4)
        return (q @ k.transpose(-2, -1) * (DIM // HEADS) ** -0.5).softmax(-1)

    def forward(self, x):
        b, n, _ = x.shape
        gate = self.router(x).softmax(-1) if self.gate_first else None
        q, k, v = self.qkv(x).reshape(b, n, 3, HEADS, DIM // HEADS).permute(2, 0, 3, 1, 4)
        out = (q @ k.transpose(-2, -1) * (DIM // HEADS) ** -0.5).softmax(-1) @ v
        if gate is None:
            gate = self.router(x).softmax(-1)
        return (out.transpose(1, 2) * gate[..., None]).reshape(b, n, DIM)


def test_a_second_softmax_that_cannot_be_placed_refuses_the_layer_whatever_came_first():
    """A gate over the heads, or a second attention over pooled keys, beside a module's own explicit attention: the
    shape of the unplaceable softmax is all vitmad has to go on, so the layer is refused, before or after its
    attention (QA 335: accepting one after placed attention recorded a second, pooled attention silently)."""
    torch.manual_seed(0)
    model = ViT()
    model.blocks = nn.ModuleList([GatedAttention(gate_first=False) for _ in range(2)])
    model.eval()
    pixels = torch.randn(2, 3, 5 * PATCH, 5 * PATCH)
    for gate_first in (False, True):
        model.blocks[0].gate_first = gate_first
        with pytest.raises(ValueError, match=r"blocks\.0 \(GatedAttention\) of ViT: its attention has shape "
                                             r"\[2, 26, 4\]"):
            with torch.no_grad(), vitmad.record(model):
                model(pixels)


class HybridBlock(nn.Module):
    """One class for a hybrid's blocks: a pooling mixer (no attention) or SDPA self-attention, by config."""

    def __init__(self, attention: bool):
        super().__init__()
        self.attention = attention
        self.qkv = nn.Linear(DIM, 3 * DIM)

    state_space = False  # a state-space mixer in place of the pooling one

    def forward(self, x):
        b, n, _ = x.shape
        if not self.attention and self.state_space:  # a decay matrix exp(-softplus(.)) of [B, N, N], no logits
            return x + torch.exp(F.softplus(self.qkv(x)[..., :n]) * -1.5) @ x * 0.1
        if not self.attention:  # PoolFormer's mixer: no logits normalised, nothing missed
            return x + F.avg_pool1d(x.transpose(1, 2), 3, 1, 1).transpose(1, 2)
        q, k, v = self.qkv(x).reshape(b, n, 3, HEADS, DIM // HEADS).permute(2, 0, 3, 1, 4)
        return x + F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, DIM)


@pytest.mark.parametrize("state_space", [False, True])
def test_blocks_of_an_attention_class_that_attend_in_no_form_are_not_warned_of(state_space):
    """QA 335: a hybrid whose first blocks pool (one class, switched by config) was warned of, its pooling blocks
    skipped as attention missed; QA 429, QA 430: so were state-space blocks, whose exp (of [B, N, N] here) was taken
    for logits normalised by hand: only an exp divided by its sum over the last dim is."""
    torch.manual_seed(0)
    model = ViT()
    model.blocks = nn.ModuleList([HybridBlock(i >= 2) for i in range(4)])
    for block in model.blocks:
        block.state_space = state_space
    model.eval()
    pixels = torch.randn(2, 3, 4 * PATCH, 4 * PATCH)
    for layers in (None, ["blocks.*"]):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with torch.no_grad(), vitmad.record(model, layers=layers) as rec:
                model(pixels)
        assert rec.layers == ["blocks.2", "blocks.3"] and rec.skipped == {}


@pytest.mark.parametrize("side", [2, 4, 6, 8])
def test_lora_adapted_self_attention_is_not_taken_for_cross_attention(side):
    """QA 335: the sum q = W x + B(A(x)) s, allocated where a freed lora_B output had been, was taken for a
    projection of lora_A's output (another input than the keys'): a false cross-attention warning."""
    torch.manual_seed(side)
    model = Wrapper(LoraSelfAttention()).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            with torch.no_grad(), vitmad.record(model) as rec:
                model(torch.randn(2, 3, side * PATCH, side * PATCH), None)
            assert rec.layers == ["attention"]
