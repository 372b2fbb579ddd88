"""Profile one point: a Chrome/Perfetto trace, the top-kernels table, a CUDA memory snapshot and a
summary, all in ``OUT/<variant>-<impl>-<shape>/``.

What is measured, and how the table is checked against the harness (the "agreement"):

1. The point is first measured exactly as a sweep measures it (:func:`bench.measure.measure`:
   correctness gate, cold call, warm-up, memory run, adaptive repetitions), in this process. Its
   median is the reference figure.
2. A fresh call on the same seeded inputs is warmed with :func:`bench.timers.warm_up`, then run
   under ``torch.profiler``: W unrecorded steps covering :data:`PROFILER_WARMUP_S` (its schedule's
   warm-up), then ``steps`` recorded ones. Each step is ``timer.once(call)``, the harness's own
   timed repetition (on CUDA: L2 flush, events, call; the call is its CUDA graph's replay when the
   point was timed as one), with only the timed ``call.run()`` inside a
   ``record_function(STEP_LABEL)`` range; what is outside it (the L2 flush, ``.grad = None``) is
   never counted, as the timer never counts it.
3. "Kernels", the rows of the table, are defined so that they partition the steps' time:

   * CPU: every operator event (any thread) lying inside a step range, keyed by name and valued by
     its *self* CPU time (its duration minus its children's). Self times do not overlap, so their
     sum over all rows, with the step range's own self time (Python, dispatch and the freeing of
     tensors between operators: the row :data:`GLUE_ROW`), is exactly the steps' wall time - what
     ``perf_counter`` around ``call.run()`` measures. Leaving that row out would make the table
     look short of the median by a definition, not by a measurement.
   * CUDA: every device activity (kernel, memcpy, memset) launched by a CPU operator inside a step
     range, valued by its duration on the device (``is_user_annotation`` ranges excluded, as in
     ``torch.profiler``'s own "Self CUDA time total"); the L2 flush is launched outside the range.
     CUDA events time from the first launch to the last completion, idle gaps between kernels
     included, so a total below the median shows launch-bound execution: real, not an error.

4. The agreement is the median over steps of each step's table total divided by the timed median
   (median against median: one preempted step cannot fake a disagreement); "within" when it lies
   in 1 +- :data:`AGREEMENT_TOLERANCE`. It factors as *coverage* (table total / the timer's reading
   of the same profiled steps: 1 on CPU by construction, the device's busy fraction on CUDA) times
   the profiled steps against the unprofiled median (profiler overhead plus run-to-run noise); both
   are stored, so a disagreement says which it is.

The CUDA memory snapshot is taken in its own untimed call (never inside timing or profiling);
turning a snapshot into files (:func:`write_memory_files`) needs no GPU and is tested without one.
"""

from __future__ import annotations

import csv
import json
import math
import pickle
import statistics
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch.autograd import DeviceType
from torch.autograd.profiler_util import FunctionEvent
from torch.profiler import ProfilerActivity, record_function, schedule

import variants
from variants.registry import DECODE, Entry, Point

from .compat import cuda_memory_history, linked_correlation_id, memory_trace_plot
from .device import CudaDevice, Device, open_device
from .env import environment
from .errors import BadInput
from .measure import WORKLOADS, MeasureSettings, make_call, measure
from .plan import Task
from .timers import Call, Timer, timed_form, warm_up

STEP_LABEL = "attnbench::step"
GLUE_ROW = f"{STEP_LABEL} (self: Python, dispatch and tensor frees between operators)"
DEFAULT_STEPS = 5
DEFAULT_TOP = 10
AGREEMENT_TOLERANCE = 0.10
# Steps run under the profiler before it records, by time like every warm-up here
# (docs/measurement.md, "Warm-up and repetitions"):
# the steps just after it starts run slow (its own start-up), by up to 3x on a small machine.
PROFILER_WARMUP_S = 0.1
MAX_PROFILER_WARMUP_STEPS = 100
# One point, not a grid: spend a little longer than a sweep does, so the median the table is
# compared against is steady (>= 10 repetitions).
PROFILE_SETTINGS = MeasureSettings(warmup_s=0.25, target_s=0.5, min_reps=10)
# Allocator events kept by the CUDA memory history; one call of one point stays far below this.
MEMORY_HISTORY_ENTRIES = 100_000
FILES = {"trace": "trace.json", "kernels": "kernels.csv", "summary": "summary.json",
         "memory_pickle": "memory.pickle", "memory_html": "memory.html"}


