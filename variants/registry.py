"""The variant contract: what a (variant, impl) entry declares, and the registry of entries.

Every tensor is laid out ``(batch, heads, seq, head_dim)``. An entry knows *what* it computes
(forward, float64 reference, FLOPs, capabilities); it knows nothing about how it is measured.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch

from .inputs import ExtraInput
from .layouts import DENSE, Documents, Layout

if TYPE_CHECKING:
    from .decode import Decoder

DTYPES: dict[str, torch.dtype] = {
    "float64": torch.float64,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
DECODE = "decode"  # one step of new tokens against a cache of the prefix: causal by definition
MODES = ("fwd", "bwd", "fwd_bwd", DECODE)
BACKWARD_MODES = ("bwd", "fwd_bwd")  # the modes that differentiate, so need inputs with gradients
FAMILIES = ("standard", "sparse", "linear", "gated", "hybrid", "lowrank", "baseline")

# Relative Frobenius error an impl may show against its float64 reference, per input dtype.
DEFAULT_TOLERANCE: dict[str, float] = {
    "float64": 1e-10,
    "float32": 1e-5,
    "float16": 5e-3,
    "bfloat16": 3e-2,
}

# Smallest legal value of each known parameter (all parameters are integers).
PARAM_MINIMUM: dict[str, int] = {"window": 0, "rate": 1, "features": 1, "proj_len": 1, "chunk": 1}


@dataclass(frozen=True)
class Point:
    """One shape at which an entry is run: the unit of a sweep."""

    batch: int = 1
    heads: int = 1
    seq_len: int = 128
    head_dim: int = 64
    dtype: str = "float32"
    device: str = "cpu"
    causal: bool = False
    mode: str = "fwd"
    params: Mapping[str, Any] = field(default_factory=dict)
    q_len: int = 1  # decode: new tokens per step, against a prefix of seq_len tokens
    kv_heads: int | None = None  # key/value heads (grouped-query attention); None: as many as heads
    layout: str = DENSE  # dense, packed or padded (variants.layouts)
    documents: Documents | None = None  # how packed and padded rows split into documents

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def n_kv_heads(self) -> int:
        return self.kv_heads or self.heads

    @property
    def grouped(self) -> bool:
        """Fewer key/value heads than query heads (GQA, MQA)."""
        return self.n_kv_heads != self.heads

    @property
    def needs_grad(self) -> bool:
        return self.mode in BACKWARD_MODES


def is_int_at_least(value: Any, minimum: int = 1) -> bool:
    """An int (not a bool) of at least ``minimum``: the check every count and size here needs."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def own_params(params: Mapping[str, Any], names: Collection[str]) -> dict[str, Any]:
    """``params`` restricted to ``names``: what a part of a composed entry (a hybrid's) takes."""
    return {name: value for name, value in params.items() if name in names}


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def condense(message: str, limit: int = 300) -> str:
    """A message on one line within ``limit`` characters (a reason in a results row or a table)."""
    text = re.sub(r"\s+", " ", message).strip()
    return text if len(text) <= limit else text[: limit - 1] + "…"


