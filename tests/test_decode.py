"""Decoding: every entry's step against its cache equals the last rows of its own causal forward and
of its float64 reference; caches, plans and analytic bytes; the decode mode through spec, plan,
measure and report."""

from __future__ import annotations

import zlib
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
from support import token_extras, why_not

import variants
from bench import plan, spec
from bench.errors import BadInput
from bench.measure import MeasureSettings, measure
from bench.report import render
from bench.store import COLUMNS
from variants import masks
from variants.decode import kv_plan
from variants.inputs import sliced

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile:UserWarning")

B, H, D = 2, 3, 16
# Small parameters, so that short prefixes already hold several windows and residue classes.
SMALL = {"window": 8, "rate": 4, "features": 32, "chunk": 16, "proj_len": 16, "sinks": 3}
SMALL_STRIDED = {"window": 6, "rate": 8}


def small_params(entry: variants.Entry) -> dict:
    table = SMALL_STRIDED if entry.variant == "strided" else SMALL
    return {k: table[k] for k in entry.params}


def decode_point(entry: variants.Entry, n: int, q_len: int, dtype: str = "float64") -> variants.Point:
    return variants.Point(batch=B, heads=H, seq_len=n, head_dim=D, dtype=dtype, causal=True, mode="decode",
                          params=entry.resolve(small_params(entry)), q_len=q_len)


def decoding_entries() -> list[variants.Entry]:
    """Entries with a decoder that can run here (others are covered by the reason tests below)."""
    return [e for e in variants.entries() if e.decoder is not None
            and why_not(e, decode_point(e, 64, 1)) is None]


def tokens(tag: str, n: int, dtype: torch.dtype = torch.float64) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(zlib.crc32(tag.encode()))
    return [torch.randn(B, H, n, D, generator=gen, dtype=torch.float64).to(dtype) for _ in range(3)]


@pytest.mark.parametrize("entry", decoding_entries(), ids=lambda e: e.name)
def test_float32_step_is_within_the_entry_tolerance(entry):
    params = entry.resolve(small_params(entry))
    q, k, v = tokens(entry.name, 200 + 1, torch.float32)
    extras = token_extras(entry, q, k)
    prefix, new = (slice(None), slice(None), slice(None, 200)), (slice(None), slice(None), slice(200, None))
    cache = entry.decoder.prefill(k[prefix], v[prefix], q_len=1, **sliced(extras, prefix), **params)
    out = entry.decoder.step(q[new], k[new], v[new], cache, **sliced(extras, new), **params)
    expected = entry.reference(*(t.double() for t in (q, k, v)), causal=True,
                               **{name: x.double() for name, x in extras.items()}, **params)[:, :, 200:]
    assert variants.relative_error(out, expected) <= entry.tolerance["float32"]


def test_every_family_that_can_be_causal_decodes_here():
    families = {e.family for e in decoding_entries()}
    assert {"standard", "baseline", "linear"} <= families
    names = {e.name for e in decoding_entries()}
    assert {"standard/eager", "standard/sdpa-flash", "linear-elu1/recurrent", "performer/chunked"} <= names


@pytest.mark.parametrize("name", ["linformer/projected", "linear-softmax-qk/linear", "linear-elu1/linear"])
def test_non_causal_entries_refuse_decode_with_their_reason(name):
    entry = variants.get(name)
    reason = why_not(entry, decode_point(entry, 64, 1))
    assert reason and reason.startswith("causal not supported:") and entry.decoder is None


def test_a_decoder_needs_causal_support():
    donor = variants.get("standard/eager")
    with pytest.raises(ValueError, match="needs causal support"):
        variants.Entry("x", "y", "standard", donor.forward, donor.reference, donor.flops,
                       caps=variants.Capabilities(causal=frozenset({False})), decoder=donor.decoder)


# --- caches and plans, derived from the mask function ---------------------------------------------