class PointFailed(RuntimeError):
    """The point did not measure ``ok`` (incorrect, out of memory, error): there is nothing to profile."""


# --- naming --------------------------------------------------------------------------------------

def shape_slug(point: Point) -> str:
    """``fwd-b1-h4-n2048-d64-float32-cpu``, with ``-causal`` after the mode and each parameter
    (``-window256``) before the device; a point's directory name never collides with another's."""
    parts = [point.mode, *(["causal"] if point.causal else []), f"b{point.batch}", f"h{point.heads}",
             f"n{point.seq_len}", *([f"q{point.q_len}"] if point.mode == DECODE else []), f"d{point.head_dim}",
             point.dtype,
             *(f"{k}{v}" for k, v in sorted(point.params.items())), point.device.replace(":", "")]
    return "-".join(parts)


def point_dir(out_dir: Path, entry: Entry, point: Point) -> Path:
    return out_dir / f"{entry.variant}-{entry.impl}-{shape_slug(point)}"


# --- the activity table (kernels on CUDA, operators on CPU) ---------------------------------------

@dataclass(frozen=True)
class ActivityRow:
    name: str
    calls: int
    self_us: float  # summed over all recorded steps


@dataclass(frozen=True)
class ActivityTable:
    """Rows sorted by time, and each recorded step's total (the sum of its rows' times)."""

    rows: list[ActivityRow]
    step_totals_us: list[float]
    basis: str

    @property
    def total_us(self) -> float:
        return sum(r.self_us for r in self.rows)


def activity_table(events: Sequence[FunctionEvent], device_time: bool) -> ActivityTable:
    """The table of the events recorded inside ``STEP_LABEL`` ranges (see the module docstring for
    why these rows and times). ``device_time``: rows are device activities, else CPU operators."""
    steps = sorted((e for e in events if e.name == STEP_LABEL and e.device_type == DeviceType.CPU),
                   key=lambda e: e.time_range.start)
    if not steps:
        raise ValueError(f"no {STEP_LABEL!r} range among the profiled events")

    def step_of(event: FunctionEvent) -> int | None:
        for index, step in enumerate(steps):
            if step.time_range.start <= event.time_range.start and event.time_range.end <= step.time_range.end:
                return index
        return None

    cpu_steps = [(e, i) for e in events if e.device_type == DeviceType.CPU and (i := step_of(e)) is not None]
    if device_time:
        items = _device_items(events, cpu_steps)
        basis = "self device time of device activities launched inside the steps"
    else:
        items = [(i, GLUE_ROW if e.name == STEP_LABEL else e.name, e.self_cpu_time_total)
                 for e, i in cpu_steps]
        basis = "self CPU time of operators inside the steps, Python between operators included"
    totals: dict[str, list[float]] = {}
    step_totals = [0.0] * len(steps)
    for index, name, us in items:
        totals.setdefault(name, []).append(us)
        step_totals[index] += us
    rows = sorted((ActivityRow(name, len(times), sum(times)) for name, times in totals.items()),
                  key=lambda r: r.self_us, reverse=True)
    return ActivityTable(rows, step_totals, basis)


