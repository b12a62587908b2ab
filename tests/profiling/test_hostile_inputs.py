"""The command line against hostile input: broken, empty, bomb and fake images, symlink loops, unicode and
undecodable names, and results files that are malformed or from another version. Clear errors or skips with
counts; never a traceback or a hang.

(tests/test_cli.py covers a garbage .jpg and a truncated PNG; this file covers the rest.)
"""

from __future__ import annotations

import json
import os
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

import vitmad
from conftest import write_images
from vitmad.cli import main
from vitmad.profiling.images import find_images, load_image
from vitmad.profiling.options import OptionError

pytest.importorskip("transformers")


def _png_claiming(width: int, height: int) -> bytes:
    """A 57-byte PNG whose header claims ``width x height`` pixels: a decompression bomb's signature."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    data = zlib.compress(b"\0" * 64)

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data)


def _hostile_folder(root: Path) -> tuple[list[Path], dict[str, str]]:
    """Three good images (two with unicode or undecodable names) among every kind of bad file.

    Returns:
        The good files, and for each bad file that has an image extension the start of its skip reason.
    """
    from PIL import Image

    root.mkdir(parents=True)
    pixels = np.random.default_rng(0).integers(0, 256, (48, 40, 3), dtype=np.uint8)
    good = [root / "good.png", root / "图像_é.jpg", root / os.fsdecode(b"raw_\xff_name.png")]
    for path in good:
        Image.fromarray(pixels).save(path, format="PNG" if path.suffix == ".png" else "JPEG")
    Image.fromarray(pixels).save(root / "truncated.jpg", quality=95)
    full = (root / "truncated.jpg").read_bytes()
    (root / "truncated.jpg").write_bytes(full[: len(full) // 2])
    (root / "zero_bytes.jpg").write_bytes(b"")
    (root / "not_an_image.png").write_text("hello, I am text")
    (root / "bomb.png").write_bytes(_png_claiming(100_000, 100_000))  # over twice PIL's limit: PIL refuses
    (root / "large.png").write_bytes(_png_claiming(20_000, 5_000))  # over PIL's limit: PIL only warns
    (root / "notes.txt").write_text("not an image, not listed")
    (root / "sub").mkdir()
    os.link(root / "good.png", root / "sub" / "hard_link.png")  # one file under two names: one input (QA 421)
    (root / "sub" / "up").symlink_to("..")  # a loop through a parent
    (root / "loop").symlink_to(".")  # a loop onto itself
    (root / "self.png").symlink_to("self.png")  # a symlink to itself
    (root / "dangling.png").symlink_to("missing.png")
    os.mkfifo(root / "pipe.png")  # opened, it waits for a writer: the run hung (QA 322)
    bad = {
        "truncated.jpg": "OSError: image file is truncated",
        "zero_bytes.jpg": "UnidentifiedImageError",
        "not_an_image.png": "UnidentifiedImageError",
        "bomb.png": "DecompressionBombError",
        "large.png": "DecompressionBombError",
        # Listed and skipped with the reason, not dropped unseen: a link whose target is gone (or a loop).
        "self.png": "OSError: [Errno 40] Too many levels of symbolic links",
        "dangling.png": "FileNotFoundError",
        "pipe.png": "a named pipe (FIFO), not a regular file: not read",
    }
    return good, bad


def test_find_images_lists_every_image_file_once_and_ends(tmp_path):
    good, bad = _hostile_folder(tmp_path / "imgs")
    found = find_images(tmp_path / "imgs")
    assert sorted(p.name for p in found) == sorted([p.name for p in good] + list(bad))


def test_a_named_pipe_given_by_name_or_as_a_frame_is_skipped_with_the_reason(tiny_model, tmp_path):
    """Named on the command line it was "no such file or folder"; as a frame of a frame folder it would block the
    run as a folder's did (QA 322)."""
    from PIL import Image

    from vitmad.profiling.videos import load_video

    os.mkfifo(tmp_path / "pipe.jpg")
    with pytest.warns(UserWarning, match="skipping image .*pipe.jpg: a named pipe"), \
            pytest.raises(OptionError, match="none of the 1 images could be read"):
        vitmad.profile(f"hf:{tiny_model}", tmp_path / "pipe.jpg", device="cpu")
    clip = tmp_path / "clip"
    clip.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(clip / "0.png")
    os.mkfifo(clip / "1.png")
    assert load_video(clip, 2) == (None, "frame 1.png: a named pipe (FIFO), not a regular file: not read")


