"""vitmad.record on windowed plain ViTs and SAM2's HieraDet: timm ``samvit_*`` and ``sam2_hiera_*``,
transformers SAM (vision encoder), ViTDet and Sam2's HieraDet.

The reference of every layer is the model's own eager softmax probabilities (the unfused path of a copy of the
model), placed by geometry written here with plain loops from the models' documented layout: the ``H x W``
token map is padded at the bottom and right to a multiple of the window, windows are taken row-major, tokens
row-major within a window; a padding slot (not masked by these models) is a key at its cell of the padded grid,
past the image edge, and no query. Pooled queries (HieraDet) sit at the centre of the ``2 x 2`` cells they pool
(their stride cell); one whose cell holds an image row and column is a query, also where the cell reaches into
the padding (so an odd map of ``H`` rows has ``ceil(H / 2)`` pooled query rows), one whose cell is all padding
is none.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

import vitmad
from vitmad.ops.reference import mad_positions_reference

timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")

TOL = {"rtol": 1e-5, "atol": 1e-4}  # pixels; float32 probabilities, float32 accumulation in the ops
NAN = float("nan")


class _LastSoftmax(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.result = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        if func in (torch.softmax, F.softmax, torch.Tensor.softmax):
            self.result = result
        return result


def eager_maps(model, class_names) -> list[torch.Tensor]:
    """The last softmax of each call of the modules of ``class_names``, in execution order (the attention
    probabilities of their unfused path)."""
    maps = []
    for module in model.modules():
        if type(module).__name__ in class_names:
            mode = _LastSoftmax()

            def enter(m, a, mode=mode) -> None:
                mode.__enter__()

            module.register_forward_pre_hook(enter)

            def leave(m, a, out, mode=mode):
                mode.__exit__(None, None, None)
                maps.append(mode.result.detach())

            module.register_forward_hook(leave)
    return maps


def layout(height, width, window, stride, pool=1):
    """Key and query positions ``[nW, Nk, 2]``, ``[nW, Nq, 2]`` and the query grid of a block whose input map
    is ``height x width`` tokens of ``stride`` pixels, windows of ``window`` (0: global, which pools the unpadded
    map: ``height // pool`` rows), queries pooled by ``pool``; plus, per window and query, the query's index in
    the row-major pooled grid (-1: no query)."""
    wh, ww = (window, window) if window else (height, width)
    nwh, nww = math.ceil(height / wh), math.ceil(width / ww)
    ph, pw = wh // pool, ww // pool
    # Pooled rows (columns) whose stride cell, rows pool * r ... pool * r + pool - 1, holds an image row.
    kept_h = len([r for r in range(nwh * ph) if pool * r < height])
    kept_w = len([c for c in range(nww * pw) if pool * c < width])
    keys = [[[NAN, NAN]] * (wh * ww) for _ in range(nwh * nww)]
    queries = [[[NAN, NAN]] * (ph * pw) for _ in range(nwh * nww)]
    index = [[-1] * (ph * pw) for _ in range(nwh * nww)]
    for k in range(nwh * nww):
        wi, wj = divmod(k, nww)
        for t in range(wh * ww):
            r, c = wi * wh + t // ww, wj * ww + t % ww
            keys[k][t] = [(r + 0.5) * stride, (c + 0.5) * stride]  # padding too: past the image edge
        for t in range(ph * pw):
            r, c = wi * ph + t // pw, wj * pw + t % pw
            if pool * r < height and pool * c < width:
                queries[k][t] = [(r + 0.5) * stride * pool, (c + 0.5) * stride * pool]
                index[k][t] = r * kept_w + c
    keys, queries = torch.tensor(keys, dtype=torch.float64), torch.tensor(queries, dtype=torch.float64)
    return keys, queries, index, (kept_h, kept_w)


def reference(probabilities, batch, heads, spec):
    """(MAD [B, H], per-token MAD [B, H, T] in row-major grid order, grid) of one layer's probabilities."""
    keys, queries, index, grid = layout(*spec)
    windows = keys.shape[0]
    # Heads merged into the batch of windows ([B * nW * heads, ...]) or their own dim ([B * nW, heads, ...]).
    attn = probabilities.reshape(batch, windows, heads, queries.shape[1], keys.shape[1])
    per_query = mad_positions_reference(attn, queries[None, :, None], keys[None, :, None], reduction="none")
    mean = per_query.nanmean(dim=(1, 3))
    tokens = torch.full((batch, heads, grid[0] * grid[1]), NAN, dtype=torch.float64)
    for k in range(windows):
        for t in range(queries.shape[1]):
            if index[k][t] >= 0:
                tokens[:, :, index[k][t]] = per_query[:, k, :, t]
    assert not tokens.isnan().any()  # every token of the grid is a query of exactly one window
    return mean, tokens, grid


def check(model, eager, attention_classes, pixels, specs, heads, *, forward=None):
    """Recorded MAD of ``model`` against ``eager``'s probabilities placed by ``specs`` (one per layer:
    height, width, window, stride, pool), per layer, in both reductions; outputs unchanged."""
    forward = forward or (lambda m: m(pixels))
    model.eval()
    eager.eval()
    with torch.no_grad():
        plain = forward(model)
        with vitmad.record(model) as rec:
            recorded = forward(model)
        with vitmad.record(model, reduction="none") as rec_tokens:
            forward(model)
        maps = eager_maps(eager, attention_classes)
        forward(eager)
    for a, b in zip(_tensors(plain), _tensors(recorded), strict=True):
        assert torch.equal(a, b)
    assert len(rec.per_layer) == len(specs) == len(maps)
    batch = pixels.shape[0]
    for i, (spec, h) in enumerate(zip(specs, heads, strict=True)):
        mean, tokens, grid = reference(maps[i], batch, h, spec)
        geometry = rec.geometry[i]
        assert geometry.heads == h and geometry.grid == grid
        assert geometry.stride == (spec[3] * spec[4], spec[3] * spec[4])
        assert rec.per_layer[i].shape == (batch, h)
        torch.testing.assert_close(rec.per_layer[i].double(), mean, **TOL)
        torch.testing.assert_close(rec_tokens.per_layer[i].double(), tokens, **TOL)
    return rec


def _tensors(output):
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, dict):
        return [v for v in output.values() if isinstance(v, torch.Tensor)]
    return [v for v in output if isinstance(v, torch.Tensor)]


