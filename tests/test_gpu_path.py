"""The CUDA path without a GPU: device pinning, CUDA graph capture failures, CUDA faults and the
worker that must be replaced after them (issue 19, items 1-3). The CUDA primitives are the recording
fake of ``fake_cuda``; ``torch.cuda.graph`` and ``torch.cuda.stream`` are the installed torch's own."""

from __future__ import annotations

import inspect
import sys

import pandas as pd
import pytest
import torch
from fake_cuda import CpuBackedCuda, FakeCuda
from support import bench, faulty_env

import variants
from bench import device as devices
from bench.measure import MeasureSettings, measure

QUICK = MeasureSettings(warmup_s=0, target_s=0.005, min_reps=3, max_reps=5, check_len=64)
STANDARD = variants.get("standard/eager")


def point(entry: variants.Entry, device: str = "cuda:1", params: dict | None = None, **kwargs) -> variants.Point:
    shape = {"batch": 1, "heads": 2, "seq_len": 64, "head_dim": 16, "dtype": "float32", **kwargs}
    return variants.Point(device=device, params=entry.resolve(params), **shape)


@pytest.fixture
def cuda(monkeypatch) -> FakeCuda:
    return FakeCuda().install(monkeypatch)


def test_fake_cuda_matches_the_real_signatures():
    """Each stand-in takes the parameters of the torch.cuda function it replaces, in this torch."""
    fake = FakeCuda()
    for name in FakeCuda.FAKED:
        real = getattr(torch.cuda, name)
        real = real.__new__ if inspect.isclass(real) else real
        try:
            signature = inspect.signature(real)
        except ValueError:  # a C builtin in CUDA builds (_exchange_device); CPU builds have a Python stub
            # with its signature, checked by the main job
            continue
        real_params = [p for p in signature.parameters.values()
                       if p.name not in ("cls", "self", "kwargs") and p.kind is not p.VAR_KEYWORD]
        fake_params = inspect.signature(getattr(fake, name)).parameters
        for param in real_params:
            assert param.name in fake_params or any(p.kind is p.VAR_KEYWORD for p in fake_params.values()), \
                (name, param.name)


# --- item 1: a point on cuda:1 touches device 1 only ----------------------------------------------------

@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("cuda_graph", [False, True], ids=["events", "graph"])
def test_a_point_on_cuda_1_touches_device_1_only(cuda, mode, cuda_graph):
    """Events, the L2 flush, graph capture, memory stats, the clean-up and the fused kernel's capability
    check all name device 1 or run with it current; device 0 (current when the test starts) is never
    touched. ``local/blocked`` in bfloat16 asks for the capability (its CUDA flash kernel choice)."""
    entry = variants.get("local/blocked")
    device = CpuBackedCuda("cuda:1")
    settings = MeasureSettings(**{**QUICK.__dict__, "cuda_graph": cuda_graph})
    row = measure(entry, point(entry, params={"window": 16}, mode=mode, dtype="bfloat16"), settings, device)
    assert row["status"] == "ok" and row["reason"] is None, row
    assert row["timer"] == ("cuda-graph" if cuda_graph else "cuda-events")
    kinds = {what for what, _ in cuda.calls}
    assert {"set_device", "event.record", "synchronize", "empty_cache", "get_device_capability",
            "reset_peak_memory_stats"} <= kinds
    if cuda_graph:
        assert {"capture_begin", "replay"} <= kinds
        assert cuda.streams[1] is cuda.default_streams[1]  # the capture stream is current no more
    assert cuda.touched() == {1}, [c for c in cuda.calls if c[1] != 1]
    assert device.poisoned is None


def test_a_device_named_plain_cuda_is_the_current_one(cuda):
    cuda.current = 1
    device = CpuBackedCuda("cuda")
    assert device.index == 1 and device.name == "cuda"
    assert ("set_device", 1) in cuda.calls and cuda.touched() == {1}


