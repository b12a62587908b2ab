"""What ``vitmad profile`` reads and writes, where a user's files or options were taken at face value: empty paths,
files of the user's under output names, folders at output paths, linked image folders, earlier runs' outputs
found by a folder search, a partial patch the model floors, a restart over an interrupted run, a resume refused
without saying what changed, a process-group timeout that is no time."""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import pytest
import torch

import vitmad
from conftest import IMAGE_COUNT, save_tiny_hf_vit
from vitmad.cli import main
from vitmad.profiling.images import find_images, parse_image_size
from vitmad.profiling.options import MissingPathError, OptionError

pytest.importorskip("transformers")


def _run(args, capsys):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@contextlib.contextmanager
def _interrupted_at(monkeypatch, batch: int):
    """Inside the block, a run is interrupted (KeyboardInterrupt) as its ``batch``-th batch's sums are added: the
    batches before it are its progress to resume."""
    import vitmad.profiling.engine as engine

    real_add, added = engine.RunningStats.add, []

    def add_then_interrupt(self, mad):
        added.append(1)
        if len(added) == batch:
            raise KeyboardInterrupt
        return real_add(self, mad)

    monkeypatch.setattr(engine.RunningStats, "add", add_then_interrupt)
    try:
        yield
    finally:
        monkeypatch.setattr(engine.RunningStats, "add", real_add)


def _profile(tiny_model, images, out):
    return ["profile", "--model", f"hf:{tiny_model}", "--images", images, "--device", "cpu", "--no-figures",
            "--out", out]


def test_an_image_size_over_pils_pixel_limit_is_refused_naming_it():
    """QA 284: --image-size 20000 skipped every image as of "too extreme" an aspect ratio, then found none read."""
    from PIL import Image

    with pytest.raises(OptionError, match=rf"image_size: 20000x20000 px is 400000000 pixels, over "
                                          rf"PIL.Image.MAX_IMAGE_PIXELS = {Image.MAX_IMAGE_PIXELS}"):
        parse_image_size("20000")
    assert parse_image_size("4096x8192") == (4096, 8192)


@pytest.mark.parametrize("size", [32.5, [32.7, 32], (32, 32.0), True, [True, 32], "32.5"])
def test_an_image_size_that_is_not_whole_numbers_is_refused_not_truncated(size):
    """32.5 failed with "'float' object is not iterable"; [32.7, 32] ran as 32x32; True read as 1x1."""
    with pytest.raises(OptionError, match=r"image_size: expected S or HxW with positive integers .* got "):
        parse_image_size(size)


def test_whole_image_sizes_of_any_integer_type_are_taken():
    np = pytest.importorskip("numpy")
    assert parse_image_size(np.int64(48)) == (48, 48)
    assert parse_image_size([np.int32(32), 48]) == (32, 48)
    assert parse_image_size("32x48") == (32, 48)


def test_empty_paths_are_refused_not_taken_for_the_working_folder(tiny_model, image_folder, tmp_path, capsys,
                                                                  monkeypatch):
    """Path("") is ".": an unset $OUT in a job script wrote the results (and removed an earlier run's) in the
    working folder, and --images "" profiled it recursively."""
    monkeypatch.chdir(tmp_path)
    code, _, err = _run(_profile(tiny_model, image_folder, ""), capsys)
    assert code == 2 and err.strip() == "vitmad: error: --out: expected a folder, got ''"
    code, _, err = _run(_profile(tiny_model, " ", tmp_path / "out"), capsys)
    assert code == 2 and err.strip() == "vitmad: error: --images: expected a folder, a file or builtin, got ' '"
    assert list(tmp_path.iterdir()) == []


def test_a_users_files_under_output_names_are_refused_and_kept(tiny_model, image_folder, tmp_path, capsys):
    """Without an earlier run's mad.json beside them they are not vitmad's: they were written over silently,
    an input photo named mad.png included (profiled, then replaced by the figure)."""
    out = tmp_path / "mine"
    out.mkdir()
    (out / "mad.csv").write_text("my,own,table\n")
    shutil.copy(next(p for p in Path(image_folder).iterdir() if p.suffix == ".png"), out / "mad.png")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    drawing = [arg for arg in _profile(tiny_model, image_folder, out) if arg != "--no-figures"]
    for args, said in ((drawing, "mad.csv, mad.png"), (_profile(tiny_model, image_folder, out), "mad.csv"),
                       (_profile(tiny_model, out, out), "mad.csv")):
        code, _, err = _run(args, capsys)
        assert code == 2
        assert err.strip() == (f"vitmad: error: --out: {out} holds {said}, which this run would write over, "
                               "and no mad.json of an earlier vitmad profile run (so not an earlier run's outputs: "
                               "perhaps yours); pass another folder")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    (out / "mad.json").write_text('{"my": "own json"}')  # not a profile's: refused as well, kept
    assert _run(_profile(tiny_model, image_folder, out), capsys)[0] == 2
    assert json.loads((out / "mad.json").read_text()) == {"my": "own json"}


