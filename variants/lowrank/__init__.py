"""Linformer: keys and values projected along the sequence to a fixed length ``proj_len``.

Layout ``(batch, heads, seq, head_dim)``. ``O = softmax(Q (E K)ᵀ / √d) (E V)`` with E a fixed
``(proj_len, n)`` Gaussian projection (seeded), standing in for the learned one so the op can be
benchmarked on its own. Not causal: E mixes every position, future ones included.

Grouped-query heads: E projects each KV head's keys and values once, and SDPA reads them for the
whole query group (``enable_gqa``). Packed and padded rows are refused: E is fixed for a sequence
length, so one projection of a whole row would mix documents (or padding) into every key, and one
projection per document would be a different function of each document's length.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..caches import cached_by_bytes
from ..layouts import sum_over_sequences
from ..reference import softmax_attention
from ..registry import Capabilities, Entry, Point, register

SEED = 0


@cached_by_bytes(256 << 20)
def projection(n: int, proj_len: int, device: str, dtype: torch.dtype) -> torch.Tensor:
    """(proj_len, n) with N(0, 1/n) entries: each projected key is a random mix of all keys at the
    scale of a single key."""
    gen = torch.Generator().manual_seed(SEED)
    e = torch.randn(proj_len, n, generator=gen, dtype=torch.float64) / n ** 0.5
    return e.to(device=device, dtype=dtype)


def _project(k: torch.Tensor, v: torch.Tensor, proj_len: int):
    e = projection(k.shape[-2], proj_len, str(k.device), k.dtype)
    return e @ k, e @ v


def projected(q, k, v, *, causal: bool, proj_len: int) -> torch.Tensor:
    kp, vp = _project(k, v, proj_len)  # once per KV head
    return F.scaled_dot_product_attention(q, kp, vp, enable_gqa=q.shape[1] != k.shape[1])


def reference(q, k, v, *, causal: bool, proj_len: int) -> torch.Tensor:
    kp, vp = _project(k, v, proj_len)
    return softmax_attention(q, kp, vp)


def flops(point: Point) -> float:
    d, p = point.head_dim, point.params["proj_len"]
    return sum_over_sequences(point, lambda n: 2.0 * 2 * n * p * d + 4.0 * n * p * d)  # project K, V; attend


register(Entry(
    "linformer", "projected", "lowrank", projected, reference, flops, params={"proj_len": 256},
    caps=Capabilities(causal=frozenset({False}), gqa=True,
                      causal_reason="projecting along the sequence mixes future tokens into every key",
                      layout_reason="E projects a whole row along its length: across a packed row it mixes "
                                    "documents (a padded row: padding) into every key, and a projection "
                                    "per document would be another function (E is fixed per length)"),
    kernel_name=lambda p: "projection matmuls + sdpa" + (" (enable_gqa)" if p.grouped else ""),
    summary="K, V projected along the sequence to proj_len, then SDPA"))