def test_standard_input_given_as_an_image_is_skipped_as_the_pipe_it_is():
    """/dev/stdin resolved names an anonymous pipe as /proc/<pid>/fd/pipe:[N], no file: it was a FileNotFoundError
    from the Python API and "no such file or folder" from the command (QA 326)."""
    import subprocess
    import sys

    from conftest import subprocess_env

    code = ("from vitmad.profiling.images import find_images, load_image\n"
            "paths = find_images('/dev/stdin'); print(paths, load_image(paths[0]))")
    done = subprocess.run([sys.executable, "-c", code], input="not an image", capture_output=True, text=True,
                          env=subprocess_env(), timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ("[PosixPath('/dev/stdin')] (None, 'a named pipe (FIFO), not a regular file: not "
                                   "read')")


def test_bombs_are_refused_before_decoding(tmp_path):
    (tmp_path / "large.png").write_bytes(_png_claiming(20_000, 5_000))  # 300 MB if decoded
    with pytest.warns(Warning, match="decompression bomb"):  # PIL's own warning, kept
        image, reason = load_image(tmp_path / "large.png")
    assert image is None and reason.startswith("DecompressionBombError: image size (20000x5000 pixels) exceeds")


def test_a_strip_the_preprocessing_would_blow_up_is_skipped_by_name(tiny_model, tmp_path):
    """A 1 x 4000 px strip (a few kB) was resized to 224 x 896,000 px before the crop: gigabytes of memory for one
    image, several decoded at once."""
    from PIL import Image

    write_images(tmp_path, 2, nested=False)
    Image.fromarray(np.full((1, 4000, 3), 128, dtype=np.uint8)).save(tmp_path / "strip.png")
    with pytest.warns(UserWarning, match="skipping image .*strip.png"):
        result = vitmad.profile(f"hf:{tiny_model}", tmp_path, device="cpu", image_size=224)
    assert result.count == 2 and [s["path"].rsplit("/", 1)[-1] for s in result.skipped] == ["strip.png"]
    assert "resizes this 1x4000 px image to 224x896000 px" in result.skipped[0]["reason"]


def test_profile_skips_hostile_files_with_counts(tiny_model, tmp_path, capsys):
    good, bad = _hostile_folder(tmp_path / "imgs")
    with pytest.warns(Warning) as warned:  # the skips, and PIL's own bomb warning
        code = main(["profile", "--model", f"hf:{tiny_model}", "--images", str(tmp_path / "imgs"), "--device", "cpu",
                     "--batch-size", "3", "--out", str(tmp_path / "out")])
    stdout = capsys.readouterr().out
    assert code == 0
    assert f"{len(good)} images ({len(bad)} skipped)" in stdout
    doc = json.loads((tmp_path / "out" / "mad.json").read_text())
    assert doc["count"] == len(good)
    assert sorted(Path(p).name for p in doc["images"]) == sorted(p.name for p in good)
    reasons = {Path(s["path"]).name: s["reason"] for s in doc["skipped"]}
    assert reasons.keys() == bad.keys()
    assert all(reasons[name].startswith(start) for name, start in bad.items()), reasons
    skips = [str(w.message) for w in warned if "skipping image" in str(w.message)]
    assert len(skips) == len(bad)
    assert (tmp_path / "out" / "mad_map.png").is_file()


def test_profile_of_only_hostile_files_is_a_clear_error(tiny_model, tmp_path, capsys):
    _, bad = _hostile_folder(tmp_path / "imgs")
    for path in (tmp_path / "imgs").iterdir():
        if path.name not in bad and path.is_file() and path.suffix != ".txt":
            path.unlink()
    (tmp_path / "imgs" / "sub" / "hard_link.png").unlink()
    with pytest.warns(Warning) as warned:
        code = main(["profile", "--model", f"hf:{tiny_model}", "--images", str(tmp_path / "imgs"), "--device", "cpu",
                     "--out", str(tmp_path / "out"), "--no-figures"])
    assert sum("skipping image" in str(w.message) for w in warned) == len(bad)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1] == f"vitmad: error: --images: none of the {len(bad)} images could be read"


@pytest.fixture(scope="module")
def good_result(tiny_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("result")
    write_images(folder / "imgs", 2)
    assert main(["profile", "--model", f"hf:{tiny_model}", "--images", str(folder / "imgs"), "--device", "cpu",
                 "--out", str(folder / "out"), "--no-figures"]) == 0
    return folder / "out" / "mad.json"


def _edited(doc: dict, edit: str) -> dict | list | str:
    doc = json.loads(json.dumps(doc))
    if edit == "newer_version":
        doc["format"], doc["vitmad_version"] = "vitmad-profile/3", "9.0.0"
    elif edit == "other_tool":
        doc["format"] = "something-else/1"
    elif edit == "missing_sums":
        del doc["sums"]
    elif edit == "missing_layer_field":
        del doc["layers"][0]["min"]
    elif edit == "wrong_types":
        doc["count"], doc["sums"]["total"] = "many", "lots"
    elif edit == "ragged_sums":
        doc["sums"]["total"][0] = doc["sums"]["total"][0][:1]
    elif edit == "statistics_null":
        doc["statistics"] = None
    elif edit == "model_list":
        doc["model"] = ["x"]
    elif edit == "a_list":
        return [doc]
    elif edit == "geometry_heads_deleted":  # QA 330: these four escaped compare as tracebacks
        del doc["layers"][0]["geometry"]["heads"]
    elif edit == "geometry_heads_list":
        doc["layers"][0]["geometry"]["heads"] = [2]
    elif edit == "geometry_list":
        doc["layers"][1]["geometry"] = [1]
    elif edit == "geometry_string":
        doc["layers"][0]["geometry"] = "x"
    return doc


@pytest.mark.parametrize("edit, message", [
    ("newer_version", "written by another vitmad version (format 'vitmad-profile/3', version '9.0.0'); "
                      "this version reads 'vitmad-profile/1' and 'vitmad-profile/2'"),
    ("other_tool", "not a vitmad profile (expected format 'vitmad-profile/2')"),
    ("a_list", "not a vitmad profile"),
    ("missing_sums", "malformed vitmad profile (KeyError: 'sums')"),
    ("missing_layer_field", "malformed vitmad profile (KeyError: 'min')"),
    ("wrong_types", "malformed vitmad profile"),
    ("statistics_null", "malformed vitmad profile (TypeError: statistics must be a dict, got NoneType)"),
    ("model_list", "malformed vitmad profile (TypeError: model must be a str, got list)"),
    ("ragged_sums", "malformed vitmad profile"),
    *((edit, "malformed vitmad profile (ValueError: each layer's geometry must be an object whose heads is the "
             "layer's head count)")
      for edit in ("geometry_heads_deleted", "geometry_heads_list", "geometry_list", "geometry_string")),
])
def test_compare_refuses_other_versions_and_edited_results(good_result, tmp_path, capsys, edit, message):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(_edited(json.loads(good_result.read_text()), edit)))
    code = main(["compare", str(good_result), str(bad), "--out", str(tmp_path / "cmp.png")])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith(f"vitmad: error: {bad}: {message}") and "\n" not in err, err
    assert not (tmp_path / "cmp.png").exists()


@pytest.mark.parametrize("content", [b"", b"{\"format\": \"vitmad-profile/2\", \"layers\": [", b"\xff\xfe\x00garbage",
                                     b"null"])
