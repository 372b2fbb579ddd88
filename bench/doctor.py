"""``bench doctor``: does the harness's timer agree with an independent one on this device?

A fixed set of points is measured twice: through the harness (:func:`bench.measure.measure`, the
path every sweep row takes) and through a timer the harness does not share code with — Triton's
``do_bench`` on CUDA (its own queued events, L2 flush and gradient reset), PyTorch's
``torch.utils.benchmark.Timer.blocked_autorange`` on CPU. Both time the same form of the same call
(its CUDA graph's replay with ``--cuda-graph``) on the same seeded inputs, in turns (see
:data:`PAIRS`). A ratio outside :data:`BOUNDS` means a figure of this machine cannot be trusted to
that precision.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

import variants
from variants.registry import Point

from .device import open_device
from .measure import WORKLOADS, MeasureSettings, make_call, measure
from .timers import Call, timed_form

# Harness median / independent median allowed per device type.
BOUNDS = {"cuda": (0.97, 1.03), "cpu": (0.9, 1.1)}
# The two timers run in turns, PAIRS times, and the verdict is the median of the pairs' ratios: a
# shared machine's speed drifts by far more than 10% over seconds (seen on this project's 2-core CI
# box: the same call 6-21 ms a few seconds apart), and a drift lands in one pair, not in the median,
# while a timer's own bias shows in every pair.
PAIRS = 5
SETTINGS = MeasureSettings(warmup_s=0.1, target_s=0.2, min_reps=5, max_reps=1000)


@dataclass(frozen=True)
class Probe:
    """One doctor point: an entry at a shape."""

    entry: str
    point: Point

    @property
    def label(self) -> str:
        p = self.point
        return f"{self.entry} {p.mode}{' causal' if p.causal else ''} n={p.seq_len}"


# CUDA: FlashAttention-sized bf16 points, one per kernel family the report compares; where an entry
# cannot run a point (a non-causal-only one causal), the doctor lists it as skipped with the reason.
CUDA_ENTRIES = ("standard/sdpa-flash", "standard/sdpa-cudnn", "standard/xformers", "local/flex",
                "local/blocked", "linear-elu1/linear")
CUDA_POINTS = tuple((entry, mode, causal, 4096) for entry in CUDA_ENTRIES for mode in ("fwd", "fwd_bwd")
                    for causal in (False, True))
CUDA_SHAPE = {"batch": 4, "heads": 16, "head_dim": 128, "dtype": "bfloat16"}
# CPU: float32 points that take 5–50 ms on a 2-core machine (entry, mode, causal, seq_len).
CPU_POINTS = (("standard/sdpa-flash", "fwd", False, 2048), ("standard/eager", "fwd", False, 1024),
              ("standard/sdpa-math", "fwd_bwd", True, 512), ("local/blocked", "fwd", False, 4096),
              ("linear-elu1/linear", "fwd", False, 8192), ("linear-elu1/chunked", "fwd_bwd", True, 2048),
              ("performer/linear", "fwd", False, 4096))
CPU_SHAPE = {"batch": 1, "heads": 4, "head_dim": 64, "dtype": "float32"}


def probes(device: str) -> list[Probe]:
    """The fixed set of points for ``device`` (``cpu`` or a CUDA device)."""
    points, shape = (CUDA_POINTS, CUDA_SHAPE) if device.startswith("cuda") else (CPU_POINTS, CPU_SHAPE)
    return [Probe(name, Point(**shape, seq_len=n, device=device, mode=mode, causal=causal,
                              params=variants.get(name).resolve()))
            for name, mode, causal, n in points]


def do_bench_ms(call: Call, seconds: float) -> float:
    """Median of Triton's ``do_bench`` (it resets the inputs' gradients outside its events)."""
    from triton.testing import do_bench

    grads = [t for t in call.existing if t.requires_grad] or None
    return float(do_bench(call.run, rep=seconds * 1e3, grad_to_none=grads, return_mode="median"))


def blocked_autorange_ms(call: Call, seconds: float) -> float:
    """Median of ``torch.utils.benchmark``'s blocked autorange, on as many threads as the harness."""
    from torch.utils.benchmark import Timer

    def step() -> None:
        call.before()  # outside the harness's events, inside this timer: µs beside a 5–50 ms call
        call.run()

    timer = Timer(stmt="step()", globals={"step": step}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=seconds).median * 1e3


