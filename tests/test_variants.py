"""Every registered entry against its float64 reference (forward and gradients), the structure-exploiting
impls against their dense forms, the linear-attention identities, unsupported reasons, the registry
and FLOPs. CPU only; small shapes so the suite stays fast."""

from __future__ import annotations

import zlib

import pytest
import torch
from support import builtin_entries, small_params, token_extras, why_not

import variants
from variants import Point, linear

pytestmark = pytest.mark.filterwarnings(
    "ignore:flex_attention called without torch.compile:UserWarning")

B, H, D = 2, 2, 16
LONG, SHORT = 232, 50  # 232 = 8·29 is a multiple of no block/chunk size used; 50 is shorter than most
DTYPES = ("float64", "float32")


def seeded(tag: str) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(tag.encode()))


def inputs(tag: str, n: int, b: int = B, h: int = H, d: int = D, count: int = 4, scale: float = 1.0):
    gen = seeded(tag)
    return [torch.randn(b, h, n, d, generator=gen, dtype=torch.float64) * scale for _ in range(count)]


def grads(fn, tensors, upstream, **kwargs):
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*leaves, **kwargs)
    return out, torch.autograd.grad(out, leaves, upstream.to(out.dtype))


def point(entry, *, n=LONG, dtype="float64", causal=False, mode="fwd", params=None) -> Point:
    return Point(batch=B, heads=H, seq_len=n, head_dim=D, dtype=dtype, device="cpu", causal=causal,
                 mode=mode, params=entry.resolve(params or {}))


# --- every entry against its float64 reference ----------------------------------------------------------

def _reference_cases():
    """The cases each entry declares it supports here, as xformers builds its tests from
    ``op.supports``: a refused case is not a skipped test but a checked refusal (below)."""
    cases = []
    for entry in builtin_entries():
        for n, which in ((LONG, "small"), (SHORT, "small"), (300, "defaults")):
            params = small_params(entry) if which == "small" else {}
            for dtype in DTYPES:
                for causal in (False, True):
                    if why_not(entry, point(entry, n=n, dtype=dtype, causal=causal, params=params)) is None:
                        cid = f"{entry.name}-n{n}-{which}-{dtype}-{'causal' if causal else 'bidir'}"
                        cases.append(pytest.param(entry, n, which, dtype, causal, id=cid))
    return cases


def _refusals():
    """Every (entry, dtype, causal, mode) refused on this CPU, with the capability it lacks."""
    for entry in builtin_entries():
        for dtype in DTYPES:
            for causal in (False, True):
                for mode in ("fwd", "fwd_bwd"):
                    p = point(entry, dtype=dtype, causal=causal, mode=mode)
                    if why_not(entry, p) is not None:
                        yield pytest.param(entry, p, id=f"{entry.name}-{dtype}-{mode}-{'causal' if causal else 'bidir'}")


@pytest.mark.parametrize("entry, p", list(_refusals()))
def test_each_refusal_says_why(entry, p):
    """A refused point's reason names what is missing: the device, the masking, the dtype, a package,
    or (for capabilities only trying can tell: SDPA backends, xformers' dispatcher) the probe's words."""
    reason = why_not(entry, p)
    assert isinstance(reason, str) and len(reason) > 20, reason
    caps = entry.caps
    if "cpu" not in caps.devices:
        assert reason.startswith("device=cpu not supported"), reason
        assert caps.device_reason in reason
    elif p.causal not in caps.causal:
        assert reason.startswith("causal not supported" if p.causal else "non-causal not supported"), reason
        assert caps.causal_reason in reason
    elif p.dtype not in caps.dtypes:
        assert reason.startswith(f"dtype={p.dtype} not supported"), reason
    else:  # decided by trying, after every declared capability passed
        assert entry.caps.probe is not None, (entry.name, reason)


