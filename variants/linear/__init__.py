"""Linear (kernelised) attention: ``O_i = Σ_j sim(q_i,k_j) v_j / Σ_j sim(q_i,k_j)``, sim = φ(q)·φ(k).

Layout ``(batch, heads, seq, head_dim)``; k and v may have fewer heads than q (grouped-query: KV head
``j`` serves query heads ``j·g … j·g+g−1``). φ is applied to the raw q and k (the feature map plays
the role of the 1/√d scale); the only normalisation is the division by Σ sim.

Impls, all computing the same function of the same φ:

* ``quadratic`` — the n×n similarity matrix (the reference; causal by masking it);
* ``linear`` — non-causal ``φ(Q)(φ(K)ᵀV)`` in O(n·f·d);
* ``recurrent`` — causal running sums of φ(k)vᵀ (a cumulative sum: O(n·f·d) memory);
* ``chunked`` — causal, quadratic inside a chunk and a carried f×d state between chunks.

Grouped heads: the state Σφ(k)vᵀ (and Σφ(k)) is built once per KV head and read by its whole query
group — each group's queries are folded into the rows that read it, as :func:`layouts.grouped`
does — so neither K, V nor a state is ever repeated. Documents (packed rows): a query's sums range
over its own document only, so every state restarts at each document; padded rows: over the real
keys only.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..caches import cached_by_bytes
from ..decode import Decoder, prefix_lengths
from ..layouts import (
    DENSE,
    LAYOUTS,
    PACKED,
    PADDED,
    Layout,
    grouped,
    per_document,
    sum_over_sequences,
    ungrouped,
)
from ..registry import Capabilities, Entry, Point, ceil_div, register

EPS = 1e-6  # keeps rows whose similarities are all zero (possible with relu) finite: they output 0


# --- key sequences --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Segments:
    """The key sequences of a batch's rows, over which key maps that reduce along the sequence
    (softmax-qk's softmax, Performer's stabiliser) reduce. ``ids`` None: each row is one sequence
    (dense rows); else each position's segment ``(rows, 1, width, 1)``: a packed row's documents, a
    padded row's document then its padding (a segment of its own, so that padding keys never enter
    a real key's reduction)."""

    ids: torch.Tensor | None = None
    count: int = 1  # segments per row

    def max(self, x: torch.Tensor) -> torch.Tensor:
        """Each position's maximum of ``x`` over its segment (sequence dim −2), broadcastable to ``x``."""
        return x.amax(-2, keepdim=True) if self.ids is None else self._reduce(x, "amax")

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        """Each position's sum of ``x`` over its segment, broadcastable to ``x``."""
        return x.sum(-2, keepdim=True) if self.ids is None else self._reduce(x, "sum")

    def softmax(self, x: torch.Tensor) -> torch.Tensor:
        """Softmax over each segment's positions."""
        if self.ids is None:
            return torch.softmax(x, dim=-2)
        e = torch.exp(x - self.max(x.detach()))  # the max only guards exp: it cancels in the ratio
        return e / self.sum(e)

    def _reduce(self, x: torch.Tensor, how: str) -> torch.Tensor:
        index = self.ids.expand_as(x)
        per_segment = x.new_zeros((*x.shape[:2], self.count, x.shape[-1]))
        return per_segment.scatter_reduce(2, index, x, how, include_self=False).gather(2, index)


WHOLE = Segments()


@cached_by_bytes(64 << 20)
def _layout_segments(layout: Layout, device: str) -> Segments:
    ids = layout.document_ids(device).long()  # packed: the document; padded: 0, padding −1
    count = int(ids.max()) + 2  # the documents, then one for padding
    return Segments(torch.where(ids < 0, count - 1, ids)[:, None, :, None], count)


def segments_of(layout: Layout | None, device: torch.device | str) -> Segments:
    return WHOLE if layout is None else _layout_segments(layout, str(torch.device(device)))


