"""The timers' structure (CUDA tested on CPU through a recording fake), the repetition policy, the
CUDA-graph fallback, the new row columns, and `bench doctor`."""

from __future__ import annotations

import json

import pytest
import torch
from support import why_not
from typer.testing import CliRunner

import variants
from bench import doctor
from bench.cli import app
from bench.device import CpuDevice
from bench.measure import MeasureSettings, measure
from bench.timers import (
    LEAD_CALLS,
    Call,
    CpuTimer,
    CudaTimer,
    repetitions,
    timed_form,
    warm_up,
)


class FakeEvent:
    """Records when it is recorded; its elapsed time is the number of log entries in between."""

    def __init__(self, log: list, name: str) -> None:
        self.log, self.name, self.position = log, name, None

    def record(self) -> None:
        self.position = len(self.log)
        self.log.append(("record", self.name))

    def elapsed_time(self, end: FakeEvent) -> float:
        assert self.position is not None and end.position is not None, "elapsed_time of an unrecorded event"
        return float(end.position - self.position)


class FakeBackend:
    """Shaped like bench.device.CudaDevice's timing side (bench.timers.CudaOps, what timed_form asks);
    every call lands in one log."""

    is_cuda = True

    def __init__(self, capture_error: Exception | None = None) -> None:
        self.log: list[tuple[str, str]] = []
        self.events = 0
        self.capture_error = capture_error

    def recorded_event(self) -> FakeEvent:
        self.events += 1
        event = FakeEvent(self.log, "start" if self.events % 2 else "end")
        event.record()
        return event

    def timer(self, name: str | None = None) -> CudaTimer:
        return CudaTimer(self, name or "cuda-events")

    def synchronize(self) -> None:
        self.log.append(("sync", ""))

    def flush(self) -> None:
        self.log.append(("flush", ""))

    def capture(self, call: Call):
        if self.capture_error:
            raise self.capture_error
        call.run()
        return lambda: self.log.append(("replay", ""))


def logged_call(log: list) -> Call:
    return Call(run=lambda: log.append(("run", "")), before=lambda: log.append(("before", "")))


def test_cuda_batch_never_synchronises_inside_or_between_repetitions():
    backend = FakeBackend()
    samples = CudaTimer(backend).batch(logged_call(backend.log), reps=7)
    log = backend.log
    starts = [i for i, entry in enumerate(log) if entry == ("record", "start")]
    ends = [i for i, entry in enumerate(log) if entry == ("record", "end")]
    syncs = [i for i, entry in enumerate(log) if entry[0] == "sync"]
    assert len(starts) == len(ends) == len(samples) == 7
    # No synchronisation between a repetition's start and the next repetition's start, nor before the
    # last repetition's end: exactly one, after everything.
    for a, b in zip(starts, [*starts[1:], ends[-1]], strict=True):
        assert not [s for s in syncs if a < s < b], log
    assert syncs == [len(log) - 1]
    for start, end in zip(starts, ends, strict=True):
        # inside the events: the call only; the flush and the untimed step come before the start
        assert log[start + 1:end] == [("run", "")]
        assert log[start - 1] == ("flush", "") and log[start - 2] == ("before", "")
    # the untimed lead calls come first, outside every event
    assert log[:2 * LEAD_CALLS] == [("before", ""), ("run", "")] * LEAD_CALLS
    assert samples == [2.0] * 7  # each event pair spans exactly record(start), run, record(end)


def test_cuda_once_and_host_time_synchronise_around_their_calls():
    backend = FakeBackend()
    timer = CudaTimer(backend)
    assert timer.once(logged_call(backend.log)) == 2.0
    assert backend.log[-1] == ("sync", "")
    backend.log.clear()
    host = timer.host_ms(logged_call(backend.log))
    assert host is not None and host >= 0
    assert backend.log[0] == ("sync", "") and backend.log[-1] == ("sync", "")
    assert sum(entry == ("run", "") for entry in backend.log) == 5


