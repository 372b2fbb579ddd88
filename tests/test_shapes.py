"""The shapes real models run (variants/layouts.py): document lengths, layouts, the explicit
references, and every entry under grouped-query heads and packed or padded documents against them
(outputs and q/k/v gradients), generated from what each entry declares."""

from __future__ import annotations

import zlib

import pytest
import torch
import torch.nn.functional as F
from support import builtin_entries, small_params, why_not

import variants
from variants import layouts
from variants.layouts import PACKED, PADDED, Documents, Layout
from variants.reference import softmax_attention

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile:UserWarning")

D = 16
# Documents on and next to the chunk and tile edges of the small parameters (32, 16), of length 1,
# and odd ones: 1 + 31 + 32 + 33 + 1 + 16 + 17 + 50 = 181 tokens.
EDGES = (1, 31, 32, 33, 1, 16, 17, 50)
HEADS = [pytest.param(4, None, id="mha"), pytest.param(4, 2, id="gqa"), pytest.param(4, 1, id="mqa")]


# --- document lengths ----------------------------------------------------------------------------

@pytest.mark.parametrize("distribution", list(layouts.DISTRIBUTIONS))
@pytest.mark.parametrize("n, count", [(16384, 8), (100, 7), (9, 9), (1000, 1)])
def test_documents_fill_each_row_exactly(distribution, n, count):
    documents = Documents(distribution, count, seed=3)
    rows = documents.lengths(n, rows=3)
    assert len(rows) == 3 and all(len(row) == count and sum(row) == n and min(row) >= 1 for row in rows)
    assert rows == Documents(distribution, count, seed=3).lengths(n, rows=3)  # seeded
    if count > 1 and n > 2 * count and distribution != "equal":
        assert rows != Documents(distribution, count, seed=4).lengths(n, rows=3)
        assert rows[0] != rows[1]


def test_each_distribution_draws_as_its_source_does():
    equal = Documents("equal", 7).lengths(100, 1)[0]
    assert max(equal) - min(equal) <= 1
    many = [length for row in Documents("uniform", 8, seed=0).lengths(16384, 200) for length in row]
    assert 1 <= min(many) and max(many) <= 4096 and sum(many) == 200 * 16384
    spread = torch.tensor(many, dtype=torch.float64)
    assert 0.25 < spread.std().item() / 4096 < 0.33  # uniform on [1, 4096]: std 4096/√12 ≈ 0.29 of it
    assert min(many) < 100 and max(many) > 4000  # the whole range is drawn
    multinomial = torch.tensor(Documents("multinomial", 8).lengths(16384, 1)[0], dtype=torch.float64)
    assert multinomial.std().item() < 100  # binomial(16376, 1/8): std ≈ 42


# --- layouts and the explicit references ---------------------------------------------------------

def seeded(tag: str, *shapes: tuple[int, ...]) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(zlib.crc32(tag.encode()))
    return [torch.randn(shape, generator=gen, dtype=torch.float64) for shape in shapes]


def test_packed_and_padded_layouts_hold_the_same_documents():
    lengths = (3, 1, 5)
    packed, padded = Layout(PACKED, (lengths,)), Layout(PADDED, tuple((n,) for n in lengths))
    assert packed.width == 9 and padded.width == 5
    assert packed.spans() == [(0, 0, 3), (0, 3, 1), (0, 4, 5)]
    assert padded.spans() == [(0, 0, 3), (1, 0, 1), (2, 0, 5)]
    assert packed.document_ids().tolist() == [[0, 0, 0, 1, 2, 2, 2, 2, 2]]
    assert padded.document_ids().tolist() == [[0, 0, 0, -1, -1], [0, -1, -1, -1, -1], [0] * 5]
    assert padded.valid()[:, 0, :, 0].tolist() == [[True] * 3 + [False] * 2, [True] + [False] * 4, [True] * 5]
    x = torch.arange(9.0).view(1, 1, 9, 1)
    rows = torch.zeros(3, 1, 5, 1)
    for row, (start, n) in enumerate(((0, 3), (3, 1), (4, 5))):
        rows[row, 0, :n] = x[0, 0, start:start + n]
    assert torch.equal(padded.real(rows), x) and packed.real(x) is x


