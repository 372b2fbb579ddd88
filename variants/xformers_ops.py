"""xformers glue: its attention call, its bias classes as data (for a window, causal or not, over a
dense, packed or padded batch), which operator its dispatcher picks, and why it refuses — leading
with a C++ extension built for another torch, since then every operator refuses and their own
reasons would hide the cause.

Layout ``(batch, heads, seq, head_dim)``; xformers is imported only when used (it is optional).
Grouped-query heads go to xformers as its 5-D ``(B, M, G, H, K)`` layout: G the KV heads, H the
query heads of each, K and V broadcast over H with stride 0 (its documented MQA/GQA form, no copy).
A block-diagonal (varlen) bias indexes one row of every token: packed batches are that row already,
padded ones are folded into it.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from typing import Any

import torch

from .layouts import PACKED, PADDED, Layout
from .registry import DECODE, Point, condense

# An xformers attn_bias as data: (class name in xformers.ops.fmha.attn_bias, keyword arguments). A
# block-diagonal class is given its documents' lengths (``q_seqlen`` …) and built by its from_seqlens.
BiasSpec = tuple[str, tuple[tuple[str, Any], ...]]

XFORMERS_LEAD_LIMIT = 300  # the one line saying why xformers' C++ extension did not load
XFORMERS_REASON_LIMIT = 500  # an operator listing; run failures are capped at 500 too (bench.measure)
_NO_OPERATOR = "xformers has no operator for this input: "


# --- biases ----------------------------------------------------------------------------------------

class Unexpressible(ValueError):
    """xformers has no bias class for this masking; the message says why."""


def local_bias(left: int, right: int) -> BiasSpec:
    """xformers' local window, aligned bottom-right (queries end where the keys end)."""
    return "LocalAttentionFromBottomRightMask", (("window_left", left), ("window_right", right))


def window_bias(window: int | None, causal: bool, layout: Layout | None = None) -> BiasSpec | None:
    """The bias of attention to keys within ``window`` of the query (None: every key), causal or not,
    over a dense (``layout`` None), packed or padded batch; :class:`Unexpressible` where xformers has
    no class for it."""
    if layout is not None and layout.kind == PACKED:
        return _block_diagonal(window, causal, layout.lengths[0])
    if layout is not None and layout.kind == PADDED and not causal:
        return _padded_keys(window, layout)
    # Dense, or padded and causal: a row's padding keys come after all its real tokens, so causal
    # masking already hides them from every real query (padding queries' outputs are not kept).
    if window is None:
        return ("LowerTriangularMask", ()) if causal else None
    # Bottom-right alignment equals top-left here because queries and keys have the same length.
    return local_bias(window, 0 if causal else window)


def _block_diagonal(window: int | None, causal: bool, lengths: tuple[int, ...]) -> BiasSpec:
    """Packed documents: each attends within itself (xformers' varlen form)."""
    seqlens = (("q_seqlen", tuple(lengths)),)
    if window is None:
        return ("BlockDiagonalCausalMask" if causal else "BlockDiagonalMask"), seqlens
    if not causal:
        raise Unexpressible(
            "xformers has no non-causal local bias over packed documents: BlockDiagonalCausalLocalAttentionMask "
            "is causal, and BlockDiagonalLocalAttentionPaddedKeysMask needs every document's keys padded to "
            "one length")
    return "BlockDiagonalCausalLocalAttentionMask", (*seqlens, ("window_size", window + 1))  # j > i − window − 1


def _padded_keys(window: int | None, layout: Layout) -> BiasSpec:
    """Non-causal padded rows: each row's queries, padding ones included, against its real keys."""
    if window is not None:
        raise Unexpressible(
            "xformers has no non-causal local bias over padded rows: BlockDiagonalLocalAttentionPaddedKeysMask "
            "aligns each row's window to the end of its real keys, not to its queries")
    rows, width = len(layout.lengths), layout.width
    return "BlockDiagonalPaddedKeysMask", (("q_seqlen", (width,) * rows), ("kv_padding", width),
                                           ("kv_seqlen", tuple(sum(row) for row in layout.lengths)))


def make_xformers_bias(spec: BiasSpec | None, device: torch.device | str | None = None) -> Any | None:
    """The xformers ``attn_bias`` object of ``spec`` (a block-diagonal one's tensors on ``device``)."""
    if spec is None:
        return None
    from xformers.ops.fmha import attn_bias

    name, kwargs = spec
    kwargs = dict(kwargs)
    if "q_seqlen" not in kwargs:
        return getattr(attn_bias, name)(**kwargs)
    device = None if device is None else torch.device(device)  # xformers tells CPU by a device, not a string
    window = kwargs.pop("window_size", None)
    if window is None:
        return getattr(attn_bias, name).from_seqlens(**kwargs, device=device)
    # xformers takes a block-diagonal window only through make_local_attention (that class's own
    # from_seqlens cannot set it).
    bias = attn_bias.BlockDiagonalCausalMask.from_seqlens(**kwargs, device=device).make_local_attention(window)
    if type(bias).__name__ != name:
        raise ValueError(f"{name} with a window is not what xformers builds ({type(bias).__name__})")
    return bias


@functools.lru_cache(maxsize=64)
def _built_bias(spec: BiasSpec, device: torch.device) -> Any:
    return make_xformers_bias(spec, device)  # a block-diagonal one copies its lengths to the device once


# --- the call ---------------------------------------------------------------------------------------

