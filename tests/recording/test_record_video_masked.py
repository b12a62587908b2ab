"""vitmad.record on masked video calls: VideoMAE given ``bool_masked_pos`` (its encoder over the kept tubelets,
``VideoMAEForPreTraining``'s decoder over the visible tubelets then the mask tokens) and V-JEPA 2's predictor (the
context tokens and the mask tokens of its ``context_mask`` and ``target_mask``).

The reference is each model's own eager attention probabilities (its modeling file's ``eager_attention_forward``,
float64), placed by geometry written here from reading the model sources, from the masks the test gives:

- ``VideoMAEEmbeddings`` keeps ``embeddings[~bool_masked_pos]`` reshaped to ``[B, K, C]``: video ``b``'s tubelets
  whose mask is False, in index order;
- ``VideoMAEForPreTraining`` hands its decoder ``cat([visible + their position embeddings, mask token + the masked
  tubelets' position embeddings])``: the tubelets whose mask is False, in index order, then those whose mask is
  True, in index order;
- ``VJEPA2Predictor`` puts the context tokens (``context_mask``'s indices) before the mask tokens (``target_mask``'s)
  and sorts both by index (``argsort`` of the concatenated indices) before its layers: with masks that share no
  index, the sorted union.

Tubelet index ``i`` (the (frame, row, column) order of the tubelet embedding) stands at frame ``f = i // (gh * gw)``,
row ``r = i % (gh * gw) // gw``, column ``c = i % gw``: ``((r + 0.5) p, (c + 0.5) p)`` pixels and ``(f + 0.5) tt``
frames. Per query: the spatial and temporal MAD, the entropy of its row and its attention on itself; each put back
at its tubelet, (frame, row, column) order, NaN at the tubelets the call does not hold.
"""

from __future__ import annotations

import copy

import pytest
import torch

import vitmad
from conftest import eager_attention_calls, sharpened

transformers = pytest.importorskip("transformers")
from transformers.models.videomae import modeling_videomae  # noqa: E402
from transformers.models.vjepa2 import modeling_vjepa2  # noqa: E402

TOL = {"rtol": 1e-5, "atol": 1e-4}  # atol in pixels, frames or nats: float32 rounding of the recorded values
STATS = ["mad", "entropy", "self_mass"]
BATCH, FRAMES, PATCH, TUBELET = 2, 4, 8, 2
SIZES = [(32, 32), (24, 40)]  # 4 x 4 and 3 x 5 tubelets per frame: one non-square
NAN = float("nan")
F64 = torch.float64


# Geometry, written here ------------------------------------------------------------------------------------------


def _tubelet(index: int, grid: tuple[int, int]) -> tuple[float, float, float]:
    """(row px, column px, frame) of tubelet ``index`` of the (frame, row, column) order."""
    per_frame = grid[0] * grid[1]
    f, r, c = index // per_frame, index % per_frame // grid[1], index % grid[1]
    return (r + 0.5) * PATCH, (c + 0.5) * PATCH, (f + 0.5) * TUBELET


def _kept(mask: torch.Tensor) -> list[list[int]]:
    return [[i for i in range(mask.shape[1]) if not mask[b, i]] for b in range(mask.shape[0])]


def _decoder_order(mask: torch.Tensor) -> list[list[int]]:
    return [[i for i in range(mask.shape[1]) if not mask[b, i]] + [i for i in range(mask.shape[1]) if mask[b, i]]
            for b in range(mask.shape[0])]


def _reference(probabilities: torch.Tensor, tokens: list[list[int]], grid: tuple[int, int], tubelets: int) -> dict:
    """``{"mad", "temporal", "entropy", "self_mass"}``, each ``[B, H, tubelets]`` float64, from one call's
    probabilities ``[B, H, n, n]`` whose token ``j`` of video ``b`` is tubelet ``tokens[b][j]``."""
    batch, heads = probabilities.shape[:2]
    out = {k: torch.full((batch, heads, tubelets), NAN, dtype=torch.float64)
           for k in ("mad", "temporal", "entropy", "self_mass")}
    p = probabilities.double()
    for b in range(batch):
        places = [_tubelet(i, grid) for i in tokens[b]]
        for q, (qy, qx, qt) in enumerate(places):
            space = torch.tensor([((qy - ky) ** 2 + (qx - kx) ** 2) ** 0.5 for ky, kx, _ in places], dtype=F64)
            time = torch.tensor([abs(qt - kt) for _, _, kt in places], dtype=F64)
            row = p[b, :, q]  # [H, n]
            cell = tokens[b][q]
            out["mad"][b, :, cell] = (row * space).sum(-1)
            out["temporal"][b, :, cell] = (row * time).sum(-1)
            out["entropy"][b, :, cell] = -(torch.where(row > 0, row * row.log(), 0.0)).sum(-1)
            out["self_mass"][b, :, cell] = row[:, q]
    return out