def _device_items(events: Sequence[FunctionEvent],
                  cpu_steps: list[tuple[FunctionEvent, int]]) -> list[tuple[int, str, float]]:
    """``(step, name, device us)`` of each device activity launched by a CPU event inside a step
    (``cpu_steps``: those events with their step), user-annotation ranges left out.

    The launcher is the CPU operator the activity is linked to by correlation, as torch.profiler
    links them; what names it differs between torch versions:

    * ``FunctionEvent.linked_correlation_id`` (in 2.13, not in 2.11), preferred where present: the
      device events themselves, each flagged ``is_user_annotation`` or not. An activity links to
      its operator's id, or to the id of an operator that torch merged into a same-named parent
      (``aten::sum`` in ``aten::sum``) and dropped from the list; so the runtime calls inside the
      steps (``cudaLaunchKernel``: linked to the same id, their own ids another counter) map their
      links to their step too.
    * Else each operator's ``kernels`` (name, duration), which every torch from 2.9 on builds from
      that same link (lifted to the parent on a merge). Entries carry no annotation flag; the
      device-side mirror of a ``record_function`` range is linked to the range and bears its name,
      so entries named as a device user-annotation event are left out.
    """
    links = [linked_correlation_id(e) for e in events]
    if None in links:
        annotations = {e.name for e in events if e.device_type != DeviceType.CPU and e.is_user_annotation}
        return [(i, k.name, k.duration) for e, i in cpu_steps for k in e.kernels if k.name not in annotations]
    # an operator's own link is 0: activities link to its id
    launcher_step = {key: i for e, i in cpu_steps if (key := linked_correlation_id(e) or e.id)}
    return [(launcher_step[link], e.name, e.time_range.elapsed_us())
            for e, link in zip(events, links, strict=True)
            if e.device_type != DeviceType.CPU and not e.is_user_annotation and link in launcher_step]


def write_activities_csv(table: ActivityTable, path: Path) -> None:
    steps = len(table.step_totals_us)
    total = table.total_us
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["name", "calls", "calls_per_step", "self_ms_total", "self_ms_per_step", "share"])
        for r in table.rows:  # microsecond resolution: what the profiler records
            writer.writerow([r.name, r.calls, round(r.calls / steps, 3), round(r.self_us / 1e3, 3),
                             round(r.self_us / 1e3 / steps, 3), round(r.self_us / total, 5) if total else 0.0])


# --- CUDA memory ---------------------------------------------------------------------------------

def record_memory_snapshot(call: Call, device: CudaDevice) -> dict[str, Any] | None:
    """The CUDA caching allocator's history over one untimed call (``torch.cuda.memory._snapshot``);
    ``None``, with a warning, where this torch lacks that private recorder: the profile goes on
    without memory files rather than fail."""
    history = cuda_memory_history()
    if history is None:
        warnings.warn("this PyTorch has no torch.cuda.memory._record_memory_history/_snapshot: "
                      "profiling without a memory snapshot", RuntimeWarning, stacklevel=2)
        return None
    record, snapshot = history
    call.before()
    device.synchronize()
    # Python frames only: symbolising C++ frames can take minutes on a large snapshot.
    record(stacks="python", max_entries=MEMORY_HISTORY_ENTRIES, device=device.index, clear_history=True)
    try:
        call.run()
        device.synchronize()
        return snapshot(device.index)
    finally:
        record(enabled=None, device=device.index)


def write_memory_files(snapshot: dict[str, Any], directory: Path) -> dict[str, str | None]:
    """``memory.pickle`` (open at https://pytorch.org/memory_viz) and, where this PyTorch provides
    the renderer, ``memory.html`` (its page loads PyTorch's MemoryViz.js from a CDN to draw)."""
    with (directory / FILES["memory_pickle"]).open("wb") as f:
        pickle.dump(snapshot, f)
    written: dict[str, str | None] = {"memory_pickle": FILES["memory_pickle"], "memory_html": None}
    trace_plot = memory_trace_plot()
    if trace_plot is None:  # a private module: a PyTorch without it still gets the pickle
        return written
    (directory / FILES["memory_html"]).write_text(trace_plot(snapshot))
    written["memory_html"] = FILES["memory_html"]
    return written


# --- profiling -----------------------------------------------------------------------------------

