"""Standard softmax attention ``O = softmax(QKᵀ/√d + M) V``: eager, each SDPA backend, xformers.

Layout ``(batch, heads, seq, head_dim)``.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

from .decode import Attend, eager_attend, kv_decoder
from .masks import FULL_CAUSAL
from .reference import exact_attention
from .registry import Capabilities, Entry, Point, condense, register
from .xformers_ops import causal_bias, xformers_attention, xformers_kernel, xformers_unsupported


def dense_flops(point: Point) -> float:
    """FlashAttention convention: forward 4·b·h·n·n_kv·d, halved when causal."""
    flops = 4.0 * point.batch * point.heads * point.seq_len * point.seq_len * point.head_dim
    return flops / 2 if point.causal else flops


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool) -> torch.Tensor:
    return exact_attention(q, k, v, causal)


def eager(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool) -> torch.Tensor:
    """The explicit three-step computation (the "PyTorch" line of the FlashAttention charts)."""
    scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))
    if causal:
        n_q, n_kv = scores.shape[-2:]
        upper = torch.ones(n_q, n_kv, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(upper, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


# --- SDPA backends -------------------------------------------------------------------------------

def _sdpa_forward(backend: SDPBackend):
    def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool) -> torch.Tensor:
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    forward.__name__ = f"sdpa_{backend.name.lower()}"
    return forward


@functools.lru_cache(maxsize=256)
def _probe_sdpa(backend: SDPBackend, device: str, dtype: str, head_dim: int, causal: bool,
                grad: bool) -> str | None:
    """Run the backend once on a tiny input of this kind; its refusal (with PyTorch's warnings,
    which carry the real reasons) is the unsupported reason."""
    x = torch.zeros(1, 1, 16, head_dim, device=device, dtype=getattr(torch, dtype), requires_grad=grad)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with sdpa_kernel([backend]):
                out = F.scaled_dot_product_attention(x, x, x, is_causal=causal)
            if grad:
                out.sum().backward()
            return None
        except RuntimeError as exc:
            why = "; ".join(str(w.message) for w in caught if "Warning" in w.category.__name__)
            return condense(f"SDPA backend {backend.name} unavailable: {why or exc}")


def _sdpa_probe(backend: SDPBackend):
    def probe(point: Point) -> str | None:
        grad = point.needs_grad
        return _probe_sdpa(backend, point.device, point.dtype, point.head_dim, point.causal, grad)

    return probe


# --- decoding: a KV cache of every prefix position ------------------------------------------------

def _lower_right(mask: torch.Tensor | None) -> Any:
    """Several new tokens see the cache and themselves up to the diagonal: the lower-right causal
    triangle, as the bias object the fused kernels take (a boolean mask would rule them out)."""
    return None if mask is None else causal_lower_right(*mask.shape)


def _sdpa_attend(backend: SDPBackend) -> Attend:
    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: Any) -> torch.Tensor:
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)

    return attend


def _xformers_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return xformers_attention(q, k, v, None if mask is None else ("LowerTriangularFromBottomRightMask", ()))


def _decoder(attend: Attend, what: str, mask_of: Callable[[torch.Tensor | None], Any] = lambda mask: mask):
    return kv_decoder(lambda params: FULL_CAUSAL, attend, f"{what} over the KV cache", mask_of)


# --- registration --------------------------------------------------------------------------------

_SUMMARY = "softmax(QKᵀ/√d)V"
register(Entry("standard", "eager", "standard", eager, reference, dense_flops,
               kernel_name=lambda p: "eager matmul+softmax+matmul",
               decoder=_decoder(eager_attend, "eager matmul+softmax"),
               summary=f"{_SUMMARY}, explicit n×n scores"))

_CUDA = frozenset({"cuda"})
for _impl, _backend, _caps in (
        ("sdpa-math", SDPBackend.MATH, {}),
        ("sdpa-flash", SDPBackend.FLASH_ATTENTION, {"max_head_dim": 256}),  # CPU has one too
        ("sdpa-efficient", SDPBackend.EFFICIENT_ATTENTION, {"devices": _CUDA}),
        ("sdpa-cudnn", SDPBackend.CUDNN_ATTENTION, {"devices": _CUDA, "max_head_dim": 256})):
    register(Entry("standard", _impl, "baseline", _sdpa_forward(_backend), reference, dense_flops,
                   caps=Capabilities(**_caps, probe=_sdpa_probe(_backend)),
                   kernel_name=functools.partial(lambda p, b: f"sdpa:{b.name}", b=_backend),
                   decoder=_decoder(_sdpa_attend(_backend), f"sdpa:{_backend.name}", _lower_right),
                   summary=f"{_SUMMARY} through torch SDPA restricted to {_backend.name}"))

register(Entry("standard", "xformers", "baseline",
               lambda q, k, v, *, causal: xformers_attention(q, k, v, causal_bias(causal)),
               reference, dense_flops,
               caps=Capabilities(requires=("xformers",),
                                 probe=lambda p: xformers_unsupported(p, causal_bias(p.causal))),
               kernel_name=lambda p: xformers_kernel(p, causal_bias(p.causal)),
               decoder=_decoder(_xformers_attend, "xformers memory_efficient_attention"),
               summary=f"{_SUMMARY} through xformers memory_efficient_attention"))
