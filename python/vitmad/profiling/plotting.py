"""Figures of ``vitmad profile`` and ``vitmad compare`` (matplotlib, drawn off-screen).

- :func:`plot_profile`: the ViT-paper figure (Dosovitskiy et al. 2021, Fig. 7 right): MAD of every head
  against layer depth, one colour per head, with uniform attention as the reference of a fully global head.
- :func:`plot_statistic`: the same figure for another statistic (``--stats``: entropy, prefix mass, self mass).
- :func:`plot_compare`: several profiles overlaid, mean over heads per layer and the spread of the heads, for
  MAD or another statistic.
- :func:`plot_prefix_maps`: the CLS / register maps of a few layers, mean over images, beside the average input.
- :func:`plot_mad_maps`: per-token MAD of one image for a few layers, over the image.
- :func:`plot_space_time`: video models, spatial MAD (pixels) and temporal MAD (frames) of every head against
  depth, side by side, each layer marked with what it attends over (TimeSformer: time, space).
"""

from __future__ import annotations

import gzip
import os
import textwrap
from collections.abc import Sequence
from pathlib import Path

import torch

from .files import atomic_file
from .options import import_optional

__all__ = ["plot_profile", "plot_statistic", "plot_compare", "plot_mad_maps", "plot_prefix_maps", "plot_space_time",
           "STAT_LABELS"]

# The y axis of each statistic's figures.
STAT_LABELS = {
    "mad": "Mean attention distance (pixels)",
    "entropy": "Attention entropy (nats)",
    "prefix_mass": "Attention on CLS / register tokens",
    "self_mass": "Attention on the query's own token",
    "temporal_mad": "Temporal mean attention distance (frames)",
}


def _wrapped_name(name: str, width: int) -> str:
    """A layer's qualified name on lines of at most ``width`` characters, broken after its dots (a part longer
    than a line is cut into lines of its own): cut short, the names of two layers could read the same
    ("...n_only.1.attn"); left long, a title runs into its neighbour's."""
    lines = [""]
    for part in name.replace(".", ".\0").split("\0"):
        if lines[-1] and len(lines[-1]) + len(part) > width:
            lines.append("")
        while len(part) > width:
            lines[-1], part = part[:width], part[width:]
            lines.append("")
        lines[-1] += part
    return "\n".join(line for line in lines if line)


def _pyplot():
    matplotlib = import_optional("matplotlib", "profile", "drawing figures")

    matplotlib.use("Agg")  # files only: works on machines without a display
    import matplotlib.pyplot as plt

    return plt


def figure_type_refused(path: str | os.PathLike) -> str | None:
    """Why matplotlib cannot write a figure at ``path`` (``"x.txt: cannot write a figure of type .txt; use one of
    ..."``), or None where it can (a path without a suffix is written as PNG, ``.png`` appended, as savefig does)."""
    from matplotlib.backend_bases import FigureCanvasBase

    path = Path(path).expanduser()
    suffix = path.suffix.lower().lstrip(".")
    supported = FigureCanvasBase.get_supported_filetypes()
    if suffix and suffix not in supported:
        return (f"{path}: cannot write a figure of type .{suffix}; use one of "
                f"{', '.join('.' + t for t in sorted(supported))}")
    if suffix == "pgf":  # matplotlib sets PGF's text with a TeX program, found only when the figure is saved
        import shutil

        import matplotlib

        texsystem = matplotlib.rcParams["pgf.texsystem"]
        if shutil.which(texsystem) is None:
            return (f"{path}: a .pgf figure is typeset by {texsystem} (matplotlib's rcParams['pgf.texsystem']), "
                    "which is not installed here; install it or write .pdf or .svg")
    return None


def _save(fig, path, **options) -> None:
    """``fig.savefig`` into ``path``, its folder created as the other outputs' are; a file type matplotlib cannot
    write is a ValueError naming the path and the types it can (checked before drawing to disk)."""
    refused = figure_type_refused(path)
    if refused is not None:
        _pyplot().close(fig)
        raise ValueError(refused)
    path = Path(path).expanduser()
    if not path.suffix:  # as savefig does given a path: rcParams["savefig.format"], its suffix appended (QA 326)
        import matplotlib

        path = path.with_name(f"{path.name}.{matplotlib.rcParams['savefig.format']}")
    # Through a temporary file renamed over the path, as the results are: a Ctrl-C while matplotlib or PIL wrote it
    # left a torn figure that the run had not listed as its own, and every rerun refused it as the user's (QA 322).
    # The format by the suffix, as savefig reads it from a path.
    with atomic_file(path) as handle:
        fig.savefig(handle, format=path.suffix.lower().lstrip("."), **options)


