"""Generation: one step of ``q_len`` new tokens against what an entry keeps of an ``n``-token prefix.

An entry's :class:`Decoder` builds its cache from the prefix (``prefill``, never timed) and runs a
step (``step``): the new tokens' output, equal to the last ``q_len`` rows of the entry's own causal
forward over the prefix and the new tokens. Two kinds of cache:

* softmax entries keep keys and values (:class:`KVCache`) of the prefix positions their pattern can
  still reach (:func:`variants.masks.reachable_keys`: all of them for standard attention, atrous and
  strided, the last ``window`` for local) with room for the new tokens. A step writes the new keys
  and values into that room — the same values every repetition, so the cache is left as it was —
  and attends the new queries to the keys their mask allows, read as a view where those are evenly
  spaced (a window, a residue class) and gathered otherwise. Everything is derived from the
  pattern's one mask function (:func:`kv_plan`);
* linear entries keep a fixed-size state (``variants.linear``).

``cache_bytes`` and ``bytes_moved`` are analytic: what the cache holds for the prefix, and the
bytes one step must read and write (cache or state read, new keys/values or new state written,
queries read, output written) — the floor a memory-bound step is measured against.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .caches import cached_by_bytes
from .layouts import DENSE
from .masks import Pattern, reachable_keys
from .registry import Point

# (q, k, v, mask) -> output; q (b, h, q_len, d), k and v (b, h, keys, d), mask: None (every query
# reads every key) or what the decoder's ``mask_of`` made of the (q_len, keys) boolean mask.
Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Any], torch.Tensor]
# (boolean mask or None, the prefix's keys, the entry's params) -> the mask as the attention takes it,
# built once at prefill (the keys give its device and dtype).
MaskOf = Callable[[torch.Tensor | None, torch.Tensor, dict], Any]


def boolean_mask(mask: torch.Tensor | None, keys: torch.Tensor, params: dict) -> torch.Tensor | None:
    return mask


@dataclass(frozen=True)
class Decoder:
    """How an entry generates. ``prefill(k, v, *, q_len, **params)`` takes the prefix's keys and
    values ``(b, h, n, d)``; ``step(q, k, v, cache, **params)`` the new tokens' ``(b, h, q_len, d)``."""

    prefill: Callable[..., Any]
    step: Callable[..., torch.Tensor]
    cache_bytes: Callable[[Point], int]  # held for the prefix, all of the batch
    bytes_moved: Callable[[Point], int]  # read and written by one step
    flops: Callable[[Point], float]  # of one step
    kernel: str  # what a step runs, for the results row
    layouts: frozenset[str] = frozenset({DENSE})  # ragged batches: packed (native), padded (to the longest)


def element_bytes(point: Point) -> int:
    return point.torch_dtype.itemsize


# --- softmax entries: a KV cache ----------------------------------------------------------------------

@dataclass(frozen=True)
class KVPlan:
    """Which prefix positions the cache keeps (its first slots, then ``q_len`` slots for the new
    tokens), which slots a step reads, and the mask among them."""

    kept: torch.Tensor  # prefix positions, ascending
    keys: slice | torch.Tensor  # cache slots the new queries read
    mask: torch.Tensor | None  # (q_len, keys read); None when every query reads every key
    pairs: int  # allowed (query, key) pairs: the step's attention work

    @property
    def keys_read(self) -> int:
        return self.mask.shape[1] if self.mask is not None else _length(self.keys)


def _length(keys: slice | torch.Tensor) -> int:
    return len(range(keys.start, keys.stop, keys.step)) if isinstance(keys, slice) else int(keys.numel())


def _as_slice(slots: torch.Tensor) -> slice | torch.Tensor:
    """Evenly spaced slots as a slice (read as a view, no copy); any others as an index."""
    if slots.numel() == 1:
        return slice(int(slots[0]), int(slots[0]) + 1)
    steps = slots.diff()
    if bool((steps == steps[0]).all()):
        return slice(int(slots[0]), int(slots[-1]) + 1, int(steps[0]))
    return slots


