"""vitmad.record on masked encoders (transformers ViTMAE at any mask_ratio) and with positions given by the user.

The reference is the model's own eager attention (``attn_implementation="eager"``: the probabilities each
``ViTMAEAttention`` returns, read by a forward hook) or a float64 re-computation from a module's own q and k,
placed by geometry written here in NumPy: ViTMAE keeps, per image, the patches of the ``K`` smallest noise values
(``argsort(noise)[:K]``), in that order after CLS; a patch at grid row ``r``, column ``c`` sits at
``(8 r + 4, 8 c + 4)`` pixels (patch 8). The per-image MAD is the mean over the kept patches only.
"""

from __future__ import annotations

import copy
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

transformers = pytest.importorskip("transformers")

import vitmad  # noqa: E402

# Recorded MAD (softmax of q k^T inside mad_qk) against the eager model's probabilities: float32 rounding only.
RECORD_TOL = {"rtol": 1e-5, "atol": 1e-4}  # atol in pixels; MADs here are 5 to 40 px
PATCH = 8
IMAGE = 40  # configured size: a 5 x 5 grid
SIZES = [(40, 40), (24, 40)]  # 5 x 5 and 3 x 5 grids: odd sizes, one non-square (interpolated position embeddings)


def _mae(model_cls, mask_ratio: float, attn_implementation: str = "sdpa"):
    config = transformers.ViTMAEConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=IMAGE,
        patch_size=PATCH, mask_ratio=mask_ratio, decoder_hidden_size=32, decoder_num_hidden_layers=2,
        decoder_num_attention_heads=4, decoder_intermediate_size=64,
        # Large weights: peaked attention, so a token placed at a wrong cell changes the MAD visibly.
        initializer_range=0.3, attn_implementation=attn_implementation,
    )
    torch.manual_seed(0)
    return model_cls(config).eval()