# What marks a figure as written by `vitmad compare`, so that a later comparison at the same --out replaces or
# removes it, and never a user's file that only has its name. Written in each format's metadata (matplotlib
# writes these fields as plain text: PNG tEXt chunks, the PDF Info dictionary, SVG's RDF (gzipped in .svgz), the
# PostScript header; through Pillow, JPEG's and GIF's comment, WebP's and AVIF's XMP, TIFF's description). Raw
# pixels and PGF carry none: a file at their names is never replaced but the one at compare's own --out.
COMPARE_MARK = "vitmad compare"
_MARKED_FIELDS = {"png": "Software", "pdf": "Creator", "svg": "Creator", "svgz": "Creator", "eps": "Creator",
                  "ps": "Creator"}
# Formats matplotlib writes through PIL: the PIL option that keeps a text in the file, as it is (a webp or tif was
# no compare figure to compare itself, so a second comparison at one such path was refused, QA 285).
_PIL_FIELDS = {"jpg": "comment", "jpeg": "comment", "gif": "comment", "webp": "xmp", "avif": "xmp",
               "tif": "description", "tiff": "description"}


def _mark_options(path: str | os.PathLike) -> dict:
    """The ``savefig`` options that write the compare mark in the figure format of ``path`` (by its suffix); empty
    for a format that cannot carry it (.raw, .rgba, .pgf)."""
    suffix = Path(path).suffix.lower().lstrip(".")
    if suffix in _MARKED_FIELDS:
        return {"metadata": {_MARKED_FIELDS[suffix]: COMPARE_MARK}}
    if suffix in _PIL_FIELDS:
        field = _PIL_FIELDS[suffix]
        return {"pil_kwargs": {field: COMPARE_MARK if field == "description" else COMPARE_MARK.encode()}}
    return {}


def marks(path: str | os.PathLike) -> bool:
    """Whether the figure file format of ``path`` (by its suffix) carries the compare mark."""
    return bool(_mark_options(path))


def written_by_compare(path: str | os.PathLike) -> bool:
    """Whether the file at ``path`` is a figure that `vitmad compare` wrote (its mark in the first or last 64 KiB,
    where each format keeps its metadata; a compressed SVG's in its first 64 KiB unpacked)."""
    try:
        if Path(path).suffix.lower() == ".svgz":
            with gzip.open(path, "rb") as file:
                head, tail = file.read(1 << 16), b""
        else:
            with open(path, "rb") as file:
                head = file.read(1 << 16)
                file.seek(max(0, file.seek(0, os.SEEK_END) - (1 << 16)))
                tail = file.read()
    except (OSError, EOFError):  # gzip's BadGzipFile is an OSError; a cut one ends early
        return False
    mark = COMPARE_MARK.encode()
    return mark in head or mark in tail


def _describe_grids(profile) -> str:
    """"14x14 patches of 16 px", or the stages of a hierarchy: "56x56 @ 4 px ... 7x7 @ 32 px"."""
    if profile.geometry is None:
        grid_h, grid_w = profile.layout["grid"]
        return f"{grid_h}x{grid_w} patches of {profile.layout['patch']} px"
    if all(g.get("depth") is not None for g in profile.geometry):  # volumes: voxels of the model input
        stages = [f"{g['depth']}x{g['grid'][0]}x{g['grid'][1]} @ "
                  f"{'x'.join(f'{s:g}' for s in (g['depth_stride'], *g['stride']))} voxels" for g in profile.geometry]
        stages = list(dict.fromkeys(stages))
        return stages[0].replace(" @ ", " tokens of ") if len(stages) == 1 else ", ".join(stages)
    if any(g["grid"] is None for g in profile.geometry):
        grids = {tuple(entry["grid"]) for entry in (profile.image_grids or {}).values()}
        if not grids:  # positions= given by hand: no grid (it said "native resolution, 0 grids", QA 428)
            return "tokens at the positions given"
        return f"native resolution, {len(grids)} grid{'s' if len(grids) != 1 else ''}"
    stages = []
    for g in profile.geometry:
        stride_y, stride_x = g["stride"]
        stride = f"{stride_y:g}" if stride_y == stride_x else f"{stride_y:g}x{stride_x:g}"
        stage = f"{g['grid'][0]}x{g['grid'][1]} @ {stride} px"
        if stage not in stages:
            stages.append(stage)
    if len(stages) == 1:
        return stages[0].replace(" @ ", " tokens of ")
    return ", ".join(stages)


