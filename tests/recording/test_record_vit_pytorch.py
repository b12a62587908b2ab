"""lucidrains' vit-pytorch: the plain designs (ViT, SimpleViT and its variants, DeepViT, CaiT, DistillableViT, the ViT
for small datasets, the 3-D ViTs, ViViT, SimMIM, MAE, patch dropout, the Extractor and Recorder wrappers), each
against the model's own softmax probabilities, its tokens placed by geometry written here from the models' source."""

from __future__ import annotations

import copy
import math
from unittest import mock

import pytest
import torch

pytest.importorskip("vit_pytorch")

from vit_pytorch import (  # noqa: E402
    cait,
    deepvit,
    distill,
    mae,
    simmim,
    simple_vit,
    simple_vit_3d,
    simple_vit_with_patch_dropout,
    simple_vit_with_qk_norm,
    simple_vit_with_register_tokens,
    simple_vit_with_relative_proj_pos_bias,
    simple_vit_with_sparse_gating,
    simple_vit_with_specialized_cls,
    simple_vit_with_value_residual,
    vit,
    vit_3d,
    vit_for_small_dataset,
    vivit,
)

import vitmad  # noqa: E402
from conftest import run_hooked, sharpened, statistics_reference  # noqa: E402

# float32 recordings (the fused mad op on the model's probabilities) against float64 on the same probabilities.
TOL = {"rtol": 1e-5, "atol": 1e-4}  # pixels or frames
STAT_TOL = {"rtol": 1e-5, "atol": 1e-6}  # masses and maps <= 1, entropies in nats
STATS = ["entropy", "prefix_mass", "prefix_maps"]
SMALL = {"dim": 32, "depth": 2, "heads": 2, "mlp_dim": 32, "dim_head": 16}


def _sharp(model: torch.nn.Module) -> torch.nn.Module:
    """Sharpened, and with every query / key projection (and qk norm) scaled up: attention far from uniform."""
    model = sharpened(model)
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.endswith(("to_qkv", "to_q", "to_kv")):
                module.weight.mul_(2.0)
            elif name.endswith(("q_norm", "k_norm")):  # RMSNorm to unit vectors: dot products within [-1, 1]
                module.gamma.fill_(1.0)
    return model


def _attend_maps(model: torch.nn.Module, run) -> list[torch.Tensor]:
    """The outputs of every attention's ``nn.Softmax`` (``attend``) in one run, in call order: the model's own
    probabilities, before any mixing of heads or dropout."""
    maps = []
    handles = [m.attend.register_forward_hook(lambda _, args, out: maps.append(out.double()))
               for m in model.modules() if isinstance(getattr(m, "attend", None), torch.nn.Softmax)]
    run_hooked(handles, run)
    return maps