def test_the_device_makes_itself_current_before_each_point(cuda):
    """Two devices in one process (bench doctor, a profile): each point re-pins its own GPU."""
    one, zero = CpuBackedCuda("cuda:1"), CpuBackedCuda("cuda:0")
    assert cuda.current == 0
    entry = variants.get("standard/eager")
    cuda.calls.clear()
    assert measure(entry, point(entry), QUICK, one)["status"] == "ok"
    assert cuda.touched() == {1}
    cuda.calls.clear()
    assert measure(entry, point(entry, device="cuda:0"), QUICK, zero)["status"] == "ok"
    assert cuda.touched() == {0}


# --- item 2: a failed capture ----------------------------------------------------------------------------

def test_capture_failing_at_its_end_falls_back_restores_the_stream_and_poisons(monkeypatch):
    """PyTorch's torch.cuda.graph leaves its capture stream current when capture_end raises; the
    row stays ok with the reason, timing goes back to the GPU's stream, and the device says why the
    process must not measure another point."""
    cuda = FakeCuda(fail_capture_end=True).install(monkeypatch)
    device = CpuBackedCuda("cuda:1")
    entry = variants.get("standard/eager")
    row = measure(entry, point(entry), QUICK, device)
    settings_graph = MeasureSettings(**{**QUICK.__dict__, "cuda_graph": True})
    cuda.calls.clear()
    row = measure(entry, point(entry), settings_graph, device)
    assert row["status"] == "ok" and row["timer"] == "cuda-events"
    assert "CUDA graph capture failed" in row["reason"] and "not permitted when stream is capturing" in row["reason"]
    assert cuda.streams[1] is cuda.default_streams[1]
    assert device.poisoned and "caching allocator" in device.poisoned
    assert cuda.touched() == {1}
    # events recorded after the failure went to the GPU's own stream, not the dead capture stream
    assert cuda.calls[-1][0] in {"empty_cache", "synchronize", "event.record", "max_memory_allocated"}


def test_bwd_is_refused_a_graph_up_front(cuda):
    """The backward of a graph built before the capture runs outside it (pytorch#164302): bwd is
    timed with events, with the reason, and nothing is captured (so nothing is poisoned)."""
    device = CpuBackedCuda("cuda:1")
    entry = variants.get("standard/eager")
    row = measure(entry, point(entry, mode="bwd"), MeasureSettings(**{**QUICK.__dict__, "cuda_graph": True}),
                  device)
    assert row["status"] == "ok" and row["timer"] == "cuda-events"
    assert row["reason"].startswith("not captured as a CUDA graph") and "164302" in row["reason"]
    assert not any(what == "capture_begin" for what, _ in cuda.calls) and device.poisoned is None


# --- item 3: a CUDA fault -----------------------------------------------------------------------------

FAULT = "CUDA error: an illegal memory access was encountered"


def _cuda_fault(q, k, v, *, causal: bool) -> torch.Tensor:
    raise RuntimeError(FAULT)


def test_a_cuda_fault_keeps_its_message_when_the_clean_up_fails_too(monkeypatch):
    cuda = FakeCuda(empty_cache_error="CUDA error: an illegal memory access was encountered (in empty_cache)")
    cuda.install(monkeypatch)
    device = CpuBackedCuda("cuda:1")
    standard = variants.get("standard/eager")
    entry = variants.Entry("faulty", "cuda-fault", "standard", _cuda_fault, standard.reference, standard.flops)
    row = measure(entry, point(entry), QUICK, device)
    assert row["status"] == "error"
    assert row["reason"] == f"RuntimeError: {FAULT}"
    assert device.poisoned and "CUDA fault" in device.poisoned
    assert ("empty_cache", 1) in cuda.calls  # the clean-up ran, failed, and hid nothing


@pytest.mark.parametrize("message, fault", [
    (FAULT, True), ("CUDA error: misaligned address", True), ("Triton Error [CUDA]: unspecified launch failure", True),
    ("CUDA error: device-side assert triggered", True), ("CUDA out of memory. Tried to allocate 2.00 GiB", False),
    ("shape mismatch", False)])
