"""Plan: the spec's cartesian grid expanded into points, each with a stable key."""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import variants
from variants import layouts
from variants.layouts import DENSE
from variants.registry import DECODE, Point

from .device import Device
from .measure import MeasureSettings
from .spec import SweepSpec, heads_of, kv_heads_of, slices_of
from .store import point_key


@dataclass(frozen=True)
class Task:
    """One point of one (variant, impl): what a worker measures and what a row is keyed by."""

    variant: str
    impl: str
    family: str
    point: Point

    @property
    def name(self) -> str:
        return f"{self.variant}/{self.impl}"

    def fields(self) -> dict[str, Any]:
        """The identity and point columns of this task's row."""
        p = self.point
        fields = {"kind": "kernel", "variant": self.variant, "impl": self.impl, "family": self.family,
                  "params": json.dumps(dict(p.params), sort_keys=True), "mode": p.mode,
                  "causal": p.causal, "batch": p.batch, "heads": p.heads, "seq_len": p.seq_len,
                  "head_dim": p.head_dim, "dtype": p.dtype, "device": p.device,
                  "q_len": p.q_len if p.mode == DECODE else None, "kv_heads": p.n_kv_heads,
                  "layout": p.layout, **document_columns(p)}
        fields["key"] = point_key(fields)
        return fields

    def label(self) -> str:
        p = self.point
        new = f" q={p.q_len}" if p.mode == DECODE else ""
        kv = f" kv={p.n_kv_heads}" if p.grouped else ""
        layout = ""
        if p.layout != DENSE:  # decoding, a serving batch: one sequence each, its cache length drawn
            documents = p.documents.distribution + ("" if p.mode == DECODE else f"×{p.documents.count}")
            layout = f" {p.layout}({documents})"
        return (f"{self.name} {p.mode}{' causal' if p.causal else ''} b={p.batch} h={p.heads}{kv} "
                f"n={p.seq_len}{new} d={p.head_dim} {p.dtype}{layout}")

    def execute(self, settings: MeasureSettings, device: Device | None = None) -> dict[str, Any]:
        """Measured columns of this point on ``device`` (the worker's; default: the point's)."""
        from .measure import measure

        return measure(variants.get(self.variant, self.impl), self.point, settings, device)

    def group(self) -> tuple:
        """Points that differ only in size: after an OOM, larger ones of the group are skipped."""
        p = self.point
        return (self.name, json.dumps(dict(p.params), sort_keys=True), p.mode, p.causal, p.head_dim,
                p.dtype, p.device, p.q_len, p.n_kv_heads, p.layout, p.documents)


def document_columns(point: Point) -> dict[str, Any]:
    """A packed or padded point's documents: distribution, count, seed and every sequence's length."""
    if point.layout == DENSE:
        return {}
    documents = point.documents
    return {"doc_distribution": documents.distribution, "doc_count": documents.count, "doc_seed": documents.seed,
            "doc_lengths": json.dumps(layouts.sequences(point))}


def _shapes(spec: SweepSpec, head_dim: int, layout_kinds: tuple[str, ...]) -> list[tuple[int, int | None, str]]:
    """(heads, kv_heads, layout) of every shape of the grid at ``head_dim``."""
    return [(heads, kv_heads, layout) for heads in heads_of(spec, head_dim) for kv_heads in kv_heads_of(spec, heads)
            for layout in layout_kinds]


def _grid(spec: SweepSpec, selectors: tuple[str, ...], modes_causal: list[tuple[str, bool]],
          seq_lens: tuple[int, ...], batches_at: Callable[[int], tuple[int, ...]], layout_kinds: tuple[str, ...],
          device: str) -> list[Task]:
    """Every (entry × (mode, causal) × dtype × head_dim × heads × kv_heads × layout × seq_len × batch)
    point, sizes ascending within a group so an OOM is met at the smallest size first."""
    entries = list({e.name: e for s in selectors for e in variants.select(s)}.values())
    tasks = []
    for entry in entries:
        params = entry.resolve_variant_params(spec.params.get(entry.variant, {}))
        for (mode, causal), dtype, head_dim in itertools.product(modes_causal, spec.dtypes, spec.head_dims):
            for heads, kv_heads, layout in _shapes(spec, head_dim, layout_kinds):
                documents = spec.documents if layout != DENSE else None
                for seq_len in sorted(seq_lens):
                    for batch in batches_at(seq_len):
                        point = Point(batch=batch, heads=heads, seq_len=seq_len, head_dim=head_dim, dtype=dtype,
                                      device=device, causal=causal, mode=mode, params=params,
                                      q_len=spec.decode.q_len, kv_heads=kv_heads, layout=layout,
                                      documents=documents)
                        tasks.append(Task(entry.variant, entry.impl, entry.family, point))
    return tasks


def expand(spec: SweepSpec, device: str) -> list[Task]:
    """The sweep's points, then each slice's (a point planned twice is measured once)."""
    unique: dict[str, Task] = {}
    for grid in (spec, *slices_of(spec)):
        for task in _expand_grid(grid, device):
            unique.setdefault(task.fields()["key"], task)
    return list(unique.values())


def _expand_grid(spec: SweepSpec, device: str) -> list[Task]:
    """A grid's points: its modes other than decode over the [sweep] grid, then the decode points
    over the [decode] grid (causal by definition, whatever ``causal`` lists)."""
    def batches(n: int) -> tuple[int, ...]:
        return (max(1, spec.tokens // n),) if spec.tokens else spec.batch_sizes

    full = [(mode, causal) for mode in spec.modes if mode != DECODE for causal in spec.causal]
    tasks = _grid(spec, spec.variants, full, spec.seq_lens, batches, spec.layouts, device) if full else []
    if DECODE in spec.modes:
        grid = spec.decode
        tasks += _grid(spec, grid.variants or spec.variants, [(DECODE, True)], grid.seq_lens or spec.seq_lens,
                       (lambda n: grid.batch_sizes) if grid.batch_sizes else batches, grid.layouts or spec.layouts,
                       device)
    return tasks
