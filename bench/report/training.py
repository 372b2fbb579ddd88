"""Pure computations behind the report's training sections (rows with kind == "train"): pandas only,
like analysis, so every table and sentence can be unit-tested from a table.

A *study* (``"study"`` in a row's params JSON) is one grid: series (variant/impl) × accum_steps ×
layer_sharing × gelu × seeds, on one task. A *setting* is a grid point without its seed; the rows
of a setting (seeds, repeated runs) are aggregated: task quality as mean ± std, times and memory as
medians. Each trick's table covers the studies where that trick takes several values; task quality
per attention covers the studies that compare several series or vary nothing.
"""

from __future__ import annotations

import json
from collections.abc import Hashable
from dataclasses import dataclass

import pandas as pd
import pyarrow as pa

from ..store import COLUMNS
from .analysis import distinct, json_object, times, with_series
from .reference import GELU_ERRORS

# The grid's dimensions besides the seed, and how a value of each is written in a setting's label.
DIMENSIONS = ("series", "accum_steps", "layer_sharing", "gelu")
LABELS = {"series": "{}", "accum_steps": "k={}", "layer_sharing": "{}", "gelu": "gelu {}"}
SHARING_ORDER = ("unshared", "shared", "untied")
# Accumulated against full-batch gradient: float32 summation order alone gives ~2e-7
# (docs/published-figures.md, "Gradient accumulation check"), a wrong loss normalisation percents. Dtypes not listed get no pass mark.
GRAD_TOLERANCE = {"float32": 1e-5}
INTEGER_COLUMNS = {name: "Int64" for name, kind in COLUMNS.items() if pa.types.is_integer(kind)}
# A cost ratio within [1/SIMILAR, SIMILAR] is written "about the same".
SIMILAR = 1.25
# Sentences list every setting up to this many, else the best two and the last.
LISTED = 4


@dataclass(frozen=True)
class Metric:
    column: str
    name: str
    higher_better: bool

    def text(self, mean: float, std: float | None = None) -> str:
        return f"{mean:.3f}" + (f" ± {std:.3f}" if std is not None and pd.notna(std) else "")


# A study's quality is the first of these its rows carry (mqar rows have accuracy, bytes rows bpb).
METRICS = (Metric("accuracy", "accuracy", True), Metric("bpb", "bits per byte", False))


def _setting(settings: dict, *path: str) -> object:
    """``settings[path[0]][path[1]]…``; None where a level is missing or not an object."""
    value: object = settings
    for key in path:
        value = value.get(key) if isinstance(value, dict) else None
    return value


def train_rows(rows: pd.DataFrame) -> pd.DataFrame:
    """Training rows with ``study``, ``layers`` and ``untie_at`` from their params JSON, and
    ``series``: variant/impl, plus the attention params where one (variant, impl) ran with several."""
    # Integer columns read back as floats when other kinds leave them empty (kernel rows have no
    # accum_steps): restore integers, so k=8 is not written 8.0.
    train = rows[rows["kind"] == "train"].astype({c: t for c, t in INTEGER_COLUMNS.items() if c in rows})
    params = train["params"].fillna("")
    settings = {p: json_object(p) or {} for p in params.unique()}
    attention = {p: json.dumps(_setting(s, "attention") or {}, sort_keys=True) for p, s in settings.items()}
    study = {p: str(_setting(s, "study") or "(no study)") for p, s in settings.items()}
    layers = {p: _setting(s, "model", "layers") for p, s in settings.items()}
    untie_at = {p: _setting(s, "untie_at") for p, s in settings.items()}
    framed = with_series(train.assign(params=params.map(attention)))
    return framed.assign(params=train["params"], study=params.map(study), layers=params.map(layers),
                         untie_at=params.map(untie_at))


