"""``bench report html`` on grouped-query heads and document layouts: panels split by kv_heads and
the arrangement (layout with its documents) only where they vary, titled by them; the grouped-heads
section (each series against its own multi-head point, GQA ratio on a log₂ axis, cache for decode
steps); packed documents against padding per family and per series, with the documents stated; ragged
decode beside padded and uniform batches; the summary and cards saying so, counts agreeing; the
sections absent where nothing varies, a line where something varies but nothing compares; published
curves kept off grouped and packed panels; and a real small run end to end."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from test_report import (
    EVIL,
    Page,
    assert_counts_agree,
    assert_self_contained,
    ok_fields,
    plain,
    row,
    sections,
    synthetic_rows,
)

from bench.report import analysis, render
from bench.store import COLUMNS
from variants.registry import DECODE

HEADS = 8
LENGTHS = (1024, 2048, 4096)
# (variant, impl, family, time factor at GQA ratio 1, 4, 8 (None: grouped heads unsupported))
GQA_SERIES = (
    ("standard", "sdpa-flash", "baseline", (1.0, 0.5, 0.4)),
    ("standard", "eager", "standard", (1.0, 0.9, 0.8)),
    ("local", "blocked", "sparse", (1.0, None, None)),
)
RATIOS = (1, 4, 8)


def frame(rows: list[dict]) -> pd.DataFrame:
    return pd.DataFrame(rows).reindex(columns=list(COLUMNS))


def gqa_rows(mode: str = "fwd") -> list[dict]:
    """Each series at kv_heads 8, 2 and 1: time 1e-6·n² × its factor, peak memory (1 + 1/ratio) MiB·n/1k
    and, decoding, a cache of 2·kv_heads·d·n·2 bytes; grouped heads unsupported where the factor is None."""
    rows = []
    for variant, impl, family, factors in GQA_SERIES:
        for ratio, factor in zip(RATIOS, factors, strict=True):
            for n in LENGTHS:
                point = {"kv_heads": HEADS // ratio, "heads": HEADS, "causal": mode == DECODE}
                if factor is None:
                    rows.append(row(variant, impl, family, n, mode, **point, status="unsupported",
                                    reason="kv_heads < heads (grouped-query) not supported"))
                    continue
                fields = ok_fields(1e-6 * n * n * factor, (1 + 1 / ratio) * (1 << 20) * n / 1024, n)
                if mode == DECODE:
                    fields |= {"q_len": 1, "cache_bytes": 2 * HEADS // ratio * 64 * n * 2}
                rows.append(row(variant, impl, family, n, mode, **point, **fields))
    return rows


def documented(layout: str, n: int, distribution: str = "uniform", decode: bool = False) -> dict:
    """A packed or padded point's document columns: four documents (decoding: a batch of four
    sequences) of n/8, n/4, n/4 and 3n/8 tokens, so padding them to the longest takes 1.5× the tokens."""
    return {"layout": layout, "doc_distribution": distribution, "doc_count": 4, "doc_seed": 0,
            "doc_lengths": json.dumps([n // 8, n // 4, n // 4, 3 * n // 8]), "batch": 4 if decode else 1}


# (variant, impl, family, {layout: (time factor, memory factor)}); a layout left out is unsupported
LAYOUT_SERIES = (
    ("standard", "sdpa-flash", "baseline", {"dense": (1.2, 1.0), "packed": (1.0, 1.0), "padded": (2.0, 2.5)}),
    ("standard", "eager", "standard", {"dense": (3.0, 4.0), "padded": (1.5, 2.0)}),
    ("linear-elu1", "linear", "linear", {"dense": (0.6, 0.6), "packed": (0.5, 0.5), "padded": (0.8, 0.8)}),
)


def layout_rows(distribution: str = "uniform") -> list[dict]:
    """Full-sequence calls, dense, packed and padded: time 1e-6·n² and peak memory 100 KiB·n/1k times the
    series' factors; eager runs no packed batch."""
    rows = []
    for variant, impl, family, layouts in LAYOUT_SERIES:
        for layout in ("dense", "packed", "padded"):
            for n in LENGTHS:
                shape = {"layout": "dense"} if layout == "dense" else documented(layout, n, distribution)
                if layout not in layouts:
                    rows.append(row(variant, impl, family, n, **shape, status="unsupported",
                                    reason="layout=packed not supported"))
                    continue
                time, mem = layouts[layout]
                rows.append(row(variant, impl, family, n, **shape,
                                **ok_fields(1e-6 * n * n * time, 100 * 1024 * mem * n / 1024, n)))
    return rows


