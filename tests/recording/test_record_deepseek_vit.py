"""vitmad.record on timm's DeepSeek-V4 vision encoder (``timm.models.deepseek_vit``): a plain pre-norm ViT with no
prefix token, 2-D RoPE as its only position encoding (``AttentionRope``) and an NHWC patch embedding, recorded by
the default plain layout. Covered: the classifier (``deepseek_vit_412m``, layers under ``encoder.``), the
classifier keeping the VLM aligner (``_align``) and the bare encoder with it (``_enc``); a non-square 5 x 7 grid;
``dynamic_img_pad=True`` on an image that is not whole patches; entropy and the masses.

The reference is each layer's own eager softmax probabilities (``fused_attn`` off, the input of ``attn_drop``:
``test_record_timm.unfused_maps``), placed by the geometry written here: the tokens are the patch grid row-major,
nothing before or after it, patch ``(r, c)`` at ``((r + 0.5) * 14, (c + 0.5) * 14)`` px; MAD in float64 from
the definition (``conftest.chunk_token_mad``: each query's attention-weighted distance to every token, then the
mean over the queries).

Padding (``dynamic_img_pad=True``): timm's ``PatchEmbed`` zero-pads the bottom and right edges to the next patch
multiple and embeds the padded image, with no mask, so the model sees the padded image's ``ceil(H / 14) x
ceil(W / 14)`` grid and every one of its tokens is a query and a key. A token of the last row or column holds the
image's last partial patch (between 1 and 13 pixels of it, the rest zeros): it stands for image content, so it
counts as a query and a key, at the centre of its cell on the padded grid, as every other patch, even where that
centre lies past the image edge (docs/definition.md: a token sits at the centre of the cell it stands for, and
sizes rounded by floor or ceil keep these index-based positions where a cell passes the image edge). The padding is
bottom and right only, so the image's own pixels keep their coordinates and the distances are pixels of the image.
Neither the centre of the edge cell's image part nor leaving the edge tokens without a position (as masked padding
is) is what vitmad measures; the test checks that both would give other values, so the placement is pinned.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import vitmad
from conftest import chunk_token_mad, sharpened

timm = pytest.importorskip("timm")

from test_record_timm import unfused_maps  # noqa: E402

# The recording's float32 q/k (fused path) or the model's own float32 softmax (eager path) against float64 MAD of
# the eager float32 probabilities; pixels.
RECORD_TOL = {"rtol": 1e-5, "atol": 1e-4}
# Float32 rows against their float64 statistics (entropies of about 1 nat, self masses of 0.002 to 0.07 here).
STATS_TOL = {"rtol": 2e-5, "atol": 2e-6}
PATCH = 14
GRID = (5, 7)  # 70 x 98 px, or 60 x 90 px padded to it
TINY = dict(depth=2, embed_dim=64, num_heads=4, img_size=(70, 98), mlp_ratio=2.0)
VARIANTS = {  # name -> create kwargs beyond TINY, prefix of the attention modules' names
    "deepseek_vit_412m": (dict(num_classes=5), "encoder."),
    "deepseek_vit_412m_align": (dict(num_classes=5, out_features=32), "encoder."),
    "deepseek_vit_412m_enc": (dict(out_features=32), ""),
}


def tiny(name: str, **extra) -> torch.nn.Module:
    """A 2-block, 4-head variant ``name`` in eval mode, with peaked attention (``conftest.sharpened``)."""
    kwargs, _ = VARIANTS[name]
    torch.manual_seed(0)
    return sharpened(timm.create_model(name, pretrained=False, **TINY, **kwargs, **extra))


def eager_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` whose attention computes its softmax itself (``fused_attn`` off)."""
    eager = copy.deepcopy(model)
    for block in getattr(eager, "encoder", eager).blocks:
        block.attn.fused_attn = False
    return eager


def recorded(model: torch.nn.Module, pixels: torch.Tensor, **options):
    """The recording of one forward, whose output must be the plain forward's, bit for bit."""
    with torch.no_grad():
        plain = model(pixels)
        with vitmad.record(model, **options) as rec:
            out = model(pixels)
    torch.testing.assert_close(out, plain, rtol=0, atol=0)
    return rec


def cells(grid: tuple[int, int]) -> list[tuple[int, int]]:
    """The tokens' ``(row, column)`` cells: the grid row-major, nothing else."""
    return [(r, c) for r in range(grid[0]) for c in range(grid[1])]


def token_mad(maps: list[torch.Tensor], chunk: list, patch: float = PATCH) -> torch.Tensor:
    """``[L, B, H, n]`` float64 MAD of each query of every layer's probabilities ``[B, H, n, n]``, its tokens at
    ``chunk``'s cells."""
    return torch.stack([torch.stack([chunk_token_mad(a[b:b + 1], chunk, patch) for b in range(len(a))])
                        for a in maps])


