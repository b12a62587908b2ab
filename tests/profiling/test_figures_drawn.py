"""What the figures draw, read from matplotlib's own calls (the values handed to ``imshow``, ``step`` and ``plot``):
the MAD maps' colour scale beside a cell without a value, a video profile's per-layer uniform reference, and
compare's mean over each layer's own heads (QA 259)."""

from __future__ import annotations

import math

import pytest
import torch

import vitmad

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")
from matplotlib.axes import Axes  # noqa: E402

from vitmad.profiling import plotting  # noqa: E402


def _spy(monkeypatch, method: str) -> list[tuple[tuple, dict]]:
    """Every call of ``Axes.<method>`` from now on, its arguments kept, the call made."""
    calls, original = [], getattr(Axes, method)

    def spy(self, *args, **kwargs):
        calls.append((args, kwargs))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Axes, method, spy)
    return calls


def _profile(**options) -> vitmad.Profile:
    """A profile of a tiny transformers ViT (2 layers, 2 heads) on 3 random images."""
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    model = ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                               image_size=32, patch_size=8), add_pooling_layer=False).eval()
    return vitmad.profile(model, torch.randn(3, 3, 32, 32), device="cpu", **options)


def test_a_cell_without_a_value_leaves_the_maps_on_the_scale_of_the_others(monkeypatch, tmp_path):
    """One NaN cell (a patch a masked encoder dropped) made both colour limits NaN, and matplotlib drew every map
    on a -0.1 to 0.1 px scale: colours unrelated to their values."""
    shown = _spy(monkeypatch, "imshow")
    maps = [torch.tensor([[12.0, float("nan")], [14.0, 13.0]]), torch.tensor([[9.0, 15.5], [11.0, 10.0]])]
    geometry = [{"grid": [2, 2], "stride": [8.0, 8.0]}] * 2
    plotting.plot_mad_maps(maps, torch.zeros(3, 16, 16), ["a", "b"], tmp_path / "map.png", geometry=geometry)
    overlays = [kwargs for _, kwargs in shown if "vmin" in kwargs]
    assert len(overlays) == 2
    assert all((kwargs["vmin"], kwargs["vmax"]) == (9.0, 15.5) for kwargs in overlays)


def test_maps_and_the_image_under_them_share_their_pixel_edges(monkeypatch, tmp_path):
    """The image was drawn with imshow's default extent (pixel centres at whole numbers: -0.5 to W - 0.5) under maps
    whose cells span 0 to grid * stride: half a pixel apart, a band of bare map along two edges (QA 322)."""
    shown = _spy(monkeypatch, "imshow")
    geometry = {"grid": [2, 3], "stride": [8.0, 8.0]}
    plotting.plot_mad_maps([torch.rand(2, 3)], torch.zeros(3, 16, 24), ["a"], tmp_path / "map.png",
                           geometry=[geometry])
    plotting.plot_image_prefix_maps(torch.rand(2, 1, 2, 3), torch.zeros(3, 16, 24), "a", tmp_path / "prefix.png",
                                    geometry=geometry)
    assert len(shown) == 3 + 1 + 3 * 2  # image, image and map; image, then each head and their mean over it
    assert all(kwargs.get("extent") == (0, 24, 16, 0) for _, kwargs in shown)


def test_a_video_profile_draws_each_layers_own_uniform_reference(monkeypatch, tmp_path):
    """The space-time figure drew the first layer's uniform attention at every depth (a video Swin's stages: 33.3 px
    where the later ones are 27.3)."""
    profile = _profile()
    profile.temporal = profile.stats  # a stand-in for the temporal statistics: the panel's values do not matter
    monkeypatch.setattr(vitmad.Profile, "uniform_mads", property(lambda self: [33.3, 27.3]))
    steps = _spy(monkeypatch, "step")
    lines = _spy(monkeypatch, "axhline")
    plotting.plot_space_time(profile, tmp_path / "mad.png")
    assert not [args for args, _ in lines if args and args[0] == 33.3]
    (args, _), = steps
    assert list(args[0]) == [1, 2] and list(args[1]) == [33.3, 27.3]