# Decoding: (variant, impl, family, {layout: (time per step (ms), cache bytes ÷ n)}) at every cache length
DECODE_SERIES = (
    ("standard", "sdpa-flash", "baseline", {"dense": (0.8, 1000), "packed": (1.0, 1000), "padded": (1.6, 1500)}),
    ("standard", "eager", "standard", {"dense": (1.5, 1000), "packed": (2.0, 1000), "padded": (3.0, 1500)}),
)


def ragged_rows() -> list[dict]:
    """Decode steps of a ragged batch (layout packed), the same batch padded and a uniform one; bytes
    moved = 1.1 × the cache, peak memory = the cache."""
    rows = []
    for variant, impl, family, layouts in DECODE_SERIES:
        for layout, (time, per_token) in layouts.items():
            for n in LENGTHS:
                shape = {"layout": "dense", "batch": 4} if layout == "dense" else documented(layout, n, decode=True)
                cache = per_token * n
                rows.append(row(variant, impl, family, n, DECODE, causal=True, q_len=1, **shape,
                                **ok_fields(time, cache, n), cache_bytes=cache, bytes_moved=int(1.1 * cache)))
    return rows


def figure_svgs(part: str) -> dict[str, str]:
    """Each panel figure of a section's HTML, by its title."""
    return dict(re.findall(r'<figure class="panel" data-panel="([^"]+)">(.*?)</figure>', part, flags=re.S))


def kernel_analysis(rows: list[dict]) -> tuple[analysis.Timings, analysis.Timings, analysis.Shapes]:
    kernel = analysis.with_series(frame(rows))
    ok = kernel[kernel["status"] == "ok"]
    decoding = ok["mode"].eq(DECODE)
    full, decode = analysis.timings(ok[~decoding], None), analysis.timings(ok[decoding], None)
    return full, decode, analysis.shapes(full, decode)


# --- panels --------------------------------------------------------------------------------------

def test_panels_split_by_kv_heads_and_arrangement_only_where_they_vary() -> None:
    full, _, _ = kernel_analysis(gqa_rows())
    assert full.panels.columns == [*analysis.PANEL_COLUMNS, "kv_heads"]
    assert full.panels.titles == [f"fwd · non-causal · bfloat16 · d=64 · kv_heads={k}" for k in (1, 2, 8)]
    # Each panel holds one shape: its baseline is the one of the same kv_heads.
    ratio = full.ratio.set_index(["panel", "series", "seq_len"])
    at = ratio.loc[("fwd · non-causal · bfloat16 · d=64 · kv_heads=2", "standard/eager", 4096)]
    assert at["speedup"] == pytest.approx(0.5 / 0.9)
    full, _, _ = kernel_analysis(layout_rows())
    assert full.panels.columns == [*analysis.PANEL_COLUMNS, "arrangement"]
    assert full.panels.titles == ["fwd · non-causal · bfloat16 · d=64 · " + a
                                  for a in ("dense", "packed (uniform ×4)", "padded (uniform ×4)")]
    _, decode, _ = kernel_analysis(ragged_rows())
    assert decode.panels.titles == ["decode · causal · bfloat16 · d=64 · " + a
                                    for a in ("dense", "padded (uniform)", "ragged (uniform)")]
    # One shape throughout (and rows from before kv_heads and layouts were recorded): no split, no new text.
    old = analysis.with_series(frame([r for r in synthetic_rows() if r["kind"] == "kernel"]))
    assert analysis.panel_columns(old[old["status"] == "ok"]) == list(analysis.PANEL_COLUMNS)
    assert set(old["kv_heads"]) == {8} and set(old["arrangement"]) == {"dense"}
    seeded = analysis.with_series(frame([row("standard", "eager", "standard", 1024, **documented("packed", 1024),
                                             **ok_fields(1.0, 1e6, 1024)) | {"doc_seed": 3}]))
    assert list(seeded["arrangement"]) == ["packed (uniform ×4, seed 3)"]


# --- grouped heads -------------------------------------------------------------------------------

