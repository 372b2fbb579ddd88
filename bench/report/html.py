"""The report page: one self-contained HTML file (inline SVG figures, inline CSS, no script, nothing
fetched from a network). Every string from results goes through jinja2's autoescaping; the only
markup inserted unescaped is SVG written by matplotlib (which escapes its text), the templates and
the CSS (templates/: the page, its macros and one template per section).

The page is a list of section builders (SECTIONS); each takes the prepared Report and returns a
Section, or None when it has nothing to show. Kernel sections draw from rows whose kind is
"kernel" and are left out when there are none; a kernel section about one kind of call (full-sequence
calls, or decode steps) says so in one line when none of that kind ran ok, so that no section
draws nothing or claims there is nothing while the other kind has data. The grouped-heads and
layouts sections are left out unless a run varies heads ÷ kv_heads, or has packed and padded points
(decoding: a ragged batch beside a padded or uniform one), and say so in one line where it does but
nothing ran ok to compare. Training sections (kind "train", one grid per study) are left out when no
study varies what they are about. The frontier section needs both kinds (a kernel run and a training
run given together): left out of results of one kind, one line where fwd_bwd points or the recall
study are missing. Profile links point at local files only, relative to the report's
folder.
"""

from __future__ import annotations

import datetime as dt
import functools
import os
import re
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from jinja2 import Environment, PackageLoader
from markupsafe import Markup

from variants.layouts import PACKED, PADDED
from variants.registry import DECODE

from .. import __version__
from . import analysis, figures, reference, training

# What `bench profile` writes in a profile folder (bench.profile.FILES, not imported: it loads torch).
PROFILE_FILES = ("trace.json", "kernels.csv", "summary.json")


@dataclass
class Report:
    """Everything the sections draw from, computed once."""

    rows: pd.DataFrame  # every row read, all kinds
    kernel: pd.DataFrame  # kind == "kernel", with a ``series`` column
    full: analysis.Timings  # ok full-sequence kernel points aggregated per (panel, series, n), drawn panels only
    baseline: str | None  # the series chosen with --baseline, None for the best baseline
    style_of: dict[str, figures.Style]
    order: list[str]  # series in legend/table order
    train: pd.DataFrame  # kind == "train", with ``series`` and ``study`` columns
    studies: list[training.Study]
    decode: analysis.Timings  # ok decode steps, aggregated the same way
    shapes: analysis.Shapes  # grouped heads and layouts compared across panels, of both
    profiles: Mapping[str, str] = field(default_factory=dict)  # point key -> profile folder
    links_from: Path | None = None  # the report's folder: local links are relative to it

    @property
    def against(self) -> str:
        return self.baseline or "the best baseline (fastest / leanest of the baseline family)"

    def in_order(self, table: pd.DataFrame) -> pd.DataFrame:
        """Rows sorted by series in legend order (baselines, standard, then the rest)."""
        rank = {s: i for i, s in enumerate(self.order)}
        return table.sort_values("series", key=lambda c: c.map(rank), kind="stable")

    @property
    def measured(self) -> pd.DataFrame:
        """Kernel and training rows together (each with ``series``): what Problems lists."""
        frames = [f for f in (self.kernel, self.train) if len(f)]
        return pd.concat(frames) if frames else self.kernel


@dataclass(frozen=True)
class Section:
    id: str
    title: str
    body: Markup


SectionBuilder = Callable[[Report], Section | None]


