"""The TensorFlow frontend reaches the layers below it through one module, and never the
PyTorch frontend (AST only: runs without TensorFlow)."""

from __future__ import annotations

from pathlib import Path

from tests.elastic.test_layers import _imports
from tests.harness import REPO

BRIDGE = "elastic/tensorflow/_core_bridge.py"
BELOW = ("elastic.core", "elastic.codecs", "elastic.staleness", "elastic.credit",
         "elastic.state", "elastic.errors", "elastic.settings", "rendezvous")


def _offenders(prefixes: tuple[str, ...], skip: str | None = None) -> list[str]:
    found = []
    for path in sorted((REPO / "elastic/tensorflow").rglob("*.py")):
        rel = str(path.relative_to(REPO))
        if rel == skip:
            continue
        for line, module in _imports(Path(path)):
            if any(module == p or module.startswith(p + ".") for p in prefixes):
                found.append(f"{rel}:{line} imports {module}")
    return found


def test_the_tensorflow_frontend_never_imports_the_pytorch_frontend() -> None:
    offenders = _offenders(("elastic.torch",))
    assert not offenders, "\n".join(offenders)


def test_only_the_bridge_reaches_below_the_frontend() -> None:
    offenders = _offenders(BELOW, skip=BRIDGE)
    assert not offenders, "\n".join(offenders)
