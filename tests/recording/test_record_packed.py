"""vitmad.record on packed native-resolution vision towers: Qwen2-VL, Qwen2.5-VL (windows), Qwen3-VL, GLM-4.1V /
GLM-4.5V / GLM-OCR (Qwen2-VL's token order) and Pixtral.

Tiny random-weight towers get three images of different sizes packed in one call. The reference is each model's
own eager attention probabilities, captured call by call from its modeling file's ``eager_attention_forward``,
placed by geometry written here with explicit loops (not the code under test): Qwen's tokens in spatial-merge
block order, Qwen2.5-VL's sequence in windows of merge blocks (edge windows smaller, one call per window; its
full-attention blocks attend per image over the same window-ordered sequence, which the tower reorders once
before its first block), Pixtral's
images row-major one after the other under a block-diagonal mask; each patch at ``(row + 0.5, col + 0.5) * patch``
pixels of its own image; each query's MAD over the keys of its own image (or window), in float64. A video
(``grid_thw`` row with ``t > 1``) packed between images: each temporal slice is a chunk of its own, in an image's
merge-block order (windows per slice), so the reference places each slice as an image of its own.
"""

from __future__ import annotations

import pytest
import torch

import vitmad
from conftest import check_packed_values, eager_attention_calls, qwen_token_chunks, record_packed_forward, sharpened

transformers = pytest.importorskip("transformers")
from transformers.models.glm4v import modeling_glm4v  # noqa: E402
from transformers.models.glm4v_moe import modeling_glm4v_moe  # noqa: E402
from transformers.models.glm_ocr import modeling_glm_ocr  # noqa: E402
from transformers.models.pixtral import modeling_pixtral  # noqa: E402
from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl  # noqa: E402
from transformers.models.qwen2_vl import modeling_qwen2_vl  # noqa: E402
from transformers.models.qwen3_vl import modeling_qwen3_vl  # noqa: E402

# Recorded float32 MAD (mad_qk on the sdpa path's q/k, or the fused op) against float64 on the eager float32
# probabilities; MADs here are 4 to 40 px.
TOL = {"rtol": 1e-5, "atol": 1e-4}
PATCH, MERGE, WINDOW_PX = 4, 2, 16  # Qwen: 4 px patches, 2x2 merge blocks, windows of 16 px = 2x2 merge blocks
# (h, w) patches per image: edge windows of 1 block row / column, an image whose 4x4 blocks fill whole windows
# (the model pads it by a full window of empty windows), and a one-block-high strip of three windows.
QWEN_GRIDS = [(6, 4), (8, 8), (2, 10)]
PIXTRAL_PATCH = 8
PIXTRAL_SIZES = [(52, 36), (32, 64), (24, 40)]  # pixels; 52 x 36 is floored by the model to 6 x 4 patches


def _qwen(name: str, attn_implementation: str) -> torch.nn.Module:
    common = dict(depth=2, num_heads=2, patch_size=PATCH, spatial_merge_size=MERGE, temporal_patch_size=2,
                  attn_implementation=attn_implementation)
    if name == "qwen2_vl":
        config = transformers.Qwen2VLConfig(vision_config=dict(embed_dim=32, hidden_size=32, mlp_ratio=2, **common))
        return sharpened(modeling_qwen2_vl.Qwen2VisionTransformerPretrainedModel(config.vision_config))
    if name == "qwen2_5_vl":
        config = transformers.Qwen2_5_VLConfig(vision_config=dict(
            hidden_size=32, out_hidden_size=32, intermediate_size=64, window_size=WINDOW_PX,
            fullatt_block_indexes=[1], **common))
        return sharpened(modeling_qwen2_5_vl.Qwen2_5_VisionTransformerPretrainedModel(config.vision_config))
    if name.startswith("glm"):
        glm = dict(hidden_size=32, intermediate_size=64, out_hidden_size=32, image_size=16, **common)
        config_cls, model_cls = {
            "glm4v": (transformers.Glm4vVisionConfig, modeling_glm4v.Glm4vVisionModel),
            "glm4v_moe": (transformers.Glm4vMoeVisionConfig, modeling_glm4v_moe.Glm4vMoeVisionModel),
            "glm_ocr": (transformers.GlmOcrVisionConfig, modeling_glm_ocr.GlmOcrVisionModel),
        }[name]
        return sharpened(model_cls(config_cls(**glm)))
    config = transformers.Qwen3VLConfig(vision_config=dict(
        hidden_size=32, intermediate_size=64, out_hidden_size=32, num_position_embeddings=16,
        deepstack_visual_indexes=[], **common))
    return sharpened(modeling_qwen3_vl.Qwen3VLVisionModel(config.vision_config))


