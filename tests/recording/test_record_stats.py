"""vitmad.record(stats=...): entropy, prefix mass, self mass and the prefix (CLS / register) maps of every
recorded layer, against the same statistics of each model's own eager attention probabilities, with the token
layout written here: a plain ViT's ``P`` prefix tokens before a row-major grid (timm on the fused SDPA path and
on its own softmax, transformers DINOv2 with registers through ``AttentionInterface``), Swin's windows (every
query of an image, no prefix token, the keys are the queries) and PVT v2's pooled keys (no token of its own)."""

from __future__ import annotations

import copy

import pytest
import torch

import vitmad
from vitmad.ops.reference import mad_reference

timm = pytest.importorskip("timm")

# float32 recordings (fused-path q/k or the model's own float32 probabilities) against float64 statistics of the
# eager float32 probabilities: entropies of 0.5 to 3 nats and masses of 0.01 to 1 agree to float32 rounding of
# the rows (about 1e-6 relative per term, summed over <= 50 keys).
TOL = {"rtol": 2e-5, "atol": 2e-6}
MAD_TOL = {"rtol": 1e-5, "atol": 1e-4}  # pixels
ALL = ["entropy", "prefix_mass", "self_mass", "prefix_maps"]


def _sharpen(model, factor: float = 3.0) -> None:
    """Weights of unit gain (timm and transformers draw them with std 0.02, which leaves near-uniform attention),
    then queries and keys scaled, so that the attention is far from uniform (entropy well below ln N, masses that
    differ from token to token): a statistic of the wrong token or row then shows."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
                module.weight.normal_(0.0, module.weight[0].numel() ** -0.5)
        for name, parameter in model.named_parameters():
            if name.endswith(("qkv.weight", "query.weight", "key.weight", "q.weight", "kv.weight")):
                parameter.mul_(factor)


def _eager_maps(model, *, class_name: str = "Attention") -> list[torch.Tensor]:
    """The softmax probabilities of every timm ``class_name`` module on its unfused path (input of attn_drop)."""
    eager = copy.deepcopy(model)
    maps = []
    for module in eager.modules():
        if type(module).__name__ == class_name:
            module.fused_attn = False
            module.attn_drop.register_forward_pre_hook(lambda _, args: maps.append(args[0].double()))
    return eager, maps


def _row_stats(a: torch.Tensor, first_query: int, prefix: int) -> dict[str, torch.Tensor]:
    """Per query row ``first_query...`` of float64 attention ``a`` ``[..., N, N]`` whose first ``prefix`` tokens have
    no position: entropy, mass on those tokens, mass on the query's own token."""
    rows = a[..., first_query:, :]
    index = torch.arange(first_query, a.shape[-1])
    return {
        "entropy": -torch.special.xlogy(rows, rows).sum(-1),
        "prefix_mass": rows[..., :prefix].sum(-1),
        "self_mass": a[..., index, index],
    }


VITS = {
    "registers_fused": (dict(reg_tokens=3), 4, True),
    "cls_unfused": (dict(), 1, False),
    "no_prefix": (dict(class_token=False, global_pool="avg"), 0, True),
}


