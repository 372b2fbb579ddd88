"""Every third-party module that bench/ and variants/ import is declared in pyproject.toml: the
package must not work only because torch happens to pull something in."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIRST_PARTY = {"bench", "variants"}
# Import names whose distribution is named otherwise and that may not be installed here to ask.
DISTRIBUTION_OF = {"pynvml": "nvidia-ml-py", "fla": "fla-core"}


def imported_modules() -> dict[str, set[str]]:
    """Top-level module -> files importing it, from every absolute import in bench/ and variants/."""
    found: dict[str, set[str]] = {}
    for path in [*ROOT.joinpath("bench").rglob("*.py"), *ROOT.joinpath("variants").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                found.setdefault(name.split(".")[0], set()).add(str(path.relative_to(ROOT)))
    return found


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared() -> set[str]:
    project = tomllib.loads(ROOT.joinpath("pyproject.toml").read_text())["project"]
    requirements = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        requirements += extra
    return {normalise(re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0]) for r in requirements}


def distribution(module: str) -> str:
    installed = importlib.metadata.packages_distributions().get(module)
    return normalise(installed[0] if installed else DISTRIBUTION_OF.get(module, module))


def test_every_third_party_import_is_declared():
    third_party = {m: files for m, files in imported_modules().items()
                   if m not in sys.stdlib_module_names and m not in FIRST_PARTY and m != "__future__"}
    assert {"torch", "pandas", "jinja2", "markupsafe"} <= set(third_party)  # the scan sees real imports
    missing = {m: sorted(files) for m, files in third_party.items() if distribution(m) not in declared()}
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"


def test_the_scan_finds_an_undeclared_import(tmp_path, monkeypatch):
    """The check itself can fail: an import of a package nobody declared is reported."""
    (tmp_path / "bench").mkdir()
    (tmp_path / "variants").mkdir()
    (tmp_path / "bench" / "x.py").write_text("import yaml\nfrom . import y\nimport json\n")
    (tmp_path / "pyproject.toml").write_text(ROOT.joinpath("pyproject.toml").read_text())
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    modules = imported_modules()
    assert set(modules) == {"yaml", "json"}
    assert distribution("yaml") not in declared()
