"""Decoding the shapes real models run: grouped-query heads (the cache or state per KV head, each read
once for its query group) and ragged serving batches (packed: each sequence its own cache; padded: to
the longest, with a key padding mask). Every decoding entry's step against the last rows of its own
causal forward and of its float64 reference; analytic bytes; the mask forms each kernel is given."""

from __future__ import annotations

import math
import zlib

import pytest
import torch
from support import small_params, token_extras, why_not

import variants
from variants import layouts, masks
from variants.decode import KVCache, RaggedCache, additive_bias, kv_plan
from variants.inputs import is_per_token, sliced
from variants.layouts import DENSE, PACKED, PADDED, Documents, Layout
from variants.reference import softmax_attention

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile:UserWarning")

H, D = 4, 8
HEADS = [pytest.param(None, id="mha"), pytest.param(2, id="gqa"), pytest.param(1, id="mqa")]
# Prefix lengths: dense rows all of one odd length; a ragged batch of 1, odd ones, and one on the
# chunk and residue edges of the small parameters (support.SMALL: chunk 32, window 16, rate 4 or 16).
DENSE_LENGTHS = (37, 37)
RAGGED_LENGTHS = (1, 9, 64, 37)


def decode_point(entry: variants.Entry, **fields) -> variants.Point:
    return variants.Point(**{"heads": H, "seq_len": 64, "head_dim": D, "dtype": "float64", "causal": True,
                             "mode": "decode", "params": entry.resolve(small_params(entry)), **fields})


def decoding_entries() -> list[variants.Entry]:
    """Entries with a decoder that runs here (dense, MHA: GQA and layouts are the decoders' own)."""
    return [e for e in variants.entries() if e.decoder is not None and why_not(e, decode_point(e)) is None]


