"""Provenance of a run (the "machine block" of every row) and the table of device peaks."""

from __future__ import annotations

import functools
import importlib.metadata
import platform
import re
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

import bench

if TYPE_CHECKING:
    from .device import Device


def name_words(device_name: str) -> frozenset[str]:
    """The words of a device name, upper-cased ("NVIDIA A100-SXM4-80GB" -> NVIDIA, A100, SXM4, 80GB):
    a model is matched as a whole word, so "GH200" is not an "H200"."""
    return frozenset(re.findall(r"[A-Z0-9]+", device_name.upper()))


@dataclass(frozen=True)
class DevicePeaks:
    """Datasheet peaks of one device part (docs/published-figures.md, "Device peaks"): its name holds
    the word ``model`` and every word of ``required``, and none of ``excluded`` (a PCIe or NVL part of
    a model has other clocks and memory, so it matches no row and gets no figure)."""

    model: str
    tflops: dict[str, float]  # dense (no 2:4 sparsity); "float32" without TF32, "tf32" with it
    bandwidth_tbps: float
    required: tuple[str, ...] = ()
    excluded: tuple[str, ...] = ()

    def matches(self, device_name: str) -> bool:
        words = name_words(device_name)
        # A MIG instance is a slice of its GPU: the whole part's peaks would overstate it.
        return (self.model in words and words.issuperset(self.required)
                and words.isdisjoint((*self.excluded, "MIG")))


# Dense tensor rates with FP32 accumulation (GeForce parts accumulate FP16 at twice that rate, which
# attention does not use), TF32 dense, FP32 without tensor cores, memory bandwidth.
_HOPPER = {"bfloat16": 989.4, "float16": 989.4, "tf32": 494.7, "float32": 66.9}
_AMPERE = {"bfloat16": 312.0, "float16": 312.0, "tf32": 156.0, "float32": 19.5}
DEVICE_PEAKS: tuple[DevicePeaks, ...] = (
    DevicePeaks("H100", _HOPPER, 3.35, required=("80GB", "HBM3")),  # SXM5; PCIe is HBM2e, NVL 94GB
    DevicePeaks("H200", _HOPPER, 4.8, excluded=("NVL",)),
    DevicePeaks("GH200", _HOPPER, 4.0, required=("480GB",)),  # the 96 GB HBM3 GPU, with 480 GB LPDDR5X
    DevicePeaks("GH200", _HOPPER, 4.0, required=("120GB",)),  # the same GPU, with 120 GB LPDDR5X
    DevicePeaks("GH200", _HOPPER, 4.9, required=("144G", "HBM3E")),
    DevicePeaks("B200", {"bfloat16": 2250.0, "float16": 2250.0, "tf32": 1100.0, "float32": 75.0}, 7.7),
    DevicePeaks("A100", _AMPERE, 2.039, required=("80GB",), excluded=("PCIE",)),
    DevicePeaks("A100", _AMPERE, 1.555, required=("40GB",), excluded=("PCIE",)),
    DevicePeaks("L40S", {"bfloat16": 362.05, "float16": 362.05, "tf32": 183.0, "float32": 91.6}, 0.864),
    DevicePeaks("4090", {"bfloat16": 165.2, "float16": 165.2, "tf32": 82.6, "float32": 82.6}, 1.008,
                required=("RTX",), excluded=("D", "LAPTOP")),  # the 4090 D and the laptop part differ
)


def device_peaks(device_name: str) -> DevicePeaks | None:
    """The datasheet row of a device part, or None (never a guess)."""
    return next((p for p in DEVICE_PEAKS if p.matches(device_name)), None)


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


@functools.cache
def git_commit(root: Path = Path(__file__).resolve().parent.parent) -> str | None:
    """The harness's own commit, when it runs from a git checkout, with "+dirty" when its code
    (bench/, variants/, pyproject.toml) differs from that commit or has new files: the row then names
    no exact source."""
    git = lambda *args: subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,  # noqa: E731
                                       timeout=5)
    try:
        head = git("rev-parse", "--short=12", "HEAD")
        if head.returncode != 0 or not head.stdout.strip():
            return None
        dirty = bool(git("status", "--porcelain", "--", "bench", "variants", "pyproject.toml").stdout.strip())
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("+dirty" if dirty else "")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: Device) -> dict[str, Any]:
    """Everything needed to tell two runs' machines apart; one dict, copied into every row."""
    return {
        **device.environment(),
        "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda,
        "triton_version": _version("triton"),
        "xformers_version": _version("xformers"),
        "python_version": platform.python_version(),
        "hostname": socket.gethostname(),
        "harness_version": bench.__version__,
        "git_commit": git_commit(),
        "cpu_threads": torch.get_num_threads(),
    }


def nvml_handle(pynvml: Any, index: int) -> Any:
    """NVML's handle of the GPU behind CUDA device ``index``, found by its UUID: CUDA numbers devices
    fastest first unless CUDA_DEVICE_ORDER says otherwise while NVML numbers them in PCI order, and
    CUDA_VISIBLE_DEVICES may reorder them, list UUIDs or name a MIG instance, so no index carries over.
    A MIG instance gives its parent GPU, whose clocks it runs at."""
    uuid = str(torch.cuda.get_device_properties(index).uuid)
    for prefix in ("GPU-", "MIG-"):
        try:
            handle = pynvml.nvmlDeviceGetHandleByUUID(prefix + uuid)
        except pynvml.NVMLError:
            continue
        if prefix == "MIG-":
            handle = pynvml.nvmlDeviceGetDeviceHandleFromMigDeviceHandle(handle)
        return handle
    raise LookupError(f"NVML knows no GPU or MIG instance with UUID {uuid}")


def nvml_clock_and_throttle(index: int) -> tuple[float | None, str | None]:
    """SM clock (MHz) and active throttle reasons of CUDA device ``index`` from NVML, where available."""
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = nvml_handle(pynvml, index)
        clock = float(pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM))
        mask = pynvml.nvmlDeviceGetCurrentClocksEventReasons(handle)
        names = [n for n in dir(pynvml) if n.startswith("nvmlClocksEventReason") and n != "nvmlClocksEventReasonNone"]
        reasons = [n.removeprefix("nvmlClocksEventReason") for n in names
                   if isinstance(getattr(pynvml, n), int) and mask & getattr(pynvml, n)
                   and "All" not in n and "GpuIdle" not in n and "ApplicationsClocksSetting" not in n]
        return clock, ",".join(sorted(reasons)) or None
    except Exception:  # NVML missing, not permitted, or no handle found: unknown, not zero
        return None, None
