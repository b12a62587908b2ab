"""vitmad.record on ViLT: text tokens, then the image CLS, then image patches in a random order.

The reference is the model's own eager attention (``output_attentions=True``, ViLT's only implementation) placed
by geometry written here: ``ViltEmbeddings.visual_embed`` draws the patches with ``torch.multinomial``, so the
same seed before a second, direct call of it gives the same selection; its ``patch_index`` (row, column) puts
patch ``j`` of image ``b`` at ``(16 r + 8, 16 c + 8)`` pixels, and its mask says which selected patches are
padding (``pixel_mask`` 0: no position, as the text tokens and the CLS). An image's MAD is the mean over its
valid selected patches, each query's sum over the valid patches' keys (no renormalisation).
"""

from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

import vitmad  # noqa: E402

RECORD_TOL = {"rtol": 1e-5, "atol": 1e-4}  # atol in pixels; MADs here are 5 to 40 px
PATCH = 16
TEXT = 5


def _vilt(model_cls=None, **overrides):
    config = transformers.ViltConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=64,
        patch_size=PATCH, vocab_size=100, max_position_embeddings=40, num_labels=3,
        # Large weights: peaked attention, so a patch placed at a wrong cell changes the MAD visibly.
        initializer_range=0.4, **overrides,
    )
    torch.manual_seed(0)
    return (model_cls or transformers.ViltModel)(config).eval()


def _inputs(height: int, width: int, pad_columns: int = 0) -> dict:
    gen = torch.Generator().manual_seed(3)
    attention_mask = torch.ones(2, TEXT, dtype=torch.long)
    attention_mask[1, -2:] = 0  # padded text: masked keys
    pixel_mask = torch.ones(2, height, width, dtype=torch.long)
    if pad_columns:
        pixel_mask[1, :, width - pad_columns:] = 0  # the second image is narrower, padded on the right
    return {"input_ids": torch.randint(1, 100, (2, TEXT), generator=gen), "attention_mask": attention_mask,
            "pixel_values": torch.randn(2, 3, height, width, generator=gen), "pixel_mask": pixel_mask}


def _reference(attentions, embeddings, inputs, seed: int, max_image_length) -> np.ndarray:
    """``[L, B, H]`` float64 MAD from the eager probabilities, the patches placed by a second visual_embed."""
    torch.manual_seed(seed)
    with torch.no_grad():
        _, masks, (patch_index, _) = embeddings.visual_embed(inputs["pixel_values"], inputs["pixel_mask"],
                                                            max_image_length=max_image_length)
    index = patch_index.numpy().astype(np.float64)
    valid = masks[:, 1:].numpy() != 0
    values = []
    for probabilities in attentions:
        a = probabilities.double().numpy()[:, :, TEXT + 1:, TEXT + 1:]  # [B, H, L, L]: patch queries and keys
        per_image = []
        for b in range(a.shape[0]):
            cells = (index[b] + 0.5) * PATCH
            d = np.sqrt(((cells[:, None, :] - cells[None, :, :]) ** 2).sum(-1))
            m = (a[b][:, :, valid[b]] * d[None][:, :, valid[b]]).sum(-1)  # [H, L]: over valid keys
            per_image.append(m[:, valid[b]].mean(-1))
        values.append(np.stack(per_image))
    return np.stack(values)