def prepare(rows: pd.DataFrame, baseline: str | None = None, profiles: Mapping[str, str] | None = None,
            links_from: Path | None = None) -> Report:
    """Analyse the rows once for every section; ``baseline`` is a ``--baseline`` name (BadInput if
    it names no series), ``profiles`` maps point keys to profile folders."""
    kernel = analysis.with_series(analysis.kernel_rows(rows))
    chosen = analysis.resolve_baseline(kernel, baseline)
    ok = kernel[(kernel["status"] == "ok") & kernel["time_ms"].notna()]
    decoding = ok["mode"].eq(DECODE)
    families = kernel[["series", "family"]].drop_duplicates("series")
    family_of = figures.legend_order(families["series"], families["family"])
    train = training.train_rows(rows)
    full, decode = analysis.timings(ok[~decoding], chosen), analysis.timings(ok[decoding], chosen)
    return Report(rows=rows, kernel=kernel, full=full, baseline=chosen, style_of=figures.styles(family_of, chosen),
                  order=list(family_of), train=train, studies=training.studies(train), decode=decode,
                  shapes=analysis.shapes(full, decode), profiles=dict(profiles or {}), links_from=links_from)


# --- templates -----------------------------------------------------------------------------------

# The CSS and templates ship as package data (templates/, pyproject's package-data) and are read
# through the package, not a path, so an installed wheel renders the same page as a checkout.
LOADER = PackageLoader("bench.report", "templates")
ENV = Environment(loader=LOADER, autoescape=True, trim_blocks=True, lstrip_blocks=True)
# Inserted as it is, not rendered: CSS braces are not template syntax.
CSS = Markup(LOADER.get_source(ENV, "report.css")[0])


def _or_dash(write: Callable[[float], str]) -> Callable[[object], str]:
    """A template filter: ``write`` for a number, a dash for anything else (None, NaN, text)."""
    def number_or_dash(value: object) -> str:
        return write(value) if isinstance(value, float | int) and pd.notna(value) else "—"

    return number_or_dash


def _binary_units(value: float) -> str:
    """Binary units, the largest that keeps the number at least 1 (KiB at the least)."""
    for shift, unit in ((30, "GiB"), (20, "MiB")):
        if value >= 1 << shift:
            return f"{value / (1 << shift):,.1f} {unit}"
    return f"{value / 1024:,.1f} KiB"


ENV.filters.update(fixed=_or_dash("{:.2f}".format), sig=_or_dash("{:.3g}".format), sci=_or_dash("{:.2e}".format),
                   times=_or_dash(analysis.times), count=_or_dash("{:,.0f}".format), bytes=_or_dash(_binary_units))


def _render(template: str, **context: object) -> Markup:
    return Markup(ENV.get_template(template).render(**context))


def _records(frame: pd.DataFrame) -> list[dict]:
    """Rows for a template, NaN as None (so the template's filters print a dash)."""
    return frame.astype(object).where(frame.notna(), None).to_dict("records")


# --- sections ------------------------------------------------------------------------------------

# The one line a section shows in place of its body when it has nothing of its kind; None: draw the body.
Missing = Callable[[Report], str | None]


def _kernel_section(section_id: str, title: str, missing: Missing | None = None
                    ) -> Callable[[Callable[[Report], Markup | None]], SectionBuilder]:
    """A kernel section from the builder of its body: left out of a report without kernel rows (a
    training-only run) or where the body is None, and ``missing``'s line in place of the body where
    it gives one."""
    def decorate(body: Callable[[Report], Markup | None]) -> SectionBuilder:
        @functools.wraps(body)
        def build(report: Report) -> Section | None:
            if not len(report.kernel):
                return None
            line = missing(report) if missing else None
            content = Markup('<p class="note">{}</p>').format(line) if line else body(report)
            return None if content is None else Section(section_id, title, content)

        return build

    return decorate


def _none_ran(report: Report, decode: bool) -> str | None:
    """For a section about full-sequence points (or decode steps): its line when none of them ran ok,
    whether the run measured some (then they are under Problems) or only the other kind."""
    if len((report.decode if decode else report.full).agg):
        return None
    what, other = ("decode step", "full-sequence points") if decode else \
        ("full-sequence point", "decode steps (see Decoding)")
    measured = int(report.kernel["mode"].eq(DECODE).eq(decode).sum())
    if measured:
        return f"None of the {measured:,} {what}s ran ok (see Problems)."
    return f"These results hold no {what}, only {other}."


