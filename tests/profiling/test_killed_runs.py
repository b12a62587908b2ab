"""A long ``vitmad profile`` never loses work: SIGKILLed at random points and resumed it ends exactly like an
uninterrupted run, its checkpoint is never torn, and an unwritable or full ``--out`` fails before any work."""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

import vitmad.profiling.checkpoint as checkpoint_module
from conftest import subprocess_env, write_images
from vitmad.cli import main
from vitmad.profiling.checkpoint import (
    FORMAT,
    check_checkpoint_path,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
)
from vitmad.profiling.files import check_writable

pytest.importorskip("transformers")

KILLS = 5
IMAGES = 80
BATCH = 2
# The child is the real command with each batch slowed down a little, so that random kill times land all over
# a batch (model, stats, checkpoint write and fsync) instead of mostly in Python's start-up.
CHILD = """
import sys, time
import vitmad.profiling.stats
add = vitmad.profiling.stats.RunningStats.add
vitmad.profiling.stats.RunningStats.add = lambda self, mad: (time.sleep(0.03), add(self, mad))[1]
from vitmad.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _profile_args(model: Path, images: Path, out: Path) -> list[str]:
    return ["profile", "--model", f"hf:{model}", "--images", str(images), "--batch-size", str(BATCH),
            "--device", "cpu", "--no-figures", "--workers", "1", "--checkpoint-every", "1", "--out", str(out)]


def _run(args: list[str], log: Path) -> subprocess.Popen:
    """Start the child; its output (tqdm's bar included) goes to ``log``, so a full pipe never blocks it."""
    env = subprocess_env()
    with open(log, "ab") as handle:
        return subprocess.Popen([sys.executable, "-c", CHILD, *args], env=env, stdout=handle, stderr=handle)


def _inode(path: Path) -> int | None:
    try:
        return path.stat().st_ino  # os.replace gives every new checkpoint a new inode
    except FileNotFoundError:
        return None


@pytest.mark.slow
def test_sigkilled_runs_resume_to_the_uninterrupted_result(tiny_model, tmp_path):
    images = tmp_path / "images"
    write_images(images, IMAGES)
    log = tmp_path / "log.txt"
    full = _run(_profile_args(tiny_model, images, tmp_path / "full"), log)
    assert full.wait(timeout=300) == 0, log.read_text()[-3000:]
    expected = json.loads((tmp_path / "full" / "mad.json").read_text())

    out = tmp_path / "cut"
    args = _profile_args(tiny_model, images, out)
    ckpt = out / "checkpoint.pt"
    rng = random.Random(8)
    kills, done_after_kill = 0, [0]
    for attempt in range(KILLS):
        before = _inode(ckpt)
        child = _run(args + (["--resume"] if attempt else []), log)
        # Once this run has saved a checkpoint of its own, kill it at a random point of the batches that follow.
        deadline = time.monotonic() + 300
        while child.poll() is None and _inode(ckpt) == before and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 0.25))
        if child.poll() is not None:
            break  # finished before the kill (a very slow machine gives fewer kills; asserted below)
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=60) == -signal.SIGKILL
        kills += 1
        # Never torn: the checkpoint loads, and it only ever moves forward.
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        assert state["format"] == FORMAT
        assert done_after_kill[-1] <= state["batches_done"] <= IMAGES // BATCH
        assert len(state["images"]) == BATCH * state["batches_done"]
        done_after_kill.append(state["batches_done"])

    resumed = _run(args + ["--resume"], log)
    assert resumed.wait(timeout=300) == 0, log.read_text()[-3000:]
    print(f"\nkilled {kills} times; batches done after each kill: {done_after_kill[1:]} of {IMAGES // BATCH}")
    assert kills >= 3, f"only {kills} kills landed mid-run"
    assert json.loads((out / "mad.json").read_text()) == expected
    assert not list(out.glob(".*.tmp")), "temporary files of killed writers are cleaned up"


