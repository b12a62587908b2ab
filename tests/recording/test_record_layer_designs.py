"""vitmad.record on attention designs beyond the plain ViT block, and its refusals: differential attention (two
softmax maps, one layer), ParallelScalingBlock (attention without an attention module), a timm model wrapped by
transformers, modules making several calls, and messages that say what vitmad saw.

References are the models' own unfused attention probabilities, placed by the geometry written here."""

from __future__ import annotations

import copy
import functools
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vitmad
from conftest import run_hooked, unfused_maps
from vitmad.ops.reference import mad_reference

timm = pytest.importorskip("timm")

TOL = {"rtol": 1e-5, "atol": 1e-4}  # pixels
TINY = dict(depth=2, embed_dim=32, num_heads=2, img_size=32, patch_size=8)  # a 4 x 4 grid of 8-pixel patches


# model, the class computing its differential attention, the layers' names
DIFFERENTIAL = [
    ("vit_dwee_patch16_reg1_gap_256", "DiffAttention", ["blocks.0.attn", "blocks.1.attn"]),
    ("vit_dpwee_patch16_reg1_gap_256", "DiffParallelScalingBlock", ["blocks.0", "blocks.1"]),
]


@pytest.mark.parametrize("name, class_name, layers", DIFFERENTIAL, ids=[d[0] for d in DIFFERENTIAL])
@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_differential_attention_is_one_layer_with_the_mad_of_the_applied_attention(name, class_name, layers,
                                                                                   renormalize, reduction):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **TINY).eval()
    for module in model.modules():  # a lambda far from 0, so that the second map matters
        if type(module).__name__ == class_name:
            module.lambda_init = 0.6
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        plain = model(pixels)
    with torch.no_grad(), vitmad.record(model, renormalize=renormalize, reduction=reduction) as rec:
        recorded_output = model(pixels)
    torch.testing.assert_close(recorded_output, plain)
    assert rec.layers == layers  # one entry per layer, not per softmax call

    eager = copy.deepcopy(model)
    maps = unfused_maps(eager, class_name)
    with torch.no_grad():
        eager(pixels)
    assert len(maps) == 2
    prefix = 1  # one register token and no CLS (vit_*_reg1_gap_*: global average pooling)
    for index, (module, probabilities) in enumerate(maps):
        batch, _, n, _ = probabilities.shape
        pair = probabilities.view(batch, module.num_heads, 2, n, n)
        with torch.no_grad():
            lam = float(module._compute_lambda())
        applied = pair[:, :, 0] - lam * pair[:, :, 1]  # the attention the layer multiplies V with
        options = {"num_prefix_tokens": prefix, "grid": [4, 4], "renormalize": renormalize, "reduction": reduction}
        torch.testing.assert_close(rec.mad[index].double(), mad_reference(applied, 8, **options), **TOL)
        parts = rec.calls[-1].components[layers[index]]
        assert parts["lambda"] == pytest.approx(lam)
        for part, recorded in zip((pair[:, :, 0], pair[:, :, 1]), parts["mad"], strict=True):
            torch.testing.assert_close(recorded.double(), mad_reference(part, 8, **options), **TOL)


@pytest.mark.parametrize("name", ["vit_base_patch16_xp_224", "vit_pwee_patch16_reg1_gap_256"])
def test_parallel_scaling_blocks_are_found_and_recorded(name):
    torch.manual_seed(1)
    model = timm.create_model(name, pretrained=False, **TINY).eval()
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        plain = model(pixels)
    with torch.no_grad(), vitmad.record(model) as rec:
        torch.testing.assert_close(model(pixels), plain)
    assert rec.layers == ["blocks.0", "blocks.1"]
    eager = copy.deepcopy(model)
    maps = unfused_maps(eager, "ParallelScalingBlock")
    with torch.no_grad():
        eager(pixels)
    prefix = model.num_prefix_tokens
    expected = torch.stack([mad_reference(m, 8, num_prefix_tokens=prefix, grid=[4, 4]) for _, m in maps])
    torch.testing.assert_close(rec.mad.double(), expected, **TOL)


def test_timm_model_wrapped_by_transformers_is_recorded_like_the_timm_model():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(2)
    config = transformers.TimmWrapperConfig(architecture="vit_tiny_patch16_224", model_args=TINY)
    wrapped = transformers.TimmWrapperModel(config).eval()
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), vitmad.record(wrapped) as rec:
        wrapped(pixels)
    assert rec.layers == ["timm_model.blocks.0.attn", "timm_model.blocks.1.attn"]
    eager = copy.deepcopy(wrapped.timm_model)
    maps = unfused_maps(eager, "Attention")
    with torch.no_grad():
        eager(pixels)
    expected = torch.stack([mad_reference(m, 8, num_prefix_tokens=1, grid=[4, 4]) for _, m in maps])
    torch.testing.assert_close(rec.mad.double(), expected, **TOL)



