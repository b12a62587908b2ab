"""vitmad.record on packed native-resolution towers whose per-image chunks begin with tokens without a position:
RADIO's packed forward (``RadioModel`` with ``image_grid_hw``, also as Nemotron-H-Omni's ``vision_model``),
LLaVA-OneVision-1.5's and Inkling2's vision towers (a class token per image; LLaVA-OneVision-1.5 one per temporal
slice of a video too, each slice placed as an image).

Each tower gets three images of different grids packed into one sequence; without flash attention each layer
attends once per image over its chunk. The reference is the model's own eager attention probabilities (float32,
captured call by call from its modeling file's ``eager_attention_forward``, in float64), placed by geometry written
here from reading the modeling files: RADIO's chunk ``i`` is its ``S`` summary tokens, then image ``i``'s patches
row-major (``_embed_packed_patches``); LLaVA-OneVision-1.5's and Inkling2's is one class token, then the patches in
``2 x 2`` merge blocks (conftest ``qwen_token_chunks``: blocks row-major, patches row-major inside a block). Patch
``(r, c)`` sits at ``((r + 0.5) p, (c + 0.5) p)`` pixels of its own image. Per image, averaged over its own patch
queries: MAD over its patch keys, the entropy of the whole row, the prefix mass (the attention on its own chunk's
tokens without a position, the only ones its call holds); the prefix maps are those tokens' rows over the image's
own grid, row-major, NaN past it (docs/definition.md, "Beside the distance").
"""

from __future__ import annotations

import math

import pytest
import torch

import vitmad
from conftest import eager_attention_calls, qwen_token_chunks, register_flash_like, sharpened

transformers = pytest.importorskip("transformers")
from transformers.models.inkling2 import modeling_inkling2  # noqa: E402
from transformers.models.llava_onevision1_5 import modeling_llava_onevision1_5  # noqa: E402
from transformers.models.nemotron_h_omni import modeling_nemotron_h_omni  # noqa: E402
from transformers.models.radio import modeling_radio  # noqa: E402

# Recorded float32 values against float64 on the eager float32 probabilities; MADs here are 4 to 40 px.
TOL = {"rtol": 1e-5, "atol": 1e-4}
MAP_TOL = {"rtol": 1e-5, "atol": 1e-6}
STATS = ["mad", "entropy", "prefix_mass", "prefix_maps"]
RADIO_PATCH, SUMMARY = 8, 3  # RADIO: num_cls_tokens 2 + num_registers 1
RADIO_GRIDS = [(3, 5), (4, 4), (2, 6)]
# Nemotron-H-Omni pixel-shuffles each image's features by 2: even grids.
NEMOTRON_GRIDS = [(4, 6), (4, 4), (2, 6)]
MERGE_PATCH, MERGE = 4, 2  # LLaVA-OneVision-1.5 and Inkling2: 4 px patches, 2 x 2 merge blocks
MERGE_GRIDS = [(4, 6), (4, 4), (2, 6)]


# Geometry written here ------------------------------------------------------------------------------------------

def _row_major(h: int, w: int) -> list[tuple[int, int]]:
    return [(r, c) for r in range(h) for c in range(w)]


def _merge_blocks(h: int, w: int) -> list[tuple[int, int]]:
    return qwen_token_chunks((h, w), MERGE, None)[0]


def _chunk_reference(probabilities: torch.Tensor, prefix: int, cells: list[tuple[int, int]], grid: tuple[int, int],
                     patch: int) -> dict[str, torch.Tensor]:
    """One image's values from its own call's probabilities ``[1, H, prefix + h * w, prefix + h * w]``, the chunk's
    tokens being ``prefix`` tokens without a position then the patches at ``cells`` (sequence order): per head
    ``[H]`` MAD, entropy and prefix mass averaged over the patch queries, per query MAD ``[H, h * w]`` and the prefix
    maps ``[H, prefix, h * w]``, both row-major on the image's grid."""
    h, w = grid
    assert probabilities.shape[-1] == prefix + h * w
    a = probabilities[0]  # [H, n, n]
    centres = torch.tensor([[(r + 0.5) * patch, (c + 0.5) * patch] for r, c in cells], dtype=torch.float64)
    rows = a[:, prefix:]  # the patch queries' whole rows
    per_query = (rows[:, :, prefix:] * torch.cdist(centres, centres)).sum(-1)  # [H, h * w] in sequence order
    logs = torch.where(rows > 0, rows.log(), torch.zeros_like(rows))
    order = torch.tensor([r * w + c for r, c in cells])  # sequence index -> row-major index
    tokens = torch.full_like(per_query, float("nan"))
    tokens[:, order] = per_query
    maps = torch.full((a.shape[0], prefix, h * w), float("nan"), dtype=torch.float64)
    maps[:, :, order] = a[:, :prefix, prefix:]
    assert not tokens.isnan().any() and not maps.isnan().any()
    return {"mad": per_query.mean(-1), "entropy": -(rows * logs).sum(-1).mean(-1),
            "prefix_mass": rows[:, :, :prefix].sum(-1).mean(-1), "tokens": tokens, "prefix_maps": maps}


