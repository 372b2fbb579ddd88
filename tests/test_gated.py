"""The gated family (variants/gated): each chunked entry against its float64 recurrence — outputs and
q, k, v and extra-input gradients — at odd lengths and chunk edges, grouped heads, packed and padded
documents; decode steps against the entry's own forward; FLOPs, state bytes and reasons."""

from __future__ import annotations

import importlib.util
import zlib
from dataclasses import replace

import pytest
import torch
from support import token_extras, why_not

import variants
from variants import gated, layouts
from variants.gated import fla as gated_fla
from variants.layouts import PACKED, PADDED, Documents, Layout
from variants.registry import DEFAULT_TOLERANCE

D = 8
NAMES = [v.name for v in gated.VARIANTS]
CHUNKED = [f"{name}/chunked" for name in NAMES]
GROUPING = [f"{v.name}/chunked" for v in gated.VARIANTS if v.gqa]


def seeded(tag: str, *shapes: tuple[int, ...]) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(zlib.crc32(tag.encode()))
    return [torch.randn(shape, generator=gen, dtype=torch.float64) for shape in shapes]


def errors(entry: variants.Entry, q, k, v, upstream, dtype: torch.dtype, layout: Layout | None = None,
           backward: bool = True, **params) -> dict[str, float]:
    """Relative errors of the entry's output and of its q, k, v and extra-input gradients in ``dtype``,
    on the real tokens, against the float64 reference of each document alone (K, V and extras
    repeated to the query heads)."""
    extras = token_extras(entry, q, k, tag=str(q.shape))
    if layout is not None and layout.kind == PADDED:
        upstream = upstream * layout.valid()  # outputs at padding are no part of the result
    leaves64 = [t.clone().requires_grad_() for t in (q, k, v, *extras.values())]
    expected = layouts.reference_attention(entry.reference, *leaves64[:3], causal=True, layout=layout,
                                           extras=dict(zip(extras, leaves64[3:], strict=True)),
                                           **entry.resolve(params))
    expected_grads = torch.autograd.grad(expected, leaves64, upstream)
    given = [t.to(dtype) for t in (q, k, v)] + [x.to(torch.promote_types(dtype, torch.float32)) for x in extras.values()]
    leaves = [t.requires_grad_(backward) for t in given]
    out = entry(*leaves[:3], causal=True, layout=layout, **dict(zip(extras, leaves[3:], strict=True)), **params)
    assert out.dtype == dtype and out.shape == q.shape
    if not backward:
        return {"out": variants.relative_error((layout.real(out) if layout else out).double(),
                                               layout.real(expected) if layout else expected)}
    got = torch.autograd.grad(out, leaves, upstream.to(dtype))
    real = layout.real if layout is not None else (lambda x: x)
    names = ["out", "dq", "dk", "dv", *(f"d{name}" for name in extras)]
    pairs = zip([out, *got], [expected, *expected_grads], strict=True)
    return {name: variants.relative_error(real(a.detach().double()), real(b))
            for name, (a, b) in zip(names, pairs, strict=True)}


def assert_within(errs: dict[str, float], tol: float) -> None:
    assert max(errs.values()) <= tol, {name: f"{err:.2e}" for name, err in errs.items()}


# --- chunked against the recurrence ----------------------------------------------------------------

@pytest.mark.parametrize("n, chunk", [(1, 64), (37, 16), (64, 64), (65, 64), (130, 32)])
@pytest.mark.parametrize("name", CHUNKED)
def test_chunked_matches_the_recurrence_at_odd_lengths_and_chunk_edges(name, n, chunk):
    entry = variants.get(name)
    q, k, v, upstream = seeded(f"{name}-{n}", *[(1, 2, n, D)] * 4)
    assert_within(errors(entry, q, k, v, upstream, torch.float64, chunk=chunk), DEFAULT_TOLERANCE["float64"])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", CHUNKED)
def test_chunked_lower_precisions_are_within_the_tolerance(name, dtype):
    entry = variants.get(name)
    q, k, v, upstream = seeded(f"{name}-{dtype}", *[(2, 2, 77, D)] * 4)
    assert_within(errors(entry, q, k, v, upstream, variants.DTYPES[dtype], chunk=32), entry.tolerance[dtype])


@pytest.mark.parametrize("kv_heads", [2, 1])
@pytest.mark.parametrize("name", GROUPING)
def test_grouped_heads_share_their_kv_heads_gates(name, kv_heads):
    entry = variants.get(name)
    q, k, v, upstream = seeded(f"{name}-gqa{kv_heads}", (2, 4, 45, D), *[(2, kv_heads, 45, D)] * 2, (2, 4, 45, D))
    assert_within(errors(entry, q, k, v, upstream, torch.float64, chunk=16), DEFAULT_TOLERANCE["float64"])