def test_hierarchical_timm_model_wrapped_by_transformers_reads_its_stage_strides():
    """The timm families read the stage strides from the timm model's feature_info, whose module names
    (stages.3) are its own: wrapped (transformers' TimmWrapperModel, FastVLM's tower), they were looked up on the
    wrapper under its names (timm_model.stages.3) and every FastViT, MaxViT, CoAtNet, TinyViT, GCViT and NesT layer
    was refused. FastViT's last-stage attention against its unfused probabilities, placed here: a global map of
    32 px cells, ceil(64 / 32) x ceil(96 / 32)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(3)
    config = transformers.TimmWrapperConfig(architecture="fastvit_sa12", model_args=dict(
        embed_dims=(16, 32, 64, 128), layers=(1, 1, 1, 1)))
    wrapped = transformers.TimmWrapperModel(config).eval()
    pixels = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        plain = wrapped(pixels).last_hidden_state
        with vitmad.record(wrapped, reduction="none") as rec:
            recorded = wrapped(pixels).last_hidden_state
    assert torch.equal(plain, recorded)
    assert rec.layers == ["timm_model.stages.3.blocks.0.token_mixer"]
    assert rec.geometry[0].grid == (2, 3) and rec.geometry[0].stride == (32.0, 32.0)
    eager = copy.deepcopy(wrapped.timm_model)
    maps = unfused_maps(eager, "Attention")
    with torch.no_grad():
        eager.forward_features(pixels)
    rows, cols = torch.meshgrid(torch.arange(2), torch.arange(3), indexing="ij")
    centres = (torch.stack([rows, cols], -1).reshape(6, 2).double() + 0.5) * 32
    expected = (maps[0][1].double() * torch.cdist(centres, centres)).sum(-1)  # [B, H, 6], row-major
    torch.testing.assert_close(rec.per_layer[0].double(), expected, **TOL)


def test_whole_fastvlm_records_its_tower_alone():
    """FastVLM's FastViT tower embeds with a convolutional stem (no patch embedding to find the tower by): the whole
    model's recording took every attention module, the Qwen2 language model's causal one too, and the user's forward
    raised there (QA helper-115). The tower is the module the model names vision_tower: its attention is recorded
    alone, against its unfused probabilities placed here (two stages of 32 and 64 px cells over 128 x 160 px)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(5)
    vision = transformers.TimmWrapperConfig(architecture="fastvit_mci3", do_pooling=True, global_pool="avg",
                                            hidden_size=128, model_args={"inference_mode": True, "layers": (
                                                1, 1, 1, 1, 1), "embed_dims": (8, 16, 32, 32, 64)})
    text = transformers.Qwen2Config(hidden_size=32, vocab_size=100, intermediate_size=32, num_attention_heads=2,
                                    num_key_value_heads=1, num_hidden_layers=1)
    model = transformers.FastVlmForConditionalGeneration(transformers.FastVlmConfig(
        vision_config=vision, text_config=text, image_token_index=99)).eval()
    pixels = torch.randn(1, 3, 128, 160)
    ids = torch.cat([torch.full((1, 6), 99), torch.randint(1, 90, (1, 5))], 1)  # the 2 x 3 map's 6 image tokens
    with torch.no_grad():
        plain = model(input_ids=ids, pixel_values=pixels).logits
        with vitmad.record(model, reduction="none") as rec:
            recorded = model(input_ids=ids, pixel_values=pixels).logits
    assert torch.equal(plain, recorded)
    tower = "model.vision_tower.timm_model."
    assert rec.layers == [tower + "stages.3.blocks.0.token_mixer", tower + "stages.4.blocks.0.token_mixer"]
    eager = copy.deepcopy(model.model.vision_tower.timm_model)
    maps = unfused_maps(eager, "Attention")
    with torch.no_grad():
        eager.forward_features(pixels)
    assert len(maps) == 2
    for index, (stride, (rows, cols)) in enumerate([(32, (4, 5)), (64, (2, 3))]):
        r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
        centres = (torch.stack([r, c], -1).reshape(-1, 2).double() + 0.5) * stride
        expected = (maps[index][1].double() * torch.cdist(centres, centres)).sum(-1)  # [B, H, T], row-major
        torch.testing.assert_close(rec.per_layer[index].double(), expected, **TOL)