@pytest.mark.parametrize("entry, n, which, dtype, causal", _reference_cases())
def test_entry_matches_its_float64_reference(entry, n, which, dtype, causal):
    params = small_params(entry) if which == "small" else {}
    backward = why_not(entry, point(entry, n=n, dtype=dtype, causal=causal, mode="fwd_bwd",
                                       params=params)) is None
    q, k, v, upstream = inputs(f"{entry.name}-{n}-{which}-{causal}", n)
    extras = token_extras(entry, q, k)  # gates, β: float64 here, at least float32 to the entry

    # Reference: float64, from float64 copies of the inputs, through the declared signature.
    expected, expected_grads = grads(entry.reference, (q, k, v), upstream, causal=causal, **extras,
                                     **entry.resolve(params))
    assert expected.dtype == torch.float64 and expected.shape == q.shape

    torch_dtype = variants.DTYPES[dtype]
    leaves = [t.to(torch_dtype).requires_grad_(backward) for t in (q, k, v)]
    given = {name: x.to(torch.promote_types(torch_dtype, torch.float32)) for name, x in extras.items()}
    out = entry(*leaves, causal=causal, **given, **params)
    assert out.dtype == torch_dtype and out.shape == q.shape
    tol = entry.tolerance[dtype]
    err = variants.relative_error(out, expected)
    assert err <= tol, f"{entry.name} forward: relative error {err:.3e} > {tol:.0e}"
    if not backward:
        return
    got_grads = torch.autograd.grad(out, leaves, upstream.to(torch_dtype))
    for name, got, exp in zip("qkv", got_grads, expected_grads, strict=True):
        assert torch.linalg.vector_norm(exp) > 0
        err = variants.relative_error(got, exp)
        assert err <= tol, f"{entry.name} d{name}: relative error {err:.3e} > {tol:.0e}"


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_variant_is_runnable_on_cpu(dtype):
    """The reference test above must not be skipped into meaninglessness: every variant has an impl that
    runs forward and one that runs forward+backward on CPU, for each dtype, causal or not."""
    builtin = builtin_entries()
    for variant in dict.fromkeys(e.variant for e in builtin):
        impls = [e for e in builtin if e.variant == variant]
        for mode in ("fwd", "fwd_bwd"):
            runnable = [(e.name, c) for e in impls for c in (False, True)
                        if why_not(e, point(e, dtype=dtype, causal=c, mode=mode)) is None]
            assert runnable, f"{variant}: nothing runs {mode} in {dtype} on CPU"
    runnable = [e for e in builtin
                if any(why_not(e, point(e, dtype=dtype, causal=c)) is None for c in (False, True))]
    assert len(runnable) >= len(builtin) / 2
    assert {e.family for e in runnable} == {e.family for e in builtin}


def test_cpu_backward_of_flex_is_declared_unsupported():
    """Flex on CPU has no backward: that must be visible through not_supported_reasons(), not only in the name
    (the reference test above relies on it to test such entries forward only, or not at all)."""
    flex = [e for e in builtin_entries() if e.impl == "flex"]
    assert {e.variant for e in flex} == {"local", "atrous", "strided", "sinks", "sink-logit", "based"}
    for e in flex:
        for mode in ("bwd", "fwd_bwd"):
            reason = why_not(e, point(e, mode=mode))
            assert isinstance(reason, str) and reason, (e.name, mode)


@pytest.mark.parametrize("n", [SHORT, LONG])
@pytest.mark.parametrize("entry, causal", [pytest.param(e, c, id=f"{e.name}-{'causal' if c else 'bidir'}")
                                           for e in builtin_entries() if e.impl == "flex" for c in (False, True)
                                           if c in e.caps.causal])
def test_eager_flex_forward_on_cpu_matches_reference(entry, n, causal):
    """Eager (unfused) FlexAttention with the block mask, run directly on CPU whatever not_supported_reasons()
    says for timing: the block mask must select exactly the pattern. Forward only (no CPU backward)."""
    params = small_params(entry)
    if causal not in entry.caps.causal:
        pytest.skip(entry.caps.causal_reason)
    q, k, v, _ = inputs(f"flex-{entry.name}-{n}-{causal}", n)
    extras = token_extras(entry, q, k)
    expected = entry.reference(q, k, v, causal=causal, **extras, **entry.resolve(params))
    for dtype in DTYPES:
        out = entry(*(t.to(variants.DTYPES[dtype]) for t in (q, k, v)), causal=causal, **extras, **params)
        err = variants.relative_error(out, expected)
        assert err <= entry.tolerance[dtype], (dtype, err)


# --- structure-exploiting impls equal their dense (masked SDPA) forms ------------------------------------

STRUCTURED = [
    ("local", "blocked", [{"window": w} for w in (0, 1, 16, 63, 64, 65, 400)]),
    ("atrous", "reshape", [{"rate": r} for r in (1, 2, 4, 7, 64, 500)]),
    ("strided", "merged", [{"window": w, "rate": r} for w in (0, 8, 64, 100) for r in (1, 3, 16, 200)]),
]


