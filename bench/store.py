"""The results store: one tidy parquet table, one row per point, versioned schema.

A run is a folder ``<results>/<run-id>/`` of part files written atomically (temp file + rename),
so ``pandas.read_parquet(run_dir)`` reads the whole run and a killed sweep loses at most the
point in flight. Temp files start with a dot, which parquet readers ignore.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd
import psutil
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import BadInput

SCHEMA_VERSION = 4

# Columns of a point's identity: two rows with the same key measured the same thing.
KEY_COLUMNS = ("kind", "variant", "impl", "params", "mode", "causal", "batch", "heads", "seq_len",
               "head_dim", "dtype", "device")

_S, _I, _F, _B = pa.string(), pa.int64(), pa.float64(), pa.bool_()
COLUMNS: dict[str, pa.DataType] = {
    # identity
    "schema_version": pa.int32(), "run_id": _S, "ts": _S, "kind": _S, "key": _S,
    "variant": _S, "impl": _S, "family": _S, "params": _S, "kernel": _S,
    # point
    "mode": _S, "causal": _B, "batch": _I, "heads": _I, "seq_len": _I, "head_dim": _I, "dtype": _S,
    "device": _S,
    # grouped-query heads and the layout of a batch: dense, packed (documents packed into rows),
    # padded (the same documents one per row, padded); a packed or padded point's document
    # distribution, documents per row, seed and every document's length (JSON list)
    "kv_heads": _I, "layout": _S, "doc_distribution": _S, "doc_count": _I, "doc_seed": _I, "doc_lengths": _S,
    # outcome
    "status": _S, "reason": _S,
    # timing (ms) — median, 20th and 80th percentiles over `reps` repetitions
    "time_ms": _F, "time_ms_p20": _F, "time_ms_p80": _F, "reps": _I, "spread": _F, "noisy": _B,
    "setup_ms": _F,
    # how time_ms was taken (perf_counter, cuda-events, cuda-graph), the host time to enqueue one call
    # and whether that is not below the device time (the GPU would wait on Python)
    "timer": _S, "host_ms": _F, "launch_bound": _B,
    # memory (bytes)
    "peak_mem_bytes": _I, "input_bytes": _I,
    # decoding (mode "decode"): new tokens per step against a cache of seq_len, what the cache holds,
    # the analytic bytes one step reads and writes, and that traffic per second
    "q_len": _I, "cache_bytes": _I, "bytes_moved": _I, "gbps": _F, "pct_bandwidth": _F,
    # work; tf32: whether float32 matmuls on CUDA were allowed TF32 (pct_peak is then against TF32's peak)
    "flops": _F, "tflops": _F, "pct_peak": _F, "tf32": _B,
    # quality: output against the float64 reference and exact softmax; worst of dq, dk, dv (bwd, fwd_bwd)
    "err_ref": _F, "err_softmax": _F, "err_grad": _F,
    # training tricks (kind == "train")
    "task": _S, "steps": _I, "tokens_seen": _I, "final_loss": _F, "accuracy": _F, "bpb": _F,
    "step_time_ms": _F, "tokens_per_s": _F, "n_params": _I, "opt_state_bytes": _I, "grad_bytes": _I,
    "accum_steps": _I, "micro_batch": _I, "layer_sharing": _S, "gelu": _S, "gelu_max_abs_err": _F,
    "grad_rel_err": _F, "seed": _I, "corpus": _S,
    # the training loss, per window of steps (JSON list; schema 4)
    "loss_curve": _S,
    # environment
    "device_name": _S, "device_capability": _S, "driver": _S, "sm_clock_mhz": _F, "throttle": _S,
    "torch_version": _S, "cuda_version": _S, "triton_version": _S, "xformers_version": _S,
    "python_version": _S, "hostname": _S, "harness_version": _S, "git_commit": _S, "cpu_threads": _I,
}
SCHEMA = pa.schema([pa.field(name, dtype) for name, dtype in COLUMNS.items()],
                   metadata={b"attnbench_schema_version": str(SCHEMA_VERSION).encode()})
STATUSES = ("ok", "oom", "unsupported", "incorrect", "error", "timeout", "skipped")

_HOST = re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname())
RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


# Key columns added in schema 3, in the key only where a point sets them apart from the earlier default
# (so earlier runs keep their keys): fewer kv_heads than heads, a layout other than dense with its
# documents.
_LATER_KEYS = ("kv_heads", "layout", "doc_distribution", "doc_count", "doc_seed")


def point_key(fields: Mapping[str, Any]) -> str:
    """Stable identity of a point: a short hash of its key columns, of ``q_len`` where it is set
    (decode points) and of those of :data:`_LATER_KEYS` it sets apart from their earlier default."""
    values = [fields.get(c) for c in KEY_COLUMNS]
    if fields.get("q_len") is not None:
        values.append(fields["q_len"])
    defaults = {"kv_heads": fields.get("heads"), "layout": "dense"}
    values += [[name, fields[name]] for name in _LATER_KEYS
               if fields.get(name) is not None and fields[name] != defaults.get(name)]
    text = json.dumps(values, sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def run_dir(results: Path, run_id: str) -> Path:
    """``results/run_id``; a run id that is not a plain name (``../x``, ``a/b``) is refused."""
    if not RUN_ID.match(run_id) or run_id in {".", ".."}:
        raise BadInput(f"invalid run id {run_id!r}: use letters, digits, '.', '_' and '-' "
                       "(no path separators), starting with a letter or digit")
    if results.exists() and not results.is_dir():
        raise BadInput(f"results path {str(results)!r} is a file, not a folder")
    return results / run_id


def _table(rows: Iterable[Mapping[str, Any]]) -> pa.Table:
    rows = list(rows)
    unknown = {k for row in rows for k in row} - set(COLUMNS)
    if unknown:
        raise ValueError(f"row has columns outside the schema: {sorted(unknown)}")
    columns = {name: [row.get(name) for row in rows] for name in COLUMNS}
    columns["schema_version"] = [SCHEMA_VERSION] * len(rows)
    return pa.table(columns, schema=SCHEMA)


def write_rows(directory: Path, rows: Iterable[Mapping[str, Any]], stem: str = "part") -> Path:
    """Write rows as one new part file, atomically: a reader never sees half a file."""
    table = _table(rows)
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"{stem}-{uuid.uuid4().hex[:12]}.parquet"
    tmp = directory / f".{_HOST}-{os.getpid()}.{final.name}.tmp"  # who writes it: see clean_temp_files
    pq.write_table(table, tmp)
    os.replace(tmp, final)
    return final


def clean_temp_files(directory: Path) -> int:
    """Remove temp files that killed writers of *this host* left behind (their process is gone); a
    sweep sharing the folder, here or on another node of a cluster, keeps its file in flight.
    Returns how many were removed."""
    removed = 0
    for path in directory.glob(f".{_HOST}-*.tmp") if directory.is_dir() else []:
        pid = path.name[len(_HOST) + 2:].split(".", 1)[0]
        if pid.isdigit() and psutil.pid_exists(int(pid)):
            continue
        path.unlink(missing_ok=True)
        removed += 1
    return removed


def _part_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if path.is_dir():
        return sorted(p for p in path.rglob("*.parquet") if not p.name.startswith((".", "_")))
    raise BadInput(f"results path {str(path)!r} does not exist")


def read_results(paths: Iterable[Path | str]) -> pd.DataFrame:
    """Rows of every run folder or parquet file given; refuses a schema it does not understand."""
    frames = []
    for path in map(Path, paths):
        for part in _part_files(path):
            try:
                table = pq.read_table(part)
            except (pa.ArrowInvalid, OSError) as exc:
                raise BadInput(f"{part}: not a readable parquet file ({exc})") from None
            versions = set(table.column("schema_version").to_pylist()) if "schema_version" in \
                table.column_names else set()
            if not versions or not all(isinstance(v, int) for v in versions):
                raise BadInput(f"{part}: rows without an integer schema_version: not an attnbench results file")
            if max(versions) > SCHEMA_VERSION:
                raise BadInput(f"{part}: schema version {max(versions)} is newer than this attnbench "
                               f"understands ({SCHEMA_VERSION}); upgrade attnbench to read it")
            frames.append(table.to_pandas())
    if not frames:
        raise BadInput(f"no results found in {', '.join(map(str, paths))}")
    frame = pd.concat(frames, ignore_index=True)
    return frame.reindex(columns=list(COLUMNS) + [c for c in frame.columns if c not in COLUMNS])


def existing_keys(directory: Path) -> set[str]:
    """Keys already measured in a run folder (for --resume)."""
    if not directory.is_dir() or not _part_files(directory):
        return set()
    return set(read_results([directory])["key"].dropna())


def newest_run(results: Path) -> Path:
    runs = [p for p in results.iterdir() if p.is_dir() and _part_files(p)] if results.is_dir() else []
    if not runs:
        raise BadInput(f"no runs under {str(results)!r}: run `bench run sweep` first or name a results path")
    return max(runs, key=lambda p: max(f.stat().st_mtime for f in _part_files(p)))
