"""Exact attention over a sparse pattern split into *parts*, each run by a fused kernel.

Layout ``(batch, heads, seq, head_dim)``, self-attention (queries and keys share positions). A part
pairs ``count`` tiles of query rows with ``count`` tiles of keys (:class:`Tiles`: strided runs of
positions, so a tile is a view, never a copy) and allows inside each tile pair either every key
(``full``), keys ``c <= a`` (``causal``) or keys ``c >= a`` (``anticausal``), ``a`` and ``c`` being
the row's and the key's index in their tiles. No mask is ever built: each part is one call of a
kernel without mask. Parts that cover the same rows (the bands of a local window, the near and far
keys of a strided pattern) are merged exactly through their log-sum-exp, forward and backward
(:func:`merged_attention`); parts that cover each row at most once need no merge and go through the
public SDPA, so that PyTorch picks its fastest backend (flash, cuDNN) by itself.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

Relation = Literal["full", "causal", "anticausal"]
RELATIONS: tuple[Relation, ...] = ("full", "causal", "anticausal")


@dataclass(frozen=True)
class Tiles:
    """``count`` tiles of ``length`` positions each: tile ``i`` holds ``start + i·step + t·stride``
    for ``t`` in ``[0, length)``. Positions are distinct (checked by :func:`merged_attention`)."""

    start: int
    step: int
    count: int
    stride: int
    length: int

    def positions(self) -> torch.Tensor:
        """``(count, length)`` sequence positions of the tiles."""
        return (self.start + torch.arange(self.count)[:, None] * self.step
                + torch.arange(self.length)[None, :] * self.stride)

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """The tiles of ``x`` ``(b, h, n, d)`` as a ``(b, h, count, length, d)`` view: no copy when each
        head's ``(n, d)`` is contiguous, whatever the strides of b and h (a group member's query
        heads ``q[:, m::g]`` are such a view, and outputs are written through it)."""
        d = x.shape[-1]
        if x.stride(-1) != 1 or x.stride(-2) != d:  # the strides below assume (n, d) contiguous
            x = x.contiguous()
        return x.as_strided((*x.shape[:2], self.count, self.length, d),
                            (*x.stride()[:2], self.step * d, self.stride * d, 1),
                            x.storage_offset() + self.start * d)


@dataclass(frozen=True)
class Part:
    """Row tiles against key tiles (tile ``i`` of ``rows`` with tile ``i`` of ``cols``)."""

    rows: Tiles
    cols: Tiles
    relation: Relation = "full"

    def __post_init__(self) -> None:
        if self.relation not in RELATIONS:
            raise ValueError(f"relation {self.relation!r} is not one of {RELATIONS}")
        if self.rows.count != self.cols.count:
            raise ValueError(f"{self.rows.count} row tiles against {self.cols.count} key tiles")
        # Kernels disagree on where a non-square causal mask is aligned: never depend on it.
        if self.relation != "full" and self.rows.length != self.cols.length:
            raise ValueError(f"a {self.relation} part must be square, not "
                             f"{self.rows.length}×{self.cols.length}")

    @property
    def causal(self) -> bool:
        """Whether the kernel runs causal (anticausal runs causal on row-flipped tiles)."""
        return self.relation != "full"


@dataclass(frozen=True)
class Plan:
    """How the parts' outputs reach the result: a part that is the first to reach each of its rows
    (``first``) is written there; any other is merged. ``zeroed``: some row is reached first by a
    part that also has rows reached before, or by none, so the accumulators need initialising."""

    first: tuple[bool, ...]
    zeroed: bool

    @property
    def disjoint(self) -> bool:
        """No row is in two parts: nothing to merge."""
        return all(self.first)


@functools.lru_cache(maxsize=256)
def plan(parts: tuple[Part, ...], n: int) -> Plan:
    """The :class:`Plan` of ``parts`` over ``n`` positions. Also checks that every tile lies in
    ``[0, n)`` and holds distinct positions, which :meth:`Tiles.gather` relies on."""
    reached = torch.zeros(n, dtype=torch.bool)
    written = torch.zeros(n, dtype=torch.bool)
    first = []
    for part in parts:
        for tiles in (part.rows, part.cols):
            pos = tiles.positions().flatten()
            if pos.numel() and (pos.min() < 0 or pos.max() >= n or pos.unique().numel() != pos.numel()):
                raise ValueError(f"{tiles} does not hold distinct positions in [0, {n})")
        rows = part.rows.positions().flatten()
        first.append(not reached[rows].any().item())
        written[rows] |= first[-1]
        reached[rows] = True
    return Plan(tuple(first), zeroed=not written.all().item())


# --- kernels: one tile-batched attention call, returning the log-sum-exp ---------------------------

# forward(q, k, v, causal) -> (out, lse, state); backward(dout, q, k, v, out, lse, causal, state) ->
# (dq, dk, dv). Tensors (B, H, L, d), lse (B, H, L) in the accumulation dtype; ``state`` is whatever
# the kernel's backward needs from its own forward (CUDA flash: its RNG and sequence bookkeeping).
ForwardFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, bool],
                     tuple[torch.Tensor, torch.Tensor, Any]]
BackwardFn = Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class Kernel:
    name: str  # what runs, for the results row
    forward: ForwardFn
    backward: BackwardFn


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Merges and gradient sums run in at least float32."""
    return torch.promote_types(dtype, torch.float32)