PACKED_LAYOUT = Layout(PACKED, ((1, 20, 33, 1, 9),))
PADDED_LAYOUT = Layout(PADDED, ((20,), (1,), (33,), (9,)))


@pytest.mark.parametrize("layout", [PACKED_LAYOUT, PADDED_LAYOUT], ids=[PACKED, PADDED])
@pytest.mark.parametrize("name", CHUNKED)
def test_documents_restart_the_state(name, layout):
    """Packed: each document alone (one of length 1 among them); padded: padding keys, values and
    gates come after every real query, so they change nothing real."""
    entry = variants.get(name)
    kv = 2 if entry.caps.gqa else 4
    rows, width = len(layout.lengths), layout.width
    q, k, v, upstream = seeded(f"{name}-{layout.kind}", (rows, 4, width, D), *[(rows, kv, width, D)] * 2,
                               (rows, 4, width, D))
    assert_within(errors(entry, q, k, v, upstream, torch.float64, layout, chunk=16), DEFAULT_TOLERANCE["float64"])


def test_strong_decays_stay_finite():
    """Every exponent is later minus earlier cumulative log-decay: a gate of −60 per token over a long
    chunk underflows to zero weight, never overflows."""
    entry = variants.get("gla/chunked")
    q, k, v = seeded("strong", *[(1, 1, 70, D)] * 3)
    g = torch.full((1, 1, 70, D), -60.0, dtype=torch.float64)
    out = entry(q, k, v, causal=True, g=g, chunk=64)
    expected = entry.reference(q, k, v, causal=True, g=g)
    assert torch.isfinite(out).all() and variants.relative_error(out, expected) <= 1e-10


@pytest.mark.parametrize("per_token", [-0.9, -1.0])  # a 64-token chunk decays by e^−57.6 (factored), e^−64 (pairwise)
def test_channel_decays_near_the_factored_limit_keep_float32_precision(per_token):
    """Within a chunk the per-channel scores are factored as (q ⊙ e^Γ)(k ⊙ e^−Γ)ᵀ while e^−Γ ≤ e^60, pairwise
    beyond: both hold float32 to its tolerance at the edge."""
    entry = variants.get("gla/chunked")
    q, k, v = seeded(f"edge{per_token}", *[(1, 2, 64, D)] * 3)
    g = torch.full((1, 2, 64, D), per_token, dtype=torch.float64)
    expected = entry.reference(q, k, v, causal=True, g=g)
    out = entry(*(t.float() for t in (q, k, v)), causal=True, g=g.float(), chunk=64)
    assert variants.relative_error(out, expected) <= entry.tolerance["float32"]


def test_retention_decays_per_head():
    log_decay = gated.retention_log_decay(3, "cpu")
    assert torch.allclose(log_decay.exp(), torch.tensor([1 - 2 ** -5, 1 - 2 ** -6, 1 - 2 ** -7], dtype=torch.float64))


# --- decoding ----------------------------------------------------------------------------------------

def decode_point(entry: variants.Entry, **fields) -> variants.Point:
    return variants.Point(**{"heads": 4, "seq_len": 64, "head_dim": 64, "causal": True, "mode": "decode",
                             "params": entry.resolve(), **fields})


@pytest.mark.parametrize("name", CHUNKED)
def test_state_is_fixed_size_and_per_kv_head(name):
    entry = variants.get(name)
    kv = 2 if entry.caps.gqa else 4
    short, long = decode_point(entry, kv_heads=kv), decode_point(entry, kv_heads=kv, seq_len=65536)
    assert entry.decoder.cache_bytes(short) == entry.decoder.cache_bytes(long) == kv * 64 * 64 * 4
    assert entry.decoder.bytes_moved(long) > 2 * entry.decoder.cache_bytes(long)
    assert entry.decoder.flops(long) == entry.decoder.flops(short) > 0
    assert entry.decoder.kernel_name(decode_point(entry, layout=PACKED, documents=Documents())).endswith(
        "one state per sequence")


def test_retention_refuses_grouped_heads_for_its_reason():
    entry = variants.get("retention/chunked")
    for mode in ("fwd", "decode"):
        reason = why_not(entry, decode_point(entry, kv_heads=2, mode=mode))
        assert reason is not None and "query head" in reason, reason
    assert why_not(entry, decode_point(entry, causal=False, mode="fwd")).startswith("non-causal not supported")


