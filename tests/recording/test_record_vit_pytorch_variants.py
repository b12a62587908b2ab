"""lucidrains' vit-pytorch: the image designs of families/vit_pytorch_variants.py, each against the model's own
softmax probabilities, its tokens placed by geometry written here from the models' source (vit-pytorch 1.26.14):
odd, non-square patch grids where the model takes them, batch 2, outputs bit-identical with and without recording."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vit_pytorch")

from test_record_vit_pytorch import (  # noqa: E402
    SMALL,
    STAT_TOL,
    STATS,
    TOL,
    _attend_maps,
    _cells,
    _check_layers,
    _nan,
    _record,
    _sdpa_probabilities,
    _sharp,
    _tensor_softmax_maps,
)
from vit_pytorch import (  # noqa: E402
    accept_video_wrapper,
    attn_residual_with_dca_simple_vit,
    jet_vit,
    jumbo_vit,
    learnable_memory_vit,
    looped_vit,
    mp3,
    normalized_vit,
    parallel_vit,
    rvt,
    simple_flash_attn_vit,
    simple_uvit,
    simple_vit_attn_residual,
    simple_vit_with_fft,
    simple_vit_with_hyper_connections,
    vat,
    vit_5,
    vit_detpool,
    vit_with_decorr,
    vit_with_keel_post_ln,
    xcit,
)

import vitmad  # noqa: E402
from conftest import sharpened, statistics_reference  # noqa: E402

ODD = {"image_size": (24, 40), "patch_size": 8, "num_classes": 3, **SMALL}  # 3 x 5 patches of 8 px


def _sdpa(module):
    return lambda model, run: _sdpa_probabilities(module, run)


def _spatial_softmax(tokens: int):
    """``Tensor.softmax`` maps over ``tokens`` keys: the blocks' attention, not the attention over depth."""
    return lambda model, run: [m for m in _tensor_softmax_maps(run) if m.shape[-2:] == (tokens, tokens)]


def _norms_scaled(model: torch.nn.Module) -> torch.nn.Module:
    """Sharpened, with the gains after vit_5's query / key RMS norms and nViT's query / key scales raised: their
    normalised queries and keys otherwise give near-uniform attention."""
    model = sharpened(model)
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.endswith(("q_norm", "k_norm")):
                module.g.fill_(2.0)
            for scale in ("q_scale", "k_scale"):
                if isinstance(getattr(module, scale, None), torch.nn.Parameter):
                    getattr(module, scale).fill_(4.0)
    return model


def _grouped_qk_scaled(model: torch.nn.Module) -> torch.nn.Module:
    """DCA's grouped query / key projections (no ``nn.Linear``, so not sharpened) drawn at std 0.25: attention far
    from uniform."""
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.endswith(("to_q", "to_k")) and not isinstance(module, torch.nn.Linear):
                module.weight.normal_(std=0.25, generator=torch.Generator().manual_seed(len(name)))
    return model


