"""Linear attention and Linformer under grouped-query heads and packed/padded documents, where the
generic tests of tests/test_shapes.py do not reach: chunk edges against document edges, a row without
similarity inside a document, Performer's stabiliser per document, padding that changes nothing, no
K/V or state repeated per query head, FLOPs of the documents only, kernel names."""

from __future__ import annotations

import zlib
from dataclasses import replace

import pytest
import torch

import variants
from bench.device import LiveTensorBytes
from variants import layouts, linear
from variants import lowrank as linformer
from variants.layouts import PACKED, PADDED, Documents, Layout

D = 8
# Documents on and next to the edges of chunk 32, of length 1, and longer than 32: 181 tokens.
LENGTHS = (1, 31, 32, 33, 1, 16, 17, 50)
PACKED_ROW = Layout(PACKED, (LENGTHS,))
PADDED_ROWS = Layout(PADDED, tuple((n,) for n in LENGTHS))
CAUSAL_MAPS = [pytest.param(f, id=f.name) for f in linear.FEATURE_MAPS if not f.causal_reason]
ALL_MAPS = [pytest.param(f, id=f.name) for f in linear.FEATURE_MAPS]


def seeded(tag: str, *shapes: tuple[int, ...]) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(zlib.crc32(tag.encode()))
    return [torch.randn(shape, generator=gen, dtype=torch.float64) for shape in shapes]


def map_params(fmap: linear.FeatureMap) -> dict:
    return {"features": 32} if "features" in fmap.params else {}


def qkv(tag: str, layout: Layout, heads: int = 4, kv_heads: int = 2) -> list[torch.Tensor]:
    rows, width = len(layout.lengths), layout.width
    return seeded(tag, (rows, heads, width, D), (rows, kv_heads, width, D), (rows, kv_heads, width, D),
                  (rows, heads, width, D))


def errors(entry: variants.Entry, q, k, v, upstream, layout: Layout | None, causal: bool, dtype: torch.dtype,
           **params) -> list[float]:
    """Relative errors of the output and of dq, dk, dv on the real tokens, in ``dtype``, against the
    float64 reference of each document alone with K and V repeated."""
    real = layout.real if layout is not None else (lambda x: x)
    if layout is not None and layout.kind == PADDED:
        upstream = upstream * layout.valid()
    leaves64 = [t.clone().requires_grad_() for t in (q, k, v)]
    expected = layouts.reference_attention(entry.reference, *leaves64, causal=causal, layout=layout,
                                           **entry.resolve(params))
    expected_grads = torch.autograd.grad(expected, leaves64, upstream)
    leaves = [t.to(dtype).requires_grad_() for t in (q, k, v)]
    out = entry(*leaves, causal=causal, layout=layout, **params)
    assert out.dtype == dtype and out.shape == q.shape
    got = torch.autograd.grad(out, leaves, upstream.to(dtype))
    tol = entry.tolerance[str(dtype).removeprefix("torch.")]
    return [variants.relative_error(real(out), real(expected)),
            *variants.gradient_errors([real(g) for g in got], [real(g) for g in expected_grads], tol)]


# --- chunk edges against document edges ----------------------------------------------------------------

@pytest.mark.parametrize("chunk", [1, 7, 32, 64, 400], ids=lambda c: f"chunk{c}")  # 64: > every document; 400: > the row
@pytest.mark.parametrize("fmap", CAUSAL_MAPS)
def test_chunked_packed_is_each_document_alone(fmap, chunk):
    """Chunk boundaries inside documents and documents inside chunks: outputs and gradients are each
    document's own, exactly (float64), for grouped heads."""
    entry = variants.get(fmap.name, "chunked")
    q, k, v, upstream = qkv(f"chunk-edges-{fmap.name}", PACKED_ROW)
    errs = errors(entry, q, k, v, upstream, PACKED_ROW, True, torch.float64, chunk=chunk, **map_params(fmap))
    assert max(errs) < 1e-12, dict(zip(("out", "dq", "dk", "dv"), errs, strict=True))
    # Not vacuous: the row as one sequence (no restart at documents) is far from it.
    whole = entry(q, k, v, causal=True, chunk=chunk, **map_params(fmap))
    per_document = layouts.reference_attention(entry.reference, q, k, v, causal=True, layout=PACKED_ROW,
                                               **map_params(fmap))
    assert variants.relative_error(whole, per_document) > 1e-2


# --- a row without similarity inside a document ------------------------------------------------------

