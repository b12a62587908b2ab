"""timm BoTNet (global attention over a CNN stage's map) and HaloNet (blocks attending to their haloed
neighbourhood, padding included), against each model's own softmax placed by geometry written here: the model's
own pad-and-unfold applied to a map of cell centres."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

timm = pytest.importorskip("timm")

import vitmad  # noqa: E402

TOL = {"rtol": 1e-5, "atol": 1e-4}  # the same float32 probabilities read twice; atol in pixels


class _Softmaxes(TorchFunctionMode):
    """Collects the output of every softmax over the last dim (the models' attention probabilities)."""

    def __init__(self):
        super().__init__()
        self.maps = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in (torch.Tensor.softmax, torch.softmax, F.softmax) and out.dim() >= 3:
            self.maps.append(out)
        return out


def _centres(height, width, stride, offset=0):
    rows = (torch.arange(height, dtype=torch.float64) - offset + 0.5) * stride
    cols = (torch.arange(width, dtype=torch.float64) - offset + 0.5) * stride
    return torch.stack(torch.meshgrid(rows, cols, indexing="ij"))  # [2, H, W]


def _run(name, size):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    pixels = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    inputs = {}

    def keep(module, args, name):
        inputs[name] = module, args[0].shape

    for module_name, module in model.named_modules():
        if type(module).__name__ in ("BottleneckAttn", "HaloAttn"):
            module.register_forward_pre_hook(lambda m, args, n=module_name: keep(m, args, n))
    with torch.no_grad():
        plain = model(pixels)
        with _Softmaxes() as spy:
            model(pixels)
        with vitmad.record(model, reduction="none") as rec:
            recorded = model(pixels)
    assert torch.equal(recorded, plain)
    assert len(spy.maps) == len(rec.layers) == len(inputs)
    return rec, spy.maps, inputs


def test_botnet_global_attention_over_each_stage_map():
    rec, maps, inputs = _run("botnet26t_256", 256)
    for layer, attn, per_token, geometry in zip(rec.layers, maps, rec.per_layer, rec.geometry):
        module, shape = inputs[layer]
        height, width = shape[-2:]
        stride = 256 / height  # 256 px over a map of 16 or 8: no rounding here
        points = _centres(height, width, stride).reshape(2, -1).T
        expected = (attn.double() * torch.cdist(points, points)).sum(-1).view(2, module.num_heads, -1)
        assert geometry.stride == (stride, stride)
        torch.testing.assert_close(per_token.double(), expected, **TOL)


def test_halonet_blocks_with_halo_keys_past_the_edge():
    rec, maps, inputs = _run("halonet26t", 256)
    for layer, attn, per_token, geometry in zip(rec.layers, maps, rec.per_layer, rec.geometry):
        module, shape = inputs[layer]
        height, width = shape[-2:]
        stride = 256 / height
        block, halo, step = module.block_size, module.halo_size, module.block_stride
        window, side = block + 2 * halo, block // step
        # Keys: the model's zero padding and unfold, applied to the centres of the padded map's cells.
        padded = _centres(height + 2 * halo, width + 2 * halo, stride, offset=halo)
        keys = padded.unfold(1, window, block).unfold(2, window, block)  # [2, bh, bw, window, window]
        keys = keys.reshape(2, -1, window * window).permute(1, 2, 0)  # [blocks, keys, 2]
        # Queries: the stride-`step` map's cells at the centre of their stride cells, cut into blocks of `side`.
        grid = _centres(height // step, width // step, stride * step)
        queries = grid.unfold(1, side, side).unfold(2, side, side).reshape(2, -1, side * side).permute(1, 2, 0)
        per_query = (attn.double().view(2, module.num_heads, *attn.shape[1:])
                     * torch.cdist(queries, keys)).sum(-1)  # [B, heads, blocks, q]
        blocks_h, blocks_w = height // block, width // block
        expected = per_query.view(2, module.num_heads, blocks_h, blocks_w, side, side).permute(0, 1, 2, 4, 3, 5)
        assert geometry.stride == (stride * step, stride * step)
        torch.testing.assert_close(per_token.double(), expected.reshape(2, module.num_heads, -1), **TOL)
