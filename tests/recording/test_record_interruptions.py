"""vitmad.record when the forward does not run to its end or runs where it is not expected: a KeyboardInterrupt
inside an attention module, an exception halfway, gradient checkpointing (layers run again by backward), a copy of
the model made inside the block, the same model recorded twice at once, and a wrapper whose first convolution in
module order is a head on the features, not the image's stem. Each compares with a recording of a forward that ran
normally, or with the model's state before the block."""

from __future__ import annotations

import copy
import subprocess
import sys
import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vitmad
from conftest import subprocess_env

timm = pytest.importorskip("timm")


def _vit(**options):
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, depth=3, embed_dim=32,
                             num_heads=2, **options).eval()


def _hf_vit(num_hidden_layers: int = 2):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=num_hidden_layers, num_attention_heads=2,
                                    intermediate_size=64, image_size=64, patch_size=16)
    return transformers.ViTModel(config, add_pooling_layer=False).eval()


def _pixels(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def _clean_mad(model, pixels) -> torch.Tensor:
    with torch.no_grad(), vitmad.record(model) as rec:
        model(pixels)
    return rec.mad


def _function_modes() -> int:
    return torch._C._len_torch_function_stack()


def test_a_keyboard_interrupt_inside_attention_leaves_nothing_active():
    """torch skips always_call hooks on a KeyboardInterrupt: the capture mode stayed on the stack for good, every
    later scaled_dot_product_attention of the process went through the closed recording, and a retry inside the
    block counted the interrupted calls too."""
    model, pixels = _vit(), _pixels()
    expected = _clean_mad(model, pixels)
    interrupt = model.blocks[1].attn.register_forward_pre_hook(lambda *_: (_ for _ in ()).throw(KeyboardInterrupt))
    with torch.no_grad(), vitmad.record(model) as rec:
        with pytest.raises(KeyboardInterrupt):
            model(pixels)
        interrupt.remove()
        model(pixels)  # the retry
    assert _function_modes() == 0
    torch.testing.assert_close(rec.mad, expected, rtol=0, atol=0)
    q = torch.randn(1, 2, 5, 8)
    F.scaled_dot_product_attention(q, q, q)  # refused by the closed recording before
    model(pixels)
    assert len(rec.calls) == 1 and not rec._pending


def _run(model, pixels, entry: str) -> None:
    if entry == "model":
        model(pixels)
    elif entry == "forward_features":
        model.forward_features(pixels)
    else:  # the first two blocks only, by timm's loop over them
        model.forward_intermediates(pixels, indices=[1], stop_early=True, intermediates_only=True)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("entry", ["model", "forward_features", "forward_intermediates"])
def test_after_a_keyboard_interrupt_inside_attention_no_half_call_and_no_stale_capture(fused, entry):
    """Interrupted inside the third attention (after its capture began): the half call of the first two layers
    stayed in rec.calls until the next model(...) (read as the latest forward meanwhile) and then took a
    forward_features run after it down with it, leaving nothing at the end of the block; the third layer's capture
    mode, still on the stack, read an unrelated softmax of the user as that layer's attention (a placement error
    in the user's code) and saw the next forward's softmax calls of the other layers too."""
    model, pixels = _vit(), _pixels()
    for block in model.blocks:
        block.attn.fused_attn = fused
    with torch.no_grad(), vitmad.record(model) as clean:
        _run(model, pixels, entry)
    expected = clean.mad

    def interrupt(*_):
        raise KeyboardInterrupt

    hook = model.blocks[2].attn.qkv.register_forward_hook(interrupt)
    probabilities = torch.rand(2, 2, 5, 7, generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), vitmad.record(model) as rec:
        with pytest.raises(KeyboardInterrupt):
            model(pixels)
        hook.remove()
        assert rec.calls == []
        torch.testing.assert_close(torch.softmax(probabilities, -1), F.softmax(probabilities, dim=-1))
        _run(model, pixels, entry)
        torch.softmax(probabilities, dim=-1)
        assert len(rec.calls) == 1
        torch.testing.assert_close(rec.mad, expected, rtol=0, atol=0)
    assert _function_modes() == 0
    assert len(rec.calls) == 1 and rec.layers == clean.layers
    torch.testing.assert_close(rec.mad, expected, rtol=0, atol=0)


def _blocks_one_by_one(model, pixels) -> torch.Tensor:
    tokens = model._pos_embed(model.patch_embed(pixels))
    for block in model.blocks:
        tokens = block(tokens)
    return tokens


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
@pytest.mark.parametrize("entry", ["forward_features", "forward_intermediates", "blocks one by one"])
@pytest.mark.parametrize("where", ["blocks.1.attn.proj", "blocks.2.attn.qkv", "blocks.2.mlp"])
def test_a_loop_over_the_blocks_that_stopped_halfway_leaves_no_call(where, entry, error):
    """timm's forward_intermediates and a user's loop call each block as a forward of its own: one that raised
    in the third block (an out-of-memory error) left a call of the layers before it, and a KeyboardInterrupt
    anywhere left what it had; forward_features left one after a KeyboardInterrupt too. Every such loop now
    leaves nothing, and a retry is recorded as alone."""
    model, pixels = _vit(), _pixels()

    def run() -> None:
        if entry == "forward_features":
            model.forward_features(pixels)
        elif entry == "forward_intermediates":
            model.forward_intermediates(pixels, indices=[2], intermediates_only=True)
        else:
            _blocks_one_by_one(model, pixels)

    with torch.no_grad(), vitmad.record(model) as clean:
        run()

    def fail(*_):
        raise error("out of memory")

    hook = model.get_submodule(where).register_forward_pre_hook(fail)
    with torch.no_grad(), vitmad.record(model) as rec:
        with pytest.raises(error):
            run()
        hook.remove()
        assert rec.calls == []
        run()
    assert _function_modes() == 0
    assert [call.layers for call in rec.calls] == [clean.layers]
    torch.testing.assert_close(rec.mad, clean.mad, rtol=0, atol=0)


def test_forward_features_that_raised_outside_every_module_before_the_blocks_leaves_no_call():
    """timm's _pos_embed is a method, not a module: one that raised (a position embedding of the wrong size) left
    the empty call its patch embedding began, which rec.mad then read as a forward in which no module computed
    attention, and which stayed in rec.calls after a retry."""
    model, pixels = _vit(), _pixels()
    expected = _clean_mad(model, pixels)

    def wrong_size(tokens):
        raise RuntimeError("The size of tensor a (17) must match the size of tensor b (5)")

    with torch.no_grad(), vitmad.record(model) as rec:
        model._pos_embed = wrong_size
        with pytest.raises(RuntimeError, match="size of tensor"):
            model.forward_features(pixels)
        del model._pos_embed  # the class's method again
        assert rec.calls == []
        with pytest.raises(RuntimeError, match="has not run"):
            _ = rec.mad
        model(pixels)
    assert len(rec.calls) == 1
    torch.testing.assert_close(rec.mad, expected, rtol=0, atol=0)


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
@pytest.mark.parametrize("where", ["the model's forward hook", "a block's forward hook in forward_intermediates",
                                   "the blocks' forward hook in forward_features",
                                   "a global pre-hook of the final norm"])
def test_a_users_hook_that_ends_the_forward_leaves_no_call(where, error):
    """Hooks registered inside the block ran after the recording's own, which had already counted the forward
    as ended: a user's forward hook that raised left the call of a forward that did not end. The recording's
    hooks that tell how a forward ended now run after every forward hook; a global forward pre-hook that raised
    before the module's own pre-hooks ran is seen by the always_call hooks torch runs then (a KeyboardInterrupt
    there, which runs none, is not seen, and the call of complete layers stays)."""
    unseen = where == "a global pre-hook of the final norm" and error is KeyboardInterrupt
    model, pixels = _vit(), _pixels()
    entry = {"the model's forward hook": lambda: model(pixels),
             "a block's forward hook in forward_intermediates": lambda: model.forward_intermediates(
                 pixels, indices=[2], intermediates_only=True),
             "the blocks' forward hook in forward_features": lambda: model.forward_features(pixels),
             "a global pre-hook of the final norm": lambda: model.forward_features(pixels)}[where]
    with torch.no_grad(), vitmad.record(model) as clean:
        entry()

    def fail(*_):
        raise error("injected")

    with torch.no_grad(), vitmad.record(model) as rec:
        if where == "the model's forward hook":
            hook = model.register_forward_hook(fail)
        elif where == "a block's forward hook in forward_intermediates":
            hook = model.blocks[1].register_forward_hook(fail)
        elif where == "the blocks' forward hook in forward_features":
            hook = model.blocks.register_forward_hook(fail)
        else:
            hook = torch.nn.modules.module.register_module_forward_pre_hook(
                lambda module, args: fail() if module is model.norm else None)
        try:
            with pytest.raises(error, match="injected"):
                entry()
        finally:
            hook.remove()
        if unseen:  # the documented limit: the call of the layers, all complete, stays
            assert [call.layers for call in rec.calls] == [clean.layers]
            torch.testing.assert_close(rec.mad, clean.mad, rtol=0, atol=0)
            rec.calls.clear()
        assert rec.calls == []
        entry()
    assert [call.layers for call in rec.calls] == [clean.layers]
    torch.testing.assert_close(rec.mad, clean.mad, rtol=0, atol=0)


def test_after_a_keyboard_interrupt_in_a_transformers_model_no_half_call():
    model, pixels = _hf_vit(num_hidden_layers=3), _pixels()
    expected = _clean_mad(model, pixels)

    def interrupt(*_):
        raise KeyboardInterrupt

    hook = model.layers[2].attention.k_proj.register_forward_hook(interrupt)
    with torch.no_grad(), vitmad.record(model) as rec:
        with pytest.raises(KeyboardInterrupt):
            model(pixels)
        hook.remove()
        assert rec.calls == []
        with pytest.raises(RuntimeError, match="has not run"):
            _ = rec.mad
        model(pixels)
    torch.testing.assert_close(rec.mad, expected, rtol=0, atol=0)


def test_a_forward_that_raised_halfway_leaves_no_call():
    model, pixels = _vit(), _pixels()
    fail = model.blocks[2].register_forward_pre_hook(lambda *_: (_ for _ in ()).throw(RuntimeError("out of memory")))
    with torch.no_grad(), vitmad.record(model) as rec:
        with pytest.raises(RuntimeError, match="out of memory"):
            model(pixels)
        assert rec.calls == []  # was a call of the two layers before the error, read as a whole forward
        # It did run: "has not run in this recording" sent the user looking for a forward outside the block.
        with pytest.raises(RuntimeError, match=r"VisionTransformer's forward raised 1 time\(s\) in this recording and "
                                               r"never returned in it; a forward that raises leaves no call"):
            _ = rec.mad
        fail.remove()
        model(pixels)
    torch.testing.assert_close(rec.mad, _clean_mad(model, pixels), rtol=0, atol=0)


@pytest.mark.parametrize("fused", [True, False])
def test_forward_features_that_raised_halfway_leaves_no_call_and_a_retry_is_recorded(fused):
    """forward_features never calls the model, whose hooks drop a call that raised: a forward that ran out of
    memory in the second block's MLP left a call of one layer; it is now taken back, and the retry made inside the
    ``except`` block is recorded. A recorded block called alone that raises takes nothing from the calls."""
    model, pixels = _vit(), _pixels()
    for block in model.blocks:
        block.attn.fused_attn = fused
    expected = _alone_features(model, pixels)
    runs = []

    def out_of_memory(module, args) -> None:
        runs.append(1)
        if len(runs) == 2:  # the second forward_features
            raise RuntimeError("out of memory")

    fail = model.blocks[1].mlp.register_forward_pre_hook(out_of_memory)
    before_blocks = None
    try:
        with torch.no_grad(), vitmad.record(model) as rec:
            model.forward_features(pixels)
            try:
                model.forward_features(pixels)
            except RuntimeError:
                assert len(rec.calls) == 1
                model.forward_features(pixels)  # the retry, while the error is being handled
            with pytest.raises(RuntimeError, match="size"):
                model.blocks[1](torch.zeros(2, 17, 5))  # wrong width
            # After the patch embedding, before any layer: the call its convolution began is dropped too.
            before_blocks = model.pos_drop.register_forward_pre_hook(
                lambda *_: (_ for _ in ()).throw(ValueError("bad")))
            with pytest.raises(ValueError, match="bad"):
                model.forward_features(pixels)
    finally:
        fail.remove()
        if before_blocks is not None:
            before_blocks.remove()
    assert len(runs) == 3 and len(rec.calls) == 2
    for call in rec.calls:
        assert call.layers == ["blocks.0.attn", "blocks.1.attn", "blocks.2.attn"]
        torch.testing.assert_close(call.mad, expected, rtol=0, atol=0)
    assert torch._C._len_torch_function_stack() == 0


def _alone_features(model, pixels) -> torch.Tensor:
    with torch.no_grad(), vitmad.record(model) as rec:
        model.forward_features(pixels)
    return rec.mad


def test_a_wrapper_whose_forward_returns_none_keeps_its_calls():
    """A forward that returned None was read as one that raised: its calls were dropped, and rec.mad said the
    model had not run."""

    class FeatureTap(nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model, self.features = model, None

        def forward(self, x):
            self.features = self.model.forward_features(x)

    model, pixels = _vit(), _pixels()
    tap = FeatureTap(model)
    with torch.no_grad(), vitmad.record(tap) as rec:
        assert tap(pixels) is None
    assert len(rec.calls) == 1
    torch.testing.assert_close(rec.mad, _clean_mad(model, pixels), rtol=0, atol=0)


@pytest.mark.parametrize("library", ["timm", "transformers"])
def test_gradient_checkpointing_records_each_layer_once(library):
    """backward runs a checkpointed layer's forward again: it was recorded as more layers (6 for 3, the last ones
    in reverse order)."""
    if library == "timm":
        model, pixels = _vit(), _pixels()
        model.set_grad_checkpointing(True)
    else:
        model = _hf_vit(num_hidden_layers=3)
        model.gradient_checkpointing_enable()
        pixels = _pixels()
    model.train()  # transformers checkpoints in training only; dropout is 0
    with torch.no_grad():
        expected = _clean_mad(model, pixels)
    with vitmad.record(model) as rec:
        output = model(pixels)
        output = output if isinstance(output, torch.Tensor) else output.last_hidden_state
        output.sum().backward()
    assert len(rec.layers) == 3 and len(rec.calls) == 1
    torch.testing.assert_close(rec.mad, expected, rtol=0, atol=0)


def test_a_copy_made_inside_the_block_runs_as_without_vitmad():
    """A copy (an EMA or teacher model) took the recording's hooks with it: it ran into the recording, also after
    the block, and a transformers copy kept the recording's attention implementation and refused to be recorded."""
    model, pixels = _vit(), _pixels()
    with torch.no_grad(), vitmad.record(model) as rec:
        model(pixels)
        twin = copy.deepcopy(model)
        twin(pixels)
    with torch.no_grad():
        twin(pixels)
    assert len(rec.calls) == 1 and _function_modes() == 0
    torch.testing.assert_close(_clean_mad(twin, pixels), rec.mad, rtol=0, atol=0)

    hf = _hf_vit()
    with torch.no_grad(), vitmad.record(hf) as rec:
        hf(pixels)
        hf_twin = copy.deepcopy(hf)
    with torch.no_grad():
        hf_twin(pixels)
    assert len(rec.calls) == 1
    torch.testing.assert_close(_clean_mad(hf_twin, pixels), rec.mad, rtol=0, atol=0)
    assert hf_twin.config._attn_implementation == hf.config._attn_implementation == "sdpa"


def _hook_count(model: torch.nn.Module) -> int:
    return sum(len(module._forward_hooks) + len(module._forward_pre_hooks) for module in model.modules())


def test_copies_recorded_in_turn_do_not_pile_up_inert_hooks():
    """A copy made inside a recording holds inert hooks; recorded in its turn, it kept them beside its own, so a
    chain of copies, each recorded (an EMA of an EMA), gained the recording's hooks at every generation."""
    model, pixels = _vit(), _pixels()
    clean = _hook_count(model)
    for _ in range(3):
        with torch.no_grad(), vitmad.record(model):
            model(pixels)
            recording = _hook_count(model)
            copied = copy.deepcopy(model)
        assert _hook_count(model) == clean and recording > clean
        model = copied
        assert _hook_count(model) == recording  # the last recording's hooks, inert: one generation's only
    with torch.no_grad(), vitmad.record(model) as rec:
        model(pixels)
    assert _hook_count(model) == clean
    torch.testing.assert_close(_clean_mad(model, pixels), rec.mad, rtol=0, atol=0)


def test_a_transformers_model_saved_inside_the_block_loads_and_runs_in_a_new_process(tmp_path):
    """torch.save(model) mid-recording stored the wrapper's name as the attention implementation: registered in
    that process only, so the checkpoint failed at its first forward anywhere else (KeyError)."""
    hf = _hf_vit()
    pixels = _pixels()
    with torch.no_grad(), vitmad.record(hf):
        hf(pixels)
        torch.save(hf, tmp_path / "model.pt")
        assert hf.config._attn_implementation.startswith("vitmad_record_")  # still recording
    torch.save(pixels, tmp_path / "pixels.pt")
    with torch.no_grad():
        expected = hf(pixels).last_hidden_state
    code = ("import torch; m = torch.load('model.pt', weights_only=False); "
            "print(type(m.config._attn_implementation_internal).__name__, m.config._attn_implementation_internal); "
            "torch.save(m(torch.load('pixels.pt')).last_hidden_state.detach(), 'out.pt')")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=subprocess_env(), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["str", "sdpa"]
    torch.testing.assert_close(torch.load(tmp_path / "out.pt"), expected, rtol=0, atol=0)


# torch's own: jit.trace is deprecated, and timm's shape asserts read sizes as Python numbers.
@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::torch.jit.TracerWarning")
def test_a_trace_made_inside_the_block_holds_no_vitmad_op():
    """torch.jit.trace inside the block traced vitmad's ops into the module's graph: the traced module then ran
    them in every call, long after the recording, and counted a call in it."""
    model, pixels = _vit(), _pixels()
    with torch.no_grad(), vitmad.record(model) as rec:
        model(pixels)
        with pytest.warns(UserWarning, match="torch.jit.trace ran a recorded model; that forward is not recorded") \
                as caught:
            traced = torch.jit.trace(model, pixels, check_trace=False)
        model(pixels)
    assert sum("torch.jit.trace ran" in str(w.message) for w in caught) == 1  # once per trace, not per hook
    assert len(rec.calls) == 2
    assert "vitmad::" not in str(traced.inlined_graph)  # no op of ours (source lines of the capture may show)
    with torch.no_grad():
        torch.testing.assert_close(traced(pixels), model(pixels))
    torch.testing.assert_close(rec.mad, _clean_mad(model, pixels), rtol=0, atol=0)


def test_an_export_made_inside_the_block_is_not_recorded_and_holds_no_vitmad_op():
    """torch.export (non-strict: the Python forward on fake tensors) ran vitmad's hooks, whose value checks failed
    inside torch ("Could not guard on data-dependent expression"), with a partial graph printed. A strict export
    fails on the hooks dynamo may not trace, with vitmad's reason."""
    model, pixels = _vit(), _pixels()
    with torch.no_grad(), vitmad.record(model) as rec:
        model(pixels)
        with pytest.warns(UserWarning, match="torch.export ran a recorded model; that forward is not recorded") \
                as caught:
            exported = torch.export.export(model, (pixels,))
        with pytest.raises(Exception, match=r"torch.export\(strict=True\) of a recorded model cannot trace them: "
                                            r"export outside the block"):
            torch.export.export(model, (pixels,), strict=True)  # dynamo meets the hooks it may not trace
        model(pixels)
    assert sum("torch.export ran" in str(w.message) for w in caught) == 1  # once per export, not per hook
    assert len(rec.calls) == 2
    assert "vitmad" not in str(exported.graph)
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(pixels), model(pixels))
    torch.testing.assert_close(rec.mad, _clean_mad(model, pixels), rtol=0, atol=0)


# torch's own: jit.trace is deprecated, and timm's shape asserts read sizes as Python numbers.
@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::torch.jit.TracerWarning")
def test_scripted_traced_and_exported_models_are_refused_naming_what_to_record():
    """A scripted model failed inside a family with torch's "get_submodule is not supported on ScriptModules", a
    traced one crashed once layers= was given as vitmad advised, and an exported one recorded nothing in silence
    and failed in profile on torch's eval() (QA 261)."""
    model, pixels = _vit(), _pixels()
    with torch.no_grad():
        scripted = torch.jit.script(_vit())
        traced = torch.jit.trace(_vit(), pixels, check_trace=False)
        exported = torch.export.export(_vit(), (pixels,)).module()
    holder = nn.Sequential(traced)
    for form, kind in ((scripted, "RecursiveScriptModule"), (traced, "TopLevelTracedModule")):
        for layers in (None, ["blocks.0.attn"]):
            with pytest.raises(TypeError, match=rf"^vitmad\.record: the model \({kind}\) is a TorchScript module "
                                                r"\(torch\.jit\.script or torch\.jit\.trace\), .* record the "
                                                r"nn\.Module it was made from"):
                vitmad.record(form, layers=layers)
    with pytest.raises(TypeError, match=r"^vitmad\.record: 0 of Sequential is a TorchScript module"):
        vitmad.record(holder)
    with pytest.raises(TypeError, match=r"^vitmad\.record: the model is the module of a torch\.export program "
                                        r"\(ExportedProgram\.module\(\)\), .* record the nn\.Module it was exported "
                                        r"from"):
        vitmad.record(exported, layers=["blocks.0.attn"])
    for form in (scripted, exported):
        with pytest.raises(ValueError, match=r"^model: the model .* record the nn\.Module it was"):
            vitmad.profile(form, pixels, device="cpu")
    with torch.no_grad(), vitmad.record(model) as rec:  # the module they were made from
        model(pixels)
    assert len(rec.layers) == 3


def test_one_model_is_recorded_once_at_a_time_in_any_thread():
    model = _vit()
    with vitmad.record(model):
        with pytest.raises(RuntimeError, match="VisionTransformer is already being recorded"):
            vitmad.record(model).__enter__()
        errors = []
        thread = threading.Thread(target=lambda: errors.append(pytest.raises(RuntimeError, vitmad.record(model)
                                                                             .__enter__)))
        thread.start()
        thread.join()
        assert "already being recorded" in str(errors[0].value)
    with vitmad.record(model):  # free again
        pass


def test_the_call_starts_at_the_convolution_on_the_image_not_a_head_declared_before_it():
    """A segmentation wrapper declares its head first: the image size was read from the head's input (features
    upsampled to 128 px: every distance doubled from the second forward on)."""

    class Segmenter(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Conv2d(32, 5, 1)  # declared first, runs last
            self.backbone = _vit()

        def forward(self, x):
            features = self.backbone.forward_features(x)[:, 1:].transpose(1, 2).reshape(x.shape[0], 32, 4, 4)
            return self.head(F.interpolate(features, scale_factor=32))

    model, pixels = Segmenter().eval(), _pixels()
    expected = _clean_mad(model.backbone, pixels)
    with torch.no_grad(), vitmad.record(model) as rec:
        for _ in range(3):
            model(pixels)
    assert len(rec.calls) == 3
    for call in rec.calls:
        assert call.geometry[0].stride == (16.0, 16.0)
        torch.testing.assert_close(call.mad, expected, rtol=0, atol=0)


def test_an_attention_implementation_set_inside_the_block_is_recorded_and_kept():
    """model.set_attn_implementation inside the block stopped the recording (rec.mad then said no module computed
    attention) and was undone at exit."""
    model = _hf_vit()
    pixels = _pixels()
    with torch.no_grad(), vitmad.record(model) as rec:
        model(pixels)
        model.set_attn_implementation("eager")
        model(pixels)
    assert len(rec.calls) == 2 and model.config._attn_implementation == "eager"
    torch.testing.assert_close(rec.calls[1].mad, rec.calls[0].mad, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("fused", [True, False])
def test_a_users_forward_hook_that_takes_a_softmax_is_not_read_as_attention(fused):
    """A probe registered on an attention module before the block ran inside the capture: its softmax of the
    module's output [B, N, C] was taken for the attention, and the model's forward raised."""
    model, pixels = _vit(), _pixels()
    for block in model.blocks:
        block.attn.fused_attn = fused
    expected = _clean_mad(model, pixels)
    probes = []
    model.blocks[0].attn.register_forward_hook(lambda module, args, output: probes.append(output.softmax(-1)))
    model.blocks[1].attn.register_forward_pre_hook(lambda module, args: probes.append(args[0].softmax(-1)))
    with torch.no_grad(), vitmad.record(model) as rec:
        model(pixels)
    assert len(probes) == 2 and _function_modes() == 0
    torch.testing.assert_close(rec.mad, expected, rtol=0, atol=0)


def test_a_layer_replaced_inside_the_block_is_refused_at_the_next_forward():
    """``model.blocks[1].attn = other`` inside the block: the new module has no hook, and every later call left its
    layer out silently, ``rec.mad`` one layer short (QA 251). Refused, naming it; the calls before stay, and the
    model leaves the block as it was given (the replaced module, hooks gone)."""
    model, donor, pixels = _vit(), _vit(), _pixels()
    clean = _hook_count(model)
    with torch.no_grad(), vitmad.record(model) as rec:
        model(pixels)
        model.blocks[1].attn = donor.blocks[1].attn
        with pytest.raises(RuntimeError, match=r"^vitmad\.record: blocks\.1\.attn of VisionTransformer was replaced "
                                               r"\(or removed\) inside the recording block"):
            model(pixels)
    assert len(rec.calls) == 1 and len(rec.layers) == 3
    torch.testing.assert_close(rec.mad, _clean_mad(_vit(), pixels), rtol=0, atol=0)
    assert _hook_count(model) == clean and _function_modes() == 0
    torch.testing.assert_close(_clean_mad(model, pixels)[:1], rec.mad[:1], rtol=0, atol=0)


def test_a_layer_replaced_between_two_blocks_is_said_replaced_when_entered_again():
    """A recorded layer replaced between two blocks of one recording: re-entering said it "was added since the
    recording was made" (QA 359), the message for a new module, where vitmad has one for a replaced layer."""
    model, donor, pixels = _vit(), _vit(), _pixels()
    rec = vitmad.record(model)
    with torch.no_grad(), rec:
        model(pixels)
    model.blocks[1].attn = donor.blocks[1].attn
    with pytest.raises(RuntimeError, match=r"^vitmad\.record: blocks\.1\.attn of VisionTransformer was replaced "
                                           r"\(or removed\) since the recording was made"):
        with rec:
            pass
    assert _hook_count(model) == _hook_count(_vit()) and len(rec.calls) == 1
    assert not torch.nn.modules.module._global_module_registration_hooks


def test_a_layer_written_into_a_modules_dict_directly_is_refused_on_every_path():
    """QA 275: with the checks gated by torch's module registration hook, a layer written into its block's
    _modules directly (no hook fires) was left out of every call in silence. Each forward checks every layer, and
    each outermost scope (a block of a loop over cached tokens) the layers it holds."""
    model, donor, pixels = _vit(), _vit(), _pixels()

    def loop(pixels):  # a loop over the blocks, each an outermost scope
        tokens = model.patch_embed(pixels)
        for block in model.blocks:
            tokens = block(tokens)

    for run in (model, model.forward_features, loop):
        with torch.no_grad(), vitmad.record(model):
            own = model.blocks[1].attn
            model.blocks[1]._modules["attn"] = donor.blocks[1].attn
            try:
                with pytest.raises(RuntimeError, match=r"blocks\.1\.attn of VisionTransformer was replaced"):
                    run(pixels)
            finally:
                model.blocks[1]._modules["attn"] = own


def test_an_attention_module_added_after_the_recording_was_made_is_refused():
    """``model.blocks.append(block)`` after ``vitmad.record(model)`` (or inside its block, or ``insert``): the new
    attention module has no hook, and every later call left its layer out silently (QA 265). Refused at entry and
    at each forward (and forward_features) while it is there; the calls before stay. A module added that holds no
    attention changes nothing, nor one outside the layers asked for."""
    model, pixels = _vit(), _pixels()
    clean = _clean_mad(_vit(), pixels)
    added = r"^vitmad\.record: blocks\.3\.attn of VisionTransformer was added since the recording was made"
    rec = vitmad.record(model)
    model.blocks.append(copy.deepcopy(model.blocks[0]))
    with pytest.raises(RuntimeError, match=added), torch.no_grad(), rec:
        pass
    del model.blocks[3]
    with torch.no_grad(), rec:
        model(pixels)
        model.blocks.append(copy.deepcopy(model.blocks[0]))
        for forward in (model, model.forward_features, model):  # each forward, not only the first
            with pytest.raises(RuntimeError, match=added):
                forward(pixels)
        del model.blocks[3]
        model.head = nn.Sequential(nn.Identity(), model.head)  # no attention: recorded as before
        model(pixels)
    assert len(rec.calls) == 2
    for call in rec.calls:
        torch.testing.assert_close(call.mad, clean, rtol=0, atol=0)
    with torch.no_grad(), vitmad.record(model) as rec:
        model.blocks.insert(3, copy.deepcopy(model.blocks[0]))  # writes the list's dict directly
        with pytest.raises(RuntimeError, match=added):
            model(pixels)
        del model.blocks[3]
    with torch.no_grad(), vitmad.record(model, layers=["blocks.0.attn", "blocks.2.attn"]) as rec:
        model.blocks.append(copy.deepcopy(model.blocks[0]))  # not a layer asked for
        model(pixels)
    torch.testing.assert_close(rec.mad, clean[[0, 2]], rtol=0, atol=0)
    del model.blocks[3]
    with pytest.raises(RuntimeError, match=added), torch.no_grad(), vitmad.record(model, layers=["blocks.*.attn"]):
        model.blocks.append(copy.deepcopy(model.blocks[0]))
        model(pixels)


def test_added_modules_are_checked_once_a_call_and_only_where_a_new_recording_would_record_them(monkeypatch):
    """QA 270: the checks walked the layers at every block of a forward through the blocks (forward_intermediates),
    the depth squared; a CaiT class-attention block appended was refused though a new recording skips it;
    insert(0, block) then del list[1] kept the list's length and was missed; a model making a linear layer at each
    forward searched its modules for attention each time. QA 273: checked at the call start only, a block added
    then run by a loop over cached tokens was left out; the checks run at each outermost scope again, at no cost
    unless a module may have changed."""
    model, pixels = _vit(), _pixels()
    rec = vitmad.record(model)
    checks = []
    real = type(rec)._check_layers_in_place
    monkeypatch.setattr(type(rec), "_check_layers_in_place",
                        lambda self, layers=None: (checks.append(len(self._layer_paths if layers is None else layers)),
                                                   real(self, layers))[1])
    with torch.no_grad(), rec:
        model.forward_intermediates(pixels)
    assert sum(checks) <= 2 * len(rec.layers) and len(rec.calls) == 1  # each block its own layer, not all of them
    monkeypatch.undo()
    with torch.no_grad(), vitmad.record(model) as rec:
        tokens = model.patch_drop(model.pos_drop(model._pos_embed(model.patch_embed(pixels))))
        model.blocks.append(copy.deepcopy(model.blocks[0]))
        with pytest.raises(RuntimeError, match=r"blocks\.3\.attn of VisionTransformer was added since"):
            for block in model.blocks:  # no call start: the blocks of a loop over cached tokens
                tokens = block(tokens)
        del model.blocks[3]
    cait = timm.create_model("cait_xxs24_224", pretrained=False, img_size=32, patch_size=8, depth=2, embed_dim=16,
                             num_heads=2, depth_token_only=1).eval()
    with torch.no_grad(), vitmad.record(cait) as rec:
        cait(pixels[:, :, :32, :32])
        cait.blocks_token_only.append(copy.deepcopy(cait.blocks_token_only[0]))  # skipped by any recording
        cait(pixels[:, :, :32, :32])
    assert rec.layers == ["blocks.0.attn", "blocks.1.attn"] and len(rec.calls) == 2
    with torch.no_grad(), vitmad.record(model) as rec:
        model(pixels)
        model.norm = nn.Sequential(nn.Identity())
        model(pixels)
        model.norm.insert(0, copy.deepcopy(model.blocks[0]))
        del model.norm[1]
        with pytest.raises(RuntimeError, match=r"norm\.0\.attn of VisionTransformer was added since"):
            model(pixels)
        model.norm = nn.Identity()
    from vitmad.recording import recorder

    searches = []
    monkeypatch.setattr(recorder, "attention_modules",
                        lambda m, real=recorder.attention_modules: (searches.append(1), real(m))[1])
    with torch.no_grad(), vitmad.record(model) as rec:
        searches.clear()
        for _ in range(3):
            model.scratch = nn.Linear(4, 4)  # made at each forward: no attention, no search
            model(pixels)
    assert searches == [] and len(rec.calls) == 3


def test_a_recording_refuses_to_pickle_or_copy_naming_what_does():
    """torch.save(rec) and copy.deepcopy(rec) failed on a lock, naming nothing of vitmad (QA 251)."""
    import io
    import pickle

    model, pixels = _vit(), _pixels()
    with torch.no_grad(), vitmad.record(model) as rec:
        model(pixels)
    for save in (pickle.dumps, copy.deepcopy, copy.copy, lambda r: torch.save(r, io.BytesIO())):
        with pytest.raises(TypeError, match=r"^vitmad\.record: a Recording holds the model's hooks and does not "
                                            r"pickle or copy; save what it recorded instead: rec\.calls"):
            save(rec)
    again = pickle.loads(pickle.dumps(rec.calls))
    torch.testing.assert_close(again[-1].mad, rec.mad, rtol=0, atol=0)


def test_a_read_before_the_forwards_first_recorded_layer_says_the_call_has_none_yet():
    """Read from a pre-hook of the first block (QA 359): the call in progress has no layer yet, which was said to be
    a forward that "took a path without" the recorded modules. After the forward, the call has them all."""
    model, pixels = _vit(), _pixels()
    seen = []

    def before_first_block(module, args):
        with pytest.raises(RuntimeError, match=r"forward call in progress has not run any of the modules being "
                                               r"recorded \(blocks\.0\.attn, blocks\.1\.attn, blocks\.2\.attn\) yet"):
            rec.mad  # noqa: B018 (the read is the test)
        seen.append(len(rec.calls))

    with torch.no_grad(), vitmad.record(model) as rec:
        model(pixels)
        handle = model.blocks[0].register_forward_pre_hook(before_first_block)
        model(pixels)
        handle.remove()
    assert seen == [2] and len(rec.calls) == 2
    torch.testing.assert_close(rec.calls[1].per_layer[0], rec.calls[0].per_layer[0], rtol=0, atol=0)


def test_recorded_calls_compare_by_identity():
    """``RecordedCall`` holds tensors: its generated ``==`` raised "Boolean value of Tensor ... is ambiguous" from
    ``rec.calls.index(call)``, ``.remove``, ``.count`` (QA 359). Two calls are equal only if they are one."""
    model, pixels = _vit(), _pixels()
    with torch.no_grad(), vitmad.record(model) as rec:
        model(pixels)
        model(pixels)
    first, second = rec.calls
    assert first != second and first == first
    assert rec.calls.index(second) == 1 and rec.calls.count(first) == 1
    rec.calls.remove(first)
    assert rec.calls == [second]