def test_packed_reference_is_block_diagonal_attention():
    lengths = (1, 4, 7)
    q, k, v = seeded("packed-ref", (1, 2, 12, D), (1, 2, 12, D), (1, 2, 12, D))
    layout = Layout(PACKED, (lengths,))
    ids = layout.document_ids()[0]
    for causal in (False, True):
        mask = ids[:, None] == ids[None, :]
        if causal:
            mask &= torch.ones(12, 12, dtype=torch.bool).tril()
        got = layouts.reference_attention(softmax_attention_causal, q, k, v, causal=causal, layout=layout)
        assert torch.allclose(got, softmax_attention(q, k, v, mask), rtol=1e-12, atol=0)


def softmax_attention_causal(q, k, v, *, causal: bool) -> torch.Tensor:
    return variants.exact_attention(q, k, v, causal)


def test_grouped_reference_repeats_each_kv_head_over_its_group():
    q, k, v = seeded("gqa-ref", (2, 6, 10, D), (2, 2, 10, D), (2, 2, 10, D))
    got = layouts.reference_attention(softmax_attention_causal, q, k, v, causal=True)
    assert torch.allclose(got, F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
                          rtol=1e-12, atol=0)
    # query head 5 belongs to KV head 1 (group 3): as its own single-head attention
    alone = variants.exact_attention(q[:, 5:6], k[:, 1:2], v[:, 1:2], True)
    assert torch.allclose(got[:, 5:6], alone, rtol=1e-12, atol=0)


def test_grouped_views_fold_each_group_into_rows():
    q = torch.arange(2 * 6 * 5 * 3.0).view(2, 6, 5, 3)
    folded = layouts.grouped(q, 2)
    assert folded.shape == (2, 2, 15, 3) and folded.data_ptr() == q.data_ptr()
    assert torch.equal(folded[1, 1, 5:10], q[1, 4]) and torch.equal(layouts.ungrouped(folded, 6), q)


# --- every entry under grouped heads and documents ------------------------------------------------------

def _layout(kind: str) -> Layout:
    return Layout(PACKED, (EDGES,)) if kind == PACKED else Layout(PADDED, tuple((n,) for n in EDGES))


