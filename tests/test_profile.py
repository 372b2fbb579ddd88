"""`bench profile`: trace, kernels table against the timed median, summary, exit codes, memory files."""

from __future__ import annotations

import base64
import copy
import csv
import json
import pickle
import re
import statistics
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from fake_cuda import CpuBackedCuda, FakeCuda
from support import why_not
from torch.autograd import DeviceType
from torch.autograd.profiler_util import FunctionEvent
from torch.profiler import ProfilerActivity, record_function
from typer.testing import CliRunner

import variants
from bench.cli import app
from bench.device import open_device
from bench.measure import MeasureSettings, make_call
from bench.profile import (
    GLUE_ROW,
    STEP_LABEL,
    ActivityTable,
    activity_table,
    profile_point,
    record_memory_snapshot,
    write_memory_files,
)
from bench.timers import Call

EAGER_512 = ["standard/eager", "--seq-len", "512", "--batch-size", "1", "--heads", "4", "--head-dim", "64",
             "--mode", "fwd", "--device", "cpu"]
STEPS = 10  # more than the default 5: the median step is steadier on a shared machine
SUMMARY_KEYS = {"variant", "impl", "family", "point", "directory", "measured", "profile", "agreement",
                "top_kernels", "files", "environment"}
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def single_thread():
    # Other processes on a small CI box preempt one of torch's intra-op threads and the whole op
    # waits for it (seen here: 16x slower on 2 busy cores). What the tests check is accounting, not
    # speed, so they time one thread.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def eager(tmp_path_factory, single_thread):
    """`bench profile` of standard/eager at n=512, once for the module."""
    out = tmp_path_factory.mktemp("profiles")
    result = CliRunner().invoke(app, ["profile", *EAGER_512, "--out", str(out), "--steps", str(STEPS)])
    assert result.exit_code == 0, result.output
    (directory,) = out.iterdir()
    return SimpleNamespace(output=result.output, directory=directory, out=out,
                           summary=json.loads((directory / "summary.json").read_text()))


def test_directory_is_named_after_the_point(eager):
    assert eager.directory.name == "standard-eager-fwd-b1-h4-n512-d64-float32-cpu"
    assert str(eager.directory) in eager.output


def test_trace_is_chrome_json_with_operators_and_no_warm_up(eager):
    trace = json.loads((eager.directory / "trace.json").read_text())
    events = trace["traceEvents"]
    assert events
    assert any(e.get("name", "").startswith("aten::") for e in events)
    # warm-up excluded: exactly the recorded steps, not the profiler's warm-up step nor measure's.
    assert sum(e.get("name") == STEP_LABEL for e in events) == STEPS


def read_kernels(directory: Path) -> list[dict]:
    with (directory / "kernels.csv").open() as f:
        return list(csv.DictReader(f))


def test_kernels_csv_partitions_the_table(eager):
    rows = read_kernels(eager.directory)
    assert len(rows) >= 3 and any(r["name"].startswith("aten::") for r in rows)
    assert [r["name"] for r in rows].count(GLUE_ROW) == 1
    times = [float(r["self_ms_total"]) for r in rows]
    assert times == sorted(times, reverse=True)
    assert sum(float(r["share"]) for r in rows) == pytest.approx(1, abs=1e-3)
    assert sum(times) / STEPS == pytest.approx(eager.summary["profile"]["table_ms_per_step_mean"], rel=1e-3)


def test_printed_table_shows_top_rows_and_agreement(eager):
    short = [r["name"] for r in eager.summary["top_kernels"] if len(r["name"]) < 20]  # rich folds long ones
    assert short and all(name in eager.output for name in short)
    printed = " ".join(eager.output.split())  # rich wraps lines at the terminal width
    assert re.search(r"agreement: table [\d.]+ ms/step .* -> [\d.]+x, (within|outside) 10%", printed)


