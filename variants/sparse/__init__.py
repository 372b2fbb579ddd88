"""Sparse Transformer patterns — local window, atrous (dilated), strided (local ∪ atrous) — and
attention sinks: StreamingLLM's ``sinks`` (the first s keys ∪ a causal window, here) and gpt-oss's
``sink-logit`` (a per-head logit in the denominator over a window, :mod:`.sink_logit`).

Layout ``(batch, heads, seq, head_dim)``. Each pattern is one mask function (:mod:`variants.masks`),
the definition the references, FLOPs and the mask-based impls derive from:

* ``dense``: SDPA with the dense boolean mask — O(n²) memory, what a user gets without a kernel;
* ``flex``: FlexAttention with the block mask (compiled on CUDA; eager and forward-only on CPU);
* ``xformers`` (local): xformers' own local attention bias.

The structure-exploiting impls build no mask: each pattern is written as parts (tiles of rows
against tiles of keys, full, causal or anticausal; :mod:`variants.sparse.merged`), each part one fused
kernel call, merged exactly by log-sum-exp where parts share rows. The tests check that the parts
allow exactly the pairs of the mask.

* ``blocked`` (local): blocks of w against their own block and their two neighbours;
* ``reshape`` (atrous): the ``rate`` interleaved subsequences, each attended without mask;
* ``merged`` (strided): the local parts plus the residue-class keys beyond the window; (sinks):
  the local parts plus the sink keys beyond the window.

Grouped-query heads and documents (:mod:`variants.layouts`). Every impl takes fewer K/V heads than
query heads without repeating K and V: SDPA's and FlexAttention's ``enable_gqa``, xformers' 5-D
form, and the parts run each group member's query heads against K and V as they are. A packed
batch's mask is the pattern, on positions within each document, ∧ same document
(:func:`masks.document_masks`): exactly the pattern within each document, a document's sinks its own
first tokens; the structured impls build their parts per document, shifted to where it starts. A
padded batch masks the padding keys (dense, flex); causal, the parts need no mask there (padding
keys come after every real query's keys), non-causal they cannot take one and refuse.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from .. import masks
from ..decode import (
    Attend,
    Decoder,
    MaskOf,
    boolean_mask,
    kv_decoder,
    sdpa_attend,
    xformers_attend,
    xformers_mask_of,
)
from ..layouts import LAYOUTS, PACKED, PADDED, Layout, layout_of, sum_over_sequences
from ..reference import softmax_attention
from ..registry import DECODE, Capabilities, Entry, Point, register
from ..xformers_ops import (
    BiasSpec,
    local_bias,
    window_bias,
    xformers_attention,
    xformers_kernel,
    xformers_unsupported,
)
from .merged import Part, Relation, Tiles, describe, merged_attention


def _pattern(sparsity: str, causal: bool, params: dict) -> masks.Pattern:
    return masks.pattern(sparsity, causal, **params)


def sparse_flops(sparsity: str):
    """Useful work: 4·d FLOPs per allowed (query, key) pair of each sequence (document), counted exactly
    from the mask."""
    def flops(point: Point) -> float:
        pattern = _pattern(sparsity, point.causal, dict(point.params))
        return sum_over_sequences(point, lambda n: 4.0 * point.head_dim * float(masks.allowed_per_row(pattern, n).sum()))

    return flops


def _reference(sparsity: str):
    def reference(q, k, v, *, causal: bool, **params) -> torch.Tensor:
        mask = masks.dense_mask(_pattern(sparsity, causal, params).mask, q.shape[-2], k.shape[-2], q.device)
        return softmax_attention(q, k, v, mask)

    return reference


# --- the patterns as parts (variants.sparse.merged): no mask anywhere ------------------------------------

def _blocks(first: int, count: int, block: int) -> Tiles:
    """Blocks ``first .. first+count-1`` of size ``block``."""
    return Tiles(start=first * block, step=block, count=count, stride=1, length=block)


def _span(start: int, length: int) -> Tiles:
    return Tiles(start=start, step=length, count=1, stride=1, length=length)


@functools.lru_cache(maxsize=256)
def local_parts(n: int, window: int, causal: bool) -> tuple[Part, ...]:
    """|i − j| <= w as parts. With blocks of exactly w (a = i − block start, c = j − block start),
    block I sees all of block I, block I+1 where c <= a (causal) and block I−1 where c >= a
    (anticausal): nothing else is within w. A partial tail block of r < w keys gets its own
    square or full parts."""
    same: Relation = "causal" if causal else "full"
    block = max(window, 1)
    full, tail = divmod(n, block)
    parts = []
    if full:
        parts.append(Part(_blocks(0, full, block), _blocks(0, full, block), same))
    if tail:
        parts.append(Part(_span(full * block, tail), _span(full * block, tail), same))
    if window == 0:  # blocks of 1: the diagonal alone
        return tuple(parts)
    if full > 1:
        parts.append(Part(_blocks(1, full - 1, block), _blocks(0, full - 1, block), "anticausal"))
        if not causal:
            parts.append(Part(_blocks(0, full - 1, block), _blocks(1, full - 1, block), "causal"))
    if tail and full:
        last, end = (full - 1) * block, full * block
        # Tail rows (a < r) against the last full block: c >= a, so keys [0, r) anticausal and
        # keys [r, w) all allowed.
        parts += [Part(_span(end, tail), _span(last, tail), "anticausal"),
                  Part(_span(end, tail), _span(last + tail, block - tail), "full")]
        if not causal:
            # The last full block against the tail keys (c < r): c <= a, so rows [0, r) causal
            # and rows [r, w) see every tail key.
            parts += [Part(_span(last, tail), _span(end, tail), "causal"),
                      Part(_span(last + tail, block - tail), _span(end, tail), "full")]
    return tuple(parts)


def _residue_groups(n: int, rate: int) -> list[Tiles]:
    """The residue classes r + t·rate, grouped by length: the first n mod rate classes hold one
    position more than the others."""
    length, longer = divmod(n, rate)
    groups = [Tiles(start=0, step=1, count=longer, stride=rate, length=length + 1)] if longer else []
    if length:
        groups.append(Tiles(start=longer, step=1, count=rate - longer, stride=rate, length=length))
    return groups


@functools.lru_cache(maxsize=256)
def atrous_parts(n: int, rate: int, causal: bool) -> tuple[Part, ...]:
    """(i − j) mod rate == 0: attention inside each residue class, full or causal."""
    return tuple(Part(g, g, "causal" if causal else "full") for g in _residue_groups(n, rate))


@functools.lru_cache(maxsize=256)
def strided_parts(n: int, window: int, rate: int, causal: bool) -> tuple[Part, ...]:
    """Local ∪ atrous = the local parts plus the atrous keys beyond the window. In a residue class
    slots s, t are |s − t|·rate apart, beyond w when |s − t| > u = w // rate: keys t <= s − u − 1
    (rows from slot u + 1 against keys from slot 0, causal) and, non-causal, t >= s + u + 1
    (rows from slot 0 against keys from slot u + 1, anticausal)."""
    parts = list(local_parts(n, window, causal))
    skip = window // rate + 1
    for g in _residue_groups(n, rate):
        if g.length <= skip:
            continue
        early = replace(g, length=g.length - skip)
        late = replace(early, start=g.start + skip * rate)
        parts.append(Part(late, early, "causal"))
        if not causal:
            parts.append(Part(early, late, "anticausal"))
    return tuple(parts)


SINKS_CAUSAL_ONLY = ("StreamingLLM's sinks stand in for the evicted past of a causal stream; a non-causal "
                     "pattern with sinks has no published definition")


@functools.lru_cache(maxsize=256)
def sink_parts(n: int, window: int, sinks: int, causal: bool) -> tuple[Part, ...]:
    """(j < s ∨ i − j <= w) ∧ j <= i: the causal local parts plus the sink keys beyond the window,
    j < min(s, i − w): rows w + 1 + a against keys c <= a (causal, while a < s − 1), then every row
    from s + w against all s sinks (full). No key is counted twice."""
    if not causal:
        raise ValueError(SINKS_CAUSAL_ONLY)
    parts = list(local_parts(n, window, True))
    stair = min(sinks - 1, n - window - 1)
    if stair > 0:
        parts.append(Part(_span(window + 1, stair), _span(0, stair), "causal"))
    if n > sinks + window:
        parts.append(Part(_span(sinks + window, n - sinks - window), _span(0, sinks), "full"))
    return tuple(parts)


PartsOf = Callable[..., tuple[Part, ...]]  # (n, causal=, **params) -> the pattern's parts over n positions


def _shifted(part: Part, by: int) -> Part:
    return Part(replace(part.rows, start=part.rows.start + by), replace(part.cols, start=part.cols.start + by),
                part.relation)


@functools.lru_cache(maxsize=64)
def document_parts(parts_of: PartsOf, lengths: tuple[int, ...], causal: bool,
                   params: tuple[tuple[str, int], ...]) -> tuple[Part, ...]:
    """A packed row's parts: each document's own, shifted to where it starts, so no part crosses a
    document boundary: the pattern within each document, sinks included."""
    parts, start = [], 0
    for length in lengths:
        parts += (_shifted(part, start) for part in parts_of(length, causal=causal, **dict(params)))
        start += length
    return tuple(parts)


PADDED_NON_CAUSAL = ("non-causal padded rows need their padding keys masked, and the parts run mask-free "
                     "kernels (causal padded rows need no mask: padding keys come after every real query's keys)")


def layout_parts(parts_of: PartsOf, n: int, causal: bool, params: dict, layout: Layout | None) -> tuple[Part, ...]:
    """The parts over a row of ``n`` tokens: the pattern's (dense, and padded causal: padding queries'
    outputs are not kept, and no real query reaches a padding key), or per document (packed)."""
    if layout is not None and layout.kind == PACKED:
        return document_parts(parts_of, layout.lengths[0], causal, tuple(sorted(params.items())))
    if layout is not None and not causal:
        raise ValueError(PADDED_NON_CAUSAL)
    return parts_of(n, causal=causal, **params)


# --- the impls -----------------------------------------------------------------------------------

def _grouped(q: torch.Tensor, k: torch.Tensor) -> bool:
    return q.shape[1] != k.shape[1]


def _dense(sparsity: str):
    def forward(q, k, v, *, causal: bool, layout: Layout | None = None, **params) -> torch.Tensor:
        """One SDPA call with the boolean mask of the pattern, or (packed, padded) of the pattern ∧ same
        document, one per row."""
        pattern, device = _pattern(sparsity, causal, params), str(q.device)
        mask = masks.cached_dense_mask(pattern, q.shape[-2], device) if layout is None \
            else masks.cached_document_mask(pattern, layout, device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=_grouped(q, k))

    return forward


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    # Every (shape, dtype, mask) is its own compilation; past dynamo's default limit of 8 it would
    # silently fall back to the unfused eager path, so a sweep's later points would lie.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 4096)
    torch._dynamo.config.accumulated_recompile_limit = max(torch._dynamo.config.accumulated_recompile_limit, 4096)
    return torch.compile(flex_attention, dynamic=False)


def _flex(sparsity: str):
    def forward(q, k, v, *, causal: bool, layout: Layout | None = None, **params) -> torch.Tensor:
        """One FlexAttention call with the block mask of the pattern, or (packed, padded) of the
        pattern ∧ same document, one row of blocks per tensor row."""
        from torch.nn.attention.flex_attention import flex_attention

        pattern, device = _pattern(sparsity, causal, params), str(q.device)
        bm = masks.block_mask(pattern, q.shape[-2], device) if layout is None \
            else masks.document_block_mask(pattern, layout, device)
        # Eager flex (CPU) is FlexAttention's unfused reference: used by the tests, never timed.
        fn = _compiled_flex() if q.is_cuda else flex_attention
        return fn(q, k, v, block_mask=bm, enable_gqa=_grouped(q, k))

    return forward


def _mask_kernel(what: str, packed: str, padded: str):
    """``kernel(point)`` of a mask-based impl: ``what`` runs, with the mask of the layout."""
    def kernel(point: Point) -> str:
        how = {PACKED: packed, PADDED: padded}.get(point.layout, "")
        return what + how + (", enable_gqa" if point.grouped else "")

    return kernel


def _structured(parts_of: PartsOf):
    def forward(q, k, v, *, causal: bool, layout: Layout | None = None, **params) -> torch.Tensor:
        return merged_attention(q, k, v, layout_parts(parts_of, q.shape[-2], causal, params, layout))

    return forward


def _parts_kernel(parts_of: PartsOf, tiles: str, sink: bool = False):
    """``kernel(point)``: what :func:`merged_attention` runs for the point's parts (with a sink logit)."""
    def kernel(point: Point) -> str:
        layout = layout_of(point)
        n = point.seq_len if layout is None else layout.width
        parts = layout_parts(parts_of, n, point.causal, dict(point.params), layout)
        text = describe(parts, n, point.device, point.torch_dtype, point.head_dim, tiles, sink)
        if layout is not None:
            text += (f", in {len(layout.lengths[0])} packed documents" if layout.kind == PACKED
                     else f", in {len(layout.lengths)} padded rows, no mask")
        if point.grouped:
            text += f", each of {point.heads // point.n_kv_heads} query heads per K/V head against K/V as they are"
        return text

    return kernel