@dataclass(frozen=True, eq=False)
class Study:
    name: str
    rows: pd.DataFrame  # every row of the study, any status
    varies: tuple[str, ...]  # the DIMENSIONS that take several values
    metric: Metric | None

    @property
    def compares_series(self) -> bool:
        """Whether its quality table compares attention: several series, or no dimension varied."""
        return "series" in self.varies or not self.varies

    def description(self) -> str:
        """Task, budget and model of the grid, as one line."""
        rows, first = self.rows, json_object(self.rows["params"].iloc[0]) or {}
        model = _setting(first, "model") or {}
        parts = [f"task {distinct(rows['task'])}"]
        corpus = distinct(rows["corpus"])
        if corpus:
            parts[0] += f" ({corpus})"
        parts.append(f"{distinct(rows['steps'], _number)} steps of batch {distinct(rows['batch'], _number)}")
        parts.append(f"model {', '.join(f'{k}={v}' for k, v in model.items())}" if model else "")
        parts.append(f"{rows['seed'].nunique()} seed{'s' if rows['seed'].nunique() > 1 else ''}")
        parts.append(distinct(rows["device_name"].fillna(rows["device"])))
        return " · ".join(p for p in parts if p)


def _number(value: object) -> str:
    """An integer with its thousands grouped (a step count, a batch), anything else as it is."""
    return f"{value:,}" if isinstance(value, int) else str(value)


def studies(train: pd.DataFrame) -> list[Study]:
    """One Study per study name, in the order they ran (earliest row first)."""
    found = []
    for name, rows in train.groupby("study", sort=False):
        varies = tuple(d for d in DIMENSIONS if rows[d].nunique(dropna=False) > 1)
        metric = next((m for m in METRICS if rows[m.column].notna().any()), None)
        found.append((rows["ts"].min(), str(name), Study(str(name), rows, varies, metric)))
    return [study for *_, study in sorted(found, key=lambda f: (str(f[0]), f[1]))]


def with_trick(grids: list[Study], dimension: str) -> list[Study]:
    return [s for s in grids if dimension in s.varies]


def settings(study: Study, dimension: str | None) -> pd.DataFrame:
    """One row per setting of the study's ok rows. ``label`` names the setting by the varying
    dimensions other than ``dimension`` (the table's own), or by its series when there are none."""
    ok = study.rows[study.rows["status"] == "ok"]
    quality = ok[study.metric.column] if study.metric else pd.Series(float("nan"), index=ok.index)
    grouped = ok.assign(quality=quality).groupby(list(DIMENSIONS), dropna=False, sort=True)
    median = {c: (c, "median") for c in ("step_time_ms", "time_ms_p20", "time_ms_p80", "tokens_per_s",
                                         "peak_mem_bytes", "n_params", "opt_state_bytes", "grad_bytes")}
    first = {c: (c, "first") for c in ("family", "dtype", "micro_batch", "layers", "untie_at")}
    table = grouped.agg(**first, **median, grad_rel_err=("grad_rel_err", "max"),
                        gelu_max_abs_err=("gelu_max_abs_err", "max"), quality=("quality", "mean"),
                        quality_std=("quality", "std"), samples=("status", "size")).reset_index()
    others = [d for d in study.varies if d != dimension]
    labels = [" · ".join(LABELS[d].format(r[d]) for d in others) or str(r["series"])
              for r in table.to_dict("records")]
    texts = [study.metric.text(q, s) if study.metric and pd.notna(q) else None
             for q, s in zip(table["quality"], table["quality_std"], strict=True)]
    # Training steps are timed whole (a step per sample): neither flag of kernel timings applies.
    return table.assign(label=labels, quality_text=texts, noisy=False, launch_bound=False)


def _ratio_to(table: pd.DataFrame, is_base: pd.Series, columns: tuple[str, ...]) -> pd.DataFrame:
    """``{column}_ratio`` = value ÷ the value in the base row of the same label (``is_base`` marks
    at most one row per label); NaN where a label has no base row."""
    base = table[is_base].set_index("label")
    return table.assign(**{f"{c}_ratio": table[c] / table["label"].map(base[c]) for c in columns})


def _grad_check(k: int, err: float, tolerance: float | None) -> str | None:
    if k == 1:
        return "reference"  # k = 1 is the full batch: nothing to compare
    if pd.isna(err) or tolerance is None or pd.isna(tolerance):
        return None
    return "pass" if err <= tolerance else "fail"