def _structured_cases():
    for kind, impl, param_list in STRUCTURED:
        for n in (1, 7, 64, 129, 232, 300):
            yield pytest.param(kind, impl, n, param_list, id=f"{kind}/{impl}-n{n}")


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("kind, impl, n, param_list", list(_structured_cases()))
def test_structured_impl_equals_dense(kind, impl, n, param_list, causal):
    fast, dense = variants.get(kind, impl), variants.get(kind, "dense")
    q, k, v, upstream = inputs(f"structured-{kind}-{n}-{causal}", n, b=1)
    for params in param_list:
        out, g = grads(fast, (q, k, v), upstream, causal=causal, **params)
        ref, rg = grads(dense, (q, k, v), upstream, causal=causal, **params)
        assert variants.relative_error(out, ref) < 1e-10, (params, variants.relative_error(out, ref))
        # dq and dk vanish when every row sees only itself: judged at the scale of the gradients beside them
        errors = variants.gradient_errors(g, rg, 1e-10)
        assert max(errors) <= 1e-10, (params, dict(zip("qkv", errors, strict=True)))


# --- linear attention ---------------------------------------------------------------------------------

MAPS = [pytest.param(f, id=f.name) for f in linear.FEATURE_MAPS]


def _map_params(fmap, which):
    if "features" in fmap.params:
        return {"features": 64} if which == "small" else {}
    return {}


@pytest.mark.parametrize("n", [1, 7, 100, 232])
@pytest.mark.parametrize("which", ["small", "defaults"])
@pytest.mark.parametrize("fmap", MAPS)
def test_linear_impls_equal_quadratic(fmap, which, n):
    params = _map_params(fmap, which)
    q, k, v, _ = inputs(f"linear-{fmap.name}-{n}", n)
    quadratic = variants.get(fmap.name, "quadratic")
    compared = 0
    # non-causal: linear
    expected = quadratic(q, k, v, causal=False, **params)
    assert torch.isfinite(expected).all()
    assert variants.relative_error(variants.get(fmap.name, "linear")(q, k, v, causal=False, **params),
                                   expected) < 1e-10
    compared += 1
    if fmap.causal_reason:
        return
    # causal: recurrent, and chunked with chunk sizes dividing n or not, and larger than n
    expected = quadratic(q, k, v, causal=True, **params)
    err = variants.relative_error(variants.get(fmap.name, "recurrent")(q, k, v, causal=True, **params),
                                  expected)
    assert err < 1e-10
    for chunk in (1, 7, 32, n, n + 268):
        got = variants.get(fmap.name, "chunked")(q, k, v, causal=True, chunk=chunk, **params)
        assert got.shape == q.shape
        err = variants.relative_error(got, expected)
        assert err < 1e-10, f"chunk={chunk}: {err:.3e}"
        compared += 1
    assert compared == 6


def test_causal_linear_differs_from_noncausal():
    """Guard that the causal comparison above is not vacuous."""
    q, k, v, _ = inputs("linear-guard", 64)
    quadratic = variants.get("linear-elu1", "quadratic")
    assert variants.relative_error(quadratic(q, k, v, causal=True), quadratic(q, k, v, causal=False)) > 0.1


