"""xformers under grouped-query heads and packed or padded documents, on CPU, where xformers has no
kernel: each layout's bias (materialised) against the layout's own mask; the call's plumbing (the
5-D grouped form with K and V broadcast, never copied over the group; batches folded into one row
for a block-diagonal bias) through a stand-in for memory_efficient_attention that computes with the
materialised bias; the inputs the dispatcher is asked about; and the refusals where xformers has no
class for the masking."""

from __future__ import annotations

import dataclasses
import math
import zlib

import pytest
import torch
from support import why_not

import variants
from variants import layouts, masks, xformers_ops
from variants.layouts import PACKED, PADDED, Documents, Layout
from variants.xformers_ops import Unexpressible, make_xformers_bias, window_bias

xops = pytest.importorskip("xformers.ops")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

EDGES = (1, 31, 32, 33, 1, 16, 17, 50)  # as tests/test_shapes.py: documents on and next to tile edges
LAYOUTS = {
    "packed-edges": Layout(PACKED, (EDGES,)),
    "packed-ones": Layout(PACKED, ((1, 1, 1),)),
    "packed-one": Layout(PACKED, ((40,),)),
    "padded-edges": Layout(PADDED, tuple((n,) for n in EDGES)),
    "padded-full": Layout(PADDED, ((7,), (7,))),
}
WINDOWS = [None, 0, 3, 16]


def _bias_cases():
    for name, layout in LAYOUTS.items():
        for window in WINDOWS:
            for causal in (False, True):
                yield pytest.param(layout, window, causal, id=f"{name}-w{window}-{'causal' if causal else 'bidir'}")


def _allowed(window: int | None, causal: bool, layout: Layout) -> torch.Tensor:
    """``(rows, width, width)`` what the layout lets each query attend, from the repository's own
    masks: a window is the local pattern within each document; no window, all of its document."""
    if window is not None:
        return masks.cached_document_mask.fn(masks.pattern("local", causal, window=window), layout, "cpu")[:, 0]
    ids = layout.document_ids()
    same = ids[:, :, None] == ids[:, None, :]
    return same & torch.ones(layout.width, layout.width, dtype=torch.bool).tril() if causal else same


def _materialised(spec, shape: tuple[int, int]) -> torch.Tensor:
    bias = make_xformers_bias(spec, "cpu")
    return torch.zeros(shape) if bias is None else bias.materialize(shape)


@pytest.mark.parametrize("layout, window, causal", list(_bias_cases()))
def test_each_layouts_bias_allows_what_the_layout_allows(layout, window, causal):
    """Every real query attends exactly the keys its document (and window) allow; xformers' 0 is
    allowed, −inf is not."""
    try:
        spec = window_bias(window, causal, layout)
    except Unexpressible as exc:
        assert window is not None and not causal and "non-causal local" in str(exc)
        return
    allowed, valid = _allowed(window, causal, layout), layout.valid()[:, 0, :, 0]
    rows, width = allowed.shape[:2]
    if layout.kind == PACKED or spec[0].startswith("BlockDiagonal"):  # one row of every token
        got = _materialised(spec, (rows * width, rows * width)) == 0
        assert torch.equal(got, torch.block_diag(*(got[r * width:(r + 1) * width, r * width:(r + 1) * width]
                                                   for r in range(rows))))  # never across rows
        got = torch.stack([got[r * width:(r + 1) * width, r * width:(r + 1) * width] for r in range(rows)])
    else:  # padded and causal: the dense bias over each row
        got = (_materialised(spec, (width, width)) == 0).expand(rows, -1, -1)
    real = valid[:, :, None].expand(-1, -1, width)
    assert torch.equal(got[real], allowed[real])
    assert not (got & real & ~valid[:, None, :]).any()  # no real query sees a padding key


def test_refusals_say_which_class_is_missing():
    packed, padded = LAYOUTS["packed-edges"], LAYOUTS["padded-edges"]
    with pytest.raises(Unexpressible, match="non-causal local bias over packed documents"):
        window_bias(16, False, packed)
    with pytest.raises(Unexpressible, match="non-causal local bias over padded rows"):
        window_bias(16, False, padded)
    entry = variants.get("local/xformers")
    for layout in (PACKED, PADDED):
        point = variants.Point(heads=4, head_dim=64, layout=layout, documents=Documents(), params=entry.resolve())
        assert why_not(entry, point).startswith("xformers has no non-causal local bias over")
        # Causal is expressible: on CPU the build (extension not loaded) or the dispatcher (no CPU
        # operator, where it loads: xformers 0.0.33.post2 with torch 2.9.1) refuses it, not a missing class.
        causal = why_not(entry, dataclasses.replace(point, causal=True))
        assert causal.startswith(xformers_ops._NO_OPERATOR) or not causal.startswith("xformers has no"), causal


# --- the call, through a stand-in computing with the materialised bias -------------------------------

def _stand_in(calls: list):
    """memory_efficient_attention in float64 from the materialised bias, for BMHK and BMGHK inputs;
    records its inputs."""
    def attention(query, key, value, attn_bias=None):
        calls.append((query, key, value, attn_bias))
        assert query.ndim == key.ndim == value.ndim and query.shape[:-1] == key.shape[:-1] == value.shape[:-1]
        q, k, v = (x.movedim(1, -2) for x in (query, key, value))  # (B, [G,] H, M, K)
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
        if attn_bias is not None:
            scores = scores + attn_bias.materialize(tuple(scores.shape[-2:]), dtype=scores.dtype)
        return (scores.softmax(-1) @ v).movedim(-2, 1)

    return attention


