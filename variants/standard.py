"""Standard softmax attention ``O = softmax(QKᵀ/√d + M) V``: eager, each SDPA backend, xformers.

Layout ``(batch, heads, seq, head_dim)``.
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

from .decode import Attend, Decoder, MaskOf, boolean_mask, eager_attend, kv_decoder
from .masks import FULL_CAUSAL, BiasSpec
from .reference import exact_attention
from .registry import DECODE, Capabilities, Entry, Point, condense, register
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
                grad: bool, q_len: int | None) -> str | None:
    """Run the backend once on a tiny input of this kind (a decode step's shape when ``q_len``); its
    refusal (with PyTorch's warnings, which carry the real reasons) is the reason it is not supported."""
    x = torch.zeros(1, 1, 16, head_dim, device=device, dtype=getattr(torch, dtype), requires_grad=grad)
    # A decode step: q_len new queries against the cache and themselves, masked as the step masks.
    q = x[:, :, :q_len] if q_len else x
    mask = torch.ones(q.shape[-2], 16, dtype=torch.bool, device=device).tril(16 - q.shape[-2])
    bias = _decode_mask_of(backend)(mask, x, {}) if q_len and q_len > 1 else None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with sdpa_kernel([backend]):
                out = F.scaled_dot_product_attention(q, x, x, attn_mask=bias, is_causal=causal and not q_len)
            if grad:
                out.sum().backward()
            return None
        except RuntimeError as exc:
            why = "; ".join(str(w.message) for w in caught if "Warning" in w.category.__name__)
            return condense(f"SDPA backend {backend.name} unavailable: {why or exc}")


def _sdpa_probe(backend: SDPBackend):
    def probe(point: Point) -> str | None:
        q_len = min(point.q_len, 15) if point.mode == DECODE else None
        return _probe_sdpa(backend, point.device, point.dtype, point.head_dim, point.causal, point.needs_grad,
                           q_len)

    return probe


# --- decoding: a KV cache of every prefix position ------------------------------------------------

# The CUDA backends whose kernels align a causal mask lower-right natively, given a CausalBias; the
# others (and every CPU backend) would materialise it at every step, so they get the boolean mask.
_LOWER_RIGHT_NATIVE = (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION)


def _decode_mask_of(backend: SDPBackend) -> MaskOf:
    """Several new tokens see the cache and themselves up to the diagonal: the lower-right causal
    triangle, built once per cache in the form the backend runs fastest."""
    def mask_of(mask: torch.Tensor | None, keys: torch.Tensor, params: dict) -> Any:
        if mask is None or not (keys.is_cuda and backend in _LOWER_RIGHT_NATIVE):
            return mask
        return causal_lower_right(*mask.shape)

    return mask_of


def _sdpa_attend(backend: SDPBackend) -> Attend:
    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: Any) -> torch.Tensor:
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)

    return attend


def _xformers_bias(mask: torch.Tensor | None, keys: torch.Tensor, params: dict) -> BiasSpec | None:
    return None if mask is None else ("LowerTriangularFromBottomRightMask", ())


def _decoder(attend: Attend, what: str, mask_of: MaskOf = boolean_mask) -> Decoder:
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
                   decoder=_decoder(_sdpa_attend(_backend), f"sdpa:{_backend.name}", _decode_mask_of(_backend)),
                   summary=f"{_SUMMARY} through torch SDPA restricted to {_backend.name}"))

register(Entry("standard", "xformers", "baseline",
               lambda q, k, v, *, causal: xformers_attention(q, k, v, causal_bias(causal)),
               reference, dense_flops,
               caps=Capabilities(requires=("xformers",),
                                 probe=lambda p: xformers_unsupported(p, causal_bias(p.causal))),
               kernel_name=lambda p: xformers_kernel(p, causal_bias(p.causal)),
               decoder=_decoder(xformers_attention, "xformers memory_efficient_attention", _xformers_bias),
               summary=f"{_SUMMARY} through xformers memory_efficient_attention"))