def _check(rec, index: int, reference: dict) -> None:
    torch.testing.assert_close(rec.stats["mad"][index].double(), reference["mad"], equal_nan=True, **TOL)
    torch.testing.assert_close(rec.temporal_mad[index].double(), reference["temporal"], equal_nan=True, **TOL)
    torch.testing.assert_close(rec.stats["entropy"][index].double(), reference["entropy"], equal_nan=True, **TOL)
    torch.testing.assert_close(rec.stats["self_mass"][index].double(), reference["self_mass"], equal_nan=True, **TOL)


def _means_check(mean, reference: dict, index: int) -> None:
    """The mean recording: each video's mean over the tubelets its call holds (NaN at the others)."""
    torch.testing.assert_close(mean.mad[index].double(), reference["mad"].nanmean(-1), **TOL)
    torch.testing.assert_close(mean.temporal_mad[index].double(), reference["temporal"].nanmean(-1), **TOL)


# Models ------------------------------------------------------------------------------------------------------------


def _videomae(model_cls, size: tuple[int, int], implementation: str = "sdpa"):
    config = transformers.VideoMAEConfig(
        image_size=list(size), patch_size=PATCH, num_frames=FRAMES, tubelet_size=TUBELET, hidden_size=32,
        num_hidden_layers=2, num_attention_heads=2, intermediate_size=48, decoder_hidden_size=32,
        decoder_num_hidden_layers=2, decoder_num_attention_heads=2, decoder_intermediate_size=48)
    torch.manual_seed(0)
    model = model_cls._from_config(config, attn_implementation=implementation)
    return sharpened(model)


def _vjepa2(implementation: str = "sdpa"):
    config = transformers.VJEPA2Config(crop_size=32, patch_size=PATCH, frames_per_clip=FRAMES, tubelet_size=TUBELET,
                                       hidden_size=48, num_hidden_layers=1, num_attention_heads=2, pred_hidden_size=48,
                                       pred_num_hidden_layers=2, pred_num_attention_heads=2, num_pooler_layers=1)
    torch.manual_seed(0)
    return sharpened(transformers.VJEPA2Model._from_config(config, attn_implementation=implementation))


def _video(size: tuple[int, int], seed: int) -> torch.Tensor:
    return torch.randn(BATCH, FRAMES, 3, *size, generator=torch.Generator().manual_seed(seed))


def _mask(tubelets: int, masked: int, seed: int) -> torch.Tensor:
    """``[B, tubelets]`` bool, ``masked`` True per video at places drawn per video."""
    generator = torch.Generator().manual_seed(seed)
    mask = torch.zeros(BATCH, tubelets, dtype=torch.bool)
    for b in range(BATCH):
        mask[b, torch.randperm(tubelets, generator=generator)[:masked]] = True
    return mask


def _eager(model, modeling, *inputs, **kwargs) -> list:
    """``[(module name, probabilities)]`` of every eager attention call of a copy of ``model``, in call order (the
    VideoMAE decoder's own config, which set_attn_implementation misses, switched too)."""
    eager = copy.deepcopy(model)
    for module in eager.modules():
        if hasattr(module, "config") and hasattr(module.config, "_attn_implementation"):
            module.config._attn_implementation = "eager"
    names = {id(module): name for name, module in eager.named_modules()}
    return [(names[id(module)], p) for module, p in eager_attention_calls(modeling, eager, *inputs, **kwargs)]


