"""Triton's interpreter for the whole test session: fla's real Triton kernels on CPU tensors.

With triton installed and no CUDA device, ``TRITON_INTERPRET=1`` makes every ``@triton.jit`` kernel
run as Python over NumPy on CPU tensors, so the ``*/fla`` entries are tested over fla's own kernels
rather than a stand-in. The interpreter has gaps that fla's kernels run into; the shims below fill
them, and only here (checked with triton 3.7.1, 3.8.0 and 3.9.0, fla-core 0.6.0). Tests that need
the kernels take the ``triton_interpreter`` fixture, which skips with the reason when the
interpreter is not set up.
"""

from __future__ import annotations

import ast
import importlib.util
import os
from collections.abc import Callable
from types import ModuleType

import pytest
import torch
from packaging.version import Version


def _untimed(kernel_call: Callable[[], None], quantiles: tuple[float, ...]) -> list[float]:
    """The same time for every config, without running it: the autotuner keeps the first one listed.
    Every config computes the same result; interpreted timings would say nothing about a GPU's."""
    return [0.0] * len(quantiles)


def _is_range(call: ast.expr) -> bool:
    """``range(...)`` or ``tl.range(...)``: a loop the compiler keeps (not ``tl.static_range``, unrolled)."""
    if not isinstance(call, ast.Call):
        return False
    func = call.func
    return (isinstance(func, ast.Name) and func.id == "range") or (
        isinstance(func, ast.Attribute) and func.attr == "range")


def _install_shims(autotuner: ModuleType, interpreter: ModuleType) -> None:
    """Shims over ``triton.runtime.autotuner`` and ``triton.runtime.interpreter``."""

    class TensorInductionVariables(interpreter.ASTTransformer):
        """The compiler binds a ``for i in range(...)`` loop's variable as a Triton scalar tensor
        (triton/compiler/code_generator.py, visit_For); the interpreter leaves a Python int, and fla's
        kernels call ``i_t.to(tl.int64)`` on it (fla/ops/common/chunk_h.py and others). A first
        statement ``i = i`` in the body becomes ``i = to_tensor(i)`` through the interpreter's own
        visit_Assign."""

        def visit_For(self, node: ast.For) -> ast.AST:
            if isinstance(node.target, ast.Name) and _is_range(node.iter):
                name = node.target.id
                node.body.insert(0, ast.Assign([ast.Name(name, ast.Store())], ast.Name(name, ast.Load())))
            return self.generic_visit(node)

    # Used by every kernel rewritten from now on (the interpreter rewrites each kernel once, at its first call).
    interpreter.FunctionRewriter.ast_transformer = TensorInductionVariables()
    # Autotuner.do_bench asks driver.active.get_benchmarker() (triton/runtime/autotuner.py), and without
    # a GPU there is no active driver: every multi-config kernel (most of fla's) would raise.
    autotuner.Autotuner.do_bench = property(lambda self: _untimed)


def _set_up_interpreter() -> str | None:
    """Sets up Triton's interpreter with the shims; None if done, else why not."""
    if torch.cuda.is_available():
        return "a CUDA device is present: fla's kernels run compiled there (test_gpu_kernel_matches_float64_reference)"
    if importlib.util.find_spec("triton") is None:
        return "triton not installed: fla's kernels are Triton kernels (pip install triton)"
    # @triton.jit reads it when it decorates, triton's own library functions included: it must be set
    # before triton is first imported (torch._dynamo imports it too).
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import triton
        from triton.runtime import autotuner, interpreter
    except ImportError as exc:
        reason = f"triton not importable: {exc}"
    else:
        # Older interpreters fail on fla's kernels in other places (3.6: a loop bound held as an array).
        if Version(triton.__version__).release >= (3, 7):
            _install_shims(autotuner, interpreter)
            return None
        reason = f"triton {triton.__version__}: its interpreter runs fla's kernels from 3.7 on (the README pins 3.7.1)"
    del os.environ["TRITON_INTERPRET"]
    return reason


INTERPRETER_REASON = _set_up_interpreter()


def pytest_configure(config: pytest.Config) -> None:
    if INTERPRETER_REASON is None:
        # fla warns once, when imported, that no GPU backend is active (fla/utils/hardware.py): expected here.
        config.addinivalue_line("filterwarnings",
                                "ignore:Triton is not supported on current platform:UserWarning")


@pytest.fixture
def triton_interpreter() -> None:
    """Skips the test unless Triton kernels run here on CPU tensors, through the interpreter."""
    if INTERPRETER_REASON is not None:
        pytest.skip(INTERPRETER_REASON)


# --- torch_compat: the tests of what changes between torch releases -----------------------------------
# Private aten ops called positionally (variants/sparse/merged.py), dynamo settings set by name
# (variants/sparse/__init__.py), profiler events and the compat shims (bench/profile.py, bench/compat.py), SDPA
# probes and enable_gqa (variants/standard/__init__.py), FlexAttention and its document masks, the timers and
# CUDA primitives (bench/timers.py, bench/device.py), decode masks (variants/decode.py), xformers'
# bias classes and its build against torch, the declared range.
# .ci/run runs these (`pytest -m torch_compat`) on the oldest torch of pyproject's range too. Marked by
# module, so that a test added to one of these files is covered without a decorator; the marker is
# declared in pyproject.toml.
TORCH_COMPAT_MODULES = frozenset({
    "test_decode.py", "test_decode_shapes.py", "test_gpu_path.py", "test_masks.py", "test_profile.py",
    "test_shapes.py", "test_sparse_fused.py", "test_timers.py", "test_torch_compat.py", "test_variants.py",
    "test_xformers_layouts.py", "test_xformers_reasons.py",
})


def pytest_itemcollected(item: pytest.Item) -> None:
    # Before collection ends, so that `-m torch_compat` selects on it.
    if item.path.name in TORCH_COMPAT_MODULES:
        item.add_marker(pytest.mark.torch_compat)