def plot_profile(profile, path: str | os.PathLike, *, title: str | None = None) -> None:
    """Draw MAD per head against layer depth; layers with fewer heads than others show only their own.

    Args:
        profile: a :class:`vitmad.Profile`.
        path: image file to write (``.png``, ``.pdf``, ``.svg``).
    """
    plt = _pyplot()
    fig, ax, depth, num_heads = _heads_against_depth(plt, profile.mad)
    _draw_uniform(ax, profile.uniform_mads, depth, profile.distance_unit)
    _finish_depth_figure(plt, fig, ax, profile, "mad", depth, num_heads, path, title, _nan_heads_note(profile))


def _draw_uniform(ax, uniform: list[float], depth: list[int], unit: str) -> None:
    """The uniform-attention reference per layer (``uniform``, in ``unit``) against depth: one dashed line where
    every layer has the same, else each stage's grid its own (a step); none where no layer has a grid (positions=
    given by hand: its legend named a line not drawn, QA 428)."""
    if all(value != value for value in uniform):
        return
    if len(set(uniform)) == 1:
        ax.axhline(uniform[0], color="0.4", linestyle="--", linewidth=1,
                   label=f"uniform attention ({uniform[0]:.0f} {unit})")
    else:
        ax.step(depth, uniform, where="mid", color="0.4", linestyle="--", linewidth=1,
                label="uniform attention over each layer's grid")


def _heads_against_depth(plt, values: torch.Tensor):
    """A figure with ``values`` ``[L, H_max]`` as one point per head and layer (NaN: not drawn), one colour per
    head; returns ``(fig, ax, depth, num_heads)``."""
    values = values.numpy()
    num_layers, num_heads = values.shape
    fig, ax = plt.subplots(figsize=(6.4 if num_layers <= 24 else 9.6, 4.8))
    colours = _head_colours(plt, num_heads)
    depth = list(range(1, num_layers + 1))
    for head in range(num_heads):
        ax.scatter(depth, values[:, head], s=18 if num_heads <= 12 else 8, color=colours(head),
                   label=f"head {head}" if num_heads <= 16 else None)
    return fig, ax, depth, num_heads


def _head_colours(plt, num_heads: int):
    """One colour per head: matplotlib's qualitative maps up to 20 heads, beyond them as many samples of a
    continuous map (tab20 repeated its colours from head 21 on, for heads no legend names; QA 259)."""
    if num_heads <= 20:
        return plt.get_cmap("tab20" if num_heads > 10 else "tab10")
    return plt.get_cmap("turbo", num_heads)


def _nan_heads_note(profile, values: torch.Tensor | None = None, leave_out: Sequence[int] = ()) -> str | None:
    """Under a figure's axis, the layers where a head of their own has no value of ``values`` (``[L, H]``; MAD by
    default; NaN: attention that overflowed, say): their points are missing, which the figure did not say (QA 259;
    the statistics' and the video figures', QA 295). ``leave_out``: layers (1-based) another note names."""
    values = profile.mad if values is None else values
    layers = [i + 1 for i, heads in enumerate(profile.heads)
              if i + 1 not in leave_out and bool(values[i, :heads].isnan().any())]
    if not layers:
        return None
    return f"heads without a value (NaN) in layer{'s' if len(layers) > 1 else ''} {_spans(layers)}: not drawn"


def _depth_label(profile) -> str:
    """The depth axis' name: a profile of the layers named in ``layers=`` (``Profile.layers_named``) counts them in
    the order they ran, not at their depth in the model (its last layer alone was drawn as "layer 1" unsaid, QA
    276)."""
    return "Profiled layer (of those named in layers=)" if profile.layers_named else "Network depth (layer)"


def renormalized(profile) -> bool:
    """Whether ``profile``'s MAD (and temporal MAD) is renormalized: a quantity of its own, at least the plain MAD,
    which its figures and comparisons say (QA 290: drawn beside a plain profile without a word)."""
    return bool(profile.settings.get("renormalize"))


def _from_zero(ax) -> None:
    """The y axis from 0, or from below it where a value is negative: a differential layer's MAD (A1 - lambda * A2)
    can be, and was left off the figure, with no note (QA 358)."""
    low, high = ax.get_ylim()
    ax.set_ylim(min(0.0, low), max(0.0, high))


