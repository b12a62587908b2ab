"""vitmad.record on models that other libraries wrap: accelerate's big-model dispatch (layers offloaded to the CPU
and to disk, their weights on the meta device between calls, put in place by accelerate's hooks around each
forward) and PEFT's LoRA adapters (the query and value projections replaced by ``lora.Linear`` modules, the model
held as ``base_model.model``). Both are how large vision-language models are loaded and fine-tuned; neither may
change what is recorded or what the model returns.

The reference is the model's own eager attention probabilities (transformers' ``eager_attention_forward``), placed
by the layout written here: a tiny transformers ViT, the class token first, then the 4 x 4 grid of 16 px patches
row-major, patch ``(r, c)`` at ``((r + 0.5) * 16, (c + 0.5) * 16)`` px.
"""

from __future__ import annotations

import importlib

import pytest
import torch

import vitmad
from conftest import check_prefix_and_grid, eager_attention_calls, record_both_reductions, sharpened

transformers = pytest.importorskip("transformers")
vit_modeling = importlib.import_module("transformers.models.vit.modeling_vit")

STATS = ["entropy", "prefix_mass", "prefix_maps"]
GRID, PATCH = (4, 4), 16


def _vit() -> torch.nn.Module:
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64,
                                    image_size=64, patch_size=PATCH)
    torch.manual_seed(0)
    model = sharpened(transformers.ViTModel(config))
    # The initial position and class embeddings make every token alike (near uniform attention): drawn anew, and
    # the query and key projections doubled, so that a token placed at a wrong cell would change the MAD.
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "position" in name or "cls" in name:
                parameter.normal_()
            elif name.endswith(("q_proj.weight", "k_proj.weight")):
                parameter.mul_(2.0)
    return model


def _pixels() -> torch.Tensor:
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def _hidden(output) -> torch.Tensor:
    return output.last_hidden_state


def test_accelerate_offloaded_layers(tmp_path):
    pytest.importorskip("accelerate")
    model, pixels = _vit(), _pixels()
    model.save_pretrained(tmp_path / "vit")
    # Layer 0 stays in memory, layers 1 and 2 are offloaded to disk: their weights are meta tensors until
    # accelerate's pre-forward hook loads them for the call, and freed after it.
    device_map = {"embeddings": "cpu", "layers.0": "cpu", "layers.1": "disk", "layers.2": "disk",
                  "layernorm": "cpu", "pooler": "cpu"}
    offloaded = transformers.ViTModel.from_pretrained(tmp_path / "vit", device_map=device_map,
                                                      offload_folder=tmp_path / "offload").eval()
    assert offloaded.layers[1].attention.q_proj.weight.device.type == "meta"
    with torch.no_grad():
        expected_output = model(pixels).last_hidden_state
    rec, rec_tokens = record_both_reductions(offloaded, lambda m: m(pixels), _hidden, STATS)
    with torch.no_grad():
        assert torch.equal(offloaded(pixels).last_hidden_state, expected_output)
    assert rec.layers == [f"layers.{i}.attention" for i in range(3)]
    maps = [p for _, p in eager_attention_calls(vit_modeling, model, pixels)]
    check_prefix_and_grid(rec, rec_tokens, maps, GRID, PATCH, prefix=1)


def test_peft_lora_adapters():
    peft = pytest.importorskip("peft")
    model, pixels = _vit(), _pixels()
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    # LoRA's B starts at zero (the adapter adds nothing): drawn here, so the adapted queries differ from the base
    # model's and a recording of the base projections alone would show.
    torch.manual_seed(2)
    with torch.no_grad():
        for name, parameter in wrapped.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.5)
    wrapped.eval()
    rec, rec_tokens = record_both_reductions(wrapped, lambda m: m(pixel_values=pixels), _hidden, STATS)
    assert rec.layers == [f"base_model.model.layers.{i}.attention" for i in range(3)]
    maps = [p for _, p in eager_attention_calls(vit_modeling, model, pixels)]
    check_prefix_and_grid(rec, rec_tokens, maps, GRID, PATCH, prefix=1)
    # The adapters change the attention: the base model's own recording differs.
    with torch.no_grad(), wrapped.disable_adapter(), vitmad.record(wrapped) as base:
        wrapped(pixel_values=pixels)
    assert (base.mad - rec.mad).abs().max() > 1e-2


@pytest.mark.parametrize("saved", [["projection"], ["embeddings"]], ids=["projection", "embeddings_nested"])
def test_peft_patch_embedding_trained_whole_beside_lora(saved):
    """``modules_to_save`` keeps a trained copy of the patch embedding beside the frozen original, and the copy runs
    while the adapter is active: vitmad hooked the original, which never ran (every layer refused; with grid=
    given, every forward joined one call). ``["embeddings"]`` also wraps ``embeddings.patch_embeddings`` through the
    outer wrapper, a wrapper never called (QA helper-242). The copy that runs is placed; switching the adapter off
    inside the block starts each call still, and the original's layers are refused, not merged."""
    peft = pytest.importorskip("peft")
    model, pixels = _vit(), _pixels()
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=saved))
    torch.manual_seed(3)
    with torch.no_grad():
        for name, parameter in wrapped.named_parameters():
            if "lora_B" in name or ("modules_to_save" in name and "projection.weight" in name):
                parameter.normal_(std=0.5)  # an adapted model unlike the base one
    wrapped.eval()
    rec, rec_tokens = record_both_reductions(wrapped, lambda m: m(pixel_values=pixels), _hidden, STATS)
    maps = [p for _, p in eager_attention_calls(vit_modeling, wrapped, pixels)]
    check_prefix_and_grid(rec, rec_tokens, maps, GRID, PATCH, prefix=1)
    with torch.no_grad(), vitmad.record(wrapped, grid=list(GRID)) as rec:
        wrapped(pixel_values=pixels)
        wrapped(pixel_values=pixels[:1])
    assert [call.mad.shape for call in rec.calls] == [(3, 2, 2), (3, 1, 2)]
    with torch.no_grad(), vitmad.record(wrapped) as rec, pytest.raises(ValueError, match="had not run in this call"):
        with wrapped.disable_adapter():
            wrapped(pixel_values=pixels)
