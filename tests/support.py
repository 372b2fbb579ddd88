"""Helpers the test modules share."""

from __future__ import annotations

import os
import subprocess
import sys
import zlib
from pathlib import Path

import torch

import variants

PLUGINS = str(Path(__file__).parent / "plugins")


def bench(*args: str, env: dict | None = None, **kwargs) -> subprocess.CompletedProcess:
    """The real console entry point, in a fresh interpreter (as a user runs it)."""
    return subprocess.run([sys.executable, "-c", "from bench.cli import app; app(prog_name='bench')", *args],
                          capture_output=True, text=True, env={**os.environ, **(env or {})}, **kwargs)


def faulty_env(**extra: str) -> dict:
    """The environment that loads the test-only ``faulty/*`` entries (tests/plugins) as a plugin."""
    return {"PYTHONPATH": os.pathsep.join([PLUGINS, os.environ.get("PYTHONPATH", "")]),
            "ATTNBENCH_PLUGINS": "faulty_variants", **extra}


def why_not(entry: variants.Entry, point: variants.Point) -> str | None:
    """The entry's reasons for refusing ``point`` as a results row holds them (joined), None if none."""
    return "; ".join(entry.not_supported_reasons(point)) or None


# Small parameters, so that at the tests' lengths the structure matters (several blocks, chunks, residues).
SMALL = {"window": 16, "rate": 4, "features": 64, "proj_len": 32, "chunk": 32, "sinks": 3}
SMALL_STRIDED = {"window": 8, "rate": 16}
# Based's features are d' projections and their d'² products: at 64, 4161 per token would slow every case.
SMALL_BASED = {"window": 16, "features": 8, "chunk": 32}


def builtin_entries() -> list[variants.Entry]:
    """The entries variants/ itself registers: plugins named in ATTNBENCH_PLUGINS (e.g. the test-only
    faulty ones that kill their process) are left out."""
    return [e for e in variants.entries() if getattr(e.forward, "__module__", "").startswith("variants.")]


def small_params(entry: variants.Entry) -> dict:
    table = {"strided": SMALL_STRIDED, "based": SMALL_BASED}.get(entry.variant, SMALL)
    return {k: table[k] for k in entry.params}


def extra_inputs(entry: variants.Entry, tag: str, rows: int, heads: int, kv_heads: int, tokens: int,
                 head_dim: int, dtype: torch.dtype = torch.float64) -> dict[str, torch.Tensor]:
    """The entry's declared extra inputs (gates, β, sink logits) of a batch of that shape, drawn as the
    benchmark draws them (variants.inputs), seeded by ``tag``."""
    gen = torch.Generator().manual_seed(zlib.crc32(f"{tag}-extras".encode()))
    return {x.name: x.draw(x.shape(rows, heads, kv_heads, tokens, head_dim), gen, "cpu", dtype)
            for x in entry.inputs}


def token_extras(entry: variants.Entry, q: torch.Tensor, k: torch.Tensor, tag: str = "") -> dict[str, torch.Tensor]:
    """The entry's extra inputs for every token of ``q``, ``k`` ``(rows, heads, tokens, d)``, seeded by
    the entry and ``tag``."""
    rows, heads, tokens, d = q.shape
    return extra_inputs(entry, f"{entry.name}-{tag}", rows, heads, k.shape[1], tokens, d, q.dtype)
