"""lucidrains' vit-pytorch: the ViT with adaptive token sampling (``ats_vit``), MaxViT with register tokens
(``max_vit_with_registers``) and CCT on video (``cct_3d``), each against the model's own softmax probabilities, its
tokens placed by geometry written here from the models' source (for ATS, the tokens each layer keeps read from what
the model's own attention modules return)."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("vit_pytorch")

from test_record_vit_pytorch import STAT_TOL, STATS, TOL, _attend_maps, _cells, _record, _sharp  # noqa: E402
from test_record_vit_pytorch_stages import _far_from_uniform, _run, _sharpen  # noqa: E402
from vit_pytorch import ats_vit  # noqa: E402

from conftest import batch_norms_on, run_hooked, statistics_reference  # noqa: E402


def _ats_sequences(model: torch.nn.Module, run) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, ``(ids, mask)`` ``[B, n]``: the patch each token of the layer's sequence started as (0: the class
    token) and the mask the layer was given (False: a padding row), as ``Transformer.forward`` composes them from the
    ``sampled_token_ids`` each ``Attention`` returns."""
    layers = [attention for attention, _ in model.transformer.layers]
    seen, returned = [], []
    handles = [a.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs["mask"]), with_kwargs=True)
               for a in layers]
    handles += [a.register_forward_hook(lambda m, args, out: returned.append(out[2])) for a in layers]
    run_hooked(handles, run)
    ids = torch.arange(seen[0].shape[1]).expand(seen[0].shape[0], -1)
    sequences = []
    for mask, sampled in zip(seen, returned):
        sequences.append((ids, mask))
        if sampled is not None:
            ids = ids.gather(1, sampled)
    return sequences


def test_ats_vit_places_the_tokens_each_layer_keeps_per_image():
    torch.manual_seed(0)
    model = _sharp(ats_vit.ViT(image_size=(24, 40), patch_size=8, num_classes=3, max_tokens_per_depth=(12, 8, 5),
                               dim=32, depth=3, heads=2, mlp_dim=32, dim_head=16))
    pixels = torch.randn(2, 3, 24, 40, generator=torch.Generator().manual_seed(1))

    def run():  # the Gumbel draws come from the global generator: the same draw in every run
        torch.manual_seed(2)
        return model(pixels)

    _, tokens, mean = _record(model, run, stats=STATS)
    maps = _attend_maps(model, run)
    sequences = _ats_sequences(model, run)
    cells = _cells((3, 5), (8, 8))
    assert len(maps) == len(tokens.layers) == 3
    kept = [mask.sum(1).tolist() for _, mask in sequences]
    assert kept[0] == [16, 16] and kept[1][0] != kept[1][1] and kept[2][0] != kept[2][1]  # padded rows in 1 and 2
    for layer, (probabilities, (ids, mask)) in enumerate(zip(maps, sequences)):
        geometry = tokens.geometry[layer]
        assert geometry.grid == (3, 5) and geometry.num_prefix_tokens == 1
        expected = {stat: torch.full((2, 2, 15), math.nan, dtype=torch.float64) for stat in ("mad", *STATS[:2])}
        class_rows = torch.full((2, 2, 1, 15), math.nan, dtype=torch.float64)
        for image in range(2):
            placed = mask[image] & (ids[image] > 0)  # the class token and the padding rows have no position
            positions = torch.full((ids.shape[1], 2), math.nan, dtype=torch.float64)
            positions[placed] = cells[ids[image][placed] - 1]
            reference = statistics_reference(probabilities[image:image + 1], positions)
            at = ids[image][placed] - 1
            for stat in expected:
                expected[stat][image][:, at] = reference[stat][0]
            class_rows[image][..., at] = reference["prefix_maps"][0, :, :1]  # the class token's row alone
        _far_from_uniform(probabilities)
        torch.testing.assert_close(tokens.per_layer[layer].double(), expected["mad"], equal_nan=True, **TOL)
        torch.testing.assert_close(mean.per_layer[layer].double(), expected["mad"].nanmean(-1), **TOL)
        for stat in STATS[:2]:
            torch.testing.assert_close(tokens.stats[stat][layer].double(), expected[stat], equal_nan=True,
                                       **STAT_TOL)
        torch.testing.assert_close(tokens.prefix_maps[layer].double(), class_rows, equal_nan=True, **STAT_TOL)


