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
* correctness: the output, and in the gradient modes dq, dk, dv, on a small slice against the
  entry's float64 reference (once per slice in a worker: see :func:`check`).

Everything device-specific is asked of the worker's :class:`bench.device.Device`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch

import variants
from variants import layouts
from variants.inputs import is_per_token, sliced
from variants.registry import DECODE, Entry, Point

from .device import Device, is_cuda_fault, open_device, peak_tflops, peaks
from .timers import Call, cold_call_ms, percentile, repetitions, timed_form, warm_up

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

def make_inputs(point: Point, grad: bool, tokens: int | None = None, upstream: bool = True,
                where: torch.device | str | None = None) -> tuple[torch.Tensor, ...]:
    """Seeded q ``(rows, heads, width, head_dim)``, k and v with ``kv_heads`` heads, and (``upstream``) a
    gradient for the output, on ``where`` (default: the point's device). Rows and width follow the
    point's layout (``tokens`` per row instead, when decoding); the gradient is zero at padding,
    whose outputs are not part of the result. Drawn in that order, so q, k, v are the same with or
    without it."""
    where = point.device if where is None else where
    gen = torch.Generator(device=where).manual_seed(SEED)
    rows, width = (point.batch, tokens) if tokens else layouts.token_shape(point)
    heads = (point.heads, point.n_kv_heads, point.n_kv_heads, point.heads)[:4 if upstream else 3]
    drawn = tuple(torch.randn((rows, h, width, point.head_dim), generator=gen, device=where,
                              dtype=point.torch_dtype) for h in heads)
    for t in drawn[:3]:
        t.requires_grad_(grad)
    layout = layouts.layout_of(point)
    if upstream and layout is not None and layout.kind == layouts.PADDED:
        drawn = (*drawn[:3], drawn[3] * layout.valid(where))
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


def extra_inputs(entry: Entry, point: Point, where: torch.device | str,
                 tokens: int | None = None) -> dict[str, torch.Tensor]:
    """The entry's extra inputs (variants.inputs) for the point's q, k, v (``tokens`` per row instead,
    when decoding), drawn from a generator of their own: q, k and v stay those of every other entry."""
    if not entry.inputs:
        return {}
    gen = torch.Generator(device=where).manual_seed(SEED + 1)
    rows, width = (point.batch, tokens) if tokens else layouts.token_shape(point)
    return {x.name: x.draw(x.shape(rows, point.heads, point.n_kv_heads, width, point.head_dim), gen, where,
                           point.torch_dtype) for x in entry.inputs}


def _tensors(value: Any) -> list[torch.Tensor]:
    """Every tensor held by a cache (dataclasses of tensors, nested)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if dataclasses.is_dataclass(value):
        return [t for f in dataclasses.fields(value) for t in _tensors(getattr(value, f.name))]
    return []


@dataclass(frozen=True)
class Outputs:
    """What the correctness gate compares: the impl's output, its float64 reference's, exact
    softmax's; in the gradient modes also the impl's dq, dk, dv and the reference's."""

    out: torch.Tensor
    reference: torch.Tensor
    softmax: torch.Tensor
    grads: tuple[torch.Tensor, ...] = ()
    reference_grads: tuple[torch.Tensor, ...] = ()


ModeCall = Callable[[Callable[[], torch.Tensor], tuple, torch.Tensor], Call]  # _fwd, _fwd_bwd, _bwd


def _kernel_call(mode_call: ModeCall, entry: Entry, point: Point, where: torch.device) -> tuple[Call, int]:
    q, k, v, grad_out = make_inputs(point, grad=point.needs_grad, where=where)
    params, layout = {**point.params, **extra_inputs(entry, point, where)}, layouts.layout_of(point)
    call = mode_call(lambda: entry(q, k, v, causal=point.causal, layout=layout, **params), (q, k, v), grad_out)
    return call, sum(t.numel() * t.element_size() for t in (q, k, v))


def _exact(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, **params: Any) -> torch.Tensor:
    return variants.exact_attention(q, k, v, causal)