ENTRIES = {"standard/xformers": {}, "local/xformers": {"window": 16}}


def _expressible(window: int | None, causal: bool, layout: Layout | None) -> bool:
    try:
        window_bias(window, causal, layout)
        return True
    except Unexpressible:  # refused: test_refusals_say_which_class_is_missing
        return False


def _call_cases():
    for name, params in ENTRIES.items():
        for kind, layout in (("dense", None), ("packed", LAYOUTS["packed-edges"]), ("padded", LAYOUTS["padded-edges"])):
            for kv_heads in (None, 2, 1):
                for causal in (False, True):
                    if _expressible(params.get("window"), causal, layout):
                        yield pytest.param(name, layout, kv_heads, causal,
                                           id=f"{name}-{kind}-kv{kv_heads or 4}-{'causal' if causal else 'bidir'}")


@pytest.mark.parametrize("name, layout, kv_heads, causal", list(_call_cases()))
def test_the_call_equals_the_explicit_reference(monkeypatch, name, layout, kv_heads, causal):
    entry = variants.get(name)
    params = entry.resolve(ENTRIES[name])
    calls: list = []
    monkeypatch.setattr(xops, "memory_efficient_attention", _stand_in(calls))
    rows, width = (2, 77) if layout is None else (len(layout.lengths), layout.width)
    kv = kv_heads or 4
    gen = torch.Generator().manual_seed(zlib.crc32(f"{name}-{layout}-{kv}-{causal}".encode()))
    q, k, v = (torch.randn(rows, heads, width, 8, generator=gen, dtype=torch.float64) for heads in (4, kv, kv))
    out = entry(q, k, v, causal=causal, layout=layout, **ENTRIES[name])
    expected = layouts.reference_attention(entry.reference, q, k, v, causal=causal, layout=layout, **params)
    real = layout.real if layout is not None else (lambda x: x)
    assert out.shape == q.shape and variants.relative_error(real(out), real(expected)) < 1e-12
    (query, key, value, bias), = calls
    assert query.ndim == (5 if kv_heads else 4)
    if kv_heads:  # BMGHK: G the KV heads, H their query group; K and V broadcast over H, not copied
        assert query.shape[2:4] == (kv, 4 // kv) and key.stride(3) == value.stride(3) == 0
    assert key.untyped_storage().nbytes() <= k.untyped_storage().nbytes()  # never K repeated
    if type(bias).__name__.startswith("BlockDiagonal"):
        assert query.shape[:2] == (1, rows * width)  # a block-diagonal bias indexes one row of every token


# --- the dispatcher is asked about inputs of the point's kind ----------------------------------------

@pytest.fixture
def asked(monkeypatch):
    """The Inputs the dispatcher is asked about (forward, backward), answered by stand-in operators."""
    from xformers.ops.fmha import dispatch

    seen: list = []

    def forward(inputs, needs_gradient):
        seen.append(("fw", inputs))
        return type("Fw", (), {"NAME": "fakeF", "VARLEN_LSE_PACKED": False})

    def backward(inputs, varlen_lse_packed):
        seen.append(("bw", inputs, varlen_lse_packed))
        return type("Bw", (), {"NAME": "fakeB"})

    monkeypatch.setattr(dispatch, "_dispatch_fw", forward)
    monkeypatch.setattr(dispatch, "_dispatch_bw", backward)
    xformers_ops.xformers_operator.cache_clear()
    yield seen
    xformers_ops.xformers_operator.cache_clear()


@pytest.mark.parametrize("name, layout, kv_heads, causal, bias_class, tokens", [
    ("standard/xformers", "dense", None, True, "LowerTriangularMask", (1, 16)),
    ("standard/xformers", PACKED, 2, False, "BlockDiagonalMask", (1, 16)),
    ("standard/xformers", PACKED, 1, True, "BlockDiagonalCausalMask", (1, 16)),
    ("standard/xformers", PADDED, 2, False, "BlockDiagonalPaddedKeysMask", (1, 32)),
    ("standard/xformers", PADDED, None, True, "LowerTriangularMask", (2, 16)),
    ("local/xformers", PACKED, 2, True, "BlockDiagonalCausalLocalAttentionMask", (1, 16)),
    ("local/xformers", PADDED, None, True, "LocalAttentionFromBottomRightMask", (2, 16)),
])
def test_the_probe_asks_about_inputs_of_the_points_kind(asked, name, layout, kv_heads, causal, bias_class, tokens):
    entry = variants.get(name)
    point = variants.Point(heads=8, kv_heads=kv_heads, head_dim=64, causal=causal, layout=layout, mode="fwd_bwd",
                           documents=Documents(), params=entry.resolve())
    assert why_not(entry, point) is None
    (_, forward), (_, backward, lse_packed) = asked
    assert forward is backward and lse_packed is False  # the backward reads the forward's lse format
    assert type(forward.attn_bias).__name__ == bias_class
    assert forward.query.shape[:2] == tokens
    if kv_heads:  # one KV head with its group, as the measurement's own check runs
        assert forward.query.shape[2:4] == (1, 8 // kv_heads) and forward.key.stride(3) == 0
    else:
        assert forward.query.ndim == 4
    grouped = ", BMGHK, K/V broadcast over each group" if kv_heads else ""
    assert entry.kernel_name(point) == f"xformers:fakeF+fakeB ({bias_class}{grouped})"