def test_a_users_file_under_a_name_a_first_run_does_not_write_is_left_alone(tiny_model, image_folder, tmp_path,
                                                                            capsys):
    """QA 403: in an --out without an earlier run, a user's entropy.png beside a MAD-only run, or a photo named
    mad.png beside a --no-figures run, was refused as "which this run would write over": this run writes neither
    (and a folder named mad_map.png, as "holds folders where this run writes files").
    They are left alone, and a later run that would write them is refused (the first run's mad.json does not name
    them)."""
    out = tmp_path / "out"
    out.mkdir()
    photo = next(p for p in Path(image_folder).iterdir() if p.suffix == ".png")
    for name in ("entropy.png", "mad.png"):
        shutil.copy(photo, out / name)
    (out / "mad_map.png").mkdir()  # a folder so named too (QA 411)
    assert _run(_profile(tiny_model, image_folder, out), capsys)[0] == 0
    assert (out / "mad_map.png").is_dir()
    (out / "mad_map.png").rmdir()  # (a run drawing figures writes mad_map.png: refused while the folder is there)
    assert json.loads((out / "mad.json").read_text())["outputs"] == ["mad.json", "mad.csv"]
    assert (out / "entropy.png").read_bytes() == (out / "mad.png").read_bytes() == photo.read_bytes()
    drawing = [arg for arg in _profile(tiny_model, image_folder, out) if arg != "--no-figures"]
    code, _, err = _run(drawing, capsys)
    assert code == 2 and "holds mad.png, which this run would write over, and which the earlier" in err
    assert (out / "mad.png").read_bytes() == photo.read_bytes()


def test_a_users_file_beside_an_earlier_run_under_a_name_that_run_did_not_write_is_kept(
        tiny_model, image_folder, tmp_path, capsys):
    """QA 268: a user's entropy.png saved beside a MAD-only run's results was announced as that run's output and
    removed by the next run. The earlier run's mad.json says which statistics it profiled: a file at another
    statistic's name is the user's, left alone by a MAD-only run, and refused before the model loads by a run that
    would write it (with --no-figures, which writes no figure, it stays)."""
    out = tmp_path / "out"
    assert _run(_profile(tiny_model, image_folder, out), capsys)[0] == 0
    photo = next(p for p in Path(image_folder).iterdir() if p.suffix == ".png")
    shutil.copy(photo, out / "entropy.png")
    with pytest.warns(UserWarning, match=r"holds an earlier run's outputs \(mad.csv, mad.json\): this run replaces"):
        code, stdout, _ = _run(_profile(tiny_model, image_folder, out), capsys)
    assert code == 0 and "removed" not in stdout
    assert (out / "entropy.png").read_bytes() == photo.read_bytes()
    drawing = [arg for arg in _profile(tiny_model, image_folder, out) if arg != "--no-figures"]
    code, _, err = _run([*drawing, "--stats", "entropy"], capsys)
    assert code == 2 and err.strip() == (
        f"vitmad: error: --out: {out} holds entropy.png, which this run would write over, and which the earlier "
        "vitmad profile run there did not write (its mad.json does not name it: perhaps yours); pass another "
        "folder")
    with pytest.warns(UserWarning, match="holds an earlier run's outputs"):
        assert _run([*_profile(tiny_model, image_folder, out), "--stats", "entropy", "--no-figures"], capsys)[0] == 0
    assert (out / "entropy.png").read_bytes() == photo.read_bytes()


def test_a_folder_at_an_output_path_is_refused_before_the_run(tiny_model, image_folder, tmp_path, capsys):
    """It failed after the whole run with IsADirectoryError's traceback, mad.json written and the rest not."""
    out = tmp_path / "out"
    (out / "mad.csv").mkdir(parents=True)
    code, stdout, err = _run(_profile(tiny_model, image_folder, out), capsys)
    assert code == 2 and stdout == ""
    assert err.strip() == (f"vitmad: error: --out: {out} holds folders where this run writes files (mad.csv); pass "
                           "another folder")
    assert sorted(p.name for p in out.iterdir()) == ["mad.csv"]


