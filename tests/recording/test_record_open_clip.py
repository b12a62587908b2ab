"""vitmad.record on OpenCLIP (``open_clip_torch``): its own ``VisionTransformer`` (``nn.MultiheadAttention`` blocks,
recording/mha_capture.py, or its ``Attention`` blocks over F.scaled_dot_product_attention), alone, called through
``encode_image`` and inside a whole CLIP, CustomTextCLIP or CoCa model; CoCa's attentional pooler; and the towers
whose trunk is a timm model (``TimmModel``: SigLIP, EVA02 and PE configs), recorded as the bare timm model is.

Every model is built tiny from a config (random weights, nothing downloaded). The reference is each layer's own
attention probabilities for the inputs it received in the recorded run, computed in float64: an
``nn.MultiheadAttention``'s ``need_weights=True, average_attn_weights=False`` on a float64 copy of the layer,
OpenCLIP's ``Attention`` from its ``in_proj`` q and k (and its q / k norms), timm's from its unfused path. The tokens
are placed by the geometry of OpenCLIP's ``VisionTransformer._embeds``, read from its source: the class embedding
first, then ``conv1``'s ``grid_h x grid_w`` patches row-major, each ``patch_h x patch_w`` pixels, at their cell
centres (``PatchDropout`` in eval mode and ``ln_pre`` change no token's place).
"""

from __future__ import annotations

import copy
import logging
import math

import pytest
import torch
from torch import nn

open_clip = pytest.importorskip("open_clip")

from open_clip.coca_model import CoCa  # noqa: E402
from open_clip.model import CLIP, CustomTextCLIP, _build_vision_tower  # noqa: E402

import vitmad  # noqa: E402
from conftest import statistics_reference  # noqa: E402
from vitmad.recording.recorder import NoLayerError  # noqa: E402

# float32 recordings (flash-MAD on the q and k vitmad projects again, in float32) against float64 probabilities of
# the same inputs. MADs are in pixels; entropies in nats; masses and maps are probabilities.
TOL, STAT_TOL = {"rtol": 1e-5, "atol": 1e-4}, {"rtol": 1e-5, "atol": 1e-6}
STATS = ["entropy", "prefix_mass", "prefix_maps"]
WIDTH, HEADS = 32, 2
TINY = dict(layers=2, width=WIDTH, head_width=WIDTH // HEADS, patch_size=8, image_size=32)
# 20 text tokens: more than the 4 x 4 patches, as a real CLIP's 77 are more than ViT-B/32's 7 x 7, so that the text
# transformer's causal attention, taken for the tower's, would pass for 4 extra tokens and the grid (as it did).
TEXT = dict(context_length=20, vocab_size=64, width=WIDTH, heads=HEADS, layers=2)


@pytest.fixture(autouse=True)
def _quiet_open_clip():
    """OpenCLIP logs at INFO and WARNING while it builds (random weights); the test logs stay readable."""
    logging.getLogger().setLevel(logging.ERROR)
    yield


def _sharpened(model: nn.Module, seed: int = 0, std: float = 0.25) -> nn.Module:
    """``model`` in eval mode with its Linear weights and its attention's packed ``in_proj_weight`` drawn anew (std
    ``std`` and 1.5 times that), and the gains of OpenCLIP's q / k norms (``qk_norm``, which would otherwise bring every
    logit near 1) raised to 2.5: far from uniform attention, so that a token at a wrong cell would change the MAD."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear):
                module.weight.normal_(std=std)
            weight = getattr(module, "in_proj_weight", None)
            if isinstance(weight, nn.Parameter):
                weight.normal_(std=1.5 * std)
            for norm in (getattr(module, "ln_q", None), getattr(module, "ln_k", None)):
                if isinstance(norm, nn.LayerNorm):
                    norm.weight.fill_(2.5)
    return model.eval()


def _tower(embed_dim: int = 16, **config) -> nn.Module:
    torch.manual_seed(0)
    return _sharpened(_build_vision_tower(embed_dim, {**TINY, **config}))


def _pixels(size, batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(seed))


def _to_double(value):
    return value.double() if isinstance(value, torch.Tensor) and value.is_floating_point() else value


def _spy(modules: list[nn.Module]) -> list[tuple[nn.Module, tuple, dict]]:
    """``(module, args, kwargs)`` of every call of ``modules``, filled as the model runs (hooks kept: the spy's list
    is cleared by the caller before the run it reads)."""
    calls = []
    for module in modules:
        module.register_forward_pre_hook(lambda m, args, kwargs: calls.append((m, args, kwargs)), with_kwargs=True)
    return calls


def _own_probabilities(module: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
    """``[B, H, L, S]`` float64: the attention of one call of an OpenCLIP attention module on the inputs it got.

    ``nn.MultiheadAttention``: its own per-head weights, a float64 copy of the layer. OpenCLIP's ``Attention`` (custom
    blocks), from its forward: ``q, k, v = F.linear(x, in_proj_weight, in_proj_bias).chunk(3)``, split into heads,
    ``ln_q`` / ``ln_k``, then SDPA's softmax of ``q k^T / sqrt(head_dim)`` (it is given no mask in the tower)."""
    double = copy.deepcopy(module).double()
    args = tuple(_to_double(a) for a in args)
    kwargs = {k: _to_double(v) for k, v in kwargs.items()}
    with torch.no_grad():
        if isinstance(double, nn.MultiheadAttention):
            return double(*args, **{**kwargs, "need_weights": True, "average_attn_weights": False})[1]
        x = args[0]
        batch, length, _ = x.shape
        q, k, _ = nn.functional.linear(x, double.in_proj_weight, double.in_proj_bias).chunk(3, dim=-1)
        q = double.ln_q(q.reshape(batch, length, double.num_heads, -1).transpose(1, 2))
        k = double.ln_k(k.reshape(batch, length, double.num_heads, -1).transpose(1, 2))
        return (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).softmax(-1)