@pytest.mark.parametrize("impl", ["recurrent", "chunked"])
def test_causal_linear_float32_gradients_when_a_row_has_no_similarity(impl):
    """relu features can make every similarity of a query zero (EPS keeps that row finite: it outputs 0).
    The float32 impl must still match the float64 definition, forward and gradients, like quadratic does."""
    n = 96
    q, k, v, upstream = inputs(f"relu-empty-row-{impl}", n, b=1, h=1)
    # Query 0 is positive exactly where key 0 is negative, so relu(q0)·relu(k0) = 0 and row 0 is empty.
    sign = torch.where(torch.arange(D) < D // 2, 1.0, -1.0).double()
    q[..., 0, :] = q[..., 0, :].abs() * sign
    k[..., 0, :] = -k[..., 0, :].abs() * sign
    assert float(torch.relu(q[0, 0, 0]) @ torch.relu(k[0, 0, 0])) == 0.0

    definition = variants.get("linear-relu", "quadratic")  # the float64 reference of linear-relu/*
    expected, expected_grads = grads(definition, (q, k, v), upstream, causal=True)
    entry = variants.get("linear-relu", impl)
    params = {"chunk": 32} if impl == "chunked" else {}
    out, got_grads = grads(entry, [t.float() for t in (q, k, v)], upstream, causal=True, **params)
    tol = entry.tolerance["float32"]
    assert variants.relative_error(out, expected) <= tol
    for name, got, exp in zip("qkv", got_grads, expected_grads, strict=True):
        err = variants.relative_error(got, exp)
        assert err <= tol, f"{entry.name} d{name}: relative error {err:.3e} > {tol:.0e}"


@pytest.mark.parametrize("scale", [1.0, 1e3, 1e6, 1e-3], ids=["unit", "1e3", "1e6", "1e-3"])
def test_taylor_similarities_are_non_negative(scale):
    q, k = inputs(f"taylor-{scale}", 128, count=2, scale=scale)
    sim = linear.taylor(q) @ linear.taylor(k).transpose(-2, -1)
    assert torch.isfinite(sim).all()
    assert float(sim.min()) >= 0.0
    assert float(sim.max()) <= 2.0 + 1e-12
    # φ(q)·φ(k) = 1 + q̂·k̂, a sum of terms of magnitude up to 1 that may cancel to 0: the error is
    # bounded relative to the terms, not to the sum
    cos = torch.nn.functional.cosine_similarity(q[..., :, None, :], k[..., None, :, :], dim=-1)
    assert float((sim - (1 + cos)).abs().max()) <= 1e-12 * float((1 + cos.abs()).max())


@pytest.mark.parametrize("fmap", MAPS)
def test_feature_map_similarities_are_non_negative(fmap):
    q, k = inputs(f"nonneg-{fmap.name}", 64, count=2, scale=3.0)
    params = {"features": 32} if "features" in fmap.params else {}
    sim = fmap.query(q, **params) @ fmap.key(k, **params).transpose(-2, -1)
    assert torch.isfinite(sim).all() and float(sim.min()) >= 0.0


def test_performer_error_shrinks_with_more_features():
    q, k, v = inputs("performer-features", 64, b=1, h=4, count=3, scale=0.5)
    entry = variants.get("performer", "quadratic")

    def mean_error(features: int, causal: bool) -> float:
        out = entry(q, k, v, causal=causal, features=features)
        exact = variants.exact_attention(q, k, v, causal)
        return sum(variants.relative_error(out[:, h], exact[:, h]) for h in range(4)) / 4

    for causal in (False, True):
        few, many = mean_error(16, causal), mean_error(256, causal)
        assert many < few, (causal, few, many)
        assert many < 0.5  # an approximation of softmax attention, not noise


def test_exact_attention_is_softmax_attention():
    q, k, v = inputs("exact", 30, count=3)
    scores = q @ k.transpose(-2, -1) / D ** 0.5
    for causal in (False, True):
        if causal:
            scores = scores.masked_fill(torch.ones(30, 30, dtype=torch.bool).triu(1), float("-inf"))
        expected = torch.softmax(scores, dim=-1) @ v
        assert variants.relative_error(variants.exact_attention(q, k, v, causal), expected) < 1e-14


# --- unsupported reasons ---------------------------------------------------------------------------------

def test_standard_xformers_on_cpu_gives_a_reason():
    entry = variants.get("standard/xformers")
    for dtype in ("float32", "float16"):
        for mode in ("fwd", "fwd_bwd"):
            reason = why_not(entry, Point(device="cpu", dtype=dtype, mode=mode, head_dim=64))
            assert isinstance(reason, str) and reason.strip()


def test_local_xformers_on_cpu_gives_a_reason():
    entry = variants.get("local/xformers")
    reason = why_not(entry, point(entry, params={"window": 16}))
    assert isinstance(reason, str) and reason.strip()


@pytest.mark.parametrize("entry", [pytest.param(e, id=e.name) for e in builtin_entries()])
def test_unsupported_with_default_params_gives_reason_or_none(entry):
    """A sweep records the reason instead of crashing: not_supported_reasons() of a Point that leaves params at
    the entry's defaults (Point.params = {}) is a str or None, never an exception."""
    for causal in (False, True):
        reason = why_not(entry, Point(device="cpu", dtype="float32", head_dim=D, causal=causal))
        assert reason is None or (isinstance(reason, str) and reason)


def test_linformer_causal_gives_a_reason():
    entry = variants.get("linformer/projected")
    reason = why_not(entry, point(entry, causal=True))
    assert isinstance(reason, str) and "causal" in reason
    assert why_not(entry, point(entry, causal=False)) is None


def test_softmax_qk_causal_gives_a_reason_for_every_impl():
    impls = variants.select("linear-softmax-qk")
    assert impls
    for entry in impls:
        reason = why_not(entry, point(entry, causal=True))
        assert isinstance(reason, str) and "causal" in reason, entry.name
    assert any(why_not(e, point(e, causal=False)) is None for e in impls)


@pytest.mark.parametrize("name", ["standard/sdpa-cudnn", "standard/sdpa-efficient"])
def test_cuda_only_sdpa_backends_give_a_reason_on_cpu(name):
    entry = variants.get(name)
    reason = why_not(entry, Point(device="cpu", head_dim=64))
    assert isinstance(reason, str) and "cpu" in reason


def test_standard_eager_is_always_supported_on_cpu():
    entry = variants.get("standard/eager")
    for dtype in variants.DTYPES:
        for mode in variants.MODES:
            for causal in (False, True):
                assert why_not(entry, Point(dtype=dtype, mode=mode, causal=causal, head_dim=64)) is None


def test_linear_impls_declare_causality():
    for fmap in linear.FEATURE_MAPS:
        assert why_not(variants.get(fmap.name, "linear"), point(variants.get(fmap.name, "linear"),
                                                                    causal=True)) is not None
        if not fmap.causal_reason:
            for impl in ("recurrent", "chunked"):
                e = variants.get(fmap.name, impl)
                assert why_not(e, point(e, causal=True)) is None
                assert why_not(e, point(e, causal=False)) is not None


# --- registry ------------------------------------------------------------------------------------------

def test_get_accepts_both_spellings():
    assert variants.get("local/flex") is variants.get("local", "flex")
    assert variants.get("local/flex").name == "local/flex"


def test_select_returns_all_impls_of_a_variant():
    local = variants.select("local")
    assert {e.impl for e in local} == {e.impl for e in variants.entries() if e.variant == "local"}
    assert {"dense", "flex", "blocked", "xformers"} <= {e.impl for e in local}
    assert all(e.variant == "local" for e in local)
    assert variants.select("local/blocked") == [variants.get("local/blocked")]


def test_names_are_unique_and_families_valid():
    names = [e.name for e in variants.entries()]
    assert len(names) == len(set(names))
    assert {e.family for e in builtin_entries()} <= {"standard", "sparse", "linear", "gated", "hybrid", "lowrank",
                                                          "baseline"}


@pytest.mark.parametrize("call, bad, valid", [
    (lambda: variants.get("nope/flex"), "nope", ["local", "standard", "linformer"]),
    (lambda: variants.get("local/nope"), "nope", ["dense", "flex", "blocked"]),
    (lambda: variants.get("local", "nope"), "nope", ["dense", "flex", "blocked"]),
    (lambda: variants.select("nope"), "nope", ["local", "atrous", "strided"]),
    (lambda: variants.select("atrous/nope"), "nope", ["dense", "flex", "reshape"]),
], ids=["get-variant", "get-impl", "get-impl-2args", "select-variant", "select-impl"])
def test_unknown_names_raise_keyerror_naming_bad_and_valid(call, bad, valid):
    with pytest.raises(KeyError) as info:
        call()
    message = str(info.value)
    assert repr(bad) in message
    for name in valid:
        assert name in message


def test_resolve_overlays_defaults():
    entry = variants.get("strided/merged")
    assert entry.resolve() == dict(entry.params)
    assert entry.resolve({"rate": 3}) == {**entry.params, "rate": 3}
    assert variants.get("local/dense").resolve({"window": 0}) == {"window": 0}


@pytest.mark.parametrize("params, words", [
    ({"windw": 8}, ["windw", "window"]),
    ({"window": -1}, ["window", "-1"]),
    ({"window": 2.5}, ["window", "2.5"]),
    ({"window": "8"}, ["window", "'8'"]),
    ({"window": True}, ["window", "True"]),
], ids=["unknown", "negative", "float", "string", "bool"])
def test_resolve_rejects_bad_params(params, words):
    entry = variants.get("local/blocked")
    with pytest.raises(ValueError) as info:
        entry.resolve(params)
    for word in words:
        assert word in str(info.value)
    with pytest.raises(ValueError):
        entry(*inputs("resolve", 8, count=3), causal=False, **params)


def test_resolve_rejects_values_below_the_minimum():
    with pytest.raises(ValueError, match="rate"):
        variants.get("atrous/reshape").resolve({"rate": 0})
    with pytest.raises(ValueError, match="proj_len"):
        variants.get("linformer/projected").resolve({"proj_len": 0})
    with pytest.raises(ValueError, match="chunk"):
        variants.get("performer/chunked").resolve({"chunk": -3})


# --- FLOPs -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("entry", [pytest.param(e, id=e.name) for e in variants.select("standard")])
def test_standard_flops(entry):
    for b, h, n, d in ((1, 1, 128, 64), (2, 3, 232, 16)):
        full = entry.flops(Point(batch=b, heads=h, seq_len=n, head_dim=d, causal=False))
        half = entry.flops(Point(batch=b, heads=h, seq_len=n, head_dim=d, causal=True))
        assert full == 4.0 * b * h * n * n * d
        assert half == full / 2
