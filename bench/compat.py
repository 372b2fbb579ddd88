"""Version-tolerant accessors of torch internals, for every torch in pyproject's range.

Each accessor returns ``None`` where the installed torch lacks what it reads, so that its caller
takes a fallback that keeps the feature working instead of failing with an ``AttributeError``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch.autograd.profiler_util import FunctionEvent


def linked_correlation_id(event: FunctionEvent) -> int | None:
    """The correlation id of the CPU operator that ``event`` (a device activity or a runtime call
    such as ``cudaLaunchKernel``) is linked to, 0 for an operator itself; ``None`` where
    ``FunctionEvent`` has no such field (torch 2.11 has not; 2.13 has)."""
    return getattr(event, "linked_correlation_id", None)


def cuda_memory_history() -> tuple[Callable[..., Any], Callable[..., dict[str, Any]]] | None:
    """``(torch.cuda.memory._record_memory_history, torch.cuda.memory._snapshot)``, the private
    allocator-history recorder and its reader, or ``None`` where this torch lacks either."""
    record = getattr(torch.cuda.memory, "_record_memory_history", None)
    snapshot = getattr(torch.cuda.memory, "_snapshot", None)
    return (record, snapshot) if record is not None and snapshot is not None else None


def memory_trace_plot() -> Callable[[dict[str, Any]], str] | None:
    """``torch.cuda._memory_viz.trace_plot`` (a snapshot to a self-contained HTML page), or ``None``
    where this torch lacks that private module or function."""
    try:
        from torch.cuda._memory_viz import trace_plot
    except ImportError:
        return None
    return trace_plot


def tf32_matmul_allowed() -> bool:
    """Whether float32 matmuls on CUDA may run in TF32. Torch 2.9 added ``fp32_precision`` ("tf32",
    "ieee", or "none": inherit the generic setting, then the legacy flag) beside ``allow_tf32``;
    reading ``allow_tf32`` raises once the two APIs were mixed, so the new one is read first."""
    for owner in (torch.backends.cuda.matmul, torch.backends):
        precision = getattr(owner, "fp32_precision", "none")
        if precision != "none":
            return precision == "tf32"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # releases that deprecate the flag warn on every read
        return bool(torch.backends.cuda.matmul.allow_tf32)
