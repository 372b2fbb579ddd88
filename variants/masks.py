"""Sparse attention patterns, each defined once as a mask function ``(q_idx, kv_idx) -> bool``.

Everything else is derived from that one function, so the forms can never disagree:

* :func:`dense_mask` — the ``(n, n)`` boolean mask (tests, masked-dense impls);
* :func:`block_mask` — the FlexAttention ``BlockMask`` (cached per shape);
* :func:`xformers_bias` — the xformers ``attn_bias`` where xformers has a class for the pattern;
* :func:`allowed_per_row` — exact counts of allowed entries (for FLOPs);
* :func:`reachable_keys` — the prefix positions later queries can still reach (decode caches).

Factories follow attention-gym: one small function per pattern, returning a mask function whose
``__name__`` carries its parameters (``local_w256``, ``atrous_r4_causal``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

MaskFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# An xformers attn_bias as data: (class name in xformers.ops.fmha.attn_bias, constructor kwargs).
BiasSpec = tuple[str, tuple[tuple[str, int], ...]]


@dataclass(frozen=True)
class Pattern:
    """A named sparse pattern: its mask function plus the xformers bias that expresses it, if any."""

    name: str
    mask: MaskFn
    # The xformers attn_bias expressing the pattern; None when xformers has no such class.
    xformers: BiasSpec | None = None
    # Every pattern here depends on i − j only, and on it through a period: the queries i in
    # [n, n + period) reach every key that any later query reaches (what a decode cache must keep).
    period: int = 1


def _named(fn: MaskFn, name: str) -> MaskFn:
    fn.__name__ = fn.__qualname__ = name
    return fn


def causal() -> MaskFn:
    return _named(lambda q_idx, kv_idx: kv_idx <= q_idx, "causal")


def local(window: int) -> MaskFn:
    """Token i sees j when |i − j| <= window."""
    return _named(lambda q_idx, kv_idx: (q_idx - kv_idx).abs() <= window, f"local_w{window}")


def atrous(rate: int) -> MaskFn:
    """Token i sees j when (i − j) mod rate == 0 (dilated: rate interleaved subsequences)."""
    return _named(lambda q_idx, kv_idx: (q_idx - kv_idx) % rate == 0, f"atrous_r{rate}")


def or_masks(*fns: MaskFn) -> MaskFn:
    def union(q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        out = fns[0](q_idx, kv_idx)
        for fn in fns[1:]:
            out = out | fn(q_idx, kv_idx)
        return out

    return _named(union, "_or_".join(f.__name__ for f in fns))


def and_masks(*fns: MaskFn) -> MaskFn:
    def intersection(q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        out = fns[0](q_idx, kv_idx)
        for fn in fns[1:]:
            out = out & fn(q_idx, kv_idx)
        return out

    return _named(intersection, "_and_".join(f.__name__ for f in fns))


def _local_pattern(window: int, causal_: bool) -> tuple[MaskFn, BiasSpec | None, int]:
    # Bottom-right alignment equals top-left here because queries and keys have the same length.
    right = 0 if causal_ else window
    return local(window), local_bias(window, right), 1


def local_bias(left: int, right: int) -> BiasSpec:
    """xformers' local window, aligned bottom-right (queries end where the keys end)."""
    return "LocalAttentionFromBottomRightMask", (("window_left", left), ("window_right", right))


# Each sparsity's factory: (mask function, xformers bias or None, period of its rule in i − j, where
# 1 means the reach only shrinks as i grows; see Pattern.period).
PATTERNS: dict[str, Callable[..., tuple[MaskFn, BiasSpec | None, int]]] = {
    "local": _local_pattern,
    "atrous": lambda rate, causal_: (atrous(rate), None, rate),
    "strided": lambda window, rate, causal_: (or_masks(local(window), atrous(rate)), None, rate),
}


@functools.lru_cache(maxsize=256)
def pattern(sparsity: str, causal_: bool, **params: int) -> Pattern:
    """The pattern ``sparsity`` (``local``, ``atrous``, ``strided``) with its parameters, causal or not.

    Cached, so equal arguments give the same object and the per-pattern caches below hit."""
    if sparsity not in PATTERNS:
        raise ValueError(f"unknown pattern {sparsity!r} (valid: {', '.join(PATTERNS)})")
    base, bias, period = PATTERNS[sparsity](causal_=causal_, **params)
    fn = and_masks(base, causal()) if causal_ else base
    name = f"{base.__name__}_causal" if causal_ else base.__name__
    return Pattern(name=name, mask=_named(fn, name), xformers=bias, period=period)