# timm samvit ---------------------------------------------------------------------------------------------------


def _samvit():
    torch.manual_seed(0)
    return timm.create_model("samvit_base_patch16", pretrained=False, img_size=64, patch_size=8, embed_dim=32,
                             depth=3, num_heads=2, window_size=4, global_attn_indexes=[1], neck_chans=16).eval()


@pytest.mark.parametrize("size", [(64, 64), (80, 72), (56, 88)], ids=["square", "padded", "padded-wide"])
def test_samvit_windows_and_global_blocks_match_eager_attention(size):
    model = _samvit()
    eager = copy.deepcopy(model)
    for module in eager.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = False
    pixels = torch.randn(2, 3, *size)
    gh, gw = size[0] // 8, size[1] // 8
    specs = [(gh, gw, 4, 8, 1), (gh, gw, 0, 8, 1), (gh, gw, 4, 8, 1)]
    rec = check(model, eager, {"Attention"}, pixels, specs, [2, 2, 2])
    assert rec.mad.shape == (3, 2, 2)  # [L, B, H], not [L, B * H]
    assert rec.geometry[1].attention == "global"
    assert rec.geometry[0].attention.startswith("window 4x4")


# transformers SAM -------------------------------------------------------------------------------------------------


def _sam_vision_config(config_class: str = "SamVisionConfig"):
    return getattr(transformers, config_class)(hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                                               image_size=80, patch_size=8, window_size=4, global_attn_indexes=[1],
                                               output_channels=16, mlp_dim=64, num_pos_feats=8)


