"""vitmad.record on kornia's (0.9) MobileViT, TinyViT, SigLIP2 vision tower and MoonViT (until QA helper-191 refused
by name).

From kornia's source:

- ``kornia.models.vit_mobile``: ``MobileViTBlock`` reshapes the ``[b, d, h, w]`` map of its ``conv2`` with
  ``reshape(b * d * nh, ph, nw, pw).transpose(1, 2)`` then ``reshape(b, d, nh * nw, ph * pw).transpose(1, 3)``:
  ``[b, ph * pw, nh * nw, d]``, sequence ``p = i * pw + j`` holding, for patch ``n = a * nw + c``, the cell at row
  ``a * ph + i``, column ``c * pw + j``. ``Attention`` splits heads after that dim and takes ``nn.Softmax(dim=-1)``
  of ``[b, ph * pw, heads, N, N]``. ``MobileViT.forward`` runs ``mvit[0]``, ``mvit[1]``, ``mvit[2]`` on maps of
  stride 8, 16 and 32 (``conv1`` and the ``mv2`` blocks of stride 2, 3 x 3 with padding 1: ``ceil`` of the image).
- ``kornia.models.tiny_vit``: ``TinyViTBlock`` views its tokens as the ``input_resolution`` map, pads it with zeros at
  the bottom and right to whole ``window_size`` windows (``kornia.models.common.window_partition``), windows and
  tokens row-major, and takes ``.softmax(dim=-1)`` of ``[B * windows, heads, N, N]``. Stages at strides 8, 16, 32
  (MobileSAM: 8, 16, 16); the input must give ``img_size``'s grid (sides ``img_size - 7`` to ``img_size``).
- ``kornia.models.siglip2``: ``SigLip2VisionEmbeddings``' ``Conv2d`` (kernel = stride = patch) on the ``image_size``
  square, flattened row-major, no class token; ``SigLip2Attention`` runs F.scaled_dot_product_attention over
  ``[B, heads, N, N]``; the head's ``nn.MultiheadAttention`` pools the grid with one learned probe.
- ``kornia.models.kimi_vl.moonvit``: ``MoonViT``'s ``Conv2d`` patch embedding (any size, floored), flattened
  row-major, 2-D RoPE on q and k; ``MoonViTAttention`` runs F.scaled_dot_product_attention over ``[B, heads, N, N]``.

The reference is each layer's own probabilities in float64 (the ``nn.Softmax`` output hooked, ``Tensor.softmax`` or
SDPA's q and k spied), placed by that geometry.
"""

from __future__ import annotations

import math

import pytest
import torch

import vitmad
from conftest import (
    batch_norms_on,
    grid_centres,
    padded_window_reference,
    pooling_rows,
    record_both_reductions,
    sdpa_probabilities,
    sharpened,
    statistics_reference,
    tensor_softmax_maps,
)

pytest.importorskip("kornia")
from kornia.models.kimi_vl.config import KimiVLConfig, KimiVLProjectorConfig, MoonViTConfig  # noqa: E402
from kornia.models.kimi_vl.model import KimiVLModel  # noqa: E402
from kornia.models.kimi_vl.moonvit import MoonViT  # noqa: E402
from kornia.models.siglip2.config import SigLip2Config, SigLip2TextConfig, SigLip2VisionConfig  # noqa: E402
from kornia.models.siglip2.model import SigLip2Model  # noqa: E402
from kornia.models.siglip2.vision_encoder import SigLip2VisionModel  # noqa: E402
from kornia.models.tiny_vit import TinyViT  # noqa: E402
from kornia.models.vit_mobile import MobileViT  # noqa: E402

TOL = {"rtol": 1e-5, "atol": 1e-4}  # MADs in pixels: float32 probabilities, float32 accumulation in vitmad's ops
STAT_TOL = {"rtol": 1e-5, "atol": 1e-6}  # entropies


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)


def _check_layer(rec, rec_tokens, layer: int, expected: dict, stats=("entropy",)) -> None:
    """Layer ``layer``'s mean and per-token MAD and ``stats`` against ``expected`` ``[B, H, tokens]`` (row-major over
    its map), read from the latest call (layers on different grids do not stack)."""
    tokens = rec_tokens.calls[-1]
    torch.testing.assert_close(tokens.per_layer[layer].double(), expected["mad"], **TOL)
    torch.testing.assert_close(rec.per_layer[layer].double(), expected["mad"].mean(-1), **TOL)
    for stat in stats:
        torch.testing.assert_close(tokens.statistics[stat][layer].double(), expected[stat], **STAT_TOL)
        torch.testing.assert_close(rec.stats[stat][layer].double(), expected[stat].mean(-1), **STAT_TOL)


