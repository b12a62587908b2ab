"""vitmad.record on Project MONAI's generative networks: the self-attention over each feature map of
DiffusionModelUNet (with and without cross-attention), ControlNet, SPADEDiffusionModelUNet, AutoencoderKL and
SPADEAutoencoderKL, on images (``spatial_dims=2``) and volumes (3).

Tiny random-weight models, sharpened so that attention is far from uniform. The reference is each ``SABlock``'s own
probabilities (``save_attn=True`` keeps the ``att_mat.softmax(dim=-1)`` of its latest forward; with
``use_flash_attention``, ``softmax(q k^T * scale)`` recomputed in float64 from the ``q``, ``k`` it hands
``F.scaled_dot_product_attention``), placed by geometry written here from MONAI's source:

- ``SpatialAttentionBlock`` and ``SpatialTransformer`` flatten their map ``[B, C, *sides]`` row-major over the spatial
  axes; token ``t`` is cell ``t`` unravelled, at ``(i + 0.5) * s`` along each axis, ``s`` the map's stride in input
  pixels (voxels).
- The UNets: ``conv_in`` keeps the input's sides; level ``i`` (its down block, and the up block ``L - 1 - i``) works on
  the input's sides over ``2 ** i`` (sides divisible by it: the up blocks concatenate the skip connections), stride
  ``2 ** i``; the middle block on level ``L - 1``'s.
- The autoencoders: the encoder's level ``i`` map is the input's sides floor-halved ``i`` times (``AEKLDownsample``
  pads one at the end, then a 3 x 3 convolution of stride 2), stride ``2 ** i``; its non-local block on the last
  level's. The decoder starts on that latent (stride ``2 ** (L - 1)``) and doubles it per level, in pixels of the image
  it decodes.
"""

from __future__ import annotations

import math
from unittest import mock

import pytest
import torch
from test_record_monai import STAT_TOL, STATS, TOL, _centres

import vitmad
from conftest import record_both_reductions, sharpened, tensor_softmax_outputs

nets = pytest.importorskip("monai.networks.nets")
pytest.importorskip("einops")

SCALE = 3.0  # the q / k projections scaled after sharpened: far from uniform over a GroupNorm-ed map
T = torch.tensor([10, 500])


def _sharpen_and_save(model: torch.nn.Module, *, save: bool = True) -> torch.nn.Module:
    """Every Linear redrawn (``sharpened``), each ``SABlock``'s q and k ``SCALE`` times larger, and its probabilities
    kept (``save_attn``) unless it computes them through SDPA."""
    model = sharpened(model)
    with torch.no_grad():
        for module in model.modules():
            if type(module).__name__ == "SABlock":
                module.to_q.weight.mul_(SCALE)
                module.to_k.weight.mul_(SCALE)
                module.save_attn = save
    return model


def _level_sides(sides, level: int, rounding) -> tuple[int, ...]:
    for _ in range(level):
        sides = tuple(rounding(n) for n in sides)
    return tuple(sides)


