"""vitmad.record on Meta's original Segment Anything package (``segment_anything``): ``ImageEncoderViT`` alone and
inside a ``Sam`` model (also through ``SamPredictor`` and ``SamAutomaticMaskGenerator``).

From the package's source (``modeling/image_encoder.py``): ``PatchEmbed`` is a convolution, kernel = stride = patch,
no padding, so the map is ``floor(H / patch) x floor(W / patch)`` cells of ``patch`` px, permuted to ``[B, H, W,
C]``. A windowed ``Block`` calls ``window_partition``: ``F.pad`` adds zero rows at the bottom and columns at the right
up to a multiple of the window, ``view(B, Hp / w, w, Wp / w, w, C).permute(0, 1, 3, 2, 4, 5)`` lists the windows
row-major per image, tokens row-major within a window; a global block (``global_attn_indexes``, window 0) attends
over the whole map. ``Attention`` reshapes its qkv to ``(3, B * heads, H * W, -1)``: the softmax's first dim is
image, then window, then head, and nothing masks the padding. So a padding slot is a key at its cell past the image
edge (the distance counts it) and no query. The reference below is that softmax's own output (``Tensor.softmax``,
spied), placed by this geometry, in float64.

The absolute position embedding fixes the map at ``img_size / patch``; with ``use_abs_pos=False`` the encoder takes
any image, and a non-square one whose sides the patch does not divide (52 x 75 px, patch 8: a 6 x 9 map, the last 4
and 3 pixels dropped) is padded to 8 x 12 by windows of 4.
"""

from __future__ import annotations

import math
from functools import partial

import numpy
import pytest
import torch

import vitmad
from conftest import sam_random_tables, tensor_softmax_outputs

segment_anything = pytest.importorskip("segment_anything")
from segment_anything import SamAutomaticMaskGenerator, SamPredictor  # noqa: E402
from segment_anything.modeling import (  # noqa: E402
    ImageEncoderViT,
    MaskDecoder,
    PromptEncoder,
    Sam,
    TwoWayTransformer,
)

HEADS, PATCH = 2, 8
STATS = ["entropy", "self_mass"]
TOL = {"rtol": 1e-5, "atol": 1e-4}  # float32 probabilities, float32 accumulation in vitmad's ops


def _encoder(img_size: int, window: int, *, use_abs_pos: bool = True) -> ImageEncoderViT:
    """Blocks 0 and 2 windowed, block 1 global; relative position bias on (SAM's checkpoints use it)."""
    return ImageEncoderViT(img_size=img_size, patch_size=PATCH, embed_dim=32, depth=3, num_heads=HEADS, mlp_ratio=2.0,
                           out_chans=16, use_abs_pos=use_abs_pos, use_rel_pos=True, window_size=window,
                           global_attn_indexes=(1,), norm_layer=partial(torch.nn.LayerNorm, eps=1e-6))


