"""vitmad.record on models compiled with torch.compile: compiled code does not call vitmad's hooks, so while a
compiled model is recorded, compiled code runs eagerly (recording/compiled.py); a model compiled inside the block
breaks its graphs at vitmad's hooks, which run eagerly. Held against MAD from each
model's own eager attention probabilities, on a fixed patch grid written here."""

from __future__ import annotations

import copy
import threading
import warnings

import pytest
import torch

timm = pytest.importorskip("timm")

import vitmad  # noqa: E402
from vitmad.recording.compiled import EagerWhileRecording, is_compiled, uncompiled  # noqa: E402

if not EagerWhileRecording.available():
    pytest.skip("this torch has no torch.compiler.set_stance", allow_module_level=True)

TOL = {"rtol": 1e-5, "atol": 1e-4}  # pixels; fused q/k recomputed in float32 vs the eager float32 softmax
PATCH, GRID = 8, (4, 5)


# The warning of a forward of the model that ran code compiled before the recording's hooks existed.
_UNSEEN = (r"a forward of VisionTransformer ran without calling any hook vitmad added to its modules, so it is not "
           r"recorded: dynamo holds code compiled for VisionTransformer\.forward.*give vitmad.record the compiled "
           r"wrapper.*torch._dynamo.reset\(\) before the block.*rec.calls holds only the forwards that were recorded")


def _stance() -> str:
    from torch._dynamo.eval_frame import _stance

    return _stance.stance


def _timm_vit():
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2, embed_dim=32, num_heads=2,
                             patch_size=PATCH, img_size=(GRID[0] * PATCH, GRID[1] * PATCH)).eval()


def _pixels(batch=2):
    return torch.randn(batch, 3, GRID[0] * PATCH, GRID[1] * PATCH, generator=torch.Generator().manual_seed(1))


def _timm_reference(model, pixels) -> torch.Tensor:
    """[L, B, H] float64 MAD from the model's unfused softmax (the input of attn_drop), CLS first."""
    eager = copy.deepcopy(uncompiled(model))
    maps = []
    for block in eager.blocks:
        block.attn.fused_attn = False
        block.attn.attn_drop.register_forward_pre_hook(lambda _, args: maps.append(args[0]))
    with torch.no_grad():
        eager(pixels)
    return torch.stack([vitmad.mad_reference(a, PATCH, num_prefix_tokens=1, grid=GRID) for a in maps])


def _record(model, call, pixels):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad(), vitmad.record(model) as rec:
            out = call(pixels)
    return rec, out, [str(w.message) for w in caught if "vitmad.record" in str(w.message)]


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compiled_wrapper_is_recorded_through_the_module_it_wraps(backend):
    model = _timm_vit()
    pixels = _pixels()
    compiled = torch.compile(model, backend=backend)
    with torch.no_grad():
        compiled(pixels)  # compiled before the recording, as a user's model would be
    assert is_compiled(compiled) and uncompiled(compiled) is model

    rec, out, warned = _record(compiled, compiled, pixels)

    assert rec.layers == ["blocks.0.attn", "blocks.1.attn"]  # the wrapped module's names, no "_orig_mod."
    torch.testing.assert_close(rec.mad.double(), _timm_reference(model, pixels), **TOL)
    with torch.no_grad():
        torch.testing.assert_close(out, model(pixels), rtol=0, atol=0)  # the eager model ran
    assert len(warned) == 1 and "runs eagerly" in warned[0] and "VisionTransformer" in warned[0]
    assert _stance() == "default"
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_module_compiled_in_place_is_recorded():
    model = _timm_vit()
    pixels = _pixels()
    expected = _timm_reference(model, pixels)
    model.compile(backend="eager")
    assert is_compiled(model)
    rec, _, warned = _record(model, model, pixels)
    torch.testing.assert_close(rec.mad.double(), expected, **TOL)
    assert len(warned) == 1