# --- feature maps ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class FeatureMap:
    """φ for queries and keys (they differ for softmax-qk), its width and its own FLOPs per token.
    ``query(x, **params)`` maps each token alone; ``key(x, segments=WHOLE, **params)`` may reduce over
    the key sequence, then does so per segment."""

    name: str
    query: Callable[..., torch.Tensor]
    key: Callable[..., torch.Tensor]
    width: Callable[..., int]  # (head_dim, **params) -> number of features f
    params: dict = field(default_factory=dict)
    flops_per_token: Callable[..., float] = lambda head_dim, **params: 0.0
    causal_reason: str | None = None  # why causal is impossible, if it is
    summary: str = ""
    # Key features relative to a stabiliser shared by every key of a head (Performer's exp features):
    # (keys, stabiliser or None, **params) -> (features, stabiliser used). A decode state keeps the
    # stabiliser and rescales its sums when new keys raise it; None for maps without one.
    stabilised_key: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None


def _per_token(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """A key map of each token alone: the same in every segment."""
    return lambda x, segments=WHOLE, **params: fn(x, **params)


def elu1(x: torch.Tensor) -> torch.Tensor:
    return F.elu(x) + 1


def taylor(x: torch.Tensor) -> torch.Tensor:
    """[1, x̂] with x̂ = x/‖x‖, so φ(q)·φ(k) = 1 + q̂·k̂ ∈ [0, 2]: first-order Taylor of exp, non-negative."""
    return torch.cat([torch.ones_like(x[..., :1]), F.normalize(x, dim=-1)], dim=-1)


@functools.lru_cache(maxsize=32)
def orthogonal_features(head_dim: int, features: int, seed: int, device: str, dtype: torch.dtype) -> torch.Tensor:
    """(features, head_dim) projection of FAVOR+: stacked random orthogonal blocks, rows rescaled
    to chi-distributed norms so each row is distributed like a Gaussian vector. Fixed seed."""
    gen = torch.Generator().manual_seed(seed)
    blocks = []
    for _ in range(ceil_div(features, head_dim)):
        gaussian = torch.randn(head_dim, head_dim, generator=gen, dtype=torch.float64)
        blocks.append(torch.linalg.qr(gaussian).Q.T)
    w = torch.cat(blocks)[:features]
    norms = torch.randn(features, head_dim, generator=gen, dtype=torch.float64).norm(dim=-1, keepdim=True)
    return (w * norms).to(device=device, dtype=dtype)


PERFORMER_SEED = 0


def _performer_logits(x: torch.Tensor, features: int) -> torch.Tensor:
    """log of the positive random features (up to a constant): E[φ(q)·φ(k)] = exp(q·k/√d)."""
    d = x.shape[-1]
    x = x * d ** -0.25
    w = orthogonal_features(d, features, PERFORMER_SEED, str(x.device), x.dtype)
    return x @ w.T - 0.5 * (x * x).sum(-1, keepdim=True)


def _performer_query(x: torch.Tensor, features: int) -> torch.Tensor:
    # The subtracted maximum cancels in the ratio (per row for a query) and only guards exp.
    logits = _performer_logits(x, features)
    return torch.exp(logits - logits.detach().amax(-1, keepdim=True)) / math.sqrt(features)


def _performer_key(x: torch.Tensor, stabiliser: torch.Tensor | None, features: int,
                   segments: Segments = WHOLE) -> tuple[torch.Tensor, torch.Tensor]:
    """Key features relative to one maximum per key sequence — a head's, a document's, a padded row's
    real keys' — or to ``stabiliser`` when that is larger (a decode step's new keys beside the
    prefix's). The maximum cancels in a query's ratio only if every key it sees shares it; and one
    shared across documents would not stay exact: a document whose keys lie far below it would have
    its features, and its sums against ε, scaled down by exp(its maximum − the shared one)."""
    logits = _performer_logits(x, features)
    shared = segments.max(logits.detach().amax(-1, keepdim=True))
    if stabiliser is not None:
        shared = torch.maximum(shared, stabiliser)
    return torch.exp(logits - shared) / math.sqrt(features), shared


TAYLOR2_SEED = 0


def taylor2(x: torch.Tensor, features: int) -> torch.Tensor:
    """Based's second-order Taylor map [1, x̃, vec(x̃ ⊗ x̃)/√2], so φ(q)·φ(k) = 1 + s + s²/2 with
    s = q̃·k̃: ((s + 1)² + 1)/2 ≥ 1/2, never zero. x̃ = P x / d'^(1/4), P a fixed d' × d projection (one
    for every head: a KV head's key features then serve its whole query group) standing in for
    Based's learned one: FAVOR+'s orthogonal Gaussian rows (:func:`orthogonal_features`) over √d, so
    each row has about unit norm and P x has the per-coordinate scale of x; the d'^(1/4) is Based's
    own (its TaylorExp), which makes s O(1) for O(1) coordinates (std ≈ 1 for standard normal q, k)."""
    d = x.shape[-1]
    p = orthogonal_features(d, features, TAYLOR2_SEED, str(x.device), x.dtype)
    x = (x @ p.T) * (d ** -0.5 * features ** -0.25)
    square = (x.unsqueeze(-1) * x.unsqueeze(-2)).flatten(-2) * 0.5 ** 0.5
    return torch.cat([torch.ones_like(x[..., :1]), x, square], dim=-1)


# Based's map: not registered as a linear variant of its own, the linear part of the `based` hybrid.
TAYLOR2 = FeatureMap("linear-taylor2", taylor2, _per_token(taylor2), lambda d, features: 1 + features + features ** 2,
                     params={"features": 16},
                     # the q and k projections, and their outer products
                     flops_per_token=lambda d, features: 2.0 * (2 * d * features + features ** 2),
                     summary="sim = 1 + s + s²/2, s = q̃·k̃ on a fixed projection to d' = features (Based)")

FEATURE_MAPS = [
    FeatureMap("linear-elu1", elu1, _per_token(elu1), lambda d: d,
               summary="φ(x) = elu(x)+1 (Transformers are RNNs)"),
    FeatureMap("linear-relu", F.relu, _per_token(F.relu), lambda d: d,
               summary="φ(x) = relu(x)"),
    FeatureMap("linear-softmax-qk", lambda x: torch.softmax(x, dim=-1),
               lambda x, segments=WHOLE: segments.softmax(x), lambda d: d,
               causal_reason="φ(K) is a softmax over the whole key sequence, so every position sees future keys",
               summary="softmax of Q over features, of K over the sequence (Efficient Attention)"),
    FeatureMap("linear-taylor", taylor, _per_token(taylor), lambda d: d + 1,
               summary="sim = 1 + q̂·k̂ (first-order Taylor of exp on L2-normalised q, k)"),
    FeatureMap("performer", _performer_query,
               lambda x, features, segments=WHOLE: _performer_key(x, None, features, segments)[0],
               lambda d, features: features, params={"features": 256},
               flops_per_token=lambda d, features: 2.0 * 2 * d * features,  # q and k projections
               summary="FAVOR+ positive orthogonal random features", stabilised_key=_performer_key),
]


def _map_params(fmap: FeatureMap, params: dict) -> dict:
    """The feature map's own parameters: the impl's (``chunk``) are dropped, so the quadratic
    reference takes the same parameters as every impl."""
    return {name: value for name, value in params.items() if name in fmap.params}


def features(fmap: FeatureMap, q: torch.Tensor, k: torch.Tensor, params: dict,
             layout: Layout | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """φ(q) with q's heads, φ(k) with k's (each KV head's keys mapped once), key reductions per segment."""
    own = _map_params(fmap, params)
    return fmap.query(q, **own), fmap.key(k, segments=segments_of(layout, k.device), **own)


# --- impls -----------------------------------------------------------------------------------------

def _causal_rows(sim: torch.Tensor, group: int) -> torch.Tensor:
    """``sim`` with rows (group member, query) against keys, lower-triangular for each member."""
    return sim.unflatten(-2, (group, -1)).tril().flatten(-3, -2)


def _seen_keys(fk: torch.Tensor, layout: Layout | None) -> torch.Tensor:
    """Key features with a padded row's padding keys zeroed: keys no query sees (packed rows run each
    document alone, so only padded ones reach here)."""
    return fk if layout is None else fk * layout.valid(fk.device)


def _quadratic(fmap: FeatureMap):
    def forward(q, k, v, *, causal: bool, layout: Layout | None = None, **params) -> torch.Tensor:
        """One n×n similarity block per KV head, its query group folded into the rows."""
        fq, fk = features(fmap, q, k, params, layout)
        sim = grouped(fq, k.shape[1]) @ _seen_keys(fk, layout).transpose(-2, -1)
        if causal:
            sim = _causal_rows(sim, q.shape[1] // k.shape[1])
        return ungrouped((sim @ v) / (sim.sum(-1, keepdim=True) + EPS), q.shape[1])

    return forward


def _linear(fmap: FeatureMap):
    def forward(q, k, v, *, causal: bool, layout: Layout | None = None, **params) -> torch.Tensor:
        """One f×d state per KV head, read by its query group."""
        fq, fk = features(fmap, q, k, params, layout)
        fk = _seen_keys(fk, layout)
        rows = grouped(fq, k.shape[1])
        normaliser = rows @ fk.sum(-2).unsqueeze(-1)
        return ungrouped((rows @ (fk.transpose(-2, -1) @ v)) / (normaliser + EPS), q.shape[1])

    return forward


def _recurrent(fmap: FeatureMap):
    def forward(q, k, v, *, causal: bool, layout: Layout | None = None, **params) -> torch.Tensor:
        """Running sums per KV head; at each position its query group's rows read that position's
        state. Padded rows need nothing: their padding comes after every real query."""
        fq, fk = features(fmap, q, k, params, layout)
        kv_heads, group = k.shape[1], q.shape[1] // k.shape[1]
        state = torch.cumsum(fk.unsqueeze(-1) * v.unsqueeze(-2), dim=-3)  # Σ_{j<=i} φ(k_j) v_jᵀ
        z = torch.cumsum(fk, dim=-2).unsqueeze(-1)
        rows = fq.unflatten(1, (kv_heads, group)).transpose(2, 3)  # (b, kv, n, group, f)
        out = (rows @ state) / (rows @ z + EPS)
        return out.transpose(2, 3).flatten(1, 2)

    return forward


def _exclusive_cumsum(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Σ of the entries before each along ``dim``: the inclusive prefix shifted by one (not cumsum − x:
    that cancels catastrophically in the backward pass when a row's similarities are all zero and
    its gradient is ~1/EPS)."""
    inclusive = torch.cumsum(x, dim).narrow(dim, 0, x.shape[dim] - 1)
    return torch.cat([torch.zeros_like(x.narrow(dim, 0, 1)), inclusive], dim)


def _chunk_rows(x: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """Queries on the grid ``(rows, heads, chunks, chunk, f)`` as ``(rows, kv_heads, chunks,
    group·chunk, f)``: each chunk's rows hold its KV head's whole query group (a copy when grouped)."""
    return x.unflatten(1, (kv_heads, -1)).transpose(2, 3).flatten(3, 4)


def _unchunk_rows(x: torch.Tensor, chunk: int) -> torch.Tensor:
    """The inverse of :func:`_chunk_rows` on an output, flattened to ``(rows, heads, chunks·chunk, d)``."""
    return x.unflatten(3, (-1, chunk)).transpose(2, 3).flatten(1, 2).flatten(2, 3)


def _chunked(fmap: FeatureMap):
    def forward(q, k, v, *, causal: bool, chunk: int, layout: Layout | None = None, **params) -> torch.Tensor:
        """Quadratic within a chunk, a carried f×d state per KV head between chunks. Padded rows need
        nothing: their padding comes after every real query."""
        fq, fk = features(fmap, q, k, params, layout)
        width = q.shape[2]
        chunks = ceil_div(width, chunk)
        group = q.shape[1] // k.shape[1]
        # Padding after φ with zeros: padded keys contribute nothing, padded queries are dropped.
        fq, fk, vc = (F.pad(x, (0, 0, 0, chunks * chunk - width)).unflatten(2, (chunks, chunk)) for x in (fq, fk, v))
        fq = _chunk_rows(fq, k.shape[1])
        inside = _causal_rows(fq @ fk.transpose(-2, -1), group)
        # State carried into each chunk: Σ over earlier chunks, accumulated in at least float32.
        acc = torch.promote_types(v.dtype, torch.float32)
        kv_before = _exclusive_cumsum((fk.transpose(-2, -1) @ vc).to(acc), 2).to(v.dtype)
        z_before = _exclusive_cumsum(fk.sum(-2).to(acc), 2).to(v.dtype).unsqueeze(-1)
        numerator = inside @ vc + fq @ kv_before
        normaliser = inside.sum(-1, keepdim=True) + fq @ z_before
        return _unchunk_rows(numerator / (normaliser + EPS), chunk)[:, :, :width]

    return forward


def _documents_alone(forward: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """``forward`` with a packed batch run on each document alone (views of its tokens): its sums
    and running sums are then exactly the document's own, restarted at each one, with nothing
    subtracted (a whole-row cumulative sum minus the prefix before a document would cancel), and its
    work is the documents' (an n×n similarity matrix of the whole row masked by document would do
    the work of one row-long sequence: for D equal documents, D times theirs)."""
    def run(q, k, v, *, causal: bool, layout: Layout | None = None, **params) -> torch.Tensor:
        if layout is None or layout.kind != PACKED:
            return forward(q, k, v, causal=causal, layout=layout, **params)
        return per_document(lambda q_, k_, v_, causal_: forward(q_, k_, v_, causal=causal_, **params),
                            q, k, v, causal=causal, layout=layout)

    return run


# Forward matmul work per (batch, head) of each impl, for n tokens, f features, head dim d.
def _work_quadratic(n: int, f: int, d: int, causal: bool, params: dict) -> float:
    return 2.0 * n * n * (f + d)  # the full n×n matrices are computed, causal ones then masked


def _work_state(n: int, f: int, d: int, causal: bool, params: dict) -> float:
    return 4.0 * n * f * d  # build the f×d state, then read it for every query


def _work_chunked(n: int, f: int, d: int, causal: bool, params: dict) -> float:
    return 2.0 * n * params["chunk"] * (f + d) + 4.0 * n * f * d  # full chunk×chunk blocks + states


def _flops(fmap: FeatureMap, work: Callable[..., float]):
    def flops(point: Point) -> float:
        d = point.head_dim
        map_params = _map_params(fmap, dict(point.params))
        f = fmap.width(d, **map_params)
        return sum_over_sequences(point, lambda n: work(n, f, d, point.causal, point.params)
                                  + n * fmap.flops_per_token(d, **map_params))

    return flops


# --- decoding: a fixed-size state ------------------------------------------------------------------

@dataclass
class LinearState:
    """What a linear entry keeps of each sequence's prefix, per KV head, at least float32: Σφ(k)vᵀ
    (b, kv_heads, f, d) and Σφ(k) (b, kv_heads, f), with the stabiliser its key features are relative
    to (Performer; else None); and where a step writes the state after its new tokens (the prefix's
    is left as it was)."""

    kv: torch.Tensor
    z: torch.Tensor
    stabiliser: torch.Tensor | None
    next_kv: torch.Tensor
    next_z: torch.Tensor


def _key_features(fmap: FeatureMap, k: torch.Tensor, stabiliser: torch.Tensor | None,
                  params: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
    if fmap.stabilised_key is None:
        return fmap.key(k, **_map_params(fmap, params)), None
    return fmap.stabilised_key(k, stabiliser, **_map_params(fmap, params))


def _prefix_state(fmap: FeatureMap, k: torch.Tensor, v: torch.Tensor,
                  params: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Σφ(k)vᵀ, Σφ(k) and the stabiliser of one prefix."""
    fk, stabiliser = _key_features(fmap, k, None, params)
    acc = torch.promote_types(v.dtype, torch.float32)
    return (fk.transpose(-2, -1) @ v).to(acc), fk.sum(-2).to(acc), stabiliser


def _state_bytes(fmap: FeatureMap, point: Point) -> int:
    """One state per sequence and KV head, whatever the sequence's length."""
    f = fmap.width(point.head_dim, **_map_params(fmap, dict(point.params)))
    acc = torch.promote_types(point.torch_dtype, torch.float32)
    per_head = (f * point.head_dim + f) * acc.itemsize
    return point.batch * point.n_kv_heads * per_head


# A state has a fixed size, so a ragged batch needs no padding: packed and padded run alike.
LINEAR_LAYOUTS = {DENSE: "", PACKED: ", one state per sequence", PADDED: ", one state per sequence (nothing to pad)"}


def linear_decoder(fmap: FeatureMap) -> Decoder:
    """The recurrent form: the state updated by the new tokens, then read out (causally among
    several new tokens) by each KV head's query group, folded into its rows."""
    def prefill(k: torch.Tensor, v: torch.Tensor, *, q_len: int, layout: Layout | None = None,
                **params) -> LinearState:
        # Each sequence's own prefix (and Performer's stabiliser of it alone); a batched step after.
        states = [_prefix_state(fmap, k[i:i + 1, :, :n], v[i:i + 1, :, :n], params)
                  for i, n in enumerate(prefix_lengths(k, layout))]
        kv, z, stabiliser = (None if parts[0] is None else torch.cat(parts) for parts in zip(*states, strict=True))
        return LinearState(kv, z, stabiliser, torch.empty_like(kv), torch.empty_like(z))

    def step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: LinearState, **params) -> torch.Tensor:
        heads, kv_heads, q_len = q.shape[1], k.shape[1], q.shape[2]
        fq = grouped(fmap.query(q, **_map_params(fmap, params)), kv_heads)
        fk, stabiliser = _key_features(fmap, k, state.stabiliser, params)
        kv, z = state.kv, state.z
        # New keys may raise the stabiliser: the prefix's sums are relative to the old one, so they
        # are scaled by this factor (1 without a stabiliser) where they are read, not copied first.
        rescale = torch.ones((), dtype=kv.dtype, device=kv.device) if stabiliser is None else \
            torch.exp(state.stabiliser - stabiliser).to(kv.dtype)
        torch.addcmul((fk.transpose(-2, -1) @ v).to(kv.dtype), kv, rescale, out=state.next_kv)
        torch.addcmul(fk.sum(-2).to(z.dtype), z, rescale[..., 0] if rescale.ndim else rescale, out=state.next_z)
        # the new tokens among themselves, each group member's rows causal
        inside = (fq @ fk.transpose(-2, -1)).unflatten(2, (heads // kv_heads, q_len)).tril().flatten(2, 3)
        numerator = (fq @ kv.to(fq.dtype)) * rescale.to(fq.dtype) + inside @ v
        normaliser = (fq @ z.to(fq.dtype).unsqueeze(-1)) * rescale.to(fq.dtype) + inside.sum(-1, keepdim=True)
        return ungrouped(numerator / (normaliser + EPS), heads)

    def bytes_moved(point: Point) -> int:
        # state read and written; q read and output written per query head, k and v read per KV head
        tokens = 2 * point.batch * (point.heads + point.n_kv_heads) * point.q_len * point.head_dim
        return 2 * _state_bytes(fmap, point) + tokens * point.torch_dtype.itemsize

    def flops(point: Point) -> float:
        d, q = point.head_dim, point.q_len
        f = fmap.width(d, **_map_params(fmap, dict(point.params)))
        # as the forward's state impls count (_work_state), per query head: 2·f·d to add a token to
        # the state, 2·f·d to read it out; plus the new tokens among themselves
        per_token = fmap.flops_per_token(d, **_map_params(fmap, dict(point.params))) + 4.0 * f * d
        return point.batch * point.heads * (q * per_token + 2.0 * q * q * (f + d))

    return Decoder(prefill, step, lambda point: _state_bytes(fmap, point), bytes_moved, flops,
                   "eager recurrent state step", LINEAR_LAYOUTS)


@dataclass(frozen=True)
class LinearImpl:
    """How one impl computes a feature map's attention, which masking it can do (and why not), and
    how it runs each layout (what the kernel column adds)."""

    make: Callable[[FeatureMap], Callable[..., torch.Tensor]]
    work: Callable[..., float]  # forward matmul work per (batch, head)
    causal: frozenset[bool]
    causal_reason: str = ""
    params: dict = field(default_factory=dict)
    layouts: dict[str, str] = field(default_factory=dict)


IMPLS = {
    "quadratic": LinearImpl(lambda fmap: _documents_alone(_quadratic(fmap)), _work_quadratic,
                            frozenset({False, True}),
                            layouts={PACKED: " per document", PADDED: " with padding keys zeroed"}),
    "linear": LinearImpl(lambda fmap: _documents_alone(_linear(fmap)), _work_state, frozenset({False}),
                         "the global φ(K)ᵀV sum lets queries see future keys; use recurrent or chunked",
                         layouts={PACKED: " per document", PADDED: " with padding keys zeroed"}),
    "recurrent": LinearImpl(lambda fmap: _documents_alone(_recurrent(fmap)), _work_state, frozenset({True}),
                            "running sums compute the causal prefix; use linear when non-causal",
                            layouts={PACKED: " per document"}),
    "chunked": LinearImpl(lambda fmap: _documents_alone(_chunked(fmap)), _work_chunked, frozenset({True}),
                          "chunking carries the causal prefix; use linear when non-causal", {"chunk": 64},
                          layouts={PACKED: " per document"}),
}


def _kernel_name(impl: str, layouts: dict[str, str]) -> Callable[[Point], str]:
    return lambda point: f"eager {impl}{layouts.get(point.layout, '')}"


def linear_entry(fmap: FeatureMap, impl: str) -> Entry:
    """The entry of ``fmap`` computed by ``impl`` (registered below; hybrids take one as their linear part)."""
    how = IMPLS[impl]
    causal, why = how.causal, how.causal_reason
    if fmap.causal_reason:
        causal, why = causal - {True}, fmap.causal_reason
    return Entry(fmap.name, impl, "linear", how.make(fmap), _quadratic(fmap), _flops(fmap, how.work),
                 params={**fmap.params, **how.params},
                 caps=Capabilities(causal=causal, causal_reason=why, layouts=frozenset(LAYOUTS), gqa=True),
                 decoder=linear_decoder(fmap) if True in causal else None,
                 kernel_name=_kernel_name(impl, how.layouts), summary=fmap.summary)


for _fmap in FEATURE_MAPS:
    for _name in IMPLS:
        _entry = linear_entry(_fmap, _name)
        if _entry.caps.causal:  # a causal-only impl of a map that cannot be causal would never run
            register(_entry)