def _tensor_softmax_maps(run) -> list[torch.Tensor]:
    """Every ``Tensor.softmax`` of rank 4 in one run: DeepViT's ``dots.softmax(dim=-1)``."""
    maps, original = [], torch.Tensor.softmax

    def spy(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        if out.dim() == 4:
            maps.append(out.double())
        return out

    with torch.no_grad(), mock.patch.object(torch.Tensor, "softmax", spy):
        run()
    return maps


def _cells(grid: tuple[int, int], patch: tuple[int, int]) -> torch.Tensor:
    """``[gh * gw, 2]`` float64 pixel centres of a row-major grid of ``patch`` (height, width) cells."""
    rows, cols = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
    cells = torch.stack([rows, cols], -1).reshape(-1, 2).double() + 0.5
    return cells * torch.tensor(patch, dtype=torch.float64)


def _nan(count: int) -> torch.Tensor:
    return torch.full((count, 2), math.nan, dtype=torch.float64)


def _check_layers(tokens, mean, maps, positions, grid, patch, prefix: int, suffix: int) -> None:
    """Each recorded layer (``tokens``: reduction none, ``mean``) against its probabilities over tokens at
    ``positions``: MAD per token and mean, entropy, prefix mass and the rows of the tokens without a position."""
    assert len(tokens.layers) == len(maps) > 0
    for layer, probabilities in enumerate(maps):
        geometry = tokens.geometry[layer]
        assert geometry.grid == grid and geometry.stride == tuple(float(p) for p in patch)
        assert geometry.num_prefix_tokens == prefix and (geometry.num_suffix_tokens or 0) == suffix
        expected = statistics_reference(probabilities, positions)
        assert float(expected["entropy"].mean()) < 0.75 * math.log(probabilities.shape[-1])  # far from uniform
        torch.testing.assert_close(tokens.per_layer[layer].double(), expected["mad"], **TOL)
        torch.testing.assert_close(mean.per_layer[layer].double(), expected["mad"].mean(-1), **TOL)
        for stat in ("entropy", "prefix_mass"):
            torch.testing.assert_close(tokens.stats[stat][layer].double(), expected[stat], **STAT_TOL)
            torch.testing.assert_close(mean.stats[stat][layer].double(), expected[stat].mean(-1), **STAT_TOL)
        if prefix + suffix:
            torch.testing.assert_close(mean.prefix_maps[layer].double(), expected["prefix_maps"], **STAT_TOL)
        else:
            assert mean.prefix_maps[layer] is None


def _record(model, run, **kwargs):
    """(output without recording, reduction-none recording, mean recording); the outputs with recording equal it."""
    with torch.no_grad():
        plain = run()
        with vitmad.record(model, reduction="none", **kwargs) as tokens:
            first = run()
        with vitmad.record(model, **kwargs) as mean:
            second = run()
    for out in (first, second):
        for a, b in zip(out if isinstance(out, tuple) else (out,), plain if isinstance(plain, tuple) else (plain,)):
            assert torch.equal(a, b)
    return plain, tokens, mean


# (builder, prefix tokens, suffix tokens, patch (h, w), image (h, w), maps reader)
IMAGE_MODELS = {
    "vit_cls": (lambda: vit.ViT(image_size=(24, 40), patch_size=(4, 8), num_classes=3, **SMALL), 1, 0),
    "vit_mean": (lambda: vit.ViT(image_size=(24, 40), patch_size=(4, 8), num_classes=3, pool="mean", **SMALL), 0, 0),
    "simple_vit": (lambda: simple_vit.SimpleViT(image_size=(24, 40), patch_size=8, num_classes=3, **SMALL), 0, 0),
    "qk_norm": (lambda: simple_vit_with_qk_norm.SimpleViT(image_size=(24, 40), patch_size=8, num_classes=3, **SMALL),
                0, 0),
    "value_residual": (lambda: simple_vit_with_value_residual.SimpleViT(image_size=(24, 40), patch_size=8,
                                                                        num_classes=3, **SMALL), 0, 0),
    "registers": (lambda: simple_vit_with_register_tokens.SimpleViT(image_size=(24, 40), patch_size=8, num_classes=3,
                                                                    num_register_tokens=3, **SMALL), 0, 3),
    "relative_bias": (lambda: simple_vit_with_relative_proj_pos_bias.SimpleViT(image_size=(24, 40), patch_size=8,
                                                                               num_classes=3, **SMALL), 0, 0),
    "specialized_cls": (lambda: simple_vit_with_specialized_cls.SimpleViT(image_size=(24, 40), patch_size=8,
                                                                          num_classes=3, **SMALL), 1, 0),
    "sparse_gating": (lambda: simple_vit_with_sparse_gating.SimpleViTWithSparseGating(
        image_size=(24, 40), patch_size=8, num_classes=3, num_register_tokens=2, **SMALL), 2, 0),
    "small_dataset": (lambda: vit_for_small_dataset.ViT(image_size=(24, 40), patch_size=8, num_classes=3, **SMALL),
                      1, 0),
    "deepvit": (lambda: deepvit.DeepViT(image_size=32, patch_size=8, num_classes=3, **SMALL), 1, 0),
}


@pytest.mark.parametrize("kind", list(IMAGE_MODELS))
def test_image_models_match_their_softmax(kind):
    build, prefix, suffix = IMAGE_MODELS[kind]
    torch.manual_seed(0)
    model = _sharp(build())
    size = (32, 32) if kind == "deepvit" else (24, 40)
    patch = (4, 8) if kind.startswith("vit_") else (8, 8)
    grid = (size[0] // patch[0], size[1] // patch[1])
    pixels = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1))
    _, tokens, mean = _record(model, lambda: model(pixels), stats=STATS)
    maps = _tensor_softmax_maps(lambda: model(pixels)) if kind == "deepvit" else \
        _attend_maps(model, lambda: model(pixels))
    positions = torch.cat([_nan(prefix), _cells(grid, patch), _nan(suffix)])
    assert tokens.layers == ["transformer.layers.0.0", "transformer.layers.1.0"]
    _check_layers(tokens, mean, maps, positions, grid, patch, prefix, suffix)


