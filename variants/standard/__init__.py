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

from ..decode import (
    Attend,
    Decoder,
    MaskOf,
    boolean_mask,
    kv_decoder,
    sdpa_attend,
    trial_step,
    xformers_attend,
    xformers_mask_of,
)
from ..layouts import (
    LAYOUTS,
    PACKED,
    PADDED,
    Layout,
    SequenceAttention,
    grouped,
    per_document,
    sum_over_sequences,
    ungrouped,
)
from ..masks import FULL_CAUSAL, BiasSpec
from ..reference import exact_attention
from ..registry import DECODE, Capabilities, Entry, Point, condense, register
from ..xformers_ops import window_bias, xformers_attention, xformers_kernel, xformers_unsupported


def dense_flops(point: Point) -> float:
    """FlashAttention convention: forward 4·n²·d per sequence (document) and query head, halved when causal."""
    per_sequence = (lambda n: 2.0 * n * n * point.head_dim) if point.causal else (lambda n: 4.0 * n * n * point.head_dim)
    return sum_over_sequences(point, per_sequence)


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool) -> torch.Tensor:
    return exact_attention(q, k, v, causal)


def _eager_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                     mask: torch.Tensor | None = None) -> torch.Tensor:
    """The explicit three-step computation; each KV head's query group folded into its rows, so K and
    V are read once per KV head and never repeated. ``mask`` (rows, 1, n_q, n_kv): True may attend."""
    heads, n_q, n_kv = q.shape[1], q.shape[-2], k.shape[-2]
    scores = (grouped(q, k.shape[1]) @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))
    if causal or mask is not None:  # rows are (group member, query): masked per query, for every member
        allowed = torch.ones(1, 1, n_q, n_kv, dtype=torch.bool, device=q.device)
        if causal:
            allowed = allowed.tril()
        if mask is not None:
            allowed = allowed & mask
        scores = scores.unflatten(-2, (heads // k.shape[1], n_q)).masked_fill(~allowed[:, :, None], float("-inf"))
        scores = scores.flatten(-3, -2)
    return ungrouped(torch.softmax(scores, dim=-1) @ v, heads)


def eager(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool,
          layout: Layout | None = None) -> torch.Tensor:
    """The explicit three-step computation (the "PyTorch" line of the FlashAttention charts): per
    document when packed, with the key padding mask when padded."""
    if layout is None:
        return _eager_attention(q, k, v, causal)
    if layout.kind == PACKED:
        return per_document(_eager_attention, q, k, v, causal=causal, layout=layout)
    return _eager_attention(q, k, v, False, layout.key_mask(causal, q.device))


# --- SDPA backends -------------------------------------------------------------------------------

def _sdpa(backend: SDPBackend) -> SequenceAttention:
    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=q.shape[1] != k.shape[1])

    return attend


def _sdpa_forward(backend: SDPBackend):
    attend = _sdpa(backend)

    def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool,
                layout: Layout | None = None) -> torch.Tensor:
        """One call; per document when packed (SDPA has no varlen form for dense tensors); with the
        key padding mask when padded."""
        if layout is None:
            return attend(q, k, v, causal)
        if layout.kind == PACKED:
            return per_document(attend, q, k, v, causal=causal, layout=layout)
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=layout.key_mask(causal, q.device),
                                                  enable_gqa=q.shape[1] != k.shape[1])

    forward.__name__ = f"sdpa_{backend.name.lower()}"
    return forward


def _sdpa_kernel_name(backend: SDPBackend):
    def kernel(point: Point) -> str:
        how = {PACKED: ", one call per document", PADDED: " with a key padding mask"}.get(point.layout, "")
        return f"sdpa:{backend.name}{how}" + (" (enable_gqa)" if point.grouped else "")

    return kernel


def _refusal(backend: SDPBackend, run: Callable[[], Any]) -> str | None:
    """``run``'s refusal (with PyTorch's warnings, which carry the real reasons) as the reason the
    backend does not support this kind of input; None when it ran."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            run()
            return None
        except RuntimeError as exc:
            why = "; ".join(str(w.message) for w in caught if "Warning" in w.category.__name__)
            return condense(f"SDPA backend {backend.name} unavailable: {why or exc}")


@functools.lru_cache(maxsize=256)
def _probe_sdpa(backend: SDPBackend, device: str, dtype: str, head_dim: int, causal: bool,
                grad: bool, grouped: bool = False, padded: bool = False) -> str | None:
    """Run the backend once on a tiny input of this kind (two query heads per KV head when
    ``grouped``, a key padding mask when ``padded``)."""
    x = torch.zeros(1, 1, 16, head_dim, device=device, dtype=getattr(torch, dtype), requires_grad=grad)
    q = x.expand(1, 2, 16, head_dim) if grouped else x
    bias = Layout(PADDED, ((9,), (16,))).key_mask(causal, device)[:1] if padded else None  # 9 of 16 keys real

    def run() -> None:
        with sdpa_kernel([backend]):
            out = F.scaled_dot_product_attention(q, x, x, attn_mask=bias, enable_gqa=grouped,
                                                 is_causal=causal and not padded)
        if grad:
            out.sum().backward()

    return _refusal(backend, run)


@functools.lru_cache(maxsize=256)
def _probe_sdpa_step(backend: SDPBackend, device: str, dtype: str, head_dim: int, q_len: int, grouped: bool,
                     layout: str) -> str | None:
    """The backend's decoder run once on a tiny input of this kind: its step's own masks and grouping."""
    return _refusal(backend, lambda: trial_step(_sdpa_decoder(backend), device, getattr(torch, dtype), head_dim,
                                                q_len, grouped, layout))


def _sdpa_probe(backend: SDPBackend):
    def probe(point: Point) -> str | None:
        if point.mode == DECODE:
            return _probe_sdpa_step(backend, point.device, point.dtype, point.head_dim, point.q_len, point.grouped,
                                    point.layout)
        return _probe_sdpa(backend, point.device, point.dtype, point.head_dim, point.causal, point.needs_grad,
                           point.grouped, point.layout == PADDED)

    return probe


# --- decoding: a KV cache of every prefix position ------------------------------------------------

# The CUDA backends whose kernels align a causal mask lower-right natively, given a CausalBias; the
# others (and every CPU backend) would materialise it at every step, so they get the boolean mask.
_LOWER_RIGHT_NATIVE = (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION)


def _decode_mask_of(backend: SDPBackend) -> MaskOf:
    """Several new tokens see the cache and themselves up to the diagonal: one sequence's mask is the
    lower-right causal triangle, built once per cache in the form the backend runs fastest. A padded
    batch's differs in every row (its padding): boolean."""
    def mask_of(mask: torch.Tensor | None, keys: torch.Tensor, params: dict) -> Any:
        if mask is None or mask.shape[0] > 1 or not (keys.is_cuda and backend in _LOWER_RIGHT_NATIVE):
            return mask
        return causal_lower_right(*mask.shape[-2:])

    return mask_of


