"""Standard softmax attention ``O = softmax(QKᵀ/√d + M) V``: eager, each SDPA backend, xformers.

Layout ``(batch, heads, seq, head_dim)``.
"""

from __future__ import annotations

import functools
import math
import re
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

from .decode import Attend, eager_attend, kv_decoder
from .masks import FULL_CAUSAL, BiasSpec, make_xformers_bias
from .reference import exact_attention
from .registry import Capabilities, Entry, Point, register


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


def _condense(message: str, limit: int = 300) -> str:
    text = re.sub(r"\s+", " ", message).strip()
    return text if len(text) <= limit else text[: limit - 1] + "…"


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
            return _condense(f"SDPA backend {backend.name} unavailable: {why or exc}")


def _sdpa_probe(backend: SDPBackend):
    def probe(point: Point) -> str | None:
        grad = point.needs_grad
        return _probe_sdpa(backend, point.device, point.dtype, point.head_dim, point.causal, grad)

    return probe


# --- xformers ------------------------------------------------------------------------------------

XFORMERS_LEAD_LIMIT = 300  # the one line saying why xformers' C++ extension did not load
XFORMERS_REASON_LIMIT = 500  # an operator listing; run failures are capped at 500 too (bench.measure)
_NO_OPERATOR = "xformers has no operator for this input: "


def xformers_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       bias: BiasSpec | torch.Tensor | None) -> torch.Tensor:
    """xformers ``memory_efficient_attention``; xformers wants (batch, seq, heads, head_dim). ``bias``
    names one of its bias classes, or is an additive (batch, heads, queries, keys) tensor."""
    import xformers.ops as xops

    attn_bias = bias if isinstance(bias, torch.Tensor) else make_xformers_bias(bias)
    out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                          attn_bias=attn_bias)
    return out.transpose(1, 2)


def causal_bias(causal: bool) -> BiasSpec | None:
    return ("LowerTriangularMask", ()) if causal else None


@functools.lru_cache(maxsize=256)
def xformers_operator(device: str, dtype: str, head_dim: int, bias: BiasSpec | None, grad: bool) -> str:
    """Name of the xformers operator its dispatcher picks for this kind of input (forward, and
    backward too when ``grad``); raises NotImplementedError with xformers' reasons when none fits."""
    from xformers.ops.fmha import dispatch
    from xformers.ops.fmha.common import Inputs

    x = torch.zeros(1, 16, 1, head_dim, device=device, dtype=getattr(torch, dtype))
    inputs = Inputs(query=x, key=x, value=x, attn_bias=make_xformers_bias(bias))
    names = [dispatch._dispatch_fw(inputs, grad).NAME]
    if grad:
        names.append(dispatch._dispatch_bw(inputs, varlen_lse_packed=None).NAME)
    return "+".join(names)


def _xformers_load_exception() -> BaseException | None:
    """Why xformers' C++ extension did not load, as xformers recorded it; None when it loaded."""
    try:
        from xformers import _cpp_lib
    except Exception:  # an xformers without this module or that does not import: nothing recorded
        return None
    return getattr(_cpp_lib, "_cpp_library_load_exception", None)


def _xformers_version() -> str:
    try:
        import xformers
    except Exception:  # the mismatch line then names no version rather than failing
        return ""
    return str(getattr(xformers, "__version__", ""))


def xformers_build_mismatch(exc: BaseException | None) -> str | None:
    """One line (≤ XFORMERS_LEAD_LIMIT) saying why the extension did not load and what fixes it, or
    None when it loaded. Without it every operator refuses, even the ``-pt`` ones that only call
    PyTorch's kernels, so their own reasons would hide the cause."""
    if exc is None:
        return None
    version = _xformers_version()
    name = f"xformers {version}" if version else "xformers"
    try:
        built = str(exc.build_info.torch_version)
    except (AttributeError, KeyError, TypeError):  # build_info None, absent, or without a torch
        built = ""
    if built and built != torch.__version__:
        minor = re.match(r"\d+\.\d+", built)
        fix = f"install the xformers build for this torch, or torch {minor[0] if minor else built} for {name}"
        return _condense(f"{name} was built for torch {built} but this is torch {torch.__version__}, so "
                         f"its C++ extension did not load and every operator refuses: {fix}",
                         XFORMERS_LEAD_LIMIT)
    # No torch to name (no build info, or no extension at all) or this very torch (a Python or CUDA
    # library mismatch): xformers' own words say which, placed last so that any cut falls in them.
    return _condense(f"{name}'s C++ extension did not load with torch {torch.__version__}, so every "
                     f"operator refuses: install the xformers build for this torch. xformers: {exc}",
                     XFORMERS_LEAD_LIMIT)


def _xformers_refusals(message: str) -> list[tuple[str, list[str]]]:
    """Each operator and its reasons from the dispatcher's message ("`op` is not supported because:"
    then one indented reason a line); an operator name may hold ``@``, ``.`` and ``-``."""
    return [(op, [re.sub(r"<class '(?:\w+\.)*(\w+)'>", r"\1", line.strip())  # bias class: its name
                  for line in block.splitlines() if line.strip()])
            for op, block in re.findall(r"`([^`\n]+)` is not supported because:((?:\n[ \t]+\S.*)+)",
                                        message)]


def xformers_operator_reasons(message: str, limit: int = XFORMERS_REASON_LIMIT) -> str:
    """The dispatcher's refusal as "op: reason, reason; op: …" within ``limit``. When that is too long,
    each operator keeps its first reason whole (operators refusing alike share it) and whole
    operators are left off the end, counted, rather than a reason cut mid-way."""
    refusals = _xformers_refusals(message)
    if not refusals:
        return _condense(message, limit)
    full = "; ".join(f"{op}: {', '.join(reasons)}" for op, reasons in refusals)
    if len(full) <= limit:
        return full
    groups: dict[str, list[str]] = {}
    for op, reasons in refusals:
        groups.setdefault(reasons[0], []).append(op)
    parts = [(f"{', '.join(ops)}: {reason}", len(ops)) for reason, ops in groups.items()]
    for kept in range(len(parts), 0, -1):
        left_off = sum(n for _, n in parts[kept:])
        more = f"; +{left_off} more operator{'s' * (left_off > 1)}" if left_off else ""
        text = "; ".join(part for part, _ in parts[:kept]) + more
        if len(text) <= limit:
            return text
    return _condense(parts[0][0], limit)  # one first reason longer than the limit: nothing else left


def xformers_unsupported(point: Point, bias: BiasSpec | None) -> str | None:
    try:
        xformers_operator(point.device, point.dtype, point.head_dim, bias, point.needs_grad)
        return None
    except Exception as exc:  # whatever xformers raises, the point is unsupported, with its words
        lead = xformers_build_mismatch(_xformers_load_exception())
        return lead or _NO_OPERATOR + xformers_operator_reasons(
            str(exc), XFORMERS_REASON_LIMIT - len(_NO_OPERATOR))


def xformers_kernel(point: Point, bias: BiasSpec | None) -> str:
    op = xformers_operator(point.device, point.dtype, point.head_dim, bias, point.needs_grad)
    return f"xformers:{op}"


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