def _xformers_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     varlen: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q ``(b, heads, n, d)``, k and v ``(b, kv_heads, n, d)`` as xformers takes them: ``(b, n, heads, d)``,
    one row of every token for a ``varlen`` (block-diagonal) bias, and 5-D ``(b, n, kv_heads, group, d)``
    with K and V expanded over the group (stride 0) when grouped."""
    def tokens(x: torch.Tensor) -> torch.Tensor:
        x = x.transpose(1, 2)
        return x.reshape(1, -1, *x.shape[2:]) if varlen else x

    query, key, value = tokens(q), tokens(k), tokens(v)
    group = q.shape[1] // k.shape[1]
    if group > 1:
        query = query.unflatten(2, (k.shape[1], group))
        key, value = (x.unsqueeze(3).expand(*x.shape[:3], group, x.shape[-1]) for x in (key, value))
    return query, key, value


def xformers_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       bias: BiasSpec | torch.Tensor | None) -> torch.Tensor:
    """xformers ``memory_efficient_attention``. ``bias`` names one of its bias classes
    (:data:`BiasSpec`), or is an additive (batch, heads, queries, keys) tensor."""
    import xformers.ops as xops
    from xformers.ops.fmha.attn_bias import VARLEN_BIASES

    attn_bias = bias if bias is None or isinstance(bias, torch.Tensor) else _built_bias(bias, q.device)
    out = xops.memory_efficient_attention(*_xformers_inputs(q, k, v, isinstance(attn_bias, VARLEN_BIASES)),
                                          attn_bias=attn_bias)
    b, heads, n, _ = q.shape
    return out.reshape(b, n, heads, out.shape[-1]).transpose(1, 2)


# --- which operator, or why none --------------------------------------------------------------------

@functools.lru_cache(maxsize=256)
def xformers_operator(device: str, dtype: str, head_dim: int, bias: BiasSpec | None, grad: bool,
                      group: int = 1, rows: int = 1, width: int = 16) -> str:
    """Name of the xformers operator its dispatcher picks for this kind of input (forward, and
    backward too when ``grad``): ``rows`` × ``width`` tokens, ``group`` query heads on one KV head,
    laid out as the real call lays them out. Raises NotImplementedError with xformers' reasons
    when none fits."""
    from xformers.ops.fmha import dispatch
    from xformers.ops.fmha.attn_bias import VARLEN_BIASES
    from xformers.ops.fmha.common import Inputs

    q, kv = (torch.zeros(rows, heads, width, head_dim, device=device, dtype=getattr(torch, dtype))
             for heads in (group, 1))
    attn_bias = make_xformers_bias(bias, device)
    query, key, value = _xformers_inputs(q, kv, kv, isinstance(attn_bias, VARLEN_BIASES))
    inputs = Inputs(query=query, key=key, value=value, attn_bias=attn_bias)
    forward = dispatch._dispatch_fw(inputs, grad)
    names = [forward.NAME]
    if grad:  # a varlen backward must read the forward's log-sum-exp format
        names.append(dispatch._dispatch_bw(inputs, varlen_lse_packed=forward.VARLEN_LSE_PACKED).NAME)
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


# A packed and a padded batch of the point's kind, small: the dispatcher decides on the bias class,
# the layout and the heads, which these share with the point's own (documents on no block edge).
PROBE_LAYOUTS = {PACKED: Layout(PACKED, ((9, 7),)), PADDED: Layout(PADDED, ((9,), (16,)))}

BiasOf = Callable[[Point, Layout | None], BiasSpec | None]  # (point, layout) -> its bias; may raise Unexpressible


def _probe_input(point: Point, bias_of: BiasOf) -> tuple[BiasSpec | None, int, int, int]:
    """(bias, group, rows, width) of a small input of the point's kind (decode steps: the dense
    form; a decoder's layouts are its own)."""
    layout = None if point.mode == DECODE else PROBE_LAYOUTS.get(point.layout)
    rows, width = (1, 16) if layout is None else (len(layout.lengths), layout.width)
    return bias_of(point, layout), point.heads // point.n_kv_heads, rows, width


def xformers_unsupported(point: Point, bias_of: BiasOf) -> str | None:
    """Why xformers cannot run the point: no bias class for its masking, or its build or
    dispatcher's refusal; None when an operator fits."""
    try:
        bias, group, rows, width = _probe_input(point, bias_of)
    except Unexpressible as exc:
        return str(exc)
    try:
        xformers_operator(point.device, point.dtype, point.head_dim, bias, point.needs_grad, group, rows, width)
        return None
    except Exception as exc:  # whatever xformers raises, the point is unsupported, with its words
        lead = xformers_build_mismatch(_xformers_load_exception())
        return lead or _NO_OPERATOR + xformers_operator_reasons(
            str(exc), XFORMERS_REASON_LIMIT - len(_NO_OPERATOR))


def xformers_kernel(point: Point, bias_of: BiasOf) -> str:
    """The operator(s), the bias class and, grouped, the 5-D form: what runs at the point."""
    bias, group, rows, width = _probe_input(point, bias_of)
    op = xformers_operator(point.device, point.dtype, point.head_dim, bias, point.needs_grad, group, rows, width)
    how = [bias[0]] if bias is not None else []
    if point.grouped:
        how.append("BMGHK, K/V broadcast over each group")
    return f"xformers:{op}" + (f" ({', '.join(how)})" if how else "")
