"""vitmad.record on transformers' RADIO (``RadioModel``, NVIDIA C-RADIO), placed by its family (families/radio.py).

Its dense forward (``pixel_values [B, C, H, W]``) cuts the image with a reshape into ``H // p x W // p`` patches and
prepends ``num_cls_tokens + num_registers`` summary tokens (``RadioPatchEmbeddings._embed_dense_patches``). The
reference is the model's own eager attention probabilities (float32, captured from its modeling file's
``eager_attention_forward``, in float64), placed by geometry written here: the summary tokens first without a
position, then the row-major grid, patch ``(r, c)`` at ``((r + 0.5) * PATCH, (c + 0.5) * PATCH)`` pixels. The
statistics follow docs/definition.md ("Beside the distance"): each averaged over the patch queries; the entropy and
the prefix mass over the whole row the model applies; the prefix maps are the summary tokens' rows over the grid.
"""

from __future__ import annotations

import math

import pytest
import torch

import vitmad
from conftest import eager_attention_calls, sharpened

transformers = pytest.importorskip("transformers")
from transformers.models.radio import modeling_radio  # noqa: E402

# Recorded float32 values against float64 on the eager float32 probabilities; MADs here are 5 to 30 px.
TOL = {"rtol": 1e-5, "atol": 1e-4}
PATCH = 8
SUMMARY = 3  # num_cls_tokens 2 + num_registers 1
# (h, w) patches: 24 x 40 px and 32 x 16 px, both non-square.
GRIDS = [(3, 5), (4, 2)]
LAYERS = ["encoder.layer.0.attention", "encoder.layer.1.attention"]


def _radio(**config) -> torch.nn.Module:
    config = transformers.RadioConfig(**{**dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                patch_size=PATCH, max_img_size=64, num_cls_tokens=2,
                                                num_registers=1), **config})
    return sharpened(transformers.RadioModel(config))


def _positions(h: int, w: int) -> torch.Tensor:
    """``[SUMMARY + h * w, 2]``: the summary tokens without a position, then the grid row-major at cell centres."""
    cells = [((r + 0.5) * PATCH, (c + 0.5) * PATCH) for r in range(h) for c in range(w)]
    return torch.cat([torch.full((SUMMARY, 2), float("nan"), dtype=torch.float64),
                      torch.tensor(cells, dtype=torch.float64)])


def _reference(probabilities: torch.Tensor, h: int, w: int) -> dict[str, torch.Tensor]:
    """From one layer's eager probabilities ``[B, H, N, N]`` (float64): per head ``[B, H]`` MAD, entropy and prefix
    mass averaged over the patch queries, and the prefix maps ``[B, H, SUMMARY, h * w]``."""
    positions = _positions(h, w)
    placed = ~positions[:, 0].isnan()
    distance = torch.cdist(positions[placed], positions[placed])  # [T, T] pixels between patch centres
    patches = probabilities[:, :, placed][:, :, :, placed]  # queries and keys with a position
    rows = probabilities[:, :, placed]  # the patch queries' whole rows
    logs = torch.where(rows > 0, rows.log(), torch.zeros_like(rows))
    return {"mad": (patches * distance).sum(-1).mean(-1),
            "entropy": -(rows * logs).sum(-1).mean(-1),
            "prefix_mass": rows[..., ~placed].sum(-1).mean(-1),
            "prefix_maps": probabilities[:, :, ~placed][:, :, :, placed]}