# --- FLOPs ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", CHUNKED)
def test_flops_count_the_chunks_inside_documents(name):
    entry = variants.get(name)
    dense = variants.Point(batch=1, heads=4, seq_len=128, head_dim=64, causal=True, params=entry.resolve())
    variant = gated.VARIANTS[NAMES.index(entry.variant)]
    per_chunk = gated.chunk_work(variant.rule, 64, 64, 64, channel_decay=variant.fixed_log_decay is None)
    assert entry.flops(dense) == 4 * 2 * per_chunk
    packed = variants.Point(batch=1, heads=4, seq_len=128, head_dim=64, causal=True, params=entry.resolve(),
                            layout=PACKED, documents=Documents("equal", 4))
    assert entry.flops(packed) == 4 * 4 * per_chunk  # four 32-token documents


# --- fla's chunk kernels, interpreted on CPU (tests/conftest.py) -----------------------------------

@pytest.fixture
def fla_kernels(triton_interpreter):
    """The fla entries run fla's real chunk kernels on CPU tensors, interpreted (tests/conftest.py)."""
    if importlib.util.find_spec("fla") is None:
        pytest.skip("fla not installed (pip install 'attnbench[fla]')")


def fla_dtype(name: str) -> torch.dtype:
    """float32 where the kernel takes it, else float16 (Triton's interpreter has no bfloat16 arithmetic)."""
    variant, impl = name.split("/")
    return torch.float16 if (impl, variant) in gated_fla.FLOAT32_REFUSED else torch.float32


def fla_tolerance(entry: variants.Entry, dtype: torch.dtype) -> float:
    return entry.tolerance["float16" if dtype == torch.float16 else "float32"]


def fla_errors(name: str, q, k, v, upstream, layout: Layout | None = None) -> dict[str, float]:
    """The fla entry's errors in the dtype its kernel takes; gradients where the op has a backward."""
    variant, impl = name.split("/")
    return errors(variants.get(name), q, k, v, upstream, fla_dtype(name), layout,
                  backward=(impl, variant) not in gated_fla.NO_BACKWARD)


FLA = [f"{name}/{impl}" for impl in (gated_fla.CHUNK, gated_fla.RECURRENT) for name in NAMES]


@pytest.mark.parametrize("name", FLA)
def test_fla_kernel_matches_the_recurrence(fla_kernels, name):
    """Outputs and q, k, v, gate and β gradients of fla's chunk kernel (~2 s a case interpreted)."""
    q, k, v, upstream = seeded(f"{name}-50", *[(1, 2, 50, 16)] * 4)
    assert_within(fla_errors(name, q, k, v, upstream), fla_tolerance(variants.get(name), fla_dtype(name)))


# Padded rows reach a kernel as plain rows: run for the chunk ops, not again for the recurrent ones
# (the interpreter takes 5–10 s a case here).
FLA_DOCUMENTS = [pytest.param(name, kind, id=f"{name}-{kind}") for name in FLA for kind in (PACKED, PADDED)
                 if kind == PACKED or name.endswith(f"/{gated_fla.CHUNK}")]


@pytest.mark.parametrize("name, kind", FLA_DOCUMENTS)
def test_fla_kernel_grouped_heads_and_documents(fla_kernels, name, kind):
    """2 query heads on 1 KV head (retention: 2), documents on and next to fla's chunk edge (64) and of
    length 1, packed (cu_seqlens) or padded (~2–8 s a case interpreted)."""
    lengths = (1, 64, 65)
    layout = Layout(PACKED, (lengths,)) if kind == PACKED else Layout(PADDED, tuple((m,) for m in lengths))
    entry = variants.get(name)
    kv = 1 if entry.caps.gqa else 2
    rows, width = len(layout.lengths), layout.width
    q, k, v, upstream = seeded(f"{name}-{kind}", (rows, 2, width, 16), *[(rows, kv, width, 16)] * 2,
                               (rows, 2, width, 16))
    assert_within(fla_errors(name, q, k, v, upstream, layout), fla_tolerance(entry, fla_dtype(name)))


def test_fla_entries_name_their_op_and_give_reasons_here():
    for name in FLA:
        entry = variants.get(name)
        point = variants.Point(heads=4, kv_heads=2 if entry.caps.gqa else None, causal=True, layout=PACKED,
                               documents=Documents(), device="cuda")
        op = gated_fla.OPS[entry.impl, entry.variant]
        assert entry.kernel_name(point).startswith(op + " varlen (cu_seqlens)")
        assert entry.kernel_name(point).endswith("repeated to the query heads") == entry.caps.gqa
        assert why_not(entry, variants.Point(causal=True)).startswith("device=cpu not supported")
        chunked = variants.get(f"{entry.variant}/chunked")
        if entry.impl == gated_fla.CHUNK:
            assert entry.flops(point) == chunked.flops(replace(point, params=chunked.resolve())) > 0
        else:  # token by token: less than the chunked forms' work, more than reading the state
            assert 0 < entry.flops(point) < chunked.flops(replace(point, params=chunked.resolve()))