def test_vit_on_a_smaller_image_places_the_grid_it_cuts():
    # vit.ViT slices its position table (pos_embedding[:seq]): a smaller image runs on its own grid.
    torch.manual_seed(0)
    model = _sharp(vit.ViT(image_size=32, patch_size=8, num_classes=3, **SMALL))
    pixels = torch.randn(1, 3, 16, 24, generator=torch.Generator().manual_seed(2))
    _, tokens, mean = _record(model, lambda: model(pixels), stats=STATS)
    positions = torch.cat([_nan(1), _cells((2, 3), (8, 8))])
    _check_layers(tokens, mean, _attend_maps(model, lambda: model(pixels)), positions, (2, 3), (8, 8), 1, 0)


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_distillable_vit_places_its_distillation_token_last(pool):
    torch.manual_seed(0)
    model = _sharp(distill.DistillableViT(image_size=(16, 24), patch_size=8, num_classes=3, pool=pool, **SMALL))
    pixels = torch.randn(2, 3, 16, 24, generator=torch.Generator().manual_seed(3))
    token = torch.randn(1, 32, generator=torch.Generator().manual_seed(4))
    prefix = 1 if pool == "cls" else 0
    for given, suffix in ((token, 1), (None, 0)):
        _, tokens, mean = _record(model, lambda given=given: model(pixels, distill_token=given), stats=STATS)
        positions = torch.cat([_nan(prefix), _cells((2, 3), (8, 8)), _nan(suffix)])
        maps = _attend_maps(model, lambda given=given: model(pixels, distill_token=given))
        _check_layers(tokens, mean, maps, positions, (2, 3), (8, 8), prefix, suffix)


def test_cait_records_its_patch_layers_and_the_class_token_maps():
    torch.manual_seed(0)
    model = _sharp(cait.CaiT(image_size=24, patch_size=8, num_classes=3, cls_depth=2, **SMALL))
    pixels = torch.randn(2, 3, 24, 24, generator=torch.Generator().manual_seed(5))
    _, tokens, mean = _record(model, lambda: model(pixels), stats=STATS)
    maps = _attend_maps(model, lambda: model(pixels))  # 2 patch layers, then 2 class-attention layers
    assert [m.shape[-2:] for m in maps] == [(9, 9), (9, 9), (1, 10), (1, 10)]
    _check_layers(tokens, mean, maps[:2], _cells((3, 3), (8, 8)), (3, 3), (8, 8), 0, 0)
    class_layers = ["cls_transformer.layers.0.0.fn", "cls_transformer.layers.1.0.fn"]
    assert list(mean.skipped) == class_layers and mean.skipped[class_layers[0]].startswith("class attention")
    for layer, probabilities in zip(class_layers, maps[2:]):
        # The class token's row over the patches (its own column, the first key, left out).
        torch.testing.assert_close(mean.class_attention_maps[layer].double(), probabilities[..., 1:], **STAT_TOL)


