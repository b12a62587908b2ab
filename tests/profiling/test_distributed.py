"""``torchrun -m vitmad profile`` on 2 and 3 CPU processes (gloo on loopback): same result as one process,
every image once, resume after a killed run, a failing rank ends the job with a message naming it."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import save_tiny_hf_vit, subprocess_env, write_corrupt_images, write_images
from vitmad.cli import _check_resume_world_size, main

pytest.importorskip("transformers")

if not torch.distributed.is_available():
    pytest.skip("torch.distributed is not available in this build", allow_module_level=True)


# Run by torchrun in place of `-m vitmad`: rank 1 fails at its second batch, killed or raising.
FAULTY_RANK = """
import os, signal, sys
import vitmad.profiling.engine as profiling
from vitmad.cli import main

real_add, calls = profiling.RunningStats.add, []

def add(self, mad):
    calls.append(1)
    if os.environ["RANK"] == "1" and len(calls) == 2:
        if os.environ["VITMAD_TEST_FAULT"] == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise RuntimeError("injected failure")
    return real_add(self, mad)

profiling.RunningStats.add = add
sys.exit(main(sys.argv[1:]))
"""


# Run by torchrun in place of `-m vitmad`: the main rank takes 12 s to write mad.json.
SLOW_WRITER = """
import os, sys, time
import vitmad.profiling.results as results
from vitmad.cli import main

real_to_json = results.Profile.to_json

def to_json(self, *args, **kwargs):
    if os.environ["RANK"] == "0":
        time.sleep(12)
    return real_to_json(self, *args, **kwargs)

results.Profile.to_json = to_json
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    model = save_tiny_hf_vit(root / "model", layers=3, heads=3)
    write_images(root / "images", 11)
    write_corrupt_images(root / "images" / "bad")
    args = ["--model", f"hf:{model}", "--images", str(root / "images"), "--device", "cpu", "--no-figures"]
    # The ranks run with OMP_NUM_THREADS=1 (_torchrun); the model's float32 matrix products round differently
    # with another thread count, so the single-process references run on one thread too.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.warns(UserWarning, match="skipping image"):
            assert main(["profile", *args, "--batch-size", "2", "--out", str(root / "single2")]) == 0
            assert main(["profile", *args, "--batch-size", "1", "--out", str(root / "single1")]) == 0
    finally:
        torch.set_num_threads(threads)
    return SimpleNamespace(root=root, args=args)


def _torchrun(nproc: int, argv: list[str], *, script: Path | None = None, fault: str = "", timeout: float = 240):
    env = subprocess_env(VITMAD_TEST_FAULT=fault, OMP_NUM_THREADS="1")
    target = [str(script)] if script else ["-m", "vitmad"]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               *target, "profile", *argv]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)


def _assert_same_profile(path_a: Path, path_b: Path) -> None:
    """Equal JSON documents, floats to 1e-12 relative, ignoring how many processes ran."""
    a, b = (json.loads(p.read_text()) for p in (path_a, path_b))
    a.pop("processes"), b.pop("processes")

    def same(x, y, where):
        if isinstance(x, float) or isinstance(y, float):
            assert math.isclose(x, y, rel_tol=1e-12, abs_tol=1e-12), (where, x, y)
        elif isinstance(x, dict):
            assert x.keys() == y.keys(), where
            for key in x:
                same(x[key], y[key], f"{where}.{key}")
        elif isinstance(x, list):
            assert len(x) == len(y), where
            for i, (u, v) in enumerate(zip(x, y)):
                same(u, v, f"{where}[{i}]")
        else:
            assert x == y, (where, x, y)

    same(a, b, "mad.json")


@pytest.mark.parametrize("nproc", [2, 3])
def test_torchrun_equals_single_process(setup, nproc):
    out = setup.root / f"torchrun{nproc}"
    done = _torchrun(nproc, [*setup.args, "--batch-size", "2", "--out", str(out), "--checkpoint-every", "1"])
    assert done.returncode == 0, done.stderr
    assert json.loads((out / "mad.json").read_text())["processes"] == nproc
    _assert_same_profile(out / "mad.json", setup.root / "single2" / "mad.json")
    # Sharding: the ranks' checkpoints hold disjoint parts that together cover every file exactly once.
    files = [name for p in sorted(out.glob(f"checkpoint.rank*-of-{nproc}.pt"))
             for state in [torch.load(p, weights_only=True)]
             for name in state["images"] + [s["path"] for s in state["skipped"]]]
    assert len(files) == len(set(files)) == 13
    doc = json.loads((out / "mad.json").read_text())
    assert sorted(files) == sorted(doc["images"] + [s["path"] for s in doc["skipped"]])


