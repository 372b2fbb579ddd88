"""The structured sparse impls on fused kernels (variants.sparse.merged): the parts of each pattern allow
exactly the pairs of its mask, each once; outputs and gradients equal the float64 references; the
fused CPU kernel equals the exact eager one; the kernel choice (CUDA included, through fakes) and
what ``kernel(point)`` reports. CPU only, no timing."""

from __future__ import annotations

import dataclasses
import itertools
import math
import zlib

import pytest
import torch
from support import why_not
from torch.utils._python_dispatch import TorchDispatchMode

import variants
from variants import layouts, masks, sparse
from variants.layouts import PACKED, PADDED, Documents, Layout
from variants.reference import softmax_attention
from variants.sparse import merged
from variants.sparse.merged import Part, Tiles

BUILDERS = {
    "local": lambda n, p, causal: sparse.local_parts(n, p["window"], causal),
    "atrous": lambda n, p, causal: sparse.atrous_parts(n, p["rate"], causal),
    "strided": lambda n, p, causal: sparse.strided_parts(n, p["window"], p["rate"], causal),
}
GRID = {
    "local": [{"window": w} for w in (0, 1, 2, 3, 5, 8, 13, 40)],
    "atrous": [{"rate": r} for r in (1, 2, 3, 5, 8, 50)],
    "strided": [{"window": w, "rate": r} for w in (0, 1, 3, 8, 20) for r in (1, 2, 3, 7, 16)],
}
IMPLS = {"local": "blocked", "atrous": "reshape", "strided": "merged"}


def pair_counts(parts: tuple[Part, ...], n: int) -> torch.Tensor:
    """(n, n) number of parts allowing each (query, key) pair."""
    counts = torch.zeros(n, n, dtype=torch.int64)
    for part in parts:
        a = torch.arange(part.rows.length)[:, None]
        c = torch.arange(part.cols.length)[None, :]
        inside = {"full": torch.ones(a.shape[0], c.shape[1], dtype=torch.bool), "causal": c <= a,
                  "anticausal": c >= a}[part.relation]
        tile, row, col = torch.nonzero(inside.expand(part.rows.count, -1, -1), as_tuple=True)
        counts.index_put_((part.rows.positions()[tile, row], part.cols.positions()[tile, col]),
                          torch.ones_like(tile), accumulate=True)
    return counts


# --- the parts are the mask -----------------------------------------------------------------------

@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("sparsity", list(BUILDERS))
def test_parts_allow_exactly_the_mask_each_pair_once(sparsity, causal):
    for n, params in itertools.product([*range(1, 42), 64, 65, 100], GRID[sparsity]):
        parts = BUILDERS[sparsity](n, params, causal)
        expected = masks.dense_mask(masks.pattern(sparsity, causal, **params).mask, n, n).long()
        assert torch.equal(pair_counts(parts, n), expected), (n, params)
        assert not merged.plan(parts, n).zeroed  # every row reached; tiles in [0, n), distinct


def test_only_atrous_and_the_diagonal_skip_the_merge():
    assert merged.plan(sparse.atrous_parts(231, 8, False), 231).disjoint
    assert merged.plan(sparse.local_parts(231, 0, False), 231).disjoint
    assert merged.plan(sparse.local_parts(50, 64, True), 50).disjoint  # one partial block
    assert not merged.plan(sparse.local_parts(231, 16, False), 231).disjoint
    assert not merged.plan(sparse.strided_parts(231, 8, 16, True), 231).disjoint


def test_parts_refuse_what_kernels_cannot_express():
    tiles = Tiles(start=0, step=4, count=2, stride=1, length=4)
    with pytest.raises(ValueError, match="square"):
        Part(tiles, Tiles(start=0, step=4, count=2, stride=1, length=3), "causal")
    with pytest.raises(ValueError, match="key tiles"):
        Part(tiles, Tiles(start=0, step=4, count=1, stride=1, length=4))
    with pytest.raises(ValueError, match="relation"):
        Part(tiles, tiles, "banded")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="distinct positions"):
        merged.plan((Part(tiles, tiles),), 7)  # position 7 is outside
    overlapping = Tiles(start=0, step=2, count=2, stride=1, length=4)
    with pytest.raises(ValueError, match="distinct positions"):
        merged.plan((Part(overlapping, overlapping),), 8)