_no_full_point = functools.partial(_none_ran, decode=False)
_no_decode_step = functools.partial(_none_ran, decode=True)


def _no_ratio(report: Report) -> str | None:
    """The ratio section's line: no full-sequence point ran ok, or none beside a baseline (nothing to
    divide by; the summary says the same)."""
    return _no_full_point(report) or (analysis.NO_RATIO if report.full.ratio.empty else None)


def _count(n: int, one: str, many: str) -> str:
    """``n`` with its noun: "1 panel", "4 panels"."""
    return f"{n:,} {one if n == 1 else many}"


def _ok_of(rows: pd.DataFrame) -> str:
    """"ok / all" row counts, for a card."""
    return f"{int((rows['status'] == 'ok').sum()):,} / {len(rows):,}"


def _card(best: pd.Series | None, column: str, what: str, who: Callable[[pd.Series], str]) -> list[dict]:
    """The card of a ratio at its best point (none where there is no point): the value, what it is,
    whose (``who`` of the point) and where."""
    if best is None:
        return []
    return [{"value": analysis.times(best[column]),
             "label": f"{what}: {who(best)}, {best['panel']}, n={best['seq_len']:,}"}]


def _ratio_cards(report: Report) -> list[dict]:
    """The cards of the summary's headlines: the best speed-up and memory ratio against the baseline and
    decode step against the best standard one; and where they ran, grouped heads against multi-head
    heads, packed documents against padding and a ragged decode batch against a padded one."""
    cards = []
    for ratio, column, better, what in ((report.full.ratio, "speedup", "max", "best speed-up"),
                                        (report.full.ratio, "mem_ratio", "min", "leanest memory ratio"),
                                        (analysis.decode_leaders(report.decode), "speedup", "max",
                                         "best decode step speed-up")):
        best = analysis.best_point(ratio, column, better, timed=column == "speedup")
        cards += _card(best, column, what, lambda b: b["series"])
    grouped = pd.concat([gqa.points for gqa in report.shapes.gqa], ignore_index=True)
    cards += _card(analysis.gqa_leader(grouped) if len(grouped) else None, "time_ms_vs_mha",
                   "grouped-query time ÷ multi-head time",
                   lambda b: f"{b['series']} at heads ÷ kv_heads = {b['gqa_ratio']:g}")
    for compared in (report.shapes.packed, report.shapes.ragged):
        first, second = compared.layouts[:2]
        column = f"time_vs_{second}"
        cards += _card(analysis.best_point(compared.families, column, "min", True), column,
                       f"{compared.word(first)} ÷ {compared.word(second)} time", lambda b: f"best {b['group']} impls")
    return cards


def overview_section(report: Report) -> Section:
    kernel, train = report.kernel, report.train
    summary, findings, cards = [], [], []
    if len(kernel):
        summary += analysis.summary(kernel, report.full, report.decode, report.baseline, report.shapes)
        cards.append({"value": _ok_of(kernel), "label": "kernel points ok / measured"})
        cards += _ratio_cards(report)
    if len(train):
        findings = training.summary(report.studies)
        studies = _count(len(report.studies), "study", "studies")
        cards.append({"value": _ok_of(train), "label": f"training runs ok / run, in {studies}"})
    problems = report.measured["status"].ne("ok").sum()
    cards.append({"value": f"{problems:,}", "label": "rows with problems (see Problems)"})
    body = _render("overview.html.j2", cards=cards, summary=summary, findings=findings,
                   env=analysis.environment(report.rows))
    return Section("overview", "Summary and environment", body)


@_kernel_section("time-memory", "Time and memory vs sequence length", _no_full_point)
def scaling_plots_section(report: Report) -> Markup:
    full = report.full
    items = [(title, Markup(figures.scaling_figure(data, report.style_of, report.order)))
             for title, data in full.panels.split(full.agg)]
    return _render("scaling_plots.html.j2", items=items, chosen=report.baseline, omitted=full.panels.omitted,
                   shown=len(full.panels.titles))


