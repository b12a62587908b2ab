"""vitmad.record on RF-DETR's DINOv2 backbone (transformers ``RfDetrDinov2Backbone``, also inside
``RfDetrForObjectDetection``), against its own eager attention.

The reference places the tokens by the geometry written here from ``modeling_rf_detr.py``: the embeddings add the
position embeddings to the class token and the row-major ``gh x gw`` patches, then (``num_windows = S > 1``,
``window_partition``) view the patches as ``[S, gw / S, S, gh / S]``, swap the two middle dims and put a copy of
the class token before each of the ``S * S`` windows. So token ``(i, j)`` of window ``(a, b)`` is patch
``(a * gw / S + i) * gh + b * gh / S + j`` of the row-major sequence, at cell ``(patch // gw, patch % gw)``,
centred at ``((row + 0.5) * p, (col + 0.5) * p)`` pixels; the class token copies have no position. A window block
attends over each window's ``[copy, its patches]`` (``[B * S * S, H, 1 + n, 1 + n]``, image-major); a global block
(``window_unpartition_before_attention``) over an image's windows one after another (``[B, H, S * S * (1 + n),
...]``). Statistics in float64 per query, averaged over the image's patches.
"""

from __future__ import annotations

import importlib
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

import vitmad  # noqa: E402
from conftest import eager_attention_calls, sharpened  # noqa: E402

TOL = {"rtol": 1e-5, "atol": 1e-4}  # atol in pixels (MADs here are 5 to 40 px) and in nats / probability mass
MAP_TOL = {"rtol": 1e-5, "atol": 1e-6}
PATCH = 8
STATS = ["entropy", "prefix_mass", "self_mass"]
modeling = importlib.import_module("transformers.models.rf_detr.modeling_rf_detr")


def _config(num_windows: int, out_indices: list[int]):
    return transformers.RfDetrDinov2Config(hidden_size=32, num_hidden_layers=max(out_indices), num_attention_heads=2,
                                           image_size=64, patch_size=PATCH, num_windows=num_windows,
                                           out_indices=out_indices)


def _backbone(num_windows: int = 2, out_indices=(1, 2)):
    """A backbone of ``max(out_indices)`` blocks, whose window blocks are the indices up to the last out index that
    are not out indices (``RfDetrDinov2Config``): (1, 2) gives window block 0 and global block 1; (0, 1, 2) global
    blocks only."""
    torch.manual_seed(0)
    return _peaked(sharpened(transformers.RfDetrDinov2Backbone(_config(num_windows, list(out_indices)))))