def _led_windows(attn: torch.Tensor, cells: torch.Tensor, grid: tuple[int, int], stride: float, prefix: int) -> dict:
    """Statistics on the map ``[B, H, T]`` (maps ``[B, H, prefix, T]``) of ``[B * nW, H, prefix + n, prefix + n]``
    attention within windows (image-major in the batch) whose ``n`` tokens, after ``prefix`` tokens without a
    position, are at the map cells ``cells`` ``[nW, n, 2]``."""
    windows, size = cells.shape[:2]
    attn = attn.view(-1, windows, attn.shape[1], prefix + size, prefix + size)  # [B, nW, H, P + n, P + n]
    positions = (cells.double() + 0.5) * stride
    distance = torch.cdist(positions, positions)[None, :, None]  # [1, nW, 1, n, n]
    per_window = {"mad": (attn[..., prefix:, prefix:] * distance).sum(-1),
                  "entropy": -torch.special.xlogy(attn, attn).sum(-1)[..., prefix:],
                  "prefix_mass": attn[..., prefix:, :prefix].sum(-1),
                  "maps": attn[..., :prefix, prefix:].transpose(-1, -2)}  # [B, nW, H, n(, P)]
    index = (cells[..., 0] * grid[1] + cells[..., 1]).reshape(-1)
    out = {}
    for name, values in per_window.items():
        batch, heads = values.shape[0], values.shape[2]
        on_map = torch.full((batch, heads, grid[0] * grid[1], *values.shape[4:]), math.nan, dtype=torch.float64)
        on_map[:, :, index] = values.transpose(1, 2).reshape(batch, heads, windows * size, *values.shape[4:])
        assert not on_map.isnan().any()
        out[name] = on_map.transpose(-1, -2) if name == "maps" else on_map
    return out