def _unet_layers(levels: int, attention, res_blocks: int, sides, cross: bool, *, up: bool = True):
    """``{layer name: (map sides, stride)}`` of a MONAI diffusion UNet (ControlNet: ``up=False``), in module order."""
    leaf = "transformer_blocks.0.attn1" if cross else "attn"
    def at(level):
        return tuple(n // 2 ** level for n in sides), float(2 ** level)
    layers = {}
    for i in range(levels):
        if attention[i]:
            layers.update({f"down_blocks.{i}.attentions.{r}.{leaf}": at(i) for r in range(res_blocks)})
    layers[f"middle_block.attention.{leaf}"] = at(levels - 1)
    for j in range(levels if up else 0):
        level = levels - 1 - j
        if attention[level]:
            layers.update({f"up_blocks.{j}.attentions.{r}.{leaf}": at(level) for r in range(res_blocks + 1)})
    return layers


def _autoencoder_layers(levels: int, attention, res_blocks: int, sides):
    """``{layer name: (map sides, stride)}`` of a MONAI AutoencoderKL (its encoder's and decoder's ``blocks`` as the
    constructors append them, non-local blocks included): the encoder floor-halves the input per level, the decoder
    doubles the latent per level."""
    latent = _level_sides(sides, levels - 1, lambda n: n // 2)

    def at(level, decoded=False):
        # The decoder doubles the latent: an odd side's last row is gone from its maps.
        map_sides = tuple(n * 2 ** (levels - 1 - level) for n in latent) if decoded else _level_sides(
            sides, level, lambda n: n // 2)
        return map_sides, float(2 ** level)
    layers, index = {}, 1  # blocks.0: the first convolution
    for i in range(levels):
        for _ in range(res_blocks):
            index += 1  # the residual block
            if attention[i]:
                layers[f"encoder.blocks.{index}.attn"] = at(i)
                index += 1
        index += i < levels - 1  # AEKLDownsample
    layers[f"encoder.blocks.{index + 1}.attn"] = at(levels - 1)  # non-local: res, attention, res
    layers["decoder.blocks.2.attn"] = at(levels - 1, True)
    index = 4
    for i in reversed(range(levels)):
        for _ in range(res_blocks):
            index += 1
            if attention[i]:
                layers[f"decoder.blocks.{index}.attn"] = at(i, True)
                index += 1
        index += i > 0  # Upsample
    return layers


def _check(model, rec, tokens, layers, probabilities) -> None:
    """Every layer's MAD (per token and mean) and statistics equal the reference from ``probabilities[name]``
    ``[B, H, N, N]``, its geometry the map's."""
    assert rec.layers == list(layers)
    for index, (name, (sides, stride)) in enumerate(layers.items()):
        attn = probabilities[name].double()
        centres = _centres(sides, (stride,) * len(sides))
        assert attn.shape[-1] == centres.shape[0]
        entropy = -torch.special.xlogy(attn, attn).sum(-1)
        assert float(entropy.mean()) < 0.7 * math.log(attn.shape[-1]), name  # far from uniform
        mad = (attn * torch.cdist(centres, centres)).sum(-1)
        torch.testing.assert_close(tokens.per_layer[index].double(), mad, **TOL)
        torch.testing.assert_close(rec.per_layer[index].double(), mad.mean(-1), **TOL)
        torch.testing.assert_close(tokens.calls[-1].statistics["entropy"][index].double(), entropy, **STAT_TOL)
        assert tokens.prefix_maps[index] is None
        geometry = rec.geometry[index]
        if len(sides) == 3:
            assert (geometry.depth, *geometry.grid) == sides and geometry.depth_stride == stride
        else:
            assert geometry.grid == sides and geometry.depth is None
        assert geometry.stride == (stride, stride) and geometry.num_prefix_tokens is None


def _saved(model) -> dict[str, torch.Tensor]:
    return {name: m.att_mat for name, m in model.named_modules() if type(m).__name__ == "SABlock"}


def _seeded(run):
    # AutoencoderKL.forward draws its latent's noise: the same draw in every run.
    def seeded(model):
        torch.manual_seed(7)
        return run(model)
    return seeded


def _first(output):
    return output[0] if isinstance(output, (tuple, list)) else output


_UNET = {"num_res_blocks": 1, "channels": (8, 16, 16), "attention_levels": (False, True, True), "norm_num_groups": 8,
         "num_head_channels": 4}


@pytest.mark.parametrize("case", ["2d_cross_attention", "2d_resblock_updown", "3d"])
def test_diffusion_unet_places_each_map_at_its_stride(case):
    dims = 3 if case == "3d" else 2
    sides = (4, 12, 20) if dims == 3 else (12, 20)
    cross = case == "2d_cross_attention"
    config = dict(_UNET, attention_levels=(True, False, True)) if dims == 3 else _UNET
    extra = {"with_conditioning": True, "cross_attention_dim": 8} if cross else {}
    model = _sharpen_and_save(nets.DiffusionModelUNet(
        spatial_dims=dims, in_channels=1, out_channels=1, resblock_updown=case == "2d_resblock_updown", **config,
        **extra))
    x = torch.randn(2, 1, *sides, generator=torch.Generator().manual_seed(1))
    context = torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(2)) if cross else None
    rec, tokens = record_both_reductions(model, lambda m: m(x, timesteps=T, context=context), _first, STATS)
    layers = _unet_layers(3, config["attention_levels"], 1, sides, cross)
    _check(model, rec, tokens, layers, _saved(model))
    if cross:
        skipped = {name: reason for name, reason in rec.skipped.items() if name.endswith(".attn2")}
        assert len(skipped) == len(layers)
        assert all(reason.startswith("cross-attention of DiffusionModelUNet") for reason in skipped.values())
    assert len(rec.calls) == 1


def test_controlnet_places_its_encoder_maps():
    model = _sharpen_and_save(nets.ControlNet(spatial_dims=2, in_channels=1, conditioning_embedding_num_channels=(8,),
                                              **_UNET))
    x = torch.randn(2, 1, 12, 20, generator=torch.Generator().manual_seed(3))
    rec, tokens = record_both_reductions(model, lambda m: m(x, timesteps=T, controlnet_cond=x),
                                         lambda out: out[1], STATS)
    _check(model, rec, tokens, _unet_layers(3, _UNET["attention_levels"], 1, (12, 20), False, up=False),
           _saved(model))


def test_spade_diffusion_unet_places_its_maps():
    model = _sharpen_and_save(nets.SPADEDiffusionModelUNet(spatial_dims=2, in_channels=1, out_channels=1, label_nc=2,
                                                           spade_intermediate_channels=8, **_UNET))
    x = torch.randn(2, 1, 12, 20, generator=torch.Generator().manual_seed(4))
    seg = torch.randn(2, 2, 12, 20, generator=torch.Generator().manual_seed(5))
    rec, tokens = record_both_reductions(model, lambda m: m(x, timesteps=T, seg=seg), _first, STATS)
    _check(model, rec, tokens, _unet_layers(3, _UNET["attention_levels"], 1, (12, 20), False), _saved(model))


_AEKL = {"num_res_blocks": 1, "channels": (8, 16, 16), "attention_levels": (False, True, True), "latent_channels": 2,
         "norm_num_groups": 8}


@pytest.mark.parametrize(("spade", "sides"), [(False, (13, 21)), (False, (5, 10, 9)), (True, (12, 20))],
                         ids=["2d_odd", "3d_odd", "spade_2d"])
def test_autoencoder_places_encoder_and_decoder_maps(spade, sides):
    if spade:
        model = nets.SPADEAutoencoderKL(spatial_dims=2, label_nc=2, spade_intermediate_channels=8, **_AEKL)
        seg = torch.randn(2, 2, *sides, generator=torch.Generator().manual_seed(6))
        run = _seeded(lambda m: m(x, seg=seg))
    else:
        model = nets.AutoencoderKL(spatial_dims=len(sides), **_AEKL)
        run = _seeded(lambda m: m(x))
    model = _sharpen_and_save(model)
    x = torch.randn(2, 1, *sides, generator=torch.Generator().manual_seed(7))
    rec, tokens = record_both_reductions(model, run, _first, STATS)
    _check(model, rec, tokens, _autoencoder_layers(3, _AEKL["attention_levels"], 1, sides), _saved(model))
    assert len(rec.calls) == 1


def test_autoencoder_decode_alone_is_a_call_of_its_own():
    # LDM sampling decodes latents without the autoencoder's forward: each decode (and encode) is an entry of its own,
    # the decoder's maps in pixels of the image it decodes.
    model = _sharpen_and_save(nets.AutoencoderKL(spatial_dims=2, **_AEKL))
    x = torch.randn(2, 1, 12, 20, generator=torch.Generator().manual_seed(8))
    layers = _autoencoder_layers(3, _AEKL["attention_levels"], 1, (12, 20))
    with torch.no_grad(), vitmad.record(model, reduction="none") as rec:
        z = model.encode_stage_2_inputs(x)
        encoded = _saved(model)
        model.decode_stage_2_outputs(z)
        model.decode_stage_2_outputs(z * 2)
    assert [call.layers for call in rec.calls] == [
        [n for n in layers if n.startswith("encoder.")], *[[n for n in layers if n.startswith("decoder.")]] * 2]
    decoded = _saved(model)
    for call, saved in ((rec.calls[0], encoded), (rec.calls[-1], decoded)):
        for index, name in enumerate(call.layers):
            sides, stride = layers[name]
            centres = _centres(sides, (stride, stride))
            expected = (saved[name].double() * torch.cdist(centres, centres)).sum(-1)
            torch.testing.assert_close(call.per_layer[index].double(), expected, **TOL)


def test_flash_attention_equals_softmax_of_its_q_and_k():
    model = _sharpen_and_save(nets.DiffusionModelUNet(spatial_dims=2, in_channels=1, out_channels=1,
                                                      use_flash_attention=True, **_UNET), save=False)
    x = torch.randn(2, 1, 12, 20, generator=torch.Generator().manual_seed(9))
    maps, original = [], torch.nn.functional.scaled_dot_product_attention

    def spy(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None):
        assert attn_mask is None and not is_causal and dropout_p == 0.0
        maps.append((query.double() @ key.double().transpose(-2, -1) * scale).softmax(-1))
        return original(query, key, value, scale=scale)

    with torch.no_grad(), mock.patch.object(torch.nn.functional, "scaled_dot_product_attention", spy):
        model(x, timesteps=T)
    rec, tokens = record_both_reductions(model, lambda m: m(x, timesteps=T), _first, STATS)
    layers = _unet_layers(3, _UNET["attention_levels"], 1, (12, 20), False)
    _check(model, rec, tokens, layers, dict(zip(layers, maps, strict=True)))


def test_block_outside_its_network_is_refused():
    # A SpatialAttentionBlock run on its own: no network's samplings tell its stride.
    model = _sharpen_and_save(nets.DiffusionModelUNet(spatial_dims=2, in_channels=1, out_channels=1, **_UNET))
    block = model.middle_block.attention
    with torch.no_grad(), vitmad.record(model, layers=["middle_block.attention.attn"]):
        with pytest.raises(ValueError, match="first convolution of DiffusionModelUNet"):
            block(torch.randn(1, 16, 3, 5))


@pytest.mark.parametrize("group_images", [False, True], ids=["groups_given", "group_images"])
def test_navit_places_each_packed_image_on_its_own_grid(group_images):
    model = sharpened(nets.NaViT(image_size=32, patch_size=4, num_classes=3, hidden_size=32, mlp_dim=32, num_layers=2,
                                 num_heads=2, spatial_dims=2))
    sides = [(12, 20), (8, 4), (20, 8)]  # grids 3 x 5, 2 x 1, 5 x 2
    images = [torch.randn(1, *s, generator=torch.Generator().manual_seed(i)) for i, s in enumerate(sides)]
    # Rows: [image 0, image 1] and [image 2] (17 and 10 tokens; grouping at 20 tokens packs them so too).
    kwargs = {"group_images": True, "group_max_seq_len": 20} if group_images else {}
    batched = images if group_images else [images[:2], images[2:]]
    rows = [(0, 0), (0, 15), (1, 0)]  # (row, first token) of each image
    maps = tensor_softmax_outputs(lambda: model(batched, **kwargs))[:2]  # the blocks'; the pooling's last
    rec, tokens = record_both_reductions(model, lambda m: m(batched, **kwargs), lambda out: out, STATS)
    assert rec.layers == ["blocks.0.attn", "blocks.1.attn"] and list(rec.skipped) == ["attn_pool"]
    grids = [(h // 4, w // 4) for h, w in sides]
    assert rec.geometry[0].image_grids == tuple(grids)
    for layer, probs in enumerate(maps):
        assert probs.shape[-1] == 17
        for image, ((row, first), grid) in enumerate(zip(rows, grids)):
            count = math.prod(grid)
            attn = probs[row, :, first:first + count].double()
            inside = attn[..., first:first + count]
            torch.testing.assert_close(inside.sum(-1), torch.ones_like(inside[..., 0]))  # other images: 0
            centres = _centres(grid, (4.0, 4.0))
            expected = (inside * torch.cdist(centres, centres)).sum(-1)
            torch.testing.assert_close(tokens.per_layer[layer][image, :, :count].double(), expected, **TOL)
            assert tokens.per_layer[layer][image, :, count:].isnan().all()
            torch.testing.assert_close(rec.per_layer[layer][image].double(), expected.mean(-1), **TOL)


def test_navit_on_volumes_is_refused():
    model = nets.NaViT(image_size=16, patch_size=4, num_classes=3, hidden_size=32, mlp_dim=32, num_layers=1,
                       num_heads=2, spatial_dims=3).eval()
    with torch.no_grad(), vitmad.record(model):
        with pytest.raises(ValueError, match=r"spatial_dims=3: it packs volumes of their own sizes"):
            model([[torch.randn(1, 8, 4, 12)]])