@pytest.mark.parametrize("design", ["vit_3d", "simple_vit_3d"])
def test_3d_vits_place_tubelets_in_space_and_time(design):
    torch.manual_seed(0)
    args = dict(image_size=(16, 24), image_patch_size=8, frames=4, frame_patch_size=2, num_classes=3, **SMALL)
    model = _sharp(vit_3d.ViT(**args) if design == "vit_3d" else simple_vit_3d.SimpleViT(**args))
    video = torch.randn(2, 3, 4, 16, 24, generator=torch.Generator().manual_seed(6))
    _, tokens, mean = _record(model, lambda: model(video))
    prefix = int(design == "vit_3d")
    # Tubelet (f, r, c), frame-major: ((r + 0.5) 8, (c + 0.5) 8) px, (f + 0.5) 2 frames.
    space = torch.cat([_nan(prefix), _cells((2, 3), (8, 8)).repeat(2, 1)])
    time = torch.cat([torch.full((prefix, 1), math.nan, dtype=torch.float64),
                      ((torch.arange(2).double() + 0.5) * 2).repeat_interleave(6)[:, None]])
    maps = _attend_maps(model, lambda: model(video))
    assert len(maps) == len(tokens.layers) == 2
    for layer, probabilities in enumerate(maps):
        geometry = tokens.geometry[layer]
        assert geometry.grid == (2, 3) and geometry.frames == 2 and geometry.frame_stride == 2.0
        spatial = statistics_reference(probabilities, space)["mad"]
        temporal = statistics_reference(probabilities, time)["mad"]  # [N, 1]: |t_q - t_k|
        torch.testing.assert_close(tokens.per_layer[layer].double(), spatial, **TOL)
        torch.testing.assert_close(tokens.temporal_mad[layer].double(), temporal, **TOL)
        torch.testing.assert_close(mean.mad[layer].double(), spatial.mean(-1), **TOL)
        torch.testing.assert_close(mean.temporal_mad[layer].double(), temporal.mean(-1), **TOL)


def _frame_positions(grid, patch, frames: int, frame_patch: int, cls: bool):
    """ViViT's tokens of one frame group ``[n, 2]`` (its class token first if ``cls``) and the tubelet frames'
    centres ``[F]``."""
    space = torch.cat([_nan(int(cls)), _cells(grid, patch)])
    return space, (torch.arange(frames).double() + 0.5) * frame_patch


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_vivit_factorized_encoder_places_each_frame_and_skips_the_temporal_transformer(pool):
    torch.manual_seed(0)
    model = _sharp(vivit.ViViT(image_size=(16, 24), image_patch_size=8, frames=4, frame_patch_size=2, num_classes=3,
                             spatial_depth=2, temporal_depth=1, heads=2, mlp_dim=32, dim=32, dim_head=16, pool=pool))
    video = torch.randn(2, 3, 4, 16, 24, generator=torch.Generator().manual_seed(7))
    _, tokens, mean = _record(model, lambda: model(video))  # fused: F.scaled_dot_product_attention
    eager = copy.deepcopy(model)
    for module in eager.modules():
        if isinstance(module, vivit.Attention):
            module.use_flash_attn = False
    maps = _attend_maps(eager, lambda: eager(video))[:2]  # the spatial layers (the temporal one after them)
    assert list(mean.skipped) == ["temporal_transformer.layers.0.0"]
    space, times = _frame_positions((2, 3), (8, 8), 2, 2, pool == "cls")
    for layer, probabilities in enumerate(maps):
        assert probabilities.shape[:2] == (2 * 2, 2)  # [B * F, H]: a batch row per tubelet frame, video-major
        spatial = statistics_reference(probabilities, space)["mad"].view(2, 2, 2, 6)  # [B, F, H, 6]
        assert tokens.geometry[layer].frames == 2 and tokens.geometry[layer].attention == "space"
        torch.testing.assert_close(tokens.per_layer[layer].double(), spatial.transpose(1, 2).reshape(2, 2, 12), **TOL)
        torch.testing.assert_close(mean.mad[layer].double(), spatial.mean((1, 3)), **TOL)
        assert (mean.temporal_mad[layer] == 0).all()  # one frame per call row: measured, not assumed