def test_killed_run_resumes_to_the_same_result(setup):
    script = setup.root / "faulty_rank.py"
    script.write_text(FAULTY_RANK)
    out = setup.root / "killed"
    argv = [*setup.args, "--batch-size", "1", "--out", str(out), "--checkpoint-every", "1"]
    killed = _torchrun(2, argv, script=script, fault="kill")
    assert killed.returncode != 0
    assert not (out / "mad.json").exists()
    partial = torch.load(out / "checkpoint.rank1-of-2.pt", weights_only=True)
    # Rank 1's batches (size 1) are global batches 1, 3, 5, ...: a broken file, an image, then the image it
    # died on. The two finished batches were checkpointed.
    assert partial["batches_done"] == 2 and len(partial["images"]) == 1 and len(partial["skipped"]) == 1
    resumed = _torchrun(2, [*argv, "--resume"])
    assert resumed.returncode == 0, resumed.stderr
    _assert_same_profile(out / "mad.json", setup.root / "single1" / "mad.json")


def test_the_ranks_do_not_wait_within_the_timeout_while_the_main_rank_writes(setup):
    """The ranks met at a final barrier after the main rank had written the results and drawn the figures: a
    write longer than --dist-timeout timed the others out, and torchrun killed the main rank mid-write. They leave
    the group together once the results are merged."""
    script = setup.root / "slow_writer.py"
    script.write_text(SLOW_WRITER)
    out = setup.root / "slow"
    done = _torchrun(2, [*setup.args, "--batch-size", "2", "--out", str(out), "--dist-timeout", "6"], script=script)
    assert done.returncode == 0, done.stderr
    _assert_same_profile(out / "mad.json", setup.root / "single2" / "mad.json")


def test_failing_rank_ends_the_job_with_its_name(setup):
    script = setup.root / "faulty_rank.py"
    script.write_text(FAULTY_RANK)
    done = _torchrun(2, [*setup.args, "--batch-size", "1", "--out", str(setup.root / "failed"),
                         "--dist-timeout", "60"], script=script, fault="raise", timeout=180)
    assert done.returncode != 0
    assert "vitmad: error: rank 1 of 2 failed: RuntimeError: injected failure" in done.stderr


# Run by torchrun in place of `-m vitmad`: one rank's copy of the images lacks the first file (a node's own copy).
ONE_RANK_LACKS_A_FILE = """
import os, sys
import vitmad.profiling.images as images
from vitmad.cli import main

if os.environ["RANK"] == os.environ["VITMAD_TEST_RANK"]:
    listed = images.find_images
    images.find_images = lambda *args, **kwargs: listed(*args, **kwargs)[1:]
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("rank", ["0", "1"])
def test_ranks_listing_other_images_are_refused(setup, rank):
    """Each rank lists the images itself: where one node's copy lacked a file, rank 0 lacking it profiled three
    images twice and three never, silently, and rank 1 lacking it crashed in the merge (QA helper-243)."""
    script = setup.root / "one_rank_lacks_a_file.py"
    script.write_text(ONE_RANK_LACKS_A_FILE)
    out = setup.root / f"lacking{rank}"
    env_rank = {"VITMAD_TEST_RANK": rank}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(script), "profile",
         *setup.args, "--batch-size", "2", "--out", str(out), "--dist-timeout", "60"],
        capture_output=True, text=True, env=subprocess_env(OMP_NUM_THREADS="1", **env_rank), timeout=240)
    assert done.returncode != 0 and not (out / "mad.json").exists()
    counts = "rank 0: 12, rank 1: 13" if rank == "0" else "rank 0: 13, rank 1: 12"
    assert (f"vitmad: error: rank {rank} of 2: --images: the processes of this job do not plan the same run: "
            f"rank(s) [1] differ from rank 0 in the list of inputs ({counts} inputs)"
            in done.stderr), done.stderr


def test_resume_with_another_world_size_is_refused(tmp_path):
    (tmp_path / "checkpoint.rank0-of-2.pt").write_bytes(b"")
    (tmp_path / "checkpoint.rank1-of-2.pt").write_bytes(b"")
    _check_resume_world_size(tmp_path, SimpleNamespace(world_size=2))
    with pytest.raises(ValueError, match="written by 2 process\\(es\\), this run has 3"):
        _check_resume_world_size(tmp_path, SimpleNamespace(world_size=3))
    with pytest.raises(ValueError, match="written by 2 process\\(es\\), this run has 1"):
        _check_resume_world_size(tmp_path, None)


def test_a_resume_refused_for_its_process_count_says_nothing_of_replacing_the_outputs(tmp_path, capsys):
    # QA 306: the command warned that it replaced the earlier outputs, then refused the resume (replacing nothing).
    (tmp_path / "checkpoint.rank0-of-2.pt").write_bytes(b"")
    (tmp_path / "mad.json").write_text('{"format": "vitmad-profile/1"}')  # an earlier run's results
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        assert main(["profile", "--out", str(tmp_path), "--resume"]) == 2
    assert said == []
    assert "written by 2 process(es), this run has 1" in capsys.readouterr().err


@pytest.mark.parametrize("num_batches, world", [(13, 2), (13, 3), (2, 3), (0, 2), (7, 7)])
def test_batch_sharding_covers_every_batch_once(num_batches, world):
    shards = [list(range(rank, num_batches, world)) for rank in range(world)]
    assert sorted(b for shard in shards for b in shard) == list(range(num_batches))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_torchrun_with_heads_and_grids_that_change_with_depth(tmp_path):
    """A hierarchy (transformers Swin: 1 then 2 heads, tokens of 4 then 8 px): the NaN-padded heads of the
    merged statistics stay out of mad.json, which equals the single-process one."""
    transformers = pytest.importorskip("transformers")
    config = transformers.SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[1, 2],
                                     window_size=4)
    torch.manual_seed(0)
    transformers.SwinModel(config).save_pretrained(tmp_path / "swin")
    write_images(tmp_path / "images", 5)
    args = ["--model", f"hf:{tmp_path / 'swin'}", "--images", str(tmp_path / "images"), "--device", "cpu",
            "--no-figures", "--batch-size", "2"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks run (see setup)
    try:
        assert main(["profile", *args, "--out", str(tmp_path / "single")]) == 0
    finally:
        torch.set_num_threads(threads)
    done = _torchrun(2, [*args, "--out", str(tmp_path / "two")])
    assert done.returncode == 0, done.stderr
    doc = json.loads((tmp_path / "two" / "mad.json").read_text())
    assert [layer["heads"] for layer in doc["layers"]] == [1, 2] and doc["num_heads"] == [1, 2]
    _assert_same_profile(tmp_path / "two" / "mad.json", tmp_path / "single" / "mad.json")


# Run by torchrun: joins the group as the CLI does, loads a transformers model, tears the group down.
GROUP_LIFETIME = """
import sys, weakref
import torch.distributed as dist
from vitmad.profiling.distributed import init_from_env
from vitmad.profiling.models import load_model