def _eager_scores(q: torch.Tensor, k: torch.Tensor, causal: bool) -> torch.Tensor:
    acc = accumulation_dtype(q.dtype)
    scores = (q.to(acc) @ k.to(acc).transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))
    if causal:
        upper = torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(upper, float("-inf"))
    return scores


def _eager_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   causal: bool) -> tuple[torch.Tensor, torch.Tensor, None]:
    scores = _eager_scores(q, k, causal)
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.exp(scores - lse[..., None]) @ v.to(scores.dtype)
    return out.to(q.dtype), lse, None


def _eager_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    out: torch.Tensor, lse: torch.Tensor, causal: bool,
                    state: None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # Flash's backward: P from the (global) lse, D = rowsum(dO ∘ O) with the (global) output.
    p = torch.exp(_eager_scores(q, k, causal) - lse[..., None].to(accumulation_dtype(q.dtype)))
    acc = p.dtype
    dout_, q_, k_, v_ = (t.to(acc) for t in (dout, q, k, v))
    delta = (dout_ * out.to(acc)).sum(-1, keepdim=True)
    ds = p * (dout_ @ v_.transpose(-2, -1) - delta) * (1.0 / math.sqrt(q.shape[-1]))
    return ((ds @ k_).to(q.dtype), (ds.transpose(-2, -1) @ q_).to(k.dtype),
            (p.transpose(-2, -1) @ dout_).to(v.dtype))


EAGER = Kernel("eager tiles", _eager_forward, _eager_backward)


def _cpu_flash(forward_op: Any, backward_op: Any) -> Kernel:
    def forward(q, k, v, causal):
        out, lse = forward_op(q, k, v, 0.0, causal)
        return out, lse, None

    def backward(dout, q, k, v, out, lse, causal, state):
        return backward_op(dout, q, k, v, out, lse, 0.0, causal)

    return Kernel("cpu flash with lse", forward, backward)


def _cuda_flash(forward_op: Any, backward_op: Any) -> Kernel:
    def forward(q, k, v, causal):
        out, lse, *state = forward_op(q, k, v, 0.0, causal, False)
        # (cum_seq_q, cum_seq_k, max_q, max_k, rng_state, unused): handed back as autograd would.
        return out, lse, tuple(state[:6])

    def backward(dout, q, k, v, out, lse, causal, state):
        cum_q, cum_k, max_q, max_k, rng_state, unused = state
        return backward_op(dout, q, k, v, out, lse, cum_q, cum_k, max_q, max_k, 0.0, causal,
                           rng_state, unused)

    return Kernel("cuda flash with lse", forward, backward)


def cuda_flash_unready(device: torch.device) -> str | None:
    """Why this process cannot run the CUDA flash kernel on ``device``, or None."""
    if not torch.backends.cuda.is_flash_attention_available():
        return "this torch is built without flash attention"
    if torch.cuda.get_device_capability(device) < (8, 0):
        return "flash attention needs compute capability 8.0 or newer"
    return None


