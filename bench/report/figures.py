"""Matplotlib figures of the report, one per panel, returned as inline SVG text.

Figures are drawn from aggregated tables (one row per panel, series and length), never from raw
rows. Matplotlib escapes the text it writes into SVG; ``_text`` additionally keeps names from results
out of mathtext (a ``$`` in a name would otherwise be parsed as a formula).
"""

from __future__ import annotations

import functools
import io
import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import ParamSpec

import matplotlib

matplotlib.use("Agg")  # no display, no GUI toolkit: the report is rendered headless
import matplotlib.colors as mcolors  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib import ticker  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.font_manager import FontProperties  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.textpath import text_to_path  # noqa: E402

from .analysis import BASELINE_FAMILY, times  # noqa: E402
from .reference import Reference  # noqa: E402

P = ParamSpec("P")

# Distinct hues for variants (tab10 without its grey, then darker and off hues that stay apart from
# it); greys are kept for baselines, so "dashed grey" always means baseline.
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#bcbd22",
           "#17becf", "#000075", "#800000", "#469990", "#f032e6", "#808000", "#e6ab02", "#5e81ac",
           "#fb8072", "#4d9221", "#6a3d9a", "#b15928")
GREYS = ("#111111", "#6e6e6e", "#a0a0a0", "#3d3d3d", "#888888")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "h")
REFERENCE_COLORS = ("#7a0177", "#c51b8a", "#f768a1", "#49006a")
MIB = float(1 << 20)
# Layout, in inches: margins around axes (room for tick labels and axis labels) and plot sizes.
LEFT, BOTTOM, TOP, GAP = 0.85, 0.6, 0.35, 0.3
PLOT_WIDTH, PLOT_HEIGHT, WIDE_PLOT = 4.3, 3.0, 8.4
CELL_HEIGHT, MAP_COLUMN, MAP_MIN, MAP_MAX = 0.27, 0.75, 3.0, 4.6
COLORBAR = 0.9  # gap, bar and its tick labels after each heat map
TICK_ROOM = 0.25  # height one colour-bar tick label needs, with air around it
LEGEND_HANDLE, LEGEND_ROWS = 2.6, 24
# Heat-map cells get their value written in them while they are wide enough to hold it (beyond,
# colour only: the numbers would overlap, and each is a text to lay out).
ANNOTATE_COLUMNS = 10

RC = {"font.size": 9, "axes.titlesize": 10, "axes.labelsize": 9, "legend.fontsize": 8,
      "xtick.labelsize": 8, "ytick.labelsize": 8, "axes.spines.top": False, "axes.spines.right": False,
      "axes.grid": True, "grid.color": "#e6e6e6", "grid.linewidth": 0.6, "svg.fonttype": "none",
}


@dataclass(frozen=True)
class Style:
    color: str
    marker: str
    dashed: bool