@dataclass(frozen=True)
class Capabilities:
    """What an entry can run, declared as data so that reasons are uniform and readable; ``probe``
    is for what only trying tells (an SDPA backend, xformers' dispatcher), asked once the declared
    capabilities all hold."""

    devices: frozenset[str] = frozenset({"cpu", "cuda"})
    dtypes: frozenset[str] = frozenset(DTYPES)
    causal: frozenset[bool] = frozenset({False, True})
    max_head_dim: int | None = None
    head_dim_multiple: int = 1
    requires: tuple[str, ...] = ()  # importable modules
    layouts: frozenset[str] = frozenset({DENSE})  # variants.layouts: dense, packed, padded
    gqa: bool = False  # takes fewer key/value heads than query heads
    # Why a device, a causal setting, a layout or grouped heads are not supported, in the entry's own words.
    device_reason: str = ""
    causal_reason: str = ""
    layout_reason: str = ""
    gqa_reason: str = "this impl takes as many key/value heads as query heads"
    probe: Callable[[Point], str | None] | None = None  # point with resolved params -> reason or None

    def head_dim_reasons(self, head_dim: int) -> list[str]:
        reasons = []
        if self.max_head_dim is not None and head_dim > self.max_head_dim:
            reasons.append(f"head_dim={head_dim} exceeds the maximum {self.max_head_dim}")
        if head_dim % self.head_dim_multiple:
            reasons.append(f"head_dim={head_dim} is not a multiple of {self.head_dim_multiple}")
        return reasons

    def not_supported_reasons(self, point: Point) -> list[str]:
        """Every declared capability ``point`` lacks, each as a sentence; then, only if none, the probe's."""
        reasons = []
        device = torch.device(point.device).type
        if device not in self.devices:
            why = f": {self.device_reason}" if self.device_reason else f" (supported: {sorted(self.devices)})"
            reasons.append(f"device={device} not supported{why}")
        if point.dtype not in self.dtypes:
            reasons.append(f"dtype={point.dtype} not supported (supported: {sorted(self.dtypes)})")
        if point.causal not in self.causal:
            what = "causal" if point.causal else "non-causal"
            reasons.append(f"{what} not supported" + (f": {self.causal_reason}" if self.causal_reason else ""))
        if point.layout not in self.layouts and point.mode != DECODE:  # decoding layouts: the decoder's
            reasons.append(f"layout={point.layout} not supported" + (f": {self.layout_reason}" if self.layout_reason
                                                                    else f" (supported: {sorted(self.layouts)})"))
        if point.grouped and not self.gqa and point.mode != DECODE:  # every decoder groups (variants.decode)
            reasons.append(f"kv_heads={point.kv_heads} < heads={point.heads} (grouped-query) not supported: "
                           f"{self.gqa_reason}")
        missing = [m for m in self.requires if importlib.util.find_spec(m) is None]
        if missing:
            reasons.append(f"{', '.join(missing)} not installed (pip install 'attnbench[{missing[0]}]')")
        reasons += self.head_dim_reasons(point.head_dim)
        if not reasons and self.probe is not None:
            reasons += filter(None, [self.probe(point)])
        return reasons