def test_table_accounts_for_every_profiled_step_exactly(eager):
    """Self times partition a step range, so each step's table total is that step's wall time; the
    timer's reading of the same step adds only the record_function enter/exit around it (~10 us)."""
    profile = eager.summary["profile"]
    gaps = [timed - table for table, timed in zip(profile["table_step_ms"], profile["profiled_step_ms"], strict=True)]
    assert len(gaps) == STEPS
    assert min(gaps) > -0.005, gaps  # the table never exceeds the step (5 us of clock granularity)
    # the typical step: a preemption can land in the gap of one step, not of most
    assert statistics.median(gaps) < max(0.1, 0.02 * statistics.median(profile["profiled_step_ms"])), gaps
    assert eager.summary["agreement"]["coverage"] <= 1.001


def spread(samples: list[float]) -> float:
    """p80 / p20, the harness's own measure of a noisy timing."""
    p20, *_, p80 = statistics.quantiles(samples, n=5, method="inclusive")
    return p80 / p20


def test_table_total_agrees_with_timed_median(eager):
    """The table's median step is within 10% of the median timed by bench.measure just before.

    Both are wall times of the same call, so on a machine shared with other processes a burst of
    load in one phase and not the other moves them apart: such an attempt is re-run, three in all.
    If every attempt was disturbed - the harness's timing or the profiled steps spread by more than
    its `noisy_spread` (p80/p20 > 1.1) - a wall-clock 10% check cannot be made here and the test
    says so and skips; an attempt with steady timings that still disagrees fails. The errors this
    guards against are systematic: the warm-up counted (x1.2 at 5 steps), totals instead of self
    times (>= x2), a range summed twice, profiler overhead past 10%, another call or shape profiled."""
    entry, point = variants.get("standard/eager"), variants.Point(batch=1, heads=4, seq_len=512, head_dim=64)
    # The product's bound is 10%; on CI's shared 2-core machine a steady-looking attempt still
    # wanders by up to ~13%, so the test takes 15%: still below the smallest systematic error (x1.2).
    within = lambda s: abs(s["agreement"]["ratio"] - 1) <= 0.15  # noqa: E731
    attempts = [eager.summary]
    while not within(attempts[-1]) and len(attempts) < 5:
        attempts.append(profile_point((entry, point), eager.out / "retry", steps=STEPS))
    if within(attempts[-1]):
        return
    seen = [(round(s["agreement"]["ratio"], 3), round(s["measured"]["time_ms_p80"] / s["measured"]["time_ms_p20"], 2),
             round(spread(s["profile"]["profiled_step_ms"]), 2)) for s in attempts]
    noisy_spread = MeasureSettings().noisy_spread
    if all(s["measured"]["noisy"] or spread(s["profile"]["profiled_step_ms"]) > noisy_spread for s in attempts):
        pytest.skip(f"machine too busy for a 10% wall-clock comparison: (ratio, timed p80/p20, profiled "
                    f"p80/p20) per attempt = {seen}")
    pytest.fail(f"table vs timed median outside 15% with steady timings: (ratio, timed p80/p20, "
                f"profiled p80/p20) per attempt = {seen}")


def test_summary_has_the_point_measurements_agreement_and_files(eager):
    s = eager.summary
    assert SUMMARY_KEYS <= set(s)
    assert (s["variant"], s["impl"]) == ("standard", "eager")
    assert s["point"] | {"params": {}} == {"batch": 1, "heads": 4, "seq_len": 512, "head_dim": 64,
                                           "dtype": "float32", "device": "cpu", "causal": False,
                                           "mode": "fwd", "params": {}, "q_len": 1, "kv_heads": None,
                                       "layout": "dense", "documents": None}
    m = s["measured"]
    assert m["time_ms"] > 0 and m["reps"] >= 10 and m["peak_mem_bytes"] > 0
    assert m["flops"] == 4 * 1 * 4 * 512 * 512 * 64  # dense forward (backward would be 2.5×)
    a = s["agreement"]
    assert a["measured_median_ms"] == m["time_ms"] and a["ratio"] == pytest.approx(a["table_ms_per_step"] / m["time_ms"])
    assert a["within"] == (abs(a["ratio"] - 1) <= a["tolerance"])
    assert s["files"]["memory_pickle"] is None  # CPU: no allocator history to snapshot
    for name in filter(None, s["files"].values()):
        assert (eager.directory / name).is_file()


