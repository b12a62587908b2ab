"""vitmad.record on kornia's (0.9) LoFTR built with full (softmax) attention in its coarse transformer.

From kornia's source (``kornia/feature/loftr``):

- ``ResNetFPN_8_2`` (``resolution`` (8, 2)): a 7 x 7 convolution of stride 2 and two stages of stride 2, each padded,
  so the coarse map of an ``H x W`` image has ``ceil(H / 8) x ceil(W / 8)`` cells of 8 px.
- ``LoFTR.forward`` flattens each image's coarse map row-major (``permute(0, 2, 3, 1).reshape(n, -1, c)``), and
  ``LocalFeatureTransformer`` runs a ``"self"`` layer on image 0's tokens, then on image 1's (two calls, never one
  batch: the images may differ in size), a ``"cross"`` layer from one image's tokens to the other's.
- ``mask0`` / ``mask1`` reach the layer as ``data["mask0"][..., ::8, ::8].flatten(-2)`` (the pixel a cell sits on),
  both as ``q_mask`` and ``kv_mask`` of a self layer; ``FullAttention`` fills ``~(q_mask * kv_mask)`` with ``-inf``
  in ``[N, L, S, H]`` and takes the softmax over dim 2: a padded key gets no weight, a padded query's row is NaN.

So: self-attention over one image's cells at ``(r + 0.5) * 8`` px, a padded cell no query and no key, an image's mean
over its own cells. The reference is the float64 softmax of each ``FullAttention``'s own queries and keys (its
inputs, read by a forward pre-hook) with its masks, placed by that geometry.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

import vitmad
from conftest import sharpened

pytest.importorskip("kornia")
from kornia.feature.loftr.loftr import LoFTR, default_cfg  # noqa: E402
from kornia.feature.loftr.loftr_module.linear_attention import FullAttention  # noqa: E402
from kornia.feature.loftr.loftr_module.transformer import LocalFeatureTransformer  # noqa: E402

CELL = 8  # the coarse map's stride, resolution[0]
STATS = ("entropy", "self_mass")
SHARPER = 4.0


def _loftr(fine: str = "linear", cell: int = CELL) -> LoFTR:
    """A LoFTR of ``ResNetFPN_8_2`` (``cell`` 8) or ``ResNetFPN_16_4`` (16), coarse layers self, cross, self."""
    config = copy.deepcopy(default_cfg)
    dims = [8, 12, 16] if cell == 8 else [8, 12, 16, 20]
    config["resolution"] = (8, 2) if cell == 8 else (16, 4)
    config["resnetfpn"] = {"initial_dim": 8, "block_dims": dims}
    config["coarse"].update(d_model=dims[-1], d_ffn=dims[-1], nhead=2, layer_names=["self", "cross", "self"],
                            attention="full")
    config["fine"].update(d_model=dims[0] if cell == 8 else dims[1], d_ffn=8, nhead=2, attention=fine)
    torch.manual_seed(0)
    model = sharpened(LoFTR(pretrained=None, config=config))  # random weights, nothing downloaded
    with torch.no_grad():  # sharper still: the coarse tokens (a random backbone's, position-encoded) are small
        for layer in model.loftr_coarse.layers:
            layer.q_proj.weight.mul_(SHARPER)
            layer.k_proj.weight.mul_(SHARPER)
    return model


def _own_softmax_calls(model: LoFTR, pair: dict) -> list:
    """``(FullAttention, probabilities [N, H, L, S] float64)`` of each call in one forward of ``model``: the softmax
    of the queries and keys each call gets, scaled and masked as kornia's FullAttention does, in float64."""
    calls = []

    def own(module, args, kwargs) -> None:
        queries, keys = args[0].double(), args[1].double()
        q_mask, kv_mask = kwargs.get("q_mask"), kwargs.get("kv_mask")
        scores = torch.einsum("nlhd,nshd->nhls", queries, keys) / math.sqrt(queries.shape[-1])
        if q_mask is not None and kv_mask is not None:
            allowed = q_mask[:, None, :, None] & kv_mask[:, None, None, :]
            scores = scores.masked_fill(~allowed, float("-inf"))
        calls.append((module, scores.softmax(-1)))

    handles = [m.register_forward_pre_hook(own, with_kwargs=True) for m in model.modules()
               if isinstance(m, FullAttention)]
    with torch.no_grad():
        model(pair)
    for handle in handles:
        handle.remove()
    return calls