def test_linked_class_folders_are_searched_and_a_dangling_link_is_listed_as_skipped(tiny_model, image_folder,
                                                                                     tmp_path, capsys):
    """rglob did not follow linked folders (a dataset of linked class folders profiled one image, or none), and
    a dangling link was dropped without a word."""
    real = tmp_path / "real"
    shutil.copytree(image_folder, real)
    dataset = tmp_path / "dataset"
    dataset.mkdir()
    (dataset / "class_a").symlink_to(real, target_is_directory=True)
    (dataset / "class_b").symlink_to(real, target_is_directory=True)  # the same folder twice: its images once
    (dataset / "loop").symlink_to(dataset, target_is_directory=True)
    (dataset / "gone.png").symlink_to(tmp_path / "nowhere.png")
    expected = find_images(real)
    assert len(expected) == IMAGE_COUNT
    found = find_images(dataset)
    assert sorted(p for p in found if p.exists()) == sorted(expected)
    assert [p.name for p in found if not p.exists()] == ["gone.png"]
    out = tmp_path / "out"
    with pytest.warns(UserWarning, match="skipping image .*gone.png"):
        code, stdout, _ = _run(_profile(tiny_model, dataset, out), capsys)
    assert code == 0 and f"{IMAGE_COUNT} images (1 skipped)" in stdout
    doc = json.loads((out / "mad.json").read_text())
    assert [Path(s["path"]).name for s in doc["skipped"]] == ["gone.png"]
    assert doc["skipped"][0]["reason"].startswith("FileNotFoundError")


def test_earlier_runs_outputs_under_the_images_are_not_profiled(tiny_model, image_folder, tmp_path, capsys):
    """--out data/run_a, then --out data/run_b: run_a's figures were profiled as photographs. Named on the
    command line, such a file is taken as asked."""
    data = tmp_path / "data"
    shutil.copytree(image_folder, data)
    run = ["profile", "--model", f"hf:{tiny_model}", "--images", data, "--device", "cpu"]
    assert _run([*run, "--out", data / "run_a"], capsys)[0] == 0
    assert (data / "run_a" / "mad.png").is_file()
    with pytest.warns(UserWarning, match=r"left out \d+ outputs of earlier vitmad profile runs found under --images"):
        code, stdout, _ = _run([*run, "--out", data / "run_b", "--no-figures"], capsys)
    assert code == 0 and f"{IMAGE_COUNT} images (0 skipped)" in stdout
    doc = json.loads((data / "run_b" / "mad.json").read_text())
    assert not any("run_a" in path for path in doc["images"])
    code, stdout, _ = _run(["profile", "--model", f"hf:{tiny_model}", "--images", data / "run_a" / "mad.png",
                            "--device", "cpu", "--no-figures", "--out", tmp_path / "one"], capsys)
    assert code == 0 and "1 images (0 skipped)" in stdout
    code, _, err = _run(["profile", "--model", f"hf:{tiny_model}", "--images", data / "run_a", "--device", "cpu",
                         "--out", tmp_path / "none"], capsys)
    assert code == 2 and "--images: found only the outputs of earlier vitmad profile runs" in err
    # So too vitmad.profile, which averaged run_a's figures into the MAD as photographs (QA 421).
    import vitmad
    from vitmad.profiling.options import OptionError

    with pytest.warns(UserWarning, match=r"left out \d+ outputs of earlier vitmad profile runs found under images"):
        result = vitmad.profile(f"hf:{tiny_model}", data, device="cpu")
    assert result.images == doc["images"]
    with pytest.raises(OptionError, match="images: found only the outputs of earlier vitmad profile runs"):
        vitmad.profile(f"hf:{tiny_model}", data / "run_a", device="cpu")
    assert vitmad.profile(f"hf:{tiny_model}", [data / "run_a" / "mad.png"], device="cpu").count == 1


def test_a_partial_patch_a_transformers_vit_floors_is_refused(image_folder, tmp_path):
    """transformers' ViT patch embedding (kernel = stride, no padding) drops the partial patches at the right and
    bottom edges: at 30 px with 8 px patches the model saw 24 x 24 px while mad.json said 30 x 30."""
    import vitmad

    model = save_tiny_hf_vit(tmp_path / "vit")
    with pytest.raises(OptionError, match=r"image_size: expected whole 8x8 patches of the model "
                                          r"\(embeddings.patch_embeddings.projection takes no partial patch\), got "
                                          r"30x30; for example 24x24"):
        vitmad.profile(f"hf:{model}", image_folder, device="cpu", image_size=30)
    assert vitmad.profile(f"hf:{model}", image_folder, device="cpu", image_size=(24, 40), max_images=2).count == 2


def test_a_model_folder_under_the_home_folder_is_loaded_from_a_tilde_path(tiny_model, image_folder, tmp_path,
                                                                           monkeypatch):
    """hf:~/folder (unexpanded: from Python, or quoted in a shell) was checked as a folder and then handed to
    transformers as written, which refused it as a hub id (QA helper-124). The spec stays as given in mad.json."""
    import vitmad

    shutil.copytree(tiny_model, tmp_path / "models" / "vit")
    monkeypatch.setenv("HOME", str(tmp_path))
    result = vitmad.profile("hf:~/models/vit", image_folder, device="cpu", max_images=2)
    assert result.count == 2 and result.model == "hf:~/models/vit"
    expected = vitmad.profile(f"hf:{tiny_model}", image_folder, device="cpu", max_images=2)
    torch.testing.assert_close(result.mad, expected.mad, rtol=0, atol=0)
    with pytest.raises(MissingPathError, match="no such model folder ~/models/none"):
        vitmad.profile("hf:~/models/none", image_folder, device="cpu")