@dataclass(frozen=True)
class FusedOps:
    """A fused kernel returning the log-sum-exp, and what it takes."""

    name: str
    device: str
    dtypes: frozenset[torch.dtype]
    max_head_dim: int | None
    head_dim_multiple: int
    forward_op: str  # names in torch.ops.aten, looked up when chosen
    backward_op: str
    build: Callable[[Any, Any], Kernel]
    unready: Callable[[torch.device], str | None] = lambda device: None

    def refusal(self, dtype: torch.dtype, head_dim: int) -> str | None:
        if dtype not in self.dtypes:
            names = "/".join(sorted(str(t).removeprefix("torch.") for t in self.dtypes))
            return f"{self.name} takes {names}, not {str(dtype).removeprefix('torch.')}"
        if self.max_head_dim is not None and head_dim > self.max_head_dim:
            return f"{self.name} takes head_dim <= {self.max_head_dim}, not {head_dim}"
        if head_dim % self.head_dim_multiple:
            return f"{self.name} takes head_dim a multiple of {self.head_dim_multiple}, not {head_dim}"
        return None


FUSED = (
    FusedOps("cpu flash", "cpu", frozenset({torch.float64, torch.float32, torch.bfloat16, torch.float16}),
             None, 1, "_scaled_dot_product_flash_attention_for_cpu",
             "_scaled_dot_product_flash_attention_for_cpu_backward", _cpu_flash),
    FusedOps("cuda flash", "cuda", frozenset({torch.bfloat16, torch.float16}), 256, 8,
             "_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_backward",
             _cuda_flash, unready=lambda device: cuda_flash_unready(device)),  # late-bound: tests stand in
)


def aten_op(name: str) -> Any | None:
    """``torch.ops.aten.<name>``, or None where this torch lacks it (then the eager kernel runs)."""
    return getattr(torch.ops.aten, name, None)


def select_kernel(device: torch.device | str, dtype: torch.dtype, head_dim: int) -> Kernel:
    """The fused kernel for this device, dtype and head dim, else the exact eager one, named with
    the reason."""
    device = torch.device(device)
    reasons = []
    for fused in FUSED:
        if fused.device != device.type:
            continue
        why = fused.refusal(dtype, head_dim) or fused.unready(device)
        ops = {name: aten_op(name) for name in (fused.forward_op, fused.backward_op)}
        if why is None and None in ops.values():
            why = "this torch has no " + " nor ".join(f"aten.{n}" for n, op in ops.items() if op is None)
        if why is None:
            return fused.build(*ops.values())
        reasons.append(why)
    why = "; ".join(reasons) or f"no fused kernel with log-sum-exp on {device.type}"
    return Kernel(f"{EAGER.name} (fallback: {why})", EAGER.forward, EAGER.backward)


# --- attention over parts ---------------------------------------------------------------------------

def _flat(tiles: Tiles, x: torch.Tensor) -> torch.Tensor:
    """The tiles of ``x`` as one (b·h, count, length, d) kernel input: tiles act as heads."""
    return tiles.gather(x).flatten(0, 1)


def _unflat(y: torch.Tensor, b: int) -> torch.Tensor:
    """A kernel output (b·h, count, length, d) back to (b, h, count, length, d)."""
    return y.unflatten(0, (b, -1))


def _reversed(relation: Relation, *tensors: torch.Tensor) -> list[torch.Tensor]:
    """Flattened tiles with their order reversed inside each tile when ``relation`` is anticausal:
    c >= a is causal on reversed rows and keys, and reversing again restores the order."""
    return [t.flip(2) for t in tensors] if relation == "anticausal" else list(tensors)


