"""Provenance of a run (the "machine block" of every row) and the table of device peaks."""

from __future__ import annotations

import functools
import importlib.metadata
import os
import platform
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import bench


@dataclass(frozen=True)
class DevicePeaks:
    """Datasheet peaks of one device part (docs/published-figures.md, "Device peaks"): its name holds
    every word of ``words`` and none of ``excluded`` (the PCIe and NVL parts of a model have other
    clocks and memories, so they match no row and get no figure)."""

    words: tuple[str, ...]
    excluded: tuple[str, ...]
    tflops: dict[str, float]  # dense (no 2:4 sparsity); float32 without TF32, which attnbench leaves off
    bandwidth_tbps: float

    def matches(self, device_name: str) -> bool:
        name = device_name.upper()
        return all(w in name for w in self.words) and not any(w in name for w in self.excluded)


_HOPPER = {"bfloat16": 989.4, "float16": 989.4, "float32": 66.9}
_AMPERE = {"bfloat16": 312.0, "float16": 312.0, "float32": 19.5}
DEVICE_PEAKS: tuple[DevicePeaks, ...] = (
    DevicePeaks(("H200",), ("NVL",), _HOPPER, 4.8),
    DevicePeaks(("H100",), ("PCIE", "NVL"), _HOPPER, 3.35),
    DevicePeaks(("A100", "80GB"), ("PCIE",), _AMPERE, 2.04),
    DevicePeaks(("A100", "40GB"), ("PCIE",), _AMPERE, 1.555),
)


def _peaks(device_name: str) -> DevicePeaks | None:
    return next((p for p in DEVICE_PEAKS if p.matches(device_name)), None)


def peak_tflops(device_name: str, dtype: str) -> float | None:
    """The datasheet compute peak of a device in the table, else None (never a guess)."""
    peaks = _peaks(device_name)
    return peaks.tflops.get(dtype) if peaks else None


def peak_bandwidth(device_name: str) -> float | None:
    """The datasheet memory bandwidth (TB/s) of a device in the table, else None (never a guess)."""
    peaks = _peaks(device_name)
    return peaks.bandwidth_tbps if peaks else None


def device_name(device: str) -> str:
    """The CUDA device's name ("" on CPU: no peak applies)."""
    return torch.cuda.get_device_name(device) if device.startswith("cuda") else ""


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


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@functools.cache
def environment(device: str) -> dict[str, Any]:
    """Everything needed to tell two runs' machines apart; one dict, copied into every row."""
    cuda = device.startswith("cuda")
    props = torch.cuda.get_device_properties(device) if cuda else None
    return {
        "device_name": props.name if props else _cpu_name(),
        "device_capability": f"{props.major}.{props.minor}" if props else None,
        "driver": _nvidia_driver() if cuda else None,
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


def _nvidia_driver() -> str | None:
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml.nvmlSystemGetDriverVersion()
    except Exception:  # pynvml absent or NVML unavailable: the driver is simply unknown
        return None


def clock_and_throttle(device: str) -> tuple[float | None, str | None]:
    """SM clock (MHz) and active throttle reasons from NVML, where available (CUDA only)."""
    if not device.startswith("cuda"):
        return None, None
    try:
        import pynvml

        pynvml.nvmlInit()
        index = torch.device(device).index or 0
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if visible:
            index = int(visible.split(",")[index])
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        clock = float(pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM))
        mask = pynvml.nvmlDeviceGetCurrentClocksEventReasons(handle)
        names = [n for n in dir(pynvml) if n.startswith("nvmlClocksEventReason") and n != "nvmlClocksEventReasonNone"]
        reasons = [n.removeprefix("nvmlClocksEventReason") for n in names
                   if isinstance(getattr(pynvml, n), int) and mask & getattr(pynvml, n)
                   and "All" not in n and "GpuIdle" not in n and "ApplicationsClocksSetting" not in n]
        return clock, ",".join(sorted(reasons)) or None
    except Exception:  # NVML missing or not permitted: unknown, not zero
        return None, None