def test_a_swin_that_pads_partial_patches_is_not_refused(image_folder):
    """transformers' Swin pads the image to whole patches (maybe_pad): nothing is lost, the size stands."""
    import torch
    from transformers import SwinConfig, SwinModel

    import vitmad
    from vitmad.profiling.images import Preprocessing
    from vitmad.profiling.models import wrap_module

    torch.manual_seed(0)
    config = SwinConfig(image_size=32, patch_size=4, embed_dim=8, depths=[1, 1], num_heads=[1, 2], window_size=2)
    prep = Preprocessing((32, 32), ("exact", 32, 32), False, (0.5,) * 3, (0.5,) * 3)
    model = wrap_module(SwinModel(config).eval(), "hf:swin", prep)
    assert vitmad.profile(model, image_folder, device="cpu", image_size=(30, 34), max_images=2).count == 2


def test_a_restart_over_an_interrupted_run_says_so(tiny_model, image_folder, tmp_path, capsys, monkeypatch):
    """Rerunning without --resume replaced the interrupted run's progress without a word."""
    out = tmp_path / "out"
    base = [*_profile(tiny_model, image_folder, out), "--batch-size", "1"]
    with _interrupted_at(monkeypatch, 3):
        assert _run(base, capsys)[0] == 130
    # Ctrl-C at that warning, before the new run finished a batch, wrote a checkpoint of nothing over the
    # interrupted run's progress and still said progress was saved (QA helper-243): that progress stays.
    saved = (out / "checkpoint.pt").read_bytes()
    with _interrupted_at(monkeypatch, 1), pytest.warns(UserWarning, match="holds an interrupted run's progress"):
        assert _run(base, capsys)[0] == 130
    assert (out / "checkpoint.pt").read_bytes() == saved
    with pytest.warns(UserWarning, match=rf"{out / 'checkpoint.pt'} holds an interrupted run's progress \(2 of "
                                         rf"{IMAGE_COUNT} batches\); this run starts over and replaces it"):
        assert _run(base, capsys)[0] == 0
    # A finished run's checkpoint is no progress to lose: no warning.
    with pytest.warns(UserWarning, match="holds an earlier run's outputs") as warned:
        assert _run(base, capsys)[0] == 0
    assert not any("interrupted" in str(w.message) for w in warned)


def test_a_ctrl_c_a_finalizer_drops_still_ends_the_run_and_keeps_the_progress(
        tiny_model, image_folder, tmp_path, capsys, monkeypatch):
    """QA 377: a Ctrl-C while the model loaded, raised where a finalizer ran (a __del__ the garbage collector
    called), was printed by Python as "Exception ignored" and dropped; the run went on to its end and replaced an
    interrupted earlier run's checkpoint, the progress the user pressed Ctrl-C to keep. The command remembers it and
    ends the run before its first batch: 130, the checkpoint as it was."""
    import signal
    import sys

    import vitmad.profiling.models as models

    out = tmp_path / "out"
    base = [*_profile(tiny_model, image_folder, out), "--batch-size", "1"]
    with _interrupted_at(monkeypatch, 3):
        assert _run(base, capsys)[0] == 130
    saved = (out / "checkpoint.pt").read_bytes()
    real_load, dropped = models.load_model, []

    class Finalized:
        def __del__(self):
            signal.raise_signal(signal.SIGINT)
            for _ in range(100):  # the handler runs between instructions: in here, where Python drops what it raises
                pass

    def load_then_collect(*args, **kwargs):
        loaded = real_load(*args, **kwargs)
        Finalized()  # collected at once
        return loaded

    monkeypatch.setattr(models, "load_model", load_then_collect)  # the command loads by it
    monkeypatch.setattr(sys, "unraisablehook", lambda unraisable: dropped.append(unraisable.exc_type))
    # Python's own handler, as a program starts with (what the test process holds may be another's).
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.warns(UserWarning, match="holds an interrupted run's progress"):
            code, _, err = _run(base, capsys)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the command's handler taken away
    finally:
        signal.signal(signal.SIGINT, before)
    assert dropped == [KeyboardInterrupt]
    assert code == 130 and "interrupted before this run saved any progress" in err
    assert (out / "checkpoint.pt").read_bytes() == saved