def test_gather_is_a_view_of_the_positions():
    x = torch.arange(2 * 3 * 20 * 2, dtype=torch.float64).view(2, 3, 20, 2)
    tiles = Tiles(start=1, step=2, count=3, stride=6, length=3)
    view = tiles.gather(x)
    assert view.shape == (2, 3, 3, 3, 2)
    assert view.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()
    assert torch.equal(view, x[:, :, tiles.positions()])
    # Non-contiguous input: gathered from a contiguous copy, same values.
    xt = x.transpose(0, 1).contiguous().transpose(0, 1)
    assert torch.equal(tiles.gather(xt), view)


# --- outputs and gradients against the float64 references ---------------------------------------

def seeded_inputs(tag: str, n: int, b: int = 2, h: int = 2, d: int = 16) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(zlib.crc32(tag.encode()))
    return [torch.randn(b, h, n, d, generator=gen, dtype=torch.float64) for _ in range(4)]


def output_and_grads(fn, tensors, upstream, dtype, **kwargs):
    leaves = [t.to(dtype).requires_grad_() for t in tensors]
    out = fn(*leaves, **kwargs)
    return out, torch.autograd.grad(out, leaves, upstream.to(out.dtype))


PARAMS = {  # small enough that the structure matters at these lengths, n not a multiple of them
    "local": [{"window": 16}, {"window": 7}, {"window": 0}, {"window": 64}],
    "atrous": [{"rate": 4}, {"rate": 7}, {"rate": 1}, {"rate": 64}],
    "strided": [{"window": 8, "rate": 16}, {"window": 20, "rate": 6}, {"window": 0, "rate": 1}],
}


def _reference_cases():
    for sparsity in IMPLS:
        for n in (1, 50, 231, 300):
            for dtype in ("float64", "float32"):
                yield pytest.param(sparsity, n, dtype, id=f"{sparsity}-n{n}-{dtype}")


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("sparsity, n, dtype", list(_reference_cases()))
def test_impl_matches_float64_reference(sparsity, n, dtype, causal):
    entry = variants.get(sparsity, IMPLS[sparsity])
    tol = entry.tolerance[dtype]
    for params in [*PARAMS[sparsity], {}]:
        q, k, v, upstream = seeded_inputs(f"{sparsity}-{n}-{causal}-{params}", n)
        resolved = entry.resolve(params)
        ref, ref_grads = output_and_grads(entry.reference, (q, k, v), upstream, torch.float64,
                                          causal=causal, **resolved)
        out, got_grads = output_and_grads(entry, (q, k, v), upstream, variants.DTYPES[dtype],
                                          causal=causal, **params)
        assert out.dtype == variants.DTYPES[dtype] and out.shape == q.shape
        assert variants.relative_error(out, ref) <= tol, (params, variants.relative_error(out, ref))
        # dq and dk vanish when every row sees only itself (window 0, rate > n): gradient_errors then
        # judges them at the scale of the gradients beside them, not against a fixed floor.
        errors = variants.gradient_errors(got_grads, ref_grads, tol)
        assert max(errors) <= tol, (params, dict(zip("qkv", errors, strict=True)))


