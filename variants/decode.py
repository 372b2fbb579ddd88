"""Generation: one step of ``q_len`` new tokens against what an entry keeps of each sequence's prefix.

An entry's :class:`Decoder` builds its cache from the prefixes (``prefill``, never timed) and runs a
step (``step``): the new tokens' output, equal to the last ``q_len`` rows of the entry's own causal
forward over each sequence's prefix and its new tokens.

Heads. The new queries have ``heads`` heads, keys and values ``kv_heads`` (grouped-query attention,
:mod:`variants.layouts`). The cache or state is kept per KV head, and a step reads each KV head once
for its whole query group: the group folded into the rows of one attention call, or handed to a
kernel that groups natively (SDPA's ``enable_gqa``, xformers' 5-D layout) where the new tokens'
masks differ, which folded rows could not express. FLOPs are the query heads'; cache and traffic
bytes follow the KV heads.

Batches. Sequence ``i`` is row ``i`` of the prefill's keys, its prefix the first ``length_i`` positions:

* dense: every sequence has the whole width;
* packed (a ragged serving batch, run natively): each sequence keeps its own cache of its own
  length — all of them back to back in one buffer, none padded — and a step attends each sequence
  to its own cache, one call per sequence;
* padded (the comparison): the caches padded to the longest, one batched call with a key padding mask.

Two kinds of cache:

* softmax entries keep keys and values (:class:`KVCache`) of the prefix positions their pattern can
  still reach (:func:`variants.masks.reachable_keys`: all of them for standard attention, atrous and
  strided, the last ``window`` for local) with room for the new tokens. A step writes the new keys
  and values into that room — the same values every repetition, so the cache is left as it was —
  and attends the new queries to the keys their mask allows, read as a view where those are evenly
  spaced (a window, a residue class) and gathered otherwise. Everything is derived from the
  pattern's one mask function (:func:`kv_plan`);
* linear and gated entries keep a fixed-size state per sequence (``variants.linear``, ``variants.gated``).

``cache_bytes`` and ``bytes_moved`` are analytic: what the cache holds for the prefixes, and the
bytes one step must read and write (cache or state read, new keys/values or new state written,
queries read, output written) — the floor a memory-bound step is measured against.
"""

from __future__ import annotations

import functools
import itertools
from collections import Counter
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F

from . import layouts
from .caches import cached_by_bytes
from .layouts import DENSE, PACKED, PADDED, Layout, grouped, ungrouped
from .masks import Pattern, make_xformers_bias, reachable_keys
from .registry import Point, own_params

# (q, k, v, mask) -> output; q (b, heads, q_len, d), k and v (b, kv_heads, keys, d), mask: None (every
# query reads every key) or what the decoder's ``mask_of`` made of the plan's boolean mask.
Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Any], torch.Tensor]
# (boolean mask (rows, 1, q_len, keys) or None, the prefix's keys, the entry's params) -> the mask as
# the attention takes it, built once at prefill (the keys give its device and dtype).
MaskOf = Callable[[torch.Tensor | None, torch.Tensor, dict], Any]


def boolean_mask(mask: torch.Tensor | None, keys: torch.Tensor, params: dict) -> torch.Tensor | None:
    return mask


@dataclass(frozen=True)
class Decoder:
    """How an entry generates. ``prefill(k, v, *, q_len, layout=None, **params)`` takes the prefixes'
    keys and values ``(b, kv_heads, width, d)`` (``layout``: a packed or padded serving batch's
    :class:`~variants.layouts.Layout`, one sequence per row); ``step(q, k, v, cache, **params)`` the
    new tokens' q ``(b, heads, q_len, d)`` and k, v ``(b, kv_heads, q_len, d)``."""

    prefill: Callable[..., Any]
    step: Callable[..., torch.Tensor]
    cache_bytes: Callable[[Point], int]  # held for the prefixes, all of the batch
    bytes_moved: Callable[[Point], int]  # read and written by one step
    flops: Callable[[Point], float]  # of one step
    kernel: str  # what a dense step runs, for the results row
    # The layouts it decodes, each with what its step runs beyond ``kernel`` (for the results row).
    layouts: Mapping[str, str] = field(default_factory=lambda: {DENSE: ""})

    def kernel_name(self, point: Point) -> str:
        """What a step of ``point`` runs."""
        return self.kernel + self.layouts.get(point.layout, "")