@pytest.mark.parametrize("impl", ["quadratic", "recurrent", "chunked"])
def test_relu_row_without_similarity_inside_a_document(impl):
    """The second document starts inside a chunk, after a first one with large key sums; its first
    query has no similarity with its first key (relu features on disjoint halves): that row outputs 0
    and its float32 gradients match the definition's. Running sums of the whole row minus the prefix at
    the document's start would leave the first document's rounding noise against ε = 1e-6 there
    (tried: dk and dv off by 86% and 316%)."""
    layout = Layout(PACKED, ((90, 60),))
    q, k, v, upstream = seeded(f"relu-empty-{impl}", *[(1, 1, 150, 16)] * 4)
    k[..., :90, :] *= 10.0
    sign = torch.where(torch.arange(16) < 8, 1.0, -1.0).double()
    q[..., 90, :] = q[..., 90, :].abs() * sign
    k[..., 90, :] = -k[..., 90, :].abs() * sign
    assert float(torch.relu(q[0, 0, 90]) @ torch.relu(k[0, 0, 90])) == 0.0
    entry = variants.get("linear-relu", impl)
    params = {"chunk": 32} if impl == "chunked" else {}
    errs = errors(entry, q, k, v, upstream, layout, True, torch.float32, **params)
    assert max(errs) <= entry.tolerance["float32"], dict(zip(("out", "dq", "dk", "dv"), errs, strict=True))


# --- Performer's stabiliser per document, padding that changes nothing --------------------------------

def far_apart_documents(tag: str, layout: Layout) -> list[torch.Tensor]:
    """Inputs whose second document's keys all have norm 16: Performer's logits (k·w − ‖k‖²/2)/√d lie
    ~30 below the other documents', so a maximum shared with them would scale that document's key
    features by ~e^-30 and drown its sums in ε."""
    q, k, v, upstream = qkv(tag, layout)
    row, start, length = layout.spans()[1]
    keys = k[row, :, start:start + length]
    k[row, :, start:start + length] = 16.0 * keys / keys.norm(dim=-1, keepdim=True)
    return [q, k, v, upstream]


@pytest.mark.parametrize("impl", ["quadratic", "linear", "recurrent", "chunked"])
@pytest.mark.parametrize("kind", [PACKED, PADDED])
def test_performer_stabiliser_is_per_document(kind, impl, monkeypatch):
    layout = PACKED_ROW if kind == PACKED else PADDED_ROWS
    entry = variants.get("performer", impl)
    causal = impl != "linear"
    q, k, v, upstream = far_apart_documents(f"performer-{kind}-{impl}", layout)
    params = {"features": 32, **({"chunk": 32} if impl == "chunked" else {})}
    errs = errors(entry, q, k, v, upstream, layout, causal, torch.float64, **params)
    assert max(errs) <= 1e-10, dict(zip(("out", "dq", "dk", "dv"), errs, strict=True))
    if kind == PACKED:
        return  # every impl runs each packed document alone: its stabiliser is the document's by construction
    # Not vacuous: with one stabiliser per row and head (a padded row's padding included), it fails.
    features = linear.features
    monkeypatch.setattr(linear, "features", lambda fmap, q, k, params, layout=None: features(fmap, q, k, params))
    assert max(errors(entry, q, k, v, upstream, layout, causal, torch.float64, **params)) > 1e-2


@pytest.mark.parametrize("fmap, impl", [pytest.param(f, e.impl, id=e.name) for f in linear.FEATURE_MAPS
                                         for e in variants.select(f.name) if e.impl != "fla"])
def test_padding_changes_nothing(fmap, impl):
    """Padded rows: whatever the padding holds (zeros, or keys and values 100 times larger), the real
    tokens' outputs and gradients are the same: padding keys contribute nothing, nor enter a key map's
    reductions."""
    entry = variants.get(fmap.name, impl)
    causal = impl in ("recurrent", "chunked")  # quadratic: the key padding mask, non-causal
    q, k, v, upstream = qkv(f"padding-{fmap.name}-{impl}", PADDED_ROWS)
    valid = PADDED_ROWS.valid()
    params = {**map_params(fmap), **({"chunk": 32} if impl == "chunked" else {})}
    results = []
    for padding in (0.0, 100.0):
        leaves = [(t * valid + padding * t * ~valid).requires_grad_() for t in (q, k, v)]
        out = entry(*leaves, causal=causal, layout=PADDED_ROWS, **params)
        grads = torch.autograd.grad(out, leaves, upstream * valid)
        results.append([PADDED_ROWS.real(t) for t in (out, *grads)])
    for zero_padded, large_padded in zip(*results, strict=True):
        assert torch.isfinite(large_padded).all()
        assert variants.relative_error(large_padded, zero_padded) < 1e-12


# --- one state per KV head ------------------------------------------------------------------------------

def peak_bytes(entry: variants.Entry, q, k, v, **params) -> int:
    with torch.no_grad(), LiveTensorBytes(existing=(q, k, v)) as counter:
        entry(q, k, v, causal=True in entry.caps.causal, **params)
    return counter.peak


