"""Thread safety: 8 Python threads calling the ops and ``vitmad.record`` on separate models at the same time get
the results of single-threaded runs.

``record`` keeps per-process state (transformers' registered wrapper and the table of recorded modules, timm's
torch-function modes), so concurrent recordings of different models must not see each other's layers.
"""

from __future__ import annotations

import contextlib
import re
import sys
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


def _held_worker(model: torch.nn.Module, where: torch.nn.Module, run, when=lambda: True) -> tuple[
        threading.Thread, threading.Event, threading.Event, list]:
    """A thread named "worker" that runs ``run()`` and waits at the forward pre-hook of ``where`` (the first time
    ``when()`` holds there), until released."""
    inside, release, outcome = threading.Event(), threading.Event(), []

    def hold(module, args) -> None:
        if threading.current_thread().name == "worker" and when() and not inside.is_set():
            inside.set()
            release.wait(30)

    handle = where.register_forward_pre_hook(hold)

    def work() -> None:
        try:
            with torch.no_grad():
                outcome.append(run())
        except Exception as error:  # noqa: BLE001 (the test reads it)
            outcome.append(error)
        finally:
            handle.remove()

    return threading.Thread(target=work, name="worker"), inside, release, outcome


def _alone(model: torch.nn.Module, run) -> torch.Tensor:
    with torch.no_grad(), vitmad.record(model) as alone:
        run()
    return alone.mad


def _block_by_block(model: torch.nn.Module, pixels: torch.Tensor, gap: torch.nn.Module, before: int) -> torch.Tensor:
    """A timm ViT's forward_features as a user's loop over the blocks, calling ``gap`` (no module of the model)
    before block ``before``."""
    x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(pixels))))
    for i, block in enumerate(model.blocks):
        x = block(gap(x) if i == before else x)
    return model.norm(x)


@pytest.mark.parametrize("kind", ["timm-fused", "timm-explicit"])
def test_forward_features_and_block_loops_from_two_threads_never_mix(kind):
    """Forwards that bypass the model's own call: a worker inside forward_features (between two blocks) keeps
    another thread out; a worker paused outside every module of the model in a loop over the blocks (after its
    patch embedding) lets the other thread's forward run, and is then refused at its next layer, its half call
    dropped."""
    model = _one_model(kind)
    gen = torch.Generator().manual_seed(5)
    pixels_a, pixels_b = torch.randn(2, 3, 64, 64, generator=gen), torch.randn(2, 3, 64, 64, generator=gen)
    expected_b = _alone(model, lambda: model.forward_features(pixels_b))

    worker, inside, release, outcome = _held_worker(model, model.blocks[1], lambda: model.forward_features(pixels_a))
    with torch.no_grad(), vitmad.record(model) as rec:
        worker.start()
        assert inside.wait(30)
        with pytest.raises(RuntimeError, match="thread 'worker' is inside a forward of it"):
            model.forward_features(pixels_b)
        release.set()
        worker.join(30)
    assert isinstance(outcome[0], torch.Tensor) and len(rec.calls) == 1
    torch.testing.assert_close(rec.mad, _alone(model, lambda: model.forward_features(pixels_a)), rtol=0, atol=0)

    gap = torch.nn.Identity()  # no module of the model: paused there, the worker holds nothing
    worker, inside, release, outcome = _held_worker(model, gap, lambda: _block_by_block(model, pixels_a, gap, 0))
    with torch.no_grad(), vitmad.record(model) as rec:
        worker.start()
        assert inside.wait(30)
        model.forward_features(pixels_b)  # the worker holds nothing of the recording here
        release.set()
        worker.join(30)
    assert isinstance(outcome[0], RuntimeError)
    assert "another thread ran a forward of it while this thread's ('worker') was in progress" in str(outcome[0])
    assert len(rec.calls) == 1
    torch.testing.assert_close(rec.mad, expected_b, rtol=0, atol=0)
    assert torch._C._len_torch_function_stack() == 0


@pytest.mark.parametrize("overtaking", ["model", "forward_features in a thread that ends"])
def test_a_paused_forward_overtaken_by_a_whole_one_is_refused_not_mixed(overtaking):
    """The paused worker's next layer would have joined the other thread's finished call: the call that ended
    with the model's own forward, or one whose thread has ended."""
    model = _one_model("timm-fused")
    gen = torch.Generator().manual_seed(9)
    pixels_a, pixels_b = torch.randn(2, 3, 64, 64, generator=gen), torch.randn(2, 3, 64, 64, generator=gen)
    run_b = (lambda: model(pixels_b)) if overtaking == "model" else (lambda: model.forward_features(pixels_b))
    expected_b = _alone(model, run_b)
    # Paused between the first two blocks, outside every module of the model: the worker holds nothing.
    gap = torch.nn.Identity()
    worker, inside, release, outcome = _held_worker(model, gap, lambda: _block_by_block(model, pixels_a, gap, 1))
    with torch.no_grad(), vitmad.record(model) as rec:
        worker.start()
        assert inside.wait(30)
        if overtaking == "model":
            model(pixels_b)
        else:
            other = threading.Thread(target=lambda: torch.no_grad()(run_b)())
            other.start()
            other.join(30)
        release.set()
        worker.join(30)
    assert isinstance(outcome[0], RuntimeError) and "was in progress" in str(outcome[0])
    assert len(rec.calls) == 1 and rec.calls[0].layers == ["blocks.0.attn", "blocks.1.attn", "blocks.2.attn"]
    torch.testing.assert_close(rec.mad, expected_b, rtol=0, atol=0)