@pytest.mark.parametrize("fused", [True, False], ids=["cpu-flash", "eager"])
@pytest.mark.parametrize("sparsity", list(IMPLS))
def test_bfloat16_within_tolerance_and_non_contiguous_inputs(monkeypatch, sparsity, fused):
    """bfloat16 takes the 16-bit merge (float32 accumulators); inputs laid out (b, n, h, d)."""
    if not fused:
        monkeypatch.setattr(merged, "aten_op", lambda name: None)
    entry = variants.get(sparsity, IMPLS[sparsity])
    params = PARAMS[sparsity][0]
    q, k, v, upstream = seeded_inputs(f"bf16-{sparsity}", 231)
    ref, ref_grads = output_and_grads(entry.reference, (q, k, v), upstream, torch.float64,
                                      causal=False, **entry.resolve(params))
    leaves = [t.transpose(1, 2).contiguous().to(torch.bfloat16).requires_grad_() for t in (q, k, v)]
    out = entry(*(t.transpose(1, 2) for t in leaves), causal=False, **params)
    grads = torch.autograd.grad(out, leaves, upstream.to(torch.bfloat16))
    tol = entry.tolerance["bfloat16"]
    assert variants.relative_error(out, ref) <= tol
    for got, exp in zip(grads, ref_grads, strict=True):
        assert variants.relative_error(got.transpose(1, 2), exp) <= tol


# --- the fused kernels against the exact eager one ----------------------------------------------

def _run_parts(parts, tensors, upstream, dtype):
    return output_and_grads(merged.merged_attention, tensors, upstream, dtype, parts=parts)


MERGED_CASES = [
    ("local", {"window": 16}, 231), ("local", {"window": 7}, 50),
    ("strided", {"window": 8, "rate": 16}, 300), ("strided", {"window": 20, "rate": 6}, 231),
]


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("sparsity, params, n", MERGED_CASES)
def test_fused_cpu_kernel_equals_eager_kernel(monkeypatch, sparsity, params, n, causal):
    parts = BUILDERS[sparsity](n, params, causal)
    assert not merged.plan(parts, n).disjoint
    assert merged.select_kernel("cpu", torch.float64, 16).name == "cpu flash with lse"
    q, k, v, upstream = seeded_inputs(f"fused-{sparsity}-{n}", n)
    fused, fused_grads = _run_parts(parts, (q, k, v), upstream, torch.float64)
    monkeypatch.setattr(merged, "aten_op", lambda name: None)  # a torch without the fused ops
    assert merged.select_kernel("cpu", torch.float64, 16).name.startswith("eager tiles (fallback:")
    eager, eager_grads = _run_parts(parts, (q, k, v), upstream, torch.float64)
    assert variants.relative_error(fused, eager) < 1e-12
    for a, b in zip(fused_grads, eager_grads, strict=True):
        assert variants.relative_error(a, b) < 1e-12


def test_eager_kernel_equals_autograd_of_its_forward():
    """The eager kernel is the tests' yardstick: its hand-written backward (with its own lse and
    output) equals autograd through its forward."""
    q, k, v, upstream = (t[0] for t in seeded_inputs("eager", 37))
    for causal in (False, True):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out, lse, state = merged.EAGER.forward(*leaves, causal)
        expected = torch.autograd.grad(out, leaves, upstream)
        got = merged.EAGER.backward(upstream, q, k, v, out.detach(), lse.detach(), causal, state)
        for a, b in zip(got, expected, strict=True):
            assert variants.relative_error(a, b) < 1e-12


@pytest.mark.parametrize("part_dtype", [torch.float32, torch.bfloat16])
def test_merge_is_exact_and_keeps_rows_neither_side_reached(part_dtype):
    """Row 0: neither side reached (−inf, −inf) stays 0 / −inf, no NaN; row 1: the part alone;
    row 2: equal weights."""
    out = torch.tensor([0.0, 0.0, 2.0]).view(1, 1, 3, 1)
    lse = torch.tensor([float("-inf"), float("-inf"), 1.0]).view(1, 1, 3, 1)
    part_out = torch.tensor([5.0, 3.0, 4.0], dtype=part_dtype).view(1, 1, 3, 1)
    part_lse = torch.tensor([float("-inf"), 0.5, 1.0]).view(1, 1, 3, 1)
    merged._merge_into(out, lse, part_out, part_lse)
    assert out.flatten().tolist() == [0.0, 3.0, 3.0]
    assert lse.flatten().tolist() == [float("-inf"), 0.5, pytest.approx(1.0 + math.log(2.0))]