def test_grouped_heads_are_compared_with_the_same_series_multi_head_point() -> None:
    full, decode, shapes = kernel_analysis(gqa_rows() + gqa_rows(DECODE))
    gqa, gqa_decode = shapes.gqa
    assert gqa.panels.titles == ["fwd · non-causal · bfloat16 · d=64"]
    assert gqa_decode.panels.titles == ["decode · causal · bfloat16 · d=64"]
    points = gqa.points.set_index(["series", "seq_len", "gqa_ratio"])
    assert "local/blocked" not in set(gqa.points["series"])  # never ran grouped: nothing to compare
    for series, factors in (("standard/sdpa-flash", (1.0, 0.5, 0.4)), ("standard/eager", (1.0, 0.9, 0.8))):
        for ratio, factor in zip(RATIOS, factors, strict=True):
            at = points.loc[(series, 2048, ratio)]
            assert at["time_ms_vs_mha"] == pytest.approx(factor)
            assert at["peak_mem_bytes_vs_mha"] == pytest.approx((1 + 1 / ratio) / 2)
    cache = gqa_decode.points.set_index(["series", "seq_len", "gqa_ratio"])["cache_bytes_vs_mha"]
    assert cache.loc[("standard/eager", 4096, 8)] == pytest.approx(1 / 8)
    assert gqa.points["cache_bytes_vs_mha"].isna().all()
    leader = analysis.gqa_leader(gqa.points)
    assert (leader["series"], leader["gqa_ratio"], leader["seq_len"]) == ("standard/sdpa-flash", 8, 4096)


def test_the_grouped_heads_section_and_its_headlines() -> None:
    text = render(frame(gqa_rows() + gqa_rows(DECODE)))
    parts, page = sections(text), Page(text)
    assert page.figures["gqa"] == ["fwd · non-causal · bfloat16 · d=64", "decode · causal · bfloat16 · d=64"]
    section = plain(parts["gqa"])
    assert "GQA ratio = heads ÷ kv_heads" in section and "FLOPs are the query heads'" in section
    # The table is at the largest n: flash at ratio 8 takes 0.4× the time, (1 + 1/8) / 2 the memory.
    assert re.search(r"standard/sdpa-flash 4,096 1 8 [\d.]+ ms 0\.4× [\d.]+ MiB 0\.56×", section)
    assert "1,024" not in section and "2,048" not in section
    assert "cache × MHA" in section  # decode steps have a cache
    svgs = figure_svgs(parts["gqa"])
    assert "heads ÷ kv_heads (1 = multi-head)" in svgs["fwd · non-causal · bfloat16 · d=64"]
    assert "Cache" in svgs["decode · causal · bfloat16 · d=64"]
    assert "Cache" not in svgs["fwd · non-causal · bfloat16 · d=64"]
    summary = plain(parts["overview"])
    assert ("Grouped-query heads (fwd · non-causal · bfloat16 · d=64): at heads ÷ kv_heads = 8 and n=4,096, "
            "standard/sdpa-flash takes 0.4× the time and 0.56× the memory of its multi-head point.") in summary
    assert ("Grouped-query heads (decode · causal · bfloat16 · d=64): at heads ÷ kv_heads = 8 and n=4,096, "
            "standard/sdpa-flash takes 0.4× the time and 0.56× the memory of its multi-head point and keeps "
            "0.12× its cache.") in summary
    assert ("0.4× grouped-query time ÷ multi-head time: standard/sdpa-flash at heads ÷ kv_heads = 8, "
            "fwd · non-causal · bfloat16 · d=64, n=4,096") in summary
    assert "layouts" not in parts  # no packed point
    assert_counts_agree(text)


def test_a_run_varying_kv_heads_with_nothing_to_compare_says_so() -> None:
    rows = [r for r in gqa_rows() if r["variant"] == "local"]  # grouped heads unsupported throughout
    text = render(frame(rows))
    assert plain(sections(text)["gqa"]) == ("The run varies heads ÷ kv_heads, but no series ran ok both with "
                                            "grouped and with multi-head heads at one shape and length, so "
                                            "there is nothing to compare (see Problems).")
    assert "Grouped-query heads (" not in text
    assert_counts_agree(text)


# --- layouts -------------------------------------------------------------------------------------