run = init_from_env(None, "cpu", 60)
group = weakref.ref(dist.group.WORLD)
load_model("hf:" + sys.argv[1])
run.close(wait_for_all=True)
# One file per rank: the ranks' prints would share one pipe, and their lines can interleave.
with open(f"{sys.argv[2]}/rank{run.rank}.txt", "w") as verdict:
    verdict.write("alive" if group() is not None else "freed")
"""


def test_the_process_group_is_freed_when_a_rank_closes_after_loading_a_transformers_model(tmp_path):
    """transformers imports torch.distributed.nn while it loads a model; imported after the group exists, its
    ``group=group.WORLD`` defaults kept the group (and its gloo threads) alive until Python finalised, where a
    thread still freeing the last collective's tensors aborted the rank now and then (SIGABRT, about 1 run in
    40). The group must be gone once ``close`` returns."""
    model = save_tiny_hf_vit(tmp_path / "model")
    script = tmp_path / "group_lifetime.py"
    script.write_text(GROUP_LIFETIME)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(script),
               str(model), str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True, env=subprocess_env(OMP_NUM_THREADS="1"),
                          timeout=240)
    assert done.returncode == 0, done.stderr
    assert [(tmp_path / f"rank{rank}.txt").read_text() for rank in range(2)] == ["freed", "freed"]


_MERGE_NAN = """
import json, sys, torch, torch.distributed as dist, torch.multiprocessing as mp
from vitmad.profiling.stats import RunningStats
from vitmad.profiling.distributed import DistributedRun, merge_across_ranks

# One layer, two heads; rank NAN_RANK's images give head 0 a NaN, head 1 stays finite.
VALUES = [torch.tensor([[[1.0, 7.0], [2.0, 8.0], [float("nan"), 9.0]]], dtype=torch.float64),
          torch.tensor([[[4.0, 1.0], [5.0, 2.0], [6.0, 3.0]]], dtype=torch.float64)]

def worker(rank, path, nan_rank):
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=2)
    stats = RunningStats.empty(1, 2).add(VALUES[rank if nan_rank == 0 else 1 - rank])
    order = {f"{r}_{i}": 3 * r + i for r in range(2) for i in range(3)}
    merged, *_ = merge_across_ranks(DistributedRun(rank, 2, rank, "gloo"), stats, {"layers": ["l0"]},
                                    [f"{rank}_{i}" for i in range(3)], [], order)
    if rank == 0:
        print(json.dumps({"low": merged.low.tolist(), "high": merged.high.tolist()}), flush=True)
    dist.destroy_process_group()