def test_cuda_faults_are_told_from_other_errors(message, fault):
    assert devices.is_cuda_fault(RuntimeError(message)) is fault


@pytest.mark.slow
def test_the_worker_is_replaced_after_a_fault_and_kept_otherwise(tmp_path):
    """Through the real runner: the point after a CUDA fault runs in a fresh process; without a fault
    the worker carries on (so the test can tell the two apart)."""
    pids = tmp_path / "pids"

    def sweep(run_id: str, names: str) -> pd.DataFrame:
        result = bench("run", "sweep", "--variants", names, "--seq-lens", "32", "--heads", "1", "--head-dim", "8",
                       "--device", "cpu", "--out", str(tmp_path), "--run-id", run_id,
                       env=faulty_env(ATTNBENCH_TEST_PID_LOG=str(pids)), timeout=300)
        assert result.returncode == 0, result.stderr
        return pd.read_parquet(tmp_path / run_id)

    def ran(impl: str) -> set[str]:
        return {pid for line in pids.read_text().splitlines() for name, pid in [line.split()] if name == impl}

    rows = sweep("fault", "faulty/cuda-fault,faulty/records-pid")
    fault = rows[rows["impl"] == "cuda-fault"].iloc[0]
    assert fault["status"] == "error" and fault["reason"].startswith(f"RuntimeError: {FAULT}")
    assert "worker replaced after this point" in fault["reason"]
    assert rows[rows["impl"] == "records-pid"].iloc[0]["status"] == "ok"
    assert len(ran("cuda-fault")) == len(ran("records-pid")) == 1 and ran("cuda-fault") != ran("records-pid")
    pids.unlink()
    sweep("no-fault", "faulty/records-pid,standard/eager,faulty/records-pid-too")
    assert len(ran("records-pid")) == 1 and ran("records-pid") == ran("records-pid-too")


# --- item 6: NVML finds the point's GPU; TF32 is recorded and used -------------------------------------

class FakeNvml:
    """The pynvml calls bench.env makes, over GPUs and MIG instances known by UUID (NVML's own order
    differs from CUDA's, as it does whenever CUDA_VISIBLE_DEVICES reorders or CUDA orders by speed)."""

    NVML_CLOCK_SM = 1
    nvmlClocksEventReasonSwPowerCap = 4
    nvmlClocksEventReasonHwSlowdown = 8

    class NVMLError(Exception):
        pass

    def __init__(self, gpus: dict[str, float], migs: dict[str, str]) -> None:
        self.gpus, self.migs = gpus, migs  # GPU uuid -> SM clock; MIG uuid -> its GPU's uuid

    def nvmlInit(self) -> None:  # noqa: N802
        pass

    def nvmlDeviceGetHandleByUUID(self, uuid: str) -> str:  # noqa: N802
        if uuid in self.gpus or uuid in self.migs:
            return uuid
        raise self.NVMLError(f"not found: {uuid}")

    def nvmlDeviceGetDeviceHandleFromMigDeviceHandle(self, handle: str) -> str:  # noqa: N802
        return self.migs[handle]

    def nvmlDeviceGetClockInfo(self, handle: str, clock: int) -> float:  # noqa: N802
        return self.gpus[handle]  # a MIG handle has no clock of its own: KeyError, as NVML refuses

    def nvmlDeviceGetCurrentClocksEventReasons(self, handle: str) -> int:  # noqa: N802
        return self.nvmlClocksEventReasonSwPowerCap