# SAM-HQ's vision encoder is SAM's (its own classes, SamHQVisionAttention; it also returns the first global block's
# input for its mask decoder).
SAM_ENCODERS = {"sam": ("SamVisionConfig", "SamVisionModel", "SamVisionAttention"),
                "sam_hq": ("SamHQVisionConfig", "SamHQVisionModel", "SamHQVisionAttention")}


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("encoder", list(SAM_ENCODERS))
def test_hf_sam_vision_encoder_matches_eager_attention(encoder, implementation):
    # SAM's vision encoder takes only its configured square size (80 px: a 10 x 10 map, windows padded to 12).
    config_class, model_class, attention_class = SAM_ENCODERS[encoder]
    torch.manual_seed(0)
    config = _sam_vision_config(config_class)
    model = getattr(transformers, model_class)._from_config(config, attn_implementation=implementation)
    eager = getattr(transformers, model_class)._from_config(config, attn_implementation="eager")
    eager.load_state_dict(model.state_dict())
    specs = [(10, 10, 4, 8, 1), (10, 10, 0, 8, 1), (10, 10, 4, 8, 1)]
    check(model, eager, {attention_class}, torch.randn(2, 3, 80, 80), specs, [2, 2, 2])


def test_hf_sam_model_records_the_vision_encoder_and_skips_the_mask_decoder():
    torch.manual_seed(0)
    config = transformers.SamConfig(
        vision_config=_sam_vision_config(),
        prompt_encoder_config=transformers.SamPromptEncoderConfig(hidden_size=16, image_size=80, patch_size=8,
                                                                  mask_input_channels=4),
        mask_decoder_config=transformers.SamMaskDecoderConfig(hidden_size=16, num_hidden_layers=1,
                                                              num_attention_heads=2, mlp_dim=32,
                                                              iou_head_hidden_dim=16),
    )
    model = transformers.SamModel(config).eval()
    pixels, points = torch.randn(1, 3, 80, 80), torch.tensor([[[[20.0, 30.0]]]])
    with torch.no_grad(), vitmad.record(model) as rec:
        model(pixel_values=pixels, input_points=points)
    assert rec.layers == [f"vision_encoder.layers.{i}.attn" for i in range(3)]
    assert rec.skipped == {}
    decoder = "mask_decoder.transformer.layers.0.self_attn"
    with torch.no_grad(), vitmad.record(model, layers=["vision_encoder.layers.*.attn", decoder]) as rec:
        model(pixel_values=pixels, input_points=points)
    assert len(rec.layers) == 3
    assert "two-way transformer" in rec.skipped[decoder]


# transformers ViTDet -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(64, 64), (80, 56)], ids=["square", "padded"])
def test_hf_vitdet_windows_and_global_blocks_match_eager_attention(size):
    torch.manual_seed(0)
    config = transformers.VitDetConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, image_size=64,
                                       pretrain_image_size=64, patch_size=8, window_size=4,
                                       window_block_indices=[0, 2], residual_block_indices=[0],
                                       use_relative_position_embeddings=True)
    model = transformers.VitDetModel(config)
    for name, parameter in model.named_parameters():  # random relative position tables (zeros at init)
        if "rel_pos" in name:
            parameter.data.normal_()
    gh, gw = size[0] // 8, size[1] // 8
    specs = [(gh, gw, 4, 8, 1), (gh, gw, 0, 8, 1), (gh, gw, 4, 8, 1)]
    check(model, copy.deepcopy(model), {"VitDetAttention"}, torch.randn(2, 3, *size), specs, [2, 2, 2])


# SAM2's HieraDet -------------------------------------------------------------------------------------------------

# Stages (1, 1, 2, 1), windows (4, 4, 4, 2) with the window of the previous stage in each stage's first block
# (which pools its queries 2x2), block 3 global; heads 1, 2, 4, 4, 8; the patch embedding has stride 4.
HIERADET_HEADS = [1, 2, 4, 4, 8]