def _cells(size: tuple[int, int], cell: int = CELL) -> tuple[int, int]:
    return -(-size[0] // cell), -(-size[1] // cell)


def _expected(p: torch.Tensor, grid: tuple[int, int], mask: torch.Tensor | None, cell: int = CELL) -> dict:
    """Per image and head, the mean over the image's own cells of each query's MAD, entropy and self mass; the
    cells of a ``grid`` of ``cell`` px cells, row-major, at their centres."""
    rows, cols = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
    centres = (torch.stack([rows.flatten(), cols.flatten()], -1).double() + 0.5) * cell
    distance = torch.cdist(centres, centres)
    kept = torch.ones(p.shape[0], p.shape[-1], dtype=torch.bool) if mask is None else mask
    p = torch.where(kept[:, None, :, None], p, 0.0)  # a padded query's row (NaN) is no query
    per_query = {"mad": (p * distance).sum(-1),
                 "entropy": -(p * p.clamp_min(1e-300).log()).sum(-1),
                 "self_mass": p.diagonal(dim1=-2, dim2=-1)}
    weights = kept[:, None, :].double()
    return {name: (v * weights).sum(-1) / weights.sum(-1) for name, v in per_query.items()}


def _pair(sizes, masked: bool, batch: int = 1) -> tuple[dict, list]:
    """Two random images of ``sizes``; with ``masked``, each padded at the bottom and right (the image's content
    fewer rows and columns than its tensor), its mask ``[N, H, W]`` True on the content. Returns the pair and each
    image's cell mask (None without masks), ``[N, cells]``, as kornia reads it."""
    torch.manual_seed(1)
    pair, cell_masks = {}, []
    for side, (height, width) in enumerate(sizes):
        pair[f"image{side}"] = torch.rand(batch, 1, height, width)
        if not masked:
            cell_masks.append(None)
            continue
        mask = torch.zeros(batch, height, width, dtype=torch.bool)
        for b in range(batch):
            mask[b, :height - 9 - 8 * b, :width - 11] = True  # whole padded rows and columns of cells
        pair[f"mask{side}"] = mask
        cell_masks.append(mask[..., ::CELL, ::CELL].flatten(-2))
    return pair, cell_masks


def _record(model: LoFTR, pair: dict, **kwargs):
    with torch.no_grad():
        plain = model(pair)
        with vitmad.record(model, stats=["mad", *STATS], **kwargs) as rec:
            recorded = model(pair)
    assert plain.keys() == recorded.keys()
    for key in plain:
        torch.testing.assert_close(recorded[key], plain[key], rtol=0, atol=0, equal_nan=True)
    return rec


@pytest.mark.parametrize("sizes", [((40, 56), (51, 72)), ((40, 56), (40, 56))], ids=["two-sizes", "one-size"])
@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "masked"])
def test_coarse_self_attention_is_each_image_on_its_8_px_cells(sizes, masked):
    """Image 1 of 51 x 72 px: not a multiple of 8, 7 x 9 cells (the last row and column past the image). Same-size
    images run the backbone once on both, a call as two-sized ones."""
    model = _loftr()
    batch = 2 if masked else 1
    pair, cell_masks = _pair(sizes, masked, batch)
    rec = _record(model, pair)
    layers = ["loftr_coarse.layers.0.attention", "loftr_coarse.layers.2.attention"]
    assert rec.layers == [layers[0], layers[0], layers[1], layers[1]]  # per layer: image 0's call, then image 1's
    assert list(rec.skipped) == ["loftr_coarse.layers.1.attention", "loftr_fine.layers.0.attention",
                                 "loftr_fine.layers.1.attention"]
    assert "another image" in rec.skipped["loftr_coarse.layers.1.attention"]
    assert "linear attention" in rec.skipped["loftr_fine.layers.0.attention"]
    self_layers = {model.get_submodule(name) for name in layers}
    calls = [p for module, p in _own_softmax_calls(model, pair) if module in self_layers]
    assert len(calls) == 4
    for entry, p in enumerate(calls):
        side = entry % 2
        grid = _cells(sizes[side])
        assert p.shape == (batch, 2, grid[0] * grid[1], grid[0] * grid[1])
        mask = cell_masks[side]
        if masked:
            assert 0 < int(mask.sum()) < mask.numel()  # some cells padded, some kept
        expected = _expected(p, grid, mask)
        # kornia's own NaN: a padded query's row is NaN, so is its token after the layer, and a later layer's
        # 0 weight on that key times its NaN value makes every token NaN; the recording says NaN there too.
        finite = expected["entropy"].isfinite()
        assert bool(finite.all()) == (not masked or entry < 2)
        assert (expected["entropy"][finite] < math.log(grid[0] * grid[1]) - 0.5).all()  # far from uniform
        geometry = rec.geometry[entry]
        assert geometry.grid == grid and geometry.stride == (CELL, CELL)
        assert geometry.attention.startswith("global")
        for name, value in expected.items():
            torch.testing.assert_close(rec.calls[-1].statistics[name][entry].double() if name != "mad"
                                       else rec.per_layer[entry].double(), value, rtol=1e-5, atol=1e-7,
                                       equal_nan=True)