def test_plans_keep_what_the_pattern_can_still_reach_and_read_views():
    local = kv_plan(masks.pattern("local", True, window=8), (50,), 1)
    assert local.kept.tolist() == [list(range(42, 50))]  # the last w prefix positions
    assert local.keys == slice(0, 9, 1) and local.mask is None and local.pairs == 9
    atrous = kv_plan(masks.pattern("atrous", True, rate=4), (50,), 1)
    assert atrous.width == 50  # every residue class is reached by a later query
    assert atrous.keys == slice(2, 51, 4) and atrous.mask is None  # position 50's class, as a view
    standard = kv_plan(masks.FULL_CAUSAL, (50,), 3)
    assert standard.keys == slice(0, 53, 1) and standard.pairs == 3 * 50 + 6
    assert standard.mask.tolist() == [[[[True] * 51 + [False] * 2, [True] * 52 + [False], [True] * 53]]]
    strided = kv_plan(masks.pattern("strided", True, window=6, rate=8), (50,), 1)
    assert isinstance(strided.keys, torch.Tensor)  # a window and a residue class: gathered
    assert strided.keys.tolist() == [2, 10, 18, 26, 34, 42, 44, 45, 46, 47, 48, 49, 50]


@pytest.mark.parametrize("kind, params", [("local", {"window": 5}), ("atrous", {"rate": 3}),
                                          ("strided", {"window": 4, "rate": 5})])
def test_reachable_keys_match_a_brute_force_over_many_later_queries(kind, params):
    pattern = masks.pattern(kind, True, **params)
    for n in (1, 7, 30):
        later = masks.dense_mask(pattern.mask, n + 40, n + 40)[n:, :n].any(0)
        assert masks.reachable_keys(pattern, n).tolist() == later.nonzero().flatten().tolist()


def test_analytic_cache_and_traffic():
    point = variants.Point(batch=2, heads=4, seq_len=1000, head_dim=64, dtype="bfloat16", causal=True,
                           mode="decode", q_len=1)
    standard = variants.get("standard/sdpa-math").decoder
    assert standard.cache_bytes(point) == 2 * 2 * 4 * 1000 * 64 * 2  # K and V of every prefix token
    assert standard.bytes_moved(point) == 2 * 4 * 64 * 2 * (2 * 1001 + 2 + 2)
    assert standard.flops(point) == 4.0 * 2 * 4 * 64 * 1001
    entry = variants.get("local/blocked")
    local = entry.decoder
    window = variants.Point(**{**point.__dict__, "params": entry.resolve({"window": 256})})
    assert local.cache_bytes(window) == 2 * 2 * 4 * 256 * 64 * 2
    linear = variants.get("linear-elu1/recurrent").decoder
    assert linear.cache_bytes(point) == 2 * 4 * (64 * 64 + 64) * 4  # the state, in float32
    assert linear.cache_bytes(point) == linear.cache_bytes(variants.Point(**{**point.__dict__, "seq_len": 10 ** 6}))


# --- the mode through spec, plan, measure and report --------------------------------------------------

def test_decode_grid_from_toml_and_flags():
    text = """
    [sweep]
    variants = ["standard/eager"]
    seq_lens = [128]
    modes = ["fwd", "decode"]
    causal = [false]
    [decode]
    variants = ["linear-elu1/recurrent"]
    seq_lens = [1024, 4096]
    batch_sizes = [1, 8]
    q_len = 2
    """
    loaded = spec.validate(spec.from_toml(text, "test"))
    tasks = plan.expand(loaded, "cpu")
    fwd = [t for t in tasks if t.point.mode == "fwd"]
    decode = [t for t in tasks if t.point.mode == "decode"]
    assert [(t.name, t.point.seq_len, t.point.causal) for t in fwd] == [("standard/eager", 128, False)]
    assert sorted((t.name, t.point.seq_len, t.point.batch, t.point.q_len, t.point.causal) for t in decode) == [
        ("linear-elu1/recurrent", n, b, 2, True) for n in (1024, 4096) for b in (1, 8)]
    assert len({t.fields()["key"] for t in tasks}) == len(tasks)
    assert all(t.fields()["q_len"] == 2 for t in decode) and fwd[0].fields()["q_len"] is None
    # A length given on the command line is every length; --q-len sets the decode grid's.
    flagged = spec.override(loaded, seq_lens=(256,), q_len=4, variants=("standard/eager",))
    decode = [t for t in plan.expand(spec.validate(flagged), "cpu") if t.point.mode == "decode"]
    assert {(t.name, t.point.seq_len, t.point.q_len) for t in decode} == {("standard/eager", 256, 4)}


