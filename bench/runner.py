"""Runner: points run one after another in a worker process (one per visible GPU); the parent
writes each row as it lands.

A worker runs many points in a row (process start-up must not dominate), on one device object
(:mod:`bench.device`) that it opens once. When it dies (out of memory, segfault) or exceeds the
timeout, the point in flight is recorded and a fresh worker carries on with the rest; when its
device is poisoned (a failed CUDA graph capture, a CUDA fault) it sends its row and is replaced
before the next point. Between groups of points it releases what it cached for the last group.
"""

from __future__ import annotations

import datetime as dt
import json
import multiprocessing as mp
import os
import signal
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from variants.registry import Point

from .device import Device
from .measure import MeasureSettings
from .store import clean_temp_files, existing_keys, run_dir, write_rows

POLL_S = 0.2


def _worker(conn, settings: MeasureSettings, device_name: str, visible_gpu: str | None) -> None:
    """Worker loop: open the device, say hello with the environment, then measure each task sent
    until None, answering each with its row and why the device is poisoned (None: it is not)."""
    if visible_gpu is not None:  # read by CUDA at its first use, which is after this line
        os.environ["CUDA_VISIBLE_DEVICES"] = visible_gpu
    if settings.max_mem_gb:
        import resource

        import psutil

        # The budget is on top of what the worker holds after start-up (torch's own mappings).
        limit = psutil.Process().memory_info().vms + int(settings.max_mem_gb * (1 << 30))
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    from .device import open_device
    from .env import environment
    from .measure import release_caches

    device = open_device(device_name)
    conn.send(environment(device))
    group = None
    while (task := conn.recv()) is not None:
        if task.group() != group:
            release_caches()
            group = task.group()
        conn.send((task.execute(settings, device), device.poisoned))


