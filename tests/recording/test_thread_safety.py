"""Thread safety: 8 Python threads calling the ops and ``vitmad.record`` on separate models at the same time get
the results of single-threaded runs.

``record`` keeps per-process state (transformers' registered wrapper and the table of recorded modules, timm's
torch-function modes), so concurrent recordings of different models must not see each other's layers.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import vitmad
from conftest import random_attention
from vitmad.ops.reference import mad_reference

THREADS = 8
ROUNDS = 5


def _tiny_models() -> list[torch.nn.Module]:
    """Four transformers ViTs and four timm ViTs (when installed), random weights, different depths and heads."""
    models = []
    transformers = pytest.importorskip("transformers")
    for i in range(4):
        torch.manual_seed(i)
        config = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=24, num_hidden_layers=1 + i % 2,
                                        num_attention_heads=2 + i % 2, intermediate_size=32)
        models.append(transformers.ViTModel(config, add_pooling_layer=False).eval())
    try:
        import timm
    except ModuleNotFoundError:
        timm = None
    for i in range(4):
        torch.manual_seed(10 + i)
        if timm is not None:
            models.append(timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=24,
                                            depth=1 + i % 2, num_heads=2, reg_tokens=i % 2 * 2).eval())
        else:
            config = transformers.ViTConfig(image_size=32, patch_size=4, hidden_size=24, num_hidden_layers=2,
                                            num_attention_heads=4, intermediate_size=32)
            models.append(transformers.ViTModel(config, add_pooling_layer=False).eval())
    return models


def _work(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """One thread's job: record the model on its own images, and call both ops on its own tensors."""
    gen = torch.Generator().manual_seed(seed)
    pixels = torch.randn(2, 3, 32, 32, generator=gen)
    n = 1 + (4 + seed) ** 2
    attn = random_attention((2, 3, n, n), seed=seed)
    q, k = (torch.randn(2, 3, n, 16, generator=gen) for _ in range(2))
    with torch.no_grad(), vitmad.record(model) as rec:
        model(pixels)
    return {
        "record": rec.mad.clone(),
        "layers": rec.layers,
        "mad": vitmad.mad(attn, 16, renormalize=bool(seed % 2)),
        "mad_qk": vitmad.mad_qk(q, k, 16, reduction="none"),
        "attn": attn,
    }


def test_ops_and_record_from_eight_threads_match_single_threaded_runs():
    models = _tiny_models()
    expected = [_work(model, seed) for seed, model in enumerate(models)]
    start = threading.Barrier(THREADS)  # all threads inside the ops and hooks at the same time

    def run(seed: int) -> list[dict]:
        start.wait()
        return [_work(models[seed], seed) for _ in range(ROUNDS)]

    with ThreadPoolExecutor(THREADS) as pool:
        results = list(pool.map(run, range(THREADS)))

    for seed, (ref, outs) in enumerate(zip(expected, results, strict=True)):
        # The ops are bit-identical for any load; the single-threaded ops also match the float64 reference.
        torch.testing.assert_close(ref["mad"].double(), mad_reference(ref["attn"], 16, renormalize=bool(seed % 2)),
                                   rtol=2e-5, atol=2e-5)
        for out in outs:
            assert out["layers"] == ref["layers"], "a recording saw another model's layers"
            assert out["record"].shape == ref["record"].shape
            # The model's own matmuls may split work differently under load: float32 rounding only.
            torch.testing.assert_close(out["record"], ref["record"], rtol=1e-5, atol=1e-4)
            assert torch.equal(out["mad"], ref["mad"]) and torch.equal(out["mad_qk"], ref["mad_qk"])
    # Nothing left behind: every model runs unrecorded and unchanged afterwards.
    from vitmad.recording import transformers_capture as hf_hooks

    assert not hf_hooks._ACTIVE


def _one_model(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "transformers":
        transformers = pytest.importorskip("transformers")
        config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                                        intermediate_size=64, image_size=64, patch_size=16)
        return transformers.ViTModel(config, add_pooling_layer=False).eval()
    timm = pytest.importorskip("timm")
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, depth=3, embed_dim=32,
                              num_heads=2).eval()
    for block in model.blocks:
        block.attn.fused_attn = kind == "timm-fused"  # the capture by SDPA call, or by softmax (a mode per layer)
    return model


def _attention_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    if hasattr(model, "blocks"):
        return [block.attn for block in model.blocks]
    return [layer.attention for layer in model.layers]  # transformers 5's ViT


@pytest.mark.parametrize("kind", ["timm-fused", "timm-explicit", "transformers"])
def test_a_second_thread_is_refused_while_another_runs_the_recorded_model(kind):
    """One recorded model, two threads: while a worker thread is inside its forward (held in its second attention
    layer), a forward from this thread is refused with a clear error and leaves the worker's call intact; once the
    worker is done, this thread's forward is recorded as the next call."""
    model = _one_model(kind)
    gen = torch.Generator().manual_seed(3)
    pixels_a, pixels_b = torch.randn(2, 3, 64, 64, generator=gen), torch.randn(3, 3, 64, 64, generator=gen)
    with torch.no_grad():
        expected_out = model(pixels_a)
        expected = {}
        for name, pixels in (("a", pixels_a), ("b", pixels_b)):
            with vitmad.record(model) as alone:
                model(pixels)
            expected[name] = alone.mad
    inside, release = threading.Event(), threading.Event()
    worker_out: list = []
    layers = _attention_layers(model)

    def hold(module, args) -> None:
        if threading.current_thread().name == "worker":
            inside.set()
            release.wait(30)

    holding = layers[1].register_forward_pre_hook(hold)

    def work() -> None:
        with torch.no_grad():
            worker_out.append(model(pixels_a))

    try:
        with torch.no_grad(), vitmad.record(model) as rec:
            worker = threading.Thread(target=work, name="worker")
            worker.start()
            assert inside.wait(30), "the worker never reached its second attention layer"
            with pytest.raises(RuntimeError, match=r"thread 'worker' is inside a forward of it.*one thread at a time"):
                model(pixels_b)
            if kind != "transformers":  # a recorded layer called on its own is refused as well
                tokens = torch.randn(3, 17, 32, generator=gen)
                with pytest.raises(RuntimeError, match="one thread at a time"):
                    layers[0](tokens)
            release.set()
            worker.join(30)
            assert not worker.is_alive() and len(worker_out) == 1
            assert len(rec.calls) == 1
            torch.testing.assert_close(rec.mad, expected["a"], rtol=0, atol=0)
            model(pixels_b)  # one thread after another: recorded
    finally:
        release.set()
        holding.remove()
    torch.testing.assert_close(worker_out[0], expected_out, rtol=0, atol=0)
    assert len(rec.calls) == 2
    torch.testing.assert_close(rec.calls[0].mad, expected["a"], rtol=0, atol=0)
    torch.testing.assert_close(rec.calls[1].mad, expected["b"], rtol=0, atol=0)
    assert torch._C._len_torch_function_stack() == 0