def test_compare_refuses_unreadable_files(good_result, tmp_path, capsys, content):
    bad = tmp_path / "bad.json"
    bad.write_bytes(content)
    code = main(["compare", str(good_result), str(bad), "--out", str(tmp_path / "cmp.png")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err
    assert err.startswith(f"vitmad: error: {bad}: ") and ("cannot read" in err or "not a vitmad profile" in err)


def test_compare_of_a_missing_file_or_a_folder(good_result, tmp_path, capsys):
    for target in (tmp_path / "missing.json", tmp_path):
        code = main(["compare", str(good_result), str(target), "--out", str(tmp_path / "cmp.png")])
        err = capsys.readouterr().err.strip()
        assert code == 2 and err.startswith(f"vitmad: error: {target}: cannot read a vitmad profile")
    code = main(["compare", str(good_result), "--out", ""])
    assert code == 2 and capsys.readouterr().err.strip() == "vitmad: error: --out: expected the figure file, got ''"


def _tiny_vit_module(dtype=torch.float32):
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    config = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                       image_size=32, patch_size=8)
    return ViTModel(config, add_pooling_layer=False).eval().to(dtype)


@pytest.mark.parametrize(("option", "value", "message"), [
    ("batch_size", 1.5, "batch_size: expected a positive integer, got 1.5"),
    ("batch_size", "8", "batch_size: expected a positive integer, got '8'"),
    ("batch_size", None, "batch_size: expected a positive integer, got None"),
    ("max_images", 1.5, "max_images: expected a positive integer, got 1.5"),
    ("checkpoint_every", "8", "checkpoint_every: expected a positive number of batches, got '8'"),
    ("renormalize", "no", "renormalize: expected True or False, got 'no'"),
    ("layers", "layers.0.attention", "layers: expected a non-empty list of module names or patterns"),
    ("layers", [], "layers: expected a non-empty list of module names or patterns"),
    ("layers", [1], "layers: expected a non-empty list of module names or patterns"),
])
def test_profile_options_of_the_wrong_kind_name_the_parameter(option, value, message):
    """A string "no" is true, "8" is no batch size, a string of layer names is not a list of them: each is an
    error naming the parameter, before anything runs (was: true, a TypeError from deep inside, one layer per
    character, or every layer for [])."""
    pixels = torch.randn(2, 3, 32, 32)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        vitmad.profile(_tiny_vit_module(), pixels, device="cpu", **{option: value})


def test_profile_refuses_weights_for_a_model_already_built(tmp_path):
    """QA 292: model_checkpoint= beside an nn.Module was ignored, the module's own weights profiled without a word
    (a missing file too)."""
    model = _tiny_vit_module()
    weights = tmp_path / "other.pt"
    torch.save(model.state_dict(), weights)
    for given in (weights, tmp_path / "missing.pt"):
        with pytest.raises(OptionError, match=r"^model_checkpoint: weights are loaded into a model vitmad builds from "
                                              r"a spec; got a model already built \(ViTModel\): load them into it "
                                              r"yourself"):
            vitmad.profile(model, torch.randn(1, 3, 32, 32), device="cpu", model_checkpoint=given)


def test_layers_that_match_nothing_or_compute_no_attention_are_option_errors():
    """QA 292: a pattern matching no module was vitmad.record's ValueError, a module computing no attention a
    RuntimeError at the first batch; both OptionErrors naming layers, as the docstring says."""
    pixels = torch.randn(2, 3, 32, 32)
    with pytest.raises(OptionError, match=r"^layers: pattern 'nope\.\*' matches no module of ViTModel; expected "
                                          r"qualified names"):
        vitmad.profile(_tiny_vit_module(), pixels, device="cpu", layers=["nope.*"])
    with pytest.warns(UserWarning, match="embeddings .* named in layers, ran without computing attention"):
        # No rec.skipped to read here (QA 294): the attention modules to name instead.
        with pytest.raises(OptionError, match=r"^layers: ViTModel ran, but none of the 1 modules being recorded "
                                              r"\(embeddings\) computed attention .* in that forward call; name the "
                                              r"modules that compute its attention, such as layers\.0\.attention, "
                                              r"layers\.1\.attention$"):
            vitmad.profile(_tiny_vit_module(), pixels, device="cpu", layers=["embeddings"])


def test_profile_takes_numpy_bools_for_its_flags():
    """NumPy's bool is a flag as the ops take it (``vitmad.mad(renormalize=np.True_)``); was refused."""
    import numpy as np

    pixels = torch.randn(2, 3, 32, 32)
    given = vitmad.profile(_tiny_vit_module(), pixels, device="cpu", renormalize=np.True_, progress=np.False_)
    plain = vitmad.profile(_tiny_vit_module(), pixels, device="cpu", renormalize=True)
    assert given.settings["renormalize"] is True
    assert torch.equal(given.mad, plain.mad)
    assert not torch.equal(given.mad, vitmad.profile(_tiny_vit_module(), pixels, device="cpu").mad)


def test_profile_refuses_pixels_that_are_not_preprocessed_and_images_of_no_known_kind(tiny_model):
    # A module built in Python has no preprocessing to give image files: the advice says what works (QA 241).
    with pytest.raises(ValueError, match=r"images: a tensor of pixels must be preprocessed .* got torch.uint8; this "
                                         r"model's preprocessing is unknown \(a module built in Python\)"):
        vitmad.profile(_tiny_vit_module(), torch.zeros(2, 3, 32, 32, dtype=torch.uint8), device="cpu")
    with pytest.raises(ValueError, match=r"images: a tensor of pixels must be preprocessed .* got torch.uint8; pass "
                                         r"image files to have them preprocessed"):
        vitmad.profile(f"hf:{tiny_model}", torch.zeros(2, 3, 32, 32, dtype=torch.uint8), device="cpu")
    with pytest.raises(ValueError, match="images: expected 'builtin', a folder, a file, a list of those or a pixel "
                                         "tensor, got NoneType"):
        vitmad.profile(f"hf:{tiny_model}", None, device="cpu")
    # A module built in Python has no known preprocessing; the advice names what works (an image size did not).
    for size in (None, 32):
        with pytest.raises(ValueError, match=r"images: this model has no known preprocessing .* pass preprocessed "
                                             r"pixels as a \[B, 3, H, W\] tensor, or the model as a spec"):
            vitmad.profile(_tiny_vit_module(), "builtin", image_size=size, device="cpu")


def test_profile_leaves_the_dtype_of_a_model_it_is_given():
    """Converting a float32 model to bfloat16 would round the caller's weights for good: refused; a bfloat16 model
    runs in bfloat16 (was: converted to float32 in place)."""
    model = _tiny_vit_module()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="dtype: the model passed is float32; converting it to bfloat16 would "
                                         "change your model in place"):
        vitmad.profile(model, torch.randn(2, 3, 32, 32), device="cpu", dtype="bfloat16")
    for name, value in model.state_dict().items():
        assert value.dtype == torch.float32 and torch.equal(value, before[name]), name
    half = _tiny_vit_module(torch.bfloat16)
    result = vitmad.profile(half, torch.randn(2, 3, 32, 32), device="cpu")
    assert result.settings["dtype"] == "bfloat16" and result.mad.shape == (2, 2)
    assert all(p.dtype == torch.bfloat16 for p in half.parameters())
    # A bfloat16 model keeping its norms in float32 (and a float64 scalar first): run in bfloat16, the dtype of most
    # of its weights, its norms left in float32 (they were converted to bfloat16, QA helper-241), as record sees it.
    mixed = _tiny_vit_module(torch.bfloat16)
    mixed.register_parameter("a_scale", torch.nn.Parameter(torch.ones((), dtype=torch.float64)))
    mixed.get_submodule("embeddings").register_parameter(
        "a_scale", torch.nn.Parameter(torch.ones((), dtype=torch.float64)))
    for module in mixed.modules():
        if isinstance(module, torch.nn.LayerNorm):
            module.float()
    dtypes = {name: p.dtype for name, p in mixed.named_parameters()}
    assert next(iter(dtypes.values())) == torch.float64
    pixels = torch.randn(2, 3, 32, 32)
    result = vitmad.profile(mixed, pixels, device="cpu")
    assert {name: p.dtype for name, p in mixed.named_parameters()} == dtypes
    with torch.no_grad(), vitmad.record(mixed) as rec:
        mixed(pixels.bfloat16())
    assert result.settings["dtype"] == "bfloat16"
    torch.testing.assert_close(result.mad, rec.mad.double().mean(1), rtol=0, atol=0)