@pytest.mark.parametrize("name", list(VARIANTS))
def test_layers_on_the_patch_grid_without_prefix_tokens(name):
    model = tiny(name)
    prefix = VARIANTS[name][1]
    pixels = torch.randn(2, 3, 70, 98, generator=torch.Generator().manual_seed(1))
    maps = unfused_maps(model, pixels)
    assert len(maps) == 2 and all(a.shape == (2, 4, 35, 35) for a in maps)
    # Peaked attention (uniform would be 1/35): a token at a wrong cell changes the MAD.
    assert all(a.amax(-1).mean() > 0.3 for a in maps)
    expected = token_mad(maps, cells(GRID)).mean(-1)
    # The grid transposed (7 x 5) would give another value: the reference tells the placements apart.
    assert not torch.allclose(token_mad(maps, cells(GRID[::-1])).mean(-1), expected, rtol=1e-3)

    for route in (model, eager_copy(model)):
        rec = recorded(route, pixels)
        assert rec.layers == [f"{prefix}blocks.0.attn", f"{prefix}blocks.1.attn"] and not rec.skipped
        assert rec.layout == vitmad.recording.ModelLayout(patch=PATCH, grid=GRID, num_prefix_tokens=0)
        assert rec.mad.shape == (2, 2, 4) and rec.mad.dtype == torch.float32
        torch.testing.assert_close(rec.mad.double(), expected, **RECORD_TOL)


def test_padded_image_is_measured_on_the_padded_grid():
    """60 x 90 px with dynamic_img_pad: the model embeds 70 x 98 px (10 rows and 8 columns of zeros), 5 x 7
    patches whose last row holds 4 image rows and last column 6 image columns (the module docstring)."""
    model = tiny("deepseek_vit_412m", dynamic_img_pad=True)
    pixels = torch.randn(2, 3, 60, 90, generator=torch.Generator().manual_seed(2))
    maps = unfused_maps(model, pixels)
    assert all(a.shape == (2, 4, 35, 35) for a in maps) and all(a.amax(-1).mean() > 0.3 for a in maps)
    expected = token_mad(maps, cells(GRID))  # [L, B, H, 35]

    rec = recorded(model, pixels, reduction="none")
    assert rec.layout == vitmad.recording.ModelLayout(patch=PATCH, grid=GRID, num_prefix_tokens=0)
    assert rec.mad.shape == (2, 2, 4, 35) and bool(rec.mad.isfinite().all())  # the edge tokens are queries
    torch.testing.assert_close(rec.mad.double(), expected, **RECORD_TOL)
    mean = recorded(model, pixels).mad
    torch.testing.assert_close(mean.double(), expected.mean(-1), **RECORD_TOL)
    # The image padded by hand is what the model sees: the same grid, the same values.
    torch.testing.assert_close(recorded(model, F.pad(pixels, (0, 8, 0, 10))).mad, mean, rtol=0, atol=0)

    # What vitmad does not measure, and the test would see. (a) The edge tokens at the centre of their cell's image
    # part: the last row's at (56 + 60) / 2 = 58 px, the last column's at (84 + 90) / 2 = 87 px.
    clipped = [(r if r < 4 else (58 / PATCH - 0.5), c if c < 6 else (87 / PATCH - 0.5)) for r, c in cells(GRID)]
    assert not torch.allclose(token_mad(maps, clipped).mean(-1), mean.double(), rtol=1e-3)
    # (b) The edge tokens without a position, neither queries nor keys (as masked padding is).
    inner = torch.tensor([r < 4 and c < 6 for r, c in cells(GRID)])
    dropped = token_mad([a[..., inner, :][..., inner] for a in maps], cells((4, 6))).mean(-1)
    assert not torch.allclose(dropped, mean.double(), rtol=1e-3)


def test_entropy_and_masses_of_the_eager_rows():
    model = tiny("deepseek_vit_412m_enc")
    pixels = torch.randn(2, 3, 70, 98, generator=torch.Generator().manual_seed(3))
    maps = [a.double() for a in unfused_maps(model, pixels)]
    rec = recorded(model, pixels, stats=["entropy", "prefix_mass", "self_mass", "prefix_maps"])
    assert list(rec.stats) == ["mad", "entropy", "prefix_mass", "self_mass"]
    index = torch.arange(35)
    for layer, a in enumerate(maps):
        torch.testing.assert_close(rec.stats["entropy"][layer].double(), -torch.special.xlogy(a, a).sum(-1).mean(-1),
                                   **STATS_TOL)
        torch.testing.assert_close(rec.stats["self_mass"][layer].double(), a[..., index, index].mean(-1),
                                   **STATS_TOL)
        assert rec.prefix_maps[layer] is None  # no token without a position
    assert bool((rec.stats["prefix_mass"] == 0).all())
    torch.testing.assert_close(rec.stats["mad"].double(), token_mad(maps, cells(GRID)).mean(-1), **RECORD_TOL)