@cached_by_bytes(256 << 20)
def kv_plan(pattern: Pattern, n: int, q_len: int, device: str = "cpu") -> KVPlan:
    """The cache layout and read plan of ``pattern`` (causal) for an ``n``-token prefix and ``q_len``
    new tokens at positions ``n … n + q_len − 1``."""
    kept = reachable_keys(pattern, n)
    positions = torch.cat([kept, torch.arange(n, n + q_len)])
    queries = torch.arange(n, n + q_len)[:, None]
    allowed = pattern.mask(queries, positions[None, :]).expand(q_len, positions.numel())
    read = allowed.any(0).nonzero().flatten()
    sub = allowed[:, read]
    keys = _as_slice(read)
    return KVPlan(kept.to(device), keys if isinstance(keys, slice) else keys.to(device),
                  None if bool(sub.all()) else sub.to(device), int(allowed.sum()))


@dataclass
class KVCache:
    k: torch.Tensor  # (b, h, kept + q_len, d)
    v: torch.Tensor
    plan: KVPlan
    mask: Any  # the plan's mask in the form the entry's attention takes (built once, here)


def kv_prefill(k: torch.Tensor, v: torch.Tensor, plan: KVPlan, q_len: int, mask_of: MaskOf = boolean_mask,
               params: dict | None = None) -> KVCache:
    """The kept prefix positions copied into a cache with room for ``q_len`` new tokens."""
    b, h, _, d = k.shape
    cache_k, cache_v = (x.new_empty(b, h, plan.kept.numel() + q_len, d) for x in (k, v))
    cache_k[:, :, :plan.kept.numel()] = k.index_select(2, plan.kept)
    cache_v[:, :, :plan.kept.numel()] = v.index_select(2, plan.kept)
    return KVCache(cache_k, cache_v, plan, mask_of(plan.mask, k, params or {}))


def kv_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: KVCache, attend: Attend) -> torch.Tensor:
    """Write the new keys and values into the cache's room, attend the new queries to what they
    may read."""
    start = cache.plan.kept.numel()
    cache.k[:, :, start:] = k
    cache.v[:, :, start:] = v
    keys = cache.plan.keys
    read = (lambda x: x[:, :, keys]) if isinstance(keys, slice) else (lambda x: x.index_select(2, keys))  # noqa: E731
    return attend(q, read(cache.k), read(cache.v), cache.mask)


def eager_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def kv_decoder(pattern_of: Callable[[dict], Pattern], attend: Attend, kernel: str,
               mask_of: MaskOf = boolean_mask) -> Decoder:
    """The KV-cache decoder of a softmax entry whose causal pattern is ``pattern_of(params)``;
    ``attend`` takes the plan's mask as ``mask_of`` turns it (at prefill, outside any timing)."""
    def plan_of(n: int, q_len: int, params: dict, device: str) -> KVPlan:
        return kv_plan(pattern_of(params), n, q_len, device)

    def prefill(k: torch.Tensor, v: torch.Tensor, *, q_len: int, **params: Any) -> KVCache:
        return kv_prefill(k, v, plan_of(k.shape[-2], q_len, params, str(k.device)), q_len, mask_of, params)

    def step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: KVCache, **params: Any) -> torch.Tensor:
        return kv_step(q, k, v, cache, attend)

    def point_plan(point: Point) -> KVPlan:
        return plan_of(point.seq_len, point.q_len, dict(point.params), "cpu")

    def cache_bytes(point: Point) -> int:
        return 2 * point.batch * point.heads * point.head_dim * point_plan(point).kept.numel() * element_bytes(point)

    def bytes_moved(point: Point) -> int:
        # keys and values read, the new ones written, queries read and outputs written
        tokens = 2 * point_plan(point).keys_read + 2 * point.q_len + 2 * point.q_len
        return point.batch * point.heads * point.head_dim * tokens * element_bytes(point)

    def flops(point: Point) -> float:
        return 4.0 * point.batch * point.heads * point.head_dim * point_plan(point).pairs

    return Decoder(prefill, step, cache_bytes, bytes_moved, flops, kernel)