def legend_key(series: str, family: str) -> tuple:
    """Legend and table order: baselines, then standard attention, then the rest; names in natural
    order (variant-2 before variant-10)."""
    rank = {BASELINE_FAMILY: 0, "standard": 1}.get(family, 2)
    return rank, [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", series)]


def legend_order(series: Iterable[str], families: Iterable[str]) -> dict[str, str]:
    """Each series' family, in legend order (what ``styles`` takes); ``series`` and ``families`` pair up."""
    return dict(sorted(zip(series, families, strict=True), key=lambda sf: legend_key(*sf)))


def styles(family_of: dict[str, str], baseline: str | None) -> dict[str, Style]:
    """One style per series for the whole report, so a series looks the same in every figure.
    ``family_of`` maps each series to its family, in legend order. The baseline set is drawn dashed
    (in greys for the baseline family)."""
    result, greys, colours = {}, 0, 0
    for name, family in family_of.items():
        if family == BASELINE_FAMILY:
            colour, index, greys = GREYS[greys % len(GREYS)], greys, greys + 1
        else:
            colour, index, colours = PALETTE[colours % len(PALETTE)], colours, colours + 1
        # The marker changes each time the colours wrap, so no two series look the same.
        marker = MARKERS[(index // len(PALETTE) + index) % len(MARKERS)]
        result[name] = Style(colour, marker, family == BASELINE_FAMILY or name == baseline)
    return result


def _text(value: object) -> str:
    return str(value).replace("$", r"\$")


def length_label(n: float) -> str:
    """128, 1k, 64k, 4M: short enough for a tick."""
    n = int(n)
    for shift, unit in ((20, "M"), (10, "k")):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return f"{n:,}"


def _svg(fig: Figure) -> str:
    """The figure as an inline ``<svg>`` element: XML prologue, DOCTYPE and namespace URLs dropped (an
    inline SVG in HTML needs none of them, and the page references no network address)."""
    buffer = io.StringIO()
    fig.savefig(buffer, format="svg", metadata={"Date": None, "Creator": None, "Format": None, "Type": None})
    text = buffer.getvalue()
    text = text[text.index("<svg"):]
    return re.sub(r'\s+xmlns(:xlink)?="[^"]*"', "", text, count=2)


def _styled(draw: Callable[P, str]) -> Callable[P, str]:
    """Draw (and save) under the report's rc settings, without touching the global ones."""
    @functools.wraps(draw)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> str:
        with matplotlib.rc_context(RC):
            return draw(*args, **kwargs)

    return wrapper


class Canvas:
    """A figure laid out in inches by hand. A layout engine (constrained, tight) measures every
    artist in an extra pass, which doubled the time of a report; here the only sizes that vary —
    label widths and legend length — are measured once, and the figure grows to fit them."""

    def __init__(self, width: float, height: float) -> None:
        self.width, self.height = width, height
        self.fig = Figure(figsize=(width, height))

    def axes(self, left: float, bottom: float, width: float, height: float):
        return self.fig.add_axes((left / self.width, bottom / self.height, width / self.width,
                                  height / self.height))

    def legend(self, handles: list, labels: list[str]) -> None:
        """At the right edge, outside the axes (it never covers data); the canvas was made wide enough
        by ``legend_size``."""
        left = self.width - legend_size(labels)[0]
        self.fig.legend(handles, labels, loc="upper left", frameon=False, ncols=_legend_columns(labels),
                        handlelength=LEGEND_HANDLE, borderaxespad=0,
                        bbox_to_anchor=(left / self.width, 1 - TOP / self.height))


def text_width(labels: Iterable[str], size: float) -> float:
    """Width in inches of the widest label at ``size`` points."""
    prop = FontProperties(size=size)
    widths = [text_to_path.get_text_width_height_descent(label, prop, ismath=False)[0] for label in labels]
    return max(widths, default=0.0) / 72


def _legend_columns(labels: list[str]) -> int:
    return 1 if len(labels) <= LEGEND_ROWS else 2


def legend_size(labels: list[str]) -> tuple[float, float]:
    """(width, height) in inches of the legend ``Canvas.legend`` draws for these labels."""
    size = RC["legend.fontsize"]
    columns = _legend_columns(labels)
    entry = (LEGEND_HANDLE + 0.8 + 2.0) * size / 72 + text_width(labels, size)  # handle, pad, gap
    rows = math.ceil(len(labels) / columns)
    return columns * entry, rows * 1.5 * size / 72


def _length_axis(ax, lengths: Iterable[float], label: str = "sequence length n (tokens)") -> None:
    """log₂ x axis with a tick at each measured length (or other power-of-two-ish count) when there
    are few of them."""
    lengths = sorted(set(lengths))
    ax.set_xscale("log", base=2)
    if len(lengths) <= 12:
        ax.set_xticks(lengths, [length_label(n) for n in lengths])
        ax.xaxis.set_minor_locator(ticker.NullLocator())
    else:
        ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: length_label(v)))
        ax.xaxis.set_minor_formatter(ticker.NullFormatter())
    ax.set_xlabel(label)


class PlainLogFormatter(ticker.LogFormatter):
    """LogFormatter's choice of which ticks to label, written as plain numbers (0.01, 300, 1e+06):
    easier to read than 1e-02, and cheaper to lay out than the default mathtext labels."""

    def __call__(self, x: float, pos: int | None = None) -> str:
        return f"{x:g}" if super().__call__(x, pos) else ""


def _plain_log_labels(axis) -> None:
    axis.set_major_formatter(PlainLogFormatter())
    axis.set_minor_formatter(PlainLogFormatter(labelOnlyBase=False))


def _log_y(ax) -> None:
    ax.set_yscale("log")
    _plain_log_labels(ax.yaxis)


def _log_log(plots: Iterable[tuple[Axes, str, str]], lengths: Iterable[float],
             x_label: str = "sequence length n (tokens)") -> None:
    """Each (axes, y label, title) log–log against ``lengths``, titled at the left."""
    lengths = list(lengths)  # an iterator would be used up by the first axes
    for ax, label, title in plots:
        _length_axis(ax, lengths, x_label)
        _log_y(ax)
        ax.set_ylabel(label)
        ax.set_title(title, loc="left")


def _percent_axis(ax: Axes, full_scale: float, label: str) -> None:
    """A right-hand axis of % of ``full_scale`` (a device's peak or bandwidth)."""
    right = ax.secondary_yaxis("right", functions=(lambda v: 100 * v / full_scale, lambda p: p * full_scale / 100))
    _plain_log_labels(right.yaxis)
    right.set_ylabel(label)


def _series_lines(ax, data: pd.DataFrame, column: str, style_of: dict[str, Style], timed: bool,
                  scale: float = 1.0, spread: tuple[str, str] | None = None,
                  x: str = "seq_len") -> dict[str, Line2D]:
    """One line per series (median) against column ``x``, optional p20–p80 bars; for a ``timed``
    quantity, hollow markers on noisy points (memory is measured once, deterministically) and a cross
    on launch-bound ones."""
    data = data.dropna(subset=[column]).sort_values(["series", x])
    handles = {}
    for series, group in data.groupby("series", sort=False):
        style = style_of[series]
        x_values, y = group[x].to_numpy(), group[column].to_numpy() / scale
        (line,) = ax.plot(x_values, y, color=style.color, linestyle=(0, (4, 2)) if style.dashed else "-",
                          linewidth=1.4, marker=style.marker, markersize=4.5, zorder=3 if style.dashed else 2)
        noisy = group["noisy"].to_numpy(dtype=bool) & timed
        if noisy.any():  # redrawn hollow on top, so they stand out without a legend entry
            ax.plot(x_values[noisy], y[noisy], linestyle="none", marker=style.marker, markersize=6,
                    markerfacecolor="white", markeredgecolor=style.color, zorder=4)
        launch_bound = group["launch_bound"].to_numpy(dtype=bool) & timed
        if launch_bound.any():
            ax.plot(x_values[launch_bound], y[launch_bound], linestyle="none", marker="x", markersize=7,
                    color="#222222", markeredgewidth=1.1, zorder=5)
        handles[series] = line
    if spread:  # one collection for every series' bars: one artist instead of one per series
        colours = [style_of[s].color for s in data["series"]]
        ax.vlines(data[x], data[spread[0]] / scale, data[spread[1]] / scale, colors=colours,
                  linewidth=0.9, alpha=0.7, zorder=2)
    return handles


def _drawn(data: pd.DataFrame, order: Sequence[str]) -> list[str]:
    """The series of ``data``, in legend order."""
    present = set(data["series"])
    return [s for s in order if s in present]


def _legend_entries(handles: dict[str, Line2D], order: Sequence[str]) -> tuple[list, list[str]]:
    names = [s for s in order if s in handles]
    return [handles[s] for s in names], [_text(s) for s in names]


def _line_canvas(labels: list[str], plots: int, plot_width: float, right: float) -> tuple[Canvas, list]:
    """``plots`` axes side by side, each ``plot_width`` wide with ``right`` inches after it, then the
    legend; tall enough for the legend."""
    legend_width, legend_height = legend_size(labels)
    height = max(PLOT_HEIGHT, legend_height) + BOTTOM + TOP
    width = LEFT + plots * (plot_width + right) + GAP + legend_width
    canvas = Canvas(width, height)
    axes = [canvas.axes(LEFT + i * (plot_width + right), BOTTOM, plot_width, height - BOTTOM - TOP)
            for i in range(plots)]
    return canvas, axes


@_styled
def scaling_figure(data: pd.DataFrame, style_of: dict[str, Style], order: Sequence[str]) -> str:
    """Time (median, p20–p80 bars) and peak memory against n, log–log, for one panel."""
    labels = [_text(s) for s in _drawn(data, order)]
    canvas, (time_ax, mem_ax) = _line_canvas(labels, 2, PLOT_WIDTH, LEFT)
    handles = _series_lines(time_ax, data, "time_ms", style_of, True, spread=("time_ms_p20", "time_ms_p80"))
    handles |= _series_lines(mem_ax, data, "peak_mem_bytes", style_of, False, scale=MIB)
    _log_log(((time_ax, "time per call (ms, median)", "Time"), (mem_ax, "peak memory (MiB)", "Peak memory")),
             data["seq_len"])
    canvas.legend(*_legend_entries(handles, order))
    return _svg(canvas.fig)


def _ratio_norm(values: np.ndarray) -> mcolors.LogNorm:
    """Log norm symmetric about 1 (so 1 is the neutral centre colour), at least 1/2…2 wide."""
    finite = values[np.isfinite(values) & (values > 0)]
    reach = float(np.max(np.abs(np.log(finite)))) if finite.size else 0.0
    bound = float(np.exp(min(max(reach, np.log(2)), np.log(1e4))))
    return mcolors.LogNorm(vmin=1 / bound, vmax=bound)


@_styled
def ratio_figure(data: pd.DataFrame, order: Sequence[str]) -> str:
    """Heat maps (series × n) of speed-up and memory ratio against the baseline, blue = better."""
    rows = _drawn(data, order)
    lengths = sorted(set(data["seq_len"]))
    labels = [_text(s) for s in rows]
    label_width = text_width(labels, RC["ytick.labelsize"]) + 0.15
    map_width = min(max(MAP_COLUMN * len(lengths), MAP_MIN), MAP_MAX)
    height = CELL_HEIGHT * len(rows) + BOTTOM + TOP
    canvas = Canvas(label_width + 2 * (map_width + COLORBAR), height)
    maps = (("speedup", "speed-up (baseline time ÷ time)", "RdBu", True),
            ("mem_ratio", "memory ratio (peak ÷ baseline peak)", "RdBu_r", False))
    flag = lambda column: (data.pivot_table(index="series", columns="seq_len", values=column, aggfunc="any")  # noqa: E731
                           .reindex(index=rows, columns=lengths).fillna(False).to_numpy(dtype=bool))
    noisy, launch_bound = flag("noisy"), flag("launch_bound")
    for i, (column, title, cmap, timed) in enumerate(maps):
        left = label_width + i * (map_width + COLORBAR)
        ax = canvas.axes(left, BOTTOM, map_width, height - BOTTOM - TOP)
        grid = data.pivot_table(index="series", columns="seq_len", values=column, aggfunc="first")
        values = grid.reindex(index=rows, columns=lengths).to_numpy(dtype=float)
        norm = _ratio_norm(values)
        image = ax.pcolormesh(np.arange(len(lengths) + 1), np.arange(len(rows) + 1),
                              np.ma.masked_invalid(values), cmap=cmap, norm=norm, edgecolors="white",
                              linewidth=0.5)
        ax.set_facecolor("#c8c8c8")  # cells without a value: a grey apart from the map's near-white 1
        ax.grid(False)
        ax.set_xticks(np.arange(len(lengths)) + 0.5, [length_label(n) for n in lengths],
                      rotation=0 if len(lengths) <= ANNOTATE_COLUMNS else 60)
        ax.set_yticks(np.arange(len(rows)) + 0.5, labels if i == 0 else [])
        ax.set_ylim(len(rows), 0)
        ax.set_xlabel("sequence length n (tokens)")
        ax.set_title(title, loc="left")
        if len(lengths) <= ANNOTATE_COLUMNS:
            _annotate(ax, values, noisy & timed, launch_bound & timed, norm)
        bar = canvas.fig.colorbar(image, cax=canvas.axes(left + map_width + 0.12, BOTTOM, 0.14,
                                                         height - BOTTOM - TOP))
        # 1-2-5 ticks where the bar has room for them, decades only where it has not.
        decades = math.log10(norm.vmax / norm.vmin)
        subs = (1, 2, 5) if 3 * decades * TICK_ROOM < height - BOTTOM - TOP else (1,)
        bar.ax.yaxis.set_major_locator(ticker.LogLocator(base=10, subs=subs))
        bar.ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: times(v)))
        bar.ax.yaxis.set_minor_locator(ticker.NullLocator())
    return _svg(canvas.fig)


