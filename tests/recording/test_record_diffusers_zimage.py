"""vitmad.record on Hugging Face diffusers' Z-Image: ``ZImageTransformer2DModel`` and its ``ZImageControlNetModel``,
whose batch is a list of latents, each entry padded into its own sequence; the Omni call, processors vitmad has not
read and the ControlNet's shared refiner refused.

The reference, the sharpening and the spy are those of test_record_diffusers_images.py: the float64 softmax of every
``F.scaled_dot_product_attention`` (``ZSingleStreamAttnProcessor`` calls it through ``dispatch_attention_fn``'s native
backend), from the ``q``, ``k`` (RoPE and RMS norms applied) and boolean mask it was given. The tokens are placed by
geometry written here from diffusers 0.42.1's ``transformer_z_image.py``, in latent pixels of each entry's latent
``[C, 1, H, W]``:

- ``_patchify_image``: ``view(C, F, pF, H/p, p, W/p, p).permute(1, 3, 5, 2, 4, 6, 0)``: patch ``t`` of entry ``i``
  at ``((t // (W/p) + 0.5) p, (t % (W/p) + 0.5) p)``, row-major, the entry's first tokens;
- ``_pad_with_ids``: the patches padded to a multiple of 32 (``x_pad_token``), the caption alike (``cap_pad_token``):
  attended, no position;
- ``noise_refiner`` over each entry's image tokens, ``context_refiner`` over its caption's (skipped), ``layers`` over
  ``cat([image tokens, caption tokens])`` (``_build_unified_sequence``, basic mode); each padded with zeros to the
  batch's longest and masked out as keys (``attn_mask[i, :length] = 1``): no position either.
"""

from __future__ import annotations

import math

import pytest
import torch
from test_record_diffusers_images import _attention_maps, _record, _sharpen

import vitmad
from conftest import grid_centres, statistics_reference

diffusers = pytest.importorskip("diffusers")

TOL = {"rtol": 1e-5, "atol": 1e-4}  # float32 flash-MAD against float64 on the same q and k; atol in latent pixels
STAT_TOL = {"rtol": 1e-5, "atol": 1e-6}
STATS = ["entropy", "prefix_mass", "prefix_maps"]
PATCH = 2
_CONFIG = dict(all_patch_size=(PATCH,), all_f_patch_size=(1,), dim=32, n_refiner_layers=1, n_heads=2, n_kv_heads=2)