@pytest.mark.parametrize("size, pad_columns, max_image_length", [
    ((64, 48), 0, -1),    # every patch, shuffled; a non-square 4 x 3 grid
    ((64, 64), 32, -1),   # the second image's right half is padding: padding patches drawn for it
    ((48, 64), 0, 7),     # 7 of the 12 patches kept per image
])
def test_vilt_matches_eager_attention(size, pad_columns, max_image_length):
    model = _vilt(max_image_length=max_image_length)
    inputs = _inputs(*size, pad_columns)
    torch.manual_seed(11)
    with torch.no_grad(), vitmad.record(model) as rec:
        out = model(**inputs, output_attentions=True)
    assert rec.layers == ["encoder.layer.0.attention.attention", "encoder.layer.1.attention.attention"]
    assert rec.skipped == {}
    expected = _reference(out.attentions, model.embeddings, inputs, 11, max_image_length)
    np.testing.assert_allclose(rec.mad.double().numpy(), expected, **RECORD_TOL)
    grid = (size[0] // PATCH, size[1] // PATCH)
    assert rec.geometry[0].grid == grid and rec.geometry[0].stride == (16.0, 16.0)
    # A layout that ignored the shuffle (text and CLS first, then the patches row-major) measures otherwise.
    assert not np.allclose(rec.mad.double().numpy(), expected[:, ::-1], rtol=1e-3)


def test_vilt_per_token_values_fold_onto_the_grid():
    """reduction="none": each valid patch's value at its own cell, the cells not attended NaN."""
    model = _vilt(max_image_length=7)
    inputs = _inputs(48, 64)
    torch.manual_seed(5)
    with torch.no_grad(), vitmad.record(model, reduction="none") as rec:
        out = model(**inputs, output_attentions=True)
    torch.manual_seed(5)
    with torch.no_grad():
        _, _, (patch_index, _) = model.embeddings.visual_embed(inputs["pixel_values"], inputs["pixel_mask"],
                                                              max_image_length=7)
    folded = rec.per_layer[0]  # [B, H, 3 * 4]
    cells = (patch_index[..., 0] * 4 + patch_index[..., 1]).numpy()
    a = out.attentions[0].double().numpy()[:, :, TEXT + 1:, TEXT + 1:]
    for b in range(2):
        centres = (patch_index[b].double().numpy() + 0.5) * PATCH
        d = np.sqrt(((centres[:, None] - centres[None]) ** 2).sum(-1))
        expected = (a[b] * d[None]).sum(-1)  # [H, 7]
        np.testing.assert_allclose(folded[b][:, cells[b]].double().numpy(), expected, **RECORD_TOL)
        absent = np.setdiff1d(np.arange(12), cells[b])
        assert absent.size == 5 and bool(folded[b][:, absent].isnan().all())


def test_vilt_task_model_and_statistics():
    model = _vilt(transformers.ViltForQuestionAnswering)
    inputs = _inputs(64, 48)
    torch.manual_seed(2)
    with torch.no_grad(), vitmad.record(model, stats=("mad", "entropy", "prefix_mass")) as rec:
        out = model(**inputs, output_attentions=True)
    assert rec.layers[0] == "vilt.encoder.layer.0.attention.attention"
    expected = _reference(out.attentions, model.vilt.embeddings, inputs, 2, -1)
    np.testing.assert_allclose(rec.mad.double().numpy(), expected, **RECORD_TOL)
    # The mass of a patch query on the text tokens and the CLS (keys without a position), over its valid patches.
    a = out.attentions[1].double().numpy()
    mass = a[:, :, TEXT + 1:, :TEXT + 1].sum(-1).mean(-1)
    np.testing.assert_allclose(rec.stats["prefix_mass"][1].double().numpy(), mass, rtol=1e-5, atol=1e-6)


def test_vilt_given_image_embeds_is_refused():
    """image_embeds run no visual_embed: the tokens have no known cells, and the selection of an earlier call
    must not place them."""
    model = _vilt()
    inputs = _inputs(64, 64)
    with torch.no_grad():
        image_embeds = model.embeddings.patch_embeddings(inputs["pixel_values"]).flatten(2).transpose(1, 2)
    given = {**inputs, "pixel_values": None, "image_embeds": image_embeds,
             "pixel_mask": torch.ones(2, 16, dtype=torch.long)}
    with torch.no_grad(), vitmad.record(model) as rec:
        model(**inputs)
        with pytest.raises(ValueError, match="given image_embeds.*pass pixel_values"):
            model(**given)
    assert rec.mad.shape == (2, 2, 2)


def test_vilt_wrapper_is_for_the_recording_only():
    """The class's visual_embed is itself again after the block; a copy made inside the block is not recorded
    (and can be pickled); another ViLT instance runs unchanged."""
    cls = transformers.models.vilt.modeling_vilt.ViltEmbeddings
    original = cls.__dict__["visual_embed"]
    model, other = _vilt(), _vilt()
    inputs = _inputs(64, 48)
    with torch.no_grad(), vitmad.record(model) as rec:
        assert cls.__dict__["visual_embed"] is not original
        clone = pickle.loads(pickle.dumps(copy.deepcopy(model)))
        clone(**inputs)
        other(**inputs)
        assert len(rec.calls) == 0
        model(**inputs)
    assert len(rec.calls) == 1 and rec.mad.shape == (2, 2, 2)
    assert cls.__dict__["visual_embed"] is original