@_kernel_section("ratios", "Speed-up and memory ratio against the baseline", _no_ratio)
def ratios_section(report: Report) -> Markup:
    items = [(title, Markup(figures.ratio_figure(data, report.order)))
             for title, data in report.full.panels.split(report.full.ratio) if len(data)]
    return _render("ratios.html.j2", items=items, against=report.against, annotate=figures.ANNOTATE_COLUMNS)


@_kernel_section("exponents", "Scaling exponents and crossovers", _no_full_point)
def exponents_section(report: Report) -> Markup:
    full = report.full
    items = [(title, _records(report.in_order(table))) for title, table in full.panels.split(full.fits)]
    return _render("exponents.html.j2", items=items, styles=report.style_of)


@_kernel_section("throughput", "Throughput", _no_full_point)
def throughput_section(report: Report) -> Markup:
    full = report.full
    items, sources = [], set()
    for title, data in full.panels.split(full.agg):
        first = data.iloc[0]
        # A point aggregated over several devices matches no device's published figures, nor does a
        # grouped-head or packed one (they are multi-head and dense).
        devices = set(data["device_name"].dropna()) if data["devices"].max() <= 1 else set()
        refs = reference.matching(devices, first["mode"], bool(first["causal"]), int(first["head_dim"]),
                                  first["dtype"]) if analysis.plain_shape(data) else []
        sources |= {r.source for r in refs}
        peak = analysis.device_peak(data)
        items.append((title, Markup(figures.throughput_figure(data, report.style_of, report.order, refs, peak))))
    reference_note = ("Dotted lines: published figures measured on the same device model and configuration, "
                      f"from the {' and the '.join(sorted(sources))} (batch = 16384 / n, hidden 2048)."
                      if sources else "No published reference figure matches this device and these panels.")
    peaks = analysis.best_pct_peak(full.agg, full.panels)
    peak_note = ("% of peak uses the device's datasheet peak for the dtype." if len(peaks) else
                 "No % of peak: the device is not in the peak table (a peak is never guessed).")
    return _render("throughput.html.j2", items=items, reference_note=reference_note, peak_note=peak_note,
                   peaks=_records(peaks), styles=report.style_of)


@_kernel_section("quality", "Quality")
def quality_section(report: Report) -> Markup:
    return _render("quality.html.j2", rows=_records(report.in_order(analysis.quality(report.kernel))),
                   styles=report.style_of)


@_kernel_section("decode", "Decoding: one step against a cache", _no_decode_step)
def decode_section(report: Report) -> Markup:
    decode = report.decode
    table = analysis.decode_table(decode)
    items = []
    for title, data in decode.panels.split(decode.agg):
        svg = Markup(figures.decode_figure(data, report.style_of, report.order, analysis.device_bandwidth(data)))
        items.append({"title": title, "svg": svg, "rows": _records(report.in_order(table[table["panel"] == title]))})
    return _render("decode.html.j2", items=items, styles=report.style_of, omitted=decode.panels.omitted)


def _no_gqa(report: Report) -> str | None:
    """The grouped-heads section's line where the run varies the GQA ratio but no series ran ok both
    with grouped heads and multi-head at one shape and n."""
    if any(len(gqa.points) for gqa in report.shapes.gqa) or not analysis.gqa_varies(report.kernel):
        return None
    return ("The run varies heads ÷ kv_heads, but no series ran ok both with grouped and with multi-head "
            "heads at one shape and length, so there is nothing to compare (see Problems).")