def test_vivit_factorized_self_attention_places_space_and_time_with_a_frame_mask():
    torch.manual_seed(0)
    model = _sharp(vivit.ViViT(image_size=(16, 24), image_patch_size=8, frames=6, frame_patch_size=2, num_classes=3,
                             spatial_depth=1, temporal_depth=1, heads=2, mlp_dim=32, dim=32, dim_head=16,
                             variant="factorized_self_attention"))
    video = torch.randn(2, 3, 6, 16, 24, generator=torch.Generator().manual_seed(8))
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 4:] = False  # the second video's last tubelet frame is padding: no key
    _, tokens, mean = _record(model, lambda: model(video, mask=mask))
    eager = copy.deepcopy(model)
    for module in eager.modules():
        if isinstance(module, vivit.Attention):
            module.use_flash_attn = False
    spatial_map, temporal_map = _attend_maps(eager, lambda: eager(video, mask=mask))
    assert tokens.layers == ["factorized_transformer.layers.0.0", "factorized_transformer.layers.0.1"]
    space, times = _frame_positions((2, 3), (8, 8), 3, 2, True)
    # The padding frame (the second video's third tubelet frame) is no frame of its video: its tokens are no
    # queries, in space (which the model does not mask) and in time (which masks it as a key); they were counted
    # as queries, and raised the second video's temporal MAD by half (QA helper-248).
    padding = torch.zeros(2, 3, 1, 6, dtype=torch.bool)
    padding[1, 2] = True
    # Space: [B * F, H, 1 + 6, ...], a frame's class token then its patches.
    spatial = statistics_reference(spatial_map, space)["mad"].view(2, 3, 2, 6).masked_fill(padding, float("nan"))
    torch.testing.assert_close(tokens.per_layer[0].double(), spatial.transpose(1, 2).reshape(2, 2, 18),
                               equal_nan=True, **TOL)
    torch.testing.assert_close(mean.mad[0].double(), spatial.nanmean((1, 3)), **TOL)
    # Time: [B * (1 + 6), H, F, F], one row per token of a frame (the class tokens' first, no position); token
    # (n, f) is tubelet (f, n - 1), at time (f + 0.5) * 2.
    assert temporal_map[7 + 1, :, :, 2].eq(0).all() and temporal_map[0, :, :, 2].ne(0).all()  # the mask read
    at = times[:, None].expand(3, 1)
    temporal = statistics_reference(temporal_map, at)["mad"].view(2, 7, 2, 3)[:, 1:]  # [B, 6 cells, H, F]
    temporal = temporal.permute(0, 3, 2, 1).masked_fill(padding, float("nan"))  # [B, F, H, 6]
    torch.testing.assert_close(tokens.temporal_mad[1].double(), temporal.transpose(1, 2).reshape(2, 2, 18),
                               equal_nan=True, **TOL)
    torch.testing.assert_close(mean.temporal_mad[1].double(), temporal.nanmean((1, 3)), **TOL)
    assert (tokens.per_layer[1].nan_to_num() == 0).all() and (mean.temporal_mad[0] == 0).all()


