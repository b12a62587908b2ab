"""vitmad.record on towers that pad each image and mask the padding patches (Idefics2, Idefics3, SmolVLM).

The reference is the tower's own eager attention (``output_attentions=True``) placed by geometry written here:
the tokens are the padded ``gh x gw`` grid row-major, patch ``(r, c)`` at ``(8 r + 4, 8 c + 4)`` pixels; the
patches outside ``patch_attention_mask`` have no position, so an image's MAD is the mean, over its own patches,
of each one's attention-weighted distance to its own patches (the model gives the padding keys probability 0).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

import vitmad  # noqa: E402

RECORD_TOL = {"rtol": 1e-5, "atol": 1e-4}
PATCH = 8


def _tower(family: str):
    config_cls, module = {
        "idefics2": ("Idefics2VisionConfig", "idefics2"),
        "idefics3": ("Idefics3VisionConfig", "idefics3"),
        "smolvlm": ("SmolVLMVisionConfig", "smolvlm"),
    }[family]
    config = getattr(transformers, config_cls)(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
        patch_size=PATCH, initializer_range=0.3)
    tower_cls = {"idefics2": "Idefics2VisionTransformer", "idefics3": "Idefics3VisionTransformer",
                 "smolvlm": "SmolVLMVisionTransformer"}[family]
    modeling = getattr(transformers.models, module)
    torch.manual_seed(0)
    return getattr(getattr(modeling, f"modeling_{module}"), tower_cls)(config).eval()


def _padded_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Two images padded to 40 x 48 px (5 x 6 patches): one whole, one of 3 x 4 patches (24 x 32 px)."""
    gen = torch.Generator().manual_seed(4)
    pixels = torch.randn(2, 3, 40, 48, generator=gen)
    pixels[1, :, 24:] = 0
    pixels[1, :, :, 32:] = 0
    mask = torch.ones(2, 5, 6, dtype=torch.bool)
    mask[1, 3:] = False
    mask[1, :, 4:] = False
    return pixels, mask


def _reference(attentions, mask: torch.Tensor) -> np.ndarray:
    rows, cols = np.divmod(np.arange(30), 6)
    centres = (np.stack([rows, cols], -1) + 0.5) * PATCH
    d = np.sqrt(((centres[:, None] - centres[None]) ** 2).sum(-1))
    flat = mask.reshape(2, -1).numpy()
    values = []
    for probabilities in attentions:
        a = probabilities.double().numpy()
        values.append(np.stack([
            (a[b][:, :, flat[b]] * d[:, flat[b]]).sum(-1)[:, flat[b]].mean(-1) for b in range(2)]))
    return np.stack(values)


@pytest.mark.parametrize("family", ["idefics2", "idefics3", "smolvlm"])
@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_padding_patches_have_no_position(family, attn_implementation):
    tower = _tower(family)
    tower.set_attn_implementation(attn_implementation)
    pixels, mask = _padded_batch()
    with torch.no_grad(), vitmad.record(tower) as rec:
        tower(pixel_values=pixels, patch_attention_mask=mask)
    tower.set_attn_implementation("eager")
    with torch.no_grad():
        out = tower(pixel_values=pixels, patch_attention_mask=mask, output_attentions=True)
    expected = _reference(out.attentions, mask)
    np.testing.assert_allclose(rec.mad.double().numpy(), expected, **RECORD_TOL)
    assert rec.geometry[0].grid == (5, 6) and rec.geometry[0].num_prefix_tokens == 0
    # Counting the padding queries too (the plain layout) gives another value for the padded image.
    assert not np.allclose(rec.mad[:, 1].double().numpy(), _reference(out.attentions, torch.ones_like(mask))[:, 1],
                           rtol=1e-2)


def test_per_token_values_are_nan_on_the_padding():
    tower = _tower("idefics3")
    pixels, mask = _padded_batch()
    with torch.no_grad(), vitmad.record(tower, reduction="none") as rec:
        tower(pixel_values=pixels, patch_attention_mask=mask)
    values = rec.per_layer[0]  # [B, H, 30]
    flat = mask.reshape(2, -1)
    assert bool(values[1][:, ~flat[1]].isnan().all()) and bool(values[0].isfinite().all())
    assert bool(values[1][:, flat[1]].isfinite().all())


def test_without_a_mask_every_patch_counts():
    tower = _tower("smolvlm")
    tower.set_attn_implementation("eager")
    pixels, mask = _padded_batch()
    with torch.no_grad(), vitmad.record(tower) as rec:
        out = tower(pixel_values=pixels, output_attentions=True)
    expected = _reference(out.attentions, torch.ones_like(mask))
    np.testing.assert_allclose(rec.mad.double().numpy(), expected, **RECORD_TOL)