@_kernel_section("gqa", "Grouped-query heads", _no_gqa)
def gqa_section(report: Report) -> Markup | None:
    items, omitted = [], []
    for gqa in report.shapes.gqa:
        largest = analysis.at_largest(gqa.points, ["panel", "series"]).sort_values("gqa_ratio", kind="stable")
        for title, data in gqa.panels.split(largest):
            items.append({"title": title, "svg": Markup(figures.gqa_figure(data, report.style_of, report.order)),
                          "rows": _records(report.in_order(data)), "cache": data["cache_bytes"].notna().any()})
        omitted += gqa.panels.omitted
    return _render("gqa.html.j2", items=items, styles=report.style_of, omitted=omitted) if items else None


@dataclass(frozen=True)
class Column:
    """A column of a layout table: its header, the value's key and how it is written (template
    layouts.html.j2: name, ms, bytes or ratio)."""

    header: str
    key: str
    kind: str


METRIC_TEXT = {"time_ms": ("time", "ms"), "peak_mem_bytes": ("peak memory", "bytes"),
               "cache_bytes": ("cache", "bytes"), "bytes_moved": ("bytes moved", "bytes")}


def _series_columns(compared: analysis.ByLayout, layouts: list[str]) -> list[Column]:
    """Per metric: each of ``layouts``' values, then the first one's ratio to each other one."""
    first, *others = layouts
    columns = []
    for metric in compared.metrics:
        what, kind = METRIC_TEXT[metric]
        columns += [Column(f"{what} {compared.word(layout)}", metric if layout == first else f"{layout}_{metric}", kind)
                    for layout in layouts]
        columns += [Column(f"{compared.word(first)} ÷ {compared.word(other)}", f"{metric}_vs_{other}", "ratio")
                    for other in others]
    return columns


def _family_columns(compared: analysis.ByLayout, layouts: list[str]) -> list[Column]:
    """Per measure (the fastest, the leanest): each of ``layouts``' best series and its value, then the
    first one's ratio to each other one."""
    first, *others = layouts
    columns = []
    for what, key, kind in (("fastest", "time", "ms"), ("leanest", "mem", "bytes")):
        for layout in layouts:
            columns += [Column(f"{what} {compared.word(layout)}", f"{layout}_{key}_series", "name"),
                        Column("time" if key == "time" else "peak memory", f"{layout}_{key}", kind)]
        columns += [Column(f"{compared.word(first)} ÷ {compared.word(other)}", f"{key}_vs_{other}", "ratio")
                    for other in others]
    return columns


def _layout_part(report: Report, compared: analysis.ByLayout) -> dict | None:
    """One part of the layouts section (full-sequence calls or decode steps): per drawn panel its
    documents, the family table at every n and the series table at each series' largest n."""
    if not compared.panels.titles:
        return None
    # Only the layouts that ran (decoding, a ragged batch may stand beside uniform ones only).
    layouts = [layout for layout in compared.layouts if compared.families[f"{layout}_time"].notna().any()]
    items = []
    for title in compared.panels.titles:
        points = compared.points[compared.points["panel"] == title]
        items.append({"title": title, "documents": compared.documents[title],
                      "families": _records(compared.families[compared.families["panel"] == title]),
                      "series": _records(report.in_order(analysis.at_largest(points, ["series"])))})
    return {"items": items, "series_columns": _series_columns(compared, layouts),
            "family_columns": _family_columns(compared, layouts), "omitted": compared.panels.omitted}


def _no_layouts(report: Report) -> str | None:
    """The layouts section's line where packed and padded points ran but none ok beside each other."""
    shapes = report.shapes
    if shapes.packed.panels.titles or shapes.ragged.panels.titles or \
            not {PACKED, PADDED} <= set(report.kernel["layout"]):
        return None
    return ("The run has packed and padded points, but none of one shape and length ran ok in both layouts, "
            "so there is nothing to compare (see Problems).")


@_kernel_section("layouts", "Packed documents against padding", _no_layouts)
def layouts_section(report: Report) -> Markup | None:
    full, decode = _layout_part(report, report.shapes.packed), _layout_part(report, report.shapes.ragged)
    if full is None and decode is None:
        return None
    return _render("layouts.html.j2", full=full, decode=decode, styles=report.style_of)