def _merge_into(out: torch.Tensor, lse: torch.Tensor, part_out: torch.Tensor,
                part_lse: torch.Tensor) -> None:
    """Online log-sum-exp merge of one part into the accumulators (views, updated in place):
    out ← (1 − w)·out + w·part_out with w = e^part_lse / (e^lse + e^part_lse)."""
    # Where both are −inf (a row neither side reached) the difference is NaN: weight 0 keeps it.
    weight = torch.sigmoid(part_lse - lse).nan_to_num_(0.0)
    if part_out.dtype == out.dtype:
        out.lerp_(part_out, weight)  # one pass over the rows
    else:  # lerp_ wants one dtype; a float32 copy of a 16-bit part would cost more than a pass
        out.mul_(1.0 - weight).addcmul_(part_out, weight)
    lse.copy_(torch.logaddexp(lse, part_lse))


def members(x: torch.Tensor, group: int) -> list[torch.Tensor]:
    """The heads of ``x`` ``(b, heads, ·, ·)`` by group member: member m's are heads m, m + group, …,
    one of each KV head's query group (KV head j serves heads j·group … j·group + group − 1), as
    views. Each member's queries meet K and V as they are: grouped-query attention with no repeated
    K or V, the group folded into the loop rather than into copies."""
    return [x[:, m::group] for m in range(group)]


def _group(q: torch.Tensor, k: torch.Tensor) -> int:
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"{q.shape[1]} query heads do not split into groups of {k.shape[1]} key/value heads")
    return q.shape[1] // k.shape[1]


def _forward_parts(kernel: Kernel, parts: tuple[Part, ...], first: tuple[bool, ...], q: torch.Tensor,
                   k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor) -> list[Any]:
    """Every part of one group member into its accumulators ``out``, ``lse`` (views); the kernel states."""
    b = q.shape[0]
    states = []
    for part, writes in zip(parts, first, strict=True):
        tiles = _reversed(part.relation, _flat(part.rows, q), _flat(part.cols, k), _flat(part.cols, v))
        part_out, part_lse, state = kernel.forward(*tiles, part.causal)
        states.append(state)
        part_out, part_lse = _reversed(part.relation, part_out, part_lse)
        part_out, part_lse = _unflat(part_out, b), _unflat(part_lse[..., None], b)
        if writes:  # nothing there yet: write, no merge
            part.rows.gather(out).copy_(part_out)
            part.rows.gather(lse).copy_(part_lse)
        else:
            _merge_into(part.rows.gather(out), part.rows.gather(lse), part_out, part_lse)
    return states


def _backward_parts(kernel: Kernel, parts: tuple[Part, ...], states: list[Any], dout: torch.Tensor,
                    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                    dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor) -> None:
    """Every part's gradients of one group member, added into ``dq`` (its views) and ``dk``, ``dv``
    (shared by the members: they sum over the group)."""
    b = q.shape[0]
    for part, state in zip(parts, states, strict=True):
        do, q_, o, k_, v_, part_lse = _reversed(
            part.relation, *(_flat(part.rows, t) for t in (dout, q, out)),
            *(_flat(part.cols, t) for t in (k, v)), _flat(part.rows, lse)[..., 0])
        # Fused backwards read the lse as a dense (B, H, L) array: hand them exactly that.
        grads = kernel.backward(do, q_, k_, v_, o, part_lse.contiguous(), part.causal, state)
        part_dq, part_dk, part_dv = (_unflat(g, b) for g in _reversed(part.relation, *grads))
        part.rows.gather(dq).add_(part_dq)
        part.cols.gather(dk).add_(part_dk)
        part.cols.gather(dv).add_(part_dv)