def test_simmim_encoder_places_every_patch_and_mae_the_patches_each_image_kept():
    # SimMIM slices a position table of shape [1, N + 1, D] (DeepViT's; vit.ViT's is [N + 1, D] in 1.26.14), MAE with
    # pool="cls" too; vit.ViT with pool="mean" suits MAE.
    torch.manual_seed(0)
    grid, patch = (4, 4), (8, 8)
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(9))
    wrapper = simmim.SimMIM(encoder=_sharp(deepvit.DeepViT(image_size=32, patch_size=8, num_classes=3, **SMALL)),
                            masking_ratio=0.5)

    def run_simmim():
        torch.manual_seed(11)  # the same mask in every run
        return wrapper(pixels)

    _, tokens, mean = _record(wrapper, run_simmim, stats=STATS)
    # Every patch (the masked ones as mask tokens at their cells), no class token.
    _check_layers(tokens, mean, _tensor_softmax_maps(run_simmim), _cells(grid, patch), grid, patch, 0, 0)

    grid = (2, 4)
    pixels = torch.randn(2, 3, 16, 32, generator=torch.Generator().manual_seed(10))
    encoder = _sharp(vit.ViT(image_size=(16, 32), patch_size=8, num_classes=3, pool="mean", **SMALL))
    autoencoder = _sharp(mae.MAE(encoder=encoder, decoder_dim=16, masking_ratio=0.5, decoder_heads=2,
                                 decoder_dim_head=8))

    def run_mae():
        torch.manual_seed(12)
        return autoencoder(pixels)

    _, tokens, mean = _record(autoencoder, run_mae)
    maps = _attend_maps(autoencoder, run_mae)
    torch.manual_seed(12)
    kept = torch.rand(2, 8).argsort(dim=-1)[:, 4:]  # MAE's draw: the unmasked indices, in the order it gathers them
    assert tokens.layers == ["encoder.transformer.layers.0.0", "encoder.transformer.layers.1.0",
                             "decoder.layers.0.0"]
    for layer, probabilities in enumerate(maps[:2]):
        expected = torch.full((2, 2, 8), math.nan, dtype=torch.float64)
        for image in range(2):
            cells = _cells(grid, patch)[kept[image]]
            per_query = (probabilities[image] * torch.cdist(cells, cells)).sum(-1)  # [H, 4]
            expected[image][:, kept[image]] = per_query
        torch.testing.assert_close(tokens.per_layer[layer].double(), expected, equal_nan=True, **TOL)
        torch.testing.assert_close(mean.per_layer[layer].double(), expected.nanmean(-1), **TOL)
    decoder = statistics_reference(maps[2], _cells(grid, patch))["mad"]  # every patch, row-major
    torch.testing.assert_close(tokens.per_layer[2].double(), decoder, **TOL)


@pytest.mark.parametrize("design", ["simple_vit", "vit"])
def test_patch_dropout_in_training_places_the_patches_each_image_kept(design):
    from vit_pytorch import vit_with_patch_dropout

    torch.manual_seed(0)
    args = dict(image_size=(16, 32), patch_size=8, num_classes=3, patch_dropout=0.5, **SMALL)
    model = (simple_vit_with_patch_dropout.SimpleViT(**args) if design == "simple_vit"
             else vit_with_patch_dropout.ViT(dropout=0.0, **args))
    model = _sharp(model).train()
    prefix = int(design == "vit")  # vit_with_patch_dropout puts its class token before the kept patches
    pixels = torch.randn(2, 3, 16, 32, generator=torch.Generator().manual_seed(13))

    def run():
        torch.manual_seed(14)
        return model(pixels)

    _, tokens, mean = _record(model, run, stats=STATS)
    maps = _attend_maps(model, run)
    torch.manual_seed(14)
    kept = torch.randn(2, 8).topk(4, dim=-1).indices  # PatchDropout's draw, in its order
    for layer, probabilities in enumerate(maps):
        assert probabilities.shape[-1] == prefix + 4
        expected = torch.full((2, 2, 8), math.nan, dtype=torch.float64)
        maps_expected = torch.full((2, 2, prefix, 8), math.nan, dtype=torch.float64)
        for image in range(2):
            cells = _cells((2, 4), (8, 8))[kept[image]]
            rows = probabilities[image][:, prefix:, prefix:]
            expected[image][:, kept[image]] = (rows * torch.cdist(cells, cells)).sum(-1)
            maps_expected[image][..., kept[image]] = probabilities[image][:, :prefix, prefix:]
        torch.testing.assert_close(tokens.per_layer[layer].double(), expected, equal_nan=True, **TOL)
        torch.testing.assert_close(mean.per_layer[layer].double(), expected.nanmean(-1), **TOL)
        if prefix:
            torch.testing.assert_close(tokens.prefix_maps[layer].double(), maps_expected, equal_nan=True, **STAT_TOL)
    # In eval mode it keeps every patch: the plain grid.
    model.eval()
    _, tokens, mean = _record(model, lambda: model(pixels))
    assert tokens.per_layer[0].shape == (2, 2, 8) and not tokens.per_layer[0].isnan().any()
    assert tokens.geometry[0].num_prefix_tokens == prefix