def test_a_refused_resume_names_what_changed(tiny_model, image_folder, tmp_path, capsys, monkeypatch):
    """Every mismatch read "other settings, other model weights or other images", whichever it was."""
    out = tmp_path / "out"
    base = [*_profile(tiny_model, image_folder, out), "--batch-size", "1", "--stats", "entropy"]
    with _interrupted_at(monkeypatch, 2):  # one batch finished: a checkpoint to resume
        assert _run(base, capsys)[0] == 130
    assert (out / "checkpoint.pt").is_file()
    code, _, err = _run([*base, "--resume", "--stats", "entropy,self_mass", "--max-images", "3"], capsys)
    assert code == 2
    # The command names its flags (QA 284: it named profile()'s parameters, batch_size for --batch-size).
    assert ("(changed since: the images (the files or folders given, --max-images, a folder's files), --stats); "
            "rerun with the same model, "
            "weights, images and options, or without --resume to start over") in err
    code, _, err = _run([*base, "--resume", "--renormalize", "--batch-size", "2"], capsys)
    assert code == 2 and "(changed since: --batch-size, --renormalize); rerun" in err


def test_a_resume_follows_the_model_folder_not_its_spelling_and_refuses_an_edited_config(
        tiny_model, image_folder, tmp_path, capsys, monkeypatch):
    """QA 276: a config.json edited between a run and its resume (relu for gelu, same weights) was accepted and
    the result mixed two models; the same folder spelled ./tiny or by its absolute path was refused."""
    shutil.copytree(tiny_model, tmp_path / "tiny")
    monkeypatch.chdir(tmp_path)

    def interrupted(spec: str, out: str) -> list[str]:
        args = ["profile", "--model", spec, "--images", image_folder, "--device", "cpu", "--no-figures",
                "--batch-size", "1", "--out", out]
        with _interrupted_at(monkeypatch, 2):
            assert _run(args, capsys)[0] == 130
        return args

    whole = ["profile", "--model", "hf:tiny", "--images", image_folder, "--device", "cpu", "--no-figures",
             "--batch-size", "1", "--out", "whole"]
    assert _run(whole, capsys)[0] == 0
    args = interrupted("hf:tiny", "cut")
    args[args.index("hf:tiny")] = f"hf:{tmp_path / 'tiny'}"
    assert _run([*args, "--resume"], capsys)[0] == 0
    assert Path("cut/mad.csv").read_text() == Path("whole/mad.csv").read_text()

    args = interrupted("hf:./tiny", "edited")
    config = json.loads(Path("tiny/config.json").read_text())
    Path("tiny/config.json").write_text(json.dumps({**config, "hidden_act": "relu"}))
    code, _, err = _run([*args, "--resume"], capsys)
    assert code == 2 and ("(changed since: the model's architecture or configuration (a transformers model's "
                          "config.json, another's modules)); rerun") in err


def test_a_resume_of_a_module_whose_activation_was_swapped_is_refused(tmp_path, monkeypatch):
    """QA 286: a transformers module's config alone stood for its architecture, so a module of the user's with an
    activation swapped (GELU for ReLU, the same weights) resumed and mixed the two models' sums."""
    from transformers import ViTConfig, ViTModel

    import vitmad

    torch.manual_seed(0)
    model = ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                               image_size=32, patch_size=8), add_pooling_layer=False).eval()
    pixels = torch.randn(4, 3, 32, 32)
    with _interrupted_at(monkeypatch, 2), pytest.raises(KeyboardInterrupt):
        vitmad.profile(model, pixels, device="cpu", batch_size=1, checkpoint=tmp_path / "run.pt")
    model.layers[1].mlp.activation_fn = torch.nn.ReLU()
    with pytest.raises(OptionError, match=r"changed since: the model's architecture or configuration"):
        vitmad.profile(model, pixels, device="cpu", batch_size=1, checkpoint=tmp_path / "run.pt", resume=True)


def test_a_checkpoint_of_the_fingerprint_before_the_architecture_joined_it_still_resumes(tiny_model, image_folder,
                                                                                         tmp_path, monkeypatch):
    """QA 285: a checkpoint written before the model's architecture joined the run's identity (2026-12-06) was
    refused as 'the model's architecture or configuration' changed, though nothing had."""
    import vitmad
    import vitmad.profiling.engine as engine

    whole = vitmad.profile(f"hf:{tiny_model}", image_folder, device="cpu", batch_size=1)
    plans, real_plan = [], engine.plan_run
    monkeypatch.setattr(engine, "plan_run", lambda *a, **k: plans.append(real_plan(*a, **k)) or plans[-1])
    checkpoint = tmp_path / "run.pt"
    with _interrupted_at(monkeypatch, 3), pytest.raises(KeyboardInterrupt):
        vitmad.profile(f"hf:{tiny_model}", image_folder, device="cpu", batch_size=1, checkpoint=checkpoint)
    # As that version wrote it: the fingerprint without the architecture, the model by its spelling.
    state = torch.load(checkpoint, weights_only=True)
    plan = plans[-1]
    assert plan.earlier_fingerprint not in (None, plan.fingerprint)
    state["fingerprint"] = plan.earlier_fingerprint
    del state["identity"]["architecture"]
    state["identity"]["model"] = f"hf:{tiny_model}"
    torch.save(state, checkpoint)
    resumed = vitmad.profile(f"hf:{tiny_model}", image_folder, device="cpu", batch_size=1, checkpoint=checkpoint,
                             resume=True)
    assert torch.equal(resumed.mad, whole.mad) and resumed.count == whole.count
    # Refused for a change that version would have seen, naming that change alone.
    state["identity"]["renormalize"] = True
    state["fingerprint"] = "another"
    torch.save(state, checkpoint)
    with pytest.raises(OptionError, match=r"\(changed since: renormalize\); rerun"):
        vitmad.profile(f"hf:{tiny_model}", image_folder, device="cpu", batch_size=1, checkpoint=checkpoint,
                       resume=True)