AttentionFn = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class Entry:
    """One (variant, impl) pair.

    ``forward(q, k, v, *, causal, **params)`` takes q ``(batch, heads, seq, head_dim)`` and k, v with
    ``kv_heads`` heads (grouped-query attention where the entry declares it), and ``layout=`` a
    :class:`~variants.layouts.Layout` for packed and padded batches (only those, only where declared).
    ``reference`` is the naive float64-exact definition of one dense sequence with as many key/value
    as query heads, the impl is tested against (through ``variants.layouts.reference_attention``).
    Both take the entry's ``inputs`` (:mod:`variants.inputs`: gates, β, sink logits) by keyword.
    ``flops(point)`` counts the forward work this impl really does (docs/measurement.md, "FLOP
    conventions"); like ``kernel_name(point)`` it expects ``point.params`` resolved (defaults filled
    in, :meth:`resolve`).
    """

    variant: str
    impl: str
    family: str
    forward: AttentionFn
    reference: AttentionFn
    flops: Callable[[Point], float]
    params: Mapping[str, Any] = field(default_factory=dict)
    caps: Capabilities = field(default_factory=Capabilities)
    kernel_name: Callable[[Point], str] | None = None  # what really runs: the results row's ``kernel``
    tolerance: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_TOLERANCE))
    summary: str = ""
    decoder: Decoder | None = None  # generation against a cache (mode DECODE); None: not supported
    inputs: tuple[ExtraInput, ...] = ()  # taken beside q, k, v by keyword

    def __post_init__(self) -> None:
        if self.decoder is not None and True not in self.caps.causal:
            raise ValueError(f"{self.name}: a decoder needs causal support (decoding is causal)")

    @property
    def name(self) -> str:
        return f"{self.variant}/{self.impl}"

    def resolve(self, params: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Defaults overlaid with ``params``; raises ValueError naming a bad name or value."""
        merged = dict(self.params)
        for key, value in (params or {}).items():
            if key not in self.params:
                valid = ", ".join(sorted(self.params)) or "none"
                raise ValueError(f"{self.variant} has no parameter {key!r} (valid: {valid})")
            if not is_int_at_least(value, PARAM_MINIMUM.get(key, 1)):
                raise ValueError(f"{self.variant}: parameter {key}={value!r} must be an integer "
                                 f">= {PARAM_MINIMUM.get(key, 1)}")
            merged[key] = value
        return merged

    def resolve_variant_params(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """Like :meth:`resolve` for parameters given to a whole variant: those this impl does not
        take (``chunk`` for a non-chunked impl) are left out instead of refused."""
        return self.resolve({k: v for k, v in params.items() if k in self.params})

    def not_supported_reasons(self, point: Point) -> list[str]:
        """Why this entry cannot run ``point`` here, every reason (empty: it can)."""
        reasons = self.caps.not_supported_reasons(replace(point, params=self.resolve(point.params)))
        if point.mode == DECODE and not reasons:
            if self.decoder is None:
                reasons.append(f"{self.name} has no decode path")
            elif point.layout not in self.decoder.layouts:
                reasons.append(f"decoding layout={point.layout} not supported (supported: "
                               f"{sorted(self.decoder.layouts)})")
        return reasons

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                 layout: Layout | None = None, **params: Any) -> torch.Tensor:
        """The forward, with parameters resolved; the entry's extra inputs are among the keywords."""
        names = {x.name for x in self.inputs}
        extras = {name: value for name, value in params.items() if name in names}
        if layout is not None:
            extras["layout"] = layout
        own = {name: value for name, value in params.items() if name not in names}
        return self.forward(q, k, v, causal=causal, **extras, **self.resolve(own))


_REGISTRY: dict[tuple[str, str], Entry] = {}


def register(entry: Entry) -> Entry:
    if entry.family not in FAMILIES:
        raise ValueError(f"{entry.name}: unknown family {entry.family!r}")
    key = (entry.variant, entry.impl)
    if key in _REGISTRY:
        raise ValueError(f"{entry.name} registered twice")
    _REGISTRY[key] = entry
    return entry


def entries() -> list[Entry]:
    """Every registered entry, in registration order."""
    return list(_REGISTRY.values())


def variant_names() -> list[str]:
    return list(dict.fromkeys(e.variant for e in _REGISTRY.values()))


def get(variant: str, impl: str | None = None) -> Entry:
    """The entry ``variant/impl`` (``get("local/flex")`` or ``get("local", "flex")``).

    The entry is callable as ``entry(q, k, v, causal=..., **params)``.
    """
    if impl is None and "/" in variant:
        variant, impl = variant.split("/", 1)
    if impl is None:
        raise KeyError(f"{variant!r}: name an impl, one of {[e.impl for e in select(variant)]}")
    try:
        return _REGISTRY[variant, impl]
    except KeyError:
        raise KeyError(_unknown_message(variant, impl)) from None


def select(selector: str) -> list[Entry]:
    """Entries named by ``variant`` (all its impls) or ``variant/impl``; KeyError names the bad part."""
    variant, slash, impl = selector.strip().partition("/")
    if slash and not impl:
        raise KeyError(f"{selector!r}: name an impl after '/' or drop it (impls: "
                       f"{', '.join(e.impl for e in _REGISTRY.values() if e.variant == variant) or 'none'})")
    found = [e for e in _REGISTRY.values() if e.variant == variant and (not impl or e.impl == impl)]
    if not found:
        raise KeyError(_unknown_message(variant, impl or None))
    return found


def _unknown_message(variant: str, impl: str | None) -> str:
    impls = [e.impl for e in _REGISTRY.values() if e.variant == variant]
    if not impls:
        return f"unknown variant {variant!r} (valid: {', '.join(variant_names())})"
    return f"unknown impl {impl!r} of {variant} (valid: {', '.join(impls)})"