def test_maxvit_with_registers_places_each_window_after_its_registers():
    from vit_pytorch.max_vit_with_registers import MaxViT

    model = _sharpen(MaxViT(num_classes=3, dim=16, depth=(1, 1), dim_head=8, window_size=3, dropout=0.0,
                            num_register_tokens=2), 0.5)
    pixels = torch.randn(2, 3, 21, 69, generator=torch.Generator().manual_seed(1))
    batch_norms_on(model, pixels)  # the initial statistics shrink the activations to ~1e-5 by the attention
    maps, rec, rec_tokens = _run(model, pixels, stats=STATS)
    assert rec.layers == ["layers.0.1.0", "layers.0.2.0", "layers.1.1.0", "layers.1.2.0"]
    # Stem 3x3 stride 2 pad 1: 21x69 -> 11x35; each stage's first MBConv (depthwise 3x3, stride 2, pad 1): 6x18 (4 px),
    # then 3x9 (8 px). 3x3 windows, each led by the 2 registers: [B * nW, H, 2 + 9, 2 + 9].
    stages = [((6, 18), 4), ((6, 18), 4), ((3, 9), 8), ((3, 9), 8)]
    for layer, (((gh, gw), stride), attn) in enumerate(zip(stages, maps)):
        x, y, w1, w2 = torch.meshgrid(torch.arange(gh // 3), torch.arange(gw // 3), torch.arange(3), torch.arange(3),
                                      indexing="ij")
        if layer % 2 == 0:  # block attention: 'b d (x w1) (y w2) -> b x y w1 w2 d'
            rows, cols = x * 3 + w1, y * 3 + w2
        else:  # grid attention: 'b d (w1 x) (w2 y) -> b x y w1 w2 d'
            rows, cols = w1 * (gh // 3) + x, w2 * (gw // 3) + y
        reference = _led_windows(attn, torch.stack([rows, cols], -1).reshape(-1, 9, 2), (gh, gw), stride, 2)
        geometry = rec.geometry[layer]
        assert geometry.grid == (gh, gw) and geometry.stride == (float(stride),) * 2
        _far_from_uniform(attn)
        torch.testing.assert_close(rec_tokens.per_layer[layer].double(), reference["mad"], **TOL)
        torch.testing.assert_close(rec.per_layer[layer].double(), reference["mad"].mean(-1), **TOL)
        for stat in ("entropy", "prefix_mass"):
            torch.testing.assert_close(rec_tokens.calls[-1].statistics[stat][layer].double(), reference[stat],
                                       **STAT_TOL)
        torch.testing.assert_close(rec_tokens.prefix_maps[layer].double(), reference["maps"], **STAT_TOL)
    assert [g.attention for g in rec.geometry][:2] == ["window 3x3", "grid 3x3, dilated every 2x6"]


def _strided(n: int, kernel: int, stride: int, padding: int) -> int:
    return (n + 2 * padding - kernel) // stride + 1


def test_cct_3d_places_its_tokenizer_tubelets_in_space_and_time():
    from vit_pytorch.cct_3d import CCT

    model = _sharpen(CCT(img_size=(13, 19), num_frames=5, embedding_dim=16, n_conv_layers=1, kernel_size=3, stride=2,
                         padding=1, frame_kernel_size=3, frame_pooling_kernel_size=3, frame_pooling_stride=2,
                         num_layers=2, num_heads=2, mlp_ratio=1, num_classes=3), 0.5)
    video = torch.randn(2, 3, 5, 13, 19, generator=torch.Generator().manual_seed(1))
    maps, rec, rec_tokens = _run(model, video)
    # Conv3d (3, 3, 3), stride (1, 2, 2), padding 1, then MaxPool3d 3, stride 2, padding 1 on every axis: tubelets of
    # 2 frames by 4x4 px, each at the centre of its stride cell; flattened 'b c f h w -> b (f h w) c', no class token
    # (CCT pools the sequence after its encoder).
    frames = _strided(_strided(5, 3, 1, 1), 3, 2, 1)
    grid = tuple(_strided(_strided(n, 3, 2, 1), 3, 2, 1) for n in (13, 19))
    assert (frames, grid) == (3, (4, 5))
    space = _cells(grid, (4, 4)).repeat(frames, 1)
    time = ((torch.arange(frames).double() + 0.5) * 2).repeat_interleave(grid[0] * grid[1])[:, None]
    assert len(maps) == len(rec.layers) == 2  # the sequence pooling's softmax is over [B, N]: not attention
    for layer, probabilities in enumerate(maps):
        geometry = rec.geometry[layer]
        assert (geometry.frames, geometry.grid, geometry.stride, geometry.frame_stride) == (frames, grid, (4.0, 4.0),
                                                                                            2.0)
        _far_from_uniform(probabilities)
        spatial = statistics_reference(probabilities, space)["mad"]
        temporal = statistics_reference(probabilities, time)["mad"]
        torch.testing.assert_close(rec_tokens.per_layer[layer].double(), spatial, **TOL)
        torch.testing.assert_close(rec.per_layer[layer].double(), spatial.mean(-1), **TOL)
        torch.testing.assert_close(rec_tokens.temporal_mad[layer].double(), temporal, **TOL)
        torch.testing.assert_close(rec.temporal_mad[layer].double(), temporal.mean(-1), **TOL)


def test_a_design_vitmad_does_not_place_is_refused_as_such():
    """LookViT recorded whole was refused as if a transformer had been recorded without its model ("record the
    whole model"), which it was (QA helper-248); a transformer recorded alone still gets that advice."""
    from vit_pytorch.look_vit import LookViT
    from vit_pytorch.vit import Transformer

    import vitmad

    model = LookViT(dim=32, image_size=32, num_classes=3, depth=1, patch_size=8, heads=2, dim_head=16,
                    highres_patch_size=4, cross_attn_heads=2, cross_attn_dim_head=16, patch_conv_kernel_size=3).eval()
    with pytest.raises(ValueError, match=r"LookViT of vit_pytorch.look_vit: vitmad does not know how it lays out its "
                                         r"tokens") as refused:
        with torch.no_grad(), vitmad.record(model):
            model(torch.randn(2, 3, 32, 32))
    assert "recorded alone" not in str(refused.value)
    transformer = Transformer(dim=16, depth=1, heads=2, dim_head=8, mlp_dim=16).eval()
    with pytest.raises(ValueError, match=r"without the vit_pytorch model whose forward builds its tokens \(a "
                                         r"transformer recorded alone\?\)"):
        with torch.no_grad(), vitmad.record(transformer):
            transformer(torch.randn(2, 5, 16))
