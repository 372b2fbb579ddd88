"""Inputs an entry takes beside q, k and v, by keyword: the data-dependent gates and decays of gated
linear attention, the delta rule's β, a sink's logit.

An entry declares each (:class:`ExtraInput`): its name, its shape, and the activation that makes its
values. The benchmark draws it as fla's tests draw theirs (the activation of a standard normal draw);
the training model computes it from each token's hidden state through a projection of its own and
the same activation, starting from the raw value the published layer starts at, as the published
architectures do. Per-token inputs follow the key/value heads (they gate the state those heads
keep) and the tokens (a document's slice is the document's own); per-head ones follow the query heads.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch


def identity(x: torch.Tensor) -> torch.Tensor:
    return x


@dataclass(frozen=True)
class ExtraInput:
    name: str
    per_token: bool = True  # (rows, kv_heads, tokens[, head_dim]); else one value per query head, (heads,)
    channels: bool = False  # one value per key channel (head_dim) rather than one per head
    activation: Callable[[torch.Tensor], torch.Tensor] = identity  # raw draw or projection -> the input
    summary: str = ""
    # Where a training model's projection (its bias, or a per-head value) starts, before the activation:
    # the published layers choose it, e.g. a decay that starts near 1 rather than at the activation of 0.
    initial_raw: float = 0.0

    def shape(self, rows: int, heads: int, kv_heads: int, tokens: int, head_dim: int) -> tuple[int, ...]:
        if not self.per_token:
            return (heads,)
        return (rows, kv_heads, tokens, head_dim) if self.channels else (rows, kv_heads, tokens)

    def width(self, head_dim: int) -> int:
        """Values per head (and token): what a projection of the hidden state must give."""
        return head_dim if self.channels else 1

    def draw(self, shape: tuple[int, ...], generator: torch.Generator, device: torch.device | str,
             dtype: torch.dtype) -> torch.Tensor:
        """The benchmark's input: the activation of a standard normal draw, in at least float32 (gates
        and decays are kept in float32 by the kernels that take them)."""
        raw = torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
        return self.activation(raw).to(torch.promote_types(dtype, torch.float32))


def is_per_token(x: torch.Tensor) -> bool:
    """Whether an extra input runs along the tokens (dim 2, as in q, k, v) rather than one per head."""
    return x.dim() >= 3


def sliced(extras: Mapping[str, torch.Tensor], index: tuple) -> dict[str, torch.Tensor]:
    """The extra inputs of the tokens ``index`` selects (``(rows, heads, positions)``); per-head ones whole."""
    return {name: x[index] if is_per_token(x) else x for name, x in extras.items()}