def test_packed_against_padded_per_family_and_per_series() -> None:
    _, _, shapes = kernel_analysis(layout_rows())
    packed = shapes.packed
    title = "fwd · non-causal · bfloat16 · d=64 · uniform ×4"
    assert packed.panels.titles == [title] and packed.layouts == ("packed", "padded")
    best = packed.families.set_index(["group", "seq_len"])
    # softmax: the fastest packed impl is flash (1.0), the fastest padded one eager (1.5), which ran no packed batch.
    softmax = best.loc[("softmax", 4096)]
    assert (softmax["packed_time_series"], softmax["padded_time_series"]) == ("standard/sdpa-flash", "standard/eager")
    assert softmax["time_vs_padded"] == pytest.approx(1.0 / 1.5)
    assert softmax["mem_vs_padded"] == pytest.approx(1.0 / 2.0)
    assert best.loc[("linear", 2048), "time_vs_padded"] == pytest.approx(0.5 / 0.8)
    series = packed.points.set_index(["series", "seq_len"])
    assert series.loc[("standard/sdpa-flash", 1024), "time_ms_vs_padded"] == pytest.approx(0.5)
    assert series.loc[("standard/sdpa-flash", 1024), "peak_mem_bytes_vs_padded"] == pytest.approx(0.4)
    assert "standard/eager" not in set(series.index.get_level_values("series"))
    assert packed.documents[title] == ("4 documents per row, lengths from the uniform distribution, seed 0. At "
                                       "n=4,096 the batch's 4 documents are 512–1,536 tokens long; padded to the "
                                       "longest they take 1.5× the real tokens.")


def test_the_layouts_section_and_its_headlines() -> None:
    text = render(frame(layout_rows() + gqa_rows()))
    parts = sections(text)
    section = plain(parts["layouts"])
    assert "fwd · non-causal · bfloat16 · d=64 · kv_heads=8 · uniform ×4" in section
    assert "seed 0" in section and "padded to the longest they take 1.5× the real tokens" in section
    assert re.search(r"softmax 4,096 standard/sdpa-flash [\d.]+ ms standard/eager [\d.]+ ms 0\.67×", section)
    assert re.search(r"linear-elu1/linear 4,096 [\d.]+ ms [\d.]+ ms 0\.62×", section)
    assert "Ragged decode beside uniform" not in section  # no decode step
    summary = plain(parts["overview"])
    assert ("Packed documents against padding (fwd · non-causal · bfloat16 · d=64 · kv_heads=8 · uniform ×4): the "
            "best packed softmax impl takes 0.67× the time and 0.5× the memory of the best padded one at n=4,096; "
            "the best packed linear impl takes 0.62× the time and 0.62× the memory of the best padded one at "
            "n=4,096.") in summary
    assert "0.62× packed ÷ padded time: best linear impls" in summary
    # kv_heads and the arrangement both vary: the time panels are split by both.
    assert "fwd · non-causal · bfloat16 · d=64 · kv_heads=8 · packed (uniform ×4)" in Page(text).figures["time-memory"]
    assert_counts_agree(text)


def test_ragged_decode_beside_padded_and_uniform() -> None:
    _, _, shapes = kernel_analysis(ragged_rows())
    ragged = shapes.ragged
    assert ragged.panels.titles == ["decode · causal · bfloat16 · d=64 · uniform"] and ragged.decode
    best = ragged.families.set_index(["group", "seq_len"]).loc[("softmax", 2048)]
    assert best["time_vs_padded"] == pytest.approx(1.0 / 1.6) and best["time_vs_dense"] == pytest.approx(1.0 / 0.8)
    series = ragged.points.set_index(["series", "seq_len"]).loc[("standard/eager", 4096)]
    assert series["cache_bytes_vs_padded"] == pytest.approx(1000 / 1500)
    assert series["bytes_moved_vs_dense"] == pytest.approx(1.0, rel=1e-3)
    text = render(frame(ragged_rows()))
    section = plain(sections(text)["layouts"])
    assert section.startswith("Ragged decode beside uniform")
    assert "Cache lengths around the mean n, one per sequence of the batch" in section
    assert "time ragged time padded time uniform ragged ÷ padded ragged ÷ uniform cache ragged" in section
    assert ("Ragged decode beside uniform (decode · causal · bfloat16 · d=64 · uniform): the best ragged softmax impl "
            "takes 0.62× the time and 0.67× the memory of the best padded one and 1.2× the time and 1× the memory "
            "of the best uniform one at a mean cache length of n=4,096.") in plain(sections(text)["overview"])
    assert "gqa" not in sections(text)
    assert_counts_agree(text)
    # A ragged batch beside uniform ones only: no padded column, card or clause.
    text = render(frame([r for r in ragged_rows() if r["layout"] != "padded"]))
    section, summary = plain(sections(text)["layouts"]), plain(sections(text)["overview"])
    assert "ragged ÷ uniform" in section and "padded" not in section.replace("padded to the longest", "")
    assert ("the best ragged softmax impl takes 1.2× the time and 1× the memory of the best uniform one at a mean "
            "cache length of n=4,096.") in summary
    assert_counts_agree(text)


