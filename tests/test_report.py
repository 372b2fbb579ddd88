"""``bench report html``: the analysis (best baseline, ratios, exponents, crossovers) from tables with
known answers, the page from a synthetic table (escaping, one figure per panel, nothing fetched,
non-ok rows only under Problems, training rows ignored), decode steps alone and beside full-sequence
calls (headlines and counts over every mode), every committed run's counts agreeing on its page,
from a real tiny sweep, and in a browser."""

from __future__ import annotations

import glob
import html
import math
import os
import re
import shutil
import subprocess
import sys
import tomllib
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from bench.cli import app
from bench.report import analysis, reference, render
from bench.store import COLUMNS, point_key, read_results, write_rows
from variants.registry import DECODE

EVIL = "<script>alert(1)</script>"
H100 = "NVIDIA H100 80GB HBM3"
LENGTHS = (256, 512, 1024, 2048, 4096)
# (variant, impl, family, time = c·nᵖ with (c, p), memory = m·n^q with (m, q))
SERIES = (
    ("standard", "sdpa-flash", "baseline", (2e-6, 2.0), (4e3, 1.0)),
    ("standard", "sdpa-math", "baseline", (4e-6, 2.0), (64.0, 2.0)),
    ("standard", "eager", "standard", (5e-6, 2.0), (64.0, 2.0)),
    ("local", "blocked", "sparse", (2e-3, 1.0), (2e4, 1.0)),
    (EVIL, "evil", "sparse", (3e-3, 1.0), (3e4, 1.0)),
    ("linear-elu1", "linear", "linear", (1e-3, 1.0), (1e4, 1.0)),
)
PROBLEMS = (  # (variant, impl, family, status, reason, time_ms) — time is set to prove it is ignored
    ("local", "xformers", "sparse", "unsupported", "xformers needs CUDA " + EVIL, None),
    ("wrong", "fast", "sparse", "incorrect", "output differs from the float64 reference", 1e-6),
    ("standard", "eager", "standard", "oom", "CUDA out of memory", None),
    ("standard", "sdpa-math", "baseline", "skipped", "a smaller point ran out of memory", None),
    ("linear-elu1", "linear", "linear", "error", "RuntimeError: boom", None),
    ("local", "blocked", "sparse", "timeout", "no result within 120 s", None),
)


def row(variant: str, impl: str, family: str, n: int, mode: str = "fwd", **fields) -> dict:
    """A schema row with identity, environment and the given measured fields."""
    identity = {"kind": fields.pop("kind", "kernel"), "variant": variant, "impl": impl, "family": family,
                "params": fields.pop("params", "{}"), "mode": mode, "causal": False, "batch": 1,
                "heads": 8, "seq_len": n, "head_dim": 64, "dtype": "bfloat16", "device": "cuda"}
    env = {"run_id": "syn", "ts": "2026-01-02T03:04:05+00:00", "device_name": H100, "hostname": "<b>host</b>",
           "torch_version": "2.13.0", "git_commit": "abc123", "kernel": "<i>kernel</i>"}
    return {**dict.fromkeys(COLUMNS), **env, **identity, "key": point_key(identity), **fields}


def ok_fields(time_ms: float, mem: float, n: int, noisy: bool = False, launch_bound: bool = False) -> dict:
    flops = 4 * 8 * n * n * 64.0
    tflops = flops / (time_ms * 1e-3) / 1e12
    return {"status": "ok", "time_ms": time_ms, "time_ms_p20": time_ms * 0.98, "time_ms_p80": time_ms * 1.02,
            "reps": 10, "spread": 1.04, "noisy": noisy, "launch_bound": launch_bound, "peak_mem_bytes": int(mem), "input_bytes": 1 << 20,
            "flops": flops, "tflops": tflops, "pct_peak": 100 * tflops / 989.4, "err_ref": 1e-3,
            "err_softmax": 0.5}


