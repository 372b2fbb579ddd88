"""Sparse Transformer patterns — local window, atrous (dilated), strided (local ∪ atrous).

Layout ``(batch, heads, seq, head_dim)``. Each pattern is one mask function (:mod:`variants.masks`),
the definition the references, FLOPs and the mask-based impls derive from:

* ``dense``: SDPA with the dense boolean mask — O(n²) memory, what a user gets without a kernel;
* ``flex``: FlexAttention with the block mask (compiled on CUDA; eager and forward-only on CPU);
* ``xformers`` (local): xformers' own local attention bias.

The structure-exploiting impls build no mask: each pattern is written as parts (tiles of rows
against tiles of keys, full, causal or anticausal; :mod:`variants.merged`), each part one fused
kernel call, merged exactly by log-sum-exp where parts share rows. The tests check that the parts
allow exactly the pairs of the mask.

* ``blocked`` (local): blocks of w against their own block and their two neighbours;
* ``reshape`` (atrous): the ``rate`` interleaved subsequences, each attended without mask;
* ``merged`` (strided): the local parts plus the residue-class keys beyond the window.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from . import masks
from .decode import (
    Attend,
    Decoder,
    MaskOf,
    boolean_mask,
    kv_decoder,
    sdpa_attend,
    xformers_attend,
    xformers_mask_of,
)
from .layouts import sum_over_sequences
from .merged import Part, Relation, Tiles, describe, merged_attention
from .reference import softmax_attention
from .registry import Capabilities, Entry, Point, register
from .xformers_ops import xformers_attention, xformers_kernel, xformers_unsupported


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


# --- the patterns as parts (variants.merged): no mask anywhere ------------------------------------

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


# --- the impls -----------------------------------------------------------------------------------

def _dense(sparsity: str):
    def forward(q, k, v, *, causal: bool, **params) -> torch.Tensor:
        mask = masks.cached_dense_mask(_pattern(sparsity, causal, params), q.shape[-2], str(q.device))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

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
    def forward(q, k, v, *, causal: bool, **params) -> torch.Tensor:
        from torch.nn.attention.flex_attention import flex_attention

        bm = masks.block_mask(_pattern(sparsity, causal, params), q.shape[-2], str(q.device))
        # Eager flex (CPU) is FlexAttention's unfused reference: used by the tests, never timed.
        fn = _compiled_flex() if q.is_cuda else flex_attention
        return fn(q, k, v, block_mask=bm)

    return forward


def local_blocked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool,
                  window: int) -> torch.Tensor:
    return merged_attention(q, k, v, local_parts(q.shape[-2], window, causal))


def atrous_reshape(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool,
                   rate: int) -> torch.Tensor:
    return merged_attention(q, k, v, atrous_parts(q.shape[-2], rate, causal))


def strided_merged(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, window: int,
                   rate: int) -> torch.Tensor:
    return merged_attention(q, k, v, strided_parts(q.shape[-2], window, rate, causal))


def _parts_kernel(build, tiles: str):
    """``kernel(point)``: what :func:`merged_attention` runs for the point's parts."""
    def kernel(point: Point) -> str:
        parts = build(point.seq_len, causal=point.causal, **point.params)
        return describe(parts, point.seq_len, point.device, point.torch_dtype, point.head_dim, tiles)

    return kernel


def local_xformers(q, k, v, *, causal: bool, window: int) -> torch.Tensor:
    return xformers_attention(q, k, v, _pattern("local", causal, {"window": window}).xformers)


# --- decoding: a KV cache of what the pattern can still reach ------------------------------------

def _local_window_bias(mask: torch.Tensor | None, keys: torch.Tensor, params: dict) -> masks.BiasSpec | None:
    """A local decode step reads the window and the new tokens; several new tokens see them through
    xformers' own local bias, aligned bottom-right (the keys the plan reads end with them)."""
    return None if mask is None else masks.local_bias(params["window"], 0)


def _pattern_decoder(sparsity: str, attend: Attend, what: str, mask_of: MaskOf = boolean_mask) -> Decoder:
    return kv_decoder(lambda params: _pattern(sparsity, True, params), attend,
                      f"{what} over the keys the pattern reaches (window, residue class) of the KV cache", mask_of)


FLEX_CAPS = Capabilities(
    devices=frozenset({"cuda"}),
    device_reason="on CPU FlexAttention has no backward, and its forward is either unfused (the n² "
                  "scores materialised: not a sparse kernel) or compiled per shape (~18 s the first)")

PATTERN_DEFAULTS = {
    "local": {"window": 256},
    "atrous": {"rate": 8},
    "strided": {"window": 128, "rate": 128},
}

@dataclass(frozen=True)
class StructuredImpl:
    """The structure-exploiting impl of a pattern."""

    impl: str
    forward: Callable[..., torch.Tensor]
    kernel_name: Callable[[Point], str]
    summary: str


STRUCTURED = {
    "local": StructuredImpl("blocked", local_blocked, _parts_kernel(local_parts, "tiles"),
                            "blocks of w against their own and neighbouring blocks (full, causal, "
                            "anticausal fused calls) merged by log-sum-exp, O(n·w) memory"),
    "atrous": StructuredImpl("reshape", atrous_reshape, _parts_kernel(atrous_parts, "residue classes"),
                             "rate interleaved subsequences, each attended without mask, O(n²/rate) memory"),
    "strided": StructuredImpl("merged", strided_merged, _parts_kernel(strided_parts, "tiles"),
                              "local parts ⊕ residue-class parts beyond the window, fused calls merged by "
                              "log-sum-exp"),
}

for _sparsity, _defaults in PATTERN_DEFAULTS.items():
    # One decode path per pattern: every impl of it computes the same function, so keeps the same cache.
    _common = dict(family="sparse", reference=_reference(_sparsity), flops=sparse_flops(_sparsity),
                   params=_defaults, decoder=_pattern_decoder(_sparsity, sdpa_attend, "sdpa"))
    register(Entry(_sparsity, "dense", forward=_dense(_sparsity),
                   kernel_name=lambda p: "sdpa with dense bool mask",
                   summary="SDPA with the dense boolean mask, O(n²) memory", **_common))
    register(Entry(_sparsity, "flex", forward=_flex(_sparsity), caps=FLEX_CAPS,
                   kernel_name=lambda p: "flex_attention (torch.compile)",
                   summary="FlexAttention with the block mask", **_common))
    _structured = STRUCTURED[_sparsity]
    register(Entry(_sparsity, _structured.impl, forward=_structured.forward, kernel_name=_structured.kernel_name,
                   summary=_structured.summary, **_common))

register(Entry(
    "local", "xformers", "sparse", local_xformers, _reference("local"), sparse_flops("local"),
    params=PATTERN_DEFAULTS["local"],
    caps=Capabilities(requires=("xformers",), probe=lambda p: xformers_unsupported(
        p, _pattern("local", p.causal, dict(p.params)).xformers)),
    kernel_name=lambda p: xformers_kernel(p, _pattern("local", p.causal, dict(p.params)).xformers),
    decoder=_pattern_decoder("local", xformers_attend, "xformers memory_efficient_attention",
                             xformers_mask_of(_local_window_bias)),
    summary="xformers memory_efficient_attention with its local attention bias"))