def _references(calls: list, attention_modules: list, prefix: int, grids, cells_of, patch: int) -> list[list[dict]]:
    """Per layer, per image: the chunk reference of the eager calls (one per image, layer after layer)."""
    assert [module for module, _ in calls] == [m for m in attention_modules for _ in grids]
    return [[_chunk_reference(calls[layer * len(grids) + image][1], prefix, cells_of(*grid), grid, patch)
             for image, grid in enumerate(grids)] for layer in range(len(attention_modules))]


def _check(rec, references: list[list[dict]], grids, prefix: int) -> None:
    """A recording (``reduction="mean"``, ``stats=STATS``) against the references."""
    assert len(rec.layers) == len(references)
    for stat in ("mad", "entropy", "prefix_mass"):
        expected = torch.stack([torch.stack([image[stat] for image in layer]) for layer in references])
        torch.testing.assert_close(rec.stats[stat].double(), expected, **TOL, msg=lambda m, s=stat: f"{s}: {m}")
    longest = max(h * w for h, w in grids)
    for maps, geometry, layer in zip(rec.prefix_maps, rec.geometry, references):
        assert geometry.grid is None and geometry.image_grids == tuple(grids)
        assert geometry.num_prefix_tokens == prefix and geometry.attention == "global per image"
        assert maps.shape == (len(grids), geometry.heads, prefix, longest)
        for image, ((h, w), expected) in enumerate(zip(grids, layer)):
            torch.testing.assert_close(maps[image, :, :, :h * w].double(), expected["prefix_maps"], **MAP_TOL)
            assert maps[image, :, :, h * w:].isnan().all()


def _check_tokens(rec, references: list[list[dict]], grids) -> None:
    """A recording with ``reduction="none"``: image ``i``'s per-query MAD row-major on its grid, NaN after."""
    for values, layer in zip(rec.per_layer, references):
        for image, ((h, w), expected) in enumerate(zip(grids, layer)):
            torch.testing.assert_close(values[image, :, :h * w].double(), expected["tokens"], **TOL)
            assert values[image, :, h * w:].isnan().all()


def _far_from_uniform(references: list[list[dict]], prefix: int, grids) -> None:
    """Attention far from uniform (entropy ln N), so that a token placed wrongly would show."""
    for layer in references:
        for (h, w), image in zip(grids, layer):
            assert float(image["entropy"].max()) < 0.8 * math.log(prefix + h * w)


def _record(model, inputs: tuple, kwargs: dict, output) -> tuple:
    """The model's output as it is, and two recordings (the statistics, and per query) whose outputs must be it,
    bit for bit."""
    with torch.no_grad():
        plain = model(*inputs, **kwargs)
        with vitmad.record(model, stats=STATS) as rec:
            recorded = model(*inputs, **kwargs)
        with vitmad.record(model, reduction="none") as per_query:
            again = model(*inputs, **kwargs)
    for field in output:
        assert torch.equal(getattr(plain, field), getattr(recorded, field)), field
        assert torch.equal(getattr(plain, field), getattr(again, field)), field
    return rec, per_query


# RADIO ----------------------------------------------------------------------------------------------------------

def _radio(**config) -> torch.nn.Module:
    config = transformers.RadioConfig(**{**dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                patch_size=RADIO_PATCH, max_img_size=64, num_cls_tokens=2,
                                                num_registers=1), **config})
    torch.manual_seed(0)
    return sharpened(transformers.RadioModel(config))


