"""vitmad profile --stats (#16): entropy, prefix mass, self mass and the CLS / register maps profiled in the same
forward as MAD, on a tiny timm ViT with registers and a tiny timm Swin (no CLS: prefix mass 0, no maps).

Values in mad.json and prefix_maps.npz equal a direct vitmad.record over the same images; resume equals an
uninterrupted run and refuses a checkpoint of other statistics; torchrun equals one process; csv columns,
figures, compare, bad --stats, and MAD-only files as they were.
"""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch

timm = pytest.importorskip("timm")
pytest.importorskip("matplotlib")
pytest.importorskip("transformers")

import vitmad  # noqa: E402
from conftest import interrupted_profile, profile_one_process_and_two_ranks, write_images  # noqa: E402
from vitmad.cli import main  # noqa: E402
from vitmad.profiling.images import Preprocessing, find_images, load_batch  # noqa: E402
from vitmad.profiling.models import wrap_module  # noqa: E402
from vitmad.profiling.options import OptionError, resolve_stats  # noqa: E402

ALL = ["mad", "entropy", "prefix_mass", "self_mass", "prefix_maps"]
PER_HEAD = ["mad", "entropy", "prefix_mass", "self_mass"]
PREP = Preprocessing((32, 32), ("exact", 32, 32), False, (0.5,) * 3, (0.5,) * 3)
BATCH = 2


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("stats_images")
    write_images(folder, 5)
    return folder


@pytest.fixture(scope="module")
def registers_vit():
    """CLS and 2 registers on a 4 x 4 grid of 8 px, 3 layers of 2 heads."""
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=16,
                              depth=3, num_heads=2, reg_tokens=2, no_embed_class=True).eval()
    return wrap_module(model, "timm:tiny-vit-reg2", PREP)


@pytest.fixture(scope="module")
def swin():
    """1 then 2 heads, tokens of 4 then 8 px, windows and no CLS."""
    torch.manual_seed(0)
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=32, window_size=4,
                              embed_dim=16, depths=(1, 1), num_heads=(1, 2)).eval()
    return wrap_module(model, "timm:tiny-swin", PREP)


def _recorded(loaded, files, stats) -> tuple[dict[str, torch.Tensor], list, torch.Tensor]:
    """Straight from vitmad.record, batch by batch as the profile runs: ``{name: [L, N, H]}`` per image, the
    prefix maps ``[N, H, Q, T]`` per layer (or None), and the pixels."""
    per_image, maps, inputs = {}, [], []
    for start in range(0, len(files), BATCH):
        pixels, _, _ = load_batch(files[start:start + BATCH], PREP)
        with torch.no_grad(), vitmad.record(loaded.module, stats=stats) as rec:
            loaded.module(pixels)
        for name, values in rec.stats.items():
            per_image.setdefault(name, []).append(values.double())
        if "prefix_maps" in stats:
            maps.append(rec.prefix_maps)
        inputs.append(pixels)
    joined = {name: torch.cat(parts, dim=1) for name, parts in per_image.items()}
    layer_maps = [None if layer[0] is None else torch.cat([m.double() for m in layer]) for layer in zip(*maps)]
    return joined, layer_maps, torch.cat(inputs)


def _json_rows(rows) -> torch.Tensor:
    """mad.json's per-layer lists of heads (null: no value) as ``[L, H_max]`` with NaN."""
    width = max(len(row) for row in rows)
    return torch.tensor([[math.nan if v is None else v for v in row] + [math.nan] * (width - len(row))
                         for row in rows], dtype=torch.float64)


def _assert_close(actual, expected, **tolerance):
    torch.testing.assert_close(actual, expected, equal_nan=True, **({"rtol": 1e-6, "atol": 1e-6} | tolerance))


