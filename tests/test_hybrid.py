"""The hybrid family: ``based`` = Based's second-order Taylor linear attention + causal sliding-window
softmax attention, summed per head. Against its float64 reference and against a definition written out
here (sim = 1 + s + s²/2, softmax over |i − j| ≤ w), outputs and q/k/v gradients: odd lengths, chunk and
window edges, grouped heads, packed and padded documents; its decoder against its own forward; its cache,
FLOPs, capabilities and kernel names as the sums of its parts'."""

from __future__ import annotations

import math
import zlib
from dataclasses import replace

import pytest
import torch

import variants
from variants import layouts, linear
from variants.layouts import DENSE, PACKED, PADDED, Documents, Layout

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile:UserWarning")

D = 16
SMALL = {"features": 8, "chunk": 16, "window": 16}
BASED = variants.get("based/chunked")
# Documents on and next to the chunk and window edges (16), of length 1, and longer than both.
LENGTHS = (1, 15, 16, 17, 1, 33, 40)
HEADS = [pytest.param(4, 4, id="mha"), pytest.param(4, 2, id="gqa"), pytest.param(4, 1, id="mqa")]


def seeded(tag: str, *shapes: tuple[int, ...]) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(zlib.crc32(tag.encode()))
    return [torch.randn(shape, generator=gen, dtype=torch.float64) for shape in shapes]


def qkv(tag: str, rows: int, width: int, heads: int, kv_heads: int) -> list[torch.Tensor]:
    return seeded(tag, (rows, heads, width, D), (rows, kv_heads, width, D), (rows, kv_heads, width, D),
                  (rows, heads, width, D))


def errors(entry: variants.Entry, q, k, v, upstream, layout: Layout | None, dtype: torch.dtype,
           vanished: float | None = None, **params) -> list[float]:
    """Relative errors of the output and of dq, dk, dv on the real tokens, against the float64
    reference (K and V repeated, each document alone); a gradient's relative to its norm, or to the
    mean norm of the three where its norm is below ``vanished`` (default: the tolerance) times that."""
    real = layout.real if layout is not None else (lambda x: x)
    if layout is not None and layout.kind == PADDED:
        upstream = upstream * layout.valid()
    leaves64 = [t.clone().requires_grad_() for t in (q, k, v)]
    expected = layouts.reference_attention(entry.reference, *leaves64, causal=True, layout=layout,
                                           **entry.resolve(params))
    expected_grads = torch.autograd.grad(expected, leaves64, upstream)
    leaves = [t.to(dtype).requires_grad_() for t in (q, k, v)]
    shape = {} if layout is None else {"layout": layout}
    out = entry(*leaves, causal=True, **shape, **params)
    assert out.dtype == dtype and out.shape == q.shape
    got = torch.autograd.grad(out, leaves, upstream.to(dtype))
    tol = entry.tolerance[str(dtype).removeprefix("torch.")]
    return [variants.relative_error(real(out), real(expected)),
            *variants.gradient_errors([real(g) for g in got], [real(g) for g in expected_grads], vanished or tol)]


def within(errs: list[float], tol: float) -> None:
    assert max(errs) <= tol, dict(zip(("out", "dq", "dk", "dv"), errs, strict=True))


# --- the definition, written out ---------------------------------------------------------------------------

def written_out(q, k, v, *, window: int, features: int) -> torch.Tensor:
    """Based by hand, one dense causal sequence, as many KV as query heads: the Taylor similarities
    1 + s + s²/2 of the projected q̃·k̃ (no feature vectors), normalised; plus softmax(q·k/√d) over the
    keys j with i − w ≤ j ≤ i."""
    p = linear.orthogonal_features(D, features, linear.TAYLOR2_SEED, "cpu", q.dtype) / math.sqrt(D)
    s = (q @ p.T) @ (k @ p.T).transpose(-2, -1) / math.sqrt(features)
    i, j = torch.arange(q.shape[-2])[:, None], torch.arange(k.shape[-2])[None, :]
    sim = (1 + s + s * s / 2) * (j <= i)
    taylor = (sim @ v) / (sim.sum(-1, keepdim=True) + linear.EPS)
    scores = (q @ k.transpose(-2, -1) / math.sqrt(D)).masked_fill(~((j <= i) & (i - j <= window)), -math.inf)
    return taylor + torch.softmax(scores, -1) @ v


