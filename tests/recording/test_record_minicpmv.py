"""vitmad.record on the MiniCPM-V 4.6 / 4.7 and MiniCPM OCR vision towers: views (a source image, its slices) packed
side by side in one strip of pixels ``[1, C, p, p * sum(h * w)]``, each view's grid in ``target_sizes``.

Tiny random-weight towers (``sharpened``: attention far from uniform) get three views of different grids. The
reference is each model's own eager attention probabilities, captured call by call from its modeling file's
``eager_attention_forward``, placed by geometry written here from reading the modeling file and the image
processor (``reshape_by_patch`` lays each view's patches row-major along the strip; the embedding convolution cuts
them back in that order): encoder layers attend per view over its tokens row-major; the window merger
(``vit_merger``, after layer ``insert_layer_id``) attends per 2 x 2 window of patches, windows row-major over the
view and patches row-major in each; the layers after it attend per view over one merged token per window,
row-major, at the window's centre (cells of 2p). Each token at ``(row + 0.5, col + 0.5) * cell`` pixels of its own
view; MAD, entropy and prefix mass (0: every key has a position) in float64.
"""

from __future__ import annotations

import math

import pytest
import torch

import vitmad
from conftest import eager_attention_calls, sharpened

transformers = pytest.importorskip("transformers")
from transformers.models.minicpm_ocr import modeling_minicpm_ocr  # noqa: E402
from transformers.models.minicpmv4_6 import modeling_minicpmv4_6  # noqa: E402
from transformers.models.minicpmv4_7 import modeling_minicpmv4_7  # noqa: E402

# Recorded float32 values (mad_qk on the sdpa path's q/k, or the fused op on eager probabilities) against float64 on
# the eager float32 probabilities; MADs here are 2 to 20 px.
TOL = {"rtol": 1e-5, "atol": 1e-4}
PATCH, WINDOW = 4, 2
MODELING = {"4_6": modeling_minicpmv4_6, "4_7": modeling_minicpmv4_7, "ocr": modeling_minicpm_ocr}
# Views for the merger (even grids: it merges 2 x 2 windows) and without it (any grid).
MERGED_GRIDS = [(4, 6), (6, 4), (2, 2)]
PLAIN_GRIDS = [(3, 5), (4, 4), (1, 3)]


def _classes(version: str) -> tuple[type, type]:
    prefix = "MiniCPMOcr" if version == "ocr" else f"MiniCPMV{version}"
    return getattr(transformers, f"{prefix}VisionConfig"), getattr(MODELING[version], f"{prefix}VisionModel")


def _tower(version: str, attn_implementation: str) -> torch.nn.Module:
    config_cls, model_cls = _classes(version)
    config = config_cls(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                        image_size=32, patch_size=PATCH, insert_layer_id=0, attn_implementation=attn_implementation)
    return sharpened(model_cls(config))