def test_compare_averages_each_layers_own_heads_and_keeps_a_nan_head(monkeypatch, tmp_path):
    """A head without a value of its own (attention that overflowed: null in mad.json, whose mean over heads is
    null) was dropped from compare's mean over heads: 344.7 was drawn for a layer mad.json says has none. The
    heads past a layer's count (Swin's early stages) are no heads of it."""
    profile = _profile()
    other = _profile()
    other.stats.total[1, 0] = float("nan")
    plotted = _spy(monkeypatch, "plot")
    labels = _spy(monkeypatch, "set_xlabel")
    plotting.plot_compare([profile, other], ["a", "b"], tmp_path / "cmp.png")
    (_, first), (_, second) = [args for args, _ in plotted]
    torch.testing.assert_close(torch.as_tensor(first), profile.mad.mean(1), rtol=1e-12, atol=0)
    assert math.isclose(float(second[0]), float(profile.mad[0].mean()), rel_tol=1e-12)
    assert math.isnan(float(second[1]))
    # The gap in b's line is said under the axis, as mad.png says it (drawn without a word, QA 413); a without one.
    (xlabel,), _ = labels[-1]
    assert xlabel.replace("\n", " ") == ("Network depth (layer) b: heads without a value (NaN) in layer 2: its mean "
                                         "over heads not drawn")
    plotting.plot_compare([profile], ["a"], tmp_path / "cmp1.png")
    assert labels[-1][0] == ("Network depth (layer)",)
    # A statistic not defined in a layer (self mass beside pooled keys) is said so, as its own figure says it, not
    # as heads without a value (QA 424).
    undefined = _profile(stats="self_mass")
    undefined.statistics["self_mass"].total[0] = float("nan")
    plotting.plot_compare([undefined], ["a"], tmp_path / "cmp2.png", statistic="self_mass")
    (xlabel,), _ = labels[-1]
    assert xlabel.replace("\n", " ") == ("Network depth (layer) a: no value in layer 1: not defined there (keys that "
                                         "are not the queries, such as pooled keys)")
    # A layer of one head beside layers of two: its mean is its one head's.
    monkeypatch.setattr(vitmad.Profile, "heads", property(lambda self: [1, 2]))
    padded = _profile()
    padded.stats.total[0, 1] = float("nan")  # the head layer 0 does not have
    plotted.clear()
    plotting.plot_compare([padded], ["a"], tmp_path / "cmp2.png")
    (_, line), = [args for args, _ in plotted]
    assert math.isclose(float(line[0]), float(padded.mad[0, 0]), rel_tol=1e-12)


def test_a_label_starting_with_an_underscore_is_in_the_legend(tmp_path):
    """matplotlib leaves out of a legend every label that starts with "_": the curve had none (QA 259)."""
    import matplotlib.pyplot as plt

    profile = _profile()
    figures = []
    original = plt.close
    try:
        plt.close = lambda fig=None: figures.append(fig)  # keep the figure to read its legend
        plotting.plot_compare([profile, profile], ["_baseline", "ours"], tmp_path / "cmp.png")
    finally:
        plt.close = original
    legend = figures[0].axes[0].get_legend()
    assert [text.get_text().strip() for text in legend.get_texts()] == ["_baseline", "ours"]
    original(figures[0])


def test_mad_png_gives_every_head_its_own_colour_and_says_which_heads_have_no_value(monkeypatch, tmp_path):
    """Beyond 20 heads the colours repeated (head 20 drawn as head 0, no legend to tell them apart), and a head
    without a value (NaN) left a blank with nothing said (QA 259)."""
    import matplotlib.pyplot as plt

    profile = _profile()
    scattered = _spy(monkeypatch, "scatter")
    monkeypatch.setattr(vitmad.Profile, "mad", property(lambda self: torch.rand(3, 24, dtype=torch.float64) * 20))
    monkeypatch.setattr(vitmad.Profile, "heads", property(lambda self: [24, 24, 24]))
    monkeypatch.setattr(vitmad.Profile, "uniform_mads", property(lambda self: [10.0] * 3))
    plotting.plot_profile(profile, tmp_path / "many.png")
    colours = {tuple(kwargs["color"]) for _, kwargs in scattered}
    assert len(scattered) == len(colours) == 24
    nan_mad = torch.rand(3, 24, dtype=torch.float64)
    nan_mad[1, 5] = float("nan")
    monkeypatch.setattr(vitmad.Profile, "mad", property(lambda self: nan_mad))
    labels = _spy(monkeypatch, "set_xlabel")
    plotting.plot_profile(profile, tmp_path / "nan.png")
    assert "heads without a value (NaN) in layer 2: not drawn" in labels[-1][0][0]
    plt.close("all")


