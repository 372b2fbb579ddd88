"""The fla entries (variants/linear/fla.py), against the float64 quadratic reference: layout, φ, normaliser,
ε and gradients over fla's own naive torch op, and over fla's real chunk kernel: compiled on a CUDA device,
or on CPU through Triton's interpreter (set up in tests/conftest.py, with the shims fla's kernels need)."""

from __future__ import annotations

import ast
import importlib.util
import json
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch
from support import why_not
from test_linear_shapes import errors as layout_errors
from typer.testing import CliRunner

import variants
from bench.cli import app
from variants import Point, linear
from variants.layouts import PACKED, PADDED, Layout
from variants.linear import fla as linear_fla
from variants.registry import DEFAULT_TOLERANCE

B, H, D = 2, 2, 16
MAPS = [f for f in linear.FEATURE_MAPS if not f.causal_reason]
NAMES = [f"{f.name}/fla" for f in MAPS]
TOL = DEFAULT_TOLERANCE["float32"]  # the naive op is exact float32 (the entries' own allows for TF32)


def fla_file(*parts: str) -> Path:
    """A file of the installed fla package, found without importing fla (its ops import Triton)."""
    spec = importlib.util.find_spec("fla")
    if spec is None:
        pytest.skip("fla not installed (pip install 'attnbench[fla]')")
    return Path(spec.submodule_search_locations[0], "ops", "linear_attn", *parts)


