"""What the tests share, defined once: the device and dtype lists, random inputs, the tolerance rule, tiny
random-weight models and generated images. Test modules import the plain names (``from conftest import
DEVICES``); pytest hands them the fixtures.

No test downloads anything: every model is built from a config with random weights.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

import vitmad

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# Images in the shared image_folder fixture.
IMAGE_COUNT = 7
# Subprocesses import the same vitmad as the test run (the source tree, or the installed package in CI).
PACKAGE_ROOT = str(Path(vitmad.__file__).parents[1])


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment of a child Python process: it imports the vitmad under test."""
    return {**os.environ, "PYTHONPATH": PACKAGE_ROOT, **extra}


# Ops inputs ----------------------------------------------------------------------------------------------------


def random_attention(
    shape, dtype=torch.float32, device="cpu", *, seed: int = 0, temperature: float = 1.0
) -> torch.Tensor:
    """Softmax of random logits: rows sum to one, like real attention. Peaky for small temperatures."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(shape, generator=gen, dtype=torch.float64) / temperature
    return logits.softmax(-1).to(device=device, dtype=dtype)


def make_qk(batch, heads, n, d, dtype, device, *, seed=0, logit_scale=1.0):
    """Queries and keys rounded to dtype, with logits of roughly unit size times logit_scale."""
    gen = torch.Generator().manual_seed(seed)
    std = math.sqrt(logit_scale) * d**0.25
    q, k = (std * torch.randn(batch, heads, n, d, generator=gen, dtype=torch.float64) for _ in range(2))
    return q.to(device=device, dtype=dtype), k.to(device=device, dtype=dtype)


def make_bias(kind, batch, heads, n, dtype, device, gen):
    """An attention bias of ``kind``: None, "full" [B, H, N, N], "heads" [H, N, N] (relative position bias),
    "matrix" [N, N], or "key_mask", a bool key-padding mask [B, 1, 1, N] that keeps key 0 for every query."""
    if kind is None:
        return None
    if kind == "key_mask":
        mask = torch.rand(batch, 1, 1, n, generator=gen) > 0.3
        mask[..., 0] = True  # every query keeps at least one key, so no row is all -inf
        return mask.to(device)
    shape = {"full": (batch, heads, n, n), "heads": (heads, n, n), "matrix": (n, n)}[kind]
    return (2 * torch.randn(shape, generator=gen, dtype=torch.float64)).to(device=device, dtype=dtype)


# Every key-block size of the kernels (CPU 512 keys, CUDA tiles of 64, float64 tiles of 32) is a multiple of this.
KEY_BLOCK_EDGE = 32
# A CUDA parameter that skips cleanly without a GPU.
CUDA_PARAM = pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"))


def block_edge_bias(nq: int, nk: int, gen: torch.Generator, *, masked_before: int, masked_share: float,
                    poison: list[tuple[int | None, int, float]]) -> torch.Tensor:
    """A float64 attn_bias ``[nq, nk]`` that tests the kernels' key blocks: random values, -inf on keys
    ``[0, masked_before)`` for about ``masked_share`` of the queries (every key of the leading blocks masked,
    so their running max stays -inf), and ``value`` at each ``(query or None for every query, key, value)`` of
    ``poison`` (NaN, +inf, -inf placed next to a block edge)."""
    bias = torch.randn(nq, nk, generator=gen, dtype=torch.float64)
    rows = torch.rand(nq, generator=gen) < masked_share
    bias[rows, :masked_before] = -math.inf
    for query, key, value in poison:
        bias[slice(None) if query is None else query, key] = value
    return bias


def draw_block_edge_bias(draw, nq: int, nk: int, gen: torch.Generator) -> torch.Tensor:
    """:func:`block_edge_bias` with its masked prefix and poisoned keys drawn by hypothesis's ``draw``: the
    masked run ends at a block edge, each poisoned key is the last key before an edge or the first after it,
    mostly inside or just past the masked run (where a dropped NaN once went unnoticed)."""
    edges = list(range(0, nk + 1, KEY_BLOCK_EDGE))
    masked_before = draw(st.sampled_from(edges))
    near = [edge for edge in edges if edge <= masked_before + KEY_BLOCK_EDGE]
    poison = []
    for _ in range(draw(st.integers(0, 3))):
        edge = draw(st.sampled_from(near if draw(st.integers(0, 3)) else edges))
        key = min(max(edge - draw(st.integers(0, 1)), 0), nk - 1)
        query = None if nq == 0 or draw(st.booleans()) else draw(st.integers(0, nq - 1))
        poison.append((query, key, draw(st.sampled_from([math.nan, math.nan, math.inf, -math.inf]))))
    return block_edge_bias(nq, nk, gen, masked_before=masked_before,
                           masked_share=draw(st.sampled_from([0.5, 1.0, 0.0])), poison=poison)


def tolerance(dtype: torch.dtype) -> dict:
    """Tolerance of a vitmad result against the float64 reference computed from the *same* input values.

    The input is not rounded again, so only accumulation error remains: float32 accumulation for 16- and
    32-bit inputs, float64 for float64.
    """
    if dtype == torch.float64:
        return {"rtol": 1e-10, "atol": 1e-10}
    return {"rtol": 2e-5, "atol": 2e-5}


def compiled_kernel_available(op: str, device: str) -> bool:
    return vitmad.has_compiled_kernel(op, device.upper())


# Random-weight models whose attention is far from uniform --------------------------------------------------------
# Under uniform attention a query's MAD depends only on the set of key positions, so a token placed at the wrong
# position would go unnoticed: the family tests make the attention peaked first.


def batch_norms_on(model: torch.nn.Module, pixels: torch.Tensor) -> None:
    """The model's batch norms take the statistics of ``pixels``, then it is put in eval mode: random weights with
    a batch norm's initial statistics can shrink a deep CNN's activations to ~1e-11 by its attention blocks."""
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None  # a cumulative average: one batch sets the statistics
    with torch.no_grad():
        model.train()(pixels)
    model.eval()


def output_spreads(model: torch.nn.Module, pixels: torch.Tensor, modules: list) -> dict:
    """The standard deviation of each module's output in one forward of ``pixels``, by module."""
    spreads = {}

    def measure(module, args, output) -> None:
        spreads[module] = output.std()

    handles = [m.register_forward_hook(measure) for m in modules]
    with torch.no_grad():
        model(pixels)
    for handle in handles:
        handle.remove()
    return spreads