def test_recorder_and_extractor_wrappers_record_the_model_they_hold():
    from vit_pytorch.extractor import Extractor
    from vit_pytorch.recorder import Recorder

    torch.manual_seed(0)
    model = _sharp(vit.ViT(image_size=(16, 24), patch_size=8, num_classes=3, **SMALL))
    pixels = torch.randn(2, 3, 16, 24, generator=torch.Generator().manual_seed(15))
    positions = torch.cat([_nan(1), _cells((2, 3), (8, 8))])
    recorder = Recorder(model)
    (_, attentions), tokens, mean = _record(recorder, lambda: recorder(pixels), stats=STATS)
    # Its own output: every layer's attention [B, L, H, N, N], the reference.
    assert tokens.layers == ["vit.transformer.layers.0.0", "vit.transformer.layers.1.0"]
    _check_layers(tokens, mean, list(attentions.double().unbind(1)), positions, (2, 3), (8, 8), 1, 0)
    recorder.eject()
    extractor = Extractor(model)
    _, tokens, mean = _record(extractor, lambda: extractor(pixels), stats=STATS)
    _check_layers(tokens, mean, _attend_maps(model, lambda: model(pixels)), positions, (2, 3), (8, 8), 1, 0)


def _sdpa_probabilities(module, run) -> list[torch.Tensor]:
    """The probabilities of every ``F.scaled_dot_product_attention`` call of ``module`` (a source file that calls it
    through ``torch.nn.functional``) during ``run``, from the q, k, mask and scale it receives (float64)."""
    import torch.nn.functional as F

    maps, original = [], F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
        logits = q.double() @ k.double().transpose(-1, -2) * (q.shape[-1] ** -0.5 if scale is None else scale)
        if attn_mask is not None:
            logits = logits.masked_fill(~attn_mask, -math.inf)
        maps.append(logits.softmax(-1))
        return original(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, **kwargs)

    assert module.F is F
    with torch.no_grad(), mock.patch.object(F, "scaled_dot_product_attention", spy):
        run()
    return maps


@pytest.mark.parametrize("grouped", [False, True])
def test_navit_places_each_packed_image_on_its_own_grid(grouped):
    from vit_pytorch import na_vit

    torch.manual_seed(0)
    model = _sharp(na_vit.NaViT(image_size=32, patch_size=8, num_classes=3, dim=32, depth=2, heads=2, mlp_dim=32))
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, na_vit.RMSNorm):
                module.gamma.fill_(2.0)  # q and k normalised to unit vectors: scaled up, far from uniform
    generator = torch.Generator().manual_seed(16)
    sizes = [(16, 16), (8, 24), (32, 16)]
    images = [torch.randn(3, *size, generator=generator) for size in sizes]
    # Rows: [image 0 (2x2), image 1 (1x3)], [image 2 (4x2)], padded to 8 tokens; grouped by the model with a
    # budget of 8 tokens the same.
    batch = images if grouped else [images[:2], images[2:]]
    kwargs = {"group_images": True, "group_max_seq_len": 8} if grouped else {}
    _, tokens, mean = _record(model, lambda: model(batch, **kwargs), stats=STATS)
    maps = _sdpa_probabilities(na_vit, lambda: model(batch, **kwargs))[:2]  # the transformer's, then the pool's
    assert list(mean.skipped) == ["attn_pool"]
    where = [(0, 0), (0, 4), (1, 0)]  # (row, first token) of each image
    grids = [(2, 2), (1, 3), (4, 2)]
    for layer, probabilities in enumerate(maps):
        assert probabilities.shape == (2, 2, 8, 8)
        assert tokens.geometry[layer].image_grids == tuple(grids)
        expected = torch.full((3, 2, 8), math.nan, dtype=torch.float64)
        for image, ((row, start), grid) in enumerate(zip(where, grids)):
            count = grid[0] * grid[1]
            block = probabilities[row, :, start:start + count]  # [H, count, 8]: zero outside its own block
            assert block[..., start:start + count].sum(-1).sub(1).abs().max() < 1e-12
            assert block.max(-1).values.mean() > 2 / count  # far from uniform over the image's patches
            cells = _cells(grid, (8, 8))
            expected[image, :, :count] = (block[..., start:start + count] * torch.cdist(cells, cells)).sum(-1)
        torch.testing.assert_close(tokens.per_layer[layer].double(), expected, equal_nan=True, **TOL)
        torch.testing.assert_close(mean.per_layer[layer].double(), expected.nanmean(-1), **TOL)
        assert (mean.stats["prefix_mass"][layer] == 0).all()  # the padding is masked: no key