def _kernel_outputs(entry: Entry, point: Point, where: torch.device) -> Outputs:
    """Outputs (and gradients) on the real tokens only: padding is not part of any result."""
    grad = point.needs_grad
    q, k, v, upstream = make_inputs(point, grad=grad, where=where)
    inputs64 = tuple(t.detach().double().requires_grad_(grad) for t in (q, k, v))
    params, layout = dict(point.params), layouts.layout_of(point)
    extras = extra_inputs(entry, point, where)
    real = layout.real if layout is not None else (lambda x: x)
    with torch.set_grad_enabled(grad):
        out = entry(q, k, v, causal=point.causal, layout=layout, **extras, **params)
        reference = layouts.reference_attention(entry.reference, *inputs64, causal=point.causal, layout=layout,
                                                extras={n: x.double() for n, x in extras.items()}, **params)
    with torch.no_grad():
        softmax = layouts.reference_attention(_exact, *inputs64, causal=point.causal, layout=layout)
    if not grad:
        return Outputs(real(out), real(reference), real(softmax))
    grads = torch.autograd.grad(out, (q, k, v), upstream)
    reference_grads = torch.autograd.grad(reference, inputs64, upstream.double())
    return Outputs(real(out.detach()), real(reference.detach()), real(softmax), tuple(map(real, grads)),
                   tuple(map(real, reference_grads)))


@dataclass(frozen=True)
class DecodeInputs:
    """A decode point's cache of the prefix (built here, never timed), the step's new tokens, every
    token drawn and the serving batch's layout (None when every sequence has ``seq_len`` tokens)."""

    cache: Any
    new: tuple[torch.Tensor, ...]
    tokens: tuple[torch.Tensor, ...]
    layout: layouts.Layout | None
    extras: dict[str, torch.Tensor]  # the entry's extra inputs of every token
    new_extras: dict[str, torch.Tensor]  # and of the new tokens


def _decode_inputs(entry: Entry, point: Point, where: torch.device) -> DecodeInputs:
    """Tokens for a prefix of ``width`` positions and ``q_len`` new ones per sequence: sequence i's
    prefix is its first ``length_i`` positions (every one when dense), the new tokens the last ``q_len``."""
    layout = layouts.layout_of(point)
    width = point.seq_len if layout is None else layout.width
    tokens = make_inputs(point, grad=False, tokens=width + point.q_len, upstream=False, where=where)
    extras = extra_inputs(entry, point, where, tokens=width + point.q_len)
    _, k, v = tokens
    prefix = (slice(None), slice(None), slice(None, width))
    extra = {"layout": layout} if layout is not None else {}
    cache = entry.decoder.prefill(k[prefix], v[prefix], q_len=point.q_len, **extra,
                                  **sliced(extras, prefix), **dict(point.params))
    new = (slice(None), slice(None), slice(width, None))
    return DecodeInputs(cache, tuple(t[new].contiguous() for t in tokens), tokens, layout, extras,
                        sliced(extras, new))


def _decode_call(entry: Entry, point: Point, where: torch.device) -> tuple[Call, int]:
    with torch.no_grad():
        inputs = _decode_inputs(entry, point, where)
    params = dict(point.params)

    def run():
        with torch.no_grad():
            return entry.decoder.step(*inputs.new, inputs.cache, **inputs.new_extras, **params)

    existing = (*inputs.new, *_tensors(inputs.cache))
    return Call(run, existing=existing), sum(t.numel() * t.element_size() for t in inputs.new)


def _last_rows(reference: Callable[..., torch.Tensor], inputs: DecodeInputs, q_len: int,
               params: dict[str, Any]) -> torch.Tensor:
    """``reference`` (float64, K and V repeated to the query heads) over each sequence's prefix and the
    new tokens, causal: the new tokens' rows."""
    q, k, v = (t.double() for t in inputs.tokens)
    width = q.shape[2] - q_len
    lengths = [width] * q.shape[0] if inputs.layout is None else [row[0] for row in inputs.layout.lengths]
    rows = []
    for i, length in enumerate(lengths):
        keep = torch.cat([torch.arange(length), torch.arange(width, width + q_len)]).to(q.device)
        seq = [t[i:i + 1].index_select(2, keep) for t in (q, k, v)]
        extras = {name: x[i:i + 1].index_select(2, keep).double() if is_per_token(x) else x.double()
                  for name, x in inputs.extras.items()}
        rows.append(layouts.reference_attention(reference, *seq, causal=True, extras=extras, **params)[:, :, -q_len:])
    return torch.cat(rows)


def _decode_outputs(entry: Entry, point: Point, where: torch.device) -> Outputs:
    params = dict(point.params)
    with torch.no_grad():
        inputs = _decode_inputs(entry, point, where)
        return Outputs(entry.decoder.step(*inputs.new, inputs.cache, **inputs.new_extras, **params),
                       _last_rows(entry.reference, inputs, point.q_len, params),
                       _last_rows(_exact, inputs, point.q_len, {}))


