"""vitmad.record on tiny random-weight timm models (vit with and without registers, dynamic_img_size, deit
distilled, EVA with RoPE), against the attention maps of the same model on its explicit (unfused) path."""

from __future__ import annotations

import copy

import pytest
import torch

timm = pytest.importorskip("timm")

import vitmad  # noqa: E402
from vitmad.recording.module_capture import timm_attention_modules  # noqa: E402

# Probabilities of the fused-path q/k recomputed in float32 vs. the unfused path's own float32 softmax.
RECORD_TOL = {"rtol": 1e-5, "atol": 1e-4}  # atol in pixels

SMALL = dict(depth=2, embed_dim=32, num_heads=2)


# name -> (model name, create kwargs for an input size, prefix tokens, patch)
def _vit(size, **extra):
    return "vit_tiny_patch16_224", dict(**SMALL, img_size=size, patch_size=8, **extra)


FAMILIES = {
    "vit": lambda size: (*_vit(size), 1, 8),
    "vit_reg_tokens": lambda size: (*_vit(size, reg_tokens=3), 4, 8),
    "vit_no_class_token": lambda size: (*_vit(size, class_token=False, global_pool="avg"), 0, 8),
    "vit_dynamic_img_size": lambda size: (*_vit(32, dynamic_img_size=True), 1, 8),
    "deit_distilled": lambda size: (
        "deit_tiny_distilled_patch16_224", dict(**SMALL, img_size=size, patch_size=8), 2, 8),
    "eva_rope": lambda size: (
        "eva02_tiny_patch14_224", dict(**SMALL, img_size=(size[0] * 7 // 8, size[1] * 7 // 8), patch_size=7), 1, 7),
}
SIZES = [(32, 32), (24, 40)]


def unfused_maps(model, pixels) -> list[torch.Tensor]:
    """The attention probabilities of every attention module, from its unfused path (input of attn_drop)."""
    eager = copy.deepcopy(model)
    maps = []
    for module in timm_attention_modules(eager).values():
        module.fused_attn = False
        module.attn_drop.register_forward_pre_hook(lambda _, args: maps.append(args[0]))
    with torch.no_grad():
        eager(pixels)
    return maps


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("family", list(FAMILIES))
def test_record_matches_unfused_maps_and_keeps_outputs(family, size):
    name, kwargs, prefix, patch = FAMILIES[family](size)
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **kwargs).eval()
    modules = timm_attention_modules(model)
    assert all(m.fused_attn for m in modules.values())
    batch = 2
    pixels = torch.randn(batch, 3, size[0] * patch // 8, size[1] * patch // 8,
                         generator=torch.Generator().manual_seed(1))
    grid = (size[0] // 8, size[1] // 8)

    with torch.no_grad():
        plain = model(pixels)
        with vitmad.record(model) as rec:
            recorded = model(pixels)

    torch.testing.assert_close(recorded, plain, rtol=0, atol=0)
    assert rec.layout == vitmad.recording.ModelLayout(patch=patch, grid=grid, num_prefix_tokens=prefix)
    assert rec.layers == list(modules) == ["blocks.0.attn", "blocks.1.attn"]
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())

    maps = unfused_maps(model, pixels)
    expected = torch.stack([vitmad.mad_reference(a, patch, num_prefix_tokens=prefix, grid=grid) for a in maps])
    assert rec.mad.shape == (2, batch, 2) and rec.mad.dtype == torch.float32
    torch.testing.assert_close(rec.mad.double(), expected, **RECORD_TOL)


def test_per_query_renormalized_and_grid_per_call():
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **SMALL, img_size=32, patch_size=8,
                              reg_tokens=2, dynamic_img_size=True).eval()
    with torch.no_grad(), vitmad.record(model, reduction="none", renormalize=True) as rec:
        model(torch.randn(1, 3, 32, 32))
        pixels = torch.randn(1, 3, 16, 56)
        model(pixels)
    assert [c.layout.grid for c in rec.calls] == [(4, 4), (2, 7)]
    maps = unfused_maps(model, pixels)
    expected = torch.stack([
        vitmad.mad_reference(a, 8, num_prefix_tokens=3, grid=[2, 7], renormalize=True, reduction="none")
        for a in maps
    ])
    assert rec.mad.shape == (2, 1, 2, 14)
    torch.testing.assert_close(rec.mad.double(), expected, **RECORD_TOL)


def test_restored_after_exception_and_unfused_recorded_from_its_softmax():
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **SMALL, img_size=32, patch_size=8).eval()
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        before = model(pixels)

        def fail(*_):
            raise RuntimeError("boom")

        # Raises inside the attention module's forward, while its capture mode is active.
        handle = model.blocks[1].attn.q_norm.register_forward_hook(fail)
        with pytest.raises(RuntimeError, match="boom"), vitmad.record(model):
            model(pixels)
        handle.remove()
        assert torch._C._len_torch_function_stack() == 0
        assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
        assert torch.equal(model(pixels), before)

        with vitmad.record(model) as fused:
            model(pixels)
        # The unfused path computes the same probabilities with an explicit softmax: read by the mad op.
        model.blocks[0].attn.fused_attn = False
        with vitmad.record(model) as unfused:
            unfused_out = model(pixels)
        torch.testing.assert_close(unfused_out, before, rtol=1e-5, atol=1e-5)  # the two paths, same model
        assert unfused.layers == fused.layers
        torch.testing.assert_close(unfused.mad, fused.mad, **RECORD_TOL)
        assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_unsupported_model_names_class_and_what_to_pass():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 4, stride=4), torch.nn.Flatten(2))
    with pytest.raises(ValueError, match="found no attention layer vitmad knows in Sequential.*pass layers="):
        vitmad.record(model)
    with pytest.raises(ValueError, match="found no attention layer vitmad knows in Linear"):
        vitmad.record(torch.nn.Linear(3, 3))