FULL_CAUSAL = Pattern("causal", causal())  # standard causal attention, as a pattern (decode caches)


def dense_mask(mask: MaskFn, n_q: int, n_kv: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The ``(n_q, n_kv)`` boolean mask, evaluated from the mask function."""
    q_idx = torch.arange(n_q, device=device)[:, None]
    kv_idx = torch.arange(n_kv, device=device)[None, :]
    return mask(q_idx, kv_idx).expand(n_q, n_kv)


@functools.lru_cache(maxsize=64)
def cached_dense_mask(pattern_: Pattern, n: int, device: str) -> torch.Tensor:
    return dense_mask(pattern_.mask, n, n, device)


@functools.lru_cache(maxsize=64)
def block_mask(pattern_: Pattern, n: int, device: str) -> Any:
    """FlexAttention block mask for an ``n × n`` problem, built once per (pattern, n, device)."""
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        return pattern_.mask(q_idx, kv_idx)

    return create_block_mask(mask_mod, None, None, n, n, device=device)


def expand_block_mask(bm: Any, n: int) -> torch.Tensor:
    """The element-level mask a BlockMask really applies: full blocks entirely, partial blocks
    through its mask_mod, everything else masked. Used to check the block mask against the dense one."""
    size_q, size_kv = bm.BLOCK_SIZE
    idx = torch.arange(n)
    full = torch.zeros(n, n, dtype=torch.bool)
    partial = torch.zeros_like(full)
    for counts, indices, target in ((bm.kv_num_blocks, bm.kv_indices, partial),
                                    (bm.full_kv_num_blocks, bm.full_kv_indices, full)):
        if counts is None:
            continue
        for qb in range(counts.shape[-1]):
            for kb in indices[0, 0, qb, : counts[0, 0, qb]].tolist():
                target[qb * size_q:(qb + 1) * size_q, kb * size_kv:(kb + 1) * size_kv] = True
    zero = torch.zeros((), dtype=torch.long)
    mod = bm.mask_mod(zero, zero, idx[:, None], idx[None, :]).expand(n, n)
    return full | (partial & mod)


def make_xformers_bias(spec: BiasSpec | None) -> Any | None:
    if spec is None:
        return None
    from xformers.ops.fmha import attn_bias

    cls_name, kwargs = spec
    return getattr(attn_bias, cls_name)(**dict(kwargs))


def xformers_bias(pattern_: Pattern) -> Any | None:
    """The xformers ``attn_bias`` object expressing this pattern, or None when xformers has none."""
    return make_xformers_bias(pattern_.xformers)


@functools.lru_cache(maxsize=256)
def allowed_per_row(pattern_: Pattern, n: int, rows_per_chunk: int = 1024) -> torch.Tensor:
    """Exact number of allowed keys for each query row (int64, length n), counted from the mask
    function chunk by chunk so memory stays O(rows_per_chunk · n)."""
    counts = torch.empty(n, dtype=torch.int64)
    kv_idx = torch.arange(n)[None, :]
    for start in range(0, n, rows_per_chunk):
        q_idx = torch.arange(start, min(n, start + rows_per_chunk))[:, None]
        counts[start:start + q_idx.shape[0]] = pattern_.mask(q_idx, kv_idx).expand(-1, n).sum(-1)
    return counts


@functools.lru_cache(maxsize=64)
def reachable_keys(pattern_: Pattern, n: int, rows_per_chunk: int = 64) -> torch.Tensor:
    """Positions j < n of a prefix that some query i ≥ n may attend to (int64, ascending): what a
    decode cache keeps. The queries [n, n + period) decide it (see :attr:`Pattern.period`)."""
    keys = torch.arange(n)[None, :]
    reached = torch.zeros(n, dtype=torch.bool)
    for start in range(n, n + pattern_.period, rows_per_chunk):
        q_idx = torch.arange(start, min(n + pattern_.period, start + rows_per_chunk))[:, None]
        reached |= pattern_.mask(q_idx, keys).expand(q_idx.shape[0], n).any(0)
    return reached.nonzero().flatten()