def _href(path: Path, base: Path | None) -> str:
    """A link to a local file that opens offline: relative to the report's folder (it survives moving
    the two together), or a file:// URI where there is no relative path (another drive)."""
    if base is not None:
        try:
            return urllib.parse.quote(Path(os.path.relpath(path, base.resolve())).as_posix())
        except ValueError:
            pass
    return path.resolve().as_uri()


@_kernel_section("profiles", "Profiles")
def profiles_section(report: Report) -> Markup | None:
    if not report.profiles:
        return None
    rows = []
    for r in _records(analysis.profiled_points(report.kernel, report.profiles)):
        folder = Path(r["folder"])
        links = [(name, _href(folder / name, report.links_from) if (folder / name).is_file() else None)
                 for name in PROFILE_FILES]
        rows.append({**r, "exists": folder.is_dir(), "links": links})
    return _render("profiles.html.j2", rows=rows, files=PROFILE_FILES, styles=report.style_of)


def _study_item(study: training.Study, table: pd.DataFrame, sentence: str | None) -> dict:
    """What every training table template gets: the study, its finding, rows, quality header, and
    whether the table holds several settings (then a setting column is shown)."""
    metric = (f"{study.metric.name} {'↑' if study.metric.higher_better else '↓'}" if study.metric
              else "quality")
    return {"study": study, "sentence": sentence, "rows": _records(table), "metric": metric,
            "several": table["label"].nunique() > 1,
            "setting": "series" if table["label"].eq(table["series"]).all() else "setting"}


def _study_section(section_id: str, title: str, template: str, studies: list[training.Study],
                   table_of: Callable[[training.Study], pd.DataFrame],
                   sentence_of: Callable[[training.Study, pd.DataFrame], str | None],
                   **context: object) -> Section | None:
    """A training section of one table per study (``table_of`` it, with ``sentence_of`` that table
    above it); None, to leave it out, when there is no study."""
    items = []
    for study in studies:
        table = table_of(study)
        items.append(_study_item(study, table, sentence_of(study, table)))
    return Section(section_id, title, _render(template, items=items, **context)) if items else None


def accumulation_section(report: Report) -> Section | None:
    items = []
    for study in training.with_trick(report.studies, "accum_steps"):
        table = training.accumulation(study)
        family_of = figures.legend_order(table["label"], table["family"])
        styles = figures.styles(family_of, None)
        lines = table.drop(columns="series").rename(columns={"label": "series"})
        svg = Markup(figures.accumulation_figure(lines, styles, list(family_of))) if len(table) else None
        items.append({**_study_item(study, table, training.accumulation_sentence(study, table)),
                      "svg": svg, "styles": styles})
    if not items:
        return None
    tolerance = ", ".join(f"{value:.0e} in {dtype}" for dtype, value in training.GRAD_TOLERANCE.items())
    body = _render("train_accumulation.html.j2", items=items, tolerance=tolerance)
    return Section("train-accumulation", "Training: gradient accumulation", body)


def sharing_section(report: Report) -> Section | None:
    return _study_section("train-sharing", "Training: shared vs unshared layers", "train_sharing.html.j2",
                          training.with_trick(report.studies, "layer_sharing"), training.sharing,
                          training.sharing_sentence)


def gelu_section(report: Report) -> Section | None:
    return _study_section("train-gelu", "Training: GELU forms", "train_gelu.html.j2",
                          training.with_trick(report.studies, "gelu"), training.gelu, training.gelu_sentence,
                          source=reference.GELU_SOURCE)


def train_quality_section(report: Report) -> Section | None:
    styles = figures.styles(figures.legend_order(report.train["series"], report.train["family"]), None)
    return _study_section("train-quality", "Training: task quality per attention", "train_quality.html.j2",
                          [s for s in report.studies if s.compares_series], training.quality,
                          training.quality_sentence, styles=styles)