class _TokenAttention(torch.nn.Module):
    """A model outside transformers and timm: tokens in, one SDPA self-attention layer."""

    def __init__(self):
        super().__init__()
        self.qk = torch.nn.Linear(8, 16)

    def forward(self, tokens):
        q, k = self.qk(tokens).unflatten(-1, (2, 2, 4)).permute(2, 0, 3, 1, 4)  # 2 x [B, H=2, N, 4]
        self.probs = (q @ k.transpose(-1, -2) * 0.5).softmax(-1)
        return torch.nn.functional.scaled_dot_product_attention(q, k, k, scale=0.5)


def test_any_sdpa_module_with_layout_given_by_hand():
    torch.manual_seed(0)
    model = torch.nn.Sequential(_TokenAttention())
    tokens = torch.randn(3, 1 + 2 * 3, 8)
    with torch.no_grad(), vitmad.record(model, layers=["0"], patch=4, grid=[2, 3]) as rec:
        model(tokens)
        model(tokens)
    assert len(rec.calls) == 2  # without a patch embedding, a call starts with the model's forward
    assert rec.layout == vitmad.recording.ModelLayout(patch=4, grid=(2, 3), num_prefix_tokens=1)
    expected = vitmad.mad_reference(model[0].probs, 4, grid=[2, 3])
    torch.testing.assert_close(rec.mad[0].double(), expected, **RECORD_TOL)


class _BroadcastMaskedAttention(torch.nn.Module):
    """SDPA with what it accepts beyond mad_qk's contract: one k shared by the batch, and a mask that is bool or
    float32 beside bfloat16 queries."""

    def __init__(self, mask):
        super().__init__()
        self.qk = torch.nn.Linear(8, 16)
        self.mask = mask

    def forward(self, tokens):
        q, k = self.qk(tokens).unflatten(-1, (2, 2, 4)).permute(2, 0, 3, 1, 4)  # 2 x [B, H=2, N, 4]
        k = k[:1]
        bias = self.mask if self.mask.dtype != torch.bool else torch.zeros(()).masked_fill(~self.mask, -torch.inf)
        self.probs = (q.double() @ k.double().transpose(-1, -2) * 0.5 + bias.double()).softmax(-1)
        return torch.nn.functional.scaled_dot_product_attention(q, k, k, attn_mask=self.mask, scale=0.5)


