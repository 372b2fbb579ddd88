"""The report page: one self-contained HTML file (inline SVG figures, inline CSS, no script, nothing
fetched from a network). Every string from results goes through jinja2's autoescaping; the only
markup inserted unescaped is SVG written by matplotlib (which escapes its text) and this module's
own templates.

The page is a list of section builders (SECTIONS); each takes the prepared Report and returns a
Section, or None when it has nothing to show. Kernel sections draw from rows whose kind is
"kernel" and are left out when there are none; training sections (kind "train", one grid per
study) are left out when no study varies what they are about. Profile links point at local files
only, relative to the report's folder.
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
from jinja2 import DictLoader, Environment
from markupsafe import Markup

from .. import __version__
from . import analysis, figures, reference, training
from .analysis import Panels

# What `bench profile` writes in a profile folder (bench.profile.FILES, not imported: it loads torch).
PROFILE_FILES = ("trace.json", "kernels.csv", "summary.json")


@dataclass
class Report:
    """Everything the sections draw from, computed once."""

    rows: pd.DataFrame  # every row read, all kinds
    kernel: pd.DataFrame  # kind == "kernel", with a ``series`` column
    agg: pd.DataFrame  # ok full-sequence kernel points aggregated per (panel, series, n), drawn panels only
    panels: Panels
    baseline: str | None  # the series chosen with --baseline, None for the best baseline
    ratio: pd.DataFrame
    fits: pd.DataFrame
    style_of: dict[str, figures.Style]
    order: list[str]  # series in legend/table order
    train: pd.DataFrame  # kind == "train", with ``series`` and ``study`` columns
    studies: list[training.Study]
    decode: analysis.Timings  # ok decode points, aggregated the same way
    profiles: Mapping[str, str] = field(default_factory=dict)  # point key -> profile folder
    links_from: Path | None = None  # the report's folder: local links are relative to it

    @property
    def against(self) -> str:
        return self.baseline or "the best baseline (fastest / leanest of the baseline family)"

    def in_order(self, table: pd.DataFrame) -> pd.DataFrame:
        """Rows sorted by series in legend order (baselines, standard, then the rest)."""
        rank = {s: i for i, s in enumerate(self.order)}
        return table.sort_values("series", key=lambda c: c.map(rank), kind="stable")

    def panel_data(self, frame: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
        return [(title, frame[frame["panel"] == title]) for title in self.panels.titles]

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
    decoding = ok["mode"].eq(analysis.DECODE)
    full = analysis.timings(ok[~decoding], chosen)
    families = kernel[["series", "family"]].drop_duplicates("series")
    family_of = dict(sorted(zip(families["series"], families["family"], strict=True),
                            key=lambda sf: figures.legend_key(*sf)))
    train = training.train_rows(rows)
    return Report(rows=rows, kernel=kernel, agg=full.agg, panels=full.panels, baseline=chosen,
                  ratio=full.ratio, fits=full.fits, style_of=figures.styles(family_of, chosen),
                  order=list(family_of), train=train, studies=training.studies(train),
                  decode=analysis.timings(ok[decoding], chosen), profiles=dict(profiles or {}),
                  links_from=links_from)


# --- templates -----------------------------------------------------------------------------------

CSS = """
:root { --fg:#1d1f23; --muted:#5b6270; --line:#e2e5ea; --bad:#a8231b; --head:#14213d; }
* { box-sizing: border-box; }
body { margin:0; background:#f5f6f8; color:var(--fg);
       font:14px/1.5 system-ui,-apple-system,"Segoe UI","DejaVu Sans","Liberation Sans",sans-serif; }
header { background:var(--head); color:#fff; }
.wrap { max-width:1260px; margin:0 auto; padding:0 24px; }
header .wrap { padding-top:18px; padding-bottom:14px; }
header h1 { margin:0; font-size:22px; font-weight:600; }
header .sub { color:#b9c4dc; font-size:13px; margin-top:2px; }
nav ol { list-style:none; display:flex; flex-wrap:wrap; gap:4px 20px; padding:0; margin:12px 0 0; }
nav a { color:#dfe8ff; text-decoration:none; font-size:13px; }
nav a:hover { text-decoration:underline; }
section { background:#fff; border:1px solid var(--line); border-radius:8px; padding:18px 22px;
          margin:18px 0; }
h2 { font-size:19px; margin:0 0 4px; }
h3 { font-size:14px; margin:20px 0 4px; }
p.note, details.note, figcaption, .muted { color:var(--muted); font-size:12.5px; }
details.note ul { columns:2; margin:4px 0; }
.summary { font-size:15px; margin-top:4px; }
.overview { display:grid; grid-template-columns:minmax(0,1fr) auto; gap:8px 36px; align-items:start; }
.overview h3 { margin-top:0; }
.cards { display:grid; grid-template-columns:repeat(auto-fit,minmax(220px,1fr)); gap:12px; margin:14px 0; }
.card { border:1px solid var(--line); border-radius:6px; padding:10px 14px; }
.card .value { font-size:24px; font-weight:600; }
.card .label { color:var(--muted); font-size:12px; }
table { border-collapse:collapse; font-size:13px; margin:6px 0 4px; }
th, td { padding:4px 10px; border-bottom:1px solid var(--line); text-align:left; vertical-align:top; }
th { background:#f7f8fa; font-weight:600; white-space:nowrap; }
td.num { text-align:right; font-variant-numeric:tabular-nums; white-space:nowrap; }
td.reason { max-width:720px; overflow-wrap:anywhere; }
td.name { white-space:nowrap; }
td ul { margin:0; padding-left:16px; }
tr.bad td { background:#fdf0ef; }
figure { margin:10px 0 22px; }
figure svg { display:block; max-width:100%; height:auto; }
.swatch { display:inline-block; width:20px; margin-right:6px; vertical-align:middle;
          border-top:3px solid; }
.swatch.dashed { border-top-style:dashed; }
.status { display:inline-block; padding:0 8px; border-radius:10px; font-size:12px; font-weight:600;
          background:#eef1f6; color:#3b4455; }
.status.oom, .status.error, .status.incorrect, .status.timeout, .status.fail, .status.missing {
          background:#fde8e6; color:var(--bad); }
.status.pass { background:#e3f3e6; color:#1d6b31; }
p.finding { font-size:14px; margin:4px 0 8px; max-width:1000px; }
.ratio { display:inline-block; min-width:48px; color:var(--muted); font-size:12px; }
ul.findings { margin:4px 0; padding-left:18px; }
ul.findings li { margin:3px 0; }
td.path { font-family:ui-monospace,"DejaVu Sans Mono",monospace; font-size:12px; overflow-wrap:anywhere;
          max-width:420px; }
"""

PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>attnbench report — {{ name }}</title>
<style>{{ css }}</style></head>
<body>
<header><div class="wrap">
<h1>attnbench report — {{ name }}</h1>
<div class="sub">{{ subtitle }}</div>
<nav><ol>{% for s in sections %}<li><a href="#{{ s.id }}">{{ loop.index }}. {{ s.title }}</a></li>{% endfor %}</ol></nav>
</div></header>
<main class="wrap">
{% for s in sections %}<section id="{{ s.id }}"><h2>{{ loop.index }}. {{ s.title }}</h2>
{{ s.body }}
</section>
{% endfor %}
<p class="muted">Generated by attnbench {{ version }} on {{ generated }}. Self-contained: no script, nothing
fetched from a network.</p>
</main></body></html>
"""

MACROS = """
{% macro swatch(style) %}{% if style %}<span class="swatch{{ ' dashed' if style.dashed }}" style="border-color:{{ style.color }}"></span>{% endif %}{% endmacro %}
{% macro series(name, styles) %}{{ swatch(styles.get(name)) }}{{ name }}{% endmacro %}
{% macro study_head(study) %}<h3>Study {{ study.name }}</h3>
<p class="note">{{ study.description() }}</p>{% endmacro %}
{% macro ratio(value) %} <span class="ratio">{{ value | times }}</span>{% endmacro %}
{% macro check(value) %}{% if value %}<span class="status {{ value }}">{{ value }}</span>{% else %}—{% endif %}{% endmacro %}
{% macro panels(items) %}{% for title, svg in items %}<figure class="panel" data-panel="{{ title }}">
<h3>{{ title }}</h3>{{ svg }}{% if caller %}<figcaption>{{ caller() }}</figcaption>{% endif %}</figure>
{% else %}<p class="note">No ok kernel point to draw.</p>{% endfor %}{% endmacro %}
"""

TEMPLATES = {
    "macros": MACROS,
    "page": PAGE,
    "overview": """<div class="cards">{% for card in cards %}<div class="card"><div class="value">{{ card.value }}</div>
<div class="label">{{ card.label }}</div></div>{% endfor %}</div>
<div class="overview"><div><h3>Summary</h3>{% if summary %}<p class="summary">{{ summary | join(' ') }}</p>{% endif %}
{% if findings %}<h3>Training</h3><ul class="findings">{% for f in findings %}<li>{{ f }}</li>{% endfor %}</ul>{% endif %}</div>
<div><h3>Environment</h3>
<table><tr><th></th>{% for run in env.columns %}<th>run {{ run }}</th>{% endfor %}</tr>
{% for field, values in env.iterrows() %}<tr><th>{{ field | replace('_', ' ') }}</th>{% for v in values %}<td>{{ v }}</td>{% endfor %}</tr>
{% endfor %}</table></div></div>""",
    "scaling_plots": """{% from "macros" import panels %}
<p class="note">Median time per call (bars: p20–p80 of the repetitions) and peak memory against sequence
length, log–log. Dashed lines are the baseline family{% if chosen %} and the chosen baseline,
{{ chosen }}{% endif %}; hollow markers are noisy points (p80/p20 above the sweep's threshold), crossed
ones launch-bound (the host took at least as long to enqueue the call as the device took to run it, so
in a training loop the GPU would wait on Python). Only rows with status ok are drawn.</p>
{% if omitted %}<details class="note"><summary>Only the {{ shown }} panels with the most points are
drawn, in every section; {{ omitted | length }} more are not.</summary>
<ul>{% for title in omitted %}<li>{{ title }}</li>{% endfor %}</ul></details>{% endif %}
{{ panels(items) }}""",
    "ratios": """{% from "macros" import panels %}
<p class="note">Each series against {{ against }} at the same point: speed-up = baseline time ÷ time
(above 1: faster), memory ratio = peak ÷ baseline peak (below 1: leaner); the time baseline is the fastest
and the memory baseline the leanest at that point. Blue is better than the baseline, red worse, white
equal (log colour scale centred at 1); grey cells have no baseline measured. Rows whose correctness
check failed never appear here (see Problems).</p>
{% call panels(items) %}Values are written in the cells up to {{ annotate }} lengths; ~ marks a speed-up where the
series or its baseline is noisy, * one where either is launch-bound.{% endcall %}""",
    "exponents": """{% from "macros" import series %}
<p class="note">p is the least-squares slope of log time (or log peak memory) against log n over the fit
range: time ∝ n<sup>p</sup>. R² says how well one power law fits. Crossover: the length from which the
series is faster than the fastest standard implementation (family standard or baseline) at every
larger measured length, interpolated on log–log.</p>
{% for title, table in items %}<h3>{{ title }}</h3>
<table><tr><th>series</th><th>family</th><th>p time</th><th>R²</th><th>p memory</th><th>R²</th>
<th>fit range (n)</th><th>points</th><th>batch</th><th>crossover vs standard</th></tr>
{% for r in table %}<tr><td class="name">{{ series(r.series, styles) }}</td><td>{{ r.family }}</td>
<td class="num">{{ r.p_time | fixed }}</td><td class="num">{{ r.r2_time | fixed }}</td>
<td class="num">{{ r.p_mem | fixed }}</td><td class="num">{{ r.r2_mem | fixed }}</td>
<td class="num">{{ '{:,}–{:,}'.format(r.n_min, r.n_max) }}</td><td class="num">{{ r.points }}</td>
<td class="num">{{ r.batch }}</td><td>{{ r.crossover or '—' }}</td></tr>
{% endfor %}</table>
{% else %}<p class="note">No ok kernel point to fit.</p>{% endfor %}""",
    "throughput": """{% from "macros" import panels, series %}
<p class="note">Achieved TFLOP/s = the variant's analytic FLOPs (FlashAttention convention: forward
4·b·h·n·n<sub>kv</sub>·d, halved when causal, backward 2.5×; sparse and linear variants count their own
work) ÷ median time. {{ peak_note }} {{ reference_note }}</p>
{{ panels(items) }}
{% if peaks %}<h3>Best % of device peak</h3>
<table><tr><th>panel</th><th>series</th><th>n</th><th>TFLOP/s</th><th>% of peak</th></tr>
{% for r in peaks %}<tr><td>{{ r.panel }}</td><td class="name">{{ series(r.series, styles) }}</td><td class="num">{{ '{:,}'.format(r.seq_len) }}</td>
<td class="num">{{ r.tflops | sig }}</td><td class="num">{{ r.pct_peak | sig }} %</td></tr>{% endfor %}</table>{% endif %}""",
    "decode": """{% from "macros" import series %}
<p class="note">Generation: each step takes the new token(s) of every sequence in the batch against a cache
of n earlier tokens — the keys and values a softmax variant keeps (all of them for standard, atrous and
strided attention, the last <i>w</i> for local), or the fixed-size state of a linear one — and is timed
like any call. Cache: bytes kept for the prefix. Memory traffic: the analytic bytes a step must read and
write (cache or state, new keys and values, queries and outputs) ÷ its time, with % of the device's
datasheet bandwidth where it is known (never guessed). Speed-up and cache ratio are against the best
standard (softmax) step at the same n; the crossover is the cache length from which the variant's step is
faster than the best standard one.</p>
{% for item in items %}<h3>{{ item.title }}</h3>
<figure class="panel" data-panel="{{ item.title }}">{{ item.svg }}</figure>
<table><tr><th>series</th><th>n</th><th>time per step</th><th>speed-up</th><th>cache</th><th>cache ratio</th>
<th>GB/s</th><th>% of bandwidth</th><th>faster than standard from</th></tr>
{% for r in item.rows %}<tr><td class="name">{{ series(r.series, styles) }}</td><td class="num">{{ '{:,}'.format(r.seq_len) }}</td>
<td class="num">{{ r.time_ms | sig }} ms</td><td class="num">{{ r.speedup | times }}</td>
<td class="num">{{ r.cache_bytes | bytes }}</td><td class="num">{{ r.cache_ratio | times }}</td>
<td class="num">{{ r.gbps | sig }}</td><td class="num">{% if r.pct_bandwidth is not none %}{{ r.pct_bandwidth | sig }} %{% else %}—{% endif %}</td>
<td>{{ r.crossover or '—' }}</td></tr>{% endfor %}</table>{% endfor %}
{% if omitted %}<p class="note">Not drawn: {{ omitted | join('; ') }}.</p>{% endif %}""",
    "quality": """{% from "macros" import series %}
<p class="note">err ref: relative error of the output against the variant's own float64 reference (the
correctness check); err softmax: relative error against exact softmax attention on the same inputs
(how far the approximation is from the real thing). Worst value over the checked points.</p>
{% if rows %}<table><tr><th>series</th><th>family</th><th>dtype</th><th>err ref (max)</th>
<th>err softmax (max)</th><th>checked</th><th>incorrect</th></tr>
{% for r in rows %}<tr{% if r.incorrect %} class="bad"{% endif %}><td class="name">{{ series(r.series, styles) }}</td>
<td>{{ r.family }}</td><td>{{ r.dtype }}</td><td class="num">{{ r.err_ref | sci }}</td>
<td class="num">{{ r.err_softmax | sci }}</td><td class="num">{{ r.checked }}</td>
<td class="num">{{ r.incorrect }}</td></tr>{% endfor %}</table>
{% else %}<p class="note">No point was checked.</p>{% endif %}""",
    "problems": """{% from "macros" import series %}
{% if rows %}<p class="note">Every row (kernel point or training run) whose status is not ok, grouped by
status and series; identical reasons are listed once with how often they occurred.</p>
<table><tr><th>status</th><th>series</th><th>rows</th><th>where</th><th>reasons</th></tr>
{% for r in rows %}<tr><td><span class="status {{ r.status }}">{{ r.status }}</span></td>
<td class="name">{{ series(r.series, styles) }}</td><td class="num">{{ r.count }}</td><td class="name">{{ r.where }}</td>
<td class="reason"><ul>{% for reason, count in r.reasons %}<li>{% if count > 1 %}{{ count }}× {% endif %}{{ reason }}</li>{% endfor %}</ul></td></tr>
{% endfor %}</table>{% else %}<p class="note">None: every row is ok.</p>{% endif %}""",
    "profiles": """{% from "macros" import series %}
<p class="note">Points profiled by <code>bench run sweep --profile-top K</code> (the run's _profiles.json):
each folder holds the profiler trace (trace.json, for a trace viewer such as chrome://tracing), the
per-kernel table (kernels.csv) and the summary with the profile's agreement with the timing
(summary.json). Links are local, relative to this report's folder; a folder or file that is not there is
marked missing.</p>
<table><tr><th>series</th><th>point</th><th>time (ms, median)</th><th>folder</th>{% for name in files %}<th>{{ name }}</th>{% endfor %}</tr>
{% for r in rows %}<tr{% if not r.exists %} class="bad"{% endif %}><td class="name">{{ series(r.series, styles) if r.series else '—' }}</td>
<td>{{ r.point or 'point not in these results' }}</td><td class="num">{{ r.time_ms | sig }}</td>
<td class="path">{{ r.folder }}{% if not r.exists %} <span class="status missing">missing</span>{% endif %}</td>
{% for name, href in r.links %}<td>{% if href %}<a href="{{ href }}">{{ name }}</a>{% else %}<span class="status missing">missing</span>{% endif %}</td>{% endfor %}</tr>
{% endfor %}</table>""",
    "train_accumulation": """{% from "macros" import study_head, series, check %}
<p class="note">Each step's batch of B sequences is split into k micro-batches of B ÷ k whose gradients are
summed (the loss divided by the whole step's token count) before one optimizer step. Step time: median over
the run's steps (bars: p20–p80); peak memory: one step's activations, gradients and optimizer temporaries.
grad rel err = ‖accumulated − full-batch gradient‖ ÷ ‖full-batch gradient‖ on the same data and weights;
pass at ≤ {{ tolerance }}. × k=1: ÷ the value of the same setting at k = 1.</p>
{% for s in items %}{{ study_head(s.study) }}
{% if s.sentence %}<p class="finding">{{ s.sentence }}</p>{% endif %}
{% if s.svg %}<figure class="train" data-study="{{ s.study.name }}">{{ s.svg }}</figure>{% endif %}
<table><tr>{% if s.several %}<th>{{ s.setting }}</th>{% endif %}<th>k</th><th>micro-batch</th><th>step time (ms)</th>
<th>× k=1</th><th>tokens/s</th><th>peak memory</th><th>× k=1</th><th>grad rel err</th><th>check</th><th>{{ s.metric }}</th></tr>
{% for r in s.rows %}<tr{% if r.grad_check == 'fail' %} class="bad"{% endif %}>{% if s.several %}<td class="name">{{ series(r.label, s.styles) }}</td>{% endif %}
<td class="num">{{ r.accum_steps }}</td><td class="num">{{ r.micro_batch }}</td><td class="num">{{ r.step_time_ms | sig }}</td>
<td class="num">{{ r.step_time_ms_ratio | times }}</td><td class="num">{{ r.tokens_per_s | count }}</td>
<td class="num">{{ r.peak_mem_bytes | bytes }}</td><td class="num">{{ r.peak_mem_bytes_ratio | times }}</td>
<td class="num">{{ '—' if r.accum_steps == 1 else r.grad_rel_err | sci }}</td><td>{{ check(r.grad_check) }}</td>
<td class="num">{{ r.quality_text or '—' }}</td></tr>
{% endfor %}</table>
{% endfor %}""",
    "train_sharing": """{% from "macros" import study_head, ratio %}
<p class="note">unshared: L independent blocks; shared: one block applied L times (ALBERT); untied: shared
for the first part of training, then L independent copies of that block with fresh optimizer state (its
counts are those at the end). Unique parameters count a shared block once; gradients: bytes of all
parameters' gradients. Beside each value: × the unshared model's value in the same setting.</p>
{% for s in items %}{{ study_head(s.study) }}
{% if s.sentence %}<p class="finding">{{ s.sentence }}</p>{% endif %}
<table><tr>{% if s.several %}<th>{{ s.setting }}</th>{% endif %}<th>sharing</th><th>unique params</th>
<th>optimizer state</th><th>gradients</th><th>peak memory</th><th>step time (ms)</th><th>{{ s.metric }}</th></tr>
{% for r in s.rows %}<tr>{% if s.several %}<td class="name">{{ r.label }}</td>{% endif %}
<td class="name">{{ r.layer_sharing }}{% if r.layer_sharing == 'untied' and r.untie_at is not none %}
{{ ' ' }}<span class="muted">(at {{ '{:.0%}'.format(r.untie_at) }} of the steps)</span>{% endif %}</td>
<td class="num">{{ r.n_params | count }}{{ ratio(r.n_params_ratio) }}</td>
<td class="num">{{ r.opt_state_bytes | bytes }}{{ ratio(r.opt_state_bytes_ratio) }}</td>
<td class="num">{{ r.grad_bytes | bytes }}{{ ratio(r.grad_bytes_ratio) }}</td>
<td class="num">{{ r.peak_mem_bytes | bytes }}{{ ratio(r.peak_mem_bytes_ratio) }}</td>
<td class="num">{{ r.step_time_ms | sig }}{{ ratio(r.step_time_ms_ratio) }}</td>
<td class="num">{{ r.quality_text or '—' }}</td></tr>
{% endfor %}</table>
{% endfor %}""",
    "train_gelu": """{% from "macros" import study_head %}
<p class="note">exact: x·Φ(x) with the erf; tanh: the tanh approximation; sigmoid: x·σ(1.702x). Max |error|
against exact GELU as measured by the run, beside the published maximum and where it occurs
({{ source }}). × exact: step time ÷ the exact form's in the same setting.</p>
{% for s in items %}{{ study_head(s.study) }}
{% if s.sentence %}<p class="finding">{{ s.sentence }}</p>{% endif %}
<table><tr>{% if s.several %}<th>{{ s.setting }}</th>{% endif %}<th>form</th><th>max |error| measured</th><th>published</th>
<th>at |x| ≈</th><th>step time (ms)</th><th>× exact</th><th>tokens/s</th><th>{{ s.metric }}</th></tr>
{% for r in s.rows %}<tr>{% if s.several %}<td class="name">{{ r.label }}</td>{% endif %}
<td class="name">{{ r.gelu }}</td><td class="num">{{ r.gelu_max_abs_err | sci }}</td><td class="num">{{ r.published | sci }}</td>
<td class="num">{{ r.published_at | fixed }}</td><td class="num">{{ r.step_time_ms | sig }}</td>
<td class="num">{{ r.step_time_ms_ratio | times }}</td><td class="num">{{ r.tokens_per_s | count }}</td>
<td class="num">{{ r.quality_text or '—' }}</td></tr>
{% endfor %}</table>
{% endfor %}""",
    "train_quality": """{% from "macros" import study_head, series %}
<p class="note">Task quality after each study's fixed training budget, from rows with status ok: accuracy
(MQAR: share of the queried values recalled, higher is better) or bits per byte on held-out text (bytes:
lower is better); mean ± standard deviation over seeds where there are several (n = rows). Best first.</p>
{% for s in items %}{{ study_head(s.study) }}
{% if s.sentence %}<p class="finding">{{ s.sentence }}</p>{% endif %}
<table><tr><th>#</th><th>{{ s.setting }}</th><th>family</th><th>{{ s.metric }}</th><th>n</th>
<th>step time (ms)</th><th>tokens/s</th><th>peak memory</th><th>unique params</th></tr>
{% for r in s.rows %}<tr><td class="num">{{ loop.index }}</td><td class="name">{{ series(r.label, styles) }}</td>
<td>{{ r.family }}</td><td class="num">{{ r.quality_text or '—' }}</td><td class="num">{{ r.samples }}</td>
<td class="num">{{ r.step_time_ms | sig }}</td><td class="num">{{ r.tokens_per_s | count }}</td>
<td class="num">{{ r.peak_mem_bytes | bytes }}</td><td class="num">{{ r.n_params | count }}</td></tr>
{% endfor %}</table>
{% endfor %}""",
}


def _fixed(value: object) -> str:
    return f"{value:.2f}" if isinstance(value, float | int) and pd.notna(value) else "—"


def _sig(value: object) -> str:
    return f"{value:.3g}" if isinstance(value, float | int) and pd.notna(value) else "—"


def _sci(value: object) -> str:
    return f"{value:.2e}" if isinstance(value, float | int) and pd.notna(value) else "—"


def _times(value: object) -> str:
    return analysis.times(value) if isinstance(value, float | int) and pd.notna(value) else "—"


def _count(value: object) -> str:
    return f"{value:,.0f}" if isinstance(value, float | int) and pd.notna(value) else "—"


def _bytes(value: object) -> str:
    """Binary units, the largest that keeps the number at least 1 (KiB at the least)."""
    if not (isinstance(value, float | int) and pd.notna(value)):
        return "—"
    for shift, unit in ((30, "GiB"), (20, "MiB")):
        if value >= 1 << shift:
            return f"{value / (1 << shift):,.1f} {unit}"
    return f"{value / 1024:,.1f} KiB"


ENV = Environment(loader=DictLoader(TEMPLATES), autoescape=True, trim_blocks=True, lstrip_blocks=True)
ENV.filters.update(fixed=_fixed, sig=_sig, sci=_sci, times=_times, count=_count, bytes=_bytes)


def _render(template: str, **context: object) -> Markup:
    return Markup(ENV.get_template(template).render(**context))


def _records(frame: pd.DataFrame) -> list[dict]:
    """Rows for a template, NaN as None (so the template's filters print a dash)."""
    return frame.astype(object).where(frame.notna(), None).to_dict("records")


# --- sections ------------------------------------------------------------------------------------

def _kernel_section(build: Callable[[Report], Section]) -> SectionBuilder:
    """Leave a kernel section out of a report without kernel rows (a training-only run)."""
    @functools.wraps(build)
    def wrapper(report: Report) -> Section | None:
        return build(report) if len(report.kernel) else None

    return wrapper


def overview_section(report: Report) -> Section:
    kernel, train = report.kernel, report.train
    summary, findings, cards = [], [], []
    if len(kernel):
        summary += analysis.summary(kernel, report.agg, report.panels, report.ratio, report.fits, report.baseline)
        cards.append({"value": f"{int((kernel['status'] == 'ok').sum()):,} / {len(kernel):,}",
                      "label": "kernel points ok / measured"})
        for column, better, what in (("speedup", "max", "best speed-up"), ("mem_ratio", "min", "leanest memory ratio")):
            best = analysis.best_point(report.ratio, column, better, timed=column == "speedup")
            if best is not None:
                cards.append({"value": analysis.times(best[column]),
                              "label": f"{what}: {best['series']}, {best['panel']}, n={best['seq_len']:,}"})
    if len(train):
        findings = training.summary(report.studies)
        cards.append({"value": f"{int((train['status'] == 'ok').sum()):,} / {len(train):,}",
                      "label": f"training runs ok / run, in {len(report.studies)} studies"})
    problems = report.measured["status"].ne("ok").sum()
    cards.append({"value": f"{problems:,}", "label": "rows with problems (see Problems)"})
    body = _render("overview", cards=cards, summary=summary, findings=findings,
                   env=analysis.environment(report.rows))
    return Section("overview", "Summary and environment", body)


@_kernel_section
def scaling_plots_section(report: Report) -> Section:
    items = [(title, Markup(figures.scaling_figure(data, report.style_of, report.order)))
             for title, data in report.panel_data(report.agg)]
    body = _render("scaling_plots", items=items, chosen=report.baseline, omitted=report.panels.omitted,
                   shown=len(report.panels.titles))
    return Section("time-memory", "Time and memory vs sequence length", body)


@_kernel_section
def ratios_section(report: Report) -> Section:
    items = [(title, Markup(figures.ratio_figure(data, report.order)))
             for title, data in report.panel_data(report.ratio) if len(data)]
    body = _render("ratios", items=items, against=report.against, annotate=figures.ANNOTATE_COLUMNS)
    return Section("ratios", "Speed-up and memory ratio against the baseline", body)


@_kernel_section
def exponents_section(report: Report) -> Section:
    items = [(title, _records(report.in_order(table))) for title, table in report.panel_data(report.fits)]
    body = _render("exponents", items=items, styles=report.style_of)
    return Section("exponents", "Scaling exponents and crossovers", body)


@_kernel_section
def throughput_section(report: Report) -> Section:
    items, sources = [], set()
    for title, data in report.panel_data(report.agg):
        first = data.iloc[0]
        # A point aggregated over several devices matches no device's published figures.
        devices = set(data["device_name"].dropna()) if data["devices"].max() <= 1 else set()
        refs = reference.matching(devices, first["mode"], bool(first["causal"]), int(first["head_dim"]),
                                  first["dtype"])
        sources |= {r.source for r in refs}
        peak = analysis.device_peak(data)
        items.append((title, Markup(figures.throughput_figure(data, report.style_of, report.order, refs, peak))))
    reference_note = ("Dotted lines: published figures measured on the same device model and configuration, "
                      f"from the {' and the '.join(sorted(sources))} (batch = 16384 / n, hidden 2048)."
                      if sources else "No published reference figure matches this device and these panels.")
    peaks = analysis.best_pct_peak(report.agg, report.panels)
    peak_note = ("% of peak uses the device's datasheet peak for the dtype." if len(peaks) else
                 "No % of peak: the device is not in the peak table (a peak is never guessed).")
    body = _render("throughput", items=items, reference_note=reference_note, peak_note=peak_note,
                   peaks=_records(peaks), styles=report.style_of)
    return Section("throughput", "Throughput", body)


@_kernel_section
def quality_section(report: Report) -> Section:
    body = _render("quality", rows=_records(report.in_order(analysis.quality(report.kernel))),
                   styles=report.style_of)
    return Section("quality", "Quality", body)


def decode_section(report: Report) -> Section | None:
    decode = report.decode
    if decode.agg.empty:
        return None
    table = analysis.decode_table(decode)
    items = []
    for title in decode.panels.titles:
        data = decode.agg[decode.agg["panel"] == title]
        svg = Markup(figures.decode_figure(data, report.style_of, report.order, analysis.device_bandwidth(data)))
        items.append({"title": title, "svg": svg, "rows": _records(report.in_order(table[table["panel"] == title]))})
    body = _render("decode", items=items, styles=report.style_of, omitted=decode.panels.omitted)
    return Section("decode", "Decoding: one step against a cache", body)


def _href(path: Path, base: Path | None) -> str:
    """A link to a local file that opens offline: relative to the report's folder (it survives moving
    the two together), or a file:// URI where there is no relative path (another drive)."""
    if base is not None:
        try:
            return urllib.parse.quote(Path(os.path.relpath(path, base.resolve())).as_posix())
        except ValueError:
            pass
    return path.resolve().as_uri()


@_kernel_section
def profiles_section(report: Report) -> Section | None:
    if not report.profiles:
        return None
    rows = []
    for r in _records(analysis.profiled_points(report.kernel, report.profiles)):
        folder = Path(r["folder"])
        links = [(name, _href(folder / name, report.links_from) if (folder / name).is_file() else None)
                 for name in PROFILE_FILES]
        rows.append({**r, "exists": folder.is_dir(), "links": links})
    body = _render("profiles", rows=rows, files=PROFILE_FILES, styles=report.style_of)
    return Section("profiles", "Profiles", body)


def _study_item(study: training.Study, table: pd.DataFrame, sentence: str | None) -> dict:
    """What every training table template gets: the study, its finding, rows, quality header, and
    whether the table holds several settings (then a setting column is shown)."""
    metric = (f"{study.metric.name} {'↑' if study.metric.higher_better else '↓'}" if study.metric
              else "quality")
    return {"study": study, "sentence": sentence, "rows": _records(table), "metric": metric,
            "several": table["label"].nunique() > 1,
            "setting": "series" if table["label"].eq(table["series"]).all() else "setting"}


def _study_items(studies: list[training.Study], table_of: Callable[[training.Study], pd.DataFrame],
                 sentence_of: Callable[[training.Study, pd.DataFrame], str | None]) -> list[dict]:
    items = []
    for study in studies:
        table = table_of(study)
        items.append(_study_item(study, table, sentence_of(study, table)))
    return items


def accumulation_section(report: Report) -> Section | None:
    items = []
    for study in training.with_trick(report.studies, "accum_steps"):
        table = training.accumulation(study)
        family_of = dict(sorted(zip(table["label"], table["family"], strict=True),
                                key=lambda lf: figures.legend_key(*lf)))
        styles = figures.styles(family_of, None)
        lines = table.drop(columns="series").rename(columns={"label": "series"})
        svg = Markup(figures.accumulation_figure(lines, styles, list(family_of))) if len(table) else None
        items.append({**_study_item(study, table, training.accumulation_sentence(study, table)),
                      "svg": svg, "styles": styles})
    if not items:
        return None
    tolerance = ", ".join(f"{value:.0e} in {dtype}" for dtype, value in training.GRAD_TOLERANCE.items())
    body = _render("train_accumulation", items=items, tolerance=tolerance)
    return Section("train-accumulation", "Training: gradient accumulation", body)


def sharing_section(report: Report) -> Section | None:
    items = _study_items(training.with_trick(report.studies, "layer_sharing"), training.sharing,
                         training.sharing_sentence)
    if not items:
        return None
    return Section("train-sharing", "Training: shared vs unshared layers", _render("train_sharing", items=items))


def gelu_section(report: Report) -> Section | None:
    items = _study_items(training.with_trick(report.studies, "gelu"), training.gelu, training.gelu_sentence)
    if not items:
        return None
    body = _render("train_gelu", items=items, source=reference.GELU_SOURCE)
    return Section("train-gelu", "Training: GELU forms", body)


def train_quality_section(report: Report) -> Section | None:
    items = _study_items([s for s in report.studies if s.compares_series], training.quality,
                         training.quality_sentence)
    if not items:
        return None
    family_of = dict(sorted(zip(report.train["series"], report.train["family"], strict=True),
                            key=lambda sf: figures.legend_key(*sf)))
    body = _render("train_quality", items=items, styles=figures.styles(family_of, None))
    return Section("train-quality", "Training: task quality per attention", body)


def problems_section(report: Report) -> Section:
    body = _render("problems", rows=_records(analysis.problems(report.measured)), styles=report.style_of)
    return Section("problems", "Problems", body)


SECTIONS: list[SectionBuilder] = [overview_section, scaling_plots_section, ratios_section, exponents_section,
                                  throughput_section, decode_section, quality_section, profiles_section,
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
    devices = ", ".join(sorted({str(d) for d in rows["device_name"].dropna().unique()})) or "unknown device"
    parts = [devices, f"{len(rows):,} rows"]
    if len(report.kernel):
        parts.append(f"{len(report.panels.titles)} panels")
    if len(report.train):
        parts.append(f"{len(report.studies)} training studies")
    subtitle = " · ".join(parts)
    return ENV.get_template("page").render(
        name=report_name(rows), subtitle=subtitle, sections=built, css=Markup(CSS), version=__version__,
        generated=f"{dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M UTC}")