@pytest.mark.parametrize("n", [1, 37, 65, 130])
def test_reference_is_the_written_out_definition(n):
    q, k, v, _ = qkv(f"written-{n}", 2, n, 2, 2)
    got = BASED.reference(q, k, v, causal=True, **SMALL)
    assert variants.relative_error(got, written_out(q, k, v, window=16, features=8)) < 1e-12


def test_taylor2_similarities_are_at_least_a_half():
    """1 + s + s²/2 = ((s + 1)² + 1)/2 ≥ 1/2 at any scale: no row's normaliser vanishes."""
    for scale in (0.01, 1.0, 30.0):
        x, y = seeded(f"taylor2-{scale}", (200, D), (300, D))
        sim = linear.taylor2(x * scale, features=16) @ linear.taylor2(y * scale, features=16).T
        assert sim.min() >= 0.5 - 1e-9 and linear.TAYLOR2.width(D, features=16) == 1 + 16 + 256


# --- the impl against the reference ------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("heads, kv_heads", HEADS)
@pytest.mark.parametrize("n", [1, 37, 65, 130])
def test_outputs_and_gradients_match_the_reference(n, heads, kv_heads, dtype):
    """Odd lengths across chunk (16) and window (16) edges, grouped heads. One token sees only itself:
    its output is v·sim/(sim + ε), so dq and dk are ε-sized, judged against the gradients beside them."""
    q, k, v, upstream = qkv(f"dense-{n}-{kv_heads}", 2, n, heads, kv_heads)
    vanished = 1e-4 if n == 1 else None
    within(errors(BASED, q, k, v, upstream, None, dtype, vanished, **SMALL), BASED.tolerance[str(dtype)[6:]])


@pytest.mark.parametrize("chunk, window", [(1, 0), (7, 5), (16, 64), (64, 63), (200, 16)])
def test_chunk_and_window_edges(chunk, window):
    """Chunks of one token and longer than the row, windows of none, inside a chunk and beyond it."""
    q, k, v, upstream = qkv(f"edges-{chunk}-{window}", 1, 130, 4, 2)
    within(errors(BASED, q, k, v, upstream, None, torch.float64, features=8, chunk=chunk, window=window), 1e-10)


def test_default_parameters():
    q, k, v, upstream = qkv("defaults", 1, 200, 2, 1)
    within(errors(BASED, q, k, v, upstream, None, torch.float32), BASED.tolerance["float32"])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("heads, kv_heads", HEADS)
@pytest.mark.parametrize("kind", [PACKED, PADDED])
def test_packed_and_padded_documents(kind, heads, kv_heads, dtype):
    """Each document alone (its linear state restarted, its window inside it), a document of one token."""
    layout = Layout(PACKED, (LENGTHS,)) if kind == PACKED else Layout(PADDED, tuple((n,) for n in LENGTHS))
    q, k, v, upstream = qkv(f"{kind}-{kv_heads}", len(layout.lengths), layout.width, heads, kv_heads)
    within(errors(BASED, q, k, v, upstream, layout, dtype, **SMALL), BASED.tolerance[str(dtype)[6:]])


def test_eager_flex_forward_equals_chunked_on_cpu():
    """``based/flex`` times only on CUDA; its window part's block mask, run eagerly here, gives the same."""
    q, k, v, _ = qkv("flex", 1, 130, 4, 2)
    flex = variants.get("based/flex")(q, k, v, causal=True, **SMALL)
    assert variants.relative_error(flex, BASED(q, k, v, causal=True, **SMALL)) < 1e-12


# --- decoding ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("q_len", [1, 3])
@pytest.mark.parametrize("kv_heads", [4, 2, 1])
@pytest.mark.parametrize("kind", [DENSE, PACKED, PADDED])
def test_step_equals_the_last_rows_of_its_own_forward(kind, kv_heads, q_len):
    """Prefixes shorter than the window, on its edge and longer; the step leaves its caches as they were."""
    lengths = (37, 37) if kind == DENSE else (1, 16, 17, 40)
    width = max(lengths)
    q, k, v, _ = qkv(f"decode-{kind}-{kv_heads}-{q_len}", len(lengths), width + q_len, 4, kv_heads)
    layout = None if kind == DENSE else Layout(kind, tuple((n,) for n in lengths))
    params = BASED.resolve(SMALL)
    shape = {} if layout is None else {"layout": layout}
    caches = BASED.decoder.prefill(k[:, :, :width], v[:, :, :width], q_len=q_len, **shape, **params)
    new = [t[:, :, width:].contiguous() for t in (q, k, v)]
    out = BASED.decoder.step(*new, caches, **params)
    for i, n in enumerate(lengths):
        keep = torch.cat([torch.arange(n), torch.arange(width, width + q_len)])
        seq = [t[i:i + 1].index_select(2, keep) for t in (q, k, v)]
        full = BASED(*seq, causal=True, **params)[:, :, -q_len:]
        assert variants.relative_error(out[i:i + 1], full) <= 1e-12, (i, n)
    assert torch.equal(BASED.decoder.step(*new, caches, **params), out)