def test_unknown_designs_and_bare_transformer_calls_are_refused_by_name():
    from vit_pytorch.vit_1d import ViT as SeriesViT

    torch.manual_seed(0)
    series = SeriesViT(seq_len=16, patch_size=8, num_classes=3, **SMALL)
    with torch.no_grad(), vitmad.record(series), pytest.raises(ValueError, match="ViT of vit_pytorch.vit_1d: vitmad "
                                                                                 "does not know"):
        series(torch.randn(1, 3, 16))
    from vit_pytorch.na_vit import NaViT

    navit = NaViT(image_size=16, patch_size=8, num_classes=3, dim=32, depth=1, heads=2, mlp_dim=32,
                  token_dropout_prob=0.5).train()
    with vitmad.record(navit), pytest.raises(ValueError, match="NaViT drops a random subset"):
        navit([torch.randn(3, 16, 16), torch.randn(3, 8, 16)])
    model = vit.ViT(image_size=16, patch_size=8, num_classes=3, **SMALL).eval()
    with torch.no_grad(), vitmad.record(model), pytest.raises(ValueError, match="did not run on images"):
        model.transformer(torch.randn(1, 5, 32))
    with torch.no_grad(), vitmad.record(model.transformer), pytest.raises(ValueError, match="without the vit_pytorch "
                                                                                            "model whose forward"):
        model.transformer(torch.randn(1, 5, 32))


def test_per_token_values_of_layers_on_two_grids_of_as_many_tokens_are_not_stacked():
    """QA 272: two towers on 6 x 4 and 4 x 6 grids (24 tokens each) recorded at once with reduction="none": rec.mad,
    rec.stats and rec.calls[-1].stat stacked them into one [L, B, H, 24] tensor, and a reader reshaping it by one grid
    put the other tower's values on the wrong cells. Refused as layers of different token counts are; each layer's
    own values stay in rec.per_layer with its grid."""
    from vit_pytorch import ViT

    class Two(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = ViT(image_size=(48, 32), patch_size=8, num_classes=4, dim=32, depth=1, heads=2, mlp_dim=32)
            self.b = ViT(image_size=(32, 48), patch_size=8, num_classes=4, dim=32, depth=1, heads=2, mlp_dim=32)

        def forward(self, x):
            return self.a(x) + self.b(x.transpose(-1, -2))

    torch.manual_seed(0)
    model = Two().eval()
    names = [name for name, _ in model.named_modules() if name.endswith("layers.0.0")]
    with torch.no_grad(), vitmad.record(model, layers=names, stats="entropy", reduction="none") as rec:
        model(torch.randn(1, 3, 48, 32))
    assert [g.grid for g in rec.geometry] == [(6, 4), (4, 6)]
    for read in (lambda: rec.mad, lambda: rec.stats["entropy"], lambda: rec.calls[-1].stat("entropy")):
        with pytest.raises(ValueError, match=r"per-token values on different token grids \(\[\(4, 6\), \(6, 4\)\]\)"):
            read()
    assert [tuple(values.shape) for values in rec.per_layer] == [(1, 2, 24), (1, 2, 24)]
    with pytest.raises(ValueError, match=r"instead of rec\.calls\[-1\]\.stat\('entropy'\)"):
        rec.calls[-1].stat("entropy")
