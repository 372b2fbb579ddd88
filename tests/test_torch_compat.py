"""The declared torch range, and what the other version-sensitive tests do not reach: pyproject's range is
the one the README states and the oldest CI job installs; dynamo's settings exist under the names
variants.sparse sets; the xformers extra resolves, for a torch named beside it, to a build whose C++
extension loads. Marked ``torch_compat`` (tests/conftest.py): CI runs them on the oldest torch too."""

from __future__ import annotations

import importlib.metadata
import re
import tomllib
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement
from packaging.version import Version

from variants import sparse, xformers_ops

ROOT = Path(__file__).resolve().parent.parent


def torch_range() -> tuple[Version, Version]:
    """The oldest and newest torch minor pyproject admits: ``torch>=A.B,<C.D`` gives A.B and C.(D−1)."""
    project = tomllib.loads(ROOT.joinpath("pyproject.toml").read_text())["project"]
    requirement = next(r for r in map(Requirement, project["dependencies"]) if r.name == "torch")
    bounds = {s.operator: Version(s.version) for s in requirement.specifier}
    assert set(bounds) == {">=", "<"}, f"torch's range is stated as a floor and an exclusive minor: {requirement}"
    low, high = bounds[">="], bounds["<"]
    assert high.micro == 0 and high.minor > 0, f"the exclusive bound is the first unsupported minor: {requirement}"
    return Version(f"{low.major}.{low.minor}"), Version(f"{high.major}.{high.minor - 1}")


def test_readme_and_ci_state_the_declared_torch_range():
    oldest, newest = torch_range()
    readme = " ".join(ROOT.joinpath("README.md").read_text().split())
    assert f"Supported PyTorch: {oldest} through {newest}" in readme
    pins = [Version(v) for v in re.findall(r"torch==(\d+\.\d+\.\d+)", ROOT.joinpath(".ci", "run").read_text())]
    assert pins and all(oldest <= Version(f"{p.major}.{p.minor}") <= newest for p in pins), pins
    assert any(Version(f"{p.major}.{p.minor}") == oldest for p in pins), f"no CI job on torch {oldest}: {pins}"


# torch.compile imports inductor, whose CPU modules (torch/utils/mkldnn.py) warn of torch's own deprecation
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_compiled_flex_lifts_dynamos_recompile_limits():
    """variants.sparse sets dynamo's limits by name (they were ``cache_size_limit`` before); dynamo's
    config refuses a name it lacks, so a rename fails here rather than at a GPU's first flex point."""
    config = torch._dynamo.config
    sparse._compiled_flex.cache_clear()
    # dynamo's own patch restores the values on exit (monkeypatch's undo would delete the names)
    with config.patch(recompile_limit=8, accumulated_recompile_limit=8):
        try:
            assert callable(sparse._compiled_flex())  # compiles lazily, at its first call: nothing runs here
            assert config.recompile_limit >= 4096 and config.accumulated_recompile_limit >= 4096
        finally:
            sparse._compiled_flex.cache_clear()


def test_xformers_built_for_this_torch_loads_its_extension():
    """With a torch named in the same pip command, the xformers extra resolves to the newest xformers
    whose own torch requirement admits it: up to torch 2.10 a build for exactly that torch (2.9.1:
    0.0.33.post2, the oldest CI job's). Such a build's C++ extension loads; a later torch gets 0.0.35,
    built for 2.10, whose failure to load test_xformers_reasons covers."""
    try:
        requires = importlib.metadata.requires("xformers") or []
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("xformers is not installed")
    pins = [s for r in map(Requirement, requires) if r.name == "torch" for s in r.specifier if s.operator == "=="]
    if not pins:
        pytest.skip(f"xformers {importlib.metadata.version('xformers')} is not built for one torch release")
    assert all(s.contains(Version(torch.__version__).public) for s in pins), (pins, torch.__version__)
    assert xformers_ops.xformers_build_mismatch(xformers_ops._xformers_load_exception()) is None


def test_every_torch_compat_module_exists():
    """A renamed test module would drop out of the oldest torch's CI job without a word."""
    from conftest import TORCH_COMPAT_MODULES

    assert not sorted(m for m in TORCH_COMPAT_MODULES if not ROOT.joinpath("tests", m).is_file())