def _cases():
    for entry in builtin_entries():
        for kind in (PACKED, PADDED):
            for heads, kv_heads in ((4, None), (4, 2), (4, 1)):
                for causal in (False, True):
                    point = variants.Point(heads=heads, kv_heads=kv_heads, head_dim=D, causal=causal, layout=kind,
                                           documents=Documents(), params=entry.resolve(small_params(entry)))
                    if why_not(entry, point) is None:
                        name = f"{entry.name}-{kind}-{'gqa' if kv_heads == 2 else 'mqa' if kv_heads else 'mha'}"
                        yield pytest.param(entry, kind, heads, kv_heads, causal,
                                           id=f"{name}-{'causal' if causal else 'bidir'}")
            for kv_heads in (2, 1):  # dense rows with grouped heads
                for causal in (False, True):
                    point = variants.Point(heads=4, kv_heads=kv_heads, head_dim=D, causal=causal,
                                           params=entry.resolve(small_params(entry)))
                    if kind == PACKED and why_not(entry, point) is None:
                        yield pytest.param(entry, "dense", 4, kv_heads, causal,
                                           id=f"{entry.name}-dense-kv{kv_heads}-{'causal' if causal else 'bidir'}")


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("entry, kind, heads, kv_heads, causal", list(_cases()))
def test_entry_matches_the_explicit_reference(entry, kind, heads, kv_heads, causal, dtype):
    """Outputs and q, k, v gradients on the real tokens, against the float64 reference with K and V
    repeated to the query heads and each document attended alone."""
    layout = None if kind == "dense" else _layout(kind)
    rows, width = (2, 77) if layout is None else (len(layout.lengths), layout.width)
    kv = kv_heads or heads
    q, k, v, upstream = seeded(f"{entry.name}-{kind}-{kv}-{causal}", (rows, heads, width, D), (rows, kv, width, D),
                               (rows, kv, width, D), (rows, heads, width, D))
    if layout is not None and kind == PADDED:
        upstream = upstream * layout.valid()
    params = small_params(entry)
    gen = torch.Generator().manual_seed(zlib.crc32(f"{entry.name}-extras".encode()))
    extras = {x.name: x.draw(x.shape(rows, heads, kv, width, D), gen, "cpu", torch.float64) for x in entry.inputs}
    leaves64 = [t.clone().requires_grad_() for t in (q, k, v)]
    expected = layouts.reference_attention(entry.reference, *leaves64, causal=causal, layout=layout, extras=extras,
                                           **entry.resolve(params))
    expected_grads = torch.autograd.grad(expected, leaves64, upstream)
    torch_dtype = variants.DTYPES[dtype]
    leaves = [t.to(torch_dtype).requires_grad_() for t in (q, k, v)]
    # the entry's extra inputs (gates, β, sink logits) in the dtype the benchmark gives them
    given = {name: x.to(torch.promote_types(torch_dtype, torch.float32)) for name, x in extras.items()}
    out = entry(*leaves, causal=causal, layout=layout, **given, **params)
    assert out.shape == q.shape and out.dtype == torch_dtype
    real = layout.real if layout is not None else (lambda x: x)
    tol = entry.tolerance[dtype]
    err = variants.relative_error(real(out), real(expected))
    assert err <= tol, f"output: {err:.3e}"
    training = why_not(entry, variants.Point(heads=heads, kv_heads=kv_heads, head_dim=D, causal=causal,
                                             layout=kind, documents=Documents(), mode="fwd_bwd", dtype=dtype,
                                             params=entry.resolve(params))) is None
    if training:
        got = torch.autograd.grad(out, leaves, upstream.to(torch_dtype))
        errors = variants.gradient_errors([real(g) for g in got], [real(g) for g in expected_grads], tol)
        assert max(errors) <= tol, dict(zip(("dq", "dk", "dv"), errors, strict=True))


def _refusals():
    for entry in builtin_entries():
        for kind in (PACKED, PADDED):
            point = variants.Point(heads=4, head_dim=D, layout=kind, documents=Documents(),
                                   causal=True in entry.caps.causal, params=entry.resolve())
            if kind not in entry.caps.layouts:
                yield pytest.param(entry, point, f"layout={kind} not supported", id=f"{entry.name}-{kind}")
        point = variants.Point(heads=4, kv_heads=1, head_dim=D, causal=True in entry.caps.causal, params=entry.resolve())
        if not entry.caps.gqa:
            yield pytest.param(entry, point, "kv_heads=1 < heads=4 (grouped-query) not supported", id=f"{entry.name}-mqa")


@pytest.mark.parametrize("entry, point, start", list(_refusals()))
def test_each_layout_or_head_refusal_says_why(entry, point, start):
    reason = why_not(entry, point)
    assert reason is not None and start in reason and len(reason) > len(start) + 10, reason


def test_bench_list_says_which_shapes_each_entry_runs_and_why_not():
    import json

    from typer.testing import CliRunner

    from bench.cli import app

    result = CliRunner().invoke(app, ["list", "--json", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    rows = {f"{r['variant']}/{r['impl']}": r for r in json.loads(result.output)}
    eager = rows["standard/eager"]
    assert {name: shape["runs"] for name, shape in eager["shapes"].items()} == \
        {name: ["non-causal", "causal"] for name in ("gqa", "packed", "padded")}
    for name, row in rows.items():
        entry = variants.get(name)
        assert set(row["declared"]) == {s for s, ok in (("gqa", entry.caps.gqa), ("packed", PACKED in entry.caps.layouts),
                                                        ("padded", PADDED in entry.caps.layouts)) if ok}
        for shape in row["shapes"].values():
            if row["available"] and not shape["runs"]:
                assert shape["reason"], (name, shape)  # a shape that does not run says why
    table = CliRunner().invoke(app, ["list", "--device", "cpu"])
    assert table.exit_code == 0 and "gqa, packed, padded" in table.output