# --- bad input: exit 2, one message naming the bad value, nothing written ------------------------

BAD = [
    (["nosuch"], "nosuch"),
    (["standard/nosuch"], "nosuch"),
    (["standard/eager", "--seq-len", "0"], "0"),
    (["standard/eager", "--heads", "-3"], "-3"),
    (["standard/eager", "--batch-size", "0"], "0"),
    (["standard/eager", "--head-dim", "0"], "0"),
    (["standard/eager", "--dtype", "float8"], "float8"),
    (["standard/eager", "--mode", "sideways"], "sideways"),
    (["local/blocked", "--param", "width=4"], "width"),
    (["local/blocked", "--param", "window=wide"], "window=wide"),
    (["local/blocked", "--param", "window=-1"], "window=-1"),
]


@pytest.mark.parametrize("args,named", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_exits_2_naming_it(tmp_path, args, named):
    result = CliRunner().invoke(app, ["profile", *args, "--device", "cpu", "--out", str(tmp_path / "p")])
    assert result.exit_code == 2, result.output
    assert named in result.output
    assert not (tmp_path / "p").exists()


def cpu_point(**kw) -> variants.Point:
    return variants.Point(batch=1, heads=1, seq_len=64, head_dim=16, device="cpu", **kw)


def test_unsupported_point_exits_2_with_its_reason(tmp_path):
    entry = next((e for e in variants.entries() if why_not(e, cpu_point(params=e.resolve()))), None)
    if entry is None:
        pytest.skip("every registered impl runs on this CPU")
    reason = why_not(entry, cpu_point(params=entry.resolve()))
    result = CliRunner().invoke(app, ["profile", entry.name, "--seq-len", "64", "--heads", "1", "--head-dim",
                                      "16", "--device", "cpu", "--out", str(tmp_path / "p")])
    assert result.exit_code == 2, result.output
    assert entry.name in result.output and " ".join(reason.split())[:40] in " ".join(result.output.split())
    assert not (tmp_path / "p").exists()


def test_variant_alone_profiles_each_impl_that_can_run(tmp_path, single_thread):
    def split(variant):
        entries = variants.select(variant)
        return [e for e in entries if not why_not(e, cpu_point(params=e.resolve()))], \
               [e for e in entries if why_not(e, cpu_point(params=e.resolve()))]

    # the variant with the fewest runnable impls that also has one that cannot run (fast, and covers both)
    candidates = [(len(split(v)[0]), v) for v in variants.variant_names() if all(split(v))]
    if not candidates:
        pytest.skip("no variant has both runnable and unsupported impls here")
    variant = min(candidates)[1]
    runnable, skipped = split(variant)
    result = CliRunner().invoke(app, ["profile", variant, "--seq-len", "64", "--heads", "1", "--head-dim", "16",
                                      "--device", "cpu", "--steps", "2", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert sorted(d.name.split("-fwd-")[0] for d in tmp_path.iterdir()) == \
        sorted(f"{e.variant}-{e.impl}" for e in runnable)
    assert all(f"skipped {e.name}" in result.output for e in skipped)


# --- the device (CUDA) table and memory files, without a GPU -------------------------------------

# torch.profiler's events come in two shapes within the supported range: 2.13's carry
# `linked_correlation_id`, 2.11's do not. Every version gives each operator the device activities
# linked to it in `kernels`. The device table must come out the same from either shape.
BOTH_SHAPES = pytest.mark.parametrize("linked", [True, False], ids=["with-linked-id", "without-linked-id"])

Spec = tuple[FunctionEvent, int]  # an event and the correlation id it is linked to (0: none)


def event(name: str, start: float, end: float, id: int, device: DeviceType = DeviceType.CPU,
          linked: int = 0, annotation: bool = False) -> Spec:
    # no linked_correlation_id= here: a FunctionEvent without the field takes no such argument
    return FunctionEvent(id=id, name=name, thread=1, start_us=start, end_us=end, device_type=device,
                         is_user_annotation=annotation, use_device="cuda"), linked


def without_link(event: FunctionEvent) -> FunctionEvent:
    """A copy of ``event`` as a torch without ``linked_correlation_id`` makes it."""
    bare = copy.copy(event)
    if hasattr(bare, "linked_correlation_id"):
        del bare.linked_correlation_id
    return bare


def parsed(specs: list[Spec], linked: bool, merged: dict[int, int] | None = None) -> list[FunctionEvent]:
    """The events as torch.profiler hands them over. As every version's parser does, each operator
    (a CPU event linked to nothing) gets the device activities linked to it in ``kernels``; ``merged``
    (an operator's id -> its parent's) names operators that torch merged into a same-named parent
    and left out of ``specs``, their activities going to the parent. ``linked``: each event also
    has ``linked_correlation_id``, else it has not."""
    merged = merged or {}
    operators = {e.id: e for e, link in specs if e.device_type == DeviceType.CPU and not link}
    for e, link in specs:
        if e.device_type != DeviceType.CPU:
            operators[merged.get(link, link)].append_kernel(e.name, e.device_index, e.time_range.elapsed_us())
    if not linked:
        return [without_link(e) for e, _ in specs]
    for e, link in specs:
        e.linked_correlation_id = link
    return [e for e, _ in specs]


def rows(table: ActivityTable) -> list[tuple[str, int, float]]:
    return [(r.name, r.calls, r.self_us) for r in table.rows]


@BOTH_SHAPES
def test_device_table_counts_only_kernels_launched_inside_steps(linked):
    events = parsed([
        event("aten::zero_", 0, 5, id=10),                      # the L2 flush, before the step range
        event(STEP_LABEL, 10, 50, id=20, annotation=True),
        event("aten::mm", 12, 20, id=21),
        event("cudaLaunchKernel", 14, 18, id=10, linked=21),   # runtime call: its id is another counter
        event("flush_kernel", 5, 35, id=10, device=DeviceType.CUDA, linked=10),
        event("gemm_kernel", 35, 75, id=21, device=DeviceType.CUDA, linked=21),
        event(STEP_LABEL, 30, 75, id=20, device=DeviceType.CUDA, linked=20, annotation=True),
    ], linked)
    table = activity_table(events, device_time=True)
    assert rows(table) == [("gemm_kernel", 1, 40)]
    assert table.step_totals_us == [40]


@BOTH_SHAPES
def test_device_table_assigns_each_activity_to_its_launchers_step(linked):
    """Two steps; activities launched by a merged operator, a memcpy, one launched by the step range
    itself (a kernel launched from Python), a nested annotation; runtime and kernel ids that collide
    with operator ids (CUPTI counts from 1 too)."""
    events = parsed([
        event(STEP_LABEL, 0, 100, id=1, annotation=True),
        event("aten::sum", 10, 40, id=2),                       # its inner aten::sum (id 3) was merged in
        event("cudaLaunchKernel", 20, 25, id=6, linked=3),
        event("reduce_kernel", 30, 36, id=6, device=DeviceType.CUDA, linked=3),
        event("aten::copy_", 50, 60, id=4),
        event("cudaMemcpyAsync", 52, 58, id=7, linked=4),
        event("Memcpy HtoD (Pageable -> Device)", 60, 64, id=7, device=DeviceType.CUDA, linked=4),
        event("cuLaunchKernel", 70, 72, id=8, linked=1),
        event("triton_kernel", 72, 74, id=8, device=DeviceType.CUDA, linked=1),
        event(STEP_LABEL, 30, 74, id=1, device=DeviceType.CUDA, linked=1, annotation=True),
        event("aten::zero_", 150, 160, id=9),                   # between the steps: never counted
        event("cudaLaunchKernel", 151, 152, id=2, linked=9),
        event("flush_kernel", 152, 200, id=2, device=DeviceType.CUDA, linked=9),
        event(STEP_LABEL, 200, 300, id=5, annotation=True),
        event("aten::sum", 210, 240, id=6),
        event("cudaLaunchKernel", 220, 225, id=4, linked=6),
        event("reduce_kernel", 250, 256, id=4, device=DeviceType.CUDA, linked=6),
        event("inner", 260, 290, id=10, annotation=True),
        event("aten::mul", 265, 280, id=11),
        event("cudaLaunchKernel", 266, 270, id=5, linked=11),
        event("mul_kernel", 270, 273, id=5, device=DeviceType.CUDA, linked=11),
        event("inner", 270, 280, id=9, device=DeviceType.CUDA, linked=10, annotation=True),
        event(STEP_LABEL, 250, 273, id=3, device=DeviceType.CUDA, linked=5, annotation=True),
    ], linked, merged={3: 2})
    table = activity_table(events, device_time=True)
    assert rows(table) == [("reduce_kernel", 2, 12), ("Memcpy HtoD (Pageable -> Device)", 1, 4),
                           ("mul_kernel", 1, 3), ("triton_kernel", 1, 2)]
    assert table.step_totals_us == [12, 9]
    assert table.basis == "self device time of device activities launched inside the steps"


def profile_cpu_steps(steps: int) -> list[FunctionEvent]:
    """This torch's own events on CPU, steps recorded as bench.profile records them: a matrix
    product before any step (as the L2 flush is), then in step j, j + 1 products and a softmax."""
    a = torch.randn(32, 32)
    with torch.profiler.profile(activities=[ProfilerActivity.CPU]) as prof:
        torch.mm(a, a)
        for j in range(steps):
            with record_function(STEP_LABEL):
                for _ in range(j + 1):
                    torch.mm(a, a)
                torch.softmax(a, dim=-1)
    return list(prof.events())


GEMM_US, SOFTMAX_US = 5.0, 3.0


def launched_on_device(cpu_events: list[FunctionEvent]) -> list[Spec]:
    """``cpu_events`` with what a CUDA run adds to them: for each aten::mm and aten::_softmax a
    runtime call inside it and the kernel it launches, both linked to the operator, and each step
    range's device-side mirror. Runtime and kernel ids count from 1, colliding with operator ids."""
    launches = {"aten::mm": ("gemm", GEMM_US), "aten::_softmax": ("softmax_kernel", SOFTMAX_US)}
    specs: list[Spec] = [(e, 0) for e in cpu_events]
    for cupti_id, op in enumerate((e for e in cpu_events if e.name in launches or e.name == STEP_LABEL), 1):
        if op.name == STEP_LABEL:
            specs.append(event(STEP_LABEL, 0, op.time_range.elapsed_us(), cupti_id, DeviceType.CUDA,
                               linked=op.id, annotation=True))
            continue
        name, us = launches[op.name]
        start = op.time_range.start
        specs.append(event("cudaLaunchKernel", start, start, cupti_id, linked=op.id))
        specs.append(event(name, 0, us, cupti_id, DeviceType.CUDA, linked=op.id))
    return specs


@BOTH_SHAPES
def test_device_table_from_this_torchs_real_events(linked, single_thread):
    steps = 3
    cpu_events = profile_cpu_steps(steps)
    products = steps * (steps + 1) // 2
    assert [e.name for e in cpu_events].count("aten::mm") == 1 + products
    assert [e.name for e in cpu_events].count(STEP_LABEL) == steps

    # as profiled: no device activity at all
    idle = activity_table(parsed([(e, 0) for e in cpu_events], linked), device_time=True)
    assert (idle.rows, idle.step_totals_us) == ([], [0.0] * steps)
    if not linked:  # the CPU table never reads the field
        assert activity_table([without_link(e) for e in cpu_events], device_time=False) == \
            activity_table(cpu_events, device_time=False)

    table = activity_table(parsed(launched_on_device(cpu_events), linked), device_time=True)
    assert rows(table) == [("gemm", products, GEMM_US * products), ("softmax_kernel", steps, SOFTMAX_US * steps)]
    assert table.step_totals_us == [GEMM_US * (j + 1) + SOFTMAX_US for j in range(steps)]


SNAPSHOT = {"segments": [{"address": 4096, "total_size": 2 << 20, "stream": 0, "segment_type": "large",
                          "allocated_size": 1 << 20, "active_size": 1 << 20, "blocks": []}],
            "device_traces": [[{"action": "alloc", "addr": 4096, "size": 1 << 20, "stream": 0,
                                "time_us": 1, "frames": []}]]}


def test_memory_files_from_a_synthetic_snapshot(tmp_path):
    files = write_memory_files(SNAPSHOT, tmp_path)
    assert pickle.loads((tmp_path / files["memory_pickle"]).read_bytes()) == SNAPSHOT
    if files["memory_html"] is None:
        pytest.skip("this PyTorch has no torch.cuda._memory_viz.trace_plot")
    html = (tmp_path / files["memory_html"]).read_text()
    # PyTorch's page embeds the snapshot as base64 of its pickle, padded with zero bytes
    embedded = re.search(r'"base64": "([A-Za-z0-9+/=]+)"', html).group(1)
    assert pickle.loads(base64.b64decode(embedded)) == SNAPSHOT


def test_memory_files_without_the_private_renderer_keep_the_pickle(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.cuda._memory_viz", None)  # importing it now fails
    assert write_memory_files(SNAPSHOT, tmp_path) == {"memory_pickle": "memory.pickle", "memory_html": None}
    assert pickle.loads((tmp_path / "memory.pickle").read_bytes()) == SNAPSHOT
    assert not (tmp_path / "memory.html").exists()


@pytest.mark.parametrize("private", ["_record_memory_history", "_snapshot"])
def test_memory_snapshot_is_skipped_without_the_private_recorder(monkeypatch, private):
    """No GPU needed: without the recorder nothing CUDA is touched and the call is not run."""
    monkeypatch.delattr(torch.cuda.memory, private)

    def never() -> None:
        raise AssertionError("the call ran though there is no snapshot to take")

    cuda = FakeCuda().install(monkeypatch)
    device = CpuBackedCuda("cuda:1")
    cuda.calls.clear()
    with pytest.warns(RuntimeWarning, match="without a memory snapshot"):
        assert record_memory_snapshot(Call(never, never), device) is None
    assert cuda.calls == []


def test_memory_snapshot_names_the_points_device(monkeypatch):
    """The recorder, the snapshot and the synchronisations all name the device under test (cuda:1)."""
    cuda = FakeCuda().install(monkeypatch)
    device = CpuBackedCuda("cuda:1")
    recorded = []
    monkeypatch.setattr(torch.cuda.memory, "_record_memory_history",
                        lambda enabled="all", device=None, **kwargs: recorded.append(("record", enabled, device)))
    monkeypatch.setattr(torch.cuda.memory, "_snapshot", lambda device=None: {"device": device, "device_traces": []})
    ran = []
    snapshot = record_memory_snapshot(Call(lambda: ran.append(True)), device)
    assert snapshot["device"] == 1 and ran == [True]
    assert [r[2] for r in recorded] == [1, 1] and recorded[-1][1] is None  # started, then stopped
    assert cuda.touched() == {1}


@needs_cuda
def test_cuda_snapshot_records_the_call():
    entry = variants.get("standard/eager")
    call, _ = make_call(entry, variants.Point(seq_len=256, device="cuda", params=entry.resolve()))
    snapshot = record_memory_snapshot(call, open_device("cuda"))
    assert any(t["action"] == "alloc" for trace in snapshot["device_traces"] for t in trace)


@needs_cuda
def test_cuda_profile_writes_device_table_and_memory_files(tmp_path):
    entry = variants.get("standard/eager")
    point = variants.Point(batch=1, heads=4, seq_len=512, head_dim=64, device="cuda")
    summary = profile_point((entry, point), tmp_path, steps=3)
    directory = Path(summary["directory"])
    assert "device time" in summary["profile"]["basis"]
    assert summary["profile"]["table_ms_per_step"] > 0
    for name in ("trace", "kernels", "summary", "memory_pickle", "memory_html"):
        assert (directory / summary["files"][name]).is_file()