# --- kernel choice, as data ------------------------------------------------------------------------

@pytest.mark.parametrize("device, dtype, head_dim, expected", [
    ("cpu", torch.float32, 64, "cpu flash with lse"),
    ("cpu", torch.bfloat16, 100, "cpu flash with lse"),
    ("cuda", torch.float32, 64, "eager tiles (fallback: cuda flash takes bfloat16/float16, not float32)"),
    ("cuda", torch.bfloat16, 264, "eager tiles (fallback: cuda flash takes head_dim <= 256, not 264)"),
    ("cuda", torch.float16, 100, "eager tiles (fallback: cuda flash takes head_dim a multiple of 8, not 100)"),
    ("cuda", torch.bfloat16, 128, "cuda flash with lse"),
    ("cuda:1", torch.float16, 256, "cuda flash with lse"),
    ("mps", torch.float32, 64, "eager tiles (fallback: no fused kernel with log-sum-exp on mps)"),
])
def test_kernel_choice(monkeypatch, device, dtype, head_dim, expected):
    monkeypatch.setattr(merged, "cuda_flash_unready", lambda device: None)  # as on an H100
    assert merged.select_kernel(device, dtype, head_dim).name == expected


def test_kernel_choice_says_why_cuda_flash_cannot_run(monkeypatch):
    monkeypatch.setattr(merged, "cuda_flash_unready", lambda device: "flash attention needs compute capability 8.0 or newer")
    assert merged.select_kernel("cuda", torch.bfloat16, 128).name == \
        "eager tiles (fallback: flash attention needs compute capability 8.0 or newer)"
    monkeypatch.setattr(merged, "cuda_flash_unready", lambda device: None)
    missing = "_scaled_dot_product_flash_attention_backward"
    monkeypatch.setattr(merged, "aten_op", lambda name: None if name == missing else object())
    assert merged.select_kernel("cuda", torch.bfloat16, 128).name == \
        "eager tiles (fallback: this torch has no aten._scaled_dot_product_flash_attention_backward)"


def _checked_against_schema(real: str, compute):
    """A stand-in for a CUDA op: the arguments are first run through the real op on meta tensors
    (so they must fit its schema), then ``compute`` does the work on CPU. Returns the meta outputs
    with ``compute``'s tensors in front."""
    def fake(*args, **kwargs):
        to_meta = lambda x: x.to("meta") if isinstance(x, torch.Tensor) else x  # noqa: E731
        meta = getattr(torch.ops.aten, real)(*map(to_meta, args), **{k: to_meta(x) for k, x in kwargs.items()})
        got = compute(*args)
        for g, m in zip(got, meta, strict=False):
            assert g.shape == m.shape and g.dtype == m.dtype, (real, g.shape, m.shape, g.dtype, m.dtype)
        return (*got, *meta[len(got):])

    return fake


def test_cuda_flash_plumbing_through_fakes(monkeypatch):
    """The CUDA flash kernel's calls, run through fakes that check them against the real CUDA ops'
    schemas and compute with the CPU ops: equal to the CPU flash kernel's result."""
    cpu_fwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    cpu_bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
    fakes = {
        "_scaled_dot_product_flash_attention": _checked_against_schema(
            "_scaled_dot_product_flash_attention",
            lambda q, k, v, p, causal, debug: [t.contiguous() for t in cpu_fwd(q, k, v, p, causal)]),
        "_scaled_dot_product_flash_attention_backward": _checked_against_schema(
            "_scaled_dot_product_flash_attention_backward",
            lambda do, q, k, v, o, lse, cq, ck, mq, mk, p, causal, seed, offset:
                cpu_bwd(do, q, k, v, o, lse, p, causal)),
    }
    parts = sparse.strided_parts(231, 20, 6, False)
    q, k, v, upstream = seeded_inputs("cuda-fake", 231)
    expected, expected_grads = _run_parts(parts, (q, k, v), upstream, torch.bfloat16)

    monkeypatch.setattr(merged, "cuda_flash_unready", lambda device: None)
    monkeypatch.setattr(merged, "aten_op", fakes.get)
    kernel = merged.select_kernel("cuda", torch.bfloat16, 16)
    assert kernel.name == "cuda flash with lse"
    monkeypatch.setattr(merged, "select_kernel", lambda *args: kernel)
    out, grads = _run_parts(parts, (q, k, v), upstream, torch.bfloat16)
    assert torch.equal(out, expected)
    for a, b in zip(grads, expected_grads, strict=True):
        assert torch.equal(a, b)