def test_packed_and_padded_with_nothing_to_compare_say_so_and_one_layout_has_no_section() -> None:
    rows = [r for r in layout_rows() if r["variant"] == "standard"]
    for r in rows:  # flash's padded and eager's only ones fail: no packed point beside a padded one
        if r["layout"] == "padded":
            r.update(status="oom", time_ms=None)
    text = render(frame(rows))
    assert plain(sections(text)["layouts"]) == ("The run has packed and padded points, but none of one shape and "
                                                "length ran ok in both layouts, so there is nothing to compare "
                                                "(see Problems).")
    assert_counts_agree(text)
    packed_only = [r for r in layout_rows() if r["layout"] != "padded"]
    assert "layouts" not in sections(render(frame(packed_only)))


def test_results_strings_in_documents_are_escaped() -> None:
    text = render(frame(layout_rows(distribution=EVIL)))
    assert EVIL not in text
    assert "packed (&lt;script&gt;alert(1)&lt;/script&gt; ×4)" in text
    assert_self_contained(Page(text), text)


def test_published_curves_stay_off_grouped_and_packed_panels() -> None:
    text = render(frame(gqa_rows()))
    svgs = figure_svgs(sections(text)["throughput"])
    assert "published" in svgs["fwd · non-causal · bfloat16 · d=64 · kv_heads=8"]
    assert all("published" not in svgs[f"fwd · non-causal · bfloat16 · d=64 · kv_heads={k}"] for k in (1, 2))
    packed = render(frame(layout_rows()))
    assert all(("published" in svg) == title.endswith("dense")
               for title, svg in figure_svgs(sections(packed)["throughput"]).items())


# --- a real run ----------------------------------------------------------------------------------

SPEC = """
[sweep]
variants = ["standard/eager", "standard/sdpa-flash"]
seq_lens = [128]
batch_sizes = [1]
heads = 4
kv_heads = [4, 1]
layouts = ["packed", "padded"]
head_dims = [16]
dtypes = ["float32"]
modes = ["fwd", "decode"]
causal = [true]
device = "cpu"

[decode]
layouts = ["dense", "packed", "padded"]

[documents]
distribution = "uniform"
count = 2
seed = 1

[measure]
warmup_s = 0.01
target_s = 0.01
min_reps = 3
max_reps = 5
"""


def bench(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-c", "from bench.cli import main; main()", *args]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_report_of_a_real_run_of_grouped_heads_and_layouts(tmp_path: Path) -> None:
    """The standard impls at two KV head counts, packed and padded (and decode steps, dense; ragged and
    padded where the decoders take them) on CPU (~30 s), and its page."""
    (tmp_path / "spec.toml").write_text(SPEC, encoding="utf-8")
    sweep = bench("run", "sweep", "--config", "spec.toml", "--out", "results", "--run-id", "shapes", cwd=tmp_path)
    assert sweep.returncode == 0, sweep.stderr
    report = bench("report", "html", "results/shapes", "-o", "shapes.html", cwd=tmp_path)
    assert report.returncode == 0, report.stderr
    text = (tmp_path / "shapes.html").read_text(encoding="utf-8")
    parts, page = sections(text), Page(text)
    assert_self_contained(page, text)
    assert_counts_agree(text)
    shape = "fwd · causal · float32 · d=16"
    assert set(page.figures["time-memory"]) == {f"{shape} · kv_heads={k} · {a} (uniform ×2, seed 1)"
                                                for k in (1, 4) for a in ("packed", "padded")}
    assert f"{shape} · packed (uniform ×2, seed 1)" in page.figures["gqa"]
    assert re.search(r"standard/eager 128 1 4 [\d.]+ ms ~?[\d.]+×", plain(parts["gqa"]))
    layouts = plain(parts["layouts"])
    assert f"{shape} · kv_heads=4 · uniform ×2, seed 1" in layouts
    assert "2 documents per row, lengths from the uniform distribution, seed 1." in layouts
    summary = plain(parts["overview"])
    assert f"Grouped-query heads ({shape} · packed (uniform ×2, seed 1)): at heads ÷ kv_heads = 4" in summary
    assert re.search(r"Packed documents against padding \(fwd · causal · float32 · d=16 · kv_heads=1 · uniform ×2, "
                     r"seed 1\): the best packed softmax impl takes [\d.]+× the time and [\d.]+× the memory of the "
                     r"best padded one at n=128", summary)