# design -> (builder, image (h, w), patch (h, w), prefix tokens, suffix tokens, maps reader[, sharpener]), the extra
# tokens as each model's forward builds them.
DESIGNS = {
    "simple_flash_attn_vit": (lambda: simple_flash_attn_vit.SimpleViT(**ODD), (24, 40), (8, 8), 0, 0,
                              _sdpa(simple_flash_attn_vit)),
    "attn_residual_with_dca": (lambda: attn_residual_with_dca_simple_vit.SimpleViT(**ODD), (24, 40), (8, 8), 0, 0,
                               _spatial_softmax(15)),
    "attn_residual_with_dca_groups": (lambda: _grouped_qk_scaled(attn_residual_with_dca_simple_vit.SimpleViT(
        **ODD, head_groups=2, ffn_heads=2)), (24, 40), (8, 8), 0, 0, _spatial_softmax(15)),
    # The 6 x 5 cells of the image's Fourier transform (4 x 8 px frequency patches) first: no position.
    "simple_vit_with_fft": (lambda: simple_vit_with_fft.SimpleViT(**ODD, freq_patch_size=(4, 8)), (24, 40), (8, 8),
                            30, 0, _attend_maps),
    "hyper_connections": (lambda: simple_vit_with_hyper_connections.SimpleViT(
        **ODD, num_residual_streams=2, num_register_tokens=3), (24, 40), (8, 8), 0, 3, _attend_maps),
    "simple_uvit": (lambda: simple_uvit.SimpleUViT(**{**ODD, "depth": 3}, num_register_tokens=2), (24, 40), (8, 8),
                    0, 2, _attend_maps),
    "vit_with_decorr": (lambda: vit_with_decorr.ViT(**ODD), (24, 40), (8, 8), 1, 0, _attend_maps),
    "parallel_vit": (lambda: parallel_vit.ViT(**ODD), (24, 40), (8, 8), 1, 0, _attend_maps),
    "learnable_memory_vit": (lambda: learnable_memory_vit.ViT(**ODD), (24, 40), (8, 8), 1, 0, _attend_maps),
    "keel_post_ln": (lambda: vit_with_keel_post_ln.ViT(**ODD), (24, 40), (8, 8), 1, 0, _attend_maps),
    "keel_post_ln_mean": (lambda: vit_with_keel_post_ln.ViT(**ODD, pool="mean"), (24, 40), (8, 8), 0, 0,
                          _attend_maps),
    # Its axial rotary embedding takes a square grid; the class token, then 3 registers.
    "vit_5": (lambda: vit_5.ViT(**{**ODD, "image_size": 24}, num_registers=3), (24, 24), (8, 8), 4, 0,
              _attend_maps, _norms_scaled),
    "normalized_vit": (lambda: normalized_vit.nViT(**ODD), (24, 40), (8, 8), 0, 0, _sdpa(normalized_vit),
                       _norms_scaled),
    "mp3_vit": (lambda: mp3.ViT(**ODD), (24, 40), (8, 8), 0, 0, _attend_maps),
    "vat_vit": (lambda: vat.ViT(**ODD, num_register_tokens=2), (24, 40), (8, 8), 3, 0, _attend_maps),
    "jumbo_vit": (lambda: jumbo_vit.JumboViT(**ODD, num_jumbo_cls=2, jumbo_cls_k=3), (24, 40), (8, 8), 6, 0,
                  _attend_maps),
    "vit_detpool": (lambda: vit_detpool.ViTDetPool(**ODD), (24, 40), (8, 8), 1, 0, _attend_maps),
    "vit_detpool_no_cls": (lambda: vit_detpool.ViTDetPool(**ODD, use_cls_token=False), (24, 40), (8, 8), 0, 0,
                           _attend_maps),
    "jet_vit_full": (lambda: jet_vit.JetViT(**ODD), (24, 40), (8, 8), 0, 0, _attend_maps),
    # Patches of 4 x 8 px: the looped designs name their axes p0, p1.
    "looped_vit": (lambda: looped_vit.LoopedViT(
        num_classes=3, dim=32, image_size=(24, 40), patch_size=(4, 8), pre_loop_depth=1, num_looped_blocks=1,
        post_loop_depth=1, loop_depth=2, heads=2, dim_head=16, mlp_dim=32), (24, 40), (4, 8), 1, 0,
                   _sdpa(looped_vit)),
    "simple_vit_attn_residual": (lambda: simple_vit_attn_residual.SimpleViTAttnResidual(**ODD), (24, 40), (8, 8),
                                 0, 0, _spatial_softmax(15)),
}


@pytest.mark.parametrize("design", list(DESIGNS))
def test_designs_match_their_softmax(design):
    build, size, patch, prefix, suffix, read, *sharpen = DESIGNS[design]
    torch.manual_seed(0)
    model = (sharpen[0] if sharpen else _sharp)(build())
    grid = (size[0] // patch[0], size[1] // patch[1])
    pixels = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1))
    _, tokens, mean = _record(model, lambda: model(pixels), stats=STATS)
    maps = read(model, lambda: model(pixels))
    positions = torch.cat([_nan(prefix), _cells(grid, patch), _nan(suffix)])
    _check_layers(tokens, mean, maps, positions, grid, patch, prefix, suffix)
    if design == "looped_vit":  # pre-loop, the looped block once per loop, post-loop
        assert tokens.layers == ["pre_loop.layers.0.0", "looped.layers.0.0", "looped.layers.0.0",
                                 "post_loop.layers.0.0"]
    if design == "simple_vit_attn_residual":
        assert set(mean.skipped) == {"transformer.layers.0.1.attn", "transformer.layers.1.0.attn",
                                     "transformer.layers.1.1.attn", "transformer.final_pool.attn"}
        assert mean.skipped["transformer.final_pool.attn"].startswith("attention over depth")


def test_detpool_object_mask_keeps_masked_keys_at_their_cells():
    torch.manual_seed(0)
    model = _sharp(vit_detpool.ViTDetPool(**ODD))
    pixels = torch.randn(2, 3, 24, 40, generator=torch.Generator().manual_seed(2))
    mask = torch.zeros(2, 24, 40, dtype=torch.bool)
    mask[0, :16, 8:] = True
    mask[1, 8:, :24] = True
    _, tokens, mean = _record(model, lambda: model(pixels, object_mask=mask), stats=STATS)
    maps = _attend_maps(model, lambda: model(pixels, object_mask=mask))
    assert maps[0][0, :, :, 1].max() == 0  # the first image's patch (0, 0) is outside its mask: no mass
    _check_layers(tokens, mean, maps, torch.cat([_nan(1), _cells((3, 5), (8, 8))]), (3, 5), (8, 8), 1, 0)