def test_profile_checkpoint_must_be_a_file_it_may_overwrite(tmp_path):
    """A folder, or a file that is not a vitmad checkpoint (which the run would overwrite, with resume or not), is
    refused before the run; the file is left as it was."""
    pixels = torch.randn(2, 3, 32, 32)
    with pytest.raises(ValueError, match=f"checkpoint: expected a file, got the folder {tmp_path}"):
        vitmad.profile(_tiny_vit_module(), pixels, device="cpu", checkpoint=tmp_path)
    with pytest.raises(ValueError, match="checkpoint: expected a file, got ''$"):  # not "the folder ." (QA 421)
        vitmad.profile(_tiny_vit_module(), pixels, device="cpu", checkpoint="")
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes")
    for resume in (False, True):
        with pytest.raises(ValueError, match=f"checkpoint: {notes} exists and is not a vitmad checkpoint"):
            vitmad.profile(_tiny_vit_module(), pixels, device="cpu", checkpoint=notes, resume=resume)
    assert notes.read_text() == "my notes"
    # A run's own checkpoint cut short (a copy, a full disk) is said to be maybe that, not another program's file
    # alone (QA 377), and is left as it was too.
    saved = tmp_path / "checkpoint.pt"
    vitmad.profile(_tiny_vit_module(), pixels, device="cpu", checkpoint=saved)
    torn = saved.read_bytes()[:saved.stat().st_size // 2]
    saved.write_bytes(torn)
    with pytest.raises(ValueError, match=r"is not a vitmad checkpoint that can be read \(another program's file, or "
                                         r"one damaged, cut short\), which the run would overwrite; remove it"):
        vitmad.profile(_tiny_vit_module(), pixels, device="cpu", checkpoint=saved)
    assert saved.read_bytes() == torn


def test_plot_compare_wants_one_label_per_profile(good_result, tmp_path):
    from vitmad.profiling.plotting import plot_compare

    profile = vitmad.Profile.from_json(good_result)
    for profiles, labels in (([profile, profile], ["a"]), ([], [])):
        with pytest.raises(ValueError, match="plot_compare: expected one label per profile and at least one"):
            plot_compare(profiles, labels, tmp_path / "compare.png")
    assert not (tmp_path / "compare.png").exists()


def test_resume_needs_a_checkpoint_file(tmp_path):
    with pytest.raises(ValueError, match="resume: resume continues from a checkpoint file: pass checkpoint= too"):
        vitmad.profile(_tiny_vit_module(), torch.randn(2, 3, 32, 32), device="cpu", resume=True)
    # One that is not there yet (a mistyped --out, a run killed before its first checkpoint) is said, not silent.
    pixels = torch.randn(2, 3, 32, 32)
    with pytest.warns(UserWarning, match=r"no checkpoint to resume at .*run\.pt; starting from the first") as said:
        resumed = vitmad.profile(_tiny_vit_module(), pixels, device="cpu", checkpoint=tmp_path / "run.pt",
                                 resume=True)
    assert [w.filename for w in said] == [__file__]
    assert resumed.count == 2


@pytest.mark.parametrize("count", [0, -5])
def test_a_profile_of_no_images_is_refused(good_result, tmp_path, count):
    """An edited count of 0 or -5 gave std 0 and a mean of the sums over -5 (179.7 px for 89.9)."""
    doc = json.loads(good_result.read_text())
    doc["count"] = count
    (tmp_path / "mad.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=f"malformed vitmad profile .*count must be a positive number of images, "
                                         f"got {count}"):
        vitmad.Profile.from_json(tmp_path / "mad.json")


def test_figures_go_into_new_folders_and_name_the_types_they_take(good_result, tmp_path):
    profile = vitmad.Profile.from_json(good_result)
    profile.plot(tmp_path / "new" / "folder" / "mad.png")
    assert (tmp_path / "new" / "folder" / "mad.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match=r"mad.xyz: cannot write a figure of type .xyz; use one of .*\.png"):
        profile.plot(tmp_path / "mad.xyz")
    assert not (tmp_path / "mad.xyz").exists()


def test_a_pgf_figure_without_its_tex_program_is_refused_before_anything_is_drawn(good_result, tmp_path, capsys,
                                                                                   monkeypatch):
    """QA 286: matplotlib typesets PGF with xelatex, found only while saving: a RuntimeError traceback at the end."""
    import shutil

    import matplotlib

    found = shutil.which
    monkeypatch.setitem(matplotlib.rcParams, "pgf.texsystem", "lualatex")
    monkeypatch.setattr(shutil, "which", lambda name, *args, **kw: None if name == "lualatex" else found(name))
    message = "a .pgf figure is typeset by lualatex (matplotlib's rcParams['pgf.texsystem']), which is not " \
              "installed here; install it or write .pdf or .svg"
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'mad.pgf'}: {message}")):
        vitmad.Profile.from_json(good_result).plot(tmp_path / "mad.pgf")
    assert main(["compare", str(good_result), "--out", str(tmp_path / "new" / "cmp.pgf")]) == 2
    assert capsys.readouterr().err.strip() == f"vitmad: error: --out: {tmp_path / 'new' / 'cmp.pgf'}: {message}"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("args", "error", "message"), [
    ((-1, 4, 16), ValueError, "grid_h and grid_w must be positive, got -1 x 4"),
    ((4.5, 4, 16), TypeError, "grid_h must be an int, got 4.5"),
    ((4, 0, 16), ValueError, "grid_h and grid_w must be positive, got 4 x 0"),
    ((4, 4, -1), ValueError, "patch must be a finite positive size in pixels, got -1.0"),
    ((4, 4, (16, 0)), ValueError, "patch's stride must be a finite positive size in pixels, got 0.0"),
    ((4, 4, float("inf")), ValueError, "patch must be a finite positive size in pixels, got inf"),
    ((4, 4, (8,)), ValueError, r"patch must be a size in pixels, or \(stride_y, stride_x\), got \(8,\)"),
    ((4, 4, "8"), TypeError, "patch must be a number"),
])
def test_uniform_attention_mad_checks_its_arguments(args, error, message):
    with pytest.raises(error, match=f"vitmad.uniform_attention_mad: {message}"):
        vitmad.uniform_attention_mad(*args)


