"""The training spec: a list of *studies*, each a small grid (variants × accumulation steps × layer
sharing × GELU form × seeds) on one task::

    [train]                      # run settings, and defaults for every study (lr, steps, variants,
    device = "auto"              # model, task_params, params, …)
    lr = 3e-3

    [[study]]
    name = "accumulation"
    task = "bytes"
    variants = ["standard/sdpa-math"]
    accum_steps = [1, 2, 4, 8]
    steps = 40
    batch = 32                   # effective batch B = micro-batch × accum_steps

    [study.model]                # ModelConfig fields: d_model, layers, heads, mlp_ratio
    layers = 4
    [study.task_params]          # task fields: seq_len, pairs, min_pairs, vocab (mqar) / seq_len (bytes)
    seq_len = 128
    [study.params.local]         # attention parameters, as in a kernel sweep
    window = 16
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from variants.registry import is_int_at_least

from ..errors import BadInput
from ..measure import MeasureSettings
from ..spec import SweepSpec, finite_number, read_toml
from ..spec import validate as validate_sweep
from .model import GELUS, SHARING, ModelConfig
from .tasks import TASKS, TaskData

MODEL_KEYS = {"d_model", "layers", "heads", "mlp_ratio"}


@dataclass(frozen=True)
class Study:
    name: str = "study"
    task: str = "mqar"
    variants: tuple[str, ...] = ()  # required: which attentions to train with
    accum_steps: tuple[int, ...] = (1,)
    sharing: tuple[str, ...] = ("unshared",)
    gelu: tuple[str, ...] = ("exact",)
    steps: int = 200
    batch: int = 64
    lr: float = 3e-3
    warmup: float = 0.05  # fraction of the steps over which the learning rate rises linearly to `lr`
    untie_at: float = 0.5  # fraction of the steps trained shared before an `untied` model unties
    eval_batches: int = 8
    model: dict[str, int] = field(default_factory=dict)
    task_params: dict[str, int] = field(default_factory=dict)
    params: dict[str, dict[str, int]] = field(default_factory=dict)

    def task_data(self) -> TaskData:
        """The study's task (its batches, vocabulary and sequence length) from its task_params."""
        return TASKS[self.task](**self.task_params)


@dataclass(frozen=True)
class TrainSpec:
    studies: tuple[Study, ...] = ()
    device: str = "auto"
    seeds: int = 1
    timeout_s: float = 1800.0
    keep_going: bool = False
    measure: MeasureSettings = field(default_factory=MeasureSettings)
    slurm: dict[str, Any] = field(default_factory=dict)  # job settings, see bench.executors.SlurmOptions

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


_STUDY_KEYS = {f.name for f in fields(Study)}
_STUDY_LIST_KEYS = {"variants", "accum_steps", "sharing", "gelu"}
# [train] holds run settings and defaults for every study; a study's own value (a whole table for
# model, task_params, params) replaces the default.
_RUN_KEYS = {"device", "seeds", "timeout_s"}
_DEFAULT_KEYS = _RUN_KEYS | {"lr", "warmup", "steps", "batch", "eval_batches", "untie_at", "variants", "model",
                             "task_params", "params"}


def load(preset: str | None, config: Path | None) -> TrainSpec:
    """The training spec from a packaged preset (default ``quick``) or a TOML file."""
    data, origin = read_toml(None if config else preset or "quick", config, folder="train")
    unknown = set(data) - {"train", "study", "slurm"}
    if unknown:
        raise BadInput(f"{origin}: unknown table {sorted(unknown)[0]!r} (valid: train, study, slurm)")
    defaults = data.get("train", {})
    for key in defaults:
        if key not in _DEFAULT_KEYS:
            raise BadInput(f"{origin}: unknown key train.{key} (valid: {', '.join(sorted(_DEFAULT_KEYS))})")
    studies = []
    tables = data.get("study", [])
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise BadInput(f"{origin}: write each study as a [[study]] table")
    study_defaults = _study_values({k: v for k, v in defaults.items() if k in _STUDY_KEYS}, origin, "train")
    for table in tables:
        for key in table:
            if key not in _STUDY_KEYS:
                raise BadInput(f"{origin}: unknown key study.{key} (valid: {', '.join(sorted(_STUDY_KEYS))})")
        try:
            studies.append(Study(**{**study_defaults, **_study_values(table, origin, "study")}))
        except TypeError as exc:
            raise BadInput(f"{origin}: {exc}") from None
    return TrainSpec(studies=tuple(studies), slurm=dict(data.get("slurm", {})),
                     **{k: v for k, v in defaults.items() if k in _RUN_KEYS})


def _study_values(table: dict[str, Any], origin: str, where: str) -> dict[str, Any]:
    """A study's values from TOML: its lists as tuples, refusing a scalar where a list belongs."""
    for key in _STUDY_LIST_KEYS & set(table):
        if not isinstance(table[key], list):
            raise BadInput(f"{origin}: {where}.{key} must be a list, got {table[key]!r}")
    return {k: tuple(v) if isinstance(v, list) else v for k, v in table.items()}