def _profile_steps(timer: Timer, call: Call, warmup: int, steps: int, cuda: bool,
                   trace: Path) -> tuple[list[FunctionEvent], list[float]]:
    """Run ``steps`` timed repetitions under the profiler, after ``warmup`` unrecorded ones, and
    export the trace; returns the recorded events and the timer's reading of each recorded step."""
    def run() -> Any:
        with record_function(STEP_LABEL):
            return call.run()

    recorded: list[FunctionEvent] = []

    def ready(prof: torch.profiler.profile) -> None:
        prof.export_chrome_trace(str(trace))
        recorded.extend(prof.events())

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    stepped = Call(run, call.before)
    # One profiler step holds all the warm-up repetitions, the next all the recorded ones:
    # prof.step() between repetitions cost ~5% of a 2.5 ms call on a 2-core CPU (measured here), which
    # would show as disagreement with the unprofiled median.
    with torch.profiler.profile(activities=activities, on_trace_ready=ready,
                                schedule=schedule(wait=0, warmup=1, active=1, repeat=1)) as prof:
        for _ in range(warmup):
            timer.once(stepped)
        prof.step()
        step_ms = [timer.once(stepped) for _ in range(steps)]
        prof.step()
    return recorded, step_ms


def profile_point(target: Task | tuple[Entry, Point], out_dir: Path, *, steps: int = DEFAULT_STEPS,
                  top: int = DEFAULT_TOP, settings: MeasureSettings = PROFILE_SETTINGS,
                  device: Device | None = None) -> dict[str, Any]:
    """Measure and profile one point into ``out_dir/<variant>-<impl>-<shape>/``; return the summary
    (also written there as ``summary.json``).

    ``target`` is a sweep :class:`~bench.plan.Task` or an ``(entry, point)`` pair; the point's params
    are overlaid on the entry's defaults. Raises :class:`BadInput` when the entry cannot run the
    point here (its ``not_supported_reasons``) and :class:`PointFailed` when the point does not measure
    ``ok``; nothing is written in either case. A sweep's ``--profile-top K`` calls this for its K
    chosen tasks, each in its worker process (the profile must run where it was measured).
    """
    if isinstance(target, Task):
        entry, point = variants.get(target.variant, target.impl), target.point
    else:
        entry, point = target
    point = replace(point, params=entry.resolve(point.params))
    reasons = entry.not_supported_reasons(point)
    if reasons:
        raise BadInput(f"{entry.name} cannot run {shape_slug(point)}: {'; '.join(reasons)}")
    if steps < 1:
        raise BadInput(f"steps: {steps!r} must be a positive integer")
    device = device or open_device(point.device)
    row = measure(entry, point, settings, device)
    if row["status"] != "ok":
        raise PointFailed(f"{entry.name} {shape_slug(point)}: {row['status']}: {row['reason']}")

    directory = point_dir(out_dir, entry, point)
    directory.mkdir(parents=True, exist_ok=True)
    cuda = device.is_cuda
    call, _ = make_call(entry, point, device)
    # what the median timed, profiled alike
    form = timed_form(call, device, settings.cuda_graph, WORKLOADS[point.mode].graph_refusal)
    warm_up(form.timer, form.call, settings.warmup_s)
    files: dict[str, str | None] = {"trace": FILES["trace"], "kernels": FILES["kernels"],
                                    "summary": FILES["summary"], "memory_pickle": None, "memory_html": None}
    if cuda and (snapshot := record_memory_snapshot(call, device)) is not None:
        files.update(write_memory_files(snapshot, directory))
    warmup = min(MAX_PROFILER_WARMUP_STEPS, math.ceil(PROFILER_WARMUP_S * 1e3 / row["time_ms"]))
    events, step_ms = _profile_steps(form.timer, form.call, warmup, steps, cuda, directory / FILES["trace"])
    table = activity_table(events, device_time=cuda)
    write_activities_csv(table, directory / FILES["kernels"])

    summary = {
        "variant": entry.variant, "impl": entry.impl, "family": entry.family,
        "point": {**asdict(point), "params": dict(point.params)},
        "directory": str(directory),
        "measured": {k: row.get(k) for k in ("time_ms", "time_ms_p20", "time_ms_p80", "reps", "noisy",
                                             "setup_ms", "peak_mem_bytes", "input_bytes", "flops",
                                             "tflops", "pct_peak", "err_ref", "err_softmax", "kernel")},
        **_table_summary(table, steps, warmup, step_ms, row["time_ms"], top),
        "files": files,
        "environment": environment(device),
    }
    (directory / FILES["summary"]).write_text(json.dumps(summary, indent=1, default=str))
    return summary