@pytest.mark.parametrize("kv_heads", [1, 2])
@pytest.mark.parametrize("impl", ["quadratic", "linear", "recurrent", "chunked"])
def test_no_key_value_or_state_is_repeated_per_query_head(impl, kv_heads):
    """Grouped heads take less memory than the same entry on K and V repeated to the query heads, by at
    least what a KV head builds that a repeat would build per query head: φ(K) (n·f), and for
    recurrent its per-position states (n·f·d)."""
    heads, n = 8, 256
    entry = variants.get("linear-elu1", impl)
    params = {"chunk": 32} if impl == "chunked" else {}
    q, k, v = seeded(f"memory-{impl}", (1, heads, n, D), (1, kv_heads, n, D), (1, kv_heads, n, D))
    grouped = peak_bytes(entry, q, k, v, **params)
    repeated = peak_bytes(entry, q, layouts.repeat_kv(k, heads), layouts.repeat_kv(v, heads), **params)
    per_head = n * D * (D if impl == "recurrent" else 1) * q.element_size()
    assert grouped + (heads - kv_heads) * per_head <= repeated, (grouped, repeated)


def test_performer_key_features_are_per_kv_head():
    """Performer's key stabiliser is a KV head's: a query group shares its keys' features."""
    q, k, v = seeded("performer-gqa", (1, 4, 40, D), (1, 2, 40, D), (1, 2, 40, D))
    k[:, 1] *= 4.0  # far from KV head 0's logits: one stabiliser for both would not be exact
    entry = variants.get("performer", "recurrent")
    expected = layouts.reference_attention(entry.reference, q, k, v, causal=True, features=32)
    got = entry(q.float(), k.float(), v.float(), causal=True, features=32)
    assert variants.relative_error(got, expected) <= entry.tolerance["float32"]


def test_linformer_projects_each_kv_head_once(monkeypatch):
    seen = []
    project = linformer._project
    monkeypatch.setattr(linformer, "_project", lambda k, v, p: seen.append(k.shape) or project(k, v, p))
    q, k, v = seeded("linformer-gqa", (2, 6, 40, D), (2, 2, 40, D), (2, 2, 40, D))
    entry = variants.get("linformer/projected")
    got = entry(q, k, v, proj_len=16)
    assert seen == [(2, 2, 40, D)]
    expected = layouts.reference_attention(entry.reference, q, k, v, causal=False, proj_len=16)
    assert variants.relative_error(got, expected) < 1e-12


def test_linformer_refuses_documents_for_cause():
    entry = variants.get("linformer/projected")
    for kind in (PACKED, PADDED):
        point = variants.Point(layout=kind, documents=Documents(), params=entry.resolve())
        (reason,) = entry.not_supported_reasons(point)
        assert reason.startswith(f"layout={kind} not supported: E projects a whole row") and "documents" in reason


# --- FLOPs and kernel names ------------------------------------------------------------------------------

@pytest.mark.parametrize("entry", [pytest.param(e, id=e.name) for e in variants.entries() if e.family == "linear"])
def test_flops_count_only_the_documents(entry):
    """Packed and padded count the same work, each document's, summed: not the padding, nor the unused
    slots of a document's last chunk."""
    causal = True in entry.caps.causal
    packed = variants.Point(batch=2, heads=4, kv_heads=2, seq_len=300, head_dim=16, causal=causal, layout=PACKED,
                            documents=Documents("uniform", 4, seed=1), params=entry.resolve())
    dense = replace(packed, layout=layouts.DENSE, documents=None)
    per_document = sum(entry.flops(replace(dense, batch=1, seq_len=n)) for n in layouts.sequences(packed))
    padded = replace(packed, layout=PADDED)
    assert entry.flops(packed) == entry.flops(padded) == pytest.approx(per_document)
    rows, width = layouts.token_shape(padded)
    assert entry.flops(padded) < entry.flops(replace(dense, batch=rows, seq_len=width))  # the padded rows' work


def test_kernel_names_say_how_each_layout_runs():
    def name(variant: str, layout: str) -> str:
        entry = variants.get(variant)
        return entry.kernel_name(variants.Point(layout=layout, kv_heads=1, heads=4, params=entry.resolve()))

    assert name("linear-elu1/quadratic", PACKED) == "eager quadratic per document"
    assert name("linear-elu1/quadratic", PADDED) == "eager quadratic with padding keys zeroed"
    assert name("linear-elu1/linear", PACKED) == "eager linear per document"
    assert name("linear-elu1/linear", PADDED) == "eager linear with padding keys zeroed"
    assert name("linear-elu1/recurrent", PACKED) == "eager recurrent per document"
    assert name("linear-elu1/recurrent", PADDED) == "eager recurrent"
    assert name("linear-elu1/chunked", PACKED) == "eager chunked per document"
    assert name("linformer/projected", "dense") == "projection matmuls + sdpa (enable_gqa)"