def test_registers_vit_files_equal_a_direct_recording(registers_vit, images, tmp_path):
    result = vitmad.profile(registers_vit, images, batch_size=BATCH, device="cpu", stats="all")
    result.to_json(tmp_path / "mad.json")
    result.to_csv(tmp_path / "mad.csv")
    result.save_prefix_maps(tmp_path / "prefix_maps.npz")
    files = find_images(images)
    expected, expected_maps, pixels = _recorded(registers_vit, files, ALL)

    doc = json.loads((tmp_path / "mad.json").read_text())
    assert doc["format"] == "vitmad-profile/2" and doc["settings"]["stats"] == ALL and doc["count"] == 5
    assert list(doc["statistics"]) == ["entropy", "prefix_mass", "self_mass"]
    assert doc["statistics"]["entropy"]["unit"] == "nats"
    _assert_close(_json_rows([layer["mean"] for layer in doc["layers"]]), expected["mad"].mean(1))
    for name in ("entropy", "prefix_mass", "self_mass"):
        entry, values = doc["statistics"][name], expected[name]
        _assert_close(_json_rows(entry["mean"]), values.mean(1))
        _assert_close(_json_rows(entry["std"]), values.std(1, correction=0), atol=1e-5)
        _assert_close(_json_rows(entry["min"]), values.amin(1))
        _assert_close(_json_rows(entry["max"]), values.amax(1))
        _assert_close(result.stat(name), values.mean(1))
    assert (result.stat("prefix_mass") > 0).all()  # CLS and registers take attention

    # The maps: every layer, CLS and both registers, over the 4 x 4 grid; the mean input beside them.
    assert doc["prefix_maps"] == {
        "layers": [{"index": i, "name": f"blocks.{i}.attn", "grid": [4, 4], "tokens": 3, "count": 5}
                   for i in range(3)],
        "skipped_layers": [],
    }
    saved = np.load(tmp_path / "prefix_maps.npz")
    assert list(saved["layer_names"]) == result.layers and list(saved["counts"]) == [5, 5, 5]
    for i, layer_maps in enumerate(expected_maps):
        mean = layer_maps.mean(0).reshape(2, 3, 4, 4)
        _assert_close(torch.from_numpy(saved[f"layer_{i}"]).double(), mean)
        _assert_close(result.prefix_maps.mean(i), mean)
    _assert_close(torch.from_numpy(saved["mean_input"]).double(), pixels.double().mean(0))

    # mad.csv: a row per layer and head, four columns per statistic after MAD's.
    with open(tmp_path / "mad.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0])[8:] == [f"{name}_{part}" for name in ("entropy", "prefix_mass", "self_mass")
                                 for part in ("mean", "std", "min", "max")]
    assert len(rows) == 6
    for row in rows:
        layer, head = int(row["layer"]), int(row["head"])
        assert float(row["entropy_mean"]) == result.stat("entropy")[layer, head].item()
        assert float(row["self_mass_max"]) == result.running("self_mass").high[layer, head].item()

    # Read back: the same statistics, losslessly.
    again = vitmad.Profile.from_json(tmp_path / "mad.json")
    assert again.stat_names == ["mad", "entropy", "prefix_mass", "self_mass"]
    for name in again.stat_names:
        for part in ("total", "total_sq", "low", "high"):
            assert torch.equal(getattr(again.running(name), part), getattr(result.running(name), part))
    # mad.json lists the maps' layers, not the maps: read back, the profile says where they are, and writes the
    # list out again (was: "profile with stats=[..., 'prefix_maps']", and the entry dropped).
    with pytest.raises(ValueError, match="read from mad.json, which lists the layers with prefix maps but not the "
                                         "maps: they are in prefix_maps.npz"):
        again.plot_prefix_maps(tmp_path / "maps.png")
    again.to_json(tmp_path / "again.json")
    assert json.loads((tmp_path / "again.json").read_text())["prefix_maps"] == \
        json.loads((tmp_path / "mad.json").read_text())["prefix_maps"]
    # The names a user may try: the maps are no per-head statistic; statistics are lower case.
    with pytest.raises(KeyError, match="'prefix_maps' are maps, not a per-head statistic: read profile.prefix_maps"):
        result.stat("prefix_maps")
    with pytest.raises(KeyError, match="no statistic 'Entropy': the names are lower case"):
        result.stat("Entropy")
    with pytest.raises(KeyError, match="no statistic 'sink': vitmad profiles mad, entropy, prefix_mass, self_mass"):
        result.stat("sink")