def element_bytes(point: Point) -> int:
    return point.torch_dtype.itemsize


def prefix_lengths(k: torch.Tensor, layout: Layout | None) -> tuple[int, ...]:
    """Each sequence's prefix length (sequence i is row i of ``k``); the whole width when dense."""
    if layout is None:
        return (k.shape[-2],) * k.shape[0]
    return tuple(length for row in layout.lengths for length in row)


# --- attention over grouped heads ------------------------------------------------------------------

def folds(mask: Any) -> bool:
    """Whether a step's mask lets each KV head's query group fold into its rows: only one the same
    for every new token (none, or one query row) still applies to rows that are (member, token)."""
    return mask is None or (isinstance(mask, torch.Tensor) and mask.shape[-2] == 1)


def sdpa_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Any) -> torch.Tensor:
    """SDPA reading each KV head once: the query group folded into rows (any backend, no K/V copy;
    FlashAttention's own decode does the same) when the mask allows, else ``enable_gqa``."""
    heads, kv_heads = q.shape[1], k.shape[1]
    if folds(mask):
        return ungrouped(F.scaled_dot_product_attention(grouped(q, kv_heads), k, v, attn_mask=mask), heads)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=heads != kv_heads)


def xformers_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: Any) -> torch.Tensor:
    """xformers ``memory_efficient_attention`` over grouped heads in its 5-D layout (batch, seq,
    kv_heads, group, d): K and V expanded over each group with stride 0, so read once per KV head.
    ``bias``: a bias spec (one of xformers' classes) or an additive tensor ``(rows, 1, q_len, keys)``."""
    import xformers.ops as xops

    b, heads, q_len, d = q.shape
    kv_heads = k.shape[1]
    group = heads // kv_heads
    q5 = q.unflatten(1, (kv_heads, group)).permute(0, 3, 1, 2, 4)
    k5, v5 = (x.transpose(1, 2)[:, :, :, None].expand(-1, -1, -1, group, -1) for x in (k, v))
    attn_bias = bias[:, :, None].expand(b, kv_heads, group, q_len, -1) if isinstance(bias, torch.Tensor) \
        else make_xformers_bias(bias)
    out = xops.memory_efficient_attention(q5, k5, v5, attn_bias=attn_bias)
    return out.permute(0, 2, 3, 1, 4).reshape(b, heads, q_len, d)


