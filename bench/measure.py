"""Measure one point: correctness gate, warm-up, timing, memory, FLOPs. No variant is special-cased:
everything comes from the registry entry.

Definitions (also in the README):

* ``fwd``: one forward call, no autograd graph.
* ``fwd_bwd``: forward then ``backward`` in one timed call; ``.grad`` is reset to None before each
  repetition, outside the timed region, so gradient accumulation is never timed.
* ``bwd``: backward alone, from a graph built once and kept (``torch.autograd.grad(...,
  retain_graph=True)``, which accumulates nothing).
* time: see :mod:`bench.timers` (queued CUDA events with the L2 flushed before each repetition and
  one synchronisation per batch, or a CUDA graph's replay, on GPU; ``perf_counter`` on CPU). The
  repetition count comes from the warm-up's estimate; median, p20, p80 are stored, with the timer's
  name and the host time to enqueue one call.
* memory: a separate run after warm-up. CUDA: peak allocated above what was allocated before the
  call. CPU: peak of live tensor bytes created during the call, counted per storage (deterministic).
"""

from __future__ import annotations

import gc
import statistics
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import variants
from variants.registry import Entry, Point

from .env import clock_and_throttle, peak_tflops
from .spec import MeasureSettings
from .timers import Call, cold_call_ms, percentile, repetitions, timed_form, warm_up

# FLOPs of a mode relative to the forward (FlashAttention convention: backward = 2.5 × forward).
MODE_FLOP_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd_bwd": 3.5}
SEED = 0


# --- inputs and calls ----------------------------------------------------------------------------

def make_inputs(point: Point, grad: bool) -> tuple[torch.Tensor, ...]:
    """Seeded q, k, v and an upstream gradient, (batch, heads, seq, head_dim)."""
    gen = torch.Generator(device=point.device).manual_seed(SEED)
    shape = (point.batch, point.heads, point.seq_len, point.head_dim)
    q, k, v, grad_out = (torch.randn(shape, generator=gen, device=point.device, dtype=point.torch_dtype)
                         for _ in range(4))
    for t in (q, k, v):
        t.requires_grad_(grad)
    return q, k, v, grad_out


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


MODE_CALLS = {"fwd": _fwd, "fwd_bwd": _fwd_bwd, "bwd": _bwd}


def make_call(entry: Entry, point: Point) -> tuple[Call, int]:
    """The mode's callable on fresh inputs, and the inputs' bytes."""
    q, k, v, grad_out = make_inputs(point, grad=point.mode != "fwd")
    params = dict(point.params)
    call = MODE_CALLS[point.mode](lambda: entry.forward(q, k, v, causal=point.causal, **params),
                                  (q, k, v), grad_out)
    input_bytes = sum(t.numel() * t.element_size() for t in (q, k, v))
    return call, input_bytes


# --- correctness ---------------------------------------------------------------------------------

def check(entry: Entry, point: Point, check_len: int) -> tuple[float, float, str | None]:
    """Forward on a slice (1 batch, 1 head, first ``check_len`` tokens) against the entry's float64
    reference and against exact softmax attention. Returns (err_ref, err_softmax, failure)."""
    n = min(point.seq_len, check_len)
    small = Point(batch=1, heads=1, seq_len=n, head_dim=point.head_dim, dtype=point.dtype,
                  device=point.device, causal=point.causal, mode="fwd", params=point.params)
    q, k, v, _ = make_inputs(small, grad=False)
    params = dict(point.params)
    with torch.no_grad():
        out = entry.forward(q, k, v, causal=point.causal, **params)
        q64, k64, v64 = (t.double() for t in (q, k, v))
        err_ref = variants.relative_error(out, entry.reference(q64, k64, v64, causal=point.causal, **params))
        err_softmax = variants.relative_error(out, variants.exact_attention(q64, k64, v64, point.causal))
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
        reason = entry.unsupported(point)
        if reason:
            return {"status": "unsupported", "reason": reason}
        row["kernel"] = entry.kernel(point) if entry.kernel else None
        row["err_ref"], row["err_softmax"], failure = check(entry, point, settings.check_len)
        if failure:
            return {**row, "status": "incorrect", "reason": failure}
        call, row["input_bytes"] = make_call(entry, point)
        form = timed_form(call, point.device, settings.cuda_graph)
        row["timer"] = form.timer.name
        row["setup_ms"] = cold_call_ms(form.timer, call)
        estimate = warm_up(form.timer, form.call, settings.warmup_s)
        row["peak_mem_bytes"] = peak_memory(call, point.device)
        samples = form.timer.batch(form.call, repetitions(estimate, settings.target_s, settings.min_reps,
                                                          settings.max_reps))
        row["host_ms"] = form.timer.host_ms(form.call)
        row["sm_clock_mhz"], row["throttle"] = clock_and_throttle(point.device)
        flops = entry.flops(point) * MODE_FLOP_FACTOR[point.mode]
        peak = peak_tflops(torch.cuda.get_device_name(point.device) if point.device.startswith("cuda")
                           else "", point.dtype)
    except Exception as exc:  # a point's failure is a result, not a crash of the sweep
        return {**row, **failure_row(exc)}
    finally:
        if point.device.startswith("cuda"):
            torch.cuda.empty_cache()
    median, p20, p80 = statistics.median(samples), percentile(samples, 20), percentile(samples, 80)
    tflops = flops / (median * 1e-3) / 1e12
    host = row["host_ms"]
    # An ok row's reason is a note on how it was measured (a CUDA graph that could not be captured).
    return {**row, "status": "ok", "reason": form.note, "time_ms": median, "time_ms_p20": p20,
            "time_ms_p80": p80, "reps": len(samples), "spread": p80 / p20 if p20 > 0 else None,
            "noisy": bool(p20 > 0 and p80 / p20 > settings.noisy_spread),
            "launch_bound": None if host is None else bool(host >= median), "flops": flops,
            "tflops": tflops, "pct_peak": 100 * tflops / peak if peak else None}
