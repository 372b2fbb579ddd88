"""One training run: the TrainTask a runner executes for each grid point, the loop that trains its
TinyLM, and what is measured on the way (step time, peak memory, the gradient accumulation check).

Every grid point trains from the same seeded weights and data, so rows differ only in the trick.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

import variants
from variants.registry import Point

from ..device import Device, open_device
from ..measure import MeasureSettings, failure_row
from ..store import point_key
from ..timers import Call, percentile
from .model import ModelConfig, TinyLM, gelu_max_abs_error, token_loss_sum
from .spec import MODEL_KEYS, Study, TrainSpec
from .tasks import IGNORE, TaskData

Batch = tuple[torch.Tensor, torch.Tensor]  # (tokens, labels), label IGNORE = not scored
CURVE_POINTS = 30  # values of a run's stored training curve (loss_curve)
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (logits at scored positions, labels) -> loss


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
        task = self.study.task_data()
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
                  "head_dim": cfg.head_dim, "dtype": "float32", "device": self.point.device,
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

    def execute(self, settings: MeasureSettings, device: Device | None = None) -> dict[str, Any]:
        """Measured columns of this run on ``device`` (the worker's; default: the point's)."""
        try:
            reasons = variants.get(self.variant, self.impl).not_supported_reasons(self.point)
            if reasons:
                return {"status": "unsupported", "reason": "; ".join(reasons)}
            return train(self, device or open_device(self.point.device))
        except Exception as exc:  # a point's failure is a result, not a crash of the sweep
            return failure_row(exc)


def expand(spec: TrainSpec, device: str) -> list[TrainTask]:
    """One TrainTask per study × (variant, impl) × accumulation × sharing × gelu × seed."""
    tasks = []
    for study in spec.studies:
        cfg = ModelConfig(**study.model)
        seq_len = study.task_data().seq_len
        entries = list({e.name: e for s in study.variants for e in variants.select(s)}.values())
        for entry, k, sharing, gelu, seed in itertools.product(entries, study.accum_steps, study.sharing,
                                                                study.gelu, range(spec.seeds)):
            point = Point(batch=study.batch // k, heads=cfg.heads, seq_len=seq_len, head_dim=cfg.head_dim,
                          dtype="float32", device=device, causal=True, mode="fwd_bwd",
                          params=entry.resolve_variant_params(study.params.get(entry.variant, {})))
            tasks.append(TrainTask(entry.variant, entry.impl, entry.family, study, k, sharing, gelu, seed, point))
    return tasks


# --- gradient accumulation -----------------------------------------------------------------------

def split_batch(tokens: torch.Tensor, labels: torch.Tensor, k: int) -> list[Batch]:
    """The batch as k micro-batches (along the batch dimension)."""
    return list(zip(tokens.chunk(k), labels.chunk(k), strict=True))


def accumulate_gradients(model: TinyLM, micro_batches: list[Batch], loss_fn: LossFn | None = None) -> float:
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


def gradient_rel_error(model: TinyLM, tokens: torch.Tensor, labels: torch.Tensor, k: int,
                       loss_fn: LossFn | None = None) -> float:
    """Relative error of the gradient accumulated over k micro-batches against one full batch (what
    to expect: docs/published-figures.md, "Gradient accumulation check")."""
    model.zero_grad(set_to_none=True)
    accumulate_gradients(model, [(tokens, labels)])
    full = flat_grad(model).double()
    model.zero_grad(set_to_none=True)
    accumulate_gradients(model, split_batch(tokens, labels, k), loss_fn)
    split = flat_grad(model).double()
    model.zero_grad(set_to_none=True)
    return (torch.linalg.vector_norm(split - full) / torch.linalg.vector_norm(full)).item()


def accumulation_check(model: TinyLM, data: TaskData, task: TrainTask) -> float:
    """The run's ``grad_rel_err``, on the untrained model (0 without accumulation)."""
    if task.accum_steps == 1:
        return 0.0
    # Its own generator: every k of a study then trains on exactly the same batches.
    batch = data.batch(task.study.batch, torch.Generator().manual_seed(task.seed + 1))
    return gradient_rel_error(model, *to_device(batch, next(model.parameters()).device), task.accum_steps)


# --- the training itself -------------------------------------------------------------------------

def to_device(batch: Batch, device: torch.device) -> Batch:
    tokens, labels = batch
    return tokens.to(device), labels.to(device)


def evaluate(model: TinyLM, batches: list[Batch]) -> tuple[float, float]:
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


def make_optimizer(model: TinyLM, lr: float) -> torch.optim.AdamW:
    # β2 = 0.95 (GPT-3's) and a warm-up: with β2 = 0.999 or no warm-up MQAR stays on its plateau longer
    return torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)


