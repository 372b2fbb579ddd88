"""Test-only variants that misbehave on purpose, loaded through ATTNBENCH_PLUGINS.

They let the tests prove that a worker which dies, hangs, lies or meets a CUDA fault is recorded
(and replaced) and the sweep goes on, without bench/ knowing about them.
"""

import os
import signal
import time

import torch

from variants import Entry, register
from variants.standard import dense_flops, reference


def _dies_with(sig: int):
    def forward(q, k, v, *, causal: bool) -> torch.Tensor:
        os.kill(os.getpid(), sig)
        return q

    return forward


def _hangs(q, k, v, *, causal: bool) -> torch.Tensor:
    time.sleep(600)
    return q


def _wrong(q, k, v, *, causal: bool) -> torch.Tensor:
    return reference(q, k, v, causal=causal) + 1.0


def _cuda_fault(q, k, v, *, causal: bool) -> torch.Tensor:
    _record_pid("cuda-fault")
    raise RuntimeError("CUDA error: an illegal memory access was encountered\nCUDA kernel errors might be "
                       "asynchronously reported at some other API call")


def _record_pid(impl: str) -> None:
    """Which process ran an impl, for the test that checks a worker is replaced."""
    with open(os.environ["ATTNBENCH_TEST_PID_LOG"], "a") as log:
        log.write(f"{impl} {os.getpid()}\n")


def _records_pid(impl: str):
    def forward(q, k, v, *, causal: bool) -> torch.Tensor:
        _record_pid(impl)
        return reference(q, k, v, causal=causal)

    return forward


def _allocates(q, k, v, *, causal: bool) -> torch.Tensor:
    # 1 TiB: beyond any test machine, so the allocator refuses (an `oom` row, the worker survives)
    torch.empty(1 << 40, dtype=torch.uint8, device=q.device)
    return q


for _impl, _fn in (("sigkill", _dies_with(signal.SIGKILL)), ("abort", _dies_with(signal.SIGABRT)),
                   ("hang", _hangs), ("wrong", _wrong), ("huge", _allocates), ("cuda-fault", _cuda_fault),
                   ("records-pid", _records_pid("records-pid")), ("records-pid-too", _records_pid("records-pid-too"))):
    register(Entry("faulty", _impl, "standard", _fn, reference, dense_flops,
                   summary=f"test-only: {_impl}"))
