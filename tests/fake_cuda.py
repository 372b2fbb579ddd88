"""A recording stand-in for the torch.cuda primitives that attnbench's CUDA path and the real
``torch.cuda.graph`` / ``torch.cuda.stream`` context managers call, so that path runs on a machine
without a GPU.

Every call is logged with the device it acted on: the device it names, or the *current* device when
it names none (as the real ones do). Streams, events and graphs remember their device, and the current
device and each device's current stream are tracked as CUDA tracks them. Each stand-in takes the same
parameters as the torch.cuda function it replaces (checked against the installed torch by
``test_fake_cuda_matches_the_real_signatures``). Tensors stay on the CPU: a test gives the device
under test CPU tensors (:class:`CpuBackedCuda`), and checks where the CUDA calls went.
"""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any

import torch

from bench.device import CudaDevice

NAME = "NVIDIA H100 80GB HBM3"


class CaptureFailed(RuntimeError):
    pass


class CpuBackedCuda(CudaDevice):
    """A :class:`bench.device.CudaDevice` whose tensors live on the CPU: its CUDA calls go to the fake."""

    flush_bytes = 1024

    @property
    def tensors(self) -> torch.device:
        return torch.device("cpu")


class FakeStream:
    def __init__(self, cuda: FakeCuda, index: int, name: str) -> None:
        self.cuda, self.device_index, self.name = cuda, index, name

    @property
    def device(self) -> torch.device:
        return torch.device("cuda", self.device_index)

    def wait_stream(self, stream: FakeStream) -> None:
        self.cuda.log("wait_stream", self.device_index)

    def __repr__(self) -> str:
        return f"<stream {self.name} of cuda:{self.device_index}>"


class FakeEvent:
    def __init__(self, cuda: FakeCuda) -> None:
        self.cuda, self.at = cuda, None

    def record(self, stream: Any = None) -> None:
        stream = stream or self.cuda.current_stream()
        self.cuda.log("event.record", stream.device_index)
        self.at = time.perf_counter()

    def elapsed_time(self, end_event: FakeEvent) -> float:
        return (end_event.at - self.at) * 1e3


class FakeGraph:
    def __init__(self, cuda: FakeCuda) -> None:
        self.cuda, self.device_index = cuda, None

    def capture_begin(self, pool: Any = None, capture_error_mode: str = "global", **kwargs: Any) -> None:
        self.device_index = self.cuda.current_stream().device_index  # it captures the current stream
        self.cuda.log("capture_begin", self.device_index)
        self.cuda.capturing = True

    def capture_end(self) -> None:
        self.cuda.capturing = False
        self.cuda.log("capture_end", self.device_index)
        if self.cuda.fail_capture_end:
            raise CaptureFailed("CUDA error: operation not permitted when stream is capturing")

    def replay(self) -> None:
        self.cuda.log("replay", self.device_index)


class FakeCuda:
    """The fake; :meth:`install` puts it in place of the real primitives."""

    def __init__(self, devices: int = 2, fail_capture_end: bool = False,
                 empty_cache_error: str | None = None) -> None:
        self.devices = devices
        self.current = 0
        self.default_streams = {i: FakeStream(self, i, "default") for i in range(devices)}
        self.streams = dict(self.default_streams)  # each device's current stream
        self.calls: list[tuple[str, int]] = []
        self.fail_capture_end = fail_capture_end
        self.empty_cache_error = empty_cache_error
        self.capturing = False

    # --- bookkeeping ---
    def log(self, what: str, index: int) -> None:
        self.calls.append((what, index))

    def index(self, device: Any) -> int:
        """The index a device argument names; the current device when it names none."""
        if device is None:
            return self.current
        if isinstance(device, int):
            return device
        device = torch.device(device)
        return self.current if device.index is None else device.index

    def touched(self) -> set[int]:
        return {index for _, index in self.calls}

    # --- torch.cuda ---
    def is_available(self) -> bool:
        return True

    def device_count(self) -> int:
        return self.devices

    def current_device(self) -> int:
        return self.current

    def set_device(self, device: Any) -> None:
        self.current = self.index(device)
        self.log("set_device", self.current)

    def _exchange_device(self, device: int) -> int:  # behind torch.cuda.device(...)
        previous, self.current = self.current, device if device >= 0 else self.current
        self.log("exchange_device", self.current)
        return previous

    def get_device_name(self, device: Any = None) -> str:
        self.log("get_device_name", self.index(device))
        return NAME

    def get_device_properties(self, device: Any = None) -> SimpleNamespace:
        index = self.index(device)
        self.log("get_device_properties", index)
        return SimpleNamespace(name=NAME, major=9, minor=0, uuid=f"uuid-of-{index}", total_memory=80 << 30)

    def get_device_capability(self, device: Any = None) -> tuple[int, int]:
        self.log("get_device_capability", self.index(device))
        return 9, 0

    def current_stream(self, device: Any = None) -> FakeStream:
        return self.streams[self.index(device)]

    def default_stream(self, device: Any = None) -> FakeStream:
        return self.default_streams[self.index(device)]

    def set_stream(self, stream: FakeStream) -> None:
        self.log("set_stream", stream.device_index)
        self.streams[stream.device_index] = stream

    def Stream(self, device: Any = None, priority: int = 0, **kwargs: Any) -> FakeStream:  # noqa: N802
        index = self.index(device)
        self.log("new_stream", index)
        return FakeStream(self, index, f"side-{len(self.calls)}")

    def Event(self, enable_timing: bool = False, blocking: bool = False, interprocess: bool = False,  # noqa: N802
              external: bool = False) -> FakeEvent:
        return FakeEvent(self)

    def CUDAGraph(self, keep_graph: bool = False) -> FakeGraph:  # noqa: N802
        return FakeGraph(self)

    def synchronize(self, device: Any = None) -> None:
        self.log("synchronize", self.index(device))

    def empty_cache(self) -> None:
        self.log("empty_cache", self.current)
        if self.empty_cache_error:
            raise RuntimeError(self.empty_cache_error)

    def memory_allocated(self, device: Any = None) -> int:
        self.log("memory_allocated", self.index(device))
        return 0

    def max_memory_allocated(self, device: Any = None) -> int:
        self.log("max_memory_allocated", self.index(device))
        return 4096

    def reset_peak_memory_stats(self, device: Any = None) -> None:
        self.log("reset_peak_memory_stats", self.index(device))

    # --- installation ---
    FAKED = ("is_available", "device_count", "current_device", "set_device", "_exchange_device",
             "get_device_name", "get_device_properties", "get_device_capability", "current_stream",
             "default_stream", "set_stream", "Stream", "Event", "CUDAGraph", "synchronize", "empty_cache",
             "memory_allocated", "max_memory_allocated", "reset_peak_memory_stats")

    def install(self, monkeypatch: Any) -> FakeCuda:
        """Replace the real primitives for one test (``torch.cuda.graph`` and ``torch.cuda.stream``
        stay real and run on these)."""
        for name in self.FAKED:
            monkeypatch.setattr(torch.cuda, name, getattr(self, name))
        monkeypatch.setattr(torch._C, "_host_emptyCache", lambda: None, raising=False)
        monkeypatch.setattr(torch.backends.cuda, "is_flash_attention_available", lambda: True)
        return self
