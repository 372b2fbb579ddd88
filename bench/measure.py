"""Measure one point: correctness gate, warm-up, timing, memory, FLOPs. No variant is special-cased:
everything comes from the registry entry.

Definitions (also in the README):

* ``fwd``: one forward call, no autograd graph.
* ``fwd_bwd``: forward then ``backward`` in one timed call; ``.grad`` is reset to None before each
  repetition, outside the timed region, so gradient accumulation is never timed.
* ``bwd``: backward alone, from a graph built once and kept (``torch.autograd.grad(...,
  retain_graph=True)``, which accumulates nothing).
* ``decode``: one step of ``q_len`` new tokens against the entry's cache of a ``seq_len``-token
  prefix (built before any timing; see :mod:`variants.decode`), without autograd.
* time: see :mod:`bench.timers` (queued CUDA events with the L2 flushed before each repetition and
  one synchronisation per batch, or a CUDA graph's replay, on GPU; ``perf_counter`` on CPU). The
  repetition count comes from the warm-up's estimate; median, p20, p80 are stored, with the timer's
  name and the host time to enqueue one call.
* memory: a separate run after warm-up. CUDA: peak allocated above what was allocated before the
  call. CPU: peak of live tensor bytes created during the call, counted per storage (deterministic).
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import statistics
import weakref
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import variants
from variants.registry import DECODE, Entry, Point

from .env import clock_and_throttle, device_name, peak_bandwidth, peak_tflops
from .timers import Call, cold_call_ms, percentile, repetitions, timed_form, timer_for, warm_up

SEED = 0


@dataclass(frozen=True)
class MeasureSettings:
    """Repetition policy: warm up for ``warmup_s``, then time until ``target_s`` of timed calls or
    ``max_reps``, never fewer than ``min_reps``. A point whose p80/p20 exceeds ``noisy_spread`` is flagged."""

    warmup_s: float = 0.05
    target_s: float = 0.1
    min_reps: int = 5
    max_reps: int = 200
    noisy_spread: float = 1.10
    check_len: int = 1024  # sequence length of the float64 correctness slice
    max_mem_gb: float | None = None  # address-space limit of the worker process (CPU)
    cuda_graph: bool = False  # time a CUDA graph's replay (launch overhead left out) where capture works


# --- inputs and calls ----------------------------------------------------------------------------

def make_inputs(point: Point, grad: bool, tokens: int | None = None,
                upstream: bool = True) -> tuple[torch.Tensor, ...]:
    """Seeded q, k, v and (``upstream``) a gradient for the output, (batch, heads, tokens or seq_len,
    head_dim); drawn in that order, so q, k, v are the same with or without it."""
    gen = torch.Generator(device=point.device).manual_seed(SEED)
    shape = (point.batch, point.heads, tokens or point.seq_len, point.head_dim)
    drawn = tuple(torch.randn(shape, generator=gen, device=point.device, dtype=point.torch_dtype)
                  for _ in range(4 if upstream else 3))
    for t in drawn[:3]:
        t.requires_grad_(grad)
    return drawn


def _fwd(fn: Callable[[], torch.Tensor], inputs: tuple, grad_out: torch.Tensor) -> Call:
    def run():
        with torch.no_grad():
            return fn()

    return Call(run, existing=(*inputs, grad_out))


def _fwd_bwd(fn: Callable[[], torch.Tensor], inputs: tuple, grad_out: torch.Tensor) -> Call:
    def clear():
        for t in inputs:
            t.grad = None

    return Call(lambda: fn().backward(grad_out), clear, existing=(*inputs, grad_out))


def _bwd(fn: Callable[[], torch.Tensor], inputs: tuple, grad_out: torch.Tensor) -> Call:
    out = fn()
    return Call(lambda: torch.autograd.grad(out, inputs, grad_out, retain_graph=True),
                existing=(*inputs, grad_out, out))


def _tensors(value: Any) -> list[torch.Tensor]:
    """Every tensor held by a cache (dataclasses of tensors, nested)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if dataclasses.is_dataclass(value):
        return [t for f in dataclasses.fields(value) for t in _tensors(getattr(value, f.name))]
    return []


@dataclass(frozen=True)
class Outputs:
    """What the correctness gate compares: the impl's output, its float64 reference's, exact softmax's."""

    out: torch.Tensor
    reference: torch.Tensor
    softmax: torch.Tensor


ModeCall = Callable[[Callable[[], torch.Tensor], tuple, torch.Tensor], Call]  # _fwd, _fwd_bwd, _bwd