def _annotate(ax, values: np.ndarray, noisy: np.ndarray, launch_bound: np.ndarray,
              norm: mcolors.LogNorm) -> None:
    for (i, j), value in np.ndenumerate(values):
        if not np.isfinite(value):
            continue
        strong = abs(norm(value) - 0.5) > 0.3  # white text on the dark ends of the colour map
        marks = ("~" if noisy[i, j] else "") + ("*" if launch_bound[i, j] else "")
        ax.text(j + 0.5, i + 0.5, marks + times(value), ha="center", va="center",
                fontsize=7, color="white" if strong else "#222222", in_layout=False)


@_styled
def throughput_figure(data: pd.DataFrame, style_of: dict[str, Style], order: Sequence[str],
                      references: Sequence[Reference], peak: float | None) -> str:
    """Achieved TFLOP/s against n, published reference curves dotted, % of device peak on the right
    axis where the peak is known."""
    labels = [_text(s) for s in [*_drawn(data, order), *(r.label for r in references)]]
    canvas, (ax,) = _line_canvas(labels, 1, WIDE_PLOT, LEFT if peak else GAP)
    handles, names = _legend_entries(_series_lines(ax, data, "tflops", style_of, True), order)
    for i, ref in enumerate(references):
        (line,) = ax.plot(ref.seq_lens, ref.tflops, linestyle=":", linewidth=1.6, marker="x",
                          markersize=5, color=REFERENCE_COLORS[i % len(REFERENCE_COLORS)])
        handles.append(line)
        names.append(_text(ref.label))
    _log_log([(ax, "achieved TFLOP/s", "analytic FLOPs ÷ median time")],
             [*data["seq_len"], *(n for ref in references for n in ref.seq_lens)])
    if peak:
        _percent_axis(ax, peak, f"% of device peak ({peak:g} TFLOP/s)")
    canvas.legend(handles, names)
    return _svg(canvas.fig)