def _eager_reference(model, pixels: torch.Tensor, h: int, w: int) -> list[dict[str, torch.Tensor]]:
    calls = eager_attention_calls(modeling_radio, model, pixels)
    assert [module for module, _ in calls] == [model.encoder.layer[0].attention, model.encoder.layer[1].attention]
    n = SUMMARY + h * w
    assert all(probabilities.shape == (2, 2, n, n) for _, probabilities in calls)
    return [_reference(probabilities, h, w) for _, probabilities in calls]


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_dense_forward_is_placed_by_its_family_and_matches_eager_attention(attn_implementation):
    model = _radio()
    torch.manual_seed(2)
    for h, w in GRIDS:
        pixels = torch.rand(2, 3, h * PATCH, w * PATCH)
        expected = _eager_reference(model, pixels, h, w)
        model.set_attn_implementation(attn_implementation)
        with torch.no_grad():
            plain = model(pixels)
            with vitmad.record(model, stats=["mad", "entropy", "prefix_mass", "prefix_maps"]) as rec:
                recorded = model(pixels)
        for field in ("last_hidden_state", "summary", "features"):
            assert torch.equal(getattr(plain, field), getattr(recorded, field)), field
        assert rec.layers == LAYERS and rec.skipped == {}
        for geometry in rec.geometry:
            assert (geometry.grid, geometry.stride, geometry.num_prefix_tokens) == ((h, w), (8.0, 8.0), SUMMARY)
            assert geometry.attention == "global" and geometry.heads == 2
        assert (rec.layout.patch, rec.layout.grid, rec.layout.num_prefix_tokens) == (PATCH, (h, w), SUMMARY)
        for stat in ("mad", "entropy", "prefix_mass"):
            torch.testing.assert_close(rec.stats[stat].double(), torch.stack([e[stat] for e in expected]), **TOL,
                                       msg=lambda m, stat=stat: f"{stat}: {m}")
        # Far from uniform attention (entropy ln N), so that a token placed wrongly would show.
        assert float(torch.stack([e["entropy"] for e in expected]).max()) < 0.8 * math.log(SUMMARY + h * w)
        for maps, e in zip(rec.prefix_maps, expected):
            assert maps.shape == (2, 2, SUMMARY, h * w)
            torch.testing.assert_close(maps.double(), e["prefix_maps"], rtol=1e-5, atol=1e-6)


def test_per_query_values_fold_onto_the_grid_row_major():
    model = _radio()
    h, w = GRIDS[0]
    pixels = torch.rand(2, 3, h * PATCH, w * PATCH)
    calls = eager_attention_calls(modeling_radio, model, pixels)
    model.set_attn_implementation("sdpa")
    with torch.no_grad(), vitmad.record(model, reduction="none") as rec:
        model(pixels)
    for (_, probabilities), values in zip(calls, rec.per_layer):
        positions = _positions(h, w)[SUMMARY:]
        patches = probabilities[:, :, SUMMARY:, SUMMARY:]
        expected = (patches * torch.cdist(positions, positions)).sum(-1)  # [B, H, h * w], row-major
        torch.testing.assert_close(values.double(), expected, **TOL)


@pytest.mark.parametrize("given", ["patch_grid", "positions"])
def test_layout_given_by_hand_wins_and_gives_the_same_numbers(given):
    model = _radio()
    model.set_attn_implementation("sdpa")
    h, w = GRIDS[0]
    pixels = torch.rand(2, 3, h * PATCH, w * PATCH)
    expected = torch.stack([e["mad"] for e in _eager_reference(model, pixels, h, w)])
    model.set_attn_implementation("sdpa")
    layout = dict(patch=PATCH, grid=[h, w]) if given == "patch_grid" else dict(positions=_positions(h, w).float())
    with torch.no_grad():
        with vitmad.record(model) as automatic:
            model(pixels)
        with vitmad.record(model, **layout) as by_hand:
            model(pixels)
    torch.testing.assert_close(by_hand.mad.double(), expected, **TOL)
    if given == "positions":
        assert by_hand.geometry[0].grid is None  # the user's positions placed it, not the family
        # Its mean over the present tokens sums in another order: float32 rounding apart.
        torch.testing.assert_close(by_hand.mad, automatic.mad, rtol=1e-6, atol=0)
    else:
        torch.testing.assert_close(by_hand.mad, automatic.mad, rtol=0, atol=0)  # the same positions and fold


def test_layout_given_by_hand_wins_even_when_wrong():
    """The user's layout is used, not the family's: a grid that is not the one the model cuts is refused as the plain
    layout refuses it for a ViT (its extra tokens would be counted from it), the user's patch sets the stride."""
    model = _radio()
    with torch.no_grad(), vitmad.record(model, patch=PATCH, grid=[5, 3]) as rec:
        with pytest.raises(ValueError, match=r"encoder\.layer\.0\.attention \(RadioAttention\) of RadioModel: the "
                                             r"given grid=\[5, 3\] is not the 3x6 grid of its patch embedding"):
            model(torch.rand(1, 3, 24, 48))  # 3 x 6 patches: 3 + 18 tokens, which 5 x 3 would take for 6 + 15
    assert all(call.layers == [] for call in rec.calls)
    with torch.no_grad(), vitmad.record(model, patch=4, grid=[3, 5]) as rec:
        model(torch.rand(1, 3, 24, 40))
    assert rec.geometry[0].stride == (4.0, 4.0)  # the user's patch, though the model's is 8


