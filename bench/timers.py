"""How one call is timed, per device, and the repetition policy around it.

* CPU (``perf_counter``): the call runs on the host, so the host clock around it is its time.
* CUDA (``cuda-events``, the method of Triton's ``do_bench``): repetitions are enqueued back to
  back — L2 flush, start event, call, end event — and the host synchronises once, after the whole
  batch. Synchronising after every repetition would leave the GPU idle while Python enqueues the
  next call, and that idle time lands inside the events whenever enqueueing the call takes longer
  than the flush: on an H200 FlexAttention calls read 16–55% high that way.
* CUDA graph (``cuda-graph``): the call is captured once and the graph's replay is timed the same
  way, for a figure without launch overhead.

Untimed steps (``Call.before``: ``.grad = None`` for ``fwd_bwd``) run before the flush, outside the
events. Each timer also reports ``host_ms``, the host time to enqueue one call: where it is not
below the device time, a training loop would leave the GPU waiting on Python (launch-bound).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

# Untimed calls enqueued before a batch, so that the GPU already has work queued when the first
# timed repetition is enqueued (do_bench's warm-up plays this part).
LEAD_CALLS = 2
HOST_SAMPLES = 5
# Warm-up batches double up to this many repetitions, then repeat until the warm-up time is spent.
MAX_WARMUP_BATCH = 64


@dataclass
class Call:
    """The timed callable of a mode and the untimed step to run before each repetition."""

    run: Callable[[], Any]
    before: Callable[[], None] = lambda: None
    # Tensors alive before the call (inputs, kept graph output): a view of them is not new memory.
    existing: tuple[torch.Tensor, ...] = ()


class Timer(Protocol):
    name: str

    def sync(self) -> None: ...

    def once(self, call: Call) -> float: ...

    def batch(self, call: Call, reps: int) -> list[float]: ...

    def host_ms(self, call: Call) -> float | None: ...


class CpuTimer:
    """``perf_counter`` around each call."""

    name = "perf_counter"

    def sync(self) -> None:
        pass

    def once(self, call: Call) -> float:
        call.before()
        start = time.perf_counter()
        call.run()
        return (time.perf_counter() - start) * 1e3

    def batch(self, call: Call, reps: int) -> list[float]:
        return [self.once(call) for _ in range(reps)]

    def host_ms(self, call: Call) -> float | None:
        return None  # the call runs on the host: there is no separate device to wait on Python


class CudaOps(Protocol):
    """The CUDA calls a :class:`CudaTimer` makes, all on one GPU (``bench.device.CudaDevice``; tests
    substitute a recording fake)."""

    def recorded_event(self) -> Any: ...

    def synchronize(self) -> None: ...

    def flush(self) -> None: ...


class CudaTimer:
    """Queued CUDA events, one synchronisation per batch (see the module docstring)."""

    def __init__(self, device: CudaOps, name: str = "cuda-events") -> None:
        self.device = device
        self.name = name

    def sync(self) -> None:
        self.device.synchronize()

    def _repetition(self, call: Call) -> tuple[Any, Any]:
        call.before()
        self.device.flush()
        start = self.device.recorded_event()
        call.run()
        end = self.device.recorded_event()
        return start, end

    def once(self, call: Call) -> float:
        """One repetition, synchronised: for a profiler step, not for a timed median."""
        start, end = self._repetition(call)
        self.device.synchronize()
        return start.elapsed_time(end)

    def batch(self, call: Call, reps: int) -> list[float]:
        for _ in range(LEAD_CALLS):
            call.before()
            call.run()
        events = [self._repetition(call) for _ in range(reps)]
        self.device.synchronize()
        return [start.elapsed_time(end) for start, end in events]

    def host_ms(self, call: Call) -> float | None:
        """Median host time to enqueue one call, a few calls after a synchronisation (so the launch
        queue is not full and blocking)."""
        self.device.synchronize()
        samples = []
        for _ in range(HOST_SAMPLES):
            call.before()
            start = time.perf_counter()
            call.run()
            samples.append((time.perf_counter() - start) * 1e3)
        self.device.synchronize()
        return statistics.median(samples)


@dataclass(frozen=True)
class TimedForm:
    """What is timed for a point: the call itself or its captured graph, by which timer, and why
    the requested form could not be used (None when it was)."""

    call: Call
    timer: Timer
    note: str | None = None


class GraphCapable(Protocol):
    """What :func:`timed_form` needs of a device (``bench.device``)."""

    is_cuda: bool

    def timer(self, name: str | None = None) -> Timer: ...

    def capture(self, call: Call) -> Callable[[], Any]: ...


def timed_form(call: Call, device: GraphCapable, cuda_graph: bool, refusal: str | None = None) -> TimedForm:
    """The device's timer on ``call``; with ``cuda_graph``, on the call's captured graph when it can
    be captured, else on the call itself with the reason recorded: ``refusal`` (why this kind of
    call cannot be captured correctly) or the capture's own failure."""
    if not cuda_graph:
        return TimedForm(call, device.timer())
    if not device.is_cuda:
        return TimedForm(call, device.timer(), "CUDA graphs need a CUDA device; timed with perf_counter")
    if refusal:
        return TimedForm(call, device.timer(), f"not captured as a CUDA graph: {refusal}; timed with "
                                               "queued CUDA events")
    try:
        replay = device.capture(call)
    except Exception as exc:  # capture refuses many ops (host syncs, dynamic shapes): fall back, say why
        why = " ".join(f"{type(exc).__name__}: {exc}".split())[:200]
        return TimedForm(call, device.timer(), f"CUDA graph capture failed ({why}); timed with "
                                               "queued CUDA events")
    return TimedForm(Call(replay, existing=call.existing), device.timer("cuda-graph"))


def cold_call_ms(timer: Timer, call: Call) -> float:
    """Wall time of the first call: compilation, autotuning, mask and cache construction."""
    call.before()
    timer.sync()
    start = time.perf_counter()
    call.run()
    timer.sync()
    return (time.perf_counter() - start) * 1e3


def warm_up(timer: Timer, call: Call, seconds: float) -> float:
    """Run timed batches for ``seconds`` (at least one) and return the median time of the last: the
    per-call estimate the repetition count is chosen from."""
    deadline = time.perf_counter() + seconds
    reps = 1
    while True:
        samples = timer.batch(call, reps)
        if time.perf_counter() >= deadline:
            return statistics.median(samples)
        reps = min(2 * reps, MAX_WARMUP_BATCH)


def repetitions(estimate_ms: float, target_s: float, min_reps: int, max_reps: int) -> int:
    """Enough repetitions for ``target_s`` of timed calls, within [min_reps, max_reps]."""
    wanted = math.ceil(target_s * 1e3 / estimate_ms) if estimate_ms > 0 else max_reps
    return max(min_reps, min(max_reps, wanted))


def percentile(samples: list[float], q: float) -> float:
    return statistics.quantiles(samples, n=100, method="inclusive")[int(q) - 1] if len(samples) > 1 \
        else samples[0]