@pytest.mark.parametrize("where", ["a block", "inside DataParallel"])
def test_a_compiled_wrapper_held_as_a_submodule_is_recorded(where):
    """QA 410: a torch.compile wrapper held by the model (a block compiled alone, DataParallel(torch.compile(m)))
    was not seen as compiled: run before the block, its code called no hook, so the block was left out without a
    word, or the wrapped model refused as run "not through the modules being recorded"."""
    model = _timm_vit()
    pixels = _pixels()
    expected = _timm_reference(model, pixels)
    if where == "a block":
        model.blocks[1] = torch.compile(model.blocks[1], backend="eager")
        recorded, names = model, ["blocks.0.attn", "blocks.1._orig_mod.attn"]
        said = "blocks.1 of VisionTransformer is compiled with torch.compile"
    else:
        recorded = torch.nn.DataParallel(torch.compile(model, backend="eager"))
        names = ["module._orig_mod.blocks.0.attn", "module._orig_mod.blocks.1.attn"]
        said = "module of DataParallel is compiled with torch.compile"
    with torch.no_grad():
        recorded(pixels)  # compiled before the recording
    assert is_compiled(recorded)
    rec, _, warned = _record(recorded, recorded, pixels)
    assert rec.layers == names
    torch.testing.assert_close(rec.mad.double(), expected, **TOL)
    assert len(warned) == 1 and warned[0].startswith(f"vitmad.record: {said}; inside the recording it runs eagerly")
    assert _stance() == "default"


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compiled_only_inside_the_block_is_recorded(backend):
    """Compiled inside the block, the model traces vitmad's hooks: disabled for dynamo, each is a graph break that
    runs eagerly, whatever dynamo compiled before in this process (reset: the outcome depended on its caches)."""
    torch._dynamo.reset()
    model = _timm_vit()
    pixels = _pixels()
    expected = _timm_reference(model, pixels)
    with torch.no_grad():
        plain = model(pixels)
    rec, out, warned = _record(model, torch.compile(model, backend=backend), pixels)
    assert rec.layers == ["blocks.0.attn", "blocks.1.attn"] and warned == []
    torch.testing.assert_close(rec.mad.double(), expected, **TOL)
    torch.testing.assert_close(out, plain, rtol=1e-5, atol=1e-6)  # compiled graphs may fuse and round otherwise


def test_every_recording_callback_a_forward_calls_is_disabled_for_dynamo():
    """The callbacks the hooks call inside the model's forward run eagerly when a model compiled in the block traces
    them; _on_module_done lost its decorator to a method inserted above it (found in review)."""
    from vitmad.recording.recorder import Recording

    for name in ("_on_attention", "_on_probabilities", "_on_module_done", "_unread_flex_refusal"):
        assert getattr(getattr(Recording, name), "_torchdynamo_disable", False), name


def test_compiled_inside_the_block_with_fullgraph_fails_with_vitmads_reason():
    torch._dynamo.reset()
    model = _timm_vit()
    with pytest.raises(torch._dynamo.exc.Unsupported, match="vitmad.record's hooks run eagerly, between compiled "
                                                            r"graphs.*fullgraph=True"):
        with torch.no_grad(), vitmad.record(model):
            torch.compile(model, backend="eager", fullgraph=True)(_pixels())


def test_code_compiled_before_the_block_and_reused_inside_it_is_reported_not_seen():
    """A wrapper made inside the block over a model compiled and run before reuses that code, which calls no hooks:
    the recording says the model ran without its layers, and names what to do."""
    torch._dynamo.reset()
    model = _timm_vit()
    pixels = _pixels()
    with torch.no_grad():
        torch.compile(model, backend="eager")(pixels)
    with torch.no_grad(), vitmad.record(model) as rec, pytest.warns(UserWarning, match=_UNSEEN):
        torch.compile(model, backend="eager")(pixels)
    with pytest.raises(RuntimeError, match="ran 1 time.*not through the modules being recorded.*dynamo holds code "
                                           "compiled for VisionTransformer.forward.*give vitmad.record the compiled "
                                           "wrapper"):
        _ = rec.mad


def test_a_second_instance_reusing_the_first_ones_compiled_code_is_reported_with_what_to_do():
    """dynamo keeps compiled code per code object (the class's forward) and does not guard on hooks: a wrapper of a
    second VisionTransformer, compiled after the first one ran compiled, reuses the first one's code, which calls
    none of the recording's hooks. The recording said the forward took a path without its layers, or blamed an
    earlier compile of "the same model" (QA helper-179); it names the compiled forward and what to do, and both
    ways it names record the second model."""
    torch._dynamo.reset()
    first, second = _timm_vit(), _timm_vit()
    pixels = _pixels()
    with torch.no_grad():
        torch.compile(first, backend="eager")(pixels)
    compiled = torch.compile(second, backend="eager")
    with torch.no_grad(), vitmad.record(second) as rec, pytest.warns(UserWarning, match=_UNSEEN):
        compiled(pixels)
    with pytest.raises(RuntimeError, match=r"VisionTransformer ran 1 time\(s\) in this recording, but not through "
                                           r"the modules being recorded \(blocks\.0\.attn, blocks\.1\.attn\): its "
                                           r"forward took a path without them .*or it ran code torch.compile "
                                           r"generated before the block, which calls no hooks: dynamo holds code "
                                           r"compiled for VisionTransformer\.forward, "
                                           r"made by an earlier torch.compile of this model or of another "
                                           r"VisionTransformer.*skip_nnmodule_hook_guards.*give vitmad.record the "
                                           r"compiled wrapper.*or call torch._dynamo.reset\(\) before the block"):
        _ = rec.mad
    expected = _timm_reference(second, pixels)
    rec, _, warned = _record(compiled, compiled, pixels)
    torch.testing.assert_close(rec.mad.double(), expected, **TOL)
    assert len(warned) == 1 and "runs eagerly" in warned[0]
    torch._dynamo.reset()
    with torch.no_grad(), vitmad.record(second) as rec:
        compiled(pixels)
    torch.testing.assert_close(rec.mad.double(), expected, **TOL)