@_styled
def decode_figure(data: pd.DataFrame, style_of: dict[str, Style], order: Sequence[str],
                  peak_gbps: float | None) -> str:
    """Decode steps against the cache length n, log–log: time per step, the cache's size and the
    bandwidth the analytic bytes moved per step achieve (% of the device's on the right, if known)."""
    labels = [_text(s) for s in _drawn(data, order)]
    canvas, (time_ax, cache_ax, rate_ax) = _line_canvas(labels, 3, PLOT_WIDTH, LEFT)
    handles = _series_lines(time_ax, data, "time_ms", style_of, True, spread=("time_ms_p20", "time_ms_p80"))
    handles |= _series_lines(cache_ax, data, "cache_bytes", style_of, False, scale=MIB)
    handles |= _series_lines(rate_ax, data, "gbps", style_of, True)
    _log_log(((time_ax, "time per step (ms, median)", "Time per step"),
              (cache_ax, "cache for the prefix (MiB)", "Cache"),
              (rate_ax, "GB/s (bytes moved ÷ time)", "Memory traffic")), data["seq_len"], "cache length n (tokens)")
    if peak_gbps:
        _percent_axis(rate_ax, peak_gbps, f"% of bandwidth ({peak_gbps / 1e3:g} TB/s)")
    canvas.legend(*_legend_entries(handles, order))
    return _svg(canvas.fig)


