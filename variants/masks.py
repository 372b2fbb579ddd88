"""Sparse attention patterns, each defined once as a mask function ``(q_idx, kv_idx) -> bool``.

Everything else is derived from that one function, so the forms can never disagree:

* :func:`dense_mask` — the ``(n, n)`` boolean mask (tests, masked-dense impls);
* :func:`block_mask` — the FlexAttention ``BlockMask`` (cached per shape), built in bounded memory;
* :func:`document_masks` — a packed or padded batch's: the pattern ∧ same document, one mask
  function per tensor row, and its dense (:func:`cached_document_mask`) and block
  (:func:`document_block_mask`) forms;
* :func:`xformers_bias` — the xformers ``attn_bias`` where xformers has a class for the pattern;
* :func:`allowed_per_row` — exact counts of allowed entries (for FLOPs);
* :func:`reachable_keys` — the prefix positions later queries can still reach (decode caches).

A pattern with sinks (StreamingLLM, :func:`sinks_and_window`) is a relative rule (its window) ∪ the first keys of
each sequence: not of i − j only, so its block mask and counts are the rule's, read per block
diagonal or offset, plus the sink keys' few columns evaluated as they are (:attr:`Pattern.rule`).

Factories follow attention-gym: one small function per pattern, returning a mask function whose
``__name__`` carries its parameters (``local_w256``, ``atrous_r4_causal``).

Long sequences are the point of sparse attention, so nothing here evaluates the mask function over
the whole n × n grid at once: the dense mask is filled in row chunks, and a pattern that depends on
i − j only (every pattern here but sinks: :attr:`Pattern.relative`) has its block mask and its per-row counts
read from one evaluation per block diagonal or per offset.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .caches import cached_by_bytes
from .layouts import Layout
from .xformers_ops import BiasSpec, make_xformers_bias, window_bias

MaskFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Pattern:
    """A named sparse pattern: its mask function plus the xformers bias that expresses it, if any."""

    name: str
    mask: MaskFn
    # The xformers attn_bias expressing the pattern; None when xformers has no such class.
    xformers: BiasSpec | None = None
    # Every pattern here depends on i − j (sinks: besides keys j < s), and on it through a period: the queries i in
    # [n, n + period) reach every key that any later query reaches (what a decode cache must keep).
    period: int = 1
    # Whether the mask depends on i − j only (a Toeplitz mask): then every block of a block diagonal
    # holds the same pattern, and one evaluation per diagonal classifies them all.
    relative: bool = False
    # A pattern with sinks: ``rule`` (relative) ∪ keys j < ``sinks`` (causal: j ≤ i), the first keys of
    # each sequence (of each document: masks are evaluated on positions within it). None: no sinks.
    rule: Pattern | None = None
    sinks: int = 0


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


def sinks_and_window(count: int, window: int) -> MaskFn:
    """StreamingLLM: token i sees the first ``count`` tokens and j with |i − j| <= window."""
    return _named(lambda q_idx, kv_idx: (kv_idx < count) | ((q_idx - kv_idx).abs() <= window),
                  f"sinks_s{count}_w{window}")


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
    return local(window), window_bias(window, causal_), 1


# Each sparsity's factory: (mask function, xformers bias or None, period of its rule in i − j, where
# 1 means the reach only shrinks as i grows; see Pattern.period).
PATTERNS: dict[str, Callable[..., tuple[MaskFn, BiasSpec | None, int]]] = {
    "local": _local_pattern,
    "atrous": lambda rate, causal_: (atrous(rate), None, rate),
    "strided": lambda window, rate, causal_: (or_masks(local(window), atrous(rate)), None, rate),
    "sinks": lambda sinks, window, causal_: (sinks_and_window(sinks, window), None, 1),
}


@functools.lru_cache(maxsize=256)
def pattern(sparsity: str, causal_: bool, **params: int) -> Pattern:
    """The pattern ``sparsity`` (``local``, ``atrous``, ``strided``, ``sinks``) with its parameters, causal or not.

    Cached, so equal arguments give the same object and the per-pattern caches below hit."""
    if sparsity not in PATTERNS:
        raise ValueError(f"unknown pattern {sparsity!r} (valid: {', '.join(PATTERNS)})")
    base, bias, period = PATTERNS[sparsity](causal_=causal_, **params)
    fn = and_masks(base, causal()) if causal_ else base
    name = f"{base.__name__}_causal" if causal_ else base.__name__
    # sinks: the local window (relative) plus the first keys, which depend on j alone
    rule = pattern("local", causal_, window=params["window"]) if sparsity == "sinks" else None
    return Pattern(name=name, mask=_named(fn, name), xformers=bias, period=period, relative=rule is None,
                   rule=rule, sinks=params["sinks"] if rule else 0)


# standard causal attention, as a pattern (decode caches)
FULL_CAUSAL = Pattern("causal", causal(), relative=True)


# --- documents ------------------------------------------------------------------------------------

def same_document(ids: torch.Tensor) -> MaskFn:
    """Positions in the same document, ``ids`` holding each position's document."""
    return lambda q_idx, kv_idx: ids[q_idx] == ids[kv_idx]