def _inputs(batch: int, size: tuple[int, int], seed: int) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Pixels, the masking noise ``[B, gh * gw]`` and the forward's keyword arguments."""
    gen = torch.Generator().manual_seed(seed)
    pixels = torch.randn(batch, 3, *size, generator=gen)
    noise = torch.rand(batch, (size[0] // PATCH) * (size[1] // PATCH), generator=gen)
    kwargs = {"noise": noise, "interpolate_pos_encoding": size != (IMAGE, IMAGE)}
    return pixels, noise, kwargs


def _eager_probabilities(model, pixels, kwargs, prefix: str) -> list[np.ndarray]:
    """The attention probabilities ``[B, H, N, N]`` (float64) of every ``ViTMAEAttention`` whose name starts with
    ``prefix``, from an eager copy of the model run on the same input and noise."""
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    maps, handles = [], []
    for name, module in eager.named_modules():
        if type(module).__name__ == "ViTMAEAttention" and name.startswith(prefix):
            # ViTMAEForPreTraining's decoder keeps its own copy of the config, which set_attn_implementation misses.
            module.config._attn_implementation = "eager"
            handles.append(module.register_forward_hook(lambda m, a, out: maps.append(out[1].double().numpy())))
    with torch.no_grad():
        eager(pixels, **kwargs)
    for handle in handles:
        handle.remove()
    return maps


def _centres(cells: np.ndarray, grid_w: int) -> np.ndarray:
    """``[..., 2]`` pixel centres (row, column) of row-major grid indices ``cells``."""
    return np.stack([cells // grid_w * PATCH + PATCH / 2, cells % grid_w * PATCH + PATCH / 2], axis=-1).astype(float)


def _per_query(attn: np.ndarray, positions: np.ndarray, renormalize: bool = False) -> np.ndarray:
    """``m_t`` of one attention map ``[B, H, N, N]`` with token positions ``[B, N, 2]`` (NaN rows: no position):
    ``[B, H, N]``, NaN at the queries without a position. Written from docs/definition.md, float64."""
    has = ~np.isnan(positions[..., 0])  # [B, N]
    filled = np.where(has[..., None], positions, 0.0)
    distance = np.linalg.norm(filled[:, :, None] - filled[:, None], axis=-1)  # [B, N, N]
    weights = np.where(has[:, None, None, :], attn, 0.0)  # keys without a position do not count
    m = (weights * distance[:, None]).sum(-1)
    if renormalize:
        m = m / weights.sum(-1)
    return np.where(has[:, None, :], m, np.nan)


def _mae_reference(maps, noise: np.ndarray, kept: int, grid: tuple[int, int], renormalize=False):
    """Per layer ``[B, H, gh * gw]`` on the full grid, NaN at the dropped patches, from the encoder's maps."""
    cells = np.argsort(noise, axis=1)[:, :kept]  # what random_masking keeps, in the encoder's token order
    batch = noise.shape[0]
    positions = np.concatenate([np.full((batch, 1, 2), np.nan), _centres(cells, grid[1])], axis=1)
    folded = []
    for attn in maps:
        m = _per_query(attn, positions, renormalize)[:, :, 1:]
        full = np.full((*m.shape[:2], grid[0] * grid[1]), np.nan)
        for b in range(batch):
            full[b][:, cells[b]] = m[b]
        folded.append(full)
    return np.stack(folded), cells


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("mask_ratio", [0.75, 0.5])
@pytest.mark.parametrize("model_cls", ["ViTMAEModel", "ViTMAEForPreTraining"])
def test_vit_mae_kept_tokens_match_eager_attention(model_cls, mask_ratio, size, attn_implementation):
    model = _mae(getattr(transformers, model_cls), mask_ratio, attn_implementation)
    batch, grid = 3, (size[0] // PATCH, size[1] // PATCH)
    pixels, noise, kwargs = _inputs(batch, size, seed=1)
    prefix = "vit." if model_cls == "ViTMAEForPreTraining" else ""

    with torch.no_grad():
        plain = model(pixels, **kwargs)
        with vitmad.record(model, reduction="none") as per_token:
            recorded = model(pixels, **kwargs)
        with vitmad.record(model) as mean:
            model(pixels, **kwargs)
    for field in ("logits", "last_hidden_state", "mask", "ids_restore"):
        if field in plain:
            assert torch.equal(recorded[field], plain[field]), field
    assert model.config._attn_implementation == attn_implementation

    kept = int(grid[0] * grid[1] * (1 - mask_ratio))
    maps = _eager_probabilities(model, pixels, kwargs, prefix)
    assert [a.shape for a in maps] == [(batch, 2, 1 + kept, 1 + kept)] * 2
    expected, cells = _mae_reference(maps, noise.double().numpy(), kept, grid)
    # The noise given to the model is what it masked with: the test's kept cells are the model's.
    assert (plain["mask"].numpy() == 0).sum(1).tolist() == [kept] * batch
    np.testing.assert_array_equal(np.sort(cells, 1), np.sort(np.nonzero(plain["mask"].numpy() == 0)[1].reshape(
        batch, kept), 1))

    assert per_token.layers == [f"{prefix}layers.0.attention", f"{prefix}layers.1.attention"]
    assert per_token.mad.shape == (2, batch, 2, grid[0] * grid[1])
    dropped = np.isnan(expected)
    assert dropped.sum() == 2 * batch * 2 * (grid[0] * grid[1] - kept)
    np.testing.assert_array_equal(per_token.mad.isnan().numpy(), dropped)  # NaN exactly at the dropped patches
    torch.testing.assert_close(per_token.mad.double(), torch.from_numpy(expected), equal_nan=True, **RECORD_TOL)
    torch.testing.assert_close(mean.mad.double(), torch.from_numpy(np.nanmean(expected, -1)), **RECORD_TOL)
    assert all(g.grid == grid and g.stride == (8.0, 8.0) and g.num_prefix_tokens == 1 for g in mean.geometry)


def test_vit_mae_renormalized_and_unmasked():
    for mask_ratio in (0.75, 0.0):  # mask_ratio=0 still shuffles: every patch kept, in random order
        model = _mae(transformers.ViTMAEModel, mask_ratio)
        pixels, noise, kwargs = _inputs(2, (24, 40), seed=2)
        with torch.no_grad(), vitmad.record(model, renormalize=True) as rec:
            model(pixels, **kwargs)
        kept = int(15 * (1 - mask_ratio))
        maps = _eager_probabilities(model, pixels, kwargs, "")
        expected, _ = _mae_reference(maps, noise.double().numpy(), kept, (3, 5), renormalize=True)
        torch.testing.assert_close(rec.mad.double(), torch.from_numpy(np.nanmean(expected, -1)), **RECORD_TOL)


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_vit_mae_image_alone_equals_image_in_a_batch(attn_implementation):
    model = _mae(transformers.ViTMAEModel, 0.75, attn_implementation)
    pixels, noise, kwargs = _inputs(4, (40, 40), seed=3)
    with torch.no_grad():
        with vitmad.record(model, reduction="none") as batched:
            model(pixels, **kwargs)
        for i in range(4):
            with vitmad.record(model, reduction="none") as alone:
                model(pixels[i:i + 1], **{**kwargs, "noise": noise[i:i + 1]})
            torch.testing.assert_close(alone.mad[:, 0], batched.mad[:, i], equal_nan=True, rtol=1e-5, atol=1e-5)
            np.testing.assert_array_equal(alone.mad[:, 0].isnan().numpy(), batched.mad[:, i].isnan().numpy())


def test_vit_mae_random_masking_without_noise_is_followed():
    """Without ``noise`` the model draws its own: the recording reads what it kept from ``ids_restore``."""
    model = _mae(transformers.ViTMAEModel, 0.75)
    pixels = torch.randn(2, 3, 40, 40, generator=torch.Generator().manual_seed(4))
    torch.manual_seed(5)
    with torch.no_grad(), vitmad.record(model, reduction="none") as rec:
        out = model(pixels)
    # The noise the model drew, recovered from its own output: ids_restore is argsort(argsort(noise)).
    noise = out.ids_restore.double().numpy()
    maps = _eager_probabilities(model, pixels, {"noise": torch.from_numpy(noise).float()}, "")
    expected, _ = _mae_reference(maps, noise, 6, (5, 5))
    torch.testing.assert_close(rec.mad.double(), torch.from_numpy(expected), equal_nan=True, **RECORD_TOL)
    np.testing.assert_array_equal(rec.mad[0, :, 0].isnan().numpy(), out.mask.bool().numpy())


def test_vit_mae_pretraining_decoder_attends_the_full_grid():
    """The decoder is recorded only when asked; it attends CLS and every cell (mask tokens at their cell)."""
    model = _mae(transformers.ViTMAEForPreTraining, 0.75)
    pixels, noise, kwargs = _inputs(2, (24, 40), seed=6)
    with torch.no_grad(), vitmad.record(model, layers=["decoder.decoder_layers.*.attention"]) as rec:
        model(pixels, **kwargs)
    assert rec.layers == ["decoder.decoder_layers.0.attention", "decoder.decoder_layers.1.attention"]
    maps = _eager_probabilities(model, pixels, kwargs, "decoder.")
    cells = np.arange(15)
    positions = np.concatenate([np.full((1, 2), np.nan), _centres(cells, 5)])[None].repeat(2, 0)
    expected = np.stack([_per_query(a, positions)[:, :, 1:].mean(-1) for a in maps])
    assert rec.mad.shape == (2, 2, 4)
    torch.testing.assert_close(rec.mad.double(), torch.from_numpy(expected), **RECORD_TOL)
    assert rec.geometry[0].grid == (3, 5)


def test_vit_mae_layer_run_outside_the_model_is_refused():
    model = _mae(transformers.ViTMAEModel, 0.75)
    hidden = torch.randn(1, 7, 32)
    with torch.no_grad(), vitmad.record(model), pytest.raises(ValueError, match="ran before embeddings masked"):
        model.layers[0](hidden)
    pixels, _, kwargs = _inputs(1, (40, 40), seed=9)
    with torch.no_grad(), vitmad.record(model), pytest.raises(ValueError, match=re.escape(
            "layers.0.attention (ViTMAEAttention) of ViTMAEModel: its attention has shape [1, 2, 9, 9]; after "
            "embeddings kept 6 of the 25 patches (and CLS), a layer of this tower attends [1, H, 7, 7]")):
        model(pixels, **kwargs)
        model.layers[0](torch.randn(1, 9, 32))


# Positions given by the user ---------------------------------------------------------------------------------


def _vit(attn_implementation="sdpa"):
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                    intermediate_size=64, image_size=24, patch_size=8, initializer_range=0.3,
                                    attn_implementation=attn_implementation)
    torch.manual_seed(0)
    return transformers.ViTModel(config).eval()


def _vit_maps(model, pixels) -> list[np.ndarray]:
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    with torch.no_grad():
        return [a.double().numpy() for a in eager(pixels, output_attentions=True).attentions]


def _random_positions(shape, no_position: list, seed: int) -> torch.Tensor:
    """Random float64 positions in a 100-pixel square, NaN rows at ``no_position`` (indices along dim -2)."""
    positions = 100 * torch.rand(*shape, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    for index in no_position:
        positions[index] = float("nan")
    return positions


@pytest.mark.parametrize("per_image", [False, True])
def test_given_positions_match_eager_attention(per_image):
    model = _vit()
    pixels = torch.randn(2, 3, 24, 24, generator=torch.Generator().manual_seed(7))  # 1 + 9 tokens
    if per_image:
        positions = _random_positions((2, 10), [(0, 0), (1, 0), (1, 4), (1, 9)], seed=8)
    else:
        positions = _random_positions((10,), [0, 6], seed=8)
    with torch.no_grad():
        plain = model(pixels).last_hidden_state
        with vitmad.record(model, positions=positions, reduction="none") as per_token:
            recorded = model(pixels).last_hidden_state
        with vitmad.record(model, positions=positions, renormalize=True) as renormalized:
            model(pixels)
    assert torch.equal(recorded, plain)

    maps = _vit_maps(model, pixels)
    given = positions.numpy() if per_image else positions.numpy()[None].repeat(2, 0)
    expected = np.stack([_per_query(a, given) for a in maps])  # [L, B, H, N]
    assert per_token.mad.shape == (2, 2, 2, 10)
    np.testing.assert_array_equal(per_token.mad.isnan().numpy(), np.isnan(expected))
    torch.testing.assert_close(per_token.mad.double(), torch.from_numpy(expected), equal_nan=True, **RECORD_TOL)
    expected_renormalized = np.stack([np.nanmean(_per_query(a, given, True), -1) for a in maps])
    torch.testing.assert_close(renormalized.mad.double(), torch.from_numpy(expected_renormalized), **RECORD_TOL)
    assert per_token.geometry[0].grid is None and per_token.geometry[0].attention == "global, positions given"


class _PointAttention(nn.Module):
    """Self-attention over a set of points: no patch grid, so no layout vitmad could detect."""

    def __init__(self, dim: int = 16, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, n, dim = x.shape
        q, k, v = self.qkv(x).reshape(batch, n, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, n, dim))


class _PointModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(2, 16)
        self.attn = _PointAttention()

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        return self.attn(self.embed(points / 50))


def test_given_positions_callable_per_call_on_a_model_without_a_grid():
    torch.manual_seed(0)
    model = _PointModel().eval()
    clouds = [100 * torch.rand(2, n, 2, generator=torch.Generator().manual_seed(n)) for n in (7, 11)]
    no_layout = r"found no patch-embedding Conv2d \(kernel == stride\) in _PointModel.*; pass positions="
    with torch.no_grad(), pytest.raises(ValueError, match=no_layout):
        with vitmad.record(model):
            model(clouds[0])

    current, calls = {}, []

    def positions():
        calls.append(1)
        return current["points"]

    with torch.no_grad(), vitmad.record(model, positions=positions) as rec:
        outputs = []
        for points in clouds:
            current["points"] = points
            outputs.append(model(points))
    assert len(calls) == 2 and len(rec.calls) == 2
    for call, points, output in zip(rec.calls, clouds, outputs):
        assert torch.equal(output, model(points))
        # The module's own q and k, softmax in float64.
        q, k, _ = model.attn.qkv(model.embed(points / 50)).reshape(2, -1, 3, 2, 8).permute(2, 0, 3, 1, 4)
        attn = (q.double() @ k.double().transpose(-1, -2) * 8 ** -0.5).softmax(-1).detach().numpy()
        expected = _per_query(attn, points.double().numpy()).mean(-1)
        torch.testing.assert_close(call.mad[0].double(), torch.from_numpy(expected), **RECORD_TOL)


@pytest.mark.parametrize(("positions", "error", "match"), [
    ("grid", TypeError, r"positions must be a floating tensor \[N, 2\] .*; got str"),
    (torch.zeros(10, 2, dtype=torch.int64), TypeError, r"positions must be .*; got a torch.int64 tensor"),
    (torch.zeros(10, 4), ValueError, r"positions must be .*; got shape \[10, 4\]"),
    (torch.zeros(10), ValueError, r"positions must be .*; got shape \[10\]"),
    (torch.zeros(1, 2, 10, 2), ValueError, r"positions must be .*; got shape \[1, 2, 10, 2\]"),
    (torch.tensor([[float("nan"), 1.0]] + [[0.0, 0.0]] * 9), ValueError, "some coordinates NaN and others not"),
    (torch.tensor([[float("inf"), 1.0]] + [[0.0, 0.0]] * 9), ValueError, "positions has infinite coordinates"),
    # No token with a position: every value NaN, silently, before.
    (torch.full((10, 2), float("nan")), ValueError, r"positions gives no token a position \(every row NaN\)"),
    (torch.cat([torch.zeros(1, 10, 2), torch.full((1, 10, 2), float("nan"))]), ValueError,
     "positions gives no token of image 1 a position"),
])
def test_given_positions_invalid(positions, error, match):
    with pytest.raises(error, match=match):
        vitmad.record(_vit(), positions=positions)


def test_given_positions_that_do_not_fit_the_call():
    model = _vit()
    pixels = torch.randn(2, 3, 24, 24)
    with pytest.raises(ValueError, match="either positions or patch/grid/num_prefix_tokens"):
        vitmad.record(model, positions=torch.zeros(10, 2), patch=8)
    for shape in ((9, 2), (3, 10, 2)):
        with torch.no_grad(), vitmad.record(model, positions=torch.zeros(shape)), pytest.raises(
                ValueError, match=re.escape("layers.0.attention (ViTAttention) of ViTModel: its attention runs over "
                                            "2 sequences of 10 tokens (images, or windows of them), so positions "
                                            "must be [10, 2] or [2, 10, 2]; got shape "
                                            f"{list(shape)}")):
            model(pixels)
    with torch.no_grad(), vitmad.record(model, positions=lambda: [[0.0, 0.0]] * 10), pytest.raises(
            TypeError, match=r"positions\(\) \(the callable given to record\) must be .*; got list"):
        model(pixels)
    # A callable that needs an argument failed at the first attention with Python's own words (QA helper-247).
    with pytest.raises(TypeError, match=r"vitmad.record: positions must be a tensor or a callable of no arguments "
                                        r"returning one \(called once per forward call\), got a callable that "
                                        r"requires pixels"):
        vitmad.record(model, positions=lambda pixels: torch.zeros(10, 2))
    assert model.config._attn_implementation == "sdpa"