@pytest.mark.parametrize("case", list(VITS))
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_plain_vit_statistics_and_maps_equal_the_eager_attention(case, reduction):
    extra, prefix, fused = VITS[case]
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2, embed_dim=32, num_heads=2,
                              img_size=(24, 40), patch_size=8, **extra).eval()
    _sharpen(model)
    if not fused:
        for block in model.blocks:
            block.attn.fused_attn = False
    pixels = torch.randn(2, 3, 24, 40, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = model(pixels)
        with vitmad.record(model, stats=ALL, reduction=reduction) as rec:
            recorded = model(pixels)
    torch.testing.assert_close(recorded, plain, rtol=0, atol=0)

    eager, maps = _eager_maps(model)
    with torch.no_grad():
        eager(pixels)
    assert len(maps) == 2 and all(a.amax(-1).mean() > 4.0 / a.shape[-1] for a in maps)  # peaked, not uniform
    assert list(rec.stats) == ["mad", "entropy", "prefix_mass", "self_mass"]
    for layer, a in enumerate(maps):
        expected = _row_stats(a, prefix, prefix)
        for name, value in expected.items():
            want = value.mean(-1) if reduction == "mean" else value
            torch.testing.assert_close(rec.stats[name][layer].double(), want, **TOL)
        torch.testing.assert_close(rec.stats["mad"][layer].double(),
                                   mad_reference(a, 8, num_prefix_tokens=prefix, grid=(3, 5), reduction=reduction),
                                   **MAD_TOL)
        if prefix == 0:
            assert rec.prefix_maps[layer] is None
        else:
            # The rows of the prefix tokens over the patches, in grid order: the eager rows themselves.
            torch.testing.assert_close(rec.prefix_maps[layer].double(), a[..., :prefix, prefix:], **TOL)
    if prefix == 0:
        assert (rec.stats["prefix_mass"] == 0).all()


def test_transformers_dinov2_with_registers_through_attention_interface():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.Dinov2WithRegistersConfig(image_size=28, patch_size=7, hidden_size=32, num_hidden_layers=2,
                                                    num_attention_heads=2, intermediate_size=64,
                                                    num_register_tokens=2)
    model = transformers.Dinov2WithRegistersModel(config).eval()
    _sharpen(model)
    pixels = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), vitmad.record(model, stats=ALL) as rec:
        recorded = model(pixels).last_hidden_state
    model.set_attn_implementation("eager")
    with torch.no_grad():
        out = model(pixels, output_attentions=True)
    torch.testing.assert_close(recorded, out.last_hidden_state, rtol=1e-5, atol=1e-5)
    prefix = 3  # CLS and two registers before the 4 x 4 grid
    for layer, a in enumerate(out.attentions):
        a = a.double()
        for name, value in _row_stats(a, prefix, prefix).items():
            torch.testing.assert_close(rec.stats[name][layer].double(), value.mean(-1), **TOL)
        torch.testing.assert_close(rec.prefix_maps[layer].double(), a[..., :prefix, prefix:], **TOL)
    assert rec.prefix_maps[0].shape == (2, 2, 3, 16)


def test_swin_windows_statistics_over_every_query_and_no_maps():
    torch.manual_seed(0)
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=56, embed_dim=16,
                              depths=(2, 2), num_heads=(1, 2), window_size=7).eval()
    _sharpen(model)
    pixels = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), vitmad.record(model, stats=ALL) as rec:
        model(pixels)
    eager, maps = _eager_maps(model, class_name="WindowAttention")
    with torch.no_grad():
        eager(pixels)
    assert len(maps) == len(rec.layers) == 4
    for layer, a in enumerate(maps):
        # [B * nW, heads, 49, 49]: every query of an image is in one of its windows, with no token without a
        # position and the keys being the queries, so an image's statistic is the mean over all its windows' rows.
        windows = a.view(2, -1, a.shape[1], 49, 49)
        for name, value in _row_stats(windows, 0, 0).items():
            heads = a.shape[1]  # rec.stats pads the layers of fewer heads with NaN up to the most heads
            torch.testing.assert_close(rec.stats[name][layer, :, :heads].double(), value.mean((1, 3)), **TOL)
    assert rec.prefix_maps == [None] * 4


