"""Naive attention definitions: the float64 references impls are tested against.

Layout ``(batch, heads, seq, head_dim)``. These are written for clarity, not speed: they
materialise the full score matrix.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      mask: torch.Tensor | None = None) -> torch.Tensor:
    """``softmax(q kᵀ / √d + M) v`` with ``mask`` a boolean ``(n_q, n_kv)`` (True = may attend)."""
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def causal_mask(n_q: int, n_kv: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Boolean lower-triangular mask aligned at the top-left (query i sees keys j <= i)."""
    return torch.ones(n_q, n_kv, dtype=torch.bool, device=device).tril()


def exact_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    """Exact softmax attention, the yardstick every approximation is compared with."""
    mask = causal_mask(q.shape[-2], k.shape[-2], q.device) if causal else None
    return softmax_attention(q, k, v, mask)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Relative Frobenius error ``‖actual − expected‖ / ‖expected‖`` computed in float64."""
    actual, expected = actual.detach().double(), expected.detach().double()
    denom = torch.linalg.vector_norm(expected).item()
    diff = torch.linalg.vector_norm(actual - expected).item()
    return diff / denom if denom > 0 else diff


def gradient_errors(got: Sequence[torch.Tensor], expected: Sequence[torch.Tensor],
                    tolerance: float) -> list[float]:
    """The relative error of each gradient (dq, dk, dv) against its reference. A reference gradient
    whose norm is below ``tolerance`` times the mean norm of them all has *vanished* (dq = dk = 0 where
    every query sees only itself): it holds no figure to be relatively precise about, and its rounding
    errors have the scale of the gradients beside it, so its error is taken against that mean norm."""
    norms = [torch.linalg.vector_norm(e.detach().double()).item() for e in expected]
    scale = sum(norms) / len(norms) if norms else 0.0
    errors = []
    for actual, reference, norm in zip(got, expected, norms, strict=True):
        diff = torch.linalg.vector_norm(actual.detach().double() - reference.detach().double()).item()
        denom = norm if norm >= tolerance * scale else scale
        errors.append(diff / denom if denom > 0 else diff)
    return errors