def seeded(tag: str, rows: int, heads: int, tokens: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    gen = torch.Generator().manual_seed(zlib.crc32(tag.encode()))
    return torch.randn(rows, heads, tokens, D, generator=gen, dtype=torch.float64).to(dtype)


def batch(tag: str, kind: str, kv_heads: int | None, q_len: int, dtype: torch.dtype = torch.float64):
    """q, k, v of a serving batch laid out as bench.measure draws it (sequence i's prefix its first
    length_i positions, its new tokens the last q_len), the lengths and the prefill's layout."""
    lengths = DENSE_LENGTHS if kind == DENSE else RAGGED_LENGTHS
    width = max(lengths)
    q, k, v = (seeded(f"{tag}-{name}", len(lengths), heads, width + q_len, dtype)
               for name, heads in (("q", H), ("k", kv_heads or H), ("v", kv_heads or H)))
    layout = None if kind == DENSE else Layout(kind, tuple((n,) for n in lengths))
    return (q, k, v), lengths, layout


def sequence(tokens: tuple[torch.Tensor, ...], i: int, n: int, q_len: int) -> list[torch.Tensor]:
    """Sequence i alone: its prefix of n tokens and its new tokens."""
    width = tokens[0].shape[2] - q_len
    keep = torch.cat([torch.arange(n), torch.arange(width, width + q_len)])
    return [t[i:i + 1].index_select(2, keep) for t in tokens]


def sequence_extras(entry: variants.Entry, tokens: tuple[torch.Tensor, ...], i: int, n: int,
                    q_len: int) -> dict[str, torch.Tensor]:
    """The entry's extra inputs of sequence i alone (as :func:`sequence`), per-token ones selected."""
    extras = token_extras(entry, tokens[0], tokens[1])
    return {name: sequence((x,), i, n, q_len)[0] if is_per_token(x) else x for name, x in extras.items()}


def own_forward(entry: variants.Entry, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **extras) -> torch.Tensor:
    """The entry's own causal forward; K and V repeated to the query heads for a forward without
    grouped heads (decoding groups whatever the forward does)."""
    if not entry.caps.gqa:
        k, v = layouts.repeat_kv(k, q.shape[1]), layouts.repeat_kv(v, q.shape[1])
    return entry(q, k, v, causal=True, **extras, **small_params(entry))


def step(entry: variants.Entry, tokens: tuple[torch.Tensor, ...], layout: Layout | None, q_len: int):
    """The decoder's step after its prefill, with the entry's extra inputs (prefix ones to the prefill,
    the new tokens' to the step, as bench.measure passes them); the new tokens and their extras."""
    q, k, v = tokens
    width = q.shape[2] - q_len
    params = entry.resolve(small_params(entry))
    extra = {"layout": layout} if layout is not None else {}
    extras = token_extras(entry, q, k)
    cache = entry.decoder.prefill(k[:, :, :width], v[:, :, :width], q_len=q_len, **extra,
                                  **sliced(extras, (slice(None), slice(None), slice(None, width))), **params)
    new = [t[:, :, width:].contiguous() for t in tokens]
    new_extras = sliced(extras, (slice(None), slice(None), slice(width, None)))
    return entry.decoder.step(*new, cache, **new_extras, **params), cache, (new, new_extras)


CASES = [pytest.param(e, kv, kind, q_len, id=f"{e.name}-{kind}-kv{kv or H}-q{q_len}")
         for e in decoding_entries() for kv in (None, 2, 1) for kind in (DENSE, PACKED, PADDED)
         for q_len in (1, 2, 3) if kv is None or e.caps.gqa]


@pytest.mark.parametrize("entry, kv_heads, kind, q_len", CASES)
def test_step_equals_the_entry_forward_and_reference_on_every_sequence(entry, kv_heads, kind, q_len):
    tokens, lengths, layout = batch(f"{entry.name}-{kind}-{kv_heads}-{q_len}", kind, kv_heads, q_len)
    out, cache, new = step(entry, tokens, layout, q_len)
    assert out.shape == (len(lengths), H, q_len, D) and out.dtype == torch.float64
    params = entry.resolve(small_params(entry))
    for i, n in enumerate(lengths):
        seq, extras = sequence(tokens, i, n, q_len), sequence_extras(entry, tokens, i, n, q_len)
        full = own_forward(entry, *seq, **extras)[:, :, -q_len:]
        reference = layouts.reference_attention(entry.reference, *seq, causal=True, extras=extras,
                                                **params)[:, :, -q_len:]
        assert variants.relative_error(out[i:i + 1], full) <= 1e-12, f"sequence {i} (n={n}) vs the forward"
        assert variants.relative_error(out[i:i + 1], reference) <= 1e-10, f"sequence {i} (n={n}) vs the reference"
    # A step leaves the cache as it found it: the same step again gives the same output.
    new_tokens, new_extras = new
    assert torch.equal(entry.decoder.step(*new_tokens, cache, **new_extras, **params), out)


@pytest.mark.parametrize("entry", decoding_entries(), ids=lambda e: e.name)
def test_float32_grouped_ragged_step_is_within_the_entry_tolerance(entry):
    tokens, lengths, layout = batch(entry.name, PACKED, 1 if entry.caps.gqa else None, 2, torch.float32)
    out, _, _ = step(entry, tokens, layout, 2)
    params = entry.resolve(small_params(entry))
    for i, n in enumerate(lengths):
        seq = [t.double() for t in sequence(tokens, i, n, 2)]
        extras = {name: x.double() for name, x in sequence_extras(entry, tokens, i, n, 2).items()}
        expected = layouts.reference_attention(entry.reference, *seq, causal=True, extras=extras,
                                               **params)[:, :, -2:]
        assert variants.relative_error(out[i:i + 1], expected) <= entry.tolerance["float32"]


def test_every_decoder_declares_every_layout_and_names_its_kernel():
    for entry in decoding_entries():
        assert set(entry.decoder.layouts) == {DENSE, PACKED, PADDED}, entry.name
        point = decode_point(entry)
        assert entry.decoder.kernel_name(point) == entry.decoder.kernel
    eager = variants.get("standard/eager").decoder
    assert "one call per sequence" in eager.kernel_name(decode_point(variants.get("standard/eager"), layout=PACKED))
    assert "key padding mask" in eager.kernel_name(decode_point(variants.get("standard/eager"), layout=PADDED))


# --- caches: per KV head, each sequence its own or padded to the longest -------------------------

def test_caches_are_kept_per_kv_head():
    entry = variants.get("standard/eager")
    tokens, _, layout = batch("per-kv", PACKED, 1, 1)
    _, cache, _ = step(entry, tokens, layout, 1)
    assert isinstance(cache, RaggedCache) and cache.k.shape == (1, 1, sum(n + 1 for n in RAGGED_LENGTHS), D)
    # every sequence's cache a view of its own stretch of the one buffer, of its own length
    assert [c.k.shape[2] for c in cache.sequences] == [n + 1 for n in RAGGED_LENGTHS]
    assert all(c.k.untyped_storage().data_ptr() == cache.k.untyped_storage().data_ptr() for c in cache.sequences)
    tokens, _, layout = batch("per-kv", PADDED, 2, 1)
    _, padded, _ = step(entry, tokens, layout, 1)
    assert isinstance(padded, KVCache) and padded.k.shape == (4, 2, 64 + 1, D)
    linear = variants.get("linear-elu1/recurrent")
    _, state, _ = step(linear, tokens, layout, 1)
    assert state.kv.shape == (4, 2, D, D) and state.z.shape == (4, 2, D)


def test_padded_plans_left_pad_each_row_and_mask_the_padding():
    plan = kv_plan(masks.FULL_CAUSAL, (3, 1, 5), 2)
    assert plan.kept.tolist() == [[-1, -1, 0, 1, 2], [-1, -1, -1, -1, 0], [0, 1, 2, 3, 4]]
    assert plan.keys == slice(0, 7, 1) and plan.mask.shape == (3, 1, 2, 7)
    assert plan.mask[1, 0].tolist() == [[False] * 4 + [True, True, False], [False] * 4 + [True] * 3]
    assert plan.pairs == (3 + 1) + (3 + 2) + (1 + 1) + (1 + 2) + (5 + 1) + (5 + 2)
    # local: every row keeps its last w positions, fewer when shorter
    local = kv_plan(masks.pattern("local", True, window=4), (2, 10), 1)
    assert local.kept.tolist() == [[-1, -1, 0, 1], [6, 7, 8, 9]] and local.mask[0, 0, 0].tolist() == [False] * 2 + [True] * 3
    # equal lengths: the dense plan's numbers, for every row
    dense, padded = kv_plan(masks.FULL_CAUSAL, (7,), 2), kv_plan(masks.FULL_CAUSAL, (7, 7), 2)
    assert padded.pairs == 2 * dense.pairs and torch.equal(padded.mask, dense.mask.expand(2, -1, -1, -1))


def test_padding_holds_zeros_not_garbage():
    entry = variants.get("standard/sdpa-math")
    k = torch.full((2, 1, 6, D), float("nan"), dtype=torch.float64)
    k[0, :, :2] = 1.0
    k[1] = 2.0
    cache = entry.decoder.prefill(k, k, q_len=1, layout=Layout(PADDED, ((2,), (6,))))
    assert cache.k[0, 0, :4].abs().sum() == 0 and bool(cache.k[0, 0, 4:6].eq(1).all())
    out = entry.decoder.step(*(torch.ones(2, 1, 1, D, dtype=torch.float64) for _ in range(3)), cache)
    assert bool(out.isfinite().all())


# --- analytic bytes ------------------------------------------------------------------------------

def _kv_decoders():
    return [pytest.param(e, id=e.name) for e in (variants.get("standard/sdpa-math"), variants.get("local/dense"),
                                                 variants.get("atrous/dense"), variants.get("strided/dense"))]


@pytest.mark.parametrize("entry", _kv_decoders())
@pytest.mark.parametrize("kv_heads", [8, 1])
def test_grouped_caches_and_their_traffic_shrink_by_the_ratio(entry, kv_heads):
    """The cache and the keys and values a step reads and writes shrink by heads / kv_heads exactly;
    the queries read and outputs written are the query heads'. FLOPs are the query heads'."""
    mha = variants.Point(batch=2, heads=32, seq_len=1000, head_dim=64, dtype="bfloat16", causal=True,
                         mode="decode", q_len=3, params=entry.resolve())
    gqa = variants.Point(**{**mha.__dict__, "kv_heads": kv_heads})
    ratio = 32 // kv_heads
    decoder = entry.decoder
    assert decoder.cache_bytes(gqa) * ratio == decoder.cache_bytes(mha)
    queries = 2 * 2 * 32 * 3 * 64 * 2  # q read, output written: batch · heads · q_len · d · 2 bytes each
    assert (decoder.bytes_moved(gqa) - queries) * ratio == decoder.bytes_moved(mha) - queries
    assert decoder.flops(gqa) == decoder.flops(mha)


def test_ragged_bytes_sum_the_real_lengths_and_padded_ones_take_the_longest():
    entry = variants.get("standard/eager")
    point = variants.Point(batch=8, heads=8, kv_heads=2, seq_len=4096, head_dim=64, dtype="float16", causal=True,
                           mode="decode", q_len=2, documents=Documents("uniform", seed=1))
    packed, padded = (variants.Point(**{**point.__dict__, "layout": kind}) for kind in (PACKED, PADDED))
    lengths = layouts.sequences(packed)
    assert len(lengths) == 8 and sum(lengths) == 8 * 4096 and len(set(lengths)) > 1
    per_token = 2 * 2 * 64 * 2  # K and V, per KV head, float16
    decoder = entry.decoder
    assert decoder.cache_bytes(packed) == per_token * sum(lengths)
    assert decoder.cache_bytes(padded) == per_token * 8 * max(lengths)
    queries = 2 * 8 * 8 * 2 * 64 * 2
    assert decoder.bytes_moved(packed) == per_token * sum(n + 2 + 2 for n in lengths) + queries
    assert decoder.bytes_moved(padded) == per_token * 8 * (max(lengths) + 2 + 2) + queries
    pairs = sum(2 * n + 3 for n in lengths)  # each new token sees the prefix and the new ones up to itself
    assert decoder.flops(packed) == decoder.flops(padded) == 4.0 * 8 * 64 * pairs
    assert decoder.cache_bytes(point) == per_token * 8 * 4096  # dense: every row the mean length


def test_ragged_local_caches_hold_at_most_the_window():
    entry = variants.get("local/dense")
    point = variants.Point(batch=4, heads=2, seq_len=100, head_dim=16, causal=True, mode="decode", layout=PACKED,
                           documents=Documents("multinomial", seed=0), params=entry.resolve({"window": 64}))
    lengths = layouts.sequences(point)
    per_token = 2 * 2 * 16 * 4
    assert entry.decoder.cache_bytes(point) == per_token * sum(min(n, 64) for n in lengths)
    padded = variants.Point(**{**point.__dict__, "layout": PADDED})
    assert entry.decoder.cache_bytes(padded) == per_token * 4 * min(max(lengths), 64)


def test_linear_states_are_per_sequence_and_kv_head_whatever_the_lengths():
    linear = variants.get("performer/recurrent")
    point = variants.Point(batch=4, heads=8, seq_len=512, head_dim=32, causal=True, mode="decode",
                           params=linear.resolve({"features": 64}))
    per_state = (64 * 32 + 64) * 4
    decoder = linear.decoder
    for kv_heads in (None, 2):
        for kind in (DENSE, PACKED, PADDED):
            p = variants.Point(**{**point.__dict__, "kv_heads": kv_heads, "layout": kind, "documents": Documents()})
            assert decoder.cache_bytes(p) == 4 * (kv_heads or 8) * per_state
            assert decoder.bytes_moved(p) == 2 * decoder.cache_bytes(p) + 2 * 4 * (8 + (kv_heads or 8)) * 32 * 4


# --- the mask forms each kernel is given ----------------------------------------------------------

def test_grouped_sdpa_steps_fold_the_group_unless_the_new_tokens_masks_differ(monkeypatch):
    """One new token (or one mask for all of them): the query group folded into rows, no enable_gqa
    (which the math backend runs by repeating K and V); several masked ones: enable_gqa."""
    import torch.nn.functional as F

    calls = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, enable_gqa=False, **kwargs):
        calls.append((q.shape[1], k.shape[1], enable_gqa))
        return real(q, k, v, attn_mask=attn_mask, enable_gqa=enable_gqa, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    entry = variants.get("standard/sdpa-math")
    for kind, q_len, expected in ((DENSE, 1, (2, 2, False)), (PADDED, 1, (2, 2, False)), (DENSE, 3, (4, 2, True)),
                                  (PADDED, 2, (4, 2, True))):
        tokens, _, layout = batch("spy", kind, 2, q_len)
        calls.clear()
        step(entry, tokens, layout, q_len)
        assert calls == [expected], (kind, q_len)


def test_a_causal_bias_under_grouped_heads_gives_the_step():
    """CUDA's flash and efficient backends take a lower-right CausalBias with enable_gqa; on CPU it
    runs materialised, which checks the form and the grouping together."""
    from torch.nn.attention import SDPBackend
    from torch.nn.attention.bias import causal_lower_right

    from variants.standard import _sdpa_attend

    plan = kv_plan(masks.FULL_CAUSAL, (20,), 3)
    q, k, v = seeded("bias-q", 1, 4, 3), seeded("bias-k", 1, 2, 23), seeded("bias-v", 1, 2, 23)
    got = _sdpa_attend(SDPBackend.MATH)(q, k, v, causal_lower_right(3, 23))
    expected = _sdpa_attend(SDPBackend.MATH)(q, k, v, plan.mask)
    assert variants.relative_error(got, expected) < 1e-14
    reference = softmax_attention(q, layouts.repeat_kv(k, 4), layouts.repeat_kv(v, 4), plan.mask[0, 0])
    assert variants.relative_error(got, reference) < 1e-12


def test_padded_masks_stay_boolean_where_one_sequence_gets_a_causal_bias():
    from types import SimpleNamespace

    from torch.nn.attention import SDPBackend
    from torch.nn.attention.bias import CausalBias

    from variants.standard import _decode_mask_of

    cuda = SimpleNamespace(is_cuda=True)
    one = kv_plan(masks.FULL_CAUSAL, (10,), 3).mask
    padded = kv_plan(masks.FULL_CAUSAL, (10, 4), 3).mask
    assert isinstance(_decode_mask_of(SDPBackend.FLASH_ATTENTION)(one, cuda, {}), CausalBias)
    assert _decode_mask_of(SDPBackend.FLASH_ATTENTION)(padded, cuda, {}) is padded


def test_an_additive_bias_is_the_boolean_mask_with_aligned_rows():
    mask = kv_plan(masks.FULL_CAUSAL, (5, 2), 2).mask
    bias = additive_bias(mask, torch.float16)
    assert bias.shape == mask.shape and bias.dtype == torch.float16 and bias.stride(-2) % 16 == 0
    assert torch.equal(bias == 0, mask) and bool(bias[~mask].eq(float("-inf")).all())


def fake_memory_efficient_attention(q, k, v, attn_bias=None):
    """xformers' documented semantics in its 5-D layout (B, M, G, H, K), for the glue's tests here
    (no xformers kernel runs on CPU): a bias class materialised to (B, G, H, M, N), a tensor added."""
    assert q.ndim == k.ndim == v.ndim == 5
    if q.shape[3] > 1:
        assert k.stride(3) == v.stride(3) == 0  # K and V expanded over the group, not copied
    qh, kh, vh = (x.permute(0, 2, 3, 1, 4) for x in (q, k, v))  # (B, G, H, seq, K)
    scores = qh @ kh.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if isinstance(attn_bias, torch.Tensor):
        assert attn_bias.shape == scores.shape and attn_bias.stride(-2) % 16 == 0
        scores = scores + attn_bias
    elif attn_bias is not None:
        scores = scores + attn_bias.materialize(scores.shape, dtype=scores.dtype, device=scores.device)
    return (torch.softmax(scores, -1) @ vh).permute(0, 3, 1, 2, 4)


@pytest.mark.parametrize("name", ["standard/xformers", "local/xformers"])
@pytest.mark.parametrize("kv_heads", [None, 2, 1])
@pytest.mark.parametrize("kind", [DENSE, PACKED, PADDED])
def test_xformers_steps_group_heads_in_its_five_dimensional_layout(monkeypatch, name, kv_heads, kind):
    xops = pytest.importorskip("xformers.ops")
    monkeypatch.setattr(xops, "memory_efficient_attention", fake_memory_efficient_attention)
    entry = variants.get(name)
    params = entry.resolve(small_params(entry))
    for q_len in (1, 3):
        tokens, lengths, layout = batch(f"{name}-{kind}-{kv_heads}", kind, kv_heads, q_len)
        out, _, _ = step(entry, tokens, layout, q_len)
        for i, n in enumerate(lengths):
            seq = sequence(tokens, i, n, q_len)
            reference = layouts.reference_attention(entry.reference, *seq, causal=True, extras={},
                                                    **params)[:, :, -q_len:]
            assert variants.relative_error(out[i:i + 1], reference) <= 1e-10, (q_len, i, n)


def test_a_sdpa_decode_probe_runs_the_step_of_the_point_kind():
    """The probe runs the decoder itself (its masks and grouping), here on CPU where every kind runs."""
    entry = variants.get("standard/sdpa-flash")
    for kind in (DENSE, PACKED, PADDED):
        for kv_heads in (None, 1):
            point = decode_point(entry, kv_heads=kv_heads, layout=kind, documents=Documents(), q_len=3,
                                 dtype="float32", seq_len=4096)
            assert why_not(entry, point) is None, (kind, kv_heads)


def test_the_decode_layouts_of_a_point_are_those_its_sequences_give():
    """What the bytes use (layouts.sequences) is what measure's prefill gets (one sequence per row)."""
    point = variants.Point(batch=5, heads=2, seq_len=300, head_dim=8, causal=True, mode="decode", layout=PADDED,
                           documents=Documents("uniform", seed=2))
    layout = layouts.layout_of(point)
    assert [row[0] for row in layout.lengths] == layouts.sequences(point) and len(layout.lengths) == 5


def test_a_grouped_padded_decode_point_is_measured():
    from bench.measure import MeasureSettings, measure

    entry = variants.get("standard/eager")
    point = variants.Point(batch=3, heads=4, kv_heads=1, seq_len=96, head_dim=16, causal=True, mode="decode",
                           layout=PADDED, documents=Documents("uniform", seed=1), q_len=2, params=entry.resolve())
    row = measure(entry, point, MeasureSettings(warmup_s=0, target_s=0.01, min_reps=3, max_reps=5))
    assert row["status"] == "ok" and row["err_ref"] < 1e-5, row.get("reason")
    assert row["cache_bytes"] == 2 * 1 * 16 * 4 * 3 * max(layouts.sequences(point))  # K, V of one KV head, padded
