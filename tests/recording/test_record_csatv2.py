"""vitmad.record on timm's CSATv2: transformer blocks on the maps of a block-DCT stem's stages, and the blocks'
"spatial" attention, which runs across the batch's images and is skipped.

References: each ``TransformerBlock``'s own eager attention (the input of its attention dropout, ``fused_attn``
off), placed by the geometry written here: the stem makes one token per 8 x 8 pixel block, each later stage
halves the map with a 2 x 2 stride-2 convolution, a ``downsample=True`` block attends over the ``MaxPool2d(3, 2,
1)`` of its map.
"""

from __future__ import annotations

from unittest import mock

import pytest
import torch

import vitmad
from vitmad.ops.reference import mad_positions_reference

timm = pytest.importorskip("timm")

from test_record_multiscale import dropout_maps, record  # noqa: E402

pytestmark = pytest.mark.skipif("csatv2" not in timm.list_models("csatv2*"), reason="timm without CSATv2")

TOL = {"rtol": 1e-5, "atol": 1e-4}  # pixels; float32 attention against a float64 reference


def cells(rows: int, cols: int, stride: float) -> torch.Tensor:
    """[rows * cols, 2] pixel centres of a row-major grid of ``stride``-pixel cells."""
    axis = [(torch.arange(n, dtype=torch.float64) + 0.5) * stride for n in (rows, cols)]
    return torch.cartesian_prod(*axis)


def block_maps(model, pixels) -> list[torch.Tensor]:
    """Each TransformerBlock's attention probabilities in an eager forward, in the order the blocks run."""
    return dropout_maps(model, pixels, lambda m: type(m).__name__ == "Attention")


def check(rec, maps, expected):
    """Every block's recorded MAD against its eager attention over the grid ``expected[block] = (rows, cols,
    stride)``."""
    assert rec.layers == [f"{block}.attn" for block in expected]
    assert len(maps) == len(expected)
    for (rows, cols, stride), recorded, geometry, attn in zip(expected.values(), rec.per_layer, rec.geometry, maps):
        assert attn.shape[-1] == rows * cols
        torch.testing.assert_close(recorded.double(), mad_positions_reference(attn, cells(rows, cols, stride)), **TOL)
        assert (geometry.grid, geometry.stride) == ((rows, cols), (stride, stride))


@pytest.mark.parametrize("size", [(128, 160), (96, 64)])
def test_csatv2_transformer_blocks_on_their_stage_maps(size):
    torch.manual_seed(0)
    model = timm.create_model("csatv2", pretrained=False, depths=(1, 1, 2, 2), transformer_depths=(0, 0, 1, 1)).eval()
    pixels = torch.randn(2, 3, *size)
    rec = record(model, pixels)
    # 8-px stem blocks, then stride 2 per stage (floor): stage 3's map at 32 px, stage 4's at 64 px.
    h, w = size[0] // 8, size[1] // 8
    expected = {"stages.2.2": (h // 4, w // 4, 32.0), "stages.3.2": (h // 8, w // 8, 64.0)}
    check(rec, block_maps(model, pixels), expected)


def test_csatv2_downsampling_block_attends_over_its_pooled_map():
    from timm.models.csatv2 import TransformerBlock

    torch.manual_seed(1)
    model = timm.create_model("csatv2", pretrained=False, depths=(1, 1, 3, 2), transformer_depths=(0, 0, 2, 1)).eval()
    # The model never builds one; its constructor does: a stride-2 max pool before the attention and on the shortcut.
    model.stages[2][3] = TransformerBlock(inp=168, oup=168, downsample=True).eval()
    pixels = torch.randn(1, 3, 256, 192)
    rec = record(model, pixels)
    # Stage 3's map 8 x 6 at 32 px; the downsampling block's 4 x 3 at 64 px; stage 4 (its conv halves again) 2 x 1
    # (3 // 2) at 128 px.
    expected = {"stages.2.2": (8, 6, 32.0), "stages.2.3": (4, 3, 64.0), "stages.3.2": (2, 1, 128.0)}
    check(rec, block_maps(model, pixels), expected)


def test_csatv2_spatial_attention_runs_across_images_and_is_skipped():
    torch.manual_seed(2)
    model = timm.create_model("csatv2", pretrained=False, depths=(1, 1, 2, 2), transformer_depths=(0, 0, 1, 1)).eval()
    pixels = torch.randn(3, 3, 64, 64)
    shapes, original = [], torch.Tensor.softmax

    def spy(self, *args, **kwargs):
        shapes.append(tuple(self.shape))
        return original(self, *args, **kwargs)

    with torch.no_grad(), mock.patch.object(torch.Tensor, "softmax", spy):
        model(pixels)
    # The premise of the skip: every explicit softmax of the model is [B, B], over the batch's images.
    assert shapes and set(shapes) == {(3, 3)}
    rec = record(model, pixels)
    spatial = [n for n, m in model.named_modules() if type(m).__name__ == "SpatialTransformerBlock"]
    assert len(spatial) == 4 and sorted(rec.skipped) == sorted(spatial)
    assert all("across the images of the batch" in reason for reason in rec.skipped.values())
    assert rec.layers == ["stages.2.2.attn", "stages.3.2.attn"]


def test_csatv2_image_not_a_whole_number_of_blocks_fails_in_the_model_not_in_vitmad():
    model = timm.create_model("csatv2", pretrained=False, depths=(1, 1, 2, 2), transformer_depths=(0, 0, 1, 1)).eval()
    with torch.no_grad(), vitmad.record(model), pytest.raises(RuntimeError, match="shape"):
        model(torch.randn(1, 3, 100, 64))