IndependentTimer = Callable[[Call, float], float]  # (call, seconds to spend) -> median ms


def independent_timer(device: str) -> IndependentTimer:
    return do_bench_ms if device.startswith("cuda") else blocked_autorange_ms


@dataclass(frozen=True)
class Verdict:
    """One probe's outcome: the medians of both timers over the pairs and the median of the pairs'
    ratios, or why it was not measured."""

    probe: Probe
    harness_ms: float | None = None
    independent_ms: float | None = None
    ratios: tuple[float, ...] = ()  # harness ÷ independent, pair by pair
    spread: float | None = None  # the harness's p80/p20 (median over the pairs)
    timer: str | None = None
    skipped: str | None = None  # the entry's reason when it cannot run here, or the failure

    @property
    def ratio(self) -> float | None:
        return statistics.median(self.ratios) if self.ratios else None

    def within(self, bounds: tuple[float, float]) -> bool:
        return self.ratio is not None and bounds[0] <= self.ratio <= bounds[1]

    def to_json(self) -> dict:
        p = self.probe.point
        return {"entry": self.probe.entry, "mode": p.mode, "causal": p.causal, "seq_len": p.seq_len,
                "harness_ms": self.harness_ms, "independent_ms": self.independent_ms, "ratio": self.ratio,
                "ratios": list(self.ratios), "spread": self.spread, "timer": self.timer, "skipped": self.skipped}


def check_probe(probe: Probe, settings: MeasureSettings, independent: IndependentTimer) -> Verdict:
    """The harness and the independent timer in turns, :data:`PAIRS` times, on the same inputs."""
    entry = variants.get(probe.entry)
    reasons = entry.not_supported_reasons(probe.point)
    if reasons:
        return Verdict(probe, skipped="; ".join(reasons))
    device = open_device(probe.point.device)
    harness, other, spreads = [], [], []
    for _ in range(PAIRS):
        row = measure(entry, probe.point, settings, device)
        if row["status"] != "ok":
            return Verdict(probe, skipped=f"{row['status']}: {row['reason']}")
        call, _ = make_call(entry, probe.point, device)
        form = timed_form(call, device, settings.cuda_graph, WORKLOADS[probe.point.mode].graph_refusal)
        harness.append(row["time_ms"])
        other.append(independent(form.call, settings.target_s))
        spreads.append(row["spread"])
    return Verdict(probe, statistics.median(harness), statistics.median(other),
                   tuple(h / o for h, o in zip(harness, other, strict=True)), statistics.median(spreads),
                   row["timer"])


@dataclass(frozen=True)
class DoctorReport:
    device: str
    bounds: tuple[float, float]
    verdicts: list[Verdict]

    @property
    def healthy(self) -> bool:
        """Every measured point within bounds, and at least one measured."""
        measured = [v for v in self.verdicts if v.skipped is None]
        return bool(measured) and all(v.within(self.bounds) for v in measured)

    def to_json(self) -> dict:
        return {"device": self.device, "bounds": list(self.bounds), "healthy": self.healthy,
                "points": [v.to_json() for v in self.verdicts]}


def run_doctor(device: str, cuda_graph: bool = False,
               progress: Callable[[Probe], None] = lambda probe: None) -> DoctorReport:
    """Every probe of ``device`` through the harness and the independent timer."""
    settings = replace(SETTINGS, cuda_graph=cuda_graph)
    bounds = BOUNDS["cuda" if device.startswith("cuda") else "cpu"]
    independent = independent_timer(device)
    verdicts = []
    for probe in probes(device):
        progress(probe)
        verdicts.append(check_probe(probe, settings, independent))
    return DoctorReport(device, bounds, verdicts)