# --- what runs, as the results row says -----------------------------------------------------------

@pytest.mark.parametrize("name, causal, params, expected", [
    ("atrous/reshape", False, {}, "sdpa (no mask) over 8 residue classes"),
    ("atrous/reshape", True, {"rate": 3}, "sdpa (no mask, is_causal) over 3 residue classes"),
    ("local/blocked", False, {}, "cpu flash with lse ×3 parts, merged"),
    ("local/blocked", True, {}, "cpu flash with lse ×2 parts, merged"),
    ("local/blocked", False, {"window": 0}, "sdpa (no mask) over 8192 tiles"),
    ("local/blocked", False, {"window": 1000}, "cpu flash with lse ×8 parts, merged"),  # 8192 = 8·1000 + 192
    ("strided/merged", False, {}, "cpu flash with lse ×5 parts, merged"),
    ("strided/merged", True, {}, "cpu flash with lse ×3 parts, merged"),
])
def test_kernel_reports_what_runs(name, causal, params, expected):
    entry = variants.get(name)
    point = variants.Point(batch=1, heads=4, seq_len=8192, head_dim=64, causal=causal,
                           params=entry.resolve(params))
    assert entry.kernel_name(point) == expected


def test_kernel_reports_the_fallback_on_cuda_float32():
    entry = variants.get("local/blocked")
    point = variants.Point(seq_len=4096, head_dim=64, device="cuda", params=entry.resolve())
    assert entry.kernel_name(point) == ("eager tiles (fallback: cuda flash takes bfloat16/float16, "
                                   "not float32) ×3 parts, merged")


# --- no O(n²) anywhere ----------------------------------------------------------------------------