@pytest.mark.parametrize("table, message", [
    ("[decode]\nq_len = 0", "q_len: 0 is not a positive integer"),
    ("[decode]\nseq_lens = 4096", "decode.seq_lens must be a list"),
    ("[decode]\nvariants = [\"nope\"]", "unknown variant 'nope'"),
    ("[decode]\nwindow = 3", "unknown key decode.window"),
])
def test_bad_decode_tables_are_refused_with_the_value(table, message):
    text = '[sweep]\nvariants = ["standard/eager"]\nseq_lens = [64]\nmodes = ["decode"]\n' + table
    with pytest.raises(BadInput, match=message):
        spec.validate(spec.from_toml(text, "test"))


def test_measured_decode_row_has_its_columns():
    entry = variants.get("linear-elu1/recurrent")
    point = variants.Point(batch=1, heads=2, seq_len=512, head_dim=16, causal=True, mode="decode",
                           params=entry.resolve(), q_len=1)
    row = measure(entry, point, MeasureSettings(warmup_s=0, target_s=0.01, min_reps=3, max_reps=20))
    assert row["status"] == "ok" and row["kernel"] == entry.decoder.kernel_name(point)
    assert row["err_ref"] < 1e-5
    assert row["cache_bytes"] == entry.decoder.cache_bytes(point) and row["bytes_moved"] > row["cache_bytes"]
    assert row["gbps"] == pytest.approx(row["bytes_moved"] / (row["time_ms"] * 1e-3) / 1e9)
    assert row["tokens_per_s"] == pytest.approx(1 / (row["time_ms"] * 1e-3))
    assert row["pct_bandwidth"] is None  # a CPU has no datasheet bandwidth here
    assert row["flops"] == entry.decoder.flops(point)


def test_report_has_a_decode_section():
    rows = []
    for variant, impl, family, time_at, cache_at in (
            ("standard", "sdpa-flash", "baseline", lambda n: 1e-4 * n, lambda n: 512 * n),
            ("linear-elu1", "recurrent", "linear", lambda n: 2.0, lambda n: 66560)):
        for n in (1024, 4096, 16384, 65536):
            time_ms = time_at(n)
            rows.append({"kind": "kernel", "variant": variant, "impl": impl, "family": family, "params": "{}",
                         "mode": "decode", "causal": True, "batch": 1, "heads": 4, "seq_len": n, "head_dim": 64,
                         "dtype": "float32", "device": "cpu", "q_len": 1, "status": "ok", "time_ms": time_ms,
                         "time_ms_p20": time_ms, "time_ms_p80": time_ms, "noisy": False,
                         "peak_mem_bytes": 1000, "cache_bytes": cache_at(n), "bytes_moved": cache_at(n),
                         "gbps": cache_at(n) / time_ms / 1e6, "run_id": "dec", "device_name": "cpu"})
    text = render(pd.DataFrame(rows).reindex(columns=list(COLUMNS)))
    section = text[text.index('id="decode"'):]
    section = section[:section.index("</section>")]
    assert "decode · causal · float32 · d=64" in section and section.count("<svg") == 1
    # elu+1's 2 ms step overtakes 1e-4·n ms between 16,384 (1.64 ms) and 65,536 (6.6 ms)
    assert "n ≈ 2" in section and "linear-elu1/recurrent" in section
    assert "3.3×" in section  # 6.5536 / 2 at n = 65,536
    assert "Time and memory" in text and 'data-panel="decode' not in text[:text.index('id="decode"')]


