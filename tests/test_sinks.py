"""Attention sinks (issue 21): StreamingLLM's ``sinks`` pattern (the first s keys ∪ a causal window)
and gpt-oss's ``sink-logit`` (a per-head logit in every row's denominator, over a window).

The pattern's derived forms against the rule (dense mask, block mask, counts, documents, decode
cache) and every entry against its float64 reference: outputs and gradients (d sink included),
odd lengths and tile edges, n < s, window 0, grouped heads, packed and padded documents, and the
decode step against the entry's own causal forward. CPU, small shapes."""

from __future__ import annotations

import dataclasses
import zlib

import pytest
import torch
from support import extra_inputs, why_not
from test_sparse_fused import pair_counts

import variants
from bench.device import LiveTensorBytes
from variants import layouts, masks
from variants.decode import kv_plan
from variants.layouts import PACKED, PADDED, Documents, Layout
from variants.sparse import sink_logit, sink_parts

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile:UserWarning")

D = 16
SIZES = (1, 3, 37, 130, 300)
# (sinks, window): small ones, window 0, sinks beyond n, and a window across a block edge
SINK_PARAMS = [(4, 16), (1, 0), (200, 3), (5, 128), (4, 0)]
ENTRIES = [e for e in variants.entries() if e.variant in ("sinks", "sink-logit")]


def rule(n: int, sinks: int | None, window: int, causal: bool = True) -> torch.Tensor:
    """The definition, pair by pair: j < s or |i − j| <= w (no sinks: the window alone), causal j <= i."""
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    allowed = (i - j).abs() <= window
    if sinks is not None:
        allowed = allowed | (j < sinks)
    return allowed & (j <= i) if causal else allowed


def documents_rule(layout: Layout, sinks: int | None, window: int, causal: bool) -> torch.Tensor:
    """(rows, width, width): the rule within each document (padding a document of its own)."""
    width = layout.width
    out = torch.zeros(len(layout.lengths), width, width, dtype=torch.bool)
    for row, lengths in enumerate(layout.lengths):
        start = 0
        for length in [*lengths, width - sum(lengths)]:
            out[row, start:start + length, start:start + length] = rule(length, sinks, window, causal)
            start += length
    return out


# --- the pattern ----------------------------------------------------------------------------------

@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("sinks, window", SINK_PARAMS)
def test_dense_block_and_counted_forms_are_the_rule(sinks, window, causal):
    pattern = masks.pattern("sinks", causal, sinks=sinks, window=window)
    assert not pattern.relative and pattern.rule.relative and pattern.sinks == sinks
    assert pattern.name == f"sinks_s{sinks}_w{window}" + ("_causal" if causal else "")
    for n in (*SIZES, 129, 256, 257):
        dense = masks.dense_mask(pattern.mask, n, n)
        assert torch.equal(dense, rule(n, sinks, window, causal)), n
        assert torch.equal(masks.expand_block_mask(masks.block_mask.fn(pattern, n, "cpu"), n), dense), n
        assert torch.equal(masks.allowed_per_row.fn(pattern, n), dense.sum(-1)), n
        general = dataclasses.replace(pattern, rule=None)  # the general classifier, as a cross-check
        assert all(torch.equal(a, b) for a, b in zip(masks.block_classes(pattern, n),
                                                     masks.block_classes(general, n), strict=True)), n


LAYOUTS = [Layout(PACKED, ((127, 1, 128, 129, 1, 255, 2),)), Layout(PACKED, ((3, 1, 5),)), Layout(PACKED, ((300,),)),
           Layout(PADDED, ((1,), (127,), (129,), (200,))), Layout(PADDED, ((5,), (5,)))]


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda layout: f"{layout.kind}-{len(layout.spans())}")
def test_sinks_are_each_documents_first_tokens(layout):
    pattern = masks.pattern("sinks", True, sinks=5, window=3)
    expected = documents_rule(layout, 5, 3, True)
    assert torch.equal(masks.cached_document_mask.fn(pattern, layout, "cpu")[:, 0], expected)
    built = masks.document_block_mask.fn(pattern, layout, "cpu")
    for row in range(len(layout.lengths)):
        assert torch.equal(masks.expand_block_mask(built, layout.width, row), expected[row]), row
    general = dataclasses.replace(pattern, rule=None)
    assert all(torch.equal(a, b) for a, b in zip(masks.document_block_classes(pattern, layout),
                                                 masks.document_block_classes(general, layout), strict=True))