def _kernel_call(mode_call: ModeCall, entry: Entry, point: Point) -> tuple[Call, int]:
    q, k, v, grad_out = make_inputs(point, grad=point.needs_grad)
    params = dict(point.params)
    call = mode_call(lambda: entry.forward(q, k, v, causal=point.causal, **params), (q, k, v), grad_out)
    return call, sum(t.numel() * t.element_size() for t in (q, k, v))


def _kernel_outputs(entry: Entry, point: Point) -> Outputs:
    q, k, v = make_inputs(point, grad=False, upstream=False)
    params = dict(point.params)
    q64, k64, v64 = (t.double() for t in (q, k, v))
    return Outputs(entry.forward(q, k, v, causal=point.causal, **params),
                   entry.reference(q64, k64, v64, causal=point.causal, **params),
                   variants.exact_attention(q64, k64, v64, point.causal))


def _decode_inputs(entry: Entry, point: Point) -> tuple[Any, tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """The cache of the n-token prefix (built here, never timed), the q_len new tokens' q, k, v, and
    all n + q_len tokens' q, k, v."""
    n = point.seq_len
    tokens = make_inputs(point, grad=False, tokens=n + point.q_len, upstream=False)
    _, k, v = tokens
    cache = entry.decoder.prefill(k[:, :, :n], v[:, :, :n], q_len=point.q_len, **dict(point.params))
    new = tuple(t[:, :, n:].contiguous() for t in tokens)
    return cache, new, tokens


def _decode_call(entry: Entry, point: Point) -> tuple[Call, int]:
    with torch.no_grad():
        cache, new, _ = _decode_inputs(entry, point)
    params = dict(point.params)

    def run():
        with torch.no_grad():
            return entry.decoder.step(*new, cache, **params)

    return Call(run, existing=(*new, *_tensors(cache))), sum(t.numel() * t.element_size() for t in new)


def _decode_outputs(entry: Entry, point: Point) -> Outputs:
    cache, new, tokens = _decode_inputs(entry, point)
    q64, k64, v64 = (t.double() for t in tokens)
    last = slice(-point.q_len, None)
    return Outputs(entry.decoder.step(*new, cache, **dict(point.params)),
                   entry.reference(q64, k64, v64, causal=True, **dict(point.params))[:, :, last],
                   variants.exact_attention(q64, k64, v64, True)[:, :, last])


def _decode_columns(entry: Entry, point: Point, median_ms: float) -> dict[str, Any]:
    """A decode row's memory-traffic columns (analytic bytes, from the entry's decoder)."""
    moved = entry.decoder.bytes_moved(point)
    gbps = moved / (median_ms * 1e-3) / 1e9
    peak = peak_bandwidth(device_name(point.device))
    return {"cache_bytes": entry.decoder.cache_bytes(point), "bytes_moved": moved,
            "gbps": gbps, "pct_bandwidth": 100 * gbps / (peak * 1e3) if peak else None,
            "tokens_per_s": point.batch * point.q_len / (median_ms * 1e-3)}


@dataclass(frozen=True)
class Workload:
    """What a mode runs: its timed call (and the inputs' bytes), the outputs its correctness gate
    compares, its FLOPs and its own columns."""

    call: Callable[[Entry, Point], tuple[Call, int]]
    outputs: Callable[[Entry, Point], Outputs]
    flops: Callable[[Entry, Point], float]
    kernel: Callable[[Entry, Point], str | None]  # what runs, for the row
    columns: Callable[[Entry, Point, float], dict[str, Any]] = lambda entry, point, median_ms: {}


def _kernel_workload(mode_call: ModeCall, factor: float) -> Workload:
    return Workload(functools.partial(_kernel_call, mode_call), _kernel_outputs,
                    lambda entry, point: entry.flops(point) * factor,
                    lambda entry, point: entry.kernel_name(point) if entry.kernel_name else None)


# The one table of modes. FLOPs relative to the forward: FlashAttention's convention, backward = 2.5×.
WORKLOADS: dict[str, Workload] = {
    "fwd": _kernel_workload(_fwd, 1.0), "bwd": _kernel_workload(_bwd, 2.5),
    "fwd_bwd": _kernel_workload(_fwd_bwd, 3.5),
    DECODE: Workload(_decode_call, _decode_outputs, lambda entry, point: entry.decoder.flops(point),
                     lambda entry, point: entry.decoder.kernel, _decode_columns),
}


def make_call(entry: Entry, point: Point) -> tuple[Call, int]:
    """The mode's callable on fresh inputs, and the inputs' bytes."""
    return WORKLOADS[point.mode].call(entry, point)


# --- correctness ---------------------------------------------------------------------------------

def check(entry: Entry, point: Point, check_len: int) -> tuple[float, float, str | None]:
    """The point's output on a slice (1 batch, 1 head, the first ``check_len`` tokens, or that many
    before the new ones when decoding) against the entry's float64 reference and exact softmax
    attention. Returns (err_ref, err_softmax, failure)."""
    small = replace(point, batch=1, heads=1, seq_len=min(point.seq_len, check_len))
    with torch.no_grad():
        outputs = WORKLOADS[point.mode].outputs(entry, small)
    err_ref = variants.relative_error(outputs.out, outputs.reference)
    err_softmax = variants.relative_error(outputs.out, outputs.softmax)
    tolerance = entry.tolerance[point.dtype]
    if not err_ref <= tolerance:  # also catches NaN
        return err_ref, err_softmax, (f"output differs from the float64 reference: relative error "
                                      f"{err_ref:.3g} > tolerance {tolerance:g} for {point.dtype}")
    return err_ref, err_softmax, None


# --- memory --------------------------------------------------------------------------------------

class LiveTensorBytes(TorchDispatchMode):
    """Counts bytes of tensor storages created inside the mode and still alive; keeps the peak.

    Storages are tracked by address and released through weakref finalizers, so the figure depends
    only on the ops run, not on the allocator: the same on every run."""

    def __init__(self, existing: tuple[torch.Tensor, ...] = ()) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        # Storages that already exist are never counted, so views of them (q.transpose) are free.
        self._tracked: set[int] = {t.untyped_storage().data_ptr() for t in existing}

    def _release(self, address: int, nbytes: int) -> None:
        self.live -= nbytes
        self._tracked.discard(address)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            address, nbytes = storage.data_ptr(), storage.nbytes()
            if nbytes == 0 or address in self._tracked:
                continue
            self._tracked.add(address)
            self.live += nbytes
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._release, address, nbytes)
        return out