def test_partial_layout_given_by_hand_is_refused_by_name():
    model = _radio()
    with pytest.raises(ValueError, match=r"encoder\.layer\.0\.attention \(RadioAttention\) of RadioModel: RADIO "
                                         r"\(RadioModel\).*3 summary tokens.*H/8 x W/8.*leave patch=, grid= and "
                                         r"num_prefix_tokens= unset, or give both patch=8 and grid=\[H // 8, W // 8\]"):
        with torch.no_grad(), vitmad.record(model, patch=PATCH):
            model(torch.rand(1, 3, 24, 40))


def test_packed_forward_of_one_image_placed_by_a_layout_given_by_hand_matches_the_dense_forward():
    """One image through image_grid_hw is one plain sequence (no cu_seqlens): the user's patch= and grid= place it
    instead of the family (the packed forward of several images: tests/recording/test_record_packed_prefix.py), and
    match the dense forward of the same image."""
    model = _radio()
    model.set_attn_implementation("sdpa")
    h, w = GRIDS[0]
    pixels = torch.rand(1, 3, h * PATCH, w * PATCH)
    patches = modeling_radio.RadioPatchEmbeddings._image_to_patches(model.embeddings, pixels)[0]
    grid_hw = torch.tensor([[h, w]])
    with torch.no_grad():
        with vitmad.record(model, patch=PATCH, grid=[h, w]) as packed:
            model(patches, image_grid_hw=grid_hw)
        with vitmad.record(model) as dense:
            model(pixels)
    torch.testing.assert_close(packed.mad, dense.mad, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_temporally_packed_video_forward_is_placed_per_tubelet_on_its_spatial_grid(attn_implementation):
    """Nemotron-H-Omni's video path: each batch entry a tubelet of 2 frames stacked on the channels, cut into the
    image's row-major grid after the summary tokens and attending within itself; its tokens all span the same frames,
    so they are placed in space alone, as a dense image's (was refused until every statistic was checked here)."""
    model = _radio(video_temporal_patch_size=2)
    model.make_preprocessor_external()  # as Nemotron-H-Omni does: its conditioner normalizes 3 channels
    torch.manual_seed(3)
    h, w = 3, 5
    # Normalized frames (centred, as the external conditioner leaves them): all-positive pixels make every patch
    # token alike and the attention near uniform.
    tubelets = torch.randn(2, 2 * 3, h * PATCH, w * PATCH)
    expected = _eager_reference(model, tubelets, h, w)
    model.set_attn_implementation(attn_implementation)
    with torch.no_grad():
        plain = model(tubelets)
        with vitmad.record(model, stats=["mad", "entropy", "prefix_mass", "prefix_maps"]) as rec:
            recorded = model(tubelets)
    assert torch.equal(plain.last_hidden_state, recorded.last_hidden_state)
    assert rec.layers == LAYERS and rec.skipped == {}
    for geometry in rec.geometry:
        assert (geometry.grid, geometry.stride, geometry.num_prefix_tokens) == ((h, w), (8.0, 8.0), SUMMARY)
    for stat in ("mad", "entropy", "prefix_mass"):
        torch.testing.assert_close(rec.stats[stat].double(), torch.stack([e[stat] for e in expected]), **TOL,
                                   msg=lambda m, stat=stat: f"{stat}: {m}")
    assert float(torch.stack([e["entropy"] for e in expected]).max()) < 0.8 * math.log(SUMMARY + h * w)
    for maps, e in zip(rec.prefix_maps, expected):
        torch.testing.assert_close(maps.double(), e["prefix_maps"], rtol=1e-5, atol=1e-6)


class _Resizing(torch.nn.Module):
    """A wrapper that resizes its input before RADIO: the patches are not cells of the wrapper's input."""

    def __init__(self, radio: torch.nn.Module):
        super().__init__()
        self.radio = radio

    def forward(self, pixels: torch.Tensor):
        return self.radio(torch.nn.functional.interpolate(pixels, size=(24, 40), mode="bilinear"))


def test_input_resized_before_the_patch_embeddings_is_refused():
    wrapper = _Resizing(_radio()).eval()
    with torch.no_grad(), vitmad.record(wrapper) as rec, \
            pytest.raises(ValueError, match=r"radio\.encoder\.layer\.0\.attention \(RadioAttention\) of _Resizing: "
                                            r"RADIO's patch embeddings \(radio\.embeddings\) took 24x40 pixels from an "
                                            r"input of 48x80"):
        wrapper(torch.rand(1, 3, 48, 80))
    assert all(call.layers == [] for call in rec.calls)
    with torch.no_grad(), vitmad.record(wrapper) as rec:
        wrapper(torch.rand(1, 3, 24, 40))  # no resize: placed
    assert rec.layers == ["radio." + name for name in LAYERS] and rec.geometry[0].grid == (3, 5)