def test_block_masks_at_n_65536_stay_within_256_mib():
    """Not of i − j only, yet never the n × n grid: the window's classes per block diagonal, the
    sink keys' columns as they are (and, packed, per document from the offsets)."""
    n = 65536
    pattern = masks.pattern("sinks", True, sinks=4, window=256)
    for build in (lambda: masks.block_mask.fn(pattern, n, "cpu"),
                  lambda: masks.document_block_mask.fn(
                      pattern, Layout(PACKED, (Documents("uniform", 8).lengths(n, 1)[0],)), "cpu")):
        with LiveTensorBytes() as counter:
            built = build()
        assert counter.peak <= 256 << 20, f"{counter.peak / 2**20:.0f} MiB"
        assert built.kv_num_blocks.shape == (1, 1, n // masks.BLOCK)
    with LiveTensorBytes() as counter:
        counts = masks.allowed_per_row.fn(pattern, n)
    assert counter.peak <= 16 << 20 and int(counts[-1]) == 4 + 257


@pytest.mark.parametrize("sinks, window", SINK_PARAMS)
def test_parts_allow_exactly_the_rule_each_pair_once(sinks, window):
    for n in (*range(1, 40), 64, 130, 300):
        counts = pair_counts(sink_parts(n, window=window, sinks=sinks, causal=True), n)
        assert torch.equal(counts, rule(n, sinks, window).long()), n


def test_non_causal_sinks_are_refused_with_the_reason():
    for entry in (e for e in ENTRIES if e.variant == "sinks"):
        reason = why_not(entry, variants.Point(causal=False, params=entry.resolve()))
        assert reason is not None and "StreamingLLM" in reason, (entry.name, reason)


def test_flops_count_the_allowed_pairs():
    for entry in ENTRIES:
        params = entry.resolve({"window": 16})
        point = variants.Point(batch=2, heads=3, seq_len=200, head_dim=D, causal=True, params=params)
        pairs = int(rule(200, params.get("sinks"), 16).sum())
        assert entry.flops(point) == pytest.approx(4.0 * 2 * 3 * D * pairs, rel=1e-12), entry.name


# --- the entries against the float64 reference ---------------------------------------------------

def seeded(tag: str, *shapes: tuple[int, ...]) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(zlib.crc32(tag.encode()))
    return [torch.randn(shape, generator=gen, dtype=torch.float64) for shape in shapes]


def run(entry: variants.Entry, n: int, heads: int, kv_heads: int, causal: bool, dtype: str, params: dict,
        layout: Layout | None = None):
    """Output and gradients (q, k, v and each extra input) of the entry and of the explicit float64
    reference; the real tokens only. Backward only where the entry runs it here."""
    rows, width = (2, n) if layout is None else (len(layout.lengths), layout.width)
    tag = f"{entry.name}-{n}-{heads}-{kv_heads}-{causal}-{params}-{layout}"
    q, k, v, upstream = seeded(tag, (rows, heads, width, D), (rows, kv_heads, width, D), (rows, kv_heads, width, D),
                               (rows, heads, width, D))
    if layout is not None and layout.kind == PADDED:
        upstream = upstream * layout.valid()
    extras = extra_inputs(entry, tag, rows, heads, kv_heads, width, D)
    leaves64 = [t.clone().requires_grad_() for t in (q, k, v, *extras.values())]
    expected = layouts.reference_attention(entry.reference, *leaves64[:3], causal=causal, layout=layout,
                                           extras=dict(zip(extras, leaves64[3:], strict=True)), **entry.resolve(params))
    torch_dtype = variants.DTYPES[dtype]
    point = variants.Point(heads=heads, kv_heads=kv_heads, head_dim=D, causal=causal, dtype=dtype, mode="fwd_bwd",
                           layout="dense" if layout is None else layout.kind, documents=Documents(),
                           params=entry.resolve(params))
    backward = why_not(entry, point) is None
    leaves = [t.to(torch_dtype).requires_grad_(backward) for t in (q, k, v)]
    given = [x.clone().requires_grad_(backward) for x in extras.values()]  # float32 at least, as drawn
    out = entry(*leaves, causal=causal, layout=layout, **dict(zip(extras, given, strict=True)), **params)
    assert out.shape == q.shape and out.dtype == torch_dtype
    real = layout.real if layout is not None else (lambda x: x)
    got_grads = expected_grads = []
    if backward:
        got_grads = torch.autograd.grad(out, leaves + given, upstream.to(torch_dtype))
        expected_grads = torch.autograd.grad(expected, leaves64, upstream)
    return real(out), real(expected), [real(g) if g.dim() == 4 else g for g in got_grads], \
        [real(g) if g.dim() == 4 else g for g in expected_grads]


def check(entry: variants.Entry, dtype: str, *args, **kwargs) -> None:
    out, expected, got, want = run(entry, *args, dtype=dtype, **kwargs)
    tol = entry.tolerance[dtype]
    assert variants.relative_error(out, expected) <= tol, variants.relative_error(out, expected)
    if got:
        errors = variants.gradient_errors(got, want, tol)
        assert max(errors) <= tol, dict(zip(["dq", "dk", "dv", *(x.name for x in entry.inputs)], errors, strict=True))


def runnable(entry: variants.Entry, causal: bool) -> bool:
    return why_not(entry, variants.Point(causal=causal, params=entry.resolve())) is None or entry.impl == "flex"


CASES = [pytest.param(e, causal, id=f"{e.name}-{'causal' if causal else 'bidir'}")
         for e in ENTRIES for causal in (False, True) if True in e.caps.causal and (causal or False in e.caps.causal)]


@pytest.mark.parametrize("entry, causal", CASES)
def test_entry_matches_the_reference_at_odd_lengths_and_edges(entry, causal):
    """Flex runs its eager forward here (no CPU backward); the others forward and backward."""
    params = [{"window": w} | ({"sinks": s} if entry.variant == "sinks" else {}) for w, s in ((0, 1), (16, 4), (129, 200))]
    for n in (37, 300) if entry.impl == "flex" else SIZES:  # eager flex is slow; its edges are the masks'
        for p in params:
            check(entry, "float64", n, 2, 2, causal, params=p)
    check(entry, "float32", 300, 2, 2, causal, params={"window": 16})


@pytest.mark.parametrize("heads, kv_heads", [(4, 2), (4, 1)], ids=["gqa", "mqa"])
@pytest.mark.parametrize("entry, causal", CASES)
def test_grouped_heads_and_documents(entry, causal, heads, kv_heads):
    small = {"window": 8, **({"sinks": 3} if entry.variant == "sinks" else {})}
    check(entry, "float64", 77, heads, kv_heads, causal, params=small)
    for layout in (Layout(PACKED, ((1, 31, 2, 33, 1, 130),)), Layout(PADDED, ((1,), (31,), (130,)))):
        if why_not(entry, variants.Point(heads=heads, kv_heads=kv_heads, causal=causal, layout=layout.kind,
                                         documents=Documents(), params=entry.resolve(small))) is None \
                or entry.impl == "flex":
            check(entry, "float64", 0, heads, kv_heads, causal, params=small, layout=layout)
    if entry.impl != "flex":  # float32 once, packed
        check(entry, "float32", 0, heads, kv_heads, causal, params=small, layout=Layout(PACKED, ((1, 31, 2, 33, 1, 130),)))


def test_sink_gradient_is_minus_the_sinks_share_times_dO_dot_O():
    """dsink_h = −Σ_i p_sink,i (dO_i · O_i), from the merged impl's own backward."""
    entry = variants.get("sink-logit/merged")
    q, k, v, upstream = seeded("dsink", (2, 3, 50, D), (2, 3, 50, D), (2, 3, 50, D), (2, 3, 50, D))
    sink = torch.randn(3, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).requires_grad_()
    out = entry(q, k, v, causal=True, sink=sink, window=8)
    (dsink,) = torch.autograd.grad(out, sink, upstream)
    scores = (q @ k.transpose(-2, -1)) / D ** 0.5
    scores = scores.masked_fill(~rule(50, None, 8), float("-inf"))
    lse = torch.logaddexp(torch.logsumexp(scores, -1), sink.detach()[:, None])
    expected = -(torch.exp(sink.detach()[:, None] - lse) * (upstream * out.detach()).sum(-1)).sum((0, 2))
    assert variants.relative_error(dsink, expected) <= 1e-12


def test_flex_rescales_by_its_log_sum_exp_and_refuses_cpu_backward():
    entry = variants.get("sink-logit/flex")
    reason = why_not(entry, variants.Point(causal=True, mode="fwd_bwd", params=entry.resolve()))
    assert reason is not None and "backward" in reason
    with pytest.raises(NotImplementedError, match="backward on CPU"):
        q = torch.randn(1, 1, 8, D, requires_grad=True)
        entry(q, q, q, causal=True, sink=torch.zeros(1), window=2)
    assert "sigmoid(lse − sink)" in entry.kernel_name(variants.Point(causal=True, params=entry.resolve()))
    assert sink_logit.SINK.shape(2, 4, 1, 9, D) == (4,)


# --- decoding -------------------------------------------------------------------------------------

DECODERS = [e for e in ENTRIES if e.impl == "dense"]  # one decode path per variant


@pytest.mark.parametrize("kv_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("kind", ["dense", PACKED, PADDED])
@pytest.mark.parametrize("q_len", [1, 3])
@pytest.mark.parametrize("entry", DECODERS, ids=lambda e: e.name)
def test_decode_step_is_the_last_rows_of_the_entrys_own_forward(entry, kind, kv_heads, q_len):
    params = entry.resolve({"window": 8, **({"sinks": 3} if entry.variant == "sinks" else {})})
    lengths = (40, 40) if kind == "dense" else (1, 2, 9, 40, 13)
    width = max(lengths)
    tag = f"decode-{entry.name}-{kind}-{kv_heads}-{q_len}"
    q, k, v = seeded(tag, (len(lengths), 4, width + q_len, D), *[(len(lengths), kv_heads, width + q_len, D)] * 2)
    extras = extra_inputs(entry, tag, len(lengths), 4, kv_heads, width + q_len, D)
    layout = None if kind == "dense" else Layout(kind, tuple((n,) for n in lengths))
    cache = entry.decoder.prefill(k[:, :, :width], v[:, :, :width], q_len=q_len,
                                  **({"layout": layout} if layout else {}), **extras, **params)
    new = [t[:, :, width:].contiguous() for t in (q, k, v)]
    out = entry.decoder.step(*new, cache, **extras, **params)
    for i, n in enumerate(lengths):
        keep = torch.cat([torch.arange(n), torch.arange(width, width + q_len)])
        seq = [t[i:i + 1].index_select(2, keep) for t in (q, k, v)]
        own = entry(*seq, causal=True, **extras, **params)[:, :, -q_len:]
        assert variants.relative_error(out[i:i + 1], own) <= 1e-12, (i, n)


def test_decode_cache_holds_the_sinks_and_the_window_whatever_n():
    entry = variants.get("sinks/dense")
    for n in (300, 4096, 65536):
        kept = masks.reachable_keys.fn(masks.pattern("sinks", True, sinks=4, window=256), n)
        assert kept.tolist() == [0, 1, 2, 3, *range(n - 256, n)]
        point = variants.Point(batch=1, heads=4, seq_len=n, head_dim=64, causal=True, mode="decode",
                               params=entry.resolve())
        assert entry.decoder.cache_bytes(point) == 2 * 4 * 64 * 4 * (4 + 256)
        assert kv_plan(masks.pattern("sinks", True, sinks=4, window=256), (n,), 1).mask is None  # one view, no mask
    window = variants.get("sink-logit/dense")
    point = variants.Point(batch=1, heads=4, seq_len=4096, head_dim=64, causal=True, mode="decode",
                           params=window.resolve())
    assert window.decoder.cache_bytes(point) == 2 * 4 * 64 * 4 * 128  # the window; the sink logit costs nothing


def test_a_tiny_model_learns_its_sink_logits():
    """Training: each layer's sink logits are parameters of its own, one per head, with gradients."""
    from bench.train.model import ModelConfig, TinyLM

    model = TinyLM(ModelConfig(vocab=32, seq_len=24, d_model=16, layers=1, heads=2, attn_params={"window": 4}),
                   variants.get("sink-logit/merged"))
    tokens = torch.randint(0, 32, (2, 24), generator=torch.Generator().manual_seed(0))
    model(tokens).float().pow(2).mean().backward()
    (sink,) = [p for name, p in model.named_parameters() if name.endswith("per_head.sink")]
    assert sink.shape == (2,) and sink.grad is not None and bool(sink.grad.abs().gt(0).all())