def test_swin_has_no_prefix_tokens_and_no_maps(swin, images, tmp_path):
    stats = ["entropy", "prefix_mass", "self_mass", "prefix_maps"]  # MAD comes anyway
    result = vitmad.profile(swin, images, batch_size=BATCH, device="cpu", stats=stats)
    expected, expected_maps, _ = _recorded(swin, find_images(images), ALL)
    assert result.heads == [1, 2] and expected_maps == [None, None]
    for name in PER_HEAD:
        _assert_close(result.stat(name), expected[name].mean(1))
    assert result.stat("prefix_mass")[0, 0] == 0 and (result.stat("prefix_mass")[1] == 0).all()
    assert result.stat("entropy")[0, 1].isnan()  # the first stage has one head

    result.to_json(tmp_path / "mad.json")
    doc = json.loads((tmp_path / "mad.json").read_text())
    assert [len(row) for row in doc["statistics"]["entropy"]["mean"]] == [1, 2]
    assert doc["prefix_maps"]["layers"] == []
    assert [entry["name"] for entry in doc["prefix_maps"]["skipped_layers"]] == result.layers
    assert "no prefix maps" in doc["prefix_maps"]["skipped_layers"][0]["reason"]
    # The maps' API says why too: mean(layer) raised a bare KeyError, save wrote an .npz of no layer (QA 231).
    for read in (lambda: result.plot_prefix_maps(tmp_path / "prefix_maps.png"), lambda: result.prefix_maps.mean(0),
                 lambda: result.save_prefix_maps(tmp_path / "prefix_maps.npz")):
        with pytest.raises(ValueError, match=r"^no layer has mean prefix maps \(.*no prefix maps"):
            read()
    assert not (tmp_path / "prefix_maps.npz").exists()
    # One image's maps name the model, not a stats= parameter image_prefix_maps does not take (QA 413).
    from vitmad.profiling import image_prefix_maps
    with pytest.raises(OptionError, match=r"^model: no recorded layer of SwinTransformer has tokens without a "
                                          r"position \(CLS, registers\)"):
        image_prefix_maps(swin, find_images(images)[0], device="cpu")
    result.plot_stat("entropy", tmp_path / "entropy.png")
    assert (tmp_path / "entropy.png").read_bytes()[:4] == b"\x89PNG"


def test_resume_equals_an_uninterrupted_run_and_refuses_other_stats(registers_vit, images, tmp_path, monkeypatch):
    options = dict(batch_size=1, device="cpu", stats="all", checkpoint_every=1)
    whole = vitmad.profile(registers_vit, images, **options)

    checkpoint = tmp_path / "run.pt"
    interrupted_profile(monkeypatch, lambda: vitmad.profile(registers_vit, images, checkpoint=checkpoint, **options),
                        at_batch=3)
    assert torch.load(checkpoint, weights_only=True)["batches_done"] == 2

    resumed = vitmad.profile(registers_vit, images, checkpoint=checkpoint, resume=True, **options)
    assert resumed.count == 5 and resumed.images == whole.images
    for name in PER_HEAD:
        for part in ("total", "total_sq", "low", "high"):
            assert torch.equal(getattr(resumed.running(name), part), getattr(whole.running(name), part))
    for i in whole.prefix_maps.layers:
        assert torch.equal(resumed.prefix_maps.total[i], whole.prefix_maps.total[i])
    assert torch.equal(resumed.prefix_maps.pixels_total, whole.prefix_maps.pixels_total)

    # The statistics are part of the run's fingerprint: never mixed into sums of other statistics.
    for other in ("entropy", None):
        with pytest.raises(OptionError, match="resume: .* written by a run with other settings"):
            vitmad.profile(registers_vit, images, checkpoint=checkpoint, resume=True,
                           **(options | {"stats": other}))


