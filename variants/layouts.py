"""The shapes real models run: grouped-query heads, packed documents and their padded twin.

Heads. A point has ``heads`` query heads and ``kv_heads`` key/value heads (default: as many); KV
head ``j`` serves the ``group = heads // kv_heads`` consecutive query heads ``j·group … (j+1)·group − 1``,
as SDPA's and FlexAttention's ``enable_gqa`` and FlashAttention's ``nheads_kv`` group them (one KV
head: multi-query attention). FLOPs are the query heads'; cache and state bytes follow the KV heads.

Documents. A named, seeded distribution (:data:`DISTRIBUTIONS`) splits each row of ``n`` tokens into
``count`` documents. Layouts of a batch of ``b`` rows:

* ``dense``: one sequence per row, ``(b, h, n, d)``;
* ``packed``: every row's documents back to back, and the rows folded into one row of ``b·n`` tokens
  (documents never span rows, so folding changes nothing: FlashAttention's varlen, cu_seqlens
  convention), ``(1, h, b·n, d)``. No query attends across a document boundary; causal masking and
  every sparse pattern apply within each document; a linear attention state restarts at each one;
* ``padded``: the same documents one per row, padded to the longest, with padding keys masked: the
  baseline users run without a varlen kernel, ``(b·count, h, longest, d)``. Outputs at padding
  positions are not part of the result.

An entry's forward receives the :class:`Layout` (``layout=``) of a packed or padded batch. Its float64
reference stays the plain one; :func:`reference_attention` builds the reference of any heads and
layout from it explicitly: K and V repeated to the query heads, each document attended alone.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch

from .inputs import is_per_token, sliced

if TYPE_CHECKING:
    from .registry import Point

DENSE, PACKED, PADDED = "dense", "packed", "padded"
LAYOUTS = (DENSE, PACKED, PADDED)


# --- document lengths ----------------------------------------------------------------------------

def _equal(n: int, count: int, gen: torch.Generator) -> list[int]:
    """Lengths differing by at most one (FlashAttention's ``--varlen`` benchmark: equal sequences)."""
    base, longer = divmod(n, count)
    return [base + 1] * longer + [base] * (count - longer)


def _uniform(n: int, count: int, gen: torch.Generator) -> list[int]:
    """FlashInfer's draw: lengths uniform in [1, 2n/count] (mean n/count), conditioned on filling the
    row: count − 1 drawn, the last what is left, redrawn until that lies in the range too (the
    lengths are then exchangeable: iid uniform given their sum)."""
    high = max(1, 2 * n // count)
    while True:
        drawn = torch.randint(1, high + 1, (count - 1,), generator=gen)
        last = n - int(drawn.sum())
        if 1 <= last <= high:
            return [*drawn.tolist(), last]


def _multinomial(n: int, count: int, gen: torch.Generator) -> list[int]:
    """tritonbench's (and attention-gym's) document mask: one token per document, each further token to
    a uniformly random document."""
    extra = torch.multinomial(torch.ones(count), n - count, replacement=True, generator=gen) if n > count \
        else torch.zeros(0, dtype=torch.long)
    return (1 + torch.bincount(extra, minlength=count)).tolist()


# (row length n, documents per row, generator) -> the documents' lengths, summing to n
DISTRIBUTIONS: dict[str, Callable[[int, int, torch.Generator], list[int]]] = {
    "equal": _equal, "uniform": _uniform, "multinomial": _multinomial}


@dataclass(frozen=True)
class Documents:
    """How each row's ``n`` tokens are split: ``count`` documents from ``distribution``, seeded."""

    distribution: str = "uniform"
    count: int = 8
    seed: int = 0

    def lengths(self, n: int, rows: int) -> tuple[tuple[int, ...], ...]:
        """Each row's document lengths, in order; the same for the same (documents, n, rows)."""
        return _lengths(self, n, rows)


@functools.lru_cache(maxsize=256)
def _lengths(documents: Documents, n: int, rows: int) -> tuple[tuple[int, ...], ...]:
    gen = torch.Generator().manual_seed(documents.seed)
    draw = DISTRIBUTIONS[documents.distribution]
    return tuple(tuple(draw(n, documents.count, gen)) for _ in range(rows))


# --- layouts -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Layout:
    """What a forward is told of a packed or padded batch: each tensor row's document lengths.

    packed: one row holding every document back to back; padded: one document per row, starting at
    position 0, the rest of the row padding."""

    kind: str
    lengths: tuple[tuple[int, ...], ...]

    @property
    def width(self) -> int:
        """Tokens per tensor row."""
        return max(sum(row) for row in self.lengths) if self.kind == PACKED else max(r[0] for r in self.lengths)

    def spans(self) -> list[tuple[int, int, int]]:
        """``(row, start, length)`` of every document, in order."""
        spans = []
        for row, lengths in enumerate(self.lengths):
            start = 0
            for length in lengths:
                spans.append((row, start, length))
                start += length
        return spans

    def real(self, x: torch.Tensor) -> torch.Tensor:
        """The real tokens of ``x`` ``(rows, h, width, ·)``, every document in order, as ``(1, h, tokens, ·)``."""
        if self.kind == PACKED:
            return x
        return torch.cat([x[row:row + 1, :, start:start + length] for row, start, length in self.spans()], dim=2)

    def valid(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """``(rows, 1, width, 1)`` boolean: which positions hold a real token (not padding)."""
        positions = torch.arange(self.width, device=device)
        lengths = torch.tensor([sum(row) for row in self.lengths], device=device)
        return (positions[None, :] < lengths[:, None])[:, None, :, None]

    def key_mask(self, causal: bool, device: torch.device | str = "cpu") -> torch.Tensor:
        """Padded rows: ``(rows, 1, width, width)`` boolean, True where a query may attend a key — the
        key holds a real token (and, causal, lies at or before the query). What a dense kernel is
        given for a padded batch."""
        mask = self.valid(device)[:, :, None, :, 0]
        if causal:
            mask = mask & torch.ones(self.width, self.width, dtype=torch.bool, device=device).tril()
        return mask.expand(-1, -1, self.width, -1)

    def document_ids(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """Each position's document (packed: its index in the row; padded: 0, padding −1), int32 ``(rows, width)``."""
        ids = torch.full((len(self.lengths), self.width), -1, dtype=torch.int32)
        for index, (row, start, length) in enumerate(self.spans()):
            ids[row, start:start + length] = index if self.kind == PACKED else 0
        return ids.to(device)


def sequences(point: Point) -> list[int]:
    """The length of every sequence a point attends within: its documents, or its rows when dense.
    Decoding, a packed or padded batch is a serving batch: ``batch`` sequences whose cache lengths the
    distribution draws around ``seq_len`` (their total is batch × seq_len)."""
    from .registry import DECODE  # the registry imports this module

    if point.layout == DENSE:
        return [point.seq_len] * point.batch
    if point.mode == DECODE:
        documents = replace(point.documents, count=point.batch)
        return list(documents.lengths(point.seq_len * point.batch, 1)[0])
    return [length for row in point.documents.lengths(point.seq_len, point.batch) for length in row]


def layout_of(point: Point) -> Layout | None:
    """The :class:`Layout` a forward gets for this point (None when dense); decoding, one sequence
    per row, packed (each run at its own length) or padded."""
    from .registry import DECODE  # the registry imports this module

    if point.layout == DENSE:
        return None
    documents = sequences(point)
    if point.layout == PACKED and point.mode != DECODE:
        return Layout(PACKED, (tuple(documents),))
    return Layout(point.layout, tuple((length,) for length in documents))


def token_shape(point: Point) -> tuple[int, int]:
    """(rows, tokens per row) of the point's q, k and v."""
    layout = layout_of(point)
    return (point.batch, point.seq_len) if layout is None else (len(layout.lengths), layout.width)


def sum_over_sequences(point: Point, per_sequence: Callable[[int], float]) -> float:
    """Σ over the point's sequences (documents) of ``per_sequence(length)`` (the work of one head on
    one sequence), times the query heads: FLOPs that count only what lies inside documents."""
    by_length: dict[int, int] = {}
    for length in sequences(point):
        by_length[length] = by_length.get(length, 0) + 1
    return point.heads * sum(count * per_sequence(length) for length, count in by_length.items())


# --- heads ---------------------------------------------------------------------------------------

def repeat_kv(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``(b, kv_heads, n, d)`` repeated to ``heads`` query heads, each KV head over its group (a copy:
    for references and the eager impls that say so)."""
    return x if x.shape[1] == heads else x.repeat_interleave(heads // x.shape[1], dim=1)


def grouped(q: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """``(b, heads, n, d)`` queries as ``(b, kv_heads, group·n, d)``: each KV head's query group folded
    into its rows (a view when q is contiguous), so one KV head is read once for its whole group."""
    b, heads, n, d = q.shape
    return q.reshape(b, kv_heads, heads // kv_heads * n, d)


def ungrouped(out: torch.Tensor, heads: int) -> torch.Tensor:
    """The inverse of :func:`grouped` on an output ``(b, kv_heads, group·n, d)``."""
    b, kv_heads, rows, d = out.shape
    return out.reshape(b, heads, rows * kv_heads // heads, d)


# --- one document at a time ------------------------------------------------------------------------

# (q, k, v, causal, **extras) -> out
SequenceAttention = Callable[..., torch.Tensor]


def per_document(attend: SequenceAttention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool,
                 layout: Layout, **extras: torch.Tensor) -> torch.Tensor:
    """``attend`` on each document alone (views of its tokens and of its per-token ``extras``), its
    output placed where its queries are, zeros at padding: a packed batch for a kernel without varlen
    support, one call per document."""
    out = q.new_zeros((*q.shape[:-1], v.shape[-1]))
    for row, start, length in layout.spans():
        doc = (slice(row, row + 1), slice(None), slice(start, start + length))
        out[doc] = attend(q[doc], k[doc], v[doc], causal, **sliced(extras, doc))
    return out


# --- the reference of any heads and layout -------------------------------------------------------

def reference_attention(reference: Callable[..., torch.Tensor], q: torch.Tensor, k: torch.Tensor,
                        v: torch.Tensor, *, causal: bool, layout: Layout | None = None,
                        extras: dict[str, torch.Tensor] | None = None, **params) -> torch.Tensor:
    """``reference`` (an entry's plain float64 definition) for grouped heads and any layout, built
    explicitly: K and V (and the per-token ``extras``, which follow the KV heads) repeated to the
    query heads, each document attended alone and the outputs placed where its queries are (zeros at
    padding)."""
    heads = q.shape[1]
    k, v = repeat_kv(k, heads), repeat_kv(v, heads)
    extras = {name: repeat_kv(x, heads) if is_per_token(x) else x for name, x in (extras or {}).items()}
    if layout is None:
        return reference(q, k, v, causal=causal, **extras, **params)
    return per_document(lambda q_, k_, v_, causal_, **extras_: reference(q_, k_, v_, causal=causal_, **extras_,
                                                                         **params),
                        q, k, v, causal=causal, layout=layout, **extras)