if __name__ == "__main__":
    for nan_rank in (0, 1):
        mp.spawn(worker, args=(sys.argv[1] + str(nan_rank), nan_rank), nprocs=2)
"""


def test_a_head_without_a_value_on_one_rank_has_no_min_or_max_for_the_job(tmp_path):
    """One process: a head NaN for one image has NaN mean, std, min and max. gloo's MIN and MAX dropped the NaN
    rank's values and kept the other's finite range (QA 263: min 4.0, max 6.0 for a head one process says NaN)."""
    (tmp_path / "merge.py").write_text(_MERGE_NAN)
    done = subprocess.run([sys.executable, str(tmp_path / "merge.py"), str(tmp_path / "store")], env=subprocess_env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    results = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(results) == 2  # the NaN on rank 0, then on rank 1
    for result in results:
        assert math.isnan(result["low"][0][0]) and math.isnan(result["high"][0][0]), result
        assert (result["low"][0][1], result["high"][0][1]) == (1.0, 9.0), result


def test_each_rank_says_it_replaces_its_own_interrupted_share(tmp_path):
    """QA 303: a job started over without --resume said it replaced the interrupted job's progress only from the
    main rank's checkpoint; where rank 0's share was finished and rank 1's not, rank 1's progress went unannounced."""
    from vitmad.profiling.checkpoint import save_checkpoint
    from vitmad.profiling.engine import _warn_unfinished

    def plan(rank: int) -> SimpleNamespace:
        return SimpleNamespace(run=SimpleNamespace(rank=rank, world_size=2, is_main=rank == 0),
                               checkpoint=tmp_path / f"checkpoint.rank{rank}-of-2.pt", fingerprint="run",
                               earlier_fingerprint=None, batches=[None] * 3)

    save_checkpoint(tmp_path / "checkpoint.rank0-of-2.pt", {"fingerprint": "run", "batches_done": 3,
                                                            "batches_total": 3})
    save_checkpoint(tmp_path / "checkpoint.rank1-of-2.pt", {"fingerprint": "run", "batches_done": 1,
                                                            "batches_total": 2})
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        _warn_unfinished(plan(0))
    assert said == []  # a finished share is no progress to lose
    with pytest.warns(UserWarning, match=r"checkpoint\.rank1-of-2\.pt holds an interrupted run's progress \(1 of 2 "
                                         r"batches\); this run starts over and replaces it"):
        _warn_unfinished(plan(1))


def test_a_rank_without_a_share_resumes_without_saying_its_progress_was_lost(tmp_path):
    """QA 387: a resumed job of more processes than batches said of the rank with no batch (which never writes a
    checkpoint) "no checkpoint to resume ...; starting from the first image", as if its progress were lost. A rank
    with a share and no checkpoint still says it (a mistyped --out)."""
    from vitmad.profiling.engine import RunState, resume_state

    def plan(batches: range) -> SimpleNamespace:
        return SimpleNamespace(run=SimpleNamespace(rank=1, world_size=2, is_main=False),
                               checkpoint=tmp_path / "checkpoint.rank1-of-2.pt", fingerprint="run",
                               earlier_fingerprint=None, identity=None, batches=batches)

    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        state = resume_state(plan(range(1, 1, 2)), resume=True)
    assert said == [] and state.batches_done == 0 and isinstance(state, RunState)
    with pytest.warns(UserWarning, match=r"no checkpoint to resume at .*checkpoint\.rank1-of-2\.pt; starting from "
                                         r"the first image"):
        resume_state(plan(range(1, 3, 2)), resume=True)


def test_a_collective_that_timed_out_names_the_option_that_sets_its_deadline(tmp_path, monkeypatch, capsys):
    """QA 303: gloo's 'Timed out waiting 3000ms for send operation to complete' named no option."""
    import vitmad.cli as cli
    import vitmad.profiling.distributed as distributed

    rank = SimpleNamespace(rank=0, world_size=2, is_main=True, close=lambda wait_for_all=False: None)
    monkeypatch.setattr(distributed, "init_from_env", lambda *args: rank)
    said = "[gloo/transport/tcp/unbound_buffer.cc:129] Timed out waiting 3000ms for send operation to complete"

    def timed_out(args, run, held):
        raise RuntimeError(said)

    monkeypatch.setattr(cli, "_profile_command", timed_out)
    assert main(["profile", "--out", str(tmp_path / "out"), "--dist-timeout", "3"]) == 1
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"vitmad: error: rank 0 of 2 failed: RuntimeError: {said}; a collective waits at most --dist-timeout seconds "
        "(3) for the other ranks: raise it where one waits longer (a slower share, model load or first batch)")
