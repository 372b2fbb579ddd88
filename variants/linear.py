"""Linear (kernelised) attention: ``O_i = Σ_j sim(q_i,k_j) v_j / Σ_j sim(q_i,k_j)``, sim = φ(q)·φ(k).

Layout ``(batch, heads, seq, head_dim)``. φ is applied to the raw q and k (the feature map plays the
role of the 1/√d scale); the only normalisation is the division by Σ sim.

Impls, all computing the same function of the same φ:

* ``quadratic`` — the n×n similarity matrix (the reference; causal by masking it);
* ``linear`` — non-causal ``φ(Q)(φ(K)ᵀV)`` in O(n·f·d);
* ``recurrent`` — causal running sums of φ(k)vᵀ (a cumulative sum: O(n·f·d) memory);
* ``chunked`` — causal, quadratic inside a chunk and a carried f×d state between chunks.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .decode import Decoder, prefix_lengths
from .layouts import DENSE, PACKED, PADDED, Layout, grouped, sum_over_sequences, ungrouped
from .registry import Capabilities, Entry, Point, ceil_div, register

EPS = 1e-6  # keeps rows whose similarities are all zero (possible with relu) finite: they output 0


@dataclass(frozen=True)
class FeatureMap:
    """φ for queries and keys (they differ for softmax-qk), its width and its own FLOPs per token."""

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


def _performer_key(x: torch.Tensor, stabiliser: torch.Tensor | None,
                   features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Key features relative to one maximum per head (it cancels only if all keys share it), or to
    ``stabiliser`` when that is larger (a decode step's new keys beside the prefix's)."""
    logits = _performer_logits(x, features)
    shared = logits.detach().amax((-2, -1), keepdim=True)
    if stabiliser is not None:
        shared = torch.maximum(shared, stabiliser)
    return torch.exp(logits - shared) / math.sqrt(features), shared


FEATURE_MAPS = [
    FeatureMap("linear-elu1", lambda x: elu1(x), lambda x: elu1(x), lambda d: d,
               summary="φ(x) = elu(x)+1 (Transformers are RNNs)"),
    FeatureMap("linear-relu", lambda x: F.relu(x), lambda x: F.relu(x), lambda d: d,
               summary="φ(x) = relu(x)"),
    FeatureMap("linear-softmax-qk", lambda x: torch.softmax(x, dim=-1), lambda x: torch.softmax(x, dim=-2),
               lambda d: d,
               causal_reason="φ(K) is a softmax over the whole key sequence, so every position sees future keys",
               summary="softmax of Q over features, of K over the sequence (Efficient Attention)"),
    FeatureMap("linear-taylor", taylor, taylor, lambda d: d + 1,
               summary="sim = 1 + q̂·k̂ (first-order Taylor of exp on L2-normalised q, k)"),
    FeatureMap("performer", _performer_query, lambda x, features: _performer_key(x, None, features)[0],
               lambda d, features: features, params={"features": 256},
               flops_per_token=lambda d, features: 2.0 * 2 * d * features,  # q and k projections
               summary="FAVOR+ positive orthogonal random features", stabilised_key=_performer_key),
]


def _map_params(fmap: FeatureMap, params: dict) -> dict:
    """The feature map's own parameters: the impl's (``chunk``) are dropped, so the quadratic
    reference takes the same parameters as every impl."""
    return {name: value for name, value in params.items() if name in fmap.params}


def _features(fmap: FeatureMap, q: torch.Tensor, k: torch.Tensor, params: dict):
    own = _map_params(fmap, params)
    return fmap.query(q, **own), fmap.key(k, **own)


def _quadratic(fmap: FeatureMap):
    def forward(q, k, v, *, causal: bool, **params) -> torch.Tensor:
        fq, fk = _features(fmap, q, k, params)
        sim = fq @ fk.transpose(-2, -1)
        if causal:
            sim = sim.tril()
        return (sim @ v) / (sim.sum(-1, keepdim=True) + EPS)

    return forward


def _linear(fmap: FeatureMap):
    def forward(q, k, v, *, causal: bool, **params) -> torch.Tensor:
        fq, fk = _features(fmap, q, k, params)
        kv = fk.transpose(-2, -1) @ v  # (f, d)
        normaliser = fq @ fk.sum(-2).unsqueeze(-1)
        return (fq @ kv) / (normaliser + EPS)

    return forward