def test_failed_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"fingerprint": "run", "batches_done": 1})
    # What SIGKILL in the middle of a save leaves behind: a temporary file, never the checkpoint itself.
    (tmp_path / ".checkpoint.pt.killed.tmp").write_bytes(b"half a checkpoint")

    def half_then_disk_full(obj, handle):
        handle.write(b"PK\x03\x04 half a zip")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint_module.torch, "save", half_then_disk_full)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(path, {"fingerprint": "run", "batches_done": 2})
    assert load_checkpoint(path, "run")["batches_done"] == 1
    monkeypatch.undo()
    save_checkpoint(path, {"fingerprint": "run", "batches_done": 3})
    assert load_checkpoint(path, "run")["batches_done"] == 3
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


def _no_model_load(monkeypatch):
    """Make loading a model fail the test: the writability check must come first."""
    import vitmad.profiling.models

    def load_model(*_, **__):
        raise AssertionError("the model was loaded before --out was checked")

    monkeypatch.setattr(vitmad.profiling.models, "load_model", load_model)


def _fail_writes_under(folder: Path, error: int, monkeypatch, *, at: str) -> None:
    """Make creating (``at="create"``) or writing (``at="write"``) files under ``folder`` fail with ``error``,
    as a read-only file system or a full disk does, even for root."""
    if at == "create":
        real_mkstemp = tempfile.mkstemp

        def mkstemp(*args, dir=None, **kwargs):
            if dir is not None and Path(dir).resolve().is_relative_to(folder.resolve()):
                raise OSError(error, os.strerror(error))
            return real_mkstemp(*args, dir=dir, **kwargs)

        monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    else:
        real_write = os.write

        def write(fd, data):
            if os.readlink(f"/proc/self/fd/{fd}").startswith(str(folder.resolve())):
                raise OSError(error, os.strerror(error))
            return real_write(fd, data)

        monkeypatch.setattr(os, "write", write)


@pytest.mark.parametrize("variant", ["under_a_file", "chmod_read_only", "read_only_fs", "disk_full"])
def test_unwritable_out_fails_before_any_work(tiny_model, tmp_path, capsys, monkeypatch, variant):
    images = tmp_path / "images"
    write_images(images, 2)
    out = tmp_path / "out"
    expected = {"under_a_file": f"a file, not a folder ({tmp_path / 'a_file'} is one)",
                "chmod_read_only": "Permission denied",
                "read_only_fs": "Read-only file system", "disk_full": "No space left on device"}[variant]
    if variant == "under_a_file":
        (tmp_path / "a_file").write_text("x")
        out = tmp_path / "a_file" / "out"  # unwritable for root too
    elif variant == "chmod_read_only":
        if os.geteuid() == 0:
            pytest.skip("root writes through chmod; the read_only_fs variant covers this path")
        out.mkdir()
        out.chmod(0o500)
    elif variant == "read_only_fs":
        out.mkdir()
        _fail_writes_under(out, errno.EROFS, monkeypatch, at="create")
    else:
        if not Path("/proc/self/fd").is_dir():
            pytest.skip("needs /proc to tell the probe's file descriptor from others")
        _fail_writes_under(tmp_path, errno.ENOSPC, monkeypatch, at="write")
    _no_model_load(monkeypatch)
    code = main(_profile_args(tiny_model, images, out))
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip() == f"vitmad: error: --out: cannot write to {out}: {expected}"
    if out.is_dir():
        assert not list(out.iterdir()), "the failed probe leaves nothing behind"


def test_check_writable_creates_the_folder_and_leaves_it_empty(tmp_path):
    check_writable(tmp_path / "new" / "nested")
    assert (tmp_path / "new" / "nested").is_dir() and not list((tmp_path / "new" / "nested").iterdir())