def additive_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean mask ``(rows, 1, q_len, keys)`` as an additive bias (0 allowed, −inf not), its rows
    in storage padded to a multiple of 16 keys: xformers reads bias rows aligned."""
    rows, _, q_len, keys = mask.shape
    storage = torch.full((rows, 1, q_len, -(-keys // 16) * 16), float("-inf"), dtype=dtype, device=mask.device)
    return storage[..., :keys].masked_fill_(mask, 0.0)


def xformers_mask_of(spec_of: MaskOf) -> MaskOf:
    """One sequence's mask as the xformers bias class ``spec_of`` names; a padded batch's, different
    in every row, as an additive tensor (no class here expresses it)."""
    def mask_of(mask: torch.Tensor | None, keys: torch.Tensor, params: dict) -> Any:
        if mask is None or mask.shape[0] == 1:
            return spec_of(mask, keys, params)
        return additive_bias(mask, keys.dtype)

    return mask_of


# --- softmax entries: a KV cache ----------------------------------------------------------------------

@dataclass(frozen=True)
class KVPlan:
    """Which prefix positions a cache keeps and where, which slots a step reads, and the mask among
    them. Each row of the cache: padding (when its sequence keeps fewer positions than the longest),
    its kept positions in order, then ``q_len`` slots for the new tokens — left-padded, so that every
    row's new tokens share slots and a step writes them in one call. One row stands for every
    sequence of a dense batch."""

    kept: torch.Tensor  # (rows, width): the prefix position each slot holds, −1 at padding
    keys: slice | torch.Tensor  # cache slots the new queries read
    mask: torch.Tensor | None  # (rows, 1, q_len, keys read), True: may attend; None: every query every key
    pairs: int  # allowed (query, key) pairs of all rows: the step's attention work

    @property
    def rows(self) -> int:
        return self.kept.shape[0]

    @property
    def width(self) -> int:
        """Slots of kept prefix positions (with padding) in each row, before the new tokens'."""
        return self.kept.shape[1]

    @property
    def keys_read(self) -> int:
        return _length(self.keys)


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
def kv_plan(pattern: Pattern, lengths: tuple[int, ...], q_len: int, device: str = "cpu") -> KVPlan:
    """The cache layout and read plan of ``pattern`` (causal) for sequences of ``lengths`` prefix
    tokens (one row each) and ``q_len`` new tokens each, at positions ``n … n + q_len − 1``."""
    reached = {n: reachable_keys(pattern, n) for n in set(lengths)}
    width = max(kept.numel() for kept in reached.values())
    positions = torch.full((len(lengths), width + q_len), -1)
    for row, n in enumerate(lengths):
        positions[row, width - reached[n].numel():width] = reached[n]
        positions[row, width:] = torch.arange(n, n + q_len)
    queries = torch.tensor(lengths)[:, None, None] + torch.arange(q_len)[:, None]  # (rows, q_len, 1)
    allowed = pattern.mask(queries, positions[:, None, :]) & (positions >= 0)[:, None, :]
    read = allowed.any(1).any(0).nonzero().flatten()
    sub = allowed[:, :, read]
    keys = _as_slice(read)
    return KVPlan(positions[:, :width].to(device), keys if isinstance(keys, slice) else keys.to(device),
                  None if bool(sub.all()) else sub[:, None].to(device), int(allowed.sum()))


@dataclass
class KVCache:
    """One batch's cache: a dense batch's, a padded batch's, or one sequence of a packed batch."""

    k: torch.Tensor  # (b, kv_heads, width + q_len, d)
    v: torch.Tensor
    plan: KVPlan
    mask: Any  # the plan's mask in the form the entry's attention takes (built once, at prefill)

    def step(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attend: Attend) -> torch.Tensor:
        """Write the new keys and values into the cache's room, attend the new queries to what they
        may read."""
        self.k[:, :, self.plan.width:] = k
        self.v[:, :, self.plan.width:] = v
        keys = self.plan.keys
        read = (lambda x: x[:, :, keys]) if isinstance(keys, slice) else (lambda x: x.index_select(2, keys))  # noqa: E731
        return attend(q, read(self.k), read(self.v), self.mask)


@dataclass
class RaggedCache:
    """A packed batch's caches: every sequence's, of its own length, back to back in one buffer
    ``(1, kv_heads, Σ slots, d)``, each sequence's :class:`KVCache` a view of its stretch."""

    k: torch.Tensor
    v: torch.Tensor
    sequences: tuple[KVCache, ...]

    def step(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attend: Attend) -> torch.Tensor:
        """Each sequence against its own cache, one call each: no kernel here takes a ragged batch."""
        return torch.cat([cache.step(q[i:i + 1], k[i:i + 1], v[i:i + 1], attend)
                          for i, cache in enumerate(self.sequences)])


def _fill(cache: torch.Tensor, x: torch.Tensor, plan: KVPlan) -> None:
    """The kept prefix positions of ``x`` into the cache's first ``plan.width`` slots, zeros at
    padding (not garbage: a masked key's value still meets its zero weight, and 0·NaN is NaN)."""
    b, h, _, d = x.shape
    gathered = x.gather(2, plan.kept.clamp(min=0)[:, None, :, None].expand(b, h, -1, d))
    cache[:, :, :plan.width] = gathered.where((plan.kept >= 0)[:, None, :, None], 0)


