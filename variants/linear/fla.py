"""Linear attention through flash-linear-attention (fla): ``linear-elu1/fla``, ``linear-relu/fla``,
``linear-taylor/fla``, ``performer/fla``.

The same function as ``variants.linear`` (same φ, same normaliser, same ε, same float64 reference):
φ is applied here, in this project's ``(batch, heads, seq, ·)`` layout, and fla's chunk op computes the
causal ``Σ_{j≤i} φ(q_i)·φ(k_j) v_j / (φ(q_i)·Σ_{j≤i} φ(k_j) + ε)`` on ``(batch, seq, heads, ·)`` views.

Packed rows run as fla's varlen form: one row, ``cu_seqlens`` marking each document, whose state
restarts (fla gives every sequence chunks of its own). Padded rows run as they are: their padding
comes after every real query, and Performer's stabiliser is taken over the real keys. Grouped-query
heads: fla's linear_attn takes as many key heads as query heads (its normaliser multiplies each query
head's φ(q) by the same head's running Σφ(k), and its chunk kernels read q and k at one head index;
only value heads may be more), so φ(K) — mapped once per KV head — and V are repeated to the query
heads: one state per query head, the copy timed with the rest, as the kernel column says.

fla's kernels are Triton GPU kernels, so ``fla`` is imported only when an entry runs. On CPU the adapter
(:func:`fla_linear_attention`) is tested over fla's own naive torch op instead of the kernel.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F

from ..layouts import LAYOUTS, PACKED, Layout, repeat_kv
from ..registry import DEFAULT_TOLERANCE, Capabilities, Entry, Point, get, register
from . import EPS, FEATURE_MAPS, FeatureMap, features

FLA_OP = "fla.ops.linear_attn.chunk_linear_attn"  # what runs, and what the kernel column says
FLA_CHUNK = 64  # chunk_linear_attn's fixed chunk size
FLA_EPS = 1e-10  # the ε fla adds to its normaliser (fla/ops/linear_attn/utils.py and naive.py)
# fla multiplies φ(q) by `scale` in the numerator and the normaliser alike, so it computes
# num / (den + FLA_EPS/scale): this scale makes its ε this project's EPS (scale=1 would leave 1e-10,
# 1% off the reference for performer, whose rows can sum to ~1e-6).
SCALE = FLA_EPS / EPS

NON_CAUSAL_REASON = ("fla's linear_attn ops (chunk, fused_chunk, fused_recurrent) compute only the causal "
                     "prefix; the linear impl computes non-causal")
# Triton's tl.dot multiplies float32 tiles in TF32 (a float16 mantissa) unless told otherwise; fla's
# chunk kernels don't tell it otherwise.
TOLERANCE = {**DEFAULT_TOLERANCE, "float32": DEFAULT_TOLERANCE["float16"]}

# (q, k, v in (batch, seq, heads, ·), *, scale, normalize) -> (output, final state)
LinearAttentionOp = Callable[..., tuple[torch.Tensor, Any]]


def fla_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, fmap: FeatureMap,
                         params: Mapping[str, Any], op: LinearAttentionOp,
                         layout: Layout | None = None) -> torch.Tensor:
    """Causal linear attention of ``fmap`` over ``(batch, heads, seq, head_dim)`` tensors (k, v with as
    many or fewer heads), computed by ``op`` (fla's chunk op, or its naive torch twin in tests) with
    fla's own normalisation; a packed ``layout`` as ``cu_seqlens``."""
    # φ here, not in fla's layout: performer's key map takes its maximum over (seq, features) of a
    # head's keys (of each document's, of a padded row's real ones).
    fq, fk = features(fmap, q, k, dict(params), layout)
    if fq.shape[-1] % 2:
        # fla's 16-bit backward asserts an even feature width; a zero feature changes no similarity.
        fq, fk = F.pad(fq, (0, 1)), F.pad(fk, (0, 1))
    fk, v = repeat_kv(fk, q.shape[1]), repeat_kv(v, q.shape[1])  # fla: as many key heads as query heads
    packed = layout is not None and layout.kind == PACKED
    varlen = {"cu_seqlens": _cu_seqlens(layout, str(q.device))} if packed else {}
    out, _ = op(fq.transpose(1, 2), fk.transpose(1, 2), v.transpose(1, 2), scale=SCALE, normalize=True, **varlen)
    return out.transpose(1, 2)


@functools.lru_cache(maxsize=32)
def _cu_seqlens(layout: Layout, device: str) -> torch.Tensor:
    """fla's (and FlashAttention's) varlen boundaries of a packed row: [0, end of each document]."""
    lengths = torch.tensor(layout.lengths[0], dtype=torch.long)
    return F.pad(torch.cumsum(lengths, 0), (1, 0)).to(device)


@functools.cache
def _fla_op() -> LinearAttentionOp:
    module, name = FLA_OP.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)  # imports Triton: only when an entry runs


def _forward(fmap: FeatureMap):
    def forward(q, k, v, *, causal: bool, layout: Layout | None = None, **params) -> torch.Tensor:
        if not causal:
            raise ValueError(f"{fmap.name}/fla: {NON_CAUSAL_REASON}")
        return fla_linear_attention(q, k, v, fmap, params, _fla_op(), layout)

    return forward


def probe(point: Point) -> str | None:
    """What the declared capabilities cannot say: Triton and a CUDA device present, and fla's
    16-bit limits."""
    if importlib.util.find_spec("triton") is None:
        return "triton not installed: fla's linear_attn kernels are Triton GPU kernels"
    if not torch.cuda.is_available():
        return "no CUDA device: fla's linear_attn kernels are Triton GPU kernels"
    if point.dtype == "float16":
        return (f"fla normalises in the input dtype, and in float16 its normaliser φ(q)·Σφ(k)·{SCALE:g} "
                "(scaled to set ε) falls into subnormals")
    if point.dtype == "bfloat16" and point.needs_grad and point.head_dim % 2:
        return f"head_dim={point.head_dim}: fla's 16-bit backward (chunk_bwd_dv) asserts an even value width"
    return None


CAPS = Capabilities(
    devices=frozenset({"cuda"}),
    dtypes=frozenset({"float32", "float16", "bfloat16"}),  # fla computes in float32 at most
    causal=frozenset({True}),
    layouts=frozenset(LAYOUTS),
    gqa=True,
    requires=("fla",),
    device_reason="fla's linear_attn kernels are Triton GPU kernels",
    causal_reason=NON_CAUSAL_REASON,
    probe=probe)


def kernel_name(point: Point) -> str:
    varlen = " varlen (cu_seqlens)" if point.layout == PACKED else ""
    return FLA_OP + varlen + (" on φ(K), V repeated to the query heads" if point.grouped else "")


def _flops(chunked: Entry) -> Callable[[Point], float]:
    """chunk_linear_attn does the work of the chunked impl at its fixed chunk size."""
    return lambda point: chunked.flops(replace(point, params={**point.params, "chunk": FLA_CHUNK}))


for _fmap in FEATURE_MAPS:
    if _fmap.causal_reason:
        continue  # fla computes only causal attention, which this map cannot be
    _chunked = get(_fmap.name, "chunked")
    register(Entry(
        _fmap.name, "fla", "linear", _forward(_fmap), _chunked.reference, _flops(_chunked),
        params=dict(_fmap.params), caps=CAPS, kernel_name=kernel_name,
        tolerance=TOLERANCE, summary=f"{_fmap.summary}, causal through fla's chunk_linear_attn (Triton)"))