def test_the_interrupt_message_says_whether_there_is_progress_to_resume(tmp_path, monkeypatch, capsys):
    """Ctrl-C before the first batch has finished leaves no checkpoint of this run: the command does not send the
    user to --resume then, also where an earlier run's checkpoint is there (QA 303: a finished run's was taken for
    this run's progress, and the rerun with --resume refused), nor under --resume before the resume checked and
    loaded it (QA 306: one with other settings, or no checkpoint at all, was called progress); once this run wrote
    one, or resumed one, it does."""
    import vitmad.cli as cli
    import vitmad.profiling.checkpoint as checkpoints

    steps = []

    def interrupted(args, run, held):
        # As the command does before its run: its check remembers the checkpoint there that passed (one that is no
        # vitmad checkpoint is refused there; here, the interrupt comes before that check).
        if read_checkpoint(Path(args.out) / "checkpoint.pt") is not None:
            check_checkpoint_path(Path(args.out) / "checkpoint.pt")
        for step in steps:
            step(Path(args.out) / "checkpoint.pt")
        steps.clear()
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_profile_command", interrupted)
    monkeypatch.setattr(checkpoints, "RESUMED", {})
    monkeypatch.setattr(checkpoints, "CHECKED", {})
    out = tmp_path / "out"
    earlier = out / "checkpoint.pt"
    saved = (f"vitmad: interrupted; progress is saved in {out}, rerun the same command with --resume to "
             "continue\n")
    nothing = "vitmad: interrupted; nothing was saved\n"
    earlier_runs = (f"vitmad: interrupted before this run saved any progress; {earlier} is an earlier run's, which "
                    "--resume continues where that run had this command's settings\n")
    assert main(["profile", "--out", str(out)]) == 130
    assert capsys.readouterr().err == nothing
    out.mkdir()
    earlier.write_bytes(b"no vitmad checkpoint")
    for resume in ([], ["--resume"]):
        assert main(["profile", "--out", str(out), *resume]) == 130
        assert capsys.readouterr().err == nothing
    save_checkpoint(earlier, {"fingerprint": "earlier", "batches_done": 1})
    for resume in ([], ["--resume"]):  # not yet checked by the resume: perhaps of other settings
        assert main(["profile", "--out", str(out), *resume]) == 130
        assert capsys.readouterr().err == earlier_runs
    # Interrupted before the command checked it, a file there is called no one's (QA 310: a user's own torch file
    # was called an earlier run's checkpoint).
    monkeypatch.setattr(cli, "_profile_command", lambda args, run, held: (_ for _ in ()).throw(KeyboardInterrupt))
    assert main(["profile", "--out", str(out)]) == 130
    assert capsys.readouterr().err == nothing
    monkeypatch.setattr(cli, "_profile_command", interrupted)
    steps.append(lambda path: load_checkpoint(path, "earlier"))  # the resume took it
    assert main(["profile", "--out", str(out), "--resume"]) == 130
    assert capsys.readouterr().err == saved
    # What an earlier command of this process resumed is not the next one's progress (QA 308).
    assert main(["profile", "--out", str(out)]) == 130
    assert capsys.readouterr().err == earlier_runs
    # This run's first batch, written whole over the earlier run's, then renamed: another file.
    steps.append(lambda path: save_checkpoint(path, {"fingerprint": "this", "batches_done": 1}))
    assert main(["profile", "--out", str(out)]) == 130
    assert capsys.readouterr().err == saved


@pytest.mark.parametrize("resume", [[], ["--resume"]])
def test_a_checkpoint_that_is_no_vitmad_checkpoint_is_refused_before_the_model_loads(tiny_model, image_folder,
                                                                                     tmp_path, capsys, monkeypatch,
                                                                                     resume):
    # QA 306: the command loaded the model first (vitmad.profile checks its checkpoint path before that).
    out = tmp_path / "out"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(b"torn")
    _no_model_load(monkeypatch)
    assert main([*_profile_args(tiny_model, image_folder, out), *resume]) == 2
    assert capsys.readouterr().err.strip() == (f"vitmad: error: --out: {out / 'checkpoint.pt'} exists and is not a "
                                               "vitmad checkpoint that can be read (another program's file, or one "
                                               "damaged, cut short), which the run would overwrite; remove it, or "
                                               "write the run elsewhere")