def _filled(k: torch.Tensor, v: torch.Tensor, plan: KVPlan, mask_of: MaskOf, params: dict,
            cache_k: torch.Tensor, cache_v: torch.Tensor) -> KVCache:
    _fill(cache_k, k, plan)
    _fill(cache_v, v, plan)
    return KVCache(cache_k, cache_v, plan, mask_of(plan.mask, k, params))


def kv_prefill(k: torch.Tensor, v: torch.Tensor, plan: KVPlan, q_len: int, mask_of: MaskOf = boolean_mask,
               params: dict | None = None) -> KVCache:
    """The kept prefix positions copied into a cache with room for ``q_len`` new tokens."""
    b, h, _, d = k.shape
    return _filled(k, v, plan, mask_of, params or {}, *(x.new_zeros(b, h, plan.width + q_len, d) for x in (k, v)))


def ragged_prefill(k: torch.Tensor, v: torch.Tensor, plans: list[KVPlan], q_len: int,
                   mask_of: MaskOf = boolean_mask, params: dict | None = None) -> RaggedCache:
    """Sequence i's cache (``plans[i]``, of its prefix alone) in its stretch of one shared buffer."""
    _, h, _, d = k.shape
    slots = [plan.width + q_len for plan in plans]
    buffers = [x.new_zeros(1, h, sum(slots), d) for x in (k, v)]
    sequences = []
    for i, (plan, start, size) in enumerate(zip(plans, itertools.accumulate([0, *slots]), slots, strict=False)):
        views = (buffer[:, :, start:start + size] for buffer in buffers)
        sequences.append(_filled(k[i:i + 1], v[i:i + 1], plan, mask_of, params or {}, *views))
    return RaggedCache(*buffers, tuple(sequences))


KV_LAYOUTS = {DENSE: "", PACKED: ", one call per sequence of the ragged batch",
              PADDED: ", caches padded to the longest with a key padding mask"}


def kv_decoder(pattern_of: Callable[[dict], Pattern], attend: Attend, kernel: str,
               mask_of: MaskOf = boolean_mask, inputs: tuple[str, ...] = ()) -> Decoder:
    """The KV-cache decoder of a softmax entry whose causal pattern is ``pattern_of(params)``;
    ``attend`` takes the plan's mask as ``mask_of`` turns it (at prefill, outside any timing), and
    the step's extra ``inputs`` (per-head ones, such as a sink logit: no cache cost) by keyword."""
    def plan_of(lengths: tuple[int, ...], q_len: int, params: dict, device: str = "cpu") -> KVPlan:
        return kv_plan(pattern_of(params), lengths, q_len, device)

    def prefill(k: torch.Tensor, v: torch.Tensor, *, q_len: int, layout: Layout | None = None,
                **params: Any) -> KVCache | RaggedCache:
        device = str(k.device)
        if layout is None:
            return kv_prefill(k, v, plan_of((k.shape[-2],), q_len, params, device), q_len, mask_of, params)
        lengths = prefix_lengths(k, layout)
        if layout.kind == PADDED:
            return kv_prefill(k, v, plan_of(lengths, q_len, params, device), q_len, mask_of, params)
        return ragged_prefill(k, v, [plan_of((n,), q_len, params, device) for n in lengths], q_len, mask_of, params)

    def step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: KVCache | RaggedCache,
             **params: Any) -> torch.Tensor:
        given = {name: params[name] for name in inputs}
        return cache.step(q, k, v, functools.partial(attend, **given) if given else attend)

    def point_plans(point: Point) -> list[tuple[KVPlan, int]]:
        """The point's plans, each with how many times the batch holds it: one padded plan of every
        sequence; else one plan per distinct length, held by each sequence of that length."""
        lengths = layouts.sequences(point)
        params = dict(point.params)
        if point.layout == PADDED:
            return [(plan_of(tuple(lengths), point.q_len, params), 1)]
        return [(plan_of((n,), point.q_len, params), count) for n, count in Counter(lengths).items()]

    def kv_bytes(point: Point, slots: Callable[[KVPlan], int]) -> int:
        """Keys and values of ``slots(plan)`` per row of every plan, per KV head."""
        per_slot = 2 * point.n_kv_heads * point.head_dim * element_bytes(point)
        return per_slot * sum(count * plan.rows * slots(plan) for plan, count in point_plans(point))

    def cache_bytes(point: Point) -> int:
        return kv_bytes(point, lambda plan: plan.width)

    def bytes_moved(point: Point) -> int:
        # keys and values read and the new ones written (per KV head); queries read and outputs
        # written (per query head)
        queries = 2 * point.batch * point.heads * point.q_len * point.head_dim * element_bytes(point)
        return kv_bytes(point, lambda plan: plan.keys_read + point.q_len) + queries

    def flops(point: Point) -> float:
        return 4.0 * point.heads * point.head_dim * sum(count * plan.pairs for plan, count in point_plans(point))

    return Decoder(prefill, step, cache_bytes, bytes_moved, flops, kernel, KV_LAYOUTS)