# Models and images on disk ---------------------------------------------------------------------------------------


def save_tiny_hf_vit(folder: Path, *, image_size: int = 32, patch: int = 8, layers: int = 2, heads: int = 2,
                     seed: int = 0) -> Path:
    """A ViTModel with random weights and its image processor, as ``save_pretrained`` folders."""
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    torch.manual_seed(seed)
    config = ViTConfig(image_size=image_size, patch_size=patch, hidden_size=24, num_hidden_layers=layers,
                       num_attention_heads=heads, intermediate_size=48)
    ViTModel(config, add_pooling_layer=False).save_pretrained(folder)
    ViTImageProcessor(size={"height": image_size, "width": image_size}).save_pretrained(folder)
    return folder


def sharpened(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """``model`` in eval mode with every Linear weight drawn anew, std 0.25 (after ``torch.manual_seed(seed)``):
    attention far from uniform, which the default init makes every head of a tiny model look, so that a token at a
    wrong position changes the MAD."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.normal_(std=0.25)
    return model.eval()


def self_similar_attention(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with every LFM3-VL and Cosmos3-Edge vision attention given its key projection as query projection
    (per query head), LFM3-VL's per-head q / k norms scaled up a little: LFM3-VL's norms undo :func:`sharpened` and
    Cosmos3-Edge has no rotary embedding to make attention local, so a token attends most to itself and to tokens
    like it, far from uniform."""
    with torch.no_grad():
        for module in model.modules():
            if type(module).__name__ == "Lfm3VlVisionAttention":
                module.q_proj.weight.copy_(module.k_proj.weight.repeat(module.num_key_value_groups, 1))
                module.q_norm.weight.fill_(1.3)
                module.k_norm.weight.fill_(1.3)
            elif type(module).__name__ == "Cosmos3EdgeVisionAttention":
                module.q_proj.weight.copy_(module.k_proj.weight)
                module.q_proj.bias.copy_(module.k_proj.bias)
    return model


def unfused_maps(model: torch.nn.Module, class_name: str) -> list[tuple[torch.nn.Module, torch.Tensor]]:
    """``[(module, softmax probabilities)]`` of every timm attention module of ``class_name`` in ``model``, switched
    to its unfused path (``fused_attn = False``): the input of its ``attn_drop``, in call order, filled as the model
    runs."""
    maps = []
    for module in model.modules():
        if type(module).__name__ == class_name:
            module.fused_attn = False
            module.attn_drop.register_forward_pre_hook(lambda m, args, owner=module: maps.append((owner, args[0])))
    return maps


def pooling_rows(model: torch.nn.Module, name: str, run) -> torch.Tensor:
    """``[B, H, Q, N]`` float64: the attention probabilities of the head ``name`` over the N tokens it pools, in a
    float64 copy of ``model`` run by ``run(copy)``: from the queries, keys and mask its
    F.scaled_dot_product_attention receives (timm, AIMv2), or its MultiheadAttention's own per-head weights (SigLIP,
    SigLIP2: its key_padding_mask too)."""
    import copy

    model = copy.deepcopy(model).double()
    head, rows = model.get_submodule(name), []
    if isinstance(head, torch.nn.MultiheadAttention):
        def weights(module, args, kwargs, output):
            query, key, value = args
            # forward itself: calling the module would run this hook again.
            rows.append(torch.nn.MultiheadAttention.forward(module, query, key, value, need_weights=True,
                                                            average_attn_weights=False, **kwargs)[1])

        head.register_forward_hook(weights, with_kwargs=True)
        with torch.no_grad():
            run(model)
        return rows[0]
    real = torch.nn.functional.scaled_dot_product_attention

    def probabilities(q, k, v, attn_mask=None, scale=None, **kwargs):
        logits = (q @ k.transpose(-1, -2)) * (scale or q.shape[-1] ** -0.5)
        if attn_mask is not None:  # SDPA's: a boolean False hides a key, a float one adds
            logits = logits.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool \
                else logits + attn_mask
        rows.append(logits.softmax(-1))
        return real(q, k, v, attn_mask=attn_mask, scale=scale, **kwargs)

    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = True
    head.register_forward_pre_hook(lambda *_: setattr(torch.nn.functional, "scaled_dot_product_attention",
                                                      probabilities))
    head.register_forward_hook(lambda *_: setattr(torch.nn.functional, "scaled_dot_product_attention", real))
    try:
        with torch.no_grad():
            run(model)
    finally:
        torch.nn.functional.scaled_dot_product_attention = real
    assert len(rows) == 1
    return rows[0]


def interrupted_profile(monkeypatch, run, *, at_batch: int) -> None:
    """Runs ``run()`` (a checkpointed ``vitmad.profile``) with a KeyboardInterrupt at the ``at_batch``-th batch's
    prefix-map sums (PrefixMapSums.add): the batches before it are checkpointed, as a Ctrl-C leaves them."""
    from vitmad.profiling.prefix_maps import PrefixMapSums

    real_add, calls = PrefixMapSums.add, []

    def interrupted(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == at_batch:
            raise KeyboardInterrupt
        return real_add(self, *args, **kwargs)

    monkeypatch.setattr(PrefixMapSums, "add", interrupted)
    try:
        with pytest.raises(KeyboardInterrupt):
            run()
    finally:
        monkeypatch.setattr(PrefixMapSums, "add", real_add)


def chunk_token_mad(probabilities: torch.Tensor, chunk: list[tuple[int, int]], patch: int) -> torch.Tensor:
    """``[H, n]`` float64 MAD of each query of one packed call (``probabilities`` ``[1, H, n, n]``) over its keys,
    the tokens at the ``(row, column)`` cells ``chunk`` of ``patch``-pixel patches, at their cell centres."""
    centres = torch.tensor([[(r + 0.5) * patch, (c + 0.5) * patch] for r, c in chunk], dtype=torch.float64)
    return (probabilities[0].double() * torch.cdist(centres, centres)).sum(-1)


def qwen_token_chunks(grid: tuple[int, int], merge: int, window: int | None) -> list[list[tuple[int, int]]]:
    """The (row, col) of each token of one Qwen-VL image in the vision tower's sequence order, cut into the
    chunks its attention runs over: windows of ``window`` merge blocks a side (Qwen2.5-VL's windowed blocks), or,
    with ``window=None``, one chunk of the whole image. Written from transformers' Qwen2-VL / Qwen2.5-VL modeling
    files (tokens come merge block by merge block, ``merge x merge`` patches each, row-major; windows in row-major
    order, blocks row-major within), never from vitmad's placer, which the tests check against it."""
    h, w = grid
    blocks_h, blocks_w = h // merge, w // merge
    side_h, side_w = (window, window) if window else (blocks_h, blocks_w)
    chunks = []
    for window_row in range(math.ceil(blocks_h / side_h)):
        for window_col in range(math.ceil(blocks_w / side_w)):
            chunk = []
            for block_row in range(window_row * side_h, min((window_row + 1) * side_h, blocks_h)):
                for block_col in range(window_col * side_w, min((window_col + 1) * side_w, blocks_w)):
                    for i in range(merge):
                        for j in range(merge):
                            chunk.append((block_row * merge + i, block_col * merge + j))
            chunks.append(chunk)
    return chunks


def grid_centres(grid: tuple[int, int], patch: float) -> torch.Tensor:
    """``[h * w, 2]`` float64: the pixel centre ``((r + 0.5) * patch, (c + 0.5) * patch)`` of every cell of an
    ``h x w`` grid, row-major."""
    rows, cols = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
    return (torch.stack([rows, cols], -1).reshape(-1, 2).double() + 0.5) * patch


def statistics_reference(probabilities: torch.Tensor, positions: torch.Tensor,
                         is_query: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The statistics of docs/definition.md in float64, from the probabilities ``[B, H, N, N]`` of N tokens at
    ``positions`` ``[N, 2]`` pixels (a NaN row: a token without a position, a CLS or a register). The queries are
    ``is_query`` ``[N]`` (default: every token with a position; a window's padding slot is a key at its cell past
    the image edge and no query). Per statistic ``[B, H, T]``, one value per query in token order: ``"mad"`` over
    the keys with a position, ``"entropy"`` of the whole row, ``"prefix_mass"`` on the keys without one; and
    ``"prefix_maps"`` ``[B, H, P, T]``, the rows of the P tokens without a position over the queries' columns."""
    probabilities = probabilities.double()
    placed = ~positions[:, 0].isnan()
    queries = placed if is_query is None else is_query
    rows = probabilities[:, :, queries]
    distance = torch.cdist(positions[queries], positions[placed])
    return {"mad": (rows[..., placed] * distance).sum(-1),
            "entropy": -torch.special.xlogy(rows, rows).sum(-1),
            "prefix_mass": rows[..., ~placed].sum(-1),
            "prefix_maps": probabilities[:, :, ~placed][..., queries]}


# Statistics (entropy in nats, masses, prefix-map entries) of a recording from float32 logits, against float64 on the
# same float32 q and k or on a model's own float32 probabilities. Each float32 logit is off by up to
# (D + 2) u sum_i |q_i k_i| scale (u = 2^-24), in an order of summation each kernel picks by the CPU (vitmad's panels
# 8 or 16 floats wide by AVX2 or AVX-512, torch's GEMM): 1e-4 to 3e-4 for the sharpened heads of these tests, whose
# logits reach ~300. To first order, entropy then moves by at most 2 delta H and a mass or a map entry by delta / 2.
# 5e-5 lies under those bounds; 1e-6, set on an AVX-512 machine, failed on an AVX2 one (4.8e-6 to 1.8e-5 seen,
# 2026-12-07). MADs keep their tolerance in pixels: they are what a misplaced token changes.
FLOAT32_STAT_ATOL = 5e-5


def check_prefix_and_grid(rec, rec_tokens, maps: list[torch.Tensor], grid: tuple[int, int], patch: float,
                          prefix: int, suffix: int = 0, skipped: tuple[str, ...] = ()) -> None:
    """A recording with ``stats=["entropy", "prefix_mass", "prefix_maps"]`` (and ``rec_tokens``, the same with
    ``reduction="none"``) against the probabilities ``maps`` ``[B, H, N, N]`` of its global layers, one per layer,
    their tokens placed as ``prefix`` tokens without a position, then the row-major ``grid`` of ``patch`` px cells,
    then ``suffix`` tokens without a position: geometry, MAD (mean and per token), entropy, prefix mass and prefix
    maps, by :func:`statistics_reference`; the layers skipped are ``skipped``."""
    # float32 recordings (flash-MAD on the fused q / k, or the fused ops) against float64 on the eager float32
    # probabilities: the two softmaxes differ by float32 rounding. MADs are in pixels; masses and maps <= 1.
    tol, stat_tol = {"rtol": 1e-5, "atol": 1e-4}, {"rtol": 1e-5, "atol": FLOAT32_STAT_ATOL}
    nan = torch.full((1, 2), math.nan, dtype=torch.float64)
    positions = torch.cat([nan.expand(prefix, 2), grid_centres(grid, patch), nan.expand(suffix, 2)])
    assert len(rec.layers) == len(maps) and set(rec.skipped) == set(skipped)
    for layer, probabilities in enumerate(maps):
        geometry = rec.geometry[layer]
        assert geometry.grid == grid and geometry.stride == (patch, patch) and geometry.num_prefix_tokens == prefix
        assert (geometry.num_suffix_tokens or 0) == suffix
        expected = statistics_reference(probabilities, positions)
        # Far from uniform attention: a token placed at a wrong cell would change the MAD.
        assert float(expected["entropy"].mean()) < 0.75 * math.log(probabilities.shape[-1])
        torch.testing.assert_close(rec_tokens.per_layer[layer].double(), expected["mad"], **tol)
        torch.testing.assert_close(rec.per_layer[layer].double(), expected["mad"].mean(-1), **tol)
        for stat in ("entropy", "prefix_mass"):
            torch.testing.assert_close(rec_tokens.stats[stat][layer].double(), expected[stat], **stat_tol)
            torch.testing.assert_close(rec.stats[stat][layer].double(), expected[stat].mean(-1), **stat_tol)
        if prefix + suffix:
            torch.testing.assert_close(rec.prefix_maps[layer].double(), expected["prefix_maps"], **stat_tol)
        else:
            assert rec.prefix_maps[layer] is None


def padded_window_slots(height: int, width: int, window: int, patch: float) -> tuple[torch.Tensor, list[list[int]]]:
    """SAM-style windows: the pixel centre ``[nW, N, 2]`` of every slot of every window of a ``height x width`` map of
    ``patch`` px cells (window 0: one global window over the map), windows and slots row-major over the map padded at
    the bottom and right to whole windows, and each slot's token index in the row-major map (-1: padding, a key
    without a query)."""
    wh, ww = (window, window) if window else (height, width)
    centres, tokens = [], []
    for wi in range(math.ceil(height / wh)):
        for wj in range(math.ceil(width / ww)):
            rows = [wi * wh + t // ww for t in range(wh * ww)]
            cols = [wj * ww + t % ww for t in range(wh * ww)]
            centres.append([[(r + 0.5) * patch, (c + 0.5) * patch] for r, c in zip(rows, cols)])
            tokens.append([r * width + c if r < height and c < width else -1 for r, c in zip(rows, cols)])
    return torch.tensor(centres, dtype=torch.float64), tokens


def padded_window_reference(probabilities: torch.Tensor, height: int, width: int, window: int, patch: float,
                            batch: int, heads: int) -> dict[str, torch.Tensor]:
    """Per statistic (MAD, entropy, self mass, prefix mass), ``[batch, heads, height * width]`` per image token
    (row-major), from one windowed call's probabilities (batch, then window, then head: ``[B * nW * H, N, N]`` or
    ``[B * nW, H, N, N]``) placed by :func:`padded_window_slots`. Every key has a cell (padding keys past the map's
    edge), so the prefix mass is 0."""
    centres, tokens = padded_window_slots(height, width, window, patch)
    windows, slots = centres.shape[:2]
    attn = probabilities.reshape(batch, windows, heads, slots, slots)
    distance = torch.cdist(centres, centres)  # [nW, N, N]: query slot to key slot, padding keys included
    per_slot = {
        "mad": (attn * distance[None, :, None]).sum(-1),
        "entropy": -torch.special.xlogy(attn, attn).sum(-1),
        "self_mass": attn.diagonal(dim1=-2, dim2=-1),  # slot i's own key is slot i, in every window
        "prefix_mass": torch.zeros(attn.shape[:-1], dtype=torch.float64),
    }
    out = {name: torch.full((batch, heads, height * width), float("nan"), dtype=torch.float64) for name in per_slot}
    for w in range(windows):
        for slot, token in enumerate(tokens[w]):
            if token >= 0:
                for name, values in per_slot.items():
                    out[name][:, :, token] = values[:, w, :, slot]
    assert not out["mad"].isnan().any()  # every image token is the query of exactly one slot
    return out


def record_logits_unchanged(model: torch.nn.Module, *inputs, stats, **kwargs):
    """One recording of ``model(*inputs, **kwargs)`` with ``stats``; its ``logits`` must be the plain forward's, bit
    for bit."""
    with torch.no_grad():
        plain = model(*inputs, **kwargs).logits
        with vitmad.record(model, stats=list(stats)) as rec:
            recorded = model(*inputs, **kwargs).logits
    assert torch.equal(plain, recorded)
    return rec


def record_both_reductions(model: torch.nn.Module, run, output, stats, **kwargs) -> tuple:
    """``(mean recording, per-token recording)`` of ``run(model)`` with ``stats``; the output (``output`` of what
    ``run`` returns) unchanged by recording, bit for bit."""
    with torch.no_grad():
        plain = output(run(model))
        with vitmad.record(model, stats=stats, **kwargs) as rec:
            recorded = output(run(model))
        with vitmad.record(model, stats=stats, reduction="none", **kwargs) as rec_tokens:
            run(model)
    assert torch.equal(plain, recorded)
    assert rec.layers == rec_tokens.layers
    return rec, rec_tokens


def run_hooked(handles, run) -> None:
    """``run()`` without grad with the hooks of ``handles`` on, removed afterwards, also where ``run``
    raises (a hook left on a module would read the next test's forward)."""
    try:
        with torch.no_grad():
            run()
    finally:
        for handle in handles:
            handle.remove()


def attention_outputs(model: torch.nn.Module, accepts, run) -> list[torch.Tensor]:
    """The second output (its softmax probabilities), float64, of each call of the modules ``accepts`` takes, in
    call order, in one ``run(model)`` without grad: attention classes that return their probabilities."""
    maps, handles = [], []
    for module in model.modules():
        if accepts(module):
            handles.append(module.register_forward_hook(lambda m, a, out: maps.append(out[1].detach().double())))
    run_hooked(handles, lambda: run(model))
    return maps


def check_sam_windows(rec, rec_tokens, maps, height: int, width: int, window: int, patch: float, batch: int,
                      heads: int, first: int = 0) -> None:
    """Layers ``first`` to ``first + 2`` of the recordings (SAM-style blocks: windowed, global, windowed) against
    their probabilities ``maps``, placed by :func:`padded_window_reference`: geometry, mean and per-token values of
    every statistic of the reference. Per-token values are read per call (layers on other grids do not stack)."""
    assert len(maps) == 3
    padded = (math.ceil(height / window) * window, math.ceil(width / window) * window)
    tol = {"rtol": 1e-5, "atol": 1e-4}  # float32 probabilities, float32 accumulation in the ops
    tokens = rec_tokens.calls[-1]
    for i, (probabilities, w) in enumerate(zip(maps, [window, 0, window], strict=True)):
        expected = padded_window_reference(probabilities, height, width, w, patch, batch, heads)
        geometry = rec.geometry[first + i]
        assert geometry.grid == (height, width) and geometry.stride == (patch, patch) and geometry.heads == heads
        assert geometry.attention == ("global" if w == 0 else f"window {w}x{w}" + (
            f" (map {height}x{width} padded to {padded[0]}x{padded[1]})" if padded != (height, width) else ""))
        for name, values in expected.items():
            per_token = tokens.per_layer if name == "mad" else tokens.statistics[name]
            torch.testing.assert_close(rec.stats[name][first + i].double(), values.mean(-1), **tol)
            torch.testing.assert_close(per_token[first + i].double(), values, **tol)


# DETR-style detectors over a timm ResNet: name -> (config class, model class, modeling module whose
# eager_attention_forward computes their softmax, or None where the attention computes it itself and returns it).
DETR_MODELS = {
    "detr": ("DetrConfig", "DetrForObjectDetection", "detr.modeling_detr"),
    "conditional_detr": ("ConditionalDetrConfig", "ConditionalDetrForObjectDetection",
                         "conditional_detr.modeling_conditional_detr"),
    "dab_detr": ("DabDetrConfig", "DabDetrForObjectDetection", None),
    "table_transformer": ("TableTransformerConfig", "TableTransformerForObjectDetection", None),
}


def tiny_detr(name: str, **overrides) -> torch.nn.Module:
    """A tiny ``DETR_MODELS[name]`` detector (32 wide, 2 heads, 5 object queries, timm's resnet10t), sharpened
    after a seed; ``overrides`` set the config (layer counts, heads, backbone)."""
    import transformers

    config_cls, model_cls, _ = DETR_MODELS[name]
    settings = dict(d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                    decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, num_queries=5,
                    use_timm_backbone=True, backbone="resnet10t")
    if name == "dab_detr":
        settings["hidden_size"] = settings.pop("d_model")
    settings.update(overrides)
    torch.manual_seed(0)
    return sharpened(getattr(transformers, model_cls)(getattr(transformers, config_cls)(**settings)))


def pad_second_image(pixels: torch.Tensor, kept: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """A DETR-style padded batch of two: the first image whole, the second ``kept`` px at the top left, zeros past
    it; and its ``pixel_mask`` ``[2, H, W]`` (1 on the image)."""
    mask = torch.ones(2, *pixels.shape[-2:], dtype=torch.long)
    mask[1, kept[0]:] = 0
    mask[1, :, kept[1]:] = 0
    return pixels * mask[:, None], mask


def mask_on_grid(mask: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """``[B, h * w]``: nearest sampling of ``pixel_mask`` at each token of an ``h x w`` map, as DETR's models
    downsample it (token ``(r, c)`` reads pixel ``(floor(r H / h), floor(c W / w))``)."""
    height, width = mask.shape[-2:]
    rows = [math.floor(r * height / grid[0]) for r in range(grid[0])]
    cols = [math.floor(c * width / grid[1]) for c in range(grid[1])]
    return mask[:, rows][:, :, cols].reshape(mask.shape[0], -1).bool()


def patch_indexed_image_and_video(h: int, w: int, frames: int, patch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(image [1, 3, h * patch, w * patch], video [1, frames, 3, ...])`` whose every pixel of patch ``(r, c)``
    holds its row-major index ``r * w + c`` (plus ``100 f`` in frame ``f``): the patch order a processor makes
    reads off its output."""
    image = torch.zeros(1, 3, h * patch, w * patch)
    for r in range(h):
        for c in range(w):
            image[..., r * patch:(r + 1) * patch, c * patch:(c + 1) * patch] = r * w + c
    video = torch.stack([image[0] + 100 * f for f in range(frames)])[None]
    return image, video


def register_flash_like(name: str) -> str:
    """Registers under ``name`` (a flash name: vitmad reads it with flash attention's rules) an attention function
    that attends the packed chunks of ``cu_seq_lens_q`` as flash attention's variable-length call does, with SDPA
    and a block-diagonal mask, so that a packed tower's flash path runs on the CPU; returns ``name``."""
    from transformers import AttentionInterface

    def flash_like(module, query, key, value, attention_mask=None, cu_seq_lens_q=None, **kwargs):
        lengths = (cu_seq_lens_q[1:] - cu_seq_lens_q[:-1]).tolist()
        mask = torch.block_diag(*[torch.ones(n, n, dtype=torch.bool) for n in lengths])
        output = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask,
                                                                  scale=kwargs.get("scaling"))
        return output.transpose(1, 2).contiguous(), None

    AttentionInterface.register(name, flash_like)
    return name


def eager_attention_calls(modeling, model: torch.nn.Module, *inputs,
                          eager_function: str = "eager_attention_forward", switched: torch.nn.Module | None = None,
                          **kwargs) -> list:
    """``[(attention module, probabilities [1, H, n, n] float64)]`` of every call of ``modeling``'s eager attention
    function (``eager_function``: Llama 4's vision attention has its own, ``vision_eager_attention_forward``) in one
    forward of ``model`` (switched to eager attention, or its submodule ``switched`` alone: Depth Anything and
    UperNet take no implementation but their backbone's), in call order."""
    original = getattr(modeling, eager_function)
    calls = []

    def capture(module, *args, **kw):
        output, probabilities = original(module, *args, **kw)
        calls.append((module, probabilities.detach().double()))
        return output, probabilities

    (model if switched is None else switched).set_attn_implementation("eager")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(modeling, eager_function, capture)
        with torch.no_grad():
            model(*inputs, **kwargs)
    return calls


def record_packed_forward(model: torch.nn.Module, *inputs, **kwargs):
    """One forward of a transformers vision tower as it is, one recorded with ``reduction="none"`` and one with
    the mean; the recorded output must be the plain one, bit for bit. Returns the two recordings."""
    with torch.no_grad():
        plain = model(*inputs, **kwargs).last_hidden_state
        with vitmad.record(model, reduction="none") as rec:
            recorded = model(*inputs, **kwargs).last_hidden_state
        with vitmad.record(model) as rec_mean:
            model(*inputs, **kwargs)
    assert torch.equal(plain, recorded)
    return rec, rec_mean


def check_packed_values(rec, expected_per_layer, grids, attention_kinds, tol: dict) -> None:
    """A packed recording (``reduction="none"``) against the reference ``expected_per_layer[layer][image]``
    ``[H, h * w]``: per image its own tokens first, NaN after them, on its own grid."""
    assert len(rec.layers) == len(expected_per_layer)
    for layer, (expected, values, geometry) in enumerate(zip(expected_per_layer, rec.per_layer, rec.geometry)):
        assert values.shape == (len(grids), expected[0].shape[0], max(h * w for h, w in grids))
        assert geometry.grid is None and geometry.image_grids == tuple(grids)
        assert geometry.attention.startswith(attention_kinds[layer])
        for image, (h, w) in enumerate(grids):
            torch.testing.assert_close(values[image, :, :h * w].double(), expected[image], **tol)
            assert values[image, :, h * w:].isnan().all()


PACKED_STATS = ["mad", "entropy", "prefix_mass", "prefix_maps"]


def packed_chunk_references(calls: list, layers: list[tuple[torch.nn.Module, list]], grids, patch: int) -> list[dict]:
    """The float64 reference of a packed tower without prefix tokens, from its eager ``calls`` (conftest
    :func:`eager_attention_calls`): per layer, ``"mad"``, ``"entropy"`` and ``"prefix_mass"`` (zero), each a list
    per fold entry (an image or a video's slice, ``grids[i]``) of ``[H, h * w]`` row-major on its grid.

    Args:
        layers: per layer, its attention module and its calls' chunks in call order, each ``(entry, cells)``: the
            fold entry and the ``(row, col)`` of its tokens in sequence order; a query's keys are its own chunk's.
    """
    references, used = [], 0
    for module, chunks in layers:
        values = {stat: [torch.full((calls[0][1].shape[1], h * w), math.nan, dtype=torch.float64) for h, w in grids]
                  for stat in ("mad", "entropy", "prefix_mass")}
        entropies, uniform = 0.0, 0.0
        for entry, cells in chunks:
            called, probabilities = calls[used]
            used += 1
            assert called is module and probabilities.shape[-1] == len(cells)
            probabilities = probabilities[0]  # [H, n, n]
            centres = torch.tensor([[(r + 0.5) * patch, (c + 0.5) * patch] for r, c in cells], dtype=torch.float64)
            entropy = -torch.special.xlogy(probabilities, probabilities).sum(-1)
            entropies, uniform = entropies + float(entropy.sum()), uniform + entropy.numel() * math.log(len(cells))
            order = torch.tensor([r * grids[entry][1] + c for r, c in cells])  # sequence -> row-major index
            values["mad"][entry][:, order] = (probabilities * torch.cdist(centres, centres)).sum(-1)
            values["entropy"][entry][:, order] = entropy
            values["prefix_mass"][entry][:, order] = 0.0
        assert all(not v.isnan().any() for stat in values.values() for v in stat), "the geometry misses a token"
        # Far from uniform attention (entropy ln n over its n keys, summed over the layer's queries), so that a token
        # placed wrongly would show.
        assert entropies < 0.8 * uniform
        references.append(values)
    assert used == len(calls)
    return references


def record_packed_statistics(model: torch.nn.Module, *inputs, **kwargs) -> tuple:
    """Two recordings of one forward of a packed tower, with every statistic: the means, and per query. Their
    outputs (``last_hidden_state``, and ``pooler_output`` where the tower has one) must be the plain one, bit for
    bit."""
    with torch.no_grad():
        plain = model(*inputs, **kwargs)
        with vitmad.record(model, stats=PACKED_STATS) as rec:
            recorded = model(*inputs, **kwargs)
        with vitmad.record(model, reduction="none", stats=PACKED_STATS) as per_query:
            again = model(*inputs, **kwargs)
    for field in ("last_hidden_state", "pooler_output"):
        if getattr(plain, field, None) is not None:
            assert torch.equal(getattr(plain, field), getattr(recorded, field)), field
            assert torch.equal(getattr(plain, field), getattr(again, field)), field
    return rec, per_query


def check_packed_statistics(rec, per_query, references: list[dict], grids, kinds: list[str], patch: int) -> None:
    """Recordings of :func:`record_packed_statistics` against :func:`packed_chunk_references`: geometry, then MAD,
    entropy and prefix mass per query (image ``i``'s on its own grid row-major, NaN after) and their means."""
    # float32 recordings against float64 on the eager float32 probabilities; MADs are 4 to 40 px, the others <= 5.
    tol, stat_tol = {"rtol": 1e-5, "atol": 1e-4}, {"rtol": 1e-5, "atol": 1e-5}
    assert rec.skipped == {} and len(rec.layers) == len(references) == len(kinds)
    longest = max(h * w for h, w in grids)
    for layer, (expected, kind) in enumerate(zip(references, kinds)):
        geometry = per_query.geometry[layer]
        assert geometry.grid is None and geometry.image_grids == tuple(grids)
        assert geometry.stride == (patch, patch) and geometry.attention == kind
        assert geometry.num_prefix_tokens is None and rec.prefix_maps[layer] is None
        for stat, close in (("mad", tol), ("entropy", stat_tol), ("prefix_mass", stat_tol)):
            tokens = per_query.stats[stat][layer]
            assert tokens.shape == (len(grids), expected[stat][0].shape[0], longest)
            for image, (h, w) in enumerate(grids):
                torch.testing.assert_close(tokens[image, :, :h * w].double(), expected[stat][image], **close,
                                           msg=lambda m, s=stat: f"layer {layer} {s}: {m}")
                assert tokens[image, :, h * w:].isnan().all()
            means = torch.stack([values.mean(-1) for values in expected[stat]])  # [n_images, H]
            torch.testing.assert_close(rec.stats[stat][layer].double(), means, **close)
        torch.testing.assert_close(per_query.per_layer[layer], per_query.stats["mad"][layer], equal_nan=True)
        torch.testing.assert_close(rec.mad[layer], rec.stats["mad"][layer])


# Odd sides, upscaled and downscaled to a model's size: the preprocessing tests of the library specs (torchvision:,
# open_clip:) compare vitmad's resizing with the library's own on these.
ODD_IMAGE_SIZES = [(301, 227), (97, 143), (260, 500), (255, 257)]


def write_sized_images(folder: Path, sizes=ODD_IMAGE_SIZES, seed: int = 0) -> Path:
    """Random RGB PNGs ``0.png``, ``1.png``, ... of ``sizes`` (``(height, width)``) in ``folder``; returns it."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i, (h, w) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def write_images(folder: Path, count: int, *, seed: int = 0, nested: bool = True) -> list[Path]:
    """``count`` random RGB images of varied sizes and formats (some in a subfolder), sorted by path."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        sub = folder / "sub" if nested and i % 3 == 2 else folder
        sub.mkdir(parents=True, exist_ok=True)
        height, width = int(rng.integers(20, 70)), int(rng.integers(20, 70))
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        path = sub / f"img_{i:03d}.{('png', 'jpg', 'bmp')[i % 3]}"
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return sorted(paths)


def write_corrupt_images(folder: Path) -> list[Path]:
    """A file with an image extension that is not an image, and a truncated PNG."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    garbage = folder / "broken_garbage.jpg"
    garbage.write_bytes(b"this is not an image at all")
    truncated = folder / "broken_truncated.png"
    Image.fromarray(np.zeros((40, 40, 3), dtype=np.uint8) + 90).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:60])
    return [garbage, truncated]


# Fixtures -------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A saved tiny HF ViT (2 layers, 2 heads, 32 px, patch 8) for ``hf:<folder>`` specs. Read-only."""
    return save_tiny_hf_vit(tmp_path_factory.mktemp("tiny_vit"))


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> Path:
    """``IMAGE_COUNT`` generated images of varied sizes and formats, some in a subfolder. Read-only."""
    folder = tmp_path_factory.mktemp("images")
    write_images(folder, IMAGE_COUNT)
    return folder


@pytest.fixture
def restore_threads():
    """Restores torch's intra-op thread count after a test that changes it."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


class SoftmaxOutputs(torch.overrides.TorchFunctionMode):
    """While active, keeps every ``F.softmax`` output of rank ``rank``: a model's own attention probabilities
    where its attention is an explicit softmax (the reference of window designs the tests place by hand)."""

    def __init__(self, rank: int):
        super().__init__()
        self.rank = rank
        self.maps: list[torch.Tensor] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        if func is torch.nn.functional.softmax and result.dim() == self.rank:
            self.maps.append(result)
        return result


def profile_one_process_and_two_ranks(args: list[str], folder: Path, two_ranks_only=()) -> tuple[Path, Path]:
    """``vitmad profile *args`` in this process into ``folder / "one"``, then under torchrun with two ranks into
    ``folder / "two"`` (with ``two_ranks_only`` too); both folders. This process runs with one thread, as each rank
    does, since float32 products round with the thread count; its thread count is restored after."""
    from vitmad.cli import main

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["profile", *args, "--out", str(folder / "one")]) == 0
    finally:
        torch.set_num_threads(threads)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           "-m", "vitmad", "profile", *args, "--out", str(folder / "two"), *two_ranks_only],
                          env=subprocess_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return folder / "one", folder / "two"


def state_file_saver(build, folder: Path):
    """``save(name)``: the state dict of ``build(name)`` saved to ``folder / f"{name}.pt"``; the file and the state
    dict (a spec's local weights file: the torchvision: and open_clip: tests)."""
    def save(name: str):
        state = build(name).state_dict()
        path = folder / f"{name}.pt"
        torch.save(state, path)
        return path, state
    return save


def tensor_softmax_outputs(run) -> list[torch.Tensor]:
    """Every ``Tensor.softmax`` result of ``run()`` without grad, in order: the probabilities of modules that call
    the method themselves (MViT's pooling attention in timm and torchvision, LowFormer's, segment_anything's
    encoder)."""
    maps, original = [], torch.Tensor.softmax

    def spy(self, *args, **kwargs):
        maps.append(original(self, *args, **kwargs))
        return maps[-1]

    with torch.no_grad(), mock.patch.object(torch.Tensor, "softmax", spy):
        run()
    return maps


def tensor_softmax_maps(model, *inputs) -> list[torch.Tensor]:
    """:func:`tensor_softmax_outputs` of one forward of ``model``."""
    return tensor_softmax_outputs(lambda: model(*inputs))


def sam_random_tables(model: torch.nn.Module) -> torch.nn.Module:
    """A SAM-style encoder made to tell places apart: sharpened attention, random relative-position tables and
    absolute position embedding (zeros at init), and a random patch embedding (std 1e-10 at init: every image would
    give the same tokens), so that a token at a wrong place, a head in a wrong slot or one image's values given to
    another change the values."""
    sharpened(model)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "rel_pos" in name or name.endswith("pos_embed"):
                parameter.normal_()
        for module in model.modules():
            if isinstance(module, torch.nn.Conv2d):
                module.weight.normal_(std=0.25)
    return model


def hiera_random_tables(model: torch.nn.Module) -> torch.nn.Module:
    """A Hiera trunk (sam2's, ultralytics' copy) made to tell places apart: sharpened projections, its qkv drawn wider
    still (its first stage is 16 wide, one head, and std 0.25 leaves it near uniform), random position embeddings
    (zeros at init) and patch embedding."""
    sharpened(model)
    with torch.no_grad():
        for module in model.modules():
            if type(module).__name__ == "MultiScaleAttention":
                module.qkv.weight.normal_(std=0.5)
        for name, parameter in model.named_parameters():
            if "pos_embed" in name:
                parameter.normal_()
        for module in model.modules():
            if isinstance(module, torch.nn.Conv2d):
                module.weight.normal_(std=0.25)
    return model


def sdpa_probabilities(run, dtype: torch.dtype = torch.float64) -> list[torch.Tensor]:
    """``softmax(q k^T * scale + attn_mask)`` of every SDPA call of ``run()`` (sam2's and ultralytics' Hiera, SAM 3's
    ViT, transformers' Swin: an additive or boolean mask, a scale or the default ``1 / sqrt(d)``), in call order, as
    float64; computed in ``dtype``: float64 is the reference, float32 what PyTorch's own float32 softmax gives from the
    same queries and keys (:func:`assert_close_within_float32`). SDPA itself still computes the model's output."""
    maps, original = [], torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
        assert dropout_p == 0 and not is_causal and not kwargs.get("enable_gqa")
        factor = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
        scores = q.to(dtype) @ k.to(dtype).transpose(-2, -1) * factor
        if attn_mask is not None:
            scores = (scores.masked_fill(~attn_mask, -math.inf) if attn_mask.dtype == torch.bool
                      else scores + attn_mask.to(dtype))
        maps.append(scores.softmax(-1).double())
        return original(q, k, v, attn_mask, dropout_p, is_causal, scale=scale, **kwargs)

    with torch.no_grad(), mock.patch.object(torch.nn.functional, "scaled_dot_product_attention", spy):
        run()
    return maps


# How many times the error of PyTorch's own float32 softmax (from the same queries and keys) a float32 recording may
# make: flash-attention's rule (a kernel judged against its precision's error in PyTorch's computation), with room for
# the online softmax's rescalings and the vectorised exponential. Where sharpened attention puts logits in the tens,
# float32 logits alone move a MAD by a few 1e-5 relative, past the fixed tolerances.
FLOAT32_ERROR_FACTOR = 4


def assert_close_within_float32(got: torch.Tensor, expected: torch.Tensor, float32_expected: torch.Tensor, *,
                                rtol: float, atol: float) -> None:
    """``got`` close to the float64 ``expected`` within ``rtol`` and ``atol``, ``atol`` raised to
    :data:`FLOAT32_ERROR_FACTOR` times the largest error of ``float32_expected``, the same quantity from PyTorch's
    float32 softmax, where that is larger."""
    floor = FLOAT32_ERROR_FACTOR * float((float32_expected.double() - expected).abs().max())
    torch.testing.assert_close(got.double(), expected, rtol=rtol, atol=max(atol, floor))


def pooled_window_reference(probabilities: torch.Tensor, batch: int, height: int, width: int, window: int, q: int,
                            stride: int) -> tuple[tuple[int, int], torch.Tensor, torch.Tensor]:
    """One call ``[B * nW, heads, Nq, Nk]`` of a SAM 2 Hiera block (sam2's, ultralytics' copy) on an ``height x width``
    map of ``stride`` px cells: SAM's window_partition (zero padding at the bottom and right, windows and tokens
    row-major; window 0: global), queries max-pooled by ``q`` in each window, each at the centre of the cells it
    pools (none where they are all padding). The query grid, and MAD and entropy ``[B, heads, gh * gw]`` per query
    of it, row-major."""
    wh, ww = (window, window) if window else (height, width)
    rows, cols = math.ceil(height / wh), math.ceil(width / ww)
    pw = (wh // q, ww // q)
    grid = (min(math.ceil(height / q), rows * pw[0]), min(math.ceil(width / q), cols * pw[1]))
    heads = probabilities.shape[1]
    attention = probabilities.reshape(batch, rows * cols, heads, pw[0] * pw[1], wh * ww)
    mad = torch.full((batch, heads, grid[0] * grid[1]), math.nan, dtype=torch.float64)
    entropy = mad.clone()
    for n in range(rows * cols):
        wr, wc = divmod(n, cols)
        keys = torch.tensor([((wr * wh + t // ww + 0.5) * stride, (wc * ww + t % ww + 0.5) * stride)
                             for t in range(wh * ww)], dtype=torch.float64)
        for slot in range(pw[0] * pw[1]):
            r, c = wr * pw[0] + slot // pw[1], wc * pw[1] + slot % pw[1]  # the pooled cell on the pooled grid
            if r * q >= height or c * q >= width:  # its q x q cell is all padding: no query
                continue
            centre = torch.tensor([(r + 0.5) * stride * q, (c + 0.5) * stride * q], dtype=torch.float64)
            row = attention[:, n, :, slot]
            mad[..., r * grid[1] + c] = (row * (keys - centre).norm(dim=-1)).sum(-1)
            entropy[..., r * grid[1] + c] = -torch.special.xlogy(row, row).sum(-1)
    assert not mad.isnan().any()
    return grid, mad, entropy


def write_random_clip(path, frames: int, height: int, width: int, seed: int, rate: int) -> None:
    """An mpeg4 clip of ``frames`` frames of uniform random RGB noise (PyAV), ``rate`` frames a second."""
    import av
    import numpy as np

    rng = np.random.default_rng(seed)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for _ in range(frames):
            array = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")))
        container.mux(stream.encode())


def decoded_frames(path):
    """``[T, H, W, 3]`` uint8: every frame of the clip, as PyAV decodes it."""
    import av
    import numpy as np

    with av.open(str(path)) as container:
        return np.stack([np.asarray(frame.to_image().convert("RGB")) for frame in container.decode(video=0)])


def check_interrupted_resume_equals_one_run(spec: str, sources, checkpoint) -> None:
    """A profile of ``spec`` over ``sources`` (batch 1, CPU) interrupted in its second batch by a KeyboardInterrupt,
    then resumed from ``checkpoint``, equals the run that was not interrupted: images, grids and the sums, exactly."""
    import pytest
    import torch

    import vitmad
    from vitmad.profiling.models import load_model

    full = vitmad.profile(spec, sources, batch_size=1, device="cpu")
    loaded, calls = load_model(spec), []

    def interrupt(module, args, kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt

    handle = loaded.module.register_forward_pre_hook(interrupt, with_kwargs=True)
    with pytest.raises(KeyboardInterrupt):
        vitmad.profile(loaded, sources, batch_size=1, device="cpu", checkpoint=checkpoint)
    handle.remove()
    assert torch.load(checkpoint, weights_only=True)["batches_done"] == 1
    resumed = vitmad.profile(loaded, sources, batch_size=1, device="cpu", checkpoint=checkpoint, resume=True)
    assert resumed.images == full.images and resumed.image_grids == full.image_grids
    assert torch.equal(resumed.stats.total, full.stats.total)
    assert torch.equal(resumed.stats.total_sq, full.stats.total_sq)


class KernelInputs(TorchDispatchMode):
    """The q and k of every SDPA kernel call, as the kernel received them (below autocast's casts): a dispatch mode
    to enter around a model's forward."""

    def __init__(self):
        super().__init__()
        self.qk = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if "scaled_dot_product" in str(func):
            self.qk.append((args[0].detach().clone(), args[1].detach().clone()))
        return func(*args, **(kwargs or {}))