@pytest.mark.parametrize("architecture, args, size", [
    ("maxvit_nano_rw_256", dict(img_size=64), 64),
    ("coatnet_nano_rw_224", dict(img_size=64), 64),
    ("tiny_vit_5m_224", dict(embed_dims=(16, 32, 64, 64), depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 2)), 224),
    ("gcvit_xxtiny", dict(img_size=64), 64),
    ("nest_tiny", dict(img_size=64), 64),
])
def test_timm_families_wrapped_by_transformers_equal_the_timm_model(architecture, args, size):
    """Each of these families is checked against its eager attention in its own tests; wrapped, it must give the
    very same recording (it was refused)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(4)
    wrapped = transformers.TimmWrapperModel(transformers.TimmWrapperConfig(architecture=architecture,
                                                                           model_args=args)).eval()
    pixels = torch.randn(1, 3, size, size)
    with torch.no_grad(), vitmad.record(wrapped.timm_model) as alone:
        wrapped.timm_model.forward_features(pixels)
    with torch.no_grad(), vitmad.record(wrapped) as rec:
        wrapped(pixels)
    assert rec.layers == ["timm_model." + name for name in alone.layers] and rec.skipped == {}
    assert [g.stride for g in rec.geometry] == [g.stride for g in alone.geometry]
    assert torch.equal(rec.mad.nan_to_num(-1), alone.mad.nan_to_num(-1))

@pytest.mark.parametrize("architecture, args, size", [
    ("nest_tiny", dict(img_size=64), 64),
    ("halonet26t", {}, 256),  # its first stride-32 block attends before downsampling, at the stride of stage 2
])
@pytest.mark.parametrize("form", ["features_only", "sequential"])
def test_timm_features_only_and_wrapped_equal_the_timm_model(architecture, args, size, form):
    """timm's features_only wrapper renames the top-level modules (levels.0 -> levels_0, stages.3 -> stages_3) and
    keeps feature_info's names: NesT's levels and the stage before HaloNet's first stride-32 block were not found
    there, and both were refused (QA 334); inside an nn.Sequential both record. Each family is checked against its
    eager attention in its own tests; so held, it must give the very same recording."""
    torch.manual_seed(4)
    alone = timm.create_model(architecture, **args).eval()
    torch.manual_seed(4)
    if form == "features_only":
        held = timm.create_model(architecture, features_only=True, **args).eval()
    else:
        held = nn.Sequential(copy.deepcopy(alone)).eval()
    pixels = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), vitmad.record(alone) as bare:
        alone(pixels)
    with torch.no_grad(), vitmad.record(held) as rec:
        held(pixels)

    def renamed(name):
        first, second, rest = name.split(".", 2)
        return f"{first}_{second}.{rest}" if form == "features_only" else f"0.{name}"

    assert rec.layers == [renamed(name) for name in bare.layers] and rec.skipped == {}
    assert [g.stride for g in rec.geometry] == [g.stride for g in bare.geometry]
    assert len({g.stride for g in bare.geometry}) > 1  # several stages, each at its own stride
    assert torch.equal(rec.mad.nan_to_num(-1), bare.mad.nan_to_num(-1))


class _PatchEmbedding(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Conv2d(3, 8, 4, stride=4)

    def forward(self, x):
        return self.proj(x)


class _Calls(nn.Module):
    """Attention over ``tokens`` of the 8 x 8 grid, made in ``calls`` SDPA calls."""

    def __init__(self, calls: int, tokens: int = 64):
        super().__init__()
        self.calls, self.tokens = calls, tokens

    def forward(self, x):
        q = x[:, None, : self.tokens]
        return sum(F.scaled_dot_product_attention(q, q, q) for _ in range(self.calls))


class _Model(nn.Module):
    def __init__(self, attention: nn.Module):
        super().__init__()
        self.embed = _PatchEmbedding()
        self.attention = attention
        self.idle = nn.Linear(8, 8)

    def forward(self, pixels):
        x = self.embed(pixels).flatten(2).transpose(1, 2)  # [B, 64, 8]
        return self.attention(x)


def test_a_module_with_several_unknown_calls_is_refused_by_name():
    model = _Model(_Calls(3))
    with pytest.raises(ValueError, match=r"vitmad.record: attention \(_Calls\) of _Model made 3 attention calls in "
                                         r"one forward; .* leave this module out with layers="):
        with vitmad.record(model, layers=["attention"], num_prefix_tokens=0):
            model(torch.randn(1, 3, 32, 32))
    with vitmad.record(_Model(_Calls(1)), layers=["attention"]) as rec:
        rec.model(torch.randn(1, 3, 32, 32))
    assert rec.layers == ["attention"] and rec.mad.shape == (1, 1, 1)  # [L, B, H]


def test_fewer_tokens_than_the_grid_is_explained_without_a_negative_count():
    model = _Model(_Calls(1, tokens=16))  # a 4 x 4 window of the 8 x 8 grid
    with pytest.raises(ValueError) as info, vitmad.record(model, layers=["attention"]):
        model(torch.randn(1, 3, 32, 32))
    message = str(info.value)
    assert ("vitmad.record: attention (_Calls) of _Model: it attends over 16 tokens, fewer than the 8x8 = 64 "
            "patches of the patch embedding") in message
    assert "-48" not in message and "ViTMAE" not in message


def test_a_recording_that_saw_no_attention_says_what_ran():
    model = _Model(_Calls(1))
    with vitmad.record(model, layers=["idle"]) as rec:
        model(torch.randn(1, 3, 32, 32))
    # idle never runs: the forward took a path without the recorded module (each call notes whether one ran).
    with pytest.raises(RuntimeError, match=r"vitmad.record: _Model ran 1 time\(s\) in this recording, but not "
                                           r"through the modules being recorded \(idle\): its forward took a path "
                                           r"without them"):
        _ = rec.mad
    # Run, computing no attention: warned as it runs, and said as such.
    with vitmad.record(model, layers=["embed"]) as ran, pytest.warns(UserWarning, match="ran without computing"):
        model(torch.randn(1, 3, 32, 32))
    with pytest.raises(RuntimeError, match=r"vitmad.record: _Model ran, but none of the 1 modules being recorded "
                                           r"\(embed\) computed attention \(F.scaled_dot_product_attention, "
                                           r"torch's flex_attention, F.multi_head_attention_forward, "
                                           r"transformers' AttentionInterface or a softmax\) in that forward call"):
        _ = ran.mad
    with vitmad.record(model, layers=["attention"]) as unused:
        pass
    with pytest.raises(RuntimeError, match="vitmad.record: _Model has not run in this recording"):
        _ = unused.mad


def test_module_of_any_design_calling_sdpa_is_found_without_layers():
    model = _Model(_Calls(1))
    with vitmad.record(model) as found:  # no timm or transformers convention: found by what its forward calls
        model(torch.randn(1, 3, 32, 32))
    with vitmad.record(model, layers=["attention"]) as named:
        model(torch.randn(1, 3, 32, 32))
    assert found.layers == named.layers == ["attention"] and found.mad.shape == (1, 1, 1)  # [L, B, H]


def test_model_without_attention_is_refused_with_advice_that_works():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 8, stride=8), torch.nn.Flatten(2))
    with pytest.raises(ValueError,
                       match="found no attention layer vitmad knows in Sequential: .* pass layers=") as info:
        vitmad.record(model)
    assert "ViTMAE" not in str(info.value)


_ALIAS = F.scaled_dot_product_attention


def _attend(q, k, v):
    return F.scaled_dot_product_attention(q, k, v)


class _Block(nn.Module):
    """Single-head self-attention over its tokens, SDPA called by name."""

    def __init__(self):
        super().__init__()
        self.q, self.k = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        q, k = self.q(x)[:, None], self.k(x)[:, None]
        return x + F.scaled_dot_product_attention(q, k, q)[:, 0]


class _ViaAlias(_Block):
    def forward(self, x):
        q, k = self.q(x)[:, None], self.k(x)[:, None]
        return x + _ALIAS(q, k, q)[:, 0]


class _ViaHelper(_Block):
    def forward(self, x):
        q, k = self.q(x)[:, None], self.k(x)[:, None]
        return x + _attend(q, k, q)[:, 0]


class _ViaMethod(_Block):
    def _attention(self, q, k):
        return _attend(q, k, q)

    def forward(self, x):
        q, k = self.q(x)[:, None], self.k(x)[:, None]
        return x + self._attention(q, k)[:, 0]


class _Mixer(_Block):
    """The same attention as an explicit softmax, in a class vitmad does not take for attention by its name."""

    def forward(self, x):
        q, k = self.q(x), self.k(x)
        return x + (q @ k.transpose(-2, -1) * 8 ** -0.5).softmax(-1) @ q


_KINDS = {"sdpa": _Block, "alias": _ViaAlias, "helper": _ViaHelper, "method": _ViaMethod, "softmax": _Mixer}


class _Stack(nn.Module):
    def __init__(self, kinds):
        super().__init__()
        self.embed = _PatchEmbedding()
        self.blocks = nn.ModuleList(_KINDS[kind]() for kind in kinds)

    def forward(self, pixels):
        x = self.embed(pixels).flatten(2).transpose(1, 2)  # [B, 64, 8]
        for block in self.blocks:
            x = block(x)
        return x


def test_attention_reached_through_an_alias_a_helper_or_a_method_is_found_and_a_gap_is_warned_of():
    """A block calling SDPA through an alias, a helper function or a method was left out of the default layers
    while its neighbours were recorded, silently: rec.mad[1] was another block's (QA 257). They are found now; a
    block vitmad still cannot tell (an explicit softmax in a class not named as attention) between recorded ones
    is warned of."""
    torch.manual_seed(0)
    pixels = torch.randn(2, 3, 32, 32)
    model = _Stack(["sdpa", "alias", "helper", "method", "sdpa"]).eval()
    with torch.no_grad(), vitmad.record(model) as found:
        model(pixels)
    with torch.no_grad(), vitmad.record(model, layers=["blocks.*"]) as named:
        model(pixels)
    assert found.layers == named.layers == [f"blocks.{i}" for i in range(5)]
    torch.testing.assert_close(found.mad, named.mad, rtol=0, atol=0)
    # The reference: each block's own probabilities on the 8 x 8 grid of 4 px patches, no prefix token.
    maps, x = [], model.embed(pixels).flatten(2).transpose(1, 2)
    with torch.no_grad():
        for block in model.blocks:
            q, k = block.q(x).double(), block.k(x).double()
            maps.append((q @ k.transpose(-2, -1) * 8 ** -0.5).softmax(-1)[:, None])
            x = block(x)
    expected = torch.stack([mad_reference(a, 4, num_prefix_tokens=0, grid=(8, 8)) for a in maps])
    torch.testing.assert_close(found.mad.double(), expected, **TOL)

    gap = _Stack(["sdpa", "softmax", "sdpa"]).eval()
    with pytest.warns(UserWarning, match=r"^vitmad\.record: blocks\.1 of _Stack, in a list beside recorded attention "
                                         r"layers, compute a softmax that vitmad does not take for attention"):
        with torch.no_grad(), vitmad.record(gap) as rec:
            gap(pixels)
    assert rec.layers == ["blocks.0", "blocks.2"]


def test_a_block_shared_across_depth_is_recorded_at_each_run_without_a_warning():
    """QA 420: one block held three times (nn.ModuleList([block] * 3), ALBERT-style weight sharing) was recorded at
    each run, yet warned of as "blocks.1, blocks.2 ... left out of rec.layers" with advice to name them, which
    layers= refused as matching no module: torch lists a module held twice under its first name only."""
    torch.manual_seed(0)
    pixels = torch.randn(2, 3, 32, 32)
    model = _Stack(["sdpa"]).eval()
    model.blocks = nn.ModuleList([model.blocks[0]] * 3)
    with torch.no_grad(), vitmad.record(model) as rec:  # (a warning is an error in this suite)
        model(pixels)
    assert rec.layers == ["blocks.0"] * 3
    maps, x, block = [], model.embed(pixels).flatten(2).transpose(1, 2), model.blocks[0]
    with torch.no_grad():
        for _ in range(3):
            q, k = block.q(x).double(), block.k(x).double()
            maps.append((q @ k.transpose(-2, -1) * 8 ** -0.5).softmax(-1)[:, None])
            x = block(x)
    expected = torch.stack([mad_reference(a, 4, num_prefix_tokens=0, grid=(8, 8)) for a in maps])
    torch.testing.assert_close(rec.mad.double(), expected, **TOL)
    for pattern in ("blocks.1", "blocks.[12]"):
        with pytest.raises(ValueError, match=rf"layers pattern '{re.escape(pattern)}' matches only names under which "
                                             r"_Stack holds modules it lists under other names, first held there: "
                                             r"'blocks\.0' \(weights shared across depth"):
            with vitmad.record(model, layers=[pattern]):
                pass
    # A second container of the same blocks (an alias): its names are refused alike, naming the first ones.
    model.blocks = nn.ModuleList(_KINDS["sdpa"]() for _ in range(2))
    model.alias = nn.Sequential(*model.blocks)
    with pytest.raises(ValueError, match=r"layers pattern 'alias\.\?' matches only names .* first held there: "
                                         r"'blocks\.0', 'blocks\.1' \("):
        with vitmad.record(model, layers=["alias.?"]):
            pass


def attn(q, k, v):  # a module-level helper named as a block's attention submodule is (QA 262's name collision)
    return F.scaled_dot_product_attention(q, k, v)


class _SoftmaxAs(_Block):
    """Explicit softmax through an nn.Softmax stored under another name, in a class not named as attention."""

    def __init__(self):
        super().__init__()
        self.act = nn.Softmax(dim=-1)

    def forward(self, x):
        q, k = self.q(x)[:, None], self.k(x)[:, None]
        return x + (self.act(q @ k.transpose(-2, -1) * 8 ** -0.5) @ q)[:, 0]


class _Pooled(_Stack):
    """A model whose own method attends (attention pooling by a learned query): it holds the blocks."""

    def __init__(self, kinds):
        super().__init__(kinds)
        self.query = nn.Parameter(torch.randn(1, 1, 8))

    def pool(self, x):
        return F.scaled_dot_product_attention(self.query.expand(len(x), -1, -1)[:, None], x[:, None], x[:, None])

    def forward(self, pixels):
        return self.pool(super().forward(pixels))


class _Collide(_Block):
    """Calls its submodule self.attn, while the module's globals hold a function named attn."""

    def __init__(self):
        super().__init__()
        self.attn = _Block()

    def forward(self, x):
        return self.attn(x)