def test_padded_swin_windows_keep_the_self_mass_of_every_image_query():
    """A map that the windows do not divide is padded: a padding slot is a key and no query, and key i is still
    query i's token, so the self mass is measured there too (was NaN for the padded stages, whose keys carry
    positions of their own)."""
    torch.manual_seed(0)
    # 40x32 px at patch 4: a 10x8 map in windows of 4x4 (padded to 12x8), then 5x4 (padded to 8x4); the second
    # block of a stage shifts its windows (timm rolls the map, then pads: the padding stays at the bottom).
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=(40, 32), embed_dim=16,
                              depths=(2, 2), num_heads=(1, 2), window_size=4).eval()
    _sharpen(model)
    pixels = torch.randn(2, 3, 40, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), vitmad.record(model, stats=["entropy", "prefix_mass", "self_mass"]) as rec:
        model(pixels)
    eager, maps = _eager_maps(model, class_name="WindowAttention")
    with torch.no_grad():
        eager(pixels)
    assert len(maps) == len(rec.layers) == 4
    for layer, (a, (height, width)) in enumerate(zip(maps, [(10, 8), (10, 8), (5, 4), (5, 4)])):
        rows_of_windows, cols_of_windows = -(-height // 4), -(-width // 4)
        windows = a.view(2, rows_of_windows, cols_of_windows, a.shape[1], 16, 16)
        slot = torch.arange(16)
        row = torch.arange(rows_of_windows).view(-1, 1, 1) * 4 + slot.view(1, 1, -1) // 4
        col = torch.arange(cols_of_windows).view(1, -1, 1) * 4 + slot.view(1, 1, -1) % 4
        image = ((row < height) & (col < width)).view(1, rows_of_windows, cols_of_windows, 1, 16).double()
        assert 0 < image.sum() < image.numel()  # some slots are padding
        expected = _row_stats(windows, 0, 0)
        expected["prefix_mass"] = torch.zeros_like(expected["self_mass"])  # padding keys have a position
        heads = a.shape[1]  # rec.stats pads the layers of fewer heads with NaN up to the most heads
        for name, value in expected.items():
            mean = (value * image).sum((1, 2, 4)) / image.sum((1, 2, 4))
            torch.testing.assert_close(rec.stats[name][layer, :, :heads].double(), mean, **TOL)


def test_padded_and_shifted_transformers_swin_windows_keep_the_self_mass():
    """transformers pads the map, then rolls it: a shifted block's padding slots move into the windows, and the
    self mass is still the mean of the diagonal over the slots with image content."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.SwinConfig(image_size=(40, 32), patch_size=4, embed_dim=16, depths=[2, 2], num_heads=[1, 2],
                                     window_size=4)
    model = transformers.SwinModel(config).eval()
    _sharpen(model)
    pixels = torch.randn(2, 3, 40, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), vitmad.record(model, stats=["entropy", "self_mass"]) as rec:
        model(pixels)
    model.config._attn_implementation = "eager"
    with torch.no_grad():
        attentions = model(pixels, output_attentions=True).attentions  # the last block of each stage
    # (recorded layer, eager probabilities, map, shift): 10x8 padded to 12x8, shifted by 2; 5x4 padded to 8x4,
    # not shifted (transformers shifts no stage whose map is no larger than a window).
    for layer, a, (height, width), shift in ((1, attentions[0], (10, 8), 2), (3, attentions[1], (5, 4), 0)):
        padded_h, padded_w = -(-height // 4) * 4, -(-width // 4) * 4
        windows = a.double().view(2, padded_h // 4, padded_w // 4, a.shape[1], 16, 16)
        slot = torch.arange(16)
        row = (torch.arange(padded_h // 4).view(-1, 1, 1) * 4 + slot // 4 + shift) % padded_h
        col = (torch.arange(padded_w // 4).view(1, -1, 1) * 4 + slot % 4 + shift) % padded_w
        image = ((row < height) & (col < width)).view(1, padded_h // 4, padded_w // 4, 1, 16).double()
        assert 0 < image.sum() < image.numel()
        heads = a.shape[1]
        for name, value in _row_stats(windows, 0, 0).items():
            if name in rec.stats:
                mean = (value * image).sum((1, 2, 4)) / image.sum((1, 2, 4))
                torch.testing.assert_close(rec.stats[name][layer, :, :heads].double(), mean, **TOL)


def test_padded_twins_local_windows_keep_the_self_mass():
    """Twins' locally-grouped attention pads its map to whole 7x7 windows (at 64 px: a 16x16 map in 3x3 windows of
    a 21x21 grid); the padding is a key and no query, and the self mass is measured (was NaN)."""
    torch.manual_seed(0)
    model = timm.create_model("twins_svt_small", pretrained=False, num_classes=0, embed_dims=[16, 32, 64, 64],
                              num_heads=[1, 2, 2, 4], depths=[2, 2, 2, 2], mlp_ratios=[2, 2, 2, 2]).eval()
    _sharpen(model)
    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), vitmad.record(model, stats=["self_mass"], layers=["blocks.0.0.attn"]) as rec:
        model(pixels)
    eager, maps = _eager_maps(model, class_name="LocallyGroupedAttn")
    with torch.no_grad():
        eager(pixels)
    a = maps[0]  # [B, 9 windows, heads, 49, 49], the first block of the first stage
    inside = torch.arange(21) < 16
    image = (inside[:, None] & inside[None, :]).reshape(3, 7, 3, 7).permute(0, 2, 1, 3).reshape(1, 9, 1, 49)
    assert 0 < image.sum() < image.numel()
    diagonal = a.diagonal(dim1=-2, dim2=-1)
    expected = (diagonal * image).sum((1, 3)) / image.double().sum((1, 3))
    torch.testing.assert_close(rec.stats["self_mass"][0, :, :a.shape[2]].double(), expected, **TOL)


def test_pooled_keys_have_no_self_mass():
    torch.manual_seed(0)
    model = timm.create_model("pvt_v2_b0", pretrained=False, embed_dims=(8, 16, 24, 32), num_heads=(1, 2, 2, 4),
                              depths=(1, 1, 1, 1)).eval()
    pixels = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), vitmad.record(model, stats=["entropy", "self_mass"]) as rec:
        model(pixels)
    eager, maps = _eager_maps(model)
    with torch.no_grad():
        eager(pixels)
    for layer, a in enumerate(maps):
        entropy = -torch.special.xlogy(a, a).sum(-1).mean(-1)
        heads = a.shape[1]  # rec.stats pads the layers of fewer heads with NaN up to the most heads
        torch.testing.assert_close(rec.stats["entropy"][layer, :, :heads].double(), entropy, **TOL)
        pooled = a.shape[-1] != a.shape[-2]  # stages 1-3 pool their keys: no key is the query's own token
        assert bool(rec.stats["self_mass"][layer, :, :heads].isnan().all()) == pooled
        if not pooled:  # the last stage attends over its own tokens
            index = torch.arange(a.shape[-1])
            torch.testing.assert_close(rec.stats["self_mass"][layer, :, :heads].double(),
                                       a[..., index, index].mean(-1), **TOL)
    assert rec.stats["self_mass"][-1].isfinite().all()


def test_options_and_reading_what_was_not_recorded_are_clear_errors():
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=1, embed_dim=16, num_heads=1,
                              img_size=16, patch_size=8).eval()
    with pytest.raises(ValueError, match="stats must be among .* got 'sinks'"):
        vitmad.record(model, stats=["sinks"])
    with pytest.raises(ValueError, match="stats must be among .* got 'sinks'"):
        vitmad.record(model, stats="entropy,sinks")
    with pytest.raises(TypeError, match="stats must be a list of names .* got 3"):
        vitmad.record(model, stats=3)
    with pytest.raises(ValueError, match="stats must be a list of names .* got ' , '"):
        vitmad.record(model, stats=" , ")  # names nothing: not read as MAD only
    with pytest.raises(TypeError, match=r"vitmad.record: grid must hold integers, got \[2.5, 2\]"):
        vitmad.record(model, patch=8, grid=(2.5, 2))  # never truncated to [2, 2]
    with pytest.raises(TypeError, match=r"stats must be a list of names .* got \['entropy', 2\]"):
        vitmad.record(model, stats=["entropy", 2])
    with torch.no_grad(), vitmad.record(model) as rec:
        model(torch.randn(1, 3, 16, 16))
    assert list(rec.stats) == ["mad"]
    with pytest.raises(KeyError, match="'entropy' was not recorded"):
        rec.calls[-1].stat("entropy")
    # rec.stats was a plain dict: a bare KeyError: 'entropy' (QA 280); a name that is no statistic was advised to
    # be passed to vitmad.record, which refuses it.
    with pytest.raises(KeyError, match=r"'entropy' was not recorded \(recorded: mad\); pass stats=\[..., 'entropy'\]"):
        _ = rec.stats["entropy"]
    for read in (lambda: rec.stats["bogus"], lambda: rec.calls[-1].stat("bogus")):
        with pytest.raises(KeyError, match="'bogus' is not a statistic; the statistics are 'mad', 'entropy', "):
            read()
    with pytest.raises(KeyError, match="prefix maps were not recorded"):
        _ = rec.prefix_maps


@pytest.mark.parametrize("stats, recorded, maps", [
    (None, [], False),
    (("mad",), [], False),
    ("entropy", ["entropy"], False),
    ("self_mass, entropy", ["entropy", "self_mass"], False),  # the ops' order, spaces ignored
    (["prefix_mass", "prefix_mass"], ["prefix_mass"], False),  # asked twice, recorded once
    ("all", ["entropy", "prefix_mass", "self_mass"], True),
    (["all"], ["entropy", "prefix_mass", "self_mass"], True),
])
def test_stats_takes_what_profile_takes(stats, recorded, maps):
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=1, embed_dim=16, num_heads=1,
                              img_size=16, patch_size=8).eval()
    with torch.no_grad(), vitmad.record(model, stats=stats) as rec:
        model(torch.randn(1, 3, 16, 16))
    assert list(rec.stats) == ["mad", *recorded]
    assert all(value.isfinite().all() for value in rec.stats.values())
    if maps:
        assert rec.prefix_maps[0].shape == (1, 1, 1, 4)
    else:
        with pytest.raises(KeyError, match="prefix maps were not recorded"):
            _ = rec.prefix_maps


def test_differential_attention_on_its_explicit_path_is_refused_with_the_way_out():
    """timm's DiffAttention without fused_attn makes both maps in one softmax over [B, 2H, N, N]: refused, saying
    so (was: 'vitmad knows how several calls combine only for differential attention', of differential attention)."""
    model = timm.create_model("vit_dwee_patch16_reg1_gap_256", pretrained=False, depth=1, embed_dim=32,
                              num_heads=2, img_size=32, patch_size=8).eval()
    model.blocks[0].attn.fused_attn = False
    message = r"blocks.0.attn \(DiffAttention\) .* is differential attention that made 1 attention call.*fused_attn"
    with torch.no_grad(), vitmad.record(model), pytest.raises(ValueError, match=message):
        model(torch.randn(1, 3, 32, 32))


def test_differential_attention_records_mad_alone_and_nan_for_statistics_of_a_non_distribution():
    """A1 - lambda * A2 is not a probability distribution: its layers keep the MAD they record without
    statistics, the statistics are NaN there and they have no maps, while the plain layers of the same model get
    theirs (timm's vit_dwee: differential attention in every block; one plain block beside it here)."""
    torch.manual_seed(0)
    model = timm.create_model("vit_dwee_patch16_reg1_gap_256", pretrained=False, depth=1, embed_dim=32,
                              num_heads=2, img_size=32, patch_size=8).eval()
    plain = timm.create_model("vit_small_patch16_224", pretrained=False, depth=1, embed_dim=32, num_heads=2,
                              img_size=32, patch_size=8, reg_tokens=1, class_token=False, global_pool="avg").eval()
    model.blocks.append(plain.blocks[0])  # same width and tokens: a second, ordinary layer
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), vitmad.record(model) as alone:
        model(pixels)
    with torch.no_grad(), vitmad.record(model, stats="all") as rec:
        model(pixels)
    assert rec.layers == ["blocks.0.attn", "blocks.1.attn"]
    torch.testing.assert_close(rec.mad, alone.mad, rtol=0, atol=0)
    torch.testing.assert_close(rec.calls[-1].components["blocks.0.attn"]["mad"],
                               alone.calls[-1].components["blocks.0.attn"]["mad"], rtol=0, atol=0)
    for name in ("entropy", "prefix_mass", "self_mass"):
        assert rec.stats[name][0].isnan().all(), name
        assert rec.stats[name][1].isfinite().all(), name
    assert rec.prefix_maps[0] is None
    assert rec.prefix_maps[1].shape == (2, 2, 1, 16)  # the register's row over the 4 x 4 grid