def document_starts(layout: Layout, device: torch.device | str = "cpu") -> torch.Tensor:
    """Each position's document start (padding: where the row's padding starts), int32 ``(rows, width)``."""
    starts = torch.zeros(len(layout.lengths), layout.width, dtype=torch.int32)
    for row, lengths in enumerate(layout.lengths):
        start = 0
        for length in [*lengths, layout.width - sum(lengths)]:
            starts[row, start:start + length] = start
            start += length
    return starts.to(device)


def within_documents(pattern_: Pattern, starts: torch.Tensor) -> MaskFn:
    """The pattern on positions within each document (``starts``: each position's document start),
    so that a document's sinks are its own first tokens. A pattern of i − j only is unchanged by the
    shift (within a document both move alike) and skips it."""
    if pattern_.relative:
        return pattern_.mask
    return lambda q_idx, kv_idx: pattern_.mask(q_idx - starts[q_idx], kv_idx - starts[kv_idx])


def document_mask(mask: MaskFn, ids: torch.Tensor, name: str) -> MaskFn:
    """``mask`` ∧ same document (attention-gym's ``generate_doc_mask_mod``), ``mask`` taking positions
    within the document (:func:`within_documents`)."""
    return and_masks(mask, _named(same_document(ids), name))


def document_masks(pattern_: Pattern, layout: Layout, device: torch.device | str = "cpu") -> list[MaskFn]:
    """Each tensor row's mask function: the pattern within each document ∧ same document, named with
    the row's document lengths. Padding positions (id −1) form a document of their own: real queries
    never see a padding key, and a padding query (whose output is not part of the result) sees
    padding keys, the diagonal at least, so no row of the mask is empty."""
    ids, starts = layout.document_ids(device), document_starts(layout, device)
    return [document_mask(_named(within_documents(pattern_, starts[row]), pattern_.name), ids[row],
                          _documents_name(lengths, layout.width))
            for row, lengths in enumerate(layout.lengths)]


def _documents_name(lengths: tuple[int, ...], width: int) -> str:
    padding = width - sum(lengths)
    return "documents_" + "_".join(map(str, lengths)) + (f"_padding_{padding}" if padding else "")


# Index arithmetic runs in int32, as FlexAttention's kernels run mask functions, over at most this
# many (query, key) pairs at a time: a few int32 temporaries of 16 Mi elements stay under 256 MiB.
CHUNK_PAIRS = 1 << 24
BLOCK = 128  # FlexAttention's default block size, for queries and keys