def test_cli_figures_and_compare(tiny_model, images, tmp_path, capsys):
    base = ["profile", "--model", f"hf:{tiny_model}", "--images", str(images), "--device", "cpu", "--max-images", "3"]
    assert main([*base, "--stats", "all", "--out", str(tmp_path / "all")]) == 0
    assert main([*base, "--stats", "entropy, prefix_maps", "--out", str(tmp_path / "some")]) == 0
    assert main([*base, "--out", str(tmp_path / "mad_only")]) == 0
    stdout = capsys.readouterr().out
    assert "prefix maps: 2 of 2 layers" in stdout
    written = {"mad.json", "mad.csv", "mad.png", "mad_map.png", "entropy.png", "prefix_mass.png", "self_mass.png",
               "prefix_maps.png", "prefix_maps.npz", "prefix_map_image.png"}
    assert written <= {p.name for p in (tmp_path / "all").iterdir()}
    some = {p.name for p in (tmp_path / "some").iterdir()}
    assert {"entropy.png", "prefix_maps.png", "prefix_maps.npz"} <= some
    assert not {"prefix_mass.png", "self_mass.png"} & some
    for name in ("entropy.png", "prefix_maps.png"):
        assert (tmp_path / "all" / name).read_bytes()[:4] == b"\x89PNG"

    # A MAD-only run writes what it always did.
    only = json.loads((tmp_path / "mad_only" / "mad.json").read_text())
    assert "statistics" not in only and "prefix_maps" not in only and "stats" not in only["settings"]
    assert {p.name for p in (tmp_path / "mad_only").iterdir()} >= {"mad.json", "mad.csv", "mad.png", "mad_map.png"}
    assert not (tmp_path / "mad_only" / "prefix_maps.npz").exists()
    assert not (tmp_path / "mad_only" / "prefix_map_image.png").exists()
    header = (tmp_path / "mad_only" / "mad.csv").read_text().splitlines()[0]
    assert header == "layer,name,head,mad_mean,mad_std,mad_min,mad_max,count"

    # compare: MAD, and a figure per statistic every profile has.
    results = [str(tmp_path / run / "mad.json") for run in ("all", "some")]
    with pytest.warns(UserWarning, match=r"^no prefix_mass, self_mass figures: .*some/mad.json was profiled without "
                                         r"prefix_mass or self_mass$"):
        assert main(["compare", *results, "--out", str(tmp_path / "cmp.png")]) == 0
    assert (tmp_path / "cmp.png").exists() and (tmp_path / "cmp_entropy.png").exists()
    assert not (tmp_path / "cmp_prefix_mass.png").exists()
    with pytest.warns(UserWarning, match=r"no entropy, prefix_mass, self_mass figures: .*mad_only/mad.json was "
                                         r"profiled without entropy, prefix_mass or self_mass"):
        assert main(["compare", results[0], str(tmp_path / "mad_only" / "mad.json"), "--out",
                     str(tmp_path / "old.svg")]) == 0
    assert (tmp_path / "old.svg").exists() and not (tmp_path / "old_entropy.svg").exists()

    # The same --out again with other results: the earlier comparison's figure of a statistic not drawn now is
    # removed (was: left beside the new cmp.png, drawn from other results), and said.
    capsys.readouterr()
    with pytest.warns(UserWarning, match="no entropy, prefix_mass, self_mass figures"):
        assert main(["compare", results[0], str(tmp_path / "mad_only" / "mad.json"), "--out",
                     str(tmp_path / "cmp.png")]) == 0
    assert not (tmp_path / "cmp_entropy.png").exists()
    assert f"removed an earlier comparison's {tmp_path / 'cmp_entropy.png'}" in capsys.readouterr().out
    # A user's file under a statistic figure's name is not compare's to replace: refused before any figure.
    (tmp_path / "mine_entropy.png").write_text("my notes")
    with pytest.warns(UserWarning, match="no prefix_mass, self_mass figures"):
        assert main(["compare", *results, "--out", str(tmp_path / "mine.png")]) == 2
    assert f"vitmad: error: --out: {tmp_path / 'mine_entropy.png'}, where the entropy figure goes, exists and was " \
           "not written by vitmad compare" in capsys.readouterr().err
    assert (tmp_path / "mine_entropy.png").read_text() == "my notes" and not (tmp_path / "mine.png").exists()
    # A label matplotlib cannot draw is an error naming --labels, in one line.
    assert main(["compare", *results, "--labels", r"$\notasymbol$", "b", "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vitmad: error: --labels: matplotlib cannot draw") and "\n" not in err
    with pytest.warns(UserWarning, match="no prefix_mass, self_mass figures"):
        assert main(["compare", *results, "--labels", r"$\alpha$ = 1", "costs $5", "--out",
                     str(tmp_path / "x.pdf")]) == 0
    from vitmad.profiling.plotting import written_by_compare

    assert all(written_by_compare(tmp_path / name) for name in ("x.pdf", "x_entropy.pdf", "cmp.png", "old.svg"))
    assert not written_by_compare(tmp_path / "all" / "entropy.png")
    # .jpg carries the mark too (in its comment); a user's .jpg files beside a user's own fig.jpg were written over
    # or removed, as any earlier comparison's (QA 259). A format without a mark (.webp) replaces no file.
    (tmp_path / "fig.jpg").write_text("my figure")
    (tmp_path / "fig_entropy.jpg").write_text("my entropy plot")
    (tmp_path / "fig_temporal_mad.jpg").write_text("my temporal plot")
    # The user's file at --out itself is refused as well (it was written over, QA 276).
    with pytest.warns(UserWarning, match="no prefix_mass, self_mass figures"):
        assert main(["compare", *results, "--out", str(tmp_path / "fig.jpg")]) == 2
    assert f"--out: {tmp_path / 'fig.jpg'} exists and was not written by vitmad compare" in capsys.readouterr().err
    assert (tmp_path / "fig.jpg").read_text() == "my figure"
    (tmp_path / "fig.jpg").unlink()
    with pytest.warns(UserWarning, match="no prefix_mass, self_mass figures"):
        assert main(["compare", *results, "--out", str(tmp_path / "fig.jpg")]) == 2
    assert "fig_entropy.jpg, where the entropy figure goes, exists and was not written" in capsys.readouterr().err
    (tmp_path / "fig_entropy.jpg").unlink()
    with pytest.warns(UserWarning, match="no prefix_mass, self_mass figures"):
        assert main(["compare", *results, "--out", str(tmp_path / "fig.jpg")]) == 0
    assert (tmp_path / "fig_temporal_mad.jpg").read_text() == "my temporal plot"
    assert written_by_compare(tmp_path / "fig.jpg") and written_by_compare(tmp_path / "fig_entropy.jpg")
    with pytest.warns(UserWarning, match="no prefix_mass, self_mass figures"):  # its own figures it replaces
        assert main(["compare", *results, "--out", str(tmp_path / "fig.jpg")]) == 0
    for name in ("fig.rgba", "fig_entropy.rgba"):
        (tmp_path / name).write_text("mine")
    with pytest.warns(UserWarning, match="no prefix_mass, self_mass figures"):
        assert main(["compare", *results, "--out", str(tmp_path / "fig.rgba")]) == 2
    assert (tmp_path / "fig.rgba").read_text() == "mine" and (tmp_path / "fig_entropy.rgba").read_text() == "mine"
    # A comparison drawn twice at one path, in every format matplotlib writes: each but raw pixels and PGF carries
    # the mark (QA 285: .webp, .tif and .svgz were refused the second time); in those the path named is replaced.
    for suffix in ("webp", "tif", "tiff", "gif", "avif", "svgz", "jpeg", "eps", "pdf"):
        for _ in range(2):
            assert main(["compare", results[0], "--out", str(tmp_path / f"twice.{suffix}")]) == 0
        assert written_by_compare(tmp_path / f"twice.{suffix}")
        assert written_by_compare(tmp_path / f"twice_entropy.{suffix}")
    (tmp_path / "mine.raw").write_text("mine")
    assert main(["compare", str(tmp_path / "mad_only" / "mad.json"), "--out", str(tmp_path / "mine.raw")]) == 0
    assert (tmp_path / "mine.raw").read_bytes() != b"mine"


def test_bad_stats_are_refused_naming_the_option(registers_vit, tmp_path, capsys):
    assert resolve_stats(None) == resolve_stats("mad") == ("mad",)
    assert resolve_stats(["self_mass", "entropy"]) == ("mad", "entropy", "self_mass")
    assert resolve_stats("all") == resolve_stats("entropy,all") == tuple(ALL)
    with pytest.raises(OptionError, match="stats: expected names among mad, entropy, .* got unknown 'entropie'"):
        resolve_stats("mad,entropie")
    with pytest.raises(OptionError, match="stats: expected a comma list or a list of names"):
        vitmad.profile(registers_vit, torch.zeros(1, 3, 32, 32), stats=["entropy", 3])
    # A string that names nothing (an empty shell variable) is refused, not read as MAD only.
    for empty in ("", " , "):
        with pytest.raises(OptionError, match=f"stats: expected a comma list .* got {empty!r}"):
            resolve_stats(empty)
    # The flag is checked before the model loads (this one does not exist).
    code = main(["profile", "--model", "hf:/no/such/model", "--stats", "entropy,sink", "--device", "cpu",
                 "--out", str(tmp_path)])
    assert code == 2
    assert "vitmad: error: --stats: expected names among" in capsys.readouterr().err
    assert main(["profile", "--model", "hf:/no/such/model", "--stats", "", "--out", str(tmp_path)]) == 2
    assert "vitmad: error: --stats: expected a comma list or a list of names" in capsys.readouterr().err
    mad_only = vitmad.profile(registers_vit, torch.zeros(1, 3, 32, 32), device="cpu")
    with pytest.raises(KeyError, match="'entropy' was not profiled"):
        mad_only.stat("entropy")
    assert resolve_stats({"self_mass", "entropy"}) == ("mad", "entropy", "self_mass")  # a set, in the usual order
    # --stats given twice asks for both lists (was: the last one alone, silently).
    from vitmad.cli import build_parser

    args = build_parser().parse_args(["profile", "--stats", "entropy", "--stats", "self_mass,prefix_maps"])
    assert resolve_stats(",".join(args.stats)) == ("mad", "entropy", "self_mass", "prefix_maps")
    assert build_parser().parse_args(["profile"]).stats is None


def test_torchrun_equals_one_process(tiny_model, images, tmp_path, restore_threads):
    args = ["--model", f"hf:{tiny_model}", "--images", str(images), "--device", "cpu", "--no-figures",
            "--batch-size", "2", "--stats", "all"]
    profile_one_process_and_two_ranks(args, tmp_path, ["--checkpoint-every", "1"])
    one, two = (vitmad.Profile.from_json(tmp_path / run / "mad.json") for run in ("one", "two"))
    assert two.processes == 2 and two.images == one.images
    for name in PER_HEAD:
        _assert_close(two.running(name).total, one.running(name).total, rtol=1e-12, atol=1e-12)
        assert torch.equal(two.running(name).low.nan_to_num(-1), one.running(name).low.nan_to_num(-1))
    maps_one, maps_two = (np.load(tmp_path / run / "prefix_maps.npz") for run in ("one", "two"))
    assert sorted(maps_one.files) == sorted(maps_two.files)
    for key in maps_one.files:
        if maps_one[key].dtype.kind == "f":
            np.testing.assert_allclose(maps_two[key], maps_one[key], rtol=1e-6, atol=1e-7)
        else:
            assert (maps_two[key] == maps_one[key]).all()


def test_one_image_prefix_maps_are_its_recorded_rows(registers_vit, images):
    from vitmad.profiling import image_prefix_maps

    path = find_images(images)[0]
    maps, pixels, name, geometry = image_prefix_maps(registers_vit, path, device="cpu")
    assert name == "blocks.2.attn" and geometry["grid"] == [4, 4] and maps.shape == (2, 3, 4, 4)
    batch, _, _ = load_batch([path], PREP)
    with torch.no_grad(), vitmad.record(registers_vit.module, stats=["prefix_maps"]) as rec:
        registers_vit.module(batch)
    torch.testing.assert_close(maps, rec.prefix_maps[-1][0].reshape(2, 3, 4, 4))
    torch.testing.assert_close(pixels, batch[0])
    first, *_ = image_prefix_maps(registers_vit, path, layer=0, device="cpu")
    torch.testing.assert_close(first, rec.prefix_maps[0][0].reshape(2, 3, 4, 4))
    with pytest.raises(OptionError, match=r"layer: expected a layer index in \[0, 3\) \(negative from the end\) "
                                          r"of the 3 recorded layers, got 7"):
        image_prefix_maps(registers_vit, path, layer=7, device="cpu")


def test_differential_attention_profiles_mad_and_leaves_the_undefined_statistics_null(images, tmp_path, capsys,
                                                                                      monkeypatch):
    """timm's vit_dwee attends with A1 - lambda * A2, not a probability distribution: MAD is profiled as without
    --stats, the other statistics are null in mad.json with no figure, and the maps name the reason."""
    import vitmad.profiling.models

    torch.manual_seed(0)
    model = timm.create_model("vit_dwee_patch16_reg1_gap_256", pretrained=False, img_size=32, patch_size=8,
                              embed_dim=32, depth=2, num_heads=2).eval()
    loaded = wrap_module(model, "timm:tiny-dwee", PREP)
    alone = vitmad.profile(loaded, images, batch_size=BATCH, device="cpu")
    result = vitmad.profile(loaded, images, batch_size=BATCH, device="cpu", stats="all")
    _assert_close(result.mad, alone.mad, rtol=0, atol=0)
    for name in ("entropy", "prefix_mass", "self_mass"):
        assert result.stat(name).isnan().all(), name
        with pytest.raises(ValueError, match=f"{name}: no recorded layer has a value \\(the statistic is not "
                                             "defined there\\)"):
            result.plot_stat(name, tmp_path / f"{name}.png")
    assert result.prefix_maps.layers == []
    reason = "differential attention (A1 - lambda * A2) is not a probability distribution"
    assert result.prefix_maps.skipped == {0: reason, 1: reason}

    monkeypatch.setattr(vitmad.profiling.models, "load_model", lambda *_, **__: loaded)
    out = tmp_path / "cli"
    assert main(["profile", "--model", "timm:tiny-dwee", "--images", str(images), "--device", "cpu",
                 "--stats", "all", "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "entropy: not defined in any recorded layer" in stdout
    assert f"no maps in 2 layers: {reason}" in stdout
    doc = json.loads((out / "mad.json").read_text())
    assert doc["statistics"]["entropy"]["mean"] == [[None, None], [None, None]]
    _assert_close(_json_rows([layer["mean"] for layer in doc["layers"]]), alone.mad)
    written = {p.name for p in out.iterdir()}
    assert {"mad.json", "mad.csv", "mad.png"} <= written
    assert not {"entropy.png", "prefix_mass.png", "self_mass.png", "prefix_maps.png", "prefix_maps.npz"} & written


@pytest.mark.parametrize("nan_head", [0, 1])
def test_a_head_without_a_value_leaves_its_own_maps_without_one(nan_head, tmp_path, monkeypatch):
    """QA 295: whether a token was present was read from head 0 alone and every NaN summed as 0: a NaN head's mean
    map was 0 (or, head 0 NaN, every head's count 0 and the other heads' means inf); prefix_maps.png's mean over
    heads left the NaN head out. The other heads' maps are the mean of their per-image rows; the NaN head's are
    NaN, as its MAD is in mad.json, and so is the figure's mean over heads."""
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    from vitmad.profiling import plotting

    torch.manual_seed(0)
    model = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(
        hidden_size=16, num_hidden_layers=2, num_attention_heads=4, intermediate_size=32, patch_size=8, image_size=24,
        num_register_tokens=1)).eval()
    with torch.no_grad():  # its queries NaN: what attention overflowing in float16 gives
        model.encoder.layer[1].attention.q_proj.weight[4 * nan_head:4 * nan_head + 4] = float("nan")
    pixels = torch.randn(3, 3, 24, 24)
    result = vitmad.profile(model, pixels, batch_size=2, device="cpu", stats=["prefix_maps"])
    rows = []
    for image in pixels:
        with torch.no_grad(), vitmad.record(model, stats=["prefix_maps"]) as rec:
            model(pixel_values=image[None])
        rows.append(rec.prefix_maps[1][0].double())  # [H, Q, T]
    expected = torch.stack(rows).mean(0).reshape(4, 2, 3, 3)
    assert expected[nan_head].isnan().all() and not expected[[h for h in range(4) if h != nan_head]].isnan().any()
    torch.testing.assert_close(result.prefix_maps.mean(1), expected, rtol=1e-6, atol=1e-9, equal_nan=True)
    drawn = []
    monkeypatch.setattr(plotting, "_save", lambda fig, path, dpi: drawn.append(
        [image.get_array() for ax in fig.axes for image in ax.get_images()]))
    result.plot_prefix_maps(tmp_path / "prefix_maps.png", layers=[1])
    (images,) = drawn
    assert all(np.isnan(np.asarray(shown, dtype=float)).all() for shown in images[-2:])  # tokens 0, 1: heads' mean


def test_an_image_whose_every_head_overflowed_leaves_the_mean_maps_without_a_value():
    """QA 297: NaN in every head and row was read as tokens the image lacks (a masked encoder's), and the image
    left out of the mean maps unsaid, while its MAD made mad.json's NaN."""
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    torch.manual_seed(0)
    model = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(
        hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, patch_size=8, image_size=24,
        num_register_tokens=1)).eval()
    pixels = torch.randn(2, 3, 24, 24)
    pixels[1] *= 1e35  # finite pixels that overflow inside the model: every head NaN
    result = vitmad.profile(model, pixels, device="cpu", stats=["prefix_maps"])
    assert result.mad.isnan().all()
    for layer in result.prefix_maps.layers:
        assert result.prefix_maps.mean(layer).isnan().all()


def test_hieras_mask_unit_layers_say_they_have_no_prefix_token_in_their_windows():
    """Hiera's mask-unit layers (no token without a position anywhere, tokens in the unrolled order, windows of
    mask units) were said to have pooled keys, or no CLS, or tokens that differ between images (QA 352)."""
    timm = pytest.importorskip("timm")
    from vitmad.profiling.prefix_maps import _missing_reason

    model = timm.create_model("hiera_tiny_224", pretrained=False, img_size=64, embed_dim=16, num_heads=1,
                              stages=(1, 1, 1, 1)).eval()
    with torch.no_grad(), vitmad.record(model) as rec:
        model(torch.randn(1, 3, 64, 64))
    reasons = {geometry.attention: _missing_reason(geometry) for geometry in rec.geometry}
    assert reasons["mask units"] == ("no prefix maps: no token without a position (CLS, registers) in its windows "
                                     "(mask units)")
    assert reasons["mask units, queries pooled 2x2"] == ("no prefix maps: the layer's keys are not its queries (mask "
                                                         "units, queries pooled 2x2)")