def _radio_packed(grids, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    grid_hw = torch.tensor(grids)
    return torch.randn(int(grid_hw.prod(-1).sum()), 3 * RADIO_PATCH * RADIO_PATCH), grid_hw


def _radio_layers(model) -> list:
    return [layer.attention for layer in model.encoder.layer]


RADIO_OUTPUT = ("last_hidden_state", "summary", "features")


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_radio_packed_images_match_eager_attention(attn_implementation):
    model = _radio()
    patches, grid_hw = _radio_packed(RADIO_GRIDS)
    calls = eager_attention_calls(modeling_radio, model, patches, image_grid_hw=grid_hw)
    references = _references(calls, _radio_layers(model), SUMMARY, RADIO_GRIDS, _row_major, RADIO_PATCH)
    _far_from_uniform(references, SUMMARY, RADIO_GRIDS)
    model.set_attn_implementation(attn_implementation)
    rec, per_query = _record(model, (patches,), {"image_grid_hw": grid_hw}, RADIO_OUTPUT)
    assert rec.layers == ["encoder.layer.0.attention", "encoder.layer.1.attention"] and rec.skipped == {}
    _check(rec, references, RADIO_GRIDS, SUMMARY)
    _check_tokens(per_query, references, RADIO_GRIDS)


def test_radio_packed_image_alone_or_among_others_is_the_dense_image():
    """An image's values do not depend on the images packed beside it (each call is its own chunk), and one image
    through image_grid_hw (one call, no cu_seqlens, placed by the family) gives what its dense forward gives."""
    model = _radio()
    model.set_attn_implementation("sdpa")
    h, w = RADIO_GRIDS[0]
    pixels = torch.rand(1, 3, h * RADIO_PATCH, w * RADIO_PATCH)
    patches = modeling_radio.RadioPatchEmbeddings._image_to_patches(model.embeddings, pixels)[0]
    others, _ = _radio_packed(RADIO_GRIDS[1:])
    with torch.no_grad():
        with vitmad.record(model, stats=STATS) as dense:
            model(pixels)
        with vitmad.record(model, stats=STATS) as alone:
            model(patches, image_grid_hw=torch.tensor([[h, w]]))
        with vitmad.record(model, stats=STATS) as packed:
            model(torch.cat([patches, others]), image_grid_hw=torch.tensor(RADIO_GRIDS))
    assert alone.geometry[0].grid == (h, w) and alone.geometry[0].num_prefix_tokens == SUMMARY
    for stat in ("mad", "entropy", "prefix_mass"):
        torch.testing.assert_close(alone.stats[stat], dense.stats[stat], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(packed.stats[stat][:, :1], dense.stats[stat], rtol=1e-5, atol=1e-5)
    for one, among, reference in zip(alone.prefix_maps, packed.prefix_maps, dense.prefix_maps):
        torch.testing.assert_close(one, reference, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(among[:1, :, :, :h * w], reference, rtol=1e-5, atol=1e-6)


def test_radio_packed_forward_of_several_images_refuses_a_grid_given_by_hand():
    """The one grid of patch= / grid= describes no packing of several images of their own grids; for one image it
    still wins over the family, as for the dense forward."""
    model = _radio()
    model.set_attn_implementation("sdpa")
    patches, grid_hw = _radio_packed(RADIO_GRIDS)
    with torch.no_grad(), vitmad.record(model, patch=RADIO_PATCH, grid=list(RADIO_GRIDS[0])) as rec, \
            pytest.raises(ValueError, match=r"encoder\.layer\.0\.attention \(RadioAttention\) of RadioModel: RADIO "
                                            r"\(RadioModel\) was given image_grid_hw with 3 images of their own "
                                            r"grids \[\[3, 5\], \[4, 4\], \[2, 6\]\].*leave them unset"):
        model(patches, image_grid_hw=grid_hw)
    assert all(call.layers == [] for call in rec.calls)
    h, w = RADIO_GRIDS[0]
    one = patches[:h * w]
    with torch.no_grad():
        with vitmad.record(model, patch=4, grid=[h, w]) as by_hand:
            model(one, image_grid_hw=grid_hw[:1])
    assert by_hand.geometry[0].stride == (4.0, 4.0)  # the user's patch, though the model's is 8


def test_radio_packed_chunks_that_are_not_the_images_are_refused():
    """cu_seqlens that do not cut the sequence at each image's summary tokens (a tower changed under vitmad) are
    refused, not placed on the images' grids."""
    model = _radio()
    model.set_attn_implementation("sdpa")
    patches, grid_hw = _radio_packed(RADIO_GRIDS)

    def shifted(module, args, kwargs):
        kwargs["cu_seqlens"] = kwargs["cu_seqlens"] + torch.tensor([0, 1, 0, 0], dtype=torch.int32)
        return args, kwargs

    handle = model.encoder.layer[0].register_forward_pre_hook(shifted, with_kwargs=True)
    try:
        with torch.no_grad(), vitmad.record(model) as rec, \
                pytest.raises(ValueError, match=r"encoder\.layer\.0\.attention .*received cu_seqlens \[0, 19, 37, "
                                                r"52\], but the images of image_grid_hw .* make the chunks \[0, 18, "
                                                r"37, 52\]"):
            model(patches, image_grid_hw=grid_hw)
    finally:
        handle.remove()
    assert all(call.layers == [] for call in rec.calls)


def test_radio_packed_flash_attention_over_several_images_is_refused():
    """Flash attention attends the packed images in one variable-length call; vitmad's capture does not receive its
    chunks, so the call is refused. Simulated on the CPU by an attention function registered under a flash name
    that computes the same block-diagonal attention with SDPA."""
    name = register_flash_like("flash_attention_vitmad_test")
    model = _radio()
    model.config._attn_implementation = name
    patches, grid_hw = _radio_packed(RADIO_GRIDS)
    with torch.no_grad(), vitmad.record(model) as rec, \
            pytest.raises(ValueError, match=r"encoder\.layer\.0\.attention .*one call \[1, 2, 52, 52\] over the "
                                            r"whole packed sequence of 3 images \(flash attention"):
        model(patches, image_grid_hw=grid_hw)
    assert all(call.layers == [] for call in rec.calls)


# Nemotron-H-Omni ------------------------------------------------------------------------------------------------

def _nemotron() -> torch.nn.Module:
    config = transformers.NemotronH_Omni_Reasoning_V3_Config(
        vision_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, patch_size=RADIO_PATCH,
                           max_img_size=64, num_cls_tokens=2, num_registers=1, video_temporal_patch_size=2),
        text_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                         vocab_size=100, intermediate_size=64, mamba_num_heads=4, mamba_head_dim=8, ssm_state_size=8,
                         n_groups=1, head_dim=16, layers_block_type=["mamba", "attention"]),
        vision_hidden_size=32, projector_hidden_size=32, image_token_id=5)
    torch.manual_seed(0)
    model = modeling_nemotron_h_omni.NemotronH_Omni_Reasoning_V3(config)
    model.vision_model.config.torch_dtype = torch.float32  # what get_image_features casts the patches to
    return sharpened(model)


VISION_LAYERS = ["vision_model.encoder.layer.0.attention", "vision_model.encoder.layer.1.attention"]


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_nemotron_h_omni_records_its_radio_tower_inside_the_whole_model(attn_implementation):
    """The whole model's forward on a prompt with its image tokens: the RADIO tower's packed images are recorded
    per image; the language model's layers (causal, over text and image tokens) are not the tower's."""
    model = _nemotron()
    patches, grid_hw = _radio_packed(NEMOTRON_GRIDS)
    image_tokens = int(grid_hw.prod(-1).sum()) // 4  # one per 2 x 2 patches after the pixel shuffle
    input_ids = torch.tensor([[1, 2] + [5] * image_tokens + [3]])
    calls = eager_attention_calls(modeling_radio, model.vision_model, patches, image_grid_hw=grid_hw)
    references = _references(calls, _radio_layers(model.vision_model), SUMMARY, NEMOTRON_GRIDS, _row_major,
                             RADIO_PATCH)
    _far_from_uniform(references, SUMMARY, NEMOTRON_GRIDS)
    model.set_attn_implementation(attn_implementation)
    inputs = {"input_ids": input_ids, "pixel_values": patches, "image_grid_hw": grid_hw}
    rec, per_query = _record(model, (), inputs, ("logits",))
    assert rec.layers == VISION_LAYERS
    _check(rec, references, NEMOTRON_GRIDS, SUMMARY)
    _check_tokens(per_query, references, NEMOTRON_GRIDS)
    with torch.no_grad(), vitmad.record(model, stats=STATS) as features:
        model.get_image_features(patches, grid_hw)
    assert features.layers == VISION_LAYERS
    _check(features, references, NEMOTRON_GRIDS, SUMMARY)


def test_nemotron_h_omni_video_tubelets_are_placed_each_on_its_spatial_grid():
    """Its video path: each tubelet of 2 frames (stacked on the channels) a batch entry of the RADIO tower, cut into
    the frame's row-major grid after the summary tokens and attending within itself, so placed in space alone."""
    model = _nemotron()
    h, w = 4, 6
    torch.manual_seed(4)
    tubelets = torch.randn(1, 2, 2 * 3, h * RADIO_PATCH, w * RADIO_PATCH)  # 1 video of 2 tubelets, normalized
    calls = eager_attention_calls(modeling_radio, model.vision_model, tubelets.flatten(0, 1))
    assert [module for module, _ in calls] == _radio_layers(model.vision_model)
    references = [[_chunk_reference(probabilities[t:t + 1], SUMMARY, _row_major(h, w), (h, w), RADIO_PATCH)
                   for t in range(2)] for _, probabilities in calls]
    _far_from_uniform(references, SUMMARY, [(h, w)] * 2)
    with torch.no_grad():
        plain = model.get_video_features(tubelets)
        with vitmad.record(model, stats=STATS) as rec:
            recorded = model.get_video_features(tubelets)
    for field in ("pooler_output", "last_hidden_state"):
        assert all(torch.equal(a, b) for a, b in zip(getattr(plain, field), getattr(recorded, field), strict=True))
    assert rec.layers == VISION_LAYERS and rec.skipped == {}
    for stat in ("mad", "entropy", "prefix_mass"):
        expected = torch.stack([torch.stack([tubelet[stat] for tubelet in layer]) for layer in references])
        torch.testing.assert_close(rec.stats[stat].double(), expected, **TOL, msg=lambda m, s=stat: f"{s}: {m}")
    for maps, geometry, layer in zip(rec.prefix_maps, rec.geometry, references):
        assert (geometry.grid, geometry.num_prefix_tokens, geometry.attention) == ((h, w), SUMMARY, "global")
        torch.testing.assert_close(maps.double(), torch.stack([tubelet["prefix_maps"] for tubelet in layer]),
                                   **MAP_TOL)


def test_nemotron_h_omni_partial_layout_refusal_names_its_radio_tower():
    """A partial layout given by hand cannot be completed without a patch-embedding convolution; the refusal names
    the tower, not the whole model, as RADIO."""
    model = _nemotron()
    with pytest.raises(ValueError, match=r"RADIO \(vision_model, a RadioModel\) cuts its patches with a reshape"):
        with torch.no_grad(), vitmad.record(model, patch=RADIO_PATCH):
            model.vision_model(torch.rand(1, 3, 4 * RADIO_PATCH, 6 * RADIO_PATCH))


# LLaVA-OneVision-1.5 and Inkling2: a class token, then the merge-block order -------------------------------------

def _llava() -> torch.nn.Module:
    config = transformers.LlavaOnevision15VisionConfig(depth=2, hidden_size=32, intermediate_size=64, num_heads=2,
                                                       patch_size=MERGE_PATCH, spatial_merge_size=MERGE,
                                                       out_hidden_size=32)
    torch.manual_seed(0)  # the weights sharpened leaves (embeddings, class token) drawn the same in any test order
    return sharpened(modeling_llava_onevision1_5.LlavaOnevision15VisionModel(config))


def _inkling() -> torch.nn.Module:
    config = transformers.Inkling2VisionConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64,
                                               num_attention_heads=2, patch_size=MERGE_PATCH,
                                               spatial_merge_size=MERGE, posemb_grid_size=8, projection_hidden_dim=32,
                                               text_hidden_size=32)
    torch.manual_seed(0)
    return sharpened(modeling_inkling2.Inkling2VisionModel(config))