_MODELING = {"qwen2_vl": modeling_qwen2_vl, "qwen2_5_vl": modeling_qwen2_5_vl, "qwen3_vl": modeling_qwen3_vl,
             "glm4v": modeling_glm4v, "glm4v_moe": modeling_glm4v_moe, "glm_ocr": modeling_glm_ocr,
             "pixtral": modeling_pixtral}


def _eager_probabilities(name: str, model: torch.nn.Module, *inputs, **kwargs) -> list:
    """``[(attention module, probabilities [1, H, n, n])]`` of every eager attention call of one forward."""
    return eager_attention_calls(_MODELING[name], model, *inputs, **kwargs)


# Geometry written in the tests (the chunks: conftest.qwen_token_chunks) ------------------------------------------

def _expected(chunks: list[tuple[torch.Tensor, int, list[tuple[int, int]]]], grids, patch: int) -> list:
    """Per image, ``[H, h * w]`` float64 per-token MAD, row-major on its grid.

    Args:
        chunks: per chunk, (the call's probabilities ``[1, H, N, N]``, the chunk's offset in the call, its tokens as
            (image, row, col) in sequence order); a query's keys are the tokens of its own chunk.
    """
    heads = chunks[0][0].shape[1]
    expected = [torch.full((heads, h * w), float("nan"), dtype=torch.float64) for h, w in grids]
    for probabilities, offset, tokens in chunks:
        n = len(tokens)
        block = probabilities[0, :, offset:offset + n, offset:offset + n]
        centres = torch.tensor([[(r + 0.5) * patch, (c + 0.5) * patch] for _, r, c in tokens], dtype=torch.float64)
        distances = torch.cdist(centres, centres)
        per_query = (block * distances).sum(-1)  # [H, n]
        for q, (image, row, col) in enumerate(tokens):
            expected[image][:, row * grids[image][1] + col] = per_query[:, q]
    assert all(not e.isnan().any() for e in expected), "the reference geometry misses a token"
    return expected


def _qwen_inputs(grids):
    grid_thw = torch.tensor([[1, h, w] for h, w in grids])
    torch.manual_seed(1)
    patches = torch.randn(sum(h * w for h, w in grids), 3 * 2 * PATCH * PATCH)
    return patches, grid_thw