def test_cache_is_the_state_and_the_window_whatever_n():
    point = variants.Point(batch=2, heads=4, kv_heads=2, seq_len=1000, head_dim=64, dtype="bfloat16", causal=True,
                           mode="decode", params=BASED.resolve())
    f = 1 + 16 + 16 ** 2
    state = 2 * 2 * (f * 64 + f) * 4  # Σφ(k)vᵀ and Σφ(k) per sequence and KV head, in float32
    window = 2 * 2 * 2 * 64 * 64 * 2  # the last 64 keys and values per sequence and KV head
    assert BASED.decoder.cache_bytes(point) == state + window
    for n in (65, 10 ** 6):
        assert BASED.decoder.cache_bytes(replace(point, seq_len=n)) == state + window
    packed = replace(point, layout=PACKED, documents=Documents("uniform", 2))
    assert BASED.decoder.cache_bytes(packed) <= state + window  # a sequence shorter than the window keeps less


# --- the sums of the parts ---------------------------------------------------------------------------------

def parts(entry: variants.Entry) -> tuple[variants.Entry, variants.Entry]:
    window = "flex" if entry.impl == "flex" else "blocked"
    return linear.linear_entry(linear.TAYLOR2, "chunked"), variants.get("local", window)


def at(point: variants.Point, part: variants.Entry) -> variants.Point:
    return replace(point, params={name: point.params[name] for name in part.params})


@pytest.mark.parametrize("layout", [DENSE, PACKED])
def test_flops_cache_and_kernel_are_the_parts_added(layout):
    documents = Documents("uniform", 3) if layout == PACKED else None
    point = variants.Point(batch=2, heads=4, kv_heads=2, seq_len=300, head_dim=32, causal=True, layout=layout,
                           documents=documents, params=BASED.resolve())
    taylor, local = parts(BASED)
    assert BASED.flops(point) == taylor.flops(at(point, taylor)) + local.flops(at(point, local))
    assert BASED.kernel_name(point) == f"{taylor.kernel_name(point)} + {local.kernel_name(at(point, local))}"
    decode = replace(point, mode="decode", layout=layout)
    for figure in ("cache_bytes", "bytes_moved", "flops"):
        assert getattr(BASED.decoder, figure)(decode) == sum(getattr(p.decoder, figure)(at(decode, p))
                                                            for p in (taylor, local))


def test_capabilities_are_the_window_parts_causal_only():
    """The linear part runs every device, dtype, layout and grouping, so the hybrid's refusals are its
    window part's, and non-causal, with its reason."""
    taylor, _ = parts(BASED)
    assert taylor.caps.devices >= {"cpu", "cuda"} and taylor.caps.dtypes == frozenset(variants.DTYPES)
    assert taylor.caps.layouts == frozenset(layouts.LAYOUTS) and taylor.caps.gqa and taylor.caps.probe is None
    for entry in variants.select("based"):
        assert entry.family == "hybrid" and entry.caps.causal == {True}
        (reason,) = entry.not_supported_reasons(variants.Point(device="cuda", params=entry.resolve()))
        assert reason.startswith("non-causal not supported: Based is a causal language model's mixer")
    flex = variants.get("based/flex")
    reason = "; ".join(flex.not_supported_reasons(variants.Point(causal=True, params=flex.resolve())))
    assert reason.startswith("device=cpu not supported: on CPU FlexAttention")
    assert BASED.not_supported_reasons(variants.Point(causal=True, layout=PADDED, kv_heads=1, heads=2,
                                                      documents=Documents(), params=BASED.resolve())) == []