@dataclass
class Worker:
    settings: MeasureSettings
    device: str
    visible_gpu: str | None = None
    process: Any = None
    conn: Any = None
    environment: dict[str, Any] = field(default_factory=dict)

    def start(self) -> None:
        ctx = mp.get_context("spawn")  # never fork a process that may hold a CUDA context
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_worker, args=(child, self.settings, self.device, self.visible_gpu),
                                   daemon=True)
        self.process.start()
        child.close()
        hello = self._receive(timeout=300)
        if hello is None:
            raise BrokenPipeError(f"worker exited during start-up (exit code {self.process.exitcode})")
        self.environment = hello

    def _receive(self, timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.conn.poll(POLL_S):
                try:
                    return self.conn.recv()
                except (EOFError, OSError):
                    return None
            if not self.process.is_alive():
                return None
        raise TimeoutError

    def run(self, task: RunnableTask, timeout: float) -> dict[str, Any]:
        """Measured columns of ``task``; a dead or hung worker becomes a row and is replaced."""
        try:
            if self.process is None or not self.process.is_alive():
                self.start()
            self.conn.send(task)
        except (TimeoutError, BrokenPipeError, OSError) as exc:
            self.stop(kill=True)
            return {"status": "error", "reason": f"worker failed to start or to take the point ({exc!r})"}
        try:
            result = self._receive(timeout)
        except TimeoutError:
            self.stop(kill=True)
            return {"status": "timeout", "reason": f"no result within {timeout:g} s; worker killed"}
        if result is None:
            return self._death_row()
        row, poisoned = result
        if poisoned:  # the row stands; the process must not measure another point
            self.stop(kill=True)
            row = {**row, "reason": "; ".join(filter(None, [row.get("reason"),
                                                            f"worker replaced after this point: {poisoned}"]))}
        return row

    def _death_row(self) -> dict[str, Any]:
        self.process.join(5)
        code = self.process.exitcode
        self.process = None
        if code == -signal.SIGKILL:
            return {"status": "oom", "reason": "worker killed by SIGKILL (most likely the kernel's "
                                               "out-of-memory killer)"}
        what = f"signal {signal.Signals(-code).name}" if code and code < 0 else f"exit code {code}"
        return {"status": "error", "reason": f"worker died with {what}"}

    def stop(self, kill: bool = False) -> None:
        if self.process is None:
            return
        if kill:
            self.process.kill()
        else:
            try:
                self.conn.send(None)
            except (BrokenPipeError, OSError):
                pass
        self.process.join(10)
        if self.process.is_alive():
            self.process.kill()
        self.process = None


@dataclass
class SweepResult:
    run_id: str
    directory: Path
    counts: Counter
    skipped_existing: int
    wall_s: float


class RunSpec(Protocol):
    """What the runner needs of a spec (a kernel sweep's or a training sweep's)."""

    measure: MeasureSettings
    timeout_s: float
    keep_going: bool

    def to_json(self) -> dict[str, Any]: ...


class RunnableTask(Protocol):
    point: Point

    def fields(self) -> dict[str, Any]: ...
    def execute(self, settings: MeasureSettings, device: Device | None = None) -> dict[str, Any]: ...
    def group(self) -> tuple: ...
    def label(self) -> str: ...


def at_least_as_large(point: Point, failed: Point) -> bool:
    """Whether ``point`` needs at least the memory of ``failed``, a point of its group that ran out:
    no shorter, and no fewer tokens (a larger batch of shorter sequences, or a batch that shrinks as
    n grows under FlashAttention's convention, is decided by the tokens)."""
    return point.seq_len >= failed.seq_len and point.batch * point.seq_len >= failed.batch * failed.seq_len


def visible_gpus(device: str) -> list[str | None]:
    """One worker per visible GPU when the device is plain ``cuda``; else one worker, as given."""
    if device != "cuda":
        return [None]
    import torch

    count = torch.cuda.device_count()
    listed = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return (listed or [str(i) for i in range(count)])[:count] or [None]


def write_manifest(directory: Path, spec: RunSpec, tasks: list[RunnableTask]) -> None:
    """The run's spec and every planned point, so `bench run status` needs nothing but the folder."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "_spec.json").write_text(json.dumps(spec.to_json(), indent=1, default=str))
    plan = {t.fields()["key"]: t.label() for t in tasks}
    (directory / "_plan.json").write_text(json.dumps(plan, indent=0))


def run_sweep(spec: RunSpec, tasks: list[RunnableTask], results: Path, run_id: str, resume: bool,
              progress: Callable[[RunnableTask, dict | None], None] = lambda task, row: None) -> SweepResult:
    """Run every task not yet in ``results/run_id``, one part file per point, on one worker per
    visible GPU (one worker on CPU)."""
    directory = run_dir(results, run_id)
    directory.mkdir(parents=True, exist_ok=True)
    clean_temp_files(directory)
    done = existing_keys(directory) if resume else set()
    todo = [t for t in tasks if t.fields()["key"] not in done]
    queue = deque(todo)
    failed_groups: dict[tuple, Point] = {}  # group -> its first point that ran out of memory
    counts: Counter = Counter()
    lock = threading.Lock()

    def drain(worker: Worker) -> None:
        try:
            while True:
                with lock:
                    if not queue:
                        return
                    task = queue.popleft()
                    failed = failed_groups.get(task.group()) if not spec.keep_going else None
                skip = failed is not None and at_least_as_large(task.point, failed)
                progress(task, None)
                measured = ({"status": "skipped", "reason": f"a smaller point of this group ran out of memory "
                                                            f"(n={failed.seq_len}, b={failed.batch}); --keep-going "
                                                            f"tries it"}
                            if skip else worker.run(task, spec.timeout_s))
                fields = task.fields()
                row = {**worker.environment, **fields, **measured, "run_id": run_id,
                       "ts": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")}
                write_rows(directory, [row], stem=fields["key"])
                with lock:
                    if measured["status"] == "oom":
                        failed_groups.setdefault(task.group(), task.point)
                    counts[measured["status"]] += 1
                progress(task, row)
        finally:
            worker.stop()

    started = time.perf_counter()
    device = todo[0].point.device if todo else "cpu"
    workers = [Worker(spec.measure, device, gpu) for gpu in visible_gpus(device)]
    threads = [threading.Thread(target=drain, args=(w,), daemon=True) for w in workers[1:]]
    for thread in threads:
        thread.start()
    drain(workers[0])
    for thread in threads:
        thread.join()
    return SweepResult(run_id, directory, counts, len(tasks) - len(todo), time.perf_counter() - started)


def default_run_id(device: str) -> str:
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return f"{stamp}-{device.replace(':', '')}-{os.getpid()}"
