"""Sparse patterns: one mask function, every derived form agrees with it and with the rules in
docs/variants.md ("One mask function").

Forms checked against each other exactly (``torch.equal``):
dense boolean mask, the FlexAttention BlockMask expanded to elements, the xformers bias (local only),
and allowed-per-row counts / FLOPs. The rules themselves are checked against plain Python loops.
"""

from __future__ import annotations

import dataclasses
import importlib
import itertools
import time

import pytest
import torch
from torch.nn.attention.flex_attention import create_block_mask

import variants
from bench.device import LiveTensorBytes
from variants import Point, masks
from variants.layouts import PACKED, PADDED, Documents, Layout

# (sparsity, params) for the pattern tests; small windows/rates so the structure matters at these n,
# plus edge cases (window 0, window ≥ n, rate 1, rate > n).
PATTERN_CASES = [
    ("local", {"window": 0}),
    ("local", {"window": 3}),
    ("local", {"window": 16}),
    ("local", {"window": 150}),
    ("atrous", {"rate": 1}),
    ("atrous", {"rate": 4}),
    ("atrous", {"rate": 7}),
    ("strided", {"window": 8, "rate": 16}),
    ("strided", {"window": 2, "rate": 5}),
]
SIZES = [1, 7, 128, 200, 300]


def _case_id(sparsity: str, params: dict) -> str:
    return sparsity + "-" + "-".join(f"{k}{v}" for k, v in params.items())


PATTERN_PARAMS = [pytest.param(sparsity, params, id=_case_id(sparsity, params)) for sparsity, params in PATTERN_CASES]
CAUSAL = [pytest.param(False, id="bidir"), pytest.param(True, id="causal")]


def _xformers_attn_bias():
    try:
        return importlib.import_module("xformers.ops.fmha.attn_bias")
    except Exception:  # not installed, or installed but broken: the xformers check is skipped
        return None


# --- the rule, computed independently ---------------------------------------------------------------

def _expected_mask(sparsity: str, params: dict, causal: bool, n: int) -> torch.Tensor:
    """The rules of docs/variants.md, token by token: local |i−j| ≤ w, atrous (i−j) mod k = 0, strided = union;
    causal adds j ≤ i."""
    rows = []
    for i in range(n):
        row = []
        for j in range(n):
            near = "window" in params and abs(i - j) <= params["window"]
            dilated = "rate" in params and (i - j) % params["rate"] == 0
            allowed = {"local": near, "atrous": dilated, "strided": near or dilated}[sparsity]
            row.append(allowed and (j <= i or not causal))
        rows.append(row)
    return torch.tensor(rows, dtype=torch.bool).reshape(n, n)


@pytest.mark.parametrize("n", [1, 20, 33])
@pytest.mark.parametrize("causal", CAUSAL)
@pytest.mark.parametrize("sparsity, params", PATTERN_PARAMS)
def test_dense_mask_follows_the_design_rule(sparsity, params, causal, n):
    pattern = masks.pattern(sparsity, causal, **params)
    got = masks.dense_mask(pattern.mask, n, n)
    assert got.dtype == torch.bool and got.shape == (n, n)
    assert torch.equal(got, _expected_mask(sparsity, params, causal, n))


def test_expected_masks_are_not_trivial():
    """Guard for the rule test above: the chosen parameters give masks that are neither full nor
    diagonal, and causal really removes entries."""
    n = 33
    cases = [("local", {"window": 3}), ("atrous", {"rate": 4}), ("strided", {"window": 2, "rate": 5})]
    for sparsity, params in cases:
        bidir = masks.dense_mask(masks.pattern(sparsity, False, **params).mask, n, n)
        causal = masks.dense_mask(masks.pattern(sparsity, True, **params).mask, n, n)
        assert n < int(bidir.sum()) < n * n
        assert torch.equal(causal, bidir & torch.ones(n, n, dtype=torch.bool).tril())
        assert int(causal.sum()) < int(bidir.sum())


# --- the derived forms agree exactly -------------------------------------------------------------------

@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("causal", CAUSAL)
@pytest.mark.parametrize("sparsity, params", PATTERN_PARAMS)
def test_block_mask_applies_exactly_the_dense_mask(sparsity, params, causal, n):
    pattern = masks.pattern(sparsity, causal, **params)
    dense = masks.dense_mask(pattern.mask, n, n)
    expanded = masks.expand_block_mask(masks.block_mask(pattern, n, "cpu"), n)
    assert expanded.shape == (n, n)
    assert torch.equal(expanded, dense)