@pytest.fixture(scope="module")
def naive():
    """fla.ops.linear_attn.naive, loaded from its file: importing it as fla.ops... would import Triton."""
    spec = importlib.util.spec_from_file_location("fla_linear_attn_naive", fla_file("naive.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.naive_recurrent_linear_attn


@pytest.fixture
def over_naive(naive, monkeypatch):
    """The entries run the naive op where the GPU runs fla's chunk kernel."""
    monkeypatch.setattr(linear_fla, "_fla_op", lambda: naive)


@pytest.fixture
def fla_kernels(triton_interpreter):
    """The entries run fla's real chunk kernel on CPU tensors, interpreted (tests/conftest.py)."""
    if importlib.util.find_spec("fla") is None:
        pytest.skip("fla not installed (pip install 'attnbench[fla]')")


@pytest.fixture(params=["naive", "kernel"])
def fla_op_tol(request) -> float:
    """The entries over fla's naive op, then over its interpreted kernel; the float32 tolerance for each
    (the naive op is exact float32, the entries' own tolerance allows for the kernel's TF32 on a GPU)."""
    if request.param == "naive":
        request.getfixturevalue("over_naive")
        return TOL
    request.getfixturevalue("fla_kernels")
    return linear_fla.TOLERANCE["float32"]


def inputs(tag: str, n: int, b: int = B, h: int = H, d: int = D, count: int = 4) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(zlib.crc32(tag.encode()))
    return [torch.randn(b, h, n, d, generator=gen, dtype=torch.float64) for _ in range(count)]


def grads(fn, tensors, upstream, **kwargs):
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*leaves, **kwargs)
    return out, torch.autograd.grad(out, leaves, upstream.to(out.dtype))


def reference_errors(entry, q, k, v, upstream, params, dtype: torch.dtype = torch.float32,
                     layout: Layout | None = None) -> dict[str, float]:
    """Relative errors of the entry's causal output and q/k/v gradients in ``dtype`` on the real tokens,
    against the float64 reference's (each document alone, K and V repeated to the query heads)."""
    errors = layout_errors(entry, q, k, v, upstream, layout, True, dtype, **params)
    return dict(zip(("out", "dq", "dk", "dv"), errors, strict=True))


def assert_matches_reference(entry, q, k, v, upstream, params, tol: float = TOL, layout: Layout | None = None):
    for name, err in reference_errors(entry, q, k, v, upstream, params, layout=layout).items():
        assert err <= tol, f"{entry.name} {name}: relative error {err:.3e}"


# --- the adapter over fla's naive op against the float64 reference -------------------------------------

@pytest.mark.parametrize("which", ["small", "defaults"])
@pytest.mark.parametrize("n", [50, 231])
@pytest.mark.parametrize("name", NAMES)
def test_entry_over_naive_matches_float64_reference(over_naive, name, n, which):
    entry = variants.get(name)
    params = {"features": 64} if which == "small" and "features" in entry.params else {}
    q, k, v, upstream = inputs(f"fla-{name}-{n}-{which}", n)
    assert_matches_reference(entry, q, k, v, upstream, params)


def test_relu_row_without_similarity(fla_op_tol):
    """relu can make every similarity of a query zero: like the other impls, the row outputs 0 and its
    gradients match the definition's (ε keeps them finite)."""
    q, k, v, upstream = inputs("fla-relu-empty-row", 96, b=1, h=1)
    sign = torch.where(torch.arange(D) < D // 2, 1.0, -1.0).double()
    q[..., 0, :] = q[..., 0, :].abs() * sign
    k[..., 0, :] = -k[..., 0, :].abs() * sign
    assert float(torch.relu(q[0, 0, 0]) @ torch.relu(k[0, 0, 0])) == 0.0
    assert_matches_reference(variants.get("linear-relu/fla"), q, k, v, upstream, {}, tol=fla_op_tol)


def test_epsilon_is_the_projects(fla_op_tol):
    """With φ(q)·φ(k) = EPS the output is v·EPS/(EPS + EPS) = v/2; fla's own ε (1e-10) would give ≈ v."""
    q, k, v = (torch.zeros(1, 1, 1, D) for _ in range(3))
    q[..., 0] = k[..., 0] = linear.EPS ** 0.5
    v[..., :] = 1.0
    entry = variants.get("linear-relu/fla")
    assert torch.allclose(entry.reference(q.double(), k.double(), v.double(), causal=True),
                          torch.full((1, 1, 1, D), 0.5, dtype=torch.float64))
    assert torch.allclose(entry(q, k, v, causal=True), torch.full((1, 1, 1, D), 0.5), rtol=1e-5, atol=0)


def test_reference_is_the_linear_impls_definition():
    for fmap in MAPS:
        entry = variants.get(fmap.name, "fla")
        assert entry.reference is variants.get(fmap.name, "chunked").reference
        q, k, v = inputs(f"fla-definition-{fmap.name}", 40, count=3)
        quadratic = variants.get(fmap.name, "quadratic")
        assert variants.relative_error(entry.reference(q, k, v, causal=True, **entry.resolve()),
                                       quadratic(q, k, v, causal=True)) < 1e-14


# --- layout and call ----------------------------------------------------------------------------------

@pytest.mark.parametrize("fmap", MAPS, ids=[f.name for f in MAPS])
def test_layout_round_trips(fmap):
    """fla gets (batch, seq, heads, ·) with φ already applied (odd widths padded with a zero feature), and
    its (batch, seq, heads, dim) output comes back as (batch, heads, seq, dim). seq ≠ heads, so swapping
    them fails here."""
    b, h, n = 2, 3, 5
    q, k, v = inputs(f"fla-layout-{fmap.name}", n, b=b, h=h, count=3)
    params = {"features": 8} if fmap.params else {}
    fq, fk = fmap.query(q, **params), fmap.key(k, **params)
    width = fq.shape[-1]
    seen = {}

    def spy(q_, k_, v_, **kwargs):
        seen.update(q=q_, k=k_, v=v_, kwargs=kwargs)
        return v_ * 2, None

    out = linear_fla.fla_linear_attention(q, k, v, fmap, params, spy)
    assert seen["kwargs"] == {"scale": linear_fla.SCALE, "normalize": True}
    assert seen["q"].shape == seen["k"].shape == (b, n, h, width + width % 2)
    assert seen["v"].shape == (b, n, h, D)
    for name, expected in (("q", fq), ("k", fk), ("v", v)):
        assert torch.equal(seen[name][..., :expected.shape[-1]], expected.transpose(1, 2)), name
    if width % 2:
        assert not seen["q"][..., -1].any() and not seen["k"][..., -1].any()
    assert out.shape == (b, h, n, D) and torch.equal(out, v * 2)


def test_kernel_names_the_op_that_runs():
    for name in NAMES:
        entry = variants.get(name)
        assert entry.kernel_name(Point(device="cuda", causal=True)) == linear_fla.FLA_OP
        assert entry.kernel_name(Point(device="cuda", causal=True, layout=PADDED)) == linear_fla.FLA_OP
        assert entry.kernel_name(Point(device="cuda", causal=True, layout=PACKED, heads=4, kv_heads=1)) == \
            f"{linear_fla.FLA_OP} varlen (cu_seqlens) on φ(K), V repeated to the query heads"
    assert linear_fla.FLA_OP == "fla.ops.linear_attn.chunk_linear_attn"


def test_packed_grouped_call():
    """A packed row reaches fla as its varlen form (cu_seqlens: each document's end), grouped heads as φ(K)
    and V repeated to the query heads (fla takes as many key heads as query heads), each KV head's keys
    mapped once."""
    layout = Layout(PACKED, ((1, 63, 64, 65, 38),))
    q, k, v = inputs("fla-packed-call", 231, b=1, h=4, count=3)
    k, v = k[:, :2], v[:, :2]
    fmap = linear.FEATURE_MAPS[0]
    seen = {}

    def spy(q_, k_, v_, **kwargs):
        seen.update(q=q_, k=k_, v=v_, kwargs=kwargs)
        return v_, None

    linear_fla.fla_linear_attention(q, k, v, fmap, {}, spy, layout)
    assert seen["kwargs"]["cu_seqlens"].tolist() == [0, 1, 64, 128, 193, 231]
    assert seen["q"].shape == seen["k"].shape == (1, 231, 4, D)
    for head in range(4):
        assert torch.equal(seen["k"][:, :, head], fmap.key(k[:, head // 2]))
        assert torch.equal(seen["v"][:, :, head], v[:, head // 2])


def test_chunk_op_takes_the_naive_call_and_eps(naive):
    """The GPU op is called as the naive one is tested (scale, normalize) and adds the same ε (read from
    fla's source: importing it needs Triton)."""
    chunk = ast.parse(fla_file("chunk.py").read_text())
    (fn,) = [node for node in chunk.body if isinstance(node, ast.FunctionDef) and node.name == "chunk_linear_attn"]
    assert {"q", "k", "v", "scale", "normalize"} <= {a.arg for a in fn.args.args}
    assert "normalize_with_z_state" in ast.unparse(fn)
    for path in (fla_file("utils.py"), fla_file("naive.py")):
        constants = {node.value for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.Constant)}
        assert linear_fla.FLA_EPS in constants, path.name


def test_flops_are_the_chunked_impls_at_fla_chunk():
    for fmap in MAPS:
        entry, chunked = variants.get(fmap.name, "fla"), variants.get(fmap.name, "chunked")
        p = Point(batch=2, heads=4, seq_len=1000, head_dim=64, causal=True, params=entry.resolve())
        chunked_point = Point(batch=2, heads=4, seq_len=1000, head_dim=64, causal=True,
                              params=chunked.resolve({"chunk": linear_fla.FLA_CHUNK}))
        assert entry.flops(p) == chunked.flops(chunked_point) > 0


# --- unsupported reasons ------------------------------------------------------------------------------

def _cuda_point(entry, **kwargs) -> Point:
    return Point(**{"device": "cuda", "head_dim": 64, "causal": True, "params": entry.resolve(), **kwargs})


@pytest.fixture
def gpu_present(monkeypatch):
    """As on a machine with Triton and a CUDA device (nothing runs: only not_supported_reasons() is asked)."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "triton" else real(name, *a))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)


@pytest.mark.parametrize("name", NAMES)
def test_cpu_gives_the_gpu_reason(name):
    entry = variants.get(name)
    for causal in (False, True):
        reason = why_not(entry, Point(device="cpu", causal=causal, params=entry.resolve()))
        assert "device=cpu" in reason and "Triton GPU kernels" in reason


@pytest.mark.parametrize("name", NAMES)
def test_non_causal_gives_its_reason(name, gpu_present):
    entry = variants.get(name)
    reason = why_not(entry, _cuda_point(entry, causal=False))
    assert reason.startswith("non-causal not supported") and "causal prefix" in reason
    with pytest.raises(ValueError, match="causal prefix"):
        entry(*inputs("fla-noncausal", 8, count=3), causal=False)


def test_missing_triton_or_cuda_gives_a_reason(monkeypatch):
    entry = variants.get("linear-elu1/fla")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "triton" else real(name, *a))
    assert why_not(entry, _cuda_point(entry)).startswith("triton not installed")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "triton" else real(name, *a))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert why_not(entry, _cuda_point(entry)).startswith("no CUDA device")


def test_missing_fla_gives_a_reason(monkeypatch):
    monkeypatch.setitem(sys.modules, "fla", None)  # find_spec answers None, as when not installed
    entry = variants.get("performer/fla")
    assert why_not(entry, _cuda_point(entry)) == "fla not installed (pip install 'attnbench[fla]')"


def test_dtypes_and_head_dims(gpu_present):
    entry = variants.get("linear-taylor/fla")
    for dtype in ("float32", "bfloat16"):
        for mode in ("fwd", "bwd", "fwd_bwd"):
            assert why_not(entry, _cuda_point(entry, dtype=dtype, mode=mode)) is None, (dtype, mode)
    # decoding is the recurrent impl's: the same function, an eager state step
    assert why_not(entry, _cuda_point(entry, mode=variants.DECODE)) == "linear-taylor/fla has no decode path"
    assert "dtype=float64 not supported" in why_not(entry, _cuda_point(entry, dtype="float64"))
    assert "subnormals" in why_not(entry, _cuda_point(entry, dtype="float16"))
    odd = Point(device="cuda", head_dim=63, causal=True, dtype="bfloat16", mode="fwd_bwd")
    assert "even value width" in why_not(entry, odd)
    assert why_not(entry, Point(device="cuda", head_dim=63, causal=True, dtype="float32", mode="fwd_bwd")) is None


def test_registry_imports_without_fla_or_triton():
    code = ("import sys; sys.modules['fla'] = sys.modules['triton'] = None\n"
            "import variants\n"
            "for name in " + repr(NAMES) + ":\n"
            "    print('; '.join(variants.get(name).not_supported_reasons(variants.Point(device='cuda', causal=True))))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["fla not installed (pip install 'attnbench[fla]')"] * len(NAMES)


def test_bench_list_rows_carry_the_reasons():
    result = CliRunner().invoke(app, ["list", "--json", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    rows = {f"{r['variant']}/{r['impl']}": r for r in json.loads(result.output)
            if r["impl"] == "fla" and r["family"] == "linear"}
    assert sorted(rows) == sorted(NAMES)
    for row in rows.values():
        assert not row["available"] and row["family"] == "linear"
        assert "Triton GPU kernels" in row["reason"]


# --- the kernel itself --------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [50, 231])
@pytest.mark.parametrize("name", NAMES)
def test_kernel_matches_float64_reference(fla_kernels, name, n):
    """fla's chunk kernel, forward and backward, interpreted on CPU. float32 only: the entries refuse float16
    (see the next test), and Triton's interpreter has no bfloat16 arithmetic (it holds bfloat16 as uint16)."""
    entry = variants.get(name)
    q, k, v, upstream = inputs(f"fla-kernel-{name}-{n}", n)
    assert_matches_reference(entry, q, k, v, upstream, {}, tol=entry.tolerance["float32"])


# Documents on and next to fla's chunk edges (64), and of length 1.
DOCUMENTS = {50: (1, 20, 29), 231: (1, 63, 64, 65, 38)}


@pytest.mark.parametrize("kind", [PACKED, PADDED])
@pytest.mark.parametrize("n", [50, 231])
@pytest.mark.parametrize("name", NAMES)
def test_kernel_grouped_heads_and_documents(fla_kernels, name, n, kind):
    """fla's chunk kernel, interpreted, for 4 query heads on 2 KV heads and documents packed (fla's
    varlen cu_seqlens) or padded: outputs and q/k/v gradients on the real tokens against the float64
    reference of each document alone."""
    lengths = DOCUMENTS[n]
    layout = Layout(PACKED, (lengths,)) if kind == PACKED else Layout(PADDED, tuple((m,) for m in lengths))
    rows, width = len(layout.lengths), layout.width
    q, upstream = inputs(f"fla-kernel-{name}-{n}-{kind}", width, b=rows, h=4, count=2)
    k, v = inputs(f"fla-kernel-kv-{name}-{n}-{kind}", width, b=rows, h=2, count=2)
    entry = variants.get(name)
    params = {"features": 32} if "features" in entry.params else {}  # the interpreter's time grows with it
    assert_matches_reference(entry, q, k, v, upstream, params, tol=entry.tolerance["float32"], layout=layout)


def test_kernel_relu_row_without_similarity_inside_a_document(fla_kernels):
    """The second packed document starts inside fla's chunk, after one with large key sums; its first
    query has no similarity with its first key: the kernel's state restarts there (cu_seqlens), so the
    row outputs 0 and its gradients match the definition's."""
    layout = Layout(PACKED, ((90, 60),))
    q, k, v, upstream = inputs("fla-relu-empty-document", 150, b=1, h=1)
    k[..., :90, :] *= 10.0
    sign = torch.where(torch.arange(D) < D // 2, 1.0, -1.0).double()
    q[..., 90, :] = q[..., 90, :].abs() * sign
    k[..., 90, :] = -k[..., 90, :].abs() * sign
    assert float(torch.relu(q[0, 0, 90]) @ torch.relu(k[0, 0, 90])) == 0.0
    entry = variants.get("linear-relu/fla")
    assert_matches_reference(entry, q, k, v, upstream, {}, tol=entry.tolerance["float32"], layout=layout)


def test_kernel_float16_is_refused_for_cause(fla_kernels):
    """The entries refuse float16 because fla normalises in the input dtype (probe): through the kernel,
    relu's gradients are off by far more than the float16 tolerance. If this fails, fla has fixed it and
    the refusal can go."""
    entry = variants.get("linear-relu/fla")
    errors = reference_errors(entry, *inputs("fla-kernel-float16", 50), {}, dtype=torch.float16)
    assert not all(err <= entry.tolerance["float16"] for err in errors.values()), errors


@pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("triton") is None,
                    reason="fla's chunk kernel is a Triton GPU kernel: needs CUDA and triton")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", NAMES)
def test_gpu_kernel_matches_float64_reference(name, dtype):
    entry = variants.get(name)
    n, d = 231, 64
    assert why_not(entry, Point(device="cuda", head_dim=d, seq_len=n, causal=True, dtype=dtype,
                                   mode="fwd_bwd", params=entry.resolve())) is None
    q, k, v, upstream = (t.cuda() for t in inputs(f"fla-gpu-{name}", n, d=d))
    expected, expected_grads = grads(entry.reference, (q, k, v), upstream, causal=True, **entry.resolve())
    torch_dtype = variants.DTYPES[dtype]
    out, got_grads = grads(entry, [t.to(torch_dtype) for t in (q, k, v)], upstream, causal=True)
    tol = entry.tolerance[dtype]
    assert out.dtype == torch_dtype and variants.relative_error(out, expected) <= tol
    for name_, got, exp in zip("qkv", got_grads, expected_grads, strict=True):
        assert variants.relative_error(got, exp) <= tol, name_
