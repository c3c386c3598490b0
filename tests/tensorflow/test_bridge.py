"""The TensorFlow frontend reaches the layers below it (and, until the core is split out,
the PyTorch frontend's runtime) through one module, `_core_bridge` (AST only: runs
without TensorFlow)."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.harness import REPO

BRIDGE = "elastic/tensorflow/_core_bridge.py"
BELOW = ("elastic.torch", "elastic.engine", "elastic.compression", "elastic.rounds",
         "elastic.sparse", "elastic.worker", "elastic.state", "elastic.errors",
         "elastic.settings", "elastic.transport", "rendezvous")


def _imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.append((node.lineno, node.module))
    return found


def test_only_the_bridge_reaches_below_the_frontend() -> None:
    offenders, bridge_uses = [], []
    for path in sorted((REPO / "elastic/tensorflow").rglob("*.py")):
        rel = str(path.relative_to(REPO))
        for line, module in _imports(path):
            if any(module == p or module.startswith(p + ".") for p in BELOW):
                (bridge_uses if rel == BRIDGE else offenders).append(f"{rel}:{line} {module}")
    assert not offenders, "\n".join(offenders)
    assert bridge_uses, "the bridge should be the one module that imports the core"