def peak_memory(call: Call, device: str) -> int:
    call.before()
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        call.run()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    with LiveTensorBytes(call.existing) as counter:
        call.run()
    return counter.peak


# --- one point -----------------------------------------------------------------------------------

def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.cuda.OutOfMemoryError | MemoryError):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text
                                               or "failed to allocate" in text)


def failure_row(exc: Exception) -> dict[str, Any]:
    """A point's exception as its row: ``oom`` or ``error``, with the message on one line."""
    return {"status": "oom" if is_oom(exc) else "error",
            "reason": " ".join(f"{type(exc).__name__}: {exc}".split())[:500]}


def measure(entry: Entry, point: Point, settings: MeasureSettings) -> dict[str, Any]:
    """The measured columns of one point's row: status, reason, kernel, timing, memory, work, quality."""
    row: dict[str, Any] = {}
    try:
        reasons = entry.not_supported_reasons(point)
        if reasons:
            return {"status": "unsupported", "reason": "; ".join(reasons)}
        workload = WORKLOADS[point.mode]
        row["kernel"] = workload.kernel(entry, point)
        row["err_ref"], row["err_softmax"], failure = check(entry, point, settings.check_len)
        if failure:
            return {**row, "status": "incorrect", "reason": failure}
        call, row["input_bytes"] = make_call(entry, point)
        # The cold call first: a CUDA graph's capture would warm the call and hide its compile time.
        row["setup_ms"] = cold_call_ms(timer_for(point.device), call)
        form = timed_form(call, point.device, settings.cuda_graph)
        row["timer"] = form.timer.name
        estimate = warm_up(form.timer, form.call, settings.warmup_s)
        row["peak_mem_bytes"] = peak_memory(call, point.device)
        samples = form.timer.batch(form.call, repetitions(estimate, settings.target_s, settings.min_reps,
                                                          settings.max_reps))
        row["host_ms"] = form.timer.host_ms(form.call)
        row["sm_clock_mhz"], row["throttle"] = clock_and_throttle(point.device)
        flops = workload.flops(entry, point)
        peak = peak_tflops(device_name(point.device), point.dtype)
    except Exception as exc:  # a point's failure is a result, not a crash of the sweep
        return {**row, **failure_row(exc)}
    finally:
        if point.device.startswith("cuda"):
            torch.cuda.empty_cache()
    median, p20, p80 = statistics.median(samples), percentile(samples, 20), percentile(samples, 80)
    tflops = flops / (median * 1e-3) / 1e12
    host = row["host_ms"]
    # An ok row's reason is a note on how it was measured (a CUDA graph that could not be captured).
    return {**row, **workload.columns(entry, point, median), "status": "ok", "reason": form.note, "time_ms": median, "time_ms_p20": p20,
            "time_ms_p80": p80, "reps": len(samples), "spread": p80 / p20 if p20 > 0 else None,
            "noisy": bool(p20 > 0 and p80 / p20 > settings.noisy_spread),
            "launch_bound": None if host is None else bool(host >= median), "flops": flops,
            "tflops": tflops, "pct_peak": 100 * tflops / peak if peak else None}