class LargestTensor(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else (out,):
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out


@pytest.mark.parametrize("sparsity, params", [("local", {"window": 32}), ("atrous", {"rate": 16}),
                                          ("strided", {"window": 32, "rate": 32})])
def test_no_tensor_grows_with_n_squared(sparsity, params):
    """Forward and backward at n = 2048: no tensor larger than an input (n·d per head) is made,
    where a mask or a score matrix would hold n²/rate or n·w per head."""
    n, d = 2048, 16
    entry = variants.get(sparsity, IMPLS[sparsity])
    leaves = [t.float().requires_grad_() for t in seeded_inputs(f"big-{sparsity}", n, b=1, h=2, d=d)[:3]]
    with LargestTensor() as largest:
        out = entry(*leaves, causal=False, **params)
        out.backward(torch.ones_like(out))
    assert largest.numel <= leaves[0].numel()


@pytest.mark.parametrize("fused", [True, False], ids=["cpu-flash", "eager"])
def test_rows_reached_late_or_never(monkeypatch, fused):
    """A part reaching new and already reached rows merges into zeroed accumulators; rows no part
    reaches give 0."""
    n = 10
    head = Tiles(start=0, step=4, count=1, stride=1, length=4)
    parts = (Part(head, head, "causal"),  # rows 0-3
             Part(Tiles(start=2, step=5, count=1, stride=1, length=5),  # rows 2-6
                  Tiles(start=4, step=5, count=1, stride=1, length=5)))  # keys 4-8
    assert merged.plan(parts, n) == merged.Plan(first=(True, False), zeroed=True)
    allowed = pair_counts(parts, n)
    assert allowed.max() == 1
    if not fused:
        monkeypatch.setattr(merged, "aten_op", lambda name: None)
    q, k, v, upstream = seeded_inputs("late", n)
    masked = lambda q, k, v: softmax_attention(q[:, :, :7], k, v, allowed[:7].bool())  # noqa: E731
    ref, ref_grads = output_and_grads(masked, (q, k, v), upstream[:, :, :7], torch.float64)
    out, grads = output_and_grads(lambda q, k, v: merged.merged_attention(q, k, v, parts), (q, k, v),
                                  upstream, torch.float64)
    assert variants.relative_error(out[:, :, :7], ref) < 1e-12
    assert torch.equal(out[:, :, 7:], torch.zeros_like(out[:, :, 7:]))
    for got, exp in zip(grads, ref_grads, strict=True):
        assert variants.relative_error(got, exp) < 1e-12


# --- documents: the parts of each document, shifted to where it starts -----------------------------

def _random_lengths(gen: torch.Generator, count: int, high: int) -> tuple[int, ...]:
    return tuple(torch.randint(1, high + 1, (count,), generator=gen).tolist())


def _document_layouts(block: int) -> list[tuple[int, ...]]:
    """Documents of one packed row around the tile edges of ``block`` (the window or rate): lengths
    1, block − 1, block, block + 1, 2·block ± 1, so that boundaries fall on, before and after tile
    edges; and seeded random ones."""
    b = max(block, 1)
    edges = [(1,), (1, 1, 1), (b - 1 or 1, 1, b, b + 1), (2 * b + 1, 1, 2 * b - 1 or 1, b), (3, b + 2, 1, 2 * b)]
    gen = torch.Generator().manual_seed(block)
    return edges + [_random_lengths(gen, count, 3 * b + 2) for count in (2, 5, 9)]


def _document_mask(sparsity: str, params: dict, causal: bool, lengths: tuple[int, ...]) -> torch.Tensor:
    """The pattern applied within each document alone (block-diagonal), built from the plain pattern's
    dense mask over each document: independent of the document mask function."""
    n = sum(lengths)
    expected = torch.zeros(n, n, dtype=torch.long)
    start = 0
    for length in lengths:
        pattern = masks.pattern(sparsity, causal, **params)
        expected[start:start + length, start:start + length] = masks.dense_mask(pattern.mask, length, length).long()
        start += length
    return expected


DOCUMENT_GRID = {
    "local": [{"window": w} for w in (0, 1, 3, 8)],
    "atrous": [{"rate": r} for r in (1, 2, 5)],
    "strided": [{"window": w, "rate": r} for w in (0, 3, 8) for r in (1, 2, 7)],
}


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("sparsity", list(BUILDERS))
def test_document_parts_allow_exactly_pattern_and_same_document_each_pair_once(sparsity, causal):
    parts_of = sparse.STRUCTURED[sparsity].parts_of
    for params in DOCUMENT_GRID[sparsity]:
        for lengths in _document_layouts(max(params.values())):
            parts = sparse.document_parts(parts_of, lengths, causal, tuple(sorted(params.items())))
            n = sum(lengths)
            assert torch.equal(pair_counts(parts, n), _document_mask(sparsity, params, causal, lengths)), \
                (params, lengths)
            # the same pairs as the document mask function the mask-based impls use
            layout = Layout(PACKED, (lengths,))
            mask = masks.cached_document_mask(masks.pattern(sparsity, causal, **params), layout, "cpu")[0, 0]
            assert torch.equal(pair_counts(parts, n).bool(), mask)
            assert not merged.plan(parts, n).zeroed  # every row reached, tiles within [0, n)


@pytest.mark.parametrize("sparsity", list(BUILDERS))
def test_causal_parts_of_a_padded_row_never_reach_its_padding(sparsity):
    """Padded and causal, the parts run over the whole row without a mask: a real query (before the
    padding) reaches exactly the pattern's keys of its document, never a padding key."""
    parts_of = sparse.STRUCTURED[sparsity].parts_of
    params = DOCUMENT_GRID[sparsity][-1]
    for lengths in ((1,), (5,), (16,), (17,), (40,)):
        layout = Layout(PADDED, (lengths, (40,)))
        parts = sparse.layout_parts(parts_of, layout.width, True, params, layout)
        expected = torch.zeros(lengths[0], layout.width, dtype=torch.long)
        expected[:, :lengths[0]] = _document_mask(sparsity, params, True, lengths)
        assert torch.equal(pair_counts(parts, layout.width)[:lengths[0]], expected), lengths


def test_padded_non_causal_parts_are_refused_with_the_reason():
    for sparsity, impl in IMPLS.items():
        entry = variants.get(sparsity, impl)
        point = variants.Point(heads=4, head_dim=16, layout=PADDED, documents=Documents(), params=entry.resolve())
        reason = why_not(entry, point)
        assert reason is not None and "padding keys masked" in reason and "mask-free" in reason
        assert why_not(entry, dataclasses.replace(point, causal=True)) is None
        assert why_not(entry, dataclasses.replace(point, layout=PACKED)) is None
        with pytest.raises(ValueError, match="padding keys masked"):
            entry(*(torch.zeros(2, 1, 8, 4) for _ in range(3)), causal=False, layout=Layout(PADDED, ((3,), (8,))))


# --- grouped-query heads: each group member against K and V as they are -----------------------------

GQA_CASES = [  # (sparsity, params, n): merged (overlapping parts) and disjoint (atrous, window 0) paths
    ("local", {"window": 7}, 50), ("strided", {"window": 8, "rate": 6}, 61), ("atrous", {"rate": 4}, 50),
    ("local", {"window": 0}, 20),
]


def _grouped_inputs(tag: str, n: int, heads: int, kv_heads: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(zlib.crc32(tag.encode()))
    shapes = [(2, heads, n, 16), (2, kv_heads, n, 16), (2, kv_heads, n, 16), (2, heads, n, 16)]
    return [torch.randn(shape, generator=gen, dtype=torch.float64) for shape in shapes]


@pytest.mark.parametrize("fused", [True, False], ids=["cpu-flash", "eager"])
@pytest.mark.parametrize("kv_heads", [2, 1], ids=["gqa", "mqa"])
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("sparsity, params, n", GQA_CASES)
def test_grouped_heads_equal_repeated_kv_and_gradients_sum_over_the_group(monkeypatch, sparsity, params, n, causal,
                                                                          kv_heads, fused):
    """Grouped K and V give what K and V repeated to every query head give (the definition), and dk,
    dv are the sums over each group of the repeated heads' gradients — in both execution paths and
    with both kernels."""
    if not fused:
        monkeypatch.setattr(merged, "aten_op", lambda name: None)
    parts = BUILDERS[sparsity](n, params, causal)
    q, k, v, upstream = _grouped_inputs(f"gqa-{sparsity}-{n}-{causal}-{kv_heads}", n, 6, kv_heads)
    out, grads = _run_parts(parts, (q, k, v), upstream, torch.float64)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    repeated = merged.merged_attention(leaves[0], *(layouts.repeat_kv(t, 6) for t in leaves[1:]), parts)
    expected = torch.autograd.grad(repeated, leaves, upstream)  # through repeat_kv: summed over each group
    assert variants.relative_error(out, repeated) < 1e-12
    errors = variants.gradient_errors(grads, expected, 1e-12)
    assert max(errors) < 1e-12, dict(zip("qkv", errors, strict=True))


def _recording_kernel(monkeypatch, k: torch.Tensor) -> list[bool]:
    """Wraps the chosen kernel: for each call, whether its key tiles are a view of ``k`` itself."""
    views = []
    kernel = merged.select_kernel("cpu", torch.float64, 16)

    def forward(q_, k_, v_, causal):
        views.append(k_.untyped_storage().data_ptr() == k.untyped_storage().data_ptr() and k_.shape[0] == 2)
        return kernel.forward(q_, k_, v_, causal)

    monkeypatch.setattr(merged, "select_kernel", lambda *args: merged.Kernel(kernel.name, forward, kernel.backward))
    return views


def test_grouped_heads_read_k_and_v_as_they_are(monkeypatch):
    """No repeated K: every kernel call gets key tiles that are views of K itself, with its own KV
    head count, once per group member (anticausal parts excepted: their tiles are reversed copies)."""
    n = 50
    parts = sparse.local_parts(n, 7, True)
    q, k, v, _ = _grouped_inputs("views", n, 6, 1)
    views = _recording_kernel(monkeypatch, k)
    merged.merged_attention(q, k, v, parts)
    assert views == [part.relation != "anticausal" for part in parts] * 6
    assert any(views)


def test_grouped_heads_must_divide():
    q, k, v, _ = _grouped_inputs("divide", 16, 6, 4)
    with pytest.raises(ValueError, match="groups"):
        merged.merged_attention(q, k, v, sparse.local_parts(16, 3, False))


# --- what runs under documents and groups, as the results row says ----------------------------------

@pytest.mark.parametrize("name, layout, kv_heads, causal, expected", [
    ("local/blocked", PACKED, None, True,
     "cpu flash with lse ×16 parts, merged, in 8 packed documents"),
    ("local/blocked", PADDED, 2, True,
     "cpu flash with lse ×2 parts, merged, in 8 padded rows, no mask, each of 2 query heads per K/V head "
     "against K/V as they are"),
    ("atrous/reshape", PACKED, 1, False,
     "sdpa (no mask) over 64 residue classes, in 8 packed documents, each of 4 query heads per K/V head "
     "against K/V as they are"),
    ("local/dense", PACKED, 2, False, "sdpa with dense bool mask of pattern ∧ same document, enable_gqa"),
    ("local/dense", PADDED, None, True, "sdpa with dense bool mask of pattern ∧ real keys, one per row"),
    ("strided/flex", PACKED, 1, True, "flex_attention (torch.compile) with the document block mask, enable_gqa"),
])
def test_kernel_reports_documents_and_groups(name, layout, kv_heads, causal, expected):
    entry = variants.get(name)
    point = variants.Point(batch=1, heads=4, kv_heads=kv_heads, seq_len=8192, head_dim=64, causal=causal,
                           layout=layout, documents=Documents("equal", 8), params=entry.resolve())
    assert entry.kernel_name(point) == expected


def _decode_point(entry: variants.Entry, kv_heads: int) -> variants.Point:
    params = entry.resolve({k: v for k, v in {"window": 8, "rate": 4}.items() if k in entry.params})
    return variants.Point(heads=4, kv_heads=kv_heads, head_dim=16, seq_len=40, q_len=3, causal=True, mode="decode",
                          params=params)


# The sparse entries whose decoder runs here (not flex, CUDA only; not xformers, no CPU kernel).
SPARSE_DECODERS = [pytest.param(e, id=e.name) for e in variants.entries()
                   if e.family == "sparse" and e.variant in masks.PATTERNS and why_not(e, _decode_point(e, 2)) is None]


@pytest.mark.parametrize("kv_heads", [2, 1], ids=["gqa", "mqa"])
@pytest.mark.parametrize("entry", SPARSE_DECODERS)
def test_sparse_decoders_take_grouped_heads(entry, kv_heads):
    """A decode step of 3 new tokens against a cache of 40, with K and V of fewer heads than the
    queries, equals the reference's last rows (K and V repeated)."""
    params = _decode_point(entry, kv_heads).params
    q, k, v, _ = _grouped_inputs(f"decode-{entry.name}-{kv_heads}", 43, 4, kv_heads)
    cache = entry.decoder.prefill(k[:, :, :40], v[:, :, :40], q_len=3, **params)
    out = entry.decoder.step(q[:, :, 40:], k[:, :, 40:], v[:, :, 40:], cache, **params)
    expected = layouts.reference_attention(entry.reference, q, k, v, causal=True, **params)[:, :, 40:]
    assert variants.relative_error(out, expected) < 1e-12