def test_threads_one_after_another_through_forward_features_keep_every_call():
    """Sequential use through forward_features from a thread pool, then a recorded block called alone in the
    first thread: nothing is refused and no call is taken back."""
    model = _one_model("timm-fused")
    gen = torch.Generator().manual_seed(10)
    pixels = [torch.randn(1 + i, 3, 64, 64, generator=gen) for i in range(3)]
    expected = [_alone(model, lambda p=p: model.forward_features(p)) for p in pixels]
    tokens = torch.randn(3, 17, 32, generator=gen)  # the batch of the latest call, which it joins
    with torch.no_grad(), vitmad.record(model) as rec:
        model.forward_features(pixels[0])
        with ThreadPoolExecutor(1) as pool:  # its thread alive throughout
            for p in pixels[1:]:
                pool.submit(model.forward_features, p).result()
            model.blocks[0](tokens)  # joins the latest call, as a block called alone always has
    assert [len(call.layers) for call in rec.calls] == [3, 3, 4]
    for call, mad in zip(rec.calls, expected, strict=True):
        torch.testing.assert_close(torch.stack(call.per_layer[:3]), mad, rtol=0, atol=0)


def test_a_reentrant_call_keeps_the_thread_inside_until_the_outer_forward_ends():
    model = _one_model("timm-fused")
    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(6))
    state = {}

    def reenter(module, args, output) -> None:
        if threading.current_thread().name == "worker" and not state:
            state["entered"] = True
            state["inner"] = model(pixels)  # the whole model again, inside its own forward

    handle = model.blocks[0].register_forward_hook(reenter)
    # Held in the outer forward's last block, once the inner forward has ended.
    worker, inside, release, outcome = _held_worker(model, model.blocks[2], lambda: model(pixels),
                                                    when=lambda: "inner" in state)
    try:
        with torch.no_grad(), vitmad.record(model):
            worker.start()
            assert inside.wait(30)
            assert "inner" in state  # the inner forward ended; the outer one is still running
            with pytest.raises(RuntimeError, match="one thread at a time"):
                model(pixels)
            release.set()
            worker.join(30)
    finally:
        release.set()
        handle.remove()
    assert isinstance(outcome[0], torch.Tensor)


@pytest.mark.parametrize("kind", ["timm-fused", "timm-explicit"])
def test_a_checkpointed_backward_while_another_thread_runs_a_forward(kind):
    """The backward recomputes the checkpointed layers in this thread (not recorded) while a worker is inside a
    recorded forward: each thread's capture stays on its own stack, and the worker's call is exact."""
    model = _one_model(kind).train()
    model.set_grad_checkpointing(True)
    gen = torch.Generator().manual_seed(7)
    pixels_a, pixels_b = torch.randn(2, 3, 64, 64, generator=gen), torch.randn(2, 3, 64, 64, generator=gen)
    expected_b = _alone(model, lambda: model(pixels_b))
    worker, inside, release, outcome = _held_worker(model, model.blocks[1].attn.proj, lambda: model(pixels_b))
    with vitmad.record(model) as rec:
        loss = model(pixels_a).pow(2).mean()
        worker.start()
        assert inside.wait(30)
        loss.backward()
        assert torch._C._len_torch_function_stack() == 0
        release.set()
        worker.join(30)
    assert isinstance(outcome[0], torch.Tensor)
    assert [len(call.layers) for call in rec.calls] == [3, 3]
    torch.testing.assert_close(rec.calls[1].mad, expected_b, rtol=0, atol=0)
    assert all(p.grad is not None for p in model.blocks[0].attn.qkv.parameters())


def test_a_worker_stopped_by_keyboard_interrupt_leaves_nothing_to_the_next_thread():
    model = _one_model("timm-fused")
    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(8))
    expected = _alone(model, lambda: model(pixels))

    def interrupt(module, args, output) -> None:
        if threading.current_thread().name == "worker":
            raise KeyboardInterrupt  # torch skips the always_call hooks: the worker's capture mode stays behind

    def work() -> None:
        with contextlib.suppress(KeyboardInterrupt), torch.no_grad():
            model(pixels)

    handle = model.blocks[1].attn.qkv.register_forward_hook(interrupt)
    try:
        with torch.no_grad(), vitmad.record(model) as rec:
            worker = threading.Thread(target=work, name="worker")
            worker.start()
            worker.join(30)
            model(pixels)
            assert torch._C._len_torch_function_stack() == 0
    finally:
        handle.remove()
    assert len(rec.calls) == 1
    torch.testing.assert_close(rec.mad, expected, rtol=0, atol=0)