# MobileViT ------------------------------------------------------------------------------------------------------

def _mobilevit_softmax_maps(model, pixels) -> list[torch.Tensor]:
    """The ``[b, ph * pw, heads, N, N]`` output of every ``Attention.attend`` (``nn.Softmax``) call, float64."""
    maps, handles = [], []
    for module in model.modules():
        if type(module).__name__ == "Attention" and type(module).__module__ == "kornia.models.vit_mobile":
            handles.append(module.attend.register_forward_hook(lambda m, a, out: maps.append(out.double())))
    try:
        with torch.no_grad():
            model(pixels)
    finally:
        for handle in handles:
            handle.remove()
    return maps


def _mobilevit_reference(probabilities: torch.Tensor, height: int, width: int, patch: tuple[int, int],
                         stride: float) -> dict[str, torch.Tensor]:
    """MAD and entropy ``[b, heads, height * width]`` per map cell (row-major) of one call: sequence ``p = i * pw + j``,
    patch ``n = a * nw + c`` at map row ``a * ph + i``, column ``c * pw + j``."""
    (ph, pw), nw = patch, width // patch[1]
    batch, sequences, heads, tokens, _ = probabilities.shape
    cells = torch.tensor([[[(n // nw) * ph + p // pw, (n % nw) * pw + p % pw] for n in range(tokens)]
                          for p in range(sequences)])  # [P, N, 2] map (row, column)
    centres = (cells.double() + 0.5) * stride
    distance = torch.cdist(centres, centres)  # [P, N, N]
    mad = (probabilities * distance[None, :, None]).sum(-1)  # [b, P, heads, N]
    entropy = -torch.special.xlogy(probabilities, probabilities).sum(-1)
    index = (cells[..., 0] * width + cells[..., 1]).reshape(-1)  # map cell of each (p, n)
    out = {}
    for name, values in (("mad", mad), ("entropy", entropy)):
        flat = values.permute(0, 2, 1, 3).reshape(batch, heads, -1)
        out[name] = torch.empty_like(flat).index_copy_(-1, index, flat)
    assert sorted(index.tolist()) == list(range(height * width))
    return out


@pytest.mark.parametrize(("size", "maps"), [((64, 192), [(8, 24), (4, 12), (2, 6)]),
                                            ((60, 124), [(8, 16), (4, 8), (2, 4)])],
                         ids=["64x192", "60x124_rounded_up"])
def test_mobilevit_attention_across_patches_matches_its_softmax(size, maps):
    # The three MobileViT blocks at 8, 16 and 32 px (60 px: 30, 15, 8 after the padded stride-2 convolutions),
    # depths 2, 4 and 3; the xxs model's 2 x 2 patches.
    model, pixels = sharpened(MobileViT(mode="xxs")), torch.rand(2, 3, *size)
    batch_norms_on(model, pixels)  # with their initial statistics the maps shrink to ~1e-5 and every patch looks alike
    probabilities = _mobilevit_softmax_maps(model, pixels)
    rec, rec_tokens = record_both_reductions(model, lambda m: m(pixels), lambda out: out, ["entropy"])
    stages = [0] * 2 + [1] * 4 + [2] * 3
    assert rec.layers == [f"mvit.{k}.transformer.layers.{i}.0.fn" for k, n in enumerate([2, 4, 3]) for i in range(n)]
    for layer, (stage, attention) in enumerate(zip(stages, probabilities, strict=True)):
        (height, width), stride = maps[stage], 8.0 * 2 ** stage
        geometry = rec.geometry[layer]
        assert geometry.grid == (height, width) and geometry.stride == (stride, stride) and geometry.heads == 4
        assert geometry.attention == (f"across 2x2 patches: grid {height // 2}x{width // 2}, dilated every 2x2")
        expected = _mobilevit_reference(attention, height, width, (2, 2), stride)
        tokens = attention.shape[-1]
        if tokens >= 8:  # far from uniform: a token at a wrong cell would change the MAD
            assert float(expected["entropy"].mean()) < 0.75 * math.log(tokens)
        _check_layer(rec, rec_tokens, layer, expected)


def test_mobilevit_block_alone_refused():
    block = MobileViT(mode="xxs").mvit[0].eval()
    with pytest.raises(ValueError, match=r"kornia's MobileViT Attention is placed only in a MobileViTBlock of a "
                                         r"MobileViT .*outside one: record the MobileViT"):
        with torch.no_grad(), vitmad.record(block):
            block(torch.rand(1, 48, 8, 8))


# TinyViT --------------------------------------------------------------------------------------------------------

def _tiny_vit(pixels: torch.Tensor, **kwargs) -> TinyViT:
    """Three attention stages of one block, windows of 3 (or ``window_sizes``); the relative attention biases drawn
    anew (zeros at init), the projections sharpened, the query and key ones doubled, the batch norms given the
    statistics of ``pixels``: attention far from uniform over a window."""
    model = TinyViT(embed_dims=[16, 32, 32, 32], depths=[1, 1, 1, 1], num_heads=[1, 2, 2, 2], num_classes=4,
                    **{"window_sizes": [3, 3, 3, 3], **kwargs})
    sharpened(model)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("attention_biases"):
                parameter.normal_()
        for module in model.modules():
            if type(module).__name__ == "TinyViTBlock":  # qkv rows: per head, its key_dim q, key_dim k, d v
                heads, key_dim = module.attn.num_heads, module.attn.key_dim
                rows = module.attn.qkv.weight.view(heads, -1, module.attn.qkv.in_features)
                rows[:, :2 * key_dim].mul_(2.0)
    batch_norms_on(model, pixels)
    return model


@pytest.mark.parametrize(("img_size", "size", "maps", "window", "mobile_sam"), [
    (64, (59, 62), [(8, 8), (4, 4), (2, 2)], 3, False),
    (48, (48, 48), [(6, 6), (3, 3), (3, 3)], 4, True),
], ids=["59x62_windows_of_3_padded", "mobile_sam_48_windows_of_4_padded"])
def test_tiny_vit_padded_windows_match_its_softmax(img_size, size, maps, window, mobile_sam):
    # 59 x 62 px of a 64 px TinyViT: the padded stride-2 convolutions round up to 64's grid, 8 x 8 at 8 px, padded to
    # 9 x 9; 4 x 4 at 16 px to 6 x 6; 2 x 2 at 32 px to one 3 x 3 window. MobileSAM's last two stages both 16 px.
    pixels = torch.rand(2, 3, *size)
    model = _tiny_vit(pixels, img_size=img_size, window_sizes=[window] * 4, mobile_sam=mobile_sam)
    probabilities = [m.double() for m in tensor_softmax_maps(model, pixels)]
    rec, rec_tokens = record_both_reductions(model, lambda m: m(pixels), lambda out: out, ["entropy"])
    assert rec.layers == ["layers.1.blocks.0.attn", "layers.2.blocks.0.attn", "layers.3.blocks.0.attn"]
    strides = [8.0, 16.0, 16.0] if mobile_sam else [8.0, 16.0, 32.0]
    for layer, ((height, width), stride, attention) in enumerate(zip(maps, strides, probabilities, strict=True)):
        padded = (math.ceil(height / window) * window, math.ceil(width / window) * window)
        geometry = rec.geometry[layer]
        assert geometry.grid == (height, width) and geometry.stride == (stride, stride)
        assert geometry.attention == f"window {window}x{window}, padded to {padded[0]}x{padded[1]}"
        expected = padded_window_reference(attention, height, width, window, stride, batch=2,
                                           heads=attention.shape[1])
        assert float(expected["entropy"].mean()) < 0.75 * math.log(window * window)
        _check_layer(rec, rec_tokens, layer, expected)


def test_tiny_vit_layer_alone_refused():
    layer = _tiny_vit(torch.rand(2, 3, 64, 64), img_size=64).layers[1]
    with pytest.raises(ValueError, match=r"kornia's TinyViT Attention is placed only as the attn of a TinyViTBlock of "
                                         r"a TinyViT .*outside one: record the TinyViT"):
        with torch.no_grad(), vitmad.record(layer):
            layer(torch.rand(1, 64, 32))


# SigLIP2 --------------------------------------------------------------------------------------------------------

def _siglip2_vision_config() -> SigLip2VisionConfig:
    # 30 px with 4 px patches: the patch convolution drops the last 2 px, a 7 x 7 grid.
    return SigLip2VisionConfig(image_size=30, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                               intermediate_size=48)


def _check_grid(rec, rec_tokens, probabilities: list[torch.Tensor], grid: tuple[int, int], patch: float,
                first: int = 0) -> None:
    """Layers ``first``... : global attention over the row-major ``grid`` of ``patch`` px cells, no prefix token."""
    for i, attention in enumerate(probabilities):
        geometry = rec.geometry[first + i]
        assert geometry.grid == grid and geometry.stride == (patch, patch) and geometry.num_prefix_tokens == 0
        assert geometry.attention == "global"
        expected = statistics_reference(attention, grid_centres(grid, patch))
        assert float(expected["entropy"].mean()) < 0.75 * math.log(attention.shape[-1])
        _check_layer(rec, rec_tokens, first + i, expected)


def test_siglip2_vision_tower_patch_grid_and_pooling_head_match_its_attention():
    model, pixels = sharpened(SigLip2VisionModel(_siglip2_vision_config())), torch.rand(2, 3, 30, 30)
    probabilities = sdpa_probabilities(lambda: model(pixels))
    assert len(probabilities) == 2  # the head's nn.MultiheadAttention computes its weights itself
    rec, rec_tokens = record_both_reductions(model, lambda m: m(pixels), lambda out: torch.cat(out[:1], -1),
                                             ["entropy", "prefix_maps"])
    assert rec.layers == ["encoder.layers.0.self_attn", "encoder.layers.1.self_attn"]
    _check_grid(rec, rec_tokens, probabilities, (7, 7), 4.0)
    # The probe's row over the 49 patches, from the head's own per-head weights.
    assert "attention pooling" in rec.skipped["head.attention"]
    expected = pooling_rows(model, "head.attention", lambda double: double(pixels.double()))
    assert expected.shape == (2, 2, 1, 49)
    torch.testing.assert_close(rec.class_attention_maps["head.attention"].double(), expected, **STAT_TOL)
    geometry = rec.calls[-1].class_geometry[0]
    assert geometry.grid == (7, 7) and geometry.stride == (4.0, 4.0)
    assert geometry.attention == "attention pooling over global"


def test_siglip2_model_records_its_vision_tower_and_skips_the_text_tower():
    config = SigLip2Config(vision_config=_siglip2_vision_config(), projection_dim=16,
                           text_config=SigLip2TextConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1,
                                                         num_attention_heads=2, intermediate_size=48,
                                                         max_position_embeddings=8))
    model = sharpened(SigLip2Model(config))
    pixels, text = torch.rand(2, 3, 30, 30), torch.randint(0, 50, (2, 8))
    with torch.no_grad():
        plain = model(pixel_values=pixels, input_ids=text).logits_per_image
        with vitmad.record(model) as whole:
            assert torch.equal(model(pixel_values=pixels, input_ids=text).logits_per_image, plain)
        with vitmad.record(model.vision_model) as alone:
            model.vision_model(pixels)
    # The default takes the image tower alone (vitmad's tower prefix); the text tower, named, is skipped.
    assert whole.layers == [f"vision_model.{name}" for name in alone.layers]
    assert torch.equal(whole.mad, alone.mad)
    with torch.no_grad(), vitmad.record(model, layers=["*self_attn"]) as named:
        model(pixel_values=pixels, input_ids=text)
    assert named.layers == whole.layers and torch.equal(named.mad, whole.mad)
    assert named.skipped == {
        "text_model.encoder.layers.0.self_attn": "SigLIP2's text encoder: attention among the tokens of a text, "
                                                 "not of an image"}


def test_paligemma_records_its_siglip2_tower():
    from kornia.models.paligemma.configuration_paligemma import PaliGemmaConfig
    from kornia.models.paligemma.modeling_paligemma import PaliGemma

    config = PaliGemmaConfig(vision_config=_siglip2_vision_config(), vocab_size=50, hidden_size=32,
                             intermediate_size=48, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                             head_dim=16)
    model = sharpened(PaliGemma(config))
    text, pixels = torch.randint(0, 50, (2, 5)), torch.rand(2, 3, 30, 30)
    with torch.no_grad():
        plain = model(text, pixels)
        with vitmad.record(model) as whole:
            assert torch.equal(model(text, pixels), plain)
        with vitmad.record(model.vision_tower) as alone:
            model.vision_tower(pixels)
    assert whole.layers == [f"vision_tower.{name}" for name in alone.layers]
    assert torch.equal(whole.mad, alone.mad) and whole.geometry[0].grid == (7, 7)


def test_siglip2_encoder_alone_refused():
    encoder = SigLip2VisionModel(_siglip2_vision_config()).encoder.eval()
    with pytest.raises(ValueError, match=r"kornia's SigLip2Attention is placed only as the self_attn of a layer of a "
                                         r"SigLip2VisionModel .*record the SigLip2VisionModel"):
        with torch.no_grad(), vitmad.record(encoder):
            encoder(torch.rand(1, 49, 32))


# MoonViT --------------------------------------------------------------------------------------------------------

def _moonvit_config() -> MoonViTConfig:
    return MoonViTConfig(patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=48, init_pos_emb_height=4, init_pos_emb_width=4)


def test_moonvit_patch_grid_matches_its_attention():
    # 30 x 46 px, 4 px patches: a 7 x 11 grid (the patch convolution drops 2 px of each side), the position
    # embedding interpolated from 4 x 4; the 2-D RoPE is in the q and k SDPA receives.
    model, pixels = sharpened(MoonViT(_moonvit_config())), torch.rand(2, 3, 30, 46)
    probabilities = sdpa_probabilities(lambda: model(pixels))
    rec, rec_tokens = record_both_reductions(model, lambda m: m(pixels), lambda out: out, ["entropy"])
    assert rec.layers == ["encoder.layers.0.attn", "encoder.layers.1.attn"]
    _check_grid(rec, rec_tokens, probabilities, (7, 11), 4.0)


def test_kimi_vl_model_records_its_moonvit():
    # 32 x 48 px: 8 x 12 patches, whole 2 x 2 squares for the projector's merge (no attention).
    config = KimiVLConfig(vision_config=_moonvit_config(),
                          projector_config=KimiVLProjectorConfig(input_dim=32, hidden_dim=32, output_dim=16))
    model, pixels = sharpened(KimiVLModel(config)), torch.rand(1, 3, 32, 48)
    probabilities = sdpa_probabilities(lambda: model(pixels))
    rec, rec_tokens = record_both_reductions(model, lambda m: m(pixels), lambda out: out, ["entropy"])
    assert rec.layers == ["vision_encoder.encoder.layers.0.attn", "vision_encoder.encoder.layers.1.attn"]
    _check_grid(rec, rec_tokens, probabilities, (8, 12), 4.0)


def test_moonvit_encoder_alone_refused():
    model = MoonViT(_moonvit_config()).eval()
    cos, sin = model.rope(4, 4, torch.device("cpu"))
    with pytest.raises(ValueError, match=r"kornia's MoonViTAttention is placed only as the attn of a layer of a "
                                         r"MoonViT .*record the MoonViT"):
        with torch.no_grad(), vitmad.record(model.encoder):
            model.encoder(torch.rand(1, 16, 32), cos, sin)


@pytest.mark.parametrize("tower", ["siglip2", "moonvit"])
def test_attention_mask_refused(tower):
    """A padding mask over the patches: vitmad places every patch attending over the whole grid, so a call with one is
    refused rather than averaged over padded queries."""
    if tower == "siglip2":
        model, pixels, layer = SigLip2VisionModel(_siglip2_vision_config()).eval(), torch.rand(1, 3, 30, 30), \
            r"encoder\.layers\.0\.self_attn"
        what, tokens = "kornia's SigLIP2 vision tower", 49
    else:
        model, pixels, layer = MoonViT(_moonvit_config()).eval(), torch.rand(1, 3, 32, 32), r"encoder\.layers\.0\.attn"
        what, tokens = "kornia's MoonViT", 64
    keep = torch.ones(1, tokens, dtype=torch.bool)
    keep[:, -5:] = False
    with pytest.raises(ValueError, match=rf"{layer} .*it was given an attention_mask \(padded patches, or pairs "
                                         rf"that do not attend\), which vitmad does not read for {what}: .*record a "
                                         "call without attention_mask"):
        with torch.no_grad(), vitmad.record(model):
            model(pixels, attention_mask=keep)
