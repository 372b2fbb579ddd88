"""Chunked forms of the gated and delta-rule recurrences (variants.gated.recurrence), in PyTorch:
exact within each chunk by matrices, the state carried from chunk to chunk. The CPU impls of the
family; the GPU runs fla's Triton kernels of the same chunked algorithms.

Every exponent is a difference of cumulative log-decays taken later minus earlier, so ≤ 0: nothing
here can overflow however long the chunk or strong the decay.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .recurrence import scaled


def _chunks(x: torch.Tensor, chunk: int) -> torch.Tensor:
    """``(b, h, n, …)`` zero-padded to whole chunks, as ``(b, h, chunks, chunk, …)``. A padded
    position has k = v = β = g = 0: it changes no state, and its output is dropped."""
    n = x.shape[2]
    pad = -n % chunk
    if pad:
        widths = [0, 0] * (x.dim() - 3) + [0, pad]
        x = F.pad(x, widths)
    return x.unflatten(2, (-1, chunk))


def _causal_decays(log_decay: torch.Tensor) -> torch.Tensor:
    """``exp(Γ_i − Γ_j)`` for j ≤ i and 0 above the diagonal, Γ the cumulative log-decays in a chunk
    (``(…, C)`` scalar per position, or ``(…, C, K)`` per channel: then ``(…, C, C, K)``)."""
    per_channel = log_decay.dim() == 5  # (b, h, chunks, C, K)
    gamma = log_decay.cumsum(dim=3)
    diff = gamma[..., :, None, :] - gamma[..., None, :, :] if per_channel else gamma[..., :, None] - gamma[..., None, :]
    size = gamma.shape[3]
    above = torch.ones(size, size, dtype=torch.bool, device=gamma.device).triu(1)
    return diff.masked_fill(above[..., None] if per_channel else above, float("-inf")).exp()


# exp(−Γ) of a chunk's cumulative log-decays stays below e^60 (float32 holds 3e38) while Γ ≥ −60.
FACTORED_LIMIT = 60.0


def _decayed_scores(q: torch.Tensor, k: torch.Tensor, g: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """``Σ_k q_ik k_jk exp(Γ_ik − Γ_jk)`` for j ≤ i (0 above) per chunk, a decay per key channel. Factored
    as ``(q ⊙ e^Γ)(k ⊙ e^−Γ)ᵀ`` — one matmul instead of a C × C decay per channel, each term exact to
    rounding — while every ``e^−Γ`` is finite with room to spare; pairwise otherwise (gates so strong
    that a chunk decays by more than e^60)."""
    if bool(gamma.detach().min() >= -FACTORED_LIMIT):
        scores = (q * gamma.exp()) @ (k * (-gamma).exp()).transpose(-2, -1)
        above = torch.ones(scores.shape[-1], scores.shape[-1], dtype=torch.bool, device=q.device).triu(1)
        return scores.masked_fill(above, 0.0)  # above the diagonal e^(Γ_i − Γ_j) ≥ 1: dropped, not multiplied
    return torch.einsum("...ik,...jk,...ijk->...ij", q, k, _causal_decays(g))


def decay_chunked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, chunk: int) -> torch.Tensor:
    """The decay recurrence, ``g`` per key channel ``(b, h, n, K)`` or per head ``(b, h, n)`` (a scalar
    decay: the within-chunk decays are then one ``C × C`` matrix, not one per channel)."""
    n = q.shape[2]
    per_channel = g.dim() == 4
    q, k, v, g = (_chunks(x, chunk) for x in (scaled(q), k, v, g if per_channel else g[..., None]))
    gamma = g.cumsum(dim=3)  # (b, h, N, C, K or 1)
    within = _decayed_scores(q, k, g, gamma) if per_channel else (q @ k.transpose(-2, -1)) * _causal_decays(g)[..., 0]
    out = within @ v
    state = q.new_zeros((*q.shape[:2], q.shape[-1], v.shape[-1]))
    carried = []
    for c in range(q.shape[2]):
        carried.append((q[:, :, c] * gamma[:, :, c].exp()) @ state)
        last = gamma[:, :, c, -1]  # (b, h, K)
        keys = k[:, :, c] * (last[:, :, None] - gamma[:, :, c]).exp()
        state = last.exp()[..., None] * state + keys.transpose(-2, -1) @ v[:, :, c]
    out = out + torch.stack(carried, dim=2)
    return out.flatten(2, 3)[:, :, :n]


def delta_chunked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor,
                  g: torch.Tensor | None, chunk: int, with_state: bool = False
                  ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The (gated) delta rule by the WY representation. Within a chunk the corrections ``u_j`` (what
    each token writes, ``β_j`` times what the state misses of ``v_j``) solve ``(I + L) u = β ⊙ (v − a ⊙ K S)``,
    ``L_jl = β_j exp(Γ_j − Γ_l) k_jᵀk_l`` for l < j, ``a_j = exp(Γ_j)``, S the state carried in: one
    unit-lower-triangular solve, split into its part from the chunk (all chunks at once, ``u_v``) and
    its part from S (linear in it, ``W S``), so that only ``u = u_v − W S`` waits for the state.
    ``with_state``: also the state after the last token (a decoder's prefill; padding changes none)."""
    n = q.shape[2]
    g = beta.new_zeros(beta.shape) if g is None else g
    q, k = scaled(F.normalize(q, dim=-1)), F.normalize(k, dim=-1)
    q, k, v, beta, g = (_chunks(x, chunk) for x in (q, k, v, beta, g))
    decays = _causal_decays(g)  # (b, h, N, C, C): exp(Γ_i − Γ_j) on and below the diagonal
    gamma = g.cumsum(dim=3)  # (b, h, N, C)
    lower = beta[..., None] * decays * (k @ k.transpose(-2, -1))
    system = torch.eye(k.shape[3], dtype=k.dtype, device=k.device) + lower.tril(-1)
    solve = lambda rhs: torch.linalg.solve_triangular(system, rhs, upper=False, unitriangular=True)  # noqa: E731
    u_from_chunk = solve(beta[..., None] * v)
    w = solve((beta * gamma.exp())[..., None] * k)  # u's dependence on the carried state: u = u_v − W S
    scores = (q @ k.transpose(-2, -1)) * decays
    state = q.new_zeros((*q.shape[:2], q.shape[-1], v.shape[-1]))
    out = []
    for c in range(q.shape[2]):
        u = u_from_chunk[:, :, c] - w[:, :, c] @ state
        out.append(gamma[:, :, c].exp()[..., None] * (q[:, :, c] @ state) + scores[:, :, c] @ u)
        last = gamma[:, :, c, -1]  # (b, h)
        keys = k[:, :, c] * (last[..., None] - gamma[:, :, c]).exp()[..., None]
        state = last.exp()[..., None, None] * state + keys.transpose(-2, -1) @ u
    out = torch.stack(out, dim=2).flatten(2, 3)[:, :, :n]
    return (out, state) if with_state else out