def structured_refusal(point: Point) -> str | None:
    return PADDED_NON_CAUSAL if point.layout == PADDED and not point.causal and point.mode != DECODE else None


def _local_xformers_bias(point: Point, layout: Layout | None) -> BiasSpec | None:
    return window_bias(point.params["window"], point.causal, layout)


def local_xformers(q, k, v, *, causal: bool, window: int, layout: Layout | None = None) -> torch.Tensor:
    """One memory_efficient_attention call with xformers' local bias: block-diagonal when packed
    (causal only: xformers has no non-causal one), the dense one when padded and causal."""
    return xformers_attention(q, k, v, window_bias(window, causal, layout))


# --- decoding: a KV cache of what the pattern can still reach ------------------------------------

def _local_window_bias(mask: torch.Tensor | None, keys: torch.Tensor, params: dict) -> BiasSpec | None:
    """A local decode step reads the window and the new tokens; several new tokens see them through
    xformers' own local bias, aligned bottom-right (the keys the plan reads end with them)."""
    return None if mask is None else local_bias(params["window"], 0)


def _pattern_decoder(sparsity: str, attend: Attend, what: str, mask_of: MaskOf = boolean_mask) -> Decoder:
    return kv_decoder(lambda params: _pattern(sparsity, True, params), attend,
                      f"{what} over the keys the pattern reaches (window, residue class) of the KV cache", mask_of)


