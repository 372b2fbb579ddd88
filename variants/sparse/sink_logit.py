"""gpt-oss's attention sinks: a learned logit per head in every row's softmax denominator, over a
sliding window (``sink-logit``).

``O_i = Σ_j e^{s_ij} v_j / (e^{sink_h} + Σ_j e^{s_ij})`` over the keys of the local window (causal or
not): the sink is a key of logit ``sink_h`` and value 0, letting a row put weight on nothing. The
window is the ``local`` pattern (:mod:`variants.masks`), so masks, FLOPs, parts and the decode cache
(the last w positions) are local's; the sink is an extra input (:mod:`variants.inputs`), one value
per query head, costing a cache nothing.

* ``dense``: eager scores with the dense mask, the sink in the log-sum-exp (O(n²) memory);
* ``merged``: local's parts merged by log-sum-exp from the sink (lse starts at it, out at 0), with
  its gradient ``dsink_h = −Σ_i p_sink,i · (dO_i · O_i)`` (:func:`merged.merged_attention`);
* ``flex``: FlexAttention's output and log-sum-exp, rescaled: ``O = O_flex · sigmoid(lse − sink)``.
"""

from __future__ import annotations

import math

import torch

from .. import masks
from ..decode import kv_decoder
from ..inputs import ExtraInput
from ..layouts import Layout
from ..registry import Entry, register
from . import (
    DENSE_CAPS,
    FLEX_CAPS,
    STRUCTURED_CAPS,
    _compiled_flex,
    _grouped,
    _mask_kernel,
    _parts_kernel,
    layout_parts,
    local_parts,
    sparse_flops,
)
from .merged import accumulation_dtype, merged_attention

SINK = ExtraInput("sink", per_token=False, summary="gpt-oss's learned sink logit of each query head")
WINDOW = "local"  # the pattern of the window


def _window(causal: bool, window: int) -> masks.Pattern:
    return masks.pattern(WINDOW, causal, window=window)


def reference(q, k, v, *, causal: bool, sink: torch.Tensor, window: int) -> torch.Tensor:
    """The definition, written out: numerators and the denominator with e^sink, shifted by the row's
    largest logit (the sink's included) so that nothing overflows."""
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    allowed = masks.dense_mask(_window(causal, window).mask, q.shape[-2], k.shape[-2], q.device)
    scores = scores.masked_fill(~allowed, float("-inf"))
    logit = sink.to(scores.dtype)[:, None, None]  # (heads, 1, 1): one per head
    top = torch.maximum(scores.amax(-1, keepdim=True), logit)
    weights = torch.exp(scores - top)
    return (weights @ v) / (torch.exp(logit - top) + weights.sum(-1, keepdim=True))


def sink_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                   sink: torch.Tensor) -> torch.Tensor:
    """Eager softmax attention with the sink in the log-sum-exp. q ``(b, heads, n_q, d)``, k and v
    ``(b, kv_heads, n_kv, d)`` read once per query group (no repeat), ``mask`` broadcasting to
    ``(b, 1, n_q, n_kv)`` (True: may attend) or None; in at least float32."""
    acc = accumulation_dtype(q.dtype)
    kv_heads = k.shape[1]
    q5 = q.to(acc).unflatten(1, (kv_heads, -1))  # (b, kv_heads, group, n_q, d)
    scores = (q5 @ k.to(acc)[:, :, None].transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))
    if mask is not None:
        scores = scores.masked_fill(~(mask[:, :, None] if mask.dim() == 4 else mask), float("-inf"))
    logit = sink.to(acc).view(1, kv_heads, -1, 1)
    lse = torch.logaddexp(torch.logsumexp(scores, -1), logit)
    out = torch.exp(scores - lse[..., None]) @ v.to(acc)[:, :, None]
    return out.flatten(1, 2).to(q.dtype)


def dense(q, k, v, *, causal: bool, sink: torch.Tensor, window: int, layout: Layout | None = None) -> torch.Tensor:
    pattern, device = _window(causal, window), str(q.device)
    mask = masks.cached_dense_mask(pattern, q.shape[-2], device) if layout is None \
        else masks.cached_document_mask(pattern, layout, device)
    return sink_attention(q, k, v, mask, sink)


def merged(q, k, v, *, causal: bool, sink: torch.Tensor, window: int, layout: Layout | None = None) -> torch.Tensor:
    parts = layout_parts(local_parts, q.shape[-2], causal, {"window": window}, layout)
    return merged_attention(q, k, v, parts, sink=sink)


def flex(q, k, v, *, causal: bool, sink: torch.Tensor, window: int, layout: Layout | None = None) -> torch.Tensor:
    """FlexAttention over the window, its output rescaled by the share the keys keep beside the sink:
    Σ_j e^{s_ij} / (e^{sink} + Σ_j e^{s_ij}) = sigmoid(lse − sink)."""
    from torch.nn.attention.flex_attention import AuxRequest, flex_attention

    pattern, device = _window(causal, window), str(q.device)
    bm = masks.block_mask(pattern, q.shape[-2], device) if layout is None \
        else masks.document_block_mask(pattern, layout, device)
    fn = _compiled_flex() if q.is_cuda else flex_attention  # eager on CPU: the tests' forward only
    out, aux = fn(q, k, v, block_mask=bm, enable_gqa=_grouped(q, k), return_aux=AuxRequest(lse=True))
    share = torch.sigmoid(aux.lse - sink.to(aux.lse.dtype)[:, None])
    return (out.to(share.dtype) * share[..., None]).to(q.dtype)


DEFAULTS = {"window": 128}
DECODER = kv_decoder(lambda params: _window(True, params["window"]), sink_attention,
                     "eager softmax with the sink logit over the window of the KV cache", inputs=("sink",))
_common = dict(family="sparse", reference=reference, flops=sparse_flops(WINDOW), params=DEFAULTS, decoder=DECODER,
               inputs=(SINK,))
register(Entry("sink-logit", "dense", forward=dense, caps=DENSE_CAPS,
               kernel_name=_mask_kernel("eager scores with dense bool mask, sink in the log-sum-exp",
                                        " of window ∧ same document", " of window ∧ real keys, one per row"),
               summary="eager softmax with the dense window mask and the sink logit, O(n²) memory", **_common))
register(Entry("sink-logit", "flex", forward=flex, caps=FLEX_CAPS,
               kernel_name=_mask_kernel("flex_attention (torch.compile) with lse, × sigmoid(lse − sink)",
                                        " with the document block mask", " with a block mask per padded row"),
               summary="FlexAttention with the window's block mask, rescaled by sigmoid(lse − sink)", **_common))
register(Entry("sink-logit", "merged", forward=merged, caps=STRUCTURED_CAPS,
               kernel_name=_parts_kernel(local_parts, "tiles", sink=True),
               summary="local's window parts merged by log-sum-exp starting from the sink logit, O(n·w) memory",
               **_common))