def _strip(grids, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """The strip the image processor packs: each view ``[3, h * p, w * p]`` cut into its patches row-major
    (``reshape_by_patch``), the patches side by side, the views one after the other."""
    torch.manual_seed(seed)
    strips = []
    for h, w in grids:
        view = torch.randn(3, h * PATCH, w * PATCH)
        patches = [view[:, r * PATCH:(r + 1) * PATCH, c * PATCH:(c + 1) * PATCH] for r in range(h) for c in range(w)]
        strips.append(torch.cat(patches, dim=-1))
    return torch.cat(strips, dim=-1).unsqueeze(0), torch.tensor(grids, dtype=torch.int32)


# Geometry written in the tests ---------------------------------------------------------------------------------

def _view_chunks(grids) -> list[list[tuple[int, int, int]]]:
    """One chunk per view: its tokens (view, row, col) row-major."""
    return [[(view, r, c) for r in range(h) for c in range(w)] for view, (h, w) in enumerate(grids)]


def _window_chunks(grids) -> list[list[tuple[int, int, int]]]:
    """One chunk per 2 x 2 window: windows row-major over each view, tokens row-major in a window."""
    chunks = []
    for view, (h, w) in enumerate(grids):
        for window_row in range(math.ceil(h / WINDOW)):
            for window_col in range(math.ceil(w / WINDOW)):
                chunks.append([(view, r, c)
                               for r in range(window_row * WINDOW, min(h, (window_row + 1) * WINDOW))
                               for c in range(window_col * WINDOW, min(w, (window_col + 1) * WINDOW))])
    return chunks


def _expected(calls, chunks, grids, cell: int) -> dict[str, list[torch.Tensor]]:
    """Per statistic, per view, ``[H, h * w]`` float64 per-token values row-major on the view's grid, from the
    layer's eager calls (one per chunk, in chunk order)."""
    assert len(calls) == len(chunks)
    heads = calls[0].shape[1]
    values = {stat: [torch.full((heads, h * w), float("nan"), dtype=torch.float64) for h, w in grids]
              for stat in ("mad", "entropy", "prefix_mass")}
    for probabilities, tokens in zip(calls, chunks):
        assert probabilities.shape[-1] == len(tokens)
        rows = probabilities[0]  # [H, n, n]
        centres = torch.tensor([[(r + 0.5) * cell, (c + 0.5) * cell] for _, r, c in tokens], dtype=torch.float64)
        mad = (rows * torch.cdist(centres, centres)).sum(-1)
        entropy = -(rows * rows.clamp_min(1e-300).log()).sum(-1)
        for q, (view, r, c) in enumerate(tokens):
            index = r * grids[view][1] + c
            values["mad"][view][:, index] = mad[:, q]
            values["entropy"][view][:, index] = entropy[:, q]
            values["prefix_mass"][view][:, index] = 0.0  # every key of the chunk has a position
    assert all(not v.isnan().any() for stat in values.values() for v in stat), "the reference misses a token"
    return values


def _reference(version: str, tower, pixels, sizes, grids, use_merger: bool):
    """Per recorded layer (execution order): its name, attention kind, view grids, cell and expected values."""
    calls = eager_attention_calls(MODELING[version], tower, pixels, target_sizes=sizes, use_vit_merger=use_merger)
    merged = [(h // WINDOW, w // WINDOW) for h, w in grids]
    if use_merger:
        layers = [("encoder.layers.0.self_attn", "global per view", grids, PATCH, _view_chunks(grids)),
                  ("vit_merger.self_attn", "window 2x2 patches", grids, PATCH, _window_chunks(grids))]
        layers += [(f"encoder.layers.{i}.self_attn", "global per view, 2x2-patch windows merged", merged,
                    WINDOW * PATCH, _view_chunks(merged)) for i in (1, 2)]
    else:
        layers = [(f"encoder.layers.{i}.self_attn", "global per view", grids, PATCH, _view_chunks(grids))
                  for i in range(3)]
    found, used = [], 0
    for name, kind, layer_grids, cell, chunks in layers:
        module = tower.get_submodule(name)
        layer_calls = [p for m, p in calls[used:used + len(chunks)] if m is module]
        used += len(chunks)
        found.append((name, kind, tuple(layer_grids), cell, _expected(layer_calls, chunks, layer_grids, cell)))
    assert used == len(calls)
    return found


@pytest.mark.parametrize("use_merger", [True, False], ids=["merger", "no_merger"])
@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("version", ["4_6", "4_7", "ocr"])
def test_tower_matches_eager_attention(version, attn_implementation, use_merger):
    grids = MERGED_GRIDS if use_merger else PLAIN_GRIDS
    tower = _tower(version, "eager")
    pixels, sizes = _strip(grids)
    expected = _reference(version, tower, pixels, sizes, grids, use_merger)
    # Far from uniform attention (entropy ln n over the largest view's n tokens), so that a token placed wrongly
    # would show.
    h, w = grids[0]
    assert float(expected[0][4]["entropy"][0].mean()) < 0.8 * math.log(h * w)

    tower.set_attn_implementation(attn_implementation)
    with torch.no_grad():
        plain = tower(pixels, target_sizes=sizes, use_vit_merger=use_merger).last_hidden_state
        with vitmad.record(tower, reduction="none") as rec:
            recorded = tower(pixels, target_sizes=sizes, use_vit_merger=use_merger).last_hidden_state
        with vitmad.record(tower, stats=["mad", "entropy", "prefix_mass"]) as rec_mean:
            tower(pixels, target_sizes=sizes, use_vit_merger=use_merger)
    assert torch.equal(plain, recorded)

    assert rec.layers == [name for name, *_ in expected] == rec_mean.layers
    for layer, (name, kind, layer_grids, cell, values) in enumerate(expected):
        geometry = rec.geometry[layer]
        assert geometry.attention.startswith(kind) and geometry.stride == (cell, cell)
        assert geometry.grid is None and geometry.image_grids == layer_grids
        per_token = rec.per_layer[layer]
        assert per_token.shape == (len(grids), 2, max(h * w for h, w in layer_grids))
        for view, (h, w) in enumerate(layer_grids):
            torch.testing.assert_close(per_token[view, :, :h * w].double(), values["mad"][view], **TOL)
            assert per_token[view, :, h * w:].isnan().all()
        for stat in ("mad", "entropy", "prefix_mass"):
            means = torch.stack([v.mean(-1) for v in values[stat]])  # [views, H]
            torch.testing.assert_close(rec_mean.stats[stat][layer].double(), means, **TOL, msg=f"{name} {stat}")


def test_view_alone_equals_packed():
    tower = _tower("4_6", "sdpa")
    pixels, sizes = _strip(MERGED_GRIDS)
    with torch.no_grad(), vitmad.record(tower, reduction="none") as rec:
        tower(pixels, target_sizes=sizes)
        packed = rec.per_layer
        start = 0
        for view, (h, w) in enumerate(MERGED_GRIDS):
            tower(pixels[..., start:start + h * w * PATCH], target_sizes=sizes[view:view + 1])
            start += h * w * PATCH
            assert rec.geometry[0].grid == (h, w) and rec.geometry[-1].grid == (h // 2, w // 2)
            for layer, alone in enumerate(rec.per_layer):
                tokens = alone.shape[-1]
                torch.testing.assert_close(alone[0], packed[layer][view, :, :tokens], **TOL)


def _text_config() -> dict:
    return dict(model_type="qwen3_5_text", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=2, num_key_value_heads=1, head_dim=16, vocab_size=64,
                layer_types=["full_attention"])


@pytest.mark.parametrize("version", ["4_6", "4_7", "ocr"])
def test_full_model_records_its_vision_tower(version):
    prefix = "MiniCPMOcr" if version == "ocr" else f"MiniCPMV{version}"
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                  patch_size=PATCH)
    config = getattr(transformers, f"{prefix}Config")(text_config=_text_config(), vision_config=vision,
                                                      insert_layer_id=0, image_token_id=5, attn_implementation="sdpa")
    model = sharpened(getattr(transformers, f"{prefix}ForConditionalGeneration")(config))
    grids = [(4, 8), (4, 4)]
    pixels, sizes = _strip(grids)
    # "16x" (MiniCPM-V): the window merger, then the merger's 2 x 2 MLP: one text token per 4 x 4 patches;
    # "4x" (MiniCPM OCR's default): no window merger, one text token per 2 x 2 patches.
    per_token = 4 if config.downsample_mode == "16x" else 2
    images = sum((h // per_token) * (w // per_token) for h, w in grids)
    input_ids = torch.tensor([[1] + [5] * images + [2, 3]])

    def run() -> torch.Tensor:
        if version == "4_7":
            # Its forward places the image tokens by <image> / <slice> markers (canvas M-RoPE) that a tiny config
            # lacks: the image features the forward starts with, through the full model.
            return torch.cat(model.get_image_features(pixels, sizes).pooler_output)
        return model(input_ids=input_ids, pixel_values=pixels, target_sizes=sizes).logits

    with torch.no_grad():
        plain = run()
        with vitmad.record(model) as rec:
            recorded = run()
    assert torch.equal(plain, recorded) and plain.shape[-2] == (images if version == "4_7" else input_ids.shape[1])
    tower = "model.vision_tower."
    if per_token == 4:
        assert rec.layers == [tower + n for n in ("encoder.layers.0.self_attn", "vit_merger.self_attn",
                                                  "encoder.layers.1.self_attn")]
        assert rec.geometry[-1].image_grids == ((2, 4), (2, 2)) and rec.geometry[-1].stride == (8.0, 8.0)
    else:
        assert rec.layers == [tower + f"encoder.layers.{i}.self_attn" for i in range(2)]
        assert rec.geometry[-1].image_grids == tuple(grids) and rec.geometry[-1].stride == (4.0, 4.0)
    assert rec.mad.shape == (len(rec.layers), 2, 2) and not rec.mad.isnan().any()


def test_pixels_that_are_not_a_strip_are_refused():
    tower = _tower("4_6", "sdpa")
    # One 4 x 6-patch image as a picture, not cut into a strip: the convolution gives the same 24 tokens, but vitmad
    # places only the processor's strip.
    with torch.no_grad(), vitmad.record(tower) as rec:
        with pytest.raises(ValueError, match=r"encoder\.layers\.0\.self_attn.*pixel_values \[1, 3, 16, 24\].*strip"):
            tower(torch.randn(1, 3, 4 * PATCH, 6 * PATCH), target_sizes=torch.tensor([[4, 6]]))
    assert rec.calls == []


def test_precomputed_windows_are_refused():
    tower = _tower("4_6", "sdpa")
    pixels, sizes = _strip([(2, 2)])
    with torch.no_grad(), vitmad.record(tower):
        with pytest.raises(ValueError, match=r"vit_merger\.self_attn.*precomputed window_index, cu_window_seqlens"):
            tower(pixels, target_sizes=sizes, window_index=torch.arange(4),
                  cu_window_seqlens=torch.tensor([0, 4], dtype=torch.int32))