def override(spec: TrainSpec, device: str | None = None, seeds: int | None = None,
             timeout_s: float | None = None, only: tuple[str, ...] | None = None, **study_flags: Any) -> TrainSpec:
    """Command-line flags win over the file; `only` keeps the studies so named; study flags apply to
    every study kept."""
    names = [s.name for s in spec.studies]
    for name in only or ():
        if name not in names:
            raise BadInput(f"no study {name!r} in this spec (studies: {', '.join(names)})")
    given = {k: v for k, v in study_flags.items() if v is not None}
    studies = tuple(replace(s, **given) for s in spec.studies if not only or s.name in only)
    top = {k: v for k, v in {"device": device, "seeds": seeds, "timeout_s": timeout_s}.items() if v is not None}
    return replace(spec, studies=studies, **top)


def validate(spec: TrainSpec) -> TrainSpec:
    """Check everything a training run needs before anything is written; BadInput names the bad value."""
    if not spec.studies:
        raise BadInput("the training spec has no [[study]]")
    if not is_int_at_least(spec.seeds):
        raise BadInput(f"seeds: {spec.seeds!r} must be a positive integer")
    _check_names([s.name for s in spec.studies])
    for study in spec.studies:
        where = f"study {study.name!r}"
        _check_choices(study, where)
        _check_numbers(study, where)
        task, cfg = _check_model_and_task(study, where)
        # variant names, params, device and run settings through the kernel sweep's own checks
        validate_sweep(SweepSpec(variants=study.variants, seq_lens=(task.seq_len,), device=spec.device,
                                 head_dims=(cfg.head_dim,), params=study.params, timeout_s=spec.timeout_s,
                                 keep_going=spec.keep_going))
    return spec


def _check_names(names: list[Any]) -> None:
    for name in names:
        if not isinstance(name, str) or not name:
            raise BadInput(f"study name {name!r} must be a non-empty string")
        if names.count(name) > 1:  # rows and --study tell studies apart by name
            raise BadInput(f"study name {name!r} is used by {names.count(name)} studies")


def _check_choices(study: Study, where: str) -> None:
    """The task, layer sharings and GELU forms are ones this package knows."""
    for name, values, valid in (("task", (study.task,), TASKS), ("sharing", study.sharing, SHARING),
                                ("gelu", study.gelu, GELUS)):
        for value in values:
            if value not in valid:
                raise BadInput(f"{where}: unknown {name} {value!r} (valid: {', '.join(valid)})")


def _require_positive_int(where: str, name: str, value: Any) -> None:
    if not is_int_at_least(value):
        raise BadInput(f"{where}: {name}={value!r} must be a positive integer")


def _check_numbers(study: Study, where: str) -> None:
    """Step counts, batch and its accumulation divisors, learning rate and schedule fractions."""
    for name in ("steps", "batch", "eval_batches"):
        _require_positive_int(where, name, getattr(study, name))
    for k in study.accum_steps:
        if not is_int_at_least(k) or study.batch % k:
            raise BadInput(f"{where}: accum_steps={k!r} must be a positive divisor of batch={study.batch}")
    if not (finite_number(study.lr) and study.lr > 0):
        raise BadInput(f"{where}: lr={study.lr!r} must be a positive number")
    for name in ("warmup", "untie_at"):
        value = getattr(study, name)
        if not (finite_number(value) and 0 <= value <= 1):
            raise BadInput(f"{where}: {name}={value!r} must be a fraction of the steps in [0, 1]")


def _check_model_and_task(study: Study, where: str) -> tuple[TaskData, ModelConfig]:
    """The study's tables, and the task and model they build (returned for the sweep's checks)."""
    for name in ("model", "task_params", "params"):
        if not isinstance(getattr(study, name), dict):
            raise BadInput(f"{where}: {name}={getattr(study, name)!r} must be a table")
    bad = set(study.model) - MODEL_KEYS
    if bad:
        raise BadInput(f"{where}: unknown model key {sorted(bad)[0]!r} (valid: {', '.join(sorted(MODEL_KEYS))})")
    for key, value in {**study.model, **study.task_params}.items():
        if key != "mlp_ratio":  # ModelConfig checks it: 0 (attention-only) is valid
            _require_positive_int(where, key, value)
    try:
        task, cfg = study.task_data(), ModelConfig(**study.model)
    except (TypeError, ValueError) as exc:
        raise BadInput(f"{where}: {exc}") from None
    if cfg.d_model % cfg.heads:
        raise BadInput(f"{where}: d_model={cfg.d_model} is not a multiple of heads={cfg.heads}")
    if cfg.mlp_ratio == 0 and set(study.gelu) != {"exact"}:
        raise BadInput(f"{where}: gelu={','.join(study.gelu)} changes nothing in attention-only blocks (mlp_ratio=0)")
    return task, cfg
