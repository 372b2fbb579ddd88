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
SMALL = {"window": 16, "rate": 4, "features": 64, "proj_len": 32, "chunk": 32}
SMALL_STRIDED = {"window": 8, "rate": 16}


def builtin_entries() -> list[variants.Entry]:
    """The entries variants/ itself registers: plugins named in ATTNBENCH_PLUGINS (e.g. the test-only
    faulty ones that kill their process) are left out."""
    return [e for e in variants.entries() if getattr(e.forward, "__module__", "").startswith("variants.")]


def small_params(entry: variants.Entry) -> dict:
    table = SMALL_STRIDED if entry.variant == "strided" else SMALL
    return {k: table[k] for k in entry.params}


def token_extras(entry: variants.Entry, q: torch.Tensor, k: torch.Tensor, tag: str = "") -> dict[str, torch.Tensor]:
    """The entry's extra inputs (gates, β) for every token of ``q``, ``k`` ``(rows, heads, tokens, d)``,
    drawn as the benchmark draws them (variants.inputs), seeded by the entry and ``tag``."""
    gen = torch.Generator().manual_seed(zlib.crc32(f"{entry.name}-{tag}-extras".encode()))
    rows, heads, tokens, d = q.shape
    return {x.name: x.draw(x.shape(rows, heads, k.shape[1], tokens, d), gen, "cpu", q.dtype) for x in entry.inputs}