FRONTIER_TITLE = "Speed, memory and recall frontier"


def _no_frontier(report: Report) -> str | None:
    """The frontier section's line where the results hold kernel and training rows but not both axes."""
    missing = []
    if analysis.frontier_speed(report.kernel).empty:
        missing.append("no fwd_bwd kernel point ran ok")
    if analysis.frontier_recall(report.train).empty:
        missing.append(f"no training study {analysis.RECALL_STUDY!r} on {analysis.RECALL_TASK} has an ok run "
                       "(bench run train --preset recall)")
    return f"No frontier: {' and '.join(missing)}." if missing else None


def frontier_section(report: Report) -> Section | None:
    """Left out unless the results hold both kernel and training rows (a kernel run and a training run
    given together); a line where one of the two axes is missing."""
    if not (len(report.kernel) and len(report.train)):
        return None
    line = _no_frontier(report)
    if line:
        return Section("frontier", FRONTIER_TITLE, Markup('<p class="note">{}</p>').format(line))
    table = analysis.frontier(report.kernel, report.train)
    families = table[["variant", "family"]].drop_duplicates("variant")
    colour_of = {v: s.color for v, s in figures.styles(figures.legend_order(families["variant"],
                                                                            families["family"]), None).items()}
    items = [{"title": device, "config": rows["config"].iloc[0],
              "svg": Markup(figures.frontier_figure(rows, colour_of)), "rows": _records(rows)}
             for device, rows in table.groupby("device_name", sort=True)]
    curves = analysis.recall_curves(report.train)
    curves_svg = Markup(figures.curves_figure(curves, colour_of)) if len(curves) else None
    return Section("frontier", FRONTIER_TITLE, _render("frontier.html.j2", items=items, curves_svg=curves_svg))


def problems_section(report: Report) -> Section:
    body = _render("problems.html.j2", rows=_records(analysis.problems(report.measured)), styles=report.style_of)
    return Section("problems", "Problems", body)


SECTIONS: list[SectionBuilder] = [overview_section, scaling_plots_section, ratios_section, exponents_section,
                                  throughput_section, decode_section, gqa_section, layouts_section,
                                  quality_section, profiles_section, frontier_section,
                                  train_quality_section,
                                  accumulation_section, sharing_section, gelu_section, problems_section]


def report_name(rows: pd.DataFrame) -> str:
    """The run id (or the first of several), reduced to a plain file name: a run id read from a
    parquet file is data, not a trusted path."""
    runs = sorted({str(r) for r in rows["run_id"].dropna().unique()})
    first = re.sub(r"[^A-Za-z0-9._+-]+", "_", runs[0]).strip("._") if runs else ""
    first = first or "results"
    return first if len(runs) <= 1 else f"{first}+{len(runs) - 1}-more"


def render(rows: pd.DataFrame, baseline: str | None = None, sections: list[SectionBuilder] | None = None,
           profiles: Mapping[str, str] | None = None, links_from: Path | None = None) -> str:
    """The whole page for these rows (as read by bench.store.read_results); ``profiles`` maps point
    keys to profile folders, linked relative to ``links_from`` (the report's folder)."""
    report = prepare(rows, baseline, profiles, links_from)
    built = [s for s in (build(report) for build in sections or SECTIONS) if s is not None]
    devices = analysis.distinct(rows["device_name"]) or "unknown device"
    parts = [devices, f"{len(rows):,} rows"]
    if len(report.kernel):
        parts.append(_count(len(report.full.panels.titles) + len(report.decode.panels.titles), "panel", "panels"))
    if len(report.train):
        parts.append(_count(len(report.studies), "training study", "training studies"))
    subtitle = " · ".join(parts)
    return ENV.get_template("page.html.j2").render(
        name=report_name(rows), subtitle=subtitle, sections=built, css=CSS, version=__version__,
        generated=f"{dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M UTC}")