def _decode_columns(entry: Entry, point: Point, median_ms: float, device: Device) -> dict[str, Any]:
    """A decode row's memory-traffic columns (analytic bytes, from the entry's decoder)."""
    moved = entry.decoder.bytes_moved(point)
    gbps = moved / (median_ms * 1e-3) / 1e9
    found = peaks(device)
    peak = found.bandwidth_tbps if found else None
    return {"cache_bytes": entry.decoder.cache_bytes(point), "bytes_moved": moved,
            "gbps": gbps, "pct_bandwidth": 100 * gbps / (peak * 1e3) if peak else None,
            "tokens_per_s": point.batch * point.q_len / (median_ms * 1e-3)}


@dataclass(frozen=True)
class Workload:
    """What a mode runs: its timed call (and the inputs' bytes), the outputs its correctness gate
    compares, its FLOPs, its own columns, and why its call cannot be captured as a CUDA graph (None
    when it can)."""

    call: Callable[[Entry, Point, torch.device], tuple[Call, int]]
    outputs: Callable[[Entry, Point, torch.device], Outputs]
    flops: Callable[[Entry, Point], float]
    kernel: Callable[[Entry, Point], str | None]  # what runs, for the row
    columns: Callable[[Entry, Point, float, Device], dict[str, Any]] = \
        lambda entry, point, median_ms, device: {}
    graph_refusal: str | None = None


def _kernel_workload(mode_call: ModeCall, factor: float, graph_refusal: str | None = None) -> Workload:
    return Workload(functools.partial(_kernel_call, mode_call), _kernel_outputs,
                    lambda entry, point: entry.flops(point) * factor,
                    lambda entry, point: entry.kernel_name(point) if entry.kernel_name else None,
                    graph_refusal=graph_refusal)


# The one table of modes. FLOPs relative to the forward: FlashAttention's convention, backward = 2.5×.
WORKLOADS: dict[str, Workload] = {
    "fwd": _kernel_workload(_fwd, 1.0),
    # The autograd graph is built before the capture, so its backward would run on the engine's own
    # streams, outside the capture (pytorch/pytorch#164302): capture fails, or records nothing.
    "bwd": _kernel_workload(_bwd, 2.5, graph_refusal="the backward of a graph built before the capture "
                                                     "runs outside it (pytorch#164302)"),
    "fwd_bwd": _kernel_workload(_fwd_bwd, 3.5),
    DECODE: Workload(_decode_call, _decode_outputs, lambda entry, point: entry.decoder.flops(point),
                     lambda entry, point: entry.decoder.kernel_name(point), _decode_columns),
}


def make_call(entry: Entry, point: Point, device: Device | None = None) -> tuple[Call, int]:
    """The mode's callable on fresh inputs (on ``device``, default the point's), and the inputs' bytes."""
    device = device or open_device(point.device)
    return WORKLOADS[point.mode].call(entry, point, device.tensors)


# --- correctness ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Gate:
    """The correctness gate's verdict: errors against the float64 reference (output; worst of dq, dk,
    dv in the gradient modes, else None) and against exact softmax, and why it failed (None: passed)."""

    err_ref: float
    err_softmax: float
    err_grad: float | None
    failure: str | None


# Verdicts of this worker's gates by slice: the slice is the same for every point of a group at
# least check_len long, so its gradients are computed once per group (cleared by release_caches).
_GATES: dict[str, Gate] = {}


def check(entry: Entry, point: Point, check_len: int, device: Device | None = None) -> Gate:
    """The point's output on a slice (1 batch, at most two KV heads with their query groups, the first ``check_len``
    tokens, or that many before the new ones when decoding), and in ``bwd`` and ``fwd_bwd`` its q, k,
    v gradients too, against the entry's float64 reference, at the entry's tolerance for the dtype."""
    device = device or open_device(point.device)
    # Few KV heads with their query groups; enough tokens for the point's documents.
    group = point.heads // point.n_kv_heads
    length = max(check_len, point.documents.count if point.documents else 1)
    # A serving batch keeps its sequences, so that the gate sees each at its own length.
    batch = point.batch if point.mode == DECODE and point.layout != layouts.DENSE else 1
    # Grouped: two KV heads, as one would broadcast over any number of query heads and hide a kernel
    # that ignores the groups.
    kv_heads = min(2, point.n_kv_heads) if point.grouped else None
    small = replace(point, batch=batch, heads=group * (kv_heads or 1), kv_heads=kv_heads,
                    seq_len=min(point.seq_len, length))
    key = json.dumps([entry.name, dataclasses.asdict(small)], sort_keys=True, default=str)
    if key not in _GATES:
        _GATES[key] = _gate(entry, small, device)
    return _GATES[key]