def _sdpa_attend(backend: SDPBackend) -> Attend:
    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: Any) -> torch.Tensor:
        with sdpa_kernel([backend]):
            return sdpa_attend(q, k, v, bias)

    return attend


def _eager_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return _eager_attention(q, k, v, False, mask)


def _xformers_bias(mask: torch.Tensor | None, keys: torch.Tensor, params: dict) -> BiasSpec | None:
    return None if mask is None else ("LowerTriangularFromBottomRightMask", ())


# --- xformers: one call, the layout in its bias ---------------------------------------------------

def _xformers_full_bias(point: Point, layout: Layout | None) -> BiasSpec | None:
    return window_bias(None, point.causal, layout)


def xformers_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool,
                     layout: Layout | None = None) -> torch.Tensor:
    """One memory_efficient_attention call, grouped heads in its 5-D form: packed documents through
    its block-diagonal bias, padded rows through its padded-keys bias (non-causal) or its causal
    mask alone (causal: padding keys come after every real query's keys)."""
    return xformers_attention(q, k, v, window_bias(None, causal, layout))


def _decoder(attend: Attend, what: str, mask_of: MaskOf = boolean_mask) -> Decoder:
    return kv_decoder(lambda params: FULL_CAUSAL, attend, f"{what} over the KV cache", mask_of)


@functools.cache
def _sdpa_decoder(backend: SDPBackend) -> Decoder:
    """The backend's decoder: its entry's, and the one its probe runs."""
    return _decoder(_sdpa_attend(backend), f"sdpa:{backend.name}", _decode_mask_of(backend))


# --- registration --------------------------------------------------------------------------------

_SUMMARY = "softmax(QKᵀ/√d)V"
_PER_DOCUMENT = frozenset(LAYOUTS)
register(Entry("standard", "eager", "standard", eager, reference, dense_flops,
               caps=Capabilities(layouts=_PER_DOCUMENT, gqa=True),
               kernel_name=lambda p: "eager matmul+softmax+matmul"
                                     + {PACKED: " per document", PADDED: " with a key padding mask"}.get(p.layout, ""),
               decoder=_decoder(_eager_attend, "eager matmul+softmax"),
               summary=f"{_SUMMARY}, explicit n×n scores"))

_CUDA = frozenset({"cuda"})
for _impl, _backend, _caps in (
        ("sdpa-math", SDPBackend.MATH, {}),
        ("sdpa-flash", SDPBackend.FLASH_ATTENTION, {"max_head_dim": 256}),  # CPU has one too
        ("sdpa-efficient", SDPBackend.EFFICIENT_ATTENTION, {"devices": _CUDA}),
        ("sdpa-cudnn", SDPBackend.CUDNN_ATTENTION, {"devices": _CUDA, "max_head_dim": 256})):
    register(Entry("standard", _impl, "baseline", _sdpa_forward(_backend), reference, dense_flops,
                   caps=Capabilities(**_caps, layouts=_PER_DOCUMENT, gqa=True, probe=_sdpa_probe(_backend)),
                   kernel_name=_sdpa_kernel_name(_backend),
                   decoder=_sdpa_decoder(_backend),
                   summary=f"{_SUMMARY} through torch SDPA restricted to {_backend.name}"))

register(Entry("standard", "xformers", "baseline", xformers_forward, reference, dense_flops,
               caps=Capabilities(requires=("xformers",), layouts=frozenset(LAYOUTS), gqa=True,
                                 probe=lambda p: xformers_unsupported(p, _xformers_full_bias)),
               kernel_name=lambda p: xformers_kernel(p, _xformers_full_bias),
               decoder=_decoder(xformers_attend, "xformers memory_efficient_attention", xformers_mask_of(_xformers_bias)),
               summary=f"{_SUMMARY} through xformers memory_efficient_attention"))