def _hieradet_specs(gh, gw):
    return [(gh, gw, 4, 4, 1), (gh, gw, 4, 4, 2), (gh // 2, gw // 2, 4, 8, 2), (gh // 4, gw // 4, 0, 16, 1),
            (gh // 4, gw // 4, 4, 16, 2)]


@pytest.mark.parametrize("size", [(112, 112), (112, 96)], ids=["square", "non-square"])
def test_timm_hieradet_pooled_queries_match_eager_attention(size):
    # 112 px: maps 28, 14, 7, 3 (stride 4, 8, 16, 32): the 14 and 7 maps pad to windows of 4, and pooling the
    # 7-row map gives 4 query rows (the 4th of image row 6 and a padding row) of which the model keeps 3.
    torch.manual_seed(0)
    model = timm.create_model("sam2_hiera_tiny", pretrained=False, embed_dim=16, num_heads=1, stages=(1, 1, 2, 1),
                              global_att_blocks=(3,), window_spec=(4, 4, 4, 2)).eval()
    eager = copy.deepcopy(model)
    for module in eager.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = False
    rec = check(model, eager, {"MultiScaleAttention"}, torch.randn(2, 3, *size),
                _hieradet_specs(size[0] // 4, size[1] // 4), HIERADET_HEADS)
    assert [g.stride[0] for g in rec.geometry] == [4, 8, 16, 16, 32]
    # The last stage's first block: a 7-row map pooled to 4 query rows, the 4th reaching into the padding.
    assert rec.geometry[4].grid == (4, 4 if size[1] == 112 else 3)
    assert "to 4x" in rec.geometry[4].attention
    assert rec.mad.shape == (5, 2, 8)
    assert rec.mad[0, :, 1:].isnan().all()  # one head in stage 1: the other seven are missing


class _Holding(torch.nn.Module):
    """A user's module holding a transformers tower: outside a transformers model, its attention is read in the
    module's own forward."""

    def __init__(self, backbone: torch.nn.Module):
        super().__init__()
        self.backbone = backbone

    def forward(self, pixels):
        return self.backbone(pixels).last_hidden_state


@pytest.mark.parametrize("implementation,wrapped", [("sdpa", False), ("sdpa", True), ("eager", True)])
def test_hf_sam2_hieradet_pooled_queries_match_eager_attention(implementation, wrapped):
    """Wrapped too (QA 331: refused, the softmax over its heads that Sam2's attention takes and never uses read as
    its attention)."""
    torch.manual_seed(0)
    common = dict(hidden_size=16, num_attention_heads=1, blocks_per_stage=[1, 1, 2, 1],
                  embed_dim_per_stage=[16, 32, 64, 128], num_attention_heads_per_stage=[1, 2, 4, 8],
                  window_size_per_stage=[4, 4, 4, 2], global_attention_blocks=[3],
                  window_positional_embedding_background_size=[7, 6], image_size=112)
    config = transformers.Sam2HieraDetConfig(**common)
    model = transformers.Sam2HieraDetModel._from_config(config, attn_implementation=implementation)
    eager = transformers.Sam2HieraDetModel._from_config(config, attn_implementation="eager")
    eager.load_state_dict(model.state_dict())
    if wrapped:
        model, eager = _Holding(model), _Holding(eager)
    rec = check(model, eager, {"Sam2MultiScaleAttention"}, torch.randn(2, 3, 112, 96), _hieradet_specs(28, 24),
                HIERADET_HEADS)
    assert rec.layers[0] == ("backbone." if wrapped else "") + "blocks.0.attn"


def test_a_call_that_does_not_match_its_block_is_refused():
    model = _samvit()
    block = model.blocks[0]
    # The block partitions windows of 4, then claims windows of 2 while its attention runs.
    block.attn.register_forward_pre_hook(lambda m, a: setattr(block, "window_size", 2))
    with pytest.raises(ValueError, match=r"blocks\.0\.attn .*8x8 map .*windows of 2x2"):
        with torch.no_grad(), vitmad.record(model):
            model(torch.randn(1, 3, 64, 64))