@pytest.mark.parametrize("n", [1, 128, 300, 1025])
@pytest.mark.parametrize("causal", CAUSAL)
@pytest.mark.parametrize("sparsity, params", PATTERN_PARAMS)
def test_block_mask_equals_flex_attentions_own(sparsity, params, causal, n):
    """The blocks are classified as torch's create_block_mask classifies them (full, partial, none,
    in its order), by one evaluation per diagonal and by rows of blocks alike."""
    pattern = masks.pattern(sparsity, causal, **params)
    theirs = create_block_mask(lambda b, h, q, kv: pattern.mask(q, kv), None, None, n, n, device="cpu")
    for form in (pattern, dataclasses.replace(pattern, relative=False)):
        ours = masks.block_mask.fn(form, n, "cpu")
        assert ours.seq_lengths == (n, n) and ours.BLOCK_SIZE == theirs.BLOCK_SIZE
        for count, indices in (("kv_num_blocks", "kv_indices"), ("full_kv_num_blocks", "full_kv_indices"),
                               ("q_num_blocks", "q_indices"), ("full_q_num_blocks", "full_q_indices")):
            assert torch.equal(getattr(ours, count), getattr(theirs, count)), count
            for row, used in enumerate(getattr(theirs, count)[0, 0].tolist()):
                assert torch.equal(getattr(ours, indices)[0, 0, row, :used],
                                   getattr(theirs, indices)[0, 0, row, :used]), (indices, row)


@pytest.mark.parametrize("sparsity, params", [("local", {"window": 256}), ("atrous", {"rate": 8}),
                                              ("strided", {"window": 128, "rate": 128}),
                                              ("sinks", {"sinks": 4, "window": 256})])
def test_block_mask_at_n_65536_stays_within_256_mib(sparsity, params):
    """create_block_mask's default path evaluates the n × n grid in int64: 34 GB at n 65,536."""
    n = 65536
    for causal in (False, True):
        pattern = masks.pattern(sparsity, causal, **params)
        started = time.perf_counter()
        with LiveTensorBytes() as counter:
            built = masks.block_mask.fn(pattern, n, "cpu")
        elapsed = time.perf_counter() - started
        assert counter.peak <= 256 << 20, f"{pattern.name}: {counter.peak / 2**20:.0f} MiB"
        assert built.kv_num_blocks.shape == (1, 1, n // masks.BLOCK)
        print(f"{pattern.name}: peak {counter.peak / 2**20:.1f} MiB, {elapsed:.2f} s")


@pytest.mark.parametrize("sparsity, params", PATTERN_PARAMS)
def test_patterns_declared_relative_depend_on_i_minus_j_only(sparsity, params):
    """The fast paths rely on it: shifting a query and a key alike never changes the mask."""
    gen = torch.Generator().manual_seed(0)
    i, j = (torch.randint(0, 5000, (4000,), generator=gen, dtype=torch.int32) for _ in range(2))
    shift = torch.randint(0, 5000, (4000,), generator=gen, dtype=torch.int32)
    for causal in (False, True):
        pattern = masks.pattern(sparsity, causal, **params)
        assert pattern.relative
        assert torch.equal(pattern.mask(i, j), pattern.mask(i + shift, j + shift))
    assert masks.FULL_CAUSAL.relative


def test_dense_mask_fills_row_chunks_exactly(monkeypatch):
    pattern = masks.pattern("strided", True, window=3, rate=5)
    whole = masks.dense_mask(pattern.mask, 37, 41)
    monkeypatch.setattr(masks, "CHUNK_PAIRS", 41 * 3)  # 3 rows a chunk, the last one ragged
    assert torch.equal(masks.dense_mask(pattern.mask, 37, 41), whole)


def test_mask_caches_are_bounded_by_bytes_and_released(monkeypatch):
    """Each cache keeps its newest entry however large, older ones only within its byte budget, and
    release_caches empties them all (a worker calls it when it moves to another group)."""
    from variants import caches

    cache = masks.cached_dense_mask
    cache.clear()
    monkeypatch.setattr(cache, "max_bytes", 300 * 300 + 200 * 200)
    pattern = masks.pattern("local", False, window=3)
    first = cache(pattern, 300, "cpu")
    assert cache(pattern, 300, "cpu") is first  # a hit
    cache(pattern, 200, "cpu")
    assert cache.bytes == 300 * 300 + 200 * 200
    cache(pattern, 100, "cpu")  # over budget: the oldest goes
    assert cache.bytes == 200 * 200 + 100 * 100 and cache(pattern, 200, "cpu") is not None
    cache(pattern, 1000, "cpu")  # larger than the budget alone: kept, as the only entry
    assert cache.bytes == 1000 * 1000
    masks.block_mask(pattern, 256, "cpu")
    assert masks.block_mask.bytes > 0
    caches.release_caches()
    assert cache.bytes == 0 and masks.block_mask.bytes == 0


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("causal", CAUSAL)
@pytest.mark.parametrize("window", [0, 3, 16, 150])
def test_xformers_local_bias_equals_dense_mask(window, causal, n):
    if _xformers_attn_bias() is None:
        pytest.skip("xformers does not import here")
    pattern = masks.pattern("local", causal, window=window)
    assert pattern.xformers is not None, "local must declare its xformers bias"
    bias = masks.xformers_bias(pattern)
    materialized = bias.materialize((n, n), dtype=torch.float32)
    # xformers: 0 where attention is allowed, -inf where it is not.
    assert torch.equal(materialized == 0, masks.dense_mask(pattern.mask, n, n))
    assert bool(torch.isneginf(materialized[materialized != 0]).all())


@pytest.mark.parametrize("sparsity, params", [p for p in PATTERN_PARAMS if p.values[0] != "local"])
def test_patterns_without_an_xformers_class_declare_none(sparsity, params):
    for causal in (False, True):
        pattern = masks.pattern(sparsity, causal, **params)
        assert pattern.xformers is None
        assert masks.xformers_bias(pattern) is None


# --- names ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("factory, arg, name", [
    (masks.local, 16, "local_w16"),
    (masks.local, 0, "local_w0"),
    (masks.atrous, 4, "atrous_r4"),
    (masks.atrous, 128, "atrous_r128"),
], ids=["local_w16", "local_w0", "atrous_r4", "atrous_r128"])
def test_mask_function_names_carry_their_parameters(factory, arg, name):
    assert factory(arg).__name__ == name