@pytest.mark.parametrize("name, tflops, tbps", [
    ("NVIDIA H100 80GB HBM3", 989.4, 3.35), ("NVIDIA H200", 989.4, 4.8),
    ("NVIDIA GH200 480GB", 989.4, 4.0), ("NVIDIA GH200 144G HBM3e", 989.4, 4.9), ("NVIDIA B200", 2250.0, 7.7),
    ("NVIDIA A100-SXM4-80GB", 312.0, 2.039), ("NVIDIA A100-SXM4-40GB", 312.0, 1.555),
    ("NVIDIA L40S", 362.05, 0.864), ("NVIDIA GeForce RTX 4090", 165.2, 1.008),
    # other parts of a model, parts whose name contains a model's, and slices: no figure at all
    ("NVIDIA H100 PCIe", None, None), ("NVIDIA H100 NVL", None, None), ("NVIDIA H100", None, None),
    ("NVIDIA H200 NVL", None, None), ("NVIDIA GB200", None, None), ("NVIDIA A100-PCIE-40GB", None, None),
    ("NVIDIA A100 80GB PCIe", None, None), ("NVIDIA L40", None, None), ("NVIDIA GeForce RTX 4090 D", None, None),
    ("NVIDIA GeForce RTX 4090 Laptop GPU", None, None), ("NVIDIA H100 80GB HBM3 MIG 1g.10gb", None, None),
    ("", None, None),
])
def test_peak_tables_match_only_the_parts_they_describe(name, tflops, tbps):
    from bench.env import device_peaks

    peaks = device_peaks(name)
    assert (peaks.tflops["bfloat16"] if peaks else None) == tflops
    assert (peaks.bandwidth_tbps if peaks else None) == tbps


def test_float32_is_measured_against_tf32_peak_where_tf32_was_allowed(monkeypatch):
    from bench.device import peak_tflops

    h100 = SimpleNamespace(model="NVIDIA H100 80GB HBM3")
    assert peak_tflops(h100, "float32", tf32=False) == 66.9
    assert peak_tflops(h100, "float32", tf32=True) == 494.7
    assert peak_tflops(h100, "bfloat16", tf32=None) == 989.4
    assert peak_tflops(SimpleNamespace(model=""), "float32", tf32=True) is None


def test_standard_decode_masks_take_the_form_each_backend_runs_fastest():
    """Several new tokens: a CausalBias where the CUDA kernels align it lower-right natively, the
    boolean mask elsewhere (CausalBias would materialise one at every step there); built at prefill."""
    from types import SimpleNamespace

    from torch.nn.attention import SDPBackend
    from torch.nn.attention.bias import CausalBias

    from variants.standard import _decode_mask_of

    mask = kv_plan(masks.FULL_CAUSAL, (10,), 3).mask
    cuda, cpu = SimpleNamespace(is_cuda=True), SimpleNamespace(is_cuda=False)
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
        assert isinstance(_decode_mask_of(backend)(mask, cuda, {}), CausalBias)
    for backend, keys in ((SDPBackend.MATH, cuda), (SDPBackend.CUDNN_ATTENTION, cuda), (SDPBackend.FLASH_ATTENTION, cpu)):
        assert _decode_mask_of(backend)(mask, keys, {}) is mask
    assert _decode_mask_of(SDPBackend.FLASH_ATTENTION)(None, cuda, {}) is None
    entry = variants.get("standard/sdpa-flash")
    k = torch.randn(1, 1, 10, 16)
    assert entry.decoder.prefill(k, k, q_len=3).mask is not None  # built once, kept in the cache


def test_local_xformers_decode_bias_allows_exactly_the_plan():
    xformers_bias = pytest.importorskip("xformers.ops.fmha.attn_bias")
    from variants.sparse import _local_window_bias

    for n, window, q_len in ((50, 8, 3), (5, 8, 3), (64, 16, 4)):
        plan = kv_plan(masks.pattern("local", True, window=window), (n,), q_len)
        name, kwargs = _local_window_bias(plan.mask, torch.empty(0), {"window": window})
        bias = getattr(xformers_bias, name)(**dict(kwargs)).materialize((q_len, plan.keys_read))
        assert torch.equal(bias == 0, plan.mask[0, 0]), (n, window, q_len)