def test_discovery_does_not_take_holders_or_attributes_for_attention_and_wildcards_keep_the_users_modules():
    """QA 262: following helpers took a model whose pool method attends for one layer swallowing its blocks, and a
    block's self.attn for the module-level function attn; the wildcard filter dropped a user's block computing its
    softmax through nn.Softmax named act, and a checkpoint wrapper of one (both were recorded before)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    torch.manual_seed(0)
    pixels = torch.randn(2, 3, 32, 32)
    pooled = _Pooled(["sdpa", "alias", "sdpa"]).eval()
    with torch.no_grad(), vitmad.record(pooled, num_prefix_tokens=0) as rec:
        pooled(pixels)
    assert rec.layers == ["blocks.0", "blocks.1", "blocks.2"]
    collide = _Stack(["sdpa"]).eval()
    collide.blocks = nn.ModuleList([_Collide(), _Collide()])
    with torch.no_grad(), vitmad.record(collide, num_prefix_tokens=0) as rec:
        collide(pixels)
    assert rec.layers == ["blocks.0.attn", "blocks.1.attn"]
    stack = _Stack(["sdpa", "sdpa", "sdpa"]).eval()
    stack.blocks[1] = _SoftmaxAs()
    with torch.no_grad(), vitmad.record(stack, layers=["blocks.*"]) as named:
        stack(pixels)
    wrapped = _Stack(["sdpa", "sdpa", "sdpa"]).eval()
    wrapped.blocks[1] = checkpoint_wrapper(_SoftmaxAs())
    with torch.no_grad(), vitmad.record(wrapped, layers=["blocks.?"]) as checkpointed:
        wrapped(pixels)
    assert named.layers == checkpointed.layers == ["blocks.0", "blocks.1", "blocks.2"]
    # The reference: each block's own probabilities, no prefix token.
    maps, x = [], stack.embed(pixels).flatten(2).transpose(1, 2)
    with torch.no_grad():
        for block in stack.blocks:
            q, k = block.q(x).double(), block.k(x).double()
            maps.append((q @ k.transpose(-2, -1) * 8 ** -0.5).softmax(-1)[:, None])
            x = block(x)
    expected = torch.stack([mad_reference(a, 4, num_prefix_tokens=0, grid=(8, 8)) for a in maps])
    torch.testing.assert_close(named.mad.double(), expected, **TOL)


def _own_grid_mad(modules, run, project) -> torch.Tensor:
    """[L, B, 1] float64 MAD of each module's own one-head softmax of ``project(module, x)`` (its q and k) for the
    input ``x`` it receives in ``run()``: no prefix token, _Stack's 8 x 8 patches of 4 px."""
    inputs = {}
    handles = [m.register_forward_pre_hook(lambda m, args: inputs.__setitem__(m, args[0])) for m in modules]
    run_hooked(handles, run)
    maps = []
    for module in modules:
        q, k = (t.double() for t in project(module, inputs[module]))
        maps.append((q @ k.transpose(-2, -1) * 8 ** -0.5).softmax(-1)[:, None])
    return torch.stack([mad_reference(a, 4, num_prefix_tokens=0, grid=(8, 8)) for a in maps])