def _gate(entry: Entry, small: Point, device: Device) -> Gate:
    outputs = WORKLOADS[small.mode].outputs(entry, small, device.tensors)
    err_ref = variants.relative_error(outputs.out, outputs.reference)
    err_softmax = variants.relative_error(outputs.out, outputs.softmax)
    tolerance = entry.tolerance[small.dtype]
    grad_errors = dict(zip(("dq", "dk", "dv"), variants.gradient_errors(outputs.grads, outputs.reference_grads,
                                                                         tolerance), strict=False))
    # The worst gradient; a NaN is the worst of all (max would let it hide behind a number).
    worst = max(grad_errors, key=lambda name: (math.isnan(grad_errors[name]), grad_errors[name]), default=None)
    err_grad = grad_errors[worst] if worst else None
    failure = None
    if not err_ref <= tolerance:  # also catches NaN
        failure = (f"output differs from the float64 reference: relative error {err_ref:.3g} > "
                   f"tolerance {tolerance:g} for {small.dtype}")
    elif err_grad is not None and not err_grad <= tolerance:
        failure = (f"gradient {worst} differs from the float64 reference's: relative error {err_grad:.3g} > "
                   f"tolerance {tolerance:g} for {small.dtype}")
    return Gate(err_ref, err_softmax, err_grad, failure)


def release_caches() -> None:
    """Forget what a worker kept for the points of one group (gate verdicts, the entries' masks),
    before it moves to another."""
    _GATES.clear()
    variants.release_caches()


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


def measure(entry: Entry, point: Point, settings: MeasureSettings, device: Device | None = None) -> dict[str, Any]:
    """The measured columns of one point's row: status, reason, kernel, timing, memory, work, quality.
    ``device`` is the worker's (default: the point's, opened once per process)."""
    device = device or open_device(point.device)
    row: dict[str, Any] = {}
    try:
        device.activate()
        reasons = entry.not_supported_reasons(point)
        if reasons:
            return {"status": "unsupported", "reason": "; ".join(reasons)}
        workload = WORKLOADS[point.mode]
        row["kernel"] = workload.kernel(entry, point)
        gate = check(entry, point, settings.check_len, device)
        row.update(err_ref=gate.err_ref, err_softmax=gate.err_softmax, err_grad=gate.err_grad)
        if gate.failure:
            return {**row, "status": "incorrect", "reason": gate.failure}
        call, row["input_bytes"] = workload.call(entry, point, device.tensors)
        # The cold call first: a CUDA graph's capture would warm the call and hide its compile time.
        row["setup_ms"] = cold_call_ms(device.timer(), call)
        form = timed_form(call, device, settings.cuda_graph, workload.graph_refusal)
        row["timer"] = form.timer.name
        estimate = warm_up(form.timer, form.call, settings.warmup_s)
        row["peak_mem_bytes"] = device.peak_memory(call)
        samples = form.timer.batch(form.call, repetitions(estimate, settings.target_s, settings.min_reps,
                                                          settings.max_reps))
        row["host_ms"] = form.timer.host_ms(form.call)
        row["sm_clock_mhz"], row["throttle"] = device.clock_and_throttle()
        row["tf32"] = device.tf32(point.dtype)
        flops = workload.flops(entry, point)
        peak = peak_tflops(device, point.dtype, row["tf32"])
    except Exception as exc:  # a point's failure is a result, not a crash of the sweep
        if is_cuda_fault(exc):
            device.poison(f"a CUDA fault ({' '.join(str(exc).split())[:200]}) leaves the CUDA context unusable")
        return {**row, **failure_row(exc)}
    finally:
        device.release()
    median, p20, p80 = statistics.median(samples), percentile(samples, 20), percentile(samples, 80)
    tflops = flops / (median * 1e-3) / 1e12
    host = row["host_ms"]
    # An ok row's reason is a note on how it was measured (a CUDA graph that could not be captured).
    return {**row, **workload.columns(entry, point, median, device), "status": "ok", "reason": form.note,
            "time_ms": median, "time_ms_p20": p20, "time_ms_p80": p80, "reps": len(samples),
            "spread": p80 / p20 if p20 > 0 else None,
            "noisy": bool(p20 > 0 and p80 / p20 > settings.noisy_spread),
            "launch_bound": None if host is None else bool(host >= median), "flops": flops,
            "tflops": tflops, "pct_peak": 100 * tflops / peak if peak else None}