@pytest.mark.parametrize("timeout", ["-5", "0", "nan", "inf"])
def test_a_process_group_timeout_that_is_no_time_is_refused(tiny_model, image_folder, tmp_path, capsys, timeout):
    """Under torchrun, -5 or 0 gave gloo's DistNetworkError tracebacks on every rank; outside it, any value ran."""
    code, _, err = _run([*_profile(tiny_model, image_folder, tmp_path / "out"), "--dist-timeout", timeout], capsys)
    assert code == 2
    assert err.strip() == (f"vitmad: error: --dist-timeout: expected a positive number of seconds, got "
                           f"{float(timeout)!r}")


def test_a_timeout_too_long_and_nccl_without_gpus_are_refused_outside_torchrun_too(tiny_model, image_folder,
                                                                                   tmp_path, capsys, monkeypatch):
    """QA 284: --dist-timeout 1e15 passed the check and overflowed timedelta on every rank; --backend nccl on a
    machine without CUDA ran in one process and failed only under torchrun."""
    code, _, err = _run([*_profile(tiny_model, image_folder, tmp_path / "out"), "--dist-timeout", "1e15"], capsys)
    assert code == 2 and err.strip() == ("vitmad: error: --dist-timeout: expected at most 1000000000 seconds (about "
                                         "31 years: torch counts the deadline in int64 nanoseconds), got "
                                         "1000000000000000.0")
    for seconds in ("9e9", "86399999999999"):  # hung or timed out at once under torchrun (QA 286)
        assert _run([*_profile(tiny_model, image_folder, tmp_path / "out"), "--dist-timeout", seconds], capsys)[0] == 2
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, _, err = _run([*_profile(tiny_model, image_folder, tmp_path / "out"), "--backend", "nccl"], capsys)
    assert code == 2 and err.strip() == "vitmad: error: --backend: nccl needs CUDA GPUs; use gloo on CPUs"
    assert not (tmp_path / "out").exists()


def test_a_run_reading_nothing_keeps_the_progress_of_an_interrupted_run_there(tiny_model, image_folder, tmp_path,
                                                                             capsys, monkeypatch):
    """QA 284: a run given a folder of nothing readable, into the --out of an interrupted run, replaced that run's
    checkpoint with one of nothing, then removed it: the interrupted run's progress was lost."""
    out = tmp_path / "out"
    base = [*_profile(tiny_model, image_folder, out), "--batch-size", "1"]
    assert _run([*_profile(tiny_model, image_folder, tmp_path / "whole"), "--batch-size", "1"], capsys)[0] == 0
    with _interrupted_at(monkeypatch, 3):
        assert _run(base, capsys)[0] == 130
    progress = (out / "checkpoint.pt").read_bytes()
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.warns(UserWarning) as warned:
        code, _, err = _run(_profile(tiny_model, tmp_path / "notes.png", out), capsys)
    assert any("interrupted run's progress" in str(w.message) for w in warned)
    assert code == 2 and err.strip().splitlines()[-1] == "vitmad: error: --images: none of the 1 images could be read"
    assert (out / "checkpoint.pt").read_bytes() == progress
    assert _run([*base, "--resume"], capsys)[0] == 0
    assert (out / "mad.csv").read_text() == (tmp_path / "whole" / "mad.csv").read_text()


def test_a_looping_link_named_is_skipped_and_a_run_reading_nothing_leaves_no_folder(tiny_model, tmp_path, capsys):
    """QA 268: a symbolic-link loop named on the command line escaped as pathlib's RuntimeError traceback; a run
    whose every image is unreadable left a checkpoint of nothing in the --out folder it made."""
    (tmp_path / "a.png").symlink_to(tmp_path / "b.png")
    (tmp_path / "b.png").symlink_to(tmp_path / "a.png")
    out = tmp_path / "new" / "out"
    with pytest.warns(UserWarning, match=r"skipping image .*a\.png: OSError: \[Errno 40\] Too many levels of "
                                         r"symbolic links"):
        code, _, err = _run(_profile(tiny_model, tmp_path / "a.png", out), capsys)
    assert code == 2 and err.strip().splitlines()[-1] == "vitmad: error: --images: none of the 1 images could be read"
    assert not (tmp_path / "new").exists()