class _TwoAttentions(nn.Module):
    """A user's block that attends only through the two attention modules it holds: its forward names no softmax."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(8)
        self.attn, self.attn2 = _Block(), _Block()

    def forward(self, x):
        return self.attn2(self.attn(self.norm(x)))


def test_a_wildcards_block_of_the_users_attending_through_its_modules_records_them():
    """README: a wildcard's block that computes no attention of its own records the attention modules it holds
    ("blocks.?"). A block of the user's was taken whole (any module of the user's "may compute attention"), and one
    holding two attention modules refused as making "2 attention calls in one forward" (QA 405)."""
    torch.manual_seed(0)
    pixels = torch.randn(2, 3, 32, 32)
    model = _Stack([]).eval()
    model.blocks = nn.ModuleList([_TwoAttentions(), _TwoAttentions()])
    modules = [attention for block in model.blocks for attention in (block.attn, block.attn2)]
    expected = _own_grid_mad(modules, lambda: model(pixels), lambda m, x: (m.q(x), m.k(x)))
    with torch.no_grad(), vitmad.record(model, layers=["blocks.?"]) as rec:
        model(pixels)
    assert rec.layers == [f"blocks.{i}.{name}" for i in range(2) for name in ("attn", "attn2")]
    torch.testing.assert_close(rec.mad.double(), expected, **TOL)


class _Mixer8(nn.Module):
    """Attention over the tokens that vitmad does not find (no attention in its name, an explicit softmax)."""

    def __init__(self):
        super().__init__()
        self.wq, self.wk = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        logits = (self.wq(x) @ self.wk(x).transpose(-1, -2) * 8 ** -0.5)[:, None]  # one head
        return x + (logits.softmax(-1) @ x[:, None])[:, 0]


class _OwnSoftmaxAttention(_Mixer8):
    """Found by vitmad: an attention class with query and key projections computing a softmax."""

    def __init__(self):
        super().__init__()
        self.q, self.k = self.wq, self.wk


class _SpecialSoftmaxAttention(_OwnSoftmaxAttention):
    def forward(self, x):
        logits = (self.wq(x) @ self.wk(x).transpose(-1, -2) * 8 ** -0.5)[:, None]
        return x + (torch.special.softmax(logits, -1) @ x[:, None])[:, 0]


def test_a_softmax_spelled_torch_special_softmax_is_read():
    """QA 412: torch.special.softmax (torch's softmax under another name) was not read: its layer left rec.layers
    without a word, and the next layer's values took its index."""
    torch.manual_seed(0)
    model = _Stack([]).eval()
    model.blocks = nn.ModuleList([_OwnSoftmaxAttention(), _SpecialSoftmaxAttention(), _OwnSoftmaxAttention()])
    pixels = torch.randn(2, 3, 32, 32)
    expected = _own_grid_mad(model.blocks, lambda: model(pixels), lambda m, x: (m.wq(x), m.wk(x)))
    with torch.no_grad(), vitmad.record(model) as rec:
        model(pixels)
    assert rec.layers == ["blocks.0", "blocks.1", "blocks.2"] and rec.skipped == {}
    torch.testing.assert_close(rec.mad.double(), expected, **TOL)


class _PastedAttention(nn.Module):
    """lucidrains' vit-pytorch Attention as users paste it: its softmax is an nn.Softmax it holds (self.attend)."""

    def __init__(self):
        super().__init__()
        self.attend = nn.Softmax(dim=-1)
        self.to_qkv = nn.Linear(8, 24, bias=False)

    def forward(self, x):
        q, k, v = (t[:, None] for t in self.to_qkv(x).chunk(3, dim=-1))
        return x + (self.attend(q @ k.transpose(-1, -2) * 8 ** -0.5) @ v)[:, 0]


def test_a_users_attention_calling_the_nn_softmax_it_holds_is_found():
    """QA 412: found by its source's "softmax(" alone, the pasted pattern was refused as no attention vitmad knows
    (it recorded only with layers=)."""
    torch.manual_seed(0)
    model = _Stack([]).eval()
    model.blocks = nn.ModuleList([_PastedAttention(), _PastedAttention()])
    pixels = torch.randn(2, 3, 32, 32)
    expected = _own_grid_mad(model.blocks, lambda: model(pixels), lambda m, x: m.to_qkv(x).chunk(3, dim=-1)[:2])
    with torch.no_grad(), vitmad.record(model) as rec:
        model(pixels)
    assert rec.layers == ["blocks.0", "blocks.1"]
    torch.testing.assert_close(rec.mad.double(), expected, **TOL)


class _FoundAndMixer(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn, self.mixer = _OwnSoftmaxAttention(), _Mixer8()

    def forward(self, x):
        return self.mixer(self.attn(x))


class _FoundAndOwnCAttn(nn.Module):
    """Attends through an attention module vitmad finds, then itself with projections named as no rule names them
    (nanoGPT's c_attn)."""

    def __init__(self):
        super().__init__()
        self.attn, self.c_attn = _OwnSoftmaxAttention(), nn.Linear(8, 16)

    def forward(self, x):
        x = self.attn(x)
        q, k = self.c_attn(x).chunk(2, dim=-1)
        return x + ((q @ k.transpose(-1, -2) * 8 ** -0.5)[:, None].softmax(-1) @ x[:, None])[:, 0]


@pytest.mark.parametrize("block", [_FoundAndMixer, _FoundAndOwnCAttn], ids=["token mixer", "own c_attn"])
def test_a_wildcards_block_attending_beside_the_module_vitmad_finds_is_still_taken_whole(block):
    """Replaced by the attention module vitmad finds in it, the block's other attention went unrecorded without a
    word: a token mixer it holds (QA 406), or its own, with projections named outside vitmad's list (QA 419). Taken
    whole, its two attention calls are refused, as before."""
    model = _Stack([]).eval()
    model.blocks = nn.ModuleList([block(), block()])
    with pytest.raises(ValueError, match=rf"blocks.0 \({block.__name__}\) of _Stack made 2 attention calls"):
        with torch.no_grad(), vitmad.record(model, layers=["blocks.?"]):
            model(torch.randn(2, 3, 32, 32))


def test_an_unrecognised_block_first_or_last_in_a_list_is_warned_of_but_not_norms_or_mlps():
    """The gap warning looked only between recorded blocks (QA 262: a softmax block first was left out in
    silence), and warned of norms and MLPs between them."""
    pixels = torch.randn(2, 3, 32, 32)
    first = _Stack(["softmax", "sdpa", "sdpa"]).eval()
    with pytest.warns(UserWarning, match=r"^vitmad\.record: blocks\.0 of _Stack, in a list beside recorded"):
        with torch.no_grad(), vitmad.record(first) as rec:
            first(pixels)
    assert rec.layers == ["blocks.1", "blocks.2"]
    mixed = _Stack(["sdpa", "sdpa"]).eval()
    mixed.blocks = nn.ModuleList([_Block(), nn.LayerNorm(8), nn.Sequential(nn.Linear(8, 8), nn.GELU()), _Block()])
    with torch.no_grad(), vitmad.record(mixed) as rec:  # no warning: warnings are errors in the tests
        mixed(pixels)
    assert rec.layers == ["blocks.0", "blocks.3"]


class _TwoLists(_Stack):
    """Local blocks vitmad finds (SDPA), then global ones it cannot tell (an explicit softmax), in a second list."""

    def __init__(self):
        super().__init__(["sdpa", "sdpa"])
        self.global_blocks = nn.ModuleList(_KINDS["softmax"]() for _ in range(2))

    def forward(self, pixels):
        x = super().forward(pixels)
        for block in self.global_blocks:
            x = block(x)
        return x


def test_an_unrecognised_block_in_a_second_list_beside_the_recorded_one_is_warned_of():
    """QA 265: only the list holding recorded layers was looked at, so a second list of attention blocks vitmad
    cannot tell was left out in silence. A list inside a recorded layer is that layer's own."""
    pixels = torch.randn(2, 3, 32, 32)
    model = _TwoLists().eval()
    with pytest.warns(UserWarning, match=r"^vitmad\.record: global_blocks\.0, global_blocks\.1 of _TwoLists, in a "
                                         r"list beside recorded attention layers, compute a softmax"):
        with torch.no_grad(), vitmad.record(model) as rec:
            model(pixels)
    assert rec.layers == ["blocks.0", "blocks.1"]
    inner = _Stack(["sdpa", "sdpa"]).eval()
    inner.blocks[1].parts = nn.ModuleList([_KINDS["softmax"]()])  # inside a recorded layer: no warning
    with torch.no_grad(), vitmad.record(inner) as rec:
        inner(pixels)
    assert rec.layers == ["blocks.0", "blocks.1"]


class _SoftmaxHead(nn.Module):
    """A classifier head returning probabilities: a softmax of a projection, no attention."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        return self.fc(x.mean(1)).softmax(-1)


class _Router(nn.Module):
    """A mixture-of-experts layer: its gate's softmax weighs the experts."""

    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(8, 2)
        self.experts = nn.ModuleList([nn.Linear(8, 8) for _ in range(2)])

    def forward(self, x):
        weights = F.softmax(self.gate(x), -1)
        return sum(weights[..., i:i + 1] * expert(x) for i, expert in enumerate(self.experts))


class _WithHeads(_Stack):
    def __init__(self):
        super().__init__(["sdpa", "sdpa"])
        self.routers = nn.ModuleList([_Router(), _Router()])
        self.heads = nn.ModuleList([_SoftmaxHead(), nn.Sequential(nn.Linear(8, 5), nn.Softmax(-1))])

    def forward(self, pixels):
        x = self.embed(pixels).flatten(2).transpose(1, 2)
        for block, router in zip(self.blocks, self.routers):
            x = router(block(x))
        return [self.heads[0](x), self.heads[1](x.mean(1))]


def test_lists_of_heads_and_routers_beside_the_recorded_blocks_are_no_gap():
    """QA 270: looking at every list, the gap warning took a list of classifier heads and a list of MoE routers (a
    softmax of a projection each) for attention left out. A list holding no recorded layer is a gap only where its
    blocks also multiply matrices, as the second list of attention blocks above does."""
    model = _WithHeads().eval()
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), vitmad.record(model) as rec:  # no warning: warnings are errors in the tests
        model(pixels)
    assert rec.layers == ["blocks.0", "blocks.1"]
    # Attention blocks vitmad cannot tell held in a ModuleDict are a gap (QA 270: only lists were looked at).
    held = _Stack(["sdpa", "sdpa"]).eval()
    held.extra = nn.ModuleDict({"a": _KINDS["softmax"](), "b": _KINDS["softmax"]()})
    with pytest.warns(UserWarning, match=r"^vitmad\.record: extra\.a, extra\.b of _Stack, in a list beside"):
        with torch.no_grad(), vitmad.record(held):
            held(pixels)


class _LocalImport(_Block):
    def forward(self, x):
        from torch.nn.functional import scaled_dot_product_attention

        q, k = self.q(x)[:, None], self.k(x)[:, None]
        return x + scaled_dot_product_attention(q, k, q)[:, 0]


class _DefaultArgument(_Block):
    def forward(self, x, attend=F.scaled_dot_product_attention):
        q, k = self.q(x)[:, None], self.k(x)[:, None]
        return x + attend(q, k, q)[:, 0]


class _ClassAttribute(_Block):
    attend = staticmethod(F.scaled_dot_product_attention)

    def forward(self, x):
        q, k = self.q(x)[:, None], self.k(x)[:, None]
        return x + self.attend(q, k, q)[:, 0]


class _Partial(_Block):
    def __init__(self):
        super().__init__()
        self.attend = functools.partial(F.scaled_dot_product_attention, dropout_p=0.0)

    def forward(self, x):
        q, k = self.q(x)[:, None], self.k(x)[:, None]
        return x + self.attend(q, k, q)[:, 0]


class _Holder(nn.Module):
    """A block holding an attention module of explicit softmax that vitmad does not find by itself."""

    def __init__(self):
        super().__init__()
        self.mixer = _SoftmaxAs()

    def forward(self, x):
        return self.mixer(x)


def test_more_spellings_are_found_and_a_wildcard_records_each_attention_once():
    """QA 265: an import inside forward, a default argument, a class attribute and functools.partial reaching SDPA
    were left out in silence (rec.mad[1] another block's); blocks.* over blocks holding an explicit-softmax module
    recorded each layer twice (the block and its module), "*" refused the model itself as named; a pooling model
    whose blocks attend through an alias was taken for one more layer; nn.Sequential(vit, nn.Softmax) warned of
    its output softmax."""
    torch.manual_seed(0)
    pixels = torch.randn(2, 3, 32, 32)
    spelled = _Stack(["sdpa"]).eval()
    spelled.blocks = nn.ModuleList([_LocalImport(), _DefaultArgument(), _ClassAttribute(), _Partial()])
    with torch.no_grad(), vitmad.record(spelled) as rec:
        spelled(pixels)
    assert rec.layers == [f"blocks.{i}" for i in range(4)]
    held = _Stack(["sdpa"]).eval()
    held.blocks = nn.ModuleList([_Holder(), _Holder()])
    for layers in (["blocks.*"], ["*"], ["blocks.*.mixer"]):
        with torch.no_grad(), vitmad.record(held, layers=layers) as rec:
            held(pixels)
        assert rec.layers == ["blocks.0.mixer", "blocks.1.mixer"], layers
    pooled = _Pooled(["alias", "helper"]).eval()
    with torch.no_grad(), vitmad.record(pooled) as rec:
        pooled(pixels)
    assert rec.layers == ["blocks.0", "blocks.1"]
    classifier = nn.Sequential(_Stack(["sdpa", "sdpa"]), nn.Softmax(dim=-1)).eval()
    with torch.no_grad(), vitmad.record(classifier) as rec:  # no warning: warnings are errors in the tests
        classifier(pixels)
    assert rec.layers == ["0.blocks.0", "0.blocks.1"]


class _PackedImages(nn.Module):
    """A user's packed tower: one patch embedding call per image, then blocks over the tokens of all of them."""

    def __init__(self):
        super().__init__()
        self.patch = nn.Conv2d(3, 8, 4, 4)
        self.blocks = nn.ModuleList([nn.MultiheadAttention(8, 2, batch_first=True) for _ in range(2)])

    def forward(self, images):
        tokens = torch.cat([self.patch(image[None]).flatten(2).transpose(1, 2) for image in images], 1)
        for block in self.blocks:
            tokens = tokens + block(tokens, tokens, tokens, need_weights=False)[0]
        return tokens


def test_a_patch_embedding_run_once_per_image_then_attended_together_is_refused():
    """QA 269: each patch embedding call starts a call, so a packed tower of three images was said to have "ran its
    recorded layers 3 times" where they ran once. That warning went, and the layers were then placed on the last
    image's grid, the other images' tokens counted as extra tokens before it (a MAD of no image, QA 378): refused,
    naming the runs of the patch embedding, without the warning of several runs of the layers."""
    torch.manual_seed(0)
    model = _PackedImages().eval()
    images = [torch.randn(3, 8, 12), torch.randn(3, 4, 4), torch.randn(3, 8, 8)]
    with warnings.catch_warnings(record=True) as caught, torch.no_grad(), vitmad.record(model), pytest.raises(
            ValueError, match=r"blocks\.0 \(MultiheadAttention\) of _PackedImages: the forward ran patch 3 times "
                              r"before it \(grids 2x3, 1x1, 2x2: .* cannot tell which run's tokens it attends over"):
        warnings.simplefilter("always")
        model(images)
    assert not caught


def test_a_text_towers_blocks_beside_the_image_tower_are_no_gap_in_its_layers():
    """QA 433: a dual encoder's text blocks (outside the tower that embeds the image, so not recorded, as documented)
    were warned of as blocks left out between recorded ones, with advice to name them that layers= refused."""

    class Holder(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = _KINDS["sdpa"]()

        def forward(self, x):
            return self.attn(x) @ torch.eye(x.shape[-1])  # (a block of matrix products: one of a transformer)

    class Tower(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList(Holder() for _ in range(2))

    class DualEncoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.visual = Tower()
            self.visual.embed = _PatchEmbedding()
            self.text = Tower()
            self.text.embed = nn.Embedding(10, 8)

        def forward(self, pixels, ids):
            x = self.visual.embed(pixels).flatten(2).transpose(1, 2)
            t = self.text.embed(ids)
            for image_block, text_block in zip(self.visual.blocks, self.text.blocks):
                x, t = image_block(x), text_block(t)
            return x.mean(1) + t.mean(1)

    torch.manual_seed(0)
    model = DualEncoder().eval()
    with torch.no_grad(), vitmad.record(model) as rec:  # (a warning is an error in this suite)
        model(torch.randn(2, 3, 32, 32), torch.randint(0, 10, (2, 5)))
    assert rec.layers == ["visual.blocks.0.attn", "visual.blocks.1.attn"]
    # A child embedding no tokens of a vocabulary may be a second image tower vitmad does not see embed the image
    # (patches by unfold): its blocks are still warned of (QA 434).
    model.text.embed = nn.Linear(8, 8)
    with pytest.warns(UserWarning, match=r"text\.blocks\.0, text\.blocks\.1 of DualEncoder, in a list beside "
                                         r"recorded attention layers"), torch.no_grad(), vitmad.record(model):
        model(torch.randn(2, 3, 32, 32), torch.randn(2, 5, 8))
