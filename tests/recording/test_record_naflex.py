"""vitmad.record on native-resolution ViTs (timm NaFlexViT, transformers SigLIP2 with NaFlex inputs): images of
different aspect ratios padded into one batch, against the MAD of each model's own eager attention placed by the
geometry written here (each image's grid row-major, patch centres in pixels of the resized image, prefix and
padding tokens neither query nor key), float64."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")

import vitmad  # noqa: E402
from conftest import pooling_rows, sharpened  # noqa: E402
from vitmad.recording.module_capture import timm_attention_modules  # noqa: E402

# Recorded (float32 flash-MAD on q/k, or the fused op on probabilities) vs float64 geometry on eager maps.
RECORD_TOL = {"rtol": 1e-5, "atol": 1e-4}  # atol in pixels
PATCH = 8
# Images as the processor resized them: (height, width) in pixels, patch multiples of different aspect ratios.
SIZES = [(24, 40), (32, 16), (16, 16), (8, 56)]


def _image_mad(probs: np.ndarray, prefix: int, grid: tuple[int, int], patch: int,
               renormalize: bool = False) -> np.ndarray:
    """MAD per head of one image: ``probs`` ``[H, N, N]`` over its prefix tokens, then its ``gh * gw`` patches
    row-major, then padding (ignored: no position)."""
    gh, gw = grid
    n = gh * gw
    rows, cols = np.divmod(np.arange(n), gw)
    centres = np.stack([(rows + 0.5) * patch, (cols + 0.5) * patch], -1)
    distance = np.sqrt(((centres[:, None, :] - centres[None, :, :]) ** 2).sum(-1))
    block = probs[:, prefix:prefix + n, prefix:prefix + n].astype(np.float64)
    per_query = (block * distance).sum(-1)
    if renormalize:
        per_query = per_query / block.sum(-1)
    return per_query.mean(-1)


def _expected(maps: list[torch.Tensor], prefix: int, grids, renormalize: bool = False) -> torch.Tensor:
    """``[L, B, H]`` from per-layer eager probabilities ``[B, H, N, N]``."""
    return torch.tensor(np.array([[_image_mad(a[i].double().numpy(), prefix, grid, PATCH, renormalize)
                                   for i, grid in enumerate(grids)] for a in maps]))


def _per_layer(rec) -> torch.Tensor:
    return torch.stack(rec.per_layer).double()


# timm NaFlexViT -------------------------------------------------------------------------------------------------

def _timm_model(**extra):
    torch.manual_seed(0)
    kwargs = dict(depth=2, embed_dim=32, num_heads=2, patch_size=PATCH, class_token=True, reg_tokens=2) | extra
    return timm.create_model("naflexvit_base_patch16_map", pretrained=False, **kwargs).eval()


def _images(sizes, seed=1) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(3, h, w, generator=gen) for h, w in sizes]


def _naflex_batch(images: list[torch.Tensor], slots: int | None = None) -> dict:
    """timm's own pipeline: ``patchify_image`` per image, padded at the end as ``NaFlexCollator`` does."""
    from timm.data.naflex_transforms import patchify_image

    items = [patchify_image(image, (PATCH, PATCH)) for image in images]
    slots = slots or max(p.shape[0] for p, _, _ in items)
    patches = torch.zeros(len(items), slots, items[0][0].shape[1])
    coord = torch.zeros(len(items), slots, 2, dtype=torch.long)
    valid = torch.zeros(len(items), slots, dtype=torch.bool)
    for i, (p, c, v) in enumerate(items):
        patches[i, :len(p)], coord[i, :len(p)], valid[i, :len(p)] = p, c, v
    return {"patches": patches, "patch_coord": coord, "patch_valid": valid}


def _timm_eager_maps(model, inputs) -> list[torch.Tensor]:
    """Every block's probabilities from its unfused path (input of attn_drop); the pooling head is left out."""
    eager = copy.deepcopy(model)
    maps = []
    for name, module in timm_attention_modules(eager).items():
        if name.startswith("blocks."):
            module.fused_attn = False
            module.attn_drop.register_forward_pre_hook(lambda _, args: maps.append(args[0]))
    with torch.no_grad():
        eager(inputs)
    return maps