def accumulation(study: Study) -> pd.DataFrame:
    """Per setting and k: cost against k = 1 (``peak_mem_bytes_ratio``, ``step_time_ms_ratio``) and
    ``grad_check``: "pass" when the accumulated gradient is within GRAD_TOLERANCE of the full batch's."""
    table = settings(study, "accum_steps").sort_values(["label", "accum_steps"], ignore_index=True)
    table = _ratio_to(table, table["accum_steps"] == 1, ("peak_mem_bytes", "step_time_ms", "tokens_per_s"))
    tolerance = table["dtype"].map(GRAD_TOLERANCE)
    checks = [_grad_check(k, e, t) for k, e, t in zip(table["accum_steps"], table["grad_rel_err"], tolerance,
                                                      strict=True)]
    return table.assign(tolerance=tolerance, grad_check=checks)


def sharing(study: Study) -> pd.DataFrame:
    """Per setting and sharing mode: counts and costs, and each ÷ the unshared model's."""
    table = settings(study, "layer_sharing")
    rank = {mode: i for i, mode in enumerate(SHARING_ORDER)}
    table = table.assign(order=table["layer_sharing"].map(rank).fillna(len(rank)))
    table = table.sort_values(["label", "order"], ignore_index=True)
    return _ratio_to(table, table["layer_sharing"] == "unshared",
                     ("n_params", "opt_state_bytes", "grad_bytes", "peak_mem_bytes", "step_time_ms"))


def gelu(study: Study) -> pd.DataFrame:
    """Per setting and GELU form: measured max |error| beside the published one, step time ÷ exact's."""
    table = settings(study, "gelu").sort_values(["label", "gelu_max_abs_err"], ignore_index=True)
    published = table["gelu"].map(lambda form: GELU_ERRORS.get(form))
    table = table.assign(published=published.map(lambda e: e.max_abs_err if e else None),
                         published_at=published.map(lambda e: e.at_abs_x if e else None))
    return _ratio_to(table, table["gelu"] == "exact", ("step_time_ms",))


def quality(study: Study) -> pd.DataFrame:
    """Every setting, best quality first (missing quality last), then the faster first."""
    table = settings(study, None)
    ascending = not (study.metric and study.metric.higher_better)
    return table.sort_values(["quality", "step_time_ms"], ascending=[ascending, True], na_position="last",
                             ignore_index=True)


# --- sentences written from the tables ----------------------------------------------------------

def _similar(ratio: float) -> bool:
    return 1 / SIMILAR <= ratio <= SIMILAR


def _prefix(study: Study, table: pd.DataFrame, label: Hashable) -> str:
    """"In study NAME" and, when the table holds several settings, which one a sentence is about."""
    return f"In study {study.name}" + (f" ({label})" if table["label"].nunique() > 1 else "")


def _listing(table: pd.DataFrame, metric: Metric, names: str = "label") -> list[str]:
    """"name value" per row with a quality: every row up to LISTED, else the first two, …, the last."""
    rated = table.dropna(subset=["quality"])
    items = [f"{name} {metric.text(q)}" for name, q in zip(rated[names], rated["quality"], strict=True)]
    return items if len(items) <= LISTED else [*items[:2], "…", items[-1]]


def quality_sentence(study: Study, table: pd.DataFrame) -> str | None:
    """The best setting's quality, then the others' (``table`` is sorted best first)."""
    rated = table.dropna(subset=["quality"])
    if study.metric is None or rated.empty:
        return None
    best, rest = rated.iloc[0], _listing(rated.iloc[1:], study.metric)
    tasks = distinct(study.rows["task"])
    text = (f"On {tasks} (study {study.name}), {best['label']} reaches {study.metric.name} "
            f"{study.metric.text(best['quality'])}")
    return text + (f"; {', '.join(rest)}." if rest else ".")