def test_a_profile_of_some_layers_says_its_axis_counts_them_not_the_model_depth(monkeypatch, tmp_path):
    """QA 276: the last layer profiled alone (layers=) was drawn as "layer 1", and compare put it at relative depth
    0 beside the whole model's first layer, with nothing saying so."""
    from vitmad.cli import main

    whole, last = _profile(), _profile(layers=["layers.1.attention"])
    assert [layer["index"] for layer in last.to_dict()["layers"]] == [0]
    labels = _spy(monkeypatch, "set_xlabel")
    last.plot(tmp_path / "last.png")
    assert labels[-1][0][0] == "Profiled layer (of those named in layers=)"
    whole.plot(tmp_path / "whole.png")
    assert labels[-1][0][0] == "Network depth (layer)"
    whole.to_json(tmp_path / "whole.json")
    last.to_json(tmp_path / "last.json")
    with pytest.warns(UserWarning, match="last.json profiled the layers named in layers=: its layers are drawn in "
                                         "the order they ran, which need not be their depth in the model"):
        assert main(["compare", str(tmp_path / "whole.json"), str(tmp_path / "last.json"), "--labels", "whole",
                     "last", "--out", str(tmp_path / "cmp.png")]) == 0
    assert labels[-1][0][0].startswith("Relative depth\nlast: the layers named in layers=, counted in the order "
                                       "they ran")


def test_a_statistic_nan_from_attention_that_overflowed_is_not_called_undefined(tmp_path):
    """QA 292: an image whose finite pixels overflow inside the model makes every mean NaN; plot_stat said the
    statistic "is not defined there", which is said of differential attention."""
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    model = ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                               image_size=32, patch_size=8), add_pooling_layer=False).eval()
    pixels = torch.randn(3, 3, 32, 32)
    pixels[1] *= 1e35
    profile = vitmad.profile(model, pixels, device="cpu", stats="entropy")
    assert profile.mad.isnan().all() and profile.stat("entropy").isnan().all()
    with pytest.raises(ValueError, match=r"entropy: no recorded layer has a value \(every value is NaN, MAD's too: the "
                                         r"attention gave no finite value \(an overflow\?\)\), nothing to draw"):
        profile.plot_stat("entropy", tmp_path / "entropy.png")


def test_a_renormalized_profile_is_marked_in_its_figures_and_comparisons(monkeypatch, tmp_path):
    """QA 290: a --renormalize profile (each query's distance over its attention on patches, at least the plain
    MAD) was drawn beside a plain one, and in its own mad.png, as "Mean attention distance (pixels)" alone."""
    plain, renormalized = _profile(stats="entropy"), _profile(renormalize=True, stats="entropy")
    plotted = _spy(monkeypatch, "plot")
    plotting.plot_compare([plain, renormalized], ["a", "b"], tmp_path / "cmp.png")
    assert [kwargs["label"] for _, kwargs in plotted] == ["a", "b (renormalized)"]
    plotted.clear()  # the other statistics are the same quantity either way: unmarked
    plotting.plot_compare([plain, renormalized], ["a", "b"], tmp_path / "entropy.png", statistic="entropy")
    assert [kwargs["label"] for _, kwargs in plotted] == ["a", "b"]
    labels = _spy(monkeypatch, "set_ylabel")
    renormalized.plot(tmp_path / "mad.png")
    plain.plot(tmp_path / "plain.png")
    assert [args[0] for args, _ in labels] == [
        "Mean attention distance (pixels),\nrenormalized (over the attention on patches)",
        "Mean attention distance (pixels)"]