@pytest.mark.parametrize("sparsity, params, causal, name", [
    ("local", {"window": 16}, False, "local_w16"),
    ("local", {"window": 16}, True, "local_w16_causal"),
    ("atrous", {"rate": 4}, True, "atrous_r4_causal"),
    ("strided", {"window": 8, "rate": 16}, False, "local_w8_or_atrous_r16"),
    ("strided", {"window": 8, "rate": 16}, True, "local_w8_or_atrous_r16_causal"),
], ids=["local", "local-causal", "atrous-causal", "strided", "strided-causal"])
def test_pattern_names_carry_their_parameters(sparsity, params, causal, name):
    pattern = masks.pattern(sparsity, causal, **params)
    assert pattern.name == name
    assert pattern.mask.__name__ == name


def test_pattern_is_cached_and_rejects_unknown_kinds():
    assert masks.pattern("local", True, window=5) is masks.pattern("local", True, window=5)
    assert masks.pattern("local", True, window=5) is not masks.pattern("local", False, window=5)
    with pytest.raises(ValueError, match="'nope'"):
        masks.pattern("nope", False, window=3)


def test_or_and_masks_combine_elementwise():
    n = 40
    a, b = masks.local(3), masks.atrous(5)
    dense_a, dense_b = masks.dense_mask(a, n, n), masks.dense_mask(b, n, n)
    assert torch.equal(masks.dense_mask(masks.or_masks(a, b), n, n), dense_a | dense_b)
    assert torch.equal(masks.dense_mask(masks.and_masks(a, b), n, n), dense_a & dense_b)
    assert masks.and_masks(a, masks.causal()).__name__ == "local_w3_and_causal"


# --- counts and FLOPs ---------------------------------------------------------------------------------