def _window_slots(height: int, width: int, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``window_partition``'s slots of an ``height x width`` map (window 0: the whole map, unpadded): ``[nW, N, 2]``
    pixel centres (padding slots at their cells past the edge) and ``[nW, N]`` the row-major map token each slot
    holds (-1: padding)."""
    wh, ww = (window, window) if window else (height, width)
    centres, tokens = [], []
    for window_row in range(math.ceil(height / wh)):
        for window_col in range(math.ceil(width / ww)):
            slot_centres, slot_tokens = [], []
            for r in range(window_row * wh, (window_row + 1) * wh):
                for c in range(window_col * ww, (window_col + 1) * ww):
                    slot_centres.append(((r + 0.5) * PATCH, (c + 0.5) * PATCH))
                    slot_tokens.append(r * width + c if r < height and c < width else -1)
            centres.append(slot_centres)
            tokens.append(slot_tokens)
    return torch.tensor(centres, dtype=torch.float64), torch.tensor(tokens)


def _reference(probabilities: torch.Tensor, batch: int, height: int, width: int,
               window: int) -> dict[str, torch.Tensor]:
    """``[batch, heads, height * width]`` per statistic, per map token row-major, from one call's probabilities
    ``[batch * nW * heads, N, N]``."""
    centres, tokens = _window_slots(height, width, window)
    windows, slots = tokens.shape
    assert probabilities.shape == (batch * windows * HEADS, slots, slots)
    attention = probabilities.reshape(batch, windows, HEADS, slots, slots)
    per_slot = {"mad": (attention * torch.cdist(centres, centres)[None, :, None]).sum(-1),
                "entropy": -torch.special.xlogy(attention, attention).sum(-1),
                "self_mass": attention.diagonal(dim1=-2, dim2=-1)}
    out = {}
    for name, values in per_slot.items():
        values = values.permute(0, 2, 1, 3).reshape(batch, HEADS, windows * slots)  # [B, heads, slot of the map]
        real = tokens.reshape(-1) >= 0
        placed = torch.empty(batch, HEADS, height * width, dtype=torch.float64)
        placed[..., tokens.reshape(-1)[real]] = values[..., real]
        out[name] = placed
    assert sorted(tokens.reshape(-1)[tokens.reshape(-1) >= 0].tolist()) == list(range(height * width))
    return out


def _check(rec, rec_tokens, maps, batch: int, height: int, width: int, window: int, *, prefix: str = "",
           call: int = -1) -> None:
    """Three blocks (windowed, global, windowed) of one recorded call against their softmax ``maps``."""
    assert rec.layers == [f"{prefix}blocks.{i}.attn" for i in range(3)] and rec.skipped == {}
    padded = (math.ceil(height / window) * window, math.ceil(width / window) * window)
    tokens = rec_tokens.calls[call]
    for layer, (probabilities, w) in enumerate(zip(maps, [window, 0, window], strict=True)):
        expected = _reference(probabilities, batch, height, width, w)
        # Far from uniform: a token at a wrong cell would change the values.
        assert float(expected["entropy"].mean()) < 0.75 * math.log(probabilities.shape[-1])
        geometry = rec.geometry[layer]
        assert geometry.grid == (height, width) and geometry.stride == (PATCH, PATCH) and geometry.heads == HEADS
        assert geometry.attention == ("global" if w == 0 else f"window {w}x{w}" + (
            f" (map {height}x{width} padded to {padded[0]}x{padded[1]})" if padded != (height, width) else ""))
        torch.testing.assert_close(tokens.per_layer[layer].double(), expected["mad"], **TOL)
        for name in STATS:
            torch.testing.assert_close(tokens.statistics[name][layer].double(), expected[name], **TOL)
        if call == -1:
            torch.testing.assert_close(rec.per_layer[layer].double(), expected["mad"].mean(-1), **TOL)
            for name in STATS:
                torch.testing.assert_close(rec.stats[name][layer].double(), expected[name].mean(-1), **TOL)


# name -> (img_size, window, use_abs_pos, image (h, w)): the map is floor(image / 8).
ENCODERS = {
    "padded-8-in-3": (64, 3, True, (64, 64)),
    "whole-8-in-4": (64, 4, True, (64, 64)),
    "non-square-6x9-in-4": (48, 4, False, (52, 75)),
}


@pytest.mark.parametrize("name", list(ENCODERS))
def test_image_encoder_matches_its_own_attention(name):
    img_size, window, use_abs_pos, (h, w) = ENCODERS[name]
    torch.manual_seed(0)
    encoder = sam_random_tables(_encoder(img_size, window, use_abs_pos=use_abs_pos))
    pixels = torch.randn(2, 3, h, w)
    maps = [m.double() for m in tensor_softmax_outputs(lambda: encoder(pixels))]
    assert len(maps) == 3
    with torch.no_grad():
        plain = encoder(pixels)
        with vitmad.record(encoder, stats=STATS) as rec:
            recorded = encoder(pixels)
        with vitmad.record(encoder, stats=STATS, reduction="none") as rec_tokens:
            encoder(pixels)
    assert torch.equal(plain, recorded)
    _check(rec, rec_tokens, maps, 2, h // PATCH, w // PATCH, window)


def _sam() -> Sam:
    """A tiny Sam: a 64 px encoder (8 x 8 map, windows of 3 padded to 9 x 9), a 16-wide prompt encoder and a mask
    decoder whose two-way transformer has 2 layers."""
    torch.manual_seed(0)
    prompt = PromptEncoder(embed_dim=16, image_embedding_size=(8, 8), input_image_size=(64, 64), mask_in_chans=4)
    decoder = MaskDecoder(transformer_dim=16, transformer=TwoWayTransformer(depth=2, embedding_dim=16, mlp_dim=32,
                                                                            num_heads=2),
                          num_multimask_outputs=3, iou_head_depth=2, iou_head_hidden_dim=16)
    return sam_random_tables(Sam(_encoder(64, 3), prompt, decoder))


def _batched_input() -> list[dict]:
    # Two images, each resized by the caller to the long side 64 (Sam.preprocess pads the short side with zeros).
    torch.manual_seed(1)
    return [dict(image=torch.rand(3, 64, 48) * 255, original_size=(80, 60),
                 point_coords=torch.rand(1, 2, 2) * 48, point_labels=torch.ones(1, 2)),
            dict(image=torch.rand(3, 40, 64) * 255, original_size=(40, 64),
                 boxes=torch.tensor([[4.0, 4.0, 40.0, 30.0]]))]


def test_sam_records_its_image_encoder_by_default():
    """Sam.forward runs the encoder once on the padded batch, then the prompt encoder and mask decoder per image:
    the encoder's blocks are recorded as the encoder alone is, the masks unchanged bit for bit."""
    sam, batched = _sam(), _batched_input()
    maps = [m.double() for m in tensor_softmax_outputs(lambda: sam(batched, multimask_output=True))]
    plain = sam(batched, multimask_output=True)
    with vitmad.record(sam, stats=STATS) as rec:
        recorded = sam(batched, multimask_output=True)
    with vitmad.record(sam, stats=STATS, reduction="none") as rec_tokens:
        sam(batched, multimask_output=True)
    for before, after in zip(plain, recorded, strict=True):
        for key in ("masks", "iou_predictions", "low_res_logits"):
            assert torch.equal(before[key], after[key])
    _check(rec, rec_tokens, maps, 2, 8, 8, 3, prefix="image_encoder.")


TWO_WAY = "two-way transformer of the mask decoder (segment_anything TwoWayTransformer): "


def test_mask_decoder_attention_is_skipped_with_its_reason():
    """Named in layers= (a wildcard, which also names its norms and MLPs: only the attention modules are listed),
    each two-way attention is skipped with what its queries and keys are; named alone, the model is refused."""
    sam, batched = _sam(), _batched_input()
    with vitmad.record(sam, layers=["image_encoder.*", "mask_decoder.*"]) as rec:
        sam(batched, multimask_output=False)
    assert rec.layers == [f"image_encoder.blocks.{i}.attn" for i in range(3)]
    two_way = "mask_decoder.transformer"
    queries_off = "cross-attention from the prompt tokens to the image embedding: its queries have no cell on the image"
    expected = {}
    for i in range(2):
        expected[f"{two_way}.layers.{i}.self_attn"] = (
            "self-attention of the prompt (point/box) and output tokens, none of which has a cell on the image")
        expected[f"{two_way}.layers.{i}.cross_attn_token_to_image"] = queries_off
        expected[f"{two_way}.layers.{i}.cross_attn_image_to_token"] = (
            "cross-attention from the image embedding to the prompt tokens: its keys have no cell on the image")
    expected[f"{two_way}.final_attn_token_to_image"] = queries_off
    assert rec.skipped == {name: TWO_WAY + reason for name, reason in expected.items()}
    with pytest.raises(ValueError, match=r"Sam has no layer with spatial softmax attention over positioned tokens.*"
                                         r"mask_decoder\.transformer\.layers\.0\.self_attn: two-way transformer"):
        vitmad.record(sam, layers=["mask_decoder.*"])


def test_predictor_and_automatic_mask_generator_record_each_encoder_call():
    """SamPredictor.set_image calls model.image_encoder as a module (resized to the long side 64, padded with
    zeros); SamAutomaticMaskGenerator calls set_image once per crop (crop_n_layers=1: the image, then 4 crops).
    Each call is recorded and matches the encoder's own attention in that call; the masks are unchanged."""
    sam = _sam()
    image = (torch.rand(40, 56, 3) * 255).to(torch.uint8).numpy()
    predictor = SamPredictor(sam)
    maps = [m.double() for m in tensor_softmax_outputs(lambda: predictor.set_image(image))]
    predictor.set_image(image)
    plain = predictor.predict(point_coords=numpy.array([[20, 12]]), point_labels=numpy.array([1]))
    with vitmad.record(sam, stats=STATS) as rec:
        predictor.set_image(image)
        recorded = predictor.predict(point_coords=numpy.array([[20, 12]]), point_labels=numpy.array([1]))
    with vitmad.record(sam, stats=STATS, reduction="none") as rec_tokens:
        predictor.set_image(image)
    _check(rec, rec_tokens, maps, 1, 8, 8, 3, prefix="image_encoder.")
    assert all((before == after).all() for before, after in zip(plain, recorded, strict=True))

    generator = SamAutomaticMaskGenerator(sam, points_per_side=2, pred_iou_thresh=0.0, stability_score_thresh=0.0,
                                          crop_n_layers=1)
    maps = [m.double() for m in tensor_softmax_outputs(lambda: generator.generate(image))]
    assert len(maps) == 5 * 3
    with vitmad.record(sam, stats=STATS, reduction="none") as rec_tokens:
        generator.generate(image)
    assert len(rec_tokens.calls) == 5
    for call in range(5):
        _check(rec_tokens, rec_tokens, maps[3 * call: 3 * call + 3], 1, 8, 8, 3, prefix="image_encoder.", call=call)


def test_profile_takes_the_image_encoder():
    """vitmad.profile on the encoder module with preprocessed pixels: per layer and head, the MAD over the images
    and their tokens, from the encoder's own attention."""
    torch.manual_seed(0)
    encoder = sam_random_tables(_encoder(64, 3))
    pixels = torch.randn(3, 3, 64, 64)
    prof = vitmad.profile(encoder, pixels, batch_size=3, device="cpu")
    maps = [m.double() for m in tensor_softmax_outputs(lambda: encoder(pixels))]
    expected = torch.stack([_reference(p, 3, 8, 8, w)["mad"].mean((0, 2)) for p, w in zip(maps, [3, 0, 3])])
    torch.testing.assert_close(prof.mad, expected, **TOL)


def test_attention_outside_an_image_encoder_is_refused_by_name():
    """A Block recorded alone has no PatchEmbed to give its stride: refused, saying what to record."""
    torch.manual_seed(0)
    block = _encoder(64, 3).blocks[0].eval()
    with pytest.raises(ValueError, match=r"attn .*placed only as the attention of a Block within ImageEncoderViT "
                                         r".*held by Block, outside any ImageEncoderViT: record the ImageEncoderViT "
                                         r"or the Sam model"):
        with torch.no_grad(), vitmad.record(block):
            block(torch.randn(1, 8, 8, 32))
    # The Attention itself recorded: no name to say it is held by (was "...;  is held by Attention", QA 217).
    with pytest.raises(ValueError, match=r"the model itself \(Attention\) of Attention: .*ImageEncoderViT \(whose "
                                         r"PatchEmbed gives the patch stride\); it was recorded alone, outside any "
                                         r"ImageEncoderViT: record the ImageEncoderViT"):
        with torch.no_grad(), vitmad.record(block.attn):
            block.attn(torch.randn(1, 8, 8, 32))