def test_a_finished_forwards_frame_address_taken_by_another_function_is_not_in_progress():
    """A call's forward is found by the id of its frame and that frame's code: an address an ended frame left to
    another function's frame (a thread that finished forward_features and now waits) is not the forward."""
    from vitmad.recording.forward_owner import frame_live

    frame = sys._getframe()
    assert frame_live(threading.current_thread(), id(frame), frame.f_code)
    assert not frame_live(threading.current_thread(), id(frame), _held_worker.__code__)
    ended = threading.Thread(target=lambda: None)
    ended.start()
    ended.join()
    assert not frame_live(ended, id(frame), frame.f_code)


def test_models_sharing_one_config_keep_every_layer_when_another_recording_ends_mid_forward():
    """ViTModel(config) twice shares the config object, which a recording switches to its wrapper: the second
    recording took the first one's switch for a copied config's and set it back when it ended, under the first
    model's forward (another thread's, here a hook between its layers), whose later layers went unrecorded
    silently (QA 251: 13 of 40 calls short of layers)."""
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=24, num_hidden_layers=4,
                                    num_attention_heads=2, intermediate_size=32)
    torch.manual_seed(0)
    a, b = (transformers.ViTModel(config, add_pooling_layer=False).eval() for _ in range(2))
    assert a.config is b.config
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), vitmad.record(a) as alone:
        a(pixels)

    def record_b_between_layers(module, args):
        with vitmad.record(b) as inner:
            b(pixels)
        assert len(inner.layers) == 4

    handle = a.layers[1].register_forward_pre_hook(record_b_between_layers)
    try:
        with torch.no_grad(), vitmad.record(a) as rec:
            a(pixels)
            held = str(config._attn_implementation)
    finally:
        handle.remove()
    assert rec.layers == alone.layers and len(rec.layers) == 4
    assert held.startswith("vitmad")  # still the outer recording's after the inner one ended
    torch.testing.assert_close(rec.mad, alone.mad, rtol=0, atol=0)
    assert config._attn_implementation == "sdpa"  # set back once both have ended


@pytest.mark.parametrize("kind", ["timm-fused", "transformers"])
@pytest.mark.parametrize("released", ["after-a-call", "before-any-call"])
def test_a_forward_begun_before_the_recording_in_another_thread_is_refused_not_joined(kind, released):
    """A worker's forward begins before the recording and waits at its first block; the recording begins and, with
    ``released="after-a-call"``, records a forward of the main thread first. The worker's layers then joined that
    finished call, placed on its grid (rec.layers twice over, silently), or with no call yet were placed on a grid
    never recorded (a misleading error). Now they are refused with the reason, and the calls are the main thread's
    alone."""
    model = _one_model(kind)
    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(11))
    first_block = model.blocks[0] if kind != "transformers" else model.layers[0]
    expected = _alone(model, lambda: model(pixels))
    worker, inside, release, outcome = _held_worker(model, first_block, lambda: model(pixels))
    worker.start()
    try:
        assert inside.wait(30)
        with torch.no_grad(), vitmad.record(model) as rec:
            if released == "after-a-call":
                model(pixels)
            release.set()
            worker.join(30)
            assert len(outcome) == 1 and isinstance(outcome[0], RuntimeError)
            assert re.search(r"thread 'worker' ran a recorded module of \w+ in a forward of it begun before the "
                             r"recording", str(outcome[0]))
            model(pixels)
    finally:
        release.set()
        worker.join(30)
    assert [len(call.layers) for call in rec.calls] == [3] * (2 if released == "after-a-call" else 1)
    for call in rec.calls:
        torch.testing.assert_close(torch.stack(call.per_layer), expected, rtol=0, atol=0)


class _StemAndViT(torch.nn.Module):
    """A stride-2 3-channel stem before a timm ViT: a model of two "towers" on the image, whose ViT starts each call
    of its own where the model's forward did not (a tower called alone)."""

    def __init__(self):
        super().__init__()
        self.stem, self.vit = torch.nn.Conv2d(3, 3, 2, stride=2), _one_model("timm-fused")

    def forward(self, pixels):
        return self.vit(self.stem(pixels))


def test_a_forward_begun_before_the_recording_is_refused_at_its_towers_start():
    """Paused after the stem, before the recording: its ViT's start began a call of its own, on the ViT's input, and
    its layers were recorded 8 px apart where the model's image puts them 16 px apart (QA 351). Refused now."""
    model = _StemAndViT().eval()
    pixels = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(12))
    worker, inside, release, outcome = _held_worker(model, model.vit.patch_embed, lambda: model(pixels))
    worker.start()
    try:
        assert inside.wait(30)
        with torch.no_grad(), vitmad.record(model) as rec:
            release.set()
            worker.join(30)
            assert len(outcome) == 1 and isinstance(outcome[0], RuntimeError), outcome
            assert "in a forward of it begun before the recording" in str(outcome[0])
            model(pixels)
    finally:
        release.set()
        worker.join(30)
    assert [len(call.layers) for call in rec.calls] == [3]
    assert [g.stride for g in rec.geometry] == [(32.0, 32.0)] * 3