ALL_LAYOUTS = frozenset(LAYOUTS)
FLEX_CAPS = Capabilities(
    devices=frozenset({"cuda"}), layouts=ALL_LAYOUTS, gqa=True,
    device_reason="on CPU FlexAttention has no backward, and its forward is either unfused (the n² "
                  "scores materialised: not a sparse kernel) or compiled per shape (~18 s the first)")

PATTERN_DEFAULTS = {
    "local": {"window": 256},
    "atrous": {"rate": 8},
    "strided": {"window": 128, "rate": 128},
    "sinks": {"sinks": 4, "window": 256},
}
CAUSAL_ONLY = {"sinks": SINKS_CAUSAL_ONLY}  # pattern -> why it refuses non-causal

@dataclass(frozen=True)
class StructuredImpl:
    """The structure-exploiting impl of a pattern."""

    impl: str
    parts_of: PartsOf
    tiles: str  # what its tiles are, for the kernel name
    summary: str


STRUCTURED = {
    "local": StructuredImpl("blocked", local_parts, "tiles",
                            "blocks of w against their own and neighbouring blocks (full, causal, "
                            "anticausal fused calls) merged by log-sum-exp, O(n·w) memory"),
    "atrous": StructuredImpl("reshape", atrous_parts, "residue classes",
                             "rate interleaved subsequences, each attended without mask, O(n²/rate) memory"),
    "strided": StructuredImpl("merged", strided_parts, "tiles",
                              "local parts ⊕ residue-class parts beyond the window, fused calls merged by "
                              "log-sum-exp"),
    "sinks": StructuredImpl("merged", sink_parts, "tiles",
                            "local parts ⊕ each row against the sink keys beyond its window (one causal, "
                            "one full fused call), merged by log-sum-exp, O(n·(w + s)) memory"),
}
STRUCTURED_CAPS = Capabilities(layouts=ALL_LAYOUTS, gqa=True, probe=structured_refusal)
DENSE_CAPS = Capabilities(layouts=ALL_LAYOUTS, gqa=True)