def test_ctrl_c_while_a_figure_is_written_leaves_no_torn_figure_and_the_rerun_runs(tiny_model, image_folder,
                                                                                    tmp_path, monkeypatch):
    """A Ctrl-C while PIL wrote entropy.png left half a PNG under that name; the run had not listed it in mad.json,
    and the advised --resume, or a plain rerun, refused it as a user's file (QA 322). Figures are written through a
    temporary file now, renamed whole."""
    from matplotlib.figure import Figure

    savefig = Figure.savefig

    def interrupted(fig, target, *args, **kwargs):
        if fig.get_suptitle().startswith("Entropy") or any("ntropy" in ax.get_ylabel() for ax in fig.axes):
            if isinstance(target, (str, os.PathLike)):
                Path(target).write_bytes(b"\x89PNG\r\n\x1a\n")  # the encoder had begun
            else:
                target.write(b"\x89PNG\r\n\x1a\n")
            raise KeyboardInterrupt
        return savefig(fig, target, *args, **kwargs)

    out = tmp_path / "out"
    args = ["profile", "--model", f"hf:{tiny_model}", "--images", str(image_folder), "--device", "cpu", "--stats",
            "entropy", "--out", str(out)]
    monkeypatch.setattr(Figure, "savefig", interrupted)
    assert main(args) == 130
    listed = json.loads((out / "mad.json").read_text())["outputs"]
    assert sorted(p.name for p in out.iterdir()) == sorted(["checkpoint.pt", *listed])
    assert "entropy.png" not in listed
    monkeypatch.setattr(Figure, "savefig", savefig)
    assert main([*args, "--resume"]) == 0
    assert "entropy.png" in json.loads((out / "mad.json").read_text())["outputs"]
    assert (out / "entropy.png").read_bytes().startswith(b"\x89PNG")


FULL_DISK = """
import errno, resource, sys
from pathlib import Path
import matplotlib
matplotlib.use("Agg")
import torch
from matplotlib.figure import Figure
from vitmad.profiling.checkpoint import load_checkpoint, save_checkpoint
from vitmad.profiling.plotting import _save

folder = Path(sys.argv[1])
save_checkpoint(folder / "checkpoint.pt", {"fingerprint": "run", "batches_done": 1})
# Writes past 64 kB fail with EFBIG, as on a full disk with ENOSPC (Python ignores the SIGXFSZ that comes too).
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
for write in (lambda: save_checkpoint(folder / "checkpoint.pt", {"fingerprint": "run", "batches_done": 2,
                                                                "sums": torch.zeros(1 << 16)}),
              lambda: _save(Figure(figsize=(20, 20)), folder / "entropy.tif")):
    try:
        write()
    except OSError as err:
        print(type(err).__name__, errno.errorcode[err.errno], err.filename)
    except Exception as err:
        print(type(err).__name__, str(err)[:80])
print(load_checkpoint(folder / "checkpoint.pt", "run")["batches_done"], sorted(p.name for p in folder.iterdir()))
"""


def test_a_full_disk_while_a_checkpoint_or_a_figure_is_written_is_an_oserror_naming_the_file(tmp_path):
    """torch.save onto a full disk failed with its zip writer's RuntimeError ("unexpected pos ..."), in a 60-line
    chained traceback, and a figure's write with "[Errno 28] No space left on device", naming no file (QA 322).
    The disk here is a file-size limit, in a process of its own."""
    pytest.importorskip("resource")
    done = subprocess.run([sys.executable, "-c", FULL_DISK, str(tmp_path)], capture_output=True, text=True,
                          env=subprocess_env(), timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [f"OSError EFBIG {tmp_path / 'checkpoint.pt'}",
                                        f"OSError EFBIG {tmp_path / 'entropy.tif'}",
                                        "1 ['checkpoint.pt']"]
