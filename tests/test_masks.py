"""Sparse patterns: one mask function, every derived form agrees with it and with the rules in
docs/variants.md ("One mask function").

Forms checked against each other exactly (``torch.equal``):
dense boolean mask, the FlexAttention BlockMask expanded to elements, the xformers bias (local only),
and allowed-per-row counts / FLOPs. The rules themselves are checked against plain Python loops.
"""

from __future__ import annotations

import importlib

import pytest
import torch

import variants
from variants import Point, masks

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
def test_allowed_per_row_counts_the_dense_mask(sparsity, params, causal, n):
    pattern = masks.pattern(sparsity, causal, **params)
    expected = masks.dense_mask(pattern.mask, n, n).sum(-1)
    for rows_per_chunk in (1024, 7):  # one chunk, and many chunks with a ragged last one
        counts = masks.allowed_per_row(pattern, n, rows_per_chunk)
        assert counts.dtype == torch.int64
        assert torch.equal(counts, expected)


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