@pytest.mark.parametrize("visible", ["", "3,1", "GPU-uuid-of-1,GPU-uuid-of-0", "MIG-uuid-of-1"])
def test_nvml_reads_the_clock_of_the_points_gpu(cuda, monkeypatch, visible):
    """CUDA device 1's clock comes from the NVML device with its UUID (a MIG instance: from its parent),
    however CUDA_VISIBLE_DEVICES numbers the devices."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    mig = visible.startswith("MIG")
    nvml = FakeNvml(gpus={"GPU-uuid-of-0": 1410.0, "GPU-uuid-of-1": 1980.0, "GPU-parent": 1755.0},
                    migs={"MIG-uuid-of-1": "GPU-parent"} if mig else {})
    if mig:
        del nvml.gpus["GPU-uuid-of-1"]  # CUDA's UUID of a MIG instance is the instance's
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    device = CpuBackedCuda("cuda:1")
    assert device.clock_and_throttle() == ((1755.0 if mig else 1980.0), "SwPowerCap")
    nvml.gpus.clear()
    nvml.migs.clear()
    assert device.clock_and_throttle() == (None, None)  # not found: unknown, never another GPU's


def test_fake_nvml_calls_exist_in_the_real_pynvml():
    pynvml = pytest.importorskip("pynvml")
    for name in ("nvmlInit", "nvmlDeviceGetHandleByUUID", "nvmlDeviceGetDeviceHandleFromMigDeviceHandle",
                 "nvmlDeviceGetClockInfo", "nvmlDeviceGetCurrentClocksEventReasons", "NVML_CLOCK_SM", "NVMLError",
                 "nvmlClocksEventReasonSwPowerCap", "nvmlClocksEventReasonHwSlowdown"):
        assert hasattr(pynvml, name), name


@pytest.mark.parametrize("allowed", [False, True])
def test_float32_points_record_tf32_and_use_its_peak(cuda, monkeypatch, allowed):
    from bench.compat import tf32_matmul_allowed

    matmul = torch.backends.cuda.matmul  # a module object that monkeypatch cannot restore
    previous, matmul.fp32_precision = matmul.fp32_precision, "tf32" if allowed else "ieee"
    try:
        assert tf32_matmul_allowed() is allowed
        device = CpuBackedCuda("cuda:1")  # named as an H100 SXM: 66.9 TFLOP/s float32, 494.7 with TF32
        row = measure(STANDARD, point(STANDARD), QUICK, device)
        assert row["status"] == "ok" and row["tf32"] is allowed
        assert row["pct_peak"] / row["tflops"] == pytest.approx(100 / (494.7 if allowed else 66.9))
        bf16 = measure(STANDARD, point(STANDARD, dtype="bfloat16"), QUICK, device)
        assert bf16["tf32"] is None and bf16["pct_peak"] / bf16["tflops"] == pytest.approx(100 / 989.4)
    finally:
        matmul.fp32_precision = previous


# --- the worker loop: caches released between groups, poisoned devices reported ------------------------

class Pipe:
    """The worker's end of its pipe: tasks in, answers out."""

    def __init__(self, tasks: list) -> None:
        self.tasks, self.sent = [*tasks, None], []

    def recv(self):
        return self.tasks.pop(0)

    def send(self, value) -> None:
        self.sent.append(value)


class Task:
    def __init__(self, group: str, poison: str | None = None) -> None:
        self._group, self.poison = group, poison

    def group(self) -> tuple:
        return (self._group,)

    def execute(self, settings, device) -> dict:
        if self.poison:
            device.poison(self.poison)
        return {"status": "ok", "group": self._group}


def test_the_worker_releases_caches_between_groups_and_reports_poison(monkeypatch):
    from bench import measure as measuring
    from bench import runner

    released = []
    monkeypatch.setattr(measuring, "release_caches", lambda: released.append(len(pipe.sent)))
    monkeypatch.setattr(devices, "open_device", lambda name: devices.CpuDevice())
    pipe = Pipe([Task("a"), Task("a"), Task("b"), Task("b", poison="a CUDA fault")])
    runner._worker(pipe, QUICK, "cpu", None)
    hello, *answers = pipe.sent
    assert "device_name" in hello
    assert released == [1, 3]  # before the first point of each group, not between points of one
    assert [row["group"] for row, _ in answers] == ["a", "a", "b", "b"]
    assert [poisoned for _, poisoned in answers] == [None, None, None, "a CUDA fault"]