def test_compare_of_profiles_of_one_depth_ticks_whole_layers(monkeypatch, tmp_path):
    """QA 290: two 2-layer profiles were ticked 1.0, 1.2, ..., 2.0."""
    from matplotlib.figure import Figure

    ticks, save = [], Figure.savefig

    def spy(figure, *args, **kwargs):
        ticks.append(list(figure.axes[0].get_xticks()))
        return save(figure, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", spy)
    plotting.plot_compare([_profile(), _profile()], ["a", "b"], tmp_path / "cmp.png")
    (shown,) = ticks
    assert shown and all(float(tick).is_integer() for tick in shown), shown


def test_figures_say_what_they_leave_out_and_which_panels_have_no_value(monkeypatch, tmp_path):
    """QA 295: the image prefix maps drew 8 of 12 heads and 5 of 7 tokens without a word; a layer of mad_map.png
    without a value was blank, unsaid; a renormalized mad_map.png's colour bar read as the plain MAD's; a NaN head
    left a statistic's figure without the note mad.png has."""
    from matplotlib.figure import Figure

    texts, save = [], Figure.savefig

    def spy(figure, *args, **kwargs):
        texts.append([figure.texts[0].get_text() if figure.texts else ""]
                     + [ax.get_title() for ax in figure.axes] + [ax.get_xlabel() for ax in figure.axes]
                     + [ax.get_ylabel() for ax in figure.axes])
        return save(figure, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", spy)
    pixels, geometry = torch.zeros(3, 16, 16), {"grid": [2, 2], "stride": [8.0, 8.0]}
    plotting.plot_image_prefix_maps(torch.rand(12, 7, 2, 2), pixels, "layer", tmp_path / "a.png", geometry=geometry)
    assert "heads 0-7 of 12 (their mean over all 12), tokens 0-4 of 7" in texts[-1][0].replace("\n", " ")
    nan_head = torch.rand(12, 7, 2, 2)
    nan_head[10] = float("nan")  # a head not drawn, whose NaN blanks the mean panel (QA 297)
    plotting.plot_image_prefix_maps(nan_head, pixels, "layer", tmp_path / "a.png", geometry=geometry)
    assert "a blank map has no value (NaN)" in texts[-1][0].replace("\n", " ")
    maps = [torch.rand(2, 2), torch.full((2, 2), float("nan"))]
    plotting.plot_mad_maps(maps, pixels, ["a", "b"], tmp_path / "b.png", geometry=[geometry] * 2, renormalized=True)
    assert "b\nno value (NaN)" in texts[-1] and "MAD (px), mean over heads, renormalized" in texts[-1]
    profile = _profile(stats="entropy")
    profile.statistics["entropy"].total[1, 0] = float("nan")
    profile.plot_stat("entropy", tmp_path / "entropy.png")
    assert any("heads without a value (NaN) in layer 2: not drawn" in text for text in texts[-1])


def test_a_figure_path_without_a_suffix_gets_savefigs_suffix(tmp_path):
    """Written through a temporary file (QA 322), a path without a suffix lost the .png savefig appends (QA 326)."""
    from matplotlib.figure import Figure

    plotting._save(Figure(), tmp_path / "mad")
    assert [p.name for p in tmp_path.iterdir()] == ["mad.png"]
    assert (tmp_path / "mad.png").read_bytes().startswith(b"\x89PNG")


def test_negative_mad_of_differential_layers_is_on_the_figures(monkeypatch, tmp_path):
    """A differential layer's MAD (A1 - lambda * A2) can be negative; the depth figures and compare clipped the axis
    at 0 and left those layers off with no note (QA 358). The axis now reaches them, and still starts at 0 where
    every value is positive."""
    profile = _profile()
    values = torch.tensor([[12.0, 14.0], [-30.0, -10.0]], dtype=torch.float64)
    monkeypatch.setattr(vitmad.Profile, "mad", property(lambda self: values))
    compared = _profile()
    compared.stats.total[1] = -compared.stats.total[1].abs()  # layer 2's mean over images negative
    limits = _spy(monkeypatch, "set_ylim")
    plotting.plot_profile(profile, tmp_path / "mad.png")
    plotting.plot_compare([compared], ["a"], tmp_path / "cmp.png")
    (low, high), (compare_low, _) = [args for args, _ in limits if len(args) == 2]  # (matplotlib's own: a list)
    assert low <= -30.0 and high >= 14.0
    assert compare_low <= float(compared.stats.total[1].mean()) / compared.count < 0
    monkeypatch.setattr(vitmad.Profile, "mad", property(lambda self: values.abs()))
    limits.clear()
    plotting.plot_profile(profile, tmp_path / "positive.png")
    assert [args[0] for args, _ in limits if len(args) == 2] == [0.0]
