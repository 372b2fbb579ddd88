"""``bench compare OLD NEW``: what got faster, slower, leaner or heavier between two runs.

Points are joined on the point key (column ``key``). Only points ok in both runs are compared; a
point whose status differs is a status change, one in a single run is new or missing. A timing
change is real only when the p20–p80 intervals do not overlap *and* the ratio is beyond the
threshold; memory (measured once, deterministically) only needs the threshold. A regression is a
point slower or heavier beyond that: the command then exits 1, so CI can gate on it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from rich.table import Table
from rich.text import Text

from .errors import BadInput
from .store import KEY_COLUMNS, read_results

FORMATS = ("table", "json", "markdown")
# Verdicts in the order they are listed: regressions first.
CHANGES = ("slower", "heavier", "status", "faster", "leaner", "new", "missing")
POINT_COLUMNS = [c for c in KEY_COLUMNS if c != "kind"] + ["q_len"]  # q_len: decode points


@dataclass(frozen=True)
class Comparison:
    old: str
    new: str
    threshold: float
    points: pd.DataFrame  # one row per key: point columns, both sides' values, ratios and verdicts

    def counts(self) -> dict[str, int]:
        counts = {c: int(self.points["changes"].map(lambda cs, c=c: c in cs).sum()) for c in CHANGES}
        counts["unchanged"] = int(self.points["changes"].map(len).eq(0).sum())
        return counts

    @property
    def regression(self) -> bool:
        """Slower, heavier, or a point that was ok and is not any more (broken, OOM, gone)."""
        broke = self.points["old_status"].eq("ok") & self.points["new_status"].ne("ok")
        return bool(self.points["time"].eq("slower").any() or self.points["memory"].eq("heavier").any()
                    or broke.any())

    def changed(self) -> pd.DataFrame:
        """Points with any change, regressions first, the largest ratios first within a kind."""
        changed = self.points[self.points["changes"].map(len) > 0]
        rank = changed["changes"].map(lambda cs: min(CHANGES.index(c) for c in cs))
        size = np.fmax(changed["time_ratio"].map(_distance), changed["mem_ratio"].map(_distance))
        return changed.assign(_rank=rank, _size=size).sort_values(
            ["_rank", "_size"], ascending=[True, False], kind="stable").drop(columns=["_rank", "_size"])


def _distance(ratio: float) -> float:
    """How far a ratio is from 1 on a log scale (2× and 0.5× are equally far)."""
    return abs(math.log(ratio)) if ratio and ratio > 0 and math.isfinite(ratio) else 0.0


def load(path: Path) -> pd.DataFrame:
    """One row per key: when a key occurs more than once (a folder holding several runs), the
    latest row wins."""
    rows = read_results([path]).dropna(subset=["key"])
    return rows.sort_values("ts", kind="stable").drop_duplicates("key", keep="last").set_index("key")


def _overlap(old_low: pd.Series, old_high: pd.Series, new_low: pd.Series, new_high: pd.Series) -> pd.Series:
    """Whether the two p20–p80 intervals overlap (False where either is unknown)."""
    known = old_low.notna() & old_high.notna() & new_low.notna() & new_high.notna()
    return known & (old_low <= new_high) & (new_low <= old_high)


def _ratio(new: pd.Series, old: pd.Series) -> pd.Series:
    ratio = new.astype(float) / old.astype(float)
    return ratio.mask((new == 0) & (old == 0), 1.0)  # 0 → 0 bytes is no change, not 0/0


def _verdict(ratio: pd.Series, inside: pd.Series, better: str, worse: str) -> pd.Series:
    verdict = np.where(ratio < 1, better, worse)
    verdict = np.where(inside, "unchanged", verdict)
    return pd.Series(verdict, index=ratio.index, dtype=object).where(ratio.notna(), None)


def compare(old_path: Path, new_path: Path, threshold: float = 0.05) -> Comparison:
    if not (isinstance(threshold, float | int) and math.isfinite(threshold) and threshold > 0):
        raise BadInput(f"--threshold must be a positive number (a relative change, e.g. 0.05), got {threshold}")
    old, new = load(old_path), load(new_path)
    keys = old.index.union(new.index)
    old, new = old.reindex(keys), new.reindex(keys)
    frame = new[POINT_COLUMNS].combine_first(old[POINT_COLUMNS])[POINT_COLUMNS]
    frame["old_status"], frame["new_status"] = old["status"], new["status"]
    for side, rows in (("old", old), ("new", new)):
        for column in ("time_ms", "time_ms_p20", "time_ms_p80", "peak_mem_bytes"):
            frame[f"{side}_{column}"] = rows[column].astype(float)
    both_ok = frame["old_status"].eq("ok") & frame["new_status"].eq("ok")
    time_ratio = _ratio(frame["new_time_ms"], frame["old_time_ms"]).where(both_ok)
    mem_ratio = _ratio(frame["new_peak_mem_bytes"], frame["old_peak_mem_bytes"]).where(both_ok)
    def small(ratio: pd.Series) -> pd.Series:
        return (ratio - 1).abs() < threshold

    noise = _overlap(frame["old_time_ms_p20"], frame["old_time_ms_p80"], frame["new_time_ms_p20"],
                     frame["new_time_ms_p80"])
    frame["time_ratio"], frame["mem_ratio"] = time_ratio, mem_ratio
    frame["time"] = _verdict(time_ratio, small(time_ratio) | noise, "faster", "slower")
    frame["memory"] = _verdict(mem_ratio, small(mem_ratio), "leaner", "heavier")
    presence = np.select([frame["old_status"].isna(), frame["new_status"].isna(),
                          frame["old_status"].ne(frame["new_status"])], ["new", "missing", "status"], "")
    frame["changes"] = [tuple(c for c in (p, t, m) if c and c != "unchanged")
                        for p, t, m in zip(presence, frame["time"], frame["memory"], strict=True)]
    return Comparison(str(old_path), str(new_path), threshold, frame.reset_index())


# --- output --------------------------------------------------------------------------------------

def _point(row: pd.Series) -> str:
    params = "" if row["params"] in (None, "{}") or pd.isna(row["params"]) else f" {row['params']}"
    causal = " causal" if row["causal"] is True else ""
    new = "" if row["q_len"] is None or pd.isna(row["q_len"]) else f" q={_int(row['q_len'])}"
    return (f"{row['variant']}/{row['impl']}{params} {row['mode']}{causal} n={_int(row['seq_len'])}{new} "
            f"b={_int(row['batch'])} h={_int(row['heads'])} d={_int(row['head_dim'])} {row['dtype']} {row['device']}")


def _int(value: object) -> str:
    return "?" if value is None or pd.isna(value) else f"{int(value)}"


def _ms(value: float) -> str:
    return "—" if pd.isna(value) else f"{value:.4g}"


def _x(value: float) -> str:
    return "—" if pd.isna(value) else f"{value:.3g}×"


def _status(row: pd.Series) -> str:
    old, new = (s if isinstance(s, str) else "—" for s in (row["old_status"], row["new_status"]))
    return old if old == new else f"{old} → {new}"


def _cells(row: pd.Series) -> list[str]:
    return [", ".join(row["changes"]), _point(row), f"{_ms(row['old_time_ms'])} → {_ms(row['new_time_ms'])}",
            _x(row["time_ratio"]), _x(row["mem_ratio"]), _status(row)]


HEADERS = ["change", "point", "time ms old → new", "time ratio", "mem ratio", "status"]


def summary_line(result: Comparison) -> str:
    """Counts of every kind of change; ratios are NEW / OLD (time_ms and peak_mem_bytes)."""
    counts = ", ".join(f"{n} {c if c != 'status' else 'status changes'}" for c, n in result.counts().items())
    verdict = "REGRESSION" if result.regression else "no regression"
    return f"{verdict} (threshold {result.threshold:g}): {counts}"


def to_table(result: Comparison) -> Table:
    """A rich table of the changed points. Cells are Text, so names from results are never markup."""
    table = Table(title=Text(f"{result.old} → {result.new}"), caption=Text(summary_line(result)))
    for header in HEADERS:  # the point takes what the numbers leave
        table.add_column(header, overflow="fold", ratio=1 if header == "point" else None,
                         no_wrap=header != "point")
    for _, row in result.changed().iterrows():
        style = "red" if {"slower", "heavier"} & set(row["changes"]) else "green" if \
            {"faster", "leaner"} & set(row["changes"]) else ""
        table.add_row(*(Text(cell, style=style if i == 0 else "") for i, cell in enumerate(_cells(row))))
    return table


def to_markdown(result: Comparison) -> str:
    def cell(text: str) -> str:
        return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")

    lines = [f"**{cell(result.old)} → {cell(result.new)}**: {cell(summary_line(result))}", "",
             "| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    lines += ["| " + " | ".join(cell(c) for c in _cells(row)) + " |" for _, row in result.changed().iterrows()]
    return "\n".join(lines)


def _plain(value: object) -> object:
    """JSON-ready scalars: NaN/None as null, numpy numbers as Python ones."""
    if isinstance(value, tuple):
        return list(value)
    if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA:
        return None
    return value.item() if isinstance(value, np.generic) else value


def to_json(result: Comparison) -> str:
    points = [{k: _plain(v) for k, v in row.items()} for row in result.points.to_dict("records")]
    return json.dumps({"old": result.old, "new": result.new, "threshold": result.threshold,
                       "regression": result.regression, "counts": result.counts(), "points": points},
                      indent=1)


def check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise BadInput(f"--format {fmt!r} is not one of: {', '.join(FORMATS)}")
    return fmt