@pytest.mark.parametrize("fused", [True, False], ids=["sdpa", "eager"])
def test_timm_naflex_packed_batch_equals_the_mad_of_its_eager_maps(fused):
    model = _timm_model()
    for module in timm_attention_modules(model).values():
        module.fused_attn = fused
    inputs = _naflex_batch(_images(SIZES), slots=20)
    grids = [(h // PATCH, w // PATCH) for h, w in SIZES]

    with torch.no_grad():
        plain = model(inputs)
        with vitmad.record(model) as rec:
            recorded = model(inputs)

    torch.testing.assert_close(recorded, plain, rtol=0, atol=0)
    assert rec.layers == ["blocks.0.attn", "blocks.1.attn"]
    assert "attn_pool" in rec.skipped and "latent" in rec.skipped["attn_pool"]
    geometry = rec.geometry[0]
    assert geometry.grid is None and geometry.image_grids == tuple(grids)
    assert geometry.stride == (8.0, 8.0) and geometry.num_prefix_tokens == 3
    expected = _expected(_timm_eager_maps(model, inputs), 3, grids)
    assert rec.mad.shape == (2, len(SIZES), 2)
    torch.testing.assert_close(rec.mad.double(), expected, **RECORD_TOL)


def test_timm_naflex_image_alone_equals_the_same_image_in_a_padded_batch():
    model = _timm_model()
    images = _images(SIZES)
    with torch.no_grad(), vitmad.record(model) as rec:
        model(_naflex_batch(images, slots=24))
        alone = []
        for image in images:
            model(_naflex_batch([image]))
            alone.append(rec.mad[:, 0])
    batched = rec.calls[0]
    for i in range(len(images)):
        torch.testing.assert_close(batched.mad[:, i], alone[i], rtol=1e-5, atol=1e-5)


def test_timm_naflex_per_token_values_fold_each_image_first_then_nan():
    model = _timm_model(class_token=False, reg_tokens=0)
    inputs = _naflex_batch(_images(SIZES[:2]))
    with torch.no_grad(), vitmad.record(model, reduction="none") as rec:
        model(inputs)
    values = rec.per_layer[0]  # [B, H, T_max]
    assert values.shape == (2, 2, 15)
    assert torch.isfinite(values[0]).all()
    assert torch.isfinite(values[1, :, :8]).all() and values[1, :, 8:].isnan().all()
    with torch.no_grad(), vitmad.record(model) as mean:
        model(inputs)
    torch.testing.assert_close(mean.per_layer[0][1], values[1, :, :8].mean(-1))


def test_timm_naflex_standard_image_batch_is_one_grid():
    model = _timm_model()
    pixels = torch.randn(2, 3, 24, 40, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        plain = model(pixels)
        with vitmad.record(model) as rec:
            recorded = model(pixels)
    torch.testing.assert_close(recorded, plain, rtol=0, atol=0)
    assert rec.geometry[0].grid == (3, 5) and rec.geometry[0].image_grids is None
    assert rec.layout == vitmad.recording.ModelLayout(patch=PATCH, grid=(3, 5), num_prefix_tokens=3)
    expected = _expected(_timm_eager_maps(model, pixels), 3, [(3, 5)] * 2)
    torch.testing.assert_close(rec.mad.double(), expected, **RECORD_TOL)


def test_timm_naflex_every_entry_point_is_one_call():
    model = _timm_model()
    inputs = _naflex_batch(_images(SIZES), slots=20)
    with torch.no_grad(), vitmad.record(model) as rec:
        model.forward_features(inputs["patches"], inputs["patch_coord"], inputs["patch_valid"])
        model(inputs)
    assert len(rec.calls) == 2
    torch.testing.assert_close(rec.calls[0].mad, rec.calls[1].mad, rtol=0, atol=0)


def test_timm_naflex_with_rope_follows_each_image_grid():
    model = _timm_model(pos_embed="none", rope_type="axial", global_pool="avg")
    inputs = _naflex_batch(_images(SIZES), slots=22)
    with torch.no_grad(), vitmad.record(model) as rec:
        model(inputs)
    assert not rec.skipped
    expected = _expected(_timm_eager_maps(model, inputs), 3, [(h // PATCH, w // PATCH) for h, w in SIZES])
    torch.testing.assert_close(rec.mad.double(), expected, **RECORD_TOL)


def test_timm_naflex_padding_a_user_mask_leaves_visible_is_no_key():
    """docs/definition.md: padding stands for no place on the image; attention on it drops out like a prefix
    token's (and is divided out with renormalize=True)."""
    model = _timm_model()
    inputs = _naflex_batch(_images(SIZES[:2]), slots=20)
    inputs["attn_mask"] = torch.zeros(2, 1, 23, 23)  # every slot visible to every query
    grids = [(3, 5), (4, 2)]
    maps = _timm_eager_maps(model, inputs)
    assert float(maps[0][1, :, 3, 3 + 8:].sum()) > 0.01  # image 1's queries put mass on its padding
    for renormalize in (False, True):
        with torch.no_grad(), vitmad.record(model, renormalize=renormalize) as rec:
            model(inputs)
        torch.testing.assert_close(rec.mad.double(), _expected(maps, 3, grids, renormalize), **RECORD_TOL)


def test_timm_naflex_patch_dropout_in_training_mode_is_refused_by_name():
    # QA 305: a shape message expecting a batch of 1 (the broadcast batch of one image's positions) instead.
    model = _timm_model(patch_drop_rate=0.5).train()
    inputs = _naflex_batch(_images(SIZES[:2]), slots=16)
    with pytest.raises(ValueError, match=r"NaFlexVit: timm's PatchDropout \(patch_drop, prob 0.5\) drops patches at "
                                         r"random in training mode, and which it kept is not known: call "
                                         r"model.eval\(\)"):
        with torch.no_grad(), vitmad.record(model):
            model(inputs)
    # A rate so small that every patch stays still shuffles them (QA 306: placed as if in order).
    shuffling = _timm_model(patch_drop_rate=1e-17).train()
    with pytest.raises(ValueError, match=r"PatchDropout \(patch_drop, prob 1e-17\) drops patches at random"):
        with torch.no_grad(), vitmad.record(shuffling):
            shuffling(inputs)
    model.eval()
    with torch.no_grad(), vitmad.record(model) as rec:
        model(inputs)
    assert rec.mad.shape == (2, 2, 2)
    # NaFlexVit calls its patch dropout only while it trains itself: one left training in an eval model (a Monte
    # Carlo dropout helper's) drops nothing, and is no reason to refuse (QA 308).
    model.patch_drop.train()
    with torch.no_grad(), vitmad.record(model) as kept:
        model(inputs)
    assert torch.equal(kept.mad, rec.mad)


def test_timm_naflex_refuses_tokens_it_cannot_place():
    model = _timm_model()
    inputs = _naflex_batch(_images(SIZES[:2]), slots=16)
    shuffled = dict(inputs, patch_coord=inputs["patch_coord"].clone())
    shuffled["patch_coord"][0, [0, 1]] = shuffled["patch_coord"][0, [1, 0]]
    # The reason holds for every position embedding (QA 289: "the model lays its position embedding row-major" was
    # false for grid_sample and RoPE, which read patch_coord).
    with pytest.raises(ValueError, match=r"NaFlexVit.*image 0.*not in row-major order in patch_coord; vitmad places "
                                         r"a NaFlex image's tokens row-major .* pass each image's patches row-major"):
        with torch.no_grad(), vitmad.record(model):
            model(shuffled)
    # ... and says which embeddings would take another order (QA 305: "a learned or factorised position embedding is
    # laid that way whatever patch_coord says" was false for their grid-sample forms).
    sampled = _timm_model(pos_embed_use_grid_sample=True)
    with pytest.raises(ValueError, match=r"timm's default learned and factorised position embeddings are laid "
                                         r"row-major by slot whatever patch_coord says; where the model reads "
                                         r"patch_coord itself, its grid-sample embedding or RoPE, another order is "
                                         r"valid for the model but not placed by vitmad\)"):
        with torch.no_grad(), vitmad.record(sampled):
            sampled(shuffled)
    holes = dict(inputs, patch_valid=inputs["patch_valid"].clone())
    holes["patch_valid"][1, 2] = False
    with pytest.raises(ValueError, match=r"image 1 .*4x2 grid.*first 8 of 16 slots.*7 slots are marked valid"):
        with torch.no_grad(), vitmad.record(model):
            model(holes)
    # Padding slots given coordinates past the image enlarge the grid the model reads (its largest coordinate + 1
    # over every slot): the refusal says where that grid comes from.
    beyond = dict(inputs, patch_coord=inputs["patch_coord"].clone())
    beyond["patch_coord"][1, 8:] = torch.tensor([4, 6])
    with pytest.raises(ValueError, match=r"image 1 .*5x7 grid by patch_coord \(its largest row and column \+ 1 "
                                         r"over every slot, padding slots' coordinates included.*: 35 cells, more "
                                         r"than its 16 slots"):
        with torch.no_grad(), vitmad.record(model):
            model(beyond)


# transformers SigLIP2 -----------------------------------------------------------------------------------------

def _siglip2_vision(implementation: str):
    config = transformers.Siglip2VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                              num_attention_heads=2, patch_size=PATCH, num_patches=16)
    torch.manual_seed(0)
    return transformers.Siglip2VisionModel(config).eval().to(dtype=torch.float32), config


def _siglip2_inputs(sizes, max_num_patches: int = 24, seed: int = 3) -> dict:
    """The model's own processor on PIL images of several aspect ratios (it resizes each to its own grid)."""
    from PIL import Image

    # Each image's pixels depend on its size only: the same image alone and in a batch.
    images = [Image.fromarray(np.random.default_rng([seed, h, w]).integers(0, 256, (h, w, 3), dtype=np.uint8))
              for h, w in sizes]
    processor = transformers.Siglip2ImageProcessor(patch_size=PATCH, max_num_patches=max_num_patches)
    return dict(processor(images, return_tensors="pt"))


SIGLIP2_SOURCES = [(40, 70), (64, 30), (50, 50), (20, 90)]


def _siglip2_eager_maps(model, inputs) -> list[torch.Tensor]:
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    with torch.no_grad():
        return list(eager(**inputs, output_attentions=True).attentions)


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_siglip2_packed_batch_equals_the_mad_of_its_eager_maps(implementation):
    model, _ = _siglip2_vision(implementation)
    model.set_attn_implementation(implementation)
    inputs = _siglip2_inputs(SIGLIP2_SOURCES)
    grids = [tuple(g) for g in inputs["spatial_shapes"].tolist()]
    assert len(set(grids)) == len(grids)  # four different aspect ratios, padded to 24 slots

    with torch.no_grad():
        plain = model(**inputs)
        with vitmad.record(model) as rec:
            recorded = model(**inputs)

    torch.testing.assert_close(recorded.last_hidden_state, plain.last_hidden_state, rtol=0, atol=0)
    torch.testing.assert_close(recorded.pooler_output, plain.pooler_output, rtol=0, atol=0)
    assert model.config._attn_implementation == implementation
    assert rec.layers == ["encoder.layers.0.self_attn", "encoder.layers.1.self_attn"]
    assert list(rec.skipped) == ["head.attention"] and "attention pooling" in rec.skipped["head.attention"]
    assert rec.geometry[0].image_grids == tuple(grids) and rec.geometry[0].num_prefix_tokens == 0
    expected = _expected(_siglip2_eager_maps(model, inputs), 0, grids)
    torch.testing.assert_close(rec.mad.double(), expected, **RECORD_TOL)


def test_siglip2_image_alone_equals_the_same_image_in_a_padded_batch():
    model, _ = _siglip2_vision("sdpa")
    with torch.no_grad(), vitmad.record(model) as rec:
        model(**_siglip2_inputs(SIGLIP2_SOURCES))
        batched = rec.mad
        for i, size in enumerate(SIGLIP2_SOURCES):
            model(**_siglip2_inputs([size]))
            torch.testing.assert_close(rec.mad[:, 0], batched[:, i], rtol=1e-5, atol=1e-5)


def test_siglip2_without_a_mask_its_padding_is_attended_but_has_no_position():
    model, _ = _siglip2_vision("sdpa")
    inputs = _siglip2_inputs(SIGLIP2_SOURCES[:2])
    inputs["pixel_attention_mask"] = None
    grids = [tuple(g) for g in inputs["spatial_shapes"].tolist()]
    maps = _siglip2_eager_maps(model, inputs)
    n = grids[1][0] * grids[1][1]
    assert n < 24 and float(maps[0][1, :, 0, n:].sum()) > 0.01
    with torch.no_grad(), vitmad.record(model) as rec:
        model(**inputs)
    torch.testing.assert_close(_per_layer(rec), _expected(maps, 0, grids), **RECORD_TOL)


def test_siglip2_refuses_a_mask_that_disagrees_with_spatial_shapes():
    model, _ = _siglip2_vision("sdpa")
    inputs = _siglip2_inputs(SIGLIP2_SOURCES[:2])
    inputs["pixel_attention_mask"] = torch.ones_like(inputs["pixel_attention_mask"])
    with pytest.raises(ValueError, match=r"Siglip2VisionModel.*image 1 of the batch has a 7x3 grid by "
                                         r"spatial_shapes and pixel_attention_mask"):
        with torch.no_grad(), vitmad.record(model):
            model(**inputs)


def test_siglip2_model_records_its_vision_tower_once_per_image_call():
    _, vision = _siglip2_vision("sdpa")
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=99,
                bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    model = transformers.Siglip2Model(transformers.Siglip2Config(vision_config=vision.to_dict(),
                                                                 text_config=text)).eval()
    inputs = _siglip2_inputs(SIGLIP2_SOURCES[:3])
    with torch.no_grad(), vitmad.record(model) as rec:
        model.get_image_features(**inputs)
        model.get_image_features(**_siglip2_inputs(SIGLIP2_SOURCES[3:]))
    assert len(rec.calls) == 2
    assert rec.calls[0].layers == ["vision_model.encoder.layers.0.self_attn", "vision_model.encoder.layers.1.self_attn"]
    assert list(rec.skipped) == ["vision_model.head.attention"]
    assert rec.calls[0].mad.shape == (2, 3, 2) and rec.mad.shape == (2, 1, 2)
    grids = [tuple(g) for g in inputs["spatial_shapes"].tolist()]
    expected = _expected(_siglip2_eager_maps(model.vision_model, inputs), 0, grids)
    torch.testing.assert_close(rec.calls[0].mad.double(), expected, **RECORD_TOL)


# transformers Gemma 4 vision tower --------------------------------------------------------------------------------

def _gemma4_position_ids(grid: tuple[int, int], slots: int) -> torch.Tensor:
    """Its processor's ``pixel_position_ids``: (x, y) of each patch row-major, then (-1, -1) for padding."""
    rows, cols = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
    ids = torch.stack([cols, rows], -1).reshape(-1, 2)
    return torch.cat([ids, torch.full((slots - ids.shape[0], 2), -1)])


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_gemma4_vision_tower_places_each_image_by_its_position_ids(implementation):
    modeling = pytest.importorskip("transformers.models.gemma4.modeling_gemma4")
    config = transformers.Gemma4VisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
        head_dim=16, pooling_kernel_size=2, patch_size=PATCH, position_embedding_size=64)
    torch.manual_seed(0)
    model = modeling.Gemma4VisionModel(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() > 1:
                parameter.normal_(0, 0.3)
    grids = [(4, 6), (4, 4)]
    inputs = {"pixel_values": torch.rand(2, 32, 3 * PATCH * PATCH),
              "pixel_position_ids": torch.stack([_gemma4_position_ids(g, 32) for g in grids])}
    model.set_attn_implementation(implementation)
    with torch.no_grad(), vitmad.record(model) as rec:
        model(**inputs)
    assert rec.geometry[0].image_grids == tuple(grids)
    model.set_attn_implementation("eager")
    maps, handles = [], [layer.self_attn.register_forward_hook(lambda m, a, k, out: maps.append(out[1]),
                                                              with_kwargs=True)
                         for layer in model.encoder.layers]
    with torch.no_grad():
        model(**inputs)
    for handle in handles:
        handle.remove()
    torch.testing.assert_close(rec.mad.double(), _expected(maps, 0, grids), **RECORD_TOL)


def test_padding_slots_are_no_prefix_map_rows():
    """Images of one grid padded to a longer sequence: the maps' rows are the class and register tokens alone,
    equal to their eager rows over the patches (was: the padding slots' rows too, [B, H, 3 + 5, T] here, and a
    SigLIP2 batch without any extra token got maps of its padding)."""
    model = _timm_model()
    inputs = _naflex_batch(_images([(32, 40)] * 3), slots=25)  # 4 x 5 patches and 5 padding slots each
    with torch.no_grad(), vitmad.record(model, stats=["prefix_maps"]) as rec:
        model(inputs)
    maps = _timm_eager_maps(model, inputs)
    assert rec.geometry[0].grid == (4, 5)
    for recorded, eager in zip(rec.prefix_maps, maps):
        assert recorded.shape == (3, 2, 3, 20)
        torch.testing.assert_close(recorded.double(), eager.double()[:, :, :3, 3:23], **RECORD_TOL)

    siglip, _ = _siglip2_vision("sdpa")
    inputs = _siglip2_inputs([(40, 40)] * 2, max_num_patches=24)
    assert inputs["pixel_attention_mask"].sum(-1).tolist() == [16, 16]  # 4 x 4 patches and 8 padding slots each
    with torch.no_grad(), vitmad.record(siglip, stats=["prefix_maps"]) as rec:
        siglip(**inputs)
    assert rec.prefix_maps == [None, None]


# Prefix maps and pooling-head maps over images with grids of their own -----------------------------------------

# Recorded float32 probabilities against float64 ones.
MAP_TOL = {"rtol": 1e-5, "atol": 1e-6}


def _check_image_rows(recorded: torch.Tensor, expected: torch.Tensor, grids, prefix: int) -> None:
    """``recorded`` ``[B, H, Q, T]`` holds each image's rows over its own ``h * w`` grid first, then NaN, and those
    are ``expected`` ``[B, H, Q, N]``'s columns after the ``prefix`` tokens without a position."""
    assert recorded.shape[-1] == max(h * w for h, w in grids)
    for i, (h, w) in enumerate(grids):
        n = h * w
        torch.testing.assert_close(recorded[i, ..., :n].double(), expected[i, ..., prefix:prefix + n].double(),
                                   **MAP_TOL)
        assert recorded[i, ..., n:].isnan().all()


@pytest.mark.parametrize("fused", [True, False], ids=["sdpa", "eager"])
def test_timm_naflex_prefix_maps_of_images_with_grids_of_their_own(fused):
    """Each image's class and register rows over its own grid, NaN past it (was: no maps at all once the images'
    padding differed, as the op's maps want the same tokens without a position in every matrix)."""
    model = sharpened(_timm_model())
    for module in timm_attention_modules(model).values():
        module.fused_attn = fused
    inputs = _naflex_batch(_images(SIZES), slots=20)
    grids = [(h // PATCH, w // PATCH) for h, w in SIZES]
    with torch.no_grad(), vitmad.record(model, stats=["mad", "prefix_maps"]) as rec:
        model(inputs)
    eager = _timm_eager_maps(model, inputs)
    for recorded, probabilities in zip(rec.prefix_maps, eager, strict=True):
        assert recorded.shape == (len(SIZES), 2, 3, 15)
        _check_image_rows(recorded, probabilities[:, :, :3], grids, 3)
    with torch.no_grad(), vitmad.record(model) as alone:
        model(inputs)
    assert torch.equal(alone.mad, rec.mad)


def _double_inputs(inputs: dict) -> dict:
    return {k: v.double() if v is not None and v.is_floating_point() else v for k, v in inputs.items()}


@pytest.mark.parametrize("fused", [True, False], ids=["sdpa", "eager"])
@pytest.mark.parametrize("include_prefix", [False, True], ids=["patches", "with-prefix"])
def test_timm_naflex_pooling_head_maps_follow_each_image_grid(include_prefix, fused):
    """The latent query's row over the tokens attn_pool pools: the patch slots (or the class and register tokens
    then the patch slots, with pool_include_prefix), the padding masked out by the model."""
    model = sharpened(_timm_model(pool_include_prefix=include_prefix))
    model.attn_pool.fused_attn = fused
    inputs = _naflex_batch(_images(SIZES), slots=20)
    grids = [(h // PATCH, w // PATCH) for h, w in SIZES]
    with torch.no_grad():
        plain = model(inputs)
        with vitmad.record(model, stats=["prefix_maps"]) as rec:
            assert torch.equal(model(inputs), plain)
    prefix = 3 if include_prefix else 0
    expected = pooling_rows(model, "attn_pool", lambda double: double(_double_inputs(inputs)))
    assert expected.shape == (len(SIZES), 2, 1, prefix + 20)
    for i, (h, w) in enumerate(grids):
        assert float(expected[i, ..., prefix + h * w:].abs().max()) == 0  # the model hides the padding
    maps = rec.class_attention_maps
    assert list(maps) == ["attn_pool"] and maps["attn_pool"].shape == (len(SIZES), 2, 1, 15)
    _check_image_rows(maps["attn_pool"], expected, grids, prefix)
    geometry = rec.calls[-1].class_geometry[0]
    assert geometry.grid is None and geometry.image_grids == tuple(grids) and geometry.stride == (PATCH, PATCH)
    assert geometry.num_prefix_tokens == prefix and geometry.attention == "attention pooling over global"


def test_timm_naflex_pooling_head_maps_of_a_standard_image_batch():
    model = sharpened(_timm_model())
    pixels = torch.randn(2, 3, 24, 40, generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), vitmad.record(model, stats=["prefix_maps"]) as rec:
        model(pixels)
    expected = pooling_rows(model, "attn_pool", lambda double: double(pixels.double()))
    assert rec.class_attention_maps["attn_pool"].shape == (2, 2, 1, 15)
    torch.testing.assert_close(rec.class_attention_maps["attn_pool"].double(), expected, **MAP_TOL)
    assert rec.calls[-1].class_geometry[0].grid == (3, 5)


@pytest.mark.parametrize("masked", [True, False], ids=["mask", "no-mask"])
def test_siglip2_pooling_head_maps_follow_each_image_grid(masked):
    """The probe's row over each image's grid; without a pixel_attention_mask the head attends the padding too,
    which has no position (NaN), and the image's columns keep their probabilities."""
    model, _ = _siglip2_vision("sdpa")
    sharpened(model)
    inputs = _siglip2_inputs(SIGLIP2_SOURCES)
    if not masked:
        inputs["pixel_attention_mask"] = None
    grids = [tuple(g) for g in inputs["spatial_shapes"].tolist()]
    with torch.no_grad():
        plain = model(**inputs).pooler_output
        with vitmad.record(model, stats=["mad", "prefix_maps"]) as rec:
            assert torch.equal(model(**inputs).pooler_output, plain)
    expected = pooling_rows(model, "head.attention", lambda double: double(**_double_inputs(inputs)))
    assert expected.shape == (len(grids), 2, 1, 24)
    padding = expected[3, ..., grids[3][0] * grids[3][1]:]
    assert float(padding.abs().max()) == 0 if masked else float(padding.sum()) > 0.01
    assert list(rec.class_attention_maps) == ["head.attention"]
    _check_image_rows(rec.class_attention_maps["head.attention"], expected, grids, 0)
    assert rec.calls[-1].class_geometry[0].image_grids == tuple(grids)
    assert rec.prefix_maps == [None, None]  # no class or register token in its blocks