# --- a sum of attentions: a decoder per part ---------------------------------------------------------

def summed_decoder(parts: Sequence[tuple[Decoder, Collection[str]]]) -> Decoder:
    """The decoder of attentions whose outputs add (a hybrid's parts): each part's cache or state kept
    side by side, a step the sum of the parts' steps. Each part is given only the parameters it names
    (a pattern's plan would refuse a feature count). Figures are the parts' sums: their steps each read
    the queries and write an output of their own; a layout decodes when every part decodes it."""
    def summed(figure: Callable[[Decoder], Callable[[Point], float]]) -> Callable[[Point], Any]:
        return lambda point: sum(figure(decoder)(replace(point, params=own_params(point.params, names)))
                                 for decoder, names in parts)

    def prefill(k: torch.Tensor, v: torch.Tensor, *, q_len: int, layout: Layout | None = None,
                **params: Any) -> tuple[Any, ...]:
        return tuple(decoder.prefill(k, v, q_len=q_len, layout=layout, **own_params(params, names))
                     for decoder, names in parts)

    def step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, caches: tuple[Any, ...], **params: Any) -> torch.Tensor:
        outputs = (decoder.step(q, k, v, cache, **own_params(params, names))
                   for (decoder, names), cache in zip(parts, caches, strict=True))
        return functools.reduce(torch.add, outputs)

    decoders = [decoder for decoder, _ in parts]
    common = [layout for layout in decoders[0].layouts if all(layout in d.layouts for d in decoders)]
    return Decoder(prefill, step, summed(lambda d: d.cache_bytes), summed(lambda d: d.bytes_moved),
                   summed(lambda d: d.flops), " + ".join(d.kernel for d in decoders),
                   {layout: "".join(d.layouts[layout] for d in decoders) for layout in common})


# --- a decoder's first step on a tiny input --------------------------------------------------------

def trial_step(decoder: Decoder, device: str, dtype: torch.dtype, head_dim: int, q_len: int, grouped_heads: bool,
               layout: str) -> torch.Tensor:
    """One prefill and step on zeros of a point's kind (device, dtype, head_dim, two query heads per
    KV head when ``grouped_heads``, q_len, layout) at a tiny length: a probe, for the refusals only a
    kernel tells."""
    lengths = (16,) if layout == DENSE else (9, 16)
    heads = 2 if grouped_heads else 1
    q = torch.zeros(len(lengths), heads, q_len, head_dim, device=device, dtype=dtype)
    k = torch.zeros(len(lengths), 1, 16 + q_len, head_dim, device=device, dtype=dtype)
    shape = {} if layout == DENSE else {"layout": Layout(layout, tuple((n,) for n in lengths))}
    cache = decoder.prefill(k[:, :, :16], k[:, :, :16], q_len=q_len, **shape)
    return decoder.step(q, k[:, :, 16:], k[:, :, 16:], cache)