def test_uniform_attention_mad_takes_numpy_numbers():
    import numpy as np

    assert vitmad.uniform_attention_mad(np.int64(14), np.int32(10), np.int64(16)) == \
        vitmad.uniform_attention_mad(14, 10, 16.0)


def test_profile_runs_on_cpu_or_cuda_only():
    """The meta device holds no values: refused by name (was: NotImplementedError from copying out of meta)."""
    with pytest.raises(ValueError, match="device: expected auto, cpu, cuda or cuda:N, got 'meta'"):
        vitmad.profile(_tiny_vit_module(), torch.randn(2, 3, 32, 32), device="meta")


def test_pixels_with_channels_the_model_does_not_take_are_refused_by_name():
    """A transformers model says num_channels, a timm ViT's patch embedding its in_channels; a model built for one
    channel takes one."""
    timm = pytest.importorskip("timm")
    with pytest.raises(ValueError, match=r"images: the model takes 3 channels, \[B, 3, H, W\]; got a tensor of shape "
                                         r"\[2, 1, 32, 32\]"):
        vitmad.profile(_tiny_vit_module(), torch.randn(2, 1, 32, 32), device="cpu")
    rgb = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=1)
    with pytest.raises(ValueError, match="images: the model takes 3 channels"):
        vitmad.profile(rgb, torch.randn(1, 4, 32, 32), device="cpu")
    gray = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=1, in_chans=1)
    assert vitmad.profile(gray, torch.randn(1, 1, 32, 32), device="cpu").mad.shape == (1, 3)
    # A tensor of the wrong rank is told the shape this model takes (was [B, 3, H, W] for a 1-channel model).
    with pytest.raises(ValueError, match=r"images: a tensor of images must be \[B, 1, H, W\], got shape \[1, 32, 32\]"):
        vitmad.profile(gray, torch.randn(1, 32, 32), device="cpu")
    # VOLO's patch embedding is a convolution stem before its projection: the stem takes the image's channels
    # (was read from the projection, 32 channels, and every RGB tensor refused).
    volo = timm.models.volo.VOLO(img_size=64, layers=(1, 1, 1, 1), embed_dims=(32, 64, 64, 64),
                                 num_heads=(1, 2, 2, 2), stem_hidden_dim=32).eval()
    assert vitmad.profile(volo, torch.randn(1, 3, 64, 64), device="cpu").count == 1


def test_a_profile_written_onto_a_folder_is_refused_before_writing(good_result, tmp_path):
    profile = vitmad.Profile.from_json(good_result)
    with pytest.raises(IsADirectoryError, match="a folder, where a file was to be written"):
        profile.to_json(tmp_path)
    assert list(tmp_path.iterdir()) == []  # no temporary file left


def test_map_image_tensor_of_another_shape_is_named():
    """A batch of one, [1, 3, H, W], failed inside the model ("too many values to unpack"; found by QA)."""
    from vitmad.profiling import image_prefix_maps, mad_maps

    model, pixels = _tiny_vit_module(), torch.randn(1, 3, 32, 32)
    for maps in (mad_maps, image_prefix_maps):
        with pytest.raises(ValueError, match=r"^image: expected one image's preprocessed pixels, a floating-point "
                                             r"\[C, H, W\] tensor \(or an image file\), got a torch.float32 tensor "
                                             r"of shape \[1, 3, 32, 32\]: drop the batch dim, image\[0\]$"):
            maps(model, pixels, device="cpu")
    with pytest.raises(ValueError, match=r"^image: .* got a torch.uint8 tensor of shape \[3, 32, 32\]$"):
        mad_maps(model, (pixels[0] * 255).to(torch.uint8), device="cpu")


