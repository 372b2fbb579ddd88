"""Gated and delta-rule linear attention as their recurrences: the float64 definitions every impl of
the family is tested against, and the one-token state updates decoding runs.

Layout ``(batch, heads, seq, dim)``; the state ``S`` of a head is ``(key dim, value dim)`` and a query
reads it as ``S^T q``. Queries are scaled by ``1/√key dim`` (fla's default ``scale``).

* decay (retention, GLA): ``S_t = diag(exp g_t) S_{t-1} + k_t v_tᵀ`` with ``g_t ≤ 0`` per key channel
  (GLA's data-dependent gates; retention's fixed per-head decay is the same ``g`` at every step);
* delta rule (DeltaNet, Gated DeltaNet): ``S_t = exp(g_t)(I − β_t k_t k_tᵀ) S_{t-1} + β_t k_t v_tᵀ`` with
  ``β_t ∈ (0, 1)`` and a scalar ``g_t ≤ 0`` per head (DeltaNet: ``g = 0``), on L2-normalised q and k
  (fla's ``use_qk_l2norm_in_kernel``): the state then stays bounded.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def scaled(q: torch.Tensor) -> torch.Tensor:
    return q * q.shape[-1] ** -0.5


def decay_step(state: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """One token: ``diag(exp g) S + k vᵀ``; k, g ``(…, K)``, v ``(…, V)``, S ``(…, K, V)``."""
    return g.exp()[..., None] * state + k[..., :, None] * v[..., None, :]


def delta_step(state: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor,
               g: torch.Tensor) -> torch.Tensor:
    """One token of the (gated) delta rule on a normalised key: ``exp(g)(I − β k kᵀ) S + β k vᵀ``;
    β, g ``(…)``."""
    decayed = g.exp()[..., None, None] * state
    correction = v - (decayed * k[..., :, None]).sum(-2)  # v − (exp(g) S)ᵀ k: what the state misses
    return decayed + k[..., :, None] * (beta[..., None] * correction)[..., None, :]


def decay_recurrence(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """The decay recurrence token by token (causal by construction)."""
    state = q.new_zeros((*q.shape[:2], q.shape[-1], v.shape[-1]))
    q = scaled(q)
    out = []
    for t in range(q.shape[2]):
        state = decay_step(state, k[:, :, t], v[:, :, t], g[:, :, t])
        out.append((q[:, :, t, :, None] * state).sum(-2))
    return torch.stack(out, dim=2) if out else v.new_zeros(v.shape)


def delta_recurrence(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor,
                     g: torch.Tensor | None = None) -> torch.Tensor:
    """The (gated) delta rule token by token on L2-normalised q and k (causal by construction)."""
    g = beta.new_zeros(beta.shape) if g is None else g
    q, k = scaled(F.normalize(q, dim=-1)), F.normalize(k, dim=-1)
    state = q.new_zeros((*q.shape[:2], q.shape[-1], v.shape[-1]))
    out = []
    for t in range(q.shape[2]):
        state = delta_step(state, k[:, :, t], v[:, :, t], beta[:, :, t], g[:, :, t])
        out.append((q[:, :, t, :, None] * state).sum(-2))
    return torch.stack(out, dim=2) if out else v.new_zeros(v.shape)