# Against multi-head: (ratio column of analysis.grouped_heads, y label, title, timed).
GQA_PLOTS = (("time_ms_vs_mha", "time ÷ multi-head time", "Time", True),
             ("peak_mem_bytes_vs_mha", "peak memory ÷ multi-head", "Peak memory", False),
             ("cache_bytes_vs_mha", "cache ÷ multi-head cache", "Cache", False))


@_styled
def gqa_figure(data: pd.DataFrame, style_of: dict[str, Style], order: Sequence[str]) -> str:
    """Time, peak memory and (decode steps) cache of each series ÷ its multi-head point's, against the GQA
    ratio heads ÷ kv_heads on a log₂ axis (1 = multi-head), log y with 1 marked; plots without a value
    are left out."""
    plots = [plot for plot in GQA_PLOTS if data[plot[0]].notna().any()]
    labels = [_text(s) for s in _drawn(data, order)]
    canvas, axes = _line_canvas(labels, len(plots), PLOT_WIDTH, LEFT)
    handles = {}
    for ax, (column, _, _, timed) in zip(axes, plots, strict=True):
        handles |= _series_lines(ax, data, column, style_of, timed, x="gqa_ratio")
        ax.axhline(1, color="#888888", linewidth=0.8, zorder=1)
    _log_log([(ax, label, title) for ax, (_, label, title, _) in zip(axes, plots, strict=True)], data["gqa_ratio"],
             "heads ÷ kv_heads (1 = multi-head)")
    canvas.legend(*_legend_entries(handles, order))
    return _svg(canvas.fig)


