"""The device a worker measures on, as one object: its timer, its memory counter, its CUDA graph
capture, its clean-up, its clocks and its datasheet peaks.

A worker opens its device once (:func:`open_device`) and hands it to every point it measures, so
nothing device-specific travels as a string through the layers. On CUDA the object makes its GPU
the process's current device (``torch.cuda.set_device``) when it is opened and again when a point
starts (:meth:`Device.activate`), so that code which uses "the current device" —
``torch.cuda.graph``, Triton's launcher, fla's kernels — lands on it, and every call it makes itself
names that GPU: a point on ``cuda:1`` never records an event, flushes the L2, captures a graph or
reads a capability on device 0.

A device is *poisoned* when something left its process unfit to measure another point: a CUDA
graph capture that failed (PyTorch then never ends the caching allocator's capture, so for the
rest of the process no cached block is freed) or a sticky CUDA fault (an illegal address: every
later CUDA call fails). The runner replaces a worker whose device is poisoned before its next point.
"""

from __future__ import annotations

import functools
import gc
import weakref
from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from .compat import tf32_matmul_allowed
from .env import DevicePeaks, cpu_name, device_peaks, nvml_clock_and_throttle
from .timers import Call, CpuTimer, CudaTimer, Timer

L2_FLUSH_BYTES = 256 << 20  # larger than any current GPU's L2 (H100: 50 MiB)

# Words of the messages CUDA, PyTorch and Triton give for faults that leave the CUDA context unusable
# ("sticky" errors: cudaErrorIllegalAddress, LaunchFailure, MisalignedAddress, IllegalInstruction,
# Assert, HardwareStackError, InvalidPc, LaunchTimeout, ECCUncorrectable), and for any CUDA error at
# all: a process that met one is replaced rather than trusted with the next point.
STICKY_CUDA_FAULTS = ("illegal memory access", "misaligned address", "unspecified launch failure",
                      "illegal instruction", "device-side assert", "hardware stack error",
                      "invalid program counter", "launch timed out", "uncorrectable ecc",
                      "cuda error", "triton error [cuda]", "cuda driver error")


def is_cuda_fault(exc: BaseException) -> bool:
    """Whether ``exc`` reports a CUDA fault (out-of-memory is not one: the context survives it)."""
    text = str(exc).lower()
    return "out of memory" not in text and any(words in text for words in STICKY_CUDA_FAULTS)


class Device(Protocol):
    """What measuring needs of a device; :class:`CpuDevice` and :class:`CudaDevice` provide it."""

    name: str  # as the rows name it ("cpu", "cuda", "cuda:1")
    tensors: torch.device  # where a point's tensors are allocated
    is_cuda: bool
    model: str  # the part's name ("" on CPU: no datasheet peak applies)
    poisoned: str | None  # why this process must not measure another point

    def activate(self) -> None: ...

    def timer(self, name: str | None = None) -> Timer: ...

    def capture(self, call: Call) -> Callable[[], Any]: ...

    def synchronize(self) -> None: ...

    def peak_memory(self, call: Call) -> int: ...

    def release(self) -> None: ...

    def poison(self, why: str) -> None: ...

    def clock_and_throttle(self) -> tuple[float | None, str | None]: ...

    def tf32(self, dtype: str) -> bool | None: ...

    def environment(self) -> dict[str, Any]: ...


class _Poisonable:
    poisoned: str | None = None

    def poison(self, why: str) -> None:
        self.poisoned = self.poisoned or why  # the first cause is the one worth reading


# --- CPU -----------------------------------------------------------------------------------------

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


class CpuDevice(_Poisonable):
    name = "cpu"
    tensors = torch.device("cpu")
    is_cuda = False
    model = ""

    def activate(self) -> None:
        pass

    def timer(self, name: str | None = None) -> Timer:
        return CpuTimer()

    def capture(self, call: Call) -> Callable[[], Any]:
        raise RuntimeError("CUDA graphs need a CUDA device")

    def synchronize(self) -> None:
        pass

    def peak_memory(self, call: Call) -> int:
        """Peak of live tensor bytes created during one call, counted per storage (deterministic)."""
        call.before()
        gc.collect()
        with LiveTensorBytes(call.existing) as counter:
            call.run()
        return counter.peak

    def release(self) -> None:
        pass

    def clock_and_throttle(self) -> tuple[float | None, str | None]:
        return None, None

    def tf32(self, dtype: str) -> bool | None:
        return None

    def environment(self) -> dict[str, Any]:
        return {"device_name": cpu_name(), "device_capability": None, "driver": None}


# --- CUDA ----------------------------------------------------------------------------------------

