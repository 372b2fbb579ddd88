"""The ``bench`` command line. Bad input exits with code 2 and one message naming the bad value."""

from __future__ import annotations

import functools
import json
import logging
import sys
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from variants.registry import condense

from .errors import BadInput

# xformers warns at import when its C++ extension was built for another torch; which operator
# really runs is recorded per row (`kernel`), so the import-time banner is noise here.
logging.getLogger("xformers").setLevel(logging.ERROR)

app = typer.Typer(no_args_is_help=True, add_completion=False, rich_markup_mode=None,
                  help="attnbench: benchmark and profile attention variants on your own hardware.")
run_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None, help="Run a sweep of kernel points or training tricks.")
app.add_typer(run_app, name="run")

out = Console()
err = Console(stderr=True)


def bad_input_exits_2(fn):
    """Turn BadInput into exit code 2 with one line on stderr (nothing has been written by then)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except BadInput as exc:
            err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper


# Options shared by `run sweep` and `run train`: where the plan runs.
ExecutorOpt = Annotated[str, typer.Option(
    help="local (this machine, one worker per visible GPU), slurm (submitit), submitit-local.")]
ShardSizeOpt = Annotated[int | None, typer.Option(help="Points per job (slurm, submitit-local).")]
PartitionOpt = Annotated[str | None, typer.Option(help="Slurm partition.")]
AccountOpt = Annotated[str | None, typer.Option(help="Slurm account.")]
TimeMinOpt = Annotated[int | None, typer.Option(help="Job time limit, minutes.")]
GpusOpt = Annotated[int | None, typer.Option(help="GPUs per job (default 1).")]
WaitOpt = Annotated[bool, typer.Option(help="Wait for the jobs to finish (submitit-local always waits).")]


# --- bench list ----------------------------------------------------------------------------------

@app.command("list")
@bad_input_exits_2
def list_command(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    device: Annotated[str, typer.Option(help="Device to check availability on: auto, cpu, cuda.")] = "auto",
    dtype: Annotated[str, typer.Option(help="Dtype to check availability for.")] = "float32",
) -> None:
    """Every registered (variant, impl), its family and parameters, whether it runs here (non-causal,
    causal, decode) and whether it runs grouped-query heads, packed and padded documents, and why not."""
    import variants

    from .env import resolve_device
    from .spec import validate_device_and_dtype

    validate_device_and_dtype(device, dtype)
    device = resolve_device(device)
    listing = [_listing(entry, device, dtype) for entry in variants.entries()]
    if as_json:
        print(json.dumps(listing, indent=1))
        return
    table = Table(title=f"attention variants on {device} ({dtype})")
    for column in ("variant/impl", "family", "params", "runs", "shapes", "summary / why not"):
        table.add_column(column, overflow="fold")
    for item in listing:
        params = ", ".join(f"{k}={v}" for k, v in item["params"].items())
        runs = ", ".join(item["masking"] + ["decode"] * item["decode"]) if item["available"] else "[red]no[/]"
        shapes = ", ".join(name for name, shape in item["shapes"].items() if shape["runs"]) if item["available"] \
            else ", ".join(item["declared"]) + " (declared)" if item["declared"] else "—"
        not_run = "; ".join(f"{name}: {shape['reason']}" for name, shape in item["shapes"].items()
                            if not shape["runs"] and shape["reason"])
        why = escape(item["summary"]) if item["available"] else f"[red]{escape(item['reason'])}[/]"
        if item["available"] and not_run:
            why += f"\n[yellow]{escape(condense(not_run, 200))}[/]"
        table.add_row(escape(f"{item['variant']}/{item['impl']}"), item["family"], escape(params), runs,
                      escape(shapes), why)
    Console(width=max(out.width, 140)).print(table)  # six columns stay readable in a pipe's 80


# The shapes `bench list` reports beside the plain one: grouped-query heads, each document layout.
_SHAPES = {"gqa": {"heads": 4, "kv_heads": 1}, "packed": {"layout": "packed"}, "padded": {"layout": "padded"}}


def _listing(entry, device: str, dtype: str) -> dict:
    """One entry's row of `bench list`: where it runs, the shapes it runs there, and why not."""
    import variants

    def reasons(causal: bool, **shape) -> str | None:
        documents = variants.Documents() if shape.get("layout") else None
        point = variants.Point(device=device, dtype=dtype, causal=causal, params=entry.resolve(), documents=documents,
                               **shape)
        return "; ".join(entry.not_supported_reasons(point)) or None

    plain = {"causal" if causal else "non-causal": reasons(causal) for causal in (False, True)}
    runnable = [k for k, r in plain.items() if r is None]
    distinct = set(plain.values())
    # One reason for both maskings is said once (the xformers build mismatch, a missing package).
    reason = None if runnable else distinct.pop() if len(distinct) == 1 else "; ".join(f"{k}: {r}" for k, r in plain.items())
    shapes = {}
    for name, shape in _SHAPES.items():
        found = {masking: reasons(masking == "causal", **shape) for masking in runnable}
        why = "; ".join(dict.fromkeys(r for r in found.values() if r))
        shapes[name] = {"runs": [m for m, r in found.items() if r is None], "reason": why or None}
    decode = variants.Point(device=device, dtype=dtype, causal=True, mode=variants.DECODE, params=entry.resolve())
    return {"variant": entry.variant, "impl": entry.impl, "family": entry.family, "params": dict(entry.params),
            "available": bool(runnable), "masking": runnable, "decode": not entry.not_supported_reasons(decode),
            "shapes": shapes, "declared": [name for name, shape in _SHAPES.items() if _declares(entry, **shape)],
            "reason": reason, "summary": entry.summary}


