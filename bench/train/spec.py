"""`bench run train`: training tricks measured on a tiny LM built from any registered attention.

A training spec is a list of *studies*, each a small grid (variants × accumulation steps × layer
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

Every grid point trains from the same seeded weights and data, so rows differ only in the trick.
"""

from __future__ import annotations

import itertools
import json
import math
import statistics
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch

import variants
from variants.model import GELUS, SHARING, ModelConfig, TinyLM, gelu_max_abs_error, token_loss_sum
from variants.registry import Point

from .errors import BadInput
from .measure import MeasureSettings, failure_row, peak_memory
from .spec import finite_number, read_toml
from .store import point_key
from .tasks import IGNORE, TASKS
from .timers import Call, percentile

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
    from .spec import SweepSpec
    from .spec import validate as validate_sweep

    if not spec.studies:
        raise BadInput("the training spec has no [[study]]")
    if isinstance(spec.seeds, bool) or not isinstance(spec.seeds, int) or spec.seeds < 1:
        raise BadInput(f"seeds: {spec.seeds!r} must be a positive integer")
    names = [s.name for s in spec.studies]
    for name in names:
        if not isinstance(name, str) or not name:
            raise BadInput(f"study name {name!r} must be a non-empty string")
        if names.count(name) > 1:  # rows and --study tell studies apart by name
            raise BadInput(f"study name {name!r} is used by {names.count(name)} studies")
    for s in spec.studies:
        where = f"study {s.name!r}"
        if s.task not in TASKS:
            raise BadInput(f"{where}: unknown task {s.task!r} (valid: {', '.join(TASKS)})")
        for value in s.sharing:
            if value not in SHARING:
                raise BadInput(f"{where}: unknown sharing {value!r} (valid: {', '.join(SHARING)})")
        for value in s.gelu:
            if value not in GELUS:
                raise BadInput(f"{where}: unknown gelu {value!r} (valid: {', '.join(GELUS)})")
        for name in ("steps", "batch", "eval_batches"):
            value = getattr(s, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise BadInput(f"{where}: {name}={value!r} must be a positive integer")
        for k in s.accum_steps:
            if isinstance(k, bool) or not isinstance(k, int) or k < 1 or s.batch % k:
                raise BadInput(f"{where}: accum_steps={k!r} must be a positive divisor of batch={s.batch}")
        if not (finite_number(s.lr) and s.lr > 0):
            raise BadInput(f"{where}: lr={s.lr!r} must be a positive number")
        for name in ("warmup", "untie_at"):
            value = getattr(s, name)
            if not (finite_number(value) and 0 <= value <= 1):
                raise BadInput(f"{where}: {name}={value!r} must be a fraction of the steps in [0, 1]")
        for name in ("model", "task_params", "params"):
            if not isinstance(getattr(s, name), dict):
                raise BadInput(f"{where}: {name}={getattr(s, name)!r} must be a table")
        bad = set(s.model) - MODEL_KEYS
        if bad:
            raise BadInput(f"{where}: unknown model key {sorted(bad)[0]!r} (valid: {', '.join(sorted(MODEL_KEYS))})")
        for key, value in {**s.model, **s.task_params}.items():
            if key == "mlp_ratio":  # ModelConfig checks it: 0 (attention-only) is valid
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise BadInput(f"{where}: {key}={value!r} must be a positive integer")
        try:
            task = TASKS[s.task](**s.task_params)
            cfg = ModelConfig(**s.model)
        except (TypeError, ValueError) as exc:
            raise BadInput(f"{where}: {exc}") from None
        if cfg.d_model % cfg.heads:
            raise BadInput(f"{where}: d_model={cfg.d_model} is not a multiple of heads={cfg.heads}")
        if cfg.mlp_ratio == 0 and set(s.gelu) != {"exact"}:
            raise BadInput(f"{where}: gelu={','.join(s.gelu)} changes nothing in attention-only blocks (mlp_ratio=0)")
        # variant names, params, device and run settings through the kernel sweep's own checks
        validate_sweep(SweepSpec(variants=s.variants, seq_lens=(task.seq_len,), device=spec.device,
                                 head_dims=(cfg.d_model // cfg.heads,), params=s.params, timeout_s=spec.timeout_s,
                                 keep_going=spec.keep_going))
    return spec


@dataclass(frozen=True)
class TrainTask:
    """One training run: a (variant, impl) in one study at one (accumulation, sharing, gelu, seed)."""

    variant: str
    impl: str
    family: str
    study: Study
    accum_steps: int
    sharing: str
    gelu: str
    seed: int
    point: Point  # the attention's own point (causal, device, dtype, shape per head)

    def config(self) -> ModelConfig:
        task = TASKS[self.study.task](**self.study.task_params)
        return ModelConfig(vocab=task.vocab, seq_len=task.seq_len, layer_sharing=self.sharing,
                           gelu=self.gelu, attn_params=dict(self.point.params), **self.study.model)

    def fields(self) -> dict[str, Any]:
        cfg = self.config()
        settings = {"study": self.study.name, "lr": self.study.lr, "warmup": self.study.warmup,
                    "untie_at": self.study.untie_at,
                    "model": {k: getattr(cfg, k) for k in sorted(MODEL_KEYS)},
                    "task": self.study.task_params, "attention": dict(self.point.params)}
        fields = {"kind": "train", "variant": self.variant, "impl": self.impl, "family": self.family,
                  "params": json.dumps(settings, sort_keys=True), "mode": "train", "causal": True,
                  "batch": self.study.batch, "heads": cfg.heads, "seq_len": cfg.seq_len,
                  "head_dim": cfg.d_model // cfg.heads, "dtype": "float32", "device": self.point.device,
                  "task": self.study.task, "steps": self.study.steps, "accum_steps": self.accum_steps,
                  "micro_batch": self.study.batch // self.accum_steps, "layer_sharing": self.sharing,
                  "gelu": self.gelu, "seed": self.seed}
        fields["key"] = point_key({**fields, "params": json.dumps(
            [fields["params"], self.accum_steps, self.sharing, self.gelu, self.seed])})
        return fields

    def label(self) -> str:
        return (f"{self.study.name}: {self.variant}/{self.impl} {self.study.task} k={self.accum_steps} "
                f"{self.sharing} gelu={self.gelu} seed={self.seed}")

    def group(self) -> tuple:
        return (self.study.name, self.variant, self.impl, self.sharing, self.gelu, self.seed)

    def execute(self, settings: MeasureSettings) -> dict[str, Any]:
        try:
            reasons = variants.get(self.variant, self.impl).not_supported_reasons(self.point)
            return {"status": "unsupported", "reason": "; ".join(reasons)} if reasons else train(self)
        except Exception as exc:  # a point's failure is a result, not a crash of the sweep
            return failure_row(exc)


def expand(spec: TrainSpec, device: str) -> list[TrainTask]:
    tasks = []
    for study in spec.studies:
        cfg = ModelConfig(**study.model)
        seq_len = TASKS[study.task](**study.task_params).seq_len
        entries = list({e.name: e for s in study.variants for e in variants.select(s)}.values())
        for entry, k, sharing, gelu, seed in itertools.product(entries, study.accum_steps, study.sharing,
                                                                study.gelu, range(spec.seeds)):
            point = Point(batch=study.batch // k, heads=cfg.heads, seq_len=seq_len,
                          head_dim=cfg.d_model // cfg.heads, dtype="float32", device=device, causal=True,
                          mode="fwd_bwd", params=entry.resolve_variant_params(study.params.get(entry.variant, {})))
            tasks.append(TrainTask(entry.variant, entry.impl, entry.family, study, k, sharing, gelu, seed, point))
    return tasks


# --- the training itself -------------------------------------------------------------------------

def accumulate_gradients(model: TinyLM, micro_batches: list[tuple[torch.Tensor, torch.Tensor]],
                         loss_fn=None) -> float:
    """Backward over k micro-batches into ``.grad``, the loss normalised by the *whole step's* token
    count (so k micro-batches give the k = 1 gradient). Returns the step's loss per token."""
    total_tokens = sum(int((labels != IGNORE).sum()) for _, labels in micro_batches)
    loss_fn = loss_fn or (lambda logits, labels: token_loss_sum(logits, labels)[0] / total_tokens)
    step_loss = 0.0
    for tokens, labels in micro_batches:
        scored = labels != IGNORE
        loss = loss_fn(model(tokens, scored), labels[scored])
        loss.backward()
        step_loss += loss.item()
    return step_loss


def flat_grad(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def gradient_rel_error(model: TinyLM, tokens: torch.Tensor, labels: torch.Tensor, k: int, loss_fn=None) -> float:
    """Relative error of the gradient accumulated over k micro-batches against one full batch."""
    model.zero_grad(set_to_none=True)
    accumulate_gradients(model, [(tokens, labels)])
    full = flat_grad(model).double()
    model.zero_grad(set_to_none=True)
    accumulate_gradients(model, list(zip(tokens.chunk(k), labels.chunk(k), strict=True)), loss_fn)
    split = flat_grad(model).double()
    model.zero_grad(set_to_none=True)
    return (torch.linalg.vector_norm(split - full) / torch.linalg.vector_norm(full)).item()


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def evaluate(model: TinyLM, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[float, float]:
    """(loss per scored token in nats, accuracy at scored positions)."""
    loss_sum, correct, count = 0.0, 0, 0
    with torch.no_grad():
        for tokens, labels in batches:
            scored = labels != IGNORE
            logits = model(tokens, scored)
            loss, n = token_loss_sum(logits, labels[scored])
            correct += int((logits.argmax(-1) == labels[scored]).sum())
            loss_sum, count = loss_sum + loss.item(), count + n
    return loss_sum / count, correct / count


def train(task: TrainTask) -> dict[str, Any]:
    study, device = task.study, task.point.device
    data = TASKS[study.task](**study.task_params)
    torch.manual_seed(task.seed)
    model = TinyLM(task.config(), variants.get(task.variant, task.impl)).to(device)
    to_device = lambda batch: tuple(t.to(device) for t in batch)  # noqa: E731
    # Its own generator: every k of a study then trains on exactly the same batches.
    check_batch = data.batch(study.batch, torch.Generator().manual_seed(task.seed + 1))
    grad_rel_err = (gradient_rel_error(model, *to_device(check_batch), task.accum_steps)
                    if task.accum_steps > 1 else 0.0)
    gen = torch.Generator().manual_seed(task.seed)
    # β2 = 0.95 (GPT-3's) and a warm-up: with β2 = 0.999 or no warm-up MQAR stays on its plateau longer
    make_optimizer = lambda: torch.optim.AdamW(model.parameters(), lr=study.lr, betas=(0.9, 0.95),  # noqa: E731
                                               weight_decay=0.0)
    warmup_steps = max(1, round(study.warmup * study.steps))
    optimizer = make_optimizer()
    untie_step = round(study.untie_at * study.steps) if task.sharing == "untied" else None

    def step(tokens: torch.Tensor, labels: torch.Tensor) -> None:
        accumulate_gradients(model, list(zip(tokens.chunk(task.accum_steps), labels.chunk(task.accum_steps),
                                             strict=True)))
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    times: list[float] = []
    peak = 0
    for i in range(study.steps):
        if i == untie_step:
            model.untie()
            optimizer = make_optimizer()  # the copies start with fresh optimizer state
        for group in optimizer.param_groups:
            group["lr"] = study.lr * min(1.0, (i + 1) / warmup_steps)
        batch = to_device(data.batch(study.batch, gen))  # data generation is not step time
        if i == study.steps - 1:  # the last step, untimed, gives the memory figure
            peak = peak_memory(Call(lambda batch=batch: step(*batch)), device)
            continue
        _sync(device)
        start = time.perf_counter()
        step(*batch)
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    loss, accuracy = evaluate(model, [to_device(b) for b in data.eval_batches(study.batch, study.eval_batches,
                                                                               task.seed)])
    measured = times[len(times) // 10:] or times or [float("nan")]  # first steps pay for allocation
    step_ms = statistics.median(measured)
    params = list(model.parameters())
    return {
        "status": "ok", "reason": None, "kernel": f"training step, attention {task.variant}/{task.impl}",
        "tokens_seen": study.steps * study.batch * data.seq_len, "final_loss": loss,
        "accuracy": accuracy if study.task == "mqar" else None,
        "bpb": loss / math.log(2) if study.task == "bytes" else None,
        "step_time_ms": step_ms, "time_ms": step_ms,
        "time_ms_p20": percentile(measured, 20), "time_ms_p80": percentile(measured, 80),
        "reps": len(measured), "tokens_per_s": study.batch * data.seq_len / (step_ms * 1e-3),
        "peak_mem_bytes": peak, "n_params": model.n_params(),
        "opt_state_bytes": sum(t.numel() * t.element_size() for s in optimizer.state.values()
                               for t in s.values() if torch.is_tensor(t)),
        "grad_bytes": sum(p.numel() * p.element_size() for p in params),
        "gelu_max_abs_err": gelu_max_abs_error(task.gelu), "grad_rel_err": grad_rel_err,
        "corpus": data.corpus,
    }
