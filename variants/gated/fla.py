"""The gated family through flash-linear-attention (fla): ``*/fla``, fla's chunk kernels of the same
recurrences (same scale ``1/√K``, gates, β, L2-normalised q and k for the delta rule:
``use_qk_l2norm_in_kernel``), and ``*/fla-recurrent``, its fused recurrent kernels (one program per
head and value block walking the tokens), on ``(batch, seq, heads, ·)`` views of this project's layout.

Packed rows run as fla's varlen form (``cu_seqlens``: every document's state starts at zero); padded
rows run as they are (their padding comes after every real query). Grouped-query heads: fla's chunk
ops take as many key as query heads (gated_delta_rule groups only the other way, more value heads),
so K, V and the per-token gates are repeated to the query heads, the copy timed with the rest, as the
kernel column says. Retention takes as many KV as query heads (``variants.gated``).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
from collections.abc import Callable
from dataclasses import replace

import torch

from ..layouts import LAYOUTS, PACKED, Layout, repeat_kv, sum_over_sequences
from ..linear.fla import TOLERANCE, _cu_seqlens
from ..registry import Capabilities, Entry, Point, get, register
from . import CAUSAL_REASON, RETENTION_GQA_REASON, VARIANTS, GatedVariant, token_work

FLA_CHUNK = 64  # the chunk size of fla's chunk ops (their default)
CHUNK, RECURRENT = "fla", "fla-recurrent"
OPS = {
    (CHUNK, "retention"): "fla.ops.retention.chunk_retention",
    (CHUNK, "gla"): "fla.ops.gla.chunk_gla",
    (CHUNK, "deltanet"): "fla.ops.delta_rule.chunk_delta_rule",
    (CHUNK, "gated-deltanet"): "fla.ops.gated_delta_rule.chunk_gated_delta_rule",
    (RECURRENT, "retention"): "fla.ops.retention.fused_recurrent_retention",
    (RECURRENT, "gla"): "fla.ops.gla.fused_recurrent_gla",
    (RECURRENT, "deltanet"): "fla.ops.delta_rule.fused_recurrent_delta_rule",
    (RECURRENT, "gated-deltanet"): "fla.ops.gated_delta_rule.fused_recurrent_gated_delta_rule",
}
GATE_KEYWORD = {(RECURRENT, "gla"): "gk"}  # fused_recurrent_gla's per-key-channel gate; elsewhere g
# chunk_delta_rule asserts q.dtype != float32 ("Please use bfloat16").
FLOAT32_REFUSED = {(CHUNK, "deltanet"): "fla's chunk_delta_rule refuses float32 (it asserts 16-bit inputs)"}
NO_BACKWARD = {(RECURRENT, "gated-deltanet"): "fla's fused_recurrent_gated_delta_rule has no backward "
                                              "(it raises NotImplementedError); chunk_gated_delta_rule has one"}


@functools.cache
def fla_op(path: str) -> Callable[..., tuple[torch.Tensor, torch.Tensor | None]]:
    module, name = path.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)  # imports Triton: only when an entry runs


def fla_gated_attention(impl: str, variant: GatedVariant, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        layout: Layout | None = None, g: torch.Tensor | None = None,
                        beta: torch.Tensor | None = None) -> torch.Tensor:
    """The causal recurrence of ``variant`` over ``(batch, heads, seq, ·)`` tensors (k, v and the per-token
    ``g``, ``beta`` with as many or fewer heads) by fla's op of ``impl``; a packed ``layout`` as
    ``cu_seqlens``."""
    heads, key = q.shape[1], (impl, variant.name)
    k, v = repeat_kv(k, heads), repeat_kv(v, heads)
    gates = {name: repeat_kv(x, heads).transpose(1, 2) for name, x in (("g", g), ("beta", beta)) if x is not None}
    if "g" in gates:
        gates[GATE_KEYWORD.get(key, "g")] = gates.pop("g")
    if "beta" in gates:
        gates["beta"] = gates["beta"].to(q.dtype)  # fla's β is in the inputs' dtype; gates stay float32
    kwargs = {"scale": q.shape[-1] ** -0.5, **gates}
    if variant.rule == "delta":
        kwargs["use_qk_l2norm_in_kernel"] = True
    if layout is not None and layout.kind == PACKED:
        kwargs["cu_seqlens"] = _cu_seqlens(layout, str(q.device))
    out, _ = fla_op(OPS[key])(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), **kwargs)
    return out.transpose(1, 2)


def _forward(impl: str, variant: GatedVariant):
    def forward(q, k, v, *, causal: bool, layout: Layout | None = None, **extras) -> torch.Tensor:
        if not causal:
            raise ValueError(f"{variant.name}/{impl}: {CAUSAL_REASON}")
        return fla_gated_attention(impl, variant, q, k, v, layout, **extras)

    return forward


def _probe(impl: str, variant: GatedVariant) -> Callable[[Point], str | None]:
    key = (impl, variant.name)

    def probe(point: Point) -> str | None:
        """Triton and a CUDA device present; the op's dtype and backward limits."""
        if importlib.util.find_spec("triton") is None:
            return f"triton not installed: {OPS[key]} is a Triton GPU kernel"
        if not torch.cuda.is_available():
            return f"no CUDA device: {OPS[key]} is a Triton GPU kernel"
        if point.dtype == "float32" and key in FLOAT32_REFUSED:
            return FLOAT32_REFUSED[key]
        if point.needs_grad and key in NO_BACKWARD:
            return NO_BACKWARD[key]
        return None

    return probe


def _caps(impl: str, variant: GatedVariant) -> Capabilities:
    return Capabilities(
        devices=frozenset({"cuda"}),
        dtypes=frozenset({"float32", "float16", "bfloat16"}),  # fla computes in float32 at most
        causal=frozenset({True}),
        layouts=frozenset(LAYOUTS),
        gqa=variant.gqa,
        requires=("fla",),
        device_reason=f"{OPS[impl, variant.name]} is a Triton GPU kernel",
        causal_reason=CAUSAL_REASON,
        gqa_reason=RETENTION_GQA_REASON,
        probe=_probe(impl, variant))


def _kernel_name(impl: str, variant: GatedVariant) -> Callable[[Point], str]:
    def name(point: Point) -> str:
        varlen = " varlen (cu_seqlens)" if point.layout == PACKED else ""
        grouped = " on K, V and gates repeated to the query heads" if point.grouped else ""
        return OPS[impl, variant.name] + varlen + grouped

    return name


def _flops(impl: str, variant: GatedVariant, chunked: Entry) -> Callable[[Point], float]:
    """fla's chunk ops do the work of the chunked impl at their chunk size; its fused recurrent ones
    the recurrence's, token by token."""
    if impl == CHUNK:
        return lambda point: chunked.flops(replace(point, params={**point.params, "chunk": FLA_CHUNK}))
    return lambda point: sum_over_sequences(point, lambda n: n * token_work(variant.rule, point.head_dim,
                                                                             point.head_dim))


for _impl in (CHUNK, RECURRENT):
    for _variant in VARIANTS:
        _chunked = get(_variant.name, "chunked")
        register(Entry(
            _variant.name, _impl, "gated", _forward(_impl, _variant), _chunked.reference,
            _flops(_impl, _variant, _chunked), caps=_caps(_impl, _variant),
            kernel_name=_kernel_name(_impl, _variant), tolerance=TOLERANCE,
            summary=f"{_variant.summary}, through fla's {OPS[_impl, _variant.name].rsplit('.', 1)[1]} (Triton)",
            inputs=_variant.inputs))