def _causal_only(caps: Capabilities, sparsity: str) -> Capabilities:
    if sparsity not in CAUSAL_ONLY:
        return caps
    return replace(caps, causal=frozenset({True}), causal_reason=CAUSAL_ONLY[sparsity])


for _sparsity, _defaults in PATTERN_DEFAULTS.items():
    # One decode path per pattern: every impl of it computes the same function, so keeps the same cache.
    _common = dict(family="sparse", reference=_reference(_sparsity), flops=sparse_flops(_sparsity),
                   params=_defaults, decoder=_pattern_decoder(_sparsity, sdpa_attend, "sdpa"))
    register(Entry(_sparsity, "dense", forward=_dense(_sparsity), caps=_causal_only(DENSE_CAPS, _sparsity),
                   kernel_name=_mask_kernel("sdpa with dense bool mask", " of pattern ∧ same document",
                                            " of pattern ∧ real keys, one per row"),
                   summary="SDPA with the dense boolean mask, O(n²) memory", **_common))
    register(Entry(_sparsity, "flex", forward=_flex(_sparsity), caps=_causal_only(FLEX_CAPS, _sparsity),
                   kernel_name=_mask_kernel("flex_attention (torch.compile)", " with the document block mask",
                                            " with a block mask per padded row"),
                   summary="FlexAttention with the block mask", **_common))
    _impl = STRUCTURED[_sparsity]
    register(Entry(_sparsity, _impl.impl, forward=_structured(_impl.parts_of),
                   caps=_causal_only(STRUCTURED_CAPS, _sparsity),
                   kernel_name=_parts_kernel(_impl.parts_of, _impl.tiles), summary=_impl.summary, **_common))

register(Entry(
    "local", "xformers", "sparse", local_xformers, _reference("local"), sparse_flops("local"),
    params=PATTERN_DEFAULTS["local"],
    caps=Capabilities(requires=("xformers",), layouts=ALL_LAYOUTS, gqa=True,
                      probe=lambda p: xformers_unsupported(p, _local_xformers_bias)),
    kernel_name=lambda p: xformers_kernel(p, _local_xformers_bias),
    decoder=_pattern_decoder("local", xformers_attend, "xformers memory_efficient_attention",
                             xformers_mask_of(_local_window_bias)),
    summary="xformers memory_efficient_attention with its local attention bias"))

from . import sink_logit  # noqa: E402, F401  (builds on the helpers above)
