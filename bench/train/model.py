"""A tiny pre-LN transformer LM whose attention is any registered (variant, impl), run causally.

Token embedding + learned positions (initialised as sinusoids, so that "the previous token" is a
fixed linear map of a position from the first step, which shortens the plateau before an induction
circuit forms on MQAR), L blocks (attention, then an MLP unless ``mlp_ratio = 0``, each behind a
LayerNorm and a residual), a final LayerNorm and a head tied to the embedding. Attention-only
blocks are Zoology's MQAR model: with MLPs, the CPU-sized recall task stays on its chance plateau
for 1,500 steps in most seeds. Three ways to hold the L blocks:

* ``unshared`` — L independent blocks;
* ``shared`` — one block applied L times (ALBERT): parameters ÷ L, FLOPs and activations unchanged;
* ``untied`` — starts shared; :meth:`TinyLM.untie` copies the shared block into L independent ones.
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from variants.registry import Entry, is_int_at_least

from .tasks import IGNORE

GELUS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "exact": F.gelu,  # x·Φ(x) with the erf
    "tanh": lambda x: F.gelu(x, approximate="tanh"),
    "sigmoid": lambda x: x * torch.sigmoid(1.702 * x),
}
SHARING = ("unshared", "shared", "untied")


@functools.cache  # a pure function of its arguments, asked once per training run
def gelu_max_abs_error(form: str, lo: float = -10.0, hi: float = 10.0, points: int = 2_000_001) -> float:
    """Max |form(x) − exact GELU(x)| on a dense float64 grid."""
    x = torch.linspace(lo, hi, points, dtype=torch.float64)
    return (GELUS[form](x) - F.gelu(x)).abs().max().item()


def sinusoids(length: int, dim: int, std: float) -> torch.Tensor:
    """Transformer sinusoidal positions (sin/cos pairs), scaled so that a whole period has deviation `std`."""
    position = torch.arange(length, dtype=torch.float64)[:, None]
    frequency = torch.exp(-math.log(10_000.0) * torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    table = torch.zeros(length, dim, dtype=torch.float64)
    table[:, 0::2], table[:, 1::2] = torch.sin(position * frequency), torch.cos(position * frequency)[:, : dim // 2]
    return (table * std * math.sqrt(2)).float()  # a sinusoid over its period has std 1/√2


@dataclass(frozen=True)
class ModelConfig:
    vocab: int = 512
    seq_len: int = 64
    d_model: int = 64
    layers: int = 2
    heads: int = 1
    mlp_ratio: int = 4  # MLP width ÷ d_model; 0 = attention-only blocks
    layer_sharing: str = "unshared"
    gelu: str = "exact"
    attn_params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not is_int_at_least(self.mlp_ratio, 0):
            raise ValueError(f"mlp_ratio={self.mlp_ratio!r} must be an integer ≥ 0 (0 = attention-only)")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.heads


class Attention(nn.Module):
    """Projections to q, k, v (as many key/value heads as query heads: TinyLM has no GQA), the entry,
    the output projection; and each extra input the entry declares (variants.inputs), made as the
    published architectures make theirs: a per-token one (GLA's gates, DeltaNet's β) by a projection
    of the token's hidden state of its own, then the input's activation; a per-head one (a sink's
    logit) from a learned parameter per head, through the same activation. Both start from the
    input's ``initial_raw`` (the projection's bias; its weights start as nn.Linear's)."""

    def __init__(self, cfg: ModelConfig, entry: Entry) -> None:
        super().__init__()
        self.heads, self.head_dim = cfg.heads, cfg.head_dim
        self.entry, self.params = entry, entry.resolve(cfg.attn_params)
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.out = nn.Linear(cfg.d_model, cfg.d_model)
        per_token = [x for x in entry.inputs if x.per_token]
        self.projections = nn.ModuleDict({x.name: nn.Linear(cfg.d_model, cfg.heads * x.width(cfg.head_dim))
                                          for x in per_token})
        with torch.no_grad():
            for x in per_token:
                self.projections[x.name].bias.fill_(x.initial_raw)
        # A constant, not a draw: every head starts alike and the gradient tells them apart; a sink's
        # logit of 0 starts the sink as heavy as one key of score 0, neither dominant nor absent.
        self.per_head = nn.ParameterDict({x.name: nn.Parameter(torch.full((cfg.heads,), x.initial_raw))
                                          for x in entry.inputs if not x.per_token})

    def extra_inputs(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The entry's extra inputs for hidden states ``x`` (batch, n, d_model), in ExtraInput.shape's
        layout: (batch, heads, n) or (batch, heads, n, head_dim) per token, (heads,) per head."""
        b, n, _ = x.shape
        extras = {}
        for spec in self.entry.inputs:
            if spec.per_token:
                raw = self.projections[spec.name](x).view(b, n, self.heads, -1).transpose(1, 2)
                raw = raw if spec.channels else raw.squeeze(-1)
            else:
                raw = self.per_head[spec.name]
            extras[spec.name] = spec.activation(raw)
        return extras

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = (t.view(b, n, self.heads, self.head_dim).transpose(1, 2)
                   for t in self.qkv(x).chunk(3, dim=-1))
        y = self.entry.forward(q, k, v, causal=True, **self.extra_inputs(x), **self.params)
        return self.out(y.transpose(1, 2).reshape(b, n, d))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(cfg.d_model)
        self.up = nn.Linear(cfg.d_model, cfg.mlp_ratio * cfg.d_model)
        self.down = nn.Linear(cfg.mlp_ratio * cfg.d_model, cfg.d_model)
        self.gelu = GELUS[cfg.gelu]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.gelu(self.up(self.norm(x))))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, entry: Entry) -> None:
        super().__init__()
        self.attn_norm = nn.LayerNorm(cfg.d_model)
        self.attn = Attention(cfg, entry)
        self.mlp = MLP(cfg) if cfg.mlp_ratio else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x))
        return x if self.mlp is None else x + self.mlp(x)


class TinyLM(nn.Module):
    def __init__(self, cfg: ModelConfig, entry: Entry) -> None:
        super().__init__()
        if cfg.layer_sharing not in SHARING:
            raise ValueError(f"layer_sharing={cfg.layer_sharing!r} (valid: {', '.join(SHARING)})")
        if cfg.gelu not in GELUS:
            raise ValueError(f"gelu={cfg.gelu!r} (valid: {', '.join(GELUS)})")
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab, cfg.d_model)
        self.pos = nn.Parameter(torch.zeros(cfg.seq_len, cfg.d_model))
        n_blocks = cfg.layers if cfg.layer_sharing == "unshared" else 1
        self.blocks = nn.ModuleList(Block(cfg, entry) for _ in range(n_blocks))
        self.norm = nn.LayerNorm(cfg.d_model)
        nn.init.normal_(self.embed.weight, std=0.02)
        with torch.no_grad():
            self.pos.copy_(sinusoids(cfg.seq_len, cfg.d_model, std=0.02))

    @property
    def shared(self) -> bool:
        return len(self.blocks) == 1 and self.cfg.layers > 1

    def untie(self) -> None:
        """Replace the shared block by L independent copies of it (the ``untied`` schedule)."""
        if self.shared:
            self.blocks = nn.ModuleList(copy.deepcopy(self.blocks[0]) for _ in range(self.cfg.layers))

    def forward(self, tokens: torch.Tensor, scored: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (batch, n, vocab), or (count, vocab) at the positions where `scored` is true: MQAR
        scores 8 positions of 64, and the vocabulary head is the largest matmul of a small model."""
        x = self.embed(tokens) + self.pos[: tokens.shape[1]]
        for layer in range(self.cfg.layers):
            x = self.blocks[layer % len(self.blocks)](x)
        x = self.norm(x)
        return (x if scored is None else x[scored]) @ self.embed.weight.T  # tied head

    def n_params(self) -> int:
        """Unique parameters (a shared block counts once)."""
        return sum(p.numel() for p in self.parameters())


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Sum of token cross-entropies over labelled positions (label ``IGNORE`` = not scored), and their
    count; logits (..., vocab) with labels of the leading shape."""
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.flatten(), ignore_index=IGNORE,
                           reduction="sum")
    return loss, int((labels != IGNORE).sum())
