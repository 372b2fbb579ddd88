"""Gated linear attention: a state ``S`` (key dim × value dim) per head, decayed and written token by
token (:mod:`variants.gated.recurrence`), causal by construction.

Variants (queries scaled by ``1/√key dim``):

* ``retention`` (RetNet): ``S_t = γ_h S_{t-1} + k_t v_tᵀ`` with a fixed decay ``γ_h = 1 − 2^(−5−h)`` per
  query head ``h`` (fla's ``chunk_retention``); no extra inputs;
* ``gla``: ``S_t = diag(exp g_t) S_{t-1} + k_t v_tᵀ``, ``g`` per token and key channel, ``logsigmoid/16``
  (fla's GLA ``gate_logit_normalizer``);
* ``deltanet``: the delta rule ``S_t = (I − β_t k_t k_tᵀ) S_{t-1} + β_t k_t v_tᵀ``, β per token (sigmoid),
  on L2-normalised q and k;
* ``gated-deltanet``: the delta rule decayed by ``exp g_t``, g per token (logsigmoid), and β.

Heads. Gates and β are per token of each key/value head (:mod:`variants.inputs`): a KV head's state
is shared by its query group, and decoding keeps one per KV head. Retention's decay is a function of
the head index, which the float64 reference (:func:`variants.layouts.reference_attention`: K and V
repeated to the query heads) can only read as the query head's; a group's heads would then decay
differently and could not share their KV head's state, so retention takes as many KV as query heads
(RetNet's multi-head form). The chunked impl repeats K, V and gates to the query heads (its kernel
column says so).

Documents: packed rows run each document alone (its state starts at zero); padded rows need nothing,
their padding comes after every real query.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..decode import Decoder, prefix_lengths
from ..inputs import ExtraInput
from ..layouts import LAYOUTS, PACKED, Layout, per_document, repeat_kv, sum_over_sequences
from ..linear import LINEAR_LAYOUTS
from ..registry import Capabilities, Entry, Point, ceil_div, register
from .chunked import decay_chunked, delta_chunked
from .recurrence import decay_recurrence, decay_step, delta_recurrence, delta_step, scaled

CAUSAL_REASON = "the recurrence is causal by construction: a state holds only the tokens before each query"
DECAY, DELTA = "decay", "delta"


def gla_gate(x: torch.Tensor) -> torch.Tensor:
    """GLA's gate: ``logsigmoid(x)/16`` (fla's ``gate_logit_normalizer``), a log-decay per key channel."""
    return F.logsigmoid(x) / 16


G_CHANNELS = ExtraInput("g", channels=True, activation=gla_gate, summary="log-decay per key channel")
# Gated DeltaNet's layer (fla's, after Mamba-2) starts its per-token decay e^(−A·dt) near 1 (A in
# [1, 16], dt in [0.001, 0.1]); logsigmoid of a zero projection would start it at ½, forgetting every
# key within a few tokens. It starts here at GLA's first decay, 2^(−1/16) ≈ 0.958: sigmoid(raw) = that.
GDN_INITIAL_DECAY = 2 ** (-1 / 16)
G_SCALAR = ExtraInput("g", activation=F.logsigmoid, summary="log-decay per head",
                      initial_raw=math.log(GDN_INITIAL_DECAY / (1 - GDN_INITIAL_DECAY)))
BETA = ExtraInput("beta", activation=torch.sigmoid, summary="delta-rule writing strength β")


@dataclass(frozen=True)
class GatedVariant:
    name: str
    rule: str  # DECAY or DELTA
    inputs: tuple[ExtraInput, ...]
    summary: str
    # A fixed log-decay per head (heads, device) -> (heads,) in float64 in place of a gate input; a
    # function of the head index, so the heads of a query group cannot share one state (no GQA).
    fixed_log_decay: Callable[[int, torch.device | str], torch.Tensor] | None = None

    @property
    def gqa(self) -> bool:
        return self.fixed_log_decay is None


def retention_log_decay(heads: int, device: torch.device | str) -> torch.Tensor:
    """``log γ_h = log(1 − 2^(−5−h))`` per head, float64 (fla's ``chunk_retention``)."""
    return torch.log1p(-(2.0 ** (-5.0 - torch.arange(heads, dtype=torch.float64, device=device))))


VARIANTS = [
    GatedVariant("retention", DECAY, (), "RetNet retention: fixed decay γ_h = 1 − 2^(−5−h) per head",
                 fixed_log_decay=retention_log_decay),
    GatedVariant("gla", DECAY, (G_CHANNELS,), "gated linear attention: data-dependent decay per key channel"),
    GatedVariant("deltanet", DELTA, (BETA,), "DeltaNet: delta rule, β per token, L2-normalised q and k"),
    GatedVariant("gated-deltanet", DELTA, (G_SCALAR, BETA), "Gated DeltaNet: delta rule decayed by exp g per token"),
]


RETENTION_GQA_REASON = ("retention's decay γ_h follows the query head, so a KV head's query group would "
                        "need a state per head, not one shared: RetNet is multi-head")


def _refuse_grouped(point: Point) -> str | None:
    """Retention's decode points: the registry lets every decoder group heads, this one cannot."""
    return f"kv_heads={point.n_kv_heads} < heads={point.heads}: {RETENTION_GQA_REASON}" if point.grouped else None


def log_decays(variant: GatedVariant, k: torch.Tensor, g: torch.Tensor | None,
               per_channel: bool = True) -> torch.Tensor | None:
    """The log-decays the recurrence takes for keys ``k`` ``(b, h, n, K)``: a fixed decay's constant per
    head, for each key channel ``(b, h, n, K)`` or once per token ``(b, h, n)`` (what decay_chunked
    runs fastest), else the given ``g`` (None for DeltaNet)."""
    if variant.fixed_log_decay is None:
        return g
    per_head = variant.fixed_log_decay(k.shape[1], k.device).to(k.dtype)
    return per_head[:, None, None].expand(k.shape) if per_channel else per_head[:, None].expand(k.shape[:3])


def _recurrence(variant: GatedVariant) -> Callable[..., torch.Tensor]:
    def reference(q, k, v, *, causal: bool, g: torch.Tensor | None = None, beta: torch.Tensor | None = None,
                  **params) -> torch.Tensor:
        """The recurrence token by token (``chunk`` and other impl parameters are ignored)."""
        if variant.rule == DECAY:
            return decay_recurrence(q, k, v, log_decays(variant, k, g))
        return delta_recurrence(q, k, v, beta, g)

    return reference


def _chunked(variant: GatedVariant) -> Callable[..., torch.Tensor]:
    def sequence(q, k, v, causal: bool, chunk: int, g: torch.Tensor | None = None,
                 beta: torch.Tensor | None = None) -> torch.Tensor:
        # K, V and gates repeated to the query heads; 16-bit inputs computed in float32 (cumulative
        # log-decays and the triangular solve need its range and mantissa), the output in their dtype.
        heads, acc = q.shape[1], torch.promote_types(q.dtype, torch.float32)
        q, k, v = q.to(acc), repeat_kv(k, heads).to(acc), repeat_kv(v, heads).to(acc)
        g, beta = (None if x is None else repeat_kv(x, heads).to(acc) for x in (g, beta))
        if variant.rule == DECAY:
            return decay_chunked(q, k, v, log_decays(variant, k, g, per_channel=False), chunk)
        return delta_chunked(q, k, v, beta, g, chunk)

    def forward(q, k, v, *, causal: bool, chunk: int, layout: Layout | None = None, **extras) -> torch.Tensor:
        if not causal:
            raise ValueError(f"{variant.name}/chunked: {CAUSAL_REASON}")
        out_dtype = q.dtype
        if layout is not None and layout.kind == PACKED:
            out = per_document(lambda q_, k_, v_, causal_, **e: sequence(q_, k_, v_, causal_, chunk, **e),
                               q, k, v, causal=True, layout=layout, **extras)
        else:
            out = sequence(q, k, v, True, chunk, **extras)
        return out.to(out_dtype)

    return forward


# --- FLOPs: the chunked forms' matmuls ------------------------------------------------------------

def chunk_work(rule: str, chunk: int, k_dim: int, v_dim: int, channel_decay: bool = True) -> float:
    """Forward FLOPs of one chunk of one head: within-chunk scores (with a decay per channel, factored:
    2·C²·K and 2·C·K to scale q and k; per head, retention's: 2·C²·K and the C² decays), intra-chunk
    outputs, the state read and the state update; the delta rule also its two unit-triangular solves
    (C² per right-hand-side column) and the correction ``W S``."""
    c, kd, vd = chunk, k_dim, v_dim
    if rule == DECAY:
        scores = 2.0 * c * c * kd + (2.0 * c * kd if channel_decay else c * c)
        return scores + 2.0 * c * c * vd + 4.0 * c * kd * vd
    return 4.0 * c * c * kd + c * c * (kd + vd) + 2.0 * c * c * vd + 6.0 * c * kd * vd


def token_work(rule: str, k_dim: int, v_dim: int) -> float:
    """FLOPs of one token of one head by the recurrence: the state update (decay 3·K·V: decay, outer
    product, add; the delta rule also kᵀS and the correction: 5·K·V) and its read (2·K·V)."""
    return (3.0 if rule == DECAY else 5.0) * k_dim * v_dim + 2.0 * k_dim * v_dim


def work_per_sequence(variant: GatedVariant, chunk: int, head_dim: int) -> Callable[[int], float]:
    """One head's work on a sequence of n tokens, padded to whole chunks."""
    per_chunk = chunk_work(variant.rule, chunk, head_dim, head_dim, variant.fixed_log_decay is None)
    return lambda n: ceil_div(n, chunk) * per_chunk


def _flops(variant: GatedVariant) -> Callable[[Point], float]:
    return lambda point: sum_over_sequences(point, work_per_sequence(variant, point.params["chunk"], point.head_dim))


# --- decoding: a fixed-size state per sequence and state head -------------------------------------

def _state_bytes(variant: GatedVariant, point: Point) -> int:
    """A key dim × value dim state per sequence and state head, at least float32, whatever the length."""
    acc = torch.promote_types(point.torch_dtype, torch.float32)
    return point.batch * point.n_kv_heads * point.head_dim ** 2 * acc.itemsize


def _prefix_state(variant: GatedVariant, k: torch.Tensor, v: torch.Tensor,
                  g: torch.Tensor | None, beta: torch.Tensor | None) -> torch.Tensor:
    """The state after one sequence's prefix ``(1, heads, n, ·)``, at least float32."""
    acc = torch.promote_types(v.dtype, torch.float32)
    k, v = k.to(acc), v.to(acc)
    g, beta = (None if x is None else x.to(acc) for x in (g, beta))
    if k.shape[2] == 0:
        return k.new_zeros((*k.shape[:2], k.shape[-1], v.shape[-1]))
    if variant.rule == DECAY:
        # S_n = Σ_j exp(Γ_n − Γ_j) k_j v_jᵀ: one matmul; Γ summed in float64 (long prefixes), each
        # exponent later minus earlier, so ≤ 0.
        gamma = log_decays(variant, k, g).double().cumsum(2)
        keys = k * (gamma[:, :, -1:] - gamma).exp().to(acc)
        return keys.transpose(-2, -1) @ v
    _, state = delta_chunked(torch.zeros_like(k), k, v, beta, g, PREFILL_CHUNK, with_state=True)  # no queries
    return state


PREFILL_CHUNK = 64


@dataclass
class GatedState:
    """Each sequence's state after its prefix, ``(b, state heads, K, V)``; a step leaves it as it was."""

    state: torch.Tensor


def gated_decoder(variant: GatedVariant) -> Decoder:
    """Prefill: each sequence's own prefix to its state. Step: the new tokens one at a time (decay_step
    or delta_step), each read by its KV head's query group, folded into rows of the state head."""
    def prefill(k: torch.Tensor, v: torch.Tensor, *, q_len: int, layout: Layout | None = None,
                g: torch.Tensor | None = None, beta: torch.Tensor | None = None, **params) -> GatedState:
        states = [_prefix_state(variant, k[i:i + 1, :, :n], v[i:i + 1, :, :n],
                                None if g is None else g[i:i + 1, :, :n], None if beta is None else beta[i:i + 1, :, :n])
                  for i, n in enumerate(prefix_lengths(k, layout))]
        return GatedState(torch.cat(states))

    def step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: GatedState, *,
             g: torch.Tensor | None = None, beta: torch.Tensor | None = None, **params) -> torch.Tensor:
        state = cache.state
        acc, out_dtype = state.dtype, q.dtype
        q, k, v = q.to(acc), k.to(acc), v.to(acc)
        if variant.rule == DELTA:
            q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        g = log_decays(variant, k, None if g is None else g.to(acc))
        rows = scaled(q).unflatten(1, (state.shape[1], -1))  # (b, state heads, group, q_len, K)
        out = []
        for t in range(q.shape[2]):
            if variant.rule == DECAY:
                state = decay_step(state, k[:, :, t], v[:, :, t], g[:, :, t])
            else:
                gt = torch.zeros_like(beta[:, :, t]) if g is None else g[:, :, t]
                state = delta_step(state, k[:, :, t], v[:, :, t], beta[:, :, t].to(acc), gt)
            out.append(rows[:, :, :, t] @ state)  # (b, state heads, group, V)
        return torch.stack(out, dim=3).flatten(1, 2).to(out_dtype)

    def bytes_moved(point: Point) -> int:
        # state read and written; q read and output written per query head, k and v read per KV head,
        # gates (float32) per KV head
        size = point.torch_dtype.itemsize
        tokens = 2 * point.batch * (point.heads + point.n_kv_heads) * point.q_len * point.head_dim * size
        gates = sum(x.width(point.head_dim) for x in variant.inputs) * point.batch * point.n_kv_heads * point.q_len * 4
        return 2 * _state_bytes(variant, point) + tokens + gates

    def flops(point: Point) -> float:
        # per token the recurrence's work (token_work): the update per KV head, the read per query head
        d = point.head_dim
        read = 2.0 * d * d
        update = token_work(variant.rule, d, d) - read
        return point.batch * point.q_len * (point.n_kv_heads * update + point.heads * read)

    return Decoder(prefill, step, lambda point: _state_bytes(variant, point), bytes_moved, flops,
                   f"eager {variant.rule}_step per token",
                   LINEAR_LAYOUTS)


def _kernel_name(variant: GatedVariant) -> Callable[[Point], str]:
    def name(point: Point) -> str:
        form = "decay_chunked" if variant.rule == DECAY else "delta_chunked (WY, triangular solve)"
        parts = [f"eager {form}"]
        if point.grouped:
            parts.append("K, V and gates repeated to the query heads")
        if point.layout == PACKED:
            parts.append("per document")
        return ", ".join(parts)

    return name


for _variant in VARIANTS:
    register(Entry(
        _variant.name, "chunked", "gated", _chunked(_variant), _recurrence(_variant), _flops(_variant),
        params={"chunk": 64},
        caps=Capabilities(causal=frozenset({True}), causal_reason=CAUSAL_REASON, layouts=frozenset(LAYOUTS),
                          gqa=_variant.gqa, gqa_reason=RETENTION_GQA_REASON,
                          probe=None if _variant.gqa else _refuse_grouped),
        kernel_name=_kernel_name(_variant), summary=_variant.summary, decoder=gated_decoder(_variant),
        inputs=_variant.inputs))

