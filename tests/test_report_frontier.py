"""The speed, memory and recall frontier: the Pareto front (ties, missing values), the join of fwd_bwd
time, decode cache and MQAR recall by variant on small tables with hand-computed answers, and the
section on the committed CPU runs (present with a kernel run and the recall study together, a line
where the training run holds no recall study, left out of a run of one kind)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
from test_report import sections

from bench.report import analysis, render, training
from bench.report.html import frontier_section
from bench.store import read_results

NAN = float("nan")
ROOT = Path(__file__).resolve().parent.parent
QUICK, RECALL, TRAIN = (ROOT / "results" / name for name in (
    "cpu-2core-2026-11-26-quick", "cpu-2core-2026-11-25-recall-seeds", "cpu-2core-2026-11-25-train"))


def front(times: list[float], recalls: list[float]) -> list[bool]:
    return analysis.pareto_front(pd.Series(times), pd.Series(recalls)).tolist()


def test_pareto_front_keeps_the_points_nothing_beats():
    # a fast and poor, b slow and good, c dominated by a (slower, worse), d dominated by b
    assert front([1, 10, 2, 20], [0.1, 0.9, 0.05, 0.8]) == [True, True, False, False]
    # each faster point recalls less: all on it
    assert front([1, 2, 3], [0.1, 0.2, 0.3]) == [True, True, True]


def test_pareto_front_ties():
    assert front([1, 1], [0.5, 0.5]) == [True, True]  # equal points: neither dominates
    assert front([1, 1], [0.5, 0.6]) == [False, True]  # same time: the better recall only
    assert front([1, 2], [0.5, 0.5]) == [True, False]  # same recall: the faster only


def test_pareto_front_leaves_out_missing_values():
    # the NaN points would dominate everything if they counted; they neither count nor are on it
    assert front([5, NAN, 0.1, 6], [0.5, 1.0, NAN, 0.9]) == [True, False, False, True]
    assert front([NAN], [NAN]) == [False]
    assert front([], []) == []


def kernel(variant: str, impl: str, mode: str, n: int, time_ms: float, cache: float = NAN, family: str = "x",
           status: str = "ok", device: str = "cpu0", causal: bool = True, heads: int = 4, params: str = "{}") -> dict:
    return {"kind": "kernel", "variant": variant, "impl": impl, "family": family, "mode": mode, "seq_len": n,
            "params": params,
            "time_ms": time_ms, "cache_bytes": cache, "status": status, "device_name": device, "device": "cpu",
            "dtype": "float32", "head_dim": 64, "causal": causal, "batch": 1, "heads": heads, "kv_heads": None,
            "layout": None, "doc_distribution": None, "doc_count": None, "doc_seed": None}


def trained(variant: str, impl: str, seed: int, accuracy: float, study: str = "recall", family: str = "x",
            status: str = "ok") -> dict:
    return {"kind": "train", "variant": variant, "impl": impl, "family": family, "study": study, "task": "mqar",
            "seed": seed, "accuracy": accuracy, "status": status}


def small_tables() -> tuple[pd.DataFrame, pd.DataFrame]:
    """"soft" (several impls, slow, recalls), "lin" (fast, poor), "win" (slower and worse than lin),
    "new" (timed, never trained) and "trained-only" (a recall, no time)."""
    k = pd.DataFrame([
        kernel("soft", "slow", "fwd_bwd", 4096, 40.0), kernel("soft", "fast", "fwd_bwd", 4096, 20.0),
        kernel("soft", "fast", "fwd_bwd", 4096, 22.0),  # a rerun: the median of the two, 21
        kernel("soft", "fast", "fwd_bwd", 4096, 90.0, params='{"window": 8}'),  # other params: apart, slower
        kernel("soft", "fast", "fwd_bwd", 1024, 1.0),  # a shorter length: not the frontier's
        kernel("soft", "faster", "fwd_bwd", 4096, 5.0, status="error"),  # not ok: never chosen
        kernel("soft", "fast", "fwd_bwd", 4096, 2.0, causal=False),  # a configuration fewer variants ran
        kernel("lin", "chunked", "fwd_bwd", 4096, 4.0), kernel("win", "blocked", "fwd_bwd", 4096, 8.0),
        kernel("new", "chunked", "fwd_bwd", 4096, 3.0),
        kernel("soft", "slow", "decode", 65536, 0.5, cache=1e8), kernel("soft", "fast", "decode", 65536, 0.4, cache=2e8),
        kernel("soft", "fast", "decode", 4096, 0.1, cache=1e6),  # a shorter cache: not the frontier's
        kernel("lin", "recurrent", "decode", 65536, 0.1, cache=6e4),
    ])
    t = pd.DataFrame([
        trained("soft", "fast", 0, 1.0), trained("soft", "fast", 1, 0.9),
        trained("soft", "slow", 0, 0.5), trained("soft", "slow", 1, 0.5),  # the worse impl: not shown
        trained("lin", "chunked", 0, 0.2), trained("lin", "chunked", 1, 0.1), trained("lin", "chunked", 2, 0.3),
        trained("win", "blocked", 0, 0.05), trained("win", "blocked", 1, 0.15, status="error"),
        trained("win", "blocked", 0, 0.9, study="other"),  # another study: not recall
        trained("trained-only", "chunked", 0, 0.7),
    ])
    return k, t


def test_frontier_joins_time_cache_and_recall_by_variant():
    table = analysis.frontier(*small_tables()).set_index("variant")
    assert list(table.index) == ["new", "lin", "win", "soft", "trained-only"]  # fastest first, untimed last
    soft = table.loc["soft"]
    assert (soft["impl"], soft["time_ms"], soft["seq_len"]) == ("fast", 21.0, 4096)
    assert soft["config"] == "fwd_bwd · causal · float32 · d=64 · batch=1 · heads=4"
    assert (soft["cache_impl"], soft["cache_bytes"], soft["cache_len"]) == ("slow", 1e8, 65536)
    assert (soft["recall"], soft["seeds"]) == (pytest.approx(0.95), 2)
    assert soft["recall_std"] == pytest.approx(math.sqrt(0.005))
    lin = table.loc["lin"]
    assert (lin["recall"], lin["recall_std"], lin["seeds"]) == (pytest.approx(0.2), pytest.approx(0.1), 3)
    assert lin["cache_impl"] == "recurrent" and lin["cache_bytes"] == 6e4
    win = table.loc["win"]
    assert (win["recall"], win["seeds"]) == (0.05, 1) and math.isnan(win["recall_std"])
    assert math.isnan(win["cache_bytes"])  # no decode step ran
    assert math.isnan(table.loc["new", "recall"]) and math.isnan(table.loc["trained-only", "time_ms"])
    # by hand: lin (4 ms, 0.2) and soft (21 ms, 0.95); win (8 ms, 0.05) is slower and worse than lin
    assert table["on_front"].to_dict() == {"new": False, "lin": True, "win": False, "soft": True,
                                           "trained-only": False}


def test_frontier_is_per_device_and_empty_without_fwd_bwd():
    k, t = small_tables()
    other = k.assign(device_name="gpu0", time_ms=k["time_ms"] / 10)
    table = analysis.frontier(pd.concat([k, other], ignore_index=True), t)
    assert table.groupby("device_name")["on_front"].sum().to_dict() == {"cpu0": 2, "gpu0": 2}
    assert table.groupby("device_name").size().to_dict() == {"cpu0": 5, "gpu0": 5}
    assert analysis.frontier(k[k["mode"] == "decode"], t).empty


@pytest.fixture(scope="module")
def committed() -> pd.DataFrame:
    return read_results([QUICK, RECALL])


def test_frontier_of_the_committed_cpu_runs(committed: pd.DataFrame):
    table = analysis.frontier(analysis.kernel_rows(committed), training.train_rows(committed)).set_index("variant")
    assert set(table["seq_len"]) == {2048}  # the quick run's largest fwd_bwd length
    assert table["config"].iloc[0].startswith("fwd_bwd · non-causal")
    assert table.loc["standard", "on_front"] and table.loc["standard", "recall"] > 0.99
    assert table.loc["standard", "seeds"] == 3 and table.loc["standard", "cache_bytes"] == 128 << 20
    assert not table.loc["local", "on_front"]  # slower than the linear ones and recalls less
    assert math.isnan(table.loc["linformer", "recall"]) and not table.loc["linformer", "on_front"]
    assert math.isnan(table.loc["linear-taylor", "cache_bytes"])  # no decode step of it in the quick run


def test_frontier_section_on_a_kernel_run_and_the_recall_study(committed: pd.DataFrame):
    page = render(committed, sections=[frontier_section])
    body = sections(page)["frontier"]
    assert "<svg" in body and "n=2,048" in body and "0.995 ± 0.001" in body
    assert body.count("<td>yes</td>") == 4  # linear-relu, linear-elu1, linear-taylor, standard
    assert "—" in body  # linformer has no recall, linear-taylor no cache


def test_frontier_section_says_what_is_missing_or_is_left_out(committed: pd.DataFrame):
    no_recall = read_results([QUICK, TRAIN])
    no_recall = no_recall[~no_recall["params"].fillna("").str.contains('"study": "recall"')]
    body = sections(render(no_recall, sections=[frontier_section]))["frontier"]
    assert "No frontier: no training study &#39;recall&#39; on mqar" in body and "fwd_bwd" not in body
    assert "<svg" not in body
    for one_kind in ("kernel", "train"):
        assert "frontier" not in sections(render(committed[committed["kind"] == one_kind],
                                                 sections=[frontier_section]))


def test_frontier_line_names_the_missing_axis(committed: pd.DataFrame):
    decode_only = committed[(committed["kind"] == "train") | committed["mode"].eq("decode")]
    body = sections(render(decode_only, sections=[frontier_section]))["frontier"]
    assert "No frontier: no fwd_bwd kernel point ran ok." in body and "training study" not in body


def test_recall_curves_place_each_window_at_its_step():
    curve = lambda values: {"loss_curve": json.dumps(values), "steps": 60}  # noqa: E731
    t = pd.DataFrame([
        {**trained("soft", "fast", 1, 1.0), **curve([3.0, 1.0, 0.1])},
        {**trained("soft", "fast", 0, 0.9), **curve([3.0, 2.0, 0.5])},
        {**trained("lin", "chunked", 0, 0.1), "loss_curve": None, "steps": 60},  # schema 3: no curve
        {**trained("win", "blocked", 0, 0.9, study="other"), **curve([1.0])},  # another study
        {**trained("win", "blocked", 1, 0.1, status="error"), **curve([1.0])},
    ])
    curves = analysis.recall_curves(t)
    assert curves[["variant", "seed"]].values.tolist() == [["soft", 0], ["soft", 1]]  # sorted by seed
    assert curves["step"].iloc[0] == [10.0, 30.0, 50.0]  # windows of 20 steps, at their centres
    assert curves["loss"].tolist() == [[3.0, 2.0, 0.5], [3.0, 1.0, 0.1]]
    assert analysis.recall_curves(t.drop(columns="loss_curve")).empty  # results older than schema 4


def test_frontier_section_draws_the_recall_curves_it_has(committed: pd.DataFrame):
    title = "Recall study: training curves"
    assert title not in sections(render(committed, sections=[frontier_section]))["frontier"]
    with_curves = committed.assign(loss_curve=committed["kind"].map({"train": json.dumps([3.0, 2.5, 0.1])}))
    body = sections(render(with_curves, sections=[frontier_section]))["frontier"]
    assert title in body and body.count("<svg") == 2 and 'data-panel="recall curves"' in body