def _table_summary(table: ActivityTable, steps: int, warmup: int, step_ms: list[float], median_ms: float,
                   top: int) -> dict[str, Any]:
    """The summary's ``profile``, ``agreement`` and ``top_kernels`` parts, from the table of the
    profiled steps and the point's timed median."""
    per_step_ms = statistics.median(table.step_totals_us) / 1e3
    ratio = per_step_ms / median_ms
    total = table.total_us
    return {
        "profile": {"steps": steps, "warmup_steps": warmup, "basis": table.basis, "rows": len(table.rows),
                    "table_ms_total": total / 1e3, "table_ms_per_step_mean": total / 1e3 / steps,
                    "table_ms_per_step": per_step_ms,
                    "table_step_ms": [us / 1e3 for us in table.step_totals_us], "profiled_step_ms": step_ms},
        # ratio ~ coverage x (profiled step / timed median): see the module docstring, point 4.
        "agreement": {"table_ms_per_step": per_step_ms, "measured_median_ms": median_ms,
                      "ratio": ratio, "tolerance": AGREEMENT_TOLERANCE,
                      "within": abs(ratio - 1) <= AGREEMENT_TOLERANCE,
                      "profiled_step_median_ms": statistics.median(step_ms),
                      "coverage": total / 1e3 / sum(step_ms)},
        "top_kernels": [{"name": r.name, "calls_per_step": r.calls / steps,
                         "self_ms_per_step": r.self_us / 1e3 / steps,
                         "share": r.self_us / total if total else 0.0} for r in table.rows[:top]],
    }


@dataclass(frozen=True)
class ProfileJob:
    """Profiling one sweep point, as a runner task: it runs in a worker process like the point did."""

    task: Task
    out_dir: Path

    @property
    def point(self) -> Point:
        return self.task.point

    def group(self) -> tuple:
        return self.task.group()

    def execute(self, settings: MeasureSettings, device: Device | None = None) -> dict[str, Any]:
        try:
            summary = profile_point(self.task, self.out_dir, settings=settings, device=device)
            return {"status": "ok", "directory": summary["directory"]}
        except (BadInput, PointFailed) as exc:
            return {"status": "error", "reason": str(exc)}


def profile_slowest(tasks: list[Task], rows: Any, k: int, out_dir: Path, run_dir: Path,
                    timeout_s: float, cuda_graph: bool = False) -> dict[str, str]:
    """Profile the ``k`` slowest ok points of a finished run in a worker process (as they were
    measured: isolated from this one, as a CUDA graph's replay if they were), and record
    ``key -> profile folder`` in ``run_dir/_profiles.json`` (the report links them)."""
    from .runner import Worker

    ok = rows[rows["status"] == "ok"].sort_values("time_ms", ascending=False)
    by_key = {t.fields()["key"]: t for t in tasks}
    chosen = [by_key[key] for key in ok["key"] if key in by_key][:k]
    record = run_dir / "_profiles.json"
    profiles: dict[str, str] = json.loads(record.read_text()) if record.is_file() else {}
    if not chosen:
        return profiles
    worker = Worker(replace(PROFILE_SETTINGS, cuda_graph=cuda_graph), chosen[0].point.device)
    try:
        for task in chosen:
            result = worker.run(ProfileJob(task, out_dir), timeout_s)
            if result["status"] == "ok":
                profiles[task.fields()["key"]] = str(Path(result["directory"]).resolve())
    finally:
        worker.stop()
    record.write_text(json.dumps(profiles, indent=1))
    return profiles