class CudaDevice(_Poisonable):
    """One CUDA GPU, pinned as the process's current device (see the module docstring)."""

    is_cuda = True
    flush_bytes = L2_FLUSH_BYTES

    def __init__(self, name: str) -> None:
        self.name = name
        index = torch.device(name).index
        self.index = torch.cuda.current_device() if index is None else index
        self.activate()
        self.model = torch.cuda.get_device_name(self.index)
        # One buffer per device and process, allocated once, not per point.
        self._flush_buffer = torch.empty(self.flush_bytes, dtype=torch.int8, device=self.tensors)

    @property
    def tensors(self) -> torch.device:
        return torch.device("cuda", self.index)

    def activate(self) -> None:
        """Make this GPU the process's current device (see the module docstring)."""
        torch.cuda.set_device(self.index)

    @property
    def stream(self) -> torch.cuda.Stream:
        """The stream a point's work is enqueued on: this GPU's current stream."""
        return torch.cuda.current_stream(self.index)

    def timer(self, name: str | None = None) -> Timer:
        return CudaTimer(self, name or "cuda-events")

    def recorded_event(self) -> Any:
        """A timing event recorded now on this GPU's current stream (``Event.record()`` without a
        stream would record on the current *device's* stream)."""
        event = torch.cuda.Event(enable_timing=True)
        event.record(self.stream)
        return event

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.index)

    def flush(self) -> None:
        self._flush_buffer.zero_()

    def capture(self, call: Call) -> Callable[[], Any]:
        """``call.run`` captured as a CUDA graph on a side stream of this GPU; returns its replay.
        Warmed on that stream first, as capture requires. A failed capture poisons the device."""
        current = self.stream
        side = torch.cuda.Stream(self.index)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            for _ in range(3):
                call.before()
                call.run()
        current.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        call.before()
        try:
            with torch.cuda.graph(graph, stream=side):
                call.run()
        except BaseException:
            # When capture_end raises, torch.cuda.graph never leaves its stream context: put the
            # stream this GPU's work runs on back, so the fallback timing records where work goes.
            torch.cuda.set_stream(current)
            self.poison("a CUDA graph capture failed, which leaves PyTorch's caching allocator capturing "
                        "(no cached block is freed for the rest of the process)")
            raise
        return graph.replay

    def peak_memory(self, call: Call) -> int:
        """Peak allocated on this GPU during one call, above what was allocated before it."""
        call.before()
        gc.collect()
        self.synchronize()
        torch.cuda.reset_peak_memory_stats(self.index)
        before = torch.cuda.memory_allocated(self.index)
        call.run()
        self.synchronize()
        return torch.cuda.max_memory_allocated(self.index) - before

    def release(self) -> None:
        """Free cached blocks between points. Never raises: after a sticky fault the context is dead
        and this fails too, which must not hide the fault the row reports."""
        try:
            torch.cuda.empty_cache()
        except Exception as exc:  # the context is unusable: say so, keep the row's own reason
            self.poison(f"freeing cached memory failed ({' '.join(str(exc).split())[:200]})")

    def clock_and_throttle(self) -> tuple[float | None, str | None]:
        return nvml_clock_and_throttle(self.index)

    def tf32(self, dtype: str) -> bool | None:
        """Whether float32 matmuls may run in TF32 here (None for other dtypes: it does not apply)."""
        return tf32_matmul_allowed() if dtype == "float32" else None

    def environment(self) -> dict[str, Any]:
        props = torch.cuda.get_device_properties(self.index)
        return {"device_name": props.name, "device_capability": f"{props.major}.{props.minor}",
                "driver": _nvidia_driver()}


def _nvidia_driver() -> str | None:
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml.nvmlSystemGetDriverVersion()
    except Exception:  # pynvml absent or NVML unavailable: the driver is simply unknown
        return None


@functools.cache
def open_device(name: str) -> CpuDevice | CudaDevice:
    """The process's one object for ``name`` (``cpu``, ``cuda``, ``cuda:N``)."""
    return CudaDevice(name) if name.startswith("cuda") else CpuDevice()


def peaks(device: Device) -> DevicePeaks | None:
    """The datasheet peaks of ``device``'s part, or None (never a guess)."""
    return device_peaks(device.model) if device.model else None


def peak_tflops(device: Device, dtype: str, tf32: bool | None) -> float | None:
    """The compute peak a point of ``dtype`` is measured against: TF32's for float32 where TF32 was
    allowed (the matmuls may have run at that rate), the datasheet's row for the dtype otherwise."""
    found = peaks(device)
    if found is None:
        return None
    return found.tflops.get("tf32" if dtype == "float32" and tf32 else dtype)