@_styled
def accumulation_figure(data: pd.DataFrame, style_of: dict[str, Style], order: Sequence[str]) -> str:
    """Step time (median, p20–p80 bars) and peak memory of one training step against the number of
    accumulated micro-batches k (log₂), one line per setting (column ``series``)."""
    labels = [_text(s) for s in _drawn(data, order)]
    canvas, (time_ax, mem_ax) = _line_canvas(labels, 2, PLOT_WIDTH, LEFT)
    handles = _series_lines(time_ax, data, "step_time_ms", style_of, True, spread=("time_ms_p20", "time_ms_p80"),
                            x="accum_steps")
    handles |= _series_lines(mem_ax, data, "peak_mem_bytes", style_of, False, scale=MIB, x="accum_steps")
    _log_log(((time_ax, "step time (ms, median)", "Step time"),
              (mem_ax, "peak memory of a step (MiB)", "Peak memory")),
             data["accum_steps"], "accumulated micro-batches k (batch ÷ k each)")
    canvas.legend(*_legend_entries(handles, order))
    return _svg(canvas.fig)


# Marker areas (points²) of the frontier figure: the least and the largest cache drawn (a variant
# without a decode step measured is drawn hollow at the least size).
CACHE_AREA = (25.0, 400.0)


def _cache_area(cache: pd.Series, low: float, high: float) -> np.ndarray:
    """Marker area ∝ log cache bytes between ``low`` and ``high`` bytes; the least area where unknown."""
    span = math.log(high / low) if high > low else 1.0
    scaled = np.log(cache.to_numpy(dtype=float) / low) / span
    return np.nan_to_num(CACHE_AREA[0] + scaled * (CACHE_AREA[1] - CACHE_AREA[0]), nan=CACHE_AREA[0])