def test_graph_form_times_the_replay_and_falls_back_with_the_reason():
    backend = FakeBackend()
    call = logged_call(backend.log)
    form = timed_form(call, backend, cuda_graph=True)
    assert form.timer.name == "cuda-graph" and form.note is None
    backend.log.clear()
    form.timer.batch(form.call, reps=2)
    assert ("run", "") not in backend.log and backend.log.count(("replay", "")) == 2 + LEAD_CALLS

    failing = FakeBackend(capture_error=RuntimeError("operation not permitted when stream is capturing"))
    form = timed_form(call, failing, cuda_graph=True)
    assert form.timer.name == "cuda-events" and form.call is call
    assert "capture failed" in form.note and "not permitted when stream is capturing" in form.note
    assert timed_form(call, backend, cuda_graph=False).timer.name == "cuda-events"
    refused = timed_form(call, backend, cuda_graph=True, refusal="it cannot")
    assert refused.timer.name == "cuda-events" and refused.note.startswith("not captured as a CUDA graph: it cannot")
    cpu = timed_form(call, CpuDevice(), cuda_graph=True)
    assert isinstance(cpu.timer, CpuTimer) and "need a CUDA device" in cpu.note


def test_repetitions_follow_the_estimate_within_bounds():
    assert repetitions(2.0, target_s=0.1, min_reps=5, max_reps=200) == 50
    assert repetitions(0.001, target_s=0.1, min_reps=5, max_reps=200) == 200
    assert repetitions(500.0, target_s=0.1, min_reps=5, max_reps=200) == 5
    assert repetitions(0.0, target_s=0.1, min_reps=5, max_reps=200) == 200


def test_warm_up_runs_growing_batches_until_its_time_is_spent():
    backend = FakeBackend()
    timer = CudaTimer(backend)
    assert warm_up(timer, logged_call(backend.log), seconds=0) == 2.0
    assert backend.log.count(("record", "start")) == 1  # no time: one batch of one repetition
    calls = []

    class Counting(CpuTimer):
        def batch(self, call, reps):
            calls.append(reps)
            return super().batch(call, reps)

    warm_up(Counting(), Call(run=lambda: sum(range(20_000))), seconds=0.05)
    assert calls[:4] == [1, 2, 4, 8] and all(b <= 64 for b in calls)


def test_rows_record_timer_host_time_and_launch_bound():
    entry = variants.get("standard/sdpa-math")
    point = variants.Point(batch=1, heads=2, seq_len=64, head_dim=16, params=entry.resolve())
    row = measure(entry, point, MeasureSettings(warmup_s=0, target_s=0.01, min_reps=3, max_reps=10))
    assert row["status"] == "ok" and row["timer"] == "perf_counter"
    assert row["host_ms"] is None and row["launch_bound"] is None and row["reason"] is None
    assert 3 <= row["reps"] <= 10


# --- bench doctor --------------------------------------------------------------------------------

def test_doctor_sets_cover_the_issue_points():
    cuda = doctor.probes("cuda")
    names = {p.entry for p in cuda}
    assert names == {"standard/sdpa-flash", "standard/sdpa-cudnn", "standard/xformers", "local/flex",
                     "local/blocked", "linear-elu1/linear"}
    assert {(p.point.mode, p.point.causal) for p in cuda} == {("fwd", False), ("fwd", True),
                                                              ("fwd_bwd", False), ("fwd_bwd", True)}
    assert {(p.point.batch, p.point.heads, p.point.seq_len, p.point.head_dim, p.point.dtype) for p in cuda} \
        == {(4, 16, 4096, 128, "bfloat16")}
    cpu = doctor.probes("cpu")
    assert len({p.entry for p in cpu}) >= 5 and {p.point.dtype for p in cpu} == {"float32"}
    assert all(why_not(variants.get(p.entry), p.point) is None for p in cpu)


