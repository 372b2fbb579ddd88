"""xformers glue: its attention call, its bias classes from a pattern's spec, which operator its
dispatcher picks, and why it refuses — leading with a C++ extension built for another torch, since
then every operator refuses and their own reasons would hide the cause.

Layout ``(batch, heads, seq, head_dim)``; xformers is imported only when used (it is optional).
"""

from __future__ import annotations

import functools
import re

import torch

from .masks import BiasSpec, make_xformers_bias
from .registry import Point, condense

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
        return condense(f"{name} was built for torch {built} but this is torch {torch.__version__}, so "
                         f"its C++ extension did not load and every operator refuses: {fix}",
                         XFORMERS_LEAD_LIMIT)
    # No torch to name (no build info, or no extension at all) or this very torch (a Python or CUDA
    # library mismatch): xformers' own words say which, placed last so that any cut falls in them.
    return condense(f"{name}'s C++ extension did not load with torch {torch.__version__}, so every "
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
        return condense(message, limit)
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
    return condense(parts[0][0], limit)  # one first reason longer than the limit: nothing else left


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