# Qwen ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("name", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "glm4v", "glm4v_moe", "glm_ocr"])
def test_qwen_packed_images_match_eager_attention(name, attn_implementation):
    model = _qwen(name, "eager")
    patches, grid_thw = _qwen_inputs(QWEN_GRIDS)
    calls = _eager_probabilities(name, model, patches, grid_thw=grid_thw)

    # Qwen2.5-VL: block 0 attends in windows, block 1 (fullatt_block_indexes) per image, both over the window
    # order; the others per image in merge-block order.
    windowed = [name == "qwen2_5_vl", False]
    expected_per_layer, used = [], 0
    for layer, attention in enumerate(a for a in (model.blocks[0].attn, model.blocks[1].attn)):
        layer_chunks = []
        for image, grid in enumerate(QWEN_GRIDS):
            chunks = qwen_token_chunks(grid, MERGE, WINDOW_PX // MERGE // PATCH if name == "qwen2_5_vl" else None)
            if not windowed[layer]:  # one chunk per image, in the sequence's order
                chunks = [[cell for chunk in chunks for cell in chunk]]
            for chunk in chunks:
                module, probabilities = calls[used]
                assert module is attention and probabilities.shape[-1] == len(chunk)
                layer_chunks.append((probabilities, 0, [(image, r, c) for r, c in chunk]))
                used += 1
        expected_per_layer.append(_expected(layer_chunks, QWEN_GRIDS, PATCH))
    assert used == len(calls)

    model.set_attn_implementation(attn_implementation)
    rec, rec_mean = record_packed_forward(model, patches, grid_thw=grid_thw)
    kinds = ["window 4x4 patches" if w else "global per image" for w in windowed]
    check_packed_values(rec, expected_per_layer, QWEN_GRIDS, kinds, TOL)
    means = torch.stack([torch.stack([e.mean(-1) for e in layer]) for layer in expected_per_layer])
    torch.testing.assert_close(rec_mean.mad.double(), means, **TOL)  # [L, n_images, H]


@pytest.mark.parametrize("name", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_image_alone_equals_packed(name):
    model = _qwen(name, "sdpa")
    patches, grid_thw = _qwen_inputs(QWEN_GRIDS)
    with torch.no_grad(), vitmad.record(model, reduction="none") as rec:
        model(patches, grid_thw=grid_thw)
        packed = rec.per_layer
        start = 0
        for image, (h, w) in enumerate(QWEN_GRIDS):
            model(patches[start:start + h * w], grid_thw=grid_thw[image:image + 1])
            start += h * w
            assert rec.geometry[0].grid == (h, w) and rec.geometry[0].image_grids is None
            for layer, alone in enumerate(rec.per_layer):
                assert alone.shape[0] == 1
                torch.testing.assert_close(alone[0], packed[layer][image, :, :h * w], **TOL)


# A video packed between two images: (t, h, w) patches per grid_thw row. The video's 3 x 5 merge blocks make
# windows of one block row / column at its edges; each of its 3 temporal slices is a chunk of its own.
VIDEO_ROWS = [(1, 4, 6), (3, 6, 10), (1, 2, 4)]
# The fold's entries: each image, and each temporal slice of the video in time order, where its row is.
VIDEO_ENTRIES = [(h, w) for t, h, w in VIDEO_ROWS for _ in range(t)]
VIDEO_STATS = ["mad", "entropy", "self_mass"]


def _video_inputs():
    torch.manual_seed(3)  # every slice of the video its own patches: a slice placed at another's entry would show
    patches = torch.randn(sum(t * h * w for t, h, w in VIDEO_ROWS), 3 * 2 * PATCH * PATCH)
    return patches, torch.tensor(VIDEO_ROWS)


def _video_reference(name: str, model: torch.nn.Module, patches, grid_thw) -> list[dict[str, list[torch.Tensor]]]:
    """Per layer, per statistic, per entry ``[H, h * w]`` float64 on the entry's grid row-major, from the tower's
    eager probabilities: the transformers modeling files give each temporal slice of a video its own cu_seqlens
    chunk (repeat_interleave(h * w, t)), its tokens in an image's merge-block order, and Qwen2.5-VL's window index
    cuts each slice into windows as an image (vision_utils.get_vision_window_index, per grid_t)."""
    calls = _eager_probabilities(name, model, patches, grid_thw=grid_thw)
    window = WINDOW_PX // MERGE // PATCH if name == "qwen2_5_vl" else None
    layers, used = [], 0
    for layer, block in enumerate(model.blocks):
        windowed = name == "qwen2_5_vl" and layer not in model.fullatt_block_indexes
        stats = {stat: [torch.full((2, h * w), float("nan"), dtype=torch.float64) for h, w in VIDEO_ENTRIES]
                 for stat in VIDEO_STATS}
        for entry, (h, w) in enumerate(VIDEO_ENTRIES):
            chunks = qwen_token_chunks((h, w), MERGE, window)
            if not windowed:
                chunks = [[cell for chunk in chunks for cell in chunk]]
            for chunk in chunks:
                module, probabilities = calls[used]
                used += 1
                assert module is block.attn and probabilities.shape[-1] == len(chunk)
                rows = probabilities[0]  # [H, n, n]
                centres = torch.tensor([[(r + 0.5) * PATCH, (c + 0.5) * PATCH] for r, c in chunk],
                                       dtype=torch.float64)
                values = {"mad": (rows * torch.cdist(centres, centres)).sum(-1),
                          "entropy": -torch.special.xlogy(rows, rows).sum(-1),
                          "self_mass": rows.diagonal(dim1=-2, dim2=-1)}
                for q, (r, c) in enumerate(chunk):
                    for stat in VIDEO_STATS:
                        stats[stat][entry][:, r * w + c] = values[stat][:, q]
        assert all(not e.isnan().any() for values in stats.values() for e in values)
        layers.append(stats)
    assert used == len(calls)
    return layers


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("name", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "glm_ocr"])
def test_qwen_video_slices_are_placed_as_images(name, attn_implementation):
    model = _qwen(name, "eager")
    patches, grid_thw = _video_inputs()
    reference = _video_reference(name, model, patches, grid_thw)
    tokens = max(h * w for h, w in VIDEO_ENTRIES)

    model.set_attn_implementation(attn_implementation)
    with torch.no_grad():
        plain = model(patches, grid_thw=grid_thw).last_hidden_state
        with vitmad.record(model, stats=VIDEO_STATS, reduction="none") as rec:
            recorded = model(patches, grid_thw=grid_thw).last_hidden_state
        with vitmad.record(model, stats=VIDEO_STATS) as rec_mean:
            model(patches, grid_thw=grid_thw)
    assert torch.equal(plain, recorded)
    windowed = [name == "qwen2_5_vl" and layer not in model.fullatt_block_indexes for layer in range(2)]
    for layer, geometry in enumerate(rec.geometry):
        assert geometry.grid is None and geometry.image_grids == tuple(VIDEO_ENTRIES)
        assert geometry.attention.startswith("window 4x4 patches" if windowed[layer] else "global per image")
    for stat in VIDEO_STATS:
        values, means = rec.stats[stat], rec_mean.stats[stat]
        assert values.shape == (2, len(VIDEO_ENTRIES), 2, tokens) and means.shape == (2, len(VIDEO_ENTRIES), 2)
        for layer, expected in enumerate(reference):
            for entry, (h, w) in enumerate(VIDEO_ENTRIES):
                torch.testing.assert_close(values[layer, entry, :, :h * w].double(), expected[stat][entry], **TOL)
                assert values[layer, entry, :, h * w:].isnan().all()
                torch.testing.assert_close(means[layer, entry].double(), expected[stat][entry].mean(-1), **TOL)


@pytest.mark.parametrize("name", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_video_slice_alone_is_the_image(name):
    """A temporal slice attends only within itself: recorded from a video, it is the image of its patches."""
    model = _qwen(name, "sdpa")
    patches, grid_thw = _video_inputs()
    t, h, w = VIDEO_ROWS[1]
    start = VIDEO_ROWS[0][1] * VIDEO_ROWS[0][2]
    with torch.no_grad(), vitmad.record(model, reduction="none") as rec:
        model(patches, grid_thw=grid_thw)
        packed = rec.per_layer
        for frame in range(t):
            model(patches[start + frame * h * w:start + (frame + 1) * h * w], grid_thw=torch.tensor([[1, h, w]]))
            for layer, alone in enumerate(rec.per_layer):
                torch.testing.assert_close(alone[0], packed[layer][1 + frame, :, :h * w], **TOL)


@pytest.mark.parametrize("name", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_vision_language_model_places_a_video_as_its_tower_does(name):
    """The whole model's get_video_features (pixel_values_videos, video_grid_thw) records its tower's video forward:
    the same entries, one per temporal slice, as the tower alone given the same rows."""
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1, vocab_size=100, bos_token_id=0, eos_token_id=1,
                rope_parameters={"rope_type": "default", "mrope_section": [2, 2, 4], "rope_theta": 1e4})
    vision = dict(depth=2, num_heads=2, patch_size=PATCH, spatial_merge_size=MERGE, temporal_patch_size=2)
    if name == "qwen2_vl":
        config = transformers.Qwen2VLConfig(text_config=text, attn_implementation="sdpa", vision_config=dict(
            embed_dim=32, hidden_size=32, mlp_ratio=2, **vision))
        model = sharpened(transformers.Qwen2VLModel(config))
    else:
        config = transformers.Qwen2_5_VLConfig(text_config=text, attn_implementation="sdpa", vision_config=dict(
            hidden_size=32, out_hidden_size=32, intermediate_size=64, window_size=WINDOW_PX,
            fullatt_block_indexes=[1], **vision))
        model = sharpened(transformers.Qwen2_5_VLModel(config))
    patches, grid_thw = _video_inputs()
    with torch.no_grad():
        plain = model.get_video_features(patches, video_grid_thw=grid_thw).pooler_output
        with vitmad.record(model, reduction="none") as rec:
            recorded = model.get_video_features(patches, video_grid_thw=grid_thw).pooler_output
        with vitmad.record(model.visual, reduction="none") as alone:
            model.visual(patches, grid_thw=grid_thw)
    assert all(torch.equal(p, r) for p, r in zip(plain, recorded, strict=True))
    assert rec.layers == ["visual.blocks.0.attn", "visual.blocks.1.attn"]
    assert [g.image_grids for g in rec.geometry] == [tuple(VIDEO_ENTRIES)] * 2
    for whole, own in zip(rec.per_layer, alone.per_layer, strict=True):
        torch.testing.assert_close(whole, own, equal_nan=True)


def test_qwen_video_chunks_that_are_not_per_slice_are_refused():
    """A cu_seqlens that joins a video's slices (attention across frames) is not the placement's: refused."""
    model = _qwen("qwen2_vl", "sdpa")
    patches = torch.randn(2 * 4 * 4, 3 * 2 * PATCH * PATCH)
    joined = torch.tensor([0, 2 * 4 * 4], dtype=torch.int32)
    with vitmad.record(model) as rec, pytest.raises(
            ValueError, match=r"blocks\.0\.attn.*received cu_seqlens \[0, 32\].*are \[0, 16, 32\]"):
        model(patches, grid_thw=torch.tensor([[2, 4, 4]]), cu_seqlens=joined)
    assert rec.calls == []


def test_qwen_vision_language_model_records_its_vision_tower_only():
    config = transformers.Qwen2VLConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=100, bos_token_id=0, eos_token_id=1,
                         rope_parameters={"rope_type": "default", "mrope_section": [2, 2, 4], "rope_theta": 1e4}),
        vision_config=dict(depth=2, embed_dim=32, hidden_size=32, num_heads=2, patch_size=PATCH,
                           spatial_merge_size=MERGE, temporal_patch_size=2, mlp_ratio=2),
        attn_implementation="sdpa")
    model = sharpened(transformers.Qwen2VLModel(config))
    patches, grid_thw = _qwen_inputs(QWEN_GRIDS)
    with torch.no_grad(), vitmad.record(model) as rec:
        model.get_image_features(patches, image_grid_thw=grid_thw)
    assert rec.layers == ["visual.blocks.0.attn", "visual.blocks.1.attn"]
    # The default tower is the one that embeds the image (its Conv3d patch embedding): the text model's
    # attention is not among the candidates at all.
    assert rec.skipped == {}
    assert rec.mad.shape == (2, 3, 2)


