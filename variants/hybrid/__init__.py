"""Hybrids: a linear attention and an exact sliding-window softmax attention over the same q, k and v,
their outputs summed per head.

``based`` (Arora et al. 2024, "Simple linear attention language models balance the recall-throughput
tradeoff"): the second-order Taylor linear attention (:data:`variants.linear.TAYLOR2`, d' = ``features``)
plus causal softmax attention over the last ``window`` keys (the sparse family's ``local`` pattern).
Each part is an existing entry used as it is — its impl, float64 reference, FLOPs, layouts, grouped
heads and decoder — and the hybrid adds them; nothing of either is written again here.

Causal only: Based is a causal language model's mixer, and its linear part is the chunked causal
recurrence (the window alone could look both ways; a non-causal linear part would be another impl).
"""

from __future__ import annotations

import functools
from collections.abc import Collection, Sequence
from dataclasses import replace

import torch

from .. import linear
from ..decode import summed_decoder
from ..layouts import Layout
from ..registry import AttentionFn, Entry, Point, get, own_params, register

CAUSAL_REASON = ("Based is a causal language model's mixer: its linear part is the chunked causal recurrence "
                 "(non-causal it would need the global state of another impl, linear)")


def _summed(fns: Sequence[tuple[AttentionFn, Collection[str]]]) -> AttentionFn:
    """Attention functions whose outputs add, each given only its own parameters ``names`` (and the
    layout of a packed or padded batch, to forwards)."""
    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, layout: Layout | None = None,
            **params) -> torch.Tensor:
        shape = {} if layout is None else {"layout": layout}
        return functools.reduce(torch.add, (fn(q, k, v, causal=causal, **shape, **own_params(params, names))
                                            for fn, names in fns))

    return run


def _at(point: Point, part: Entry) -> Point:
    return replace(point, params=own_params(point.params, part.params))


def hybrid(variant: str, impl: str, linear_part: Entry, window_part: Entry, params: dict[str, int],
           summary: str) -> Entry:
    """``linear_part`` + ``window_part``: forward, reference, FLOPs, kernel and decoder are the parts',
    added. Capabilities: the window part's (its devices, layouts, probe; the linear part runs every
    device, dtype, layout and grouping), causal only."""
    parts = (linear_part, window_part)
    window_probe = window_part.caps.probe
    caps = replace(window_part.caps, causal=linear_part.caps.causal & window_part.caps.causal & {True},
                   causal_reason=CAUSAL_REASON,
                   probe=None if window_probe is None else lambda point: window_probe(_at(point, window_part)))
    return Entry(
        variant, impl, "hybrid",
        forward=_summed([(part.forward, part.params) for part in parts]),
        reference=_summed([(part.reference, part.params) for part in parts]),
        flops=lambda point: sum(part.flops(_at(point, part)) for part in parts),
        params=params, caps=caps,
        kernel_name=lambda point: " + ".join(part.kernel_name(_at(point, part)) for part in parts),
        summary=summary,
        decoder=summed_decoder([(part.decoder, part.params) for part in parts]))


BASED_PARAMS = {"features": 16, "chunk": 64, "window": 64}
_TAYLOR2_CHUNKED = linear.linear_entry(linear.TAYLOR2, "chunked")

# On CPU the window runs best through the merged-parts path (local/blocked: no mask, O(n·w));
# on CUDA FlexAttention's block mask is the alternative.
for _impl, _window in (("chunked", "blocked"), ("flex", "flex")):
    register(hybrid("based", _impl, _TAYLOR2_CHUNKED, get("local", _window), BASED_PARAMS,
                    f"Based: 2nd-order Taylor linear attention (chunked) + causal sliding-window softmax "
                    f"(local/{_window}), summed"))