@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("causal", CAUSAL)
@pytest.mark.parametrize("sparsity, params", PATTERN_PARAMS)
def test_allowed_per_row_counts_the_dense_mask(monkeypatch, sparsity, params, causal, n):
    pattern = masks.pattern(sparsity, causal, **params)
    expected = masks.dense_mask(pattern.mask, n, n).sum(-1)
    general = dataclasses.replace(pattern, relative=False)  # the same mask, counted row by row
    for chunk_pairs in (1 << 24, 7 * n):  # one chunk, and many chunks with a ragged last one
        monkeypatch.setattr(masks, "CHUNK_PAIRS", chunk_pairs)
        for form in (pattern, general):
            counts = masks.allowed_per_row.fn(form, n)  # uncached: each form and chunking computed
            assert counts.dtype == torch.int64
            assert torch.equal(counts, expected), form.relative


SPARSE_ENTRIES = [pytest.param(e, id=e.name) for e in variants.entries()
                  if e.family == "sparse" and e.variant in masks.PATTERNS]


@pytest.mark.parametrize("causal", CAUSAL)
@pytest.mark.parametrize("entry", SPARSE_ENTRIES)
def test_sparse_flops_are_4bhd_times_allowed_pairs(entry, causal):
    small = {"window": 16, "rate": 4} if entry.variant != "strided" else {"window": 8, "rate": 16}
    params = entry.resolve({k: v for k, v in small.items() if k in entry.params})
    b, h, n, d = 2, 3, 200, 16
    point = Point(batch=b, heads=h, seq_len=n, head_dim=d, causal=causal, params=params)
    nnz = int(masks.dense_mask(masks.pattern(entry.variant, causal, **params).mask, n, n).sum())
    assert 0 < nnz < n * n
    assert entry.flops(point) == pytest.approx(4.0 * b * h * d * nnz, rel=1e-12)
    # and strictly less than the dense count, as the pattern is sparse at this n
    assert entry.flops(point) < 4.0 * b * h * n * n * d / (2 if causal else 1)


# --- documents: the pattern ∧ same document -------------------------------------------------------------

def _packed(*lengths: int) -> Layout:
    return Layout(PACKED, (lengths,))


def _padded(*lengths: int) -> Layout:
    return Layout(PADDED, tuple((n,) for n in lengths))


# Documents on, before and after the 128-token block edges, of length 1, and small ones.
BLOCK_EDGE_LAYOUTS = [_packed(1), _packed(127, 1, 128, 129, 1, 255, 2), _packed(3, 1, 5), _packed(300),
                      _padded(1, 127, 128, 129, 200), _padded(5, 5), _padded(3)]
LAYOUT_IDS = ["1", "block-edges", "3-1-5", "one-300", "padded-edges", "padded-5-5", "padded-3"]


def _expected_document_mask(sparsity: str, params: dict, causal: bool, layout: Layout) -> torch.Tensor:
    """``(rows, width, width)``: per row, the design rule applied within each document alone; padding
    positions, a document of their own, see padding only. Plain loops (``_expected_mask``)."""
    width = layout.width
    out = torch.zeros(len(layout.lengths), width, width, dtype=torch.bool)
    rule = _expected_mask(sparsity, params, causal, width)  # of i − j only, so any block of it is the rule
    for row, lengths in enumerate(layout.lengths):
        start = 0
        for length in [*lengths, width - sum(lengths)]:
            out[row, start:start + length, start:start + length] = rule[:length, :length]
            start += length
    return out


# The rule's loops are quadratic in Python: the layouts up to 300 tokens a row.
SHORT_LAYOUTS = [pytest.param(layout, id=name) for layout, name in zip(BLOCK_EDGE_LAYOUTS, LAYOUT_IDS, strict=True)
                 if layout.width <= 300]


@pytest.mark.parametrize("layout", SHORT_LAYOUTS)
@pytest.mark.parametrize("causal", CAUSAL)
@pytest.mark.parametrize("sparsity, params", PATTERN_PARAMS)
def test_document_mask_is_the_rule_within_each_document(sparsity, params, causal, layout):
    pattern = masks.pattern(sparsity, causal, **params)
    got = masks.cached_document_mask.fn(pattern, layout, "cpu")
    assert got.shape == (len(layout.lengths), 1, layout.width, layout.width)
    assert torch.equal(got[:, 0], _expected_document_mask(sparsity, params, causal, layout))
    # a real query never sees a padding key, and no row is empty (padding queries see padding)
    valid = layout.valid()[:, 0, :, 0]
    assert not (got[:, 0] & (valid[:, :, None] & ~valid[:, None, :])).any()
    assert got[:, 0].any(-1).all()