def _bytes_label(value: float) -> str:
    for shift, unit in ((30, "GiB"), (20, "MiB"), (10, "KiB")):
        if value >= 1 << shift:
            return f"{value / (1 << shift):.3g} {unit}"
    return f"{value:.0f} B"


@_styled
def frontier_figure(data: pd.DataFrame, colour_of: dict[str, str]) -> str:
    """Recall against fwd_bwd time (log x), one labelled marker per variant with both (rows of
    analysis.frontier for one device), its area ∝ log of its decode cache (hollow: no decode step);
    the Pareto front joined by a step line; a legend of cache sizes."""
    drawn = data.dropna(subset=["time_ms", "recall"]).sort_values("time_ms")
    cache = drawn["cache_bytes"].dropna()
    low, high = (float(cache.min()), float(cache.max())) if len(cache) else (1.0, 1.0)
    sizes = [low] if high == low else [low, math.sqrt(low * high), high]
    labels = [f"cache {_bytes_label(v)}" for v in sizes] + ["no decode step", "Pareto front"]
    canvas, (ax,) = _line_canvas(labels, 1, WIDE_PLOT * 0.75, 0.0)
    areas = _cache_area(drawn["cache_bytes"], low, high)
    for i, ((_, row), area) in enumerate(zip(drawn.iterrows(), areas, strict=True)):
        colour = colour_of.get(row["variant"], PALETTE[0])
        hollow = pd.isna(row["cache_bytes"])
        ax.scatter(row["time_ms"], row["recall"], s=area, facecolors="white" if hollow else colour,
                   edgecolors=colour, alpha=0.85, linewidths=1.2, zorder=3)
        ax.annotate(_text(row["variant"]), (row["time_ms"], row["recall"]), textcoords="offset points",
                    xytext=(6, 4 if i % 2 else -11), fontsize=8, zorder=4)  # alternate: neighbours apart
    front = drawn[drawn["on_front"].astype(bool)].sort_values("time_ms")
    if len(front):  # a staircase: each front point holds its recall until the next, faster-to-better
        ax.step(front["time_ms"], front["recall"], where="post", color="#444444", linewidth=1.0,
                linestyle=(0, (3, 2)), zorder=2)
    ax.set_xscale("log")
    _plain_log_labels(ax.xaxis)
    ax.set_xlabel(f"fwd_bwd time (ms, median, n={int(data['seq_len'].iloc[0]):,})" if len(data) else "time (ms)")
    ax.set_ylabel("MQAR recall (accuracy, mean over seeds)")
    ax.set_ylim(-0.03, 1.05)
    handles = [ax.scatter([], [], s=a, facecolors="#999999", edgecolors="#999999")
               for a in _cache_area(pd.Series(sizes), low, high)]
    handles.append(ax.scatter([], [], s=CACHE_AREA[0], facecolors="white", edgecolors="#999999"))
    handles.append(Line2D([], [], color="#444444", linewidth=1.0, linestyle=(0, (3, 2))))
    canvas.legend(handles, labels)
    return _svg(canvas.fig)


@_styled
def curves_figure(data: pd.DataFrame, colour_of: dict[str, str]) -> str:
    """Training loss against step of each run of analysis.recall_curves, coloured by variant: a
    run that never left the loss plateau stays flat, one that learned to recall drops off it."""
    drawn = list(dict.fromkeys(data["variant"]))  # variants in the order of their first run
    labels = [_text(v) for v in drawn]
    canvas, (ax,) = _line_canvas(labels, 1, WIDE_PLOT * 0.75, 0.0)
    for _, run in data.iterrows():
        ax.plot(run["step"], run["loss"], color=colour_of.get(run["variant"], PALETTE[0]), linewidth=1.1,
                alpha=0.85)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (nats per scored token)")
    ax.set_ylim(bottom=0)
    handles = [Line2D([], [], color=colour_of.get(v, PALETTE[0]), linewidth=1.5) for v in drawn]
    canvas.legend(handles, labels)
    return _svg(canvas.fig)