def test_videos_given_to_an_image_model_are_refused(tiny_model, image_folder, tmp_path, capsys):
    """QA 268: --videos with an image model (a --model forgotten) dropped the clips without a word and profiled a
    frame folder's frames as stills, where vitmad.profile(videos=True) refuses."""
    frames = tmp_path / "clips" / "clip_a"
    shutil.copytree(image_folder, frames)
    command = _profile(tiny_model, tmp_path / "clips", tmp_path / "out")
    command[command.index("--images")] = "--videos"
    code, _, err = _run(command, capsys)
    assert code == 2 and err.strip() == (
        f"vitmad: error: --videos: ViTModel (hf:{tiny_model}) is no video model (no frame count in its config) and no "
        "packed vision tower: it takes images; pass them with --images, or a video model with --model")
    assert not (tmp_path / "out").exists()


def test_clips_named_among_images_for_an_image_model_are_said_to_be_clips(tiny_model, image_folder, tmp_path, capsys):
    """QA 290, 294: a clip given among the images of an image model was skipped as an unidentified image, and the
    run refused as reading none, without a word that the model takes no clips (the command and profile() alike; a
    folder of clips alone said it held no images)."""
    clip = tmp_path / "clips" / "a.mp4"
    clip.parent.mkdir()
    clip.write_bytes(b"\x00\x00\x00\x18ftypmp42")  # its name makes it a clip; never decoded
    code, _, err = _run(_profile(tiny_model, clip, tmp_path / "out"), capsys)
    assert code == 2 and err.strip() == (
        f"vitmad: error: --images: {clip}: a video clip, and ViTModel (hf:{tiny_model}) is no video model (no frame "
        "count in its config): it takes images; pass image files, or a video model with --model")
    code, _, err = _run(_profile(tiny_model, clip.parent, tmp_path / "out"), capsys)
    assert code == 2 and err.strip().endswith(f"found in folder {clip.parent}; it holds video clips, which a video "
                                              "model takes")
    command = _profile(tiny_model, image_folder, tmp_path / "out")
    command.insert(command.index("--images") + 2, str(clip))
    with pytest.warns(UserWarning, match=rf"left out a video clip among the images \({clip}\): ViTModel"):
        assert _run(command, capsys)[0] == 0
    assert str(clip) not in (tmp_path / "out" / "mad.json").read_text()
    # profile() in Python: the same, its warning at the caller's line.
    with pytest.raises(OptionError, match=r"a video clip, and ViTModel .* pass image files, or a video model with "
                                          r"model=\.\.\.$"):
        vitmad.profile(f"hf:{tiny_model}", [clip], device="cpu")
    with pytest.warns(UserWarning, match="left out a video clip among the images") as said:
        result = vitmad.profile(f"hf:{tiny_model}", [clip, *sorted(Path(image_folder).iterdir())[:2]], device="cpu")
    assert result.count == 2 and result.skipped == [] and [w.filename for w in said] == [__file__]


def test_mad_json_names_the_files_the_run_wrote_and_a_users_figure_beside_a_no_figures_run_is_kept(
        tiny_model, image_folder, tmp_path, capsys):
    """QA 270: a user's mad.png beside a --no-figures run's results was removed by the next run as the earlier
    run's (its statistics said MAD, whose figure is mad.png). mad.json names the files its run writes
    ("outputs"): a file not among them is the user's, left alone, or refused before the model loads by a run that
    would write it."""
    out = tmp_path / "out"
    assert _run(_profile(tiny_model, image_folder, out), capsys)[0] == 0
    assert json.loads((out / "mad.json").read_text())["outputs"] == ["mad.json", "mad.csv"]
    photo = next(p for p in Path(image_folder).iterdir() if p.suffix == ".png")
    shutil.copy(photo, out / "mad.png")
    with pytest.warns(UserWarning, match="holds an earlier run's outputs"):
        code, stdout, _ = _run(_profile(tiny_model, image_folder, out), capsys)
    assert code == 0 and "removed" not in stdout and (out / "mad.png").read_bytes() == photo.read_bytes()
    drawing = [arg for arg in _profile(tiny_model, image_folder, out) if arg != "--no-figures"]
    code, _, err = _run(drawing, capsys)
    assert code == 2 and "holds mad.png, which this run would write over" in err
    (out / "mad.png").unlink()
    with pytest.warns(UserWarning, match="holds an earlier run's outputs"):
        assert _run([*drawing, "--stats", "entropy"], capsys)[0] == 0
    assert json.loads((out / "mad.json").read_text())["outputs"] == [
        "mad.json", "mad.csv", "mad.png", "entropy.png", "mad_map.png"]
    # Then a MAD-only run removes that run's entropy figure (before writing its own files).
    with pytest.warns(UserWarning, match="holds an earlier run's outputs"):
        code, stdout, _ = _run(drawing, capsys)
    assert code == 0 and f"removed the earlier run's {out / 'entropy.png'}" in stdout
    assert not (out / "entropy.png").exists()