def test_saved_calls_read_back_as_the_readme_says(tmp_path):
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=1, embed_dim=16, num_heads=1,
                              img_size=16, patch_size=8).eval()
    rec = vitmad.record(model, stats=["entropy"])
    assert rec.layers == [] and rec.geometry == []  # before a call: empty (README), while rec.mad raises
    with pytest.raises(RuntimeError):
        _ = rec.mad
    with torch.no_grad(), rec:
        model(torch.randn(2, 3, 16, 16))
    torch.save(rec.calls, tmp_path / "calls.pt")
    loaded = torch.load(tmp_path / "calls.pt", weights_only=False)
    # rec.stats saves as the dict it is, read back by torch's default loader (QA 285: its class was refused).
    torch.save(rec.stats, tmp_path / "stats.pt")
    stats = torch.load(tmp_path / "stats.pt")
    assert isinstance(stats, dict) and list(stats) == ["mad", "entropy"] and torch.equal(stats["mad"], rec.mad)
    with pytest.raises(KeyError, match=r"temporal MAD of a video model is rec.temporal_mad"):
        _ = rec.stats["temporal_mad"]
    assert torch.equal(loaded[0].mad, rec.mad) and torch.equal(loaded[0].stat("entropy"), rec.stats["entropy"])
    assert loaded[0].layers == rec.layers and loaded[0].geometry == rec.geometry