def test_map_layers_are_indices_of_the_recorded_layers(tmp_path):
    from vitmad.profiling import image_prefix_maps, mad_maps

    model, pixels = _tiny_vit_module(), torch.randn(3, 32, 32)
    for layers, shown in (([2], "2"), ([1.0], "1.0"), ([True], "True")):
        with pytest.raises(ValueError, match=rf"layers: expected layer indices in \[0, 2\) \(negative from the end\) "
                                             rf"of the 2 recorded layers, got {shown}"):
            mad_maps(model, pixels, layers=layers, device="cpu")
    with pytest.raises(ValueError, match="layers: expected a list of layer indices, got '0'"):
        mad_maps(model, pixels, layers="0", device="cpu")
    _, _, names, _ = mad_maps(model, pixels, layers=[-1, 0], device="cpu")
    assert names == ["layers.1.attention", "layers.0.attention"]
    with pytest.raises(ValueError, match=r"layer: expected a layer index in \[0, 2\)"):
        image_prefix_maps(model, pixels, layer=5, device="cpu")
    assert image_prefix_maps(model, pixels, layer=-1, device="cpu")[2] == "layers.1.attention"
    # An image file with a module built in Python: refused as profile refuses it (a TypeError calling None before).
    image = write_images(tmp_path, 1, nested=False)[0]
    for draw in (mad_maps, image_prefix_maps):
        with pytest.raises(ValueError, match=r"image: this model has no known preprocessing .* pass preprocessed "
                                             r"pixels as a \[3, H, W\] tensor"):
            draw(model, image, device="cpu")


def _interrupted(model, pixels, checkpoint):
    """A run stopped by Ctrl-C after its first batch of two images, its checkpoint saved."""
    from vitmad.profiling import engine

    original, done = engine._run_batch, []

    def once(plan, state, batch):
        if done:
            raise KeyboardInterrupt
        done.append(True)
        return original(plan, state, batch)

    engine._run_batch = once
    try:
        with pytest.raises(KeyboardInterrupt):
            vitmad.profile(model, pixels, batch_size=2, checkpoint=checkpoint, checkpoint_every=1, device="cpu")
    finally:
        engine._run_batch = original


def test_resume_refuses_other_weights_and_other_pixels(tmp_path):
    """The run's fingerprint holds the weights and a pixel tensor's values: a resume with another model of the same
    class (another --weights file, another fine-tune) or another tensor of the same shape mixed two runs' sums."""
    pixels = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    model = _tiny_vit_module()
    _interrupted(model, pixels, tmp_path / "a.pt")
    other = _tiny_vit_module()
    with torch.no_grad():
        other.layers[0].attention.q_proj.weight.mul_(3)
    for again, again_pixels in ((other, pixels), (model, pixels + 1)):
        with pytest.raises(ValueError, match="resume: .* other settings, other model weights or other images"):
            vitmad.profile(again, again_pixels, batch_size=2, checkpoint=tmp_path / "a.pt", resume=True, device="cpu")
    resumed = vitmad.profile(model, pixels, batch_size=2, checkpoint=tmp_path / "a.pt", resume=True, device="cpu")
    whole = vitmad.profile(model, pixels, batch_size=2, device="cpu")
    torch.testing.assert_close(resumed.mad, whole.mad, rtol=0, atol=0)
    assert resumed.settings["weights"] == whole.settings["weights"] != vitmad.profile(
        other, pixels, device="cpu").settings["weights"]
    assert whole.settings["weights"].startswith("sha256:")


def test_images_with_non_finite_pixels_are_skipped_and_named():
    """One NaN image made every mean, std, min and max NaN, with nothing said."""
    pixels = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    pixels[1, 0, 3, 4] = float("nan")
    pixels[3, 2] = float("inf")
    with pytest.warns(UserWarning, match=r"skipping image tensor\[[13]\]: non-finite pixel values") as caught:
        result = vitmad.profile(_tiny_vit_module(), pixels, batch_size=2, device="cpu")
    assert {w.filename for w in caught} == {__file__}  # the caller's line, not vitmad's (QA 292)
    clean = vitmad.profile(_tiny_vit_module(), pixels[[0, 2, 4]], batch_size=2, device="cpu")
    assert result.count == 3 and result.images == ["tensor[0]", "tensor[2]", "tensor[4]"]
    assert result.skipped == [{"path": f"tensor[{i}]", "reason": "non-finite pixel values (NaN or inf)"}
                              for i in (1, 3)]
    torch.testing.assert_close(result.mad, clean.mad, rtol=1e-12, atol=0)


def test_a_profile_with_nan_values_is_written_as_strict_json(tmp_path):
    """A model whose attention overflows gives NaN: mad.json says null (was bare NaN, which jq and JSON.parse
    refuse), the summary over the finite heads, and it reads back as NaN."""
    model = _tiny_vit_module()
    with torch.no_grad():
        model.layers[1].attention.q_proj.weight[:, 0] = float("nan")  # every head's queries
    result = vitmad.profile(model, torch.randn(2, 3, 32, 32), device="cpu")
    assert bool(result.mad[1].isnan().all()) and bool(result.mad[0].isfinite().all())
    result.to_json(tmp_path / "mad.json")
    text = (tmp_path / "mad.json").read_text()
    doc = json.loads(text, parse_constant=lambda name: pytest.fail(f"mad.json holds {name}"))
    assert doc["layers"][1]["mean"] == [None, None] and doc["layers"][1]["summary"] == {
        "mean_over_heads": None, "min_head": None, "max_head": None}
    assert doc["layers"][0]["summary"]["min_head"] == min(doc["layers"][0]["mean"])
    back = vitmad.Profile.from_json(tmp_path / "mad.json")
    torch.testing.assert_close(back.mad, result.mad, rtol=0, atol=0, equal_nan=True)


def test_a_file_whose_means_are_not_its_sums_is_refused_naming_the_layer(tmp_path):
    """compare draws from the sums: a mad.json whose "mean" was edited, or lists fewer heads, was drawn from them
    without a word (QA 259)."""
    result = vitmad.profile(_tiny_vit_module(), torch.randn(2, 3, 32, 32), device="cpu")
    result.to_json(tmp_path / "mad.json")
    doc = json.loads((tmp_path / "mad.json").read_text())
    for edit in ("edited", "short"):
        changed = json.loads(json.dumps(doc))
        if edit == "edited":
            changed["layers"][1]["mean"][0] = 999.0
        else:
            changed["layers"][1]["mean"] = changed["layers"][1]["mean"][:1]
        (tmp_path / f"{edit}.json").write_text(json.dumps(changed))
        with pytest.raises(ValueError, match=r"malformed vitmad profile \(ValueError: "):
            vitmad.Profile.from_json(tmp_path / f"{edit}.json")
    with pytest.raises(ValueError, match=r"layer 1's mean \[999\.0, .*\] is not its sums' total / count"):
        vitmad.Profile.from_json(tmp_path / "edited.json")
    torch.testing.assert_close(vitmad.Profile.from_json(tmp_path / "mad.json").mad, result.mad, rtol=0, atol=0)