def _timm_own_probabilities(module: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
    """``[B, H, N, N]`` float64: a timm attention module's probabilities for the inputs of one call (EVA's RoPE
    among them), from its own unfused path (the input of its ``attn_drop``) in a float64 copy."""
    double = copy.deepcopy(module).double()
    double.fused_attn = False
    seen = []
    double.attn_drop.register_forward_pre_hook(lambda m, inputs: seen.append(inputs[0]))
    with torch.no_grad():
        double(*(_to_double(a) for a in args), **{k: _to_double(v) for k, v in kwargs.items()})
    assert len(seen) == 1
    return seen[0]


def _positions(grid: tuple[int, int], patch: tuple[int, int], prefix: int = 1) -> torch.Tensor:
    """``[prefix + gh * gw, 2]`` float64 pixels: ``prefix`` tokens without a position (NaN), then the row-major grid
    of ``patch_h x patch_w`` cells at their centres."""
    rows, cols = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
    cells = torch.stack([(rows.double() + 0.5) * patch[0], (cols.double() + 0.5) * patch[1]], -1).reshape(-1, 2)
    return torch.cat([torch.full((prefix, 2), math.nan, dtype=torch.float64), cells])


def _check_layers(rec, rec_tokens, maps: list[torch.Tensor], grid, patch, prefix: int = 1) -> None:
    """Each recorded layer's geometry, MAD (mean and per token), entropy, prefix mass and class-token maps against
    its own probabilities ``maps`` placed at :func:`_positions`."""
    positions = _positions(grid, patch, prefix)
    assert len(rec.layers) == len(maps)
    for layer, probabilities in enumerate(maps):
        geometry = rec.geometry[layer]
        assert geometry.grid == grid and geometry.stride == tuple(map(float, patch))
        assert geometry.num_prefix_tokens == prefix
        expected = statistics_reference(probabilities, positions)
        # Far from uniform attention: a token placed at a wrong cell would change the MAD.
        assert float(expected["entropy"].mean()) < 0.75 * math.log(probabilities.shape[-1])
        torch.testing.assert_close(rec_tokens.per_layer[layer].double(), expected["mad"], **TOL)
        torch.testing.assert_close(rec.per_layer[layer].double(), expected["mad"].mean(-1), **TOL)
        for stat in ("entropy", "prefix_mass"):
            torch.testing.assert_close(rec_tokens.stats[stat][layer].double(), expected[stat], **STAT_TOL)
            torch.testing.assert_close(rec.stats[stat][layer].double(), expected[stat].mean(-1), **STAT_TOL)
        torch.testing.assert_close(rec.prefix_maps[layer].double(), expected["prefix_maps"], **STAT_TOL)


def _outputs_equal(plain, recorded) -> bool:
    if isinstance(plain, dict):  # CoCa's forward
        return plain.keys() == recorded.keys() and all(_outputs_equal(plain[k], recorded[k]) for k in plain)
    if isinstance(plain, tuple):
        return len(plain) == len(recorded) and all(_outputs_equal(p, r) for p, r in zip(plain, recorded))
    return torch.equal(plain, recorded)


def _record(model: nn.Module, run, **kwargs):
    """``(mean recording, per-token recording, probabilities of each call of the attention layers in the first)``
    of ``run()``, the model's output checked bit for bit against a run without vitmad."""
    layers = [m for m in model.modules() if isinstance(m, nn.MultiheadAttention)
              or type(m).__module__ == "open_clip.transformer" and type(m).__name__ == "Attention"]
    calls = _spy(layers)
    with torch.no_grad():
        plain = run()
        calls.clear()
        with vitmad.record(model, stats=STATS, **kwargs) as rec:
            recorded = run()
        seen = list(calls)
        with vitmad.record(model, stats=STATS, reduction="none", **kwargs) as rec_tokens:
            run()
    assert _outputs_equal(plain, recorded)
    return rec, rec_tokens, seen


# case -> (VisionTransformer settings, image size, patch size)
TOWERS = {
    "default": ({}, (32, 32), (8, 8)),
    "non-square image_size": ({"image_size": (24, 40)}, (24, 40), (8, 8)),
    "non-square patch_size": ({"image_size": (32, 24), "patch_size": (8, 4)}, (32, 24), (8, 4)),
    "no_ln_pre": ({"no_ln_pre": True}, (32, 32), (8, 8)),
    "final_ln_after_pool, avg pool": ({"final_ln_after_pool": True, "pool_type": "avg"}, (32, 32), (8, 8)),
    "sin_cos_2d pos_embed_type": ({"pos_embed_type": "sin_cos_2d"}, (32, 32), (8, 8)),
    "output_tokens": ({"output_tokens": True}, (32, 32), (8, 8)),
    "layer scale": ({"ls_init_value": 0.5}, (32, 32), (8, 8)),
    "patch_dropout in eval mode": ({"patch_dropout": 0.5}, (32, 32), (8, 8)),
    "custom blocks, qk_norm (SDPA)": ({"qk_norm": True, "image_size": (24, 40)}, (24, 40), (8, 8)),
    "custom blocks, scale_heads, scale_attn": ({"block_type": "custom", "scale_heads": True, "scale_attn": True},
                                               (32, 32), (8, 8)),
}


@pytest.mark.parametrize("case", list(TOWERS))
def test_vision_transformer_matches_its_layers_own_probabilities(case):
    config, size, patch = TOWERS[case]
    model = _tower(**config)
    pixels = _pixels(size)
    grid = (size[0] // patch[0], size[1] // patch[1])
    rec, rec_tokens, calls = _record(model, lambda: model(pixels))
    assert rec.layers == ["transformer.resblocks.0.attn", "transformer.resblocks.1.attn"] and rec.skipped == {}
    assert len(calls) == 2
    _check_layers(rec, rec_tokens, [_own_probabilities(*call) for call in calls], grid, patch)


def test_patch_dropout_in_training_mode_is_refused_by_name():
    """OpenCLIP's PatchDropout keeps a random subset of the patches (drawn from the global generator, returned to
    nobody): vitmad cannot know which cells the kept tokens are, and refuses rather than place them as a grid."""
    model = _tower(patch_dropout=0.5).train()
    with pytest.raises(ValueError, match=r"transformer\.resblocks\.0\.attn \(MultiheadAttention\) of "
                                         r"VisionTransformer: it attends over 9 tokens while OpenCLIP's PatchDropout "
                                         r"\(patch_dropout, prob 0\.5\) keeps a random subset of the 4x4 = 16 "
                                         r"patches in training mode"):
        with vitmad.record(model):
            model(_pixels((32, 32)))
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def _clip(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "CLIP":
        model = CLIP(16, TINY, TEXT)
    elif kind == "CustomTextCLIP":
        model = CustomTextCLIP(16, TINY, {**TEXT, "no_causal_mask": True, "pool_type": "last"})
    else:  # CoCa's image tower pools with learned queries; its decoder cross-attends to them
        model = CoCa(WIDTH, {**TEXT, "attn_pooler_heads": HEADS}, {**TEXT, "embed_cls": True, "output_tokens": True},
                     {**TINY, "attentional_pool": True, "attn_pooler_heads": HEADS, "attn_pooler_queries": 5,
                      "output_tokens": True})
    # OpenCLIP leaves some text-side parameters as torch.empty made them (CoCa's): drawn here, the outputs are finite.
    visual = {id(p) for p in model.visual.parameters()}
    with torch.no_grad():
        for parameter in model.parameters():
            if id(parameter) not in visual:
                parameter.normal_(std=0.02)
    _sharpened(model.visual)
    return model.eval()


@pytest.mark.parametrize("kind", ["CLIP", "CustomTextCLIP", "CoCa"])
@pytest.mark.parametrize("call", ["forward", "encode_image"])
def test_a_whole_clip_model_records_its_image_tower_alone(kind, call):
    """The whole model given to vitmad.record: its image tower (``visual``, found through ``visual.conv1``) is
    recorded, exactly as the tower alone; the text transformer's causal attention (and CoCa's decoder) is neither
    recorded nor listed, also in a forward that runs it after the image tower."""
    model = _clip(kind)
    pixels, text = _pixels((32, 32)), torch.randint(0, TEXT["vocab_size"], (2, TEXT["context_length"]))

    def run():
        return model(pixels, text) if call == "forward" else model.encode_image(pixels)

    rec, rec_tokens, calls = _record(model, run)
    tower = ["visual.transformer.resblocks.0.attn", "visual.transformer.resblocks.1.attn"]
    assert rec.layers == tower
    image_calls = [c for c in calls if c[0] in [model.get_submodule(n) for n in tower]]
    _check_layers(rec, rec_tokens, [_own_probabilities(*c) for c in image_calls], (4, 4), (8, 8))
    with torch.no_grad(), vitmad.record(model.visual, stats=STATS) as alone:
        model.visual(pixels)
    assert torch.equal(rec.mad, alone.mad) and torch.equal(rec.stats["entropy"], alone.stats["entropy"])
    if kind == "CoCa":
        assert list(rec.skipped) == ["visual.attn_pool.attn"]
    else:
        assert rec.skipped == {}


def test_text_alone_or_text_layers_named_are_not_taken_for_the_image():
    model = _clip("CLIP")
    text = torch.randint(0, TEXT["vocab_size"], (2, TEXT["context_length"]))
    with torch.no_grad(), vitmad.record(model) as rec:
        model.encode_text(text)
    # encode_text is no forward of the model, and runs none of its recorded layers: nothing to read.
    with pytest.raises(RuntimeError, match=r"CLIP has not run in this recording; .* a method other than its forward "
                                           r"that does not run its image tower, such as a CLIP model's encode_text, "
                                           r"records nothing"):
        _ = rec.mad
    with pytest.raises(NoLayerError, match=r"transformer\.resblocks\.0\.attn: outside visual, the tower that "
                                           r"embeds the image"):
        with vitmad.record(model, layers=["transformer.resblocks.*.attn"]):
            pass


def _pooler_maps_check(rec, calls, name: str, module: nn.Module, queries: int) -> None:
    """The pooler's maps: its own weights over [class token, row-major 4 x 4 grid of 8 px], the class token's column
    dropped (it has no position)."""
    maps = rec.class_attention_maps[name]
    own = [_own_probabilities(*c) for c in calls if c[0] is module]
    assert len(own) == 1 and own[0].shape == (2, HEADS, queries, 17)
    assert maps.shape == (2, HEADS, queries, 16)
    torch.testing.assert_close(maps.double(), own[0][..., 1:], **STAT_TOL)
    geometry = rec.calls[-1].class_geometry[rec.calls[-1].class_layers.index(name)]
    assert geometry.grid == (4, 4) and geometry.stride == (8.0, 8.0) and geometry.num_prefix_tokens == 1
    assert geometry.attention == "attention pooling over global"


def test_coca_attentional_pooler_is_skipped_and_its_queries_maps_recorded():
    model = _clip("CoCa")
    pixels, text = _pixels((32, 32)), torch.randint(0, TEXT["vocab_size"], (2, TEXT["context_length"]))
    rec, _, calls = _record(model, lambda: model(pixels, text))
    name = "visual.attn_pool.attn"
    assert rec.skipped == {name: "attention pooling: 5 learned queries (OpenCLIP's AttentionalPooler, CoCa's) "
                                 "without a position on the image; their attention over the tokens is recorded with "
                                 "stats=[..., 'prefix_maps'] (rec.class_attention_maps)"}
    assert list(rec.class_attention_maps) == [name]
    _pooler_maps_check(rec, calls, name, model.get_submodule(name), 5)


@pytest.mark.parametrize("mode", ["parallel", "cascade"])
def test_attentional_pool_parallel_and_cascade(mode):
    """OpenCLIP's paper-style poolers: ``parallel`` pools the tokens twice (both maps recorded); ``cascade`` pools
    the first pooler's outputs, learned queries without a position: that second pooler is skipped without maps."""
    model = _tower(embed_dim=WIDTH, attentional_pool=mode, attn_pooler_heads=HEADS, attn_pooler_queries=5)
    pixels = _pixels((32, 32))
    rec, rec_tokens, calls = _record(model, lambda: model(pixels))
    assert rec.layers == ["transformer.resblocks.0.attn", "transformer.resblocks.1.attn"]
    blocks = [c for c in calls if isinstance(c[0], nn.MultiheadAttention) and c[0] in
              [b.attn for b in model.transformer.resblocks]]
    _check_layers(rec, rec_tokens, [_own_probabilities(*c) for c in blocks], (4, 4), (8, 8))
    _pooler_maps_check(rec, calls, "attn_pool.attn", model.attn_pool.attn, 5)
    if mode == "parallel":
        assert list(rec.class_attention_maps) == ["attn_pool.attn", "attn_pool_contrastive.attn"]
        _pooler_maps_check(rec, calls, "attn_pool_contrastive.attn", model.attn_pool_contrastive.attn, 1)
        assert "1 learned query (OpenCLIP's AttentionalPooler, CoCa's)" in rec.skipped["attn_pool_contrastive.attn"]
    else:
        assert list(rec.class_attention_maps) == ["attn_pool.attn"]
        assert rec.skipped["attn_pool_contrastive.attn"].startswith(
            "attention pooling over pooled tokens: OpenCLIP's attentional_pool='cascade' pools the outputs of "
            "attn_pool")


# case -> (vision config of a timm trunk, timm attention class, patch, grid, class token, pooling head or None)
TIMM_TOWERS = {
    "vit, avg pool, linear proj": (dict(timm_model_name="vit_tiny_patch16_224", timm_pool="avg", timm_proj="linear"),
                                   "Attention", 16, (14, 14), None),
    # SigLIP's open_clip configs: timm_pool "map" (timm's AttentionPoolLatent over the patches), timm_proj "none".
    "SigLIP-style: map pool, no proj": (dict(timm_model_name="vit_tiny_patch16_224", timm_pool="map",
                                             timm_proj="none"), "Attention", 16, (14, 14), "trunk.attn_pool"),
    "EVA02 (RoPE)": (dict(timm_model_name="eva02_tiny_patch14_224", timm_pool="avg", timm_proj="linear"),
                     "EvaAttention", 14, (16, 16), None),
}


@pytest.mark.parametrize("case", list(TIMM_TOWERS))
def test_timm_trunk_towers_are_recorded_as_the_bare_timm_model(case):
    pytest.importorskip("timm")
    config, attention, patch, grid, head = TIMM_TOWERS[case]
    torch.manual_seed(0)
    tower = _build_vision_tower(16, {**TINY, **config, "image_size": 224})
    assert type(tower.trunk).__module__.startswith("timm.models.")
    # Narrower weights than the tiny towers' (192 channels, not 32): logits of the tiny towers' size, whose float32
    # rounding the float64 reference does not share.
    tower = _sharpened(tower, std=0.15)
    pixels = _pixels((224, 224), batch=1)
    calls = _spy([m for m in tower.modules() if type(m).__name__ == attention])
    with torch.no_grad():
        plain = tower(pixels)
        calls.clear()
        with vitmad.record(tower, stats=STATS) as rec:
            recorded = tower(pixels)
        calls = list(calls)
        with vitmad.record(tower, stats=STATS, reduction="none") as rec_tokens:
            tower(pixels)
        with vitmad.record(tower.trunk, stats=STATS) as bare:
            tower.trunk(pixels)
    assert torch.equal(plain, recorded)
    assert rec.layers == [f"trunk.blocks.{i}.attn" for i in range(12)] == ["trunk." + n for n in bare.layers]
    for stat in ("mad", "entropy", "prefix_mass"):
        assert torch.equal(rec.stats[stat], bare.stats[stat])
    assert all(torch.equal(a, b) for a, b in zip(rec.prefix_maps, bare.prefix_maps))
    assert {f"trunk.{n}": r for n, r in bare.skipped.items()} == rec.skipped
    _check_layers(rec, rec_tokens, [_timm_own_probabilities(*c) for c in calls], grid, (patch, patch))
    if head is None:
        assert rec.skipped == {} and not rec.class_attention_maps
    else:
        assert rec.skipped[head].startswith("attention pooling: learned latent queries")
        assert torch.equal(rec.class_attention_maps[head], bare.class_attention_maps[head.removeprefix("trunk.")])
        assert rec.class_attention_maps[head].shape == (1, 3, 1, grid[0] * grid[1])