def test_features_given_for_one_image_are_placed_on_their_coarse_map():
    """``features0`` (extract_features' output) instead of image 0: its grid is its coarse map's."""
    model = _loftr()
    pair, _ = _pair(((48, 40), (51, 72)), masked=False)
    given = {"features0": model.extract_features(pair.pop("image0")), "image1": pair["image1"]}
    rec = _record(model, given)
    calls = [p for module, p in _own_softmax_calls(model, given)
             if module is model.get_submodule("loftr_coarse.layers.0.attention")]
    for entry, (p, grid) in enumerate(zip(calls, [(6, 5), (7, 9)])):
        assert rec.geometry[entry].grid == grid
        torch.testing.assert_close(rec.per_layer[entry].double(), _expected(p, grid, None)["mad"], rtol=1e-5,
                                   atol=1e-7)


def test_the_16_4_backbone_gives_16_px_cells():
    """``resolution`` (16, 4) builds ``ResNetFPN_16_4``, one more stride-2 stage: ``ceil(H / 16)`` cells of 16 px (its
    FPN adds each map upsampled 2x to the next finer one, so a side must give maps that double exactly: 61 x 94 px,
    not a multiple of 16, does)."""
    model = _loftr(cell=16)
    sizes = ((48, 80), (61, 94))
    pair, _ = _pair(sizes, masked=False)
    rec = _record(model, pair)
    calls = [p for module, p in _own_softmax_calls(model, pair)
             if module is model.get_submodule("loftr_coarse.layers.0.attention")]
    for entry, (p, size) in enumerate(zip(calls, sizes)):
        grid = _cells(size, 16)
        assert rec.geometry[entry].grid == grid and rec.geometry[entry].stride == (16, 16)
        torch.testing.assert_close(rec.per_layer[entry].double(), _expected(p, grid, None, 16)["mad"], rtol=1e-5,
                                   atol=1e-7)


def test_fine_full_attention_is_refused_and_the_coarse_layers_recorded_alone():
    """The fine transformer attends within a window around each coarse match, its calls batched by match: refused
    by name, saying to record the coarse layers, which then record as with a linear fine stage."""
    model = _loftr(fine="full")
    pair, _ = _pair(((40, 56), (51, 72)), masked=False)
    with pytest.raises(ValueError, match=r"loftr_fine\.layers\.0\.attention .*kornia's LoFTR fine transformer .*"
                                         r"batched by match, not by image; .*layers=\['loftr_coarse\.\*'\]"):
        with torch.no_grad(), vitmad.record(model):
            model(pair)
    rec = _record(model, pair, layers=["loftr_coarse.*"])
    assert rec.layers == ["loftr_coarse.layers.0.attention"] * 2 + ["loftr_coarse.layers.2.attention"] * 2
    assert list(rec.skipped) == ["loftr_coarse.layers.1.attention"]


def test_full_attention_outside_a_loftr_model_is_refused():
    """LocalFeatureTransformer alone gets flat tokens: the image grids are LoFTR's to give."""
    model = LocalFeatureTransformer({"d_model": 16, "nhead": 2, "layer_names": ["self", "cross"],
                                     "attention": "full"}).eval()
    with pytest.raises(ValueError, match=r"layers\.0\.attention \(FullAttention\) of LocalFeatureTransformer: "
                                         r"kornia's LoFTR FullAttention .* record the LoFTR model"):
        with torch.no_grad(), vitmad.record(model):
            model(torch.rand(1, 12, 16), torch.rand(1, 20, 16))