# Pixtral ---------------------------------------------------------------------------------------------------------

def _pixtral(attn_implementation: str) -> torch.nn.Module:
    config = transformers.PixtralVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                              num_attention_heads=2, image_size=64, patch_size=PIXTRAL_PATCH,
                                              attn_implementation=attn_implementation)
    return sharpened(modeling_pixtral.PixtralVisionModel(config))


def _pixtral_inputs():
    torch.manual_seed(2)
    height, width = max(h for h, _ in PIXTRAL_SIZES), max(w for _, w in PIXTRAL_SIZES)
    pixels = torch.zeros(len(PIXTRAL_SIZES), 3, height, width)
    for image, (h, w) in enumerate(PIXTRAL_SIZES):
        pixels[image, :, :h, :w] = torch.randn(3, h, w)
    return pixels, torch.tensor(PIXTRAL_SIZES)


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_pixtral_packed_images_match_eager_attention(attn_implementation):
    model = _pixtral("eager")
    pixels, sizes = _pixtral_inputs()
    grids = [(h // PIXTRAL_PATCH, w // PIXTRAL_PATCH) for h, w in PIXTRAL_SIZES]
    calls = _eager_probabilities("pixtral", model, pixels, image_sizes=sizes)
    assert len(calls) == 2
    expected_per_layer = []
    for probabilities in (p for _, p in calls):
        chunks, offset = [], 0
        for image, (h, w) in enumerate(grids):
            tokens = [(image, r, c) for r in range(h) for c in range(w)]
            # The block-diagonal mask: nothing of an image's attention reaches another image.
            assert probabilities[0, :, offset:offset + h * w].sum(-1).sub(1).abs().max() < 1e-6
            chunks.append((probabilities, offset, tokens))
            offset += h * w
        assert offset == probabilities.shape[-1]
        expected_per_layer.append(_expected(chunks, grids, PIXTRAL_PATCH))

    model.set_attn_implementation(attn_implementation)
    rec, _ = record_packed_forward(model, pixels, image_sizes=sizes)
    check_packed_values(rec, expected_per_layer, grids, ["global per image"] * 2, TOL)


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_pixtral_mask_joining_images_is_refused(monkeypatch, attn_implementation):
    """QA 269: Pixtral's block-diagonal mask replaced by one joining the images recorded in silence, another image's
    keys placed on the query's image (49.7 px for 19.8 px). Refused, naming the images joined; one joining only
    images 1 and 2 too, and a boolean mask alike."""
    model = _pixtral(attn_implementation)
    pixels, sizes = _pixtral_inputs()
    own = modeling_pixtral.generate_block_attention_mask

    def joined(patch_counts, tensor):
        mask = own(patch_counts, tensor)
        first = patch_counts[0]
        mask[..., first:, first:] = 0  # images 1 and 2 attend to each other
        return mask

    monkeypatch.setattr(modeling_pixtral, "generate_block_attention_mask", joined)
    with pytest.raises(ValueError, match=r"PixtralAttention\) of PixtralVisionModel: its attention_mask lets the "
                                         r"tokens of image 1 attend to those of image 2 \(Pixtral's own mask is "
                                         r"block-diagonal over the packed images\)"):
        with torch.no_grad(), vitmad.record(model):
            model(pixels, image_sizes=sizes)
    monkeypatch.setattr(modeling_pixtral, "generate_block_attention_mask", lambda counts, tensor: torch.ones(
        1, 1, tensor.shape[1], tensor.shape[1], dtype=torch.bool))
    with pytest.raises(ValueError, match=r"lets the tokens of image 0 attend to those of image 1"):
        with torch.no_grad(), vitmad.record(model):
            model(pixels, image_sizes=sizes)


def test_pixtral_image_alone_equals_packed():
    model = _pixtral("sdpa")
    pixels, sizes = _pixtral_inputs()
    with torch.no_grad(), vitmad.record(model) as rec:
        model(pixels, image_sizes=sizes)
        packed = rec.mad  # [L, n_images, H]: each image's mean over its own tokens
        assert packed.shape == (2, 3, 2)
        for image, (h, w) in enumerate(PIXTRAL_SIZES):
            model(pixels[image:image + 1, :, :h, :w], image_sizes=torch.tensor([[h, w]]))
            assert rec.geometry[0].grid == (h // PIXTRAL_PATCH, w // PIXTRAL_PATCH)
            torch.testing.assert_close(rec.mad[:, 0], packed[:, image], **TOL)