def _finish_depth_figure(plt, fig, ax, profile, statistic: str, depth: list[int], num_heads: int, path,
                         title: str | None, note: str | None = None) -> None:
    ax.set_xlabel(_depth_label(profile) + ("" if note is None else "\n" + textwrap.fill(note, 72)))
    label = STAT_LABELS.get(statistic, statistic)
    if statistic == "mad" and profile.distance_unit != "px":  # volumes
        label = f"Mean attention distance ({'millimetres' if profile.distance_unit == 'mm' else 'voxels'})"
    if statistic in ("mad", "temporal_mad") and renormalized(profile):
        label += ",\nrenormalized (over the attention on patches)"
    ax.set_ylabel(label)
    ax.set_xticks(depth if len(depth) <= 24 else depth[::max(1, len(depth) // 12)])
    _from_zero(ax)
    # (a packed tower's clips were "images", QA 295)
    ax.set_title(title or textwrap.fill(f"{profile.model}: {profile.count} {profile.input_kind}, "
                                        f"{_describe_grids(profile)}",
                                        80), fontsize=10 if profile.geometry is None else 8)
    if ax.get_legend_handles_labels()[0]:  # heads are labelled up to 16 of them; else nothing to list
        ax.legend(fontsize=7, ncol=2 if num_heads > 8 else 1, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    _save(fig, path, dpi=150)
    plt.close(fig)


def plot_statistic(profile, statistic: str, path: str | os.PathLike, *, title: str | None = None) -> None:
    """Draw a statistic other than MAD (``"entropy"``, ``"prefix_mass"``, ``"self_mass"``) per head against layer
    depth, like :func:`plot_profile`; a layer without a value (self mass beside pooled keys) has no points.

    Args:
        profile: a :class:`vitmad.Profile` that has ``statistic`` (``profile.stat_names``).
        path: image file to write (``.png``, ``.pdf``, ``.svg``).

    Raises:
        KeyError: the statistic was not profiled.
        ValueError: no layer has a value of it (differential attention has none), so there is nothing to draw.
    """
    values = profile.stat(statistic)
    if not profile.has_values(statistic):
        # Undefined (every statistic but MAD of differential attention) or NaN where MAD is too: attention that
        # gave no finite value, an overflow say, which "not defined there" misnamed (QA 292).
        why = ("every value is NaN, MAD's too: the attention gave no finite value (an overflow?)"
               if not bool(profile.mad.isfinite().any()) else "the statistic is not defined there")
        raise ValueError(f"{statistic}: no recorded layer has a value ({why}), nothing to draw")
    plt = _pyplot()
    fig, ax, depth, num_heads = _heads_against_depth(plt, values)
    if statistic in ("prefix_mass", "self_mass"):
        ax.set_ylim(top=max(1e-3, float(values.nan_to_num(0).max()) * 1.05))
    empty = [layer + 1 for layer in range(values.shape[0]) if bool(values[layer].isnan().all())]
    notes = []
    if empty:  # said on the figure, under the axis: a blank column is no zero
        why = " (keys that are not the queries, such as pooled keys)" if statistic == "self_mass" else ""
        notes.append(f"no value in layer{'s' if len(empty) > 1 else ''} {_spans(empty)}: not defined there{why}")
    notes.append(_nan_heads_note(profile, values, empty))
    note = "; ".join(n for n in notes if n) or None
    _finish_depth_figure(plt, fig, ax, profile, statistic, depth, num_heads, path, title, note)


def _spans(numbers: list[int]) -> str:
    """[1, 2, 3, 5] -> "1-3, 5"."""
    spans, start = [], numbers[0]
    for previous, number in zip(numbers, numbers[1:] + [None]):
        if number is None or number != previous + 1:
            spans.append(f"{start}-{previous}" if previous != start else f"{start}")
            start = number
    return ", ".join(spans)


# The longest kind of attention named under a layer's tick (TimeSformer's "time", "space", "space-time").
_KIND_LABEL_CHARS = 12


def plot_space_time(profile, path: str | os.PathLike, *, title: str | None = None) -> None:
    """Draw a video model's spatial MAD (pixels) and temporal MAD (frames) per head against layer depth.

    Args:
        profile: a :class:`vitmad.Profile` with ``temporal`` statistics.
        path: image file to write (``.png``, ``.pdf``, ``.svg``).
    """
    plt = _pyplot()
    marked = ", renormalized" if renormalized(profile) else ""
    panels = ((profile.mad, f"Spatial MAD (pixels){marked}"), (profile.temporal_mad, f"Temporal MAD (frames){marked}"))
    num_layers, num_heads = panels[0][0].shape
    fig, axes = plt.subplots(1, 2, figsize=(11 if num_layers <= 24 else 14, 4.8))
    colours = _head_colours(plt, num_heads)
    depth = list(range(1, num_layers + 1))
    kinds = [g["attention"] for g in profile.geometry] if profile.geometry else []
    for ax, (values, label) in zip(axes, panels):
        for head in range(num_heads):
            ax.scatter(depth, values[:, head].numpy(), s=18 if num_heads <= 12 else 8, color=colours(head),
                       label=f"head {head}" if num_heads <= 16 else None)
        note = _nan_heads_note(profile, values)
        ax.set_xlabel(_depth_label(profile) + ("" if note is None else "\n" + textwrap.fill(note, 60)))
        ax.set_ylabel(label)
        ticks = depth if num_layers <= 24 else depth[::max(1, num_layers // 12)]
        ax.set_xticks(ticks)
        # Divided attention (TimeSformer's "time" and "space"): each shown tick names its layer's kind. A longer
        # description (MViT's poolings) is no label: side by side under every tick, they ran into each other.
        if len(set(kinds)) > 1 and all(len(kind) <= _KIND_LABEL_CHARS for kind in kinds):
            ax.set_xticklabels([f"{d}\n{kinds[d - 1]}" for d in ticks], fontsize=6)
        if ax is axes[0]:  # before the limits are set: above every head, it was left off the plot
            # Each layer's own: the first layer's was drawn at every depth (a video Swin's stages; QA 259).
            _draw_uniform(ax, profile.uniform_mads, depth, "px")
        _from_zero(ax)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, ncol=2 if num_heads > 8 else 1, loc="lower right")
    fig.suptitle(title or textwrap.fill(f"{profile.model}: {profile.count} videos, {_describe_grids(profile)}", 100),
                 fontsize=9)
    fig.tight_layout()
    _save(fig, path, dpi=150)
    plt.close(fig)


def plot_compare(profiles: Sequence, labels: Sequence[str], path: str | os.PathLike, *,
                 statistic: str = "mad") -> None:
    """Overlay profiles: per layer the mean over heads (line) and the range of the heads (band).

    Depth is drawn relative (first layer 0, last 1) when the models have different numbers of layers; layers
    with fewer heads than others use their own heads only.

    Args:
        statistic: ``"mad"``, or another statistic every profile has (``profile.stat_names``); a layer without a
            value leaves a gap.

    Raises:
        KeyError: a profile lacks ``statistic``.
        ValueError: no profile, not one label per profile, or MAD in different units (pixels of images, a volume
            profile's millimetres or voxels): one axis cannot hold them.
    """
    if len(profiles) == 0 or len(labels) != len(profiles):
        raise ValueError(f"plot_compare: expected one label per profile and at least one profile, got "
                         f"{len(profiles)} profile(s) and {len(labels)} label(s)")
    units = {profile.distance_unit for profile in profiles}
    if statistic == "mad" and len(units) > 1:  # the temporal MAD is in frames for every profile
        shown = ", ".join(f"{label}: {profile.distance_unit}" for label, profile in zip(labels, profiles))
        raise ValueError(f"plot_compare: the profiles' MAD is in different units ({shown}); compare profiles of one "
                         "unit (a volume profile's --volume-unit mm or voxel, images' pixels)")
    values = [profile.stat(statistic) for profile in profiles]
    # Each layer's own heads: those past a layer's count (Swin's early stages) are padding, but a head of its own
    # that is NaN (attention that overflowed) makes its layer's mean NaN, as in mad.json, not dropped from it (QA
    # 259: 344.7 drawn for a layer whose mean_over_heads is null).
    heads = [profile.heads for profile in profiles]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    same_depth = len({v.shape[0] for v in values}) == 1
    notes = []
    for per_head, label, own, profile in zip(values, labels, heads, profiles):
        padding = torch.arange(per_head.shape[1])[None, :] >= torch.tensor(own)[:, None]
        missing = per_head.isnan()
        # A layer whose mean is NaN leaves a gap in its line, said under the axis as the depth figures say it (a
        # run with an overflowed head was drawn without a word, QA 413); a profile without any value says so in
        # the legend.
        empty = []
        if not bool(missing.all()) and statistic not in ("mad", "temporal_mad"):
            # A statistic not defined in some layers (self mass beside pooled keys) is said so, as its own figure
            # says it, not as heads without a value (QA 424).
            empty = [layer + 1 for layer in range(per_head.shape[0]) if bool(missing[layer].all())]
            if empty:
                why = " (keys that are not the queries, such as pooled keys)" if statistic == "self_mass" else ""
                notes.append(f"{label.strip()}: no value in layer{'s' if len(empty) > 1 else ''} {_spans(empty)}: "
                             f"not defined there{why}")
        note = None if bool(missing.all()) else _nan_heads_note(profile, per_head, empty)
        if note is not None:
            notes.append(f"{label.strip()}: {note.replace('not drawn', 'its mean over heads not drawn')}")
        num_layers = per_head.shape[0]
        x = torch.arange(1, num_layers + 1, dtype=torch.float64)
        if not same_depth:
            x = (x - 1) / max(num_layers - 1, 1)
        if bool(missing.all()):  # in the legend all the same, saying why it has no points
            label = f"{label} (no values: not defined in its layers)"
        elif statistic in ("mad", "temporal_mad") and renormalized(profile):
            label = f"{label} (renormalized)"
        if label.startswith("_"):  # matplotlib leaves such labels out of the legend (QA 259): a space before it
            label = " " + label
        mean = per_head.masked_fill(padding, 0.0).sum(1) / torch.tensor(own, dtype=per_head.dtype)
        line = ax.plot(x, mean, marker="o", markersize=3, label=label)[0]
        # A layer without any value gets no band (NaN), rather than an infinite one.
        empty = missing.all(1)
        ax.fill_between(x, per_head.masked_fill(missing, float("inf")).amin(1).masked_fill(empty, float("nan")),
                        per_head.masked_fill(missing, float("-inf")).amax(1).masked_fill(empty, float("nan")),
                        color=line.get_color(), alpha=0.2)
    subsets = [label for label, profile in zip(labels, profiles) if profile.layers_named]
    if subsets:
        notes.insert(0, f"{', '.join(subsets)}: the layers named in layers=, counted in the order they ran, not at "
                        "the model's depth")
    ax.set_xlabel(("Network depth (layer)" if same_depth else "Relative depth")
                  + "".join("\n" + textwrap.fill(note, 72) for note in notes))
    if same_depth:  # layers are counted: 1, 2, not 1.0, 1.2, ... (QA 290)
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    unit = next(iter(units))
    ax.set_ylabel(f"Mean attention distance ({'millimetres' if unit == 'mm' else 'voxels'})"
                  if statistic == "mad" and unit != "px" else STAT_LABELS.get(statistic, statistic))
    _from_zero(ax)
    ax.set_title("Mean over heads (line) and range of heads (band)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    _save(fig, path, dpi=150, **_mark_options(path))
    plt.close(fig)


def plot_mad_maps(
    maps: Sequence[torch.Tensor],
    pixels: torch.Tensor,
    names: Sequence[str],
    path: str | os.PathLike,
    *,
    geometry: Sequence[dict],
    mean: Sequence[float] = (0.5, 0.5, 0.5),
    std: Sequence[float] = (0.5, 0.5, 0.5),
    renormalized: bool = False,
) -> None:
    """Draw per-token MAD maps over the image, each at its layer's resolution.

    Args:
        maps: ``K`` maps ``[grid_h, grid_w]``: MAD per query token (mean over heads), in pixels.
        pixels: ``[3, H, W]`` the normalised model input, shown underneath.
        names: the ``K`` layers' names.
        geometry: the ``K`` layers' geometry (``grid`` and ``stride`` in pixels: a map covers ``grid * stride``
            pixels of the image).
        mean, std: the normalisation to undo for display.
        renormalized: the maps are renormalized MAD (``mad_maps(renormalize=True)``), which the colour bar says.
    """
    plt = _pyplot()
    image = pixels.float().cpu() * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]
    image = image.clamp(0, 1).permute(1, 2, 0).numpy()
    # Pixel edges at whole numbers, as the maps' cells: drawn by its default, pixel centres there, the image sat half
    # a pixel up and left of the maps over it (QA 322).
    edges = (0, image.shape[1], image.shape[0], 0)
    count = len(maps)
    fig, axes = plt.subplots(1, count + 1, figsize=(2.6 * (count + 1) + 0.8, 3.0), layout="constrained")
    axes[0].imshow(image, extent=edges)
    axes[0].set_title("input")
    # Over the cells with a value: one NaN cell (a masked patch) made both limits NaN, and matplotlib drew the maps
    # on a -0.1 to 0.1 px scale, colours unrelated to their values (QA 259).
    finite = [m[m.isfinite()] for m in maps]
    values = torch.cat([f.flatten().float() for f in finite]) if finite else torch.zeros(0)
    low, high = (float(values.min()), float(values.max())) if values.numel() else (0.0, 1.0)
    for ax, layer_map, name, layer in zip(axes[1:], maps, names, geometry):
        stride_y, stride_x = layer["stride"]
        ax.imshow(image, extent=edges)
        shown = ax.imshow(layer_map.numpy(), cmap="viridis", alpha=0.55, vmin=low, vmax=high,
                          extent=(0, layer_map.shape[1] * stride_x, layer_map.shape[0] * stride_y, 0),
                          interpolation="nearest")
        # A layer whose cells have no value (a head's attention that overflowed) is blank: said (QA 295).
        blank = "" if bool(layer_map.isfinite().any()) else "\nno value (NaN)"
        ax.set_title(_wrapped_name(name, 28) + blank, fontsize=8)
    for ax in axes:
        ax.axis("off")
    fig.colorbar(shown, ax=list(axes), shrink=0.9,
                 label="MAD (px), mean over heads" + (", renormalized" if renormalized else ""))
    _save(fig, path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def plot_image_prefix_maps(
    maps: torch.Tensor,
    pixels: torch.Tensor,
    name: str,
    path: str | os.PathLike,
    *,
    geometry: dict,
    mean: Sequence[float] = (0.5, 0.5, 0.5),
    std: Sequence[float] = (0.5, 0.5, 0.5),
    max_tokens: int = 5,
    max_heads: int = 8,
) -> None:
    """Draw, over one image, where each head's CLS and register tokens look at one layer (DINO's figure): a row per
    token without a position, a column per head, then their mean.

    Each map has its own colour scale: heads differ by orders of magnitude in how sharp their map is.

    Args:
        maps: ``[H, Q, grid_h, grid_w]`` attention of the ``Q`` prefix tokens over the grid, per head.
        pixels: ``[3, H, W]`` the normalised model input, shown underneath.
        name: the layer's name; geometry: its ``grid`` and ``stride`` in pixels.
        mean, std: the normalisation to undo for display.
        max_tokens, max_heads: draw at most this many tokens (rows) and heads (columns).
    """
    plt = _pyplot()
    image = pixels.float().cpu() * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]
    image = image.clamp(0, 1).permute(1, 2, 0).numpy()
    heads, tokens = min(maps.shape[0], max_heads), min(maps.shape[1], max_tokens)
    stride_y, stride_x = geometry["stride"]
    extent = (0, maps.shape[-1] * stride_x, maps.shape[-2] * stride_y, 0)
    edges = (0, image.shape[1], image.shape[0], 0)  # the image's pixel edges, as the maps' (plot_mad_maps)
    fig, axes = plt.subplots(tokens, heads + 2, figsize=(1.9 * (heads + 2), 1.9 * tokens + 0.5), squeeze=False,
                             layout="constrained")
    for row in range(tokens):
        axes[row, 0].imshow(image, extent=edges)
        axes[row, 0].set_title("input" if row == 0 else "", fontsize=8)
        axes[row, 0].set_ylabel(f"token {row}", fontsize=8)
        shown = [maps[h, row] for h in range(heads)] + [maps[:, row].mean(0)]
        titles = [f"head {h}" for h in range(heads)] + ["mean of heads"]
        for column, (token_map, title) in enumerate(zip(shown, titles), start=1):
            ax = axes[row, column]
            ax.imshow(image, extent=edges)
            ax.imshow(token_map.numpy(), cmap="inferno", alpha=0.6, extent=extent, interpolation="nearest")
            ax.set_title(title if row == 0 else "", fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    # What is left out is said (QA 295: 8 of 12 heads and 5 of 7 tokens drawn without a word), and blank maps.
    shown_part = []
    if heads < maps.shape[0]:
        shown_part.append(f"heads 0-{heads - 1} of {maps.shape[0]} (their mean over all {maps.shape[0]})")
    if tokens < maps.shape[1]:
        shown_part.append(f"tokens 0-{tokens - 1} of {maps.shape[1]}")
    drawn = torch.cat([maps[:heads, :tokens], maps[:, :tokens].mean(0, keepdim=True)])  # the mean is over all heads
    if bool(drawn.flatten(-2).isnan().all(-1).any()):
        shown_part.append("a blank map has no value (NaN)")
    # Which of them is a CLS token is the model's business (a register-only ViT has none): their order is known.
    fig.suptitle(textwrap.fill(f"{name}: attention of each token without a position (class, distillation or register "
                               "tokens, in sequence order; a pooling head's queries) over the image"
                               + (f"; {', '.join(shown_part)}" if shown_part else ""), 100), fontsize=9)
    _save(fig, path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot_prefix_maps(profile, path: str | os.PathLike, *, layers: Sequence[int] | None = None,
                     max_tokens: int = 8) -> None:
    """Draw where the tokens without a position (CLS, registers) look: per prefix token (rows) and chosen layer
    (columns) its attention over the layer's grid, mean over images and heads, beside the average input image.

    Each map has its own colour scale (a register's map can be orders of magnitude sharper than CLS's); the
    value range is in its title.

    Args:
        profile: a :class:`vitmad.Profile` profiled with ``stats=[..., "prefix_maps"]``.
        path: image file to write.
        layers: indices of ``profile.map_layers`` (the layers, then the class-attention layers) among those with
            maps; by default the first, middle and last of them.
        max_tokens: draw at most this many prefix tokens (rows), in token order.

    Raises:
        ValueError: no prefix maps, no layer with a mean map, or a chosen layer without one.
    """
    profile.check_prefix_maps()
    maps = profile.prefix_maps
    maps.check_layers()
    if layers is None:
        found = maps.layers
        layers = sorted({found[0], found[len(found) // 2], found[-1]})
    maps.check_layers(layers)
    plt = _pyplot()
    # [Q, gh, gw], mean over heads: a head without a value (attention that overflowed) leaves its layer's maps
    # without one, as in mad.json (QA 295: the other heads' mean was drawn as the mean over heads).
    means = {layer: maps.mean(layer).mean(0) for layer in layers}
    tokens = min(max_tokens, max(m.shape[0] for m in means.values()))
    fig, axes = plt.subplots(tokens, len(layers) + 1, figsize=(2.4 * (len(layers) + 1), 2.4 * tokens + 0.4),
                             squeeze=False, layout="constrained")
    image = _displayable(maps.mean_pixels, profile.settings.get("preprocessing"))
    for row in range(tokens):
        axes[row, 0].axis("off")
    if image is not None:
        axes[0, 0].imshow(image)
        axes[0, 0].set_title(f"mean input ({maps.pixels_count} images)", fontsize=8)
    for column, layer in enumerate(layers, start=1):
        geometry = profile.map_geometry
        stride = geometry[layer]["stride"] if geometry else [profile.layout["patch"]] * 2
        for row in range(tokens):
            ax = axes[row, column]
            ax.axis("off")
            if row >= means[layer].shape[0]:
                continue
            token_map = means[layer][row]
            grid_h, grid_w = token_map.shape
            ax.imshow(token_map.numpy(), cmap="viridis", interpolation="nearest",
                      extent=(0, grid_w * stride[1], grid_h * stride[0], 0))
            name = profile.map_layers[layer]
            wrapped = _wrapped_name(name, 24)
            finite = token_map[token_map.isfinite()]
            shown = (f"{float(finite.min()):.2g} to {float(finite.max()):.2g}" if finite.numel() else
                     "no value (NaN: a head's attention, or no image with the token)")
            ax.set_title(f"{wrapped}\ntoken {row}: {shown}", fontsize=7)
    fig.suptitle(textwrap.fill(f"{profile.model}: attention of the tokens without a position (rows, in token "
                               "order; a class-attention or pooling layer's queries) over the grid, mean over images "
                               "and heads", 90), fontsize=8)
    _save(fig, path, dpi=120)
    plt.close(fig)


def _displayable(pixels: torch.Tensor | None, preprocessing: dict | None):
    """``[H, W, 3]`` in [0, 1] for ``imshow``: the normalisation undone when known, else stretched to [0, 1]."""
    if pixels is None or pixels.dim() != 3 or pixels.shape[0] != 3:
        return None
    image = pixels.float()
    if preprocessing and "mean" in preprocessing and "std" in preprocessing:
        std, mean = (torch.tensor(preprocessing[key])[:, None, None] for key in ("std", "mean"))
        image = image * std + mean
    else:
        image = (image - image.min()) / (image.max() - image.min()).clamp_min(1e-12)
    return image.clamp(0, 1).permute(1, 2, 0).numpy()