@pytest.mark.parametrize("mask_kind", ["bool", "float32"])
def test_sdpa_broadcast_key_and_mask_of_another_dtype(mask_kind):
    torch.manual_seed(0)
    n = 1 + 2 * 3
    mask = torch.rand(n, n) > 0.3 if mask_kind == "bool" else torch.randn(n, n)
    if mask_kind == "bool":
        mask.fill_diagonal_(True)
    model = torch.nn.Sequential(_BroadcastMaskedAttention(mask)).to(torch.bfloat16)
    tokens = torch.randn(3, n, 8, dtype=torch.bfloat16)
    with torch.no_grad(), vitmad.record(model, layers=["0"], patch=4, grid=[2, 3]) as rec:
        model(tokens)
    assert rec.mad.shape == (1, 3, 2)
    # The float32 mask is added unrounded, as SDPA adds it to bfloat16 q and k (QA 398); accumulation is float32.
    expected = vitmad.mad_reference(model[0].probs, 4, grid=[2, 3])
    torch.testing.assert_close(rec.mad[0].double(), expected, **RECORD_TOL)


class _GlobalViewAndCrops(torch.nn.Module):
    """A tower run twice in one forward, as Step3's global view and then its crops (or LLaVA-NeXT-Video's images
    and then a video): two runs on grids of their own."""

    def __init__(self):
        super().__init__()
        self.tower = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=1, img_size=64,
                                       dynamic_img_size=True).eval()

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        crops = torch.cat([image[..., :32, :32], image[..., 32:, 32:]])
        return torch.cat([self.tower(image), self.tower(crops)])


def test_a_tower_run_twice_in_one_forward_warns_and_keeps_both_runs():
    """rec.mad read the last run alone, silently (found by QA on Step3 and LLaVA-NeXT-Video): the recording warns
    once, and each run stays in rec.calls on its own grid, equal to that run recorded alone."""
    model = _GlobalViewAndCrops()
    image = torch.randn(1, 3, 64, 64)
    with torch.no_grad(), vitmad.record(model.tower) as alone:
        model.tower(image)
        model.tower(torch.cat([image[..., :32, :32], image[..., 32:, 32:]]))
    with torch.no_grad(), vitmad.record(model) as rec:
        with pytest.warns(UserWarning, match=r"one forward of _GlobalViewAndCrops ran its recorded layers 2 times .*"
                                             r"rec.mad, rec.layers, rec.per_layer read the last one alone: read "
                                             r"rec.calls\[-2:\]"):
            model(image)
        model(image)  # once per recording: warnings are errors in the tests
    assert len(rec.calls) == 4
    assert [call.geometry[0].grid for call in rec.calls[:2]] == [(4, 4), (2, 2)]
    for recorded, expected in zip(rec.calls[:2], alone.calls):
        assert torch.equal(recorded.mad, expected.mad)
    assert torch.equal(rec.mad, alone.calls[1].mad)


@pytest.mark.parametrize("name, reg_tokens, drop_rate", [("vit_tiny_patch16_224", 0, 0.5),
                                                         ("vit_tiny_patch16_224", 4, 0.1),
                                                         ("eva02_tiny_patch14_224", 0, 0.5)])
def test_patch_dropout_in_training_mode_is_refused_by_name(name, reg_tokens, drop_rate):
    """timm's PatchDropout keeps a random subset of the patches: never placed. With 4 registers and 2 of 16 patches
    dropped, the 19 tokens passed for 3 extra tokens and the full grid, measured silently (found by QA). Eva's
    PatchDropoutWithIndices got the generic refusal, advising grid= and num_prefix_tokens= (QA 261)."""
    torch.manual_seed(0)
    extra = {"reg_tokens": reg_tokens} if reg_tokens else {}
    model = timm.create_model(name, pretrained=False, depth=1, embed_dim=32, num_heads=2, patch_size=8, img_size=32,
                              patch_drop_rate=drop_rate, **extra).train()
    pixels = torch.randn(2, 3, 32, 32)
    with pytest.raises(ValueError, match=r"blocks\.0\.attn .*timm's PatchDropout \(patch_drop, prob "
                                         rf"{drop_rate:g}\) keeps a random subset of the 4x4 = 16 patches in training "
                                         r"mode.*model\.eval\(\)"):
        with vitmad.record(model):
            model(pixels)
    model.eval()  # PatchDropout is off in eval mode: recorded
    with torch.no_grad(), vitmad.record(model) as rec:
        model(pixels)
    assert rec.geometry[0].num_prefix_tokens == 1 + reg_tokens and rec.geometry[0].grid == (4, 4)