def _rows_per_chunk(n_kv: int) -> int:
    return max(1, CHUNK_PAIRS // max(n_kv, 1))


def dense_mask(mask: MaskFn, n_q: int, n_kv: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The ``(n_q, n_kv)`` boolean mask, evaluated from the mask function chunk by chunk of rows."""
    out = torch.empty(n_q, n_kv, dtype=torch.bool, device=device)
    kv_idx = torch.arange(n_kv, device=device, dtype=torch.int32)[None, :]
    step = _rows_per_chunk(n_kv)
    for start in range(0, n_q, step):
        q_idx = torch.arange(start, min(n_q, start + step), device=device, dtype=torch.int32)[:, None]
        out[start:start + q_idx.shape[0]] = mask(q_idx, kv_idx)
    return out


@cached_by_bytes(1 << 30)
def cached_dense_mask(pattern_: Pattern, n: int, device: str) -> torch.Tensor:
    return dense_mask(pattern_.mask, n, n, device)


@cached_by_bytes(1 << 30)
def cached_document_mask(pattern_: Pattern, layout: Layout, device: str) -> torch.Tensor:
    """The ``(rows, 1, width, width)`` boolean mask of a packed or padded batch (:func:`document_masks`)."""
    width = layout.width
    out = torch.empty(len(layout.lengths), 1, width, width, dtype=torch.bool, device=device)
    for row, mask in enumerate(document_masks(pattern_, layout, device)):
        out[row, 0] = dense_mask(mask, width, width, device)
    return out


def _classify(allowed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(full, partial) of ``(…, rows, keys)`` boolean blocks, reduced over their last two dims: full
    when every pair is allowed, partial when some but not all are."""
    full = allowed.flatten(-2).all(-1)
    return full, allowed.flatten(-2).any(-1) & ~full


def _block_classes_any(mask: MaskFn, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(full, partial) ``(blocks, blocks)`` of any mask function: rows of blocks in chunks. Pairs past
    n are not allowed, so a block holding any is never full (FlexAttention's own rule)."""
    nb = -(-n // BLOCK)
    full = torch.empty(nb, nb, dtype=torch.bool)
    partial = torch.empty_like(full)
    kv_idx = torch.arange(n, dtype=torch.int32)[None, :]
    step = max(1, _rows_per_chunk(n) // BLOCK)
    for first in range(0, nb, step):
        rows = range(first * BLOCK, min(n, (first + step) * BLOCK))
        allowed = torch.zeros(-(-len(rows) // BLOCK) * BLOCK, nb * BLOCK, dtype=torch.bool)
        q_idx = torch.arange(rows.start, rows.stop, dtype=torch.int32)[:, None]
        allowed[:len(rows), :n] = mask(q_idx, kv_idx).expand(len(rows), n)
        blocks = allowed.view(-1, BLOCK, nb, BLOCK).transpose(1, 2)
        full[first:first + blocks.shape[0]], partial[first:first + blocks.shape[0]] = _classify(blocks)
    return full, partial


def _block_classes_relative(mask: MaskFn, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(full, partial) of a mask of i − j only: block (a, c) holds the pairs i − j = (a − c)·BLOCK + r − s,
    so each of the 2·blocks − 1 diagonals is evaluated once on one block; the last row and column of
    blocks, cut by n, are evaluated as they are."""
    nb = -(-n // BLOCK)
    base = (nb - 1) * BLOCK  # keeps every index evaluated non-negative
    offsets = torch.arange(-(nb - 1), nb, dtype=torch.int32)
    r = torch.arange(BLOCK, dtype=torch.int32)
    diag_full = torch.empty(offsets.numel(), dtype=torch.bool)
    diag_partial = torch.empty_like(diag_full)
    step = max(1, CHUNK_PAIRS // (BLOCK * BLOCK))
    for first in range(0, offsets.numel(), step):
        d = offsets[first:first + step]
        q_idx = base + d[:, None, None] * BLOCK + r[None, :, None]
        allowed = mask(q_idx, (base + r)[None, None, :]).expand(d.numel(), BLOCK, BLOCK)
        diag_full[first:first + d.numel()], diag_partial[first:first + d.numel()] = _classify(allowed)
    blocks = torch.arange(nb)
    diagonal = blocks[:, None] - blocks[None, :] + nb - 1
    full, partial = diag_full[diagonal], diag_partial[diagonal]
    if n % BLOCK:  # the blocks cut by n: evaluated as they are
        full[-1], partial[-1] = _edge_classes(mask, n, rows=True)
        full[:, -1], partial[:, -1] = _edge_classes(mask, n, rows=False)
    return full, partial


def _edge_classes(mask: MaskFn, n: int, rows: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(full, partial) of the last row of blocks (``rows``) or the last column, cut by n: never full."""
    nb = -(-n // BLOCK)
    edge = torch.arange((nb - 1) * BLOCK, n, dtype=torch.int32)
    other = torch.arange(n, dtype=torch.int32)
    allowed = torch.zeros(BLOCK, nb * BLOCK, dtype=torch.bool)
    # rows: the edge's queries against every key; columns: every query against the edge's keys
    pairs = mask(edge[:, None], other[None, :]) if rows else mask(other[None, :], edge[:, None])
    allowed[:edge.numel(), :n] = pairs.expand(edge.numel(), n)
    return _classify(allowed.view(BLOCK, nb, BLOCK).transpose(0, 1))


def _with_sink_columns(classes: tuple[torch.Tensor, torch.Tensor], mask: MaskFn, sinks: int,
                       lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """A pattern with sinks: ``classes`` are its rule's, exact wherever a column of blocks holds no
    sink key; the columns holding the first ``sinks`` keys of some document (of ``lengths`` back to
    back) are evaluated as they are, against the row blocks of the documents they cross (other
    rows are in other documents: nothing allowed, as the rule's classes say), updated in place.
    Memory: one column of blocks over a chunk of rows at a time."""
    full, partial = classes
    width = sum(lengths)
    starts = list(itertools.accumulate(lengths, initial=0))[:-1]
    columns = sorted({c for start, length in zip(starts, lengths, strict=True) if length
                      for c in range(start // BLOCK, (start + min(sinks, length) - 1) // BLOCK + 1)})
    rows_per_chunk = max(BLOCK, _rows_per_chunk(BLOCK) // BLOCK * BLOCK)
    for c in columns:
        end = min(width, (c + 1) * BLOCK)
        keys = torch.arange(c * BLOCK, end, dtype=torch.int32)
        crossing = [(s, s + n) for s, n in zip(starts, lengths, strict=True) if s < end and s + n > c * BLOCK]
        first, last = min(s for s, _ in crossing) // BLOCK * BLOCK, max(e for _, e in crossing)
        for lo in range(first, last, rows_per_chunk):
            hi = min(last, lo + rows_per_chunk)
            allowed = torch.zeros(-(-(hi - lo) // BLOCK) * BLOCK, BLOCK, dtype=torch.bool)
            rows = torch.arange(lo, hi, dtype=torch.int32)[:, None]
            allowed[:hi - lo, :keys.numel()] = mask(rows, keys[None, :]).expand(hi - lo, keys.numel())
            blocks = slice(lo // BLOCK, lo // BLOCK + allowed.shape[0] // BLOCK)
            full[blocks, c], partial[blocks, c] = _classify(allowed.view(-1, BLOCK, BLOCK))
    return full, partial


def block_classes(pattern_: Pattern, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Which ``BLOCK × BLOCK`` blocks of an ``n × n`` problem are full and which partial (CPU)."""
    if pattern_.rule is not None:
        return _with_sink_columns(block_classes(pattern_.rule, n), pattern_.mask, pattern_.sinks, [n])
    return (_block_classes_relative if pattern_.relative else _block_classes_any)(pattern_.mask, n)


def _block_mask(full: torch.Tensor, partial: torch.Tensor, mask_mod: Callable[..., torch.Tensor], n: int,
                device: str) -> Any:
    """A FlexAttention BlockMask from block classes ``(rows, blocks, blocks)`` (one row: broadcast
    over the batch)."""
    from torch.nn.attention.flex_attention import BlockMask

    def ordered(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Per query block: how many key blocks, and their indices first (stable: ascending).
        count = blocks.sum(-1, dtype=torch.int32)
        indices = torch.argsort(blocks.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
        return count[:, None].to(device), indices[:, None].to(device)

    return BlockMask.from_kv_blocks(*ordered(partial), *ordered(full), BLOCK_SIZE=BLOCK, mask_mod=mask_mod,
                                    seq_lengths=(n, n))


@cached_by_bytes(256 << 20)
def block_mask(pattern_: Pattern, n: int, device: str) -> Any:
    """FlexAttention block mask for an ``n × n`` problem, built once per (pattern, n, device) from
    :func:`block_classes`: never an n × n temporary (``create_block_mask`` evaluates the whole grid)."""
    def mask_mod(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        return pattern_.mask(q_idx, kv_idx)

    full, partial = block_classes(pattern_, n)
    return _block_mask(full[None], partial[None], mask_mod, n, device)


def _documents_block_classes(pattern_: Pattern, lengths: tuple[int, ...], width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(full, partial) blocks of one row of documents (``lengths`` back to back from 0, then padding
    up to ``width`` as a document of its own) under the pattern ∧ same document, the pattern being
    of i − j only. Per document, block (a, c) holds its rows R and keys C of that document, both
    intervals, so the offsets i − j of their pairs are exactly the interval [min R − max C,
    max R − min C]: some pair is allowed when the pattern allows an offset there (one prefix sum
    over the 2·width − 1 offsets, each evaluated once), and the block is full when it lies inside
    one document, is not cut by the row's end, and the pattern allows the whole interval."""
    nb = -(-width // BLOCK)
    offsets = torch.arange(2 * width - 1, dtype=torch.int32)  # δ + width − 1 for δ = i − j
    allowed = pattern_.mask(offsets, torch.tensor(width - 1, dtype=torch.int32))
    prefix = torch.nn.functional.pad(allowed.to(torch.int64).cumsum(0), (1, 0))
    full = torch.zeros(nb, nb, dtype=torch.bool)
    reached = torch.zeros_like(full)
    start = 0
    for length in [*lengths, width - sum(lengths)]:
        if length:
            end = start + length
            blocks = torch.arange(start // BLOCK, (end - 1) // BLOCK + 1)
            lo, hi = (blocks * BLOCK).clamp(min=start), ((blocks + 1) * BLOCK).clamp(max=end)  # rows [lo, hi) of it
            low, high = lo[:, None] - (hi[None, :] - 1), (hi[:, None] - 1) - lo[None, :]
            count = prefix[high + width] - prefix[low + width - 1]
            whole = hi - lo == BLOCK
            grid = (blocks[:, None], blocks[None, :])
            reached[grid] |= count > 0
            full[grid] |= (count == high - low + 1) & whole[:, None] & whole[None, :]
        start += length
    return full, reached & ~full


def document_block_classes(pattern_: Pattern, layout: Layout) -> tuple[torch.Tensor, torch.Tensor]:
    """(full, partial) ``(rows, blocks, blocks)`` of a packed or padded batch's :func:`document_masks`:
    from the offsets within each document for a pattern of i − j only (with sinks: its rule's, plus
    the sink keys' columns), else by the general classifier (rows of blocks chunk by chunk, work ∝
    width² per row)."""
    if pattern_.relative:
        rows = [_documents_block_classes(pattern_, lengths, layout.width) for lengths in layout.lengths]
    elif pattern_.rule is not None:  # the rule's, from the offsets, and the sink keys' columns
        rows = [_with_sink_columns(_documents_block_classes(pattern_.rule, lengths, layout.width), mask,
                                   pattern_.sinks, [*lengths, layout.width - sum(lengths)])
                for lengths, mask in zip(layout.lengths, document_masks(pattern_, layout), strict=True)]
    else:
        rows = [_block_classes_any(mask, layout.width) for mask in document_masks(pattern_, layout)]
    return torch.stack([full for full, _ in rows]), torch.stack([partial for _, partial in rows])


@cached_by_bytes(256 << 20)
def document_block_mask(pattern_: Pattern, layout: Layout, device: str) -> Any:
    """FlexAttention block mask of a packed or padded batch, one row of blocks per tensor row, from
    :func:`document_block_classes`: never a width × width temporary."""
    ids, starts = layout.document_ids(device), document_starts(layout, device)

    def mask_mod(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        # document_masks' mask of row b, written without naming a function (compiled kernels trace it)
        return within_documents(pattern_, starts[b])(q_idx, kv_idx) & same_document(ids[b])(q_idx, kv_idx)

    return _block_mask(*document_block_classes(pattern_, layout), mask_mod, layout.width, device)


def expand_block_mask(bm: Any, n: int, row: int = 0) -> torch.Tensor:
    """The element-level mask a BlockMask really applies to batch row ``row``: full blocks entirely,
    partial blocks through its mask_mod, everything else masked. Used to check the block mask
    against the dense one."""
    size_q, size_kv = bm.BLOCK_SIZE
    idx = torch.arange(n)
    full = torch.zeros(n, n, dtype=torch.bool)
    partial = torch.zeros_like(full)
    for counts, indices, target in ((bm.kv_num_blocks, bm.kv_indices, partial),
                                    (bm.full_kv_num_blocks, bm.full_kv_indices, full)):
        if counts is None:
            continue
        for qb in range(counts.shape[-1]):
            for kb in indices[row, 0, qb, : counts[row, 0, qb]].tolist():
                target[qb * size_q:(qb + 1) * size_q, kb * size_kv:(kb + 1) * size_kv] = True
    zero = torch.zeros((), dtype=torch.long)
    mod = bm.mask_mod(torch.tensor(row), zero, idx[:, None], idx[None, :]).expand(n, n)
    return full | (partial & mod)


def xformers_bias(pattern_: Pattern) -> Any | None:
    """The xformers ``attn_bias`` object expressing this pattern, or None when xformers has none."""
    return make_xformers_bias(pattern_.xformers)


@cached_by_bytes(256 << 20)
def allowed_per_row(pattern_: Pattern, n: int) -> torch.Tensor:
    """Exact number of allowed keys for each query row (int64, length n), counted from the mask
    function: for a mask of i − j only, row i counts the offsets i − n + 1 … i, one prefix sum over
    the 2n − 1 offsets (with sinks: the rule's counts plus the sink keys beyond it, n × sinks pairs);
    otherwise chunk by chunk of rows."""
    if pattern_.rule is not None:
        extra = torch.zeros(n, dtype=torch.int64)
        keys = torch.arange(min(pattern_.sinks, n), dtype=torch.int32)[None, :]
        for start in range(0, n, _rows_per_chunk(keys.numel())):
            q_idx = torch.arange(start, min(n, start + _rows_per_chunk(keys.numel())), dtype=torch.int32)[:, None]
            beyond = pattern_.mask(q_idx, keys) & ~pattern_.rule.mask(q_idx, keys)
            extra[start:start + q_idx.shape[0]] = beyond.expand(q_idx.shape[0], keys.numel()).sum(-1)
        return allowed_per_row(pattern_.rule, n) + extra
    if pattern_.relative:
        base = n - 1  # offsets δ = i − j ∈ [−(n − 1), n − 1] evaluated as query base + δ, key base
        allowed = pattern_.mask(torch.arange(2 * n - 1, dtype=torch.int32), torch.tensor(base, dtype=torch.int32))
        prefix = torch.nn.functional.pad(allowed.to(torch.int64).cumsum(0), (1, 0))
        rows = torch.arange(n)
        return prefix[rows + n] - prefix[rows]
    counts = torch.empty(n, dtype=torch.int64)
    kv_idx = torch.arange(n, dtype=torch.int32)[None, :]
    step = _rows_per_chunk(n)
    for start in range(0, n, step):
        q_idx = torch.arange(start, min(n, start + step), dtype=torch.int32)[:, None]
        counts[start:start + q_idx.shape[0]] = pattern_.mask(q_idx, kv_idx).expand(-1, n).sum(-1)
    return counts


@cached_by_bytes(256 << 20)
def reachable_keys(pattern_: Pattern, n: int, rows_per_chunk: int = 64) -> torch.Tensor:
    """Positions j < n of a prefix that some query i ≥ n may attend to (int64, ascending): what a
    decode cache keeps. The queries [n, n + period) decide it (see :attr:`Pattern.period`)."""
    keys = torch.arange(n)[None, :]
    reached = torch.zeros(n, dtype=torch.bool)
    for start in range(n, n + pattern_.period, rows_per_chunk):
        q_idx = torch.arange(start, min(n + pattern_.period, start + rows_per_chunk))[:, None]
        reached |= pattern_.mask(q_idx, keys).expand(q_idx.shape[0], n).any(0)
    return reached.nonzero().flatten()
