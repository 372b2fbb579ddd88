"""Where a plan runs: here (``local``: one worker per visible GPU), on a Slurm cluster through
submitit (``slurm``), or through submitit's local executor (``submitit-local``: the same pickling
and job path on this machine, so it is tested without a cluster).

Every job runs :func:`run_shard` on its share of the points and writes its own parquet parts into
the shared run folder; ``bench run status`` reads progress from that folder alone, and
``--resume`` submits only the points that have no row yet.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from variants.registry import is_int_at_least

from .errors import BadInput
from .runner import RunnableTask, RunSpec, run_sweep
from .store import existing_keys, read_results


@dataclass(frozen=True)
class SlurmOptions:
    """Job settings: a ``[slurm]`` table in the spec file, overridden by command-line flags."""

    partition: str | None = None
    account: str | None = None
    time_min: int = 120
    gpus_per_node: int = 1  # one GPU per job: each job runs its points one after another
    cpus_per_task: int = 8
    shard_size: int = 64  # points per job

    @classmethod
    def from_table(cls, table: Mapping[str, Any], **flags: Any) -> SlurmOptions:
        known = {f.name for f in fields(cls)}
        for key in table:
            if key not in known:
                raise BadInput(f"unknown key slurm.{key} (valid: {', '.join(sorted(known))})")
        options = replace(cls(**table), **{k: v for k, v in flags.items() if v is not None})
        for name in ("time_min", "cpus_per_task", "shard_size"):
            value = getattr(options, name)
            if not is_int_at_least(value, 1):
                raise BadInput(f"slurm {name}={value!r} must be a positive integer")
        if not is_int_at_least(options.gpus_per_node, 0):
            raise BadInput(f"slurm gpus_per_node={options.gpus_per_node!r} must be a non-negative integer")
        return options


def shards(tasks: list[RunnableTask], size: int) -> list[list[RunnableTask]]:
    return [tasks[i: i + size] for i in range(0, len(tasks), size)]


def run_shard(spec: RunSpec, tasks: list[RunnableTask], results: str, run_id: str) -> dict[str, int]:
    """What one job runs: its points, resumably, into the shared run folder."""
    return dict(run_sweep(spec, tasks, Path(results), run_id, resume=True).counts)


def _slurm(folder: Path, options: SlurmOptions, device: str):
    import submitit

    executor = submitit.SlurmExecutor(folder=folder)
    executor.update_parameters(time=options.time_min, gpus_per_node=options.gpus_per_node,
                               cpus_per_task=options.cpus_per_task, ntasks_per_node=1,
                               **{k: v for k, v in (("partition", options.partition),
                                                    ("account", options.account)) if v})
    return executor


def _submitit_local(folder: Path, options: SlurmOptions, device: str):
    import submitit

    executor = submitit.LocalExecutor(folder=folder)
    executor.update_parameters(timeout_min=options.time_min,
                               gpus_per_node=options.gpus_per_node if device.startswith("cuda") else 0)
    return executor


EXECUTORS: dict[str, Callable[[Path, SlurmOptions, str], Any]] = {
    "slurm": _slurm,
    "submitit-local": _submitit_local,
}
EXECUTOR_NAMES = ("local", *EXECUTORS)


def submit(executor_name: str, spec: RunSpec, tasks: list[RunnableTask], results: Path, run_id: str,
           options: SlurmOptions, wait: bool) -> list[str]:
    """Submit the points that have no row yet, ``shard_size`` per job; returns the job ids."""
    directory = results / run_id
    done = existing_keys(directory)
    todo = [t for t in tasks if t.fields()["key"] not in done]
    if not todo:
        return []
    device = todo[0].point.device
    try:
        executor = EXECUTORS[executor_name](directory / "_jobs", options, device)
    except ImportError:
        raise BadInput(f"--executor {executor_name} needs submitit: pip install 'attnbench[slurm]'") from None
    jobs = [executor.submit(run_shard, spec, shard, str(results), run_id) for shard in shards(todo, options.shard_size)]
    record = directory / "_jobs.json"
    previous = json.loads(record.read_text()) if record.exists() else []
    record.write_text(json.dumps(previous + [{"executor": executor_name, "job_id": j.job_id, "points": len(s)}
                                             for j, s in zip(jobs, shards(todo, options.shard_size), strict=True)],
                                 indent=1))
    if wait:
        for job in jobs:
            job.result()
    return [str(j.job_id) for j in jobs]


@dataclass(frozen=True)
class RunStatus:
    planned: int
    counts: Counter  # status -> points with a row
    pending: list[str]  # labels of planned points without a row
    jobs: list[dict]

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "counts": dict(self.counts)}


def run_status(directory: Path) -> RunStatus:
    """Done / failed / pending points of a run, from its folder alone."""
    plan_file = directory / "_plan.json"
    if not plan_file.is_file():
        raise BadInput(f"{str(directory)!r} is not a run folder (no _plan.json): give a run id under --out")
    try:
        plan = json.loads(plan_file.read_text())
    except (OSError, ValueError) as exc:
        raise BadInput(f"{plan_file}: unreadable run plan ({exc})") from None
    if not isinstance(plan, dict):
        raise BadInput(f"{plan_file}: not a run plan (expected {{point key: label}})")
    rows = read_results([directory]) if any(directory.glob("*.parquet")) else None
    seen = {} if rows is None else dict(zip(rows["key"], rows["status"], strict=True))
    counts = Counter(status for key, status in seen.items() if key in plan)
    jobs_file = directory / "_jobs.json"
    jobs = json.loads(jobs_file.read_text()) if jobs_file.is_file() else []
    return RunStatus(len(plan), counts, [label for key, label in plan.items() if key not in seen], jobs)