def test_a_run_failing_while_it_draws_leaves_no_earlier_figure_it_would_claim(tiny_model, image_folder, tmp_path,
                                                                               capsys, monkeypatch):
    """QA 273: only the earlier run's files this run does not write were removed before it wrote its own; failing
    while drawing, it left the earlier model's mad_map.png beside its results, which its mad.json named as its own.
    Every earlier file goes first."""
    from vitmad.profiling import plotting

    out = tmp_path / "out"
    drawing = [arg for arg in _profile(tiny_model, image_folder, out) if arg != "--no-figures"]
    assert _run(drawing, capsys)[0] == 0
    assert (out / "mad_map.png").is_file()

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(plotting, "plot_mad_maps", broken)
    with pytest.warns(UserWarning, match="holds an earlier run's outputs"):
        code, _, err = _run(drawing, capsys)
    assert code == 1 and "disk full" in err
    assert not (out / "mad_map.png").exists()
    # Not drawn, not named (QA 275: named, a user's file of its name would go with the next run).
    assert json.loads((out / "mad.json").read_text())["outputs"] == ["mad.json", "mad.csv", "mad.png"]


def test_a_run_interrupted_while_it_removes_the_earlier_outputs_is_resumed(tiny_model, image_folder, tmp_path,
                                                                            capsys, monkeypatch):
    """QA 303: the earlier run's files went in name order, mad.json second; a run killed after it left the figures
    without it, which the rerun with --resume took for the user's files and refused to write over. mad.json, what
    marks them as an earlier run's, goes last."""
    out = tmp_path / "out"
    drawing = [arg for arg in _profile(tiny_model, image_folder, out) if arg != "--no-figures"]
    assert _run(drawing, capsys)[0] == 0
    first = json.loads((out / "mad.json").read_text())
    outputs = {"mad.json", "mad.csv", "mad.png", "mad_map.png"}
    assert outputs <= {p.name for p in out.iterdir()}
    removed, unlink = [], Path.unlink

    def interrupted_unlink(path, missing_ok=False):
        if path.parent == out and path.name in outputs:
            removed.append(path.name)
            if len(removed) == 3:
                raise KeyboardInterrupt
        return unlink(path, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", interrupted_unlink)
    with pytest.warns(UserWarning, match="holds an earlier run's outputs"):
        assert _run(drawing, capsys)[0] == 130
    monkeypatch.setattr(Path, "unlink", unlink)
    assert removed == ["mad.csv", "mad.png", "mad_map.png"]
    assert {"mad.json", "mad_map.png"} <= {p.name for p in out.iterdir()}
    code, _, err = _run([*drawing, "--resume"], capsys)
    assert code == 0, err
    assert json.loads((out / "mad.json").read_text())["layers"] == first["layers"]


def test_a_missing_image_decoder_names_the_extra_before_the_run(tiny_model, image_folder, tmp_path, capsys,
                                                                monkeypatch):
    """QA 296: without Pillow the refusal came at the first batch, the run's bar drawn; now before the run, as
    the video decoder's. A pixel tensor needs no decoder."""
    import sys

    monkeypatch.setitem(sys.modules, "PIL.Image", None)  # import PIL.Image now raises ModuleNotFoundError
    code, out, err = _run(_profile(tiny_model, image_folder, tmp_path / "out"), capsys)
    assert code == 2 and out == "" and err.strip() == (
        'vitmad: error: decoding image files needs the package Pillow, which is not installed: pip install '
        '"vitmad[profile]"')
    assert vitmad.profile(f"hf:{tiny_model}", torch.randn(2, 3, 32, 32), device="cpu").count == 2


def test_a_processor_class_transformers_cannot_give_without_pillow_reads_as_no_alpha_compositing(monkeypatch):
    """QA 296: without Pillow transformers gives a stand-in class whose attributes raise ImportError; reading its
    do_convert_rgb crashed an hf: spec, even over a pixel tensor."""
    import transformers

    from vitmad.profiling.images import hf_alpha_on_white

    class _NeedsPillow(type):
        def __getattr__(cls, name):
            raise ImportError("ViTImageProcessor requires the PIL library but it was not found in your environment")

    monkeypatch.setattr(transformers, "ViTImageProcessor", _NeedsPillow("ViTImageProcessor", (), {}))
    assert hf_alpha_on_white({"image_processor_type": "ViTImageProcessor"}) is False
    assert hf_alpha_on_white({"image_processor_type": "ViTImageProcessor", "do_convert_rgb": True}) is True