def _merge_inputs(name: str) -> tuple[tuple, dict]:
    torch.manual_seed(1)
    patches = sum(h * w for h, w in MERGE_GRIDS)
    if name == "llava_onevision1_5":  # flattened patches in merge order, grid_thw in patches
        return (torch.randn(patches, 3 * MERGE_PATCH * MERGE_PATCH),), {
            "grid_thw": torch.tensor([[1, h, w] for h, w in MERGE_GRIDS])}
    # Inkling2: one row per merge block (blocks row-major), image_grid_thw in merge blocks.
    side = MERGE * MERGE_PATCH
    return (torch.rand(patches // MERGE ** 2, side, side, 3) * 2 - 1,), {
        "image_grid_thw": torch.tensor([[1, h // MERGE, w // MERGE] for h, w in MERGE_GRIDS])}


MERGE_TOWERS = {"llava_onevision1_5": (_llava, modeling_llava_onevision1_5, lambda m: [b.attn for b in m.blocks]),
                "inkling2": (_inkling, modeling_inkling2, lambda m: [layer.self_attn for layer in m.layers])}


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("name", list(MERGE_TOWERS))
def test_class_token_merge_order_towers_match_eager_attention(name, attn_implementation):
    build, modeling, attention_modules = MERGE_TOWERS[name]
    model = build()
    args, kwargs = _merge_inputs(name)
    calls = eager_attention_calls(modeling, model, *args, **kwargs)
    references = _references(calls, attention_modules(model), 1, MERGE_GRIDS, _merge_blocks, MERGE_PATCH)
    _far_from_uniform(references, 1, MERGE_GRIDS)
    model.set_attn_implementation(attn_implementation)
    rec, per_query = _record(model, args, kwargs, ("last_hidden_state", "pooler_output"))
    assert rec.skipped == {} and len(rec.layers) == 2
    _check(rec, references, MERGE_GRIDS, 1)
    _check_tokens(per_query, references, MERGE_GRIDS)


# A video of 3 temporal slices of 3 x 5 merge blocks between two images: (t, h, w) patches per grid_thw row.
LLAVA_VIDEO_ROWS = [(1, 4, 6), (3, 6, 10), (1, 2, 6)]
LLAVA_VIDEO_ENTRIES = [(h, w) for t, h, w in LLAVA_VIDEO_ROWS for _ in range(t)]  # each slice in time order


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_llava_onevision1_5_video_slices_match_eager_attention(attn_implementation):
    """LLaVA-OneVision-1.5 prepends a class token to each temporal slice of a video (get_vision_frame_lengths
    repeats h * w per slice; cu_seqlens shifted by one per slice), each slice its own chunk in an image's layout:
    each slice is placed as an image, its class token its prefix."""
    model = _llava()
    grid_thw = torch.tensor(LLAVA_VIDEO_ROWS)
    torch.manual_seed(2)
    patches = torch.randn(sum(t * h * w for t, h, w in LLAVA_VIDEO_ROWS), 3 * MERGE_PATCH * MERGE_PATCH)
    calls = eager_attention_calls(modeling_llava_onevision1_5, model, patches, grid_thw=grid_thw)
    # one call per slice (or image) and block, each of one class token then the slice's patches in merge blocks
    references = _references(calls, [b.attn for b in model.blocks], 1, LLAVA_VIDEO_ENTRIES, _merge_blocks,
                             MERGE_PATCH)
    _far_from_uniform(references, 1, LLAVA_VIDEO_ENTRIES)
    model.set_attn_implementation(attn_implementation)
    rec, per_query = _record(model, (patches,), {"grid_thw": grid_thw}, ("last_hidden_state", "pooler_output"))
    assert rec.skipped == {} and len(rec.layers) == 2
    _check(rec, references, LLAVA_VIDEO_ENTRIES, 1)
    _check_tokens(per_query, references, LLAVA_VIDEO_ENTRIES)


def test_inkling2_video_refusal_quotes_the_merge_blocks_given():
    """Inkling2's image_grid_thw counts merge blocks: the refusal quotes what the user passed, in those units."""
    model = _inkling()
    side = MERGE * MERGE_PATCH
    grid_thw = torch.tensor([[2, 2, 1]])
    blocks = torch.rand(4, side, side, 3) * 2 - 1  # t * h * w merge blocks, one row each
    with torch.no_grad():
        model(blocks, image_grid_thw=grid_thw)  # the model runs it
        with vitmad.record(model) as rec, pytest.raises(
                ValueError, match=r"image_grid_thw \(t, h, w in merge blocks: \[\(2, 2, 1\)\]\) holds a video "
                                  r"\(t > 1\), and vitmad gives Inkling2VisionModel no temporal placement"):
            model(blocks, image_grid_thw=grid_thw)
    assert all(call.layers == [] for call in rec.calls)