def _peaked(model):
    """Queries scaled up past ``sharpened``'s: its later blocks' attention is otherwise near uniform over the global
    blocks' 68 keys (entropy 0.86 ln 68)."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, modeling.RfDetrDinov2Attention):
                module.q_proj.weight.mul_(2)
    return model


def _cells(grid: tuple[int, int], side: int) -> torch.Tensor:
    """``[S * S, n]`` row-major grid index of each window's patches, windows and tokens in the model's order."""
    gh, gw = grid
    rows, cols = gw // side, gh // side  # the model's view: [S, gw / S, S, gh / S]
    return torch.tensor([[(a * rows + i) * gh + b * cols + j for i in range(rows) for j in range(cols)]
                         for a in range(side) for b in range(side)])


def _positions(grid: tuple[int, int], side: int) -> torch.Tensor:
    """``[S * S, 1 + n, 2]`` float64 pixel centres of each window's tokens, its class token copy (NaN) first."""
    index = _cells(grid, side)
    centres = torch.stack([index // grid[1], index % grid[1]], -1).double().add(0.5).mul(PATCH)
    return torch.cat([torch.full((side * side, 1, 2), float("nan"), dtype=torch.float64), centres], 1)


def _reference(probabilities: torch.Tensor, grid: tuple[int, int], side: int, batch: int) -> dict:
    """From one block's probabilities (a window block's ``[B * S * S, H, 1 + n, 1 + n]`` or a global block's
    ``[B, H, S * S * (1 + n), ...]``): per-query values ``[B, H, T]`` on the row-major grid and their means ``[B,
    H]``, and the class token copies' maps ``[B, H, Q, T]``."""
    windowed = probabilities.shape[0] == batch * side * side and side > 1
    positions = _positions(grid, side)
    index = _cells(grid, side).reshape(-1)
    windows, length = positions.shape[:2]
    positions = positions.repeat(batch, 1, 1) if windowed else positions.reshape(1, -1, 2)  # as the call's rows
    placed = ~positions[..., 0].isnan()  # [rows, L]
    distance = torch.cdist(positions.nan_to_num(), positions.nan_to_num()) * placed[:, None, :]
    rows = probabilities.double()
    logs = torch.where(rows > 0, rows.log(), torch.zeros_like(rows))
    per_token = {"mad": (rows * distance[:, None]).sum(-1), "entropy": -(rows * logs).sum(-1),
                 "prefix_mass": (rows * ~placed[:, None, None, :]).sum(-1),
                 "self_mass": rows.diagonal(dim1=-2, dim2=-1)}

    def fold(values: torch.Tensor) -> torch.Tensor:  # [rows, H, ..., L] over an image's tokens -> [B, H, ..., T]
        heads, middle = values.shape[1], values.shape[2:-1]
        if windowed:  # [B * S * S, H, ..., 1 + n]: windows image-major
            values = values.reshape(batch, windows, heads, *middle, length).movedim(1, -2)
        values = values.reshape(batch, heads, *middle, windows, length)[..., 1:].flatten(-2)
        folded = torch.empty_like(values)
        folded[..., index] = values
        return folded

    found = {}
    for name, values in per_token.items():
        found[f"{name}_per_query"] = fold(values)
        found[name] = found[f"{name}_per_query"].mean(-1)
    copies = (~placed[0]).nonzero().squeeze(-1)
    maps = rows[:, :, copies]  # [rows, H, Q, L]: the class token copies' rows
    if windowed:  # one copy per window: the copies tile the image's row
        found["prefix_maps"] = fold(maps[:, :, 0])[:, :, None]
    else:
        found["prefix_maps"] = fold(maps.movedim(2, -2)).movedim(-2, 2)
    return found


def _plain_reading_mad(probabilities: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """``[B, H]``: a global block's MAD with its tokens read as a plain ViT's, 4 prefix tokens then the row-major
    grid (how it was placed before its family)."""
    rows, cols = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
    centres = torch.stack([rows, cols], -1).reshape(-1, 2).double().add(0.5).mul(PATCH)
    patches = probabilities.double()[:, :, 4:, 4:]
    return (patches * torch.cdist(centres, centres)).sum(-1).mean(-1)


def _record(model, pixels, **kwargs):
    """One forward recorded with ``kwargs``; the recorded feature maps must be the plain ones, bit for bit."""
    with torch.no_grad():
        plain = model(pixels).feature_maps
        with vitmad.record(model, **kwargs) as rec:
            recorded = model(pixels).feature_maps
    assert all(torch.equal(a, b) for a, b in zip(recorded, plain, strict=True))
    return rec


@pytest.mark.parametrize("size", [(64, 64), (32, 64), (48, 32)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_the_partition_written_here_is_the_models(size):
    """The reference's geometry against the model's own window_partition of (row, column) tags: on a non-square
    map the model's windows are not blocks of the image (48 x 32 px: window (0, 0) holds cells (0, 0), (0, 1),
    (0, 2), (1, 2), (1, 3), (2, 0))."""
    model = _backbone()
    grid = (size[0] // PATCH, size[1] // PATCH)
    index = torch.arange(grid[0] * grid[1])
    tags = torch.cat([torch.full((1, 1, 2), -1.0), torch.stack([index // grid[1], index % grid[1]], -1)[None].float()],
                     1)
    windows = model.embeddings.window_partition(tags, *size)  # [S * S, 1 + n, 2]
    assert torch.equal(windows[:, 0], torch.full((4, 2), -1.0))
    assert torch.equal(windows[:, 1:].mul(PATCH).add(PATCH / 2).double(), _positions(grid, 2)[:, 1:])


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("size", [(64, 64), (32, 64), (48, 32)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("out_indices", [(1, 2), (0, 1, 2)], ids=["window-then-global", "global-only"])
def test_backbone_equals_the_statistics_of_its_eager_attention(out_indices, size, attn_implementation):
    """Window blocks over each window after its class token copy, global blocks over the windows one after another
    (a global block was placed as 4 prefix tokens and a row-major grid: up to 29 % off, silently)."""
    model = _backbone(2, out_indices)
    pixels = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1))
    grid = (size[0] // PATCH, size[1] // PATCH)
    calls = eager_attention_calls(modeling, model, pixels)
    expected = [_reference(p, grid, 2, 2) for _, p in calls]
    windowed = [p.shape[0] == 8 for _, p in calls]
    assert windowed == ([True, False] if out_indices == (1, 2) else [False, False])
    model.set_attn_implementation(attn_implementation)
    rec = _record(model, pixels, stats=["mad", *STATS, "prefix_maps"])
    assert rec.layers == ["encoder.layer.0.attention", "encoder.layer.1.attention"] and not rec.skipped
    for geometry, window in zip(rec.geometry, windowed):
        assert (geometry.grid, geometry.stride, geometry.heads, geometry.num_prefix_tokens) == (grid, (8.0, 8.0), 2,
                                                                                                None)
        assert geometry.attention.startswith("window" if window else "global, over 2x2 windows")
        assert geometry.attention.endswith("each with its own class token copy")
    for stat in ("mad", *STATS):
        torch.testing.assert_close(rec.stats[stat].double(), torch.stack([e[stat] for e in expected]), **TOL,
                                   msg=lambda m, stat=stat: f"{stat}: {m}")
    # Far from uniform attention over each call's keys, so that a token at a wrong cell would show.
    assert all(float(e["entropy"].max()) < 0.8 * math.log(p.shape[-1]) for e, (_, p) in zip(expected, calls))
    for maps, e, window in zip(rec.prefix_maps, expected, windowed):
        assert maps.shape == (2, 2, 1 if window else 4, grid[0] * grid[1])
        torch.testing.assert_close(maps.double(), e["prefix_maps"], **MAP_TOL)
    # The plain reading of a global block (4 prefix tokens, then the row-major grid) is far from its MAD here.
    plain = _plain_reading_mad(calls[-1][1], grid)
    assert float((plain - expected[-1]["mad"]).abs().max()) > 100 * TOL["atol"]


@pytest.mark.parametrize("size", [(64, 64), (48, 32)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_per_query_values_fold_onto_the_image_grid_row_major(size):
    model = _backbone(2, (1, 2))
    pixels = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(2))
    grid = (size[0] // PATCH, size[1] // PATCH)
    expected = [_reference(p, grid, 2, 2) for _, p in eager_attention_calls(modeling, model, pixels)]
    model.set_attn_implementation("sdpa")
    rec = _record(model, pixels, reduction="none", stats=["mad", "prefix_mass", "self_mass"])
    for stat in ("mad", "prefix_mass", "self_mass"):
        for values, e in zip(rec.stats[stat], expected):
            assert values.shape == (2, 2, grid[0] * grid[1])
            torch.testing.assert_close(values.double(), e[f"{stat}_per_query"], **TOL)


@pytest.mark.parametrize("out_indices", [(1, 2), (0, 1, 2)], ids=["window-then-global", "global-only"])
def test_one_window_is_the_plain_layout(out_indices):
    """num_windows=1: no partition, the class token then the row-major grid, in every block (as placed before)."""
    model = _backbone(1, out_indices)
    pixels = torch.randn(2, 3, 48, 32, generator=torch.Generator().manual_seed(3))
    expected = [_reference(p, (6, 4), 1, 2) for _, p in eager_attention_calls(modeling, model, pixels)]
    model.set_attn_implementation("sdpa")
    rec = _record(model, pixels, stats=["mad", *STATS, "prefix_maps"])
    assert [g.attention for g in rec.geometry] == ["global", "global"]
    assert rec.layout == vitmad.recording.ModelLayout(PATCH, (6, 4), 1)
    for stat in ("mad", *STATS):
        torch.testing.assert_close(rec.stats[stat].double(), torch.stack([e[stat] for e in expected]), **TOL)
    for maps, e in zip(rec.prefix_maps, expected):
        torch.testing.assert_close(maps.double(), e["prefix_maps"], **MAP_TOL)


def test_detector_records_its_backbone_blocks():
    """RfDetrForObjectDetection: the backbone's window and global blocks are placed as in the backbone alone, and
    are all that is recorded."""
    backbone = _config(2, [2, 4])
    assert backbone.window_block_indexes == [0, 1, 3]
    config = transformers.RfDetrConfig(backbone_config=backbone, d_model=32, decoder_layers=1,
                                       decoder_self_attention_heads=2, decoder_cross_attention_heads=2,
                                       decoder_ffn_dim=32, num_queries=5, projector_scale_factors=[1.0])
    torch.manual_seed(0)
    model = _peaked(sharpened(transformers.RfDetrForObjectDetection(config)))
    pixels = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    names = [f"model.backbone.backbone.encoder.layer.{i}.attention" for i in range(4)]
    calls = [(m, p) for m, p in eager_attention_calls(modeling, model, pixels)
             if isinstance(m, modeling.RfDetrDinov2Attention)]
    expected = [_reference(p, (8, 8), 2, 1) for _, p in calls]
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        plain = model(pixels)
        with vitmad.record(model, stats=["mad", *STATS]) as rec:
            recorded = model(pixels)
    assert torch.equal(plain.logits, recorded.logits) and torch.equal(plain.pred_boxes, recorded.pred_boxes)
    assert rec.layers == names and not rec.skipped  # the decoder's attention is outside the tower: not recorded
    assert [g.attention.split(",")[0] for g in rec.geometry] == ["window 4x4", "window 4x4", "global", "window 4x4"]
    for stat in ("mad", *STATS):
        torch.testing.assert_close(rec.stats[stat].double(), torch.stack([e[stat] for e in expected]), **TOL)


def test_windows_changed_after_the_model_was_built_are_refused():
    """A global block joins the windows it was built for: with config.num_windows set to 1 afterwards the
    embeddings no longer cut windows and the block joins 4 images into one sequence."""
    model = _backbone(2, (1, 2))
    model.config.num_windows = 1
    pixels = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with pytest.raises(ValueError, match=r"encoder\.layer\.1\.attention.*joins 2x2 windows, but the embeddings "
                                         r"cut 1x1"):
        with torch.no_grad(), vitmad.record(model):
            model(pixels)


def test_attention_recorded_without_its_backbone_is_refused():
    model = _backbone(2, (1, 2))
    with torch.no_grad():
        tokens = model.embeddings(torch.randn(1, 3, 32, 32))
        with pytest.raises(ValueError, match="without the RfDetrDinov2Backbone"):
            with vitmad.record(model.encoder):
                model.encoder(tokens)