def _ceil32(count: int) -> int:
    return -(-count // 32) * 32


def _zimage():
    torch.manual_seed(0)
    model = diffusers.ZImageTransformer2DModel(**_CONFIG, in_channels=4, n_layers=2, cap_feat_dim=12,
                                               axes_dims=[4, 6, 6], axes_lens=[256, 32, 32])
    model = _sharpen(model)  # its RMS norm_q weights scaled up
    with torch.no_grad():  # learned pad tokens (zeros when built), as a checkpoint has them
        model.x_pad_token.normal_()
        model.cap_pad_token.normal_()
    return model


def _entry_positions(grid, length: int) -> torch.Tensor:
    """``[length, 2]``: an entry's patches first, row-major, then its tokens without a position (pad tokens, caption,
    the batch's padding)."""
    patches = grid_centres(grid, float(PATCH))
    return torch.cat([patches, torch.full((length - len(patches), 2), math.nan, dtype=torch.float64)])


def _check(mean, tokens, layer: int, probabilities, grids, lengths) -> None:
    """Layer ``layer`` of a call (``RecordedCall``) of the mean and per-token recordings against its map ``[B, H, N,
    N]``, entry ``i``'s grid ``grids[i]`` and its own tokens the first ``lengths[i]`` (the rest the batch's padding)."""
    count = probabilities.shape[-1]
    longest = max(rows * columns for rows, columns in grids)
    geometry = mean.geometry[layer]
    assert geometry.stride == (float(PATCH),) * 2
    if len(set(grids)) == 1:
        assert geometry.grid == grids[0] and geometry.image_grids is None
    else:
        assert geometry.grid is None and geometry.image_grids == tuple(grids)
    for entry, grid in enumerate(grids):
        positions = _entry_positions(grid, count)
        expected = statistics_reference(probabilities[entry:entry + 1], positions)
        assert float(expected["entropy"].mean()) < 0.75 * math.log(lengths[entry])  # far from uniform
        patches = grid[0] * grid[1]
        # The entry's own patches first, NaN after them (a smaller grid than the batch's largest).
        padded = torch.full((1, expected["mad"].shape[1], longest), math.nan, dtype=torch.float64)
        for stat in ("mad", "entropy", "prefix_mass"):
            padded[..., :patches] = expected[stat]
            recorded = tokens.per_layer[layer] if stat == "mad" else tokens.statistics[stat][layer]
            averaged = mean.per_layer[layer] if stat == "mad" else mean.statistics[stat][layer]
            tol = TOL if stat == "mad" else STAT_TOL
            torch.testing.assert_close(recorded[entry:entry + 1].double(), padded, equal_nan=True, **tol)
            torch.testing.assert_close(averaged[entry].double(), expected[stat][0].mean(-1), **tol)
        # The pad tokens and the caption hold mass, the batch's padding none.
        assert float(probabilities[entry, ..., lengths[entry]:].abs().sum()) == 0.0
        assert float(expected["prefix_mass"].min()) > 0.0


def _run(model, latents, captions, steps):
    def run():
        return [model(latents, torch.tensor([t] * len(latents)), captions) for t in steps][-1]

    return run


def test_entries_of_their_own_sizes_two_denoising_steps(monkeypatch):
    model = _zimage()
    # ZImagePipeline's latents [C, 1, H, W]: entry 0 a 5 x 7 patch grid (35 patches, 64 image tokens), entry 1 3 x 4
    # (12, 32 tokens); captions of 5 and 20 tokens (32 each): the noise refiner pads entry 1 to 64, the layers to 96.
    latents = [torch.randn(4, 1, 10, 14), torch.randn(4, 1, 6, 8)]
    captions = [torch.randn(5, 12), torch.randn(20, 12)]
    grids = [(5, 7), (3, 4)]
    run = _run(model, latents, captions, (0.9, 0.2))
    maps, spied = _attention_maps(monkeypatch, run)
    rec, rec_tokens = _record(model, run, spied, output=lambda returned: returned.sample)
    assert rec.layers == ["noise_refiner.0.attention", "layers.0.attention", "layers.1.attention"]
    assert list(rec.skipped) == ["context_refiner.0.attention"]
    assert "caption's tokens alone" in rec.skipped["context_refiner.0.attention"]
    assert len(rec.calls) == len(rec_tokens.calls) == 2
    # Per step: noise_refiner (64), context_refiner (32: skipped), layers (96).
    assert [m.shape[-1] for m in maps] == [64, 32, 96, 96] * 2
    image_maps = [m for m in maps if m.shape[-1] != 32]
    for call in range(2):
        for layer, lengths in enumerate([(64, 32), (96, 64), (96, 64)]):
            _check(rec.calls[call], rec_tokens.calls[call], layer, image_maps[3 * call + layer], grids, lengths)
        # Entries of their own grids: no prefix maps (the tokens without a position differ between entries).
        assert rec.calls[call].prefix_maps == [None, None, None]
    # The timestep changes the attention: each step keeps its own MAD.
    assert not torch.equal(rec.calls[0].mad, rec.calls[1].mad)


def test_one_grid_prefix_maps_of_pad_and_caption_tokens(monkeypatch):
    model = _zimage()
    # One 3 x 5 grid (15 patches, 32 image tokens) for both entries (a CFG pair: prompt and negative prompt), captions
    # of 3 and 40 tokens (32 and 64): the layers attend over 64 and 96 tokens, entry 0 padded to 96.
    latent = torch.randn(4, 1, 6, 10)
    captions = [torch.randn(3, 12), torch.randn(40, 12)]
    run = _run(model, [latent, latent], captions, (0.5,))
    maps, spied = _attention_maps(monkeypatch, run)
    rec, rec_tokens = _record(model, run, spied, output=lambda returned: returned.sample)
    assert [m.shape[-1] for m in maps] == [32, 64, 96, 96]  # noise_refiner, context_refiner, layers
    image_maps = [maps[0], *maps[2:]]
    grid = (3, 5)
    for layer, (probabilities, lengths) in enumerate(zip(image_maps, [(32, 32), (64, 96), (64, 96)])):
        _check(rec.calls[0], rec_tokens.calls[0], layer, probabilities, [grid, grid], lengths)
        assert rec.geometry[layer].num_suffix_tokens == probabilities.shape[-1] - 15
        # The prefix maps: the row of every token after the patches (pad tokens, caption) over the grid, NaN where
        # the slot is the entry's batch padding.
        expected = probabilities[:, :, 15:, :15].double().clone()
        for entry, length in enumerate(lengths):
            expected[entry, :, length - 15:] = math.nan
        torch.testing.assert_close(rec.prefix_maps[layer].double(), expected, equal_nan=True, **STAT_TOL)


def _controlnet(transformer):
    torch.manual_seed(1)
    controlnet = diffusers.ZImageControlNetModel(**_CONFIG, control_layers_places=[0, 1],
                                                 control_refiner_layers_places=[0], control_in_dim=4)
    controlnet = _sharpen(controlnet)  # its own blocks; the transformer's, shared below, are sharpened already
    return controlnet.from_transformer(controlnet, transformer)


def test_controlnet_image_and_joint_blocks(monkeypatch):
    controlnet = _controlnet(_zimage())
    latents = [torch.randn(4, 1, 10, 6), torch.randn(4, 1, 6, 6)]  # 5 x 3 and 3 x 3 grids: 32 image tokens each
    captions = [torch.randn(33, 12), torch.randn(4, 12)]  # 64 and 32 caption tokens
    control = [torch.randn(4, 1, 10, 6), torch.randn(4, 1, 6, 6)]  # ZImageControlNetPipeline: the latents' sizes

    def run():
        return controlnet(latents, torch.tensor([0.4, 0.4]), captions, control)

    maps, spied = _attention_maps(monkeypatch, run)
    rec, rec_tokens = _record(controlnet, run, spied, output=lambda returned: list(returned.values()))
    # ZImageControlNetModel.forward: the (shared) noise_refiner over x, the context_refiner over the caption
    # (skipped), its control_noise_refiner over the control tokens, its control_layers over [control, caption].
    assert rec.layers == ["noise_refiner.0.attention", "control_noise_refiner.0.attention",
                          "control_layers.0.attention", "control_layers.1.attention"]
    assert list(rec.skipped) == ["context_refiner.0.attention"]
    assert [m.shape[-1] for m in maps] == [32, 64, 32, 96, 96]
    image_maps = [maps[0], *maps[2:]]
    for layer, (probabilities, lengths) in enumerate(zip(image_maps, [(32, 32), (32, 32), (96, 64), (96, 64)])):
        _check(rec.calls[0], rec_tokens.calls[0], layer, probabilities, [(5, 3), (3, 3)], lengths)


def test_controlnet_and_transformer_sharing_the_refiner_refused():
    transformer = _zimage()
    controlnet = _controlnet(transformer)
    latents, captions = [torch.randn(4, 1, 4, 4)], [torch.randn(3, 12)]
    with torch.no_grad(), vitmad.record(transformer), pytest.raises(ValueError, match="ran outside a forward of its"):
        controlnet(latents, torch.tensor([0.4]), captions, [torch.randn(4, 1, 4, 4)])
    other = diffusers.ZImageControlNetModel(**_CONFIG, control_layers_places=[0], control_refiner_layers_places=[0],
                                            control_in_dim=4, add_control_noise_refiner="control_layers")
    other = other.from_transformer(other, transformer)
    with torch.no_grad(), vitmad.record(other), pytest.raises(ValueError, match="attends twice per forward"):
        other(latents, torch.tensor([0.4]), captions, [torch.randn(4, 1, 4, 4)])
    with torch.no_grad(), vitmad.record(controlnet), pytest.raises(ValueError, match="control_context"):
        controlnet(latents, torch.tensor([0.4]), captions, [torch.randn(4, 1, 6, 4)])


def test_omni_call_and_other_processors_refused():
    model = _zimage()
    # ZImageOmniPipeline's call: x and cap_feats lists of lists (condition images, then the target), per-image noise.
    omni = {"x": [[torch.randn(4, 1, 4, 4)]], "t": torch.tensor([0.5]), "cap_feats": [[torch.randn(3, 12)]],
            "siglip_feats": [None], "image_noise_mask": [[1]]}
    with torch.no_grad(), vitmad.record(model), pytest.raises(ValueError, match="Omni's call"):
        model(**omni)
    model.layers[1].attention.set_processor(diffusers.models.attention_processor.AttnProcessor2_0())
    with torch.no_grad(), vitmad.record(model), pytest.raises(ValueError, match="processor AttnProcessor2_0;"):
        model([torch.randn(4, 1, 4, 4)], torch.tensor([0.5]), [torch.randn(3, 12)])
