"""The layering of the training side (docs/architecture.md): nothing below a frontend
imports a frontend or the process-wide session, and importing the core does not load a
framework frontend."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness import REPO, repo_env

CORE_PACKAGES = ("elastic/core", "elastic/codecs", "elastic/staleness", "elastic/credit")
FORBIDDEN = ("elastic.torch", "elastic.tensorflow", "elastic.core.session")


def _imports(path: Path) -> list[tuple[int, str]]:
    """Every module a file imports (at any depth: lazy imports count too)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.append((node.lineno, node.module))
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
    return found


@pytest.mark.parametrize("package", CORE_PACKAGES)
def test_no_layer_below_the_frontends_imports_a_frontend_or_the_session(package: str) -> None:
    offenders = []
    for path in sorted((REPO / package).rglob("*.py")):
        if path.name == "session.py" and package == "elastic/core":
            continue  # the session itself (only frontends import it)
        for line, module in _imports(path):
            if any(module == f or module.startswith(f + ".") for f in FORBIDDEN):
                offenders.append(f"{path.relative_to(REPO)}:{line} imports {module}")
    assert not offenders, "\n".join(offenders)


def test_importing_the_core_loads_no_frontend() -> None:
    code = ("import sys, elastic.core.session, elastic.codecs, elastic.staleness, "
            "elastic.credit.reporter, elastic.codecs.exchange\n"
            "print(sorted(m for m in sys.modules if m.startswith(('elastic.torch', "
            "'elastic.tensorflow'))))")
    out = subprocess.run([sys.executable, "-c", code], env=repo_env(), capture_output=True,
                         text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