def synthetic_rows(modes=("fwd", "fwd_bwd"), lengths=LENGTHS, noise: float = 0.0, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for mode in modes:
        for variant, impl, family, (c, p), (m, q) in SERIES:
            for n in lengths:
                time_ms = c * n ** p * math.exp(rng.normal(0, noise)) if noise else c * n ** p
                noisy = variant == "local" and n == lengths[0]
                launch_bound = variant == "linear-elu1" and n == lengths[0]
                rows.append(row(variant, impl, family, n, mode,
                                **ok_fields(time_ms, m * n ** q, n, noisy, launch_bound)))
        for variant, impl, family, status, reason, time_ms in PROBLEMS:
            rows.append(row(variant, impl, family, 8192, mode, status=status, reason=reason, time_ms=time_ms,
                            err_ref=0.5 if status == "incorrect" else None))
    rows.append(row("standard", "eager", "standard", 512, kind="train", status="ok", step_time_ms=5.0,
                    task="mqar", accuracy=0.9))
    return rows


DECODE_LENGTHS = (4096, 16384, 65536)
# (variant, impl, family, step time (ms) at cache length n, cache bytes at n)
DECODERS = (
    ("standard", "sdpa-flash", "baseline", lambda n: 1e-4 * n, lambda n: 512 * n),
    ("standard", "eager", "standard", lambda n: 2e-4 * n, lambda n: 512 * n),
    ("local", "blocked", "sparse", lambda n: 0.05, lambda n: 512 * 256),
    ("linear-elu1", "recurrent", "linear", lambda n: 2.0, lambda n: 66560),
)


def decode_rows() -> list[dict]:
    """Decode steps with known answers (local/blocked noisy below the largest length) and an entry
    that is unsupported at every length."""
    rows = []
    for variant, impl, family, time_at, cache_at in DECODERS:
        for n in DECODE_LENGTHS:
            noisy = variant == "local" and n < DECODE_LENGTHS[-1]
            rows.append(row(variant, impl, family, n, DECODE, causal=True, q_len=1,
                            **ok_fields(time_at(n), 1e6, n, noisy), cache_bytes=cache_at(n),
                            gbps=cache_at(n) / time_at(n) / 1e6))
    return rows + [row("standard", "xformers", "baseline", n, DECODE, causal=True, q_len=1, status="unsupported",
                       reason="xformers needs CUDA") for n in DECODE_LENGTHS]


@pytest.fixture
def synthetic(tmp_path: Path) -> Path:
    directory = tmp_path / "results" / "syn"
    write_rows(directory, synthetic_rows())
    return directory


class Page(HTMLParser):
    """Tags, attributes and figures per section of a page; fails on nothing (html.parser is lenient),
    so the checks below are explicit."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.figures: dict[str, list[str]] = {}
        self.section = None
        self.feed(text)
        self.close()

    def handle_starttag(self, tag: str, attrs: list) -> None:
        attrs = dict(attrs)
        self.tags.append((tag, attrs))
        if tag == "section":
            self.section = attrs["id"]
            self.figures[self.section] = []
        if tag == "figure" and "panel" in attrs.get("class", ""):
            self.figures[self.section].append(attrs["data-panel"])


def sections(text: str) -> dict[str, str]:
    """The HTML of each section, by id."""
    return dict(re.findall(r'<section id="([^"]+)">(.*?)</section>', text, flags=re.S))


def plain(part: str) -> str:
    """A section's text as a reader sees it: no heading, tags or entities, whitespace collapsed."""
    return " ".join(html.unescape(re.sub(r"<h2>.*?</h2>|<[^>]+>", " ", part)).split())


def number(text: str) -> int:
    return int(text.replace(",", ""))


def assert_counts_agree(text: str) -> None:
    """Every count on the page tells one story, over every mode: the subtitle, the cards, the summary,
    the environment's status counts and Problems; the summary says no point ran only when none did,
    and no section says a kind of call has nothing while another section draws it."""
    parts, figures, said = sections(text), Page(text).figures, plain(text)
    cards = {label: value for value, label in
             re.findall(r'<div class="value">([^<]*)</div>\s*<div class="label">([^<]*)</div>', parts["overview"])}

    def card(prefix: str, default: str) -> str:
        return next((value for label, value in cards.items() if label.startswith(prefix)), default)

    kernel_ok, kernel_all = map(number, card("kernel points ok", "0 / 0").split(" / "))
    train_ok, train_all = map(number, card("training runs ok", "0 / 0").split(" / "))
    problems = number(card("rows with problems", "-1"))
    listed = sum(number(count) for count in re.findall(r'<td class="num">([\d,]+)</td>', parts["problems"]))
    assert listed == problems == kernel_all - kernel_ok + train_all - train_ok
    statuses = re.findall(r"(\d+) (\w+)", plain(re.search(r"<th>rows</th>(.*?)</tr>", parts["overview"]).group(1)))
    assert sum(int(n) for n, status in statuses if status == "ok") == kernel_ok + train_ok
    assert sum(int(n) for n, status in statuses if status != "ok") == problems
    subtitle = re.search(r'<div class="sub">([^<]*)</div>', text).group(1)
    assert f"· {kernel_all + train_all:,} rows" in subtitle
    summary = plain(parts["overview"])
    assert ("No kernel point ran successfully" in summary) == (kernel_all > 0 and kernel_ok == 0)
    if kernel_all:
        assert f"{kernel_all:,} kernel rows: {kernel_ok:,} ok, {kernel_all - kernel_ok:,} with problems" in summary
        drawn = len(figures["time-memory"]) + len(figures.get("decode", []))
        assert re.search(rf"· {drawn} panels?( ·|$)", subtitle), (drawn, subtitle)
    if figures.get("time-memory"):
        assert "no full-sequence point" not in said and "full-sequence points ran ok" not in said
    if figures.get("decode"):
        assert "no decode step" not in said and "decode steps ran ok" not in said
    # Grouped heads and layouts are in the summary and the cards exactly where their section compares them.
    labels, layouts = list(cards), parts.get("layouts", "")
    assert ("Grouped-query heads (" in summary) == bool(figures.get("gqa")) == \
        any(label.startswith("grouped-query time") for label in labels)
    for first in ("packed", "ragged"):
        assert any(label.startswith(f"{first} ÷ padded time") for label in labels) == (f"{first} ÷ padded" in layouts)
    assert ("Packed documents against padding (" in summary) == ("packed ÷ padded" in layouts)
    assert ("Ragged decode beside uniform (" in summary) == ('class="part">Ragged decode' in layouts)


def assert_self_contained(page: Page, text: str) -> None:
    for tag, attrs in page.tags:
        assert tag not in {"script", "link", "iframe", "img", "object", "embed"}, tag
        for name in ("src", "href", "xlink:href"):
            value = (attrs.get(name) or "").strip().lower()
            assert not value.startswith(("http:", "https:", "//")), (tag, name, value)
    assert "@import" not in text
    assert re.findall(r"url\(\s*['\"]?([^#'\")\s])", text) == []  # only url(#local-id) references


# --- analysis ------------------------------------------------------------------------------------

@pytest.mark.parametrize("p", [2.0, 1.0])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fit_exponent_recovers_known_exponent_with_noise(p: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = np.array([256, 512, 1024, 2048, 4096, 8192, 16384], dtype=float)
    y = 3e-4 * n ** p * np.exp(rng.normal(0, 0.05, n.size))  # ~5 % multiplicative noise
    fitted, r2 = analysis.fit_exponent(n, y)
    assert abs(fitted - p) < 0.05
    assert r2 > 0.99


def test_scaling_table_recovers_exponents_of_the_synthetic_series() -> None:
    kernel = analysis.with_series(pd.DataFrame(synthetic_rows(noise=0.03)))
    ok = kernel[(kernel["kind"] == "kernel") & (kernel["status"] == "ok")]
    agg, _ = analysis.choose_panels(analysis.aggregate(ok, analysis.PANEL_COLUMNS), analysis.PANEL_COLUMNS)
    fits = analysis.scaling(agg).set_index(["panel", "series"])
    panel = "fwd · non-causal · bfloat16 · d=64"
    for variant, impl, _, (_, p), (_, q) in SERIES:
        fit = fits.loc[(panel, f"{variant}/{impl}")]
        assert abs(fit["p_time"] - p) < 0.05 and abs(fit["p_mem"] - q) < 1e-6
        assert (fit["n_min"], fit["n_max"], fit["points"]) == (256, 4096, 5)


def test_crossover_is_interpolated_on_log_log() -> None:
    n = [256, 512, 1024, 2048, 4096]
    ratio = [1000 / x for x in n]  # time ∝ n vs reference ∝ n²: equal at n = 1000
    found = analysis.crossover(n, ratio)
    assert found.outcome == "at" and found.length == pytest.approx(1000, rel=1e-9)
    assert analysis.crossover(n, [0.5] * 5).outcome == "always"
    assert analysis.crossover(n, [2.0] * 5).outcome == "never"
    # Winning early and losing at the largest length is not a crossover.
    assert analysis.crossover(n, [0.5, 0.5, 2, 2, 2]).outcome == "never"
    assert analysis.crossover(n, [2, 0.5, 2, 0.5, 0.5]).length == pytest.approx(1024 * 2 ** 0.5)


def test_ratios_use_the_fastest_and_leanest_baseline_and_skip_failed_rows() -> None:
    kernel = analysis.with_series(pd.DataFrame(synthetic_rows()))
    ok = kernel[(kernel["kind"] == "kernel") & (kernel["status"] == "ok")]
    agg, _ = analysis.choose_panels(analysis.aggregate(ok, analysis.PANEL_COLUMNS), analysis.PANEL_COLUMNS)
    ratio = analysis.ratios(agg, None)
    at = ratio[(ratio["series"] == "local/blocked") & (ratio["seq_len"] == 4096) & (ratio["mode"] == "fwd")].iloc[0]
    assert at["base_time_series"] == "standard/sdpa-flash"  # 2e-6·n² beats 4e-6·n²
    assert at["speedup"] == pytest.approx(2e-6 * 4096 ** 2 / (2e-3 * 4096))
    assert at["base_mem_series"] == "standard/sdpa-flash" and at["mem_ratio"] == pytest.approx(5.0)
    assert "wrong/fast" not in set(ratio["series"])  # incorrect: no speed-up, however fast
    assert not set(ratio["family"]) & {"baseline"}
    chosen = analysis.ratios(agg, "standard/eager")
    assert set(chosen["base_time_series"]) == {"standard/eager"}
    assert "standard/sdpa-math" in set(chosen["series"])


def test_problems_are_grouped_with_counts_and_deduplicated_reasons() -> None:
    kernel = analysis.with_series(pd.DataFrame(synthetic_rows()))
    table = analysis.problems(kernel)
    assert list(table["status"]) == ["oom", "unsupported", "incorrect", "error", "timeout", "skipped"]
    unsupported = table[table["status"] == "unsupported"].iloc[0]
    assert unsupported["count"] == 2 and unsupported["reasons"] == [("xformers needs CUDA " + EVIL, 2)]
    assert unsupported["where"] == "fwd, fwd_bwd · n=8,192"


def test_panels_are_capped_and_split_only_where_a_column_varies_at_one_length() -> None:
    rows = [row("standard", "sdpa-flash", "baseline", n, **ok_fields(1.0, 1e6, n), head_dim=d, batch=b)
            for d in range(8, 8 + 4 * (analysis.MAX_PANELS + 3), 4) for n in LENGTHS for b in (1, 2)]
    for r in rows:
        r["key"] = point_key(r)
    kernel = analysis.with_series(pd.DataFrame(rows))
    columns = analysis.panel_columns(kernel)
    assert columns == [*analysis.PANEL_COLUMNS, "batch"]
    _, panels = analysis.choose_panels(analysis.aggregate(kernel, columns), columns)
    assert len(panels.titles) == analysis.MAX_PANELS
    assert len(panels.omitted) == 2 * (analysis.MAX_PANELS + 3) - analysis.MAX_PANELS
    # FlashAttention's convention (batch = tokens / n) is one batch per length: no split.
    tokens = [row("standard", "sdpa-flash", "baseline", n, **ok_fields(1.0, 1e6, n), batch=16384 // n) for n in LENGTHS]
    assert analysis.panel_columns(analysis.with_series(pd.DataFrame(tokens))) == list(analysis.PANEL_COLUMNS)


def test_reference_curves_match_only_their_device_and_configuration() -> None:
    assert {r.impl for r in reference.matching({H100}, "fwd", False, 64, "bfloat16")} == {"FA2", "cuDNN", "FA3"}
    assert {r.impl for r in reference.matching({H100}, "fwd_bwd", False, 128, "float16")} == {"FA2", "PyTorch"}
    for device in ("NVIDIA A100-SXM4-80GB", "Intel(R) Xeon(R) Processor"):
        assert reference.matching({device}, "fwd", False, 64, "bfloat16") == []
    assert reference.matching({H100}, "fwd", False, 64, "float32") == []
    assert reference.matching({H100, "NVIDIA A100"}, "fwd", False, 64, "bfloat16") == []
    # H100 figures apply to an H200 (same SMs and clocks) and say where they were measured.
    on_h200 = reference.matching({"NVIDIA H200"}, "fwd", True, 128, "bfloat16")
    assert {r.impl for r in on_h200} == {"FA2", "cuDNN", "FA3"}
    assert all("H100 SXM, published" in r.label for r in on_h200)
    assert reference.matching({"NVIDIA A100-SXM4-80GB"}, "fwd", True, 128, "bfloat16") == []
    assert all(len(r.seq_lens) == len(r.tflops) for r in reference.REFERENCES)


# --- the page ------------------------------------------------------------------------------------

def test_synthetic_report_page(synthetic: Path) -> None:
    text = render(read_results([synthetic]))
    page = Page(text)
    assert_self_contained(page, text)
    panels = ["fwd · non-causal · bfloat16 · d=64", "fwd_bwd · non-causal · bfloat16 · d=64"]
    assert page.figures == {"overview": [], "time-memory": panels, "ratios": panels, "exponents": [],
                            "throughput": panels, "decode": [], "quality": [], "frontier": [], "train-quality": [],
                            "problems": []}
    assert text.count("<svg") == 3 * len(panels)
    # Every string from results is escaped, the raw one never appears.
    assert EVIL not in text and "<b>host" not in text
    assert html.escape(EVIL, quote=False) in text and "&lt;b&gt;host&lt;/b&gt;" in text
    assert f"{html.escape(EVIL, quote=False)}/evil" in sections(text)["ratios"]
    # An incorrect row gives no speed-up: it is listed under Quality and Problems only.
    parts = sections(text)
    for section in ("time-memory", "ratios", "exponents", "throughput"):
        assert "wrong/fast" not in parts[section], section
    assert "wrong/fast" in parts["problems"] and "wrong/fast" in parts["quality"]
    # The run is on an H100 in bf16: published figures are drawn, with their source named.
    assert "FlashAttention-3 paper, Fig. 5" in parts["throughput"]
    assert "FlashAttention-2 paper, Fig. 7" in parts["throughput"]
    assert "% of device peak (989.4 TFLOP/s)" in parts["throughput"]
    # The headline is written from the data: at n=4,096 fwd linear-elu1 is 2e-6·4096 / 1e-3 = 8.2× faster.
    assert "At n=4,096 (fwd · non-causal · bfloat16 · d=64), linear-elu1/linear is 8.2× faster" in parts["overview"]
    assert "~" in re.sub(r"<[^>]+>", "", parts["ratios"])  # the noisy point is marked
    # linear-elu1 is launch-bound at the smallest n in both modes: counted, starred and crossed.
    assert "2 points are launch-bound" in parts["overview"]
    assert re.search(r">\*[\d.]+×<", parts["ratios"]), "no starred speed-up cell"
    # No decode step in this run: the decode section says so in one line.
    assert plain(parts["decode"]) == "These results hold no decode step, only full-sequence points."
    # Kernel and training rows, but no recall study: the frontier says so in one line.
    assert plain(parts["frontier"]).startswith("No frontier: no training study 'recall' on mqar has an ok run")
    assert_counts_agree(text)


def test_kernel_sections_skip_training_rows_and_handle_no_ok_kernel_point(tmp_path: Path) -> None:
    train = [r for r in synthetic_rows() if r["kind"] == "train"]
    problems_only = [r for r in synthetic_rows() if r["kind"] == "kernel" and r["status"] != "ok"]
    text = render(pd.DataFrame(problems_only).reindex(columns=list(COLUMNS)))
    parts = sections(text)
    assert Page(text).figures["time-memory"] == []
    for section in ("time-memory", "ratios", "exponents", "throughput"):
        assert plain(parts[section]) == "None of the 12 full-sequence points ran ok (see Problems).", section
    assert "No kernel point ran successfully." in parts["overview"]
    assert_counts_agree(text)
    # No kernel row at all: the kernel sections are left out, not drawn empty.
    text = render(pd.DataFrame(train).reindex(columns=list(COLUMNS)))
    assert set(sections(text)) == {"overview", "train-quality", "problems"}
    assert "kernel points ok" not in text and "panels" not in text


def test_a_decode_only_report_speaks_of_its_decode_steps() -> None:
    """Decode steps alone: the headline is the best step against the best standard one at the largest
    cache length, every count includes them, and the full-sequence sections say in one line that there
    are none (not that no point ran)."""
    text = render(pd.DataFrame(decode_rows()).reindex(columns=list(COLUMNS)))
    parts = sections(text)
    summary = plain(parts["overview"])
    assert "No kernel point ran successfully" not in summary
    # At n = 65,536: flash's 1e-4·n = 6.55 ms against local/blocked's 0.05 ms; cache 512·256 ÷ 512·n.
    assert ("Decoding against a cache of n=65,536 (decode · causal · bfloat16 · d=64), local/blocked takes "
            "0.05 ms a step, 131× faster than the fastest standard step (standard/sdpa-flash, 6.55 ms), and "
            "keeps 0.0039× the standard cache.") in summary
    assert "2 of 2 non-standard series overtake the fastest standard step" in summary
    assert "15 kernel rows: 12 ok, 3 with problems (listed under Problems); 2 aggregated points are noisy" in summary
    assert ("131× best decode step speed-up: local/blocked, decode · causal · bfloat16 · d=64, n=65,536"
            in summary)
    for section in ("time-memory", "ratios", "exponents", "throughput"):
        assert plain(parts[section]) == "These results hold no full-sequence point, only decode steps (see Decoding)."
    assert Page(text).figures["decode"] == ["decode · causal · bfloat16 · d=64"]
    assert_counts_agree(text)


def test_a_report_of_full_sequence_calls_and_decode_steps_counts_every_mode() -> None:
    kernel = [r for r in synthetic_rows() if r["kind"] == "kernel"]
    text = render(pd.DataFrame(kernel + decode_rows()).reindex(columns=list(COLUMNS)))
    summary = plain(sections(text)["overview"])
    assert "At n=4,096 (fwd · non-causal · bfloat16 · d=64), linear-elu1/linear is 8.2× faster" in summary
    assert "Decoding against a cache of n=65,536 (decode · causal · bfloat16 · d=64), local/blocked" in summary
    # 2 modes × (6 series × 5 lengths ok + 6 problems), and 12 ok + 3 unsupported decode steps; noisy:
    # local/blocked at the smallest length of each full-sequence mode and at two cache lengths.
    assert "87 kernel rows: 72 ok, 15 with problems (listed under Problems); 4 aggregated points are noisy" in summary
    assert "· 3 panels" in text
    assert_counts_agree(text)


COMMITTED_RUNS = sorted(p for p in (Path(__file__).parents[1] / "results").iterdir() if p.is_dir())


@pytest.mark.slow
@pytest.mark.parametrize("run", COMMITTED_RUNS, ids=[p.name for p in COMMITTED_RUNS])
def test_every_committed_run_reports_one_story(run: Path) -> None:
    """Decode-only, mixed, full-sequence and training runs as committed: no count or headline of the
    page contradicts another."""
    assert_counts_agree(render(read_results([run])))


def test_baseline_option_and_bad_inputs_exit_2(synthetic: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "chosen.html"
    result = runner.invoke(app, ["report", "html", str(synthetic), "-o", str(out), "--baseline", "eager"])
    assert result.exit_code == 0, result.output
    assert "faster than the chosen baseline (standard/eager)" in out.read_text()
    garbage = tmp_path / "bad.parquet"
    garbage.write_bytes(b"not parquet")
    for args in (["--baseline", "nope"], ["--baseline", "standard"]):
        result = runner.invoke(app, ["report", "html", str(synthetic), "-o", str(out), *args])
        assert result.exit_code == 2 and "--baseline" in result.output
    for path in (tmp_path / "missing", garbage):
        result = runner.invoke(app, ["report", "html", str(path), "-o", str(out)])
        assert result.exit_code == 2 and str(path) in result.output
        assert "Traceback" not in result.output
    result = runner.invoke(app, ["report", "html", str(synthetic), "-o", str(tmp_path)])
    assert result.exit_code == 2 and "is a folder" in result.output


def test_default_input_and_output_paths(synthetic: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(synthetic.parent.parent)  # holds results/syn
    result = CliRunner().invoke(app, ["report", "html"])
    assert result.exit_code == 0, result.output
    assert Path("reports/syn.html").is_file()
    monkeypatch.chdir(synthetic)  # no results/ here
    result = CliRunner().invoke(app, ["report", "html"])
    assert result.exit_code == 2 and "no runs under" in result.output


def test_report_name_is_a_safe_file_name() -> None:
    from bench.report import report_name

    assert report_name(pd.DataFrame({"run_id": ["../../etc/x"]})) == "etc_x"
    assert report_name(pd.DataFrame({"run_id": ["b", "a", "a"]})) == "a+1-more"


def test_every_template_is_package_data() -> None:
    """The page is rendered from bench/report/templates/: a wheel carries exactly what pyproject's
    package-data globs match there, so every file must be matched (a new subfolder would not be)."""
    root = Path(__file__).parents[1]
    config = tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8"))
    shipped = {Path(path) for pattern in config["tool"]["setuptools"]["package-data"]["bench"]
               for path in glob.glob(pattern, root_dir=root / "bench")}
    templates = {p.relative_to(root / "bench") for p in (root / "bench/report/templates").rglob("*") if p.is_file()}
    assert Path("report/templates/page.html.j2") in templates and templates <= shipped


def big_table(rows: int = 100_000, seed: int = 0) -> pd.DataFrame:
    """A synthetic results table: 20 series over every (mode, causal, dtype, head_dim, batch, n),
    3 % of points failed, 10 % noisy."""
    rng = np.random.default_rng(seed)
    grid = pd.MultiIndex.from_product(
        [range(20), [2 ** k for k in range(7, 23)], ["fwd", "bwd", "fwd_bwd"], [False, True],
         ["float16", "bfloat16", "float32"], [64, 128, 256], [1, 2, 4, 8, 16, 32]],
        names=["s", "seq_len", "mode", "causal", "dtype", "head_dim", "batch"]).to_frame(index=False).head(rows)
    families = np.array(["baseline"] * 3 + ["standard"] + ["sparse"] * 8 + ["linear"] * 6 + ["lowrank"] * 2)
    exponent = np.array([2.0, 2.0, 1.5, 2.0] + [1.0, 1.5] * 8)[grid["s"]]
    time_ms = 10 ** rng.uniform(-6, -3, 20)[grid["s"]] * grid["seq_len"] ** exponent * grid["batch"]
    failed = rng.random(rows) < 0.03
    table = grid.assign(
        variant="variant-" + grid["s"].astype(str), impl="impl", family=families[grid["s"]], kind="kernel",
        params="{}", heads=8, device="cuda", device_name=H100, run_id="big", ts="2026-01-01T00:00:00+00:00",
        status=np.where(failed, "oom", "ok"), reason=np.where(failed, "out of memory", None),
        time_ms=np.where(failed, np.nan, time_ms), time_ms_p20=time_ms * 0.98, time_ms_p80=time_ms * 1.02,
        noisy=rng.random(rows) < 0.1, peak_mem_bytes=1e3 * grid["seq_len"] ** (exponent - 0.5) * grid["batch"],
        tflops=1.0, pct_peak=0.1, err_ref=1e-3, err_softmax=0.5)
    return table.drop(columns="s").reindex(columns=list(COLUMNS))


@pytest.mark.slow
def test_a_100k_row_table_draws_only_the_kept_panels() -> None:
    """A large table renders with three figures per kept panel (its render time is a benchmark
    matter, not a unit test's: it depends on the machine's load)."""
    text = render(big_table())
    assert Page(text).figures["time-memory"] and text.count("<svg") == 3 * analysis.MAX_PANELS


# --- end to end ----------------------------------------------------------------------------------

def bench(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-c", "from bench.cli import main; main()", *args]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real sweep (3 entries × 2 lengths on CPU, ~10 s) and its report."""
    root = tmp_path_factory.mktemp("tiny")
    sweep = bench("run", "sweep", "--variants", "standard/eager,local/blocked,linear-elu1/linear",
                  "--seq-lens", "128,256", "--device", "cpu", "--out", str(root / "results"), "--run-id", "t",
                  cwd=root)
    assert sweep.returncode == 0, sweep.stderr
    report = bench("report", "html", str(root / "results" / "t"), "-o", str(root / "t.html"), cwd=root)
    assert report.returncode == 0, report.stderr
    return root / "t.html"


@pytest.mark.slow
def test_report_of_a_real_tiny_sweep(tiny_report: Path) -> None:
    text = tiny_report.read_text()
    page = Page(text)
    assert_self_contained(page, text)
    assert page.figures["time-memory"] == ["fwd · non-causal · float32 · d=64"]
    assert page.figures["ratios"] == []  # no baseline family in this sweep: nothing to divide by
    for name in ("standard/eager", "local/blocked", "linear-elu1/linear"):
        assert name in sections(text)["time-memory"]
    assert "paper, Fig." not in text  # a CPU gets no published GPU reference lines
    assert "No % of peak" in text


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (Debian: apt-get install chromium)")
def test_report_renders_in_headless_chromium_without_console_errors(tiny_report: Path, tmp_path: Path) -> None:
    shot = tmp_path / "report.png"
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--disable-quic", f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr",
               "--v=0", f"--screenshot={shot}", "--window-size=1400,4000", tiny_report.resolve().as_uri()]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HOME": str(tmp_path)})
    assert done.returncode == 0, done.stderr[-2000:]
    console = [line for line in done.stderr.splitlines() if "Uncaught" in line or "ERROR:CONSOLE" in line]
    assert console == []
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 50_000