def _declares(entry, heads: int = 1, kv_heads: int | None = None, layout: str = "dense") -> bool:
    """Whether the entry declares a shape (what `bench list` says where the entry does not run at all)."""
    return (kv_heads is None or entry.caps.gqa) and layout in entry.caps.layouts


# --- bench run sweep -----------------------------------------------------------------------------

@run_app.command("sweep")
@bad_input_exits_2
def sweep_command(
    preset: Annotated[str | None, typer.Option(help="Packaged preset: quick, gpu, gpu-slice, model-shapes, shapes, scaling, sparse, decode, frontier.")] = None,
    config: Annotated[Path | None, typer.Option(help="A TOML spec file (see README).")] = None,
    variants_: Annotated[str | None, typer.Option("--variants", help="Comma list: variant or variant/impl.")] = None,
    seq_lens: Annotated[str | None, typer.Option(help="Comma list of sequence lengths.")] = None,
    batch_sizes: Annotated[str | None, typer.Option(help="Comma list of batch sizes.")] = None,
    heads: Annotated[str | None, typer.Option(help="Number of (query) heads (comma list allowed).")] = None,
    kv_heads: Annotated[str | None, typer.Option(help="Comma list of key/value head counts (grouped-query "
                                                 "attention; 1 = multi-query). Default: as many as heads.")] = None,
    gqa_ratio: Annotated[str | None, typer.Option(help="Comma list of heads // kv_heads, instead of --kv-heads.")] = None,
    head_dim: Annotated[str | None, typer.Option(help="Head dim (comma list allowed).")] = None,
    dtype: Annotated[str | None, typer.Option(help="float32, float16, bfloat16 or float64 (comma list).")] = None,
    modes: Annotated[str | None, typer.Option(help="Comma list of fwd, bwd, fwd_bwd, decode.")] = None,
    layouts: Annotated[str | None, typer.Option(help="Comma list of dense, packed (documents packed into rows; "
                                                "decoding: a ragged batch), padded (the same documents one per "
                                                "row, padded to the longest).")] = None,
    doc_dist: Annotated[str | None, typer.Option(help="Document lengths: equal, uniform, multinomial.")] = None,
    docs_per_row: Annotated[int | None, typer.Option(help="Documents packed into each row.")] = None,
    doc_seed: Annotated[int | None, typer.Option(help="Seed of the document lengths.")] = None,
    causal: Annotated[bool | None, typer.Option("--causal/--no-causal", help="Causal masking only / never.")] = None,
    q_len: Annotated[int | None, typer.Option(help="decode: new tokens per step against a cache of each "
                                              "sequence length (default 1).")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu or cuda.")] = None,
    out_dir: Annotated[Path, typer.Option("--out", help="Results folder.")] = Path("results"),
    run_id: Annotated[str | None, typer.Option(help="Run id (default: time-based, printed).")] = None,
    resume: Annotated[bool, typer.Option(help="Skip points of --run-id that already have a row.")] = False,
    timeout_s: Annotated[float | None, typer.Option(help="Seconds one point may take before it is killed.")] = None,
    keep_going: Annotated[bool, typer.Option(help="Try larger points of a group after one ran out of memory.")] = False,
    max_mem_gb: Annotated[float | None, typer.Option(help="Memory the worker may take beyond start-up (CPU), GiB.")] = None,
    cuda_graph: Annotated[bool, typer.Option("--cuda-graph", help="Time the replay of a captured CUDA graph "
                                             "(launch overhead left out) where capture works.")] = False,
    executor: ExecutorOpt = "local", shard_size: ShardSizeOpt = None, partition: PartitionOpt = None,
    account: AccountOpt = None, time_min: TimeMinOpt = None, gpus_per_node: GpusOpt = None, wait: WaitOpt = False,
    profile_top: Annotated[int, typer.Option(help="Afterwards, profile the K slowest points (local executor).")] = 0,
    profile_dir: Annotated[Path, typer.Option(help="Where --profile-top writes its profiles.")] = Path("profiles"),
) -> None:
    """Measure a grid of points (variant × shape × dtype × mode); rows land in OUT/RUN_ID/ as parquet."""
    from . import plan
    from . import spec as specs

    spec = specs.load(preset, config)
    spec = specs.override(
        spec, variants=specs.parse_list(variants_, "variants"), seq_lens=specs.parse_list(seq_lens, "seq-lens", int),
        batch_sizes=specs.parse_list(batch_sizes, "batch-sizes", int), heads=specs.parse_list(heads, "heads", int),
        head_dims=specs.parse_list(head_dim, "head-dim", int), dtypes=specs.parse_list(dtype, "dtype"),
        modes=specs.parse_list(modes, "modes"), causal=None if causal is None else (causal,), device=device,
        timeout_s=timeout_s, keep_going=keep_going or None, q_len=q_len,
        kv_heads=specs.parse_list(kv_heads, "kv-heads", int), gqa_ratios=specs.parse_list(gqa_ratio, "gqa-ratio", int),
        layouts=specs.parse_list(layouts, "layouts"),
        documents={"distribution": doc_dist, "count": docs_per_row, "seed": doc_seed})
    if max_mem_gb is not None:
        spec = replace(spec, measure=replace(spec.measure, max_mem_gb=max_mem_gb))
    if cuda_graph:
        spec = replace(spec, measure=replace(spec.measure, cuda_graph=True))
    specs.validate(spec)
    device_name, run_id, jobs = _run_setup(spec, run_id, resume, out_dir, executor, shard_size, partition,
                                           account, time_min, gpus_per_node)
    _check_cuda_graph(spec.measure.cuda_graph, device_name)
    if profile_top < 0 or (profile_top and jobs is not None):
        raise BadInput(f"--profile-top {profile_top}: give K >= 0, with the local executor")
    tasks = plan.expand(spec, device_name)
    _launch(spec, tasks, out_dir, run_id, resume, executor, jobs, wait)
    if profile_top:
        _profile_slowest(spec, tasks, out_dir, run_id, profile_top, profile_dir)


def _profile_slowest(spec, tasks, out_dir: Path, run_id: str, k: int, profile_dir: Path) -> None:
    from .profile import profile_slowest
    from .store import read_results, run_dir

    directory = run_dir(out_dir, run_id)
    profiles = profile_slowest(tasks, read_results([directory]), k, profile_dir, directory, spec.timeout_s,
                               spec.measure.cuda_graph)
    err.print(f"profiles of the {len(profiles)} slowest points: {profile_dir}/ (listed in {directory}/_profiles.json)")


# --- bench run train -----------------------------------------------------------------------------

@run_app.command("train")
@bad_input_exits_2
def train_command(
    preset: Annotated[str | None, typer.Option(help="Packaged train preset: quick (CPU), recall (CPU, every family on MQAR), gpu.")] = None,
    config: Annotated[Path | None, typer.Option(help="A TOML training spec (see bench/train/spec.py).")] = None,
    study: Annotated[str | None, typer.Option(help="Comma list: run only these studies of the spec.")] = None,
    variants_: Annotated[str | None, typer.Option("--variants", help="Comma list: attention variant[/impl].")] = None,
    task: Annotated[str | None, typer.Option(help="mqar or bytes.")] = None,
    accum_steps: Annotated[str | None, typer.Option(help="Comma list of gradient accumulation steps k.")] = None,
    sharing: Annotated[str | None, typer.Option(help="Comma list of unshared, shared, untied.")] = None,
    gelu: Annotated[str | None, typer.Option(help="Comma list of exact, tanh, sigmoid.")] = None,
    steps: Annotated[int | None, typer.Option(help="Optimizer steps per run.")] = None,
    seeds: Annotated[int | None, typer.Option(help="Seeds per grid point (mean ± std in the report).")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu or cuda.")] = None,
    out_dir: Annotated[Path, typer.Option("--out", help="Results folder.")] = Path("results"),
    run_id: Annotated[str | None, typer.Option(help="Run id (default: time-based, printed).")] = None,
    resume: Annotated[bool, typer.Option(help="Skip points of --run-id that already have a row.")] = False,
    timeout_s: Annotated[float | None, typer.Option(help="Seconds one training run may take.")] = None,
    executor: ExecutorOpt = "local", shard_size: ShardSizeOpt = None, partition: PartitionOpt = None,
    account: AccountOpt = None, time_min: TimeMinOpt = None, gpus_per_node: GpusOpt = None, wait: WaitOpt = False,
) -> None:
    """Train a tiny LM built from each attention: accumulation, layer sharing, GELU forms, task quality."""
    from . import spec as specs
    from . import train

    spec = train.override(
        train.load(preset, config), device=device, seeds=seeds, timeout_s=timeout_s,
        only=specs.parse_list(study, "study"), variants=specs.parse_list(variants_, "variants"), task=task,
        accum_steps=specs.parse_list(accum_steps, "accum-steps", int), sharing=specs.parse_list(sharing, "sharing"),
        gelu=specs.parse_list(gelu, "gelu"), steps=steps)
    train.validate(spec)
    device_name, run_id, jobs = _run_setup(spec, run_id, resume, out_dir, executor, shard_size, partition,
                                           account, time_min, gpus_per_node)
    _launch(spec, train.expand(spec, device_name), out_dir, run_id, resume, executor, jobs, wait)


def _run_setup(spec, run_id: str | None, resume: bool, out_dir: Path, executor: str, *job_flags):
    """Where a run goes and as what, checked before anything is written: its device, its id, the job
    settings of a submitit executor (None for local)."""
    from .env import resolve_device
    from .runner import default_run_id

    if resume and not run_id:
        raise BadInput("--resume needs the --run-id of the run to finish")
    device_name = resolve_device(spec.device)
    run_id = run_id or default_run_id(device_name)
    jobs = _job_options(executor, spec, *job_flags)
    _refuse_existing_run(out_dir, run_id, resume)
    return device_name, run_id, jobs


def _job_options(executor: str, spec, shard_size, partition, account, time_min, gpus_per_node):
    """Validated job settings for a submitit executor (None for local), before anything is written."""
    from .executors import EXECUTOR_NAMES, SlurmOptions

    if executor not in EXECUTOR_NAMES:
        raise BadInput(f"unknown executor {executor!r} (valid: {', '.join(EXECUTOR_NAMES)})")
    if executor == "local":
        return None
    return SlurmOptions.from_table(spec.slurm, shard_size=shard_size, partition=partition, account=account,
                                   time_min=time_min, gpus_per_node=gpus_per_node)


def _launch(spec, tasks, out_dir: Path, run_id: str, resume: bool, executor: str, jobs, wait: bool) -> None:
    from .executors import submit
    from .runner import write_manifest
    from .store import run_dir

    write_manifest(run_dir(out_dir, run_id), spec, tasks)
    where = tasks[0].point.device if tasks else "?"
    err.print(f"run [bold]{run_id}[/]: {len(tasks)} points on {where} ({executor}) -> {out_dir / run_id}")
    if jobs is None:
        _print_summary(_run_with_progress(spec, tasks, out_dir, run_id, resume))
        return
    ids = submit(executor, spec, tasks, out_dir, run_id, jobs, wait=wait or executor == "submitit-local")
    err.print(f"{len(ids)} job(s): {', '.join(ids) or 'none (every point already has a row)'}")
    err.print(f"progress: bench run status {run_id} --out {out_dir}")
    print(out_dir / run_id)


@run_app.command("status")
@bad_input_exits_2
def status_command(
    run_id: Annotated[str, typer.Argument(help="The run id (a folder under --out).")],
    out_dir: Annotated[Path, typer.Option("--out", help="Results folder.")] = Path("results"),
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Done, failed and pending points of a run (local or submitted), read from its folder alone."""
    from .executors import run_status
    from .store import run_dir

    status = run_status(run_dir(out_dir, run_id))
    if as_json:
        print(json.dumps(status.to_json(), indent=1))
        return
    table = Table(title=f"run {run_id}: {status.planned} planned points")
    table.add_column("state")
    table.add_column("points", justify="right")
    for state, count in sorted(status.counts.items()):
        table.add_row(state, str(count))
    table.add_row("pending (no row yet)", str(len(status.pending)))
    out.print(table)
    for label in status.pending[:20]:
        out.print(f"  pending: {label}", highlight=False)
    if status.jobs:
        out.print(f"jobs: {', '.join(str(j['job_id']) for j in status.jobs)}")


def _refuse_existing_run(out_dir: Path, run_id: str, resume: bool) -> None:
    from .store import run_dir

    directory = run_dir(out_dir, run_id)
    if directory.exists() and not resume and any(directory.iterdir()):
        raise BadInput(f"run {run_id!r} already exists in {str(out_dir)!r}: use --resume or another --run-id")


def _run_with_progress(spec, tasks, out_dir: Path, run_id: str, resume: bool):
    from .runner import run_sweep

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("ETA"), TimeRemainingColumn(), TextColumn("{task.fields[current]}"))
    with Progress(*columns, console=err) as bar:
        job = bar.add_task("sweep", total=len(tasks), current="")

        def progress(task, row):
            if row is None:
                bar.update(job, current=task.label())
            else:
                bar.advance(job)

        result = run_sweep(spec, tasks, out_dir, run_id, resume, progress)
        bar.update(job, completed=len(tasks), current="done")
    return result


def _print_summary(result) -> None:
    table = Table(title=f"run {result.run_id} ({result.wall_s:.1f} s)")
    table.add_column("status")
    table.add_column("points", justify="right")
    for status, count in sorted(result.counts.items()):
        table.add_row(status, str(count))
    if result.skipped_existing:
        table.add_row("already done (resume)", str(result.skipped_existing))
    err.print(table)
    err.print(f"rows: {result.directory}  (pandas.read_parquet({str(result.directory)!r}))")
    print(result.directory)


# --- bench profile -------------------------------------------------------------------------------

def _parse_params(items: list[str]) -> dict[str, int]:
    """``["window=128"]`` -> ``{"window": 128}``; BadInput names the item that does not parse."""
    params = {}
    for item in items:
        key, sep, value = item.partition("=")
        try:
            if not sep or not key.strip():
                raise ValueError
            params[key.strip()] = int(value)
        except ValueError:
            raise BadInput(f"--param {item!r}: expected name=integer, e.g. window=128") from None
    return params


@app.command("profile")
@bad_input_exits_2
def profile_command(
    variant: Annotated[str, typer.Argument(
        metavar="VARIANT[/IMPL]",
        help="VARIANT/IMPL profiles that impl (exit 2 with the reason if it cannot run the point here). "
             "VARIANT alone profiles each of its impls that can run the point here, one folder each, "
             "and lists the others with their reason.")],
    seq_len: Annotated[int, typer.Option(help="Sequence length.")] = 2048,
    batch_size: Annotated[int, typer.Option(help="Batch size.")] = 1,
    heads: Annotated[int, typer.Option(help="Number of heads.")] = 4,
    head_dim: Annotated[int, typer.Option(help="Head dim.")] = 64,
    dtype: Annotated[str, typer.Option(help="float32, float16, bfloat16 or float64.")] = "float32",
    mode: Annotated[str, typer.Option(help="fwd, bwd, fwd_bwd or decode.")] = "fwd",
    causal: Annotated[bool, typer.Option("--causal/--no-causal", help="Causal masking (decode always is).")] = False,
    q_len: Annotated[int, typer.Option(help="decode: new tokens per step against a cache of --seq-len.")] = 1,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    out_dir: Annotated[Path, typer.Option("--out", help="Profiles folder; each point gets "
                                          "OUT/<variant>-<impl>-<shape>/.")] = Path("profiles"),
    param: Annotated[list[str] | None, typer.Option(help="A variant parameter, name=value (repeatable).")] = None,
    steps: Annotated[int, typer.Option(min=1, help="Profiled steps (after the warm-up).")] = 5,
    top: Annotated[int, typer.Option(min=1, help="Rows of the printed table (kernels.csv has all).")] = 10,
    cuda_graph: Annotated[bool, typer.Option("--cuda-graph", help="Time (and profile) the replay of a captured "
                                             "CUDA graph where capture works.")] = False,
) -> None:
    """Profile one point into OUT/<variant>-<impl>-<shape>/: trace.json (Perfetto, chrome://tracing),
    kernels.csv (its top rows printed, its total checked against the timed median), summary.json and,
    on CUDA, memory.pickle and memory.html (PyTorch's memory_viz)."""
    from variants.registry import DECODE

    from . import plan
    from . import spec as specs
    from .env import resolve_device
    from .profile import PROFILE_SETTINGS, PointFailed, profile_point

    if q_len != 1 and mode != DECODE:
        raise BadInput(f"--q-len {q_len} applies to --mode decode, not {mode}")
    selector = variant.strip()
    params = _parse_params(param or [])
    spec = specs.validate(specs.SweepSpec(
        variants=(selector,), seq_lens=(seq_len,), batch_sizes=(batch_size,), heads=heads, head_dims=(head_dim,),
        dtypes=(dtype,), modes=(mode,), causal=(causal,), device=device, decode=specs.DecodeGrid(q_len=q_len),
        params={selector.partition("/")[0]: params} if params else {}))
    if out_dir.exists() and not out_dir.is_dir():
        raise BadInput(f"--out {str(out_dir)!r} is a file")
    _check_cuda_graph(cuda_graph, resolve_device(spec.device))
    settings = replace(PROFILE_SETTINGS, cuda_graph=cuda_graph)
    runnable = _runnable(plan.expand(spec, resolve_device(spec.device)), named_impl="/" in selector)
    failed = False
    for task in runnable:
        err.print(f"profiling {task.label()}", highlight=False)
        try:
            summary = profile_point(task, out_dir, steps=steps, top=top, settings=settings)
        except PointFailed as exc:
            err.print(f"[bold red]failed:[/] {exc}", highlight=False)
            failed = True
            continue
        _print_profile(summary)
    if failed:
        raise typer.Exit(1)


def _runnable(tasks: list, named_impl: bool) -> list:
    """The tasks whose entry can run their point here; the others are listed as skipped. Checked
    before anything runs: a named impl that cannot run, or a variant none of whose impls can, is bad
    input."""
    import variants

    runnable, skipped = [], []
    for task in tasks:
        reason = "; ".join(variants.get(task.variant, task.impl).not_supported_reasons(task.point))
        (skipped if reason else runnable).append((task, reason))
    if skipped and (named_impl or not runnable):
        raise BadInput("; ".join(f"{t.name} cannot run this point: {r}" for t, r in skipped))
    for task, reason in skipped:
        err.print(f"[yellow]skipped[/] {task.name}: {reason}", highlight=False)
    return [task for task, _ in runnable]


def _print_profile(summary: dict) -> None:
    profile, agreement = summary["profile"], summary["agreement"]
    cuda = summary["point"]["device"].startswith("cuda")
    table = Table(title=f"{summary['variant']}/{summary['impl']} {Path(summary['directory']).name}: "
                        f"top {len(summary['top_kernels'])} of {profile['rows']} by self "
                        f"{'device' if cuda else 'CPU'} time, per step ({profile['steps']} steps)")
    table.add_column("kernel" if cuda else "operator", overflow="fold")
    for column in ("calls/step", "ms/step", "share"):
        table.add_column(column, justify="right")
    shown = 0.0
    for row in summary["top_kernels"]:
        shown += row["self_ms_per_step"]
        table.add_row(row["name"], f"{row['calls_per_step']:g}", f"{row['self_ms_per_step']:.3f}",
                      f"{100 * row['share']:.1f}%")
    total = profile["table_ms_per_step_mean"]
    if profile["rows"] > len(summary["top_kernels"]):
        rest = total - shown
        table.add_row(f"({profile['rows'] - len(summary['top_kernels'])} more rows)", "",
                      f"{rest:.3f}", f"{100 * rest / total:.1f}%" if total else "")
    table.add_row(f"total (mean of {profile['steps']} steps)", "", f"{total:.3f}", "100.0%", style="bold")
    out.print(table)
    measured = summary["measured"]
    verdict = "within" if agreement["within"] else "[yellow]outside[/]"
    why = ""  # the likely reason for a disagreement, so that nobody hunts a bug that is not there
    if not agreement["within"]:
        why = (" (device time leaves out idle gaps between kernels)" if cuda and agreement["ratio"] < 1
               else f" (the timing is noisy: p80/p20 = {measured['time_ms_p80'] / measured['time_ms_p20']:.2f})"
               if measured["noisy"] else "")
    out.print(f"agreement: table {agreement['table_ms_per_step']:.3f} ms/step (median step) vs timed median "
              f"{agreement['measured_median_ms']:.3f} ms (p20-p80 {measured['time_ms_p20']:.3f}-"
              f"{measured['time_ms_p80']:.3f}, {measured['reps']} reps) -> {agreement['ratio']:.3f}x, "
              f"{verdict} {100 * agreement['tolerance']:.0f}%{why}", highlight=False)
    out.print(f"coverage: the table accounts for {100 * agreement['coverage']:.1f}% of the profiled steps' own "
              f"timed duration (median step {agreement['profiled_step_median_ms']:.3f} ms)", highlight=False)
    files = ", ".join(f for f in summary["files"].values() if f)
    err.print(f"wrote {summary['directory']}: {files}", highlight=False)
    print(summary["directory"])


# --- bench doctor --------------------------------------------------------------------------------

@app.command("doctor")
@bad_input_exits_2
def doctor_command(
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    cuda_graph: Annotated[bool, typer.Option("--cuda-graph", help="Time CUDA graph replays, as a sweep "
                                             "with --cuda-graph does.")] = False,
) -> None:
    """Check the harness's timer against an independent one (triton do_bench on CUDA, torch.utils.benchmark
    on CPU) on a fixed set of points. Exit code 1 when a ratio falls outside the bounds (0.97-1.03 on CUDA,
    0.9-1.1 on CPU) or the device is not usable here."""
    import torch

    from .doctor import run_doctor
    from .env import resolve_device
    from .spec import check_device_name

    check_device_name(device)
    device = resolve_device(device)
    if device.startswith("cuda") and not torch.cuda.is_available():
        err.print(f"[bold red]device {device} is not usable:[/] no CUDA device is visible to torch "
                  f"{torch.__version__}", highlight=False)
        raise typer.Exit(1)
    _check_cuda_graph(cuda_graph, device)
    report = run_doctor(device, cuda_graph, progress=lambda probe: err.print(f"doctor: {probe.label}",
                                                                              highlight=False))
    if as_json:
        print(json.dumps(report.to_json(), indent=1))
    else:
        _print_doctor(report)
    if not report.healthy:
        raise typer.Exit(1)


def _print_doctor(report) -> None:
    low, high = report.bounds
    independent = "do_bench" if report.device.startswith("cuda") else "blocked_autorange"
    table = Table(title=f"timer check on {report.device}: harness ÷ {independent}, median of the pairs' "
                        f"ratios, within {low:g}-{high:g}", box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("entry", overflow="fold")
    table.add_column("mode")
    for column in ("harness ms", "indep. ms", "ratio", "p80/p20"):
        table.add_column(column, justify="right", no_wrap=True)
    for v in report.verdicts:
        p = v.probe.point
        mode = p.mode + (" causal" if p.causal else "")
        if v.skipped:
            table.add_row(escape(v.probe.entry), mode, "", "", "skipped", "")
            continue
        ratio = f"{v.ratio:.3f}" if v.within(report.bounds) else f"[bold red]{v.ratio:.3f}[/]"
        table.add_row(escape(v.probe.entry), mode, f"{v.harness_ms:.4g}", f"{v.independent_ms:.4g}", ratio,
                      f"{v.spread:.2f}")
    Console(width=max(out.width, 100)).print(table)  # the entry names stay whole in a pipe's 80 columns
    for v in report.verdicts:
        if v.skipped:
            out.print(f"skipped {escape(v.probe.label)}: {escape(v.skipped)}", highlight=False)
    out.print("healthy" if report.healthy else "[bold red]the timer disagrees (or nothing could be measured)[/]")


def _check_cuda_graph(cuda_graph: bool, device: str) -> None:
    if cuda_graph and not device.startswith("cuda"):
        raise BadInput(f"--cuda-graph needs a CUDA device (the device here is {device!r})")


# --- bench report html / bench compare -----------------------------------------------------------

report_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None, help="Turn results into a report to read and share.")
app.add_typer(report_app, name="report")


@report_app.command("html")
@bad_input_exits_2
def report_html_command(
    results: Annotated[list[Path] | None, typer.Argument(
        help="Run folders or parquet files (default: the newest run under results/).", show_default=False)] = None,
    output: Annotated[Path | None, typer.Option("-o", "--output", help="HTML file to write (default: "
                                                "reports/<run-id>.html).", show_default=False)] = None,
    baseline: Annotated[str | None, typer.Option(help="Compare against this variant/impl (or unique impl) "
                                                 "instead of the best of the baseline family.")] = None,
) -> None:
    """One self-contained HTML page comparing every variant against the baselines."""
    import time

    from .report import write_report
    from .store import newest_run

    started = time.perf_counter()
    written = write_report(results or [newest_run(Path("results"))], output, baseline)
    err.print(f"report: {written} ({written.stat().st_size / 1024:,.0f} KiB, "
              f"{time.perf_counter() - started:.1f} s)", highlight=False, markup=False)
    print(written)


@app.command("compare")
@bad_input_exits_2
def compare_command(
    old: Annotated[Path, typer.Argument(help="The earlier run: a run folder or parquet file.")],
    new: Annotated[Path, typer.Argument(help="The later run: a run folder or parquet file.")],
    threshold: Annotated[float, typer.Option(help="Relative change below which a point is unchanged.")] = 0.05,
    fmt: Annotated[str, typer.Option("--format", help="table, json or markdown.")] = "table",
) -> None:
    """What got faster/slower/leaner/heavier between two runs (ratios NEW/OLD, per point).

    Exit code 1 on a regression: a point slower or heavier beyond the threshold (and, for time,
    outside the p20-p80 noise), or ok before and not now; 2 on bad input."""
    from . import compare

    compare.check_format(fmt)
    result = compare.compare(old, new, threshold)
    if fmt == "table":
        out.print(compare.to_table(result))
    else:
        print(compare.to_json(result) if fmt == "json" else compare.to_markdown(result))
    if result.regression:
        raise typer.Exit(1)


def main() -> None:  # pragma: no cover - console entry point
    app(prog_name="bench")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
