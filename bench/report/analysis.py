"""Pure computations behind the report: which rows count, panels, the best baseline at each point,
ratios against it, scaling exponents, crossovers, quality and problems. pandas/numpy only, no
rendering, so every figure in the report can be unit-tested from a table.

Vocabulary:

* a *series* is one (variant, impl) — with its params when the same (variant, impl) ran with
  several — drawn as one line;
* a *panel* is one (mode, causal, dtype, head_dim), split further by device, heads, kv_heads, batch,
  q_len or arrangement (the layout with its documents) only where those vary at a fixed sequence
  length (so FlashAttention's batch = tokens / n convention stays one panel, and a run of one shape
  keeps short titles);
* a *point* is a panel at one sequence length: what a series is compared on.

Grouped heads and layouts are also compared across panels (:class:`Compared`): a grouped point
beside its series' multi-head point, a packed one beside the padded one of the same documents.

The only names bench/ may tell apart are families: "baseline" (the kernels everyone already uses)
and "standard" (exact softmax attention, baselines included).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from variants.layouts import DENSE, PACKED, PADDED
from variants.registry import DECODE, MODES

from ..errors import BadInput
from ..store import STATUSES

BASELINE_FAMILY = "baseline"
STANDARD_FAMILIES = ("standard", BASELINE_FAMILY)
PANEL_COLUMNS = ("mode", "causal", "dtype", "head_dim")
# Split a panel only where these vary at one sequence length (see the module docstring).
SPLIT_COLUMNS = ("device_name", "heads", "kv_heads", "batch", "q_len", "arrangement")
# Written bare in a title, their values saying what they are: "packed (uniform ×8)", not "arrangement=…".
BARE_COLUMNS = ("arrangement", "documents")
# One value per point wherever arrangement is one (they make it up): what the layout comparisons state.
DOCUMENT_COLUMNS = ("layout", "documents", "doc_distribution", "doc_count", "doc_seed", "doc_lengths")
# Standard and baseline impls compute the same exact attention: one group when families are compared.
SOFTMAX = "softmax"
MODE_ORDER = {mode: i for i, mode in enumerate(MODES)}
# More panels than this are not drawn (the page would be unreadable and slow: three figures per
# panel); the report names the ones left out. The summary speaks of the first few only.
MAX_PANELS = 6
SUMMARY_PANELS = 3


# Decode points (a step against a cache: variants.DECODE) have their own section.


def kernel_rows(rows: pd.DataFrame) -> pd.DataFrame:
    """Kernel points only (decode points included): training rows (kind == "train") belong to their
    own section."""
    return rows[rows["kind"] == "kernel"]


@dataclass(frozen=True)
class Timings:
    """Ok points of full-sequence calls, or of decode steps, aggregated into drawn panels, their
    ratios against the baseline and their scaling fits; and every aggregated point, drawn or not
    (grouped heads and layouts are compared across panels)."""

    agg: pd.DataFrame
    panels: Panels
    ratio: pd.DataFrame
    fits: pd.DataFrame
    points: pd.DataFrame


def timings(ok: pd.DataFrame, baseline: str | None) -> Timings:
    columns = panel_columns(ok)
    points, panels = choose_panels(aggregate(ok, columns), columns)
    agg = points[points["panel"].isin(panels.titles)]
    return Timings(agg, panels, ratios(agg, baseline), scaling(agg), points)


DECODE_COLUMNS = ["panel", "series", "family", "seq_len", "time_ms", "speedup", "cache_bytes", "cache_ratio",
                  "gbps", "pct_bandwidth", "crossover"]


def decode_points(decode: Timings) -> pd.DataFrame:
    """Every aggregated decode point with its speed-up and cache size against the best standard step
    at the same (panel, n) (family standard or baseline; NaN where none ran there): ``speedup``,
    ``cache_ratio``, ``std_time``, ``std_time_series``, and ``noisy`` when either side is."""
    agg = decode.agg
    standard = agg["family"].isin(STANDARD_FAMILIES)
    best = best_per_point(agg, standard, "std")
    cache = agg[standard].groupby(["panel", "seq_len"])["cache_bytes"].min().rename("std_cache").reset_index()
    points = agg.merge(best, on=["panel", "seq_len"], how="left").merge(cache, on=["panel", "seq_len"], how="left")
    return points.assign(speedup=points["std_time"] / points["time_ms"],
                         cache_ratio=points["cache_bytes"] / points["std_cache"],
                         noisy=points["noisy"] | points["std_noisy"].eq(True))


def decode_table(decode: Timings) -> pd.DataFrame:
    """Per (panel, series), at its largest length: step time, speed-up and cache size against the
    best standard step there (family standard or baseline), achieved bandwidth, and the crossover."""
    points = decode_points(decode)
    last = points.loc[points.groupby(["panel", "series"])["seq_len"].idxmax()]
    crossovers = decode.fits.set_index(["panel", "series"])["crossover"]
    last["crossover"] = [crossovers.get((p, s)) for p, s in zip(last["panel"], last["series"], strict=True)]
    return last[DECODE_COLUMNS]


def decode_leaders(decode: Timings) -> pd.DataFrame:
    """Per decode panel, the non-standard series with the best speed-up at the largest cache length
    where it and a standard step both ran: the decode headline (rows of decode_points)."""
    points = decode_points(decode)
    rivals = points[~points["family"].isin(STANDARD_FAMILIES)].dropna(subset=["speedup"])
    largest = at_largest(rivals, ["panel"])
    return largest.loc[largest.groupby("panel")["speedup"].idxmax()]


def at_largest(frame: pd.DataFrame, by: Sequence[str]) -> pd.DataFrame:
    """The rows at the largest sequence length of each ``by`` group."""
    return frame[frame["seq_len"] == frame.groupby(list(by))["seq_len"].transform("max")]


def _json(text: object) -> object:
    """``text`` parsed as JSON; None for anything else (results are data, not trusted)."""
    try:
        return json.loads(text) if isinstance(text, str) else None
    except ValueError:
        return None


def json_object(text: object) -> dict | None:
    """``text`` parsed as a JSON object; None for anything else."""
    value = _json(text)
    return value if isinstance(value, dict) else None


def json_lengths(text: object) -> list[int]:
    """``text`` parsed as a JSON list of positive lengths (``doc_lengths``); empty for anything else."""
    value = _json(text)
    valid = isinstance(value, list) and all(isinstance(v, int) and v > 0 for v in value)
    return value if valid else []


# --- grouped heads and layouts, compared across panels -------------------------------------------

@dataclass(frozen=True)
class Compared:
    """Points beside reference points of another shape, in panels of the shape without the column
    compared across: ``points`` of the drawn panels (at most MAX_PANELS, as choose_panels keeps)."""

    points: pd.DataFrame
    panels: Panels


@dataclass(frozen=True)
class ByLayout(Compared):
    """Points of ``layouts[0]`` beside those of the other layouts (see :func:`by_layout`); ``families``:
    per (panel, family group, n) the fastest and leanest series of each layout (best_per_point's
    columns, prefixed by the layout) and the first's ratios ``time_vs_{layout}``, ``mem_vs_{layout}``;
    ``documents``: each drawn panel's documents in words (documents_text); ``metrics``: the columns of
    ``points`` compared."""

    layouts: tuple[str, ...]
    metrics: tuple[str, ...]
    decode: bool
    families: pd.DataFrame
    documents: dict[str, str]

    def word(self, layout: str) -> str:
        """How the page names a layout: decoding, a packed batch is a ragged one and dense is uniform."""
        return LAYOUT_WORDS[layout] if not (self.decode and layout == PACKED) else "ragged"


LAYOUT_WORDS = {PACKED: "packed", PADDED: "padded", DENSE: "uniform"}
GQA_METRICS = ("time_ms", "peak_mem_bytes", "cache_bytes")
FULL_LAYOUT_METRICS = ("time_ms", "peak_mem_bytes")
DECODE_LAYOUT_METRICS = ("time_ms", "cache_bytes", "bytes_moved")


def _drawn_only(points: pd.DataFrame, columns: list[str]) -> tuple[pd.DataFrame, Panels]:
    """Points relabelled with panels of ``columns``, those of the drawn panels only."""
    labelled, panels = choose_panels(points.drop(columns="panel"), columns)
    return labelled[labelled["panel"].isin(panels.titles)], panels


def beside(points: pd.DataFrame, reference: pd.DataFrame, prefix: str, metrics: Sequence[str],
           how: str = "inner") -> pd.DataFrame:
    """``points`` beside the ``reference`` point of the same panel, series and n: its ``metrics`` as
    ``{prefix}_{metric}``, each ratio ``{metric}_vs_{prefix}`` = value ÷ the reference's, and
    ``noisy`` when either side is."""
    keys = ["panel", "series", "seq_len"]
    side = reference[[*keys, *metrics, "noisy"]].rename(columns={c: f"{prefix}_{c}" for c in (*metrics, "noisy")})
    frame = points.merge(side, on=keys, how=how)
    return frame.assign(**{f"{m}_vs_{prefix}": frame[m] / frame[f"{prefix}_{m}"] for m in metrics},
                        noisy=frame["noisy"] | frame[f"{prefix}_noisy"].eq(True))


def grouped_heads(timings: Timings) -> Compared:
    """Each series' points with grouped heads beside its multi-head point at the same shape and n, in
    panels without kv_heads (the multi-head point included, at ratio 1): ``gqa_ratio`` = heads ÷
    kv_heads and ``{metric}_vs_mha`` for time, peak memory and cache; only series and lengths that ran
    both."""
    columns = [c for c in timings.panels.columns if c != "kv_heads"]
    points = timings.points.assign(gqa_ratio=gqa_ratio(timings.points))
    ratios_here = points.groupby([*columns, "series", "seq_len"], dropna=False)["gqa_ratio"]
    points = points[ratios_here.transform("min").eq(1) & ratios_here.transform("nunique").gt(1)]
    labelled, panels = _drawn_only(points, columns)
    return Compared(beside(labelled, labelled[labelled["gqa_ratio"] == 1], "mha", GQA_METRICS), panels)


def _layout_points(timings: Timings, layouts: Sequence[str]) -> tuple[pd.DataFrame, list[str]]:
    """The points of ``layouts`` at (shape, documents, n) where the first layout and another ran, and
    the panel columns of that shape: the timings' without arrangement, with documents. A dense point
    has no documents: it stands beside every document setting run at its shape and n."""
    points, base = timings.points, [c for c in timings.panels.columns if c != "arrangement"]
    documented = points[points["layout"].isin(layouts) & points["layout"].ne(DENSE)]
    settings = documented[[*base, "seq_len", "documents"]].drop_duplicates()
    dense = points[points["layout"].eq(DENSE)] if DENSE in layouts else points.iloc[:0]
    frame = pd.concat([documented, dense.drop(columns="documents").merge(settings, on=[*base, "seq_len"])],
                      ignore_index=True)
    columns = [*base, "documents"]
    here = frame.assign(first=frame["layout"].eq(layouts[0])).groupby([*columns, "seq_len"], dropna=False)
    return frame[here["first"].transform("any") & here["layout"].transform("nunique").gt(1)], columns


def family_group(family: pd.Series) -> pd.Series:
    """A family, standard and baseline as one (they compute the same exact attention)."""
    return family.where(~family.isin(STANDARD_FAMILIES), SOFTMAX)


def _family_best(labelled: pd.DataFrame, layouts: Sequence[str]) -> pd.DataFrame:
    """Per (panel, family group, n): the fastest and leanest of each layout, and the first's ratios
    against the others, where the first and another ran."""
    frame = labelled.assign(group=family_group(labelled["family"]))
    index = ["panel", "group", "seq_len"]
    best = frame[index].drop_duplicates()
    for layout in layouts:
        best = best.merge(best_per_point(frame, frame["layout"].eq(layout), layout, index), on=index, how="left")
    first, *others = layouts
    ratios = {f"{what}_vs_{other}": best[f"{first}_{what}"] / best[f"{other}_{what}"]
              for other in others for what in ("time", "mem")}
    noisy = np.logical_or.reduce([best[f"{layout}_noisy"].eq(True) for layout in layouts])
    best = best.assign(**ratios, noisy=noisy, after_softmax=best["group"].ne(SOFTMAX))
    best = best.dropna(subset=[f"time_vs_{other}" for other in others], how="all")
    order = ["panel", "after_softmax", "group", "seq_len"]  # softmax first, as standard is in legends
    return best.sort_values(order, ignore_index=True).drop(columns="after_softmax")


def documents_text(points: pd.DataFrame, decode: bool) -> str:
    """What a layout panel's documents are (from its point at the largest n): their distribution,
    count and seed, and at that n the shortest and longest and what padding them to the longest costs."""
    last = points.loc[points["seq_len"].idxmax()]
    text = (f"Cache lengths around the mean n, one per sequence of the batch, from the {last['doc_distribution']} "
            f"distribution" if decode else
            f"{last['doc_count']:,.0f} documents per row, lengths from the {last['doc_distribution']} distribution")
    text += f", seed {last['doc_seed']:,.0f}."
    lengths = json_lengths(last["doc_lengths"])
    if lengths:
        text += (f" At n={last['seq_len']:,} the batch's {len(lengths):,} {'sequences' if decode else 'documents'} "
                 f"are {min(lengths):,}–{max(lengths):,} tokens long; padded to the longest they take "
                 f"{times(len(lengths) * max(lengths) / sum(lengths))} the real tokens.")
    return text


def by_layout(timings: Timings, layouts: Sequence[str], metrics: Sequence[str]) -> ByLayout:
    """Packed documents (decoding: a ragged batch), ``layouts[0]``, beside the other ``layouts`` at the
    same shape, documents and n (see _layout_points): per series, ``{metric}_vs_{layout}`` for each
    other layout it ran, and per family group the best of each (ByLayout)."""
    frame, columns = _layout_points(timings, layouts)
    labelled, panels = _drawn_only(frame, columns)
    first, *others = layouts
    points = labelled[labelled["layout"] == first]
    for other in others:
        points = beside(points, labelled[labelled["layout"] == other], other, metrics, how="left")
    points = points.dropna(subset=[f"{metrics[0]}_vs_{other}" for other in others], how="all")
    decode = bool(labelled["mode"].eq(DECODE).any())
    documented = labelled[labelled["layout"] == first]
    documents = {title: documents_text(rows, decode) for title, rows in panels.split(documented)}
    return ByLayout(points, panels, tuple(layouts), tuple(metrics), decode, _family_best(labelled, layouts),
                    documents)


@dataclass(frozen=True)
class Shapes:
    """Grouped heads against multi-head (full-sequence calls, then decode steps), packed documents
    against padding and ragged decoding beside padded and uniform batches."""

    gqa: tuple[Compared, Compared]
    packed: ByLayout
    ragged: ByLayout


def shapes(full: Timings, decode: Timings) -> Shapes:
    return Shapes((grouped_heads(full), grouped_heads(decode)),
                  by_layout(full, (PACKED, PADDED), FULL_LAYOUT_METRICS),
                  by_layout(decode, (PACKED, PADDED, DENSE), DECODE_LAYOUT_METRICS))


def gqa_ratio(frame: pd.DataFrame) -> pd.Series:
    """heads ÷ kv_heads: the query heads that share one key/value head (1: multi-head)."""
    return pd.to_numeric(frame["heads"]).astype(float) / frame["kv_heads"].astype(float)


def gqa_varies(kernel: pd.DataFrame) -> bool:
    """Whether rows (of any status) ran at several GQA ratios."""
    return gqa_ratio(kernel).nunique() > 1


def plain_shape(points: pd.DataFrame) -> bool:
    """Whether every point is dense with as many KV heads as query heads: the shape published
    figures are measured at."""
    return bool(points["layout"].eq(DENSE).all() and points["kv_heads"].eq(points["heads"]).all())


def _params_text(params: object) -> str:
    """``{"window": 64}`` -> ``window=64``; text that is not a JSON object is shown as it is."""
    value = json_object(params)
    if value is not None:
        return ", ".join(f"{k}={v}" for k, v in value.items())
    return "" if pd.isna(params) else str(params)


def with_series(kernel: pd.DataFrame) -> pd.DataFrame:
    """Add ``series``: ``variant/impl``, plus the params where one (variant, impl) ran with several;
    and the shape columns points are told apart by (:func:`shape_columns`)."""
    frame = kernel.assign(**shape_columns(kernel))
    name = frame["variant"].astype(str) + "/" + frame["impl"].astype(str)
    several = frame.groupby(name)["params"].transform("nunique") > 1
    params = frame["params"].map({p: _params_text(p) for p in frame["params"].unique()})
    frame["series"] = name.where(~several, name + " [" + params + "]")
    return frame


def shape_columns(rows: pd.DataFrame) -> dict[str, pd.Series]:
    """``kv_heads`` and ``layout`` as every row has them (rows from before schema 3 had as many KV
    heads as query heads, dense), and two texts: ``documents``, a packed or padded point's
    distribution, documents per row and seed (decoding, the serving batch's distribution: its
    sequences are the documents; empty when dense), and ``arrangement``, the layout with them:
    "dense", "packed (uniform ×8)", decoding "ragged (uniform)"."""
    heads = pd.to_numeric(rows["heads"])
    kv_heads = pd.to_numeric(rows["kv_heads"]).fillna(heads).astype("Int64")
    layout = rows["layout"].astype(str).fillna(DENSE)  # str: a column of no value at all reads as float
    decode = rows["mode"].eq(DECODE)
    count = pd.to_numeric(rows["doc_count"]).astype("Int64").astype(str)
    seed = pd.to_numeric(rows["doc_seed"]).fillna(0).astype("Int64")
    documents = (rows["doc_distribution"].astype(str) + (" ×" + count).where(~decode, "")
                 + (", seed " + seed.astype(str)).where(seed.ne(0), "")).where(layout.ne(DENSE), "")
    name = layout.where(~(decode & layout.eq(PACKED)), "ragged")
    arrangement = (name + " (" + documents + ")").where(layout.ne(DENSE), DENSE)
    return {"kv_heads": kv_heads, "layout": layout, "documents": documents, "arrangement": arrangement}


def panel_columns(ok: pd.DataFrame) -> list[str]:
    """PANEL_COLUMNS plus each split column that takes several values at one (panel, seq_len)."""
    if ok.empty:
        return list(PANEL_COLUMNS)
    grouped = ok.groupby([*PANEL_COLUMNS, "seq_len"], dropna=False)
    return [*PANEL_COLUMNS, *(c for c in SPLIT_COLUMNS if (grouped[c].nunique(dropna=False) > 1).any())]


def panel_title(key: dict) -> str:
    parts = [str(key["mode"]), "causal" if key["causal"] else "non-causal", str(key["dtype"]),
             f"d={key['head_dim']}"]
    parts += [str(key[c]) if c in BARE_COLUMNS else f"{c.removesuffix('_name')}={key[c]}"
              for c in key if c not in PANEL_COLUMNS]
    return " · ".join(parts)


@dataclass(frozen=True)
class Panels:
    """Panels drawn (at most MAX_PANELS, the best-covered ones, in a stable order) and the rest."""

    columns: list[str]
    titles: list[str]
    omitted: list[str]

    def split(self, frame: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
        """(title, the frame's rows of that panel) per drawn panel, in drawing order."""
        return [(title, frame[frame["panel"] == title]) for title in self.titles]


def aggregate(ok: pd.DataFrame, columns: Sequence[str]) -> pd.DataFrame:
    """One row per (panel, series, seq_len): medians over repeated rows (several runs given), a
    point is noisy (or launch-bound) when any of its rows is. Everything plotted is drawn from this,
    never from rows."""
    measured = ("pct_peak", "cache_bytes", "bytes_moved", "gbps", "pct_bandwidth")
    frame = ok.assign(noisy=ok["noisy"].eq(True), launch_bound=ok["launch_bound"].eq(True),
                      **{c: pd.to_numeric(ok[c]) for c in measured})
    grouped = frame.groupby([*columns, "series", "family", "seq_len"], dropna=False, sort=True)
    # Split columns that are not panel keys take one value per point (that is why they are not keys).
    single = {c: (c, "first") for c in (*SPLIT_COLUMNS, *DOCUMENT_COLUMNS) if c not in columns}
    medians = {c: (c, "median") for c in ("time_ms", "time_ms_p20", "time_ms_p80", "peak_mem_bytes", "tflops",
                                          *measured)}
    agg = grouped.agg(**medians, noisy=("noisy", "any"), launch_bound=("launch_bound", "any"),
                      rows=("time_ms", "size"), devices=("device_name", "nunique"), **single)
    return agg.reset_index()


def choose_panels(agg: pd.DataFrame, columns: Sequence[str]) -> tuple[pd.DataFrame, Panels]:
    """Label every aggregated row with its panel title; the MAX_PANELS panels with most points are drawn."""
    if agg.empty:
        return agg.assign(panel=pd.Series(dtype=str)), Panels(list(columns), [], [])
    keys = agg[list(columns)].drop_duplicates()
    titles = [panel_title(dict(zip(columns, k, strict=True))) for k in keys.itertuples(index=False)]
    keys = keys.assign(panel=titles)
    labelled = agg.merge(keys, on=list(columns))
    counts = labelled.groupby("panel").size()
    keys = keys.assign(points=keys["panel"].map(counts), order=keys["mode"].map(MODE_ORDER).fillna(9))
    # Drawing order: modes fwd, bwd, fwd_bwd, then the other columns; ties in coverage keep it.
    keys = keys.sort_values(["order", *columns], kind="stable", ignore_index=True)
    kept = keys.sort_values("points", ascending=False, kind="stable").head(MAX_PANELS).sort_index()
    omitted = keys[~keys["panel"].isin(kept["panel"])]
    return labelled, Panels(list(columns), list(kept["panel"]), list(omitted["panel"]))


def resolve_baseline(kernel: pd.DataFrame, name: str | None) -> str | None:
    """The series named by ``--baseline`` (``variant/impl`` or a unique ``impl``); None = best baseline."""
    if name is None:
        return None
    series = sorted(set(kernel["series"]))
    matches = [s for s in series if s == name] or [s for s in series if s.split("/", 1)[-1] == name]
    if len(matches) != 1:
        why = "is ambiguous" if matches else "is not in these results"
        raise BadInput(f"--baseline {name!r} {why}; choose one of: {', '.join(series) or '(no kernel rows)'}")
    return matches[0]


def baseline_mask(frame: pd.DataFrame, baseline: str | None) -> pd.Series:
    """Rows of the baseline set: the one series chosen, or every series of the baseline family."""
    return frame["series"].eq(baseline) if baseline else frame["family"].eq(BASELINE_FAMILY)


def best_per_point(agg: pd.DataFrame, mask: pd.Series, prefix: str,
                   index: Sequence[str] = ("panel", "seq_len")) -> pd.DataFrame:
    """At each ``index`` (a point: panel and seq_len): the fastest series of ``agg[mask]`` and the
    leanest one, with values.

    Columns ``{prefix}_time``, ``{prefix}_time_series``, ``{prefix}_noisy``, ``{prefix}_launch_bound``,
    ``{prefix}_mem``, ``{prefix}_mem_series``."""
    subset = agg[mask]
    index = list(index)
    if subset.empty:
        columns = [f"{prefix}_{c}" for c in ("time", "time_series", "noisy", "launch_bound", "mem", "mem_series")]
        return pd.DataFrame(columns=index + columns)
    fastest = subset.loc[subset.groupby(index)["time_ms"].idxmin(),
                         [*index, "time_ms", "series", "noisy", "launch_bound"]]
    fastest.columns = [*index, f"{prefix}_time", f"{prefix}_time_series", f"{prefix}_noisy",
                       f"{prefix}_launch_bound"]
    with_mem = subset.dropna(subset=["peak_mem_bytes"])
    leanest = with_mem.loc[with_mem.groupby(index)["peak_mem_bytes"].idxmin(), [*index, "peak_mem_bytes", "series"]]
    leanest.columns = [*index, f"{prefix}_mem", f"{prefix}_mem_series"]
    return fastest.merge(leanest, on=index, how="outer")


def ratios(agg: pd.DataFrame, baseline: str | None) -> pd.DataFrame:
    """Every non-baseline series at every point that has a baseline: ``speedup`` = fastest baseline
    time / time (> 1 is faster) and ``mem_ratio`` = memory / leanest baseline memory (< 1 is leaner);
    ``noisy`` and ``launch_bound`` when either side is."""
    mask = baseline_mask(agg, baseline)
    best = best_per_point(agg, mask, "base")
    frame = agg[~mask].merge(best, on=["panel", "seq_len"], how="inner")
    return frame.assign(speedup=frame["base_time"] / frame["time_ms"],
                        mem_ratio=frame["peak_mem_bytes"] / frame["base_mem"],
                        noisy=frame["noisy"] | frame["base_noisy"].eq(True),
                        launch_bound=frame["launch_bound"] | frame["base_launch_bound"].eq(True))


def best_point(ratio: pd.DataFrame, column: str, better: str, timed: bool) -> pd.Series | None:
    """The point with the largest (``better="max"``) or smallest ratio. For a ``timed`` ratio, points
    that are not noisy come first, so a headline never rests on a noisy timing when a clean one
    exists (memory is measured once, deterministically: it is never noisy)."""
    valid = ratio.dropna(subset=[column])
    clean = valid[~valid["noisy"]] if timed else valid
    pool = clean if len(clean) else valid
    if pool.empty:
        return None
    return pool.loc[pool[column].idxmax() if better == "max" else pool[column].idxmin()]


def _full_scale(points: pd.DataFrame, achieved: str, percent: str) -> float | None:
    """The device figure a ``percent`` column is of (100 % of it), recovered from the rows where it is
    known as ``achieved`` ÷ ``percent``."""
    known = points.dropna(subset=[percent])
    known = known[known[percent] > 0]
    return float((100 * known[achieved] / known[percent]).median()) if len(known) else None


def device_peak(points: pd.DataFrame) -> float | None:
    """The device peak (TFLOP/s) behind ``pct_peak``."""
    return _full_scale(points, "tflops", "pct_peak")


def device_bandwidth(points: pd.DataFrame) -> float | None:
    """The device bandwidth (GB/s) behind ``pct_bandwidth``."""
    return _full_scale(points, "gbps", "pct_bandwidth")


def best_pct_peak(agg: pd.DataFrame, panels: Panels) -> pd.DataFrame:
    """Per (panel, series), the point with the highest % of device peak (only where it is known);
    panels in drawing order, the best series first."""
    columns = ["panel", "series", "seq_len", "tflops", "pct_peak"]
    known = agg.dropna(subset=["pct_peak"])
    if known.empty:
        return known[columns]
    best = known.loc[known.groupby(["panel", "series"])["pct_peak"].idxmax(), columns]
    order = best["panel"].map({title: i for i, title in enumerate(panels.titles)})
    return best.assign(order=order).sort_values(["order", "pct_peak"], ascending=[True, False])[columns]


def fit_exponent(n: Sequence[float], y: Sequence[float]) -> tuple[float, float]:
    """Least squares on log-log: y ≈ c·nᵖ. Returns (p, r²); needs two distinct n."""
    x, z = np.log(np.asarray(n, dtype=float)), np.log(np.asarray(y, dtype=float))
    p, c = np.polyfit(x, z, 1)
    residual = z - (p * x + c)
    total = ((z - z.mean()) ** 2).sum()
    return float(p), float(1 - (residual ** 2).sum() / total) if total > 0 else 1.0


@dataclass(frozen=True)
class Crossover:
    """Where a series becomes, and stays, faster than a reference across the measured range.

    ``outcome`` is "at" (``length`` is the log-log interpolated crossing), "always" (faster at every
    measured length) or "never" (not faster at the largest length)."""

    outcome: str
    length: float | None = None

    def text(self, first: int, last: int) -> str:
        if self.outcome == "at":
            return f"n ≈ {self.length:,.0f}"
        return f"faster throughout (n ≥ {first:,})" if self.outcome == "always" else f"never in range (n ≤ {last:,})"


def crossover(n: Sequence[float], ratio: Sequence[float]) -> Crossover:
    """``ratio`` = time / reference time at increasing ``n``. The crossing is taken after the last
    length where the series is not faster, so a series that wins early and loses later is "never"."""
    n, ratio = np.asarray(n, dtype=float), np.asarray(ratio, dtype=float)
    slower = np.flatnonzero(ratio >= 1)
    if slower.size == 0:
        return Crossover("always")
    i = slower[-1]
    if i == len(n) - 1:
        return Crossover("never")
    a, b = math.log(ratio[i]), math.log(ratio[i + 1])
    t = a / (a - b)  # where log ratio crosses 0 between n[i] and n[i + 1]
    return Crossover("at", math.exp(math.log(n[i]) + t * (math.log(n[i + 1]) - math.log(n[i]))))


def scaling(agg: pd.DataFrame) -> pd.DataFrame:
    """Per (panel, series): time and memory exponents with the fit range, and the crossover against
    the fastest standard implementation (family standard or baseline) for non-standard series."""
    best_standard = best_per_point(agg, agg["family"].isin(STANDARD_FAMILIES), "std")
    rows = []
    for (panel, series), group in agg.groupby(["panel", "series"], sort=False):
        group = group.sort_values("seq_len")
        row = {"panel": panel, "series": series, "family": group["family"].iloc[0],
               "n_min": int(group["seq_len"].min()), "n_max": int(group["seq_len"].max()),
               "points": len(group), "batch": _range_text(group["batch"])}
        for metric, column in (("time", "time_ms"), ("mem", "peak_mem_bytes")):
            valid = group[group[column] > 0]
            fit = fit_exponent(valid["seq_len"], valid[column]) if valid["seq_len"].nunique() >= 2 else None
            row[f"p_{metric}"], row[f"r2_{metric}"] = fit if fit else (None, None)
        if row["family"] not in STANDARD_FAMILIES:
            joined = group.merge(best_standard, on=["panel", "seq_len"]).dropna(subset=["std_time"])
            if not joined.empty:
                found = crossover(joined["seq_len"], joined["time_ms"] / joined["std_time"])
                row.update(crossover=found.text(int(joined["seq_len"].min()), int(joined["seq_len"].max())),
                           crossover_outcome=found.outcome, crossover_n=found.length)
        rows.append(row)
    columns = ["panel", "series", "family", "n_min", "n_max", "points", "batch", "p_time", "r2_time",
               "p_mem", "r2_mem", "crossover", "crossover_outcome", "crossover_n"]
    return pd.DataFrame(rows, columns=columns)


def distinct(column: pd.Series, write: Callable[[object], str] = str) -> str:
    """The column's distinct values (missing ones left out), written, sorted and comma-joined."""
    return ", ".join(sorted({write(v) for v in column.dropna().drop_duplicates().tolist()}))


def _range_text(values: pd.Series) -> str:
    low, high = values.min(), values.max()
    return f"{low:,}" if low == high else f"{low:,}–{high:,}"


def quality(kernel: pd.DataFrame) -> pd.DataFrame:
    """Per (series, dtype): worst error against the own float64 reference (output, and gradients where
    a gradient mode ran) and against exact softmax, how many points were checked and how many failed."""
    checked = kernel.dropna(subset=["err_ref", "err_softmax"], how="all")
    if checked.empty:
        return pd.DataFrame(columns=["series", "family", "dtype", "err_ref", "err_grad", "err_softmax", "checked",
                                     "incorrect"])
    checked = checked.assign(failed=checked["status"].eq("incorrect"),
                             err_grad=pd.to_numeric(checked["err_grad"]))
    table = checked.groupby(["series", "family", "dtype"], dropna=False).agg(
        err_ref=("err_ref", "max"), err_grad=("err_grad", "max"), err_softmax=("err_softmax", "max"),
        checked=("status", "size"), incorrect=("failed", "sum"))
    return table.reset_index()


def _where(kind: str, group: pd.DataFrame) -> str:
    """Where a group of rows of one kind ran: kernel points by modes and lengths, training runs by
    study (the ``study`` column of training rows)."""
    if kind == "train":
        return f"training · study {distinct(group['study'])}"
    return f"{distinct(group['mode'])} · n={_range_text(group['seq_len'])}"


def problems(measured: pd.DataFrame) -> pd.DataFrame:
    """Every non-ok row (kernel points, training runs), grouped by status then series, with counts,
    where they ran and the distinct reasons with how often each occurred."""
    bad = measured[measured["status"] != "ok"].assign(reason=lambda f: f["reason"].fillna("(no reason recorded)"))
    rows = []
    for (status, series, kind), group in bad.groupby(["status", "series", "kind"], sort=False, dropna=False):
        reasons = group["reason"].value_counts()
        rows.append({"status": status, "series": series, "count": len(group), "where": _where(kind, group),
                     "reasons": list(zip(reasons.index, reasons.to_numpy().tolist(), strict=True))})
    order = {s: i for i, s in enumerate(STATUSES)}
    table = pd.DataFrame(rows, columns=["status", "series", "count", "where", "reasons"])
    return table.sort_values(["status", "series"], key=lambda c: c.map(order).fillna(len(order))
                             if c.name == "status" else c, kind="stable")


def profiled_points(kernel: pd.DataFrame, folders: Mapping[str, str]) -> pd.DataFrame:
    """One row per profiled point (``folders``: point key -> profile folder): its series, the point and
    the median time of its ok rows, slowest first (as --profile-top chose them); a key without a row
    here keeps its folder, with series, point and time unknown."""
    rows = kernel[kernel["key"].isin(list(folders))]
    found = {}
    for key, group in rows.groupby("key", sort=False):
        first = group.iloc[0]
        point = {c: first[c] for c in PANEL_COLUMNS} | {"n": f"{first['seq_len']:,}", "batch": first["batch"],
                                                        "heads": first["heads"], "kv_heads": first["kv_heads"],
                                                        "arrangement": first["arrangement"]}
        found[key] = {"series": first["series"], "point": panel_title(point),
                      "time_ms": group.loc[group["status"] == "ok", "time_ms"].median()}
    table = pd.DataFrame([{"key": key, "series": None, "point": None, "time_ms": None, **found.get(key, {}),
                           "folder": folder} for key, folder in folders.items()],
                         columns=["key", "series", "point", "time_ms", "folder"])
    return table.sort_values("time_ms", ascending=False, na_position="last", kind="stable", ignore_index=True)


ENVIRONMENT_FIELDS = ("device_name", "device", "device_capability", "driver", "cpu_threads", "torch_version",
                      "cuda_version", "triton_version", "xformers_version", "python_version",
                      "harness_version", "git_commit", "hostname", "throttle")


def environment(rows: pd.DataFrame) -> pd.DataFrame:
    """One column per run: the environment fields (distinct values joined), when it ran, how long
    (first to last row written) and how many rows of each status."""
    columns = {}
    for run_id, run in rows.groupby("run_id", dropna=False, sort=True):
        when = pd.to_datetime(run["ts"], utc=True, errors="coerce").dropna()
        info = {f: distinct(run[f]) or "—" for f in ENVIRONMENT_FIELDS}
        if info["throttle"] == "—" and run["sm_clock_mhz"].notna().any():  # watched (NVML), never seen
            info["throttle"] = "none seen"
        info["started"] = f"{when.min():%Y-%m-%d %H:%M:%S %Z}" if len(when) else "—"
        info["duration"] = _duration(when.max() - when.min()) if len(when) else "—"
        counts = run["status"].value_counts()
        ordered = [s for s in STATUSES if s in counts] + [s for s in counts.index if s not in STATUSES]
        info["rows"] = ", ".join(f"{counts[s]} {s}" for s in ordered)
        columns[str(run_id)] = info
    return pd.DataFrame(columns)


def _duration(delta: pd.Timedelta) -> str:
    seconds = int(delta.total_seconds())
    return f"{seconds // 3600}h {seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m {seconds % 60:02d}s"


def times(x: float) -> str:
    """A ratio as people write it: 37×, 5.1×, 0.12×."""
    return f"{x:,.0f}×" if x >= 10 else f"{x:.2g}×"


# The summary's lines where points ran but none has a reference beside it (the ratio section says
# NO_RATIO too).
NO_RATIO = "No point has both a baseline and another series measured, so there are no speed-ups to report."
NO_DECODE_RATIO = ("No cache length has both a standard step and another series measured, so there are no "
                   "decode speed-ups to report.")


def _faster(speedup: float) -> str:
    """A speed-up in words: "23× faster than", "2.5× slower than"."""
    return f"{times(speedup)} faster than" if speedup >= 1 else f"{times(1 / speedup)} slower than"


def _full_stop(noisy: bool) -> str:
    """A headline's end: a timed ratio on a noisy point says so."""
    return "; this point is noisy." if noisy else "."


def _best_sentence(ratio: pd.DataFrame, panel: str, against: str) -> str:
    """The series with the best speed-up at the largest length of a panel that has a baseline."""
    at = ratio[ratio["seq_len"] == ratio["seq_len"].max()]
    best = at.loc[at["speedup"].idxmax()]
    text = (f"At n={best['seq_len']:,} ({panel}), {best['series']} is {_faster(best['speedup'])} {against} "
            f"({best['base_time_series']})")
    if pd.notna(best["mem_ratio"]):
        whose = "its" if best["base_mem_series"] == best["base_time_series"] else \
            f"the leanest baseline's ({best['base_mem_series']})"
        text += f" and uses {times(best['mem_ratio'])} {whose} peak memory"
    return text + _full_stop(best["noisy"])


def _decode_sentence(best: pd.Series) -> str:
    """A decode panel's headline (its row of decode_leaders): the best step against the best standard one."""
    text = (f"Decoding against a cache of n={best['seq_len']:,} ({best['panel']}), {best['series']} takes "
            f"{best['time_ms']:.3g} ms a step, {_faster(best['speedup'])} the fastest standard step "
            f"({best['std_time_series']}, {best['std_time']:.3g} ms)")
    if pd.notna(best["cache_ratio"]):
        text += f", and keeps {times(best['cache_ratio'])} the standard cache"
    return text + _full_stop(best["noisy"])


def _crossover_sentence(fits: pd.DataFrame, panel: str, reference: str) -> list[str]:
    """How many non-standard series of a panel overtake the fastest standard ``reference``, and the
    earliest."""
    contenders = fits[(fits["panel"] == panel) & fits["crossover_outcome"].notna()]
    if contenders.empty:
        return []
    wins = contenders[contenders["crossover_outcome"].isin(["at", "always"])]
    crossing = wins[wins["crossover_outcome"] == "at"].sort_values("crossover_n")
    earliest = (f" (earliest crossing: {crossing['series'].iloc[0]} at n ≈ {crossing['crossover_n'].iloc[0]:,.0f})"
                if len(crossing) else "")
    return [f"{len(wins)} of {len(contenders)} non-standard series overtake the fastest standard "
            f"{reference} within the measured range{earliest}."]


def _flagged(column: str, *timings: Timings) -> int:
    """Aggregated points with this flag, over the timings of every mode (each section draws its own marked)."""
    return sum(int(t.agg[column].sum()) for t in timings)


def _ratio_clause(time: float, mem: float, of: str) -> str:
    """"0.42× the time and 0.55× the memory of ``of``", the memory left out where it is unknown."""
    return f"{times(time)} the time" + (f" and {times(mem)} the memory" if pd.notna(mem) else "") + f" of {of}"


def gqa_leader(points: pd.DataFrame) -> pd.Series | None:
    """The grouped point at the largest n and the largest GQA ratio of ``points`` whose time falls most
    against its multi-head point (a clean timing first, as best_point chooses)."""
    largest = at_largest(points, ["panel"])
    return best_point(largest[largest["gqa_ratio"] == largest["gqa_ratio"].max()], "time_ms_vs_mha", "min", True)


def _gqa_sentence(points: pd.DataFrame, panel: str) -> str:
    """A grouped-heads panel's headline (``points``: its rows of grouped_heads)."""
    best = gqa_leader(points)
    against = _ratio_clause(best["time_ms_vs_mha"], best["peak_mem_bytes_vs_mha"], "its multi-head point")
    text = (f"Grouped-query heads ({panel}): at heads ÷ kv_heads = {best['gqa_ratio']:g} and "
            f"n={best['seq_len']:,}, {best['series']} takes {against}")
    if pd.notna(best["cache_bytes_vs_mha"]):
        text += f" and keeps {times(best['cache_bytes_vs_mha'])} its cache"
    return text + _full_stop(best["noisy"])


def _layout_sentence(compared: ByLayout, panel: str) -> str:
    """A layout panel's headline: per family group at its largest n, the best of the first layout against
    the best of each other one."""
    first, *others = compared.layouts
    length = "a mean cache length of n=" if compared.decode else "n="
    clauses = []
    for group, rows in compared.families[compared.families["panel"] == panel].groupby("group", sort=False):
        best = rows.loc[rows["seq_len"].idxmax()]
        against = [_ratio_clause(best[f"time_vs_{other}"], best[f"mem_vs_{other}"],
                                 f"the best {compared.word(other)} one")
                   for other in others if pd.notna(best[f"time_vs_{other}"])]
        noisy = " (noisy)" if best["noisy"] else ""
        clauses.append(f"the best {compared.word(first)} {group} impl takes {' and '.join(against)} at "
                       f"{length}{best['seq_len']:,}{noisy}")
    what = "Ragged decode beside uniform" if compared.decode else "Packed documents against padding"
    return f"{what} ({panel}): {'; '.join(clauses)}."


def _shape_sentences(shapes: Shapes) -> list[str]:
    """The headlines of the first panels of grouped heads and of layouts."""
    sentences = [_gqa_sentence(rows, panel) for gqa in shapes.gqa
                 for panel, rows in gqa.panels.split(gqa.points)[:SUMMARY_PANELS]]
    return sentences + [_layout_sentence(compared, panel) for compared in (shapes.packed, shapes.ragged)
                        for panel in compared.panels.titles[:SUMMARY_PANELS]]


def summary(kernel: pd.DataFrame, full: Timings, decode: Timings, baseline: str | None,
            shapes: Shapes) -> list[str]:
    """The headline paragraph, as sentences written from the data of every mode: for the first panels
    of full-sequence calls, the best series at the largest length that has a baseline and where series
    overtake standard attention; for the first decode panels, the best step against the best standard
    one at the largest cache length and the same crossovers; for the first panels of grouped heads and
    layouts, their headlines; then what ran, what went wrong and what is flagged, over every kernel row."""
    against = "the chosen baseline" if baseline else "the best baseline"
    sentences = []
    for panel in full.panels.titles[:SUMMARY_PANELS]:
        here = full.ratio[full.ratio["panel"] == panel]
        if len(here):
            sentences.append(_best_sentence(here, panel, against))
        sentences += _crossover_sentence(full.fits, panel, "implementation")
    if len(full.agg) and full.ratio.empty:
        sentences.append(NO_RATIO)
    leaders = decode_leaders(decode)
    for panel in decode.panels.titles[:SUMMARY_PANELS]:
        sentences += [_decode_sentence(best) for _, best in leaders[leaders["panel"] == panel].iterrows()]
        sentences += _crossover_sentence(decode.fits, panel, "step")
    if len(decode.agg) and leaders.empty:
        sentences.append(NO_DECODE_RATIO)
    sentences += _shape_sentences(shapes)
    if full.agg.empty and decode.agg.empty:
        sentences.append("No kernel point ran successfully.")
    bad = int((kernel["status"] != "ok").sum())
    noisy = _flagged("noisy", full, decode)
    sentences.append(f"{len(kernel):,} kernel rows: {len(kernel) - bad:,} ok, {bad:,} with problems "
                     f"(listed under Problems); {noisy:,} aggregated points are noisy and drawn hollow.")
    if launch_bound := _flagged("launch_bound", full, decode):
        sentences.append(f"{launch_bound:,} points are launch-bound (Python took at least as long to enqueue the "
                         "call as the device took to run it) and are drawn crossed.")
    for timings, kind, section in ((full, "", "Time and memory"), (decode, "decode ", "Decoding")):
        if timings.panels.omitted:
            sentences.append(f"{len(timings.panels.omitted)} further {kind}panels are not drawn (only the "
                             f"{MAX_PANELS} with the most points are; the others are named under {section}).")
    return sentences


# --- the speed, memory and recall frontier ---------------------------------------------------------

# The recall axis: the MQAR study of the training presets (bench/presets/train/{quick,recall}.toml).
RECALL_STUDY, RECALL_TASK = "recall", "mqar"
# A full-sequence point's configuration: the frontier compares variants at one of them per device.
CONFIG_COLUMNS = ["dtype", "head_dim", "causal", "batch", "heads"]
FRONTIER_COLUMNS = ["device_name", "variant", "family", "impl", "seq_len", "config", "time_ms", "cache_impl",
                    "cache_len", "cache_bytes", "recall", "recall_std", "seeds", "on_front"]


def pareto_front(time: pd.Series, quality: pd.Series) -> pd.Series:
    """Whether each point is on the Pareto front of (least time, most quality): no other point is at
    least as fast and as good, and strictly one of the two. Equal points do not dominate each other
    (both are on it); a point missing either value is never on it."""
    valid = time.notna() & quality.notna()
    t, q = time[valid].to_numpy(dtype=float), quality[valid].to_numpy(dtype=float)
    dominated = ((t[None, :] <= t[:, None]) & (q[None, :] >= q[:, None])
                 & ((t[None, :] < t[:, None]) | (q[None, :] > q[:, None]))).any(axis=1)
    front = pd.Series(False, index=time.index)
    front[valid] = ~dominated
    return front


def _device(rows: pd.DataFrame) -> pd.Series:
    return rows["device_name"].fillna(rows["device"])


def _plain(rows: pd.DataFrame) -> pd.DataFrame:
    """Dense rows with as many key/value heads as query heads: what every variant ran alike."""
    shape = shape_columns(rows)
    return rows[shape["layout"].eq(DENSE) & shape["kv_heads"].eq(pd.to_numeric(rows["heads"]))]


def _fastest_impl(rows: pd.DataFrame, column: str, keys: list[str]) -> pd.DataFrame:
    """Per ``keys`` + variant, the impl with the least median ``column`` (over repeated rows of a point;
    an impl run with several params counts each apart)."""
    point = [*keys, "variant", "family", "impl", "params"]
    medians = rows.groupby(point, dropna=False, as_index=False)[column].median()
    return medians.loc[medians.groupby([*keys, "variant"], dropna=False)[column].idxmin()]


def frontier_speed(kernel: pd.DataFrame) -> pd.DataFrame:
    """Per device and variant, its fastest impl's fwd_bwd time (ok dense rows) at the device's largest
    fwd_bwd length, in the configuration (dtype, head_dim, causal, batch, heads) most variants ran
    there: ``seq_len``, ``config`` (in words), ``impl``, ``time_ms``."""
    ok = _plain(kernel[(kernel["status"] == "ok") & kernel["mode"].eq("fwd_bwd") & kernel["time_ms"].notna()])
    frames = []
    for _, rows in ok.assign(device_name=_device(ok)).groupby("device_name", sort=True):
        at = rows[rows["seq_len"] == rows["seq_len"].max()]
        counts = at.groupby(CONFIG_COLUMNS)["variant"].nunique()
        config = counts.index[counts.to_numpy().argmax()]  # most variants; the first such on a tie
        chosen = at[(at[CONFIG_COLUMNS] == pd.Series(config, index=CONFIG_COLUMNS)).all(axis=1)]
        words = panel_title({"mode": "fwd_bwd", **dict(zip(CONFIG_COLUMNS, config, strict=True))})
        frames.append(_fastest_impl(chosen, "time_ms", ["device_name", "seq_len"]).assign(config=words))
    columns = ["device_name", "variant", "family", "impl", "seq_len", "config", "time_ms"]
    return pd.concat(frames, ignore_index=True)[columns] if frames else pd.DataFrame(columns=columns)


def frontier_cache(kernel: pd.DataFrame) -> pd.DataFrame:
    """Per device and variant, the least cache (or state) bytes of its impls' ok decode steps at the
    device's largest decode length: ``cache_impl``, ``cache_len``, ``cache_bytes``."""
    ok = _plain(kernel[(kernel["status"] == "ok") & kernel["mode"].eq(DECODE) & kernel["cache_bytes"].notna()])
    ok = ok.assign(device_name=_device(ok))
    at = ok[ok["seq_len"] == ok.groupby("device_name")["seq_len"].transform("max")]
    best = _fastest_impl(at, "cache_bytes", ["device_name", "seq_len"])
    return best.rename(columns={"impl": "cache_impl", "seq_len": "cache_len"})[
        ["device_name", "variant", "cache_impl", "cache_len", "cache_bytes"]]


def _recall_runs(train: pd.DataFrame) -> pd.DataFrame:
    """The ok runs of the training study ``recall`` on MQAR."""
    return train[(train["status"] == "ok") & train["study"].eq(RECALL_STUDY) & train["task"].eq(RECALL_TASK)]


def frontier_recall(train: pd.DataFrame) -> pd.DataFrame:
    """Per variant, MQAR recall of the study ``recall`` (ok rows): the mean and standard deviation over
    seeds of the held-out accuracy after training, of its best impl, and how many seeds."""
    ok = _recall_runs(train)
    per_impl = ok.groupby(["variant", "family", "impl"], as_index=False).agg(
        recall=("accuracy", "mean"), recall_std=("accuracy", "std"), seeds=("seed", "nunique"))
    best = per_impl.loc[per_impl.groupby("variant")["recall"].idxmax()] if len(per_impl) else per_impl
    return best[["variant", "family", "recall", "recall_std", "seeds"]]


def recall_curves(train: pd.DataFrame) -> pd.DataFrame:
    """The training curves of the recall study's ok runs that kept one (schema 4): one row per run,
    ``variant``, ``impl``, ``seed``, ``accuracy``, ``step`` (each window's middle, the steps spread evenly) and
    ``loss`` (that window's mean training loss), the two as lists."""
    ok = _recall_runs(train)
    if "loss_curve" not in ok:
        return pd.DataFrame(columns=["variant", "impl", "seed", "accuracy", "step", "loss"])
    ok = ok[ok["loss_curve"].notna()]
    losses = [json.loads(text) for text in ok["loss_curve"]]
    steps = [[steps * (i + 0.5) / len(curve) for i in range(len(curve))]
             for steps, curve in zip(ok["steps"], losses, strict=True)]
    return ok[["variant", "impl", "seed", "accuracy"]].assign(step=steps, loss=losses).sort_values(
        ["variant", "impl", "seed"], ignore_index=True)


def frontier(kernel: pd.DataFrame, train: pd.DataFrame) -> pd.DataFrame:
    """Per device and variant: fwd_bwd time (frontier_speed), decode cache (frontier_cache) and MQAR
    recall (frontier_recall), joined by variant name; a value a variant lacks is NaN. ``on_front``:
    on the device's Pareto front of (least time, most recall), only variants with both."""
    speed, recall = frontier_speed(kernel), frontier_recall(train)
    frames = []
    for device, rows in speed.groupby("device_name", sort=True):
        joined = rows.merge(recall, on="variant", how="outer", suffixes=("", "_trained"))
        joined = joined.assign(device_name=device, family=joined["family"].fillna(joined["family_trained"]),
                               seq_len=rows["seq_len"].iloc[0], config=rows["config"].iloc[0])
        frames.append(joined.assign(on_front=pareto_front(joined["time_ms"], joined["recall"])))
    if not frames:
        return pd.DataFrame(columns=FRONTIER_COLUMNS)
    table = pd.concat(frames, ignore_index=True).merge(frontier_cache(kernel), on=["device_name", "variant"],
                                                       how="left")
    return table.sort_values(["device_name", "time_ms", "variant"], na_position="last", ignore_index=True)[
        FRONTIER_COLUMNS]
