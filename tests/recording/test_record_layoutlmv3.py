"""vitmad.record on LayoutLMv3 (transformers ``LayoutLMv3Model``): one encoder over the text tokens, then the image's
CLS and its row-major patch grid (``torch.cat([text embeddings, forward_image(pixels)])``).

Its patch embedding is the model's own, so the whole model is the image tower and every layer is recorded, unlike
the layers of a multimodal encoder behind a vision tower (skipped unless their layout is given): the text tokens and
the CLS have no position on the image. MAD is over the patches alone; the statistics beside it read the text as
tokens without a position, as docs/definition.md defines them: the prefix mass is the attention on the text and the
CLS, and the prefix maps have a row per text token, then the CLS's. The reference is the model's own eager
probabilities (its modeling file's ``eager_attention_forward``, with its relative and spatial position biases),
placed by geometry written here: patch ``(r, c)`` at ``((r + 0.5) * 8, (c + 0.5) * 8)`` pixels.
"""

from __future__ import annotations

import pytest
import torch

import vitmad
from conftest import eager_attention_calls, sharpened

transformers = pytest.importorskip("transformers")
from transformers.models.layoutlmv3 import modeling_layoutlmv3  # noqa: E402

TOL = {"rtol": 1e-5, "atol": 1e-4}
GRID, PATCH, TEXT = (4, 4), 8, 5


def _model() -> torch.nn.Module:
    config = transformers.LayoutLMv3Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                           intermediate_size=64, input_size=32, patch_size=PATCH, vocab_size=100,
                                           max_2d_position_embeddings=128, coordinate_size=6, shape_size=4)
    return sharpened(transformers.LayoutLMv3Model(config))


def _reference(probabilities: torch.Tensor, extra: int) -> dict[str, torch.Tensor]:
    rows, cols = torch.meshgrid(torch.arange(GRID[0]), torch.arange(GRID[1]), indexing="ij")
    centres = (torch.stack([rows, cols], -1).reshape(-1, 2).double() + 0.5) * PATCH
    patches = probabilities[:, :, extra:]  # the patch queries' whole rows
    return {"mad": (patches[..., extra:] * torch.cdist(centres, centres)).sum(-1).mean(-1),
            "prefix_mass": patches[..., :extra].sum(-1).mean(-1),
            "prefix_maps": probabilities[:, :, :extra, extra:]}


@pytest.mark.parametrize("with_text", [True, False], ids=["text_and_image", "image_alone"])
def test_text_tokens_are_tokens_without_a_position(with_text):
    model = _model()
    torch.manual_seed(1)
    pixels = torch.rand(2, 3, 32, 32)
    inputs = dict(pixel_values=pixels)
    if with_text:
        inputs.update(input_ids=torch.randint(3, 100, (2, TEXT)),
                      bbox=torch.sort(torch.randint(0, 100, (2, TEXT, 4)), dim=-1).values)
    extra = (TEXT if with_text else 0) + 1
    expected = [_reference(p, extra) for _, p in eager_attention_calls(modeling_layoutlmv3, model, **inputs)]
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        plain = model(**inputs).last_hidden_state
        with vitmad.record(model, stats=["prefix_mass", "prefix_maps"]) as rec:
            recorded = model(**inputs).last_hidden_state
    assert torch.equal(plain, recorded)
    assert rec.layers == ["encoder.layer.0.attention.self", "encoder.layer.1.attention.self"] and rec.skipped == {}
    assert rec.geometry[0].num_prefix_tokens == extra
    torch.testing.assert_close(rec.mad.double(), torch.stack([e["mad"] for e in expected]), **TOL)
    torch.testing.assert_close(rec.stats["prefix_mass"].double(), torch.stack([e["prefix_mass"] for e in expected]),
                               rtol=1e-5, atol=1e-6)
    for maps, e in zip(rec.prefix_maps, expected):
        assert maps.shape == (2, 2, extra, GRID[0] * GRID[1])
        torch.testing.assert_close(maps.double(), e["prefix_maps"], rtol=1e-5, atol=1e-6)