# VideoMAE ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("seed", [1, 2])
@pytest.mark.parametrize("model_cls", ["VideoMAEModel", "VideoMAEForPreTraining"])
def test_videomae_encoder_places_the_kept_tubelets_at_their_cells(model_cls, seed, size, implementation):
    model = _videomae(getattr(transformers, model_cls), size, implementation)
    grid = (size[0] // PATCH, size[1] // PATCH)
    tubelets = (FRAMES // TUBELET) * grid[0] * grid[1]
    mask = _mask(tubelets, tubelets * 3 // 5, seed)
    video = _video(size, seed)
    output = "logits" if model_cls == "VideoMAEForPreTraining" else "last_hidden_state"
    with torch.no_grad():
        plain = getattr(model(video, bool_masked_pos=mask), output)
        with vitmad.record(model, stats=STATS, reduction="none") as rec:
            recorded = getattr(model(video, bool_masked_pos=mask), output)
        with vitmad.record(model) as mean:
            model(video, bool_masked_pos=mask)
    assert torch.equal(recorded, plain)
    prefix = "videomae." if model_cls == "VideoMAEForPreTraining" else ""
    assert rec.layers == [f"{prefix}encoder.layer.{i}.attention.attention" for i in range(2)] and rec.skipped == {}
    calls = _eager(model, modeling_videomae, video, bool_masked_pos=mask)
    encoder = [p for name, p in calls if not name.startswith("decoder.")]
    assert len(encoder) == 2
    kept = _kept(mask)
    for index, probabilities in enumerate(encoder):
        assert probabilities.shape[-1] == len(kept[0])
        reference = _reference(probabilities, kept, grid, tubelets)
        _check(rec, index, reference)
        _means_check(mean, reference, index)
        geometry = rec.geometry[index]
        assert geometry.grid == grid and geometry.frames == FRAMES // TUBELET and geometry.frame_stride == TUBELET
    # The dropped tubelets are absent: NaN per token, and not in the mean.
    assert torch.equal(rec.mad[0, :, 0].isnan(), mask)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("seed", [1, 2])
def test_videomae_pretraining_decoder_places_visible_then_mask_tokens_at_their_cells(seed, size):
    model = _videomae(transformers.VideoMAEForPreTraining, size)
    grid = (size[0] // PATCH, size[1] // PATCH)
    tubelets = (FRAMES // TUBELET) * grid[0] * grid[1]
    mask = _mask(tubelets, tubelets // 2 + 1, seed)
    video = _video(size, seed)
    layers = ["videomae.encoder.layer.*.attention.attention", "decoder.decoder_layers.*.attention.attention"]
    with torch.no_grad():
        plain = model(video, bool_masked_pos=mask).logits
        with vitmad.record(model, layers=layers, stats=STATS, reduction="none") as rec:
            recorded = model(video, bool_masked_pos=mask).logits
        with vitmad.record(model, layers=layers) as mean:
            model(video, bool_masked_pos=mask)
    assert torch.equal(recorded, plain)
    assert rec.layers[2:] == [f"decoder.decoder_layers.{i}.attention.attention" for i in range(2)]
    calls = _eager(model, modeling_videomae, video, bool_masked_pos=mask)
    assert [name for name, _ in calls] == rec.layers
    tokens = [_kept(mask), _kept(mask), _decoder_order(mask), _decoder_order(mask)]
    for index, ((_, probabilities), order) in enumerate(zip(calls, tokens, strict=True)):
        reference = _reference(probabilities, order, grid, tubelets)
        _check(rec, index, reference)
        _means_check(mean, reference, index)
    # Every tubelet is a token of the decoder: no NaN.
    assert not rec.mad[2:].isnan().any() and rec.geometry[2].frames == FRAMES // TUBELET


def test_videomae_with_counts_that_differ_between_videos_is_refused():
    """VideoMAEEmbeddings reshapes embeddings[~mask] to [B, -1, C]: 27 and 25 kept tubelets make two rows of 26, the
    second video's first tubelet in the first row, without an error from the model."""
    model = _videomae(transformers.VideoMAEModel, (24, 40))
    mask = torch.zeros(BATCH, 30, dtype=torch.bool)
    mask[0, :3] = True
    mask[1, :5] = True
    with torch.no_grad():
        assert model(_video((24, 40), 1), bool_masked_pos=mask).last_hidden_state.shape[1] == 26
        with vitmad.record(model), pytest.raises(
                ValueError, match=r"encoder.layer.0.attention.attention .*bool_masked_pos masks \[3, 5\] tubelets"):
            model(_video((24, 40), 1), bool_masked_pos=mask)


@pytest.mark.filterwarnings("ignore:indexing with dtype torch.uint8 is now deprecated")
def test_videomae_with_a_mask_that_is_not_bool_is_refused():
    """~ of a uint8 mask is 255 or 254, which torch's deprecated uint8 indexing takes as True: every tubelet is kept,
    not those marked 0."""
    model = _videomae(transformers.VideoMAEModel, (32, 32))
    mask = _mask(32, 16, 1).to(torch.uint8)
    with torch.no_grad():
        assert model(_video((32, 32), 1), bool_masked_pos=mask).last_hidden_state.shape[1] == 32
        with vitmad.record(model), pytest.raises(ValueError, match="bool_masked_pos is a torch.uint8 tensor"):
            model(_video((32, 32), 1), bool_masked_pos=mask)


def test_videomae_decoder_outside_its_pretraining_forward_is_refused():
    model = _videomae(transformers.VideoMAEForPreTraining, (32, 32))
    decoder = "decoder.decoder_layers.0.attention.attention"
    with torch.no_grad(), vitmad.record(model, layers=[decoder]), pytest.raises(
            ValueError, match=f"{decoder} .*ran outside a forward of VideoMAEForPreTraining"):
        model.decoder(torch.randn(BATCH, 32, 32), 16)


# V-JEPA 2's predictor ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("seed", [1, 2])
def test_vjepa2_predictor_places_context_and_mask_tokens_at_their_cells(seed, size, implementation):
    # The frames need not be the configured square crop: the model's RoPE then numbers the tokens on the crop's
    # grid, but each token's tubelet is still the one its index names on the video's own grid, where MAD is taken.
    model = _vjepa2(implementation)
    grid = (size[0] // PATCH, size[1] // PATCH)
    tubelets = (FRAMES // TUBELET) * grid[0] * grid[1]
    generator = torch.Generator().manual_seed(seed)
    drawn = torch.stack([torch.randperm(tubelets, generator=generator) for _ in range(BATCH)])
    context, target = [drawn[:, :11]], [drawn[:, 11:20]]  # 11 context and 9 target tubelets, the rest in neither
    video = _video(size, seed)
    layers = ["encoder.layer.*.attention", "predictor.layer.*.attention"]

    def outputs(out):
        return out.last_hidden_state, out.predictor_output.last_hidden_state

    with torch.no_grad():
        plain = outputs(model(video, context_mask=context, target_mask=target))
        with vitmad.record(model, layers=layers, stats=STATS, reduction="none") as rec:
            recorded = outputs(model(video, context_mask=context, target_mask=target))
        with vitmad.record(model, layers=layers) as mean:
            model(video, context_mask=context, target_mask=target)
    assert all(torch.equal(a, b) for a, b in zip(recorded, plain, strict=True))
    assert rec.layers == ["encoder.layer.0.attention", "predictor.layer.0.attention", "predictor.layer.1.attention"]
    calls = _eager(model, modeling_vjepa2, video, context_mask=context, target_mask=target)
    assert len(calls) == 3
    # The predictor's layers see the context and target indices sorted: here, with none shared, their sorted union.
    union = [sorted(context[0][b].tolist() + target[0][b].tolist()) for b in range(BATCH)]
    whole = [list(range(tubelets))] * BATCH
    for index, ((_, probabilities), tokens) in enumerate(zip(calls, [whole, union, union], strict=True)):
        reference = _reference(probabilities, tokens, grid, tubelets)
        _check(rec, index, reference)
        _means_check(mean, reference, index)
    assert int((~rec.mad[1, :, 0].isnan()).sum(-1)[0]) == 20


def test_vjepa2_predictor_with_context_and_target_sharing_tubelets_is_refused():
    """The default forward's masks are every tubelet, twice: two tokens of one tubelet, which holds one value."""
    model = _vjepa2()
    with torch.no_grad(), vitmad.record(model, layers=["predictor.layer.*.attention"]), pytest.raises(
            ValueError, match="predictor.layer.0.attention .*tubelet 0 of video 0 is the index of two of its tokens"):
        model(_video((32, 32), 1))
    # An index repeated within the context mask alone, the target sharing none (QA helper-104): refused alike, the
    # message not blaming an overlap of the two masks.
    context = torch.tensor([[0, 3, 3, 7, 9, 11]] * BATCH)
    target = torch.tensor([[1, 2, 20]] * BATCH)
    with torch.no_grad(), vitmad.record(model, layers=["predictor.layer.*.attention"]), pytest.raises(
            ValueError, match=r"tubelet 3 of video 0 is the index of two of its tokens \(an index repeated in "
                              r"context_mask or target_mask"):
        model(_video((32, 32), 1), context_mask=[context], target_mask=[target])


def test_vjepa2_default_recording_takes_the_encoder_alone():
    model = _vjepa2()
    generator = torch.Generator().manual_seed(3)
    drawn = torch.stack([torch.randperm(32, generator=generator) for _ in range(BATCH)])
    with torch.no_grad(), vitmad.record(model) as rec:
        model(_video((32, 32), 1), context_mask=[drawn[:, :8]], target_mask=[drawn[:, 8:]])
    assert rec.layers == ["encoder.layer.0.attention"]