def accumulation_sentence(study: Study, table: pd.DataFrame) -> str | None:
    """Memory and time at the largest k against k = 1, and the gradient check over every k."""
    for label, group in table.groupby("label", sort=False):
        top = group.loc[group["accum_steps"].idxmax()]
        if top["accum_steps"] == 1 or pd.isna(top["peak_mem_bytes_ratio"]):
            continue
        text = (f"{_prefix(study, table, label)}, accumulating k = {top['accum_steps']} micro-batches of "
                f"{top['micro_batch']} needs {times(top['peak_mem_bytes_ratio'])} the peak memory of one "
                f"batch of {top['accum_steps'] * top['micro_batch']} (k = 1) and "
                f"{times(top['step_time_ms_ratio'])} its step time")
        checked = table[table["grad_check"].isin(["pass", "fail"])]
        if checked.empty:
            return text + "."
        failed = checked[checked["grad_check"] == "fail"]
        tolerance, dtype = checked["tolerance"].iloc[0], checked["dtype"].iloc[0]
        if failed.empty:
            return text + (f"; the accumulated gradient matches the full batch's within a relative error of "
                           f"{checked['grad_rel_err'].max():.1e} at every k (pass: ≤ {tolerance:.0e} in {dtype}).")
        ks = ", ".join(map(str, sorted(failed["accum_steps"].unique())))
        return text + (f"; the accumulated gradient differs from the full batch's by up to "
                       f"{failed['grad_rel_err'].max():.1e} at k = {ks}, above the {tolerance:.0e} {dtype} "
                       "tolerance.")
    return None


def sharing_sentence(study: Study, table: pd.DataFrame) -> str | None:
    """What sharing one block cuts (parameters, optimizer state) and what it leaves (time, memory)."""
    for label, group in table.groupby("label", sort=False):
        by = group.set_index("layer_sharing")
        if "shared" not in by.index or pd.isna(by.loc["shared", "n_params_ratio"]):
            continue
        shared = by.loc["shared"]
        layers = shared["layers"]
        across = f"the L = {layers} layers" if pd.notna(layers) else "every layer"
        cut = 1 / shared["n_params_ratio"]
        text = (f"{_prefix(study, table, label)}, sharing one block across {across} cuts the unique "
                f"parameters {times(cut)} and the optimizer state {times(1 / shared['opt_state_bytes_ratio'])}")
        if pd.notna(layers) and cut < 0.9 * layers:
            text += " (less than L: parameters outside the blocks, such as the embedding, are held once either way)"
        time_ratio, mem_ratio = shared["step_time_ms_ratio"], shared["peak_mem_bytes_ratio"]
        if _similar(time_ratio) and _similar(mem_ratio):
            text += (f", while the step time ({times(time_ratio)} the unshared model's) and the peak memory "
                     f"({times(mem_ratio)}) stay about the same: sharing saves parameters, not FLOPs or "
                     "activation memory.")
        else:
            text += (f"; its step time is {times(time_ratio)} and its peak memory {times(mem_ratio)} the "
                     "unshared model's.")
        if study.metric is not None and group["quality"].notna().any():
            text += f" {study.metric.name.capitalize()}: {', '.join(_listing(group, study.metric, 'layer_sharing'))}."
        return text
    return None


def gelu_sentence(study: Study, table: pd.DataFrame) -> str | None:
    """Measured against published errors, and step time against exact GELU."""
    label = table["label"].iloc[0] if len(table) else None
    group = table[(table["label"] == label) & table["published"].notna()]
    if group.empty:
        return None
    errors = ", ".join(f"{r['gelu']} {r['gelu_max_abs_err']:.2e} (published {r['published']:.2e})"
                       for r in group.to_dict("records"))
    text = f"{_prefix(study, table, label)}, the max |error| against exact GELU is {errors}"
    timed = group.dropna(subset=["step_time_ms_ratio"])
    if len(timed):
        text += "; step time " + ", ".join(f"{g} {times(r)}" for g, r in
                                           zip(timed["gelu"], timed["step_time_ms_ratio"], strict=True)) + " of exact"
    return text + "."


def summary(grids: list[Study]) -> list[str]:
    """The training sentences of every study, as the sections write them."""
    sentences = []
    for study in grids:
        if study.compares_series:
            sentences.append(quality_sentence(study, quality(study)))
        if "accum_steps" in study.varies:
            sentences.append(accumulation_sentence(study, accumulation(study)))
        if "layer_sharing" in study.varies:
            sentences.append(sharing_sentence(study, sharing(study)))
        if "gelu" in study.varies:
            sentences.append(gelu_sentence(study, gelu(study)))
    return [s for s in sentences if s]