class _Merged(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, parts: tuple[Part, ...],
                sink: torch.Tensor | None) -> torch.Tensor:
        q, k, v = (t.contiguous() for t in (q, k, v))
        group = _group(q, k)
        kernel = select_kernel(q.device, q.dtype, q.shape[-1])
        acc = accumulation_dtype(q.dtype)
        how = plan(parts, q.shape[-2])
        out = torch.empty((*q.shape[:-1], v.shape[-1]), dtype=acc, device=q.device)
        lse = torch.empty((*q.shape[:-1], 1), dtype=acc, device=q.device)  # (…, 1): gathers as out
        first = how.first
        if sink is not None:  # the sink: a term e^sink of every row's denominator, with value 0
            out.zero_()
            lse.copy_(sink.to(acc)[None, :, None, None].expand_as(lse))
            first = (False,) * len(parts)  # every part merges into it
        elif how.zeroed:  # nothing there is the empty sum: output 0, lse −inf
            out.zero_()
            lse.fill_(float("-inf"))
        states = [_forward_parts(kernel, parts, first, q_m, k, v, out_m, lse_m)
                  for q_m, out_m, lse_m in zip(*(members(t, group) for t in (q, out, lse)), strict=True)]
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse, sink)
        ctx.parts, ctx.kernel, ctx.states = parts, kernel, states
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dout: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        # Ring attention's trick, exact: a part's backward needs only P = exp(S − lse) and
        # D = rowsum(dO ∘ O), so each part runs its kernel's backward with the *merged* lse and out.
        # A sink is a key of value 0, so it changes neither: dS = P ∘ (dO·vᵀ − D) still holds.
        q, k, v, out, lse, sink = ctx.saved_tensors
        dout = dout.contiguous()
        group = _group(q, k)
        acc = accumulation_dtype(q.dtype)
        dq, dk, dv = (torch.zeros(t.shape, dtype=acc, device=t.device) for t in (q, k, v))
        for states, *views in zip(ctx.states, *(members(t, group) for t in (dout, q, out, lse, dq)), strict=True):
            dout_m, q_m, out_m, lse_m, dq_m = views
            _backward_parts(ctx.kernel, ctx.parts, states, dout_m, q_m, k, v, out_m, lse_m, dq_m, dk, dv)
        dsink = None
        if sink is not None and ctx.needs_input_grad[4]:
            # d sink = Σ_rows p_sink · (0 − D): the sink's probability times its value's (0) excess over D
            p_sink = torch.exp(sink.to(acc)[None, :, None] - lse[..., 0])
            delta = (dout.to(acc) * out.to(acc)).sum(-1)
            dsink = -(p_sink * delta).sum((0, 2)).to(sink.dtype)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, dsink


def _disjoint_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   parts: tuple[Part, ...]) -> torch.Tensor:
    """Parts covering each row at most once: public SDPA on each, placed with plain autograd."""
    out = q.new_empty((*q.shape[:-1], v.shape[-1]))
    if plan(parts, q.shape[-2]).zeroed:
        out.zero_()
    group = _group(q, k)
    for q_m, out_m in zip(members(q, group), members(out, group), strict=True):
        for part in parts:
            tiles = _reversed(part.relation, _flat(part.rows, q_m), _flat(part.cols, k), _flat(part.cols, v))
            part_out, = _reversed(part.relation, F.scaled_dot_product_attention(*tiles, is_causal=part.causal))
            part.rows.gather(out_m).copy_(_unflat(part_out, q.shape[0]))
    return out


def merged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, parts: tuple[Part, ...],
                     sink: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax attention of ``q`` over the (query, key) pairs the ``parts`` allow, exactly; rows no
    part covers give 0. ``parts`` must not allow a pair twice. ``k``, ``v`` may have fewer heads than
    ``q`` (grouped-query attention): each group member's query heads run against them as they are.
    ``sink`` ``(heads,)``: a logit added to each row's softmax denominator (gpt-oss), the merge's
    starting log-sum-exp; differentiable."""
    if k.shape[-2] != q.shape[-2]:
        raise ValueError(f"parts index one sequence: {q.shape[-2]} queries, {k.shape[-2]} keys")
    if sink is None and plan(parts, q.shape[-2]).disjoint:
        return _disjoint_rows(q, k, v, parts)
    return _Merged.apply(q, k, v, parts, sink)


def describe(parts: tuple[Part, ...], n: int, device: torch.device | str, dtype: torch.dtype,
             head_dim: int, tiles: str = "tiles", sink: bool = False) -> str:
    """What :func:`merged_attention` runs for these parts and inputs (with a sink or not), for the
    results row."""
    if plan(parts, n).disjoint and not sink:
        causal = ", is_causal" if any(p.causal for p in parts) else ""
        return f"sdpa (no mask{causal}) over {sum(p.rows.count for p in parts)} {tiles}"
    return f"{select_kernel(device, dtype, head_dim).name} ×{len(parts)} parts, merged" + \
        (" from the sink logit" if sink else "")