def optimizer_step(model: TinyLM, optimizer: torch.optim.Optimizer, batch: Batch, k: int) -> float:
    """One step on `batch`, its gradient accumulated over k micro-batches and clipped to norm 1; the
    step's training loss per scored token."""
    loss = accumulate_gradients(model, split_batch(*batch, k))
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


def logged_step(losses: list[float], *step: Any) -> None:
    """:func:`optimizer_step` whose loss is appended to `losses` (timed calls return nothing)."""
    losses.append(optimizer_step(*step))


def timed_ms(run: Callable[[], None], device: Device) -> float:
    """Wall time of `run` in milliseconds, the device's queued work included."""
    device.synchronize()
    start = time.perf_counter()
    run()
    device.synchronize()
    return (time.perf_counter() - start) * 1e3


def loss_curve(losses: list[float], points: int = CURVE_POINTS) -> list[float]:
    """The mean of each successive window of ``⌈len/points⌉`` step losses (the last window may be
    shorter): a training curve of at most `points` values, whatever the steps."""
    width = max(1, math.ceil(len(losses) / points))
    return [statistics.fmean(losses[i:i + width]) for i in range(0, len(losses), width)]


def fit(model: TinyLM, data: TaskData, task: TrainTask,
        device: Device) -> tuple[torch.optim.Optimizer, list[float], int, list[float]]:
    """Train for the study's steps: the last optimizer (its state is measured), the times of every
    step but the last in ms, the last step's peak memory in bytes, and every step's training loss."""
    study = task.study
    gen = torch.Generator().manual_seed(task.seed)
    warmup_steps = max(1, round(study.warmup * study.steps))
    untie_step = round(study.untie_at * study.steps) if task.sharing == "untied" else None
    optimizer = make_optimizer(model, study.lr)
    times: list[float] = []
    losses: list[float] = []
    peak = 0
    for i in range(study.steps):
        if i == untie_step:
            model.untie()
            optimizer = make_optimizer(model, study.lr)  # the copies start with fresh optimizer state
        for group in optimizer.param_groups:
            group["lr"] = study.lr * min(1.0, (i + 1) / warmup_steps)
        batch = to_device(data.batch(study.batch, gen), device.tensors)  # data generation is not step time
        step = functools.partial(logged_step, losses, model, optimizer, batch, task.accum_steps)
        if i == study.steps - 1:  # the last step, untimed, gives the memory figure
            peak = device.peak_memory(Call(step))
        else:
            times.append(timed_ms(step, device))
    return optimizer, times, peak, losses


def step_time_columns(times: list[float], tokens_per_step: int) -> dict[str, Any]:
    """Median and spread of the step times, the first tenth left out: first steps pay for allocation."""
    measured = times[len(times) // 10:] or times or [float("nan")]
    step_ms = statistics.median(measured)
    return {"step_time_ms": step_ms, "time_ms": step_ms, "time_ms_p20": percentile(measured, 20),
            "time_ms_p80": percentile(measured, 80), "reps": len(measured),
            "tokens_per_s": tokens_per_step / (step_ms * 1e-3)}


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def train(task: TrainTask, device: Device) -> dict[str, Any]:
    """The measured columns of one training run: quality on held-out data, step time and memory."""
    study = task.study
    data = study.task_data()
    torch.manual_seed(task.seed)  # the same initial weights for every trick of a seed
    model = TinyLM(task.config(), variants.get(task.variant, task.impl)).to(device.tensors)
    grad_rel_err = accumulation_check(model, data, task)
    optimizer, times, peak, losses = fit(model, data, task, device)
    held_out = data.eval_batches(study.batch, study.eval_batches, task.seed)
    loss, accuracy = evaluate(model, [to_device(b, device.tensors) for b in held_out])
    opt_state = (t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t))
    return {
        "status": "ok", "reason": None, "kernel": f"training step, attention {task.variant}/{task.impl}",
        "tokens_seen": study.steps * study.batch * data.seq_len, "final_loss": loss,
        "accuracy": accuracy if study.task == "mqar" else None, "loss_curve": json.dumps(loss_curve(losses)),
        "bpb": loss / math.log(2) if study.task == "bytes" else None,
        **step_time_columns(times, study.batch * data.seq_len),
        "peak_mem_bytes": peak, "n_params": model.n_params(), "opt_state_bytes": tensor_bytes(opt_state),
        "grad_bytes": tensor_bytes(model.parameters()),
        "gelu_max_abs_err": gelu_max_abs_error(task.gelu), "grad_rel_err": grad_rel_err,
        "corpus": data.corpus,
    }