@pytest.mark.parametrize("layout", BLOCK_EDGE_LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("causal", CAUSAL)
@pytest.mark.parametrize("sparsity, params", PATTERN_PARAMS)
def test_document_block_mask_applies_exactly_the_document_mask(sparsity, params, causal, layout):
    pattern = masks.pattern(sparsity, causal, **params)
    dense = masks.cached_document_mask.fn(pattern, layout, "cpu")
    bm = masks.document_block_mask.fn(pattern, layout, "cpu")
    assert bm.seq_lengths == (layout.width, layout.width) and bm.kv_num_blocks.shape[0] == len(layout.lengths)
    for row in range(len(layout.lengths)):
        assert torch.equal(masks.expand_block_mask(bm, layout.width, row), dense[row, 0]), row


@pytest.mark.parametrize("layout", [BLOCK_EDGE_LAYOUTS[1], BLOCK_EDGE_LAYOUTS[4]], ids=["packed", "padded"])
@pytest.mark.parametrize("causal", CAUSAL)
def test_document_block_mask_equals_flex_attentions_own(causal, layout):
    """Counts and indices of full and partial blocks, row by row, as create_block_mask gives them
    for the same mask_mod (attention-gym's document masking)."""
    pattern = masks.pattern("strided", causal, window=8, rate=16)
    ours = masks.document_block_mask.fn(pattern, layout, "cpu")
    theirs = create_block_mask(ours.mask_mod, len(layout.lengths), None, layout.width, layout.width, device="cpu")
    for count, indices in (("kv_num_blocks", "kv_indices"), ("full_kv_num_blocks", "full_kv_indices")):
        assert torch.equal(getattr(ours, count), getattr(theirs, count)), count
        for row, used in itertools.product(range(len(layout.lengths)), range(getattr(ours, count).shape[-1])):
            n = getattr(theirs, count)[row, 0, used]
            assert torch.equal(getattr(ours, indices)[row, 0, used, :n], getattr(theirs, indices)[row, 0, used, :n])


@pytest.mark.parametrize("causal", CAUSAL)
@pytest.mark.parametrize("sparsity, params", PATTERN_PARAMS)
def test_document_blocks_from_offsets_equal_the_general_classifier(sparsity, params, causal):
    """The blocks of a pattern of i − j only, read from the offsets within each document, are those
    the general classifier finds by evaluating every pair: documents on, before and after block
    edges, of length 1, and seeded random ones, packed and padded."""
    gen = torch.Generator().manual_seed(len(PATTERN_PARAMS))
    drawn = [tuple(torch.randint(1, high, (count,), generator=gen).tolist()) for count, high in ((6, 200), (12, 40))]
    cases = [*BLOCK_EDGE_LAYOUTS, *(_packed(*lengths) for lengths in drawn), _padded(*drawn[0])]
    pattern = masks.pattern(sparsity, causal, **params)
    general = dataclasses.replace(pattern, relative=False)
    for layout in cases:
        full, partial = masks.document_block_classes(pattern, layout)
        assert full.shape == (len(layout.lengths), -(-layout.width // masks.BLOCK), -(-layout.width // masks.BLOCK))
        expected = masks.document_block_classes(general, layout)
        assert torch.equal(full, expected[0]) and torch.equal(partial, expected[1]), layout


SINK_PARAMS = [pytest.param({"sinks": s, "window": w}, id=f"s{s}-w{w}") for s, w in ((4, 16), (1, 0), (130, 3))]


@pytest.mark.parametrize("causal", CAUSAL)
@pytest.mark.parametrize("params", SINK_PARAMS)
def test_sink_patterns_blocks_from_their_rule_and_sink_columns_equal_the_general_classifier(params, causal):
    """A pattern with sinks (not of i − j only) reads its blocks from its relative rule plus the
    columns of the sink keys: the same blocks as evaluating every pair, dense and per document."""
    pattern = masks.pattern("sinks", causal, **params)
    general = dataclasses.replace(pattern, rule=None)
    for n in SIZES:
        assert all(torch.equal(a, b) for a, b in zip(masks.block_classes(pattern, n),
                                                     masks.block_classes(general, n), strict=True)), n
    for layout in BLOCK_EDGE_LAYOUTS:
        assert all(torch.equal(a, b) for a, b in zip(masks.document_block_classes(pattern, layout),
                                                     masks.document_block_classes(general, layout), strict=True))


@pytest.mark.parametrize("layout", SHORT_LAYOUTS)
def test_a_pattern_not_of_i_minus_j_is_evaluated_within_each_document(layout):
    """Positions are document-relative (a document's sinks are its own first tokens): each
    document's block of the mask is the pattern's mask at the document's length, and the block
    mask applies exactly that."""
    pattern = masks.pattern("sinks", True, sinks=3, window=2)
    got = masks.cached_document_mask.fn(pattern, layout, "cpu")[:, 0]
    built = masks.document_block_mask.fn(pattern, layout, "cpu")
    for row, lengths in enumerate(layout.lengths):
        start = 0
        for length in [*lengths, layout.width - sum(lengths)]:
            own = got[row, start:start + length]
            assert torch.equal(own[:, start:start + length], masks.dense_mask(pattern.mask, length, length))
            assert not own[:, :start].any() and not own[:, start + length:].any()
            start += length
        assert torch.equal(masks.expand_block_mask(built, layout.width, row), got[row])


def test_document_mask_names_carry_the_documents():
    pattern = masks.pattern("local", True, window=3)
    assert [m.__name__ for m in masks.document_masks(pattern, _packed(3, 1, 5))] == \
        ["local_w3_causal_and_documents_3_1_5"]
    assert [m.__name__ for m in masks.document_masks(pattern, _padded(2, 5))] == \
        ["local_w3_causal_and_documents_2_padding_3", "local_w3_causal_and_documents_5"]


def test_document_masks_are_cached_by_layout_and_released():
    from variants import caches

    cache = masks.cached_document_mask
    cache.clear()
    pattern = masks.pattern("local", False, window=3)
    first = cache(pattern, _packed(3, 1, 5), "cpu")
    assert cache(pattern, _packed(3, 1, 5), "cpu") is first  # an equal layout: a hit
    other = cache(pattern, _packed(5, 1, 3), "cpu")
    assert other is not first and not torch.equal(other, first)
    assert cache.bytes == 2 * 9 * 9
    masks.document_block_mask(pattern, _packed(3, 1, 5), "cpu")
    assert masks.document_block_mask.bytes > 0
    caches.release_caches()
    assert cache.bytes == 0 and masks.document_block_mask.bytes == 0


@pytest.mark.parametrize("relative", [True, False], ids=["offsets", "general"])
def test_document_block_mask_stays_within_its_memory_bound(relative):
    """A packed row of 8192 tokens in 8 documents: never the n × n grid (64 Mi pairs). From the
    offsets (a pattern of i − j only) it takes a few MiB; the general classifier, rows of blocks
    chunk by chunk, at most CHUNK_PAIRS pairs at a time."""
    lengths = Documents("uniform", 8, seed=0).lengths(8192, 1)[0]
    pattern = dataclasses.replace(masks.pattern("local", True, window=256), relative=relative)
    with LiveTensorBytes() as counter:
        built = masks.document_block_mask.fn(pattern, _packed(*lengths), "cpu")
    assert counter.peak <= (16 << 20 if relative else 256 << 20), f"{counter.peak / 2**20:.0f} MiB"
    assert built.kv_num_blocks.shape == (1, 1, 8192 // masks.BLOCK)


@pytest.mark.parametrize("causal", CAUSAL)
def test_packed_flops_count_pairs_inside_documents_only(causal):
    """FLOPs of a packed point: 4·h·d per allowed pair of the document mask, never across documents."""
    entry = variants.get("strided/dense")
    params = entry.resolve({"window": 8, "rate": 16})
    documents = Documents("uniform", 5, seed=1)
    point = Point(batch=2, heads=3, seq_len=150, head_dim=16, causal=causal, layout=PACKED, documents=documents,
                  params=params)
    layout = variants.layouts.layout_of(point)
    pairs = int(masks.cached_document_mask.fn(masks.pattern("strided", causal, **params), layout, "cpu").sum())
    assert entry.flops(point) == pytest.approx(4.0 * 3 * 16 * pairs, rel=1e-12)
    assert entry.flops(dataclasses.replace(point, layout=PADDED)) == entry.flops(point)