def _recurrent(fmap: FeatureMap):
    def forward(q, k, v, *, causal: bool, **params) -> torch.Tensor:
        fq, fk = _features(fmap, q, k, params)
        state = torch.cumsum(fk.unsqueeze(-1) * v.unsqueeze(-2), dim=-3)  # Σ_{j<=i} φ(k_j) v_jᵀ
        normaliser = (fq * torch.cumsum(fk, dim=-2)).sum(-1, keepdim=True)
        return torch.einsum("...nf,...nfd->...nd", fq, state) / (normaliser + EPS)

    return forward


def _chunked(fmap: FeatureMap):
    def forward(q, k, v, *, causal: bool, chunk: int, **params) -> torch.Tensor:
        fq, fk = _features(fmap, q, k, params)
        b, h, n, _ = v.shape
        n_chunks = ceil_div(n, chunk)
        pad = n_chunks * chunk - n
        # Padding after φ with zeros: padded keys contribute nothing, padded queries are dropped.
        fq, fk, vc = (F.pad(x, (0, 0, 0, pad)).view(b, h, n_chunks, chunk, x.shape[-1]) for x in (fq, fk, v))
        inside = (fq @ fk.transpose(-2, -1)).tril()
        # State carried into each chunk: Σ over earlier chunks, accumulated in at least float32.
        acc = torch.promote_types(v.dtype, torch.float32)
        kv = (fk.transpose(-2, -1) @ vc).to(acc)
        z = fk.sum(-2).to(acc)
        # Exclusive prefix by shifting the inclusive one (not cumsum − x: that cancels catastrophically
        # in the backward pass when a row's similarities are all zero and its gradient is ~1/EPS).
        kv_before = F.pad(torch.cumsum(kv, dim=2)[:, :, :-1], (0, 0, 0, 0, 1, 0)).to(v.dtype)
        z_before = F.pad(torch.cumsum(z, dim=2)[:, :, :-1], (0, 0, 1, 0)).to(v.dtype).unsqueeze(-1)
        numerator = inside @ vc + fq @ kv_before
        normaliser = inside.sum(-1, keepdim=True) + fq @ z_before
        out = numerator / (normaliser + EPS)
        return out.reshape(b, h, n_chunks * chunk, -1)[:, :, :n]

    return forward


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
    """How one impl computes a feature map's attention, and which masking it can do (and why not)."""

    make: Callable[[FeatureMap], Callable[..., torch.Tensor]]
    work: Callable[..., float]  # forward matmul work per (batch, head)
    causal: frozenset[bool]
    causal_reason: str = ""
    params: dict = field(default_factory=dict)


IMPLS = {
    "quadratic": LinearImpl(_quadratic, _work_quadratic, frozenset({False, True})),
    "linear": LinearImpl(_linear, _work_state, frozenset({False}),
                         "the global φ(K)ᵀV sum lets queries see future keys; use recurrent or chunked"),
    "recurrent": LinearImpl(_recurrent, _work_state, frozenset({True}),
                            "running sums compute the causal prefix; use linear when non-causal"),
    "chunked": LinearImpl(_chunked, _work_chunked, frozenset({True}),
                          "chunking carries the causal prefix; use linear when non-causal", {"chunk": 64}),
}

for _fmap in FEATURE_MAPS:
    for _name, _impl in IMPLS.items():
        _causal, _why = _impl.causal, _impl.causal_reason
        if _fmap.causal_reason:
            if _causal == {True}:
                continue  # causal-only impls of a map that cannot be causal would never run
            _causal, _why = _causal - {True}, _fmap.causal_reason
        register(Entry(
            _fmap.name, _name, "linear", _impl.make(_fmap), _quadratic(_fmap), _flops(_fmap, _impl.work),
            params={**_fmap.params, **_impl.params},
            caps=Capabilities(causal=_causal, causal_reason=_why),
            decoder=linear_decoder(_fmap) if True in _causal else None,
            kernel_name=functools.partial(lambda p, impl: f"eager {impl}", impl=_name),
            summary=_fmap.summary))