def test_a_file_whose_statistics_or_unit_are_not_its_sums_is_refused_and_other_files_read(tmp_path, monkeypatch):
    """QA 287: the statistics' means (and the temporal MAD's, tested with the video profiles) were not checked
    against their sums (an edited entropy sum plotted 28.3 nats for 2.8), nor min and max against the mean, nor
    the top-level unit against the settings; a comma in a layer name shifted mad.csv's columns; from_json did not
    expand ~ as to_json does; == of two profiles raised on their tensors."""
    import csv

    model = _tiny_vit_module()
    model.add_module("vit,a", torch.nn.Identity())  # a legal module name holding a comma: not a layer
    result = vitmad.profile(model, torch.randn(3, 3, 32, 32), device="cpu", stats=["entropy"])
    result.to_json(tmp_path / "mad.json")
    doc = json.loads((tmp_path / "mad.json").read_text())
    edits = {
        "entropy_mean": (lambda d: d["statistics"]["entropy"]["mean"][0].__setitem__(0, 0.5),
                         r"layer 0's entropy mean \[0\.5, .*\] is not its sums' total / count"),
        "entropy_sum": (lambda d: d["sums"]["entropy_total"][0].__setitem__(0, d["sums"]["entropy_total"][0][0] * 10),
                        "layer 0's entropy mean .* is not its sums' total / count"),
        "min_above": (lambda d: d["layers"][1]["min"].__setitem__(0, 999.0),
                      r"layer 1's min \[999\.0, .*\] and max .* do not hold its mean"),
        "unit": (lambda d: d.__setitem__("unit", "mm"), "unit 'mm' is not the unit its settings give, 'px'"),
    }
    for name, (edit, message) in edits.items():
        changed = json.loads(json.dumps(doc))
        edit(changed)
        (tmp_path / f"{name}.json").write_text(json.dumps(changed))
        with pytest.raises(ValueError, match=rf"{name}.json: malformed vitmad profile \(ValueError: {message}"):
            vitmad.Profile.from_json(tmp_path / f"{name}.json")
    monkeypatch.setenv("HOME", str(tmp_path))
    again = vitmad.Profile.from_json("~/mad.json")
    torch.testing.assert_close(again.stat("entropy"), result.stat("entropy"), rtol=0, atol=0)
    assert again != result and again == again  # identity: no comparison of tensors
    renamed = vitmad.Profile(**{**vars(again), "layers": ["vit,a.layer.0", "vit,a.layer.1"]})
    renamed.to_csv(tmp_path / "mad.csv")
    with open(tmp_path / "mad.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["name"] for row in rows] == ["vit,a.layer.0"] * 2 + ["vit,a.layer.1"] * 2
    assert [float(row["mad_mean"]) for row in rows] == result.mad.flatten().tolist()


def test_pixel_tensors_of_another_size_than_the_run_or_the_model_are_refused():
    timm = pytest.importorskip("timm")
    model = _tiny_vit_module()
    with pytest.raises(ValueError, match=r"image_size: 64x64 given, but the pixel tensor is 32x32 \(shape "
                                         r"\[2, 3, 32, 32\]\): a tensor is fed as it is; leave image_size unset"):
        vitmad.profile(model, torch.randn(2, 3, 32, 32), image_size=64, device="cpu")
    assert vitmad.profile(model, torch.randn(2, 3, 32, 32), image_size=32, device="cpu").count == 2
    # A tiling processor's [images, tiles, 3, H, W]: its padding tiles a flattened tensor would count (QA 260).
    with pytest.raises(ValueError, match=r"images: a tensor of images must be \[B, 3, H, W\], got shape \[2, 5, 3, 32, "
                                         r"32\] \(the tiles of a processor that cuts each image into several, .*"
                                         r"record the model's own forward instead"):
        vitmad.profile(model, torch.randn(2, 5, 3, 32, 32), device="cpu")
    # Not whole patches: transformers' patch embedding floors, and the last rows would never be seen.
    with pytest.raises(ValueError, match=r"images: expected whole 8x8 patches of the model \(embeddings\."
                                         r"patch_embeddings\.projection takes no partial patch\), got a pixel tensor "
                                         r"of 36x32; for "
                                         r"example 32x32 \(crop it"):
        vitmad.profile(model, torch.randn(2, 3, 36, 32), device="cpu")
    fixed = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=1)
    with pytest.raises(ValueError, match=r"images: the model takes 32x32 px images only; got a tensor of shape "
                                         r"\[1, 3, 48, 32\]"):
        vitmad.profile(fixed, torch.randn(1, 3, 48, 32), device="cpu")
    dynamic = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=1, dynamic_img_size=True)
    assert vitmad.profile(dynamic, torch.randn(1, 3, 48, 32), device="cpu").layout["grid"] == [3, 2]


def test_a_dynamically_quantized_module_is_profiled_and_its_weights_told_apart():
    """A dynamically quantized Linear keeps a dtype and a (weight, bias) tuple in its state dict: the weights'
    digest crashed on them (QA 261). The profile equals the recording of the same pixels."""
    import warnings

    from vitmad.profiling.checkpoint import weights_digest

    def quantized(gain):
        vit = _tiny_vit_module()
        with torch.no_grad():
            vit.layers[0].attention.q_proj.weight.mul_(gain)  # another model: other integers in its first layer
        with warnings.catch_warnings():  # torch.ao.quantization's deprecation
            warnings.simplefilter("ignore")
            return torch.ao.quantization.quantize_dynamic(vit, {torch.nn.Linear}, dtype=torch.qint8)

    model, other = quantized(1.0), quantized(2.0)
    pixels = torch.randn(3, 3, 32, 32)
    with torch.no_grad(), vitmad.record(model) as rec:
        model(pixels)
    result = vitmad.profile(model, pixels, device="cpu")
    torch.testing.assert_close(result.mad, rec.mad.double().mean(1), rtol=1e-6, atol=1e-6)
    assert weights_digest(model) == weights_digest(model) != weights_digest(other)