@pytest.mark.parametrize("rotary", [True, False])
def test_rvt_merges_batch_and_heads(rotary):
    # Its axial rotary embedding takes a square grid; without it a 3 x 5 one.
    size = (24, 24) if rotary else (24, 40)
    torch.manual_seed(0)
    model = sharpened(rvt.RvT(image_size=24, patch_size=8, num_classes=3, use_rotary=rotary, **SMALL))
    with torch.no_grad():  # its queries come from a depthwise-separable convolution, which sharpened leaves alone
        for module in model.modules():
            if isinstance(module, rvt.SpatialConv):
                module.conv.net[1].weight.mul_(16.0)
    pixels = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(3))
    grid = (3, size[1] // 8)
    _, tokens, mean = _record(model, lambda: model(pixels), stats=STATS)
    maps = [m.view(2, 2, *m.shape[-2:]) for m in _attend_maps(model, lambda: model(pixels))]  # [(B H), N, N]
    _check_layers(tokens, mean, maps, torch.cat([_nan(1), _cells(grid, (8, 8))]), grid, (8, 8), 1, 0)


def test_jet_vit_windows_and_skipped_linear_attention():
    torch.manual_seed(0)
    model = _sharp(jet_vit.JetViT(image_size=(24, 40), patch_size=4, num_classes=3, window_size=2,
                                  attn_layers=["WA", "LA", "FA"], **{**SMALL, "depth": 3}))
    pixels = torch.randn(2, 3, 24, 40, generator=torch.Generator().manual_seed(4))
    maps = []
    windows = model.transformer.layers[0][0].options["WA"]
    handle = windows.attend[0].register_forward_hook(lambda m, args, out: maps.append(out.double()))
    try:
        with torch.no_grad():
            model(pixels)
    finally:
        handle.remove()
    _, tokens, mean = _record(model, lambda: model(pixels))
    assert tokens.layers == ["transformer.layers.0.0.options.WA", "transformer.layers.2.0.options.FA"]
    assert mean.skipped["transformer.layers.1.0.options.LA"].startswith("JetViT's linear attention")
    # 6 x 10 patches of 4 px in 3 x 5 windows of 2 x 2, row-major, batched with the images: [B * 15, H, 4, 4].
    (window_maps,) = maps
    assert window_maps.shape == (30, 2, 4, 4)
    expected = torch.empty(2, 2, 6, 10, dtype=torch.float64)
    inner = _cells((2, 2), (4, 4))
    for image in range(2):
        for a in range(3):
            for b in range(5):
                rows = window_maps[image * 15 + a * 5 + b]  # [H, 4, 4]
                values = (rows * torch.cdist(inner, inner)).sum(-1).view(2, 2, 2)
                expected[image, :, 2 * a:2 * a + 2, 2 * b:2 * b + 2] = values
    torch.testing.assert_close(tokens.per_layer[0].double(), expected.view(2, 2, 60), **TOL)
    assert tokens.geometry[0].attention == "window 2x2" and tokens.geometry[0].grid == (6, 10)
    full = _attend_maps(model, lambda: model(pixels))[-1]
    torch.testing.assert_close(tokens.per_layer[1].double(), statistics_reference(full, _cells((6, 10), (4, 4)))["mad"],
                               **TOL)


def test_xcit_skips_cross_covariance_attention_and_records_class_maps():
    torch.manual_seed(0)
    model = _sharp(xcit.XCiT(image_size=32, patch_size=8, num_classes=3, cls_depth=2, **SMALL))
    pixels = torch.randn(2, 3, 24, 40, generator=torch.Generator().manual_seed(5))
    _, _, mean = _record(model, lambda: model(pixels), stats=STATS)
    maps = _attend_maps(model, lambda: model(pixels))  # 2 XCA ([B, H, d, d]), then 2 class-attention layers
    assert [m.shape[-2:] for m in maps] == [(16, 16), (16, 16), (1, 16), (1, 16)]
    assert mean.layers == []
    assert mean.skipped["xcit_transformer.layers.0.0.fn"].startswith("cross-covariance attention")
    class_layers = ["cls_transformer.layers.0.0.fn", "cls_transformer.layers.1.0.fn"]
    for layer, probabilities in zip(class_layers, maps[2:]):
        assert mean.skipped[layer].startswith("class attention")
        # The class token's row over the 3 x 5 patches (its own column, the first key, left out).
        torch.testing.assert_close(mean.class_attention_maps[layer].double(), probabilities[..., 1:], **STAT_TOL)


def test_adapter_places_the_memory_class_token_and_memory_keys_without_positions():
    torch.manual_seed(0)
    vit = learnable_memory_vit.ViT(**ODD)
    adapter = _sharp(learnable_memory_vit.Adapter(vit=vit, num_memories_per_layer=3, num_classes=3))
    with torch.no_grad():
        adapter.memories_per_layer.normal_(std=2.0)
    pixels = torch.randn(2, 3, 24, 40, generator=torch.Generator().manual_seed(6))
    _, tokens, mean = _record(adapter, lambda: adapter(pixels), stats=STATS)
    maps = _attend_maps(adapter, lambda: adapter(pixels))
    # Queries: the memory class token, the class token, the 3 x 5 patches; keys: those, then 3 memories.
    queries = torch.cat([_nan(2), _cells((3, 5), (8, 8))])
    keys = torch.cat([queries, _nan(3)])
    placed = ~keys[:, 0].isnan()
    for layer, probabilities in enumerate(maps):
        assert probabilities.shape == (2, 2, 17, 20)
        assert probabilities[:, :, 1:, 17:].max() == 0  # the image's tokens do not see the memories (the mask)
        rows = probabilities[:, :, 2:]
        mad = (rows[..., placed] * torch.cdist(queries[2:], keys[placed])).sum(-1)
        torch.testing.assert_close(tokens.per_layer[layer].double(), mad, **TOL)
        torch.testing.assert_close(mean.per_layer[layer].double(), mad.mean(-1), **TOL)
        torch.testing.assert_close(tokens.stats["prefix_mass"][layer].double(), rows[..., ~placed].sum(-1),
                                   **STAT_TOL)
        assert mean.prefix_maps[layer] is None  # the recorder keeps prefix maps of self-attention over its queries
        assert tokens.geometry[layer].num_prefix_tokens == 2


class _Tasks(torch.nn.Module):
    """Two tasks' Adapters sharing one frozen ViT (learnable_memory_vit's purpose), run in the order ``which`` names
    (``"vit"``: the ViT's own forward); module order lists the ViT under ``first`` alone."""

    def __init__(self, first, second):
        super().__init__()
        self.first, self.second = first, second

    def forward(self, pixels, which):
        return [self.first.vit(pixels) if w == "vit" else getattr(self, w)(pixels) for w in which]


@pytest.mark.parametrize("which", [["second"], ["first", "second"], ["second", "vit", "first"]])
def test_adapters_sharing_one_vit_are_each_placed_with_their_own_memories(which):
    """Each run of the shared ViT is placed by the Adapter running it (3 or 5 memory keys), or as the ViT's own
    sequence (its class token, the patches); a run through the second Adapter was refused as run outside the ViT's
    forward, and both in one forward were measured with the first Adapter's memory count."""
    torch.manual_seed(0)
    vit = learnable_memory_vit.ViT(**ODD)
    first = learnable_memory_vit.Adapter(vit=vit, num_memories_per_layer=3, num_classes=3)
    second = learnable_memory_vit.Adapter(vit=vit, num_memories_per_layer=5, num_classes=3)
    model = _sharp(_Tasks(first, second))
    with torch.no_grad():
        first.memories_per_layer.normal_(std=2.0)
        second.memories_per_layer.normal_(std=2.0)
    pixels = torch.randn(2, 3, 24, 40, generator=torch.Generator().manual_seed(6))
    _, tokens, mean = _record(model, lambda: tuple(model(pixels, which)), stats=STATS)
    maps = _attend_maps(model, lambda: model(pixels, which))
    cells = _cells((3, 5), (8, 8))
    layers = ["first.vit.transformer.layers.0.0", "first.vit.transformer.layers.1.0"]
    assert len(tokens.calls) == len(mean.calls) == 1 and tokens.layers == layers * len(which)
    # Per run: the class tokens before the 3 x 5 patches (the memory class token and the class token, or the ViT's
    # own class token) and the memory keys after them (none for the ViT's own forward).
    runs = [{"first": (2, 3), "second": (2, 5), "vit": (1, 0)}[w] for w in which]
    for index, probabilities in enumerate(maps):
        prefix, memories = runs[index // 2]
        queries = torch.cat([_nan(prefix), cells])
        keys = torch.cat([queries, _nan(memories)])
        assert probabilities.shape == (2, 2, len(queries), len(keys))
        placed = ~keys[:, 0].isnan()
        rows = probabilities[:, :, prefix:]
        mad = (rows[..., placed] * torch.cdist(queries[prefix:], keys[placed])).sum(-1)
        torch.testing.assert_close(tokens.per_layer[index].double(), mad, **TOL)
        torch.testing.assert_close(mean.per_layer[index].double(), mad.mean(-1), **TOL)
        torch.testing.assert_close(tokens.stats["prefix_mass"][index].double(), rows[..., ~placed].sum(-1),
                                   **STAT_TOL)
        assert tokens.geometry[index].num_prefix_tokens == prefix


def test_mp3_places_every_patch_over_the_patches_each_image_kept():
    torch.manual_seed(0)
    model = _sharp(mp3.MP3(mp3.ViT(**ODD), masking_ratio=0.4))
    pixels = torch.randn(2, 3, 24, 40, generator=torch.Generator().manual_seed(7))

    def run():
        torch.manual_seed(8)  # the same draw in every run
        return model(pixels)

    _, tokens, mean = _record(model, run)
    maps = _attend_maps(model, run)
    torch.manual_seed(8)
    kept = torch.rand(2, 15).argsort(dim=-1)[:, 6:]  # MP3's draw: int(0.4 * 15) masked, the rest kept in order
    cells = _cells((3, 5), (8, 8))
    for layer, probabilities in enumerate(maps):
        assert probabilities.shape == (2, 2, 15, 9)
        expected = torch.stack([(probabilities[b] * torch.cdist(cells, cells[kept[b]])).sum(-1) for b in range(2)])
        torch.testing.assert_close(tokens.per_layer[layer].double(), expected, **TOL)
        torch.testing.assert_close(mean.per_layer[layer].double(), expected.mean(-1), **TOL)


def test_vat_records_its_vit_over_each_view_and_skips_its_own_layers():
    torch.manual_seed(0)
    model = _sharp(vat.VAT(vat.ViT(**ODD, num_register_tokens=1), dim=32, depth=2, heads=2, dim_head=16,
                           dim_action=4, mlp_dim=32, action_chunk_len=2, num_views=2))
    views = torch.randn(2, 2, 3, 24, 40, generator=torch.Generator().manual_seed(9))  # [B, views, C, H, W]
    _, tokens, mean = _record(model, lambda: model(views), stats=STATS)
    maps = _attend_maps(model, lambda: model(views))[:2]  # the ViT's layers run first
    # The ViT runs on the 4 (video, view) images: its register token, its class token, the patches.
    _check_layers(tokens, mean, maps, torch.cat([_nan(2), _cells((3, 5), (8, 8))]), (3, 5), (8, 8), 2, 0)
    assert mean.skipped["layers.0.2"].startswith("cross attention of VAT's action")
    assert mean.skipped["layers.0.1"].startswith("self-attention among VAT's")


def test_accept_video_wrapper_places_each_frame_as_an_image():
    torch.manual_seed(0)
    model = accept_video_wrapper.AcceptVideoWrapper(_sharp(vit_with_keel_post_ln.ViT(**ODD)))
    video = torch.randn(2, 3, 3, 24, 40, generator=torch.Generator().manual_seed(10))  # [B, C, frames, H, W]
    _, tokens, mean = _record(model, lambda: model(video), stats=STATS)
    maps = _attend_maps(model, lambda: model(video))
    assert maps[0].shape[0] == 6  # (video, frame), video-major
    _check_layers(tokens, mean, maps, torch.cat([_nan(1), _cells((3, 5), (8, 8))]), (3, 5), (8, 8), 1, 0)


def test_looped_vit_of_three_dims_is_refused():
    torch.manual_seed(0)
    model = looped_vit.LoopedViT(num_classes=3, dim=32, input_shape=(4, 16, 16), patch_size=(2, 8, 8),
                                 pre_loop_depth=1, num_looped_blocks=1, post_loop_depth=1, loop_depth=1, heads=2,
                                 dim_head=16, mlp_dim=32).eval()
    with torch.no_grad(), vitmad.record(model), pytest.raises(ValueError, match="not a cut vitmad knows"):
        model(torch.randn(1, 3, 4, 16, 16))


def test_designs_outside_their_model_are_refused():
    torch.manual_seed(0)
    model = rvt.RvT(image_size=16, patch_size=8, num_classes=3, **SMALL).eval()
    with torch.no_grad(), vitmad.record(model), pytest.raises(ValueError, match="did not run on images"):
        model.transformer(torch.randn(1, 5, 32), fmap_dims={"h": 2, "w": 2})