@pytest.mark.parametrize("eager_forwards", [1, 2])
def test_a_forward_through_reused_compiled_code_after_eager_ones_is_said_not_recorded(eager_forwards):
    """Eager forwards of the model, then one of a torch.compile wrapper made in the block, which reuses the code
    compiled before it and so calls none of the hooks: rec.calls held the eager forwards alone and rec.mad read the
    last of them as the latest forward, and nothing said the compiled one was missing (QA helper-186). It is said
    once, when that forward ends, with why and what to do; the eager forwards' calls stay as they were."""
    torch._dynamo.reset()
    model = _timm_vit()
    pixels = _pixels()
    with torch.no_grad():
        torch.compile(model, backend="eager")(pixels)
    expected = _timm_reference(model, pixels)
    with torch.no_grad(), vitmad.record(model) as rec:
        for _ in range(eager_forwards):
            model(pixels)
        with pytest.warns(UserWarning, match=_UNSEEN) as caught:
            compiled = torch.compile(model, backend="eager")
            compiled(pixels)
            compiled(pixels)
    assert sum("not recorded" in str(w.message) for w in caught) == 1  # once per recording
    assert len(rec.calls) == eager_forwards
    for call in rec.calls:
        torch.testing.assert_close(call.mad.double(), expected, **TOL)
    torch._dynamo.reset()


def test_a_model_that_is_not_compiled_keeps_the_stance_and_its_own_compiled_kernels():
    """transformers' flex_attention is a compiled function: forced eager it would round differently."""
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                    image_size=(GRID[0] * PATCH), patch_size=PATCH)
    config._attn_implementation = "flex_attention"
    torch.manual_seed(0)
    model = transformers.ViTModel(config, add_pooling_layer=False).eval()
    pixels = torch.randn(2, 3, GRID[0] * PATCH, GRID[0] * PATCH, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        plain = model(pixels).last_hidden_state
        with vitmad.record(model) as rec:
            assert _stance() == "default"
            recorded = model(pixels).last_hidden_state
    assert torch.equal(plain, recorded)
    assert len(rec.layers) == 2 and rec.mad.isfinite().all()


def test_without_the_eager_stance_compiled_code_bypasses_the_hooks(monkeypatch):
    """The premise of compiled.py: a compiled model recorded as it is reports no layer. Should a torch make
    compiled code call the hooks, this fails and the eager stance can go. (Reset: code an earlier test compiled around
    a recording's hooks would be reused here, and it calls them.)"""
    torch._dynamo.reset()
    model = _timm_vit()
    pixels = _pixels()
    compiled = torch.compile(model, backend="eager")
    with torch.no_grad():
        compiled(pixels)
    monkeypatch.setattr(EagerWhileRecording, "enter", classmethod(lambda cls: None))
    monkeypatch.setattr(EagerWhileRecording, "leave", classmethod(lambda cls: None))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.no_grad(), vitmad.record(compiled) as rec:
            compiled(pixels)
    with pytest.raises(RuntimeError, match="modules being recorded .*which calls no hooks: dynamo holds code "
                                           "compiled for VisionTransformer.forward"):
        _ = rec.mad


def _compiled_vit():
    return torch.compile(_timm_vit(), backend="eager")


def test_stance_is_restored_after_an_error_and_shared_by_overlapping_recordings():
    pixels = _pixels()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ZeroDivisionError), vitmad.record(_compiled_vit()):
            assert _stance() == "force_eager"
            raise ZeroDivisionError
        assert _stance() == "default"

        # A stance the user set before is what comes back.
        with torch.compiler.set_stance("eager_on_recompile"):
            with vitmad.record(_compiled_vit()):
                assert _stance() == "force_eager"
            assert _stance() == "eager_on_recompile"
        assert _stance() == "default"

        # Two threads' recordings overlap: the first to end must not turn compilation back on for the other.
        first_inside, first_done = threading.Event(), threading.Event()
        seen = {}

        def first():
            with vitmad.record(_compiled_vit()):
                first_inside.set()
                first_done.wait(30)

        thread = threading.Thread(target=first)
        thread.start()
        first_inside.wait(30)
        compiled = _compiled_vit()
        with torch.no_grad(), vitmad.record(compiled) as rec:
            first_done.set()
            thread.join(30)
            seen["stance"] = _stance()
            compiled(pixels)
    assert seen["stance"] == "force_eager"
    torch.testing.assert_close(rec.mad.double(), _timm_reference(compiled, pixels), **TOL)
    assert _stance() == "default"