def test_doctor_verdicts_and_health():
    probe = doctor.probes("cpu")[0]
    skipped = doctor.Verdict(probe, skipped="not here")
    ok = doctor.Verdict(probe, harness_ms=10.0, independent_ms=10.5, ratios=(0.5, 0.96, 0.97, 1.0, 3.0))
    off = doctor.Verdict(probe, harness_ms=13.0, independent_ms=10.0, ratios=(1.3, 1.2, 1.25))
    assert ok.ratio == 0.97 and ok.within((0.9, 1.1)) and not off.within((0.9, 1.1))  # the median pair
    assert doctor.DoctorReport("cpu", (0.9, 1.1), [ok, skipped]).healthy
    assert not doctor.DoctorReport("cpu", (0.9, 1.1), [ok, off]).healthy
    assert not doctor.DoctorReport("cpu", (0.9, 1.1), [skipped]).healthy  # nothing measured


def test_doctor_pairs_the_timers_in_turns():
    """Harness and independent timer alternate, each pair on a fresh call of the same point."""
    probe = next(p for p in doctor.probes("cpu") if p.entry == "standard/sdpa-math")
    probe = doctor.Probe(probe.entry, variants.Point(**{**probe.point.__dict__, "seq_len": 128}))
    seen = []
    verdict = doctor.check_probe(probe, MeasureSettings(warmup_s=0, target_s=0.01, min_reps=3),
                                 lambda call, seconds: seen.append(seconds) or 1e-3)
    assert len(seen) == len(verdict.ratios) == doctor.PAIRS and seen == [0.01] * doctor.PAIRS
    assert verdict.ratio == pytest.approx(verdict.harness_ms / 1e-3, rel=0.5) and not verdict.within((0.9, 1.1))
    refused = doctor.check_probe(doctor.Probe("standard/sdpa-cudnn", probe.point), doctor.SETTINGS,
                                 lambda call, seconds: 1.0)
    assert refused.skipped and refused.ratio is None


def test_doctor_json_on_cpu(monkeypatch):
    """The real harness against the real torch.utils.benchmark on one small point."""
    monkeypatch.setattr(doctor, "CPU_POINTS", (("standard/sdpa-math", "fwd", False, 256),))
    monkeypatch.setattr(doctor, "SETTINGS", MeasureSettings(warmup_s=0.05, target_s=0.1, min_reps=5))
    result = CliRunner().invoke(app, ["doctor", "--device", "cpu", "--json"])
    assert result.exit_code in (0, 1), result.output
    report = json.loads(result.stdout)
    (point,) = report["points"]
    assert {"entry", "mode", "causal", "harness_ms", "independent_ms", "ratio", "spread"} <= set(point)
    assert point["entry"] == "standard/sdpa-math" and point["mode"] == "fwd" and point["causal"] is False
    assert point["harness_ms"] > 0 and point["independent_ms"] > 0 and len(point["ratios"]) == doctor.PAIRS
    assert point["ratio"] == pytest.approx(sorted(point["ratios"])[doctor.PAIRS // 2])
    assert result.exit_code == (0 if report["healthy"] else 1)
    assert report["healthy"] == (0.9 <= point["ratio"] <= 1.1)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_doctor_exit_codes_for_unusable_and_bad_devices():
    result = CliRunner().invoke(app, ["doctor", "--device", "cuda"])
    assert result.exit_code == 1 and "not usable" in result.output
    result = CliRunner().invoke(app, ["doctor", "--device", "tpu"])
    assert result.exit_code == 2 and "'tpu'" in result.output
    result = CliRunner().invoke(app, ["doctor", "--device", "cpu", "--cuda-graph"])
    assert result.exit_code == 2 and "--cuda-graph needs a CUDA device" in result.output


def test_sweep_refuses_cuda_graph_on_cpu(tmp_path):
    result = CliRunner().invoke(app, ["run", "sweep", "--variants", "standard/eager", "--seq-lens", "64",
                                      "--device", "cpu", "--cuda-graph", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "--cuda-graph needs a CUDA device" in result.output
    assert not any(tmp_path.iterdir())