@pytest.mark.parametrize(("images", "message"), [
    (5, "images: expected 'builtin', a folder, a file, a list of those or a pixel tensor, got int"),
    ([torch.randn(3, 32, 32)], r"images: a list must hold image files and folders \(paths\), got Tensor in it; stack "
                               r"pixel tensors into one \[B, 3, H, W\] tensor"),
    (torch.randn(0, 3, 32, 32), r"images: the pixel tensor holds no image \(shape \[0, 3, 32, 32\]\)"),
])
def test_images_of_the_wrong_kind_are_named(images, message):
    with pytest.raises(ValueError, match=message):
        vitmad.profile(_tiny_vit_module(), images, device="cpu")
    with pytest.raises(ValueError, match="progress: expected True or False, got 'yes'"):
        vitmad.profile(_tiny_vit_module(), torch.randn(1, 3, 32, 32), device="cpu", progress="yes")


@pytest.mark.filterwarnings("ignore:results 1 and 2 are the same file")
def test_compare_names_an_output_it_cannot_write_and_labels_runs_of_one_model_apart(good_result, tmp_path, capsys):
    (tmp_path / "afile").write_text("")
    code = main(["compare", str(good_result), str(good_result), "--out", str(tmp_path / "afile" / "cmp.png")])
    # The file in the way is named (mkdir's own reason was "File exists", QA 211).
    assert code == 2 and capsys.readouterr().err.strip() == (
        f"vitmad: error: --out: cannot write to {tmp_path / 'afile'}: a file, not a folder")
    if Path("/proc/self").is_dir():  # a folder that takes no new files: not "No such file or directory" alone
        code = main(["compare", str(good_result), str(good_result), "--out", "/proc/cmp.png"])
        assert code == 2 and capsys.readouterr().err.strip() == (
            "vitmad: error: --out: cannot write to /proc: the folder exists but takes no new files (No such file or "
            "directory)")
    code = main(["compare", str(good_result), str(good_result), "--out", str(tmp_path)])
    assert code == 2 and "is a folder; name the figure file" in capsys.readouterr().err
    # A type matplotlib does not write: named as --out's, before its folders are made (QA 284: left behind empty).
    code = main(["compare", str(good_result), "--out", str(tmp_path / "new" / "cmp.txt")])
    assert code == 2 and capsys.readouterr().err.startswith(
        f"vitmad: error: --out: {tmp_path / 'new' / 'cmp.txt'}: cannot write a figure of type .txt; use one of ")
    assert not (tmp_path / "new").exists()
    with pytest.warns(UserWarning, match=f"results 1 and 2 are the same file, {good_result}: its curves are drawn "
                                         "twice"):
        assert main(["compare", str(good_result), str(good_result), "--out", str(tmp_path / "twice.png")]) == 0
    from vitmad.cli import _default_labels

    profile = vitmad.Profile.from_json(good_result)
    assert _default_labels([profile, profile], ["a/mad.json", "b/mad.json"]) == [
        f"{profile.model} (a/mad.json)", f"{profile.model} (b/mad.json)"]


def test_resume_names_a_stray_file_among_the_checkpoints(tiny_model, image_folder, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "checkpoint.rank0-of-two.pt").write_text("")
    code = main(["profile", "--model", f"hf:{tiny_model}", "--images", str(image_folder), "--device", "cpu",
                 "--out", str(out), "--resume", "--no-figures"])
    err = capsys.readouterr().err
    assert code == 2 and "checkpoint.rank0-of-two.pt is not a checkpoint this command writes" in err


def test_the_entropy_of_a_one_hot_row_is_plus_zero():
    eye = torch.eye(5)[None]
    for value in (vitmad.attention_stats(eye, 1, stats=["entropy"], grid=[2, 2])["entropy"],
                  vitmad.attention_stats(eye, positions=vitmad.grid_positions(2, 2, 1, num_prefix_tokens=1),
                                         stats=["entropy"], reduction="none")["entropy"][..., 1:]):
        assert bool((value == 0).all()) and not bool(torch.signbit(value).any())


def test_compare_refuses_mad_in_different_units(good_result, tmp_path, capsys):
    """A volume profile's MAD is in millimetres (or voxels), an image profile's in pixels: compare drew them on one
    axis labelled pixels (helper-187 noted it)."""
    from vitmad.profiling import Profile
    from vitmad.profiling.plotting import plot_compare

    doc = json.loads(good_result.read_text())
    doc["settings"]["preprocessing"] = {**(doc["settings"].get("preprocessing") or {}), "volumes": True, "unit": "mm"}
    doc["unit"] = "mm"  # as a volume profile's file says it (a file saying px beside these settings is refused)
    volume = tmp_path / "volume.json"
    volume.write_text(json.dumps(doc))
    assert Profile.from_json(volume).distance_unit == "mm" and Profile.from_json(good_result).distance_unit == "px"
    code = main(["compare", str(good_result), str(volume), "--out", str(tmp_path / "cmp.png")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err
    assert err.startswith(f"vitmad: error: results: their MAD is in different units ({good_result}: px, {volume}: mm)")
    assert not (tmp_path / "cmp.png").exists()
    with pytest.raises(ValueError, match=r"the profiles' MAD is in different units \(a: px, b: mm\)"):
        plot_compare([Profile.from_json(good_result), Profile.from_json(volume)], ["a", "b"], tmp_path / "c.png")
    plot_compare([Profile.from_json(volume)] * 2, ["a", "b"], tmp_path / "c.png")  # one unit: drawn
    assert (tmp_path / "c.png").exists()


def test_a_safetensors_file_torch_cannot_read_without_its_package_is_not_called_corrupt(tmp_path):
    """QA 296: torch.load reads .safetensors through the safetensors package; where it is missing, torch's reason
    was replaced by 'neither torch.save's zip archive nor a pickle', which blamed a valid file."""
    from vitmad.profiling.options import _checkpoint_unread_said

    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"\xc0\x1a\x00\x00\x00\x00\x00\x00{}")
    missing = RuntimeError("Attempting to load a safetensors file but safetensors is not installed. Please install "
                           "safetensors with: pip install safetensors")
    assert "pip install safetensors" in _checkpoint_unread_said(weights, missing)
    assert _checkpoint_unread_said(weights, RuntimeError("bad")).startswith("neither torch.save's zip archive")