def test_compiled_transformers_model_against_its_eager_attention():
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                    image_size=(GRID[0] * PATCH), patch_size=PATCH)
    torch.manual_seed(0)
    model = transformers.ViTModel(config, add_pooling_layer=False).eval()
    pixels = torch.randn(2, 3, GRID[0] * PATCH, GRID[0] * PATCH, generator=torch.Generator().manual_seed(2))
    compiled = torch.compile(model, backend="eager")
    with torch.no_grad():
        compiled(pixels)
    rec, _, warned = _record(compiled, compiled, pixels)

    eager = copy.deepcopy(model)
    eager.config._attn_implementation = "eager"
    with torch.no_grad():
        maps = eager(pixels, output_attentions=True).attentions
    grid = (GRID[0], GRID[0])
    expected = torch.stack([vitmad.mad_reference(a, PATCH, num_prefix_tokens=1, grid=grid) for a in maps])
    torch.testing.assert_close(rec.mad.double(), expected, **TOL)
    assert len(warned) == 1


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_a_transformers_model_compiled_inside_the_block_gives_no_torch_warning_about_vitmads_code(implementation):
    """QA 391: dynamo traced the recording's argument binding (a functools.cache'd function of vitmad's) and warned
    of "silent incorrectness" at vitmad's file; it now runs eagerly between graphs, as the hooks do. QA 394: so
    does the finding of the eager function in the modeling file's source, also cached."""
    transformers = pytest.importorskip("transformers")
    torch._dynamo.reset()
    config = transformers.ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                    image_size=(GRID[0] * PATCH), patch_size=PATCH)
    config._attn_implementation = implementation
    torch.manual_seed(0)
    model = transformers.ViTModel(config, add_pooling_layer=False).eval()
    pixels = torch.randn(2, 3, GRID[0] * PATCH, GRID[0] * PATCH, generator=torch.Generator().manual_seed(2))
    eager = copy.deepcopy(model)
    eager.config._attn_implementation = "eager"
    with torch.no_grad():
        maps = eager(pixels, output_attentions=True).attentions
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad(), vitmad.record(model) as rec:
            torch.compile(model, backend="eager")(pixels)
    assert [str(w.message) for w in caught if "vitmad" in str(w.message) or "vitmad" in str(w.filename)] == []
    grid = (GRID[0], GRID[0])
    expected = torch.stack([vitmad.mad_reference(a, PATCH, num_prefix_tokens=1, grid=grid) for a in maps])
    torch.testing.assert_close(rec.mad.double(), expected, **TOL)


def test_import_leaves_dynamo_unloaded_until_a_recording_disables_its_hooks_for_it():
    # `import vitmad` does not import dynamo (0.9 s of a 1.1 s import) or torch's flex_attention module; the first
    # Recording, before it installs a hook, disables for dynamo every method a model's forward calls.
    import subprocess
    import sys

    from conftest import subprocess_env

    script = """
import sys
import torch
import vitmad
from vitmad.recording import recorder
heavy = ("torch._dynamo", "sympy", "torch.nn.attention.flex_attention", "torch.nn.attention.bias")
print("loaded at import:", [name for name in heavy if name in sys.modules])
marked = [(cls.__name__, name) for cls in (recorder._RecordingHook, recorder.Recording)
          for name, method in vars(cls).items() if getattr(method, "_vitmad_eager_between_graphs", False)]
print("marked:", sorted(marked))
import timm
model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=1).eval()
with torch.no_grad(), vitmad.record(model) as rec:
    model(torch.randn(1, 3, 32, 32))
print("recorded:", rec.layers, tuple(rec.mad.shape))
disabled = [(c, n) for c, n in marked if getattr(getattr(getattr(recorder, c), n), "_torchdynamo_disable", False)]
print("disabled:", sorted(disabled))
"""
    done = subprocess.run([sys.executable, "-c", script], env=subprocess_env(OMP_NUM_THREADS="1"),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "loaded at import: []"
    marked = lines[1].removeprefix("marked: ")
    assert "('_RecordingHook', '__call__')" in marked and "('Recording', '_on_attention')" in marked
    assert lines[2] == "recorded: ['blocks.0.attn'] (1, 1, 3)"  # [calls, layers, heads]
    assert lines[3].removeprefix("disabled: ") == marked
